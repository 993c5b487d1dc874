//! Floods against a real Server process on loopback, as a stranger would
//! send them: junk QUIC Initials from many addresses, garbage and slowloris
//! TCP, handshakes with unknown keys, and two instances fighting over one
//! Tunnel. Each checks what a user would notice (a restarted Client gets
//! back in, good Visitors are answered in under a second, the log stays
//! short) and prints the Server's RSS and descriptor figures.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::proc::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The floods run one at a time: each measures latency and memory, which
/// another flood on the same cores would distort.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Info/warn/error lines of a log.
fn loud_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(" INFO ") || l.contains(" WARN ") || l.contains(" ERROR "))
        .collect()
}

/// `n` distinct, valid QUIC Initials (each a new connection with its own
/// ClientHello for `localhost` and ALPN `runewarp/1`), from a real QUIC
/// stack, ready to be replayed from any address.
fn junk_initials(n: usize, server: SocketAddr) -> Vec<Vec<u8>> {
    runewarp::tls::install_crypto_provider();
    let mut tls = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"runewarp/1".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let now = Instant::now();
    (0..n)
        .map(|_| {
            let (_, mut conn) = endpoint
                .connect(now, config.clone(), server, "localhost")
                .unwrap();
            let mut buf = Vec::new();
            let t = conn.poll_transmit(now, 1, &mut buf).unwrap();
            buf.truncate(t.size);
            buf
        })
        .collect()
}

/// Replay `initials` to `to` at `per_second`, round-robin from
/// 127.0.0.2..=65, until `stop` or they run out. Never answers anything.
fn flood_initials(
    initials: Vec<Vec<u8>>,
    to: SocketAddr,
    per_second: u32,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let sockets: Vec<UdpSocket> = (2..=65u8)
            .map(|last| UdpSocket::bind(SocketAddr::from(([127, 0, 0, last], 0))).unwrap())
            .collect();
        let every = Duration::from_secs(1) / per_second;
        let start = Instant::now();
        let mut sent = 0;
        for (i, packet) in initials.iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let due = start + every * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let _ = sockets[i % sockets.len()].send_to(packet, to);
            sent += 1;
        }
        sent
    })
}

/// A few Visitor requests; returns the slowest.
fn good_visitor_worst(public: SocketAddr, root: &CertificateDer<'static>, n: usize) -> Duration {
    let mut worst = Duration::ZERO;
    for _ in 0..n {
        let t = Instant::now();
        let reply = visit(public, root).expect("good Visitor answered");
        assert!(reply.starts_with("backend got"), "{reply}");
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    worst
}

fn rss_and_fds_settled(server: &Running) -> (u64, usize) {
    // Let closed sockets and finished tasks go away first.
    std::thread::sleep(Duration::from_secs(1));
    server.rss_kib_and_fds()
}

fn assert_flat(what: &str, before: (u64, usize), after: (u64, usize)) {
    eprintln!(
        "{what}: server RSS {} KiB -> {} KiB ({:+.1} %), fds {} -> {}",
        before.0,
        after.0,
        (after.0 as f64 / before.0 as f64 - 1.0) * 100.0,
        before.1,
        after.1
    );
    assert!(
        after.0 as f64 <= before.0 as f64 * 1.2,
        "{what}: RSS grew more than 20 %: {before:?} -> {after:?}"
    );
    assert!(
        after.1 <= before.1 + 1,
        "{what}: descriptors leaked: {before:?} -> {after:?}"
    );
}

struct Setup {
    home: Home,
    backend: Backend,
    server: Running,
    client: Running,
    client_toml: std::path::PathBuf,
}

/// Public hostname of the second Tunnel, pinned to the `probe` identity.
const PROBE: &str = "probe.runewarp.test";

fn setup() -> Setup {
    let (home, pin) = Home::with_identity();
    let backend = tls_backend();
    let probe = home.identity("probe");
    let server_toml = home.server_config_with(
        &pin,
        &format!(
            "graceful-shutdown-duration = \"1s\"\n\n[[server.tunnels]]\n\
             public-hostnames = [\"{PROBE}\"]\nclient-identity = \"{probe}\"\n"
        ),
    );
    let client_toml = home.default_client_config(backend.addr);
    let server = home.spawn("server", &server_toml, "server.log");
    let client = home.spawn("client", &client_toml, "client-1.log");
    visit_until_ok(home.public_addr(), &backend.cert, Duration::from_secs(15));
    // Warm up, so "before" includes what serving Visitors costs anyway.
    good_visitor_worst(home.public_addr(), &backend.cert, 5);
    Setup {
        home,
        backend,
        server,
        client,
        client_toml,
    }
}

#[test]
fn an_initial_flood_does_not_keep_a_restarted_client_out() {
    let _serial = SERIAL.blocking_lock();
    let Setup {
        home,
        backend,
        server,
        mut client,
        client_toml,
    } = setup();
    let tunnel = SocketAddr::from(([127, 0, 0, 1], home.tunnel));
    let public = home.public_addr();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // Without a flood no Retry is sent: the baseline for its cost.
    let calm = runtime.block_on(probe_handshakes(&home, tunnel, 6));
    let before = rss_and_fds_settled(&server);
    let log_before = server.log_text().lines().count();

    // ~130 junk Initials per second from 64 addresses, never completed:
    // without address validation they fill all 256 handshake slots.
    let stop = Arc::new(AtomicBool::new(false));
    let flood = flood_initials(junk_initials(5000, tunnel), tunnel, 130, stop.clone());
    std::thread::sleep(Duration::from_secs(8));
    let during = good_visitor_worst(public, &backend.cert, 5);

    // Authorised handshakes (a second Tunnel's identity) keep getting in:
    // each fresh handshake must be confirmed by the Server within 2 s.
    let probes = runtime.block_on(probe_handshakes(&home, tunnel, 6));

    // The Client restarts (crash) in the middle of the flood.
    client.stop_with(libc::SIGKILL, Duration::from_secs(2));
    let restarted = Instant::now();
    let client2 = home.spawn("client", &client_toml, "client-2.log");
    while client2.events("tunnel_connected").is_empty() {
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "the restarted Client was kept out by the flood:\n{}",
            client2.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let reconnected = restarted.elapsed();
    let through = visit_until_ok(public, &backend.cert, Duration::from_secs(5));
    let after_restart = good_visitor_worst(public, &backend.cert, 5);
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().unwrap();
    let flood_secs = restarted.elapsed().as_secs() + 8;
    eprintln!(
        "Initial flood: {sent} Initials; authorised handshakes confirmed after {calm:?} \
         before the flood (no Retry), {probes:?} during it (Retry); \
         restarted Client connected after {reconnected:?}, traffic {through:?} later; \
         good Visitor worst {during:?} during, {after_restart:?} after restart"
    );
    assert!(during < Duration::from_secs(1), "{during:?}");
    assert!(after_restart < Duration::from_secs(1), "{after_restart:?}");
    assert!(client2.log_text().contains("tunnel_connected"));

    // Unfinished handshakes end at the 5 s handshake deadline.
    std::thread::sleep(Duration::from_secs(6));
    let after = rss_and_fds_settled(&server);
    assert_flat("Initial flood", before, after);

    // What the flood put in the log at info and above: bounded, whatever
    // its size (the authorised connections' own lines aside).
    let log = server.log_text();
    let new: Vec<&str> = log.lines().skip(log_before).collect();
    let authorised = ["tunnel_connected", "tunnel_closed", "tunnel_replaced"];
    let loud = loud_lines(&new.join("\n"))
        .into_iter()
        .filter(|l| {
            !authorised
                .iter()
                .any(|e| l.contains(&format!("event=\"{e}\"")))
        })
        .map(String::from)
        .collect::<Vec<_>>();
    eprintln!(
        "{} info/warn lines during a {flood_secs} s flood:\n{}",
        loud.len(),
        loud.join("\n")
    );
    assert!(
        loud.len() <= 6,
        "the flood is not rate-limited in the log: {} lines",
        loud.len()
    );
    drop(client2);
}

/// `n` fresh handshakes, one after the other, with the `probe` identity;
/// returns how long each took until the Server confirmed it.
async fn probe_handshakes(home: &Home, tunnel: SocketAddr, n: usize) -> Vec<Duration> {
    let (id, _) =
        runewarp::tls::material::load_client_identity(&home.path().join("probe")).unwrap();
    let config =
        runewarp::tunnel::transport::client_config(server_roots(home), id, Default::default())
            .unwrap();
    let mut took = Vec::new();
    for _ in 0..n {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let start = Instant::now();
        let confirmed = async {
            let conn = endpoint
                .connect_with(config.clone(), tunnel, "localhost")
                .unwrap()
                .await?;
            while conn.stats().frame_rx.handshake_done == 0 {
                if let Some(e) = conn.close_reason() {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(conn)
        };
        match tokio::time::timeout(Duration::from_secs(2), confirmed).await {
            Ok(Ok(conn)) => conn.close(0u32.into(), b"probe done"),
            Ok(Err(e)) => panic!("authorised handshake refused during the flood: {e}"),
            Err(_) => panic!("authorised handshake not confirmed within 2 s"),
        }
        took.push(start.elapsed());
        endpoint.wait_idle().await;
    }
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_slowloris_floods_leave_visitors_memory_and_descriptors_alone() {
    let _serial = SERIAL.lock().await;
    let Setup {
        home,
        backend,
        server,
        client: _client,
        client_toml: _,
    } = tokio::task::spawn_blocking(setup).await.unwrap();
    let public = home.public_addr();
    let before = rss_and_fds_settled(&server);
    let log_before = server.log_text().lines().count();

    // A good Visitor every 100 ms while the floods run.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (done, root) = (done.clone(), backend.cert.clone());
        tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            while !done.load(Ordering::Relaxed) {
                all.push(good_visitor_worst(public, &root, 1));
            }
            all
        })
    };

    // 5,000 garbage connections (plain HTTP on the TLS port), 250 at a
    // time from 40 addresses.
    let garbage_start = Instant::now();
    for wave in 0..20u32 {
        let mut tasks = Vec::new();
        for i in 0..250u32 {
            let last = 2 + ((wave * 250 + i) % 40) as u8;
            tasks.push(tokio::spawn(async move {
                let Ok(mut tcp) = common::connect_from(last, public).await else {
                    return;
                };
                let _ = tcp
                    .write_all(b"GET / HTTP/1.1\r\nHost: app.runewarp.test\r\n\r\n")
                    .await;
                let mut buf = [0u8; 64];
                let _ = tokio::time::timeout(Duration::from_secs(6), tcp.read(&mut buf)).await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    let garbage_took = garbage_start.elapsed();
    let after_garbage = rss_and_fds_settled(&server);

    // 2,000 slowloris connections from 16 addresses, one byte of a
    // ClientHello per second: cut at the 5 s ClientHello deadline.
    let prefix = [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03];
    let mut slow = Vec::new();
    for i in 0..2000u32 {
        slow.push(tokio::spawn(async move {
            let Ok(mut tcp) = common::connect_from(50 + (i % 16) as u8, public).await else {
                return;
            };
            for b in prefix {
                if tcp.write_all(&[b]).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1];
                let read = tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await;
                if read.is_ok() {
                    return; // EOF or reset: the Server closed us
                }
            }
        }));
    }
    for t in slow {
        t.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let mut all = watcher.await.unwrap();
    all.sort();
    let (visits, worst) = (all.len(), all[all.len() - 1]);
    let after = rss_and_fds_settled(&server);
    eprintln!(
        "5,000 garbage connections in {garbage_took:?}, then 2,000 slowloris; \
         {visits} good Visitor requests: median {:?}, p99 {:?}, slowest {worst:?}",
        all[visits / 2],
        all[visits * 99 / 100],
    );
    assert_flat("garbage flood", before, after_garbage);
    assert_flat("garbage + slowloris", before, after);
    assert!(
        worst < Duration::from_secs(1),
        "good Visitor took {worst:?}"
    );

    let log = server.log_text();
    let new: Vec<&str> = log.lines().skip(log_before).collect();
    let loud = loud_lines(&new.join("\n")).len();
    eprintln!("{loud} info/warn lines for 7,000 bad connections");
    assert!(loud <= 12, "{}", new.join("\n"));
}

/// A fresh, unpinned Client key (self-signed P-256).
fn stranger_config(roots: &rustls::RootCertStore) -> quinn::ClientConfig {
    let (cert, key) = runewarp::tls::material::generate_self_signed(&["stranger"]).unwrap();
    let material = runewarp::tls::material::TlsMaterial {
        chain: vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
        key: PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    };
    runewarp::tunnel::transport::client_config(roots.clone(), material, Default::default()).unwrap()
}

/// A running Server (server.toml, pinning `identity/`) without a Client;
/// its home, process, tunnel address and the roots that trust it.
fn lone_server() -> (Home, Running, SocketAddr, rustls::RootCertStore) {
    runewarp::tls::install_crypto_provider();
    let (home, pin) = Home::with_identity();
    let server = home.spawn("server", &home.server_config(&pin), "server.log");
    let tunnel = SocketAddr::from(([127, 0, 0, 1], home.tunnel));
    let roots = server_roots(&home);
    (home, server, tunnel, roots)
}

fn server_roots(home: &Home) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in
        runewarp::tls::material::load_ca_bundle(&home.path().join("server-certs/server-ca.crt"))
            .unwrap()
    {
        roots.add(c).unwrap();
    }
    roots
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_keys_logs_a_bounded_number_of_lines_naming_the_claimed_identity() {
    let _serial = SERIAL.lock().await;
    let (_home, server, tunnel, roots) = lone_server();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 100 handshakes, each with a new key, from 20 addresses.
    let started = Instant::now();
    let mut refused = 0;
    for i in 0..100u8 {
        let endpoint =
            quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 2 + i % 20], 0))).unwrap();
        let connecting = endpoint
            .connect_with(stranger_config(&roots), tunnel, "localhost")
            .unwrap();
        // The Client side may finish before the Server judges the key;
        // either way the key reached the Server's verifier.
        if let Ok(result) = tokio::time::timeout(Duration::from_secs(5), connecting).await {
            if let Ok(conn) = result {
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            }
            refused += 1;
        }
        endpoint.close(0u32.into(), b"");
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = server.events("tunnel_refused");
    eprintln!(
        "{refused} unknown keys in {took:?}: {} tunnel_refused lines",
        lines.len()
    );
    assert!(refused >= 90, "the strangers got through the handshake");
    let bound = 10 + took.as_secs() as usize / 10 + 1;
    assert!(
        !lines.is_empty() && lines.len() <= bound,
        "{} lines (bound {bound})",
        lines.len()
    );
    for l in &lines {
        assert!(l.contains("claimed_identity="), "{l}");
        assert!(
            !l.contains(" identity="),
            "unproven key logged as identity: {l}"
        );
    }
    assert!(
        loud_lines(&server.log_text()).len() <= bound + 2,
        "{}",
        server.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_fighting_over_a_tunnel_replace_at_a_bounded_rate_and_are_logged_once() {
    let _serial = SERIAL.lock().await;
    let (home, server, tunnel, roots) = lone_server();
    let (id, _) =
        runewarp::tls::material::load_client_identity(&home.path().join("identity")).unwrap();
    let config = runewarp::tunnel::transport::client_config(roots, id, Default::default()).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Two instances with the same identity that, unlike the real Client,
    // reconnect at once whenever they are replaced.
    let stop = Arc::new(AtomicBool::new(false));
    let mut peers = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        peers.push(endpoint.local_addr().unwrap());
        let (config, stop) = (config.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut connections = 0;
            while !stop.load(Ordering::Relaxed) {
                let Ok(connecting) = endpoint.connect_with(config.clone(), tunnel, "localhost")
                else {
                    break;
                };
                if let Ok(conn) = connecting.await {
                    connections += 1;
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
                    if conn.close_reason().is_none() {
                        // Still up: wait until it is replaced (or the end).
                        loop {
                            if stop.load(Ordering::Relaxed) {
                                conn.close(0u32.into(), b"done");
                                break;
                            }
                            if tokio::time::timeout(Duration::from_millis(100), conn.closed())
                                .await
                                .is_ok()
                            {
                                break;
                            }
                        }
                    }
                } else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            endpoint.close(0u32.into(), b"");
            connections
        }));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let run = Duration::from_secs(25);
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    let mut handshakes = 0;
    for t in tasks {
        handshakes += t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let installed = server.events("tunnel_connected").len();
    let flapping = server.events("tunnel_flapping");
    eprintln!(
        "{handshakes} handshakes by the pair in {run:?}: {installed} connections installed, \
         {} tunnel_flapping lines",
        flapping.len()
    );
    // One install at the start, then at most one replacement per 10 s.
    assert!(installed >= 3, "the pair should still take turns");
    assert!(
        installed <= 2 + run.as_secs() as usize / 10,
        "{installed} replacements in {run:?}:\n{}",
        server.log_text()
    );
    assert_eq!(flapping.len(), 1, "{}", server.log_text());
    for p in &peers {
        assert!(
            flapping[0].contains(&p.port().to_string()),
            "{} lacks {p}",
            flapping[0]
        );
    }
    // Per installed connection: connected and closed; plus the first
    // replacement and the one flapping line (start-up lines aside).
    let text = server.log_text();
    let tunnel_lines = loud_lines(&text)
        .into_iter()
        .filter(|l| l.contains("event=\"tunnel_"))
        .count();
    assert!(tunnel_lines <= 2 * installed + 2, "{text}");
}
