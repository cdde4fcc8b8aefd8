//! What the upstream client does for registries that are not a plain server: anonymous
//! Bearer tokens (fetched once, reused), and redirects to blob storage on another host, which
//! never receive the registry's credentials.

mod support;

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

    let manifest =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#.to_vec();
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
    storage.set(&storage_path, Reply::ok(blob.clone(), &[]));

    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(
        cache.path(),
        &[(REGISTRY, &registry.url())],
        Duration::from_secs(60),
    )
    .await?;
    let client = support::http_client();

    let resp = client
        .get(format!(
            "{}/v2/team/app/manifests/v1?ns={REGISTRY}",
            pullcache.url()
        ))
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
