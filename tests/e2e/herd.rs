//! Many clients, one cold blob: exactly one upstream GET, and every client streams the right
//! bytes while the download is still running.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use support::fault_upstream::{FaultUpstream, Reply};
use support::images::{push_blob, random_bytes, sha256_digest};
use support::pullcache::Pullcache;
use support::registry::Registry;

const REGISTRY: &str = "registry.test";
const CLIENTS: usize = 32;

/// Reads a whole body, returning its digest and when its first chunk arrived.
async fn fetch(url: String) -> anyhow::Result<(u16, String, Instant)> {
    let resp = support::http_client().get(url).send().await?;
    let status = resp.status().as_u16();
    let mut hasher = Sha256::new();
    let mut first = None;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        first.get_or_insert_with(Instant::now);
        hasher.update(chunk?);
    }
    Ok((
        status,
        format!("sha256:{}", hex::encode(hasher.finalize())),
        first.unwrap_or_else(Instant::now),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_clients_one_upstream_get() -> anyhow::Result<()> {
    let upstream = Registry::start().await?;
    let blob = random_bytes(24 * 1024 * 1024);
    let digest = push_blob(&upstream.url(), "team/herd", blob).await?;
    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &upstream.url())], Duration::from_secs(60)).await?;

    let url = format!("{}/v2/team/herd/blobs/{digest}?ns={REGISTRY}", pullcache.url());
    let barrier = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (url, barrier) = (url.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                fetch(url).await
            })
        })
        .collect();
    for client in clients {
        let (status, got, _) = client.await??;
        assert_eq!(status, 200);
        assert_eq!(got, digest, "a client got the wrong bytes");
    }
    let gets = upstream
        .wait_access_log_count("GET", &digest, 1, Duration::from_secs(5))
        .await;
    assert_eq!(gets, 1, "upstream saw {gets} GETs for one blob");
    assert_eq!(pullcache.stored_blobs(), vec![digest]);
    assert_eq!(pullcache.temp_files(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_stream_while_a_slow_download_runs() -> anyhow::Result<()> {
    let upstream = FaultUpstream::start().await?;
    let blob = random_bytes(4 * 1024 * 1024);
    let digest = sha256_digest(&blob);
    let path = format!("/v2/team/slow/blobs/{digest}");
    // About two seconds of body, in 40 pieces.
    upstream.set(&path, Reply::ok(blob, &[]).slowly(40, Duration::from_millis(50)));
    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &upstream.url())], Duration::from_secs(60)).await?;
    let url = format!("{}{path}?ns={REGISTRY}", pullcache.url());

    // One client gives up after its first bytes; the download must go on without it.
    let quitter = {
        let url = url.clone();
        tokio::spawn(async move {
            let resp = support::http_client().get(url).send().await.unwrap();
            let mut body = resp.bytes_stream();
            body.next().await.unwrap().unwrap();
        })
    };
    let start = Instant::now();
    let clients: Vec<_> = (0..8).map(|_| tokio::spawn(fetch(url.clone()))).collect();
    quitter.await?;
    let mut first_bytes = Vec::new();
    for client in clients {
        let (status, got, first) = client.await??;
        assert_eq!(status, 200);
        assert_eq!(got, digest);
        first_bytes.push(first.duration_since(start));
    }
    let total = start.elapsed();
    assert!(
        total >= Duration::from_millis(1500),
        "the upstream was not slow ({total:?})"
    );
    for first in first_bytes {
        assert!(
            first < total / 2,
            "a client's first byte came at {first:?} of {total:?}: it waited for the download"
        );
    }
    assert_eq!(upstream.hits(&path), 1);
    assert_eq!(pullcache.stored_blobs(), vec![digest]);
    Ok(())
}
