//! Where upstream connections may go. DNS answers that are link-local or unspecified are
//! refused, and so are redirect and token-realm URLs aimed at such IP literals (or at loopback,
//! unless the registry itself was configured there), so no registry name, redirect or
//! challenge can steer pullcache at a cloud metadata service or this node.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::dns::Name;

/// Addresses no registry ever lives at. Loopback is not here: an operator may map a registry
/// to `localhost` explicitly; unmapped registry names that are IP literals are checked by
/// [`super::Upstreams`].
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast(),
        IpAddr::V6(v6) => {
            v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| is_forbidden(IpAddr::V4(v4)))
        }
    }
}

/// A resolver for hyper-util's connector. IP literals never reach it (the connector parses
/// them itself), so callers check those with [`is_forbidden`].
#[derive(Clone, Default)]
pub struct GuardedResolver;

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|a| !is_forbidden(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{name} resolves to no address an upstream may have"),
                ));
            }
            Ok(addrs.into_iter())
        })
    }
}

pub(super) fn host_ip(uri: &Uri) -> Option<std::net::IpAddr> {
    uri.host()?.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Refuses URLs that are not http(s) or that aim at forbidden (or, unless allowed, loopback)
/// IP literals. DNS names are checked by the resolver.
pub(super) fn check_target(uri: &Uri, allow_loopback: bool) -> Result<(), String> {
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
pub(super) fn resolve_location(current: &Uri, location: &HeaderValue, allow_loopback: bool) -> Result<Uri, String> {
    let location = location.to_str().map_err(|_| "Location is not text".to_owned())?;
    let target: Uri = location.parse().map_err(|_| "Location is not a URL".to_owned())?;
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
        ] {
            assert!(is_forbidden(bad.parse().unwrap()), "{bad}");
        }
        for ok in ["127.0.0.1", "10.0.0.1", "8.8.8.8", "2001:db8::1", "::1"] {
            assert!(!is_forbidden(ok.parse().unwrap()), "{ok}");
        }
    }

    #[test]
    fn redirects_resolve_and_stay_off_forbidden_addresses() {
        let cur: Uri = "https://reg.test/v2/a/blobs/x".parse().unwrap();
        let rel = resolve_location(&cur, &HeaderValue::from_static("/storage/x?sig=1"), false).unwrap();
        assert_eq!(rel.to_string(), "https://reg.test/storage/x?sig=1");
        let abs = resolve_location(&cur, &HeaderValue::from_static("https://cdn.test/x"), false).unwrap();
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
        assert!(resolve_location(&cur, &HeaderValue::from_static("http://127.0.0.1:8080/"), true).is_ok());
    }
}
