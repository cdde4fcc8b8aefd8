//! containerd's own config, read as the running containerd reads it: found where the
//! distribution keeps it (k3s and RKE2 included), its `imports` drop-ins merged in the
//! release's way, each file in its own version's layout. What it says about `config_path`,
//! the setting without which containerd ignores certs.d, and the fix when it is not ours.
//!
//! The releases differ, each checked against the real binaries (1.6.20, 1.7.24, 2.1.9 with
//! `containerd config dump`):
//! - 1.x reads `plugins."io.containerd.grpc.v1.cri".registry.config_path` (a version 2 file)
//!   or `plugins.cri.registry.config_path` (version 1, no `version` key); a drop-in that
//!   names a plugin replaces that plugin's whole table; version 3 is refused (1.7) or
//!   ignored (1.6).
//! - 2.x reads `plugins."io.containerd.cri.v1.images".registry.config_path` (version 3) and
//!   migrates version 2 files, each drop-in by its own version (the main file's when it has
//!   none); drop-ins merge key by key; a version 1 file's registry settings are dropped.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::WiringError;

/// Where distributions keep containerd's config, in the order they are looked for.
pub const LOCATIONS: [&str; 3] = [
    "/etc/containerd/config.toml",
    "/var/lib/rancher/k3s/agent/etc/containerd/config.toml",
    "/var/lib/rancher/rke2/agent/etc/containerd/config.toml",
];

/// Templates k3s and RKE2 generate their config.toml from, when the operator wrote one.
const TEMPLATES: [&str; 2] = ["config-v3.toml.tmpl", "config.toml.tmpl"];

/// How deep `imports` may nest, how many files they may name in all, and how large each may
/// be.
const MAX_IMPORT_DEPTH: usize = 16;
const MAX_FILES: usize = 256;
const MAX_FILE_SIZE: u64 = 1024 * 1024;

const CRI_V1: &str = "cri";
const CRI_V2: &str = "io.containerd.grpc.v1.cri";
const CRI_V3: &str = "io.containerd.cri.v1.images";

/// A containerd release line, as far as its config is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Release {
    /// 1.6 and 1.7.
    One,
    /// 2.0 and later.
    Two,
}

impl Release {
    /// From `containerd --version`'s output: `containerd github.com/containerd/containerd/v2
    /// 2.1.9 ...` or `containerd github.com/containerd/containerd 1.7.24~ds1 ...`.
    pub fn from_version_output(text: &str) -> Option<Release> {
        let version = text.split_whitespace().nth(2)?.trim_start_matches('v');
        match version.split('.').next()? {
            "1" => Some(Release::One),
            "" => None,
            major if major.bytes().all(|b| b.is_ascii_digit()) => Some(Release::Two),
            _ => None,
        }
    }

    /// What `binary --version` says, if it runs.
    pub fn of_binary(binary: &Path) -> Option<Release> {
        let out = std::process::Command::new(binary).arg("--version").output().ok()?;
        if !out.status.success() {
            return None;
        }
        Release::from_version_output(&String::from_utf8_lossy(&out.stdout))
    }

    fn name(self) -> &'static str {
        match self {
            Release::One => "containerd 1.x",
            Release::Two => "containerd 2.x",
        }
    }
}

/// One file of the config, as parsed.
#[derive(Debug, Clone)]
struct File {
    path: PathBuf,
    table: toml::Table,
}

impl File {
    fn version(&self) -> Option<i64> {
        self.table.get("version").and_then(toml::Value::as_integer)
    }
}

/// containerd's config: the main file and every drop-in its `imports` name, in the order
/// containerd merges them.
#[derive(Debug, Clone)]
pub struct ContainerdConfig {
    files: Vec<File>,
}

impl ContainerdConfig {
    /// Reads `main` and its imports; `None` if `main` does not exist.
    pub fn read(main: &Path) -> Result<Option<ContainerdConfig>, WiringError> {
        let Some(first) = read_file(main)? else {
            return Ok(None);
        };
        // Breadth first, each file once, as containerd does.
        let mut files = vec![first];
        // By the file itself: `a/../b.toml` and `b.toml` are one file.
        let mut seen: BTreeSet<PathBuf> = BTreeSet::from([canonical(main)]);
        let mut next = 0;
        let mut depth = vec![0usize];
        while next < files.len() {
            let imports = imports(&files[next])?;
            let level = depth[next] + 1;
            next += 1;
            for path in imports {
                if !seen.insert(canonical(&path)) {
                    continue;
                }
                if level > MAX_IMPORT_DEPTH || files.len() >= MAX_FILES {
                    return Err(invalid(main, "imports nest too deep or name too many files"));
                }
                // containerd fails on an import that names a missing file.
                let file = read_file(&path)?.ok_or_else(|| invalid(&path, "imported, but does not exist"))?;
                files.push(file);
                depth.push(level);
            }
        }
        Ok(Some(ContainerdConfig { files }))
    }

    /// The main file.
    pub fn main(&self) -> &Path {
        &self.files[0].path
    }

    /// Every file read, main first.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// The main file's `version` (1 when it has none, as containerd takes it).
    pub fn version(&self) -> i64 {
        self.files[0].version().unwrap_or(1)
    }

    /// The release this config is for, when its layout says: only 2.x reads version 3.
    pub fn release_by_layout(&self) -> Option<Release> {
        (self.version() >= 3).then_some(Release::Two)
    }

    /// The `config_path` `release` reads from this config, and the file that set it last.
    pub fn config_path(&self, release: Release) -> ConfigPath {
        match release {
            Release::One => self.config_path_one(),
            Release::Two => self.config_path_two(),
        }
    }

    /// 1.x: plugin tables replace each other whole; one version for all, the last given.
    fn config_path_one(&self) -> ConfigPath {
        let version = self.files.iter().rev().find_map(File::version).unwrap_or(1);
        let plugin = match version {
            1 => CRI_V1,
            2 => CRI_V2,
            _ => return ConfigPath::Unread(format!("containerd 1.x does not read a version {version} config")),
        };
        let last = self.files.iter().rev().find_map(|f| {
            let table = f.table.get("plugins")?.get(plugin)?;
            Some((f, table))
        });
        match last {
            Some((file, table)) => match registry_config_path(table) {
                Some(value) => ConfigPath::Set {
                    dirs: split_dirs(&value),
                    file: file.path.clone(),
                },
                None => ConfigPath::Unset {
                    plugin_table: Some(file.path.clone()),
                },
            },
            None => ConfigPath::Unset { plugin_table: None },
        }
    }

    /// 2.x: each file migrated by its own version (the main file's when it has none), then
    /// merged key by key, the last file winning.
    fn config_path_two(&self) -> ConfigPath {
        let main_version = self.version();
        let mut found = None;
        let mut dropped = None;
        for file in &self.files {
            let version = file.version().unwrap_or(main_version);
            let plugin = match version {
                2 => CRI_V2,
                v if v >= 3 => CRI_V3,
                _ => {
                    if file.table.get("plugins").and_then(|p| p.get(CRI_V1)).is_some() {
                        dropped = Some(file.path.clone());
                    }
                    continue;
                }
            };
            if let Some(value) = file
                .table
                .get("plugins")
                .and_then(|p| p.get(plugin))
                .and_then(registry_config_path)
            {
                found = Some((value, file.path.clone()));
            }
        }
        match (found, dropped) {
            (Some((value, file)), _) => ConfigPath::Set {
                dirs: split_dirs(&value),
                file,
            },
            (None, Some(file)) => ConfigPath::Unread(format!(
                "containerd 2.x drops the registry settings of a version 1 config ({}); migrate it with `containerd config migrate`",
                file.display()
            )),
            (None, None) => ConfigPath::Unset { plugin_table: None },
        }
    }

    /// The file an operator edits: k3s and RKE2 generate config.toml at start, from a
    /// template beside it when there is one.
    pub fn editable(&self) -> PathBuf {
        let main = self.main();
        if let Some(dir) = main.parent().filter(|_| rancher(main).is_some()) {
            for name in TEMPLATES {
                let template = dir.join(name);
                if template.exists() {
                    return template;
                }
            }
        }
        main.to_owned()
    }
}

/// Which distribution generated `config`, if it is k3s or RKE2 (`/var/lib/rancher/<it>/...`).
pub fn rancher(config: &Path) -> Option<&'static str> {
    let text = config.to_string_lossy();
    ["k3s", "rke2"]
        .into_iter()
        .find(|name| text.starts_with(&format!("/var/lib/rancher/{name}/agent/etc/containerd/")))
}

/// The first of [`LOCATIONS`] that exists under `root` (`/` on a node).
pub fn locate(root: &Path) -> Option<PathBuf> {
    LOCATIONS
        .iter()
        .map(|l| root.join(l.trim_start_matches('/')))
        .find(|p| p.exists())
}

/// What containerd's config says about `config_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigPath {
    /// Set, to these directories (`:`-separated in containerd), last by `file`.
    Set { dirs: Vec<PathBuf>, file: PathBuf },
    /// Not set: certs.d is ignored. `plugin_table` is the file whose CRI plugin table
    /// containerd 1.x uses, when one has it (a later drop-in replaces an earlier one's).
    Unset { plugin_table: Option<PathBuf> },
    /// The config cannot be read by this release as it stands; why.
    Unread(String),
    /// There is no containerd config file: containerd runs on its defaults, which leave
    /// `config_path` unset.
    NoConfig,
}

/// Whether `dirs` includes `certs_dir`, comparing the directories themselves (a relative
/// path, a symlink and the absolute path are one directory).
pub fn includes(dirs: &[PathBuf], certs_dir: &Path) -> bool {
    let wanted = canonical(certs_dir);
    dirs.iter().any(|d| canonical(d) == wanted)
}

fn canonical(path: &Path) -> PathBuf {
    if let Ok(real) = fs::canonicalize(path) {
        return real;
    }
    match std::env::current_dir() {
        Ok(cwd) if path.is_relative() => cwd.join(path),
        _ => path.to_owned(),
    }
}

/// What to tell the operator when containerd will not read hosts.toml from `certs_dir`:
/// `None` when it will. `release` is the running containerd's, when known; unknown, both are
/// checked and the advice covers each that would not read it.
pub fn advice(
    config: Option<&ContainerdConfig>,
    looked_at: &Path,
    release: Option<Release>,
    certs_dir: &Path,
) -> Option<String> {
    let Some(config) = config else {
        return Some(format!(
            "no containerd config at {}: containerd then runs on its defaults, with config_path unset, and ignores {}. To fix, create it with:\n{}then restart containerd",
            looked_at.display(),
            certs_dir.display(),
            match release {
                Some(Release::One) => section(2, certs_dir, true),
                Some(Release::Two) => section(3, certs_dir, true),
                None => format!(
                    "{}(containerd 1.x), or\n{}(containerd 2.x)\n",
                    section(2, certs_dir, true),
                    section(3, certs_dir, true)
                ),
            }
        ));
    };
    let release = release.or_else(|| config.release_by_layout());
    let releases = match release {
        Some(r) => vec![r],
        None => vec![Release::One, Release::Two],
    };
    let mut problems = Vec::new();
    for release in &releases {
        let found = config.config_path(*release);
        let problem = match &found {
            ConfigPath::Set { dirs, .. } if includes(dirs, certs_dir) => continue,
            ConfigPath::Set { dirs, file } => format!(
                "{} reads hosts.toml from {} (set in {}), not {}",
                release.name(),
                join_dirs(dirs),
                file.display(),
                certs_dir.display()
            ),
            ConfigPath::Unset { .. } => format!(
                "{}: config_path is unset, so it ignores {}",
                release.name(),
                certs_dir.display()
            ),
            ConfigPath::Unread(why) => why.clone(),
            ConfigPath::NoConfig => unreachable!("a read config always has a file"),
        };
        let edit = match &found {
            // 1.x: a later drop-in's CRI table replaces the main file's.
            ConfigPath::Unset {
                plugin_table: Some(file),
            } => file.clone(),
            ConfigPath::Set { file, .. } if file != config.main() => file.clone(),
            _ => config.editable(),
        };
        let version = match (release, config.version()) {
            (Release::Two, v) if v < 2 => 3,
            (_, v) => v,
        };
        problems.push(format!(
            "{problem}; containerd will not use pullcache. To fix, set in {}:\n{}then restart containerd",
            edit.display(),
            section(version, certs_dir, false)
        ));
    }
    if problems.is_empty() {
        return None;
    }
    let mut text = problems.join("\n");
    if let Some(name) = rancher(config.main()) {
        text.push_str(&format!(
            "\nnote: {name} generates {} at start (from a config.toml.tmpl beside it, if any) and rewrites its certs.d from /etc/rancher/{name}/registries.yaml; name pullcache as a mirror there",
            config.main().display()
        ));
    }
    Some(text)
}

/// The TOML an operator adds so that containerd reads `certs_dir`, for a config `version`.
fn section(version: i64, certs_dir: &Path, with_version: bool) -> String {
    let (header, plugin) = match version {
        1 => ("", CRI_V1.to_owned()),
        2 => ("version = 2\n", format!("\"{CRI_V2}\"")),
        _ => ("version = 3\n", format!("\"{CRI_V3}\"")),
    };
    let header = if with_version { header } else { "" };
    let text = format!(
        "{header}[plugins.{plugin}.registry]\n  config_path = \"{}\"\n",
        certs_dir.display()
    );
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn join_dirs(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}

fn split_dirs(value: &str) -> Vec<PathBuf> {
    value.split(':').filter(|d| !d.is_empty()).map(PathBuf::from).collect()
}

fn registry_config_path(plugin: &toml::Value) -> Option<String> {
    let value = plugin.get("registry")?.get("config_path")?.as_str()?;
    (!value.is_empty()).then(|| value.to_owned())
}

fn invalid(path: &Path, why: &str) -> WiringError {
    WiringError::at(path, io::Error::new(io::ErrorKind::InvalidData, why.to_owned()))
}

fn read_file(path: &Path) -> Result<Option<File>, WiringError> {
    // A regular file of a bounded size: not a FIFO that never ends, nor /dev/zero.
    match fs::metadata(path) {
        Ok(meta) if !meta.is_file() => return Err(invalid(path, "is not a regular file")),
        Ok(meta) if meta.len() > MAX_FILE_SIZE => {
            return Err(invalid(path, &format!("is larger than {MAX_FILE_SIZE} bytes")));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(WiringError::at(path, e)),
    }
    let text = fs::read_to_string(path).map_err(|e| WiringError::at(path, e))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e: toml::de::Error| invalid(path, e.message()))?;
    Ok(Some(File {
        path: path.to_owned(),
        table,
    }))
}

/// The files `file`'s `imports` name: relative to its directory, a `*` or `?` in the last
/// component matched against that directory's entries, in lexical order (Go's
/// `filepath.Glob`).
fn imports(file: &File) -> Result<Vec<PathBuf>, WiringError> {
    let Some(list) = file.table.get("imports") else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| invalid(&file.path, "imports is not a list"))?;
    let base = file.path.parent().unwrap_or(Path::new("/"));
    let mut out = Vec::new();
    for entry in list {
        let entry = entry
            .as_str()
            .ok_or_else(|| invalid(&file.path, "an import is not a string"))?;
        let path = base.join(entry);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = path.parent().unwrap_or(Path::new("/"));
        if !name.contains(['*', '?']) {
            out.push(path);
            continue;
        }
        if dir.to_string_lossy().contains(['*', '?']) {
            return Err(invalid(
                &file.path,
                "an import's directory has a pattern; only its file name may",
            ));
        }
        let mut matched: Vec<PathBuf> = match fs::read_dir(dir) {
            Ok(entries) => entries
                .flatten()
                .filter(|e| glob_match(&name, &e.file_name().to_string_lossy()))
                .map(|e| e.path())
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(WiringError::at(dir, e)),
        };
        matched.sort();
        out.extend(matched);
    }
    Ok(out)
}

/// `*` and `?` as in a shell glob.
fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Classic two-pointer match with one backtrack point for the last `*`.
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
        path
    }

    fn dirs(found: ConfigPath) -> Vec<PathBuf> {
        match found {
            ConfigPath::Set { dirs, .. } => dirs,
            other => panic!("not set: {other:?}"),
        }
    }

    #[test]
    fn releases_are_read_from_version_output() {
        let two = "containerd github.com/containerd/containerd/v2 2.1.9+unknown \n";
        let one = "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1\n";
        assert_eq!(Release::from_version_output(two), Some(Release::Two));
        assert_eq!(Release::from_version_output(one), Some(Release::One));
        assert_eq!(Release::from_version_output("containerd"), None);
        assert_eq!(Release::from_version_output("a b c.d"), None);
    }

    #[test]
    fn each_release_reads_its_own_layout() {
        let dir = tempfile::tempdir().unwrap();
        let v2 = write(
            dir.path(),
            "v2.toml",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/a:/b\"\n",
        );
        let config = ContainerdConfig::read(&v2).unwrap().unwrap();
        for release in [Release::One, Release::Two] {
            assert_eq!(dirs(config.config_path(release)), [Path::new("/a"), Path::new("/b")]);
        }
        let v3 = write(
            dir.path(),
            "v3.toml",
            "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/c\"\n",
        );
        let config = ContainerdConfig::read(&v3).unwrap().unwrap();
        assert_eq!(config.release_by_layout(), Some(Release::Two));
        assert_eq!(dirs(config.config_path(Release::Two)), [Path::new("/c")]);
        assert!(matches!(config.config_path(Release::One), ConfigPath::Unread(_)));
        let v1 = write(
            dir.path(),
            "v1.toml",
            "[plugins.cri.registry]\n  config_path = \"/d\"\n",
        );
        let config = ContainerdConfig::read(&v1).unwrap().unwrap();
        assert_eq!(dirs(config.config_path(Release::One)), [Path::new("/d")]);
        assert!(matches!(config.config_path(Release::Two), ConfigPath::Unread(_)));
        // The 2.x key in a version 2 file is not read by either.
        let wrong = write(
            dir.path(),
            "wrong.toml",
            "version = 2\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/e\"\n",
        );
        let config = ContainerdConfig::read(&wrong).unwrap().unwrap();
        assert!(matches!(config.config_path(Release::One), ConfigPath::Unset { .. }));
        assert!(matches!(config.config_path(Release::Two), ConfigPath::Unset { .. }));
    }

    #[test]
    fn drop_ins_merge_as_each_release_merges_them() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "config.toml",
            "version = 2\nimports = [\"conf.d/*.toml\"]\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/main\"\n",
        );
        write(
            dir.path(),
            "conf.d/10-sandbox.toml",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"x\"\n",
        );
        write(dir.path(), "conf.d/notes.txt", "not toml [");
        let config = ContainerdConfig::read(&main).unwrap().unwrap();
        assert_eq!(config.files().count(), 2, "the .txt is not imported");
        // 1.x: the drop-in's CRI table replaces the main file's, config_path with it.
        assert_eq!(
            config.config_path(Release::One),
            ConfigPath::Unset {
                plugin_table: Some(dir.path().join("conf.d/10-sandbox.toml"))
            }
        );
        // 2.x: merged key by key.
        assert_eq!(dirs(config.config_path(Release::Two)), [Path::new("/main")]);

        // Set only in a drop-in, with no version of its own: read in the main file's.
        write(dir.path(), "conf.d/10-sandbox.toml", "");
        write(
            dir.path(),
            "conf.d/20-registry.toml",
            "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/drop-in\"\n",
        );
        let config = ContainerdConfig::read(&main).unwrap().unwrap();
        for release in [Release::One, Release::Two] {
            match config.config_path(release) {
                ConfigPath::Set { dirs, file } => {
                    assert_eq!(dirs, [Path::new("/drop-in")]);
                    assert_eq!(file, dir.path().join("conf.d/20-registry.toml"));
                }
                other => panic!("{release:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn imports_that_loop_or_go_missing_are_handled() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(dir.path(), "a.toml", "version = 2\nimports = [\"b.toml\"]\n");
        write(
            dir.path(),
            "b.toml",
            "version = 2\nimports = [\"a.toml\", \"b.toml\"]\n",
        );
        assert_eq!(ContainerdConfig::read(&main).unwrap().unwrap().files().count(), 2);
        write(dir.path(), "b.toml", "version = 2\nimports = [\"gone.toml\"]\n");
        let err = ContainerdConfig::read(&main).unwrap_err().to_string();
        assert!(err.contains("gone.toml"), "{err}");
        write(dir.path(), "b.toml", "imports = \"x\"\n");
        assert!(ContainerdConfig::read(&main).is_err());
        // Not a regular file: an endless read or a FIFO's wait, refused at once.
        write(dir.path(), "b.toml", "imports = [\"/dev/zero\"]\n");
        let err = ContainerdConfig::read(&main).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        // One file by two spellings is read once.
        write(dir.path(), "b.toml", "imports = [\"./b.toml\", \"sub/../a.toml\"]\n");
        fs::create_dir_all(dir.path().join("sub")).unwrap();
        write(dir.path(), "a.toml", "version = 2\nimports = [\"sub/../b.toml\"]\n");
        assert_eq!(ContainerdConfig::read(&main).unwrap().unwrap().files().count(), 2);
        assert!(ContainerdConfig::read(&dir.path().join("none.toml")).unwrap().is_none());
    }

    #[test]
    fn advice_names_the_section_the_release_reads() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs.d");
        let v3 = write(dir.path(), "config.toml", "version = 3\n");
        let config = ContainerdConfig::read(&v3).unwrap().unwrap();
        let text = advice(Some(&config), &v3, None, &certs).unwrap();
        assert!(
            text.contains("[plugins.\"io.containerd.cri.v1.images\".registry]"),
            "{text}"
        );
        assert!(!text.contains("grpc.v1.cri"), "{text}");

        let v2 = write(dir.path(), "config.toml", "version = 2\n");
        let config = ContainerdConfig::read(&v2).unwrap().unwrap();
        let text = advice(Some(&config), &v2, Some(Release::Two), &certs).unwrap();
        assert!(
            text.contains("[plugins.\"io.containerd.grpc.v1.cri\".registry]"),
            "{text}"
        );

        let text = advice(None, &v2, None, &certs).unwrap();
        assert!(text.contains("version = 2") && text.contains("version = 3"), "{text}");

        fs::create_dir(&certs).unwrap();
        let relative = write(
            dir.path(),
            "config.toml",
            &format!(
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n",
                certs.display()
            ),
        );
        let config = ContainerdConfig::read(&relative).unwrap().unwrap();
        assert_eq!(advice(Some(&config), &relative, None, &certs), None);
        // The same directory by another spelling.
        let other = dir.path().join(".").join("certs.d");
        assert_eq!(advice(Some(&config), &relative, None, &other), None);
    }

    #[test]
    fn k3s_configs_point_at_the_template() {
        let config = ContainerdConfig {
            files: vec![File {
                path: PathBuf::from("/var/lib/rancher/k3s/agent/etc/containerd/config.toml"),
                table: toml::Table::new(),
            }],
        };
        assert_eq!(rancher(config.main()), Some("k3s"));
        let text = advice(Some(&config), config.main(), None, Path::new("/c")).unwrap();
        assert!(text.contains("registries.yaml"), "{text}");
        assert_eq!(rancher(Path::new("/etc/containerd/config.toml")), None);
    }

    #[test]
    fn globs_match_as_go_does() {
        assert!(glob_match("*.toml", "a.toml"));
        assert!(glob_match("*.toml", ".toml"));
        assert!(!glob_match("*.toml", "a.toml.bak"));
        assert!(glob_match("?0-*.toml", "10-x.toml"));
        assert!(glob_match("*", "anything"));
        assert!(!glob_match("a*b", "ac"));
    }
}
