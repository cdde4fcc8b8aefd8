//! The lazy-pull benchmark: how long soci-snapshotter takes to read a small file stored at the
//! end of a large layer, cold (a fresh snapshotter, containerd and pullcache each time),
//! straight from the registry and through pullcache in mirror and intercept mode. The set-up
//! is the lazy-pull tests' (`tests/support/soci.rs`): everything in one network namespace, the
//! registry over TLS, so the figures are of soci and pullcache, not of a network. It prints a
//! markdown table; `bench/run` calls it.
//!
//!     cargo bench --bench lazy -- [--data-mib 64] [--rounds 3]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use anyhow::{Result, ensure};
use support::bench::{bench_args, count_arg, median};
use support::soci::{LazyNode, Route, Upstream};

const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// One cold lazy pull by `route`: the rpull's time and the small file's read time.
async fn cold(upstream: &Upstream, route: Route) -> Result<(Duration, Duration)> {
    let node = LazyNode::start(upstream, route).await?;
    let pulled = node.rpull().await?;
    let (marker, read) = node.read_marker(READ_TIMEOUT).await?;
    ensure!(
        marker == upstream.image.marker,
        "{route:?}: the small file read back wrong"
    );
    Ok((pulled, read))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // `cargo test --all-targets` builds and runs benches without `--bench`: it only checks
    // that this compiles; the benchmark itself runs under `cargo bench` (bench/run).
    let Some(args) = bench_args() else {
        return Ok(());
    };
    let data_mib = count_arg(&args, "--data-mib", 64)?;
    let rounds = count_arg(&args, "--rounds", 3)?.max(1);
    let upstream = Upstream::start(data_mib << 20).await?;
    let routes = [Route::Direct, Route::Mirror, Route::Intercept];
    let mut times: Vec<(Vec<Duration>, Vec<Duration>)> = vec![Default::default(); routes.len()];
    // Interleaved rounds: the machine's noise falls on every route alike.
    for _ in 0..rounds {
        for (route, (pulls, reads)) in routes.iter().zip(times.iter_mut()) {
            let (pulled, read) = cold(&upstream, *route).await?;
            pulls.push(pulled);
            reads.push(read);
        }
    }
    let medians: Vec<(Duration, Duration)> = times.into_iter().map(|(p, r)| (median(p), median(r))).collect();
    let direct_read = medians[0].1.as_secs_f64();
    println!(
        "| route | rpull (lazy mount) | read of the file at the end of the {} MiB layer, cold | vs direct |",
        upstream.image.layer_size >> 20
    );
    println!("|---|---|---|---|");
    for (route, (pulled, read)) in routes.iter().zip(medians) {
        let name = match route {
            Route::Direct => "direct (soci straight to the registry)",
            Route::Mirror => "through pullcache, mirror mode",
            Route::Intercept => "through pullcache, intercept mode",
        };
        println!(
            "| {name} | {:.3} s | {:.3} s | {:.2}x |",
            pulled.as_secs_f64(),
            read.as_secs_f64(),
            read.as_secs_f64() / direct_read
        );
    }
    println!("\nMedians of {rounds} interleaved rounds; each a fresh snapshotter, containerd and cache.");
    Ok(())
}
