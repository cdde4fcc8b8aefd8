//! Following a blob by offset, in large chunks: a committed blob, or a temp file that a
//! flight is still writing (past a failed cache write, from the flight's spill window). A
//! chunk on disk is handed out as a [`FileSpan`], which the response either sends from the
//! file with `sendfile` or reads into memory. While the flight is unverified, a reader never
//! hands out the last byte of its range, so no response can complete with bytes that fail
//! their digest.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSliceMut};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rustix::io::{Errno, ReadWriteFlags};
use tokio::sync::watch;

use super::spill::Spill;
use super::{FlightState, Progress};
use crate::store::{Blob, InUse};

/// A chunk of a blob: bytes already in memory, or a span of a file on disk.
pub enum Chunk {
    Memory(Bytes),
    File(FileSpan),
}

/// `len` bytes of `file` from `offset`. The file is held open, so the span stays readable
/// even if the blob is evicted or its temp file renamed meanwhile.
pub struct FileSpan {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: u64,
}

impl FileSpan {
    /// Reads the span into memory from `buffers`. What the page cache holds is read on this
    /// thread (`preadv2` with `RWF_NOWAIT` returns rather than wait for the disk), so a warm
    /// blob's bytes are encrypted by the core that just copied them; the rest is read off the
    /// async threads.
    pub async fn read(self, buffers: &mut ReadBuffers) -> io::Result<Bytes> {
        let len = usize::try_from(self.len).map_err(io::Error::other)?;
        let mut buf = buffers.take(len);
        let mut filled = 0;
        while buffers.nowait && filled < len {
            let at = self.offset + filled as u64;
            match rustix::io::preadv2(
                &*self.file,
                &mut [IoSliceMut::new(&mut buf[filled..])],
                at,
                ReadWriteFlags::NOWAIT,
            ) {
                Ok(0) => return Err(ended()),
                Ok(read) => filled += read,
                // Not in the page cache: the blocking read below waits for the disk.
                Err(Errno::AGAIN) => break,
                // No RWF_NOWAIT here (an old kernel or a filesystem without it).
                Err(Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS) => buffers.nowait = false,
                // Anything else is for the blocking read to retry and report.
                Err(_) => break,
            }
        }
        if filled < len {
            buf = tokio::task::spawn_blocking(move || {
                while filled < len {
                    let at = self.offset + filled as u64;
                    match rustix::io::pread(&*self.file, &mut buf[filled..], at)? {
                        0 => return Err(ended()),
                        read => filled += read,
                    }
                }
                Ok(buf)
            })
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)))?;
        }
        let bytes = buf.freeze();
        buffers.keep(bytes.clone());
        Ok(bytes)
    }
}

fn ended() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "blob file ended before its span")
}

/// The memory one response reads spans into. It keeps a handle on the chunks it handed out
/// lately, and takes one back once the connection has sent it and let go: a response reuses
/// a couple of buffers rather than faulting in fresh pages for every chunk.
pub struct ReadBuffers {
    recent: VecDeque<Bytes>,
    /// Whether `RWF_NOWAIT` reads work here; off after the first refusal.
    nowait: bool,
}

impl Default for ReadBuffers {
    fn default() -> ReadBuffers {
        ReadBuffers {
            recent: VecDeque::with_capacity(KEPT_BUFFERS + 1),
            nowait: true,
        }
    }
}

/// Chunks a response keeps to reuse: one the connection is still sending, one it has sent.
const KEPT_BUFFERS: usize = 2;

impl ReadBuffers {
    /// A buffer of `len` initialized bytes: a chunk nobody else holds any more, or a new one.
    fn take(&mut self, len: usize) -> BytesMut {
        for _ in 0..self.recent.len() {
            let Some(chunk) = self.recent.pop_front() else { break };
            match chunk.try_into_mut() {
                Ok(mut buf) => {
                    buf.resize(len, 0);
                    return buf;
                }
                Err(chunk) => self.recent.push_back(chunk),
            }
        }
        BytesMut::zeroed(len)
    }

    fn keep(&mut self, chunk: Bytes) {
        self.recent.push_back(chunk);
        if self.recent.len() > KEPT_BUFFERS {
            self.recent.pop_front();
        }
    }
}

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

    /// A reader in the `seat` (a spill and a reader id in it, already at `start`).
    pub(super) fn following(
        file: Option<Arc<File>>,
        seat: (Arc<Spill>, u64),
        start: u64,
        end: Option<u64>,
        progress: watch::Receiver<Progress>,
    ) -> Tail {
        let (spill, id) = seat;
        Tail {
            file,
            pos: start,
            end,
            progress: Some(progress),
            _in_use: None,
            spill: Some((spill, id)),
        }
    }

    /// The next chunk of at most `max` bytes, `None` at the end, or an error that must abort
    /// the response.
    pub async fn next_chunk(&mut self, max: u64) -> Option<io::Result<Chunk>> {
        let readable = match self.readable().await {
            Ok(readable) => readable,
            Err(e) => return Some(Err(e)),
        };
        if self.pos >= readable {
            return None;
        }
        let mut len = (readable - self.pos).min(max.max(1));
        let disk_len = self.spill.as_ref().and_then(|(spill, _)| spill.disk_len());
        let chunk = match (disk_len, &self.file) {
            (Some(disk_len), _) if self.pos >= disk_len => {
                let (spill, _) = self.spill.as_ref().expect("a spilled tail has its spill");
                match spill.read(self.pos, len) {
                    Ok(bytes) if bytes.is_empty() => return Some(Err(io::Error::other("blob read made no progress"))),
                    Ok(bytes) => {
                        len = bytes.len() as u64;
                        Chunk::Memory(bytes)
                    }
                    Err(_) => return Some(Err(io::Error::other("reader fell behind a pass-through download"))),
                }
            }
            (_, Some(file)) => {
                if let Some(disk_len) = disk_len {
                    len = len.min(disk_len - self.pos);
                }
                Chunk::File(FileSpan {
                    file: file.clone(),
                    offset: self.pos,
                    len,
                })
            }
            (_, None) => return Some(Err(io::Error::other("blob bytes are neither on disk nor in memory"))),
        };
        self.pos += len;
        if let Some((spill, id)) = &self.spill {
            spill.advance(*id, self.pos);
        }
        Some(Ok(chunk))
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

    const CHUNK: u64 = 1024 * 1024;

    /// The next chunk's bytes, read into memory.
    async fn next_bytes(tail: &mut Tail) -> Option<io::Result<Bytes>> {
        Some(match tail.next_chunk(CHUNK).await? {
            Ok(Chunk::Memory(bytes)) => Ok(bytes),
            Ok(Chunk::File(span)) => span.read(&mut ReadBuffers::default()).await,
            Err(e) => Err(e),
        })
    }

    #[tokio::test]
    async fn holds_back_the_last_byte_until_verified() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"abcdef").unwrap();
        let file = Arc::new(f);
        let (tx, rx) = watch::channel(Progress {
            size: Some(6),
            written: 6,
            state: FlightState::Streaming,
            peer: None,
            visibility: None,
        });
        let spill = Arc::new(Spill::default());
        let id = spill.register(0);
        let mut tail = Tail::following(Some(file), (spill, id), 0, Some(6), rx);
        assert_eq!(&next_bytes(&mut tail).await.unwrap().unwrap()[..], b"abcde");
        let pending = tokio::spawn(async move { (next_bytes(&mut tail).await, tail) });
        tokio::task::yield_now().await;
        assert!(!pending.is_finished(), "final byte went out before verification");
        tx.send_modify(|p| p.state = FlightState::Done);
        let (chunk, mut tail) = pending.await.unwrap();
        assert_eq!(&chunk.unwrap().unwrap()[..], b"f");
        assert!(next_bytes(&mut tail).await.is_none());
    }

    #[tokio::test]
    async fn a_failed_flight_aborts_readers() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let (tx, rx) = watch::channel(Progress {
            size: None,
            written: 0,
            state: FlightState::Streaming,
            peer: None,
            visibility: None,
        });
        let spill = Arc::new(Spill::default());
        let id = spill.register(0);
        let mut tail = Tail::following(Some(file), (spill, id), 0, None, rx);
        let pending = tokio::spawn(async move { next_bytes(&mut tail).await });
        tx.send_modify(|p| p.state = FlightState::Failed(Arc::new(crate::error::InternalError::FlightLost.into())));
        assert!(pending.await.unwrap().unwrap().is_err());
    }

    #[tokio::test]
    async fn stored_reads_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..(CHUNK as usize) * 2 + 5).map(|i| (i % 251) as u8).collect();
        let digest = crate::oci::Digest::of(&data);
        let mut temp = store.temp_blob().unwrap();
        temp.write(&data).unwrap();
        store.commit(temp, &digest, None, None).unwrap();
        let mut tail = Tail::stored(store.open_blob(&digest).unwrap().unwrap(), 3, data.len() as u64);
        let mut got = Vec::new();
        while let Some(chunk) = next_bytes(&mut tail).await {
            let chunk = chunk.unwrap();
            assert!(chunk.len() as u64 <= CHUNK);
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, data[3..]);
    }

    fn span(file: &Arc<File>, offset: u64, len: u64) -> FileSpan {
        FileSpan {
            file: file.clone(),
            offset,
            len,
        }
    }

    #[tokio::test]
    async fn read_buffers_are_reused_only_once_let_go() {
        let data: Vec<u8> = (0..=255u8).cycle().take(64 * 1024).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let file = Arc::new(f);
        let mut buffers = ReadBuffers::default();

        let first = span(&file, 0, 32 * 1024).read(&mut buffers).await.unwrap();
        assert_eq!(first, data[..32 * 1024]);
        // Held by the connection: the next read must not write into it.
        let second = span(&file, 1000, 16 * 1024).read(&mut buffers).await.unwrap();
        assert_eq!(second, data[1000..1000 + 16 * 1024]);
        assert_ne!(first.as_ptr(), second.as_ptr());
        assert_eq!(first, data[..32 * 1024], "a chunk still held was overwritten");

        // Once the first is let go, its memory is read into again, and no stale byte
        // past the new length shows.
        let reused = first.as_ptr();
        drop(first);
        let third = span(&file, 40 * 1024, 8 * 1024).read(&mut buffers).await.unwrap();
        assert_eq!(third.as_ptr(), reused);
        assert_eq!(third, data[40 * 1024..48 * 1024]);
        assert_eq!(second, data[1000..1000 + 16 * 1024]);
    }

    #[tokio::test]
    async fn a_span_past_the_end_of_its_file_is_an_error() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"short").unwrap();
        let file = Arc::new(f);
        let err = span(&file, 2, 10).read(&mut ReadBuffers::default()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
