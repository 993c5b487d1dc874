//! The Server's routing table and Tunnel registry.
//!
//! Routing is immutable and built at startup from `[[server.tunnels]]`:
//! Public hostname → Tunnel, Client identity → Tunnel. Each Tunnel has at
//! most one active Tunnel connection; a newer authenticated connection
//! replaces the older one, which is closed once its in-flight streams end
//! or after a short grace.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::config::TunnelConfig;
use crate::hostname::PublicHostname;
use crate::tls::client_identity::ClientIdentity;

/// How long a replaced connection may keep serving its in-flight streams.
pub const REPLACEMENT_GRACE: Duration = Duration::from_secs(5);

/// One authenticated Tunnel connection.
#[derive(Debug)]
pub struct TunnelConnection {
    /// Process-unique connection number, for logs.
    pub id: u64,
    /// Index of the Tunnel in the config.
    pub tunnel: usize,
    pub identity: ClientIdentity,
    pub peer: SocketAddr,
    pub conn: quinn::Connection,
    streams: AtomicUsize,
    idle: Notify,
}

impl TunnelConnection {
    /// Count a Visitor stream as in flight on this connection until the
    /// returned guard is dropped.
    pub fn begin_stream(self: &Arc<Self>) -> StreamGuard {
        self.streams.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }

    pub fn streams_in_flight(&self) -> usize {
        self.streams.load(Ordering::Acquire)
    }

    /// Wait until no stream is in flight, or `limit` passed.
    pub async fn drained(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.idle.notified();
                if self.streams_in_flight() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

/// Marks one Visitor stream in flight.
#[derive(Debug)]
pub struct StreamGuard(Arc<TunnelConnection>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Where a Visitor's hostname leads.
#[derive(Debug)]
pub enum Route {
    /// No Tunnel owns this hostname.
    Unknown,
    /// The Tunnel exists but no Client instance is connected.
    NoConnection {
        tunnel: usize,
    },
    Active(Arc<TunnelConnection>),
}

#[derive(Debug, Default)]
struct Slot {
    active: Mutex<Option<Arc<TunnelConnection>>>,
}

#[derive(Debug)]
pub struct Registry {
    routes: HashMap<PublicHostname, usize>,
    identities: HashMap<ClientIdentity, usize>,
    slots: Vec<Slot>,
    next_id: AtomicU64,
}

impl Registry {
    pub fn new(tunnels: &[TunnelConfig]) -> Self {
        let mut routes = HashMap::new();
        let mut identities = HashMap::new();
        for (i, t) in tunnels.iter().enumerate() {
            for h in &t.public_hostnames {
                routes.insert(h.clone(), i);
            }
            for id in &t.client_identities {
                identities.insert(*id, i);
            }
        }
        Self {
            routes,
            identities,
            slots: tunnels.iter().map(|_| Slot::default()).collect(),
            next_id: AtomicU64::new(1),
        }
    }

    /// Every pinned identity (for the TLS verifier).
    pub fn pins(&self) -> HashSet<ClientIdentity> {
        self.identities.keys().copied().collect()
    }

    pub fn tunnel_for(&self, identity: &ClientIdentity) -> Option<usize> {
        self.identities.get(identity).copied()
    }

    /// Route a normalised SNI (see [`crate::hostname::wire_lookup_key`]).
    pub fn route(&self, key: &str) -> Route {
        let Some(&tunnel) = self.routes.get(key) else {
            return Route::Unknown;
        };
        match lock(&self.slots[tunnel].active).clone() {
            Some(c) => Route::Active(c),
            None => Route::NoConnection { tunnel },
        }
    }

    /// Make `conn` the active connection of `tunnel`; returns the one it
    /// replaced, if any.
    pub fn install(
        &self,
        tunnel: usize,
        identity: ClientIdentity,
        peer: SocketAddr,
        conn: quinn::Connection,
    ) -> (Arc<TunnelConnection>, Option<Arc<TunnelConnection>>) {
        let tc = Arc::new(TunnelConnection {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            tunnel,
            identity,
            peer,
            conn,
            streams: AtomicUsize::new(0),
            idle: Notify::new(),
        });
        let old = lock(&self.slots[tunnel].active).replace(tc.clone());
        (tc, old)
    }

    /// Forget `tc` if it is still the active connection of its Tunnel.
    /// Returns whether it was.
    pub fn remove(&self, tc: &TunnelConnection) -> bool {
        let mut slot = lock(&self.slots[tc.tunnel].active);
        if slot.as_ref().is_some_and(|a| a.id == tc.id) {
            *slot = None;
            true
        } else {
            false
        }
    }

    /// Every active connection (for shutdown).
    pub fn active(&self) -> Vec<Arc<TunnelConnection>> {
        self.slots
            .iter()
            .filter_map(|s| lock(&s.active).clone())
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the Option half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
