//! Manifest media types and the `Accept` classes that key the tag index.

use http::HeaderValue;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_V1: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Every manifest type a registry may answer with; what we send upstream when a client sent
/// no `Accept` at all.
pub const MANIFEST_MEDIA_TYPES: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// Blobs are opaque bytes to us.
pub const BLOB_MEDIA_TYPE: &str = "application/octet-stream";

pub fn is_manifest_media_type(media_type: &str) -> bool {
    MANIFEST_MEDIA_TYPES.contains(&media_type) || media_type == DOCKER_MANIFEST_V1
}

/// Whether `s` is a media type by RFC 6838's grammar (`type/subtype`, each a restricted name:
/// 1 to 127 letters, digits and `!#$&-^_.+`, starting with a letter or digit), with no
/// parameters: what may be stored beside a manifest and sent back as its `Content-Type`.
pub fn is_valid_media_type(s: &str) -> bool {
    let restricted_name = |name: &str| {
        (1..=127).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    s.split_once('/')
        .is_some_and(|(kind, subtype)| restricted_name(kind) && restricted_name(subtype))
}

/// What a client accepts, reduced to what changes the registry's answer for a tag: whether it
/// takes indexes (OCI or Docker list), OCI manifests and Docker manifests. A registry may give a
/// client that takes no index a different manifest than one that does, so a tag's cached answer
/// is kept per class. It is a small closed set, fit for a file name and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AcceptClass {
    index: bool,
    oci: bool,
    docker: bool,
}

impl AcceptClass {
    /// Classifies the `Accept` headers of a request. No header (or only wildcards) counts as
    /// accepting everything, which is what containerd and registries assume.
    pub fn from_headers<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> Self {
        let mut class = AcceptClass {
            index: false,
            oci: false,
            docker: false,
        };
        let mut any = false;
        for media_type in values
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|v| v.split(';').next().unwrap_or("").trim())
        {
            any = true;
            match media_type {
                OCI_INDEX | DOCKER_LIST => class.index = true,
                OCI_MANIFEST => class.oci = true,
                DOCKER_MANIFEST => class.docker = true,
                "*/*" | "application/*" => {
                    class = AcceptClass::all();
                }
                _ => {}
            }
        }
        if !any
            || class
                == (AcceptClass {
                    index: false,
                    oci: false,
                    docker: false,
                })
        {
            return AcceptClass::all();
        }
        class
    }

    pub fn all() -> Self {
        AcceptClass {
            index: true,
            oci: true,
            docker: true,
        }
    }

    /// A short stable name: `index+oci+docker`, `docker`, ...
    pub fn as_str(&self) -> &'static str {
        match (self.index, self.oci, self.docker) {
            (true, true, true) => "index+oci+docker",
            (true, true, false) => "index+oci",
            (true, false, true) => "index+docker",
            (true, false, false) => "index",
            (false, true, true) => "oci+docker",
            (false, true, false) => "oci",
            (false, false, true) => "docker",
            (false, false, false) => "none",
        }
    }

    /// The inverse of [`AcceptClass::as_str`].
    pub fn from_name(name: &str) -> Option<Self> {
        let mut class = AcceptClass {
            index: false,
            oci: false,
            docker: false,
        };
        for part in name.split('+') {
            match part {
                "index" => class.index = true,
                "oci" => class.oci = true,
                "docker" => class.docker = true,
                "none" => {}
                _ => return None,
            }
        }
        (class.as_str() == name).then_some(class)
    }

    /// Whether a client of this class takes a manifest of `media_type`.
    pub fn accepts(&self, media_type: &str) -> bool {
        match media_type {
            OCI_INDEX | DOCKER_LIST => self.index,
            OCI_MANIFEST => self.oci,
            DOCKER_MANIFEST => self.docker,
            _ => false,
        }
    }

    /// The `Accept` value sent upstream for this class.
    pub fn header_value(&self) -> HeaderValue {
        let mut types = Vec::with_capacity(4);
        if self.index {
            types.extend([OCI_INDEX, DOCKER_LIST]);
        }
        if self.oci {
            types.push(OCI_MANIFEST);
        }
        if self.docker {
            types.push(DOCKER_MANIFEST);
        }
        HeaderValue::from_str(&types.join(", ")).expect("media types are valid header text")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_follow_rfc_6838() {
        for good in [
            OCI_MANIFEST,
            DOCKER_MANIFEST_V1,
            BLOB_MEDIA_TYPE,
            "application/vnd.example+json",
        ] {
            assert!(is_valid_media_type(good), "{good}");
        }
        for bad in [
            "",
            "application",
            "application/",
            "/json",
            "application/json; charset=utf-8",
            "text/html\r\nX: y",
            "a/b\u{7}",
            "a/b/c",
            ".a/b",
            "a /b",
        ] {
            assert!(!is_valid_media_type(bad), "{bad:?}");
        }
        assert!(!is_valid_media_type(&format!("a/{}", "b".repeat(128))));
    }

    fn class(values: &[&str]) -> AcceptClass {
        let values: Vec<HeaderValue> = values.iter().map(|v| HeaderValue::from_str(v).unwrap()).collect();
        AcceptClass::from_headers(values.iter())
    }

    #[test]
    fn containerd_accept_is_everything() {
        let c = class(&[
            "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*",
        ]);
        assert_eq!(c, AcceptClass::all());
        assert_eq!(class(&[]), AcceptClass::all());
    }

    #[test]
    fn narrow_accepts_keep_their_class() {
        assert_eq!(class(&[DOCKER_MANIFEST]).as_str(), "docker");
        assert_eq!(
            class(&[OCI_MANIFEST, "application/vnd.oci.image.index.v1+json;q=0.9"]).as_str(),
            "index+oci"
        );
        assert_eq!(class(&["text/html"]), AcceptClass::all());
    }

    #[test]
    fn accepts_by_media_type() {
        let docker = class(&[DOCKER_MANIFEST]);
        assert!(docker.accepts(DOCKER_MANIFEST));
        assert!(!docker.accepts(OCI_INDEX));
        assert!(AcceptClass::all().accepts(DOCKER_LIST));
        assert!(!AcceptClass::all().accepts("text/plain"));
        for name in ["index+oci+docker", "oci", "index+docker", "none"] {
            assert_eq!(AcceptClass::from_name(name).unwrap().as_str(), name);
        }
        assert!(AcceptClass::from_name("oci+index").is_none());
    }

    #[test]
    fn header_value_lists_the_class() {
        assert_eq!(
            class(&[DOCKER_MANIFEST]).header_value(),
            "application/vnd.docker.distribution.manifest.v2+json"
        );
    }
}
