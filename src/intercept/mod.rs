//! HTTPS intercept mode: the listener is also an HTTP proxy. `CONNECT host:port` is decided
//! by [`Policy`]:
//! - a registry host (configured registries and their well-known API hosts) is intercepted:
//!   TLS is terminated with a leaf certificate from the cluster's [`Ca`], and the same routes
//!   and cache as mirror mode serve it, the registry taken from the host;
//! - a host on the tunnel allow-list (token and CDN hosts) is tunnelled byte for byte;
//! - everything else is refused with 403: this is no open proxy. Link-local, metadata and
//!   loopback targets are always refused unless they are an explicitly configured registry.

mod ca;
mod secret;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus::IntCounterVec;

pub use ca::{CERT_FILE, Ca, CaError, KEY_FILE, cert_pem, init};
pub use secret::{SecretOutcome, init_secret};

use crate::oci::Registry;
use crate::server::response::{self, Body};
use crate::upstream::Upstreams;

/// Token and CDN hosts of the default registries, tunnelled unless configured otherwise.
pub const DEFAULT_TUNNEL_ALLOW: &[&str] = &[
    "auth.docker.io",
    "production.cloudflare.docker.com",
    "*.cloudflare.docker.com",
];
/// Docker Hub's API hosts, all cached as `docker.io`.
const DOCKER_HUB_HOSTS: &[&str] = &["docker.io", "registry-1.docker.io", "index.docker.io"];
const TUNNEL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What to do with a proxy request for a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Intercept { registry: Registry, host: String },
    Tunnel,
    Refuse(String),
}

impl Decision {
    fn label(&self) -> &'static str {
        match self {
            Decision::Intercept { .. } => "intercept",
            Decision::Tunnel => "tunnel",
            Decision::Refuse(_) => "refuse",
        }
    }
}

/// Which hosts are intercepted, which are tunnelled.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `host` (port 443) or `host:port` → the registry it is cached as.
    intercepted: HashMap<String, Registry>,
    /// Exact host names, or `*.suffix`.
    tunnel_allow: Vec<String>,
}

impl Policy {
    /// Intercepts Docker Hub's hosts and every registry in `registries`.
    pub fn new<'a>(registries: impl IntoIterator<Item = &'a Registry>, tunnel_allow: Vec<String>) -> Policy {
        let mut intercepted = HashMap::new();
        for host in DOCKER_HUB_HOSTS {
            intercepted.insert((*host).to_owned(), Registry::docker_hub());
        }
        for registry in registries {
            intercepted.insert(registry.as_str().to_owned(), registry.clone());
        }
        Policy {
            intercepted,
            tunnel_allow: tunnel_allow.into_iter().map(|p| p.to_ascii_lowercase()).collect(),
        }
    }

    /// Decides for a `host[:port]` (port 443 when absent, as for CONNECT).
    pub fn decide(&self, authority: &str) -> Decision {
        let authority = authority.to_ascii_lowercase();
        let (host, port) = split_authority(&authority);
        let Some(port) = port else {
            return Decision::Refuse(format!("{authority:?} is not host:port"));
        };
        let key = if port == 443 || port == 80 {
            host.to_owned()
        } else {
            format!("{host}:{port}")
        };
        if let Some(registry) = self.intercepted.get(&key) {
            return Decision::Intercept {
                registry: registry.clone(),
                host: host.to_owned(),
            };
        }
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            && (ip.is_loopback() || crate::upstream::is_forbidden(ip))
        {
            return Decision::Refuse(format!("{host} is a loopback, link-local or metadata address"));
        }
        if port == 443 && self.tunnel_allow.iter().any(|pattern| matches(pattern, host)) {
            return Decision::Tunnel;
        }
        Decision::Refuse(format!(
            "{key} is neither an intercepted registry nor allowed to tunnel (--intercept, --tunnel-allow)"
        ))
    }
}

/// `host:port`, `[v6]:port` or `host` → (host, port).
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && (!host.contains(':') || host.ends_with(']')) => {
            (host, port.parse().ok())
        }
        _ => (authority, Some(443)),
    }
}

/// Checks a `--tunnel-allow` pattern: a host name, or `*.` and a name with a dot in it.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    let name = pattern.strip_prefix("*.").unwrap_or(pattern);
    let wildcard = name.len() != pattern.len();
    if name.contains(':') || Registry::parse(name).is_err() || (wildcard && !name.contains('.')) {
        return Err(format!(
            "{pattern:?} is not a host name or *.suffix (port 443 is implied)"
        ));
    }
    Ok(())
}

fn matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1 && host.ends_with(suffix) && host[..host.len() - suffix.len()].ends_with('.')
        }
        None => pattern == host,
    }
}

/// The intercept side of the server: its policy, CA and counters.
pub struct Intercept {
    pub policy: Policy,
    ca: Ca,
    connects: IntCounterVec,
}

impl Intercept {
    pub fn new(policy: Policy, ca: Ca, registry: &prometheus::Registry) -> prometheus::Result<Intercept> {
        let connects = IntCounterVec::new(
            prometheus::Opts::new(
                "pullcache_proxy_requests_total",
                "Proxy requests (CONNECT and absolute-form), by decision: intercept, tunnel or refuse.",
            ),
            &["decision"],
        )?;
        registry.register(Box::new(connects.clone()))?;
        Ok(Intercept { policy, ca, connects })
    }

    /// Decides for a host and counts the decision.
    pub fn decide(&self, authority: &str) -> Decision {
        let decision = self.policy.decide(authority);
        self.connects.with_label_values(&[decision.label()]).inc();
        if let Decision::Refuse(reason) = &decision {
            tracing::warn!(target = authority, reason, "proxy request refused");
        }
        decision
    }

    /// Answers a CONNECT: 200 and then intercept or tunnel on the upgraded connection, or 403.
    /// `serve` serves an intercepted, decrypted connection.
    pub fn connect<F, Fut>(self: &Arc<Self>, req: Request<Incoming>, serve: F) -> Response<Body>
    where
        F: FnOnce(tokio_rustls::server::TlsStream<TokioIo<hyper::upgrade::Upgraded>>, Registry) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let Some(authority) = req.uri().authority().map(|a| a.as_str().to_owned()) else {
            return refuse(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
        };
        let decision = self.decide(&authority);
        let on_upgrade = hyper::upgrade::on(req);
        match decision {
            Decision::Refuse(reason) => refuse(StatusCode::FORBIDDEN, &reason),
            Decision::Tunnel => {
                tokio::spawn(async move {
                    if let Err(e) = tunnel(on_upgrade, &authority).await {
                        tracing::debug!(target = authority, error = %e, "tunnel ended");
                    }
                });
                established()
            }
            Decision::Intercept { registry, host } => {
                let leaf = match self.ca.leaf(&host) {
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
                    match tls_acceptor(leaf).accept(TokioIo::new(upgraded)).await {
                        Ok(tls) => serve(tls, registry).await,
                        // A client that does not trust the CA ends here: nothing is served.
                        Err(e) => {
                            tracing::warn!(host, error = %e, "intercepted TLS handshake failed")
                        }
                    }
                });
                established()
            }
        }
    }
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

/// The answer to an absolute-form request for a host that is not intercepted.
pub fn refused(reason: &str) -> Response<Body> {
    refuse(StatusCode::FORBIDDEN, reason)
}

/// A request outside the registry API on an intercepted host (`/`, `/v1/_ping`, a token
/// endpoint): passed to the registry untouched and not cached. Only GET and HEAD.
pub async fn forward(upstreams: &Upstreams, registry: &Registry, req: Request<Incoming>) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD are forwarded");
    }
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    match upstreams.forward(registry, req.method().clone(), path).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            for hop in [CONNECTION, TRANSFER_ENCODING, "keep-alive".parse().expect("valid name")] {
                parts.headers.remove(hop);
            }
            Response::from_parts(parts, body.map_err(std::io::Error::other).boxed_unsync())
        }
        Err(e) => response::error(&e.into(), head),
    }
}

/// A TLS acceptor presenting `leaf`, offering h2 and http/1.1.
fn tls_acceptor(leaf: Arc<rustls::sign::CertifiedKey>) -> tokio_rustls::TlsAcceptor {
    #[derive(Debug)]
    struct Fixed(Arc<rustls::sign::CertifiedKey>);
    impl rustls::server::ResolvesServerCert for Fixed {
        fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
            // The certificate is for the CONNECT host, whatever the SNI says: a client that
            // asks for another name fails its own verification.
            Some(self.0.clone())
        }
    }
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(leaf)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// Copies bytes between the client and `authority`, connecting only to addresses an upstream
/// may have.
async fn tunnel(on_upgrade: hyper::upgrade::OnUpgrade, authority: &str) -> std::io::Result<()> {
    let addrs: Vec<_> = tokio::net::lookup_host(authority)
        .await?
        .filter(|a| !a.ip().is_loopback() && !crate::upstream::is_forbidden(a.ip()))
        .collect();
    if addrs.is_empty() {
        return Err(std::io::Error::other(format!(
            "{authority} has no address a tunnel may reach"
        )));
    }
    let mut server = tokio::time::timeout(TUNNEL_CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addrs[..]))
        .await
        .map_err(|_| std::io::Error::other(format!("connecting to {authority} timed out")))??;
    let upgraded = on_upgrade.await.map_err(std::io::Error::other)?;
    let mut client = TokioIo::new(upgraded);
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let registries = [
            Registry::parse("registry.test.invalid").unwrap(),
            Registry::parse("r.test:5000").unwrap(),
        ];
        Policy::new(
            &registries,
            DEFAULT_TUNNEL_ALLOW.iter().map(|s| s.to_string()).collect(),
        )
    }

    fn intercepted(decision: Decision) -> String {
        match decision {
            Decision::Intercept { registry, .. } => registry.to_string(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn registry_hosts_are_intercepted() {
        let p = policy();
        assert_eq!(intercepted(p.decide("registry-1.docker.io:443")), "docker.io");
        assert_eq!(intercepted(p.decide("index.docker.io:443")), "docker.io");
        assert_eq!(
            intercepted(p.decide("Registry.Test.Invalid:443")),
            "registry.test.invalid"
        );
        assert_eq!(intercepted(p.decide("r.test:5000")), "r.test:5000");
        assert!(matches!(p.decide("r.test:443"), Decision::Refuse(_)));
    }

    #[test]
    fn token_and_cdn_hosts_tunnel_and_the_rest_is_refused() {
        let p = policy();
        assert_eq!(p.decide("auth.docker.io:443"), Decision::Tunnel);
        assert_eq!(p.decide("a1.cloudflare.docker.com:443"), Decision::Tunnel);
        for refused in [
            "cloudflare.docker.com:443",
            "evilcloudflare.docker.com:443",
            "auth.docker.io:22",
            "example.com:443",
            "169.254.169.254:80",
            "169.254.169.254:443",
            "127.0.0.1:5000",
            "[::1]:443",
            "[fe80::1]:443",
            "0.0.0.0:443",
            "nonsense",
        ] {
            assert!(matches!(p.decide(refused), Decision::Refuse(_)), "{refused}");
        }
    }

    #[test]
    fn an_explicit_loopback_registry_is_intercepted() {
        let p = Policy::new(&[Registry::parse("127.0.0.1:5000").unwrap()], Vec::new());
        assert_eq!(intercepted(p.decide("127.0.0.1:5000")), "127.0.0.1:5000");
    }
}
