//! The containerd helper (`support::containerd`) and the spy (`support::spy`) against the real
//! containerd and registry: hosts.toml routing, the requests containerd sends a mirror (what
//! pullcache is built to answer), and the pull and content checks pullcache's tests rely on.

use std::path::Path;
use std::time::{Duration, Instant};

use super::registry::push_all_kinds;
use crate::support::containerd::{self, Containerd};
use crate::support::images;
use crate::support::registry::Registry;
use crate::support::spy::SpyServer;

async fn pull_and_check(ctd: &Containerd, image_ref: &str, hosts: &Path) -> Duration {
    let t = Instant::now();
    ctd.pull(image_ref, hosts)
        .await
        .unwrap_or_else(|e| panic!("pull {image_ref}: {e:#}"));
    let took = t.elapsed();
    assert!(
        ctd.is_unpacked(image_ref).await.expect("is_unpacked"),
        "{image_ref} not unpacked"
    );
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_mirror_with_dead_server() {
    let reg = Registry::start().await.expect("registry starts");
    let big = 24 * 1024 * 1024;
    let imgs = push_all_kinds(&reg, big).await;
    let ctd = Containerd::start().await.expect("containerd starts");
    let hosts = tempfile::tempdir().unwrap();
    containerd::write_hosts_toml(hosts.path(), "testreg.local", "http://127.0.0.1:1", &reg.url());
    assert!(hosts.path().join("testreg.local/hosts.toml").is_file());

    for img in &imgs {
        let image_ref = img.reference("testreg.local");
        let took = pull_and_check(&ctd, &image_ref, hosts.path()).await;
        eprintln!("pulled {image_ref} in {took:?}");
        // Every request the mirror got carried ?ns=<registry host>.
        let lines: Vec<_> = reg
            .access_log()
            .into_iter()
            .filter(|e| e.path().starts_with(&format!("/v2/{}/", img.name)))
            .filter(|e| e.method == "GET" || e.method == "HEAD")
            .collect();
        assert!(!lines.is_empty());
        for e in &lines {
            assert_eq!(e.query(), Some("ns=testreg.local"), "{e:?}");
            assert!(e.user_agent.starts_with("containerd/"), "{e:?}");
        }
    }
    // The pulled layer really is in containerd's content store.
    let biggest = imgs[0].largest_blob();
    assert!(biggest.size >= big as u64);
    assert!(ctd.has_content(&biggest.digest).await.unwrap());
    // The index pull fetched only the host platform: the foreign config is absent.
    let foreign_config = &imgs[1].blobs[2];
    assert!(foreign_config.media_type.contains("config"));
    assert!(!ctd.has_content(&foreign_config.digest).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_routes_host_port_and_docker_io_refs() {
    let reg = Registry::start().await.expect("registry starts");
    let [oci, index, docker] = push_all_kinds(&reg, 256 * 1024).await;
    let ctd = Containerd::start().await.expect("containerd starts");

    // 1. `127.0.0.1:PORT/...` refs, hosts dir entry `127.0.0.1_PORT_`, server only.
    let hosts = tempfile::tempdir().unwrap();
    let host = reg.host();
    containerd::write_hosts_toml_server_only(hosts.path(), &host, &reg.url());
    assert!(
        hosts
            .path()
            .join(format!("127.0.0.1_{}_/hosts.toml", reg.addr().port()))
            .is_file()
    );
    pull_and_check(&ctd, &oci.reference(&host), hosts.path()).await;
    // No ?ns= when the host contacted is the ref's own host.
    let e = reg
        .access_log()
        .into_iter()
        .find(|e| e.method == "HEAD" && e.path() == "/v2/smoke/oci/manifests/v1")
        .expect("resolve request");
    assert_eq!(e.query(), None);

    // 2. The `host:port` directory name works too (containerd's fallback name).
    let hosts2 = tempfile::tempdir().unwrap();
    let dir = hosts2.path().join(&host);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hosts.toml"), format!("server = \"{}\"\n", reg.url())).unwrap();
    pull_and_check(&ctd, &index.reference(&host), hosts2.path()).await;

    // 3. `docker.io/library/...` refs route to the `docker.io` entry.
    let hosts3 = tempfile::tempdir().unwrap();
    containerd::write_hosts_toml(hosts3.path(), "docker.io", "http://127.0.0.1:1", &reg.url());
    let image_ref = docker.reference("docker.io");
    assert_eq!(image_ref, "docker.io/library/dock:v1");
    pull_and_check(&ctd, &image_ref, hosts3.path()).await;
    let e = reg
        .access_log()
        .into_iter()
        .find(|e| e.method == "HEAD" && e.path() == "/v2/library/dock/manifests/v1")
        .expect("resolve request for docker.io ref");
    assert_eq!(e.query(), Some("ns=docker.io"));

    // 4. A ref whose registry host has no entry and a dead default fails.
    let err = ctd
        .pull("127.0.0.1:1/smoke/oci:v1", hosts.path())
        .await
        .expect_err("no registry on port 1");
    assert!(format!("{err:#}").contains("connection refused"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_mirror_request_shapes() {
    let reg = Registry::start().await.expect("registry starts");
    let img = images::push_oci_image(&reg.url(), "shape/img", "v1", &[8192])
        .await
        .expect("push");
    let ctd = Containerd::start().await.expect("containerd starts");
    let hosts = tempfile::tempdir().unwrap();

    // Mirror answering 404 to everything, dead server: fails fast, and the
    // mirror saw exactly one HEAD for the tag.
    let spy404 = SpyServer::start().await.unwrap();
    containerd::write_hosts_toml(hosts.path(), "deadreg.local", "http://127.0.0.1:1", &spy404.url());
    let t = Instant::now();
    let err = ctd
        .pull("deadreg.local/shape/img:v1", hosts.path())
        .await
        .expect_err("nothing can serve it");
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    assert!(format!("{err:#}").contains("connection refused"), "{err:#}");
    let reqs = spy404.requests();
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    assert_eq!(reqs[0].method, "HEAD");
    assert_eq!(reqs[0].target, "/v2/shape/img/manifests/v1?ns=deadreg.local");
    assert_eq!(
        reqs[0].header("accept"),
        Some(
            "application/vnd.docker.distribution.manifest.v2+json, \
             application/vnd.docker.distribution.manifest.list.v2+json, \
             application/vnd.oci.image.manifest.v1+json, \
             application/vnd.oci.image.index.v1+json, */*"
        )
    );
    assert!(reqs[0].header("user-agent").unwrap().starts_with("containerd/1.6"));

    // A recording proxy in front of the registry as the mirror, dead server.
    let fwd = SpyServer::start_forwarding(reg.addr()).await.unwrap();
    containerd::write_hosts_toml(hosts.path(), "testreg.local", "http://127.0.0.1:1", &fwd.url());
    let image_ref = img.reference("testreg.local");
    pull_and_check(&ctd, &image_ref, hosts.path()).await;
    let seen: Vec<(String, String, String)> = fwd
        .requests()
        .iter()
        .map(|r| {
            (
                r.method.clone(),
                r.target.clone(),
                r.header("accept").unwrap_or("").to_string(),
            )
        })
        .collect();
    let config = &img.blobs[0];
    let layer = &img.blobs[1];
    let expected = [
        (
            "HEAD".to_string(),
            "/v2/shape/img/manifests/v1?ns=testreg.local".to_string(),
            reqs[0].header("accept").unwrap().to_string(),
        ),
        (
            "GET".to_string(),
            format!("/v2/shape/img/manifests/{}?ns=testreg.local", img.manifest_digest),
            format!("{}, */*", images::OCI_MANIFEST),
        ),
    ];
    assert_eq!(seen[..2], expected[..], "{seen:#?}");
    // Then config and layer blobs (order may vary), each a plain GET.
    let mut blobs: Vec<_> = seen[2..].to_vec();
    blobs.sort();
    let mut want = vec![
        (
            "GET".to_string(),
            format!("/v2/shape/img/blobs/{}?ns=testreg.local", config.digest),
            format!("{}, */*", images::OCI_CONFIG),
        ),
        (
            "GET".to_string(),
            format!("/v2/shape/img/blobs/{}?ns=testreg.local", layer.digest),
            format!("{}, */*", images::OCI_LAYER_GZIP),
        ),
    ];
    want.sort();
    assert_eq!(blobs, want, "{seen:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_unpacked_is_false_for_fetched_only_content() {
    let reg = Registry::start().await.expect("registry starts");
    let img = images::push_oci_image(&reg.url(), "fetch/only", "v1", &[4096])
        .await
        .expect("push");
    let ctd = Containerd::start().await.expect("containerd starts");
    let hosts = tempfile::tempdir().unwrap();
    containerd::write_hosts_toml(hosts.path(), "testreg.local", "http://127.0.0.1:1", &reg.url());
    let image_ref = img.reference("testreg.local");
    let hosts_arg = hosts.path().to_str().unwrap();
    ctd.ctr(&["content", "fetch", "--hosts-dir", hosts_arg, &image_ref])
        .await
        .expect("content fetch");
    assert!(!ctd.is_unpacked(&image_ref).await.expect("image known"));
    pull_and_check(&ctd, &image_ref, hosts.path()).await;
    // After removal the image is unknown again.
    ctd.remove_image(&image_ref).await.unwrap();
    assert!(ctd.is_unpacked(&image_ref).await.is_err());
}

/// How each release reads `config_path` from a main config and its drop-ins, by its own
/// `containerd config dump`, against what `pullcache containerd-config` reads
/// (`pullcache::containerd::ContainerdConfig`). Pinned where they differ: 1.x replaces a
/// plugin's whole table with a drop-in's, 2.x merges key by key; 2.x migrates version 2 files
/// (drop-ins without a version take the main file's) and drops a version 1 file's registry
/// settings; 1.x takes the last `version` any file gives, and ignores (1.6) or refuses (1.7)
/// a version 3 result.
#[test]
fn each_release_reads_config_path_as_pullcache_expects() {
    use pullcache::containerd::{ConfigPath, ContainerdConfig, Release as Line};

    const V2: &str = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/main\"\n";
    const V3: &str = "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/main\"\n";
    const V1: &str = "[plugins.cri.registry]\n  config_path = \"/main\"\n";
    const SANDBOX_V2: &str = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"x\"\n";
    const REGISTRY_BARE: &str = "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/drop-in\"\n";
    const REGISTRY_V2: &str =
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/drop-in\"\n";
    /// What 1.6, 1.7 and 2.1 read: None = not read, or refused.
    type Reads = [Option<&'static str>; 3];
    // (main, drop-in, reads)
    let cases: [(&str, Option<&str>, Reads); 7] = [
        (V2, None, [Some("/main"), Some("/main"), Some("/main")]),
        (V3, None, [None, None, Some("/main")]),
        (V1, None, [Some("/main"), Some("/main"), None]),
        (V2, Some(SANDBOX_V2), [None, None, Some("/main")]),
        (
            V2,
            Some(REGISTRY_BARE),
            [Some("/drop-in"), Some("/drop-in"), Some("/drop-in")],
        ),
        (
            "version = 3\n",
            Some(REGISTRY_V2),
            [Some("/drop-in"), Some("/drop-in"), Some("/drop-in")],
        ),
        (
            "version = 2\n",
            Some(REGISTRY_V2),
            [Some("/drop-in"), Some("/drop-in"), Some("/drop-in")],
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (n, (main, drop_in, expected)) in cases.iter().enumerate() {
        let case = dir.path().join(format!("case{n}"));
        std::fs::create_dir_all(case.join("conf.d")).unwrap();
        let config = case.join("config.toml");
        let imports = format!("imports = [\"{}\"]\n", case.join("conf.d/*.toml").display());
        // `imports` is a root key: before the first table.
        let (head, tables) = main.split_at(main.find('[').unwrap_or(main.len()));
        std::fs::write(&config, format!("{head}{imports}{tables}")).unwrap();
        if let Some(drop_in) = drop_in {
            std::fs::write(case.join("conf.d/10-x.toml"), drop_in).unwrap();
        }
        let ours = ContainerdConfig::read(&config).unwrap().unwrap();
        for (release, expected) in containerd::Release::ALL.into_iter().zip(expected) {
            let bin = release.containerd().unwrap();
            let dump = std::process::Command::new(&bin)
                .arg("--config")
                .arg(&config)
                .args(["config", "dump"])
                .output()
                .unwrap();
            let theirs = dump
                .status
                .success()
                .then(|| toml::from_str::<toml::Table>(&String::from_utf8_lossy(&dump.stdout)).unwrap())
                .and_then(|t| {
                    let plugin = if release == containerd::Release::V2_1 {
                        "io.containerd.cri.v1.images"
                    } else {
                        "io.containerd.grpc.v1.cri"
                    };
                    let value = t
                        .get("plugins")?
                        .get(plugin)?
                        .get("registry")?
                        .get("config_path")?
                        .as_str()?;
                    (!value.is_empty()).then(|| value.to_owned())
                });
            assert_eq!(
                theirs.as_deref(),
                *expected,
                "case {n} on {}: containerd's own dump changed\n{main}{drop_in:?}",
                release.name()
            );
            let line = if release == containerd::Release::V2_1 {
                Line::Two
            } else {
                Line::One
            };
            let read = match ours.config_path(line) {
                ConfigPath::Set { dirs, .. } => Some(dirs[0].display().to_string()),
                _ => None,
            };
            assert_eq!(
                read.as_deref(),
                *expected,
                "case {n} on {}: pullcache reads it otherwise\n{main}{drop_in:?}",
                release.name()
            );
        }
    }
}
