//! A mesh on a [`super::netns::Topology`]: the control server (and, when
//! asked, a relay: `runewarp server` with `[server.relay]`) in the public
//! namespace, `runewarp node up --tun rw0` in any namespace, and what the
//! namespace tests measure: a node's view of its peers, a TCP transfer
//! between two namespaces, a process's CPU time.
//!
//! Everything runs the real binary; processes stop when their
//! [`Running`] drops (drop them before the topology).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use super::netns::{Ns, Topology, in_netns};
use super::proc::{BIN, Home, Running};

/// The control server's name (every namespace's `/etc/hosts` has it).
pub const CONTROL_NAME: &str = "control.mesh.test";
pub const CONTROL_PORT: u16 = 7443;
/// The relay's UDP port, and the tunnel Server's public listener (the
/// relay's TCP fallback), on the public namespace's address.
pub const RELAY_PORT: u16 = 3478;
pub const SERVER_PORT: u16 = 8443;
/// A Client identity pin for the Server's one (unused) Tunnel.
const PIN: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// The control server and, with `relay`, a relay, both in the public
/// namespace `srv` (whose address must resolve as [`CONTROL_NAME`]).
pub struct Servers {
    pub control: Running,
    pub relay: Option<Running>,
}

/// `runewarp control -c control.toml ARGS` (outside the namespaces: it
/// only opens the state dir); its stdout.
pub fn admin(home: &Home, args: &[&str]) -> String {
    let mut all = vec!["control", "-c", "control.toml"];
    all.extend_from_slice(args);
    home.ok(&all)
}

/// `runewarp` in namespace `ns`, with a clean environment rooted at
/// `home` (add the subcommand and its arguments).
pub fn runewarp(net: &Topology, home: &Home, ns: &Ns) -> Command {
    let mut c = net.exec(&ns.name);
    c.arg(BIN)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .env("RUNEWARP_LOG", "info")
        .current_dir(home.path());
    c
}

/// This mesh test (named after its test crate, `tests/NAME.rs`), which
/// needs `needs`, opted in (`RUNEWARP_TEST_NETNS=1`): its
/// [`public_network`] (namespaces `NAME<pid>-*`), a [`Home`] and the
/// [`Servers`] (with `relay`, a relay too) started in the public
/// namespace. Not opted in: the skip line, and `None`. Destructured in
/// this order, the servers drop before the home and the topology.
pub fn world(needs: &str, relay: bool) -> Option<(Topology, Ns, Home, Servers)> {
    let test = env!("CARGO_CRATE_NAME");
    if !super::opt_in::enabled(super::opt_in::NETNS, test, needs) {
        return None;
    }
    let (net, srv) = public_network(test);
    let home = Home::new();
    let servers = Servers::start(&net, &home, &srv, relay);
    Some((net, srv, home, servers))
}

/// A new [`Topology`] (namespaces `PREFIX<pid>-*`) whose public namespace
/// answers as [`CONTROL_NAME`] everywhere; the public namespace. Panics
/// unless run as root (the namespace tests are opt-in).
pub fn public_network(prefix: &str) -> (Topology, Ns) {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the namespace tests need root; leave RUNEWARP_TEST_NETNS unset to skip them"
    );
    let mut net = Topology::new(prefix);
    let srv = net.public();
    net.add_host(CONTROL_NAME, &srv.addr);
    (net, srv)
}

impl Servers {
    /// Start the control server in `srv` (and with `relay` a relay it
    /// lists in every map, trusting its `relay-key`); wait until both
    /// listen.
    pub fn start(net: &Topology, home: &Home, srv: &Ns, relay: bool) -> Servers {
        let ip = &srv.addr;
        let mut toml = format!(
            "[control]\nlisten-address = \"{ip}:{CONTROL_PORT}\"\nhostname = \"{CONTROL_NAME}\"\nstate-dir = \"control-state\"\n"
        );
        if relay {
            toml += &format!(
                "[[control.relays]]\nname = \"r1\"\naddress = \"{ip}:{RELAY_PORT}\"\ntcp-address = \"{ip}:{SERVER_PORT}\"\n"
            );
        }
        home.write("control.toml", &toml);
        let mut c = runewarp(net, home, srv);
        c.args(["control", "-c", "control.toml"]);
        let control = Running::spawn_logged(c, &home.path().join("control.log"));
        control.wait_event("control_started", Duration::from_secs(20));
        let relay = relay.then(|| {
            let key = admin(home, &["relay-key"]).trim().to_string();
            home.ok(&[
                "server",
                "cert",
                "init",
                "--dir",
                "relay-certs",
                "--hostname",
                "relay.mesh.test",
            ]);
            home.write(
                "server.toml",
                &format!(
                    "[server]\nhostname = \"relay.mesh.test\"\npublic-bind-address = \"{ip}:{SERVER_PORT}\"\n\
                     tunnel-bind-address = \"{ip}:{SERVER_PORT}\"\ncert-dir = \"relay-certs\"\ncontrol-socket = \"server.sock\"\n\
                     [server.relay]\nlisten = \"{ip}:{RELAY_PORT}\"\ncontrol-key = \"{key}\"\n\
                     [[server.tunnels]]\npublic-hostnames = [\"app.mesh.test\"]\nclient-identity = \"{PIN}\"\n"
                ),
            );
            let mut c = runewarp(net, home, srv);
            c.args(["server", "-c", "server.toml"]);
            let r = Running::spawn_logged(c, &home.path().join("server.log"));
            r.wait_event("relay_started", Duration::from_secs(20));
            r
        });
        Servers { control, relay }
    }
}

/// A reusable setup key (`setup-key create --reusable ARGS`).
pub fn setup_key(home: &Home, args: &[&str]) -> String {
    let mut all = vec!["setup-key", "create", "--reusable"];
    all.extend_from_slice(args);
    admin(home, &all).lines().last().unwrap().trim().to_string()
}

/// `runewarp node up --tun rw0` for `name` (its state dir and log are
/// `home/name`, `home/name.log`) in namespace `ns`, with `extra` flags
/// (`--listen-port` defaults to 41641).
pub fn node(
    net: &Topology,
    home: &Home,
    ns: &Ns,
    name: &str,
    key: &str,
    extra: &[&str],
) -> Running {
    let mut c = runewarp(net, home, ns);
    node_up(&mut c, &format!("{CONTROL_NAME}:{CONTROL_PORT}"), name, key).args(["--tun", "rw0"]);
    if !extra.contains(&"--listen-port") {
        c.args(["--listen-port", "41641"]);
    }
    c.args(extra);
    Running::spawn_logged(c, &home.path().join(format!("{name}.log")))
}

/// Append `node up` for `name` (hostname and state dir `name`) with
/// setup key `key` to `c`, a `runewarp` command run in the home: it
/// enrols at `https://CONTROL` (`host:port`), trusting the CA in the
/// control server's `control-state`.
pub fn node_up<'c>(c: &'c mut Command, control: &str, name: &str, key: &str) -> &'c mut Command {
    c.args(["node", "up", "--control"])
        .arg(format!("https://{control}"))
        .args([
            "--setup-key",
            key,
            "--ca-file",
            "control-state/tls/server-ca.crt",
        ])
        .args(["--hostname", name, "--state-dir", name])
}

/// `runewarp node status --state-dir NAME` in namespace `ns`: its stdout.
pub fn node_status(net: &Topology, home: &Home, ns: &Ns, name: &str) -> String {
    let out = runewarp(net, home, ns)
        .args(["node", "status", "--state-dir", name])
        .output()
        .expect("node status runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The id (first column) of the row of a tab-separated admin listing
/// (`devices list`, `routes list`) whose column `column` is `value`.
pub fn listed_id(list: &str, column: usize, value: &str) -> String {
    list.lines()
        .find(|l| l.split('\t').nth(column) == Some(value))
        .and_then(|l| l.split('\t').next())
        .unwrap_or_else(|| panic!("{value} in {list}"))
        .to_string()
}

fn json(home: &Home, name: &str, file: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(home.path().join(name).join(file)).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

/// The node's first mesh address (IPv4), once it has enrolled.
pub fn mesh_v4(home: &Home, name: &str) -> String {
    json(home, name, "enrolment.json")["addresses"][0]
        .as_str()
        .unwrap_or_else(|| panic!("{name} has not enrolled"))
        .to_string()
}

/// Node `name`'s data-plane view of peer `peer` (`path`, `endpoint`, …;
/// Null until it has one).
pub fn peer(home: &Home, name: &str, peer: &str) -> serde_json::Value {
    let all = json(home, name, "dataplane.json")["peers"].clone();
    all.as_array()
        .and_then(|ps| ps.iter().find(|p| p["hostname"] == peer).cloned())
        .unwrap_or(serde_json::Value::Null)
}

/// `(path, endpoint)` of `name`'s view of `peer` ("" for none).
pub fn path(home: &Home, name: &str, of: &str) -> (String, String) {
    let p = peer(home, name, of);
    let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
    (s("path"), s("endpoint"))
}

/// Send `mib` MiB over TCP from namespace `from` to `to_addr`:5201 in
/// namespace `to` (both ends in this process, each socket made in its
/// namespace); the receiver confirms the byte count. Returns Mbit/s.
pub fn transfer(from: &str, to: &str, to_addr: &str, mib: usize) -> f64 {
    transfer_during(from, to, to_addr, mib, || {})
}

/// [`transfer`], running `during` once half of it has arrived.
pub fn transfer_during(
    from: &str,
    to: &str,
    to_addr: &str,
    mib: usize,
    during: impl FnOnce(),
) -> f64 {
    let addr: SocketAddr = format!("{to_addr}:5201").parse().expect("an IP address");
    let listener = in_netns(to, move || TcpListener::bind(addr).expect("bind the sink"));
    let (half_tx, half_rx) = std::sync::mpsc::channel();
    let half = (mib as u64) << 19;
    let sink = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("the sender connects");
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k as u64,
            }
            if n >= half {
                let _ = half_tx.send(());
            }
        }
        let _ = c.write_all(n.to_string().as_bytes());
    });
    let from = from.to_string();
    let sender = std::thread::spawn(move || {
        in_netns(&from, move || {
            let mut s =
                TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(120))).unwrap();
            let chunk = vec![0x5au8; 1 << 20];
            let start = Instant::now();
            for _ in 0..mib {
                s.write_all(&chunk).expect("the transfer goes on");
            }
            s.shutdown(Shutdown::Write).unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).expect("the sink answers");
            (answer, start.elapsed())
        })
    });
    if half_rx.recv_timeout(Duration::from_secs(120)).is_ok() {
        during();
    }
    let (got, took) = sender.join().expect("the sender thread");
    sink.join().expect("the sink thread");
    assert_eq!(got, ((mib as u64) << 20).to_string(), "bytes received");
    (mib as f64) * 8.0 * 1.048_576 / took.as_secs_f64()
}

/// User plus system CPU seconds process `pid` has used so far
/// (`/proc/PID/stat`, fields 14 and 15).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: count from after ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // rest[0] is field 3 (state): utime is field 14, stime 15.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}
