//! The Subnet Connector end to end (issue 17): a control server, a
//! connector node advertising 10.0.5.0/24 with a host behind it that runs
//! no agent, a peer the ACLs let into the subnet and one they let reach
//! only the connector. The allowed peer pings the subnet host and talks
//! TCP to it; the other gets no route and nothing through; an admin's
//! revocation removes the route within 2 s; the connector's nftables table
//! goes when it stops. Nodes sit on a flat bridge ([`netns::Topology`]).
//! Opt-in: `RUNEWARP_TEST_NETNS=1`, as root (namespaces, TUN, nftables).

mod common;
use common::opt_in;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::mesh::{admin, listed_id, mesh_v4, node, setup_key, transfer, world};
use common::netns::{Mapping, Topology, in_netns};
use common::proc::{Home, wait_until};

const SUBNET: &str = "10.0.5.0/24";
const SUBNET6: &str = "fd00:5::/64";
const HOST6: &str = "fd00:5::10";
/// What the connector test needs.
const NEEDS: &str = "root, network namespaces, /dev/net/tun, iproute2, nftables and ping";

/// Whether namespace `ns` has a route for the subnet.
fn has_route(net: &Topology, ns: &str) -> bool {
    let out = net.run(ns, &["ip", "route", "show", SUBNET]);
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

/// A TCP echo server in namespace `ns` on `addr`: answers each
/// connection's first read, then closes it.
fn echo_server(ns: &str, addr: SocketAddr) {
    let listener = in_netns(ns, move || {
        TcpListener::bind(addr).expect("bind in the subnet host")
    });
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            let mut buf = [0u8; 256];
            if let Ok(n) = c.read(&mut buf) {
                let _ = c.write_all(&buf[..n]);
            }
        }
    });
}

/// Connect from namespace `ns` to `addr` and exchange one message.
fn echo(ns: &str, addr: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut s = in_netns(ns, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"hello subnet")?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    Ok(got)
}

#[test]
fn a_host_without_an_agent_answers_allowed_peers_through_the_connector() {
    let Some((mut net, _srv, home, servers)) = world(NEEDS, false) else {
        return;
    };
    let a = net.host("a");
    let b = net.host("b");
    let c = net.host("c");
    let h = net.subnet(&c, "lan1", "10.0.5", "h");
    net.run(
        &c.name,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            "fd00:5::1/64",
            "dev",
            "lan1",
            "nodad",
        ],
    );
    net.run(
        &h.name,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            "fd00:5::10/64",
            "dev",
            "eth0",
            "nodad",
        ],
    );

    let alice = setup_key(&home, &["--user", "alice@subnet.test"]);
    let bob = setup_key(&home, &["--user", "bob@subnet.test"]);
    let connector = setup_key(&home, &["--org", "subnet.test", "--tag", "connector"]);
    home.write(
        "policy.json",
        &format!(
            r#"{{"acls": [
  {{"action": "accept", "src": ["alice@subnet.test"], "dst": ["{SUBNET}:*", "{SUBNET6}:*", "tag:connector:*"]}},
  {{"action": "accept", "src": ["bob@subnet.test"], "dst": ["tag:connector:*"]}}
],
"routes": {{"10.0.0.0/16": ["tag:connector"], "fd00:5::/48": ["tag:connector"]}}}}"#
        ),
    );
    admin(
        &home,
        &["policy", "set", "--org", "subnet.test", "policy.json"],
    );

    let started = Instant::now();
    let mut conn = node(
        &net,
        &home,
        &c,
        "c",
        &connector,
        &["--advertise-routes", &format!("{SUBNET},{SUBNET6}")],
    );
    let up = Duration::from_secs(30);
    conn.wait_line(
        &["subnet_connector_started", "routes=10.0.5.0/24,fd00:5::/64"],
        up,
    );
    conn.wait_line(&["subnet_routes_approved", "count=2"], up);
    let mut pa = node(&net, &home, &a, "a", &alice, &[]);
    let mut pb = node(&net, &home, &b, "b", &bob, &[]);
    pa.wait_line(&["peer_endpoint", "peer=c"], up);
    pb.wait_line(&["peer_endpoint", "peer=c"], up);
    let c4 = mesh_v4(&home, "c");

    // Alice's node routes the subnet to the connector; the host, which
    // runs nothing of ours, answers a ping and a TCP exchange.
    wait_until("a has the subnet route", up, || has_route(&net, &a.name));
    let first = wait_until("a pings the subnet host", Duration::from_secs(10), || {
        net.ping(&a.name, &h.addr, 2)
    });
    eprintln!(
        "first ping a→subnet host {} ms after the route, {} ms after the connector started",
        first.as_millis(),
        started.elapsed().as_millis()
    );
    let echo_addr: SocketAddr = format!("{}:7000", h.addr).parse().unwrap();
    echo_server(&h.name, echo_addr);
    assert_eq!(
        echo(&a.name, echo_addr).expect("TCP through the connector"),
        b"hello subnet"
    );
    // IPv6 routes are forwarded and masqueraded the same way.
    wait_until(
        "a pings the subnet host over IPv6",
        Duration::from_secs(10),
        || net.ping(&a.name, HOST6, 2),
    );
    // Figures: the subnet host through the connector against the
    // connector itself over the mesh.
    if let (Some(via), Some(direct)) = (
        net.rtt_ms(&a.name, &h.addr, 10),
        net.rtt_ms(&a.name, &c4, 10),
    ) {
        eprintln!("ping a→subnet host via connector {via:.3} ms, a→connector {direct:.3} ms");
    }

    if std::env::var("RUNEWARP_MESH_BENCH").is_ok_and(|v| v == "1") {
        let mib = 64;
        let via = transfer(&a.name, &h.name, &h.addr, mib);
        let direct = transfer(&a.name, &c.name, &c4, mib);
        eprintln!(
            "TCP a→subnet host via connector {via:.0} Mbit/s, a→connector over the mesh {direct:.0} Mbit/s ({mib} MiB)"
        );
    }

    // Bob reaches the connector but not the subnet: no route in his map,
    // and even a route added by hand carries nothing.
    assert!(net.ping(&b.name, &c4, 2), "bob reaches the connector");
    let map: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.path().join("b/netmap.json")).unwrap())
            .unwrap();
    assert!(
        !map.to_string().contains(SUBNET) && !map.to_string().contains("fd00:5::"),
        "bob's map names the subnet: {map}"
    );
    assert!(!has_route(&net, &b.name));
    net.run(&b.name, &["ip", "route", "add", SUBNET, "dev", "rw0"]);
    assert!(
        !net.ping(&b.name, &h.addr, 1),
        "bob reaches the subnet host"
    );
    assert!(
        echo(&b.name, echo_addr).is_err(),
        "bob talks TCP to the host"
    );
    // The connector's own map carries the approved route.
    let map: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.path().join("c/netmap.json")).unwrap())
            .unwrap();
    assert_eq!(map["self"]["routes"][0], SUBNET, "{map}");
    let list = admin(&home, &["routes", "list"]);
    assert!(list.contains("10.0.5.0/24\tyes\tpolicy\tserving"), "{list}");
    let status = home.ok(&["node", "status", "--state-dir", "a"]);
    assert!(status.contains("\troutes 10.0.5.0/24"), "{status}");
    let status = home.ok(&["node", "status", "--state-dir", "c"]);
    assert!(status.contains("serving routes: 10.0.5.0/24"), "{status}");

    // An admin revokes the route: alice loses it within 2 s.
    let c_id = listed_id(&list, 1, "c");
    let revoked = Instant::now();
    admin(&home, &["routes", "revoke", "--device", &c_id, SUBNET]);
    let gone = wait_until("a drops the subnet route", Duration::from_secs(2), || {
        !has_route(&net, &a.name)
    });
    assert!(!net.ping(&a.name, &h.addr, 1), "the subnet is cut off");
    assert!(
        net.ping(&a.name, &c4, 2),
        "the connector itself still answers"
    );
    let list = admin(&home, &["routes", "list"]);
    assert!(
        list.contains("10.0.5.0/24\tyes\trevoked\trevoked"),
        "{list}"
    );
    eprintln!(
        "route revocation applied by a in {} ms ({} ms including the admin command)",
        gone.as_millis(),
        revoked.elapsed().as_millis()
    );
    // Approved again by hand: back.
    admin(&home, &["routes", "approve", "--device", &c_id, SUBNET]);
    wait_until("a has the route again", Duration::from_secs(2), || {
        has_route(&net, &a.name)
    });
    wait_until("a pings the host again", Duration::from_secs(5), || {
        net.ping(&a.name, &h.addr, 1)
    });

    // The connector removes its nftables table when it stops.
    let table = |net: &Topology| {
        net.exec(&c.name)
            .args(["nft", "list", "table", "inet", "runewarp_rw0"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(table(&net));
    conn.terminate();
    assert!(!table(&net), "the masquerade table outlived the connector");
    drop((pa, pb, servers));
    drop(net);
}

/// A UDP socket bound to `addr` inside namespace `ns`, with a short read
/// timeout.
fn udp(ns: &str, addr: &str) -> UdpSocket {
    let addr: SocketAddr = addr.parse().unwrap();
    let s = in_netns(ns, move || {
        UdpSocket::bind(addr).expect("bind in the namespace")
    });
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s
}

/// What `reflector` saw as the source of a datagram `device` sent it; the
/// reflector answers and the device must get the answer.
fn observed(device: &UdpSocket, reflector: &UdpSocket) -> SocketAddr {
    device
        .send_to(b"ping", reflector.local_addr().unwrap())
        .unwrap();
    let mut buf = [0u8; 64];
    let (_, from) = reflector
        .recv_from(&mut buf)
        .expect("the reflector hears the device");
    reflector.send_to(b"pong", from).unwrap();
    let (n, _) = device
        .recv_from(&mut buf)
        .expect("the answer comes back through the NAT");
    assert_eq!(&buf[..n], b"pong");
    from
}

/// The shared topology builder behaves as documented: port-preserving
/// and random mapping, endpoint-dependent filtering, removal on drop.
#[test]
fn the_nat_topology_maps_and_filters_as_documented() {
    if !opt_in::enabled(
        opt_in::NETNS,
        "mesh_subnet (NAT topology)",
        "root, network namespaces, iproute2 and nftables",
    ) {
        return;
    }
    let mut net = Topology::new("rwn");
    let public = net.public();
    let mut home_nat = net.nat("nat1", Mapping::PortPreserving);
    let mut cgnat = net.nat("nat2", Mapping::Random);
    let d1 = net.behind(&mut home_nat, "d1");
    let d2 = net.behind(&mut cgnat, "d2");
    assert_eq!(d1.addr, "192.168.1.2");
    let r1 = udp(&public.name, "198.18.0.1:3478");
    let r2 = udp(&public.name, "198.18.0.1:3479");
    let stranger = udp(&public.name, "198.18.0.1:4000");
    let s1 = udp(&d1.name, "0.0.0.0:41641");
    let s2 = udp(&d2.name, "0.0.0.0:41641");

    // Port-preserving: the same public address and port towards anyone.
    let wan1: SocketAddr = format!("{}:41641", home_nat.ns.addr).parse().unwrap();
    assert_eq!(observed(&s1, &r1), wan1);
    assert_eq!(observed(&s1, &r2), wan1);
    // Random: a new port per destination.
    let (a, b) = (observed(&s2, &r1), observed(&s2, &r2));
    assert_eq!(a.ip().to_string(), cgnat.ns.addr);
    assert_ne!(a.port(), b.port(), "random mapping reused a port");
    // Endpoint-dependent filtering: an endpoint the device never sent to
    // cannot reach it through its mapping.
    stranger.send_to(b"hello", wan1).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        s1.recv_from(&mut buf).is_err(),
        "unsolicited datagram passed the NAT"
    );
    // ... and the router dropped it before conntrack kept an entry that
    // would cost the device its port towards that sender.
    assert!(net.nat_dropped(&home_nat) > 0, "no drop counted");
    assert_eq!(observed(&s1, &stranger), wan1, "the port was kept");
    // The LAN host behind a gateway has no way out but its gateway.
    let gw = net.host("gw");
    let h = net.subnet(&gw, "lan1", "10.0.9", "h");
    assert!(net.ping(&gw.name, &h.addr, 2));
    assert!(!net.ping(&public.name, &h.addr, 1));

    let names: Vec<String> = [&public.name, &d1.name, &h.name]
        .iter()
        .map(|s| s.to_string())
        .collect();
    drop((s1, s2, r1, r2, stranger));
    drop(net);
    let list = net_list();
    for n in names {
        assert!(!list.contains(&n), "{n} outlived the topology");
        assert!(!std::path::Path::new("/etc/netns").join(&n).exists());
    }
}

fn net_list() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn advertised_routes_are_validated_before_anything_starts() {
    let home = Home::new();
    let run = |args: &[&str]| {
        let out = home
            .cmd()
            .args(["node", "up", "--state-dir", "s"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--tun", "rw0", "--advertise-routes", "0.0.0.0/0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--advertise-routes") && err.contains("default routes"),
        "{err}"
    );
    let (code, err) = run(&["--tun", "rw0", "--advertise-routes", "10.0.5.7/24"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("host bits"), "{err}");
    let (code, err) = run(&["--advertise-routes", "10.0.5.0/24"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("needs --tun"), "{err}");
    // What the connector cannot do, it names: root (or CAP_NET_ADMIN), or
    // (as root, with no `nft` on PATH) nftables. Either fails before
    // anything is changed.
    let out = home
        .cmd()
        .env("PATH", "/nonexistent")
        .args(["node", "up", "--state-dir", "s", "--tun", "rw0"])
        .args(["--advertise-routes", "10.0.5.0/24"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    if unsafe { libc::geteuid() } == 0 {
        assert!(
            err.contains("`nft` command (nftables) is not installed"),
            "{err}"
        );
    } else {
        assert!(
            err.contains("needs root or CAP_NET_ADMIN") && err.contains("nftables"),
            "{err}"
        );
    }
}
