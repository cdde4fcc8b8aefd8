//! Command-line and environment configuration (`PULLCACHE_*` for every flag), and its
//! resolution into what the library runs with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use http::Uri;

use crate::oci::Registry;

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
    /// Serve the registry API as a pull-through cache (containerd mirror).
    Serve(ServeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on. containerd's hosts.toml points at it.
    #[arg(long, env = "PULLCACHE_LISTEN", default_value = "127.0.0.1:5000")]
    pub listen: SocketAddr,

    /// Cache directory. Default: /var/lib/pullcache when running as root, otherwise
    /// $XDG_CACHE_HOME/pullcache (or ~/.cache/pullcache).
    #[arg(long, env = "PULLCACHE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Fetch registry NAME (as containerd names it, e.g. docker.io) from URL. Repeatable;
    /// comma-separated in the environment. Unmapped: docker.io is fetched from
    /// `https://registry-1.docker.io` and any other `host:port` from `https://host:port`.
    #[arg(long = "upstream", env = "PULLCACHE_UPSTREAM", value_name = "NAME=URL", value_delimiter = ',', value_parser = parse_upstream)]
    pub upstreams: Vec<(Registry, Uri)>,

    /// How long a tag's answer is served without asking upstream; after that one HEAD
    /// revalidates it (e.g. 30s, 5m, 1h).
    #[arg(long, env = "PULLCACHE_TAG_TTL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub tag_ttl: Duration,
}

/// What [`crate::run`] needs, resolved from the arguments.
#[derive(Debug, Clone)]
pub struct Config {
    pub cache_dir: PathBuf,
    pub upstreams: HashMap<Registry, Uri>,
    pub tag_ttl: Duration,
}

impl ServeArgs {
    pub fn resolve(&self) -> Config {
        Config {
            cache_dir: self.cache_dir.clone().unwrap_or_else(default_cache_dir),
            upstreams: self.upstreams.iter().cloned().collect(),
            tag_ttl: self.tag_ttl,
        }
    }
}

fn parse_upstream(s: &str) -> Result<(Registry, Uri), String> {
    let (name, url) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=URL"))?;
    let registry = Registry::parse(name.trim()).map_err(|e| e.to_string())?;
    let uri: Uri = url.trim().parse().map_err(|e| format!("{url:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
        return Err(format!("{url:?} is not an http:// or https:// URL"));
    }
    if uri.query().is_some() {
        return Err(format!("{url:?} may not have a query"));
    }
    Ok((registry, uri))
}

fn default_cache_dir() -> PathBuf {
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
        let cli = Cli::try_parse_from(["pullcache", "serve"]).unwrap();
        let Command::Serve(args) = cli.command;
        assert_eq!(args.listen, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(args.tag_ttl, Duration::from_secs(300));
        let config = args.resolve();
        assert!(config.cache_dir.ends_with("pullcache"));
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
