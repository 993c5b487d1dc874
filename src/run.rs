//! Carrying out a parsed command line. Exit codes: 0 orderly, 1 runtime
//! failure, 2 configuration or usage error.

use std::process::ExitCode;

use crate::cli::{
    Cli, ClientArgs, ClientCommand, Command, ConfigCommand, Role, ServerArgs, ServerCommand,
};
use crate::config::{self, ClientOverlay, Environment, ServerOverlay};
use crate::{client, demo, logging, server, shutdown, tls};

/// Runtime failure (bind, material, I/O).
pub const EXIT_FAILURE: u8 = 1;
/// Configuration or usage error.
pub const EXIT_CONFIG: u8 = 2;

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
        }) => material_result(tls::material::run_server_cert(&cmd, &env)),
        Command::Client(ClientArgs {
            command: Some(ClientCommand::Identity(cmd)),
            ..
        }) => material_result(tls::material::run_identity(&cmd, &env)),
        Command::Client(ClientArgs {
            command: Some(ClientCommand::PublicCert(cmd)),
            ..
        }) => material_result(tls::material::run_public_cert(&cmd, &env)),
        Command::Server(ServerArgs { command: None, run }) => {
            let overlay = ServerOverlay {
                config: run.config,
                hostname: run.hostname,
            };
            let config = match config::load_server(&overlay, &env) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            logging::init(config.log_level);
            runtime(async move {
                let srv = match server::Server::bind(config).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(event = "server_failed", error = ?e.to_string());
                        eprintln!("runewarp server: {e}");
                        return ExitCode::from(EXIT_FAILURE);
                    }
                };
                let (trigger, stop) = shutdown::channel();
                shutdown::on_signals(trigger);
                srv.run(stop).await;
                ExitCode::SUCCESS
            })
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
            logging::init(config.log_level);
            runtime(async move {
                let c = match client::Client::new(config) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(event = "client_failed", error = ?e.to_string());
                        eprintln!("runewarp client: {e}");
                        return ExitCode::from(EXIT_FAILURE);
                    }
                };
                let (trigger, stop) = shutdown::channel();
                shutdown::on_signals(trigger);
                c.run(stop).await;
                ExitCode::SUCCESS
            })
        }
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
            };
            match text {
                Ok(t) => {
                    print!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(e),
            }
        }
        Command::Demo(args) => runtime(demo::run(args)),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "runewarp", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            match clap_mangen::Man::new(cmd).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("runewarp man: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
    }
}

fn runtime<F: std::future::Future<Output = ExitCode>>(f: F) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("runewarp: cannot start the async runtime: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
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
