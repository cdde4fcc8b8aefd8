//! Connections that CONNECT upgrades (intercepted ones here) are connections like any other:
//! they count against `--max-connections` for as long as they are open, and a shutdown
//! drains them, letting a request in flight finish and closing them after.

use crate::support;

use std::net::SocketAddr;
use std::time::Duration;

use pullcache::config::InterceptSettings;
use pullcache::oci::Registry;
use support::fault_upstream::{FaultUpstream, Reply};
use support::images::{random_bytes, sha256_digest};
use support::pullcache::Pullcache;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Intercepted, and fetched from the fault upstream.
const REGISTRY: &str = "slow.test";

struct Setup {
    dir: tempfile::TempDir,
    upstream: FaultUpstream,
    pullcache: Pullcache,
}

async fn setup(max_connections: usize) -> anyhow::Result<Setup> {
    let dir = tempfile::tempdir()?;
    let upstream = FaultUpstream::start().await?;
    let mut config = support::pullcache::config(dir.path().join("cache"));
    config.registry(Registry::parse(REGISTRY)?).url = Some(upstream.url().parse()?);
    config.limits.max_connections = max_connections;
    config.intercept = Some(InterceptSettings {
        ca_dir: dir.path().join("ca"),
        tunnel_allow: Vec::new(),
        registries: Vec::new(),
    });
    let pullcache = Pullcache::start_with(config).await?;
    Ok(Setup {
        dir,
        upstream,
        pullcache,
    })
}

impl Setup {
    /// CONNECT to the intercepted registry, then TLS trusting pullcache's CA.
    async fn intercepted(&self) -> anyhow::Result<TlsStream<TcpStream>> {
        let mut stream = TcpStream::connect(self.pullcache.addr).await?;
        let target = format!("{REGISTRY}:443");
        stream
            .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await?;
        let head = read_head(&mut stream).await?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "CONNECT answered {head}");
        let ca = self.dir.path().join("ca").join(pullcache::ca::CERT_FILE);
        let connector = support::tls::connector_trusting(&ca)?;
        Ok(connector.connect(REGISTRY.try_into()?, stream).await?)
    }
}

/// Reads up to the end of a response's headers, one byte at a time (nothing past them).
async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> anyhow::Result<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await??;
        anyhow::ensure!(n == 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    Ok(String::from_utf8(head)?)
}

/// A keep-alive GET on an open stream; its status and body.
async fn get<S>(stream: &mut S, path: &str) -> anyhow::Result<(u16, Vec<u8>)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {REGISTRY}\r\n\r\n").as_bytes())
        .await?;
    let head = read_head(stream).await?;
    let status = head.split_whitespace().nth(1).unwrap_or_default().parse()?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .ok_or_else(|| anyhow::anyhow!("no content-length in {head}"))?
        .parse()?;
    let mut body = vec![0; length];
    tokio::time::timeout(Duration::from_secs(20), stream.read_exact(&mut body)).await??;
    Ok((status, body))
}

/// True when a plain connection to `addr` is served a `/v2/` ping.
async fn plain_served(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    matches!(get(&mut stream, "/v2/").await, Ok((200, _)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intercepted_connections_count_against_the_cap() -> anyhow::Result<()> {
    let s = setup(2).await?;
    let mut first = s.intercepted().await?;
    let mut second = s.intercepted().await?;
    for tls in [&mut first, &mut second] {
        assert_eq!(get(tls, "/v2/").await?.0, 200);
    }
    assert!(
        !plain_served(s.pullcache.addr).await,
        "a third connection was served past a cap of 2 held by intercepted connections"
    );
    // Closing an intercepted connection frees its slot.
    drop(first);
    support::eventually(Duration::from_secs(5), "the freed slot to serve", || async {
        plain_served(s.pullcache.addr).await
    })
    .await?;
    assert_eq!(get(&mut second, "/v2/").await?.0, 200, "a held connection was dropped");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_intercepted_connections() -> anyhow::Result<()> {
    let mut s = setup(16).await?;
    let blob = random_bytes(64 * 1024);
    let digest = sha256_digest(&blob);
    let slow = Reply::ok(blob.clone(), &[]).slowly(16, Duration::from_millis(100));
    s.upstream.set(&format!("/v2/team/app/blobs/{digest}"), slow);

    let mut idle = s.intercepted().await?;
    assert_eq!(get(&mut idle, "/v2/").await?.0, 200);
    let mut busy = s.intercepted().await?;
    let path = format!("/v2/team/app/blobs/{digest}");
    let download = tokio::spawn(async move {
        let got = get(&mut busy, &path).await;
        (got, tokio::time::Instant::now())
    });
    // Stop once the request is in flight upstream, with the whole slow body (1.5 s) to go.
    let upstream_path = format!("/v2/team/app/blobs/{digest}");
    support::eventually(
        Duration::from_secs(10),
        "the download to reach the upstream",
        || async { s.upstream.hits(&upstream_path) == 1 },
    )
    .await?;
    let stopping = tokio::time::Instant::now();
    s.pullcache.stop().await?;
    let stopped = tokio::time::Instant::now();

    let (got, finished) = download.await?;
    let (status, body) = got?;
    assert_eq!(status, 200);
    assert!(body == blob, "the body in flight was cut or changed by the shutdown");
    // The upstream needs about 1.5 s more for the body; the server must wait for it. (The
    // client reads the last bytes a moment after the server wrote them.)
    assert!(
        stopped - stopping >= Duration::from_millis(800) && finished < stopped + Duration::from_millis(500),
        "the server stopped after {:?}, {:?} before a request on an intercepted connection finished",
        stopped - stopping,
        finished.saturating_duration_since(stopped)
    );
    // The idle intercepted connection was closed, not left serving after the shutdown.
    let mut byte = [0];
    let read = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "an idle intercepted connection outlived the shutdown: {read:?}"
    );
    Ok(())
}

/// A client that CONNECTs to an intercepted host and then goes quiet (no TLS handshake, or no
/// request after it) holds its place only for the header-read timeout, like any client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_intercepted_connection_gives_its_place_back() -> anyhow::Result<()> {
    let timeout = Duration::from_millis(300);
    let dir = tempfile::tempdir()?;
    let mut config = support::pullcache::config(dir.path().join("cache"));
    config.limits.max_connections = 1;
    config.limits.header_read_timeout = timeout;
    config.intercept = Some(InterceptSettings {
        ca_dir: dir.path().join("ca"),
        tunnel_allow: Vec::new(),
        registries: vec![Registry::parse(REGISTRY)?],
    });
    let pullcache = Pullcache::start_with(config).await?;
    let s = Setup {
        dir,
        upstream: FaultUpstream::start().await?,
        pullcache,
    };

    // No handshake after the CONNECT.
    let mut silent = TcpStream::connect(s.pullcache.addr).await?;
    let target = format!("{REGISTRY}:443");
    silent
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    assert!(read_head(&mut silent).await?.starts_with("HTTP/1.1 200"));
    assert!(
        !plain_served(s.pullcache.addr).await,
        "the quiet connection holds the only place"
    );
    wait_until_served(s.pullcache.addr, timeout).await?;

    // A handshake, then no request (once the probe's connection has given its place back).
    let _quiet = support::eventually(timeout * 20, "an intercepted connection", || async {
        s.intercepted().await.ok()
    })
    .await?;
    assert!(
        !plain_served(s.pullcache.addr).await,
        "the quiet connection holds the only place"
    );
    wait_until_served(s.pullcache.addr, timeout).await
}

/// Polls until a plain connection is served again, for at most 20 header-read timeouts.
async fn wait_until_served(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    support::eventually(timeout * 20, "the quiet connection to give its place back", || {
        plain_served(addr)
    })
    .await
}
