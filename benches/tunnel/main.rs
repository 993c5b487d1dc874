//! Runewarp performance bench: `cargo bench --bench tunnel`.
//!
//! One run compares three paths on 127.0.0.1:
//! - direct: a TLS Visitor straight to the in-process TLS backend;
//! - passthrough: Visitor TLS → Server → QUIC → Client → the same TLS backend;
//! - terminate: Visitor TLS → Server → QUIC → Client (terminates TLS) →
//!   an in-process plaintext backend.
//!
//! The Server and the Client are separate `runewarp` processes started from
//! config files in a temporary directory, so their CPU time and memory can be
//! read from `/proc/<pid>`. All three paths use leaves from the same Public
//! hostname CA (ECDSA P-256), the same rustls provider and TLS 1.3, and the
//! Visitor never resumes sessions, so every connection is a full handshake.
//!
//! Backend protocol, after the TLS handshake: the Visitor sends a command
//! byte and a big-endian u64. `D n`: the backend sends n bytes and closes.
//! `U n`: the Visitor sends n bytes, the backend answers with the count as
//! 8 bytes and closes. `R`: the backend answers 1 KiB and closes.
//!
//! Quick mode (`RUNEWARP_BENCH_QUICK=1`, `--quick`, or any run without
//! cargo's `--bench` flag, e.g. `cargo test --benches`) uses smaller sizes
//! and shorter phases. Targets are informational: a miss never fails the
//! bench; only a broken setup or transfer exits non-zero.
//!
//! `RUNEWARP_BENCH_WORKERS=n` sets `TOKIO_WORKER_THREADS` for the Server
//! and the Client (default: one worker per core).
//!
//! `RUNEWARP_BENCH_CC=bbr|cubic` sets `congestion-control` on the Server
//! and the Client (default: the config default, `bbr`).
//!
//! `RUNEWARP_BENCH_LOG=debug` sets the Server's and Client's `RUNEWARP_LOG`
//! (default `warn`); `RUNEWARP_BENCH_KEEP=1` keeps the temporary directory
//! with configs and logs (it is always kept when the bench fails).

use std::fmt::Display;
use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use runewarp::hostname::{PublicHostname, ServerHostname};
use runewarp::tls::material;

const SERVER_HOST: &str = "localhost";
const PASS_HOST: &str = "pass.bench.test";
const TERM_HOST: &str = "term.bench.test";
const MIB: u64 = 1024 * 1024;
const CHUNK: usize = 64 * 1024;
const REPLY: usize = 1024;
/// Upper bound for any single phase, so a stuck path cannot hang the run.
const PHASE_LIMIT: Duration = Duration::from_secs(90);
const UP_WITHIN: Duration = Duration::from_secs(10);
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Times a Visitor saw a TCP EOF without a TLS close_notify (tolerated once
/// every expected byte arrived; reported in the notes).
static EOF_WITHOUT_CLOSE_NOTIFY: AtomicU64 = AtomicU64::new(0);
static SOURCE: [u8; CHUNK] = [0xa5; CHUNK];

type Res<T> = Result<T, String>;

trait Ctx<T> {
    fn ctx(self, what: impl Display) -> Res<T>;
}

impl<T, E: Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: impl Display) -> Res<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// Free loopback ports, shared with the process-based tests.
#[path = "../../tests/common/ports.rs"]
mod ports;

mod backend;
mod bulk;
mod idle;
mod latency;
mod phases;
mod plan;
mod procs;
mod rate;
mod report;
mod setup;
mod visitor;

use backend::*;
use bulk::*;
use idle::*;
use latency::*;
use phases::*;
use plan::*;
use procs::*;
use rate::*;
use report::*;
use setup::*;
use visitor::*;

fn main() -> ExitCode {
    let plan = Plan::from_env();
    let started = Instant::now();
    eprintln!(
        "runewarp tunnel bench ({} mode)",
        if plan.quick { "quick" } else { "full" }
    );
    let mut s = match setup() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench setup failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = rt.block_on(measure(&plan, &mut s));
    // Stop the Visitors and backends before the Server and Client.
    rt.shutdown_timeout(Duration::from_secs(2));
    let failed = match outcome {
        Ok(o) => {
            report(&plan, &o);
            false
        }
        Err(e) => {
            eprintln!("bench failed: {e}");
            for p in [&s.server, &s.client] {
                eprintln!("--- last {} log lines ---\n{}", p.name, p.log_tail());
            }
            true
        }
    };
    let Setup {
        dir,
        server,
        client,
        ..
    } = s;
    drop(client);
    drop(server);
    if failed || std::env::var_os("RUNEWARP_BENCH_KEEP").is_some() {
        eprintln!("configs and logs kept in {}", dir.keep().display());
    }
    eprintln!("bench finished in {:.1} s", started.elapsed().as_secs_f64());
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
