//! What operators see. containerd pulls real images through pullcache, a herd shares one
//! slow download, and `/metrics` (parsed by a real Prometheus text parser) must agree with
//! what happened. `/readyz` is 503 until the cache opens, and the Grafana dashboard only
//! queries metrics that exist.

use crate::support;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context as _;

use prometheus_parse::{Scrape, Value};
use support::containerd::{Containerd, write_hosts_toml};
use support::fault_upstream::{FaultUpstream, Reply};
use support::images::{push_oci_image, random_bytes, sha256_digest};
use support::pullcache::Pullcache;
use support::registry::Registry;

const REGISTRY: &str = "registry.test";
const SLOW: &str = "slow.test";
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/pullcache-dashboard.json");

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("/metrics is valid Prometheus text")
}

/// The sum of a counter's or gauge's samples whose labels include `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => panic!("{name} is not a plain value"),
        })
        .sum()
}

/// A label-less line's value, e.g. a histogram's `_sum` or `_count`.
fn line(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_what_happened() -> anyhow::Result<()> {
    let registry = Registry::start().await?;
    let image = push_oci_image(&registry.url(), "team/app", "v1", &[300 * 1024, 20 * 1024]).await?;
    let slow = FaultUpstream::start().await?;
    slow.require_token("t0ken");
    let herd_blob = random_bytes(2 * 1024 * 1024);
    let herd_digest = sha256_digest(&herd_blob);
    let herd_path = format!("/v2/team/herd/blobs/{herd_digest}");
    slow.set(
        &herd_path,
        Reply::ok(
            herd_blob,
            &[
                ("ratelimit-limit", "100;w=21600"),
                ("ratelimit-remaining", "42;w=21600"),
            ],
        )
        .slowly(10, Duration::from_millis(40)),
    );

    let cache = tempfile::tempdir()?;
    let pullcache = Pullcache::start(
        cache.path(),
        &[(REGISTRY, &registry.url()), (SLOW, &slow.url())],
        Duration::from_secs(3600),
    )
    .await?;
    let hosts = tempfile::tempdir()?;
    write_hosts_toml(hosts.path(), REGISTRY, "http://127.0.0.1:1", &pullcache.url());
    let reference = image.reference(REGISTRY);
    let blobs: u64 = image.blobs.iter().map(|b| b.size).sum();
    let blob_count = image.blobs.len() as f64;
    assert_eq!(blob_count, 3.0, "config and two layers");

    // Cold pull: every blob is a miss, streamed from upstream.
    Containerd::start().await?.pull(&reference, hosts.path()).await?;
    let text = pullcache.metrics().await?;
    let scrape = parse(&text);
    let blob_requests = |cache| [("route", "blob"), ("cache", cache), ("status_class", "2xx")];
    assert_eq!(
        value(&scrape, "pullcache_requests_total", &blob_requests("miss")),
        blob_count
    );
    assert_eq!(value(&scrape, "pullcache_requests_total", &blob_requests("hit")), 0.0);
    assert_eq!(
        value(
            &scrape,
            "pullcache_served_bytes_total",
            &[("source", "upstream"), ("route", "blob")]
        ),
        blobs as f64
    );
    assert_eq!(
        value(&scrape, "pullcache_upstream_bytes_total", &[("registry", REGISTRY)]),
        (blobs + image.manifest.len() as u64) as f64,
        "upstream bytes are the blobs plus the one manifest GET"
    );
    let upstream = |kind| [("registry", REGISTRY), ("kind", kind), ("status_class", "2xx")];
    assert_eq!(
        value(&scrape, "pullcache_upstream_requests_total", &upstream("blob")),
        blob_count
    );
    assert_eq!(
        value(&scrape, "pullcache_upstream_requests_total", &upstream("manifest")),
        1.0
    );

    // Warm pull by a fresh containerd: every blob is a hit, served from the cache.
    Containerd::start().await?.pull(&reference, hosts.path()).await?;
    let scrape = parse(&pullcache.metrics().await?);
    assert_eq!(
        value(&scrape, "pullcache_requests_total", &blob_requests("hit")),
        blob_count
    );
    assert_eq!(
        value(&scrape, "pullcache_requests_total", &blob_requests("miss")),
        blob_count
    );
    assert_eq!(
        value(
            &scrape,
            "pullcache_served_bytes_total",
            &[("source", "cache"), ("route", "blob")]
        ),
        blobs as f64
    );
    assert_eq!(
        value(&scrape, "pullcache_upstream_requests_total", &upstream("blob")),
        blob_count
    );

    // A herd of 8 on one slow cold blob: one miss, seven coalesced, one download.
    let url = format!("{}{herd_path}?ns={SLOW}", pullcache.url());
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { support::http_client().get(url).send().await?.bytes().await })
        })
        .collect();
    for client in clients {
        assert_eq!(client.await??.len(), 2 * 1024 * 1024);
    }
    let text = pullcache.metrics().await?;
    let scrape = parse(&text);
    assert_eq!(
        value(&scrape, "pullcache_requests_total", &blob_requests("miss")),
        blob_count + 1.0
    );
    assert_eq!(
        value(&scrape, "pullcache_requests_total", &blob_requests("coalesced")),
        7.0
    );
    assert_eq!(slow.hits(&herd_path), 2, "one 401 challenge, then one download");
    assert_eq!(line(&text, "pullcache_flight_waiters_count"), blob_count + 1.0);
    assert_eq!(line(&text, "pullcache_flight_waiters_sum"), blob_count + 8.0);
    assert_eq!(value(&scrape, "pullcache_inflight_fetches", &[]), 0.0);
    assert_eq!(
        value(
            &scrape,
            "pullcache_token_fetches_total",
            &[("registry", SLOW), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        value(&scrape, "pullcache_upstream_ratelimit_remaining", &[("registry", SLOW)]),
        42.0
    );
    assert_eq!(
        value(&scrape, "pullcache_upstream_ratelimit_limit", &[("registry", SLOW)]),
        100.0
    );
    assert_eq!(value(&scrape, "pullcache_digest_verification_failures_total", &[]), 0.0);
    let stored = blobs + image.manifest.len() as u64 + 2 * 1024 * 1024;
    assert_eq!(value(&scrape, "pullcache_cache_bytes", &[]), stored as f64);
    assert_eq!(value(&scrape, "pullcache_cache_blobs", &[]), blob_count + 2.0);
    assert!(value(&scrape, "pullcache_filesystem_free_bytes", &[]) > 0.0);
    assert_eq!(value(&scrape, "pullcache_build_info", &[]), 1.0);

    // Every metric the dashboard queries exists in this scrape.
    let names: BTreeSet<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD)?)?;
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for name in metric_names(expr) {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix).filter(|b| names.contains(b)))
                    .unwrap_or(&name);
                assert!(names.contains(base), "dashboard queries {name}, which /metrics lacks");
                queried += 1;
            }
        }
    }
    assert!(queried >= 12, "the dashboard queries only {queried} metrics");
    Ok(())
}

/// The `pullcache_*` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("pullcache_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_cache_opens() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The cache directory cannot be created while a file stands where its parent should be,
    // like a hostPath that is not mounted yet.
    let blocker = dir.path().join("disk");
    std::fs::write(&blocker, b"not a directory")?;
    // The binary, for its log: "not ready" is checked once it has tried and failed to open
    // the cache, not after a guess at how long that takes.
    let cache = blocker.join("cache").display().to_string();
    let mut served = support::binary::serve(["--cache-dir", &cache], "pullcache=info").await?;
    let client = support::http_client();
    let admin = |path: &str| format!("http://{}{path}", served.metrics_addr);
    let api = format!("http://{}/v2/", served.addr);

    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = served.stdout.next_line().await? {
            let json: serde_json::Value = serde_json::from_str(&line)?;
            if json["fields"]["message"] == "cannot open the cache; not ready" {
                return Ok(());
            }
        }
        anyhow::bail!("pullcache exited before it tried to open the cache")
    })
    .await
    .context("pullcache never logged that it cannot open the cache")??;
    assert_eq!(client.get(admin("/healthz")).send().await?.status(), 200);
    assert_eq!(client.get(admin("/readyz")).send().await?.status(), 503);
    let resp = client.get(&api).send().await?;
    assert_eq!(
        resp.status(),
        503,
        "the API must refuse at once, so containerd moves on"
    );
    let json: serde_json::Value = resp.json().await?;
    assert_eq!(json["errors"][0]["code"], "UNAVAILABLE");

    std::fs::remove_file(&blocker)?;
    std::fs::create_dir(&blocker)?;
    served.wait_ready().await?;
    assert_eq!(client.get(&api).send().await?.status(), 200);
    Ok(())
}
