//! Where a flight's bytes come from. For a client's miss in cluster mode: the peers in rank
//! order (the owner first), then the upstream; for everything else, the upstream. A peer that
//! cannot be reached, or breaks off mid-body, is skipped for a while and the next source
//! resumes with `Range`; a peer that answers without the content sends the flight upstream.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use http::Response;
use hyper::body::Incoming;

use super::{BODY_IDLE_TIMEOUT, PEER_BODY_IDLE_TIMEOUT};
use crate::oci::{Digest, Registry};
use crate::peers::{Asker, PeerAddr, PeerError, Peers, Want};
use crate::upstream::Upstreams;

/// What the current body comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Current {
    Nothing,
    Peer(PeerAddr),
    Upstream,
}

pub(super) struct Sources {
    peers: Option<Arc<Peers>>,
    /// Peers still to try, best first.
    route: VecDeque<PeerAddr>,
    /// Whether any peer was to be asked at all: going upstream then is a fallback.
    had_route: bool,
    current: Current,
    /// Peers that sent bytes of this blob.
    used: Vec<PeerAddr>,
    /// Bytes received when the current source began.
    segment_start: u64,
}

impl Sources {
    pub(super) fn new(peers: Option<Arc<Peers>>, asker: Asker, digest: &Digest) -> Sources {
        let route: VecDeque<PeerAddr> = match (&peers, asker) {
            (Some(peers), Asker::Client) => peers.route(digest).into(),
            _ => VecDeque::new(),
        };
        Sources {
            had_route: !route.is_empty(),
            peers,
            route,
            current: Current::Nothing,
            used: Vec::new(),
            segment_start: 0,
        }
    }

    /// The first peer in the route that answers with the content; `None` sends the flight
    /// upstream.
    pub(super) async fn ask_peers(&mut self, want: &Want<'_>) -> Option<Response<Incoming>> {
        let peers = self.peers.clone()?;
        while let Some(peer) = self.route.pop_front() {
            match peers.fetch(peer, want).await {
                Ok((served_by, resp)) => {
                    self.begin(Current::Peer(served_by), want.from);
                    return Some(resp);
                }
                Err(PeerError::Unavailable { .. }) => peers.trip(peer, false),
                Err(e) => {
                    tracing::debug!(error = %e, "peer did not serve; asking the upstream");
                    self.route.clear();
                }
            }
        }
        if self.had_route && self.current != Current::Upstream {
            peers.metrics.fallbacks.inc();
        }
        self.begin(Current::Upstream, want.from);
        None
    }

    fn begin(&mut self, current: Current, from: Option<u64>) {
        self.current = current;
        self.segment_start = from.unwrap_or(0);
        if let Current::Peer(peer) = current
            && !self.used.contains(&peer)
        {
            self.used.push(peer);
        }
    }

    /// The peer the current body comes from.
    pub(super) fn peer(&self) -> Option<PeerAddr> {
        match self.current {
            Current::Peer(peer) => Some(peer),
            _ => None,
        }
    }

    /// How long the current body may send nothing.
    pub(super) fn idle_timeout(&self) -> Duration {
        match self.current {
            Current::Peer(_) => PEER_BODY_IDLE_TIMEOUT,
            _ => BODY_IDLE_TIMEOUT,
        }
    }

    /// The current body broke at `received` bytes. A peer that broke it is skipped; returns
    /// whether it was a peer (whose place the next source takes without a retry counted).
    pub(super) fn broke(&mut self, received: u64, upstreams: &Upstreams, registry: &Registry) -> bool {
        self.account(received, upstreams, registry);
        match (self.current, &self.peers) {
            (Current::Peer(peer), Some(peers)) => {
                peers.trip(peer, false);
                true
            }
            _ => false,
        }
    }

    /// Counts the bytes of the current source, up to `received`.
    pub(super) fn account(&mut self, received: u64, upstreams: &Upstreams, registry: &Registry) {
        let bytes = received.saturating_sub(self.segment_start);
        self.segment_start = received;
        match (self.current, &self.peers) {
            (Current::Peer(_), Some(peers)) => peers.metrics.bytes.with_label_values(&["in"]).inc_by(bytes),
            _ => upstreams.count_bytes(registry, bytes),
        }
    }

    /// The blob failed its digest: if peers sent any of it, they are skipped for long and this
    /// is their failure.
    pub(super) fn blame_peers(&self) -> Option<PeerError> {
        let peers = self.peers.as_ref()?;
        let first = *self.used.first()?;
        for peer in &self.used {
            peers.trip(*peer, true);
        }
        Some(PeerError::Forged { peer: first })
    }
}
