//! A test API server that speaks the Kubernetes REST protocol for Secrets in a namespace
//! (get, create), on `127.0.0.1:0`, recording every request. There is no cluster here.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[derive(Default)]
struct State {
    secrets: HashMap<(String, String), Value>,
    requests: Vec<(String, String)>,
    /// Answer creates with 409, as when another Job won the race.
    conflict_on_create: bool,
}

pub struct KubeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl KubeApi {
    pub async fn start() -> anyhow::Result<KubeApi> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state: Arc<Mutex<State>> = Arc::default();
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(&state, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(KubeApi { addr, state, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at this server, with no credentials.
    pub fn write_kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: default\nusers:\n- name: test\n  user: {{}}\ncurrent-context: test\n",
            self.url()
        );
        std::fs::write(&path, text).expect("writing kubeconfig");
        path
    }

    pub fn secret(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .secrets
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// `(method, path)` of every request.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn conflict_on_create(&self) {
        self.state.lock().unwrap().conflict_on_create = true;
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn respond(code: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn status(code: u16, reason: &str, message: String) -> Response<Full<Bytes>> {
    respond(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

async fn answer(state: &Mutex<State>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    state.lock().unwrap().requests.push((method.clone(), path.clone()));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["api", "v1", "namespaces", ns, "secrets", name]) => {
            match state
                .lock()
                .unwrap()
                .secrets
                .get(&((*ns).to_owned(), (*name).to_owned()))
            {
                Some(secret) => respond(200, secret.clone()),
                None => status(404, "NotFound", format!("secrets \"{name}\" not found")),
            }
        }
        ("POST", ["api", "v1", "namespaces", ns, "secrets"]) => {
            let ns = (*ns).to_owned();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let Ok(mut secret) = serde_json::from_slice::<Value>(&body) else {
                return status(400, "BadRequest", "body is not JSON".into());
            };
            let name = secret["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            let mut state = state.lock().unwrap();
            if state.conflict_on_create || state.secrets.contains_key(&(ns.clone(), name.clone())) {
                return status(409, "AlreadyExists", format!("secrets \"{name}\" already exists"));
            }
            secret["metadata"]["namespace"] = json!(ns);
            secret["metadata"]["resourceVersion"] = json!("1");
            state.secrets.insert((ns, name), secret.clone());
            respond(201, secret)
        }
        _ => status(404, "NotFound", format!("no route for {method} {path}")),
    }
}
