//! The one way pullcache accepts connections, for the client (registry API), peer and admin
//! ports alike. It owns what no port should do its own way, because three copies drift: the
//! accept loop and its backoff on accept errors (it never exits on one), the connection cap
//! (the extra connection is closed at once, with a rate-limited warning naming the port), the
//! hyper connection settings (HTTP/1.1 and h2, header limits, header-read timeout), the
//! deadline for a connection's first request, the per-connection error log, and the graceful
//! shutdown with its bounded grace period.
//!
//! A port plugs in only what differs, in the `accept` function it gives [`Port::serve`]: with
//! the accepted socket and its [`Conn`], it wraps the socket (TLS after a
//! [`Conn::handshake`], `sendfile`), builds its service and calls [`Conn::serve`], or
//! [`Conn::serve_with_upgrades`] when a request may take the connection over (CONNECT), whose
//! [`Handoff`] lets the connection it turns into keep its place under the cap and in the drain
//! (an intercepted CONNECT's connection is served as a [`Conn`] again, with the same deadlines).
//! A port may also bound what one remote address holds ([`Port::with_per_remote`]) and speak
//! HTTP/1.1 only ([`Port::http1_only`]), whose header timer also closes idle connections.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// Bytes of request line and headers a connection may buffer; past it hyper answers 431.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Header fields in one request; past it hyper answers 431.
const MAX_HEADERS: usize = 64;
/// How long open requests get to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The pause after a failed accept (out of file descriptors, mostly) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one "connection limit reached" warning per port this often.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(10);

use crate::sync::MutexExt;
use crate::wire::BoxError;

/// Limits on what clients may hold of a port.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections served at once; more are closed on accept, so containerd moves on to
    /// its next host at once.
    pub max_connections: usize,
    /// A client must send its request headers within this long (slowloris); a TLS handshake
    /// must finish within it too.
    pub header_read_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// Which port a listener serves, for its logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The registry API containerd talks to (and, in intercept mode, its HTTPS proxy).
    Client,
    /// The peer port of cluster mode.
    Peer,
    /// `/metrics`, `/healthz` and `/readyz`.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Client => "client",
            Role::Peer => "peer",
            Role::Admin => "admin",
        })
    }
}

/// A port's accept loop, before it runs.
#[derive(Debug, Clone, Copy)]
pub struct Port {
    role: Role,
    limits: ConnectionLimits,
    grace: Duration,
    /// The most connections one remote address may hold, when not all of them.
    per_remote: Option<usize>,
    /// HTTP/1.1 only: between requests, an idle connection is closed by the header-read
    /// timeout (h2 has no such timer).
    http1_only: bool,
}

impl Port {
    pub fn new(role: Role, limits: ConnectionLimits) -> Port {
        Port {
            role,
            limits,
            grace: SHUTDOWN_GRACE,
            per_remote: None,
            http1_only: false,
        }
    }

    /// The same port where one remote address holds at most `max` connections, so that one
    /// client cannot take every place.
    pub fn with_per_remote(self, max: usize) -> Port {
        Port {
            per_remote: Some(max),
            ..self
        }
    }

    /// The same port speaking HTTP/1.1 only, so that idle connections are closed.
    pub fn http1_only(self) -> Port {
        Port {
            http1_only: true,
            ..self
        }
    }

    /// The same port with another shutdown grace period than [`SHUTDOWN_GRACE`].
    pub fn with_grace(self, grace: Duration) -> Port {
        Port { grace, ..self }
    }

    /// Accepts connections on `listener` until `shutdown` resolves, handing each one under the
    /// cap to `accept` on a task of its own. Then it stops accepting and waits, for the grace
    /// period at most, for the open connections to finish their requests.
    pub async fn serve<A, F>(self, listener: TcpListener, shutdown: impl Future<Output = ()>, accept: A)
    where
        A: Fn(TcpStream, Conn) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let builder = match self.http1_only {
            true => builder(self.limits).http1_only(),
            false => builder(self.limits),
        };
        let builder = Arc::new(builder);
        let graceful = GracefulShutdown::new();
        let permits = Arc::new(Semaphore::new(self.limits.max_connections));
        let remotes: Remotes = Arc::default();
        // What is no HTTP connection (a tunnel) closes once idle when this turns true.
        let (stopping_tx, stopping) = watch::channel(false);
        let mut full = FullWarning::default();
        tokio::pin!(shutdown);
        loop {
            let (stream, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(role = %self.role, error = %e, "accept failed; backing off");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                full.closed(self.role, remote, self.limits.max_connections);
                continue;
            };
            let share = match self.per_remote {
                Some(max) => match RemoteShare::take(&remotes, remote.ip(), max) {
                    Some(share) => Some(share),
                    None => {
                        full.closed(self.role, remote, max);
                        continue;
                    }
                },
                None => None,
            };
            let _ = stream.set_nodelay(true);
            let conn = Conn {
                role: self.role,
                remote,
                limits: self.limits,
                builder: builder.clone(),
                permit: Arc::new(Place {
                    _permit: permit,
                    _share: share,
                }),
                watcher: graceful.watcher(),
                handoff: Some(graceful.watcher()),
                stopping: stopping.clone(),
            };
            tokio::spawn(accept(stream, conn));
        }
        let _ = stopping_tx.send(true);
        drop(listener);
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(self.grace) => {
                let open = self.limits.max_connections - permits.available_permits();
                tracing::warn!(role = %self.role, grace = ?self.grace, open, "shutdown grace period over; dropping open connections");
            }
        }
    }
}

/// Connections held per remote address, on a port that bounds them.
type Remotes = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// One connection's count against its remote address; given back when dropped.
struct RemoteShare {
    remotes: Remotes,
    ip: IpAddr,
}

impl RemoteShare {
    /// A share for `ip`, unless it holds `max` already.
    fn take(remotes: &Remotes, ip: IpAddr, max: usize) -> Option<RemoteShare> {
        let mut held = remotes.locked();
        let count = held.entry(ip).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(RemoteShare {
            remotes: remotes.clone(),
            ip,
        })
    }
}

impl Drop for RemoteShare {
    fn drop(&mut self) {
        let mut held = self.remotes.locked();
        if let Some(count) = held.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// A connection's place under the cap (and its remote address's share), held by the
/// connection and by what it turns into until both have ended.
struct Place {
    _permit: OwnedSemaphorePermit,
    _share: Option<RemoteShare>,
}

/// The warning that a port is full, at most once per [`FULL_WARNING_EVERY`].
#[derive(Default)]
struct FullWarning {
    last: Option<Instant>,
    /// Connections closed since the last warning.
    closed: u64,
}

impl FullWarning {
    fn closed(&mut self, role: Role, remote: SocketAddr, limit: usize) {
        self.closed += 1;
        if self.last.is_some_and(|last| last.elapsed() < FULL_WARNING_EVERY) {
            return;
        }
        tracing::warn!(%role, %remote, limit, closed = self.closed, "connection limit reached; closing new connections");
        self.last = Some(Instant::now());
        self.closed = 0;
    }
}

/// An accepted connection's place in its port: its permit under the cap, its watch in the
/// graceful shutdown, and the port's connection settings. Serving the connection uses it up.
pub struct Conn {
    role: Role,
    remote: SocketAddr,
    limits: ConnectionLimits,
    builder: Arc<auto::Builder<TokioExecutor>>,
    permit: Arc<Place>,
    watcher: Watcher,
    /// The watch for what the connection may turn into; see [`Handoff`].
    handoff: Option<Watcher>,
    stopping: watch::Receiver<bool>,
}

/// The place under the cap and in the drain for what a connection turns into (an
/// intercepted or tunnelled CONNECT), held until that ends: the connection it will be served
/// as, with the same role, remote, limits and permit, watched by its own drain watcher.
pub struct Handoff(Conn);

impl Handoff {
    /// The connection the upgraded one becomes when it speaks HTTP again (an intercepted
    /// CONNECT, after its TLS handshake): served like any other, with the same handshake and
    /// first-request deadlines, in the same place under the cap and in the drain.
    pub fn into_conn(self) -> Conn {
        self.0
    }

    /// Turns true when the port stops accepting, for what has no graceful shutdown of its own
    /// (a tunnel).
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.0.stopping.clone()
    }
}

impl Conn {
    /// Runs a handshake (TLS) on the connection, for the header-read timeout at most; `None`
    /// (logged) when it fails or times out.
    pub async fn handshake<T, E: fmt::Display>(&self, handshake: impl Future<Output = Result<T, E>>) -> Option<T> {
        let (role, remote) = (self.role, self.remote);
        match tokio::time::timeout(self.limits.header_read_timeout, handshake).await {
            Ok(Ok(done)) => Some(done),
            Ok(Err(e)) => {
                tracing::warn!(%role, %remote, error = %e, "handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%role, %remote, "handshake timed out");
                None
            }
        }
    }

    /// Serves HTTP/1.1 or h2 on `io` with `service` until the connection ends.
    pub async fn serve<I, S, B>(self, io: I, service: S)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let (service, asked) = FirstRequest::wrap(service);
        let conn = self.builder.serve_connection(TokioIo::new(io), service).into_owned();
        self.drive(conn, asked).await;
    }

    /// [`Conn::serve`], letting a request take the connection over (CONNECT); the service,
    /// made by `service`, gets the [`Handoff`] for what the connection turns into.
    pub async fn serve_with_upgrades<I, S, B>(mut self, io: I, service: impl FnOnce(Handoff) -> S)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let handoff = Handoff(Conn {
            builder: self.builder.clone(),
            permit: self.permit.clone(),
            watcher: self.handoff.take().expect("a connection is served once"),
            handoff: None,
            stopping: self.stopping.clone(),
            ..self
        });
        let (service, asked) = FirstRequest::wrap(service(handoff));
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        self.drive(conn, asked).await;
    }

    /// Runs `conn`, watched by the graceful shutdown, and closes it if no request came within
    /// the header-read timeout: hyper's own timer runs only once an HTTP/1 request has begun,
    /// not while the connection sends nothing or only part of the h2 preface, nor for h2.
    async fn drive<C>(self, conn: C, asked: Arc<AtomicBool>)
    where
        C: GracefulConnection<Error = BoxError>,
    {
        let Conn {
            role,
            remote,
            limits,
            permit,
            watcher,
            ..
        } = self;
        let conn = watcher.watch(conn);
        tokio::pin!(conn);
        let ended = tokio::select! {
            ended = &mut conn => ended,
            () = tokio::time::sleep(limits.header_read_timeout) => {
                if !asked.load(Ordering::Acquire) {
                    tracing::debug!(%role, %remote, "no request within the header-read timeout; closing");
                    return;
                }
                conn.await
            }
        };
        if let Err(e) = ended {
            tracing::debug!(%role, %remote, error = %e, "connection ended with an error");
        }
        drop(permit);
    }
}

/// A service that notes that a request has come, for the first request's deadline.
struct FirstRequest<S> {
    inner: S,
    asked: Arc<AtomicBool>,
}

impl<S> FirstRequest<S> {
    fn wrap(inner: S) -> (FirstRequest<S>, Arc<AtomicBool>) {
        let asked = Arc::new(AtomicBool::new(false));
        (
            FirstRequest {
                inner,
                asked: asked.clone(),
            },
            asked,
        )
    }
}

impl<S: Service<R>, R> Service<R> for FirstRequest<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: R) -> S::Future {
        self.asked.store(true, Ordering::Release);
        self.inner.call(req)
    }
}

/// The HTTP/1.1 + h2 connection builder, with the header limits and read timeout.
pub fn builder(limits: ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Queue body buffers as they are: the `sendfile` placeholders rely on it.
        .writev(true)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    builder
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http::StatusCode;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::client::conn::http1::SendRequest;
    use hyper::service::service_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::{mpsc, oneshot};
    use tokio::task::JoinHandle;

    use super::*;

    /// How long `/slow` takes to answer.
    const SLOW: Duration = Duration::from_millis(600);
    /// The bound on waiting for what should happen; only a broken listener waits it out.
    const PATIENCE: Duration = Duration::from_secs(5);

    /// A port serving `/` (`ok`), `/slow` (after [`SLOW`]) and `/held` (once released).
    struct Server {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        served: JoinHandle<()>,
        /// A message for each `/held` request that has arrived.
        arrived: mpsc::UnboundedReceiver<()>,
        release: watch::Sender<bool>,
    }

    async fn start(port: Port) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let (arrived_tx, arrived) = mpsc::unbounded_channel();
        let (release, released) = watch::channel(false);
        let shutdown = async {
            let _ = stopped.await;
        };
        let served = tokio::spawn(port.serve(listener, shutdown, move |stream, conn| {
            let (arrived, released) = (arrived_tx.clone(), released.clone());
            conn.serve(
                stream,
                service_fn(move |req: Request<Incoming>| {
                    let (arrived, mut released) = (arrived.clone(), released.clone());
                    async move {
                        let body = match req.uri().path() {
                            "/held" => {
                                let _ = arrived.send(());
                                let _ = released.wait_for(|released| *released).await;
                                "released"
                            }
                            "/slow" => {
                                tokio::time::sleep(SLOW).await;
                                "slow"
                            }
                            _ => "ok",
                        };
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(body.as_bytes()))))
                    }
                }),
            )
        }));
        Server {
            addr,
            stop,
            served,
            arrived,
            release,
        }
    }

    fn limits(max_connections: usize, header_read_timeout: Duration) -> ConnectionLimits {
        ConnectionLimits {
            max_connections,
            header_read_timeout,
        }
    }

    /// A keep-alive HTTP/1 client connection.
    async fn connect(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    async fn get(sender: &mut SendRequest<Empty<Bytes>>, path: &str) -> hyper::Result<(StatusCode, Bytes)> {
        let req = Request::get(path).header("host", "test").body(Empty::new()).unwrap();
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        Ok((status, resp.into_body().collect().await?.to_bytes()))
    }

    /// What the server sent on `stream` until it closed it; `None` if it still held it open
    /// after [`PATIENCE`].
    async fn until_closed(stream: &mut TcpStream) -> Option<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0; 1024];
        let read = tokio::time::timeout(PATIENCE, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        read.await.ok().map(|()| got)
    }

    #[tokio::test]
    async fn the_cap_closes_the_extra_connection_and_a_freed_place_serves_again() {
        let server = start(Port::new(Role::Admin, limits(2, Duration::from_secs(10)))).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut sender = connect(server.addr).await;
            assert_eq!(get(&mut sender, "/").await.unwrap().0, StatusCode::OK);
            held.push(sender);
        }
        let mut over = TcpStream::connect(server.addr).await.unwrap();
        // The write may race the close; what matters is that no answer comes.
        let _ = over.write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n").await;
        let got = until_closed(&mut over)
            .await
            .expect("the connection over the cap was held open");
        assert!(
            got.is_empty(),
            "answered over the cap: {}",
            String::from_utf8_lossy(&got)
        );

        drop(held.pop());
        let deadline = Instant::now() + PATIENCE;
        loop {
            let mut sender = connect(server.addr).await;
            if get(&mut sender, "/").await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "the freed place never served");
            tokio::task::yield_now().await;
        }
        for sender in &mut held {
            assert_eq!(
                get(sender, "/").await.unwrap().0,
                StatusCode::OK,
                "a held connection was dropped"
            );
        }
    }

    #[tokio::test]
    async fn a_client_that_sends_no_request_is_dropped_after_the_header_timeout() {
        let timeout = Duration::from_millis(200);
        let server = start(Port::new(Role::Client, limits(16, timeout))).await;
        // Nothing at all, part of the h2 preface (hyper still sniffs the version), and part of
        // an HTTP/1 request (hyper's own timer).
        for sent in [&b""[..], b"PRI * HTTP/2", b"GET / HTTP/1.1\r\nhost: te"] {
            let mut slow = TcpStream::connect(server.addr).await.unwrap();
            let started = Instant::now();
            slow.write_all(sent).await.unwrap();
            let got = until_closed(&mut slow).await;
            assert!(got.is_some(), "{:?} held its connection", String::from_utf8_lossy(sent));
            assert!(
                started.elapsed() >= timeout - Duration::from_millis(50),
                "{:?} was cut off before the timeout",
                String::from_utf8_lossy(sent)
            );
        }
        // A request answered slower than the timeout is no slow client, nor is one that comes
        // after the timeout on a kept-alive connection.
        let mut sender = connect(server.addr).await;
        assert_eq!(
            get(&mut sender, "/slow").await.unwrap(),
            (StatusCode::OK, Bytes::from("slow"))
        );
        assert_eq!(get(&mut sender, "/").await.unwrap().0, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_handshake_that_never_finishes_is_dropped_after_the_header_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let port = Port::new(Role::Peer, limits(16, Duration::from_millis(100)));
        let (_stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        tokio::spawn(port.serve(listener, shutdown, |_stream, conn| async move {
            let never = std::future::pending::<Result<TcpStream, std::io::Error>>();
            assert!(conn.handshake(never).await.is_none());
        }));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        assert!(
            until_closed(&mut stream).await.is_some(),
            "the handshake held its connection"
        );
    }

    #[tokio::test]
    async fn shutdown_drains_an_open_request_then_stops() {
        let mut server = start(Port::new(Role::Client, limits(16, Duration::from_secs(10)))).await;
        let mut sender = connect(server.addr).await;
        let answer = tokio::spawn(async move { get(&mut sender, "/held").await });
        server.arrived.recv().await.unwrap();
        server.stop.send(()).unwrap();
        // Not accepting any more: polled, since the listener closes just after the signal.
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(server.addr).await.is_ok() {
            assert!(Instant::now() < deadline, "still accepting after shutdown");
            tokio::task::yield_now().await;
        }
        let early = tokio::time::timeout(Duration::from_millis(200), &mut server.served).await;
        assert!(early.is_err(), "stopped with a request open");
        server.release.send(true).unwrap();
        let answered = answer.await.unwrap().expect("the open request was cut off");
        assert_eq!(answered, (StatusCode::OK, Bytes::from("released")));
        tokio::time::timeout(PATIENCE, server.served)
            .await
            .expect("the drained server did not stop")
            .unwrap();
    }

    #[tokio::test]
    async fn shutdown_gives_up_on_open_requests_after_the_grace_period() {
        let grace = Duration::from_millis(200);
        let port = Port::new(Role::Client, limits(16, Duration::from_secs(10))).with_grace(grace);
        let mut server = start(port).await;
        let mut sender = connect(server.addr).await;
        let _answer = tokio::spawn(async move { get(&mut sender, "/held").await });
        server.arrived.recv().await.unwrap();
        let stopping = Instant::now();
        server.stop.send(()).unwrap();
        tokio::time::timeout(PATIENCE, server.served)
            .await
            .expect("the grace period never ended")
            .unwrap();
        assert!(stopping.elapsed() >= grace, "gave up before the grace period");
    }
}
