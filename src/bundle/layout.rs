//! The OCI image layout: `oci-layout`, `index.json` and `blobs/sha256/<hex>`, with the name
//! annotations containerd and skopeo read (`io.containerd.image.name` and
//! `org.opencontainers.image.ref.name`, both holding the full name), and `docker save`'s
//! `manifest.json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use pullcache::oci::ImageRef;

pub const OCI_LAYOUT_FILE: &str = "oci-layout";
pub const INDEX_FILE: &str = "index.json";
pub const DOCKER_MANIFEST_FILE: &str = "manifest.json";
pub const OCI_LAYOUT: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;
pub const IMAGE_NAME: &str = "io.containerd.image.name";
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, Serialize, Deserialize)]
pub struct Index {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Entry>,
}

/// An `index.json` entry: one image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Entry {
    /// The full name, normalized as containerd names it (`docker.io/library/alpine:3.20`),
    /// under both annotations. ref.name holds the full name as skopeo and buildah write it,
    /// not the bare tag containerd's exporter writes: two images that share a tag in one
    /// bundle stay apart (`skopeo copy oci-archive:bundle.tar:registry.example/app:v1`). An
    /// image named by digest is `registry/repository@sha256:...` in both, which the
    /// ref.name grammar allows and which names exactly one image.
    pub fn names(image: &ImageRef) -> BTreeMap<String, String> {
        let name = image.to_string();
        BTreeMap::from([(IMAGE_NAME.to_owned(), name.clone()), (REF_NAME.to_owned(), name)])
    }

    /// The image this entry names, if its annotations give a full reference: containerd's
    /// annotation first, so bundles written with the bare tag in ref.name (older pullcache,
    /// containerd) still read; else ref.name alone, as skopeo writes it.
    pub fn image(&self) -> Option<ImageRef> {
        let full = |key| {
            self.annotations
                .get(key)
                .filter(|name: &&String| name.contains('/') || name.contains('@'))
                .and_then(|name| ImageRef::parse(name).ok())
        };
        full(IMAGE_NAME).or_else(|| full(REF_NAME))
    }
}

/// One image of a `docker save` `manifest.json`.
#[derive(Debug, Deserialize)]
pub struct DockerImage {
    #[serde(rename = "Config")]
    pub config: String,
    #[serde(rename = "RepoTags", default)]
    pub repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    pub layers: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let tagged = ImageRef::parse("registry.test/team/app:v1").unwrap();
        let entry = Entry {
            media_type: "x".into(),
            digest: "d".into(),
            size: 1,
            annotations: Entry::names(&tagged),
        };
        assert_eq!(entry.annotations[REF_NAME], "registry.test/team/app:v1");
        assert_eq!(entry.image(), Some(tagged.clone()));

        let pinned = ImageRef::parse(&format!("registry.test/team/app@sha256:{}", "a".repeat(64))).unwrap();
        let names = Entry::names(&pinned);
        assert_eq!(names[REF_NAME], names[IMAGE_NAME]);
        assert_eq!(names[REF_NAME], pinned.to_string());

        // As older pullcache and containerd wrote it: the bare tag in ref.name.
        let old = Entry {
            annotations: BTreeMap::from([
                (IMAGE_NAME.to_owned(), "registry.test/team/app:v1".to_owned()),
                (REF_NAME.to_owned(), "v1".to_owned()),
            ]),
            ..entry.clone()
        };
        assert_eq!(old.image(), Some(tagged));

        // skopeo's `oci-archive:FILE:NAME` puts a full name in ref.name alone.
        let skopeo = Entry {
            annotations: BTreeMap::from([(REF_NAME.to_owned(), "registry.test/x:y".to_owned())]),
            ..entry.clone()
        };
        assert_eq!(skopeo.image().unwrap().to_string(), "registry.test/x:y");
        let bare = Entry {
            annotations: BTreeMap::from([(REF_NAME.to_owned(), "latest".to_owned())]),
            ..entry
        };
        assert_eq!(bare.image(), None, "a bare tag names no repository");
    }
}
