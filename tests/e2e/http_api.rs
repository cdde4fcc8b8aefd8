//! The registry API as a client sees it, against the real distribution registry upstream:
//! headers, HEAD, ranges (also during a download) and OCI errors for bad input.

use crate::support;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::fault_upstream::{FaultUpstream, Reply};
use support::images::{push_blob, push_oci_image, random_bytes, sha256_digest};
use support::pullcache::Pullcache;
use support::registry::Registry;

const REGISTRY: &str = "registry.test";

/// Sends a request line exactly as written (HTTP clients normalise `..` away) and returns the
/// status and the JSON body, which must be an OCI error.
async fn raw_request(addr: std::net::SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    let request = format!("{method} {path} HTTP/1.1\r\nHost: pullcache\r\nConnection: close\r\n\r\n");
    let (status, head, body) = support::raw_exchange(addr, request.as_bytes()).await?;
    assert!(
        head.to_ascii_lowercase().contains("content-type: application/json"),
        "{method} {path}: not JSON:\n{head}"
    );
    Ok((status, serde_json::from_str(&body)?))
}

async fn error_code(resp: reqwest::Response) -> anyhow::Result<String> {
    assert_eq!(resp.headers()["content-type"], "application/json");
    let json: serde_json::Value = resp.json().await?;
    assert!(json["errors"][0]["message"].as_str().is_some_and(|m| !m.is_empty()));
    Ok(json["errors"][0]["code"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_keep_upstream_headers_on_get_and_head() -> anyhow::Result<()> {
    let upstream = Registry::start().await?;
    let image = push_oci_image(&upstream.url(), "team/app", "v1", &[10 * 1024]).await?;
    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &upstream.url())], Duration::from_secs(60)).await?;
    let client = support::http_client();
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

    let direct = client
        .head(format!("{}/v2/team/app/manifests/v1", upstream.url()))
        .header("accept", accept)
        .send()
        .await?;
    for (method, reference) in [
        (reqwest::Method::HEAD, "v1".to_owned()),
        (reqwest::Method::GET, "v1".to_owned()),
        (reqwest::Method::HEAD, image.manifest_digest.clone()),
        (reqwest::Method::GET, image.manifest_digest.clone()),
    ] {
        let resp = client
            .request(
                method.clone(),
                format!("{}/v2/team/app/manifests/{reference}?ns={REGISTRY}", pullcache.url()),
            )
            .header("accept", accept)
            .send()
            .await?;
        assert_eq!(resp.status(), 200, "{method} {reference}");
        for header in ["content-type", "docker-content-digest", "content-length"] {
            assert_eq!(
                resp.headers()[header],
                direct.headers()[header],
                "{method} {reference}: {header}"
            );
        }
        let body = resp.bytes().await?;
        if method == reqwest::Method::GET {
            assert_eq!(body, image.manifest);
        } else {
            assert!(body.is_empty());
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_on_stored_blobs() -> anyhow::Result<()> {
    let upstream = Registry::start().await?;
    let blob = random_bytes(300_000);
    let digest = push_blob(&upstream.url(), "team/app", blob.clone()).await?;
    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &upstream.url())], Duration::from_secs(60)).await?;
    let client = support::http_client();
    let url = format!("{}/v2/team/app/blobs/{digest}?ns={REGISTRY}", pullcache.url());

    // HEAD of a blob nobody fetched yet asks upstream and downloads nothing.
    let head = client.head(&url).send().await?;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "300000");
    assert!(pullcache.stored_blobs().is_empty());

    let full = client.get(&url).send().await?;
    assert_eq!(full.status(), 200);
    assert_eq!(full.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(full.bytes().await?, blob);

    for (range, start, end) in [
        ("bytes=0-9", 0, 9),
        ("bytes=299990-", 299_990, 299_999),
        ("bytes=-5", 299_995, 299_999),
        ("bytes=100-999999", 100, 299_999),
    ] {
        let resp = client.get(&url).header("range", range).send().await?;
        assert_eq!(resp.status(), 206, "{range}");
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes {start}-{end}/300000").as_str()
        );
        assert_eq!(resp.bytes().await?, blob[start..=end], "{range}");
    }
    for range in ["bytes=300000-", "bytes=5-1", "bytes=0-1,5-6", "bytes=x-"] {
        let resp = client.get(&url).header("range", range).send().await?;
        assert_eq!(resp.status(), 416, "{range}");
        assert_eq!(resp.headers()["content-range"], "bytes */300000");
        assert_eq!(error_code(resp).await?, "RANGE_INVALID");
    }
    let gets = upstream
        .wait_access_log_count("GET", &digest, 1, Duration::from_secs(5))
        .await;
    assert_eq!(gets, 1);
    Ok(())
}

/// The value of an unlabelled counter in a `/metrics` text.
fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} is not in /metrics"))
}

/// Plain HTTP/1 responses send blob files with `sendfile`; h2c responses read them into
/// memory. Both must carry exactly the blob's bytes, whole or by range, stored or downloading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_bodies_go_out_with_sendfile_on_http1_and_by_reads_on_h2c() -> anyhow::Result<()> {
    let upstream = Registry::start().await?;
    // Several sendfile spans, and an odd length.
    let blob = random_bytes(9 * 1024 * 1024 + 7);
    let digest = push_blob(&upstream.url(), "team/app", blob.clone()).await?;
    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &upstream.url())], Duration::from_secs(60)).await?;
    let client = support::http_client();
    let url = format!("{}/v2/team/app/blobs/{digest}?ns={REGISTRY}", pullcache.url());
    let sent = |metrics: &str| counter(metrics, "pullcache_sendfile_bytes_total");
    assert_eq!(sent(&pullcache.metrics().await?), 0.0);

    // A miss: the body follows the download's temp file.
    let resp = client.get(&url).send().await?;
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert!(resp.bytes().await? == blob, "miss over HTTP/1 differs from the blob");
    let after_miss = sent(&pullcache.metrics().await?);
    assert_eq!(after_miss, blob.len() as f64);

    // A hit, and a range of it.
    assert!(client.get(&url).send().await?.bytes().await? == blob);
    let resp = client.get(&url).header("range", "bytes=4194300-8388700").send().await?;
    assert_eq!(resp.status(), 206);
    assert!(resp.bytes().await? == blob[4_194_300..=8_388_700]);
    let after_hits = sent(&pullcache.metrics().await?);
    assert_eq!(after_hits - after_miss, (blob.len() + 8_388_700 - 4_194_300 + 1) as f64);

    // h2c with prior knowledge: the same bytes, none of them through sendfile.
    let out_dir = tempfile::tempdir()?;
    let out = out_dir.path().join("blob");
    let curl = tokio::process::Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--fail",
            "--noproxy",
            "*",
            "--http2-prior-knowledge",
        ])
        .args(["--write-out", "%{http_version}", "--output"])
        .arg(&out)
        .arg(&url)
        .output()
        .await?;
    let curl = support::check_status("curl --http2-prior-knowledge", curl)?;
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "2");
    assert!(std::fs::read(&out)? == blob, "h2c body differs from the blob");
    assert_eq!(sent(&pullcache.metrics().await?), after_hits);
    Ok(())
}

/// An upstream that does not say the blob's size: pullcache's answer is chunked, and the
/// chunks' framing goes out around the `sendfile` spans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsized_blobs_go_out_chunked_around_sendfile_spans() -> anyhow::Result<()> {
    let upstream = FaultUpstream::start().await?;
    let (blob, _, path) = serve_blob(&upstream, 5 * 1024 * 1024 + 3, |reply| {
        reply.without_length().slowly(8, Duration::from_millis(20))
    });
    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &upstream.url())], Duration::from_secs(60)).await?;
    let url = format!("{}{path}?ns={REGISTRY}", pullcache.url());

    // Read the wire as it is, and undo the chunked framing here.
    let mut stream = tokio::net::TcpStream::connect(pullcache.addr).await?;
    let request = format!("GET {path}?ns={REGISTRY} HTTP/1.1\r\nHost: pullcache\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut wire = Vec::new();
    stream.read_to_end(&mut wire).await?;
    let head_end = wire.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    let head = String::from_utf8_lossy(&wire[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let (mut rest, mut body) = (&wire[head_end..], Vec::new());
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end])?, 16)?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            break;
        }
        body.extend_from_slice(&rest[..size]);
        assert_eq!(&rest[size..size + 2], b"\r\n", "chunk data is followed by CRLF");
        rest = &rest[size + 2..];
    }
    assert!(body == blob, "the chunks' data differs from the blob");
    let sent = counter(&pullcache.metrics().await?, "pullcache_sendfile_bytes_total");
    assert!(sent > 0.0 && sent <= blob.len() as f64, "{sent}");

    // Now stored, the blob goes out sized.
    let resp = support::http_client().get(&url).send().await?;
    assert_eq!(resp.headers()["content-length"], blob.len().to_string().as_str());
    assert!(resp.bytes().await? == blob);
    assert_eq!(upstream.hits(&path), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_while_the_blob_downloads() -> anyhow::Result<()> {
    let upstream = FaultUpstream::start().await?;
    let (blob, _, path) = serve_blob(&upstream, 2 * 1024 * 1024, |reply| {
        reply.slowly(20, Duration::from_millis(50))
    });
    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &upstream.url())], Duration::from_secs(60)).await?;
    let client = support::http_client();
    let url = format!("{}{path}?ns={REGISTRY}", pullcache.url());

    let whole = tokio::spawn(client.get(&url).send());
    // The ranges below come while the download is in flight (it takes about a second).
    support::eventually(
        Duration::from_secs(10),
        "the download to reach the upstream",
        || async { upstream.hits(&path) == 1 },
    )
    .await?;
    // Open-ended, as containerd's parallel chunks ask: from the one download.
    let resp = client.get(&url).header("range", "bytes=1000000-").send().await?;
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await?, blob[1_000_000..]);
    let resp = client.get(&url).header("range", "bytes=3000000-").send().await?;
    assert_eq!(resp.status(), 416);
    assert_eq!(whole.await??.bytes().await?, blob);
    assert_eq!(upstream.hits(&path), 1);
    Ok(())
}

/// A lazy pull's span of a blob the download has not reached (soci-snapshotter reads one file
/// of a large layer) is asked of the registry on its own and answered at once, while the whole
/// blob downloads once for what comes next; an open-ended range (containerd's parallel
/// chunks) follows the one download. The registry sees one full GET and the spans asked
/// before the blob landed, nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_span_the_download_has_not_reached_is_asked_of_the_registry_at_once() -> anyhow::Result<()> {
    const SIZE: usize = 16 * 1024 * 1024;
    let upstream = FaultUpstream::start().await?;
    // About 6 s in all, 256 KiB every 100 ms; a span goes at the same pace.
    let (blob, digest, path) = serve_blob(&upstream, SIZE, |reply| reply.slowly(64, Duration::from_millis(100)));
    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(cache.path(), &[(REGISTRY, &upstream.url())], Duration::from_secs(60)).await?;
    let client = support::http_client();
    let url = format!("{}{path}?ns={REGISTRY}", pullcache.url());

    let whole = tokio::spawn(client.get(&url).send());
    support::eventually(
        Duration::from_secs(10),
        "the download to reach the upstream",
        || async { upstream.hits(&path) == 1 },
    )
    .await?;
    let (a, b) = (SIZE - 1000, SIZE - 1);
    let resp = client
        .get(&url)
        .header("range", format!("bytes={a}-{b}"))
        .send()
        .await?;
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes {a}-{b}/{SIZE}").as_str()
    );
    assert_eq!(resp.bytes().await?, blob[a..=b]);
    assert!(
        !pullcache.stored_blobs().contains(&digest),
        "the span waited for the whole download"
    );
    let spans = upstream.ranges_seen(&path);
    assert_eq!(
        spans,
        [None, Some(format!("bytes={a}-{b}"))],
        "what the registry was asked"
    );

    // Open-ended: from the one download, however long it takes to get there.
    let resp = client.get(&url).header("range", "bytes=8388608-").send().await?;
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await?, blob[8_388_608..]);
    assert_eq!(whole.await??.bytes().await?, blob);
    pullcache.idle().await?;
    assert!(pullcache.stored_blobs().contains(&digest));
    // Landed: spans come from the store.
    let resp = client.get(&url).header("range", "bytes=0-99").send().await?;
    assert_eq!(resp.bytes().await?, blob[..100]);
    assert_eq!(upstream.hits(&path), 2, "{:?}", upstream.ranges_seen(&path));
    let metrics = pullcache.metrics().await?;
    assert!(metrics.contains("pullcache_upstream_spans_total 1\n"), "{metrics}");
    assert!(
        metrics.contains("pullcache_upstream_span_bytes_total 1000\n"),
        "{metrics}"
    );
    Ok(())
}

/// Found by the attack review: a span's body had no deadline, so a registry that sent a 206's
/// headers and then nothing held the client (a FUSE read, for soci) for ever. It is cut at the
/// upstream timeout, as a whole download's stall is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_span_the_registry_stalls_is_cut_at_the_upstream_timeout() -> anyhow::Result<()> {
    const SIZE: usize = 16 * 1024 * 1024;
    let upstream = FaultUpstream::start().await?;
    // In 8 MiB chunks 20 s apart: a 9 MiB span stalls after its first chunk.
    let (_, _, path) = serve_blob(&upstream, SIZE, |reply| reply.slowly(2, Duration::from_secs(20)));
    let cache = tempfile::tempdir()?;
    let mut config = support::pullcache::config(cache.path().to_owned());
    config.registry(pullcache::oci::Registry::parse(REGISTRY)?).url = Some(upstream.url().parse()?);
    config.upstream.timeout = Some(Duration::from_secs(1));
    let pullcache = Pullcache::start_with(config).await?;
    let url = format!("{}{path}?ns={REGISTRY}", pullcache.url());
    let (a, b) = (4 * 1024 * 1024, 13 * 1024 * 1024 - 1);
    let started = std::time::Instant::now();
    let resp = support::http_client()
        .get(&url)
        .header("range", format!("bytes={a}-{b}"))
        .timeout(Duration::from_secs(15))
        .send()
        .await?;
    assert_eq!(resp.status(), 206);
    assert!(resp.bytes().await.is_err(), "a stalled span completed");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the span was not cut: {:?}",
        started.elapsed()
    );
    Ok(())
}

/// Random bytes of `size` as a blob of `team/app` at `upstream`, answered as `reply` makes them:
/// the bytes, their digest and their path.
fn serve_blob(upstream: &FaultUpstream, size: usize, reply: impl FnOnce(Reply) -> Reply) -> (Vec<u8>, String, String) {
    let blob = random_bytes(size);
    let digest = sha256_digest(&blob);
    let path = format!("/v2/team/app/blobs/{digest}");
    upstream.set(&path, reply(Reply::ok(blob.clone(), &[])));
    (blob, digest, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_oci_errors() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    // No upstream is needed: every request here is refused before one would be made.
    let pullcache = Pullcache::start(cache.path(), &[], Duration::from_secs(60)).await?;
    let client = support::http_client();
    let base = pullcache.url();
    let digest = sha256_digest(b"x");

    let ping = client.get(format!("{base}/v2/")).send().await?;
    assert_eq!(ping.status(), 200);
    // Sized, not chunked: the access log's body wrapper keeps the size.
    assert_eq!(ping.headers()["content-length"], "2");
    assert!(!ping.headers().contains_key("transfer-encoding"));

    let cases: &[(&str, &str, u16, &str)] = &[
        ("GET", "/v2/../../etc/passwd/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/a/%2e%2e/b/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/a//b/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/UPPER/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/a/manifests/v1?ns=bad_host!", 400, "NAME_INVALID"),
        // The distribution spec (and its conformance suite): a tag that cannot exist is an
        // unknown manifest.
        ("GET", "/v2/a/manifests/-tag", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/a/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/a/manifests/sha256:1234", 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/blobs/sha256:ABCDEF", 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/blobs/md5:abc", 400, "DIGEST_INVALID"),
        ("PUT", "/v2/a/manifests/v1", 405, "UNSUPPORTED"),
        ("DELETE", &format!("/v2/a/blobs/{digest}"), 405, "UNSUPPORTED"),
        ("POST", "/v2/a/blobs/uploads/", 405, "UNSUPPORTED"),
        ("GET", "/v2/_catalog", 405, "UNSUPPORTED"),
        ("POST", "/v2/a/tags/list", 405, "UNSUPPORTED"),
        ("GET", "/v2/a/tags/list?n=many", 400, "UNSUPPORTED"),
        ("GET", "/v2/a/referrers/sha256:1234", 400, "DIGEST_INVALID"),
        ("GET", "/v2/a/unknown/thing", 404, "NAME_UNKNOWN"),
        ("GET", "/etc/passwd", 404, "NAME_UNKNOWN"),
        ("GET", "/v2/a/manifests/v1?ns=127.0.0.1:22", 403, "DENIED"),
        ("GET", "/v2/a/manifests/v1?ns=169.254.169.254", 403, "DENIED"),
        ("GET", "/v2/a/manifests/v1?ns=0.0.0.0:80", 403, "DENIED"),
        ("GET", "/v2//etc/passwd/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/a/b/../../../manifests/v1", 400, "NAME_INVALID"),
    ];
    for (method, path, status, code) in cases {
        let (got_status, json) = raw_request(pullcache.addr, method, path).await?;
        assert_eq!(got_status, *status, "{method} {path}: {json}");
        assert_eq!(json["errors"][0]["code"], *code, "{method} {path}");
        assert!(json["errors"][0]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert!(pullcache.stored_blobs().is_empty());
    Ok(())
}
