//! A stuck stream stalls only itself, and stuck or idle streams end: real
//! Server and Client processes on loopback, a TLS backend that can serve a
//! large download, stop reading, or hold a quiet connection, and Visitors
//! that stop reading.
//!
//! - Visitors that stop reading a large download, and a Local backend that
//!   stops reading uploads, do not hold back other Visitors of the same
//!   Tunnel connection (QUIC flow-control windows).
//! - `stream-write-timeout` resets a stream that cannot write, on the Server
//!   (Visitor not reading) and on the Client (backend not reading).
//! - `stream-idle-timeout` closes a stream that moves nothing, on either side.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;

use common::proc::*;

/// What the stuck Visitors ask for.
const BIG: usize = 64 * 1024 * 1024;
/// Visitors that stop reading (or whose uploads the backend stops reading).
const STUCK: usize = 8;

/// What the backend observed.
#[derive(Default)]
struct Seen {
    /// Writes of the large download that failed (the stream was reset).
    download_failures: AtomicUsize,
    /// Held connections that the other side closed.
    holds_closed: AtomicUsize,
    /// Connections that asked the backend to stop reading.
    stalls: AtomicUsize,
}

struct Backend {
    addr: SocketAddr,
    cert: CertificateDer<'static>,
    seen: Arc<Seen>,
}

/// A TLS backend for APP. After the handshake it reads one request:
/// `big` → sends [`BIG`] bytes; `stall` → answers `stalling` and never
/// reads again; `hold` → answers `held` and waits (up to 60 s) for the other
/// side to close; anything else → `backend got "<request>"`.
fn backend() -> Backend {
    let (cert, config) = common::tls::self_signed(&[APP]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (config, seen) = (config.clone(), s.clone());
            std::thread::spawn(move || serve(tcp, config, &seen));
        }
    });
    Backend { addr, cert, seen }
}

fn serve(mut tcp: TcpStream, config: Arc<rustls::ServerConfig>, seen: &Seen) {
    let mut conn = rustls::ServerConnection::new(config).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let mut buf = [0u8; 64];
    let Ok(n) = tls.read(&mut buf) else { return };
    match &buf[..n] {
        b"big" => {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..BIG / chunk.len() {
                if tls.write_all(&chunk).is_err() {
                    seen.download_failures.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
        }
        b"stall" => {
            seen.stalls.fetch_add(1, Ordering::SeqCst);
            let _ = tls.write_all(b"stalling");
            let _ = tls.flush();
            std::thread::sleep(Duration::from_secs(60));
            return;
        }
        b"hold" => {
            let _ = tls.write_all(b"held");
            let _ = tls.flush();
            let _ = tls.sock.set_read_timeout(Some(Duration::from_secs(60)));
            let mut rest = [0u8; 64];
            match tls.read(&mut rest) {
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock) => {}
                _ => {
                    seen.holds_closed.fetch_add(1, Ordering::SeqCst);
                }
            }
            return;
        }
        other => {
            let reply = format!("backend got {:?}", String::from_utf8_lossy(other));
            let _ = tls.write_all(reply.as_bytes());
        }
    }
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

/// A Server and a Client for APP, with `server_extra` and `client_extra`
/// lines in their `[server]` / `[client]` tables, and the tunnel up.
struct Setup {
    home: Home,
    backend: Backend,
    server: Running,
    client: Running,
}

/// Debug logs of Runewarp itself, so per-stream events are visible.
const DEBUG_LOG: &str = "warn,runewarp=debug";

fn setup(server_extra: &str, client_extra: &str) -> Setup {
    let (home, pin) = Home::with_identity();
    let backend = backend();
    let server_toml = home.server_config_with(
        &pin,
        &format!("graceful-shutdown-duration = \"1s\"\n{server_extra}"),
    );
    let client_toml = home.write(
        "client.toml",
        &format!(
            "[client]\nserver-address = \"localhost:{}\"\nserver-trust = \"ca-file\"\n\
             server-ca-file = \"server-certs/server-ca.crt\"\nidentity-dir = \"identity\"\n\
             {client_extra}\n\n[[client.services]]\npublic-hostnames = [\"{APP}\"]\n\
             backend-address = \"{}\"\n",
            home.tunnel, backend.addr
        ),
    );
    let log = Path::new(DEBUG_LOG);
    let server = home.spawn_env(
        "server",
        &server_toml,
        "server.log",
        &[("RUNEWARP_LOG", log)],
    );
    let client = home.spawn_env(
        "client",
        &client_toml,
        "client.log",
        &[("RUNEWARP_LOG", log)],
    );
    visit_until_ok(home.public_addr(), &backend.cert, Duration::from_secs(15));
    Setup {
        home,
        backend,
        server,
        client,
    }
}

/// A TLS Visitor for APP with a small receive buffer (so that not reading
/// closes its TCP window quickly) that sent `request`.
fn visitor(public: SocketAddr, root: &CertificateDer<'static>, request: &[u8]) -> Visitor {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    socket.connect(&public.into()).unwrap();
    let mut tcp: TcpStream = socket.into();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut conn = common::tls::client_conn(APP, std::slice::from_ref(root));
    rustls::Stream::new(&mut conn, &mut tcp)
        .write_all(request)
        .expect("the TLS handshake and request through the tunnel");
    Visitor { conn, tcp }
}

struct Visitor {
    conn: rustls::ClientConnection,
    tcp: TcpStream,
}

impl Visitor {
    fn stream(&mut self) -> rustls::Stream<'_, rustls::ClientConnection, TcpStream> {
        rustls::Stream::new(&mut self.conn, &mut self.tcp)
    }

    /// Read exactly `n` bytes of reply.
    fn read_reply(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        self.stream().read_exact(&mut buf).expect("reply");
        buf
    }

    /// Read until the connection ends; returns the bytes read and how it
    /// ended (`None` if it was still open after the read timeout).
    fn read_to_end(&mut self) -> (usize, Option<std::io::ErrorKind>) {
        let mut total = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.stream().read(&mut buf) {
                Ok(0) => return (total, Some(std::io::ErrorKind::UnexpectedEof)),
                Ok(n) => total += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return (total, None);
                }
                Err(e) => return (total, Some(e.kind())),
            }
        }
    }
}

/// A good Visitor's request, answered while other streams are stuck.
fn good_visit(s: &Setup, what: &str) {
    for i in 0..3 {
        let start = Instant::now();
        let reply = visit(s.home.public_addr(), &s.backend.cert);
        let took = start.elapsed();
        println!("{what}: good Visitor {i} answered in {took:?}: {reply:?}");
        assert_eq!(
            reply.as_deref().ok(),
            Some("backend got \"hello\""),
            "{what}: a good Visitor must be served ({took:?})"
        );
        assert!(took < Duration::from_secs(5), "{what}: {took:?}");
    }
}

#[test]
fn visitors_that_stop_reading_a_download_do_not_stall_the_tunnel() {
    let s = setup("", "");
    let (rss_before, fds_before) = s.server.rss_kib_and_fds();
    let stuck: Vec<Visitor> = (0..STUCK)
        .map(|_| visitor(s.home.public_addr(), &s.backend.cert, b"big"))
        .collect();
    // Let the downloads fill every buffer on the way and stall.
    std::thread::sleep(Duration::from_secs(2));
    let (rss_stuck, _) = s.server.rss_kib_and_fds();
    good_visit(&s, "8 Visitors not reading 64 MiB downloads");
    assert_eq!(
        s.backend.seen.download_failures.load(Ordering::SeqCst),
        0,
        "the stuck downloads are still open (the write deadline is 30 s)"
    );
    // When they leave, the Server lets go of everything they held.
    drop(stuck);
    wait_until(
        "the Server's file descriptors are back to where they were",
        Duration::from_secs(10),
        || s.server.rss_kib_and_fds().1 <= fds_before,
    );
    let (rss_after, fds_after) = s.server.rss_kib_and_fds();
    println!(
        "Server RSS: {rss_before} KiB before, {rss_stuck} KiB with {STUCK} stuck streams, \
         {rss_after} KiB after they left; fds {fds_before} before, {fds_after} after"
    );
}

#[test]
fn a_backend_that_stops_reading_uploads_does_not_stall_the_tunnel() {
    let s = setup("", "");
    let uploads: Vec<_> = (0..STUCK)
        .map(|_| {
            let mut v = visitor(s.home.public_addr(), &s.backend.cert, b"stall");
            assert_eq!(v.read_reply(8), b"stalling");
            std::thread::spawn(move || {
                let chunk = vec![b'u'; 64 * 1024];
                for _ in 0..BIG / chunk.len() {
                    if v.stream().write_all(&chunk).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    assert_eq!(s.backend.seen.stalls.load(Ordering::SeqCst), STUCK);
    // Let the uploads fill every buffer on the way and stall.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        uploads.iter().all(|u| !u.is_finished()),
        "the uploads are stuck, not done"
    );
    good_visit(&s, "8 uploads the backend does not read");
}

/// Wait (15 s at most) until `role` logs a stream aborted for its write
/// deadline; returns how long it took.
fn write_timeout_reset(role: &Running, what: &str) -> Duration {
    wait_until(what, Duration::from_secs(15), || {
        role.events("stream_aborted")
            .iter()
            .any(|l| l.contains("reason=\"write_timeout\""))
    })
}

#[test]
fn server_write_deadline_resets_a_stream_whose_visitor_stops_reading() {
    let s = setup("stream-write-timeout = \"2s\"\n", "");
    let (_, fds_before) = s.server.rss_kib_and_fds();
    let mut stuck = visitor(s.home.public_addr(), &s.backend.cert, b"big");
    let took = write_timeout_reset(&s.server, "the Server resets the stuck stream");
    println!("Server reset the stuck stream after {took:?}");
    // Both ways: the Client reset the backend connection, so the
    // backend's writes fail...
    wait_until(
        "the backend's download is cut",
        Duration::from_secs(10),
        || s.backend.seen.download_failures.load(Ordering::SeqCst) == 1,
    );
    // ...and the Visitor gets a reset, not the rest of the download.
    let (got, end) = stuck.read_to_end();
    println!("stuck Visitor read {got} bytes, then {end:?}");
    assert!(end.is_some(), "the Visitor connection was closed");
    assert!(got < BIG, "the download was cut short");
    // The Server holds nothing for it any more.
    wait_until(
        "the Server's file descriptors are back to where they were",
        Duration::from_secs(5),
        || s.server.rss_kib_and_fds().1 <= fds_before,
    );
    good_visit(&s, "after a write-deadline reset");
}

#[test]
fn client_write_deadline_resets_a_stream_whose_backend_stops_reading() {
    let s = setup("", "stream-write-timeout = \"2s\"\n");
    let mut v = visitor(s.home.public_addr(), &s.backend.cert, b"stall");
    assert_eq!(v.read_reply(8), b"stalling");
    let upload = std::thread::spawn(move || {
        let chunk = vec![b'u'; 64 * 1024];
        let mut sent = 0;
        for _ in 0..BIG / chunk.len() {
            match v.stream().write_all(&chunk) {
                Ok(()) => sent += chunk.len(),
                Err(e) => return (sent, Some(e.kind())),
            }
        }
        (sent, None)
    });
    let took = write_timeout_reset(&s.client, "the Client resets the stuck stream");
    println!("Client reset the stuck stream after {took:?}");
    let (sent, end) = upload.join().unwrap();
    println!("stuck upload sent {sent} bytes, then {end:?}");
    assert!(
        matches!(
            end,
            Some(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
        ),
        "the Visitor's upload is reset, not left hanging: {end:?}"
    );
    good_visit(&s, "after a write-deadline reset on the Client");
}

/// A Visitor whose stream goes quiet after one exchange is closed at the
/// idle deadline (and the backend sees its connection end too).
fn idle_stream_is_closed(s: &Setup, log: &Running) {
    let mut v = visitor(s.home.public_addr(), &s.backend.cert, b"hold");
    assert_eq!(v.read_reply(4), b"held");
    let start = Instant::now();
    let (_, end) = v.read_to_end();
    let took = start.elapsed();
    println!("idle stream closed after {took:?} ({end:?})");
    assert!(end.is_some(), "the idle stream was closed within 10 s");
    assert!(
        took >= Duration::from_millis(1500),
        "not before the deadline"
    );
    wait_until("the backend sees the close", Duration::from_secs(5), || {
        s.backend.seen.holds_closed.load(Ordering::SeqCst) == 1
    });
    assert!(
        log.events("stream_aborted")
            .iter()
            .any(|l| l.contains("reason=\"idle_timeout\"")),
        "logged as idle_timeout"
    );
}

#[test]
fn server_idle_deadline_closes_a_quiet_stream() {
    let s = setup("stream-idle-timeout = \"2s\"\n", "");
    idle_stream_is_closed(&s, &s.server);
}

#[test]
fn client_idle_deadline_closes_a_quiet_stream() {
    let s = setup("", "stream-idle-timeout = \"2s\"\n");
    idle_stream_is_closed(&s, &s.client);
}
