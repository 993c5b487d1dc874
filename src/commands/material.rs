//! The material commands as the CLI sees them: resolve the directory
//! (`--dir` > the config's directory > the default) and the Server hostname
//! (`--hostname` > RUNEWARP_SERVER_HOSTNAME > `server.hostname` > for
//! renew/rotate-ca the existing certificate), then run. Each returns the
//! text to print on stdout.

use std::path::PathBuf;

use crate::cli::{IdentityCommand, MaterialArgs, PublicCertCommand, ServerCertCommand};
use crate::config::{Environment, MaterialDefaults, material_defaults};
use crate::hostname::{PublicHostname, ServerHostname};
use crate::tls::material::{
    MaterialError, init_client_identity, init_public_certs, init_server_cert, renew_public_certs,
    renew_server_cert, rotate_client_identity, rotate_public_ca, rotate_server_ca,
    show_client_identity, show_server_pin,
};

/// `runewarp server cert init|renew|rotate-ca`.
pub(crate) fn run_server_cert(
    cmd: &ServerCertCommand,
    env: &Environment,
) -> Result<String, MaterialError> {
    let (material, hostname) = match cmd {
        ServerCertCommand::Init {
            material, hostname, ..
        }
        | ServerCertCommand::Renew { material, hostname }
        | ServerCertCommand::RotateCa { material, hostname } => (material, hostname),
        ServerCertCommand::ShowPin { material } => {
            let dir = resolve_dir(material, None, env, |d| &d.server_cert_dir)?;
            return Ok(format!("{}\n", show_server_pin(&dir)?));
        }
    };
    let cli_hostname = hostname
        .as_deref()
        .map(|h| {
            ServerHostname::parse(h).map_err(|source| MaterialError::Hostname {
                value: h.to_string(),
                source,
            })
        })
        .transpose()?;
    // The config is only needed for what the command line leaves open.
    let defaults = if material.dir.is_none() || cli_hostname.is_none() {
        Some(material_defaults(material.config.as_deref(), env)?)
    } else {
        None
    };
    let dir = resolve_dir(material, defaults.as_ref(), env, |d| &d.server_cert_dir)?;
    let hostname = cli_hostname.or_else(|| defaults.and_then(|d| d.server_hostname));
    match cmd {
        ServerCertCommand::Init { force, .. } => {
            let hostname = hostname.ok_or(MaterialError::NoServerHostname)?;
            init_server_cert(&dir, &hostname, *force)
        }
        ServerCertCommand::Renew { .. } => renew_server_cert(&dir, hostname.as_ref()),
        ServerCertCommand::RotateCa { .. } => rotate_server_ca(&dir, hostname.as_ref()),
        ServerCertCommand::ShowPin { .. } => Ok(format!("{}\n", show_server_pin(&dir)?)),
    }
}

/// `runewarp client identity init|show|rotate`. `show` returns exactly the
/// pin and a newline.
pub(crate) fn run_identity(
    cmd: &IdentityCommand,
    env: &Environment,
) -> Result<String, MaterialError> {
    let material = match cmd {
        IdentityCommand::Init { material, .. }
        | IdentityCommand::Show { material }
        | IdentityCommand::Rotate { material } => material,
    };
    let dir = resolve_dir(material, None, env, |d| &d.identity_dir)?;
    match cmd {
        IdentityCommand::Init { force, .. } => init_client_identity(&dir, *force),
        IdentityCommand::Show { .. } => Ok(format!("{}\n", show_client_identity(&dir)?)),
        IdentityCommand::Rotate { .. } => rotate_client_identity(&dir),
    }
}

/// `runewarp client public-cert init|renew|rotate-ca`.
pub(crate) fn run_public_cert(
    cmd: &PublicCertCommand,
    env: &Environment,
) -> Result<String, MaterialError> {
    let (material, hostnames): (_, &[String]) = match cmd {
        PublicCertCommand::Init {
            material,
            hostnames,
            ..
        }
        | PublicCertCommand::Renew {
            material,
            hostnames,
        } => (material, hostnames),
        PublicCertCommand::RotateCa { material } => (material, &[]),
    };
    // Validate hostnames before touching the config or the disk.
    let hostnames = parse_public(hostnames)?;
    let dir = resolve_dir(material, None, env, |d| &d.public_cert_dir)?;
    match cmd {
        PublicCertCommand::Init { force, .. } => init_public_certs(&dir, &hostnames, *force),
        PublicCertCommand::Renew { .. } => renew_public_certs(&dir, &hostnames),
        PublicCertCommand::RotateCa { .. } => rotate_public_ca(&dir),
    }
}

fn parse_public(raw: &[String]) -> Result<Vec<PublicHostname>, MaterialError> {
    raw.iter()
        .map(|h| {
            PublicHostname::parse(h).map_err(|source| MaterialError::Hostname {
                value: h.clone(),
                source,
            })
        })
        .collect()
}

/// `--dir`, else the directory from `defaults` (loaded now if the caller
/// has not loaded them).
fn resolve_dir(
    material: &MaterialArgs,
    defaults: Option<&MaterialDefaults>,
    env: &Environment,
    pick: fn(&MaterialDefaults) -> &PathBuf,
) -> Result<PathBuf, MaterialError> {
    if let Some(dir) = &material.dir {
        return Ok(dir.clone());
    }
    match defaults {
        Some(d) => Ok(pick(d).clone()),
        None => Ok(pick(&material_defaults(material.config.as_deref(), env)?).clone()),
    }
}
