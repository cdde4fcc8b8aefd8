//! `pullcache ca init --k8s-secret` against a test API server that speaks the Kubernetes REST
//! protocol for Secrets: get (404), create, then get again finds it and changes nothing.

use crate::support;

use base64::Engine as _;
use pullcache::intercept::{SecretOutcome, init_secret};
use support::kube_api::KubeApi;

const BIN: &str = env!("CARGO_BIN_EXE_pullcache");

fn pem(secret: &serde_json::Value, key: &str) -> String {
    let data = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {secret}"));
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(data).unwrap()).unwrap()
}

#[tokio::test]
async fn creates_the_secret_once() -> anyhow::Result<()> {
    let api = KubeApi::start().await?;
    let client = kube::Client::try_from(kube::Config::new(api.url().parse()?))?;

    assert_eq!(
        init_secret(client.clone(), "pullcache", "pullcache-ca").await?,
        SecretOutcome::Created
    );
    let requests = api.requests();
    assert_eq!(
        requests,
        vec![
            (
                "GET".to_owned(),
                "/api/v1/namespaces/pullcache/secrets/pullcache-ca".to_owned()
            ),
            ("POST".to_owned(), "/api/v1/namespaces/pullcache/secrets".to_owned()),
        ]
    );
    let secret = api.secret("pullcache", "pullcache-ca").expect("created");
    assert!(pem(&secret, "ca.key").starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(pem(&secret, "ca.crt").starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "pullcache"
    );

    // Again: found, left alone.
    assert_eq!(
        init_secret(client.clone(), "pullcache", "pullcache-ca").await?,
        SecretOutcome::Exists
    );
    assert_eq!(api.requests().len(), 3);
    assert_eq!(
        api.secret("pullcache", "pullcache-ca").unwrap(),
        secret,
        "the secret was replaced"
    );
    Ok(())
}

#[tokio::test]
async fn losing_the_race_to_another_job_is_fine() -> anyhow::Result<()> {
    let api = KubeApi::start().await?;
    api.conflict_on_create();
    let client = kube::Client::try_from(kube::Config::new(api.url().parse()?))?;
    assert_eq!(init_secret(client, "ns", "ca").await?, SecretOutcome::Exists);
    Ok(())
}

#[tokio::test]
async fn the_binary_uses_the_kubeconfig() -> anyhow::Result<()> {
    let api = KubeApi::start().await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = api.write_kubeconfig(dir.path());
    // tokio's process, so the test server keeps answering while the binary runs.
    let run = || {
        tokio::process::Command::new(BIN)
            .args([
                "ca",
                "init",
                "--k8s-secret",
                "pullcache-ca",
                "--namespace",
                "kube-system",
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env("HOME", dir.path())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
    };
    let first = run().await?;
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(String::from_utf8_lossy(&first.stdout).contains("created secret kube-system/pullcache-ca"));
    let second = run().await?;
    assert!(second.status.success());
    assert!(String::from_utf8_lossy(&second.stdout).contains("exists"));
    assert!(api.secret("kube-system", "pullcache-ca").is_some());
    Ok(())
}
