//! Wildcard Public hostnames with the real binary: `*.app.test` takes one
//! label, exact names win over it on the Server (another Tunnel) and on
//! the Client (another Service), a wildcard certificate made by
//! `client public-cert init --hostname '*.app.test'` serves terminate
//! Services, and names the wildcard does not cover are dropped.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use common::proc::*;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A plaintext backend answering `tag` to every connection.
fn tagged_backend(tag: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut tcp in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                let _ = tcp.read(&mut buf);
                let _ = tcp.write_all(tag.as_bytes());
            });
        }
    });
    addr
}

/// A TLS Visitor for `sni` trusting `roots`; the reply, or an error when
/// the Server dropped it or the handshake failed.
fn visit_as(
    public: SocketAddr,
    sni: &str,
    roots: &[CertificateDer<'static>],
) -> std::io::Result<String> {
    let (mut conn, mut tcp) = common::tls::connect(public, sni, roots, Duration::from_secs(5))?;
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    tls.write_all(b"hello")?;
    let mut out = String::new();
    match tls.read_to_string(&mut out) {
        Ok(_) if !out.is_empty() => Ok(out),
        Err(_) if !out.is_empty() => Ok(out),
        Ok(_) => Err(std::io::Error::other("no reply")),
        Err(e) => Err(e),
    }
}

fn ca(home: &Home, dir: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(home.path().join(dir).join("public-ca.crt")).unwrap()
}

fn client_toml(
    home: &Home,
    name: &str,
    identity: &str,
    certs: &str,
    services: &str,
) -> std::path::PathBuf {
    home.write(
        name,
        &format!(
            "[client]\nserver-address = \"localhost:{}\"\nserver-trust = \"ca-file\"\n\
             server-ca-file = \"server-certs/server-ca.crt\"\nidentity-dir = \"{identity}\"\n\
             public-cert-dir = \"{certs}\"\n\n{services}",
            home.tunnel
        ),
    )
}

fn service(host: &str, backend: SocketAddr) -> String {
    format!(
        "[[client.services]]\npublic-hostnames = [\"{host}\"]\nbackend-address = \"{backend}\"\ntls-mode = \"terminate\"\n\n"
    )
}

#[test]
fn wildcards_take_one_label_and_exact_names_win_on_both_sides() {
    runewarp::tls::install_crypto_provider();
    let home = Home::new();
    home.server_material();
    let pin_a = home.identity("identity-a");
    let pin_b = home.identity("identity-b");
    // A wildcard certificate, made by the operator's command.
    home.ok(&[
        "client",
        "public-cert",
        "init",
        "--hostname",
        "*.app.test",
        "--dir",
        "certs-a",
    ]);
    assert!(Path::new(&home.path().join("certs-a/*.app.test/public.crt")).exists());
    home.ok(&[
        "client",
        "public-cert",
        "init",
        "--hostname",
        "api.app.test",
        "--dir",
        "certs-b",
    ]);
    let roots = [ca(&home, "certs-a"), ca(&home, "certs-b")];

    let server_toml = home.write(
        "server.toml",
        &format!(
            "[server]\nhostname = \"localhost\"\npublic-bind-address = \"127.0.0.1:{}\"\n\
             tunnel-bind-address = \"127.0.0.1:{}\"\ncert-dir = \"server-certs\"\n\
             graceful-shutdown-duration = \"1s\"\n\n\
             [[server.tunnels]]\npublic-hostnames = [\"*.app.test\"]\nclient-identity = \"{pin_a}\"\n\n\
             [[server.tunnels]]\npublic-hostnames = [\"api.app.test\"]\nclient-identity = \"{pin_b}\"\n",
            home.public, home.tunnel
        ),
    );
    let a = client_toml(
        &home,
        "client-a.toml",
        "identity-a",
        "certs-a",
        &(service("*.app.test", tagged_backend("A-wildcard"))
            + &service("exact.app.test", tagged_backend("A-exact"))),
    );
    let b = client_toml(
        &home,
        "client-b.toml",
        "identity-b",
        "certs-b",
        &service("api.app.test", tagged_backend("B-api")),
    );
    let mut server = home.spawn("server", &server_toml, "server.log");
    let mut client_a = home.spawn("client", &a, "client-a.log");
    let mut client_b = home.spawn("client", &b, "client-b.log");
    let public = home.public_addr();
    wait_until("Tunnel A up", Duration::from_secs(15), || {
        visit_as(public, "www.app.test", &roots).is_ok()
    });
    wait_until("Tunnel B up", Duration::from_secs(15), || {
        visit_as(public, "api.app.test", &roots).is_ok()
    });

    // One label under the wildcard: Tunnel A, its wildcard Service and certificate.
    for host in ["www.app.test", "Other.App.Test", "xn--bcher-kva.app.test"] {
        assert_eq!(
            visit_as(public, host, &roots).unwrap(),
            "A-wildcard",
            "{host}"
        );
    }
    // An exact Service beats the Client's wildcard (the wildcard
    // certificate still serves it).
    assert_eq!(
        visit_as(public, "exact.app.test", &roots).unwrap(),
        "A-exact"
    );
    // An exact Tunnel beats the Server's wildcard.
    assert_eq!(visit_as(public, "api.app.test", &roots).unwrap(), "B-api");
    // Not one label under it: dropped by the Server.
    for host in ["a.b.app.test", "app.test"] {
        assert!(
            visit_as(public, host, &roots).is_err(),
            "{host} must not be served"
        );
    }

    for c in [&mut client_a, &mut client_b] {
        c.stop_with(libc::SIGTERM, Duration::from_secs(5));
    }
    server.stop_with(libc::SIGTERM, Duration::from_secs(5));
    // The wildcard certificate covers the exact Service: no warning.
    assert!(
        !client_a
            .log_text()
            .contains("terminate_certificate_missing"),
        "{}",
        client_a.log_text()
    );
}

#[test]
fn acme_with_a_wildcard_terminate_service_is_refused_before_starting() {
    let home = Home::new();
    home.identity("identity");
    let toml = home.write(
        "client.toml",
        &format!(
            "[client]\nserver-address = \"localhost:{}\"\nidentity-dir = \"identity\"\n\
             [client.acme]\nemail = \"ops@example.com\"\n\
             [[client.services]]\npublic-hostnames = [\"*.app.test\"]\nbackend-address = \"127.0.0.1:1\"\ntls-mode = \"terminate\"\n",
            home.tunnel
        ),
    );
    let err = stderr_of(home.cmd().arg("client").arg("-c").arg(&toml), 2);
    assert!(
        err.contains("client.services[0].public-hostnames[0] = \"*.app.test\""),
        "{err}"
    );
    assert!(
        err.contains("TLS-ALPN-01 challenge cannot issue wildcard certificates"),
        "{err}"
    );
}
