//! Intercept mode with real clients and no hosts.toml: `ctr` and `skopeo` run with
//! `HTTPS_PROXY` pointing at pullcache and `SSL_CERT_FILE` holding its CA (so does the
//! containerd daemon: 2.x fetches a `ctr` pull there, in its transfer service), and pull
//! `registry.test.invalid/test/app:v1`, which pullcache maps to a loopback TLS registry with
//! its own CA. Anything not intercepted or allowed is refused, and a client that does not
//! trust the CA gets nothing.

use crate::support;

use std::net::SocketAddr;
use std::time::Duration;

use pullcache::config::InterceptSettings;
use pullcache::oci::Registry as RegistryName;
use pullcache::upstream::load_certificates;
use support::containerd::{Containerd, ContainerdOptions, Release, proxy_env};
use support::images::{PushedImage, push_oci_image};
use support::pullcache::Pullcache;
use support::registry::{Registry, RegistryOptions};
use support::tls::{TestCa, get_through_proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REGISTRY: &str = "registry.test.invalid";

struct Setup {
    _dir: tempfile::TempDir,
    registry: Registry,
    image: PushedImage,
    pullcache: Pullcache,
    /// pullcache's CA certificate: what the clients trust.
    ca_bundle: std::path::PathBuf,
    /// The upstream registry's own CA, which clients of pullcache do not need.
    upstream_ca: std::path::PathBuf,
}

async fn setup() -> anyhow::Result<Setup> {
    let dir = tempfile::tempdir()?;
    let storage = dir.path().join("storage");
    let mut plain = Registry::start_with(RegistryOptions::default(), Some(storage.clone())).await?;
    let image = push_oci_image(&plain.url(), "test/app", "v1", &[256 * 1024, 32 * 1024]).await?;
    plain.stop().await;
    let upstream_ca_issuer = TestCa::new();
    let upstream_ca = upstream_ca_issuer.write_ca(dir.path());
    let tls = upstream_ca_issuer.issue_server(dir.path(), &["127.0.0.1"]);
    let registry = Registry::start_with(
        RegistryOptions {
            tls: Some(tls),
            ..RegistryOptions::default()
        },
        Some(storage),
    )
    .await?;

    let ca_dir = dir.path().join("pullcache-ca");
    let mut config = support::pullcache::config(dir.path().join("cache"));
    config.registry(RegistryName::parse(REGISTRY)?).url = Some(registry.url().parse()?);
    config.upstream.roots = load_certificates(&upstream_ca).map_err(anyhow::Error::msg)?;
    config.intercept = Some(InterceptSettings {
        ca_dir: ca_dir.clone(),
        tunnel_allow: vec!["auth.docker.io".into(), "tunnel.invalid".into()],
        registries: Vec::new(),
    });
    let pullcache = Pullcache::start_with(config).await?;
    let ca_bundle = ca_dir.join(pullcache::ca::CERT_FILE);
    assert!(ca_bundle.exists(), "the CA was not created on first start");
    Ok(Setup {
        _dir: dir,
        registry,
        image,
        pullcache,
        ca_bundle,
        upstream_ca,
    })
}

each_release!(
    containerd_pulls_through_the_proxy,
    super::containerd_pulls_through_the_proxy
);

/// `ctr` pulls through the proxy: 1.x fetches in `ctr`, with its environment; 2.x in the
/// daemon's transfer service, with the daemon's.
async fn containerd_pulls_through_the_proxy(release: Release) -> anyhow::Result<()> {
    let s = setup().await?;
    let proxy = s.pullcache.url();
    let reference = s.image.reference(REGISTRY);
    let options = ContainerdOptions {
        env: proxy_env(&proxy, &s.ca_bundle),
        ..ContainerdOptions::default()
    }
    .of(release);

    let first = Containerd::start_with(options.clone()).await?;
    first.pull_via_proxy(&reference, &proxy, &s.ca_bundle).await?;
    assert!(first.is_unpacked(&reference).await?);
    for blob in s.image.layers() {
        let gets = s
            .registry
            .wait_access_log_count("GET", &blob.digest, 1, Duration::from_secs(5))
            .await;
        assert_eq!(gets, 1, "layer {} fetched {gets} times", blob.digest);
    }

    // A second containerd: everything from the cache, no blob GET upstream.
    let blob_gets = s.registry.access_log_count("GET", "/blobs/");
    let second = Containerd::start_with(options).await?;
    second.pull_via_proxy(&reference, &proxy, &s.ca_bundle).await?;
    assert!(second.is_unpacked(&reference).await?);
    s.pullcache.idle().await?;
    s.registry.settle().await?;
    assert_eq!(s.registry.access_log_count("GET", "/blobs/"), blob_gets);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_lists_tags_and_pushes_through_the_proxy() -> anyhow::Result<()> {
    let s = setup().await?;
    let proxy = s.pullcache.url();
    let reference = s.image.reference(REGISTRY);
    let dest = tempfile::tempdir()?;
    support::skopeo::copy_via_proxy(&reference, dest.path(), &proxy, &s.ca_bundle).await?;
    let manifest = std::fs::read(dest.path().join("manifest.json"))?;
    assert_eq!(manifest, s.image.manifest);
    for layer in s.image.layers() {
        let file = dest.path().join(&layer.digest[7..]);
        assert_eq!(std::fs::metadata(&file)?.len(), layer.size, "{}", file.display());
        let gets = s.registry.access_log_count("GET", &layer.digest);
        assert_eq!(gets, 1, "layer {} fetched {gets} times", layer.digest);
    }
    // Its tag listing passes through too (it used to get 405).
    let repository = reference.rsplit_once(':').map_or(reference.as_str(), |(r, _)| r);
    let tags = support::skopeo::list_tags_via_proxy(repository, &proxy, &s.ca_bundle).await?;
    assert_eq!(tags, [s.image.tag.as_str()]);

    // And a push, the other way: each blob (larger than what pullcache buffers of a request
    // it forwards) streamed to the registry with skopeo's own credentials (none here), the
    // manifest after. It reaches the registry, and pulls back the same.
    let pushed = format!("{REGISTRY}/pushed/app:v1");
    support::skopeo::push_via_proxy(dest.path(), &pushed, &proxy, &s.ca_bundle).await?;
    s.registry.settle().await?;
    assert!(
        s.registry.access_log_count("PUT", "/v2/pushed/app/manifests/v1") >= 1,
        "the manifest PUT did not reach the registry"
    );
    // A push's URI is held to the same limit as any request's.
    let long = format!("/v2/pushed/app/blobs/uploads/x?{}", "a".repeat(3000));
    let refused = get_through_proxy(s.pullcache.addr, REGISTRY, &s.ca_bundle, &long, None).await?;
    assert_eq!(refused.status, 414);
    let back = tempfile::tempdir()?;
    support::skopeo::copy_via_proxy(&pushed, back.path(), &proxy, &s.ca_bundle).await?;
    assert_eq!(std::fs::read(back.path().join("manifest.json"))?, s.image.manifest);
    assert!(
        s.pullcache.stored_blobs().len() <= s.image.blobs.len() + 1,
        "a push left something in the cache"
    );
    Ok(())
}

/// containerd 2.1 pushes through its transfer service, in the daemon, through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_2_1_pushes_through_the_proxy() -> anyhow::Result<()> {
    let s = setup().await?;
    let proxy = s.pullcache.url();
    let reference = s.image.reference(REGISTRY);
    let ctd = Containerd::start_with(
        ContainerdOptions {
            env: proxy_env(&proxy, &s.ca_bundle),
            ..ContainerdOptions::default()
        }
        .of(Release::V2_1),
    )
    .await?;
    ctd.pull_via_proxy(&reference, &proxy, &s.ca_bundle).await?;
    let pushed = format!("{REGISTRY}/pushed/ctd:v1");
    ctd.ctr(&["images", "tag", &reference, &pushed]).await?;
    let out = ctd
        .ctr_via_proxy_raw(
            &["images", "push", &pushed],
            &proxy,
            &s.ca_bundle,
            Duration::from_secs(60),
        )
        .await?;
    assert!(
        out.status.success(),
        "ctr images push: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    s.registry.settle().await?;
    assert!(s.registry.access_log_count("PUT", "/v2/pushed/ctd/manifests/") >= 1);
    // What it pushed pulls back through the proxy on a fresh containerd.
    let fresh = Containerd::start_with(
        ContainerdOptions {
            env: proxy_env(&proxy, &s.ca_bundle),
            ..ContainerdOptions::default()
        }
        .of(Release::V2_1),
    )
    .await?;
    fresh.pull_via_proxy(&pushed, &proxy, &s.ca_bundle).await?;
    assert!(fresh.is_unpacked(&pushed).await?);
    Ok(())
}

/// Sends a CONNECT and returns the status line and body of the answer.
async fn connect(proxy: SocketAddr, target: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(proxy).await?;
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    // The refusal closes nothing by itself; read until the body has arrived.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await??;
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        if n == 0 || text.contains("\r\n\r\n") && (text.contains("pullcache:") || text.starts_with("HTTP/1.1 200")) {
            break;
        }
    }
    let text = String::from_utf8(answer)?;
    let status = text.split_whitespace().nth(1).unwrap_or_default().parse()?;
    Ok((status, text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals() -> anyhow::Result<()> {
    let s = setup().await?;
    for target in [
        "example.invalid:443",
        "169.254.169.254:80",
        "169.254.169.254:443",
        "127.0.0.1:22",
        "auth.docker.io:22",
    ] {
        let (status, text) = connect(s.pullcache.addr, target).await?;
        assert_eq!(status, 403, "CONNECT {target}: {text}");
        let status_line = text.lines().next().unwrap_or_default();
        assert!(
            status_line.starts_with("HTTP/1.1 403 pullcache: "),
            "no reason in the status line: {text}"
        );
    }
    // An intercepted host is accepted.
    let (status, _) = connect(s.pullcache.addr, &format!("{REGISTRY}:443")).await?;
    assert_eq!(status, 200);
    // A host the tunnel may reach but cannot (`.invalid` never resolves) is told so, before
    // any "200 Connection established".
    let (status, text) = connect(s.pullcache.addr, "tunnel.invalid:443").await?;
    assert_eq!(status, 502, "{text}");
    assert!(
        text.lines()
            .next()
            .unwrap_or_default()
            .starts_with("HTTP/1.1 502 pullcache: "),
        "{text}"
    );
    assert!(text.contains("cannot reach tunnel.invalid:443"), "{text}");

    // A client that trusts another CA fails the handshake, and nothing is served.
    let before = s.pullcache.metrics().await?;
    let ctr = Containerd::start().await?;
    let out = ctr
        .ctr_via_proxy_raw(
            &[
                "images",
                "pull",
                "--snapshotter",
                "native",
                &s.image.reference(REGISTRY),
            ],
            &s.pullcache.url(),
            &s.upstream_ca,
            Duration::from_secs(60),
        )
        .await?;
    assert!(!out.status.success(), "a client without pullcache's CA pulled");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("certificate"), "{stderr}");
    let after = s.pullcache.metrics().await?;
    assert_eq!(
        requests(&before),
        requests(&after),
        "something was served without a handshake"
    );
    assert!(requests(&after) == 0.0);
    Ok(())
}

/// Every `pullcache_requests_total` sample, summed.
fn requests(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("pullcache_requests_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `curl -i` through the proxy with pullcache's CA; the response head, lowercased.
async fn curl_via_proxy(s: &Setup, method: &str, url: &str) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-i", "-X", method, "--max-time", "20", "--proxy"])
        .arg(s.pullcache.url())
        .arg("--cacert")
        .arg(&s.ca_bundle)
        .arg(url)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    // The proxy's own "200 connection established" head comes first.
    let head = text
        .split("\r\n\r\n")
        .filter(|h| h.starts_with("http/"))
        .last()
        .unwrap_or_default();
    Ok(head.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_outside_the_api_are_forwarded_untouched() -> anyhow::Result<()> {
    let s = setup().await?;
    // The registry's own answer to `/` (pullcache itself would say 404 with an OCI error).
    let root = curl_via_proxy(&s, "GET", &format!("https://{REGISTRY}/")).await?;
    assert!(
        root.starts_with("http/1.1 200") || root.starts_with("http/2 200"),
        "{root}"
    );
    assert!(root.contains("cache-control: no-cache"), "{root}");
    let ping = curl_via_proxy(&s, "GET", &format!("https://{REGISTRY}/v1/_ping")).await?;
    assert!(ping.contains(" 404"), "{ping}");
    assert!(
        ping.contains("content-type: text/plain"),
        "not the registry's own 404: {ping}"
    );
    // Any method: an OAuth2 token request is a POST.
    let post = curl_via_proxy(&s, "POST", &format!("https://{REGISTRY}/")).await?;
    assert!(
        post.contains(" 200") && post.contains("cache-control: no-cache"),
        "not the registry's own answer to a POST: {post}"
    );
    assert!(s.pullcache.stored_blobs().is_empty(), "a forwarded response was cached");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_requests_are_served_for_intercepted_hosts_only() -> anyhow::Result<()> {
    let s = setup().await?;
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(s.pullcache.url())?)
        .build()?;
    let resp = client
        .get(format!("http://{REGISTRY}/v2/test/app/manifests/v1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["docker-content-digest"],
        s.image.manifest_digest.as_str()
    );
    assert_eq!(resp.bytes().await?, s.image.manifest);
    for url in ["http://example.invalid/", "http://169.254.169.254/latest/meta-data/"] {
        let resp = client.get(url).send().await?;
        assert_eq!(resp.status(), 403, "{url}");
    }
    Ok(())
}
