//! Each blob's [`Provenance`] on disk: `origins/<2 hex>/<64 hex>`, one small JSON file per
//! blob. [`Store::commit`] writes it after the bytes verified and before the blob's rename, so
//! a committed blob has its record, and a crash between the two leaves a record for no blob
//! (harmless) rather than a blob with none. It goes with the blob when the blob is evicted or
//! quarantined. A record that is missing or unreadable is unknown provenance: private to
//! nobody.

use crate::sync::MutexExt;
use std::fs;
use std::io;

use serde::{Deserialize, Serialize};

use super::{Result, Store, StoreError, write_atomic};
use crate::oci::{Digest, Location, MAX_PRIVATE_ORIGINS, Origin, Provenance, Registry, Repository, Visibility};

/// Bytes of records kept in memory (a public record costs ~150; one private to the most
/// origins a few KiB); the least used go, to be read again from disk.
pub const HOT_RECORD_BYTES: u64 = 16 * 1024 * 1024;

/// What a record costs in memory: its digest key, its names and moka's bookkeeping.
pub(super) fn record_weight(_: &Digest, provenance: &Provenance) -> u32 {
    let names: usize = provenance
        .private
        .iter()
        .map(|(l, _)| l.registry.as_str().len() + l.repository.as_str().len() + 64)
        .sum();
    u32::try_from(150 + names).unwrap_or(u32::MAX)
}

/// Reads a record's file. Origins that do not parse are skipped, and at most
/// [`MAX_PRIVATE_ORIGINS`] are kept.
pub fn parse_record(bytes: &[u8]) -> serde_json::Result<Provenance> {
    Ok(serde_json::from_slice::<Record>(bytes)?.parse())
}

/// The persisted form.
#[derive(Serialize, Deserialize, Default)]
struct Record {
    public: bool,
    /// `[registry, repository, "private" | "client"]`.
    #[serde(default)]
    private: Vec<(String, String, String)>,
}

impl Record {
    fn parse(self) -> Provenance {
        let private = self
            .private
            .into_iter()
            .filter_map(|(registry, repository, visibility)| {
                let location = Location {
                    registry: Registry::parse(&registry).ok()?,
                    repository: Repository::parse(&repository).ok()?,
                };
                let visibility = Visibility::parse(&visibility).filter(|v| *v != Visibility::Public)?;
                Some((location, visibility))
            })
            .take(MAX_PRIVATE_ORIGINS)
            .collect();
        Provenance {
            public: self.public,
            private,
        }
    }

    fn of(provenance: &Provenance) -> Record {
        Record {
            public: provenance.public,
            private: provenance
                .private
                .iter()
                .map(|(l, v)| (l.registry.to_string(), l.repository.to_string(), v.as_str().to_owned()))
                .collect(),
        }
    }
}

impl Store {
    fn origins_path(&self, digest: &Digest) -> std::path::PathBuf {
        let hex = digest.hex();
        self.origins.join(&hex[..2]).join(hex)
    }

    /// Where a stored digest's bytes came from; unknown provenance when nothing was recorded.
    pub fn provenance(&self, digest: &Digest) -> Provenance {
        if let Some(known) = self.provenance.get(digest) {
            return known;
        }
        let provenance = self.read_provenance(digest);
        self.provenance.insert(digest.clone(), provenance.clone());
        provenance
    }

    fn read_provenance(&self, digest: &Digest) -> Provenance {
        let path = self.origins_path(digest);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Provenance::default(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read a blob's origins; it counts as private to nobody");
                return Provenance::default();
            }
        };
        match parse_record(&bytes) {
            Ok(provenance) => provenance,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "a blob's origins are corrupt; it counts as private to nobody");
                Provenance::default()
            }
        }
    }

    /// Adds `origin` to a digest's record, on disk and in memory.
    pub fn record_origin(&self, digest: &Digest, origin: &Origin) -> Result<()> {
        let _recording = self.recording.locked();
        let mut provenance = self.provenance(digest);
        if !provenance.add(origin) {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&Record::of(&provenance))
            .map_err(|e| StoreError::new("encode", &self.origins_path(digest), io::Error::other(e)))?;
        write_atomic(&self.tmp, &self.origins_path(digest), &bytes)?;
        self.provenance.insert(digest.clone(), provenance);
        Ok(())
    }

    /// Removes a digest's record, with its blob.
    pub(super) fn forget_provenance(&self, digest: &Digest) {
        let _recording = self.recording.locked();
        let _ = fs::remove_file(self.origins_path(digest));
        self.provenance.invalidate(digest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(repository: &str) -> Location {
        Location::new(
            &Registry::parse("reg.test").unwrap(),
            &Repository::parse(repository).unwrap(),
        )
    }

    fn origin(repository: &str, visibility: Visibility) -> Origin {
        Origin::new(&at(repository), visibility)
    }

    #[test]
    fn provenance_survives_a_restart_and_goes_with_its_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = Digest::of(b"layer");
        let alice = origin("team-a/app", Visibility::Private);
        let mut temp = store.temp_blob().unwrap();
        temp.write(b"layer").unwrap();
        store.commit(temp, &digest, Some(5), Some(&alice)).unwrap();
        assert!(store.provenance(&digest).is_private_to(&at("team-a/app")));

        let reopened = Store::open(dir.path()).unwrap();
        let provenance = reopened.provenance(&digest);
        assert!(provenance.is_private_to(&at("team-a/app")), "{provenance:?}");
        assert!(!provenance.serves(&at("team-b/app")));

        // Wrong bytes record nothing.
        let other = Digest::of(b"other");
        let mut temp = reopened.temp_blob().unwrap();
        temp.write(b"not other").unwrap();
        let public = origin("evil/app", Visibility::Public);
        assert!(reopened.commit(temp, &other, None, Some(&public)).is_err());
        assert_eq!(reopened.provenance(&other), Provenance::default());

        reopened.evict(u64::MAX);
        assert_eq!(reopened.provenance(&digest), Provenance::default());
        assert_eq!(
            Store::open(dir.path()).unwrap().provenance(&digest),
            Provenance::default()
        );
    }

    #[test]
    fn a_corrupt_record_is_private_to_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = Digest::of(b"x");
        let path = store.origins_path(&digest);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"{\"public\": tru").unwrap();
        assert_eq!(store.provenance(&digest), Provenance::default());
        store
            .record_origin(&digest, &origin("a/b", Visibility::Private))
            .unwrap();
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(reopened.provenance(&digest).private.len(), 1);
    }
}
