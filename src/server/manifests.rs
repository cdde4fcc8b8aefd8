//! `GET|HEAD /v2/<name>/manifests/<reference>`: the HTTP face of [`crate::manifests`]. The
//! stored media type and digest are served back exactly, on HEAD too.

use http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, ETAG, WARNING};
use http::{HeaderMap, Response};

use super::response;
use super::routes::Target;
use super::{App, Outcome};
use crate::error::Result;
use crate::fetch::{Asker, CacheResult};
use crate::oci::{AcceptClass, Reference};
use crate::wire::DOCKER_CONTENT_DIGEST;

pub async fn serve(
    app: &App,
    head: bool,
    headers: &HeaderMap,
    target: &Target,
    reference: &Reference,
    asker: Asker,
) -> Result<Outcome> {
    let accept = AcceptClass::from_headers(headers.get_all(ACCEPT).iter());
    let manifest = app
        .manifests
        .get(&target.registry, &target.repository, reference, accept, asker)
        .await?;
    // What it refers to is in this repository, for the access checks of the blobs that follow.
    app.authorize
        .learn(&target.registry, &target.repository, &manifest.digest, &manifest.bytes);
    let mut resp = Response::builder()
        .header(CONTENT_TYPE, &manifest.media_type)
        .header(DOCKER_CONTENT_DIGEST, manifest.digest.to_string())
        .header(ETAG, format!("\"{}\"", manifest.digest))
        .header(CONTENT_LENGTH, manifest.bytes.len());
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
