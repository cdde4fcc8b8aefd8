//! Node wiring: `pullcache containerd-config install|uninstall`. Install writes a hosts.toml
//! per registry under containerd's certs.d with pullcache as the first `pull`/`resolve` host
//! and the registry itself kept as `server`, so containerd falls back to it whenever
//! pullcache is down (fail open). An existing hosts.toml is backed up once and merged: its
//! settings and hosts stay, after ours. Install is idempotent; uninstall restores every file
//! exactly and removes what install created.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::oci::Registry;

/// The first line of every file pullcache writes.
const MARKER: &str = "# Managed by pullcache (containerd-config install).";
/// The original hosts.toml, kept until uninstall.
const BACKUP: &str = "hosts.toml.pullcache-orig";
/// Left in a registry directory install created, so uninstall removes it again.
const CREATED: &str = ".pullcache-created";
/// The directory for every registry without one of its own.
pub const DEFAULT_HOST: &str = "_default";

#[derive(Debug, thiserror::Error)]
#[error("containerd-config: {path}: {source}")]
pub struct WiringError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> WiringError + '_ {
    move |source| WiringError {
        path: path.to_owned(),
        source,
    }
}

/// What install or uninstall did to one registry's hosts.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Written(PathBuf),
    Unchanged(PathBuf),
    Restored(PathBuf),
    Removed(PathBuf),
}

/// The `server` containerd falls back to for a registry directory.
fn default_server(name: &str) -> Option<String> {
    match name {
        DEFAULT_HOST => None,
        "docker.io" => Some("https://registry-1.docker.io".to_owned()),
        other => Some(format!("https://{other}")),
    }
}

/// The hosts.toml for `name`, with `mirror` first, merged over `original` if there is one.
/// Without a mirror (a bypassed registry), containerd goes to the registry itself.
pub fn render(name: &str, mirror: Option<&str>, original: Option<&str>) -> String {
    let original = original.unwrap_or("");
    // Root keys (server, ca, ...) must come before any table; the original's go first, then
    // our host, then the original's hosts, which containerd tries after ours.
    let split = original
        .lines()
        .position(|l| l.trim_start().starts_with('['))
        .unwrap_or(original.lines().count());
    let lines: Vec<&str> = original.lines().collect();
    let (root, tables) = lines.split_at(split);
    let root = &root[..root.iter().rposition(|l| !l.trim().is_empty()).map_or(0, |i| i + 1)];
    let mut out = String::new();
    out.push_str(MARKER);
    out.push_str("\n# `pullcache containerd-config uninstall` restores the original.\n");
    let has_server = root.iter().any(|l| l.trim_start().starts_with("server"));
    if !has_server && let Some(server) = default_server(name) {
        out.push_str(&format!("server = \"{server}\"\n"));
    }
    for line in root {
        out.push_str(line);
        out.push('\n');
    }
    if let Some(mirror) = mirror {
        let header = format!("[host.\"{mirror}\"]");
        if !tables.iter().any(|l| l.trim() == header) {
            out.push('\n');
            out.push_str(&header);
            out.push_str("\n  capabilities = [\"pull\", \"resolve\"]\n");
        }
    } else {
        // containerd 1.6 ignores a file without a host table: name the server as one.
        let server = root
            .iter()
            .filter_map(|l| l.trim_start().strip_prefix("server")?.trim_start().strip_prefix('='))
            .map(|v| v.trim().trim_matches('"').to_owned())
            .next()
            .or_else(|| default_server(name));
        out.push_str("\n# Bypassed (--bypass): pulled from the registry itself, with the pod's secret.\n");
        if let Some(server) = server {
            let header = format!("[host.\"{server}\"]");
            if !tables.iter().any(|l| l.trim() == header) {
                out.push_str(&format!("{header}\n  capabilities = [\"pull\", \"resolve\"]\n"));
            }
        }
    }
    if !tables.is_empty() {
        out.push('\n');
        for line in tables {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Writes hosts.toml for each registry (or `_default`) under `certs_dir`, and for each of
/// `bypass` one without pullcache: a registry of private images that containerd should
/// always pull from itself, with the pod's own secret.
pub fn install(
    certs_dir: &Path,
    mirror: &str,
    registries: &[Registry],
    bypass: &[Registry],
) -> Result<Vec<Change>, WiringError> {
    let mut names: Vec<(String, Option<&str>)> = if registries.is_empty() {
        vec![(DEFAULT_HOST.to_owned(), Some(mirror))]
    } else {
        registries.iter().map(|r| (r.to_string(), Some(mirror))).collect()
    };
    // A bypassed registry is never mirrored, whatever the list says.
    names.retain(|(name, _)| !bypass.iter().any(|b| b.as_str() == name));
    names.extend(bypass.iter().map(|r| (r.to_string(), None)));
    let mut changes = Vec::new();
    for (name, mirror) in names {
        let dir = certs_dir.join(&name);
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(at(&dir))?;
            fs::write(dir.join(CREATED), b"").map_err(at(&dir))?;
        }
        let hosts = dir.join("hosts.toml");
        let backup = dir.join(BACKUP);
        let current = read_optional(&hosts)?;
        let ours = current.as_deref().is_some_and(|c| c.starts_with(MARKER));
        if let Some(current) = &current
            && !ours
            && !backup.exists()
        {
            fs::write(&backup, current).map_err(at(&backup))?;
        }
        let original = read_optional(&backup)?;
        let wanted = render(&name, mirror, original.as_deref());
        if current.as_deref() == Some(wanted.as_str()) {
            changes.push(Change::Unchanged(hosts));
            continue;
        }
        write_atomic(&hosts, wanted.as_bytes())?;
        changes.push(Change::Written(hosts));
    }
    Ok(changes)
}

/// Undoes install under `certs_dir`: originals restored byte for byte, our files removed.
pub fn uninstall(certs_dir: &Path) -> Result<Vec<Change>, WiringError> {
    let mut changes = Vec::new();
    let entries = match fs::read_dir(certs_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(changes),
        Err(e) => return Err(at(certs_dir)(e)),
    };
    let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    for dir in dirs {
        let hosts = dir.join("hosts.toml");
        let backup = dir.join(BACKUP);
        let ours = read_optional(&hosts)?.is_some_and(|c| c.starts_with(MARKER));
        if backup.exists() {
            fs::rename(&backup, &hosts).map_err(at(&hosts))?;
            changes.push(Change::Restored(hosts));
        } else if ours {
            fs::remove_file(&hosts).map_err(at(&hosts))?;
            changes.push(Change::Removed(hosts));
        }
        if dir.join(CREATED).exists() {
            fs::remove_file(dir.join(CREATED)).map_err(at(&dir))?;
            // Only if empty: anything else in it is not ours to delete.
            let _ = fs::remove_dir(&dir);
        }
    }
    Ok(changes)
}

fn read_optional(path: &Path) -> Result<Option<String>, WiringError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(at(path)(e)),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WiringError> {
    let tmp = path.with_extension("toml.pullcache-tmp");
    fs::write(&tmp, bytes).map_err(at(&tmp))?;
    fs::rename(&tmp, path).map_err(at(path))
}

/// What containerd's own config says about `config_path`, the setting that makes it read
/// certs.d at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigPath {
    /// Set, to these directories (`:`-separated in containerd).
    Set(Vec<PathBuf>),
    /// The file exists and does not set it: certs.d is ignored.
    Unset,
    /// There is no containerd config file to read.
    NoConfig,
}

/// Reads `config_path` from the CRI registry section of a containerd config.toml (1.x or
/// 2.x layout).
pub fn config_path(containerd_config: &Path) -> Result<ConfigPath, WiringError> {
    let Some(text) = read_optional(containerd_config)? else {
        return Ok(ConfigPath::NoConfig);
    };
    let value: toml::Table = toml::from_str(&text).map_err(|e: toml::de::Error| {
        at(containerd_config)(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    })?;
    // containerd 1.x keeps it in the CRI plugin, 2.x in the CRI images plugin.
    let config_path = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images"]
        .iter()
        .filter_map(|plugin| {
            value
                .get("plugins")?
                .get(*plugin)?
                .get("registry")?
                .get("config_path")?
                .as_str()
        })
        .find(|path| !path.is_empty());
    match config_path {
        Some(path) => Ok(ConfigPath::Set(path.split(':').map(PathBuf::from).collect())),
        None => Ok(ConfigPath::Unset),
    }
}

/// The advice for a containerd whose `config_path` is not the certs dir we write.
pub fn config_path_advice(containerd_config: &Path, found: &ConfigPath, certs_dir: &Path) -> Option<String> {
    let fix = format!(
        "add to {}:\n  [plugins.\"io.containerd.grpc.v1.cri\".registry]\n    config_path = \"{}\"\nthen restart containerd",
        containerd_config.display(),
        certs_dir.display()
    );
    match found {
        ConfigPath::Set(dirs) if dirs.iter().any(|d| d == certs_dir) => None,
        ConfigPath::Set(dirs) => Some(format!(
            "containerd reads hosts.toml from {dirs:?}, not {}; containerd will not use pullcache. To fix, {fix}",
            certs_dir.display()
        )),
        ConfigPath::Unset => Some(format!(
            "containerd's config_path is unset, so it ignores {} and will not use pullcache. To fix, {fix}",
            certs_dir.display()
        )),
        ConfigPath::NoConfig => Some(format!(
            "no containerd config at {}; cannot tell whether containerd reads {} (its CRI registry config_path must point there)",
            containerd_config.display(),
            certs_dir.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_path_detection() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        assert_eq!(config_path(&file).unwrap(), ConfigPath::NoConfig);
        fs::write(&file, "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n").unwrap();
        assert_eq!(config_path(&file).unwrap(), ConfigPath::Unset);
        let certs = Path::new("/etc/containerd/certs.d");
        assert!(
            config_path_advice(&file, &ConfigPath::Unset, certs)
                .unwrap()
                .contains("config_path = \"/etc/containerd/certs.d\"")
        );
        fs::write(
            &file,
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d:/other\"\n",
        )
        .unwrap();
        let found = config_path(&file).unwrap();
        assert_eq!(found, ConfigPath::Set(vec![certs.to_owned(), PathBuf::from("/other")]));
        assert_eq!(config_path_advice(&file, &found, certs), None);
        fs::write(
            &file,
            "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
        )
        .unwrap();
        assert_eq!(
            config_path(&file).unwrap(),
            ConfigPath::Set(vec![certs.to_owned()]),
            "containerd 2.x"
        );
        fs::write(&file, "not toml [").unwrap();
        assert!(config_path(&file).is_err());
    }
}
