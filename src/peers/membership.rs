//! Who the peers are: the `--peer` targets, resolved again every refresh. A target is an
//! address, or a name with a port; in Kubernetes, the chart's headless Service, whose DNS
//! answer holds the ready pods only. A refresh that fails or finds nobody keeps the last good
//! view, and this node is always in its own view.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::PeerAddr;

/// The ready peers, sorted, this node among them.
pub type View = Arc<Vec<PeerAddr>>;

/// Resolves every target once; `None` when any of them fails to resolve or the view would be
/// only this node while there are targets.
async fn resolve(me: PeerAddr, targets: &[String]) -> Option<Vec<PeerAddr>> {
    let mut peers = vec![me];
    for target in targets {
        match tokio::net::lookup_host(target.as_str()).await {
            Ok(addrs) => peers.extend(addrs),
            Err(e) => {
                tracing::warn!(target, error = %e, "peer discovery failed; keeping the last view");
                return None;
            }
        }
    }
    peers.sort_unstable();
    peers.dedup();
    if peers.len() == 1 && !targets.is_empty() {
        tracing::warn!("peer discovery found no peer; keeping the last view");
        return None;
    }
    Some(peers)
}

/// Starts the discovery task; the view starts with this node alone and the first refresh
/// happens at once. The task ends when every receiver is gone.
pub fn discover(me: PeerAddr, targets: Vec<String>, every: Duration) -> watch::Receiver<View> {
    let (tx, rx) = watch::channel(Arc::new(vec![me]));
    tokio::spawn(async move {
        loop {
            if let Some(peers) = resolve(me, &targets).await
                && **tx.borrow() != peers
            {
                tracing::info!(peers = peers.len(), "peer view changed");
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(*resolve(me, &[]).await.unwrap(), vec![me]);
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_last_view() {
        let me: PeerAddr = "127.0.0.1:7443".parse().unwrap();
        assert!(resolve(me, &["no-such-host.invalid:7443".into()]).await.is_none());
        assert!(resolve(me, &["127.0.0.1:7443".into()]).await.is_none(), "only itself");
    }
}
