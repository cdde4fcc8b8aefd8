//! A third real client: `podman` (4.3, containers/image 5.23, the library CRI-O pulls with),
//! rootful, with its own storage and configuration in a tempdir.
//!
//! Every file podman reads is ours: `registries.conf` (`CONTAINERS_REGISTRIES_CONF`),
//! `containers.conf` (`CONTAINERS_CONF`), `storage.conf` (`CONTAINERS_STORAGE_CONF`, plus
//! `--root`/`--runroot`/`--storage-driver vfs`, which needs no mounts), the signature policy
//! (`--signature-policy`), the auth file (`REGISTRY_AUTH_FILE`) and `HOME` (for
//! `~/.config/containers`). The one exception is the system drop-in directory
//! `/etc/containers/registries.conf.d`, which containers/image reads whatever the main file
//! (Debian ships only short-name aliases there). `--cgroup-manager cgroupfs` and
//! `--events-backend file` keep it off systemd and journald. A pull runs no container, so no
//! OCI runtime, conmon or network is involved.
//!
//! Verified with podman 4.3.1 (Debian 12): with a `[[registry.mirror]]` of
//! `location = "127.0.0.1:PORT/docker.io"` and `insecure = true`, a pull of
//! `docker.io/library/x:1` goes to `http://127.0.0.1:PORT/v2/docker.io/library/x/...` (no
//! `?ns=`); the mirror is tried first, and if it cannot be contacted or has no manifest, the
//! primary `location` is tried ("Mirrors also failed" in the error when both fail).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;
use tokio::process::Command;

use super::check_status;
use super::containerd::{captured, output_within, without_proxy};

pub const PODMAN_BIN: &str = "/usr/bin/podman";
pub const PULL_TIMEOUT: Duration = Duration::from_secs(120);

const POLICY: &str = r#"{"default": [{"type": "insecureAcceptAnything"}]}"#;
const CONTAINERS_CONF: &str = "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n";

/// One `[[registry]]` of a registries.conf: images named `prefix/...` come from `location`
/// (plain HTTP allowed), after trying `mirrors` in order (plain HTTP allowed too).
pub struct RegistryEntry<'a> {
    pub prefix: &'a str,
    pub location: &'a str,
    pub mirrors: &'a [&'a str],
}

/// A registries.conf (v2) with no unqualified-search registries and these entries.
pub fn registries_conf(entries: &[RegistryEntry]) -> String {
    let mut conf = String::from("unqualified-search-registries = []\n");
    for entry in entries {
        conf.push_str(&format!(
            "\n[[registry]]\nprefix = \"{}\"\nlocation = \"{}\"\ninsecure = true\n",
            entry.prefix, entry.location
        ));
        for mirror in entry.mirrors {
            conf.push_str(&format!(
                "\n[[registry.mirror]]\nlocation = \"{mirror}\"\ninsecure = true\n"
            ));
        }
    }
    conf
}

/// A podman with fresh, empty image storage; configuration and storage in a tempdir.
pub struct Podman {
    dir: TempDir,
}

impl Podman {
    /// A podman that reads `registries_conf` (see [`registries_conf`]).
    pub fn new(registries_conf: &str) -> Result<Podman> {
        let dir = tempfile::Builder::new()
            .prefix("pc-podman")
            .tempdir_in("/tmp")
            .context("creating podman tempdir")?;
        let d = dir.path();
        let storage_conf = format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            d.join("root").display(),
            d.join("run").display()
        );
        for (name, body) in [
            ("registries.conf", registries_conf),
            ("containers.conf", CONTAINERS_CONF),
            ("storage.conf", &storage_conf),
            ("policy.json", POLICY),
            ("auth.json", "{\"auths\": {}}"),
        ] {
            std::fs::write(d.join(name), body).with_context(|| format!("writing {name}"))?;
        }
        std::fs::create_dir(d.join("home")).context("creating podman HOME")?;
        Ok(Podman { dir })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces the registries.conf that later commands read.
    pub fn set_registries_conf(&self, registries_conf: &str) -> Result<()> {
        std::fs::write(self.file("registries.conf"), registries_conf).context("writing registries.conf")
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `podman GLOBAL_FLAGS ARGS...` in this podman's environment, output captured.
    fn command(&self, args: &[&str]) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new(PODMAN_BIN);
        cmd.arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ])
            .args(args)
            .env("CONTAINERS_REGISTRIES_CONF", self.file("registries.conf"))
            .env("CONTAINERS_CONF", self.file("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.file("storage.conf"))
            .env("REGISTRY_AUTH_FILE", self.file("auth.json"))
            .env("HOME", d.join("home"));
        without_proxy(captured(&mut cmd));
        cmd
    }

    /// `podman ARGS...`; Err with both streams on a non-zero exit or after 120 s.
    pub async fn run(&self, args: &[&str]) -> Result<Output> {
        let what = format!("podman {}", args.join(" "));
        let out = output_within(
            self.command(args),
            &format!("{what} (is podman installed?)"),
            PULL_TIMEOUT,
        )
        .await?;
        check_status(&what, out)
    }

    /// `podman pull` under this podman's signature policy.
    pub async fn pull(&self, image_ref: &str) -> Result<Output> {
        let policy = self.file("policy.json");
        let policy = policy.to_str().context("tempdir path not UTF-8")?;
        self.run(&["pull", "--signature-policy", policy, image_ref]).await
    }

    /// The manifest digest podman recorded for a pulled image (`.Digest`).
    pub async fn digest(&self, image_ref: &str) -> Result<String> {
        let out = self
            .run(&["image", "inspect", "--format", "{{.Digest}}", image_ref])
            .await?;
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// Every `name@digest` podman recorded for a pulled image (`.RepoDigests`).
    pub async fn repo_digests(&self, image_ref: &str) -> Result<Vec<String>> {
        let out = self
            .run(&[
                "image",
                "inspect",
                "--format",
                "{{range .RepoDigests}}{{println .}}{{end}}",
                image_ref,
            ])
            .await?;
        Ok(String::from_utf8(out.stdout)?.lines().map(str::to_owned).collect())
    }
}
