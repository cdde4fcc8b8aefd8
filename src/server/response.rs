//! Responses: the body type, and the one place an [`Error`] becomes a status and an OCI error
//! code. Handlers never pick error statuses themselves.

use std::io;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use prometheus::IntCounter;

use super::sendfile::{MAX_SPAN, Spans};
use crate::authorize::AccessError;
use crate::error::{Error, Origin, RequestError};
use crate::fetch::Resource;
use crate::flight::{Chunk, ReadBuffers, Tail};
use crate::oci::{ErrorCode, NameError, error_body};
use crate::peers::PeerError;
use crate::upstream::{UpstreamError, UpstreamErrorKind};

pub type Body = UnsyncBoxBody<Bytes, io::Error>;

pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// Bytes per read of a blob file into memory, when it cannot be sent with `sendfile`: small
/// enough to still be in the core's cache when TLS encrypts them.
const READ_CHUNK: u64 = 256 * 1024;

/// A body that streams a [`Tail`]. With `sendfile` (a plain HTTP/1 connection's span queue
/// and the counter of bytes sent that way) the file's bytes go out with `sendfile`;
/// otherwise they are read into memory. An error aborts the response mid-body, which closes
/// the connection, so the client sees a failure and never a short or wrong 200.
pub fn tail(tail: Tail, sendfile: Option<(Spans, IntCounter)>) -> Body {
    let max = if sendfile.is_some() { MAX_SPAN } else { READ_CHUNK };
    let state = (tail, sendfile, ReadBuffers::default());
    let stream = futures_util::stream::unfold(state, move |(mut tail, sendfile, mut buffers)| async move {
        let chunk = match tail.next_chunk(max).await? {
            Ok(Chunk::Memory(bytes)) => Ok(bytes),
            Ok(Chunk::File(span)) => match &sendfile {
                Some((spans, sent)) => {
                    sent.inc_by(span.len);
                    Ok(spans.defer(span))
                }
                None => span.read(&mut buffers).await,
            },
            Err(e) => Err(e),
        };
        Some((chunk.map(Frame::data), (tail, sendfile, buffers)))
    });
    StreamBody::new(stream).boxed_unsync()
}

/// The code of a 404 for `resource`: a tag list's repository is what is unknown. A registry
/// with the referrers API answers 200 even for an unknown subject, so a 404 for referrers says
/// the registry has no such API: UNSUPPORTED, never NAME_UNKNOWN, which oras-go (soci, notation)
/// reads as "no such repository" and then skips the fallback tag (`sha256-<hex>`).
fn unknown(resource: Resource) -> ErrorCode {
    match resource {
        Resource::Manifest => ErrorCode::ManifestUnknown,
        Resource::Blob => ErrorCode::BlobUnknown,
        Resource::Tags => ErrorCode::NameUnknown,
        Resource::Referrers => ErrorCode::Unsupported,
    }
}

/// The status and OCI code for an error, decided by where it came from.
fn classify(err: &Error) -> (StatusCode, ErrorCode) {
    match err.root() {
        Error::Request(e) => match e {
            RequestError::Name(NameError::Tag(_)) => (StatusCode::BAD_REQUEST, ErrorCode::TagInvalid),
            RequestError::Name(_) => (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid),
            RequestError::Digest(_) => (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid),
            RequestError::Range { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, ErrorCode::RangeInvalid),
            RequestError::Query { .. } => (StatusCode::BAD_REQUEST, ErrorCode::Unsupported),
            RequestError::Method { .. } | RequestError::Unsupported { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, ErrorCode::Unsupported)
            }
            RequestError::NoRoute { .. } => (StatusCode::NOT_FOUND, ErrorCode::NameUnknown),
            RequestError::ManifestUnknown { .. } => (StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown),
            RequestError::UriTooLong { .. } => (StatusCode::URI_TOO_LONG, ErrorCode::NameInvalid),
        },
        Error::Upstream(UpstreamError { kind, .. }) => match kind {
            UpstreamErrorKind::Status { status, resource, .. } => match (*status, resource) {
                (StatusCode::NOT_FOUND, resource) => (StatusCode::NOT_FOUND, unknown(*resource)),
                (StatusCode::UNAUTHORIZED, _) => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
                (StatusCode::FORBIDDEN, _) => (StatusCode::FORBIDDEN, ErrorCode::Denied),
                (StatusCode::TOO_MANY_REQUESTS, _) => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests),
                _ => (StatusCode::BAD_GATEWAY, ErrorCode::Unavailable),
            },
            UpstreamErrorKind::CredentialsRefused { status }
            | UpstreamErrorKind::CredentialsRequired { status, .. } => {
                if *status == StatusCode::FORBIDDEN {
                    (StatusCode::FORBIDDEN, ErrorCode::Denied)
                } else {
                    (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized)
                }
            }
            UpstreamErrorKind::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests),
            UpstreamErrorKind::Forbidden(_) => (StatusCode::FORBIDDEN, ErrorCode::Denied),
            UpstreamErrorKind::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, ErrorCode::Unavailable),
            UpstreamErrorKind::Mismatch(_) => (StatusCode::BAD_GATEWAY, ErrorCode::DigestInvalid),
            UpstreamErrorKind::TooLarge { .. } => (StatusCode::BAD_GATEWAY, ErrorCode::ManifestInvalid),
            UpstreamErrorKind::Offline { resource, .. } => (StatusCode::NOT_FOUND, unknown(*resource)),
            UpstreamErrorKind::Request(_)
            | UpstreamErrorKind::Redirect(_)
            | UpstreamErrorKind::TooManyRedirects(_)
            | UpstreamErrorKind::Token(_)
            | UpstreamErrorKind::Body(_) => (StatusCode::BAD_GATEWAY, ErrorCode::Unavailable),
        },
        Error::Access(e) => match e {
            AccessError::Bypassed { resource, .. } | AccessError::NotInRepository { resource, .. } => {
                (StatusCode::NOT_FOUND, unknown(*resource))
            }
            AccessError::Unauthorized { status, .. } if *status == StatusCode::FORBIDDEN => {
                (StatusCode::FORBIDDEN, ErrorCode::Denied)
            }
            AccessError::Unauthorized { .. } => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
        },
        Error::Peer(PeerError::Forged { .. }) => (StatusCode::BAD_GATEWAY, ErrorCode::DigestInvalid),
        Error::Peer(_) => (StatusCode::BAD_GATEWAY, ErrorCode::Unavailable),
        Error::Store(_) | Error::Internal(_) | Error::Shared(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unknown)
        }
    }
}

/// The answer while the store is not open yet.
pub fn not_ready(head: bool) -> Response<Body> {
    let body = error_body(
        ErrorCode::Unavailable,
        "pullcache is starting: its cache is not open yet",
    );
    Response::builder()
        .status(StatusCode::SERVICE_UNAVAILABLE)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, body.len())
        .body(if head { empty() } else { full(body) })
        .expect("not-ready response parts are valid")
}

/// The OCI error response for `err`. HEAD responses carry the headers without the body.
pub fn error(err: &Error, head: bool) -> Response<Body> {
    let (status, code) = classify(err);
    match err.origin() {
        Origin::Internal => tracing::error!(error = %err, "request failed"),
        Origin::Upstream => tracing::warn!(error = %err, "upstream failed"),
        Origin::Downstream => tracing::debug!(error = %err, "bad request"),
    }
    let body = error_body(code, &err.to_string());
    let mut resp = Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, body.len());
    match err.root() {
        Error::Upstream(UpstreamError {
            kind:
                UpstreamErrorKind::Status {
                    retry_after: Some(retry_after),
                    ..
                },
            ..
        }) => resp = resp.header(RETRY_AFTER, retry_after.as_secs().to_string()),
        Error::Upstream(UpstreamError {
            kind: UpstreamErrorKind::RateLimited(seconds),
            ..
        }) => resp = resp.header(RETRY_AFTER, seconds.to_string()),
        Error::Request(RequestError::Range { size, .. }) => {
            resp = resp.header(CONTENT_RANGE, format!("bytes */{size}"));
        }
        // The registry's own challenge, so the client fetches a token from the real realm.
        Error::Access(AccessError::Unauthorized {
            challenge: Some(challenge),
            ..
        })
        | Error::Upstream(UpstreamError {
            kind:
                UpstreamErrorKind::CredentialsRequired {
                    challenge: Some(challenge),
                    ..
                },
            ..
        }) => resp = resp.header(WWW_AUTHENTICATE, challenge.clone()),
        Error::Request(RequestError::Method { .. }) => {
            resp = resp.header(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        _ => {}
    }
    resp.body(if head { empty() } else { full(body) })
        .expect("error response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Registry;

    fn upstream(status: StatusCode, resource: Resource) -> Error {
        Error::Upstream(UpstreamError {
            registry: Registry::docker_hub(),
            kind: UpstreamErrorKind::Status {
                status,
                resource,
                retry_after: Some(std::time::Duration::from_secs(7)),
            },
        })
    }

    #[test]
    fn statuses_follow_origin() {
        assert_eq!(
            classify(&upstream(StatusCode::NOT_FOUND, Resource::Blob)),
            (StatusCode::NOT_FOUND, ErrorCode::BlobUnknown)
        );
        assert_eq!(
            classify(&upstream(StatusCode::SERVICE_UNAVAILABLE, Resource::Manifest)),
            (StatusCode::BAD_GATEWAY, ErrorCode::Unavailable)
        );
        let shared = Error::Shared(std::sync::Arc::new(upstream(StatusCode::NOT_FOUND, Resource::Manifest)));
        assert_eq!(classify(&shared), (StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown));
        assert_eq!(
            classify(&crate::error::InternalError::FlightLost.into()),
            (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unknown)
        );
    }

    #[test]
    fn rate_limits_keep_retry_after() {
        let resp = error(&upstream(StatusCode::TOO_MANY_REQUESTS, Resource::Manifest), false);
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[RETRY_AFTER], "7");
    }

    /// An offline miss is an expected answer: a 404, logged at debug, not an upstream
    /// failure at warn.
    #[test]
    fn offline_misses_are_not_upstream_failures() {
        let offline = Error::Upstream(UpstreamError {
            registry: Registry::docker_hub(),
            kind: UpstreamErrorKind::Offline {
                resource: Resource::Blob,
                reference: "docker.io/library/x@sha256:00".into(),
            },
        });
        assert_eq!(offline.origin(), Origin::Downstream);
        assert_eq!(classify(&offline), (StatusCode::NOT_FOUND, ErrorCode::BlobUnknown));

        let logs = LogBuffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_writer(logs.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(error(&offline, false).status(), StatusCode::NOT_FOUND);
            error(&upstream(StatusCode::BAD_GATEWAY, Resource::Blob), false);
        });
        let logs = logs.text();
        assert!(
            !logs.contains("offline cache"),
            "an offline miss logged at info or above: {logs}"
        );
        assert!(logs.contains("WARN") && logs.contains("upstream failed"), "{logs}");
    }

    /// Log lines written by a test's subscriber.
    #[derive(Clone, Default)]
    struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl LogBuffer {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    impl io::Write for LogBuffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
        type Writer = LogBuffer;

        fn make_writer(&'a self) -> LogBuffer {
            self.clone()
        }
    }
}
