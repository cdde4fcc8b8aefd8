//! `pullcache import`: an OCI image layout (a tarball or a directory) or a `docker save`
//! tarball into a cache. Every file is staged in the store's temp directory, hashing as it is
//! copied; then every image is checked whole (each blob present, of the size its descriptor
//! says, hashing to its digest) before anything is committed. A bad bundle is refused with the
//! blob it got wrong, and the cache is left as it was.
//!
//! Safe while pullcache serves the same cache: temp files carry this process's id, and the
//! server picks up new blobs, tags and pins as it meets them.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::SystemTime;

use serde_json::json;

use super::layout::{DOCKER_MANIFEST_FILE, DockerImage, INDEX_FILE, Index, OCI_LAYOUT_FILE};
use pullcache::oci::{
    AcceptClass, Digest, ImageRef, MAX_MANIFEST_SIZE, OCI_MANIFEST, Origin, Reference, References, is_valid_media_type,
};
use pullcache::store::{Store, TagKey, TagRecord, TempBlob};

const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// What an import committed.
#[derive(Debug, Default, Clone)]
pub struct Imported {
    /// The images, by name (or by digest when the bundle names none).
    pub images: Vec<String>,
    pub blobs: usize,
    pub bytes: u64,
}

/// A bundle's files, staged: blobs by digest, other files by path.
#[derive(Default)]
struct Staged {
    blobs: HashMap<Digest, TempBlob>,
    files: HashMap<String, TempBlob>,
}

impl Staged {
    fn add(&mut self, store: &Store, path: &str, mut reader: impl Read) -> anyhow::Result<()> {
        let path = path.trim_start_matches("./").to_owned();
        let mut temp = store.temp_blob()?;
        let mut buf = vec![0; 1024 * 1024];
        loop {
            let n = reader.read(&mut buf).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
            if n == 0 {
                break;
            }
            temp.write(&buf[..n])?;
        }
        let by_digest = path
            .strip_prefix("blobs/sha256/")
            .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok());
        match by_digest {
            Some(digest) => {
                self.blobs.insert(digest, temp);
            }
            None => {
                self.files.insert(path, temp);
            }
        }
        Ok(())
    }

    fn read_file(&self, path: &str) -> anyhow::Result<Option<Vec<u8>>> {
        self.files.get(path).map(|temp| read_small(temp, path)).transpose()
    }
}

/// The bytes of a small staged file (an index, a manifest, a config).
fn read_small(temp: &TempBlob, what: &str) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(
        temp.size() <= MAX_MANIFEST_SIZE,
        "{what} is {} bytes; too large",
        temp.size()
    );
    // By offset: the handle shares its position with the temp file's writer.
    let mut bytes = vec![0; temp.size() as usize];
    std::os::unix::fs::FileExt::read_exact_at(&temp.reader()?, &mut bytes, 0)?;
    Ok(bytes)
}

/// Reads `path` (a tarball or an OCI layout directory) into the store at `cache_dir`, naming
/// unnamed images `name` if given, and pinning what it imports if `pin`.
pub fn import(cache_dir: &Path, path: &Path, name: Option<&ImageRef>, pin: bool) -> anyhow::Result<Imported> {
    let store = Store::attach(cache_dir)?;
    let mut staged = Staged::default();
    if path.is_dir() {
        stage_dir(&store, path, path, &mut staged)?;
    } else {
        let file = File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let mut archive = tar::Archive::new(file);
        for entry in archive
            .entries()
            .map_err(|e| anyhow::anyhow!("{}: not a tar: {e}", path.display()))?
        {
            let entry = entry.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let name = entry.path()?.to_string_lossy().into_owned();
            staged.add(&store, &name, entry)?;
        }
    }
    let plan = if staged.files.contains_key(INDEX_FILE) {
        plan_oci(&staged, name)?
    } else if staged.files.contains_key(DOCKER_MANIFEST_FILE) {
        plan_docker(&store, &mut staged)?
    } else {
        anyhow::bail!(
            "{}: neither an OCI image layout ({INDEX_FILE}) nor a docker save tarball ({DOCKER_MANIFEST_FILE})",
            path.display()
        );
    };
    commit(&store, staged, plan, pin)
}

fn stage_dir(store: &Store, root: &Path, dir: &Path, staged: &mut Staged) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            stage_dir(store, root, &path, staged)?;
        } else {
            let name = path.strip_prefix(root)?.to_string_lossy().into_owned();
            staged.add(store, &name, File::open(&path)?)?;
        }
    }
    Ok(())
}

/// What to commit: blobs (with manifests' media types) and the tags to record.
#[derive(Default)]
struct Plan {
    /// Digest, size, and media type for manifests.
    blobs: Vec<(Digest, u64, Option<String>)>,
    tags: Vec<(ImageRef, Digest, String)>,
    /// Every named image, for `--pin`.
    named: Vec<ImageRef>,
    names: Vec<String>,
}

impl Plan {
    fn has(&self, digest: &Digest) -> bool {
        self.blobs.iter().any(|(d, _, _)| d == digest)
    }
}

/// Checks a staged blob against its descriptor: present, of the size it says, hashing to its
/// digest.
fn check(staged: &Staged, digest: &Digest, size: Option<u64>, what: &str) -> anyhow::Result<u64> {
    let temp = staged
        .blobs
        .get(digest)
        .ok_or_else(|| anyhow::anyhow!("bundle lacks {what} {digest}"))?;
    if let Some(size) = size {
        anyhow::ensure!(
            temp.size() == size,
            "{what} {digest} is {} bytes in the bundle, its descriptor says {size}",
            temp.size()
        );
    }
    let actual = temp.digest();
    anyhow::ensure!(
        &actual == digest,
        "{what} {digest} in the bundle does not match its digest (it hashes to {actual})"
    );
    Ok(temp.size())
}

fn plan_oci(staged: &Staged, name: Option<&ImageRef>) -> anyhow::Result<Plan> {
    if let Some(layout) = staged.read_file(OCI_LAYOUT_FILE)? {
        let layout: serde_json::Value = serde_json::from_slice(&layout)?;
        anyhow::ensure!(
            layout["imageLayoutVersion"].is_string(),
            "{OCI_LAYOUT_FILE} has no imageLayoutVersion"
        );
    } else {
        anyhow::bail!("bundle has {INDEX_FILE} but no {OCI_LAYOUT_FILE}");
    }
    let index: Index = serde_json::from_slice(&staged.read_file(INDEX_FILE)?.unwrap_or_default())
        .map_err(|e| anyhow::anyhow!("{INDEX_FILE}: {e}"))?;
    anyhow::ensure!(!index.manifests.is_empty(), "{INDEX_FILE} lists no images");
    let mut plan = Plan::default();
    for entry in &index.manifests {
        let digest: Digest = entry.digest.parse()?;
        let image = entry
            .image()
            .or_else(|| (index.manifests.len() == 1).then(|| name.cloned()).flatten());
        plan_manifest(
            staged,
            &digest,
            Some(entry.size),
            Some(&entry.media_type),
            true,
            &mut plan,
        )?;
        match image {
            Some(image) => {
                plan.names.push(image.to_string());
                plan.named.push(image.clone());
                if let Reference::Tag(_) = image.reference {
                    plan.tags.push((image, digest, entry.media_type.clone()));
                }
            }
            None => plan.names.push(format!("{digest} (unnamed: pull it by digest)")),
        }
    }
    Ok(plan)
}

/// Plans a manifest and everything under it. An index may omit children (a bundle exported
/// for some platforms only); an image manifest's config and layers must all be there.
fn plan_manifest(
    staged: &Staged,
    digest: &Digest,
    size: Option<u64>,
    media_type: Option<&str>,
    required: bool,
    plan: &mut Plan,
) -> anyhow::Result<()> {
    if !required && !staged.blobs.contains_key(digest) {
        return Ok(());
    }
    let size = check(staged, digest, size, "manifest")?;
    let bytes = read_small(&staged.blobs[digest], &format!("manifest {digest}"))?;
    let media_type = match media_type {
        Some(t) => t.to_owned(),
        None => serde_json::from_slice::<serde_json::Value>(&bytes)?["mediaType"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("manifest {digest} has no media type"))?
            .to_owned(),
    };
    anyhow::ensure!(
        is_valid_media_type(&media_type),
        "manifest {digest}: {media_type:?} is not a media type"
    );
    let refs = References::of(&bytes).map_err(|e| anyhow::anyhow!("manifest {digest}: {e}"))?;
    if !plan.has(digest) {
        plan.blobs.push((digest.clone(), size, Some(media_type)));
    }
    for child in &refs.manifests {
        plan_manifest(
            staged,
            &child.digest,
            child.size,
            child.media_type.as_deref(),
            false,
            plan,
        )?;
    }
    for blob in &refs.blobs {
        let size = check(staged, &blob.digest, blob.size, "blob")?;
        if !plan.has(&blob.digest) {
            plan.blobs.push((blob.digest.clone(), size, None));
        }
    }
    Ok(())
}

/// A `docker save` tarball: each image's config and layer files become an OCI image
/// manifest with uncompressed layers, tagged with its `RepoTags`.
fn plan_docker(store: &Store, staged: &mut Staged) -> anyhow::Result<Plan> {
    let images: Vec<DockerImage> = serde_json::from_slice(&staged.read_file(DOCKER_MANIFEST_FILE)?.unwrap_or_default())
        .map_err(|e| anyhow::anyhow!("{DOCKER_MANIFEST_FILE}: {e}"))?;
    let mut plan = Plan::default();
    for image in images {
        let mut by_path = |path: &str, what: &str| -> anyhow::Result<(Digest, u64)> {
            let path = path.trim_start_matches("./");
            let temp = match staged.files.remove(path) {
                Some(temp) => temp,
                None => {
                    // Newer docker versions write the files under blobs/sha256/.
                    let digest = path
                        .strip_prefix("blobs/sha256/")
                        .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok())
                        .ok_or_else(|| anyhow::anyhow!("bundle lacks the {what} {path}"))?;
                    let size = check(staged, &digest, None, what)?;
                    return Ok((digest, size));
                }
            };
            let digest = temp.digest();
            let size = temp.size();
            staged.blobs.insert(digest.clone(), temp);
            Ok((digest, size))
        };
        let (config, config_size) = by_path(&image.config, "config")?;
        let mut layers = Vec::new();
        for layer in &image.layers {
            layers.push(by_path(layer, "layer")?);
        }
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config.to_string(), "size": config_size},
            "layers": layers.iter().map(|(d, s)| json!({"mediaType": OCI_LAYER_TAR, "digest": d.to_string(), "size": s})).collect::<Vec<_>>(),
        });
        let bytes = serde_json::to_vec(&manifest)?;
        let digest = Digest::of(&bytes);
        let mut temp = store.temp_blob()?;
        temp.write(&bytes)?;
        staged.blobs.insert(digest.clone(), temp);
        plan_manifest(
            staged,
            &digest,
            Some(bytes.len() as u64),
            Some(OCI_MANIFEST),
            true,
            &mut plan,
        )?;
        let tags = image.repo_tags.unwrap_or_default();
        if tags.is_empty() {
            plan.names.push(format!("{digest} (untagged)"));
        }
        for tag in tags {
            let image = ImageRef::parse(&tag)?;
            plan.names.push(image.to_string());
            plan.named.push(image.clone());
            plan.tags.push((image, digest.clone(), OCI_MANIFEST.to_owned()));
        }
    }
    Ok(plan)
}

fn commit(store: &Store, mut staged: Staged, plan: Plan, pin: bool) -> anyhow::Result<Imported> {
    let mut imported = Imported {
        images: plan.names,
        ..Imported::default()
    };
    for (digest, size, media_type) in plan.blobs {
        let temp = staged.blobs.remove(&digest).expect("planned blobs are staged");
        // What an operator imports is for every workload on the node: public.
        if store.has_blob(&digest) {
            drop(temp);
            store.record_origin(&digest, &Origin::Public)?;
        } else {
            store.commit(temp, &digest, Some(size), Some(&Origin::Public))?;
            imported.blobs += 1;
            imported.bytes += size;
        }
        if let Some(media_type) = media_type {
            store.set_media_type(&digest, &media_type)?;
        }
    }
    let now = SystemTime::now();
    for (image, digest, media_type) in plan.tags {
        let Reference::Tag(tag) = &image.reference else {
            continue;
        };
        let key = TagKey {
            registry: image.registry.clone(),
            repository: image.repository.clone(),
            tag: tag.clone(),
            accept: AcceptClass::all(),
        };
        store.tags().put(
            key,
            TagRecord {
                digest,
                media_type,
                fetched_at: now,
                imported: true,
            },
        )?;
    }
    if pin {
        store.add_pins(&plan.named)?;
    }
    Ok(imported)
}
