//! What `runewarp client status` shows: a snapshot of the running Client
//! instance as JSON (see [`crate::control_socket`]).

use std::time::SystemTime;

use serde_json::{Value, json};

use crate::client::ClientStatus;
use crate::config::{ClientConfig, TlsMode};
use crate::control_socket::unix;
use crate::identity::ClientIdentity;
use crate::metrics::{ClientMetrics, service_name};

/// The Client instance's state now.
pub fn snapshot(
    config: &ClientConfig,
    services: &[std::sync::Arc<crate::config::ServiceConfig>],
    identity: &ClientIdentity,
    metrics: &ClientMetrics,
    status: &ClientStatus,
    started: SystemTime,
) -> Value {
    let now = SystemTime::now();
    let secs_since = |t: SystemTime| now.duration_since(t).map(|d| d.as_secs()).unwrap_or(0);
    let since = metrics.connected_since();
    let waiting = metrics.waiting();
    let state = if status.connected {
        "connected"
    } else if waiting.is_some() {
        "waiting"
    } else {
        "connecting"
    };
    let services: Vec<Value> = services
        .iter()
        .map(|s| {
            let m = metrics.service(s);
            let count =
                |f: fn(&crate::metrics::ServiceMetrics) -> u64| m.as_ref().map(f).unwrap_or(0);
            json!({
                "name": service_name(s),
                "hostnames": s.public_hostnames.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                "backend": s.backend_address.to_string(),
                "tls_mode": match s.tls_mode {
                    TlsMode::Passthrough => "passthrough",
                    TlsMode::Terminate => "terminate",
                },
                "streams_active": m.as_ref().map(|m| m.streams_active.get().max(0) as u64).unwrap_or(0),
                "streams_total": count(|m| m.streams.get()),
                "bytes_to_backend": count(|m| m.bytes_to_backend.get()),
                "bytes_from_backend": count(|m| m.bytes_from_backend.get()),
                "backend_failures": count(|m| m.backend_failures.get()),
            })
        })
        .collect();
    let fields = json!({
        "server": config.server_address.to_string(),
        "identity": identity.to_string(),
        "tunnel": {
            "state": state,
            "peer": metrics.peer().map(|p| p.to_string()),
            "connected_since": since.map(unix),
            "connected_s": since.map(secs_since),
            "rtt_ms": metrics.rtt().map(|r| r.as_secs_f64() * 1000.0),
            "path": metrics.path().map(|p| json!({
                "congestion_window": p.cwnd,
                "mtu": p.current_mtu,
                "sent_packets": p.sent_packets,
                "lost_packets": p.lost_packets,
                "lost_bytes": p.lost_bytes,
                "congestion_events": p.congestion_events,
            })),
            "connections": status.connections,
            "waiting": waiting.filter(|_| !status.connected).map(|w| json!({
                "reason": w.reason,
                "detail": w.detail,
                "retry_in_s": w.retry_at.duration_since(now).map(|d| d.as_secs()).unwrap_or(0),
            })),
        },
        "services": services,
    });
    let certificates = metrics.certificates();
    crate::control_socket::status_answer("client", started, now, &certificates, fields)
}
