//! The bench Visitor: TLS connections through a route, and the backend protocol commands.

use super::*;

pub(crate) type Tls = tokio_rustls::client::TlsStream<TcpStream>;

#[derive(Clone)]
pub(crate) struct Visitor {
    pub(crate) connector: TlsConnector,
    pub(crate) addr: SocketAddr,
    pub(crate) name: ServerName<'static>,
}

impl Visitor {
    pub(crate) fn new(
        config: &Arc<rustls::ClientConfig>,
        addr: SocketAddr,
        sni: &str,
    ) -> Res<Self> {
        let name = ServerName::try_from(sni.to_string()).ctx(format!("SNI {sni}"))?;
        Ok(Self {
            connector: TlsConnector::from(config.clone()),
            addr,
            name,
        })
    }

    pub(crate) async fn connect(&self) -> io::Result<Tls> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        self.connector.connect(self.name.clone(), tcp).await
    }

    /// [`connect`](Self::connect) from loopback address 127.0.0.(2 + n):
    /// many streams held at once come from several sources, as the Server
    /// caps streams per source (128).
    pub(crate) async fn connect_from(&self, n: u8) -> io::Result<Tls> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, n.saturating_add(2)], 0)))?;
        let tcp = socket.connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        self.connector.connect(self.name.clone(), tcp).await
    }

    pub(crate) async fn download(&self, n: u64) -> io::Result<()> {
        let mut s = self.connect().await?;
        command(&mut s, b'D', n).await?;
        let got = drain(&mut s, CHUNK).await?;
        expect_count("download", got, n)?;
        close(&mut s).await
    }

    pub(crate) async fn upload(&self, n: u64) -> io::Result<()> {
        let mut s = self.connect().await?;
        command(&mut s, b'U', n).await?;
        let mut left = n;
        while left > 0 {
            let k = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
            s.write_all(&SOURCE[..k]).await?;
            left -= k as u64;
        }
        s.flush().await?;
        let mut ack = [0u8; 8];
        s.read_exact(&mut ack).await?;
        expect_count("upload ack", u64::from_be_bytes(ack), n)?;
        close(&mut s).await
    }

    /// A fresh connection, full handshake, `R`, 1 KiB back, closed.
    pub(crate) async fn request(&self) -> io::Result<()> {
        let mut s = self.connect().await?;
        ask(&mut s).await?;
        close(&mut s).await
    }
}

/// An orderly TLS close (close_notify, then FIN), as a well-behaved
/// Visitor does. The peer may already be gone: that is not an error.
pub(crate) async fn close(s: &mut Tls) -> io::Result<()> {
    let _ = s.shutdown().await;
    Ok(())
}

pub(crate) async fn command(s: &mut Tls, cmd: u8, n: u64) -> io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = cmd;
    head[1..].copy_from_slice(&n.to_be_bytes());
    s.write_all(&head).await?;
    s.flush().await
}

pub(crate) async fn ask(s: &mut Tls) -> io::Result<()> {
    command(s, b'R', 0).await?;
    let got = drain(s, 4 * REPLY).await?;
    expect_count("reply", got, REPLY as u64)
}

pub(crate) async fn drain<S: AsyncRead + Unpin>(s: &mut S, buf_len: usize) -> io::Result<u64> {
    let mut buf = vec![0u8; buf_len];
    let mut got = 0u64;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return Ok(got),
            Ok(k) => got += k as u64,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                EOF_WITHOUT_CLOSE_NOTIFY.fetch_add(1, Ordering::Relaxed);
                return Ok(got);
            }
            Err(e) => return Err(e),
        }
    }
}

pub(crate) fn expect_count(what: &str, got: u64, want: u64) -> io::Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{what}: got {got} bytes, expected {want}"
        )))
    }
}
