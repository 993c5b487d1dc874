//! The demo's throw-away certificate material, made by the same material
//! commands an operator runs (`server cert init`, `client identity init`,
//! `client public-cert init`), so the demo shows exactly what they produce:
//!
//! - `server/`: the Server `cert-dir` (private Server CA + leaf for
//!   `localhost`).
//! - `client-identity/`: the Client `identity-dir` (self-signed Ed25519).
//! - `public-certs/`: the Client `public-cert-dir` (Public hostname CA + a
//!   leaf for the terminating Service's hostname).
//! - `backend.crt` / `backend.key`: the TLS Local backend's own self-signed
//!   certificate for the passthrough Service's hostname.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::BoxError;
use crate::fsutil::{self, CERT_MODE, KEY_MODE};
use crate::hostname::{PublicHostname, ServerHostname};
use crate::identity::ClientIdentity;
use crate::tls::material;

/// Where things were written, and what the report and the Visitor need.
pub struct Material {
    pub(crate) server_cert_dir: PathBuf,
    pub(crate) server_ca_file: PathBuf,
    pub identity_dir: PathBuf,
    pub public_cert_dir: PathBuf,
    pub(crate) public_ca_file: PathBuf,
    pub(crate) backend_cert_file: PathBuf,

    pub(crate) server_ca: CertificateDer<'static>,
    pub(crate) server_leaf: CertificateDer<'static>,
    pub(crate) client_pin: ClientIdentity,
    pub public_ca: CertificateDer<'static>,
    pub(crate) public_leaf: CertificateDer<'static>,
    pub backend_cert: CertificateDer<'static>,
    pub(crate) backend_key: PrivateKeyDer<'static>,
}

/// Generate every certificate and key and write them under `root`.
pub fn generate(
    root: &Path,
    server_hostname: &str,
    terminate_hostnames: &[&str],
    passthrough_hostname: &str,
) -> Result<Material, BoxError> {
    let server_hostname = ServerHostname::parse(server_hostname)?;
    let terminating = terminate_hostnames
        .iter()
        .map(|h| PublicHostname::parse(h))
        .collect::<Result<Vec<_>, _>>()?;
    let terminate_hostname = terminating
        .first()
        .cloned()
        .ok_or("no terminate hostname")?;

    let server_cert_dir = root.join("server");
    material::init_server_cert(&server_cert_dir, &server_hostname, false)?;
    let server_ca_file = server_cert_dir.join("server-ca.crt");
    let server_ca = first(material::load_ca_bundle(&server_ca_file)?, &server_ca_file)?;
    let server_leaf = leaf(material::load_server_certificate(&server_cert_dir)?)?;

    let identity_dir = root.join("client-identity");
    material::init_client_identity(&identity_dir, false)?;
    let client_pin = material::show_client_identity(&identity_dir)?;

    let public_cert_dir = root.join("public-certs");
    material::init_public_certs(&public_cert_dir, &terminating, false)?;
    let public_ca_file = public_cert_dir.join("public-ca.crt");
    let public_ca = first(material::load_ca_bundle(&public_ca_file)?, &public_ca_file)?;
    let public_leaf = material::load_public_certs(&public_cert_dir)?
        .into_iter()
        .find(|(h, _)| *h == terminate_hostname)
        .map(|(_, m)| m)
        .ok_or_else(|| format!("no certificate for {terminate_hostname} was written"))?;
    let public_leaf = leaf(public_leaf)?;

    // The TLS Local backend's own certificate (self-signed leaf).
    let (cert_pem, key_pem) = material::generate_self_signed(&[passthrough_hostname])?;
    let backend_cert_file = root.join("backend.crt");
    let backend_key_file = root.join("backend.key");
    write(&backend_key_file, &key_pem, KEY_MODE)?;
    write(&backend_cert_file, &cert_pem, CERT_MODE)?;
    let backend_cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| format!("{}: {e}", backend_cert_file.display()))?;
    let backend_key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("{}: {e}", backend_key_file.display()))?;

    Ok(Material {
        server_cert_dir,
        server_ca_file,
        identity_dir,
        public_cert_dir,
        public_ca_file,
        backend_cert_file,
        server_ca,
        server_leaf,
        client_pin,
        public_ca,
        public_leaf,
        backend_cert,
        backend_key,
    })
}

fn first(
    certs: Vec<CertificateDer<'static>>,
    path: &Path,
) -> Result<CertificateDer<'static>, BoxError> {
    certs
        .into_iter()
        .next()
        .ok_or_else(|| format!("{} holds no certificate", path.display()).into())
}

fn leaf(m: material::TlsMaterial) -> Result<CertificateDer<'static>, BoxError> {
    m.chain
        .into_iter()
        .next()
        .ok_or_else(|| "a certificate file holds no certificate".into())
}

fn write(path: &Path, pem: &str, mode: u32) -> Result<(), BoxError> {
    fsutil::write_new_atomic(path, pem.as_bytes(), mode)
        .map_err(|e| format!("cannot write {}: {e}", path.display()).into())
}
