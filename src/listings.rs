//! Listings: a repository's tag list and the referrers of a digest. They are not content,
//! so they are passed through rather than stored: fetched from the registry with the same
//! authorization as the content they describe ([`Access::grant`]: the client checked first
//! where pullcache's own credentials would be used, the client's own credential in intercept
//! mode), read whole (every page the registry links), kept in memory within the registry's
//! tag TTL per location and credential, and fetched once however many clients ask at the
//! same time. Pages (`n`, `last`) and the referrers filter (`artifactType`) are applied here,
//! as the distribution spec says a registry applies them, whether or not the registry does.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use http::header::LINK;
use moka::sync::Cache;
use serde_json::{Value, json};

use crate::authorize::Access;
use crate::coalesce::Coalesce;
use crate::error::{Error, Result};
use crate::fetch::{Asker, CacheResult, CredentialKind, Fetch, Resource};
use crate::oci::{Digest, Location, Reference, Registry, Tag};
use crate::sources::Sources;
use crate::upstream::{UpstreamError, UpstreamErrorKind};

/// The most of a listing read, all its pages together: a tag list of tens of thousands of
/// tags fits.
pub const MAX_LISTING_SIZE: u64 = 4 * 1024 * 1024;
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
    Tags { name: String, tags: BTreeSet<String> },
    /// The descriptors of the manifests that refer to the subject.
    Referrers { manifests: Vec<Value> },
}

impl Held {
    fn size(&self) -> usize {
        match self {
            Held::Tags { name, tags } => name.len() + tags.iter().map(|t| t.len() + 32).sum::<usize>(),
            Held::Referrers { manifests } => manifests.iter().map(|m| m.to_string().len()).sum(),
        }
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
        let sources = self.sources.clone();
        let (fetched, joined) = self
            .active
            .run(key.clone(), async move {
                read(&sources, fetch).await.map(Arc::new).map_err(Arc::new)
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
    let (mut name, mut tags, mut manifests) = (None, BTreeSet::new(), Vec::new());
    let (mut query, mut read) = (None, 0u64);
    for _ in 0..MAX_PAGES {
        let mut chain = sources.chain(
            Fetch {
                query: query.take(),
                ..fetch.clone()
            },
            Asker::Client,
        );
        let stream = chain.open().await?;
        let link = stream.head.headers.get(LINK).cloned();
        let body = stream.collect(MAX_LISTING_SIZE.saturating_sub(read).max(1)).await?;
        read += body.len() as u64;
        let page: Value = serde_json::from_slice(&body).map_err(|_| bad("is not JSON"))?;
        match fetch.resource {
            Resource::Tags => {
                name = name.or_else(|| page["name"].as_str().map(str::to_owned));
                let listed = match &page["tags"] {
                    Value::Null => Vec::new(),
                    Value::Array(listed) => listed.clone(),
                    _ => return Err(bad("has no tag list")),
                };
                for tag in listed {
                    let tag = tag.as_str().ok_or_else(|| bad("lists a tag that is not a string"))?;
                    Tag::parse(tag).map_err(|_| bad("lists a tag that is not one"))?;
                    tags.insert(tag.to_owned());
                }
            }
            _ => match &page["manifests"] {
                Value::Array(listed) => manifests.extend(listed.iter().cloned()),
                _ => return Err(bad("is not an image index")),
            },
        }
        query = link.as_ref().and_then(|link| next_query(link, &base));
        if query.is_none() {
            break;
        }
    }
    Ok(match fetch.resource {
        Resource::Tags => Held::Tags {
            name: name.unwrap_or_else(|| fetch.repository.to_string()),
            tags,
        },
        _ => Held::Referrers { manifests },
    })
}

/// The query of a `Link: <...>; rel="next"` to the same path, re-encoded; anything else
/// (another path, another host's URL, no next) is not followed.
fn next_query(link: &HeaderValue, path: &str) -> Option<String> {
    let link = link.to_str().ok()?;
    let (target, params) = link.strip_prefix('<')?.split_once('>')?;
    if !params.split(';').any(|p| p.trim().replace(' ', "") == "rel=\"next\"") {
        return None;
    }
    // Relative, as registries send it; an absolute URL's path and query, on the same path.
    let target = match target.split_once("://") {
        Some((_, rest)) => &rest[rest.find('/')?..],
        None => target,
    };
    let (next_path, query) = target.split_once('?')?;
    if next_path != path {
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
            let after = tags
                .iter()
                .filter(|t| view.last.as_deref().is_none_or(|last| t.as_str() > last));
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
            let shown: Vec<&Value> = manifests
                .iter()
                .filter(|m| {
                    view.artifact_type
                        .as_deref()
                        .is_none_or(|kind| m["artifactType"].as_str() == Some(kind))
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
        let held = tags(&["v2", "latest", "v10", "v1"]);
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
        let held = Held::Referrers {
            manifests: vec![
                json!({"digest": "sha256:a", "artifactType": "application/x.sig"}),
                json!({"digest": "sha256:b", "artifactType": "application/x.sbom"}),
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
        assert_eq!(
            shown(&sigs)["manifests"],
            json!([{"digest": "sha256:a", "artifactType": "application/x.sig"}])
        );
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
