//! Private images on a shared node cache, through the kubelet's own path: containerd's CRI
//! `PullImage` with a pod's pull secret (`AuthConfig`), against the real registry with token
//! auth. alice may read `team-a/app`, bob `team-b/app`, anyone `public/app`; pullcache's own
//! credentials (user `cache`) read all three.
//!
//! - Intercept mode (`HTTPS_PROXY` in containerd's environment): a private image is served
//!   only to a client whose own token the registry accepts for that repository.
//! - Mirror mode (certs.d from `pullcache containerd-config install`): `bypass` (the default)
//!   answers 404 for private repositories, so containerd pulls them from the registry with
//!   the pod's secret; `share` serves them to every workload.
//!
//! A fake upstream stands in for the registry only where the real one cannot act: revoking a
//! token that has not expired.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use pullcache::authorize::PrivateImages;
use pullcache::config::InterceptSettings;
use pullcache::oci::Registry as RegistryName;
use pullcache::upstream::Credentials;
use support::containerd::{
    Containerd, ContainerdOptions, containerd_config_install, proxy_env, write_hosts_toml_server_only,
};
use support::cri::{Auth, CRI_NAMESPACE};
use support::images::PushedImage;
use support::pullcache::Pullcache;
use support::registry::Registry;
use support::tls::get_through_proxy;
use support::token_service::{ALICE, BOB, CACHE_USER, TokenService, tenants};

/// Intercepted (containerd believes it talks to this host).
const INTERCEPTED: &str = "registry.test.invalid";
/// Reached through the mirror (`?ns=`), with the real registry as containerd's fallback.
const MIRRORED: &str = "registry.test";

struct Upstream {
    dir: tempfile::TempDir,
    tokens: TokenService,
    registry: Registry,
    team_a: PushedImage,
    public: PushedImage,
}

/// The real registry with token auth and per-user access, holding three images.
async fn upstream() -> anyhow::Result<Upstream> {
    let dir = tempfile::tempdir()?;
    let tokens = tenants(&["team-a/app", "team-b/app", "public/app"], &["public/app"]).await?;
    let (registry, images) = support::registry::with_token_auth(
        dir.path(),
        &tokens,
        &[
            ("team-a/app", "v1", &[192 * 1024, 48 * 1024]),
            ("team-b/app", "v1", &[64 * 1024]),
            ("public/app", "v1", &[96 * 1024]),
        ],
    )
    .await?;
    let [team_a, _, public] = <[PushedImage; 3]>::try_from(images).map_err(|_| anyhow::anyhow!("three images"))?;
    Ok(Upstream {
        dir,
        tokens,
        registry,
        team_a,
        public,
    })
}

fn auth((user, password): (&str, &str)) -> Auth {
    Auth::basic(user, password)
}

/// pullcache mapping both names to the registry, with the `cache` user's credentials, in
/// intercept mode (its CA in the returned dir) and with `policy` for mirror mode.
async fn pullcache(up: &Upstream, policy: PrivateImages) -> anyhow::Result<(Pullcache, PathBuf)> {
    let mut config = support::pullcache::config(up.dir.path().join(format!("cache-{policy}")));
    for name in [INTERCEPTED, MIRRORED] {
        let settings = config.registry(RegistryName::parse(name)?);
        settings.url = Some(up.registry.url().parse()?);
        settings.credentials = Some(Credentials::Basic {
            username: CACHE_USER.0.to_owned(),
            password: CACHE_USER.1.to_owned(),
        });
    }
    let ca_dir = up.dir.path().join(format!("ca-{policy}"));
    config.intercept = Some(InterceptSettings {
        ca_dir: ca_dir.clone(),
        tunnel_allow: Vec::new(),
        registries: Vec::new(),
    });
    config.authorize.private_images = policy;
    let pullcache = Pullcache::start_with(config).await?;
    Ok((pullcache, ca_dir.join(pullcache::ca::CERT_FILE)))
}

/// A containerd with its CRI plugin, pulling through pullcache as an HTTPS proxy.
async fn intercepting_containerd(pullcache: &Pullcache, ca: &Path, certs_d: &Path) -> anyhow::Result<Containerd> {
    Containerd::start_with(ContainerdOptions {
        env: proxy_env(&pullcache.url(), ca),
        ..ContainerdOptions::cri(certs_d)
    })
    .await
}

/// Every blob and the manifest of `image` in `containerd`'s CRI namespace: none of it may
/// be there after a refused pull.
async fn holds_any(containerd: &Containerd, image: &PushedImage) -> anyhow::Result<bool> {
    for digest in image.blobs.iter().map(|b| &b.digest).chain([&image.manifest_digest]) {
        if containerd.has_content_in(CRI_NAMESPACE, digest).await? {
            return Ok(true);
        }
    }
    Ok(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intercept_mode_serves_a_private_image_only_to_clients_the_registry_accepts() -> anyhow::Result<()> {
    let mut up = upstream().await?;
    let (pullcache, ca) = pullcache(&up, PrivateImages::Bypass).await?;
    let proxy = pullcache.url().trim_start_matches("http://").parse()?;
    let certs_d = tempfile::tempdir()?;
    let node = intercepting_containerd(&pullcache, &ca, certs_d.path()).await?;
    let cri = node.cri().await?;
    let team_a = up.team_a.reference(INTERCEPTED);
    let layer = up.team_a.layers()[0].digest.clone();

    // alice reads her image through the cache.
    cri.pull_image(&team_a, Some(&auth(ALICE))).await?;
    assert!(cri.image_status(&team_a).await?.is_some());
    assert!(
        pullcache.stored_blobs().iter().any(|b| layer.ends_with(b.as_str())),
        "alice's pull did not go through the cache: {:?}",
        pullcache.stored_blobs()
    );
    let allowed = pullcache
        .sample("pullcache_authorizations_total{result=\"allowed\"}")
        .await?;
    assert!(allowed > 0.0, "no request was authorized by alice's credential");

    // bob, and a pull without credentials, on a node of their own: by tag and by digest.
    let other = tempfile::tempdir()?;
    let node_b = intercepting_containerd(&pullcache, &ca, other.path()).await?;
    let cri_b = node_b.cri().await?;
    for reference in [team_a.clone(), up.team_a.digest_reference(INTERCEPTED)] {
        let refused = cri_b.pull_image(&reference, Some(&auth(BOB))).await;
        assert!(refused.is_err(), "bob pulled {reference}");
        let refused = cri_b.pull_image(&reference, None).await;
        assert!(refused.is_err(), "a pull without credentials got {reference}");
    }
    assert!(
        !holds_any(&node_b, &up.team_a).await?,
        "bytes of alice's image reached bob's node"
    );

    // The same, byte by byte: bob's own token and no token get no blob and no manifest.
    let bob = up.tokens.pull_token(BOB, "team-a/app").await?;
    let objects: Vec<String> = up
        .team_a
        .blobs
        .iter()
        .map(|b| format!("/v2/team-a/app/blobs/{}", b.digest))
        .chain([
            format!("/v2/team-a/app/manifests/{}", up.team_a.manifest_digest),
            "/v2/team-a/app/manifests/v1".to_owned(),
        ])
        .collect();
    for path in &objects {
        let as_bob = get_through_proxy(proxy, INTERCEPTED, &ca, path, Some(&bob)).await?;
        assert!(
            as_bob.status == 401 || as_bob.status == 403,
            "bob got {path}: {}",
            as_bob.status
        );
        let anonymous = get_through_proxy(proxy, INTERCEPTED, &ca, path, None).await?;
        assert_eq!(anonymous.status, 401, "{path} without credentials");
        // The registry's own challenge, relayed: the client takes a token from the real realm.
        let challenge = anonymous.headers["www-authenticate"].to_str()?;
        assert!(
            challenge.contains(&up.tokens.realm()) && challenge.contains("repository:team-a/app:pull"),
            "{challenge}"
        );
        for body in [&as_bob.body, &anonymous.body] {
            let error: serde_json::Value = serde_json::from_slice(body)?;
            assert!(error["errors"][0]["code"].is_string(), "not an OCI error: {error}");
        }
    }
    // Under another repository's name, alice's blob is not served either, even to a client
    // who may read that repository.
    let bob_b = up.tokens.pull_token(BOB, "team-b/app").await?;
    let renamed = get_through_proxy(
        proxy,
        INTERCEPTED,
        &ca,
        &format!("/v2/team-b/app/blobs/{layer}"),
        Some(&bob_b),
    )
    .await?;
    assert_eq!(renamed.status, 404, "alice's layer served as team-b's");
    // Without credentials: the registry's anonymous 404 proves nothing about `public/app`,
    // so the client is challenged (with a token it would get the 404).
    let renamed = get_through_proxy(proxy, INTERCEPTED, &ca, &format!("/v2/public/app/blobs/{layer}"), None).await?;
    assert!(
        renamed.status == 401 || renamed.status == 404,
        "alice's layer served as a public image's: {}",
        renamed.status
    );

    // alice again, on bob's node: from the cache, with one check per token containerd shows.
    let gets = up.registry.access_log_count("GET", &layer);
    let checks = "pullcache_authorization_checks_total{answer=\"readable\",as=\"client\"}";
    let (checks_before, tokens_before) = (pullcache.sample(checks).await?, up.tokens.request_count());
    cri_b.pull_image(&team_a, Some(&auth(ALICE))).await?;
    assert_eq!(
        up.registry.access_log_count("GET", &layer),
        gets,
        "not served from the cache"
    );
    let checks_made = pullcache.sample(checks).await? - checks_before;
    let tokens_taken = (up.tokens.request_count() - tokens_before) as f64;
    assert!(
        checks_made >= 1.0 && checks_made <= tokens_taken,
        "{checks_made} checks for {tokens_taken} tokens"
    );
    // A token already accepted is not asked about again within the TTL.
    let alice = up.tokens.pull_token(ALICE, "team-a/app").await?;
    let before = pullcache.sample(checks).await?;
    for path in &objects {
        let got = get_through_proxy(proxy, INTERCEPTED, &ca, path, Some(&alice)).await?;
        assert_eq!(got.status, 200, "alice's {path}");
    }
    assert_eq!(
        pullcache.sample(checks).await? - before,
        1.0,
        "one check for {} requests",
        objects.len()
    );

    // The public image: to anyone, and from the cache the second time.
    let public = up.public.reference(INTERCEPTED);
    cri.pull_image(&public, None).await?;
    let public_layer = &up.public.layers()[0].digest;
    let gets = up.registry.access_log_count("GET", public_layer);
    cri_b.pull_image(&public, None).await?;
    assert_eq!(up.registry.access_log_count("GET", public_layer), gets);
    // The registry goes down: the cached public image still serves, and alice's layer is
    // still not served under the public repository's name, though nobody can be asked.
    up.registry.stop().await;
    let public_path = format!("/v2/public/app/blobs/{public_layer}");
    assert_eq!(
        get_through_proxy(proxy, INTERCEPTED, &ca, &public_path, None)
            .await?
            .status,
        200
    );
    let hidden = get_through_proxy(proxy, INTERCEPTED, &ca, &format!("/v2/public/app/blobs/{layer}"), None).await?;
    assert_ne!(
        hidden.status, 200,
        "alice's layer served as public/app's while the registry was down"
    );
    for result in ["denied", "challenged", "public"] {
        let n = pullcache
            .sample(&format!("pullcache_authorizations_total{{result=\"{result}\"}}"))
            .await?;
        assert!(n > 0.0, "no request counted {result}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_mode_bypasses_private_repositories_by_default_and_shares_them_when_told() -> anyhow::Result<()> {
    let up = upstream().await?;
    let team_a = up.team_a.reference(MIRRORED);
    let layer = up.team_a.layers()[0].digest.clone();

    // bypass: pullcache answers 404 before any byte; containerd goes to the registry itself
    // with the pod's secret, where the registry decides.
    let (bypass, _) = pullcache(&up, PrivateImages::Bypass).await?;
    let certs_d = tempfile::tempdir()?;
    let node = Containerd::start_cri(certs_d.path()).await?;
    write_hosts_toml_server_only(certs_d.path(), MIRRORED, &up.registry.url());
    containerd_config_install(certs_d.path(), &bypass.url(), MIRRORED, Some(&node))?;
    let cri = node.cri().await?;
    cri.pull_image(&team_a, Some(&auth(ALICE))).await?;
    assert!(cri.image_status(&team_a).await?.is_some());
    assert!(
        bypass.stored_blobs().is_empty(),
        "a private image entered the cache in bypass mode"
    );
    let bypassed = bypass
        .sample("pullcache_authorizations_total{result=\"bypassed\"}")
        .await?;
    assert!(
        bypassed > 0.0,
        "containerd never asked pullcache, so this proves nothing"
    );
    for reference in [team_a.clone(), up.team_a.digest_reference(MIRRORED)] {
        let other = tempfile::tempdir()?;
        let node_b = Containerd::start_cri(other.path()).await?;
        write_hosts_toml_server_only(other.path(), MIRRORED, &up.registry.url());
        containerd_config_install(other.path(), &bypass.url(), MIRRORED, Some(&node_b))?;
        let cri_b = node_b.cri().await?;
        assert!(
            cri_b.pull_image(&reference, Some(&auth(BOB))).await.is_err(),
            "bob pulled {reference}"
        );
        assert!(
            cri_b.pull_image(&reference, None).await.is_err(),
            "no credentials pulled {reference}"
        );
        assert!(!holds_any(&node_b, &up.team_a).await?);
    }
    // The mirror itself answers 404 with an OCI error, to a raw client too.
    let raw = support::http_client()
        .get(format!("{}/v2/team-a/app/blobs/{layer}?ns={MIRRORED}", bypass.url()))
        .send()
        .await?;
    assert_eq!(raw.status(), 404);
    assert_eq!(
        raw.json::<serde_json::Value>().await?["errors"][0]["code"],
        "BLOB_UNKNOWN"
    );

    // `containerd-config install --bypass`: containerd does not ask pullcache at all for a
    // registry of private images.
    let direct = tempfile::tempdir()?;
    let node_d = Containerd::start_cri(direct.path()).await?;
    write_hosts_toml_server_only(direct.path(), MIRRORED, &up.registry.url());
    let out = std::process::Command::new(support::binary::BIN)
        .args(["containerd-config", "install", "--certs-dir"])
        .arg(direct.path())
        .args([
            "--mirror",
            &bypass.url(),
            "--bypass",
            MIRRORED,
            "--strict",
            "--containerd-config",
        ])
        .arg(node_d.config_path())
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        bypass.sum("pullcache_requests_total").await? > 0.0,
        "no request was ever counted"
    );
    let asked = bypass.sum("pullcache_requests_total").await?;
    node_d.cri().await?.pull_image(&team_a, Some(&auth(ALICE))).await?;
    assert_eq!(
        bypass.sum("pullcache_requests_total").await?,
        asked,
        "containerd asked pullcache for a bypassed registry"
    );

    // Public images are cached as before.
    let public = up.public.reference(MIRRORED);
    cri.pull_image(&public, None).await?;
    let public_layer = &up.public.layers()[0].digest;
    assert!(bypass.stored_blobs().iter().any(|b| public_layer.ends_with(b.as_str())));

    // share: every workload on the node reads what pullcache's credentials can.
    let (share, _) = pullcache(&up, PrivateImages::Share).await?;
    let shared = tempfile::tempdir()?;
    let node_s = Containerd::start_cri(shared.path()).await?;
    write_hosts_toml_server_only(shared.path(), MIRRORED, &up.registry.url());
    containerd_config_install(shared.path(), &share.url(), MIRRORED, Some(&node_s))?;
    node_s.cri().await?.pull_image(&team_a, None).await?;
    assert!(
        share.stored_blobs().iter().any(|b| layer.ends_with(b.as_str())),
        "share did not serve the private image from the cache"
    );
    Ok(())
}

/// A registry that accepts a token until it is revoked, which the real registry cannot do
/// before the token expires.
mod revocation {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper::{Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;

    pub const TOKEN: &str = "Bearer alice-opaque-token";
    const CACHE: &str = "Basic Y2FjaGU6Y2FjaGUtcHc="; // cache:cache-pw

    /// Serves `/v2/rev/app/manifests/v1` (`manifest`, an OCI index with no children) to
    /// `TOKEN` while `valid`, and to pullcache's own Basic credentials always.
    pub async fn start(manifest: Bytes, valid: Arc<AtomicBool>) -> anyhow::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (manifest, valid) = (manifest.clone(), valid.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok());
                        let ok = auth == Some(CACHE) || (auth == Some(TOKEN) && valid.load(Ordering::SeqCst));
                        let resp = if !ok {
                            Response::builder()
                                .status(StatusCode::UNAUTHORIZED)
                                .header("www-authenticate", r#"Basic realm="rev""#)
                                .body(Full::new(Bytes::from_static(b"{}")))
                        } else if req.uri().path() == "/v2/rev/app/manifests/v1" {
                            Response::builder()
                                .header("content-type", "application/vnd.oci.image.index.v1+json")
                                .header("content-length", manifest.len())
                                .body(Full::new(manifest.clone()))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"{}")))
                        };
                        async move { Ok::<_, Infallible>(resp.expect("valid response")) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(format!("http://{addr}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_once_its_remembered_answer_expires() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    const TTL: Duration = Duration::from_secs(2);
    let dir = tempfile::tempdir()?;
    let manifest = bytes::Bytes::from_static(
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
    );
    let valid = Arc::new(AtomicBool::new(true));
    let url = revocation::start(manifest, valid.clone()).await?;
    let mut config = support::pullcache::config(dir.path().join("cache"));
    let settings = config.registry(RegistryName::parse(INTERCEPTED)?);
    settings.url = Some(url.parse()?);
    settings.credentials = Some(Credentials::Basic {
        username: CACHE_USER.0.to_owned(),
        password: CACHE_USER.1.to_owned(),
    });
    let ca_dir = dir.path().join("ca");
    config.intercept = Some(InterceptSettings {
        ca_dir: ca_dir.clone(),
        tunnel_allow: Vec::new(),
        registries: Vec::new(),
    });
    config.authorize.ttl = TTL;
    let pullcache = Pullcache::start_with(config).await?;
    let ca = ca_dir.join(pullcache::ca::CERT_FILE);
    let proxy = pullcache.url().trim_start_matches("http://").parse()?;
    let get = || {
        get_through_proxy(
            proxy,
            INTERCEPTED,
            &ca,
            "/v2/rev/app/manifests/v1",
            Some(revocation::TOKEN),
        )
    };

    assert_eq!(get().await?.status, 200);
    valid.store(false, Ordering::SeqCst);
    // Within the TTL the remembered yes stands (that is what --auth-ttl trades)...
    assert_eq!(get().await?.status, 200);
    tokio::time::sleep(TTL + Duration::from_millis(300)).await;
    // ...and after it the registry is asked again, and refuses.
    let refused = get().await?;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.headers["www-authenticate"], r#"Basic realm="rev""#);
    Ok(())
}
