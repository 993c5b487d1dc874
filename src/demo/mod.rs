//! `runewarp demo`: a complete, self-contained run on loopback.
//!
//! It writes throw-away material into a private temporary directory,
//! starts two Local backends (one terminating TLS itself, one plaintext), a
//! Server and a Client instance with one Tunnel and three Services (one
//! `passthrough`, one `terminate`, one `terminate` behind Runegate with a
//! built-in mail catcher), then acts as the Visitor for each Public hostname
//! and prints what happened on every hop. Every step is
//! bounded in time; everything stops by itself unless `--keep-running`.
//!
//! `runewarp demo mesh` runs the mesh instead ([`mesh`]).

mod backend;
mod gate;
mod material;
mod mesh;
mod report;
mod visitor;

use std::fmt;
use std::fs::DirBuilder;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio::task::JoinHandle;

use crate::cli::DemoArgs;
use crate::client::Client;
use crate::config::{
    BackendAddress, ClientConfig, LogLevel, PublicCertSource, ServerAddress, ServerConfig,
    ServerTrust, ServiceConfig, StreamTimeouts, TlsMode, TunnelConfig,
};
use crate::hostname::{PublicHostname, ServerHostname};
use crate::run::EXIT_FAILURE;
use crate::server::Server;
use crate::server::tunnels::{Registry, Route};
use crate::shutdown::{self, Trigger};
use crate::{logging, tls};

pub use gate::MailCatcher;

use backend::{Arrival, Backend, Observation};
use material::Material;
use visitor::Visit;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The name in the Server certificate; the Client dials it.
pub const SERVER_HOSTNAME: &str = "localhost";
/// Served by the TLS Local backend, passed through untouched.
pub(crate) const PASSTHROUGH_HOSTNAME: &str = "app.demo.runewarp.test";
/// Served by the plaintext Local backend; the Client instance terminates TLS.
pub(crate) const TERMINATE_HOSTNAME: &str = "secure.demo.runewarp.test";

/// Served by the plaintext Local backend behind Runegate (email sign-in).
pub const GATED_HOSTNAME: &str = "gated.demo.runewarp.test";
/// Addresses at this domain may sign in to the gated Service.
pub const GATED_DOMAIN: &str = "example.com";

/// Upper bound for every step.
const STEP_DEADLINE: Duration = Duration::from_secs(10);
/// Upper bound for stopping the Server and the Client instance.
const STOP_DEADLINE: Duration = Duration::from_secs(3);
/// How often to look for the Tunnel connection.
const TUNNEL_POLL: Duration = Duration::from_millis(10);
/// Give up on the Tunnel connection a little before the step deadline, with
/// a more useful message.
const TUNNEL_DEADLINE: Duration = Duration::from_secs(9);
const STEPS: usize = 9;

/// Run the demo; 0 when both Visitor requests were answered as expected.
pub async fn run(args: DemoArgs) -> ExitCode {
    logging::init(LogLevel::Warn);
    if let Some(crate::cli::DemoCommand::Mesh) = args.command {
        return mesh::run(args.keep_running).await;
    }
    tls::install_crypto_provider();
    // From here on, Ctrl-C ends the demo in an orderly way (stop the
    // Server and the Client instance, remove the directory).
    let (signal_trigger, signals) = shutdown::channel();
    shutdown::on_signals(signal_trigger);

    println!(
        "Runewarp demo: a Server, a Client instance, two Local backends and a Visitor, all on 127.0.0.1."
    );
    println!();
    let mut stack = Stack::default();
    let mut interrupted = signals.clone();
    let outcome = tokio::select! {
        outcome = demo(&mut stack) => outcome,
        _ = interrupted.wait() => Err(StepError::interrupted()),
    };
    let code = match outcome {
        Ok(live) => {
            if args.keep_running {
                report::keep_running(&live, stack.dir_path());
                let mut stop = signals.clone();
                stop.wait().await;
                println!();
                println!("Stopping the Server, the Client instance and the Local backends...");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("runewarp demo: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    };
    stack.stop().await;
    if let Some(dir) = stack.dir.take() {
        match dir.remove() {
            Ok(path) => println!("Stopped; removed {}.", path.display()),
            Err(e) => eprintln!("runewarp demo: {e}"),
        }
    }
    code
}

/// What stays up after the report (for `--keep-running`).
struct Live {
    pub public: SocketAddr,
    pub(crate) passthrough_trust: PathBuf,
    pub(crate) terminate_trust: PathBuf,
}

/// The gated Service's base URL on the Server's public port.
fn gated_base_url(public: SocketAddr) -> String {
    format!("https://{GATED_HOSTNAME}:{}", public.port())
}

/// The failure of one step.
#[derive(Debug)]
struct StepError {
    number: usize,
    name: String,
    reason: String,
}

impl StepError {
    fn interrupted() -> Self {
        Self {
            number: 0,
            name: String::new(),
            reason: "interrupted".into(),
        }
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.number == 0 {
            write!(f, "{}", self.reason)
        } else {
            write!(
                f,
                "step {}/{STEPS} \"{}\" failed: {}",
                self.number, self.name, self.reason
            )
        }
    }
}

/// Numbered, time-bounded steps with a progress line each.
struct Steps {
    done: usize,
}

impl Steps {
    async fn run<T, F>(&mut self, name: &str, work: F) -> Result<T, StepError>
    where
        F: Future<Output = Result<T, BoxError>>,
    {
        self.done += 1;
        let started = Instant::now();
        let outcome = tokio::time::timeout(STEP_DEADLINE, work).await;
        let reason = match outcome {
            Ok(Ok(value)) => {
                println!(
                    "  [{}/{STEPS}] {name:<58} ok  {}",
                    self.done,
                    report::ms(started.elapsed())
                );
                return Ok(value);
            }
            Ok(Err(e)) => error_chain(e.as_ref()),
            Err(_) => format!("did not finish within {} s", STEP_DEADLINE.as_secs()),
        };
        println!("  [{}/{STEPS}] {name:<58} FAILED", self.done);
        Err(StepError {
            number: self.done,
            name: name.to_string(),
            reason,
        })
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// Everything the demo started, so it can be stopped on every path.
#[derive(Default)]
struct Stack {
    dir: Option<DemoDir>,
    trigger: Option<Trigger>,
    server: Option<JoinHandle<()>>,
    client: Option<JoinHandle<()>>,
    backends: Vec<Backend>,
    mail: Option<gate::MailCatcher>,
}

impl Stack {
    fn dir_path(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path.as_path())
            .unwrap_or(Path::new("-"))
    }

    /// Fire the shutdown trigger and wait (bounded) for the Server and the
    /// Client instance to finish, then stop the backends.
    async fn stop(&mut self) {
        if let Some(trigger) = self.trigger.take() {
            trigger.fire();
        }
        let tasks: Vec<JoinHandle<()>> = self
            .server
            .take()
            .into_iter()
            .chain(self.client.take())
            .collect();
        let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        let joined = tokio::time::timeout(STOP_DEADLINE, async {
            for task in tasks {
                let _ = task.await;
            }
        })
        .await;
        if joined.is_err() {
            eprintln!(
                "runewarp demo: the Server or Client instance did not stop within {} s; aborting it",
                STOP_DEADLINE.as_secs()
            );
            for a in aborts {
                a.abort();
            }
        }
        self.backends.clear();
        self.mail = None;
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for task in self.server.iter().chain(self.client.iter()) {
            task.abort();
        }
    }
}

/// The private temporary directory; removed when dropped.
struct DemoDir {
    path: PathBuf,
    removed: bool,
}

impl DemoDir {
    fn create() -> Result<Self, BoxError> {
        let name = format!(
            "runewarp-demo-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let path = std::env::temp_dir().join(name);
        DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Self {
            path,
            removed: false,
        })
    }

    fn remove(mut self) -> Result<PathBuf, String> {
        self.removed = true;
        std::fs::remove_dir_all(&self.path)
            .map(|()| self.path.clone())
            .map_err(|e| format!("cannot remove {}: {e}", self.path.display()))
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        if !self.removed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The Tunnel connection as the Server's registry sees it.
struct TunnelInfo {
    pub peer: SocketAddr,
    pub pin: String,
    pub after: Duration,
}

/// Who holds the private key of the certificate a Visitor was shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    LocalBackend,
    ClientInstance,
}

/// One Visitor request and what every party saw.
struct Hop {
    pub hostname: &'static str,
    pub mode: TlsMode,
    pub backend: SocketAddr,
    pub visit: Visit,
    pub(crate) holder: Holder,
    pub seen: Observation,
}

/// What the report prints besides the hops.
struct Overview<'a> {
    pub dir: &'a Path,
    pub material: &'a Material,
    pub public: SocketAddr,
    pub tunnel: SocketAddr,
    pub tls_backend: SocketAddr,
    pub plain_backend: SocketAddr,
    pub(crate) tunnel_info: &'a TunnelInfo,
}

async fn demo(stack: &mut Stack) -> Result<Live, StepError> {
    let mut steps = Steps { done: 0 };

    let dir = steps
        .run("create a private throw-away directory", async {
            DemoDir::create()
        })
        .await?;
    let root = dir.path.clone();
    stack.dir = Some(dir);

    let m = steps
        .run("generate certificates and the Client identity", async {
            material::generate(
                &root,
                SERVER_HOSTNAME,
                &[TERMINATE_HOSTNAME, GATED_HOSTNAME],
                PASSTHROUGH_HOSTNAME,
            )
        })
        .await?;

    let (tls_backend, plain_backend) = steps
        .run("start the Local backends and a mail catcher", async {
            let tls = Backend::start_tls(m.backend_cert.clone(), m.backend_key.clone_key()).await?;
            let plain = Backend::start_plain().await?;
            stack.mail = Some(gate::MailCatcher::start(true).await?);
            Ok((tls, plain))
        })
        .await?;
    let mail_addr = stack
        .mail
        .as_ref()
        .map(|c| c.addr)
        .unwrap_or(tls_backend.addr);
    let tls_addr = tls_backend.addr;
    let plain_addr = plain_backend.addr;
    stack.backends.push(tls_backend);
    stack.backends.push(plain_backend);

    let (trigger, stop) = shutdown::channel();
    stack.trigger = Some(trigger);

    let (public, tunnel, registry) = steps
        .run(
            "start the Server (public TCP + tunnel UDP listeners)",
            async {
                let server = Server::bind(server_config(&m)?).await?;
                let public = server.public_addr()?;
                let tunnel = server.tunnel_addr()?;
                let registry = server.registry();
                stack.server = Some(tokio::spawn(server.run(stop.clone())));
                Ok((public, tunnel, registry))
            },
        )
        .await?;

    steps
        .run("start the Client instance", async {
            let mut config = client_config(&m, tunnel.port(), tls_addr, plain_addr)?;
            config.services.push(ServiceConfig {
                index: 2,
                public_hostnames: vec![public_hostname(GATED_HOSTNAME)?],
                backend_address: BackendAddress {
                    host: plain_addr.ip().to_string(),
                    port: plain_addr.port(),
                },
                tls_mode: TlsMode::Terminate,
                proxy_protocol: false,
            });
            config.gates = gated(&root, public, mail_addr)?;
            let client = Client::new(config)?;
            if client.identity() != m.client_pin {
                return Err(format!(
                    "the Client loaded identity {} but the demo wrote {}",
                    client.identity(),
                    m.client_pin
                )
                .into());
            }
            stack.client = Some(tokio::spawn(client.run(stop.clone())));
            Ok(())
        })
        .await?;

    let tunnel_info = steps
        .run(
            "wait for the authenticated Tunnel connection",
            wait_for_tunnel(&registry),
        )
        .await?;

    // One step per Service, each the same Visitor hop: (hostname, mode,
    // its name in the step, the Local backend's address, that backend).
    let mut hops = Vec::new();
    for (hostname, mode, mode_name, backend_addr, backend) in [
        (
            PASSTHROUGH_HOSTNAME,
            TlsMode::Passthrough,
            "passthrough",
            tls_addr,
            &stack.backends[0],
        ),
        (
            TERMINATE_HOSTNAME,
            TlsMode::Terminate,
            "terminate",
            plain_addr,
            &stack.backends[1],
        ),
    ] {
        let step = format!("Visitor -> {hostname} ({mode_name})");
        let visited = hop(public, hostname, mode, &m, backend_addr, backend);
        hops.push(steps.run(&step, visited).await?);
    }

    let gated = steps
        .run(
            &format!("Visitor -> {GATED_HOSTNAME} (terminate + gate)"),
            async {
                let visit = gate::visit_gated(public, GATED_HOSTNAME, &m.public_ca).await?;
                if !visit.sign_in_page {
                    return Err(format!(
                        "expected the sign-in page without a session, got {:?}",
                        visit.status
                    )
                    .into());
                }
                // The gate mails asynchronously: wait for the catcher.
                let caught = stack.mail.as_ref().map(|c| c.caught.clone());
                let deadline = Instant::now() + Duration::from_secs(5);
                while caught
                    .as_ref()
                    .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst) == 0)
                {
                    if Instant::now() > deadline {
                        return Err("the sign-in mail did not reach the mail catcher".into());
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok::<_, BoxError>(visit)
            },
        )
        .await?;

    report::print(
        &Overview {
            dir: stack.dir_path(),
            material: &m,
            public,
            tunnel,
            tls_backend: tls_addr,
            plain_backend: plain_addr,
            tunnel_info: &tunnel_info,
        },
        &hops,
    );
    report::gated(GATED_HOSTNAME, &gated);
    Ok(Live {
        public,
        passthrough_trust: m.backend_cert_file.clone(),
        terminate_trust: m.public_ca_file.clone(),
    })
}

fn public_hostname(name: &str) -> Result<PublicHostname, BoxError> {
    PublicHostname::parse(name).map_err(|e| format!("{name}: {e}").into())
}

fn server_hostname() -> Result<ServerHostname, BoxError> {
    ServerHostname::parse(SERVER_HOSTNAME).map_err(|e| format!("{SERVER_HOSTNAME}: {e}").into())
}

fn server_config(m: &Material) -> Result<ServerConfig, BoxError> {
    let tunnel = TunnelConfig {
        index: 0,
        public_hostnames: vec![
            public_hostname(PASSTHROUGH_HOSTNAME)?,
            public_hostname(TERMINATE_HOSTNAME)?,
            public_hostname(GATED_HOSTNAME)?,
        ],
        client_identities: vec![m.client_pin],
    };
    let cert_dir = m.server_cert_dir.clone();
    Ok(ServerConfig {
        log_level: LogLevel::Warn,
        ..ServerConfig::loopback(server_hostname()?, cert_dir, vec![tunnel])
    })
}

fn client_config(
    m: &Material,
    tunnel_port: u16,
    tls_backend: SocketAddr,
    plain_backend: SocketAddr,
) -> Result<ClientConfig, BoxError> {
    let backend = |addr: SocketAddr| BackendAddress {
        host: addr.ip().to_string(),
        port: addr.port(),
    };
    Ok(ClientConfig {
        source: None,
        log_level: LogLevel::Warn,
        server_address: ServerAddress {
            host: server_hostname()?,
            port: tunnel_port,
        },
        server_trust: ServerTrust::CaFile(m.server_ca_file.clone()),
        identity_dir: m.identity_dir.clone(),
        public_certs: Some(PublicCertSource::Manual {
            dir: m.public_cert_dir.clone(),
        }),
        readiness_bind_address: None,
        metrics_bind_address: None,
        control_socket: None,
        services: vec![
            ServiceConfig {
                index: 0,
                public_hostnames: vec![public_hostname(PASSTHROUGH_HOSTNAME)?],
                backend_address: backend(tls_backend),
                tls_mode: TlsMode::Passthrough,
                proxy_protocol: false,
            },
            ServiceConfig {
                index: 1,
                public_hostnames: vec![public_hostname(TERMINATE_HOSTNAME)?],
                backend_address: backend(plain_backend),
                tls_mode: TlsMode::Terminate,
                proxy_protocol: false,
            },
        ],
        gates: Default::default(),
        stream_timeouts: StreamTimeouts::default(),
        congestion_control: Default::default(),
    })
}

/// Runegate on the gated Service: any address at [`GATED_DOMAIN`] may sign
/// in; mail goes to the demo's catcher; sessions live in the demo directory.
fn gated(
    root: &Path,
    public: SocketAddr,
    mail: SocketAddr,
) -> Result<crate::gate::config::ClientGates, BoxError> {
    use crate::gate::config::*;
    Ok(ClientGates {
        smtp: Some(SmtpConfig {
            host: mail.ip().to_string(),
            port: mail.port(),
            tls: SmtpTls::None,
            credentials: None,
            from: MailFrom {
                name: Some("Runewarp demo".to_string()),
                address: EmailAddress::parse("sign-in@example.com")?,
            },
            ca_file: None,
        }),
        services: vec![ServiceGate {
            service: 2,
            base_url: BaseUrl {
                https: true,
                host: GATED_HOSTNAME.to_string(),
                port: Some(public.port()),
            },
            sign_in: SignIn {
                allowed: AllowList {
                    emails: Vec::new(),
                    domains: vec![ServerHostname::parse(GATED_DOMAIN)?],
                },
                link_ttl: DEFAULT_LINK_TTL,
                session_ttl: DEFAULT_SESSION_TTL,
                session_idle: DEFAULT_SESSION_IDLE,
                cookie_domain: None,
                state_dir: root.join("gate"),
            },
        }],
    })
}

/// Poll the Server's registry until both Public hostnames route to an
/// active Tunnel connection (bounded by the step deadline).
async fn wait_for_tunnel(registry: &Arc<Registry>) -> Result<TunnelInfo, BoxError> {
    let started = Instant::now();
    loop {
        if let (Route::Active(conn), Route::Active(_)) = (
            registry.route(PASSTHROUGH_HOSTNAME),
            registry.route(TERMINATE_HOSTNAME),
        ) {
            return Ok(TunnelInfo {
                peer: conn.peer,
                pin: conn.identity.to_string(),
                after: started.elapsed(),
            });
        }
        if started.elapsed() >= TUNNEL_DEADLINE {
            return Err(format!(
                "no authenticated Tunnel connection after {} s; the Client instance's log lines above say why",
                TUNNEL_DEADLINE.as_secs()
            )
            .into());
        }
        tokio::time::sleep(TUNNEL_POLL).await;
    }
}

/// One Visitor request, checked: the right party presented the
/// certificate, the answer is 200 and the backend saw what the mode implies.
async fn hop(
    public: SocketAddr,
    hostname: &'static str,
    mode: TlsMode,
    m: &Material,
    backend_addr: SocketAddr,
    backend: &Backend,
) -> Result<Hop, BoxError> {
    let (trust, expected): (&CertificateDer<'static>, Holder) = match mode {
        TlsMode::Passthrough => (&m.backend_cert, Holder::LocalBackend),
        TlsMode::Terminate => (&m.public_ca, Holder::ClientInstance),
    };
    let visit = visitor::visit(public, hostname, trust).await?;
    let shown = &visit.certificate.fingerprint;
    let holder = if *shown == crate::tls::material::fingerprint_sha256(&m.backend_cert) {
        Holder::LocalBackend
    } else if *shown == crate::tls::material::fingerprint_sha256(&m.public_leaf) {
        Holder::ClientInstance
    } else {
        return Err(
            format!("the Visitor was shown an unexpected certificate (SHA-256 {shown})").into(),
        );
    };
    if holder != expected {
        return Err(format!(
            "the certificate came from the {} but {mode:?} expects the {}",
            report::holder_name(holder),
            report::holder_name(expected)
        )
        .into());
    }
    if visit.status_line.split(' ').nth(1) != Some("200") {
        return Err(format!("the answer was {:?}, not 200", visit.status_line).into());
    }
    let seen = backend
        .last_seen()
        .ok_or("the Local backend recorded no connection")?;
    let expected_arrival = match mode {
        TlsMode::Passthrough => Arrival::Tls,
        TlsMode::Terminate => Arrival::Plaintext,
    };
    if seen.arrival != expected_arrival {
        return Err(format!(
            "the Local backend received {:?} bytes, expected {expected_arrival:?}",
            seen.arrival
        )
        .into());
    }
    Ok(Hop {
        hostname,
        mode,
        backend: backend_addr,
        visit,
        holder,
        seen,
    })
}
