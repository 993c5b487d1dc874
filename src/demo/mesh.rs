//! `runewarp demo mesh`: the mesh on one machine. As root it makes
//! network namespaces (see [`topology`]: three nodes behind two NATs),
//! starts a control server with a setup key, a relay and three nodes with
//! TUN devices (this binary, as child processes), pings between every pair
//! over WireGuard and prints the round trip and the path each ping took
//! (direct or relay, from the sender's `dataplane.json`);
//! the last node is also a Subnet Connector for a host that runs no agent
//! (when `nft` is installed), which the first node pings; then it stops the processes and removes the namespaces and its temporary
//! directory (also on Ctrl-C, and with `--keep-running` only then).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use super::DemoDir;
use crate::hostname::ServerHostname;
use crate::run::EXIT_FAILURE;
use crate::shutdown;
use crate::tls::material;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CONTROL_NAME: &str = "control.mesh.demo";
const CONTROL_PORT: u16 = 7443;
const RELAY_NAME: &str = "relay.mesh.demo";
const RELAY_PORT: u16 = 3478;
const NODES: [&str; 3] = ["n1", "n2", "n3"];
/// The subnet behind the last node (the Subnet Connector) and its host.
const SUBNET: &str = "10.0.5.0/24";
const SUBNET_HOST: &str = "10.0.5.10";
/// Upper bound for each wait (control up, maps, first ping).
const STEP: Duration = Duration::from_secs(30);

/// Where the demo's processes run.
struct Layout {
    /// The namespaces: the control server's, one per node (in [`NODES`]'
    /// order), the NAT routers', then the subnet host's.
    namespaces: Vec<String>,
    /// The control server's (and the relay's) address on the shared
    /// network.
    control_addr: String,
    /// `ip ...`/`nft ...` command lines that build it, in order.
    commands: Vec<String>,
}

/// The demo's network. A bridge namespace stands for the Internet and
/// holds the control server and the relay at 198.18.0.1. With `nat`
/// (nftables installed) the nodes sit behind two NAT routers on it: n1
/// and n2 behind a port-preserving one (192.168.1.0/24), n3 behind one
/// that picks a random port per flow (192.168.2.0/24: symmetric NAT, as
/// carrier-grade NAT often is). Both let in only replies to what went out.
/// So n1 and n2 find a direct path over their LAN and n3 talks to both
/// through the relay. Without `nat` the nodes sit on the bridge itself.
fn topology(prefix: &str, nat: bool) -> Layout {
    let named = |n: &str| format!("{prefix}-{n}");
    let srv = named("srv");
    let nodes: Vec<String> = NODES.iter().map(|n| named(n)).collect();
    let routers = if nat {
        vec![named("nat1"), named("nat2")]
    } else {
        Vec::new()
    };
    let lan = named("lan");
    let mut namespaces = vec![srv.clone()];
    namespaces.extend(nodes.iter().cloned());
    namespaces.extend(routers.iter().cloned());
    namespaces.push(lan.clone());
    let mut commands = Vec::new();
    for n in &namespaces {
        commands.push(format!("ip netns add {n}"));
        commands.push(format!("ip -n {n} link set lo up"));
    }
    commands.extend([
        format!("ip -n {srv} link add br0 type bridge"),
        format!("ip -n {srv} addr add 198.18.0.1/24 dev br0"),
        format!("ip -n {srv} link set br0 up"),
    ]);
    // Plug device `dev` of `ns` into the bridge as 198.18.0.(i+2).
    let plug = |commands: &mut Vec<String>, ns: &str, dev: &str, i: usize| {
        commands.extend([
            format!("ip -n {ns} link add {dev} type veth peer name p{i} netns {srv}"),
            format!("ip -n {srv} link set p{i} master br0 up"),
            format!("ip -n {ns} addr add 198.18.0.{}/24 dev {dev}", i + 2),
            format!("ip -n {ns} link set {dev} up"),
        ]);
    };
    if nat {
        let behind = [(&nodes[..2], "persistent"), (&nodes[2..], "random")];
        for (k, (router, (members, mapping))) in routers.iter().zip(behind).enumerate() {
            let net = format!("192.168.{}", k + 1);
            plug(&mut commands, router, "wan0", k);
            let nft = format!("ip netns exec {router} nft add");
            commands.extend([
                format!("ip -n {router} link add lan0 type bridge"),
                format!("ip -n {router} addr add {net}.1/24 dev lan0"),
                format!("ip -n {router} link set lan0 up"),
                format!("ip netns exec {router} sysctl -qw net.ipv4.ip_forward=1"),
                format!("{nft} table ip nat"),
                format!("{nft} chain ip nat post {{ type nat hook postrouting priority srcnat ; }}"),
                format!("{nft} rule ip nat post oifname wan0 masquerade {mapping}"),
                format!("{nft} table ip filter"),
                format!(
                    "{nft} chain ip filter forward {{ type filter hook forward priority filter ; policy drop ; }}"
                ),
                format!("{nft} rule ip filter forward iifname lan0 accept"),
                format!("{nft} rule ip filter forward ct state established,related accept"),
                // Nothing new from outside reaches the router either (no
                // conntrack entry that would make it change ports).
                format!("{nft} chain ip filter input {{ type filter hook input priority filter ; }}"),
                format!("{nft} rule ip filter input iifname wan0 ct state new drop"),
            ]);
            for (m, node) in members.iter().enumerate() {
                let addr = format!("{net}.{}", m + 2);
                commands.extend([
                    format!("ip -n {node} link add eth0 type veth peer name l{m} netns {router}"),
                    format!("ip -n {router} link set l{m} master lan0 up"),
                    format!("ip -n {node} addr add {addr}/24 dev eth0"),
                    format!("ip -n {node} link set eth0 up"),
                    format!("ip -n {node} route add default via {net}.1"),
                ]);
            }
        }
    } else {
        for (i, node) in nodes.iter().enumerate() {
            plug(&mut commands, node, "eth0", i);
        }
    }
    // A host without an agent on 10.0.5.0/24 behind the last node; it
    // has no default route (the connector masquerades).
    let connector = &nodes[NODES.len() - 1];
    commands.extend([
        format!("ip -n {lan} link add eth0 type veth peer name lan1 netns {connector}"),
        format!("ip -n {connector} addr add 10.0.5.1/24 dev lan1"),
        format!("ip -n {connector} link set lan1 up"),
        format!("ip -n {lan} addr add {SUBNET_HOST}/24 dev eth0"),
        format!("ip -n {lan} link set eth0 up"),
    ]);
    Layout {
        namespaces,
        control_addr: "198.18.0.1".into(),
        commands,
    }
}

/// Everything started; all stopped and removed on drop.
struct Running {
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for c in &self.children {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for c in &mut self.children {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in self.namespaces.iter().rev() {
            // Best effort: what is already gone is no error here.
            let _ = sh(&format!("ip netns del {n}"));
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(n));
        }
    }
}

/// Run `line` (split at spaces); Err with its stderr.
fn sh(line: &str) -> Result<(), BoxError> {
    let mut parts = line.split_whitespace();
    let program = parts.next().ok_or("empty command")?;
    let out = Command::new(program)
        .args(parts)
        .output()
        .map_err(|e| format!("{line}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{line}: {}", String::from_utf8_lossy(&out.stderr).trim()).into())
    }
}

/// Run the mesh demo; 0 when every pair answered.
pub async fn run(keep_running: bool) -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "runewarp demo mesh needs root: it makes network namespaces, TUN devices and routes (try: sudo runewarp demo mesh)"
        );
        return ExitCode::from(EXIT_FAILURE);
    }
    let (trigger, signals) = shutdown::channel();
    shutdown::on_signals(trigger);
    let dir = match DemoDir::create() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("runewarp demo mesh: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let prefix = format!("rwdemo{}", std::process::id());
    let mut running = Running {
        namespaces: Vec::new(),
        children: Vec::new(),
    };
    let mut interrupted = signals.clone();
    let outcome = tokio::select! {
        r = demo(&dir.path, &prefix, &mut running) => r,
        _ = interrupted.wait() => Err("interrupted".into()),
    };
    let code = match outcome {
        Ok(addrs) => {
            if keep_running {
                println!();
                println!("Still running. Try, as root (Ctrl-C stops everything):");
                for (ns, name) in running.namespaces.iter().skip(1).zip(NODES) {
                    println!(
                        "  ip netns exec {ns} ping {}          # from {name}",
                        addrs
                            .iter()
                            .find(|(n, _)| *n != name)
                            .map_or("", |(_, a)| a.as_str())
                    );
                    println!(
                        "  runewarp node status --state-dir {}",
                        dir.path.join(name).display()
                    );
                }
                let mut stop = signals.clone();
                stop.wait().await;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("runewarp demo mesh: {e}");
            eprintln!("  (logs were in {})", dir.path.display());
            ExitCode::from(EXIT_FAILURE)
        }
    };
    println!("Stopping the nodes and the control server, removing the namespaces...");
    drop(running);
    match dir.remove() {
        Ok(path) => println!("Stopped; removed {}.", path.display()),
        Err(e) => eprintln!("runewarp demo mesh: {e}"),
    }
    code
}

/// This binary in namespace `ns`, from `dir`, logging to `log`.
fn spawn(dir: &Path, ns: &str, args: &[&str], log: &str) -> Result<Child, BoxError> {
    let exe = std::env::current_exe()?;
    let out = std::fs::File::create(dir.join(log))?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args(args)
        .current_dir(dir)
        .env("RUNEWARP_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // Ctrl-C reaches the demo only; it stops the children itself.
        .process_group(0)
        .spawn()?;
    Ok(child)
}

/// Start `runewarp ARGS` (`ARGS[0]` names its log) in namespace `ns` and
/// wait until it logs `event`; how long that took.
async fn start(
    dir: &Path,
    ns: &str,
    args: &[&str],
    event: &str,
    running: &mut Running,
) -> Result<Duration, BoxError> {
    let log = format!("{}.log", args[0]);
    running.children.push(spawn(dir, ns, args, &log)?);
    let needle = format!("event=\"{event}\"");
    wait_for(&format!("{} logs {event}", args[0]), || {
        std::fs::read_to_string(dir.join(&log)).is_ok_and(|l| l.contains(&needle))
    })
    .await
}

/// Wait until `ok` holds, polling; Err naming `what` after [`STEP`].
async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) -> Result<Duration, BoxError> {
    let start = Instant::now();
    while !ok() {
        if start.elapsed() > STEP {
            return Err(format!("{what}: not within {} s", STEP.as_secs()).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(start.elapsed())
}

fn read_json(path: &Path) -> serde_json::Value {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// One ping from `ns` to `dst`: the round trip in ms, if answered.
async fn ping(ns: &str, dst: &str) -> Option<f64> {
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-n", "-c1", "-W2", dst])
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("time=")? + "time=".len();
    text[at..].split_whitespace().next()?.parse().ok()
}

/// The nodes' names and mesh addresses.
type Addresses = Vec<(&'static str, String)>;

/// Ping until answered (the first may wait for a handshake; at most
/// 10 s), then once more: both round trips.
async fn ping_twice(ns: &str, dst: &str) -> (Option<f64>, Option<f64>) {
    let start = Instant::now();
    let mut rtt = None;
    while rtt.is_none() && start.elapsed() < Duration::from_secs(10) {
        rtt = ping(ns, dst).await;
    }
    match rtt {
        Some(_) => (rtt, ping(ns, dst).await),
        None => (None, None),
    }
}

/// `runewarp control -c control.toml ARGS` in `dir`: its output, or Err
/// with its stderr.
fn admin(dir: &Path, args: &[&str]) -> Result<String, BoxError> {
    let mut all = vec!["control", "-c", "control.toml"];
    all.extend_from_slice(args);
    cli(dir, &all)
}

/// `runewarp ARGS` in `dir` (outside the namespaces): its output, or Err
/// with its stderr.
fn cli(dir: &Path, args: &[&str]) -> Result<String, BoxError> {
    let out = Command::new(std::env::current_exe()?)
        .args(args)
        .current_dir(dir)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            args.get(..2).unwrap_or(args).join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Start the relay (`runewarp server` with `[server.relay]`, trusting
/// the control server's `relay-key`) in namespace `ns` at `ip`.
async fn relay(dir: &Path, ns: &str, ip: &str, running: &mut Running) -> Result<(), BoxError> {
    let key = admin(dir, &["relay-key"])?.trim().to_string();
    // What `runewarp server cert init --dir relay-certs` does.
    material::init_server_cert(
        &dir.join("relay-certs"),
        &ServerHostname::parse(RELAY_NAME)?,
        false,
    )?;
    // The tunnel Server's listener (also the relay's TCP fallback) with
    // one Tunnel nobody uses: a Server needs one.
    std::fs::write(
        dir.join("server.toml"),
        format!(
            "[server]\nhostname = \"{RELAY_NAME}\"\npublic-bind-address = \"{ip}:8443\"\n\
             tunnel-bind-address = \"{ip}:8443\"\ncert-dir = \"relay-certs\"\ncontrol-socket = \"server.sock\"\n\
             [server.relay]\nlisten = \"{ip}:{RELAY_PORT}\"\ncontrol-key = \"{key}\"\n\
             [[server.tunnels]]\npublic-hostnames = [\"app.mesh.demo\"]\nclient-identity = \"{}\"\n",
            "0".repeat(64)
        ),
    )?;
    let took = start(
        dir,
        ns,
        &["server", "-c", "server.toml"],
        "relay_started",
        running,
    )
    .await?;
    println!(
        "  relay              udp {ip}:{RELAY_PORT} in {ns}, answers STUN too ({} ms)",
        took.as_millis()
    );
    Ok(())
}

async fn demo(dir: &Path, prefix: &str, running: &mut Running) -> Result<Addresses, BoxError> {
    // NAT routers and the Subnet Connector need nftables; without it the
    // nodes share the bridge and the demo shows them only.
    let nft = Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let layout = topology(prefix, nft);
    println!(
        "Runewarp mesh demo: a control server, a relay and {} nodes{}, each in its own network namespace ({prefix}-*).",
        NODES.len(),
        if nft { " behind two NATs" } else { "" }
    );
    for line in &layout.commands {
        if let Some(ns) = line.strip_prefix("ip netns add ") {
            running.namespaces.push(ns.to_string());
        }
        sh(line)?;
    }
    for ns in &layout.namespaces {
        let etc = PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&etc)?;
        std::fs::write(
            etc.join("hosts"),
            format!(
                "127.0.0.1 localhost\n{} {CONTROL_NAME}\n",
                layout.control_addr
            ),
        )?;
    }
    let ip = &layout.control_addr;
    std::fs::write(
        dir.join("control.toml"),
        format!(
            "[control]\nlisten-address = \"{ip}:{CONTROL_PORT}\"\nhostname = \"{CONTROL_NAME}\"\nstate-dir = \"control-state\"\n\
             [[control.relays]]\nname = \"demo\"\naddress = \"{ip}:{RELAY_PORT}\"\n"
        ),
    )?;
    let srv = &layout.namespaces[0];
    let args = ["control", "-c", "control.toml"];
    let took = start(dir, srv, &args, "control_started", running).await?;
    println!(
        "  control server     https://{CONTROL_NAME}:{CONTROL_PORT} in {srv} ({} ms)",
        took.as_millis()
    );
    relay(dir, srv, ip, running).await?;
    let out = admin(
        dir,
        &[
            "setup-key",
            "create",
            "--user",
            "demo@mesh.demo",
            "--reusable",
            "--expires",
            "1h",
        ],
    )?;
    let key = out.lines().last().unwrap_or("").trim().to_string();
    println!("  setup key          created (reusable, 1 h) for demo@mesh.demo");
    let control = format!("https://{CONTROL_NAME}:{CONTROL_PORT}");
    let connector = nft;
    for (i, (name, ns)) in NODES.iter().zip(&layout.namespaces[1..]).enumerate() {
        // Two nodes behind one NAT: a port each (it can keep only one
        // device's 41641).
        let port = (41641 + i).to_string();
        let mut args = vec![
            "node",
            "up",
            "--control",
            &control,
            "--setup-key",
            &key,
            "--ca-file",
            "control-state/tls/server-ca.crt",
            "--hostname",
            name,
            "--state-dir",
            name,
            "--tun",
            "rw0",
            "--listen-port",
            &port,
        ];
        if connector && i == NODES.len() - 1 {
            args.extend(["--advertise-routes", SUBNET]);
        }
        running
            .children
            .push(spawn(dir, ns, &args, &format!("{name}.log"))?);
    }
    let started = Instant::now();
    let mut addrs = Vec::new();
    for name in NODES {
        let state = dir.join(name);
        wait_for(&format!("{name} enrols and has its peers"), || {
            read_json(&state.join("dataplane.json"))["peers"]
                .as_array()
                .is_some_and(|p| p.len() == NODES.len() - 1)
        })
        .await?;
        let enrolment = read_json(&state.join("enrolment.json"));
        let addr = enrolment["addresses"][0]
            .as_str()
            .and_then(|a| a.split('/').next())
            .unwrap_or("")
            .to_string();
        println!("  node {name:<13} {addr:<15} up");
        addrs.push(addr);
    }
    println!(
        "  all nodes have their maps {} ms after `node up`",
        started.elapsed().as_millis()
    );
    println!();
    println!("Pings over WireGuard (path as the sender's data plane reports it):");
    let mut failed = 0;
    // Paths start on the relay and move to a direct one once probes
    // confirm it; the status file follows within 2 s. Allow that once.
    let settle = Instant::now() + Duration::from_secs(5);
    for (i, from) in NODES.iter().enumerate() {
        for (j, to) in NODES.iter().enumerate() {
            if i == j {
                continue;
            }
            let ns = &layout.namespaces[i + 1];
            let (rtt, again) = ping_twice(ns, &addrs[j]).await;
            let peer_status = || {
                read_json(&dir.join(from).join("dataplane.json"))["peers"]
                    .as_array()
                    .and_then(|p| p.iter().find(|p| p["hostname"] == *to).cloned())
                    .unwrap_or(serde_json::Value::Null)
            };
            let mut peer = peer_status();
            while peer["path"].as_str().is_none_or(|p| p != "direct") && Instant::now() < settle {
                tokio::time::sleep(Duration::from_millis(100)).await;
                peer = peer_status();
            }
            let path = peer["path"].as_str().unwrap_or("none");
            let endpoint = peer["endpoint"].as_str().unwrap_or("-");
            match rtt {
                Some(ms) => println!(
                    "  {from} → {to} ({:<12}) first {ms:>7.3} ms, then {}   path {path} {endpoint}",
                    addrs[j],
                    again.map_or("-".to_string(), |a| format!("{a:.3} ms"))
                ),
                None => {
                    failed += 1;
                    println!(
                        "  {from} → {to} ({:<12}) no answer   path {path} {endpoint}",
                        addrs[j]
                    );
                }
            }
        }
    }
    if connector {
        failed += subnet(dir, &layout.namespaces[1]).await?;
    } else {
        println!();
        println!("(no Subnet Connector: the `nft` command, nftables, is not installed)");
    }
    if failed > 0 {
        return Err(format!("{failed} of the pings got no answer").into());
    }
    Ok(NODES.into_iter().zip(addrs).collect())
}

/// Approve the last node's route as an admin would, wait for the first
/// node to get it, and ping the subnet host from there; 1 if it does not
/// answer.
async fn subnet(dir: &Path, first_ns: &str) -> Result<usize, BoxError> {
    let (first, connector) = (NODES[0], NODES[NODES.len() - 1]);
    let device = read_json(&dir.join(connector).join("enrolment.json"))["device_id"]
        .as_i64()
        .ok_or("the connector's enrolment has no device id")?
        .to_string();
    admin(dir, &["routes", "approve", "--device", &device, SUBNET])?;
    let took = wait_for(&format!("{first} gets the route to {SUBNET}"), || {
        read_json(&dir.join(first).join("netmap.json"))["peers"]
            .as_array()
            .is_some_and(|p| {
                p.iter().any(|p| {
                    p["allowed_ips"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|r| r == SUBNET))
                })
            })
    })
    .await?;
    println!();
    println!(
        "Subnet Connector: {connector} serves {SUBNET} (approved with `control routes approve`; {first} had the route {} ms later)",
        took.as_millis()
    );
    let (rtt, again) = ping_twice(first_ns, SUBNET_HOST).await;
    match rtt {
        Some(ms) => {
            println!(
                "  {first} → {SUBNET_HOST} (no agent, behind {connector}) first {ms:.3} ms, then {}",
                again.map_or("-".to_string(), |a| format!("{a:.3} ms"))
            );
            Ok(0)
        }
        None => {
            println!("  {first} → {SUBNET_HOST} (no agent, behind {connector}) no answer");
            Ok(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topology_names_every_namespace_it_makes() {
        for (nat, routers) in [(true, 2), (false, 0)] {
            let l = topology("rwdemo1", nat);
            let made: Vec<&str> = l
                .commands
                .iter()
                .filter_map(|c| c.strip_prefix("ip netns add "))
                .collect();
            assert_eq!(made, l.namespaces);
            assert_eq!(l.namespaces.len(), NODES.len() + 2 + routers);
            assert_eq!(l.namespaces[1], "rwdemo1-n1", "nodes follow the server");
            assert!(l.commands.iter().all(|c| c.len() < 200));
        }
    }
}
