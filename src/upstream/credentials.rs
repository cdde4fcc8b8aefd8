//! Registry credentials: what the operator configured, read from a docker `config.json` (the
//! format of a Kubernetes `kubernetes.io/dockerconfigjson` Secret) or the TOML config.
//! Secrets never reach a log: `Debug` is redacted and headers built from them are sensitive.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::HeaderValue;
use serde::Deserialize;

use crate::oci::Registry;

/// Docker Hub's key in `config.json`, from the v1 days, and its other host names.
const DOCKER_HUB_KEYS: &[&str] = &[
    "https://index.docker.io/v1/",
    "index.docker.io",
    "registry-1.docker.io",
    "docker.io",
];

#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A user name and password (or personal access token).
    Basic { username: String, password: String },
    /// An OAuth2 refresh token, exchanged at the token realm (`docker login` with an identity
    /// provider stores these).
    IdentityToken { token: String },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credentials::IdentityToken { .. } => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

impl Credentials {
    /// What kind of credential this is, for `--check-config`: the user name, never a secret.
    /// Some registries take a token as the user name too, so a long one is shown in part.
    pub fn kind(&self) -> String {
        match self {
            Credentials::Basic { username, .. } if username.chars().count() > 16 => {
                let start: String = username.chars().take(4).collect();
                format!("user {start:?}… ({} characters)", username.chars().count())
            }
            Credentials::Basic { username, .. } => format!("user {username:?}"),
            Credentials::IdentityToken { .. } => "identity token".to_owned(),
        }
    }

    /// A fingerprint of the secret, for keys and never shown: a token belongs to the
    /// credential that obtained it.
    pub fn identity(&self) -> [u8; 32] {
        use sha2::Digest as _;
        let mut hash = sha2::Sha256::new();
        let fields: [&str; 3] = match self {
            Credentials::Basic { username, password } => ["basic", username, password],
            Credentials::IdentityToken { token } => ["identity", token, ""],
        };
        for field in fields {
            hash.update(field.as_bytes());
            hash.update([0]);
        }
        hash.finalize().into()
    }

    /// `Authorization: Basic ...`, marked sensitive. Identity tokens have no Basic form.
    pub fn basic_header(&self) -> Option<HeaderValue> {
        let Credentials::Basic { username, password } = self else {
            return None;
        };
        let encoded = STANDARD.encode(format!("{username}:{password}"));
        let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// Builds credentials from the fields a `config.json` entry or the TOML file may hold:
    /// an identity token wins, then `username`/`password`, then `auth` (base64 `user:pass`).
    pub fn from_fields(
        auth: Option<&str>,
        username: Option<&str>,
        password: Option<&str>,
        identity_token: Option<&str>,
    ) -> Result<Option<Credentials>, String> {
        if let Some(token) = identity_token.filter(|t| !t.is_empty()) {
            return Ok(Some(Credentials::IdentityToken {
                token: token.to_owned(),
            }));
        }
        if let (Some(username), Some(password)) = (username, password)
            && !username.is_empty()
        {
            return Ok(Some(Credentials::Basic {
                username: username.to_owned(),
                password: password.to_owned(),
            }));
        }
        let Some(auth) = auth.filter(|a| !a.is_empty()) else {
            return Ok(None);
        };
        let decoded = STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or("\"auth\" is not base64 of user:password")?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or("\"auth\" is not base64 of user:password")?;
        Ok(Some(Credentials::Basic {
            username: username.to_owned(),
            password: password.to_owned(),
        }))
    }
}

#[derive(Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    /// Credential helpers are programs on the machine `docker login` ran on; pullcache runs
    /// none, so these are reported, not used.
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// The `auths` of a docker `config.json`, keyed by bare host (`host[:port]`).
#[derive(Debug, Clone, Default)]
pub struct DockerConfig {
    by_host: HashMap<String, Credentials>,
    /// What the file holds that gives no credentials here, said once at start.
    unused: Vec<String>,
}

impl DockerConfig {
    /// How many registries it has credentials for.
    pub fn len(&self) -> usize {
        self.by_host.len()
    }

    /// The hosts it has credentials for, sorted.
    pub fn hosts(&self) -> Vec<&str> {
        let mut hosts: Vec<&str> = self.by_host.keys().map(String::as_str).collect();
        hosts.sort_unstable();
        hosts
    }

    /// What in the file cannot be used: credential helpers, and entries without credentials.
    pub fn unused(&self) -> &[String] {
        &self.unused
    }

    pub fn load(path: &Path) -> Result<DockerConfig, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(bytes: &[u8]) -> Result<DockerConfig, String> {
        // serde_json's message for a wrong type quotes the value, which may be a secret.
        let file: DockerConfigFile = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => format!(
                "not a docker config.json: a value of the wrong type at line {} column {} (not shown)",
                e.line(),
                e.column()
            ),
            _ => format!("not a docker config.json: {e}"),
        })?;
        let mut by_host = HashMap::new();
        let mut unused = Vec::new();
        if let Some(store) = file.creds_store {
            unused.push(format!(
                "\"credsStore\": {store:?} is a credential helper, which pullcache does not run: \
                 put the credentials in \"auths\" (a Kubernetes dockerconfigjson Secret has them there)"
            ));
        }
        let mut helpers: Vec<_> = file.cred_helpers.into_iter().collect();
        helpers.sort_unstable();
        for (registry, helper) in helpers {
            unused.push(format!(
                "\"credHelpers\": {registry:?} uses the credential helper {helper:?}, which pullcache \
                 does not run: put its credentials in \"auths\""
            ));
        }
        let mut auths: Vec<_> = file.auths.into_iter().collect();
        auths.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (key, entry) in auths {
            let credentials = Credentials::from_fields(
                entry.auth.as_deref(),
                entry.username.as_deref(),
                entry.password.as_deref(),
                entry.identitytoken.as_deref(),
            )
            .map_err(|e| format!("auths.{key:?}: {e}"))?;
            if let Some(credentials) = credentials {
                let host = if DOCKER_HUB_KEYS.contains(&key.as_str()) {
                    "docker.io".to_owned()
                } else {
                    bare_host(&key)
                };
                by_host.insert(host, credentials);
            } else {
                unused.push(format!("\"auths\": {key:?} has no credentials"));
            }
        }
        Ok(DockerConfig { by_host, unused })
    }

    /// Credentials for a registry, by its name or, failing that, the host it is fetched from.
    pub fn lookup(&self, registry: &Registry, upstream_host: Option<&str>) -> Option<&Credentials> {
        self.by_host
            .get(registry.as_str())
            .or_else(|| upstream_host.and_then(|h| self.by_host.get(&h.to_ascii_lowercase())))
    }

    /// Credentials stored for a host (a mirror, or a registry's upstream host).
    pub fn lookup_host(&self, host: &str) -> Option<&Credentials> {
        self.by_host.get(&host.to_ascii_lowercase())
    }

    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }
}

/// `https://host:port/v1/` → `host:port`.
fn bare_host(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key);
    // `user:password@host`: the host alone.
    host.rsplit('@').next().unwrap_or(host).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{
        "auths": {
            "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},
            "https://Registry.Example.com:5000/v2/": {"username": "u", "password": "p"},
            "ghcr.io": {"identitytoken": "refresh-me"},
            "empty.example.com": {}
        },
        "credsStore": "desktop"
    }"#;

    #[test]
    fn reads_every_entry_form() {
        let config = DockerConfig::parse(CONFIG.as_bytes()).unwrap();
        let hub = config.lookup(&Registry::docker_hub(), None).unwrap();
        assert_eq!(
            hub,
            &Credentials::Basic {
                username: "hub".into(),
                password: "secret".into()
            }
        );
        let example = config
            .lookup(&Registry::parse("registry.example.com:5000").unwrap(), None)
            .unwrap();
        assert_eq!(example.basic_header().unwrap(), "Basic dTpw");
        assert!(example.basic_header().unwrap().is_sensitive());
        assert!(matches!(
            config.lookup(&Registry::parse("ghcr.io").unwrap(), None),
            Some(Credentials::IdentityToken { .. })
        ));
        assert!(
            config
                .lookup(&Registry::parse("empty.example.com").unwrap(), None)
                .is_none()
        );
    }

    /// Credential helpers are programs pullcache does not run: said, not silently dropped.
    #[test]
    fn what_cannot_be_used_is_reported() {
        let config = DockerConfig::parse(
            br#"{"auths": {"a.io": {}, "b.io": {"auth": "dTpw"}},
                 "credsStore": "desktop", "credHelpers": {"gcr.io": "gcloud"}}"#,
        )
        .unwrap();
        let unused = config.unused().join("\n");
        assert!(unused.contains("\"credsStore\": \"desktop\""), "{unused}");
        assert!(
            unused.contains("\"gcr.io\" uses the credential helper \"gcloud\""),
            "{unused}"
        );
        assert!(unused.contains("\"a.io\" has no credentials"), "{unused}");
        assert!(!unused.contains("b.io"), "{unused}");
        assert_eq!(config.len(), 1);
    }

    #[test]
    fn falls_back_to_the_upstream_host() {
        let config = DockerConfig::parse(CONFIG.as_bytes()).unwrap();
        let alias = Registry::parse("registry.test").unwrap();
        assert!(config.lookup(&alias, None).is_none());
        assert!(config.lookup(&alias, Some("registry.example.com:5000")).is_some());
    }

    #[test]
    fn secrets_stay_out_of_debug_and_bad_auth_is_an_error() {
        let c = Credentials::from_fields(Some("dTpzM2NyZXQ="), None, None, None)
            .unwrap()
            .unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(!format!("{:?}", Credentials::IdentityToken { token: "tok".into() }).contains("tok"));
        assert!(Credentials::from_fields(Some("!!"), None, None, None).is_err());
        assert!(Credentials::from_fields(Some("bm9jb2xvbg=="), None, None, None).is_err());
        assert!(DockerConfig::parse(br#"{"auths": []}"#).is_err());
        let e = DockerConfig::parse(br#"{"auths": {"h.io": "RAWS3CRET"}}"#).unwrap_err();
        assert!(!e.contains("RAWS3CRET") && e.contains("line 1"), "{e}");
        let long = Credentials::Basic {
            username: "dop_v1_0123456789abcdef".into(),
            password: "p".into(),
        };
        assert_eq!(long.kind(), "user \"dop_\"… (23 characters)");
        assert!(DockerConfig::parse(b"not json").is_err());
    }
}
