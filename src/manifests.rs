//! Manifests: by digest from the store forever once verified; by tag from the tag index while
//! younger than the TTL, then revalidated by one coalesced upstream HEAD (a GET only when the
//! digest moved). When the upstream fails or rate-limits, a stale answer is served.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Limited};

use crate::coalesce::Coalesce;
use crate::error::{Error, Result};
use crate::oci::MAX_MANIFEST_SIZE;
use crate::oci::{AcceptClass, Digest, Reference, Registry, Repository, Tag};
use crate::peers::{Asker, PeerError, Peers, Want};
use crate::store::{CommitError, Store, TagKey, TagRecord};
use crate::upstream::{Fetch, UpstreamError, UpstreamErrorKind, Upstreams};

/// How long a client with a stale tag answer waits for its revalidation before the stale
/// answer is served.
const REVALIDATE_WAIT: Duration = Duration::from_secs(2);

/// `Docker-Content-Digest`, the registry's name for what it served.
pub const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// How a manifest answer was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// From the cache without asking upstream.
    Hit,
    /// Fetched from upstream.
    Miss,
    /// Joined another request's upstream fetch.
    Coalesced,
    /// Upstream confirmed the cached digest.
    Revalidated,
    /// Upstream failed; the cached answer was served past its TTL.
    Stale,
}

impl CacheResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Coalesced => "coalesced",
            CacheResult::Revalidated => "revalidated",
            CacheResult::Stale => "stale",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    pub cache: CacheResult,
}

type Shared<T> = std::result::Result<T, Arc<Error>>;

pub struct Manifests {
    store: Arc<Store>,
    upstreams: Arc<Upstreams>,
    /// Cluster mode: manifests by digest come through the peers first.
    peers: Option<Arc<Peers>>,
    tag_ttl: Duration,
    tag_ttls: HashMap<Registry, Duration>,
    by_tag: Coalesce<TagKey, Shared<Manifest>>,
    by_digest: Arc<ByDigest>,
}

impl Manifests {
    /// `tag_ttls` overrides `tag_ttl` for some registries.
    pub fn new(
        store: Arc<Store>,
        upstreams: Arc<Upstreams>,
        peers: Option<Arc<Peers>>,
        tag_ttl: Duration,
        tag_ttls: HashMap<Registry, Duration>,
    ) -> Manifests {
        Manifests {
            store,
            upstreams,
            peers,
            tag_ttl,
            tag_ttls,
            by_tag: Coalesce::default(),
            by_digest: Arc::default(),
        }
    }

    #[tracing::instrument(skip_all, fields(%registry, repo = %repository, reference = %reference))]
    pub async fn get(
        &self,
        registry: &Registry,
        repository: &Repository,
        reference: &Reference,
        accept: AcceptClass,
        asker: Asker,
    ) -> Result<Manifest> {
        match reference {
            Reference::Digest(digest) => self.by_digest(registry, repository, digest, asker).await,
            Reference::Tag(tag) => self.by_tag(registry, repository, tag, accept).await,
        }
    }

    fn lookup(&self, registry: &Registry, repository: &Repository, asker: Asker) -> Lookup {
        Lookup {
            by_digest: self.by_digest.clone(),
            store: self.store.clone(),
            upstreams: self.upstreams.clone(),
            peers: self.peers.clone().filter(|_| asker == Asker::Client),
            registry: registry.clone(),
            repository: repository.clone(),
        }
    }

    async fn by_digest(
        &self,
        registry: &Registry,
        repository: &Repository,
        digest: &Digest,
        asker: Asker,
    ) -> Result<Manifest> {
        if let Some(m) = stored(&self.store, digest, CacheResult::Hit).await? {
            return Ok(m);
        }
        self.lookup(registry, repository, asker).coalesced(digest).await
    }

    async fn by_tag(
        &self,
        registry: &Registry,
        repository: &Repository,
        tag: &Tag,
        accept: AcceptClass,
    ) -> Result<Manifest> {
        let key = TagKey {
            registry: registry.clone(),
            repository: repository.clone(),
            tag: tag.clone(),
            accept,
        };
        let record = self.store.tags().get(&key);
        let cached = match &record {
            Some(record) => stored(&self.store, &record.digest, CacheResult::Hit).await?,
            None => None,
        };
        // Offline, a cached tag is as fresh as it will ever get.
        if let (Some(record), Some(cached)) = (&record, &cached)
            && (self.upstreams.is_offline() || record.age() < *self.tag_ttls.get(registry).unwrap_or(&self.tag_ttl))
        {
            return Ok(cached.clone());
        }
        let lookup = self.lookup(registry, repository, Asker::Client);
        let revalidation = self.by_tag.run(key.clone(), {
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
                .map_err(|e| Error::Internal(format!("manifest read: {e}")))??
        }
    };
    Ok(found.map(|(bytes, media_type)| Manifest {
        digest: digest.clone(),
        media_type,
        bytes,
        cache,
    }))
}

/// Concurrent lookups of one digest share one fetch, keyed also by whether the fetch asks
/// peers: a lookup that may not (a peer's, or this node's for a digest it owns) never joins
/// one that does, which could be waiting for the very peer asking.
type ByDigest = Coalesce<(Digest, bool), Shared<Manifest>>;

/// The upstream side of a manifest lookup, owned so it can run in a coalesced task.
#[derive(Clone)]
struct Lookup {
    by_digest: Arc<ByDigest>,
    store: Arc<Store>,
    upstreams: Arc<Upstreams>,
    /// Asked first for a manifest by digest; `None` outside cluster mode and for peers.
    peers: Option<Arc<Peers>>,
    registry: Registry,
    repository: Repository,
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
        let tag = key.tag.as_str();
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
            Err(e) if is_not_found(&e) => return Err(e),
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
            if let Some(m) = stored(&self.store, &record.digest, CacheResult::Stale).await? {
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
        };
        self.store.tags().put(key, record)?;
        Ok(())
    }

    /// The digest a HEAD reports, if it reports one.
    async fn head_digest(&self, reference: &str, accept: AcceptClass) -> Result<Option<Digest>> {
        let accept = accept.header_value();
        let resp = self
            .upstreams
            .fetch(Fetch::manifest(
                Method::HEAD,
                &self.registry,
                &self.repository,
                reference,
                &accept,
            ))
            .await?;
        Ok(resp
            .headers()
            .get(DOCKER_CONTENT_DIGEST)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
    }

    /// A tag's manifest. In cluster mode the tag is resolved here with a HEAD (`known`, when
    /// a revalidation already did), and the body comes by digest through the peers, so a
    /// rollout costs the cluster one manifest GET upstream, by its owner.
    async fn fetch_tag(&self, tag: &str, accept: AcceptClass, known: Option<Digest>) -> Result<Manifest> {
        if self.peers.is_some() {
            let digest = match known {
                Some(digest) => Some(digest),
                None => self.head_digest(tag, accept).await?,
            };
            if let Some(digest) = digest {
                return match stored(&self.store, &digest, CacheResult::Hit).await? {
                    Some(manifest) => Ok(manifest),
                    None => self.coalesced(&digest).await,
                };
            }
        }
        self.get(tag, accept, None).await
    }

    /// The manifest `digest`, fetched once however many lookups want it at the same time.
    async fn coalesced(&self, digest: &Digest) -> Result<Manifest> {
        let asks_peers = self.peers.as_ref().is_some_and(|p| !p.route(digest).is_empty());
        let (lookup, digest_owned) = (self.clone(), digest.clone());
        let (result, joined) = self
            .by_digest
            .run((digest.clone(), asks_peers), async move {
                // A fetch that ended between this caller's look at the store and here has
                // stored it: look again rather than fetch it twice.
                let fetched = match stored(&lookup.store, &digest_owned, CacheResult::Hit).await {
                    Ok(Some(manifest)) => Ok(manifest),
                    Ok(None) => {
                        lookup
                            .get(&digest_owned.to_string(), AcceptClass::all(), Some(&digest_owned))
                            .await
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

    /// GETs a manifest, verifies it (against `expected`, else against the upstream's
    /// `Docker-Content-Digest` when given) and stores it. By digest in cluster mode, the peers
    /// are asked first.
    async fn get(&self, reference: &str, accept: AcceptClass, expected: Option<&Digest>) -> Result<Manifest> {
        if let Some(digest) = expected
            && let Some(manifest) = self.ask_peers(digest).await
        {
            return Ok(manifest);
        }
        let accept = accept.header_value();
        let resp = self
            .upstreams
            .fetch(Fetch::manifest(
                Method::GET,
                &self.registry,
                &self.repository,
                reference,
                &accept,
            ))
            .await?;
        self.keep(resp, expected, None).await
    }

    /// The manifest from the first peer in `digest`'s route that serves it whole and verified.
    async fn ask_peers(&self, digest: &Digest) -> Option<Manifest> {
        let peers = self.peers.as_ref()?;
        let route = peers.route(digest);
        if route.is_empty() {
            return None;
        }
        let accept = AcceptClass::all().header_value();
        let want = Want {
            registry: &self.registry,
            repository: &self.repository,
            kind: "manifests",
            digest,
            accept: Some(&accept),
            from: None,
        };
        for peer in route {
            match peers.fetch(peer, &want).await {
                Ok((served_by, resp)) => match self.keep(resp, Some(digest), Some(peers)).await {
                    Ok(manifest) => return Some(manifest),
                    Err(e) => {
                        tracing::warn!(peer = %served_by, error = %e, "peer manifest refused");
                        peers.trip(served_by, is_mismatch(&e));
                    }
                },
                Err(PeerError::Unavailable { .. }) => peers.trip(peer, false),
                Err(_) => break,
            }
        }
        peers.metrics.fallbacks.inc();
        None
    }

    /// Reads a manifest response (from the upstream, or from `peers`), verifies it and
    /// stores it.
    async fn keep(
        &self,
        resp: http::Response<hyper::body::Incoming>,
        expected: Option<&Digest>,
        peers: Option<&Arc<Peers>>,
    ) -> Result<Manifest> {
        let header_digest: Option<Digest> = resp
            .headers()
            .get(DOCKER_CONTENT_DIGEST)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
        let bytes = Limited::new(resp.into_body(), MAX_MANIFEST_SIZE as usize)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    self.error(UpstreamErrorKind::TooLarge {
                        limit: MAX_MANIFEST_SIZE,
                    })
                } else {
                    self.error(UpstreamErrorKind::Body(e))
                }
            })?
            .to_bytes();
        match peers {
            Some(peers) => peers
                .metrics
                .bytes
                .with_label_values(&["in"])
                .inc_by(bytes.len() as u64),
            None => self.upstreams.count_bytes(&self.registry, bytes.len() as u64),
        }
        let digest = Digest::of(&bytes);
        if let Some(want) = expected.or(header_digest.as_ref())
            && want != &digest
        {
            return Err(self.error(UpstreamErrorKind::DigestMismatch {
                expected: want.to_string(),
                actual: digest.to_string(),
            }));
        }
        let media_type = content_type
            .filter(|t| crate::oci::is_manifest_media_type(t))
            .or_else(|| media_type_field(&bytes))
            .ok_or_else(|| self.error(UpstreamErrorKind::Body("manifest has no known media type".into())))?;
        let (store, d, t, b) = (self.store.clone(), digest.clone(), media_type.clone(), bytes.clone());
        tokio::task::spawn_blocking(move || store.put_manifest(&d, &t, &b))
            .await
            .map_err(|e| Error::Internal(format!("manifest write: {e}")))?
            .map_err(|e| match e {
                CommitError::Io(e) => Error::Store(e),
                other => Error::Internal(other.to_string()),
            })?;
        Ok(Manifest {
            digest,
            media_type,
            bytes,
            cache: CacheResult::Miss,
        })
    }

    fn error(&self, kind: UpstreamErrorKind) -> Error {
        UpstreamError::new(&self.registry, kind).into()
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

fn is_mismatch(e: &Error) -> bool {
    matches!(
        e.root(),
        Error::Upstream(UpstreamError {
            kind: UpstreamErrorKind::DigestMismatch { .. },
            ..
        })
    )
}

fn is_not_found(e: &Error) -> bool {
    matches!(
        e.root(),
        Error::Upstream(UpstreamError {
            kind: UpstreamErrorKind::Status {
                status: StatusCode::NOT_FOUND,
                ..
            },
            ..
        })
    )
}
