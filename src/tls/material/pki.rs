//! Shared building blocks: PEM parsing, key/certificate checks, CA and leaf
//! generation, and the write helpers used by every material command.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber, SignatureAlgorithm,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate, X509Error};

use super::{MaterialError, exists};
use crate::fsutil;

/// Days a private CA (the Server CA, the Public hostname CA) is valid.
pub(super) const CA_DAYS: u32 = 3650;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Back-date `not_before` a little to tolerate clock skew between peers.
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// A certificate chain (leaf first) and its private key, ready for rustls.
#[derive(Debug)]
pub struct TlsMaterial {
    /// The certificates, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// Generate a self-signed ECDSA P-256 leaf for `hostnames` (for test
/// backends and the demo). Returns `(cert_pem, key_pem)`.
pub fn generate_self_signed(hostnames: &[&str]) -> Result<(String, String), MaterialError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = leaf_params(hostnames.first().copied().unwrap_or("localhost"), 90)?;
    params.subject_alt_names = hostnames
        .iter()
        .map(|h| Ok(SanType::DnsName((*h).try_into()?)))
        .collect::<Result<Vec<_>, rcgen::Error>>()?;
    params.use_authority_key_identifier_extension = false;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// SHA-256 of a DER blob as uppercase hex pairs separated by colons (the
/// form `openssl x509 -fingerprint -sha256` prints).
pub fn fingerprint_sha256(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = String::with_capacity(95);
    for (i, b) in digest.as_ref().iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        let _ = write!(out, "{b:02X}");
    }
    out
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, MaterialError> {
    fs::read(path).map_err(|source| MaterialError::Read {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn read_to_string(path: &Path) -> Result<String, MaterialError> {
    let bytes = read(path)?;
    String::from_utf8(bytes).map_err(|_| MaterialError::Invalid {
        path: path.to_path_buf(),
        reason: "not a text (PEM) file".into(),
    })
}

/// All PEM `CERTIFICATE` blocks in `bytes`, in order.
pub(crate) fn parse_certs(
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| MaterialError::Invalid {
            path: path.to_path_buf(),
            reason: format!("bad PEM: {e}"),
        })
}

/// The first certificate in a PEM file, checked to be valid X.509.
pub(crate) fn read_cert(path: &Path) -> Result<CertificateDer<'static>, MaterialError> {
    let bytes = read(path)?;
    let certs = parse_certs(path, &bytes)?;
    let first = certs
        .into_iter()
        .next()
        .ok_or_else(|| MaterialError::NoCertificates {
            path: path.to_path_buf(),
        })?;
    parse_x509(path, &first)?;
    Ok(first)
}

pub(crate) fn parse_x509<'a>(
    path: &Path,
    der: &'a [u8],
) -> Result<X509Certificate<'a>, MaterialError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| MaterialError::Invalid {
            path: path.to_path_buf(),
            reason: format!("not a valid X.509 certificate: {e}"),
        })
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1). Never echoes
/// key content in errors.
pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, MaterialError> {
    warn_if_exposed(path);
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| MaterialError::Invalid {
        path: path.to_path_buf(),
        reason: format!("no usable PEM private key: {e}"),
    })
}

/// A key file we generate ourselves (PKCS#8), as an rcgen signing key.
pub(crate) fn read_signing_key(path: &Path) -> Result<KeyPair, MaterialError> {
    let key = read_key(path)?;
    KeyPair::try_from(&key).map_err(|e| MaterialError::Invalid {
        path: path.to_path_buf(),
        reason: format!("unsupported private key: {e}"),
    })
}

/// Warn when a key file is readable by group or others.
pub(crate) fn warn_if_exposed(path: &Path) {
    fsutil::warn_if_exposed(path, "private key");
}

/// Whether `key`'s public half is the one in certificate `cert`.
pub(crate) fn key_matches(key: &KeyPair, cert: &X509Certificate<'_>) -> bool {
    key.public_key_raw() == cert.public_key().subject_public_key.data.as_ref()
}

/// Check a key against a certificate when rcgen understands the key type;
/// unknown key types are left to rustls.
fn check_pair(
    cert_path: &Path,
    cert_der: &[u8],
    key_path: &Path,
    key: &PrivateKeyDer<'_>,
    next: &str,
) -> Result<(), MaterialError> {
    let parsed = parse_x509(cert_path, cert_der)?;
    if let Ok(pair) = KeyPair::try_from(key)
        && !key_matches(&pair, &parsed)
    {
        return Err(MaterialError::KeyMismatch {
            key: key_path.to_path_buf(),
            cert: cert_path.to_path_buf(),
            next: next.to_string(),
        });
    }
    Ok(())
}

/// Both files present, or a clear error: Missing if neither, Partial if one.
pub(crate) fn require_pair(
    what: &'static str,
    dir: &Path,
    cert: &Path,
    key: &Path,
    init_next: String,
) -> Result<(), MaterialError> {
    match (exists(cert), exists(key)) {
        (true, true) => Ok(()),
        (false, false) => Err(MaterialError::Missing {
            what,
            dir: dir.to_path_buf(),
            next: init_next,
        }),
        (true, false) => Err(MaterialError::Partial {
            what,
            present: cert.to_path_buf(),
            missing: key.to_path_buf(),
            next: format!("run \"{init_next} --force\""),
        }),
        (false, true) => Err(MaterialError::Partial {
            what,
            present: key.to_path_buf(),
            missing: cert.to_path_buf(),
            next: format!("run \"{init_next} --force\""),
        }),
    }
}

/// Read a certificate chain + key pair, checking they belong together.
pub(crate) fn load_tls_material(
    cert_path: &Path,
    key_path: &Path,
    next: &str,
) -> Result<TlsMaterial, MaterialError> {
    let bytes = read(cert_path)?;
    let chain = parse_certs(cert_path, &bytes)?;
    let Some(leaf) = chain.first() else {
        return Err(MaterialError::NoCertificates {
            path: cert_path.to_path_buf(),
        });
    };
    let key = read_key(key_path)?;
    check_pair(cert_path, leaf, key_path, &key, next)?;
    Ok(TlsMaterial { chain, key })
}

/// The DNS names in the certificate at `path`'s subjectAltName.
pub(crate) fn dns_names(
    path: &Path,
    cert: &X509Certificate<'_>,
) -> Result<Vec<String>, MaterialError> {
    san_dns_names(cert).map_err(|e| MaterialError::Invalid {
        path: path.to_path_buf(),
        reason: format!("bad subjectAltName: {e}"),
    })
}

/// The DNS names in a certificate's subjectAltName (none without one).
pub fn san_dns_names(cert: &X509Certificate<'_>) -> Result<Vec<String>, X509Error> {
    Ok(cert
        .subject_alternative_name()?
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Human-readable end of validity of a DER certificate.
pub(crate) fn not_after(path: &Path, der: &[u8]) -> Result<String, MaterialError> {
    Ok(parse_x509(path, der)?.validity().not_after.to_string())
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + DAY * days).into();
}

fn leaf_params(hostname: &str, days: u32) -> Result<CertificateParams, MaterialError> {
    let mut params = CertificateParams::new(vec![hostname.to_string()])?;
    end_entity(
        &mut params,
        hostname,
        ExtendedKeyUsagePurpose::ServerAuth,
        days,
    );
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// An end-entity certificate for `purpose`: `common_name`, not a CA, a
/// signing key, a random serial, valid for `days`.
fn end_entity(
    params: &mut CertificateParams,
    common_name: &str,
    purpose: ExtendedKeyUsagePurpose,
    days: u32,
) {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![purpose];
    params.serial_number = Some(random_serial());
    set_validity(params, days);
}

/// A self-signed certificate with a new `alg` key and no subjectAltName
/// (the Client identity certificate). Returns `(cert_pem, key_pem)`.
pub(crate) fn identity_cert(
    common_name: &str,
    days: u32,
    alg: &'static SignatureAlgorithm,
) -> Result<(String, String), MaterialError> {
    let key = KeyPair::generate_for(alg)?;
    let mut params = CertificateParams::default();
    end_entity(
        &mut params,
        common_name,
        ExtendedKeyUsagePurpose::ClientAuth,
        days,
    );
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A private CA: its key and self-signed certificate.
pub(crate) struct Ca {
    pub key: KeyPair,
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
}

/// A freshly issued leaf.
pub(crate) struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
}

/// The DNS name a CA with no hostname yet is constrained to: `.invalid`
/// is reserved (RFC 2606) and never resolves, so such a CA can sign nothing
/// a client would accept. (An empty permitted list would mean "no
/// constraint" and is never written.)
pub(crate) const NO_HOSTNAME_CONSTRAINT: &str = "invalid";

/// Whether a dNSName name constraint `constraint` permits `hostname`: the
/// name itself or any name below it, as RFC 5280 and webpki read it.
pub(crate) fn constraint_permits(constraint: &str, hostname: &str) -> bool {
    let (c, h) = (
        constraint.trim_end_matches('.').to_ascii_lowercase(),
        hostname.trim_end_matches('.').to_ascii_lowercase(),
    );
    h == c || h.ends_with(&format!(".{c}"))
}

impl Ca {
    /// A new ECDSA P-256 CA named `common_name`, valid for `days`, that
    /// may only issue for `permitted` hostnames (and names below them) and
    /// only end-entity certificates (pathLen 0).
    pub fn generate(
        common_name: &str,
        days: u32,
        permitted: &[&str],
    ) -> Result<Self, MaterialError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        Self::self_sign(key, common_name, days, permitted)
    }

    /// The same CA (same key, same name, so every leaf it signed still
    /// chains to it) with a new certificate that permits `permitted`.
    pub(crate) fn reissue(self, days: u32, permitted: &[&str]) -> Result<Self, MaterialError> {
        let path = Path::new("CA certificate");
        let parsed = parse_x509(path, &self.cert_der)?;
        let common_name = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or("Runewarp CA")
            .to_string();
        Self::self_sign(self.key, &common_name, days, permitted)
    }

    fn self_sign(
        key: KeyPair,
        common_name: &str,
        days: u32,
        permitted: &[&str],
    ) -> Result<Self, MaterialError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        // Critical basicConstraints with pathLen 0: no intermediate CA
        // below this one is accepted.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // Critical NameConstraints: a stolen CA key cannot mint
        // certificates for other domains.
        // A dNSName subtree permits the name and every name below it, so a
        // wildcard hostname is constrained by its parent domain ("*.a.b" by
        // "a.b"); "*.a.b" itself is not a valid subtree.
        let mut names: Vec<String> = permitted
            .iter()
            .map(|h| {
                let h = h.to_ascii_lowercase();
                h.strip_prefix("*.").map(str::to_string).unwrap_or(h)
            })
            .collect();
        if names.is_empty() {
            names.push(NO_HOSTNAME_CONSTRAINT.to_string());
        }
        names.sort();
        names.dedup();
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: names.into_iter().map(GeneralSubtree::DnsName).collect(),
            excluded_subtrees: Vec::new(),
        });
        params.serial_number = Some(random_serial());
        set_validity(&mut params, days);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            key,
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
        })
    }

    /// The dNSName subtrees this CA may issue for; `None` when its
    /// certificate carries no NameConstraints (a CA made before they were
    /// added), which permits every name.
    pub(crate) fn permitted_dns(&self) -> Result<Option<Vec<String>>, MaterialError> {
        let path = Path::new("CA certificate");
        let parsed = parse_x509(path, &self.cert_der)?;
        let ext = parsed
            .name_constraints()
            .map_err(|e| MaterialError::Invalid {
                path: path.to_path_buf(),
                reason: format!("bad NameConstraints: {e}"),
            })?;
        Ok(ext.map(|ext| {
            ext.value
                .permitted_subtrees
                .iter()
                .flatten()
                .filter_map(|t| match &t.base {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        }))
    }

    /// Whether this CA's constraints let it issue for `hostname`.
    pub(crate) fn permits(&self, hostname: &str) -> Result<bool, MaterialError> {
        Ok(match self.permitted_dns()? {
            None => true,
            Some(list) => list.iter().any(|c| constraint_permits(c, hostname)),
        })
    }

    /// Load a CA from its certificate and key, checking they match and that
    /// the certificate is a CA. Neither file: `Missing` (suggesting
    /// `init_next`); only one: `Partial`.
    pub fn load(
        what: &'static str,
        dir: &Path,
        cert_path: &Path,
        key_path: &Path,
        init_next: String,
        repair_next: &str,
    ) -> Result<Self, MaterialError> {
        require_pair(what, dir, cert_path, key_path, init_next)?;
        let cert_der = read_cert(cert_path)?;
        let cert_pem = read_to_string(cert_path)?;
        let key = read_signing_key(key_path)?;
        let parsed = parse_x509(cert_path, &cert_der)?;
        if !key_matches(&key, &parsed) {
            return Err(MaterialError::KeyMismatch {
                key: key_path.to_path_buf(),
                cert: cert_path.to_path_buf(),
                next: repair_next.to_string(),
            });
        }
        if !parsed.is_ca() {
            return Err(MaterialError::Invalid {
                path: cert_path.to_path_buf(),
                reason: format!("not a CA certificate: {repair_next}"),
            });
        }
        Ok(Self {
            key,
            cert_der,
            cert_pem,
        })
    }

    /// Issue an ECDSA P-256 server leaf for `hostname` (SAN and CN), valid
    /// for `days`, with a new key.
    pub(crate) fn issue_leaf(&self, hostname: &str, days: u32) -> Result<Leaf, MaterialError> {
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = leaf_params(hostname, days)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
        })
    }

    pub fn fingerprint(&self) -> String {
        fingerprint_sha256(&self.cert_der)
    }
}

/// How a command writes: `Create` refuses existing files, `Replace`
/// atomically replaces them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteMode {
    Create,
    Replace,
}

/// Writes files in order and records them for the command's report.
pub(crate) struct Writer {
    pub mode: WriteMode,
    exists_next: String,
    pub written: Vec<PathBuf>,
}

impl Writer {
    pub fn new(mode: WriteMode, exists_next: String) -> Self {
        Self {
            mode,
            exists_next,
            written: Vec::new(),
        }
    }

    pub fn key(&mut self, path: &Path, pem: &str) -> Result<(), MaterialError> {
        self.write(path, pem, fsutil::KEY_MODE)
    }

    pub fn cert(&mut self, path: &Path, pem: &str) -> Result<(), MaterialError> {
        self.write(path, pem, fsutil::CERT_MODE)
    }

    pub fn text(&mut self, path: &Path, text: &str) -> Result<(), MaterialError> {
        self.write(path, text, fsutil::CERT_MODE)
    }

    fn write(&mut self, path: &Path, content: &str, mode: u32) -> Result<(), MaterialError> {
        let result = match self.mode {
            WriteMode::Create => fsutil::write_new_atomic(path, content.as_bytes(), mode),
            WriteMode::Replace => fsutil::write_atomic(path, content.as_bytes(), mode),
        };
        match result {
            Ok(()) => {
                self.written.push(path.to_path_buf());
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(MaterialError::Exists {
                path: path.to_path_buf(),
                next: self.exists_next.clone(),
            }),
            Err(source) => Err(MaterialError::Write {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// "  wrote PATH" lines.
    pub fn report(&self, out: &mut String) {
        for p in &self.written {
            let _ = writeln!(out, "  wrote {}", p.display());
        }
    }
}

/// Create the material directory (0755 if new) and its `state/` (0700).
pub(crate) fn prepare_dirs(dir: &Path, with_state: bool) -> Result<(), MaterialError> {
    let wrap = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MaterialError::Write { path, source }
    };
    fsutil::ensure_dir(dir, fsutil::MATERIAL_DIR_MODE).map_err(wrap(dir))?;
    if with_state {
        let state = dir.join(super::STATE_DIR);
        fsutil::create_dir_private(&state, fsutil::STATE_DIR_MODE).map_err(wrap(&state))?;
    }
    Ok(())
}

/// The first existing path among `paths`.
pub(crate) fn first_existing<'a>(
    paths: impl IntoIterator<Item = &'a PathBuf>,
) -> Option<&'a PathBuf> {
    paths.into_iter().find(|p| exists(p))
}
