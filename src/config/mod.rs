//! Configuration: one seam, three steps.
//!
//! 1. **prepare** ([`prepare`]): pick the config file, apply CLI overlays,
//!    fill XDG and hardcoded defaults, resolve config-relative paths.
//! 2. **validate** (`validate`): turn the prepared shape into the typed
//!    [`ServerConfig`] / [`ClientConfig`], checking invariants, mutual
//!    exclusion, trust and routing rules.
//! 3. **start**: side effects (creating directories) belong to the runtime,
//!    after validation succeeded.
//!
//! # The file
//!
//! One TOML file may hold a `[server]` and a `[client]` section; each command
//! reads its own and checks only the syntax and shape (keys, types) of the
//! other. Unknown keys are errors at every level. Relative paths inside a
//! file resolve against the file's directory; CLI paths against the current
//! directory.
//!
//! # Discovery
//!
//! `--config PATH` (must exist), else `$XDG_CONFIG_HOME/runewarp/config.toml`,
//! else `$HOME/.config/runewarp/config.toml`. XDG variables and HOME that
//! are not absolute paths are ignored (XDG spec). The Server always needs a
//! file. The Client may run without one when both `--server-address` and
//! `--backend-address` are given (a sole catch-all passthrough Service,
//! system trust); the same holds for a file without a `[client]` section.
//!
//! # Precedence
//!
//! - Server hostname: `--hostname` > `RUNEWARP_SERVER_HOSTNAME` > `server.hostname`.
//! - `--server-address` > `client.server-address`.
//! - `--backend-address` replaces the backend of the sole Service, or creates
//!   a sole catch-all passthrough Service when the file has none; with two or
//!   more Services it is an error.
//!
//! # Defaults
//!
//! | Key | Default |
//! |---|---|
//! | `log-level` | `info` |
//! | `server.public-bind-address` | `0.0.0.0:443` (TCP) |
//! | `server.tunnel-bind-address` | `0.0.0.0:443` (UDP) |
//! | `server.readiness-bind-address` | none |
//! | `server.metrics-bind-address`, `client.metrics-bind-address` | none (off) |
//! | `server.control-socket`, `client.control-socket` | `$XDG_RUNTIME_DIR/runewarp/<role>.sock`, else `$XDG_STATE_HOME/runewarp/<role>.sock` |
//! | `server.graceful-shutdown-duration` | `60s` |
//! | `server.stream-write-timeout`, `client.stream-write-timeout` | `30s` |
//! | `server.stream-idle-timeout`, `client.stream-idle-timeout` | `15m` |
//! | `server.congestion-control`, `client.congestion-control` | `bbr` |
//! | `server.cert-dir` (when there is no `[server.acme]`) | `$XDG_DATA_HOME/runewarp/server` |
//! | `server.acme.state-dir` | `$XDG_STATE_HOME/runewarp/server/acme` |
//! | `client.server-address` port | `443` |
//! | `client.server-trust` | `system` |
//! | `client.identity-dir` | `$XDG_DATA_HOME/runewarp/client/identity` |
//! | `client.public-cert-dir` (some Service terminates, no `[client.acme]`) | `$XDG_DATA_HOME/runewarp/client/public-certs` |
//! | `client.readiness-bind-address` | none |
//! | `client.acme.state-dir` | `$XDG_STATE_HOME/runewarp/client/acme` |
//! | `[*.acme].directory-url` | `LETS_ENCRYPT_DIRECTORY` |
//! | `[[client.services]].tls-mode` | `passthrough` |
//! | `[[client.services]].proxy-protocol` | none |
//!
//! `$XDG_DATA_HOME` defaults to `$HOME/.local/share`, `$XDG_STATE_HOME` to
//! `$HOME/.local/state`, `$XDG_CONFIG_HOME` to `$HOME/.config`. When a
//! default is needed and neither the XDG variable nor HOME is set, the error
//! names what to set.
//!
//! # Errors
//!
//! Every [`ConfigError`] is one line naming the file, the key path and the
//! value, e.g. `/etc/runewarp/config.toml: server.tunnels[1].public-hostnames[0]
//! = "*.example.com": wildcards are not supported; list each hostname
//! explicitly`. Only TOML syntax and type errors span three lines: the
//! `file:line:col: message`, the offending line, and a caret.

mod duration;
mod file;
mod gate;
pub mod prepare;
mod render;
#[cfg(test)]
mod tests;
pub(crate) mod types;
pub(crate) mod validate;

/// The config keys, of those listed, whose field differs between two
/// configs: `changed_keys!(old, new, [field => "key", ...])`. A reload
/// reports these as needing a restart.
macro_rules! changed_keys {
    ($old:expr, $new:expr, [$($field:ident => $key:literal),* $(,)?]) => {{
        let (old, new) = ($old, $new);
        let mut keys: Vec<&'static str> = Vec::new();
        $(
            if old.$field != new.$field {
                keys.push($key);
            }
        )*
        keys
    }};
}
pub(crate) use changed_keys;

pub use duration::parse_duration;
pub(crate) use gate::{load_gate, render_gate};
pub(crate) use render::{render_client, render_server};
pub use types::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::hostname::ServerHostname;

/// The process environment as the config seam sees it (injectable in tests).
#[derive(Debug, Clone, Default)]
pub(crate) struct Environment {
    vars: HashMap<String, String>,
}

impl Environment {
    pub(crate) fn from_process() -> Self {
        Self {
            vars: std::env::vars().collect(),
        }
    }
    /// An environment of exactly `pairs` (for tests).
    #[cfg(test)]
    pub(crate) fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
    /// A variable's value; empty values count as unset.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// A config error: one line naming the file, key and value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// CLI overlays for `runewarp server`.
#[derive(Debug, Clone, Default)]
pub(crate) struct ServerOverlay {
    pub config: Option<PathBuf>,
    pub hostname: Option<String>,
}

/// CLI overlays for `runewarp client`.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientOverlay {
    pub config: Option<PathBuf>,
    pub server_address: Option<String>,
    pub backend_address: Option<String>,
}

/// Defaults the material commands read from a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MaterialDefaults {
    /// RUNEWARP_SERVER_HOSTNAME, else `server.hostname` from the file.
    pub(crate) server_hostname: Option<ServerHostname>,
    pub(crate) server_cert_dir: PathBuf,
    pub identity_dir: PathBuf,
    pub public_cert_dir: PathBuf,
    /// `server.control-socket` (or its default), for `server status`.
    pub(crate) server_control_socket: Option<PathBuf>,
    /// `client.control-socket` (or its default), for `client status`.
    pub(crate) client_control_socket: Option<PathBuf>,
}

/// Prepare and validate the Server config.
pub(crate) fn load_server(
    overlay: &ServerOverlay,
    env: &Environment,
) -> Result<ServerConfig, ConfigError> {
    validate::validate_server(prepare::prepare_server(overlay, env)?)
}

/// Prepare and validate the Client instance config.
pub(crate) fn load_client(
    overlay: &ClientOverlay,
    env: &Environment,
) -> Result<ClientConfig, ConfigError> {
    validate::validate_client(prepare::prepare_client(overlay, env)?)
}

/// Defaults for the material commands, from `config` (must exist) or the
/// discovered file (may be missing). Only the file's syntax and shape must be
/// valid; a file without tunnels or services is fine.
pub(crate) fn material_defaults(
    config: Option<&Path>,
    env: &Environment,
) -> Result<MaterialDefaults, ConfigError> {
    let (hostname, defaults) = prepare::prepare_material(config, env)?;
    Ok(MaterialDefaults {
        server_hostname: hostname
            .as_ref()
            .map(validate::server_hostname)
            .transpose()?,
        ..defaults
    })
}
