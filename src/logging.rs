//! Logging: tracing with one line per event and stable `key=value` fields.
//! The config's `log-level` applies to Runewarp's own events; third-party
//! crates (quinn, rustls) only speak at `warn` and above unless
//! `RUNEWARP_LOG` (an EnvFilter directive) says otherwise.

use tracing_subscriber::EnvFilter;

use crate::config::LogLevel;

/// Install the global subscriber (idempotent: later calls are ignored).
pub fn init(level: LogLevel) {
    let directive = match std::env::var("RUNEWARP_LOG") {
        Ok(d) if !d.trim().is_empty() => d,
        _ => format!("warn,runewarp={}", level.as_str()),
    };
    let filter = EnvFilter::try_new(&directive).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}
