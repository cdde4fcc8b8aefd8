//! The OCI distribution vocabulary: repository names, references, digests, media types and
//! the error codes registries answer with. Everything a client sends is parsed here before it
//! reaches a path or a URL.

mod digest;
mod error;
mod manifest;
mod media;
mod name;

pub use digest::{Digest, DigestError, Mismatch};
pub use error::{ErrorCode, error_body};
pub use manifest::{Descriptor, MAX_MANIFEST_SIZE, ManifestError, References};
pub use media::{AcceptClass, BLOB_MEDIA_TYPE, MANIFEST_MEDIA_TYPES, OCI_INDEX, OCI_MANIFEST, is_manifest_media_type};
pub use name::{ImageRef, ImageRefError, NameError, Reference, Registry, Repository, Tag};
