//! Single-flight blob downloads. One upstream GET per digest and location, however many
//! clients ask:
//! the flight writes into a temp file (hashing as it goes, on a blocking thread) and publishes
//! its progress; every client, the first included, tails that file as it grows. The download
//! runs in its own task, so no client's disconnect cancels it. At the end the store commits the
//! file only if it hashes to the digest; otherwise every reader's body is aborted.
//!
//! If the cache write fails (a full disk, an I/O error), the flight goes on as a pass-through:
//! readers get the rest of the bytes from memory (the `spill` module), the digest is still checked
//! before any response completes, and nothing is committed.
//!
//! Flights are keyed by digest, the location (registry, repository) they fetch from and the
//! credential they fetch with: a client never joins a flight fetching under another name,
//! whose bytes may be private to it (see [`crate::authorize`]), nor one whose credential
//! (a neighbour's, made up) may fail. What a flight fetched is recorded as coming from its
//! location, public or private as its source's answer proved.
//!
//! A digest whose upstream served wrong bytes is remembered for a short while: requests for it
//! at that location fail at once, before any header, so containerd moves on to its next host
//! (the registry itself) instead of retrying a download that cannot verify. A failure mid-body
//! gives containerd no such chance.

mod spill;
mod tail;

use crate::sync::MutexExt;
use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::Method;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge};
use sha2::{Digest as _, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::authorize::{Access, Grant};
use crate::error::{Error, InternalError};
use crate::fetch::{Asker, CredentialKind, Fetch, Resource};
use crate::oci::{Digest, Location, Mismatch, Origin, Provenance, Visibility};
use crate::peers::PeerAddr;
use crate::sources::{Sources, Stream};
use crate::store::{Blob, CommitError, Store, TempBlob};
use crate::upstream::{UpstreamError, UpstreamErrorKind};

use spill::Spill;
pub use tail::{Chunk, FileSpan, ReadBuffers, Tail};

/// Body bytes buffered between the network task and the writer thread. A loopback upstream
/// outruns hashing and writing, so this bounds a download's memory whatever the frame sizes.
const WRITE_QUEUE_BYTES: u32 = 4 * 1024 * 1024;
/// Bytes the writer thread writes at most between two wake-ups of the readers.
const WAKE_EVERY: u64 = 256 * 1024;
/// How long a digest stays refused after its upstream served bytes that failed it.
const MISMATCH_MEMORY: Duration = Duration::from_secs(30);

/// Where a flight stands. Readers watch it change.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The blob's size, once the upstream's headers said it.
    pub size: Option<u64>,
    /// Bytes in the temp file so far.
    pub written: u64,
    pub state: FlightState,
    /// The peer the bytes are coming from, in cluster mode.
    pub peer: Option<PeerAddr>,
    /// What the source's answer proved of the location, once headers arrived.
    pub visibility: Option<Visibility>,
}

#[derive(Debug, Clone)]
pub enum FlightState {
    /// Waiting for upstream response headers.
    Connecting,
    /// Headers arrived; bytes are coming.
    Streaming,
    /// Verified, and committed to the store unless the cache write failed.
    Done,
    /// Nothing was committed; readers abort.
    Failed(Arc<Error>),
}

pub struct Metrics {
    inflight: IntGauge,
    waiters: Histogram,
    verify_failures: IntCounter,
    write_failures: IntCounter,
}

impl Metrics {
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Metrics> {
        let inflight = IntGauge::new(
            "pullcache_inflight_fetches",
            "Blob downloads from upstream in progress.",
        )?;
        let waiters = Histogram::with_opts(
            HistogramOpts::new(
                "pullcache_flight_waiters",
                "Clients served by one blob download, the first included, observed when it ends.",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
        )?;
        let verify_failures = IntCounter::new(
            "pullcache_digest_verification_failures_total",
            "Blobs whose upstream bytes did not match their digest; nothing was stored.",
        )?;
        registry.register(Box::new(inflight.clone()))?;
        registry.register(Box::new(waiters.clone()))?;
        let write_failures = IntCounter::new(
            "pullcache_cache_write_failures_total",
            "Downloads whose cache write failed (full disk, I/O error); they went on as a pass-through and stored nothing.",
        )?;
        registry.register(Box::new(verify_failures.clone()))?;
        registry.register(Box::new(write_failures.clone()))?;
        Ok(Metrics {
            inflight,
            waiters,
            verify_failures,
            write_failures,
        })
    }
}

/// One download in progress.
pub struct Flight {
    /// Where it fetches from.
    location: Location,
    /// The temp file; `None` when it could not even be created.
    file: Option<Arc<File>>,
    spill: Arc<Spill>,
    /// Clients that joined, the first included.
    waiters: AtomicU64,
    progress: watch::Receiver<Progress>,
}

impl Flight {
    /// Waits for the upstream's response headers: the size if known, or the failure.
    pub async fn headers(&self) -> Result<Option<u64>, Error> {
        let mut rx = self.progress.clone();
        loop {
            {
                let p = rx.borrow_and_update();
                match &p.state {
                    FlightState::Connecting => {}
                    FlightState::Streaming => return Ok(p.size),
                    FlightState::Done => return Ok(Some(p.written)),
                    FlightState::Failed(e) => return Err(Error::Shared(e.clone())),
                }
            }
            if rx.changed().await.is_err() {
                return Err(InternalError::FlightLost.into());
            }
        }
    }

    /// Whether its bytes are all in and verified: until then a reader of it holds back the last
    /// byte of its range.
    pub fn verified(&self) -> bool {
        matches!(self.progress.borrow().state, FlightState::Done)
    }

    /// Where the bytes come from, as the store will record them: call after [`Flight::headers`]
    /// (before, it reads as what only a client's credential read at the location).
    pub fn provenance(&self) -> Provenance {
        let mut provenance = Provenance::default();
        let visibility = self.progress.borrow().visibility.unwrap_or(Visibility::Client);
        provenance.add(&Origin::new(&self.location, visibility));
        provenance
    }

    /// A reader of bytes `start..end` (`end` unknown: to the end of the blob) that follows the
    /// download, in the place `seat` kept for it.
    pub fn tail(&self, seat: Seat, start: u64, end: Option<u64>) -> Tail {
        Tail::following(self.file.clone(), seat.take(start), start, end, self.progress.clone())
    }

    /// A place among the flight's readers from its first byte, kept from when a client starts
    /// or joins the flight until its [`Flight::tail`] reads (or it goes away): a pass-through
    /// window drops nothing a client that has not started reading yet will need.
    fn seat(&self) -> Option<Seat> {
        let id = self.spill.register_from_start()?;
        Some(Seat {
            spill: Some((self.spill.clone(), id)),
        })
    }
}

/// A client's place among a flight's readers, from its first byte, kept from when the client
/// starts or joins the flight until its [`Flight::tail`] reads (or it goes away).
pub struct Seat {
    spill: Option<(Arc<Spill>, u64)>,
}

impl Seat {
    /// The place, moved to `start`, for a [`Tail`] to hold.
    fn take(mut self, start: u64) -> (Arc<Spill>, u64) {
        let (spill, id) = self.spill.take().expect("a seat is taken once");
        spill.advance(id, start);
        (spill, id)
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Some((spill, id)) = self.spill.take() {
            spill.unregister(id);
        }
    }
}

/// What serves a blob: the store (with its provenance's visibility), or a flight, with the
/// client's seat in it.
pub enum BlobSource {
    Stored {
        blob: Blob,
        visibility: Visibility,
    },
    Flight {
        flight: Arc<Flight>,
        joined: bool,
        seat: Seat,
    },
}

/// A flight's key: the digest, where it is fetched from, and whose credential fetches it (a
/// fetch that fails, anonymous or with a neighbour's made-up credential, must not fail a
/// client's).
type Key = (Digest, Location, CredentialKind);
type Active = Arc<Mutex<HashMap<Key, Arc<Flight>>>>;
/// Digests whose upstream at a location served bytes that failed verification, until when,
/// and the failure.
type Refused = Arc<Mutex<HashMap<Key, (Instant, Arc<Error>)>>>;

pub struct Flights {
    store: Arc<Store>,
    sources: Arc<Sources>,
    active: Active,
    refused: Refused,
    metrics: Arc<Metrics>,
}

impl Flights {
    pub fn new(store: Arc<Store>, sources: Arc<Sources>, metrics: Metrics) -> Flights {
        Flights {
            store,
            sources,
            active: Arc::default(),
            refused: Arc::default(),
            metrics: Arc::new(metrics),
        }
    }

    /// The peer a running flight of `digest` gets its bytes from, if any: a peer asking for
    /// the digest must not be served its own bytes back.
    pub fn fed_by(&self, digest: &Digest) -> Option<PeerAddr> {
        let active = self.active.locked();
        active
            .iter()
            .filter(|((d, _, _), _)| d == digest)
            .find_map(|(_, flight)| flight.progress.borrow().peer)
    }

    /// The stored blob, when `access` may be served it.
    async fn stored(&self, access: &Access<'_>, digest: &Digest) -> Result<Option<BlobSource>, Error> {
        let Some(blob) = self.store.open_blob(digest)? else {
            return Ok(None);
        };
        let provenance = self.store.provenance(digest);
        // Stored for another name and private to it: a miss for this one.
        let served = access.serves(&provenance).await?;
        Ok(served.then(|| BlobSource::Stored {
            blob,
            visibility: provenance.visibility_at(access.location),
        }))
    }

    /// The stored blob or a running flight under the access's location, without starting one.
    pub async fn lookup(&self, access: &Access<'_>, digest: &Digest) -> Result<Option<BlobSource>, Error> {
        if let Some(stored) = self.stored(access, digest).await? {
            return Ok(Some(stored));
        }
        let kind = access.grant().await?.credential.kind();
        let active = self.active.locked();
        Ok(active
            .get(&(digest.clone(), access.location.clone(), kind))
            .and_then(join))
    }

    /// The stored blob, a running flight to join, or a new flight fetching it from the
    /// access's location (for a client in cluster mode through the peers first). A flight's
    /// bytes are only served once its answer's [`Flight::provenance`] passes `access` (the
    /// caller asks, after [`Flight::headers`]).
    pub async fn get(&self, access: &Access<'_>, digest: &Digest) -> Result<BlobSource, Error> {
        let location = access.location;
        loop {
            let held = self.store.has_blob(digest);
            if let Some(stored) = self.stored(access, digest).await? {
                return Ok(stored);
            }
            let grant = access.grant().await?;
            let key = (digest.clone(), location.clone(), grant.credential.kind());
            let mut active = self.active.locked();
            // A pass-through flight that has dropped bytes from memory cannot serve a
            // newcomer from the start; the newcomer gets a flight of its own, outside `active`.
            let shared = match active.get(&key).map(|flight| (flight, join(flight))) {
                Some((_, Some(joined))) => return Ok(joined),
                Some((_, None)) => false,
                None => true,
            };
            // A flight commits before it leaves `active`, so under the lock a second look at
            // the store closes the gap between the first look and here: a flight of this
            // location may have just committed what was not there at the first look.
            if !held && self.store.has_blob(digest) && self.store.provenance(digest).serves(location) {
                continue;
            }
            self.check_fetchable(&key)?;
            let (flight, download, temp) = self.prepare(&key, access.asker, grant)?;
            if shared {
                active.insert(key, flight.clone());
            }
            // Seated before the download starts, so not one byte passes before it.
            let seat = flight.seat().expect("a flight not yet started has lost no bytes");
            self.launch(download, temp, flight.clone());
            return Ok(BlobSource::Flight {
                flight,
                joined: false,
                seat,
            });
        }
    }

    /// Fails before any header when no download may start: the cache is offline, or the
    /// location lately served bytes that failed the digest.
    fn check_fetchable(&self, key: &Key) -> Result<(), Error> {
        let (digest, location, _) = key;
        if self.sources.upstreams().is_offline() {
            return Err(UpstreamError::new(
                &location.registry,
                UpstreamErrorKind::Offline {
                    resource: Resource::Blob,
                    reference: format!("{location}@{digest}"),
                },
            )
            .into());
        }
        let mut refused = self.refused.locked();
        refused.retain(|_, (until, _)| *until > Instant::now());
        match refused.get(key) {
            Some((_, error)) => Err(Error::Shared(error.clone())),
            None => Ok(()),
        }
    }

    /// A new flight and the download that feeds it: into a temp file, or, when none can be
    /// created, passed through from memory from the first byte.
    fn prepare(
        &self,
        key: &Key,
        asker: Asker,
        grant: Grant,
    ) -> Result<(Arc<Flight>, Download, Option<TempBlob>), Error> {
        let (digest, location, _) = key;
        let spill = Arc::new(Spill::default());
        let temp = match self.store.temp_blob() {
            Ok(temp) => Some(temp),
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot create a cache file; passing the blob through");
                self.metrics.write_failures.inc();
                self.store.report_full_disk();
                spill.begin(0);
                None
            }
        };
        let (tx, rx) = watch::channel(Progress {
            size: None,
            written: 0,
            state: FlightState::Connecting,
            peer: None,
            visibility: None,
        });
        let flight = Arc::new(Flight {
            location: location.clone(),
            waiters: AtomicU64::new(1),
            file: temp.as_ref().map(TempBlob::reader).transpose()?.map(Arc::new),
            spill: spill.clone(),
            progress: rx,
        });
        let download = Download {
            store: self.store.clone(),
            sources: self.sources.clone(),
            asker,
            location: location.clone(),
            grant,
            digest: digest.clone(),
            progress: Arc::new(tx),
            spill,
            metrics: self.metrics.clone(),
        };
        Ok((flight, download, temp))
    }

    /// Runs `download` in a task of its own, so no client's disconnect cancels it; when it
    /// ends, publishes how, and takes `flight` out of `active`.
    fn launch(&self, download: Download, temp: Option<TempBlob>, flight: Arc<Flight>) {
        let key = (
            download.digest.clone(),
            download.location.clone(),
            download.grant.credential.kind(),
        );
        let progress = download.progress.clone();
        self.land_after(key, progress, flight, download.run(temp));
    }

    /// Runs a flight's `work` in a task of its own and lands the flight when it ends. A panic
    /// in it (a bug, or an answer no check foresaw) lands the flight as failed like any
    /// error: its readers get an error, and the next request starts afresh instead of
    /// joining a flight that will never end.
    fn land_after(
        &self,
        key: Key,
        progress: Arc<watch::Sender<Progress>>,
        flight: Arc<Flight>,
        work: impl Future<Output = Result<(), Error>> + Send + 'static,
    ) {
        let (active, refused, metrics) = (self.active.clone(), self.refused.clone(), self.metrics.clone());
        metrics.inflight.inc();
        tokio::spawn(async move {
            let ended = match AssertUnwindSafe(work).catch_unwind().await {
                Ok(ended) => ended,
                Err(panic) => Err(InternalError::panicked("blob download", panic.as_ref()).into()),
            };
            let state = match ended {
                Ok(()) => FlightState::Done,
                Err(e) => FlightState::Failed(failed(&key, e, &refused, &metrics)),
            };
            progress.send_modify(|p| p.state = state);
            let waiters = land(&active, &key, &flight);
            metrics.inflight.dec();
            metrics.waiters.observe(waiters as f64);
        });
    }
}

/// Joins a running flight as one more waiter, unless it passes its bytes through and has
/// already dropped some a newcomer from the start would need.
fn join(flight: &Arc<Flight>) -> Option<BlobSource> {
    let seat = flight.seat()?;
    flight.waiters.fetch_add(1, Ordering::Relaxed);
    Some(BlobSource::Flight {
        flight: flight.clone(),
        joined: true,
        seat,
    })
}

/// Logs a download's failure; bytes that failed the digest get the digest refused at that
/// location for a while.
fn failed(key: &Key, e: Error, refused: &Refused, metrics: &Metrics) -> Arc<Error> {
    let (digest, location, _) = key;
    tracing::warn!(%digest, %location, error = %e, "blob download failed; nothing committed");
    let e = Arc::new(e);
    if e.is_mismatch() {
        metrics.verify_failures.inc();
        let until = Instant::now() + MISMATCH_MEMORY;
        refused.locked().insert(key.clone(), (until, e.clone()));
    }
    e
}

/// Takes an ended flight out of `active` (unless another has taken its place there) and
/// returns how many clients it served.
fn land(active: &Active, key: &Key, flight: &Arc<Flight>) -> u64 {
    // Leaving `active` under its lock: no one joins after the waiters are read.
    let mut active = active.locked();
    if active.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
        active.remove(key);
    }
    flight.waiters.load(Ordering::Relaxed)
}

/// The task behind a flight.
struct Download {
    store: Arc<Store>,
    sources: Arc<Sources>,
    asker: Asker,
    location: Location,
    grant: Grant,
    digest: Digest,
    progress: Arc<watch::Sender<Progress>>,
    spill: Arc<Spill>,
    metrics: Arc<Metrics>,
}

impl Download {
    #[tracing::instrument(skip_all, fields(registry = %self.location.registry, repo = %self.location.repository, digest = %self.digest))]
    async fn run(self, temp: Option<TempBlob>) -> Result<(), Error> {
        let location = &self.location;
        let fetch = self.grant.apply(Fetch::blob(
            Method::GET,
            &location.registry,
            &location.repository,
            &self.digest,
        ));
        let mut chain = self.sources.chain(fetch, self.asker);
        let mut stream = chain.open().await?;
        let (size, peer) = (stream.size(), stream.peer());
        let visibility = self.grant.visibility(stream.visibility());
        self.progress.send_modify(|p| {
            p.size = size;
            p.peer = peer;
            p.visibility = Some(visibility);
            p.state = FlightState::Streaming;
        });
        // A blob too large for the store is passed through from the start; one whose size
        // was not said is, once it passes that size.
        let largest = self.store.largest_blob();
        let temp = match size {
            Some(size) if size > largest => {
                tracing::info!(size, largest, "blob larger than the cache can keep; passing it through");
                self.spill.begin(0);
                None
            }
            _ => temp,
        };
        let (chunks, writer) = self.spawn_writer(temp, largest);
        let pumped = self.pump(&mut stream, &chunks).await;
        drop((chunks, stream));
        let sink = writer.await.map_err(InternalError::task("blob writer"))?;
        pumped?;
        // A resumed body may have come from a source whose answer proved more.
        let origin = Origin::new(location, self.grant.visibility(chain.visibility()));
        let verified = match sink {
            Sink::Disk(temp) => self.commit(temp, size, origin).await,
            Sink::Memory { hasher, size: actual } => self.verify_passed_through(hasher, actual, size),
        };
        match verified {
            // Wrong bytes from a peer are the peer's fault, not the digest's upstream's: the
            // peer is skipped, and the digest is not refused.
            Err(e) if e.is_mismatch() => Err(chain.blame_peers().map_or(e, Error::from)),
            verified => verified,
        }
    }

    /// Pumps the body into the writer to its end (or until the writer stops, on a store
    /// error it reports itself), keeping the flight's record of the peer feeding it current.
    async fn pump(&self, stream: &mut Stream<'_>, chunks: &WriteQueue) -> Result<(), Error> {
        let mut peer = stream.peer();
        while let Some(data) = stream.next().await? {
            if stream.peer() != peer {
                peer = stream.peer();
                self.progress.send_modify(|p| p.peer = peer);
            }
            if chunks.send(data).await.is_err() {
                break;
            }
            if self.spill.unread() {
                return Err(InternalError::Unread.into());
            }
        }
        Ok(())
    }

    /// Starts the blocking thread that writes (and hashes) what the network task queues,
    /// into `temp` or, without one or once a write fails, into the spill window. It returns
    /// the sink when the queue closes.
    fn spawn_writer(&self, temp: Option<TempBlob>, largest: u64) -> (WriteQueue, tokio::task::JoinHandle<Sink>) {
        let (tx, mut queue) = mpsc::unbounded_channel();
        let chunks = WriteQueue {
            tx,
            room: Arc::new(Semaphore::new(WRITE_QUEUE_BYTES as usize)),
        };
        let mut sink = match temp {
            Some(temp) => Sink::Disk(temp),
            None => Sink::Memory {
                hasher: Sha256::new(),
                size: 0,
            },
        };
        let (progress, spill, metrics, store) = (
            self.progress.clone(),
            self.spill.clone(),
            self.metrics.clone(),
            self.store.clone(),
        );
        let writer = tokio::task::spawn_blocking(move || {
            let on_failure = |e: &crate::store::StoreError| {
                tracing::warn!(error = %e, "cache write failed; passing the blob through, storing nothing");
                metrics.write_failures.inc();
                store.report_full_disk();
            };
            // Each chunk's permit goes back to the queue's room once it is written.
            while let Some((chunk, _room)) = queue.blocking_recv() {
                let since = sink.size();
                sink = sink.write(chunk, largest, &spill, &progress, &on_failure);
                // Write more of what is already queued before waking readers, so a fast
                // upstream does not cost one wake-up per small frame; but not much more,
                // or the first bytes of a miss wait for it.
                while sink.size() - since < WAKE_EVERY
                    && let Ok((chunk, _room)) = queue.try_recv()
                {
                    sink = sink.write(chunk, largest, &spill, &progress, &on_failure);
                }
                let written = sink.size();
                progress.send_modify(|p| p.written = written);
            }
            sink
        });
        (chunks, writer)
    }

    /// Checks a passed-through blob against its digest and the size the upstream announced;
    /// nothing is committed either way.
    fn verify_passed_through(&self, hasher: Sha256, actual: u64, size: Option<u64>) -> Result<(), Error> {
        Mismatch::check(&self.digest, size, Digest::from_hasher(hasher), actual)
            .map_err(|mismatch| self.upstream_error(mismatch.into()))?;
        tracing::info!(bytes = actual, "passed through and verified; not cached");
        Ok(())
    }

    /// Commits the temp file to the store, which checks it against the digest and `size`, and
    /// records `origin`.
    async fn commit(&self, temp: TempBlob, size: Option<u64>, origin: Origin) -> Result<(), Error> {
        let store = self.store.clone();
        let digest = self.digest.clone();
        let committed = tokio::task::spawn_blocking(move || store.commit(temp, &digest, size, Some(&origin)))
            .await
            .map_err(InternalError::task("blob commit"))?;
        match committed {
            Ok(()) => Ok(()),
            Err(CommitError::Io(e)) => Err(e.into()),
            Err(CommitError::Mismatch(mismatch)) => Err(self.upstream_error(mismatch.into())),
        }
    }

    fn upstream_error(&self, kind: UpstreamErrorKind) -> Error {
        UpstreamError::new(&self.location.registry, kind).into()
    }
}

/// The network task's side of the writer's queue, bounded in bytes.
struct WriteQueue {
    tx: mpsc::UnboundedSender<(Bytes, OwnedSemaphorePermit)>,
    room: Arc<Semaphore>,
}

impl WriteQueue {
    /// Queues `data` once there is room for it; an error means the writer has stopped.
    async fn send(&self, data: Bytes) -> Result<(), ()> {
        let want = u32::try_from(data.len()).unwrap_or(u32::MAX).min(WRITE_QUEUE_BYTES);
        let room = self.room.clone().acquire_many_owned(want).await.map_err(|_| ())?;
        self.tx.send((data, room)).map_err(|_| ())
    }
}

/// Where the writer thread puts a flight's bytes: the temp file, or, once a write to it has
/// failed, the spill window (hashing all the same).
enum Sink {
    Disk(TempBlob),
    Memory { hasher: Sha256, size: u64 },
}

impl Sink {
    fn size(&self) -> u64 {
        match self {
            Sink::Disk(temp) => temp.size(),
            Sink::Memory { size, .. } => *size,
        }
    }

    /// Writes `chunk` to the temp file, or, once a write fails or the blob would pass
    /// `largest`, passes it through the spill window.
    fn write(
        self,
        chunk: Bytes,
        largest: u64,
        spill: &Spill,
        progress: &watch::Sender<Progress>,
        on_failure: &dyn Fn(&crate::store::StoreError),
    ) -> Sink {
        let (mut hasher, mut size) = match self {
            Sink::Disk(mut temp) => {
                let written = if temp.size().saturating_add(chunk.len() as u64) > largest {
                    tracing::info!(largest, "blob larger than the cache can keep; passing the rest through");
                    Err(None)
                } else {
                    temp.write(&chunk).map_err(Some)
                };
                match written {
                    Ok(()) => return Sink::Disk(temp),
                    Err(e) => {
                        if let Some(e) = e {
                            on_failure(&e);
                        }
                        // The file keeps what was written before; readers take the rest from
                        // memory.
                        let (hasher, size) = temp.into_hash();
                        spill.begin(size);
                        (hasher, size)
                    }
                }
            }
            Sink::Memory { hasher, size } => (hasher, size),
        };
        hasher.update(&chunk);
        size += chunk.len() as u64;
        spill.append(chunk);
        progress.send_modify(|p| p.written = size);
        spill.wait_for_room();
        Sink::Memory { hasher, size }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[tokio::test]
    async fn the_write_queue_holds_at_most_its_bytes() {
        const MIB: usize = 1024 * 1024;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let queue = WriteQueue {
            tx,
            room: Arc::new(Semaphore::new(WRITE_QUEUE_BYTES as usize)),
        };
        queue.send(Bytes::from(vec![1; 3 * MIB])).await.unwrap();
        let second = queue.send(Bytes::from(vec![2; 2 * MIB]));
        tokio::pin!(second);
        assert!(
            (&mut second).now_or_never().is_none(),
            "5 MiB queued past a 4 MiB bound"
        );

        // Writing the first chunk makes room for the second.
        let (first, room) = rx.recv().await.unwrap();
        assert_eq!(first.len(), 3 * MIB);
        drop(room);
        second.await.unwrap();

        // A chunk larger than the whole bound still goes, alone.
        let (_, room) = rx.recv().await.unwrap();
        drop(room);
        queue.send(Bytes::from(vec![3; 6 * MIB])).await.unwrap();
        assert!(queue.send(Bytes::from_static(b"x")).now_or_never().is_none());

        // Once the writer is gone, sending fails rather than waiting for room forever.
        drop(rx);
        assert!(queue.send(Bytes::from_static(b"x")).await.is_err());
    }

    /// Flights over a store in `dir`, with no upstream configured, and a location to key them.
    fn flights(dir: &std::path::Path) -> (Flights, Location) {
        let registry = prometheus::Registry::new();
        let upstreams = Arc::new(crate::upstream::Upstreams::new(
            crate::upstream::Settings::default(),
            crate::upstream::Metrics::register(&registry).unwrap(),
        ));
        let flights = Flights::new(
            Arc::new(Store::open(dir).unwrap()),
            Arc::new(Sources::new(upstreams, None)),
            Metrics::register(&registry).unwrap(),
        );
        let location = Location::new(
            &crate::oci::Registry::docker_hub(),
            &crate::oci::Repository::parse("library/x").unwrap(),
        );
        (flights, location)
    }

    /// A flight that passes its blob through from the first byte (too large to keep) drops
    /// from memory what no reader needs. A client's seat is taken when it starts or joins the
    /// flight, before it has read a thing: the bytes that arrive meanwhile wait for it. A
    /// reader that only arrived once they were there (as every client did before seats,
    /// after its headers and its access check) has lost them.
    #[tokio::test]
    async fn a_seat_keeps_the_bytes_for_a_client_that_has_not_read_yet() {
        let dir = tempfile::tempdir().unwrap();
        let (flights, location) = flights(dir.path());
        let grant = Grant {
            credential: crate::fetch::Credential::Own,
            clearance: None,
        };
        // Two flights passing their bytes through; a reader seated before the bytes come, or
        // only after.
        for seated_first in [true, false] {
            let key = (
                Digest::of(&[u8::from(seated_first)]),
                location.clone(),
                CredentialKind::Own,
            );
            let (flight, download, _temp) = flights.prepare(&key, Asker::Client, grant.clone()).unwrap();
            let early = seated_first.then(|| flight.seat().unwrap());
            download.spill.begin(0);
            download.spill.append(Bytes::from_static(b"first bytes"));
            download.progress.send_modify(|p| {
                p.written = 11;
                p.state = FlightState::Streaming;
            });
            let Some(seat) = early else {
                // Too late: no seat from the start (such a client gets a flight of its own).
                assert!(flight.seat().is_none(), "a reader seated after the bytes went");
                continue;
            };
            let mut tail = flight.tail(seat, 0, Some(11));
            match tail.next_chunk(1024).await {
                Some(Ok(tail::Chunk::Memory(bytes))) => assert_eq!(bytes, Bytes::from_static(b"first byte")),
                _ => panic!("the seated reader lost the bytes that came before it read"),
            }
        }
    }

    /// A download that panics lands as failed: its reader gets the error, and the digest is
    /// not wedged (the flight leaves `active`, so the next request starts afresh).
    #[tokio::test]
    async fn a_download_that_panics_lands_as_failed() {
        let dir = tempfile::tempdir().unwrap();
        let (flights, location) = flights(dir.path());
        let key = (Digest::of(b"x"), location, CredentialKind::Own);
        let grant = Grant {
            credential: crate::fetch::Credential::Own,
            clearance: None,
        };
        let (flight, download, _temp) = flights.prepare(&key, Asker::Client, grant).unwrap();
        flights.active.locked().insert(key.clone(), flight.clone());
        let progress = download.progress.clone();
        flights.land_after(key.clone(), progress, flight.clone(), async {
            panic!("an answer nobody foresaw")
        });

        let failed = tokio::time::timeout(Duration::from_secs(5), flight.headers())
            .await
            .expect("the flight never landed")
            .unwrap_err();
        assert!(failed.to_string().contains("an answer nobody foresaw"), "{failed}");
        tokio::time::timeout(Duration::from_secs(5), async {
            while flights.active.locked().contains_key(&key) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the panicked flight stayed in `active`, wedging its digest");
    }

    /// A panic under the flights lock (a bug in one request) must not make every later blob
    /// request panic too.
    #[tokio::test]
    async fn a_panic_under_the_flights_lock_does_not_spread() {
        let dir = tempfile::tempdir().unwrap();
        let registry = prometheus::Registry::new();
        let upstreams = Arc::new(crate::upstream::Upstreams::new(
            crate::upstream::Settings {
                offline: true,
                ..Default::default()
            },
            crate::upstream::Metrics::register(&registry).unwrap(),
        ));
        let authorize = crate::authorize::Authorizer::new(
            upstreams.clone(),
            crate::authorize::Settings::default(),
            crate::authorize::Metrics::register(&registry).unwrap(),
        );
        let flights = Flights::new(
            Arc::new(Store::open(dir.path()).unwrap()),
            Arc::new(Sources::new(upstreams, None)),
            Metrics::register(&registry).unwrap(),
        );
        let active = flights.active.clone();
        let panicked = std::thread::spawn(move || {
            let _held = active.lock().unwrap();
            panic!("a bug while holding the flights lock");
        })
        .join();
        assert!(panicked.is_err() && flights.active.is_poisoned());

        let digest = Digest::of(b"not cached");
        let location = Location::new(
            &crate::oci::Registry::docker_hub(),
            &crate::oci::Repository::parse("library/x").unwrap(),
        );
        let object = crate::authorize::Object::Digest(Resource::Blob, &digest);
        let access = authorize.access(&location, object, crate::authorize::Via::Mirror, None);
        assert!(flights.lookup(&access, &digest).await.unwrap().is_none());
        let offline = flights.get(&access, &digest).await.err().unwrap();
        assert!(offline.to_string().contains("offline"), "{offline}");
    }
}
