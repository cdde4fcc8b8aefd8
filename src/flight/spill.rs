//! Pass-through for a flight whose cache write failed (a full disk, an I/O error). The bytes
//! already in the temp file are still read from it; the rest is handed to readers from a
//! bounded window in memory. The writer waits for the slowest reader before it drops a chunk
//! from the window, so memory stays bounded and every reader still gets the whole body. A
//! reader slower than [`SLOW_READER_LIMIT`] is left behind and its response aborted.

use crate::sync::MutexExt;
use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Bytes a spilled flight keeps in memory for readers that are behind.
const WINDOW: u64 = 16 * 1024 * 1024;
/// How long the writer waits for a reader that holds the window full.
const SLOW_READER_LIMIT: Duration = Duration::from_secs(60);

#[derive(Default)]
pub(super) struct Spill {
    state: Mutex<State>,
    room: Condvar,
}

#[derive(Default)]
struct State {
    /// Bytes in the temp file when the write failed; `None` while the cache write works.
    disk_len: Option<u64>,
    /// Offset of the first byte in `chunks`.
    start: u64,
    window: u64,
    chunks: VecDeque<Bytes>,
    /// Each reader's position, by id.
    readers: HashMap<u64, u64>,
    next_id: u64,
}

impl State {
    /// Where a reader at `pos` needs the window from: the file's end while it reads the file
    /// (if the window still starts there), its own position past it; `None` once it has been
    /// left behind and needs nothing more from the window.
    fn needs(&self, pos: u64) -> Option<u64> {
        let disk_len = self.disk_len.unwrap_or(0);
        match pos {
            pos if pos < disk_len => (self.start <= disk_len).then_some(disk_len),
            pos if pos < self.start => None,
            pos => Some(pos),
        }
    }

    /// Whether a reader joining now from the start could miss bytes.
    fn lost_bytes(&self) -> bool {
        self.disk_len.is_some_and(|disk| self.start > disk)
    }

    /// Drops window chunks every reader is past, and more while the window is over `limit`.
    /// A reader still in the file's part needs the whole window; one already left behind
    /// needs nothing more from it.
    fn trim(&mut self, limit: u64) {
        let slowest = self
            .readers
            .values()
            .filter_map(|&pos| self.needs(pos))
            .min()
            .unwrap_or(u64::MAX);
        while let Some(front) = self.chunks.front() {
            let len = front.len() as u64;
            if self.start + len > slowest && self.window <= limit {
                break;
            }
            self.start += len;
            self.window -= len;
            self.chunks.pop_front();
        }
    }
}

/// A reader's bytes are gone from the window: it was too slow.
#[derive(Debug)]
pub(super) struct LeftBehind;

impl Spill {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.locked()
    }

    #[cfg(test)]
    pub fn register(&self, pos: u64) -> u64 {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.readers.insert(id, pos);
        id
    }

    pub fn advance(&self, id: u64, pos: u64) {
        let spilled = {
            let mut state = self.lock();
            state.readers.insert(id, pos);
            state.disk_len.is_some()
        };
        if spilled {
            self.room.notify_all();
        }
    }

    pub fn unregister(&self, id: u64) {
        self.lock().readers.remove(&id);
        self.room.notify_all();
    }

    /// Where the temp file's valid bytes end, once the cache write has failed.
    pub fn disk_len(&self) -> Option<u64> {
        self.lock().disk_len
    }

    /// A reader from the first byte, unless bytes it would need are gone already; checked and
    /// registered under one lock, so no trim comes between.
    pub fn register_from_start(&self) -> Option<u64> {
        let mut state = self.lock();
        if state.lost_bytes() {
            return None;
        }
        let id = state.next_id;
        state.next_id += 1;
        state.readers.insert(id, 0);
        Some(id)
    }

    /// Whether the flight passes its bytes through and no reader needs them: its readers have
    /// gone, or been left behind (one that stalled still holds its place until its connection
    /// ends). Nobody would get what it reads on, and nothing of it would be stored.
    pub fn unread(&self) -> bool {
        let state = self.lock();
        state.disk_len.is_some() && state.readers.values().all(|&pos| state.needs(pos).is_none())
    }

    /// Whether a reader joining now from the start could miss bytes.
    #[cfg(test)]
    pub fn lost_bytes(&self) -> bool {
        self.lock().lost_bytes()
    }

    /// The cache write failed with `disk_len` bytes in the file: the rest comes through memory.
    pub fn begin(&self, disk_len: u64) {
        let mut state = self.lock();
        state.disk_len = Some(disk_len);
        state.start = disk_len;
    }

    /// Appends a chunk. Readers learn of it from the flight's progress, published after this
    /// and before [`Spill::wait_for_room`].
    pub fn append(&self, chunk: Bytes) {
        let mut state = self.lock();
        state.window += chunk.len() as u64;
        state.chunks.push_back(chunk);
        state.trim(u64::MAX);
    }

    /// Waits until the readers have made the window small enough again.
    pub fn wait_for_room(&self) {
        let mut state = self.lock();
        let waiting = Instant::now();
        while state.window > WINDOW {
            if waiting.elapsed() > SLOW_READER_LIMIT {
                tracing::warn!("a reader stalled a pass-through download; it is left behind");
                state.trim(WINDOW);
                break;
            }
            state = crate::sync::wait_timeout(&self.room, state, Duration::from_secs(1));
            state.trim(u64::MAX);
        }
    }

    /// Up to `max` bytes at `pos`, which must be past the file's part.
    pub fn read(&self, pos: u64, max: u64) -> Result<Bytes, LeftBehind> {
        let state = self.lock();
        if pos < state.start {
            return Err(LeftBehind);
        }
        let mut offset = state.start;
        for chunk in &state.chunks {
            let len = chunk.len() as u64;
            if pos < offset + len {
                let from = (pos - offset) as usize;
                let to = (pos - offset + max).min(len) as usize;
                return Ok(chunk.slice(from..to));
            }
            offset += len;
        }
        Ok(Bytes::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(spill: &Spill, chunk: Bytes) {
        spill.append(chunk);
        spill.wait_for_room();
    }

    /// A reader in the file's part holds the window while the window still starts at the
    /// file's end; a reader is needed (the flight is not unread) until every one has gone or
    /// been left behind.
    #[test]
    fn a_reader_on_disk_holds_the_window_until_it_cannot_be_served() {
        let spill = Spill::default();
        let on_disk = spill.register(3);
        spill.begin(10);
        push(&spill, Bytes::from_static(b"abcde"));
        assert_eq!(&spill.read(10, 5).unwrap()[..], b"abcde");
        assert!(!spill.unread());
        spill.unregister(on_disk);
        assert!(spill.unread(), "no reader left");
        push(&spill, Bytes::from_static(b"fgh"));
        let late = spill.register_from_start();
        assert_eq!(late, None, "bytes it would need are gone");
    }

    /// A reader that stalled past the limit is left behind (what `wait_for_room` does after
    /// [`SLOW_READER_LIMIT`]); it keeps its place until its connection ends, but the flight
    /// no longer reads on for it (one stalled client kept an endless pass-through going at
    /// line rate for as long as it held its connection).
    #[test]
    fn a_flight_whose_readers_were_all_left_behind_is_unread() {
        let spill = Spill::default();
        let stalled = spill.register(0);
        spill.begin(0);
        spill.append(Bytes::from_static(b"abc"));
        assert!(!spill.unread());
        spill.lock().trim(0);
        assert!(spill.read(0, 1).is_err(), "left behind");
        assert!(spill.unread(), "a reader left behind kept the download going");
        spill.unregister(stalled);
    }

    #[test]
    fn the_window_follows_the_slowest_reader() {
        let spill = Spill::default();
        let fast = spill.register(0);
        let slow = spill.register(0);
        spill.begin(10);
        push(&spill, Bytes::from_static(b"abcde"));
        push(&spill, Bytes::from_static(b"fghij"));
        assert_eq!(&spill.read(12, 100).unwrap()[..], b"cde");
        assert_eq!(&spill.read(14, 3).unwrap()[..], b"e", "a read stops at its chunk's end");
        spill.advance(fast, 20);
        spill.advance(slow, 16);
        push(&spill, Bytes::from_static(b"k"));
        assert!(spill.read(12, 1).is_err(), "a chunk every reader passed is kept");
        assert_eq!(&spill.read(16, 10).unwrap()[..], b"ghij");
        assert!(spill.lost_bytes());

        // A reader still in the file's part no longer holds the window once bytes past the
        // file are gone: it can never be served (a stalled one once throttled the download to
        // a frame a minute). Nor does one left behind.
        let on_disk = spill.register(3);
        spill.advance(fast, 21);
        spill.advance(slow, 21);
        push(&spill, Bytes::from_static(b"m"));
        assert!(
            spill.read(15, 1).is_err(),
            "a reader that cannot be served held the window"
        );
        spill.unregister(on_disk);
        spill.advance(slow, 12);
        push(&spill, Bytes::from_static(b"n"));
        assert!(
            spill.read(20, 1).is_err(),
            "a reader left behind still holds the window"
        );
        assert_eq!(&spill.read(21, 1).unwrap()[..], b"m");
        spill.unregister(slow);
        spill.unregister(fast);
        push(&spill, Bytes::from_static(b"l"));
        assert!(spill.read(23, 1).is_err(), "no readers: nothing is kept");
    }
}
