//! pullcache must never be the reason a pod cannot start. With the real containerd and a
//! hosts.toml whose `server` is the real registry, pulls succeed when pullcache's upstream
//! fails, when pullcache is down, and when pullcache's upstream serves a forged layer. The
//! first case also runs through the kubelet's CRI `PullImage`, on the certs.d that
//! `pullcache containerd-config install` merges into the operator's own hosts.toml, and both
//! run on containerd 1.6, 1.7 and 2.1.

use crate::support;

use std::time::Duration;

use bytes::Bytes;
use support::containerd::{
    Containerd, Puller, Release, containerd_config_install, write_hosts_toml, write_hosts_toml_server_only,
};
use support::fault_upstream::{FaultUpstream, Reply};
use support::images::{
    OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, build_config, build_layer, host_arch, push_blob, push_manifest,
    push_oci_image,
};
use support::pullcache::Pullcache;
use support::registry::Registry;

const REGISTRY: &str = "registry.test";

each_release!(a_failing_or_stopped_pullcache_falls_back_to_the_registry, |release| {
    super::falls_back_to_the_registry(super::Puller::Ctr, release)
});

each_release!(
    a_failing_or_stopped_pullcache_falls_back_to_the_registry_for_cri,
    |release| { super::falls_back_to_the_registry(super::Puller::Cri, release) }
);

async fn falls_back_to_the_registry(puller: Puller, release: Release) -> anyhow::Result<()> {
    let registry = Registry::start().await?;
    let image = push_oci_image(&registry.url(), "team/app", "v1", &[256 * 1024]).await?;
    // pullcache's own upstream answers 503 to everything.
    let broken = FaultUpstream::start().await?;
    let cache = tempfile::tempdir()?;
    let hosts = tempfile::tempdir()?;
    let mut pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &broken.url())], Duration::from_secs(60)).await?;

    let ctr = puller.start(release, hosts.path()).await?;
    match puller {
        Puller::Ctr => write_hosts_toml(hosts.path(), REGISTRY, &registry.url(), &pullcache.url()),
        Puller::Cri => {
            // The operator's hosts.toml names the registry; install puts pullcache before it.
            write_hosts_toml_server_only(hosts.path(), REGISTRY, &registry.url());
            containerd_config_install(hosts.path(), &pullcache.url(), REGISTRY, Some(&ctr))?;
        }
    }
    let reference = image.reference(REGISTRY);
    ctr.pull_as(puller, &reference, hosts.path()).await?;
    assert!(
        broken.hits("/v2/team/app/manifests/v1") > 0,
        "containerd never went through pullcache, so this proves nothing"
    );
    assert!(pullcache.stored_blobs().is_empty());
    let layer = &image.layers()[0].digest;
    let gets = registry
        .wait_access_log_count("GET", layer, 1, Duration::from_secs(5))
        .await;
    assert_eq!(gets, 1, "the layer came from the registry {gets} times");

    pullcache.stop().await?;
    let ctr = puller.start(release, hosts.path()).await?;
    ctr.pull_as(puller, &reference, hosts.path()).await?;
    let gets = registry
        .wait_access_log_count("GET", layer, 2, Duration::from_secs(5))
        .await;
    assert_eq!(gets, 2, "with pullcache down, the layer did not come from the registry");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_layer_is_never_unpacked_and_the_pull_recovers() -> anyhow::Result<()> {
    // The real image, in the real registry that hosts.toml falls back to.
    let registry = Registry::start().await?;
    let layer = build_layer(512 * 1024);
    let config = build_config(host_arch(), std::slice::from_ref(&layer.diff_id));
    let config_digest = push_blob(&registry.url(), "team/app", config.clone()).await?;
    push_blob(&registry.url(), "team/app", layer.blob.clone()).await?;
    let manifest = Bytes::from(serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer.digest, "size": layer.blob.len()}],
    }))?);
    let manifest_digest = push_manifest(&registry.url(), "team/app", "v1", OCI_MANIFEST, manifest.clone()).await?;

    // pullcache's upstream serves the same manifest and config, but flips a byte of the layer.
    let liar = FaultUpstream::start().await?;
    let manifest_reply = Reply::ok(
        manifest.to_vec(),
        &[
            ("content-type", OCI_MANIFEST),
            ("docker-content-digest", &manifest_digest),
        ],
    );
    liar.set("/v2/team/app/manifests/v1", manifest_reply.clone());
    liar.set(&format!("/v2/team/app/manifests/{manifest_digest}"), manifest_reply);
    liar.set(
        &format!("/v2/team/app/blobs/{config_digest}"),
        Reply::ok(config.to_vec(), &[]),
    );
    // Early in the first chunk, so containerd has surely read it before the abort.
    let mut forged = layer.blob.to_vec();
    forged[100] ^= 0x01;
    let layer_path = format!("/v2/team/app/blobs/{}", layer.digest);
    liar.set(&layer_path, Reply::ok(forged, &[]).slowly(4, Duration::from_millis(20)));

    let cache = tempfile::tempdir()?;
    let hosts = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &liar.url())], Duration::from_secs(60)).await?;
    write_hosts_toml(hosts.path(), REGISTRY, &registry.url(), &pullcache.url());

    // The first attempt fails: pullcache streams all but the final byte, then aborts when the
    // digest fails; containerd resumes the body from its next host with a Range request,
    // stitches it onto the forged prefix, and its own commit check rejects the result.
    let ctr = Containerd::start().await?;
    let reference = format!("{REGISTRY}/team/app:v1");
    let first = ctr.pull(&reference, hosts.path()).await;
    let error = format!("{:#}", first.expect_err("a pull through a forged layer succeeded"));
    assert!(error.contains("unexpected commit digest"), "{error}");
    assert!(
        !ctr.has_content(&layer.digest).await?,
        "containerd committed the forged layer"
    );

    // pullcache now refuses the digest before any byte, so a retry goes to the registry.
    // containerd 1.6 keeps the stitched download as an ingest and may recommit it on the same
    // node (its local store leaves ingests on a failed commit), so the retry runs on a
    // containerd without that leftover, as a retry on another node or after the ingest is gone.
    let retry = Containerd::start().await?;
    retry.pull(&reference, hosts.path()).await?;
    assert!(retry.is_unpacked(&reference).await?);
    assert_eq!(
        liar.hits(&layer_path),
        1,
        "the forged layer was downloaded more than once"
    );
    assert!(
        !pullcache.stored_blobs().contains(&layer.digest),
        "the forged layer was stored"
    );
    let gets = registry
        .wait_access_log_count("GET", &layer.digest, 2, Duration::from_secs(5))
        .await;
    assert_eq!(
        gets, 2,
        "expected the resume of the first attempt and the full GET of the retry"
    );
    Ok(())
}
