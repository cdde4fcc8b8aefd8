//! Manifests: by digest from the store forever once verified; by tag from the tag index while
//! younger than the TTL, then revalidated by one coalesced upstream HEAD (a GET only when the
//! digest moved). When the upstream fails or rate-limits, a stale answer is served.
//!
//! Every answer carries its [`Provenance`], and a requester is served it only once its
//! [`Access`] lets it: lookups are coalesced per location, and a stored manifest private to
//! another location is a miss for this one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Method;
use http::header::CONTENT_TYPE;

use crate::authorize::{Access, AccessError, Grant};
use crate::coalesce::Coalesce;
use crate::error::{Error, InternalError, Result};
use crate::fetch::{Asker, CacheResult, Credential, CredentialKind, Fetch, Resource};
use crate::oci::{
    AcceptClass, Digest, Location, MAX_MANIFEST_SIZE, Mismatch, Origin, Provenance, Reference, Registry, Tag,
};
use crate::sources::{Sources, Stream};
use crate::store::{CommitError, Store, TagKey, TagRecord};
use crate::upstream::{UpstreamError, UpstreamErrorKind};
use crate::wire::DOCKER_CONTENT_DIGEST;

/// How long a client with a stale tag answer waits for its revalidation before the stale
/// answer is served.
const REVALIDATE_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    pub cache: CacheResult,
    /// Where its bytes came from, as stored.
    pub provenance: Provenance,
}

type Shared<T> = std::result::Result<T, Arc<Error>>;

pub struct Manifests {
    store: Arc<Store>,
    sources: Arc<Sources>,
    tag_ttl: Duration,
    tag_ttls: HashMap<Registry, Duration>,
    /// Keyed also by whose credential revalidates: a lookup that fails (anonymous, or with a
    /// neighbour's made-up credential) must not fail a client's.
    by_tag: Coalesce<(TagKey, CredentialKind), Shared<Manifest>>,
    by_digest: Arc<ByDigest>,
}

impl Manifests {
    /// `tag_ttls` overrides `tag_ttl` for some registries.
    pub fn new(
        store: Arc<Store>,
        sources: Arc<Sources>,
        tag_ttl: Duration,
        tag_ttls: HashMap<Registry, Duration>,
    ) -> Manifests {
        Manifests {
            store,
            sources,
            tag_ttl,
            tag_ttls,
            by_tag: Coalesce::default(),
            by_digest: Arc::default(),
        }
    }

    #[tracing::instrument(skip_all, fields(registry = %access.location.registry, repo = %access.location.repository, reference = %reference))]
    pub async fn get(&self, access: &Access<'_>, reference: &Reference, accept: AcceptClass) -> Result<Manifest> {
        let manifest = match reference {
            Reference::Digest(digest) => self.by_digest(access, digest).await?,
            Reference::Tag(tag) => self.by_tag(access, tag, accept).await?,
        };
        // Whatever the lookup found or joined, this requester is served it only if it may.
        if !access.serves(&manifest.provenance).await? {
            let location = access.location;
            return Err(Error::Access(AccessError::NotInRepository {
                registry: location.registry.clone(),
                repository: location.repository.clone(),
                resource: Resource::Manifest,
                reference: reference.clone(),
            }));
        }
        Ok(manifest)
    }

    fn lookup(&self, location: &Location, asker: Asker, grant: Grant) -> Lookup {
        Lookup {
            by_digest: self.by_digest.clone(),
            store: self.store.clone(),
            sources: self.sources.clone(),
            asker,
            location: location.clone(),
            grant,
        }
    }

    async fn by_digest(&self, access: &Access<'_>, digest: &Digest) -> Result<Manifest> {
        if let Some(m) = stored(&self.store, digest, CacheResult::Hit).await?
            && access.serves(&m.provenance).await?
        {
            return Ok(m);
        }
        let grant = access.grant().await?;
        self.lookup(access.location, access.asker, grant)
            .coalesced(digest)
            .await
    }

    async fn by_tag(&self, access: &Access<'_>, tag: &Tag, accept: AcceptClass) -> Result<Manifest> {
        let location = access.location;
        let key = TagKey {
            registry: location.registry.clone(),
            repository: location.repository.clone(),
            tag: tag.clone(),
            accept,
        };
        let record = self.store.tags().get(&key);
        let cached = match &record {
            Some(record) => match stored(&self.store, &record.digest, CacheResult::Hit).await? {
                // A record whose manifest this requester may not be served under this name
                // is no answer for it.
                Some(m) if access.serves(&m.provenance).await? => Some(m),
                _ => None,
            },
            None => None,
        };
        // Offline, a cached tag is as fresh as it will ever get.
        if let (Some(record), Some(cached)) = (&record, &cached)
            && (self.sources.upstreams().is_offline()
                || record.age() < *self.tag_ttls.get(&location.registry).unwrap_or(&self.tag_ttl))
        {
            return Ok(cached.clone());
        }
        // A public answer is revalidated as anyone would, with nothing to check: a registry
        // that cannot be asked then still leaves the stale answer to serve.
        let grant = match &cached {
            Some(cached) if cached.provenance.public => Grant {
                credential: Credential::Own,
                clearance: None,
            },
            _ => access.grant().await?,
        };
        let lookup = self.lookup(location, Asker::Client, grant);
        let revalidation = self.by_tag.run((key.clone(), lookup.grant.credential.kind()), {
            let cached = cached.clone();
            async move { lookup.revalidate(key, cached).await.map_err(Arc::new) }
        });
        // With an answer in hand, a slow upstream does not hold the client: the stale answer
        // goes out and the revalidation finishes in the background.
        let (result, joined) = match cached {
            Some(cached) => match tokio::time::timeout(REVALIDATE_WAIT, revalidation).await {
                Ok(outcome) => outcome?,
                Err(_) => {
                    tracing::warn!(digest = %cached.digest, "upstream slow; serving stale tag while it revalidates");
                    return Ok(Manifest {
                        cache: CacheResult::Stale,
                        ..cached
                    });
                }
            },
            None => revalidation.await?,
        };
        let mut manifest = result.map_err(Error::Shared)?;
        if joined && manifest.cache != CacheResult::Stale {
            manifest.cache = CacheResult::Coalesced;
        }
        Ok(manifest)
    }
}

/// A stored manifest: from memory, or read off the blocking pool.
async fn stored(store: &Arc<Store>, digest: &Digest, cache: CacheResult) -> Result<Option<Manifest>> {
    let found = match store.hot_manifest(digest) {
        Some(found) => Some(found),
        None => {
            let (store, d) = (store.clone(), digest.clone());
            tokio::task::spawn_blocking(move || store.manifest(&d))
                .await
                .map_err(InternalError::task("manifest read"))??
        }
    };
    Ok(found.map(|(bytes, media_type)| Manifest {
        digest: digest.clone(),
        media_type,
        bytes,
        cache,
        provenance: store.provenance(digest),
    }))
}

/// A stored manifest that may be served under the lookup's location to a requester with its
/// clearance (or, not checked, to someone: the requester's own [`Access`] asks afterwards).
async fn stored_for(lookup: &Lookup, digest: &Digest, cache: CacheResult) -> Result<Option<Manifest>> {
    let location = &lookup.location;
    Ok(stored(&lookup.store, digest, cache)
        .await?
        .filter(|m| match lookup.grant.clearance {
            Some(clearance) => m.provenance.clears(location, clearance),
            None => m.provenance.serves(location),
        }))
}

/// Concurrent lookups of one digest at one location with one credential share one fetch, keyed also by whether the fetch asks peers: a lookup that may not (a peer's, or this node's for a digest it owns)
/// never joins one that does, which could be waiting for the very peer asking.
type ByDigest = Coalesce<(Digest, Location, bool, CredentialKind), Shared<Manifest>>;

/// The upstream side of a manifest lookup, owned so it can run in a coalesced task.
#[derive(Clone)]
struct Lookup {
    by_digest: Arc<ByDigest>,
    store: Arc<Store>,
    sources: Arc<Sources>,
    asker: Asker,
    location: Location,
    /// What the fetches are made with.
    grant: Grant,
}

impl Lookup {
    /// Revalidates (or first fetches) a tag. A failed upstream falls back to the stale record,
    /// or to an answer cached for a client that accepted more, if this client takes its media
    /// type; but not when the upstream says the tag does not exist.
    async fn revalidate(&self, key: TagKey, cached: Option<Manifest>) -> Result<Manifest> {
        let cached = cached.map(|m| Manifest {
            cache: CacheResult::Revalidated,
            ..m
        });
        let tag = &key.tag;
        let fresh = match &cached {
            None => self.fetch_tag(tag, key.accept, None).await,
            Some(cached) => match self.head_digest(tag, key.accept).await {
                Ok(Some(digest)) if digest == cached.digest => Ok(cached.clone()),
                Ok(moved) => self.fetch_tag(tag, key.accept, moved).await,
                Err(e) => Err(e),
            },
        };
        let e = match fresh {
            Ok(manifest) => {
                self.remember(key, &manifest)?;
                return Ok(manifest);
            }
            Err(e) if e.is_not_found() => return Err(e),
            Err(e) => e,
        };
        let stale = match cached {
            Some(cached) => Some(cached),
            None => self.compatible(&key).await?,
        };
        match stale {
            Some(stale) => {
                tracing::warn!(error = %e, digest = %stale.digest, "upstream failed; serving stale tag");
                Ok(Manifest {
                    cache: CacheResult::Stale,
                    ..stale
                })
            }
            None => Err(e),
        }
    }

    /// A stored answer for the tag under another accept class that this client takes.
    async fn compatible(&self, key: &TagKey) -> Result<Option<Manifest>> {
        for record in self.store.tags().compatible(key) {
            if let Some(m) = stored_for(self, &record.digest, CacheResult::Stale).await? {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    fn remember(&self, key: TagKey, manifest: &Manifest) -> Result<()> {
        let record = TagRecord {
            digest: manifest.digest.clone(),
            media_type: manifest.media_type.clone(),
            fetched_at: SystemTime::now(),
            imported: false,
        };
        self.store.tags().put(key, record)?;
        Ok(())
    }

    /// The digest a HEAD of the tag reports, if it reports one.
    async fn head_digest(&self, tag: &Tag, accept: AcceptClass) -> Result<Option<Digest>> {
        let fetch = self.fetch(Method::HEAD, Reference::Tag(tag.clone()), accept);
        let mut chain = self.sources.chain(fetch, self.asker);
        let stream = chain.open().await?;
        Ok(stream
            .head
            .headers
            .get(DOCKER_CONTENT_DIGEST)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
    }

    fn fetch(&self, method: Method, reference: Reference, accept: AcceptClass) -> Fetch {
        let location = &self.location;
        self.grant.apply(Fetch::manifest(
            method,
            &location.registry,
            &location.repository,
            reference,
            accept,
        ))
    }

    /// A tag's manifest. In cluster mode the tag is resolved here with a HEAD (`known`, when
    /// a revalidation already did), and the body comes by digest through the peers, so a
    /// rollout costs the cluster one manifest GET upstream, by its owner.
    async fn fetch_tag(&self, tag: &Tag, accept: AcceptClass, known: Option<Digest>) -> Result<Manifest> {
        if self.sources.clustered() {
            let digest = match known {
                Some(digest) => Some(digest),
                None => self.head_digest(tag, accept).await?,
            };
            if let Some(digest) = digest {
                return match stored_for(self, &digest, CacheResult::Hit).await? {
                    Some(manifest) => Ok(manifest),
                    None => self.coalesced(&digest).await,
                };
            }
        }
        self.get(Reference::Tag(tag.clone()), accept, None).await
    }

    /// The manifest `digest`, fetched once however many lookups want it at the same time.
    async fn coalesced(&self, digest: &Digest) -> Result<Manifest> {
        let asks_peers = self.sources.asks_peers(digest, self.asker);
        let (lookup, digest_owned) = (self.clone(), digest.clone());
        let key = (
            digest.clone(),
            self.location.clone(),
            asks_peers,
            self.grant.credential.kind(),
        );
        let (result, joined) = self
            .by_digest
            .run(key, async move {
                // A fetch that ended between this caller's look at the store and here has
                // stored it: look again rather than fetch it twice.
                let stored = stored_for(&lookup, &digest_owned, CacheResult::Hit).await;
                let fetched = match stored {
                    Ok(Some(manifest)) => Ok(manifest),
                    Ok(None) => {
                        let reference = Reference::Digest(digest_owned.clone());
                        lookup.get(reference, AcceptClass::all(), Some(&digest_owned)).await
                    }
                    Err(e) => Err(e),
                };
                fetched.map_err(Arc::new)
            })
            .await?;
        let mut manifest = result.map_err(Error::Shared)?;
        if joined {
            manifest.cache = CacheResult::Coalesced;
        }
        Ok(manifest)
    }

    /// GETs a manifest through the sources (by digest in cluster mode, the peers first),
    /// verifies it (against `expected`, else against the source's `Docker-Content-Digest`
    /// when given) and stores it. A peer whose answer does not verify is skipped, and the next
    /// source asked.
    async fn get(&self, reference: Reference, accept: AcceptClass, expected: Option<&Digest>) -> Result<Manifest> {
        let mut chain = self
            .sources
            .chain(self.fetch(Method::GET, reference, accept), self.asker);
        loop {
            let stream = chain.open().await?;
            let peer = stream.peer();
            match (self.keep(stream, expected).await, peer) {
                (Ok(manifest), _) => return Ok(manifest),
                (Err(e), Some(peer)) => {
                    tracing::warn!(%peer, error = %e, "peer manifest refused");
                    chain.reject(e.is_mismatch());
                }
                (Err(e), None) => return Err(e),
            }
        }
    }

    /// Reads a manifest response, verifies it and stores it.
    async fn keep(&self, stream: Stream<'_>, expected: Option<&Digest>) -> Result<Manifest> {
        let headers = &stream.head.headers;
        let header_digest: Option<Digest> = headers
            .get(DOCKER_CONTENT_DIGEST)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let content_type = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
        let stream_visibility = stream.visibility();
        let bytes = stream.collect(MAX_MANIFEST_SIZE).await?;
        let digest = Digest::of(&bytes);
        if let Some(want) = expected.or(header_digest.as_ref()) {
            let size = bytes.len() as u64;
            Mismatch::check(want, None, digest.clone(), size).map_err(|m| self.error(m.into()))?;
        }
        // The manifest's own word first: a registry's `Content-Type` for the same bytes may
        // differ from another's.
        let media_type = media_type_field(&bytes)
            .or_else(|| content_type.filter(|t| crate::oci::is_manifest_media_type(t)))
            .ok_or_else(|| self.error(UpstreamErrorKind::Body("manifest has no known media type".into())))?;
        let origin = Origin::new(&self.location, self.grant.visibility(stream_visibility));
        let (store, d, t, b) = (self.store.clone(), digest.clone(), media_type.clone(), bytes.clone());
        let provenance = tokio::task::spawn_blocking(move || {
            store.put_manifest(&d, &t, &b, Some(&origin))?;
            Ok(store.provenance(&d))
        })
        .await
        .map_err(InternalError::task("manifest write"))?
        .map_err(|e| match e {
            CommitError::Io(e) => Error::Store(e),
            source => InternalError::Commit {
                what: "a manifest",
                source,
            }
            .into(),
        })?;
        Ok(Manifest {
            digest,
            media_type,
            bytes,
            cache: CacheResult::Miss,
            provenance,
        })
    }

    fn error(&self, kind: UpstreamErrorKind) -> Error {
        UpstreamError::new(&self.location.registry, kind).into()
    }
}

/// The `mediaType` a manifest declares in its own JSON, when it is a manifest type.
fn media_type_field(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Head>(bytes)
        .ok()?
        .media_type
        .filter(|t| crate::oci::is_manifest_media_type(t))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use http::header::CONTENT_LENGTH;
    use http::{Response, StatusCode};
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;
    use crate::authorize::{Authorizer, Object, Via};
    use crate::upstream::{RegistrySettings, Upstreams};

    const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[]}"#;
    const MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

    /// A registry on loopback serving one manifest under every tag and its digest, recording
    /// `METHOD path` of each request. `status` overrides every answer while set.
    #[derive(Default)]
    struct Registry {
        seen: Mutex<Vec<String>>,
        status: Mutex<Option<StatusCode>>,
        /// A `Docker-Content-Digest` that is not the manifest's.
        lie: Mutex<bool>,
        /// While true, answers wait.
        hold: tokio::sync::watch::Sender<bool>,
    }

    impl Registry {
        fn answer(&self, req: &http::Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
            self.seen
                .lock()
                .unwrap()
                .push(format!("{} {}", req.method(), req.uri().path()));
            if let Some(status) = *self.status.lock().unwrap() {
                return Response::builder().status(status).body(Full::default()).unwrap();
            }
            let digest = if *self.lie.lock().unwrap() {
                Digest::of(b"something else")
            } else {
                Digest::of(MANIFEST)
            };
            let body = if req.method() == Method::HEAD {
                Bytes::new()
            } else {
                Bytes::from_static(MANIFEST)
            };
            Response::builder()
                .header(CONTENT_TYPE, MEDIA_TYPE)
                .header(CONTENT_LENGTH, MANIFEST.len())
                .header(DOCKER_CONTENT_DIGEST, digest.to_string())
                .body(Full::new(body))
                .unwrap()
        }

        fn seen(&self) -> Vec<String> {
            std::mem::take(&mut *self.seen.lock().unwrap())
        }
    }

    struct Fixture {
        manifests: Manifests,
        authorize: Authorizer,
        registry: Arc<Registry>,
        _dir: tempfile::TempDir,
    }

    /// Manifests over a fresh store, with `up.test` mapped to a [`Registry`] and tags fresh
    /// for `ttl`.
    async fn fixture(ttl: Duration) -> Fixture {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let registry: Arc<Registry> = Arc::default();
        let serving = registry.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let registry = serving.clone();
                let service = service_fn(move |req| {
                    let resp = registry.answer(&req);
                    let mut hold = registry.hold.subscribe();
                    async move {
                        let _ = hold.wait_for(|hold| !*hold).await;
                        Ok::<_, Infallible>(resp)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        let mut settings = crate::upstream::Settings::default();
        settings.registries.insert(
            up(),
            RegistrySettings {
                url: Some(format!("http://{addr}").parse().unwrap()),
                ..RegistrySettings::default()
            },
        );
        let prometheus = prometheus::Registry::new();
        let metrics = crate::upstream::Metrics::register(&prometheus).unwrap();
        let upstreams = Arc::new(Upstreams::new(settings, metrics));
        let authorize = Authorizer::new(
            upstreams.clone(),
            crate::authorize::Settings::default(),
            crate::authorize::Metrics::register(&prometheus).unwrap(),
        );
        let sources = Sources::new(upstreams, None);
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        Fixture {
            manifests: Manifests::new(store, Arc::new(sources), ttl, HashMap::new()),
            authorize,
            registry,
            _dir: dir,
        }
    }

    fn up() -> crate::oci::Registry {
        crate::oci::Registry::parse("up.test").unwrap()
    }

    fn tag(name: &str) -> Reference {
        Reference::Tag(Tag::parse(name).unwrap())
    }

    impl Fixture {
        async fn get(&self, reference: &Reference) -> Result<Manifest> {
            let location = Location::new(&up(), &crate::oci::Repository::parse("team/app").unwrap());
            let object = match reference {
                Reference::Tag(tag) => Object::Tag(tag),
                Reference::Digest(digest) => Object::Digest(Resource::Manifest, digest),
            };
            let access = self.authorize.access(&location, object, Via::Mirror, None);
            self.manifests.get(&access, reference, AcceptClass::all()).await
        }
    }

    #[tokio::test]
    async fn a_fresh_tag_is_fetched_once_then_served_from_the_cache() {
        let f = fixture(Duration::from_secs(3600)).await;
        let first = f.get(&tag("v1")).await.unwrap();
        assert_eq!(
            (first.cache, &first.bytes[..], first.media_type.as_str()),
            (CacheResult::Miss, MANIFEST, MEDIA_TYPE)
        );
        assert_eq!(f.registry.seen(), ["GET /v2/team/app/manifests/v1"]);

        let again = f.get(&tag("v1")).await.unwrap();
        let by_digest = f.get(&Reference::Digest(Digest::of(MANIFEST))).await.unwrap();
        assert_eq!((again.cache, by_digest.cache), (CacheResult::Hit, CacheResult::Hit));
        assert!(
            f.registry.seen().is_empty(),
            "a fresh tag and a stored digest ask nothing"
        );
    }

    #[tokio::test]
    async fn a_stale_tag_is_revalidated_with_one_head_and_served_stale_when_the_registry_fails() {
        let f = fixture(Duration::ZERO).await;
        f.get(&tag("v1")).await.unwrap();
        f.registry.seen();

        let revalidated = f.get(&tag("v1")).await.unwrap();
        assert_eq!(revalidated.cache, CacheResult::Revalidated);
        assert_eq!(f.registry.seen(), ["HEAD /v2/team/app/manifests/v1"]);

        *f.registry.status.lock().unwrap() = Some(StatusCode::SERVICE_UNAVAILABLE);
        let stale = f.get(&tag("v1")).await.unwrap();
        assert_eq!((stale.cache, &stale.bytes[..]), (CacheResult::Stale, MANIFEST));

        // A tag the registry says is gone is not served stale.
        *f.registry.status.lock().unwrap() = Some(StatusCode::NOT_FOUND);
        let gone = f.get(&tag("v1")).await.unwrap_err();
        assert!(gone.is_not_found(), "{gone}");
    }

    #[tokio::test]
    async fn concurrent_lookups_of_one_digest_share_one_fetch() {
        let f = Arc::new(fixture(Duration::from_secs(3600)).await);
        let digest = Reference::Digest(Digest::of(MANIFEST));
        let lookups: Vec<_> = (0..8)
            .map(|_| {
                let (f, digest) = (f.clone(), digest.clone());
                tokio::spawn(async move { f.get(&digest).await.unwrap().cache })
            })
            .collect();
        let mut results = Vec::new();
        for lookup in lookups {
            results.push(lookup.await.unwrap());
        }
        assert_eq!(
            f.registry.seen().len(),
            1,
            "one upstream GET for eight lookups: {results:?}"
        );
        assert!(results.contains(&CacheResult::Miss));
    }

    #[tokio::test]
    async fn a_manifest_that_is_not_what_its_digest_says_is_refused_and_not_stored() {
        let f = fixture(Duration::from_secs(3600)).await;
        *f.registry.lie.lock().unwrap() = true;
        let refused = f.get(&tag("v1")).await.unwrap_err();
        assert!(refused.is_mismatch(), "{refused}");
        *f.registry.status.lock().unwrap() = Some(StatusCode::SERVICE_UNAVAILABLE);
        let by_digest = f.get(&Reference::Digest(Digest::of(MANIFEST))).await.unwrap_err();
        assert!(!by_digest.is_mismatch(), "nothing was stored to serve: {by_digest}");
    }
}
