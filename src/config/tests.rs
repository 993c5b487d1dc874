//! Config seam tests: every rule has an invalid file asserting its message,
//! plus the valid shapes, precedence, defaults and the render round trip.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use super::*;

const ID_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const ID_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const ID_C: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create dir");
    }
    std::fs::write(&path, text).expect("write config");
    path
}

/// A temp dir holding `config.toml` with `text`, and that file's path.
fn config_file(text: &str) -> (TempDir, PathBuf) {
    let tmp = TempDir::new().expect("tempdir");
    let path = write(tmp.path(), "config.toml", text);
    (tmp, path)
}

/// HOME inside the temp dir, nothing else.
fn home_env(home: &Path) -> Environment {
    let home = home.to_str().expect("utf-8 temp path");
    Environment::from_pairs([("HOME", home)])
}

fn server_with(
    text: &str,
    env: Option<Environment>,
) -> (TempDir, Result<ServerConfig, ConfigError>) {
    let (tmp, path) = config_file(text);
    let env = env.unwrap_or_else(|| home_env(tmp.path()));
    let overlay = ServerOverlay {
        config: Some(path),
        hostname: None,
    };
    let result = load_server(&overlay, &env);
    (tmp, result)
}

fn client_with(text: &str) -> (TempDir, Result<ClientConfig, ConfigError>) {
    let (tmp, path) = config_file(text);
    let overlay = ClientOverlay {
        config: Some(path),
        ..Default::default()
    };
    let result = load_client(&overlay, &home_env(tmp.path()));
    (tmp, result)
}

fn server_err(text: &str) -> String {
    match server_with(text, None).1 {
        Ok(c) => panic!("expected an error, got {c:#?}\nfor:\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn client_err(text: &str) -> String {
    match client_with(text).1 {
        Ok(c) => panic!("expected an error, got {c:#?}\nfor:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn assert_has(message: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            message.contains(needle),
            "message {message:?} lacks {needle:?}"
        );
    }
    if !message.contains("\n^") && !message.contains('^') {
        assert!(!message.contains('\n'), "multi-line message: {message:?}");
    }
}

/// `text` contains `needle` (shown whole when it does not).
#[track_caller]
fn assert_contains(text: &str, needle: &str) {
    assert!(text.contains(needle), "{needle:?} not in:\n{text}");
}

/// Loading `text` as a Server config fails with a message containing every
/// one of `needles`.
#[track_caller]
fn server_rejects(text: &str, needles: &[&str]) {
    assert_has(&server_err(text), needles);
}

/// Loading `text` as a Client config fails with a message containing every
/// one of `needles`.
#[track_caller]
fn client_rejects(text: &str, needles: &[&str]) {
    assert_has(&client_err(text), needles);
}

fn minimal_server() -> String {
    format!(
        r#"
[server]
hostname = "edge.example.com"

[[server.tunnels]]
public-hostnames = ["app.example.com"]
client-identity = "{ID_A}"
"#
    )
}

fn minimal_client() -> &'static str {
    r#"
[client]
server-address = "edge.example.com"

[[client.services]]
backend-address = "127.0.0.1:8443"
"#
}

/// A server file with `[server]` body `body` and one valid tunnel appended.
fn server_body(body: &str) -> String {
    format!(
        "[server]\nhostname = \"edge.example.com\"\n{body}\n[[server.tunnels]]\npublic-hostnames = [\"app.example.com\"]\nclient-identity = \"{ID_A}\"\n"
    )
}

/// A client file with `[client]` body `body` and one catch-all service.
fn client_body(body: &str) -> String {
    format!(
        "[client]\nserver-address = \"edge.example.com\"\n{body}\n[[client.services]]\nbackend-address = \"127.0.0.1:8443\"\n"
    )
}

// ---------------------------------------------------------------- invalid

#[test]
fn toml_syntax_error_has_line_and_column() {
    let m = server_err("[server]\nhostname = \"a.example\"\npublic-bind-address 1\n");
    assert_has(&m, &["config.toml:3:21:", "public-bind-address 1"]);
    assert!(m.contains('^'), "{m}");
}

#[test]
fn toml_type_error_has_line_and_column() {
    server_rejects(
        "[server]\nhostname = \"e.example\"\n[[server.tunnels]]\npublic-hostnames = \"app.example.com\"\n",
        &["config.toml:4:", "public-hostnames = \"app.example.com\""],
    );
}

#[test]
fn unknown_top_level_key() {
    server_rejects(
        &format!("colour = \"red\"\n{}", minimal_server()),
        &["unknown key \"colour\"", "the top level", "line 1"],
    );
}

#[test]
fn unknown_top_level_key_that_belongs_in_a_section() {
    server_rejects(
        &format!("hostname = \"x\"\n{}", minimal_server()),
        &[
            "unknown key \"hostname\"",
            "did you mean \"server.hostname\"?",
        ],
    );
}

#[test]
fn log_level_typo_gets_suggestion() {
    server_rejects(
        &format!("log_level = \"info\"\n{}", minimal_server()),
        &["unknown key \"log_level\"", "did you mean \"log-level\"?"],
    );
}

#[test]
fn unknown_nested_key_with_suggestion() {
    let text = format!(
        "[server]\nhostname = \"edge.example.com\"\n[[server.tunnels]]\npublic-hostnames = [\"a.example.com\"]\nclient-identity = \"{ID_A}\"\n[[server.tunnels]]\npublic-hostname = [\"b.example.com\"]\nclient-identity = \"{ID_B}\"\n"
    );
    server_rejects(
        &text,
        &[
            "unknown key \"public-hostname\" in [[server.tunnels]] #2 at line 7",
            "server.tunnels[1].public-hostname",
            "did you mean \"public-hostnames\"?",
        ],
    );
}

#[test]
fn unknown_key_in_acme_and_service() {
    server_rejects(
        &server_body("[server.acme]\nemial = \"a@b.c\"\n"),
        &["\"emial\"", "[server.acme]", "did you mean \"email\"?"],
    );
    client_rejects(
        "[client]\nserver-address = \"e.example\"\n[[client.services]]\nbackend = \"127.0.0.1:1\"\n",
        &[
            "client.services[0].backend",
            "did you mean \"backend-address\"?",
        ],
    );
}

#[test]
fn unknown_key_in_other_section_is_still_reported() {
    server_rejects(
        &format!("{}\n[client]\nserver-adress = \"x\"\n", minimal_server()),
        &["client.server-adress", "did you mean \"server-address\"?"],
    );
}

#[test]
fn table_header_typo_suggests_the_table() {
    // "tunnel" is a prefix of both "tunnels" and "tunnel-bind-address";
    // a table header must be pointed at the table.
    server_rejects(
        &format!(
            "[server]\nhostname = \"edge.example.com\"\n[[server.tunnel]]\npublic-hostnames = [\"a.example.com\"]\nclient-identity = \"{ID_A}\"\n"
        ),
        &["unknown key \"tunnel\"", "did you mean \"tunnels\"?"],
    );
    // As a plain key, the closer plain key wins.
    server_rejects(
        &server_body("tunnel-bind-adress = \"0.0.0.0:443\""),
        &["did you mean \"tunnel-bind-address\"?"],
    );
}

#[test]
fn client_key_under_server_points_to_client() {
    server_rejects(
        &server_body("server-address = \"edge.example.com\""),
        &[
            "unknown key \"server-address\" in [server]",
            "did you mean \"client.server-address\"?",
        ],
    );
}

#[test]
fn unknown_key_without_close_match_has_no_suggestion() {
    let m = server_err(&server_body("zzzzzzzzzz = 1"));
    assert_has(&m, &["unknown key \"zzzzzzzzzz\" in [server]"]);
    assert!(!m.contains("did you mean"), "{m}");
}

#[test]
fn bad_log_level() {
    server_rejects(
        &format!("log-level = \"loud\"\n{}", minimal_server()),
        &[
            "log-level = \"loud\"",
            "off, error, warn, info, debug, trace",
        ],
    );
}

#[test]
fn missing_server_section() {
    server_rejects(minimal_client(), &["no [server] section"]);
}

#[test]
fn missing_client_section() {
    client_rejects(&minimal_server(), &["no [client] section"]);
}

#[test]
fn missing_server_hostname() {
    server_rejects(
        &format!(
            "[server]\n[[server.tunnels]]\npublic-hostnames = [\"a.example.com\"]\nclient-identity = \"{ID_A}\"\n"
        ),
        &[
            "server.hostname is required",
            "--hostname",
            "RUNEWARP_SERVER_HOSTNAME",
        ],
    );
}

#[test]
fn invalid_server_hostname() {
    server_rejects(
        &minimal_server().replace("edge.example.com", "10.0.0.1"),
        &["server.hostname = \"10.0.0.1\"", "IP literals"],
    );
}

#[test]
fn bind_address_must_be_literal() {
    server_rejects(
        &server_body("public-bind-address = \"localhost:443\""),
        &[
            "server.public-bind-address = \"localhost:443\"",
            "must be an IP:port literal such as 0.0.0.0:443",
        ],
    );
    server_rejects(
        &server_body("tunnel-bind-address = \"0.0.0.0\""),
        &[
            "server.tunnel-bind-address = \"0.0.0.0\"",
            "IP:port literal",
        ],
    );
    server_rejects(
        &server_body("readiness-bind-address = \"ready:1\""),
        &[
            "server.readiness-bind-address = \"ready:1\"",
            "IP:port literal",
        ],
    );
    client_rejects(
        &client_body("readiness-bind-address = \"localhost:9001\""),
        &[
            "client.readiness-bind-address = \"localhost:9001\"",
            "IP:port literal",
        ],
    );
}

#[test]
fn client_readiness_bind_address() {
    let (_t, r) = client_with(minimal_client());
    assert_eq!(r.expect("valid").readiness_bind_address, None);
    let (_t, r) = client_with(&client_body("readiness-bind-address = \"127.0.0.1:9001\""));
    assert_eq!(
        r.expect("valid").readiness_bind_address,
        Some("127.0.0.1:9001".parse().unwrap())
    );
}

#[test]
fn metrics_bind_address_must_be_a_literal() {
    server_rejects(
        &server_body("metrics-bind-address = \"localhost:9100\""),
        &[
            "server.metrics-bind-address = \"localhost:9100\"",
            "IP:port literal",
        ],
    );
    client_rejects(
        &client_body("metrics-bind-address = \":9101\""),
        &["client.metrics-bind-address = \":9101\"", "IP:port literal"],
    );
}

#[test]
fn control_socket_defaults_under_the_state_or_runtime_dir_and_is_resolved_against_the_file() {
    let (tmp, r) = server_with(&minimal_server(), None);
    assert_eq!(
        r.expect("valid").control_socket,
        Some(tmp.path().join(".local/state/runewarp/server.sock"))
    );
    let (tmp, r) = client_with(minimal_client());
    assert_eq!(
        r.expect("valid").control_socket,
        Some(tmp.path().join(".local/state/runewarp/client.sock"))
    );
    let (tmp, r) = server_with(&server_body("control-socket = \"run/s.sock\""), None);
    assert_eq!(
        r.expect("valid").control_socket,
        Some(tmp.path().join("run/s.sock"))
    );
    let tmp = TempDir::new().expect("tempdir");
    write(tmp.path(), "config.toml", &minimal_server());
    let env = Environment::from_pairs([
        ("HOME", tmp.path().to_str().expect("utf-8")),
        ("XDG_RUNTIME_DIR", "/run/user/1000"),
    ]);
    let c = load_server(
        &ServerOverlay {
            config: Some(tmp.path().join("config.toml")),
            hostname: None,
        },
        &env,
    )
    .expect("valid");
    assert_eq!(
        c.control_socket,
        Some(std::path::PathBuf::from(
            "/run/user/1000/runewarp/server.sock"
        ))
    );
    let long = format!("control-socket = \"/{}/s.sock\"", "d".repeat(120));
    assert_has(
        &server_err(&server_body(&long)),
        &["server.control-socket = ", "longer than 107 bytes"],
    );
}

#[test]
fn metrics_bind_address_is_off_by_default_and_parsed_when_set() {
    let (_t, r) = server_with(&minimal_server(), None);
    assert_eq!(r.expect("valid").metrics_bind_address, None);
    let (_t, r) = server_with(
        &server_body("metrics-bind-address = \"127.0.0.1:9100\""),
        None,
    );
    assert_eq!(
        r.expect("valid").metrics_bind_address,
        Some("127.0.0.1:9100".parse().expect("addr"))
    );
    let (_t, r) = client_with(minimal_client());
    assert_eq!(r.expect("valid").metrics_bind_address, None);
    let (_t, r) = client_with(&client_body("metrics-bind-address = \"[::1]:9101\""));
    assert_eq!(
        r.expect("valid").metrics_bind_address,
        Some("[::1]:9101".parse().expect("addr"))
    );
}

#[test]
fn bad_duration() {
    server_rejects(
        &server_body("graceful-shutdown-duration = \"60\""),
        &["server.graceful-shutdown-duration = \"60\"", "missing unit"],
    );
    server_rejects(
        &server_body("graceful-shutdown-duration = \"1.5s\""),
        &["server.graceful-shutdown-duration = \"1.5s\""],
    );
}

#[test]
fn cert_dir_and_acme_are_exclusive() {
    server_rejects(
        &server_body("cert-dir = \"certs\"\n[server.acme]\nemail = \"ops@example.com\"\n"),
        &["server.cert-dir", "[server.acme] are both set"],
    );
}

#[test]
fn acme_email_and_directory_url() {
    server_rejects(
        &server_body("[server.acme]\nemail = \"ops.example.com\"\n"),
        &[
            "server.acme.email = \"ops.example.com\"",
            "not an email address",
        ],
    );
    server_rejects(
        &server_body("[server.acme]\nemail = \"a@b@c\"\n"),
        &["server.acme.email = \"a@b@c\""],
    );
    server_rejects(
        &server_body("[server.acme]\ndirectory-url = \"http://pebble:14000/dir\"\n"),
        &[
            "server.acme.directory-url = \"http://pebble:14000/dir\"",
            "https://",
        ],
    );
}

#[test]
fn no_tunnels() {
    server_rejects(
        "[server]\nhostname = \"edge.example.com\"\n",
        &["at least one [[server.tunnels]] entry is required"],
    );
}

#[test]
fn tunnel_needs_public_hostnames() {
    server_rejects(
        &format!(
            "[server]\nhostname = \"e.example\"\n[[server.tunnels]]\nclient-identity = \"{ID_A}\"\n"
        ),
        &["server.tunnels[0].public-hostnames is required"],
    );
    server_rejects(
        &format!(
            "[server]\nhostname = \"e.example\"\n[[server.tunnels]]\npublic-hostnames = []\nclient-identity = \"{ID_A}\"\n"
        ),
        &[
            "server.tunnels[0].public-hostnames = []",
            "at least one hostname",
        ],
    );
}

#[test]
fn wildcard_public_hostnames() {
    // One wildcard beside exact names is fine, in another Tunnel too.
    let text = format!(
        "[server]\nhostname = \"e.example\"\n[[server.tunnels]]\npublic-hostnames = [\"a.example.com\"]\nclient-identity = \"{ID_A}\"\n[[server.tunnels]]\npublic-hostnames = [\"*.Example.com\"]\nclient-identity = \"{ID_B}\"\n"
    );
    let (_t, r) = server_with(&text, None);
    let c = r.expect("valid");
    assert_eq!(c.tunnels[1].public_hostnames[0].as_str(), "*.example.com");
    assert!(c.tunnels[1].public_hostnames[0].is_wildcard());
    // The same wildcard in two Tunnels is an error, as with exact names.
    let text = format!(
        "[server]\nhostname = \"e.example\"\n[[server.tunnels]]\npublic-hostnames = [\"*.example.com\"]\nclient-identity = \"{ID_A}\"\n[[server.tunnels]]\npublic-hostnames = [\"*.EXAMPLE.com.\"]\nclient-identity = \"{ID_B}\"\n"
    );
    assert_has(
        &server_err(&text),
        &[
            "server.tunnels[1].public-hostnames[0] = \"*.EXAMPLE.com.\"",
            "already listed at server.tunnels[0].public-hostnames[0]",
        ],
    );
    for (bad, why) in [
        ("a*.example.com", "whole first label"),
        ("*.*.example.com", "whole first label"),
        ("www.*.example.com", "whole first label"),
        ("*.com", "at least two labels"),
    ] {
        let text = format!(
            "[server]\nhostname = \"e.example\"\n[[server.tunnels]]\npublic-hostnames = [\"{bad}\"]\nclient-identity = \"{ID_A}\"\n"
        );
        assert_has(
            &server_err(&text),
            &[
                &format!("server.tunnels[0].public-hostnames[0] = \"{bad}\""),
                why,
            ],
        );
    }
    // The Server hostname is never a wildcard.
    server_rejects(
        &format!(
            "[server]\nhostname = \"*.example.com\"\n[[server.tunnels]]\npublic-hostnames = [\"a.example.com\"]\nclient-identity = \"{ID_A}\"\n"
        ),
        &["server.hostname = \"*.example.com\""],
    );
}

#[test]
fn wildcard_services_and_acme() {
    // Passthrough and manual-certificate terminate Services may be wildcards.
    let (_t, r) = client_with(
        "[client]\nserver-address = \"e.example\"\npublic-cert-dir = \"certs\"\n[[client.services]]\npublic-hostnames = [\"*.example.com\"]\nbackend-address = \"127.0.0.1:1\"\ntls-mode = \"terminate\"\n[[client.services]]\npublic-hostnames = [\"*.other.example\", \"api.example.com\"]\nbackend-address = \"127.0.0.1:2\"\n",
    );
    let c = r.expect("valid");
    assert!(c.services[0].public_hostnames[0].is_wildcard());
    // ACME cannot issue them: refused at config time, saying why.
    client_rejects(
        "[client]\nserver-address = \"e.example\"\n[client.acme]\n[[client.services]]\npublic-hostnames = [\"app.example.com\"]\nbackend-address = \"127.0.0.1:1\"\ntls-mode = \"terminate\"\n[[client.services]]\npublic-hostnames = [\"a.example.net\", \"*.example.net\"]\nbackend-address = \"127.0.0.1:2\"\ntls-mode = \"terminate\"\n",
        &[
            "client.services[1].public-hostnames[1] = \"*.example.net\"",
            "TLS-ALPN-01",
            "cannot issue wildcard",
            "public-cert-dir",
        ],
    );
    // With ACME, a passthrough wildcard is still fine.
    let (_t, r) = client_with(
        "[client]\nserver-address = \"e.example\"\n[client.acme]\n[[client.services]]\npublic-hostnames = [\"app.example.com\"]\nbackend-address = \"127.0.0.1:1\"\ntls-mode = \"terminate\"\n[[client.services]]\npublic-hostnames = [\"*.example.net\"]\nbackend-address = \"127.0.0.1:2\"\n",
    );
    r.expect("valid");
}

#[test]
fn ip_and_unicode_public_hostnames() {
    server_rejects(
        &minimal_server().replace("app.example.com", "192.0.2.1"),
        &[
            "server.tunnels[0].public-hostnames[0] = \"192.0.2.1\"",
            "IP literals",
        ],
    );
    server_rejects(
        &minimal_server().replace("app.example.com", "bücher.de"),
        &["public-hostnames[0] = \"bücher.de\"", "punycode"],
    );
}

#[test]
fn duplicate_hostname_across_tunnels() {
    let text = format!(
        "[server]\nhostname = \"e.example\"\n[[server.tunnels]]\npublic-hostnames = [\"a.example.com\", \"b.example.com\"]\nclient-identity = \"{ID_A}\"\n[[server.tunnels]]\npublic-hostnames = [\"B.example.com.\"]\nclient-identity = \"{ID_B}\"\n"
    );
    server_rejects(
        &text,
        &[
            "server.tunnels[1].public-hostnames[0] = \"B.example.com.\"",
            "already listed at server.tunnels[0].public-hostnames[1]",
        ],
    );
}

#[test]
fn duplicate_hostname_within_tunnel() {
    server_rejects(
        &minimal_server().replace(
            "[\"app.example.com\"]",
            "[\"app.example.com\", \"app.example.com\"]",
        ),
        &[
            "server.tunnels[0].public-hostnames[1]",
            "already listed at server.tunnels[0].public-hostnames[0]",
        ],
    );
}

#[test]
fn server_hostname_is_never_public() {
    server_rejects(
        &minimal_server().replace("app.example.com", "Edge.example.com"),
        &[
            "server.tunnels[0].public-hostnames[0] = \"Edge.example.com\"",
            "never a Public hostname",
        ],
    );
}

#[test]
fn identity_both_neither_empty() {
    server_rejects(
        &format!(
            "[server]\nhostname = \"e.example\"\n[[server.tunnels]]\npublic-hostnames = [\"a.example.com\"]\nclient-identity = \"{ID_A}\"\nclient-identities = [\"{ID_B}\"]\n"
        ),
        &["server.tunnels[0] sets both client-identity and client-identities"],
    );
    server_rejects(
        "[server]\nhostname = \"e.example\"\n[[server.tunnels]]\npublic-hostnames = [\"a.example.com\"]\n",
        &["server.tunnels[0] needs client-identity"],
    );
    server_rejects(
        "[server]\nhostname = \"e.example\"\n[[server.tunnels]]\npublic-hostnames = [\"a.example.com\"]\nclient-identities = []\n",
        &[
            "server.tunnels[0].client-identities = []",
            "at least one identity",
        ],
    );
}

#[test]
fn identity_format() {
    let colons = ID_C
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":");
    server_rejects(
        &minimal_server().replace(ID_A, &colons),
        &[
            "server.tunnels[0].client-identity = \"01:23:",
            "without colons",
        ],
    );
    server_rejects(
        &minimal_server().replace(ID_A, &ID_C.to_uppercase()),
        &["client-identity = \"0123456789ABCDEF", "lowercase hex"],
    );
    server_rejects(
        &minimal_server().replace(ID_A, "abc"),
        &["client-identity = \"abc\"", "64 lowercase hex"],
    );
}

#[test]
fn identity_in_two_tunnels() {
    let text = format!(
        "[server]\nhostname = \"e.example\"\n[[server.tunnels]]\npublic-hostnames = [\"a.example.com\"]\nclient-identity = \"{ID_A}\"\n[[server.tunnels]]\npublic-hostnames = [\"b.example.com\"]\nclient-identities = [\"{ID_B}\", \"{ID_A}\"]\n"
    );
    server_rejects(
        &text,
        &[
            &format!("server.tunnels[1].client-identities[1] = \"{ID_A}\""),
            "already pinned by server.tunnels[0] (server.tunnels[0].client-identity)",
        ],
    );
    server_rejects(
        &minimal_server().replace(
            &format!("client-identity = \"{ID_A}\""),
            &format!("client-identities = [\"{ID_A}\", \"{ID_A}\"]"),
        ),
        &["client-identities[1]", "listed twice in server.tunnels[0]"],
    );
}

#[test]
fn missing_explicit_config_file_is_named() {
    let tmp = TempDir::new().expect("tempdir");
    let missing = tmp.path().join("nope.toml");
    let overlay = ServerOverlay {
        config: Some(missing.clone()),
        hostname: None,
    };
    let m = load_server(&overlay, &home_env(tmp.path()))
        .expect_err("missing file")
        .to_string();
    assert_has(&m, &[&missing.display().to_string(), "does not exist"]);
}

#[test]
fn no_discovered_file_server() {
    let tmp = TempDir::new().expect("tempdir");
    let m = load_server(&ServerOverlay::default(), &home_env(tmp.path()))
        .expect_err("no file")
        .to_string();
    let looked = tmp.path().join(".config/runewarp/config.toml");
    assert_has(
        &m,
        &[&format!(
            "no config file: looked at {}; pass --config",
            looked.display()
        )],
    );
}

#[test]
fn no_discovered_file_client_without_both_overlays() {
    let tmp = TempDir::new().expect("tempdir");
    let overlay = ClientOverlay {
        server_address: Some("edge.example.com".into()),
        ..Default::default()
    };
    let m = load_client(&overlay, &home_env(tmp.path()))
        .expect_err("no file")
        .to_string();
    assert_has(&m, &["no config file: looked at"]);
}

#[test]
fn no_home_for_default_dir() {
    let tmp = TempDir::new().expect("tempdir");
    let (_t, r) = server_with(&minimal_server(), Some(Environment::default()));
    let m = r.expect_err("no HOME").to_string();
    assert_has(&m, &["server.cert-dir", "XDG_DATA_HOME", "HOME"]);
    drop(tmp);
}

#[test]
fn server_address_rules() {
    client_rejects(
        "[client]\n[[client.services]]\nbackend-address = \"127.0.0.1:1\"\n",
        &["client.server-address is required"],
    );
    // The minimal Client with `address` for its server-address.
    let with_address = |address: &str| minimal_client().replace("edge.example.com", address);
    let dns_only = "DNS names only; the name must match the Server certificate";
    for (address, why) in [
        ("192.0.2.1:443", dns_only),
        ("[::1]:443", dns_only),
        ("edge.example.com:0", "1..=65535"),
        ("edge.example.com:99999", "1..=65535"),
    ] {
        let key = format!("client.server-address = \"{address}\"");
        client_rejects(&with_address(address), &[&key, why]);
    }
}

#[test]
fn server_trust_rules() {
    client_rejects(
        &client_body("server-trust = \"custom\""),
        &[
            "client.server-trust = \"custom\"",
            "\"system\", \"ca-file\" or \"pin\"",
        ],
    );
    client_rejects(
        &client_body("server-trust = \"ca-file\""),
        &["client.server-trust = \"ca-file\" needs client.server-ca-file"],
    );
    client_rejects(
        &client_body("server-trust = \"system\"\nserver-ca-file = \"ca.pem\""),
        &[
            "client.server-ca-file = \"",
            "ca.pem\"",
            "only allowed with client.server-trust = \"ca-file\"",
        ],
    );
}

#[test]
fn server_pin_rules() {
    let pin = "0123456789abcdef".repeat(4);
    let (_tmp, r) = client_with(&client_body(&format!(
        "server-trust = \"pin\"\nserver-pin = \"{pin}\""
    )));
    match r.expect("valid").server_trust {
        ServerTrust::Pin(p) => assert_eq!(p.to_string(), pin),
        other => panic!("{other:?}"),
    }
    client_rejects(
        &client_body("server-trust = \"pin\""),
        &[
            "client.server-trust = \"pin\" needs client.server-pin",
            "runewarp server cert show-pin",
        ],
    );
    client_rejects(
        &client_body(&format!(
            "server-trust = \"pin\"\nserver-pin = \"{}\"",
            pin.to_uppercase()
        )),
        &["client.server-pin = \"0123", "lowercase hex"],
    );
    client_rejects(
        &client_body("server-trust = \"pin\"\nserver-pin = \"abcd\""),
        &["client.server-pin = \"abcd\"", "64 lowercase hex", "got 4"],
    );
    client_rejects(
        &client_body(&format!("server-pin = \"{pin}\"")),
        &[
            "client.server-pin = ",
            "only allowed with client.server-trust = \"pin\"",
            "(server-trust is \"system\")",
        ],
    );
    client_rejects(
        &client_body(&format!(
            "server-trust = \"ca-file\"\nserver-ca-file = \"ca.pem\"\nserver-pin = \"{pin}\""
        )),
        &["client.server-pin", "(server-trust is \"ca-file\")"],
    );
    client_rejects(
        &client_body(&format!(
            "server-trust = \"pin\"\nserver-pin = \"{pin}\"\nserver-ca-file = \"ca.pem\""
        )),
        &[
            "client.server-ca-file = ",
            "not allowed with client.server-trust = \"pin\"",
        ],
    );
}

#[test]
fn services_required() {
    client_rejects(
        "[client]\nserver-address = \"edge.example.com\"\n",
        &["at least one [[client.services]] entry is required"],
    );
}

#[test]
fn catch_all_only_when_sole() {
    client_rejects(
        "[client]\nserver-address = \"e.example\"\n[[client.services]]\nbackend-address = \"127.0.0.1:1\"\n[[client.services]]\npublic-hostnames = [\"a.example.com\"]\nbackend-address = \"127.0.0.1:2\"\n",
        &["client.services[0].public-hostnames is required", "sole"],
    );
}

#[test]
fn empty_service_hostnames() {
    client_rejects(
        "[client]\nserver-address = \"e.example\"\n[[client.services]]\npublic-hostnames = []\nbackend-address = \"127.0.0.1:1\"\n",
        &["client.services[0].public-hostnames = []"],
    );
}

#[test]
fn catch_all_must_be_passthrough() {
    client_rejects(
        "[client]\nserver-address = \"e.example\"\n[[client.services]]\nbackend-address = \"127.0.0.1:1\"\ntls-mode = \"terminate\"\n",
        &[
            "client.services[0].tls-mode = \"terminate\"",
            "catch-all",
            "passthrough",
        ],
    );
}

#[test]
fn bad_tls_mode_and_proxy_protocol() {
    client_rejects(
        &minimal_client().replace(
            "backend-address = \"127.0.0.1:8443\"",
            "backend-address = \"127.0.0.1:8443\"\ntls-mode = \"mitm\"",
        ),
        &[
            "client.services[0].tls-mode = \"mitm\"",
            "\"passthrough\" or \"terminate\"",
        ],
    );
    client_rejects(
        &minimal_client().replace(
            "backend-address = \"127.0.0.1:8443\"",
            "backend-address = \"127.0.0.1:8443\"\nproxy-protocol = \"v1\"",
        ),
        &["client.services[0].proxy-protocol = \"v1\"", "only \"v2\""],
    );
}

#[test]
fn backend_address_rules() {
    for (bad, reason) in [
        ("127.0.0.1", "port is required"),
        ("localhost:0", "1..=65535"),
        ("::1:8443", "brackets"),
        ("[::1]", "port is required"),
        ("[zz]:1", "not an IPv6 address"),
        ("bad host:80", "not an IP literal or a DNS name"),
    ] {
        client_rejects(
            &minimal_client().replace("127.0.0.1:8443", bad),
            &[
                &format!("client.services[0].backend-address = \"{bad}\""),
                reason,
            ],
        );
    }
    client_rejects(
        "[client]\nserver-address = \"e.example\"\n[[client.services]]\n",
        &["client.services[0].backend-address is required"],
    );
}

#[test]
fn duplicate_hostname_across_services() {
    client_rejects(
        "[client]\nserver-address = \"e.example\"\n[[client.services]]\npublic-hostnames = [\"a.example.com\"]\nbackend-address = \"127.0.0.1:1\"\n[[client.services]]\npublic-hostnames = [\"a.example.com\"]\nbackend-address = \"127.0.0.1:2\"\n",
        &[
            "client.services[1].public-hostnames[0] = \"a.example.com\"",
            "already listed at client.services[0].public-hostnames[0]",
        ],
    );
}

#[test]
fn public_cert_sources() {
    let terminate = "[client]\nserver-address = \"e.example\"\n{body}\n[[client.services]]\npublic-hostnames = [\"a.example.com\"]\nbackend-address = \"127.0.0.1:1\"\ntls-mode = \"terminate\"\n";
    client_rejects(
        &terminate.replace("{body}", "public-cert-dir = \"pc\"\n[client.acme]\n"),
        &["client.public-cert-dir", "[client.acme] are both set"],
    );
    client_rejects(
        &client_body("public-cert-dir = \"pc\""),
        &[
            "client.public-cert-dir = \"",
            "is set but no [[client.services]] entry has tls-mode = \"terminate\"",
        ],
    );
    client_rejects(
        &client_body("[client.acme]\nemail = \"a@b.example\""),
        &["[client.acme] is set but no [[client.services]] entry has tls-mode = \"terminate\""],
    );
}

#[test]
fn backend_overlay_needs_one_service() {
    let (tmp, path) = config_file(
        "[client]\nserver-address = \"e.example\"\n[[client.services]]\npublic-hostnames = [\"a.example.com\"]\nbackend-address = \"127.0.0.1:1\"\n[[client.services]]\npublic-hostnames = [\"b.example.com\"]\nbackend-address = \"127.0.0.1:2\"\n",
    );
    let overlay = ClientOverlay {
        config: Some(path),
        backend_address: Some("127.0.0.1:9".into()),
        ..Default::default()
    };
    let m = load_client(&overlay, &home_env(tmp.path()))
        .expect_err("2 services")
        .to_string();
    assert_has(
        &m,
        &["--backend-address needs exactly one [[client.services]] entry, found 2"],
    );
}

#[test]
fn overlay_values_are_named_by_flag_and_env() {
    let (tmp, path) = config_file(&minimal_server());
    let overlay = ServerOverlay {
        config: Some(path.clone()),
        hostname: Some("*.example.com".into()),
    };
    let m = load_server(&overlay, &home_env(tmp.path()))
        .expect_err("bad flag")
        .to_string();
    assert_has(&m, &["--hostname \"*.example.com\"", "wildcards"]);
    let home = tmp.path().to_str().expect("utf-8");
    let env = Environment::from_pairs([("HOME", home), ("RUNEWARP_SERVER_HOSTNAME", "a b")]);
    let overlay = ServerOverlay {
        config: Some(path),
        hostname: None,
    };
    let m = load_server(&overlay, &env)
        .expect_err("bad env")
        .to_string();
    assert_has(&m, &["RUNEWARP_SERVER_HOSTNAME=\"a b\""]);
    let client = ClientOverlay {
        server_address: Some("10.1.1.1".into()),
        backend_address: Some("127.0.0.1:1".into()),
        ..Default::default()
    };
    let m = load_client(&client, &home_env(tmp.path()))
        .expect_err("ip")
        .to_string();
    assert_has(&m, &["--server-address \"10.1.1.1\"", "DNS names only"]);
}

#[test]
fn empty_path_value() {
    server_rejects(
        &server_body("cert-dir = \"\""),
        &["server.cert-dir = \"\"", "must not be empty"],
    );
}

// ------------------------------------------------------------------ valid

#[test]
fn minimal_server_defaults() {
    let (tmp, r) = server_with(&minimal_server(), None);
    let c = r.expect("valid");
    assert_eq!(
        c.source.as_deref(),
        Some(tmp.path().join("config.toml").as_path())
    );
    assert_eq!(c.log_level, LogLevel::Info);
    assert_eq!(c.hostname.as_str(), "edge.example.com");
    assert_eq!(c.public_bind_address, "0.0.0.0:443".parse().expect("addr"));
    assert_eq!(c.tunnel_bind_address, "0.0.0.0:443".parse().expect("addr"));
    assert_eq!(c.readiness_bind_address, None);
    assert_eq!(c.graceful_shutdown_duration, Duration::from_secs(60));
    assert_eq!(
        c.certificates,
        ServerCertSource::Manual {
            cert_dir: tmp.path().join(".local/share/runewarp/server")
        }
    );
    assert_eq!(c.tunnels.len(), 1);
    assert_eq!(c.tunnels[0].index, 0);
    assert_eq!(c.tunnels[0].public_hostnames[0].as_str(), "app.example.com");
    assert_eq!(c.tunnels[0].client_identities[0].to_string(), ID_A);
}

#[test]
fn full_server() {
    let text = format!(
        r#"
log-level = "debug"
[server]
hostname = "Edge.Example.com."
public-bind-address = "[::]:8443"
tunnel-bind-address = "127.0.0.1:4433"
readiness-bind-address = "127.0.0.1:9000"
graceful-shutdown-duration = "500ms"

[server.acme]
email = "ops@example.com"
directory-url = "https://localhost:14000/dir"
directory-ca-file = "pebble.pem"

[[server.tunnels]]
public-hostnames = ["a.example.com", "B.example.com"]
client-identities = ["{ID_A}", "{ID_B}"]

[[server.tunnels]]
public-hostnames = ["c.example.com"]
client-identity = "{ID_C}"
"#
    );
    let (tmp, r) = server_with(&text, None);
    let c = r.expect("valid");
    assert_eq!(c.log_level, LogLevel::Debug);
    assert_eq!(c.hostname.as_str(), "edge.example.com");
    assert_eq!(c.public_bind_address, "[::]:8443".parse().expect("addr"));
    assert_eq!(
        c.readiness_bind_address,
        Some("127.0.0.1:9000".parse().expect("addr"))
    );
    assert_eq!(c.graceful_shutdown_duration, Duration::from_millis(500));
    assert_eq!(
        c.certificates,
        ServerCertSource::Acme(AcmeConfig {
            email: Some("ops@example.com".into()),
            state_dir: tmp.path().join(".local/state/runewarp/server/acme"),
            directory_url: "https://localhost:14000/dir".into(),
            directory_ca_file: Some(tmp.path().join("pebble.pem")),
        })
    );
    assert_eq!(c.tunnels[0].public_hostnames[1].as_str(), "b.example.com");
    assert_eq!(c.tunnels[0].client_identities.len(), 2);
    assert_eq!(c.tunnels[1].index, 1);
}

#[test]
fn acme_directory_defaults_to_lets_encrypt() {
    let (_t, r) = server_with(&server_body("[server.acme]\n"), None);
    match r.expect("valid").certificates {
        ServerCertSource::Acme(a) => {
            assert_eq!(a.directory_url, LETS_ENCRYPT_DIRECTORY);
            assert_eq!(a.email, None);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn minimal_client_defaults() {
    let (tmp, r) = client_with(minimal_client());
    let c = r.expect("valid");
    assert_eq!(c.server_address.host.as_str(), "edge.example.com");
    assert_eq!(c.server_address.port, 443);
    assert_eq!(c.server_trust, ServerTrust::System);
    assert_eq!(
        c.identity_dir,
        tmp.path().join(".local/share/runewarp/client/identity")
    );
    assert_eq!(c.public_certs, None);
    assert_eq!(c.services.len(), 1);
    let s = &c.services[0];
    assert!(s.public_hostnames.is_empty());
    assert_eq!(s.backend_address.to_string(), "127.0.0.1:8443");
    assert_eq!(s.tls_mode, TlsMode::Passthrough);
    assert!(!s.proxy_protocol);
}

/// A Client with a CA-file trust, a fixed identity-dir, a passthrough
/// Service with PROXY v2 and a terminate one.
const FULL_CLIENT: &str = r#"
[client]
server-address = "edge.example.com:7443"
server-trust = "ca-file"
server-ca-file = "ca/server-ca.crt"
identity-dir = "/srv/id"

[[client.services]]
public-hostnames = ["a.example.com"]
backend-address = "[::1]:8443"
proxy-protocol = "v2"

[[client.services]]
public-hostnames = ["b.example.com"]
backend-address = "web_1:80"
tls-mode = "terminate"
"#;

#[test]
fn full_client() {
    let (tmp, r) = client_with(FULL_CLIENT);
    let c = r.expect("valid");
    assert_eq!(c.server_address.port, 7443);
    assert_eq!(
        c.server_trust,
        ServerTrust::CaFile(tmp.path().join("ca/server-ca.crt"))
    );
    assert_eq!(c.identity_dir, PathBuf::from("/srv/id"));
    assert_eq!(
        c.public_certs,
        Some(PublicCertSource::Manual {
            dir: tmp.path().join(".local/share/runewarp/client/public-certs")
        })
    );
    assert_eq!(c.services[0].backend_address.host, "::1");
    assert_eq!(c.services[0].backend_address.to_string(), "[::1]:8443");
    assert!(c.services[0].proxy_protocol);
    assert_eq!(c.services[1].tls_mode, TlsMode::Terminate);
    assert_eq!(c.services[1].index, 1);
}

#[test]
fn client_acme_state_default() {
    let text = "[client]\nserver-address = \"e.example\"\n[client.acme]\nemail = \"a@b.example\"\n[[client.services]]\npublic-hostnames = [\"a.example.com\"]\nbackend-address = \"127.0.0.1:80\"\ntls-mode = \"terminate\"\n";
    let (tmp, r) = client_with(text);
    match r.expect("valid").public_certs {
        Some(PublicCertSource::Acme(a)) => {
            assert_eq!(
                a.state_dir,
                tmp.path().join(".local/state/runewarp/client/acme")
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn both_sections_in_one_file() {
    let text = format!("{}\n{}", minimal_server(), minimal_client());
    let (_t, s) = server_with(&text, None);
    assert_eq!(s.expect("server").tunnels.len(), 1);
    let (_t, c) = client_with(&text);
    assert_eq!(c.expect("client").services.len(), 1);
}

#[test]
fn server_ignores_invalid_client_values() {
    let text = format!(
        "{}\n[client]\nserver-address = \"10.0.0.1\"\n",
        minimal_server()
    );
    let (_t, s) = server_with(&text, None);
    assert!(s.is_ok(), "{s:?}");
}

#[test]
fn relative_paths_resolve_against_file_dir() {
    let tmp = TempDir::new().expect("tempdir");
    let path = write(
        tmp.path(),
        "etc/runewarp/config.toml",
        &format!(
            "{}\n[client]\nserver-address = \"e.example\"\nserver-trust = \"ca-file\"\nserver-ca-file = \"./ca.pem\"\nidentity-dir = \"id\"\npublic-cert-dir = \"../pc\"\n[[client.services]]\npublic-hostnames = [\"x.example.com\"]\nbackend-address = \"127.0.0.1:1\"\ntls-mode = \"terminate\"\n",
            server_body("cert-dir = \"certs\"")
        ),
    );
    let dir = tmp.path().join("etc/runewarp");
    let env = home_env(tmp.path());
    let s = load_server(
        &ServerOverlay {
            config: Some(path.clone()),
            hostname: None,
        },
        &env,
    )
    .expect("server");
    assert_eq!(
        s.certificates,
        ServerCertSource::Manual {
            cert_dir: dir.join("certs")
        }
    );
    let c = load_client(
        &ClientOverlay {
            config: Some(path.clone()),
            ..Default::default()
        },
        &env,
    )
    .expect("client");
    assert_eq!(c.server_trust, ServerTrust::CaFile(dir.join("ca.pem")));
    assert_eq!(c.identity_dir, dir.join("id"));
    assert_eq!(
        c.public_certs,
        Some(PublicCertSource::Manual {
            dir: dir.join("../pc")
        })
    );

    let acme = server_body("[server.acme]\nstate-dir = \"acme-state\"\n");
    let path = write(tmp.path(), "etc/runewarp/acme.toml", &acme);
    let s = load_server(
        &ServerOverlay {
            config: Some(path),
            hostname: None,
        },
        &env,
    )
    .expect("server");
    match s.certificates {
        ServerCertSource::Acme(a) => assert_eq!(a.state_dir, dir.join("acme-state")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn xdg_defaults_from_injected_env() {
    let tmp = TempDir::new().expect("tempdir");
    let root = tmp.path().to_str().expect("utf-8").to_string();
    let cfg = format!("{root}/cfg");
    let data = format!("{root}/data");
    let state = format!("{root}/state");
    write(
        Path::new(&cfg),
        "runewarp/config.toml",
        &format!("{}\n{}", server_body("[server.acme]\n"), minimal_client()),
    );
    let env = Environment::from_pairs([
        ("HOME", "/nonexistent-home"),
        ("XDG_CONFIG_HOME", cfg.as_str()),
        ("XDG_DATA_HOME", data.as_str()),
        ("XDG_STATE_HOME", state.as_str()),
    ]);
    let s = load_server(&ServerOverlay::default(), &env).expect("discovered server");
    assert_eq!(
        s.source,
        Some(PathBuf::from(&cfg).join("runewarp/config.toml"))
    );
    match s.certificates {
        ServerCertSource::Acme(a) => {
            assert_eq!(
                a.state_dir,
                PathBuf::from(&state).join("runewarp/server/acme")
            )
        }
        other => panic!("{other:?}"),
    }
    let c = load_client(&ClientOverlay::default(), &env).expect("discovered client");
    assert_eq!(
        c.identity_dir,
        PathBuf::from(&data).join("runewarp/client/identity")
    );

    // Relative XDG values are ignored: back to HOME.
    let env = Environment::from_pairs([
        ("HOME", root.as_str()),
        ("XDG_CONFIG_HOME", "relative/cfg"),
        ("XDG_DATA_HOME", "relative/data"),
    ]);
    let m = material_defaults(None, &env).expect("defaults");
    assert_eq!(
        m.identity_dir,
        tmp.path().join(".local/share/runewarp/client/identity")
    );
    assert_eq!(m.server_hostname, None);
}

#[test]
fn hostname_precedence() {
    let (tmp, path) = config_file(&minimal_server());
    let home = tmp.path().to_str().expect("utf-8");
    let with_env = Environment::from_pairs([
        ("HOME", home),
        ("RUNEWARP_SERVER_HOSTNAME", "env.example.com"),
    ]);
    let load = |flag: Option<&str>, env: &Environment| {
        load_server(
            &ServerOverlay {
                config: Some(path.clone()),
                hostname: flag.map(str::to_string),
            },
            env,
        )
        .expect("valid")
        .hostname
        .to_string()
    };
    assert_eq!(
        load(Some("flag.example.com"), &with_env),
        "flag.example.com"
    );
    assert_eq!(load(None, &with_env), "env.example.com");
    assert_eq!(load(None, &home_env(tmp.path())), "edge.example.com");
}

#[test]
fn client_overlays_on_file() {
    let (tmp, path) = config_file(
        "[client]\nserver-address = \"file.example.com\"\n[[client.services]]\npublic-hostnames = [\"a.example.com\"]\nbackend-address = \"127.0.0.1:1\"\nproxy-protocol = \"v2\"\n",
    );
    let c = load_client(
        &ClientOverlay {
            config: Some(path),
            server_address: Some("flag.example.com:4443".into()),
            backend_address: Some("backend.internal:8080".into()),
        },
        &home_env(tmp.path()),
    )
    .expect("valid");
    assert_eq!(c.server_address.to_string(), "flag.example.com:4443");
    assert_eq!(c.services.len(), 1);
    assert_eq!(
        c.services[0].backend_address.to_string(),
        "backend.internal:8080"
    );
    assert_eq!(c.services[0].public_hostnames[0].as_str(), "a.example.com");
    assert!(c.services[0].proxy_protocol);

    // A file with a [client] but no Service: the overlay creates the catch-all.
    let path = write(
        tmp.path(),
        "empty.toml",
        "[client]\nserver-address = \"file.example.com\"\n",
    );
    let c = load_client(
        &ClientOverlay {
            config: Some(path),
            server_address: None,
            backend_address: Some("127.0.0.1:9".into()),
        },
        &home_env(tmp.path()),
    )
    .expect("valid");
    assert!(c.services[0].public_hostnames.is_empty());
    assert_eq!(c.services[0].tls_mode, TlsMode::Passthrough);
}

#[test]
fn client_without_file_from_overlays() {
    let tmp = TempDir::new().expect("tempdir");
    let c = load_client(
        &ClientOverlay {
            config: None,
            server_address: Some("edge.example.com".into()),
            backend_address: Some("127.0.0.1:8443".into()),
        },
        &home_env(tmp.path()),
    )
    .expect("valid");
    assert_eq!(c.source, None);
    assert_eq!(c.log_level, LogLevel::Info);
    assert_eq!(c.server_trust, ServerTrust::System);
    assert_eq!(c.services.len(), 1);
    assert!(c.services[0].public_hostnames.is_empty());
    assert_eq!(c.services[0].tls_mode, TlsMode::Passthrough);
    assert_eq!(
        c.identity_dir,
        tmp.path().join(".local/share/runewarp/client/identity")
    );
}

fn reload_server(rendered: &str, env: &Environment) -> ServerConfig {
    let (_tmp, path) = config_file(rendered);
    let mut c = load_server(
        &ServerOverlay {
            config: Some(path),
            hostname: None,
        },
        env,
    )
    .unwrap_or_else(|e| panic!("{e}\n{rendered}"));
    c.source = None;
    c
}

fn reload_client(rendered: &str, env: &Environment) -> ClientConfig {
    let (_tmp, path) = config_file(rendered);
    let mut c = load_client(
        &ClientOverlay {
            config: Some(path),
            ..Default::default()
        },
        env,
    )
    .unwrap_or_else(|e| panic!("{e}\n{rendered}"));
    c.source = None;
    c
}

#[test]
fn render_round_trip_server() {
    let texts = [
        minimal_server(),
        server_body(
            "readiness-bind-address = \"[::1]:9000\"\nmetrics-bind-address = \"127.0.0.1:9100\"\ngraceful-shutdown-duration = \"1500ms\"\ncert-dir = \"c\"",
        ),
        format!(
            "log-level = \"trace\"\n{}",
            server_body(
                "[server.acme]\nemail = \"o@example.com\"\ndirectory-ca-file = \"x.pem\"\n"
            )
        ),
        format!(
            "[server]\nhostname = \"e.example\"\ngraceful-shutdown-duration = \"2m\"\n[[server.tunnels]]\npublic-hostnames = [\"a.example\", \"b.example\"]\nclient-identities = [\"{ID_A}\", \"{ID_B}\"]\n[[server.tunnels]]\npublic-hostnames = [\"c.example\"]\nclient-identities = [\"{ID_C}\"]\n"
        ),
    ];
    for text in texts {
        let (tmp, r) = server_with(&text, None);
        let mut c = r.expect("valid");
        let rendered = render_server(&c);
        assert_contains(&rendered, "graceful-shutdown-duration = \"");
        // The reload must not depend on the environment for defaults.
        let again = reload_server(&rendered, &Environment::default());
        c.source = None;
        assert_eq!(again, c, "\n{rendered}");
        drop(tmp);
    }
    let (_t, r) = server_with(&minimal_server(), None);
    let rendered = render_server(&r.expect("valid"));
    assert_contains(&rendered, "graceful-shutdown-duration = \"60s\"");
    assert_contains(&rendered, "public-bind-address = \"0.0.0.0:443\"");
    assert_contains(&rendered, "log-level = \"info\"");
    assert_contains(&rendered, "cert-dir = \"/");
}

#[test]
fn render_round_trip_client() {
    let texts = [
        minimal_client().to_string(),
        // The full Client with a log level and both listeners.
        format!(
            "log-level = \"warn\"\n{}",
            FULL_CLIENT.replace(
                "identity-dir = \"/srv/id\"\n",
                "readiness-bind-address = \"[::1]:9001\"\nmetrics-bind-address = \"127.0.0.1:9101\"\n",
            )
        ),
        format!(
            "[client]\nserver-address = \"e.example\"\nserver-trust = \"pin\"\nserver-pin = \"{}\"\n[[client.services]]\nbackend-address = \"127.0.0.1:80\"\n",
            "ab".repeat(32)
        ),
        "[client]\nserver-address = \"e.example\"\n[client.acme]\ndirectory-url = \"https://acme.internal/dir\"\n[[client.services]]\npublic-hostnames = [\"a.example.com\"]\nbackend-address = \"127.0.0.1:80\"\ntls-mode = \"terminate\"\n".to_string(),
    ];
    for text in texts {
        let (tmp, r) = client_with(&text);
        let mut c = r.expect("valid");
        let rendered = render_client(&c);
        let again = reload_client(&rendered, &Environment::default());
        c.source = None;
        assert_eq!(again, c, "\n{rendered}");
        drop(tmp);
    }
}

#[test]
fn material_defaults_without_tunnels() {
    let (tmp, path) = config_file(
        "[server]\nhostname = \"Edge.Example.com\"\ncert-dir = \"certs\"\n[client]\nidentity-dir = \"/srv/id\"\n",
    );
    let m = material_defaults(Some(&path), &home_env(tmp.path())).expect("defaults");
    assert_eq!(
        m.server_hostname.map(|h| h.to_string()).as_deref(),
        Some("edge.example.com")
    );
    assert_eq!(m.server_cert_dir, tmp.path().join("certs"));
    assert_eq!(m.identity_dir, PathBuf::from("/srv/id"));
    assert_eq!(
        m.public_cert_dir,
        tmp.path().join(".local/share/runewarp/client/public-certs")
    );

    let home = tmp.path().to_str().expect("utf-8");
    let env = Environment::from_pairs([
        ("HOME", home),
        ("RUNEWARP_SERVER_HOSTNAME", "env.example.com"),
    ]);
    let m = material_defaults(Some(&path), &env).expect("defaults");
    assert_eq!(
        m.server_hostname.map(|h| h.to_string()).as_deref(),
        Some("env.example.com")
    );

    let env = Environment::from_pairs([("HOME", home), ("RUNEWARP_SERVER_HOSTNAME", "1.2.3.4")]);
    let e = material_defaults(Some(&path), &env).expect_err("ip");
    assert_has(&e.to_string(), &["RUNEWARP_SERVER_HOSTNAME=\"1.2.3.4\""]);

    // No file anywhere: pure defaults.
    let m = material_defaults(None, &home_env(tmp.path())).expect("defaults");
    assert_eq!(
        m.server_cert_dir,
        tmp.path().join(".local/share/runewarp/server")
    );
    assert_eq!(m.server_hostname, None);

    // An explicit missing file is an error.
    let e = material_defaults(
        Some(&tmp.path().join("missing.toml")),
        &home_env(tmp.path()),
    );
    assert!(e.is_err());
}

#[test]
fn parse_duration_is_public() {
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
}

#[test]
fn section_of_wrong_type() {
    server_rejects(
        "server = 1\n",
        &["config.toml:1:10:", "expected a [server] table"],
    );
}

#[test]
fn client_overlays_suffice_when_file_has_no_client_section() {
    let (tmp, path) = config_file(&format!("log-level = \"warn\"\n{}", minimal_server()));
    let c = load_client(
        &ClientOverlay {
            config: Some(path.clone()),
            server_address: Some("edge.example.com".into()),
            backend_address: Some("127.0.0.1:1".into()),
        },
        &home_env(tmp.path()),
    )
    .expect("valid");
    assert_eq!(c.source, Some(path));
    assert_eq!(c.log_level, LogLevel::Warn);
    assert!(c.services[0].public_hostnames.is_empty());
}

// ------------------------------------------------------- stream timeouts

#[test]
fn stream_timeouts_default_to_30s_and_15m_on_both_sides() {
    let want = StreamTimeouts {
        write: Duration::from_secs(30),
        idle: Duration::from_secs(15 * 60),
    };
    let (_t, r) = server_with(&minimal_server(), None);
    assert_eq!(r.expect("valid").stream_timeouts, want);
    let (_t, r) = client_with(minimal_client());
    assert_eq!(r.expect("valid").stream_timeouts, want);
}

#[test]
fn stream_timeouts_are_read_and_rendered_on_both_sides() {
    let body = "stream-write-timeout = \"2s\"\nstream-idle-timeout = \"1h\"";
    let want = StreamTimeouts {
        write: Duration::from_secs(2),
        idle: Duration::from_secs(3600),
    };
    let (_t, r) = server_with(&server_body(body), None);
    let c = r.expect("valid");
    assert_eq!(c.stream_timeouts, want);
    let rendered = render_server(&c);
    assert_contains(&rendered, "stream-write-timeout = \"2s\"");
    assert_contains(&rendered, "stream-idle-timeout = \"3600s\"");
    assert_eq!(
        reload_server(&rendered, &Environment::default()).stream_timeouts,
        want
    );
    let (_t, r) = client_with(&client_body(body));
    let c = r.expect("valid");
    assert_eq!(c.stream_timeouts, want);
    let rendered = render_client(&c);
    assert_contains(&rendered, "stream-write-timeout = \"2s\"");
    assert_eq!(
        reload_client(&rendered, &Environment::default()).stream_timeouts,
        want
    );
}

// ------------------------------------------------------ congestion-control

#[test]
fn congestion_control_defaults_parses_and_renders() {
    let (_t, r) = server_with(&minimal_server(), None);
    let c = r.expect("valid");
    assert_eq!(c.congestion_control, CongestionControl::Bbr);
    assert!(render_server(&c).contains("congestion-control = \"bbr\""));
    let (_t, r) = client_with(minimal_client());
    let c = r.expect("valid");
    assert_eq!(c.congestion_control, CongestionControl::Bbr);
    assert!(render_client(&c).contains("congestion-control = \"bbr\""));

    let (_t, r) = server_with(&server_body("congestion-control = \"cubic\""), None);
    let c = r.expect("valid");
    assert_eq!(c.congestion_control, CongestionControl::Cubic);
    assert_eq!(
        reload_server(&render_server(&c), &Environment::default()).congestion_control,
        CongestionControl::Cubic
    );
    let (_t, r) = client_with(&client_body("congestion-control = \"cubic\""));
    assert_eq!(
        r.expect("valid").congestion_control,
        CongestionControl::Cubic
    );
}

#[test]
fn invalid_stream_timeouts_name_key_and_value() {
    for key in ["stream-write-timeout", "stream-idle-timeout"] {
        for (value, reason) in [
            ("30", "missing unit"),
            ("1.5s", "expected a whole number"),
            ("-1s", "expected a whole number"),
            ("10d", "unknown unit"),
            ("0s", "must be between 1s and 168h"),
            ("999ms", "must be between 1s and 168h"),
            ("169h", "must be between 1s and 168h"),
        ] {
            let line = format!("{key} = \"{value}\"");
            server_rejects(&server_body(&line), &[&format!("server.{line}"), reason]);
            client_rejects(&client_body(&line), &[&format!("client.{line}"), reason]);
        }
        server_rejects(&server_body(&format!("{key} = 30")), &[key]);
    }
}

#[test]
fn bad_congestion_control() {
    server_rejects(
        &server_body("congestion-control = \"reno\""),
        &[
            "server.congestion-control = \"reno\"",
            "must be one of bbr, cubic",
        ],
    );
    client_rejects(
        &client_body("congestion-control = \"BBR\""),
        &[
            "client.congestion-control = \"BBR\"",
            "must be one of bbr, cubic",
        ],
    );
}

#[test]
fn server_relay_is_validated_and_renders_back() {
    const KEY: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
    let ok = |body: &str| {
        let text = format!("{}\n{body}", minimal_server());
        let (_tmp, r) = server_with(&text, None);
        r.unwrap_or_else(|e| panic!("{e}"))
    };
    assert!(ok("").relay.is_none());
    let c = ok(&format!("[server.relay]\ncontrol-key = \"{KEY}\"\n"));
    let r = c.relay.as_ref().unwrap();
    assert_eq!(r.listen.to_string(), "0.0.0.0:3478");
    assert_eq!(
        crate::mesh_protocol::public_key_bytes(KEY),
        Some(r.control_key)
    );
    let rendered = render_server(&c);
    assert_contains(&rendered, "[server.relay]");
    assert_contains(&rendered, KEY);
    let with = |body: &str| format!("{}\n[server.relay]\n{body}", minimal_server());
    server_rejects(
        &with(""),
        &["server.relay.control-key is required", "relay-key"],
    );
    server_rejects(
        &with("control-key = \"c2hvcnQ=\"\n"),
        &["server.relay.control-key = \"c2hvcnQ=\"", "32 bytes"],
    );
    server_rejects(
        &with(&format!("control-key = \"{KEY}\"\nlisten = \"3478\"\n")),
        &["server.relay.listen = \"3478\"", "IP:port"],
    );
    server_rejects(
        &with(&format!(
            "control-key = \"{KEY}\"\ncontrol-key-file = \"k\"\n"
        )),
        &["both control-key and control-key-file"],
    );
    server_rejects(
        &with("control-key-file = \"missing.key\"\n"),
        &["server.relay.control-key-file", "cannot read"],
    );
    server_rejects(
        &with("listn = \"x\"\n"),
        &["listn", "[server.relay]", "listen"],
    );
}
