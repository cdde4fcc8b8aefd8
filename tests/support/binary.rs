//! The real `pullcache` binary as a server: `serve` on port 0 (or a given address, in a network
//! namespace) with JSON logs, its addresses read from its "serving" log line, ready once
//! `/readyz` says so.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

use super::netns::{Netns, command_in};

pub const BIN: &str = env!("CARGO_BIN_EXE_pullcache");

pub struct Served {
    pub child: Child,
    /// The registry API, `127.0.0.1:PORT`.
    pub addr: String,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics_addr: String,
    /// The rest of stdout, after the "serving" line.
    pub stdout: Lines<BufReader<ChildStdout>>,
    /// Everything logged up to and including the "serving" line.
    pub logs: String,
    /// The namespace it runs in, where its addresses are.
    pub netns: Option<Netns>,
}

/// Runs `pullcache serve` on port 0 with `args` added, `RUST_LOG=rust_log`, and waits for it
/// to log that it serves.
pub async fn serve<I, S>(args: I, rust_log: &str) -> Result<Served>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    serve_in(None, "127.0.0.1:0", args, rust_log).await
}

/// [`serve`] inside `netns` (if any), the registry API on `listen`, `/metrics` on port 0.
pub async fn serve_in<I, S>(netns: Option<&Netns>, listen: &str, args: I, rust_log: &str) -> Result<Served>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = command_in(netns, BIN)
        .args([
            "serve",
            "--listen",
            listen,
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .args(args)
        .env("RUST_LOG", rust_log)
        // As in-process tests: no dependence on how full this machine's disk is.
        .env("PULLCACHE_CACHE_MIN_FREE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut logs = String::new();
    let (addr, metrics_addr) = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = stdout.next_line().await? {
            logs.push_str(&line);
            logs.push('\n');
            let json: serde_json::Value = serde_json::from_str(&line)?;
            if json["fields"]["message"] == "serving" {
                let field = |name: &str| json["fields"][name].as_str().unwrap_or_default().to_owned();
                return Ok((field("addr"), field("metrics_addr")));
            }
        }
        bail!("pullcache exited without serving:\n{logs}")
    })
    .await??;
    Ok(Served {
        child,
        addr,
        metrics_addr,
        stdout,
        logs,
        netns: netns.cloned(),
    })
}

impl Served {
    /// Polls `/readyz` (from inside its namespace, if it has one) until it answers 200.
    pub async fn wait_ready(&self) -> Result<()> {
        let readyz = format!("http://{}/readyz", self.metrics_addr);
        super::eventually(Duration::from_secs(20), "/readyz to answer 200", || async {
            Ok(self.status(&readyz).await? == Some(200))
        })
        .await
    }

    async fn status(&self, url: &str) -> Result<Option<u16>> {
        Ok(match &self.netns {
            Some(netns) => netns.http_status(url).await,
            None => Some(super::http_client().get(url).send().await?.status().as_u16()),
        })
    }
}
