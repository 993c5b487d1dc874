//! Opt-in switches for tests that need more than a plain `cargo test` may
//! assume (the Nix build sandbox runs the suite as an unprivileged user,
//! without network namespaces, with only the source fileset and no extra
//! programs on PATH). Such a test runs only when its variable is `1`;
//! otherwise it prints one skip line and passes. `.ci/test` sets both.
//!
//! Tests with `mod common;` use `common::opt_in`; the others include it
//! with `#[path = "common/opt_in.rs"] mod opt_in;`.
#![allow(dead_code)]

use std::io::Write;

/// Tests that need root and network namespaces (`ip netns`, veth, tc).
pub const NETNS: &str = "RUNEWARP_TEST_NETNS";
/// Tests that need programs besides our own binary on PATH (pebble,
/// pebble-challtestsrv, curl, python3, ...).
pub const EXTERNAL: &str = "RUNEWARP_TEST_EXTERNAL";

/// Whether the test named `test`, which needs `needs`, may run: `var` is
/// `1`. Otherwise the skip line goes straight to stderr (not captured by
/// the test harness, so it shows in a normal `cargo test` run).
pub fn enabled(var: &str, test: &str, needs: &str) -> bool {
    if std::env::var_os(var).is_some_and(|v| v == "1") {
        return true;
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs {needs}; set {var}=1 to run it (.ci/test does)"
    );
    false
}
