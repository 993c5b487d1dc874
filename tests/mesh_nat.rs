//! Issue 17's NAT matrix end to end, without any `--endpoint`: every
//! candidate a node offers comes from its interfaces or from STUN (the
//! relay answers it). A public namespace runs the control server and a
//! relay; behind NAT A (port-preserving, endpoint-dependent filtering) sit
//! a1 and a2, behind NAT B (port-preserving) b, behind NAT C (`random`
//! ports: symmetric) c.
//!
//! - a1 ↔ a2 reach a direct path over their LAN (host candidates);
//! - a1 ↔ b and a2 ↔ b reach a direct path through the NATs, to the
//!   STUN-learned (reflexive) addresses;
//! - c ↔ anyone stays on the relay, and pings cross both ways;
//! - 100 MiB cross a direct pair and a relayed pair.
//!
//! It prints the figures docs/mesh.md quotes (time to first ping and to a
//! direct path, throughput direct, relayed and without the mesh, the
//! sending node's CPU seconds per GB). Opt-in: `RUNEWARP_TEST_NETNS=1`, as
//! root (iproute2, nftables, ping). Everything stays inside the
//! namespaces the test makes; they and the processes go on drop.

mod common;

use std::time::{Duration, Instant};

use common::mesh::{RELAY_PORT, cpu_seconds, mesh_v4, node, path, setup_key, transfer, world};
use common::netns::Mapping;
use common::proc::{Running, wait_until};

/// MiB moved per transfer.
const MIB: usize = 100;
/// What the namespace test needs.
const NEEDS: &str = "root, network namespaces, /dev/net/tun, iproute2, nftables and ping";

#[test]
fn direct_paths_form_behind_port_preserving_nats_and_symmetric_nat_uses_the_relay() {
    let Some((mut net, srv, home, servers)) = world(NEEDS, true) else {
        return;
    };
    let (mut nat_a, a1) = net.nat_with_device("nata", Mapping::PortPreserving, "a1");
    let a2 = net.behind(&mut nat_a, "a2");
    let (nat_b, b) = net.nat_with_device("natb", Mapping::PortPreserving, "b");
    let (nat_c, c) = net.nat_with_device("natc", Mapping::Random, "c");

    let key = setup_key(&home, &["--user", "alice@nat.test"]);
    let started = Instant::now();
    // Two devices behind one NAT use different ports: a NAT that keeps
    // ports can keep only one device's 41641.
    let n_a1 = node(&net, &home, &a1, "a1", &key, &[]);
    let n_a2 = node(&net, &home, &a2, "a2", &key, &["--listen-port", "41642"]);
    let n_b = node(&net, &home, &b, "b", &key, &[]);
    let n_c = node(&net, &home, &c, "c", &key, &[]);
    let nodes: [(&str, &Running); 4] = [("a1", &n_a1), ("a2", &n_a2), ("b", &n_b), ("c", &n_c)];
    let logs = || {
        nodes
            .iter()
            .map(|(n, r)| format!("--- {n}\n{}", r.log_text()))
            .collect::<String>()
    };
    let up = Duration::from_secs(30);
    for (n, r) in &nodes {
        wait_until(&format!("{n} registers with the relay"), up, || {
            !r.events("relay_registered").is_empty() || !r.events("node_failed").is_empty()
        });
    }
    // STUN through the relay: each node learns its NAT's public address.
    for (n, r) in &nodes {
        wait_until(&format!("{n} learns its reflexive address"), up, || {
            !r.events("reflexive_address").is_empty()
        });
    }
    for (r, nat) in [(&n_a1, &nat_a), (&n_b, &nat_b), (&n_c, &nat_c)] {
        let line = &r.events("reflexive_address")[0];
        assert!(
            line.contains(&format!("address={}:", nat.ns.addr)),
            "{line}"
        );
    }
    let v4 = |n: &str| mesh_v4(&home, n);
    wait_until("a1's map lists b", up, || {
        common::proc::peers(&home, "a1").is_some_and(|p| p.len() == 3)
    });
    let b4 = v4("b");
    wait_until("a1 pings b", Duration::from_secs(15), || {
        net.ping(&a1.name, &b4, 2)
    });
    let first_ping = started.elapsed();

    // Direct paths: a1 ↔ a2 on their LAN; a ↔ b to the reflexive
    // addresses (the NATs' public address with the node's own port).
    let (wan_a, wan_b) = (&nat_a.ns.addr, &nat_b.ns.addr);
    let expect = [
        ("a1", "a2", format!("{}:41642", a2.addr)),
        ("a2", "a1", format!("{}:41641", a1.addr)),
        ("a1", "b", format!("{wan_b}:41641")),
        ("b", "a1", format!("{wan_a}:41641")),
        ("a2", "b", format!("{wan_b}:41641")),
        ("b", "a2", format!("{wan_a}:41642")),
    ];
    let direct_ok = |(from, to, ep): &(&str, &str, String)| {
        path(&home, from, to) == ("direct".to_string(), ep.clone())
    };
    let start = Instant::now();
    while !expect.iter().all(direct_ok) {
        let seen: Vec<_> = expect
            .iter()
            .map(|(f, t, _)| format!("{f}→{t} {:?}", path(&home, f, t)))
            .collect();
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "no direct paths: {seen:?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let to_direct = started.elapsed();
    // Filtering is endpoint-dependent: a probe that came before the
    // other side's hole was dropped.
    assert!(net.nat_dropped(&nat_a) + net.nat_dropped(&nat_b) > 0);
    // Pings cross every pair, both ways.
    let names = [("a1", &a1), ("a2", &a2), ("b", &b), ("c", &c)];
    for (x, xs) in &names {
        for (y, _) in &names {
            if x != y {
                let dst = v4(y);
                wait_until(&format!("{x} pings {y}"), Duration::from_secs(10), || {
                    net.ping(&xs.name, &dst, 2)
                });
            }
        }
    }
    // c is behind a symmetric NAT: it and its peers use the relay.
    let relay = format!("{}:{RELAY_PORT}", srv.addr);
    for other in ["a1", "a2", "b"] {
        for (from, to) in [("c", other), (other, "c")] {
            assert_eq!(
                path(&home, from, to),
                ("relay".to_string(), relay.clone()),
                "{from}→{to}\n{}",
                logs()
            );
        }
    }

    // 100 MiB on a direct pair, on a relayed pair, and without the mesh
    // (a1 through NAT A to the public namespace); the CPU time of the
    // sending and receiving nodes and the relay during each.
    let c4 = v4("c");
    let relay_pid = servers.relay.as_ref().map_or(0, |r| r.pid());
    let cpu = || [n_a1.pid(), n_b.pid(), n_c.pid(), relay_pid].map(cpu_seconds);
    let cpu0 = cpu();
    let direct = transfer(&a1.name, &b.name, &b4, MIB);
    let cpu1 = cpu();
    let relayed = transfer(&a1.name, &c.name, &c4, MIB);
    let cpu2 = cpu();
    let plain = transfer(&a1.name, &srv.name, &srv.addr, MIB);
    let gb = MIB as f64 * 1.048_576 / 1000.0;
    // Neither transfer moved a path.
    assert!(direct_ok(&expect[2]), "a1→b still direct");
    assert_eq!(path(&home, "a1", "c").0, "relay", "a1→c still relayed");
    eprintln!(
        "mesh_nat: first ping a1→b {} ms after `node up`; all six direct paths {} ms after \
         `node up`; TCP {MIB} MiB a1→b direct {direct:.0} Mbit/s, a1→c relayed {relayed:.0} \
         Mbit/s, a1→server without the mesh {plain:.0} Mbit/s; CPU seconds per GB: direct \
         sender {:.1} receiver {:.1}; relayed sender {:.1} receiver {:.1} relay {:.1}",
        first_ping.as_millis(),
        to_direct.as_millis(),
        (cpu1[0] - cpu0[0]) / gb,
        (cpu1[1] - cpu0[1]) / gb,
        (cpu2[0] - cpu1[0]) / gb,
        (cpu2[2] - cpu1[2]) / gb,
        (cpu2[3] - cpu1[3]) / gb,
    );
    drop((n_a1, n_a2, n_b, n_c));
    drop(servers);
    drop(net);
}
