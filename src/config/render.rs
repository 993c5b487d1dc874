//! The effective config as TOML: every default filled, paths absolute,
//! durations as `"<n>s"`. The output uses the input's key names and loads
//! back to the same config.

use std::path::{Path, PathBuf};

use super::duration::format_duration;
use super::file::{RawAcme, RawClient, RawFile, RawRelay, RawServer, RawService, RawTunnel};
use super::types::*;

/// A path as TOML text (non-UTF-8 bytes are replaced; such paths cannot be
/// written in a TOML file anyway).
pub(super) fn path(p: &Path) -> PathBuf {
    PathBuf::from(p.to_string_lossy().into_owned())
}

fn acme(a: &AcmeConfig) -> RawAcme {
    RawAcme {
        email: a.email.clone(),
        state_dir: Some(path(&a.state_dir)),
        directory_url: Some(a.directory_url.clone()),
        directory_ca_file: a.directory_ca_file.as_deref().map(path),
    }
}

pub(super) fn header(source: &Option<PathBuf>) -> String {
    match source {
        Some(p) => format!("# Effective configuration (from {})\n", p.display()),
        None => "# Effective configuration (from the command line)\n".to_string(),
    }
}

pub(super) fn to_toml(raw: &RawFile) -> String {
    // Every value is a string, a list of strings or a table of those, which
    // always serializes; fall back to a comment rather than panicking.
    toml::to_string(raw).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

fn relay(r: &RelayServerConfig) -> RawRelay {
    use base64::Engine;
    let (control_key, control_key_file) = match &r.control_key_source {
        RelayKeySource::Inline => (
            Some(base64::engine::general_purpose::STANDARD.encode(r.control_key)),
            None,
        ),
        RelayKeySource::File(p) => (None, Some(path(p))),
    };
    RawRelay {
        listen: Some(r.listen.to_string()),
        control_key,
        control_key_file,
    }
}

/// The effective Server config.
pub(crate) fn render_server(c: &ServerConfig) -> String {
    let (cert_dir, acme_raw) = match &c.certificates {
        ServerCertSource::Manual { cert_dir } => (Some(path(cert_dir)), None),
        ServerCertSource::Acme(a) => (None, Some(acme(a))),
    };
    let raw = RawFile {
        log_level: Some(c.log_level.as_str().to_string()),
        server: Some(RawServer {
            hostname: Some(c.hostname.to_string()),
            public_bind_address: Some(c.public_bind_address.to_string()),
            tunnel_bind_address: Some(c.tunnel_bind_address.to_string()),
            readiness_bind_address: c.readiness_bind_address.map(|a| a.to_string()),
            metrics_bind_address: c.metrics_bind_address.map(|a| a.to_string()),
            control_socket: c.control_socket.as_deref().map(path),
            graceful_shutdown_duration: Some(format_duration(c.graceful_shutdown_duration)),
            stream_write_timeout: Some(format_duration(c.stream_timeouts.write)),
            stream_idle_timeout: Some(format_duration(c.stream_timeouts.idle)),
            congestion_control: Some(c.congestion_control.to_string()),
            cert_dir,
            acme: acme_raw,
            tunnels: Some(
                c.tunnels
                    .iter()
                    .map(|t| {
                        let ids: Vec<String> =
                            t.client_identities.iter().map(|i| i.to_string()).collect();
                        let (one, many) = match ids.as_slice() {
                            [only] => (Some(only.clone()), None),
                            _ => (None, Some(ids)),
                        };
                        RawTunnel {
                            public_hostnames: Some(
                                t.public_hostnames.iter().map(|h| h.to_string()).collect(),
                            ),
                            client_identity: one,
                            client_identities: many,
                        }
                    })
                    .collect(),
            ),
            relay: c.relay.as_ref().map(relay),
        }),
        client: None,
        gate: None,
    };
    header(&c.source) + &to_toml(&raw)
}

/// The effective Client config.
pub(crate) fn render_client(c: &ClientConfig) -> String {
    let (server_trust, server_ca_file, server_pin) = match &c.server_trust {
        ServerTrust::System => ("system", None, None),
        ServerTrust::CaFile(p) => ("ca-file", Some(path(p)), None),
        ServerTrust::Pin(pin) => ("pin", None, Some(pin.to_string())),
    };
    let (public_cert_dir, acme_raw) = match &c.public_certs {
        None => (None, None),
        Some(PublicCertSource::Manual { dir }) => (Some(path(dir)), None),
        Some(PublicCertSource::Acme(a)) => (None, Some(acme(a))),
    };
    let raw = RawFile {
        log_level: Some(c.log_level.as_str().to_string()),
        server: None,
        client: Some(RawClient {
            server_address: Some(c.server_address.to_string()),
            server_trust: Some(server_trust.to_string()),
            server_ca_file,
            server_pin,
            identity_dir: Some(path(&c.identity_dir)),
            public_cert_dir,
            readiness_bind_address: c.readiness_bind_address.map(|a| a.to_string()),
            stream_write_timeout: Some(format_duration(c.stream_timeouts.write)),
            stream_idle_timeout: Some(format_duration(c.stream_timeouts.idle)),
            metrics_bind_address: c.metrics_bind_address.map(|a| a.to_string()),
            control_socket: c.control_socket.as_deref().map(path),
            congestion_control: Some(c.congestion_control.to_string()),
            acme: acme_raw,
            services: Some(
                c.services
                    .iter()
                    .map(|s| RawService {
                        public_hostnames: (!s.public_hostnames.is_empty())
                            .then(|| s.public_hostnames.iter().map(|h| h.to_string()).collect()),
                        backend_address: Some(s.backend_address.to_string()),
                        tls_mode: Some(
                            match s.tls_mode {
                                TlsMode::Passthrough => "passthrough",
                                TlsMode::Terminate => "terminate",
                            }
                            .to_string(),
                        ),
                        proxy_protocol: s.proxy_protocol.then(|| "v2".to_string()),
                        gate: c
                            .gates
                            .services
                            .iter()
                            .find(|g| g.service == s.index)
                            .map(super::gate::raw_service_gate),
                    })
                    .collect(),
            ),
            smtp: c.gates.smtp.as_ref().map(super::gate::raw_smtp),
        }),
        gate: None,
    };
    header(&c.source) + &to_toml(&raw)
}
