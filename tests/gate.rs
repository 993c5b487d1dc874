//! Runegate (`[gate]`) through the real binary.

mod common;

use common::proc::*;

#[test]
fn config_check_role_gate_prints_the_effective_gate_config() {
    let home = Home::new();
    std::fs::write(
        home.path().join("gate.toml"),
        r#"
[gate]
upstream = "http://127.0.0.1:7860"
base-url = "https://app.example.com"
allowed-domains = ["example.com"]
[gate.smtp]
host = "127.0.0.1"
tls = "none"
from = "Sign-in <signin@example.com>"
"#,
    )
    .unwrap();
    let effective = home.ok(&["config", "check", "--role", "gate", "-c", "gate.toml"]);
    for line in [
        "listen-address = \"127.0.0.1:7870\"",
        "link-ttl = \"600s\"",
        "session-ttl = \"43200s\"",
        "port = \"25\"",
    ] {
        assert!(effective.contains(line), "{line} missing in {effective}");
    }

    std::fs::write(
        home.path().join("bad.toml"),
        "[gate]\nupstream = \"http://127.0.0.1:7860\"\nbase-url = \"https://app.example.com\"\nallowed-domains = [\"example.com\"]\n[gate.smtp]\nhost = \"smtp.example.com\"\ntls = \"none\"\nfrom = \"s@example.com\"\n",
    )
    .unwrap();
    let err = stderr_of(
        home.cmd()
            .args(["config", "check", "--role", "gate", "-c", "bad.toml"]),
        2,
    );
    assert!(
        err.contains("gate.smtp.tls = \"none\"") && err.contains("loopback"),
        "{err}"
    );
}
