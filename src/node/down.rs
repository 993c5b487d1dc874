//! `runewarp node down`: stop the agent that `node up` runs for a state
//! dir, keeping its key and enrolment (`node up` again resumes without a
//! setup key; `node logout` forgets the enrolment). The running agent
//! records its process id in `node.pid`; `down` checks that the process
//! is still a `runewarp` before it sends SIGTERM, so a stale file whose id
//! the system has reused never stops another program.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{NodeError, io_err};
use crate::fsutil;

/// The running agent's process id.
pub const PID_FILE: &str = "node.pid";
/// How long `down` waits for the agent to exit.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Removes `node.pid` when the agent stops.
pub struct PidFile(PathBuf);

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Record this process as the agent for `state_dir`.
pub fn record(state_dir: &Path) -> Result<PidFile, NodeError> {
    let path = state_dir.join(PID_FILE);
    fsutil::write_atomic(&path, format!("{}\n", std::process::id()).as_bytes(), 0o600)
        .map_err(io_err(&path))?;
    Ok(PidFile(path))
}

/// Whether `pid` runs the same program as this process.
fn is_runewarp(pid: i32) -> bool {
    let theirs = std::fs::read_link(format!("/proc/{pid}/exe"));
    let ours = std::env::current_exe();
    match (theirs, ours) {
        (Ok(a), Ok(b)) => a == b || a.file_name() == b.file_name(),
        _ => false,
    }
}

/// Whether `pid` still runs (an exited process its parent has not reaped
/// yet, a zombie, does not).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| !matches!(state, 'Z' | 'X')),
        Err(_) => false,
    }
}

/// Stop the agent of `state_dir`; what to print.
pub fn down(state_dir: &Path) -> Result<String, NodeError> {
    let path = state_dir.join(PID_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(format!("no node is running for {}\n", state_dir.display()));
        }
        Err(e) => return Err(io_err(&path)(e)),
    };
    let pid: i32 = text
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 1)
        .ok_or_else(|| NodeError::Usage(format!("{}: not a process id", path.display())))?;
    if !is_runewarp(pid) {
        let _ = std::fs::remove_file(&path);
        return Ok(format!(
            "no node is running for {} (removed a stale {PID_FILE})\n",
            state_dir.display()
        ));
    }
    // SAFETY: kill(2) with a checked pid and a constant signal number.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(io_err(&path)(std::io::Error::last_os_error()));
    }
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > STOP_WAIT {
            return Err(io_err(&path)(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the node (pid {pid}) did not stop within {} s",
                    STOP_WAIT.as_secs()
                ),
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(format!(
        "node stopped (pid {pid}); `runewarp node up --state-dir {}` resumes it\n",
        state_dir.display()
    ))
}
