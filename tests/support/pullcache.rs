//! Runs pullcache in-process on `127.0.0.1:0` through `pullcache::run`, with a shutdown handle.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long [`Pullcache::idle`] waits for downloads in flight to end.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Pullcache {
    pub addr: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin_addr: SocketAddr,
    pub cache_dir: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Logs from pullcache show up in a failing test's output (`RUST_LOG` filters them).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("pullcache=debug"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// pullcache's defaults for a cache in `cache_dir`, except the free-space floor: off, so no
/// test depends on how full this machine's disk is (the floor has tests of its own).
pub fn config(cache_dir: impl Into<PathBuf>) -> pullcache::Config {
    let mut config = pullcache::Config::new(cache_dir.into());
    config.budget.min_free = pullcache::store::MinFree::Bytes(0);
    config
}

impl Pullcache {
    /// Starts pullcache with `upstreams` as `(registry name, URL)` mappings.
    pub async fn start(cache_dir: &Path, upstreams: &[(&str, &str)], tag_ttl: Duration) -> anyhow::Result<Pullcache> {
        let mut config = config(cache_dir);
        config.tag_ttl = tag_ttl;
        for (name, url) in upstreams {
            config.registry(pullcache::oci::Registry::parse(name)?).url = Some(url.parse()?);
        }
        Self::start_with(config).await
    }

    /// Starts pullcache with a full configuration (its `listen` is ignored: port 0), and waits
    /// until it is ready.
    pub async fn start_with(config: pullcache::Config) -> anyhow::Result<Pullcache> {
        let pullcache = Self::spawn(config).await?;
        pullcache.wait_ready(Duration::from_secs(20)).await?;
        Ok(pullcache)
    }

    /// Starts pullcache without waiting for its cache to open.
    pub async fn spawn(config: pullcache::Config) -> anyhow::Result<Pullcache> {
        Self::spawn_with_peer(config, None).await
    }

    /// Starts a cluster member whose peer port is `peer` (bound already, so every member's
    /// address is known before any starts), and waits until it is ready.
    pub async fn start_member(config: pullcache::Config, peer: tokio::net::TcpListener) -> anyhow::Result<Pullcache> {
        let pullcache = Self::spawn_with_peer(config, Some(peer)).await?;
        pullcache.wait_ready(Duration::from_secs(20)).await?;
        Ok(pullcache)
    }

    async fn spawn_with_peer(
        config: pullcache::Config,
        peer: Option<tokio::net::TcpListener>,
    ) -> anyhow::Result<Pullcache> {
        init_tracing();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (addr, admin_addr) = (listener.local_addr()?, admin.local_addr()?);
        let cache_dir = config.cache_dir.clone();
        let listeners = pullcache::Listeners {
            api: listener,
            admin: Some(admin),
            peer,
        };
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(pullcache::run(listeners, config, async {
            let _ = rx.await;
        }));
        Ok(Pullcache {
            addr,
            admin_addr,
            cache_dir,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let resp = crate::support::http_client()
            .get(format!("http://{}/metrics", self.admin_addr))
            .send()
            .await?;
        anyhow::ensure!(resp.status() == 200, "/metrics answered {}", resp.status());
        Ok(resp.text().await?)
    }

    /// The value of one series (`name` or `name{labels}`, as written in `/metrics`); 0 when
    /// it is absent, as Prometheus counters start.
    pub async fn sample(&self, series: &str) -> anyhow::Result<f64> {
        let metrics = self.metrics().await?;
        Ok(metrics
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0))
    }

    /// The sum of every series of a metric family (`name{...}` and `name`).
    pub async fn sum(&self, name: &str) -> anyhow::Result<f64> {
        let metrics = self.metrics().await?;
        Ok(metrics
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(name)?;
                let value = match rest.strip_prefix('{') {
                    Some(labelled) => labelled.split_once("} ")?.1,
                    None => rest.strip_prefix(' ')?,
                };
                value.trim().parse::<f64>().ok()
            })
            .sum())
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let readyz = format!("http://{}/readyz", self.admin_addr);
        crate::support::eventually(timeout, "/readyz to answer 200", || async {
            let resp = crate::support::http_client().get(&readyz).send().await?;
            anyhow::Ok(resp.status() == 200)
        })
        .await
    }

    /// Stops serving and waits for the server to wind down.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task).await???;
        }
        Ok(())
    }

    /// Every blob file in the store, as `sha256:<hex>`.
    pub fn stored_blobs(&self) -> Vec<String> {
        blob_files(&self.cache_dir)
            .iter()
            .map(|path| format!("sha256:{}", path.file_name().unwrap_or_default().to_string_lossy()))
            .collect()
    }

    /// Bytes of the blob files in the store, as on disk now.
    pub fn stored_bytes(&self) -> u64 {
        stored_bytes(&self.cache_dir)
    }

    /// Waits until no blob download is in flight (`pullcache_inflight_fetches` is 0). Then,
    /// once the upstream registry [settled](super::registry::Registry::settle), every request
    /// it was sent is in its access log.
    pub async fn idle(&self) -> anyhow::Result<()> {
        crate::support::eventually(IDLE_TIMEOUT, "no blob download in flight", || async {
            anyhow::Ok(self.sample("pullcache_inflight_fetches").await? == 0.0)
        })
        .await
    }

    /// Files left in the store's temp directory.
    pub fn temp_files(&self) -> usize {
        std::fs::read_dir(self.cache_dir.join("tmp")).map_or(0, |d| d.count())
    }
}

impl Drop for Pullcache {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The blob files in a cache directory's store.
pub fn blob_files(cache_dir: &Path) -> Vec<PathBuf> {
    let root = cache_dir.join("blobs").join("sha256");
    let prefixes = std::fs::read_dir(&root).into_iter().flatten().flatten();
    prefixes
        .flat_map(|prefix| std::fs::read_dir(prefix.path()).into_iter().flatten().flatten())
        .map(|entry| entry.path())
        .collect()
}

/// Bytes of the blob files in a cache directory's store.
pub fn stored_bytes(cache_dir: &Path) -> u64 {
    blob_files(cache_dir)
        .iter()
        .map(|path| std::fs::metadata(path).map_or(0, |m| m.len()))
        .sum()
}

/// Blob files in a cache directory's store whose bytes do not hash to their names.
pub fn corrupt_blobs(cache_dir: &Path) -> Vec<String> {
    use sha2::Digest as _;
    let mut bad = Vec::new();
    for path in blob_files(cache_dir) {
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap_or_default();
        if hex::encode(sha2::Sha256::digest(&bytes)) != name {
            bad.push(name);
        }
    }
    bad
}

/// Blob files in a cache directory's store.
pub fn stored_blob_count(cache_dir: &Path) -> usize {
    blob_files(cache_dir).len()
}
