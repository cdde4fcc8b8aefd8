//! The tag index: (registry, repository, tag, accept class) → (digest, media type,
//! fetched-at). It lives in memory and is written through to one small file per entry, so a
//! restarted pullcache still answers tags with the upstream down. Entries learnt from
//! upstreams are bounded by [`MAX_TAGS`], oldest answer first out; imported ones are the
//! operator's and stay.

use crate::sync::RwLockExt;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Result, StoreError, write_atomic};
use crate::oci::{AcceptClass, Digest, Registry, Repository, Tag, is_valid_media_type};

/// Most tag answers from upstreams kept (each well under 1 KiB in memory, one small file on
/// disk): a registry that answers every tag name cannot grow the node past this.
pub const MAX_TAGS: usize = 20_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TagKey {
    pub registry: Registry,
    pub repository: Repository,
    pub tag: Tag,
    pub accept: AcceptClass,
}

impl TagKey {
    /// A file name for the entry. The parts are validated names, but hashing keeps the layout
    /// flat and the name length fixed.
    fn file_name(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            self.registry.as_str(),
            self.repository.as_str(),
            self.tag.as_str(),
            self.accept.as_str(),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        format!("{}.json", hex::encode(h.finalize()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRecord {
    pub digest: Digest,
    pub media_type: String,
    pub fetched_at: SystemTime,
    /// Written by `pullcache import`: never evicted to make room (an air-gapped node could not
    /// learn it again).
    pub imported: bool,
}

impl TagRecord {
    pub fn age(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.fetched_at)
            .unwrap_or(Duration::ZERO)
    }
}

/// The persisted form of one entry.
#[derive(Serialize, Deserialize)]
struct Entry {
    registry: String,
    repository: String,
    tag: String,
    accept: String,
    digest: String,
    media_type: String,
    fetched_at_unix: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    imported: bool,
}

impl Entry {
    fn parse(self) -> Option<(TagKey, TagRecord)> {
        let key = TagKey {
            registry: Registry::parse(&self.registry).ok()?,
            repository: Repository::parse(&self.repository).ok()?,
            tag: Tag::parse(&self.tag).ok()?,
            accept: AcceptClass::from_name(&self.accept)?,
        };
        if !is_valid_media_type(&self.media_type) {
            return None;
        }
        let record = TagRecord {
            digest: self.digest.parse().ok()?,
            media_type: self.media_type,
            fetched_at: UNIX_EPOCH.checked_add(Duration::from_secs(self.fetched_at_unix))?,
            imported: self.imported,
        };
        Some((key, record))
    }
}

/// Reads one entry's file: `None` for anything that is not a whole, valid entry.
pub fn parse_entry(bytes: &[u8]) -> Option<(TagKey, TagRecord)> {
    serde_json::from_slice::<Entry>(bytes).ok()?.parse()
}

/// An entry's file, as [`TagIndex::put`] writes it.
pub fn entry_file(key: &TagKey, record: &TagRecord) -> Vec<u8> {
    let entry = Entry {
        registry: key.registry.to_string(),
        repository: key.repository.to_string(),
        tag: key.tag.to_string(),
        accept: key.accept.as_str().to_owned(),
        digest: record.digest.to_string(),
        media_type: record.media_type.clone(),
        fetched_at_unix: record
            .fetched_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs(),
        imported: record.imported,
    };
    serde_json::to_vec(&entry).expect("tag entries serialize")
}

pub struct TagIndex {
    dir: PathBuf,
    tmp: PathBuf,
    entries: RwLock<HashMap<TagKey, TagRecord>>,
    /// Most entries from upstreams; [`MAX_TAGS`] but in tests.
    limit: usize,
}

impl TagIndex {
    pub(super) fn load(dir: PathBuf, tmp: PathBuf) -> Result<TagIndex> {
        Self::load_with_limit(dir, tmp, MAX_TAGS)
    }

    pub(super) fn load_with_limit(dir: PathBuf, tmp: PathBuf, limit: usize) -> Result<TagIndex> {
        let mut entries = HashMap::new();
        for entry in fs::read_dir(&dir).map_err(|e| StoreError::new("list", &dir, e))? {
            let path = entry.map_err(|e| StoreError::new("list", &dir, e))?.path();
            let parsed = fs::read(&path).ok().and_then(|bytes| parse_entry(&bytes));
            match parsed {
                Some((key, record)) => {
                    entries.insert(key, record);
                }
                None => {
                    tracing::warn!(path = %path.display(), "dropping unreadable tag index entry");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        let index = TagIndex {
            dir,
            tmp,
            entries: RwLock::new(entries),
            limit,
        };
        index.make_room(&mut index.entries.write_locked(), 0);
        Ok(index)
    }

    /// Evicts the oldest answers from upstreams until `incoming` more fit within the limit,
    /// and a tenth of the limit besides, so a registry answering every tag name pays for the
    /// sort once per many inserts. Their files go too, or the next start would load them.
    fn make_room(&self, entries: &mut HashMap<TagKey, TagRecord>, incoming: usize) {
        let learnt = entries.values().filter(|r| !r.imported).count();
        if learnt + incoming <= self.limit {
            return;
        }
        let excess = learnt + incoming - self.limit + self.limit / 10;
        let mut oldest: Vec<(SystemTime, TagKey)> = entries
            .iter()
            .filter(|(_, r)| !r.imported)
            .map(|(k, r)| (r.fetched_at, k.clone()))
            .collect();
        oldest.sort_unstable_by_key(|(fetched_at, _)| *fetched_at);
        for (_, key) in oldest.into_iter().take(excess) {
            entries.remove(&key);
            let path = self.dir.join(key.file_name());
            if let Err(e) = fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "could not remove an evicted tag entry");
            }
        }
        tracing::debug!(
            evicted = excess,
            limit = self.limit,
            "tag index full; oldest answers evicted"
        );
    }

    /// The record for `key`. One missing from memory is looked for on disk too, where
    /// `import` may have written it while this process was serving.
    pub fn get(&self, key: &TagKey) -> Option<TagRecord> {
        if let Some(record) = self.entries.read_locked().get(key) {
            return Some(record.clone());
        }
        let bytes = fs::read(self.dir.join(key.file_name())).ok()?;
        let (found, record) = parse_entry(&bytes)?;
        if &found != key {
            return None;
        }
        let mut entries = self.entries.write_locked();
        if !record.imported {
            self.make_room(&mut entries, 1);
        }
        entries.insert(found, record.clone());
        Some(record)
    }

    /// Answers recorded for the same tag under other accept classes whose media type a client
    /// of `key.accept` takes, newest first. They stand in when the upstream cannot be asked.
    pub fn compatible(&self, key: &TagKey) -> Vec<TagRecord> {
        let entries = self.entries.read_locked();
        let mut found: Vec<TagRecord> = entries
            .iter()
            .filter(|(k, r)| {
                k.registry == key.registry
                    && k.repository == key.repository
                    && k.tag == key.tag
                    && key.accept.accepts(&r.media_type)
            })
            .map(|(_, r)| r.clone())
            .collect();
        found.sort_by_key(|r| std::cmp::Reverse(r.fetched_at));
        found
    }

    /// Records an answer, on disk first and then in memory.
    pub fn put(&self, key: TagKey, record: TagRecord) -> Result<()> {
        let bytes = entry_file(&key, &record);
        let mut entries = self.entries.write_locked();
        if !record.imported && !entries.contains_key(&key) {
            self.make_room(&mut entries, 1);
        }
        write_atomic(&self.tmp, &self.dir.join(key.file_name()), &bytes)?;
        entries.insert(key, record);
        Ok(())
    }

    /// The digests every cached tag points at.
    pub fn digests(&self) -> HashSet<Digest> {
        let entries = self.entries.read_locked();
        entries.values().map(|r| r.digest.clone()).collect()
    }

    /// What a tag points at, under every accept class it was asked with.
    pub fn matching(&self, registry: &Registry, repository: &Repository, tag: &Tag) -> Vec<Digest> {
        let entries = self.entries.read_locked();
        entries
            .iter()
            .filter(|(k, _)| &k.registry == registry && &k.repository == repository && &k.tag == tag)
            .map(|(_, r)| r.digest.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.read_locked().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::super::Store;
    use super::*;

    fn key(tag: &str) -> TagKey {
        TagKey {
            registry: Registry::parse("registry.test:5000").unwrap(),
            repository: Repository::parse("team/app").unwrap(),
            tag: Tag::parse(tag).unwrap(),
            accept: AcceptClass::all(),
        }
    }

    #[test]
    fn survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let record = TagRecord {
            digest: Digest::of(b"m"),
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            fetched_at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            imported: false,
        };
        {
            let store = Store::open(dir.path()).unwrap();
            store.tags().put(key("v1"), record.clone()).unwrap();
            assert_eq!(store.tags().get(&key("v1")), Some(record.clone()));
            assert_eq!(store.tags().get(&key("v2")), None);
        }
        fs::write(dir.path().join("tags").join("garbage.json"), b"{not json").unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.tags().len(), 1);
        assert_eq!(store.tags().get(&key("v1")), Some(record));
        assert!(!dir.path().join("tags").join("garbage.json").exists());
    }

    #[test]
    fn compatible_answers_match_the_media_type() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let record = TagRecord {
            digest: Digest::of(b"m"),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            fetched_at: SystemTime::now(),
            imported: false,
        };
        store.tags().put(key("v1"), record.clone()).unwrap();
        let narrow = |accept: &str| TagKey {
            accept: AcceptClass::from_name(accept).unwrap(),
            ..key("v1")
        };
        assert_eq!(store.tags().compatible(&narrow("oci")), vec![record]);
        assert!(store.tags().compatible(&narrow("docker")).is_empty());
        assert!(store.tags().compatible(&TagKey { ..key("v2") }).is_empty());
    }

    /// A registry answering every tag name fills the index to its limit and no further, in
    /// memory and on disk, oldest answer out first; imported tags stay; a restart finds the
    /// same bound.
    #[test]
    fn answers_from_upstreams_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (tags, tmp) = (dir.path().join("tags"), dir.path().join("tmp"));
        fs::create_dir_all(&tags).unwrap();
        fs::create_dir_all(&tmp).unwrap();
        let record = |n: u64, imported| TagRecord {
            digest: Digest::of(&n.to_be_bytes()),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            fetched_at: UNIX_EPOCH + Duration::from_secs(1_700_000_000 + n),
            imported,
        };
        let index = TagIndex::load_with_limit(tags.clone(), tmp.clone(), 100).unwrap();
        index.put(key("imported"), record(0, true)).unwrap();
        for n in 1..=1000 {
            index.put(key(&format!("t{n}")), record(n, false)).unwrap();
            assert!(index.len() <= 101, "{} entries after {n}", index.len());
        }
        let files = || fs::read_dir(&tags).unwrap().count();
        assert_eq!(files(), index.len());
        assert!(index.len() >= 90, "{} entries: eviction took too many", index.len());
        assert_eq!(index.get(&key("t1000")), Some(record(1000, false)), "the newest stays");
        assert_eq!(index.get(&key("t1")), None, "the oldest went");
        assert_eq!(index.get(&key("imported")), Some(record(0, true)));
        drop(index);
        let reopened = TagIndex::load_with_limit(tags.clone(), tmp, 50).unwrap();
        assert!(reopened.len() <= 51, "{} entries after a restart", reopened.len());
        assert_eq!(files(), reopened.len());
        assert_eq!(reopened.get(&key("imported")), Some(record(0, true)));
    }

    /// A tag file is data: a media type that is not one, or a time past what the clock can
    /// hold (which once panicked at start), makes it unreadable, and it is dropped.
    #[test]
    fn an_entry_out_of_range_is_dropped() {
        let entry = |media_type: &str, fetched_at_unix| Entry {
            registry: "registry.test".into(),
            repository: "team/app".into(),
            tag: "v1".into(),
            accept: AcceptClass::all().as_str().into(),
            digest: Digest::of(b"m").to_string(),
            media_type: media_type.into(),
            fetched_at_unix,
            imported: false,
        };
        let oci = "application/vnd.oci.image.manifest.v1+json";
        assert!(entry(oci, 1_700_000_000).parse().is_some());
        assert!(entry("text/html\r\nx: y", 1_700_000_000).parse().is_none());
        assert!(entry(oci, u64::MAX).parse().is_none());
    }
}
