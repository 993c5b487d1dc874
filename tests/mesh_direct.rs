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
//! The nodes are told their NAT's address with `--endpoint` (there is
//! no relay here, so no STUN; tests/mesh_nat.rs covers direct paths from
//! STUN-learned candidates).
//!
//! Opt-in: `RUNEWARP_TEST_NETNS=1`, as root, with nft, conntrack and
//! ping. All traffic stays inside the namespaces the test makes
//! ([`common::netns`]); the namespaces, the `/etc/netns` entries and the
//! processes go on drop.
//!
//! ```text
//!  a 192.168.1.2 ─ nat1 (198.18.0.2, later .200) ─┐
//!                                                 ├─ public br0 198.18.0.1 (control)
//!  b 192.168.2.2 ─ nat2 (198.18.0.3) ─────────────┘
//! ```

mod common;

use std::cell::Cell;
use std::time::{Duration, Instant};

use common::mesh::{mesh_v4, node, node_status, path, setup_key, transfer, transfer_during, world};
use common::netns::Mapping;
use common::proc::{Running, wait_until};

/// Seconds into the day of a log line's timestamp (`...T20:11:20.59Z`).
fn at(line: &str) -> f64 {
    let time = line.split('T').nth(1).and_then(|t| t.split('Z').next());
    time.map(|t| t.split(':').filter_map(|x| x.parse::<f64>().ok()))
        .map(|parts| parts.fold(0.0, |acc, x| acc * 60.0 + x))
        .unwrap_or(0.0)
}

/// What the namespace test needs.
const NEEDS: &str = "root, network namespaces, /dev/net/tun, nft, conntrack and ping";

#[test]
fn nodes_behind_two_nats_find_a_direct_path_and_keep_it_when_a_mapping_changes() {
    let Some((mut net, srv, home, servers)) = world(NEEDS, false) else {
        return;
    };
    let (nat1, ha) = net.nat_with_device("nat1", Mapping::PortPreserving, "a");
    let (nat2, hb) = net.nat_with_device("nat2", Mapping::PortPreserving, "b");
    // nat1's second public address, for the failover.
    const SECOND: &str = "198.18.0.200";
    let (pub1, pub2) = (
        format!("{}:41641", nat1.ns.addr),
        format!("{}:41641", nat2.ns.addr),
    );
    let second = format!("{SECOND}:41641");
    let key = setup_key(&home, &["--user", "alice@mesh.test"]);

    let started = Instant::now();
    // nat1 will fail over to its second public address: the operator
    // lists both.
    let a = node(
        &net,
        &home,
        &ha,
        "a",
        &key,
        &["--endpoint", &pub1, "--endpoint", &second],
    );
    let b = node(&net, &home, &hb, "b", &key, &["--endpoint", &pub2]);
    let direct = |n: &str, of: &str, endpoint: &str| {
        path(&home, n, of) == ("direct".to_string(), endpoint.to_string())
    };
    let within = Duration::from_secs(40);
    let show = |what: &str| format!("{what}\n{}\n{}", a.log_text(), b.log_text());
    let start = Instant::now();
    while !(direct("a", "b", &pub2) && direct("b", "a", &pub1)) {
        assert!(start.elapsed() < within, "{}", show("no direct path"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let to_direct = started.elapsed();
    // From learning of the peer to the first confirmed path, on a.
    let probing = at(&a.events("path_changed")[0]) - at(&a.events("peer_added")[0]);
    // Filtering is endpoint-dependent: the first probe to cross was
    // dropped by the NAT it reached.
    assert!(net.nat_dropped(&nat1) + net.nat_dropped(&nat2) > 0);
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

    let (a4, b4) = (mesh_v4(&home, "a"), mesh_v4(&home, "b"));
    wait_until("a pings b", Duration::from_secs(15), || {
        net.ping(&ha.name, &b4, 2)
    });
    assert!(net.ping(&hb.name, &a4, 2), "b pings a");
    let status = node_status(&net, &home, &ha, "a");
    assert!(status.contains(&format!("direct {pub2}\trtt ")), "{status}");
    assert!(
        common::mesh::peer(&home, "a", "b")["rtt_ms"].is_u64(),
        "{status}"
    );

    // 100 MiB over the direct path; the same through nat1 to the public
    // namespace, without the mesh, as the baseline.
    let mesh = transfer(&ha.name, &hb.name, &b4, 100);
    let plain = transfer(&ha.name, &srv.name, &srv.addr, 100);

    // nat1 fails over to SECOND half way through a transfer: its old
    // mappings are gone (conntrack flushed). b's first probe round also
    // pinged a's second address, so nat2 still holds that hole: b sees
    // a's traffic from the new address and roams to it.
    net.run(
        &nat1.ns.name,
        &["ip", "addr", "add", &format!("{SECOND}/24"), "dev", "wan0"],
    );
    // When (seconds into the UTC day, as in the logs) nat1 last failed
    // over.
    let failed_at = Cell::new(0.0);
    let fail_over = |public: &str| {
        net.nat_snat(&nat1, public);
        net.run(&nat1.ns.name, &["conntrack", "-F"]);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        failed_at.set(now.unwrap().as_secs_f64() % 86_400.0);
    };
    // Seconds from the last failover to b's last new direct path.
    let path_back = || {
        let lines = b.events("path_changed");
        let last = lines.iter().rev().find(|l| l.contains("path=\"direct\""));
        at(last.unwrap()) - failed_at.get()
    };
    let roamed = transfer_during(&ha.name, &hb.name, &b4, 100, || fail_over(SECOND));
    wait_until("b on the new address", Duration::from_secs(10), || {
        direct("b", "a", &second)
    });
    assert!(direct("a", "b", &pub2), "{}", show("a's path"));
    assert!(net.ping(&ha.name, &b4, 2), "a pings b after the failover");
    let roamed_back = path_back();

    // And back, with nat2's hole towards the first address expired (as
    // it does 2 minutes after the last packet): nothing gets through
    // until both paths are declared dead and both nodes probe again.
    let reprobed = transfer_during(&ha.name, &hb.name, &b4, 100, || {
        fail_over(&nat1.ns.addr);
        let _ = net
            .exec(&nat2.ns.name)
            .args(["conntrack", "-D", "-p", "udp", "--orig-dst", &nat1.ns.addr])
            .output();
    });
    wait_until(
        "b back on the first address",
        Duration::from_secs(10),
        || direct("b", "a", &pub1),
    );
    wait_until("a direct again", Duration::from_secs(10), || {
        direct("a", "b", &pub2)
    });
    let died = |n: &Running| {
        n.events("path_changed")
            .iter()
            .any(|l| l.contains("reason=\"dead\""))
    };
    // One side declaring its path dead and probing anew is enough (its
    // probes reopen the other side's way too).
    assert!(died(&a) || died(&b), "{}", show("an old path died"));
    assert!(
        net.ping(&ha.name, &b4, 2),
        "a pings b after the second failover"
    );
    let reprobed_back = path_back();
    // A network change (a new host address on a) is noticed within 5 s:
    // reported, and b is called with the new candidates.
    let extra = format!("{}.3/24", nat1.lan);
    net.run(&ha.name, &["ip", "addr", "add", &extra, "dev", "eth0"]);
    let called = ["call_me_maybe_received", "peer=a", "candidates=4"];
    wait_until(
        "b called with 4 candidates",
        Duration::from_secs(15),
        || b.count(&called) > 0,
    );
    assert!(a.count(&["endpoints_reported", "count=4"]) > 0);
    assert!(direct("a", "b", &pub2), "{}", show("a's path"));

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
    drop((a, b, servers));
    drop(net);
}
