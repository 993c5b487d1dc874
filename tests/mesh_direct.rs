//! Direct paths through NAT end to end (issue 17): two nodes, each behind
//! its own NAT namespace (nftables SNAT that keeps the source port, and
//! endpoint-dependent filtering: only replies to what went out come in),
//! reach a direct path by probing each other at the same time after a
//! call-me-maybe through the control server. Ping and a 100 MiB transfer
//! cross it; then one NAT fails over to its second public address in the
//! middle of a transfer, and the nodes find the new path (the old one
//! dies, both re-probe) before the transfer ends; a new host address is
//! reported and sent to the peer in a call-me-maybe.
//!
//! Opt-in: `RUNEWARP_TEST_NETNS=1`, as root, with nft, conntrack, ping
//! and python3. All traffic stays inside the namespaces the test makes;
//! the namespaces, the `/etc/netns` entries and the processes go on drop.
//!
//! ```text
//!  a 10.1.0.2 ─ nat1 (10.99.0.11, later .21) ─┐
//!                                             ├─ srv br0 10.99.0.1 (control)
//!  b 10.2.0.2 ─ nat2 (10.99.0.12) ────────────┘
//! ```

mod common;
#[path = "common/opt_in.rs"]
mod opt_in;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::proc::{BIN, Running, wait_until};

const CONTROL: &str = "control.mesh.test";

/// Run to completion; panic unless it succeeded; its stdout.
fn output_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?}: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(args: &[&str]) -> String {
    output_of(Command::new(args[0]).args(&args[1..]))
}

/// `CMD...` inside namespace `ns`.
fn inside(ns: &str, cmd: &[&str]) -> String {
    let mut args = vec!["ip", "netns", "exec", ns];
    args.extend_from_slice(cmd);
    run(&args)
}

/// The namespaces; removed (with their `/etc/netns` files) on drop.
struct Topology {
    tag: String,
}

const NAMES: [&str; 5] = ["srv", "nat1", "nat2", "a", "b"];

impl Topology {
    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    fn new() -> Topology {
        let t = Topology {
            tag: format!("rwd{}", std::process::id()),
        };
        for n in NAMES {
            run(&["ip", "netns", "add", &t.ns(n)]);
            run(&["ip", "-n", &t.ns(n), "link", "set", "lo", "up"]);
        }
        let srv = t.ns("srv");
        run(&["ip", "-n", &srv, "link", "add", "br0", "type", "bridge"]);
        run(&[
            "ip",
            "-n",
            &srv,
            "addr",
            "add",
            "10.99.0.1/24",
            "dev",
            "br0",
        ]);
        run(&["ip", "-n", &srv, "link", "set", "br0", "up"]);
        for (i, (nat, host)) in [("nat1", "a"), ("nat2", "b")].iter().enumerate() {
            let (nat, host) = (t.ns(nat), t.ns(host));
            let n = i + 1;
            // The NAT's public side on the "internet" bridge.
            let port = format!("p{n}");
            run(&[
                "ip", "-n", &nat, "link", "add", "eth0", "type", "veth", "peer", "name", &port,
                "netns", &srv,
            ]);
            run(&[
                "ip", "-n", &srv, "link", "set", &port, "master", "br0", "up",
            ]);
            let public = format!("10.99.0.1{n}/24");
            run(&["ip", "-n", &nat, "addr", "add", &public, "dev", "eth0"]);
            run(&["ip", "-n", &nat, "link", "set", "eth0", "up"]);
            // The private side, and the host behind it.
            run(&[
                "ip", "-n", &nat, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0",
                "netns", &host,
            ]);
            let gw = format!("10.{n}.0.1");
            run(&[
                "ip",
                "-n",
                &nat,
                "addr",
                "add",
                &format!("{gw}/24"),
                "dev",
                "lan0",
            ]);
            run(&["ip", "-n", &nat, "link", "set", "lan0", "up"]);
            let addr = format!("10.{n}.0.2/24");
            run(&["ip", "-n", &host, "addr", "add", &addr, "dev", "eth0"]);
            run(&["ip", "-n", &host, "link", "set", "eth0", "up"]);
            run(&["ip", "-n", &host, "route", "add", "default", "via", &gw]);
            inside(&nat, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            t.nat(&nat, &format!("10.99.0.1{n}"));
            let dir = PathBuf::from("/etc/netns").join(&host);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("hosts"),
                format!("127.0.0.1 localhost\n10.99.0.1 {CONTROL}\n"),
            )
            .unwrap();
        }
        t
    }

    /// The NAT's rules: SNAT of the private side to `public` (the kernel
    /// keeps the source port when it is free), forwarding only outwards
    /// and for replies, and nothing new accepted from outside (so an
    /// unsolicited packet never leaves a conntrack entry behind either).
    fn nat(&self, nat: &str, public: &str) {
        let rules = format!(
            "flush ruleset
table ip nat {{
  chain post {{ type nat hook postrouting priority srcnat; oifname \"eth0\" snat to {public}; }}
}}
table inet fw {{
  chain forwarding {{ type filter hook forward priority filter; policy drop;
    ct state established,related accept; iifname \"lan0\" oifname \"eth0\" accept; }}
  chain incoming {{ type filter hook input priority filter;
    iifname \"eth0\" ct state new counter drop; }}
}}
"
        );
        let mut c = Command::new("ip")
            .args(["netns", "exec", nat, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        assert!(c.wait().unwrap().success(), "nft in {nat}");
    }

    /// Unsolicited packets the NAT dropped from outside.
    fn dropped(&self, nat: &str) -> u64 {
        let text = inside(
            &self.ns(nat),
            &["nft", "list", "chain", "inet", "fw", "incoming"],
        );
        text.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    fn runewarp(&self, ns: &str, home: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(ns), BIN])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home)
            .env("RUNEWARP_LOG", "info")
            .current_dir(home);
        c
    }

    fn ping(&self, ns: &str, dst: &str) -> bool {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(ns),
                "ping",
                "-n",
                "-c1",
                "-W2",
                dst,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in NAMES {
            let ns = self.ns(n);
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
        }
    }
}

/// Receives one TCP connection on ADDR:5202, says `half` once half of
/// MiB have arrived, and at the end answers with the byte count.
const RECEIVER: &str = r#"
import socket, sys
want = int(sys.argv[2]) << 20
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], 5202)); l.listen(1); print("listening", flush=True)
c, _ = l.accept(); got = 0; said = False
while True:
    b = c.recv(1 << 20)
    if not b: break
    got += len(b)
    if not said and got >= want // 2: print("half", flush=True); said = True
c.sendall(b"%d" % got); c.close(); print("done", got, flush=True)
"#;

/// Sends MiB to ADDR:5202 and prints Mbit/s once the receiver confirms.
const SENDER: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], 5202), timeout=90)
chunk = bytes(1 << 20); t0 = time.monotonic()
for _ in range(int(sys.argv[2])): s.sendall(chunk)
s.shutdown(socket.SHUT_WR); n = int(s.recv(32))
assert n == int(sys.argv[2]) << 20, n
print(n * 8 / 1e6 / (time.monotonic() - t0))
"#;

/// A transfer of `mib` MiB from namespace `from` to `addr` in `to`:
/// `during` runs once half has arrived; returns Mbit/s.
fn transfer(
    t: &Topology,
    from: &str,
    to: &str,
    addr: &str,
    mib: u32,
    during: impl FnOnce(),
) -> f64 {
    let mib = mib.to_string();
    let mut receiver = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.ns(to),
            "timeout",
            "120",
            "python3",
            "-c",
            RECEIVER,
        ])
        .args([addr, &mib])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut lines = std::io::BufReader::new(receiver.stdout.take().unwrap()).lines();
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("listening")
    );
    let sender = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.ns(from),
            "timeout",
            "120",
            "python3",
            "-c",
            SENDER,
        ])
        .args([addr, &mib])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("half"));
    during();
    let out = sender.wait_with_output().unwrap();
    let _ = receiver.kill();
    let _ = receiver.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().unwrap_or_else(|_| {
        panic!(
            "transfer {from} → {to} failed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Seconds into the day of a log line's timestamp (`...T20:11:20.59Z`).
fn at(line: &str) -> f64 {
    let time = line.split('T').nth(1).and_then(|t| t.split('Z').next());
    time.map(|t| t.split(':').filter_map(|x| x.parse::<f64>().ok()))
        .map(|parts| parts.fold(0.0, |acc, x| acc * 60.0 + x))
        .unwrap_or(0.0)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default())
        .unwrap_or(serde_json::Value::Null)
}

/// `node`'s data-plane view of its one peer.
fn peer(home: &Path, node: &str) -> serde_json::Value {
    json(&home.join(node).join("dataplane.json"))["peers"][0].clone()
}

#[test]
fn nodes_behind_two_nats_find_a_direct_path_and_keep_it_when_a_mapping_changes() {
    if !opt_in::enabled(
        opt_in::NETNS,
        "mesh_direct",
        "root, network namespaces, /dev/net/tun, nft, conntrack, ping and python3",
    ) {
        return;
    }
    assert!(
        unsafe { libc::geteuid() } == 0,
        "tests/mesh_direct.rs needs root; leave RUNEWARP_TEST_NETNS unset to skip it"
    );
    let t = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    std::fs::write(
        home.join("control.toml"),
        format!(
            "[control]\nlisten-address = \"10.99.0.1:7443\"\nhostname = \"{CONTROL}\"\nstate-dir = \"control-state\"\n"
        ),
    )
    .unwrap();
    let mut c = t.runewarp("srv", home);
    c.args(["control", "-c", "control.toml"]);
    let control = Running::spawn_logged(c, &home.join("control.log"));
    control.wait_event("control_started", Duration::from_secs(20));
    let out = output_of(
        Command::new(BIN)
            .args(["control", "-c", "control.toml", "setup-key", "create"])
            .args(["--user", "alice@mesh.test", "--reusable"])
            .current_dir(home)
            .env("HOME", home),
    );
    let key = out.lines().last().unwrap().trim().to_string();

    let node = |ns: &str, endpoints: &[&str]| {
        let mut c = t.runewarp(ns, home);
        c.args([
            "node",
            "up",
            "--control",
            &format!("https://{CONTROL}:7443"),
        ])
        .args(["--setup-key", &key])
        .args(["--ca-file", "control-state/tls/server-ca.crt"])
        .args(["--hostname", ns, "--state-dir", ns, "--tun", "rw0"]);
        for e in endpoints {
            c.args(["--endpoint", e]);
        }
        Running::spawn_logged(c, &home.join(format!("{ns}.log")))
    };
    let started = Instant::now();
    // nat1 will fail over to its second public address: the operator
    // lists both.
    let a = node("a", &["10.99.0.11:41641", "10.99.0.21:41641"]);
    let b = node("b", &["10.99.0.12:41641"]);
    let direct = |n: &str, endpoint: &str| {
        let p = peer(home, n);
        p["path"] == "direct" && p["endpoint"] == endpoint
    };
    let within = Duration::from_secs(40);
    let show = |what: &str| format!("{what}\n{}\n{}", a.log_text(), b.log_text());
    let start = Instant::now();
    while !(direct("a", "10.99.0.12:41641") && direct("b", "10.99.0.11:41641")) {
        assert!(start.elapsed() < within, "{}", show("no direct path"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let to_direct = started.elapsed();
    // From learning of the peer to the first confirmed path, on a.
    let probing = at(&a.events("path_changed")[0]) - at(&a.events("peer_added")[0]);
    // Filtering is endpoint-dependent: the first probe to cross was
    // dropped by the NAT it reached.
    assert!(t.dropped("nat1") + t.dropped("nat2") > 0);
    // A call-me-maybe crossed (the first may find the peer not yet
    // connected to the control server, 409; the sending task may log
    // after the path is up).
    wait_until("a call-me-maybe delivered", Duration::from_secs(10), || {
        let crossed = |x: &Running, y: &Running| {
            !x.events("call_me_maybe_sent").is_empty()
                && !y.events("call_me_maybe_received").is_empty()
        };
        crossed(&a, &b) || crossed(&b, &a)
    });

    let mesh_addr = |n: &str| {
        json(&home.join(n).join("enrolment.json"))["addresses"][0]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (a4, b4) = (mesh_addr("a"), mesh_addr("b"));
    wait_until("a pings b", Duration::from_secs(15), || t.ping("a", &b4));
    assert!(t.ping("b", &a4), "b pings a");
    let status = t
        .runewarp("a", home)
        .args(["node", "status", "--state-dir", "a"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.contains("direct 10.99.0.12:41641\trtt "), "{status}");
    assert!(peer(home, "a")["rtt_ms"].is_u64(), "{status}");

    // 100 MiB over the direct path; the same through nat1 to the server
    // namespace, without the mesh, as the baseline.
    let mesh = transfer(&t, "a", "b", &b4, 100, || {});
    let plain = transfer(&t, "a", "srv", "10.99.0.1", 100, || {});

    // nat1 fails over to 10.99.0.21 half way through a transfer: its old
    // mappings are gone (conntrack flushed). b's first probe round also
    // pinged a's second address, so nat2 still holds that hole: b sees
    // a's traffic from the new address and roams to it.
    let nat1 = t.ns("nat1");
    inside(
        &nat1,
        &["ip", "addr", "add", "10.99.0.21/24", "dev", "eth0"],
    );
    // When (seconds into the UTC day, as in the logs) nat1 last failed
    // over.
    let failed_at = std::cell::Cell::new(0.0);
    let fail_over = |public: &str| {
        t.nat(&nat1, public);
        inside(&nat1, &["conntrack", "-F"]);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        failed_at.set(now.unwrap().as_secs_f64() % 86_400.0);
    };
    // Seconds from the last failover to b's last new direct path.
    let path_back = || {
        let lines = b.events("path_changed");
        let last = lines.iter().rev().find(|l| l.contains("path=\"direct\""));
        at(last.unwrap()) - failed_at.get()
    };
    let roamed = transfer(&t, "a", "b", &b4, 100, || fail_over("10.99.0.21"));
    wait_until("b on the new address", Duration::from_secs(10), || {
        direct("b", "10.99.0.21:41641")
    });
    assert!(direct("a", "10.99.0.12:41641"), "{}", show("a's path"));
    assert!(t.ping("a", &b4), "a pings b after the failover");
    let roamed_back = path_back();

    // And back, with nat2's hole towards the first address expired (as
    // it does 2 minutes after the last packet): nothing gets through
    // until both paths are declared dead and both nodes probe again.
    let reprobed = transfer(&t, "a", "b", &b4, 100, || {
        fail_over("10.99.0.11");
        let _ = Command::new("ip")
            .args(["netns", "exec", &t.ns("nat2"), "conntrack", "-D"])
            .args(["-p", "udp", "--orig-dst", "10.99.0.11"])
            .output();
    });
    wait_until(
        "b back on the first address",
        Duration::from_secs(10),
        || direct("b", "10.99.0.11:41641"),
    );
    wait_until("a direct again", Duration::from_secs(10), || {
        direct("a", "10.99.0.12:41641")
    });
    let died = |n: &Running| {
        n.events("path_changed")
            .iter()
            .any(|l| l.contains("reason=\"dead\""))
    };
    // One side declaring its path dead and probing anew is enough (its
    // probes reopen the other side's way too).
    assert!(died(&a) || died(&b), "{}", show("an old path died"));
    assert!(t.ping("a", &b4), "a pings b after the second failover");
    let reprobed_back = path_back();
    // A network change (a new host address on a) is noticed within 5 s:
    // reported, and b is called with the new candidates.
    inside(
        &t.ns("a"),
        &["ip", "addr", "add", "10.1.0.3/24", "dev", "eth0"],
    );
    let called = ["call_me_maybe_received", "peer=a", "candidates=4"];
    wait_until(
        "b called with 4 candidates",
        Duration::from_secs(15),
        || b.count(&called) > 0,
    );
    assert!(a.count(&["endpoints_reported", "count=4"]) > 0);
    assert!(direct("a", "10.99.0.12:41641"), "{}", show("a's path"));

    // How much longer a transfer took than the first: the outage as TCP
    // saw it (its retransmission backoff adds to the path's).
    let outage = |rate: f64| 838.860_8 / rate - 838.860_8 / mesh;
    eprintln!(
        "direct path {} ms after `node up` ({:.0} ms after a learnt of b); TCP a→b 100 MiB: \
         direct {mesh:.0} Mbit/s, plain through the NAT {plain:.0} Mbit/s; NAT failover half \
         way, roamed: path back after {roamed_back:.1} s, {roamed:.0} Mbit/s (about {:.1} s \
         lost); re-probed: path back after {reprobed_back:.1} s, {reprobed:.0} Mbit/s (about \
         {:.1} s lost)",
        to_direct.as_millis(),
        probing * 1000.0,
        outage(roamed),
        outage(reprobed)
    );
    drop((a, b, control));
}
