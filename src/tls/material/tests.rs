//! Tests of the certificate material: creating, loading, renewing and
//! rotating each directory, and the errors for broken or partial material.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::*;
use crate::hostname::ServerHostname;

/// The error `$result` fails with, checked to be a `$kind`.
macro_rules! fails_with {
    ($result:expr, $kind:pat) => {{
        let err = $result.unwrap_err();
        assert!(matches!(err, $kind), "{err}");
        err
    }};
}

fn server_host(h: &str) -> ServerHostname {
    ServerHostname::parse(h).unwrap()
}

fn public_host(h: &str) -> PublicHostname {
    PublicHostname::parse(h).unwrap()
}

fn first_cert(path: &Path) -> CertificateDer<'static> {
    load_ca_bundle(path).unwrap().remove(0)
}

/// A temporary directory and the path `sub` in it (not created yet).
fn tmp_with(sub: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(sub);
    (tmp, path)
}

/// A temporary directory holding Server material for edge.example.com.
fn edge_server() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    init_server_cert(tmp.path(), &server_host("edge.example.com"), false).unwrap();
    tmp
}

/// A temporary directory holding Public hostname material for
/// a.example.com.
fn public_a() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    init_public_certs(tmp.path(), &[public_host("a.example.com")], false).unwrap();
    tmp
}

/// What a CA's NameConstraints permit, as x509-parser shows each name.
fn permitted(nc: &x509_parser::extensions::NameConstraints) -> Vec<String> {
    nc.permitted_subtrees
        .iter()
        .flatten()
        .map(|t| format!("{:?}", t.base))
        .collect()
}

fn mode_of(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Checks with x509-parser that `leaf` names `ca` as issuer and carries a
/// signature made by `ca`'s key.
fn assert_signed_by(leaf: &[u8], ca: &[u8]) {
    let (_, leaf) = X509Certificate::from_der(leaf).unwrap();
    let (_, ca) = X509Certificate::from_der(ca).unwrap();
    assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
    leaf.verify_signature(Some(ca.public_key()))
        .expect("leaf signature verifies with the CA key");
}

fn assert_not_signed_by(leaf: &[u8], ca: &[u8]) {
    let (_, leaf) = X509Certificate::from_der(leaf).unwrap();
    let (_, ca) = X509Certificate::from_der(ca).unwrap();
    assert!(leaf.verify_signature(Some(ca.public_key())).is_err());
}

/// What a real Client does: rustls/webpki verification for `hostname`
/// with `ca` as the only root.
fn webpki_verify(
    leaf: &CertificateDer<'static>,
    ca: &CertificateDer<'static>,
    hostname: &str,
) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .unwrap();
    verifier
        .verify_server_cert(
            leaf,
            &[],
            &ServerName::try_from(hostname.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .is_ok()
}

#[test]
fn server_init_then_load_round_trips() {
    let (_tmp, dir) = tmp_with("cert");
    let out = init_server_cert(&dir, &server_host("edge.example.com"), false).unwrap();
    assert!(out.contains("Server CA SHA-256 fingerprint: "));

    let m = load_server_certificate(&dir).unwrap();
    assert_eq!(m.chain.len(), 1);
    assert!(matches!(m.key, PrivateKeyDer::Pkcs8(_)));
    let ca = first_cert(&dir.join(SERVER_CA_CERT));
    assert!(out.contains(&fingerprint_sha256(&ca)));
    assert_signed_by(&m.chain[0], &ca);
    assert!(webpki_verify(&m.chain[0], &ca, "edge.example.com"));
    assert!(!webpki_verify(&m.chain[0], &ca, "other.example.com"));

    let (_, ca_parsed) = X509Certificate::from_der(&ca).unwrap();
    assert!(ca_parsed.is_ca());
    let ku = ca_parsed.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign());
    let cn = ca_parsed.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "Runewarp Server CA edge.example.com");
    let validity = ca_parsed.validity().time_to_expiration().unwrap();
    assert!(validity.whole_days() >= 3649);

    let (_, leaf) = X509Certificate::from_der(&m.chain[0]).unwrap();
    let days = leaf.validity().time_to_expiration().unwrap().whole_days();
    assert!((396..=397).contains(&days), "{days}");
    assert!(
        leaf.extended_key_usage()
            .unwrap()
            .unwrap()
            .value
            .server_auth
    );

    assert_eq!(mode_of(&dir.join(SERVER_KEY)), 0o600);
    assert_eq!(mode_of(&dir.join(STATE_DIR).join(SERVER_CA_KEY)), 0o600);
    assert_eq!(mode_of(&dir.join(SERVER_CERT)), 0o644);
    assert_eq!(mode_of(&dir.join(SERVER_CA_CERT)), 0o644);
    assert_eq!(mode_of(&dir.join(STATE_DIR)), 0o700);
    assert_eq!(mode_of(&dir), 0o755);
}

#[test]
fn server_renew_keeps_ca_and_hostname() {
    let tmp = edge_server();
    let dir = tmp.path();
    let ca_before = fs::read(dir.join(SERVER_CA_CERT)).unwrap();
    let ca_key_before = fs::read(dir.join(STATE_DIR).join(SERVER_CA_KEY)).unwrap();
    let key_before = fs::read(dir.join(SERVER_KEY)).unwrap();

    renew_server_cert(dir, None).unwrap();
    assert_eq!(fs::read(dir.join(SERVER_CA_CERT)).unwrap(), ca_before);
    assert_eq!(
        fs::read(dir.join(STATE_DIR).join(SERVER_CA_KEY)).unwrap(),
        ca_key_before
    );
    assert_ne!(fs::read(dir.join(SERVER_KEY)).unwrap(), key_before);

    let m = load_server_certificate(dir).unwrap();
    let ca = first_cert(&dir.join(SERVER_CA_CERT));
    assert_signed_by(&m.chain[0], &ca);
    assert!(webpki_verify(&m.chain[0], &ca, "edge.example.com"));

    // A hostname outside the CA's NameConstraints is refused (the leaf
    // would not validate); rotate-ca with the new hostname is the way.
    let err = renew_server_cert(dir, Some(&server_host("new.example.com"))).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("may only issue for edge.example.com"), "{msg}");
    assert!(
        msg.contains("rotate-ca --hostname new.example.com"),
        "{msg}"
    );
    assert!(webpki_verify(
        &load_server_certificate(dir).unwrap().chain[0],
        &ca,
        "edge.example.com"
    ));
    // A name below the constrained one is within it.
    renew_server_cert(dir, Some(&server_host("a.edge.example.com"))).unwrap();
    let m = load_server_certificate(dir).unwrap();
    assert!(webpki_verify(&m.chain[0], &ca, "a.edge.example.com"));
    rotate_server_ca(dir, Some(&server_host("new.example.com"))).unwrap();
    let m = load_server_certificate(dir).unwrap();
    let ca = first_cert(&dir.join(SERVER_CA_CERT));
    assert!(webpki_verify(&m.chain[0], &ca, "new.example.com"));
}

/// A leaf for `hostname` signed with the CA key in `ca_key` (what a thief
/// of that key could mint), and an intermediate CA below it with its own
/// leaf for `hostname`.
fn forge(
    ca_cert: &Path,
    ca_key: &Path,
    hostname: &str,
) -> (
    CertificateDer<'static>,
    CertificateDer<'static>,
    CertificateDer<'static>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_der = first_cert(ca_cert);
    let key = pki::read_signing_key(ca_key).unwrap();
    let issuer = Issuer::from_ca_cert_der(&ca_der, &key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![hostname.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let mut sub = CertificateParams::default();
    sub.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    sub.distinguished_name
        .push(rcgen::DnType::CommonName, "sub CA");
    let sub_key = KeyPair::generate().unwrap();
    let sub_cert = sub.signed_by(&sub_key, &issuer).unwrap();
    let sub_issuer = Issuer::new(sub, sub_key);
    let below = CertificateParams::new(vec![hostname.to_string()])
        .unwrap()
        .signed_by(&KeyPair::generate().unwrap(), &sub_issuer)
        .unwrap();
    (
        leaf.der().clone(),
        sub_cert.der().clone(),
        below.der().clone(),
    )
}

/// webpki verification of `leaf` + `intermediates` against `ca`.
fn webpki_verify_chain(
    leaf: &CertificateDer<'static>,
    intermediates: &[CertificateDer<'static>],
    ca: &CertificateDer<'static>,
    hostname: &str,
) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .unwrap()
        .verify_server_cert(
            leaf,
            intermediates,
            &ServerName::try_from(hostname.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
}

#[test]
fn a_stolen_server_ca_key_cannot_mint_certificates_for_other_names() {
    let tmp = edge_server();
    let dir = tmp.path();
    let ca_cert = dir.join(SERVER_CA_CERT);
    let ca = first_cert(&ca_cert);
    let ca_key = dir.join(STATE_DIR).join(SERVER_CA_KEY);

    // The extensions, as a verifier reads them.
    let (_, parsed) = X509Certificate::from_der(&ca).unwrap();
    let bc = parsed.basic_constraints().unwrap().unwrap();
    assert!(bc.critical);
    assert!(bc.value.ca);
    assert_eq!(bc.value.path_len_constraint, Some(0));
    let nc = parsed.name_constraints().unwrap().unwrap();
    assert!(nc.critical);
    let permitted = permitted(nc.value);
    assert_eq!(permitted, ["DNSName(\"edge.example.com\")"]);

    let (own, _, _) = forge(&ca_cert, &ca_key, "edge.example.com");
    webpki_verify_chain(&own, &[], &ca, "edge.example.com").expect("in the constraints");
    let (evil, sub, below) = forge(&ca_cert, &ca_key, "bank.example.net");
    let err = webpki_verify_chain(&evil, &[], &ca, "bank.example.net").unwrap_err();
    assert!(format!("{err:?}").contains("NameConstraint"), "{err:?}");
    // Nor through an intermediate CA: the anchor's constraints apply to
    // the whole chain. (webpki does not apply a trust anchor's pathLen, so
    // pathLen 0 is checked above as an extension; OpenSSL enforces it.)
    assert!(webpki_verify_chain(&below, &[sub], &ca, "bank.example.net").is_err());
}

#[test]
fn server_rotate_ca_replaces_ca() {
    let tmp = edge_server();
    let dir = tmp.path();
    let old_ca = first_cert(&dir.join(SERVER_CA_CERT));
    let out = rotate_server_ca(dir, None).unwrap();
    let new_ca = first_cert(&dir.join(SERVER_CA_CERT));
    assert_ne!(old_ca, new_ca);
    assert!(out.contains(&fingerprint_sha256(&old_ca)));
    assert!(out.contains(&fingerprint_sha256(&new_ca)));
    let m = load_server_certificate(dir).unwrap();
    assert_signed_by(&m.chain[0], &new_ca);
    assert_not_signed_by(&m.chain[0], &old_ca);
    assert!(webpki_verify(&m.chain[0], &new_ca, "edge.example.com"));
    assert!(!webpki_verify(&m.chain[0], &old_ca, "edge.example.com"));
}

#[test]
fn server_init_refuses_existing_material_and_force_replaces() {
    let tmp = edge_server();
    let dir = tmp.path();
    let key = fs::read(dir.join(SERVER_KEY)).unwrap();
    let err = fails_with!(
        init_server_cert(dir, &server_host("edge.example.com"), false),
        MaterialError::Exists { .. }
    );
    let msg = err.to_string();
    assert!(msg.contains("server-ca.key"), "{msg}");
    assert!(msg.contains("--force"), "{msg}");
    assert_eq!(fs::read(dir.join(SERVER_KEY)).unwrap(), key);

    // A lone certificate also blocks init.
    let other = tmp.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::copy(dir.join(SERVER_CERT), other.join(SERVER_CERT)).unwrap();
    let err = init_server_cert(&other, &server_host("edge.example.com"), false).unwrap_err();
    assert!(err.to_string().contains("server.crt"), "{err}");

    init_server_cert(dir, &server_host("edge.example.com"), true).unwrap();
    assert_ne!(fs::read(dir.join(SERVER_KEY)).unwrap(), key);
    load_server_certificate(dir).unwrap();
}

#[test]
fn server_partial_states_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    let err = fails_with!(renew_server_cert(dir, None), MaterialError::Missing { .. });
    assert!(
        err.to_string().contains("runewarp server cert init"),
        "{err}"
    );
    fails_with!(load_server_certificate(dir), MaterialError::Missing { .. });

    init_server_cert(dir, &server_host("edge.example.com"), false).unwrap();
    fs::remove_file(dir.join(STATE_DIR).join(SERVER_CA_KEY)).unwrap();
    let before = fs::read(dir.join(SERVER_CERT)).unwrap();
    let err = fails_with!(renew_server_cert(dir, None), MaterialError::Partial { .. });
    assert!(err.to_string().contains("server-ca.key"), "{err}");
    assert_eq!(fs::read(dir.join(SERVER_CERT)).unwrap(), before);

    fs::remove_file(dir.join(SERVER_KEY)).unwrap();
    fails_with!(load_server_certificate(dir), MaterialError::Partial { .. });
}

#[test]
fn server_key_mismatch_is_detected() {
    let (tmp, a) = tmp_with("a");
    let b = tmp.path().join("b");
    init_server_cert(&a, &server_host("a.example.com"), false).unwrap();
    init_server_cert(&b, &server_host("b.example.com"), false).unwrap();
    fs::copy(b.join(SERVER_KEY), a.join(SERVER_KEY)).unwrap();
    fails_with!(
        load_server_certificate(&a),
        MaterialError::KeyMismatch { .. }
    );
    fs::copy(
        b.join(STATE_DIR).join(SERVER_CA_KEY),
        a.join(STATE_DIR).join(SERVER_CA_KEY),
    )
    .unwrap();
    fails_with!(
        renew_server_cert(&a, None),
        MaterialError::KeyMismatch { .. }
    );
}

#[test]
fn renew_without_any_hostname_source_fails() {
    let tmp = edge_server();
    let dir = tmp.path();
    fs::remove_file(dir.join(SERVER_CERT)).unwrap();
    let err = renew_server_cert(dir, None).unwrap_err();
    assert!(matches!(err, MaterialError::NoServerHostname));
    assert_eq!(
        err.to_string(),
        "no Server hostname: pass --hostname or set RUNEWARP_SERVER_HOSTNAME or server.hostname"
    );
}

#[test]
fn server_chain_includes_extra_certificates() {
    let tmp = edge_server();
    let dir = tmp.path();
    let mut chain = fs::read_to_string(dir.join(SERVER_CERT)).unwrap();
    chain.push_str(&fs::read_to_string(dir.join(SERVER_CA_CERT)).unwrap());
    fs::write(dir.join(SERVER_CERT), chain).unwrap();
    let m = load_server_certificate(dir).unwrap();
    assert_eq!(m.chain.len(), 2);
    assert_eq!(m.chain[1], first_cert(&dir.join(SERVER_CA_CERT)));
}

#[test]
fn identity_pin_matches_file_and_key_is_ed25519() {
    let (_tmp, dir) = tmp_with("id");
    let out = init_client_identity(&dir, false).unwrap();
    let (m, pin) = load_client_identity(&dir).unwrap();
    assert_eq!(
        fs::read_to_string(dir.join(CLIENT_IDENTITY_TXT)).unwrap(),
        format!("{pin}\n")
    );
    assert_eq!(out.lines().last().unwrap(), pin.to_string());
    assert_eq!(show_client_identity(&dir).unwrap(), pin);
    assert_eq!(
        pin,
        ClientIdentity::from_certificate_der(&m.chain[0]).unwrap()
    );

    let (_, cert) = X509Certificate::from_der(&m.chain[0]).unwrap();
    // id-Ed25519 (RFC 8410).
    assert_eq!(
        cert.public_key().algorithm.algorithm.to_id_string(),
        "1.3.101.112"
    );
    assert_eq!(
        cert.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        "runewarp client"
    );
    assert!(cert.validity().time_to_expiration().unwrap().whole_days() > 99 * 365);
    assert!(matches!(m.key, PrivateKeyDer::Pkcs8(_)));
    assert_eq!(mode_of(&dir.join(CLIENT_KEY)), 0o600);
    assert_eq!(mode_of(&dir.join(CLIENT_CERT)), 0o644);
}

#[test]
fn identity_rotate_changes_pin_and_init_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init_client_identity(dir, false).unwrap();
    let old = show_client_identity(dir).unwrap();
    let key = fs::read(dir.join(CLIENT_KEY)).unwrap();

    let err = fails_with!(
        init_client_identity(dir, false),
        MaterialError::Exists { .. }
    );
    assert!(err.to_string().contains("client.key"), "{err}");
    assert_eq!(fs::read(dir.join(CLIENT_KEY)).unwrap(), key);

    let out = rotate_client_identity(dir).unwrap();
    let new = show_client_identity(dir).unwrap();
    assert_ne!(old, new);
    assert!(out.contains(&old.to_string()));
    assert_eq!(out.lines().last().unwrap(), new.to_string());

    init_client_identity(dir, true).unwrap();
    assert_ne!(show_client_identity(dir).unwrap(), new);
}

#[test]
fn identity_inconsistencies_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let err = show_client_identity(dir).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "no Client identity in {d}: run \"runewarp client identity init --dir {d}\"",
            d = dir.display()
        )
    );
    fails_with!(rotate_client_identity(dir), MaterialError::Missing { .. });

    init_client_identity(dir, false).unwrap();
    fs::write(
        dir.join(CLIENT_IDENTITY_TXT),
        format!("{}\n", "0".repeat(64)),
    )
    .unwrap();
    fails_with!(show_client_identity(dir), MaterialError::PinMismatch { .. });

    let other = tmp.path().join("other");
    init_client_identity(&other, false).unwrap();
    fs::copy(other.join(CLIENT_KEY), dir.join(CLIENT_KEY)).unwrap();
    fails_with!(load_client_identity(dir), MaterialError::KeyMismatch { .. });

    fs::remove_file(dir.join(CLIENT_KEY)).unwrap();
    fails_with!(load_client_identity(dir), MaterialError::Partial { .. });
}

#[test]
fn public_certs_share_one_ca_across_inits() {
    let (_tmp, dir) = tmp_with("pub");
    init_public_certs(&dir, &[public_host("a.example.com")], false).unwrap();
    let old_ca = first_cert(&dir.join(PUBLIC_CA_CERT));
    let ca_key = fs::read(dir.join(STATE_DIR).join(PUBLIC_CA_KEY)).unwrap();
    let out = init_public_certs(
        &dir,
        &[public_host("b.example.com"), public_host("c.example.com")],
        false,
    )
    .unwrap();
    // The CA certificate was reissued (same key, same name) to permit the
    // new hostnames; the old copy still validates the old leaf.
    assert!(out.contains("Reissued"), "{out}");
    assert_eq!(
        fs::read(dir.join(STATE_DIR).join(PUBLIC_CA_KEY)).unwrap(),
        ca_key
    );
    let ca = first_cert(&dir.join(PUBLIC_CA_CERT));
    assert_ne!(ca, old_ca);
    let a_leaf = first_cert(&dir.join("a.example.com").join(PUBLIC_CERT));
    assert!(webpki_verify(&a_leaf, &old_ca, "a.example.com"));
    let b_leaf = first_cert(&dir.join("b.example.com").join(PUBLIC_CERT));
    assert!(!webpki_verify(&b_leaf, &old_ca, "b.example.com"));
    // Hostnames already permitted: the CA stays as it is.
    let out = init_public_certs(&dir, &[public_host("d.example.com")], false).unwrap();
    assert!(out.contains("Reissued"), "{out}");
    let ca = first_cert(&dir.join(PUBLIC_CA_CERT));
    fs::remove_dir_all(dir.join("d.example.com")).unwrap();
    let out = init_public_certs(&dir, &[public_host("d.example.com")], false).unwrap();
    assert!(!out.contains("Reissued"), "{out}");
    assert_eq!(first_cert(&dir.join(PUBLIC_CA_CERT)), ca);
    fs::remove_dir_all(dir.join("d.example.com")).unwrap();
    // A stolen Public hostname CA key cannot mint for other names.
    let (evil, _, _) = forge(
        &dir.join(PUBLIC_CA_CERT),
        &dir.join(STATE_DIR).join(PUBLIC_CA_KEY),
        "bank.example.net",
    );
    assert!(webpki_verify_chain(&evil, &[], &ca, "bank.example.net").is_err());

    let loaded = load_public_certs(&dir).unwrap();
    let names: Vec<&str> = loaded.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(names, ["a.example.com", "b.example.com", "c.example.com"]);
    for (h, m) in &loaded {
        assert_signed_by(&m.chain[0], &ca);
        assert!(webpki_verify(&m.chain[0], &ca, h.as_str()));
        let (_, leaf) = X509Certificate::from_der(&m.chain[0]).unwrap();
        let days = leaf.validity().time_to_expiration().unwrap().whole_days();
        assert!((89..=90).contains(&days), "{days}");
    }
    assert_eq!(mode_of(&dir.join("a.example.com").join(PUBLIC_KEY)), 0o600);
    assert_eq!(mode_of(&dir.join("a.example.com").join(PUBLIC_CERT)), 0o644);
    assert_eq!(mode_of(&dir.join(STATE_DIR).join(PUBLIC_CA_KEY)), 0o600);

    // Existing leaf: refused without --force, nothing written.
    let before = fs::read(dir.join("a.example.com").join(PUBLIC_KEY)).unwrap();
    let err = init_public_certs(
        &dir,
        &[public_host("d.example.com"), public_host("a.example.com")],
        false,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("a.example.com/public.key"),
        "{err}"
    );
    assert!(!dir.join("d.example.com").exists());
    assert_eq!(
        fs::read(dir.join("a.example.com").join(PUBLIC_KEY)).unwrap(),
        before
    );
    init_public_certs(&dir, &[public_host("a.example.com")], true).unwrap();
    assert_ne!(
        fs::read(dir.join("a.example.com").join(PUBLIC_KEY)).unwrap(),
        before
    );
    assert_eq!(first_cert(&dir.join(PUBLIC_CA_CERT)), ca);
}

#[test]
fn an_unconstrained_public_ca_is_constrained_when_a_hostname_is_added() {
    // A CA made before name constraints existed: same key and name, no
    // NameConstraints. Adding a hostname reissues it constrained to every
    // hostname it has a leaf for; the old leaf keeps validating.
    let tmp = public_a();
    let dir = tmp.path();
    let key_path = dir.join(STATE_DIR).join(PUBLIC_CA_KEY);
    let key = pki::read_signing_key(&key_path).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Runewarp Public Hostname CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let legacy = params.self_signed(&key).unwrap();
    fs::write(dir.join(PUBLIC_CA_CERT), legacy.pem()).unwrap();
    let legacy = legacy.der().clone();
    let a_leaf = first_cert(&dir.join("a.example.com").join(PUBLIC_CERT));
    assert!(webpki_verify(&a_leaf, &legacy, "a.example.com"));

    let out = init_public_certs(dir, &[public_host("b.example.com")], false).unwrap();
    assert!(out.contains("Reissued"), "{out}");
    let ca = first_cert(&dir.join(PUBLIC_CA_CERT));
    let (_, parsed) = X509Certificate::from_der(&ca).unwrap();
    let nc = parsed.name_constraints().unwrap().expect("constrained now");
    let permitted = permitted(nc.value);
    assert_eq!(
        permitted,
        ["DNSName(\"a.example.com\")", "DNSName(\"b.example.com\")"]
    );
    assert!(webpki_verify(&a_leaf, &ca, "a.example.com"));
    assert!(webpki_verify(&a_leaf, &legacy, "a.example.com"));
    let b_leaf = first_cert(&dir.join("b.example.com").join(PUBLIC_CERT));
    assert!(webpki_verify(&b_leaf, &ca, "b.example.com"));
}

#[test]
fn public_renew_and_rotate_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let hosts = [public_host("a.example.com"), public_host("b.example.com")];
    init_public_certs(dir, &hosts, false).unwrap();
    let ca = first_cert(&dir.join(PUBLIC_CA_CERT));
    let leaf_before = first_cert(&dir.join("a.example.com").join(PUBLIC_CERT));

    renew_public_certs(dir, &hosts[..1]).unwrap();
    assert_eq!(first_cert(&dir.join(PUBLIC_CA_CERT)), ca);
    let leaf_after = first_cert(&dir.join("a.example.com").join(PUBLIC_CERT));
    assert_ne!(leaf_before, leaf_after);
    assert_signed_by(&leaf_after, &ca);

    let err = renew_public_certs(dir, &[public_host("z.example.com")]).unwrap_err();
    assert!(
        err.to_string()
            .contains("runewarp client public-cert init --hostname z.example.com"),
        "{err}"
    );

    rotate_public_ca(dir).unwrap();
    let new_ca = first_cert(&dir.join(PUBLIC_CA_CERT));
    assert_ne!(new_ca, ca);
    let loaded = load_public_certs(dir).unwrap();
    assert_eq!(loaded.len(), 2);
    for (h, m) in &loaded {
        assert_signed_by(&m.chain[0], &new_ca);
        assert_not_signed_by(&m.chain[0], &ca);
        assert!(webpki_verify(&m.chain[0], &new_ca, h.as_str()));
    }
}

#[test]
fn public_load_errors_and_skips() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fails_with!(
        load_public_certs(&dir.join("absent")),
        MaterialError::Missing { .. }
    );
    fails_with!(rotate_public_ca(dir), MaterialError::Missing { .. });

    init_public_certs(dir, &[public_host("a.example.com")], false).unwrap();
    fs::create_dir(dir.join("not a hostname")).unwrap();
    fs::create_dir(dir.join("empty.example.com")).unwrap();
    assert_eq!(load_public_certs(dir).unwrap().len(), 1);

    // A leaf directory holding the wrong hostname's certificate.
    fs::create_dir(dir.join("b.example.com")).unwrap();
    for f in [PUBLIC_CERT, PUBLIC_KEY] {
        fs::copy(
            dir.join("a.example.com").join(f),
            dir.join("b.example.com").join(f),
        )
        .unwrap();
    }
    let err = load_public_certs(dir).unwrap_err();
    assert!(
        err.to_string().contains("does not name b.example.com"),
        "{err}"
    );
    fs::remove_file(dir.join("b.example.com").join(PUBLIC_KEY)).unwrap();
    fails_with!(load_public_certs(dir), MaterialError::Partial { .. });
}

#[test]
fn public_init_with_partial_ca_writes_nothing() {
    let tmp = public_a();
    let dir = tmp.path();
    fs::remove_file(dir.join(STATE_DIR).join(PUBLIC_CA_KEY)).unwrap();
    fails_with!(
        init_public_certs(dir, &[public_host("b.example.com")], false),
        MaterialError::Partial { .. }
    );
    assert!(!dir.join("b.example.com").exists());
}

#[test]
fn ca_bundle_needs_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.pem");
    fs::write(&empty, "not pem at all\n").unwrap();
    let err = fails_with!(load_ca_bundle(&empty), MaterialError::NoCertificates { .. });
    assert!(err.to_string().contains("empty.pem"));

    let missing = load_ca_bundle(&tmp.path().join("missing.pem")).unwrap_err();
    assert!(matches!(missing, MaterialError::Read { .. }), "{missing}");

    let (a, _) = generate_self_signed(&["a.test"]).unwrap();
    let (b, _) = generate_self_signed(&["b.test"]).unwrap();
    let bundle = tmp.path().join("bundle.pem");
    fs::write(&bundle, format!("{a}{b}")).unwrap();
    assert_eq!(load_ca_bundle(&bundle).unwrap().len(), 2);
}

#[test]
fn self_signed_names_every_hostname() {
    let (cert_pem, key_pem) = generate_self_signed(&["localhost", "backend.test"]).unwrap();
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    assert!(PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).is_ok());
    let (_, parsed) = X509Certificate::from_der(&cert).unwrap();
    let names = pki::dns_names(Path::new("x"), &parsed).unwrap();
    assert_eq!(names, ["localhost", "backend.test"]);
    assert_eq!(
        parsed.public_key().algorithm.algorithm.to_id_string(),
        "1.2.840.10045.2.1"
    );
}
