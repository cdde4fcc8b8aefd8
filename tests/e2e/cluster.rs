//! Cluster mode with real nodes: each node a network namespace with its own pullcache and its
//! own containerd, the real registry behind a 100 Mbit/s link (`support::cluster`). A
//! rollout fetches each blob upstream once for the whole cluster, and an owner killed or cut
//! off mid-transfer costs at most one more fetch while every other node still unpacks.

use crate::support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures_util::future::try_join_all;
use pullcache::oci::Digest;
use pullcache::peers::ring;
use support::cluster::{Cluster, ClusterOptions, MBIT, Node, REGISTRY_NAME};
use support::images::{PushedImage, push_oci_image};

const PEER_PORT: u16 = 7443;
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

async fn within<T>(test: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .with_context(|| format!("not done within {TEST_TIMEOUT:?}"))?
}

fn peer_addr(node: &Node) -> SocketAddr {
    SocketAddr::new(node.addr().into(), PEER_PORT)
}

/// A cluster of `n` nodes, each running pullcache in cluster mode with every node as a peer.
async fn start(n: usize) -> Result<(Cluster, tempfile::TempDir)> {
    start_with(n, &[]).await
}

/// [`start`], with `extra` arguments for every pullcache.
async fn start_with(n: usize, extra: &[&str]) -> Result<(Cluster, tempfile::TempDir)> {
    let cluster = Cluster::start(ClusterOptions {
        nodes: n,
        upstream_rate: Some(100 * MBIT),
    })
    .await?;
    let ca = tempfile::tempdir()?;
    pullcache::ca::init(&ca.path().join("ca"))?;
    let peers: Vec<String> = cluster.nodes().iter().map(|n| peer_addr(n).to_string()).collect();
    try_join_all(cluster.nodes().iter().map(|node| {
        let mut args = vec![
            "--peer-listen".to_owned(),
            peer_addr(node).to_string(),
            "--peer-ca-dir".to_owned(),
            ca.path().join("ca").display().to_string(),
        ];
        for peer in &peers {
            args.extend(["--peer".to_owned(), peer.clone()]);
        }
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        node.start_pullcache(args)
    }))
    .await?;
    Ok((cluster, ca))
}

/// The node that owns `digest`.
fn owner<'a>(cluster: &'a Cluster, digest: &str) -> (usize, &'a Node) {
    let addrs: Vec<SocketAddr> = cluster.nodes().iter().map(peer_addr).collect();
    let digest: Digest = digest.parse().expect("a digest");
    let owner = ring::rank(&addrs, &digest)[0];
    let index = addrs.iter().position(|a| *a == owner).expect("a member");
    (index, &cluster.nodes()[index])
}

/// Pulls `image` on every node in `nodes` at once; each must unpack.
async fn pull_all(nodes: &[&Node], image: &PushedImage) -> Result<()> {
    let reference = image.reference(REGISTRY_NAME);
    try_join_all(nodes.iter().map(|node| node.pull(&reference))).await?;
    for node in nodes {
        ensure!(
            node.containerd().is_unpacked(&reference).await?,
            "not unpacked in {}:\n{}",
            node.netns().name(),
            support::log_tail(&node.dir().join("pullcache.log"), 40)
        );
    }
    Ok(())
}

/// Bytes of the largest download in progress in a node's cache (its temp files).
fn downloading(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("cache").join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.metadata().ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

/// Every blob file in a node's cache hashes to its name.
fn verify_store(dir: &Path) -> Result<usize> {
    let files: Vec<PathBuf> = support::pullcache::blob_files(&dir.join("cache"));
    for file in &files {
        let bytes = std::fs::read(file)?;
        let name = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
        ensure!(
            support::images::sha256_digest(&bytes) == format!("sha256:{name}"),
            "{} does not hash to its name",
            file.display()
        );
    }
    Ok(files.len())
}

/// Waits until none of `nodes` has a blob download in flight and the registry logged every
/// request it answered: a count read after this is final, so a missing GET is missing and a
/// duplicate one is there.
async fn quiesce(cluster: &Cluster, nodes: &[&Node]) -> Result<()> {
    try_join_all(nodes.iter().map(|node| node.idle())).await?;
    cluster.registry().settle().await
}

/// GETs of `path_part` that pullcache sent the upstream (containerd falling through to the
/// registry is not counted: the tests make sure it does not happen).
fn pullcache_gets(cluster: &Cluster, path_part: &str) -> usize {
    cluster
        .registry()
        .access_log()
        .iter()
        .filter(|e| e.method == "GET" && e.path().contains(path_part) && e.user_agent.starts_with("pullcache/"))
        .count()
}

fn direct_pulls(cluster: &Cluster) -> usize {
    cluster
        .registry()
        .access_log()
        .iter()
        .filter(|e| e.user_agent.starts_with("containerd/"))
        .count()
}

/// Six nodes roll out a new image at once: one upstream GET per blob and one manifest GET
/// for the whole cluster, and every node unpacks from its own verified copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_fetches_each_blob_once_for_the_cluster() -> Result<()> {
    within(async {
        let (cluster, _ca) = start(6).await?;
        let image = push_oci_image(&cluster.push_url(), "team/app", "v1", &[6 << 20, 3 << 20]).await?;
        let nodes: Vec<&Node> = cluster.nodes().iter().collect();
        pull_all(&nodes, &image).await?;
        quiesce(&cluster, &nodes).await?;
        for blob in &image.blobs {
            let gets = pullcache_gets(&cluster, &blob.digest);
            ensure!(gets == 1, "blob {} fetched upstream {gets} times", blob.digest);
        }
        let manifest_gets = pullcache_gets(&cluster, "/manifests/");
        if manifest_gets != 1 {
            let log: Vec<_> = cluster
                .registry()
                .access_log()
                .into_iter()
                .filter(|e| e.path().contains("/manifests/"))
                .collect();
            let mut logs = String::new();
            for node in &nodes {
                for line in node
                    .pullcache_log()
                    .lines()
                    .filter(|l| l.contains("manifest") && !l.contains("\"kind\":\"blob\""))
                {
                    logs.push_str(&format!("{}: {line}\n", node.addr()));
                }
            }
            anyhow::bail!("{manifest_gets} manifest GETs for the cluster: {log:#?}\n{logs}");
        }
        ensure!(direct_pulls(&cluster) == 0, "containerd fell through to the registry");
        for node in &nodes {
            let stored = verify_store(node.dir())?;
            ensure!(
                stored >= image.blobs.len(),
                "{} holds {stored} blobs",
                node.netns().name()
            );
        }
        Ok(())
    })
    .await
}

/// Seven nodes want one big layer at once from an owner that uploads to one peer at a time:
/// the others are sent on to peers receiving it, every node unpacks, the upstream serves the
/// layer once, and no node sends it more than twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_layer_spreads_as_a_tree() -> Result<()> {
    within(async {
        let (cluster, _ca) = start_with(7, &["--peer-max-uploads=1"]).await?;
        let image = push_oci_image(&cluster.push_url(), "team/hot", "v1", &[8 << 20]).await?;
        let layer = image.largest_blob().clone();
        let nodes: Vec<&Node> = cluster.nodes().iter().collect();
        pull_all(&nodes, &image).await?;
        quiesce(&cluster, &nodes).await?;
        let gets = pullcache_gets(&cluster, &layer.digest);
        ensure!(gets == 1, "the layer was fetched upstream {gets} times");
        let mut redirected = 0.0;
        for node in &nodes {
            let sent = node.metric("pullcache_peer_bytes_total{direction=\"out\"}").await?;
            ensure!(
                sent <= 2.0 * layer.size as f64 + (1 << 20) as f64,
                "{} sent its peers {sent} bytes of an {}-byte layer",
                node.netns().name(),
                layer.size
            );
            redirected += node
                .metric("pullcache_peer_requests_total{result=\"redirected\"}")
                .await?;
        }
        ensure!(redirected > 0.0, "no asker was sent on: the test proves nothing");
        Ok(())
    })
    .await
}

/// How an owner is lost mid-transfer.
#[derive(Debug, Clone, Copy)]
enum Loss {
    Killed,
    CutOff,
}

/// The owner of the big layer is lost while it streams it to the others: they resume from
/// the next peer or the upstream, every one of them unpacks, every stored blob verifies, and
/// the layer is fetched upstream at most twice.
async fn owner_lost(loss: Loss) -> Result<()> {
    let (cluster, _ca) = start(4).await?;
    // 24 MiB behind 100 Mbit/s: about two seconds of transfer to cut into.
    let image = push_oci_image(&cluster.push_url(), "team/big", "v1", &[24 << 20, 256 << 10]).await?;
    let layer = image.largest_blob().digest.clone();
    let (owner_index, owner) = owner(&cluster, &layer);
    let others: Vec<&Node> = cluster
        .nodes()
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != owner_index)
        .map(|(_, n)| n)
        .collect();
    let pulls = pull_all(&others, &image);
    let lose = async {
        // Until the owner's download of the layer is well under way (4 of 24 MiB).
        support::eventually_every(
            Duration::from_millis(10),
            Duration::from_secs(20),
            "the owner to have 4 MiB of the layer",
            || async { downloading(owner.dir()) >= 4 << 20 },
        )
        .await?;
        match loss {
            Loss::Killed => owner.kill_pullcache().await?,
            Loss::CutOff => owner.link().down()?,
        }
        anyhow::Ok(())
    };
    let (pulled, lost) = tokio::join!(pulls, lose);
    lost?;
    pulled?;
    // Not the owner: cut off, its own download may hang until a timeout.
    quiesce(&cluster, &others).await?;
    let gets = pullcache_gets(&cluster, &layer);
    // The loss must have come mid-transfer, or this test proves nothing.
    let resumed = others
        .iter()
        .filter(|n| n.pullcache_log().contains("body broke; resuming"))
        .count();
    ensure!(resumed > 0, "no node had to resume: the owner was lost too late");
    ensure!((1..=2).contains(&gets), "the layer was fetched upstream {gets} times");
    ensure!(direct_pulls(&cluster) == 0, "containerd fell through to the registry");
    for node in &others {
        verify_store(node.dir())?;
    }
    verify_store(owner.dir())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_killed_mid_transfer_costs_one_more_fetch_at_most() -> Result<()> {
    within(owner_lost(Loss::Killed)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_cut_off_mid_transfer_costs_one_more_fetch_at_most() -> Result<()> {
    within(owner_lost(Loss::CutOff)).await
}

const PEERS_NAME: &str = "peers.cluster.test";
const REFRESH: Duration = Duration::from_secs(1);

/// Which of `members` (indices into the cluster's nodes) owns `digest`.
fn owner_among(cluster: &Cluster, members: &[usize], digest: &str) -> usize {
    let addrs: Vec<SocketAddr> = members.iter().map(|i| peer_addr(cluster.node(*i))).collect();
    let owner = ring::rank(&addrs, &digest.parse().expect("a digest"))[0];
    members[addrs.iter().position(|a| *a == owner).expect("a member")]
}

/// Fetches a blob through node `via`'s pullcache and returns the address the upstream saw
/// fetching it.
async fn fetched_by(cluster: &Cluster, via: usize, digest: &str) -> Result<String> {
    let node = cluster.node(via);
    let url = format!(
        "{}/v2/team/many/blobs/{digest}?ns={REGISTRY_NAME}",
        node.pullcache_url()
    );
    let got = node.netns().get(&url, Duration::from_secs(20)).await?;
    ensure!(got.status == 200, "{digest} via node {via}: {}", got.status);
    let nodes: Vec<&Node> = cluster.nodes().iter().collect();
    quiesce(cluster, &nodes).await?;
    let remotes: Vec<String> = cluster
        .registry()
        .access_log()
        .into_iter()
        .filter(|e| e.method == "GET" && e.path().contains(digest))
        .map(|e| e.remote)
        .collect();
    ensure!(remotes.len() == 1, "{digest} fetched upstream by {remotes:?}");
    Ok(remotes[0].clone())
}

/// The size of the peer view a node last logged ("peer view changed"), if it logged one.
fn view_size(node: &Node) -> Option<u64> {
    node.pullcache_log()
        .lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|json| json["fields"]["message"] == "peer view changed")
        .and_then(|json| json["fields"]["peers"].as_u64())
}

/// Waits until each of `members` (indices into the cluster's nodes) has a view of `size`
/// peers, for at most two discovery intervals and a half: what "within the interval" allows.
async fn views_settle(cluster: &Cluster, members: &[usize], size: u64) -> Result<()> {
    let views = || -> Vec<Option<u64>> { members.iter().map(|&i| view_size(cluster.node(i))).collect() };
    support::eventually(
        REFRESH * 2 + Duration::from_millis(500),
        format_args!("nodes {members:?} to see {size} peers"),
        || async { views().iter().all(|v| *v == Some(size)) },
    )
    .await
    .with_context(|| format!("their views: {:?}", views()))
}

/// Discovery through a real DNS server: the peers are one name, like a headless Service's.
/// A node joining takes over the digests it now owns, and a node leaving hands its own on,
/// each within the discovery interval, with no request sent to the node that left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_follows_dns() -> Result<()> {
    within(async {
        let cluster = Cluster::start(ClusterOptions {
            nodes: 4,
            upstream_rate: None,
        })
        .await?;
        let dns = cluster.start_dns().await?;
        let addrs: Vec<_> = cluster.nodes().iter().map(|n| n.addr()).collect();
        dns.set(PEERS_NAME, &addrs[..3])?;
        let ca = tempfile::tempdir()?;
        pullcache::ca::init(&ca.path().join("ca"))?;
        let args =
            |node: &Node| support::cluster::member_args(peer_addr(node), &ca.path().join("ca"), PEERS_NAME, REFRESH);
        try_join_all(cluster.nodes()[..3].iter().map(|node| node.start_pullcache(args(node)))).await?;
        let mut blobs = Vec::new();
        for _ in 0..40 {
            let bytes = support::images::random_bytes(16 << 10);
            blobs.push(support::images::push_blob(&cluster.push_url(), "team/many", bytes).await?);
        }
        let mut unused = blobs.into_iter();
        let mut pick = |wanted: &dyn Fn(&str) -> bool| unused.find(|d| wanted(d)).context("no such blob");
        let addr = |i: usize| cluster.node(i).addr().to_string();

        // Three members: node 0 goes to the owner among them.
        let b = pick(&|d| owner_among(&cluster, &[0, 1, 2], d) == 2)?;
        ensure!(fetched_by(&cluster, 0, &b).await? == addr(2), "before the join");

        // Node 3 joins: within the interval, node 0 sends what node 3 now owns to node 3.
        cluster.node(3).start_pullcache(args(cluster.node(3))).await?;
        dns.set(PEERS_NAME, &addrs)?;
        views_settle(&cluster, &[0, 1, 2, 3], 4).await?;
        let b = pick(&|d| owner_among(&cluster, &[0, 1, 2, 3], d) == 3)?;
        ensure!(fetched_by(&cluster, 0, &b).await? == addr(3), "after the join");

        // Node 1 leaves the answer, then stops: what it owned goes to the next in rank, and
        // node 0 never tries node 1.
        dns.set(PEERS_NAME, &[addrs[0], addrs[2], addrs[3]])?;
        views_settle(&cluster, &[0, 2, 3], 3).await?;
        cluster.node(1).kill_pullcache().await?;
        let b = pick(&|d| owner_among(&cluster, &[0, 1, 2, 3], d) == 1 && owner_among(&cluster, &[0, 2, 3], d) != 0)?;
        let heir = owner_among(&cluster, &[0, 2, 3], &b);
        ensure!(fetched_by(&cluster, 0, &b).await? == addr(heir), "after the leave");
        let unavailable = cluster
            .node(0)
            .metric("pullcache_peer_fetches_total{result=\"unavailable\"}")
            .await?;
        ensure!(
            unavailable == 0.0,
            "node 0 tried a peer that was gone {unavailable} times"
        );
        Ok(())
    })
    .await
}
