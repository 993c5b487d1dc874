//! `metrics-bind-address`: the real Server and Client processes serve
//! `/metrics`; counters move with real traffic, and nothing a Visitor
//! sends becomes a label.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proc::*;
use rustls::pki_types::ServerName;

/// GET `path` over plain HTTP/1.1; returns (status line, body).
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = get(addr, "/metrics");
    assert!(status.contains(" 200 "), "{status}");
    body
}

/// Wait until `/metrics` answers.
fn scrape_when_up(addr: SocketAddr) -> String {
    let start = Instant::now();
    loop {
        if TcpStream::connect(addr).is_ok() {
            return scrape(addr);
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no /metrics at {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of the series `name{labels}` (exact text before the value).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// A TLS Visitor naming `sni`, which the Server drops unrouted.
fn visit_unrouted(public: SocketAddr, sni: &str) {
    runewarp::tls::install_crypto_provider();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(sni.to_string()).unwrap(),
    )
    .unwrap();
    let mut tcp = TcpStream::connect(public).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let _ = tls.write_all(b"hello");
    let mut buf = [0u8; 16];
    assert!(
        !matches!(tls.read(&mut buf), Ok(n) if n > 0),
        "an unrouted Visitor gets no reply"
    );
}

const TUNNEL: &str = "tunnel=\"app.runewarp.test\"";
const SERVICE: &str = "service=\"app.runewarp.test\"";

#[test]
fn metrics_count_real_traffic_and_never_label_visitor_input() {
    let (home, pin) = Home::with_identity();
    let backend = tls_backend();
    let server_metrics = SocketAddr::from(([127, 0, 0, 1], free_tcp()));
    let client_metrics = SocketAddr::from(([127, 0, 0, 1], free_tcp()));
    let server_toml = home.server_config_with(
        &pin,
        &format!(
            "graceful-shutdown-duration = \"1s\"\nmetrics-bind-address = \"{server_metrics}\"\n"
        ),
    );
    let client_toml = home.default_client_config(backend.addr);
    let text = std::fs::read_to_string(&client_toml).unwrap().replace(
        "[[client.services]]",
        &format!("metrics-bind-address = \"{client_metrics}\"\n\n[[client.services]]"),
    );
    std::fs::write(&client_toml, text).unwrap();

    let mut server = home.spawn("server", &server_toml, "server.log");
    let before = scrape_when_up(server_metrics);
    assert_eq!(
        value(&before, &format!("runewarp_tunnel_connected{{{TUNNEL}}}")),
        0.0
    );
    assert_eq!(
        value(
            &before,
            &format!("runewarp_tunnel_streams_total{{{TUNNEL}}}")
        ),
        0.0
    );
    let mut client = home.spawn("client", &client_toml, "client.log");
    visit_until_ok(home.public_addr(), &backend.cert, Duration::from_secs(15));

    let s0 = scrape(server_metrics);
    let c0 = scrape_when_up(client_metrics);
    const VISITS: usize = 5;
    for _ in 0..VISITS {
        assert_eq!(
            visit(home.public_addr(), &backend.cert).unwrap(),
            "backend got \"hello\""
        );
    }
    let unrouted = "never-configured-7f3a.example";
    visit_unrouted(home.public_addr(), unrouted);
    // Streams end (and their bytes are counted) just after the reply.
    std::thread::sleep(Duration::from_millis(300));
    let s1 = scrape(server_metrics);
    let c1 = scrape(client_metrics);

    let delta = |a: &str, b: &str, series: &str| value(b, series) - value(a, series);
    let streams = format!("runewarp_tunnel_streams_total{{{TUNNEL}}}");
    assert_eq!(delta(&s0, &s1, &streams), VISITS as f64, "{s1}");
    let to_visitor = format!("runewarp_tunnel_bytes_total{{{TUNNEL},direction=\"to_visitor\"}}");
    assert!(delta(&s0, &s1, &to_visitor) > 0.0, "{s1}");
    let to_client = format!("runewarp_tunnel_bytes_total{{{TUNNEL},direction=\"to_client\"}}");
    assert!(delta(&s0, &s1, &to_client) > 0.0, "{s1}");
    let accepted = "runewarp_visitors_accepted_total";
    assert_eq!(delta(&s0, &s1, accepted), VISITS as f64 + 1.0, "{s1}");
    assert_eq!(
        value(
            &s1,
            "runewarp_visitors_dropped_total{reason=\"unknown_hostname\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&s1, &format!("runewarp_tunnel_connected{{{TUNNEL}}}")),
        1.0
    );
    assert_eq!(
        value(
            &s1,
            &format!("runewarp_tunnel_connections_total{{{TUNNEL},event=\"connected\"}}")
        ),
        1.0
    );
    assert!(value(&s1, "runewarp_tunnel_handshake_duration_seconds_count") >= 1.0);
    assert!(
        value(
            &s1,
            "runewarp_certificate_expiry_timestamp_seconds{hostname=\"localhost\"}"
        ) > 1.0e9
    );
    assert!(value(&s1, "runewarp_process_start_time_seconds") > 1.0e9);
    assert!(s1.contains("runewarp_build_info{"), "{s1}");
    assert!(
        s1.contains("runewarp_admission_saturated{scope=\"routed_streams\"} 0"),
        "{s1}"
    );
    // The Visitor's SNI is nowhere: not a label, not a value.
    assert!(!s1.contains(unrouted), "{s1}");
    assert!(!s1.contains("never-configured"), "{s1}");

    let cs = format!("runewarp_client_service_streams_total{{{SERVICE}}}");
    assert_eq!(delta(&c0, &c1, &cs), VISITS as f64, "{c1}");
    let from_backend =
        format!("runewarp_client_service_bytes_total{{{SERVICE},direction=\"from_backend\"}}");
    assert!(delta(&c0, &c1, &from_backend) > 0.0, "{c1}");
    let connects = format!("runewarp_client_backend_connect_duration_seconds_count{{{SERVICE}}}");
    assert_eq!(delta(&c0, &c1, &connects), VISITS as f64, "{c1}");
    assert_eq!(value(&c1, "runewarp_client_tunnel_connected"), 1.0);
    assert_eq!(value(&c1, "runewarp_client_tunnel_connections_total"), 1.0);
    assert!(
        value(&c1, "runewarp_client_tunnel_rtt_seconds") > 0.0,
        "{c1}"
    );
    assert!(!c1.contains(unrouted), "{c1}");

    // Only /metrics is served.
    assert!(get(server_metrics, "/").0.contains(" 404 "));

    // The Client going away is seen by the Server's gauge.
    client.stop_with(libc::SIGTERM, Duration::from_secs(5));
    let start = Instant::now();
    while value(
        &scrape(server_metrics),
        &format!("runewarp_tunnel_connected{{{TUNNEL}}}"),
    ) != 0.0
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "tunnel still connected"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server.stop_with(libc::SIGTERM, Duration::from_secs(5));
}

#[test]
fn metrics_are_off_by_default() {
    let (home, pin) = Home::with_identity();
    let server_toml = home.server_config(&pin);
    let effective = home.ok(&["config", "check", "--role", "server", "-c", "server.toml"]);
    assert!(!effective.contains("metrics-bind-address"), "{effective}");
    let mut server = home.spawn("server", &server_toml, "server.log");
    let started = &server.wait_event("server_started", Duration::from_secs(10))[0];
    assert!(started.contains(" metrics=- "), "{started}");
    server.stop_with(libc::SIGTERM, Duration::from_secs(5));
}
