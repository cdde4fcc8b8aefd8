//! The in-memory index of committed blobs: each one's size, when it was last used and how many
//! readers hold it open. Eviction picks from it. It is rebuilt at start from a directory scan
//! (file sizes and modification times, nothing re-hashed), and a blob's modification time is
//! moved forward when it is used, at most once an hour, so the order survives restarts.

use crate::sync::MutexExt;
use std::collections::HashMap;
use std::fs::{self, File};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Result, StoreError};
use crate::oci::Digest;

/// How stale a blob's modification time may get before a use writes it again.
const TOUCH_INTERVAL: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    pub size: u64,
    /// Last use, in milliseconds since the epoch.
    pub used: u64,
    /// The modification time on disk, in the same unit.
    touched: u64,
    pub readers: u32,
}

#[derive(Default)]
pub(super) struct Index {
    entries: Mutex<Entries>,
}

/// The blobs, with their total size kept alongside.
#[derive(Default)]
struct Entries {
    map: HashMap<Digest, Entry>,
    bytes: u64,
}

impl Entries {
    fn insert(&mut self, digest: Digest, entry: Entry) -> &mut Entry {
        self.bytes += entry.size;
        self.map.entry(digest).or_insert(entry)
    }

    fn remove(&mut self, digest: &Digest) -> Option<u64> {
        let size = self.map.remove(digest)?.size;
        self.bytes -= size;
        Some(size)
    }
}

/// Keeps a blob from being evicted while a response reads it. Dropping it releases the blob.
pub struct InUse {
    index: Arc<Index>,
    digest: Digest,
}

impl Drop for InUse {
    fn drop(&mut self) {
        if let Some(entry) = self.index.lock().map.get_mut(&self.digest) {
            entry.readers = entry.readers.saturating_sub(1);
        }
    }
}

impl Index {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.locked()
    }

    /// Builds the index from `blobs/sha256/<2 hex>/<64 hex>`. Files whose names are not
    /// digests are left out (`verify` deals with them).
    pub fn scan(blobs: &Path) -> Result<Index> {
        let mut entries = Entries::default();
        for prefix in fs::read_dir(blobs).map_err(|e| StoreError::new("list", blobs, e))? {
            let prefix = prefix.map_err(|e| StoreError::new("list", blobs, e))?.path();
            let Ok(files) = fs::read_dir(&prefix) else {
                continue;
            };
            for file in files.flatten() {
                let name = file.file_name();
                let Some(digest) = name.to_str().and_then(|n| format!("sha256:{n}").parse::<Digest>().ok()) else {
                    continue;
                };
                let Ok(meta) = file.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let mtime = meta.modified().map_or(0, millis);
                entries.insert(
                    digest,
                    Entry {
                        size: meta.len(),
                        used: mtime,
                        touched: mtime,
                        readers: 0,
                    },
                );
            }
        }
        Ok(Index {
            entries: Mutex::new(entries),
        })
    }

    /// Bytes and number of indexed blobs.
    pub fn usage(&self) -> (u64, u64) {
        let entries = self.lock();
        (entries.bytes, entries.map.len() as u64)
    }

    /// Records a commit. Returns false when the blob was already there.
    pub fn insert(&self, digest: &Digest, size: u64) -> bool {
        let now = millis(SystemTime::now());
        let mut entries = self.lock();
        if let Some(entry) = entries.map.get_mut(digest) {
            entry.used = now;
            return false;
        }
        entries.insert(
            digest.clone(),
            Entry {
                size,
                used: now,
                touched: now,
                readers: 0,
            },
        );
        true
    }

    /// Records a use of an opened blob and holds it until the guard drops. Moves the file's
    /// modification time forward when it is more than [`TOUCH_INTERVAL`] old.
    pub fn use_blob(self: &Arc<Self>, digest: &Digest, file: &File, size: u64) -> InUse {
        let now = SystemTime::now();
        let now_ms = millis(now);
        let touch = {
            let mut entries = self.lock();
            // A blob committed by another process (or before an index existed) joins here.
            let entry = match entries.map.get_mut(digest) {
                Some(entry) => entry,
                None => entries.insert(
                    digest.clone(),
                    Entry {
                        size,
                        used: now_ms,
                        touched: now_ms,
                        readers: 0,
                    },
                ),
            };
            entry.used = now_ms;
            entry.readers += 1;
            let stale = now_ms.saturating_sub(entry.touched) > TOUCH_INTERVAL.as_millis() as u64;
            if stale {
                entry.touched = now_ms;
            }
            stale
        };
        if touch {
            // Best effort: a failure only costs the order after a restart.
            let _ = file.set_modified(now);
        }
        InUse {
            index: self.clone(),
            digest: digest.clone(),
        }
    }

    /// Records a use of a blob read without opening a handle (a manifest from memory).
    /// Returns the time to write as its modification time when that is more than
    /// [`TOUCH_INTERVAL`] old.
    pub fn record_use(&self, digest: &Digest) -> Option<SystemTime> {
        let now = SystemTime::now();
        let now_ms = millis(now);
        let mut entries = self.lock();
        let entry = entries.map.get_mut(digest)?;
        entry.used = now_ms;
        if now_ms.saturating_sub(entry.touched) > TOUCH_INTERVAL.as_millis() as u64 {
            entry.touched = now_ms;
            return Some(now);
        }
        None
    }

    /// Removes a blob that nobody reads. Returns its size, or `None` if it is in use or gone.
    pub fn remove_unused(&self, digest: &Digest) -> Option<u64> {
        let mut entries = self.lock();
        match entries.map.get(digest) {
            Some(entry) if entry.readers == 0 => entries.remove(digest),
            _ => None,
        }
    }

    /// Removes a blob whatever its readers (it was found corrupt).
    pub fn remove(&self, digest: &Digest) -> Option<u64> {
        self.lock().remove(digest)
    }

    /// Eviction candidates: every blob nobody reads, with its size and last use.
    pub fn unused(&self) -> Vec<(Digest, u64, u64)> {
        self.lock()
            .map
            .iter()
            .filter(|(_, e)| e.readers == 0)
            .map(|(d, e)| (d.clone(), e.size, e.used))
            .collect()
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_hold_blobs_and_uses_touch_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let digest = Digest::of(b"x");
        let prefix = dir.path().join(&digest.hex()[..2]);
        fs::create_dir_all(&prefix).unwrap();
        let path = prefix.join(digest.hex());
        fs::write(&path, b"x").unwrap();
        fs::write(prefix.join("not-a-digest"), b"junk").unwrap();
        let old = SystemTime::now() - Duration::from_secs(7200);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();

        let index = Arc::new(Index::scan(dir.path()).unwrap());
        assert_eq!(index.usage(), (1, 1), "only digest-named files are indexed");
        let file = File::open(&path).unwrap();
        let guard = index.use_blob(&digest, &file, 1);
        assert_eq!(index.remove_unused(&digest), None, "a blob being read was removable");
        assert!(index.unused().is_empty());
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();
        assert!(mtime > old + Duration::from_secs(3600), "use did not touch the file");
        drop(guard);
        assert_eq!(index.unused().len(), 1);
        assert_eq!(index.remove_unused(&digest), Some(1));
        assert_eq!(index.usage(), (0, 0));
    }
}
