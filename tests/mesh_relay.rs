//! The relayed path end to end (issue 17): a server namespace runs the
//! control server and `runewarp server` with `[server.relay]`; two NAT
//! namespaces masquerade with random port mapping (so no direct path can
//! form), one node behind each. Pings cross the mesh both ways through the
//! relay, `node status` says `relay`, a capture in the relay's namespace
//! holds the relay frames but never the pings' plaintext, and a device of
//! another organisation cannot reach the nodes through the relay. With
//! UDP blocked behind one NAT, that node falls back to TCP (the tunnel
//! Server's public listener hands the connection to the relay).
//! Opt-in: `RUNEWARP_TEST_NETNS=1`, as root (iproute2, nftables, ping,
//! python3). Everything stays inside the namespaces the test makes; they,
//! the `/etc/netns` entries and the processes go on drop.

#[path = "common/opt_in.rs"]
mod opt_in;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_runewarp");
const CONTROL_NAME: &str = "control.relay.test";
const SERVER: &str = "10.88.0.1";
/// A Client identity pin for the Server's one (unused) Tunnel.
const PIN: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
/// `ping -p`: the payload the capture must never see in clear
/// ("relay-plain-text").
const PATTERN: &str = "72656c61792d706c61696e2d74657874";

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().expect("runs");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// srv (bridge 10.88.0.1/24), nat1/nat2 (10.88.0.2/.3 outside,
/// 192.168.1.1/192.168.2.1 inside, nftables `masquerade random`), h1/h2
/// behind them, h3 on the bridge (10.88.0.4).
struct Net {
    names: Vec<String>,
}

impl Net {
    fn new() -> Net {
        let tag = format!("rwr{}", std::process::id());
        let names: Vec<String> = ["srv", "nat1", "nat2", "h1", "h2", "h3"]
            .iter()
            .map(|n| format!("{tag}-{n}"))
            .collect();
        let net = Net { names };
        for n in &net.names {
            run("ip", &["netns", "add", n]);
            run("ip", &["-n", n, "link", "set", "lo", "up"]);
            let dir = PathBuf::from("/etc/netns").join(n);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("hosts"),
                format!("127.0.0.1 localhost\n{SERVER} {CONTROL_NAME}\n"),
            )
            .unwrap();
        }
        let srv = net.names[0].clone();
        run("ip", &["-n", &srv, "link", "add", "br0", "type", "bridge"]);
        run(
            "ip",
            &["-n", &srv, "addr", "add", "10.88.0.1/24", "dev", "br0"],
        );
        run("ip", &["-n", &srv, "link", "set", "br0", "up"]);
        // The outside legs: nat1, nat2 and h3 on the bridge.
        for (i, n) in [&net.names[1], &net.names[2], &net.names[5]]
            .iter()
            .enumerate()
        {
            let port = format!("p{i}");
            run(
                "ip",
                &[
                    "-n", n, "link", "add", "wan", "type", "veth", "peer", "name", &port, "netns",
                    &srv,
                ],
            );
            run(
                "ip",
                &["-n", &srv, "link", "set", &port, "master", "br0", "up"],
            );
            let addr = format!("10.88.0.{}/24", [2, 3, 4][i]);
            run("ip", &["-n", n, "addr", "add", &addr, "dev", "wan"]);
            run("ip", &["-n", n, "link", "set", "wan", "up"]);
        }
        // The inside legs, and the NAT.
        for (i, (nat, host)) in [
            (&net.names[1], &net.names[3]),
            (&net.names[2], &net.names[4]),
        ]
        .iter()
        .enumerate()
        {
            let lan = format!("192.168.{}", i + 1);
            run(
                "ip",
                &[
                    "-n", nat, "link", "add", "lan", "type", "veth", "peer", "name", "eth0",
                    "netns", host,
                ],
            );
            run(
                "ip",
                &[
                    "-n",
                    nat,
                    "addr",
                    "add",
                    &format!("{lan}.1/24"),
                    "dev",
                    "lan",
                ],
            );
            run("ip", &["-n", nat, "link", "set", "lan", "up"]);
            run(
                "ip",
                &[
                    "-n",
                    host,
                    "addr",
                    "add",
                    &format!("{lan}.2/24"),
                    "dev",
                    "eth0",
                ],
            );
            run("ip", &["-n", host, "link", "set", "eth0", "up"]);
            run(
                "ip",
                &[
                    "-n",
                    host,
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("{lan}.1"),
                ],
            );
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    nat,
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ],
            );
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    nat,
                    "nft",
                    "add table ip nat; add chain ip nat post { type nat hook postrouting priority 100; }; add rule ip nat post oifname \"wan\" masquerade random",
                ],
            );
        }
        net
    }

    fn ns(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// `runewarp ARGS` inside namespace `ns`, run from `home`.
    fn runewarp(&self, ns: &str, home: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, BIN])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home)
            .env("RUNEWARP_LOG", "info")
            .current_dir(home);
        c
    }

    /// One ping (payload [`PATTERN`]) from `ns` to `dst`.
    fn ping(&self, ns: &str, dst: &str, wait_s: u32) -> bool {
        Command::new("ip")
            .args([
                "netns", "exec", ns, "ping", "-n", "-c1", "-s", "96", "-p", PATTERN,
            ])
            .arg(format!("-W{wait_s}"))
            .arg(dst)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Python `script` with `args` in namespace `ns`.
    fn python(&self, ns: &str, script: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, "python3", "-c", script])
            .args(args);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(n));
        }
    }
}

/// A process with its log; stopped on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap();
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether a line has `event="NAME"` and every one of `parts`.
    fn has(&self, event: &str, parts: &[&str]) -> bool {
        let needle = format!("event=\"{event}\"");
        self.log()
            .lines()
            .any(|l| l.contains(&needle) && parts.iter().all(|p| l.contains(p)))
    }

    fn wait(&mut self, event: &str, parts: &[&str], within: Duration) {
        let start = Instant::now();
        while !self.has(event, parts) {
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("exited ({s}) before {event} {parts:?}:\n{}", self.log());
            }
            assert!(
                start.elapsed() < within,
                "no {event} {parts:?} within {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `runewarp control -c control.toml ARGS` (outside the namespaces: it
/// only opens the state dir).
fn control_cmd(home: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["control", "-c", "control.toml"])
        .args(args)
        .current_dir(home)
        .env("HOME", home)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "control {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default())
        .unwrap_or(serde_json::Value::Null)
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < within, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
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

/// A TCP sink: reads until EOF, then answers with the byte count.
const SINK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5201)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    n += len(b)
c.sendall(str(n).encode()); c.close()
"#;

/// A TCP source: sends N MiB, waits for the sink's count, prints Mbit/s.
const SOURCE: &str = r#"
import socket, sys, time
c = socket.create_connection((sys.argv[1], 5201), timeout=60)
buf = b"x" * (1 << 20); n = int(sys.argv[2]); t = time.monotonic()
for _ in range(n): c.sendall(buf)
c.shutdown(socket.SHUT_WR); got = int(c.recv(64)); dt = time.monotonic() - t
assert got == n << 20, got
print(n * 8 * 1.048576 / dt)
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

/// TCP throughput (Mbit/s) from namespace `from` to `to_addr` in `to`.
fn throughput(net: &Net, from: &str, to: &str, to_addr: &str, mib: u32) -> f64 {
    let mut sink = ready(net.python(to, SINK, &[to_addr]));
    let out = Command::new("ip")
        .args([
            "netns", "exec", from, "timeout", "120", "python3", "-c", SOURCE, to_addr,
        ])
        .arg(mib.to_string())
        .output()
        .unwrap();
    let _ = sink.kill();
    let _ = sink.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{text} {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn nodes_behind_random_port_nat_talk_through_the_relay_which_sees_only_ciphertext() {
    if !opt_in::enabled(
        opt_in::NETNS,
        "mesh_relay",
        "root, network namespaces, /dev/net/tun, iproute2, nftables, ping and python3",
    ) {
        return;
    }
    assert!(
        unsafe { libc::geteuid() } == 0,
        "tests/mesh_relay.rs needs root; leave RUNEWARP_TEST_NETNS unset to skip it"
    );
    let net = Net::new();
    let (srv, h1, h2, h3) = (net.ns(0), net.ns(3), net.ns(4), net.ns(5));
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    std::fs::write(
        home.join("control.toml"),
        format!(
            "[control]\nlisten-address = \"{SERVER}:7443\"\nhostname = \"{CONTROL_NAME}\"\nstate-dir = \"control-state\"\n\
             [[control.relays]]\nname = \"r1\"\naddress = \"{SERVER}:3478\"\ntcp-address = \"{SERVER}:8443\"\n"
        ),
    )
    .unwrap();
    let relay_key = control_cmd(home, &["relay-key"]).trim().to_string();
    assert_eq!(
        control_cmd(home, &["relay-key"]).trim(),
        relay_key,
        "the key is kept"
    );
    let mut c = net.runewarp(srv, home);
    c.args(["control", "-c", "control.toml"]);
    let mut control = Proc::spawn(c, home.join("control.log"));
    control.wait("control_started", &[], Duration::from_secs(20));

    run(
        BIN,
        &[
            "server",
            "cert",
            "init",
            "--dir",
            &home.join("certs").display().to_string(),
            "--hostname",
            "relay.relay.test",
        ],
    );
    std::fs::write(
        home.join("server.toml"),
        format!(
            "[server]\nhostname = \"relay.relay.test\"\npublic-bind-address = \"{SERVER}:8443\"\n\
             tunnel-bind-address = \"{SERVER}:8443\"\ncert-dir = \"certs\"\ncontrol-socket = \"server.sock\"\n\
             [server.relay]\nlisten = \"{SERVER}:3478\"\ncontrol-key = \"{relay_key}\"\n\
             [[server.tunnels]]\npublic-hostnames = [\"app.relay.test\"]\nclient-identity = \"{PIN}\"\n"
        ),
    )
    .unwrap();
    let mut c = net.runewarp(srv, home);
    c.args(["server", "-c", "server.toml"]);
    let mut relay = Proc::spawn(c, home.join("server.log"));
    relay.wait("relay_started", &[], Duration::from_secs(20));

    let key = |args: &[&str]| {
        let mut a = vec!["setup-key", "create", "--reusable"];
        a.extend_from_slice(args);
        control_cmd(home, &a)
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_string()
    };
    let (alice, other) = (
        key(&["--user", "alice@relay.test"]),
        key(&["--org", "other.test"]),
    );
    let node = |ns: &str, name: &str, key: &str, tun: bool| {
        let mut c = net.runewarp(ns, home);
        c.args(["node", "up", "--control"])
            .arg(format!("https://{CONTROL_NAME}:7443"))
            .args([
                "--setup-key",
                key,
                "--ca-file",
                "control-state/tls/server-ca.crt",
            ])
            .args(["--hostname", name, "--state-dir", name]);
        if tun {
            c.args(["--tun", "rw0", "--listen-port", "41641"]);
        }
        Proc::spawn(c, home.join(format!("{name}.log")))
    };
    let started = Instant::now();
    let mut a = node(h1, "a", &alice, true);
    let mut b = node(h2, "b", &alice, true);
    let up = Duration::from_secs(30);
    a.wait("relay_registered", &["relay=r1"], up);
    b.wait("relay_registered", &["relay=r1"], up);
    // The relay answers STUN too: each node learns its NAT's address.
    a.wait("reflexive_address", &["address=10.88.0.2:"], up);
    let addr = |name: &str| {
        json(&home.join(name).join("enrolment.json"))["addresses"][0]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (a4, b4) = (addr("a"), addr("b"));
    wait_until("a's map lists b", up, || {
        json(&home.join("a/netmap.json"))["peers"][0]["hostname"] == "b"
    });

    let first = wait_until(
        "a pings b through the relay",
        Duration::from_secs(15),
        || net.ping(h1, &b4, 2),
    );
    let first_after_up = started.elapsed();
    assert!(net.ping(h2, &a4, 2), "b pings a");
    wait_until("a's status says relay", Duration::from_secs(5), || {
        let s = json(&home.join("a/dataplane.json"));
        s["peers"][0]["path"] == "relay" && s["peers"][0]["endpoint"] == format!("{SERVER}:3478")
    });
    let status = net
        .runewarp(h1, home)
        .args(["node", "status", "--state-dir", "a"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.contains(&format!("relay {SERVER}:3478")), "{status}");

    // The relay's namespace carries the relay frames of a burst of pings,
    // never their payload in clear...
    let capture = ready(net.python(srv, CAPTURE, &[PATTERN, "3"]));
    for _ in 0..5 {
        assert!(net.ping(h1, &b4, 2), "a pings b during the capture");
    }
    let counts = finish(capture);
    let n: Vec<u64> = counts.split(' ').filter_map(|x| x.parse().ok()).collect();
    assert_eq!(n.len(), 3, "{counts}");
    assert!(n[1] >= 10, "the capture saw the relayed pings: {counts}");
    assert_eq!(n[0], 0, "plaintext in the relay's namespace: {counts}");
    // ... which the same capture finds when it does cross in clear.
    let capture = ready(net.python(srv, CAPTURE, &[PATTERN, "2"]));
    assert!(net.ping(h1, SERVER, 2), "a plain ping to the server");
    let counts = finish(capture);
    assert!(
        !counts.starts_with("0 "),
        "the capture sees plaintext: {counts}"
    );

    // Another organisation's device holds a valid token of its own, but
    // the relay forwards nothing from it to alice's devices.
    let _o = node(h3, "o", &other, false);
    wait_until("o's map holds a relay token", up, || {
        json(&home.join("o/netmap.json"))["relays"][0]["token"].is_string()
    });
    let token = json(&home.join("o/netmap.json"))["relays"][0]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let a_key = json(&home.join("a/netmap.json"))["self"]["public_key"]
        .as_str()
        .unwrap()
        .to_string();
    let out = net
        .python(h3, FOREIGN, &[&format!("{SERVER}:3478"), &token, &a_key])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "2",
        "registered: {out:?}"
    );
    relay.wait(
        "relay_counters",
        &["dropped_other_org=1"],
        Duration::from_secs(15),
    );
    assert!(net.ping(h1, &b4, 2), "a still reaches b");

    let mib = 32;
    let plain = throughput(&net, h1, srv, SERVER, mib);
    let relayed = throughput(&net, h1, h2, &b4, mib);
    eprintln!(
        "first ping through the relay {} ms after `node up` ({} ms after the ping loop began); \
         TCP {mib} MiB: plain (veth + NAT) {plain:.0} Mbit/s, through the relay {relayed:.0} Mbit/s",
        first_after_up.as_millis(),
        first.as_millis(),
    );

    // UDP blocked behind the first NAT: the restarted node falls back to
    // TCP to the tunnel Server's public listener, which hands the
    // connection to the relay; pings still cross both ways.
    drop(a);
    run(
        "ip",
        &[
            "netns",
            "exec",
            net.ns(1),
            "nft",
            "add table ip f; add chain ip f fw { type filter hook forward priority 0; }; add rule ip f fw meta l4proto udp drop",
        ],
    );
    let mut a = node(h1, "a", &alice, true);
    a.wait("relay_tcp_fallback", &[], up);
    a.wait("relay_registered", &["tcp=true"], up);
    wait_until(
        "a pings b over the TCP fallback",
        Duration::from_secs(15),
        || net.ping(h1, &b4, 2),
    );
    assert!(net.ping(h2, &a4, 2), "b pings a over a's TCP fallback");
    let over_tcp = throughput(&net, h1, h2, &b4, mib);
    eprintln!(
        "TCP {mib} MiB through the relay's TCP fallback (UDP blocked at a's NAT): {over_tcp:.0} Mbit/s"
    );
    drop((a, b, relay, control));
    drop(net);
}
