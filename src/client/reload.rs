//! Live reload of a Client instance (SIGHUP): re-read the config; an
//! invalid file (or unreadable terminate certificates or identity) changes
//! nothing. Otherwise the Services are replaced whole, so new and changed
//! Services take the next stream, removed ones take none (streams in flight
//! finish as they are); `public-cert-dir` certificates are re-read; the
//! stream deadlines apply to new streams. A changed `server-address`,
//! `server-trust`/`server-ca-file`/`server-pin`, identity (another
//! `identity-dir` or a new key in the same one) or `congestion-control`
//! closes the Tunnel connection and dials again with the new settings.
//! Keys only a restart applies (listeners, log level, the certificate
//! source) are named in a warning.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::Context;
use super::service::ServiceTable;
use super::terminate::CertificateTable;
use crate::config::{ClientConfig, PublicCertSource, ServiceConfig};
use crate::metrics::service_name;
use crate::tls::material;

/// Reads the config again (same file and overlays) for a reload.
pub type Reloader = Box<dyn Fn() -> Result<ClientConfig, crate::config::ConfigError> + Send + Sync>;

/// What a reload hands the run loop when the tunnel keys changed: dial
/// again with these.
pub(super) struct Redial {
    pub(super) dialer: super::dialer::Dialer,
    pub(super) identity: crate::identity::ClientIdentity,
    pub(super) config: Arc<ClientConfig>,
    /// The keys that changed, for the log line.
    pub(super) changed: Vec<&'static str>,
}

/// Wait for SIGHUP and reload, until the task is aborted.
pub(super) async fn on_sighup(
    reloader: Reloader,
    context: Arc<Context>,
    redial: tokio::sync::mpsc::UnboundedSender<Redial>,
) {
    crate::shutdown::on_each_sighup(|| {
        if let Some(r) = reload(&reloader, &context) {
            // The run loop only ends at shutdown, when nothing is left to
            // redial.
            let _ = redial.send(r);
        }
    })
    .await;
}

fn reload(reloader: &Reloader, context: &Context) -> Option<Redial> {
    let failed = |error: &dyn std::fmt::Display| {
        tracing::error!(event = "reload_failed", error = %error, hint = "nothing was changed; fix it and send SIGHUP again");
        None
    };
    let new = match reloader() {
        Ok(c) => c,
        Err(e) => return failed(&e),
    };
    let (running, identity) = context.running();
    let running = &*running;
    let mut restart = restart_needed(running, &new);
    // The identity is read again even when its directory is the same: a
    // rotated key (`identity init --force`) is a new identity.
    let (dialer, new_identity) = match super::tunnel_dialer(&new) {
        Ok(d) => d,
        Err(e) => return failed(&e),
    };
    let redial_keys = redial_needed(running, &new, identity != new_identity);
    // Terminate certificates from the same public-cert-dir are re-read;
    // a new source needs a restart.
    let certs = match (&running.public_certs, &new.public_certs, &context.certs) {
        (
            Some(PublicCertSource::Manual { dir: a }),
            Some(PublicCertSource::Manual { dir: b }),
            Some(_),
        ) if a == b => {
            match material::load_public_certs(b)
                .map_err(|e| e.to_string())
                .and_then(|c| {
                    let expiry: Vec<(String, Option<i64>)> = c
                        .iter()
                        .map(|(h, m)| {
                            (
                                h.to_string(),
                                m.chain.first().and_then(|d| crate::metrics::not_after(d)),
                            )
                        })
                        .collect();
                    CertificateTable::new(c)
                        .map(|t| (t, expiry))
                        .map_err(|e| e.to_string())
                }) {
                Ok(t) => Some(t),
                Err(e) => return failed(&e),
            }
        }
        (a, b, _) => {
            if a != b {
                restart.push("public-cert-dir/acme");
            }
            None
        }
    };
    let old = context.services();
    let by_name = |s: &[Arc<ServiceConfig>]| -> BTreeMap<String, ServiceConfig> {
        s.iter()
            .map(|s| (service_name(s), strip_index(s)))
            .collect()
    };
    let (before, after) = (
        by_name(old.services()),
        by_name(
            &new.services
                .iter()
                .cloned()
                .map(Arc::new)
                .collect::<Vec<_>>(),
        ),
    );
    let added: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    let removed: Vec<&String> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    let changed = after
        .iter()
        .filter(|(k, v)| before.get(*k).is_some_and(|b| b != *v))
        .count();
    if !restart.is_empty() {
        tracing::warn!(event = "reload_restart_needed", keys = %restart.join(","), hint = "these keys keep their running values until a restart");
    }
    *crate::sync::write(&context.services) = Arc::new(ServiceTable::new(&new.services));
    // Runegate: new allow-lists; sessions of removed addresses end.
    context.gates.reload(&new);
    let certificates = certs.as_ref().map(|(_, e)| e.len()).unwrap_or(0);
    if let (Some((table, expiry)), Some(swap)) = (certs, &context.certs) {
        swap.replace(table);
        for (host, at) in expiry {
            if let Some(at) = at {
                context.metrics.certificate_expiry(&host, at);
            }
        }
    }
    let list = |v: &[&String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")
        }
    };
    tracing::info!(
        event = "config_reloaded",
        services = new.services.len(),
        services_added = %list(&added),
        services_removed = %list(&removed),
        services_changed = changed,
        certificates,
        reconnect = %if redial_keys.is_empty() { "-".to_string() } else { redial_keys.join(",") },
    );
    // What runs from now on: the new file, except the keys only a restart
    // applies.
    let effective = Arc::new(ClientConfig {
        log_level: running.log_level,
        readiness_bind_address: running.readiness_bind_address,
        metrics_bind_address: running.metrics_bind_address,
        control_socket: running.control_socket.clone(),
        public_certs: if restart.contains(&"public-cert-dir/acme") {
            running.public_certs.clone()
        } else {
            new.public_certs.clone()
        },
        ..new
    });
    let (identity, redial) = if redial_keys.is_empty() {
        (identity, None)
    } else {
        (
            new_identity,
            Some(Redial {
                dialer,
                identity: new_identity,
                config: effective.clone(),
                changed: redial_keys,
            }),
        )
    };
    *crate::sync::write(&context.running) = (effective, identity);
    redial
}

/// The tunnel keys whose change closes the Tunnel connection and dials
/// again.
fn redial_needed(old: &ClientConfig, new: &ClientConfig, new_identity: bool) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |changed: bool, key| {
        if changed {
            keys.push(key);
        }
    };
    check(old.server_address != new.server_address, "server-address");
    check(old.server_trust != new.server_trust, "server-trust");
    check(
        old.identity_dir != new.identity_dir || new_identity,
        "identity",
    );
    check(
        old.congestion_control != new.congestion_control,
        "congestion-control",
    );
    keys
}

/// A Service without its position in the file (moving it is no change).
fn strip_index(s: &ServiceConfig) -> ServiceConfig {
    ServiceConfig {
        index: 0,
        ..s.clone()
    }
}

fn restart_needed(old: &ClientConfig, new: &ClientConfig) -> Vec<&'static str> {
    crate::config::changed_keys!(
        old,
        new,
        [
            readiness_bind_address => "readiness-bind-address",
            log_level => "log-level",
            metrics_bind_address => "metrics-bind-address",
            control_socket => "control-socket",
        ]
    )
}
