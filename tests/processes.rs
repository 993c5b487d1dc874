//! The real `runewarp` binary as separate processes: material made by its
//! own commands, config files, a Visitor through passthrough, `config
//! check`, exit codes, and SIGTERM handling.

mod common;

use std::time::Duration;

use common::proc::*;

#[test]
fn server_and_client_processes_carry_a_visitor_and_stop_on_sigterm() {
    let (home, pin) = Home::with_identity();
    let backend = tls_backend();
    assert_eq!(pin.len(), 64);
    let server_toml = home.server_config(&pin);
    let client_toml = home.default_client_config(backend.addr);

    // `config check` prints the effective config with defaults filled in.
    let effective = home.ok(&["config", "check", "--role", "server", "-c", "server.toml"]);
    assert!(effective.contains("log-level = \"info\""), "{effective}");
    assert!(
        effective.contains("congestion-control = \"bbr\""),
        "{effective}"
    );
    assert!(
        effective.contains(&home.path().join("server-certs").display().to_string()),
        "{effective}"
    );

    let mut server = home.spawn("server", &server_toml, "server.log");
    let mut client = home.spawn("client", &client_toml, "client.log");
    visit_until_ok(home.public_addr(), &backend.cert, Duration::from_secs(15));
    assert_eq!(
        visit(home.public_addr(), &backend.cert).unwrap(),
        "backend got \"hello\""
    );

    let (status, took) = client.stop_with(libc::SIGTERM, Duration::from_secs(5));
    assert!(status.success(), "client exit {status:?}");
    assert!(took < Duration::from_secs(3), "client took {took:?}");
    let (status, took) = server.stop_with(libc::SIGTERM, Duration::from_secs(5));
    assert!(status.success(), "server exit {status:?}");
    assert!(took < Duration::from_secs(3), "server took {took:?}");

    assert_eq!(
        client.events("tunnel_connected").len(),
        1,
        "{}",
        client.log_text()
    );
    assert!(
        server.events("tunnel_connected")[0].contains(&pin),
        "the Server logs the identity"
    );
    // Both ends log their congestion controller at start-up.
    assert!(server.events("server_started")[0].contains("congestion_control=bbr"));
    assert!(client.events("client_started")[0].contains("congestion_control=bbr"));
    for log in [client.log_text(), server.log_text()] {
        assert!(
            !log.contains("hello"),
            "payload must never be logged: {log}"
        );
        assert!(!log.contains("PRIVATE KEY"));
    }
}

#[test]
fn an_invalid_config_exits_2_naming_key_and_value_before_binding_anything() {
    let home = Home::new();
    home.write(
        "bad.toml",
        &format!(
            "[server]\nhostname = \"localhost\"\npublic-bind-address = \"127.0.0.1:{}\"\n\
             [[server.tunnels]]\npublic-hostnames = [\"a*.example.com\"]\nclient-identity = \"{}\"\n",
            home.public,
            "ab".repeat(32)
        ),
    );
    let err = stderr_of(home.cmd().args(["server", "-c", "bad.toml"]), 2);
    assert!(
        err.contains("server.tunnels[0].public-hostnames[0]") && err.contains("a*.example.com"),
        "{err}"
    );
    std::net::TcpListener::bind(("127.0.0.1", home.public))
        .expect("the public port must still be free");
    let check = home
        .cmd()
        .args(["config", "check", "--role", "server", "-c", "bad.toml"])
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(2));
}

/// A Client run from flags alone, in a home without any material.
fn bare_client(home: &Home) -> std::process::Command {
    let mut c = home.cmd();
    c.args([
        "client",
        "--server-address",
        "localhost:4433",
        "--backend-address",
        "127.0.0.1:8443",
    ]);
    c
}

#[test]
fn a_client_without_identity_says_which_command_creates_it() {
    let home = Home::new();
    let err = stderr_of(&mut bare_client(&home), 1);
    assert!(err.contains("runewarp client identity init"), "{err}");
    // Said once: the log line, not the log line and a copy of it.
    assert_eq!(
        err.matches("runewarp client identity init").count(),
        1,
        "{err}"
    );
}

#[test]
fn unknown_flags_are_usage_errors() {
    let home = Home::new();
    assert_eq!(
        home.cmd()
            .args(["server", "--no-such-flag"])
            .output()
            .unwrap()
            .status
            .code(),
        Some(2)
    );
}

/// `runewarp completions bash | head` and `runewarp man | head`: a reader
/// that goes away early ends the output quietly, with exit 0.
#[test]
fn printing_commands_stop_quietly_when_the_reader_goes_away() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let home = Home::new();
    for args in [&["completions", "bash"][..], &["man"][..]] {
        let mut fds = [0; 2];
        // SAFETY: pipe() fills two new descriptors we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // The reader is gone before the first byte is written.
        drop(read);
        let out = home
            .cmd()
            .args(args)
            .stdout(std::process::Stdio::from(write))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn a_bad_worker_thread_count_is_a_usage_error_naming_the_variable() {
    let home = Home::new();
    let err = stderr_of(bare_client(&home).env("TOKIO_WORKER_THREADS", "two"), 2);
    assert!(err.contains("TOKIO_WORKER_THREADS=\"two\""), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
