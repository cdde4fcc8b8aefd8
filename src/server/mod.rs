//! The HTTP server: the accept loop (connection cap, header-read timeout, backoff on accept
//! errors, graceful shutdown) and the dispatch of each request to its route's handler.

pub mod access;
mod blobs;
mod manifests;
pub mod peer;
mod proxy;
pub mod range;
pub mod response;
pub mod routes;
mod sendfile;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::authorize::{Authorizer, Object, Via};
use crate::fetch::{Asker, CacheResult, Resource};
use crate::flight::Flights;
use crate::intercept::Intercept;
use crate::manifests::Manifests;
use crate::oci::{Reference, Registry};
use crate::sources::Sources;
use proxy::Slot;
use response::Body;
use routes::Route;
use sendfile::{SendfileStream, Spans};

/// Bytes of request line and headers a connection may buffer; past it hyper answers 431.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Header fields in one request; past it hyper answers 431.
const MAX_HEADERS: usize = 64;

/// Limits on what clients may hold of the server.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections served at once; more are closed on accept, so containerd moves on to
    /// its next host at once.
    pub max_connections: usize,
    /// A client must send its request headers within this long (slowloris).
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
/// How long in-flight requests get to finish after a shutdown signal.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Everything a request handler needs.
pub struct App {
    pub authorize: Authorizer,
    pub flights: Flights,
    pub manifests: Manifests,
    pub sources: Arc<Sources>,
    pub metrics: Arc<access::Metrics>,
}

/// The app, once the store is open. Until then every request gets a 503, which sends
/// containerd straight on to its next host.
pub type AppSlot = std::sync::OnceLock<App>;

/// A handler's response and how the cache answered it (none for a ping or an error), for
/// the access log.
pub struct Outcome {
    response: Response<Body>,
    cache: Option<CacheResult>,
}

impl Outcome {
    fn new(response: Response<Body>, cache: impl Into<Option<CacheResult>>) -> Outcome {
        Outcome {
            response,
            cache: cache.into(),
        }
    }
}

impl App {
    /// Answers a request; `host` is the registry of an intercepted connection, `spans` the
    /// `sendfile` queue of a plain HTTP/1 connection, and `asker` whether a client or a peer
    /// asks.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        host: Option<&Registry>,
        spans: Option<&Spans>,
        asker: Asker,
    ) -> Response<Body> {
        self.answer(req, host, spans, asker).await.0
    }

    /// [`App::handle`], also saying how the cache answered.
    pub(crate) async fn answer(
        &self,
        req: Request<Incoming>,
        host: Option<&Registry>,
        spans: Option<&Spans>,
        asker: Asker,
    ) -> (Response<Body>, Option<CacheResult>) {
        let started = Instant::now();
        let head = req.method() == Method::HEAD;
        let route = routes::parse(req.method(), req.uri(), host);
        let outcome = match &route {
            Ok(route) => self
                .dispatch(route, head, req.headers(), host.is_some(), spans, asker)
                .await
                .unwrap_or_else(|e| Outcome::new(response::error(&e, head), None)),
            Err(e) => Outcome::new(response::error(e, head), None),
        };
        let (registry, repo) = match &route {
            Ok(Route::Manifest { target, .. } | Route::Blob { target, .. }) => {
                (target.registry.to_string(), target.repository.to_string())
            }
            _ => (String::new(), String::new()),
        };
        let access = access::Access {
            metrics: self.metrics.clone(),
            method: match *req.method() {
                Method::GET => "GET",
                Method::HEAD => "HEAD",
                _ => "other",
            },
            path: req.uri().path().chars().take(300).collect(),
            registry,
            repo,
            route: route.as_ref().map_or("other", Route::kind),
            status: outcome.response.status(),
            cache: outcome.cache,
            started,
            bytes: 0,
        };
        (outcome.response.map(|body| access.wrap(body)), outcome.cache)
    }

    async fn dispatch(
        &self,
        route: &Route,
        head: bool,
        headers: &http::HeaderMap,
        intercepted: bool,
        spans: Option<&Spans>,
        asker: Asker,
    ) -> crate::error::Result<Outcome> {
        // A client may read it, before any byte (peers check their own clients).
        if asker == Asker::Client {
            let object = match route {
                Route::Manifest {
                    target,
                    reference: Reference::Tag(tag),
                } => Some((target, Object::Tag(tag))),
                Route::Manifest {
                    target,
                    reference: Reference::Digest(digest),
                } => Some((target, Object::Digest(Resource::Manifest, digest))),
                Route::Blob { target, digest } => Some((target, Object::Digest(Resource::Blob, digest))),
                Route::Ping => None,
            };
            if let Some((target, object)) = object {
                let via = if intercepted { Via::Intercept } else { Via::Mirror };
                self.authorize
                    .check(
                        &target.registry,
                        &target.repository,
                        object,
                        via,
                        headers.get(AUTHORIZATION),
                    )
                    .await?;
            }
        }
        match route {
            Route::Ping => Ok(Outcome::new(
                Response::builder()
                    .header(CONTENT_TYPE, "application/json")
                    .header("docker-distribution-api-version", "registry/2.0")
                    .body(response::full(bytes::Bytes::from_static(b"{}")))
                    .expect("ping response parts are valid"),
                None,
            )),
            Route::Manifest { target, reference } => {
                manifests::serve(self, head, headers, target, reference, asker).await
            }
            Route::Blob { target, digest } => blobs::serve(self, head, headers, target, digest, spans, asker).await,
        }
    }
}

/// A request on the listener: a proxy request (CONNECT or absolute-form) goes to [`proxy`],
/// anything else is a mirror-mode registry request. `spans` is the connection's `sendfile`
/// queue, used only by HTTP/1 responses; `slot` is the connection's, for what a CONNECT
/// upgrades it to.
async fn answer(
    req: Request<Incoming>,
    app: Arc<AppSlot>,
    intercept: Option<Arc<Intercept>>,
    slot: Option<&Arc<Slot>>,
    limits: ConnectionLimits,
    spans: Spans,
) -> Response<Body> {
    let http1 = req.version() <= Version::HTTP_11;
    let spans = http1.then_some(&spans);
    // Every h2 request carries a scheme and authority; only HTTP/1's absolute form is a proxy's.
    let proxy = req.method() == Method::CONNECT || (http1 && req.uri().scheme().is_some());
    if proxy {
        return proxy::answer(req, app, intercept, slot, limits, spans).await;
    }
    match app.get() {
        Some(app) => app.handle(req, None, spans, Asker::Client).await,
        None => response::not_ready(req.method() == Method::HEAD),
    }
}

/// The HTTP/1.1 + h2 connection builder, with the header limits and read timeout.
fn builder(limits: ConnectionLimits) -> auto::Builder<TokioExecutor> {
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

/// Serves `app` on `listener` until `shutdown` resolves, then lets open requests finish for a
/// bounded grace period.
pub async fn serve(
    listener: TcpListener,
    app: Arc<AppSlot>,
    intercept: Option<Arc<Intercept>>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let builder = builder(limits);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Tunnels, which are no HTTP connections, close once idle when this turns true.
    let (stopping_tx, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = limits.max_connections, "connection limit reached; closing");
            continue;
        };
        // An upgraded (intercepted or tunnelled) connection keeps the permit after this one ends.
        let permit = Arc::new(permit);
        let slot = intercept
            .is_some()
            .then(|| Arc::new(Slot::new(permit.clone(), graceful.watcher(), stopping.clone())));
        let _ = stream.set_nodelay(true);
        let (stream, spans) = SendfileStream::new(stream);
        let service = {
            let (app, intercept) = (app.clone(), intercept.clone());
            service_fn(move |req| {
                let (app, intercept, slot, spans) = (app.clone(), intercept.clone(), slot.clone(), spans.clone());
                async move { Ok::<_, Infallible>(answer(req, app, intercept, slot.as_ref(), limits, spans).await) }
            })
        };
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    let _ = stopping_tx.send(true);
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "shutdown grace period over; dropping open connections");
        }
    }
}
