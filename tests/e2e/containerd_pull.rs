//! containerd pulls through pullcache as a hosts.toml mirror, with the real distribution
//! registry upstream. The `server` fallback in hosts.toml is a dead port, so a pull can only
//! succeed through pullcache. The main case runs with `ctr --hosts-dir`, and with the
//! kubelet's CRI `PullImage` on a containerd whose `config_path` is a certs.d that
//! `pullcache containerd-config install` wired, each on containerd 1.6, 1.7 and 2.1.

use crate::support;

use std::time::Duration;

use sha2::{Digest as _, Sha256};
use support::containerd::{
    Containerd, ContainerdOptions, Puller, Release, containerd_config_install, write_hosts_toml,
    write_hosts_toml_server_only,
};
use support::images::{PushedImage, push_docker_image, push_oci_image, push_oci_index};
use support::pullcache::Pullcache;
use support::registry::Registry;
use support::spy::SpyServer;

/// A registry name that only pullcache resolves (through `--upstream`).
const REGISTRY: &str = "registry.test";
const DEAD_SERVER: &str = "http://127.0.0.1:1";

async fn pull_all(
    ctr: &Containerd,
    puller: Puller,
    images: &[&PushedImage],
    hosts: &std::path::Path,
) -> anyhow::Result<()> {
    for image in images {
        ctr.pull_as(puller, &image.reference(REGISTRY), hosts).await?;
    }
    Ok(())
}

/// Points `hosts` at `mirror` with a dead `server`. For `ctr`, a hosts.toml of the test's own.
/// For CRI, the operator's file (server only) that `pullcache containerd-config install`
/// merges, checked against `containerd`'s config_path.
fn wire(puller: Puller, hosts: &std::path::Path, mirror: &str, containerd: &Containerd) -> anyhow::Result<()> {
    match puller {
        Puller::Ctr => write_hosts_toml(hosts, REGISTRY, DEAD_SERVER, mirror),
        Puller::Cri => {
            if !hosts.join(REGISTRY).join("hosts.toml").exists() {
                write_hosts_toml_server_only(hosts, REGISTRY, DEAD_SERVER);
            }
            containerd_config_install(hosts, mirror, REGISTRY, Some(containerd))?;
        }
    }
    Ok(())
}

each_release!(ctr_pulls_through_the_cache_and_then_without_upstream, |release| {
    super::pulls_through_the_cache_and_then_without_upstream(super::Puller::Ctr, release)
});

each_release!(cri_pulls_through_the_cache_and_then_without_upstream, |release| {
    super::pulls_through_the_cache_and_then_without_upstream(super::Puller::Cri, release)
});

async fn pulls_through_the_cache_and_then_without_upstream(puller: Puller, release: Release) -> anyhow::Result<()> {
    let mut upstream = Registry::start().await?;
    let oci = push_oci_image(&upstream.url(), "team/oci", "v1", &[2 * 1024 * 1024, 100 * 1024]).await?;
    let index = push_oci_index(&upstream.url(), "team/multi", "v1").await?;
    let docker = push_docker_image(&upstream.url(), "team/docker", "v1", &[512 * 1024]).await?;
    let images = [&oci, &index, &docker];

    let cache = tempfile::tempdir()?;
    let hosts = tempfile::tempdir()?;
    let upstream_url = upstream.url();
    let mappings = [(REGISTRY, upstream_url.as_str())];
    let mut pullcache = Pullcache::start(cache.path(), &mappings, Duration::from_secs(3600)).await?;

    // Cold: every blob comes from upstream exactly once.
    let first = puller.start(release, hosts.path()).await?;
    wire(puller, hosts.path(), &pullcache.url(), &first)?;
    pull_all(&first, puller, &images, hosts.path()).await?;
    let stored = pullcache.stored_blobs();
    for image in images {
        assert!(
            stored.contains(&image.manifest_digest),
            "{} manifest not cached",
            image.name
        );
    }
    let mut fetched = 0;
    for blob in images.iter().flat_map(|i| i.blobs.iter()) {
        if stored.contains(&blob.digest) {
            let gets = upstream
                .wait_access_log_count("GET", &blob.digest, 1, Duration::from_secs(5))
                .await;
            assert_eq!(gets, 1, "blob {} fetched {gets} times upstream", blob.digest);
            fetched += 1;
        }
    }
    // Host-platform config and layers of three images: at least two blobs each.
    assert!(fetched >= 6, "only {fetched} blobs went through the cache");
    for digest in &stored {
        let bytes = std::fs::read(
            pullcache
                .cache_dir
                .join("blobs/sha256")
                .join(&digest[7..9])
                .join(&digest[7..]),
        )?;
        assert_eq!(
            format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
            *digest,
            "stored blob fails its name"
        );
    }
    assert_eq!(pullcache.temp_files(), 0);

    // Warm, inside the TTL: a fresh containerd pulls everything without any upstream request.
    let before = upstream.access_log().len();
    let second = puller.start(release, hosts.path()).await?;
    pull_all(&second, puller, &images, hosts.path()).await?;
    pullcache.idle().await?;
    let late = upstream.requests_since(before).await?;
    assert!(late.is_empty(), "warm pull reached upstream: {late:?}");

    // Upstream gone, pullcache restarted with a zero TTL: every tag must be revalidated, the
    // upstream cannot answer, and the persisted tag index serves the stale answers.
    pullcache.stop().await?;
    upstream.stop().await;
    let pullcache = Pullcache::start(cache.path(), &mappings, Duration::ZERO).await?;
    let third = puller.start(release, hosts.path()).await?;
    wire(puller, hosts.path(), &pullcache.url(), &third)?;
    pull_all(&third, puller, &images, hosts.path()).await?;

    let resp = support::http_client()
        .get(format!("{}/v2/team/oci/manifests/v1?ns={REGISTRY}", pullcache.url()))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()
            .get("warning")
            .is_some_and(|w| w.to_str().unwrap().starts_with("110")),
        "stale answer without a Warning header: {:?}",
        resp.headers()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_hub_names_get_the_library_prefix() -> anyhow::Result<()> {
    let upstream = Registry::start().await?;
    let image = push_oci_image(&upstream.url(), "library/tool", "1.0", &[64 * 1024]).await?;
    let cache = tempfile::tempdir()?;
    let hosts = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[("docker.io", &upstream.url())], Duration::from_secs(60)).await?;
    write_hosts_toml(hosts.path(), "docker.io", DEAD_SERVER, &pullcache.url());

    // containerd names it docker.io/library/tool and sends ns=docker.io.
    let ctr = Containerd::start().await?;
    ctr.pull("docker.io/library/tool:1.0", hosts.path()).await?;
    assert!(ctr.is_unpacked("docker.io/library/tool:1.0").await?);

    // A client that talks to pullcache as if it were Docker Hub, with no ns and a bare name.
    let resp = support::http_client()
        .get(format!("{}/v2/tool/manifests/1.0", pullcache.url()))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["docker-content-digest"], image.manifest_digest.as_str());
    assert_eq!(resp.bytes().await?, image.manifest);
    Ok(())
}

/// containerd 2.1's parallel layer fetch, cold, through pullcache: each layer is asked for in
/// 4 MiB chunks, four at a time, each an open-ended `Range: bytes=N-`. Every chunk is served
/// from the one upstream download while it runs, the image unpacks (containerd checks the
/// layer's digest), and the registry sees one GET per blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_2_1_fetches_a_layer_in_parallel_chunks_from_one_upstream_download() -> anyhow::Result<()> {
    const CHUNK: u64 = 4 * 1024 * 1024;
    let upstream = Registry::start().await?;
    let image = push_oci_image(&upstream.url(), "team/big", "v1", &[22 * 1024 * 1024]).await?;
    let cache = tempfile::tempdir()?;
    let hosts = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &upstream.url())], Duration::from_secs(3600)).await?;
    let spy = SpyServer::start_forwarding(pullcache.addr).await?;
    write_hosts_toml(hosts.path(), REGISTRY, DEAD_SERVER, &spy.url());
    let ctd = Containerd::start_with(
        ContainerdOptions {
            parallel_fetch: Some(CHUNK),
            ..ContainerdOptions::default()
        }
        .of(Release::V2_1),
    )
    .await?;
    let reference = image.reference(REGISTRY);
    ctd.pull(&reference, hosts.path()).await?;
    assert!(ctd.is_unpacked(&reference).await?);

    let layer = image.layers()[0];
    let mut ranges: Vec<u64> = spy
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path().ends_with(&layer.digest))
        .map(|r| {
            let range = r.header("range").unwrap_or("none");
            range
                .strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("not an open-ended range: {range}"))
        })
        .collect();
    ranges.sort_unstable();
    let chunks: Vec<u64> = (0..layer.size).step_by(CHUNK as usize).collect();
    assert!(chunks.len() >= 5, "the layer is too small to be fetched in parallel");
    assert_eq!(
        ranges, chunks,
        "containerd did not fetch the layer in chunks through pullcache"
    );
    for blob in &image.blobs {
        let gets = upstream
            .wait_access_log_count("GET", &blob.digest, 1, Duration::from_secs(5))
            .await;
        assert_eq!(gets, 1, "{} fetched {gets} times upstream", blob.digest);
        assert!(
            pullcache.stored_blobs().contains(&blob.digest),
            "{} not cached",
            blob.digest
        );
    }
    Ok(())
}
