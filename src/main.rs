//! The `runewarp` binary: parses the command line and hands it to
//! [`runewarp::run::main`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = runewarp::cli::Cli::parse();
    runewarp::run::main(cli)
}
