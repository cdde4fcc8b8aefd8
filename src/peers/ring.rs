//! Ownership by rendezvous hashing: every node ranks the peers for a digest by a hash of
//! (peer, digest), the same way, without talking to each other. The first is the digest's
//! owner, the rest are the order to fall back in. A peer joining or leaving moves only the
//! digests it wins or won, about 1/N of them.

use sha2::{Digest as _, Sha256};

use super::PeerAddr;
use crate::oci::Digest;

/// `peers` ordered for `digest`, owner first.
pub fn rank<'a>(peers: impl IntoIterator<Item = &'a PeerAddr>, digest: &Digest) -> Vec<PeerAddr> {
    let mut scored: Vec<(u64, &PeerAddr)> = peers.into_iter().map(|p| (score(p, digest), p)).collect();
    // Ties (practically impossible) break by address, so every node agrees.
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.into_iter().map(|(_, p)| *p).collect()
}

fn score(peer: &PeerAddr, digest: &Digest) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(peer.to_string().as_bytes());
    hasher.update([0]);
    hasher.update(digest.hex().as_bytes());
    let hash = hasher.finalize();
    u64::from_be_bytes(hash[..8].try_into().expect("a sha256 has 8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<PeerAddr> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:7443", i / 200, i % 200 + 1).parse().unwrap())
            .collect()
    }

    fn digests(n: usize) -> Vec<Digest> {
        (0..n).map(|i| Digest::of(format!("blob {i}").as_bytes())).collect()
    }

    #[test]
    fn every_node_ranks_alike_whatever_the_order_it_knows_peers_in() {
        let mut ps = peers(7);
        let d = Digest::of(b"x");
        let first = rank(&ps, &d);
        ps.reverse();
        assert_eq!(rank(&ps, &d), first);
        assert_eq!(first.len(), 7);
    }

    #[test]
    fn owners_spread_evenly() {
        let ps = peers(8);
        let mut owned = std::collections::HashMap::new();
        for d in digests(8000) {
            *owned.entry(rank(&ps, &d)[0]).or_insert(0) += 1;
        }
        assert_eq!(owned.len(), 8);
        for (peer, n) in owned {
            assert!((800..1200).contains(&n), "{peer} owns {n} of 8000");
        }
    }

    /// A node joining takes about 1/N of the digests, all from others; a node leaving hands
    /// on only its own. No other digest changes owner.
    #[test]
    fn membership_changes_move_about_one_nth() {
        let (n, keys) = (10, 10_000);
        let before = peers(n);
        let after_join = peers(n + 1);
        let mut after_leave = before.clone();
        let gone = after_leave.remove(3);
        let (mut moved_join, mut moved_leave) = (0, 0);
        for d in digests(keys) {
            let owner = rank(&before, &d)[0];
            let joined = rank(&after_join, &d)[0];
            if joined != owner {
                assert_eq!(joined, after_join[n], "a digest moved between two old peers");
                moved_join += 1;
            }
            let left = rank(&after_leave, &d)[0];
            if left != owner {
                assert_eq!(owner, gone, "a digest moved that the leaving peer did not own");
                // It goes to the peer that ranked second: the fallback order holds.
                assert_eq!(left, rank(&before, &d)[1]);
                moved_leave += 1;
            }
        }
        let expected_join = keys / (n + 1);
        let expected_leave = keys / n;
        for (moved, expected) in [(moved_join, expected_join), (moved_leave, expected_leave)] {
            assert!(
                moved > expected * 8 / 10 && moved < expected * 12 / 10,
                "{moved} of {keys} moved, expected about {expected}"
            );
        }
    }
}
