//! Direct paths in the running data plane (docs/mesh.md, "Direct
//! paths"): path probes on the node's one UDP socket (so the hole a probe
//! punches is the one WireGuard uses), call-me-maybe signals to and from
//! peers, and the candidates this device offers. The decisions are
//! [`crate::node::path`]'s; the format is [`crate::node::probe`]'s.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{Peer, Plane};
use crate::mesh_protocol::MAX_ENDPOINTS;
use crate::node::Signaller;
use crate::node::path::{Moved, Via};
use crate::node::probe::{self, Kind, PathSignal};
use crate::sync::lock;

/// Candidates that do not come from this host's interfaces: the
/// operator's `--endpoint`s (a port forward, a NAT that keeps the port),
/// and server-reflexive addresses a STUN client learns
/// ([`ExtraCandidates::set_reflexive`]). Offered before host candidates.
#[derive(Debug, Default)]
pub struct ExtraCandidates {
    configured: Vec<SocketAddr>,
    reflexive: Mutex<Vec<SocketAddr>>,
    changed: tokio::sync::Notify,
}

impl ExtraCandidates {
    pub fn new(configured: Vec<SocketAddr>) -> Arc<ExtraCandidates> {
        Arc::new(ExtraCandidates {
            configured,
            ..ExtraCandidates::default()
        })
    }

    /// Replace the learned server-reflexive candidates (they are reported
    /// at once if that changes the list). The STUN client feeds this.
    pub fn set_reflexive(&self, addrs: Vec<SocketAddr>) {
        let mut r = lock(&self.reflexive);
        if *r != addrs {
            *r = addrs;
            self.changed.notify_one();
        }
    }

    /// Configured first, then reflexive.
    pub fn list(&self) -> Vec<SocketAddr> {
        let mut out = self.configured.clone();
        out.extend(lock(&self.reflexive).iter().copied());
        out
    }

    /// Wait until [`ExtraCandidates::set_reflexive`] changes something.
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

/// Every candidate of this device, best first: the extra ones, then the
/// host's (see [`super::host_candidates`]), without repeats.
pub fn all_candidates(extra: &ExtraCandidates, port: u16, mesh_interface: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let host = super::host_candidates(port, mesh_interface);
    for c in extra.list().iter().map(|a| a.to_string()).chain(host) {
        if !out.contains(&c) && out.len() < MAX_ENDPOINTS {
            out.push(c);
        }
    }
    out
}

/// A probe-protocol signal from a peer, on its way from the map stream to
/// the data plane.
#[derive(Debug)]
pub struct Call {
    /// The sender's public key (the signal opened with it).
    pub from: [u8; 32],
    pub signal: PathSignal,
}

/// The data plane's direct-path parts.
pub(super) struct Direct {
    pub(super) limit: probe::SourceLimit,
    /// Sends call-me-maybes through the control server.
    pub(super) signaller: Signaller,
    pub(super) calls: tokio::sync::mpsc::Receiver<Call>,
    /// This device's candidates, as last reported.
    pub(super) own: tokio::sync::watch::Receiver<Vec<String>>,
    /// A path changed since the status file was written.
    pub(super) status_dirty: bool,
}

/// Point the peer's WireGuard at what the path rule says now.
pub(super) fn refresh_endpoint(peer: &mut Peer, now: Instant) {
    let via = peer.path.choose(now);
    let endpoint = via.addr();
    if endpoint != peer.endpoint {
        peer.endpoint = endpoint;
        if let Some(ep) = endpoint {
            let path = if matches!(via, Via::Direct(_)) {
                "direct"
            } else {
                "none"
            };
            tracing::info!(event = "peer_endpoint", peer = %peer.hostname, endpoint = %ep, path, reason = "path");
        }
    }
}

fn log_moved(peer: &Peer, m: Moved, now: Instant) {
    let rtt_ms = peer.path.rtt(now).map_or_else(
        || "-".to_string(),
        |d| format!("{:.2}", d.as_secs_f64() * 1000.0),
    );
    let from = m.from.map(|a| a.to_string());
    let from = from.as_deref().unwrap_or("-");
    match m.to {
        Some(to) => {
            tracing::info!(event = "path_changed", peer = %peer.hostname, path = "direct", endpoint = %to, from, reason = m.reason, rtt_ms = %rtt_ms)
        }
        None => {
            tracing::info!(event = "path_changed", peer = %peer.hostname, path = "none", from, reason = m.reason)
        }
    }
}

/// Authenticated WireGuard traffic from `from`: the path is alive (or
/// confirmed, or roamed). True if the path changed.
pub(super) fn heard(peer: &mut Peer, from: SocketAddr) -> bool {
    let now = Instant::now();
    let Some(m) = peer.path.heard(from, now) else {
        return false;
    };
    log_moved(peer, m, now);
    refresh_endpoint(peer, now);
    true
}

impl Plane {
    /// A probe datagram on the socket.
    pub(super) async fn probe_in(&mut self, d: &[u8], from: SocketAddr) {
        let now = Instant::now();
        if !self.direct.limit.allow(from.ip(), now) {
            tracing::debug!(event = "probe_dropped", from = %from, reason = "rate_limited");
            return;
        }
        let Some((_, sender)) = probe::peek(d) else {
            tracing::debug!(event = "probe_dropped", from = %from, reason = "malformed");
            return;
        };
        let Some(peer) = self.peers.get_mut(&sender) else {
            tracing::debug!(event = "probe_dropped", from = %from, reason = "unknown_peer");
            return;
        };
        let Some((kind, tx)) = probe::open(d, &peer.probe_key) else {
            tracing::debug!(event = "probe_dropped", peer = %peer.hostname, from = %from, reason = "bad_tag");
            return;
        };
        match kind {
            Kind::Ping => {
                let me = self.public.as_bytes();
                let pong = probe::encode(Kind::Pong, me, &tx, &peer.probe_key);
                let mut out = vec![(from, pong)];
                // A path may open from the peer's side first: ping back.
                if let Some(tx) = peer.path.pinged(from, now) {
                    out.push((from, probe::encode(Kind::Ping, me, &tx, &peer.probe_key)));
                }
                for (to, d) in out {
                    if let Err(e) = self.udp.send_to(&d, to).await {
                        tracing::debug!(event = "udp_send_failed", peer = %peer.hostname, endpoint = %to, error = %e);
                    }
                }
            }
            Kind::Pong => match peer.path.pong(&tx, now) {
                None => {
                    tracing::debug!(event = "probe_dropped", peer = %peer.hostname, from = %from, reason = "unmatched")
                }
                Some(moved) => {
                    if let Some(m) = moved {
                        log_moved(peer, m, now);
                        self.direct.status_dirty = true;
                    }
                    refresh_endpoint(peer, now);
                }
            },
        }
    }

    /// Every tick: probes due, dead paths, call-me-maybes; all peers again
    /// when this device's own candidates changed (a network change).
    pub(super) async fn paths_tick(&mut self) {
        let now = Instant::now();
        if self.direct.own.has_changed().unwrap_or(false) {
            let own = self.direct.own.borrow_and_update().len();
            tracing::info!(
                event = "candidates_changed",
                count = own,
                peers = self.peers.len()
            );
            for p in self.peers.values_mut() {
                p.path.trigger(now, true);
            }
        }
        let keys: Vec<[u8; 32]> = self.peers.keys().copied().collect();
        for k in keys {
            self.drive(k, now).await;
        }
        if std::mem::take(&mut self.direct.status_dirty) {
            self.write_status();
        }
    }

    /// A probe-protocol signal from a peer.
    pub(super) async fn called(&mut self, call: Call) {
        let now = Instant::now();
        let Some(peer) = self.peers.get_mut(&call.from) else {
            tracing::debug!(event = "path_signal_dropped", reason = "unknown_peer");
            return;
        };
        match call.signal {
            PathSignal::CallMeMaybe { candidates } => {
                tracing::info!(event = "call_me_maybe_received", peer = %peer.hostname, candidates = candidates.len());
                peer.path.called(&candidates, now);
            }
        }
        // Probe back at once: both NATs open at the same time.
        self.drive(call.from, now).await;
    }

    /// What the peer's path state wants done now.
    async fn drive(&mut self, key: [u8; 32], now: Instant) {
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let due = peer.path.poll(now);
        for (to, tx) in &due.pings {
            let d = probe::encode(Kind::Ping, self.public.as_bytes(), tx, &peer.probe_key);
            if let Err(e) = self.udp.send_to(&d, to).await {
                tracing::debug!(event = "udp_send_failed", peer = %peer.hostname, endpoint = %to, error = %e);
            }
        }
        if let Some(m) = due.moved {
            log_moved(peer, m, now);
            self.direct.status_dirty = true;
        }
        refresh_endpoint(peer, now);
        if due.call {
            let signaller = self.direct.signaller.clone();
            let candidates = self.direct.own.borrow().clone();
            let count = candidates.len();
            let message =
                serde_json::to_vec(&PathSignal::CallMeMaybe { candidates }).unwrap_or_default();
            let (id, hostname) = (peer.id, peer.hostname.clone());
            tokio::spawn(async move {
                match signaller.send(id, &key, &message).await {
                    Ok(()) => {
                        tracing::info!(event = "call_me_maybe_sent", peer = %hostname, candidates = count)
                    }
                    Err(e) => {
                        tracing::warn!(event = "call_me_maybe_failed", peer = %hostname, error = %e)
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_candidates_come_first_without_repeats() {
        let extra = ExtraCandidates::new(vec!["198.51.100.1:41641".parse().unwrap()]);
        extra.set_reflexive(vec![
            "203.0.113.5:1234".parse().unwrap(),
            "198.51.100.1:41641".parse().unwrap(),
        ]);
        let all = all_candidates(&extra, 41641, "rw-none");
        assert_eq!(all[0], "198.51.100.1:41641");
        assert_eq!(all[1], "203.0.113.5:1234");
        assert_eq!(all.iter().filter(|c| *c == "198.51.100.1:41641").count(), 1);
        assert!(all.len() <= MAX_ENDPOINTS);
    }
}
