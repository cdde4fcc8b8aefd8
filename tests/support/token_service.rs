//! A Docker token service (`auth.token` issuer) whose ES256 JWTs the real distribution registry accepts.
//!
//! Verified against distribution 2.8.2 (tests/harness/auth.rs, plus skopeo as a
//! third-party client):
//! * The registry verifies the JWS header's `x5c` chain (standard base64 DER,
//!   leaf first) against `rootcertbundle`; a self-signed leaf that is itself
//!   in the bundle is enough. (Without `x5c` it would look up `kid` as a
//!   libtrust key ID instead; we always send `x5c`.)
//! * ES256 signatures must be raw `r||s` (64 bytes), what ring's
//!   `ECDSA_P256_SHA256_FIXED_SIGNING` produces.
//! * Claims checked: `iss` == `auth.token.issuer`, `aud` == `auth.token.service`
//!   (a JSON string: 2.8 rejects an array), `exp`/`nbf` with 60 s leeway, and
//!   `access` must cover what the request needs (`/v2/` needs none).
//! * Anonymous requests get `401` with
//!   `WWW-Authenticate: Bearer realm="..",service="..",scope="repository:NAME:pull"`
//!   (no `scope` on `/v2/`).
//!
//! Endpoints (only `/token`):
//! * `GET /token?service=S&scope=repository:NAME:pull[&scope=..]` with optional
//!   `Authorization: Basic ..` → `{"token","access_token","expires_in","issued_at"}`
//!   (+ `refresh_token` if `offline_token=true` and authenticated). Wrong
//!   credentials → 401; no credentials → 401 unless anonymous is allowed.
//! * `POST /token` form (OAuth2, what clients with an identity token use):
//!   `grant_type=password` (`username`, `password`) or `grant_type=refresh_token`
//!   (`refresh_token`) → `{"access_token","expires_in","issued_at","scope"}`
//!   (+ `refresh_token`); unknown refresh token or bad password → 401
//!   `{"error":"invalid_grant"}`; other grant types → 400.
//!
//! Grants: only `pull` on `repository` scopes, to anyone who authenticated (or
//! to anonymous when allowed).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::registry::TokenAuth;

pub const SERVICE: &str = "pullcache-test-registry";
pub const ISSUER: &str = "pullcache-test-token-issuer";
pub const DEFAULT_EXPIRES_IN: i64 = 300;

/// One request the service received, in arrival order.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub method: String,
    pub path: String,
    /// Raw query string (without `?`), empty if none.
    pub query: String,
    pub authorization: Option<String>,
    /// Raw body of a POST (the urlencoded form).
    pub form: Option<String>,
}

impl TokenRequest {
    /// All values of `name` in the query string, then in the form.
    pub fn params(&self, name: &str) -> Vec<String> {
        let form = self.form.as_deref().unwrap_or("");
        [self.query.as_str(), form]
            .into_iter()
            .flat_map(|s| form_urlencoded::parse(s.as_bytes()))
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .collect()
    }

    /// The first value of `name` (query, then form).
    pub fn param(&self, name: &str) -> Option<String> {
        self.params(name).into_iter().next()
    }

    /// User name from `Authorization: Basic` (None if absent or not Basic).
    pub fn basic_user(&self) -> Option<String> {
        parse_basic(self.authorization.as_deref()?).map(|(u, _)| u)
    }
}

struct Signer {
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    cert_pem: String,
}

struct State {
    users: HashMap<String, String>,
    allow_anonymous: bool,
    /// When set, `pull` only on the repositories listed for a subject ("" is anonymous);
    /// otherwise on every repository.
    access: Mutex<Option<HashMap<String, Vec<String>>>>,
    /// refresh token → subject
    refresh_tokens: Mutex<HashMap<String, String>>,
    expires_in: AtomicI64,
    requests: Mutex<Vec<TokenRequest>>,
    signer: Signer,
    rng: SystemRandom,
}

/// The running token service; stops on drop.
pub struct TokenService {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl TokenService {
    /// Serve on `127.0.0.1:<ephemeral>`. `users` are `(name, password)`;
    /// `allow_anonymous` lets requests without credentials get pull tokens.
    pub async fn start(users: &[(&str, &str)], allow_anonymous: bool) -> Result<TokenService> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow!("generating token signing key"))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|e| anyhow!("loading token signing key: {e}"))?;
        let cert_key = rcgen::KeyPair::try_from(pkcs8.as_ref()).context("rcgen key from PKCS#8")?;
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "pullcache test token signer");
        params.distinguished_name = dn;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&cert_key).context("self-signing token cert")?;
        let signer = Signer {
            key,
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
        };
        let state = Arc::new(State {
            users: users.iter().map(|(u, p)| (u.to_string(), p.to_string())).collect(),
            allow_anonymous,
            access: Mutex::new(None),
            refresh_tokens: Mutex::new(HashMap::new()),
            expires_in: AtomicI64::new(DEFAULT_EXPIRES_IN),
            requests: Mutex::new(Vec::new()),
            signer,
            rng,
        });

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding token service")?;
        let addr = listener.local_addr()?;
        let served = state.clone();
        let task = tokio::spawn(async move {
            // Dropping the JoinSet (when this task is aborted) aborts all connections.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let state = served.clone();
                        conns.spawn(async move {
                            let svc = service_fn(move |req| handle(state.clone(), req));
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(TokenService { addr, state, task })
    }

    /// From now on `subject` ("" for anonymous) gets `pull` only on `repositories`, and a
    /// subject never named gets nothing: per-user access, as a real token service has it.
    pub fn grant_only(&self, subject: &str, repositories: &[&str]) {
        let mut access = self.state.access.lock().unwrap();
        access.get_or_insert_with(HashMap::new).insert(
            subject.to_owned(),
            repositories.iter().map(|r| (*r).to_owned()).collect(),
        );
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/token`
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn service(&self) -> String {
        SERVICE.to_string()
    }

    pub fn issuer(&self) -> String {
        ISSUER.to_string()
    }

    /// PEM of the certificate whose key signs the tokens.
    pub fn signing_cert_pem(&self) -> String {
        self.state.signer.cert_pem.clone()
    }

    /// Writes the signing certificate to `dir/token-rootcertbundle.pem`.
    pub fn write_rootcertbundle(&self, dir: &Path) -> PathBuf {
        let path = dir.join("token-rootcertbundle.pem");
        std::fs::write(&path, &self.state.signer.cert_pem)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// Registry `auth.token` settings trusting this service (writes the
    /// bundle into `dir`).
    pub fn token_auth(&self, dir: &Path) -> TokenAuth {
        TokenAuth {
            realm: self.realm(),
            service: self.service(),
            issuer: self.issuer(),
            rootcertbundle: self.write_rootcertbundle(dir),
        }
    }

    /// Accept `token` as an OAuth2 refresh token (`grant_type=refresh_token`)
    /// for `subject`. Builder style: `TokenService::start(..).await?.with_refresh_token(..)`.
    pub fn with_refresh_token(self, token: &str, subject: &str) -> TokenService {
        self.add_refresh_token(token, subject);
        self
    }

    /// Like [`TokenService::with_refresh_token`] on a shared reference.
    pub fn add_refresh_token(&self, token: &str, subject: &str) {
        self.state
            .refresh_tokens
            .lock()
            .unwrap()
            .insert(token.to_string(), subject.to_string());
    }

    /// Lifetime of tokens issued from now on (`expires_in` and `exp - iat`).
    pub fn set_expires_in(&self, secs: i64) {
        self.state.expires_in.store(secs, Ordering::Relaxed);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// A pull token for `user` on `repository`, as containerd gets one with a pod's secret:
    /// `Authorization: Bearer ...`.
    pub async fn pull_token(&self, (user, password): (&str, &str), repository: &str) -> Result<String> {
        let resp = super::http_client()
            .get(format!(
                "{}?service={}&scope=repository:{repository}:pull",
                self.realm(),
                self.service()
            ))
            .basic_auth(user, Some(password))
            .send()
            .await?;
        anyhow::ensure!(resp.status() == 200, "token for {user}: {}", resp.status());
        let body: Value = resp.json().await?;
        Ok(format!("Bearer {}", body["token"].as_str().unwrap_or_default()))
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// A signed token for `subject` granting exactly `scopes` (e.g.
    /// `repository:team/app:pull`), valid for `expires_in` seconds from now.
    /// A negative value gives an already expired token (the registry allows
    /// 60 s of leeway, so use < -60 to have it rejected).
    pub fn mint_token(&self, subject: &str, scopes: &[&str], expires_in: i64) -> String {
        let access: Vec<Value> = scopes
            .iter()
            .filter_map(|s| parse_scope(s))
            .map(|(ty, name, actions)| json!({"type": ty, "name": name, "actions": actions}))
            .collect();
        sign_jwt(&self.state, subject, access, unix_now(), expires_in)
    }
}

impl Drop for TokenService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Resp = Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: Value) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn unauthorized(message: &str) -> Resp {
    let mut resp = json_response(
        StatusCode::UNAUTHORIZED,
        json!({"errors": [{"code": "UNAUTHORIZED", "message": message}]}),
    );
    resp.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static("Basic realm=\"pullcache-test-token\""),
    );
    resp
}

fn oauth_error(status: StatusCode, error: &str) -> Resp {
    json_response(status, json!({"error": error}))
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let form = if method == Method::POST {
        match req.into_body().collect().await {
            Ok(body) => Some(String::from_utf8_lossy(&body.to_bytes()).into_owned()),
            Err(_) => return Ok(oauth_error(StatusCode::BAD_REQUEST, "invalid_request")),
        }
    } else {
        None
    };
    let recorded = TokenRequest {
        method: method.to_string(),
        path: path.clone(),
        query,
        authorization,
        form,
    };
    state.requests.lock().unwrap().push(recorded.clone());

    if path != "/token" {
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            json!({"errors": [{"code": "NOT_FOUND"}]}),
        ));
    }
    if let Some(service) = recorded.param("service")
        && service != SERVICE
    {
        return Ok(json_response(
            StatusCode::BAD_REQUEST,
            json!({"errors": [{"code": "INVALID_SERVICE", "message": format!("unknown service {service:?}")}]}),
        ));
    }
    let resp = match method {
        Method::GET => get_token(&state, &recorded),
        Method::POST => post_token(&state, &recorded),
        _ => json_response(StatusCode::METHOD_NOT_ALLOWED, json!({})),
    };
    Ok(resp)
}

/// Docker token flow: GET with optional Basic credentials.
fn get_token(state: &State, req: &TokenRequest) -> Resp {
    let subject = match req.authorization.as_deref() {
        Some(auth) => match parse_basic(auth) {
            Some((user, pass)) if state.users.get(&user) == Some(&pass) => user,
            Some(_) => return unauthorized("invalid username or password"),
            None => return unauthorized("only Basic credentials are accepted"),
        },
        None if state.allow_anonymous => String::new(),
        None => return unauthorized("authentication required"),
    };
    let scopes = req.params("scope");
    let now = unix_now();
    let expires_in = state.expires_in.load(Ordering::Relaxed);
    let token = sign_jwt(state, &subject, grant(state, &subject, &scopes), now, expires_in);
    let mut body = json!({
        "token": token,
        "access_token": token,
        "expires_in": expires_in,
        "issued_at": rfc3339(now),
    });
    if !subject.is_empty() && req.param("offline_token").as_deref() == Some("true") {
        body["refresh_token"] = json!(new_refresh_token(state, &subject));
    }
    json_response(StatusCode::OK, body)
}

/// OAuth2 flow: POST form with `grant_type=password|refresh_token`.
fn post_token(state: &State, req: &TokenRequest) -> Resp {
    let grant_type = req.param("grant_type").unwrap_or_default();
    let (subject, refresh) = match grant_type.as_str() {
        "password" => {
            let user = req.param("username").unwrap_or_default();
            let pass = req.param("password").unwrap_or_default();
            if state.users.get(&user) != Some(&pass) {
                return oauth_error(StatusCode::UNAUTHORIZED, "invalid_grant");
            }
            let refresh =
                (req.param("access_type").as_deref() == Some("offline")).then(|| new_refresh_token(state, &user));
            (user, refresh)
        }
        "refresh_token" => {
            let token = req.param("refresh_token").unwrap_or_default();
            let known = state.refresh_tokens.lock().unwrap().get(&token).cloned();
            match known {
                Some(subject) => (subject, Some(token)),
                None => return oauth_error(StatusCode::UNAUTHORIZED, "invalid_grant"),
            }
        }
        _ => return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type"),
    };
    // OAuth2 scopes are space-separated; also accept repeated `scope` fields.
    let scopes: Vec<String> = req
        .params("scope")
        .iter()
        .flat_map(|s| s.split(' ').filter(|s| !s.is_empty()).map(str::to_string))
        .collect();
    let now = unix_now();
    let expires_in = state.expires_in.load(Ordering::Relaxed);
    let token = sign_jwt(state, &subject, grant(state, &subject, &scopes), now, expires_in);
    let mut body = json!({
        "access_token": token,
        "expires_in": expires_in,
        "issued_at": rfc3339(now),
        "scope": scopes.join(" "),
    });
    if let Some(refresh) = refresh {
        body["refresh_token"] = json!(refresh);
    }
    json_response(StatusCode::OK, body)
}

/// The `access` claim: `pull` (only) on every requested repository scope `subject` may read.
fn grant(state: &State, subject: &str, scopes: &[String]) -> Vec<Value> {
    let access = state.access.lock().unwrap();
    let allowed = |name: &str| match &*access {
        None => true,
        Some(access) => access.get(subject).is_some_and(|repos| repos.iter().any(|r| r == name)),
    };
    scopes
        .iter()
        .filter_map(|s| parse_scope(s))
        .filter(|(ty, _, _)| ty == "repository")
        .map(|(ty, name, actions)| {
            let granted: &[&str] = if actions.iter().any(|a| a == "pull") && allowed(&name) {
                &["pull"]
            } else {
                &[]
            };
            json!({"type": ty, "name": name, "actions": granted})
        })
        .collect()
}

/// `type:name:action1,action2` (the name may contain `:` e.g. for a host port).
fn parse_scope(scope: &str) -> Option<(String, String, Vec<String>)> {
    let (ty, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let actions = actions
        .split(',')
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect();
    Some((ty.to_string(), name.to_string(), actions))
}

/// `(user, password)` from `Basic base64(user:password)`.
fn parse_basic(header: &str) -> Option<(String, String)> {
    let (scheme, value) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(value.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_string(), pass.to_string()))
}

fn random_hex(state: &State, len: usize) -> String {
    let mut buf = vec![0u8; len];
    state.rng.fill(&mut buf).expect("system random");
    hex::encode(buf)
}

fn new_refresh_token(state: &State, subject: &str) -> String {
    let token = format!("refresh-{}", random_hex(state, 16));
    state
        .refresh_tokens
        .lock()
        .unwrap()
        .insert(token.clone(), subject.to_string());
    token
}

fn sign_jwt(state: &State, subject: &str, access: Vec<Value>, now: i64, expires_in: i64) -> String {
    let header = json!({
        "typ": "JWT",
        "alg": "ES256",
        "x5c": [STANDARD.encode(&state.signer.cert_der)],
    });
    let claims = json!({
        "iss": ISSUER,
        "sub": subject,
        "aud": SERVICE,
        "exp": now + expires_in,
        "nbf": now,
        "iat": now,
        "jti": random_hex(state, 16),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = state
        .signer
        .key
        .sign(&state.rng, signing_input.as_bytes())
        .expect("ES256 signing");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time (UTC).
pub fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Decodes a JWT's claims (no verification): for assertions in tests.
pub fn jwt_claims(token: &str) -> Result<Value> {
    let payload = token.split('.').nth(1).context("JWT without payload")?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).context("JWT payload base64")?;
    serde_json::from_slice(&bytes).context("JWT payload JSON")
}

/// The tenants of the private-image tests: pullcache's own user, and alice and bob, who each
/// read one repository of their own.
pub const CACHE_USER: (&str, &str) = ("cache", "cache-pw");
pub const ALICE: (&str, &str) = ("alice", "alice-pw");
pub const BOB: (&str, &str) = ("bob", "bob-pw");

/// A token service for [`CACHE_USER`], [`ALICE`] and [`BOB`]: alice reads `team-a/app`, bob
/// `team-b/app`, pullcache's user `cache_reads`, and anonymous clients `anyone_reads`.
pub async fn tenants(cache_reads: &[&str], anyone_reads: &[&str]) -> Result<TokenService> {
    let tokens = TokenService::start(&[CACHE_USER, ALICE, BOB], true).await?;
    tokens.grant_only(CACHE_USER.0, cache_reads);
    tokens.grant_only(ALICE.0, &["team-a/app"]);
    tokens.grant_only(BOB.0, &["team-b/app"]);
    tokens.grant_only("", anyone_reads);
    Ok(tokens)
}
