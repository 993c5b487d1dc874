//! The Server's routing table and Tunnel registry.
//!
//! Routing is immutable and built at startup from `[[server.tunnels]]`:
//! Public hostname (exact, else a `*.` wildcard) → Tunnel, Client identity → Tunnel. Each Tunnel has at
//! most one active Tunnel connection; a newer authenticated connection
//! replaces the older one, which is closed once its in-flight streams end
//! or after a short grace. Replacements of one Tunnel's connection are at
//! least [`MIN_REPLACEMENT_INTERVAL`] apart: a newer connection arriving
//! sooner waits (it is not refused), so two instances that keep taking
//! the Tunnel from each other flap at a bounded rate.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::config::TunnelConfig;
use crate::hostname::HostnameTable;
use crate::metrics::ServerMetrics;
use crate::tls::client_identity::ClientIdentity;

/// How long a replaced connection may keep serving its in-flight streams.
pub const REPLACEMENT_GRACE: Duration = Duration::from_secs(5);

/// Least time between two replacements of one Tunnel's connection.
pub const MIN_REPLACEMENT_INTERVAL: Duration = Duration::from_secs(10);

/// Two replacements in opposite directions between the same two peers
/// within this time make a flapping pair.
pub const FLAP_WINDOW: Duration = Duration::from_secs(5 * 60);

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
    /// When it was authenticated (for status).
    pub established: std::time::SystemTime,
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
    active: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    active: Option<Arc<TunnelConnection>>,
    /// The last replacement: when, and (old peer, new peer).
    last_replacement: Option<(Instant, SocketAddr, SocketAddr)>,
    /// The newest connection waiting for [`MIN_REPLACEMENT_INTERVAL`].
    waiting: Option<u64>,
    /// The flapping pair last logged (lower address first).
    flapping: Option<(SocketAddr, SocketAddr)>,
}

/// What [`Registry::install`] did.
#[derive(Debug)]
pub enum Install {
    /// The connection is now the active one of its Tunnel.
    Installed {
        replaced: Option<Arc<TunnelConnection>>,
        /// The replacement reversed the previous one between the same two
        /// peers.
        flapping: Option<Flapping>,
    },
    /// The Tunnel's connection was replaced too recently: try again after
    /// this long.
    Wait(Duration),
    /// A newer connection of the same Tunnel is waiting: this one will not
    /// be installed.
    Superseded,
}

/// A pair of peers taking a Tunnel from each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flapping {
    pub peers: (SocketAddr, SocketAddr),
    /// First time this pair is seen flapping (log it once).
    pub first: bool,
}

#[derive(Debug)]
pub struct Registry {
    routes: HostnameTable<usize>,
    identities: HashMap<ClientIdentity, usize>,
    slots: Vec<Slot>,
    next_id: AtomicU64,
    metrics: Arc<ServerMetrics>,
}

impl Registry {
    pub fn new(tunnels: &[TunnelConfig]) -> Self {
        let mut routes = HostnameTable::default();
        let mut identities = HashMap::new();
        for (i, t) in tunnels.iter().enumerate() {
            for h in &t.public_hostnames {
                routes.insert(h, i);
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
            metrics: Arc::new(ServerMetrics::new(tunnels)),
        }
    }

    /// The Server's metrics (labels from these Tunnels).
    pub fn metrics(&self) -> &Arc<ServerMetrics> {
        &self.metrics
    }

    /// Every pinned identity (for the TLS verifier).
    pub fn pins(&self) -> HashSet<ClientIdentity> {
        self.identities.keys().copied().collect()
    }

    pub fn tunnel_for(&self, identity: &ClientIdentity) -> Option<usize> {
        self.identities.get(identity).copied()
    }

    /// Route a normalised SNI (see [`crate::hostname::wire_lookup_key`]):
    /// an exact Public hostname first, else a wildcard covering it.
    pub fn route(&self, key: &str) -> Route {
        let Some(&tunnel) = self.routes.lookup(key) else {
            return Route::Unknown;
        };
        match lock(&self.slots[tunnel].active).active.clone() {
            Some(c) => Route::Active(c),
            None => Route::NoConnection { tunnel },
        }
    }

    /// An authenticated connection of `tunnel`, not yet installed.
    pub fn connection(
        &self,
        tunnel: usize,
        identity: ClientIdentity,
        peer: SocketAddr,
        conn: quinn::Connection,
    ) -> Arc<TunnelConnection> {
        Arc::new(TunnelConnection {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            tunnel,
            identity,
            peer,
            conn,
            established: std::time::SystemTime::now(),
            streams: AtomicUsize::new(0),
            idle: Notify::new(),
        })
    }

    /// Make `tc` the active connection of its Tunnel, unless the Tunnel's
    /// connection was replaced less than [`MIN_REPLACEMENT_INTERVAL`] ago
    /// ([`Install::Wait`]) or a newer connection waits for that
    /// ([`Install::Superseded`]).
    pub fn install(&self, tc: &Arc<TunnelConnection>) -> Install {
        let now = Instant::now();
        let mut slot = lock(&self.slots[tc.tunnel].active);
        if slot.waiting.is_some_and(|w| w > tc.id) {
            return Install::Superseded;
        }
        let Some(old) = slot.active.clone() else {
            slot.waiting = None;
            slot.active = Some(tc.clone());
            return Install::Installed {
                replaced: None,
                flapping: None,
            };
        };
        if let Some((at, _, _)) = slot.last_replacement {
            let next = at + MIN_REPLACEMENT_INTERVAL;
            if now < next {
                slot.waiting = Some(tc.id);
                return Install::Wait(next - now);
            }
        }
        let reversed = slot.last_replacement.is_some_and(|(at, from, to)| {
            now.duration_since(at) < FLAP_WINDOW && from == tc.peer && to == old.peer
        });
        let flapping = reversed.then(|| {
            let peers = if old.peer <= tc.peer {
                (old.peer, tc.peer)
            } else {
                (tc.peer, old.peer)
            };
            let first = slot.flapping != Some(peers);
            slot.flapping = Some(peers);
            Flapping { peers, first }
        });
        slot.last_replacement = Some((now, old.peer, tc.peer));
        slot.waiting = None;
        slot.active = Some(tc.clone());
        Install::Installed {
            replaced: Some(old),
            flapping,
        }
    }

    /// Forget `tc` if it is still the active connection of its Tunnel (or
    /// the one waiting to become it). Returns whether it was active.
    pub fn remove(&self, tc: &TunnelConnection) -> bool {
        let mut slot = lock(&self.slots[tc.tunnel].active);
        if slot.waiting == Some(tc.id) {
            slot.waiting = None;
        }
        if slot.active.as_ref().is_some_and(|a| a.id == tc.id) {
            slot.active = None;
            if let Some(m) = self.metrics.tunnel(tc.tunnel) {
                m.connected.set(0);
            }
            true
        } else {
            false
        }
    }

    /// The active connection of Tunnel `tunnel`, if any.
    pub fn active_of(&self, tunnel: usize) -> Option<Arc<TunnelConnection>> {
        self.slots
            .get(tunnel)
            .and_then(|s| lock(&s.active).active.clone())
    }

    /// Every active connection (for shutdown).
    pub fn active(&self) -> Vec<Arc<TunnelConnection>> {
        self.slots
            .iter()
            .filter_map(|s| lock(&s.active).active.clone())
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the Option half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
