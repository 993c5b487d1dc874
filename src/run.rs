//! Carrying out a parsed command line. Exit codes: 0 orderly, 1 runtime
//! failure, 2 configuration or usage error.

use std::process::ExitCode;

use crate::cli::{
    Cli, ClientArgs, ClientCommand, Command, ConfigCommand, Role, ServerArgs, ServerCommand,
};
use crate::config::{self, ClientOverlay, Environment, ServerOverlay};
use crate::{client, commands, control, demo, fdlimit, gate, logging, node, server, shutdown, tls};

/// Runtime failure (bind, material, I/O).
pub(crate) const EXIT_FAILURE: u8 = 1;
/// Configuration or usage error.
pub(crate) const EXIT_CONFIG: u8 = 2;

/// Run the parsed command line; returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    tls::install_crypto_provider();
    let env = Environment::from_process();
    if matches!(
        cli.command,
        Command::Server(ServerArgs {
            command: Some(_),
            ..
        }) | Command::Client(ClientArgs {
            command: Some(_),
            ..
        })
    ) {
        // Material commands print results on stdout; warnings (e.g. a key
        // readable by others) go to stderr.
        logging::init(config::LogLevel::Warn);
    }
    match cli.command {
        Command::Server(ServerArgs {
            command: Some(ServerCommand::Cert(cmd)),
            ..
        }) => material_result(commands::material::run_server_cert(&cmd, &env)),
        Command::Client(ClientArgs {
            command: Some(ClientCommand::Identity(cmd)),
            ..
        }) => material_result(commands::material::run_identity(&cmd, &env)),
        Command::Client(ClientArgs {
            command: Some(ClientCommand::PublicCert(cmd)),
            ..
        }) => material_result(commands::material::run_public_cert(&cmd, &env)),
        Command::Server(ServerArgs {
            command: Some(ServerCommand::Status(args)),
            ..
        }) => status(Role::Server, &args, &env),
        Command::Client(ClientArgs {
            command: Some(ClientCommand::Status(args)),
            ..
        }) => status(Role::Client, &args, &env),
        Command::Server(ServerArgs { command: None, run }) => {
            let overlay = ServerOverlay {
                config: run.config,
                hostname: run.hostname,
            };
            let config = match config::load_server(&overlay, &env) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            // SIGHUP reads the same file with the same overlays.
            let reloader: server::Reloader =
                Box::new(move || config::load_server(&overlay, &Environment::from_process()));
            serve(
                "server",
                config.log_level,
                async move {
                    server::Server::bind(config)
                        .await
                        .map(|s| s.with_reloader(reloader))
                },
                server::Server::run,
            )
        }
        Command::Client(ClientArgs { command: None, run }) => {
            let overlay = ClientOverlay {
                config: run.config,
                server_address: run.server_address,
                backend_address: run.backend_address,
            };
            let config = match config::load_client(&overlay, &env) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            // SIGHUP reads the same file with the same overlays.
            let reloader: client::reload::Reloader =
                Box::new(move || config::load_client(&overlay, &Environment::from_process()));
            serve(
                "client",
                config.log_level,
                async move { client::Client::new(config).map(|c| c.with_reloader(reloader)) },
                client::Client::run,
            )
        }
        Command::Config(ConfigCommand::Check {
            role: Role::Control,
            config,
        }) => check_control(config.as_deref()),
        Command::Config(ConfigCommand::Check { role, config }) => {
            let text = match role {
                Role::Server => config::load_server(
                    &ServerOverlay {
                        config,
                        hostname: None,
                    },
                    &env,
                )
                .map(|c| config::render_server(&c)),
                Role::Client => config::load_client(
                    &ClientOverlay {
                        config,
                        ..Default::default()
                    },
                    &env,
                )
                .map(|c| config::render_client(&c)),
                Role::Gate | Role::Control => {
                    config::load_gate(config.as_deref(), &env).map(|c| config::render_gate(&c))
                }
            };
            match text {
                Ok(t) => {
                    print!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(e),
            }
        }
        Command::Gate(args) => {
            let config = match config::load_gate(args.config.as_deref(), &env) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            serve("gate", config.log_level, gate::start(config), gate::run)
        }
        Command::Control(args) => run_control(args),
        Command::Node(cmd) => run_node(cmd),
        Command::Demo(args) => runtime(None, demo::run(args)),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "runewarp", &mut script);
            // A reader that stops early (`| head`) is not an error.
            match std::io::Write::write_all(&mut std::io::stdout().lock(), &script) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("runewarp completions: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Man { out_dir } => {
            let result = match out_dir {
                None => crate::man::render_main(&mut std::io::stdout().lock()),
                Some(dir) => crate::man::write_all(&dir).map(|pages| {
                    println!("wrote {} pages in {}", pages.len(), dir.display());
                }),
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("runewarp man: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
    }
}

/// Run a long-lived role (`server` or `client`): logging at `level`, the
/// worker threads, the runtime; then `start` it and `run` it until a signal
/// stops it. A failed start is logged as `<role>_failed` and exits 1.
fn serve<T, E, Start, Run>(
    role: &'static str,
    level: config::LogLevel,
    start: Start,
    run: impl FnOnce(T, shutdown::Shutdown) -> Run,
) -> ExitCode
where
    E: std::fmt::Display,
    Start: std::future::Future<Output = Result<T, E>>,
    Run: std::future::Future<Output = ()>,
{
    logging::init(level);
    let fds_needed = if role == "server" {
        fdlimit::server_needs()
    } else {
        fdlimit::client_needs()
    };
    fdlimit::raise_and_log(role, fds_needed);
    let workers = match service_workers() {
        Ok(w) => w,
        Err(e) => return usage_error(&e),
    };
    runtime(Some(workers), async move {
        let service = match start.await {
            Ok(s) => s,
            Err(e) => {
                let event = match role {
                    "server" => "server_failed",
                    "gate" => "gate_failed",
                    "control" => "control_failed",
                    _ => "client_failed",
                };
                // The log goes to stderr already; say it there only once.
                if level == config::LogLevel::Off {
                    eprintln!("runewarp {role}: {e}");
                } else {
                    tracing::error!(event, error = ?e.to_string());
                }
                return ExitCode::from(EXIT_FAILURE);
            }
        };
        let (trigger, stop) = shutdown::channel();
        shutdown::on_signals(trigger);
        run(service, stop).await;
        ExitCode::SUCCESS
    })
}

/// Environment variable that sets the Server's or Client's worker threads
/// (tokio's own name for it, so it means the same as for other tokio
/// services on the host).
const WORKERS_ENV: &str = "TOKIO_WORKER_THREADS";

/// Worker threads for a Server or Client process: `TOKIO_WORKER_THREADS`
/// if set, otherwise half the CPUs (at least one).
///
/// Half, because a tunnel process is mostly kernel I/O plus one QUIC
/// connection driver per Tunnel connection, which runs on one thread
/// anyway; the other cores go to the kernel's network processing and, on a
/// Client host, the Local backends. On the 2-core bench one worker instead
/// of two cut tunnel CPU by ~15% per GB and ~20% per connection (fewer
/// cross-thread wake-ups) and raised single-stream throughput.
fn service_workers() -> Result<(usize, &'static str), String> {
    match std::env::var(WORKERS_ENV) {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok((n, WORKERS_ENV)),
            _ => Err(format!(
                "{WORKERS_ENV}={v:?}: expected a whole number of threads, at least 1"
            )),
        },
        Err(std::env::VarError::NotPresent) => {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            Ok((default_workers(cpus), "default"))
        }
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{WORKERS_ENV}: not valid UTF-8")),
    }
}

fn default_workers(cpus: usize) -> usize {
    (cpus / 2).max(1)
}

/// Run `f` on a multi-threaded runtime: with `workers` threads when given
/// (Server, Client), one per CPU otherwise (the demo, which hosts every
/// role in one process).
fn runtime<F: std::future::Future<Output = ExitCode>>(
    workers: Option<(usize, &'static str)>,
    f: F,
) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some((n, _)) = workers {
        builder.worker_threads(n);
    }
    match builder.enable_all().build() {
        Ok(rt) => {
            if let Some((n, source)) = workers {
                tracing::info!(event = "runtime_started", worker_threads = n, source);
            }
            rt.block_on(f)
        }
        Err(e) => {
            eprintln!("runewarp: cannot start the async runtime: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `server status` / `client status`: read the running instance's state
/// from its control socket and print it.
fn status(role: Role, args: &crate::cli::StatusArgs, env: &Environment) -> ExitCode {
    let name = match role {
        Role::Server => "server",
        Role::Client => "client",
        // Only `server status` and `client status` exist.
        Role::Gate | Role::Control => {
            return usage_error("only the server and the client have a status command");
        }
    };
    let path = match &args.socket {
        Some(p) => Some(p.clone()),
        None => match config::material_defaults(args.config.as_deref(), env) {
            Ok(d) => match role {
                Role::Server => d.server_control_socket,
                Role::Client | Role::Gate | Role::Control => d.client_control_socket,
            },
            Err(e) => return config_error(e),
        },
    };
    let Some(path) = path else {
        return usage_error(&format!(
            "no control socket: set {name}.control-socket in the config (or HOME), or pass --socket"
        ));
    };
    let doc = match crate::control_socket::query(&path, name) {
        Ok(doc) => doc,
        Err(e) => {
            eprintln!("runewarp {name} status: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let text = if args.json {
        serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
    } else {
        let now = crate::control_socket::unix(std::time::SystemTime::now());
        crate::control_socket::format::human(&doc, now)
    };
    match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("runewarp {name} status: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("runewarp: {message}");
    ExitCode::from(EXIT_CONFIG)
}

fn config_error(e: config::ConfigError) -> ExitCode {
    eprintln!("runewarp: invalid configuration: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn material_result(r: Result<String, tls::material::MaterialError>) -> ExitCode {
    match r {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(tls::material::MaterialError::Config(e)) => config_error(e),
        // Bad or missing --hostname: a usage error.
        Err(
            e @ (tls::material::MaterialError::NoServerHostname
            | tls::material::MaterialError::Hostname { .. }),
        ) => {
            eprintln!("runewarp: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("runewarp: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `runewarp control`: serve, or an admin command.
/// `config check --role control`: the `[control]` file as the control
/// server reads it (it has no default path: the file is always named).
fn check_control(path: Option<&std::path::Path>) -> ExitCode {
    let Some(path) = path else {
        return usage_error("config check --role control needs --config FILE");
    };
    match control::ControlConfig::load_for_check(path) {
        Ok(c) => {
            println!(
                "# {} is a valid control configuration\n[control]\nlisten-address = \"{}\"\nhostname = \"{}\"\nstate-dir = {:?}",
                path.display(),
                c.listen_address,
                c.hostname,
                c.state_dir.display().to_string(),
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("runewarp: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn run_control(args: crate::cli::ControlArgs) -> ExitCode {
    let Some(path) = args.config.as_deref() else {
        return usage_error("runewarp control needs --config FILE (a [control] section)");
    };
    let config = match control::ControlConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("runewarp: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match &args.command {
        None => serve(
            "control",
            config.log_level,
            control::start(config),
            control::run,
        ),
        Some(cmd) => match control::admin::run(&config, cmd) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(control::admin::AdminError::Usage(m)) => usage_error(&m),
            Err(e) => {
                eprintln!("runewarp control: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
    }
}

/// `runewarp node`: the device agent.
fn run_node(cmd: crate::cli::NodeCommand) -> ExitCode {
    use crate::cli::NodeCommand;
    let printed = |r: Result<String, node::NodeError>| match r {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(node::NodeError::Usage(m)) => usage_error(&m),
        Err(e) => {
            eprintln!("runewarp node: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    };
    match cmd {
        NodeCommand::Status { state } => printed(node::status(&state.state_dir)),
        NodeCommand::Logout { state } => printed(node::logout(&state.state_dir)),
        NodeCommand::Down { state } => printed(node::down::down(&state.state_dir)),
        NodeCommand::Signal { to, message, state } => runtime(None, async move {
            printed(node::send_signal(&state.state_dir, &to, &message).await)
        }),
        NodeCommand::Up {
            control,
            setup_key,
            setup_key_file,
            ca_file,
            hostname,
            tun,
            advertise_routes,
            listen_port,
            endpoint,
            state,
        } => {
            let routes = match advertise_routes
                .as_deref()
                .map(node::subnet_connector::parse_routes)
            {
                None => None,
                Some(Ok(r)) if tun.is_some() => Some(r),
                Some(Ok(_)) => {
                    return usage_error(
                        "--advertise-routes needs --tun: the Subnet Connector forwards through the data plane",
                    );
                }
                Some(Err(e)) => return usage_error(&e.to_string()),
            };
            let setup_key = match setup_key_file {
                None => setup_key,
                Some(path) => match std::fs::read_to_string(&path) {
                    Ok(text) => Some(text.trim().to_owned()),
                    Err(e) => {
                        eprintln!(
                            "runewarp: cannot read the setup key file {}: {e}",
                            path.display()
                        );
                        return ExitCode::from(EXIT_CONFIG);
                    }
                },
            };
            logging::init(config::LogLevel::Info);
            runtime(None, async move {
                // Before enrolment: a connector that cannot forward fails
                // at once, naming what is missing.
                let connector = match (routes, tun.as_deref()) {
                    (Some(routes), Some(interface)) => {
                        match node::subnet_connector::Connector::setup(interface, routes) {
                            Ok(c) => Some(c),
                            Err(e) => {
                                tracing::error!(event = "node_failed", error = %e);
                                return ExitCode::from(EXIT_FAILURE);
                            }
                        }
                    }
                    _ => None,
                };
                let started = node::start(
                    &state.state_dir,
                    control.as_deref(),
                    setup_key.as_deref(),
                    ca_file.as_deref(),
                    hostname.as_deref(),
                )
                .await;
                let node = match started {
                    Ok(n) => n,
                    Err(node::NodeError::Usage(m)) => return usage_error(&m),
                    Err(e) => {
                        tracing::error!(event = "node_failed", error = %e);
                        return ExitCode::from(EXIT_FAILURE);
                    }
                };
                let _pid_file = match node::down::record(&state.state_dir) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::error!(event = "node_failed", error = %e);
                        return ExitCode::from(EXIT_FAILURE);
                    }
                };
                // Enrolled (or enrolment restored): ready for systemd, even
                // while the map stream is still connecting.
                crate::notify::notify(crate::notify::READY);
                let (trigger, stop) = shutdown::channel();
                shutdown::on_signals(trigger);
                let _dataplane = match tun {
                    Some(interface) => {
                        let options = node::dataplane::Options {
                            interface,
                            listen_port,
                            endpoints: endpoint,
                        };
                        match node::dataplane::start(&node, &options, stop.clone()).await {
                            Ok(d) => Some(d),
                            Err(e) => {
                                tracing::error!(event = "node_failed", error = %e);
                                return ExitCode::from(EXIT_FAILURE);
                            }
                        }
                    }
                    None => None,
                };
                let _reporter = connector.as_ref().map(|c| c.spawn(&node, stop.clone()));
                match node::run(node, stop).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(event = "node_revoked", error = %e);
                        ExitCode::from(EXIT_FAILURE)
                    }
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::default_workers;

    #[test]
    fn services_default_to_half_the_cpus_and_never_zero() {
        assert_eq!(default_workers(1), 1);
        assert_eq!(default_workers(2), 1);
        assert_eq!(default_workers(3), 1);
        assert_eq!(default_workers(8), 4);
    }
}
