//! The Client `public-cert-dir` (terminate mode, manual path): a Public
//! hostname CA (`public-ca.crt`, `state/public-ca.key`) and one leaf per
//! Public hostname (`<hostname>/public.crt`, `<hostname>/public.key`).
//!
//! Write order, every file atomic: CA key, CA certificate, then per
//! hostname its key and its certificate.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::pki::{self, CA_DAYS, Ca, Leaf, TlsMaterial, WriteMode, Writer};
use super::{MaterialError, STATE_DIR, exists, shell_arg};
use crate::fsutil;
use crate::hostname::PublicHostname;

/// The Public hostname CA certificate in `public-cert-dir`.
pub const PUBLIC_CA_CERT: &str = "public-ca.crt";
/// Inside `state/`.
pub const PUBLIC_CA_KEY: &str = "public-ca.key";
/// Inside `<hostname>/`.
pub const PUBLIC_CERT: &str = "public.crt";
/// Inside `<hostname>/`.
pub const PUBLIC_KEY: &str = "public.key";

const CA_NAME: &str = "Runewarp Public Hostname CA";
const LEAF_DAYS: u32 = 90;

struct LeafPaths {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn leaf_paths(dir: &Path, hostname: &PublicHostname) -> LeafPaths {
    let leaf_dir = dir.join(hostname.as_str());
    LeafPaths {
        cert: leaf_dir.join(PUBLIC_CERT),
        key: leaf_dir.join(PUBLIC_KEY),
        dir: leaf_dir,
    }
}

fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (
        dir.join(PUBLIC_CA_CERT),
        dir.join(STATE_DIR).join(PUBLIC_CA_KEY),
    )
}

fn init_hint(dir: &Path, hostname: Option<&PublicHostname>) -> String {
    format!(
        "runewarp client public-cert init --hostname {} --dir {}",
        hostname.map_or("HOSTNAME", |h| h.as_str()),
        shell_arg(dir)
    )
}

fn load_ca(dir: &Path) -> Result<Ca, MaterialError> {
    let (ca_cert, ca_key) = ca_paths(dir);
    Ca::load(
        "Public hostname CA",
        dir,
        &ca_cert,
        &ca_key,
        init_hint(dir, None),
        &format!(
            "run \"runewarp client public-cert rotate-ca --dir {}\" to replace the CA",
            shell_arg(dir)
        ),
    )
}

fn unique(hostnames: &[PublicHostname]) -> Vec<&PublicHostname> {
    let mut seen = BTreeSet::new();
    hostnames
        .iter()
        .filter(|h| seen.insert(h.as_str()))
        .collect()
}

/// `runewarp client public-cert init`: create the Public hostname CA if it
/// is absent (else reuse it) and add a leaf per hostname. Without `force`,
/// refuses (writing nothing) if a hostname already has a leaf.
pub fn init_public_certs(
    dir: &Path,
    hostnames: &[PublicHostname],
    force: bool,
) -> Result<String, MaterialError> {
    let hostnames = unique(hostnames);
    let (ca_cert, ca_key) = ca_paths(dir);
    let existing_ca = if exists(&ca_cert) || exists(&ca_key) {
        Some(load_ca(dir)?)
    } else {
        None
    };
    if !force {
        for h in &hostnames {
            let lp = leaf_paths(dir, h);
            if let Some(existing) = pki::first_existing([&lp.key, &lp.cert]) {
                return Err(MaterialError::Exists {
                    path: existing.clone(),
                    next: format!(
                        "use \"runewarp client public-cert renew --hostname {h} --dir {}\", or pass --force to replace it",
                        shell_arg(dir)
                    ),
                });
            }
        }
    }
    let created_ca = existing_ca.is_none();
    // The CA's NameConstraints must cover every hostname it has a leaf for
    // plus the new ones. If they do not (a hostname added later, or a CA
    // made before constraints existed), its certificate is reissued with
    // the same key and name, so existing leaves keep chaining to it.
    let mut widened = false;
    let ca = match existing_ca {
        Some(ca) => {
            let mut needed: BTreeSet<String> = leaf_hostnames(dir)?
                .iter()
                .map(|h| h.as_str().to_string())
                .collect();
            needed.extend(hostnames.iter().map(|h| h.as_str().to_string()));
            let current = ca.permitted_dns()?;
            let covered = current.as_ref().is_some_and(|list| {
                needed
                    .iter()
                    .all(|h| list.iter().any(|c| pki::constraint_permits(c, h)))
            });
            if covered {
                ca
            } else {
                // Keep what it permitted before: never narrow a CA here.
                needed.extend(
                    current
                        .into_iter()
                        .flatten()
                        .filter(|c| c != pki::NO_HOSTNAME_CONSTRAINT),
                );
                widened = true;
                let names: Vec<&str> = needed.iter().map(String::as_str).collect();
                ca.reissue(CA_DAYS, &names)?
            }
        }
        None => {
            let names: Vec<&str> = hostnames.iter().map(|h| h.as_str()).collect();
            Ca::generate(CA_NAME, CA_DAYS, &names)?
        }
    };
    let leaves = issue_all(&ca, &hostnames)?;

    pki::prepare_dirs(dir, created_ca)?;
    let mut w = Writer::new(
        WriteMode::Create,
        format!(
            "another process created it meanwhile; inspect {} and retry",
            shell_arg(dir)
        ),
    );
    if created_ca {
        w.key(&ca_key, &ca.key.serialize_pem())?;
        w.cert(&ca_cert, &ca.cert_pem)?;
    } else if widened {
        w.mode = WriteMode::Replace;
        w.cert(&ca_cert, &ca.cert_pem)?;
    }
    w.mode = if force {
        WriteMode::Replace
    } else {
        WriteMode::Create
    };
    write_leaves(&mut w, dir, &leaves)?;

    let headline = if created_ca {
        format!(
            "Created a Public hostname CA and certificates in {}\n",
            dir.display()
        )
    } else {
        format!(
            "Added certificates in {} (existing Public hostname CA)\n",
            dir.display()
        )
    };
    let note = widened.then(|| {
        format!(
            "Reissued {} (same key) so that its name constraints cover the new hostname(s); Visitors that trust the old copy must be given this one to accept the new certificates.",
            ca_cert.display()
        )
    });
    report(headline, &w, note, dir, &ca, &leaves)
}

/// `runewarp client public-cert renew`: reissue each hostname's leaf (new
/// key) from the same CA. Each hostname must already have a leaf.
pub fn renew_public_certs(
    dir: &Path,
    hostnames: &[PublicHostname],
) -> Result<String, MaterialError> {
    let hostnames = unique(hostnames);
    let ca = load_ca(dir)?;
    for h in &hostnames {
        let lp = leaf_paths(dir, h);
        if !exists(&lp.cert) && !exists(&lp.key) {
            return Err(MaterialError::Missing {
                what: "Public hostname certificate",
                dir: lp.dir,
                next: init_hint(dir, Some(h)),
            });
        }
    }
    let leaves = issue_all(&ca, &hostnames)?;
    let mut w = Writer::new(WriteMode::Replace, String::new());
    write_leaves(&mut w, dir, &leaves)?;

    let headline = format!(
        "Renewed certificates in {} (same Public hostname CA)\n",
        dir.display()
    );
    report(headline, &w, None, dir, &ca, &leaves)
}

/// `runewarp client public-cert rotate-ca`: replace the Public hostname CA
/// and reissue every existing leaf from it.
pub fn rotate_public_ca(dir: &Path) -> Result<String, MaterialError> {
    let old = load_ca(dir)?;
    let hostnames = leaf_hostnames(dir)?;
    let names: Vec<&str> = hostnames.iter().map(|h| h.as_str()).collect();
    let ca = Ca::generate(CA_NAME, CA_DAYS, &names)?;
    let refs: Vec<&PublicHostname> = hostnames.iter().collect();
    let leaves = issue_all(&ca, &refs)?;
    pki::prepare_dirs(dir, true)?;
    let (ca_cert, ca_key) = ca_paths(dir);
    let mut w = Writer::new(WriteMode::Replace, String::new());
    w.key(&ca_key, &ca.key.serialize_pem())?;
    w.cert(&ca_cert, &ca.cert_pem)?;
    write_leaves(&mut w, dir, &leaves)?;

    let headline = format!(
        "Replaced the Public hostname CA in {} and reissued {} certificate(s)\n",
        dir.display(),
        leaves.len()
    );
    let note = format!(
        "Old Public hostname CA SHA-256 fingerprint: {}",
        old.fingerprint()
    );
    report(headline, &w, Some(note), dir, &ca, &leaves)
}

/// Every `<hostname>/` with `public.crt` + `public.key`, sorted.
pub(crate) fn load(dir: &Path) -> Result<Vec<(PublicHostname, TlsMaterial)>, MaterialError> {
    if !dir.is_dir() {
        return Err(MaterialError::Missing {
            what: "public certificates",
            dir: dir.to_path_buf(),
            next: init_hint(dir, None),
        });
    }
    let mut out = Vec::new();
    for hostname in leaf_hostnames(dir)? {
        let lp = leaf_paths(dir, &hostname);
        pki::require_pair(
            "public certificate",
            &lp.dir,
            &lp.cert,
            &lp.key,
            init_hint(dir, Some(&hostname)),
        )?;
        let renew = format!(
            "run \"runewarp client public-cert renew --hostname {hostname} --dir {}\"",
            shell_arg(dir)
        );
        let material = pki::load_tls_material(&lp.cert, &lp.key, &renew)?;
        if let Some(leaf) = material.chain.first() {
            let parsed = pki::parse_x509(&lp.cert, leaf)?;
            let names = pki::dns_names(&lp.cert, &parsed)?;
            if !names
                .iter()
                .any(|n| n.eq_ignore_ascii_case(hostname.as_str()))
            {
                return Err(MaterialError::Invalid {
                    path: lp.cert,
                    reason: format!("the certificate does not name {hostname}: {renew}"),
                });
            }
        }
        out.push((hostname, material));
    }
    Ok(out)
}

/// Subdirectories named like a Public hostname that hold a leaf file.
fn leaf_hostnames(dir: &Path) -> Result<Vec<PublicHostname>, MaterialError> {
    let read_err = |source: io::Error| MaterialError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut names = BTreeSet::new();
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name == STATE_DIR || !entry.path().is_dir() {
            continue;
        }
        let Ok(hostname) = PublicHostname::parse(name) else {
            tracing::debug!(path = %entry.path().display(), "skipping a directory that is not named like a hostname");
            continue;
        };
        if hostname.as_str() != name {
            tracing::warn!(path = %entry.path().display(), "skipping a directory whose name is not a canonical hostname (lowercase, no trailing dot)");
            continue;
        }
        let lp = leaf_paths(dir, &hostname);
        if exists(&lp.cert) || exists(&lp.key) {
            names.insert(hostname);
        }
    }
    Ok(names.into_iter().collect())
}

fn issue_all<'h>(
    ca: &Ca,
    hostnames: &[&'h PublicHostname],
) -> Result<Vec<(&'h PublicHostname, Leaf)>, MaterialError> {
    hostnames
        .iter()
        .map(|h| Ok((*h, ca.issue_leaf(h.as_str(), LEAF_DAYS)?)))
        .collect()
}

fn write_leaves(
    w: &mut Writer,
    dir: &Path,
    leaves: &[(&PublicHostname, Leaf)],
) -> Result<(), MaterialError> {
    for (h, leaf) in leaves {
        let lp = leaf_paths(dir, h);
        fsutil::ensure_dir(&lp.dir, fsutil::MATERIAL_DIR_MODE).map_err(|source| {
            MaterialError::Write {
                path: lp.dir.clone(),
                source,
            }
        })?;
        w.key(&lp.key, &leaf.key_pem)?;
        w.cert(&lp.cert, &leaf.cert_pem)?;
    }
    Ok(())
}

/// What `init`, `renew` and `rotate-ca` print: `headline` (a whole line),
/// the files written, `note` (a line of its own, if any), then each leaf's
/// expiry, the CA's fingerprint and what Visitors must trust.
fn report(
    headline: String,
    w: &Writer,
    note: Option<String>,
    dir: &Path,
    ca: &Ca,
    leaves: &[(&PublicHostname, Leaf)],
) -> Result<String, MaterialError> {
    let mut out = headline;
    w.report(&mut out);
    if let Some(note) = note {
        let _ = writeln!(out, "{note}");
    }
    for (h, leaf) in leaves {
        let lp = leaf_paths(dir, h);
        let _ = writeln!(
            out,
            "{h}: valid until {}",
            pki::not_after(&lp.cert, &leaf.cert_der)?
        );
    }
    let _ = writeln!(
        out,
        "Public hostname CA SHA-256 fingerprint: {}",
        ca.fingerprint()
    );
    let _ = writeln!(
        out,
        "Visitors must trust {} to accept these certificates.",
        dir.join(PUBLIC_CA_CERT).display()
    );
    Ok(out)
}
