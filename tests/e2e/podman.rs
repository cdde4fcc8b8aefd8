//! podman pulls through pullcache as a path-prefix mirror from `registries.conf`, the way
//! CRI-O and podman nodes are wired (both pull with containers/image). The upstream is the
//! real distribution registry, standing in for Docker Hub and for another registry through
//! pullcache's `--upstream` mappings.

use crate::support;

use std::time::Duration;

use support::fault_upstream::FaultUpstream;
use support::images::{PushedImage, push_oci_image, push_oci_index};
use support::podman::{Podman, RegistryEntry, registries_conf};
use support::pullcache::Pullcache;
use support::registry::Registry;

/// A registry name that only pullcache resolves (through `--upstream`), as ghcr.io would be.
const REGISTRY: &str = "registry.test";
/// Nothing listens here: a pull that succeeds did not come from the primary location.
const DEAD_LOCATION: &str = "127.0.0.1:1";

/// Both names, each with pullcache as its mirror (`<pullcache>/<registry>`) and `location`
/// as its primary.
fn mirrored(pullcache: &Pullcache, location: &str) -> String {
    let cache = pullcache.addr.to_string();
    let docker_hub = format!("{cache}/docker.io");
    let other = format!("{cache}/{REGISTRY}");
    registries_conf(&[
        RegistryEntry {
            prefix: "docker.io",
            location,
            mirrors: &[&docker_hub],
        },
        RegistryEntry {
            prefix: REGISTRY,
            location,
            mirrors: &[&other],
        },
    ])
}

/// Pulls `reference` and checks podman recorded `image`'s top-level manifest digest for it.
async fn pull_and_check(podman: &Podman, reference: &str, image: &PushedImage) -> anyhow::Result<()> {
    podman.pull(reference).await?;
    let expected = format!(
        "{}@{}",
        reference.rsplit_once(':').expect("a tag").0,
        image.manifest_digest
    );
    let recorded = podman.repo_digests(reference).await?;
    assert!(
        recorded.contains(&expected),
        "{reference}: podman recorded {recorded:?}, expected {expected}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_docker_hub_and_other_registry_names_through_the_cache() -> anyhow::Result<()> {
    let upstream = Registry::start().await?;
    let hub = push_oci_image(&upstream.url(), "library/tool", "1.0", &[1024 * 1024, 64 * 1024]).await?;
    let other = push_oci_index(&upstream.url(), "team/app", "v2").await?;
    let cache = tempfile::tempdir()?;
    let upstream_url = upstream.url();
    let pullcache = Pullcache::start(
        cache.path(),
        &[("docker.io", &upstream_url), (REGISTRY, &upstream_url)],
        Duration::from_secs(3600),
    )
    .await?;
    let conf = mirrored(&pullcache, DEAD_LOCATION);
    let other_ref = format!("{REGISTRY}/team/app:v2");
    let images = [("docker.io/library/tool:1.0", &hub), (other_ref.as_str(), &other)];

    // Cold: the primary location is dead, so every byte comes through pullcache, which fetches
    // each blob upstream once (docker.io's implicit `library/` kept).
    let first = Podman::new(&conf)?;
    for (reference, image) in images {
        pull_and_check(&first, reference, image).await?;
    }
    assert_eq!(first.digest("docker.io/library/tool:1.0").await?, hub.manifest_digest);
    let stored = pullcache.stored_blobs();
    let mut fetched = 0;
    for image in [&hub, &other] {
        assert!(
            stored.contains(&image.manifest_digest),
            "{} manifest not cached",
            image.name
        );
        for blob in image.blobs.iter().filter(|b| stored.contains(&b.digest)) {
            let path = format!("/v2/{}/blobs/{}", image.name, blob.digest);
            let gets = upstream
                .wait_access_log_count("GET", &path, 1, Duration::from_secs(5))
                .await;
            assert_eq!(gets, 1, "{path} fetched {gets} times upstream");
            fetched += 1;
        }
    }
    // The config and both layers of the tool; the host platform's config and layer of the app,
    // and nothing of its other platform.
    assert_eq!(fetched, 5, "{fetched} blobs went through the cache");
    assert_eq!(pullcache.temp_files(), 0);

    // Warm, inside the tag TTL: a podman with empty storage pulls both from the cache alone.
    let before = upstream.access_log().len();
    let second = Podman::new(&conf)?;
    for (reference, image) in images {
        pull_and_check(&second, reference, image).await?;
    }
    pullcache.idle().await?;
    let late = upstream.requests_since(before).await?;
    assert!(late.is_empty(), "warm pull reached upstream: {late:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_falls_back_to_the_registry_when_pullcache_fails_or_is_down() -> anyhow::Result<()> {
    let registry = Registry::start().await?;
    let image = push_oci_image(&registry.url(), "team/app", "v1", &[256 * 1024]).await?;
    // pullcache's own upstream answers 503 to everything.
    let broken = FaultUpstream::start().await?;
    let cache = tempfile::tempdir()?;
    let mut pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &broken.url())], Duration::from_secs(60)).await?;
    let conf = mirrored(&pullcache, &registry.host());
    let reference = format!("{REGISTRY}/team/app:v1");

    // pullcache answers the manifest with an error, so containers/image goes to the primary.
    let podman = Podman::new(&conf)?;
    pull_and_check(&podman, &reference, &image).await?;
    assert!(
        broken.hits("/v2/team/app/manifests/v1") > 0,
        "podman never went through pullcache, so this proves nothing"
    );
    assert!(pullcache.stored_blobs().is_empty());

    // pullcache down: its port refuses connections, and the primary serves the pull.
    pullcache.stop().await?;
    let podman = Podman::new(&conf)?;
    pull_and_check(&podman, &reference, &image).await?;
    Ok(())
}
