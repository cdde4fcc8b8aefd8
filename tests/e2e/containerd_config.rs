//! `pullcache containerd-config install|uninstall`, run as the binary: golden files, merging
//! with an operator's hosts.toml, idempotence, an exact restore, the config_path check, and
//! the real containerd pulling through what install wrote, and past pullcache when it is down.

use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::containerd::{Containerd, ContainerdOptions, Puller, Release};
use support::images::push_oci_image;
use support::pullcache::Pullcache;
use support::registry::Registry;

const BIN: &str = env!("CARGO_BIN_EXE_pullcache");
const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/containerd-config");
const MIRROR: &str = "http://127.0.0.1:5000";

/// An operator's own hosts.toml, with settings and a mirror of its own.
const EXISTING: &str = r#"server = "https://registry-1.docker.io"
ca = "/etc/containerd/certs.d/docker.io/corp-ca.pem"

[host."https://mirror.corp.example"]
  capabilities = ["pull"]
"#;

fn run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .output()
        .expect("pullcache runs")
}

fn install(certs: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "containerd-config",
        "install",
        "--certs-dir",
        certs.to_str().unwrap(),
        "--mirror",
        MIRROR,
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--containerd-config", "/nonexistent/config.toml"]);
    let out = run(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn uninstall(certs: &Path) -> std::process::Output {
    run(&["containerd-config", "uninstall", "--certs-dir", certs.to_str().unwrap()])
}

/// Every file under `dir`, by relative path.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.insert(path.strip_prefix(dir).unwrap().to_owned(), b"<dir>".to_vec());
                stack.push(path);
            } else {
                files.insert(
                    path.strip_prefix(dir).unwrap().to_owned(),
                    std::fs::read(&path).unwrap(),
                );
            }
        }
    }
    files
}

fn assert_golden(actual: &Path, golden: &str) {
    let golden_path = Path::new(GOLDEN).join(golden);
    let actual = std::fs::read_to_string(actual).unwrap();
    let expected = std::fs::read_to_string(&golden_path)
        .unwrap_or_else(|e| panic!("{}: {e}; the actual output is:\n{actual}", golden_path.display()));
    assert_eq!(actual, expected, "differs from {}", golden_path.display());
}

#[test]
fn install_matches_the_golden_files_and_merges() {
    let certs = tempfile::tempdir().unwrap();
    std::fs::create_dir(certs.path().join("docker.io")).unwrap();
    std::fs::write(certs.path().join("docker.io/hosts.toml"), EXISTING).unwrap();

    install(
        certs.path(),
        &[
            "--registry",
            "docker.io",
            "--registry",
            "registry.test:5000",
            "--registry",
            "ghcr.io",
            "--bypass",
            "internal.example:5000",
        ],
    );
    assert_golden(&certs.path().join("docker.io/hosts.toml"), "merged-docker.io.toml");
    // A bypassed registry keeps containerd off pullcache: the registry itself only.
    assert_golden(
        &certs.path().join("internal.example:5000/hosts.toml"),
        "bypass-internal.example-5000.toml",
    );
    assert_golden(
        &certs.path().join("registry.test:5000/hosts.toml"),
        "new-registry.test-5000.toml",
    );
    assert_eq!(
        std::fs::read_to_string(certs.path().join("docker.io/hosts.toml.pullcache-orig")).unwrap(),
        EXISTING
    );

    let defaults = tempfile::tempdir().unwrap();
    install(defaults.path(), &[]);
    assert_golden(&defaults.path().join("_default/hosts.toml"), "default.toml");
}

#[test]
fn install_twice_changes_nothing_and_uninstall_restores_exactly() {
    let certs = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(certs.path().join("docker.io")).unwrap();
    std::fs::write(certs.path().join("docker.io/hosts.toml"), EXISTING).unwrap();
    std::fs::create_dir_all(certs.path().join("quay.io")).unwrap();
    std::fs::write(
        certs.path().join("quay.io/hosts.toml"),
        "server = \"https://quay.io\"\n",
    )
    .unwrap();
    let before = snapshot(certs.path());

    let args = [
        "--registry",
        "docker.io",
        "--registry",
        "ghcr.io",
        "--bypass",
        "quay.io",
    ];
    let first = install(certs.path(), &args);
    assert!(String::from_utf8_lossy(&first.stdout).contains("wrote"));
    let installed = snapshot(certs.path());
    let second = install(certs.path(), &args);
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(
        !stdout.contains("wrote") && stdout.matches("unchanged").count() == 3,
        "{stdout}"
    );
    assert_eq!(snapshot(certs.path()), installed, "a second install changed files");

    let out = uninstall(certs.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        snapshot(certs.path()),
        before,
        "uninstall did not restore the directory exactly"
    );
    // Uninstalling again is harmless.
    let again = uninstall(certs.path());
    assert!(again.status.success());
    assert_eq!(snapshot(certs.path()), before);
}

/// A certs dir install had to create is gone after uninstall; one that was there stays.
#[test]
fn uninstall_removes_the_certs_dir_install_created() {
    let etc = tempfile::tempdir().unwrap();
    let certs = etc.path().join("certs.d");
    install(&certs, &[]);
    assert!(certs.join("_default/hosts.toml").exists());
    let out = uninstall(&certs);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!certs.exists(), "uninstall left the certs dir install created");

    std::fs::create_dir(&certs).unwrap();
    install(&certs, &[]);
    // A registry directory that is a link is not followed: what it points at is not ours.
    let outside = etc.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let theirs = "# Managed by pullcache (containerd-config install).\nserver = \"https://x\"\n";
    std::fs::write(outside.join("hosts.toml"), theirs).unwrap();
    std::os::unix::fs::symlink(&outside, certs.join("evil.example.com")).unwrap();
    uninstall(&certs);
    assert_eq!(std::fs::read_to_string(outside.join("hosts.toml")).unwrap(), theirs);
    std::fs::remove_file(certs.join("evil.example.com")).unwrap();
    assert!(certs.is_dir(), "uninstall removed a certs dir that was there before");
    assert_eq!(std::fs::read_dir(&certs).unwrap().count(), 0);
}

#[test]
fn an_unset_config_path_is_reported_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n",
    )
    .unwrap();
    let certs = dir.path().join("certs.d");
    let args = |strict: bool| {
        let mut a = vec![
            "containerd-config".to_owned(),
            "install".into(),
            "--certs-dir".into(),
            certs.display().to_string(),
            "--containerd-config".into(),
            config.display().to_string(),
        ];
        if strict {
            a.push("--strict".into());
        }
        a
    };
    // --strict checks first: nothing is written.
    let strict = std::process::Command::new(BIN).args(args(true)).output().unwrap();
    assert!(!strict.status.success(), "--strict must fail");
    let stderr = String::from_utf8_lossy(&strict.stderr);
    assert!(stderr.contains("--strict: nothing written"), "{stderr}");
    assert!(!certs.exists(), "--strict wrote the certs dir before failing");

    let out = std::process::Command::new(BIN).args(args(false)).output().unwrap();
    assert!(out.status.success(), "without --strict the wiring is still written");
    assert!(certs.join("_default/hosts.toml").exists());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("config_path is unset") && stderr.contains(&format!("config_path = \"{}\"", certs.display())),
        "{stderr}"
    );
    let strict = std::process::Command::new(BIN).args(args(true)).output().unwrap();
    assert!(!strict.status.success(), "--strict must fail");

    std::fs::write(
        &config,
        format!(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n",
            certs.display()
        ),
    )
    .unwrap();
    let fine = std::process::Command::new(BIN).args(args(true)).output().unwrap();
    assert!(fine.status.success());
    assert!(!String::from_utf8_lossy(&fine.stderr).contains("warning"));
}

each_release!(
    containerd_pulls_through_the_wiring_and_past_it_when_pullcache_is_down,
    super::pulls_through_the_wiring_and_past_it_when_pullcache_is_down
);

/// The kubelet's path on a node whose certs.d already has a directory for the registry:
/// `install` with no registry named merges pullcache into it (containerd reads it instead of
/// `_default`), checks with `--strict` that this containerd reads the certs dir (its
/// `config_path` is in a drop-in), and CRI pulls go through pullcache, then past it.
async fn pulls_through_the_wiring_and_past_it_when_pullcache_is_down(release: Release) -> anyhow::Result<()> {
    let registry = Registry::start().await?;
    let image = push_oci_image(&registry.url(), "team/app", "v1", &[128 * 1024]).await?;
    let cache = tempfile::tempdir()?;
    let mut pullcache = Pullcache::start(
        cache.path(),
        &[("registry.test", &registry.url())],
        Duration::from_secs(60),
    )
    .await?;

    // The operator's hosts.toml already sends registry.test to the registry, with a host
    // table (containerd 1.6 ignores a named registry's file without one).
    let certs = tempfile::tempdir()?;
    std::fs::create_dir(certs.path().join("registry.test"))?;
    let operators = format!(
        "server = \"{url}\"\n\n[host.\"{url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        url = registry.url()
    );
    std::fs::write(certs.path().join("registry.test/hosts.toml"), &operators)?;
    let ctd = Containerd::start_with(ContainerdOptions::cri(certs.path()).of(release)).await?;
    let out = run(&[
        "containerd-config",
        "install",
        "--certs-dir",
        certs.path().to_str().unwrap(),
        "--mirror",
        &pullcache.url(),
        "--containerd-config",
        ctd.config_path().to_str().unwrap(),
        "--containerd-bin",
        release.containerd()?.to_str().unwrap(),
        "--strict",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let merged = certs.path().join("registry.test/hosts.toml");
    assert!(
        stdout.contains(&format!("merged {}", merged.display())),
        "install did not say it merged the registry's own file: {stdout}"
    );

    let reference = image.reference("registry.test");
    ctd.pull_as(Puller::Cri, &reference, certs.path()).await?;
    for blob in &image.blobs {
        assert!(
            pullcache.stored_blobs().contains(&blob.digest),
            "{} did not go through pullcache",
            blob.digest
        );
    }

    // pullcache stopped: a fresh containerd on the same wiring pulls straight from the
    // registry.
    pullcache.stop().await?;
    drop(ctd);
    let ctd = Containerd::start_with(ContainerdOptions::cri(certs.path()).of(release)).await?;
    let gets_before = registry.access_log_count("GET", "/blobs/");
    ctd.pull_as(Puller::Cri, &reference, certs.path()).await?;
    let gets_after = registry
        .wait_access_log_count("GET", "/blobs/", gets_before + 1, Duration::from_secs(5))
        .await;
    assert!(gets_after > gets_before, "the second pull did not reach the registry");

    // Uninstall gives the operator's file back, byte for byte.
    let out = uninstall(certs.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&merged)?, operators);
    Ok(())
}
