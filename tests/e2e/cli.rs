//! The `pullcache` binary as an operator runs it: defaults in `--help`, exit 64 on bad
//! configuration, serving, and a clean exit on SIGTERM.

use crate::support;

use std::ffi::OsStr;
use std::time::Duration;

use support::binary::BIN;
use tokio::process::Command;

#[tokio::test]
async fn help_names_the_defaults_and_their_environment() -> anyhow::Result<()> {
    let out = Command::new(BIN).args(["serve", "--help"]).output().await?;
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout)?;
    for expected in [
        "127.0.0.1:5000",
        "/var/lib/pullcache",
        "PULLCACHE_LISTEN",
        "PULLCACHE_CACHE_DIR",
        "PULLCACHE_UPSTREAM",
        "PULLCACHE_TAG_TTL",
        "registry-1.docker.io",
    ] {
        assert!(help.contains(expected), "--help lacks {expected}:\n{help}");
    }
    Ok(())
}

#[tokio::test]
async fn invalid_configuration_exits_64() -> anyhow::Result<()> {
    for args in [
        &["serve", "--upstream", "no-url-here"][..],
        &["serve", "--tag-ttl", "soon"],
        &["serve", "--listen", "nowhere"],
    ] {
        let out = Command::new(BIN).args(args).output().await?;
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
    let out = Command::new(BIN)
        .arg("serve")
        .env("PULLCACHE_UPSTREAM", "docker.io=ftp://mirror")
        .output()
        .await?;
    assert_eq!(
        out.status.code(),
        Some(64),
        "a bad environment value is bad configuration too"
    );
    Ok(())
}

#[tokio::test]
async fn serves_and_stops_cleanly_on_sigterm() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let cache_dir = cache.path().as_os_str();
    let mut served = support::binary::serve([OsStr::new("--cache-dir"), cache_dir], "info").await?;
    served.wait_ready().await?;
    let (addr, metrics_addr) = (served.addr.clone(), served.metrics_addr.clone());
    let client = support::http_client();
    let resp = client.get(format!("http://{addr}/v2/")).send().await?;
    assert_eq!(resp.status(), 200);
    let metrics = client
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(metrics.contains("pullcache_build_info{version="), "{metrics}");
    assert_eq!(
        client
            .get(format!("http://{metrics_addr}/healthz"))
            .send()
            .await?
            .status(),
        200
    );
    assert!(cache.path().join("blobs/sha256").is_dir(), "the store was not created");

    let pid = served.child.id().expect("running").to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().await?.success());
    let status = tokio::time::timeout(Duration::from_secs(15), served.child.wait()).await??;
    assert!(status.success(), "exit after SIGTERM: {status}");
    Ok(())
}

#[tokio::test]
async fn ca_init_and_cert() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca");
    let init = Command::new(BIN)
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()
        .await?;
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let mode = std::fs::metadata(ca.join("ca.key"))?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the CA key is {mode:o}");
    let cert = Command::new(BIN)
        .args(["ca", "cert", "--dir"])
        .arg(&ca)
        .output()
        .await?;
    assert!(cert.status.success());
    let pem = String::from_utf8(cert.stdout)?;
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    assert_eq!(pem, std::fs::read_to_string(ca.join("ca.crt"))?);

    let again = Command::new(BIN)
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .output()
        .await?;
    assert!(!again.status.success(), "a second init replaced the CA");
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
    let missing = Command::new(BIN)
        .args(["ca", "cert", "--dir"])
        .arg(dir.path().join("none"))
        .output()
        .await?;
    assert!(!missing.status.success());
    Ok(())
}

#[tokio::test]
async fn verify_quarantines_corrupt_blobs() -> anyhow::Result<()> {
    use pullcache::oci::Digest;
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let (good, bad) = (Digest::of(b"intact"), Digest::of(b"original"));
    {
        let store = pullcache::store::Store::open(&cache)?;
        for (digest, content) in [(&good, &b"intact"[..]), (&bad, b"original")] {
            let mut temp = store.temp_blob()?;
            temp.write(content)?;
            store.commit(temp, digest, None, None)?;
        }
        std::fs::write(store.blob_path(&bad), b"flipped")?;
    }
    let verify = || Command::new(BIN).args(["verify", "--cache-dir"]).arg(&cache).output();
    let out = verify().await?;
    let stdout = String::from_utf8(out.stdout)?;
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "quarantined {}",
            cache
                .join("blobs/sha256")
                .join(&bad.hex()[..2])
                .join(bad.hex())
                .display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("checked 2 blobs"), "{stdout}");
    assert!(cache.join("quarantine").join(bad.hex()).exists());
    assert!(
        cache
            .join("blobs/sha256")
            .join(&good.hex()[..2])
            .join(good.hex())
            .exists()
    );
    let again = verify().await?;
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stdout));
    Ok(())
}

/// `prefetch` and `export` take serve's upstream settings, not its listeners, intercept or
/// cluster ones: those are hidden from their help and refused with a clear error (exit 64).
#[test]
fn fetching_commands_refuse_serve_only_flags() {
    for command in ["export", "prefetch"] {
        let help = std::process::Command::new(BIN)
            .args([command, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(help.contains("--upstream"), "{help}");
        for hidden in ["--listen", "--peer-listen", "--ca-dir", "--check-config"] {
            assert!(!help.contains(hidden), "{command} --help shows {hidden}: {help}");
        }
        let out = std::process::Command::new(BIN)
            .args([command, "alpine:3", "--peer-listen", "127.0.0.1:7443"])
            .args(
                (command == "export")
                    .then_some(["-o", "/dev/null"])
                    .into_iter()
                    .flatten(),
            )
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{command}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "--peer-listen is a setting of `serve`; `{command}` does not use it"
            )),
            "{stderr}"
        );
    }
    // The variable of a serve-only setting, as a DaemonSet's pod has it, is no error.
    let out = std::process::Command::new(BIN)
        .args(["export", "--from-file", "/nonexistent", "-o", "/dev/null"])
        .env("PULLCACHE_LISTEN", "not an address")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent"), "{stderr}");
}
