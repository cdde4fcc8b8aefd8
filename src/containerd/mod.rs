//! Node wiring: `pullcache containerd-config install|uninstall`. [`hosts`] writes the
//! hosts.toml files that put pullcache in front of each registry; [`config`] reads
//! containerd's own config, as the running release reads it, to tell whether containerd will
//! look at them at all.

pub mod config;
pub mod hosts;

use std::io;
use std::path::{Path, PathBuf};

pub use config::{ConfigPath, ContainerdConfig, Release};
pub use hosts::{Change, DEFAULT_HOST, install, render, uninstall};

#[derive(Debug, thiserror::Error)]
#[error("containerd-config: {path}: {source}")]
pub struct WiringError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl WiringError {
    fn at(path: &Path, source: io::Error) -> WiringError {
        WiringError {
            path: path.to_owned(),
            source,
        }
    }
}

/// Where containerd's certs.d is when the operator does not say.
pub const DEFAULT_CERTS_DIR: &str = "/etc/containerd/certs.d";

/// What install found out about the node's containerd before writing anything.
#[derive(Debug, Clone)]
pub struct Survey {
    /// The config file read, or looked for.
    pub config_file: PathBuf,
    pub config: Option<ContainerdConfig>,
    /// The running release: from its binary, else from its config's layout.
    pub release: Option<Release>,
}

impl Survey {
    /// Reads containerd's config (`config_file`, or the first of [`config::LOCATIONS`] that
    /// exists) and asks `binary --version` for its release.
    pub fn take(config_file: Option<&Path>, binary: &Path) -> Result<Survey, WiringError> {
        let config_file = match config_file {
            Some(path) => path.to_owned(),
            None => config::locate(Path::new("/")).unwrap_or_else(|| PathBuf::from(config::LOCATIONS[0])),
        };
        let config = ContainerdConfig::read(&config_file)?;
        let release = Release::of_binary(binary).or_else(|| config.as_ref().and_then(|c| c.release_by_layout()));
        Ok(Survey {
            config_file,
            config,
            release,
        })
    }

    /// The certs dir containerd reads: the first directory of its `config_path`, else
    /// [`DEFAULT_CERTS_DIR`].
    pub fn certs_dir(&self) -> PathBuf {
        let found = self
            .config
            .as_ref()
            .map(|c| c.config_path(self.release.unwrap_or(Release::Two)));
        match found {
            Some(ConfigPath::Set { dirs, .. }) if !dirs.is_empty() => dirs[0].clone(),
            _ => PathBuf::from(DEFAULT_CERTS_DIR),
        }
    }

    /// Why containerd would not read hosts.toml from `certs_dir`, with the fix; `None` when
    /// it will.
    pub fn advice(&self, certs_dir: &Path) -> Option<String> {
        config::advice(self.config.as_ref(), &self.config_file, self.release, certs_dir)
    }
}
