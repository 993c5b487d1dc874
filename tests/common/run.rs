//! Running a helper program to completion in a test or bench: it has to
//! run and succeed, and its stderr explains a failure. Standard library
//! only, so a bench can include this file alone (`#[path]`).
#![allow(dead_code)]

use std::process::{Command, Output};

/// Run `cmd` to completion; panic, naming `what` and quoting its stderr,
/// unless it ran and exited successfully. Returns its output.
pub fn succeeded(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
