//! Byte copying between a Visitor/backend TCP connection and a tunnel
//! stream, full duplex with half-close: a TCP FIN becomes a QUIC STREAM_FIN
//! in the same direction and the other way round. A reset or a lost
//! connection on either side aborts both (TCP RST, QUIC RESET_STREAM).
//!
//! Memory per stream is bounded: the TCP→QUIC direction allocates a read
//! buffer only once the socket is readable (idle streams hold none), and
//! the QUIC→TCP direction forwards quinn's received chunks without copying
//! them into a buffer of ours.

use std::io;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::tunnel::transport::stream_code;

/// Largest single read from TCP.
const CHUNK: usize = 64 * 1024;
/// Reads smaller than this are copied into a right-sized buffer so that
/// small interactive writes do not pin a full CHUNK until acknowledged.
const SHRINK_BELOW: usize = CHUNK / 4;

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// TCP peer → tunnel stream.
    pub to_tunnel: u64,
    /// Tunnel stream → TCP peer.
    pub from_tunnel: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("tcp: {0}")]
    Tcp(#[from] io::Error),
    #[error("tunnel stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("tunnel stream read: {0}")]
    Read(#[from] quinn::ReadError),
}

impl RelayError {
    /// Short stable token for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            RelayError::Tcp(_) => "tcp_error",
            RelayError::Write(quinn::WriteError::Stopped(_)) => "stream_stopped",
            RelayError::Read(quinn::ReadError::Reset(_)) => "stream_reset",
            RelayError::Write(quinn::WriteError::ConnectionLost(_))
            | RelayError::Read(quinn::ReadError::ConnectionLost(_)) => "tunnel_lost",
            _ => "stream_error",
        }
    }
}

/// Relay between `tcp` and a tunnel stream until both directions have
/// ended. On any error both sides are aborted before returning.
pub async fn relay_tcp_stream(
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<Transferred, RelayError> {
    let result = {
        let (mut rd, mut wr) = tcp.split();
        tokio::try_join!(tcp_to_stream(&mut rd, send), stream_to_tcp(recv, &mut wr))
    };
    match result {
        Ok((to_tunnel, from_tunnel)) => Ok(Transferred {
            to_tunnel,
            from_tunnel,
        }),
        Err(e) => {
            abort_tcp(tcp);
            abort_stream(send, recv);
            Err(e)
        }
    }
}

async fn tcp_to_stream(
    rd: &mut tokio::net::tcp::ReadHalf<'_>,
    send: &mut SendStream,
) -> Result<u64, RelayError> {
    let mut total = 0u64;
    loop {
        rd.as_ref().readable().await?;
        let mut buf = BytesMut::with_capacity(CHUNK);
        let n = match rd.as_ref().try_read_buf(&mut buf) {
            Ok(0) => {
                // Visitor (or backend) half-closed: pass the FIN on.
                let _ = send.finish();
                return Ok(total);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        let chunk = if n < SHRINK_BELOW {
            Bytes::copy_from_slice(&buf[..n])
        } else {
            buf.freeze()
        };
        send.write_chunk(chunk).await?;
        total += n as u64;
    }
}

async fn stream_to_tcp(
    recv: &mut RecvStream,
    wr: &mut tokio::net::tcp::WriteHalf<'_>,
) -> Result<u64, RelayError> {
    let mut total = 0u64;
    let mut chunks: [Bytes; MAX_WRITE_CHUNKS] = Default::default();
    while let Some(n) = recv.read_chunks(&mut chunks).await? {
        total += write_all_chunks(wr, &mut chunks[..n]).await?;
    }
    // STREAM_FIN from the tunnel: half-close the TCP side.
    wr.shutdown().await?;
    Ok(total)
}

/// Received chunks handed to one vectored TCP write. quinn yields one chunk
/// per STREAM frame (a packet's worth), so writing them one by one would
/// cost a syscall per packet; gathering them cuts that by up to this factor.
const MAX_WRITE_CHUNKS: usize = 32;

/// Write every byte of `chunks` with as few `writev` calls as the socket
/// allows, emptying the chunks as it goes. Returns the bytes written.
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut [Bytes],
) -> io::Result<u64> {
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut first = 0;
    while first < chunks.len() {
        if chunks[first].is_empty() {
            first += 1;
            continue;
        }
        let written = {
            let mut slices = [io::IoSlice::new(&[]); MAX_WRITE_CHUNKS];
            let pending = &chunks[first..];
            let count = pending.len().min(MAX_WRITE_CHUNKS);
            for (slice, chunk) in slices.iter_mut().zip(pending) {
                *slice = io::IoSlice::new(chunk);
            }
            w.write_vectored(&slices[..count]).await?
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut left = written;
        while left > 0 {
            let chunk = &mut chunks[first];
            let take = left.min(chunk.len());
            bytes::Buf::advance(chunk, take);
            left -= take;
            if chunk.is_empty() {
                first += 1;
            }
        }
    }
    Ok(total as u64)
}

/// Relay between two arbitrary byte streams (used where one side is a TLS
/// session, as in terminate mode). Returns bytes `a→b` as `to_tunnel` and
/// `b→a` as `from_tunnel`. Errors are returned without aborting: the caller
/// owns the concrete transports and aborts them.
pub async fn relay_io<A, B>(a: &mut A, b: &mut B) -> io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (ab, ba) = tokio::try_join!(copy_half(&mut ar, &mut bw), copy_half(&mut br, &mut aw))?;
    Ok(Transferred {
        to_tunnel: ab,
        from_tunnel: ba,
    })
}

/// Buffer size of one direction of the terminate relay.
const IO_CHUNK: usize = 16 * 1024;

async fn copy_half<R, W>(r: &mut R, w: &mut W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // The buffer is held only while data flows: a read that has to wait
    // gives it back, so an idle stream (a quiet WebSocket, a keep-alive
    // connection) costs no buffer in either direction.
    let mut buf: Option<Vec<u8>> = None;
    let mut total = 0u64;
    loop {
        let read = std::future::poll_fn(|cx| {
            let b = buf.get_or_insert_with(|| vec![0u8; IO_CHUNK]);
            let mut rb = ReadBuf::new(b);
            match std::pin::Pin::new(&mut *r).poll_read(cx, &mut rb) {
                std::task::Poll::Pending => {
                    buf = None;
                    std::task::Poll::Pending
                }
                std::task::Poll::Ready(result) => {
                    std::task::Poll::Ready(result.map(|()| rb.filled().len()))
                }
            }
        })
        .await;
        let n = match read {
            Ok(n) => n,
            // A TLS peer that closed TCP without close_notify (as browsers
            // do) has still said everything: treat it as the end.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            w.shutdown().await?;
            return Ok(total);
        }
        let Some(data) = buf.as_deref() else {
            // Ready with data implies the buffer is still held.
            return Err(io::Error::other("relay buffer missing after a read"));
        };
        w.write_all(&data[..n]).await?;
        total += n as u64;
    }
}

/// Make the next close of `tcp` a reset rather than an orderly FIN.
pub fn abort_tcp(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

/// Abort both halves of a tunnel stream (dropping a quinn SendStream would
/// otherwise finish it cleanly, hiding the failure from the peer).
pub fn abort_stream(send: &mut SendStream, recv: &mut RecvStream) {
    let _ = send.reset(stream_code::ABORTED);
    let _ = recv.stop(stream_code::ABORTED);
}

/// A byte stream whose first bytes were already read (a ClientHello read
/// for routing or Service selection): `prefix` is replayed before the rest
/// of `inner`; writes go straight to `inner`.
#[derive(Debug)]
pub struct Prefixed<IO> {
    prefix: Bytes,
    inner: IO,
}

impl<IO> Prefixed<IO> {
    pub fn new(prefix: Bytes, inner: IO) -> Self {
        Self { prefix, inner }
    }

    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.inner
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Accepts at most `limit` bytes per call, across slices, like a socket
    /// whose send buffer is nearly full.
    struct Trickle {
        limit: usize,
        got: Vec<u8>,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.calls += 1;
            let mut room = self.limit;
            let mut n = 0;
            for b in bufs {
                let take = room.min(b.len());
                self.got.extend_from_slice(&b[..take]);
                room -= take;
                n += take;
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn chunks(parts: &[&'static str]) -> Vec<Bytes> {
        parts
            .iter()
            .map(|p| Bytes::from_static(p.as_bytes()))
            .collect()
    }

    #[tokio::test]
    async fn gathered_chunks_arrive_in_order_across_partial_writes() {
        let mut w = Trickle {
            limit: 3,
            got: Vec::new(),
            calls: 0,
        };
        let mut c = chunks(&["ab", "", "cdefg", "h", "", "ijklmnop"]);
        let n = write_all_chunks(&mut w, &mut c).await.unwrap();
        assert_eq!(n, 16);
        assert_eq!(w.got, b"abcdefghijklmnop");
        assert_eq!(w.calls, 6, "3 bytes per call for 16 bytes");
        assert!(c.iter().all(Bytes::is_empty));
    }

    #[tokio::test]
    async fn many_chunks_take_one_write_when_the_socket_has_room() {
        let mut w = Trickle {
            limit: usize::MAX,
            got: Vec::new(),
            calls: 0,
        };
        let mut c = chunks(&["x"; MAX_WRITE_CHUNKS]);
        write_all_chunks(&mut w, &mut c).await.unwrap();
        assert_eq!(w.got.len(), MAX_WRITE_CHUNKS);
        assert_eq!(w.calls, 1);
    }

    #[tokio::test]
    async fn relay_io_carries_bursts_after_idle_gaps_and_passes_half_close_on() {
        use tokio::io::AsyncReadExt;
        // visitor <-> (a | relay | b) <-> backend
        let (mut visitor, mut a) = tokio::io::duplex(64 * 1024);
        let (mut b, mut backend) = tokio::io::duplex(64 * 1024);
        let relay = tokio::spawn(async move { relay_io(&mut a, &mut b).await });
        let mut sent = Vec::new();
        for round in 0..5u8 {
            // Idle gap: the relay's reads wait (and give their buffers back).
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let burst = vec![round; IO_CHUNK + 100 * usize::from(round)];
            visitor.write_all(&burst).await.unwrap();
            sent.extend_from_slice(&burst);
        }
        visitor.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, sent, "every byte, in order, then EOF");
        backend.write_all(b"reply").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut reply = Vec::new();
        visitor.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply");
        let moved = relay.await.unwrap().unwrap();
        assert_eq!(moved.to_tunnel, sent.len() as u64);
        assert_eq!(moved.from_tunnel, 5);
    }

    #[tokio::test]
    async fn a_writer_that_takes_nothing_is_an_error_not_a_hang() {
        let mut w = Trickle {
            limit: 0,
            got: Vec::new(),
            calls: 0,
        };
        let mut c = chunks(&["abc"]);
        let err = write_all_chunks(&mut w, &mut c).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }
}
