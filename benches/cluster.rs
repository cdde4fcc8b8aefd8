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
    Ok(Rollout {
        last_done,
        upstream_bytes,
        most_sent,
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
    Ok(())
}
