//! Network-namespace topologies for the mesh tests (and `runewarp demo
//! mesh`'s shape): a "public" namespace holding a bridge that stands for
//! the Internet, NAT routers on it with private LANs behind them, hosts on
//! either side, and subnets behind a Subnet Connector. Everything the
//! builder makes — namespaces, their `/etc/netns/NAME` files, and with
//! them every veth, bridge and nftables table inside — goes when the
//! [`Topology`] is dropped. Needs root, iproute2 and nftables (`nft`).
//!
//! ```text
//!            public namespace: bridge br0 198.18.0.1/24 ("the Internet")
//!           /              |                      \
//!   host (198.18.0.N)   NAT router (wan0 198.18.0.N)   ...
//!                          | lan0 192.168.K.1/24, masquerade
//!                       device (192.168.K.M, default route via .1)
//! ```
//!
//! - [`Topology::host`]: a namespace straight on the public bridge (the
//!   control server, a relay, or nodes on a flat network).
//! - [`Topology::nat`]: a NAT router; [`Mapping::PortPreserving`] keeps a
//!   device's source port (endpoint-independent mapping, what home routers
//!   do), [`Mapping::Random`] picks a new port per destination (symmetric
//!   NAT, as carrier-grade NAT often behaves). Filtering is endpoint
//!   dependent either way: only conntrack's established/related flows come
//!   back in from the WAN, and a new packet from the WAN to the router
//!   itself is dropped (counted: [`Topology::nat_dropped`]) before
//!   conntrack keeps an entry for it. Such an entry would hold the
//!   router's port towards that sender, so a later outgoing packet of a
//!   device to that sender would get another port: the router would stop
//!   preserving ports exactly when hole punching needs it.
//! - [`Topology::behind`]: a device on a NAT router's LAN;
//!   [`Topology::nat_snat`] moves a router to another WAN address,
//!   [`Topology::nat_dropped`] counts what its filtering dropped.
//! - [`Topology::subnet`]: a plain host (no agent) on a LAN of its own
//!   behind an existing namespace (the Subnet Connector), which gets the
//!   LAN's `.1`.
//! - [`Topology::exec`], [`Topology::run`], [`in_netns`]: run a command,
//!   or a closure on a thread, inside a namespace.
//!
//! Include with `mod common;` (`common::netns`; it uses `common::run`).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// The public bridge's /24 (RFC 2544 benchmarking space: never routed).
pub const PUBLIC_NET: &str = "198.18.0";
/// The public namespace's own address on the bridge.
pub const PUBLIC_GATEWAY: &str = "198.18.0.1";

/// How a NAT router maps a device's source port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Keep the source port when free (endpoint-independent mapping).
    PortPreserving,
    /// A random port per flow (symmetric NAT).
    Random,
}

/// A namespace with its address on the network it sits on.
#[derive(Debug, Clone)]
pub struct Ns {
    pub name: String,
    /// The address the others reach it at (public or LAN).
    pub addr: String,
}

/// A NAT router.
#[derive(Debug, Clone)]
pub struct Nat {
    pub ns: Ns,
    /// The LAN's first three octets (`192.168.K`).
    pub lan: String,
    next_host: u8,
}

/// The namespaces made so far; all removed on drop.
pub struct Topology {
    prefix: String,
    names: Vec<String>,
    public: String,
    next_public: u8,
    next_lan: u8,
    /// `/etc/hosts` lines every namespace gets.
    hosts: Vec<(String, String)>,
}

/// Run `cmd`; panic with its stderr if it fails.
pub fn must(cmd: &mut Command) -> Output {
    super::run::succeeded(&format!("{cmd:?}"), cmd)
}

fn ip(args: &[&str]) {
    must(Command::new("ip").args(args));
}

/// `ip -n NS ARGS…`, the arguments split at spaces.
fn ipn(ns: &str, args: &str) {
    must(
        Command::new("ip")
            .args(["-n", ns])
            .args(args.split_whitespace()),
    );
}

/// Run `f` on a new thread that has entered namespace `ns` (sockets it
/// makes stay in that namespace); returns its result.
pub fn in_netns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        use std::os::fd::AsRawFd;
        // SAFETY: setns on an open namespace file; it changes only this
        // thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the namespace thread panicked")
}

impl Topology {
    /// A new topology whose namespaces are named `PREFIX<pid>-NAME`, with
    /// the public namespace and its bridge.
    pub fn new(prefix: &str) -> Topology {
        let mut t = Topology {
            prefix: format!("{prefix}{}", std::process::id()),
            names: Vec::new(),
            public: String::new(),
            next_public: 2,
            next_lan: 1,
            hosts: Vec::new(),
        };
        let public = t.namespace("pub");
        ipn(&public, "link add br0 type bridge");
        ipn(&public, &format!("addr add {PUBLIC_GATEWAY}/24 dev br0"));
        ipn(&public, "link set br0 up");
        t.public = public;
        t
    }

    /// The public namespace (it holds the bridge and answers at
    /// [`PUBLIC_GATEWAY`]: a good home for the control server).
    pub fn public(&self) -> Ns {
        Ns {
            name: self.public.clone(),
            addr: PUBLIC_GATEWAY.into(),
        }
    }

    /// Make an empty namespace with loopback up.
    fn namespace(&mut self, name: &str) -> String {
        let full = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &full]);
        self.names.push(full.clone());
        ipn(&full, "link set lo up");
        self.write_hosts(&full);
        full
    }

    /// `name ADDR` in every namespace's `/etc/hosts` (as `ip netns exec`
    /// shows it), now and for namespaces made later.
    pub fn add_host(&mut self, name: &str, addr: &str) {
        self.hosts.push((addr.into(), name.into()));
        for n in self.names.clone() {
            self.write_hosts(&n);
        }
    }

    fn write_hosts(&self, ns: &str) {
        let dir = PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).expect("/etc/netns is writable");
        let mut text = String::from("127.0.0.1 localhost\n");
        for (addr, name) in &self.hosts {
            text += &format!("{addr} {name}\n");
        }
        std::fs::write(dir.join("hosts"), text).expect("hosts file written");
    }

    /// A veth pair: `dev` in `ns`, `peer` in `peer_ns`, both up; `dev`
    /// gets `cidr`.
    fn veth(&self, ns: &str, dev: &str, cidr: &str, peer_ns: &str, peer: &str) {
        ipn(
            ns,
            &format!("link add {dev} type veth peer name {peer} netns {peer_ns}"),
        );
        ipn(ns, &format!("addr add {cidr} dev {dev}"));
        ipn(ns, &format!("link set {dev} up"));
        ipn(peer_ns, &format!("link set {peer} up"));
    }

    /// Plug a new veth `eth` of `ns` into the public bridge with the next
    /// public address; returns it.
    fn plug_public(&mut self, ns: &str, eth: &str) -> String {
        let n = self.next_public;
        self.next_public += 1;
        let addr = format!("{PUBLIC_NET}.{n}");
        self.veth(
            ns,
            eth,
            &format!("{addr}/24"),
            &self.public,
            &format!("p{n}"),
        );
        ipn(&self.public, &format!("link set p{n} master br0"));
        addr
    }

    /// A namespace on the public bridge (device `eth0`).
    pub fn host(&mut self, name: &str) -> Ns {
        let ns = self.namespace(name);
        let addr = self.plug_public(&ns, "eth0");
        Ns { name: ns, addr }
    }

    /// A NAT router: `wan0` on the public bridge, `lan0` the gateway of a
    /// new 192.168.K.0/24, forwarding with nftables masquerade.
    pub fn nat(&mut self, name: &str, mapping: Mapping) -> Nat {
        let ns = self.namespace(name);
        let addr = self.plug_public(&ns, "wan0");
        let lan = format!("192.168.{}", self.next_lan);
        self.next_lan += 1;
        ipn(&ns, "link add lan0 type bridge");
        ipn(&ns, &format!("addr add {lan}.1/24 dev lan0"));
        ipn(&ns, "link set lan0 up");
        self.sysctl(&ns, "net.ipv4.ip_forward", "1");
        let flags = match mapping {
            Mapping::PortPreserving => "persistent",
            Mapping::Random => "random",
        };
        self.nft(
            &ns,
            &format!(
                "table ip nat {{
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;
    oifname \"wan0\" masquerade {flags}
  }}
}}
table ip filter {{
  chain forward {{ type filter hook forward priority filter; policy drop;
    iifname \"lan0\" accept
    ct state established,related accept
  }}
  chain input {{ type filter hook input priority filter; policy accept;
    iifname \"wan0\" ct state new counter drop
  }}
}}
"
            ),
        );
        Nat {
            ns: Ns { name: ns, addr },
            lan,
            next_host: 2,
        }
    }

    /// A NAT router `name` ([`Topology::nat`]) with device `device`
    /// behind it ([`Topology::behind`]).
    pub fn nat_with_device(&mut self, name: &str, mapping: Mapping, device: &str) -> (Nat, Ns) {
        let mut nat = self.nat(name, mapping);
        let ns = self.behind(&mut nat, device);
        (nat, ns)
    }

    /// A device on `nat`'s LAN (`eth0`, default route via the router).
    pub fn behind(&mut self, nat: &mut Nat, name: &str) -> Ns {
        let ns = self.namespace(name);
        let port = format!("l{}", nat.next_host);
        let addr = format!("{}.{}", nat.lan, nat.next_host);
        nat.next_host += 1;
        self.veth(&ns, "eth0", &format!("{addr}/24"), &nat.ns.name, &port);
        ipn(&nat.ns.name, &format!("link set {port} master lan0"));
        ipn(&ns, &format!("route add default via {}.1", nat.lan));
        Ns { name: ns, addr }
    }

    /// A plain host `name` at `NET.10` on a new /24 `NET` (`10.0.5`)
    /// behind namespace `gateway`, which gets `NET.1` on device `dev`.
    /// The host has no default route: only the gateway's masquerade lets
    /// it answer anyone off its LAN.
    pub fn subnet(&mut self, gateway: &Ns, dev: &str, net: &str, name: &str) -> Ns {
        let ns = self.namespace(name);
        let addr = format!("{net}.10");
        self.veth(&ns, "eth0", &format!("{addr}/24"), &gateway.name, dev);
        ipn(&gateway.name, &format!("addr add {net}.1/24 dev {dev}"));
        Ns { name: ns, addr }
    }

    /// Set a sysctl (`net.ipv4.ip_forward`) inside namespace `ns`.
    pub fn sysctl(&self, ns: &str, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        must(
            self.exec(ns)
                .args(["sh", "-c", &format!("echo {value} > {path}")]),
        );
    }

    /// Load an nftables script inside namespace `ns` (one transaction,
    /// as `nft -f` would).
    pub fn nft(&self, ns: &str, script: &str) {
        self.run(ns, &["nft", script]);
    }

    /// `ip netns exec NS …`: add the program and its arguments.
    pub fn exec(&self, ns: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        c
    }

    /// Run `args` in `ns`; its output, or a panic with its stderr.
    pub fn run(&self, ns: &str, args: &[&str]) -> Output {
        must(self.exec(ns).args(args))
    }

    /// Make `nat` translate to `public` (an address of its `wan0`, such as
    /// a second one added with `ip addr add`) instead of masquerading to
    /// the first: a router failing over to another WAN address. Its
    /// conntrack entries stay until flushed (`conntrack -F`).
    pub fn nat_snat(&self, nat: &Nat, public: &str) {
        self.nft(
            &nat.ns.name,
            &format!(
                "flush chain ip nat postrouting\nadd rule ip nat postrouting oifname \"wan0\" snat to {public}\n"
            ),
        );
    }

    /// New packets from the WAN that NAT router `nat` dropped (probes that
    /// arrived before the router had a hole for them).
    pub fn nat_dropped(&self, nat: &Nat) -> u64 {
        let out = self.run(
            &nat.ns.name,
            &["nft", "list", "chain", "ip", "filter", "input"],
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// One ping from `ns` to `dst`, waiting at most `wait_s` for the
    /// answer.
    pub fn ping(&self, ns: &str, dst: &str, wait_s: u32) -> bool {
        self.exec(ns)
            .args(["ping", "-n", "-c1"])
            .arg(format!("-W{wait_s}"))
            .arg(dst)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Average round trip (ms) of `count` pings from `ns` to `dst` (None:
    /// no answers).
    pub fn rtt_ms(&self, ns: &str, dst: &str, count: u32) -> Option<f64> {
        let out = self
            .exec(ns)
            .args(["ping", "-n", "-q", "-i", "0.2", "-W2", "-c"])
            .arg(count.to_string())
            .arg(dst)
            .output()
            .ok()?;
        // "rtt min/avg/max/mdev = 0.051/0.063/0.080/0.010 ms"
        let text = String::from_utf8_lossy(&out.stdout);
        let stats = text.lines().find(|l| l.contains("min/avg/max"))?;
        stats
            .split('=')
            .nth(1)?
            .trim()
            .split('/')
            .nth(1)?
            .parse()
            .ok()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in self.names.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(n));
        }
    }
}
