//! Images in and out of the cache without a registry, for air-gapped clusters: `prefetch`
//! warms a cache, `export` writes images as an OCI image layout tarball, and `import` reads
//! one (or a `docker save` tar) into a cache, verifying every blob first.
//!
//! `prefetch` and `export` walk images through pullcache's own registry API ([`Walker`]): a
//! running instance, or one started here on the cache directory ([`LocalServer`]), so a blob
//! is fetched, verified and stored exactly as a pull would.

mod export;
mod import;
mod layout;
mod walk;

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::oneshot;

use pullcache::oci::ImageRef;

use export::export;
use import::import;
use walk::{Walked, Walker};

/// pullcache serving a configuration on a loopback port of its own.
pub struct LocalServer {
    pub base: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl LocalServer {
    /// Starts serving `config` (its listen addresses are ignored, and it is no cluster member)
    /// and waits until ready.
    pub async fn start(mut config: pullcache::Config) -> anyhow::Result<LocalServer> {
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", api.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        // A shared config file may turn them on; a local fetch intercepts nothing and joins no
        // cluster.
        config.peers = None;
        config.intercept = None;
        let listeners = pullcache::Listeners {
            api,
            admin: None,
            peer: None,
        };
        let task = tokio::spawn(pullcache::run(listeners, config, async {
            let _ = stopped.await;
        }));
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ping = client.get(format!("{base}/v2/").parse()?).await;
            if ping.is_ok_and(|r| r.status() == http::StatusCode::OK) {
                break;
            }
            anyhow::ensure!(!task.is_finished(), "pullcache stopped before it was ready");
            anyhow::ensure!(Instant::now() < deadline, "the cache did not open within 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(LocalServer { base, stop, task })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

/// What a prefetch did.
#[derive(Debug, Default, Clone)]
pub struct Prefetched {
    pub images: usize,
    pub blobs: usize,
    pub bytes: u64,
}

/// Fetches every manifest and blob of `images` through the registry API at `base`, with a
/// progress bar (bytes and rate) on a terminal and nothing on other outputs.
pub async fn prefetch(base: &str, images: &[ImageRef], platforms: Vec<String>) -> anyhow::Result<Vec<Walked>> {
    let walker = Walker::new(base, platforms);
    let mut walked = Vec::new();
    for image in images {
        walked.push(walker.resolve(image).await?);
    }
    let total: u64 = walked.iter().flat_map(|w| w.blobs.iter().filter_map(|b| b.size)).sum();
    let bar = progress_bar(total);
    for image in &walked {
        bar.set_message(image.image.to_string());
        bar.tick();
        for blob in &image.blobs {
            walker.fetch_blob(&image.image, blob, &|n| bar.inc(n)).await?;
        }
    }
    bar.finish_and_clear();
    Ok(walked)
}

/// A byte-counting bar on stderr; hidden when stderr is not a terminal.
fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
            .expect("the progress template is valid")
            .progress_chars("=> "),
    );
    bar
}

/// Totals of walked images.
pub fn totals(walked: &[Walked]) -> Prefetched {
    Prefetched {
        images: walked.len(),
        blobs: walked.iter().map(|w| w.blobs.len()).sum(),
        bytes: walked.iter().flat_map(|w| w.blobs.iter().filter_map(|b| b.size)).sum(),
    }
}

/// Reads image references: arguments, then the lines of `from_file` (blank lines and `#`
/// comments skipped).
pub fn image_list(args: &[String], from_file: Option<&std::path::Path>) -> anyhow::Result<Vec<ImageRef>> {
    let mut images = Vec::new();
    for arg in args {
        images.push(ImageRef::parse(arg)?);
    }
    if let Some(path) = from_file {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            images.push(ImageRef::parse(line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?);
        }
    }
    anyhow::ensure!(!images.is_empty(), "no images given");
    Ok(images)
}

/// `pullcache prefetch`: returns the summary line.
pub async fn prefetch_command(args: &pullcache::config::PrefetchArgs) -> anyhow::Result<String> {
    let images = image_list(&args.images.images, args.images.from_file.as_deref())?;
    let started = Instant::now();
    let walked = match &args.server {
        Some(server) => prefetch(server, &images, args.images.platforms.clone()).await?,
        None => {
            let server = LocalServer::start(args.serve.resolve()?).await?;
            let walked = prefetch(&server.base, &images, args.images.platforms.clone()).await;
            server.stop().await?;
            walked?
        }
    };
    let t = totals(&walked);
    Ok(format!(
        "prefetched {} images: {} blobs, {} bytes in {:.1?}",
        t.images,
        t.blobs,
        t.bytes,
        started.elapsed()
    ))
}

/// `pullcache export`: returns the summary line.
pub async fn export_command(args: &pullcache::config::ExportArgs) -> anyhow::Result<String> {
    let images = image_list(&args.images.images, args.images.from_file.as_deref())?;
    let mut config = args.serve.resolve()?;
    // Without a cache directory of its own choosing, export fetches through a temporary one:
    // writing a tarball must not fill the node's cache (/var/lib/pullcache for root).
    let temporary = match config.cache_dir_chosen {
        true => None,
        false => {
            let temp = TempCache::create()?;
            config.cache_dir = temp.0.clone();
            Some(temp)
        }
    };
    let cache_dir = config.cache_dir.clone();
    let server = LocalServer::start(config).await?;
    let walked = prefetch(&server.base, &images, args.images.platforms.clone()).await;
    server.stop().await?;
    let walked = walked?;
    let out = args.output.clone();
    let (blobs, bytes) = tokio::task::spawn_blocking(move || export(&cache_dir, &walked, &out)).await??;
    Ok(format!(
        "exported {} images to {}: {blobs} blobs, {bytes} bytes{}",
        images.len(),
        args.output.display(),
        match temporary {
            Some(_) => " (through a temporary cache, removed; --cache-dir keeps one)",
            None => "",
        }
    ))
}

/// A cache directory removed when dropped, however the export ended.
struct TempCache(std::path::PathBuf);

impl TempCache {
    /// A new directory under `$TMPDIR`, made here and nowhere else: an unguessable name,
    /// created exclusively (a name another user planted, a directory or a link, is never
    /// used), readable by this user only.
    fn create() -> anyhow::Result<TempCache> {
        use sha2::Digest as _;
        use std::os::unix::fs::DirBuilderExt;
        for attempt in 0u32..16 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let seed = format!("{}:{}:{attempt}:{:p}", std::process::id(), now.as_nanos(), &now);
            let name = hex::encode(&sha2::Sha256::digest(seed.as_bytes())[..12]);
            let dir = std::env::temp_dir().join(format!("pullcache-export-{name}"));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(TempCache(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => anyhow::bail!("a temporary cache in {}: {e}", std::env::temp_dir().display()),
            }
        }
        anyhow::bail!("no new temporary cache name in {}", std::env::temp_dir().display())
    }
}

impl Drop for TempCache {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `pullcache import`: returns the summary line.
pub fn import_command(args: &pullcache::config::ImportArgs) -> anyhow::Result<String> {
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(pullcache::config::default_cache_dir);
    let mut lines = Vec::new();
    for bundle in &args.bundles {
        let imported = import(&cache_dir, bundle, args.name.as_ref(), args.pin)
            .map_err(|e| anyhow::anyhow!("{}: {e:#}", bundle.display()))?;
        lines.push(format!(
            "imported {} from {}: {} new blobs, {} bytes{}",
            imported.images.join(", "),
            bundle.display(),
            imported.blobs,
            imported.bytes,
            if args.pin { " (pinned)" } else { "" }
        ));
    }
    Ok(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::TempCache;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_temporary_cache_is_new_private_and_removed() {
        let (a, b) = (TempCache::create().unwrap(), TempCache::create().unwrap());
        assert_ne!(a.0, b.0);
        let mode = std::fs::metadata(&a.0).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let path = a.0.clone();
        drop(a);
        assert!(!path.exists());
    }
}
