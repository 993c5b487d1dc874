//! What one run measures: quick or full sizes, and the three routes.

use super::*;

pub(crate) struct Plan {
    pub(crate) quick: bool,
    /// Bytes for the single-stream phases and (in total) the 8-stream phase.
    pub(crate) bulk: u64,
    pub(crate) streams: usize,
    pub(crate) latency_conns: usize,
    pub(crate) rate_workers: usize,
    pub(crate) rate_for: Duration,
    pub(crate) idle: usize,
    /// Bulk phases run this many times, the three paths interleaved, and
    /// each figure is the median: drift in the machine's speed (other
    /// tenants, frequency) then hits direct and tunnel alike.
    pub(crate) rounds: usize,
}

impl Plan {
    pub(crate) fn from_env() -> Self {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let env_quick =
            std::env::var("RUNEWARP_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let quick = env_quick
            || args.iter().any(|a| a == "--quick")
            || !args.iter().any(|a| a == "--bench");
        if quick {
            Plan {
                quick,
                bulk: 64 * MIB,
                streams: 8,
                latency_conns: 100,
                rate_workers: 64,
                rate_for: Duration::from_secs(2),
                // Under the ~896 streams a 1024-stream QUIC window always
                // grants (quinn re-announces credit in 1/8 steps).
                idle: 500,
                rounds: 1,
            }
        } else {
            Plan {
                quick,
                bulk: 512 * MIB,
                streams: 8,
                latency_conns: 500,
                rate_workers: 64,
                rate_for: Duration::from_secs(5),
                idle: 1000,
                rounds: 3,
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Route {
    Direct,
    Passthrough,
    Terminate,
}

pub(crate) const ROUTES: [Route; 3] = [Route::Direct, Route::Passthrough, Route::Terminate];

impl Route {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Passthrough => "passthrough",
            Route::Terminate => "terminate",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Route::Direct => 0,
            Route::Passthrough => 1,
            Route::Terminate => 2,
        }
    }
}
