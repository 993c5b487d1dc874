//! The mesh data plane end to end (issue 17, direct path): a control
//! server and two nodes with TUN devices, each in its own network
//! namespace on a private bridge (10.77.0.0/24). Pings cross the mesh both
//! ways, an ACL change stops one direction within 2 s, and a revoked device
//! is cut off within 2 s. Opt-in: `RUNEWARP_TEST_NETNS=1`, as root. All
//! traffic stays inside the namespaces the test makes; the namespaces, the
//! `/etc/netns` entries and the processes go on drop.

#[path = "common/opt_in.rs"]
mod opt_in;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_runewarp");
const CONTROL_NAME: &str = "control.mesh.test";
const CONTROL_PORT: u16 = 7443;

/// The namespaces and their `/etc/netns` files; removed on drop.
struct Net {
    names: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    /// `srv` with a bridge at 10.77.0.1, `a` at .2, `b` at .3, `c` at .4.
    fn new() -> Net {
        let tag = format!("rwm{}", std::process::id());
        let names: Vec<String> = ["srv", "a", "b", "c"]
            .iter()
            .map(|n| format!("{tag}-{n}"))
            .collect();
        let net = Net { names };
        for n in &net.names {
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        let srv = net.names[0].as_str();
        ip(&["-n", srv, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", srv, "addr", "add", "10.77.0.1/24", "dev", "br0"]);
        ip(&["-n", srv, "link", "set", "br0", "up"]);
        for (i, n) in net.names[1..].iter().enumerate() {
            let port = format!("p{i}");
            ip(&[
                "-n", n, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", srv,
            ]);
            ip(&["-n", srv, "link", "set", &port, "master", "br0", "up"]);
            ip(&[
                "-n",
                n,
                "addr",
                "add",
                &format!("10.77.0.{}/24", i + 2),
                "dev",
                "eth0",
            ]);
            ip(&["-n", n, "link", "set", "eth0", "up"]);
            // `ip netns exec` bind-mounts this over /etc/hosts.
            let dir = PathBuf::from("/etc/netns").join(n);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("hosts"),
                format!("127.0.0.1 localhost\n10.77.0.1 {CONTROL_NAME}\n"),
            )
            .unwrap();
        }
        net
    }

    fn srv(&self) -> &str {
        &self.names[0]
    }
    fn a(&self) -> &str {
        &self.names[1]
    }
    fn b(&self) -> &str {
        &self.names[2]
    }
    fn c(&self) -> &str {
        &self.names[3]
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

    /// One ping from `ns` to `dst`, waiting at most `wait_s` for the
    /// answer.
    fn ping(&self, ns: &str, dst: &str, wait_s: u32) -> bool {
        Command::new("ip")
            .args(["netns", "exec", ns, "ping", "-n", "-c1"])
            .arg(format!("-W{wait_s}"))
            .arg(dst)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

/// A TCP sink: reads until EOF, then answers with the byte count.
const SINK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
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

impl Net {
    /// TCP throughput (Mbit/s) from `from` to `to_addr` in namespace `to`.
    fn throughput(&self, from: &str, to: &str, to_addr: &str, mib: u32) -> f64 {
        let mut sink = Command::new("ip")
            .args(["netns", "exec", to, "python3", "-c", SINK, to_addr])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(sink.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let out = Command::new("ip")
            .args([
                "netns", "exec", from, "timeout", "120", "python3", "-c", SOURCE,
            ])
            .arg(to_addr)
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

/// A process with its log; killed on drop.
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

    /// Lines with `event="NAME"` and every one of `parts`.
    fn lines(&self, event: &str, parts: &[&str]) -> usize {
        let needle = format!("event=\"{event}\"");
        self.log()
            .lines()
            .filter(|l| l.contains(&needle) && parts.iter().all(|p| l.contains(p)))
            .count()
    }

    /// Wait for such a line; panics with the log after `within`.
    fn wait(&mut self, event: &str, parts: &[&str], within: Duration) -> Duration {
        let start = Instant::now();
        while self.lines(event, parts) == 0 {
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
        start.elapsed()
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

fn admin(home: &Path, args: &[&str]) -> String {
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
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

#[test]
fn nodes_ping_each_other_over_wireguard_and_the_filter_and_revocation_apply() {
    if !opt_in::enabled(
        opt_in::NETNS,
        "mesh",
        "root, network namespaces, /dev/net/tun, iproute2 and ping",
    ) {
        return;
    }
    assert!(
        unsafe { libc::geteuid() } == 0,
        "tests/mesh.rs needs root (network namespaces, TUN devices); leave RUNEWARP_TEST_NETNS unset to skip it"
    );
    let net = Net::new();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    std::fs::write(
        home.join("control.toml"),
        format!(
            "[control]\nlisten-address = \"10.77.0.1:{CONTROL_PORT}\"\nhostname = \"{CONTROL_NAME}\"\nstate-dir = \"control-state\"\n"
        ),
    )
    .unwrap();
    let start_control = |log: &str| {
        let mut c = net.runewarp(net.srv(), home);
        c.args(["control", "-c", "control.toml"]);
        let mut control = Proc::spawn(c, home.join(log));
        control.wait("control_started", &[], Duration::from_secs(20));
        control
    };
    let control = start_control("control.log");
    let key = admin(
        home,
        &[
            "setup-key",
            "create",
            "--user",
            "alice@mesh.test",
            "--reusable",
        ],
    );
    let key = key.lines().last().unwrap().trim().to_string();

    let node = |ns: &str, name: &str| {
        let mut c = net.runewarp(ns, home);
        c.args(["node", "up", "--control"])
            .arg(format!("https://{CONTROL_NAME}:{CONTROL_PORT}"))
            .args([
                "--setup-key",
                &key,
                "--ca-file",
                "control-state/tls/server-ca.crt",
            ])
            .args(["--hostname", name, "--state-dir", name])
            .args(["--tun", "rw0", "--listen-port", "41641"]);
        Proc::spawn(c, home.join(format!("{name}.log")))
    };
    let started = Instant::now();
    let mut a = node(net.a(), "a");
    let mut b = node(net.b(), "b");
    let up = Duration::from_secs(30);
    a.wait("dataplane_started", &[], up);
    b.wait("dataplane_started", &[], up);
    // Each learns the other's host candidate from its map.
    a.wait("peer_endpoint", &["peer=b", "10.77.0.3:41641"], up);
    b.wait("peer_endpoint", &["peer=a", "10.77.0.2:41641"], up);
    let addr = |name: &str, i: usize| {
        json(&home.join(name).join("enrolment.json"))["addresses"][i]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (a4, b4, b6) = (addr("a", 0), addr("b", 0), addr("b", 1));

    // The first ping may wait for the handshake.
    let first = wait_until("a pings b", Duration::from_secs(10), || {
        net.ping(net.a(), &b4, 2)
    });
    eprintln!(
        "first ping a→b {} ms after the ping loop began, {} ms after `node up`",
        first.as_millis(),
        started.elapsed().as_millis()
    );
    assert!(net.ping(net.b(), &a4, 2), "b pings a");
    assert!(net.ping(net.a(), &b6, 2), "a pings b over IPv6");

    if std::env::var("RUNEWARP_MESH_BENCH").is_ok_and(|v| v == "1") {
        let mib = 256;
        let plain = net.throughput(net.a(), net.b(), "10.77.0.3", mib);
        let mesh = net.throughput(net.a(), net.b(), &b4, mib);
        eprintln!(
            "TCP a→b, {mib} MiB: plain veth {plain:.0} Mbit/s, over the mesh {mesh:.0} Mbit/s ({:.0} %)",
            100.0 * mesh / plain
        );
    }

    wait_until("a's status shows b's path", Duration::from_secs(5), || {
        let s = json(&home.join("a/dataplane.json"));
        s["peers"][0]["endpoint"] == "10.77.0.3:41641"
            && s["peers"][0]["path"] == "direct"
            && s["peers"][0]["last_handshake_s"].is_u64()
            && s["peers"][0]["rx_bytes"].as_u64().unwrap_or(0) > 0
    });
    let status = net
        .runewarp(net.a(), home)
        .args(["node", "status", "--state-dir", "a"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.contains("direct 10.77.0.3:41641"), "{status}");
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(home.join("a/dataplane.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode, 0o600);

    // A third device joins: a adds it without touching b's session (the
    // same Tunn: its byte counters keep counting, no second peer_added).
    let rx_b = |home: &Path| {
        json(&home.join("a/dataplane.json"))["peers"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["hostname"] == "b").cloned())
            .and_then(|p| p["rx_bytes"].as_u64())
            .unwrap_or(0)
    };
    let before = rx_b(home);
    assert!(before > 0);
    let mut c = node(net.c(), "c");
    c.wait("peer_endpoint", &["peer=a", "10.77.0.2:41641"], up);
    a.wait("peer_endpoint", &["peer=c", "10.77.0.4:41641"], up);
    let c4 = addr("c", 0);
    wait_until("a pings c", Duration::from_secs(10), || {
        net.ping(net.a(), &c4, 2)
    });
    assert!(net.ping(net.a(), &b4, 2), "a still pings b");
    assert_eq!(a.lines("peer_added", &["peer=b"]), 1, "{}", a.log());
    wait_until("b's counters keep counting", Duration::from_secs(5), || {
        rx_b(home) > before
    });
    drop(c);

    // With the control server away, a restarted node comes back from its
    // cached map and reaches b again.
    drop(control);
    drop(a);
    let mut a = node(net.a(), "a");
    a.wait("dataplane_cached_map", &[], up);
    wait_until("a pings b without control", Duration::from_secs(10), || {
        net.ping(net.a(), &b4, 2)
    });
    let control = start_control("control2.log");
    a.wait("node_connected", &[], Duration::from_secs(20));
    wait_until("b reconnects", Duration::from_secs(20), || {
        b.lines("node_connected", &[]) >= 2
    });

    // A policy that lets b reach a, but not a reach b: b's filter drops
    // a's pings; b's own pings to a still get their replies.
    std::fs::write(
        home.join("policy.json"),
        format!(r#"{{"acls": [{{"action": "accept", "src": ["{b4}"], "dst": ["{a4}:*"]}}]}}"#),
    )
    .unwrap();
    let applied = b.lines("dataplane_map_applied", &[]);
    let changed = Instant::now();
    admin(
        home,
        &["policy", "set", "--org", "mesh.test", "policy.json"],
    );
    wait_until("b applies the new map", Duration::from_secs(2), || {
        b.lines("dataplane_map_applied", &[]) > applied
    });
    assert!(
        b.lines("dataplane_map_applied", &["filter_rules=0"]) > 0,
        "{}",
        b.log()
    );
    let denied = changed.elapsed();
    assert!(denied < Duration::from_secs(2), "{denied:?}");
    assert!(!net.ping(net.a(), &b4, 1), "a→b is denied");
    assert!(net.ping(net.b(), &a4, 2), "b→a still passes, replies too");
    b.wait(
        "packet_dropped",
        &["peer=a", "reason=\"no_rule\""],
        Duration::from_secs(2),
    );
    wait_until("b counts the drop", Duration::from_secs(5), || {
        json(&home.join("b/dataplane.json"))["filter_drops"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });

    // Revocation: a drops b at once; b's agent stops.
    let list = admin(home, &["devices", "list"]);
    let b_id = list
        .lines()
        .find(|l| l.split('\t').nth(2) == Some("b"))
        .and_then(|l| l.split('\t').next())
        .unwrap()
        .to_string();
    let revoked = Instant::now();
    admin(home, &["devices", "revoke", &b_id]);
    a.wait("peer_removed", &["peer=b"], Duration::from_secs(2));
    let cut = revoked.elapsed();
    assert!(cut < Duration::from_secs(2), "{cut:?}");
    assert!(!net.ping(net.a(), &b4, 1), "b is cut off");
    wait_until("b stops", Duration::from_secs(5), || {
        b.child.try_wait().ok().flatten().is_some()
    });
    eprintln!(
        "ACL change applied by b in {} ms, revocation applied by a in {} ms",
        denied.as_millis(),
        cut.as_millis()
    );
    drop((a, b, control));
    drop(net);
}

#[test]
fn without_cap_net_admin_the_tun_flag_fails_clearly() {
    // Runs anywhere: as non-root the TUN device cannot be made; as root
    // a bad interface name is refused the same way, before anything runs.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("s")).unwrap();
    std::fs::write(
        dir.path().join("s/enrolment.json"),
        r#"{"control": "https://control.invalid:7443", "ca_file": null, "device_id": 1,
            "token": "rwt_x", "organisation": "o", "hostname": "h",
            "addresses": ["100.64.0.1", "fd00::1"]}"#,
    )
    .unwrap();
    let root = unsafe { libc::geteuid() } == 0;
    let name = if root { "bad/name" } else { "rw0" };
    let out = Command::new(BIN)
        .args(["node", "up", "--state-dir", "s", "--tun", name])
        .current_dir(dir.path())
        .env("RUNEWARP_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("data plane"), "{err}");
    assert!(err.contains("creating TUN device"), "{err}");
    if err.contains("Operation not permitted") {
        assert!(err.contains("needs CAP_NET_ADMIN"), "{err}");
    }
}
