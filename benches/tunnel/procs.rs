//! The Server and Client processes: start, stop, CPU time and memory from /proc.

use super::*;

#[derive(Clone, Copy, Default)]
pub(crate) struct Mem {
    pub(crate) rss_kib: u64,
    pub(crate) hwm_kib: u64,
}

/// A `runewarp` child process, stopped (SIGTERM, then SIGKILL after 3 s)
/// when dropped, including on panic.
pub(crate) struct Proc {
    pub(crate) name: &'static str,
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
}

impl Proc {
    pub(crate) fn spawn(name: &'static str, exe: &Path, config: &Path, dir: &Path) -> Res<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).ctx(format!("create {}", log.display()))?;
        let err = out.try_clone().ctx("clone log file handle")?;
        let mut cmd = Command::new(exe);
        if let Ok(n) = std::env::var("RUNEWARP_BENCH_WORKERS") {
            cmd.env("TOKIO_WORKER_THREADS", n);
        }
        cmd.arg(name)
            .arg("--config")
            .arg(config)
            .env(
                "RUNEWARP_LOG",
                std::env::var("RUNEWARP_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
        // parent memory; it makes the child get SIGTERM if the bench is
        // killed before its Drop guards run.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .ctx(format!("start `{} {name}`", exe.display()))?;
        Ok(Self { name, child, log })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub(crate) fn check_alive(&mut self) -> Res<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "the {} process exited ({status}); last log lines:\n{}",
                self.name,
                self.log_tail()
            )),
            Err(e) => Err(format!("cannot poll the {} process: {e}", self.name)),
        }
    }

    /// utime + stime in seconds.
    pub(crate) fn cpu_secs(&self) -> Res<f64> {
        let path = format!("/proc/{}/stat", self.pid());
        let text = fs::read_to_string(&path).ctx(format!("read {path}"))?;
        // Fields after the parenthesised command name start at field 3.
        let rest = text
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| format!("{path}: no ')'"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Res<u64> {
            fields
                .get(n - 3)
                .ok_or_else(|| format!("{path}: missing field {n}"))?
                .parse::<u64>()
                .ctx(format!("{path}: field {n}"))
        };
        let ticks = field(14)? + field(15)?;
        Ok(ticks as f64 / clock_ticks())
    }

    pub(crate) fn mem(&self) -> Res<Mem> {
        let path = format!("/proc/{}/status", self.pid());
        let text = fs::read_to_string(&path).ctx(format!("read {path}"))?;
        let kib = |key: &str| -> Res<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .ok_or_else(|| format!("{path}: no {key}"))?
                .parse::<u64>()
                .ctx(format!("{path}: {key}"))
        };
        Ok(Mem {
            rss_kib: kib("VmRSS:")?,
            hwm_kib: kib("VmHWM:")?,
        })
    }

    /// Reset VmHWM to the current RSS (Linux `clear_refs` value 5).
    pub(crate) fn reset_peak(&self) -> bool {
        fs::write(format!("/proc/{}/clear_refs", self.pid()), "5").is_ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid with a valid signal.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break,
            }
        }
        eprintln!("bench: {} did not stop within 3 s; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU seconds (user + system) of this bench process: Visitors and backends.
pub(crate) fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage struct.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// `Udp: RcvbufErrors` from /proc/net/snmp (network-namespace wide).
pub(crate) fn udp_rcvbuf_errors() -> Res<u64> {
    let text = fs::read_to_string("/proc/net/snmp").ctx("read /proc/net/snmp")?;
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(head), Some(values)) = (udp.next(), udp.next()) else {
        return Err("/proc/net/snmp: no Udp lines".into());
    };
    let idx = head
        .split_whitespace()
        .position(|w| w == "RcvbufErrors")
        .ok_or("/proc/net/snmp: no RcvbufErrors column")?;
    values
        .split_whitespace()
        .nth(idx)
        .ok_or("/proc/net/snmp: short Udp line")?
        .parse::<u64>()
        .ctx("/proc/net/snmp RcvbufErrors")
}
