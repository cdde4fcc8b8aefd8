//! Asking a registry what one client may read: a `HEAD` of one object with the client's own
//! `Authorization`, or with none at all (as an anonymous client, taking an anonymous token
//! if challenged). pullcache's configured credentials are never used here, and nothing a
//! client sent is kept. [`crate::authorize`] decides with the answers.

use http::header::{AUTHORIZATION, USER_AGENT, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};

use super::auth::Challenge;
use super::{Endpoint, USER_AGENT_VALUE, UpstreamError, UpstreamErrorKind, Upstreams, request};
use crate::fetch::{Fetch, Resource};
use crate::oci::{AcceptClass, Reference, Registry, Repository};

/// What the registry answered about one object, for one client.
#[derive(Debug, Clone)]
pub enum Answer {
    /// 2xx; or a redirect (to where the bytes are, or to a login page) after which the
    /// registry's own API listed the repository's tags to the same client.
    Readable,
    /// 404: not there, or hidden from this client; it proves nothing either way.
    Missing,
    /// 401 or 403. `challenge` is the registry's first `WWW-Authenticate`, to relay as is.
    Refused {
        status: StatusCode,
        challenge: Option<HeaderValue>,
    },
}

/// The most of a tag list read to confirm a redirect.
const MAX_TAG_LIST: usize = 64 * 1024;

/// The token cache key of anonymous tokens, apart from those of pullcache's credentials.
fn anonymous(scope: &str) -> String {
    super::auth::token_key(None, scope)
}

impl Upstreams {
    /// Whether any endpoint of `registry` is reached with pullcache's own credentials. If
    /// none is, everything pullcache fetched of it was readable anonymously.
    pub fn holds_credentials(&self, registry: &Registry) -> bool {
        self.endpoints(registry)
            .is_ok_and(|endpoints| endpoints.iter().any(|e| e.credentials.is_some()))
    }

    /// `HEAD` of `reference` in `repository` at the registry's own URL (never a mirror), as
    /// `client` (the `Authorization` a client sent, as is) or anonymously (`None`).
    pub async fn ask(
        &self,
        registry: &Registry,
        repository: &Repository,
        resource: Resource,
        reference: Reference,
        client: Option<&HeaderValue>,
    ) -> Result<Answer, UpstreamError> {
        let err = |kind| UpstreamError::new(registry, kind);
        if self.settings.offline {
            return Err(err(UpstreamErrorKind::Offline {
                resource,
                reference: reference.image(registry, repository),
            }));
        }
        let mut endpoint = self.endpoint(registry, self.base(registry)?, None)?;
        endpoint.credentials = None;
        // A listing is asked with a GET of its first tag: a tag list has no HEAD everywhere.
        let req = Fetch {
            method: if resource.is_listing() {
                Method::GET
            } else {
                Method::HEAD
            },
            registry: registry.clone(),
            repository: repository.clone(),
            resource,
            accept: (resource == Resource::Manifest).then(|| AcceptClass::all().header_value()),
            reference,
            from: None,
            until: None,
            credential: crate::fetch::Credential::Own,
            clearance: None,
            query: (resource == Resource::Tags).then(|| "n=1".to_owned()),
        };
        let uri: Uri = format!("{}{}", endpoint.base, req.path())
            .parse()
            .map_err(|e: http::uri::InvalidUri| err(UpstreamErrorKind::Request(e.into())))?;
        let scope = format!("repository:{repository}:pull");
        let mut auth = match client {
            // A client's secret: never printed, even by a debug dump of the request.
            Some(header) => {
                let mut header = header.clone();
                header.set_sensitive(true);
                Some(header)
            }
            None => self.tokens.get(&endpoint.authority, &anonymous(&scope)),
        };
        let mut first_challenge = None;
        loop {
            let request = request(&req, &uri, auth.as_ref());
            let resp = self
                .send(endpoint.client, &req, request)
                .await
                .map_err(|failure| err(failure.kind))?;
            let status = resp.status();
            if status.is_success() {
                return Ok(Answer::Readable);
            }
            // A redirect may lead to the bytes or to a login page: the API itself decides.
            if status.is_redirection() {
                return self.lists_tags(&endpoint, &req, auth.as_ref()).await;
            }
            if status == StatusCode::NOT_FOUND {
                return Ok(Answer::Missing);
            }
            if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
                return Err(err(self.refusal(&endpoint, &req, &resp)));
            }
            let challenge = resp.headers().get(WWW_AUTHENTICATE).cloned();
            // An anonymous client first takes an anonymous token, as containerd does.
            let bearer = challenge
                .as_ref()
                .and_then(|c| c.to_str().ok())
                .and_then(Challenge::parse);
            if client.is_none() && first_challenge.is_none() && status == StatusCode::UNAUTHORIZED {
                first_challenge = challenge.clone();
                if let Some(bearer) = bearer {
                    self.tokens.forget(&endpoint.authority, &anonymous(&scope));
                    match self.token(&endpoint, &req, &anonymous(&scope), &bearer).await {
                        Ok(token) => {
                            auth = Some(token);
                            continue;
                        }
                        // No token for an anonymous client, however the realm fails: what
                        // an anonymous client cannot read is private.
                        Err(e) => tracing::debug!(registry = %registry, error = %e, "no anonymous token"),
                    }
                }
            }
            return Ok(Answer::Refused {
                status,
                challenge: first_challenge.or(challenge),
            });
        }
    }

    /// Confirms a redirected answer with the registry's own API: `GET /v2/<name>/tags/list`
    /// with the same `auth` must answer 200 with the repository's name in JSON. Anything else
    /// (a login page, a refusal, no tag listing) is no proof of access.
    async fn lists_tags(
        &self,
        endpoint: &Endpoint<'_>,
        req: &Fetch,
        auth: Option<&HeaderValue>,
    ) -> Result<Answer, UpstreamError> {
        let err = |kind| UpstreamError::new(&req.registry, kind);
        let uri: Uri = format!("{}/v2/{}/tags/list?n=1", endpoint.base, req.repository)
            .parse()
            .map_err(|e: http::uri::InvalidUri| err(UpstreamErrorKind::Request(e.into())))?;
        let mut request = Request::get(uri).header(USER_AGENT, USER_AGENT_VALUE);
        if let Some(auth) = auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let request = request.body(Full::default()).expect("request parts are valid");
        let resp = self
            .send(endpoint.client, req, request)
            .await
            .map_err(|failure| err(failure.kind))?;
        let unconfirmed = Answer::Refused {
            status: StatusCode::FORBIDDEN,
            challenge: None,
        };
        if resp.status() != StatusCode::OK {
            return Ok(unconfirmed);
        }
        let Ok(body) = Limited::new(resp.into_body(), MAX_TAG_LIST).collect().await else {
            return Ok(unconfirmed);
        };
        let listed = serde_json::from_slice::<serde_json::Value>(&body.to_bytes())
            .is_ok_and(|list| list["name"].as_str() == Some(req.repository.as_str()));
        Ok(if listed { Answer::Readable } else { unconfirmed })
    }
}
