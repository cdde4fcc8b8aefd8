//! The upstream client: where each registry is fetched from (its mirrors first, then its own
//! URL), and one request there with the mechanics real registries need: Bearer tokens
//! (anonymous or with credentials), Basic auth, redirects to blob storage (dropping
//! `Authorization` off-host), `Range` for resuming, bounded retries with backoff on connect
//! errors and 5xx, and the 429 gate of [`limits`]. TLS is always verified.

mod auth;
pub use auth::{Challenge, MAX_TOKEN_LEN, MAX_TOKEN_LIFETIME, TokenError, parse_token_response};
mod credentials;
pub mod limits;
mod metrics;
mod probe;
mod resolve;
mod tls;

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, LOCATION, RETRY_AFTER, USER_AGENT, WWW_AUTHENTICATE};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use rustls_pki_types::CertificateDer;

use crate::fetch::{Credential, Fetch, Resource};
use crate::oci::{Mismatch, Registry, Visibility};
use crate::wire::{BoxError, SendError, error_chain};
use auth::TokenCache;
pub use credentials::{Credentials, DockerConfig};
pub use metrics::Metrics;
pub use probe::Answer;
use resolve::{GuardedResolver, resolve_location};
pub use resolve::{Reach, TargetError, is_forbidden};
pub use tls::load_certificates;

const DOCKER_HUB_URL: &str = "https://registry-1.docker.io";
/// How long a registry may take to send response headers.
const UPSTREAM_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// `--upstream-timeout`'s default: see [`Settings::timeout`].
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// The slowest average a body may keep up over [`Settings::timeout`] (1 KiB/s): a registry
/// that trickles a byte now and then never trips an idle timer, and holds its flight forever.
pub const MIN_BODY_RATE: u64 = 1024;
const MAX_ATTEMPTS: u32 = 3;
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Redirects (to blob storage) followed for one request.
const MAX_UPSTREAM_REDIRECTS: u32 = 5;
/// How many upstream endpoints (`host[:port]`) per-endpoint state (Basic auth asked, rate
/// limits) is kept for; a pod may name any number of registries, so the least used go.
pub const MAX_ENDPOINTS: u64 = 4096;
const USER_AGENT_VALUE: &str = concat!("pullcache/", env!("CARGO_PKG_VERSION"));
/// Headers that belong to one connection (RFC 9110 7.6.1), plus those the new request sets
/// itself: never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

type HttpClient = crate::wire::Client<GuardedResolver>;
/// A client that streams a client's own request body on: a push, in intercept mode.
type PushClient = crate::wire::Client<GuardedResolver, Incoming>;

/// A client's request as the registry's own URL gets it: its method, path, query, headers
/// (credentials included, marked sensitive; hop-by-hop ones dropped) and `body`.
fn passed_on<B>(
    registry: &Registry,
    endpoint: &Endpoint<'_>,
    parts: http::request::Parts,
    body: B,
) -> Result<Request<B>, UpstreamError> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = format!("{}{path}", endpoint.base)
        .parse()
        .map_err(|e: http::uri::InvalidUri| UpstreamError::new(registry, UpstreamErrorKind::Request(e.into())))?;
    let mut request = Request::builder()
        .method(parts.method)
        .uri(uri)
        .body(body)
        .expect("request parts are valid");
    let headers = request.headers_mut();
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            let mut value = value.clone();
            // A client's secret: never printed, even by a debug dump of the request.
            value.set_sensitive(name == AUTHORIZATION || name == http::header::COOKIE);
            headers.append(name.clone(), value);
        }
    }
    headers
        .entry(USER_AGENT)
        .or_insert(HeaderValue::from_static(USER_AGENT_VALUE));
    Ok(request)
}

/// An upstream failure, with the registry it concerns. Its message carries the whole chain of
/// `kind` (logs and OCI error bodies print it); code that classifies walks `kind`'s sources.
#[derive(Debug)]
pub struct UpstreamError {
    pub registry: Registry,
    pub kind: UpstreamErrorKind,
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "upstream {}: {}", self.registry, error_chain(&self.kind))
    }
}

impl std::error::Error for UpstreamError {}

impl UpstreamError {
    pub fn new(registry: &Registry, kind: UpstreamErrorKind) -> Self {
        UpstreamError {
            registry: registry.clone(),
            kind,
        }
    }

    /// A refusal for want of credentials, with the registry's `challenge` if it has none.
    fn with_challenge(mut self, challenge: Option<&HeaderValue>) -> Self {
        if let UpstreamErrorKind::CredentialsRequired {
            challenge: none @ None, ..
        } = &mut self.kind
        {
            *none = challenge.cloned();
        }
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamErrorKind {
    #[error("address not allowed without an explicit --upstream mapping")]
    Forbidden(#[source] TargetError),
    #[error("request failed")]
    Request(#[source] BoxError),
    #[error("no response headers within {0:?}")]
    Timeout(Duration),
    #[error("answered {status} for {resource}")]
    Status {
        status: StatusCode,
        resource: Resource,
        /// For a 429: how long this upstream stays closed, the registry's `Retry-After`
        /// clamped (never its header as sent).
        retry_after: Option<Duration>,
    },
    #[error("refused the configured credentials ({status})")]
    CredentialsRefused { status: StatusCode },
    #[error("requires credentials ({status}); none are configured for it (--docker-config or the config file)")]
    CredentialsRequired {
        status: StatusCode,
        /// The registry's challenge, relayed to the client so it can answer it itself.
        challenge: Option<HeaderValue>,
    },
    #[error("rate limited: not asked again for {0} s (Retry-After)")]
    RateLimited(u64),
    #[error("redirect refused")]
    Redirect(#[source] TargetError),
    #[error("more than {0} redirects")]
    TooManyRedirects(u32),
    #[error("token")]
    Token(#[source] TokenError),
    #[error("body")]
    Body(#[source] BoxError),
    #[error(transparent)]
    Mismatch(#[from] Mismatch),
    #[error("manifest exceeds {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("{reference} is not in the offline cache (serve --offline never asks an upstream)")]
    Offline { resource: Resource, reference: String },
}

/// How to reach one registry.
#[derive(Debug, Clone, Default)]
pub struct RegistrySettings {
    /// Where it is fetched from; `None` is the default for its name.
    pub url: Option<Uri>,
    /// Registry mirrors tried first, in order.
    pub mirrors: Vec<Uri>,
    /// CA certificates trusted for it, besides the global ones.
    pub roots: Vec<CertificateDer<'static>>,
    /// Wins over the docker config.
    pub credentials: Option<Credentials>,
}

/// Everything the upstream client is configured with.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub registries: HashMap<Registry, RegistrySettings>,
    /// `--upstream-ca`: trusted for every registry.
    pub roots: Vec<CertificateDer<'static>>,
    pub docker_config: DockerConfig,
    /// `serve --offline`: never contact an upstream.
    pub offline: bool,
    /// `--upstream-timeout` (default [`DEFAULT_UPSTREAM_TIMEOUT`]): how long a registry may
    /// send nothing (headers, within 30 s at most, or body), and the window over which a
    /// body must average [`MIN_BODY_RATE`].
    pub timeout: Option<Duration>,
}

impl Settings {
    /// The credentials a registry itself (not a mirror) is fetched with: its own, else the
    /// docker config's for its name, else for the host it is fetched from. `serve` and
    /// `--check-config` both ask this.
    pub fn credentials(&self, registry: &Registry) -> Option<&Credentials> {
        let settings = self.registries.get(registry);
        let url = settings.and_then(|s| s.url.as_ref().map(ToString::to_string));
        let url: Uri = url.unwrap_or_else(|| default_url(registry)).parse().ok()?;
        settings
            .and_then(|s| s.credentials.as_ref())
            .or_else(|| self.docker_config.lookup(registry, None))
            .or_else(|| self.docker_config.lookup_host(url.authority()?.as_str()))
    }
}

/// Where a registry no URL is configured for is fetched from: Docker Hub's registry host for
/// `docker.io`, else the name itself over HTTPS.
pub fn default_url(registry: &Registry) -> String {
    match registry.is_docker_hub() {
        true => DOCKER_HUB_URL.to_owned(),
        false => format!("https://{registry}"),
    }
}

/// The request `fetch` makes of `uri`, with `auth` when it goes to the endpoint itself.
fn request(fetch: &Fetch, uri: &Uri, auth: Option<&HeaderValue>) -> Request<Full<Bytes>> {
    let mut builder = fetch.builder(uri.clone()).header(USER_AGENT, USER_AGENT_VALUE);
    if let Some(auth) = auth {
        builder = builder.header(AUTHORIZATION, auth.clone());
    }
    builder.body(Full::default()).expect("request parts are valid")
}

/// A place a registry's content can be fetched from: a mirror or the registry itself.
struct Endpoint<'a> {
    base: String,
    /// `host[:port]`: the key for tokens, limits and credentials.
    authority: String,
    credentials: Option<&'a Credentials>,
    /// The client for the endpoint itself, which connects only where its reach allows.
    client: &'a HttpClient,
    /// The client for what its answers point at: redirect targets and token realms.
    answers: &'a HttpClient,
    /// Where its answers may point: this node's loopback only when the endpoint itself was
    /// mapped there, never because a remote registry says so.
    answers_reach: Reach,
}

/// The pooled clients, one per trust set and [`Reach`].
struct Clients {
    default: ClientSet,
    /// Mapped registries with CAs of their own.
    with_roots: HashMap<Registry, ClientSet>,
}

/// The clients of one trust set, indexed by [`Clients::slot`].
struct ClientSet {
    fetch: [HttpClient; 2],
    push: [PushClient; 2],
}

impl ClientSet {
    fn new(roots: &[CertificateDer<'static>]) -> ClientSet {
        ClientSet {
            fetch: [
                tls::client(roots, Reach::Remote),
                tls::client(roots, Reach::WithLoopback),
            ],
            push: [
                tls::client(roots, Reach::Remote),
                tls::client(roots, Reach::WithLoopback),
            ],
        }
    }
}

impl Clients {
    fn slot(reach: Reach) -> usize {
        match reach {
            Reach::Remote => 0,
            Reach::WithLoopback => 1,
        }
    }

    fn set(&self, registry: &Registry) -> &ClientSet {
        self.with_roots.get(registry).unwrap_or(&self.default)
    }

    fn get(&self, registry: &Registry, reach: Reach) -> &HttpClient {
        &self.set(registry).fetch[Self::slot(reach)]
    }

    fn push(&self, registry: &Registry, reach: Reach) -> &PushClient {
        &self.set(registry).push[Self::slot(reach)]
    }
}

pub struct Upstreams {
    settings: Settings,
    clients: Clients,
    tokens: TokenCache,
    /// Endpoints that asked for Basic auth; later requests send it up front. Bounded: one
    /// forgotten is asked again, and answers a 401 with the credentials as before.
    basic: moka::sync::Cache<String, ()>,
    pub rate_limits: limits::RateLimits,
    metrics: Metrics,
}

impl Upstreams {
    /// Whether upstreams are never contacted (`serve --offline`).
    pub fn is_offline(&self) -> bool {
        self.settings.offline
    }

    /// See [`Settings::timeout`].
    pub fn timeout(&self) -> Duration {
        self.settings.timeout.unwrap_or(DEFAULT_UPSTREAM_TIMEOUT)
    }

    /// How long a registry (or token server) may take to send its response headers.
    fn header_timeout(&self) -> Duration {
        self.timeout().min(UPSTREAM_HEADER_TIMEOUT)
    }

    pub fn new(settings: Settings, metrics: Metrics) -> Upstreams {
        let with_roots = settings
            .registries
            .iter()
            .filter(|(_, r)| !r.roots.is_empty())
            .map(|(name, r)| {
                let roots: Vec<_> = settings.roots.iter().chain(&r.roots).cloned().collect();
                (name.clone(), ClientSet::new(&roots))
            })
            .collect();
        let clients = Clients {
            default: ClientSet::new(&settings.roots),
            with_roots,
        };
        metrics.start(crate::oci::DOCKER_HUB);
        for registry in settings.registries.keys() {
            metrics.start(registry.as_str());
        }
        Upstreams {
            settings,
            clients,
            tokens: TokenCache::default(),
            basic: moka::sync::Cache::new(MAX_ENDPOINTS),
            rate_limits: limits::RateLimits::default(),
            metrics,
        }
    }

    /// The `registry` label for a registry: see [`metrics`].
    fn label<'a>(&self, registry: &'a Registry) -> &'a str {
        if self.settings.registries.contains_key(registry) || metrics::well_known(registry.as_str()) {
            registry.as_str()
        } else {
            "other"
        }
    }

    /// The counter of body bytes fetched from a registry's upstream.
    pub fn bytes_counter(&self, registry: &Registry) -> prometheus::IntCounter {
        self.metrics.bytes.with_label_values(&[self.label(registry)])
    }

    /// Loopback is in reach only of registries the operator mapped (flags or config file).
    fn reach(&self, registry: &Registry) -> Reach {
        if self.settings.registries.contains_key(registry) {
            Reach::WithLoopback
        } else {
            Reach::Remote
        }
    }

    /// The registry's own base URL, without a trailing slash.
    fn base(&self, registry: &Registry) -> Result<String, UpstreamError> {
        if let Some(url) = self.settings.registries.get(registry).and_then(|r| r.url.as_ref()) {
            return Ok(url.to_string().trim_end_matches('/').to_owned());
        }
        // A name from a client (`ns=`) that is an IP literal is refused here, before any
        // request; DNS names are checked when they resolve.
        if let Some(ip) = registry.ip()
            && !self.reach(registry).allows(ip)
        {
            let refused = TargetError::Address {
                uri: registry.to_string(),
            };
            return Err(UpstreamError::new(registry, UpstreamErrorKind::Forbidden(refused)));
        }
        Ok(default_url(registry))
    }

    /// The mirrors of a registry, then the registry itself.
    fn endpoints(&self, registry: &Registry) -> Result<Vec<Endpoint<'_>>, UpstreamError> {
        let settings = self.settings.registries.get(registry);
        let mut endpoints = Vec::new();
        for mirror in settings.map(|s| s.mirrors.as_slice()).unwrap_or_default() {
            endpoints.push(self.endpoint(registry, mirror.to_string(), None)?);
        }
        let own = self.settings.credentials(registry);
        endpoints.push(self.endpoint(registry, self.base(registry)?, own)?);
        Ok(endpoints)
    }

    fn endpoint<'a>(
        &'a self,
        registry: &Registry,
        base: String,
        credentials: Option<&'a Credentials>,
    ) -> Result<Endpoint<'a>, UpstreamError> {
        let base = base.trim_end_matches('/').to_owned();
        let uri: Uri = base
            .parse()
            .map_err(|e: http::uri::InvalidUri| UpstreamError::new(registry, UpstreamErrorKind::Request(e.into())))?;
        let authority = uri
            .authority()
            .map_or_else(String::new, |a| a.as_str().to_ascii_lowercase());
        let reach = self.reach(registry);
        let answers_reach = if reach == Reach::WithLoopback && resolve::is_local(&uri) {
            Reach::WithLoopback
        } else {
            Reach::Remote
        };
        Ok(Endpoint {
            credentials: credentials.or_else(|| self.settings.docker_config.lookup_host(&authority)),
            client: self.clients.get(registry, reach),
            answers: self.clients.get(registry, answers_reach),
            answers_reach,
            base,
            authority,
        })
    }

    /// The rate-limit headers last seen from a registry's own URL.
    pub fn rate_limit(&self, registry: &Registry) -> Option<limits::RateLimit> {
        let base: Uri = self.base(registry).ok()?.parse().ok()?;
        self.rate_limits.rate_limit(base.authority()?.as_str())
    }

    /// Sends a request that is not a registry API call (a token endpoint, an OAuth2 `POST`,
    /// `/v2/auth`) to the registry's own URL as the client sent it: its method, headers
    /// (credentials included) and body. No redirect is followed and nothing is cached.
    /// Intercept mode uses it for what it does not serve itself on an intercepted host.
    pub async fn forward(
        &self,
        registry: &Registry,
        parts: http::request::Parts,
        body: Bytes,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let err = |kind| UpstreamError::new(registry, kind);
        let endpoint = self.endpoint(registry, self.base(registry)?, None)?;
        let request = passed_on(registry, &endpoint, parts, Full::new(body))?;
        crate::wire::send(endpoint.client, request, self.header_timeout())
            .await
            .map_err(|e| err(Failure::from(e).kind))
    }

    /// Sends a push (a blob upload, a manifest `PUT`, a `DELETE`) to the registry's own URL as
    /// the client sent it: its method, headers (its own credentials included, never
    /// pullcache's) and body, streamed on as it arrives. No redirect is followed, nothing is
    /// cached, and no deadline is set on the answer: the registry answers an upload once the
    /// body is in, however long the client takes to send it.
    pub async fn push(
        &self,
        registry: &Registry,
        parts: http::request::Parts,
        body: Incoming,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let err = |kind| UpstreamError::new(registry, kind);
        debug_assert!(!self.settings.offline, "the caller refuses pushes offline");
        let endpoint = self.endpoint(registry, self.base(registry)?, None)?;
        let request = passed_on(registry, &endpoint, parts, body)?;
        let client = self.clients.push(registry, self.reach(registry));
        let mut resp = client
            .request(request)
            .await
            .map_err(|e| err(Failure::from(crate::wire::SendError::Client(e)).kind))?;
        // An upload's next URL, absolute at the registry's own address (a mapped registry's
        // URL, not the name the client asked for): the client goes on under that name.
        let renamed = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|location| location.strip_prefix(&endpoint.base))
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
            .and_then(|rest| HeaderValue::from_str(&format!("https://{registry}{rest}")).ok());
        if let Some(renamed) = renamed {
            resp.headers_mut().insert(LOCATION, renamed);
        }
        Ok(resp)
    }

    /// Sends a request to the registry's mirrors, then to the registry, and returns the first
    /// 2xx response. Anything else is an error, the registry's own when every endpoint failed.
    /// The response carries the [`Visibility`] its answer proves: public only when nothing
    /// but an anonymous request was needed.
    pub async fn fetch(&self, req: &Fetch) -> Result<Response<Incoming>, UpstreamError> {
        if self.settings.offline {
            return Err(UpstreamError::new(
                &req.registry,
                UpstreamErrorKind::Offline {
                    resource: req.resource,
                    reference: req.reference.image(&req.registry, &req.repository),
                },
            ));
        }
        let endpoints = self.endpoints(&req.registry)?;
        let last = endpoints.len() - 1;
        for (i, endpoint) in endpoints.iter().enumerate() {
            // A client's credential goes to the registry itself only, never to a mirror.
            let client = match &req.credential {
                Credential::Client {
                    header,
                    anonymous_first,
                } if i == last && endpoint.credentials.is_none() => Some((header, *anonymous_first)),
                _ => None,
            };
            match self.fetch_from(endpoint, req, client).await {
                Ok(resp) => return Ok(resp),
                Err(e) if i == last => return Err(e),
                Err(e) => {
                    tracing::debug!(mirror = %endpoint.authority, error = %e, "mirror failed; trying the next endpoint")
                }
            }
        }
        unreachable!("a registry always has its own endpoint")
    }

    /// One request to one endpoint, following redirects, answering one auth challenge and
    /// retrying connect errors, timeouts and 5xx a bounded number of times. With `client` (a
    /// client's credential, and whether to try without it first), the client's credential is
    /// sent from the start, or once the anonymous request is refused or hidden.
    async fn fetch_from(
        &self,
        endpoint: &Endpoint<'_>,
        req: &Fetch,
        client: Option<(&HeaderValue, bool)>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let err = |kind| UpstreamError::new(&req.registry, kind);
        if let Some(wait) = self.rate_limits.closed_for(&endpoint.authority) {
            return Err(err(UpstreamErrorKind::RateLimited(wait.as_secs().max(1))));
        }
        let mut uri: Uri = format!("{}{}", endpoint.base, req.path())
            .parse()
            .map_err(|e: http::uri::InvalidUri| err(UpstreamErrorKind::Request(e.into())))?;
        let home = (uri.scheme().cloned(), uri.authority().cloned());
        let key = auth::token_key(endpoint.credentials, &format!("repository:{}:pull", req.repository));
        let mut auth = self.known_auth(endpoint, &key);
        // What the endpoint's answer was asked with, and so what it proves: only an answer
        // to an anonymous request proves the content public.
        let own = if endpoint.credentials.is_some() {
            Visibility::Private
        } else {
            Visibility::Public
        };
        let mut sent = if auth.is_some() { own } else { Visibility::Public };
        let (mut auth_retried, mut client_sent, mut attempt, mut redirects) = (false, false, 0, 0);
        if let Some((header, false)) = client {
            (auth, sent, client_sent, auth_retried) = (Some(header.clone()), Visibility::Client, true, true);
        }
        loop {
            // Credentials go only to the endpoint itself (its scheme too: never in clear text
            // to a plain-HTTP port of the same host), never to a redirect target.
            let on_endpoint = (uri.scheme(), uri.authority()) == (home.0.as_ref(), home.1.as_ref());
            let request = request(req, &uri, auth.as_ref().filter(|_| on_endpoint));
            let http = if on_endpoint { endpoint.client } else { endpoint.answers };
            let resp = match self.send(http, req, request).await {
                Ok(resp) => resp,
                Err(failure) if failure.retry && attempt + 1 < MAX_ATTEMPTS => {
                    attempt += 1;
                    tracing::debug!(error = %error_chain(&failure.kind), attempt, "upstream request failed; retrying");
                    backoff(attempt).await;
                    continue;
                }
                Err(failure) => return Err(err(failure.kind)),
            };
            if on_endpoint {
                self.observe_rate_limit(endpoint, &req.registry, resp.headers());
            }
            let status = resp.status();
            if status.is_redirection()
                && let Some(location) = resp.headers().get(LOCATION)
            {
                redirects += 1;
                if redirects > MAX_UPSTREAM_REDIRECTS {
                    return Err(err(UpstreamErrorKind::TooManyRedirects(MAX_UPSTREAM_REDIRECTS)));
                }
                uri = resolve_location(&uri, location, endpoint.answers_reach)
                    .map_err(|e| err(UpstreamErrorKind::Redirect(e)))?;
                continue;
            }
            // What an anonymous request may be refused with, or the content hidden behind.
            let refused = matches!(
                status,
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
            );
            if status == StatusCode::UNAUTHORIZED && on_endpoint && !auth_retried {
                auth_retried = true;
                match self.authorize(endpoint, req, &key, resp.headers()).await {
                    Ok(header) => {
                        auth = Some(header);
                        sent = own;
                        continue;
                    }
                    // No anonymous token: the client's credential may still do.
                    Err(e) if client.is_none() => return Err(e),
                    Err(_) => {}
                }
            }
            if refused
                && on_endpoint
                && !client_sent
                && let Some((client, _)) = client
            {
                client_sent = true;
                auth = Some(client.clone());
                sent = Visibility::Client;
                continue;
            }
            if status.is_server_error() && attempt + 1 < MAX_ATTEMPTS {
                attempt += 1;
                backoff(attempt).await;
                continue;
            }
            if status.is_success() {
                let mut resp = resp;
                resp.extensions_mut().insert(sent);
                return Ok(resp);
            }
            return Err(err(self.refusal(endpoint, req, &resp)));
        }
    }

    /// A token cached under `key`, or Basic credentials for an endpoint known to want them.
    fn known_auth(&self, endpoint: &Endpoint<'_>, key: &str) -> Option<HeaderValue> {
        self.tokens.get(&endpoint.authority, key).or_else(|| {
            let basic = self.basic.contains_key(&endpoint.authority);
            basic
                .then(|| endpoint.credentials.and_then(Credentials::basic_header))
                .flatten()
        })
    }

    /// Sends one request within the header timeout and counts it.
    async fn send(
        &self,
        client: &HttpClient,
        req: &Fetch,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, Failure> {
        let sent = std::time::Instant::now();
        let result = crate::wire::send(client, request, self.header_timeout())
            .await
            .map_err(Failure::from);
        let status_class = match &result {
            Ok(resp) => crate::wire::status_class(resp.status()),
            // The address policy refused the name it resolved to: nothing was sent, as for
            // a refused IP literal.
            Err(Failure {
                kind: UpstreamErrorKind::Forbidden(_),
                ..
            }) => return result,
            Err(_) => "error",
        };
        let registry_label = self.label(&req.registry);
        self.metrics
            .duration
            .with_label_values(&[registry_label, req.kind()])
            .observe(sent.elapsed().as_secs_f64());
        self.metrics
            .requests
            .with_label_values(&[registry_label, req.kind(), status_class])
            .inc();
        result
    }

    /// Keeps Docker Hub's rate-limit headers for the gauges.
    fn observe_rate_limit(&self, endpoint: &Endpoint<'_>, registry: &Registry, headers: &http::HeaderMap) {
        let Some(limit) = self.rate_limits.observe(&endpoint.authority, headers) else {
            return;
        };
        let label = self.label(registry);
        if let Some(remaining) = limit.remaining {
            let gauge = self.metrics.ratelimit_remaining.with_label_values(&[label]);
            gauge.set(i64::try_from(remaining).unwrap_or(i64::MAX));
        }
        if let Some(max) = limit.limit {
            let gauge = self.metrics.ratelimit_limit.with_label_values(&[label]);
            gauge.set(i64::try_from(max).unwrap_or(i64::MAX));
        }
    }

    /// What a final non-2xx answer means; a 429 also closes the endpoint for its Retry-After.
    fn refusal(&self, endpoint: &Endpoint<'_>, req: &Fetch, resp: &Response<Incoming>) -> UpstreamErrorKind {
        let status = resp.status();
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if endpoint.credentials.is_some() => {
                UpstreamErrorKind::CredentialsRefused { status }
            }
            StatusCode::UNAUTHORIZED => UpstreamErrorKind::CredentialsRequired {
                status,
                challenge: resp.headers().get(WWW_AUTHENTICATE).cloned(),
            },
            StatusCode::TOO_MANY_REQUESTS => {
                let retry_after = resp.headers().get(RETRY_AFTER);
                let wait = self.rate_limits.close(&endpoint.authority, retry_after);
                tracing::warn!(endpoint = %endpoint.authority, wait_s = wait.as_secs(), "rate limited upstream");
                UpstreamErrorKind::Status {
                    status,
                    resource: req.resource,
                    retry_after: Some(wait),
                }
            }
            _ => UpstreamErrorKind::Status {
                status,
                resource: req.resource,
                retry_after: None,
            },
        }
    }
}

/// A request that got no response, and whether trying again may help.
struct Failure {
    kind: UpstreamErrorKind,
    retry: bool,
}

impl From<SendError> for Failure {
    /// A connection refused by the address policy is final; other connect errors and
    /// timeouts may pass.
    fn from(e: SendError) -> Failure {
        let e = match e {
            SendError::Timeout(after) => {
                return Failure {
                    kind: UpstreamErrorKind::Timeout(after),
                    retry: true,
                };
            }
            SendError::Client(e) => e,
        };
        if let Some(refused) = resolve::refusal(&e) {
            return Failure {
                kind: UpstreamErrorKind::Forbidden(refused.clone()),
                retry: false,
            };
        }
        Failure {
            retry: e.is_connect(),
            kind: UpstreamErrorKind::Request(e.into()),
        }
    }
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
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn credentials_come_from_the_file_then_the_name_then_the_host() {
        let mut settings = Settings {
            docker_config: DockerConfig::parse(br#"{"auths": {"registry.example.com:5000": {"auth": "dTpw"}}}"#)
                .unwrap(),
            ..Settings::default()
        };
        let (name, alias) = (
            Registry::parse("registry.example.com:5000").unwrap(),
            Registry::parse("alias.test").unwrap(),
        );
        assert!(settings.credentials(&name).is_some(), "by name");
        assert!(settings.credentials(&alias).is_none());
        settings.registries.entry(alias.clone()).or_default().url =
            Some("https://registry.example.com:5000".parse().unwrap());
        assert!(settings.credentials(&alias).is_some(), "by the host it is fetched from");
        let own = Credentials::Basic {
            username: "robot".into(),
            password: "p".into(),
        };
        settings.registries.get_mut(&alias).unwrap().credentials = Some(own.clone());
        assert_eq!(settings.credentials(&alias), Some(&own), "the file's first");
    }

    #[test]
    fn base_urls() {
        let mut settings = Settings::default();
        settings.registries.insert(
            Registry::parse("mirror.test").unwrap(),
            RegistrySettings {
                url: Some("http://127.0.0.1:5001/".parse().unwrap()),
                ..RegistrySettings::default()
            },
        );
        let up = Upstreams::new(settings, Metrics::register(&prometheus::Registry::new()).unwrap());
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
            assert!(up.base(&Registry::parse(forbidden).unwrap()).is_err(), "{forbidden}");
        }
    }

    /// Loopback is in reach of mapped registries; what their answers point at (redirects,
    /// realms) only when the mapping itself is on this node, never for a remote registry.
    #[test]
    fn reach_follows_the_mapping() {
        let mut settings = Settings::default();
        for (name, url) in [
            ("local.test", "http://localhost:5000"),
            ("remote.test", "https://10.0.0.5"),
        ] {
            settings.registries.insert(
                Registry::parse(name).unwrap(),
                RegistrySettings {
                    url: Some(url.parse().unwrap()),
                    ..RegistrySettings::default()
                },
            );
        }
        let up = Upstreams::new(settings, Metrics::register(&prometheus::Registry::new()).unwrap());
        let reach = |name: &str| {
            let registry = Registry::parse(name).unwrap();
            let endpoint = up.endpoint(&registry, up.base(&registry).unwrap(), None).unwrap();
            (up.reach(&registry), endpoint.answers_reach)
        };
        assert_eq!(reach("local.test"), (Reach::WithLoopback, Reach::WithLoopback));
        assert_eq!(reach("remote.test"), (Reach::WithLoopback, Reach::Remote));
        assert_eq!(reach("ghcr.io"), (Reach::Remote, Reach::Remote));
        assert_eq!(reach("docker.io"), (Reach::Remote, Reach::Remote));
    }

    /// A registry on loopback that answers 200 to `open` requests, else only to `Basic`
    /// `alice:pw`, and 401 with a Basic challenge otherwise; it records each request's
    /// `Authorization`.
    async fn basic_registry(open: bool) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let log = log.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let auth = req.headers().get(AUTHORIZATION).map(|v| v.to_str().unwrap().to_owned());
                    let allowed = open || auth.as_deref() == Some(ALICE);
                    log.lock().unwrap().push(auth);
                    let resp = if allowed {
                        Response::new(Full::new(Bytes::from_static(b"layer")))
                    } else {
                        Response::builder()
                            .status(StatusCode::UNAUTHORIZED)
                            .header(WWW_AUTHENTICATE, r#"Basic realm="test""#)
                            .body(Full::default())
                            .unwrap()
                    };
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(io, service));
            }
        });
        (url, seen)
    }

    /// `alice:pw`.
    const ALICE: &str = "Basic YWxpY2U6cHc=";

    fn mapped(name: &str, url: &str, mirrors: Vec<Uri>) -> (Registry, Upstreams) {
        let registry = Registry::parse(name).unwrap();
        let mut settings = Settings::default();
        settings.registries.insert(
            registry.clone(),
            RegistrySettings {
                url: Some(url.parse().unwrap()),
                mirrors,
                ..RegistrySettings::default()
            },
        );
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        (registry, Upstreams::new(settings, metrics))
    }

    fn blob(registry: &Registry) -> Fetch {
        let digest = crate::oci::Digest::of(b"layer");
        let repository = crate::oci::Repository::parse("team/app").unwrap();
        Fetch::blob(http::Method::GET, registry, &repository, &digest)
    }

    /// Only an answer to an anonymous request proves content public; a client's credential
    /// is sent only when the registry refuses without it, and relayed challenges let the client
    /// answer a refusal itself.
    #[tokio::test]
    async fn a_fetch_says_what_its_answer_proves_and_a_clients_credential_goes_only_where_needed() {
        let (url, _) = basic_registry(true).await;
        let (registry, up) = mapped("open.test", &url, Vec::new());
        let resp = up.fetch(&blob(&registry)).await.unwrap();
        assert_eq!(resp.extensions().get::<Visibility>(), Some(&Visibility::Public));

        let (url, seen) = basic_registry(false).await;
        let (registry, up) = mapped("private.test", &url, Vec::new());
        let refused = up.fetch(&blob(&registry)).await.unwrap_err();
        match &refused.kind {
            UpstreamErrorKind::CredentialsRequired { challenge, .. } => {
                assert_eq!(challenge.as_ref().unwrap(), r#"Basic realm="test""#)
            }
            other => panic!("{other:?}"),
        }
        seen.lock().unwrap().clear();
        let alice = Credential::client(&HeaderValue::from_static(ALICE), true);
        let resp = up.fetch(&blob(&registry).authorized(alice, None)).await.unwrap();
        assert_eq!(resp.extensions().get::<Visibility>(), Some(&Visibility::Client));
        assert_eq!(*seen.lock().unwrap(), [None, Some(ALICE.to_owned())]);
        // Where the location is not known to be public, the client's credential goes first.
        seen.lock().unwrap().clear();
        let alice = Credential::client(&HeaderValue::from_static(ALICE), false);
        let resp = up.fetch(&blob(&registry).authorized(alice, None)).await.unwrap();
        assert_eq!(resp.extensions().get::<Visibility>(), Some(&Visibility::Client));
        assert_eq!(*seen.lock().unwrap(), [Some(ALICE.to_owned())]);

        // A configured mirror of the registry never sees the client's credential.
        let (mirror, mirror_seen) = basic_registry(false).await;
        let (registry, up) = mapped("private.test", &url, vec![mirror.parse().unwrap()]);
        let alice = Credential::client(&HeaderValue::from_static(ALICE), true);
        up.fetch(&blob(&registry).authorized(alice, None)).await.unwrap();
        assert!(
            mirror_seen.lock().unwrap().iter().all(Option::is_none),
            "{:?}",
            mirror_seen.lock().unwrap()
        );
    }
}
