//! File descriptors at start-up: raise RLIMIT_NOFILE's soft limit to the
//! hard limit (the soft default of 1,024 is far below what the admission
//! limits let a Server hold open) and say, in one line, what the process
//! got; warn in one more line if that is still below what the role needs.

use crate::server::admission::Limits;

/// Descriptors a process holds besides its Visitor and backend sockets:
/// listeners, the QUIC UDP socket, epoll and wake-up descriptors, stdio,
/// ACME HTTPS connections, files read at start-up. Generous on purpose.
pub(crate) const BASE_DESCRIPTORS: u64 = 64;

/// Descriptors a Server may need at its admission limits: one socket per
/// Visitor whose ClientHello is being read or that waits for its stream
/// (the intake pool covers both), plus one per routed Visitor stream.
pub(crate) fn server_needs() -> u64 {
    let l = Limits::default();
    l.client_hello_intake as u64 + l.routed_streams as u64 + BASE_DESCRIPTORS
}

/// Descriptors a Client instance may need: one backend socket per stream
/// it handles at once.
pub(crate) fn client_needs() -> u64 {
    crate::client::STREAM_HANDLERS as u64 + BASE_DESCRIPTORS
}

/// What start-up did to RLIMIT_NOFILE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NofileReport {
    /// Soft limit found at start.
    pub was: u64,
    /// Soft limit now.
    pub soft: u64,
    pub hard: u64,
    /// Why raising failed, if it did.
    pub error: Option<String>,
}

/// Raise the soft RLIMIT_NOFILE to the hard limit (capped by the kernel's
/// per-process maximum when the hard limit is unlimited).
pub(crate) fn raise_nofile() -> Result<NofileReport, std::io::Error> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let was = lim.rlim_cur;
    let hard = lim.rlim_max;
    let target = if lim.rlim_max == libc::RLIM_INFINITY {
        kernel_nr_open()
    } else {
        hard
    };
    let mut report = NofileReport {
        was,
        soft: was,
        hard,
        error: None,
    };
    if target <= was {
        return Ok(report);
    }
    let raised = libc::rlimit {
        rlim_cur: target as libc::rlim_t,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        report.soft = target;
    } else {
        report.error = Some(std::io::Error::last_os_error().to_string());
    }
    Ok(report)
}

/// The kernel's ceiling for a process's descriptors (`fs.nr_open`).
fn kernel_nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

/// Raise the limit and log the result for `role` (one info line; one
/// warning line more when the limit stays below `needed`).
pub(crate) fn raise_and_log(role: &'static str, needed: u64) {
    match raise_nofile() {
        Ok(r) => {
            // The same line at info, or at warn with the error that kept
            // the limit where it is.
            macro_rules! limit_line {
                ($level:ident $(, $error:expr)?) => {
                    tracing::$level!(
                        event = "nofile_limit",
                        role,
                        soft = r.soft,
                        hard = r.hard,
                        was = r.was,
                        needed,
                        $(error = ?$error,)?
                    )
                };
            }
            match &r.error {
                None => limit_line!(info),
                Some(error) => limit_line!(warn, error),
            }
            if r.soft < needed {
                tracing::warn!(
                    event = "nofile_limit_low",
                    role,
                    soft = r.soft,
                    needed,
                    hint = "raise the hard limit: LimitNOFILE=65536 in the systemd unit, or ulimit -Hn",
                    "the descriptor limit is below what the admission limits allow; under load, new connections will fail with \"too many open files\""
                );
            }
        }
        Err(e) => tracing::warn!(event = "nofile_limit", role, needed, error = ?e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_follow_the_admission_limits() {
        let l = Limits::default();
        assert_eq!(
            server_needs(),
            (l.client_hello_intake + l.routed_streams) as u64 + BASE_DESCRIPTORS
        );
        assert!(server_needs() > 8192);
        assert!(client_needs() > crate::client::STREAM_HANDLERS as u64);
    }
}
