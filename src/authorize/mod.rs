//! Who may read what from a shared node cache. Before a client is served a manifest or a
//! blob, from the cache or fetched for it, its repository's visibility is learned from the
//! registry (an anonymous `HEAD`, remembered for `--auth-ttl`):
//! - a repository anyone may read is served as before;
//! - a private one, in intercept mode, only to a client whose own `Authorization` the
//!   registry accepts for it: one `HEAD` with it, the answer remembered per (hash of the
//!   credential, repository) for at most `--auth-ttl` and never past a JWT's `exp`; a no
//!   briefly. pullcache's own credentials then fetch the content, and never authorize;
//! - a private one, in mirror mode (containerd sends no credentials to a mirror), by the
//!   registry's policy: `bypass` answers 404 before any byte, so containerd pulls from the
//!   registry itself with the pod's secret; `share` serves whatever pullcache's credentials
//!   can read to every workload on the node.
//!
//! None of this applies to a registry pullcache holds no credentials for: all it can have
//! fetched of it was readable anonymously. Nor offline, with no registry to ask.
//!
//! A digest is served under a repository only when it is known to be in it: a manifest
//! served for that repository refers to it, or the registry confirmed it. So private bytes
//! cached for one repository are not served under another name. Peers are never
//! authorized here: each node checks its own clients before it asks a peer.

mod metrics;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::{HeaderValue, StatusCode};
use moka::sync::Cache;
use sha2::{Digest as _, Sha256};

pub use metrics::Metrics;

use crate::fetch::Resource;
use crate::oci::{Digest, Reference, References, Registry, Repository, Tag};
use crate::upstream::{Answer, UpstreamError, Upstreams};

/// How long a "no" is remembered: long enough to absorb a pull's burst of requests, short
/// enough that a fixed secret works on the next try.
const DENIED_FOR: Duration = Duration::from_secs(10);
/// Bounds on what is remembered; the oldest entries go first.
const MAX_REPOSITORIES: u64 = 100_000;
const MAX_CLIENTS: u64 = 100_000;
/// Links are 16-byte hashes, so this many take about 25 MB at most with moka's overhead.
const MAX_LINKS: u64 = 250_000;

/// What mirror mode does with a repository that needs credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrivateImages {
    /// 404 before any byte: containerd goes to the registry itself with the pod's secret.
    #[default]
    Bypass,
    /// Serve it with pullcache's credentials to every workload on the node.
    Share,
}

impl FromStr for PrivateImages {
    type Err = String;

    fn from_str(s: &str) -> Result<PrivateImages, String> {
        match s {
            "bypass" => Ok(PrivateImages::Bypass),
            "share" => Ok(PrivateImages::Share),
            other => Err(format!("{other:?} is not a policy: bypass or share")),
        }
    }
}

impl fmt::Display for PrivateImages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PrivateImages::Bypass => "bypass",
            PrivateImages::Share => "share",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// Mirror mode's policy for registries without one of their own.
    pub private_images: PrivateImages,
    pub registries: HashMap<Registry, PrivateImages>,
    /// `--auth-ttl`: the longest any answer is remembered.
    pub ttl: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            private_images: PrivateImages::Bypass,
            registries: HashMap::new(),
            ttl: DEFAULT_TTL,
        }
    }
}

pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

/// How the client reached pullcache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `/v2/...?ns=`: containerd's mirror, which sends no credentials.
    Mirror,
    /// An intercepted TLS connection: containerd believes it talks to the registry, and
    /// sends the pod's own `Authorization`.
    Intercept,
}

/// What a client asks for.
#[derive(Debug, Clone, Copy)]
pub enum Object<'a> {
    Tag(&'a Tag),
    Digest(Resource, &'a Digest),
}

impl Object<'_> {
    fn resource(&self) -> Resource {
        match self {
            Object::Tag(_) => Resource::Manifest,
            Object::Digest(resource, _) => *resource,
        }
    }

    fn reference(&self) -> Reference {
        match self {
            Object::Tag(tag) => Reference::Tag((*tag).clone()),
            Object::Digest(_, digest) => Reference::Digest((*digest).clone()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(
        "{registry}/{repository} needs credentials, and mirror mode does not serve private images \
         (private = \"bypass\"): containerd pulls it from the registry itself"
    )]
    Bypassed {
        registry: Registry,
        repository: Repository,
        resource: Resource,
    },
    #[error("{registry}/{repository} needs credentials the registry accepts")]
    Unauthorized {
        registry: Registry,
        repository: Repository,
        status: StatusCode,
        /// The registry's own challenge, relayed unchanged.
        challenge: Option<HeaderValue>,
    },
    #[error("{reference} is not in {registry}/{repository}")]
    NotInRepository {
        registry: Registry,
        repository: Repository,
        resource: Resource,
        reference: Reference,
    },
}

/// Why a check did not let a client in: the client may not read it, or the registry could
/// not be asked about something known to be private.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

#[derive(Debug, Clone)]
enum Visibility {
    Public,
    /// With the registry's challenge to an anonymous client.
    Private {
        challenge: Option<HeaderValue>,
    },
}

/// A client's remembered answer.
#[derive(Debug, Clone, Copy)]
struct Verdict {
    allowed: bool,
    until: Instant,
}

type RepoKey = (Registry, Repository);

pub struct Authorizer {
    upstreams: Arc<Upstreams>,
    settings: Settings,
    /// Whether pullcache holds credentials for a registry (fixed by the configuration;
    /// remembered so that a cached request does not work it out again).
    credentialed: Cache<Registry, bool>,
    visibility: Cache<RepoKey, Visibility>,
    /// Repositories seen private, kept past the TTL: if the registry cannot be asked, they
    /// stay private rather than fall open.
    private: Cache<RepoKey, ()>,
    /// Repositories whose visibility could not be learned lately: not asked again for a
    /// while, so a registry that hangs does not hold every request.
    unreachable: Cache<RepoKey, ()>,
    /// (hash of a client's credential, registry, repository).
    clients: Cache<([u8; 32], Registry, Repository), Verdict>,
    /// Digests known to be in a repository, by [`link_key`].
    links: Cache<[u8; 16], ()>,
    /// Manifests whose references [`Authorizer::learn`] recorded, by [`link_key`].
    learned: Cache<[u8; 16], ()>,
    /// Digests linked to a private repository, by [`digest_key`]: never served unconfirmed
    /// under another repository, even while the registry cannot be asked.
    private_digests: Cache<[u8; 16], ()>,
    metrics: Metrics,
}

impl Authorizer {
    pub fn new(upstreams: Arc<Upstreams>, settings: Settings, metrics: Metrics) -> Authorizer {
        let ttl = settings.ttl;
        Authorizer {
            upstreams,
            settings,
            credentialed: Cache::builder().max_capacity(MAX_REPOSITORIES).build(),
            visibility: Cache::builder()
                .max_capacity(MAX_REPOSITORIES)
                .time_to_live(ttl)
                .build(),
            private: Cache::builder().max_capacity(MAX_REPOSITORIES).build(),
            unreachable: Cache::builder()
                .max_capacity(MAX_REPOSITORIES)
                .time_to_live(DENIED_FOR.min(ttl))
                .build(),
            clients: Cache::builder().max_capacity(MAX_CLIENTS).time_to_live(ttl).build(),
            links: Cache::builder().max_capacity(MAX_LINKS).build(),
            learned: Cache::builder().max_capacity(MAX_LINKS).build(),
            private_digests: Cache::builder().max_capacity(MAX_LINKS).build(),
            metrics,
        }
    }

    /// Whether pullcache holds credentials for `registry`, worked out once.
    fn credentialed(&self, registry: &Registry) -> bool {
        self.credentialed
            .get_with_by_ref(registry, || self.upstreams.holds_credentials(registry))
    }

    fn policy(&self, registry: &Registry) -> PrivateImages {
        self.settings
            .registries
            .get(registry)
            .copied()
            .unwrap_or(self.settings.private_images)
    }

    /// Whether a client may read `object` in `repository`, before any byte of it is served.
    pub async fn check(
        &self,
        registry: &Registry,
        repository: &Repository,
        object: Object<'_>,
        via: Via,
        authorization: Option<&HeaderValue>,
    ) -> Result<(), CheckError> {
        // Nothing to ask: an offline cache serves what was put in it.
        if self.upstreams.is_offline() {
            return Ok(());
        }
        // Without credentials for the registry, pullcache fetched nothing of it that was not
        // readable anonymously: nothing private to guard, nothing to ask.
        if !self.credentialed(registry) {
            self.metrics.decided("anonymous_cache");
            return Ok(());
        }
        // Mirror mode sharing this registry's private images: no question to ask.
        if via == Via::Mirror && self.policy(registry) == PrivateImages::Share {
            self.metrics.decided("shared");
            return Ok(());
        }
        let key = (registry.clone(), repository.clone());
        let visibility = match self.visibility(&key, object).await {
            Some(visibility) => visibility,
            None => {
                self.metrics.decided("unverified");
                return Ok(());
            }
        };
        match visibility {
            Visibility::Public => self.check_public(&key, object).await,
            Visibility::Private { challenge } => match via {
                Via::Mirror => {
                    self.metrics.decided("bypassed");
                    Err(AccessError::Bypassed {
                        registry: registry.clone(),
                        repository: repository.clone(),
                        resource: object.resource(),
                    }
                    .into())
                }
                Via::Intercept => match authorization {
                    None => {
                        self.metrics.decided("challenged");
                        Err(AccessError::Unauthorized {
                            registry: registry.clone(),
                            repository: repository.clone(),
                            status: StatusCode::UNAUTHORIZED,
                            challenge,
                        }
                        .into())
                    }
                    Some(credential) => self.check_client(&key, object, credential).await,
                },
            },
        }
    }

    /// The repository's visibility: remembered, or asked anonymously with `object`. `None`
    /// when the registry cannot be asked and the repository was never seen private.
    async fn visibility(&self, key: &RepoKey, object: Object<'_>) -> Option<Visibility> {
        if let Some(known) = self.visibility.get(key) {
            return Some(known);
        }
        if self.unreachable.contains_key(key) {
            return self.seen_private(key);
        }
        let (registry, repository) = key;
        let answer = self
            .upstreams
            .ask(registry, repository, object.resource(), object.reference(), None)
            .await;
        self.metrics.asked("anonymous", &answer);
        let visibility = match answer {
            Ok(Answer::Readable) => {
                self.link(key, object);
                Visibility::Public
            }
            // Let in, but the object is not there: the repository is readable anonymously.
            Ok(Answer::Missing) => Visibility::Public,
            Ok(Answer::Refused { challenge, .. }) => {
                self.private.insert(key.clone(), ());
                Visibility::Private { challenge }
            }
            Err(e) => {
                tracing::debug!(registry = %registry, repository = %repository, error = %e, "cannot learn whether a repository is private");
                self.unreachable.insert(key.clone(), ());
                return self.seen_private(key);
            }
        };
        self.visibility.insert(key.clone(), visibility.clone());
        Some(visibility)
    }

    fn seen_private(&self, key: &RepoKey) -> Option<Visibility> {
        self.private
            .contains_key(key)
            .then_some(Visibility::Private { challenge: None })
    }

    /// A public repository: a tag, or a digest known to be in it or confirmed there by the
    /// registry (anonymously), so that nothing cached for another repository is served
    /// under its name.
    async fn check_public(&self, key: &RepoKey, object: Object<'_>) -> Result<(), CheckError> {
        let Object::Digest(resource, digest) = object else {
            self.metrics.decided("public");
            return Ok(());
        };
        if self.is_linked(key, digest) {
            self.metrics.decided("public");
            return Ok(());
        }
        let (registry, repository) = key;
        let answer = self
            .upstreams
            .ask(registry, repository, resource, Reference::Digest(digest.clone()), None)
            .await;
        self.metrics.asked("anonymous", &answer);
        match answer {
            Ok(Answer::Readable) => {
                self.link(key, object);
                self.metrics.decided("public");
                Ok(())
            }
            Ok(Answer::Missing | Answer::Refused { .. }) => Err(self.not_in(key, object)),
            // The registry is down: a cached public image still serves (a pod pinned by
            // digest still starts), unless the digest is known to be a private repository's.
            Err(e) if self.private_digests.contains_key(&digest_key(digest)) => Err(e.into()),
            Err(_) => {
                self.metrics.decided("unverified");
                Ok(())
            }
        }
    }

    /// A private repository in intercept mode: the client's own credential decides.
    async fn check_client(
        &self,
        key: &RepoKey,
        object: Object<'_>,
        credential: &HeaderValue,
    ) -> Result<(), CheckError> {
        let (registry, repository) = key;
        let client = (
            Sha256::digest(credential.as_bytes()).into(),
            registry.clone(),
            repository.clone(),
        );
        let now = Instant::now();
        let known = self.clients.get(&client).filter(|d| d.until > now);
        match known {
            Some(Verdict { allowed: false, .. }) => {
                self.metrics.decided("denied");
                return Err(self.unauthorized(key, StatusCode::UNAUTHORIZED, None));
            }
            Some(Verdict { allowed: true, .. }) => {
                let linked = match object {
                    Object::Tag(_) => true,
                    Object::Digest(_, digest) => self.is_linked(key, digest),
                };
                if linked {
                    self.metrics.decided("allowed");
                    return Ok(());
                }
            }
            None => {}
        }
        let answer = self
            .upstreams
            .ask(
                registry,
                repository,
                object.resource(),
                object.reference(),
                Some(credential),
            )
            .await;
        self.metrics.asked("client", &answer);
        match answer? {
            Answer::Readable => {
                let until = now + self.settings.ttl.min(lifetime(credential).unwrap_or(Duration::MAX));
                self.clients.insert(client, Verdict { allowed: true, until });
                self.link(key, object);
                self.metrics.decided("allowed");
                Ok(())
            }
            Answer::Missing => {
                // The registry let the credential in: only this object is not there.
                let until = now + self.settings.ttl.min(lifetime(credential).unwrap_or(Duration::MAX));
                self.clients.insert(client, Verdict { allowed: true, until });
                Err(self.not_in(key, object))
            }
            Answer::Refused { status, challenge } => {
                self.clients.insert(
                    client,
                    Verdict {
                        allowed: false,
                        until: now + DENIED_FOR.min(self.settings.ttl),
                    },
                );
                self.metrics.decided("denied");
                Err(self.unauthorized(key, status, challenge))
            }
        }
    }

    /// Records what a manifest served for a repository refers to: those digests are in it.
    /// Once per manifest and repository, and only where checks happen: a cached tag served
    /// again does not parse its manifest again.
    pub fn learn(&self, registry: &Registry, repository: &Repository, digest: &Digest, manifest: &[u8]) {
        if self.upstreams.is_offline() || !self.credentialed(registry) {
            return;
        }
        let key = (registry.clone(), repository.clone());
        let learned = link_key(&key, digest);
        if self.learned.contains_key(&learned) {
            return;
        }
        self.learned.insert(learned, ());
        self.link(&key, Object::Digest(Resource::Manifest, digest));
        if let Ok(references) = References::of(manifest) {
            for descriptor in references.manifests.iter().chain(&references.blobs) {
                self.link(&key, Object::Digest(Resource::Blob, &descriptor.digest));
            }
        }
    }

    fn link(&self, key: &RepoKey, object: Object<'_>) {
        let Object::Digest(_, digest) = object else { return };
        self.links.insert(link_key(key, digest), ());
        if self.private.contains_key(key) {
            self.private_digests.insert(digest_key(digest), ());
        }
    }

    fn is_linked(&self, key: &RepoKey, digest: &Digest) -> bool {
        self.links.contains_key(&link_key(key, digest))
    }

    fn not_in(&self, key: &RepoKey, object: Object<'_>) -> CheckError {
        self.metrics.decided("not_in_repository");
        let (registry, repository) = key;
        AccessError::NotInRepository {
            registry: registry.clone(),
            repository: repository.clone(),
            resource: object.resource(),
            reference: object.reference(),
        }
        .into()
    }

    fn unauthorized(&self, key: &RepoKey, status: StatusCode, challenge: Option<HeaderValue>) -> CheckError {
        let (registry, repository) = key;
        // Without the registry's own challenge, the one an anonymous client got.
        let challenge = challenge.or_else(|| match self.visibility.get(key) {
            Some(Visibility::Private { challenge }) => challenge,
            _ => None,
        });
        AccessError::Unauthorized {
            registry: registry.clone(),
            repository: repository.clone(),
            status,
            challenge,
        }
        .into()
    }
}

/// A link's key: 128 bits of SHA-256 over registry, repository and digest. Names cannot
/// contain NUL, so the fields cannot run into each other.
fn link_key((registry, repository): &RepoKey, digest: &Digest) -> [u8; 16] {
    let mut hash = Sha256::new();
    for part in [registry.as_str(), repository.as_str(), &digest.to_string()] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let mut key = [0; 16];
    key.copy_from_slice(&hash.finalize()[..16]);
    key
}

/// A digest's key in [`Authorizer::private_digests`]: 128 bits of SHA-256 over it.
fn digest_key(digest: &Digest) -> [u8; 16] {
    let mut key = [0; 16];
    key.copy_from_slice(&Sha256::digest(digest.to_string().as_bytes())[..16]);
    key
}

/// How long a bearer JWT has left, from its `exp` claim; `None` for anything else.
fn lifetime(credential: &HeaderValue) -> Option<Duration> {
    let token = credential.to_str().ok()?.strip_prefix("Bearer ")?;
    let mut parts = token.split('.');
    let (_header, claims, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&claims).ok()?["exp"].as_u64()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(exp.saturating_sub(now)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(claims: &str) -> HeaderValue {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        HeaderValue::from_str(&format!("Bearer {}.{}.sig", b64(r#"{"alg":"ES256"}"#), b64(claims))).unwrap()
    }

    #[test]
    fn a_jwt_is_remembered_no_longer_than_it_lives() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let left = lifetime(&bearer(&format!(r#"{{"exp":{}}}"#, now + 60))).unwrap();
        assert!(
            left <= Duration::from_secs(60) && left >= Duration::from_secs(58),
            "{left:?}"
        );
        assert_eq!(
            lifetime(&bearer(&format!(r#"{{"exp":{}}}"#, now - 5))),
            Some(Duration::ZERO)
        );
        assert_eq!(lifetime(&bearer(r#"{"sub":"x"}"#)), None);
        assert_eq!(lifetime(&HeaderValue::from_static("Basic dTpw")), None);
        assert_eq!(lifetime(&HeaderValue::from_static("Bearer opaque")), None);
    }

    #[test]
    fn policies_parse_and_print() {
        for policy in [PrivateImages::Bypass, PrivateImages::Share] {
            assert_eq!(policy.to_string().parse::<PrivateImages>(), Ok(policy));
        }
        assert!("open".parse::<PrivateImages>().unwrap_err().contains("bypass or share"));
        assert_eq!(PrivateImages::default(), PrivateImages::Bypass);
    }
}
