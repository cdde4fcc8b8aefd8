//! `GET|HEAD /v2/<name>/blobs/<digest>`: from the store, or by joining or starting the digest's
//! flight. Single ranges are honoured, also while the blob is still downloading.

use http::header::{ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, RANGE};
use http::{HeaderMap, Method, Response, StatusCode};

use super::response::{self, Body};
use super::routes::Target;
use super::sendfile::Spans;
use super::{App, Outcome};
use crate::error::Result;
use crate::fetch::{Asker, CacheResult, Fetch};
use crate::flight::{BlobSource, Tail};
use crate::oci::{BLOB_MEDIA_TYPE, Digest};
use crate::wire::DOCKER_CONTENT_DIGEST;

pub async fn serve(
    app: &App,
    head: bool,
    headers: &HeaderMap,
    target: &Target,
    digest: &Digest,
    spans: Option<&Spans>,
    asker: Asker,
) -> Result<Outcome> {
    let range = headers.get(RANGE).and_then(|v| v.to_str().ok());
    let sendfile = || spans.map(|spans| (spans.clone(), app.metrics.sendfile_bytes.clone()));
    let source = if head {
        match app.flights.lookup(digest)? {
            Some(source) => source,
            None => return head_elsewhere(app, target, digest, asker).await,
        }
    } else {
        app.flights.get(&target.registry, &target.repository, digest, asker)?
    };
    match source {
        BlobSource::Stored(blob) => {
            let size = blob.size;
            let span = super::range::parse(range, size)?;
            let (start, end) = span.map_or((0, size), |(a, b)| (a, b + 1));
            let body = if head {
                response::empty()
            } else {
                response::tail(Tail::stored(blob, start, end), sendfile())
            };
            Ok(Outcome::new(respond(digest, Some(size), span, body), CacheResult::Hit))
        }
        BlobSource::Flight { flight, joined } => {
            let size = flight.headers().await?;
            // Without a known size a range cannot be placed; RFC 9110 lets us send it all.
            let span = match size {
                Some(size) => super::range::parse(range, size)?,
                None => None,
            };
            let (start, end) = match span {
                Some((a, b)) => (a, Some(b + 1)),
                None => (0, size),
            };
            let body = if head {
                response::empty()
            } else {
                response::tail(flight.tail(start, end), sendfile())
            };
            let cache = if joined {
                CacheResult::Coalesced
            } else {
                CacheResult::Miss
            };
            Ok(Outcome::new(respond(digest, size, span, body), cache))
        }
    }
}

/// A HEAD for a blob this node does not have: asked of the sources (in cluster mode the
/// peers first), downloading nothing.
async fn head_elsewhere(app: &App, target: &Target, digest: &Digest, asker: Asker) -> Result<Outcome> {
    let fetch = Fetch::blob(Method::HEAD, &target.registry, &target.repository, digest);
    let mut chain = app.sources.chain(fetch, asker);
    let size = chain.open().await?.size();
    Ok(Outcome::new(
        respond(digest, size, None, response::empty()),
        CacheResult::Bypass,
    ))
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
