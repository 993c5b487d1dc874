//! The Client `identity-dir`: a self-signed Ed25519 certificate
//! (`client.crt`), its key (`client.key`) and the pin the Server operator
//! needs (`client-identity.txt`, 64 lowercase hex characters and a newline).
//!
//! Write order, every file atomic: key, certificate, pin file. The pin file
//! is derived data; `client.crt` is the authority.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rcgen::PKCS_ED25519;

use super::pki::{self, TlsMaterial, WriteMode, Writer};
use super::{MaterialError, exists, shell_arg};
use crate::identity::ClientIdentity;

/// The Client certificate in `identity-dir`.
pub const CLIENT_CERT: &str = "client.crt";
/// The Client private key in `identity-dir`.
pub const CLIENT_KEY: &str = "client.key";
/// The Client identity (pin) in `identity-dir`, for operators to copy.
pub const CLIENT_IDENTITY_TXT: &str = "client-identity.txt";

const COMMON_NAME: &str = "runewarp client";
/// The Server ignores dates; make it effectively permanent.
const DAYS: u32 = 100 * 365 + 25;

struct Paths {
    cert: PathBuf,
    key: PathBuf,
    pin: PathBuf,
}

fn paths(dir: &Path) -> Paths {
    Paths {
        cert: dir.join(CLIENT_CERT),
        key: dir.join(CLIENT_KEY),
        pin: dir.join(CLIENT_IDENTITY_TXT),
    }
}

fn init_hint(dir: &Path) -> String {
    format!("runewarp client identity init --dir {}", shell_arg(dir))
}

fn rotate_hint(dir: &Path) -> String {
    format!("runewarp client identity rotate --dir {}", shell_arg(dir))
}

/// `runewarp client identity init`: create a new Ed25519 identity. Without
/// `force`, refuses if any identity file exists. Returns the report; its
/// last line is the pin.
pub fn init_client_identity(dir: &Path, force: bool) -> Result<String, MaterialError> {
    let p = paths(dir);
    let next = format!(
        "use \"{}\" to replace the identity, or pass --force",
        rotate_hint(dir)
    );
    if !force && let Some(existing) = pki::first_existing([&p.key, &p.cert, &p.pin]) {
        return Err(MaterialError::Exists {
            path: existing.clone(),
            next,
        });
    }
    let (pin, cert_pem, key_pem) = generate()?;
    pki::prepare_dirs(dir, false)?;
    let mode = if force {
        WriteMode::Replace
    } else {
        WriteMode::Create
    };
    let mut w = Writer::new(mode, next);
    write_identity(&mut w, &p, &pin, &cert_pem, &key_pem)?;

    let mut out = format!("Created a Client identity in {}\n", dir.display());
    w.report(&mut out);
    let _ = writeln!(
        out,
        "Client identity (put it in the Server's [[server.tunnels]] client-identity):"
    );
    let _ = writeln!(out, "{pin}");
    Ok(out)
}

/// `runewarp client identity show`: the pin recomputed from `client.crt`,
/// checked against `client.key` and `client-identity.txt`.
pub fn show_client_identity(dir: &Path) -> Result<ClientIdentity, MaterialError> {
    let p = paths(dir);
    let (_, pin) = load(dir)?;
    if exists(&p.pin) {
        let recorded = pki::read_to_string(&p.pin)?;
        let recorded = recorded.trim();
        if recorded != pin.to_string() {
            return Err(MaterialError::PinMismatch {
                recorded_path: p.pin.clone(),
                recorded: recorded.to_string(),
                cert_path: p.cert.clone(),
                actual: pin.to_string(),
                next: format!(
                    "the certificate is authoritative; write its pin into {} or run \"{}\"",
                    shell_arg(&p.pin),
                    rotate_hint(dir)
                ),
            });
        }
    }
    Ok(pin)
}

/// `runewarp client identity rotate`: replace the key pair. Returns the
/// report; its last line is the new pin.
pub fn rotate_client_identity(dir: &Path) -> Result<String, MaterialError> {
    let p = paths(dir);
    if !exists(&p.cert) && !exists(&p.key) {
        return Err(MaterialError::Missing {
            what: "Client identity",
            dir: dir.to_path_buf(),
            next: init_hint(dir),
        });
    }
    // The old pin is informational; a damaged old identity is what rotate
    // is for, so it does not stop the rotation.
    let old = pki::read_cert(&p.cert)
        .ok()
        .and_then(|der| ClientIdentity::from_certificate_der(&der).ok());
    let (pin, cert_pem, key_pem) = generate()?;
    let mut w = Writer::new(WriteMode::Replace, String::new());
    write_identity(&mut w, &p, &pin, &cert_pem, &key_pem)?;

    let mut out = format!("Rotated the Client identity in {}\n", dir.display());
    w.report(&mut out);
    match old {
        Some(old) => {
            let _ = writeln!(out, "Old Client identity: {old}");
        }
        None => {
            let _ = writeln!(out, "Old Client identity: (unreadable)");
        }
    }
    let _ = writeln!(
        out,
        "New Client identity (replace the old one in the Server's client-identity):"
    );
    let _ = writeln!(out, "{pin}");
    Ok(out)
}

/// The TLS material and pin of an identity directory.
pub(crate) fn load(dir: &Path) -> Result<(TlsMaterial, ClientIdentity), MaterialError> {
    let p = paths(dir);
    pki::require_pair("Client identity", dir, &p.cert, &p.key, init_hint(dir))?;
    let material =
        pki::load_tls_material(&p.cert, &p.key, &format!("run \"{}\"", rotate_hint(dir)))?;
    let pin = match material.chain.first() {
        Some(leaf) => {
            ClientIdentity::from_certificate_der(leaf).map_err(|e| MaterialError::Invalid {
                path: p.cert.clone(),
                reason: e.to_string(),
            })?
        }
        None => return Err(MaterialError::NoCertificates { path: p.cert }),
    };
    Ok((material, pin))
}

fn generate() -> Result<(ClientIdentity, String, String), MaterialError> {
    let (cert_pem, key_pem) = pki::identity_cert(COMMON_NAME, DAYS, &PKCS_ED25519)?;
    let path = Path::new(CLIENT_CERT);
    let der = pki::parse_certs(path, cert_pem.as_bytes())?
        .into_iter()
        .next()
        .ok_or_else(|| MaterialError::NoCertificates {
            path: path.to_path_buf(),
        })?;
    let pin = ClientIdentity::from_certificate_der(&der).map_err(|e| MaterialError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok((pin, cert_pem, key_pem))
}

fn write_identity(
    w: &mut Writer,
    p: &Paths,
    pin: &ClientIdentity,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(), MaterialError> {
    w.key(&p.key, key_pem)?;
    w.cert(&p.cert, cert_pem)?;
    w.text(&p.pin, &format!("{pin}\n"))
}
