//! The multi-host harness (vm-tests/netns/run): the VM-test scenarios and
//! WAN faults on real processes, each host a network namespace. Opt-in: runs
//! only with `RUNEWARP_TEST_NETNS=1` (it needs root, network namespaces,
//! iproute2 and python3, none of which a plain `cargo test` or the Nix build
//! sandbox has); with the variable set and no root it fails, saying so.
//! `RUNEWARP_NETNS_BENCH=1` runs the benchmark instead (see
//! docs/testing-netns.md).

#[path = "common/opt_in.rs"]
mod opt_in;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn netns_harness() {
    if !opt_in::enabled(
        opt_in::NETNS,
        "netns_harness",
        "root, network namespaces, iproute2 and python3",
    ) {
        return;
    }
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the netns harness (tests/netns_harness.rs, vm-tests/netns/run) needs root: it creates \
         network namespaces, veth links and bridges. Run the tests as root (as .ci/test does), \
         or leave RUNEWARP_TEST_NETNS unset to skip it."
    );
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_runewarp"));
    // `cargo test` builds the examples next to the binaries.
    let impair = bin.parent().unwrap().join("examples").join("impair");
    assert!(
        impair.is_file(),
        "{} is missing: build it with `cargo build --example impair` (plain `cargo test` does)",
        impair.display()
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/vm-tests/netns/run");
    let bench = std::env::var("RUNEWARP_NETNS_BENCH").is_ok_and(|v| v == "1");
    let mut child = Command::new("python3")
        .arg(script)
        .arg("--runewarp")
        .arg(&bin)
        .arg("--impair")
        .arg(&impair)
        .spawn()
        .expect("python3 runs the harness");
    // Bounded: the harness cleans up on SIGTERM.
    let limit = Duration::from_secs(if bench { 900 } else { 420 });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            panic!("the netns harness did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.success(),
        "the netns harness failed ({status}); see its output above"
    );
}
