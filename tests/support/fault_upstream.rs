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
}

impl Reply {
    pub fn ok(body: Vec<u8>, headers: &[(&str, &str)]) -> Reply {
        Reply {
            status: 200,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body,
            chunks: 1,
            chunk_delay: Duration::ZERO,
            header_delay: Duration::ZERO,
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

    pub fn slowly(mut self, chunks: usize, chunk_delay: Duration) -> Reply {
        self.chunks = chunks.max(1);
        self.chunk_delay = chunk_delay;
        self
    }
}

#[derive(Default)]
struct State {
    addr: Option<SocketAddr>,
    replies: HashMap<String, Reply>,
    hits: HashMap<String, usize>,
    /// `Authorization` of each request, by path.
    auth: HashMap<String, Vec<Option<String>>>,
    /// Query strings sent to `/token`.
    token_queries: Vec<String>,
    /// When set, `/v2/` paths demand `Bearer <token>`, issued anonymously at `/token`.
    required_token: Option<String>,
}

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
        self.state
            .lock()
            .unwrap()
            .replies
            .insert(path.to_owned(), reply);
    }

    /// Demands `Authorization: Bearer <token>` on `/v2/` paths, with a challenge whose realm is
    /// this server's `/token`, which hands the token out to anyone.
    pub fn require_token(&self, token: &str) {
        self.state.lock().unwrap().required_token = Some(token.to_owned());
    }

    /// The `Authorization` header of every request to `path`, in order.
    pub fn auth_seen(&self, path: &str) -> Vec<Option<String>> {
        self.state
            .lock()
            .unwrap()
            .auth
            .get(path)
            .cloned()
            .unwrap_or_default()
    }

    /// The query strings of token requests.
    pub fn token_queries(&self) -> Vec<String> {
        self.state.lock().unwrap().token_queries.clone()
    }

    /// How many requests (any method) reached `path`.
    pub fn hits(&self, path: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .hits
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for FaultUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

fn reply(state: &Mutex<State>, req: &Request<hyper::body::Incoming>) -> (Duration, Response<Body>) {
    let path = req.uri().path().to_owned();
    let auth = req
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let reply = {
        let mut state = state.lock().unwrap();
        *state.hits.entry(path.clone()).or_default() += 1;
        state
            .auth
            .entry(path.clone())
            .or_default()
            .push(auth.clone());
        match state.required_token.clone() {
            Some(token) if path == "/token" => {
                state
                    .token_queries
                    .push(req.uri().query().unwrap_or_default().to_owned());
                let body = format!(r#"{{"token":"{token}","expires_in":300}}"#).into_bytes();
                Some(Reply::ok(body, &[("content-type", "application/json")]))
            }
            Some(token)
                if path.starts_with("/v2/")
                    && auth.as_deref() != Some(&format!("Bearer {token}")) =>
            {
                let challenge = format!(
                    r#"Bearer realm="http://{}/token",service="fault""#,
                    state.addr.unwrap()
                );
                Some(Reply::status(401, &[("www-authenticate", &challenge)]))
            }
            _ => state.replies.get(&path).cloned(),
        }
    };
    let reply = reply.unwrap_or_else(|| Reply::status(404, &[]));
    let mut resp = Response::builder()
        .status(reply.status)
        .header("content-length", reply.body.len());
    for (k, v) in &reply.headers {
        resp = resp.header(k, v);
    }
    let head = req.method() == hyper::Method::HEAD;
    let chunk_len = reply.body.len().div_ceil(reply.chunks).max(1);
    let chunks: Vec<Bytes> = if head {
        Vec::new()
    } else {
        reply
            .body
            .chunks(chunk_len)
            .map(Bytes::copy_from_slice)
            .collect()
    };
    let delay = reply.chunk_delay;
    let stream = futures_util::stream::iter(chunks.into_iter().enumerate())
        .then(move |(i, chunk)| async move {
            if i > 0 {
                tokio::time::sleep(delay).await;
            }
            Ok(Frame::data(chunk))
        })
        .boxed();
    (
        reply.header_delay,
        resp.body(StreamBody::new(stream)).unwrap(),
    )
}

use futures_util::StreamExt;
