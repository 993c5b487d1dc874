//! The mesh data plane end to end (issue 17, direct path): a control
//! server and two nodes with TUN devices, each in its own network
//! namespace on the public bridge of [`common::netns`] (198.18.0.0/24).
//! Pings cross the mesh both ways, an ACL change stops one direction
//! within 2 s, and a revoked device is cut off within 2 s. Opt-in:
//! `RUNEWARP_TEST_NETNS=1`, as root. All traffic stays inside the
//! namespaces the test makes; the namespaces, the `/etc/netns` entries and
//! the processes go on drop.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::mesh::{
    admin, listed_id, mesh_v4, node, node_status, runewarp, setup_key, transfer, world,
};
use common::proc::{BIN, Running, wait_until};

/// What the namespace test needs.
const NEEDS: &str = "root, network namespaces, /dev/net/tun, iproute2 and ping";

#[test]
fn nodes_ping_each_other_over_wireguard_and_the_filter_and_revocation_apply() {
    let Some((mut net, srv, home, servers)) = world(NEEDS, false) else {
        return;
    };
    let (ha, hb, hc) = (net.host("a"), net.host("b"), net.host("c"));
    let key = setup_key(&home, &["--user", "alice@mesh.test"]);
    let node = |ns: &common::netns::Ns, name: &str| node(&net, &home, ns, name, &key, &[]);
    let (a_ep, b_ep, c_ep) = (
        format!("{}:41641", ha.addr),
        format!("{}:41641", hb.addr),
        format!("{}:41641", hc.addr),
    );
    let json = |file: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(home.path().join(file)).unwrap_or_default())
            .unwrap_or(serde_json::Value::Null)
    };
    let started = Instant::now();
    let mut a = node(&ha, "a");
    let mut b = node(&hb, "b");
    let up = Duration::from_secs(30);
    a.wait_line(&["event=\"dataplane_started\""], up);
    b.wait_line(&["event=\"dataplane_started\""], up);
    // Each learns the other's host candidate from its map.
    a.wait_line(&["event=\"peer_endpoint\"", "peer=b", &b_ep], up);
    b.wait_line(&["event=\"peer_endpoint\"", "peer=a", &a_ep], up);
    let addr = |name: &str, i: usize| {
        json(&format!("{name}/enrolment.json"))["addresses"][i]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (a4, b4, b6) = (mesh_v4(&home, "a"), mesh_v4(&home, "b"), addr("b", 1));

    // The first ping may wait for the handshake.
    let first = wait_until("a pings b", Duration::from_secs(10), || {
        net.ping(&ha.name, &b4, 2)
    });
    eprintln!(
        "first ping a→b {} ms after the ping loop began, {} ms after `node up`",
        first.as_millis(),
        started.elapsed().as_millis()
    );
    assert!(net.ping(&hb.name, &a4, 2), "b pings a");
    assert!(net.ping(&ha.name, &b6, 2), "a pings b over IPv6");

    if std::env::var("RUNEWARP_MESH_BENCH").is_ok_and(|v| v == "1") {
        let mib = 256;
        let plain = transfer(&ha.name, &hb.name, &hb.addr, mib);
        let mesh = transfer(&ha.name, &hb.name, &b4, mib);
        eprintln!(
            "TCP a→b, {mib} MiB: plain veth {plain:.0} Mbit/s, over the mesh {mesh:.0} Mbit/s ({:.0} %)",
            100.0 * mesh / plain
        );
    }

    wait_until("a's status shows b's path", Duration::from_secs(5), || {
        let s = json("a/dataplane.json");
        s["peers"][0]["endpoint"] == b_ep.as_str()
            && s["peers"][0]["path"] == "direct"
            && s["peers"][0]["last_handshake_s"].is_u64()
            && s["peers"][0]["rx_bytes"].as_u64().unwrap_or(0) > 0
    });
    let status = node_status(&net, &home, &ha, "a");
    assert!(status.contains(&format!("direct {b_ep}")), "{status}");
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(home.path().join("a/dataplane.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode, 0o600);

    // A third device joins: a adds it without touching b's session (the
    // same Tunn: its byte counters keep counting, no second peer_added).
    let rx_b = || {
        json("a/dataplane.json")["peers"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["hostname"] == "b").cloned())
            .and_then(|p| p["rx_bytes"].as_u64())
            .unwrap_or(0)
    };
    let before = rx_b();
    assert!(before > 0);
    let mut c = node(&hc, "c");
    c.wait_line(&["event=\"peer_endpoint\"", "peer=a", &a_ep], up);
    a.wait_line(&["event=\"peer_endpoint\"", "peer=c", &c_ep], up);
    let c4 = mesh_v4(&home, "c");
    wait_until("a pings c", Duration::from_secs(10), || {
        net.ping(&ha.name, &c4, 2)
    });
    assert!(net.ping(&ha.name, &b4, 2), "a still pings b");
    assert_eq!(
        a.count(&["event=\"peer_added\"", "peer=b"]),
        1,
        "{}",
        a.log_text()
    );
    wait_until("b's counters keep counting", Duration::from_secs(5), || {
        rx_b() > before
    });
    drop(c);

    // With the control server away, a restarted node comes back from its
    // cached map and reaches b again.
    drop(servers);
    drop(a);
    // The restarted node's log starts afresh (it is appended to).
    std::fs::remove_file(home.path().join("a.log")).unwrap();
    let mut a = node(&ha, "a");
    a.wait_line(&["event=\"dataplane_cached_map\""], up);
    wait_until("a pings b without control", Duration::from_secs(10), || {
        net.ping(&ha.name, &b4, 2)
    });
    let mut c = runewarp(&net, &home, &srv);
    c.args(["control", "-c", "control.toml"]);
    let control = Running::spawn_logged(c, &home.path().join("control2.log"));
    control.wait_event("control_started", Duration::from_secs(20));
    a.wait_line(&["event=\"node_connected\""], Duration::from_secs(20));
    wait_until("b reconnects", Duration::from_secs(20), || {
        b.count(&["event=\"node_connected\""]) >= 2
    });

    // A policy that lets b reach a, but not a reach b: b's filter drops
    // a's pings; b's own pings to a still get their replies.
    home.write(
        "policy.json",
        &format!(r#"{{"acls": [{{"action": "accept", "src": ["{b4}"], "dst": ["{a4}:*"]}}]}}"#),
    );
    let applied = b.count(&["event=\"dataplane_map_applied\""]);
    let changed = Instant::now();
    admin(
        &home,
        &["policy", "set", "--org", "mesh.test", "policy.json"],
    );
    wait_until("b applies the new map", Duration::from_secs(2), || {
        b.count(&["event=\"dataplane_map_applied\""]) > applied
    });
    assert!(
        b.count(&["event=\"dataplane_map_applied\"", "filter_rules=0"]) > 0,
        "{}",
        b.log_text()
    );
    let denied = changed.elapsed();
    assert!(denied < Duration::from_secs(2), "{denied:?}");
    assert!(!net.ping(&ha.name, &b4, 1), "a→b is denied");
    assert!(net.ping(&hb.name, &a4, 2), "b→a still passes, replies too");
    b.wait_line(
        &["event=\"packet_dropped\"", "peer=a", "reason=\"no_rule\""],
        Duration::from_secs(2),
    );
    wait_until("b counts the drop", Duration::from_secs(5), || {
        json("b/dataplane.json")["filter_drops"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });

    // Revocation: a drops b at once; b's agent stops.
    let list = admin(&home, &["devices", "list"]);
    let b_id = listed_id(&list, 2, "b");
    let revoked = Instant::now();
    admin(&home, &["devices", "revoke", &b_id]);
    a.wait_line(
        &["event=\"peer_removed\"", "peer=b"],
        Duration::from_secs(2),
    );
    let cut = revoked.elapsed();
    assert!(cut < Duration::from_secs(2), "{cut:?}");
    assert!(!net.ping(&ha.name, &b4, 1), "b is cut off");
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
