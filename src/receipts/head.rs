//! A connection's first request head, read within `receipts.read_timeout` before the HTTP
//! server gets the connection: a caller that sends part of a head and stalls (slowloris) gets
//! 408 Request Timeout, and one whose head outgrows [`MAX_HEAD`] gets 431, each with
//! `Connection: close`; a connection that sends nothing is closed without a word. The head
//! read is handed on with the connection ([`Prefixed`]); the HTTP server's own header timeout
//! bounds the next requests on a kept-alive connection.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The longest request head taken (request line and headers).
pub(super) const MAX_HEAD: usize = 64 * 1024;

const TIMED_OUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
const TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
content-length: 0\r\n\r\n";

/// When a refusal was last logged (seconds since the Unix epoch): one line a second at most.
static LAST_LOGGED: AtomicU64 = AtomicU64::new(0);

/// Reads `stream` until a whole request head is in, within `timeout`: the connection with
/// what was read put back, or `None` once it was answered (408, 431) or went away.
pub(super) async fn read_head<S>(
    mut stream: S,
    timeout: Duration,
    peer: std::net::SocketAddr,
) -> Option<Prefixed<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut head = Vec::with_capacity(1024);
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Some(Prefixed {
                prefix: head,
                read: 0,
                inner: stream,
            });
        }
        if head.len() >= MAX_HEAD {
            refuse(
                &mut stream,
                TOO_LARGE,
                peer,
                "request head too large: answered 431",
            )
            .await;
            return None;
        }
        let mut chunk = [0u8; 4096];
        let room = (MAX_HEAD - head.len()).min(chunk.len());
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..room])).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => head.extend_from_slice(&chunk[..n]),
            Err(_) if head.is_empty() => return None,
            Err(_) => {
                refuse(
                    &mut stream,
                    TIMED_OUT,
                    peer,
                    "request head not received in time: answered 408",
                )
                .await;
                return None;
            }
        }
    }
}

/// Answers `answer` (within a second: a caller that does not read gets nothing) and closes.
async fn refuse<S: AsyncWrite + Unpin>(
    stream: &mut S,
    answer: &[u8],
    peer: std::net::SocketAddr,
    what: &str,
) {
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if LAST_LOGGED.swap(second, Ordering::Relaxed) != second {
        tracing::warn!(%peer, "receipts: {what}");
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(answer).await?;
        stream.shutdown().await
    })
    .await;
}

/// A connection with the bytes already read from it put back in front.
pub(super) struct Prefixed<S> {
    prefix: Vec<u8>,
    read: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.read < this.prefix.len() {
            let rest = &this.prefix[this.read..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.read += n;
            if this.read == this.prefix.len() {
                this.prefix = Vec::new();
                this.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> std::net::SocketAddr {
        "127.0.0.1:9".parse().unwrap()
    }

    #[tokio::test]
    async fn a_whole_head_is_handed_on_with_what_follows() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client
            .write_all(b"POST /x HTTP/1.1\r\nHost: a\r\n\r\nbody")
            .await
            .unwrap();
        let mut prefixed = read_head(server, Duration::from_secs(1), peer())
            .await
            .unwrap();
        drop(client);
        let mut all = String::new();
        prefixed.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "POST /x HTTP/1.1\r\nHost: a\r\n\r\nbody");
    }

    #[tokio::test]
    async fn a_stalled_head_gets_408_and_an_endless_one_431() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(b"POST /x HTTP/1.1\r\nHo").await.unwrap();
        assert!(
            read_head(server, Duration::from_millis(50), peer())
                .await
                .is_none()
        );
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");

        let (mut client, server) = tokio::io::duplex(1 << 20);
        let endless = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        client.write_all(endless.as_bytes()).await.unwrap();
        assert!(
            read_head(server, Duration::from_secs(5), peer())
                .await
                .is_none()
        );
        let mut answer = vec![0u8; 64];
        let n = client.read(&mut answer).await.unwrap();
        assert!(answer[..n].starts_with(b"HTTP/1.1 431 "));

        // Nothing sent: closed without a word.
        let (mut client, server) = tokio::io::duplex(1024);
        assert!(
            read_head(server, Duration::from_millis(20), peer())
                .await
                .is_none()
        );
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert!(answer.is_empty());
    }
}
