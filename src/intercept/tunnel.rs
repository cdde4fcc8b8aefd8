//! Tunnels: bytes copied untouched between a client and a host on the tunnel allow-list,
//! connecting only to addresses an upstream may have. A tunnel that moves no byte for
//! [`IDLE`] is closed, and once the server stops, one that moves none for [`DRAIN_IDLE`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

const TUNNEL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A tunnel with no byte either way for this long is closed (Go clients keep idle connections
/// for 90 s).
pub const IDLE: Duration = Duration::from_secs(120);
/// While the server drains, a tunnel with no byte for this long is closed.
pub const DRAIN_IDLE: Duration = Duration::from_secs(1);

/// Connects to `authority` (`host:port`) at an address that is neither loopback, link-local
/// nor metadata.
/// The lookup and the connection share one deadline.
pub async fn connect(authority: &str) -> std::io::Result<TcpStream> {
    let connecting = async {
        let addrs: Vec<_> = tokio::net::lookup_host(authority)
            .await?
            .filter(|a| may_reach(a.ip()))
            .collect();
        if addrs.is_empty() {
            return Err(std::io::Error::other(format!(
                "{authority} has no address a tunnel may reach"
            )));
        }
        TcpStream::connect(&addrs[..]).await
    };
    tokio::time::timeout(TUNNEL_CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| std::io::Error::other(format!("connecting to {authority} timed out")))?
}

/// Whether a tunnel may connect to `ip`: not loopback (`::ffff:127.0.0.1` included), and
/// nothing an upstream may not reach.
fn may_reach(ip: std::net::IpAddr) -> bool {
    !ip.to_canonical().is_loopback() && !crate::upstream::is_forbidden(ip)
}

/// How a splice ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// One side closed; the bytes each way.
    Closed(u64, u64),
    /// No byte moved for the idle limit.
    Idle,
}

/// Copies both ways until one side closes, or no byte moves for [`IDLE`] ([`DRAIN_IDLE`] once
/// `stopping` is true).
pub async fn splice<A, B>(client: A, server: B, mut stopping: watch::Receiver<bool>) -> std::io::Result<Ended>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Active::new(client, started, last.clone());
    let mut server = Active::new(server, started, last.clone());
    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
    tokio::pin!(copy);
    loop {
        let limit = if *stopping.borrow() { DRAIN_IDLE } else { IDLE };
        let deadline = started + Duration::from_millis(last.load(Ordering::Relaxed)) + limit;
        if Instant::now() >= deadline {
            return Ok(Ended::Idle);
        }
        tokio::select! {
            result = &mut copy => return result.map(|(up, down)| Ended::Closed(up, down)),
            () = tokio::time::sleep_until(deadline) => {}
            changed = stopping.changed(), if !*stopping.borrow() => {
                if changed.is_err() {
                    // The sender is gone: the server stopped.
                    stopping = watch::channel(true).1;
                }
            }
        }
    }
}

/// A stream that records when it last moved a byte, in milliseconds since `started`.
struct Active<S> {
    inner: S,
    started: Instant,
    last: Arc<AtomicU64>,
}

impl<S> Active<S> {
    fn new(inner: S, started: Instant, last: Arc<AtomicU64>) -> Self {
        Active { inner, started, last }
    }

    fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last.fetch_max(now, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Active<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Active<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A tunnel whose bytes stop moving is closed after `IDLE`; bytes keep it open.
    #[tokio::test(start_paused = true)]
    async fn idle_tunnels_are_closed() {
        let (client, mut client_end) = tokio::io::duplex(1024);
        let (server, mut server_end) = tokio::io::duplex(1024);
        let (_stop, stopping) = watch::channel(false);
        let started = Instant::now();
        let splice = tokio::spawn(splice(client, server, stopping));
        // Active for a while: one byte every 100 s, each keeping the tunnel open.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(100)).await;
            client_end.write_all(b"x").await.unwrap();
            let mut byte = [0];
            server_end.read_exact(&mut byte).await.unwrap();
        }
        assert_eq!(splice.await.unwrap().unwrap(), Ended::Idle);
        assert_eq!(started.elapsed(), Duration::from_secs(300) + IDLE);
    }

    /// Once the server stops, a tunnel closes after `DRAIN_IDLE` without bytes, while one that
    /// is moving bytes goes on. (One idle at the stop closes at once.)
    #[tokio::test(start_paused = true)]
    async fn stopping_closes_tunnels_once_they_pause() {
        let (client, mut client_end) = tokio::io::duplex(1024);
        let (server, mut server_end) = tokio::io::duplex(1024);
        let (stop, stopping) = watch::channel(false);
        let splice = tokio::spawn(splice(client, server, stopping));
        tokio::time::sleep(Duration::from_secs(10)).await;
        server_end.write_all(b"y").await.unwrap();
        client_end.read_exact(&mut [0]).await.unwrap();
        stop.send(true).unwrap();
        let stopped = Instant::now();
        for _ in 0..5 {
            tokio::time::sleep(DRAIN_IDLE / 2).await;
            server_end.write_all(b"y").await.unwrap();
            let mut byte = [0];
            client_end.read_exact(&mut byte).await.unwrap();
        }
        assert!(!splice.is_finished(), "a tunnel moving bytes was cut while draining");
        assert_eq!(splice.await.unwrap().unwrap(), Ended::Idle);
        assert_eq!(stopped.elapsed(), DRAIN_IDLE / 2 * 5 + DRAIN_IDLE);
    }

    #[test]
    fn loopback_in_any_form_and_metadata_are_out_of_reach() {
        for ip in [
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "169.254.169.254",
            "::ffff:169.254.169.254",
        ] {
            assert!(!may_reach(ip.parse().unwrap()), "{ip}");
        }
        assert!(may_reach("203.0.113.7".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_closed_side_ends_the_tunnel() {
        let (client, mut client_end) = tokio::io::duplex(1024);
        let (server, mut server_end) = tokio::io::duplex(1024);
        let (_stop, stopping) = watch::channel(false);
        let splice = tokio::spawn(splice(client, server, stopping));
        client_end.write_all(b"hello").await.unwrap();
        let mut got = [0; 5];
        server_end.read_exact(&mut got).await.unwrap();
        drop(client_end);
        drop(server_end);
        assert_eq!(splice.await.unwrap().unwrap(), Ended::Closed(5, 0));
    }
}
