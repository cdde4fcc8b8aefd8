//! Zero-copy blob bodies on plain HTTP/1 connections. hyper writes the status line and
//! headers; the body's file spans go from the page cache to the socket with `sendfile(2)`,
//! never through user space.
//!
//! hyper has no hook for this, so the body stands in for each span with a *placeholder*: a
//! slice of one shared, never-written buffer, of the span's length. hyper frames and queues
//! it like any data (it counts against `Content-Length`), and the connection's [`SendfileStream`]
//! recognises the placeholder by its address when hyper writes it out, and sends the span
//! from its file instead. Spans are queued in the order the body yields them, which is the
//! order hyper writes them, and each placeholder must match the span at the front of the
//! queue exactly, or the connection fails: a placeholder's zeros never reach a client.
//!
//! This needs hyper's vectored write queue (`writev`), which keeps body buffers as they are;
//! its flattening strategy would copy the placeholder into its own buffer.

use crate::sync::MutexExt;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::flight::FileSpan;

/// The largest span one placeholder stands for.
pub const MAX_SPAN: u64 = 4 * 1024 * 1024;

/// The placeholder bytes. `calloc`ed and never written or read, so they cost no memory.
static PLACEHOLDER: LazyLock<Bytes> = LazyLock::new(|| Bytes::from(vec![0u8; MAX_SPAN as usize]));

fn is_placeholder(buf: &[u8]) -> bool {
    !buf.is_empty() && PLACEHOLDER.as_ptr_range().contains(&buf.as_ptr())
}

/// The file spans a connection's responses have yielded and hyper has yet to write.
#[derive(Clone, Default)]
pub struct Spans(Arc<Mutex<VecDeque<FileSpan>>>);

impl Spans {
    /// Queues `span` and returns the frame data that stands for it.
    pub fn defer(&self, span: FileSpan) -> Bytes {
        assert!(span.len > 0 && span.len <= MAX_SPAN, "span of {} bytes", span.len);
        let placeholder = PLACEHOLDER.slice(..span.len as usize);
        self.lock().push_back(span);
        placeholder
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<FileSpan>> {
        self.0.locked()
    }
}

/// A TCP connection that sends placeholders' spans with `sendfile`; everything else passes
/// through.
pub struct SendfileStream {
    stream: TcpStream,
    spans: Spans,
}

impl SendfileStream {
    pub fn new(stream: TcpStream) -> (SendfileStream, Spans) {
        let spans = Spans::default();
        let stream = SendfileStream {
            stream,
            spans: spans.clone(),
        };
        (stream, spans)
    }

    /// Sends up to `placeholder` bytes of the front span; `placeholder` is the length of the
    /// placeholder hyper is writing, which must be what is left of that span.
    fn poll_sendfile(&self, cx: &mut Context<'_>, placeholder: usize) -> Poll<io::Result<usize>> {
        let mut spans = self.spans.lock();
        let Some(span) = spans.front_mut() else {
            return Poll::Ready(Err(io::Error::other(
                "a placeholder was written with no file span queued",
            )));
        };
        if span.len != placeholder as u64 {
            return Poll::Ready(Err(io::Error::other(format!(
                "a placeholder of {placeholder} bytes was written for a file span of {}",
                span.len
            ))));
        }
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            let mut offset = span.offset;
            let sent = self.stream.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(&self.stream, &*span.file, Some(&mut offset), span.len as usize)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob file ended before its span",
                    )));
                }
                Ok(n) => {
                    span.offset += n as u64;
                    span.len -= n as u64;
                    if span.len == 0 {
                        spans.pop_front();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for SendfileStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendfileStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if is_placeholder(buf) {
            return this.poll_sendfile(cx, buf.len());
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    /// Writes the buffers before the first placeholder with one `writev`, or, when a
    /// placeholder comes first, sends its span.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let bufs = match bufs.iter().position(|b| !b.is_empty()) {
            Some(first) => &bufs[first..],
            None => return Poll::Ready(Ok(0)),
        };
        if is_placeholder(&bufs[0]) {
            return this.poll_sendfile(cx, bufs[0].len());
        }
        let end = bufs.iter().position(|b| is_placeholder(b)).unwrap_or(bufs.len());
        Pin::new(&mut this.stream).poll_write_vectored(cx, &bufs[..end])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    async fn connected() -> (SendfileStream, Spans, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (server, spans) = SendfileStream::new(server);
        (server, spans, client)
    }

    fn file_of(bytes: &[u8]) -> Arc<std::fs::File> {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        Arc::new(file)
    }

    /// Writes `bufs` the way hyper does: vectored, advancing by what each write took.
    async fn write_vectored_all(stream: &mut SendfileStream, mut bufs: Vec<Bytes>) -> io::Result<()> {
        while bufs.iter().any(|b| !b.is_empty()) {
            let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
            let mut n = stream.write_vectored(&slices).await?;
            for buf in &mut bufs {
                let take = n.min(buf.len());
                let _ = buf.split_to(take);
                n -= take;
            }
        }
        stream.flush().await
    }

    #[tokio::test]
    async fn placeholders_go_out_as_their_files_bytes() {
        let (mut server, spans, mut client) = connected().await;
        let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let file = file_of(&content);
        let first = spans.defer(FileSpan {
            file: file.clone(),
            offset: 10,
            len: 2_000_000,
        });
        let second = spans.defer(FileSpan {
            file,
            offset: 2_000_010,
            len: 5,
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.map(|_| got)
        });
        let bufs = vec![
            Bytes::from_static(b"head\r\n\r\n"),
            first,
            Bytes::from_static(b"|"),
            second,
        ];
        write_vectored_all(&mut server, bufs).await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        let got = reader.await.unwrap().unwrap();
        let mut want = b"head\r\n\r\n".to_vec();
        want.extend_from_slice(&content[10..2_000_010]);
        want.push(b'|');
        want.extend_from_slice(&content[2_000_010..2_000_015]);
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes on the wire differ from head + file spans");
        assert!(spans.lock().is_empty());
    }

    #[tokio::test]
    async fn a_placeholder_without_its_span_fails_instead_of_sending_zeros() {
        let (mut server, spans, _client) = connected().await;
        let stray = PLACEHOLDER.slice(..100);
        let err = server.write(&stray).await.unwrap_err();
        assert!(err.to_string().contains("no file span"), "{err}");

        // A placeholder whose length is out of step with the queued span fails too.
        let _ = spans.defer(FileSpan {
            file: file_of(&[1; 64]),
            offset: 0,
            len: 64,
        });
        let err = write_vectored_all(&mut server, vec![PLACEHOLDER.slice(..32)])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("for a file span of 64"), "{err}");
    }

    #[tokio::test]
    async fn a_file_shorter_than_its_span_fails() {
        let (mut server, spans, _client) = connected().await;
        let placeholder = spans.defer(FileSpan {
            file: file_of(&[1; 10]),
            offset: 0,
            len: 20,
        });
        let err = write_vectored_all(&mut server, vec![placeholder]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn ordinary_bytes_are_not_placeholders() {
        assert!(!is_placeholder(&[0u8; 16]));
        assert!(!is_placeholder(&PLACEHOLDER[..0]));
        assert!(is_placeholder(&PLACEHOLDER[5..9]));
    }
}
