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
    Port::new(Role::Admin, ADMIN_LIMITS)
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

    #[tokio::test]
    async fn the_admin_port_has_a_cap() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, registry(), Readiness::default(), Vec::new(), async {
            let _ = stopped.await;
        }));
        let healthz = |mut sender: hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>| async move {
            let req = Request::get("/healthz")
                .header("host", "admin")
                .body(http_body_util::Empty::new())
                .unwrap();
            let ok = matches!(sender.send_request(req).await, Ok(resp) if resp.status() == StatusCode::OK);
            (ok, sender)
        };
        let connect = || async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            sender
        };
        let mut held = Vec::new();
        for _ in 0..ADMIN_LIMITS.max_connections {
            let (ok, sender) = healthz(connect().await).await;
            assert!(ok, "a connection under the cap was refused");
            held.push(sender);
        }
        let (ok, _) = healthz(connect().await).await;
        assert!(!ok, "a connection over the cap was served");
    }
}
