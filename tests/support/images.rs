//! Test images built in memory (random gzip'd tar layers, configs, manifests, indexes) and pushed with the distribution API.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::http_client;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

const PUSH_TIMEOUT: Duration = Duration::from_secs(120);

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// OCI architecture name of this host (x86_64 → amd64, aarch64 → arm64).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "s390x" => "s390x",
        "powerpc64" => "ppc64le",
        "riscv64" => "riscv64",
        other => panic!("unsupported host arch {other}"),
    }
}

/// An architecture that is NOT the host's (for the foreign platform of an index).
pub fn other_arch() -> &'static str {
    if host_arch() == "arm64" { "amd64" } else { "arm64" }
}

/// Fast non-cryptographic generator (splitmix64). Each call to
/// [`random_bytes`] uses a fresh seed (time, pid, counter), so every layer differs.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn fresh_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    nanos ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0xA24B_AED4_963E_E407)
}

/// `len` incompressible pseudo-random bytes, different on every call.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut rng = SplitMix64(fresh_seed());
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A gzip'd tar layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The compressed blob (what is pushed).
    pub blob: Bytes,
    /// Digest of `blob`.
    pub digest: String,
    /// Digest of the uncompressed tar (config `rootfs.diff_ids`).
    pub diff_id: String,
}

/// Build a layer whose compressed size is about `approx_size` bytes (+ a few
/// KiB of tar/gzip overhead): a small unique text file plus up to 4 files of
/// random data splitting `approx_size`. Gzip uses level 0 (stored blocks: random data does not
/// compress anyway). Unpacks into `etc/pullcache-test/` and `data/`.
pub fn build_layer(approx_size: usize) -> Layer {
    let id = hex::encode(random_bytes(16));
    let mut tar = tar::Builder::new(Vec::with_capacity(approx_size + 16 * 1024));
    let mtime = 1_700_000_000;
    for dir in ["etc/", "etc/pullcache-test/", "data/"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(mtime);
        tar.append_data(&mut h, dir, std::io::empty()).expect("tar dir");
    }
    let mut append_file = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(mtime);
        tar.append_data(&mut h, path, data).expect("tar file");
    };
    append_file(
        "etc/pullcache-test/id",
        format!("pullcache test layer {id}\n").as_bytes(),
    );
    let parts = approx_size.div_ceil(8 * 1024 * 1024).clamp(1, 4);
    let per = approx_size / parts;
    for i in 0..parts {
        let len = if i + 1 == parts {
            approx_size - per * (parts - 1)
        } else {
            per
        };
        if len > 0 {
            append_file(&format!("data/blob-{i}"), &random_bytes(len));
        }
    }
    let tar_bytes = tar.into_inner().expect("tar finish");
    let diff_id = sha256_digest(&tar_bytes);

    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(tar_bytes.len() + 64 * 1024),
        flate2::Compression::none(),
    );
    gz.write_all(&tar_bytes).expect("gzip");
    let blob = Bytes::from(gz.finish().expect("gzip finish"));
    Layer {
        digest: sha256_digest(&blob),
        blob,
        diff_id,
    }
}

/// Image config JSON (valid for containerd unpacking).
pub fn build_config(arch: &str, diff_ids: &[String]) -> Bytes {
    let config = json!({
        "architecture": arch,
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": diff_ids.iter().map(|_| json!({"created_by": "pullcache test"})).collect::<Vec<_>>(),
    });
    Bytes::from(serde_json::to_vec(&config).expect("config json"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

#[derive(Debug, Clone)]
pub struct PushedImage {
    pub name: String,
    pub tag: String,
    /// Digest of the top-level manifest (the index for `push_oci_index`).
    pub manifest_digest: String,
    pub manifest_media_type: String,
    /// Exact bytes of the top-level manifest as pushed.
    pub manifest: Bytes,
    /// Every blob: configs and layers, of all platforms.
    pub blobs: Vec<BlobInfo>,
    /// Every manifest `(digest, media_type)`, child manifests first, the
    /// top-level one (== `manifest_digest`) last.
    pub manifests: Vec<(String, String)>,
}

impl PushedImage {
    /// `<registry_host>/<name>:<tag>`, e.g. `127.0.0.1:5000/foo/bar:v1`.
    pub fn reference(&self, registry_host: &str) -> String {
        format!("{registry_host}/{}:{}", self.name, self.tag)
    }

    /// `<registry_host>/<name>@<manifest_digest>`.
    pub fn digest_reference(&self, registry_host: &str) -> String {
        format!("{registry_host}/{}@{}", self.name, self.manifest_digest)
    }

    /// Layer blobs only (no configs).
    pub fn layers(&self) -> Vec<&BlobInfo> {
        self.blobs
            .iter()
            .filter(|b| b.media_type.contains("layer") || b.media_type.contains("rootfs"))
            .collect()
    }

    /// The biggest blob (handy for herd tests).
    pub fn largest_blob(&self) -> &BlobInfo {
        self.blobs.iter().max_by_key(|b| b.size).expect("image has blobs")
    }
}

fn join_url(registry_url: &str, location: &str) -> Result<reqwest::Url> {
    let base = reqwest::Url::parse(registry_url).with_context(|| format!("bad registry url {registry_url}"))?;
    base.join(location).with_context(|| format!("bad Location {location}"))
}

/// Push a blob (POST upload + monolithic PUT); returns its digest.
pub async fn push_blob(registry_url: &str, name: &str, bytes: impl Into<Bytes>) -> Result<String> {
    let bytes: Bytes = bytes.into();
    let digest = sha256_digest(&bytes);
    push_blob_with_digest(registry_url, name, &digest, bytes).await?;
    Ok(digest)
}

/// [`push_blob`] with a digest the caller already computed (saves hashing big
/// blobs twice); the registry verifies it. Also usable to push a blob under a
/// WRONG digest to test error paths (expect an Err then).
pub async fn push_blob_with_digest(registry_url: &str, name: &str, digest: &str, bytes: Bytes) -> Result<()> {
    let client = http_client();
    let base = registry_url.trim_end_matches('/');
    let resp = client
        .post(format!("{base}/v2/{name}/blobs/uploads/"))
        .header(reqwest::header::CONTENT_LENGTH, "0")
        .timeout(PUSH_TIMEOUT)
        .send()
        .await
        .with_context(|| format!("POST upload for {name}"))?;
    if resp.status() != reqwest::StatusCode::ACCEPTED {
        let status = resp.status();
        bail!(
            "POST /v2/{name}/blobs/uploads/: expected 202, got {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    let location = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .context("upload response without Location")?
        .to_str()?
        .to_string();
    // Url::join handles absolute and relative Locations; query_pairs_mut
    // appends with `&` or `?` as needed.
    let mut url = join_url(registry_url, &location)?;
    url.query_pairs_mut().append_pair("digest", digest);
    let len = bytes.len();
    let resp = client
        .put(url)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .header(reqwest::header::CONTENT_LENGTH, len.to_string())
        .body(bytes)
        .timeout(PUSH_TIMEOUT)
        .send()
        .await
        .with_context(|| format!("PUT blob {digest} ({len} bytes)"))?;
    if resp.status() != reqwest::StatusCode::CREATED {
        let status = resp.status();
        bail!(
            "PUT blob {digest}: expected 201, got {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// Push a manifest under `reference` (tag or digest); returns its digest
/// (checked against `Docker-Content-Digest`).
pub async fn push_manifest(
    registry_url: &str,
    name: &str,
    reference: &str,
    media_type: &str,
    body: Bytes,
) -> Result<String> {
    let digest = sha256_digest(&body);
    let base = registry_url.trim_end_matches('/');
    let resp = http_client()
        .put(format!("{base}/v2/{name}/manifests/{reference}"))
        .header(reqwest::header::CONTENT_TYPE, media_type)
        .body(body)
        .timeout(PUSH_TIMEOUT)
        .send()
        .await
        .with_context(|| format!("PUT manifest {name}:{reference}"))?;
    let status = resp.status();
    let returned = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if status != reqwest::StatusCode::CREATED {
        bail!(
            "PUT manifest {name}:{reference}: expected 201, got {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    ensure!(
        returned.as_deref() == Some(digest.as_str()),
        "registry returned digest {returned:?}, expected {digest}"
    );
    Ok(digest)
}

struct Kind {
    manifest: &'static str,
    config: &'static str,
    layer: &'static str,
}

const OCI: Kind = Kind {
    manifest: OCI_MANIFEST,
    config: OCI_CONFIG,
    layer: OCI_LAYER_GZIP,
};
const DOCKER: Kind = Kind {
    manifest: DOCKER_MANIFEST,
    config: DOCKER_CONFIG,
    layer: DOCKER_LAYER_GZIP,
};

/// Pushes layers + config + manifest (under `reference`); returns
/// (manifest digest, manifest bytes, blobs).
async fn push_single(
    registry_url: &str,
    name: &str,
    reference: Option<&str>,
    kind: &Kind,
    arch: &str,
    layer_sizes: &[usize],
) -> Result<(String, Bytes, Vec<BlobInfo>)> {
    ensure!(!layer_sizes.is_empty(), "an image needs at least one layer");
    let mut blobs = Vec::new();
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for &size in layer_sizes {
        let layer = tokio::task::spawn_blocking(move || build_layer(size)).await?;
        let len = layer.blob.len() as u64;
        push_blob_with_digest(registry_url, name, &layer.digest, layer.blob.clone()).await?;
        layer_descs.push(json!({"mediaType": kind.layer, "digest": layer.digest, "size": len}));
        blobs.push(BlobInfo {
            digest: layer.digest,
            size: len,
            media_type: kind.layer.to_string(),
        });
        diff_ids.push(layer.diff_id);
    }
    let config = build_config(arch, &diff_ids);
    let config_len = config.len() as u64;
    let config_digest = push_blob(registry_url, name, config).await?;
    blobs.insert(
        0,
        BlobInfo {
            digest: config_digest.clone(),
            size: config_len,
            media_type: kind.config.to_string(),
        },
    );
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": kind.manifest,
        "config": {"mediaType": kind.config, "digest": config_digest, "size": config_len},
        "layers": layer_descs,
    });
    let body = Bytes::from(serde_json::to_vec_pretty(&manifest)?);
    let digest = sha256_digest(&body);
    let reference = reference.unwrap_or(&digest).to_string();
    push_manifest(registry_url, name, &reference, kind.manifest, body.clone()).await?;
    Ok((digest, body, blobs))
}

async fn push_image(
    registry_url: &str,
    name: &str,
    tag: &str,
    layer_sizes: &[usize],
    kind: &Kind,
) -> Result<PushedImage> {
    let (digest, manifest, blobs) = push_single(registry_url, name, Some(tag), kind, host_arch(), layer_sizes).await?;
    Ok(PushedImage {
        name: name.to_string(),
        tag: tag.to_string(),
        manifests: vec![(digest.clone(), kind.manifest.to_string())],
        manifest_digest: digest,
        manifest_media_type: kind.manifest.to_string(),
        manifest,
        blobs,
    })
}

/// OCI image manifest for linux/<host arch> with one layer per entry of
/// `layer_sizes` (approximate compressed bytes each).
pub async fn push_oci_image(registry_url: &str, name: &str, tag: &str, layer_sizes: &[usize]) -> Result<PushedImage> {
    push_image(registry_url, name, tag, layer_sizes, &OCI).await
}

/// Docker schema2 manifest for linux/<host arch>.
pub async fn push_docker_image(
    registry_url: &str,
    name: &str,
    tag: &str,
    layer_sizes: &[usize],
) -> Result<PushedImage> {
    push_image(registry_url, name, tag, layer_sizes, &DOCKER).await
}

/// OCI index with two platform manifests (linux/<host arch> and
/// linux/<other arch>), each with its own small layer and config. Child
/// manifests are pushed by digest first, then the index under `tag`.
pub async fn push_oci_index(registry_url: &str, name: &str, tag: &str) -> Result<PushedImage> {
    let mut blobs = Vec::new();
    let mut manifests = Vec::new();
    let mut entries = Vec::new();
    for (arch, size) in [(host_arch(), 96 * 1024), (other_arch(), 64 * 1024)] {
        let (digest, body, child_blobs) = push_single(registry_url, name, None, &OCI, arch, &[size]).await?;
        entries.push(json!({
            "mediaType": OCI_MANIFEST,
            "digest": digest,
            "size": body.len(),
            "platform": {"architecture": arch, "os": "linux"},
        }));
        manifests.push((digest, OCI_MANIFEST.to_string()));
        blobs.extend(child_blobs);
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries,
    });
    let body = Bytes::from(serde_json::to_vec_pretty(&index)?);
    let digest = push_manifest(registry_url, name, tag, OCI_INDEX, body.clone()).await?;
    manifests.push((digest.clone(), OCI_INDEX.to_string()));
    Ok(PushedImage {
        name: name.to_string(),
        tag: tag.to_string(),
        manifest_digest: digest,
        manifest_media_type: OCI_INDEX.to_string(),
        manifest: body,
        blobs,
        manifests,
    })
}
