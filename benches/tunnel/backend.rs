//! The in-process backends: TLS for direct and passthrough, plaintext for terminate.

use super::*;

pub(crate) async fn backend(listener: TcpListener, tls: Option<TlsAcceptor>) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                eprintln!("bench backend: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        tokio::spawn(async move {
            // Errors here are the Visitor going away (idle streams, aborted
            // phases); the Visitor side reports what matters.
            let _ = match tls {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(s) => serve(s).await,
                    Err(e) => Err(e),
                },
                None => serve(tcp).await,
            };
        });
    }
}

pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> io::Result<()> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[1..]);
    let n = u64::from_be_bytes(len);
    match head[0] {
        b'D' => {
            let mut left = n;
            while left > 0 {
                let k = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
                s.write_all(&SOURCE[..k]).await?;
                left -= k as u64;
            }
        }
        b'U' => {
            let mut buf = vec![0u8; CHUNK];
            let mut left = n;
            while left > 0 {
                let want = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
                let k = s.read(&mut buf[..want]).await?;
                if k == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                left -= k as u64;
            }
            s.write_all(&n.to_be_bytes()).await?;
        }
        b'R' => s.write_all(&SOURCE[..REPLY]).await?,
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown command byte {other:#04x}"),
            ));
        }
    }
    s.shutdown().await
}
