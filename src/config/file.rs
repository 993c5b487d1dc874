//! The raw file: serde shapes mirroring the TOML keys one to one, plus
//! reading a file with errors that point at a line and column.
//!
//! Reading happens in three passes so every error is precise:
//! 1. TOML syntax ([`toml::de::DeTable::parse`], spans kept);
//! 2. unknown keys, walked per level with the full key path and a
//!    "did you mean" suggestion;
//! 3. types, by deserializing into [`RawFile`] (which also denies unknown
//!    fields at every level, as a backstop).

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};

use super::ConfigError;

/// Declares one raw table: the derives and serde rules every level shares
/// (unknown keys denied, kebab-case keys, the table named in type errors).
macro_rules! raw_table {
    ($expecting:literal, $(#[$meta:meta])* $vis:vis struct $name:ident { $($body:tt)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, Deserialize, Serialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case", expecting = $expecting)]
        $vis struct $name { $($body)* }
    };
}

raw_table! {
    "a TOML document",
    /// The whole file. Both sections may be present; each command reads its
    /// own and checks only the shape of the other.
    pub(crate) struct RawFile {
        pub log_level: Option<String>,
        pub server: Option<RawServer>,
        pub client: Option<RawClient>,
        pub gate: Option<RawGate>,
    }
}

raw_table! {
    "a [server] table",
    /// `[server]`.
    pub(crate) struct RawServer {
        pub hostname: Option<String>,
        pub public_bind_address: Option<String>,
        pub tunnel_bind_address: Option<String>,
        pub readiness_bind_address: Option<String>,
        pub metrics_bind_address: Option<String>,
        pub control_socket: Option<PathBuf>,
        pub graceful_shutdown_duration: Option<String>,
        pub(crate) stream_write_timeout: Option<String>,
        pub(crate) stream_idle_timeout: Option<String>,
        pub congestion_control: Option<String>,
        pub cert_dir: Option<PathBuf>,
        pub acme: Option<RawAcme>,
        pub tunnels: Option<Vec<RawTunnel>>,
        /// `[server.relay]`: the mesh Relay Server on this host.
        pub relay: Option<RawRelay>,
    }
}

raw_table! {
    "a [server.relay] table",
    /// `[server.relay]`.
    pub(crate) struct RawRelay {
        pub listen: Option<String>,
        pub(crate) control_key: Option<String>,
        pub(crate) control_key_file: Option<PathBuf>,
    }
}

raw_table! {
    "an [acme] table",
    /// `[server.acme]` and `[client.acme]`.
    pub(crate) struct RawAcme {
        pub email: Option<String>,
        pub(crate) state_dir: Option<PathBuf>,
        pub directory_url: Option<String>,
        pub(crate) directory_ca_file: Option<PathBuf>,
    }
}

raw_table! {
    "a [[server.tunnels]] table",
    /// One `[[server.tunnels]]` entry.
    pub(crate) struct RawTunnel {
        pub public_hostnames: Option<Vec<String>>,
        pub(crate) client_identity: Option<String>,
        pub client_identities: Option<Vec<String>>,
    }
}

raw_table! {
    "a [client] table",
    /// `[client]`.
    pub(crate) struct RawClient {
        pub server_address: Option<String>,
        pub server_trust: Option<String>,
        pub(crate) server_ca_file: Option<PathBuf>,
        pub(crate) server_pin: Option<String>,
        pub identity_dir: Option<PathBuf>,
        pub public_cert_dir: Option<PathBuf>,
        pub readiness_bind_address: Option<String>,
        pub(crate) stream_write_timeout: Option<String>,
        pub(crate) stream_idle_timeout: Option<String>,
        pub metrics_bind_address: Option<String>,
        pub control_socket: Option<PathBuf>,
        pub congestion_control: Option<String>,
        pub acme: Option<RawAcme>,
        pub services: Option<Vec<RawService>>,
        /// `[client.smtp]`: mail for the gates of terminate Services.
        pub smtp: Option<RawSmtp>,
    }
}

raw_table! {
    "a [[client.services]] table",
    /// One `[[client.services]]` entry.
    pub(crate) struct RawService {
        pub public_hostnames: Option<Vec<String>>,
        pub backend_address: Option<String>,
        pub tls_mode: Option<String>,
        pub proxy_protocol: Option<String>,
        /// `[client.services.gate]`: Runegate in front of this (terminate)
        /// Service. Only [`SERVICE_GATE_KEYS`] are accepted here.
        pub gate: Option<RawGate>,
    }
}

raw_table! {
    "a [gate] table",
    /// `[gate]`: the standalone Runegate (`runewarp gate`).
    pub(crate) struct RawGate {
        pub(crate) listen_address: Option<String>,
        pub upstream: Option<String>,
        pub base_url: Option<String>,
        pub(crate) trusted_proxies: Option<Vec<String>>,
        pub(crate) allowed_emails: Option<Vec<String>>,
        pub(crate) allowed_domains: Option<Vec<String>>,
        pub(crate) link_ttl: Option<String>,
        pub(crate) session_ttl: Option<String>,
        pub(crate) session_idle: Option<String>,
        pub(crate) cookie_domain: Option<String>,
        pub(crate) state_dir: Option<PathBuf>,
        pub smtp: Option<RawSmtp>,
    }
}

raw_table! {
    "an [smtp] table",
    /// `[gate.smtp]`.
    pub(crate) struct RawSmtp {
        pub host: Option<String>,
        pub port: Option<String>,
        pub tls: Option<String>,
        pub(crate) username: Option<String>,
        pub(crate) password_file: Option<PathBuf>,
        pub from: Option<String>,
        pub(crate) ca_file: Option<PathBuf>,
    }
}

/// The keys a raw table accepts, as they are spelled in the file. They
/// come from the struct's own serde declaration, so the unknown-key pass
/// and the types cannot drift apart.
pub(crate) fn keys<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    let mut capture = KeyCapture(&[]);
    // The capture always "fails": it only records the field list.
    let _ = T::deserialize(&mut capture);
    capture.0
}

/// A deserializer that records the field names serde asks a struct for.
struct KeyCapture(&'static [&'static str]);

impl<'de> serde::Deserializer<'de> for &mut KeyCapture {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("not a table"))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0 = fields;
        self.deserialize_any(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// `[client.services.gate]`: the gate keys without the standalone-only
/// ones (the Service's backend is the upstream, the PROXY v2 source is the
/// Visitor, mail goes through `[client.smtp]`).
pub(crate) const SERVICE_GATE_KEYS: &[&str] = &[
    "base-url",
    "allowed-emails",
    "allowed-domains",
    "link-ttl",
    "session-ttl",
    "session-idle",
    "cookie-domain",
    "state-dir",
];

/// A file that was read and parsed.
#[derive(Debug, Clone)]
pub(crate) struct LoadedFile {
    /// Absolute path of the file.
    pub path: PathBuf,
    /// Its directory: the base for relative paths inside it.
    pub dir: PathBuf,
    pub raw: RawFile,
}

impl LoadedFile {
    /// How errors name the file.
    pub fn label(&self) -> String {
        self.path.display().to_string()
    }
}

/// Read and parse `path` (absolute). A missing file is an error naming it.
pub(crate) fn load(path: &Path) -> Result<LoadedFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ConfigError(format!("config file {} does not exist", path.display()))
        } else {
            ConfigError(format!("cannot read config file {}: {e}", path.display()))
        }
    })?;
    let raw = parse(&path.display().to_string(), &text)?;
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    Ok(LoadedFile {
        path: path.to_path_buf(),
        dir,
        raw,
    })
}

/// Parse file text; `label` names the file in errors.
pub(crate) fn parse(label: &str, text: &str) -> Result<RawFile, ConfigError> {
    let document = DeTable::parse(text).map_err(|e| located(label, text, &e))?;
    let mut unknown = Vec::new();
    check_table(document.get_ref(), &Level::top(), &mut unknown);
    if let Some(first) = unknown.into_iter().min_by_key(|u| u.span.start) {
        let (line, _) = line_col(text, first.span.start);
        let hint = first
            .suggestion
            .map(|s| format!("; did you mean \"{s}\"?"))
            .unwrap_or_default();
        return Err(ConfigError(format!(
            "{label}: unknown key \"{}\" in {} at line {line} ({}){hint}",
            first.key, first.place, first.path
        )));
    }
    toml::from_str::<RawFile>(text).map_err(|e| located(label, text, &e))
}

/// `file:line:col: message`, then the offending line and a caret.
fn located(label: &str, text: &str, error: &toml::de::Error) -> ConfigError {
    let message = error.message().trim_end();
    let Some(span) = error.span() else {
        return ConfigError(format!("{label}: {message}"));
    };
    let (line, col) = line_col(text, span.start);
    let line_text = text.lines().nth(line - 1).unwrap_or("");
    let caret = format!("{}^", " ".repeat(col - 1));
    ConfigError(format!(
        "{label}:{line}:{col}: {message}\n{line_text}\n{caret}"
    ))
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = before[line_start..].trim_end_matches('\r').chars().count() + 1;
    (line, col)
}

struct Unknown {
    key: String,
    path: String,
    place: String,
    span: Range<usize>,
    suggestion: Option<String>,
}

/// One level of the key tree.
struct Level {
    /// How the message names the level: "the top level", "[server]", ...
    place: String,
    /// Key path prefix: "", "server.", "server.tunnels[1]."
    prefix: String,
    known: &'static [&'static str],
    kind: LevelKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LevelKind {
    Top,
    Server,
    Client,
    Acme,
    Tunnel,
    Service,
    Gate,
    ServiceGate,
    Smtp,
    Relay,
}

impl Level {
    fn top() -> Self {
        Level {
            place: "the top level".to_string(),
            prefix: String::new(),
            known: keys::<RawFile>(),
            kind: LevelKind::Top,
        }
    }

    fn child(&self, key: &str) -> Option<Level> {
        let (place, known, kind) = match (self.kind, key) {
            (LevelKind::Top, "server") => ("[server]", keys::<RawServer>(), LevelKind::Server),
            (LevelKind::Top, "client") => ("[client]", keys::<RawClient>(), LevelKind::Client),
            (LevelKind::Server, "acme") => ("[server.acme]", keys::<RawAcme>(), LevelKind::Acme),
            (LevelKind::Server, "relay") => {
                ("[server.relay]", keys::<RawRelay>(), LevelKind::Relay)
            }
            (LevelKind::Client, "acme") => ("[client.acme]", keys::<RawAcme>(), LevelKind::Acme),
            (LevelKind::Top, "gate") => ("[gate]", keys::<RawGate>(), LevelKind::Gate),
            (LevelKind::Gate, "smtp") => ("[gate.smtp]", keys::<RawSmtp>(), LevelKind::Smtp),
            (LevelKind::Client, "smtp") => ("[client.smtp]", keys::<RawSmtp>(), LevelKind::Smtp),
            (LevelKind::Service, "gate") => (
                "[client.services.gate]",
                SERVICE_GATE_KEYS,
                LevelKind::ServiceGate,
            ),
            _ => return None,
        };
        Some(Level {
            place: place.to_string(),
            prefix: format!("{}{key}.", self.prefix),
            known,
            kind,
        })
    }

    fn item(&self, key: &str, index: usize) -> Option<Level> {
        let (place, known, kind) = match (self.kind, key) {
            (LevelKind::Server, "tunnels") => {
                ("[[server.tunnels]]", keys::<RawTunnel>(), LevelKind::Tunnel)
            }
            (LevelKind::Client, "services") => (
                "[[client.services]]",
                keys::<RawService>(),
                LevelKind::Service,
            ),
            _ => return None,
        };
        Some(Level {
            place: format!("{place} #{}", index + 1),
            prefix: format!("{}{key}[{index}].", self.prefix),
            known,
            kind,
        })
    }
}

fn check_table(table: &DeTable<'_>, level: &Level, out: &mut Vec<Unknown>) {
    for (key, value) in table.iter() {
        let name: &str = key.get_ref();
        if !level.known.contains(&name) {
            out.push(Unknown {
                key: name.to_string(),
                path: format!("{}{name}", level.prefix),
                place: level.place.clone(),
                span: key.span(),
                suggestion: suggest(name, level, is_table(value.get_ref())),
            });
            continue;
        }
        match value.get_ref() {
            DeValue::Table(inner) => {
                if let Some(child) = level.child(name) {
                    check_table(inner, &child, out);
                }
            }
            DeValue::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    if let (DeValue::Table(inner), Some(child)) =
                        (item.get_ref(), level.item(name, index))
                    {
                        check_table(inner, &child, out);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Whether a value is written as a table header (`[x]` or `[[x]]`).
fn is_table(value: &DeValue<'_>) -> bool {
    match value {
        DeValue::Table(_) => true,
        DeValue::Array(items) => {
            !items.is_empty()
                && items
                    .iter()
                    .all(|i| matches!(i.get_ref(), DeValue::Table(_)))
        }
        _ => false,
    }
}

/// A known key close to `unknown`: same ignoring case, a prefix either way,
/// or within edit distance 3. Among several, the closest kind of match
/// wins, then (for a table header) a table over a plain key, then the
/// smallest edit distance. A key that belongs in another section (at the
/// top level, or `[server]` and `[client]` mixed up) is pointed there.
fn suggest(unknown: &str, level: &Level, unknown_is_table: bool) -> Option<String> {
    let elsewhere: Vec<(&str, &[&str])> = match level.kind {
        LevelKind::Top => vec![
            ("server", keys::<RawServer>()),
            ("client", keys::<RawClient>()),
            ("gate", keys::<RawGate>()),
        ],
        LevelKind::Server => vec![("client", keys::<RawClient>())],
        LevelKind::Client => vec![("server", keys::<RawServer>())],
        _ => Vec::new(),
    };
    for (section, keys) in elsewhere {
        if keys.contains(&unknown) {
            return Some(format!("{section}.{unknown}"));
        }
    }
    let lower = unknown.to_ascii_lowercase().replace('_', "-");
    // (kind of match, table mismatch, edit distance): smaller is closer.
    let mut best: Option<((u8, bool, usize), &str)> = None;
    for &known in level.known {
        let distance = levenshtein(&lower, known);
        let kind = if lower == known {
            0
        } else if lower.len() >= 3 && (known.starts_with(&lower) || lower.starts_with(known)) {
            1
        } else if distance <= 3 {
            2
        } else {
            continue;
        };
        let known_is_table = level.child(known).is_some() || level.item(known, 0).is_some();
        let score = (kind, unknown_is_table != known_is_table, distance);
        if best.is_none_or(|(s, _)| score < s) {
            best = Some((score, known));
        }
    }
    best.map(|(_, k)| k.to_string())
}

/// Edit distance (insertions, deletions, substitutions) over characters.
pub(crate) fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levenshtein_basics() {
        assert_eq!(levenshtein("", ""), 0);
        assert_eq!(levenshtein("abc", ""), 3);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("public-hostname", "public-hostnames"), 1);
    }

    #[test]
    fn line_col_is_one_based() {
        let text = "a = 1\nbb = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, 9), (2, 4));
    }

    #[test]
    fn every_known_key_deserializes() {
        let text = r#"
log-level = "info"
[server]
hostname = "a"
public-bind-address = "a"
tunnel-bind-address = "a"
readiness-bind-address = "a"
metrics-bind-address = "a"
control-socket = "a"
graceful-shutdown-duration = "a"
stream-write-timeout = "a"
stream-idle-timeout = "a"
congestion-control = "a"
cert-dir = "a"
[server.acme]
email = "a"
state-dir = "a"
directory-url = "a"
directory-ca-file = "a"
[server.relay]
listen = "a"
control-key = "a"
control-key-file = "a"
[[server.tunnels]]
public-hostnames = ["a"]
client-identity = "a"
client-identities = ["a"]
[client]
server-address = "a"
server-trust = "a"
server-ca-file = "a"
server-pin = "a"
identity-dir = "a"
public-cert-dir = "a"
stream-write-timeout = "a"
stream-idle-timeout = "a"
metrics-bind-address = "a"
control-socket = "a"
congestion-control = "a"
[client.acme]
email = "a"
[[client.services]]
public-hostnames = ["a"]
backend-address = "a"
tls-mode = "a"
proxy-protocol = "a"
[client.services.gate]
base-url = "a"
[client.smtp]
host = "a"
[gate]
listen-address = "a"
upstream = "a"
base-url = "a"
trusted-proxies = ["a"]
allowed-emails = ["a"]
allowed-domains = ["a"]
link-ttl = "a"
session-ttl = "a"
session-idle = "a"
cookie-domain = "a"
state-dir = "a"
[gate.smtp]
host = "a"
port = "a"
tls = "a"
username = "a"
password-file = "a"
from = "a"
ca-file = "a"
"#;
        let raw = parse("t.toml", text).map_err(|e| e.0);
        assert!(raw.is_ok(), "{raw:?}");
        let mentioned =
            |k: &&str| text.contains(&format!("\n{k} =")) || text.contains(&format!(".{k}]"));
        for keys in [
            keys::<RawFile>(),
            keys::<RawServer>(),
            keys::<RawAcme>(),
            keys::<RawTunnel>(),
            keys::<RawRelay>(),
            keys::<RawClient>(),
            keys::<RawService>(),
            SERVICE_GATE_KEYS,
            keys::<RawGate>(),
            keys::<RawSmtp>(),
        ] {
            for k in keys {
                assert!(
                    mentioned(k)
                        || [
                            "server", "client", "gate", "tunnels", "services", "smtp", "relay"
                        ]
                        .contains(k),
                    "{k} not covered"
                );
            }
        }
    }
}
