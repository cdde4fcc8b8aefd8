//! A tiny recording HTTP/1.1 server: logs every request (line + headers) and either answers a fixed status with an empty body or forwards to an upstream.
//! [`SpyProxy`] does the same as an HTTPS proxy that terminates TLS, to see what a client sends
//! inside its tunnels.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use super::tls::TestCa;

#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Request target as sent (path + `?query`).
    pub target: String,
    /// Headers in order, names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Answer every request with this status and `Content-Length: 0`.
    Status(u16),
    /// Forward each request to this upstream on a fresh connection
    /// (`Connection: close` both ways) and relay the response verbatim.
    Forward(SocketAddr),
}

/// Records every request it receives, in arrival order.
pub struct SpyServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    task: JoinHandle<()>,
}

impl SpyServer {
    /// Answers 404 to everything.
    pub async fn start() -> Result<SpyServer> {
        Self::start_with_status(404).await
    }

    /// Answers `status` (empty body) to everything.
    pub async fn start_with_status(status: u16) -> Result<SpyServer> {
        Self::start_mode(Mode::Status(status)).await
    }

    /// A recording reverse proxy in front of `upstream` (e.g. a `Registry`'s
    /// `addr()`): lets a test see exactly what a client sends, headers included.
    pub async fn start_forwarding(upstream: SocketAddr) -> Result<SpyServer> {
        Self::start_mode(Mode::Forward(upstream)).await
    }

    async fn start_mode(mode: Mode) -> Result<SpyServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding spy server")?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            // Dropping the JoinSet (when this task is aborted) aborts all connections.
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let recorded = recorded.clone();
                conns.spawn(serve_conn(stream, move |r| recorded.lock().unwrap().push(r), mode));
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(SpyServer { addr, requests, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for SpyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request head: method, target and headers (names lower-cased); None at EOF.
async fn read_head<S: AsyncRead + Unpin>(reader: &mut BufReader<S>) -> Option<RecordedRequest> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.trim_end().splitn(3, ' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).await.ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Some(RecordedRequest {
        method,
        target,
        headers,
    })
}

/// Serves one connection: every request head goes to `record` before it is answered.
async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin>(stream: S, record: impl Fn(RecordedRequest), mode: Mode) {
    let mut reader = BufReader::new(stream);
    loop {
        let Some(RecordedRequest {
            method,
            target,
            headers,
        }) = read_head(&mut reader).await
        else {
            return;
        };
        let body_len: u64 = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = Vec::new();
        if body_len > 0 && (&mut reader).take(body_len).read_to_end(&mut body).await.is_err() {
            return;
        }
        record(RecordedRequest {
            method: method.clone(),
            target: target.clone(),
            headers: headers.clone(),
        });
        match mode {
            Mode::Status(status) => {
                let resp = format!("HTTP/1.1 {status} Spy\r\nContent-Length: 0\r\n\r\n");
                if reader.get_mut().write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
            Mode::Forward(upstream) => {
                let _ = forward(reader.get_mut(), upstream, &method, &target, &headers, &body).await;
                return;
            }
        }
    }
}

async fn forward<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    upstream: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut up = TcpStream::connect(upstream).await?;
    let mut head = format!("{method} {target} HTTP/1.1\r\n");
    for (k, v) in headers {
        if k != "connection" && k != "keep-alive" {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    head.push_str("Connection: close\r\n\r\n");
    up.write_all(head.as_bytes()).await?;
    up.write_all(body).await?;
    // The upstream closes after one response (Connection: close), and so do
    // we; Go's HTTP client handles the close without retrying the request.
    tokio::io::copy(&mut up, client).await?;
    client.shutdown().await
}

/// One request seen by a [`SpyProxy`]: the CONNECT itself (`tunnel` None), or a request inside
/// the tunnel it opened (`tunnel` = the CONNECT target, e.g. `registry.test.invalid:443`).
#[derive(Debug, Clone)]
pub struct ProxiedRequest {
    pub tunnel: Option<String>,
    pub request: RecordedRequest,
}

/// A recording HTTPS proxy that intercepts every tunnel: it accepts `CONNECT host:443`, ends
/// TLS with a certificate for `host` from a [`TestCa`] (clients must trust it, e.g. through
/// `SSL_CERT_FILE`), records each request inside and forwards it in plain HTTP to the address
/// `routes` gives that host, as [`SpyServer::start_forwarding`] does. A CONNECT to a host
/// without a route is answered 403.
pub struct SpyProxy {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<ProxiedRequest>>>,
    task: JoinHandle<()>,
}

impl SpyProxy {
    /// `routes`: host name (without port) → plain-HTTP upstream.
    pub async fn start(ca: &TestCa, routes: &[(&str, SocketAddr)]) -> Result<SpyProxy> {
        let mut acceptors = HashMap::new();
        for (host, upstream) in routes {
            acceptors.insert(host.to_string(), (ca.acceptor_for(host)?, *upstream));
        }
        let acceptors = Arc::new(acceptors);
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding spy proxy")?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                conns.spawn(proxy_conn(stream, acceptors.clone(), recorded.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(SpyProxy { addr, requests, task })
    }

    /// `http://127.0.0.1:PORT`, for `HTTPS_PROXY`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything so far, CONNECTs and tunnelled requests, in arrival order.
    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for SpyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Acceptors = HashMap<String, (tokio_rustls::TlsAcceptor, SocketAddr)>;

async fn proxy_conn(stream: TcpStream, acceptors: Arc<Acceptors>, recorded: Arc<Mutex<Vec<ProxiedRequest>>>) {
    let mut reader = BufReader::new(stream);
    let Some(connect) = read_head(&mut reader).await else {
        return;
    };
    let tunnel = connect.target.clone();
    recorded.lock().unwrap().push(ProxiedRequest {
        tunnel: None,
        request: connect.clone(),
    });
    let host = tunnel.rsplit_once(':').map_or(tunnel.as_str(), |(h, _)| h);
    let route = acceptors.get(host).filter(|_| connect.method == "CONNECT");
    let mut stream = reader.into_inner();
    let Some((acceptor, upstream)) = route else {
        let _ = stream
            .write_all(b"HTTP/1.1 403 No Route\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    };
    if stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.is_err() {
        return;
    }
    let Ok(tls) = acceptor.accept(stream).await else {
        return;
    };
    let record = move |request| {
        recorded.lock().unwrap().push(ProxiedRequest {
            tunnel: Some(tunnel.clone()),
            request,
        })
    };
    serve_conn(tls, record, Mode::Forward(*upstream)).await;
}
