//! The cache on a real disk over time: it keeps within its size budget while real pulls go
//! past it, a full filesystem turns downloads into verified pass-throughs, and a `kill -9`
//! in the middle of twenty downloads leaves only blobs that hash to their names.

use crate::support;

use std::time::Duration;

use pullcache::oci::{ImageRef, Registry as RegistryName};
use pullcache::store::MinFree;
use sha2::{Digest as _, Sha256};
use support::containerd::{Containerd, write_hosts_toml};
use support::fault_upstream::{FaultUpstream, Reply};
use support::images::{push_oci_image, random_bytes, sha256_digest};
use support::pullcache::{Pullcache, corrupt_blobs, stored_bytes};
use support::registry::Registry;
use support::tmpfs::Tmpfs;

const REGISTRY: &str = "registry.test";
const DEAD_SERVER: &str = "http://127.0.0.1:1";
const MIB: usize = 1024 * 1024;

fn config(cache_dir: &std::path::Path, upstream: &str) -> anyhow::Result<pullcache::Config> {
    let mut config = support::pullcache::config(cache_dir.to_owned());
    config.registry(RegistryName::parse(REGISTRY)?).url = Some(upstream.parse()?);
    Ok(config)
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_past_the_budget_keep_the_store_under_it() -> anyhow::Result<()> {
    const BUDGET: u64 = 6 * MIB as u64;
    let upstream = Registry::start().await?;
    let pinned = push_oci_image(&upstream.url(), "team/pinned", "v1", &[MIB]).await?;
    let mut images = Vec::new();
    for i in 0..5 {
        images.push(push_oci_image(&upstream.url(), &format!("team/app{i}"), "v1", &[MIB, MIB]).await?);
    }

    let cache = tempfile::tempdir()?;
    let mut config = config(cache.path(), &upstream.url())?;
    config.budget.max_size = Some(BUDGET);
    config.budget.min_free = MinFree::Bytes(0);
    config.budget.pins = vec![ImageRef::parse(&format!("{REGISTRY}/team/pinned:v1"))?];
    let pullcache = Pullcache::start_with(config).await?;
    let hosts = tempfile::tempdir()?;
    write_hosts_toml(hosts.path(), REGISTRY, DEAD_SERVER, &pullcache.url());

    // Watch the store's size on disk through every pull.
    let dir = cache.path().to_owned();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            peak = peak.max(stored_bytes(&dir));
            tokio::select! {
                _ = &mut stopped => return peak,
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
    });

    let ctr = Containerd::start().await?;
    for image in std::iter::once(&pinned).chain(&images) {
        let reference = image.reference(REGISTRY);
        ctr.pull(&reference, hosts.path()).await?;
        assert!(ctr.is_unpacked(&reference).await?, "{reference} did not unpack");
        let now = pullcache.stored_bytes();
        assert!(
            now <= BUDGET,
            "store holds {now} bytes after {reference}, budget {BUDGET}"
        );
    }
    let _ = stop.send(());
    let peak = sampler.await?;
    let pulled: u64 = std::iter::once(&pinned)
        .chain(&images)
        .flat_map(|i| i.blobs.iter().map(|b| b.size))
        .sum();
    assert!(
        pulled > BUDGET * 3 / 2,
        "the pulls ({pulled} bytes) did not go well past the budget"
    );
    assert!(peak <= BUDGET, "the store reached {peak} bytes, budget {BUDGET}");

    let stored = pullcache.stored_blobs();
    for blob in &pinned.blobs {
        assert!(stored.contains(&blob.digest), "pinned blob {} was evicted", blob.digest);
    }
    assert!(stored.contains(&pinned.manifest_digest), "pinned manifest was evicted");
    let last = images.last().expect("images");
    for blob in &last.blobs {
        assert!(
            stored.contains(&blob.digest),
            "the newest image's {} is gone",
            blob.digest
        );
    }
    let metrics = pullcache.metrics().await?;
    let evictions = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pullcache_cache_evictions_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(evictions > 0, "no evictions counted:\n{metrics}");
    // Counters, as their names say (they were exported as gauges).
    for name in ["pullcache_cache_evictions_total", "pullcache_cache_evicted_bytes_total"] {
        assert!(
            metrics.contains(&format!("# TYPE {name} counter\n")),
            "{name}:\n{metrics}"
        );
    }
    assert!(corrupt_blobs(cache.path()).is_empty());
    Ok(())
}

/// Another writer fills the filesystem while a blob downloads (one larger than the disk from
/// the start is never written at all: `hostile::a_blob_larger_than_the_cache_…`): the write
/// fails, the rest passes through from memory, and the client gets every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_passes_the_blob_through_whole_and_stores_nothing() -> anyhow::Result<()> {
    let disk = Tmpfs::mount("8m")?;
    let upstream = FaultUpstream::start().await?;
    let big = random_bytes(6 * MIB);
    let big_digest = sha256_digest(&big);
    let path = format!("/v2/team/big/blobs/{big_digest}");
    // 12 chunks 150 ms apart: the filler below lands while it streams.
    upstream.set(
        &path,
        Reply::ok(big.clone(), &[]).slowly(12, Duration::from_millis(150)),
    );
    let small = random_bytes(MIB);
    let small_digest = sha256_digest(&small);
    upstream.set(
        &format!("/v2/team/big/blobs/{small_digest}"),
        Reply::ok(small.clone(), &[]),
    );

    let mut config = config(disk.path(), &upstream.url())?;
    config.budget.min_free = MinFree::Bytes(0);
    let pullcache = Pullcache::start_with(config).await?;
    let url = |digest: &str| format!("{}/v2/team/big/blobs/{digest}?ns={REGISTRY}", pullcache.url());

    let resp = support::http_client().get(url(&big_digest)).send().await?;
    assert_eq!(resp.status(), 200);
    // Fill what is left of the filesystem, as another writer on the node would.
    let filler = disk.path().join("filler");
    let mut file = std::fs::File::create(&filler)?;
    let chunk = vec![0u8; 256 * 1024];
    while std::io::Write::write_all(&mut file, &chunk).is_ok() {}
    drop(file);
    let body = resp.bytes().await?;
    assert_eq!(body.len(), big.len(), "short body");
    assert_eq!(digest_of(&body), big_digest, "wrong bytes");
    assert_eq!(upstream.hits(&path), 1);
    assert!(
        !pullcache.stored_blobs().contains(&big_digest),
        "a blob larger than the disk was committed"
    );
    assert!(corrupt_blobs(disk.path()).is_empty());
    pullcache.idle().await?;
    assert_eq!(pullcache.temp_files(), 0, "a partial file was left behind");
    let metrics = pullcache.metrics().await?;
    assert!(
        metrics.contains("pullcache_cache_write_failures_total 1"),
        "write failure not counted:\n{metrics}"
    );

    // With the filler gone and the pass-through over, a blob that fits is cached.
    std::fs::remove_file(&filler)?;
    let resp = support::http_client().get(url(&small_digest)).send().await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(digest_of(&resp.bytes().await?), small_digest);
    assert_eq!(pullcache.stored_blobs(), vec![small_digest]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_still_fetches_once_for_a_herd() -> anyhow::Result<()> {
    let disk = Tmpfs::mount("4m")?;
    let upstream = FaultUpstream::start().await?;
    let blob = random_bytes(12 * MIB);
    let digest = sha256_digest(&blob);
    let path = format!("/v2/team/herd/blobs/{digest}");
    // Slow enough that every client joins before the disk fills.
    upstream.set(
        &path,
        Reply::ok(blob.clone(), &[]).slowly(48, Duration::from_millis(10)),
    );
    let mut config = config(disk.path(), &upstream.url())?;
    config.budget.min_free = MinFree::Bytes(0);
    let pullcache = Pullcache::start_with(config).await?;

    let url = format!("{}{path}?ns={REGISTRY}", pullcache.url());
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let resp = support::http_client().get(url).send().await?;
                anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
                Ok(resp.bytes().await?)
            })
        })
        .collect();
    for client in clients {
        let body = client.await??;
        assert_eq!(body.len(), blob.len(), "short body");
        assert_eq!(sha256_digest(&body), digest, "wrong bytes");
    }
    assert_eq!(upstream.hits(&path), 1, "the herd was not served by one download");
    assert!(pullcache.stored_blobs().is_empty());
    assert_eq!(pullcache.temp_files(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_mid_download_leaves_only_verified_blobs() -> anyhow::Result<()> {
    let upstream = FaultUpstream::start().await?;
    let blobs: Vec<(String, Vec<u8>)> = (0..20)
        .map(|_| {
            let bytes = random_bytes(2 * MIB);
            (sha256_digest(&bytes), bytes)
        })
        .collect();
    let path = |digest: &str| format!("/v2/team/crash/blobs/{digest}");
    for (i, (digest, bytes)) in blobs.iter().enumerate() {
        // Staggered: the first finish quickly, the last take seconds.
        let delay = Duration::from_millis(5 * (i as u64 + 1));
        upstream.set(&path(digest), Reply::ok(bytes.clone(), &[]).slowly(16, delay));
    }
    let cache = tempfile::tempdir()?;
    let args = |cache: &std::path::Path| {
        vec![
            "--cache-dir".to_owned(),
            cache.display().to_string(),
            "--upstream".to_owned(),
            format!("{REGISTRY}={}", upstream.url()),
            "--cache-min-free".to_owned(),
            "0".to_owned(),
        ]
    };
    let mut served = support::binary::serve(args(cache.path()), "pullcache=info").await?;
    served.wait_ready().await?;
    let base = format!("http://{}", served.addr);
    let downloads: Vec<_> = blobs
        .iter()
        .map(|(digest, _)| {
            let url = format!("{base}{}?ns={REGISTRY}", path(digest));
            tokio::spawn(async move { support::http_client().get(url).send().await?.bytes().await })
        })
        .collect();

    // Kill it once some blobs are committed while others are still in temp files.
    let tmp = cache.path().join("tmp");
    support::eventually_every(
        Duration::from_millis(2),
        Duration::from_secs(20),
        "3 blobs committed and 3 in temp files at once",
        || async {
            let committed = support::pullcache::stored_blob_count(cache.path());
            let in_flight = std::fs::read_dir(&tmp).map_or(0, |d| d.count());
            committed >= 3 && in_flight >= 3
        },
    )
    .await?;
    served.child.start_kill()?;
    served.child.wait().await?;
    for download in downloads {
        // Cut off mid-body or finished: either way the store is what is checked.
        let _ = download.await?;
    }
    let survivors = support::pullcache::stored_blob_count(cache.path());
    assert!(survivors >= 3, "committed blobs were lost");
    assert!(survivors < 20, "the kill came too late to test anything");
    assert_eq!(
        corrupt_blobs(cache.path()),
        Vec::<String>::new(),
        "a blob fails its name after the crash"
    );

    for (digest, bytes) in &blobs {
        upstream.set(&path(digest), Reply::ok(bytes.clone(), &[]));
    }
    let served = support::binary::serve(args(cache.path()), "pullcache=info").await?;
    served.wait_ready().await?;
    assert_eq!(std::fs::read_dir(&tmp)?.count(), 0, "temp files survived the restart");
    assert!(support::pullcache::stored_blob_count(cache.path()) >= survivors);
    let base = format!("http://{}", served.addr);
    for (digest, bytes) in &blobs {
        let resp = support::http_client()
            .get(format!("{base}{}?ns={REGISTRY}", path(digest)))
            .send()
            .await?;
        assert_eq!(resp.status(), 200);
        let body = resp.bytes().await?;
        assert!(body[..] == bytes[..], "{digest}: wrong bytes after the restart");
    }
    assert_eq!(support::pullcache::stored_blob_count(cache.path()), blobs.len());
    assert!(corrupt_blobs(cache.path()).is_empty());
    Ok(())
}
