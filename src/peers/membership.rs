//! Who the peers are: the `--peer` targets, resolved again every refresh. A target is an
//! address, or a name with a port; in Kubernetes, the chart's headless Service, whose DNS
//! answer holds the ready pods only. An answer is the view, and this node is always in it: an
//! answer that holds only this node is a view of one (a one-node cluster, the first pod to be
//! ready), not a failure. A lookup that fails, or finds no address at all, is a failure: it
//! keeps the last view, and is logged and counted, so that "alone" and "broken" look
//! different on a dashboard.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::{Gauge, IntCounter, IntGauge};
use tokio::sync::watch;

use super::PeerAddr;

/// The ready peers, sorted, this node among them.
pub type View = Arc<Vec<PeerAddr>>;

/// A target whose lookup failed.
#[derive(Debug, thiserror::Error)]
#[error("peer target {target}: {source}")]
struct LookupError {
    target: String,
    #[source]
    source: std::io::Error,
}

/// Resolves every target once. Any target that fails fails the whole answer: a view missing
/// the peers behind one name would move their digests elsewhere for nothing.
async fn resolve(me: PeerAddr, targets: &[String]) -> Result<Vec<PeerAddr>, LookupError> {
    let mut peers = vec![me];
    for target in targets {
        let failed = |source| LookupError {
            target: target.clone(),
            source,
        };
        let mut addrs = tokio::net::lookup_host(target.as_str())
            .await
            .map_err(failed)?
            .peekable();
        if addrs.peek().is_none() {
            return Err(failed(std::io::Error::new(std::io::ErrorKind::NotFound, "no address")));
        }
        peers.extend(addrs);
    }
    peers.sort_unstable();
    peers.dedup();
    Ok(peers)
}

/// A run of failed lookups is said at WARN when it starts and then this often, not at every
/// refresh: the counter and its alert carry the rest.
const WARN_AGAIN_AFTER: Duration = Duration::from_secs(300);

/// Failed lookups in a row, and when that was last said at WARN.
#[derive(Default)]
struct Failing {
    in_a_row: u64,
    warned: Option<std::time::Instant>,
}

/// One refresh: the new view when the answer differs from the last one (`None` before the
/// first). A failure is counted, logged, and changes nothing.
async fn refresh(
    me: PeerAddr,
    targets: &[String],
    last: Option<&[PeerAddr]>,
    metrics: &Metrics,
    failing: &mut Failing,
) -> Option<Vec<PeerAddr>> {
    match resolve(me, targets).await {
        Ok(peers) => {
            if failing.in_a_row > 0 {
                tracing::info!(failed = failing.in_a_row, "peer discovery answers again");
                *failing = Failing::default();
            }
            metrics.view_size.set(i64::try_from(peers.len()).unwrap_or(i64::MAX));
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            metrics.last_success.set(now.as_secs_f64());
            (last != Some(peers.as_slice())).then_some(peers)
        }
        Err(e) => {
            metrics.failures.inc();
            failing.in_a_row += 1;
            if failing.warned.is_none_or(|at| at.elapsed() >= WARN_AGAIN_AFTER) {
                failing.warned = Some(std::time::Instant::now());
                tracing::warn!(error = %e, failed = failing.in_a_row, "peer discovery failed; keeping the last view");
            } else {
                tracing::debug!(error = %e, failed = failing.in_a_row, "peer discovery failed; keeping the last view");
            }
            None
        }
    }
}

/// Starts the discovery task; the view starts with this node alone and the first refresh
/// happens at once. The task ends when every receiver is gone.
pub fn discover(me: PeerAddr, targets: Vec<String>, every: Duration, metrics: Metrics) -> watch::Receiver<View> {
    let (tx, rx) = watch::channel(Arc::new(vec![me]));
    metrics.view_size.set(1);
    tokio::spawn(async move {
        let (mut last, mut failing) = (None, Failing::default());
        loop {
            if let Some(peers) = refresh(me, &targets, last.as_deref(), &metrics, &mut failing).await {
                // The first answer and each change, once: a node that stays alone says so once.
                tracing::info!(peers = peers.len(), alone = peers.len() == 1, "peer view changed");
                last = Some(peers.clone());
                if tx.send(Arc::new(peers)).is_err() {
                    return;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = tx.closed() => return,
            }
        }
    });
    rx
}

/// What discovery sees, for a dashboard to tell a node alone from one whose lookups fail.
#[derive(Clone)]
pub struct Metrics {
    /// Peers in the view, this node included; 0 outside cluster mode.
    view_size: IntGauge,
    failures: IntCounter,
    last_success: Gauge,
}

impl Metrics {
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Metrics> {
        let view_size = IntGauge::new(
            "pullcache_peer_view_size",
            "Peers in this node's view, itself included: 1 is alone. 0 outside cluster mode.",
        )?;
        let failures = IntCounter::new(
            "pullcache_peer_discovery_failures_total",
            "Peer lookups that failed or found no address; each kept the last view.",
        )?;
        let last_success = Gauge::new(
            "pullcache_peer_discovery_last_success_timestamp_seconds",
            "When a peer lookup last succeeded, in seconds since the Unix epoch; 0 before the first.",
        )?;
        registry.register(Box::new(view_size.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(last_success.clone()))?;
        Ok(Metrics {
            view_size,
            failures,
            last_success,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::register(&prometheus::Registry::new()).unwrap()
    }

    #[tokio::test]
    async fn literals_and_names_resolve_and_this_node_is_always_in() {
        let me: PeerAddr = "127.0.0.1:7443".parse().unwrap();
        let view = resolve(me, &["127.0.0.2:7443".into(), "localhost:7444".into()])
            .await
            .unwrap();
        assert!(view.contains(&me));
        assert!(view.contains(&"127.0.0.2:7443".parse().unwrap()));
        assert!(view.iter().any(|p| p.port() == 7444 && p.ip().is_loopback()));
        assert!(view.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
        assert_eq!(resolve(me, &[]).await.unwrap(), vec![me]);
    }

    #[tokio::test]
    async fn an_answer_of_only_this_node_is_a_view_of_one() {
        let me: PeerAddr = "127.0.0.1:7443".parse().unwrap();
        let other: PeerAddr = "127.0.0.2:7443".parse().unwrap();
        let metrics = metrics();
        let view = refresh(
            me,
            &[me.to_string()],
            Some(&[me, other]),
            &metrics,
            &mut Failing::default(),
        )
        .await;
        assert_eq!(view, Some(vec![me]), "the peer no longer listed stayed");
        assert_eq!(metrics.view_size.get(), 1);
        assert_eq!(metrics.failures.get(), 0);
        assert!(metrics.last_success.get() > 0.0);
        assert_eq!(
            refresh(me, &[me.to_string()], Some(&[me]), &metrics, &mut Failing::default()).await,
            None,
            "unchanged"
        );
        let first = refresh(me, &[me.to_string()], None, &metrics, &mut Failing::default()).await;
        assert_eq!(
            first,
            Some(vec![me]),
            "a first answer is news even when it is the start view"
        );
    }

    #[tokio::test]
    async fn a_failed_lookup_keeps_the_last_view_and_is_counted() {
        let me: PeerAddr = "127.0.0.1:7443".parse().unwrap();
        let other: PeerAddr = "127.0.0.2:7443".parse().unwrap();
        let metrics = metrics();
        metrics.view_size.set(2);
        let targets = [other.to_string(), "no-such-host.invalid:7443".into()];
        let mut failing = Failing::default();
        assert_eq!(
            refresh(me, &targets, Some(&[me, other]), &metrics, &mut failing).await,
            None
        );
        assert_eq!(metrics.failures.get(), 1);
        let warned = failing.warned.expect("the first failure is said");
        assert_eq!(
            refresh(me, &targets, Some(&[me, other]), &metrics, &mut failing).await,
            None
        );
        assert_eq!(
            (failing.in_a_row, failing.warned),
            (2, Some(warned)),
            "said once, not again"
        );
        assert_eq!(metrics.view_size.get(), 2, "the last view is kept");
        assert_eq!(metrics.last_success.get(), 0.0);
    }
}
