//! Where upstream connections may go. Link-local, metadata and unspecified addresses never:
//! no registry name, mirror, redirect or token realm can steer pullcache at a cloud metadata
//! service. This node's loopback only for registries an operator mapped explicitly (their
//! URL, mirrors, redirects and realms); a name a client sends (`ns=localhost:8080`) may not
//! reach a port on the node. The rule holds for what a name *resolves to*, checked in the
//! resolver before any connection is made, as well as for IP literals.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::dns::Name;

/// Cloud metadata services outside link-local space: Alibaba Cloud's, and AWS's IPv6 one
/// (the usual 169.254.169.254 is link-local).
const METADATA: &[IpAddr] = &[
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

/// Addresses no registry ever lives at: link-local (which holds most metadata services),
/// metadata, unspecified, broadcast and multicast. Loopback is not here; see [`Reach`].
pub fn is_forbidden(ip: IpAddr) -> bool {
    METADATA.contains(&ip)
        || match ip {
            IpAddr::V4(v4) => v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast(),
            IpAddr::V6(v6) => {
                v6.is_unspecified()
                    || v6.is_multicast()
                    || (v6.segments()[0] & 0xffc0) == 0xfe80
                    || v6.to_ipv4_mapped().is_some_and(|v4| is_forbidden(IpAddr::V4(v4)))
            }
        }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// Whether this node's loopback is in reach, besides everything not forbidden.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Registries named by clients, and the default ones.
    Remote,
    /// Registries an operator mapped explicitly (`--upstream`, the config file).
    WithLoopback,
}

impl Reach {
    pub fn allows(self, ip: IpAddr) -> bool {
        !is_forbidden(ip) && (self == Reach::WithLoopback || !is_loopback(ip))
    }
}

/// Why an upstream URL or name may not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TargetError {
    #[error("{uri} is not an http(s) URL")]
    Scheme { uri: String },
    #[error("{uri} aims at a loopback, link-local, metadata or unspecified address")]
    Address { uri: String },
    #[error("{name} resolves only to loopback, link-local, metadata or unspecified addresses")]
    Resolved { name: String },
    #[error("Location header is not a URL")]
    Location,
}

/// A resolver for hyper-util's connector that drops the addresses `Reach` does not allow, and
/// fails with [`TargetError::Resolved`] when none is left. IP literals never reach it (the
/// connector parses them itself), so callers check those with [`check_target`].
#[derive(Clone)]
pub struct GuardedResolver(pub Reach);

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let reach = self.0;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|a| reach.allows(a.ip()))
                .collect();
            if addrs.is_empty() {
                let refused = TargetError::Resolved {
                    name: name.as_str().to_owned(),
                };
                return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, refused));
            }
            Ok(addrs.into_iter())
        })
    }
}

/// Whether a URL names this node: a loopback IP literal, `localhost` or `*.localhost`.
pub(super) fn is_local(uri: &Uri) -> bool {
    let host = uri.host().unwrap_or_default().to_ascii_lowercase();
    host_ip(uri).is_some_and(is_loopback) || host == "localhost" || host.ends_with(".localhost")
}

pub(super) fn host_ip(uri: &Uri) -> Option<std::net::IpAddr> {
    uri.host()?.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Refuses URLs that are not http(s) or whose host is an IP literal `reach` does not allow.
/// DNS names are checked by the resolver.
pub(super) fn check_target(uri: &Uri, reach: Reach) -> Result<(), TargetError> {
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(TargetError::Scheme { uri: uri.to_string() });
    }
    if let Some(ip) = host_ip(uri)
        && !reach.allows(ip)
    {
        return Err(TargetError::Address { uri: uri.to_string() });
    }
    Ok(())
}

/// The [`TargetError`] behind a failed connection, if the address policy refused it.
pub(super) fn refusal<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a TargetError> {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(refused) = e.downcast_ref::<TargetError>() {
            return Some(refused);
        }
        // An io::Error's `source` skips the error it wraps, so look inside it.
        if let Some(refused) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<TargetError>())
        {
            return Some(refused);
        }
        source = e.source();
    }
    None
}

/// Resolves a `Location` against the current URL.
pub(super) fn resolve_location(current: &Uri, location: &HeaderValue, reach: Reach) -> Result<Uri, TargetError> {
    let target: Uri = location
        .to_str()
        .ok()
        .and_then(|l| l.parse().ok())
        .ok_or(TargetError::Location)?;
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
        Uri::from_parts(parts).map_err(|_| TargetError::Location)?
    };
    check_target(&target, reach)?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_and_link_local_are_forbidden() {
        for bad in [
            "169.254.169.254",
            "169.254.0.1",
            "0.0.0.0",
            "fe80::1",
            "::",
            "::ffff:169.254.169.254",
            "224.0.0.1",
            "100.100.100.200",
            "fd00:ec2::254",
        ] {
            assert!(is_forbidden(bad.parse().unwrap()), "{bad}");
            assert!(!Reach::WithLoopback.allows(bad.parse().unwrap()), "{bad}");
        }
        for ok in ["127.0.0.1", "10.0.0.1", "8.8.8.8", "2001:db8::1", "::1"] {
            assert!(!is_forbidden(ok.parse().unwrap()), "{ok}");
        }
        for local in ["127.0.0.1", "127.8.9.1", "::1", "::ffff:127.0.0.1"] {
            assert!(!Reach::Remote.allows(local.parse().unwrap()), "{local}");
            assert!(Reach::WithLoopback.allows(local.parse().unwrap()), "{local}");
        }
    }

    #[test]
    fn local_urls() {
        for local in [
            "http://127.0.0.1:5000",
            "https://[::1]/",
            "http://localhost:1",
            "http://r.localhost",
        ] {
            assert!(is_local(&local.parse().unwrap()), "{local}");
        }
        for remote in ["https://10.0.0.5", "https://registry.test", "https://localhost.example"] {
            assert!(!is_local(&remote.parse().unwrap()), "{remote}");
        }
    }

    /// What a name resolves to is checked, not only literals: `localhost` is loopback.
    #[tokio::test]
    async fn the_resolver_refuses_names_that_resolve_to_loopback() {
        use tower_service::Service;
        let name: Name = "localhost".parse().unwrap();
        let err = GuardedResolver(Reach::Remote).call(name.clone()).await.unwrap_err();
        let err: &(dyn std::error::Error + 'static) = &err;
        assert!(matches!(refusal(err), Some(TargetError::Resolved { .. })), "{err}");
        let addrs: Vec<_> = GuardedResolver(Reach::WithLoopback).call(name).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }

    #[test]
    fn redirects_resolve_and_stay_off_forbidden_addresses() {
        let cur: Uri = "https://reg.test/v2/a/blobs/x".parse().unwrap();
        let rel = resolve_location(&cur, &HeaderValue::from_static("/storage/x?sig=1"), Reach::Remote).unwrap();
        assert_eq!(rel.to_string(), "https://reg.test/storage/x?sig=1");
        let abs = resolve_location(&cur, &HeaderValue::from_static("https://cdn.test/x"), Reach::Remote).unwrap();
        assert_eq!(abs.host(), Some("cdn.test"));
        for bad in [
            "http://169.254.169.254/latest/meta-data",
            "http://127.0.0.1:8080/",
            "file:///etc/passwd",
        ] {
            assert!(
                resolve_location(&cur, &HeaderValue::from_str(bad).unwrap(), Reach::Remote).is_err(),
                "{bad}"
            );
        }
        let local = HeaderValue::from_static("http://127.0.0.1:8080/");
        assert!(resolve_location(&cur, &local, Reach::WithLoopback).is_ok());
    }
}
