//! The content-addressed disk store: `blobs/sha256/<2 hex>/<64 hex>`, temp files in `tmp/` on
//! the same filesystem, manifest media types in `manifests/`, each blob's provenance in
//! `origins/`, and the tag index in `tags/`.
//!
//! A blob appears under its name only through [`Store::commit`], which checks the hash that
//! [`TempBlob`] computed while the bytes were written, fsyncs, renames, and fsyncs the
//! directory. A [`TempBlob`] that is dropped uncommitted deletes its file.

mod budget;
mod index;
mod origins;
mod tags;
mod verify;

use crate::sync::MutexExt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::oci::{Digest, Mismatch, Origin, Provenance};

pub use budget::parse_pins;
pub use budget::{Budget, Evicted, MinFree, keep_within_budget, parse_size};
pub use index::InUse;
pub use origins::parse_record as parse_origins;
pub use tags::{TagIndex, TagKey, TagRecord, entry_file as tag_entry_file, parse_entry as parse_tag_entry};

/// Reads a manifest's media type file: `None` unless it is one (RFC 6838), and so a valid
/// `Content-Type`.
pub fn parse_media_type(bytes: Vec<u8>) -> Option<String> {
    String::from_utf8(bytes)
        .ok()
        .filter(|m| crate::oci::is_valid_media_type(m))
}
pub use verify::Report as VerifyReport;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// An I/O failure inside the store, with what was being done and where.
#[derive(Debug, thiserror::Error)]
#[error("store: {op} {path}: {source}")]
pub struct StoreError {
    op: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl StoreError {
    fn new(op: &'static str, path: &Path, source: io::Error) -> Self {
        StoreError {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// Why a temp blob was not committed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Mismatch(#[from] Mismatch),
    #[error(transparent)]
    Io(#[from] StoreError),
}

/// Bytes of manifests (and their media types) kept in memory, so the hot ones are served
/// without touching the disk.
const HOT_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;

pub struct Store {
    root: PathBuf,
    blobs: PathBuf,
    manifests: PathBuf,
    origins: PathBuf,
    tmp: PathBuf,
    tags: TagIndex,
    next_temp: AtomicU64,
    /// Every committed blob: size, last use, readers.
    index: Arc<index::Index>,
    /// Recently read manifests, by digest. Evicting or quarantining a blob drops it here too.
    hot_manifests: moka::sync::Cache<Digest, (Bytes, String)>,
    /// Recently read provenance records, by digest.
    provenance: moka::sync::Cache<Digest, Provenance>,
    /// Held while a provenance record is read, changed and written.
    recording: std::sync::Mutex<()>,
    budget: Budget,
    /// Woken when free space runs short, or a write found the disk full.
    pressure: tokio::sync::Notify,
    /// Held from making room to the rename, so concurrent commits cannot overshoot the budget
    /// together.
    committing: std::sync::Mutex<()>,
    /// Blobs and bytes evicted since the store opened.
    evicted_blobs: AtomicU64,
    evicted_bytes: AtomicU64,
}

/// A committed blob opened for reading; it is not evicted while this lives.
pub struct Blob {
    pub file: File,
    pub size: u64,
    pub in_use: InUse,
}

impl Store {
    /// Opens (creating if needed) a store under `root`, clears leftover temp files from an
    /// earlier run, and loads the tag index and the blob index. No budget: see
    /// [`Store::with_budget`].
    pub fn open(root: &Path) -> Result<Store> {
        Self::open_with(root, true)
    }

    /// Opens a store that a running pullcache may be serving, as `import` and `export` do:
    /// its temp files are left alone (temp names carry the process id, so they never clash).
    pub fn attach(root: &Path) -> Result<Store> {
        Self::open_with(root, false)
    }

    fn open_with(root: &Path, clear_tmp: bool) -> Result<Store> {
        let blobs = root.join("blobs").join("sha256");
        let manifests = root.join("manifests").join("sha256");
        let origins = root.join("origins").join("sha256");
        let tmp = root.join("tmp");
        let tags_dir = root.join("tags");
        for dir in [&blobs, &manifests, &origins, &tmp, &tags_dir] {
            fs::create_dir_all(dir).map_err(|e| StoreError::new("create", dir, e))?;
        }
        if clear_tmp {
            for entry in fs::read_dir(&tmp).map_err(|e| StoreError::new("list", &tmp, e))? {
                let path = entry.map_err(|e| StoreError::new("list", &tmp, e))?.path();
                // A leftover is never committed, so deleting it loses nothing.
                let _ = fs::remove_file(&path);
            }
        }
        let tags = TagIndex::load(tags_dir, tmp.clone())?;
        let index = Arc::new(index::Index::scan(&blobs)?);
        let hot_manifests = moka::sync::Cache::builder()
            .max_capacity(HOT_MANIFEST_BYTES)
            .weigher(|_, (bytes, media_type): &(Bytes, String)| {
                u32::try_from(bytes.len() + media_type.len()).unwrap_or(u32::MAX)
            })
            .build();
        Ok(Store {
            root: root.to_owned(),
            index,
            hot_manifests,
            provenance: moka::sync::Cache::builder()
                .max_capacity(origins::HOT_RECORD_BYTES)
                .weigher(origins::record_weight)
                .build(),
            recording: std::sync::Mutex::default(),
            budget: Budget::default(),
            pressure: tokio::sync::Notify::new(),
            committing: std::sync::Mutex::default(),
            evicted_blobs: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            blobs,
            manifests,
            origins,
            tmp,
            tags,
            next_temp: AtomicU64::new(0),
        })
    }

    /// Bytes and number of committed blobs.
    pub fn usage(&self) -> (u64, u64) {
        self.index.usage()
    }

    pub fn tags(&self) -> &TagIndex {
        &self.tags
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs.join(&hex[..2]).join(hex)
    }

    fn media_type_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.manifests.join(&hex[..2]).join(hex)
    }

    /// Opens a committed blob for reading, which counts as a use.
    pub fn open_blob(&self, digest: &Digest) -> Result<Option<Blob>> {
        let path = self.blob_path(digest);
        match File::open(&path) {
            Ok(file) => {
                let size = file.metadata().map_err(|e| StoreError::new("stat", &path, e))?.len();
                let in_use = self.index.use_blob(digest, &file, size);
                Ok(Some(Blob { file, size, in_use }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::new("open", &path, e)),
        }
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).exists()
    }

    /// A new temp file that hashes what is written to it.
    pub fn temp_blob(&self) -> Result<TempBlob> {
        let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp.join(format!("{}-{n}", std::process::id()));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(|e| StoreError::new("create", &path, e))?;
        Ok(TempBlob {
            path,
            file,
            hasher: Sha256::new(),
            size: 0,
            committed: false,
        })
    }

    /// Moves a temp blob into the store under `expected`, only if its bytes hash to it (and
    /// have `expected_size`, when known), and records `origin` as where they came from (only
    /// once they verified). Crash-safe: fsync, rename, fsync the directory.
    pub fn commit(
        &self,
        mut temp: TempBlob,
        expected: &Digest,
        expected_size: Option<u64>,
        origin: Option<&Origin>,
    ) -> Result<(), CommitError> {
        let actual = Digest::from_hasher(std::mem::take(&mut temp.hasher));
        Mismatch::check(expected, expected_size, actual, temp.size)?;
        if let Some(origin) = origin {
            self.record_origin(expected, origin)?;
        }
        temp.file
            .sync_all()
            .map_err(|e| StoreError::new("fsync", &temp.path, e))?;
        let dest = self.blob_path(expected);
        let dir = dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir).map_err(|e| StoreError::new("create", dir, e))?;
        {
            let _committing = self.committing.locked();
            if !self.has_blob(expected) {
                self.make_room(temp.size);
            }
            fs::rename(&temp.path, &dest).map_err(|e| StoreError::new("rename", &dest, e))?;
            temp.committed = true;
            self.index.insert(expected, temp.size);
        }
        sync_dir(dir)?;
        if self.over_budget() > 0 {
            self.pressure.notify_one();
        }
        Ok(())
    }

    /// Records a committed blob as a manifest of `media_type`.
    pub fn set_media_type(&self, digest: &Digest, media_type: &str) -> Result<()> {
        write_atomic(&self.tmp, &self.media_type_path(digest), media_type.as_bytes())
    }

    /// Stores a manifest's bytes under its digest, with its media type and `origin` beside it.
    pub fn put_manifest(
        &self,
        digest: &Digest,
        media_type: &str,
        bytes: &[u8],
        origin: Option<&Origin>,
    ) -> Result<(), CommitError> {
        if !self.has_blob(digest) {
            let mut temp = self.temp_blob()?;
            temp.write(bytes)?;
            self.commit(temp, digest, Some(bytes.len() as u64), origin)?;
        } else {
            // The bytes are the digest's (the caller verified them): only the origin is new.
            Mismatch::check(digest, Some(bytes.len() as u64), Digest::of(bytes), bytes.len() as u64)?;
            if let Some(origin) = origin {
                self.record_origin(digest, origin)?;
            }
        }
        // The first media type stays: a later fetch (another registry serving the same bytes
        // with another `Content-Type`) does not relabel the manifest for everyone.
        if self.stored_media_type(digest)?.is_none() {
            self.set_media_type(digest, media_type)?;
        }
        Ok(())
    }

    /// A stored manifest, its bytes and media type: from memory, or read from disk (and kept
    /// in memory).
    pub fn manifest(&self, digest: &Digest) -> Result<Option<(Bytes, String)>> {
        if let Some(found) = self.hot_manifest(digest) {
            return Ok(Some(found));
        }
        let Some(media_type) = self.stored_media_type(digest)? else {
            return Ok(None);
        };
        let path = self.blob_path(digest);
        let bytes = match fs::read(&path) {
            Ok(bytes) => Bytes::from(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::new("read", &path, e)),
        };
        self.record_use(digest);
        // An eviction racing this read may leave the manifest here after its file is gone.
        // That is harmless: the bytes are still the digest's, and memory is bounded.
        self.hot_manifests
            .insert(digest.clone(), (bytes.clone(), media_type.clone()));
        Ok(Some((bytes, media_type)))
    }

    /// The media type stored beside a manifest, if there is a valid one. What is not a media
    /// type (a corrupt file, or one written by hand) is no answer: the manifest is a miss,
    /// fetched again, never a `Content-Type` that cannot be sent.
    fn stored_media_type(&self, digest: &Digest) -> Result<Option<String>> {
        let path = self.media_type_path(digest);
        let media_type = match fs::read(&path) {
            Ok(bytes) => parse_media_type(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::new("read", &path, e)),
        };
        if media_type.is_some() {
            return Ok(media_type);
        }
        tracing::warn!(path = %path.display(), "a stored media type is not one; the manifest counts as not stored");
        Ok(None)
    }

    /// A manifest if it is in memory; never touches the disk, except to move an hour-old
    /// modification time forward.
    pub fn hot_manifest(&self, digest: &Digest) -> Option<(Bytes, String)> {
        let found = self.hot_manifests.get(digest)?;
        self.record_use(digest);
        Some(found)
    }

    /// Records a use of a blob read without a [`Blob`] handle, for the eviction order.
    fn record_use(&self, digest: &Digest) {
        if let Some(now) = self.index.record_use(digest) {
            // Best effort: a failure only costs the order after a restart.
            let _ = File::open(self.blob_path(digest)).and_then(|f| f.set_modified(now));
        }
    }

    /// Forgets a blob kept in memory, once its file is gone.
    fn forget(&self, digest: &Digest) {
        self.hot_manifests.invalidate(digest);
    }

    /// Removes what is kept beside a blob whose file is gone: its media type and provenance.
    fn drop_metadata(&self, digest: &Digest) {
        let _ = fs::remove_file(self.media_type_path(digest));
        self.forget_provenance(digest);
        self.forget(digest);
    }
}

/// Cache size metrics, read from the store at scrape time.
pub struct Metrics {
    bytes: prometheus::IntGauge,
    blobs: prometheus::IntGauge,
    free: prometheus::IntGauge,
    max: prometheus::IntGauge,
    evictions: prometheus::IntCounter,
    evicted_bytes: prometheus::IntCounter,
}

impl Metrics {
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Metrics> {
        let bytes = prometheus::IntGauge::new("pullcache_cache_bytes", "Bytes of blobs in the cache.")?;
        let blobs = prometheus::IntGauge::new(
            "pullcache_cache_blobs",
            "Blobs (layers, configs, manifests) in the cache.",
        )?;
        let free = prometheus::IntGauge::new(
            "pullcache_filesystem_free_bytes",
            "Free bytes on the cache's filesystem (for an unprivileged writer).",
        )?;
        let max = prometheus::IntGauge::new(
            "pullcache_cache_max_bytes",
            "The cache's size budget (--cache-max-size); 0 when it has none.",
        )?;
        // Counters kept by the store, brought up to its count at scrape time.
        let evictions =
            prometheus::IntCounter::new("pullcache_cache_evictions_total", "Blobs evicted from the cache.")?;
        let evicted_bytes = prometheus::IntCounter::new(
            "pullcache_cache_evicted_bytes_total",
            "Bytes of blobs evicted from the cache.",
        )?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(blobs.clone()))?;
        registry.register(Box::new(free.clone()))?;
        registry.register(Box::new(max.clone()))?;
        registry.register(Box::new(evictions.clone()))?;
        registry.register(Box::new(evicted_bytes.clone()))?;
        Ok(Metrics {
            bytes,
            blobs,
            free,
            max,
            evictions,
            evicted_bytes,
        })
    }

    pub fn set_budget(&self, budget: &Budget) {
        self.max
            .set(i64::try_from(budget.max_size.unwrap_or(0)).unwrap_or(i64::MAX));
    }

    /// Sets the gauges from the store.
    pub fn refresh(&self, store: &Store) {
        let (bytes, blobs) = store.usage();
        self.bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.blobs.set(i64::try_from(blobs).unwrap_or(i64::MAX));
        let (blobs, bytes) = store.evicted();
        self.evictions.inc_by(blobs.saturating_sub(self.evictions.get()));
        self.evicted_bytes
            .inc_by(bytes.saturating_sub(self.evicted_bytes.get()));
        if let Some(free) = store.filesystem_free() {
            self.free.set(i64::try_from(free).unwrap_or(i64::MAX));
        }
    }
}

/// Writes a small file by temp file and rename, so readers see the old or the new content.
fn write_atomic(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = dest.parent().expect("destination has a parent");
    fs::create_dir_all(dir).map_err(|e| StoreError::new("create", dir, e))?;
    let tmp = tmp_dir.join(format!(
        "{}-small-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, dest)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::new("write", dest, e));
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::new("fsync", dir, e))
}

/// A blob being written: a temp file plus the running sha256 of what went into it.
/// Dropped without [`Store::commit`], it deletes its file.
pub struct TempBlob {
    path: PathBuf,
    file: File,
    hasher: Sha256,
    size: u64,
    committed: bool,
}

impl TempBlob {
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.file
            .write_all(chunk)
            .map_err(|e| StoreError::new("write", &self.path, e))?;
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
        Ok(())
    }

    /// A second handle on the file for readers tailing it. They read by offset, so the shared
    /// file position does not matter, and the handle stays valid after the rename.
    pub fn reader(&self) -> Result<File> {
        self.file.try_clone().map_err(|e| StoreError::new("dup", &self.path, e))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The digest of what was written so far.
    pub fn digest(&self) -> Digest {
        Digest::from_hasher(self.hasher.clone())
    }

    /// Gives up on the file (deleting it) and keeps the running hash of what it holds.
    pub fn into_hash(mut self) -> (Sha256, u64) {
        (std::mem::take(&mut self.hasher), self.size)
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn commit_only_on_matching_digest() {
        let (_dir, store) = store();
        let good = Digest::of(b"hello");
        let mut temp = store.temp_blob().unwrap();
        temp.write(b"hel").unwrap();
        temp.write(b"lo").unwrap();
        store.commit(temp, &good, Some(5), None).unwrap();
        assert_eq!(store.open_blob(&good).unwrap().unwrap().size, 5);
        assert_eq!(fs::read(store.blob_path(&good)).unwrap(), b"hello");

        let other = Digest::of(b"other");
        let mut temp = store.temp_blob().unwrap();
        temp.write(b"not other").unwrap();
        let err = store.commit(temp, &other, None, None).unwrap_err();
        assert!(matches!(err, CommitError::Mismatch(Mismatch::Digest { .. })), "{err}");
        assert!(store.open_blob(&other).unwrap().is_none());
        assert_eq!(fs::read_dir(&store.tmp).unwrap().count(), 0, "temp file left behind");
    }

    #[test]
    fn usage_is_counted_at_commit_and_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.usage(), (0, 0));
        for content in [&b"abc"[..], b"defgh", b"abc"] {
            let mut temp = store.temp_blob().unwrap();
            temp.write(content).unwrap();
            store.commit(temp, &Digest::of(content), None, None).unwrap();
        }
        assert_eq!(store.usage(), (8, 2), "a blob committed twice counts once");
        assert_eq!(Store::open(dir.path()).unwrap().usage(), (8, 2));
        assert!(store.filesystem_free().unwrap() > 0);
    }

    #[test]
    fn size_mismatch_is_refused() {
        let (_dir, store) = store();
        let mut temp = store.temp_blob().unwrap();
        temp.write(b"hello").unwrap();
        let err = store.commit(temp, &Digest::of(b"hello"), Some(6), None).unwrap_err();
        assert!(matches!(err, CommitError::Mismatch(Mismatch::Size { .. })), "{err}");
        assert!(!store.has_blob(&Digest::of(b"hello")));
    }

    #[test]
    fn dropped_temp_is_deleted_and_leftovers_cleared_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut temp = store.temp_blob().unwrap();
        temp.write(b"partial").unwrap();
        let path = temp.path.clone();
        drop(temp);
        assert!(!path.exists());

        fs::write(dir.path().join("tmp").join("stale"), b"x").unwrap();
        Store::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn manifests_keep_their_media_type() {
        let (_dir, store) = store();
        let body = br#"{"schemaVersion":2}"#;
        let digest = Digest::of(body);
        assert!(store.manifest(&digest).unwrap().is_none());
        store
            .put_manifest(&digest, "application/vnd.oci.image.manifest.v1+json", body, None)
            .unwrap();
        let (bytes, media_type) = store.manifest(&digest).unwrap().unwrap();
        assert_eq!(&bytes[..], body);
        assert_eq!(media_type, "application/vnd.oci.image.manifest.v1+json");
        let err = store.put_manifest(&Digest::of(b"x"), "t", body, None).unwrap_err();
        assert!(matches!(err, CommitError::Mismatch(Mismatch::Digest { .. })));
    }

    /// A media type is data: one that is not (a corrupt file, a control character) makes the
    /// manifest a miss rather than a `Content-Type` that cannot be sent, and a later fetch of
    /// the same bytes with another type does not relabel it.
    #[test]
    fn a_manifests_first_valid_media_type_stays() {
        let (_dir, store) = store();
        let body = br#"{"schemaVersion":2}"#;
        let digest = Digest::of(body);
        store
            .put_manifest(&digest, "application/vnd.oci.image.manifest.v1+json", body, None)
            .unwrap();
        store
            .put_manifest(&digest, "application/vnd.oci.image.index.v1+json", body, None)
            .unwrap();
        let (_, media_type) = store.manifest(&digest).unwrap().unwrap();
        assert_eq!(media_type, "application/vnd.oci.image.manifest.v1+json");

        let other = br#"{"schemaVersion":2,"x":1}"#;
        let other_digest = Digest::of(other);
        store
            .put_manifest(&other_digest, "application/vnd.oci.image.manifest.v1+json", other, None)
            .unwrap();
        fs::write(store.media_type_path(&other_digest), "application/json\u{7}\r\nX: y").unwrap();
        assert!(
            store.manifest(&other_digest).unwrap().is_none(),
            "a corrupt media type was served"
        );
        store
            .put_manifest(&other_digest, "application/vnd.oci.image.manifest.v1+json", other, None)
            .unwrap();
        assert!(
            store.manifest(&other_digest).unwrap().is_some(),
            "a refetch did not repair it"
        );
    }

    #[test]
    fn read_manifests_stay_in_memory_until_their_blob_goes() {
        let (_dir, store) = store();
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}"#;
        let digest = Digest::of(body);
        store
            .put_manifest(&digest, "application/vnd.oci.image.index.v1+json", body, None)
            .unwrap();
        assert!(store.hot_manifest(&digest).is_none(), "nothing is read yet");
        store.manifest(&digest).unwrap().unwrap();

        // From memory now, even with the files gone behind the store's back...
        fs::remove_file(store.blob_path(&digest)).unwrap();
        fs::remove_file(store.media_type_path(&digest)).unwrap();
        let (bytes, media_type) = store.manifest(&digest).unwrap().unwrap();
        assert_eq!(&bytes[..], body);
        assert_eq!(media_type, "application/vnd.oci.image.index.v1+json");

        // ...until the store itself drops the blob.
        store.forget(&digest);
        assert!(store.hot_manifest(&digest).is_none());
        assert!(store.manifest(&digest).unwrap().is_none());
    }
}
