//! Step 2, **validate**: turn the prepared shapes into [`ServerConfig`] /
//! [`ClientConfig`]. Every error is one line naming the file, the key path
//! and the offending value.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use super::ConfigError;
use super::duration::parse_duration;
use super::prepare::{Origin, PreparedAcme, PreparedClient, PreparedServer, Val};
use super::types::*;
use crate::hostname::{HostnameError, PublicHostname, ServerHostname};
use crate::identity::ClientIdentity;
use crate::tls::server_pin::ServerPin;

fn at(label: &str, key: impl Into<String>) -> Origin {
    Origin::File(label.to_string(), key.into())
}

pub(crate) fn log_level(v: &Val<String>) -> Result<LogLevel, ConfigError> {
    Ok(match v.value.as_str() {
        "off" => LogLevel::Off,
        "error" => LogLevel::Error,
        "warn" => LogLevel::Warn,
        "info" => LogLevel::Info,
        "debug" => LogLevel::Debug,
        "trace" => LogLevel::Trace,
        other => {
            return Err(v
                .origin
                .invalid(other, "must be one of off, error, warn, info, debug, trace"));
        }
    })
}

pub(crate) fn congestion_control(v: &Val<String>) -> Result<CongestionControl, ConfigError> {
    CongestionControl::parse(&v.value).ok_or_else(|| {
        v.origin.invalid(
            &v.value,
            format!(
                "must be one of {} (the tunnel's QUIC congestion controller)",
                CongestionControl::NAMES.join(", ")
            ),
        )
    })
}

pub(crate) fn server_hostname(v: &Val<String>) -> Result<ServerHostname, ConfigError> {
    ServerHostname::parse(&v.value).map_err(|e| v.origin.invalid(&v.value, e))
}

fn socket_addr(v: &Val<String>) -> Result<SocketAddr, ConfigError> {
    v.value.parse().map_err(|_| {
        v.origin.invalid(
            &v.value,
            "must be an IP:port literal such as 0.0.0.0:443 (or [::]:443)",
        )
    })
}

/// The longest path a Unix socket address holds (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

fn control_socket(
    label: &str,
    key: &str,
    path: Option<std::path::PathBuf>,
) -> Result<Option<std::path::PathBuf>, ConfigError> {
    if let Some(p) = &path
        && p.as_os_str().len() > MAX_SOCKET_PATH
    {
        return Err(at(label, key).invalid(
            &p.display().to_string(),
            format!("is longer than {MAX_SOCKET_PATH} bytes, the limit of a Unix socket path; choose a shorter path"),
        ));
    }
    Ok(path)
}

fn acme(label: &str, a: &PreparedAcme) -> Result<AcmeConfig, ConfigError> {
    if let Some(email) = &a.email {
        let looks_ok = match email.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !domain.is_empty()
                    && !domain.contains('@')
                    && !email.chars().any(char::is_whitespace)
            }
            None => false,
        };
        if !looks_ok {
            return Err(at(label, format!("{}.email", a.section)).invalid(
                email,
                "is not an email address (expected exactly one '@' with text on both sides)",
            ));
        }
    }
    let after_scheme = a.directory_url.strip_prefix("https://");
    if after_scheme.is_none_or(|rest| rest.is_empty()) {
        return Err(at(label, format!("{}.directory-url", a.section))
            .invalid(&a.directory_url, "must be an https:// URL"));
    }
    Ok(AcmeConfig {
        email: a.email.clone(),
        state_dir: a.state_dir.clone(),
        directory_url: a.directory_url.clone(),
        directory_ca_file: a.directory_ca_file.clone(),
    })
}

/// Parse `public-hostnames`, rejecting duplicates against `seen` (which
/// maps each hostname to the key path that listed it first).
fn public_hostnames(
    label: &str,
    key: &str,
    names: &[String],
    seen: &mut HashMap<String, String>,
    owner: &str,
) -> Result<Vec<PublicHostname>, ConfigError> {
    let mut out = Vec::with_capacity(names.len());
    for (j, raw) in names.iter().enumerate() {
        let origin = at(label, format!("{key}[{j}]"));
        let host = PublicHostname::parse(raw).map_err(|e| origin.invalid(raw, e))?;
        if let Some(first) = seen.get(host.as_str()) {
            return Err(origin.invalid(
                raw,
                format!("already listed at {first}; a hostname belongs to exactly one {owner}"),
            ));
        }
        seen.insert(host.as_str().to_string(), format!("{key}[{j}]"));
        out.push(host);
    }
    Ok(out)
}

fn client_identity(origin: &Origin, raw: &str) -> Result<ClientIdentity, ConfigError> {
    ClientIdentity::parse(raw).map_err(|e| {
        if raw.contains(':') {
            origin.invalid(
                raw,
                "a client identity is 64 lowercase hex characters without colons (as printed by `runewarp client identity show`)",
            )
        } else {
            origin.invalid(raw, e)
        }
    })
}

/// `value`, or the error that `key` is required (and `why`).
pub(super) fn required<'a, T>(
    label: &str,
    value: &'a Option<T>,
    key: &str,
    why: &str,
) -> Result<&'a T, ConfigError> {
    let missing = || ConfigError(format!("{label}: {key} is required{why}"));
    value.as_ref().ok_or_else(missing)
}

/// Which of two alternative keys a table sets.
enum OneOf<'a, A, B> {
    First(&'a A),
    Second(&'a B),
}

/// Exactly one of the alternative keys `first` and `second` of `table`:
/// both set is an error, neither is the error `missing` describes.
fn one_of<'a, A, B>(
    label: &str,
    table: &str,
    (first_key, first): (&str, &'a Option<A>),
    (second_key, second): (&str, &'a Option<B>),
    missing: &str,
) -> Result<OneOf<'a, A, B>, ConfigError> {
    match (first, second) {
        (Some(_), Some(_)) => Err(ConfigError(format!(
            "{label}: {table} sets both {first_key} and {second_key}; use one"
        ))),
        (None, None) => Err(ConfigError(format!("{label}: {missing}"))),
        (Some(a), None) => Ok(OneOf::First(a)),
        (None, Some(b)) => Ok(OneOf::Second(b)),
    }
}

/// An optional `host:port` key, parsed when set.
fn optional_addr(value: &Option<Val<String>>) -> Result<Option<SocketAddr>, ConfigError> {
    value.as_ref().map(socket_addr).transpose()
}

pub(crate) fn validate_server(p: PreparedServer) -> Result<ServerConfig, ConfigError> {
    let label = p.label.as_str();
    let log_level = log_level(&p.log_level)?;
    let hostname = required(
        label,
        &p.hostname,
        "server.hostname",
        " (or pass --hostname, or set RUNEWARP_SERVER_HOSTNAME)",
    )?;
    let hostname = server_hostname(hostname)?;
    let public_bind_address = socket_addr(&p.public_bind_address)?;
    let tunnel_bind_address = socket_addr(&p.tunnel_bind_address)?;
    let readiness_bind_address = optional_addr(&p.readiness_bind_address)?;
    let metrics_bind_address = optional_addr(&p.metrics_bind_address)?;
    let graceful_shutdown_duration =
        parse_duration(&p.graceful_shutdown_duration.value).map_err(|e| {
            p.graceful_shutdown_duration
                .origin
                .invalid(&p.graceful_shutdown_duration.value, e)
        })?;
    let stream_timeouts = stream_timeouts(&p.stream_write_timeout, &p.stream_idle_timeout)?;
    let certificates = match (&p.cert_dir, &p.acme) {
        (Some(dir), None) => ServerCertSource::Manual {
            cert_dir: dir.clone(),
        },
        (None, Some(a)) => ServerCertSource::Acme(acme(label, a)?),
        (Some(dir), Some(_)) => {
            return Err(ConfigError(format!(
                "{label}: server.cert-dir = {:?} and [server.acme] are both set; use one: cert-dir for manual or private-CA certificates, [server.acme] for ACME",
                dir.display().to_string()
            )));
        }
        (None, None) => {
            return Err(ConfigError(format!(
                "{label}: set server.cert-dir or [server.acme]"
            )));
        }
    };

    if p.tunnels.is_empty() {
        return Err(ConfigError(format!(
            "{label}: at least one [[server.tunnels]] entry is required"
        )));
    }
    let mut hostnames_seen = HashMap::new();
    let mut identities_seen: HashMap<ClientIdentity, (usize, String)> = HashMap::new();
    let mut tunnels = Vec::with_capacity(p.tunnels.len());
    for (i, t) in p.tunnels.iter().enumerate() {
        let key = format!("server.tunnels[{i}]");
        let names = match &t.public_hostnames {
            None => {
                return Err(ConfigError(format!(
                    "{label}: {key}.public-hostnames is required: list the hostnames this Tunnel serves"
                )));
            }
            Some(names) if names.is_empty() => {
                return Err(ConfigError(format!(
                    "{label}: {key}.public-hostnames = []: must list at least one hostname"
                )));
            }
            Some(names) => names,
        };
        let key_names = format!("{key}.public-hostnames");
        let public = public_hostnames(label, &key_names, names, &mut hostnames_seen, "Tunnel")?;
        for (j, host) in public.iter().enumerate() {
            if host.as_str() == hostname.as_str() {
                return Err(at(label, format!("{key_names}[{j}]")).invalid(
                    &names[j],
                    format!(
                        "is the Server hostname ({hostname}); the Server hostname is never a Public hostname"
                    ),
                ));
            }
        }

        let identities = one_of(
            label,
            &key,
            ("client-identity", &t.client_identity),
            ("client-identities", &t.client_identities),
            &format!("{key} needs client-identity = \"<64 hex>\" or client-identities = [...]"),
        )?;
        let raw_identities: Vec<(String, &String)> = match identities {
            OneOf::First(one) => vec![(format!("{key}.client-identity"), one)],
            OneOf::Second(list) if list.is_empty() => {
                return Err(ConfigError(format!(
                    "{label}: {key}.client-identities = []: must list at least one identity"
                )));
            }
            OneOf::Second(list) => list
                .iter()
                .enumerate()
                .map(|(j, v)| (format!("{key}.client-identities[{j}]"), v))
                .collect(),
        };
        let mut client_identities = Vec::with_capacity(raw_identities.len());
        for (id_key, raw) in raw_identities {
            let origin = at(label, id_key.clone());
            let id = client_identity(&origin, raw)?;
            if let Some((other, first)) = identities_seen.get(&id) {
                let reason = if *other == i {
                    format!("listed twice in {key} (first at {first})")
                } else {
                    format!(
                        "already pinned by server.tunnels[{other}] ({first}); an identity belongs to exactly one Tunnel"
                    )
                };
                return Err(origin.invalid(raw, reason));
            }
            identities_seen.insert(id, (i, id_key));
            client_identities.push(id);
        }
        tunnels.push(TunnelConfig {
            index: i,
            public_hostnames: public,
            client_identities,
        });
    }

    Ok(ServerConfig {
        source: p.source,
        log_level,
        hostname,
        public_bind_address,
        tunnel_bind_address,
        readiness_bind_address,
        metrics_bind_address,
        control_socket: control_socket(label, "server.control-socket", p.control_socket)?,
        graceful_shutdown_duration,
        stream_timeouts,
        congestion_control: congestion_control(&p.congestion_control)?,
        certificates,
        tunnels,
        relay: p.relay.as_ref().map(|r| relay(label, r)).transpose()?,
    })
}

/// `[server.relay]`.
fn relay(label: &str, r: &super::file::RawRelay) -> Result<RelayServerConfig, ConfigError> {
    let listen = match &r.listen {
        Some(v) => socket_addr(&Val {
            value: v.clone(),
            origin: at(label, "server.relay.listen"),
        })?,
        None => RelayServerConfig::DEFAULT_LISTEN
            .parse()
            .map_err(|_| ConfigError("bad default relay address".into()))?,
    };
    let hint =
        "the control server's relay key: `runewarp control relay-key --config FILE` prints it";
    let given = one_of(
        label,
        "server.relay",
        ("control-key", &r.control_key),
        ("control-key-file", &r.control_key_file),
        &format!("server.relay.control-key is required ({hint}), or control-key-file"),
    )?;
    let (text, key, source) = match given {
        OneOf::First(k) => (
            k.clone(),
            "server.relay.control-key",
            RelayKeySource::Inline,
        ),
        OneOf::Second(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                at(label, "server.relay.control-key-file")
                    .invalid(&path.display().to_string(), format!("cannot read: {e}"))
            })?;
            (
                text.trim().to_string(),
                "server.relay.control-key-file",
                RelayKeySource::File(path.clone()),
            )
        }
    };
    let control_key = crate::mesh_protocol::public_key_bytes(text.trim()).ok_or_else(|| {
        at(label, key).invalid(
            &text,
            format!("must be 32 bytes in base64 (44 characters), {hint}"),
        )
    })?;
    Ok(RelayServerConfig {
        listen,
        control_key,
        control_key_source: source,
    })
}

/// `stream-write-timeout` and `stream-idle-timeout` of either section.
pub(crate) fn stream_timeouts(
    write: &Val<String>,
    idle: &Val<String>,
) -> Result<StreamTimeouts, ConfigError> {
    let one = |v: &Val<String>| {
        let d = parse_duration(&v.value).map_err(|e| v.origin.invalid(&v.value, e))?;
        if d < StreamTimeouts::MIN || d > StreamTimeouts::MAX {
            return Err(v.origin.invalid(
                &v.value,
                "must be between 1s and 168h (a shorter deadline would cut healthy streams that pause; there is no way to turn it off)",
            ));
        }
        Ok(d)
    };
    Ok(StreamTimeouts {
        write: one(write)?,
        idle: one(idle)?,
    })
}

fn port(origin: &Origin, value: &str, text: &str) -> Result<u16, ConfigError> {
    match text.parse::<u16>() {
        Ok(p) if p != 0 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(p),
        _ => Err(origin.invalid(
            value,
            format!("port {text:?} must be a number in 1..=65535"),
        )),
    }
}

/// `host[:port]` with a DNS name host; port defaults to 443.
pub(crate) fn server_address(v: &Val<String>) -> Result<ServerAddress, ConfigError> {
    const DNS_ONLY: &str =
        "IP literals are not allowed: DNS names only; the name must match the Server certificate";
    let text = v.value.as_str();
    if text.starts_with('[') || text.matches(':').count() > 1 {
        return Err(v.origin.invalid(text, DNS_ONLY));
    }
    let (host, port_num) = match text.split_once(':') {
        Some((host, p)) => (host, port(&v.origin, text, p)?),
        None => (text, 443),
    };
    if host.parse::<IpAddr>().is_ok() {
        return Err(v.origin.invalid(text, DNS_ONLY));
    }
    let host = ServerHostname::parse(host).map_err(|e| match e {
        HostnameError::IpLiteral => v.origin.invalid(text, DNS_ONLY),
        e => v.origin.invalid(text, e),
    })?;
    Ok(ServerAddress {
        host,
        port: port_num,
    })
}

/// `host:port`: an IPv4 literal, a bracketed IPv6 literal, or a DNS name
/// (underscores allowed, for container names); the port is required.
pub(crate) fn backend_address(v: &Val<String>) -> Result<BackendAddress, ConfigError> {
    let text = v.value.as_str();
    let origin = &v.origin;
    if let Some(rest) = text.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return Err(origin.invalid(text, "missing ']' after the IPv6 literal"));
        };
        let ip: Ipv6Addr = inside
            .parse()
            .map_err(|_| origin.invalid(text, format!("{inside:?} is not an IPv6 address")))?;
        let Some(p) = after.strip_prefix(':') else {
            return Err(origin.invalid(text, "a port is required, such as [::1]:8443"));
        };
        return Ok(BackendAddress {
            host: ip.to_string(),
            port: port(origin, text, p)?,
        });
    }
    let Some((host, p)) = text.rsplit_once(':') else {
        return Err(origin.invalid(
            text,
            "a port is required: host:port, such as 127.0.0.1:8443",
        ));
    };
    if host.contains(':') {
        return Err(origin.invalid(
            text,
            "write an IPv6 literal in brackets, such as [::1]:8443",
        ));
    }
    let port = port(origin, text, p)?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(BackendAddress {
            host: ip.to_string(),
            port,
        });
    }
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 || !name.split('.').all(valid_label) {
        return Err(origin.invalid(
            text,
            format!("host {host:?} is not an IP literal or a DNS name"),
        ));
    }
    Ok(BackendAddress {
        host: name.to_ascii_lowercase(),
        port,
    })
}

pub(crate) fn validate_client(p: PreparedClient) -> Result<ClientConfig, ConfigError> {
    let label = p.label.as_str();
    let log_level = log_level(&p.log_level)?;
    let address = required(
        label,
        &p.server_address,
        "client.server-address",
        " (or pass --server-address)",
    )?;
    let server_address = server_address(address)?;
    let stream_timeouts = stream_timeouts(&p.stream_write_timeout, &p.stream_idle_timeout)?;

    let server_trust = match (p.server_trust.as_deref(), &p.server_ca_file) {
        (Some("pin"), Some(file)) => {
            return Err(at(label, "client.server-ca-file").invalid(
                &file.display().to_string(),
                "not allowed with client.server-trust = \"pin\" (a pinned Server key needs no CA)",
            ));
        }
        (Some("pin"), None) => match &p.server_pin {
            Some(text) => ServerTrust::Pin(
                ServerPin::parse(text)
                    .map_err(|e| at(label, "client.server-pin").invalid(text, e.to_string()))?,
            ),
            None => {
                return Err(ConfigError(format!(
                    "{label}: client.server-trust = \"pin\" needs client.server-pin (the output of \"runewarp server cert show-pin\" on the Server)"
                )));
            }
        },
        (_, _) if p.server_pin.is_some() => {
            return Err(at(label, "client.server-pin").invalid(
                p.server_pin.as_deref().unwrap_or_default(),
                format!(
                    "only allowed with client.server-trust = \"pin\" (server-trust is {:?})",
                    p.server_trust.as_deref().unwrap_or("system")
                ),
            ));
        }
        (None | Some("system"), None) => ServerTrust::System,
        (Some("ca-file"), Some(file)) => ServerTrust::CaFile(file.clone()),
        (Some("ca-file"), None) => {
            return Err(ConfigError(format!(
                "{label}: client.server-trust = \"ca-file\" needs client.server-ca-file (a PEM bundle of the Server CA)"
            )));
        }
        (None | Some("system"), Some(file)) => {
            return Err(at(label, "client.server-ca-file").invalid(
                &file.display().to_string(),
                "only allowed with client.server-trust = \"ca-file\" (server-trust is \"system\")",
            ));
        }
        (Some(other), _) => {
            return Err(at(label, "client.server-trust")
                .invalid(other, "must be \"system\", \"ca-file\" or \"pin\""));
        }
    };

    if p.services.is_empty() {
        return Err(ConfigError(format!(
            "{label}: at least one [[client.services]] entry is required (or pass --backend-address)"
        )));
    }
    let sole = p.services.len() == 1;
    let mut seen = HashMap::new();
    let mut services = Vec::with_capacity(p.services.len());
    for (i, s) in p.services.iter().enumerate() {
        let key = format!("client.services[{i}]");
        let tls_mode = match s.tls_mode.as_deref() {
            None | Some("passthrough") => TlsMode::Passthrough,
            Some("terminate") => TlsMode::Terminate,
            Some(other) => {
                return Err(at(label, format!("{key}.tls-mode"))
                    .invalid(other, "must be \"passthrough\" or \"terminate\""));
            }
        };
        let public_hostnames = match &s.public_hostnames {
            None if !sole => {
                return Err(ConfigError(format!(
                    "{label}: {key}.public-hostnames is required: only a sole [[client.services]] entry may omit it (the catch-all)"
                )));
            }
            None => {
                if tls_mode == TlsMode::Terminate {
                    return Err(at(label, format!("{key}.tls-mode")).invalid(
                        "terminate",
                        "a catch-all Service (no public-hostnames) must use passthrough; terminate needs explicit public-hostnames",
                    ));
                }
                Vec::new()
            }
            Some(names) if names.is_empty() => {
                return Err(ConfigError(format!(
                    "{label}: {key}.public-hostnames = []: must list at least one hostname (omit the key on a sole catch-all Service)"
                )));
            }
            Some(names) => public_hostnames(
                label,
                &format!("{key}.public-hostnames"),
                names,
                &mut seen,
                "Service",
            )?,
        };
        let proxy_protocol = match s.proxy_protocol.as_deref() {
            None => false,
            Some("v2") => true,
            Some(other) => {
                return Err(at(label, format!("{key}.proxy-protocol"))
                    .invalid(other, "only \"v2\" is supported (omit the key for none)"));
            }
        };
        let Some(backend) = &s.backend_address else {
            return Err(ConfigError(format!(
                "{label}: {key}.backend-address is required"
            )));
        };
        services.push(ServiceConfig {
            index: i,
            public_hostnames,
            backend_address: backend_address(backend)?,
            tls_mode,
            proxy_protocol,
        });
    }

    let terminates = services.iter().any(|s| s.tls_mode == TlsMode::Terminate);
    let public_certs = match (&p.public_cert_dir, &p.acme) {
        (Some(dir), Some(_)) => {
            return Err(ConfigError(format!(
                "{label}: client.public-cert-dir = {:?} and [client.acme] are both set; use one",
                dir.display().to_string()
            )));
        }
        (Some(dir), None) if !terminates => {
            return Err(at(label, "client.public-cert-dir").invalid(
                &dir.display().to_string(),
                "is set but no [[client.services]] entry has tls-mode = \"terminate\"",
            ));
        }
        (None, Some(_)) if !terminates => {
            return Err(ConfigError(format!(
                "{label}: [client.acme] is set but no [[client.services]] entry has tls-mode = \"terminate\""
            )));
        }
        (Some(dir), None) => Some(PublicCertSource::Manual { dir: dir.clone() }),
        (None, Some(a)) => {
            // TLS-ALPN-01 (the only challenge Runewarp answers) cannot
            // prove control of a wildcard: say so before anything runs.
            for s in services.iter().filter(|s| s.tls_mode == TlsMode::Terminate) {
                if let Some((j, h)) = s
                    .public_hostnames
                    .iter()
                    .enumerate()
                    .find(|(_, h)| h.is_wildcard())
                {
                    return Err(at(
                        label,
                        format!("client.services[{}].public-hostnames[{j}]", s.index),
                    )
                    .invalid(
                        h.as_str(),
                        "is a wildcard in a terminate Service with [client.acme]; ACME's TLS-ALPN-01 challenge cannot issue wildcard certificates: use public-cert-dir with a wildcard certificate, or list the names",
                    ));
                }
            }
            Some(PublicCertSource::Acme(acme(label, a)?))
        }
        (None, None) if terminates => {
            return Err(ConfigError(format!(
                "{label}: a Service terminates TLS: set client.public-cert-dir or [client.acme]"
            )));
        }
        (None, None) => None,
    };
    let metrics_bind_address = optional_addr(&p.metrics_bind_address)?;

    let readiness_bind_address = optional_addr(&p.readiness_bind_address)?;

    Ok(ClientConfig {
        source: p.source,
        log_level,
        server_address,
        server_trust,
        identity_dir: p.identity_dir,
        public_certs,
        readiness_bind_address,
        metrics_bind_address,
        control_socket: control_socket(label, "client.control-socket", p.control_socket)?,
        services,
        gates: p.gates,
        stream_timeouts,
        congestion_control: congestion_control(&p.congestion_control)?,
    })
}
