//! `pullcache export`: images from a cache (fetched into it first if missing) written as an
//! OCI image layout tarball. An index keeps its digest: with `--platform`, the bundle holds the
//! whole index but only the chosen platforms' manifests and blobs, as containerd's own export
//! does. The tarball is written to a temp name and renamed, so a failed export leaves none.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::layout::{Entry, INDEX_FILE, Index, OCI_LAYOUT, OCI_LAYOUT_FILE};
use super::walk::Walked;
use pullcache::oci::{Digest, OCI_INDEX};
use pullcache::store::Store;

/// Writes `walked` images, whose blobs are all in the store at `cache_dir`, to `out`.
/// Returns the number of blobs and bytes written.
pub fn export(cache_dir: &Path, walked: &[Walked], out: &Path) -> anyhow::Result<(usize, u64)> {
    let store = Store::attach(cache_dir)?;
    let mut digests = BTreeSet::new();
    let mut entries = Vec::new();
    for image in walked {
        entries.push(Entry {
            media_type: image.top.media_type.clone(),
            digest: image.top.digest.to_string(),
            size: image.top.size,
            annotations: Entry::names(&image.image),
        });
        digests.insert(image.top.digest.clone());
        digests.extend(image.manifests.iter().map(|m| m.digest.clone()));
        digests.extend(image.blobs.iter().map(|b| b.digest.clone()));
    }
    let index = Index {
        schema_version: 2,
        media_type: Some(OCI_INDEX.to_owned()),
        manifests: entries,
    };

    let partial = out.with_extension("partial");
    let result = write(&store, &digests, &index, &partial);
    match result {
        Ok(totals) => {
            std::fs::rename(&partial, out).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
            Ok(totals)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

fn write(store: &Store, digests: &BTreeSet<Digest>, index: &Index, path: &Path) -> anyhow::Result<(usize, u64)> {
    let file = File::create(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    let small = |tar: &mut tar::Builder<_>, name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        tar.append_data(&mut header(bytes.len() as u64), name, bytes)?;
        Ok(())
    };
    small(&mut tar, OCI_LAYOUT_FILE, OCI_LAYOUT.as_bytes())?;
    small(&mut tar, INDEX_FILE, &serde_json::to_vec_pretty(index)?)?;
    let mut bytes = 0;
    for digest in digests {
        let blob = store.open_blob(digest)?.ok_or_else(|| {
            anyhow::anyhow!("blob {digest} is not in the cache (evicted, or the disk was full when it was fetched)")
        })?;
        let name = format!("blobs/sha256/{}", digest.hex());
        bytes += blob.size;
        tar.append_data(&mut header(blob.size), name, &blob.file)?;
    }
    let mut writer = tar.into_inner()?;
    writer.flush()?;
    writer.get_ref().sync_all()?;
    Ok((digests.len(), bytes))
}

/// A regular file's header, the same on every export (no times or owners).
fn header(size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header
}
