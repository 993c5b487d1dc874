//! What `runewarp server status` shows: a snapshot of the running Server
//! as JSON (see [`crate::control_socket`]).

use std::time::SystemTime;

use serde_json::{Value, json};

use crate::config::ServerConfig;
use crate::control_socket::unix;
use crate::metrics::tunnel_name;
use crate::server::public_listener::DropReason;
use crate::server::tunnels::Registry;

/// The Server's state now.
pub fn snapshot(config: &ServerConfig, registry: &Registry, started: SystemTime) -> Value {
    let now = SystemTime::now();
    let metrics = registry.metrics();
    let dropped: serde_json::Map<String, Value> = DropReason::ALL
        .iter()
        .map(|r| (r.as_str().to_string(), metrics.dropped(r.as_str())))
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| (r, json!(n)))
        .collect();
    let tunnels: Vec<Value> = registry
        .tunnels()
        .iter()
        .map(|(slot, t)| {
            let m = metrics.tunnel(*slot);
            let count =
                |f: fn(&crate::metrics::TunnelMetrics) -> u64| m.as_ref().map(f).unwrap_or(0);
            let active = registry.active_of(*slot);
            let (state, peer, identity, since) = match &active {
                Some(c) => (
                    "connected",
                    json!(c.peer.to_string()),
                    json!(c.identity.to_string()),
                    Some(c.established),
                ),
                None => ("not_connected", Value::Null, Value::Null, None),
            };
            json!({
                "name": tunnel_name(t),
                "hostnames": t.public_hostnames.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                "identities": t.client_identities.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "state": state,
                "peer": peer,
                "identity": identity,
                "connected_since": since.map(unix),
                "connected_s": since.map(|s| now.duration_since(s).map(|d| d.as_secs()).unwrap_or(0)),
                "streams_active": active.as_ref().map(|c| c.streams_in_flight()).unwrap_or(0),
                "streams_total": count(|m| m.streams.get()),
                "bytes_to_client": count(|m| m.bytes_to_client.get()),
                "bytes_to_visitor": count(|m| m.bytes_to_visitor.get()),
                "connections": count(|m| m.connections.get()),
                "replaced": count(|m| m.replaced.get()),
            })
        })
        .collect();
    let fields = json!({
        "hostname": config.hostname.to_string(),
        "visitors": {
            "accepted": metrics.visitors_accepted.get(),
            "dropped": dropped,
        },
        "tunnels": tunnels,
    });
    let certificates = metrics.certificates();
    crate::control_socket::status_answer("server", started, now, &certificates, fields)
}
