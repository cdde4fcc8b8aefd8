//! HTTP plumbing that every layer shares and no layer owns: the boxed error of the libraries
//! underneath and its printed chain, status classes for metric labels, the registry's digest
//! header, and the one way pullcache sends a request out of the node (a pooled client whose
//! response headers must come within a deadline), to a registry and to a peer alike.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::rt::TokioExecutor;
use tower_service::Service;

/// The source of errors from outside pullcache (hyper, I/O).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `Docker-Content-Digest`, the registry's name for what it served.
pub const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// An error's message followed by its sources, for errors whose `Display` hides the cause
/// (hyper-util's is just "client error (Connect)").
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `2xx` .. `5xx`, a closed set for labels.
pub fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The `Content-Length` of a response, when it sent a valid one.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A pooled client over TLS (and plain HTTP where allowed), resolving names with `R`, sending
/// bodies of type `B`: whole ones, or a client's own streamed on ([`Incoming`]).
pub type Client<R = hyper_util::client::legacy::connect::dns::GaiResolver, B = Full<Bytes>> =
    hyper_util::client::legacy::Client<HttpsConnector<HttpConnector<R>>, B>;

/// How a [`Client`] connects; what differs between a registry and a peer.
pub struct ClientOptions {
    pub tls: rustls::ClientConfig,
    /// Giving up on a TCP connect after this long.
    pub connect_timeout: Duration,
    /// `http://` URLs too (a registry mapped to a plain-HTTP URL); peers speak only TLS.
    pub plain_http: bool,
    /// HTTP/2 by ALPN, where the server offers it.
    pub http2: bool,
}

/// A client built from `options`, resolving names with `resolver`.
pub fn client<R, B>(resolver: R, options: ClientOptions) -> Client<R, B>
where
    R: Service<Name> + Clone + Send + Sync + 'static,
    HttpsConnector<HttpConnector<R>>: Connect + Clone + Send + Sync + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new_with_resolver(resolver);
    http.enforce_http(false);
    http.set_connect_timeout(Some(options.connect_timeout));
    http.set_nodelay(true);
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(options.tls);
    let builder = if options.plain_http {
        builder.https_or_http()
    } else {
        builder.https_only()
    };
    let https = if options.http2 {
        builder.enable_http1().enable_http2().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(https)
}

/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("no response headers within {0:?}")]
    Timeout(Duration),
    #[error("request failed")]
    Client(#[source] hyper_util::client::legacy::Error),
}

/// Sends `request`, giving up when the response headers take longer than `header_timeout`.
pub async fn send<C, B>(
    client: &hyper_util::client::legacy::Client<C, B>,
    request: Request<B>,
    header_timeout: Duration,
) -> Result<Response<Incoming>, SendError>
where
    C: Connect + Clone + Send + Sync + 'static,
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    match tokio::time::timeout(header_timeout, client.request(request)).await {
        Err(_) => Err(SendError::Timeout(header_timeout)),
        Ok(Err(e)) => Err(SendError::Client(e)),
        Ok(Ok(resp)) => Ok(resp),
    }
}
