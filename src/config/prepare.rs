//! Step 1, **prepare**: pick the config file, apply CLI and environment
//! overlays, fill XDG and hardcoded defaults, and resolve config-relative
//! paths. The output still holds raw strings; `super::validate` turns it
//! into the typed config. Nothing here touches the filesystem apart from
//! reading the config file.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use super::file::{self, LoadedFile, RawAcme, RawRelay, RawService, RawTunnel};
use super::types::{CongestionControl, LETS_ENCRYPT_DIRECTORY};
use super::{ClientOverlay, ConfigError, Environment, MaterialDefaults, ServerOverlay};

/// The environment variable that overrides `server.hostname`.
pub(crate) const SERVER_HOSTNAME_ENV: &str = "RUNEWARP_SERVER_HOSTNAME";

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A key in a config file: `(file label, key path)`.
    File(String, String),
    /// A command-line flag such as `--hostname`.
    Flag(&'static str),
    /// An environment variable.
    Env(&'static str),
    /// A built-in default for a key path.
    Default(&'static str),
}

impl Origin {
    /// `<where> "<value>": <reason>`, the one-line shape of every value error.
    pub fn invalid(&self, value: &str, reason: impl fmt::Display) -> ConfigError {
        ConfigError(match self {
            Origin::File(file, key) => format!("{file}: {key} = {value:?}: {reason}"),
            Origin::Flag(flag) => format!("{flag} {value:?}: {reason}"),
            Origin::Env(var) => format!("{var}={value:?}: {reason}"),
            Origin::Default(key) => format!("default {key} = {value:?}: {reason}"),
        })
    }
}

/// A value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Val<T> {
    pub value: T,
    pub(crate) origin: Origin,
}

impl<T> Val<T> {
    fn new(value: T, origin: Origin) -> Self {
        Val { value, origin }
    }
}

/// The XDG base directories as the config seam uses them. Values that are
/// not absolute are ignored, as the XDG spec asks; so is a relative HOME.
#[derive(Debug, Clone)]
pub(crate) struct Xdg {
    home: Option<PathBuf>,
    config_home: Option<PathBuf>,
    data_home: Option<PathBuf>,
    state_home: Option<PathBuf>,
    runtime_dir: Option<PathBuf>,
}

impl Xdg {
    pub fn from_env(env: &Environment) -> Self {
        let absolute = |key: &str| env.get(key).map(PathBuf::from).filter(|p| p.is_absolute());
        Xdg {
            home: absolute("HOME"),
            config_home: absolute("XDG_CONFIG_HOME"),
            data_home: absolute("XDG_DATA_HOME"),
            state_home: absolute("XDG_STATE_HOME"),
            runtime_dir: absolute("XDG_RUNTIME_DIR"),
        }
    }

    fn base(
        &self,
        explicit: &Option<PathBuf>,
        var: &str,
        home_rel: &str,
        what: &str,
    ) -> Result<PathBuf, ConfigError> {
        if let Some(dir) = explicit {
            return Ok(dir.clone());
        }
        match &self.home {
            Some(home) => Ok(home.join(home_rel)),
            None => Err(ConfigError(format!(
                "cannot default {what}: neither {var} nor HOME is set to an absolute path; set one of them or set {what} explicitly"
            ))),
        }
    }

    /// `$XDG_CONFIG_HOME/runewarp/config.toml` (or under `~/.config`).
    pub(crate) fn config_file(&self) -> Option<PathBuf> {
        let base = self
            .config_home
            .clone()
            .or_else(|| self.home.as_ref().map(|h| h.join(".config")))?;
        Some(base.join("runewarp").join("config.toml"))
    }

    /// `$XDG_DATA_HOME/runewarp/<sub>` (or under `~/.local/share`).
    pub fn data(&self, sub: &str, what: &str) -> Result<PathBuf, ConfigError> {
        let base = self.base(&self.data_home, "XDG_DATA_HOME", ".local/share", what)?;
        Ok(base.join("runewarp").join(sub))
    }

    /// `$XDG_STATE_HOME/runewarp/<sub>` (or under `~/.local/state`).
    pub fn state(&self, sub: &str, what: &str) -> Result<PathBuf, ConfigError> {
        let base = self.base(&self.state_home, "XDG_STATE_HOME", ".local/state", what)?;
        Ok(base.join("runewarp").join(sub))
    }
}

/// The default control socket of `role`: `$XDG_RUNTIME_DIR/runewarp/<role>.sock`,
/// else `$XDG_STATE_HOME/runewarp/<role>.sock` (or under `~/.local/state`);
/// `None` (no control socket) when none of these is set.
pub(crate) fn default_control_socket(xdg: &Xdg, role: &str) -> Option<PathBuf> {
    let name = format!("{role}.sock");
    match &xdg.runtime_dir {
        Some(dir) => Some(dir.join("runewarp").join(name)),
        None => xdg.state(&name, "control-socket").ok(),
    }
}

/// Make `path` absolute against the current directory (for CLI paths).
pub(crate) fn absolute_from_cwd(path: &Path) -> Result<PathBuf, ConfigError> {
    if path.is_absolute() {
        return Ok(clean(path));
    }
    let cwd = std::env::current_dir().map_err(|e| {
        ConfigError(format!(
            "cannot resolve {}: current directory unavailable: {e}",
            path.display()
        ))
    })?;
    Ok(clean(&cwd.join(path)))
}

/// Drop `.` components (lexically; `..` is kept, symlinks are not resolved).
fn clean(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// Which file a command reads.
pub(crate) enum Located {
    Found(Box<LoadedFile>),
    /// Discovery found nothing; the path it looked at, if it could form one.
    Missing(Option<PathBuf>),
}

/// `--config PATH` (must exist), else the discovered file (may be missing).
pub(crate) fn locate(explicit: Option<&Path>, xdg: &Xdg) -> Result<Located, ConfigError> {
    if let Some(path) = explicit {
        let path = absolute_from_cwd(path)?;
        return file::load(&path).map(|f| Located::Found(Box::new(f)));
    }
    match xdg.config_file() {
        Some(path) if path.exists() => file::load(&path).map(|f| Located::Found(Box::new(f))),
        other => Ok(Located::Missing(other)),
    }
}

fn no_config_file(looked_at: &Option<PathBuf>) -> ConfigError {
    match looked_at {
        Some(path) => ConfigError(format!(
            "no config file: looked at {}; pass --config",
            path.display()
        )),
        None => ConfigError(
            "no config file: neither XDG_CONFIG_HOME nor HOME is set to an absolute path; pass --config".to_string(),
        ),
    }
}

/// Paths written in a file, resolved against its directory.
struct PathResolver<'a> {
    file: &'a LoadedFile,
}

impl PathResolver<'_> {
    fn resolve(&self, key: &str, path: &Option<PathBuf>) -> Result<Option<PathBuf>, ConfigError> {
        let Some(path) = path else { return Ok(None) };
        if path.as_os_str().is_empty() {
            return Err(Origin::File(self.file.label(), key.to_string())
                .invalid("", "must not be empty; omit the key to use the default"));
        }
        Ok(Some(clean(&self.file.dir.join(path))))
    }
}

/// A prepared `[server.acme]` / `[client.acme]`: paths resolved, defaults in.
#[derive(Debug, Clone)]
pub(crate) struct PreparedAcme {
    /// `server.acme` or `client.acme`.
    pub section: &'static str,
    pub email: Option<String>,
    pub(crate) state_dir: PathBuf,
    pub directory_url: String,
    pub(crate) directory_ca_file: Option<PathBuf>,
}

fn prepare_acme(
    section: &'static str,
    raw: &RawAcme,
    resolver: &PathResolver<'_>,
    xdg: &Xdg,
    role: &str,
) -> Result<PreparedAcme, ConfigError> {
    let state_dir = match resolver.resolve(&format!("{section}.state-dir"), &raw.state_dir)? {
        Some(dir) => dir,
        None => xdg.state(&format!("{role}/acme"), &format!("{section}.state-dir"))?,
    };
    Ok(PreparedAcme {
        section,
        email: raw.email.clone(),
        state_dir,
        directory_url: raw
            .directory_url
            .clone()
            .unwrap_or_else(|| LETS_ENCRYPT_DIRECTORY.to_string()),
        directory_ca_file: resolver.resolve(
            &format!("{section}.directory-ca-file"),
            &raw.directory_ca_file,
        )?,
    })
}

/// The Server config after step 1.
#[derive(Debug, Clone)]
pub(crate) struct PreparedServer {
    pub source: Option<PathBuf>,
    /// The file as errors name it.
    pub label: String,
    pub log_level: Val<String>,
    pub hostname: Option<Val<String>>,
    pub public_bind_address: Val<String>,
    pub tunnel_bind_address: Val<String>,
    pub readiness_bind_address: Option<Val<String>>,
    pub metrics_bind_address: Option<Val<String>>,
    pub control_socket: Option<PathBuf>,
    pub graceful_shutdown_duration: Val<String>,
    pub(crate) stream_write_timeout: Val<String>,
    pub(crate) stream_idle_timeout: Val<String>,
    pub congestion_control: Val<String>,
    /// Filled with the default when neither this nor `acme` is set.
    pub cert_dir: Option<PathBuf>,
    pub acme: Option<PreparedAcme>,
    pub tunnels: Vec<RawTunnel>,
    /// `[server.relay]`, `control-key-file` resolved.
    pub relay: Option<RawRelay>,
}

/// `stream-write-timeout` default, as written in a file.
const DEFAULT_STREAM_WRITE_TIMEOUT: &str = "30s";
/// `stream-idle-timeout` default, as written in a file.
const DEFAULT_STREAM_IDLE_TIMEOUT: &str = "15m";

fn file_or_default(
    label: &str,
    key: &'static str,
    value: &Option<String>,
    default: &str,
) -> Val<String> {
    match value {
        Some(v) => Val::new(v.clone(), Origin::File(label.to_string(), key.to_string())),
        None => Val::new(default.to_string(), Origin::Default(key)),
    }
}

fn file_val(label: &str, key: &str, value: &Option<String>) -> Option<Val<String>> {
    value
        .as_ref()
        .map(|v| Val::new(v.clone(), Origin::File(label.to_string(), key.to_string())))
}

/// `--hostname` > `RUNEWARP_SERVER_HOSTNAME` > `server.hostname`.
fn server_hostname(
    flag: Option<&str>,
    env: &Environment,
    label: &str,
    file_value: &Option<String>,
) -> Option<Val<String>> {
    if let Some(h) = flag {
        return Some(Val::new(h.to_string(), Origin::Flag("--hostname")));
    }
    if let Some(h) = env.get(SERVER_HOSTNAME_ENV) {
        return Some(Val::new(h.to_string(), Origin::Env(SERVER_HOSTNAME_ENV)));
    }
    file_val(label, "server.hostname", file_value)
}

pub(crate) fn prepare_server(
    overlay: &ServerOverlay,
    env: &Environment,
) -> Result<PreparedServer, ConfigError> {
    let xdg = Xdg::from_env(env);
    // A Server always needs tunnels, which only a file can give.
    let file = match locate(overlay.config.as_deref(), &xdg)? {
        Located::Found(file) => *file,
        Located::Missing(looked_at) => return Err(no_config_file(&looked_at)),
    };
    let label = file.label();
    let Some(server) = file.raw.server.clone() else {
        return Err(ConfigError(format!(
            "{label}: no [server] section; `runewarp server` needs one"
        )));
    };
    let resolver = PathResolver { file: &file };
    let mut cert_dir = resolver.resolve("server.cert-dir", &server.cert_dir)?;
    let acme = match &server.acme {
        Some(raw) => Some(prepare_acme("server.acme", raw, &resolver, &xdg, "server")?),
        None => None,
    };
    if cert_dir.is_none() && acme.is_none() {
        cert_dir = Some(xdg.data("server", "server.cert-dir")?);
    }
    Ok(PreparedServer {
        source: Some(file.path.clone()),
        log_level: file_or_default(&label, "log-level", &file.raw.log_level, "info"),
        hostname: server_hostname(overlay.hostname.as_deref(), env, &label, &server.hostname),
        public_bind_address: file_or_default(
            &label,
            "server.public-bind-address",
            &server.public_bind_address,
            "0.0.0.0:443",
        ),
        tunnel_bind_address: file_or_default(
            &label,
            "server.tunnel-bind-address",
            &server.tunnel_bind_address,
            "0.0.0.0:443",
        ),
        readiness_bind_address: file_val(
            &label,
            "server.readiness-bind-address",
            &server.readiness_bind_address,
        ),
        metrics_bind_address: file_val(
            &label,
            "server.metrics-bind-address",
            &server.metrics_bind_address,
        ),
        control_socket: match resolver.resolve("server.control-socket", &server.control_socket)? {
            Some(path) => Some(path),
            None => default_control_socket(&xdg, "server"),
        },
        graceful_shutdown_duration: file_or_default(
            &label,
            "server.graceful-shutdown-duration",
            &server.graceful_shutdown_duration,
            "60s",
        ),
        stream_write_timeout: file_or_default(
            &label,
            "server.stream-write-timeout",
            &server.stream_write_timeout,
            DEFAULT_STREAM_WRITE_TIMEOUT,
        ),
        stream_idle_timeout: file_or_default(
            &label,
            "server.stream-idle-timeout",
            &server.stream_idle_timeout,
            DEFAULT_STREAM_IDLE_TIMEOUT,
        ),
        congestion_control: file_or_default(
            &label,
            "server.congestion-control",
            &server.congestion_control,
            CongestionControl::default().as_str(),
        ),
        cert_dir,
        acme,
        tunnels: server.tunnels.unwrap_or_default(),
        relay: match server.relay {
            Some(mut r) => {
                r.control_key_file =
                    resolver.resolve("server.relay.control-key-file", &r.control_key_file)?;
                Some(r)
            }
            None => None,
        },
        label,
    })
}

/// One Service after step 1.
#[derive(Debug, Clone)]
pub(crate) struct PreparedService {
    pub public_hostnames: Option<Vec<String>>,
    pub backend_address: Option<Val<String>>,
    pub tls_mode: Option<String>,
    pub proxy_protocol: Option<String>,
}

/// The Client config after step 1.
#[derive(Debug, Clone)]
pub(crate) struct PreparedClient {
    pub source: Option<PathBuf>,
    pub label: String,
    pub log_level: Val<String>,
    pub server_address: Option<Val<String>>,
    pub server_trust: Option<String>,
    pub(crate) server_ca_file: Option<PathBuf>,
    pub(crate) server_pin: Option<String>,
    pub identity_dir: PathBuf,
    /// Filled with the default when some Service terminates and neither
    /// this nor `acme` is set.
    pub public_cert_dir: Option<PathBuf>,
    pub readiness_bind_address: Option<Val<String>>,
    pub acme: Option<PreparedAcme>,
    pub metrics_bind_address: Option<Val<String>>,
    pub control_socket: Option<PathBuf>,
    pub services: Vec<PreparedService>,
    /// `[client.smtp]` and the `[client.services.gate]` tables, validated.
    pub gates: crate::gate::config::ClientGates,
    pub(crate) stream_write_timeout: Val<String>,
    pub(crate) stream_idle_timeout: Val<String>,
    pub congestion_control: Val<String>,
}

pub(crate) fn prepare_client(
    overlay: &ClientOverlay,
    env: &Environment,
) -> Result<PreparedClient, ConfigError> {
    let xdg = Xdg::from_env(env);
    let overlays_suffice = overlay.server_address.is_some() && overlay.backend_address.is_some();
    let file = match locate(overlay.config.as_deref(), &xdg)? {
        Located::Found(file) => Some(*file),
        Located::Missing(_) if overlays_suffice => None,
        Located::Missing(looked_at) => return Err(no_config_file(&looked_at)),
    };
    let label = match &file {
        Some(f) => f.label(),
        None => "command line".to_string(),
    };
    let raw_client = match file.as_ref().map(|f| &f.raw.client) {
        Some(Some(client)) => client.clone(),
        Some(None) if !overlays_suffice => {
            return Err(ConfigError(format!(
                "{label}: no [client] section; `runewarp client` needs one (or both --server-address and --backend-address)"
            )));
        }
        _ => Default::default(),
    };

    let mut services: Vec<PreparedService> = raw_client
        .services
        .clone()
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, s): (usize, RawService)| PreparedService {
            public_hostnames: s.public_hostnames,
            backend_address: file_val(
                &label,
                &format!("client.services[{i}].backend-address"),
                &s.backend_address,
            ),
            tls_mode: s.tls_mode,
            proxy_protocol: s.proxy_protocol,
        })
        .collect();
    if let Some(backend) = &overlay.backend_address {
        let backend = Val::new(backend.clone(), Origin::Flag("--backend-address"));
        match services.len() {
            0 => services.push(PreparedService {
                public_hostnames: None,
                backend_address: Some(backend),
                tls_mode: None,
                proxy_protocol: None,
            }),
            1 => services[0].backend_address = Some(backend),
            n => {
                return Err(ConfigError(format!(
                    "{label}: --backend-address needs exactly one [[client.services]] entry, found {n}"
                )));
            }
        }
    }

    let server_address = match &overlay.server_address {
        Some(a) => Some(Val::new(a.clone(), Origin::Flag("--server-address"))),
        None => file_val(&label, "client.server-address", &raw_client.server_address),
    };

    let control_socket = match &file {
        Some(file) => {
            PathResolver { file }.resolve("client.control-socket", &raw_client.control_socket)?
        }
        None => None,
    }
    .or_else(|| default_control_socket(&xdg, "client"));
    let (server_ca_file, identity_dir, mut public_cert_dir, acme) = match &file {
        Some(file) => {
            let resolver = PathResolver { file };
            let acme = match &raw_client.acme {
                Some(raw) => Some(prepare_acme("client.acme", raw, &resolver, &xdg, "client")?),
                None => None,
            };
            (
                resolver.resolve("client.server-ca-file", &raw_client.server_ca_file)?,
                resolver.resolve("client.identity-dir", &raw_client.identity_dir)?,
                resolver.resolve("client.public-cert-dir", &raw_client.public_cert_dir)?,
                acme,
            )
        }
        None => (None, None, None, None),
    };
    let identity_dir = match identity_dir {
        Some(dir) => dir,
        None => xdg.data("client/identity", "client.identity-dir")?,
    };
    let gates = match &file {
        Some(file) => super::gate::client_gates(
            file,
            &xdg,
            raw_client.smtp.as_ref(),
            raw_client.services.as_deref().unwrap_or_default(),
        )?,
        None => Default::default(),
    };
    let terminates = services
        .iter()
        .any(|s| s.tls_mode.as_deref() == Some("terminate"));
    if terminates && public_cert_dir.is_none() && acme.is_none() {
        public_cert_dir = Some(xdg.data("client/public-certs", "client.public-cert-dir")?);
    }

    Ok(PreparedClient {
        source: file.as_ref().map(|f| f.path.clone()),
        log_level: match &file {
            Some(f) => file_or_default(&label, "log-level", &f.raw.log_level, "info"),
            None => Val::new("info".to_string(), Origin::Default("log-level")),
        },
        server_address,
        server_trust: raw_client.server_trust.clone(),
        server_ca_file,
        server_pin: raw_client.server_pin.clone(),
        identity_dir,
        public_cert_dir,
        readiness_bind_address: file_val(
            &label,
            "client.readiness-bind-address",
            &raw_client.readiness_bind_address,
        ),
        acme,
        metrics_bind_address: file_val(
            &label,
            "client.metrics-bind-address",
            &raw_client.metrics_bind_address,
        ),
        control_socket,
        services,
        gates,
        stream_write_timeout: file_or_default(
            &label,
            "client.stream-write-timeout",
            &raw_client.stream_write_timeout,
            DEFAULT_STREAM_WRITE_TIMEOUT,
        ),
        stream_idle_timeout: file_or_default(
            &label,
            "client.stream-idle-timeout",
            &raw_client.stream_idle_timeout,
            DEFAULT_STREAM_IDLE_TIMEOUT,
        ),
        congestion_control: file_or_default(
            &label,
            "client.congestion-control",
            &raw_client.congestion_control,
            CongestionControl::default().as_str(),
        ),
        label,
    })
}

/// Step 1 for the material commands: only the file's own values and the
/// defaults, without requiring the rest of the config to be valid. The
/// Server hostname comes back as written (the caller validates it); the
/// defaults' `server_hostname` is left `None`.
pub(crate) fn prepare_material(
    config: Option<&Path>,
    env: &Environment,
) -> Result<(Option<Val<String>>, MaterialDefaults), ConfigError> {
    let xdg = Xdg::from_env(env);
    let file = match locate(config, &xdg)? {
        Located::Found(file) => Some(*file),
        Located::Missing(_) => None,
    };
    let (label, server, client) = match &file {
        Some(f) => (
            f.label(),
            f.raw.server.clone().unwrap_or_default(),
            f.raw.client.clone().unwrap_or_default(),
        ),
        None => (String::new(), Default::default(), Default::default()),
    };
    let resolve = |key: &str, path: &Option<PathBuf>| -> Result<Option<PathBuf>, ConfigError> {
        match &file {
            Some(file) => PathResolver { file }.resolve(key, path),
            None => Ok(None),
        }
    };
    let server_cert_dir = match resolve("server.cert-dir", &server.cert_dir)? {
        Some(dir) => dir,
        None => xdg.data("server", "server.cert-dir")?,
    };
    let identity_dir = match resolve("client.identity-dir", &client.identity_dir)? {
        Some(dir) => dir,
        None => xdg.data("client/identity", "client.identity-dir")?,
    };
    let public_cert_dir = match resolve("client.public-cert-dir", &client.public_cert_dir)? {
        Some(dir) => dir,
        None => xdg.data("client/public-certs", "client.public-cert-dir")?,
    };
    let server_control_socket = resolve("server.control-socket", &server.control_socket)?
        .or_else(|| default_control_socket(&xdg, "server"));
    let client_control_socket = resolve("client.control-socket", &client.control_socket)?
        .or_else(|| default_control_socket(&xdg, "client"));
    let hostname = server_hostname(None, env, &label, &server.hostname);
    let defaults = MaterialDefaults {
        server_hostname: None,
        server_cert_dir,
        identity_dir,
        public_cert_dir,
        server_control_socket,
        client_control_socket,
    };
    Ok((hostname, defaults))
}
