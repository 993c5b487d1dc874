//! The Server `cert-dir`: a private CA (`server-ca.crt`,
//! `state/server-ca.key`) and the Server certificate it issues
//! (`server.crt`, `server.key`).
//!
//! Write order, every file atomic: CA key, CA certificate, leaf key, leaf
//! certificate.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::pki::{self, CA_DAYS, Ca, Leaf, WriteMode, Writer};
use super::{MaterialError, STATE_DIR, exists, shell_arg};
use crate::hostname::ServerHostname;
use crate::tls::server_pin::ServerPin;

/// The Server certificate in `cert-dir`.
pub const SERVER_CERT: &str = "server.crt";
/// The Server private key in `cert-dir`.
pub const SERVER_KEY: &str = "server.key";
/// The private Server CA certificate in `cert-dir`.
pub const SERVER_CA_CERT: &str = "server-ca.crt";
/// Inside `state/`.
pub const SERVER_CA_KEY: &str = "server-ca.key";

const LEAF_DAYS: u32 = 397;

struct Paths {
    cert: PathBuf,
    key: PathBuf,
    ca_cert: PathBuf,
    ca_key: PathBuf,
}

fn paths(dir: &Path) -> Paths {
    Paths {
        cert: dir.join(SERVER_CERT),
        key: dir.join(SERVER_KEY),
        ca_cert: dir.join(SERVER_CA_CERT),
        ca_key: dir.join(STATE_DIR).join(SERVER_CA_KEY),
    }
}

pub(crate) fn init_hint(dir: &Path) -> String {
    format!(
        "runewarp server cert init --hostname HOSTNAME --dir {}",
        shell_arg(dir)
    )
}

pub(crate) fn renew_hint(dir: &Path) -> String {
    format!(
        "run \"runewarp server cert renew --dir {}\"",
        shell_arg(dir)
    )
}

fn ca_name(hostname: &ServerHostname) -> String {
    format!("Runewarp Server CA {hostname}")
}

/// `runewarp server cert init`: create a private CA and a Server
/// certificate for `hostname`. Without `force`, refuses if any of the
/// material files already exists (nothing is written).
pub fn init_server_cert(
    dir: &Path,
    hostname: &ServerHostname,
    force: bool,
) -> Result<String, MaterialError> {
    let p = paths(dir);
    let next = format!(
        "use \"runewarp server cert renew --dir {d}\" or \"runewarp server cert rotate-ca --dir {d}\", or pass --force to replace it",
        d = shell_arg(dir)
    );
    if !force && let Some(existing) = pki::first_existing([&p.ca_key, &p.key, &p.ca_cert, &p.cert])
    {
        return Err(MaterialError::Exists {
            path: existing.clone(),
            next,
        });
    }
    let mode = if force {
        WriteMode::Replace
    } else {
        WriteMode::Create
    };
    let mut w = Writer::new(mode, next);
    let (ca, leaf) = write_ca_and_leaf(dir, &p, hostname, &mut w)?;
    let headline = format!(
        "Created a private Server CA and a Server certificate for {hostname} in {}",
        dir.display()
    );
    report(headline, &w, &p, None, &ca, &leaf.cert_der)
}

/// `runewarp server cert renew`: reissue the Server certificate (new key)
/// from the existing CA. `hostname` defaults to the existing leaf's name.
pub fn renew_server_cert(
    dir: &Path,
    hostname: Option<&ServerHostname>,
) -> Result<String, MaterialError> {
    let (p, ca, hostname) = existing(dir, hostname)?;
    if !ca.permits(hostname.as_str())? {
        // A leaf the CA's NameConstraints do not cover would be refused by
        // every Client; a new hostname needs a new CA.
        return Err(MaterialError::Invalid {
            path: p.ca_cert.clone(),
            reason: format!(
                "the Server CA may only issue for {} (NameConstraints), not {hostname}: run \"runewarp server cert rotate-ca --hostname {hostname} --dir {}\" and give every Client the new {SERVER_CA_CERT}",
                ca.permitted_dns()?.unwrap_or_default().join(", "),
                shell_arg(dir)
            ),
        });
    }
    let leaf = ca.issue_leaf(hostname.as_str(), LEAF_DAYS)?;
    let mut w = Writer::new(WriteMode::Replace, String::new());
    w.key(&p.key, &leaf.key_pem)?;
    w.cert(&p.cert, &leaf.cert_pem)?;
    let headline = format!(
        "Renewed the Server certificate for {hostname} in {} (same CA)",
        dir.display()
    );
    report(headline, &w, &p, None, &ca, &leaf.cert_der)
}

/// `runewarp server cert rotate-ca`: replace the private CA and reissue the
/// Server certificate from it. Clients pinning the old `server-ca.crt` must
/// be given the new one.
pub fn rotate_server_ca(
    dir: &Path,
    hostname: Option<&ServerHostname>,
) -> Result<String, MaterialError> {
    let (p, old, hostname) = existing(dir, hostname)?;
    let mut w = Writer::new(WriteMode::Replace, String::new());
    let (ca, leaf) = write_ca_and_leaf(dir, &p, &hostname, &mut w)?;
    let headline = format!(
        "Replaced the private Server CA and reissued the Server certificate for {hostname} in {}",
        dir.display()
    );
    let mut out = report(headline, &w, &p, Some(&old), &ca, &leaf.cert_der)?;
    let _ = writeln!(
        out,
        "Give every Client the new {} (server-ca-file).",
        p.ca_cert.display()
    );
    Ok(out)
}

/// Generate a new private CA for `hostname` and its Server certificate and
/// write both with `w`: each key before its certificate, CA before leaf.
fn write_ca_and_leaf(
    dir: &Path,
    p: &Paths,
    hostname: &ServerHostname,
    w: &mut Writer,
) -> Result<(Ca, Leaf), MaterialError> {
    let ca = Ca::generate(&ca_name(hostname), CA_DAYS, &[hostname.as_str()])?;
    let leaf = ca.issue_leaf(hostname.as_str(), LEAF_DAYS)?;
    pki::prepare_dirs(dir, true)?;
    w.key(&p.ca_key, &ca.key.serialize_pem())?;
    w.cert(&p.ca_cert, &ca.cert_pem)?;
    w.key(&p.key, &leaf.key_pem)?;
    w.cert(&p.cert, &leaf.cert_pem)?;
    Ok((ca, leaf))
}

/// What `renew` and `rotate-ca` start from: the paths, the existing CA, and
/// the hostname to issue for.
fn existing(
    dir: &Path,
    hostname: Option<&ServerHostname>,
) -> Result<(Paths, Ca, ServerHostname), MaterialError> {
    let p = paths(dir);
    let ca = load_ca(dir, &p)?;
    let hostname = resolve_hostname(&p, hostname)?;
    Ok((p, ca, hostname))
}

fn load_ca(dir: &Path, p: &Paths) -> Result<Ca, MaterialError> {
    Ca::load(
        "Server CA",
        dir,
        &p.ca_cert,
        &p.ca_key,
        init_hint(dir),
        &format!(
            "run \"runewarp server cert rotate-ca --dir {}\" to replace the CA",
            shell_arg(dir)
        ),
    )
}

/// `hostname`, else the DNS name in the existing `server.crt`.
fn resolve_hostname(
    p: &Paths,
    hostname: Option<&ServerHostname>,
) -> Result<ServerHostname, MaterialError> {
    if let Some(h) = hostname {
        return Ok(h.clone());
    }
    if !exists(&p.cert) {
        return Err(MaterialError::NoServerHostname);
    }
    let der = pki::read_cert(&p.cert)?;
    let parsed = pki::parse_x509(&p.cert, &der)?;
    let names = pki::dns_names(&p.cert, &parsed)?;
    names
        .iter()
        .find_map(|n| ServerHostname::parse(n).ok())
        .ok_or(MaterialError::NoServerHostname)
}

/// `runewarp server cert show-pin`: the pin of `server.crt`'s public key,
/// for Clients with `server-trust = "pin"`. It changes whenever the Server
/// key does (`init`, `renew`, `rotate-ca`).
pub fn show_server_pin(dir: &Path) -> Result<ServerPin, MaterialError> {
    let p = paths(dir);
    if !exists(&p.cert) {
        return Err(MaterialError::Missing {
            what: "Server certificate",
            dir: dir.to_path_buf(),
            next: init_hint(dir),
        });
    }
    let der = pki::read_cert(&p.cert)?;
    ServerPin::of_certificate(&der).ok_or_else(|| MaterialError::Invalid {
        path: p.cert.clone(),
        reason: "not a valid X.509 certificate".into(),
    })
}

/// What `init`, `renew` and `rotate-ca` print: `headline`, the files `w`
/// wrote, the replaced CA's fingerprint (`old_ca`), the new certificate's
/// expiry, the CA's fingerprint and how Clients trust it.
fn report(
    headline: String,
    w: &Writer,
    p: &Paths,
    old_ca: Option<&Ca>,
    ca: &Ca,
    leaf_der: &[u8],
) -> Result<String, MaterialError> {
    let mut out = headline + "\n";
    w.report(&mut out);
    if let Some(old) = old_ca {
        let _ = writeln!(
            out,
            "Old Server CA SHA-256 fingerprint: {}",
            old.fingerprint()
        );
    }
    let _ = writeln!(
        out,
        "Server certificate valid until {}",
        pki::not_after(&p.cert, leaf_der)?
    );
    let _ = writeln!(out, "Server CA SHA-256 fingerprint: {}", ca.fingerprint());
    // The path is this host's: the Client reads its own copy.
    let _ = writeln!(
        out,
        "Copy {} to each Client host; there, set server-trust = \"ca-file\" and server-ca-file = \"<path of the copy>\"",
        p.ca_cert.display()
    );
    if let Some(pin) = ServerPin::of_certificate(leaf_der) {
        let _ = writeln!(
            out,
            "or, without a CA (the pin changes with every new Server key): server-trust = \"pin\", server-pin = \"{pin}\""
        );
    }
    Ok(out)
}
