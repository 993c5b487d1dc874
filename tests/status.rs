//! `runewarp server status` / `runewarp client status` against real
//! processes, through their control sockets: text and `--json`, the
//! socket's permissions, state changes as peers come and go, and a clear
//! error when nothing runs.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use common::proc::*;
use serde_json::Value;

fn status_json(home: &Home, role: &str, config: &str) -> Value {
    let out = home.ok(&[role, "status", "-c", config, "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn status_shows_tunnels_services_and_their_traffic_from_the_running_processes() {
    let (home, pin) = Home::with_identity();
    let backend = tls_backend();
    // The Server's socket is set in the file; the Client uses the default.
    let server_toml = home.server_config_with(
        &pin,
        "graceful-shutdown-duration = \"1s\"\ncontrol-socket = \"run/server.sock\"\n",
    );
    let client_toml = home.default_client_config(backend.addr);
    let server_sock = home.path().join("run/server.sock");
    let client_sock = home.path().join(".local/state/runewarp/client.sock");

    let mut server = home.spawn("server", &server_toml, "server.log");
    wait_until("server socket", Duration::from_secs(15), || {
        server.assert_running();
        server_sock.exists()
    });
    let s = status_json(&home, "server", "server.toml");
    assert_eq!(s["tunnels"][0]["state"], "not_connected", "{s}");

    let mut client = home.spawn("client", &client_toml, "client.log");
    visit_until_ok(home.public_addr(), &backend.cert, Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(200));

    // Only the owner may connect.
    for sock in [&server_sock, &client_sock] {
        let meta = std::fs::metadata(sock).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{}",
            sock.display()
        );
        assert_eq!(meta.uid(), unsafe { libc::geteuid() });
    }

    let s = status_json(&home, "server", "server.toml");
    let t = &s["tunnels"][0];
    assert_eq!(s["role"], "server");
    assert_eq!(s["hostname"], "localhost");
    assert_eq!(t["name"], APP);
    assert_eq!(t["state"], "connected", "{s}");
    assert_eq!(t["identity"], pin.as_str());
    assert!(t["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{s}");
    assert_eq!(t["streams_total"], 1, "{s}");
    assert!(t["bytes_to_visitor"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["certificates"][0]["hostname"], "localhost", "{s}");
    let days = (s["certificates"][0]["not_after"].as_i64().unwrap()
        - s["started_at"].as_i64().unwrap())
        / 86_400;
    assert!(days > 30, "{s}");

    let text = home.ok(&["server", "status", "-c", "server.toml"]);
    assert!(
        text.contains(&format!("tunnel {APP}: connected from 127.0.0.1:")),
        "{text}"
    );
    assert!(text.contains("1 total"), "{text}");
    assert!(text.contains("certificate localhost expires"), "{text}");

    let c = status_json(&home, "client", "client.toml");
    assert_eq!(c["role"], "client");
    assert_eq!(c["identity"], pin.as_str());
    assert_eq!(c["tunnel"]["state"], "connected", "{c}");
    assert_eq!(c["tunnel"]["connections"], 1, "{c}");
    assert!(c["tunnel"]["rtt_ms"].as_f64().unwrap() > 0.0, "{c}");
    // The path: packets went out (a stream was served), none lost on
    // loopback, and a window and MTU an operator can compare.
    let path = &c["tunnel"]["path"];
    assert!(path["sent_packets"].as_u64().unwrap() > 0, "{c}");
    assert_eq!(path["lost_packets"], 0, "{c}");
    assert!(path["congestion_window"].as_u64().unwrap() > 0, "{c}");
    assert!(path["mtu"].as_u64().unwrap() >= 1200, "{c}");
    assert_eq!(c["services"][0]["name"], APP);
    assert_eq!(c["services"][0]["streams_total"], 1, "{c}");
    assert!(
        c["services"][0]["bytes_from_backend"].as_u64().unwrap() > 0,
        "{c}"
    );
    let text = home.ok(&["client", "status", "-c", "client.toml"]);
    assert!(text.contains("tunnel: connected to 127.0.0.1:"), "{text}");
    assert!(
        text.contains(" packets (0 congestion events), window "),
        "{text}"
    );
    assert!(
        text.contains(&format!("service {APP}: passthrough to {}", backend.addr)),
        "{text}"
    );

    // The Server goes away: the Client says what it waits for.
    server.stop_with(libc::SIGTERM, Duration::from_secs(5));
    assert!(!server_sock.exists(), "the socket is removed on exit");
    wait_until("client waiting", Duration::from_secs(15), || {
        status_json(&home, "client", "client.toml")["tunnel"]["state"] == "waiting"
    });
    let text = home.ok(&["client", "status", "-c", "client.toml"]);
    assert!(text.contains("tunnel: not connected: "), "{text}");
    assert!(text.contains("next attempt in"), "{text}");

    // Nothing answers: exit 1 naming the socket.
    let err = stderr_of(
        home.cmd().args(["server", "status", "-c", "server.toml"]),
        1,
    );
    assert!(err.contains("no running server answers at"), "{err}");
    assert!(err.contains("run/server.sock"), "{err}");

    client.stop_with(libc::SIGTERM, Duration::from_secs(5));
    assert!(!client_sock.exists());
}

#[test]
fn a_second_instance_leaves_the_first_ones_socket_alone() {
    let (home, pin) = Home::with_identity();
    let backend = tls_backend();
    home.server_config(&pin);
    let client_toml = home.default_client_config(backend.addr);
    let sock = home.path().join(".local/state/runewarp/client.sock");
    let first = home.spawn("client", &client_toml, "first.log");
    wait_until("first socket", Duration::from_secs(15), || sock.exists());
    let second = home.spawn("client", &client_toml, "second.log");
    second.wait_event("control_socket_in_use", Duration::from_secs(15));
    let c = status_json(&home, "client", "client.toml");
    assert_eq!(c["pid"], first.pid(), "{c}");
    drop(second);
    drop(first);
}
