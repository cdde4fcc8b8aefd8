//! The peer port (cluster mode): mutual TLS, and only content addressed by digest: blobs and
//! manifests by digest; no tags, no listings. A peer's request is answered from the store, the
//! local flight or the upstream, never by asking another peer. An owner already uploading a
//! blob to `--peer-max-uploads` peers sends the next asker to a peer that has it or is
//! receiving it, which streams it on as it receives: a rollout forms a tree, not a star.

mod uploads;

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{CONTENT_TYPE, LOCATION};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;

use super::response::{self, Body};
use super::routes::{self, Route};
use super::{AppSlot, ConnectionLimits};
use crate::fetch::{Asker, CacheResult};
use crate::listener::{Port, Role};
use crate::oci::{Reference, error_body};
use crate::peers::{HOPS_HEADER, MAX_PEER_HOPS, PEER_HEADER, PeerAddr, Peers};
use uploads::Uploads;

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
    let uploads = Arc::new(Uploads::default());
    Port::new(Role::Peer, limits)
        .serve(listener, shutdown, move |stream, conn| {
            let (acceptor, app, peers, uploads) = (acceptor.clone(), app.clone(), peers.clone(), uploads.clone());
            async move {
                // Without a certificate from the cluster CA, the handshake fails: nothing is read.
                let Some(tls) = conn.handshake(acceptor.accept(stream)).await else {
                    return;
                };
                let service = service_fn(move |req| {
                    let (app, peers, uploads) = (app.clone(), peers.clone(), uploads.clone());
                    async move { Ok::<_, Infallible>(peer_request(req, &app, &peers, &uploads).await) }
                });
                conn.serve(tls, service).await;
            }
        })
        .await;
}

async fn peer_request(req: Request<Incoming>, app: &AppSlot, peers: &Peers, uploads: &Arc<Uploads>) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    let Some(app) = app.get() else {
        return response::not_ready(head);
    };
    // The node asking, by its peer address: the one that receives the blob.
    let receiver: Option<PeerAddr> = req
        .headers()
        .get(PEER_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let route = routes::parse(req.method(), req.uri(), None, &app.default_registry);
    let digest = match &route {
        Ok(Route::Blob { digest, .. }) => Some(digest.clone()),
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
    if let (Some(digest), Some(receiver)) = (&digest, receiver)
        && app.flights.fed_by(digest) == Some(receiver)
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
    let upload = match (&digest, receiver) {
        (Some(digest), Some(receiver)) if !head => match uploads.admit(digest, receiver, max_uploads) {
            Ok(upload) => Some(upload),
            Err(elsewhere) => {
                peers.count_request("redirected");
                return redirect(elsewhere, &req);
            }
        },
        _ => None,
    };
    let super::Outcome { response: resp, cache } = app.serve_route(req, route, None, None, Asker::Peer).await;
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
