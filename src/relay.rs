//! Byte copying between a Visitor/backend TCP connection and a tunnel
//! stream, full duplex with half-close: a TCP FIN becomes a QUIC STREAM_FIN
//! in the same direction and the other way round. A reset or a lost
//! connection on either side aborts both (TCP RST, QUIC RESET_STREAM).
//!
//! Memory per stream is bounded: the TCP→QUIC direction allocates a read
//! buffer only once the socket is readable (idle streams hold none), and
//! the QUIC→TCP direction forwards quinn's received chunks without copying
//! them into a buffer of ours.
//!
//! Every relayed stream has two deadlines ([`StreamTimeouts`]): a direction
//! that cannot write a single byte for `write` (a peer that stopped
//! reading) and a stream that moved no byte either way for `idle` are
//! aborted like a failure, which hands the stream's flow-control credit and
//! buffers back at once.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::StreamTimeouts;
use crate::tunnel::transport::stream_code;

/// Largest single read from TCP.
const CHUNK: usize = 64 * 1024;
/// Reads smaller than this are copied into a right-sized buffer so that
/// small interactive writes do not pin a full CHUNK until acknowledged.
const SHRINK_BELOW: usize = CHUNK / 4;

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transferred {
    /// TCP peer → tunnel stream.
    pub(crate) to_tunnel: u64,
    /// Tunnel stream → TCP peer.
    pub(crate) from_tunnel: u64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    #[error("tcp: {0}")]
    Tcp(#[from] io::Error),
    #[error("tunnel stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("tunnel stream read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("no byte could be written for {0:?} (stream-write-timeout)")]
    WriteTimeout(Duration),
    #[error("no byte moved either way for {0:?} (stream-idle-timeout)")]
    IdleTimeout(Duration),
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
            RelayError::WriteTimeout(_) => "write_timeout",
            RelayError::IdleTimeout(_) => "idle_timeout",
            _ => "stream_error",
        }
    }
}

/// The deadlines of one relayed stream and when it last moved a byte,
/// shared by both directions (which run in one task).
struct Deadlines {
    timeouts: StreamTimeouts,
    start: Instant,
    /// Milliseconds after `start` of the last byte moved either way.
    last_ms: AtomicU64,
}

impl Deadlines {
    fn new(timeouts: StreamTimeouts) -> Self {
        Self {
            timeouts,
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Bytes moved: the idle deadline starts again.
    fn moved(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// One write that must make progress within the write deadline; any
    /// progress also counts as activity.
    async fn write<T>(&self, write: impl Future<Output = T>) -> Result<T, RelayError> {
        match tokio::time::timeout(self.timeouts.write, write).await {
            Ok(result) => {
                self.moved();
                Ok(result)
            }
            Err(_) => Err(RelayError::WriteTimeout(self.timeouts.write)),
        }
    }

    /// Resolves once no byte moved either way for the idle deadline.
    async fn idle(&self) -> RelayError {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + self.timeouts.idle;
            if Instant::now() >= deadline {
                return RelayError::IdleTimeout(self.timeouts.idle);
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Keep-alive and user-timeout settings for Visitor and backend sockets,
/// so that a peer that vanished (host gone, cable pulled, NAT state
/// dropped) is noticed even when the stream is quiet: keep-alive probes
/// after [`KEEPALIVE_IDLE`] of silence, and `TCP_USER_TIMEOUT` of twice the
/// write deadline for data the peer never acknowledges (so the kernel gives
/// up on a vanished peer after about 75 s of silence, or 60 s of
/// unacknowledged data with the default deadlines). Twice, so that a peer
/// that is alive but not reading meets the relay's own write deadline
/// first, which resets the stream and says so in the log.
pub(crate) fn tune_tcp(tcp: &TcpStream, timeouts: StreamTimeouts) {
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let _ = sock.set_tcp_keepalive(&keepalive);
    let _ = sock.set_tcp_user_timeout(Some(timeouts.write.saturating_mul(2)));
}

/// First keep-alive probe after this much silence on the socket.
pub(crate) const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Between unanswered keep-alive probes.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// Unanswered probes before the kernel resets the connection (the user
/// timeout usually ends it sooner, after the first unanswered probe).
pub(crate) const KEEPALIVE_PROBES: u32 = 4;

/// Relay between `tcp` and a tunnel stream until both directions have
/// ended, under the `timeouts` deadlines. On any error, deadline included,
/// both sides are aborted before returning.
pub(crate) async fn relay_tcp_stream(
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    timeouts: StreamTimeouts,
) -> Result<Transferred, RelayError> {
    tune_tcp(tcp, timeouts);
    let deadlines = Deadlines::new(timeouts);
    let result = {
        let (mut rd, mut wr) = tcp.split();
        let both = async {
            tokio::try_join!(
                tcp_to_stream(&mut rd, send, &deadlines),
                stream_to_tcp(recv, &mut wr, &deadlines)
            )
        };
        tokio::select! {
            biased;
            result = both => result,
            idle = deadlines.idle() => Err(idle),
        }
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
    deadlines: &Deadlines,
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
        // Each call returns as soon as some bytes fit in the stream's
        // flow-control credit: the write deadline is about progress.
        let mut pending = [chunk];
        while !pending[0].is_empty() {
            deadlines.write(send.write_chunks(&mut pending)).await??;
        }
        total += n as u64;
    }
}

async fn stream_to_tcp(
    recv: &mut RecvStream,
    wr: &mut tokio::net::tcp::WriteHalf<'_>,
    deadlines: &Deadlines,
) -> Result<u64, RelayError> {
    let mut total = 0u64;
    let mut chunks: [Bytes; MAX_WRITE_CHUNKS] = Default::default();
    while let Some(n) = recv.read_chunks(&mut chunks).await? {
        total += write_all_chunks(wr, &mut chunks[..n], deadlines).await?;
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
/// allows, emptying the chunks as it goes. Returns the bytes written. Each
/// call must write something within the write deadline.
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut [Bytes],
    deadlines: &Deadlines,
) -> Result<u64, RelayError> {
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
            deadlines
                .write(w.write_vectored(&slices[..count]))
                .await??
        };
        if written == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero).into());
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
/// session, as in terminate mode) under the `timeouts` deadlines. Returns
/// bytes `a→b` as `to_tunnel` and `b→a` as `from_tunnel`. Errors are
/// returned without aborting: the caller owns the concrete transports and
/// aborts them.
pub(crate) async fn relay_io<A, B>(
    a: &mut A,
    b: &mut B,
    timeouts: StreamTimeouts,
) -> Result<Transferred, RelayError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let deadlines = Deadlines::new(timeouts);
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let both = async {
        tokio::try_join!(
            copy_half(&mut ar, &mut bw, &deadlines),
            copy_half(&mut br, &mut aw, &deadlines)
        )
    };
    let (ab, ba) = tokio::select! {
        biased;
        result = both => result?,
        idle = deadlines.idle() => return Err(idle),
    };
    Ok(Transferred {
        to_tunnel: ab,
        from_tunnel: ba,
    })
}

/// Buffer size of one direction of the terminate relay.
const IO_CHUNK: usize = 16 * 1024;

async fn copy_half<R, W>(r: &mut R, w: &mut W, deadlines: &Deadlines) -> Result<u64, RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // The buffer is held only while data flows: a read that has to wait
    // gives it back, so an idle stream (a quiet WebSocket, a keep-alive
    // connection) costs no buffer in either direction.
    let mut buf: Option<Vec<u8>> = None;
    let mut total = 0u64;
    // Bytes written since the last flush: a writer that buffers (TLS
    // records in rustls) must be flushed before we wait for more input, or
    // the end of a response can sit there while the peer waits for it.
    let mut unflushed = false;
    loop {
        let read = loop {
            let polled = std::future::poll_fn(|cx| {
                let b = buf.get_or_insert_with(|| vec![0u8; IO_CHUNK]);
                let mut rb = ReadBuf::new(b);
                match std::pin::Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    std::task::Poll::Pending if unflushed => {
                        buf = None;
                        std::task::Poll::Ready(None)
                    }
                    std::task::Poll::Pending => {
                        buf = None;
                        std::task::Poll::Pending
                    }
                    std::task::Poll::Ready(result) => {
                        std::task::Poll::Ready(Some(result.map(|()| rb.filled().len())))
                    }
                }
            })
            .await;
            match polled {
                Some(read) => break read,
                None => {
                    deadlines.write(w.flush()).await??;
                    unflushed = false;
                }
            }
        };
        let n = match read {
            Ok(n) => n,
            // A TLS peer that closed TCP without close_notify (as browsers
            // do) has still said everything: treat it as the end.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            deadlines.write(w.shutdown()).await??;
            return Ok(total);
        }
        let Some(data) = buf.as_deref() else {
            // Ready with data implies the buffer is still held.
            return Err(io::Error::other("relay buffer missing after a read").into());
        };
        let mut data = &data[..n];
        while !data.is_empty() {
            let written = deadlines.write(w.write(data)).await??;
            if written == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            data = &data[written..];
        }
        unflushed = true;
        total += n as u64;
    }
}

/// Make the next close of `tcp` a reset rather than an orderly FIN.
pub(crate) fn abort_tcp(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

/// Abort both halves of a tunnel stream (dropping a quinn SendStream would
/// otherwise finish it cleanly, hiding the failure from the peer).
pub(crate) fn abort_stream(send: &mut SendStream, recv: &mut RecvStream) {
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

    pub(crate) fn get_mut(&mut self) -> &mut IO {
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

    #[tokio::test]
    async fn a_buffering_writer_is_flushed_when_the_reader_goes_quiet() {
        use tokio::io::AsyncReadExt;
        // A keep-alive backend: the response, then silence. A writer that
        // buffers (as TLS does) must still deliver the response.
        let (mut backend, relay_in) = tokio::io::duplex(1 << 16);
        let (relay_out, mut visitor) = tokio::io::duplex(1 << 16);
        let mut relay_in = relay_in;
        let mut writer = tokio::io::BufWriter::new(relay_out);
        let deadlines = Deadlines::new(StreamTimeouts::default());
        let relay = tokio::spawn(async move {
            let _ = copy_half(&mut relay_in, &mut writer, &deadlines).await;
        });
        backend
            .write_all(b"HTTP/1.1 200 OK\r\n\r\nbody")
            .await
            .unwrap();
        let mut got = vec![0u8; 23];
        tokio::time::timeout(Duration::from_secs(5), visitor.read_exact(&mut got))
            .await
            .expect("the response arrives while the backend stays open")
            .unwrap();
        assert_eq!(&got, b"HTTP/1.1 200 OK\r\n\r\nbody");
        relay.abort();
    }

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

    fn deadlines() -> Deadlines {
        Deadlines::new(StreamTimeouts::default())
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
        let n = write_all_chunks(&mut w, &mut c, &deadlines())
            .await
            .unwrap();
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
        write_all_chunks(&mut w, &mut c, &deadlines())
            .await
            .unwrap();
        assert_eq!(w.got.len(), MAX_WRITE_CHUNKS);
        assert_eq!(w.calls, 1);
    }

    #[tokio::test]
    async fn relay_io_carries_bursts_after_idle_gaps_and_passes_half_close_on() {
        use tokio::io::AsyncReadExt;
        // visitor <-> (a | relay | b) <-> backend
        let (mut visitor, mut a) = tokio::io::duplex(64 * 1024);
        let (mut b, mut backend) = tokio::io::duplex(64 * 1024);
        let relay =
            tokio::spawn(async move { relay_io(&mut a, &mut b, StreamTimeouts::default()).await });
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
        let err = write_all_chunks(&mut w, &mut c, &deadlines())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RelayError::Tcp(e) if e.kind() == io::ErrorKind::WriteZero),
            "{err:?}"
        );
    }
    fn short(write_ms: u64, idle_ms: u64) -> StreamTimeouts {
        StreamTimeouts {
            write: Duration::from_millis(write_ms),
            idle: Duration::from_millis(idle_ms),
        }
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_hits_the_write_deadline() {
        // visitor <-> (a | relay | b) <-> backend; the backend never reads.
        let (mut visitor, mut a) = tokio::io::duplex(64 * 1024);
        let (mut b, _backend) = tokio::io::duplex(64 * 1024);
        let started = Instant::now();
        let relay = tokio::spawn(async move { relay_io(&mut a, &mut b, short(300, 60_000)).await });
        let upload = tokio::spawn(async move {
            let _ = visitor.write_all(&vec![7u8; 1024 * 1024]).await;
            visitor
        });
        let err = relay.await.unwrap().unwrap_err();
        assert_eq!(err.reason(), "write_timeout", "{err:?}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        upload.abort();
    }

    #[tokio::test]
    async fn a_slow_reader_that_keeps_taking_bytes_is_not_cut() {
        use tokio::io::AsyncReadExt;
        // The backend reads 1 KiB every 5 ms through a 4 KiB pipe: the
        // relay's writes block again and again and the whole transfer takes
        // longer than the 300 ms deadline, but each write makes progress.
        let (mut visitor, mut a) = tokio::io::duplex(4 * 1024);
        let (mut b, mut backend) = tokio::io::duplex(4 * 1024);
        let relay = tokio::spawn(async move { relay_io(&mut a, &mut b, short(300, 60_000)).await });
        let sent = 64 * 1024;
        let upload = tokio::spawn(async move {
            visitor.write_all(&vec![1u8; sent]).await.unwrap();
            visitor.shutdown().await.unwrap();
            visitor
        });
        let mut got = 0;
        let mut buf = [0u8; 1024];
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let n = backend.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        assert_eq!(got, sent);
        backend.shutdown().await.unwrap();
        let _visitor = upload.await.unwrap();
        relay.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_stream_that_moves_nothing_hits_the_idle_deadline() {
        use tokio::io::AsyncReadExt;
        let (mut visitor, mut a) = tokio::io::duplex(1024);
        let (mut b, mut backend) = tokio::io::duplex(1024);
        let started = Instant::now();
        let relay = tokio::spawn(async move { relay_io(&mut a, &mut b, short(60_000, 400)).await });
        // Traffic every 200 ms keeps it open past the idle deadline...
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            visitor.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            backend.read_exact(&mut buf).await.unwrap();
        }
        assert!(!relay.is_finished(), "closed while bytes were moving");
        // ...and silence closes it.
        let quiet = Instant::now();
        let err = relay.await.unwrap().unwrap_err();
        assert_eq!(err.reason(), "idle_timeout", "{err:?}");
        assert!(quiet.elapsed() >= Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
