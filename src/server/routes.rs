//! Turning a request line into a route. The registry comes from `?ns=`, else from a first name
//! component that looks like a host, else Docker Hub. Names, tags and digests are validated here,
//! before anything else sees them.

use http::{Method, Uri};

use crate::error::{Error, RequestError};
use crate::fetch::Resource;
use crate::listings::{Listing, View};
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
    /// `GET /v2/<name>/tags/list` and `GET /v2/<name>/referrers/<digest>`: passed through.
    Listing {
        target: Location,
        listing: Listing,
        view: View,
        /// The request's path, and its `ns` if it had one: where a next page is linked.
        base: String,
    },
}

/// The most tags a client may ask for in one page; larger `n` is sent as this.
pub const MAX_PAGE: u32 = 10_000;

/// A tag list's view: `n` (at most [`MAX_PAGE`]) and `last`.
fn tags(query: Option<&str>) -> Result<(Listing, View), Error> {
    let n = match param(query, "n") {
        Some(n) => Some(
            n.parse::<u32>()
                .map_err(|_| RequestError::Query {
                    reason: "n is not a count",
                })?
                .min(MAX_PAGE),
        ),
        None => None,
    };
    let last = match param(query, "last") {
        Some(last) => Some(
            Tag::parse(&last)
                .map_err(|_| RequestError::Query {
                    reason: "last is not a tag",
                })?
                .as_str()
                .to_owned(),
        ),
        None => None,
    };
    let listing = Listing {
        resource: Resource::Tags,
        subject: None,
    };
    Ok((
        listing,
        View {
            n,
            last,
            artifact_type: None,
        },
    ))
}

/// Referrers' view: `artifactType`, a media type.
fn referrers(subject: Digest, query: Option<&str>) -> Result<(Listing, View), Error> {
    let artifact_type = match param(query, "artifactType") {
        Some(kind) if crate::oci::is_valid_media_type(&kind) => Some(kind),
        Some(_) => {
            return Err(RequestError::Query {
                reason: "artifactType is not a media type",
            }
            .into());
        }
        None => None,
    };
    let listing = Listing {
        resource: Resource::Referrers,
        subject: Some(subject),
    };
    Ok((
        listing,
        View {
            artifact_type,
            ..View::default()
        },
    ))
}

/// Where a listing's next page is linked: the request's path, with its `ns`.
fn base(path: &str, query: Option<&str>) -> String {
    match param(query, "ns") {
        Some(ns) => format!(
            "{path}?{}&",
            form_urlencoded::Serializer::new(String::new())
                .append_pair("ns", &ns)
                .finish()
        ),
        None => format!("{path}?"),
    }
}

/// The first value of `name` in a query string.
fn param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

impl Route {
    /// A closed set, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Ping => "ping",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::Listing { listing, .. } => match listing.resource {
                Resource::Referrers => "referrers",
                _ => "tags",
            },
        }
    }
}

/// Refuses a path and query longer than any valid request's.
pub fn within_limit(uri: &Uri) -> Result<(), Error> {
    let len = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if len > MAX_URI_LEN {
        return Err(RequestError::UriTooLong {
            len,
            limit: MAX_URI_LEN,
        }
        .into());
    }
    Ok(())
}

/// Whether intercept mode passes a request to the registry untouched: a push (any request
/// about a blob upload, `/v2/<name>/blobs/uploads/...`, its status `GET` included, or a
/// manifest or blob written or deleted), or a blob's `HEAD`: a pusher asks it whether the
/// registry's repository holds the blob, which the cache cannot answer for the registry.
/// Mirror mode refuses pushes (containerd never pushes to a mirror).
pub fn passes_through(method: &Method, path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/v2/").filter(|r| !r.is_empty()) else {
        return false;
    };
    let blob = rest.contains("/blobs/");
    if rest.contains("/blobs/uploads") || method == Method::HEAD && blob {
        return true;
    }
    method != Method::GET && method != Method::HEAD && (blob || rest.contains("/manifests/"))
}

/// Parses a request. `host` is the registry an intercepted connection is for; it names the
/// registry when the request has no `ns`.
/// `default` is the registry of a request that names none (`--default-registry`).
pub fn parse(method: &Method, uri: &Uri, host: Option<&Registry>, default: &Registry) -> Result<Route, Error> {
    within_limit(uri)?;
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
            read_only()?;
            let (listing, view) = tags(uri.query())?;
            return Ok(Route::Listing {
                target: target(name, uri.query(), host, default)?,
                listing,
                view,
                base: base(path, uri.query()),
            });
        }
        ("referrers", digest) => {
            read_only()?;
            let (listing, view) = referrers(digest.parse()?, uri.query())?;
            return Ok(Route::Listing {
                target: target(name, uri.query(), host, default)?,
                listing,
                view,
                base: base(path, uri.query()),
            });
        }
        ("blobs", "uploads") | ("uploads", _) | (_, "uploads") => {
            return Err(RequestError::Unsupported { operation: "pushing" }.into());
        }
        _ => return Err(no_route()),
    }
    read_only()?;
    let target = target(name, uri.query(), host, default)?;
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

fn target(name: &str, query: Option<&str>, host: Option<&Registry>, default: &Registry) -> Result<Location, Error> {
    let ns = param(query, "ns");
    let (registry, name) = match ns {
        Some(ns) => (Registry::parse(&ns)?, name),
        None if host.is_some() => (host.cloned().expect("checked"), name),
        None => match name.split_once('/') {
            Some((first, rest)) if Registry::looks_like_host(first) => (Registry::parse(first)?, rest),
            _ => (default.clone(), name),
        },
    };
    let repository = Repository::parse(name)?.normalize_for(&registry)?;
    Ok(Location { registry, repository })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: Method, uri: &str) -> Result<Route, Error> {
        parse(&method, &uri.parse().unwrap(), None, &Registry::docker_hub())
    }

    fn target_of(uri: &str) -> (String, String) {
        match route(Method::GET, uri).unwrap() {
            Route::Manifest { target, .. } | Route::Blob { target, .. } | Route::Listing { target, .. } => {
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
            &Registry::docker_hub(),
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
        let route = parse(
            &Method::GET,
            &"/v2/alpine/manifests/3".parse().unwrap(),
            Some(&hub),
            &hub,
        )
        .unwrap();
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

    fn listing(uri: &str) -> (Location, Listing, View, String) {
        match route(Method::GET, uri).unwrap() {
            Route::Listing {
                target,
                listing,
                view,
                base,
            } => (target, listing, view, base),
            other => panic!("not a listing: {other:?}"),
        }
    }

    #[test]
    fn listings_take_only_what_the_spec_defines() {
        let (target, tags, view, base) = listing("/v2/team/app/tags/list?ns=ghcr.io&n=10&last=v1.2&junk=x");
        assert_eq!(target.registry.as_str(), "ghcr.io");
        assert_eq!(tags.resource, Resource::Tags);
        assert_eq!((view.n, view.last.as_deref()), (Some(10), Some("v1.2")));
        assert_eq!(base, "/v2/team/app/tags/list?ns=ghcr.io&");
        assert_eq!(listing("/v2/a/tags/list").2, View::default());
        assert_eq!(listing("/v2/a/tags/list").3, "/v2/a/tags/list?");
        assert_eq!(listing("/v2/a/tags/list?n=4000000000").2.n, Some(MAX_PAGE));
        let digest = Digest::of(b"x");
        let (_, referrers, view, _) = listing(&format!(
            "/v2/a/referrers/{digest}?artifactType=application%2Fvnd.dev.cosign.artifact.sig.v1%2Bjson"
        ));
        assert_eq!(referrers.resource, Resource::Referrers);
        assert_eq!(referrers.subject, Some(digest.clone()));
        assert_eq!(
            view.artifact_type.as_deref(),
            Some("application/vnd.dev.cosign.artifact.sig.v1+json")
        );
        for bad in [
            "/v2/a/tags/list?n=-1".to_owned(),
            "/v2/a/tags/list?n=ten".to_owned(),
            "/v2/a/tags/list?last=../x".to_owned(),
            format!("/v2/a/referrers/{digest}?artifactType=not%20a%20type"),
        ] {
            assert!(
                matches!(request_error(Method::GET, &bad), RequestError::Query { .. }),
                "{bad}"
            );
        }
        assert!(matches!(
            request_error(Method::GET, "/v2/a/referrers/sha256:x"),
            RequestError::Digest(_)
        ));
        assert!(matches!(
            request_error(Method::DELETE, "/v2/a/tags/list"),
            RequestError::Method { .. }
        ));
        assert_eq!(route(Method::HEAD, "/v2/a/tags/list").unwrap().kind(), "tags");
    }

    #[test]
    fn what_intercept_mode_passes_through() {
        let digest = Digest::of(b"x");
        for (method, path) in [
            (Method::POST, "/v2/a/b/blobs/uploads/".to_owned()),
            (Method::POST, format!("/v2/a/blobs/uploads/?mount={digest}&from=c")),
            (Method::PATCH, "/v2/a/blobs/uploads/uuid".to_owned()),
            (Method::PUT, format!("/v2/a/blobs/uploads/uuid?digest={digest}")),
            (Method::GET, "/v2/a/blobs/uploads/uuid".to_owned()),
            (Method::DELETE, "/v2/a/blobs/uploads/uuid".to_owned()),
            (Method::PUT, "/v2/a/manifests/v1".to_owned()),
            (Method::DELETE, format!("/v2/a/manifests/{digest}")),
            (Method::DELETE, format!("/v2/a/blobs/{digest}")),
            (Method::HEAD, format!("/v2/a/blobs/{digest}")),
        ] {
            assert!(passes_through(&method, &path), "{method} {path}");
        }
        for (method, path) in [
            (Method::GET, format!("/v2/a/blobs/{digest}")),
            (Method::GET, "/v2/a/manifests/v1".to_owned()),
            (Method::HEAD, "/v2/a/manifests/v1".to_owned()),
            (Method::GET, "/v2/a/tags/list".to_owned()),
            (Method::POST, "/v2/".to_owned()),
            (Method::POST, "/token".to_owned()),
        ] {
            assert!(!passes_through(&method, &path), "{method} {path}");
        }
    }
}
