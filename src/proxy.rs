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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
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
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        wr.write_all(&chunk.bytes).await?;
        total += chunk.bytes.len() as u64;
    }
    // STREAM_FIN from the tunnel: half-close the TCP side.
    wr.shutdown().await?;
    Ok(total)
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

async fn copy_half<R, W>(r: &mut R, w: &mut W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf).await {
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
        w.write_all(&buf[..n]).await?;
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
