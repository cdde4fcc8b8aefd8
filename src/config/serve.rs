//! `serve`'s settings, each defined once. A field of [`ServeArgs`] is a flag, its
//! `PULLCACHE_*` variable and a key of the `--config` TOML file at the same time, and all three
//! parse through the same type. Flags and variables win over the file, both ways (`--offline=false`
//! undoes `offline = true`), and [`ServeArgs::resolve`] validates the result once, whatever the
//! source: `serve --check-config` runs exactly what `serve` runs.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use clap::builder::BoolishValueParser;
use http::Uri;
use serde::{Deserialize, Deserializer};

use super::{Config, ConfigError, InterceptSettings, default_cache_dir};
use crate::authorize::PrivateImages;
use crate::oci::{ImageRef, Registry};
use crate::store::{self, MinFree};
use crate::upstream::{self, Credentials, DockerConfig};

const DEFAULT_PEER_MAX_UPLOADS: usize = 4;
const DEFAULT_PEER_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);
/// Discovery may not turn into a loop of DNS lookups.
const MIN_PEER_REFRESH: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:5000). containerd's hosts.toml points at it.
    #[arg(long, env = "PULLCACHE_LISTEN")]
    #[serde(default)]
    pub listen: Option<SocketAddr>,

    /// Address of /metrics, /healthz and /readyz (default 127.0.0.1:9090).
    #[arg(long, env = "PULLCACHE_METRICS_LISTEN")]
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,

    /// Cache directory. Default: /var/lib/pullcache when running as root, otherwise
    /// $XDG_CACHE_HOME/pullcache (or ~/.cache/pullcache).
    #[arg(long, env = "PULLCACHE_CACHE_DIR")]
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,

    /// Fetch registry NAME (as containerd names it, e.g. docker.io) from URL. Repeatable;
    /// comma-separated in the environment; `upstream = [...]` in the file. Unmapped: docker.io
    /// is fetched from `https://registry-1.docker.io` and any other `host:port` from
    /// `https://host:port`.
    #[arg(
        long = "upstream",
        env = "PULLCACHE_UPSTREAM",
        value_name = "NAME=URL",
        value_delimiter = ','
    )]
    // Text here, parsed in `into_config`: clap and serde would quote a bad value, and a URL
    // may hold credentials.
    #[serde(default, rename = "upstream")]
    pub upstreams: Option<Vec<String>>,

    /// How long a tag's answer is served without asking upstream (default 5m); after that one
    /// HEAD revalidates it (e.g. 30s, 5m, 1h).
    #[arg(long, env = "PULLCACHE_TAG_TTL", value_name = "DURATION")]
    #[serde(default, deserialize_with = "from_text")]
    pub tag_ttl: Option<humantime::Duration>,

    /// The registry of a mirror-mode request that names none: no `ns`, and no host as the
    /// first component of its name (default docker.io). For clients whose mirror setting
    /// sends only the path, as soci-snapshotter's does.
    #[arg(long, env = "PULLCACHE_DEFAULT_REGISTRY", value_name = "NAME")]
    #[serde(default, deserialize_with = "from_text")]
    pub default_registry: Option<Registry>,

    /// How long a registry may send nothing (default 60s; its headers come within 30 s at
    /// most), and the window over which a body must average 1 KiB/s: a registry that stalls
    /// or trickles fails that fetch, which is retried or resumed as any broken one.
    #[arg(long, env = "PULLCACHE_UPSTREAM_TIMEOUT", value_name = "DURATION")]
    #[serde(default, deserialize_with = "from_text")]
    pub upstream_timeout: Option<humantime::Duration>,

    /// A PEM file of CA certificates to trust for every upstream, besides the public and
    /// system roots. Repeatable; comma-separated in the environment. TLS is always verified.
    #[arg(long, env = "PULLCACHE_UPSTREAM_CA", value_name = "FILE", value_delimiter = ',')]
    #[serde(default)]
    pub upstream_ca: Option<Vec<PathBuf>>,

    /// Registry credentials in docker config.json format (the format of a Kubernetes
    /// dockerconfigjson Secret): `auths.HOST.auth`, `username`/`password` or `identitytoken`.
    #[arg(long, env = "PULLCACHE_DOCKER_CONFIG", value_name = "FILE")]
    #[serde(default)]
    pub docker_config: Option<PathBuf>,

    /// Turn on HTTPS intercept mode with the CA in DIR (created on first start if absent):
    /// the listener also accepts CONNECT and terminates TLS for registry hosts.
    #[arg(long, env = "PULLCACHE_CA_DIR", value_name = "DIR")]
    #[serde(default)]
    pub ca_dir: Option<PathBuf>,

    /// In intercept mode, a host that may be tunnelled untouched: a name or `*.suffix`, port
    /// 443. Repeatable. Added to the hosts Docker Hub pulls need (auth.docker.io,
    /// production.cloudflare.docker.com and *.cloudflare.docker.com), which are tunnelled
    /// while docker.io is fetched from Docker Hub: not offline, and not mapped elsewhere.
    #[arg(long, env = "PULLCACHE_TUNNEL_ALLOW", value_name = "PATTERN", value_delimiter = ',')]
    #[serde(default)]
    pub tunnel_allow: Option<Vec<String>>,

    /// In intercept mode, a registry to intercept besides Docker Hub and the configured
    /// ones. Repeatable.
    #[arg(
        long = "intercept",
        env = "PULLCACHE_INTERCEPT",
        value_name = "NAME",
        value_delimiter = ','
    )]
    #[serde(default, deserialize_with = "from_text")]
    pub intercept: Option<Vec<Registry>>,

    /// The most bytes of blobs to keep, e.g. 20GiB or 500MB (default: no limit but
    /// --cache-min-free). Past it the least recently used blobs are evicted down to 90%.
    #[arg(long, env = "PULLCACHE_CACHE_MAX_SIZE", value_name = "SIZE")]
    #[serde(default, deserialize_with = "from_text")]
    pub cache_max_size: Option<Size>,

    /// Free space to leave on the cache's filesystem, as a size or a percentage (default 10%,
    /// kubelet's hard eviction threshold for nodefs). Below it blobs are evicted.
    #[arg(long, env = "PULLCACHE_CACHE_MIN_FREE", value_name = "SIZE|PCT")]
    #[serde(default, deserialize_with = "from_text")]
    pub cache_min_free: Option<MinFree>,

    /// An image to keep whatever the pressure, with everything it references:
    /// `alpine:3.20`, `ghcr.io/org/app@sha256:...`. A tag pin follows the tag. Repeatable;
    /// comma-separated in the environment; `pins = [...]` in the file.
    #[arg(long = "pin", env = "PULLCACHE_PIN", value_name = "IMAGE", value_delimiter = ',')]
    #[serde(default, deserialize_with = "from_text")]
    pub pins: Option<Vec<ImageRef>>,

    /// Never contact an upstream: serve tags and digests from the cache only (air-gapped
    /// clusters); a miss gets 404 saying it is not in the offline cache. `--offline=false`
    /// undoes `offline = true` in the file.
    #[arg(
        long,
        env = "PULLCACHE_OFFLINE",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = BoolishValueParser::new(),
    )]
    #[serde(default)]
    pub offline: Option<bool>,

    /// Mirror mode's answer for a repository the registry does not serve anonymously
    /// (containerd sends no credentials to a mirror): `bypass` (default) answers 404 before
    /// any byte, so containerd pulls it from the registry itself with the pod's secret;
    /// `share` serves it, with pullcache's credentials, to every workload on the node.
    /// `private` in a `[registries."NAME"]` table overrides it for that registry. Intercept
    /// mode checks each client's own credentials instead.
    #[arg(long, env = "PULLCACHE_PRIVATE_IMAGES", value_name = "POLICY")]
    #[serde(default, deserialize_with = "from_text")]
    pub private_images: Option<PrivateImages>,

    /// The longest an authorization answer is remembered (default 5m): whether a repository
    /// is private, and whether a client's credential may read it (never past a token's
    /// expiry). A refusal is remembered 10 s at most.
    #[arg(long, env = "PULLCACHE_AUTH_TTL", value_name = "DURATION")]
    #[serde(default, deserialize_with = "from_text")]
    pub auth_ttl: Option<humantime::Duration>,

    /// Client connections served at once, at least 1 (default 4096); more are closed at once,
    /// so containerd goes on to its next host.
    #[arg(long, env = "PULLCACHE_MAX_CONNECTIONS", value_name = "N")]
    #[serde(default)]
    pub max_connections: Option<u32>,

    /// Cluster mode: serve peers on ADDR, this node's address and a port (in the chart, the
    /// node IP and a fixed port), with mutual TLS from --peer-ca-dir. Misses of blobs and
    /// manifests by digest then go to the digest's owner among the peers first.
    #[arg(long, env = "PULLCACHE_PEER_LISTEN", value_name = "ADDR")]
    #[serde(default)]
    pub peer_listen: Option<SocketAddr>,

    /// A peer: HOST:PORT, an address or a name resolved again every --peer-refresh (a
    /// headless Service's name gives every ready pod). Repeatable; comma-separated in the
    /// environment; `peers = [...]` in the file. It may include this node.
    #[arg(
        long = "peer",
        env = "PULLCACHE_PEER",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub peers: Option<Vec<String>>,

    /// The cluster CA (ca.crt, ca.key; `pullcache ca init --dir`, or the chart's Secret) that
    /// peers authenticate each other with. Every node needs the same one.
    #[arg(long, env = "PULLCACHE_PEER_CA_DIR", value_name = "DIR")]
    #[serde(default)]
    pub peer_ca_dir: Option<PathBuf>,

    /// Uploads of one blob to peers at once, at least 1 (default 4); more askers are sent on
    /// to peers that have it or are receiving it.
    #[arg(long, env = "PULLCACHE_PEER_MAX_UPLOADS", value_name = "N")]
    #[serde(default)]
    pub peer_max_uploads: Option<u32>,

    /// How often the --peer names are resolved again (default 10s).
    #[arg(long, env = "PULLCACHE_PEER_REFRESH", value_name = "DURATION")]
    #[serde(default, deserialize_with = "from_text")]
    pub peer_refresh: Option<humantime::Duration>,

    /// Read and check the configuration (files included) exactly as `serve` would, print the
    /// settings it would run with and exit: 0 when it can run, 64 when not.
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,

    /// A TOML file with these settings under their names with `_` (`tag_ttl = "10m"`), and
    /// per-registry ones ([registries."NAME"]: url, ca, username/password/auth/identity_token,
    /// tag_ttl, mirrors). Relative paths in it are relative to the file. Flags and
    /// environment variables win over it.
    #[arg(long, env = "PULLCACHE_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// `[registries."NAME"]`: only in the file.
    #[arg(skip)]
    #[serde(default)]
    pub registries: HashMap<String, RegistryEntry>,
}

/// One `[registries."NAME"]` table of the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    url: Option<String>,
    #[serde(default)]
    mirrors: Vec<String>,
    #[serde(default)]
    ca: Vec<PathBuf>,
    username: Option<String>,
    password: Option<String>,
    auth: Option<String>,
    identity_token: Option<String>,
    #[serde(default, deserialize_with = "from_text")]
    tag_ttl: Option<humantime::Duration>,
    /// Mirror mode's policy for its private repositories: `bypass` or `share`.
    #[serde(default, deserialize_with = "from_text")]
    private: Option<PrivateImages>,
}

/// `NAME=URL`: where a registry is fetched from.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub registry: Registry,
    pub url: Uri,
}

impl FromStr for Upstream {
    type Err = String;

    /// Its errors never show the URL, which may hold credentials.
    fn from_str(s: &str) -> Result<Upstream, String> {
        let (name, url) = s
            .split_once('=')
            .ok_or("an entry is not NAME=URL (not shown: it may hold credentials)")?;
        let registry = Registry::parse(name.trim()).map_err(|e| e.to_string())?;
        Ok(Upstream {
            registry,
            url: upstream_url(url)?,
        })
    }
}

/// A number of bytes, written as [`store::parse_size`] reads it (`20GiB`, `500MB`).
#[derive(Debug, Clone, Copy)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Size, String> {
        store::parse_size(s).map(Size)
    }
}

/// A file value written as text (a string, or a list of strings), parsed with the same
/// `FromStr` the flag uses.
fn from_text<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromText,
{
    T::from_text(deserializer).map(Some)
}

/// Values read from text in the file: one, or a list.
trait FromText: Sized {
    fn from_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error>;
}

fn parse<T: FromStr<Err: Display>, E: serde::de::Error>(text: &str) -> Result<T, E> {
    text.parse().map_err(E::custom)
}

macro_rules! from_text_one {
    ($($t:ty),*) => {$(
        impl FromText for $t {
            fn from_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                parse(&String::deserialize(deserializer)?)
            }
        }
    )*};
}
from_text_one!(humantime::Duration, Size, MinFree, PrivateImages, Registry);

impl<T: FromStr<Err: Display>> FromText for Vec<T> {
    fn from_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<String>::deserialize(deserializer)?
            .iter()
            .map(|text| parse(text))
            .collect()
    }
}

/// Defines [`ServeArgs::over`] from the list of layered settings. The pattern names every
/// field, so a setting added to [`ServeArgs`] and not to this list does not compile.
macro_rules! layered {
    ($($field:ident),* $(,)?) => {
        impl ServeArgs {
            /// These flags and variables, with the file's value for each one they leave unset.
            fn over(self, file: ServeArgs) -> ServeArgs {
                let ServeArgs { $($field,)* check_config, config, registries: _ } = self;
                ServeArgs {
                    $($field: $field.or(file.$field),)*
                    check_config,
                    config,
                    registries: file.registries,
                }
            }
        }
    };
}
layered!(
    listen,
    metrics_listen,
    cache_dir,
    upstreams,
    tag_ttl,
    default_registry,
    upstream_timeout,
    upstream_ca,
    docker_config,
    ca_dir,
    tunnel_allow,
    intercept,
    cache_max_size,
    cache_min_free,
    pins,
    offline,
    private_images,
    auth_ttl,
    max_connections,
    peer_listen,
    peers,
    peer_ca_dir,
    peer_max_uploads,
    peer_refresh,
);

impl ServeArgs {
    /// Reads the `--config` file, if any, puts these flags over it and validates the result:
    /// the one place a configuration is checked.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => ServeArgs::load(path)?,
            None => ServeArgs::default(),
        };
        self.clone().over(file).into_config()
    }

    /// The file, with its relative paths made relative to it.
    fn load(path: &Path) -> Result<ServeArgs, ConfigError> {
        let at = |e: &dyn Display| ConfigError(format!("{}: {e}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| at(&e))?;
        let file: ServeArgs = toml::from_str(&text).map_err(|e| at(&toml_error(&text, &e)))?;
        let base = path.parent().unwrap_or(Path::new(""));
        Ok(file.relative_to(base))
    }

    fn relative_to(mut self, base: &Path) -> ServeArgs {
        // An empty path stays empty, for validation to refuse.
        let join = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        self.cache_dir.iter_mut().for_each(join);
        self.docker_config.iter_mut().for_each(join);
        self.ca_dir.iter_mut().for_each(join);
        self.peer_ca_dir.iter_mut().for_each(join);
        self.upstream_ca.iter_mut().flatten().for_each(join);
        self.registries
            .values_mut()
            .flat_map(|entry| entry.ca.iter_mut())
            .for_each(join);
        self
    }

    fn into_config(self) -> Result<Config, ConfigError> {
        let invalid = |setting: &str, e: &dyn Display| ConfigError(format!("{setting}: {e}"));
        let cache_dir_chosen = self.cache_dir.is_some();
        let cache_dir = self.cache_dir.unwrap_or_else(default_cache_dir);
        if cache_dir.as_os_str().is_empty() {
            return Err(invalid("cache_dir", &"is empty"));
        }
        let mut config = Config::new(cache_dir);
        config.cache_dir_chosen = cache_dir_chosen;
        config.listen = self.listen.unwrap_or(config.listen);
        config.metrics_listen = self.metrics_listen.unwrap_or(config.metrics_listen);
        if config.listen == config.metrics_listen && config.listen.port() != 0 {
            return Err(invalid("metrics_listen", &format!("{} is also listen", config.listen)));
        }
        config.tag_ttl = self.tag_ttl.map_or(config.tag_ttl, Into::into);
        config.default_registry = self.default_registry.unwrap_or(config.default_registry);
        config.upstream.offline = self.offline.unwrap_or(false);
        match self.upstream_timeout.map(Duration::from) {
            Some(t) if t < Duration::from_secs(1) => {
                return Err(invalid("upstream_timeout", &"must be at least 1s"));
            }
            timeout => config.upstream.timeout = timeout,
        }
        config.authorize.private_images = self.private_images.unwrap_or_default();
        match self.auth_ttl.map(Duration::from) {
            Some(ttl) if ttl.is_zero() => return Err(invalid("auth_ttl", &"must be longer than 0")),
            Some(ttl) => config.authorize.ttl = ttl,
            None => {}
        }
        match self.max_connections {
            Some(0) => return Err(invalid("max_connections", &"must be at least 1, got 0")),
            Some(n) => config.limits.max_connections = n as usize,
            None => {}
        }
        config.budget.max_size = self.cache_max_size.map(|s| s.0);
        config.budget.min_free = self.cache_min_free.unwrap_or(config.budget.min_free);
        config.budget.pins = self.pins.unwrap_or_default();
        for path in self.upstream_ca.unwrap_or_default() {
            let roots = upstream::load_certificates(&path).map_err(|e| invalid("upstream_ca", &e))?;
            config.upstream.roots.extend(roots);
        }
        if let Some(path) = &self.docker_config {
            config.upstream.docker_config = DockerConfig::load(path).map_err(|e| invalid("docker_config", &e))?;
        }
        for (name, entry) in self.registries {
            add_registry(&mut config, &name, entry)?;
        }
        for text in self.upstreams.unwrap_or_default() {
            let Upstream { registry, url } = text.parse().map_err(|e| invalid("upstream", &e))?;
            config.registry(registry).url = Some(url);
        }
        config.peers = cluster(
            self.peer_listen,
            self.peers,
            self.peer_ca_dir,
            self.peer_max_uploads,
            self.peer_refresh,
        )?;
        if let Some(ca_dir) = self.ca_dir {
            if ca_dir.exists() && !ca_dir.is_dir() {
                return Err(invalid("ca_dir", &format!("{} is not a directory", ca_dir.display())));
            }
            // An intercept CA that is there is checked now, as serve loads it; one that is not
            // is created at start.
            let files = [crate::ca::KEY_FILE, crate::ca::CERT_FILE];
            if files.iter().any(|f| ca_dir.join(f).exists()) {
                crate::ca::Ca::load(&ca_dir).map_err(|e| invalid("ca_dir", &e))?;
            }
            // Docker Hub's token and CDN hosts, which its pulls need: only while Docker Hub
            // itself is fetched from (not offline, not mapped elsewhere).
            let hub = config.upstream.registries.get(&Registry::docker_hub());
            let from_hub = !config.upstream.offline && hub.is_none_or(|s| s.url.is_none());
            let mut tunnel_allow: Vec<String> = match from_hub {
                true => crate::intercept::DEFAULT_TUNNEL_ALLOW
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect(),
                false => Vec::new(),
            };
            for pattern in self.tunnel_allow.unwrap_or_default() {
                crate::intercept::check_pattern(&pattern).map_err(|e| invalid("tunnel_allow", &e))?;
                if !tunnel_allow.contains(&pattern) {
                    tunnel_allow.push(pattern);
                }
            }
            config.intercept = Some(InterceptSettings {
                ca_dir,
                tunnel_allow,
                registries: self.intercept.unwrap_or_default(),
            });
        }
        Ok(config)
    }
}

/// A TOML error without the source line toml quotes, which may hold a secret: its message
/// and line, and for a key that may hold one, not even the message (which can quote the value).
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let line = e
        .span()
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    let key = line
        .and_then(|n| text.lines().nth(n - 1))
        .and_then(|l| l.split_once('='))
        .map(|(key, _)| key.trim().to_owned());
    let secret = key.as_deref().is_some_and(|k| {
        let k = k.to_ascii_lowercase();
        ["pass", "auth", "token", "secret", "user"]
            .iter()
            .any(|s| k.contains(s))
    });
    let at = match (line, &key) {
        (Some(line), Some(key)) => format!("line {line}, {key}"),
        (Some(line), None) => format!("line {line}"),
        (None, _) => "the file".to_owned(),
    };
    // serde's messages for a value of the wrong type or form quote the value.
    let quotes_value = ["invalid type", "invalid value", "invalid length"]
        .iter()
        .any(|m| e.message().starts_with(m));
    match secret || quotes_value {
        true => format!("{at}: an invalid value (not shown: it may be a secret)"),
        false => format!("{at}: {}", e.message()),
    }
}

/// Cluster mode's settings, when `peer_listen` turns it on.
fn cluster(
    listen: Option<SocketAddr>,
    targets: Option<Vec<String>>,
    ca_dir: Option<PathBuf>,
    max_uploads: Option<u32>,
    refresh: Option<humantime::Duration>,
) -> Result<Option<crate::peers::Settings>, ConfigError> {
    let invalid = |setting: &str, e: &dyn Display| ConfigError(format!("{setting}: {e}"));
    let Some(listen) = listen else {
        if targets.is_some() || ca_dir.is_some() {
            return Err(invalid("peer_listen", &"cluster mode needs --peer-listen ADDR"));
        }
        return Ok(None);
    };
    if listen.ip().is_unspecified() {
        return Err(invalid("peer_listen", &"must be this node's own address, not 0.0.0.0"));
    }
    let ca_dir = ca_dir.ok_or_else(|| invalid("peer_ca_dir", &"cluster mode needs the cluster CA"))?;
    crate::ca::Ca::load(&ca_dir).map_err(|e| invalid("peer_ca_dir", &e))?;
    let targets = targets.unwrap_or_default();
    for target in &targets {
        let port = target.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok());
        if port.is_none_or(|p| p == 0) {
            return Err(invalid("peers", &format!("{target:?} is not HOST:PORT")));
        }
    }
    let max_uploads = match max_uploads {
        Some(0) => return Err(invalid("peer_max_uploads", &"must be at least 1, got 0")),
        Some(n) => n as usize,
        None => DEFAULT_PEER_MAX_UPLOADS,
    };
    let refresh = refresh.map_or(DEFAULT_PEER_REFRESH, Into::into);
    if refresh < MIN_PEER_REFRESH {
        return Err(invalid(
            "peer_refresh",
            &format!("must be at least {MIN_PEER_REFRESH:?}"),
        ));
    }
    Ok(Some(crate::peers::Settings {
        listen,
        targets,
        ca_dir,
        max_uploads,
        refresh,
    }))
}

/// Adds one `[registries."NAME"]` table.
fn add_registry(config: &mut Config, name: &str, entry: RegistryEntry) -> Result<(), ConfigError> {
    let at = |what: &str, e: &dyn Display| ConfigError(format!("[registries.{name:?}] {what}: {e}"));
    let registry = Registry::parse(name).map_err(|e| at("name", &e))?;
    if let Some(ttl) = entry.tag_ttl {
        config.tag_ttls.insert(registry.clone(), ttl.into());
    }
    if let Some(policy) = entry.private {
        config.authorize.registries.insert(registry.clone(), policy);
    }
    let settings = config.registry(registry);
    if let Some(url) = &entry.url {
        settings.url = Some(upstream_url(url).map_err(|e| at("url", &e))?);
    }
    for mirror in &entry.mirrors {
        settings
            .mirrors
            .push(upstream_url(mirror).map_err(|e| at("mirrors", &e))?);
    }
    for path in &entry.ca {
        settings
            .roots
            .extend(upstream::load_certificates(path).map_err(|e| at("ca", &e))?);
    }
    settings.credentials = Credentials::from_fields(
        entry.auth.as_deref(),
        entry.username.as_deref(),
        entry.password.as_deref(),
        entry.identity_token.as_deref(),
    )
    .map_err(|e| at("credentials", &e))?;
    Ok(())
}

/// A registry or mirror URL. Its errors never show it: a URL may hold credentials, and what
/// is refused here is printed and logged.
fn upstream_url(url: &str) -> Result<Uri, String> {
    if url.contains('@') {
        return Err("a URL with credentials (user:password@) is refused, and not shown: \
                    use username/password or the docker config"
            .to_owned());
    }
    let uri: Uri = url
        .trim()
        .parse()
        .map_err(|e| format!("not a URL (not shown: it may hold credentials): {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        return Err("not an http:// or https:// URL with a host (not shown)".to_owned());
    }
    if uri.query().is_some() {
        return Err("a URL may not have a query (not shown: it may hold a token)".to_owned());
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

    use super::super::{Cli, Command, DEFAULT_LISTEN, DEFAULT_METRICS_LISTEN, DEFAULT_TAG_TTL};
    use clap::Parser;
    use std::time::Duration;

    #[test]
    fn upstream_mappings() {
        let Upstream { registry, url } = "docker.io=http://127.0.0.1:5001".parse().unwrap();
        assert_eq!(registry.as_str(), "docker.io");
        assert_eq!(url.to_string(), "http://127.0.0.1:5001/");
        for bad in [
            "docker.io",
            "docker.io=ftp://x",
            "bad name=http://x",
            "a=http://x?y=1",
            "a=/relative",
        ] {
            assert!(bad.parse::<Upstream>().is_err(), "{bad}");
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
private = "share"
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
        assert_eq!(config.authorize.registries[&name], PrivateImages::Share);
        assert_eq!(
            config.authorize.private_images,
            PrivateImages::Bypass,
            "the default stays"
        );
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
        assert_eq!(
            intercept.tunnel_allow.last().map(String::as_str),
            Some("auth.example.com"),
            "added to the defaults"
        );
        for default in crate::intercept::DEFAULT_TUNNEL_ALLOW {
            assert!(intercept.tunnel_allow.iter().any(|p| p == default), "{default} stays");
        }
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
            ("[registries.\"x.io\"]\nprivate = \"open\"\n", "bypass or share"),
            ("tag_ttl = \"soon\"\n", "tag_ttl"),
            ("max_connections = 0\n", "max_connections"),
            ("cache_max_size = \"lots\"\n", "cache_max_size"),
            ("offline = \"maybe\"\n", "offline"),
            (
                "[registries.\"x.io\"]\nurl = \"https://u:S3CRET@x.io\"\n",
                "credentials",
            ),
            (
                "[registries.\"x.io\"]\nmirrors = [\"https://S3CRET@m.io/v2\"]\n",
                "credentials",
            ),
            ("[registries.\"x.io\"]\npassword = 12345678\n", "line 2"),
            ("[registries.\"x.io\"]\npassword = \"S3CRET\n", "line 2"),
            ("[registries.\"x.io\"]\npasword = \"S3CRET\"\n", "unknown field"),
            ("[registries]\n\"x.io\" = { password = 12345678 }\n", "not shown"),
            ("\"p\\u0061ssword\" = 12345678\n", "unknown field"),
            (
                "[registries.\"x.io\"]\nurl = \"https://u:S3/CRET@x.io\"\n",
                "credentials",
            ),
            ("[registries.\"x.io\"]\nurl = \"https:/u:S3CRET.x.io\"\n", "not shown"),
            ("[registries.\"x.io\"]\nurl = \"https://x.io/?t=S3CRET\"\n", "query"),
            ("upstream = [\"x.io:https://S3CRET.x.io\"]\n", "NAME=URL"),
        ] {
            std::fs::write(&file, text).unwrap();
            let e = serve(&["--config", file.to_str().unwrap()]).resolve().unwrap_err();
            assert!(e.to_string().contains(expected), "{text:?}: {e}");
            for secret in ["S3CRET", "12345678"] {
                assert!(!e.to_string().contains(secret), "{text:?}: a secret in {e}");
            }
        }
        let e = serve(&["--docker-config", "/nonexistent/config.json"])
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/config.json"), "{e}");
    }

    /// A boolean the file sets can be undone from the command line, and a flag wins both ways.
    #[test]
    fn flags_win_over_the_file_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pullcache.toml");
        std::fs::write(&file, "offline = true\nmax_connections = 7\n").unwrap();
        let path = file.to_str().unwrap();
        let config = serve(&["--config", path]).resolve().unwrap();
        assert!(config.upstream.offline);
        assert_eq!(config.limits.max_connections, 7);
        let config = serve(&["--config", path, "--offline=false", "--max-connections", "9"])
            .resolve()
            .unwrap();
        assert!(!config.upstream.offline);
        assert_eq!(config.limits.max_connections, 9);
        std::fs::write(&file, "offline = false\n").unwrap();
        assert!(
            serve(&["--config", path, "--offline"])
                .resolve()
                .unwrap()
                .upstream
                .offline
        );
    }

    /// Docker Hub's hosts are tunnelled while Docker Hub is what docker.io is fetched from.
    #[test]
    fn docker_hubs_tunnels_follow_docker_hub() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let ca = ca.to_str().unwrap();
        let tunnels = |args: &[&str]| {
            let all = [&["--ca-dir", ca, "--tunnel-allow", "x.example.com"][..], args].concat();
            serve(&all).resolve().unwrap().intercept.unwrap().tunnel_allow
        };
        let hub = tunnels(&[]);
        assert!(hub.iter().any(|t| t == "auth.docker.io") && hub.contains(&"x.example.com".to_owned()));
        for args in [
            &["--offline"][..],
            &["--upstream", "docker.io=https://harbor.example.com"],
        ] {
            assert_eq!(tunnels(args), vec!["x.example.com".to_owned()], "{args:?}");
        }
    }

    #[test]
    fn a_zero_peer_refresh_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        crate::ca::init(&dir.path().join("ca")).unwrap();
        let ca = dir.path().join("ca");
        let ca = ca.to_str().unwrap();
        let ok = ["--peer-listen", "127.0.0.1:7443", "--peer-ca-dir", ca];
        assert!(serve(&ok).resolve().is_ok());
        let e = serve(&[&ok[..], &["--peer-refresh", "0s"]].concat())
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("peer_refresh"), "{e}");
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
