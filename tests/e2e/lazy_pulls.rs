//! Lazy pulls (issue 23, part 4): the real soci-snapshotter 0.4.1 lazily pulls an image
//! through pullcache, in intercept mode and in mirror mode (`tests/support/soci.rs` has the
//! set-up and what it relies on). The image has one large layer of random files with a small
//! file stored last; its SOCI index is in the registry (TLS, inside a network namespace).
//!
//! For each mode: the pull ends with the layer mounted by FUSE and not downloaded by containerd,
//! the small file reads back exactly, and the registry sees the layer fetched whole once (by
//! pullcache, for its cache), besides the closed ranges pullcache answered straight from the
//! registry before the layer landed: the namespace's link is throttled so that the whole
//! layer takes seconds, and the small file's span must not wait for it.

use std::time::Duration;

use crate::support;
use support::registry::AccessLogEntry;
use support::soci::{LazyNode, Route, Upstream};

/// Random data in the large layer, before the small file.
const DATA_BYTES: usize = 32 * 1024 * 1024;
/// The longest a read of the small file may take, whatever pullcache does.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest pullcache's download of the whole layer may take to show in the access log.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// The namespace's one link, shared by the registry, pullcache and soci: slow enough that the
/// whole layer takes seconds to download, so the small file's span is read before it lands.
const LINK_BITS_PER_SECOND: u64 = 64_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intercept_mode() -> anyhow::Result<()> {
    lazy_pull(Route::Intercept).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_mode() -> anyhow::Result<()> {
    lazy_pull(Route::Mirror).await
}

async fn lazy_pull(route: Route) -> anyhow::Result<()> {
    let upstream = Upstream::start(DATA_BYTES).await?;
    upstream.netns().throttle_loopback(LINK_BITS_PER_SECOND)?;
    let image = upstream.image.clone();
    upstream.registry.settle().await?;
    let before = upstream.registry.access_log().len();
    let node = LazyNode::start(&upstream, route).await?;

    let pulled = node.rpull().await?;
    // Lazily: the layer is a FUSE mount, and containerd never had its bytes.
    let mount = node.layer_mount()?;
    assert!(
        !node.containerd.has_content(&image.layer_digest).await?,
        "containerd downloaded the layer: the pull was not lazy"
    );
    let (marker, read) = node.read_marker(READ_TIMEOUT).await?;
    assert!(
        marker == image.marker,
        "the small file at the end of the layer read back wrong"
    );
    eprintln!(
        "{route:?}: rpull {:.3} s, then the small file at the end of the {} MiB layer in {:.3} s ({mount})",
        pulled.as_secs_f64(),
        image.layer_size >> 20,
        read.as_secs_f64()
    );

    // pullcache downloads the whole layer once, for its cache, beside what it answered.
    support::eventually_every(
        Duration::from_millis(250),
        DOWNLOAD_TIMEOUT,
        "pullcache's download of the whole layer",
        || async {
            let layer = upstream.layer_requests_since(before).await?;
            anyhow::Ok(layer.iter().any(|e| upstream.is_whole_layer(e)))
        },
    )
    .await
    .map_err(|e| e.context(node.pullcache_log()))?;
    let seen = upstream.registry.requests_since(before).await?;
    for entry in &seen {
        eprintln!(
            "  registry: {} {} -> {} {} B ({})",
            entry.method, entry.uri, entry.status, entry.bytes, entry.user_agent
        );
    }
    let layer: Vec<&AccessLogEntry> = seen
        .iter()
        .filter(|e| e.path().ends_with(&image.layer_digest))
        .collect();
    let whole = layer.iter().filter(|e| upstream.is_whole_layer(e)).count();
    assert_eq!(whole, 1, "the whole layer was fetched {whole} times: {layer:#?}");
    // The small file's span did not wait for the whole layer: pullcache asked the registry
    // for it on its own, and had it (logged when answered) before the whole layer landed.
    let first_span = layer.iter().position(|e| e.status == 206);
    let landed = layer.iter().position(|e| upstream.is_whole_layer(e));
    assert!(
        matches!((first_span, landed), (Some(span), Some(whole)) if span < whole),
        "no span of the layer was asked of the registry before it landed: {layer:#?}\n{}",
        node.pullcache_log()
    );
    for entry in &layer {
        assert!(
            upstream.is_whole_layer(entry) || (entry.status == 206 && entry.bytes < image.layer_size),
            "a layer request neither whole nor a range: {entry:?}"
        );
        assert!(
            entry.user_agent.starts_with("pullcache/"),
            "a layer read reached the registry around pullcache: {entry:?}"
        );
    }
    // Every other blob pullcache fetched (config, ztoc), it fetched once.
    for entry in seen.iter().filter(|e| e.path().contains("/blobs/") && e.status == 200) {
        let gets = seen
            .iter()
            .filter(|e| e.path() == entry.path() && e.status == 200)
            .count();
        assert_eq!(gets, 1, "{} fetched whole {gets} times", entry.path());
    }
    match route {
        // Everything went through pullcache: the SOCI index and ztoc too.
        Route::Intercept => {
            let around: Vec<_> = seen
                .iter()
                .filter(|e| !e.user_agent.starts_with("pullcache/"))
                .collect();
            assert!(around.is_empty(), "requests around the proxy: {around:#?}");
        }
        // soci finds and fetches its index and ztocs at the registry itself (oras-go, which
        // knows no mirrors); nothing else passes pullcache by.
        Route::Mirror => {
            let ztocs_and_index = |e: &&AccessLogEntry| {
                e.path().contains("/referrers/") || e.path().contains("/manifests/") || e.path().contains("/blobs/")
            };
            let around: Vec<_> = seen
                .iter()
                .filter(|e| !e.user_agent.starts_with("pullcache/"))
                .collect();
            assert!(
                !around.is_empty(),
                "soci fetched its index through the mirror: {seen:#?}"
            );
            assert!(around.iter().all(ztocs_and_index), "{around:#?}");
            assert!(around.iter().all(|e| !e.path().ends_with(&image.layer_digest)));
        }
        Route::Direct => unreachable!("not a pullcache mode"),
    }
    Ok(())
}
