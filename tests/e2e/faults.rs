//! An upstream that lies or fails. Bytes that fail their digest never complete a response and
//! never enter the store; a rate-limited or failing upstream gets the stale tag served.

use crate::support;

use std::time::Duration;

use support::fault_upstream::{FaultUpstream, Reply};
use support::images::{random_bytes, sha256_digest};
use support::pullcache::Pullcache;

const REGISTRY: &str = "registry.test";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

async fn setup() -> anyhow::Result<(FaultUpstream, tempfile::TempDir, Pullcache)> {
    let upstream = FaultUpstream::start().await?;
    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &upstream.url())], Duration::ZERO).await?;
    Ok((upstream, cache, pullcache))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_abort_every_client_and_commit_nothing() -> anyhow::Result<()> {
    let (upstream, _cache, pullcache) = setup().await?;
    let real = random_bytes(1024 * 1024);
    let digest = sha256_digest(&real);
    let mut forged = real.clone();
    forged[500_000] ^= 0xff;
    let path = format!("/v2/team/bad/blobs/{digest}");
    upstream.set(&path, Reply::ok(forged, &[]).slowly(10, Duration::from_millis(20)));

    let url = format!("{}{path}?ns={REGISTRY}", pullcache.url());
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let resp = support::http_client().get(url).send().await?;
                let status = resp.status();
                // A failed body read is the expected outcome; a complete 200 is the bug.
                let body = resp.bytes().await;
                anyhow::Ok((status, body.map(|b| b.len())))
            })
        })
        .collect();
    for client in clients {
        match client.await? {
            Err(_) => {}
            Ok((status, Err(_))) => assert_eq!(status, 200),
            Ok((status, Ok(len))) => {
                assert_ne!(status, 200, "a client got a complete 200 of {len} forged bytes");
            }
        }
    }
    assert_eq!(upstream.hits(&path), 1);
    // The flight has ended by the time its readers failed.
    assert!(
        pullcache.stored_blobs().is_empty(),
        "forged blob stored: {:?}",
        pullcache.stored_blobs()
    );
    assert_eq!(pullcache.temp_files(), 0);

    // For a while the digest is refused before any header, so containerd can move on to its
    // next host instead of retrying a download that cannot verify.
    let resp = support::http_client().get(&url).send().await?;
    assert_eq!(resp.status(), 502);
    let json: serde_json::Value = resp.json().await?;
    assert_eq!(json["errors"][0]["code"], "DIGEST_INVALID");
    assert_eq!(upstream.hits(&path), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_that_fail_their_digest_are_refused() -> anyhow::Result<()> {
    let (upstream, _cache, pullcache) = setup().await?;
    let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#.to_vec();
    let claimed = sha256_digest(b"something else");
    let client = support::http_client();

    // By digest: the bytes do not hash to the name asked for.
    upstream.set(
        &format!("/v2/team/app/manifests/{claimed}"),
        Reply::ok(body.clone(), &[("content-type", OCI_MANIFEST)]),
    );
    let resp = client
        .get(format!(
            "{}/v2/team/app/manifests/{claimed}?ns={REGISTRY}",
            pullcache.url()
        ))
        .send()
        .await?;
    assert_eq!(resp.status(), 502);
    let json: serde_json::Value = resp.json().await?;
    assert_eq!(json["errors"][0]["code"], "DIGEST_INVALID");

    // By tag: the registry's own Docker-Content-Digest disagrees with the bytes.
    upstream.set(
        "/v2/team/app/manifests/v1",
        Reply::ok(
            body,
            &[("content-type", OCI_MANIFEST), ("docker-content-digest", &claimed)],
        ),
    );
    let resp = client
        .get(format!("{}/v2/team/app/manifests/v1?ns={REGISTRY}", pullcache.url()))
        .send()
        .await?;
    assert_eq!(resp.status(), 502);
    assert!(pullcache.stored_blobs().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_upstream_gets_the_stale_tag() -> anyhow::Result<()> {
    let (upstream, _cache, pullcache) = setup().await?;
    let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{}}"#.to_vec();
    let digest = sha256_digest(&body);
    let path = "/v2/team/app/manifests/v1";
    upstream.set(
        path,
        Reply::ok(
            body.clone(),
            &[("content-type", OCI_MANIFEST), ("docker-content-digest", &digest)],
        ),
    );
    let client = support::http_client();
    let url = format!("{}{path}?ns={REGISTRY}", pullcache.url());

    let resp = client.get(&url).send().await?;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("warning").is_none());
    assert_eq!(resp.bytes().await?, body);

    for failure in [
        Reply::status(503, &[]),
        Reply::status(401, &[]),
        Reply::status(403, &[]),
    ] {
        let status = failure.status;
        upstream.set(path, failure);
        let resp = client.get(&url).send().await?;
        assert_eq!(resp.status(), 200, "upstream {status}: stale answer not served");
        assert_eq!(resp.headers()["docker-content-digest"], digest.as_str());
        assert!(resp.headers()["warning"].to_str()?.starts_with("110"));
        assert_eq!(resp.bytes().await?, body);
    }

    // Revalidation is a HEAD when the digest is unchanged: after the first GET, only HEADs.
    upstream.set(
        path,
        Reply::ok(
            body.clone(),
            &[("content-type", OCI_MANIFEST), ("docker-content-digest", &digest)],
        ),
    );
    let hits = upstream.hits(path);
    let resp = client.head(&url).send().await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], body.len().to_string().as_str());
    assert!(resp.headers().get("warning").is_none());
    assert_eq!(upstream.hits(path), hits + 1);

    // A tag the upstream says is gone is not served from the cache.
    upstream.set(path, Reply::status(404, &[]));
    let resp = client.get(&url).send().await?;
    assert_eq!(resp.status(), 404);
    let json: serde_json::Value = resp.json().await?;
    assert_eq!(json["errors"][0]["code"], "MANIFEST_UNKNOWN");

    // A blackholed upstream does not hold the client: the stale answer comes after a short
    // wait. (Last, because that revalidation goes on in the background.)
    upstream.set(path, Reply::status(200, &[]).after(Duration::from_secs(20)));
    let started = std::time::Instant::now();
    let resp = client.get(&url).send().await?;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["warning"].to_str()?.starts_with("110"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited {:?}",
        started.elapsed()
    );

    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_closes_the_upstream_for_its_retry_after() -> anyhow::Result<()> {
    let (upstream, _cache, pullcache) = setup().await?;
    let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#.to_vec();
    let digest = sha256_digest(&body);
    let path = "/v2/team/app/manifests/v1";
    let ok = Reply::ok(
        body.clone(),
        &[("content-type", OCI_MANIFEST), ("docker-content-digest", &digest)],
    );
    upstream.set(path, ok.clone());
    let client = support::http_client();
    let url = format!("{}{path}?ns={REGISTRY}", pullcache.url());
    assert_eq!(client.get(&url).send().await?.status(), 200);
    assert_eq!(upstream.hits(path), 1);

    // The tag TTL is zero, so every request revalidates: the first meets the 429.
    upstream.set(path, Reply::status(429, &[("retry-after", "60")]));
    for _ in 0..3 {
        let resp = client.get(&url).send().await?;
        assert_eq!(resp.status(), 200, "the stale answer was not served");
        assert!(resp.headers()["warning"].to_str()?.starts_with("110"));
        assert_eq!(resp.bytes().await?, body);
    }
    assert_eq!(upstream.hits(path), 2, "pullcache asked again inside Retry-After");

    // Other content of that registry is not asked for either; the client learns how long.
    upstream.set("/v2/team/app/manifests/v2", ok);
    let resp = client
        .get(format!("{}/v2/team/app/manifests/v2?ns={REGISTRY}", pullcache.url()))
        .send()
        .await?;
    assert_eq!(resp.status(), 429);
    let retry_after: u64 = resp.headers()["retry-after"].to_str()?.parse()?;
    assert!((50..=60).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(upstream.hits("/v2/team/app/manifests/v2"), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_miss_passes_the_429_on() -> anyhow::Result<()> {
    let (upstream, _cache, pullcache) = setup().await?;
    upstream.set(
        "/v2/team/app/manifests/v2",
        Reply::status(429, &[("retry-after", "30")]),
    );
    let resp = support::http_client()
        .get(format!("{}/v2/team/app/manifests/v2?ns={REGISTRY}", pullcache.url()))
        .send()
        .await?;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "30");
    let json: serde_json::Value = resp.json().await?;
    assert_eq!(json["errors"][0]["code"], "TOOMANYREQUESTS");
    Ok(())
}
