//! Credentials and tokens never reach the logs, even at `RUST_LOG=trace`, while the real
//! binary authenticates with them.

mod support;

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

use support::fault_upstream::{FaultUpstream, Reply};
use support::images::sha256_digest;

const BIN: &str = env!("CARGO_BIN_EXE_pullcache");
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

    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--docker-config")
        .arg(&docker_config)
        .args(["--upstream", &format!("registry.test={}", upstream.url())])
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
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
        anyhow::bail!("pullcache exited without serving:\n{logs}")
    })
    .await??;

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let readyz = format!("http://{metrics_addr}/readyz");
    while support::http_client().get(&readyz).send().await?.status() != 200 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
