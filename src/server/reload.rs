//! Live reload (SIGHUP): re-read the config and apply the Tunnel changes
//! as a diff. An invalid file changes nothing. New Tunnels, hostnames and
//! pins route at once; Visitor streams of a hostname that no longer routes
//! to their Tunnel may finish within `graceful-shutdown-duration`; a
//! connection whose identity is no longer pinned by its Tunnel gets the
//! same time for its streams and is then closed. Untouched Tunnels and
//! their streams are not disturbed. Keys that only a restart applies
//! (listeners, Server hostname, certificates) are named in a warning.

use std::sync::Arc;

use crate::config::ServerConfig;
use crate::server::Reloader;
use crate::server::tunnels::{Registry, TunnelConnection};
use crate::tunnel::transport::{TunnelTls, close_code};

/// Wait for SIGHUP and reload, until the task is aborted.
pub(crate) async fn on_sighup(
    reloader: Reloader,
    config: Arc<ServerConfig>,
    registry: Arc<Registry>,
    tls: Arc<TunnelTls>,
) {
    crate::shutdown::on_each_sighup(|| reload(&reloader, &config, &registry, &tls)).await;
}

/// One reload: read, check, apply, log one line.
pub fn reload(reloader: &Reloader, running: &ServerConfig, registry: &Registry, tls: &TunnelTls) {
    let new = match reloader() {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(event = "reload_failed", error = %error, hint = "nothing was changed; fix the file and send SIGHUP again");
            return;
        }
    };
    let restart = restart_needed(running, &new);
    if !restart.is_empty() {
        tracing::warn!(
            event = "reload_restart_needed",
            keys = %restart.join(","),
            hint = "these keys keep their running values until a restart",
        );
    }
    let diff = registry.reload(&new.tunnels);
    tls.set_pins(registry.pins());
    let disconnected = diff.disconnect.len();
    for tc in diff.disconnect {
        tokio::spawn(disconnect(tc, running.graceful_shutdown_duration));
    }
    tracing::info!(
        event = "config_reloaded",
        tunnels = new.tunnels.len(),
        tunnels_added = %list(&diff.tunnels_added),
        tunnels_removed = %list(&diff.tunnels_removed),
        hostnames_added = diff.hostnames_added,
        hostnames_removed = diff.hostnames_removed,
        pins_added = diff.pins_added,
        pins_removed = diff.pins_removed,
        disconnected,
    );
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "-".to_string()
    } else {
        names.join(",")
    }
}

/// A connection whose identity is no longer pinned: no new streams reach
/// it (it left its slot); its streams get the graceful window, then it is
/// closed.
async fn disconnect(tc: Arc<TunnelConnection>, window: std::time::Duration) {
    tunnel_info!(
        tc,
        "tunnel_disconnecting",
        reason = "pin_removed",
        streams_in_flight = tc.streams_in_flight(),
    );
    let drained = tc.drained(window).await;
    tc.conn
        .close(close_code::UNAUTHORIZED, b"identity no longer pinned");
    tracing::debug!(event = "tunnel_disconnected", connection = tc.id, drained);
}

/// Keys whose change a reload does not apply.
fn restart_needed(old: &ServerConfig, new: &ServerConfig) -> Vec<&'static str> {
    crate::config::changed_keys!(
        old,
        new,
        [
            hostname => "hostname",
            log_level => "log-level",
            public_bind_address => "public-bind-address",
            tunnel_bind_address => "tunnel-bind-address",
            readiness_bind_address => "readiness-bind-address",
            metrics_bind_address => "metrics-bind-address",
            control_socket => "control-socket",
            graceful_shutdown_duration => "graceful-shutdown-duration",
            certificates => "cert-dir/acme",
            relay => "relay",
        ]
    )
}
