//! The `[gate]` section (Runegate, `runewarp gate`): prepare, validate and
//! render, kept apart from the Server and Client sections. Same rules as
//! the rest of the seam: one-line errors naming file, key and value;
//! relative paths resolve against the file's directory; defaults filled
//! here, side effects (creating `state-dir`, reading `password-file`)
//! left to the runtime.

use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use super::duration::{format_duration, parse_duration};
use super::file::{LoadedFile, RawFile, RawGate, RawService, RawSmtp};
use super::prepare::{Located, Origin, Val, Xdg, locate};
use super::render::{header, path as render_path, to_toml};
use super::validate::{backend_address, log_level, required};
use super::{ConfigError, Environment};
use crate::gate::config::*;
use crate::hostname::ServerHostname;

/// Prepare and validate the `[gate]` config from `config` (must exist) or
/// the discovered file.
pub(crate) fn load_gate(
    config: Option<&Path>,
    env: &Environment,
) -> Result<GateConfig, ConfigError> {
    let xdg = Xdg::from_env(env);
    let file = match locate(config, &xdg)? {
        Located::Found(file) => *file,
        Located::Missing(Some(path)) => {
            return Err(ConfigError(format!(
                "no config file: looked at {}; pass --config",
                path.display()
            )));
        }
        Located::Missing(None) => {
            return Err(ConfigError(
                "no config file: neither XDG_CONFIG_HOME nor HOME is set to an absolute path; pass --config".to_string(),
            ));
        }
    };
    gate_from_file(&file, &xdg)
}

fn at(label: &str, key: &str) -> Origin {
    Origin::File(label.to_string(), key.to_string())
}

fn val(label: &str, key: &str, value: &str) -> Val<String> {
    Val {
        value: value.to_string(),
        origin: at(label, key),
    }
}

/// A path from the file, against the file's directory (`.` dropped).
fn resolve(
    file: &LoadedFile,
    key: &str,
    p: &Option<PathBuf>,
) -> Result<Option<PathBuf>, ConfigError> {
    let Some(p) = p else { return Ok(None) };
    if p.as_os_str().is_empty() {
        return Err(at(&file.label(), key)
            .invalid("", "must not be empty; omit the key to use the default"));
    }
    Ok(Some(
        file.dir
            .join(p)
            .components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect(),
    ))
}

pub(crate) fn gate_from_file(file: &LoadedFile, xdg: &Xdg) -> Result<GateConfig, ConfigError> {
    let label = file.label();
    let label = label.as_str();
    let Some(raw) = &file.raw.gate else {
        return Err(ConfigError(format!(
            "{label}: no [gate] section; `runewarp gate` needs one"
        )));
    };
    let log_level = log_level(&match &file.raw.log_level {
        Some(v) => val(label, "log-level", v),
        None => Val {
            value: "info".to_string(),
            origin: Origin::Default("log-level"),
        },
    })?;

    let listen_address = match &raw.listen_address {
        Some(v) => socket_addr(&at(label, "gate.listen-address"), v)?,
        None => socket_addr(
            &Origin::Default("gate.listen-address"),
            DEFAULT_LISTEN_ADDRESS,
        )?,
    };
    let upstream = required(
        label,
        &raw.upstream,
        "gate.upstream",
        ": the app behind the gate, such as \"http://127.0.0.1:7860\"",
    )?;
    let upstream = upstream_url(&val(label, "gate.upstream", upstream))?;
    let base = required(
        label,
        &raw.base_url,
        "gate.base-url",
        ": the public origin Visitors use, such as \"https://app.example.com\" (links in mails point there)",
    )?;
    let base_url = base_url(&at(label, "gate.base-url"), base)?;
    let trusted_proxies = each_entry(label, "gate.trusted-proxies", &raw.trusted_proxies, ip_net)?;
    let sign_in = sign_in(file, "gate", raw, &base_url, || {
        xdg.state("gate", "gate.state-dir")
    })?;
    let smtp = required(
        label,
        &raw.smtp,
        "[gate.smtp]",
        ": the gate sends sign-in links by mail (host, from, and usually username and password-file)",
    )?;
    let smtp = smtp_config(file, "gate.smtp", smtp)?;
    Ok(GateConfig {
        source: Some(file.path.clone()),
        log_level,
        listen_address,
        upstream,
        base_url,
        trusted_proxies,
        sign_in,
        smtp,
    })
}

/// Validate the keys `[gate]` and `[client.services.gate]` share, of table
/// `prefix` (`gate` or `client.services[i].gate`). `default_state_dir`
/// gives the state-dir when the table has none.
fn sign_in(
    file: &LoadedFile,
    prefix: &str,
    raw: &RawGate,
    base_url: &BaseUrl,
    default_state_dir: impl FnOnce() -> Result<PathBuf, ConfigError>,
) -> Result<SignIn, ConfigError> {
    let label = file.label();
    let label = label.as_str();
    let key = |k: &str| format!("{prefix}.{k}");
    let allowed = allow_list(label, prefix, raw)?;
    let link_ttl = duration(label, &key("link-ttl"), &raw.link_ttl, DEFAULT_LINK_TTL)?;
    let session_ttl = duration(
        label,
        &key("session-ttl"),
        &raw.session_ttl,
        DEFAULT_SESSION_TTL,
    )?;
    let session_idle = duration(
        label,
        &key("session-idle"),
        &raw.session_idle,
        DEFAULT_SESSION_IDLE,
    )?;
    if session_idle > session_ttl {
        return Err(at(label, &key("session-idle")).invalid(
            &format_duration(session_idle),
            format!(
                "must not exceed {} ({}): a session ends at session-ttl however active it is",
                key("session-ttl"),
                format_duration(session_ttl)
            ),
        ));
    }
    let cookie_domain = match &raw.cookie_domain {
        Some(d) => Some(cookie_domain(
            &at(label, &key("cookie-domain")),
            d,
            base_url,
            &key("base-url"),
        )?),
        None => None,
    };
    let state_dir = match resolve(file, &key("state-dir"), &raw.state_dir)? {
        Some(dir) => dir,
        None => default_state_dir()?,
    };
    Ok(SignIn {
        allowed,
        link_ttl,
        session_ttl,
        session_idle,
        cookie_domain,
        state_dir,
    })
}

/// `[client.smtp]` and every `[client.services.gate]`, validated. `services`
/// are the raw Service tables in file order. A gate needs a terminate
/// Service (only then does the Client see HTTP), no PROXY header to the
/// backend (the Visitor's address goes in `X-Forwarded-For`), and
/// `[client.smtp]`.
pub(crate) fn client_gates(
    file: &LoadedFile,
    xdg: &Xdg,
    raw_smtp: Option<&RawSmtp>,
    services: &[RawService],
) -> Result<ClientGates, ConfigError> {
    let label = file.label();
    let label = label.as_str();
    let mut gates: Vec<ServiceGate> = Vec::new();
    for (i, s) in services.iter().enumerate() {
        let Some(raw) = &s.gate else { continue };
        let prefix = format!("client.services[{i}].gate");
        let mode = s.tls_mode.as_deref().unwrap_or("passthrough");
        if mode != "terminate" {
            return Err(ConfigError(format!(
                "{label}: {prefix}: a gate needs tls-mode = \"terminate\" on client.services[{i}] (it is \"{mode}\"): with passthrough the Visitor's TLS goes through to the backend, so the Client never sees the HTTP requests the gate has to check"
            )));
        }
        if s.proxy_protocol.is_some() {
            return Err(ConfigError(format!(
                "{label}: {prefix}: a gated Service speaks HTTP to its backend and sends the Visitor's address in X-Forwarded-For; remove client.services[{i}].proxy-protocol"
            )));
        }
        let first = s
            .public_hostnames
            .iter()
            .flatten()
            .find(|h| !h.starts_with("*."));
        let base_url = match (&raw.base_url, first) {
            (Some(text), _) => base_url(&at(label, &format!("{prefix}.base-url")), text)?,
            (None, Some(host)) => base_url(
                &Origin::Default("client.services.gate.base-url"),
                &format!("https://{host}"),
            )?,
            (None, None) => {
                return Err(ConfigError(format!(
                    "{label}: {prefix}.base-url is required when client.services[{i}].public-hostnames has only wildcards: links in mails need one origin, such as \"https://app.example.com\""
                )));
            }
        };
        let sign_in = sign_in(file, &prefix, raw, &base_url, || {
            xdg.state(
                &format!("client/gate/{}", base_url.host),
                &format!("{prefix}.state-dir"),
            )
        })?;
        let state_dir = &sign_in.state_dir;
        if let Some(other) = gates.iter().find(|g| &g.sign_in.state_dir == state_dir) {
            return Err(at(label, &format!("{prefix}.state-dir")).invalid(
                &state_dir.display().to_string(),
                format!(
                    "is also the state-dir of client.services[{}].gate: each gate keeps its own sessions",
                    other.service
                ),
            ));
        }
        gates.push(ServiceGate {
            service: i,
            base_url,
            sign_in,
        });
    }
    let smtp = match raw_smtp {
        Some(raw) => Some(smtp_config(file, "client.smtp", raw)?),
        None => None,
    };
    match (&smtp, gates.first()) {
        (None, Some(g)) => Err(ConfigError(format!(
            "{label}: client.services[{}].gate needs [client.smtp]: the gate sends sign-in links by mail (host, from, and usually username and password-file)",
            g.service
        ))),
        (Some(_), None) => Err(ConfigError(format!(
            "{label}: [client.smtp] is set but no [[client.services]] entry has a gate ([client.services.gate])"
        ))),
        _ => Ok(ClientGates {
            smtp,
            services: gates,
        }),
    }
}

fn socket_addr(origin: &Origin, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        origin.invalid(
            text,
            "must be an IP:port literal such as 127.0.0.1:7870 (or [::1]:7870)",
        )
    })
}

fn duration(
    label: &str,
    key: &str,
    text: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(text) = text else { return Ok(default) };
    let d = parse_duration(text).map_err(|e| at(label, key).invalid(text, e))?;
    if d.is_zero() {
        return Err(at(label, key).invalid(text, "must be longer than zero"));
    }
    Ok(d)
}

/// `http://host:port` with an optional trailing `/`.
fn upstream_url(v: &Val<String>) -> Result<crate::config::BackendAddress, ConfigError> {
    let text = v.value.as_str();
    let lower = text.to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Err(v.origin.invalid(
            text,
            "the gate speaks plain HTTP to the app (on loopback or a private network); write http://host:port",
        ));
    }
    let Some(rest) = lower.strip_prefix("http://").map(|_| &text[7..]) else {
        return Err(v.origin.invalid(
            text,
            "expected http://host:port, such as \"http://127.0.0.1:7860\"",
        ));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return Err(v.origin.invalid(
            text,
            "only scheme, host and port are allowed: no path, query or user",
        ));
    }
    backend_address(&Val {
        value: rest.to_string(),
        origin: v.origin.clone(),
    })
    .map_err(|_| {
        v.origin.invalid(
            text,
            "expected http://host:port with a port, such as \"http://127.0.0.1:7860\" or \"http://[::1]:7860\"",
        )
    })
}

/// Whether a host (name or literal, IPv6 with or without brackets) is
/// loopback.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => {
            let name = bare.strip_suffix('.').unwrap_or(bare).to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
    }
}

/// `https://host[:port]` (or `http://` for a loopback host), optional `/`.
fn base_url(origin: &Origin, text: &str) -> Result<BaseUrl, ConfigError> {
    const SHAPE: &str = "expected the public origin, such as \"https://app.example.com\"";
    let lower = text.to_ascii_lowercase();
    let (https, rest) = if lower.starts_with("https://") {
        (true, &text[8..])
    } else if lower.starts_with("http://") {
        (false, &text[7..])
    } else {
        return Err(origin.invalid(text, SHAPE));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#']) {
        return Err(origin.invalid(
            text,
            "must be an origin only (no path, query or fragment): the gate serves the whole site",
        ));
    }
    if rest.contains('@') {
        return Err(origin.invalid(text, "must not contain a user name"));
    }
    let (host, port) = if let Some(after) = rest.strip_prefix('[') {
        let Some((inside, tail)) = after.split_once(']') else {
            return Err(origin.invalid(text, "missing ']' after the IPv6 literal"));
        };
        let ip: std::net::Ipv6Addr = inside
            .parse()
            .map_err(|_| origin.invalid(text, format!("{inside:?} is not an IPv6 address")))?;
        let port = match tail {
            "" => None,
            t => Some(
                t.strip_prefix(':')
                    .ok_or_else(|| origin.invalid(text, SHAPE))?,
            ),
        };
        (format!("[{ip}]"), port)
    } else {
        let (h, p) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        };
        let host = match h.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => ServerHostname::parse(h)
                .map_err(|e| origin.invalid(text, e))?
                .to_string(),
        };
        (host, p)
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
            _ => {
                return Err(
                    origin.invalid(text, format!("port {p:?} must be a number in 1..=65535"))
                );
            }
        },
    };
    let default_port = if https { 443 } else { 80 };
    let port = port.filter(|&p| p != default_port);
    if !https && !is_loopback_host(&host) {
        return Err(origin.invalid(
            text,
            "must use https:// (the session cookie is Secure); http:// is only accepted for a loopback host, for local trials",
        ));
    }
    Ok(BaseUrl { https, host, port })
}

/// An address (`192.0.2.7`, `::1`) or a block (`10.0.0.0/8`, `fd00::/8`).
fn ip_net(origin: &Origin, text: &str) -> Result<IpNet, ConfigError> {
    const SHAPE: &str =
        "expected an IP address or a CIDR block, such as \"127.0.0.1\" or \"10.0.0.0/8\"";
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| origin.invalid(text, SHAPE))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(n) if n <= max && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => {
                return Err(origin.invalid(
                    text,
                    format!("prefix length {p:?} must be a number in 0..={max}"),
                ));
            }
        },
    };
    let network = match addr {
        IpAddr::V4(v4) => IpAddr::V4(mask_v4(u32::from(v4), prefix).into()),
        IpAddr::V6(v6) => IpAddr::V6(mask_v6(u128::from(v6), prefix).into()),
    };
    if network != addr {
        return Err(origin.invalid(
            text,
            format!("has bits set after the prefix; did you mean \"{network}/{prefix}\"?"),
        ));
    }
    Ok(IpNet {
        addr: network,
        prefix,
    })
}

/// Every entry of the optional list key `key`, each parsed with its own
/// origin (`key[i]`, so an error points at the entry); absent: none.
fn each_entry<T>(
    label: &str,
    key: &str,
    list: &Option<Vec<String>>,
    parse: impl Fn(&Origin, &str) -> Result<T, ConfigError>,
) -> Result<Vec<T>, ConfigError> {
    list.iter()
        .flatten()
        .enumerate()
        .map(|(i, text)| parse(&at(label, &format!("{key}[{i}]")), text))
        .collect()
}

fn allow_list(label: &str, prefix: &str, raw: &RawGate) -> Result<AllowList, ConfigError> {
    let emails = each_entry(
        label,
        &format!("{prefix}.allowed-emails"),
        &raw.allowed_emails,
        |origin, e| EmailAddress::parse(e).map_err(|why| origin.invalid(e, why)),
    )?;
    let domains = each_entry(
        label,
        &format!("{prefix}.allowed-domains"),
        &raw.allowed_domains,
        |origin, d| {
            if d.contains('@') {
                return Err(origin.invalid(
                    d,
                    format!("a domain is expected (\"example.com\"); list whole addresses in {prefix}.allowed-emails"),
                ));
            }
            let bare = d.strip_prefix("*.").unwrap_or(d);
            if bare.len() != d.len() {
                return Err(origin.invalid(
                    d,
                    "wildcards are not supported: a domain allows exactly that domain; list subdomains separately",
                ));
            }
            ServerHostname::parse(d).map_err(|e| origin.invalid(d, e))
        },
    )?;
    if emails.is_empty() && domains.is_empty() {
        return Err(ConfigError(format!(
            "{label}: [{prefix}] needs {prefix}.allowed-emails or {prefix}.allowed-domains with at least one entry; otherwise nobody could sign in"
        )));
    }
    Ok(AllowList { emails, domains })
}

fn cookie_domain(
    origin: &Origin,
    text: &str,
    base: &BaseUrl,
    base_key: &str,
) -> Result<ServerHostname, ConfigError> {
    let bare = text.strip_prefix('.').unwrap_or(text);
    let domain = ServerHostname::parse(bare).map_err(|e| origin.invalid(text, e))?;
    let host = base.host.as_str();
    if host != domain.as_str() && !host.ends_with(&format!(".{domain}")) {
        return Err(origin.invalid(
            text,
            format!(
                "the {base_key} host {host:?} is not {:?} or under it; browsers would refuse the cookie",
                domain.as_str()
            ),
        ));
    }
    if !domain.as_str().contains('.') {
        return Err(origin.invalid(
            text,
            "a cookie for a top-level name would be shared with every site under it; name your own domain",
        ));
    }
    Ok(domain)
}

fn smtp_config(file: &LoadedFile, prefix: &str, raw: &RawSmtp) -> Result<SmtpConfig, ConfigError> {
    let label = file.label();
    let label = label.as_str();
    let host_text = required(
        label,
        &raw.host,
        &format!("{prefix}.host"),
        ": the mail server that relays sign-in mails",
    )?;
    let host_origin = at(label, &format!("{prefix}.host"));
    let host = match host_text.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => ServerHostname::parse(host_text)
            .map_err(|e| host_origin.invalid(host_text, e))?
            .to_string(),
    };
    let tls = match raw.tls.as_deref() {
        None | Some("starttls") => SmtpTls::StartTls,
        Some("implicit") => SmtpTls::Implicit,
        Some("none") => SmtpTls::None,
        Some(other) => {
            return Err(at(label, &format!("{prefix}.tls"))
                .invalid(other, "must be one of starttls, implicit, none"));
        }
    };
    if tls == SmtpTls::None && !is_loopback_host(&host) {
        return Err(at(label, &format!("{prefix}.tls")).invalid(
            "none",
            format!(
                "only allowed when {prefix}.host is loopback (it is {host:?}): mails carry sign-in links; use starttls or implicit"
            ),
        ));
    }
    let port = match &raw.port {
        Some(text) => match text.parse::<u16>() {
            Ok(p) if p != 0 && text.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => {
                return Err(at(label, &format!("{prefix}.port")).invalid(
                    text,
                    "must be a number in 1..=65535, written as a string (\"587\")",
                ));
            }
        },
        None => tls.default_port(),
    };
    let password_file = resolve(file, &format!("{prefix}.password-file"), &raw.password_file)?;
    let credentials = match (&raw.username, password_file) {
        (Some(username), Some(password_file)) => {
            if username.is_empty() || username.chars().any(char::is_control) {
                return Err(at(label, &format!("{prefix}.username"))
                    .invalid(username, "must be non-empty, without control characters"));
            }
            Some(SmtpCredentials {
                username: username.clone(),
                password_file,
            })
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError(format!(
                "{label}: {prefix}.username needs {prefix}.password-file (a file holding the password; the password itself never goes in the config)"
            )));
        }
        (None, Some(_)) => {
            return Err(ConfigError(format!(
                "{label}: {prefix}.password-file needs {prefix}.username"
            )));
        }
    };
    let Some(from_text) = &raw.from else {
        return Err(ConfigError(format!(
            "{label}: {prefix}.from is required: the sender of sign-in mails, such as \"Sign-in <signin@example.com>\""
        )));
    };
    let from = mail_from(&at(label, &format!("{prefix}.from")), from_text)?;
    let ca_file = resolve(file, &format!("{prefix}.ca-file"), &raw.ca_file)?;
    if ca_file.is_some() && tls == SmtpTls::None {
        return Err(ConfigError(format!(
            "{label}: {prefix}.ca-file needs {prefix}.tls = \"starttls\" or \"implicit\" (with tls = \"none\" no certificate is checked)"
        )));
    }
    Ok(SmtpConfig {
        host,
        port,
        tls,
        credentials,
        from,
        ca_file,
    })
}

/// `addr@example.com` or `Display Name <addr@example.com>`.
fn mail_from(origin: &Origin, text: &str) -> Result<MailFrom, ConfigError> {
    let trimmed = text.trim();
    let (name, addr) = match trimmed.strip_suffix('>').and_then(|t| t.rsplit_once('<')) {
        Some((name, addr)) => {
            let name = name.trim();
            if name
                .chars()
                .any(|c| c.is_control() || matches!(c, '<' | '>' | '"' | '\\'))
            {
                return Err(origin.invalid(
                    text,
                    "the display name may not contain quotes, backslashes, angle brackets or control characters",
                ));
            }
            ((!name.is_empty()).then(|| name.to_string()), addr)
        }
        None => (None, trimmed),
    };
    let address = EmailAddress::parse(addr).map_err(|e| origin.invalid(text, e))?;
    Ok(MailFrom { name, address })
}

/// The effective `[gate]` config as TOML: every default filled, paths
/// absolute, durations in canonical form. Loads back to the same config.
pub(crate) fn render_gate(c: &GateConfig) -> String {
    let raw = RawFile {
        log_level: Some(c.log_level.as_str().to_string()),
        server: None,
        client: None,
        gate: Some(RawGate {
            listen_address: Some(c.listen_address.to_string()),
            upstream: Some(format!("http://{}", c.upstream)),
            trusted_proxies: non_empty(c.trusted_proxies.iter().map(|n| n.to_string()).collect()),
            smtp: Some(raw_smtp(&c.smtp)),
            ..raw_sign_in(&c.base_url, &c.sign_in)
        }),
    };
    header(&c.source) + &to_toml(&raw)
}

/// `[gate.smtp]` / `[client.smtp]` as written.
pub(crate) fn raw_smtp(smtp: &SmtpConfig) -> RawSmtp {
    RawSmtp {
        host: Some(smtp.host.clone()),
        port: Some(smtp.port.to_string()),
        tls: Some(smtp.tls.as_str().to_string()),
        username: smtp.credentials.as_ref().map(|c| c.username.clone()),
        password_file: smtp
            .credentials
            .as_ref()
            .map(|c| render_path(&c.password_file)),
        from: Some(smtp.from.to_string()),
        ca_file: smtp.ca_file.as_deref().map(render_path),
    }
}

/// A `[client.services.gate]` table as written, every default filled.
pub(crate) fn raw_service_gate(g: &ServiceGate) -> RawGate {
    raw_sign_in(&g.base_url, &g.sign_in)
}

/// `base-url` and the [`SignIn`] keys as written, every default filled.
fn raw_sign_in(base_url: &BaseUrl, s: &SignIn) -> RawGate {
    RawGate {
        base_url: Some(base_url.to_string()),
        allowed_emails: non_empty(s.allowed.emails.iter().map(|e| e.to_string()).collect()),
        allowed_domains: non_empty(s.allowed.domains.iter().map(|d| d.to_string()).collect()),
        link_ttl: Some(format_duration(s.link_ttl)),
        session_ttl: Some(format_duration(s.session_ttl)),
        session_idle: Some(format_duration(s.session_idle)),
        cookie_domain: s.cookie_domain.as_ref().map(|d| d.to_string()),
        state_dir: Some(render_path(&s.state_dir)),
        ..Default::default()
    }
}

/// A list key as written: left out when empty.
fn non_empty(v: Vec<String>) -> Option<Vec<String>> {
    (!v.is_empty()).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file;

    const MINIMAL: &str = r#"
[gate]
upstream = "http://127.0.0.1:7860"
base-url = "https://app.example.com"
allowed-emails = ["Alice@Example.COM"]
[gate.smtp]
host = "smtp.example.com"
from = "signin@example.com"
"#;

    fn load_text(text: &str) -> Result<GateConfig, String> {
        let raw = file::parse("/etc/g.toml", text).map_err(|e| e.0)?;
        let file = LoadedFile {
            path: PathBuf::from("/etc/g.toml"),
            dir: PathBuf::from("/etc"),
            raw,
        };
        let env = Environment::from_pairs([("HOME", "/home/u")]);
        gate_from_file(&file, &Xdg::from_env(&env)).map_err(|e| e.0)
    }

    /// MINIMAL with `line` added under `[gate]` (or replacing a key).
    fn with(extra: &str) -> Result<GateConfig, String> {
        let mut text = MINIMAL.to_string();
        let key = extra.split('=').next().unwrap_or("").trim();
        text = text
            .lines()
            .filter(|l| key.is_empty() || !l.starts_with(&format!("{key} =")))
            .collect::<Vec<_>>()
            .join("\n");
        load_text(&text.replacen("[gate]\n", &format!("[gate]\n{extra}\n"), 1))
    }

    fn with_smtp(extra: &str) -> Result<GateConfig, String> {
        let keys: Vec<String> = extra
            .lines()
            .map(|l| format!("{} =", l.split('=').next().unwrap_or("").trim()))
            .collect();
        let text: Vec<&str> = MINIMAL
            .lines()
            .filter(|l| !keys.iter().any(|k| l.starts_with(k.as_str())))
            .collect();
        load_text(&(text.join("\n") + "\n" + extra + "\n"))
    }

    /// The error a load gave (a gate's, or a Client's with gates).
    fn err<T: std::fmt::Debug>(r: Result<T, String>) -> String {
        match r {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e,
        }
    }

    /// Whether the allow list lets `email` sign in.
    fn allows(allowed: &AllowList, email: &str) -> bool {
        allowed.allows(&EmailAddress::parse(email).unwrap())
    }

    #[test]
    fn minimal_gets_the_documented_defaults() {
        let c = load_text(MINIMAL).unwrap();
        assert_eq!(c.listen_address, "127.0.0.1:7870".parse().unwrap());
        assert_eq!(c.upstream.to_string(), "127.0.0.1:7860");
        assert_eq!(c.base_url.to_string(), "https://app.example.com");
        assert_eq!(c.sign_in.link_ttl, Duration::from_secs(600));
        assert_eq!(c.sign_in.session_ttl, Duration::from_secs(12 * 3600));
        assert_eq!(c.sign_in.session_idle, Duration::from_secs(3600));
        assert_eq!(c.sign_in.cookie_domain, None);
        assert_eq!(
            c.sign_in.state_dir,
            PathBuf::from("/home/u/.local/state/runewarp/gate")
        );
        assert_eq!(c.smtp.tls, SmtpTls::StartTls);
        assert_eq!(c.smtp.port, 587);
        assert!(c.trusted_proxies.is_empty());
        assert!(allows(&c.sign_in.allowed, "alice@example.com"));
        assert!(!allows(&c.sign_in.allowed, "bob@example.com"));
    }

    #[test]
    fn render_loads_back_to_the_same_config() {
        let c = with(
            "trusted-proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]\nallowed-domains = [\"team.example.com\"]\ncookie-domain = \"example.com\"\nstate-dir = \"gate-state\"",
        )
        .unwrap();
        let c = GateConfig {
            smtp: SmtpConfig {
                credentials: Some(SmtpCredentials {
                    username: "u".into(),
                    password_file: "/etc/pw".into(),
                }),
                from: mail_from(&Origin::Default("x"), "Sign-in <s@example.com>").unwrap(),
                ..c.smtp
            },
            ..c
        };
        let text = render_gate(&c);
        let back = load_text(&text).unwrap();
        assert_eq!(
            back,
            GateConfig {
                source: back.source.clone(),
                ..c
            }
        );
        assert!(text.contains("state-dir = \"/etc/gate-state\""), "{text}");
    }

    #[test]
    fn upstream_must_be_http_host_port() {
        assert!(err(with("upstream = \"https://127.0.0.1:7860\"")).contains("plain HTTP"));
        let e = err(with("upstream = \"127.0.0.1:7860\""));
        assert!(
            e.starts_with(
                "/etc/g.toml: gate.upstream = \"127.0.0.1:7860\": expected http://host:port"
            ),
            "{e}"
        );
        assert!(err(with("upstream = \"http://127.0.0.1\"")).contains("with a port"));
        assert!(err(with("upstream = \"http://app:80/x\"")).contains("no path"));
        assert_eq!(
            with("upstream = \"http://[::1]:7860/\"")
                .unwrap()
                .upstream
                .to_string(),
            "[::1]:7860"
        );
        let e = err(load_text(
            &MINIMAL.replace("upstream = \"http://127.0.0.1:7860\"\n", ""),
        ));
        assert!(e.contains("gate.upstream is required"), "{e}");
    }

    #[test]
    fn base_url_is_an_https_origin() {
        let e = err(with("base-url = \"http://app.example.com\""));
        assert!(e.contains("must use https://"), "{e}");
        assert!(err(with("base-url = \"https://app.example.com/app\"")).contains("origin only"));
        assert!(err(with("base-url = \"app.example.com\"")).contains("public origin"));
        assert!(err(with("base-url = \"https://u@app.example.com\"")).contains("user name"));
        let local = with("base-url = \"http://127.0.0.1:8080/\"")
            .unwrap()
            .base_url;
        assert_eq!(local.to_string(), "http://127.0.0.1:8080");
        let port = with("base-url = \"https://App.Example.com:443\"")
            .unwrap()
            .base_url;
        assert_eq!(port.to_string(), "https://app.example.com");
        assert_eq!(port.authority(), "app.example.com");
        let v6 = with("base-url = \"http://[::1]:8080\"").unwrap().base_url;
        assert_eq!(v6.authority(), "[::1]:8080");
    }

    #[test]
    fn allow_list_needs_an_entry_and_valid_values() {
        let none = MINIMAL.replace("allowed-emails = [\"Alice@Example.COM\"]\n", "");
        assert!(err(load_text(&none)).contains("nobody could sign in"));
        let empty = with("allowed-emails = []");
        assert!(err(empty).contains("at least one entry"));
        let e = err(with(
            "allowed-emails = [\"a@example.com\", \"Bob <b@example.com>\"]",
        ));
        assert!(
            e.contains("gate.allowed-emails[1] = \"Bob <b@example.com>\""),
            "{e}"
        );
        let e = err(with("allowed-domains = [\"*.example.com\"]"));
        assert!(e.contains("wildcards are not supported"), "{e}");
        assert!(err(with("allowed-domains = [\"a@example.com\"]")).contains("allowed-emails"));
        let c = with("allowed-domains = [\"Example.com\"]").unwrap();
        assert!(allows(&c.sign_in.allowed, "ANY@example.com"));
        assert!(!allows(&c.sign_in.allowed, "a@sub.example.com"));
    }

    #[test]
    fn durations_are_positive_and_idle_fits_the_lifetime() {
        assert!(err(with("link-ttl = \"0s\"")).contains("longer than zero"));
        assert!(err(with("link-ttl = \"10\"")).contains("missing unit"));
        let e = err(with("session-idle = \"13h\""));
        assert!(
            e.contains("must not exceed gate.session-ttl (43200s)"),
            "{e}"
        );
        assert_eq!(
            with("link-ttl = \"5m\"").unwrap().sign_in.link_ttl,
            Duration::from_secs(300)
        );
    }

    #[test]
    fn trusted_proxies_are_addresses_or_blocks() {
        let c = with("trusted-proxies = [\"127.0.0.1\", \"fd00::/8\"]").unwrap();
        assert!(c.trusted_proxies[0].contains("127.0.0.1".parse().unwrap()));
        assert!(c.trusted_proxies[0].contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!c.trusted_proxies[0].contains("127.0.0.2".parse().unwrap()));
        assert!(c.trusted_proxies[1].contains("fd12::1".parse().unwrap()));
        let e = err(with("trusted-proxies = [\"10.1.2.3/8\"]"));
        assert!(e.contains("did you mean \"10.0.0.0/8\""), "{e}");
        assert!(err(with("trusted-proxies = [\"10.0.0.0/33\"]")).contains("0..=32"));
        assert!(err(with("trusted-proxies = [\"nginx\"]")).contains("CIDR"));
    }

    #[test]
    fn cookie_domain_must_cover_the_base_url() {
        let c = with("cookie-domain = \".Example.com\"").unwrap();
        assert_eq!(c.sign_in.cookie_domain.unwrap().as_str(), "example.com");
        let e = err(with("cookie-domain = \"other.com\""));
        assert!(e.contains("browsers would refuse the cookie"), "{e}");
        assert!(err(with("cookie-domain = \"xample.com\"")).contains("not \"xample.com\""));
    }

    #[test]
    fn smtp_rules() {
        let e = err(load_text(&MINIMAL.replace(
            "[gate.smtp]\nhost = \"smtp.example.com\"\nfrom = \"signin@example.com\"\n",
            "",
        )));
        assert!(e.contains("[gate.smtp] is required"), "{e}");
        let e = err(with_smtp("tls = \"none\""));
        assert!(
            e.contains("gate.smtp.tls = \"none\": only allowed when gate.smtp.host is loopback"),
            "{e}"
        );
        let local = with_smtp("tls = \"none\"\nhost = \"127.0.0.1\"").unwrap();
        assert_eq!((local.smtp.port, local.smtp.tls), (25, SmtpTls::None));
        assert_eq!(with_smtp("tls = \"implicit\"").unwrap().smtp.port, 465);
        assert_eq!(with_smtp("port = \"2525\"").unwrap().smtp.port, 2525);
        assert!(err(with_smtp("port = \"0\"")).contains("gate.smtp.port = \"0\""));
        assert!(err(with_smtp("tls = \"ssl\"")).contains("one of starttls, implicit, none"));
        assert!(err(with_smtp("username = \"u\"")).contains("needs gate.smtp.password-file"));
        assert!(err(with_smtp("password-file = \"pw\"")).contains("needs gate.smtp.username"));
        let creds = with_smtp("username = \"u\"\npassword-file = \"pw\"").unwrap();
        assert_eq!(
            creds.smtp.credentials.unwrap().password_file,
            PathBuf::from("/etc/pw")
        );
        let from = with_smtp("from = \"Sign-in <s@example.com>\"")
            .unwrap()
            .smtp
            .from;
        assert_eq!(from.name.as_deref(), Some("Sign-in"));
        assert!(err(with_smtp("from = \"nobody\"")).contains("gate.smtp.from = \"nobody\""));
        let ca = with_smtp("ca-file = \"relay-ca.pem\"")
            .unwrap()
            .smtp
            .ca_file;
        assert_eq!(ca, Some(PathBuf::from("/etc/relay-ca.pem")));
        let e = err(with_smtp(
            "ca-file = \"ca.pem\"\nhost = \"127.0.0.1\"\ntls = \"none\"",
        ));
        assert!(e.contains("gate.smtp.ca-file needs"), "{e}");
    }

    #[test]
    fn unknown_gate_keys_suggest_the_right_one() {
        let e = err(with("allowed-email = [\"a@example.com\"]"));
        assert!(e.contains("unknown key \"allowed-email\" in [gate]"), "{e}");
        assert!(e.contains("did you mean \"allowed-emails\"?"), "{e}");
        let e = err(with_smtp("pasword-file = \"x\""));
        assert!(
            e.contains("in [gate.smtp]") && e.contains("\"password-file\""),
            "{e}"
        );
    }

    #[test]
    fn a_file_without_gate_says_so() {
        let e = err(load_text("[client]\nserver-address = \"a.example.com\"\n"));
        assert!(e.contains("no [gate] section"), "{e}");
    }
    // ------------------------------------------------ [client.services.gate]

    const CLIENT: &str = r#"
[client]
server-address = "edge.example.com"
public-cert-dir = "certs"
[[client.services]]
public-hostnames = ["*.example.com", "app.example.com"]
backend-address = "127.0.0.1:7860"
tls-mode = "terminate"
[client.services.gate]
allowed-domains = ["example.com"]
[[client.services]]
public-hostnames = ["raw.example.com"]
backend-address = "127.0.0.1:8443"
[client.smtp]
host = "smtp.example.com"
username = "u"
password-file = "smtp-password"
from = "signin@example.com"
"#;

    fn client_text(text: &str) -> Result<crate::config::ClientConfig, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("client.toml");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        let env = Environment::from_pairs([("HOME", "/home/u")]);
        crate::config::load_client(
            &crate::config::ClientOverlay {
                config: Some(path),
                ..Default::default()
            },
            &env,
        )
        .map_err(|e| e.0)
    }

    #[test]
    fn a_terminate_service_gets_a_gate_with_defaults_and_client_smtp() {
        let c = client_text(CLIENT).unwrap();
        let g = &c.gates.services[0];
        assert_eq!(g.service, 0);
        assert_eq!(g.base_url.to_string(), "https://app.example.com");
        assert_eq!(g.sign_in.link_ttl, DEFAULT_LINK_TTL);
        assert_eq!(
            g.sign_in.state_dir,
            PathBuf::from("/home/u/.local/state/runewarp/client/gate/app.example.com")
        );
        assert_eq!(c.gates.services.len(), 1);
        let smtp = c.gates.smtp.as_ref().unwrap();
        assert_eq!((smtp.port, smtp.tls), (587, SmtpTls::StartTls));
        assert!(
            smtp.credentials
                .as_ref()
                .unwrap()
                .password_file
                .is_absolute()
        );
        // Rendered, it loads back the same.
        let rendered = crate::config::render_client(&c);
        assert!(rendered.contains("[client.services.gate]"), "{rendered}");
        assert!(rendered.contains("[client.smtp]"), "{rendered}");
        let mut again = client_text(&rendered).unwrap();
        again.source = c.source.clone();
        assert_eq!(again, c, "{rendered}");
    }

    #[test]
    fn a_gate_on_passthrough_and_other_misuse_say_why() {
        let passthrough = CLIENT.replace("tls-mode = \"terminate\"\n", "");
        let e = err(client_text(
            &passthrough.replace("public-cert-dir = \"certs\"\n", ""),
        ));
        assert!(
            e.contains("client.services[0].gate: a gate needs tls-mode = \"terminate\"")
                && e.contains("passthrough")
                && e.contains("never sees the HTTP"),
            "{e}"
        );
        let no_smtp = &CLIENT[..CLIENT.find("[client.smtp]").unwrap()];
        assert!(err(client_text(no_smtp)).contains("client.services[0].gate needs [client.smtp]"));
        // (replace, with, what the error says)
        let cases = [
            (
                "[client.services.gate]\nallowed-domains = [\"example.com\"]\n",
                "",
                "[client.smtp] is set but no",
            ),
            (
                "tls-mode = \"terminate\"\n",
                "tls-mode = \"terminate\"\nproxy-protocol = \"v2\"\n",
                "remove client.services[0].proxy-protocol",
            ),
            (
                "allowed-domains",
                "upstream = \"http://x:1\"\nallowed-domains",
                "unknown key \"upstream\" in [client.services.gate]",
            ),
            (
                "allowed-domains = [\"example.com\"]",
                "link-ttl = \"5m\"",
                "client.services[0].gate.allowed-emails or",
            ),
            (
                "host = \"smtp.example.com\"",
                "host = \"smtp.example.com\"\ntls = \"none\"",
                "client.smtp.tls = \"none\"",
            ),
            (
                ", \"app.example.com\"",
                "",
                "client.services[0].gate.base-url is required",
            ),
            (
                "allowed-domains",
                "cookie-domain = \"other.com\"\nallowed-domains",
                "client.services[0].gate.cookie-domain = \"other.com\"",
            ),
        ];
        for (from, to, says) in cases {
            let e = err(client_text(&CLIENT.replace(from, to)));
            assert!(e.contains(says), "{from:?} -> {to:?}: {e}");
        }
    }
}
