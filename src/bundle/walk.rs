//! Walking an image through pullcache's own registry API: the manifest by tag or digest, the
//! index's children for the chosen platforms, then every config and layer. Whatever answers
//! (a running instance, or one started in-process on a cache directory) caches what it serves.

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use pullcache::oci::{Descriptor, Digest, ImageRef, MANIFEST_MEDIA_TYPES, References, is_manifest_media_type};

/// A manifest as the walk found it.
#[derive(Debug, Clone)]
pub struct Found {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
}

/// What one image's walk reached.
#[derive(Debug, Clone)]
pub struct Walked {
    pub image: ImageRef,
    /// The manifest the reference names (an index, or an image manifest).
    pub top: Found,
    /// Child manifests taken (for the platforms asked), then configs and layers.
    pub manifests: Vec<Found>,
    pub blobs: Vec<Descriptor>,
}

pub struct Walker {
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    platforms: Vec<String>,
}

impl Walker {
    /// Walks through the registry API at `base` (`http://host:port`), taking only `platforms`
    /// from indexes (all when empty).
    pub fn new(base: &str, platforms: Vec<String>) -> Walker {
        Walker {
            base: base.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            platforms,
        }
    }

    async fn get(
        &self,
        image: &ImageRef,
        kind: &str,
        reference: &str,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let uri = format!(
            "{}/v2/{}/{kind}/{reference}?ns={}",
            self.base, image.repository, image.registry
        );
        let req = Request::get(&uri)
            .header(ACCEPT, MANIFEST_MEDIA_TYPES.join(", "))
            .body(Empty::new())?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| anyhow::anyhow!("GET {uri}: {e}"))?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            anyhow::bail!(
                "{image}: {kind}/{reference} answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        Ok(resp)
    }

    async fn manifest(&self, image: &ImageRef, reference: &str) -> anyhow::Result<(Found, Bytes)> {
        let resp = self.get(image, "manifests", reference).await?;
        let media_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        anyhow::ensure!(
            is_manifest_media_type(&media_type),
            "{image}: {reference} is not a manifest pullcache knows ({media_type:?})"
        );
        let bytes = resp.into_body().collect().await?.to_bytes();
        let found = Found {
            digest: Digest::of(&bytes),
            media_type,
            size: bytes.len() as u64,
        };
        Ok((found, bytes))
    }

    /// Resolves `image` and every manifest under it, fetching manifests (so the server caches
    /// them) but not blobs.
    pub async fn resolve(&self, image: &ImageRef) -> anyhow::Result<Walked> {
        let (top, bytes) = self.manifest(image, &image.reference.to_string()).await?;
        let refs = References::of(&bytes)?;
        let mut walked = Walked {
            image: image.clone(),
            top,
            manifests: Vec::new(),
            blobs: refs.blobs,
        };
        let children: Vec<_> = refs
            .manifests
            .into_iter()
            .filter(|child| child.for_platforms(&self.platforms))
            .collect();
        anyhow::ensure!(
            walked.blobs.len() + children.len() > 0,
            "{image}: no manifest for platforms {:?}",
            self.platforms
        );
        for child in children {
            let (found, bytes) = self.manifest(image, &child.digest.to_string()).await?;
            anyhow::ensure!(
                found.digest == child.digest,
                "{image}: child {} answered other bytes",
                child.digest
            );
            let refs = References::of(&bytes)?;
            anyhow::ensure!(
                refs.manifests.is_empty(),
                "{image}: an index inside an index is not supported"
            );
            walked.blobs.extend(refs.blobs);
            walked.manifests.push(found);
        }
        let mut seen = std::collections::HashSet::new();
        walked.blobs.retain(|b| seen.insert(b.digest.clone()));
        Ok(walked)
    }

    /// Fetches one blob whole, reporting each chunk's length; returns its size.
    pub async fn fetch_blob(&self, image: &ImageRef, blob: &Descriptor, on_bytes: &dyn Fn(u64)) -> anyhow::Result<u64> {
        let resp = self.get(image, "blobs", &blob.digest.to_string()).await?;
        let mut body = resp.into_body();
        let mut size = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| anyhow::anyhow!("{image}: blob {}: {e}", blob.digest))?;
            if let Ok(data) = frame.into_data() {
                size += data.len() as u64;
                on_bytes(data.len() as u64);
            }
        }
        if let Some(expected) = blob.size {
            anyhow::ensure!(
                size == expected,
                "{image}: blob {} is {size} bytes, expected {expected}",
                blob.digest
            );
        }
        Ok(size)
    }
}
