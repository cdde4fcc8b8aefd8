//! What a manifest refers to: the child manifests of an index, or the config and layers of an
//! image manifest. Pins and eviction walk images with it, so it reads untrusted JSON: only
//! the fields it needs, every digest validated, nothing else trusted.

use serde::Deserialize;

use super::Digest;

/// Manifests larger than this are refused, as distribution refuses them.
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// What a manifest points at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct References {
    /// Child manifests (of an index or manifest list).
    pub manifests: Vec<Descriptor>,
    /// The config and layers (of an image manifest).
    pub blobs: Vec<Descriptor>,
}

/// One reference, as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub digest: Digest,
    pub size: Option<u64>,
    pub media_type: Option<String>,
    /// `os/architecture[/variant]`, for an index's children.
    pub platform: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {0} bytes, over the {MAX_MANIFEST_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("manifest is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("manifest refers to an invalid digest: {0}")]
    Digest(#[from] super::DigestError),
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    manifests: Vec<RawDescriptor>,
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Vec<RawDescriptor>,
}

#[derive(Deserialize)]
struct RawDescriptor {
    digest: String,
    size: Option<u64>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

impl References {
    /// Parses the references out of a manifest's bytes (OCI or Docker schema 2; an image
    /// manifest or an index).
    pub fn of(bytes: &[u8]) -> Result<References, ManifestError> {
        if bytes.len() as u64 > MAX_MANIFEST_SIZE {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let raw: Raw = serde_json::from_slice(bytes)?;
        let mut refs = References::default();
        for child in raw.manifests {
            refs.manifests.push(child.parse()?);
        }
        for blob in raw.config.into_iter().chain(raw.layers) {
            refs.blobs.push(blob.parse()?);
        }
        Ok(refs)
    }
}

impl RawDescriptor {
    fn parse(self) -> Result<Descriptor, ManifestError> {
        Ok(Descriptor {
            digest: self.digest.parse()?,
            size: self.size,
            media_type: self.media_type,
            platform: self.platform.map(|p| match p.variant {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            }),
        })
    }
}

impl Descriptor {
    /// Whether this index entry is for one of `platforms` (`os/arch`, or `os/arch/variant`
    /// to also match the variant). An empty list takes every entry.
    pub fn for_platforms(&self, platforms: &[String]) -> bool {
        if platforms.is_empty() {
            return true;
        }
        let Some(own) = &self.platform else {
            return false;
        };
        platforms.iter().any(|p| own == p || own.starts_with(&format!("{p}/")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn image_manifest_and_index() {
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}","size":1}},"layers":[{{"digest":"{}"}},{{"digest":"{}"}}]}}"#,
            d('a'),
            d('b'),
            d('c')
        );
        let refs = References::of(image.as_bytes()).unwrap();
        assert!(refs.manifests.is_empty());
        assert_eq!(
            refs.blobs.iter().map(|b| b.digest.to_string()).collect::<Vec<_>>(),
            [d('a'), d('b'), d('c')]
        );
        assert_eq!(refs.blobs[0].size, Some(1));

        let index = format!(
            r#"{{"manifests":[{{"digest":"{}","platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},{{"digest":"{}"}}]}}"#,
            d('d'),
            d('e')
        );
        let refs = References::of(index.as_bytes()).unwrap();
        assert_eq!(refs.manifests.len(), 2);
        assert_eq!(refs.manifests[0].platform.as_deref(), Some("linux/arm64/v8"));
        assert_eq!(refs.manifests[1].platform, None);
        let arm = |p: &[&str]| refs.manifests[0].for_platforms(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(arm(&[]) && arm(&["linux/arm64"]) && arm(&["linux/arm64/v8"]) && arm(&["linux/amd64", "linux/arm64"]));
        assert!(!arm(&["linux/amd64"]) && !arm(&["linux/arm64/v7"]) && !arm(&["linux/arm"]));
        assert!(!refs.manifests[1].for_platforms(&["linux/amd64".into()]));
        assert!(refs.blobs.is_empty());
    }

    #[test]
    fn hostile_manifests_are_errors() {
        for bad in [
            &b"not json"[..],
            br#"{"layers":[{"digest":"sha256:../../etc/passwd"}]}"#,
            br#"{"manifests":[{"digest":5}]}"#,
            br#"{"layers":[{}]}"#,
        ] {
            assert!(
                References::of(bad).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
        let huge = vec![b' '; MAX_MANIFEST_SIZE as usize + 1];
        assert!(matches!(References::of(&huge), Err(ManifestError::TooLarge(_))));
    }
}
