//! Where pullcache may connect. A registry a client names (`?ns=`, or a host-like first path
//! component) may not reach this node's loopback, link-local, metadata or unspecified
//! addresses: not as an IP literal, and not through a name that resolves there. An operator's
//! explicit mapping may point at loopback, by address or by name.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::fault_upstream::{FaultUpstream, Reply};
use support::images::{random_bytes, sha256_digest};
use support::pullcache::Pullcache;

/// A listener on this node's loopback that counts every connection made to it.
struct Canary {
    port: u16,
    connections: Arc<AtomicUsize>,
}

impl Canary {
    async fn start() -> anyhow::Result<Canary> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Ok(Canary { port, connections })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_named_registries_never_reach_this_node() -> anyhow::Result<()> {
    let canary = Canary::start().await?;
    let cache = tempfile::tempdir()?;
    let mut pullcache = Pullcache::start(cache.path(), &[], Duration::from_secs(60)).await?;
    let client = support::http_client();
    let port = canary.port;
    let digest = format!("sha256:{}", "a".repeat(64));
    let paths = [
        format!("/v2/library/x/manifests/latest?ns=127.0.0.1:{port}"),
        format!("/v2/library/x/manifests/latest?ns=localhost:{port}"),
        format!("/v2/library/x/blobs/{digest}?ns=localhost:{port}"),
        format!("/v2/localhost:{port}/team/app/manifests/v1"),
        format!("/v2/localhost:{port}/team/app/blobs/{digest}"),
        format!("/v2/library/x/manifests/latest?ns=0.0.0.0:{port}"),
        "/v2/library/x/manifests/latest?ns=169.254.169.254".to_owned(),
        "/v2/library/x/manifests/latest?ns=100.100.100.200".to_owned(),
    ];
    for path in &paths {
        let resp = client.get(format!("{}{path}", pullcache.url())).send().await?;
        let status = resp.status();
        let json: serde_json::Value = resp.json().await?;
        assert_eq!(status, 403, "{path}: {json}");
        assert_eq!(json["errors"][0]["code"], "DENIED", "{path}: {json}");
        assert!(
            json["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("not allowed")),
            "{path}: {json}"
        );
    }
    assert_eq!(
        canary.connections.load(Ordering::SeqCst),
        0,
        "a client-named registry reached a port on this node's loopback"
    );
    // Nothing was sent upstream, whether the policy refused an IP literal or the address a
    // name resolved to: no upstream request, so no upstream error either.
    let metrics = pullcache.metrics().await?;
    let sent: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("pullcache_upstream_requests_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(sent.is_empty(), "refusals counted as upstream requests: {sent:?}");
    pullcache.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_mapping_may_point_at_loopback_by_name() -> anyhow::Result<()> {
    let upstream = FaultUpstream::start().await?;
    let blob = random_bytes(4096);
    let digest = sha256_digest(&blob);
    upstream.set(&format!("/v2/team/app/blobs/{digest}"), Reply::ok(blob.clone(), &[]));
    let by_name = format!("http://localhost:{}", upstream.addr.port());
    let cache = tempfile::tempdir()?;
    let mut pullcache = Pullcache::start(cache.path(), &[("local.test", &by_name)], Duration::from_secs(60)).await?;
    let url = format!("{}/v2/team/app/blobs/{digest}?ns=local.test", pullcache.url());
    let resp = support::http_client().get(url).send().await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await?, blob);
    pullcache.stop().await
}
