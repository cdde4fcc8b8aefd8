//! Configuration: the command line with its subcommands, and what `serve` runs with. Each of
//! `serve`'s settings is defined once, in [`ServeArgs`]: a flag, a `PULLCACHE_*` variable and a
//! key in the TOML file, validated together before anything starts, so a bad setting fails
//! the start (exit 64) rather than a pull.

mod serve;

pub use serve::{RegistryEntry, ServeArgs, Size, Upstream};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::oci::{ImageRef, Registry};
use crate::store::{self, MinFree};
use crate::upstream::{self, RegistrySettings};

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

/// `serve`'s settings that `prefetch` and `export` have no use for: they listen only on a
/// loopback port of their own, intercept nothing and join no cluster. Hidden from their help,
/// not read from the environment, and refused on their command line.
const SERVE_ONLY: &[&str] = &[
    "listen",
    "metrics_listen",
    "ca_dir",
    "tunnel_allow",
    "intercept",
    "max_connections",
    "peer_listen",
    "peers",
    "peer_ca_dir",
    "peer_max_uploads",
    "peer_refresh",
    "check_config",
];

/// The subcommands that take `serve`'s upstream settings.
const FETCHING: &[&str] = &["prefetch", "export"];

impl Cli {
    /// The command line as the binary parses it.
    pub fn command() -> clap::Command {
        let mut command = <Cli as clap::CommandFactory>::command();
        for name in FETCHING {
            command = command.mut_subcommand(name, |mut sub| {
                for id in SERVE_ONLY {
                    sub = sub.mut_arg(id, |arg| arg.hide(true).env(None));
                }
                sub
            });
        }
        command
    }

    /// Parses a command line (the program's name first), refusing `serve`-only flags where
    /// they mean nothing.
    pub fn parse_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::FromArgMatches;
        use clap::parser::ValueSource;
        let mut command = Cli::command();
        let matches = command.try_get_matches_from_mut(args)?;
        if let Some((name, sub)) = matches.subcommand()
            && FETCHING.contains(&name)
            && let Some(id) = SERVE_ONLY
                .iter()
                .find(|id| sub.value_source(id) == Some(ValueSource::CommandLine))
        {
            let flag = command
                .find_subcommand(name)
                .and_then(|c| c.get_arguments().find(|a| a.get_id() == *id))
                .and_then(|a| a.get_long())
                .unwrap_or(id);
            return Err(command.error(
                clap::error::ErrorKind::ArgumentConflict,
                format!("--{flag} is a setting of `serve`; `{name}` does not use it"),
            ));
        }
        Cli::from_arg_matches(&matches)
    }
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
    /// Without --cache-dir, everything is fetched through a temporary cache, removed after.
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
        /// containerd's certs.d directory. Default: the first directory of the `config_path`
        /// containerd's config sets, else /etc/containerd/certs.d.
        #[arg(long, env = "PULLCACHE_CERTS_DIR")]
        certs_dir: Option<PathBuf>,
        /// pullcache's address as containerd reaches it.
        #[arg(long, env = "PULLCACHE_MIRROR", default_value = "http://127.0.0.1:5000")]
        mirror: String,
        /// A registry to send through pullcache, as containerd names it. Repeatable. Default:
        /// `_default` (every registry) and every registry directory already in the certs dir.
        #[arg(long = "registry", env = "PULLCACHE_REGISTRIES", value_delimiter = ',', value_parser = parse_registry)]
        registries: Vec<Registry>,
        /// A registry containerd always pulls from itself, never through pullcache: one of
        /// private images, whose pulls then carry the pod's secret to the registry (see
        /// `serve --private-images`). Repeatable.
        #[arg(long = "bypass", env = "PULLCACHE_BYPASS", value_delimiter = ',', value_parser = parse_registry)]
        bypass: Vec<Registry>,
        /// containerd's config file, read with its `imports` for `config_path`. Default: the
        /// first that exists of /etc/containerd/config.toml and k3s's and RKE2's
        /// (/var/lib/rancher/{k3s,rke2}/agent/etc/containerd/config.toml).
        #[arg(long, env = "PULLCACHE_CONTAINERD_CONFIG")]
        containerd_config: Option<PathBuf>,
        /// containerd's binary, asked for its release (`--version`). Where it cannot run, the
        /// release is told by the config's layout (version 3 is containerd 2), else the
        /// config is checked as both 1.x and 2.x read it.
        #[arg(long, env = "PULLCACHE_CONTAINERD_BIN", default_value = "containerd")]
        containerd_bin: PathBuf,
        /// Check first, and write nothing and exit 1 when containerd would not read the certs
        /// dir.
        #[arg(long, env = "PULLCACHE_STRICT")]
        strict: bool,
    },
    /// Restore every hosts.toml install changed, exactly, and remove what it created.
    Uninstall {
        /// containerd's certs.d directory; default as for install.
        #[arg(long, env = "PULLCACHE_CERTS_DIR")]
        certs_dir: Option<PathBuf>,
        /// containerd's config file; default as for install.
        #[arg(long, env = "PULLCACHE_CONTAINERD_CONFIG")]
        containerd_config: Option<PathBuf>,
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

/// What [`crate::run`] needs, resolved from the flags and files.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub cache_dir: PathBuf,
    /// Whether a flag, variable or the file named the cache directory.
    pub cache_dir_chosen: bool,
    pub tag_ttl: Duration,
    /// The registry of a mirror-mode request that names none.
    pub default_registry: Registry,
    /// Registries whose tags live longer or shorter than `tag_ttl`.
    pub tag_ttls: HashMap<Registry, Duration>,
    pub upstream: upstream::Settings,
    /// HTTPS intercept mode, when on.
    pub intercept: Option<InterceptSettings>,
    /// Disk budget and pins.
    pub budget: store::Budget,
    pub limits: crate::server::ConnectionLimits,
    /// Cluster mode, when on.
    pub peers: Option<crate::peers::Settings>,
    /// Who may read private repositories.
    pub authorize: crate::authorize::Settings,
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
            cache_dir_chosen: true,
            tag_ttl: DEFAULT_TAG_TTL,
            default_registry: Registry::docker_hub(),
            tag_ttls: HashMap::new(),
            upstream: upstream::Settings::default(),
            intercept: None,
            budget: store::Budget {
                min_free: DEFAULT_MIN_FREE,
                ..store::Budget::default()
            },
            limits: crate::server::ConnectionLimits::default(),
            peers: None,
            authorize: crate::authorize::Settings::default(),
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

impl Config {
    /// What `serve --check-config` prints: every setting as it will be used. Credentials are
    /// counted, never shown.
    pub fn summary(&self) -> String {
        let mut registries: Vec<_> = self.upstream.registries.keys().map(Registry::as_str).collect();
        registries.sort_unstable();
        let intercept = match &self.intercept {
            None => "off".to_owned(),
            Some(i) => format!(
                "CA in {}{}; tunnel {}; also intercept {}",
                i.ca_dir.display(),
                match i.ca_dir.join(crate::ca::KEY_FILE).exists() {
                    true => "",
                    false => " (created at start)",
                },
                match i.tunnel_allow.is_empty() {
                    true => "none".to_owned(),
                    false => i.tunnel_allow.join(", "),
                },
                match i.registries.is_empty() {
                    true => "none".to_owned(),
                    false => i.registries.iter().map(Registry::as_str).collect::<Vec<_>>().join(", "),
                },
            ),
        };
        let pins: Vec<String> = self.budget.pins.iter().map(ToString::to_string).collect();
        let lines = [
            ("listen", self.listen.to_string()),
            ("metrics_listen", self.metrics_listen.to_string()),
            ("cache_dir", self.cache_dir.display().to_string()),
            (
                "cache_max_size",
                self.budget.max_size.map_or("none".to_owned(), |b| format!("{b} bytes")),
            ),
            ("cache_min_free", self.budget.min_free.to_string()),
            (
                "pins",
                if pins.is_empty() {
                    "none".to_owned()
                } else {
                    pins.join(", ")
                },
            ),
            ("tag_ttl", humantime::format_duration(self.tag_ttl).to_string()),
            ("default_registry", self.default_registry.to_string()),
            ("registries", registries.join(", ")),
            ("upstream_ca", format!("{} certificates", self.upstream.roots.len())),
            (
                "upstream_timeout",
                humantime::format_duration(self.upstream.timeout.unwrap_or(upstream::DEFAULT_UPSTREAM_TIMEOUT))
                    .to_string(),
            ),
            (
                "docker_config",
                format!(
                    "{} registries with credentials{}",
                    self.upstream.docker_config.len(),
                    match self.upstream.docker_config.hosts() {
                        hosts if hosts.is_empty() => String::new(),
                        hosts => format!(" ({})", hosts.into_iter().map(shown).collect::<Vec<_>>().join(", ")),
                    }
                ),
            ),
            ("offline", self.upstream.offline.to_string()),
            ("max_connections", self.limits.max_connections.to_string()),
            ("intercept", intercept),
            ("private_images", {
                let mut overrides: Vec<String> = self
                    .authorize
                    .registries
                    .iter()
                    .map(|(registry, policy)| format!("{registry}: {policy}"))
                    .collect();
                overrides.sort_unstable();
                match overrides.is_empty() {
                    true => self.authorize.private_images.to_string(),
                    false => format!("{} ({})", self.authorize.private_images, overrides.join(", ")),
                }
            }),
            ("auth_ttl", humantime::format_duration(self.authorize.ttl).to_string()),
            (
                "cluster",
                match &self.peers {
                    None => "off".to_owned(),
                    Some(p) => format!(
                        "peer port {}; peers {}; refreshed every {}; CA in {}; at most {} uploads of a blob",
                        p.listen,
                        p.targets.join(", "),
                        humantime::format_duration(p.refresh),
                        p.ca_dir.display(),
                        p.max_uploads
                    ),
                },
            ),
        ];
        let mut out = String::from("configuration ok\n");
        for (key, value) in lines {
            out.push_str(&format!("  {key:<16} {value}\n"));
        }
        for registry in self.named_registries() {
            out.push_str(&format!("  [registries.\"{registry}\"]\n"));
            for (key, value) in self.registry_summary(&registry) {
                out.push_str(&format!("    {key:<14} {value}\n"));
            }
        }
        out
    }

    /// Every registry a setting names, and the default registry: each gets its own lines.
    fn named_registries(&self) -> Vec<Registry> {
        let mut registries: Vec<Registry> = self
            .upstream
            .registries
            .keys()
            .chain(self.tag_ttls.keys())
            .chain(self.authorize.registries.keys())
            .chain([&self.default_registry])
            .cloned()
            .collect();
        registries.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        registries.dedup();
        registries
    }

    /// One registry's settings as they will be used, defaults included.
    fn registry_summary(&self, registry: &Registry) -> Vec<(&'static str, String)> {
        let settings = self.upstream.registries.get(registry);
        let url = match settings.and_then(|s| s.url.as_ref()) {
            Some(url) => url.to_string().trim_end_matches('/').to_owned(),
            None => format!("{} (default)", upstream::default_url(registry)),
        };
        let mirrors: Vec<String> = settings
            .map(|s| s.mirrors.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        let from_file = settings.is_some_and(|s| s.credentials.is_some());
        let credentials = match self.upstream.credentials(registry) {
            Some(c) if from_file => format!("{} (config file)", c.kind()),
            Some(c) => format!("{} (docker_config)", c.kind()),
            None => "none".to_owned(),
        };
        let (tag_ttl, private) = (
            self.tag_ttls.get(registry).copied().unwrap_or(self.tag_ttl),
            self.authorize.policy(registry),
        );
        vec![
            ("url", url),
            (
                "mirrors",
                match mirrors.is_empty() {
                    true => "none".to_owned(),
                    false => mirrors.join(", "),
                },
            ),
            ("ca", format!("{} certificates", settings.map_or(0, |s| s.roots.len()))),
            ("credentials", credentials),
            ("tag_ttl", humantime::format_duration(tag_ttl).to_string()),
            ("private", private.to_string()),
        ]
    }

    /// What the configuration holds that will not be used, said as a warning by `serve` at
    /// start and by `--check-config`.
    pub fn warnings(&self) -> Vec<String> {
        const MAX_WARNINGS: usize = 20;
        let unused = self.upstream.docker_config.unused();
        let mut warnings: Vec<String> = unused
            .iter()
            .take(MAX_WARNINGS)
            .map(|unused| format!("docker_config: {unused}"))
            .collect();
        if unused.len() > MAX_WARNINGS {
            warnings.push(format!("docker_config: and {} more", unused.len() - MAX_WARNINGS));
        }
        warnings
    }
}

/// A name from a file as it may be printed: as it is when it looks like a host, quoted and
/// escaped otherwise (no control character reaches the terminal).
fn shown(name: &str) -> String {
    match name.chars().all(|c| c.is_ascii_alphanumeric() || ".-_:[]".contains(c)) {
        true => name.to_owned(),
        false => format!("{name:?}"),
    }
}

fn parse_image(s: &str) -> Result<ImageRef, String> {
    ImageRef::parse(s).map_err(|e| e.to_string())
}

fn parse_registry(s: &str) -> Result<Registry, String> {
    Registry::parse(s).map_err(|e| e.to_string())
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
