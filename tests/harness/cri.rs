//! The CRI client (`support::cri`) and a containerd with its CRI plugin on, against the real
//! containerd, registry and token service, with no pullcache in the path: what containerd's
//! CRI `PullImage` sends to a mirror, to a registry and through an HTTPS proxy when the kubelet
//! passes a pull secret. These pin the facts documented at the top of `support/cri.rs`.

use std::path::Path;

use crate::support::containerd::{self, Containerd, ContainerdOptions};
use crate::support::cri::{Auth, CRI_NAMESPACE, CriError};
use crate::support::images::{self, PushedImage};
use crate::support::registry::{Registry, RegistryOptions};
use crate::support::spy::{ProxiedRequest, RecordedRequest, SpyProxy, SpyServer};
use crate::support::tls::TestCa;
use crate::support::token_service::{TokenRequest, TokenService};

const REGISTRY: &str = "registry.test";
const PROXIED: &str = "registry.test.invalid";
const REALM_HOST: &str = "auth.test.invalid";
const USER: &str = "alice";
const PASSWORD: &str = "alice-pw";
const DEAD_SERVER: &str = "http://127.0.0.1:1";

/// The real registry with token auth (no anonymous pulls) serving `team/app:v1`; its realm is
/// the token service's own loopback URL unless `realm` says otherwise.
async fn token_registry(dir: &Path, realm: Option<&str>) -> (TokenService, PushedImage, Registry) {
    let tokens = TokenService::start(&[(USER, PASSWORD)], false).await.unwrap();
    let storage = dir.join("storage");
    let mut plain = Registry::start_with(RegistryOptions::default(), Some(storage.clone()))
        .await
        .unwrap();
    let image = images::push_oci_image(&plain.url(), "team/app", "v1", &[64 * 1024])
        .await
        .unwrap();
    plain.stop().await;
    let mut auth = tokens.token_auth(dir);
    if let Some(realm) = realm {
        auth.realm = realm.to_owned();
    }
    let options = RegistryOptions {
        token: Some(auth),
        ..RegistryOptions::default()
    };
    let registry = Registry::start_with(options, Some(storage)).await.unwrap();
    (tokens, image, registry)
}

fn alice() -> Auth {
    Auth::basic(USER, PASSWORD)
}

/// containerd's own refusal when the registry gives no anonymous token.
const ANONYMOUS_REFUSAL: &str =
    "failed to authorize: failed to fetch anonymous token: unexpected status: 401 Unauthorized";

/// A refused PullImage whose message ends with `expected`.
fn assert_refusal(result: Result<String, CriError>, expected: &str) {
    let error = result.expect_err("pulled without a usable credential");
    assert_eq!(error.code, tonic::Code::Unknown, "{error}");
    assert!(error.message.ends_with(expected), "{error}");
}

/// Each token request was the OAuth2 password grant for alice: a POST form, no Authorization.
fn assert_password_grants(requests: &[TokenRequest]) {
    assert!(!requests.is_empty());
    for r in requests {
        assert_eq!(r.method, "POST", "{r:?}");
        assert_eq!(r.authorization, None, "{r:?}");
        assert_eq!(r.param("grant_type").as_deref(), Some("password"), "{r:?}");
        assert_eq!(r.param("username").as_deref(), Some(USER), "{r:?}");
        assert_eq!(r.param("password").as_deref(), Some(PASSWORD), "{r:?}");
        assert_eq!(r.param("client_id").as_deref(), Some("containerd-client"), "{r:?}");
        assert_eq!(r.param("scope").as_deref(), Some("repository:team/app:pull"), "{r:?}");
    }
}

fn is_bearer(r: &RecordedRequest) -> bool {
    r.header("authorization").is_some_and(|a| a.starts_with("Bearer "))
}

/// The mirror answers 404 (or a bare 401) to everything and the `server` is the registry: every
/// request goes to the mirror first, without credentials, then to the registry, which gets the
/// pull secret's token. ImageStatus, the k8s.io namespace and RemoveImage as the tests use them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_secret_skips_a_refusing_mirror_and_reaches_the_registry() {
    let work = tempfile::tempdir().unwrap();
    let (tokens, image, registry) = token_registry(work.path(), None).await;
    let server = SpyServer::start_forwarding(registry.addr()).await.unwrap();
    let reference = image.reference(REGISTRY);
    let config = &image.blobs[0];
    let layer = &image.blobs[1];
    for status in [404, 401] {
        let mirror = SpyServer::start_with_status(status).await.unwrap();
        let certs = tempfile::tempdir().unwrap();
        containerd::write_hosts_toml(certs.path(), REGISTRY, &server.url(), &mirror.url());
        let ctd = Containerd::start_cri(certs.path()).await.unwrap();
        let cri = ctd.cri().await.unwrap();

        // No secret, or a registry_token (containerd 1.6 ignores it): an anonymous token is
        // asked for, refused, and so is the pull.
        // The message is the first host's failure: a 404 is skipped quietly, anything else is
        // what containerd reports though it went on to the registry.
        let refusal = match status {
            404 => ANONYMOUS_REFUSAL.to_owned(),
            _ => format!(
                "pulling from host {} failed with status code [manifests v1]: 401 Spy",
                mirror.addr()
            ),
        };
        let tokens_before = tokens.request_count();
        assert_refusal(cri.pull_image(&reference, None).await, &refusal);
        let token = tokens.mint_token(USER, &["repository:team/app:pull"], 300);
        assert_refusal(
            cri.pull_image(&reference, Some(&Auth::RegistryToken(token))).await,
            &refusal,
        );
        let anonymous = &tokens.requests()[tokens_before..];
        assert_eq!(anonymous.len(), 2, "{anonymous:#?}");
        assert!(anonymous.iter().all(|r| r.method == "GET" && r.authorization.is_none()));

        let (tokens_before, server_before) = (tokens.request_count(), server.requests().len());
        let pulled = cri.pull_image(&reference, Some(&alice())).await.unwrap();
        assert_eq!(pulled, config.digest, "PullImage answers the image id");

        // The mirror: each refused pull sent the tag HEAD; the good one, every request once,
        // with ?ns=, and never a credential.
        let seen = mirror.requests();
        let mut targets: Vec<String> = seen.iter().map(|r| format!("{} {}", r.method, r.target)).collect();
        targets[4..].sort();
        let head = "HEAD /v2/team/app/manifests/v1?ns=registry.test".to_owned();
        let mut blobs = [
            format!("GET /v2/team/app/blobs/{}?ns=registry.test", config.digest),
            format!("GET /v2/team/app/blobs/{}?ns=registry.test", layer.digest),
        ];
        blobs.sort();
        let mut want = vec![
            head.clone(),
            head.clone(),
            head,
            format!("GET /v2/team/app/manifests/{}?ns=registry.test", image.manifest_digest),
        ];
        want.extend(blobs);
        assert_eq!(targets, want, "mirror {status}: {seen:#?}");
        assert!(seen.iter().all(|r| r.header("authorization").is_none()), "{seen:#?}");

        // The registry: a token from alice's password, Bearer on every blob GET.
        assert_password_grants(&tokens.requests()[tokens_before..]);
        let at_server = &server.requests()[server_before..];
        let blob_gets: Vec<_> = at_server.iter().filter(|r| r.path().contains("/blobs/")).collect();
        assert_eq!(blob_gets.len(), 2, "{at_server:#?}");
        assert!(blob_gets.iter().all(|r| is_bearer(r)), "{at_server:#?}");

        let status_of = cri
            .image_status(&reference)
            .await
            .unwrap()
            .expect("ImageStatus knows it");
        assert_eq!(status_of.id, config.digest);
        assert_eq!(status_of.repo_tags, std::slice::from_ref(&reference));
        assert_eq!(
            status_of.repo_digests,
            [format!("{REGISTRY}/team/app@{}", image.manifest_digest)]
        );
        assert!(ctd.is_unpacked_in(CRI_NAMESPACE, &reference).await.unwrap());
        assert!(ctd.has_content_in(CRI_NAMESPACE, &layer.digest).await.unwrap());
        // ctr's namespace does not see CRI images.
        assert!(ctd.is_unpacked(&reference).await.is_err());

        cri.remove_image(&reference).await.unwrap();
        assert_eq!(cri.image_status(&reference).await.unwrap(), None);
        cri.remove_image(&reference).await.expect("RemoveImage is idempotent");
    }
}

/// A mirror that answers with the registry's own challenge gets the pull secret: containerd
/// offers the credentials to whichever host challenges (AuthConfig.server_address empty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenging_mirror_gets_the_pull_secret() {
    let work = tempfile::tempdir().unwrap();
    let (tokens, image, registry) = token_registry(work.path(), None).await;
    let mirror = SpyServer::start_forwarding(registry.addr()).await.unwrap();
    let certs = tempfile::tempdir().unwrap();
    containerd::write_hosts_toml(certs.path(), REGISTRY, DEAD_SERVER, &mirror.url());
    let ctd = Containerd::start_cri(certs.path()).await.unwrap();
    let cri = ctd.cri().await.unwrap();
    let reference = image.reference(REGISTRY);
    cri.pull_image(&reference, Some(&alice())).await.unwrap();
    assert_password_grants(&tokens.requests());
    let seen = mirror.requests();
    let blob_gets: Vec<_> = seen.iter().filter(|r| r.path().contains("/blobs/")).collect();
    assert_eq!(blob_gets.len(), 2, "{seen:#?}");
    assert!(blob_gets.iter().all(|r| is_bearer(r)), "{seen:#?}");
    assert!(ctd.is_unpacked_in(CRI_NAMESPACE, &reference).await.unwrap());
}

/// The requests a [`SpyProxy`] saw inside the tunnels to `host`.
fn tunnelled<'a>(seen: &'a [ProxiedRequest], host: &str) -> Vec<&'a RecordedRequest> {
    let tunnel = format!("{host}:443");
    seen.iter()
        .filter(|p| p.tunnel.as_deref() == Some(tunnel.as_str()))
        .map(|p| &p.request)
        .collect()
}

/// Intercept mode's dance, seen by a TLS-terminating proxy in the daemon's HTTPS_PROXY: the
/// registry's challenge, the token fetched from an https realm through a tunnel of its own,
/// Bearer on the blob GETs. A loopback realm is fetched directly, never through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_an_https_proxy_the_token_is_fetched_through_a_tunnel_to_the_realm() {
    let work = tempfile::tempdir().unwrap();
    let realm = format!("https://{REALM_HOST}/token");
    let (tokens, image, registry) = token_registry(work.path(), Some(&realm)).await;
    // The same storage, with the token service's loopback realm.
    let loopback_realm = Registry::start_with(
        RegistryOptions {
            token: Some(tokens.token_auth(work.path())),
            ..RegistryOptions::default()
        },
        Some(registry.storage_dir()),
    )
    .await
    .unwrap();
    let ca = TestCa::new();
    let ca_pem = ca.write_ca(work.path());
    let loopback_host = "loopback-realm.test.invalid";
    let proxy = SpyProxy::start(
        &ca,
        &[
            (PROXIED, registry.addr()),
            (REALM_HOST, tokens.addr()),
            (loopback_host, loopback_realm.addr()),
        ],
    )
    .await
    .unwrap();
    let certs = tempfile::tempdir().unwrap();
    let ctd = Containerd::start_with(ContainerdOptions {
        env: containerd::proxy_env(&proxy.url(), &ca_pem),
        ..ContainerdOptions::cri(certs.path())
    })
    .await
    .unwrap();
    let cri = ctd.cri().await.unwrap();
    let reference = image.reference(PROXIED);

    // No secret: the anonymous token request goes through the realm's tunnel, and is refused.
    assert_refusal(cri.pull_image(&reference, None).await, ANONYMOUS_REFUSAL);
    let seen = proxy.requests();
    let at_realm = tunnelled(&seen, REALM_HOST);
    assert_eq!(at_realm.len(), 1, "{seen:#?}");
    assert_eq!(at_realm[0].method, "GET");
    assert_eq!(
        at_realm[0].target,
        "/token?scope=repository%3Ateam%2Fapp%3Apull&service=pullcache-test-registry"
    );
    assert_eq!(at_realm[0].header("authorization"), None);

    let before = proxy.requests().len();
    cri.pull_image(&reference, Some(&alice())).await.unwrap();
    assert!(ctd.is_unpacked_in(CRI_NAMESPACE, &reference).await.unwrap());
    let seen = &proxy.requests()[before..];
    for connect in seen.iter().filter(|p| p.tunnel.is_none()) {
        let r = &connect.request;
        assert_eq!(r.method, "CONNECT", "{r:?}");
        assert!(
            r.target == format!("{PROXIED}:443") || r.target == format!("{REALM_HOST}:443"),
            "{r:?}"
        );
        let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["host", "user-agent"], "{r:?}");
        assert_eq!(r.header("user-agent"), Some("Go-http-client/1.1"));
    }
    let at_registry = tunnelled(seen, PROXIED);
    assert!(
        at_registry
            .iter()
            .all(|r| r.header("host") == Some(PROXIED) && r.query().is_none()),
        "{at_registry:#?}"
    );
    // The dance: the tag HEAD is challenged, then carries the token.
    assert_eq!(
        (at_registry[0].method.as_str(), at_registry[0].target.as_str()),
        ("HEAD", "/v2/team/app/manifests/v1")
    );
    assert_eq!(at_registry[0].header("authorization"), None);
    assert_eq!(at_registry[1].target, at_registry[0].target);
    assert!(is_bearer(at_registry[1]), "{at_registry:#?}");
    // The manifest GET starts without a token again (a fetcher of its own), is challenged and
    // fetches a second one; blob GETs carry it from the start.
    let manifest_gets: Vec<_> = at_registry
        .iter()
        .filter(|r| r.method == "GET" && r.path().contains("/manifests/"))
        .collect();
    assert_eq!(manifest_gets.len(), 2, "{at_registry:#?}");
    assert!(manifest_gets[0].header("authorization").is_none() && is_bearer(manifest_gets[1]));
    let blob_gets: Vec<_> = at_registry.iter().filter(|r| r.path().contains("/blobs/")).collect();
    assert_eq!(blob_gets.len(), 2, "{at_registry:#?}");
    assert!(blob_gets.iter().all(|r| is_bearer(r)), "{at_registry:#?}");
    let at_realm = tunnelled(seen, REALM_HOST);
    assert_eq!(at_realm.len(), 2, "{seen:#?}");
    assert!(
        at_realm
            .iter()
            .all(|r| r.method == "POST" && r.target == "/token" && r.header("authorization").is_none()),
        "{at_realm:#?}"
    );
    assert_password_grants(&tokens.requests()[1..]);

    // A loopback realm (http://127.0.0.1:PORT/token): Go never proxies loopback, so the token
    // fetch skips the proxy and only the registry's tunnel is seen.
    let (proxy_before, tokens_before) = (proxy.requests().len(), tokens.request_count());
    let reference = image.reference(loopback_host);
    cri.pull_image(&reference, Some(&alice())).await.unwrap();
    let seen = &proxy.requests()[proxy_before..];
    assert!(
        seen.iter()
            .filter(|p| p.tunnel.is_none())
            .all(|p| p.request.target == format!("{loopback_host}:443")),
        "{seen:#?}"
    );
    assert_password_grants(&tokens.requests()[tokens_before..]);
    assert!(tunnelled(seen, loopback_host).iter().any(|r| is_bearer(r)));
}
