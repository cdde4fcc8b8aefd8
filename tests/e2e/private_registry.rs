//! containerd pulls through pullcache from registries that want what real ones want: the real
//! distribution registry serving TLS with a private CA and htpasswd basic auth, and the real
//! registry with token auth (Docker Hub's flow), credentials coming from a docker
//! `config.json`. Wrong or missing credentials and an untrusted CA give clear errors. These
//! registries serve nothing anonymously, so pullcache runs with `private_images = share`:
//! the default, `bypass`, would send containerd to the registry itself
//! (`private_images.rs`).

use crate::support;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use pullcache::oci::Registry as RegistryName;
use pullcache::upstream::{DockerConfig, load_certificates};
use support::containerd::{Containerd, write_hosts_toml};
use support::htpasswd::write_htpasswd;
use support::images::{PushedImage, push_oci_image};
use support::pullcache::Pullcache;
use support::registry::{Registry, RegistryOptions};
use support::tls::TestCa;
use support::token_service::TokenService;

const REGISTRY: &str = "registry.test";
const DEAD_SERVER: &str = "http://127.0.0.1:1";

/// Pushes the test image through a plain registry on `storage` (the test client speaks no TLS
/// and no auth), for an authenticating registry to serve afterwards.
async fn seed(storage: &Path) -> anyhow::Result<PushedImage> {
    let mut plain = Registry::start_with(RegistryOptions::default(), Some(storage.to_owned())).await?;
    let image = push_oci_image(&plain.url(), "team/app", "v1", &[512 * 1024, 64 * 1024]).await?;
    plain.stop().await;
    Ok(image)
}

fn docker_config(dir: &Path, entry: &str) -> anyhow::Result<DockerConfig> {
    let path = dir.join("config.json");
    std::fs::write(&path, format!(r#"{{"auths":{{"{REGISTRY}":{entry}}}}}"#))?;
    DockerConfig::load(&path).map_err(anyhow::Error::msg)
}

fn basic_entry(user: &str, password: &str) -> String {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!(r#"{{"auth":"{auth}"}}"#)
}

async fn start_pullcache(
    cache: &Path,
    upstream: &str,
    ca: Option<&Path>,
    credentials: Option<DockerConfig>,
) -> anyhow::Result<Pullcache> {
    let mut config = support::pullcache::config(cache.to_owned());
    config.authorize.private_images = pullcache::authorize::PrivateImages::Share;
    config.registry(RegistryName::parse(REGISTRY)?).url = Some(upstream.parse()?);
    if let Some(ca) = ca {
        config.upstream.roots = load_certificates(ca).map_err(anyhow::Error::msg)?;
    }
    if let Some(credentials) = credentials {
        config.upstream.docker_config = credentials;
    }
    Pullcache::start_with(config).await
}

/// A registry with token auth from `tokens`, serving the seeded test image.
async fn token_registry(dir: &Path, tokens: &TokenService) -> anyhow::Result<(PushedImage, Registry)> {
    let storage = dir.join("storage");
    let image = seed(&storage).await?;
    let options = RegistryOptions {
        token: Some(tokens.token_auth(dir)),
        ..RegistryOptions::default()
    };
    Ok((image, Registry::start_with(options, Some(storage)).await?))
}

/// An error message a client can act on: which registry, and what went wrong.
fn assert_names_registry(message: &str, what: &str) {
    assert!(message.contains(REGISTRY) && message.contains(what), "{message}");
}

async fn pull_through(pullcache: &Pullcache, image: &PushedImage) -> anyhow::Result<()> {
    let hosts = tempfile::tempdir()?;
    write_hosts_toml(hosts.path(), REGISTRY, DEAD_SERVER, &pullcache.url());
    let ctr = Containerd::start().await?;
    let reference = image.reference(REGISTRY);
    ctr.pull(&reference, hosts.path()).await?;
    assert!(ctr.is_unpacked(&reference).await?, "{reference} did not unpack");
    Ok(())
}

/// The OCI error a client gets for the test image's manifest.
async fn manifest_error(pullcache: &Pullcache) -> anyhow::Result<(u16, String, String)> {
    let resp = support::http_client()
        .get(format!("{}/v2/team/app/manifests/v1?ns={REGISTRY}", pullcache.url()))
        .send()
        .await?;
    let status = resp.status().as_u16();
    let json: serde_json::Value = resp.json().await?;
    let error = &json["errors"][0];
    Ok((
        status,
        error["code"].as_str().unwrap_or_default().to_owned(),
        error["message"].as_str().unwrap_or_default().to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_registry_with_basic_auth_from_a_docker_config() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let storage = dir.path().join("storage");
    let image = seed(&storage).await?;
    let ca = TestCa::new();
    let ca_file = ca.write_ca(dir.path());
    let (cert, key) = ca.issue_server(dir.path(), &["127.0.0.1", "localhost"]);
    let registry = Registry::start_with(
        RegistryOptions {
            tls: Some((cert, key)),
            htpasswd: Some(write_htpasswd(dir.path(), &[("robot", "hunter2")])?),
            ..RegistryOptions::default()
        },
        Some(storage),
    )
    .await?;
    assert!(registry.url().starts_with("https://"));

    let cache = tempfile::tempdir()?;
    let credentials = docker_config(dir.path(), &basic_entry("robot", "hunter2"))?;
    let pullcache = start_pullcache(cache.path(), &registry.url(), Some(&ca_file), Some(credentials)).await?;
    pull_through(&pullcache, &image).await?;
    for blob in image.layers() {
        let gets = registry
            .wait_access_log_count("GET", &blob.digest, 1, Duration::from_secs(5))
            .await;
        assert_eq!(gets, 1, "layer {} fetched {gets} times", blob.digest);
    }
    // The registry offers h2 by ALPN, and pullcache takes it.
    let log = std::fs::read_to_string(registry.access_log_path())?;
    let blob_lines: Vec<&str> = log.lines().filter(|l| l.contains("/blobs/")).collect();
    assert!(!blob_lines.is_empty());
    assert!(
        blob_lines.iter().all(|l| l.contains("HTTP/2.0")),
        "not HTTP/2: {blob_lines:?}"
    );

    // Verification is always on: without the CA, the registry's certificate is refused.
    let cache = tempfile::tempdir()?;
    let credentials = docker_config(dir.path(), &basic_entry("robot", "hunter2"))?;
    let untrusting = start_pullcache(cache.path(), &registry.url(), None, Some(credentials)).await?;
    let (status, code, message) = manifest_error(&untrusting).await?;
    assert_eq!((status, code.as_str()), (502, "UNAVAILABLE"), "{message}");
    assert!(message.contains("certificate"), "{message}");

    // Wrong and missing credentials: 401 naming the registry and what went wrong.
    let cache = tempfile::tempdir()?;
    let wrong = docker_config(dir.path(), &basic_entry("robot", "wrong"))?;
    let refused = start_pullcache(cache.path(), &registry.url(), Some(&ca_file), Some(wrong)).await?;
    let (status, code, message) = manifest_error(&refused).await?;
    assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"), "{message}");
    assert_names_registry(&message, "refused the configured credentials");

    let cache = tempfile::tempdir()?;
    let anonymous = start_pullcache(cache.path(), &registry.url(), Some(&ca_file), None).await?;
    let (status, _, message) = manifest_error(&anonymous).await?;
    assert_eq!(status, 401, "{message}");
    assert_names_registry(&message, "requires credentials");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_registry_like_docker_hub() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tokens = TokenService::start(&[("robot", "hunter2")], false).await?;
    let (image, registry) = token_registry(dir.path(), &tokens).await?;

    let cache = tempfile::tempdir()?;
    let credentials = docker_config(dir.path(), &basic_entry("robot", "hunter2"))?;
    let pullcache = start_pullcache(cache.path(), &registry.url(), None, Some(credentials)).await?;
    pull_through(&pullcache, &image).await?;

    let requests = tokens.requests();
    assert!(!requests.is_empty(), "no token was requested");
    // One token for the repository, reused for the manifest and every blob.
    assert_eq!(requests.len(), 1, "token requests: {requests:?}");
    assert_eq!(requests[0].basic_user().as_deref(), Some("robot"));
    assert_eq!(requests[0].param("scope").as_deref(), Some("repository:team/app:pull"));
    assert_eq!(requests[0].param("service"), Some(tokens.service()));

    // Wrong password: the token service refuses, the client hears it from pullcache.
    let cache = tempfile::tempdir()?;
    let wrong = docker_config(dir.path(), &basic_entry("robot", "nope"))?;
    let refused = start_pullcache(cache.path(), &registry.url(), None, Some(wrong)).await?;
    let (status, _, message) = manifest_error(&refused).await?;
    assert_eq!(status, 401, "{message}");
    assert_names_registry(&message, "refused the configured credentials");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_tokens_are_exchanged_for_access_tokens() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tokens = TokenService::start(&[], false)
        .await?
        .with_refresh_token("refresh-9f2c", "robot");
    let (image, registry) = token_registry(dir.path(), &tokens).await?;
    let cache = tempfile::tempdir()?;
    let credentials = docker_config(dir.path(), r#"{"identitytoken":"refresh-9f2c"}"#)?;
    let pullcache = start_pullcache(cache.path(), &registry.url(), None, Some(credentials)).await?;
    pull_through(&pullcache, &image).await?;

    let requests = tokens.requests();
    assert_eq!(requests.len(), 1, "token requests: {requests:?}");
    assert_eq!(requests[0].method, "POST");
    assert_eq!(requests[0].param("grant_type").as_deref(), Some("refresh_token"));
    assert_eq!(requests[0].param("refresh_token").as_deref(), Some("refresh-9f2c"));
    Ok(())
}
