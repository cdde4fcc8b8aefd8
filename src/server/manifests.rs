//! `GET|HEAD /v2/<name>/manifests/<reference>`: the HTTP face of [`crate::manifests`]. The
//! stored media type and digest are served back exactly, on HEAD too.

use http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, ETAG, WARNING};
use http::{HeaderMap, Response};

use super::response;
use super::{App, Outcome};
use crate::authorize::Access;
use crate::error::Result;
use crate::fetch::{Asker, CacheResult};
use crate::oci::{AcceptClass, Reference};
use crate::peers::VISIBILITY_HEADER;
use crate::wire::DOCKER_CONTENT_DIGEST;

pub async fn serve(
    app: &App,
    head: bool,
    headers: &HeaderMap,
    access: &Access<'_>,
    reference: &Reference,
) -> Result<Outcome> {
    let accept = AcceptClass::from_headers(headers.get_all(ACCEPT).iter());
    let manifest = app.manifests.get(access, reference, accept).await?;
    let mut resp = Response::builder()
        .header(CONTENT_TYPE, &manifest.media_type)
        .header(DOCKER_CONTENT_DIGEST, manifest.digest.to_string())
        .header(ETAG, format!("\"{}\"", manifest.digest))
        .header(CONTENT_LENGTH, manifest.bytes.len());
    if access.asker == Asker::Peer {
        resp = resp.header(
            VISIBILITY_HEADER,
            manifest.provenance.visibility_at(access.location).as_str(),
        );
    }
    if manifest.cache == CacheResult::Stale {
        resp = resp.header(WARNING, "110 pullcache \"Response is Stale\"");
    }
    let body = if head {
        response::empty()
    } else {
        response::full(manifest.bytes)
    };
    Ok(Outcome::new(
        resp.body(body).expect("manifest response parts are valid"),
        manifest.cache,
    ))
}
