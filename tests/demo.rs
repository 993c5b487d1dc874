//! `runewarp demo` end to end through the real binary: it must finish on
//! its own, exit 0, report both hops and the gated Service's sign-in page,
//! and print the sign-in mail its mail catcher received.

use std::time::Duration;

use assert_cmd::Command;

#[test]
fn demo_runs_both_hops_and_exits_zero() {
    let output = Command::cargo_bin("runewarp")
        .expect("the runewarp binary")
        .arg("demo")
        .env_remove("RUNEWARP_LOG")
        .timeout(Duration::from_secs(60))
        .output()
        .expect("run runewarp demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "runewarp demo failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    for needle in [
        "app.demo.runewarp.test",
        "secure.demo.runewarp.test",
        "passthrough",
        "terminate",
        "HTTP/1.1 200 OK",
        "held by  Local backend",
        "held by  Client instance",
        // The gated Service: sign-in page, and the caught mail printed.
        "gated.demo.runewarp.test",
        "HTTP/1.1 401 Unauthorized",
        "mail caught by the demo's mail catcher (to visitor@example.com)",
        "/_runewarp/gate/link?token=",
        "Or type this code into the waiting page: ",
    ] {
        assert!(
            stdout.contains(needle),
            "stdout lacks {needle:?}:\n{stdout}\nstderr:\n{stderr}"
        );
    }
    // The throw-away directory is gone afterwards.
    let dir = stdout
        .split_whitespace()
        .find(|w| w.contains("runewarp-demo-"))
        .map(|w| w.trim_end_matches(['.', ')', ',']))
        .expect("the report names its directory");
    assert!(!std::path::Path::new(dir).exists(), "{dir} was not removed");
}

#[path = "common/opt_in.rs"]
mod opt_in;

/// `runewarp demo mesh`, stopped after `timeout`.
fn demo_mesh(timeout: Duration) -> std::process::Output {
    Command::cargo_bin("runewarp")
        .expect("the runewarp binary")
        .args(["demo", "mesh"])
        .timeout(timeout)
        .output()
        .expect("run runewarp demo mesh")
}

#[test]
fn demo_mesh_without_root_says_it_needs_root() {
    if unsafe { libc::geteuid() } == 0 {
        return;
    }
    let output = demo_mesh(Duration::from_secs(20));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("needs root"), "{stderr}");
}

#[test]
fn demo_mesh_pings_every_pair_and_cleans_up() {
    if !opt_in::enabled(
        opt_in::NETNS,
        "demo mesh",
        "root, network namespaces, /dev/net/tun, iproute2 and ping",
    ) {
        return;
    }
    let output = demo_mesh(Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // n1 and n2 share a port-preserving NAT: direct over their LAN; n3
    // is behind a symmetric NAT: relayed both ways to each of them.
    assert_eq!(stdout.matches("path direct").count(), 2, "{stdout}");
    assert_eq!(stdout.matches("path relay").count(), 4, "{stdout}");
    // .ci/test installs nftables: the last node is a Subnet Connector.
    assert!(
        stdout.contains("10.0.5.10 (no agent, behind n3) first"),
        "{stdout}"
    );
    let prefix = stdout
        .split("namespace (")
        .nth(1)
        .and_then(|s| s.split("-*").next())
        .expect("the namespace prefix is printed");
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(prefix),
        "namespaces left behind"
    );
}
