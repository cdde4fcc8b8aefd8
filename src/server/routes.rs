//! Turning a request line into a route. The registry comes from `?ns=`, else from a first name
//! component that looks like a host, else Docker Hub. Names, tags and digests are validated here,
//! before anything else sees them.

use http::{Method, Uri};

use crate::error::{Error, RequestError};
use crate::oci::{Digest, Location, Reference, Registry, Repository, Tag};

/// The longest path and query accepted. The longest valid request (a 255-character name, a
/// digest and an `ns`) is far below it.
const MAX_URI_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`: the API version check.
    Ping,
    Manifest {
        target: Location,
        reference: Reference,
    },
    Blob {
        target: Location,
        digest: Digest,
    },
}

impl Route {
    /// A closed set, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Ping => "ping",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
        }
    }
}

/// Parses a request. `host` is the registry an intercepted connection is for; it names the
/// registry when the request has no `ns`.
pub fn parse(method: &Method, uri: &Uri, host: Option<&Registry>) -> Result<Route, Error> {
    let len = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if len > MAX_URI_LEN {
        return Err(RequestError::UriTooLong {
            len,
            limit: MAX_URI_LEN,
        }
        .into());
    }
    let path = uri.path();
    let read_only = || -> Result<(), Error> {
        if method == Method::GET || method == Method::HEAD {
            Ok(())
        } else {
            Err(RequestError::Method {
                method: method.to_string(),
            }
            .into())
        }
    };
    if path == "/v2" || path == "/v2/" {
        read_only()?;
        return Ok(Route::Ping);
    }
    let no_route = || -> Error {
        RequestError::NoRoute {
            path: path.chars().take(200).collect(),
        }
        .into()
    };
    let rest = path.strip_prefix("/v2/").ok_or_else(no_route)?;
    if rest == "_catalog" {
        return Err(RequestError::Unsupported {
            operation: "the catalog",
        }
        .into());
    }
    let mut parts = rest.rsplitn(3, '/');
    let (Some(reference), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(no_route());
    };
    match (kind, reference) {
        ("manifests" | "blobs", _) if !name.ends_with("/blobs") => {}
        ("tags", "list") => {
            return Err(RequestError::Unsupported {
                operation: "tag listing",
            }
            .into());
        }
        ("referrers", _) => {
            return Err(RequestError::Unsupported {
                operation: "the referrers API",
            }
            .into());
        }
        ("blobs", "uploads") | ("uploads", _) | (_, "uploads") => {
            return Err(RequestError::Unsupported { operation: "pushing" }.into());
        }
        _ => return Err(no_route()),
    }
    read_only()?;
    let target = target(name, uri.query(), host)?;
    if kind == "blobs" {
        return Ok(Route::Blob {
            target,
            digest: reference.parse()?,
        });
    }
    let reference = if reference.contains(':') {
        Reference::Digest(reference.parse()?)
    } else {
        // The spec answers a tag that cannot exist with 404 MANIFEST_UNKNOWN, not 400.
        Reference::Tag(Tag::parse(reference).map_err(|_| RequestError::ManifestUnknown {
            reference: reference.chars().take(200).collect(),
        })?)
    };
    Ok(Route::Manifest { target, reference })
}

fn target(name: &str, query: Option<&str>, host: Option<&Registry>) -> Result<Location, Error> {
    let ns = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "ns")
            .map(|(_, v)| v.into_owned())
    });
    let (registry, name) = match ns {
        Some(ns) => (Registry::parse(&ns)?, name),
        None if host.is_some() => (host.cloned().expect("checked"), name),
        None => match name.split_once('/') {
            Some((first, rest)) if Registry::looks_like_host(first) => (Registry::parse(first)?, rest),
            _ => (Registry::docker_hub(), name),
        },
    };
    let repository = Repository::parse(name)?.normalize_for(&registry)?;
    Ok(Location { registry, repository })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: Method, uri: &str) -> Result<Route, Error> {
        parse(&method, &uri.parse().unwrap(), None)
    }

    fn target_of(uri: &str) -> (String, String) {
        match route(Method::GET, uri).unwrap() {
            Route::Manifest { target, .. } | Route::Blob { target, .. } => {
                (target.registry.to_string(), target.repository.to_string())
            }
            Route::Ping => panic!("ping"),
        }
    }

    #[test]
    fn ping() {
        assert_eq!(route(Method::GET, "/v2/").unwrap(), Route::Ping);
        assert_eq!(route(Method::HEAD, "/v2").unwrap(), Route::Ping);
    }

    #[test]
    fn registry_selection() {
        assert_eq!(
            target_of("/v2/team/app/manifests/v1?ns=ghcr.io"),
            ("ghcr.io".into(), "team/app".into())
        );
        assert_eq!(
            target_of("/v2/alpine/manifests/3?ns=docker.io"),
            ("docker.io".into(), "library/alpine".into())
        );
        assert_eq!(
            target_of("/v2/alpine/manifests/3"),
            ("docker.io".into(), "library/alpine".into())
        );
        assert_eq!(
            target_of("/v2/quay.io/org/app/manifests/3"),
            ("quay.io".into(), "org/app".into())
        );
        assert_eq!(
            target_of("/v2/localhost:5000/app/manifests/3"),
            ("localhost:5000".into(), "app".into())
        );
        assert_eq!(
            target_of("/v2/org/app/manifests/3"),
            ("docker.io".into(), "org/app".into())
        );
    }

    #[test]
    fn an_intercepted_host_names_the_registry() {
        let host = Registry::parse("quay.io").unwrap();
        let route = parse(
            &Method::GET,
            &"/v2/org/app.io/manifests/1".parse().unwrap(),
            Some(&host),
        )
        .unwrap();
        let Route::Manifest { target, .. } = route else {
            panic!()
        };
        assert_eq!(
            (target.registry.as_str(), target.repository.as_str()),
            ("quay.io", "org/app.io")
        );
        let hub = Registry::docker_hub();
        let route = parse(&Method::GET, &"/v2/alpine/manifests/3".parse().unwrap(), Some(&hub)).unwrap();
        let Route::Manifest { target, .. } = route else {
            panic!()
        };
        assert_eq!(target.repository.as_str(), "library/alpine");
    }

    #[test]
    fn references() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        match route(Method::GET, &format!("/v2/a/b/manifests/{d}")).unwrap() {
            Route::Manifest {
                reference: Reference::Digest(got),
                ..
            } => assert_eq!(got.to_string(), d),
            other => panic!("{other:?}"),
        }
        match route(Method::HEAD, &format!("/v2/a/manifests/{d}?ns=r.test")).unwrap() {
            Route::Manifest { .. } => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            route(Method::GET, &format!("/v2/a/blobs/{d}")).unwrap(),
            Route::Blob { .. }
        ));
        // A repository may itself contain a "manifests" component.
        assert_eq!(
            target_of("/v2/a/manifests/x/manifests/v1"),
            ("docker.io".into(), "a/manifests/x".into())
        );
    }

    fn request_error(method: Method, uri: &str) -> RequestError {
        match route(method, uri) {
            Err(Error::Request(e)) => e,
            other => panic!("{uri}: {other:?}"),
        }
    }

    #[test]
    fn bad_input_is_refused_before_use() {
        for uri in [
            "/v2/../etc/manifests/v1",
            "/v2/a/%2e%2e/manifests/v1",
            "/v2/%2e%2e/manifests/v1",
            "/v2//a/manifests/v1",
            "/v2/a//b/manifests/v1",
            "/v2/A/manifests/v1",
            "/v2/a/manifests/v1?ns=169.254.169.254/x",
            "/v2/a/manifests/v1?ns=a%2Fb",
        ] {
            assert!(
                matches!(request_error(Method::GET, uri), RequestError::Name(_)),
                "{uri}"
            );
        }
        assert!(matches!(
            request_error(Method::GET, "/v2/a/manifests/bad:tag"),
            RequestError::Digest(_)
        ));
        assert!(matches!(
            request_error(Method::GET, "/v2/a/manifests/.INVALID_MANIFEST_NAME"),
            RequestError::ManifestUnknown { .. }
        ));
        assert!(matches!(
            request_error(Method::GET, "/v2/a/blobs/sha256:abc"),
            RequestError::Digest(_)
        ));
    }

    #[test]
    fn unsupported_operations() {
        assert!(matches!(
            request_error(Method::PUT, "/v2/a/manifests/v1"),
            RequestError::Method { .. }
        ));
        assert!(matches!(
            request_error(Method::DELETE, "/v2/a/blobs/sha256:abc"),
            RequestError::Method { .. }
        ));
        assert!(matches!(
            request_error(Method::POST, "/v2/a/blobs/uploads/"),
            RequestError::Unsupported { .. }
        ));
        assert!(matches!(
            request_error(Method::GET, "/v2/_catalog"),
            RequestError::Unsupported { .. }
        ));
        assert!(matches!(
            request_error(Method::GET, "/v2/a/tags/list"),
            RequestError::Unsupported { .. }
        ));
        assert!(matches!(
            request_error(Method::GET, "/v2/a/referrers/sha256:x"),
            RequestError::Unsupported { .. }
        ));
        assert!(matches!(
            request_error(Method::GET, "/v2/a/other/x"),
            RequestError::NoRoute { .. }
        ));
        assert!(matches!(
            request_error(Method::GET, "/v2/a"),
            RequestError::NoRoute { .. }
        ));
        assert!(matches!(
            request_error(Method::GET, "/metrics"),
            RequestError::NoRoute { .. }
        ));
    }
}
