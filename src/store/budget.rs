//! The cache's disk budget and eviction. Two high watermarks: the cache's own size
//! (`--cache-max-size`) and the filesystem's free space (`--cache-min-free`). Crossing either
//! evicts least-recently-used blobs down to a low watermark (90% of the size budget, or the
//! free floor plus a tenth). Never evicted: a blob a response is reading, a download in
//! progress (it is not in the store yet), and pinned images with everything they reference.
//! Manifests that cached tags point at go after every other blob.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Store;
use crate::oci::{Digest, ImageRef, Reference, References};

/// Pins saved in the cache directory, one image reference per line.
const PINS_FILE: &str = "pins";

/// The size budget's low watermark, as a fraction of the high one.
const LOW_WATERMARK: f64 = 0.9;
/// How often free space is checked when nothing else wakes the evictor: other writers on
/// the filesystem change it too.
const CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// The most blobs the store keeps by default, whatever their size: a registry serving
/// millions of tiny blobs must not grow the in-memory index (~150 bytes a blob) or the
/// filesystem's inodes without limit. 250,000 is some 10,000 images.
pub const MAX_BLOBS: u64 = 250_000;

#[derive(Debug, Clone)]
pub struct Budget {
    /// The most bytes of blobs the cache keeps.
    pub max_size: Option<u64>,
    /// The most blobs the cache keeps.
    pub max_blobs: u64,
    /// Free space the cache leaves on its filesystem.
    pub min_free: MinFree,
    /// Images kept whatever the pressure.
    pub pins: Vec<ImageRef>,
}

impl Default for Budget {
    fn default() -> Budget {
        Budget {
            max_size: None,
            max_blobs: MAX_BLOBS,
            min_free: MinFree::default(),
            pins: Vec::new(),
        }
    }
}

/// A free-space floor: bytes, or a percentage of the filesystem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    Bytes(u64),
    Percent(f64),
}

impl Default for MinFree {
    fn default() -> Self {
        MinFree::Bytes(0)
    }
}

impl std::str::FromStr for MinFree {
    type Err = String;

    fn from_str(s: &str) -> Result<MinFree, String> {
        MinFree::parse(s)
    }
}

impl MinFree {
    /// `15%`, or a size as [`parse_size`] reads it.
    pub fn parse(s: &str) -> Result<MinFree, String> {
        match s.trim().strip_suffix('%') {
            Some(pct) => match pct.trim().parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => Ok(MinFree::Percent(p)),
                _ => Err(format!("{s:?} is not a percentage between 0% and 100%")),
            },
            None => parse_size(s).map(MinFree::Bytes),
        }
    }

    fn bytes(self, filesystem_size: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (filesystem_size as f64 * p / 100.0) as u64,
        }
    }
}

impl fmt::Display for MinFree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MinFree::Bytes(b) => write!(f, "{b} bytes"),
            MinFree::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Parses a size: a number of bytes with an optional unit, `KiB`/`MiB`/`GiB`/`TiB` (powers of
/// 1024, also `Ki`, `K`...) or `KB`/`MB`/`GB`/`TB` (powers of 1000). `20GiB`, `500M`, `1.5G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 20GiB, 500MB, 1048576)"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "{s:?} has an unknown unit (use KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
            ));
        }
    };
    let bytes = number * multiplier as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(bytes as u64)
}

/// What one eviction pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    pub blobs: u64,
    pub bytes: u64,
    /// Bytes it still needed to free when nothing evictable was left.
    pub short: u64,
}

impl Store {
    pub fn with_budget(mut self, budget: Budget) -> Store {
        self.budget = budget;
        self
    }

    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Free bytes for an unprivileged writer on the store's filesystem, and its size.
    pub fn filesystem_space(&self) -> Option<(u64, u64)> {
        let stat = rustix::fs::statvfs(&self.root).ok()?;
        Some((
            stat.f_bavail.saturating_mul(stat.f_frsize),
            stat.f_blocks.saturating_mul(stat.f_frsize),
        ))
    }

    /// The largest blob the store takes. One past it could be kept only by evicting all the
    /// rest, or not at all: it is passed through and verified, never written, and evicts
    /// nothing. The low watermark of the size budget, and of what the filesystem leaves the
    /// cache above its free-space floor (its own blobs included).
    pub fn largest_blob(&self) -> u64 {
        let by_size = self
            .budget
            .max_size
            .map_or(u64::MAX, |max| (max as f64 * LOW_WATERMARK) as u64);
        let by_space = match self.filesystem_space() {
            Some((free, total)) => {
                let (used, _) = self.usage();
                let room = (free.saturating_add(used)).saturating_sub(self.budget.min_free.bytes(total));
                (room as f64 * LOW_WATERMARK) as u64
            }
            None => u64::MAX,
        };
        by_size.min(by_space)
    }

    /// Free bytes for an unprivileged writer on the store's filesystem.
    pub fn filesystem_free(&self) -> Option<u64> {
        self.filesystem_space().map(|(free, _)| free)
    }

    /// How far past a high watermark the store is now, in bytes; 0 within budget.
    pub fn over_budget(&self) -> u64 {
        self.excess(1.0, 1.0)
    }

    /// Bytes to free to get below both watermarks scaled by these factors.
    fn excess(&self, size_factor: f64, free_factor: f64) -> u64 {
        let (used, _) = self.usage();
        let over_size = self
            .budget
            .max_size
            .map_or(0, |max| used.saturating_sub((max as f64 * size_factor) as u64));
        let short_free = match self.filesystem_space() {
            Some((free, total)) => {
                let floor = self.budget.min_free.bytes(total);
                ((floor as f64 * free_factor) as u64).saturating_sub(free)
            }
            None => 0,
        };
        over_size.max(short_free)
    }

    /// Evicts down to the low watermarks if a high one is crossed.
    pub fn enforce_budget(&self) -> Evicted {
        let blobs = self.blobs_over(0);
        if self.over_budget() == 0 && blobs == 0 {
            return Evicted::default();
        }
        self.evict_until(self.excess(LOW_WATERMARK, 1.0 / LOW_WATERMARK), blobs)
    }

    /// Blobs to evict so `incoming` more fit within the count budget, down to its low
    /// watermark; 0 when they fit.
    fn blobs_over(&self, incoming: u64) -> u64 {
        let (_, blobs) = self.usage();
        let max = self.budget.max_blobs;
        if blobs + incoming <= max {
            return 0;
        }
        (blobs + incoming).saturating_sub((max as f64 * LOW_WATERMARK) as u64)
    }

    /// Before a commit of `incoming` bytes: evicts down to the low watermark if the commit
    /// would cross the size budget, so the store never holds more than its budget.
    pub(super) fn make_room(&self, incoming: u64) {
        let (used, _) = self.usage();
        let bytes = match self.budget.max_size {
            Some(max) if used + incoming > max => {
                let low = (max as f64 * LOW_WATERMARK) as u64;
                (used + incoming).saturating_sub(low)
            }
            _ => 0,
        };
        let blobs = self.blobs_over(1);
        if bytes > 0 || blobs > 0 {
            self.evict_until(bytes, blobs);
        }
    }

    /// Blobs and bytes evicted since the store opened.
    pub fn evicted(&self) -> (u64, u64) {
        (
            self.evicted_blobs.load(Ordering::Relaxed),
            self.evicted_bytes.load(Ordering::Relaxed),
        )
    }

    /// Frees at least `bytes` if it can: least recently used first, manifests of cached tags
    /// last, pinned and in-use blobs never.
    pub fn evict(&self, bytes: u64) -> Evicted {
        self.evict_until(bytes, 0)
    }

    /// Like [`Store::evict`], until both `bytes` and `blobs` are freed.
    fn evict_until(&self, bytes: u64, blobs: u64) -> Evicted {
        let pinned = self.pinned();
        let tagged = self.tags().digests();
        let mut candidates: Vec<_> = self
            .index
            .unused()
            .into_iter()
            .filter(|(digest, _, _)| !pinned.contains(digest))
            .collect();
        candidates.sort_by_key(|(digest, _, used)| (tagged.contains(digest), *used));
        let mut evicted = Evicted::default();
        for (digest, _, _) in candidates {
            if evicted.bytes >= bytes && evicted.blobs >= blobs {
                break;
            }
            // Checked again under the index lock: a reader may have opened it since.
            let Some(size) = self.index.remove_unused(&digest) else {
                continue;
            };
            let path = self.blob_path(&digest);
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "could not evict blob");
                continue;
            }
            self.drop_metadata(&digest);
            evicted.blobs += 1;
            evicted.bytes += size;
        }
        evicted.short = bytes.saturating_sub(evicted.bytes);
        self.evicted_blobs.fetch_add(evicted.blobs, Ordering::Relaxed);
        self.evicted_bytes.fetch_add(evicted.bytes, Ordering::Relaxed);
        if evicted.blobs > 0 {
            let (bytes, blobs) = self.usage();
            tracing::info!(
                evicted = evicted.blobs,
                evicted_bytes = evicted.bytes,
                cache_bytes = bytes,
                cache_blobs = blobs,
                "evicted least recently used blobs"
            );
        }
        evicted
    }

    /// Saves pins in the cache directory: they hold for every later `serve` of it.
    pub fn add_pins(&self, pins: &[ImageRef]) -> super::Result<()> {
        let mut saved = load_pins(&self.root.join(PINS_FILE));
        for pin in pins {
            if !saved.contains(pin) {
                saved.push(pin.clone());
            }
        }
        let text: String = saved.iter().map(|p| format!("{p}\n")).collect();
        super::write_atomic(&self.tmp, &self.root.join(PINS_FILE), text.as_bytes())
    }

    /// Every pin: the budget's and those saved in the cache (read again each time: `import`
    /// may have added some while this process serves).
    pub fn pins(&self) -> Vec<ImageRef> {
        let saved = load_pins(&self.root.join(PINS_FILE));
        self.budget.pins.iter().chain(&saved).cloned().collect()
    }

    /// Every digest the pins reach: their manifests (a tag pin follows whatever the tag
    /// points at now, under any accept class), the manifests an index lists, configs and
    /// layers.
    pub fn pinned(&self) -> HashSet<Digest> {
        let mut queue = Vec::new();
        for pin in &self.pins() {
            match &pin.reference {
                Reference::Digest(d) => queue.push(d.clone()),
                Reference::Tag(tag) => queue.extend(self.tags().matching(&pin.registry, &pin.repository, tag)),
            }
        }
        let mut pinned = HashSet::new();
        while let Some(digest) = queue.pop() {
            if !pinned.insert(digest.clone()) {
                continue;
            }
            let Ok(Some((bytes, _))) = self.manifest(&digest) else {
                continue;
            };
            match References::of(&bytes) {
                Ok(refs) => {
                    queue.extend(refs.manifests.into_iter().map(|m| m.digest));
                    pinned.extend(refs.blobs.into_iter().map(|b| b.digest));
                }
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "pinned manifest cannot be read; its blobs are not pinned")
                }
            }
        }
        pinned
    }

    /// Wakes the evictor: a write found the disk full.
    pub fn report_full_disk(&self) {
        self.pressure.notify_one();
    }
}

/// Reads saved pins.
fn load_pins(path: &std::path::Path) -> Vec<ImageRef> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    parse_pins(&String::from_utf8_lossy(&bytes))
}

/// Reads the pins file: one image reference a line; a line that does not parse is skipped
/// with a warning.
pub fn parse_pins(text: &str) -> Vec<ImageRef> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|line| match ImageRef::parse(line.trim()) {
            Ok(pin) => Some(pin),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a saved pin");
                None
            }
        })
        .collect()
}

/// Keeps the store within its budget until the task is dropped: at start, whenever a write
/// finds the disk full or a commit leaves free space short, and every 10 s.
/// (Commits keep to the size budget themselves.)
pub async fn keep_within_budget(store: Arc<Store>) {
    let mut was_short = false;
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            tokio::select! {
                () = store.pressure.notified() => {}
                () = tokio::time::sleep(CHECK_INTERVAL) => {}
            }
        }
        let s = store.clone();
        let Ok(evicted) = tokio::task::spawn_blocking(move || s.enforce_budget()).await else {
            continue;
        };
        let short = evicted.short > 0;
        if short && !was_short {
            tracing::warn!(
                short_bytes = evicted.short,
                budget = ?store.budget.max_size,
                min_free = %store.budget.min_free,
                "cache is over budget and everything left is pinned or in use"
            );
        }
        was_short = short;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{TagKey, TagRecord};

    #[test]
    fn sizes_and_floors_parse() {
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size(" 1048576 "), Ok(1 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        for bad in ["", "GiB", "10 parsecs", "-5G", "1e400", "1.2.3M"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(MinFree::parse("15%"), Ok(MinFree::Percent(15.0)));
        assert_eq!(MinFree::parse("2GiB"), Ok(MinFree::Bytes(2 << 30)));
        assert!(MinFree::parse("101%").is_err());
        assert_eq!(MinFree::Percent(10.0).bytes(1000), 100);
    }

    fn put(store: &Store, content: &[u8]) -> Digest {
        let digest = Digest::of(content);
        let mut temp = store.temp_blob().unwrap();
        temp.write(content).unwrap();
        store.commit(temp, &digest, None, None).unwrap();
        digest
    }

    /// A registry serving many tiny blobs fills the store to its count budget and no
    /// further, whatever the size budget says; the newest stay.
    #[test]
    fn the_blob_count_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap().with_budget(Budget {
            max_blobs: 20,
            ..Budget::default()
        });
        let mut last = None;
        for i in 0..100u32 {
            last = Some(put(&store, &i.to_be_bytes()));
            assert!(store.usage().1 <= 20, "{} blobs after {i}", store.usage().1);
        }
        assert!(
            store.usage().1 >= 15,
            "{} blobs: eviction took too many",
            store.usage().1
        );
        assert!(store.has_blob(&last.unwrap()));
        assert_eq!(store.evicted().0 + store.usage().1, 100);
    }

    #[test]
    fn evicts_least_recently_used_down_to_the_low_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap().with_budget(Budget {
            max_size: Some(1000),
            ..Budget::default()
        });
        let blobs: Vec<Digest> = (0..10u8)
            .map(|i| {
                // Last use is kept in milliseconds: one apart, the order is certain.
                std::thread::sleep(Duration::from_millis(2));
                put(&store, &[i; 100])
            })
            .collect();
        assert_eq!(store.over_budget(), 0, "exactly at the budget is within it");
        // Use the oldest one: it becomes the most recent.
        std::thread::sleep(Duration::from_millis(5));
        drop(store.open_blob(&blobs[0]).unwrap().unwrap());
        std::thread::sleep(Duration::from_millis(5));
        let reading = store.open_blob(&blobs[1]).unwrap().unwrap();
        // The commit makes room first: the store never holds more than its budget.
        let newest = put(&store, &[42; 100]);
        assert_eq!(store.evicted(), (2, 200), "down to 90% of 1000");
        assert!(store.has_blob(&blobs[0]), "a recently used blob was evicted");
        assert!(store.has_blob(&blobs[1]), "a blob being read was evicted");
        assert!(!store.has_blob(&blobs[2]) && !store.has_blob(&blobs[3]));
        assert!(store.has_blob(&newest));
        assert_eq!(store.usage(), (900, 9));
        drop(reading);

        // Reopened with a smaller budget, the first check brings it down.
        let store = Store::open(dir.path()).unwrap().with_budget(Budget {
            max_size: Some(500),
            ..Budget::default()
        });
        assert_eq!(store.over_budget(), 400);
        let evicted = store.enforce_budget();
        assert_eq!(
            evicted,
            Evicted {
                blobs: 5,
                bytes: 500,
                short: 0
            },
            "down to 90% of 500"
        );
        assert_eq!(store.usage(), (400, 4));
        assert!(store.has_blob(&newest), "the newest blob went before older ones");
    }

    #[test]
    fn a_free_space_floor_evicts_what_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap().with_budget(Budget {
            // More free space than any disk has: everything unpinned must go.
            min_free: MinFree::Bytes(u64::MAX / 2),
            ..Budget::default()
        });
        for i in 0..3u8 {
            put(&store, &[i; 10]);
        }
        assert!(store.over_budget() > 0);
        let evicted = store.enforce_budget();
        assert_eq!((evicted.blobs, evicted.bytes), (3, 30));
        assert!(evicted.short > 0, "the floor cannot be met, and it says so");
        assert_eq!(store.usage(), (0, 0));

        let roomy = Store::open(dir.path()).unwrap().with_budget(Budget {
            min_free: MinFree::Percent(0.0),
            ..Budget::default()
        });
        put(&roomy, b"kept");
        assert_eq!(roomy.enforce_budget(), Evicted::default());
    }

    #[test]
    fn tagged_manifests_go_last_and_pins_stay() {
        let dir = tempfile::tempdir().unwrap();
        let layer = put(&Store::open(dir.path()).unwrap(), b"pinned layer");
        let config = Digest::of(b"{}");
        let manifest =
            format!(r#"{{"schemaVersion":2,"config":{{"digest":"{config}"}},"layers":[{{"digest":"{layer}"}}]}}"#);
        let manifest_digest = Digest::of(manifest.as_bytes());
        let registry = crate::oci::Registry::parse("r.example").unwrap();
        let repository = crate::oci::Repository::parse("app").unwrap();
        let pin = ImageRef::parse("r.example/app:v1").unwrap();
        let store = Store::open(dir.path()).unwrap().with_budget(Budget {
            pins: vec![pin],
            ..Budget::default()
        });
        put(&store, b"{}");
        store
            .put_manifest(
                &manifest_digest,
                "application/vnd.oci.image.manifest.v1+json",
                manifest.as_bytes(),
                None,
            )
            .unwrap();
        let tagged = Digest::of(b"tagged manifest");
        store
            .put_manifest(
                &tagged,
                "application/vnd.oci.image.manifest.v1+json",
                b"tagged manifest",
                None,
            )
            .unwrap();
        for (tag, digest) in [("v1", &manifest_digest), ("v2", &tagged)] {
            let key = TagKey {
                registry: registry.clone(),
                repository: repository.clone(),
                tag: crate::oci::Tag::parse(tag).unwrap(),
                accept: crate::oci::AcceptClass::all(),
            };
            let record = TagRecord {
                digest: digest.clone(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                fetched_at: std::time::SystemTime::now(),
                imported: false,
            };
            store.tags().put(key, record).unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
        let plain = put(&store, b"plain blob, newest of all");

        assert_eq!(store.pinned().len(), 3, "manifest, config and layer");
        let evicted = store.evict(1);
        assert_eq!(evicted.blobs, 1);
        assert!(
            !store.has_blob(&plain),
            "an untagged blob goes before a tagged manifest"
        );
        let evicted = store.evict(u64::MAX);
        assert_eq!(evicted.blobs, 1, "only the tagged, unpinned manifest was left");
        assert!(store.manifest(&tagged).unwrap().is_none());
        assert!(evicted.short > 0);
        for kept in [&layer, &config, &manifest_digest] {
            assert!(store.has_blob(kept), "pinned {kept} was evicted");
        }

        // A pin saved in the cache holds for the next opening, without any --pin.
        let saved = ImageRef::parse("r.example/app:v1").unwrap();
        store.add_pins(std::slice::from_ref(&saved)).unwrap();
        store.add_pins(std::slice::from_ref(&saved)).unwrap();
        drop(store);
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(reopened.pins(), vec![saved]);
        assert_eq!(reopened.evict(u64::MAX).blobs, 0);
        assert!(reopened.has_blob(&layer));
    }
}
