//! Live reload of the real Server process (SIGHUP): a bad file changes
//! nothing; a new hostname and a new Tunnel route at once while a
//! download on an untouched Tunnel completes; a removed pin disconnects
//! its Client.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use common::proc::*;
use rustls::pki_types::CertificateDer;

const NEW: &str = "new.runewarp.test";
const OTHER: &str = "other.runewarp.test";
const DOWNLOAD_KIB: usize = 40;

/// A TLS backend for APP, NEW and OTHER: `slow` gets DOWNLOAD_KIB KiB over
/// about 2 s, anything else a short reply.
fn backend() -> (SocketAddr, CertificateDer<'static>) {
    tagged_backend(b"ok")
}

/// [`backend`] answering `tag` to short requests.
fn tagged_backend(tag: &'static [u8]) -> (SocketAddr, CertificateDer<'static>) {
    let (cert, config) = common::tls::self_signed(&[APP, NEW, OTHER]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut tcp in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let mut conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
                let mut buf = [0u8; 16];
                let Ok(n) = tls.read(&mut buf) else { return };
                if &buf[..n] == b"slow" {
                    for _ in 0..DOWNLOAD_KIB {
                        if tls.write_all(&[b'x'; 1024]).is_err() {
                            return;
                        }
                        let _ = tls.flush();
                        std::thread::sleep(Duration::from_millis(50));
                    }
                } else {
                    let _ = tls.write_all(tag);
                }
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    (addr, cert)
}

/// One request as `sni`; the whole reply.
fn get(
    public: SocketAddr,
    sni: &str,
    root: &CertificateDer<'static>,
    req: &[u8],
) -> std::io::Result<Vec<u8>> {
    let roots = std::slice::from_ref(root);
    let (mut conn, mut tcp) = common::tls::connect(public, sni, roots, Duration::from_secs(10))?;
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    tls.write_all(req)?;
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) if !out.is_empty() => Ok(out),
        Ok(_) => Err(std::io::Error::other("no reply")),
        Err(e) => Err(e),
    }
}

fn server_toml(home: &Home, tunnels: &[(&[&str], &str)]) -> String {
    let mut text = format!(
        "[server]\nhostname = \"localhost\"\npublic-bind-address = \"127.0.0.1:{}\"\n\
         tunnel-bind-address = \"127.0.0.1:{}\"\ncert-dir = \"server-certs\"\n\
         graceful-shutdown-duration = \"1s\"\n",
        home.public, home.tunnel
    );
    for (hosts, pin) in tunnels {
        let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
        text += &format!(
            "\n[[server.tunnels]]\npublic-hostnames = [{}]\nclient-identity = \"{pin}\"\n",
            hosts.join(", ")
        );
    }
    text
}

/// A Client with one catch-all Service to `backend`.
/// Write `server.toml` for `tunnels` and start the Server on it.
fn start_server(home: &Home, tunnels: &[(&[&str], &str)]) -> Running {
    home.write("server.toml", &server_toml(home, tunnels));
    home.spawn("server", &home.path().join("server.toml"), "server.log")
}

/// Wait (15 s at most) until `host` answers at the Server's public address;
/// that address.
fn wait_routed(home: &Home, host: &str, root: &CertificateDer<'static>) -> SocketAddr {
    let public = home.public_addr();
    wait_until(&format!("{host} routes"), Duration::from_secs(15), || {
        get(public, host, root, b"hi").is_ok()
    });
    public
}

fn catch_all(home: &Home, name: &str, identity: &str, backend: SocketAddr) -> std::path::PathBuf {
    home.write(
        name,
        &format!(
            "[client]\nserver-address = \"localhost:{}\"\nserver-trust = \"ca-file\"\n\
             server-ca-file = \"server-certs/server-ca.crt\"\nidentity-dir = \"{identity}\"\n\
             control-socket = \"{identity}.sock\"\n\n\
             [[client.services]]\nbackend-address = \"{backend}\"\n",
            home.tunnel
        ),
    )
}

#[test]
fn sighup_applies_a_valid_config_as_a_diff_and_ignores_a_bad_one() {
    let home = Home::new();
    let (backend, root) = backend();
    home.server_material();
    let pin1 = home.identity("id1");
    let pin2 = home.identity("id2");
    let mut server = start_server(&home, &[(&[APP], &pin1)]);
    let c1 = catch_all(&home, "c1.toml", "id1", backend);
    let mut client1 = home.spawn("client", &c1, "c1.log");
    let public = wait_routed(&home, APP, &root);
    assert!(
        get(public, NEW, &root, b"hi").is_err(),
        "NEW is not routed yet"
    );

    // A download on APP's Tunnel runs through every reload below.
    let r = root.clone();
    let download = std::thread::spawn(move || get(public, APP, &r, b"slow"));

    // A bad file: one line, nothing changes.
    home.write(
        "server.toml",
        "[server]\nhostname = \"localhost\"\n[[server.tunnels]]\npublic-hostnames = [\"a*.b\"]\n",
    );
    server.signal(libc::SIGHUP);
    server.wait_event("reload_failed", Duration::from_secs(5));
    assert_eq!(server.events("reload_failed").len(), 1);
    assert!(
        server.events("reload_failed")[0].contains("a*.b"),
        "{}",
        server.log_text()
    );
    assert_eq!(get(public, APP, &root, b"hi").unwrap(), b"ok");

    // NEW joins APP's Tunnel, and a second Tunnel appears for pin2.
    home.write(
        "server.toml",
        &server_toml(&home, &[(&[APP, NEW], &pin1), (&[OTHER], &pin2)]),
    );
    server.signal(libc::SIGHUP);
    let routed_in = wait_until("NEW routes", Duration::from_secs(3), || {
        get(public, NEW, &root, b"hi").is_ok()
    });
    eprintln!("a new hostname routed {routed_in:?} after SIGHUP");
    let reloaded = server.events("config_reloaded");
    assert_eq!(reloaded.len(), 1, "{}", server.log_text());
    for field in [
        "tunnels_added=other.runewarp.test",
        "hostnames_added=2",
        "pins_added=1",
        "disconnected=0",
    ] {
        assert!(reloaded[0].contains(field), "{field}: {}", reloaded[0]);
    }
    let c2 = catch_all(&home, "c2.toml", "id2", backend);
    let mut client2 = home.spawn("client", &c2, "c2.log");
    wait_until(
        "the new pin connects and OTHER routes",
        Duration::from_secs(10),
        || get(public, OTHER, &root, b"hi").is_ok(),
    );

    // The download on the untouched Tunnel completed, on its first connection.
    let body = download.join().unwrap().expect("download completes");
    assert_eq!(body.len(), DOWNLOAD_KIB * 1024);
    assert_eq!(client1.events("tunnel_connected").len(), 1);

    // pin2's Tunnel removed: its Client is disconnected, OTHER stops routing.
    home.write("server.toml", &server_toml(&home, &[(&[APP, NEW], &pin1)]));
    server.signal(libc::SIGHUP);
    wait_until("OTHER unrouted", Duration::from_secs(3), || {
        get(public, OTHER, &root, b"hi").is_err()
    });
    client2.wait_event("tunnel_closed", Duration::from_secs(5));
    let disconnecting = server.events("tunnel_disconnecting");
    assert_eq!(disconnecting.len(), 1, "{}", server.log_text());
    assert!(disconnecting[0].contains(&pin2), "{}", disconnecting[0]);
    assert!(server.events("config_reloaded")[1].contains("tunnels_removed=other.runewarp.test"));
    assert_eq!(get(public, NEW, &root, b"hi").unwrap(), b"ok");
    assert_eq!(client1.events("tunnel_connected").len(), 1);

    client2.stop_with(libc::SIGTERM, Duration::from_secs(5));
    client1.stop_with(libc::SIGTERM, Duration::from_secs(5));
    server.stop_with(libc::SIGTERM, Duration::from_secs(5));
}

/// A Client with passthrough Services `(hostname, backend)`.
fn services(home: &Home, list: &[(&str, SocketAddr)]) -> std::path::PathBuf {
    let mut text = format!(
        "[client]\nserver-address = \"localhost:{}\"\nserver-trust = \"ca-file\"\n\
         server-ca-file = \"server-certs/server-ca.crt\"\nidentity-dir = \"id1\"\n",
        home.tunnel
    );
    for (host, backend) in list {
        text += &format!(
            "\n[[client.services]]\npublic-hostnames = [\"{host}\"]\nbackend-address = \"{backend}\"\n"
        );
    }
    home.write("client.toml", &text)
}

#[test]
fn client_sighup_replaces_services_without_reconnecting() {
    let home = Home::new();
    let (one, root) = tagged_backend(b"one");
    let (two, root2) = tagged_backend(b"two");
    home.server_material();
    let pin1 = home.identity("id1");
    let mut server = start_server(&home, &[(&[APP, NEW], &pin1)]);
    let toml = services(&home, &[(APP, one)]);
    let mut client = home.spawn("client", &toml, "client.log");
    let public = wait_routed(&home, APP, &root);
    assert!(
        get(public, NEW, &root2, b"hi").is_err(),
        "no Service for NEW yet"
    );

    // A bad file: one line, nothing changes.
    home.write(
        "client.toml",
        "[client]\nserver-address = \"localhost:0\"\n",
    );
    client.signal(libc::SIGHUP);
    client.wait_event("reload_failed", Duration::from_secs(5));
    assert_eq!(get(public, APP, &root, b"hi").unwrap(), b"one");

    // A Service for NEW is added.
    services(&home, &[(APP, one), (NEW, two)]);
    client.signal(libc::SIGHUP);
    wait_until("NEW served", Duration::from_secs(3), || {
        get(public, NEW, &root2, b"hi").is_ok_and(|r| r == b"two")
    });
    assert_eq!(get(public, APP, &root, b"hi").unwrap(), b"one");
    let reloaded = client.events("config_reloaded");
    assert_eq!(reloaded.len(), 1, "{}", client.log_text());
    assert!(
        reloaded[0].contains("services_added=new.runewarp.test"),
        "{}",
        reloaded[0]
    );

    // APP's Service is removed and NEW's moves to the other backend.
    services(&home, &[(NEW, one)]);
    client.signal(libc::SIGHUP);
    wait_until("APP no longer served", Duration::from_secs(3), || {
        get(public, APP, &root, b"hi").is_err()
    });
    assert_eq!(get(public, NEW, &root, b"hi").unwrap(), b"one");
    let reloaded = client.events("config_reloaded");
    assert!(
        reloaded[1].contains("services_removed=app.runewarp.test"),
        "{}",
        reloaded[1]
    );
    assert!(
        reloaded[1].contains("services_changed=1"),
        "{}",
        reloaded[1]
    );
    // All of it on the first Tunnel connection.
    assert_eq!(client.events("tunnel_connected").len(), 1);

    client.stop_with(libc::SIGTERM, Duration::from_secs(5));
    server.stop_with(libc::SIGTERM, Duration::from_secs(5));
}

#[test]
fn client_sighup_with_a_new_identity_or_server_address_dials_again() {
    let home = Home::new();
    let (backend, root) = tagged_backend(b"ok");
    home.server_material();
    let pin1 = home.identity("id1");
    let pin2 = home.identity("id2");
    // Server A knows id1 for APP and id2 for NEW; Server B (same
    // certificates, other ports) knows id1 for OTHER.
    home.write(
        "a.toml",
        &server_toml(&home, &[(&[APP], &pin1), (&[NEW], &pin2)]),
    );
    let (b_public, b_tunnel) = (free_tcp(), free_udp());
    let b_toml = server_toml(&home, &[(&[OTHER], &pin1)])
        .replace(
            &format!("127.0.0.1:{}\"\ntunnel", home.public),
            &format!("127.0.0.1:{b_public}\"\ntunnel"),
        )
        .replace(
            &format!("127.0.0.1:{}\"\ncert", home.tunnel),
            &format!("127.0.0.1:{b_tunnel}\"\ncert"),
        );
    assert!(b_toml.contains(&b_tunnel.to_string()), "{b_toml}");
    home.write("b.toml", &b_toml);
    let mut a = home.spawn("server", &home.path().join("a.toml"), "a.log");
    let mut b = home.spawn("server", &home.path().join("b.toml"), "b.log");
    let client_toml = |identity: &str, tunnel_port: u16| {
        home.write(
            "client.toml",
            &format!(
                "[client]\nserver-address = \"localhost:{tunnel_port}\"\nserver-trust = \"ca-file\"\n\
                 server-ca-file = \"server-certs/server-ca.crt\"\nidentity-dir = \"{identity}\"\n\n\
                 [[client.services]]\nbackend-address = \"{backend}\"\n"
            ),
        )
    };
    let toml = client_toml("id1", home.tunnel);
    let mut client = home.spawn("client", &toml, "client.log");
    let a_public = wait_routed(&home, APP, &root);
    let b_public: SocketAddr = format!("127.0.0.1:{b_public}").parse().unwrap();

    // Rewrite the Client's config and reload: `up` answers at its address,
    // `gone` stops answering at its own, and reload number `nth` names the
    // keys that made the Client dial again.
    let switch = |identity: &str,
                  tunnel: u16,
                  (up, up_at): (&str, SocketAddr),
                  (gone, gone_at): (&str, SocketAddr),
                  (nth, reconnect): (usize, &str)| {
        client_toml(identity, tunnel);
        client.signal(libc::SIGHUP);
        wait_until(&format!("{up} up"), Duration::from_secs(5), || {
            get(up_at, up, &root, b"hi").is_ok()
        });
        wait_until(&format!("{gone} gone"), Duration::from_secs(5), || {
            get(gone_at, gone, &root, b"hi").is_err()
        });
        let reloaded = client.events("config_reloaded");
        let line = &reloaded[nth];
        assert!(line.contains(&format!("reconnect={reconnect}")), "{line}");
    };
    // Another identity: the Client closes its connection and dials as id2.
    switch(
        "id2",
        home.tunnel,
        (NEW, a_public),
        (APP, a_public),
        (0, "identity"),
    );
    // Another Server (and the first identity again).
    switch(
        "id1",
        b_tunnel,
        (OTHER, b_public),
        (NEW, a_public),
        (1, "server-address,identity"),
    );
    assert_eq!(client.events("tunnel_reconnecting").len(), 2);
    assert!(client.events("reload_restart_needed").is_empty());

    // A rotated key in the same directory is a new identity too; B does not
    // know it, so the Client is refused and says so.
    let _ = std::fs::remove_dir_all(home.path().join("id1"));
    home.identity("id1");
    client.signal(libc::SIGHUP);
    wait_until("refused after rotation", Duration::from_secs(5), || {
        !client.events("tunnel_refused").is_empty()
    });
    assert_eq!(client.events("tunnel_reconnecting").len(), 3);

    client.stop_with(libc::SIGTERM, Duration::from_secs(5));
    a.stop_with(libc::SIGTERM, Duration::from_secs(5));
    b.stop_with(libc::SIGTERM, Duration::from_secs(5));
}
