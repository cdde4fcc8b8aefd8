//! What the upstream client does for registries that are not a plain server: anonymous
//! Bearer tokens (fetched once, reused), redirects to blob storage on another host, which
//! never receive the registry's credentials, and blob bodies that break mid-way.

use crate::support;

use std::time::Duration;

use support::fault_upstream::{FaultUpstream, Reply};
use support::images::{random_bytes, sha256_digest};
use support::pullcache::Pullcache;

const REGISTRY: &str = "registry.test";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_and_cross_host_redirects() -> anyhow::Result<()> {
    let registry = FaultUpstream::start().await?;
    let storage = FaultUpstream::start().await?;
    registry.require_token("s3cret");

    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#.to_vec();
    let manifest_digest = sha256_digest(&manifest);
    registry.set(
        "/v2/team/app/manifests/v1",
        Reply::ok(
            manifest.clone(),
            &[
                ("content-type", OCI_MANIFEST),
                ("docker-content-digest", &manifest_digest),
            ],
        ),
    );
    let blob = random_bytes(200_000);
    let digest = sha256_digest(&blob);
    let blob_path = format!("/v2/team/app/blobs/{digest}");
    let storage_path = format!("/bucket/{digest}");
    let location = format!("{}{storage_path}?signature=abc", storage.url());
    registry.set(&blob_path, Reply::status(307, &[("location", &location)]));
    storage.set(&storage_path, Reply::ok(blob.clone(), &[]).rejecting_authorization());

    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &registry.url())], Duration::from_secs(60)).await?;
    let client = support::http_client();

    let resp = client
        .get(format!("{}/v2/team/app/manifests/v1?ns={REGISTRY}", pullcache.url()))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await?, manifest);

    let resp = client
        .get(format!("{}{blob_path}?ns={REGISTRY}", pullcache.url()))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await?, blob);

    // One anonymous token, scoped to the repository, reused for the blob.
    let queries = registry.token_queries();
    assert_eq!(queries.len(), 1, "token requests: {queries:?}");
    assert!(queries[0].contains("service=fault"), "{}", queries[0]);
    assert!(
        queries[0].contains("scope=repository%3Ateam%2Fapp%3Apull"),
        "{}",
        queries[0]
    );
    assert_eq!(
        registry.auth_seen(&blob_path),
        vec![Some("Bearer s3cret".to_owned())],
        "the blob request did not reuse the cached token"
    );
    // The storage host got the blob request without the registry's token.
    assert_eq!(storage.auth_seen(&storage_path), vec![None]);
    assert_eq!(pullcache.stored_blobs().len(), 2);
    Ok(())
}

/// A blob whose body breaks after 1 MiB of 3; `honor_range` says whether the upstream answers
/// the resume with 206 or, as some servers do, with the whole blob again.
async fn resume(honor_range: bool) -> anyhow::Result<()> {
    let upstream = FaultUpstream::start().await?;
    let blob = random_bytes(3 * 1024 * 1024);
    let digest = sha256_digest(&blob);
    let path = format!("/v2/team/app/blobs/{digest}");
    let mut reply = Reply::ok(blob.clone(), &[])
        .slowly(12, Duration::from_millis(5))
        .drop_after(1024 * 1024);
    if !honor_range {
        reply = reply.ignoring_range();
    }
    upstream.set(&path, reply);
    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &upstream.url())], Duration::from_secs(60)).await?;

    let resp = support::http_client()
        .get(format!("{}{path}?ns={REGISTRY}", pullcache.url()))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], blob.len().to_string().as_str());
    let got = resp.bytes().await?;
    assert!(got == blob, "the client's body is not the blob ({} bytes)", got.len());
    assert_eq!(
        upstream.ranges_seen(&path),
        vec![None, Some("bytes=1048576-".to_owned())],
        "expected one download and one resume from the break"
    );
    assert_eq!(pullcache.stored_blobs(), vec![digest]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_blob_body_resumes_with_range() -> anyhow::Result<()> {
    resume(true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_answered_with_the_whole_blob_still_works() -> anyhow::Result<()> {
    resume(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_cached_token_is_refreshed_once() -> anyhow::Result<()> {
    let registry = FaultUpstream::start().await?;
    registry.require_token("first");
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#.to_vec();
    let digest = sha256_digest(&manifest);
    let reply = Reply::ok(
        manifest,
        &[("content-type", OCI_MANIFEST), ("docker-content-digest", &digest)],
    );
    registry.set("/v2/team/app/manifests/v1", reply);
    let cache = tempfile::tempdir()?;
    // A zero TTL makes every tag request go upstream with the cached token.
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &registry.url())], Duration::ZERO).await?;
    let client = support::http_client();
    let url = format!("{}/v2/team/app/manifests/v1?ns={REGISTRY}", pullcache.url());

    assert_eq!(client.get(&url).send().await?.status(), 200);
    assert_eq!(client.get(&url).send().await?.status(), 200);
    assert_eq!(registry.token_queries().len(), 1, "a valid cached token was not reused");

    // The registry stops taking the cached token (revoked, or expired early).
    registry.require_token("second");
    let resp = client.get(&url).send().await?;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers().get("warning").is_none(),
        "served stale instead of refreshing"
    );
    assert_eq!(registry.token_queries().len(), 2, "expected exactly one refresh");
    let seen = registry.auth_seen("/v2/team/app/manifests/v1");
    assert_eq!(
        seen.last().cloned().flatten().as_deref(),
        Some("Bearer second"),
        "the retry did not use the new token: {seen:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_are_tried_first_and_the_registry_is_the_fallback() -> anyhow::Result<()> {
    let mirror = FaultUpstream::start().await?;
    let registry = FaultUpstream::start().await?;
    let from_mirror = random_bytes(100_000);
    let from_registry = random_bytes(100_000);
    let (mirrored, unmirrored) = (sha256_digest(&from_mirror), sha256_digest(&from_registry));
    for (server, digest, bytes) in [
        (&mirror, &mirrored, &from_mirror),
        (&registry, &mirrored, &from_mirror),
        (&registry, &unmirrored, &from_registry),
    ] {
        server.set(&format!("/v2/team/app/blobs/{digest}"), Reply::ok(bytes.clone(), &[]));
    }
    let cache = tempfile::tempdir()?;
    let mut config = support::pullcache::config(cache.path().to_owned());
    let settings = config.registry(pullcache::oci::Registry::parse(REGISTRY)?);
    settings.url = Some(registry.url().parse()?);
    settings.mirrors = vec![mirror.url().parse()?];
    let pullcache = Pullcache::start_with(config).await?;
    let client = support::http_client();

    for (digest, bytes) in [(&mirrored, &from_mirror), (&unmirrored, &from_registry)] {
        let resp = client
            .get(format!("{}/v2/team/app/blobs/{digest}?ns={REGISTRY}", pullcache.url()))
            .send()
            .await?;
        assert_eq!(resp.status(), 200);
        assert!(resp.bytes().await? == *bytes);
    }
    let path = |d: &str| format!("/v2/team/app/blobs/{d}");
    assert_eq!(mirror.hits(&path(&mirrored)), 1);
    assert_eq!(
        registry.hits(&path(&mirrored)),
        0,
        "the mirror had it; the registry was asked anyway"
    );
    assert_eq!(mirror.hits(&path(&unmirrored)), 1, "the mirror was not tried first");
    assert_eq!(registry.hits(&path(&unmirrored)), 1);
    Ok(())
}
