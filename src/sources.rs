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
use crate::oci::{Digest, Visibility};
use crate::peers::{PeerAddr, PeerError, Peers};
use crate::upstream::{MIN_BODY_RATE, UpstreamError, UpstreamErrorKind, Upstreams};
use crate::wire::content_length;

/// A peer's body that sends nothing for this long has failed, sooner than a registry's
/// (`--upstream-timeout`): the next source may have the bytes.
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
            visibility: None,
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
    /// The most any source's answer proved of who may read the content at the fetch's
    /// location.
    visibility: Option<Visibility>,
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
            window: (Duration::ZERO, 0),
            slow: None,
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
                        self.begin(Source::Peer(served_by), &resp);
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
        let resp = self.upstreams.fetch(&fetch).await?;
        self.begin(Source::Upstream, &resp);
        Ok(resp)
    }

    fn begin(&mut self, source: Source, resp: &Response<Incoming>) {
        self.current = source;
        // An answer that says nothing proves nothing: a client's credential read it.
        let answered = resp
            .extensions()
            .get::<Visibility>()
            .copied()
            .unwrap_or(Visibility::Client);
        self.visibility = Some(self.visibility.map_or(answered, |v| v.widest(answered)));
        if let Source::Peer(peer) = source
            && !self.used.contains(&peer)
        {
            self.used.push(peer);
        }
    }

    /// What the sources' answers proved of the fetch's location: public when any answered an
    /// anonymous request (or, a peer, said so); private when pullcache's credentials read it;
    /// else only a client's credential did.
    pub fn visibility(&self) -> Visibility {
        self.visibility.unwrap_or(Visibility::Client)
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
            _ => self.upstreams.timeout(),
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
    #[error("{bytes} bytes in {window:?}, under {MIN_BODY_RATE} bytes/s")]
    Slow { bytes: u64, window: Duration },
    #[error("body goes past its announced {0} bytes")]
    Long(u64),
    #[error("resume answered {answered} bytes, wanted {wanted}")]
    ResumeLength { wanted: u64, answered: u64 },
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
    /// The time spent waiting for the source in the current rate window (not the time the
    /// flight's own readers held it up), and the bytes received in it.
    window: (Duration, u64),
    /// The body proved too slow with the bytes last returned: it is resumed before the next.
    slow: Option<BodyError>,
}

impl Stream<'_> {
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// The peer the bytes now come from, if any.
    pub fn peer(&self) -> Option<PeerAddr> {
        self.chain.peer()
    }

    /// See [`Chain::visibility`].
    pub fn visibility(&self) -> Visibility {
        self.chain.visibility()
    }

    /// The next bytes of the body, `None` at its end (at once for a `HEAD`).
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        if self.chain.fetch.method == http::Method::HEAD {
            return Ok(None);
        }
        loop {
            if let Some(slow) = self.slow.take() {
                // A slow body that has ended is whole; one that has not is resumed. A frame
                // read here is not taken, so the resume asks for it again.
                let ended = match self.size {
                    Some(size) => self.received >= size,
                    None => matches!(tokio::time::timeout(Duration::ZERO, self.body.frame()).await, Ok(None)),
                };
                if ended {
                    return Ok(None);
                }
                self.resume(slow).await?;
                self.window = (Duration::ZERO, 0);
            }
            let waiting = tokio::time::Instant::now();
            let frame = tokio::time::timeout(self.chain.idle_timeout(), self.body.frame()).await;
            self.window.0 += waiting.elapsed();
            let broken = match frame {
                Err(_) => BodyError::Idle(self.chain.idle_timeout()),
                Ok(None) if self.size.is_some_and(|size| self.received < size) => BodyError::Short(self.received),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => BodyError::Read(e),
                Ok(Some(Ok(frame))) => {
                    // Every byte counts towards the rate, skipped or not, and so does a frame
                    // with none: a replay of what was already read, or empty frames, sent
                    // slowly, must not hold the body open.
                    let slow = self.too_slow(frame.data_ref().map_or(0, |d| d.len() as u64));
                    match (self.take(frame)?, slow) {
                        (Some(data), slow) => {
                            self.slow = slow;
                            return Ok(Some(data));
                        }
                        (None, None) => continue,
                        (None, Some(slow)) => slow,
                    }
                }
            };
            self.resume(broken).await?;
            self.window = (Duration::ZERO, 0);
        }
    }

    /// Counts `bytes` into the rate window; once the window has run its length, a body that
    /// averaged under [`MIN_BODY_RATE`] in it has failed.
    fn too_slow(&mut self, bytes: u64) -> Option<BodyError> {
        let (waited, received) = &mut self.window;
        *received += bytes;
        if *waited < self.chain.idle_timeout() {
            return None;
        }
        let floor = u128::from(MIN_BODY_RATE) * waited.as_millis();
        let slow = u128::from(*received) * 1000 < floor;
        let result = slow.then_some(BodyError::Slow {
            bytes: *received,
            window: *waited,
        });
        self.window = (Duration::ZERO, 0);
        result
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

    /// A frame's data past what is to be skipped, counted where it came from. Bytes past the
    /// announced size (a resume answered with a longer body) fail the fetch.
    fn take(&mut self, frame: hyper::body::Frame<Bytes>) -> Result<Option<Bytes>> {
        let Ok(mut data) = frame.into_data() else {
            return Ok(None);
        };
        let skipped = self.skip.min(data.len() as u64);
        data.advance(skipped as usize);
        self.skip -= skipped;
        if data.is_empty() {
            return Ok(None);
        }
        if let Some(size) = self.size
            && self.received + data.len() as u64 > size
        {
            return Err(self.chain.error(UpstreamErrorKind::Body(BodyError::Long(size).into())));
        }
        self.received += data.len() as u64;
        self.counter.inc_by(data.len() as u64);
        Ok(Some(data))
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
        // An answer that says a length must say the one the body was announced with.
        let wanted = self.size.map(|size| size - from + self.skip);
        if let (Some(wanted), Some(answered)) = (wanted, content_length(resp.headers()))
            && wanted != answered
        {
            return Err(self.chain.error(UpstreamErrorKind::Body(
                BodyError::ResumeLength { wanted, answered }.into(),
            )));
        }
        self.body = resp.into_body();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::{Mutex, OnceLock};

    use http::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
    use http::{Method, Request};
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;
    use crate::oci::{AcceptClass, Reference, Registry, Repository, Tag};
    use crate::peers::tls::Identity;
    use crate::upstream::RegistrySettings;

    const BLOB_SIZE: usize = 64 * 1024;
    const HALF: usize = BLOB_SIZE / 2;

    /// How a fake source answers a request for the test's blob.
    #[derive(Clone, Copy)]
    enum Serve {
        /// The whole blob, or from the requested offset with 206, like a registry.
        Ranges,
        /// 200 with the whole size announced, half the bytes, then the connection drops.
        HalfThenCut,
        /// 404.
        NotFound,
        /// The announced size of other bytes.
        Wrong,
        /// A resume answered 206 from the offset asked, with 1,000 bytes more than the blob
        /// has: saying so in its `Content-Length` (`true`) or not (chunked).
        Longer(bool),
    }

    /// A source on 127.0.0.1 (TLS with `tls`, as a peer) that records `METHOD range` of each
    /// request and serves `blob` as `serve` says.
    struct Fake {
        addr: SocketAddr,
        seen: Arc<Mutex<Vec<String>>>,
    }

    impl Fake {
        async fn start(tls: Option<Arc<rustls::ServerConfig>>, blob: Arc<OnceLock<Bytes>>, serve: Serve) -> Fake {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let seen: Arc<Mutex<Vec<String>>> = Arc::default();
            let log = seen.clone();
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let (blob, log, tls) = (blob.clone(), log.clone(), tls.clone());
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            let resp = answer(&req, blob.get().unwrap(), serve);
                            let range = req.headers().get(RANGE).map(|v| v.to_str().unwrap().to_owned());
                            log.lock()
                                .unwrap()
                                .push(format!("{} {}", req.method(), range.unwrap_or_default()));
                            async move { Ok::<_, Infallible>(resp) }
                        });
                        let http = hyper::server::conn::http1::Builder::new();
                        let _ = match tls {
                            Some(tls) => match tokio_rustls::TlsAcceptor::from(tls).accept(stream).await {
                                Ok(tls) => http.serve_connection(TokioIo::new(tls), service).await,
                                Err(_) => return,
                            },
                            None => http.serve_connection(TokioIo::new(stream), service).await,
                        };
                    });
                }
            });
            Fake { addr, seen }
        }

        fn seen(&self) -> Vec<String> {
            self.seen.lock().unwrap().clone()
        }
    }

    type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

    fn answer(req: &Request<Incoming>, blob: &Bytes, serve: Serve) -> Response<TestBody> {
        let from: usize = req
            .headers()
            .get(RANGE)
            .and_then(|v| v.to_str().ok()?.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
            .unwrap_or(0);
        let mut resp = Response::builder();
        let mut frames: Vec<std::io::Result<Frame<Bytes>>> = Vec::new();
        match serve {
            Serve::Ranges => {
                resp = resp.header(CONTENT_LENGTH, blob.len() - from);
                if from > 0 {
                    let range = format!("bytes {from}-{}/{}", blob.len() - 1, blob.len());
                    resp = resp.status(StatusCode::PARTIAL_CONTENT).header(CONTENT_RANGE, range);
                }
                frames.push(Ok(Frame::data(blob.slice(from..))));
            }
            Serve::HalfThenCut => {
                resp = resp.header(CONTENT_LENGTH, blob.len());
                frames.push(Ok(Frame::data(blob.slice(..HALF))));
                frames.push(Err(std::io::Error::other("cut off")));
            }
            Serve::NotFound => resp = resp.status(StatusCode::NOT_FOUND),
            Serve::Longer(said) => {
                let range = format!("bytes {from}-{}/{}", blob.len() - 1, blob.len());
                resp = resp.status(StatusCode::PARTIAL_CONTENT).header(CONTENT_RANGE, range);
                if said {
                    resp = resp.header(CONTENT_LENGTH, blob.len() - from + 1000);
                }
                frames.push(Ok(Frame::data(blob.slice(from..))));
                frames.push(Ok(Frame::data(Bytes::from(vec![b'x'; 1000]))));
            }
            Serve::Wrong => {
                resp = resp.header(CONTENT_LENGTH, blob.len());
                frames.push(Ok(Frame::data(Bytes::from(vec![b'x'; blob.len()]))));
            }
        }
        if req.method() == Method::HEAD {
            frames.clear();
        }
        // The cut comes once the bytes before it are out, as when a connection drops.
        let frames = futures_util::StreamExt::then(futures_util::stream::iter(frames), |frame| async move {
            if frame.is_err() {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            frame
        });
        resp.body(StreamBody::new(frames).boxed_unsync()).unwrap()
    }

    /// This node, two fake peers ranked above it for the test's blob (`first` the owner), and
    /// a registry `up.test` that serves the blob with ranges.
    struct Cluster {
        sources: Sources,
        peers: Arc<Peers>,
        upstream: Fake,
        first: Fake,
        second: Fake,
        blob: Bytes,
        _ca: tempfile::TempDir,
        _view: tokio::sync::watch::Sender<crate::peers::membership::View>,
    }

    async fn cluster(first: Serve, second: Serve) -> Cluster {
        let ca = tempfile::tempdir().unwrap();
        crate::ca::init(ca.path()).unwrap();
        let identity = Identity::issue(ca.path(), "127.0.0.1".parse().unwrap()).unwrap();
        let tls = Arc::new(identity.server_config().unwrap());
        let shared: Arc<OnceLock<Bytes>> = Arc::default();
        let upstream = Fake::start(None, shared.clone(), Serve::Ranges).await;
        let first = Fake::start(Some(tls.clone()), shared.clone(), first).await;
        let second = Fake::start(Some(tls), shared.clone(), second).await;
        let me: PeerAddr = "127.0.0.1:1".parse().unwrap();
        let members = [me, first.addr, second.addr];
        let blob = (0u32..)
            .map(|i| Bytes::from(format!("{i} ").repeat(BLOB_SIZE)).slice(..BLOB_SIZE))
            .find(|blob| crate::peers::ring::rank(&members, &Digest::of(blob)) == [first.addr, second.addr, me])
            .unwrap();
        shared.set(blob.clone()).unwrap();

        let (view_tx, view) = tokio::sync::watch::channel(Arc::new(members.to_vec()));
        let peer_metrics = crate::peers::Metrics::register(&prometheus::Registry::new()).unwrap();
        let peers = Arc::new(Peers::with_view(me, view, &identity, 4, peer_metrics));
        let mut settings = crate::upstream::Settings::default();
        settings.registries.insert(
            Registry::parse("up.test").unwrap(),
            RegistrySettings {
                url: Some(format!("http://{}", upstream.addr).parse().unwrap()),
                ..RegistrySettings::default()
            },
        );
        let upstream_metrics = crate::upstream::Metrics::register(&prometheus::Registry::new()).unwrap();
        let upstreams = Arc::new(Upstreams::new(settings, upstream_metrics));
        Cluster {
            sources: Sources::new(upstreams, Some(peers.clone())),
            peers,
            upstream,
            first,
            second,
            blob,
            _ca: ca,
            _view: view_tx,
        }
    }

    impl Cluster {
        fn fetch(&self, method: Method) -> Fetch {
            let (registry, repository) = (
                Registry::parse("up.test").unwrap(),
                Repository::parse("team/app").unwrap(),
            );
            Fetch::blob(method, &registry, &repository, &Digest::of(&self.blob))
        }

        fn upstream_bytes(&self) -> u64 {
            self.sources
                .upstreams
                .bytes_counter(&Registry::parse("up.test").unwrap())
                .get()
        }
    }

    async fn read_all(chain: &mut Chain) -> Result<Bytes> {
        chain.open().await?.collect(u64::MAX).await
    }

    /// The owner breaks off mid-body and the next peer answers without the content: the
    /// upstream resumes where the owner broke, the reader sees one whole body, each source's
    /// bytes are counted where they came from, and the owner is skipped from then on.
    #[tokio::test]
    async fn a_peer_that_breaks_off_is_skipped_and_the_upstream_resumes() {
        let cluster = cluster(Serve::HalfThenCut, Serve::NotFound).await;
        let mut chain = cluster.sources.chain(cluster.fetch(Method::GET), Asker::Client);
        assert_eq!(read_all(&mut chain).await.unwrap(), cluster.blob);

        assert_eq!(cluster.first.seen(), ["GET "]);
        assert_eq!(cluster.second.seen(), [format!("GET bytes={HALF}-")]);
        assert_eq!(cluster.upstream.seen(), [format!("GET bytes={HALF}-")]);
        assert_eq!(cluster.peers.bytes_in().get(), HALF as u64);
        assert_eq!(cluster.upstream_bytes(), (BLOB_SIZE - HALF) as u64);
        assert!(chain.blame_peers().is_some(), "the owner sent bytes of it");
        let digest = Digest::of(&cluster.blob);
        assert!(
            !cluster.peers.route(&digest).contains(&cluster.first.addr),
            "the owner is skipped"
        );
    }

    /// Bytes that failed their digest are the fault of the peers that sent them: they are
    /// skipped for long. Bytes all from the upstream blame no peer.
    #[tokio::test]
    async fn wrong_bytes_are_blamed_on_the_peers_that_sent_them() {
        let cluster = cluster(Serve::Wrong, Serve::Ranges).await;
        let digest = Digest::of(&cluster.blob);
        let mut chain = cluster.sources.chain(cluster.fetch(Method::GET), Asker::Client);
        assert_ne!(read_all(&mut chain).await.unwrap(), cluster.blob);
        let blamed = chain.blame_peers();
        assert!(
            matches!(blamed, Some(PeerError::Forged { peer }) if peer == cluster.first.addr),
            "{blamed:?}"
        );
        assert_eq!(cluster.peers.route(&digest), [cluster.second.addr]);

        let mut chain = cluster.sources.chain(cluster.fetch(Method::GET), Asker::Peer);
        assert_eq!(read_all(&mut chain).await.unwrap(), cluster.blob);
        assert!(chain.blame_peers().is_none());
        assert_eq!(cluster.upstream.seen(), ["GET "]);
    }

    /// A client's `HEAD` asks the owner first; a peer's goes upstream only, as does anything
    /// named by tag.
    #[tokio::test]
    async fn heads_follow_the_same_chain() {
        let cluster = cluster(Serve::Ranges, Serve::Ranges).await;
        let mut chain = cluster.sources.chain(cluster.fetch(Method::HEAD), Asker::Client);
        assert_eq!(chain.open().await.unwrap().size(), Some(BLOB_SIZE as u64));
        assert_eq!(
            (cluster.first.seen(), cluster.upstream.seen()),
            (vec!["HEAD ".to_owned()], vec![])
        );

        let mut chain = cluster.sources.chain(cluster.fetch(Method::HEAD), Asker::Peer);
        assert_eq!(chain.open().await.unwrap().size(), Some(BLOB_SIZE as u64));
        assert_eq!(cluster.upstream.seen(), ["HEAD "]);

        let fetch = cluster.fetch(Method::HEAD);
        let tag = Reference::Tag(Tag::parse("v1").unwrap());
        let by_tag = Fetch::manifest(
            Method::HEAD,
            &fetch.registry,
            &fetch.repository,
            tag,
            AcceptClass::all(),
        );
        let mut chain = cluster.sources.chain(by_tag, Asker::Client);
        assert!(chain.open().await.is_ok());
        assert_eq!(cluster.upstream.seen().len(), 2);
        assert_eq!(cluster.first.seen().len() + cluster.second.seen().len(), 1);
    }

    /// A resume answered with more bytes than the blob was announced with, said in its
    /// `Content-Length` or not, fails the fetch: before, the extra bytes were read on (an
    /// endless resume, for as long as the source liked).
    #[tokio::test]
    async fn a_resume_longer_than_the_blob_fails() {
        for (said, want) in [(true, "resume answered"), (false, "past its announced")] {
            let cluster = cluster(Serve::HalfThenCut, Serve::Longer(said)).await;
            let mut chain = cluster.sources.chain(cluster.fetch(Method::GET), Asker::Client);
            let e = read_all(&mut chain).await.unwrap_err();
            let chain_text = crate::wire::error_chain(&e);
            assert!(chain_text.contains(want), "{said}: {chain_text}");
            assert_eq!(cluster.second.seen(), [format!("GET bytes={HALF}-")]);
        }
    }
}
