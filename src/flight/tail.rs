//! Reading a blob file by offset, in large chunks: a committed blob, or a temp file that a
//! flight is still writing (past a failed cache write, from the flight's spill window). While
//! the flight is unverified, a reader never hands out the last byte of its range, so no
//! response can complete with bytes that fail their digest.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use super::spill::Spill;
use super::{FlightState, Progress};
use crate::store::{Blob, InUse};

/// Bytes per read from disk.
pub const CHUNK: u64 = 1024 * 1024;

pub struct Tail {
    /// `None` for a flight that could not create its temp file: everything comes from `spill`.
    file: Option<Arc<File>>,
    pos: u64,
    /// Exclusive end; `None` means the end of a blob whose size the upstream did not say.
    end: Option<u64>,
    progress: Option<watch::Receiver<Progress>>,
    /// Keeps a stored blob from eviction while it is read.
    _in_use: Option<InUse>,
    /// The flight's pass-through window, and this reader's id in it.
    spill: Option<(Arc<Spill>, u64)>,
}

impl Drop for Tail {
    fn drop(&mut self) {
        if let Some((spill, id)) = &self.spill {
            spill.unregister(*id);
        }
    }
}

impl Tail {
    /// A committed blob: everything up to `end` is readable now.
    pub fn stored(blob: Blob, start: u64, end: u64) -> Tail {
        Tail {
            file: Some(Arc::new(blob.file)),
            pos: start,
            end: Some(end),
            progress: None,
            _in_use: Some(blob.in_use),
            spill: None,
        }
    }

    pub(super) fn following(
        file: Option<Arc<File>>,
        spill: Arc<Spill>,
        start: u64,
        end: Option<u64>,
        progress: watch::Receiver<Progress>,
    ) -> Tail {
        let id = spill.register(start);
        Tail {
            file,
            pos: start,
            end,
            progress: Some(progress),
            _in_use: None,
            spill: Some((spill, id)),
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
        let mut len = (readable - self.pos).min(CHUNK);
        let disk_len = self.spill.as_ref().and_then(|(spill, _)| spill.disk_len());
        let read = match (disk_len, &self.file) {
            (Some(disk_len), _) if self.pos >= disk_len => {
                let (spill, _) = self.spill.as_ref().expect("a spilled tail has its spill");
                spill
                    .read(self.pos, len)
                    .map_err(|_| io::Error::other("reader fell behind a pass-through download"))
            }
            (_, Some(file)) => {
                if let Some(disk_len) = disk_len {
                    len = len.min(disk_len - self.pos);
                }
                let (file, pos) = (file.clone(), self.pos);
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0; len as usize];
                    file.read_exact_at(&mut buf, pos).map(|()| Bytes::from(buf))
                })
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))
            }
            (_, None) => Err(io::Error::other("blob bytes are neither on disk nor in memory")),
        };
        match &read {
            Ok(chunk) if chunk.is_empty() => return Some(Err(io::Error::other("blob read made no progress"))),
            Ok(chunk) => {
                self.pos += chunk.len() as u64;
                if let Some((spill, id)) = &self.spill {
                    spill.advance(*id, self.pos);
                }
            }
            Err(_) => {}
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
        let mut tail = Tail::following(Some(file), Arc::default(), 0, Some(6), rx);
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
        let mut tail = Tail::following(Some(file), Arc::default(), 0, None, rx);
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
