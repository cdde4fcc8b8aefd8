//! Lazy pulls with the real soci-snapshotter (0.4.1, Debian sid, as `tests/fetch-soci.sh`
//! extracts it): an upstream that holds an image with one large layer and its SOCI index
//! ([`Upstream`]), and a node that lazy-pulls it ([`LazyNode`]): soci-snapshotter-grpc, a
//! containerd 2.1 with it as a proxy snapshotter, and, on the way to the registry, pullcache
//! (the real binary) in mirror or intercept mode, or nothing.
//!
//! Facts this relies on (soci 0.4.1, see also /tmp/h2/FINDINGS.md of issue 23):
//! * The SOCI index and its ztocs are found and fetched with oras-go: always HTTPS, always from
//!   the image reference's own host, through `HTTPS_PROXY` if set; `[resolver]` mirrors are
//!   not used for them. A registry without the referrers API must answer its 404 with any
//!   code but NAME_UNKNOWN, or oras gives up before the fallback tag `sha256-<hex>`.
//! * Layer bytes are read on demand, one ~4 MiB span per `Range: bytes=a-b`, from the
//!   `[[resolver.host."REG".mirrors]]` (no `ns` query) and then REG itself: plain HTTP for a
//!   loopback host or an `insecure` mirror, else HTTPS. So the registry serves TLS on an
//!   address that is not loopback: here 10.99.0.2 on the loopback device of a network
//!   namespace of the test's own, where everything runs.
//! * `soci image rpull` is what sets the snapshot labels that make a snapshot remote (`ctr
//!   images pull --snapshotter soci` sets none: the layer is downloaded whole).
//! * The `soci` CLI hardcodes its store at [`FIXED_ROOT`]. Every soci process here runs in a
//!   mount namespace of its own (`unshare --mount`, private propagation) with a tmpfs on
//!   `/var/lib` and its root bind-mounted at [`FIXED_ROOT`]: nothing is made there on the
//!   host, and parallel tests each see their own. The daemon's FUSE mounts live in its
//!   namespace only, so they go when it is killed; the test reads them through
//!   `/proc/<pid>/root`.

use std::ffi::OsStr;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use serde_json::json;
use tempfile::TempDir;
use tokio::process::{Child, Command};

use super::binary::{self, Served};
use super::containerd::{self, Containerd, ContainerdOptions, Release, captured, output_within, without_proxy};
use super::images::{self, OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST};
use super::netns::{self, Netns};
use super::registry::{AccessLogEntry, Registry, RegistryOptions};
use super::tls::TestCa;
use super::{check_status, eventually, kill_and_reap, log_tail};

/// Where `tests/fetch-soci.sh` extracts the package; `PULLCACHE_SOCI_DIR` overrides it.
const SOCI_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/soci");
/// The store the `soci` CLI reads and writes, whatever its flags say.
pub const FIXED_ROOT: &str = "/var/lib/soci-snapshotter-grpc";
/// The upstream registry's address, on the loopback device of the test's namespace.
pub const REGISTRY_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
pub const REGISTRY_PORT: u16 = 5000;
/// The name intercept mode pulls by: only pullcache knows where it is.
pub const INTERCEPTED_NAME: &str = "registry.test.invalid";
/// pullcache's registry API inside the namespace.
pub const PULLCACHE_LISTEN: &str = "127.0.0.1:5000";
/// The repository and tag of the test image.
pub const REPOSITORY: &str = "lazy/app";
pub const TAG: &str = "v1";
/// The small file stored last in the large layer.
pub const MARKER_PATH: &str = "zz/marker.txt";
const SNAPSHOTTER: &str = "soci";
const START_TIMEOUT: Duration = Duration::from_secs(20);
const CLI_TIMEOUT: Duration = Duration::from_secs(120);
/// Mounts a tmpfs on /var/lib in a fresh mount namespace, binds `$0` (a root) at FIXED_ROOT,
/// then execs its arguments in place (the pid stays the program's).
const PRIVATE_ROOT_SCRIPT: &str = "mount -t tmpfs -o size=1m,mode=0755 pullcache-soci /var/lib \
     && mkdir /var/lib/soci-snapshotter-grpc \
     && mount --bind \"$0\" /var/lib/soci-snapshotter-grpc && exec \"$@\"";

/// The extracted `usr/bin`, with both binaries there; Err naming the fix otherwise.
pub fn bin_dir() -> Result<PathBuf> {
    let root = std::env::var_os("PULLCACHE_SOCI_DIR").map_or_else(|| PathBuf::from(SOCI_DIR), PathBuf::from);
    let bin = root.join("usr/bin");
    for name in ["soci", "soci-snapshotter-grpc"] {
        ensure!(
            bin.join(name).is_file(),
            "{name} is not in {}: run tests/install-deps.sh (tests/fetch-soci.sh fetches it)",
            bin.display()
        );
    }
    Ok(bin)
}

/// `program` inside `netns`, in a mount namespace of its own where [`FIXED_ROOT`] is `root`.
fn with_private_root(netns: &Netns, root: &Path, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = netns.command("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", PRIVATE_ROOT_SCRIPT])
        .arg(root)
        .arg(program);
    without_proxy(&mut cmd);
    for var in ["NO_PROXY", "no_proxy", "SSL_CERT_DIR", "SSL_CERT_FILE"] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs `soci -a CONTAINERD ARGS` with `root` as its store and `env` on top, within
/// [`CLI_TIMEOUT`]; Err unless it succeeds.
async fn soci_cli(
    netns: &Netns,
    root: &Path,
    env: &[(String, String)],
    containerd: &Containerd,
    args: &[&str],
) -> Result<Output> {
    let mut cmd = with_private_root(netns, root, bin_dir()?.join("soci"));
    cmd.arg("-a")
        .arg(containerd.socket())
        .args(args)
        .envs(env.iter().cloned());
    captured(&mut cmd);
    let what = format!("soci {}", args.join(" "));
    check_status(&what, output_within(cmd, &what, CLI_TIMEOUT).await?)
}

/// The test image: one layer of random files, the marker last.
#[derive(Debug, Clone)]
pub struct LazyImage {
    pub manifest_digest: String,
    pub layer_digest: String,
    pub layer_size: u64,
    /// The marker's bytes (unique to this image).
    pub marker: Vec<u8>,
}

/// A gzip'd tar of `data_bytes` of random data in 8 MiB files under `data/`, then
/// [`MARKER_PATH`], and its marker's bytes.
fn build_layer(data_bytes: usize) -> (images::Layer, Vec<u8>) {
    let mut tar = tar::Builder::new(Vec::with_capacity(data_bytes + 64 * 1024));
    let mut append = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        tar.append_data(&mut h, path, data).expect("tar file");
    };
    const FILE: usize = 8 * 1024 * 1024;
    for (i, start) in (0..data_bytes).step_by(FILE).enumerate() {
        append(
            &format!("data/f{i:02}.bin"),
            &images::random_bytes(FILE.min(data_bytes - start)),
        );
    }
    let marker = format!("lazy marker {}\n", hex::encode(images::random_bytes(16))).into_bytes();
    append(MARKER_PATH, &marker);
    let tar = tar.into_inner().expect("tar finish");
    let diff_id = images::sha256_digest(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::with_capacity(tar.len() + 64 * 1024), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip");
    let blob = Bytes::from(gz.finish().expect("gzip finish"));
    let layer = images::Layer {
        digest: images::sha256_digest(&blob),
        blob,
        diff_id,
    };
    (layer, marker)
}

/// Pushes the test image to `registry_url` as [`REPOSITORY`]:[`TAG`].
async fn push_image(registry_url: &str, data_bytes: usize) -> Result<LazyImage> {
    let (layer, marker) = tokio::task::spawn_blocking(move || build_layer(data_bytes)).await?;
    let layer_size = layer.blob.len() as u64;
    images::push_blob_with_digest(registry_url, REPOSITORY, &layer.digest, layer.blob.clone()).await?;
    let config = images::build_config(images::host_arch(), std::slice::from_ref(&layer.diff_id));
    let config_size = config.len();
    let config_digest = images::push_blob(registry_url, REPOSITORY, config).await?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer.digest, "size": layer_size}],
    });
    let body = Bytes::from(serde_json::to_vec_pretty(&manifest)?);
    let manifest_digest = images::push_manifest(registry_url, REPOSITORY, TAG, OCI_MANIFEST, body).await?;
    Ok(LazyImage {
        manifest_digest,
        layer_digest: layer.digest,
        layer_size,
        marker,
    })
}

/// A network namespace deleted on drop (with whatever still runs inside).
struct OwnedNetns(Netns);

impl Drop for OwnedNetns {
    fn drop(&mut self) {
        self.0.delete();
    }
}

/// The upstream: the real registry with TLS at [`REGISTRY_ADDR`] in a namespace of its own,
/// holding the test image and its SOCI index (made with `soci create` on a builder containerd
/// and pushed with `soci push`, then the builder is gone). Everything of a [`LazyNode`] runs
/// in the same namespace.
pub struct Upstream {
    pub registry: Registry,
    pub image: LazyImage,
    /// The registry's CA certificate (PEM).
    pub ca: PathBuf,
    dir: TempDir,
    netns: OwnedNetns,
}

impl Upstream {
    /// Sweeps what dead runs left, makes the namespace, and pushes an image whose layer holds
    /// `data_bytes` of random data and the marker.
    pub async fn start(data_bytes: usize) -> Result<Upstream> {
        static RUNS: AtomicU32 = AtomicU32::new(0);
        bin_dir()?;
        netns::sweep_dead_runs(super::cluster::PREFIX)?;
        let name = format!(
            "{}{}-{}-soci",
            super::cluster::PREFIX,
            std::process::id(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        );
        // Short: containerd's sockets are in it.
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in("/tmp")?;
        let netns = OwnedNetns(Netns::create(&name)?);
        let cidr = format!("{REGISTRY_ADDR}/32");
        netns::ip(&["-n", &name, "addr", "add", &cidr, "dev", "lo"])?;

        let storage = dir.path().join("storage");
        let staging_options = RegistryOptions {
            dir_in: Some(dir.path().to_owned()),
            ..RegistryOptions::default()
        };
        let mut staging = Registry::start_with(staging_options.clone(), Some(storage.clone())).await?;
        let image = push_image(&staging.url(), data_bytes).await?;
        staging.stop().await;
        let issuer = TestCa::new();
        let ca = issuer.write_ca(dir.path());
        let tls = issuer.issue_server(dir.path(), &[&REGISTRY_ADDR.to_string()]);
        let options = RegistryOptions {
            tls: Some(tls),
            listen: Some(SocketAddr::from((REGISTRY_ADDR, REGISTRY_PORT))),
            netns: Some(netns.0.clone()),
            ..staging_options
        };
        let registry = Registry::start_with(options, Some(storage)).await?;
        let upstream = Upstream {
            registry,
            image,
            ca,
            dir,
            netns,
        };
        upstream.push_soci_index().await?;
        Ok(upstream)
    }

    /// `10.99.0.2:5000`.
    pub fn host(&self) -> String {
        format!("{REGISTRY_ADDR}:{REGISTRY_PORT}")
    }

    /// The image by the registry's own address.
    pub fn reference(&self) -> String {
        format!("{}/{REPOSITORY}:{TAG}", self.host())
    }

    pub fn netns(&self) -> &Netns {
        &self.netns.0
    }

    /// A containerd 2.1 in the namespace, pulling straight from the registry (hosts dir with
    /// its CA), then `soci create` and `soci push` on a store of its own. Leaves nothing running.
    async fn push_soci_index(&self) -> Result<()> {
        let builder_dir = self.dir.path().join("builder");
        let hosts = builder_dir.join("hosts");
        let root = builder_dir.join("soci");
        std::fs::create_dir_all(&root)?;
        write_registry_hosts(&hosts, &self.host(), &self.ca, None)?;
        let containerd = Containerd::start_with(ContainerdOptions {
            release: Release::V2_1,
            netns: Some(self.netns().clone()),
            parent: Some(builder_dir.clone()),
            ..ContainerdOptions::default()
        })
        .await?;
        let reference = self.reference();
        containerd.pull(&reference, &hosts).await?;
        let env = [("SSL_CERT_FILE".to_owned(), self.ca.display().to_string())];
        soci_cli(self.netns(), &root, &env, &containerd, &["create", &reference]).await?;
        soci_cli(self.netns(), &root, &env, &containerd, &["push", &reference]).await?;
        Ok(())
    }

    /// The registry's requests for the layer after the first `before` of its access log.
    pub async fn layer_requests_since(&self, before: usize) -> Result<Vec<AccessLogEntry>> {
        let all = self.registry.requests_since(before).await?;
        Ok(all
            .into_iter()
            .filter(|e| e.path().ends_with(&self.image.layer_digest))
            .collect())
    }

    /// Whether an access-log entry is a GET of the whole layer: a 200, or a 206 of every byte
    /// (`bytes=0-`). The log has no Range header; a ranged answer is a 206 of fewer bytes.
    pub fn is_whole_layer(&self, entry: &AccessLogEntry) -> bool {
        entry.method == "GET" && (entry.status == 200 || entry.bytes == self.image.layer_size)
    }
}

/// `<hosts>/<host>/hosts.toml` for containerd's resolver (soci's CLI has one too): `server`
/// the registry over HTTPS with `ca`, and `mirror` (a URL) first if given.
fn write_registry_hosts(hosts: &Path, host: &str, ca: &Path, mirror: Option<&str>) -> Result<()> {
    let dir = hosts.join(containerd::hosts_dir_name(host));
    std::fs::create_dir_all(&dir)?;
    let ca = serde_json::to_string(&ca.display().to_string())?;
    let mut body = format!("server = \"https://{host}\"\n");
    if let Some(mirror) = mirror {
        body.push_str(&format!(
            "\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ));
    }
    body.push_str(&format!(
        "\n[host.\"https://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = {ca}\n"
    ));
    std::fs::write(dir.join("hosts.toml"), body)?;
    Ok(())
}

/// How a node reaches the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// soci and its CLI straight to the registry.
    Direct,
    /// pullcache as soci's `[[resolver.host."REG".mirrors]]` (plain HTTP on loopback) and as
    /// the CLI's hosts.toml mirror; pullcache's `--default-registry` names REG, since soci's
    /// mirror requests carry no `ns`. The SOCI index still comes from REG itself.
    Mirror,
    /// pullcache as `HTTPS_PROXY`, its CA in `SSL_CERT_FILE`, for soci and its CLI; the image
    /// is pulled by [`INTERCEPTED_NAME`], which pullcache maps to the registry.
    Intercept,
}

/// The soci-snapshotter config for `route` (what the README shows): background fetch off, so
/// that only on-demand reads reach the registry, and in mirror mode pullcache as mirror.
pub fn snapshotter_config(route: Route, registry_host: &str) -> String {
    let mut config = String::from("[background_fetch]\ndisable = true\n");
    if route == Route::Mirror {
        config.push_str(&format!(
            "\n[[resolver.host.\"{registry_host}\".mirrors]]\nhost = \"{PULLCACHE_LISTEN}\"\ninsecure = true\n"
        ));
    }
    config
}

/// soci-snapshotter-grpc in the upstream's namespace, its store in a temp dir seen at
/// [`FIXED_ROOT`] in its own mount namespace; killed on drop, which takes its FUSE mounts.
pub struct Snapshotter {
    child: Option<Child>,
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Snapshotter {
    async fn start(netns: &Netns, dir: &Path, config: &str, env: &[(String, String)]) -> Result<Snapshotter> {
        let root = dir.join("soci-root");
        std::fs::create_dir_all(&root)?;
        let config_path = dir.join("soci.toml");
        std::fs::write(&config_path, config)?;
        let (socket, log) = (dir.join("soci.sock"), dir.join("soci.log"));
        let out = std::fs::File::create(&log)?;
        let mut cmd = with_private_root(netns, &root, bin_dir()?.join("soci-snapshotter-grpc"));
        cmd.arg("-address")
            .arg(&socket)
            .arg("-config")
            .arg(&config_path)
            .args(["-root", FIXED_ROOT, "-log-level", "debug"])
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        let child = cmd.spawn().context("starting soci-snapshotter-grpc")?;
        let mut snapshotter = Snapshotter {
            child: Some(child),
            root,
            socket,
            log,
        };
        let started = eventually(START_TIMEOUT, "soci-snapshotter-grpc to serve", || {
            let exited = snapshotter.child.as_mut().and_then(|c| c.try_wait().transpose());
            let serving = snapshotter.socket.exists();
            async move {
                if let Some(status) = exited {
                    bail!("soci-snapshotter-grpc exited: {status:?}");
                }
                Ok(serving)
            }
        })
        .await;
        started.with_context(|| log_tail(&snapshotter.log, 30))?;
        Ok(snapshotter)
    }

    fn pid(&self) -> Result<u32> {
        self.child
            .as_ref()
            .and_then(Child::id)
            .context("soci-snapshotter-grpc is not running")
    }

    /// Its FUSE mounts (mount points, as it sees them).
    pub fn fuse_mounts(&self) -> Result<Vec<String>> {
        let info = std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid()?))?;
        // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER`.
        Ok(info
            .lines()
            .filter(|line| line.split_once(" - ").is_some_and(|(_, fs)| fs.starts_with("fuse")))
            .filter_map(|line| line.split(' ').nth(4).map(str::to_owned))
            .collect())
    }

    /// `path` in the filesystem mounted at `mount_point` (as [`Snapshotter::fuse_mounts`]
    /// names it), read whole through `/proc/<pid>/root`, within `timeout`.
    pub async fn read(&self, mount_point: &str, path: &str, timeout: Duration) -> Result<Vec<u8>> {
        let file = PathBuf::from(format!("/proc/{}/root{mount_point}/{path}", self.pid()?));
        match tokio::time::timeout(timeout, tokio::fs::read(&file)).await {
            Ok(read) => read.with_context(|| format!("reading {}", file.display())),
            Err(_) => bail!("reading {} took over {timeout:?}", file.display()),
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child, Duration::from_secs(5));
        }
    }
}

/// A node that lazy-pulls the upstream's image by `route`: pullcache (the binary, in the
/// namespace, logs drained to a file) unless direct, soci-snapshotter, and containerd 2.1
/// with it as the `soci` proxy snapshotter. Dropped in reverse: nothing is left running.
pub struct LazyNode {
    pub route: Route,
    pub containerd: Containerd,
    pub snapshotter: Snapshotter,
    /// The pullcache process, unless direct.
    pub pullcache: Option<Child>,
    /// What `soci image rpull` runs with: its proxy environment, or its hosts dir.
    cli_env: Vec<(String, String)>,
    hosts: Option<PathBuf>,
    reference: String,
    netns: Netns,
    dir: TempDir,
}

impl LazyNode {
    pub async fn start(upstream: &Upstream, route: Route) -> Result<LazyNode> {
        let dir = tempfile::Builder::new()
            .prefix("node-")
            .tempdir_in(upstream.dir.path())?;
        let netns = upstream.netns().clone();
        let host = upstream.host();
        let ca = upstream.ca.display().to_string();
        let upstream_url = format!("https://{host}");
        let (pullcache, env, reference) = match route {
            Route::Direct => (None, vec![("SSL_CERT_FILE".to_owned(), ca)], upstream.reference()),
            Route::Mirror => {
                let args = [
                    "--default-registry".to_owned(),
                    host.clone(),
                    "--upstream".to_owned(),
                    format!("{host}={upstream_url}"),
                ];
                let served = start_pullcache(&netns, dir.path(), &upstream.ca, &args).await?;
                (
                    Some(served),
                    vec![("SSL_CERT_FILE".to_owned(), ca)],
                    upstream.reference(),
                )
            }
            Route::Intercept => {
                let ca_dir = dir.path().join("pullcache-ca");
                let args = [
                    "--ca-dir".to_owned(),
                    ca_dir.display().to_string(),
                    "--intercept".to_owned(),
                    INTERCEPTED_NAME.to_owned(),
                    "--upstream".to_owned(),
                    format!("{INTERCEPTED_NAME}={upstream_url}"),
                ];
                let served = start_pullcache(&netns, dir.path(), &upstream.ca, &args).await?;
                let bundle = ca_dir.join(pullcache::ca::CERT_FILE);
                let env = containerd::proxy_env(&format!("http://{PULLCACHE_LISTEN}"), &bundle);
                (Some(served), env, format!("{INTERCEPTED_NAME}/{REPOSITORY}:{TAG}"))
            }
        };
        let hosts = (route != Route::Intercept).then(|| dir.path().join("hosts"));
        if let Some(hosts) = &hosts {
            let mirror = format!("http://{PULLCACHE_LISTEN}");
            let mirror = (route == Route::Mirror).then_some(mirror.as_str());
            write_registry_hosts(hosts, &host, &upstream.ca, mirror)?;
        }
        let config = snapshotter_config(route, &host);
        let snapshotter = Snapshotter::start(&netns, dir.path(), &config, &env).await?;
        let containerd = Containerd::start_with(ContainerdOptions {
            release: Release::V2_1,
            netns: Some(netns.clone()),
            parent: Some(dir.path().to_owned()),
            proxy_snapshotter: Some((SNAPSHOTTER.to_owned(), snapshotter.socket.clone())),
            ..ContainerdOptions::default()
        })
        .await?;
        Ok(LazyNode {
            route,
            containerd,
            snapshotter,
            pullcache,
            cli_env: env,
            hosts,
            reference,
            netns,
            dir,
        })
    }

    /// The reference this node pulls.
    pub fn reference(&self) -> &str {
        &self.reference
    }

    /// `soci image rpull` of the image; how long it took.
    pub async fn rpull(&self) -> Result<Duration> {
        let mut args = vec!["image", "rpull"];
        let hosts = self.hosts.as_ref().map(|h| h.display().to_string());
        if let Some(hosts) = &hosts {
            args.extend(["--hosts-dir", hosts]);
        }
        args.push(&self.reference);
        let started = Instant::now();
        let root = &self.snapshotter.root;
        let result = soci_cli(&self.netns, root, &self.cli_env, &self.containerd, &args).await;
        result.with_context(|| log_tail(self.snapshotter.log_path(), 20))?;
        Ok(started.elapsed())
    }

    /// The mount point of the image's one layer: the snapshotter's only FUSE mount.
    pub fn layer_mount(&self) -> Result<String> {
        let mounts = self.snapshotter.fuse_mounts()?;
        match mounts.as_slice() {
            [one] => Ok(one.clone()),
            _ => bail!(
                "expected one FUSE mount (a lazily mounted layer), found {mounts:?}\n{}",
                log_tail(self.snapshotter.log_path(), 30)
            ),
        }
    }

    /// Reads [`MARKER_PATH`] from the mounted layer; its bytes and how long the read took.
    pub async fn read_marker(&self, timeout: Duration) -> Result<(Vec<u8>, Duration)> {
        let mount = self.layer_mount()?;
        let started = Instant::now();
        let bytes = self.snapshotter.read(&mount, MARKER_PATH, timeout).await?;
        Ok((bytes, started.elapsed()))
    }

    /// pullcache's log so far (JSON lines), for failure messages.
    pub fn pullcache_log(&self) -> String {
        log_tail(&self.dir.path().join("pullcache.log"), 40)
    }
}

/// `pullcache serve` in `netns` on [`PULLCACHE_LISTEN`], its cache in `dir`, trusting `ca` for
/// the registry, with `args` added; ready. Its log goes to `dir/pullcache.log`; the process is
/// killed when the returned child is dropped.
async fn start_pullcache(netns: &Netns, dir: &Path, ca: &Path, args: &[String]) -> Result<Child> {
    let mut all = vec![
        "--cache-dir".to_owned(),
        dir.join("cache").display().to_string(),
        "--upstream-ca".to_owned(),
        ca.display().to_string(),
    ];
    all.extend_from_slice(args);
    let served = binary::serve_in(Some(netns), PULLCACHE_LISTEN, &all, "pullcache=debug").await?;
    served.wait_ready().await?;
    let Served {
        child,
        mut stdout,
        logs,
        ..
    } = served;
    // Drain its log (a full pipe would stall it) into a file.
    let mut log = std::fs::File::create(dir.join("pullcache.log"))?;
    log.write_all(logs.as_bytes())?;
    tokio::spawn(async move {
        while let Ok(Some(line)) = stdout.next_line().await {
            let _ = writeln!(log, "{line}");
        }
    });
    Ok(child)
}
