//! Cluster-mode discovery says what it sees (issue 24, items 17 and 18). pullcache runs on one
//! node of a `support::cluster` and finds its peers through the real DNS server beside it
//! (dnsmasq), by one name, as a pod finds the chart's headless Service. An answer of only this
//! node is a view of one, said once at INFO; a peer the answer no longer lists leaves the view;
//! a lookup that finds nothing, or no DNS server at all, is a failure: logged at WARN, counted,
//! and the last view kept. `/metrics` shows each.

use crate::support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use support::cluster::{Cluster, ClusterOptions, Dns, Node};

const PEERS_NAME: &str = "peers.cluster.test";
const PEER_PORT: u16 = 7443;
const REFRESH: Duration = Duration::from_millis(200);
/// Refreshes a node is watched for before it counts as having settled on what it says.
const ROUNDS: u32 = 5;
const TEST_TIMEOUT: Duration = Duration::from_secs(90);
/// A wait for something a few refreshes bring about (dnsmasq, curl and a busy machine included).
const WAIT: Duration = Duration::from_secs(15);
/// How often `/metrics` is read while waiting: each read is a curl inside the node.
const POLL: Duration = Duration::from_millis(100);

const VIEW_SIZE: &str = "pullcache_peer_view_size";
const FAILURES: &str = "pullcache_peer_discovery_failures_total";
const LAST_SUCCESS: &str = "pullcache_peer_discovery_last_success_timestamp_seconds";

async fn within<T>(test: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .with_context(|| format!("not done within {TEST_TIMEOUT:?}"))?
}

/// A one-node cluster with dnsmasq answering `PEERS_NAME` with `answer(node)`, and pullcache in
/// cluster mode on the node, started once the node's resolver gives that answer. The temp dir
/// holds the cluster CA.
async fn start(answer: fn(&Node) -> Vec<Ipv4Addr>) -> Result<(Cluster, Dns, tempfile::TempDir)> {
    let cluster = Cluster::start(ClusterOptions {
        nodes: 1,
        upstream_rate: None,
    })
    .await?;
    let dns = cluster.start_dns().await?;
    let node = cluster.node(0);
    set_answer(&dns, node, &answer(node)).await?;
    let ca = tempfile::tempdir()?;
    pullcache::ca::init(&ca.path().join("ca"))?;
    let peer = SocketAddr::from((node.addr(), PEER_PORT));
    node.start_pullcache(support::cluster::member_args(
        peer,
        &ca.path().join("ca"),
        PEERS_NAME,
        REFRESH,
    ))
    .await?;
    Ok((cluster, dns, ca))
}

/// Makes dnsmasq answer `PEERS_NAME` with `addrs` (nothing when empty), and waits until the
/// node's resolver gives that answer: dnsmasq reads its hosts file again in its own time.
async fn set_answer(dns: &Dns, node: &Node, addrs: &[Ipv4Addr]) -> Result<()> {
    dns.set(PEERS_NAME, addrs)?;
    let mut want: Vec<String> = addrs.iter().map(Ipv4Addr::to_string).collect();
    want.sort();
    support::eventually(
        WAIT,
        format_args!("the node to resolve {PEERS_NAME} to {want:?}"),
        || async {
            let out = node
                .netns()
                .output(&["getent", "ahostsv4", PEERS_NAME], Duration::from_secs(5))
                .await?;
            let text = String::from_utf8_lossy(&out.stdout);
            let mut got: Vec<String> = text
                .lines()
                .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
                .collect();
            got.sort();
            got.dedup();
            anyhow::Ok(got == want)
        },
    )
    .await
}

/// Another address on the node's subnet, where nothing runs: the view only lists it.
fn absent_peer(node: &Node) -> Ipv4Addr {
    let [a, b, c, _] = node.addr().octets();
    Ipv4Addr::new(a, b, c, 99)
}

/// The messages of the WARN lines discovery (`pullcache::peers::membership`) logged so far.
fn discovery_warnings(node: &Node) -> Vec<String> {
    node.pullcache_log()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|json| json["level"] == "WARN" && json["target"] == "pullcache::peers::membership")
        .map(|json| json["fields"].to_string())
        .collect()
}

/// The sizes of the views discovery logged changing to ("peer view changed"), in order.
fn views_logged(node: &Node) -> Vec<u64> {
    node.pullcache_log()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|json| json["fields"]["message"] == "peer view changed")
        .filter_map(|json| json["fields"]["peers"].as_u64())
        .collect()
}

/// Waits until the node's view has `size` peers by its `/metrics`.
async fn view_becomes(node: &Node, size: f64) -> Result<()> {
    support::eventually_every(POLL, WAIT, format_args!("{VIEW_SIZE} to be {size}"), || async {
        anyhow::Ok(node.metric(VIEW_SIZE).await? == size)
    })
    .await
}

/// Fails when discovery logged a WARN.
fn no_warning(node: &Node) -> Result<()> {
    let warnings = discovery_warnings(node);
    ensure!(warnings.is_empty(), "discovery logged WARN: {warnings:#?}");
    Ok(())
}

/// Watches the node through its first successful lookup and [`ROUNDS`] more, failing at once
/// if discovery logs a WARN meanwhile (or did before). Lookups are counted by the advance of
/// their timestamp.
async fn settles_without_warning(node: &Node) -> Result<()> {
    let first = support::eventually_every(POLL, WAIT, "a successful lookup", || async {
        no_warning(node)?;
        let stamp = node.metric(LAST_SUCCESS).await?;
        anyhow::Ok((stamp > 0.0).then_some(stamp))
    })
    .await?;
    let until = first + (REFRESH * ROUNDS).as_secs_f64();
    support::eventually_every(
        POLL,
        WAIT,
        format_args!("{ROUNDS} more successful lookups after {first}"),
        || async {
            no_warning(node)?;
            anyhow::Ok(node.metric(LAST_SUCCESS).await? >= until)
        },
    )
    .await
}

/// Waits until the node has counted at least `count` failed lookups, and returns the count.
async fn failures_reach(node: &Node, count: f64) -> Result<f64> {
    support::eventually_every(POLL, WAIT, format_args!("{count} failed lookups"), || async {
        let failures = node.metric(FAILURES).await?;
        anyhow::Ok((failures >= count).then_some(failures))
    })
    .await
}

/// A node whose DNS answer holds only itself is alone, and that is an answer: view size 1, no
/// failure, no WARN however many refreshes pass, one INFO. A peer that joins the answer and
/// leaves it again enters and leaves the view, and alone is said once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alone_is_an_answer_said_once() -> Result<()> {
    within(async {
        let (cluster, dns, _ca) = start(|node| vec![node.addr()]).await?;
        let node = cluster.node(0);
        let me = node.addr();
        settles_without_warning(node).await?;
        ensure!(node.metric(VIEW_SIZE).await? == 1.0, "alone is a view of one");
        ensure!(node.metric(FAILURES).await? == 0.0, "alone was counted as a failure");
        ensure!(views_logged(node) == [1], "views logged: {:?}", views_logged(node));

        // A peer joins the answer, then leaves it: DNS is honoured both ways.
        set_answer(&dns, node, &[me, absent_peer(node)]).await?;
        view_becomes(node, 2.0).await?;
        set_answer(&dns, node, &[me]).await?;
        view_becomes(node, 1.0).await?;
        settles_without_warning(node).await?;
        ensure!(node.metric(FAILURES).await? == 0.0, "alone was counted as a failure");
        ensure!(
            views_logged(node) == [1, 2, 1],
            "views logged: {:?}",
            views_logged(node)
        );
        Ok(())
    })
    .await
}

/// A lookup that finds nothing (NXDOMAIN) is a failure: counted, logged at WARN, and the last
/// view kept, with no success recorded meanwhile. So is a lookup with no DNS server to ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_that_finds_nothing_is_a_failure() -> Result<()> {
    within(async {
        let (cluster, dns, _ca) = start(|_| Vec::new()).await?;
        let node = cluster.node(0);
        let me = node.addr();
        failures_reach(node, 2.0).await?;
        ensure!(
            node.metric(VIEW_SIZE).await? == 1.0,
            "before any answer the view is the node alone"
        );
        ensure!(node.metric(LAST_SUCCESS).await? == 0.0, "a success was recorded");
        // NXDOMAIN: glibc's EAI_NONAME, in the error the WARN carries.
        let warnings = discovery_warnings(node);
        ensure!(
            warnings
                .iter()
                .any(|w| w.contains("peer discovery failed") && w.contains("Name or service not known")),
            "no WARN says the lookup found no such name: {warnings:#?}"
        );
        ensure!(views_logged(node).is_empty(), "views logged: {:?}", views_logged(node));

        // A view of two, then an answer of nothing: the view stays, failures are counted, and
        // the last success stays where it was.
        set_answer(&dns, node, &[me, absent_peer(node)]).await?;
        view_becomes(node, 2.0).await?;
        let before = node.metric(FAILURES).await?;
        set_answer(&dns, node, &[]).await?;
        let failed = failures_reach(node, before + 1.0).await?;
        let stamp = node.metric(LAST_SUCCESS).await?;
        failures_reach(node, failed + f64::from(ROUNDS)).await?;
        ensure!(node.metric(VIEW_SIZE).await? == 2.0, "the last view was not kept");
        ensure!(
            node.metric(LAST_SUCCESS).await? == stamp,
            "a lookup of nothing was a success"
        );
        ensure!(views_logged(node) == [2], "views logged: {:?}", views_logged(node));

        // No DNS server at all (cluster DNS down): failures too, not a quiet single node.
        drop(dns);
        let failed = node.metric(FAILURES).await?;
        failures_reach(node, failed + 2.0).await?;
        ensure!(node.metric(VIEW_SIZE).await? == 2.0, "the last view was not kept");
        // Each run of failures is said once at WARN (then every 5 minutes), not at every
        // refresh: two runs here, many more failures.
        let warnings = discovery_warnings(node);
        ensure!(warnings.len() == 2, "WARN lines: {warnings:#?}");
        ensure!(node.metric(FAILURES).await? > 4.0);
        Ok(())
    })
    .await
}
