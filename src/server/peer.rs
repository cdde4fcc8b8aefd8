//! The peer port (cluster mode): mutual TLS, and only content addressed by digest: blobs and
//! manifests by digest; no tags, no listings. A peer's request is answered from the store, the
//! local flight or the upstream, never by asking another peer. An owner already uploading a
//! blob to `--peer-max-uploads` peers sends the next asker to a peer that has it or is
//! receiving it, which streams it on as it receives: a rollout forms a tree, not a star.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::header::{CONTENT_TYPE, LOCATION};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::response::{self, Body};
use super::routes::{self, Route};
use super::{AppSlot, ConnectionLimits, builder};
use crate::fetch::{Asker, CacheResult};
use crate::oci::{Digest, Reference, error_body};
use crate::peers::{HOPS_HEADER, MAX_PEER_HOPS, PEER_HEADER, PeerAddr, Peers};
use crate::sync::MutexExt;

/// Who is receiving each blob from this node, and who has received it.
#[derive(Default)]
struct Uploads {
    by_digest: Mutex<HashMap<Digest, Receivers>>,
}

#[derive(Default)]
struct Receivers {
    /// Uploads running now.
    active: usize,
    /// Every peer that is receiving or has received it, oldest first.
    peers: Vec<PeerAddr>,
    /// Where the next redirect goes, round robin.
    next: usize,
}

/// Peers remembered per blob for redirects.
const MAX_REMEMBERED_RECEIVERS: usize = 64;
/// Blobs remembered; past it the oldest entries without uploads are forgotten.
const MAX_REMEMBERED_BLOBS: usize = 4096;

/// An upload in progress; dropping it (when the body ends) frees its place.
struct Upload {
    uploads: Arc<Uploads>,
    digest: Digest,
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(receivers) = self.uploads.by_digest.locked().get_mut(&self.digest) {
            receivers.active = receivers.active.saturating_sub(1);
        }
    }
}

impl Uploads {
    /// Either a place for `asker` among this blob's uploads, or the peer to send it to.
    fn admit(self: &Arc<Self>, digest: &Digest, asker: PeerAddr, max: usize) -> Result<Upload, PeerAddr> {
        let mut map = self.by_digest.locked();
        if map.len() >= MAX_REMEMBERED_BLOBS && !map.contains_key(digest) {
            map.retain(|_, r| r.active > 0);
        }
        let receivers = map.entry(digest.clone()).or_default();
        if receivers.active >= max {
            let others: Vec<PeerAddr> = receivers.peers.iter().copied().filter(|p| *p != asker).collect();
            if !others.is_empty() {
                receivers.next = receivers.next.wrapping_add(1);
                let target = others[receivers.next % others.len()];
                receivers.peers.retain(|p| *p != asker);
                receivers.peers.push(asker);
                return Err(target);
            }
        }
        receivers.active += 1;
        if !receivers.peers.contains(&asker) {
            if receivers.peers.len() == MAX_REMEMBERED_RECEIVERS {
                receivers.peers.remove(0);
            }
            receivers.peers.push(asker);
        }
        Ok(Upload {
            uploads: self.clone(),
            digest: digest.clone(),
        })
    }
}

/// Serves the peer port on `listener` until `shutdown`, with TLS `tls` (client certificates
/// required).
pub async fn serve(
    listener: TcpListener,
    app: Arc<AppSlot>,
    peers: Arc<Peers>,
    tls: Arc<rustls::ServerConfig>,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let uploads = Arc::new(Uploads::default());
    tokio::pin!(shutdown);
    loop {
        let (stream, from) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "peer accept failed; backing off");
                    tokio::time::sleep(super::ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, app, peers, uploads) = (acceptor.clone(), app.clone(), peers.clone(), uploads.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // Without a certificate from the cluster CA, the handshake fails: nothing is read.
            let tls = match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::warn!(%from, error = %e, "peer TLS handshake failed"),
                Err(_) => return tracing::debug!(%from, "peer TLS handshake timed out"),
            };
            let service = service_fn(move |req| {
                let (app, peers, uploads) = (app.clone(), peers.clone(), uploads.clone());
                async move { Ok::<_, Infallible>(answer(req, &app, &peers, &uploads).await) }
            });
            let conn = watcher.watch(
                builder(limits)
                    .serve_connection(TokioIo::new(tls), service)
                    .into_owned(),
            );
            if let Err(e) = conn.await {
                tracing::debug!(%from, error = %e, "peer connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(super::SHUTDOWN_GRACE) => {}
    }
}

async fn answer(req: Request<Incoming>, app: &AppSlot, peers: &Peers, uploads: &Arc<Uploads>) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    let Some(app) = app.get() else {
        return response::not_ready(head);
    };
    let asker: Option<PeerAddr> = req
        .headers()
        .get(PEER_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let digest = match routes::parse(req.method(), req.uri(), None) {
        Ok(Route::Blob { digest, .. }) => Some(digest),
        Ok(Route::Manifest {
            reference: Reference::Digest(_),
            ..
        }) => None,
        _ => {
            return refuse(
                StatusCode::NOT_FOUND,
                "the peer port serves blobs and manifests by digest only",
            );
        }
    };
    // Views that disagree could make two nodes each wait for the other's download.
    if let (Some(digest), Some(asker)) = (&digest, asker)
        && app.flights.fed_by(digest) == Some(asker)
    {
        peers.count_request("failed");
        return refuse(
            StatusCode::LOOP_DETECTED,
            "this node is receiving that blob from the asker",
        );
    }
    let hops: u32 = req
        .headers()
        .get(HOPS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // At the last hop the asker is served, busy or not.
    let max_uploads = if hops >= MAX_PEER_HOPS {
        usize::MAX
    } else {
        peers.max_uploads()
    };
    let upload = match (&digest, asker) {
        (Some(digest), Some(asker)) if !head => match uploads.admit(digest, asker, max_uploads) {
            Ok(upload) => Some(upload),
            Err(elsewhere) => {
                peers.count_request("redirected");
                return redirect(elsewhere, &req);
            }
        },
        _ => None,
    };
    let (resp, cache) = app.answer(req, None, None, Asker::Peer).await;
    let result = match (resp.status().is_success(), cache) {
        (false, _) => "failed",
        (true, Some(CacheResult::Hit)) => "served",
        (true, _) => "streamed",
    };
    peers.count_request(result);
    let bytes_out = peers.bytes_out();
    resp.map(|body| {
        body.map_frame(move |frame| {
            let _held = &upload;
            if let Some(data) = frame.data_ref() {
                bytes_out.inc_by(data.len() as u64);
            }
            frame
        })
        .boxed_unsync()
    })
}

/// Sends an asker on to `peer`, which has the blob or is receiving it.
fn redirect(peer: PeerAddr, req: &Request<Incoming>) -> Response<Body> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    Response::builder()
        .status(StatusCode::TEMPORARY_REDIRECT)
        .header(LOCATION, format!("https://{peer}{path}"))
        .body(response::empty())
        .expect("redirect parts are valid")
}

fn refuse(status: StatusCode, message: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(response::full(error_body(crate::oci::ErrorCode::Unsupported, message)))
        .expect("refusal parts are valid")
}
