//! The HTTP server: the client port (on the shared [`crate::listener`], which owns the accept
//! loop, cap, timeouts and drain) and the dispatch of each request to its route's handler.

pub mod access;
mod blobs;
pub use blobs::{MAX_SPAN, MAX_SPANS};
mod listings;
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
use std::time::Instant;

use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::{TcpListener, TcpStream};

use crate::authorize::{Authorizer, Object, Via};
use crate::fetch::{Asker, CacheResult, Resource};
use crate::flight::Flights;
use crate::intercept::Intercept;
use crate::listener::{Conn, Port, Role};
use crate::manifests::Manifests;
use crate::oci::{Clearance, Reference, Registry};
use crate::peers::CLEARANCE_HEADER;
use crate::sources::Sources;
use proxy::Slot;
use response::Body;
use routes::Route;
use sendfile::{SendfileStream, Spans};

pub use crate::listener::ConnectionLimits;

/// Everything a request handler needs.
pub struct App {
    pub authorize: Authorizer,
    pub flights: Flights,
    pub manifests: Manifests,
    pub listings: crate::listings::Listings,
    /// The registry of a request that names none (`--default-registry`).
    pub default_registry: Registry,
    /// Turns for spans asked of registries on their own ([`blobs::MAX_SPANS`]).
    pub spans: Arc<tokio::sync::Semaphore>,
    pub sources: Arc<Sources>,
    pub metrics: Arc<access::Metrics>,
}

/// The app, once the store is open. Until then every request gets a 503, which sends
/// containerd straight on to its next host.
pub type AppSlot = std::sync::OnceLock<App>;

/// A handler's response and how the cache answered it (none for a ping or an error), for
/// the access log.
pub struct Outcome {
    pub response: Response<Body>,
    pub cache: Option<CacheResult>,
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
    /// Serves a registry API request, logged and counted; `host` is the registry of an
    /// intercepted connection, `spans` the `sendfile` queue of a plain HTTP/1 connection, and
    /// `asker` whether a client or a peer asks.
    pub async fn serve(
        &self,
        req: Request<Incoming>,
        host: Option<&Registry>,
        spans: Option<&Spans>,
        asker: Asker,
    ) -> Outcome {
        let route = routes::parse(req.method(), req.uri(), host, &self.default_registry);
        self.serve_route(req, route, host, spans, asker).await
    }

    /// [`App::serve`] for a request whose route the caller has parsed already.
    pub(crate) async fn serve_route(
        &self,
        req: Request<Incoming>,
        route: crate::error::Result<Route>,
        host: Option<&Registry>,
        spans: Option<&Spans>,
        asker: Asker,
    ) -> Outcome {
        let started = Instant::now();
        let head = req.method() == Method::HEAD;
        let outcome = match &route {
            Ok(route) => self
                .dispatch(route, head, req.headers(), host.is_some(), spans, asker)
                .await
                .unwrap_or_else(|e| Outcome::new(response::error(&e, head), None)),
            Err(e) => Outcome::new(response::error(e, head), None),
        };
        let (registry, repo) = match &route {
            Ok(Route::Manifest { target, .. } | Route::Blob { target, .. } | Route::Listing { target, .. }) => {
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
        Outcome {
            response: outcome.response.map(|body| access.wrap(body)),
            cache: outcome.cache,
        }
    }

    /// Serves a parsed route. What a client may be served is decided per request by its
    /// [`Access`](crate::authorize::Access): by where the content came from, checked against
    /// the location the client named (a peer's node checked its own client).
    async fn dispatch(
        &self,
        route: &Route,
        head: bool,
        headers: &http::HeaderMap,
        intercepted: bool,
        spans: Option<&Spans>,
        asker: Asker,
    ) -> crate::error::Result<Outcome> {
        let via = match asker {
            Asker::Peer => Via::Peer {
                clearance: headers
                    .get(CLEARANCE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(Clearance::parse),
            },
            Asker::Client if intercepted => Via::Intercept,
            Asker::Client => Via::Mirror,
        };
        let authorization = headers.get(AUTHORIZATION);
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
                let object = match reference {
                    Reference::Tag(tag) => Object::Tag(tag),
                    Reference::Digest(digest) => Object::Digest(Resource::Manifest, digest),
                };
                let access = self.authorize.access(target, object, via, authorization);
                manifests::serve(self, head, headers, &access, reference).await
            }
            Route::Blob { target, digest } => {
                let object = Object::Digest(Resource::Blob, digest);
                let access = self.authorize.access(target, object, via, authorization);
                blobs::serve(self, head, headers, &access, digest, spans).await
            }
            Route::Listing {
                target,
                listing,
                view,
                base,
            } => {
                let access = self.authorize.access(target, Object::Listing, via, authorization);
                listings::serve(self, head, &access, listing, view, base).await
            }
        }
    }
}

/// A request on the client port: a proxy request (CONNECT or absolute-form) goes to [`proxy`],
/// anything else is a mirror-mode registry request. `spans` is the connection's `sendfile`
/// queue, used only by HTTP/1 responses; `slot` is the connection's, for what a CONNECT
/// upgrades it to.
async fn client_request(
    req: Request<Incoming>,
    app: Arc<AppSlot>,
    intercept: Option<Arc<Intercept>>,
    slot: Option<&Arc<Slot>>,
    spans: Spans,
) -> Response<Body> {
    let http1 = req.version() <= Version::HTTP_11;
    let spans = http1.then_some(&spans);
    // Every h2 request carries a scheme and authority; only HTTP/1's absolute form is a proxy's.
    let proxy = req.method() == Method::CONNECT || (http1 && req.uri().scheme().is_some());
    if proxy {
        return proxy::proxy_request(req, app, intercept, slot, spans).await;
    }
    match app.get() {
        Some(app) => app.serve(req, None, spans, Asker::Client).await.response,
        None => response::not_ready(req.method() == Method::HEAD),
    }
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
    Port::new(Role::Client, limits)
        .serve(listener, shutdown, move |stream, conn| {
            connection(stream, conn, app.clone(), intercept.clone())
        })
        .await;
}

/// Serves a client connection: its HTTP/1 blob bodies go out with `sendfile`, and in intercept
/// mode a CONNECT hands its place on to the connection it upgrades to, through a [`Slot`].
async fn connection(stream: TcpStream, conn: Conn, app: Arc<AppSlot>, intercept: Option<Arc<Intercept>>) {
    let (stream, spans) = SendfileStream::new(stream);
    conn.serve_with_upgrades(stream, |handoff| {
        let slot = intercept.is_some().then(|| Arc::new(Slot::new(handoff)));
        service_fn(move |req| {
            let (app, intercept, slot, spans) = (app.clone(), intercept.clone(), slot.clone(), spans.clone());
            async move { Ok::<_, Infallible>(client_request(req, app, intercept, slot.as_ref(), spans).await) }
        })
    })
    .await;
}
