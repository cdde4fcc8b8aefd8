//! Listings: a repository's tag list and the referrers of a digest. They are not content,
//! so they are passed through rather than stored: fetched from the registry with the same
//! authorization as the content they describe ([`Access::grant`]: the client checked first
//! where pullcache's own credentials would be used, the client's own credential in intercept
//! mode), read whole (every page the registry links), kept in memory within the registry's
//! tag TTL per location and credential, and fetched once however many clients ask at the
//! same time. Pages (`n`, `last`) and the referrers filter (`artifactType`) are applied here,
//! as the distribution spec says a registry applies them, whether or not the registry does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use http::header::LINK;
use moka::sync::Cache;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::authorize::Access;
use crate::coalesce::Coalesce;
use crate::error::{Error, Result};
use crate::fetch::{Asker, CacheResult, CredentialKind, Fetch, Resource};
use crate::oci::{Digest, Location, Reference, Registry, Tag};
use crate::sources::Sources;
use crate::upstream::{UpstreamError, UpstreamErrorKind};

/// The most of a listing read, all its pages together: a tag list of tens of thousands of
/// tags fits.
pub const MAX_LISTING_SIZE: u64 = 1024 * 1024;
/// How many listings are read from registries at once; more wait. With the size bound, this
/// bounds what parsing them can hold at any moment.
const MAX_READING: usize = 4;
/// The most pages of one listing followed.
pub const MAX_PAGES: usize = 64;
/// What all remembered listings may hold, in bytes; the least used go first.
pub const MAX_LISTINGS_BYTES: u64 = 32 * 1024 * 1024;
/// The header that names the referrers filters applied.
pub const OCI_FILTERS_APPLIED: &str = "oci-filters-applied";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// What the registry is asked for: a repository's tags, or a digest's referrers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Listing {
    /// [`Resource::Tags`] or [`Resource::Referrers`].
    pub resource: Resource,
    /// The subject digest of referrers.
    pub subject: Option<Digest>,
}

/// What of it a client asks to see: a page of tags, or referrers of one artifact type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// At most this many tags.
    pub n: Option<u32>,
    /// Only tags after this one, in lexical order.
    pub last: Option<String>,
    /// Only referrers of this artifact type.
    pub artifact_type: Option<String>,
}

impl Listing {
    fn fetch(&self, location: &Location) -> Fetch {
        let reference = match &self.subject {
            Some(digest) => Reference::Digest(digest.clone()),
            None => Reference::Tag(Tag::parse("list").expect("a valid tag")),
        };
        Fetch::listing(&location.registry, &location.repository, self.resource, reference, None)
    }
}

/// A listing as the registry holds it, every page read.
#[derive(Debug)]
enum Held {
    /// Its name as the registry spells it, and its tags in lexical order.
    Tags { name: String, tags: Vec<String> },
    /// The descriptors of the manifests that refer to the subject.
    Referrers { manifests: Vec<Descriptor> },
}

/// What one tag or descriptor costs beyond its own bytes: the `String`s' and the
/// allocations' overhead.
const ENTRY_OVERHEAD: usize = 64;

impl Held {
    /// Its memory, roughly: what the cache weighs it by.
    fn size(&self) -> usize {
        match self {
            Held::Tags { name, tags } => name.len() + tags.iter().map(|t| t.len() + ENTRY_OVERHEAD).sum::<usize>(),
            Held::Referrers { manifests } => manifests.iter().map(Descriptor::size).sum(),
        }
    }
}

/// A page of a tag list, as the distribution spec shapes it.
#[derive(Deserialize)]
struct TagsPage {
    name: Option<String>,
    tags: Option<Vec<String>>,
}

/// A page of referrers: an image index.
#[derive(Deserialize)]
struct ReferrersPage {
    manifests: Vec<Descriptor>,
}

/// A referrer's descriptor: what the spec defines of it, nothing else kept.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<std::collections::BTreeMap<String, String>>,
}

impl Descriptor {
    /// Whether it is one: a digest, and media types by RFC 6838.
    fn is_valid(&self) -> bool {
        self.digest.parse::<Digest>().is_ok()
            && crate::oci::is_valid_media_type(&self.media_type)
            && self
                .artifact_type
                .as_deref()
                .is_none_or(crate::oci::is_valid_media_type)
    }

    fn size(&self) -> usize {
        let annotations = self
            .annotations
            .iter()
            .flatten()
            .map(|(k, v)| k.len() + v.len() + ENTRY_OVERHEAD)
            .sum::<usize>();
        self.media_type.len()
            + self.digest.len()
            + self.artifact_type.as_ref().map_or(0, String::len)
            + annotations
            + ENTRY_OVERHEAD * 3
    }
}

/// One answer to a client.
#[derive(Debug)]
pub struct Page {
    pub content_type: HeaderValue,
    pub body: Bytes,
    /// The query of the next page, when there is one (`n` and `last`).
    pub next: Option<String>,
    /// Which filters were applied (`artifactType`).
    pub filters_applied: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    location: Location,
    listing: Listing,
    credential: CredentialKind,
}

type Fetched = std::result::Result<Arc<Held>, Arc<Error>>;

pub struct Listings {
    sources: Arc<Sources>,
    reading: Arc<Semaphore>,
    tag_ttl: Duration,
    tag_ttls: HashMap<Registry, Duration>,
    kept: Cache<Key, (Arc<Held>, Instant)>,
    active: Coalesce<Key, Fetched>,
}

impl Listings {
    /// `tag_ttls` overrides `tag_ttl` for some registries, as for tags.
    pub fn new(sources: Arc<Sources>, tag_ttl: Duration, tag_ttls: HashMap<Registry, Duration>) -> Listings {
        Listings {
            sources,
            reading: Arc::new(Semaphore::new(MAX_READING)),
            tag_ttl,
            tag_ttls,
            kept: Cache::builder()
                .max_capacity(MAX_LISTINGS_BYTES)
                .weigher(|key: &Key, (held, _): &(Arc<Held>, Instant)| {
                    let bytes = held.size() + key.location.repository.as_str().len() + 256;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .build(),
            active: Coalesce::default(),
        }
    }

    /// `view` of the listing for `access`'s client: remembered within the tag TTL for the
    /// credential it would be fetched with, else fetched (once for all who ask at the same
    /// time).
    #[tracing::instrument(skip_all, fields(registry = %access.location.registry, repo = %access.location.repository, listing = %listing.resource))]
    pub async fn get(&self, access: &Access<'_>, listing: &Listing, view: &View) -> Result<(Page, CacheResult)> {
        let grant = access.grant().await?;
        let key = Key {
            location: access.location.clone(),
            listing: listing.clone(),
            credential: grant.credential.kind(),
        };
        let ttl = *self.tag_ttls.get(&access.location.registry).unwrap_or(&self.tag_ttl);
        if let Some((held, at)) = self.kept.get(&key)
            && at.elapsed() < ttl
        {
            return Ok((page(&held, view), CacheResult::Hit));
        }
        let fetch = grant.apply(listing.fetch(access.location));
        let (sources, reading) = (self.sources.clone(), self.reading.clone());
        let (fetched, joined) = self
            .active
            .run(key.clone(), async move {
                let _turn = reading.acquire_owned().await;
                // All its pages within one upstream timeout: a slow registry holds no listing
                // for longer.
                let deadline = sources.upstreams().timeout();
                match tokio::time::timeout(deadline, read(&sources, fetch.clone())).await {
                    Ok(read) => read.map(Arc::new).map_err(Arc::new),
                    Err(_) => Err(Arc::new(
                        UpstreamError::new(&fetch.registry, UpstreamErrorKind::Timeout(deadline)).into(),
                    )),
                }
            })
            .await?;
        let held = fetched.map_err(Error::Shared)?;
        if !joined && !ttl.is_zero() {
            self.kept.insert(key, (held.clone(), Instant::now()));
        }
        let cache = if joined {
            CacheResult::Coalesced
        } else {
            CacheResult::Miss
        };
        Ok((page(&held, view), cache))
    }
}

/// Reads a listing whole, following the registry's `Link` to each next page.
async fn read(sources: &Sources, fetch: Fetch) -> Result<Held> {
    let bad = |what: &str| -> Error {
        UpstreamError::new(
            &fetch.registry,
            UpstreamErrorKind::Body(format!("{} {what}", fetch.resource).into()),
        )
        .into()
    };
    let base = fetch.path();
    let (mut name, mut tags, mut manifests) = (None, Vec::new(), Vec::new());
    let (mut query, mut read) = (None, 0u64);
    for page in 0.. {
        if page == MAX_PAGES {
            // Never a list cut short and taken for whole.
            return Err(bad(&format!("has more than {MAX_PAGES} pages")));
        }
        let mut chain = sources.chain(
            Fetch {
                query: query.take(),
                ..fetch.clone()
            },
            Asker::Client,
        );
        let stream = chain.open().await?;
        let link = stream.head.headers.get(LINK).cloned();
        let left = MAX_LISTING_SIZE.saturating_sub(read);
        if left == 0 {
            return Err(bad(&format!("is larger than {MAX_LISTING_SIZE} bytes")));
        }
        let body = stream.collect(left).await?;
        read += body.len() as u64;
        match fetch.resource {
            Resource::Tags => {
                let page: TagsPage = serde_json::from_slice(&body).map_err(|_| bad("is not a tag list"))?;
                name = name.or(page.name);
                for tag in page.tags.unwrap_or_default() {
                    Tag::parse(&tag).map_err(|_| bad("lists a tag that is not one"))?;
                    tags.push(tag);
                }
            }
            _ => {
                let page: ReferrersPage = serde_json::from_slice(&body).map_err(|_| bad("is not an image index"))?;
                if !page.manifests.iter().all(Descriptor::is_valid) {
                    return Err(bad("lists a descriptor that is not one"));
                }
                manifests.extend(page.manifests);
            }
        }
        match link {
            None => break,
            Some(link) => match next_query(&link, &base) {
                Some(next) => query = Some(next),
                // A next page pullcache will not follow: an error, not a short list.
                None if is_next(&link) => return Err(bad("links a next page elsewhere")),
                None => break,
            },
        }
    }
    tags.sort_unstable();
    tags.dedup();
    Ok(match fetch.resource {
        Resource::Tags => Held::Tags {
            name: name.unwrap_or_else(|| fetch.repository.to_string()),
            tags,
        },
        _ => Held::Referrers { manifests },
    })
}

/// Whether a `Link` names a next page.
fn is_next(link: &HeaderValue) -> bool {
    link.to_str()
        .ok()
        .and_then(|l| l.split_once('>'))
        .is_some_and(|(_, params)| params.split(';').any(|p| p.trim().replace(' ', "") == "rel=\"next\""))
}

/// The query of a `Link: <...>; rel="next"` to the same path, re-encoded; anything else
/// (another path, another host's URL, no next) is not followed.
fn next_query(link: &HeaderValue, path: &str) -> Option<String> {
    if !is_next(link) {
        return None;
    }
    let (target, _) = link.to_str().ok()?.trim_start().strip_prefix('<')?.split_once('>')?;
    // Relative, as registries send it; an absolute URL's path and query, on the same path.
    let target = match target.split_once("://") {
        Some((_, rest)) => &rest[rest.find('/')?..],
        None => target,
    };
    // Behind a registry URL with a path of its own, the registry links its full path.
    let (next_path, query) = target.split_once('?')?;
    if !next_path.ends_with(path) {
        return None;
    }
    let pairs = form_urlencoded::parse(query.as_bytes());
    Some(
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish(),
    )
}

/// What a client sees of a listing.
fn page(held: &Held, view: &View) -> Page {
    match held {
        Held::Tags { name, tags } => {
            // Sorted: what comes after `last` starts where it would be.
            let from = view
                .last
                .as_deref()
                .map_or(0, |last| tags.partition_point(|t| t.as_str() <= last));
            let after = tags[from..].iter();
            let shown: Vec<&String> = match view.n {
                Some(n) => after.clone().take(n as usize).collect(),
                None => after.clone().collect(),
            };
            let more = view.n.is_some() && after.count() > shown.len();
            let next = match (more, shown.last()) {
                (true, Some(last)) => Some(
                    form_urlencoded::Serializer::new(String::new())
                        .append_pair("n", &view.n.unwrap_or_default().to_string())
                        .append_pair("last", last)
                        .finish(),
                ),
                _ => None,
            };
            Page {
                content_type: HeaderValue::from_static("application/json"),
                body: Bytes::from(json!({"name": name, "tags": shown}).to_string()),
                next,
                filters_applied: None,
            }
        }
        Held::Referrers { manifests } => {
            let shown: Vec<&Descriptor> = manifests
                .iter()
                .filter(|m| {
                    view.artifact_type
                        .as_deref()
                        .is_none_or(|kind| m.artifact_type.as_deref() == Some(kind))
                })
                .collect();
            Page {
                content_type: HeaderValue::from_static(OCI_INDEX),
                body: Bytes::from(json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": shown}).to_string()),
                next: None,
                filters_applied: view.artifact_type.as_ref().map(|_| "artifactType"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn tags(names: &[&str]) -> Held {
        Held::Tags {
            name: "team/app".to_owned(),
            tags: names.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    fn shown(page: &Page) -> Value {
        serde_json::from_slice(&page.body).unwrap()
    }

    #[test]
    fn tags_are_paged_in_lexical_order() {
        let mut names = vec!["v2", "latest", "v10", "v1"];
        names.sort_unstable();
        let held = tags(&names);
        let all = page(&held, &View::default());
        assert_eq!(shown(&all)["tags"], json!(["latest", "v1", "v10", "v2"]));
        assert_eq!(all.next, None);
        let view = |n, last: Option<&str>| View {
            n,
            last: last.map(str::to_owned),
            ..View::default()
        };
        let first = page(&held, &view(Some(2), None));
        assert_eq!(shown(&first)["tags"], json!(["latest", "v1"]));
        assert_eq!(first.next.as_deref(), Some("n=2&last=v1"));
        let second = page(&held, &view(Some(2), Some("v1")));
        assert_eq!(shown(&second)["tags"], json!(["v10", "v2"]));
        assert_eq!(second.next, None, "nothing after the last page");
        assert_eq!(shown(&page(&held, &view(Some(0), None)))["tags"], json!([]));
        assert_eq!(shown(&page(&held, &view(None, Some("v2"))))["tags"], json!([]));
        assert_eq!(shown(&all)["name"], "team/app");
    }

    #[test]
    fn referrers_are_filtered_by_artifact_type() {
        let descriptor = |hex: &str, kind: &str| -> Descriptor {
            serde_json::from_value(json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{}", hex.repeat(64)),
                "size": 10,
                "artifactType": kind,
            }))
            .unwrap()
        };
        let held = Held::Referrers {
            manifests: vec![
                descriptor("a", "application/x.sig"),
                descriptor("b", "application/x.sbom"),
            ],
        };
        let all = page(&held, &View::default());
        assert_eq!(shown(&all)["manifests"].as_array().unwrap().len(), 2);
        assert_eq!(all.filters_applied, None);
        let sigs = page(
            &held,
            &View {
                artifact_type: Some("application/x.sig".to_owned()),
                ..View::default()
            },
        );
        let sig = &shown(&sigs)["manifests"];
        assert_eq!(sig.as_array().unwrap().len(), 1);
        assert_eq!(sig[0]["artifactType"], "application/x.sig");
        assert_eq!(sig[0]["digest"], format!("sha256:{}", "a".repeat(64)));
        assert!(descriptor("a", "application/x.sig").is_valid());
        let bad = Descriptor {
            digest: "sha256:x".to_owned(),
            ..descriptor("a", "x/y")
        };
        assert!(!bad.is_valid());
        assert_eq!(sigs.filters_applied, Some("artifactType"));
        assert_eq!(shown(&sigs)["mediaType"], OCI_INDEX);
    }

    #[test]
    fn only_a_next_page_of_the_same_listing_is_followed() {
        let path = "/v2/team/app/tags/list";
        let link = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(
            next_query(&link("</v2/team/app/tags/list?n=2&last=v1>; rel=\"next\""), path).as_deref(),
            Some("n=2&last=v1")
        );
        assert_eq!(
            next_query(
                &link("<https://r.example/v2/team/app/tags/list?last=a%20b>; rel=\"next\""),
                path
            )
            .as_deref(),
            Some("last=a+b")
        );
        for other in [
            "</v2/other/tags/list?n=2>; rel=\"next\"",
            "</v2/team/app/tags/list?n=2>; rel=\"prev\"",
            "<http://169.254.169.254/latest>; rel=\"next\"",
            "garbage",
        ] {
            assert_eq!(next_query(&link(other), path), None, "{other}");
        }
    }
}
