//! A tiny recording HTTP/1.1 server: logs every request (line + headers) and either answers a fixed status with an empty body or forwards to an upstream.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

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
                conns.spawn(serve_conn(stream, recorded.clone(), mode));
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

async fn serve_conn(stream: TcpStream, recorded: Arc<Mutex<Vec<RecordedRequest>>>, mode: Mode) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut parts = line.trim_end().splitn(3, ' ');
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            match reader.read_line(&mut h).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let body_len: u64 = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = Vec::new();
        if body_len > 0 && (&mut reader).take(body_len).read_to_end(&mut body).await.is_err() {
            return;
        }
        recorded.lock().unwrap().push(RecordedRequest {
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

async fn forward(
    client: &mut TcpStream,
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
