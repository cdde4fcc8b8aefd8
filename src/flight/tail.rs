//! Reading a blob file by offset, in large chunks: a committed blob, or a temp file that a
//! flight is still writing. While the flight is unverified, a reader never hands out the last
//! byte of its range, so no response can complete with bytes that fail their digest.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use super::{FlightState, Progress};
use crate::store::{Blob, InUse};

/// Bytes per read from disk.
pub const CHUNK: u64 = 1024 * 1024;

pub struct Tail {
    file: Arc<File>,
    pos: u64,
    /// Exclusive end; `None` means the end of a blob whose size the upstream did not say.
    end: Option<u64>,
    progress: Option<watch::Receiver<Progress>>,
    /// Keeps a stored blob from eviction while it is read.
    _in_use: Option<InUse>,
}

impl Tail {
    /// A committed blob: everything up to `end` is readable now.
    pub fn stored(blob: Blob, start: u64, end: u64) -> Tail {
        Tail {
            file: Arc::new(blob.file),
            pos: start,
            end: Some(end),
            progress: None,
            _in_use: Some(blob.in_use),
        }
    }

    pub(super) fn following(
        file: Arc<File>,
        start: u64,
        end: Option<u64>,
        progress: watch::Receiver<Progress>,
    ) -> Tail {
        Tail {
            file,
            pos: start,
            end,
            progress: Some(progress),
            _in_use: None,
        }
    }

    /// The next chunk, `None` at the end, or an error that must abort the response.
    pub async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        let readable = match self.readable().await {
            Ok(readable) => readable,
            Err(e) => return Some(Err(e)),
        };
        if self.pos >= readable {
            return None;
        }
        let len = (readable - self.pos).min(CHUNK) as usize;
        let (file, pos) = (self.file.clone(), self.pos);
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0; len];
            file.read_exact_at(&mut buf, pos).map(|()| Bytes::from(buf))
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        if let Ok(chunk) = &read {
            self.pos += chunk.len() as u64;
        }
        Some(read)
    }

    /// How far this reader may read now, waiting for the flight if nothing new is readable.
    /// Returns `pos` when the range is complete.
    async fn readable(&mut self) -> io::Result<u64> {
        let Some(rx) = &mut self.progress else {
            return Ok(self.end.unwrap_or(0));
        };
        loop {
            {
                let p = rx.borrow_and_update();
                match &p.state {
                    FlightState::Failed(e) => return Err(io::Error::other(e.to_string())),
                    FlightState::Done => {
                        return match self.end {
                            Some(end) if end > p.written => {
                                Err(io::Error::other("blob is shorter than the range served"))
                            }
                            Some(end) => Ok(end),
                            None => Ok(p.written),
                        };
                    }
                    FlightState::Connecting | FlightState::Streaming => {
                        // Hold back the range's final byte until the digest is verified.
                        let limit = self.end.map_or(p.written, |end| p.written.min(end.saturating_sub(1)));
                        if limit > self.pos {
                            return Ok(limit);
                        }
                    }
                }
            }
            if rx.changed().await.is_err() {
                return Err(io::Error::other("flight ended without a result"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[tokio::test]
    async fn holds_back_the_last_byte_until_verified() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"abcdef").unwrap();
        let file = Arc::new(f);
        let (tx, rx) = watch::channel(Progress {
            size: Some(6),
            written: 6,
            state: FlightState::Streaming,
        });
        let mut tail = Tail::following(file, 0, Some(6), rx);
        assert_eq!(&tail.next_chunk().await.unwrap().unwrap()[..], b"abcde");
        let pending = tokio::spawn(async move { (tail.next_chunk().await, tail) });
        tokio::task::yield_now().await;
        assert!(!pending.is_finished(), "final byte went out before verification");
        tx.send_modify(|p| p.state = FlightState::Done);
        let (chunk, mut tail) = pending.await.unwrap();
        assert_eq!(&chunk.unwrap().unwrap()[..], b"f");
        assert!(tail.next_chunk().await.is_none());
    }

    #[tokio::test]
    async fn a_failed_flight_aborts_readers() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let (tx, rx) = watch::channel(Progress {
            size: None,
            written: 0,
            state: FlightState::Streaming,
        });
        let mut tail = Tail::following(file, 0, None, rx);
        let pending = tokio::spawn(async move { tail.next_chunk().await });
        tx.send_modify(|p| {
            p.state = FlightState::Failed(Arc::new(crate::error::Error::Internal("digest mismatch".into())))
        });
        assert!(pending.await.unwrap().unwrap().is_err());
    }

    #[tokio::test]
    async fn stored_reads_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let data = vec![7u8; (CHUNK as usize) * 2 + 5];
        let digest = crate::oci::Digest::of(&data);
        let mut temp = store.temp_blob().unwrap();
        temp.write(&data).unwrap();
        store.commit(temp, &digest, None).unwrap();
        let mut tail = Tail::stored(store.open_blob(&digest).unwrap().unwrap(), 3, data.len() as u64);
        let mut got = 0;
        while let Some(chunk) = tail.next_chunk().await {
            let chunk = chunk.unwrap();
            assert!(chunk.len() as u64 <= CHUNK);
            got += chunk.len();
        }
        assert_eq!(got, data.len() - 3);
    }
}
