//! The real upstream: CNCF distribution (`/usr/bin/docker-registry`) on an ephemeral loopback port,
//! or on a given address inside a network namespace ([`RegistryOptions::netns`]).
//!
//! Facts verified against distribution 2.8.2 (Debian):
//! * `http.addr: 127.0.0.1:0` works; the app log (stderr) then contains
//!   `msg="listening on 127.0.0.1:PORT"` with the real bound port.
//! * The access log goes to **stdout** (gorilla combined format, one line per
//!   request, written after the handler returns), the app log (logrus text,
//!   `time=... level=... msg="response completed" ...`) goes to **stderr**.
//!   We keep them in two files, so counting access lines never sees app lines:
//!   `127.0.0.1 - - [22/Nov/2026:05:09:30 +0000] "GET /v2/foo/manifests/x?ns=abc HTTP/1.1" 404 91 "" "curl/7.88.1"`
//! * With `http.tls` the app log says `msg="listening on 127.0.0.1:PORT, tls"`.
//!   A TLS or auth registry cannot be probed with our plain reqwest `GET /v2/`
//!   expecting 200, so readiness is: the `listening on` line (logged right
//!   after the socket is bound, right before serving), then a TCP connect for
//!   TLS, or `GET /v2/` answering 200 or (with auth) 401 for plain HTTP.
//! * Only one `auth` method can be configured at a time.
//! * Several registries can serve one storage directory
//!   ([`Registry::start_with`]): push to a plain one, then serve the same
//!   blobs from a TLS/auth one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;
use tokio::process::Child;

use super::netns::{Netns, command_in, curl_get};
use super::{eventually, http_client, kill_and_reap, log_tail};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// The query that marks [`Registry::settle`]'s own requests.
const SETTLE_MARK: &str = "pullcache-test-settle=";
/// How long a settle marker may take to be answered, and then to be logged.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// One parsed access-log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    /// The client's address, as the registry saw it.
    pub remote: String,
    pub method: String,
    /// Request target as sent: path plus `?query` if any.
    pub uri: String,
    pub status: u16,
    pub bytes: u64,
    pub user_agent: String,
}

impl AccessLogEntry {
    /// The request path without the query string.
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or("")
    }

    /// The query string (without `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.uri.split_once('?').map(|(_, q)| q)
    }

    /// Parse one combined-format line; `None` for anything else.
    pub fn parse(line: &str) -> Option<AccessLogEntry> {
        let remote = line.split(' ').next()?.to_string();
        let (_, rest) = line.split_once("] \"")?;
        let (request, rest) = rest.split_once('"')?;
        let mut req = request.split(' ');
        let method = req.next()?.to_string();
        let uri = req.next()?.to_string();
        if !req.next()?.starts_with("HTTP/") {
            return None;
        }
        let mut fields = rest.trim_start().splitn(3, ' ');
        let status = fields.next()?.parse().ok()?;
        let bytes = fields.next()?.parse().unwrap_or(0);
        // Remaining: "referer" "user-agent"
        let tail = fields.next().unwrap_or("");
        let user_agent = tail
            .rsplit_once(" \"")
            .map(|(_, ua)| ua.trim_end().trim_end_matches('"').to_string())
            .unwrap_or_default();
        Some(AccessLogEntry {
            remote,
            method,
            uri,
            status,
            bytes,
            user_agent,
        })
    }
}

/// `auth.token` settings (see `token_service::TokenService` for a matching issuer).
#[derive(Debug, Clone)]
pub struct TokenAuth {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    /// PEM bundle of the certificates whose keys may sign tokens.
    pub rootcertbundle: PathBuf,
}

/// What to turn on besides the plain-HTTP defaults. `htpasswd` and `token`
/// are mutually exclusive (distribution takes one auth method).
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// `(certificate, key)` PEM paths for `http.tls` (e.g. from `tls::TestCa::issue_server`).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// htpasswd file (bcrypt entries) for `auth.htpasswd`.
    pub htpasswd: Option<PathBuf>,
    pub token: Option<TokenAuth>,
    /// Where to listen instead of `127.0.0.1:0`.
    pub listen: Option<SocketAddr>,
    /// The network namespace to run in, and to probe readiness from.
    pub netns: Option<Netns>,
    /// Where to make its temp dir (config, logs) instead of the system's temp dir.
    pub dir_in: Option<PathBuf>,
}

impl RegistryOptions {
    fn has_auth(&self) -> bool {
        self.htpasswd.is_some() || self.token.is_some()
    }
}

/// Realm the registry announces for `auth.htpasswd`.
pub const BASIC_REALM: &str = "pullcache-test";

/// A running `docker-registry serve`; config and logs in a tempdir, storage
/// there too unless one was given to [`Registry::start_with`].
pub struct Registry {
    child: Option<Child>,
    addr: SocketAddr,
    dir: TempDir,
    storage: PathBuf,
    opts: RegistryOptions,
}

impl Registry {
    /// Start a fresh registry on `127.0.0.1:<ephemeral>` with empty storage.
    pub async fn start() -> Result<Registry> {
        Self::start_with(RegistryOptions::default(), None).await
    }

    /// Start with TLS and/or auth, on `storage` if given (created if missing;
    /// never deleted by this helper, so several registries, one after the
    /// other or at once, can serve the same blobs), else on fresh storage.
    pub async fn start_with(opts: RegistryOptions, storage: Option<PathBuf>) -> Result<Registry> {
        if opts.htpasswd.is_some() && opts.token.is_some() {
            bail!("distribution supports only one auth method: set htpasswd or token, not both");
        }
        let parent = opts.dir_in.clone().unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("pc-registry")
            .tempdir_in(parent)
            .context("creating registry tempdir")?;
        let storage = storage.unwrap_or_else(|| dir.path().join("data"));
        let mut reg = Registry {
            child: None,
            addr: opts.listen.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()),
            dir,
            storage,
            opts,
        };
        reg.spawn_and_wait().await?;
        Ok(reg)
    }

    /// Start again after [`Registry::stop`], on the SAME port with the same
    /// storage (blobs pushed before are still there). Logs are appended to.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.spawn_and_wait().await {
                Ok(()) => return Ok(()),
                // The port may linger briefly; retry a few times.
                Err(e) if Instant::now() < deadline => {
                    eprintln!("registry restart failed, retrying: {e:#}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        let config_path = self.dir.path().join("config.yml");
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {addr}\n  secret: pullcache-test-secret\n",
            data = yaml_str(&self.storage.display().to_string()),
            addr = self.addr,
        );
        if let Some((cert, key)) = &self.opts.tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                yaml_str(&cert.display().to_string()),
                yaml_str(&key.display().to_string()),
            ));
        }
        if let Some(path) = &self.opts.htpasswd {
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: {BASIC_REALM}\n    path: {}\n",
                yaml_str(&path.display().to_string()),
            ));
        }
        if let Some(t) = &self.opts.token {
            config.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                yaml_str(&t.realm),
                yaml_str(&t.service),
                yaml_str(&t.issuer),
                yaml_str(&t.rootcertbundle.display().to_string()),
            ));
        }
        std::fs::write(&config_path, config).context("writing registry config")?;

        let app_log = self.app_log_path();
        let app_offset = std::fs::metadata(&app_log).map(|m| m.len()).unwrap_or(0);
        let open_append = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))
        };
        let stdout = open_append(&self.access_log_path())?;
        let stderr = open_append(&app_log)?;

        let mut cmd = command_in(self.opts.netns.as_ref(), REGISTRY_BIN);
        cmd.arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        for (k, _) in std::env::vars() {
            if k.starts_with("REGISTRY_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {REGISTRY_BIN} (is docker-registry installed?)"))?;

        let deadline = Instant::now() + START_TIMEOUT;
        let mut bound: Option<SocketAddr> = None;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "docker-registry exited during startup with {status}\n{}",
                    log_tail(&app_log, 30)
                );
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                bail!(
                    "docker-registry not ready after {START_TIMEOUT:?} (bound address: {bound:?})\n{}",
                    log_tail(&app_log, 30)
                );
            }
            if bound.is_none() {
                bound = find_listen_addr(&app_log, app_offset);
            }
            if let Some(addr) = bound {
                self.addr = addr;
                if self.answers().await {
                    self.child = Some(child);
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the registry serves: `GET /v2/` answers 200, or 401 with auth. Probed from
    /// inside its namespace when it has one. Outside, reqwest here has no TLS: the bound socket
    /// accepting is enough (Serve starts right after the "listening on" log line).
    async fn answers(&self) -> bool {
        let expected = if self.opts.has_auth() { 401 } else { 200 };
        let url = format!("{}/v2/", self.url());
        if let Some(netns) = &self.opts.netns {
            return netns.http_status(&url).await == Some(expected);
        }
        if self.is_tls() {
            return tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(self.addr))
                .await
                .is_ok_and(|r| r.is_ok());
        }
        http_client()
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status() == expected)
    }

    /// `http://127.0.0.1:PORT`, or `https://127.0.0.1:PORT` with TLS.
    pub fn url(&self) -> String {
        let scheme = if self.is_tls() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn is_tls(&self) -> bool {
        self.opts.tls.is_some()
    }

    /// The options this registry was started with.
    pub fn options(&self) -> &RegistryOptions {
        &self.opts
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT` (what goes in an image reference / hosts dir name).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Storage root (`storage.filesystem.rootdirectory`); pass it to
    /// [`Registry::start_with`] to serve the same content from another registry.
    pub fn storage_dir(&self) -> PathBuf {
        self.storage.clone()
    }

    /// stdout of the registry: the access log only.
    pub fn access_log_path(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    /// stderr of the registry: the application (logrus) log.
    pub fn app_log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// All access-log entries so far (across restarts), in order; [`Registry::settle`]'s
    /// markers left out.
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        let text = std::fs::read_to_string(self.access_log_path()).unwrap_or_default();
        // Ignore a trailing line still being written (no '\n' yet).
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete
            .lines()
            .filter_map(AccessLogEntry::parse)
            .filter(|e| !e.query().is_some_and(|q| q.starts_with(SETTLE_MARK)))
            .collect()
    }

    /// Number of requests with exactly this `method` whose path (query string
    /// excluded) contains `path_contains`. Note the registry writes a line only
    /// once its handler returned, which may be a moment after the client saw
    /// the response: use [`Registry::wait_access_log_count`] right after requests.
    pub fn access_log_count(&self, method: &str, path_contains: &str) -> usize {
        self.access_log()
            .iter()
            .filter(|e| e.method == method && e.path().contains(path_contains))
            .count()
    }

    /// Polls until the count reaches `expected` (or `timeout` passes), then
    /// [`settles`](Registry::settle) to catch surplus lines; returns the final count.
    /// Panics when the registry does not settle.
    pub async fn wait_access_log_count(
        &self,
        method: &str,
        path_contains: &str,
        expected: usize,
        timeout: Duration,
    ) -> usize {
        // Short of `expected` at the deadline is the caller's to judge, from the count.
        let _ = eventually(
            timeout,
            format_args!("{expected} {method} {path_contains} in the access log"),
            || async { self.access_log_count(method, path_contains) >= expected },
        )
        .await;
        self.settle().await.expect("the registry's access log settles");
        self.access_log_count(method, path_contains)
    }

    /// The access-log entries after the first `before` (a count taken earlier from
    /// [`Registry::access_log`]), read once the log [settled](Registry::settle): empty when
    /// nothing reached the registry in between.
    pub async fn requests_since(&self, before: usize) -> Result<Vec<AccessLogEntry>> {
        self.settle().await?;
        Ok(self.access_log().into_iter().skip(before).collect())
    }

    /// Sends the registry a request of its own (a marker) and waits until the access log holds
    /// it. A line is written only once its handler returned, a moment after the client had
    /// the response: after this, every request answered before the call is in the log, so a
    /// count read now that shows no surplus request is a real absence, not a line still to
    /// come. The markers never show in [`Registry::access_log`].
    pub async fn settle(&self) -> Result<()> {
        static MARKS: AtomicUsize = AtomicUsize::new(0);
        let mark = format!("{SETTLE_MARK}{}", MARKS.fetch_add(1, Ordering::Relaxed));
        // Plain, TLS (curl -k) or with auth (a 401 is logged too), from its namespace if any.
        let url = format!("{}/v2/?{mark}", self.url());
        curl_get(self.opts.netns.as_ref(), &url, SETTLE_TIMEOUT)
            .await
            .context("sending the registry a settle marker")?;
        let wanted = format!("?{mark} ");
        eventually(SETTLE_TIMEOUT, "the registry to log the settle marker", || async {
            std::fs::read_to_string(self.access_log_path()).is_ok_and(|log| log.contains(&wanted))
        })
        .await
    }

    /// Kill the registry and wait for it to exit; the port is closed afterwards.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The registry process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child, Duration::from_secs(1));
        }
    }
}

fn find_listen_addr(app_log: &Path, offset: u64) -> Option<SocketAddr> {
    let bytes = std::fs::read(app_log).ok()?;
    let text = String::from_utf8_lossy(bytes.get(offset as usize..)?);
    text.lines().find_map(|l| {
        let (_, rest) = l.split_once("msg=\"listening on ")?;
        // `127.0.0.1:PORT` or, with TLS, `127.0.0.1:PORT, tls`.
        rest.split(['"', ',']).next()?.parse().ok()
    })
}

/// A YAML double-quoted scalar (paths and URLs may contain `:` or `#`).
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("string to JSON")
}

/// The real registry with `tokens`' token auth, holding `images` (name, tag, layer sizes),
/// pushed first on the same storage while it still took anonymous pushes.
pub async fn with_token_auth(
    dir: &Path,
    tokens: &super::token_service::TokenService,
    images: &[(&str, &str, &[usize])],
) -> Result<(Registry, Vec<super::images::PushedImage>)> {
    let storage = dir.join("storage");
    let mut plain = Registry::start_with(RegistryOptions::default(), Some(storage.clone())).await?;
    let mut pushed = Vec::new();
    for (name, tag, layers) in images {
        pushed.push(super::images::push_oci_image(&plain.url(), name, tag, layers).await?);
    }
    plain.stop().await;
    let options = RegistryOptions {
        token: Some(tokens.token_auth(dir)),
        ..RegistryOptions::default()
    };
    Ok((Registry::start_with(options, Some(storage)).await?, pushed))
}
