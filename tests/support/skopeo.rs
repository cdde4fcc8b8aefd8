//! A second real client: `skopeo` (1.9, containers/image) run as a subprocess, directly or through an HTTPS proxy.
//!
//! skopeo copies with `--insecure-policy` so no `/etc/containers/policy.json`
//! is needed (signature policy only; TLS verification is unaffected).
//!
//! Verified with skopeo 1.9.3 through a TLS-terminating test proxy
//! ([`copy_via_proxy`]): `CONNECT registry.test.invalid:443 HTTP/1.1` (`Host`,
//! `User-Agent: Go-http-client/1.1`), SNI = the registry host, no ALPN, no DNS
//! lookup of the registry host. Every request carries `Connection: close`, so
//! each one gets its own CONNECT + TLS handshake. First `GET /v2/`, then `GET
//! /v2/<repo>/manifests/<tag>` (six separate `Accept` header lines), then `GET
//! /v2/<repo>/blobs/<digest>`; all with `Docker-Distribution-Api-Version:
//! registry/2.0`. If `GET /v2/` fails (non-200/401 or transport error) it also
//! tries `GET /v1/_ping`. `SSL_CERT_FILE` is honoured (no `--src-cert-dir`
//! needed; `/etc/containers/certs.d/<host>` and `/etc/docker/certs.d/<host>`
//! are looked up too). Errors: `pinging container registry registry.test.invalid:
//! Get "https://registry.test.invalid/v2/": Forbidden` (CONNECT 403, reason
//! phrase verbatim), `...: x509: certificate signed by unknown authority`.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::process::Command;

use super::check_status;
use super::containerd::{captured, output_within, set_proxy_env, without_proxy};

pub const SKOPEO_BIN: &str = "/usr/bin/skopeo";
pub const COPY_TIMEOUT: Duration = Duration::from_secs(120);

/// `skopeo copy --insecure-policy EXTRA_ARGS... SRC DST` with proxies removed
/// from the environment, e.g. `copy("docker://127.0.0.1:5000/a/b:v1",
/// "dir:/tmp/x", &["--src-tls-verify=false"])`. Err with stdout/stderr on a
/// non-zero exit or after 120 s.
pub async fn copy(src: &str, dst: &str, extra_args: &[&str]) -> Result<Output> {
    let mut cmd = copy_command(src, dst, extra_args);
    without_proxy(&mut cmd);
    let out = run(cmd, &format!("skopeo copy {src} {dst}")).await?;
    check_status(&format!("skopeo copy {src} {dst}"), out)
}

/// `skopeo copy docker://IMAGE dir:DEST_DIR` through an HTTPS proxy: env
/// `HTTPS_PROXY`/`https_proxy` = `proxy` (`http://127.0.0.1:PORT`),
/// `SSL_CERT_FILE` = `ca_bundle`, and `NO_PROXY`/`no_proxy`/`HTTP_PROXY`/
/// `http_proxy`/`ALL_PROXY`/`all_proxy`/`SSL_CERT_DIR` removed. TLS
/// verification stays on (`--src-tls-verify=true`, skopeo's default, made
/// explicit); the bundle is trusted through Go's system pool. Err with
/// stdout/stderr on failure or after 120 s.
pub async fn copy_via_proxy(image: &str, dest_dir: &Path, proxy: &str, ca_bundle: &Path) -> Result<Output> {
    let out = copy_via_proxy_raw(image, dest_dir, proxy, ca_bundle).await?;
    check_status(&format!("skopeo copy docker://{image} (via proxy {proxy})"), out)
}

/// [`copy_via_proxy`] returning the output whatever the exit status (for
/// asserting on failures); Err only if skopeo cannot run or times out.
pub async fn copy_via_proxy_raw(image: &str, dest_dir: &Path, proxy: &str, ca_bundle: &Path) -> Result<Output> {
    let dest = dest_dir.to_str().context("dest dir not UTF-8")?;
    let src = format!("docker://{image}");
    let dst = format!("dir:{dest}");
    let mut cmd = copy_command(&src, &dst, &["--src-tls-verify=true"]);
    set_proxy_env(&mut cmd, proxy, ca_bundle);
    run(cmd, &format!("skopeo copy {src} {dst} (via proxy {proxy})")).await
}

fn copy_command(src: &str, dst: &str, extra_args: &[&str]) -> Command {
    let mut cmd = Command::new(SKOPEO_BIN);
    cmd.arg("copy")
        .arg("--insecure-policy")
        .args(extra_args)
        .arg(src)
        .arg(dst);
    captured(&mut cmd);
    cmd
}

async fn run(cmd: Command, what: &str) -> Result<Output> {
    output_within(cmd, &format!("{what} (is skopeo installed?)"), COPY_TIMEOUT).await
}

/// `skopeo list-tags docker://REPOSITORY` through `proxy`, as [`copy_via_proxy`]: the tags it
/// printed (its JSON's `Tags`). Err with stdout/stderr on failure or after 120 s.
pub async fn list_tags_via_proxy(repository: &str, proxy: &str, ca_bundle: &Path) -> Result<Vec<String>> {
    let mut cmd = Command::new(SKOPEO_BIN);
    cmd.args(["list-tags", "--tls-verify=true"])
        .arg(format!("docker://{repository}"));
    captured(&mut cmd);
    set_proxy_env(&mut cmd, proxy, ca_bundle);
    let what = format!("skopeo list-tags docker://{repository} (via proxy {proxy})");
    let out = check_status(&what, run(cmd, &what).await?)?;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| what.clone())?;
    Ok(listed["Tags"]
        .as_array()
        .map(|tags| tags.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect())
        .unwrap_or_default())
}

/// `skopeo copy dir:SRC_DIR docker://IMAGE` through `proxy`, as [`copy_via_proxy`] but the other
/// way: a push. Err with stdout/stderr on failure or after 120 s.
pub async fn push_via_proxy(src_dir: &Path, image: &str, proxy: &str, ca_bundle: &Path) -> Result<Output> {
    let src = format!("dir:{}", src_dir.to_str().context("src dir not UTF-8")?);
    let dst = format!("docker://{image}");
    let mut cmd = copy_command(&src, &dst, &["--dest-tls-verify=true"]);
    set_proxy_env(&mut cmd, proxy, ca_bundle);
    let what = format!("skopeo copy {src} {dst} (via proxy {proxy})");
    check_status(&what, run(cmd, &what).await?)
}
