//! `pullcache verify`: re-hash every blob in the store and move any whose bytes do not match
//! its name into `quarantine/`, for an operator who suspects disk corruption. A quarantined
//! manifest also loses its media type, so it is fetched again rather than served.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::{Result, Store, StoreError};
use crate::oci::Digest;

const READ_BUFFER: usize = 1024 * 1024;

/// What a verification found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub checked: u64,
    pub bytes: u64,
    /// Files moved to quarantine, with where they went.
    pub quarantined: Vec<(PathBuf, PathBuf)>,
}

impl Store {
    /// Re-hashes every blob; mismatches (and files that are not blobs at all) go to
    /// `quarantine/`.
    pub fn verify(&self) -> Result<Report> {
        let mut report = Report::default();
        let quarantine = self.root.join("quarantine");
        for prefix in fs::read_dir(&self.blobs).map_err(|e| StoreError::new("list", &self.blobs, e))? {
            let prefix = prefix.map_err(|e| StoreError::new("list", &self.blobs, e))?.path();
            let entries = fs::read_dir(&prefix).map_err(|e| StoreError::new("list", &prefix, e))?;
            for entry in entries {
                let path = entry.map_err(|e| StoreError::new("list", &prefix, e))?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
                let expected: Option<Digest> = format!("sha256:{name}").parse().ok();
                let (actual, size) = hash_file(&path)?;
                report.checked += 1;
                report.bytes += size;
                if expected.as_ref() == Some(&actual) {
                    continue;
                }
                fs::create_dir_all(&quarantine).map_err(|e| StoreError::new("create", &quarantine, e))?;
                let dest = quarantine.join(&name);
                fs::rename(&path, &dest).map_err(|e| StoreError::new("quarantine", &path, e))?;
                if let Some(expected) = &expected {
                    self.index.remove(expected);
                    self.drop_metadata(expected);
                }
                tracing::warn!(file = %path.display(), actual = %actual, "blob does not match its name; quarantined");
                report.quarantined.push((path, dest));
            }
        }
        Ok(report)
    }
}

fn hash_file(path: &Path) -> Result<(Digest, u64)> {
    let mut file = File::open(path).map_err(|e| StoreError::new("open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; READ_BUFFER];
    let mut size = 0;
    loop {
        let n = file.read(&mut buf).map_err(|e| StoreError::new("read", path, e))?;
        if n == 0 {
            return Ok((Digest::from_hasher(hasher), size));
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_blobs_are_quarantined_and_good_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut digests = Vec::new();
        for content in [&b"good one"[..], b"good two", b"soon corrupt"] {
            let digest = Digest::of(content);
            let mut temp = store.temp_blob().unwrap();
            temp.write(content).unwrap();
            store.commit(temp, &digest, None, None).unwrap();
            digests.push(digest);
        }
        let manifest = br#"{"schemaVersion":2}"#;
        let manifest_digest = Digest::of(manifest);
        store
            .put_manifest(
                &manifest_digest,
                "application/vnd.oci.image.manifest.v1+json",
                manifest,
                None,
            )
            .unwrap();
        fs::write(store.blob_path(&digests[2]), b"bit rot").unwrap();
        fs::write(store.blob_path(&manifest_digest), b"{}").unwrap();

        let report = store.verify().unwrap();
        assert_eq!(report.checked, 4);
        let bad: Vec<_> = report.quarantined.iter().map(|(from, _)| from.clone()).collect();
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad.contains(&store.blob_path(&digests[2])));
        assert!(!store.has_blob(&digests[2]));
        assert!(store.has_blob(&digests[0]) && store.has_blob(&digests[1]));
        assert!(
            store.manifest(&manifest_digest).unwrap().is_none(),
            "a corrupt manifest is still served"
        );
        assert!(dir.path().join("quarantine").join(digests[2].hex()).exists());
        assert_eq!(store.usage().1, 2);
        assert!(
            store.verify().unwrap().quarantined.is_empty(),
            "a second run finds nothing"
        );
    }
}
