//! The admin listener: `/metrics` (Prometheus text format, from the one [`Registry`] every
//! component registered its metrics on), `/healthz` (the process answers) and `/readyz` (the
//! store is open and its index loaded). It is separate from the registry API so that probes
//! and scrapes never queue behind image pulls.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use prometheus::{Encoder, IntGauge, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;

use crate::listener::{ConnectionLimits, Port, Role};

/// Whether the cache can serve: set once the store is open.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Work to do right before a scrape, for gauges read from elsewhere (disk usage, the
/// upstream's rate-limit headers).
pub type Refresh = Box<dyn Fn() + Send + Sync>;

/// A new registry holding `pullcache_build_info`.
pub fn registry() -> Registry {
    let registry = Registry::new();
    let info = IntGauge::with_opts(
        Opts::new("pullcache_build_info", "Build information; always 1.")
            .const_label("version", env!("CARGO_PKG_VERSION")),
    )
    .expect("build_info options are valid");
    info.set(1);
    registry
        .register(Box::new(info))
        .expect("a new registry has no build_info yet");
    registry
}

/// What scrapes and probes may hold of the admin port: a few connections, each quick.
pub const ADMIN_LIMITS: ConnectionLimits = ConnectionLimits {
    max_connections: 64,
    header_read_timeout: Duration::from_secs(5),
};
/// The admin connections one address may hold: a pod that opens many cannot take the places
/// of the kubelet's probes and the scraper, which come from other addresses.
pub const ADMIN_PER_REMOTE: usize = 16;

/// Serves the admin endpoints until `shutdown` resolves, then lets open requests finish for a
/// bounded grace period.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    readiness: Readiness,
    refresh: Vec<Refresh>,
    shutdown: impl Future<Output = ()>,
) {
    let state = Arc::new((registry, readiness, refresh));
    // HTTP/1.1 only: probes and scrapes speak it, and its header-read timer closes a
    // connection that idles between requests (h2 has none), so idle connections give their
    // places back.
    Port::new(Role::Admin, ADMIN_LIMITS)
        .with_per_remote(ADMIN_PER_REMOTE)
        .http1_only()
        .serve(listener, shutdown, move |stream, conn| {
            let state = state.clone();
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(admin_request(&req, &state.0, &state.1, &state.2)) }
            });
            conn.serve(stream, service)
        })
        .await;
}

fn admin_request(
    req: &Request<Incoming>,
    registry: &Registry,
    readiness: &Readiness,
    refresh: &[Refresh],
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("static response parts are valid")
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if readiness.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "store not ready\n"),
        "/metrics" => {
            for hook in refresh {
                hook();
            }
            let encoder = TextEncoder::new();
            let mut body = Vec::new();
            if let Err(e) = encoder.encode(&registry.gather(), &mut body) {
                tracing::error!(error = %e, "encoding metrics failed");
                return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed\n");
            }
            Response::builder()
                .header(CONTENT_TYPE, encoder.format_type())
                .body(Full::new(Bytes::from(body)))
                .expect("metrics response parts are valid")
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics, /healthz or /readyz\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;

    #[tokio::test]
    async fn readiness_and_health() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let readiness = Readiness::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, registry(), readiness.clone(), Vec::new(), async {
            let _ = rx.await;
        }));
        let get = |path: &'static str| async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = Request::get(path)
                .header("host", "admin")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            let status = resp.status();
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            (status, String::from_utf8(body.to_vec()).unwrap())
        };
        assert_eq!(get("/healthz").await.0, StatusCode::OK);
        assert_eq!(get("/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        readiness.set_ready();
        assert_eq!(get("/readyz").await.0, StatusCode::OK);
        let (status, body) = get("/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("pullcache_build_info{version=\""), "{body}");
        assert_eq!(get("/other").await.0, StatusCode::NOT_FOUND);
        tx.send(()).unwrap();
        server.await.unwrap();
    }

    type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>;

    /// An admin port, ready, until the returned sender is dropped.
    async fn admin() -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let readiness = Readiness::default();
        readiness.set_ready();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, registry(), readiness, Vec::new(), async {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    /// An HTTP/1 connection to `addr` from the loopback address `from`.
    async fn connect_from(from: &str, addr: std::net::SocketAddr) -> Sender {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    /// Whether `/readyz` answers 200 on the connection, which is kept.
    async fn ready(mut sender: Sender) -> (bool, Sender) {
        let req = Request::get("/readyz")
            .header("host", "admin")
            .body(http_body_util::Empty::new())
            .unwrap();
        let ok = matches!(sender.send_request(req).await, Ok(resp) if resp.status() == StatusCode::OK);
        (ok, sender)
    }

    #[tokio::test]
    async fn the_admin_port_has_a_cap_and_a_share_per_address() {
        let (addr, _stop) = admin().await;
        let mut held = Vec::new();
        let addresses = ADMIN_LIMITS.max_connections / ADMIN_PER_REMOTE;
        for i in 0..addresses {
            let from = format!("127.0.0.{}", i + 2);
            for _ in 0..ADMIN_PER_REMOTE {
                let (ok, sender) = ready(connect_from(&from, addr).await).await;
                assert!(ok, "a connection under the cap and its share was refused");
                held.push(sender);
            }
        }
        let (ok, _) = ready(connect_from("127.0.0.2", addr).await).await;
        assert!(!ok, "a connection over its address's share was served");
        let (ok, _) = ready(connect_from("127.0.0.250", addr).await).await;
        assert!(!ok, "a connection over the cap was served");
        drop(held);
    }

    /// A pod that opens all the connections it can, h2 or HTTP/1, and idles on them does not
    /// starve the kubelet's probe, which comes from another address.
    #[tokio::test]
    async fn one_address_cannot_starve_the_probes() {
        let (addr, _stop) = admin().await;
        let mut held = Vec::new();
        for _ in 0..ADMIN_LIMITS.max_connections {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            let stream = socket.connect(addr).await.unwrap();
            let h2 = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(stream));
            if let Ok((mut sender, conn)) = h2.await {
                tokio::spawn(conn);
                let req = Request::get("http://admin/healthz")
                    .body(http_body_util::Empty::<Bytes>::new())
                    .unwrap();
                assert!(sender.send_request(req).await.is_err(), "the admin port spoke h2");
            }
            let (_, sender) = ready(connect_from("127.0.0.2", addr).await).await;
            held.push(sender);
        }
        let (ok, _) = ready(connect_from("127.0.0.1", addr).await).await;
        assert!(ok, "the probe was starved by one address's connections");
        drop(held);
    }
}
