//! The relayed path end to end (issue 17): a server namespace runs the
//! control server and `runewarp server` with `[server.relay]`; two NAT
//! namespaces masquerade with random port mapping (so no direct path can
//! form), one node behind each. Pings cross the mesh both ways through the
//! relay, `node status` says `relay`, a capture in the relay's namespace
//! holds the relay frames but never the pings' plaintext, and a device of
//! another organisation cannot reach the nodes through the relay. With
//! UDP blocked behind one NAT, that node falls back to TCP (the tunnel
//! Server's public listener hands the connection to the relay).
//! The topology is [`common::netns`]'s, the servers and nodes
//! [`common::mesh`]'s. Opt-in: `RUNEWARP_TEST_NETNS=1`, as root (iproute2,
//! nftables, ping, python3). Everything stays inside the namespaces the
//! test makes; they, the `/etc/netns` entries and the processes go on
//! drop.

mod common;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::mesh::{
    CONTROL_NAME, CONTROL_PORT, RELAY_PORT, SERVER_PORT, admin, mesh_v4, node, node_status, path,
    peer, runewarp, setup_key, transfer, world,
};
use common::netns::{Mapping, Topology};
use common::proc::{Running, netmap, wait_until};

/// What the namespace test needs.
const NEEDS: &str = "root, network namespaces, /dev/net/tun, iproute2, nftables, ping and python3";

/// `ping -p`: the payload the capture must never see in clear
/// ("relay-plain-text").
const PATTERN: &str = "72656c61792d706c61696e2d74657874";

/// One ping (payload [`PATTERN`]) from `ns` to `dst`.
fn ping(net: &Topology, ns: &str, dst: &str) -> bool {
    net.exec(ns)
        .args(["ping", "-n", "-c1", "-W2", "-s", "96", "-p", PATTERN, dst])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Python `script` with `args` in namespace `ns`.
fn python(net: &Topology, ns: &str, script: &str, args: &[&str]) -> Command {
    let mut c = net.exec(ns);
    c.args(["python3", "-c", script]).args(args);
    c
}

/// Captures every frame on every interface of its namespace (AF_PACKET,
/// no tcpdump) for argv[2] seconds; prints the frames holding the needle
/// (argv[1], hex), the relay receive frames, and all frames.
const CAPTURE: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.settimeout(0.2)
needle = bytes.fromhex(sys.argv[1]); end = time.monotonic() + float(sys.argv[2])
print("ready", flush=True)
hits = frames = total = 0
while time.monotonic() < end:
    try: p = s.recv(65535)
    except socket.timeout: continue
    total += 1
    hits += needle in p
    frames += b"RWR\x01\x05" in p
print(hits, frames, total, flush=True)
"#;

/// Registers with the relay (argv[1]) using a token (argv[2], base64) and
/// sends one frame to the key argv[3] (base64); prints the registration's
/// answer type.
const FOREIGN: &str = r#"
import base64, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.sendto(b"RWR\x01\x01" + base64.b64decode(sys.argv[2]), (host, int(port)))
ack = s.recv(64)
s.sendto(b"RWR\x01\x04" + base64.b64decode(sys.argv[3]) + b"\x04\x00\x00\x00" + bytes(32), (host, int(port)))
print(ack[4], flush=True)
"#;

/// Start `cmd` (a Python script that prints "ready" first) and wait for it.
fn ready(mut cmd: Command) -> Child {
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("python3 runs");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    child
}

fn finish(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn nodes_behind_random_port_nat_talk_through_the_relay_which_sees_only_ciphertext() {
    // srv: the public namespace (control, relay); nat1 and nat2 map every
    // flow to a random port; h1 and h2 behind them; h3 on the bridge.
    let Some((mut net, srv, home, mut servers)) = world(NEEDS, true) else {
        return;
    };
    let (nat1, h1) = net.nat_with_device("nat1", Mapping::Random, "h1");
    let (_, h2) = net.nat_with_device("nat2", Mapping::Random, "h2");
    let h3 = net.host("h3");
    let relay_key = admin(&home, &["relay-key"]);
    assert_eq!(admin(&home, &["relay-key"]), relay_key, "the key is kept");
    let relay_addr = format!("{}:{RELAY_PORT}", srv.addr);

    let alice = setup_key(&home, &["--user", "alice@relay.test"]);
    let other = setup_key(&home, &["--org", "other.test"]);
    let started = Instant::now();
    let mut a = node(&net, &home, &h1, "a", &alice, &[]);
    let mut b = node(&net, &home, &h2, "b", &alice, &[]);
    let up = Duration::from_secs(30);
    a.wait_line(&["relay_registered", "relay=r1"], up);
    b.wait_line(&["relay_registered", "relay=r1"], up);
    // The relay answers STUN too: each node learns its NAT's address.
    a.wait_line(
        &["reflexive_address", &format!("address={}:", nat1.ns.addr)],
        up,
    );
    let (a4, b4) = (mesh_v4(&home, "a"), mesh_v4(&home, "b"));
    wait_until("a's map lists b", up, || {
        netmap(&home, "a").is_some_and(|m| m["peers"][0]["hostname"] == "b")
    });

    let first = wait_until(
        "a pings b through the relay",
        Duration::from_secs(15),
        || ping(&net, &h1.name, &b4),
    );
    let first_after_up = started.elapsed();
    assert!(ping(&net, &h2.name, &a4), "b pings a");
    wait_until("a's status says relay", Duration::from_secs(5), || {
        path(&home, "a", "b") == ("relay".to_string(), relay_addr.clone())
    });
    let status = node_status(&net, &home, &h1, "a");
    assert!(status.contains(&format!("relay {relay_addr}")), "{status}");
    // A relayed peer's RTT is the last handshake's round trip, which the
    // side that initiated it measured: a, which pinged first.
    wait_until("a reports an RTT for b", Duration::from_secs(5), || {
        peer(&home, "a", "b")["rtt_ms"].as_u64().is_some()
    });

    // The relay's namespace carries the relay frames of a burst of pings,
    // never their payload in clear...
    let capture = ready(python(&net, &srv.name, CAPTURE, &[PATTERN, "3"]));
    for _ in 0..5 {
        assert!(ping(&net, &h1.name, &b4), "a pings b during the capture");
    }
    let counts = finish(capture);
    let n: Vec<u64> = counts.split(' ').filter_map(|x| x.parse().ok()).collect();
    assert_eq!(n.len(), 3, "{counts}");
    assert!(n[1] >= 10, "the capture saw the relayed pings: {counts}");
    assert_eq!(n[0], 0, "plaintext in the relay's namespace: {counts}");
    // ... which the same capture finds when it does cross in clear.
    let capture = ready(python(&net, &srv.name, CAPTURE, &[PATTERN, "2"]));
    assert!(
        ping(&net, &h1.name, &srv.addr),
        "a plain ping to the server"
    );
    let counts = finish(capture);
    assert!(
        !counts.starts_with("0 "),
        "the capture sees plaintext: {counts}"
    );

    // Another organisation's device holds a valid token of its own, but
    // the relay forwards nothing from it to alice's devices.
    let mut o = runewarp(&net, &home, &h3);
    o.args(["node", "up", "--control"])
        .arg(format!("https://{CONTROL_NAME}:{}", CONTROL_PORT))
        .args(["--setup-key", &other])
        .args(["--ca-file", "control-state/tls/server-ca.crt"])
        .args(["--hostname", "o", "--state-dir", "o"]);
    let _o = Running::spawn_logged(o, &home.path().join("o.log"));
    wait_until("o's map holds a relay token", up, || {
        netmap(&home, "o").is_some_and(|m| m["relays"][0]["token"].is_string())
    });
    let token = netmap(&home, "o").unwrap()["relays"][0]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let a_key = netmap(&home, "a").unwrap()["self"]["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    let out = python(&net, &h3.name, FOREIGN, &[&relay_addr, &token, &a_key])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "2",
        "registered: {out:?}"
    );
    servers.relay.as_mut().unwrap().wait_line(
        &["relay_counters", "dropped_other_org=1"],
        Duration::from_secs(15),
    );
    assert!(ping(&net, &h1.name, &b4), "a still reaches b");

    let mib = 32;
    let plain = transfer(&h1.name, &srv.name, &srv.addr, mib);
    let relayed = transfer(&h1.name, &h2.name, &b4, mib);
    eprintln!(
        "first ping through the relay {} ms after `node up` ({} ms after the ping loop began); \
         TCP {mib} MiB: plain (veth + NAT) {plain:.0} Mbit/s, through the relay {relayed:.0} Mbit/s",
        first_after_up.as_millis(),
        first.as_millis(),
    );

    // UDP blocked behind the first NAT: the restarted node falls back to
    // TCP to the tunnel Server's public listener (port SERVER_PORT), which
    // hands the connection to the relay; pings still cross both ways.
    drop(a);
    net.nft(
        &nat1.ns.name,
        "table ip f { chain fw { type filter hook forward priority 0; meta l4proto udp drop; }; }",
    );
    let mut a = node(&net, &home, &h1, "a", &alice, &[]);
    a.wait_line(&["relay_tcp_fallback"], up);
    a.wait_line(&["relay_registered", "tcp=true"], up);
    assert!(
        a.events("relay_tcp_connected")
            .iter()
            .any(|l| l.contains(&format!(":{SERVER_PORT}"))),
        "{}",
        a.log_text()
    );
    wait_until(
        "a pings b over the TCP fallback",
        Duration::from_secs(15),
        || ping(&net, &h1.name, &b4),
    );
    assert!(ping(&net, &h2.name, &a4), "b pings a over a's TCP fallback");
    let over_tcp = transfer(&h1.name, &h2.name, &b4, mib);
    eprintln!(
        "TCP {mib} MiB through the relay's TCP fallback (UDP blocked at a's NAT): {over_tcp:.0} Mbit/s"
    );
    drop((a, b, servers));
    drop(net);
}
