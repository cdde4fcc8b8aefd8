//! The tag index: (registry, repository, tag, accept class) → (digest, media type,
//! fetched-at). It lives in memory and is written through to one small file per entry, so a
//! restarted pullcache still answers tags with the upstream down.

use crate::sync::RwLockExt;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Result, StoreError, write_atomic};
use crate::oci::{AcceptClass, Digest, Registry, Repository, Tag};

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
}

impl Entry {
    fn parse(self) -> Option<(TagKey, TagRecord)> {
        let key = TagKey {
            registry: Registry::parse(&self.registry).ok()?,
            repository: Repository::parse(&self.repository).ok()?,
            tag: Tag::parse(&self.tag).ok()?,
            accept: AcceptClass::from_name(&self.accept)?,
        };
        let record = TagRecord {
            digest: self.digest.parse().ok()?,
            media_type: self.media_type,
            fetched_at: UNIX_EPOCH + Duration::from_secs(self.fetched_at_unix),
        };
        Some((key, record))
    }
}

pub struct TagIndex {
    dir: PathBuf,
    tmp: PathBuf,
    entries: RwLock<HashMap<TagKey, TagRecord>>,
}

impl TagIndex {
    pub(super) fn load(dir: PathBuf, tmp: PathBuf) -> Result<TagIndex> {
        let mut entries = HashMap::new();
        for entry in fs::read_dir(&dir).map_err(|e| StoreError::new("list", &dir, e))? {
            let path = entry.map_err(|e| StoreError::new("list", &dir, e))?.path();
            let parsed = fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Entry>(&bytes).ok())
                .and_then(Entry::parse);
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
        Ok(TagIndex {
            dir,
            tmp,
            entries: RwLock::new(entries),
        })
    }

    /// The record for `key`. One missing from memory is looked for on disk too, where
    /// `import` may have written it while this process was serving.
    pub fn get(&self, key: &TagKey) -> Option<TagRecord> {
        if let Some(record) = self.entries.read_locked().get(key) {
            return Some(record.clone());
        }
        let bytes = fs::read(self.dir.join(key.file_name())).ok()?;
        let (found, record) = serde_json::from_slice::<Entry>(&bytes).ok().and_then(Entry::parse)?;
        if &found != key {
            return None;
        }
        self.entries.write_locked().insert(found, record.clone());
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
        };
        let bytes = serde_json::to_vec(&entry).expect("tag entries serialize");
        write_atomic(&self.tmp, &self.dir.join(key.file_name()), &bytes)?;
        self.entries.write_locked().insert(key, record);
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
}
