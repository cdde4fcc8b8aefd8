//! The cluster benchmark: N namespaced nodes, each with pullcache and a real containerd,
//! behind one throttled upstream link (the multi-node test harness, `tests/support`), roll
//! out one image at once, with cluster mode off and on, beside one node pulling alone. It
//! prints a markdown table; `bench/run` calls it and BENCHMARKS.md keeps the figures.
//!
//!     cargo bench --bench cluster -- [--nodes 8] [--image-mib 100] [--rate-mbit 100]

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures_util::future::try_join_all;
use support::cluster::{Cluster, ClusterOptions, MBIT, Node, REGISTRY_NAME};
use support::images::{PushedImage, push_oci_image};

const PEER_PORT: u16 = 7443;
const MAX_UPLOADS: u32 = 4;

struct Options {
    nodes: usize,
    image_mib: usize,
    rate_mbit: u64,
    /// Also measure TLS serving with 8 clients against nginx over TLS (`--tls`).
    tls: bool,
}

fn options() -> Result<Options> {
    let mut opts = Options {
        nodes: 8,
        image_mib: 100,
        rate_mbit: 100,
        tls: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("a value").and_then(|v| Ok(v.parse::<u64>()?));
        match arg.as_str() {
            "--nodes" => opts.nodes = value()? as usize,
            "--image-mib" => opts.image_mib = value()? as usize,
            "--rate-mbit" => opts.rate_mbit = value()?,
            "--tls" => opts.tls = true,
            _ => {} // cargo's own `--bench`
        }
    }
    Ok(opts)
}

/// What one rollout measured.
struct Rollout {
    /// From the start of the pulls until the last node unpacked.
    last_done: Duration,
    /// Blob and manifest bytes the upstream sent.
    upstream_bytes: u64,
    /// The most blob bytes any node sent its peers.
    most_sent: f64,
    /// Cluster mode: a warm layer from a node's peer port over mutual TLS, and the same from
    /// its registry API in plain HTTP, in bytes/s (median of interleaved rounds).
    tls_vs_plain: Option<(f64, f64)>,
}

const TRANSFER_ROUNDS: usize = 5;

/// Serves a warm layer from node 0 to a client inside node 0, from the peer port (mutual
/// TLS, with a certificate from the cluster CA) and from the registry API (plain HTTP,
/// `sendfile`), in turns; returns the median rates.
async fn tls_vs_plain(node: &Node, ca_dir: &std::path::Path, digest: &str) -> Result<(f64, f64)> {
    use base64::Engine as _;
    let ca = pullcache::ca::Ca::load(ca_dir)?;
    let (chain, key) = ca.peer_certificate(node.addr().into())?;
    let pem = |label: &str, der: &[u8]| {
        let text = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = text
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
    };
    let cert_file = ca_dir.join("client.crt");
    let key_file = ca_dir.join("client.key");
    std::fs::write(
        &cert_file,
        chain.iter().map(|c| pem("CERTIFICATE", c)).collect::<String>(),
    )?;
    std::fs::write(&key_file, pem("PRIVATE KEY", key.secret_der()))?;
    let path = format!("/v2/bench/app/blobs/{digest}?ns={REGISTRY_NAME}");
    let plain = format!("{}{path}", node.pullcache_url());
    let tls = format!("https://{}{path}", peer_addr(node));
    let files = [
        ca_dir.join(pullcache::ca::CERT_FILE).display().to_string(),
        cert_file.display().to_string(),
        key_file.display().to_string(),
    ];
    let (mut tls_rates, mut plain_rates) = (Vec::new(), Vec::new());
    for _ in 0..TRANSFER_ROUNDS {
        tls_rates.push(curl_rate(node, &tls, Some(&files)).await?);
        plain_rates.push(curl_rate(node, &plain, None).await?);
    }
    Ok((median(tls_rates), median(plain_rates)))
}

/// The rate of one GET of `url` with curl inside `node`, with `[CA, certificate, key]` files
/// for mutual TLS.
async fn curl_rate(node: &Node, url: &str, mtls: Option<&[String; 3]>) -> Result<f64> {
    let mut args = vec!["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{speed_download}"];
    if let Some([ca, cert, key]) = mtls {
        args.extend(["--cacert", ca, "--cert", cert, "--key", key]);
    }
    args.push(url);
    let out = node.netns().output(&args, Duration::from_secs(60)).await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (code, speed) = text.split_once(' ').context("curl's output")?;
    ensure!(code == "200", "{url}: {code} {}", String::from_utf8_lossy(&out.stderr));
    Ok(speed.trim().parse::<f64>()?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn peer_addr(node: &Node) -> SocketAddr {
    SocketAddr::new(node.addr().into(), PEER_PORT)
}

/// Starts a cluster of `nodes`, pushes the image and rolls it out on every node at once.
async fn rollout(opts: &Options, nodes: usize, cluster_mode: bool) -> Result<Rollout> {
    let cluster = Cluster::start(ClusterOptions {
        nodes,
        upstream_rate: Some(opts.rate_mbit * MBIT),
    })
    .await?;
    let ca = tempfile::tempdir()?;
    pullcache::ca::init(&ca.path().join("ca"))?;
    let peers: Vec<String> = cluster.nodes().iter().map(|n| peer_addr(n).to_string()).collect();
    try_join_all(cluster.nodes().iter().map(|node| {
        let mut args: Vec<String> = Vec::new();
        if cluster_mode {
            args.extend([
                format!("--peer-listen={}", peer_addr(node)),
                format!("--peer-ca-dir={}", ca.path().join("ca").display()),
                format!("--peer-max-uploads={MAX_UPLOADS}"),
            ]);
            args.extend(peers.iter().map(|p| format!("--peer={p}")));
        }
        node.start_pullcache(args)
    }))
    .await?;
    // Two layers of about equal size, and a small one.
    let half = (opts.image_mib << 20) / 2;
    let image = push_oci_image(&cluster.push_url(), "bench/app", "v1", &[half, half, 1 << 20]).await?;
    let reference = image.reference(REGISTRY_NAME);
    let started = Instant::now();
    try_join_all(cluster.nodes().iter().map(|node| node.pull(&reference))).await?;
    let last_done = started.elapsed();
    check_unpacked(&cluster, &image).await?;
    // Every download has ended and the registry has logged every request it answered.
    for node in cluster.nodes() {
        node.idle().await?;
    }
    cluster.registry().settle().await?;
    let upstream_bytes = cluster
        .registry()
        .access_log()
        .iter()
        .filter(|e| e.method == "GET" && e.user_agent.starts_with("pullcache/"))
        .map(|e| e.bytes)
        .sum();
    let mut most_sent = 0.0f64;
    for node in cluster.nodes() {
        most_sent = most_sent.max(node.metric("pullcache_peer_bytes_total{direction=\"out\"}").await?);
    }
    let tls_vs_plain = match cluster_mode {
        true => Some(tls_vs_plain(cluster.node(0), &ca.path().join("ca"), &image.largest_blob().digest).await?),
        false => None,
    };
    Ok(Rollout {
        last_done,
        upstream_bytes,
        most_sent,
        tls_vs_plain,
    })
}

async fn check_unpacked(cluster: &Cluster, image: &PushedImage) -> Result<()> {
    let reference = image.reference(REGISTRY_NAME);
    for node in cluster.nodes() {
        ensure!(
            node.containerd().is_unpacked(&reference).await?,
            "{} did not unpack",
            node.netns().name()
        );
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // `cargo test --all-targets` builds and runs benches without `--bench`: it only checks
    // that this compiles; the benchmark itself runs under `cargo bench` (bench/run).
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let opts = options()?;
    if opts.tls {
        return tls_serving::run().await;
    }
    let image_bytes = (opts.image_mib as u64) << 20;
    eprintln!(
        "cluster bench: {} nodes, a {} MiB image, upstream {} Mbit/s",
        opts.nodes, opts.image_mib, opts.rate_mbit
    );
    let alone = rollout(&opts, 1, false).await?;
    let off = rollout(&opts, opts.nodes, false).await?;
    let on = rollout(&opts, opts.nodes, true).await?;
    let image = |bytes: f64| format!("{:.2}×", bytes / image_bytes as f64);
    let vs_alone = |d: Duration| format!("{:.2}×", d.as_secs_f64() / alone.last_done.as_secs_f64());
    println!(
        "| {} nodes, {} MiB image, {} Mbit/s upstream | cluster mode off | cluster mode on | goal |",
        opts.nodes, opts.image_mib, opts.rate_mbit
    );
    println!("| --- | --- | --- | --- |");
    println!(
        "| upstream bytes (× the image) | {} | {} | 1× (off: {}×) |",
        image(off.upstream_bytes as f64),
        image(on.upstream_bytes as f64),
        opts.nodes
    );
    println!(
        "| last node done | {:.1} s ({}) | {:.1} s ({}) | ≤ 1.3× one node alone ({:.1} s) |",
        off.last_done.as_secs_f64(),
        vs_alone(off.last_done),
        on.last_done.as_secs_f64(),
        vs_alone(on.last_done),
        alone.last_done.as_secs_f64()
    );
    println!(
        "| most any node sent its peers (× the image) | {} | {} | ≤ {}× (max uploads + 1) |",
        image(off.most_sent),
        image(on.most_sent),
        MAX_UPLOADS + 1
    );
    if let Some((tls, plain)) = on.tls_vs_plain {
        println!(
            "| a warm {} MiB layer from a node's peer port (mutual TLS) vs its API (plain HTTP, sendfile), one stream | | {:.0} vs {:.0} MB/s ({:.2}×) | reported |",
            opts.image_mib / 2,
            tls / 1e6,
            plain / 1e6,
            tls / plain
        );
    }
    Ok(())
}

/// TLS serving with 8 keep-alive clients: a warm blob from a pullcache node's peer port
/// (mutual TLS) and through its intercept mode (CONNECT, then TLS with a certificate from
/// pullcache's CA), against nginx serving the same file over TLS. None of them can use
/// `sendfile` under TLS here (no kTLS), so this compares the user-space TLS paths.
mod tls_serving {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use anyhow::{Context, Result, ensure};
    use http_body_util::BodyExt;
    use rustls_pki_types::ServerName;
    use tokio::net::TcpStream;
    use tokio::time::{Duration, Instant};
    use tokio_rustls::TlsConnector;
    use tokio_rustls::client::TlsStream;

    use super::support;

    const CLIENTS: usize = 8;
    const SECONDS: u64 = 5;
    const ROUNDS: usize = 5;
    const BLOB_MIB: usize = 64;
    /// The registry name pullcache maps to the bench's registry, and intercepts.
    const REGISTRY: &str = "registry.test";

    /// How a client reaches one server.
    #[derive(Clone)]
    enum Dial {
        /// TLS straight to `addr`.
        Direct {
            addr: SocketAddr,
            tls: TlsConnector,
            name: ServerName<'static>,
        },
        /// `CONNECT REGISTRY:443` through the proxy at `addr`, then TLS inside the tunnel.
        Connect { addr: SocketAddr, tls: TlsConnector },
    }

    impl Dial {
        async fn connect(&self) -> Result<TlsStream<TcpStream>> {
            match self {
                Dial::Direct { addr, tls, name } => {
                    let tcp = TcpStream::connect(addr).await?;
                    tcp.set_nodelay(true)?;
                    Ok(tls.connect(name.clone(), tcp).await?)
                }
                Dial::Connect { addr, tls } => support::tls::connect_through_proxy(*addr, REGISTRY, tls).await,
            }
        }
    }

    /// Bytes/s that `CLIENTS` keep-alive connections made with `dial` pull from `path`.
    async fn load(dial: &Dial, host: &str, path: &str) -> Result<f64> {
        let bytes = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(SECONDS);
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            let tls = dial.connect().await?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            let (bytes, host, path) = (bytes.clone(), host.to_owned(), path.to_owned());
            clients.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let req = hyper::Request::get(&path)
                        .header("host", &host)
                        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
                    let resp = sender.send_request(req).await?;
                    ensure!(resp.status() == 200, "{path}: {}", resp.status());
                    let mut body = resp.into_body();
                    let mut got = 0;
                    while let Some(frame) = body.frame().await {
                        if let Some(data) = frame?.data_ref() {
                            got += data.len();
                            bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                    }
                    ensure!(got == BLOB_MIB << 20, "{path}: {got} bytes");
                }
                anyhow::Ok(())
            }));
        }
        for client in clients {
            client.await??;
        }
        Ok(bytes.load(Ordering::Relaxed) as f64 / SECONDS as f64)
    }

    /// nginx over TLS serving `root`, stopped (master and workers) when dropped.
    struct Nginx {
        child: tokio::process::Child,
        port: u16,
    }

    impl Nginx {
        async fn start(
            dir: &std::path::Path,
            root: &std::path::Path,
            cert: &std::path::Path,
            key: &std::path::Path,
        ) -> Result<Nginx> {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let conf = dir.join("nginx.conf");
            let work = dir.display();
            std::fs::write(
                &conf,
                format!(
                    "daemon off; worker_processes 2; pid {work}/nginx.pid; error_log {work}/nginx.err;\n\
                     events {{ worker_connections 1024; }}\n\
                     http {{ access_log off; sendfile on; keepalive_requests 100000;\n\
                     client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work}; uwsgi_temp_path {work}; scgi_temp_path {work};\n\
                     server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {}; ssl_certificate_key {}; root {}; }} }}\n",
                    cert.display(),
                    key.display(),
                    root.display()
                ),
            )?;
            let nginx_bin = which("nginx").context("nginx (Debian nginx-light; bench/run installs it)")?;
            let child = tokio::process::Command::new(nginx_bin)
                .args(["-c", &conf.display().to_string(), "-p", &work.to_string()])
                .kill_on_drop(true)
                .spawn()?;
            support::eventually(Duration::from_secs(10), "nginx to listen", || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
            })
            .await?;
            Ok(Nginx { child, port })
        }
    }

    impl Drop for Nginx {
        fn drop(&mut self) {
            // SIGTERM lets the master stop its workers; SIGKILL would leave them running.
            if let Some(pid) = self.child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while std::time::Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
    }

    pub async fn run() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let registry = support::registry::Registry::start().await?;
        let blob = support::images::random_bytes(BLOB_MIB << 20);
        let digest = support::images::push_blob(&registry.url(), "bench/tls", blob).await?;
        let ca = dir.path().join("cluster-ca");
        pullcache::ca::init(&ca)?;
        let intercept_ca = dir.path().join("intercept-ca");
        let cache = dir.path().join("cache");
        let served = support::binary::serve(
            [
                "--cache-dir".to_owned(),
                cache.display().to_string(),
                "--upstream".to_owned(),
                format!("{REGISTRY}={}", registry.url()),
                "--peer-listen=127.0.0.1:0".to_owned(),
                format!("--peer-ca-dir={}", ca.display()),
                format!("--ca-dir={}", intercept_ca.display()),
            ],
            "warn,pullcache=info",
        )
        .await?;
        let support::binary::Served {
            child: _pullcache,
            addr,
            mut stdout,
            logs,
            ..
        } = served;
        // Keep its logs drained, or it blocks writing them.
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        let peer: SocketAddr = logs
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|j| j["fields"]["message"] == "cluster mode")
            .and_then(|j| j["fields"]["peer_addr"].as_str().map(str::to_owned))
            .context("no peer address logged")?
            .parse()?;
        let path = format!("/v2/bench/tls/blobs/{digest}");
        let warm = support::http_client()
            .get(format!("http://{addr}{path}?ns={REGISTRY}"))
            .send()
            .await?;
        let status = warm.status();
        let body = warm.bytes().await?;
        ensure!(
            status == 200 && body.len() == BLOB_MIB << 20,
            "warming: {status}, {} bytes: {}",
            body.len(),
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
        let file = support::pullcache::blob_files(&cache)
            .into_iter()
            .find(|f| digest.ends_with(&*f.file_name().unwrap_or_default().to_string_lossy()))
            .context("the warm blob's file")?;

        // nginx over TLS, serving the same file.
        let test_ca = support::tls::TestCa::new();
        let ca_pem = test_ca.write_ca(dir.path());
        let (cert, key) = test_ca.issue_server(dir.path(), &["127.0.0.1"]);
        let root = dir.path().join("www");
        std::fs::create_dir_all(&root)?;
        std::fs::hard_link(&file, root.join("blob"))?;
        let nginx = Nginx::start(dir.path(), &root, &cert, &key).await?;

        let identity = pullcache::peers::tls::Identity::issue(&ca, peer.ip())?;
        let loopback = ServerName::IpAddress(peer.ip().into());
        let peers = Dial::Direct {
            addr: peer,
            tls: TlsConnector::from(Arc::new(identity.client_config())),
            name: loopback.clone(),
        };
        let intercept = Dial::Connect {
            addr: addr.parse()?,
            tls: support::tls::connector_trusting(&intercept_ca.join(pullcache::ca::CERT_FILE))?,
        };
        let nginx_dial = Dial::Direct {
            addr: SocketAddr::from(([127, 0, 0, 1], nginx.port)),
            tls: support::tls::connector_trusting(&ca_pem)?,
            name: loopback,
        };
        let (mut peer_rates, mut intercept_rates, mut nginx_rates) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            peer_rates.push(load(&peers, "127.0.0.1", &format!("{path}?ns={REGISTRY}")).await?);
            intercept_rates.push(load(&intercept, REGISTRY, &path).await?);
            nginx_rates.push(load(&nginx_dial, "127.0.0.1", "/blob").await?);
        }
        drop(nginx);
        println!(
            "| TLS serving, {CLIENTS} keep-alive clients, a warm {BLOB_MIB} MiB blob | MB/s (median of {ROUNDS} interleaved {SECONDS} s rounds) | against nginx | rounds against nginx | goal |"
        );
        println!("| --- | --- | --- | --- | --- |");
        let nginx_rate = super::median(nginx_rates.clone());
        println!("| nginx over TLS | {:.0} | 1.00× | | |", nginx_rate / 1e6);
        for (what, rates) in [
            ("pullcache peer port (mutual TLS)", peer_rates),
            ("pullcache intercept mode (CONNECT, then TLS)", intercept_rates),
        ] {
            // Each round against nginx's in the same round.
            let mut ratios: Vec<f64> = rates
                .iter()
                .zip(&nginx_rates)
                .map(|(ours, theirs)| ours / theirs)
                .collect();
            ratios.sort_by(f64::total_cmp);
            println!(
                "| {what} | {:.0} | {:.2}× | {:.2}–{:.2}× | ≥ 0.9× |",
                super::median(rates) / 1e6,
                super::median(ratios.clone()),
                ratios[0],
                ratios[ratios.len() - 1]
            );
        }
        Ok(())
    }

    fn which(program: &str) -> Option<std::path::PathBuf> {
        ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .map(|dir| std::path::Path::new(dir).join(program))
            .find(|p| p.exists())
    }
}
