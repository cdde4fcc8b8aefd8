//! Credentials and tokens never reach the logs, even at `RUST_LOG=trace`, while the real
//! binary authenticates with them.

use crate::support;

use std::ffi::OsStr;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use support::fault_upstream::{FaultUpstream, Reply};
use support::images::sha256_digest;

const PASSWORD: &str = "pw-s3cret-7f3a";
const TOKEN: &str = "tok-s3cret-91bc";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_the_logs() -> anyhow::Result<()> {
    let upstream = FaultUpstream::start().await?;
    upstream.require_token(TOKEN);
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#.to_vec();
    let digest = sha256_digest(&manifest);
    upstream.set(
        "/v2/team/app/manifests/v1",
        Reply::ok(
            manifest,
            &[
                ("content-type", "application/vnd.oci.image.manifest.v1+json"),
                ("docker-content-digest", &digest),
            ],
        ),
    );
    let dir = tempfile::tempdir()?;
    let basic = base64_of(&format!("robot:{PASSWORD}"));
    let docker_config = dir.path().join("config.json");
    std::fs::write(
        &docker_config,
        format!(r#"{{"auths":{{"registry.test":{{"auth":"{basic}"}}}}}}"#),
    )?;

    let upstream_arg = format!("registry.test={}", upstream.url());
    let cache_dir = dir.path().join("cache");
    // The private registry's images are shared on the node (mirror mode's `bypass` would
    // answer 404 and never use the credentials).
    let args: [&OsStr; 8] = [
        "--private-images".as_ref(),
        "share".as_ref(),
        "--cache-dir".as_ref(),
        cache_dir.as_os_str(),
        "--docker-config".as_ref(),
        docker_config.as_os_str(),
        "--upstream".as_ref(),
        upstream_arg.as_ref(),
    ];
    let served = support::binary::serve(args, "trace").await?;
    served.wait_ready().await?;
    let support::binary::Served {
        mut child,
        addr,
        mut stdout,
        mut logs,
        ..
    } = served;
    let resp = support::http_client()
        .get(format!("http://{addr}/v2/team/app/manifests/v1?ns=registry.test"))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    // The token was fetched with the configured credentials, and used.
    assert_eq!(upstream.auth_seen("/token"), vec![Some(format!("Basic {basic}"))]);
    assert_eq!(
        upstream
            .auth_seen("/v2/team/app/manifests/v1")
            .last()
            .cloned()
            .flatten(),
        Some(format!("Bearer {TOKEN}"))
    );

    let pid = child.id().expect("running").to_string();
    Command::new("kill").args(["-TERM", &pid]).status().await?;
    let mut stderr = String::new();
    child.stderr.take().expect("piped").read_to_string(&mut stderr).await?;
    while let Some(line) = stdout.next_line().await? {
        logs.push_str(&line);
        logs.push('\n');
    }
    child.wait().await?;
    logs.push_str(&stderr);
    assert!(
        logs.lines().count() > 20,
        "trace logging produced almost nothing:\n{logs}"
    );
    for secret in [PASSWORD, TOKEN, basic.as_str()] {
        assert!(!logs.contains(secret), "{secret} appears in the logs");
    }
    Ok(())
}

fn base64_of(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}
