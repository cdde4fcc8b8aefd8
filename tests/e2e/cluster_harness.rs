//! Tests of the multi-node harness (`support::cluster`, issue 14), with today's single-node
//! pullcache on every node: the baseline cluster mode is to improve on, real throttling and
//! link cuts, loopbacks that are each node's own, and nothing left behind. They need root and
//! iproute2, and fail rather than skip without them.

use crate::support;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures_util::future::try_join_all;
use support::cluster::{self, Cluster, ClusterOptions, MBIT, REGISTRY_NAME};
use support::images::{push_blob, push_oci_image, random_bytes};
use support::netns::{self, Netns};

const NO_ARGS: [&str; 0] = [];
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

async fn within<T>(test: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .with_context(|| format!("not done within {TEST_TIMEOUT:?}"))?
}

/// Three nodes pull one image at once, each through its own pullcache: every pull unpacks,
/// and the upstream serves every blob once to each node (three times in all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_each_fetch_every_blob_once() -> Result<()> {
    within(async {
        let cluster = Cluster::start(ClusterOptions::default()).await?;
        let image = push_oci_image(&cluster.push_url(), "test/app", "v1", &[1 << 20, 2 << 20]).await?;
        let reference = image.reference(REGISTRY_NAME);
        let nodes = cluster.nodes();
        try_join_all(nodes.iter().map(|node| node.start_pullcache(NO_ARGS))).await?;
        try_join_all(nodes.iter().map(|node| node.pull(&reference))).await?;

        for node in nodes {
            ensure!(
                node.containerd().is_unpacked(&reference).await?,
                "not unpacked in {}",
                node.netns().name()
            );
            let stored = support::pullcache::blob_files(&node.dir().join("cache"));
            ensure!(
                stored.len() >= image.blobs.len(),
                "{} cached {stored:?}",
                node.netns().name()
            );
        }
        let registry = cluster.registry();
        let node_addrs: BTreeSet<String> = nodes.iter().map(|node| node.addr().to_string()).collect();
        for blob in &image.blobs {
            let gets = registry
                .wait_access_log_count("GET", &blob.digest, 3, Duration::from_secs(10))
                .await;
            assert_eq!(gets, 3, "blob {} fetched {gets} times", blob.digest);
            let remotes: BTreeSet<String> = registry
                .access_log()
                .into_iter()
                .filter(|entry| entry.method == "GET" && entry.path().contains(&blob.digest))
                .map(|entry| entry.remote)
                .collect();
            assert_eq!(remotes, node_addrs, "blob {}", blob.digest);
        }
        // All through pullcache: containerd never fell through to the upstream itself.
        let direct: Vec<_> = registry
            .access_log()
            .into_iter()
            .filter(|entry| entry.user_agent.starts_with("containerd/"))
            .collect();
        ensure!(
            direct.is_empty(),
            "containerd went to the upstream directly: {direct:?}"
        );
        Ok(())
    })
    .await
}

/// The least time `bytes` can take at `bits_per_second` through tbf: all but one bucket.
fn floor(bytes: usize, bits_per_second: u64) -> Duration {
    Duration::from_secs_f64(bytes.saturating_sub(netns::TBF_BURST) as f64 * 8.0 / bits_per_second as f64)
}

/// A 4 MiB blob takes its size over the rate to cross the upstream link, and a node's own
/// throttled link; unthrottled it is much faster; a cut link passes nothing until restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_are_throttled_and_cut_for_real() -> Result<()> {
    within(async {
        let upstream_rate = 100 * MBIT;
        let cluster = Cluster::start(ClusterOptions {
            nodes: 1,
            upstream_rate: Some(upstream_rate),
        })
        .await?;
        let size = 4 << 20;
        let digest = push_blob(&cluster.push_url(), "test/big", random_bytes(size)).await?;
        let url = format!("{}/v2/test/big/blobs/{digest}", cluster.registry().url());
        let node = cluster.node(0);
        let fetch = || node.netns().get(&url, Duration::from_secs(10));

        // A throttle is a floor no fetch goes under, so every fetch is held to it; a busy
        // machine (other tests run in parallel in this process) only slows a fetch down, so
        // an upper bound is polled for: some fetch within it, which a throttle still on (or
        // one far too slow) never gives.
        support::eventually(
            Duration::from_secs(10),
            "a fetch within 3x the time the upstream rate takes",
            || async {
                let upstream = fetch().await?;
                eprintln!("upstream at {upstream_rate} bit/s: {upstream:?}");
                ensure!(upstream.status == 200 && upstream.bytes == size as u64, "{upstream:?}");
                ensure!(
                    upstream.took >= floor(size, upstream_rate),
                    "too fast for the rate: {upstream:?}"
                );
                Ok(upstream.took < floor(size, upstream_rate) * 3)
            },
        )
        .await
        .context("far too slow for the rate")?;

        let node_rate = 50 * MBIT;
        node.link().throttle(node_rate)?;
        let throttled = fetch().await?;
        eprintln!("node link at {node_rate} bit/s: {throttled:?}");
        ensure!(
            throttled.took >= floor(size, node_rate),
            "too fast for the rate: {throttled:?}"
        );

        node.link().unthrottle()?;
        cluster.upstream_link().unthrottle()?;
        support::eventually(
            Duration::from_secs(10),
            "a fetch within half the time the upstream rate takes",
            || async {
                let free = fetch().await?;
                eprintln!("unthrottled: {free:?}");
                anyhow::Ok(free.took < floor(size, upstream_rate) / 2)
            },
        )
        .await
        .context("still throttled")?;

        node.link().down()?;
        let cut = node.netns().get(&url, Duration::from_secs(2)).await;
        ensure!(cut.is_err(), "a cut link passed {cut:?}");
        node.link().up()?;
        ensure!(fetch().await?.bytes == size as u64);
        Ok(())
    })
    .await
}

/// A node's pullcache on 127.0.0.1:5000 answers inside that node only; killed, it answers
/// nowhere; started again on the same cache, it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_has_its_own_loopback() -> Result<()> {
    within(async {
        let cluster = Cluster::start(ClusterOptions {
            nodes: 2,
            upstream_rate: None,
        })
        .await?;
        let (a, b) = (cluster.node(0), cluster.node(1));
        a.start_pullcache(NO_ARGS).await?;
        let v2 = format!("{}/v2/", a.pullcache_url());
        assert_eq!(a.netns().http_status(&v2).await, Some(200), "pullcache in its own node");
        let from_b = b.netns().get(&v2, Duration::from_secs(2)).await;
        ensure!(
            from_b.is_err(),
            "node B's loopback reached node A's pullcache: {from_b:?}"
        );
        // B reaches the upstream over the bridge all the same.
        let upstream = format!("{}/v2/", cluster.registry().url());
        assert_eq!(b.netns().http_status(&upstream).await, Some(200));

        let pid = a.pullcache_pid().context("pullcache runs")?;
        a.kill_pullcache().await?;
        ensure!(!netns::is_alive(pid), "pullcache {pid} survived kill -9");
        ensure!(
            a.netns().get(&v2, Duration::from_secs(2)).await.is_err(),
            "a killed pullcache answered"
        );
        a.start_pullcache(NO_ARGS).await?;
        assert_eq!(a.netns().http_status(&v2).await, Some(200), "pullcache started again");
        Ok(())
    })
    .await
}

/// A cluster sweeps what a dead run left (a namespace with a process in it, a temp dir), adds
/// nothing to the root namespace, and a panic while it runs removes all it made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_leaves_nothing_behind() -> Result<()> {
    within(async {
        // The leftovers of a run whose process is gone: a namespace with a process inside, and
        // a directory with a process outside that uses it (as the staging registry does).
        let mut dead = std::process::Command::new("true").spawn()?;
        let dead_pid = dead.id();
        dead.wait()?;
        let leftover_dir = std::env::temp_dir().join(format!("{}{dead_pid}-0-dir", cluster::PREFIX));
        let log = leftover_dir.join("log");
        let (mut leftover_process, mut leftover_user) = {
            // A cluster starting in parallel could sweep these half-made.
            let _no_sweep = netns::sweep_lock()?;
            std::fs::create_dir_all(&leftover_dir)?;
            std::fs::write(&log, "")?;
            let user = tokio::process::Command::new("tail")
                .arg("-f")
                .arg(&log)
                .kill_on_drop(true)
                .spawn()?;
            let leftover = Netns::create(&format!("{}{dead_pid}-0-sw", cluster::PREFIX))?;
            let inside = leftover.command("sleep").arg("600").kill_on_drop(true).spawn()?;
            (inside, user)
        };
        let root_before = root_namespace()?;

        let (tx, rx) = tokio::sync::oneshot::channel();
        let run = tokio::spawn(async move {
            let cluster = Cluster::start(ClusterOptions {
                nodes: 2,
                upstream_rate: Some(100 * MBIT),
            })
            .await
            .expect("cluster starts");
            cluster
                .node(0)
                .start_pullcache(NO_ARGS)
                .await
                .expect("pullcache starts");
            let namespaces: Vec<String> = cluster.namespaces().iter().map(|n| n.name().to_owned()).collect();
            let pullcache = cluster.node(0).pullcache_pid().expect("pullcache runs");
            let containerds: Vec<u32> = cluster.nodes().iter().filter_map(|n| n.containerd().pid()).collect();
            let dir = cluster.node(0).dir().parent().expect("cluster dir").to_owned();
            let made = (
                cluster.name().to_owned(),
                namespaces,
                cluster.pids(),
                pullcache,
                containerds,
                dir,
            );
            tx.send((made, root_namespace())).expect("test waits");
            panic!("a deliberate panic, with the cluster up: its Drop must clean up");
        });
        ensure!(run.await.is_err_and(|e| e.is_panic()), "the task did not panic");
        let ((name, namespaces, pids, pullcache, containerds, dir), root_during) = rx.await?;

        for process in [&mut leftover_process, &mut leftover_user] {
            let status = tokio::time::timeout(Duration::from_secs(5), process.wait()).await??;
            ensure!(!status.success(), "a leftover process was not killed: {status}");
        }
        let remaining = netns::list()?;
        ensure!(
            !remaining
                .iter()
                .any(|n| n.starts_with(&format!("{}{dead_pid}-", cluster::PREFIX))),
            "a dead run's namespace was not swept: {remaining:?}"
        );
        ensure!(!leftover_dir.exists(), "a dead run's directory was not swept");

        ensure!(root_during? == root_before, "the cluster changed the root namespace");
        assert_eq!(namespaces.len(), 4, "switch, upstream, 2 nodes: {namespaces:?}");
        ensure!(
            pids.contains(&pullcache) && containerds.iter().all(|pid| pids.contains(pid)),
            "{pids:?}"
        );
        ensure!(pids.len() >= 5, "2 registries, 2 containerds and a pullcache: {pids:?}");
        let remaining = netns::list()?;
        ensure!(
            !remaining.iter().any(|n| n.starts_with(&name)),
            "namespaces left: {remaining:?}"
        );
        let alive: Vec<u32> = pids.into_iter().filter(|&pid| netns::is_alive(pid)).collect();
        ensure!(alive.is_empty(), "processes left: {alive:?}");
        ensure!(!dir.exists(), "{} left", dir.display());
        Ok(())
    })
    .await
}

/// The root namespace's interfaces with their addresses, and its IPv4 routes (lifetimes
/// left out: they count down).
fn root_namespace() -> Result<Vec<String>> {
    let ip = netns::ip_output;
    let link_names = ip(&["-o", "link"])?;
    let links = link_names.lines().filter_map(|line| line.split(": ").nth(1));
    let addr_lines = ip(&["-o", "addr"])?;
    let addrs = addr_lines
        .lines()
        .map(|line| line.split_whitespace().take(4).collect::<Vec<_>>().join(" "));
    let routes = ip(&["-o", "-4", "route"])?;
    Ok(links
        .map(str::to_owned)
        .chain(addrs)
        .chain(routes.lines().map(str::to_owned))
        .collect())
}
