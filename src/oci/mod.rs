//! The OCI distribution vocabulary: repository names, references, digests, media types and
//! the error codes registries answer with, and where content came from ([`Provenance`]). Everything a client sends is parsed here before it
//! reaches a path or a URL.

mod digest;
mod error;
mod manifest;
mod media;
mod name;
mod provenance;

pub use digest::{Digest, DigestError, Mismatch};
pub use error::{ErrorCode, error_body};
pub use manifest::{Descriptor, MAX_MANIFEST_SIZE, ManifestError, References};
pub use media::{
    AcceptClass, BLOB_MEDIA_TYPE, MANIFEST_MEDIA_TYPES, OCI_INDEX, OCI_MANIFEST, is_manifest_media_type,
    is_valid_media_type,
};
pub use name::{
    DOCKER_HUB, DOCKER_HUB_ALIASES, ImageRef, ImageRefError, NameError, Reference, Registry, Repository, Tag,
};
pub use provenance::{Clearance, Location, MAX_PRIVATE_ORIGINS, Origin, Provenance, Visibility};
