//! The request path's error: what went wrong and on whose side. Each variant comes from one
//! layer (the client's request, the upstream, a peer, the store, or pullcache itself), and
//! [`Error::origin`] is what `server::response` turns into a status and an OCI error code.

use std::sync::Arc;

use crate::authorize::{AccessError, CheckError};
use crate::coalesce::Abandoned;
use crate::oci::{DigestError, NameError};
use crate::peers::PeerError;
use crate::store::{CommitError, StoreError};
use crate::upstream::{UpstreamError, UpstreamErrorKind};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whose fault an error is. It picks 4xx, 502 or 500, and how loudly it is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Downstream,
    Upstream,
    Internal,
}

/// What is wrong with a client's request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("range {range:?} cannot be served from a {size}-byte blob")]
    Range { range: String, size: u64 },
    #[error("{method} is not supported: pullcache is a read-only pull-through cache")]
    Method { method: String },
    #[error("{operation} is not supported by this pull-through cache")]
    Unsupported { operation: &'static str },
    #[error("no such route: {path}")]
    NoRoute { path: String },
    /// A listing's query that no registry could take.
    #[error("bad query: {reason}")]
    Query { reason: &'static str },
    /// A manifest reference that is neither a digest nor a valid tag: no registry can hold
    /// it, so it is unknown (the distribution spec's 404), and nothing is asked upstream.
    #[error("manifest {reference:?} cannot exist: not a valid tag")]
    ManifestUnknown { reference: String },
    #[error("request URI is {len} bytes; the limit is {limit}")]
    UriTooLong { len: usize, limit: usize },
}

/// A failure inside pullcache: a bug, or work that ended without its result.
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    /// A task on the blocking pool (a commit, a read) panicked or was cancelled.
    #[error("{task} task failed")]
    Task {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// A coalesced lookup's task ended without a result.
    #[error(transparent)]
    Abandoned(#[from] Abandoned),
    /// A blob download's task ended without publishing how.
    #[error("flight ended without a result")]
    FlightLost,
    /// A download passing a blob through (nothing of it would be stored) lost its last
    /// reader, and stopped rather than read on for no one.
    #[error("pass-through download stopped: no one reads it any more")]
    Unread,
    /// A task panicked; what it was doing failed, and nothing else.
    #[error("{task} panicked: {message}")]
    Panicked { task: &'static str, message: String },
    /// Content that verified could not be stored as what it is.
    #[error("storing {what}")]
    Commit {
        what: &'static str,
        #[source]
        source: CommitError,
    },
}

impl InternalError {
    /// The error of a task that panicked with `payload`.
    pub fn panicked(task: &'static str, payload: &(dyn std::any::Any + Send)) -> InternalError {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        InternalError::Panicked { task, message }
    }

    /// The error of a blocking task that did not finish, for `map_err`.
    pub fn task(task: &'static str) -> impl FnOnce(tokio::task::JoinError) -> Error {
        move |source| Error::Internal(InternalError::Task { task, source })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A client may not read what it asked for (a private repository).
    #[error(transparent)]
    Access(#[from] AccessError),
    /// A peer's failure that reached a client (cluster mode).
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// One failure seen by many waiters, e.g. of a flight.
    #[error(transparent)]
    Shared(Arc<Error>),
    #[error("internal: {0}")]
    Internal(#[from] InternalError),
}

impl Error {
    pub fn origin(&self) -> Origin {
        match self {
            Error::Request(_) | Error::Access(_) => Origin::Downstream,
            // An offline cache that lacks what a client asks for answers 404 as it should,
            // like an unknown route: nothing upstream failed.
            Error::Upstream(UpstreamError {
                kind: UpstreamErrorKind::Offline { .. },
                ..
            }) => Origin::Downstream,
            Error::Upstream(_) | Error::Peer(_) => Origin::Upstream,
            Error::Store(_) | Error::Internal(_) => Origin::Internal,
            Error::Shared(inner) => inner.origin(),
        }
    }

    /// The innermost error, past shared wrappers.
    pub fn root(&self) -> &Error {
        match self {
            Error::Shared(inner) => inner.root(),
            other => other,
        }
    }

    /// Whether a source served bytes that are not what their digest says.
    pub fn is_mismatch(&self) -> bool {
        matches!(
            self.root(),
            Error::Upstream(UpstreamError {
                kind: UpstreamErrorKind::Mismatch(_),
                ..
            })
        )
    }

    /// Whether the registry said the thing asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.root(),
            Error::Upstream(UpstreamError {
                kind: UpstreamErrorKind::Status {
                    status: http::StatusCode::NOT_FOUND,
                    ..
                },
                ..
            })
        )
    }
}

impl From<CheckError> for Error {
    fn from(e: CheckError) -> Self {
        match e {
            CheckError::Access(e) => Error::Access(e),
            CheckError::Upstream(e) => Error::Upstream(e),
        }
    }
}

impl From<Abandoned> for Error {
    fn from(e: Abandoned) -> Self {
        Error::Internal(e.into())
    }
}

impl From<NameError> for Error {
    fn from(e: NameError) -> Self {
        Error::Request(e.into())
    }
}

impl From<DigestError> for Error {
    fn from(e: DigestError) -> Self {
        Error::Request(e.into())
    }
}
