//! Where bytes come from: the one chain of sources every fetch goes through, blobs and
//! manifests, `GET` and `HEAD` alike. For a client's request by digest in cluster mode the
//! chain is the peers in rank order (the digest's owner first), then the upstream; otherwise
//! it is the upstream alone.
//!
//! The chain owns everything about moving between sources, so no caller does:
//! - a peer that cannot be reached is skipped for a while and the next one is asked; a peer
//!   that answers without the content sends the fetch upstream;
//! - a body that breaks mid-way is resumed with `Range` from the next source (a peer that
//!   broke it is skipped for a while), so the caller reads one body;
//! - each source's bytes are counted where they came from (peer or registry);
//! - bytes that fail their digest are blamed on the peers that sent them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header::CONTENT_RANGE;
use http::response::Parts;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus::IntCounter;

use crate::error::{Error, Result};
use crate::fetch::{Asker, Fetch};
use crate::oci::Digest;
use crate::peers::{PeerAddr, PeerError, Peers};
use crate::upstream::{UpstreamError, UpstreamErrorKind, Upstreams};
use crate::wire::content_length;

/// A registry body that sends nothing for this long has failed.
const UPSTREAM_BODY_IDLE: Duration = Duration::from_secs(60);
/// A peer's body, sooner: the next source may have the bytes.
const PEER_BODY_IDLE: Duration = Duration::from_secs(10);
/// Times a registry's body may break and be resumed before the fetch fails. A peer that
/// breaks off is no retry: the next source takes its place.
const MAX_RESUMES: u32 = 3;

/// The sources of this node: its peers (cluster mode) and its upstream registries.
pub struct Sources {
    upstreams: Arc<Upstreams>,
    peers: Option<Arc<Peers>>,
}

impl Sources {
    pub fn new(upstreams: Arc<Upstreams>, peers: Option<Arc<Peers>>) -> Sources {
        Sources { upstreams, peers }
    }

    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.upstreams
    }

    /// Whether this node is in cluster mode.
    pub fn clustered(&self) -> bool {
        self.peers.is_some()
    }

    /// The peers a fetch of `digest` for `asker` asks before the upstream, best first: none
    /// for a peer (never passed on) or for a digest this node owns.
    fn route(&self, digest: Option<&Digest>, asker: Asker) -> VecDeque<PeerAddr> {
        match (&self.peers, digest, asker) {
            (Some(peers), Some(digest), Asker::Client) => peers.route(digest).into(),
            _ => VecDeque::new(),
        }
    }

    /// Whether a fetch of `digest` for `asker` would ask any peer.
    pub fn asks_peers(&self, digest: &Digest, asker: Asker) -> bool {
        !self.route(Some(digest), asker).is_empty()
    }

    /// The chain of sources for `fetch`, made for `asker`.
    pub fn chain(&self, fetch: Fetch, asker: Asker) -> Chain {
        let route = self.route(fetch.digest(), asker);
        Chain {
            had_route: !route.is_empty(),
            route,
            fetch,
            upstreams: self.upstreams.clone(),
            peers: self.peers.clone(),
            current: Source::Nothing,
            used: Vec::new(),
        }
    }
}

/// What the current response comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Nothing,
    Peer(PeerAddr),
    Upstream,
}

/// One fetch's way through the sources.
pub struct Chain {
    fetch: Fetch,
    upstreams: Arc<Upstreams>,
    peers: Option<Arc<Peers>>,
    /// Peers still to try, best first.
    route: VecDeque<PeerAddr>,
    /// Whether any peer was to be asked at all: going upstream then is a fallback.
    had_route: bool,
    current: Source,
    /// Peers that sent bytes of this fetch.
    used: Vec<PeerAddr>,
}

impl Chain {
    /// The response of the first source that serves the fetch, as a body that resumes
    /// itself across sources.
    pub async fn open(&mut self) -> Result<Stream<'_>> {
        let (head, body) = self.connect(None).await?.into_parts();
        Ok(Stream {
            size: content_length(&head.headers),
            counter: self.counter(),
            chain: self,
            head,
            body,
            received: 0,
            skip: 0,
            resumes: 0,
        })
    }

    /// The current source did not serve what was asked for after all (its bytes did not
    /// verify: `forged`, or could not be used). A peer is skipped, and the next `open` goes
    /// on to the next source; returns whether there is one (the upstream is the last).
    pub fn reject(&mut self, forged: bool) -> bool {
        match (self.current, &self.peers) {
            (Source::Peer(peer), Some(peers)) => {
                peers.trip(peer, forged);
                true
            }
            _ => false,
        }
    }

    /// The fetched bytes failed their digest. If peers sent any of them, they are skipped for
    /// long and this is their failure (not the digest's upstream's); `None` when every byte
    /// came from the upstream.
    pub fn blame_peers(&self) -> Option<PeerError> {
        let peers = self.peers.as_ref()?;
        let first = *self.used.first()?;
        for peer in &self.used {
            peers.trip(*peer, true);
        }
        Some(PeerError::Forged { peer: first })
    }

    /// The response to the fetch from offset `from`: from the next peer in the route that
    /// serves it, else from the upstream.
    async fn connect(&mut self, from: Option<u64>) -> Result<Response<Incoming>> {
        let fetch = self.fetch.from_offset(from);
        if let Some(peers) = self.peers.clone() {
            while let Some(peer) = self.route.pop_front() {
                match peers.fetch(peer, &fetch).await {
                    Ok((served_by, resp)) => {
                        self.begin(Source::Peer(served_by));
                        return Ok(resp);
                    }
                    Err(PeerError::Unavailable { .. }) => peers.trip(peer, false),
                    Err(e) => {
                        tracing::debug!(error = %e, "peer did not serve; asking the upstream");
                        self.route.clear();
                    }
                }
            }
            if self.had_route && self.current != Source::Upstream {
                peers.count_fallback();
            }
        }
        self.begin(Source::Upstream);
        Ok(self.upstreams.fetch(&fetch).await?)
    }

    fn begin(&mut self, source: Source) {
        self.current = source;
        if let Source::Peer(peer) = source
            && !self.used.contains(&peer)
        {
            self.used.push(peer);
        }
    }

    /// The peer the current body comes from.
    fn peer(&self) -> Option<PeerAddr> {
        match self.current {
            Source::Peer(peer) => Some(peer),
            _ => None,
        }
    }

    /// Where the current source's bytes are counted.
    fn counter(&self) -> IntCounter {
        match (self.current, &self.peers) {
            (Source::Peer(_), Some(peers)) => peers.bytes_in(),
            _ => self.upstreams.bytes_counter(&self.fetch.registry),
        }
    }

    /// How long the current body may send nothing.
    fn idle_timeout(&self) -> Duration {
        match self.current {
            Source::Peer(_) => PEER_BODY_IDLE,
            _ => UPSTREAM_BODY_IDLE,
        }
    }

    fn error(&self, kind: UpstreamErrorKind) -> Error {
        UpstreamError::new(&self.fetch.registry, kind).into()
    }
}

/// Why a body broke off.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("no data for {0:?}")]
    Idle(Duration),
    #[error("body ended at {0} bytes")]
    Short(u64),
    #[error("reading the body")]
    Read(#[source] hyper::Error),
    #[error("resume answered Content-Range {answered:?}, wanted bytes {from}-")]
    Resume { from: u64, answered: String },
    #[error("{last} (after {resumes} resumes)")]
    Resumes {
        resumes: u32,
        #[source]
        last: Box<BodyError>,
    },
}

/// The body of a fetch, read across sources: when the current one breaks off, the next
/// resumes where it broke.
pub struct Stream<'a> {
    chain: &'a mut Chain,
    /// The first response's status and headers.
    pub head: Parts,
    body: Incoming,
    /// The whole body's size, when the first response said it.
    size: Option<u64>,
    received: u64,
    /// Bytes to drop from the front of the body: a resume answered 200 from the start.
    skip: u64,
    resumes: u32,
    counter: IntCounter,
}

impl Stream<'_> {
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// The peer the bytes now come from, if any.
    pub fn peer(&self) -> Option<PeerAddr> {
        self.chain.peer()
    }

    /// The next bytes of the body, `None` at its end.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        loop {
            let broken = match tokio::time::timeout(self.chain.idle_timeout(), self.body.frame()).await {
                Err(_) => BodyError::Idle(self.chain.idle_timeout()),
                Ok(None) if self.size.is_some_and(|size| self.received < size) => BodyError::Short(self.received),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => BodyError::Read(e),
                Ok(Some(Ok(frame))) => match self.take(frame) {
                    Some(data) => return Ok(Some(data)),
                    None => continue,
                },
            };
            self.resume(broken).await?;
        }
    }

    /// The whole body, refused past `limit` bytes.
    pub async fn collect(mut self, limit: u64) -> Result<Bytes> {
        let mut bytes = Vec::new();
        while let Some(data) = self.next().await? {
            if (bytes.len() + data.len()) as u64 > limit {
                return Err(self.chain.error(UpstreamErrorKind::TooLarge { limit }));
            }
            bytes.extend_from_slice(&data);
        }
        Ok(bytes.into())
    }

    /// A frame's data past what is to be skipped, counted where it came from.
    fn take(&mut self, frame: hyper::body::Frame<Bytes>) -> Option<Bytes> {
        let mut data = frame.into_data().ok()?;
        let skipped = self.skip.min(data.len() as u64);
        data.advance(skipped as usize);
        self.skip -= skipped;
        if data.is_empty() {
            return None;
        }
        self.received += data.len() as u64;
        self.counter.inc_by(data.len() as u64);
        Some(data)
    }

    /// Goes on from where the body broke, at the next source (when a peer broke it) or at
    /// the same one.
    async fn resume(&mut self, broken: BodyError) -> Result<()> {
        let from = self.received;
        // A peer that broke off is skipped; resuming from the next source is no retry.
        if !self.chain.reject(false) {
            if self.resumes == MAX_RESUMES {
                let resumes = self.resumes;
                let last = Box::new(broken);
                return Err(self
                    .chain
                    .error(UpstreamErrorKind::Body(BodyError::Resumes { resumes, last }.into())));
            }
            self.resumes += 1;
        }
        tracing::warn!(from, resumes = self.resumes, error = %crate::wire::error_chain(&broken), "body broke; resuming");
        let resp = self.chain.connect(Some(from)).await?;
        self.counter = self.chain.counter();
        if resp.status() == StatusCode::PARTIAL_CONTENT {
            let answered = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !answered.starts_with(&format!("bytes {from}-")) {
                let answered = answered.to_owned();
                return Err(self
                    .chain
                    .error(UpstreamErrorKind::Body(BodyError::Resume { from, answered }.into())));
            }
            self.skip = 0;
        } else {
            // The source ignored the range: drop what was already read.
            self.skip = from;
        }
        self.body = resp.into_body();
        Ok(())
    }
}
