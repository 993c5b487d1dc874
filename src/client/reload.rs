//! Live reload of a Client instance (SIGHUP): re-read the config; an
//! invalid file (or unreadable terminate certificates) changes nothing.
//! Otherwise the Services are replaced whole, so new and changed Services
//! take the next stream, removed ones take none (streams in flight finish
//! as they are); `public-cert-dir` certificates are re-read. Keys only a
//! restart applies (server address, trust, identity, listeners, the
//! certificate source) are named in a warning.

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

/// Wait for SIGHUP and reload, until the task is aborted.
pub(super) async fn on_sighup(
    reloader: Reloader,
    running: Arc<ClientConfig>,
    context: Arc<Context>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!(
            event = "reload_unavailable",
            reason = "cannot install the SIGHUP handler"
        );
        return;
    };
    while hup.recv().await.is_some() {
        reload(&reloader, &running, &context);
    }
}

fn reload(reloader: &Reloader, running: &ClientConfig, context: &Context) {
    let failed = |error: &dyn std::fmt::Display| {
        tracing::error!(event = "reload_failed", error = %error, hint = "nothing was changed; fix it and send SIGHUP again");
    };
    let new = match reloader() {
        Ok(c) => c,
        Err(e) => return failed(&e),
    };
    let mut restart = restart_needed(running, &new);
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
    *context.services.write().unwrap_or_else(|p| p.into_inner()) =
        Arc::new(ServiceTable::new(&new.services));
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
    );
}

/// A Service without its position in the file (moving it is no change).
fn strip_index(s: &ServiceConfig) -> ServiceConfig {
    ServiceConfig {
        index: 0,
        ..s.clone()
    }
}

fn restart_needed(old: &ClientConfig, new: &ClientConfig) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |changed: bool, key| {
        if changed {
            keys.push(key);
        }
    };
    check(old.server_address != new.server_address, "server-address");
    check(
        old.server_trust != new.server_trust,
        "server-trust/server-ca-file",
    );
    check(old.identity_dir != new.identity_dir, "identity-dir");
    check(old.log_level != new.log_level, "log-level");
    check(
        old.metrics_bind_address != new.metrics_bind_address,
        "metrics-bind-address",
    );
    check(old.control_socket != new.control_socket, "control-socket");
    keys
}
