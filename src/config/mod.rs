//! Configuration: one seam, three steps.
//!
//! 1. **prepare** ([`prepare`]): pick the config file, apply CLI overlays,
//!    fill XDG and hardcoded defaults, resolve config-relative paths.
//! 2. **validate** ([`validate`]): turn the prepared shape into the typed
//!    [`ServerConfig`] / [`ClientConfig`], checking invariants, mutual
//!    exclusion, trust and routing rules.
//! 3. **start**: side effects (creating directories) belong to the runtime,
//!    after validation succeeded.
//!
//! (Stub: implemented by the config work.)

pub mod types;

pub use types::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::hostname::ServerHostname;

/// The process environment as the config seam sees it (injectable in tests).
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: HashMap<String, String>,
}

impl Environment {
    pub fn from_process() -> Self {
        Self { vars: std::env::vars().collect() }
    }
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self { vars: pairs.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }
    /// A variable's value; empty values count as unset.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str).filter(|v| !v.is_empty())
    }
}

/// A config error: one line naming the file, key and value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// CLI overlays for `runewarp server`.
#[derive(Debug, Clone, Default)]
pub struct ServerOverlay {
    pub config: Option<PathBuf>,
    pub hostname: Option<String>,
}

/// CLI overlays for `runewarp client`.
#[derive(Debug, Clone, Default)]
pub struct ClientOverlay {
    pub config: Option<PathBuf>,
    pub server_address: Option<String>,
    pub backend_address: Option<String>,
}

/// Defaults the material commands read from a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaterialDefaults {
    /// RUNEWARP_SERVER_HOSTNAME, else `server.hostname` from the file.
    pub server_hostname: Option<ServerHostname>,
    pub server_cert_dir: PathBuf,
    pub identity_dir: PathBuf,
    pub public_cert_dir: PathBuf,
}

pub fn load_server(_o: &ServerOverlay, _env: &Environment) -> Result<ServerConfig, ConfigError> {
    unimplemented!()
}
pub fn load_client(_o: &ClientOverlay, _env: &Environment) -> Result<ClientConfig, ConfigError> {
    unimplemented!()
}
pub fn material_defaults(_config: Option<&Path>, _env: &Environment) -> Result<MaterialDefaults, ConfigError> {
    unimplemented!()
}
