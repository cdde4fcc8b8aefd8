//! A misbehaving registry on `127.0.0.1:0`, for faults the real one cannot produce: bytes
//! that do not match their digest, slow bodies, 429s. Each path gets a scripted reply, and
//! requests are counted per path.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body is sent in this many chunks with `chunk_delay` between them.
    pub chunks: usize,
    pub chunk_delay: Duration,
    /// How long the server waits before sending the response headers.
    pub header_delay: Duration,
    /// The first request gets this many body bytes, then the connection breaks.
    pub drop_after: Option<usize>,
    /// Whether `Range: bytes=N-` gets a 206 (otherwise the whole body, as some servers do).
    pub honor_range: bool,
    /// Answer 400 to any request that carries `Authorization` (object storage with a signed
    /// URL does that).
    pub reject_authorization: bool,
    /// Whether the answer says its `Content-Length` (otherwise it goes out chunked).
    pub sized: bool,
    /// The first request's body goes out at once; only later ones wait `chunk_delay`.
    pub first_fast: bool,
}

impl Reply {
    pub fn ok(body: Vec<u8>, headers: &[(&str, &str)]) -> Reply {
        Reply {
            status: 200,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body,
            chunks: 1,
            chunk_delay: Duration::ZERO,
            header_delay: Duration::ZERO,
            drop_after: None,
            honor_range: true,
            reject_authorization: false,
            sized: true,
            first_fast: false,
        }
    }

    pub fn status(status: u16, headers: &[(&str, &str)]) -> Reply {
        Reply {
            status,
            ..Reply::ok(Vec::new(), headers)
        }
    }

    pub fn after(mut self, header_delay: Duration) -> Reply {
        self.header_delay = header_delay;
        self
    }

    /// Breaks the first response after `bytes` of body.
    pub fn drop_after(mut self, bytes: usize) -> Reply {
        self.drop_after = Some(bytes);
        self
    }

    pub fn ignoring_range(mut self) -> Reply {
        self.honor_range = false;
        self
    }

    pub fn rejecting_authorization(mut self) -> Reply {
        self.reject_authorization = true;
        self
    }

    /// Sends the body chunked, without a `Content-Length`.
    pub fn without_length(mut self) -> Reply {
        self.sized = false;
        self
    }

    pub fn slowly(mut self, chunks: usize, chunk_delay: Duration) -> Reply {
        self.chunks = chunks.max(1);
        self.chunk_delay = chunk_delay;
        self
    }

    /// [`Reply::slowly`], but for the first request, whose body goes at once.
    pub fn slowly_after_first(self, chunks: usize, chunk_delay: Duration) -> Reply {
        Reply {
            first_fast: true,
            ..self.slowly(chunks, chunk_delay)
        }
    }
}

#[derive(Default)]
struct State {
    addr: Option<SocketAddr>,
    replies: HashMap<String, Reply>,
    hits: HashMap<String, usize>,
    /// `Authorization` of each request, by path.
    auth: HashMap<String, Vec<Option<String>>>,
    /// `Range` of each request, by path.
    ranges: HashMap<String, Vec<Option<String>>>,
    /// Query strings sent to `/token`.
    token_queries: Vec<String>,
    /// When set, `/v2/` paths demand `Bearer <token>`, issued anonymously at `/token`.
    required_token: Option<String>,
    /// The `expires_in` `/token` answers with, as raw JSON (300 when unset).
    token_lifetime: Option<String>,
    /// When set, the scripted replies are a private repository's (see [`Private`]).
    private: Option<Private>,
    /// Paths of a [`Private`] registry that any token reads, the anonymous one included:
    /// what a "browse" right apart from "read" opens (a tag list).
    browsable: Vec<String>,
}

/// A registry whose scripted content is private: a request without `Authorization` is
/// challenged (`Bearer`, realm this server's `/token`); `/token` hands [`Private::token`] to
/// the Basic credential [`Private::basic`] and a token worth nothing to anyone else; the
/// scripted replies go only to `Bearer <token>` and to the credentials in [`Private::also`]
/// (a client's own), and every other credential gets [`Private::otherwise`] (a 404 that hides
/// the repository, a redirect to a login page).
#[derive(Clone)]
pub struct Private {
    /// The whole `Authorization` value, e.g. `Basic Y2FjaGU6Y2FjaGUtcHc=`.
    pub basic: String,
    pub token: String,
    pub also: Vec<String>,
    pub otherwise: Reply,
}

/// The token `/token` gives a [`Private`] registry's anonymous clients.
pub const ANONYMOUS_TOKEN: &str = "anonymous-token";

pub struct FaultUpstream {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultUpstream {
    pub async fn start() -> anyhow::Result<FaultUpstream> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state: Arc<Mutex<State>> = Arc::default();
        state.lock().unwrap().addr = Some(addr);
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            let (delay, resp) = reply(&state, &req);
                            tokio::time::sleep(delay).await;
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(FaultUpstream { addr, state, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Scripts the reply for a path (without query), e.g. `/v2/a/blobs/sha256:...`.
    pub fn set(&self, path: &str, reply: Reply) {
        self.state.lock().unwrap().replies.insert(path.to_owned(), reply);
    }

    /// Lets any token read `path` of a [`Private`] registry, the anonymous one included.
    pub fn browsable(&self, path: &str) {
        self.state.lock().unwrap().browsable.push(path.to_owned());
    }

    /// Demands `Authorization: Bearer <token>` on `/v2/` paths, with a challenge whose realm is
    /// this server's `/token`, which hands the token out to anyone.
    pub fn require_token(&self, token: &str) {
        self.state.lock().unwrap().required_token = Some(token.to_owned());
    }

    /// Makes the scripted content private ([`Private`]).
    pub fn private(&self, private: Private) {
        self.state.lock().unwrap().private = Some(private);
    }

    /// The `Authorization` header of every request to `path`, in order.
    pub fn auth_seen(&self, path: &str) -> Vec<Option<String>> {
        self.state.lock().unwrap().auth.get(path).cloned().unwrap_or_default()
    }

    /// The `Range` header of every request to `path`, in order.
    pub fn ranges_seen(&self, path: &str) -> Vec<Option<String>> {
        self.state.lock().unwrap().ranges.get(path).cloned().unwrap_or_default()
    }

    /// Answers `/token` with `expires_in` set to `raw` (JSON, so a hostile value can be any
    /// number).
    pub fn set_token_lifetime(&self, raw: &str) {
        self.state.lock().unwrap().token_lifetime = Some(raw.to_owned());
    }

    /// The query strings of token requests.
    pub fn token_queries(&self) -> Vec<String> {
        self.state.lock().unwrap().token_queries.clone()
    }

    /// How many requests (any method) reached `path`.
    pub fn hits(&self, path: &str) -> usize {
        self.state.lock().unwrap().hits.get(path).copied().unwrap_or(0)
    }
}

impl Drop for FaultUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A [`Private`] registry's answer to `path` for `auth`.
fn private_reply(state: &State, private: &Private, path: &str, auth: Option<&str>) -> Reply {
    if path == "/token" {
        let token = if auth == Some(private.basic.as_str()) {
            private.token.as_str()
        } else {
            ANONYMOUS_TOKEN
        };
        let body = format!(r#"{{"token":"{token}","expires_in":300}}"#).into_bytes();
        return Reply::ok(body, &[("content-type", "application/json")]);
    }
    if !path.starts_with("/v2/") {
        return state
            .replies
            .get(path)
            .cloned()
            .unwrap_or_else(|| Reply::status(404, &[]));
    }
    let Some(auth) = auth else {
        let challenge = format!(r#"Bearer realm="http://{}/token",service="fault""#, state.addr.unwrap());
        return Reply::status(401, &[("www-authenticate", &challenge)]);
    };
    let holder = auth == format!("Bearer {}", private.token)
        || private.also.iter().any(|a| a == auth)
        || state.browsable.iter().any(|p| p == path);
    match state.replies.get(path) {
        Some(reply) if holder => reply.clone(),
        None if holder => Reply::status(404, &[]),
        _ => private.otherwise.clone(),
    }
}

type Body = StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, std::io::Error>>>;

fn reply(state: &Mutex<State>, req: &Request<hyper::body::Incoming>) -> (Duration, Response<Body>) {
    let path = req.uri().path().to_owned();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or_default().to_owned())
    };
    let (auth, range) = (header("authorization"), header("range"));
    let (first_hit, reply) = {
        let mut state = state.lock().unwrap();
        let hits = state.hits.entry(path.clone()).or_default();
        *hits += 1;
        let first_hit = *hits == 1;
        state.auth.entry(path.clone()).or_default().push(auth.clone());
        state.ranges.entry(path.clone()).or_default().push(range.clone());
        let reply = match (state.private.clone(), state.required_token.clone()) {
            (Some(private), _) => Some(private_reply(&state, &private, &path, auth.as_deref())),
            (None, required) => match required {
                Some(token) if path == "/token" => {
                    state
                        .token_queries
                        .push(req.uri().query().unwrap_or_default().to_owned());
                    let lifetime = state.token_lifetime.as_deref().unwrap_or("300");
                    let body = format!(r#"{{"token":"{token}","expires_in":{lifetime}}}"#).into_bytes();
                    Some(Reply::ok(body, &[("content-type", "application/json")]))
                }
                Some(token) if path.starts_with("/v2/") && auth.as_deref() != Some(&format!("Bearer {token}")) => {
                    let challenge = format!(r#"Bearer realm="http://{}/token",service="fault""#, state.addr.unwrap());
                    Some(Reply::status(401, &[("www-authenticate", &challenge)]))
                }
                _ => state.replies.get(&path).cloned(),
            },
        };
        (first_hit, reply)
    };
    let mut reply = reply.unwrap_or_else(|| Reply::status(404, &[]));
    if reply.reject_authorization && auth.is_some() {
        reply = Reply::status(400, &[]);
    }
    let total = reply.body.len();
    // `bytes=a-` or `bytes=a-b`.
    let span = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| {
            let a = a.parse::<usize>().ok()?;
            let b = match b {
                "" => None,
                b => Some(b.parse::<usize>().ok()?),
            };
            Some((a, b))
        })
        .filter(|(start, _)| reply.honor_range && reply.status == 200 && *start < total);
    let mut resp = Response::builder();
    let body = match span {
        Some((start, until)) => {
            let end = until.map_or(total - 1, |b| b.min(total - 1));
            resp = resp
                .status(206)
                .header("content-range", format!("bytes {start}-{end}/{total}"));
            &reply.body[start..=end]
        }
        None => {
            resp = resp.status(reply.status);
            &reply.body[..]
        }
    };
    // A bounded span goes at the link's pace: in chunks of the whole body's chunk size.
    let bounded = span.is_some_and(|(_, until)| until.is_some());
    if reply.sized {
        resp = resp.header("content-length", body.len());
    }
    for (k, v) in &reply.headers {
        resp = resp.header(k, v);
    }
    let head = req.method() == hyper::Method::HEAD;
    let (body, broken) = match reply.drop_after {
        Some(n) if first_hit && n < body.len() => (&body[..n], true),
        _ => (body, false),
    };
    let chunk_len = if bounded { total } else { body.len() }.div_ceil(reply.chunks).max(1);
    let mut frames: Vec<std::io::Result<Frame<Bytes>>> = if head {
        Vec::new()
    } else {
        body.chunks(chunk_len)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect()
    };
    if broken && !head {
        frames.push(Err(std::io::Error::other("connection dropped on purpose")));
    }
    let delay = if reply.first_fast && first_hit {
        Duration::ZERO
    } else {
        reply.chunk_delay
    };
    let stream = futures_util::stream::iter(frames.into_iter().enumerate())
        .then(move |(i, frame)| async move {
            if i > 0 {
                tokio::time::sleep(delay).await;
            }
            frame
        })
        .boxed();
    (reply.header_delay, resp.body(StreamBody::new(stream)).unwrap())
}

use futures_util::StreamExt;
