//! The upstream TLS, basic auth and token auth helpers (`support::tls`, `support::htpasswd`,
//! `support::token_service`, `support::registry`'s options) against the real distribution
//! registry, curl and skopeo: what distribution accepts is what pullcache's tests can rely on.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;

use crate::support;
use crate::support::htpasswd;
use crate::support::images::{self, PushedImage, sha256_digest};
use crate::support::registry::{BASIC_REALM, Registry, RegistryOptions};
use crate::support::tls::TestCa;
use crate::support::token_service::{self, TokenService};

const REPO: &str = "team/app";
const TAG: &str = "v1";

/// Pushes `team/app:v1` through a plain registry on `storage`, then stops it.
async fn push_to_storage(storage: &Path) -> PushedImage {
    let mut plain = Registry::start_with(RegistryOptions::default(), Some(storage.to_path_buf()))
        .await
        .expect("plain registry");
    let img = images::push_oci_image(&plain.url(), REPO, TAG, &[64 * 1024])
        .await
        .expect("push");
    plain.stop().await;
    img
}

struct CurlResult {
    /// curl's exit code (0 = transfer done, whatever the HTTP status).
    exit: i32,
    status: u16,
    headers: String,
    body: Vec<u8>,
    stderr: String,
}

impl CurlResult {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// `curl -s [args] url`, capturing status, headers and body.
async fn curl(dir: &Path, args: &[&str], url: &str) -> CurlResult {
    let headers_path = dir.join("curl-headers");
    let body_path = dir.join("curl-body");
    let _ = std::fs::remove_file(&headers_path);
    let _ = std::fs::remove_file(&body_path);
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-S", "--noproxy", "*", "--max-time", "20"])
        .arg("-D")
        .arg(&headers_path)
        .arg("-o")
        .arg(&body_path)
        .args(["-w", "%{http_code}"])
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running curl");
    CurlResult {
        exit: out.status.code().unwrap_or(-1),
        status: String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0),
        headers: std::fs::read_to_string(&headers_path).unwrap_or_default(),
        body: std::fs::read(&body_path).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `skopeo inspect <args> docker://<reference>`; returns (success, stdout, stderr).
async fn skopeo_inspect(args: &[&str], reference: &str) -> (bool, String, String) {
    let out = tokio::process::Command::new("skopeo")
        .arg("inspect")
        .args(["--retry-times", "0"])
        .args(args)
        .arg(format!("docker://{reference}"))
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env("REGISTRY_AUTH_FILE", "/nonexistent/pullcache-test-auth.json")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running skopeo");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn manifest_accept() -> String {
    format!("Accept: {}", images::OCI_MANIFEST)
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_basic_registry_serves_shared_storage() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let storage = dir.join("storage");
    let img = push_to_storage(&storage).await;

    let ca = TestCa::new();
    let ca_path = ca.write_ca(dir);
    let (cert, key) = ca.issue_server(dir, &["127.0.0.1", "localhost"]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key file mode");
    // One user per bcrypt prefix: which ones does distribution 2.8 accept?
    let users = ["user2y", "user2b", "user2a"];
    let lines = vec![
        htpasswd::htpasswd_entry_with("user2y", "pw-secret", bcrypt::Version::TwoY),
        htpasswd::htpasswd_entry_with("user2b", "pw-secret", bcrypt::Version::TwoB),
        htpasswd::htpasswd_entry_with("user2a", "pw-secret", bcrypt::Version::TwoA),
    ];
    assert!(lines[0].contains(":$2y$04$"), "{}", lines[0]);
    assert!(lines[1].contains(":$2b$04$"), "{}", lines[1]);
    assert!(lines[2].contains(":$2a$04$"), "{}", lines[2]);
    let htpasswd_path = htpasswd::write_htpasswd_lines(dir, &lines).unwrap();

    let opts = RegistryOptions {
        tls: Some((cert, key)),
        htpasswd: Some(htpasswd_path),
        ..RegistryOptions::default()
    };
    let mut reg = Registry::start_with(opts, Some(storage.clone()))
        .await
        .expect("TLS + htpasswd registry");
    assert!(reg.is_tls());
    assert_eq!(reg.url(), format!("https://{}", reg.addr()));
    assert_eq!(reg.storage_dir(), storage);
    let cacert = ca_path.to_str().unwrap();
    let v2 = format!("{}/v2/", reg.url());

    // Anonymous: 401 with a Basic challenge.
    let r = curl(dir, &["--cacert", cacert], &v2).await;
    assert_eq!((r.exit, r.status), (0, 401), "{}", r.stderr);
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some(format!("Basic realm=\"{BASIC_REALM}\"").as_str())
    );
    // Wrong password: 401.
    let r = curl(dir, &["--cacert", cacert, "-u", "user2y:wrong"], &v2).await;
    assert_eq!((r.exit, r.status), (0, 401), "{}", r.stderr);
    // Every bcrypt prefix works; manifest and blobs come back byte-exact.
    let manifest_url = format!("{}/v2/{REPO}/manifests/{TAG}", reg.url());
    for user in users {
        let creds = format!("{user}:pw-secret");
        let r = curl(dir, &["--cacert", cacert, "-u", &creds], &v2).await;
        assert_eq!((r.exit, r.status), (0, 200), "{user}: {}", r.stderr);
        let accept = manifest_accept();
        let args = ["--cacert", cacert, "-u", &creds, "-H", &accept];
        let r = curl(dir, &args, &manifest_url).await;
        assert_eq!((r.exit, r.status), (0, 200), "{user}: {}", r.stderr);
        assert_eq!(r.body, img.manifest.as_ref());
    }
    for blob in &img.blobs {
        let url = format!("{}/v2/{REPO}/blobs/{}", reg.url(), blob.digest);
        let r = curl(dir, &["--cacert", cacert, "-u", "user2y:pw-secret", "-L"], &url).await;
        assert_eq!((r.exit, r.status), (0, 200), "{}", r.stderr);
        assert_eq!(sha256_digest(&r.body), blob.digest);
    }
    // The DNS SAN verifies too.
    let localhost_v2 = format!("https://localhost:{}/v2/", reg.addr().port());
    let r = curl(dir, &["--cacert", cacert, "-u", "user2b:pw-secret"], &localhost_v2).await;
    assert_eq!((r.exit, r.status), (0, 200), "{}", r.stderr);
    // Without our CA, curl refuses the certificate (exit 60).
    let r = curl(dir, &["-u", "user2y:pw-secret"], &v2).await;
    assert_eq!(r.exit, 60, "expected a certificate error, got {}", r.stderr);

    // skopeo (containers/image) trusts `*.crt` in --cert-dir.
    let cert_dir = dir.join("certs.d");
    std::fs::create_dir(&cert_dir).unwrap();
    std::fs::write(cert_dir.join("ca.crt"), ca.ca_pem()).unwrap();
    let reference = img.reference(&reg.host());
    let cert_dir_s = cert_dir.to_str().unwrap();
    let (ok, out, err) = skopeo_inspect(&["--cert-dir", cert_dir_s, "--creds", "user2a:pw-secret"], &reference).await;
    assert!(ok, "skopeo over TLS + basic failed: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Digest"], img.manifest_digest.as_str());
    let (ok, _, _) = skopeo_inspect(&["--cert-dir", cert_dir_s, "--creds", "user2a:nope"], &reference).await;
    assert!(!ok, "skopeo with a wrong password must fail");

    // Settling works over TLS with auth (the marker's 401 is logged, and hidden).
    let before = reg.access_log().len();
    reg.settle().await.expect("a TLS registry with auth settles");
    assert_eq!(reg.access_log().len(), before);

    // restart keeps TLS and auth, on the same port.
    let port = reg.addr().port();
    reg.restart().await.expect("restart");
    assert_eq!(reg.addr().port(), port);
    let r = curl(dir, &["--cacert", cacert, "-u", "user2y:pw-secret"], &v2).await;
    assert_eq!((r.exit, r.status), (0, 200), "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn htpasswd_works_over_plain_http() {
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage");
    let img = push_to_storage(&storage).await;
    let path = htpasswd::write_htpasswd(work.path(), &[("alice", "pw")]).unwrap();
    let opts = RegistryOptions {
        htpasswd: Some(path),
        ..Default::default()
    };
    let reg = Registry::start_with(opts, Some(storage)).await.unwrap();
    let url = format!("{}/v2/{REPO}/manifests/{TAG}", reg.url());
    let client = support::http_client();
    let resp = client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = client
        .get(&url)
        .basic_auth("alice", Some("pw"))
        .header("accept", images::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), img.manifest);
}

async fn fetch_token(ts: &TokenService, creds: Option<(&str, &str)>, scope: &str) -> (u16, Value) {
    let mut req = support::http_client()
        .get(ts.realm())
        .query(&[("service", ts.service().as_str()), ("scope", scope)]);
    if let Some((u, p)) = creds {
        req = req.basic_auth(u, Some(p));
    }
    let resp = req.send().await.expect("token request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn post_token(ts: &TokenService, form: &[(&str, &str)]) -> (u16, Value) {
    let body: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let resp = support::http_client()
        .post(ts.realm())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("token POST");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// GET `url` on the registry with an optional bearer token: (status, WWW-Authenticate, body).
async fn get_bearer(url: &str, token: Option<&str>) -> (u16, Option<String>, bytes::Bytes) {
    let mut req = support::http_client().get(url).header("accept", images::OCI_MANIFEST);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("registry GET");
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    (status, challenge, resp.bytes().await.unwrap())
}

async fn token_registry(ts: &TokenService, dir: &Path, storage: PathBuf) -> Registry {
    let opts = RegistryOptions {
        token: Some(ts.token_auth(dir)),
        ..Default::default()
    };
    Registry::start_with(opts, Some(storage)).await.expect("token registry")
}

#[tokio::test(flavor = "multi_thread")]
async fn token_registry_accepts_service_tokens() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let storage = dir.join("storage");
    let img = push_to_storage(&storage).await;
    let ts = TokenService::start(&[("alice", "s3cret")], false)
        .await
        .unwrap()
        .with_refresh_token("fixed-refresh-token", "alice");
    let reg = token_registry(&ts, dir, storage).await;
    let realm = ts.realm();
    let service = ts.service();
    let scope = format!("repository:{REPO}:pull");
    let v2 = format!("{}/v2/", reg.url());
    let manifest_url = format!("{}/v2/{REPO}/manifests/{TAG}", reg.url());

    // Anonymous: 401 with the Bearer challenge.
    let (status, challenge, _) = get_bearer(&v2, None).await;
    assert_eq!(status, 401);
    assert_eq!(
        challenge.as_deref(),
        Some(format!("Bearer realm=\"{realm}\",service=\"{service}\"").as_str())
    );
    let (status, challenge, _) = get_bearer(&manifest_url, None).await;
    assert_eq!(status, 401);
    assert_eq!(
        challenge.as_deref(),
        Some(format!("Bearer realm=\"{realm}\",service=\"{service}\",scope=\"{scope}\"").as_str())
    );

    // Token service: wrong password and anonymous are refused.
    let (status, _) = fetch_token(&ts, Some(("alice", "wrong")), &scope).await;
    assert_eq!(status, 401);
    let (status, _) = fetch_token(&ts, None, &scope).await;
    assert_eq!(status, 401);
    let (status, body) = fetch_token(&ts, Some(("alice", "s3cret")), &scope).await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap().to_string();
    assert_eq!(body["access_token"], token.as_str());
    assert_eq!(body["expires_in"], 300);
    let issued_at = body["issued_at"].as_str().unwrap();
    assert!(issued_at.len() == 20 && issued_at.ends_with('Z'), "{issued_at}");
    let claims = token_service::jwt_claims(&token).unwrap();
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["aud"], service.as_str());
    assert_eq!(claims["access"][0]["name"], REPO);
    assert_eq!(claims["access"][0]["actions"][0], "pull");

    // The registry accepts the token.
    let (status, _, _) = get_bearer(&v2, Some(&token)).await;
    assert_eq!(status, 200);
    let (status, _, body) = get_bearer(&manifest_url, Some(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(body, img.manifest);
    for blob in &img.blobs {
        let url = format!("{}/v2/{REPO}/blobs/{}", reg.url(), blob.digest);
        let (status, _, body) = get_bearer(&url, Some(&token)).await;
        assert_eq!(status, 200);
        assert_eq!(sha256_digest(&body), blob.digest);
    }

    // ... and really verifies it: wrong scope, expired, tampered, untrusted signer are refused.
    let other = ts.mint_token("alice", &["repository:team/other:pull"], 300);
    let (status, challenge, _) = get_bearer(&manifest_url, Some(&other)).await;
    assert_eq!(status, 401);
    assert!(
        challenge
            .as_deref()
            .is_some_and(|c| c.ends_with(",error=\"insufficient_scope\"")),
        "{challenge:?}"
    );
    let expired = ts.mint_token("alice", &[&scope], -120);
    assert_eq!(get_bearer(&manifest_url, Some(&expired)).await.0, 401);
    let minted = ts.mint_token("alice", &[&scope], 300);
    assert_eq!(get_bearer(&manifest_url, Some(&minted)).await.0, 200);
    // Same signature, claims changed (another repository granted).
    let parts: Vec<&str> = minted.split('.').collect();
    let mut claims = token_service::jwt_claims(&minted).unwrap();
    claims["access"][0]["name"] = "team/other".into();
    use base64::Engine;
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
    let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
    let other_url = format!("{}/v2/team/other/manifests/{TAG}", reg.url());
    assert_eq!(get_bearer(&other_url, Some(&tampered)).await.0, 401);
    // (A genuine token for that repository gets past auth: 404, no such manifest.)
    let genuine = ts.mint_token("alice", &["repository:team/other:pull"], 300);
    assert_eq!(get_bearer(&other_url, Some(&genuine)).await.0, 404);
    let foreign = TokenService::start(&[], true).await.unwrap();
    let untrusted = foreign.mint_token("alice", &[&scope], 300);
    assert_eq!(get_bearer(&manifest_url, Some(&untrusted)).await.0, 401);

    // OAuth2 POST: refresh_token and password grants.
    let svc = service.as_str();
    let (status, body) = post_token(
        &ts,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", "fixed-refresh-token"),
            ("service", svc),
            ("client_id", "pullcache-test"),
            ("scope", &scope),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["refresh_token"], "fixed-refresh-token");
    let access = body["access_token"].as_str().unwrap();
    assert_eq!(get_bearer(&manifest_url, Some(access)).await.0, 200);
    let (status, body) = post_token(
        &ts,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", "unknown"),
            ("service", svc),
            ("scope", &scope),
        ],
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_grant");
    let (status, body) = post_token(
        &ts,
        &[
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", "s3cret"),
            ("access_type", "offline"),
            ("service", svc),
            ("scope", &scope),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let issued_refresh = body["refresh_token"].as_str().unwrap().to_string();
    let (status, body) = post_token(
        &ts,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &issued_refresh),
            ("service", svc),
            ("scope", &scope),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let access = body["access_token"].as_str().unwrap();
    assert_eq!(get_bearer(&manifest_url, Some(access)).await.0, 200);

    // skopeo as a third-party client: Basic to the token service, Bearer to the registry.
    let before = ts.request_count();
    let reference = img.reference(&reg.host());
    let (ok, out, err) = skopeo_inspect(&["--tls-verify=false", "--creds", "alice:s3cret"], &reference).await;
    assert!(ok, "skopeo against the token registry failed: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Digest"], img.manifest_digest.as_str());
    let skopeo_requests = &ts.requests()[before..];
    assert!(
        skopeo_requests
            .iter()
            .any(|r| r.method == "GET" && r.basic_user().as_deref() == Some("alice")),
        "{skopeo_requests:?}"
    );
    let (ok, _, _) = skopeo_inspect(&["--tls-verify=false", "--creds", "alice:bad"], &reference).await;
    assert!(!ok, "skopeo with a wrong password must fail");
}

#[tokio::test(flavor = "multi_thread")]
async fn token_service_anonymous_pull() {
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("storage");
    let img = push_to_storage(&storage).await;
    let ts = TokenService::start(&[("alice", "s3cret")], true).await.unwrap();
    let reg = token_registry(&ts, work.path(), storage).await;
    let scope = format!("repository:{REPO}:pull");
    let (status, body) = fetch_token(&ts, None, &scope).await;
    assert_eq!(status, 200, "{body}");
    let claims = token_service::jwt_claims(body["token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["sub"], "");
    let manifest_url = format!("{}/v2/{REPO}/manifests/{TAG}", reg.url());
    let (status, _, manifest) = get_bearer(&manifest_url, body["token"].as_str()).await;
    assert_eq!(status, 200);
    assert_eq!(manifest, img.manifest);
    // Credentials, if sent, are still checked.
    assert_eq!(fetch_token(&ts, Some(("alice", "bad")), &scope).await.0, 401);
    // skopeo without credentials goes the anonymous way.
    let (ok, out, err) = skopeo_inspect(&["--tls-verify=false", "--no-creds"], &img.reference(&reg.host())).await;
    assert!(ok, "anonymous skopeo failed: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Digest"], img.manifest_digest.as_str());
}

#[test]
fn rfc3339_formats_utc() {
    assert_eq!(token_service::rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(token_service::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(token_service::rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
}
