//! Who may read what from a shared node cache. The store holds each digest once, whatever
//! registry and repository a client names, so what a client is served is decided by where the
//! bytes came from ([`Provenance`]), never by the name alone:
//! - content that some origin served to an anonymous request is public: served to anyone,
//!   under any name, with nothing asked;
//! - content private to its origins is served only under one of them, to a client who passes
//!   that origin's check below; under any other name it is a miss, fetched from the named
//!   registry like any other;
//! - content whose provenance is unknown is private to nobody: a miss under every name.
//!
//! A location's check ([`Access`]): its visibility is learned from the registry (an anonymous
//! `HEAD`, remembered for `--auth-ttl`; only a clear anonymous 2xx means public, and a
//! location that cannot be learned counts as private). Then:
//! - a public location lets anyone in;
//! - a private one, in intercept mode, only a client whose own `Authorization` the registry
//!   accepts for it: one `HEAD` with it, the answer remembered per (hash of the credential,
//!   location) for at most `--auth-ttl` and never past a JWT's `exp`; a no briefly;
//! - a private one, in mirror mode (containerd sends no credentials to a mirror), by the
//!   registry's policy: `bypass` answers 404 before any byte, so containerd pulls from the
//!   registry itself with the pod's secret; `share` serves what pullcache's own credentials
//!   read to every workload on the node.
//!
//! Peers are never checked here: a peer asks under the location its node authorized, and is
//! served content public or private to that location. Offline, everything put in the cache
//! is served.

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
use tokio::sync::OnceCell;

pub use metrics::Metrics;

use crate::fetch::{Asker, Credential, Fetch, Resource};
use crate::oci::{Clearance, Digest, Location, Provenance, Reference, Registry, Repository, Tag, Visibility};
use crate::upstream::{Answer, UpstreamError, Upstreams};

/// How long a "no" is remembered: long enough to absorb a pull's burst of requests, short
/// enough that a fixed secret works on the next try.
const DENIED_FOR: Duration = Duration::from_secs(10);
/// Bounds on what is remembered, in bytes of keys and answers (a pod may name any number
/// of repositories on a registry that answers them all); the least used go first.
pub const MAX_VISIBILITY_BYTES: u64 = 8 * 1024 * 1024;
pub const MAX_CLIENT_BYTES: u64 = 8 * 1024 * 1024;
const MAX_UNREACHABLE_BYTES: u64 = 2 * 1024 * 1024;
const MAX_REGISTRIES: u64 = 4096;
/// What an entry costs beyond its strings: moka's bookkeeping and the value.
const ENTRY_OVERHEAD: usize = 128;

fn weight(location: &Location, extra: usize) -> u32 {
    let bytes = location.registry.as_str().len() + location.repository.as_str().len() + ENTRY_OVERHEAD + extra;
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

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

impl Settings {
    /// Mirror mode's policy for a registry: its own, else `--private-images`.
    pub fn policy(&self, registry: &Registry) -> PrivateImages {
        self.registries.get(registry).copied().unwrap_or(self.private_images)
    }
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

/// How the requester reached pullcache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `/v2/...?ns=`: containerd's mirror, which sends no credentials.
    Mirror,
    /// An intercepted TLS connection: containerd believes it talks to the registry, and
    /// sends the pod's own `Authorization`.
    Intercept,
    /// The peer port: another node, for a client of its own that it cleared (or not) at the
    /// location asked.
    Peer { clearance: Option<Clearance> },
}

/// What a client asks for.
#[derive(Debug, Clone, Copy)]
pub enum Object<'a> {
    Tag(&'a Tag),
    Digest(Resource, &'a Digest),
    /// A tag list or referrers: the repository's visibility is asked with its tag list.
    Listing,
}

impl Object<'_> {
    fn resource(&self) -> Resource {
        match self {
            Object::Tag(_) => Resource::Manifest,
            Object::Digest(resource, _) => *resource,
            Object::Listing => Resource::Tags,
        }
    }

    fn reference(&self) -> Reference {
        match self {
            Object::Tag(tag) => Reference::Tag((*tag).clone()),
            Object::Digest(_, digest) => Reference::Digest((*digest).clone()),
            Object::Listing => Reference::Tag(Tag::parse("list").expect("a valid tag")),
        }
    }
}

/// What a location's answers are about: its content, or its listings. A registry may let
/// anyone list a repository whose content needs credentials (a "browse" right apart from
/// "read"), so what a listing proves is never taken for the content, nor the other way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Asked {
    Content,
    Listing,
}

impl Object<'_> {
    fn asked(&self) -> Asked {
        match self {
            Object::Listing => Asked::Listing,
            Object::Tag(_) | Object::Digest(..) => Asked::Content,
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
enum Seen {
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

pub struct Authorizer {
    upstreams: Arc<Upstreams>,
    settings: Settings,
    /// Whether pullcache holds credentials for a registry (fixed by the configuration;
    /// remembered so that a cached request does not work it out again).
    credentialed: Cache<Registry, bool>,
    visibility: Cache<(Location, Asked), Seen>,
    /// Locations whose visibility could not be learned lately: not asked again for a while,
    /// so a registry that hangs does not hold every request. They count as private.
    unreachable: Cache<Location, ()>,
    /// (hash of a client's credential, location).
    clients: Cache<([u8; 32], Location, Asked), Verdict>,
    metrics: Metrics,
}

impl Authorizer {
    pub fn new(upstreams: Arc<Upstreams>, settings: Settings, metrics: Metrics) -> Authorizer {
        let ttl = settings.ttl;
        Authorizer {
            upstreams,
            settings,
            credentialed: Cache::builder().max_capacity(MAX_REGISTRIES).build(),
            visibility: Cache::builder()
                .max_capacity(MAX_VISIBILITY_BYTES)
                .weigher(|(location, _), seen: &Seen| {
                    let challenge = match seen {
                        Seen::Private { challenge: Some(c) } => c.len(),
                        _ => 0,
                    };
                    weight(location, challenge)
                })
                .time_to_live(ttl)
                .build(),
            unreachable: Cache::builder()
                .max_capacity(MAX_UNREACHABLE_BYTES)
                .weigher(|location, _| weight(location, 0))
                .time_to_live(DENIED_FOR.min(ttl))
                .build(),
            clients: Cache::builder()
                .max_capacity(MAX_CLIENT_BYTES)
                .weigher(|(_, location, _), _| weight(location, 32))
                .time_to_live(ttl)
                .build(),
            metrics,
        }
    }

    /// A request's access: what it may be served and fetched with under `location`.
    pub fn access<'a>(
        &'a self,
        location: &'a Location,
        object: Object<'a>,
        via: Via,
        authorization: Option<&'a HeaderValue>,
    ) -> Access<'a> {
        let asker = match via {
            Via::Peer { .. } => Asker::Peer,
            Via::Mirror | Via::Intercept => Asker::Client,
        };
        Access {
            authorizer: self,
            location,
            object,
            asker,
            via,
            authorization,
            passed: OnceCell::new(),
        }
    }

    /// Whether pullcache holds credentials for `registry`, worked out once.
    fn credentialed(&self, registry: &Registry) -> bool {
        self.credentialed
            .get_with_by_ref(registry, || self.upstreams.holds_credentials(registry))
    }

    fn policy(&self, registry: &Registry) -> PrivateImages {
        self.settings.policy(registry)
    }

    /// Whether a client may read `object` at `location`, and what it is cleared for there.
    async fn check(
        &self,
        location: &Location,
        object: Object<'_>,
        via: Via,
        authorization: Option<&HeaderValue>,
    ) -> Result<Clearance, CheckError> {
        if let Via::Peer { clearance } = via {
            return clearance.ok_or_else(|| self.not_in(location, object));
        }
        // Mirror mode sharing this registry's private images: no question to ask.
        if via == Via::Mirror
            && self.policy(&location.registry) == PrivateImages::Share
            && self.credentialed(&location.registry)
        {
            self.metrics.decided("shared");
            return Ok(Clearance::Shared);
        }
        match self.visibility(location, object).await {
            Seen::Public => {
                self.metrics.decided("public");
                Ok(Clearance::Public)
            }
            Seen::Private { challenge } => match (via, authorization) {
                (Via::Mirror | Via::Peer { .. }, _) => {
                    self.metrics.decided("bypassed");
                    Err(AccessError::Bypassed {
                        registry: location.registry.clone(),
                        repository: location.repository.clone(),
                        resource: object.resource(),
                    }
                    .into())
                }
                (Via::Intercept, None) => {
                    self.metrics.decided("challenged");
                    Err(AccessError::Unauthorized {
                        registry: location.registry.clone(),
                        repository: location.repository.clone(),
                        status: StatusCode::UNAUTHORIZED,
                        challenge,
                    }
                    .into())
                }
                (Via::Intercept, Some(credential)) => {
                    self.check_client(location, object, credential).await?;
                    Ok(Clearance::Client)
                }
            },
        }
    }

    /// The location's visibility: remembered, or asked anonymously with `object`. Private when
    /// the registry cannot be asked, or answers anything but a clear 2xx.
    async fn visibility(&self, location: &Location, object: Object<'_>) -> Seen {
        let key = (location.clone(), object.asked());
        if let Some(known) = self.visibility.get(&key) {
            return known;
        }
        let unknown = Seen::Private { challenge: None };
        if self.unreachable.contains_key(location) {
            return unknown;
        }
        let answer = self
            .upstreams
            .ask(
                &location.registry,
                &location.repository,
                object.resource(),
                object.reference(),
                None,
            )
            .await;
        self.metrics.asked("anonymous", &answer);
        let seen = match answer {
            Ok(Answer::Readable) => Seen::Public,
            // Not there, or hidden from anonymous clients: no proof either way, and not
            // remembered, so the next object asks again.
            Ok(Answer::Missing) => return unknown,
            Ok(Answer::Refused { challenge, .. }) => Seen::Private { challenge },
            Err(e) => {
                tracing::debug!(%location, error = %e, "cannot learn whether a repository is private; it counts as private");
                self.unreachable.insert(location.clone(), ());
                return unknown;
            }
        };
        self.visibility.insert(key, seen.clone());
        seen
    }

    /// A private location in intercept mode: the client's own credential decides.
    async fn check_client(
        &self,
        location: &Location,
        object: Object<'_>,
        credential: &HeaderValue,
    ) -> Result<(), CheckError> {
        let client = (
            Sha256::digest(credential.as_bytes()).into(),
            location.clone(),
            object.asked(),
        );
        let now = Instant::now();
        match self.clients.get(&client).filter(|d| d.until > now) {
            Some(Verdict { allowed: true, .. }) => {
                self.metrics.decided("allowed");
                return Ok(());
            }
            Some(Verdict { allowed: false, .. }) => {
                self.metrics.decided("denied");
                return Err(self.unauthorized(location, object, StatusCode::UNAUTHORIZED, None));
            }
            None => {}
        }
        let answer = self
            .upstreams
            .ask(
                &location.registry,
                &location.repository,
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
                self.metrics.decided("allowed");
                Ok(())
            }
            // Not there, or hidden from this client: it proves no access, and is not kept.
            Answer::Missing => {
                self.metrics.decided("not_in_repository");
                Err(self.not_in(location, object))
            }
            Answer::Refused { status, challenge } => {
                let until = now + DENIED_FOR.min(self.settings.ttl);
                self.clients.insert(client, Verdict { allowed: false, until });
                self.metrics.decided("denied");
                Err(self.unauthorized(location, object, status, challenge))
            }
        }
    }

    fn not_in(&self, location: &Location, object: Object<'_>) -> CheckError {
        AccessError::NotInRepository {
            registry: location.registry.clone(),
            repository: location.repository.clone(),
            resource: object.resource(),
            reference: object.reference(),
        }
        .into()
    }

    fn unauthorized(
        &self,
        location: &Location,
        object: Object<'_>,
        status: StatusCode,
        challenge: Option<HeaderValue>,
    ) -> CheckError {
        // Without the registry's own challenge, the one an anonymous client got.
        let challenge = challenge.or_else(|| match self.visibility.get(&(location.clone(), object.asked())) {
            Some(Seen::Private { challenge }) => challenge,
            _ => None,
        });
        AccessError::Unauthorized {
            registry: location.registry.clone(),
            repository: location.repository.clone(),
            status,
            challenge,
        }
        .into()
    }
}

/// How a fetch for a request goes upstream.
#[derive(Debug, Clone)]
pub struct Grant {
    /// What the registry is asked with.
    pub credential: Credential,
    /// What the requester was cleared for at the location, if it was checked: peers serve
    /// private content only to a cleared asker, and content fetched for a location known to
    /// be public is public whatever credential fetched it.
    pub clearance: Option<Clearance>,
}

impl Grant {
    /// The same fetch for `fetch`'s requester.
    pub fn apply(&self, fetch: Fetch) -> Fetch {
        fetch.authorized(self.credential.clone(), self.clearance)
    }

    /// What a fetch's answer proved, with what the check knew of the location.
    pub fn visibility(&self, answered: Visibility) -> Visibility {
        if self.clearance == Some(Clearance::Public) {
            Visibility::Public
        } else {
            answered
        }
    }
}

/// One request's access under the location it names: asked of [`Provenance`]s before any
/// byte is served, and for the [`Grant`] of a fetch. The location's check runs at most once
/// per request, and only when something private is at stake.
pub struct Access<'a> {
    authorizer: &'a Authorizer,
    pub location: &'a Location,
    object: Object<'a>,
    pub asker: Asker,
    via: Via,
    authorization: Option<&'a HeaderValue>,
    /// What the check cleared, once it passed.
    passed: OnceCell<Clearance>,
}

impl Access<'_> {
    /// Whether content of `provenance` may be served under this location: public content
    /// at once; content private to it once the check passes (an error when it does not);
    /// anything else is a miss for this location (`false`).
    pub async fn serves(&self, provenance: &Provenance) -> Result<bool, CheckError> {
        if self.authorizer.upstreams.is_offline() || provenance.public {
            return Ok(true);
        }
        if !provenance.is_private_to(self.location) {
            return Ok(false);
        }
        // Cleared for less than what it holds (`share`, and only a client's token read it):
        // a miss, fetched with pullcache's own credentials.
        let clearance = self.check().await?;
        Ok(provenance.clears(self.location, clearance))
    }

    /// What a fetch for this request is made with. A client is checked first where the fetch
    /// would use pullcache's own credentials; a peer never is (its node checked its client).
    /// Without credentials of pullcache's, the fetch goes without any (its answer proves the
    /// content public) or, in intercept mode, with the client's own on the registry's
    /// refusal: what that brings in is private to the location, and served after its check.
    pub async fn grant(&self) -> Result<Grant, CheckError> {
        let authorizer = self.authorizer;
        let mut grant = Grant {
            credential: Credential::Own,
            clearance: None,
        };
        if let Via::Peer { clearance } = self.via {
            grant.clearance = clearance;
            return Ok(grant);
        }
        if authorizer.upstreams.is_offline() {
            return Ok(grant);
        }
        if authorizer.credentialed(&self.location.registry) {
            self.check().await?;
        } else if let (Via::Intercept, Some(header)) = (self.via, self.authorization) {
            // A registry may hide private repositories from anonymous clients (a 404, a
            // redirect to a login page): the pod's credential goes first unless the location
            // is known to be public.
            let known = authorizer.visibility.get(&(self.location.clone(), self.object.asked()));
            let public = matches!(known, Some(Seen::Public));
            grant.credential = Credential::client(header, public);
        } else {
            authorizer.metrics.decided("anonymous");
        }
        // A check this request already passed (for content it holds) clears it at the peers.
        grant.clearance = self.passed.get().copied();
        Ok(grant)
    }

    async fn check(&self) -> Result<Clearance, CheckError> {
        if let Some(clearance) = self.passed.get() {
            return Ok(*clearance);
        }
        let clearance = self
            .authorizer
            .check(self.location, self.object, self.via, self.authorization)
            .await?;
        let _ = self.passed.set(clearance);
        Ok(clearance)
    }
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
