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
}

fn options() -> Result<Options> {
    let mut opts = Options {
        nodes: 8,
        image_mib: 100,
        rate_mbit: 100,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("a value").and_then(|v| Ok(v.parse::<u64>()?));
        match arg.as_str() {
            "--nodes" => opts.nodes = value()? as usize,
            "--image-mib" => opts.image_mib = value()? as usize,
            "--rate-mbit" => opts.rate_mbit = value()?,
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
    tokio::time::sleep(Duration::from_millis(300)).await;
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
