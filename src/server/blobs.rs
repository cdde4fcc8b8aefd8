//! `GET|HEAD /v2/<name>/blobs/<digest>`: from the store, or by joining or starting the digest's
//! flight. Single ranges are honoured, also while the blob is still downloading. A reader of a
//! download holds back the last byte of its range until the whole blob is verified, so a
//! bounded range (a lazy pull's span) of a blob not yet verified is asked of the registry on
//! its own and answered at once, while the whole blob goes on downloading once for what comes
//! next; an open-ended one (`bytes=N-`, containerd's parallel chunks) follows the one
//! download.

use http::header::{ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, RANGE};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited, StreamBody};

use super::response::{self, Body};
use super::sendfile::Spans;
use super::{App, Outcome};
use crate::authorize::{Access, AccessError};
use crate::error::{Error, Result};
use crate::fetch::{Asker, CacheResult, Fetch, Resource};
use crate::flight::{BlobSource, Tail};
use crate::oci::{BLOB_MEDIA_TYPE, Digest, Reference, Visibility};
use crate::peers::VISIBILITY_HEADER;
use crate::wire::DOCKER_CONTENT_DIGEST;

pub async fn serve(
    app: &App,
    head: bool,
    headers: &HeaderMap,
    access: &Access<'_>,
    digest: &Digest,
    spans: Option<&Spans>,
) -> Result<Outcome> {
    let range = headers.get(RANGE).and_then(|v| v.to_str().ok());
    let sendfile = || spans.map(|spans| (spans.clone(), app.metrics.sendfile_bytes.clone()));
    let source = if head {
        match app.flights.lookup(access, digest).await? {
            Some(source) => source,
            None => return head_elsewhere(app, access, digest).await,
        }
    } else {
        app.flights.get(access, digest).await?
    };
    let told = |resp: Response<Body>, visibility: Visibility| tell(resp, access, visibility);
    match source {
        BlobSource::Stored { blob, visibility } => {
            let size = blob.size;
            let span = super::range::parse(range, size)?;
            let (start, end) = span.map_or((0, size), |(a, b)| (a, b + 1));
            let body = if head {
                response::empty()
            } else {
                response::tail(Tail::stored(blob, start, end), sendfile())
            };
            let resp = told(respond(digest, Some(size), span, body), visibility);
            Ok(Outcome::new(resp, CacheResult::Hit))
        }
        BlobSource::Flight { flight, joined, seat } => {
            let size = flight.headers().await?;
            // Not one byte before the answer's provenance lets this requester in.
            let provenance = flight.provenance();
            if !access.serves(&provenance).await? {
                return Err(not_here(access, digest));
            }
            // Without a known size a range cannot be placed; RFC 9110 lets us send it all.
            let span = match size {
                Some(size) => super::range::parse(range, size)?,
                None => None,
            };
            let (start, end) = match span {
                Some((a, b)) => (a, Some(b + 1)),
                None => (0, size),
            };
            if let (false, Some((a, b)), Some(size), true) = (head, span, size, range.is_some_and(bounded))
                && !flight.verified()
                && let Some(resp) = span_from_registry(app, access, digest, (a, b), size).await
            {
                let resp = told(resp, provenance.visibility_at(access.location));
                return Ok(Outcome::new(resp, CacheResult::Bypass));
            }
            let body = if head {
                response::empty()
            } else {
                response::tail(flight.tail(seat, start, end), sendfile())
            };
            let cache = if joined {
                CacheResult::Coalesced
            } else {
                CacheResult::Miss
            };
            let resp = told(
                respond(digest, size, span, body),
                provenance.visibility_at(access.location),
            );
            Ok(Outcome::new(resp, cache))
        }
    }
}

/// Whether a `Range` header has an end: `bytes=a-b`, or the last `b` bytes (`bytes=-b`).
fn bounded(range: &str) -> bool {
    range
        .trim()
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .is_some_and(|(_, end)| !end.trim().is_empty())
}

/// The longest bounded range asked of a registry on its own (soci's spans are ~4 MiB); a
/// longer one follows the download.
pub const MAX_SPAN: u64 = 16 * 1024 * 1024;
/// How many spans this node asks of registries at once; more follow the download.
pub const MAX_SPANS: usize = 32;

/// Bytes `a..=b` of a blob of `size` not yet verified, asked of the registry on their own
/// (never of a peer) with the request's grant: the registry's own answer, as the client would
/// have had it without pullcache, stored nowhere, and sent as such (no `ETag`, not to be
/// cached). Its body must be in within the upstream timeout. `None` when the span is too
/// long, too many are asked already, or the registry did not answer that span exactly (a
/// 200, another range): the caller follows the download instead.
async fn span_from_registry(
    app: &App,
    access: &Access<'_>,
    digest: &Digest,
    (a, b): (u64, u64),
    size: u64,
) -> Option<Response<Body>> {
    let len = b - a + 1;
    if len > MAX_SPAN {
        return None;
    }
    let turn = app.spans.clone().try_acquire_owned().ok()?;
    let grant = access.grant().await.ok()?;
    let location = access.location;
    let fetch = grant
        .apply(Fetch::blob(
            Method::GET,
            &location.registry,
            &location.repository,
            digest,
        ))
        .span(a, b);
    let upstreams = app.sources.upstreams();
    let deadline = tokio::time::Instant::now() + upstreams.timeout();
    let resp = match upstreams.fetch(&fetch).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(error = %e, "a span asked of the registry failed; following the download");
            return None;
        }
    };
    let exact = format!("bytes {a}-{b}/{size}");
    let content_range = resp.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok());
    if resp.status() != StatusCode::PARTIAL_CONTENT || content_range != Some(exact.as_str()) {
        return None;
    }
    app.metrics.spans.inc();
    let counted = app.metrics.span_bytes.clone();
    // Every frame by the deadline; the turn is held until the body is done with.
    let frames = futures_util::stream::unfold(Some((resp.into_body(), turn)), move |state| {
        let counted = counted.clone();
        async move {
            let (mut body, turn) = state?;
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the registry's span stalled",
                    )),
                    None,
                )),
                Ok(None) => None,
                Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e)), None)),
                Ok(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        counted.inc_by(data.len() as u64);
                    }
                    Some((Ok(frame), Some((body, turn))))
                }
            }
        }
    });
    let body = Limited::new(StreamBody::new(frames), usize::try_from(len).ok()?)
        .map_err(std::io::Error::other)
        .boxed_unsync();
    let mut resp = respond(digest, Some(size), Some((a, b)), body);
    resp.headers_mut().remove(ETAG);
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Some(resp)
}

/// A HEAD for a blob this node does not have under the location asked: asked of the sources
/// (in cluster mode the peers first), downloading nothing.
async fn head_elsewhere(app: &App, access: &Access<'_>, digest: &Digest) -> Result<Outcome> {
    let grant = access.grant().await?;
    let location = access.location;
    let fetch = grant.apply(Fetch::blob(
        Method::HEAD,
        &location.registry,
        &location.repository,
        digest,
    ));
    let mut chain = app.sources.chain(fetch, access.asker);
    let size = chain.open().await?.size();
    Ok(Outcome::new(
        respond(digest, size, None, response::empty()),
        CacheResult::Bypass,
    ))
}

/// Tells a peer whether what it is served is public, for its own record of the provenance.
fn tell(mut resp: Response<Body>, access: &Access<'_>, visibility: Visibility) -> Response<Body> {
    if access.asker == Asker::Peer {
        resp.headers_mut()
            .insert(VISIBILITY_HEADER, HeaderValue::from_static(visibility.as_str()));
    }
    resp
}

/// The error for content that may not be served under the location asked.
fn not_here(access: &Access<'_>, digest: &Digest) -> Error {
    let location = access.location;
    Error::Access(AccessError::NotInRepository {
        registry: location.registry.clone(),
        repository: location.repository.clone(),
        resource: Resource::Blob,
        reference: Reference::Digest(digest.clone()),
    })
}

fn respond(digest: &Digest, size: Option<u64>, span: Option<(u64, u64)>, body: Body) -> Response<Body> {
    let mut resp = Response::builder()
        .header(CONTENT_TYPE, BLOB_MEDIA_TYPE)
        .header(DOCKER_CONTENT_DIGEST, digest.to_string())
        .header(ETAG, format!("\"{digest}\""))
        .header(CACHE_CONTROL, "max-age=31536000")
        .header(ACCEPT_RANGES, "bytes");
    resp = match (span, size) {
        (Some((a, b)), Some(size)) => resp
            .status(StatusCode::PARTIAL_CONTENT)
            .header(CONTENT_RANGE, format!("bytes {a}-{b}/{size}"))
            .header(CONTENT_LENGTH, b - a + 1),
        (_, Some(size)) => resp.header(CONTENT_LENGTH, size),
        (_, None) => resp,
    };
    resp.body(body).expect("blob response parts are valid")
}
