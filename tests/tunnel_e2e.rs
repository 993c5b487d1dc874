//! End to end on loopback: a real Server, Client, backends and TLS Visitors
//! in one process, checking bytes, certificates and timings a user sees.

mod common;
#[path = "common/two_ids.rs"]
mod two_ids;

use std::time::{Duration, Instant};

use common::*;
use runewarp::client::TunnelEnd;
use runewarp::config::TlsMode;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use two_ids::TwoIds;

const APP: &str = "app.runewarp.test";
const SECURE: &str = "secure.runewarp.test";
const UP: Duration = Duration::from_secs(10);

/// A Server with one Tunnel for SECURE and a Client terminating TLS for it
/// with its own public certificate, forwarding plaintext to `backend`
/// (with a PROXY v2 header when `proxy_protocol`); the tunnel up. Returns
/// the material directory, the public CA, the Server and the Client.
async fn terminating(
    backend: std::net::SocketAddr,
    proxy_protocol: bool,
) -> (
    tempfile::TempDir,
    CertificateDer<'static>,
    TestServer,
    TestClient,
) {
    let (dir, cert_dir, ca, id_dir, pin) = material("client");
    let (public_dir, public_ca) = public_certs(dir.path(), &[SECURE]);
    let server = TestServer::start(&cert_dir, vec![tunnel(0, &[SECURE], &[pin])]).await;
    let mut svc = service(0, &[SECURE], backend, TlsMode::Terminate);
    svc.proxy_protocol = proxy_protocol;
    let client = TestClient::start(ClientSetup {
        tunnel: server.tunnel,
        ca: &ca,
        identity_dir: &id_dir,
        public_cert_dir: Some(&public_dir),
        services: vec![svc],
    });
    server.wait_active(SECURE, UP).await;
    (dir, public_ca, server, client)
}

/// [`terminating`] in front of an echo backend that expects a PROXY v2
/// header exactly when `proxy_protocol`; returns the backend too.
async fn terminating_echo(
    proxy_protocol: bool,
) -> (
    tempfile::TempDir,
    EchoBackend,
    CertificateDer<'static>,
    TestServer,
    TestClient,
) {
    let backend = if proxy_protocol {
        EchoBackend::plain_with_proxy_header().await
    } else {
        EchoBackend::plain().await
    };
    let (dir, public_ca, server, client) = terminating(backend.addr, proxy_protocol).await;
    (dir, backend, public_ca, server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_moves_64_mib_exactly_and_visitor_sees_backend_certificate() {
    init();
    let (_dir, backend, server, client) = Rig::up(APP).await.parts();

    let backend_cert = backend.cert.clone().unwrap();
    let v = visitor(server.public, APP, std::slice::from_ref(&backend_cert))
        .await
        .unwrap();
    assert_eq!(
        peer_leaf(&v),
        backend_cert,
        "the Visitor must see the Local backend's own certificate"
    );
    let body = random_bytes(64 * 1024 * 1024);
    let start = Instant::now();
    let echoed = roundtrip(v, &body).await.unwrap();
    assert_eq!(echoed.len(), body.len());
    assert_eq!(
        sha256(&echoed),
        sha256(&body),
        "64 MiB must arrive byte-exact"
    );
    eprintln!("64 MiB echoed through the tunnel in {:?}", start.elapsed());
    stop(client, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_presents_client_certificate_and_backend_gets_plaintext() {
    init();
    let (_dir, backend, public_ca, server, client) = terminating_echo(false).await;

    let v = visitor(server.public, SECURE, std::slice::from_ref(&public_ca))
        .await
        .unwrap();
    let leaf = peer_leaf(&v);
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let sans: Vec<String> = parsed
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|g| g.to_string())
        .collect();
    assert!(
        sans.iter().any(|s| s.contains(SECURE)),
        "leaf SANs {sans:?}"
    );
    let request = b"GET /hello HTTP/1.1\r\nHost: secure.runewarp.test\r\n\r\n";
    let echoed = roundtrip(v, request).await.unwrap();
    assert_eq!(echoed, request);
    let seen = backend.first_bytes.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].starts_with(b"GET /hello"),
        "backend must receive plaintext, got {:?}",
        &seen[0]
    );

    // A Visitor trusting only the backend-side chain would fail: the
    // certificate really is the Client's, from public-cert-dir.
    let other = material_root();
    assert!(visitor(server.public, SECURE, &[other]).await.is_err());
    stop(client, server).await;
}

fn material_root() -> CertificateDer<'static> {
    tls::self_signed(&["unrelated.test"]).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_keeps_half_close_in_both_directions() {
    init();
    // A backend that answers only after the Visitor finished sending: it
    // needs the FIN to cross Server, tunnel and Client.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                if tcp.read_to_end(&mut all).await.is_ok() {
                    let _ = tcp
                        .write_all(format!("got {} bytes", all.len()).as_bytes())
                        .await;
                    let _ = tcp.shutdown().await;
                }
            });
        }
    });
    let (_dir, public_ca, server, client) = terminating(backend, false).await;
    let v = visitor(server.public, SECURE, &[public_ca]).await.unwrap();
    let reply = tokio::time::timeout(UP, roundtrip(v, &[7u8; 100_000]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, b"got 100000 bytes");
    stop(client, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_all_service_receives_every_hostname_the_server_routes() {
    init();
    let (_dir, cert_dir, ca, id_dir, pin) = material("client");
    let hosts = ["a.runewarp.test", "b.runewarp.test", "c.runewarp.test"];
    let backend = EchoBackend::tls(&hosts).await;
    let server = TestServer::start(&cert_dir, vec![tunnel(0, &hosts, &[pin])]).await;
    let client = TestClient::start(ClientSetup {
        tunnel: server.tunnel,
        ca: &ca,
        identity_dir: &id_dir,
        public_cert_dir: None,
        services: vec![service(0, &[], backend.addr, TlsMode::Passthrough)],
    });
    server.wait_active(hosts[0], UP).await;
    for h in hosts {
        let v = visitor(server.public, h, &[backend.cert.clone().unwrap()])
            .await
            .unwrap();
        assert_eq!(roundtrip(v, h.as_bytes()).await.unwrap(), h.as_bytes());
    }
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        3
    );
    stop(client, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_drop_rule_closes_the_visitor_within_6s_while_good_traffic_flows() {
    init();
    let ids = TwoIds::new("client", "never-connects", APP).await;
    let unserved = "unserved.runewarp.test"; // routed by the Server, no Client Service
    let server = TestServer::start(
        &ids.cert_dir,
        vec![
            tunnel(0, &[APP, unserved], &[ids.pin]),
            tunnel(1, &["offline.runewarp.test"], &[ids.other_pin]),
        ],
    )
    .await;
    let client =
        TestClient::passthrough(server.tunnel, &ids.ca, &ids.id_dir, APP, ids.backend.addr);
    server.wait_active(APP, UP).await;
    let cert = ids.backend.cert.clone().unwrap();

    // A long-lived good stream that must keep working throughout.
    let v = visitor(server.public, APP, std::slice::from_ref(&cert))
        .await
        .unwrap();
    let (mut good_r, mut good_w) = tokio::io::split(v);

    let hello_for = |sni: Option<&str>| client_hello(sni);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "not TLS",
            b"GET / HTTP/1.1\r\nHost: app.runewarp.test\r\n\r\n".to_vec(),
        ),
        ("TLS without SNI", hello_for(None)),
        ("unknown hostname", hello_for(Some("nobody.runewarp.test"))),
        (
            "Server hostname without acme-tls/1",
            hello_for(Some(SERVER_HOSTNAME)),
        ),
        (
            "Tunnel without a connection",
            hello_for(Some("offline.runewarp.test")),
        ),
        (
            "no Client Service for the hostname",
            hello_for(Some(unserved)),
        ),
        ("silent after connecting", Vec::new()),
        ("truncated ClientHello", hello_for(Some(APP))[..20].to_vec()),
    ];
    for (i, (name, bytes)) in cases.iter().enumerate() {
        let mut tcp = TcpStream::connect(server.public).await.unwrap();
        tcp.write_all(bytes).await.unwrap();
        let took = closed_within(&mut tcp, Duration::from_secs(6)).await;
        assert!(took.is_some(), "{name}: Visitor not closed within 6 s");
        // Good traffic still flows, on the old stream and on a new one.
        let msg = format!("ping {i}");
        good_w.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(UP, good_r.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf, msg.as_bytes(), "{name}: established stream disturbed");
        let fresh = visitor(server.public, APP, std::slice::from_ref(&cert))
            .await
            .unwrap();
        assert_eq!(
            roundtrip(fresh, b"fresh").await.unwrap(),
            b"fresh",
            "{name}: new Visitor failed"
        );
        eprintln!("{name}: closed after {took:?}");
    }
    stop(client, server).await;
}

/// A real ClientHello from rustls (no SNI when `sni` is None: rustls omits
/// it for IP-address server names).
fn client_hello(sni: Option<&str>) -> Vec<u8> {
    use std::sync::Arc;
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = match sni {
        Some(h) => rustls::pki_types::ServerName::try_from(h.to_string()).unwrap(),
        None => rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_identity_is_refused_with_access_denied_then_a_pinned_one_is_accepted() {
    init();
    let ids = TwoIds::new("pinned", "stranger", APP).await;
    let server = TestServer::start(&ids.cert_dir, vec![tunnel(0, &[APP], &[ids.pin])]).await;

    // The raw handshake outcome: a TLS access_denied alert (49).
    let (material, _) = runewarp::tls::material::load_client_identity(&ids.other_dir).unwrap();
    let roots =
        runewarp::tls::trust::root_store(&runewarp::config::ServerTrust::CaFile(ids.ca.clone()))
            .unwrap();
    let quic = runewarp::tunnel::transport::client_config(
        roots,
        material,
        runewarp::tunnel::congestion::CongestionControl::default(),
    )
    .unwrap();
    let endpoint =
        runewarp::tunnel::transport::endpoint("127.0.0.1:0".parse().unwrap(), None, None).unwrap();
    // TLS 1.3: the Client's side of the handshake completes first; the
    // Server's verdict arrives as the connection's close reason.
    let err = match endpoint
        .connect_with(quic, server.tunnel, SERVER_HOSTNAME)
        .unwrap()
        .await
    {
        Ok(conn) => tokio::time::timeout(UP, conn.closed())
            .await
            .expect("refused within 10 s"),
        Err(e) => e,
    };
    // access_denied is TLS alert 49, carried as QUIC CRYPTO_ERROR 0x100+49.
    match &err {
        quinn::ConnectionError::ConnectionClosed(c) => {
            assert_eq!(c.error_code, quinn::TransportErrorCode::crypto(49), "{err}");
        }
        other => panic!("expected the Server to close with access_denied, got {other}"),
    }
    assert!(server.active_id(APP).is_none());

    // A whole Client with the stranger's identity never gets a tunnel.
    let stranger = TestClient::passthrough(
        server.tunnel,
        &ids.ca,
        &ids.other_dir,
        APP,
        ids.backend.addr,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(server.active_id(APP).is_none());
    assert_eq!(stranger.status.borrow().connections, 0);

    let client =
        TestClient::passthrough(server.tunnel, &ids.ca, &ids.id_dir, APP, ids.backend.addr);
    server.wait_active(APP, UP).await;
    let v = visitor(server.public, APP, &[ids.backend.cert.clone().unwrap()])
        .await
        .unwrap();
    assert_eq!(roundtrip(v, b"hi").await.unwrap(), b"hi");
    stranger.stop().await;
    stop(client, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_connection_replaces_the_older_one_in_the_same_tunnel() {
    init();
    let (_dir, cert_dir, ca, id_dir, pin) = material("shared");
    let backend_a = EchoBackend::tls(&[APP]).await;
    let backend_b = EchoBackend::tls(&[APP]).await;
    let roots = [
        backend_a.cert.clone().unwrap(),
        backend_b.cert.clone().unwrap(),
    ];
    let server = TestServer::start(&cert_dir, vec![tunnel(0, &[APP], &[pin])]).await;
    let mut a = TestClient::passthrough(server.tunnel, &ca, &id_dir, APP, backend_a.addr);
    let first = server.wait_active(APP, UP).await;
    let va = visitor(server.public, APP, &roots).await.unwrap();
    assert_eq!(
        peer_leaf(&va),
        roots[0],
        "before replacement, streams reach A"
    );

    // A stream in flight on A while B takes over.
    let (mut in_flight_r, mut in_flight_w) = tokio::io::split(va);
    let mut b = TestClient::passthrough(server.tunnel, &ca, &id_dir, APP, backend_b.addr);
    b.wait_for(UP, |s| s.connected).await;
    // The Client sees its handshake complete before the Server's accept task
    // installs the connection: wait for the Server to switch.
    let second = server.wait_replaced(APP, first, UP).await;
    for _ in 0..3 {
        let vb = visitor(server.public, APP, &roots).await.unwrap();
        assert_eq!(
            peer_leaf(&vb),
            roots[1],
            "after replacement, new streams reach B"
        );
        assert_eq!(roundtrip(vb, b"to b").await.unwrap(), b"to b");
    }
    // The in-flight stream on A still works inside the grace period...
    in_flight_w.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    in_flight_r.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    // ...and once it ends, A's connection is closed as replaced.
    in_flight_w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = in_flight_r.read_to_end(&mut rest).await;
    let status = a.wait_for(Duration::from_secs(7), |s| !s.connected).await;
    assert_eq!(status.last_end, Some(TunnelEnd::Replaced));
    // B stays the active connection (A pauses instead of flapping back).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(server.active_id(APP), Some(second));
    assert!(b.status.borrow().connected);
    a.stop().await;
    b.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_the_server_restarts() {
    init();
    let (_dir, cert_dir, ca, id_dir, pin) = material("client");
    let backend = EchoBackend::tls(&[APP]).await;
    let tunnels = vec![tunnel(0, &[APP], &[pin])];
    let server = TestServer::start(&cert_dir, tunnels.clone()).await;
    let (public, tunnel_addr) = (server.public, server.tunnel);
    let mut client = TestClient::passthrough(server.tunnel, &ca, &id_dir, APP, backend.addr);
    server.wait_active(APP, UP).await;
    server.stop().await;
    client
        .wait_for(Duration::from_secs(5), |s| !s.connected)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let restarted_at = Instant::now();
    let server = TestServer::start_on(&cert_dir, tunnels, public, tunnel_addr).await;
    server.wait_active(APP, Duration::from_secs(20)).await;
    eprintln!("reconnected {:?} after the restart", restarted_at.elapsed());
    let v = visitor(server.public, APP, &[backend.cert.clone().unwrap()])
        .await
        .unwrap();
    assert_eq!(
        roundtrip(v, b"after restart").await.unwrap(),
        b"after restart"
    );
    assert_eq!(client.status.borrow().connections, 2);
    stop(client, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_visitors_share_one_tunnel_byte_exact() {
    init();
    let (_dir, backend, server, client) = Rig::up(APP).await.parts();
    let cert = backend.cert.clone().unwrap();
    // Open all 1,000 first, so they are concurrent, then exchange data.
    // They come from 16 addresses (≤ 63 each, under the 128 streams one
    // source may hold), and handshakes are paced below the per-source
    // intake limit (256 ClientHellos at once from one address).
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(1000));
    let pacing = std::sync::Arc::new(tokio::sync::Semaphore::new(128));
    let mut tasks = Vec::new();
    for i in 0..1000u32 {
        let cert = cert.clone();
        let barrier = barrier.clone();
        let pacing = pacing.clone();
        let public = server.public;
        tasks.push(tokio::spawn(async move {
            let handshake = pacing.acquire().await.unwrap();
            let v = visitor_from(2 + (i % 16) as u8, public, APP, &[cert])
                .await
                .expect("visitor connects");
            drop(handshake);
            barrier.wait().await;
            let body: Vec<u8> = (0..8192u32)
                .map(|j| (i.wrapping_mul(31) ^ j) as u8)
                .collect();
            let echoed = roundtrip(v, &body).await.expect("roundtrip");
            echoed == body
        }));
    }
    let mut exact = 0;
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap()
        {
            exact += 1;
        }
    }
    assert_eq!(exact, 1000);
    stop(client, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_header_reaches_the_backend_with_the_visitor_address() {
    init();
    let (_dir, backend, public_ca, server, client) = terminating_echo(true).await;
    let v = visitor(server.public, SECURE, &[public_ca]).await.unwrap();
    let visitor_addr = v.get_ref().0.local_addr().unwrap();
    assert_eq!(roundtrip(v, b"x").await.unwrap(), b"x");
    let headers = backend.first_bytes.lock().unwrap().clone();
    match runewarp::tunnel::framing::decode(&headers[0]).unwrap() {
        runewarp::tunnel::framing::Decoded::Complete {
            header: Some(h), ..
        } => {
            assert_eq!(h.source, visitor_addr);
            assert_eq!(h.destination, server.public);
        }
        other => panic!("no PROXY header: {other:?}"),
    }
    stop(client, server).await;
}
