//! HTTPS intercept mode: the listener is also an HTTP proxy. `CONNECT host:port` is decided
//! by [`Policy`]:
//! - a registry host (configured registries and their well-known API hosts) is intercepted:
//!   TLS is terminated with a leaf certificate from the cluster's [`Ca`], and the same routes
//!   and cache as mirror mode serve it, the registry taken from the host;
//! - a host on the tunnel allow-list (token and CDN hosts) is tunnelled byte for byte;
//! - everything else is refused with 403: this is no open proxy. Link-local, metadata and
//!   loopback targets are always refused unless they are an explicitly configured registry.
//!
//! This module owns the decisions, the CA, the TLS handshake and the [`tunnel`]s;
//! `server::proxy` answers the proxy requests with them.

mod secret;
pub mod tunnel;

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::IntCounterVec;
use tokio_rustls::server::TlsStream;

use crate::ca::{Ca, CaError};
pub use secret::{SecretOutcome, init_secret, init_secret_command};

use crate::oci::{DOCKER_HUB, DOCKER_HUB_ALIASES, Registry};

/// Token and CDN hosts of the default registries, tunnelled unless configured otherwise.
pub const DEFAULT_TUNNEL_ALLOW: &[&str] = &[
    "auth.docker.io",
    "production.cloudflare.docker.com",
    "*.cloudflare.docker.com",
];

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
        // Docker Hub's API hosts, all cached as `docker.io`.
        for host in std::iter::once(&DOCKER_HUB).chain(DOCKER_HUB_ALIASES) {
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
        for decision in ["intercept", "tunnel", "refuse"] {
            connects.with_label_values(&[decision]);
        }
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

    /// The certificate presented for an intercepted `host`.
    pub fn leaf(&self, host: &str) -> Result<Arc<rustls::sign::CertifiedKey>, CaError> {
        self.ca.leaf(host)
    }
}

/// Terminates TLS on an intercepted connection with `leaf`, offering h2 and http/1.1. A client
/// that does not trust the CA fails here, and is served nothing.
pub async fn accept<IO>(leaf: Arc<rustls::sign::CertifiedKey>, io: IO) -> std::io::Result<TlsStream<IO>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tls_acceptor(leaf).accept(io).await
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
