//! Listings: a repository's tag list and the referrers of a digest. They are not content,
//! so they are passed through rather than stored: fetched from the registry with the same
//! authorization as the content they describe ([`Access::grant`]: the client checked first
//! where pullcache's own credentials would be used, the client's own credential in intercept
//! mode), kept in memory within the registry's tag TTL per location, query and credential,
//! and fetched once however many clients ask at the same time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use http::header::{CONTENT_TYPE, LINK};
use moka::sync::Cache;

use crate::authorize::Access;
use crate::coalesce::Coalesce;
use crate::error::{Error, Result};
use crate::fetch::{Asker, CacheResult, CredentialKind, Fetch, Resource};
use crate::oci::{Digest, Location, Reference, Registry, Tag};
use crate::sources::Sources;

/// The largest listing read: a tag list of tens of thousands of tags fits.
pub const MAX_LISTING_SIZE: u64 = 4 * 1024 * 1024;
/// What all remembered listings may hold, in bytes; the least used go first.
pub const MAX_LISTINGS_BYTES: u64 = 32 * 1024 * 1024;
/// The header a registry names the filters it applied to referrers with.
pub const OCI_FILTERS_APPLIED: &str = "oci-filters-applied";

/// A listing a client asks for: what, and the query the registry is sent (only what the spec
/// defines, validated, in one order: `n` and `last`, or `artifactType`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Listing {
    /// [`Resource::Tags`] or [`Resource::Referrers`].
    pub resource: Resource,
    /// The subject digest of referrers.
    pub subject: Option<Digest>,
    pub query: Option<String>,
}

impl Listing {
    fn fetch(&self, location: &Location) -> Fetch {
        let reference = match &self.subject {
            Some(digest) => Reference::Digest(digest.clone()),
            None => Reference::Tag(Tag::parse("list").expect("a valid tag")),
        };
        Fetch::listing(
            &location.registry,
            &location.repository,
            self.resource,
            reference,
            self.query.clone(),
        )
    }
}

/// A listing as the registry answered it.
#[derive(Debug)]
pub struct Listed {
    pub content_type: HeaderValue,
    /// The next page (`Link: <...>; rel="next"`), relayed as the registry sent it.
    pub link: Option<HeaderValue>,
    /// Which referrers filters the registry applied.
    pub filters_applied: Option<HeaderValue>,
    pub body: Bytes,
    /// How long it is kept: the registry's tag TTL.
    ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    location: Location,
    listing: Listing,
    credential: CredentialKind,
}

type Fetched = std::result::Result<Arc<Listed>, Arc<Error>>;

pub struct Listings {
    sources: Arc<Sources>,
    tag_ttl: Duration,
    tag_ttls: HashMap<Registry, Duration>,
    kept: Cache<Key, (Arc<Listed>, Instant)>,
    active: Coalesce<Key, Fetched>,
}

impl Listings {
    /// `tag_ttls` overrides `tag_ttl` for some registries, as for tags.
    pub fn new(sources: Arc<Sources>, tag_ttl: Duration, tag_ttls: HashMap<Registry, Duration>) -> Listings {
        Listings {
            sources,
            tag_ttl,
            tag_ttls,
            kept: Cache::builder()
                .max_capacity(MAX_LISTINGS_BYTES)
                .weigher(|key: &Key, (listed, _): &(Arc<Listed>, Instant)| {
                    let bytes = listed.body.len() + key.location.repository.as_str().len() + 256;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .build(),
            active: Coalesce::default(),
        }
    }

    /// The listing for `access`'s client: remembered within the tag TTL for the credential
    /// it would be fetched with, else fetched (once for all who ask at the same time).
    #[tracing::instrument(skip_all, fields(registry = %access.location.registry, repo = %access.location.repository, listing = %listing.resource))]
    pub async fn get(&self, access: &Access<'_>, listing: &Listing) -> Result<(Arc<Listed>, CacheResult)> {
        let grant = access.grant().await?;
        let key = Key {
            location: access.location.clone(),
            listing: listing.clone(),
            credential: grant.credential.kind(),
        };
        if let Some((listed, at)) = self.kept.get(&key)
            && at.elapsed() < listed.ttl
        {
            return Ok((listed, CacheResult::Hit));
        }
        let ttl = *self.tag_ttls.get(&access.location.registry).unwrap_or(&self.tag_ttl);
        let fetch = grant.apply(listing.fetch(access.location));
        let sources = self.sources.clone();
        let (fetched, joined) = self
            .active
            .run(key.clone(), async move { read(&sources, fetch, ttl).await.map_err(Arc::new) })
            .await?;
        let listed = fetched.map_err(Error::Shared)?;
        if !joined && !ttl.is_zero() {
            self.kept.insert(key, (listed.clone(), Instant::now()));
        }
        Ok((listed, if joined { CacheResult::Coalesced } else { CacheResult::Miss }))
    }
}

async fn read(sources: &Sources, fetch: Fetch, ttl: Duration) -> Result<Arc<Listed>> {
    let mut chain = sources.chain(fetch, Asker::Client);
    let stream = chain.open().await?;
    let header = |name: &str| stream.head.headers.get(name).cloned();
    let content_type = header(CONTENT_TYPE.as_str()).unwrap_or(HeaderValue::from_static("application/json"));
    let link = header(LINK.as_str());
    let filters_applied = header(OCI_FILTERS_APPLIED);
    let body = stream.collect(MAX_LISTING_SIZE).await?;
    Ok(Arc::new(Listed {
        content_type,
        link,
        filters_applied,
        body,
        ttl,
    }))
}
