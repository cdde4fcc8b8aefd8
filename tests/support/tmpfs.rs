//! A small tmpfs mounted on a temp dir, to fill up on purpose; unmounted on drop. Mounting
//! needs root, which CI has: without it the test fails rather than skips.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, ensure};

pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` reads it: `8m`).
    pub fn mount(size: &str) -> Result<Tmpfs> {
        let dir = tempfile::tempdir()?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(dir.path())
            .output()?;
        ensure!(
            out.status.success(),
            "mount tmpfs on {} (needs root): {}",
            dir.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}
