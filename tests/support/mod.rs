//! Shared end-to-end test helpers: a real upstream registry, image builders, a real containerd (driven with `ctr` or through its CRI API, as the kubelet does) and podman, a recording HTTP spy, TLS/basic/token auth for the upstream, and a cluster of nodes in network namespaces.
#![allow(dead_code)]

pub mod bench;
pub mod binary;
pub mod cluster;
pub mod containerd;
pub mod cri;
pub mod fault_upstream;
pub mod hostile_registry;
pub mod htpasswd;
pub mod images;
pub mod kube_api;
pub mod netns;
pub mod podman;
pub mod poll;
pub mod pullcache;
pub mod registry;
pub mod skopeo;
pub mod soci;
pub mod spy;
pub mod tls;
pub mod tmpfs;
pub mod token_service;

// Not every includer polls every way (the benches include this module too).
#[allow(unused_imports)]
pub use poll::{eventually, eventually_blocking, eventually_every};

use std::path::Path;
use std::time::Duration;

/// Last `max_lines` lines of a log file (for error messages); never fails.
pub fn log_tail(path: &Path, max_lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            format!(
                "--- last {} line(s) of {} ---\n{}",
                lines.len() - start,
                path.display(),
                lines[start..].join("\n")
            )
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// A plain-HTTP client that never uses a proxy (proxies from the environment
/// would break loopback-only tests).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("building reqwest client")
}

/// `out` when its command succeeded, else an error with `what`, the status and both streams.
pub fn check_status(what: &str, out: std::process::Output) -> anyhow::Result<std::process::Output> {
    if out.status.success() {
        return Ok(out);
    }
    anyhow::bail!(
        "{what} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Sends `request` exactly as written on a new connection (HTTP clients normalise paths and
/// refuse oversize headers) and reads until the server closes: status, head and body.
pub async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> anyhow::Result<(u16, String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8(response)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no header end: {text}"))?;
    let status = head.split_whitespace().nth(1).unwrap_or_default().parse()?;
    Ok((status, head.to_owned(), body.to_owned()))
}

/// Kills a child (SIGKILL) and reaps it for up to `within`, so nothing it used (a temp dir, a
/// port, a namespace) is taken away under a live process. For `Drop`: never fails.
pub fn kill_and_reap(child: &mut tokio::process::Child, within: Duration) {
    let _ = child.start_kill();
    let _ = eventually_blocking(within, "a killed child to exit", || {
        !matches!(child.try_wait(), Ok(None))
    });
}
