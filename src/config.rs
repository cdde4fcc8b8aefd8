//! Configuration: command-line flags (each with a `PULLCACHE_*` environment variable), an
//! optional TOML file with per-registry settings, and a docker `config.json` with credentials.
//! Flags win over the file. Everything is read and checked here, before anything starts, so a
//! bad file fails the start (exit 64) rather than a pull.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use http::Uri;
use serde::Deserialize;

use crate::oci::{ImageRef, Registry};
use crate::store::{self, MinFree};
use crate::upstream::{self, Credentials, DockerConfig, RegistrySettings};

const DEFAULT_LISTEN: &str = "127.0.0.1:5000";
const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9090";
const DEFAULT_TAG_TTL: Duration = Duration::from_secs(300);
/// kubelet evicts pods when the node filesystem's free space drops under 10%.
const DEFAULT_MIN_FREE: MinFree = MinFree::Percent(10.0);

#[derive(Debug, Parser)]
#[command(
    name = "pullcache",
    version,
    about = "A node-level pull-through cache for container images"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log format: human-readable text or one JSON object per line. Filter with RUST_LOG.
    #[arg(long, env = "PULLCACHE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the registry API as a pull-through cache (containerd mirror, or HTTPS proxy with
    /// --ca-dir).
    Serve(Box<ServeArgs>),
    /// Manage the CA that intercept mode signs registry certificates with.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Re-hash every blob in a cache and quarantine those that do not match their digest
    /// (for suspected disk corruption). Exit 0 when all match, 1 when some were quarantined.
    Verify {
        /// The cache directory (default as for `serve`). Best run while pullcache is stopped.
        #[arg(long, env = "PULLCACHE_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Fetch images into a cache ahead of time: into a running pullcache (--server), or into
    /// a cache directory, fetched with serve's upstream flags. Shows a progress bar on a
    /// terminal.
    Prefetch(Box<PrefetchArgs>),
    /// Write images as an OCI image layout tarball (skopeo, crane and containerd read it),
    /// from a cache directory; what it lacks is fetched with serve's upstream flags first.
    Export(Box<ExportArgs>),
    /// Read an OCI image layout (tarball or directory) or a `docker save` tarball into a
    /// cache. Every blob is verified first; a bad bundle changes nothing. Safe while
    /// pullcache serves the same cache.
    Import(ImportArgs),
    /// Wire the node's containerd to pullcache through certs.d hosts.toml files, or undo it.
    #[command(subcommand, name = "containerd-config")]
    ContainerdConfig(ContainerdCommand),
}

/// Which images, for `prefetch` and `export`.
#[derive(Debug, Clone, Args)]
pub struct ImageArgs {
    /// Images by tag or digest: `alpine:3.20`, `ghcr.io/org/app@sha256:...`.
    #[arg(value_name = "IMAGE")]
    pub images: Vec<String>,
    /// A file with one image per line (blank lines and `#` comments are skipped).
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<PathBuf>,
    /// Only these platforms of a multi-platform image (`linux/amd64`, `linux/arm64/v8`).
    /// Repeatable; default: every platform.
    #[arg(long = "platform", value_name = "OS/ARCH", value_delimiter = ',')]
    pub platforms: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct PrefetchArgs {
    #[command(flatten)]
    pub images: ImageArgs,
    /// A running pullcache's registry API to warm, e.g. http://127.0.0.1:5000. Without it,
    /// the cache directory is filled directly.
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub images: ImageArgs,
    /// The tarball to write.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: PathBuf,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// Bundles: OCI image layout tarballs or directories, or `docker save` tarballs.
    #[arg(value_name = "BUNDLE", required = true)]
    pub bundles: Vec<PathBuf>,
    /// The cache directory (default as for `serve`).
    #[arg(long, env = "PULLCACHE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// A name for a bundle's single image when the bundle names none (skopeo writes no name
    /// unless given one).
    #[arg(long, value_name = "IMAGE", value_parser = parse_image)]
    pub name: Option<ImageRef>,
    /// Pin what is imported: eviction never removes it.
    #[arg(long)]
    pub pin: bool,
}

#[derive(Debug, Subcommand)]
pub enum ContainerdCommand {
    /// Put pullcache first in hosts.toml for each registry (default: `_default`, every
    /// registry), keeping the registry as the fallback. Existing files are backed up and
    /// merged; running it again changes nothing.
    Install {
        /// containerd's certs.d directory (its CRI registry `config_path`).
        #[arg(long, env = "PULLCACHE_CERTS_DIR", default_value = "/etc/containerd/certs.d")]
        certs_dir: PathBuf,
        /// pullcache's address as containerd reaches it.
        #[arg(long, env = "PULLCACHE_MIRROR", default_value = "http://127.0.0.1:5000")]
        mirror: String,
        /// A registry to send through pullcache, as containerd names it. Repeatable.
        #[arg(long = "registry", env = "PULLCACHE_REGISTRIES", value_delimiter = ',', value_parser = parse_registry)]
        registries: Vec<Registry>,
        /// containerd's config file, checked for `config_path`.
        #[arg(
            long,
            env = "PULLCACHE_CONTAINERD_CONFIG",
            default_value = "/etc/containerd/config.toml"
        )]
        containerd_config: PathBuf,
        /// Fail (exit 1) when containerd's config_path does not include the certs dir.
        #[arg(long, env = "PULLCACHE_STRICT")]
        strict: bool,
    },
    /// Restore every hosts.toml install changed, exactly, and remove what it created.
    Uninstall {
        #[arg(long, env = "PULLCACHE_CERTS_DIR", default_value = "/etc/containerd/certs.d")]
        certs_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a CA (ECDSA P-256; the key file is mode 0600) in a directory, or in a
    /// Kubernetes Secret if that Secret does not exist yet. Never replaces one.
    Init {
        /// Directory for ca.key and ca.crt.
        #[arg(
            long,
            env = "PULLCACHE_CA_DIR",
            required_unless_present = "k8s_secret",
            conflicts_with = "k8s_secret"
        )]
        dir: Option<PathBuf>,
        /// A Secret to create (keys ca.key and ca.crt), with the in-cluster service account or
        /// $KUBECONFIG.
        #[arg(long, env = "PULLCACHE_CA_SECRET", value_name = "NAME")]
        k8s_secret: Option<String>,
        /// The Secret's namespace; default: the pod's own (or the kubeconfig's).
        #[arg(long, env = "PULLCACHE_NAMESPACE", requires = "k8s_secret")]
        namespace: Option<String>,
    },
    /// Print the CA certificate (PEM) to install in node trust stores.
    Cert {
        #[arg(long, env = "PULLCACHE_CA_DIR")]
        dir: PathBuf,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:5000). containerd's hosts.toml points at it.
    #[arg(long, env = "PULLCACHE_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Address of /metrics, /healthz and /readyz (default 127.0.0.1:9090).
    #[arg(long, env = "PULLCACHE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Cache directory. Default: /var/lib/pullcache when running as root, otherwise
    /// $XDG_CACHE_HOME/pullcache (or ~/.cache/pullcache).
    #[arg(long, env = "PULLCACHE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Fetch registry NAME (as containerd names it, e.g. docker.io) from URL. Repeatable;
    /// comma-separated in the environment. Unmapped: docker.io is fetched from
    /// `https://registry-1.docker.io` and any other `host:port` from `https://host:port`.
    #[arg(long = "upstream", env = "PULLCACHE_UPSTREAM", value_name = "NAME=URL", value_delimiter = ',', value_parser = parse_upstream)]
    pub upstreams: Vec<(Registry, Uri)>,

    /// How long a tag's answer is served without asking upstream (default 5m); after that one
    /// HEAD revalidates it (e.g. 30s, 5m, 1h).
    #[arg(long, env = "PULLCACHE_TAG_TTL", value_parser = humantime::parse_duration)]
    pub tag_ttl: Option<Duration>,

    /// A PEM file of CA certificates to trust for every upstream, besides the public and
    /// system roots. Repeatable; comma-separated in the environment. TLS is always verified.
    #[arg(long, env = "PULLCACHE_UPSTREAM_CA", value_name = "FILE", value_delimiter = ',')]
    pub upstream_ca: Vec<PathBuf>,

    /// Registry credentials in docker config.json format (the format of a Kubernetes
    /// dockerconfigjson Secret): `auths.HOST.auth`, `username`/`password` or `identitytoken`.
    #[arg(long, env = "PULLCACHE_DOCKER_CONFIG", value_name = "FILE")]
    pub docker_config: Option<PathBuf>,

    /// Turn on HTTPS intercept mode with the CA in DIR (created on first start if absent):
    /// the listener also accepts CONNECT and terminates TLS for registry hosts.
    #[arg(long, env = "PULLCACHE_CA_DIR", value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,

    /// In intercept mode, a host that may be tunnelled untouched: a name or `*.suffix`, port
    /// 443. Repeatable. Default: auth.docker.io, production.cloudflare.docker.com and
    /// *.cloudflare.docker.com.
    #[arg(long, env = "PULLCACHE_TUNNEL_ALLOW", value_name = "PATTERN", value_delimiter = ',')]
    pub tunnel_allow: Vec<String>,

    /// In intercept mode, a registry to intercept besides Docker Hub and the configured
    /// ones. Repeatable.
    #[arg(long = "intercept", env = "PULLCACHE_INTERCEPT", value_name = "NAME", value_delimiter = ',', value_parser = parse_registry)]
    pub intercept: Vec<Registry>,

    /// The most bytes of blobs to keep, e.g. 20GiB or 500MB (default: no limit but
    /// --cache-min-free). Past it the least recently used blobs are evicted down to 90%.
    #[arg(long, env = "PULLCACHE_CACHE_MAX_SIZE", value_name = "SIZE", value_parser = store::parse_size)]
    pub cache_max_size: Option<u64>,

    /// Free space to leave on the cache's filesystem, as a size or a percentage (default 10%,
    /// kubelet's hard eviction threshold for nodefs). Below it blobs are evicted.
    #[arg(long, env = "PULLCACHE_CACHE_MIN_FREE", value_name = "SIZE|PCT", value_parser = MinFree::parse)]
    pub cache_min_free: Option<MinFree>,

    /// An image to keep whatever the pressure, with everything it references:
    /// `alpine:3.20`, `ghcr.io/org/app@sha256:...`. A tag pin follows the tag. Repeatable;
    /// comma-separated in the environment.
    #[arg(long = "pin", env = "PULLCACHE_PIN", value_name = "IMAGE", value_delimiter = ',', value_parser = parse_image)]
    pub pins: Vec<ImageRef>,

    /// Never contact an upstream: serve tags and digests from the cache only (air-gapped
    /// clusters); a miss gets 404 saying it is not in the offline cache.
    #[arg(long, env = "PULLCACHE_OFFLINE")]
    pub offline: bool,

    /// Client connections served at once (default 4096); more are closed at once, so
    /// containerd goes on to its next host.
    #[arg(long, env = "PULLCACHE_MAX_CONNECTIONS", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,

    /// Read and check the configuration (files included), print the result and exit: 0 when
    /// it can run, 64 when not.
    #[arg(long)]
    pub check_config: bool,

    /// A TOML file with these settings and per-registry ones ([registries."NAME"]: url, ca,
    /// username/password/auth/identity_token, tag_ttl, mirrors). Flags win over the file.
    #[arg(long, env = "PULLCACHE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// What [`crate::run`] needs, resolved from the flags and files.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub cache_dir: PathBuf,
    pub tag_ttl: Duration,
    /// Registries whose tags live longer or shorter than `tag_ttl`.
    pub tag_ttls: HashMap<Registry, Duration>,
    pub upstream: upstream::Settings,
    /// HTTPS intercept mode, when on.
    pub intercept: Option<InterceptSettings>,
    /// Disk budget and pins.
    pub budget: store::Budget,
    pub limits: crate::server::Limits,
}

#[derive(Debug, Clone)]
pub struct InterceptSettings {
    pub ca_dir: PathBuf,
    pub tunnel_allow: Vec<String>,
    /// Intercepted besides Docker Hub and the configured registries.
    pub registries: Vec<Registry>,
}

impl Config {
    /// Defaults, with the cache in `cache_dir`.
    pub fn new(cache_dir: PathBuf) -> Config {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("default address is valid"),
            metrics_listen: DEFAULT_METRICS_LISTEN.parse().expect("default address is valid"),
            cache_dir,
            tag_ttl: DEFAULT_TAG_TTL,
            tag_ttls: HashMap::new(),
            upstream: upstream::Settings::default(),
            intercept: None,
            budget: store::Budget {
                min_free: DEFAULT_MIN_FREE,
                ..store::Budget::default()
            },
            limits: crate::server::Limits::default(),
        }
    }

    /// The settings of one registry, created empty on first use.
    pub fn registry(&mut self, registry: Registry) -> &mut RegistrySettings {
        self.upstream.registries.entry(registry).or_default()
    }
}

/// A configuration that cannot run.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

/// The TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    cache_dir: Option<PathBuf>,
    tag_ttl: Option<String>,
    #[serde(default)]
    upstream_ca: Vec<PathBuf>,
    docker_config: Option<PathBuf>,
    ca_dir: Option<PathBuf>,
    tunnel_allow: Option<Vec<String>>,
    #[serde(default)]
    intercept: Vec<String>,
    cache_max_size: Option<String>,
    cache_min_free: Option<String>,
    max_connections: Option<u32>,
    offline: Option<bool>,
    #[serde(default)]
    pins: Vec<String>,
    #[serde(default)]
    registries: HashMap<String, FileRegistry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRegistry {
    url: Option<String>,
    #[serde(default)]
    mirrors: Vec<String>,
    #[serde(default)]
    ca: Vec<PathBuf>,
    username: Option<String>,
    password: Option<String>,
    auth: Option<String>,
    identity_token: Option<String>,
    tag_ttl: Option<String>,
}

impl ServeArgs {
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| err(path, e))?;
                toml::from_str::<FileConfig>(&text).map_err(|e| err(path, e))?
            }
            None => FileConfig::default(),
        };
        let base = self.config.as_deref().and_then(Path::parent).unwrap_or(Path::new(""));
        let mut config = Config::new(
            self.cache_dir
                .clone()
                .or(file.cache_dir.map(|d| base.join(d)))
                .unwrap_or_else(default_cache_dir),
        );
        if let Some(listen) = self.listen.or(file.listen) {
            config.listen = listen;
        }
        if let Some(listen) = self.metrics_listen.or(file.metrics_listen) {
            config.metrics_listen = listen;
        }
        if let Some(ttl) = self.tag_ttl {
            config.tag_ttl = ttl;
        } else if let Some(ttl) = &file.tag_ttl {
            config.tag_ttl = duration(ttl, "tag_ttl")?;
        }

        config.upstream.offline = self.offline || file.offline.unwrap_or(false);
        if let Some(n) = self.max_connections.or(file.max_connections) {
            config.limits.max_connections = n as usize;
        }
        config.budget.max_size = match (self.cache_max_size, &file.cache_max_size) {
            (Some(size), _) => Some(size),
            (None, Some(text)) => {
                Some(store::parse_size(text).map_err(|e| ConfigError(format!("cache_max_size: {e}")))?)
            }
            (None, None) => None,
        };
        if let Some(floor) = self.cache_min_free {
            config.budget.min_free = floor;
        } else if let Some(text) = &file.cache_min_free {
            config.budget.min_free = MinFree::parse(text).map_err(|e| ConfigError(format!("cache_min_free: {e}")))?;
        }
        config.budget.pins = if self.pins.is_empty() {
            let parse = |s: &String| ImageRef::parse(s).map_err(|e| ConfigError(format!("pins: {e}")));
            file.pins.iter().map(parse).collect::<Result<_, _>>()?
        } else {
            self.pins.clone()
        };

        let ca_files = if self.upstream_ca.is_empty() {
            file.upstream_ca.iter().map(|p| base.join(p)).collect()
        } else {
            self.upstream_ca.clone()
        };
        for path in &ca_files {
            config
                .upstream
                .roots
                .extend(upstream::load_certificates(path).map_err(ConfigError)?);
        }
        let docker_config = self.docker_config.clone().or(file.docker_config.map(|p| base.join(p)));
        if let Some(path) = &docker_config {
            config.upstream.docker_config = DockerConfig::load(path).map_err(ConfigError)?;
        }

        for (name, entry) in file.registries {
            let registry = Registry::parse(&name).map_err(|e| ConfigError(format!("[registries.{name:?}]: {e}")))?;
            let at = |what: &str| format!("[registries.{name:?}] {what}");
            if let Some(ttl) = &entry.tag_ttl {
                config.tag_ttls.insert(registry.clone(), duration(ttl, &at("tag_ttl"))?);
            }
            let settings = config.registry(registry);
            if let Some(url) = &entry.url {
                settings.url = Some(upstream_url(url).map_err(|e| ConfigError(format!("{}: {e}", at("url"))))?);
            }
            for mirror in &entry.mirrors {
                settings
                    .mirrors
                    .push(upstream_url(mirror).map_err(|e| ConfigError(format!("{}: {e}", at("mirrors"))))?);
            }
            for path in &entry.ca {
                settings
                    .roots
                    .extend(upstream::load_certificates(&base.join(path)).map_err(ConfigError)?);
            }
            settings.credentials = Credentials::from_fields(
                entry.auth.as_deref(),
                entry.username.as_deref(),
                entry.password.as_deref(),
                entry.identity_token.as_deref(),
            )
            .map_err(|e| ConfigError(format!("{}: {e}", at("credentials"))))?;
        }
        for (registry, url) in &self.upstreams {
            config.registry(registry.clone()).url = Some(url.clone());
        }
        let ca_dir = self.ca_dir.clone().or(file.ca_dir.map(|d| base.join(d)));
        if let Some(ca_dir) = ca_dir {
            let tunnel_allow = if !self.tunnel_allow.is_empty() {
                self.tunnel_allow.clone()
            } else if let Some(patterns) = file.tunnel_allow {
                patterns
            } else {
                crate::intercept::DEFAULT_TUNNEL_ALLOW
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect()
            };
            let registries = if self.intercept.is_empty() {
                let parse = |name: &String| Registry::parse(name).map_err(|e| ConfigError(format!("intercept: {e}")));
                file.intercept.iter().map(parse).collect::<Result<_, _>>()?
            } else {
                self.intercept.clone()
            };
            config.intercept = Some(InterceptSettings {
                ca_dir,
                tunnel_allow,
                registries,
            });
        }
        Ok(config)
    }
}

fn err(path: &Path, e: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("{}: {e}", path.display()))
}

fn duration(text: &str, what: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text).map_err(|e| ConfigError(format!("{what} {text:?}: {e}")))
}

fn upstream_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.trim().parse().map_err(|e| format!("{url:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        return Err(format!("{url:?} is not an http:// or https:// URL"));
    }
    if uri.query().is_some() {
        return Err(format!("{url:?} may not have a query"));
    }
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.parse().is_ok_and(upstream::is_forbidden) {
        return Err(format!("{url:?} is a link-local, metadata or unspecified address"));
    }
    Ok(uri)
}

fn parse_image(s: &str) -> Result<ImageRef, String> {
    ImageRef::parse(s).map_err(|e| e.to_string())
}

fn parse_registry(s: &str) -> Result<Registry, String> {
    Registry::parse(s).map_err(|e| e.to_string())
}

fn parse_upstream(s: &str) -> Result<(Registry, Uri), String> {
    let (name, url) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=URL"))?;
    let registry = Registry::parse(name.trim()).map_err(|e| e.to_string())?;
    Ok((registry, upstream_url(url)?))
}

pub fn default_cache_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/pullcache");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("pullcache")
}

/// The effective uid is the owner of `/proc/self`.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from(["pullcache", "serve"].iter().chain(args)).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        *args
    }

    #[test]
    fn upstream_mappings() {
        let (r, u) = parse_upstream("docker.io=http://127.0.0.1:5001").unwrap();
        assert_eq!(r.as_str(), "docker.io");
        assert_eq!(u.to_string(), "http://127.0.0.1:5001/");
        for bad in [
            "docker.io",
            "docker.io=ftp://x",
            "bad name=http://x",
            "a=http://x?y=1",
            "a=/relative",
        ] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn runs_with_no_flags() {
        let config = serve(&[]).resolve().unwrap();
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(config.metrics_listen, DEFAULT_METRICS_LISTEN.parse().unwrap());
        assert_eq!(config.tag_ttl, DEFAULT_TAG_TTL);
        assert!(config.cache_dir.ends_with("pullcache"));
        assert!(config.upstream.registries.is_empty());
    }

    #[test]
    fn file_settings_and_flags_over_them() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        std::fs::write(
            dir.path().join("docker.json"),
            r#"{"auths":{"ghcr.io":{"auth":"dTpw"}}}"#,
        )
        .unwrap();
        let file = dir.path().join("pullcache.toml");
        std::fs::write(
            &file,
            r#"
listen = "127.0.0.1:6000"
cache_dir = "cache"
tag_ttl = "10m"
docker_config = "docker.json"
ca_dir = "ca"
tunnel_allow = ["auth.example.com"]
intercept = ["quay.io"]

[registries."registry.example.com:5000"]
url = "https://10.0.0.5:5000"
ca = ["ca.pem"]
username = "robot"
password = "hunter2"
tag_ttl = "1h"
mirrors = ["https://mirror.example.com"]
"#,
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let config = serve(&["--config", path]).resolve().unwrap();
        assert_eq!(config.listen, "127.0.0.1:6000".parse().unwrap());
        assert_eq!(config.cache_dir, dir.path().join("cache"));
        assert_eq!(config.tag_ttl, Duration::from_secs(600));
        let name = Registry::parse("registry.example.com:5000").unwrap();
        assert_eq!(config.tag_ttls[&name], Duration::from_secs(3600));
        let settings = &config.upstream.registries[&name];
        assert_eq!(settings.url.as_ref().unwrap().to_string(), "https://10.0.0.5:5000/");
        assert_eq!(settings.mirrors.len(), 1);
        assert_eq!(settings.roots.len(), 1);
        assert!(matches!(&settings.credentials, Some(Credentials::Basic { username, .. }) if username == "robot"));
        assert!(
            config
                .upstream
                .docker_config
                .lookup(&Registry::parse("ghcr.io").unwrap(), None)
                .is_some()
        );
        let intercept = config.intercept.as_ref().expect("ca_dir turns intercept on");
        assert_eq!(intercept.ca_dir, dir.path().join("ca"));
        assert_eq!(intercept.tunnel_allow, vec!["auth.example.com".to_owned()]);
        assert_eq!(intercept.registries, vec![Registry::parse("quay.io").unwrap()]);

        let config = serve(&[
            "--config",
            path,
            "--listen",
            "127.0.0.1:7000",
            "--tag-ttl",
            "1s",
            "--upstream",
            "registry.example.com:5000=http://127.0.0.1:9",
        ])
        .resolve()
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.tag_ttl, Duration::from_secs(1));
        assert_eq!(
            config.upstream.registries[&name].url.as_ref().unwrap().to_string(),
            "http://127.0.0.1:9/"
        );
    }

    #[test]
    fn bad_files_are_refused_with_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        for (text, expected) in [
            ("[registries.\"x\"]\nurll = \"https://x\"\n", "unknown field"),
            ("[registries.\"Bad Name\"]\n", "Bad Name"),
            ("[registries.\"x.io\"]\nurl = \"ftp://x\"\n", "http"),
            ("[registries.\"x.io\"]\nca = [\"missing.pem\"]\n", "missing.pem"),
            ("[registries.\"x.io\"]\nauth = \"%%%\"\n", "base64"),
            ("tag_ttl = \"soon\"\n", "tag_ttl"),
        ] {
            std::fs::write(&file, text).unwrap();
            let e = serve(&["--config", file.to_str().unwrap()]).resolve().unwrap_err();
            assert!(e.to_string().contains(expected), "{text:?}: {e}");
        }
        let e = serve(&["--docker-config", "/nonexistent/config.json"])
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/config.json"), "{e}");
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
