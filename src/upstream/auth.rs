//! Registry auth: answering a 401. A `WWW-Authenticate: Bearer` challenge gets a pull token
//! from its realm (anonymously, with Basic credentials, or by exchanging an identity token),
//! cached per (origin, scope) until it expires; a `Basic` challenge gets the credentials.
//! Tokens are secrets: they are never logged, and headers carrying them are marked sensitive.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use http::HeaderValue;
use serde::Deserialize;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, USER_AGENT, WWW_AUTHENTICATE};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

use super::credentials::Credentials;
use super::resolve::{TargetError, check_target};
use super::{Endpoint, USER_AGENT_VALUE, UpstreamError, UpstreamErrorKind, Upstreams};
use crate::fetch::Fetch;
use crate::oci::Repository;
use crate::wire::{BoxError, SendError};

/// Why no token came from a realm (its refusals are `CredentialsRefused`/`Required`).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("realm {realm:?} is not a URL")]
    Realm { realm: String },
    #[error("realm refused")]
    Target(#[source] TargetError),
    #[error("token server sent no headers within {0:?}")]
    Timeout(std::time::Duration),
    #[error("token request failed")]
    Request(#[source] BoxError),
    #[error("token server answered {0}")]
    Status(StatusCode),
    #[error("reading the token response")]
    Read(#[source] BoxError),
    #[error("token server sent no whole response within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error("token response has no usable token")]
    NoToken,
}

/// Largest token response read.
const MAX_TOKEN_RESPONSE: usize = 1024 * 1024;
/// Longest token kept: real ones are a few KiB, and few servers take a header line longer
/// than this.
pub const MAX_TOKEN_LEN: usize = 32 * 1024;
/// What the token cache may hold, keys and tokens together; past it the least used go.
pub const MAX_TOKEN_CACHE_BYTES: u64 = 16 * 1024 * 1024;
/// `client_id` sent when exchanging an identity (refresh) token.
const OAUTH_CLIENT_ID: &str = "pullcache";

/// Token lifetime when the token server does not say (the distribution spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// The longest a token is kept, whatever its server says (a year, or `u64::MAX` seconds,
/// would keep it, and its cache entry, forever).
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Tokens are renewed this long before they expire.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);

/// A parsed `Bearer` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub service: Option<String>,
    pub scope: Option<String>,
}

impl Challenge {
    /// Parses `Bearer realm="...",service="...",scope="..."`. Other schemes give `None`.
    pub fn parse(header: &str) -> Option<Challenge> {
        let (scheme, params) = header.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parse_params(params);
        Some(Challenge {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        })
    }

    /// The scope to ask for: the challenge's own, or pull on the repository.
    pub fn scope_for(&self, repository: Option<&Repository>) -> Option<String> {
        self.scope
            .clone()
            .or_else(|| repository.map(|r| format!("repository:{r}:pull")))
    }
}

/// `key="quoted, value",key2=token` pairs.
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        out.insert(key, value);
        rest = after.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

/// Reads a token server's answer: the `Authorization` value to send (marked sensitive) and
/// how long it may be used, within 0 to [`MAX_TOKEN_LIFETIME`]. `None` when it holds no token
/// that can be sent.
pub fn parse_token_response(body: &[u8]) -> Option<(HeaderValue, Duration)> {
    serde_json::from_slice::<TokenResponse>(body).ok()?.into_header()
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    /// Any JSON number: a lifetime out of range (negative, huge, fractional) is clamped, not
    /// an error.
    #[serde(default)]
    expires_in: Option<serde_json::Number>,
}

impl TokenResponse {
    /// The bearer header value and how long it lives.
    fn into_header(self) -> Option<(HeaderValue, Duration)> {
        let token = self
            .token
            .or(self.access_token)
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_LEN)?;
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
        value.set_sensitive(true);
        let lifetime = match self.expires_in.and_then(|n| n.as_f64()) {
            None => DEFAULT_TOKEN_LIFETIME,
            Some(seconds) if seconds.is_nan() || seconds <= 0.0 => Duration::ZERO,
            Some(seconds) => Duration::from_secs_f64(seconds.min(MAX_TOKEN_LIFETIME.as_secs_f64())),
        };
        Some((value, lifetime))
    }
}

/// The token cache's key for `scope` with `credentials` (`None`: anonymously). A token
/// belongs to the credential that obtained it: one taken with pullcache's credentials is never
/// sent for another name's request that would go without them.
pub(super) fn token_key(credentials: Option<&Credentials>, scope: &str) -> String {
    match credentials {
        Some(credentials) => format!("{} {scope}", hex::encode(&credentials.identity()[..16])),
        None => format!("anonymous {scope}"),
    }
}

/// Tokens by (upstream origin, [`token_key`]), with when each expires. Lifetimes count from
/// when a token arrived, not from the server's `issued_at`, so clock skew cannot make an
/// expired token look fresh. Bounded by [`MAX_TOKEN_CACHE_BYTES`]: a registry answering a new
/// scope for every request, with long tokens, evicts tokens rather than growing the node.
pub struct TokenCache {
    tokens: moka::sync::Cache<(String, String), (HeaderValue, Instant)>,
}

/// An entry lives until its token expires.
struct UntilExpiry;

impl moka::Expiry<(String, String), (HeaderValue, Instant)> for UntilExpiry {
    fn expire_after_create(
        &self,
        _: &(String, String),
        value: &(HeaderValue, Instant),
        now: Instant,
    ) -> Option<Duration> {
        Some(value.1.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &(String, String),
        value: &(HeaderValue, Instant),
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.1.saturating_duration_since(now))
    }
}

impl Default for TokenCache {
    fn default() -> TokenCache {
        TokenCache::with_capacity(MAX_TOKEN_CACHE_BYTES)
    }
}

impl TokenCache {
    /// A cache holding at most `bytes` of keys and tokens.
    pub fn with_capacity(bytes: u64) -> TokenCache {
        let tokens = moka::sync::Cache::builder()
            .max_capacity(bytes)
            .weigher(
                |(endpoint, scope): &(String, String), (value, _): &(HeaderValue, Instant)| {
                    u32::try_from(endpoint.len() + scope.len() + value.len()).unwrap_or(u32::MAX)
                },
            )
            .expire_after(UntilExpiry)
            .build();
        TokenCache { tokens }
    }

    pub fn get(&self, endpoint: &str, scope: &str) -> Option<HeaderValue> {
        let (value, expires) = self.tokens.get(&(endpoint.to_owned(), scope.to_owned()))?;
        (Instant::now() + EXPIRY_MARGIN < expires).then_some(value)
    }

    pub fn put(&self, endpoint: &str, scope: &str, value: HeaderValue, lifetime: Duration) {
        let expires = Instant::now() + lifetime.min(MAX_TOKEN_LIFETIME);
        self.tokens
            .insert((endpoint.to_owned(), scope.to_owned()), (value, expires));
    }

    pub fn forget(&self, endpoint: &str, scope: &str) {
        self.tokens.invalidate(&(endpoint.to_owned(), scope.to_owned()));
    }

    /// Keys and token bytes held, once pending evictions have run.
    #[cfg(test)]
    fn weight(&self) -> u64 {
        self.tokens.run_pending_tasks();
        self.tokens.weighted_size()
    }
}

impl Upstreams {
    /// Answers a 401: a token for a Bearer challenge, the credentials for a Basic one. A
    /// refusal for want of credentials carries the registry's challenge, for the client.
    pub(super) async fn authorize(
        &self,
        endpoint: &Endpoint<'_>,
        req: &Fetch,
        scope: &str,
        headers: &http::HeaderMap,
    ) -> Result<HeaderValue, UpstreamError> {
        self.answer_challenge(endpoint, req, scope, headers)
            .await
            .map_err(|e| e.with_challenge(headers.get(WWW_AUTHENTICATE)))
    }

    async fn answer_challenge(
        &self,
        endpoint: &Endpoint<'_>,
        req: &Fetch,
        scope: &str,
        headers: &http::HeaderMap,
    ) -> Result<HeaderValue, UpstreamError> {
        let challenges: Vec<&str> = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if let Some(challenge) = challenges.iter().find_map(|c| Challenge::parse(c)) {
            self.tokens.forget(&endpoint.authority, scope);
            let token = self.token(endpoint, req, scope, &challenge).await;
            let result = match &token {
                Ok(_) => "ok",
                Err(UpstreamError {
                    kind: UpstreamErrorKind::CredentialsRefused { .. } | UpstreamErrorKind::CredentialsRequired { .. },
                    ..
                }) => "refused",
                Err(_) => "error",
            };
            self.metrics
                .tokens
                .with_label_values(&[self.label(&req.registry), result])
                .inc();
            return token;
        }
        let status = StatusCode::UNAUTHORIZED;
        let refused = |credentials: bool| {
            let kind = if credentials {
                UpstreamErrorKind::CredentialsRefused { status }
            } else {
                UpstreamErrorKind::CredentialsRequired {
                    status,
                    challenge: None,
                }
            };
            UpstreamError::new(&req.registry, kind)
        };
        if challenges
            .iter()
            .any(|c| c.trim_start().to_ascii_lowercase().starts_with("basic"))
        {
            let header = endpoint
                .credentials
                .and_then(Credentials::basic_header)
                .ok_or_else(|| refused(false))?;
            self.basic.insert(endpoint.authority.clone(), ());
            return Ok(header);
        }
        Err(refused(endpoint.credentials.is_some()))
    }

    /// Gets a token for a challenge: anonymously, with Basic credentials, or by exchanging an
    /// identity token (OAuth2 `refresh_token` grant). Caches it per (origin, scope).
    pub(super) async fn token(
        &self,
        endpoint: &Endpoint<'_>,
        req: &Fetch,
        cache_scope: &str,
        challenge: &Challenge,
    ) -> Result<HeaderValue, UpstreamError> {
        let err = |e: TokenError| UpstreamError::new(&req.registry, UpstreamErrorKind::Token(e));
        let scope = challenge.scope_for(Some(&req.repository));
        let realm = &challenge.realm;
        let request = {
            let mut params = form_urlencoded::Serializer::new(String::new());
            if let Some(service) = &challenge.service {
                params.append_pair("service", service);
            }
            if let Some(scope) = &scope {
                params.append_pair("scope", scope);
            }
            match endpoint.credentials {
                Some(Credentials::IdentityToken { token }) => {
                    params
                        .append_pair("grant_type", "refresh_token")
                        .append_pair("refresh_token", token)
                        .append_pair("client_id", OAUTH_CLIENT_ID);
                    Request::post(realm.as_str())
                        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                        .body(Full::new(Bytes::from(params.finish())))
                }
                credentials => {
                    let sep = if realm.contains('?') { '&' } else { '?' };
                    let mut get = Request::get(format!("{realm}{sep}{}", params.finish()));
                    if let Some(basic) = credentials.and_then(Credentials::basic_header) {
                        get = get.header(AUTHORIZATION, basic);
                    }
                    get.body(Full::default())
                }
            }
        };
        let mut request = request.map_err(|_| err(TokenError::Realm { realm: realm.clone() }))?;
        request
            .headers_mut()
            .insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        check_target(request.uri(), endpoint.answers_reach).map_err(|e| err(TokenError::Target(e)))?;
        let resp = crate::wire::send(endpoint.answers, request, self.header_timeout())
            .await
            .map_err(|e| match e {
                SendError::Timeout(after) => err(TokenError::Timeout(after)),
                e => match super::Failure::from(e).kind {
                    UpstreamErrorKind::Request(e) => err(TokenError::Request(e)),
                    forbidden => UpstreamError::new(&req.registry, forbidden),
                },
            })?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let kind = if endpoint.credentials.is_some() {
                UpstreamErrorKind::CredentialsRefused { status }
            } else {
                UpstreamErrorKind::CredentialsRequired {
                    status,
                    challenge: None,
                }
            };
            return Err(UpstreamError::new(&req.registry, kind));
        }
        if !status.is_success() {
            return Err(err(TokenError::Status(status)));
        }
        // A token response is small: the whole of it comes within the timeout.
        let within = self.timeout();
        let body = tokio::time::timeout(within, Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE).collect())
            .await
            .map_err(|_| err(TokenError::BodyTimeout(within)))?
            .map_err(|e| err(TokenError::Read(e)))?
            .to_bytes();
        let (value, lifetime) = parse_token_response(&body).ok_or_else(|| err(TokenError::NoToken))?;
        self.tokens
            .put(&endpoint.authority, cache_scope, value.clone(), lifetime);
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        )
        .unwrap();
        assert_eq!(c.realm, "https://auth.docker.io/token");
        assert_eq!(c.service.as_deref(), Some("registry.docker.io"));
        assert_eq!(c.scope.as_deref(), Some("repository:library/alpine:pull"));
    }

    #[test]
    fn parses_quoted_commas_and_missing_scope() {
        let c = Challenge::parse(r#"bearer realm="https://r/t?a=1,b",  service=svc"#).unwrap();
        assert_eq!(c.realm, "https://r/t?a=1,b");
        assert_eq!(c.service.as_deref(), Some("svc"));
        let repo = Repository::parse("team/app").unwrap();
        assert_eq!(c.scope_for(Some(&repo)).unwrap(), "repository:team/app:pull");
        assert!(Challenge::parse(r#"Basic realm="x""#).is_none());
        assert!(Challenge::parse("Bearer service=x").is_none());
    }

    #[test]
    fn tokens_belong_to_the_credential_that_obtained_them() {
        let scope = "repository:corp/secret:pull";
        let basic = |password: &str| Credentials::Basic {
            username: "robot".into(),
            password: password.into(),
        };
        let keys = [
            token_key(None, scope),
            token_key(Some(&basic("a")), scope),
            token_key(Some(&basic("b")), scope),
            token_key(Some(&Credentials::IdentityToken { token: "a".into() }), scope),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
            assert!(!a.contains("robot") && !a.contains(" a "), "a secret in a key: {a}");
        }
        assert_eq!(token_key(Some(&basic("a")), scope), keys[1]);
    }

    /// A token server's lifetime is clamped before any arithmetic: `u64::MAX` seconds once
    /// made the download that asked panic, wedging its digest.
    #[test]
    fn token_lifetimes_out_of_range_are_clamped() {
        for (expires_in, lifetime) in [
            ("18446744073709551615", MAX_TOKEN_LIFETIME),
            ("1e300", MAX_TOKEN_LIFETIME),
            ("31536000", MAX_TOKEN_LIFETIME),
            ("-5", Duration::ZERO),
            ("0", Duration::ZERO),
            ("2.5", Duration::from_millis(2500)),
        ] {
            let t: TokenResponse =
                serde_json::from_str(&format!(r#"{{"token":"t","expires_in":{expires_in}}}"#)).unwrap();
            assert_eq!(t.into_header().unwrap().1, lifetime, "{expires_in}");
        }
        let cache = TokenCache::default();
        cache.put("r.test", "s", HeaderValue::from_static("Bearer t"), Duration::MAX);
        assert!(cache.get("r.test", "s").is_some());
    }

    #[test]
    fn token_header_is_sensitive_and_expires() {
        let t: TokenResponse = serde_json::from_str(r#"{"access_token":"abc","expires_in":300}"#).unwrap();
        let (value, life) = t.into_header().unwrap();
        assert!(value.is_sensitive());
        assert_eq!(value, "Bearer abc");
        assert_eq!(life, Duration::from_secs(300));
        let cache = TokenCache::default();
        let hub = "registry-1.docker.io";
        cache.put(hub, "s", value.clone(), life);
        assert_eq!(cache.get(hub, "s"), Some(value.clone()));
        cache.put(hub, "short", value, Duration::from_secs(5));
        assert_eq!(cache.get(hub, "short"), None, "a token about to expire is not reused");
    }

    /// A registry answering a new scope for every request, with the longest tokens kept,
    /// fills the cache to its bound and no further; tokens past the longest are refused.
    #[test]
    fn the_token_cache_is_bounded() {
        let long = "t".repeat(MAX_TOKEN_LEN);
        let t: TokenResponse = serde_json::from_str(&format!(r#"{{"token":"{long}t"}}"#)).unwrap();
        assert!(
            t.into_header().is_none(),
            "a token over {MAX_TOKEN_LEN} bytes is refused"
        );
        let t: TokenResponse = serde_json::from_str(&format!(r#"{{"token":"{long}"}}"#)).unwrap();
        let (value, life) = t.into_header().unwrap();
        let cache = TokenCache::with_capacity(1024 * 1024);
        for scope in 0..200 {
            cache.put(
                "hostile.test",
                &format!("repository:r{scope}:pull"),
                value.clone(),
                life,
            );
        }
        let weight = cache.weight();
        assert!(weight <= 1024 * 1024, "{weight} bytes held");
        assert!(weight >= 512 * 1024, "{weight} bytes held: the cache still works");
    }
}
