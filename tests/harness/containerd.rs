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
