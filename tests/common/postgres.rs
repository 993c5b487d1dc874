//! A throwaway PostgreSQL cluster for tests: Debian's server binaries
//! (`/usr/lib/postgresql/*/bin`), `initdb` into a temp dir, `postgres` on a
//! free loopback port with its socket in that dir, trust authentication
//! for the superuser `runewarp`. PostgreSQL refuses to run as root, so
//! under uid 0 it runs as the `postgres` user (made by the Debian package)
//! through `runuser`. Stopped (fast shutdown, bounded, then killed) on
//! drop. Standard library, libc, tempfile and the `postgres` client only,
//! so the library's unit tests can include it too (`#[path]`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long start-up and shutdown may take.
const DEADLINE: Duration = Duration::from_secs(30);

pub struct Postgres {
    pub port: u16,
    child: Child,
    data: PathBuf,
    // Last: removed after the server stopped.
    dir: tempfile::TempDir,
}

/// The newest installed server's `bin` dir.
fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn id_of(flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .expect("run id");
    assert!(
        out.status.success(),
        "no `postgres` user: install Debian's postgresql package"
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Whether PostgreSQL tests run (`RUNEWARP_TEST_EXTERNAL=1`); if not,
/// says that `name` is skipped. For the library's unit tests, which have
/// no `opt_in` module.
pub fn opted_in(name: &str) -> bool {
    let on = std::env::var_os("RUNEWARP_TEST_EXTERNAL").is_some_and(|v| v == "1");
    if !on {
        eprintln!("SKIPPED {name}: needs PostgreSQL; set RUNEWARP_TEST_EXTERNAL=1");
    }
    on
}

impl Postgres {
    /// Make and start a cluster; ready to connect to when this returns.
    pub fn start() -> Self {
        let bin = bin_dir().expect(
            "PostgreSQL server binaries in /usr/lib/postgresql/*/bin (Debian's postgresql package; .ci/test installs it)",
        );
        let dir = tempfile::Builder::new()
            .prefix("runewarp-pg")
            .tempdir()
            .unwrap();
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            std::os::unix::fs::chown(dir.path(), Some(id_of("-u")), Some(id_of("-g"))).unwrap();
        }
        let owner = |program: &Path| -> Command {
            if root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(program);
                c
            } else {
                Command::new(program)
            }
        };
        let data = dir.path().join("data");
        let out = owner(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "runewarp", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("postgres.log")).unwrap();
        let child = owner(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(dir.path())
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-F"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let mut pg = Self {
            port,
            child,
            data,
            dir,
        };
        let start = Instant::now();
        loop {
            if postgres::Client::connect(&pg.url("postgres"), postgres::NoTls).is_ok() {
                return pg;
            }
            if let Ok(Some(status)) = pg.child.try_wait() {
                panic!("postgres exited ({status}): {}", pg.log());
            }
            assert!(
                start.elapsed() < DEADLINE,
                "postgres not ready within {DEADLINE:?}: {}",
                pg.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A connection string for database `db` (no password: trust).
    pub fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=runewarp dbname={db}",
            self.port
        )
    }

    /// A new empty database; returns its connection string.
    pub fn create_db(&self, name: &str) -> String {
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls).unwrap();
        c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        self.url(name)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// The postmaster's pid (under `runuser` the child is runuser).
    fn postmaster(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let pid = self.postmaster();
        // SIGINT: fast shutdown (clients disconnected, no waiting for them).
        if let Some(pid) = pid {
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(pid) = pid {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
