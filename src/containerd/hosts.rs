//! The hosts.toml files under containerd's certs.d: pullcache as the first `pull`/`resolve`
//! host of each registry, the registry itself kept as `server`, so containerd falls back to it
//! whenever pullcache is down (fail open). An existing hosts.toml is backed up once and
//! merged: its settings and hosts stay, after ours. A registry directory with certificates
//! and no hosts.toml keeps them as its `ca` and `client`. Install is idempotent; uninstall
//! restores every file exactly and removes what install created.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::WiringError;
use crate::oci::Registry;

/// The first line of every file pullcache writes.
const MARKER: &str = "# Managed by pullcache (containerd-config install).";
/// The original hosts.toml, kept until uninstall.
const BACKUP: &str = "hosts.toml.pullcache-orig";
/// Left in a registry directory install created, so uninstall removes it again.
const CREATED: &str = ".pullcache-created";
/// The directory for every registry without one of its own.
pub const DEFAULT_HOST: &str = "_default";

fn at(path: &Path) -> impl FnOnce(io::Error) -> WiringError + '_ {
    move |source| WiringError::at(path, source)
}

/// What install or uninstall did to one registry's hosts.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Written where the operator had nothing.
    Written(PathBuf),
    /// Written over the operator's own hosts.toml (kept beside it) or certificates, which
    /// stay in effect after pullcache.
    Merged(PathBuf),
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

/// Writes hosts.toml for each registry under `certs_dir`, and for each of `bypass` one
/// without pullcache: a registry of private images that containerd should always pull from
/// itself, with the pod's own secret. With no registries named, that is `_default` and every
/// registry directory already there: containerd reads a registry's own directory instead of
/// `_default`, so one left alone would skip pullcache.
pub fn install(
    certs_dir: &Path,
    mirror: &str,
    registries: &[Registry],
    bypass: &[Registry],
) -> Result<Vec<Change>, WiringError> {
    let mut names: Vec<(String, Option<&str>)> = if registries.is_empty() {
        let mut names = vec![(DEFAULT_HOST.to_owned(), Some(mirror))];
        names.extend(registry_dirs(certs_dir)?.into_iter().map(|name| (name, Some(mirror))));
        names
    } else {
        registries.iter().map(|r| (r.to_string(), Some(mirror))).collect()
    };
    // A bypassed registry is never mirrored, whatever the list says.
    names.retain(|(name, _)| !bypass.iter().any(|b| server_name(name) == b.as_str()));
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
        let original = match read_optional(&backup)? {
            Some(original) => Some(original),
            None => cert_files(&dir)?,
        };
        let wanted = render(&server_name(&name), mirror, original.as_deref());
        if current.as_deref() == Some(wanted.as_str()) {
            changes.push(Change::Unchanged(hosts));
            continue;
        }
        write_atomic(&hosts, wanted.as_bytes())?;
        changes.push(match original {
            Some(_) => Change::Merged(hosts),
            None => Change::Written(hosts),
        });
    }
    Ok(changes)
}

/// The registry directories under `certs_dir` besides `_default`, by name.
fn registry_dirs(certs_dir: &Path) -> Result<Vec<String>, WiringError> {
    let entries = match fs::read_dir(certs_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(at(certs_dir)(e)),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|name| name != DEFAULT_HOST && Registry::parse(&server_name(name)).is_ok())
        .collect();
    names.sort();
    Ok(names)
}

/// The registry a certs.d directory is for: containerd finds `host:port` as `host_port_` too.
fn server_name(dir: &str) -> String {
    if let Some(stem) = dir.strip_suffix('_')
        && let Some((host, port)) = stem.rsplit_once('_')
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        return format!("{host}:{port}");
    }
    dir.to_owned()
}

/// A hosts.toml's root keys for the certificates in a registry directory without one, as
/// containerd loads them there (`*.crt` as CAs, a `*.cert` with the `*.key` of its name as a
/// client pair): once hosts.toml exists, containerd reads only that file.
fn cert_files(dir: &Path) -> Result<Option<String>, WiringError> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(at(dir))?
        .flatten()
        .map(|e| e.path())
        // A name that is not UTF-8 cannot be written into hosts.toml as it is.
        .filter(|p| p.is_file() && p.to_str().is_some())
        .collect();
    files.sort();
    let quoted = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    let cas: Vec<String> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "crt"))
        .map(|p| quoted(p))
        .collect();
    let clients: Vec<String> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cert"))
        .filter_map(|cert| {
            let key = cert.with_extension("key");
            key.is_file().then(|| format!("[{}, {}]", quoted(cert), quoted(&key)))
        })
        .collect();
    if cas.is_empty() && clients.is_empty() {
        return Ok(None);
    }
    let mut root = String::from("# The certificates containerd read from this directory before it had a hosts.toml.\n");
    if !cas.is_empty() {
        root.push_str(&format!("ca = [{}]\n", cas.join(", ")));
    }
    if !clients.is_empty() {
        root.push_str(&format!("client = [{}]\n", clients.join(", ")));
    }
    Ok(Some(root))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(name: &str) -> Registry {
        Registry::parse(name).unwrap()
    }

    #[test]
    fn directory_names_are_registries() {
        assert_eq!(server_name("127.0.0.1_5000_"), "127.0.0.1:5000");
        assert_eq!(server_name("registry.test:5000"), "registry.test:5000");
        assert_eq!(server_name("docker.io"), "docker.io");
        assert_eq!(server_name("odd_name_"), "odd_name_");
    }

    #[test]
    fn every_registry_directory_already_there_is_merged() {
        let certs = tempfile::tempdir().unwrap();
        let d = certs.path();
        fs::create_dir_all(d.join("docker.io")).unwrap();
        fs::write(
            d.join("docker.io/hosts.toml"),
            "server = \"https://registry-1.docker.io\"\n",
        )
        .unwrap();
        fs::create_dir_all(d.join("10.0.0.1_5000_")).unwrap();
        fs::write(d.join("10.0.0.1_5000_/ca.crt"), "pem").unwrap();
        fs::write(d.join("10.0.0.1_5000_/client.cert"), "pem").unwrap();
        fs::write(d.join("10.0.0.1_5000_/client.key"), "pem").unwrap();
        fs::create_dir_all(d.join("empty.example")).unwrap();
        fs::create_dir_all(d.join("private.example")).unwrap();
        fs::create_dir_all(d.join("not a registry")).unwrap();
        let mirror = "http://127.0.0.1:5000";
        let changes = install(d, mirror, &[], &[registry("private.example")]).unwrap();
        let merged: Vec<_> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Merged(p) => Some(p.strip_prefix(d).unwrap().to_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(
            merged,
            [
                Path::new("10.0.0.1_5000_/hosts.toml"),
                Path::new("docker.io/hosts.toml")
            ]
        );
        let with_certs = fs::read_to_string(d.join("10.0.0.1_5000_/hosts.toml")).unwrap();
        let ca = d.join("10.0.0.1_5000_/ca.crt");
        assert!(
            with_certs.contains("server = \"https://10.0.0.1:5000\""),
            "{with_certs}"
        );
        assert!(
            with_certs.contains(&format!("ca = [\"{}\"]", ca.display())),
            "{with_certs}"
        );
        assert!(with_certs.contains("client = [["), "{with_certs}");
        let parsed: toml::Table = toml::from_str(&with_certs).unwrap();
        assert!(parsed["host"].get(mirror).is_some());
        let empty = fs::read_to_string(d.join("empty.example/hosts.toml")).unwrap();
        assert!(empty.contains(&format!("[host.\"{mirror}\"]")), "{empty}");
        // The bypassed registry's own directory goes to the registry, never pullcache.
        let bypassed = fs::read_to_string(d.join("private.example/hosts.toml")).unwrap();
        assert!(!bypassed.contains(mirror), "{bypassed}");
        assert!(!d.join("not a registry/hosts.toml").exists());

        // Idempotent, and uninstall leaves the certificates as containerd read them.
        let again = install(d, mirror, &[], &[registry("private.example")]).unwrap();
        assert!(again.iter().all(|c| matches!(c, Change::Unchanged(_))), "{again:?}");
        uninstall(d).unwrap();
        assert!(!d.join("10.0.0.1_5000_/hosts.toml").exists());
        assert!(d.join("10.0.0.1_5000_/ca.crt").exists());
        assert_eq!(
            fs::read_to_string(d.join("docker.io/hosts.toml")).unwrap(),
            "server = \"https://registry-1.docker.io\"\n"
        );
        assert!(!d.join("_default").exists());
    }

    #[test]
    fn named_registries_leave_the_others_alone() {
        let certs = tempfile::tempdir().unwrap();
        let d = certs.path();
        fs::create_dir_all(d.join("docker.io")).unwrap();
        let changes = install(d, "http://127.0.0.1:5000", &[registry("ghcr.io")], &[]).unwrap();
        assert_eq!(changes, [Change::Written(d.join("ghcr.io/hosts.toml"))]);
        assert!(!d.join("docker.io/hosts.toml").exists());
    }
}
