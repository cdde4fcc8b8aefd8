//! The real client: a private containerd driven with `ctr`, or with its CRI plugin on and
//! driven through `super::cri` as the kubelet does, plus hosts.toml writing. Three releases
//! ([`Release`]): Debian bookworm's 1.6 (`/usr/bin/containerd`), and trixie's 1.7 and sid's 2.1
//! as `tests/fetch-containerd.sh` extracts them.
//!
//! Verified with containerd 1.6.20 (see tests/harness/containerd.rs):
//! * Every request to a host that is not the ref's own registry host (mirror
//!   AND `server`) carries `?ns=<ref registry host>`, e.g.
//!   `HEAD /v2/foo/bar/manifests/v1?ns=testreg.local`. A ref `127.0.0.1:PORT/..`
//!   sent to that same host gets no `ns`.
//! * Tag pull: `HEAD /v2/<repo>/manifests/<tag>?ns=..` with `Accept:
//!   application/vnd.docker.distribution.manifest.v2+json,
//!   application/vnd.docker.distribution.manifest.list.v2+json,
//!   application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*`
//!   (a GET follows only if the HEAD lacks Docker-Content-Digest or Content-Length).
//!   Then `GET /v2/<repo>/manifests/sha256:..?ns=..` with `Accept: <descriptor
//!   media type>, */*`, then `GET /v2/<repo>/blobs/sha256:..?ns=..` with
//!   `Accept: <descriptor media type>, */*` and `Accept-Encoding: gzip`.
//!   User-Agent `containerd/1.6.20~ds1`. No HEAD on blobs.
//! * Hosts are tried in order (mirrors, then `server`) for EVERY request:
//!   404, 4xx/5xx or a connection error on the mirror falls through to the
//!   next host. A dead `server` (127.0.0.1:1) fails the pull in ~15 ms
//!   ("connection refused"). hosts.toml has no `dial_timeout` in 1.6.
//! * hosts dir lookup for `host:port` tries `<host>_<port>_` then `<host>:<port>`;
//!   `docker.io/...` refs use the `docker.io` entry.
//!
//! Through an HTTPS proxy ([`Containerd::pull_via_proxy`]: no hosts dir,
//! `HTTPS_PROXY` + `SSL_CERT_FILE`), verified with a TLS-terminating test proxy:
//! * ctr (the fetch runs in the ctr process, so its env applies) sends
//!   `CONNECT registry.test.invalid:443 HTTP/1.1` with only `Host:
//!   registry.test.invalid:443` and `User-Agent: Go-http-client/1.1`
//!   (`Proxy-Authorization: Basic ..` only if the proxy URL has `user:pass@`).
//!   It never resolves the registry host itself (no DNS, no /etc/hosts).
//! * Inside the tunnel: SNI = the registry host, NO ALPN extension at all
//!   (HTTP/1.1 only, even if the server offers h2), TLS 1.3. The first request
//!   is `HEAD /v2/<repo>/manifests/<tag>` (no `GET /v2/` ping, no `?ns=`),
//!   `Host: registry.test.invalid`, headers as above. Several tunnels are
//!   opened in parallel; some may carry no request at all.
//! * `SSL_CERT_FILE` is honoured (read in addition to /etc/ssl/certs); a CA
//!   missing from it fails with `x509: certificate signed by unknown authority`.
//! * A non-200 answer to CONNECT fails the pull with its reason phrase, e.g.
//!   `failed to do request: Head "https://registry.test.invalid/v2/test/app/manifests/v1": Forbidden`.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use super::cri::Cri;
use super::netns::{Netns, command_in};
use super::{check_status, kill_and_reap, log_tail};

/// Where `tests/fetch-containerd.sh` extracts the releases beside the system's (one
/// directory per Debian suite); `PULLCACHE_CONTAINERD_DIR` overrides it.
const RELEASES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/containerd");

/// A containerd release the end-to-end tests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Release {
    /// 1.6.20, Debian bookworm's, the system's own.
    #[default]
    V1_6,
    /// 1.7.24, Debian trixie's.
    V1_7,
    /// 2.1.9, Debian sid's: config version 3, and `ctr` pulls through the daemon's transfer
    /// service.
    V2_1,
}

impl Release {
    pub const ALL: [Release; 3] = [Release::V1_6, Release::V1_7, Release::V2_1];

    pub fn name(self) -> &'static str {
        match self {
            Release::V1_6 => "containerd 1.6",
            Release::V1_7 => "containerd 1.7",
            Release::V2_1 => "containerd 2.1",
        }
    }

    fn bin_dir(self) -> PathBuf {
        let suite = match self {
            Release::V1_6 => return PathBuf::from("/usr/bin"),
            Release::V1_7 => "trixie",
            Release::V2_1 => "sid",
        };
        let root =
            std::env::var_os("PULLCACHE_CONTAINERD_DIR").map_or_else(|| PathBuf::from(RELEASES_DIR), PathBuf::from);
        root.join(suite).join("usr/bin")
    }

    /// Its daemon binary. Err, naming the fix, when it is not there.
    pub fn containerd(self) -> Result<PathBuf> {
        let bin = self.bin_dir().join("containerd");
        anyhow::ensure!(
            bin.is_file(),
            "{} is not at {}: run tests/install-deps.sh (tests/fetch-containerd.sh fetches it)",
            self.name(),
            bin.display()
        );
        Ok(bin)
    }

    /// Its `ctr`.
    pub fn ctr(self) -> PathBuf {
        self.bin_dir().join("ctr")
    }

    /// Whether `ctr images pull` is fetched by the daemon (2.x: the transfer service, with the
    /// daemon's environment) rather than by `ctr` itself.
    pub fn ctr_pulls_in_daemon(self) -> bool {
        self == Release::V2_1
    }
}
/// Snapshotter used for unpacking: `native` needs no mounts (works in any sandbox,
/// nothing to clean up). `overlayfs` also works on this machine but leaves
/// mounts behind if containerd is killed mid-unpack.
pub const SNAPSHOTTER: &str = "native";
/// The namespace of `ctr` pulls; CRI pulls land in [`CRI_NAMESPACE`](super::cri::CRI_NAMESPACE).
pub const NAMESPACE: &str = "default";
const START_TIMEOUT: Duration = Duration::from_secs(20);
pub const PULL_TIMEOUT: Duration = Duration::from_secs(120);

/// How a test pulls: `ctr images pull --hosts-dir` (the fetch runs in `ctr`), or the CRI
/// `PullImage` the kubelet sends (the fetch runs in the daemon, hosts from its `config_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Puller {
    Ctr,
    Cri,
}

impl Puller {
    /// A `release` containerd this puller can pull with: with CRI, its `config_path` is `hosts`.
    pub async fn start(self, release: Release, hosts: &Path) -> Result<Containerd> {
        let options = match self {
            Puller::Ctr => ContainerdOptions::default(),
            Puller::Cri => ContainerdOptions::cri(hosts),
        };
        Containerd::start_with(options.of(release)).await
    }
}

/// Runs `pullcache containerd-config install --certs-dir CERTS_D --mirror MIRROR --registry
/// REGISTRY`, the real binary, as an operator wires a node. With `containerd`, also
/// `--containerd-config <its config> --containerd-bin <its binary> --strict`: it fails unless
/// that containerd's CRI `config_path` (set in a drop-in its config imports) is `certs_d`.
pub fn containerd_config_install(
    certs_d: &Path,
    mirror: &str,
    registry: &str,
    containerd: Option<&Containerd>,
) -> Result<()> {
    let mut cmd = std::process::Command::new(super::binary::BIN);
    cmd.args(["containerd-config", "install", "--certs-dir"])
        .arg(certs_d)
        .args(["--mirror", mirror, "--registry", registry]);
    match containerd {
        Some(containerd) => cmd
            .arg("--strict")
            .arg("--containerd-config")
            .arg(containerd.config_path())
            .arg("--containerd-bin")
            .arg(containerd.release.containerd()?),
        None => cmd.args(["--containerd-config", "/nonexistent/config.toml"]),
    };
    let out = cmd.output().context("running pullcache containerd-config install")?;
    check_status("pullcache containerd-config install", out)?;
    Ok(())
}

/// How to start a [`Containerd`]. The default is the `ctr` setup: no CRI plugin, under /tmp,
/// in the current network namespace.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// Which containerd.
    pub release: Release,
    /// Where containerd and every `ctr` run (in 1.6 a `ctr` pull is fetched by `ctr` itself).
    pub netns: Option<Netns>,
    /// The parent of its temp dir; keep that path short, the sockets are in it. Default /tmp.
    pub parent: Option<PathBuf>,
    /// Enables the CRI plugin, with its registry `config_path` here (a certs.d directory, as
    /// `pullcache containerd-config install` writes). A CRI pull runs inside the daemon.
    pub cri_config_path: Option<PathBuf>,
    /// The daemon's own environment on top of a proxy-free one (see [`Containerd::start_with`]):
    /// what a CRI pull sees, e.g. [`proxy_env`] for intercept mode.
    pub env: Vec<(String, String)>,
    /// 2.1's parallel layer fetch: each layer in chunks of this many bytes, four at a time
    /// (`concurrent_layer_fetch_buffer` and `max_concurrent_downloads` of the transfer
    /// service, which `ctr` and CRI pulls both go through), each an open-ended `Range:
    /// bytes=N-` request.
    pub parallel_fetch: Option<u64>,
    /// A snapshotter of its own process (`[proxy_plugins.NAME]`, type `snapshot`), as
    /// soci-snapshotter is wired: `(NAME, its gRPC socket)`. Pulls name it with `--snapshotter NAME`.
    pub proxy_snapshotter: Option<(String, PathBuf)>,
}

impl ContainerdOptions {
    /// The CRI plugin on, its registry `config_path` = `certs_d`.
    pub fn cri(certs_d: &Path) -> ContainerdOptions {
        ContainerdOptions {
            cri_config_path: Some(certs_d.to_owned()),
            ..ContainerdOptions::default()
        }
    }

    /// These options, for `release`.
    pub fn of(self, release: Release) -> ContainerdOptions {
        ContainerdOptions { release, ..self }
    }
}

/// A private containerd with its own root, state and sockets in a tempdir
/// under /tmp (short socket paths); unused snapshotters disabled, CRI only when asked.
pub struct Containerd {
    child: Option<Child>,
    dir: TempDir,
    socket: PathBuf,
    /// Where containerd and every `ctr` run: in 1.6 a pull is fetched by `ctr` itself.
    netns: Option<Netns>,
    cri: bool,
    release: Release,
    /// The daemon's own environment on top of a proxy-free one.
    env: Vec<(String, String)>,
}

impl Containerd {
    pub async fn start() -> Result<Containerd> {
        Self::start_with(ContainerdOptions::default()).await
    }

    /// Starts containerd inside `netns` (if any), its temp dir in `parent` (keep that path
    /// short: the sockets are in it). `ctr` runs inside too, so the registry traffic of a
    /// pull leaves from that namespace.
    pub async fn start_in(netns: Option<Netns>, parent: &Path) -> Result<Containerd> {
        Self::start_with(ContainerdOptions {
            netns,
            parent: Some(parent.to_owned()),
            ..ContainerdOptions::default()
        })
        .await
    }

    /// Starts containerd with the CRI plugin on, its registry `config_path` = `certs_d`.
    pub async fn start_cri(certs_d: &Path) -> Result<Containerd> {
        Self::start_with(ContainerdOptions::cri(certs_d)).await
    }

    /// Starts containerd as `options` say. The daemon's environment has no proxy variables
    /// ([`PROXY_VARS`], `NO_PROXY`, `no_proxy`) and no `SSL_CERT_DIR` from the test's own, then
    /// `options.env` on top. With CRI, ready means the CRI image service answers (it refuses
    /// calls until it has recovered its state, a moment after the socket serves).
    pub async fn start_with(options: ContainerdOptions) -> Result<Containerd> {
        let ContainerdOptions {
            release,
            parallel_fetch,
            netns,
            parent,
            cri_config_path,
            env,
            proxy_snapshotter,
        } = options;
        // /tmp keeps the socket path far below the 107-byte limit.
        let parent = parent.unwrap_or_else(|| PathBuf::from("/tmp"));
        let dir = tempfile::Builder::new()
            .prefix("pc-ctd")
            .tempdir_in(&parent)
            .context("creating containerd tempdir")?;
        let d = dir.path();
        let socket = d.join("c.sock");
        anyhow::ensure!(
            parallel_fetch.is_none() || release == Release::V2_1,
            "{} has no parallel layer fetch",
            release.name()
        );
        let config_path = write_daemon_config(release, d, &socket, cri_config_path.as_deref(), parallel_fetch)?;
        if let Some((name, address)) = &proxy_snapshotter {
            let mut config = std::fs::OpenOptions::new().append(true).open(&config_path)?;
            std::io::Write::write_all(
                &mut config,
                format!(
                    "\n[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                    address.display()
                )
                .as_bytes(),
            )
            .context("adding the proxy snapshotter to containerd's config")?;
        }
        let bin = release.containerd()?;
        let log_path = d.join("containerd.log");
        let log = std::fs::File::create(&log_path).context("creating containerd log")?;
        let deadline = Instant::now() + START_TIMEOUT;
        let mut cmd = command_in(netns.as_ref(), &bin);
        without_proxy(&mut cmd);
        for var in ["NO_PROXY", "no_proxy", "SSL_CERT_DIR"] {
            cmd.env_remove(var);
        }
        cmd.envs(env.clone());
        let mut child = cmd
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;

        let ctd = loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "containerd exited during startup with {status}\n{}",
                    log_tail(&log_path, 40)
                );
            }
            if socket.exists() && ready(release, netns.as_ref(), &socket, cri_config_path.is_some()).await {
                break Containerd {
                    child: Some(child),
                    dir,
                    socket,
                    netns,
                    cri: cri_config_path.is_some(),
                    release,
                    env,
                };
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                bail!(
                    "containerd not ready after {START_TIMEOUT:?}\n{}",
                    log_tail(&log_path, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Ok(ctd)
    }

    /// Which containerd this is.
    pub fn release(&self) -> Release {
        self.release
    }

    /// A CRI client on this containerd's socket (started with the CRI plugin on).
    pub async fn cri(&self) -> Result<Cri> {
        anyhow::ensure!(self.cri, "this containerd was started without the CRI plugin");
        Cri::connect(&self.socket).await
    }

    /// Its config.toml (what `pullcache containerd-config install --containerd-config` reads).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// Pulls `image_ref` as `puller` does, anonymously, and checks it is unpacked in the
    /// namespace that puller uses. `hosts` is `ctr --hosts-dir`; a CRI pull reads its hosts
    /// from the `config_path` this containerd started with instead.
    pub async fn pull_as(&self, puller: Puller, image_ref: &str, hosts: &Path) -> Result<()> {
        let namespace = match puller {
            Puller::Ctr => {
                self.pull(image_ref, hosts).await?;
                NAMESPACE
            }
            Puller::Cri => {
                let cri = self.cri().await?;
                cri.pull_image(image_ref, None).await?;
                let status = cri.image_status(image_ref).await?;
                let tags = status.map(|s| s.repo_tags).unwrap_or_default();
                anyhow::ensure!(
                    tags.iter().any(|t| t == image_ref),
                    "ImageStatus after PullImage of {image_ref}: tags {tags:?}"
                );
                super::cri::CRI_NAMESPACE
            }
        };
        anyhow::ensure!(
            self.is_unpacked_in(namespace, image_ref).await?,
            "{image_ref} did not unpack"
        );
        Ok(())
    }

    /// The gRPC socket (`ctr -a`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("containerd.log")
    }

    /// Run `ctr -a SOCK -n default ARGS...` (bounded by `timeout`); returns the
    /// output whatever the exit status.
    pub async fn ctr_raw(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        ctr_output(&self.release.ctr(), self.netns.as_ref(), &self.socket, args, timeout).await
    }

    /// Like [`Containerd::ctr_raw`] with a 30 s bound, but a non-zero exit is an error.
    pub async fn ctr(&self, args: &[&str]) -> Result<Output> {
        let out = ctr_output(
            &self.release.ctr(),
            self.netns.as_ref(),
            &self.socket,
            args,
            Duration::from_secs(30),
        )
        .await?;
        check_status(&format!("ctr {}", args.join(" ")), out)
    }

    /// `ctr images pull --hosts-dir HOSTS_DIR --snapshotter native IMAGE_REF`
    /// (unpacks too). Err with stdout/stderr on failure or after 120 s.
    pub async fn pull(&self, image_ref: &str, hosts_dir: &Path) -> Result<Output> {
        self.pull_with_args(image_ref, hosts_dir, &[]).await
    }

    /// [`Containerd::pull`] with extra flags (e.g. `--all-platforms`, `--platform linux/arm64`).
    pub async fn pull_with_args(&self, image_ref: &str, hosts_dir: &Path, extra: &[&str]) -> Result<Output> {
        let hosts = hosts_dir.to_str().context("hosts dir not UTF-8")?;
        let mut args = vec!["images", "pull", "--hosts-dir", hosts, "--snapshotter", SNAPSHOTTER];
        args.extend_from_slice(extra);
        args.push(image_ref);
        let out = ctr_output(
            &self.release.ctr(),
            self.netns.as_ref(),
            &self.socket,
            &args,
            PULL_TIMEOUT,
        )
        .await?;
        check_status(&format!("ctr images pull {image_ref}"), out)
    }

    /// `ctr images pull --snapshotter native IMAGE_REF` through an HTTPS
    /// proxy (no `--hosts-dir`): env `HTTPS_PROXY`/`https_proxy` = `proxy`
    /// (`http://127.0.0.1:PORT`), `SSL_CERT_FILE` = `ca_bundle` (PEM; Go's
    /// crypto/x509 trusts it, plus the system cert dirs), and
    /// `NO_PROXY`/`no_proxy`/`HTTP_PROXY`/`http_proxy`/`ALL_PROXY`/`all_proxy`/
    /// `SSL_CERT_DIR` removed. TLS verification stays on. Err with
    /// stdout/stderr on failure or after 120 s.
    pub async fn pull_via_proxy(&self, image_ref: &str, proxy: &str, ca_bundle: &Path) -> Result<Output> {
        self.pull_via_proxy_with_args(image_ref, proxy, ca_bundle, &[]).await
    }

    /// [`Containerd::pull_via_proxy`] with extra flags (e.g. `--all-platforms`).
    pub async fn pull_via_proxy_with_args(
        &self,
        image_ref: &str,
        proxy: &str,
        ca_bundle: &Path,
        extra: &[&str],
    ) -> Result<Output> {
        let mut args = vec!["images", "pull", "--snapshotter", SNAPSHOTTER];
        args.extend_from_slice(extra);
        args.push(image_ref);
        let out = self.ctr_via_proxy_raw(&args, proxy, ca_bundle, PULL_TIMEOUT).await?;
        check_status(&format!("ctr images pull {image_ref} (via proxy {proxy})"), out)
    }

    /// Run `ctr -a SOCK -n default ARGS...` with the proxy environment of
    /// [`Containerd::pull_via_proxy`] (bounded by `timeout`); returns the
    /// output whatever the exit status (for asserting on failures).
    pub async fn ctr_via_proxy_raw(
        &self,
        args: &[&str],
        proxy: &str,
        ca_bundle: &Path,
        timeout: Duration,
    ) -> Result<Output> {
        // 2.x: the daemon fetches, with the environment it was started with.
        anyhow::ensure!(
            !self.release.ctr_pulls_in_daemon() || self.env == proxy_env(proxy, ca_bundle),
            "{} pulls in the daemon: start it with ContainerdOptions::env = proxy_env({proxy}, ..)",
            self.release.name()
        );
        let mut cmd = ctr_command(&self.release.ctr(), self.netns.as_ref(), &self.socket, NAMESPACE, args);
        set_proxy_env(&mut cmd, proxy, ca_bundle);
        output_within(cmd, &format!("ctr {} (via proxy {proxy})", args.join(" ")), timeout).await
    }

    /// True if the image exists and its rootfs is unpacked in the `native`
    /// snapshotter (containerd's own `Image.IsUnpacked`, via `ctr images check`:
    /// it computes the chain ID from the config's diff_ids and stats the
    /// committed snapshot). Err if the image is unknown. For `ctr` pulls (namespace `default`).
    pub async fn is_unpacked(&self, image_ref: &str) -> Result<bool> {
        self.is_unpacked_in(NAMESPACE, image_ref).await
    }

    /// [`Containerd::is_unpacked`] in `namespace`: [`super::cri::CRI_NAMESPACE`] for CRI pulls.
    pub async fn is_unpacked_in(&self, namespace: &str, image_ref: &str) -> Result<bool> {
        let out = self
            .ctr_in(namespace, &["images", "check", "--snapshotter", SNAPSHOTTER])
            .await?;
        let text = String::from_utf8_lossy(&out.stdout);
        // REF TYPE DIGEST STATUS... SIZE UNPACKED (STATUS may contain spaces).
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.first() == Some(&image_ref) {
                return match cols.last() {
                    Some(&"true") => Ok(true),
                    Some(&"false") => Ok(false),
                    _ => bail!("cannot parse `ctr images check` line: {line}"),
                };
            }
        }
        bail!("image {image_ref} not found in `ctr -n {namespace} images check`:\n{text}")
    }

    /// Whether the content store holds a blob with this digest (namespace `default`).
    pub async fn has_content(&self, digest: &str) -> Result<bool> {
        self.has_content_in(NAMESPACE, digest).await
    }

    /// Whether `namespace`'s view of the content store holds a blob with this digest
    /// ([`super::cri::CRI_NAMESPACE`] for CRI pulls; content is shared, but labelled per namespace).
    pub async fn has_content_in(&self, namespace: &str, digest: &str) -> Result<bool> {
        let out = self.ctr_in(namespace, &["content", "ls", "-q"]).await?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == digest))
    }

    /// Remove an image and run garbage collection synchronously, so a later
    /// pull of it hits the network again.
    pub async fn remove_image(&self, image_ref: &str) -> Result<()> {
        self.ctr(&["images", "rm", "--sync", image_ref]).await?;
        Ok(())
    }

    /// Like [`Containerd::ctr`], in `namespace` (`ctr -n NAMESPACE`).
    pub async fn ctr_in(&self, namespace: &str, args: &[&str]) -> Result<Output> {
        let mut cmd = ctr_command(&self.release.ctr(), self.netns.as_ref(), &self.socket, namespace, args);
        without_proxy(&mut cmd);
        let what = format!("ctr -n {namespace} {}", args.join(" "));
        check_status(&what, output_within(cmd, &what, Duration::from_secs(30)).await?)
    }

    /// The containerd process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The native snapshotter leaves no mounts to clean up.
            kill_and_reap(&mut child, Duration::from_secs(2));
        }
    }
}

/// Writes the daemon's config.toml for a temp dir `d`, in `release`'s layout (version 2 for
/// 1.x, 3 for 2.x), and returns its path. With `cri_config_path`, the CRI plugin is on: images
/// unpack with the `native` snapshotter, its registry hosts come from that certs.d, and CNI
/// points at empty dirs inside `d` (the plugin loads without any CNI config: it logs "failed
/// to load cni during init" and its image service works). The CRI settings live in a drop-in,
/// `conf.d/cri.toml`, that the main file imports, as distributions ship them: `pullcache
/// containerd-config install` must read it to find `config_path`.
fn write_daemon_config(
    release: Release,
    d: &Path,
    socket: &Path,
    cri_config_path: Option<&Path>,
    parallel_fetch: Option<u64>,
) -> Result<PathBuf> {
    let v2 = release != Release::V2_1;
    // Nothing outside `d`: `opt` makes /opt/containerd, NRI a socket in /run/nri (1.7, 2.1).
    let mut disabled = vec![
        "io.containerd.snapshotter.v1.btrfs",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.snapshotter.v1.zfs",
        "io.containerd.tracing.processor.v1.otlp",
        "io.containerd.internal.v1.tracing",
        "io.containerd.internal.v1.opt",
    ];
    if release != Release::V1_6 {
        disabled.push("io.containerd.nri.v1.nri");
    }
    if v2 {
        disabled.push("io.containerd.snapshotter.v1.aufs");
    } else {
        disabled.extend([
            "io.containerd.snapshotter.v1.blockfile",
            "io.containerd.snapshotter.v1.erofs",
        ]);
    }
    if cri_config_path.is_none() {
        disabled.push("io.containerd.grpc.v1.cri");
        if !v2 {
            disabled.extend([
                "io.containerd.cri.v1.images",
                "io.containerd.cri.v1.runtime",
                "io.containerd.podsandbox.controller.v1.podsandbox",
                "io.containerd.grpc.v1.sandbox-controllers",
            ]);
        }
    }
    let conf_d = d.join("conf.d");
    let mut config = format!(
        r#"version = {version}
root = "{root}"
state = "{state}"
imports = ["{imports}"]
disabled_plugins = [{disabled}]

[grpc]
  address = "{grpc}"

[ttrpc]
  address = "{ttrpc}"

[debug]
  address = ""
  level = "debug"

[metrics]
  address = ""
"#,
        version = if v2 { 2 } else { 3 },
        root = d.join("root").display(),
        state = d.join("state").display(),
        // Absolute: 1.x resolves a relative pattern against its working directory.
        imports = conf_d.join("*.toml").display(),
        disabled = disabled.iter().map(|p| format!("\n  \"{p}\",")).collect::<String>() + "\n",
        grpc = socket.display(),
        ttrpc = d.join("t.sock").display(),
    );
    if !v2 {
        // `ctr images pull` unpacks through the transfer service: with the native snapshotter.
        config.push_str("\n[plugins.\"io.containerd.transfer.v1.local\"]\n");
        if let Some(chunk) = parallel_fetch {
            config.push_str(&format!(
                "  concurrent_layer_fetch_buffer = {chunk}\n  max_concurrent_downloads = 4\n"
            ));
        }
        config.push_str(&format!(
            r#"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux/amd64"
  snapshotter = "{SNAPSHOTTER}"
"#
        ));
    }
    std::fs::create_dir_all(&conf_d).context("creating containerd conf.d")?;
    if let Some(certs_d) = cri_config_path {
        let (cni_bin, cni_conf, certs_d) = (
            d.join("cni-bin").display().to_string(),
            d.join("cni-conf").display().to_string(),
            certs_d.display(),
        );
        let cri = if v2 {
            format!(
                r#"version = 2
[plugins."io.containerd.grpc.v1.cri"]
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{SNAPSHOTTER}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs_d}"
"#
            )
        } else {
            format!(
                r#"version = 3
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "{SNAPSHOTTER}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{certs_d}"
[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dir = "{cni_bin}"
  conf_dir = "{cni_conf}"
"#
            )
        };
        std::fs::write(conf_d.join("cri.toml"), cri).context("writing containerd conf.d/cri.toml")?;
    }
    let path = d.join("config.toml");
    std::fs::write(&path, config).context("writing containerd config")?;
    Ok(path)
}

/// Whether a starting containerd serves: `ctr version` answers and, with CRI, so does the CRI
/// image service.
async fn ready(release: Release, netns: Option<&Netns>, socket: &Path, cri: bool) -> bool {
    let out = ctr_output(&release.ctr(), netns, socket, &["version"], Duration::from_secs(3)).await;
    if !matches!(&out, Ok(o) if o.status.success()) {
        return false;
    }
    if !cri {
        return true;
    }
    match Cri::connect(socket).await {
        Ok(cri) => cri.image_fs_info().await.is_ok(),
        Err(_) => false,
    }
}

/// The daemon environment for intercept mode ([`ContainerdOptions::env`]): `HTTPS_PROXY` and
/// `https_proxy` = `proxy` (`http://127.0.0.1:PORT`), `SSL_CERT_FILE` = `ca_bundle` (PEM,
/// trusted besides the system's). A CRI pull then goes through the proxy, as `ctr` does with
/// [`set_proxy_env`].
pub fn proxy_env(proxy: &str, ca_bundle: &Path) -> Vec<(String, String)> {
    vec![
        ("HTTPS_PROXY".to_owned(), proxy.to_owned()),
        ("https_proxy".to_owned(), proxy.to_owned()),
        ("SSL_CERT_FILE".to_owned(), ca_bundle.display().to_string()),
    ]
}

/// Proxy variables removed for direct (non-proxied) runs, so loopback pulls and copies
/// never go through a proxy from the environment.
pub const PROXY_VARS: [&str; 6] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// `ctr -a SOCKET -n NAMESPACE ARGS...`, output captured, killed when dropped.
fn ctr_command(ctr: &Path, netns: Option<&Netns>, socket: &Path, namespace: &str, args: &[&str]) -> Command {
    let mut cmd = command_in(netns, ctr);
    cmd.arg("-a").arg(socket).arg("-n").arg(namespace).args(args);
    captured(&mut cmd);
    cmd
}

/// Sets `cmd` up for [`output_within`]: no stdin, both streams captured, killed when dropped.
pub fn captured(cmd: &mut Command) -> &mut Command {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
}

/// Removes [`PROXY_VARS`] from `cmd`'s environment.
pub fn without_proxy(cmd: &mut Command) -> &mut Command {
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs a command to completion, killing it after `timeout`; its output whatever the status.
pub async fn output_within(mut cmd: Command, what: &str, timeout: Duration) -> Result<Output> {
    match tokio::time::timeout(timeout, cmd.output()).await {
        Ok(out) => out.with_context(|| format!("running {what}")),
        Err(_) => bail!("{what} timed out after {timeout:?} (killed)"),
    }
}

async fn ctr_output(
    ctr: &Path,
    netns: Option<&Netns>,
    socket: &Path,
    args: &[&str],
    timeout: Duration,
) -> Result<Output> {
    let mut cmd = ctr_command(ctr, netns, socket, NAMESPACE, args);
    without_proxy(&mut cmd);
    output_within(cmd, &format!("ctr {}", args.join(" ")), timeout).await
}

/// Proxy environment for a Go client (ctr, skopeo) that must reach
/// registries only through `proxy`: `HTTPS_PROXY`/`https_proxy` set,
/// `SSL_CERT_FILE` = `ca_bundle`, and everything that could bypass or
/// override that (`NO_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `SSL_CERT_DIR`, any
/// case) removed. Go reads `HTTPS_PROXY` before `https_proxy`; both are set
/// to the same value.
pub fn set_proxy_env(cmd: &mut Command, proxy: &str, ca_bundle: &Path) {
    for var in [
        "NO_PROXY",
        "no_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "SSL_CERT_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HTTPS_PROXY", proxy)
        .env("https_proxy", proxy)
        .env("SSL_CERT_FILE", ca_bundle);
}

/// Name of the hosts-dir entry for a registry host. containerd 1.6
/// (`remotes/docker/config.hostDirectory`) looks for `host_port_` first and
/// then `host:port`; we write the preferred `host_port_` form.
pub fn hosts_dir_name(registry_host: &str) -> String {
    match registry_host.rfind(':') {
        Some(idx) if idx > 0 => format!("{}_{}_", &registry_host[..idx], &registry_host[idx + 1..]),
        _ => registry_host.to_string(),
    }
}

/// Write `<hosts_dir>/<dir for registry_host>/hosts.toml`:
/// `server = "<server>"` plus `[host."<mirror>"]` with pull+resolve.
/// containerd 1.6 has no `dial_timeout` in hosts.toml (added in 1.7), so none
/// is written. `server` and `mirror` are full URLs (`http://127.0.0.1:PORT`).
pub fn write_hosts_toml(hosts_dir: &Path, registry_host: &str, server: &str, mirror: &str) {
    let body = format!("server = \"{server}\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n");
    write_hosts_file(hosts_dir, registry_host, &body);
}

/// Write a hosts.toml with only `server = "<server>"` (no mirror). containerd 1.6.20 (`ctr` and
/// CRI alike) ignores such a file for a named registry: with no `[host]` table, a
/// `registry.test/..` pull goes to `https://registry.test`, not to `server`. It is useful as an
/// operator's file for `pullcache containerd-config install` to merge, which adds a host.
pub fn write_hosts_toml_server_only(hosts_dir: &Path, registry_host: &str, server: &str) {
    write_hosts_file(hosts_dir, registry_host, &format!("server = \"{server}\"\n"));
}

fn write_hosts_file(hosts_dir: &Path, registry_host: &str, body: &str) {
    let dir = hosts_dir.join(hosts_dir_name(registry_host));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let file = dir.join("hosts.toml");
    std::fs::write(&file, body).unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
}
