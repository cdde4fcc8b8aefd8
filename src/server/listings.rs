//! `GET|HEAD /v2/<name>/tags/list` and `/v2/<name>/referrers/<digest>`: the HTTP face of
//! [`crate::listings`], with the spec's `Link` to a next page of tags and
//! `OCI-Filters-Applied` for filtered referrers.

use http::Response;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, LINK};

use super::response;
use super::{App, Outcome};
use crate::authorize::Access;
use crate::error::Result;
use crate::listings::{Listing, OCI_FILTERS_APPLIED, View};

/// `base` is the request's path with its `ns`, ready for a next page's query.
pub async fn serve(
    app: &App,
    head: bool,
    access: &Access<'_>,
    listing: &Listing,
    view: &View,
    base: &str,
) -> Result<Outcome> {
    let (page, cache) = app.listings.get(access, listing, view).await?;
    let mut resp = Response::builder()
        .header(CONTENT_TYPE, &page.content_type)
        .header(CONTENT_LENGTH, page.body.len());
    if let Some(next) = &page.next {
        resp = resp.header(LINK, format!("<{base}{next}>; rel=\"next\""));
    }
    if let Some(filters) = page.filters_applied {
        resp = resp.header(OCI_FILTERS_APPLIED, filters);
    }
    let body = if head {
        response::empty()
    } else {
        response::full(page.body)
    };
    Ok(Outcome::new(
        resp.body(body).expect("listing response parts are valid"),
        cache,
    ))
}
