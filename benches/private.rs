//! What checking a client's own credentials costs: a cached private pull against a cached
//! public one, through pullcache's intercept mode (the release binary), from the real
//! registry with token auth. A pull is what containerd sends on one connection: `HEAD` of
//! the tag, `GET` of the manifest by digest, then the config and layer blobs. Each private
//! pull shows a token of its own, as a new pull does, so pullcache asks the registry once
//! (a `HEAD` with that token); a public pull asks nothing. Prints a markdown table;
//! `bench/run` calls it and BENCHMARKS.md keeps the figures.
//!
//!     cargo bench --bench private -- [--pulls 30]

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use http_body_util::BodyExt;

use support::bench::{bench_args, count_arg, median};
use support::images::PushedImage;
use support::token_service::TokenService;

/// The registry as clients name it; pullcache intercepts it.
const REGISTRY: &str = "registry.test";
const LAYERS: &[usize] = &[4 << 20, 1 << 20];

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// `CONNECT REGISTRY:443` through pullcache, TLS with its CA, one keep-alive connection.
async fn connect(proxy: SocketAddr, ca: &Path) -> Result<Sender> {
    let tls = support::tls::connect_through_proxy(proxy, REGISTRY, &support::tls::connector_trusting(ca)?).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One pull of `image` as containerd sends it, with `token` or anonymously; its duration.
async fn pull(sender: &mut Sender, image: &PushedImage, token: Option<&str>) -> Result<Duration> {
    let repo = &image.name;
    let started = Instant::now();
    let mut requests = vec![(hyper::Method::HEAD, format!("/v2/{repo}/manifests/{}", image.tag))];
    requests.push((
        hyper::Method::GET,
        format!("/v2/{repo}/manifests/{}", image.manifest_digest),
    ));
    for blob in &image.blobs {
        requests.push((hyper::Method::GET, format!("/v2/{repo}/blobs/{}", blob.digest)));
    }
    for (method, path) in requests {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(&path)
            .header("host", REGISTRY)
            .header(
                "accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*",
            );
        if let Some(token) = token {
            req = req.header("authorization", token);
        }
        sender
            .ready()
            .await
            .with_context(|| format!("{path}: the connection closed"))?;
        let resp = sender
            .send_request(req.body(http_body_util::Empty::new())?)
            .await
            .with_context(|| path.clone())?;
        ensure!(resp.status() == 200, "{path}: {}", resp.status());
        resp.into_body().collect().await?;
    }
    Ok(started.elapsed())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // `cargo test --all-targets` builds and runs benches without `--bench`: it only checks
    // that this compiles; the benchmark itself runs under `cargo bench` (bench/run).
    let Some(args) = bench_args() else {
        return Ok(());
    };
    let pulls = count_arg(&args, "--pulls", 30)?;

    let dir = tempfile::tempdir()?;
    let tokens = TokenService::start(&[("cache", "cache-pw"), ("alice", "alice-pw")], true).await?;
    tokens.grant_only("cache", &["team/app", "public/app"]);
    tokens.grant_only("alice", &["team/app"]);
    tokens.grant_only("", &["public/app"]);
    let (registry, images) = support::registry::with_token_auth(
        dir.path(),
        &tokens,
        &[("team/app", "v1", LAYERS), ("public/app", "v1", LAYERS)],
    )
    .await?;
    let (private, public) = (&images[0], &images[1]);

    let config = dir.path().join("pullcache.toml");
    std::fs::write(
        &config,
        format!(
            "[registries.\"{REGISTRY}\"]\nurl = \"{}\"\nusername = \"cache\"\npassword = \"cache-pw\"\n",
            registry.url()
        ),
    )?;
    let ca_dir = dir.path().join("ca");
    let served = support::binary::serve(
        [
            "--cache-dir".to_owned(),
            dir.path().join("cache").display().to_string(),
            format!("--config={}", config.display()),
            format!("--ca-dir={}", ca_dir.display()),
        ],
        "warn,pullcache=info",
    )
    .await?;
    let support::binary::Served {
        child: _pullcache,
        addr,
        metrics_addr,
        mut stdout,
        ..
    } = served;
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
    let proxy: SocketAddr = addr.parse()?;
    let ca = ca_dir.join(pullcache::ca::CERT_FILE);

    // Tokens as containerd would take them, one per pull, before the clock starts.
    let mut fresh = Vec::new();
    for _ in 0..=pulls {
        let resp = support::http_client()
            .get(format!(
                "{}?service={}&scope=repository:team/app:pull",
                tokens.realm(),
                tokens.service()
            ))
            .basic_auth("alice", Some("alice-pw"))
            .send()
            .await?;
        let body: serde_json::Value = resp.json().await?;
        fresh.push(format!("Bearer {}", body["token"].as_str().context("no token")?));
    }
    // Warm both images into the cache (and learn which repository is private).
    let mut sender = connect(proxy, &ca).await?;
    pull(&mut sender, private, Some(&fresh[pulls])).await?;
    pull(&mut sender, public, None).await?;
    let checks = |metrics: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("pullcache_authorization_checks_total{") && l.contains("as=\"client\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let metrics = || async {
        anyhow::Ok(
            support::http_client()
                .get(format!("http://{metrics_addr}/metrics"))
                .send()
                .await?
                .text()
                .await?,
        )
    };
    let before = checks(&metrics().await?);
    let gets_before = registry.access_log().len();

    let (mut private_times, mut public_times) = (Vec::new(), Vec::new());
    for token in fresh.iter().take(pulls) {
        private_times.push(pull(&mut sender, private, Some(token)).await?);
        public_times.push(pull(&mut sender, public, None).await?);
    }
    let asked = checks(&metrics().await?) - before;
    let upstream = registry.access_log().len() - gets_before;
    let (private_time, public_time) = (median(private_times), median(public_times));
    let size: usize = LAYERS.iter().sum::<usize>() >> 20;
    println!(
        "| a cached pull through intercept mode ({size} MiB, {pulls} interleaved pulls) | median | against public | upstream requests per pull |"
    );
    println!("| --- | --- | --- | --- |");
    println!(
        "| public image, no credentials | {:.2} ms | 1.00× | 0 |",
        public_time.as_secs_f64() * 1e3
    );
    println!(
        "| private image, a new token each pull | {:.2} ms | {:.2}× | {:.2} (the token's check) |",
        private_time.as_secs_f64() * 1e3,
        private_time.as_secs_f64() / public_time.as_secs_f64(),
        asked / pulls as f64
    );
    ensure!(
        upstream as f64 == asked,
        "the registry saw {upstream} requests for {asked} checks: something else went upstream"
    );
    Ok(())
}
