//! `runewarp control`'s config file: a `[control]` table.
//!
//! ```toml
//! [control]
//! listen-address = "0.0.0.0:7443"
//! hostname = "control.example.com"
//! state-dir = "/var/lib/runewarp/control"
//! # consumer-domains = ["gmail.com", "outlook.com"]  # replaces the default list
//! ```
//!
//! Relative paths resolve against the file's directory; every error names
//! the file and the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::LogLevel;
use crate::hostname::ServerHostname;

/// Addresses at these domains never form a shared organisation: each user
/// gets a personal one.
pub const DEFAULT_CONSUMER_DOMAINS: &[&str] = &[
    "gmail.com",
    "googlemail.com",
    "outlook.com",
    "hotmail.com",
    "live.com",
    "msn.com",
    "yahoo.com",
    "icloud.com",
    "me.com",
    "aol.com",
    "proton.me",
    "protonmail.com",
    "gmx.com",
    "gmx.de",
    "web.de",
    "yandex.ru",
    "mail.ru",
    "qq.com",
    "163.com",
];

/// The port the control API listens on by default.
pub const DEFAULT_LISTEN_ADDRESS: &str = "0.0.0.0:7443";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawFile {
    log_level: Option<LogLevel>,
    control: Option<RawControl>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawControl {
    listen_address: Option<String>,
    hostname: Option<String>,
    state_dir: Option<PathBuf>,
    consumer_domains: Option<Vec<String>>,
}

/// A validated control-server config.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub log_level: LogLevel,
    pub listen_address: SocketAddr,
    /// The name in the API's TLS certificate (what devices connect to).
    pub hostname: ServerHostname,
    pub state_dir: PathBuf,
    pub consumer_domains: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ControlConfigError(pub String);

impl ControlConfig {
    /// Read and validate `path`.
    pub fn load(path: &Path) -> Result<Self, ControlConfigError> {
        let label = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ControlConfigError(format!("{label}: cannot read: {e}")))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse(&label, dir, &text)
    }

    /// Validate `text` (from `label`, relative paths against `dir`).
    pub fn parse(label: &str, dir: &Path, text: &str) -> Result<Self, ControlConfigError> {
        let err = |m: String| ControlConfigError(format!("{label}: {m}"));
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            err(e
                .to_string()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join("; "))
        })?;
        let Some(c) = raw.control else {
            return Err(err(
                "no [control] section; `runewarp control` needs one".into()
            ));
        };
        let listen = c
            .listen_address
            .as_deref()
            .unwrap_or(DEFAULT_LISTEN_ADDRESS);
        let listen_address = listen.parse().map_err(|_| {
            err(format!(
                "control.listen-address = {listen:?}: expected IP:port, such as \"0.0.0.0:7443\""
            ))
        })?;
        let Some(hostname) = c.hostname else {
            return Err(err(
                "control.hostname is required: the DNS name devices connect to (it goes into the API's certificate)".into(),
            ));
        };
        let hostname = ServerHostname::parse(&hostname)
            .map_err(|e| err(format!("control.hostname = {hostname:?}: {e}")))?;
        let Some(state_dir) = c.state_dir else {
            return Err(err(
                "control.state-dir is required: where the database and the API's certificates live"
                    .into(),
            ));
        };
        if state_dir.as_os_str().is_empty() {
            return Err(err("control.state-dir must not be empty".into()));
        }
        let state_dir = dir.join(state_dir);
        let consumer_domains = match c.consumer_domains {
            Some(list) => {
                for d in &list {
                    if d.is_empty() || d.contains('@') || d.contains('/') {
                        return Err(err(format!(
                            "control.consumer-domains: {d:?} is not a domain such as \"gmail.com\""
                        )));
                    }
                }
                list.into_iter().map(|d| d.to_ascii_lowercase()).collect()
            }
            None => DEFAULT_CONSUMER_DOMAINS
                .iter()
                .map(|d| d.to_string())
                .collect(),
        };
        Ok(Self {
            log_level: raw.log_level.unwrap_or(LogLevel::Info),
            listen_address,
            hostname,
            state_dir,
            consumer_domains,
        })
    }

    /// The organisation a user's email belongs to: its domain, or for a
    /// consumer domain the address itself (a personal organisation).
    pub fn organisation_of(&self, email: &str) -> Option<String> {
        let email = email.trim().to_ascii_lowercase();
        let (local, domain) = email.rsplit_once('@')?;
        if local.is_empty() || domain.is_empty() || !domain.contains('.') {
            return None;
        }
        if self.consumer_domains.iter().any(|d| d == domain) {
            Some(email.clone())
        } else {
            Some(domain.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ControlConfig, String> {
        ControlConfig::parse("c.toml", Path::new("/etc/rw"), text).map_err(|e| e.0)
    }

    #[test]
    fn a_minimal_file_gets_defaults_and_errors_name_the_key() {
        let c = parse("[control]\nhostname = \"control.example.com\"\nstate-dir = \"state\"\n")
            .unwrap();
        assert_eq!(c.listen_address.port(), 7443);
        assert_eq!(c.state_dir, Path::new("/etc/rw/state"));
        assert_eq!(
            c.organisation_of("Bob@ACME.com").as_deref(),
            Some("acme.com")
        );
        assert_eq!(
            c.organisation_of("carol@gmail.com").as_deref(),
            Some("carol@gmail.com")
        );
        assert_eq!(c.organisation_of("nobody"), None);
        let e = parse("[control]\nstate-dir = \"s\"\n").unwrap_err();
        assert!(e.contains("control.hostname is required"), "{e}");
        let e = parse("[control]\nhostname = \"h.example\"\nstate-dir = \"s\"\nlisten = \"x\"\n")
            .unwrap_err();
        assert!(e.contains("unknown field `listen`"), "{e}");
        let e = parse(
            "[control]\nhostname = \"h.example\"\nstate-dir = \"s\"\nlisten-address = \"7443\"\n",
        )
        .unwrap_err();
        assert!(e.contains("control.listen-address"), "{e}");
        let e =
            parse("[control]\nhostname = \"https://h.example\"\nstate-dir = \"s\"\n").unwrap_err();
        assert!(e.contains("control.hostname"), "{e}");
        assert!(parse("").unwrap_err().contains("no [control] section"));
    }
}
