//! htpasswd files with bcrypt entries, as distribution's `auth.htpasswd` reads them.
//!
//! Verified against distribution 2.8.2 (tests/harness/auth.rs): `$2y$` (what
//! `htpasswd -B` writes), `$2b$` and `$2a$` hashes are all accepted.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// bcrypt cost for test entries: the minimum, so hashing and the registry's
/// check stay fast (each costs ~1 ms at cost 4).
pub const BCRYPT_COST: u32 = 4;

/// One `user:$2y$04$...` line (no newline).
pub fn htpasswd_entry(user: &str, password: &str) -> String {
    htpasswd_entry_with(user, password, bcrypt::Version::TwoY)
}

/// Like [`htpasswd_entry`] with an explicit bcrypt prefix (`$2a$`, `$2b$`, `$2y$`, `$2x$`).
pub fn htpasswd_entry_with(user: &str, password: &str, version: bcrypt::Version) -> String {
    assert!(!user.contains(':'), "htpasswd user names cannot contain ':'");
    let parts = bcrypt::hash_with_result(password, BCRYPT_COST).expect("bcrypt hash");
    format!("{user}:{}", parts.format_for_version(version))
}

/// Writes `dir/htpasswd` with one `$2y$` entry per `(user, password)`; returns its path.
pub fn write_htpasswd(dir: &Path, users: &[(&str, &str)]) -> Result<PathBuf> {
    let lines: Vec<String> = users.iter().map(|(u, p)| htpasswd_entry(u, p)).collect();
    write_htpasswd_lines(dir, &lines)
}

/// Writes `dir/htpasswd` from ready-made lines (see [`htpasswd_entry_with`]).
pub fn write_htpasswd_lines(dir: &Path, lines: &[String]) -> Result<PathBuf> {
    let path = dir.join("htpasswd");
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
