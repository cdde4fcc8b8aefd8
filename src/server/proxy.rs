//! The proxy side of the listener, in intercept mode: CONNECT and absolute-form requests,
//! answered with [`Intercept`]'s decisions. A CONNECT hands its connection's [`Slot`] on to the
//! upgraded connection, so intercepted and tunnelled connections count against
//! `--max-connections` and drain on shutdown like any other.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use super::AppSlot;
use super::response::{self, Body};
use super::routes;
use super::sendfile::Spans;
use crate::error::{Error, RequestError};
use crate::fetch::Asker;
use crate::intercept::{self, Decision, Intercept, tunnel};
use crate::listener::{Conn, Handoff};
use crate::oci::Registry;
use crate::sync::MutexExt;
use crate::upstream::Upstreams;

/// The largest request body passed on to an intercepted registry (token forms are small).
const MAX_FORWARDED_BODY: usize = 64 * 1024;

/// A client connection's place in the server (its permit under `--max-connections` and its
/// watch in the graceful shutdown), for the connection it may turn into with CONNECT.
pub(super) struct Slot(Mutex<Option<Handoff>>);

impl Slot {
    pub(super) fn new(handoff: Handoff) -> Slot {
        Slot(Mutex::new(Some(handoff)))
    }

    /// The place of the connection a CONNECT upgrades to; a connection upgrades once.
    fn take(&self) -> Option<Handoff> {
        self.0.locked().take()
    }
}

/// Answers a proxy request: a CONNECT, or an absolute-form request for an intercepted host.
pub(super) async fn proxy_request(
    req: Request<Incoming>,
    app: Arc<AppSlot>,
    intercept: Option<Arc<Intercept>>,
    slot: Option<&Arc<Slot>>,
    spans: Option<&Spans>,
) -> Response<Body> {
    let (Some(intercept), Some(slot)) = (intercept, slot) else {
        return refused("proxy requests need intercept mode (--ca-dir)");
    };
    if req.method() == Method::CONNECT {
        return connect(req, &intercept, slot, app).await;
    }
    // Absolute-form (`GET http://host/...`): only intercepted hosts, served in place.
    let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
    match intercept.decide(&authority) {
        Decision::Intercept { registry, .. } => match app.get() {
            Some(app) => app.serve(req, Some(&registry), spans, Asker::Client).await.response,
            None => response::not_ready(req.method() == Method::HEAD),
        },
        Decision::Tunnel | Decision::Refuse(_) => refused(&format!("{authority} is not an intercepted registry")),
    }
}

/// Answers a CONNECT: 200 and then intercept or tunnel on the upgraded connection, or 403.
async fn connect(req: Request<Incoming>, intercept: &Intercept, slot: &Slot, app: Arc<AppSlot>) -> Response<Body> {
    let Some(authority) = req.uri().authority().map(|a| a.as_str().to_owned()) else {
        return refuse(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
    };
    let decision = intercept.decide(&authority);
    let Some(held) = slot.take() else {
        return refuse(StatusCode::BAD_REQUEST, "a connection upgrades once");
    };
    let on_upgrade = hyper::upgrade::on(req);
    match decision {
        Decision::Refuse(reason) => refuse(StatusCode::FORBIDDEN, &reason),
        Decision::Tunnel => {
            // Connected before the answer: a host that cannot be reached gets a 502 that says
            // so, not a 200 and then a closed connection.
            let server = match tunnel::connect(&authority).await {
                Ok(server) => server,
                Err(e) => {
                    tracing::warn!(target = authority, error = %e, "tunnel: cannot connect");
                    return refuse(StatusCode::BAD_GATEWAY, &format!("cannot reach {authority}: {e}"));
                }
            };
            tokio::spawn(async move {
                let ended = async {
                    let client = TokioIo::new(on_upgrade.await.map_err(std::io::Error::other)?);
                    tunnel::splice(client, server, held.stopping()).await
                };
                match ended.await {
                    Ok(ended) => tracing::debug!(target = authority, ?ended, "tunnel ended"),
                    Err(e) => tracing::debug!(target = authority, error = %e, "tunnel failed"),
                }
                drop(held);
            });
            established()
        }
        Decision::Intercept { registry, host } => {
            let leaf = match intercept.leaf(&host) {
                Ok(leaf) => leaf,
                Err(e) => {
                    tracing::error!(error = %e, "cannot make a certificate");
                    return refuse(StatusCode::INTERNAL_SERVER_ERROR, "cannot make a certificate");
                }
            };
            tokio::spawn(async move {
                let upgraded = match on_upgrade.await {
                    Ok(upgraded) => upgraded,
                    Err(e) => return tracing::debug!(error = %e, "CONNECT upgrade failed"),
                };
                let conn = held.into_conn();
                if let Some(tls) = conn.handshake(intercept::accept(leaf, TokioIo::new(upgraded))).await {
                    serve_intercepted(tls, registry, app, conn).await;
                }
            });
            established()
        }
    }
}

/// Serves the registry API on a decrypted intercepted connection, for `registry`, in the place
/// of the connection it came from.
async fn serve_intercepted<I>(io: I, registry: Registry, app: Arc<AppSlot>, conn: Conn)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let registry = Arc::new(registry);
    let service = service_fn(move |req| {
        let (app, registry) = (app.clone(), registry.clone());
        async move {
            let Some(app) = app.get() else {
                return Ok::<_, Infallible>(response::not_ready(req.method() == Method::HEAD));
            };
            // A push: the registry's own, streamed on with the client's credentials. Offline,
            // a blob's HEAD is the cache's to answer.
            let offline_head = app.sources.upstreams().is_offline() && req.method() == Method::HEAD;
            if routes::passes_through(req.method(), req.uri().path()) && !offline_head {
                if let Err(e) = routes::within_limit(req.uri()) {
                    return Ok(response::error(&e, req.method() == Method::HEAD));
                }
                return Ok(push(app.sources.upstreams(), &registry, req).await);
            }
            let route = routes::parse(req.method(), req.uri(), Some(&registry), &app.default_registry);
            Ok(match route {
                // Not a registry API call (a token endpoint, `/v2/auth`): the registry's own.
                Err(Error::Request(RequestError::NoRoute { .. })) => {
                    forward(app.sources.upstreams(), &registry, req).await
                }
                route => {
                    app.serve_route(req, route, Some(&registry), None, Asker::Client)
                        .await
                        .response
                }
            })
        }
    });
    conn.serve(io, service).await;
}

/// A request on an intercepted host that is not a registry API call (`/`, a token endpoint,
/// an OAuth2 `POST`): passed to the registry as the client sent it, credentials included
/// (they are the client's own, for that registry), and never cached. Bodies are small
/// forms; a larger one is refused.
async fn forward(upstreams: &Upstreams, registry: &Registry, req: Request<Incoming>) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_FORWARDED_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("requests passed to the registry carry at most {MAX_FORWARDED_BODY} bytes"),
            );
        }
    };
    match upstreams.forward(registry, parts, body).await {
        Ok(resp) => relay(resp),
        Err(e) => response::error(&e.into(), head),
    }
}

/// A push on an intercepted host (a blob upload, a manifest `PUT`, a `DELETE`, a blob's
/// `HEAD`; see [`routes::passes_through`]): passed to the registry as the client sent it, its
/// body streamed on, and the answer streamed back. Never cached; refused offline.
async fn push(upstreams: &Upstreams, registry: &Registry, req: Request<Incoming>) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    if upstreams.is_offline() {
        let refused = Error::Request(RequestError::Unsupported {
            operation: "pushing while offline",
        });
        return response::error(&refused, head);
    }
    let (parts, body) = req.into_parts();
    match upstreams.push(registry, parts, body).await {
        Ok(resp) => relay(resp),
        Err(e) => response::error(&e.into(), head),
    }
}

/// A registry's answer, as the client gets it: hop-by-hop headers dropped, the body streamed.
fn relay(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    for hop in [CONNECTION, TRANSFER_ENCODING, "keep-alive".parse().expect("valid name")] {
        parts.headers.remove(hop);
    }
    Response::from_parts(parts, body.map_err(std::io::Error::other).boxed_unsync())
}

fn established() -> Response<Body> {
    Response::new(response::empty())
}

fn refuse(status: StatusCode, reason: &str) -> Response<Body> {
    let mut resp = Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(response::full(Bytes::from(format!("pullcache: {reason}\n"))))
        .expect("refusal parts are valid");
    // Go clients (containerd, skopeo) print a refused CONNECT's reason phrase and not its
    // body, so the reason goes in the status line too.
    let phrase: String = format!("pullcache: {reason}")
        .chars()
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
        .take(200)
        .collect();
    if let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(phrase.into_bytes()) {
        resp.extensions_mut().insert(phrase);
    }
    resp
}

/// The answer to a proxy request that is not allowed.
fn refused(reason: &str) -> Response<Body> {
    refuse(StatusCode::FORBIDDEN, reason)
}
