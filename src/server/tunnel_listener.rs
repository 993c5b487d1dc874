//! The tunnel listener: accepts QUIC connections from Client instances,
//! authenticates them by pinned identity (in the TLS handshake) and makes
//! each the active connection of its Tunnel.

use std::sync::Arc;

use crate::server::admission::Admission;
use crate::server::registry::{REPLACEMENT_GRACE, Registry, TunnelConnection};
use crate::shutdown::Shutdown;
use crate::tunnel::transport::{self, HANDSHAKE_DEADLINE, TunnelTls, close_code};

pub async fn serve(
    endpoint: quinn::Endpoint,
    tls: Arc<TunnelTls>,
    registry: Arc<Registry>,
    admission: Arc<Admission>,
    mut shutdown: Shutdown,
) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.wait() => return,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { return };
        // Too many handshakes in progress: refuse the newest.
        let Ok(permit) = admission.handshake() else {
            incoming.refuse();
            continue;
        };
        let (tls, registry) = (tls.clone(), registry.clone());
        tokio::spawn(async move {
            handshake(incoming, tls, registry, permit).await;
        });
    }
}

async fn handshake(
    incoming: quinn::Incoming,
    tls: Arc<TunnelTls>,
    registry: Arc<Registry>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let peer = incoming.remote_address();
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
    let conn = match tokio::time::timeout(HANDSHAKE_DEADLINE, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(error)) => {
            // Refused identities were already logged (rate-limited) by the
            // verifier; other failures (scanners, wrong ALPN) are noise.
            tracing::debug!(event = "tunnel_handshake_failed", %peer, error = ?error.to_string());
            return;
        }
        Err(_) => {
            tracing::info!(event = "tunnel_refused", %peer, reason = "handshake_timeout");
            return;
        }
    };
    // The verifier admitted only pinned identities, so both look-ups hold;
    // stay defensive anyway.
    let Some(identity) = transport::peer_identity(&conn) else {
        conn.close(close_code::UNAUTHORIZED, b"no client certificate");
        return;
    };
    let Some(tunnel) = registry.tunnel_for(&identity) else {
        conn.close(close_code::UNAUTHORIZED, b"identity not pinned");
        return;
    };
    drop(permit);
    let (tc, replaced) = registry.install(tunnel, identity, peer, conn);
    tracing::info!(event = "tunnel_connected", tunnel, %identity, %peer, connection = tc.id);
    if let Some(old) = replaced {
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
    tracing::info!(
        event = "tunnel_closed",
        tunnel = tc.tunnel,
        identity = %tc.identity,
        peer = %tc.peer,
        connection = tc.id,
        reason,
        was_active,
        detail = ?error.to_string(),
    );
}
