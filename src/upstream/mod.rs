//! The upstream client: which URL serves a registry, and one request to it with the
//! mechanics registries need: anonymous Bearer tokens, redirects to blob storage (dropping
//! `Authorization` off-host), and bounded retries with backoff on connect errors and 5xx.
//! TLS is always verified, against the Mozilla roots plus the system's.

mod auth;
mod resolve;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, LOCATION, RETRY_AFTER, USER_AGENT, WWW_AUTHENTICATE};
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::oci::{Registry, Repository};
use auth::{Challenge, TokenCache, TokenResponse};
use resolve::GuardedResolver;
pub use resolve::is_forbidden;

const DOCKER_HUB_URL: &str = "https://registry-1.docker.io";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an upstream may take to send response headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_ATTEMPTS: u32 = 3;
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const MAX_REDIRECTS: u32 = 5;
const MAX_TOKEN_RESPONSE: usize = 1024 * 1024;
const USER_AGENT_VALUE: &str = concat!("pullcache/", env!("CARGO_PKG_VERSION"));

type HttpClient = Client<HttpsConnector<HttpConnector<GuardedResolver>>, Empty<Bytes>>;

/// What an upstream request is for; it decides the path and how a 404 reads to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Manifest,
    Blob,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Manifest => "manifests",
            Resource::Blob => "blobs",
        })
    }
}

/// An upstream failure, with the registry it concerns.
#[derive(Debug, thiserror::Error)]
#[error("upstream {registry}: {kind}")]
pub struct UpstreamError {
    pub registry: Registry,
    pub kind: UpstreamErrorKind,
}

impl UpstreamError {
    pub fn new(registry: &Registry, kind: UpstreamErrorKind) -> Self {
        UpstreamError {
            registry: registry.clone(),
            kind,
        }
    }
}

/// The `Content-Length` of an upstream response, when it sent a valid one.
pub fn content_length(resp: &Response<Incoming>) -> Option<u64> {
    resp.headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamErrorKind {
    #[error("registry address is not allowed without an explicit --upstream mapping: {0}")]
    Forbidden(String),
    #[error("request failed: {0}")]
    Request(String),
    #[error("no response headers within {0:?}")]
    Timeout(Duration),
    #[error("answered {status} for {resource}")]
    Status {
        status: StatusCode,
        resource: Resource,
        retry_after: Option<HeaderValue>,
    },
    #[error("redirect: {0}")]
    Redirect(String),
    #[error("token: {0}")]
    Token(String),
    #[error("body: {0}")]
    Body(String),
    #[error("content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("manifest exceeds {limit} bytes")]
    TooLarge { limit: u64 },
}

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

/// Where each registry is fetched from, and the shared connection pool.
pub struct Upstreams {
    mapped: HashMap<Registry, Uri>,
    client: HttpClient,
    tokens: TokenCache,
}

impl Upstreams {
    /// `mapped` are the operator's `--upstream NAME=URL` entries; every other registry `host`
    /// is fetched from `https://host` (Docker Hub from `registry-1.docker.io`).
    pub fn new(mapped: HashMap<Registry, Uri>) -> Upstreams {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new_with_resolver(GuardedResolver);
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Upstreams {
            mapped,
            client,
            tokens: TokenCache::default(),
        }
    }

    /// The base URL for a registry, without a trailing slash.
    fn base(&self, registry: &Registry) -> Result<String, UpstreamError> {
        if let Some(uri) = self.mapped.get(registry) {
            return Ok(uri.to_string().trim_end_matches('/').to_owned());
        }
        if registry.is_docker_hub() {
            return Ok(DOCKER_HUB_URL.to_owned());
        }
        // An unmapped name comes from the client (`ns=`). It may not aim at this node or at
        // link-local space by IP; DNS names are checked when they resolve.
        if let Some(ip) = registry.ip()
            && (ip.is_loopback() || is_forbidden(ip))
        {
            return Err(UpstreamError::new(
                registry,
                UpstreamErrorKind::Forbidden(registry.to_string()),
            ));
        }
        Ok(format!("https://{registry}"))
    }

    /// Sends `method` for `/v2/<repository>/<resource>/<reference>` and returns a 2xx response,
    /// following redirects and token challenges. Anything else is an error.
    pub async fn fetch(
        &self,
        method: Method,
        registry: &Registry,
        repository: &Repository,
        resource: Resource,
        reference: &str,
        accept: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let err = |kind| UpstreamError::new(registry, kind);
        let base = self.base(registry)?;
        let origin: Uri = base
            .parse()
            .map_err(|e: http::uri::InvalidUri| err(UpstreamErrorKind::Request(e.to_string())))?;
        let origin_loopback = host_ip(&origin).is_some_and(|ip| ip.is_loopback());
        let mut uri: Uri = format!("{base}/v2/{repository}/{resource}/{reference}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| err(UpstreamErrorKind::Request(e.to_string())))?;
        let scope = format!("repository:{repository}:pull");
        let mut token = self.tokens.get(registry, &scope);
        let mut token_refreshed = false;
        let mut attempt = 0;
        let mut redirects = 0;
        loop {
            let on_origin = uri.authority() == origin.authority();
            let mut req = Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .header(USER_AGENT, USER_AGENT_VALUE);
            if let Some(accept) = accept {
                req = req.header(ACCEPT, accept.clone());
            }
            // Credentials go only to the registry itself, never to a redirect target.
            if on_origin && let Some(token) = &token {
                req = req.header(AUTHORIZATION, token.clone());
            }
            let req = req.body(Empty::new()).expect("request parts are valid");
            let result = tokio::time::timeout(HEADER_TIMEOUT, self.client.request(req)).await;
            let resp = match result {
                Err(_) => {
                    if attempt + 1 < MAX_ATTEMPTS {
                        attempt += 1;
                        backoff(attempt).await;
                        continue;
                    }
                    return Err(err(UpstreamErrorKind::Timeout(HEADER_TIMEOUT)));
                }
                Ok(Err(e)) => {
                    if e.is_connect() && attempt + 1 < MAX_ATTEMPTS {
                        attempt += 1;
                        tracing::debug!(error = %error_chain(&e), attempt, "upstream connect failed, retrying");
                        backoff(attempt).await;
                        continue;
                    }
                    return Err(err(UpstreamErrorKind::Request(error_chain(&e))));
                }
                Ok(Ok(resp)) => resp,
            };
            let status = resp.status();
            if status.is_redirection()
                && let Some(location) = resp.headers().get(LOCATION)
            {
                redirects += 1;
                if redirects > MAX_REDIRECTS {
                    return Err(err(UpstreamErrorKind::Redirect(format!(
                        "more than {MAX_REDIRECTS}"
                    ))));
                }
                uri = resolve_location(&uri, location, origin_loopback)
                    .map_err(|m| err(UpstreamErrorKind::Redirect(m)))?;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED && on_origin && !token_refreshed {
                let challenge = resp
                    .headers()
                    .get_all(WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(Challenge::parse);
                if let Some(challenge) = challenge {
                    token_refreshed = true;
                    self.tokens.forget(registry, &scope);
                    token = Some(
                        self.token(registry, repository, &scope, &challenge, origin_loopback)
                            .await?,
                    );
                    continue;
                }
            }
            if status.is_server_error() && attempt + 1 < MAX_ATTEMPTS {
                attempt += 1;
                backoff(attempt).await;
                continue;
            }
            if status.is_success() {
                return Ok(resp);
            }
            return Err(err(UpstreamErrorKind::Status {
                status,
                resource,
                retry_after: resp.headers().get(RETRY_AFTER).cloned(),
            }));
        }
    }

    /// Fetches an anonymous pull token for a challenge and caches it.
    async fn token(
        &self,
        registry: &Registry,
        repository: &Repository,
        cache_scope: &str,
        challenge: &Challenge,
        allow_loopback: bool,
    ) -> Result<HeaderValue, UpstreamError> {
        let err = |m: String| UpstreamError::new(registry, UpstreamErrorKind::Token(m));
        let query = {
            let mut query = form_urlencoded::Serializer::new(String::new());
            if let Some(service) = &challenge.service {
                query.append_pair("service", service);
            }
            if let Some(scope) = challenge.scope_for(Some(repository)) {
                query.append_pair("scope", &scope);
            }
            query.finish()
        };
        let sep = if challenge.realm.contains('?') {
            '&'
        } else {
            '?'
        };
        let uri: Uri = format!("{}{sep}{query}", challenge.realm)
            .parse()
            .map_err(|_| err("realm is not a URL".into()))?;
        check_target(&uri, allow_loopback).map_err(err)?;
        let req = Request::get(uri)
            .header(USER_AGENT, USER_AGENT_VALUE)
            .body(Empty::new())
            .expect("request parts are valid");
        let resp = tokio::time::timeout(HEADER_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| err("token server timed out".into()))?
            .map_err(|e| err(error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(err(format!("token server answered {}", resp.status())));
        }
        let body = Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE)
            .collect()
            .await
            .map_err(|e| err(format!("reading token response: {e}")))?
            .to_bytes();
        let (value, lifetime) = serde_json::from_slice::<TokenResponse>(&body)
            .ok()
            .and_then(TokenResponse::into_header)
            .ok_or_else(|| err("token response has no token".into()))?;
        self.tokens
            .put(registry, cache_scope, value.clone(), lifetime);
        Ok(value)
    }
}

fn host_ip(uri: &Uri) -> Option<std::net::IpAddr> {
    uri.host()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Refuses URLs that are not http(s) or that aim at forbidden (or, unless allowed, loopback)
/// IP literals. DNS names are checked by the resolver.
fn check_target(uri: &Uri, allow_loopback: bool) -> Result<(), String> {
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("{uri} is not http(s)"));
    }
    if let Some(ip) = host_ip(uri)
        && (is_forbidden(ip) || (ip.is_loopback() && !allow_loopback))
    {
        return Err(format!("{uri} aims at a forbidden address"));
    }
    Ok(())
}

/// Resolves a `Location` against the current URL.
fn resolve_location(
    current: &Uri,
    location: &HeaderValue,
    allow_loopback: bool,
) -> Result<Uri, String> {
    let location = location
        .to_str()
        .map_err(|_| "Location is not text".to_owned())?;
    let target: Uri = location
        .parse()
        .map_err(|_| "Location is not a URL".to_owned())?;
    let target = if target.scheme().is_some() {
        target
    } else {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(current.scheme().cloned().unwrap_or(Scheme::HTTPS));
        parts.authority = current
            .authority()
            .cloned()
            .or_else(|| Authority::from_static("invalid").into());
        parts.path_and_query = target.path_and_query().cloned();
        Uri::from_parts(parts).map_err(|e| e.to_string())?
    };
    check_target(&target, allow_loopback)?;
    Ok(target)
}

/// Exponential backoff with jitter from the clock's low bits.
async fn backoff(attempt: u32) {
    let base = BACKOFF_BASE * 2u32.pow(attempt.saturating_sub(1));
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() % 1000);
    tokio::time::sleep(base + base * jitter / 2000).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let mut mapped = HashMap::new();
        mapped.insert(
            Registry::parse("mirror.test").unwrap(),
            "http://127.0.0.1:5001/".parse().unwrap(),
        );
        let up = Upstreams::new(mapped);
        assert_eq!(
            up.base(&Registry::docker_hub()).unwrap(),
            "https://registry-1.docker.io"
        );
        assert_eq!(
            up.base(&Registry::parse("ghcr.io").unwrap()).unwrap(),
            "https://ghcr.io"
        );
        assert_eq!(
            up.base(&Registry::parse("r.test:8443").unwrap()).unwrap(),
            "https://r.test:8443"
        );
        assert_eq!(
            up.base(&Registry::parse("mirror.test").unwrap()).unwrap(),
            "http://127.0.0.1:5001"
        );
        for forbidden in ["127.0.0.1:5000", "169.254.169.254", "0.0.0.0"] {
            assert!(
                up.base(&Registry::parse(forbidden).unwrap()).is_err(),
                "{forbidden}"
            );
        }
    }

    #[test]
    fn redirects_resolve_and_stay_off_forbidden_addresses() {
        let cur: Uri = "https://reg.test/v2/a/blobs/x".parse().unwrap();
        let rel =
            resolve_location(&cur, &HeaderValue::from_static("/storage/x?sig=1"), false).unwrap();
        assert_eq!(rel.to_string(), "https://reg.test/storage/x?sig=1");
        let abs =
            resolve_location(&cur, &HeaderValue::from_static("https://cdn.test/x"), false).unwrap();
        assert_eq!(abs.host(), Some("cdn.test"));
        for bad in [
            "http://169.254.169.254/latest/meta-data",
            "http://127.0.0.1:8080/",
            "file:///etc/passwd",
        ] {
            assert!(
                resolve_location(&cur, &HeaderValue::from_str(bad).unwrap(), false).is_err(),
                "{bad}"
            );
        }
        assert!(
            resolve_location(
                &cur,
                &HeaderValue::from_static("http://127.0.0.1:8080/"),
                true
            )
            .is_ok()
        );
    }
}
