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
/// Left in a directory install created (a registry's, or the certs dir itself), so uninstall
/// removes it again.
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
    /// Left as it is, and why: containerd goes on reading it without pullcache.
    Skipped(PathBuf, String),
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
    let split = first_table_line(original);
    let lines: Vec<&str> = original.lines().collect();
    let (root, tables) = lines.split_at(split);
    let root = &root[..root.iter().rposition(|l| !l.trim().is_empty()).map_or(0, |i| i + 1)];
    let mut out = String::new();
    out.push_str(MARKER);
    out.push_str("\n# `pullcache containerd-config uninstall` restores the original.\n");
    let parsed: Option<toml::Table> = toml::from_str(original).ok();
    let original_server = parsed
        .as_ref()
        .and_then(|t| t.get("server"))
        .and_then(toml::Value::as_str)
        .map(str::to_owned);
    let has_server = parsed.as_ref().is_some_and(|t| t.contains_key("server"));
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
        let server = original_server.or_else(|| default_server(name));
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

/// The index of the first line of `text` that opens a table (`[...]` or `[[...]]`), or the
/// number of lines: where the root keys end. Lines inside a multi-line array, inline table or
/// string are not headers, however they start.
fn first_table_line(text: &str) -> usize {
    let (mut depth, mut multiline): (usize, Option<&str>) = (0, None);
    for (n, line) in text.lines().enumerate() {
        if depth == 0 && multiline.is_none() && line.trim_start().starts_with('[') {
            return n;
        }
        let mut rest = line;
        while !rest.is_empty() {
            if let Some(close) = multiline {
                match rest.find(close) {
                    Some(at) => {
                        rest = &rest[at + 3..];
                        multiline = None;
                    }
                    None => rest = "",
                }
                continue;
            }
            let c = rest.chars().next().expect("not empty");
            match c {
                '#' => rest = "",
                '"' | '\'' if rest.starts_with("\"\"\"") || rest.starts_with("\'\'\'") => {
                    multiline = Some(if c == '"' { "\"\"\"" } else { "\'\'\'" });
                    rest = &rest[3..];
                }
                '"' => rest = skip_basic_string(&rest[1..]),
                '\'' => rest = rest[1..].split_once('\'').map_or("", |(_, r)| r),
                '[' | '{' => {
                    depth += 1;
                    rest = &rest[1..];
                }
                ']' | '}' => {
                    depth = depth.saturating_sub(1);
                    rest = &rest[1..];
                }
                _ => rest = &rest[c.len_utf8()..],
            }
        }
    }
    text.lines().count()
}

/// What follows a one-line basic string whose opening quote is gone.
fn skip_basic_string(mut rest: &str) -> &str {
    while let Some(at) = rest.find(['"', '\\']) {
        if rest.as_bytes()[at] == b'"' {
            return &rest[at + 1..];
        }
        rest = rest.get(at + 2..).unwrap_or("");
    }
    ""
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
    if fs::symlink_metadata(certs_dir).is_err() {
        fs::create_dir_all(certs_dir).map_err(at(certs_dir))?;
        fs::write(certs_dir.join(CREATED), b"").map_err(at(certs_dir))?;
    }
    for (name, mirror) in names {
        let dir = certs_dir.join(&name);
        if fs::symlink_metadata(&dir).is_err() {
            fs::create_dir_all(&dir).map_err(at(&dir))?;
            fs::write(dir.join(CREATED), b"").map_err(at(&dir))?;
        }
        changes.push(merge(&dir, &name, mirror)?);
    }
    Ok(changes)
}

/// Writes the hosts.toml of one registry directory, merged over what the operator had.
fn merge(dir: &Path, name: &str, mirror: Option<&str>) -> Result<Change, WiringError> {
    let hosts = dir.join("hosts.toml");
    let backup = dir.join(BACKUP);
    let skip = |why: &str| Ok(Change::Skipped(hosts.clone(), why.to_owned()));
    // Only real files and directories: a link could point the writes anywhere.
    if !fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
        return skip("the registry directory is a link");
    }
    for file in [&hosts, &backup] {
        if fs::symlink_metadata(file).is_ok_and(|m| !m.is_file()) {
            return skip(&format!("{} is a link or not a file", file.display()));
        }
    }
    let current = read_optional(&hosts)?;
    let ours = current.as_deref().is_some_and(|c| c.starts_with(MARKER));
    if let Some(current) = &current
        && !ours
        && toml::from_str::<toml::Table>(current).is_err()
    {
        return skip("it is not valid TOML, so containerd cannot read it either");
    }
    if let Some(current) = &current
        && !ours
        && fs::symlink_metadata(&backup).is_err()
    {
        write_new(&backup, current.as_bytes())?;
    }
    let original = match read_optional(&backup)? {
        Some(original) => Some(original),
        None => cert_files(dir)?,
    };
    let wanted = render(&server_name(name), mirror, original.as_deref());
    // What containerd will read must parse, with pullcache's host in it.
    let parsed: Option<toml::Table> = toml::from_str(&wanted).ok();
    let has_mirror = match (mirror, &parsed) {
        (Some(mirror), Some(table)) => table.get("host").and_then(|h| h.get(mirror)).is_some(),
        (None, Some(_)) => true,
        (_, None) => false,
    };
    if !has_mirror {
        return skip("merged with what is there, it would not be valid TOML with pullcache's host");
    }
    if current.as_deref() == Some(wanted.as_str()) {
        return Ok(Change::Unchanged(hosts));
    }
    write_atomic(&hosts, wanted.as_bytes())?;
    Ok(match original {
        Some(_) => Change::Merged(hosts),
        None => Change::Written(hosts),
    })
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
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
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
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        // A name that is not UTF-8, or has control characters, is not written into hosts.toml.
        .filter(|p| p.to_str().is_some_and(|s| !s.chars().any(char::is_control)))
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
    // A link is not a directory install made or merged (install refuses them): not followed.
    let (mut dirs, mut links) = (Vec::new(), Vec::new());
    for entry in entries.flatten() {
        match entry.file_type() {
            Ok(t) if t.is_dir() => dirs.push(entry.path()),
            Ok(t) if t.is_symlink() && entry.path().is_dir() => links.push(entry.path()),
            _ => {}
        }
    }
    dirs.sort();
    links.sort();
    changes.extend(
        links
            .into_iter()
            .map(|link| Change::Skipped(link, "the registry directory is a link, not followed".to_owned())),
    );
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
    if certs_dir.join(CREATED).exists() {
        fs::remove_file(certs_dir.join(CREATED)).map_err(at(certs_dir))?;
        let _ = fs::remove_dir(certs_dir);
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

/// Writes `path` whole or not at all: a new temporary file beside it (whatever was at that
/// name, a link included, removed first, never written through), then renamed over it.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WiringError> {
    let tmp = path.with_extension("toml.pullcache-tmp");
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(at(&tmp)(e)),
        _ => {}
    }
    write_new(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(at(path))
}

/// Creates `path`, failing if anything is there already, a dangling link included.
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), WiringError> {
    use std::io::Write as _;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(at(path))?;
    file.write_all(bytes).map_err(at(path))
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

    /// Found by the attack review: each used to give a hosts.toml containerd cannot parse, or
    /// a write outside the certs dir.
    #[test]
    fn what_is_there_is_merged_safely_or_left_alone() {
        let certs = tempfile::tempdir().unwrap();
        let d = certs.path();
        let mirror = "http://127.0.0.1:5000";
        // A multi-line array whose elements start with `[`: not a table.
        fs::create_dir_all(d.join("multi.example")).unwrap();
        let multi = "server = \"https://multi.example\"\nclient = [\n  [\"/c.cert\", \"/c.key\"],\n]\n\n[host.\"https://m.example\"]\n  capabilities = [\"pull\"]\n";
        fs::write(d.join("multi.example/hosts.toml"), multi).unwrap();
        // A certificate whose name has a newline: not written into hosts.toml.
        fs::create_dir_all(d.join("newline.example")).unwrap();
        fs::write(d.join("newline.example/a\n[x].crt"), "pem").unwrap();
        // Not TOML at all: left alone, as containerd cannot read it either.
        fs::create_dir_all(d.join("broken.example")).unwrap();
        fs::write(d.join("broken.example/hosts.toml"), "server = [\n").unwrap();
        // Links where install writes: never written through.
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("target");
        fs::write(&target, "precious").unwrap();
        fs::create_dir_all(d.join("tmp.example")).unwrap();
        std::os::unix::fs::symlink(&target, d.join("tmp.example/hosts.toml.pullcache-tmp")).unwrap();
        fs::create_dir_all(d.join("backup.example")).unwrap();
        fs::write(
            d.join("backup.example/hosts.toml"),
            "server = \"https://backup.example\"\n",
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.path().join("made"), d.join("backup.example").join(BACKUP)).unwrap();
        std::os::unix::fs::symlink(outside.path(), d.join("linked.example")).unwrap();

        let changes = install(d, mirror, &[], &[]).unwrap();
        let skipped: Vec<String> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Skipped(p, _) => Some(p.parent().unwrap().file_name().unwrap().to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(skipped, ["backup.example", "broken.example"], "{changes:?}");
        for name in ["multi.example", "newline.example", "tmp.example", "_default"] {
            let text = fs::read_to_string(d.join(name).join("hosts.toml")).unwrap();
            let table: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
            assert!(table["host"].get(mirror).is_some(), "{name}: {text}");
        }
        let merged = fs::read_to_string(d.join("multi.example/hosts.toml")).unwrap();
        assert!(
            merged.find(mirror).unwrap() < merged.find("https://m.example").unwrap(),
            "pullcache is not first: {merged}"
        );
        assert!(
            !fs::read_to_string(d.join("newline.example/hosts.toml"))
                .unwrap()
                .contains("[x]")
        );
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious");
        assert!(
            !outside.path().join("made").exists(),
            "a backup was written through a link"
        );
        assert!(
            !outside.path().join("hosts.toml").exists(),
            "a linked directory was written"
        );
        assert_eq!(
            fs::read_to_string(d.join("broken.example/hosts.toml")).unwrap(),
            "server = [\n"
        );
    }

    #[test]
    fn tables_start_where_toml_says() {
        assert_eq!(first_table_line("a = 1\n[t]\n"), 1);
        assert_eq!(first_table_line("a = [\n  [1, 2],\n]\n[t]\n"), 3);
        assert_eq!(first_table_line("a = \"\"\"\n[not]\n\"\"\"\n[[t]]\n"), 3);
        assert_eq!(first_table_line("a = \"[\" # [\n[t]\n"), 1);
        assert_eq!(first_table_line("a = { b = [\n1] }\n[t]"), 2);
        assert_eq!(first_table_line("a = 1\n"), 1);
    }
}
