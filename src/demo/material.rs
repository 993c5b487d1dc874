//! The demo's throw-away certificate material, generated with rcgen and
//! written in the same layouts the runtime loaders read:
//!
//! - `server/`: the Server `cert-dir` (private Server CA + leaf for
//!   `localhost`).
//! - `client-identity/`: the Client `identity-dir` (self-signed Ed25519).
//! - `public-certs/`: the Client `public-cert-dir` (Public hostname CA + a
//!   leaf for the terminating Service's hostname).
//! - `backend.crt` / `backend.key`: the TLS Local backend's own self-signed
//!   certificate for the passthrough Service's hostname.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ED25519, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::BoxError;
use crate::tls::client_identity::ClientIdentity;

/// Key files: owner only.
const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;
/// Directories inside the (already private) demo directory.
const DIR_MODE: u32 = 0o700;
/// Everything is thrown away at exit; a week is plenty.
const VALIDITY: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// Tolerate a little clock skew.
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// Where things were written, and what the report and the Visitor need.
pub struct Material {
    pub server_cert_dir: PathBuf,
    pub server_ca_file: PathBuf,
    pub identity_dir: PathBuf,
    pub public_cert_dir: PathBuf,
    pub public_ca_file: PathBuf,
    pub backend_cert_file: PathBuf,

    pub server_ca: CertificateDer<'static>,
    pub server_leaf: CertificateDer<'static>,
    pub client_pin: ClientIdentity,
    pub public_ca: CertificateDer<'static>,
    pub public_leaf: CertificateDer<'static>,
    pub backend_cert: CertificateDer<'static>,
    pub backend_key: PrivateKeyDer<'static>,
}

/// Generate every certificate and key and write them under `root`.
pub fn generate(
    root: &Path,
    server_hostname: &str,
    terminate_hostname: &str,
    passthrough_hostname: &str,
) -> Result<Material, BoxError> {
    // Server cert-dir.
    let server_cert_dir = root.join("server");
    let server_ca = Ca::generate("Runewarp demo Server CA")?;
    let server_leaf = server_ca.issue(server_hostname)?;
    make_dir(&server_cert_dir)?;
    make_dir(&server_cert_dir.join("state"))?;
    write_key(
        &server_cert_dir.join("state/server-ca.key"),
        &server_ca.key.serialize_pem(),
    )?;
    let server_ca_file = server_cert_dir.join("server-ca.crt");
    write_cert(&server_ca_file, &server_ca.pem)?;
    write_key(&server_cert_dir.join("server.key"), &server_leaf.key_pem)?;
    write_cert(&server_cert_dir.join("server.crt"), &server_leaf.cert_pem)?;

    // Client identity-dir.
    let identity_dir = root.join("client-identity");
    let (identity_cert, identity_key) = client_identity()?;
    let client_pin = ClientIdentity::from_certificate_der(identity_cert.der())?;
    make_dir(&identity_dir)?;
    write_key(
        &identity_dir.join("client.key"),
        &identity_key.serialize_pem(),
    )?;
    write_cert(&identity_dir.join("client.crt"), &identity_cert.pem())?;
    write_cert(
        &identity_dir.join("client-identity.txt"),
        &format!("{client_pin}\n"),
    )?;

    // Client public-cert-dir.
    let public_cert_dir = root.join("public-certs");
    let public_ca = Ca::generate("Runewarp demo Public hostname CA")?;
    let public_leaf = public_ca.issue(terminate_hostname)?;
    let leaf_dir = public_cert_dir.join(terminate_hostname);
    make_dir(&public_cert_dir)?;
    make_dir(&public_cert_dir.join("state"))?;
    make_dir(&leaf_dir)?;
    write_key(
        &public_cert_dir.join("state/public-ca.key"),
        &public_ca.key.serialize_pem(),
    )?;
    let public_ca_file = public_cert_dir.join("public-ca.crt");
    write_cert(&public_ca_file, &public_ca.pem)?;
    write_key(&leaf_dir.join("public.key"), &public_leaf.key_pem)?;
    write_cert(&leaf_dir.join("public.crt"), &public_leaf.cert_pem)?;

    // The TLS Local backend's own certificate (self-signed leaf).
    let (backend_cert, backend_key) = self_signed_leaf(passthrough_hostname)?;
    let backend_cert_file = root.join("backend.crt");
    write_key(&root.join("backend.key"), &backend_key.serialize_pem())?;
    write_cert(&backend_cert_file, &backend_cert.pem())?;

    Ok(Material {
        server_cert_dir,
        server_ca_file,
        identity_dir,
        public_cert_dir,
        public_ca_file,
        backend_cert_file,
        server_ca: server_ca.der,
        server_leaf: server_leaf.cert_der,
        client_pin,
        public_ca: public_ca.der,
        public_leaf: public_leaf.cert_der,
        backend_cert: backend_cert.der().clone(),
        backend_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(backend_key.serialize_der())),
    })
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
    der: CertificateDer<'static>,
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
}

impl Ca {
    fn generate(common_name: &str) -> Result<Self, BoxError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        set_validity(&mut params);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            pem: cert.pem(),
            der: cert.der().clone(),
            params,
            key,
        })
    }

    /// A server leaf for `hostname` (CN and DNS SAN) with a new P-256 key.
    fn issue(&self, hostname: &str) -> Result<Leaf, BoxError> {
        let issuer = Issuer::from_params(&self.params, &self.key);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(vec![hostname.to_string()])?;
        params.distinguished_name = common_name_dn(hostname);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        set_validity(&mut params);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
        })
    }
}

/// The Client identity: a self-signed Ed25519 certificate. The Server only
/// looks at its public key.
fn client_identity() -> Result<(rcgen::Certificate, KeyPair), BoxError> {
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name_dn("runewarp demo client");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.serial_number = Some(random_serial());
    set_validity(&mut params);
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}

/// A self-signed server certificate usable directly as a trust anchor by
/// both rustls (not a CA) and curl/OpenSSL (no key-usage restrictions).
fn self_signed_leaf(hostname: &str) -> Result<(rcgen::Certificate, KeyPair), BoxError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(vec![hostname.to_string()])?;
    params.distinguished_name = common_name_dn(hostname);
    params.serial_number = Some(random_serial());
    set_validity(&mut params);
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}

fn common_name_dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn set_validity(params: &mut CertificateParams) {
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + VALIDITY).into();
}

/// Create a private directory (it must not exist yet).
pub fn make_dir(path: &Path) -> Result<(), BoxError> {
    DirBuilder::new()
        .mode(DIR_MODE)
        .create(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()).into())
}

fn write_key(path: &Path, pem: &str) -> Result<(), BoxError> {
    write_new(path, pem, KEY_MODE)
}

fn write_cert(path: &Path, pem: &str) -> Result<(), BoxError> {
    write_new(path, pem, CERT_MODE)
}

fn write_new(path: &Path, content: &str, mode: u32) -> Result<(), BoxError> {
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(content.as_bytes()));
    result.map_err(|e| format!("cannot write {}: {e}", path.display()).into())
}
