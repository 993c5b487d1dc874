//! The failures operators meet first, on real processes on loopback: each
//! recovers by itself where it can and is explained in one line where it
//! can't.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::proc::*;

#[test]
fn a_server_killed_and_restarted_is_noticed_at_once_and_traffic_flows_within_5s() {
    let (home, pin) = Home::with_identity();
    let backend = tls_backend();
    let server_toml = home.server_config(&pin);
    let client_toml = home.default_client_config(backend.addr);
    let mut server = home.spawn("server", &server_toml, "server-1.log");
    let client = home.spawn("client", &client_toml, "client.log");
    visit_until_ok(home.public_addr(), &backend.cert, Duration::from_secs(15));

    server.stop_with(libc::SIGKILL, Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(500));
    let restarted = Instant::now();
    let _server = home.spawn("server", &server_toml, "server-2.log");
    let took = visit_until_ok(home.public_addr(), &backend.cert, Duration::from_secs(5));
    eprintln!("traffic flowing again {took:?} after the restart");
    // The Client saw the old connection end (stateless reset) rather than
    // waiting out the 60 s idle timeout.
    let closed = client.events("tunnel_closed");
    assert_eq!(closed.len(), 1, "{}", client.log_text());
    assert!(closed[0].contains("reset"), "{}", closed[0]);
    assert!(restarted.elapsed() < Duration::from_secs(5));
}

/// A Client that crashes twice in a row is restarted by its supervisor: the
/// second restart replaces a connection installed a moment ago, which the
/// replacement interval (10 s) would hold back; a dead, silent incumbent
/// must not hold it back.
#[test]
fn a_client_crashing_twice_in_a_row_takes_its_tunnel_back_within_3s() {
    let (home, pin) = Home::with_identity();
    let backend = tls_backend();
    let server = home.spawn("server", &home.server_config(&pin), "server.log");
    let client_toml = home.default_client_config(backend.addr);
    let mut client = home.spawn("client", &client_toml, "client-1.log");
    visit_until_ok(home.public_addr(), &backend.cert, Duration::from_secs(15));
    for round in 2..=3 {
        client.stop_with(libc::SIGKILL, Duration::from_secs(2));
        let restarted = Instant::now();
        client = home.spawn("client", &client_toml, &format!("client-{round}.log"));
        while server.events("tunnel_connected").len() < round {
            assert!(
                restarted.elapsed() < Duration::from_secs(3),
                "restart {round}: the new connection was not installed within 3 s\n{}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "restart {round}: installed {:?} after the restart",
            restarted.elapsed()
        );
    }
    // And it serves.
    visit_until_ok(home.public_addr(), &backend.cert, Duration::from_secs(10));
}

#[test]
fn a_refused_identity_is_explained_and_retried_at_most_6_times_in_30s() {
    let (home, pinned) = Home::with_identity();
    let backend = tls_backend();
    let stranger = home.identity("stranger");
    let server = home.spawn("server", &home.server_config(&pinned), "server.log");
    let client = home.spawn_client("stranger", "server-certs/server-ca.crt", backend.addr);
    std::thread::sleep(Duration::from_secs(30));

    let refused = client.events("tunnel_refused");
    assert!(
        !refused.is_empty() && refused.len() <= 6,
        "{} attempts in 30 s:\n{}",
        refused.len(),
        client.log_text()
    );
    let line = &refused[0];
    assert!(
        line.contains("localhost") && line.contains(&stranger),
        "{line}"
    );
    assert!(
        line.contains("[[server.tunnels]]"),
        "says what to do: {line}"
    );
    // The Server names the pin and where it came from, once per 10 s.
    let server_lines = server.events("tunnel_refused");
    assert!(
        !server_lines.is_empty() && server_lines.len() <= 4,
        "{}",
        server.log_text()
    );
    assert!(
        server_lines[0].contains(&stranger) && server_lines[0].contains("127.0.0.1"),
        "{}",
        server_lines[0]
    );
}

#[test]
fn an_untrusted_server_certificate_names_hostname_trust_mode_ca_file_and_error() {
    let (home, pin) = Home::with_identity();
    let backend = tls_backend();
    // A CA the Server certificate was not issued by.
    home.ok(&server_cert_init("other-ca"));
    let _server = home.spawn("server", &home.server_config(&pin), "server.log");
    let client = home.spawn_client("identity", "other-ca/server-ca.crt", backend.addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        if let Some(l) = client.events("tunnel_refused").into_iter().next() {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            client.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(line.contains("localhost"), "{line}");
    assert!(line.contains("server-trust = \\\"ca-file\\\""), "{line}");
    assert!(line.contains("other-ca/server-ca.crt"), "{line}");
    assert!(
        line.contains("UnknownIssuer") || line.contains("invalid peer certificate"),
        "{line}"
    );
}

#[test]
fn a_toml_typo_is_shown_with_line_and_column() {
    let home = Home::new();
    home.write("typo.toml", "[server]\nhostname \"localhost\"\n");
    let err = stderr_of(home.cmd().args(["server", "-c", "typo.toml"]), 2);
    assert!(err.contains("typo.toml:2:"), "file and line: {err}");
    assert!(
        err.contains("hostname \"localhost\""),
        "the offending line: {err}"
    );
}

#[test]
fn an_unknown_top_level_key_is_rejected_with_a_suggestion() {
    let home = Home::new();
    home.write(
        "unknown.toml",
        "log_level = \"debug\"\n[server]\nhostname = \"localhost\"\n[[server.tunnels]]\n\
         public-hostnames = [\"a.example.com\"]\nclient-identity = \"00000000000000000000000000000000000000000000000000000000000000aa\"\n",
    );
    let err = stderr_of(home.cmd().args(["server", "-c", "unknown.toml"]), 2);
    assert!(
        err.contains("log_level") && err.contains("did you mean \"log-level\""),
        "{err}"
    );
}

#[test]
fn a_thousand_probes_produce_only_a_handful_of_info_lines() {
    let (home, pin) = Home::with_identity();
    let mut server = home.spawn("server", &home.server_config(&pin), "server.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(home.public_addr()).is_err() {
        assert!(Instant::now() < deadline, "server never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = server.log_text().lines().count();
    for i in 0..1000 {
        let mut tcp = TcpStream::connect(home.public_addr()).unwrap();
        if i % 2 == 0 {
            // Garbage instead of a ClientHello.
            let _ = std::io::Write::write_all(&mut tcp, b"GET / HTTP/1.0\r\n\r\n");
        }
        // ...or connect and close at once.
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = server.log_text();
    let added = after.lines().count() - before;
    // One notice per kind of drop (not TLS, closed at once, over the
    // per-source intake share) and one saturation warning.
    assert!(added <= 5, "{added} log lines for 1,000 probes:\n{after}");
    assert!(server.child.try_wait().unwrap().is_none(), "still running");
    // ...but the first of each kind is said at once, with what to check.
    let noticed = server.events("visitor_drop_noticed");
    let plain = noticed
        .iter()
        .find(|l| l.contains("reason=\"not_tls\""))
        .unwrap_or_else(|| panic!("no not_tls notice:\n{after}"));
    assert!(plain.contains("plain HTTP"), "{plain}");
    // A Server that stops before the minute is up still writes its summary.
    let (status, _) = server.stop_with(libc::SIGTERM, Duration::from_secs(5));
    assert!(status.success());
    let summary = server.events("visitors_dropped");
    assert_eq!(summary.len(), 1, "{}", server.log_text());
    // Every probe is in it (plus the connects that waited for the port).
    let total: u64 = summary[0]
        .split("total=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    assert!(total >= 1000, "{}", summary[0]);
    assert!(summary[0].contains("not_tls:"), "{}", summary[0]);
}

#[test]
fn a_stopped_backend_closes_the_visitor_at_once_and_is_logged_once() {
    let (home, pin) = Home::with_identity();
    let backend = tls_backend();
    let _server = home.spawn("server", &home.server_config(&pin), "server.log");
    // A backend address nothing listens on.
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], free_tcp()));
    let client_toml =
        home.client_config("dead.toml", "identity", "server-certs/server-ca.crt", dead);
    let client = home.spawn("client", &client_toml, "client.log");
    client.wait_event("tunnel_connected", Duration::from_secs(10));
    for _ in 0..20 {
        let start = Instant::now();
        let result = visit(home.public_addr(), &backend.cert);
        assert!(result.is_err(), "no backend, no reply: {result:?}");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "Visitor closed after {:?}",
            start.elapsed()
        );
    }
    let lines = client.events("backend_unreachable");
    assert_eq!(lines.len(), 1, "rate-limited:\n{}", client.log_text());
    assert!(
        lines[0].contains(&dead.to_string()) && lines[0].contains(APP),
        "{}",
        lines[0]
    );
}
