//! Keyed coalescing for small results (a tag lookup, a manifest): the first caller's future
//! runs in its own task, later callers with the same key wait for its result. The task does
//! not depend on any caller staying around.

use crate::sync::MutexExt;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

type Active<K, V> = Arc<Mutex<HashMap<K, watch::Receiver<Option<V>>>>>;

pub struct Coalesce<K, V> {
    active: Active<K, V>,
}

impl<K, V> Default for Coalesce<K, V> {
    fn default() -> Self {
        Coalesce { active: Arc::default() }
    }
}

/// The work behind a key panicked, so it has no result.
#[derive(Debug, thiserror::Error)]
#[error("coalesced task ended without a result")]
pub struct Abandoned;

/// Removes the key when the task ends, result or panic.
struct Leave<K: Eq + Hash, V> {
    active: Active<K, V>,
    key: Option<K>,
}

impl<K: Eq + Hash, V> Drop for Leave<K, V> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.active.locked().remove(&key);
        }
    }
}

impl<K, V> Coalesce<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `work` unless work for `key` is already running; returns its result and whether
    /// this caller joined someone else's.
    pub async fn run<F>(&self, key: K, work: F) -> Result<(V, bool), Abandoned>
    where
        F: Future<Output = V> + Send + 'static,
    {
        let (mut rx, joined) = {
            let mut active = self.active.locked();
            match active.get(&key) {
                Some(rx) => (rx.clone(), true),
                None => {
                    let (tx, rx) = watch::channel(None);
                    active.insert(key.clone(), rx.clone());
                    let leave = Leave {
                        active: self.active.clone(),
                        key: Some(key),
                    };
                    tokio::spawn(async move {
                        let _leave = leave;
                        let value = work.await;
                        let _ = tx.send(Some(value));
                    });
                    (rx, false)
                }
            }
        };
        loop {
            if let Some(value) = rx.borrow_and_update().clone() {
                return Ok((value, joined));
            }
            rx.changed().await.map_err(|_| Abandoned)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_run() {
        let group: Arc<Coalesce<&'static str, usize>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (group, runs) = (group.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                group
                    .run("k", async move {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        runs.fetch_add(1, Ordering::SeqCst) + 41
                    })
                    .await
                    .unwrap()
            }));
        }
        let mut joined = 0;
        for t in tasks {
            let (v, j) = t.await.unwrap();
            assert_eq!(v, 41);
            joined += usize::from(j);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(joined, 9);
        // Once done, the key is free again.
        let (v, j) = group.run("k", async { 7 }).await.unwrap();
        assert_eq!((v, j), (7, false));
    }

    #[tokio::test]
    async fn a_panicking_task_frees_its_key() {
        let group: Coalesce<u8, u8> = Coalesce::default();
        assert!(group.run(1, async { panic!("boom") }).await.is_err());
        assert_eq!(group.run(1, async { 2 }).await.unwrap(), (2, false));
    }
}
