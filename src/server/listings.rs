//! `GET|HEAD /v2/<name>/tags/list` and `/v2/<name>/referrers/<digest>`: the HTTP face of
//! [`crate::listings`]. The registry's body, `Content-Type`, `Link` and
//! `OCI-Filters-Applied` are served back as it sent them.

use http::Response;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, LINK};

use super::response;
use super::{App, Outcome};
use crate::authorize::Access;
use crate::error::Result;
use crate::listings::{Listing, OCI_FILTERS_APPLIED};

pub async fn serve(app: &App, head: bool, access: &Access<'_>, listing: &Listing) -> Result<Outcome> {
    let (listed, cache) = app.listings.get(access, listing).await?;
    let mut resp = Response::builder()
        .header(CONTENT_TYPE, &listed.content_type)
        .header(CONTENT_LENGTH, listed.body.len());
    if let Some(link) = &listed.link {
        resp = resp.header(LINK, link);
    }
    if let Some(filters) = &listed.filters_applied {
        resp = resp.header(OCI_FILTERS_APPLIED, filters);
    }
    let body = if head {
        response::empty()
    } else {
        response::full(listed.body.clone())
    };
    Ok(Outcome::new(
        resp.body(body).expect("listing response parts are valid"),
        cache,
    ))
}
