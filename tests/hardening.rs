//! Hardening of the processes and their material (issue 11, items 7, 10,
//! 11, 12), with the real `runewarp` binary: the descriptor limit at
//! start-up, constrained private CAs, private state directories and
//! secret files, and the optional Server pin.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use common::proc::*;

/// The value of `key=` in a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!(" {key}=");
    let at = line.find(&needle)? + needle.len();
    let rest = &line[at..];
    Some(
        rest.split_whitespace()
            .next()
            .unwrap_or("")
            .trim_matches('"'),
    )
}

fn current_nofile() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    (lim.rlim_cur, lim.rlim_max)
}

/// Start the Server with RLIMIT_NOFILE set to `soft`/`hard` in the child.
fn server_with_nofile(home: &Home, soft: u64, hard: u64, log: &str) -> Running {
    let file = std::fs::File::create(home.path().join(log)).unwrap();
    let mut cmd = home.cmd();
    cmd.args(["server", "-c", "server.toml"])
        .stdout(Stdio::null())
        .stderr(file);
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft as libc::rlim_t,
                rlim_max: hard as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Running {
        child: cmd.spawn().unwrap(),
        log: home.path().join(log),
    }
}

fn server_home() -> Home {
    let (home, pin) = Home::with_identity();
    home.server_config(&pin);
    home
}

#[test]
fn the_server_raises_its_descriptor_limit_to_the_hard_limit() {
    let (_, hard_now) = current_nofile();
    let hard = hard_now.min(20_000);
    if hard < 10_000 {
        eprintln!("skipped: the hard RLIMIT_NOFILE here is {hard_now}, below 10,000");
        return;
    }
    let home = server_home();
    let server = server_with_nofile(&home, 256, hard, "server.log");
    let line = server
        .wait_event("nofile_limit", Duration::from_secs(10))
        .remove(0);
    assert_eq!(
        field(&line, "soft"),
        Some(hard.to_string().as_str()),
        "{line}"
    );
    assert_eq!(field(&line, "was"), Some("256"), "{line}");
    assert_eq!(
        field(&line, "hard"),
        Some(hard.to_string().as_str()),
        "{line}"
    );
    // The limit covers the admission limits: no warning.
    server.wait_event("server_started", Duration::from_secs(10));
    assert!(
        server.events("nofile_limit_low").is_empty(),
        "{}",
        server.log_text()
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert!(
        open_files.split_whitespace().any(|w| w == hard.to_string()),
        "{open_files}"
    );
}

#[test]
fn a_low_hard_descriptor_limit_is_named_in_one_warning() {
    let home = server_home();
    let server = server_with_nofile(&home, 512, 512, "server.log");
    let line = server
        .wait_event("nofile_limit", Duration::from_secs(10))
        .remove(0);
    assert_eq!(field(&line, "soft"), Some("512"), "{line}");
    let low = server.wait_event("nofile_limit_low", Duration::from_secs(10));
    assert_eq!(low.len(), 1, "{low:?}");
    assert!(low[0].contains("WARN"), "{}", low[0]);
    let needed: u64 = field(&low[0], "needed").unwrap().parse().unwrap();
    assert!(needed >= 8192, "{}", low[0]);
    assert!(low[0].contains("LimitNOFILE"), "{}", low[0]);
}

// ------------------------------------------------------------ Server pin

fn pinned_client_config(home: &Home, name: &str, pin: &str, backend: std::net::SocketAddr) {
    home.write(
        name,
        &format!(
            "[client]\nserver-address = \"localhost:{}\"\nserver-trust = \"pin\"\n\
             server-pin = \"{pin}\"\nidentity-dir = \"identity\"\n\n\
             [[client.services]]\npublic-hostnames = [\"{APP}\"]\nbackend-address = \"{}\"\n",
            home.tunnel, backend
        ),
    );
}

#[test]
fn a_client_pinning_the_server_key_routes_and_a_wrong_pin_is_refused() {
    let home = Home::new();
    let backend = tls_backend();
    let init = home.ok(&server_cert_init("server-certs"));
    let pin = home.ok(&["server", "cert", "show-pin", "--dir", "server-certs"]);
    let pin = pin.strip_suffix('\n').expect("one line");
    assert_eq!(pin.len(), 64);
    assert!(
        pin.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert!(init.contains(&format!("server-pin = \"{pin}\"")), "{init}");

    let id = home.identity("identity");
    let server_toml = home.server_config(&id);
    pinned_client_config(&home, "client.toml", pin, backend.addr);
    let effective = home.ok(&["config", "check", "--role", "client", "-c", "client.toml"]);
    assert!(effective.contains("server-trust = \"pin\""), "{effective}");
    assert!(
        effective.contains(&format!("server-pin = \"{pin}\"")),
        "{effective}"
    );

    let _server = home.spawn("server", &server_toml, "server.log");
    let client = home.spawn("client", &home.path().join("client.toml"), "client.log");
    visit_until_ok(home.public_addr(), &backend.cert, Duration::from_secs(15));
    assert!(client.events("server_pin_mismatch").is_empty());
    drop(client);

    // Same Server, a pin of some other key: refused, and the log names both.
    let wrong: String = pin
        .chars()
        .map(|c| if c == '0' { '1' } else { '0' })
        .collect();
    pinned_client_config(&home, "wrong.toml", &wrong, backend.addr);
    let wrong_client = home.spawn("client", &home.path().join("wrong.toml"), "wrong.log");
    let line = wrong_client
        .wait_event("server_pin_mismatch", Duration::from_secs(15))
        .remove(0);
    assert_eq!(field(&line, "expected"), Some(wrong.as_str()), "{line}");
    assert_eq!(field(&line, "presented"), Some(pin), "{line}");
    let refused = wrong_client.wait_event("tunnel_refused", Duration::from_secs(10));
    assert!(
        refused
            .iter()
            .any(|l| l.contains("server_untrusted") && l.contains("server-trust = \\\"pin\\\"")),
        "{refused:?}"
    );
    assert!(wrong_client.events("tunnel_connected").is_empty());
}

// ------------------------------------------------------ private material

/// The Server started once (logging to first.log, creating its state) and
/// stopped again.
fn started_once(home: &Home) -> Running {
    let mut server = home.spawn("server", &home.path().join("server.toml"), "first.log");
    server.wait_event("server_started", Duration::from_secs(10));
    server.stop_with(libc::SIGTERM, Duration::from_secs(5));
    server
}

#[test]
fn an_exposed_stateless_reset_secret_is_reported_at_start() {
    let home = server_home();
    let server = started_once(&home);
    let secret = home
        .path()
        .join("server-certs/state/stateless-reset.secret");
    assert!(server.events("secret_file_exposed").is_empty());
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();

    let server = home.spawn("server", &home.path().join("server.toml"), "second.log");
    server.wait_event("server_started", Duration::from_secs(10));
    let exposed = server.events("secret_file_exposed");
    assert!(
        exposed
            .iter()
            .any(|l| l.contains("stateless-reset.secret") && l.contains("mode=644")),
        "{}",
        server.log_text()
    );
}

#[test]
fn material_commands_refuse_a_symlinked_state_directory() {
    let home = Home::new();
    let elsewhere = home.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::create_dir(home.path().join("server-certs")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, home.path().join("server-certs/state")).unwrap();
    let err = stderr_of(home.cmd().args(server_cert_init("server-certs")), 1);
    assert!(err.contains("is a symbolic link"), "{err}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

#[test]
fn the_server_refuses_a_symlinked_state_directory() {
    let home = server_home();
    // A first start creates the stateless-reset secret in state/.
    started_once(&home);
    let state = home.path().join("server-certs/state");
    let moved = home.path().join("moved-state");
    std::fs::rename(&state, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &state).unwrap();
    let mut server = home.spawn("server", &home.path().join("server.toml"), "server.log");
    let (status, _) = server.wait_exit(Duration::from_secs(10));
    let err = server.log_text();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("server-certs/state is a symbolic link"),
        "{err}"
    );
}

#[test]
fn the_openssl_cli_sees_name_constraints_and_path_length_zero() {
    if std::env::var("RUNEWARP_TEST_EXTERNAL").as_deref() != Ok("1") {
        eprintln!("skipped: set RUNEWARP_TEST_EXTERNAL=1 (needs the openssl program)");
        return;
    }
    let home = Home::new();
    home.server_material();
    home.ok(&[
        "client",
        "public-cert",
        "init",
        "--hostname",
        "a.example.com",
        "--dir",
        "public",
    ]);
    for (ca, name) in [
        ("server-certs/server-ca.crt", "DNS:localhost"),
        ("public/public-ca.crt", "DNS:a.example.com"),
    ] {
        let out = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(home.path().join(ca))
            .output()
            .expect("openssl runs");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("X509v3 Name Constraints: critical"), "{text}");
        assert!(text.contains(name), "{text}");
        assert!(
            text.contains("X509v3 Basic Constraints: critical"),
            "{text}"
        );
        assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    }

    // What a thief of server-ca.key could mint, as OpenSSL judges it: a
    // leaf for another domain, and an intermediate CA (even for the
    // permitted name). A leaf for the Server hostname still verifies.
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_pem = std::fs::read_to_string(home.path().join("server-certs/server-ca.crt")).unwrap();
    let key_pem =
        std::fs::read_to_string(home.path().join("server-certs/state/server-ca.key")).unwrap();
    let ca_key = KeyPair::from_pem(&key_pem).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).unwrap();
    fn leaf_for<S: rcgen::SigningKey>(name: &str, issuer: &Issuer<'_, S>) -> String {
        CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&KeyPair::generate().unwrap(), issuer)
            .unwrap()
            .pem()
    }
    let mut sub = CertificateParams::default();
    sub.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    sub.distinguished_name
        .push(rcgen::DnType::CommonName, "forged sub CA");
    let sub_key = KeyPair::generate().unwrap();
    let sub_pem = sub.signed_by(&sub_key, &issuer).unwrap().pem();
    let sub_issuer = Issuer::new(sub, sub_key);
    let files = [
        ("own.pem", leaf_for("localhost", &issuer)),
        ("evil.pem", leaf_for("bank.example.net", &issuer)),
        ("sub.pem", sub_pem),
        ("below.pem", leaf_for("localhost", &sub_issuer)),
    ];
    for (name, pem) in &files {
        home.write(name, pem);
    }
    let verify = |leaf: &str, untrusted: Option<&str>| {
        let mut cmd = std::process::Command::new("openssl");
        cmd.current_dir(home.path())
            .args(["verify", "-CAfile", "server-certs/server-ca.crt"]);
        if let Some(u) = untrusted {
            cmd.args(["-untrusted", u]);
        }
        let out = cmd.arg(leaf).output().expect("openssl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = verify("own.pem", None);
    assert!(ok, "{text}");
    let (ok, text) = verify("evil.pem", None);
    assert!(!ok && text.contains("subtree"), "{text}");
    let (ok, text) = verify("below.pem", Some("sub.pem"));
    assert!(!ok && text.contains("path length"), "{text}");
}
