//! The tunnel listener: accepts QUIC connections from Client instances,
//! authenticates them by pinned identity (in the TLS handshake) and makes
//! each the active connection of its Tunnel.
//!
//! Handshake admission: while few handshakes are in progress every Initial
//! gets one; beyond [`Limits::handshake_retry_above`] an address QUIC has
//! not validated gets a Retry first, so spoofed or never-completed Initials
//! cannot hold the handshake slots that restarted Clients need. Validated
//! addresses are capped per source.
//!
//! [`Limits::handshake_retry_above`]: crate::server::admission::Limits::handshake_retry_above

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::server::admission::{Admission, HandshakePermit, Scope};
use crate::server::tunnels::{
    INCUMBENT_SILENCE, Install, REPLACEMENT_GRACE, Registry, TunnelConnection,
};
use crate::shutdown::Shutdown;
use crate::sync::AbortOnDrop;
use crate::tunnel::transport::{self, TunnelTls, close_code};

/// How often failed handshakes are summarised at `info`.
pub(crate) const HANDSHAKE_SUMMARY_INTERVAL: Duration = Duration::from_secs(60);
/// How often a waiting connection looks at whether the active one still
/// receives anything.
const INCUMBENT_CHECK: Duration = Duration::from_millis(250);

/// Failed handshakes since the last summary (per-handshake lines are
/// debug: anyone can start a handshake).
#[derive(Debug, Default)]
struct Failures {
    timeout: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    retried: AtomicU64,
}

pub async fn serve(
    endpoint: quinn::Endpoint,
    tls: Arc<TunnelTls>,
    registry: Arc<Registry>,
    admission: Arc<Admission>,
    mut shutdown: Shutdown,
) {
    let failures = Arc::new(Failures::default());
    let summary = tokio::spawn(summarise(failures.clone()));
    let _summary = AbortOnDrop::new(summary);
    loop {
        let incoming = tokio::select! {
            _ = shutdown.wait() => return,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { return };
        let peer = incoming.remote_address();
        let validated = incoming.remote_address_validated();
        let permit = match admission.handshake(peer.ip(), validated) {
            Ok(permit) => permit,
            Err(Scope::UnvalidatedHandshakes) if incoming.may_retry() => {
                // Costs one small packet and no state: a real Client
                // answers with the token and comes back validated.
                failures.retried.fetch_add(1, Ordering::Relaxed);
                registry.metrics().tunnel_refused("retry_sent");
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            Err(_) => {
                // Too many handshakes in progress: refuse the newest.
                failures.refused.fetch_add(1, Ordering::Relaxed);
                registry.metrics().tunnel_refused("overloaded");
                incoming.refuse();
                continue;
            }
        };
        let (tls, registry, failures) = (tls.clone(), registry.clone(), failures.clone());
        let deadline = admission.limits().handshake_deadline;
        tokio::spawn(async move {
            handshake(incoming, tls, registry, permit, deadline, failures).await;
        });
    }
}

async fn handshake(
    incoming: quinn::Incoming,
    tls: Arc<TunnelTls>,
    registry: Arc<Registry>,
    permit: HandshakePermit,
    deadline: Duration,
    failures: Arc<Failures>,
) {
    let peer = incoming.remote_address();
    let started = std::time::Instant::now();
    let metrics = registry.metrics().clone();
    let config = match tls.config(Some(peer)) {
        Ok(c) => Arc::new(c),
        Err(error) => {
            tracing::error!(event = "tunnel_refused", %peer, reason = "tls_config", error = ?error.to_string());
            incoming.refuse();
            return;
        }
    };
    let connecting = match incoming.accept_with(config) {
        Ok(c) => c,
        Err(error) => {
            tracing::debug!(event = "tunnel_refused", %peer, reason = "accept_failed", error = ?error.to_string());
            return;
        }
    };
    let conn = match tokio::time::timeout(deadline, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(error)) => {
            // Refused identities were already logged (rate-limited) by the
            // verifier; other failures (scanners, wrong ALPN) are noise.
            failures.failed.fetch_add(1, Ordering::Relaxed);
            metrics.tunnel_refused("handshake_failed");
            tracing::debug!(event = "tunnel_handshake_failed", %peer, error = ?error.to_string());
            return;
        }
        Err(_) => {
            failures.timeout.fetch_add(1, Ordering::Relaxed);
            metrics.tunnel_refused("handshake_timeout");
            tracing::debug!(event = "tunnel_refused", %peer, reason = "handshake_timeout");
            return;
        }
    };
    crate::metrics::observe_since(&metrics.handshake_duration, started);
    // The verifier admitted only pinned identities, so both look-ups hold;
    // stay defensive anyway.
    let Some(identity) = transport::peer_identity(&conn) else {
        metrics.tunnel_refused("unauthorized");
        conn.close(close_code::UNAUTHORIZED, b"no client certificate");
        return;
    };
    let Some(tunnel) = registry.tunnel_for(&identity) else {
        metrics.tunnel_refused("unauthorized");
        conn.close(close_code::UNAUTHORIZED, b"identity not pinned");
        return;
    };
    drop(permit);
    let tc = registry.connection(tunnel, identity, peer, conn);
    let mut incumbent_silent = false;
    let (replaced, flapping) = loop {
        match registry.install_with(&tc, incumbent_silent) {
            Install::Installed { replaced, flapping } => break (replaced, flapping),
            Install::Wait(delay) => {
                tracing::debug!(
                    event = "tunnel_replacement_deferred",
                    tunnel,
                    %identity,
                    %peer,
                    connection = tc.id,
                    wait_ms = delay.as_millis() as u64,
                );
                // Wait out the interval, unless the active connection falls
                // silent meanwhile (a crashed Client being restarted): then
                // replace it at once.
                let deadline = tokio::time::Instant::now() + delay;
                let mut rx = registry.active_rx(tunnel);
                let mut quiet_since = tokio::time::Instant::now();
                loop {
                    let tick = (tokio::time::Instant::now() + INCUMBENT_CHECK).min(deadline);
                    tokio::select! {
                        _ = tokio::time::sleep_until(tick) => {}
                        _ = tc.conn.closed() => {
                            registry.remove(&tc);
                            tracing::debug!(event = "tunnel_closed", tunnel, %identity, %peer, connection = tc.id, reason = "closed_while_waiting");
                            return;
                        }
                    }
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        break;
                    }
                    let current = registry.active_rx(tunnel);
                    if current != rx {
                        rx = current;
                        quiet_since = now;
                    } else if now.duration_since(quiet_since) >= INCUMBENT_SILENCE {
                        incumbent_silent = true;
                        break;
                    }
                }
            }
            Install::Superseded => {
                tc.conn
                    .close(close_code::REPLACED, b"replaced by a newer connection");
                tracing::debug!(event = "tunnel_superseded", tunnel, %identity, %peer, connection = tc.id);
                return;
            }
        }
    };
    tracing::info!(event = "tunnel_connected", tunnel, %identity, %peer, connection = tc.id);
    if let Some(m) = metrics.tunnel(tunnel) {
        m.connected.set(1);
        m.connections.inc();
        if replaced.is_some() {
            m.replaced.inc();
        }
    }
    if let Some(flap) = flapping.filter(|f| f.first) {
        tracing::warn!(
            event = "tunnel_flapping",
            tunnel,
            %identity,
            peer_a = %flap.peers.0,
            peer_b = %flap.peers.1,
            min_interval_s = crate::server::tunnels::MIN_REPLACEMENT_INTERVAL.as_secs(),
            hint = "two Client instances keep taking this Tunnel from each other; give each its own identity and Tunnel",
        );
    }
    if let Some(old) = replaced {
        if flapping.is_some() {
            tracing::debug!(event = "tunnel_replaced", tunnel, %identity, old_peer = %old.peer, new_peer = %peer, old_connection = old.id, new_connection = tc.id);
        } else {
            tracing::info!(
                event = "tunnel_replaced",
                tunnel,
                %identity,
                old_peer = %old.peer,
                new_peer = %peer,
                old_connection = old.id,
                new_connection = tc.id,
                streams_in_flight = old.streams_in_flight(),
            );
        }
        tokio::spawn(retire(old));
    }
    watch(tc, registry).await;
}

/// Close a replaced connection once its in-flight streams have finished,
/// or after the grace period.
async fn retire(old: Arc<TunnelConnection>) {
    let drained = old.drained(REPLACEMENT_GRACE).await;
    old.conn
        .close(close_code::REPLACED, b"replaced by a newer connection");
    tracing::debug!(
        event = "tunnel_retired",
        tunnel = old.tunnel,
        connection = old.id,
        drained
    );
}

/// Wait for the connection to end and forget it.
async fn watch(tc: Arc<TunnelConnection>, registry: Arc<Registry>) {
    let error = tc.conn.closed().await;
    let was_active = registry.remove(&tc);
    let reason = match &error {
        // We closed it ourselves after a newer connection took over.
        quinn::ConnectionError::LocallyClosed if !was_active => "replaced",
        quinn::ConnectionError::ApplicationClosed(_) => "client_closed",
        quinn::ConnectionError::LocallyClosed => "server_closed",
        quinn::ConnectionError::TimedOut => "idle_timeout",
        quinn::ConnectionError::Reset => "reset",
        _ => "connection_lost",
    };
    tunnel_info!(
        tc,
        "tunnel_closed",
        reason,
        was_active,
        detail = ?error.to_string(),
    );
}

/// One line per interval summarising failed, refused and retried
/// handshakes, if any.
async fn summarise(f: Arc<Failures>) {
    let mut tick = tokio::time::interval(HANDSHAKE_SUMMARY_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        let take = |c: &AtomicU64| c.swap(0, Ordering::Relaxed);
        let (timeout, failed, refused, retried) = (
            take(&f.timeout),
            take(&f.failed),
            take(&f.refused),
            take(&f.retried),
        );
        if timeout + failed + refused + retried > 0 {
            tracing::info!(
                event = "tunnel_handshake_summary",
                window_s = HANDSHAKE_SUMMARY_INTERVAL.as_secs(),
                timeout,
                failed,
                refused,
                retried,
            );
        }
    }
}
