//! rustls set-up the tests share: a self-signed backend configuration, a
//! Visitor configuration trusting given roots, and a blocking Visitor
//! connection. Plain rustls, usable from sync and async tests alike.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A self-signed certificate for `hosts` and a TLS server configuration
/// presenting it.
pub fn self_signed(hosts: &[&str]) -> (CertificateDer<'static>, Arc<rustls::ServerConfig>) {
    runewarp::tls::install_crypto_provider();
    let (cert_pem, key_pem) = runewarp::tls::material::generate_self_signed(hosts).unwrap();
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    (cert, Arc::new(config))
}

/// A Visitor's TLS configuration trusting exactly `roots`.
pub fn client_config(roots: &[CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(store)
            .with_no_client_auth(),
    )
}

/// A Visitor's TLS session for `sni` trusting exactly `roots` (no bytes
/// exchanged yet).
pub fn client_conn(sni: &str, roots: &[CertificateDer<'static>]) -> rustls::ClientConnection {
    let name = ServerName::try_from(sni.to_string()).unwrap();
    rustls::ClientConnection::new(client_config(roots), name).unwrap()
}

/// A blocking Visitor: a TCP connection to `public` reading with
/// `read_timeout`, and its TLS session for `sni` (handshake still to come).
pub fn connect(
    public: SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
    read_timeout: Duration,
) -> std::io::Result<(rustls::ClientConnection, TcpStream)> {
    let conn = client_conn(sni, roots);
    let tcp = TcpStream::connect(public)?;
    tcp.set_read_timeout(Some(read_timeout))?;
    Ok((conn, tcp))
}
