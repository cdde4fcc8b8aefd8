//! Clients and upstreams that push limits: oversize URIs and headers, a slowloris, more
//! connections than the cap, a manifest over 4 MiB, a token lifetime out of range. Each gets a clear refusal, the server
//! stays up for everyone else, and nothing enters the cache.

use crate::support;

use std::time::Duration;

use support::fault_upstream::{FaultUpstream, Reply};
use support::images::sha256_digest;
use support::pullcache::Pullcache;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REGISTRY: &str = "registry.test";

async fn start(limits: pullcache::server::ConnectionLimits) -> anyhow::Result<(tempfile::TempDir, Pullcache)> {
    let cache = tempfile::tempdir()?;
    let mut config = support::pullcache::config(cache.path().to_owned());
    config.limits = limits;
    Ok((cache, Pullcache::start_with(config).await?))
}

/// A keep-alive `GET /v2/` on an open connection; true if it was answered 200.
async fn ping(stream: &mut TcpStream) -> anyhow::Result<bool> {
    stream
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: pullcache\r\n\r\n")
        .await?;
    let mut buf = vec![0; 4096];
    let mut got = Vec::new();
    // The ping's body is `{}`, plain or as the last chunk before the terminating one.
    while !(got.ends_with(b"{}") || got.ends_with(b"\r\n0\r\n\r\n")) {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
        if n == 0 {
            return Ok(false);
        }
        got.extend_from_slice(&buf[..n]);
    }
    anyhow::ensure!(
        got.starts_with(b"HTTP/1.1 200"),
        "ping answered:\n{}",
        String::from_utf8_lossy(&got)
    );
    Ok(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_uris_and_headers_are_refused() -> anyhow::Result<()> {
    let (_cache, pullcache) = start(Default::default()).await?;
    let long_path = format!("/v2/{}/manifests/v1", "a/".repeat(1500) + "a");
    let request = format!("GET {long_path} HTTP/1.1\r\nHost: pullcache\r\nConnection: close\r\n\r\n");
    let (status, head, body) = support::raw_exchange(pullcache.addr, request.as_bytes()).await?;
    assert_eq!(status, 414, "{head}");
    let json: serde_json::Value = serde_json::from_str(&body)?;
    assert!(
        json["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("limit"),
        "{json}"
    );

    let huge = format!(
        "GET /v2/ HTTP/1.1\r\nHost: pullcache\r\nX-Filler: {}\r\nConnection: close\r\n\r\n",
        "x".repeat(100 * 1024)
    );
    let (status, head, _) = support::raw_exchange(pullcache.addr, huge.as_bytes()).await?;
    assert_eq!(status, 431, "{head}");

    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let request = format!("GET /v2/ HTTP/1.1\r\nHost: pullcache\r\n{many}Connection: close\r\n\r\n");
    let (status, head, _) = support::raw_exchange(pullcache.addr, request.as_bytes()).await?;
    assert_eq!(status, 431, "{head}");

    // Still serving.
    let mut stream = TcpStream::connect(pullcache.addr).await?;
    assert!(ping(&mut stream).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_is_cut_off() -> anyhow::Result<()> {
    let (_cache, pullcache) = start(pullcache::server::ConnectionLimits {
        header_read_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .await?;
    let mut slow = TcpStream::connect(pullcache.addr).await?;
    slow.write_all(b"GET /v2/ HTTP/1.1\r\nHost: pull").await?;
    let started = std::time::Instant::now();
    let mut buf = vec![0; 1024];
    // The server closes it (possibly after a 408); it never waits for the rest.
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(read.is_ok(), "a half-sent request held its connection for 10s");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "cut off before the timeout"
    );
    let mut fine = TcpStream::connect(pullcache.addr).await?;
    assert!(ping(&mut fine).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_at_once() -> anyhow::Result<()> {
    let (_cache, pullcache) = start(pullcache::server::ConnectionLimits {
        max_connections: 4,
        ..Default::default()
    })
    .await?;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(pullcache.addr).await?;
        assert!(ping(&mut stream).await?, "a connection under the cap was refused");
        held.push(stream);
    }
    let mut over = TcpStream::connect(pullcache.addr).await?;
    assert!(!ping(&mut over).await.unwrap_or(false), "a fifth connection was served");

    // A freed slot serves again.
    drop(held.pop());
    support::eventually(Duration::from_secs(5), "the freed slot to serve", || async {
        let mut stream = TcpStream::connect(pullcache.addr).await?;
        anyhow::Ok(ping(&mut stream).await.unwrap_or(false))
    })
    .await?;
    for mut stream in held {
        assert!(ping(&mut stream).await?, "a held keep-alive connection was dropped");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_over_4_mib_is_refused_and_not_stored() -> anyhow::Result<()> {
    let upstream = FaultUpstream::start().await?;
    let mut body =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","annotations":{"x":""#.to_vec();
    body.extend(std::iter::repeat_n(b'a', 4 * 1024 * 1024));
    body.extend(br#""}}"#);
    let digest = sha256_digest(&body);
    let media = [("content-type", "application/vnd.oci.image.manifest.v1+json")];
    upstream.set("/v2/team/fat/manifests/v1", Reply::ok(body.clone(), &media));
    upstream.set(&format!("/v2/team/fat/manifests/{digest}"), Reply::ok(body, &media));
    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &upstream.url())], Duration::ZERO).await?;
    for reference in ["v1", digest.as_str()] {
        let resp = support::http_client()
            .get(format!(
                "{}/v2/team/fat/manifests/{reference}?ns={REGISTRY}",
                pullcache.url()
            ))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await?;
        assert_eq!(resp.status(), 502, "{reference}");
        let json: serde_json::Value = resp.json().await?;
        assert_eq!(json["errors"][0]["code"], "MANIFEST_INVALID", "{reference}: {json}");
    }
    assert!(pullcache.stored_blobs().is_empty());
    Ok(())
}

/// A token realm answering `expires_in` of `u64::MAX` seconds (or a negative one) made the
/// download that asked panic; the flight never landed, and every later request for the
/// digest, under any registry name, got "flight ended without a result" until a restart.
/// Now the lifetime is clamped: the blob is served, then served again, and an honest
/// registry serving the same digest is served too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_lifetime_out_of_range_wedges_nothing() -> anyhow::Result<()> {
    let blob = support::images::random_bytes(64 * 1024);
    let digest = sha256_digest(&blob);
    let path = format!("/v2/team/app/blobs/{digest}");
    let mut upstreams = Vec::new();
    for lifetime in ["18446744073709551615", "-1"] {
        let hostile = FaultUpstream::start().await?;
        hostile.require_token("t");
        hostile.set_token_lifetime(lifetime);
        hostile.set(&path, Reply::ok(blob.clone(), &[]));
        upstreams.push(hostile);
    }
    let honest = FaultUpstream::start().await?;
    honest.set(&path, Reply::ok(blob.clone(), &[]));
    let cache = tempfile::tempdir()?;
    let (huge, negative) = (upstreams[0].url(), upstreams[1].url());
    let pullcache = Pullcache::start(
        cache.path(),
        &[
            ("huge.test", &huge),
            ("negative.test", &negative),
            ("honest.test", &honest.url()),
        ],
        Duration::ZERO,
    )
    .await?;
    let get = |ns: &'static str| {
        let url = format!("{}{path}?ns={ns}", pullcache.url());
        async move {
            let resp = support::http_client().get(url).send().await?;
            anyhow::Ok((resp.status().as_u16(), resp.bytes().await?))
        }
    };
    for ns in ["huge.test", "huge.test", "negative.test", "honest.test"] {
        let (status, body) = get(ns).await?;
        assert_eq!(status, 200, "{ns}");
        assert_eq!(sha256_digest(&body), digest, "{ns}");
    }
    Ok(())
}

/// A slow registry's `reply` for a 4 KiB..64 KiB blob, against a node whose
/// `--upstream-timeout` is 1 s: the fetch fails within `bound` (the headers may already be out,
/// as the blob streams as it comes; then the body breaks), after a resume, storing nothing,
/// and an honest registry serving the same digest is served.
async fn a_slow_body_fails(blob: Vec<u8>, reply: Reply, bound: Duration) -> anyhow::Result<()> {
    let digest = sha256_digest(&blob);
    let path = format!("/v2/team/app/blobs/{digest}");
    let slow = FaultUpstream::start().await?;
    slow.set(&path, reply);
    let honest = FaultUpstream::start().await?;
    honest.set(&path, Reply::ok(blob, &[]));
    let cache = tempfile::tempdir()?;
    let mut config = support::pullcache::config(cache.path());
    config.upstream.timeout = Some(Duration::from_secs(1));
    for (name, url) in [("slow.test", slow.url()), ("honest.test", honest.url())] {
        config.registry(pullcache::oci::Registry::parse(name)?).url = Some(url.parse()?);
    }
    let pullcache = Pullcache::start_with(config).await?;
    let get = |ns: &str| {
        support::http_client()
            .get(format!("{}{path}?ns={ns}", pullcache.url()))
            .send()
    };
    let started = std::time::Instant::now();
    let resp = get("slow.test").await?;
    let failed = match resp.status().as_u16() {
        200 => resp.bytes().await.is_err(),
        status => status >= 500,
    };
    let took = started.elapsed();
    assert!(failed, "the slow body was served whole");
    assert!(took < bound, "took {took:?}: the slow body was waited out");
    assert!(slow.hits(&path) >= 2, "the slow body was resumed before it failed");
    pullcache.idle().await?;
    assert!(pullcache.stored_blobs().is_empty());
    let resp = get("honest.test").await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(sha256_digest(&resp.bytes().await?), digest);
    Ok(())
}

/// A registry that trickles a blob (a few hundred bytes a second: never idle long enough for
/// an idle timer) held its flight, and every client of that digest under its name, for as
/// long as it liked. Now a body that averages under 1 KiB/s over `--upstream-timeout` fails
/// like a broken one (resumed, then refused), and the digest is not wedged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_body_fails_within_the_timeout() -> anyhow::Result<()> {
    let blob = support::images::random_bytes(4 * 1024);
    // About 100 bytes every 300 ms: a third of 1 KiB/s, whole after 12 s.
    let reply = Reply::ok(blob.clone(), &[]).slowly(40, Duration::from_millis(300));
    a_slow_body_fails(blob, reply, Duration::from_secs(9)).await
}

/// A registry that breaks a blob off half-way, then answers the resume with the whole body
/// from the start (as servers that ignore `Range` do) and replays the half already read at
/// under 1 KiB/s. Skipped bytes once restarted the idle timer and never counted towards the
/// rate, so the replay held the flight for as long as it took (a large prefix: days). Now
/// the replay counts: the fetch fails within a few windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_replay_of_a_resumed_body_fails_within_the_timeout() -> anyhow::Result<()> {
    let blob = support::images::random_bytes(64 * 1024);
    // The first answer breaks after 32 KiB; every later one is 200 from the start, 100 bytes
    // every 200 ms (half of 1 KiB/s): the 32 KiB already read take 64 s to come again.
    let reply = Reply::ok(blob.clone(), &[])
        .drop_after(32 * 1024)
        .ignoring_range()
        .slowly_after_first(640, Duration::from_millis(200));
    a_slow_body_fails(blob, reply, Duration::from_secs(15)).await
}

/// A blob larger than the cache can keep, said so by its `Content-Length` or found so as a
/// chunked body goes past it: it is passed through and verified, the client gets every byte,
/// and nothing is stored or evicted. Before, the chunked one was written to disk without a
/// limit (an endless body filled the node's disk), and either, committed, evicted the whole
/// cache and then itself. The blob is larger than the pass-through window (16 MiB) and comes
/// fast, three times each: the client's place in the window is kept from the moment it
/// starts the download, so no byte passes before it reads (an attack review found the first
/// client of such a blob usually got an empty body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_larger_than_the_cache_passes_through_and_evicts_nothing() -> anyhow::Result<()> {
    let kept = support::images::random_bytes(64 * 1024);
    let large = support::images::random_bytes(24 * 1024 * 1024);
    let (kept_digest, large_digest) = (sha256_digest(&kept), sha256_digest(&large));
    let upstream = FaultUpstream::start().await?;
    upstream.set(
        &format!("/v2/team/app/blobs/{kept_digest}"),
        Reply::ok(kept.clone(), &[]),
    );
    upstream.set(
        &format!("/v2/team/sized/blobs/{large_digest}"),
        Reply::ok(large.clone(), &[]).slowly(96, Duration::ZERO),
    );
    upstream.set(
        &format!("/v2/team/chunked/blobs/{large_digest}"),
        Reply::ok(large.clone(), &[])
            .without_length()
            .slowly(96, Duration::ZERO),
    );
    let cache = tempfile::tempdir()?;
    let mut config = support::pullcache::config(cache.path());
    config.budget.max_size = Some(1024 * 1024);
    config.registry(pullcache::oci::Registry::parse(REGISTRY)?).url = Some(upstream.url().parse()?);
    let pullcache = Pullcache::start_with(config).await?;
    let get = |repo: &str, digest: &str| {
        let url = format!("{}/v2/team/{repo}/blobs/{digest}?ns={REGISTRY}", pullcache.url());
        async move {
            let resp = support::http_client().get(url).send().await?;
            anyhow::Ok((resp.status().as_u16(), resp.bytes().await?))
        }
    };
    let (status, body) = get("app", &kept_digest).await?;
    assert_eq!((status, sha256_digest(&body)), (200, kept_digest.clone()));
    pullcache.idle().await?;
    assert_eq!(pullcache.stored_blobs().len(), 1);
    for repo in ["sized", "chunked"] {
        for attempt in 0..3 {
            let (status, body) = get(repo, &large_digest).await?;
            assert_eq!(status, 200, "{repo} #{attempt}");
            assert_eq!(body.len(), large.len(), "{repo} #{attempt}");
            assert_eq!(sha256_digest(&body), large_digest, "{repo} #{attempt}");
            pullcache.idle().await?;
            let stored = pullcache.stored_blobs();
            assert_eq!(stored.len(), 1, "{repo}: {stored:?}");
            assert!(
                stored[0].ends_with(kept_digest.trim_start_matches("sha256:")),
                "{repo}: {stored:?}"
            );
            assert_eq!(pullcache.temp_files(), 0, "{repo}");
        }
    }
    Ok(())
}

/// A download passing a blob through (too large to keep) whose every client has gone stops:
/// nothing of it would be stored and nobody reads it. Before, an endless body was read on
/// at line rate for as long as the registry sent it, one such download per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_through_nobody_reads_stops() -> anyhow::Result<()> {
    let large = support::images::random_bytes(8 * 1024 * 1024);
    let digest = sha256_digest(&large);
    let path = format!("/v2/team/app/blobs/{digest}");
    let upstream = FaultUpstream::start().await?;
    // 64 chunks 100 ms apart: 6.4 s to send it all.
    upstream.set(
        &path,
        Reply::ok(large.clone(), &[]).slowly(64, Duration::from_millis(100)),
    );
    let cache = tempfile::tempdir()?;
    let mut config = support::pullcache::config(cache.path());
    config.budget.max_size = Some(1024 * 1024);
    config.registry(pullcache::oci::Registry::parse(REGISTRY)?).url = Some(upstream.url().parse()?);
    let pullcache = Pullcache::start_with(config).await?;
    let mut resp = support::http_client()
        .get(format!("{}{path}?ns={REGISTRY}", pullcache.url()))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert!(resp.chunk().await?.is_some());
    let left = std::time::Instant::now();
    drop(resp);
    support::eventually(Duration::from_secs(3), "the unread pass-through to stop", || async {
        pullcache.sample("pullcache_inflight_fetches").await.ok() == Some(0.0)
    })
    .await?;
    assert!(left.elapsed() < Duration::from_secs(3));
    assert_eq!(pullcache.temp_files(), 0);
    Ok(())
}
