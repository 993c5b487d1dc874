//! How the real processes start, stop and survive abuse, as systemd and
//! operators see it: readiness and sd_notify, graceful drain, fast stop,
//! a Client killed mid-stream, and a garbage flood that leaves no leak.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::proc::*;

fn recv_state(sock: &UnixDatagram, within: Duration) -> String {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("a notification");
    String::from_utf8_lossy(&buf[..n]).to_string()
}

/// A Client with the identity in `identity_dir`, a readiness listener and
/// a NOTIFY_SOCKET, once it has sent READY=1; returns it, the notify
/// socket and the readiness address.
fn notifying_client(
    home: &Home,
    identity_dir: &str,
    backend: &Backend,
) -> (Running, UnixDatagram, std::net::SocketAddr) {
    let sock_path = home.path().join("client-notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let ready = std::net::SocketAddr::from(([127, 0, 0, 1], free_tcp()));
    let client_toml = client_config_with_readiness(home, identity_dir, backend.addr, ready);
    let client = home.spawn_env(
        "client",
        &client_toml,
        "client.log",
        &[("NOTIFY_SOCKET", &sock_path)],
    );
    assert_eq!(recv_state(&sock, Duration::from_secs(10)), "READY=1");
    (client, sock, ready)
}

#[test]
fn readiness_and_sd_notify_follow_the_server_and_client_lifecycle() {
    let (home, pin) = Home::with_identity();
    let backend = tls_backend();
    let ready_port = free_tcp();
    let server_toml = home.server_config_with(
        &pin,
        &format!("readiness-bind-address = \"127.0.0.1:{ready_port}\"\ngraceful-shutdown-duration = \"1s\"\n"),
    );
    let server_sock_path = home.path().join("server-notify.sock");
    let server_sock = UnixDatagram::bind(&server_sock_path).unwrap();
    let mut server = home.spawn_env(
        "server",
        &server_toml,
        "server.log",
        &[("NOTIFY_SOCKET", &server_sock_path)],
    );
    assert_eq!(recv_state(&server_sock, Duration::from_secs(10)), "READY=1");
    let ready = std::net::SocketAddr::from(([127, 0, 0, 1], ready_port));
    TcpStream::connect(ready).expect("readiness accepts while the Server admits work");

    // The Client is READY once it runs and dials; its readiness listener
    // accepts once the Tunnel is up.
    let (mut client, client_sock, client_ready) = notifying_client(&home, "identity", &backend);
    client.wait_event("tunnel_connected", Duration::from_secs(15));
    wait_until(
        "the Client's readiness listener accepts once connected",
        Duration::from_secs(5),
        || TcpStream::connect(client_ready).is_ok(),
    );
    assert_eq!(
        visit(home.public_addr(), &backend.cert).unwrap(),
        "backend got \"hello\""
    );

    let (status, took) = client.stop_with(libc::SIGTERM, Duration::from_secs(3));
    assert!(
        status.success() && took < Duration::from_secs(2),
        "client {status:?} after {took:?}"
    );
    assert_eq!(
        recv_state(&client_sock, Duration::from_secs(1)),
        "STOPPING=1"
    );

    server.signal(libc::SIGTERM);
    assert_eq!(
        recv_state(&server_sock, Duration::from_secs(2)),
        "STOPPING=1"
    );
    wait_until(
        "readiness closes when shutdown starts",
        Duration::from_secs(1),
        || TcpStream::connect(ready).is_err(),
    );
    let (status, _) = server.wait_exit(Duration::from_secs(5));
    assert!(status.success());
}

/// `client.toml` for APP through `backend` with identity `identity_dir`
/// and `readiness-bind-address = ready`.
fn client_config_with_readiness(
    home: &Home,
    identity_dir: &str,
    backend: std::net::SocketAddr,
    ready: std::net::SocketAddr,
) -> std::path::PathBuf {
    let path = home.client_config(
        "client.toml",
        identity_dir,
        "server-certs/server-ca.crt",
        backend,
    );
    let text = std::fs::read_to_string(&path).unwrap().replacen(
        "[client]\n",
        &format!("[client]\nreadiness-bind-address = \"{ready}\"\n"),
        1,
    );
    home.write("client.toml", &text)
}

/// A first deploy: the Server does not know the Client's pin yet. The
/// Client still reports READY=1 (so `systemctl start` and `nixos-rebuild
/// switch` return), logs the refusal, keeps running and dialling, and its
/// readiness listener stays closed.
#[test]
fn client_is_ready_while_the_server_refuses_it_but_its_readiness_stays_closed() {
    let home = Home::new();
    let backend = tls_backend();
    home.server_material();
    let pinned = home.identity("pinned");
    home.identity("fresh");
    let server_toml = home.server_config(&pinned);
    let _server = home.spawn("server", &server_toml, "server.log");

    let (mut client, _sock, ready) = notifying_client(&home, "fresh", &backend);
    client.wait_event("tunnel_refused", Duration::from_secs(15));
    assert!(
        client.child.try_wait().unwrap().is_none(),
        "the refused Client keeps running"
    );
    assert!(
        TcpStream::connect(ready).is_err(),
        "readiness accepted without a Tunnel connection"
    );
    assert!(client.events("tunnel_connected").is_empty());
    let (status, _) = client.stop_with(libc::SIGTERM, Duration::from_secs(3));
    assert!(status.success(), "client {status:?}");
}

/// A Server and Client for APP with `graceful` drain window, plus a slow
/// backend (20 KiB over 2 s).
fn slow_setup(home: &Home, graceful: &str) -> (Running, Running, Backend) {
    let backend = slow_tls_backend(20, Duration::from_millis(100));
    home.server_material();
    let pin = home.identity("identity");
    let server_toml = home.server_config_with(
        &pin,
        &format!("graceful-shutdown-duration = \"{graceful}\"\n"),
    );
    let client_toml = home.default_client_config(backend.addr);
    let server = home.spawn("server", &server_toml, "server.log");
    let client = home.spawn("client", &client_toml, "client.log");
    client.wait_event("tunnel_connected", Duration::from_secs(15));
    (server, client, backend)
}

/// Read the slow download to its end; returns bytes and whether it ended
/// cleanly (TLS close_notify) rather than by error.
fn download(conn: rustls::ClientConnection, mut tcp: TcpStream) -> (usize, bool) {
    let mut conn = conn;
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let mut got = Vec::new();
    let clean = tls.read_to_end(&mut got).is_ok();
    (got.len(), clean)
}

/// [`slow_setup`] with a Visitor's download under way for 300 ms; returns
/// the Server, the Client and the download's thread.
fn downloading(
    home: &Home,
    graceful: &str,
) -> (Running, Running, std::thread::JoinHandle<(usize, bool)>) {
    let (server, client, backend) = slow_setup(home, graceful);
    let (conn, tcp) = open_visit(home.public_addr(), &backend.cert).unwrap();
    let reader = std::thread::spawn(move || download(conn, tcp));
    std::thread::sleep(Duration::from_millis(300));
    (server, client, reader)
}

#[test]
fn graceful_shutdown_lets_a_download_finish_and_refuses_new_visitors_at_once() {
    let home = Home::new();
    let (mut server, _client, reader) = downloading(&home, "5s");

    let stop = Instant::now();
    server.signal(libc::SIGTERM);
    wait_until("public listener closed", Duration::from_millis(500), || {
        TcpStream::connect(home.public_addr()).is_err()
    });
    let (bytes, clean) = reader.join().unwrap();
    assert_eq!(bytes, 20 * 1024, "the in-flight download completes");
    assert!(clean);
    let (status, _) = server.wait_exit(Duration::from_secs(7));
    let took = stop.elapsed();
    assert!(status.success());
    assert!(
        took < Duration::from_secs(5 + 2),
        "exit within window + 2 s, took {took:?}"
    );
    let stopped = server.events("server_stopped");
    assert!(stopped[0].contains("drained=true"), "{}", stopped[0]);
}

#[test]
fn a_second_signal_stops_at_once_cutting_the_drain_short() {
    let home = Home::new();
    let (mut server, _client, reader) = downloading(&home, "60s");
    server.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    // The first signal says, once, what it is waiting for and how to stop.
    let draining = server.events("server_draining");
    assert_eq!(draining.len(), 1, "{}", server.log_text());
    assert!(
        draining[0].contains("up to 60 s") && draining[0].contains("Ctrl-C again"),
        "{}",
        draining[0]
    );
    let (status, took) = server.stop_with(libc::SIGTERM, Duration::from_secs(3));
    assert!(status.success());
    assert!(took < Duration::from_secs(2), "fast stop took {took:?}");
    let (bytes, _) = reader.join().unwrap();
    assert!(bytes < 20 * 1024, "the download was cut, got {bytes}");
}

#[test]
fn a_client_killed_mid_stream_resets_the_visitor_and_the_next_client_is_served() {
    let home = Home::new();
    let (_server, mut client, backend) = slow_setup(&home, "1s");
    let (conn, tcp) = open_visit(home.public_addr(), &backend.cert).unwrap();
    let reader = std::thread::spawn(move || download(conn, tcp));
    std::thread::sleep(Duration::from_millis(300));
    client.stop_with(libc::SIGKILL, Duration::from_secs(2));
    let (bytes, clean) = reader.join().unwrap();
    assert!(
        !clean && bytes < 20 * 1024,
        "the Visitor sees a reset, not a clean end ({bytes} bytes)"
    );

    let client_toml = home.path().join("client.toml");
    let next = home.spawn("client", &client_toml, "client-2.log");
    next.wait_event("tunnel_connected", Duration::from_secs(10));
    let (conn, tcp) = open_visit(home.public_addr(), &backend.cert).unwrap();
    let (bytes, clean) = download(conn, tcp);
    assert!(clean && bytes == 20 * 1024);
}

#[test]
fn a_garbage_flood_leaves_no_memory_or_descriptor_behind() {
    let (home, pin) = Home::with_identity();
    let server = home.spawn("server", &home.server_config(&pin), "server.log");
    wait_until("listening", Duration::from_secs(10), || {
        TcpStream::connect(home.public_addr()).is_ok()
    });
    // Warm up allocator pools with a first small wave, then take the idle
    // figure.
    flood(&home, 200);
    std::thread::sleep(Duration::from_millis(500));
    let (idle_rss, idle_fds) = server.rss_kib_and_fds();

    flood(&home, 5000);
    // Truncated ClientHellos wait for the 5 s deadline; give them time.
    std::thread::sleep(Duration::from_secs(7));
    let (rss, fds) = server.rss_kib_and_fds();
    eprintln!(
        "idle {idle_rss} KiB / {idle_fds} fds; after 5,000 garbage connections {rss} KiB / {fds} fds"
    );
    assert!(fds <= idle_fds + 2, "descriptor leak: {idle_fds} -> {fds}");
    assert!(
        rss as f64 <= idle_rss as f64 * 1.2,
        "RSS {idle_rss} -> {rss} KiB"
    );
    assert!(server.events("panic").is_empty() && !server.log_text().contains("panicked"));
}

/// `n` connections from many loopback addresses sending random bytes or
/// a truncated ClientHello, then closing.
fn flood(home: &Home, n: usize) {
    let hello_start = [
        0x16u8, 0x03, 0x01, 0x00, 0x80, 0x01, 0x00, 0x00, 0x7c, 0x03, 0x03,
    ];
    let addr = home.public_addr();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                for i in (t..n).step_by(8) {
                    let Ok(mut tcp) = TcpStream::connect(addr) else {
                        continue;
                    };
                    let bytes: Vec<u8> = if i % 2 == 0 {
                        (0..64).map(|j| (i * 31 + j * 7) as u8).collect()
                    } else {
                        hello_start.to_vec()
                    };
                    let _ = std::io::Write::write_all(&mut tcp, &bytes);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
