//! Hot-blob admission on the peer port: who is receiving each blob from this node, and who
//! has received it. Up to `max` peers are served a blob at once; the next asker is sent on,
//! round robin, to a peer that has it or is receiving it (never back to itself), and becomes
//! a receiver others can be sent to in turn. So a rollout forms a tree, not a star. With
//! nobody else to send it to, the asker is served anyway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::oci::Digest;
use crate::peers::PeerAddr;
use crate::sync::MutexExt;

/// Peers remembered per blob for redirects.
const MAX_REMEMBERED_RECEIVERS: usize = 64;
/// Blobs remembered; past it the entries without uploads are forgotten.
const MAX_REMEMBERED_BLOBS: usize = 4096;

/// Who is receiving each blob from this node, and who has received it.
#[derive(Default)]
pub(super) struct Uploads {
    by_digest: Mutex<HashMap<Digest, Receivers>>,
}

#[derive(Default)]
struct Receivers {
    /// Uploads running now.
    active: usize,
    /// Every peer that is receiving or has received it, oldest first.
    peers: Vec<PeerAddr>,
    /// The index in `peers` where the search for the next redirect starts.
    next: usize,
}

/// An upload in progress; dropping it (when the body ends) frees its place.
pub(super) struct Upload {
    uploads: Arc<Uploads>,
    digest: Digest,
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(receivers) = self.uploads.by_digest.locked().get_mut(&self.digest) {
            receivers.active = receivers.active.saturating_sub(1);
        }
    }
}

impl Uploads {
    /// Either a place for `asker` among this blob's (at most `max`) uploads, or the peer to
    /// send it to.
    pub(super) fn admit(self: &Arc<Self>, digest: &Digest, asker: PeerAddr, max: usize) -> Result<Upload, PeerAddr> {
        let mut map = self.by_digest.locked();
        if map.len() >= MAX_REMEMBERED_BLOBS && !map.contains_key(digest) {
            map.retain(|_, r| r.active > 0);
        }
        let receivers = map.entry(digest.clone()).or_default();
        if receivers.active >= max
            && let Some(target) = receivers.redirect(asker)
        {
            receivers.remember(asker);
            return Err(target);
        }
        receivers.active += 1;
        receivers.remember(asker);
        Ok(Upload {
            uploads: self.clone(),
            digest: digest.clone(),
        })
    }
}

impl Receivers {
    /// The next receiver other than `asker`, round robin.
    fn redirect(&mut self, asker: PeerAddr) -> Option<PeerAddr> {
        let n = self.peers.len();
        let i = (0..n).map(|i| (self.next + i) % n).find(|&i| self.peers[i] != asker)?;
        self.next = i + 1;
        Some(self.peers[i])
    }

    /// Notes `peer` as a receiver, forgetting the oldest past [`MAX_REMEMBERED_RECEIVERS`].
    fn remember(&mut self, peer: PeerAddr) {
        if self.peers.contains(&peer) {
            return;
        }
        if self.peers.len() == MAX_REMEMBERED_RECEIVERS {
            self.peers.remove(0);
            self.next = self.next.saturating_sub(1);
        }
        self.peers.push(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u16) -> PeerAddr {
        PeerAddr::from(([10, 0, (n >> 8) as u8, n as u8], 7443))
    }

    fn blob(n: usize) -> Digest {
        Digest::of(&n.to_le_bytes())
    }

    fn remembered(uploads: &Uploads, digest: &Digest) -> Vec<PeerAddr> {
        uploads.by_digest.locked()[digest].peers.clone()
    }

    #[test]
    fn admits_up_to_max_then_redirects_to_a_receiver() {
        let uploads = Arc::new(Uploads::default());
        let digest = blob(0);
        let held: Vec<Upload> = (1..=3).map(|n| uploads.admit(&digest, peer(n), 3).unwrap()).collect();
        let target = uploads
            .admit(&digest, peer(4), 3)
            .err()
            .expect("the fourth asker is redirected");
        assert!([peer(1), peer(2), peer(3)].contains(&target), "{target}");
        // Another blob has its own places.
        assert!(uploads.admit(&blob(1), peer(4), 3).is_ok());
        drop(held);
    }

    #[test]
    fn redirects_round_robin_so_every_receiver_gets_a_turn() {
        let uploads = Arc::new(Uploads::default());
        let digest = blob(0);
        let _held = [uploads.admit(&digest, peer(1), 2), uploads.admit(&digest, peer(2), 2)];
        let targets: Vec<PeerAddr> = (3..=8)
            .map(|n| uploads.admit(&digest, peer(n), 2).err().expect("redirected"))
            .collect();
        // Each receiver, the redirected ones included, gets one before any gets a second.
        assert_eq!(targets, [1, 2, 3, 4, 5, 6].map(peer));
    }

    #[test]
    fn never_redirects_an_asker_to_itself() {
        let uploads = Arc::new(Uploads::default());
        let digest = blob(0);
        let _first = uploads.admit(&digest, peer(1), 1).unwrap();
        assert_eq!(uploads.admit(&digest, peer(2), 1).err(), Some(peer(1)));
        // Peer 1 asks again (a retry): the only other receiver is peer 2.
        for _ in 0..3 {
            assert_eq!(uploads.admit(&digest, peer(1), 1).err(), Some(peer(2)));
            assert_eq!(uploads.admit(&digest, peer(2), 1).err(), Some(peer(1)));
        }
    }

    #[test]
    fn serves_the_asker_when_nobody_else_has_the_blob() {
        let uploads = Arc::new(Uploads::default());
        let digest = blob(0);
        let _first = uploads.admit(&digest, peer(1), 1).unwrap();
        // Full, but peer 1 is the only receiver: it is served a second time.
        let _again = uploads.admit(&digest, peer(1), 1).expect("served anyway");
        assert_eq!(uploads.by_digest.locked()[&digest].active, 2);
        // At max 0 a first asker has nobody to go to either.
        assert!(uploads.admit(&blob(1), peer(1), 0).is_ok());
    }

    #[test]
    fn a_dropped_upload_frees_its_place() {
        let uploads = Arc::new(Uploads::default());
        let digest = blob(0);
        let first = uploads.admit(&digest, peer(1), 1).unwrap();
        assert!(uploads.admit(&digest, peer(2), 1).is_err());
        drop(first);
        assert_eq!(uploads.by_digest.locked()[&digest].active, 0);
        assert!(
            uploads.admit(&digest, peer(3), 1).is_ok(),
            "the freed place went unused"
        );
    }

    #[test]
    fn remembers_at_most_64_receivers_per_blob_the_newest() {
        let uploads = Arc::new(Uploads::default());
        let admitted = blob(0);
        for n in 1..=100 {
            drop(uploads.admit(&admitted, peer(n), usize::MAX).unwrap());
        }
        let peers = remembered(&uploads, &admitted);
        assert_eq!(peers, (37..=100).map(peer).collect::<Vec<_>>());

        // Redirected askers are remembered too, within the same bound.
        let redirected = blob(1);
        let _held = uploads.admit(&redirected, peer(1), 1).unwrap();
        for n in 2..=100 {
            assert!(uploads.admit(&redirected, peer(n), 1).is_err());
        }
        let peers = remembered(&uploads, &redirected);
        assert_eq!(peers.len(), MAX_REMEMBERED_RECEIVERS);
        assert_eq!(peers.last(), Some(&peer(100)));
    }

    #[test]
    fn remembers_at_most_4096_blobs_keeping_those_with_uploads() {
        let uploads = Arc::new(Uploads::default());
        let busy = uploads.admit(&blob(0), peer(1), 1).unwrap();
        for n in 1..MAX_REMEMBERED_BLOBS {
            drop(uploads.admit(&blob(n), peer(1), 1).unwrap());
        }
        assert_eq!(uploads.by_digest.locked().len(), MAX_REMEMBERED_BLOBS);
        let _new = uploads.admit(&blob(MAX_REMEMBERED_BLOBS), peer(1), 1).unwrap();
        let map = uploads.by_digest.locked();
        assert_eq!(map.len(), 2, "idle blobs were kept");
        assert!(map.contains_key(&blob(0)), "a blob with an upload was forgotten");
        drop(map);
        // Its upload still frees its place.
        drop(busy);
        assert_eq!(uploads.by_digest.locked()[&blob(0)].active, 0);
    }
}
