//! `runewarp control`'s config file: a `[control]` table.
//!
//! ```toml
//! [control]
//! listen-address = "0.0.0.0:7443"
//! hostname = "control.example.com"
//! state-dir = "/var/lib/runewarp/control"
//! # consumer-domains = ["gmail.com", "outlook.com"]  # replaces the default list
//! # database = "sqlite"                              # the default: state-dir/control.db
//! # database-url-file = "/run/credentials/runewarp-control.service/db-url"
//! # database-url = "postgresql://runewarp@db.internal/runewarp"  # no password here
//! admins = ["alice@acme.com", "group:it-admins"]    # emails or IdP groups
//! key-expiry = "180d"                               # device keys live this long per login
//!
//! [control.oidc]                                    # SSO sign-in (optional)
//! issuer = "https://accounts.google.com"
//! client-id = "1234.apps.googleusercontent.com"
//! client-secret-file = "/run/credentials/runewarp-control/oidc-secret"
//! # ca-file = "idp-ca.pem"                          # extra roots for the IdP
//! # scopes = ["openid", "email", "profile", "groups"]
//!
//! [[control.relays]]                                # relays devices may use (optional)
//! name = "eu-1"
//! address = "relay.example.com:3478"                # its [server.relay] listen (UDP)
//! # tcp-address = "relay.example.com:443"         # its Server's public listener (TCP fallback)
//! ```
//!
//! A PostgreSQL URL with a password belongs in `database-url-file` (read at
//! start, never logged), so the password never sits in this file.
//!
//! Relative paths resolve against the file's directory; every error names
//! the file and the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    database: Option<String>,
    database_url: Option<String>,
    database_url_file: Option<PathBuf>,
    admins: Option<Vec<String>>,
    key_expiry: Option<String>,
    oidc: Option<RawOidc>,
    relays: Option<Vec<RawRelay>>,
}

/// One `[[control.relays]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawRelay {
    name: Option<String>,
    address: Option<String>,
    tcp_address: Option<String>,
}

/// A relay the control server hands its devices (`[[control.relays]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayEntry {
    /// `name`: how logs and `node status` call it.
    pub name: String,
    /// `address`: the relay's UDP `HOST:PORT` (its `[server.relay]` listen).
    pub address: String,
    /// `tcp-address`: the TCP fallback's `HOST:PORT` (the relay host's
    /// tunnel Server public listener), if any.
    pub tcp_address: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawOidc {
    issuer: Option<String>,
    client_id: Option<String>,
    client_secret_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    scopes: Option<Vec<String>>,
}

/// How long a device key stays valid after a login, by default.
pub const DEFAULT_KEY_EXPIRY: Duration = Duration::from_secs(180 * 24 * 3600);
/// Scopes asked for by default (`openid` is always included).
pub const DEFAULT_SCOPES: &[&str] = &["openid", "email", "profile"];

/// The OpenID Connect relying-party settings (`[control.oidc]`).
#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// The issuer URL, exactly as the IdP's discovery document names it.
    pub issuer: String,
    pub client_id: String,
    /// Where the client secret is read from at start (never in the TOML).
    pub client_secret_file: PathBuf,
    /// Extra roots trusted for the IdP (besides the public web roots).
    pub ca_file: Option<PathBuf>,
    pub scopes: Vec<String>,
}

/// Who is an admin: an email, or every member of an IdP group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admin {
    Email(String),
    Group(String),
}

/// Whether secret files named in the config are read while validating it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SecretFiles {
    /// At start: a missing file is an error.
    Read,
    /// `config check`: checked when readable, else accepted unread.
    ReadIfPresent,
}

/// Where the control plane keeps its state.
#[derive(Debug, Clone)]
pub enum Database {
    /// `control.db` in the state dir.
    Sqlite,
    /// A PostgreSQL database shared by every replica.
    Postgres(PostgresUrl),
}

/// A validated PostgreSQL connection string. `Debug` and [`summary`]
/// (Self::summary) never show the password.
#[derive(Clone)]
pub struct PostgresUrl {
    config: Box<postgres::Config>,
    summary: String,
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgresUrl({})", self.summary)
    }
}

impl PostgresUrl {
    /// Parse a `postgresql://` URL or a `key=value` connection string.
    /// The error never repeats the input (it may hold a password).
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: postgres::Config = text.trim().parse().map_err(|e| {
            format!("not a PostgreSQL connection string (postgresql://USER@HOST[:PORT]/DB or key=value pairs): {e}")
        })?;
        if config.get_hosts().is_empty() {
            return Err("the connection string names no host (a host name, an address or a unix socket directory)".into());
        }
        let Some(dbname) = config.get_dbname() else {
            return Err("the connection string names no database".into());
        };
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                postgres::config::Host::Tcp(h) => h.clone(),
                postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = config.get_ports().iter().map(|p| p.to_string()).collect();
        // USER@HOST:PORT/DB: one token in a key=value log line.
        let summary = format!(
            "{}@{}:{}/{dbname}",
            config.get_user().unwrap_or("-"),
            hosts.join(","),
            if ports.is_empty() {
                "5432".to_string()
            } else {
                ports.join(",")
            },
        );
        Ok(Self {
            config: Box::new(config),
            summary,
        })
    }

    /// Host, port, database and user: safe to log.
    pub fn summary(&self) -> &str {
        &self.summary
    }

    /// A placeholder for a connection string in a file not readable here
    /// (`config check` away from the running unit); never connected to.
    fn unread(path: &Path) -> Self {
        Self {
            config: Box::new(postgres::Config::new()),
            summary: format!("read from {} at start", path.display()),
        }
    }

    pub fn has_password(&self) -> bool {
        self.config.get_password().is_some()
    }

    pub fn config(&self) -> &postgres::Config {
        &self.config
    }
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
    pub database: Database,
    /// `admins`: emails and `group:NAME` entries.
    pub admins: Vec<Admin>,
    /// How long a device key stays valid after its login.
    pub key_expiry: Duration,
    /// SSO sign-in, if configured.
    pub oidc: Option<OidcConfig>,
    /// `[[control.relays]]`: the relays devices may use, in file order.
    pub relays: Vec<RelayEntry>,
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
        Self::parse_with(label, dir, text, SecretFiles::Read)
    }

    /// `config check`: like [`load`](Self::load), but a secret file that
    /// cannot be read here (a credential that exists only in the running
    /// unit, as at a build-time check) is accepted unread.
    pub fn load_for_check(path: &Path) -> Result<Self, ControlConfigError> {
        let label = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ControlConfigError(format!("{label}: cannot read: {e}")))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse_with(&label, dir, &text, SecretFiles::ReadIfPresent)
    }

    fn parse_with(
        label: &str,
        dir: &Path,
        text: &str,
        secrets: SecretFiles,
    ) -> Result<Self, ControlConfigError> {
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
        let database = database(
            dir,
            c.database,
            c.database_url,
            c.database_url_file,
            secrets,
        )
        .map_err(err)?;
        let admins = c
            .admins
            .unwrap_or_default()
            .into_iter()
            .map(|a| parse_admin(&a).map_err(err))
            .collect::<Result<Vec<_>, _>>()?;
        let key_expiry = match c.key_expiry {
            None => DEFAULT_KEY_EXPIRY,
            Some(text) => {
                // Days too: key lifetimes are counted in them.
                let days = text
                    .strip_suffix('d')
                    .and_then(|n| n.trim().parse::<u64>().ok());
                let d = match days {
                    Some(n) => Duration::from_secs(n.saturating_mul(86_400)),
                    None => crate::config::parse_duration(&text).map_err(|e| {
                        err(format!(
                            "control.key-expiry = {text:?}: {e} (or days, such as \"180d\")"
                        ))
                    })?,
                };
                if d < Duration::from_secs(1) {
                    return Err(err(format!(
                        "control.key-expiry = {text:?}: must be at least 1s"
                    )));
                }
                d
            }
        };
        let oidc = c
            .oidc
            .map(|o| parse_oidc(dir, o).map_err(err))
            .transpose()?;
        let relays = relays(c.relays.unwrap_or_default()).map_err(err)?;
        Ok(Self {
            relays,
            log_level: raw.log_level.unwrap_or(LogLevel::Info),
            listen_address,
            hostname,
            state_dir,
            consumer_domains,
            database,
            admins,
            key_expiry,
            oidc,
        })
    }

    /// The engine and where, for the start-up log line (no password).
    pub fn database_summary(&self) -> (&'static str, String) {
        match &self.database {
            Database::Sqlite => (
                "sqlite",
                self.state_dir
                    .join(super::store::DB_FILE)
                    .display()
                    .to_string(),
            ),
            Database::Postgres(url) => ("postgres", url.summary().to_string()),
        }
    }

    /// Whether a user with `email` and IdP `groups` is an admin.
    pub fn is_admin(&self, email: &str, groups: &[String]) -> bool {
        self.admins.iter().any(|a| match a {
            Admin::Email(e) => e.eq_ignore_ascii_case(email.trim()),
            Admin::Group(g) => groups.iter().any(|x| x == g),
        })
    }

    /// The API's public origin (`https://HOSTNAME[:PORT]`), which login
    /// URLs and the OIDC redirect URI use.
    pub fn public_origin(&self) -> String {
        match self.listen_address.port() {
            443 => format!("https://{}", self.hostname),
            port => format!("https://{}:{port}", self.hostname),
        }
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

/// `HOST:PORT` with a port: an IP literal or a DNS name.
fn host_port(text: &str) -> bool {
    if text.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0) {
        return true;
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return false;
    };
    port.parse::<u16>().is_ok_and(|p| p != 0) && ServerHostname::parse(host).is_ok()
}

/// `[[control.relays]]`.
fn relays(raw: Vec<RawRelay>) -> Result<Vec<RelayEntry>, String> {
    let mut out: Vec<RelayEntry> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let key = format!("control.relays[{i}]");
        let name = r.name.unwrap_or_default();
        if !crate::mesh_protocol::valid_hostname(&name) {
            return Err(format!(
                "{key}.name = {name:?}: required; lowercase letters, digits and '-', such as \"eu-1\""
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(format!("{key}.name = {name:?}: listed twice"));
        }
        let Some(address) = r.address else {
            return Err(format!(
                "{key}.address is required: the relay's UDP HOST:PORT (its [server.relay] listen), such as \"relay.example.com:3478\""
            ));
        };
        if !host_port(&address) {
            return Err(format!(
                "{key}.address = {address:?}: expected HOST:PORT, such as \"relay.example.com:3478\""
            ));
        }
        if let Some(t) = &r.tcp_address
            && !host_port(t)
        {
            return Err(format!(
                "{key}.tcp-address = {t:?}: expected HOST:PORT, such as \"relay.example.com:443\""
            ));
        }
        out.push(RelayEntry {
            name,
            address,
            tcp_address: r.tcp_address,
        });
    }
    Ok(out)
}

/// `database`, `database-url` and `database-url-file` together.
fn database(
    dir: &Path,
    engine: Option<String>,
    url: Option<String>,
    url_file: Option<PathBuf>,
    secrets: SecretFiles,
) -> Result<Database, String> {
    let url = match (url, url_file) {
        (Some(_), Some(_)) => {
            return Err(
                "control.database-url and control.database-url-file: set one, not both".into(),
            );
        }
        (Some(u), None) => {
            let parsed =
                PostgresUrl::parse(&u).map_err(|e| format!("control.database-url: {e}"))?;
            if parsed.has_password() {
                return Err("control.database-url holds a password: put the URL in a file readable only by the service and name it in control.database-url-file".into());
            }
            Some(parsed)
        }
        (None, Some(f)) => {
            let path = dir.join(f);
            match std::fs::read_to_string(&path) {
                Err(_) if secrets == SecretFiles::ReadIfPresent => Some(PostgresUrl::unread(&path)),
                read => {
                    let text = read.map_err(|e| {
                        format!(
                            "control.database-url-file = {:?}: cannot read: {e}",
                            path.display().to_string()
                        )
                    })?;
                    Some(PostgresUrl::parse(&text).map_err(|e| {
                        format!(
                            "control.database-url-file = {:?}: {e}",
                            path.display().to_string()
                        )
                    })?)
                }
            }
        }
        (None, None) => None,
    };
    match (engine.as_deref(), url) {
        (None | Some("sqlite"), None) => Ok(Database::Sqlite),
        (None | Some("postgres" | "postgresql"), Some(u)) => Ok(Database::Postgres(u)),
        (Some("postgres" | "postgresql"), None) => Err(
            "control.database = \"postgres\" needs control.database-url-file (or a database-url without a password)".into(),
        ),
        (Some("sqlite"), Some(_)) => Err(
            "control.database = \"sqlite\" takes no database-url; remove it or set database = \"postgres\"".into(),
        ),
        (Some(other), _) => Err(format!(
            "control.database = {other:?}: expected \"sqlite\" or \"postgres\""
        )),
    }
}

/// One `admins` entry: an email or `group:NAME`.
fn parse_admin(text: &str) -> Result<Admin, String> {
    let t = text.trim();
    if let Some(g) = t.strip_prefix("group:") {
        if g.is_empty() || g.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "control.admins: {text:?}: a group is \"group:NAME\" with a non-empty NAME"
            ));
        }
        return Ok(Admin::Group(g.to_string()));
    }
    match t.rsplit_once('@') {
        Some((local, domain)) if !local.is_empty() && domain.contains('.') && !t.contains(' ') => {
            Ok(Admin::Email(t.to_ascii_lowercase()))
        }
        _ => Err(format!(
            "control.admins: {text:?} is neither an email such as \"alice@acme.com\" nor \"group:NAME\""
        )),
    }
}

fn parse_oidc(dir: &Path, o: RawOidc) -> Result<OidcConfig, String> {
    let Some(issuer) = o.issuer else {
        return Err(
            "control.oidc.issuer is required, such as \"https://accounts.google.com\"".into(),
        );
    };
    // Plain http only to this machine (a test or a local IdP): the ID
    // token's keys and the code exchange must not cross a network in clear.
    let issuer_ok = match hyper::Uri::try_from(issuer.as_str()) {
        Ok(u) => {
            let loopback = u.host().is_some_and(|h| {
                h == "localhost"
                    || h.trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            });
            let scheme_ok = match u.scheme_str() {
                Some("https") => true,
                Some("http") => loopback,
                _ => false,
            };
            scheme_ok && u.host().is_some_and(|h| !h.is_empty()) && u.query().is_none()
        }
        Err(_) => false,
    };
    if !issuer_ok {
        return Err(format!(
            "control.oidc.issuer = {issuer:?}: expected an https:// URL without a query (http:// only on loopback)"
        ));
    }
    let Some(client_id) = o.client_id.filter(|c| !c.trim().is_empty()) else {
        return Err("control.oidc.client-id is required (from the IdP's app registration)".into());
    };
    let Some(secret) = o.client_secret_file else {
        return Err("control.oidc.client-secret-file is required: a file holding the client secret (the secret never goes in this file)".into());
    };
    let client_secret_file = dir.join(secret);
    let ca_file = o.ca_file.map(|p| dir.join(p));
    let scopes = match o.scopes {
        None => DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect(),
        Some(list) => {
            for s in &list {
                if s.is_empty()
                    || s.chars()
                        .any(|c| c.is_whitespace() || c == '"' || c == '\\')
                {
                    return Err(format!("control.oidc.scopes: {s:?} is not a scope"));
                }
            }
            if !list.iter().any(|s| s == "openid") || !list.iter().any(|s| s == "email") {
                return Err(
                    "control.oidc.scopes must include \"openid\" and \"email\" (organisations come from the verified email)".into(),
                );
            }
            list
        }
    };
    Ok(OidcConfig {
        issuer,
        client_id,
        client_secret_file,
        ca_file,
        scopes,
    })
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
        assert!(matches!(c.database, Database::Sqlite));
    }

    #[test]
    fn the_database_is_sqlite_or_a_postgres_url_kept_out_of_logs() {
        const BASE: &str = "[control]\nhostname = \"h.example\"\nstate-dir = \"s\"\n";
        let with = |extra: &str| parse(&format!("{BASE}{extra}"));
        assert!(matches!(
            with("database = \"sqlite\"\n").unwrap().database,
            Database::Sqlite
        ));
        let c = with("database-url = \"postgresql://rw@db.internal:5433/runewarp\"\n").unwrap();
        let Database::Postgres(u) = &c.database else {
            panic!("expected postgres");
        };
        assert_eq!(u.summary(), "rw@db.internal:5433/runewarp");
        assert_eq!(c.database_summary().0, "postgres");
        let e = with("database-url = \"postgresql://rw:hunter2@db/runewarp\"\n").unwrap_err();
        assert!(e.contains("database-url-file"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = with("database = \"postgres\"\n").unwrap_err();
        assert!(e.contains("needs control.database-url-file"), "{e}");
        let e = with("database = \"mysql\"\n").unwrap_err();
        assert!(e.contains("expected \"sqlite\" or \"postgres\""), "{e}");
        let e =
            with("database = \"sqlite\"\ndatabase-url = \"postgresql://rw@db/x\"\n").unwrap_err();
        assert!(e.contains("takes no database-url"), "{e}");
        let e = with("database-url = \"postgresql://rw@db\"\n").unwrap_err();
        assert!(e.contains("names no database"), "{e}");
        let e = with("database-url = \"a\"\ndatabase-url-file = \"f\"\n").unwrap_err();
        assert!(e.contains("not both"), "{e}");

        // The file form: a password is fine there, and never shown.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("db-url");
        std::fs::write(&file, "postgresql://rw:hunter2@127.0.0.1/runewarp\n").unwrap();
        let text = format!(
            "{BASE}database-url-file = {:?}\n",
            file.display().to_string()
        );
        let c = parse(&text).unwrap();
        let Database::Postgres(u) = &c.database else {
            panic!("expected postgres");
        };
        assert!(u.has_password());
        assert!(!format!("{:?} {}", c, u.summary()).contains("hunter2"));
        std::fs::write(&file, "postgresql://rw:hunter2@[::1/x\n").unwrap();
        let e = parse(&text).unwrap_err();
        assert!(e.contains("not a PostgreSQL connection string"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = with("database-url-file = \"/nonexistent/db-url\"\n").unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
    }

    #[test]
    fn oidc_admins_and_key_expiry_are_validated() {
        let base = "[control]\nhostname = \"h.example\"\nstate-dir = \"s\"\n";
        let c = parse(base).unwrap();
        assert!(c.oidc.is_none());
        assert_eq!(c.key_expiry, DEFAULT_KEY_EXPIRY);
        let c = parse(&format!(
            "{base}admins = [\"Alice@Acme.com\", \"group:ops\"]\nkey-expiry = \"30d\"\n\
             [control.oidc]\nissuer = \"https://idp.example\"\nclient-id = \"rw\"\n\
             client-secret-file = \"secret\"\nca-file = \"ca.pem\"\n"
        ))
        .unwrap();
        let o = c.oidc.as_ref().unwrap();
        assert_eq!(o.client_secret_file, Path::new("/etc/rw/secret"));
        assert_eq!(o.ca_file.as_deref(), Some(Path::new("/etc/rw/ca.pem")));
        assert_eq!(o.scopes, ["openid", "email", "profile"]);
        assert_eq!(c.key_expiry, Duration::from_secs(30 * 86400));
        assert!(c.is_admin("alice@acme.com", &[]));
        assert!(c.is_admin("bob@acme.com", &["ops".into()]));
        assert!(!c.is_admin("bob@acme.com", &["eng".into()]));
        assert_eq!(c.public_origin(), "https://h.example:7443");
        let bad = |extra: &str| parse(&format!("{base}{extra}")).unwrap_err();
        assert!(bad("admins = [\"alice\"]\n").contains("control.admins"));
        assert!(bad("admins = [\"group:\"]\n").contains("group:NAME"));
        assert!(bad("key-expiry = \"soon\"\n").contains("control.key-expiry"));
        let oidc = "[control.oidc]\nissuer = \"https://idp.example\"\nclient-id = \"rw\"\n";
        assert!(bad(oidc).contains("client-secret-file is required"));
        assert!(
            bad(&format!("{oidc}client-secret = \"x\"\n"))
                .contains("unknown field `client-secret`")
        );
        assert!(
            bad("[control.oidc]\nissuer = \"idp.example\"\nclient-id = \"x\"\nclient-secret-file = \"f\"\n")
                .contains("control.oidc.issuer")
        );
        let issuer = |i: &str| {
            parse(&format!(
                "{base}[control.oidc]\nissuer = \"{i}\"\nclient-id = \"x\"\nclient-secret-file = \"f\"\n"
            ))
        };
        assert!(issuer("http://127.0.0.1:9000").is_ok());
        assert!(issuer("http://localhost:9000/realms/a").is_ok());
        assert!(
            issuer("http://idp.example")
                .unwrap_err()
                .contains("only on loopback")
        );
        assert!(issuer("https://idp.example/?x=1").is_err());
        assert!(
            bad("[control.oidc]\nissuer = \"https://i.example\"\nclient-secret-file = \"f\"\n")
                .contains("client-id is required")
        );
        assert!(
            bad(&format!(
                "{oidc}client-secret-file = \"f\"\nscopes = [\"openid\"]\n"
            ))
            .contains("must include")
        );
    }

    #[test]
    fn relays_are_validated() {
        let base = "[control]\nhostname = \"h.example\"\nstate-dir = \"s\"\n";
        assert!(parse(base).unwrap().relays.is_empty());
        let c = parse(&format!(
            "{base}[[control.relays]]\nname = \"eu-1\"\naddress = \"relay.example.com:3478\"\n\
             tcp-address = \"192.0.2.1:443\"\n"
        ))
        .unwrap();
        assert_eq!(c.relays[0].name, "eu-1");
        assert_eq!(c.relays[0].tcp_address.as_deref(), Some("192.0.2.1:443"));
        let err = |extra: &str| parse(&format!("{base}{extra}")).unwrap_err();
        assert!(
            err("[[control.relays]]\naddress = \"192.0.2.1:3478\"\n")
                .contains("control.relays[0].name")
        );
        assert!(
            err("[[control.relays]]\nname = \"a\"\n")
                .contains("control.relays[0].address is required")
        );
        assert!(
            err("[[control.relays]]\nname = \"a\"\naddress = \"192.0.2.1\"\n")
                .contains("HOST:PORT")
        );
        assert!(err("[[control.relays]]\nname = \"a\"\naddress = \"192.0.2.1:1\"\n[[control.relays]]\nname = \"a\"\naddress = \"192.0.2.1:1\"\n").contains("listed twice"));
    }
}
