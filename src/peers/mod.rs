//! Cluster mode: the nodes' caches as one. Each digest has an owner among the ready peers
//! ([`ring`]), found through [`membership`]. A node that misses a blob or a manifest by digest
//! asks the peers in rank order (the owner first) before the upstream; the owner fetches
//! upstream once, through its own flight, and streams to every node that asks while it
//! downloads. A request from a peer is never passed on to another owner, so nodes whose views
//! disagree cannot loop. Peers authenticate each other with mutual TLS from the cluster CA
//! ([`tls`]). A peer that fails is skipped for a while, and a node with no peer left is a
//! single node again.

pub mod membership;
pub mod ring;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::header::LOCATION;
use http::{Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::dns::GaiResolver;
use prometheus::{IntCounter, IntCounterVec, Opts};
use tokio::sync::watch;

use crate::fetch::Fetch;
use crate::oci::{Digest, Visibility};
use crate::sync::MutexExt;
use crate::wire::{BoxError, ClientOptions};
use membership::View;

/// A peer: the address of its peer port.
pub type PeerAddr = SocketAddr;

/// The header a peer request names its sender in (its peer address), so an owner knows who
/// receives a blob from it.
pub const PEER_HEADER: &str = "pullcache-peer";
/// Connecting to a peer gives up after this long: a dead owner must not hold a pull.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// A peer's response headers must come within this long. It may be waiting for its upstream's,
/// but a hung peer must not hold a pull for long: the next source takes over.
const PEER_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer that could not be reached is skipped for this long.
const BREAKER_OPEN: Duration = Duration::from_secs(30);
/// A peer that served bytes which failed their digest is skipped for this long.
const BREAKER_OPEN_FORGED: Duration = Duration::from_secs(300);
/// Hops of hot-blob redirects a request follows; the peer at the last hop serves it whatever
/// its load, so a redirect never sends a node upstream.
pub const MAX_PEER_HOPS: u32 = 8;
/// The header saying how many redirects a peer request has followed.
pub const HOPS_HEADER: &str = "pullcache-redirects";
/// The header in which a peer says who may read what it serves at the location it was asked
/// under ([`Visibility`], see [`crate::oci::Provenance`]); without it, only a client did.
pub const VISIBILITY_HEADER: &str = "pullcache-visibility";
/// The header in which a node says what its client was cleared for at the location it asks
/// under ([`crate::oci::Clearance`]); without it, the owner serves only public content.
pub const CLEARANCE_HEADER: &str = "pullcache-clearance";

/// Cluster mode's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's peer port, on its node address.
    pub listen: SocketAddr,
    /// `--peer` targets: addresses or names with a port.
    pub targets: Vec<String>,
    /// The cluster CA (`ca.crt`, `ca.key`).
    pub ca_dir: std::path::PathBuf,
    /// Concurrent uploads of one blob to peers; more askers are sent to peers that have it.
    pub max_uploads: usize,
    /// How often the targets are resolved again.
    pub refresh: Duration,
}

/// Why a peer could not serve.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No connection, no headers in time, or a broken body: ask the next peer.
    #[error("peer {peer} unavailable")]
    Unavailable {
        peer: PeerAddr,
        #[source]
        source: BoxError,
    },
    /// The peer answered, but not with the content (its upstream refused, say): asking other
    /// peers would only repeat that, so the node asks its upstream itself.
    #[error("peer {peer} answered {status}")]
    Answered { peer: PeerAddr, status: StatusCode },
    /// The peer's bytes failed their digest. Nothing was stored; the peer is skipped.
    #[error("bytes from peer {peer} failed their digest; nothing stored")]
    Forged { peer: PeerAddr },
}

/// The peers, their health and the client to reach them.
pub struct Peers {
    me: PeerAddr,
    view: watch::Receiver<View>,
    /// Peers skipped until the instant.
    open: Mutex<HashMap<PeerAddr, Instant>>,
    client: crate::wire::Client,
    max_uploads: usize,
    metrics: Metrics,
}

impl Peers {
    pub fn new(settings: &Settings, identity: &tls::Identity, metrics: Metrics) -> Peers {
        let view = membership::discover(
            settings.listen,
            settings.targets.clone(),
            settings.refresh,
            metrics.discovery.clone(),
        );
        Peers::with_view(settings.listen, view, identity, settings.max_uploads, metrics)
    }

    pub(crate) fn with_view(
        me: PeerAddr,
        view: watch::Receiver<View>,
        identity: &tls::Identity,
        max_uploads: usize,
        metrics: Metrics,
    ) -> Peers {
        let options = ClientOptions {
            tls: identity.client_config(),
            connect_timeout: PEER_CONNECT_TIMEOUT,
            plain_http: false,
            http2: false,
        };
        Peers {
            me,
            view,
            open: Mutex::default(),
            client: crate::wire::client(GaiResolver::new(), options),
            max_uploads,
            metrics,
        }
    }

    pub fn me(&self) -> PeerAddr {
        self.me
    }

    /// The peers a client's miss of `digest` goes to, in order: those ranked above this node,
    /// the owner first, less the ones being skipped. Empty when this node owns the digest.
    pub fn route(&self, digest: &Digest) -> Vec<PeerAddr> {
        let view = self.view.borrow().clone();
        let open = self.open.locked();
        let now = Instant::now();
        ring::rank(view.iter(), digest)
            .into_iter()
            .take_while(|peer| *peer != self.me)
            .filter(|peer| open.get(peer).is_none_or(|until| *until <= now))
            .collect()
    }

    /// Whether `peer` is a member of the current view.
    pub fn knows(&self, peer: &PeerAddr) -> bool {
        self.view.borrow().contains(peer)
    }

    /// Skips `peer` for a while: it could not be reached, or (`forged`) served wrong bytes.
    pub fn trip(&self, peer: PeerAddr, forged: bool) {
        let wait = if forged { BREAKER_OPEN_FORGED } else { BREAKER_OPEN };
        tracing::warn!(%peer, skipped_for = ?wait, forged, "peer failed; skipping it");
        self.open.locked().insert(peer, Instant::now() + wait);
        if forged {
            self.metrics.forged.inc();
        }
    }

    /// Sends `fetch` (of content by digest, under its location, never with its credential) to
    /// `peer`, following a busy owner's redirects to peers that have it. The response is 200 or
    /// 206, with the [`Visibility`] the peer told.
    pub async fn fetch(&self, peer: PeerAddr, fetch: &Fetch) -> Result<(PeerAddr, Response<Incoming>), PeerError> {
        let mut at = peer;
        for hops in 0..=MAX_PEER_HOPS {
            let resp = self.send(at, fetch, hops).await?;
            let status = resp.status();
            if status == StatusCode::TEMPORARY_REDIRECT
                && let Some(next) = redirect_target(&resp)
                && next != self.me
                && self.knows(&next)
            {
                self.metrics.fetches.with_label_values(&["redirected"]).inc();
                at = next;
                continue;
            }
            if status == StatusCode::OK || status == StatusCode::PARTIAL_CONTENT {
                self.metrics.fetches.with_label_values(&["ok"]).inc();
                let mut resp = resp;
                let visibility = resp
                    .headers()
                    .get(VISIBILITY_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(Visibility::parse)
                    .unwrap_or(Visibility::Client);
                resp.extensions_mut().insert(visibility);
                return Ok((at, resp));
            }
            self.metrics.fetches.with_label_values(&["refused"]).inc();
            return Err(PeerError::Answered { peer: at, status });
        }
        Err(PeerError::Answered {
            peer: at,
            status: StatusCode::LOOP_DETECTED,
        })
    }

    async fn send(&self, peer: PeerAddr, fetch: &Fetch, hops: u32) -> Result<Response<Incoming>, PeerError> {
        let unavailable = |source: BoxError| {
            self.metrics.fetches.with_label_values(&["unavailable"]).inc();
            PeerError::Unavailable { peer, source }
        };
        let uri: Uri = format!("https://{peer}{}?ns={}", fetch.path(), fetch.registry)
            .parse()
            .map_err(|e: http::uri::InvalidUri| unavailable(e.into()))?;
        let mut request = fetch
            .builder(uri)
            .header(PEER_HEADER, self.me.to_string())
            .header(HOPS_HEADER, hops);
        if let Some(clearance) = fetch.clearance {
            request = request.header(CLEARANCE_HEADER, clearance.as_str());
        }
        let request = request.body(Full::default()).expect("peer request parts are valid");
        crate::wire::send(&self.client, request, PEER_HEADER_TIMEOUT)
            .await
            .map_err(|e| unavailable(e.into()))
    }

    /// Concurrent uploads of one blob this node makes to peers.
    pub fn max_uploads(&self) -> usize {
        self.max_uploads
    }

    /// Counts a peer request this node answered: `served`, `streamed`, `redirected` or `failed`.
    pub fn count_request(&self, result: &'static str) {
        self.metrics.requests.with_label_values(&[result]).inc();
    }

    /// The counter of body bytes received from peers.
    pub fn bytes_in(&self) -> IntCounter {
        self.metrics.bytes.with_label_values(&["in"])
    }

    /// The counter of body bytes sent to peers.
    pub fn bytes_out(&self) -> IntCounter {
        self.metrics.bytes.with_label_values(&["out"])
    }

    /// Counts a miss that went upstream after the peers could not serve it.
    pub fn count_fallback(&self) {
        self.metrics.fallbacks.inc();
    }
}

/// The peer a busy owner sends an asker to.
fn redirect_target(resp: &Response<Incoming>) -> Option<PeerAddr> {
    let location: Uri = resp.headers().get(LOCATION)?.to_str().ok()?.parse().ok()?;
    location.authority()?.as_str().parse().ok()
}

/// Cluster mode's counters.
pub struct Metrics {
    /// Peer requests this node answered, by result: served, streamed, redirected, failed.
    requests: IntCounterVec,
    /// Peer requests this node made, by result: ok, redirected, unavailable, refused.
    fetches: IntCounterVec,
    /// Body bytes, by direction: `in` from peers, `out` to peers.
    bytes: IntCounterVec,
    /// Misses that went upstream after the peers could not serve.
    fallbacks: IntCounter,
    /// Peers skipped for serving bytes that failed their digest.
    forged: IntCounter,
    /// The view and the lookups behind it.
    discovery: membership::Metrics,
}

impl Metrics {
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Metrics> {
        let requests = IntCounterVec::new(
            Opts::new(
                "pullcache_peer_requests_total",
                "Peer requests this node answered, by result: served (from its store), streamed (while it downloads), redirected (sent on to a peer receiving the blob) or failed.",
            ),
            &["result"],
        )?;
        let fetches = IntCounterVec::new(
            Opts::new(
                "pullcache_peer_fetches_total",
                "Requests this node made to peers, by result: ok, redirected (to another peer), unavailable (no connection or answer in time) or refused (answered without the content).",
            ),
            &["result"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "pullcache_peer_bytes_total",
                "Body bytes between this node and its peers, by direction: in (received) or out (sent).",
            ),
            &["direction"],
        )?;
        let fallbacks = IntCounter::new(
            "pullcache_peer_fallbacks_total",
            "Misses fetched from upstream because no peer could serve them.",
        )?;
        let forged = IntCounter::new(
            "pullcache_peer_forged_total",
            "Peer transfers whose bytes failed their digest; the peer was skipped and nothing stored.",
        )?;
        // Every series exists from the start, at 0, also on a node outside cluster mode.
        for result in ["served", "streamed", "redirected", "failed"] {
            requests.with_label_values(&[result]);
        }
        for result in ["ok", "redirected", "unavailable", "refused"] {
            fetches.with_label_values(&[result]);
        }
        for direction in ["in", "out"] {
            bytes.with_label_values(&[direction]);
        }
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(fetches.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(fallbacks.clone()))?;
        registry.register(Box::new(forged.clone()))?;
        Ok(Metrics {
            requests,
            fetches,
            bytes,
            fallbacks,
            forged,
            discovery: membership::Metrics::register(registry)?,
        })
    }
}
