//! The words of the request path: [`Fetch`], the one outbound request (a manifest or blob of a
//! repository, by tag or digest, from an offset), sent alike to a peer and to a registry;
//! [`Asker`], who it is for; [`Credential`], what the registry is asked with; and
//! [`CacheResult`], how the cache answered.

use std::fmt;

use http::header::{ACCEPT, RANGE};
use http::{HeaderValue, Method, Uri};
use sha2::{Digest as _, Sha256};

use crate::oci::{AcceptClass, Clearance, Digest, Location, Reference, Registry, Repository};

/// What is fetched; it decides the path and how a 404 reads to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    Manifest,
    Blob,
    /// A repository's tag list (`/tags/list`), passed through and never stored.
    Tags,
    /// The manifests that name a digest as their subject (`/referrers/<digest>`), passed
    /// through and never stored.
    Referrers,
}

impl Resource {
    /// Whether it is a listing, passed through rather than stored.
    pub fn is_listing(self) -> bool {
        matches!(self, Resource::Tags | Resource::Referrers)
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Manifest => "manifests",
            Resource::Blob => "blobs",
            Resource::Tags => "tags",
            Resource::Referrers => "referrers",
        })
    }
}

/// Who asks for content: a client on this node, or another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Asker {
    Client,
    /// A peer. It is answered from the store, the local flight or the upstream, never by
    /// asking another peer.
    Peer,
}

/// How the cache answered a request, for the access log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// From the cache without asking upstream.
    Hit,
    /// Fetched (or being fetched) for this request.
    Miss,
    /// Joined another request's fetch.
    Coalesced,
    /// Upstream confirmed the cached tag.
    Revalidated,
    /// Upstream failed; the cached answer was served past its TTL.
    Stale,
    /// Answered by a source without caching anything (a `HEAD` of a blob not held).
    Bypass,
}

impl CacheResult {
    /// A closed set, for labels.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Coalesced => "coalesced",
            CacheResult::Revalidated => "revalidated",
            CacheResult::Stale => "stale",
            CacheResult::Bypass => "bypass",
        }
    }

    /// Where the bytes of the answer came from: the cache or a source outside it.
    pub fn source(self) -> Option<&'static str> {
        match self {
            CacheResult::Hit | CacheResult::Revalidated | CacheResult::Stale => Some("cache"),
            CacheResult::Miss | CacheResult::Coalesced => Some("upstream"),
            CacheResult::Bypass => None,
        }
    }
}

/// Whose credential a fetch from a registry carries.
#[derive(Debug, Clone, Default)]
pub enum Credential {
    /// pullcache's own for the registry when it holds some, else none.
    #[default]
    Own,
    /// Intercept mode, for a registry pullcache holds no credentials for: the `Authorization`
    /// the client sent, as it sent it, for this request only; never sent to a peer or to a
    /// registry's configured mirrors. With `anonymous_first` (a location known to be public),
    /// the request goes without it first, and with it only if the registry refuses or hides
    /// the content (401, 403, 404).
    Client { header: HeaderValue, anonymous_first: bool },
}

impl Credential {
    /// A client's `Authorization`, marked sensitive so no debug print shows it.
    pub fn client(header: &HeaderValue, anonymous_first: bool) -> Credential {
        let mut header = header.clone();
        header.set_sensitive(true);
        Credential::Client {
            header,
            anonymous_first,
        }
    }

    /// Whose it is, without the secret: fetches with different credentials never share a
    /// download, so one that fails (anonymous, or a neighbour's made-up credential) cannot
    /// fail another's.
    pub fn kind(&self) -> CredentialKind {
        match self {
            Credential::Own => CredentialKind::Own,
            Credential::Client { header, .. } => CredentialKind::Client(Sha256::digest(header.as_bytes()).into()),
        }
    }
}

/// [`Credential`] without the secret: pullcache's own, or a client's by the SHA-256 of its
/// `Authorization`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    Own,
    Client([u8; 32]),
}

/// One request for content, to a peer or a registry.
#[derive(Debug, Clone)]
pub struct Fetch {
    pub method: Method,
    pub registry: Registry,
    pub repository: Repository,
    pub resource: Resource,
    pub reference: Reference,
    pub accept: Option<HeaderValue>,
    /// Ask for the bytes from this offset on (`Range: bytes=N-`).
    pub from: Option<u64>,
    /// And up to this offset, included (`Range: bytes=N-M`): a client's span passed through.
    pub until: Option<u64>,
    /// What a registry is asked with (a peer is never sent a credential).
    pub credential: Credential,
    /// What the client it is for was cleared for at its location; a peer serves content
    /// private to the location only to a cleared asker.
    pub clearance: Option<Clearance>,
    /// A listing's query string (`n`, `last`, `artifactType`), already validated and encoded.
    pub query: Option<String>,
}

impl Fetch {
    pub fn manifest(
        method: Method,
        registry: &Registry,
        repository: &Repository,
        reference: Reference,
        accept: AcceptClass,
    ) -> Fetch {
        Fetch {
            method,
            registry: registry.clone(),
            repository: repository.clone(),
            resource: Resource::Manifest,
            reference,
            accept: Some(accept.header_value()),
            from: None,
            until: None,
            credential: Credential::Own,
            clearance: None,
            query: None,
        }
    }

    pub fn blob(method: Method, registry: &Registry, repository: &Repository, digest: &Digest) -> Fetch {
        Fetch {
            method,
            registry: registry.clone(),
            repository: repository.clone(),
            resource: Resource::Blob,
            reference: Reference::Digest(digest.clone()),
            accept: None,
            from: None,
            until: None,
            credential: Credential::Own,
            clearance: None,
            query: None,
        }
    }

    /// A GET of a listing: the tag list (`reference` is ignored), or the referrers of the
    /// digest `reference` names; `query` as [`Fetch::query`].
    pub fn listing(
        registry: &Registry,
        repository: &Repository,
        resource: Resource,
        reference: Reference,
        query: Option<String>,
    ) -> Fetch {
        debug_assert!(resource.is_listing());
        Fetch {
            method: Method::GET,
            registry: registry.clone(),
            repository: repository.clone(),
            resource,
            reference,
            accept: None,
            from: None,
            until: None,
            credential: Credential::Own,
            clearance: None,
            query,
        }
    }

    /// The same request, for a client cleared for `clearance`, with `credential` for the
    /// registry.
    pub fn authorized(self, credential: Credential, clearance: Option<Clearance>) -> Fetch {
        Fetch {
            credential,
            clearance,
            ..self
        }
    }

    /// The location it names.
    pub fn location(&self) -> Location {
        Location::new(&self.registry, &self.repository)
    }

    /// The same request from `from` on.
    /// The same request for bytes `from..=until` only.
    pub fn span(&self, from: u64, until: u64) -> Fetch {
        Fetch {
            from: Some(from),
            until: Some(until),
            ..self.clone()
        }
    }

    pub fn from_offset(&self, from: Option<u64>) -> Fetch {
        Fetch { from, ..self.clone() }
    }

    /// The digest it names, when it names content by one: only that can come from a peer (a
    /// listing, referrers of a digest included, never does).
    pub fn digest(&self) -> Option<&Digest> {
        match &self.reference {
            Reference::Digest(digest) if !self.resource.is_listing() => Some(digest),
            _ => None,
        }
    }

    /// `/v2/<repository>/<manifests|blobs|referrers>/<reference>` or
    /// `/v2/<repository>/tags/list`, with a listing's query.
    pub fn path(&self) -> String {
        let path = match self.resource {
            Resource::Tags => format!("/v2/{}/tags/list", self.repository),
            _ => format!("/v2/{}/{}/{}", self.repository, self.resource, self.reference),
        };
        match &self.query {
            Some(query) => format!("{path}?{query}"),
            None => path,
        }
    }

    /// A request for `uri` with the method, `Accept` and `Range` of this fetch; the caller
    /// adds what its hop needs (credentials, the peer headers).
    pub fn builder(&self, uri: Uri) -> http::request::Builder {
        let mut builder = http::Request::builder().method(self.method.clone()).uri(uri);
        if let Some(accept) = &self.accept {
            builder = builder.header(ACCEPT, accept.clone());
        }
        match (self.from, self.until) {
            (Some(from), Some(until)) => builder = builder.header(RANGE, format!("bytes={from}-{until}")),
            (Some(from), None) => builder = builder.header(RANGE, format!("bytes={from}-")),
            _ => {}
        }
        builder
    }

    /// The `kind` label: what was asked for, and how.
    pub fn kind(&self) -> &'static str {
        match (self.resource, self.method == Method::HEAD) {
            (Resource::Manifest, false) => "manifest",
            (Resource::Manifest, true) => "manifest_head",
            (Resource::Blob, false) => "blob",
            (Resource::Blob, true) => "blob_head",
            (Resource::Tags, _) => "tags",
            (Resource::Referrers, _) => "referrers",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_request_shape_for_every_hop() {
        let (registry, repository) = (Registry::docker_hub(), Repository::parse("library/x").unwrap());
        let digest = Digest::of(b"x");
        let fetch = Fetch::blob(Method::GET, &registry, &repository, &digest).from_offset(Some(7));
        assert_eq!(fetch.path(), format!("/v2/library/x/blobs/{digest}"));
        assert_eq!(fetch.digest(), Some(&digest));
        let request = fetch.builder("https://r.test/x".parse().unwrap()).body(()).unwrap();
        assert_eq!(request.headers()[RANGE], "bytes=7-");
        assert!(request.headers().get(ACCEPT).is_none());

        let tag = Reference::Tag(crate::oci::Tag::parse("v1").unwrap());
        let manifest = Fetch::manifest(Method::HEAD, &registry, &repository, tag, AcceptClass::all());
        assert_eq!(manifest.path(), "/v2/library/x/manifests/v1");
        assert_eq!((manifest.digest(), manifest.kind()), (None, "manifest_head"));
        let request = manifest.builder("https://r.test/x".parse().unwrap()).body(()).unwrap();
        assert!(request.headers().get(RANGE).is_none());
        assert!(request.headers().contains_key(ACCEPT));
    }
}
