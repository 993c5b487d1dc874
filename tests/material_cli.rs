//! The material commands through the real `runewarp` binary:
//! `server cert`, `client identity` and `client public-cert`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A scratch HOME with XDG directories inside it, so nothing touches the
/// real home directory.
struct Sandbox {
    tmp: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    /// A new sandbox and the path of `rel` in it (not created).
    fn with_dir(rel: &str) -> (Self, PathBuf) {
        let sb = Self::new();
        let dir = sb.path(rel);
        (sb, dir)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runewarp"));
        let home = self.tmp.path();
        cmd.env("HOME", home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_DATA_HOME", home.join(".local/share"))
            .env("XDG_STATE_HOME", home.join(".local/state"))
            .env_remove("RUNEWARP_SERVER_HOSTNAME")
            .env_remove("RUST_LOG")
            .current_dir(home)
            .args(args);
        cmd
    }

    /// Run, expect success, return stdout.
    fn ok(&self, args: &[&str]) -> String {
        succeeded(args, self.cmd(args))
    }

    /// [`Sandbox::ok`] with one more environment variable.
    fn ok_env(&self, args: &[&str], (key, value): (&str, &str)) -> String {
        let mut cmd = self.cmd(args);
        cmd.env(key, value);
        succeeded(args, cmd)
    }

    /// Run, expect failure, return stderr.
    /// Run `args`, expect a failure whose stderr says each of `needles`.
    fn fails_saying(&self, args: &[&str], needles: &[&str]) {
        assert_says(&self.fails(args), needles);
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} unexpectedly succeeded");
        String::from_utf8(out.stderr).unwrap()
    }
}

/// Run `cmd` (made from `args`), expect success, return stdout.
fn succeeded(args: &[&str], mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `server cert init --hostname <host> --dir <dir>`.
fn server_init<'a>(host: &'a str, dir: &'a str) -> [&'a str; 7] {
    ["server", "cert", "init", "--hostname", host, "--dir", dir]
}

/// `client public-cert init --hostname <host> --dir <dir>`.
fn public_init<'a>(host: &'a str, dir: &'a str) -> [&'a str; 7] {
    public_cert("init", host, dir)
}

/// `client public-cert renew --hostname <host> --dir <dir>`.
fn public_renew<'a>(host: &'a str, dir: &'a str) -> [&'a str; 7] {
    public_cert("renew", host, dir)
}

fn public_cert<'a>(verb: &'a str, host: &'a str, dir: &'a str) -> [&'a str; 7] {
    [
        "client",
        "public-cert",
        verb,
        "--hostname",
        host,
        "--dir",
        dir,
    ]
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Each `(path below dir, mode)` has that mode.
fn assert_modes(dir: &Path, modes: &[(&str, u32)]) {
    for &(rel, want) in modes {
        assert_eq!(mode(&dir.join(rel)), want, "mode of {rel}");
    }
}

/// `text` (a command's output) says each of `needles`.
fn assert_says(text: &str, needles: &[&str]) {
    for needle in needles {
        assert!(text.contains(needle), "{needle:?} missing in: {text}");
    }
}

fn cert_der(p: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(p).unwrap().to_vec()
}

fn dns_names(der: &[u8]) -> Vec<String> {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    runewarp::tls::material::san_dns_names(&cert).unwrap()
}

fn signed_by(leaf: &[u8], ca: &[u8]) -> bool {
    let (_, leaf) = X509Certificate::from_der(leaf).unwrap();
    let (_, ca) = X509Certificate::from_der(ca).unwrap();
    leaf.issuer().as_raw() == ca.subject().as_raw()
        && leaf.verify_signature(Some(ca.public_key())).is_ok()
}

fn snapshot(files: &[PathBuf]) -> Vec<Vec<u8>> {
    files.iter().map(|f| fs::read(f).unwrap()).collect()
}

fn is_pin(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn server_files(dir: &Path) -> Vec<PathBuf> {
    vec![
        dir.join("server.crt"),
        dir.join("server.key"),
        dir.join("server-ca.crt"),
        dir.join("state/server-ca.key"),
    ]
}

#[test]
fn server_cert_init_renew_rotate_ca() {
    let (sb, dir) = Sandbox::with_dir("server");
    let d = dir.to_str().unwrap();

    let out = sb.ok(&server_init("Edge.Example.com.", d));
    assert_says(&out, &["Server CA SHA-256 fingerprint:"]);
    for f in server_files(&dir) {
        assert!(f.is_file(), "{} missing", f.display());
    }
    assert_modes(
        &dir,
        &[
            ("server.key", 0o600),
            ("state/server-ca.key", 0o600),
            ("server.crt", 0o644),
            ("server-ca.crt", 0o644),
            ("state", 0o700),
        ],
    );
    let key_pem = fs::read_to_string(dir.join("server.key")).unwrap();
    assert!(
        key_pem.starts_with("-----BEGIN PRIVATE KEY-----"),
        "PKCS#8 expected"
    );

    let ca = cert_der(&dir.join("server-ca.crt"));
    let leaf = cert_der(&dir.join("server.crt"));
    assert_eq!(dns_names(&leaf), ["edge.example.com"]);
    assert!(signed_by(&leaf, &ca));

    // renew: same CA, new leaf key, hostname kept from the existing leaf.
    let ca_key = fs::read(dir.join("state/server-ca.key")).unwrap();
    let leaf_key = fs::read(dir.join("server.key")).unwrap();
    sb.ok(&["server", "cert", "renew", "--dir", d]);
    assert_eq!(cert_der(&dir.join("server-ca.crt")), ca);
    assert_eq!(fs::read(dir.join("state/server-ca.key")).unwrap(), ca_key);
    assert_ne!(fs::read(dir.join("server.key")).unwrap(), leaf_key);
    let renewed = cert_der(&dir.join("server.crt"));
    assert_ne!(renewed, leaf);
    assert_eq!(dns_names(&renewed), ["edge.example.com"]);
    assert!(signed_by(&renewed, &ca));
    assert_eq!(mode(&dir.join("server.key")), 0o600);

    // rotate-ca: new CA, leaf signed by it and not by the old one.
    sb.ok(&["server", "cert", "rotate-ca", "--dir", d]);
    let new_ca = cert_der(&dir.join("server-ca.crt"));
    assert_ne!(new_ca, ca);
    let rotated = cert_der(&dir.join("server.crt"));
    assert!(signed_by(&rotated, &new_ca));
    assert!(!signed_by(&rotated, &ca));
    assert_eq!(dns_names(&rotated), ["edge.example.com"]);
    assert_eq!(mode(&dir.join("state/server-ca.key")), 0o600);

    // Loadable by the runtime.
    let m = runewarp::tls::material::load_server_certificate(&dir).unwrap();
    assert_eq!(m.chain[0].as_ref(), rotated.as_slice());
}

#[test]
fn server_cert_init_refuses_to_overwrite_without_force() {
    let (sb, dir) = Sandbox::with_dir("server");
    let d = dir.to_str().unwrap();
    sb.ok(&server_init("edge.example.com", d));
    let files = server_files(&dir);
    let before = snapshot(&files);

    let err = sb.fails(&server_init("edge.example.com", d));
    let ca_key = dir.join("state/server-ca.key").display().to_string();
    assert_says(&err, &[&ca_key, "--force", "renew"]);
    assert_eq!(snapshot(&files), before, "files changed");

    sb.ok(&[
        "server",
        "cert",
        "init",
        "--hostname",
        "edge.example.com",
        "--dir",
        d,
        "--force",
    ]);
    let after = snapshot(&files);
    for (i, f) in files.iter().enumerate() {
        assert_ne!(after[i], before[i], "{} not replaced", f.display());
    }
    assert_eq!(mode(&dir.join("server.key")), 0o600);
    assert!(signed_by(
        &cert_der(&dir.join("server.crt")),
        &cert_der(&dir.join("server-ca.crt"))
    ));
}

#[test]
fn server_hostname_from_environment_and_flag_precedence() {
    let (sb, dir) = Sandbox::with_dir("server");
    let d = dir.to_str().unwrap();

    sb.ok_env(
        &["server", "cert", "init", "--dir", d],
        ("RUNEWARP_SERVER_HOSTNAME", "env.example.com"),
    );
    assert_eq!(
        dns_names(&cert_der(&dir.join("server.crt"))),
        ["env.example.com"]
    );

    sb.ok_env(
        &[
            "server",
            "cert",
            "renew",
            "--dir",
            d,
            "--hostname",
            "flag.env.example.com",
        ],
        ("RUNEWARP_SERVER_HOSTNAME", "env.example.com"),
    );
    assert_eq!(
        dns_names(&cert_der(&dir.join("server.crt"))),
        ["flag.env.example.com"]
    );
}

#[test]
fn server_cert_init_needs_a_hostname() {
    let (sb, dir) = Sandbox::with_dir("server");
    let err = sb.fails(&["server", "cert", "init", "--dir", dir.to_str().unwrap()]);
    assert!(
        err.contains(
            "no Server hostname: pass --hostname or set RUNEWARP_SERVER_HOSTNAME or server.hostname"
        ),
        "{err}"
    );
    assert!(!dir.exists());

    sb.fails_saying(
        &["server", "cert", "renew", "--dir", dir.to_str().unwrap()],
        &["runewarp server cert init"],
    );
}

#[test]
fn bad_hostnames_are_clear_errors_and_write_nothing() {
    let (sb, dir) = Sandbox::with_dir("m");
    let d = dir.to_str().unwrap();

    sb.fails_saying(&server_init("10.0.0.1", d), &["\"10.0.0.1\"", "IP literal"]);

    sb.fails_saying(
        &public_init("a*.example.com", d),
        &["wildcard must be the whole first label"],
    );

    sb.fails_saying(
        &[
            "client",
            "public-cert",
            "init",
            "--hostname",
            "ok.example.com",
            "--hostname",
            "bad_name.example.com",
            "--dir",
            d,
        ],
        &["bad_name.example.com"],
    );
    assert!(!dir.exists(), "nothing may be written");
}

#[test]
fn identity_init_show_rotate() {
    let (sb, dir) = Sandbox::with_dir("identity");
    let d = dir.to_str().unwrap();

    let out = sb.ok(&["client", "identity", "init", "--dir", d]);
    let init_pin = out.lines().last().unwrap().to_string();
    assert!(is_pin(&init_pin), "{out}");
    assert_modes(&dir, &[("client.key", 0o600), ("client.crt", 0o644)]);
    assert_eq!(
        fs::read_to_string(dir.join("client-identity.txt")).unwrap(),
        format!("{init_pin}\n")
    );

    let out = sb
        .cmd(&["client", "identity", "show", "--dir", d])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.len(), 65, "{stdout:?}");
    assert!(stdout.ends_with('\n'));
    assert!(is_pin(&stdout[..64]), "{stdout:?}");
    assert_eq!(stdout, format!("{init_pin}\n"));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The pin is the SHA-256 of client.crt's SPKI, and the key is Ed25519.
    let der = cert_der(&dir.join("client.crt"));
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(
        cert.public_key().algorithm.algorithm.to_id_string(),
        "1.3.101.112"
    );
    let pin = runewarp::identity::ClientIdentity::from_certificate_der(&der).unwrap();
    assert_eq!(pin.to_string(), init_pin);

    // init again: refused, files unchanged.
    let files = [
        dir.join("client.crt"),
        dir.join("client.key"),
        dir.join("client-identity.txt"),
    ];
    let before = snapshot(&files);
    sb.fails_saying(
        &["client", "identity", "init", "--dir", d],
        &["client.key", "rotate"],
    );
    assert_eq!(snapshot(&files), before);

    // rotate: new pin on the last line, old one mentioned.
    let out = sb.ok(&["client", "identity", "rotate", "--dir", d]);
    let new_pin = out.lines().last().unwrap().to_string();
    assert!(is_pin(&new_pin));
    assert_ne!(new_pin, init_pin);
    assert!(out.contains(&init_pin));
    assert_eq!(
        sb.ok(&["client", "identity", "show", "--dir", d]),
        format!("{new_pin}\n")
    );

    // --force on init replaces.
    sb.ok(&["client", "identity", "init", "--dir", d, "--force"]);
    let forced = sb.ok(&["client", "identity", "show", "--dir", d]);
    assert_ne!(forced, format!("{new_pin}\n"));
}

#[test]
fn identity_show_detects_a_disagreeing_pin_file() {
    let (sb, dir) = Sandbox::with_dir("identity");
    let d = dir.to_str().unwrap();
    let err = sb.fails(&["client", "identity", "show", "--dir", d]);
    assert!(
        err.contains(&format!(
            "no Client identity in {d}: run \"runewarp client identity init --dir {d}\""
        )),
        "{err}"
    );
    sb.ok(&["client", "identity", "init", "--dir", d]);
    fs::write(
        dir.join("client-identity.txt"),
        format!("{}\n", "a".repeat(64)),
    )
    .unwrap();
    let out = sb
        .cmd(&["client", "identity", "show", "--dir", d])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("client-identity.txt"));
}

#[test]
fn identity_uses_the_default_directory_without_dir() {
    let sb = Sandbox::new();
    let out = sb.ok(&["client", "identity", "init"]);
    let pin = out.lines().last().unwrap().to_string();
    assert_eq!(sb.ok(&["client", "identity", "show"]), format!("{pin}\n"));
    // Everything landed under the sandbox's XDG data directory.
    assert!(
        out.contains(&sb.path(".local/share/runewarp").display().to_string()),
        "{out}"
    );
}

#[test]
fn public_cert_init_renew_rotate_ca() {
    let (sb, dir) = Sandbox::with_dir("public");
    let d = dir.to_str().unwrap();

    sb.ok(&public_init("a.example.com", d));
    let ca = cert_der(&dir.join("public-ca.crt"));
    assert_modes(
        &dir,
        &[
            ("state/public-ca.key", 0o600),
            ("a.example.com/public.key", 0o600),
            ("a.example.com/public.crt", 0o644),
        ],
    );

    // A second init adds hostnames and keeps the CA: same key and name;
    // its certificate is reissued with name constraints that cover them.
    let spki = |der: &[u8]| {
        X509Certificate::from_der(der)
            .unwrap()
            .1
            .public_key()
            .raw
            .to_vec()
    };
    sb.ok(&[
        "client",
        "public-cert",
        "init",
        "--hostname",
        "B.example.com",
        "--hostname",
        "c.example.com",
        "--dir",
        d,
    ]);
    assert_eq!(spki(&cert_der(&dir.join("public-ca.crt"))), spki(&ca));
    let ca = cert_der(&dir.join("public-ca.crt"));
    for h in ["a.example.com", "b.example.com", "c.example.com"] {
        let leaf = cert_der(&dir.join(h).join("public.crt"));
        assert_eq!(dns_names(&leaf), [h]);
        assert!(signed_by(&leaf, &ca), "{h}");
    }

    // An existing leaf is not overwritten without --force.
    let files = [
        dir.join("a.example.com/public.crt"),
        dir.join("a.example.com/public.key"),
    ];
    let before = snapshot(&files);
    sb.fails_saying(
        &public_init("a.example.com", d),
        &["a.example.com/public.key"],
    );
    assert_eq!(snapshot(&files), before);

    // renew: same CA, new leaf.
    sb.ok(&public_renew("a.example.com", d));
    assert_eq!(cert_der(&dir.join("public-ca.crt")), ca);
    let renewed = cert_der(&dir.join("a.example.com/public.crt"));
    assert_ne!(renewed, before[0]);
    assert!(signed_by(&renewed, &ca));

    // rotate-ca: new CA, every leaf reissued from it.
    sb.ok(&["client", "public-cert", "rotate-ca", "--dir", d]);
    let new_ca = cert_der(&dir.join("public-ca.crt"));
    assert_ne!(new_ca, ca);
    for h in ["a.example.com", "b.example.com", "c.example.com"] {
        let leaf = cert_der(&dir.join(h).join("public.crt"));
        assert!(signed_by(&leaf, &new_ca), "{h}");
        assert!(!signed_by(&leaf, &ca), "{h}");
    }

    let loaded = runewarp::tls::material::load_public_certs(&dir).unwrap();
    let names: Vec<&str> = loaded.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(names, ["a.example.com", "b.example.com", "c.example.com"]);
}

#[test]
fn public_cert_renew_of_unknown_hostname_says_what_to_run() {
    let (sb, dir) = Sandbox::with_dir("public");
    let d = dir.to_str().unwrap();
    sb.fails_saying(
        &public_renew("a.example.com", d),
        &["runewarp client public-cert init"],
    );
    sb.ok(&public_init("a.example.com", d));
    sb.fails_saying(
        &public_renew("z.example.com", d),
        &["--hostname z.example.com"],
    );
}

#[test]
fn config_file_supplies_hostname_and_directories() {
    let sb = Sandbox::new();
    let cfg_dir = sb.path("etc");
    fs::create_dir_all(&cfg_dir).unwrap();
    let cfg = cfg_dir.join("runewarp.toml");
    fs::write(
        &cfg,
        "[server]\nhostname = \"cfg.example.com\"\ncert-dir = \"certs\"\n\n[client]\nidentity-dir = \"ids\"\n",
    )
    .unwrap();
    let c = cfg.to_str().unwrap();

    // Relative material paths resolve against the config file's directory.
    sb.ok(&["server", "cert", "init", "-c", c]);
    let leaf = cert_der(&cfg_dir.join("certs/server.crt"));
    assert_eq!(dns_names(&leaf), ["cfg.example.com"]);
    sb.ok(&["client", "identity", "init", "-c", c]);
    assert!(cfg_dir.join("ids/client.crt").is_file());

    // RUNEWARP_SERVER_HOSTNAME beats server.hostname; --dir beats cert-dir.
    let other = sb.path("other");
    sb.ok_env(
        &[
            "server",
            "cert",
            "init",
            "-c",
            c,
            "--dir",
            other.to_str().unwrap(),
        ],
        ("RUNEWARP_SERVER_HOSTNAME", "env.example.com"),
    );
    assert_eq!(
        dns_names(&cert_der(&other.join("server.crt"))),
        ["env.example.com"]
    );
}
