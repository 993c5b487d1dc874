//! The Server's Tunnels at run time: the registry of Tunnels, each one's
//! active [`TunnelConnection`], and the routing table that leads to them.
//!
//! Routing is built from `[[server.tunnels]]` at startup and replaced
//! whole on reload: Public hostname (exact, else a `*.` wildcard) → Tunnel,
//! Client identity → Tunnel. Each Tunnel has at
//! most one active Tunnel connection; a newer authenticated connection
//! replaces the older one, which is closed once its in-flight streams end
//! or after a short grace. Replacements of one Tunnel's connection are at
//! least `MIN_REPLACEMENT_INTERVAL` apart: a newer connection arriving
//! sooner waits (it is not refused), so two instances that keep taking
//! the Tunnel from each other flap at a bounded rate.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::TunnelConfig;
use crate::hostname::HostnameTable;
use crate::identity::ClientIdentity;
use crate::metrics::ServerMetrics;
use crate::sync::{InFlight, InFlightGuard, lock, read, write};

/// How long a replaced connection may keep serving its in-flight streams.
pub(crate) const REPLACEMENT_GRACE: Duration = Duration::from_secs(5);

/// Least time between two replacements of one Tunnel's connection.
pub(crate) const MIN_REPLACEMENT_INTERVAL: Duration = Duration::from_secs(10);
/// An active connection that received no datagram for this long while a
/// newer one waits is taken for dead (our Client sends a keep-alive every
/// second), and the newer one is installed at once.
pub(crate) const INCUMBENT_SILENCE: Duration = Duration::from_millis(1500);

/// Two replacements in opposite directions between the same two peers
/// within this time make a flapping pair.
pub(crate) const FLAP_WINDOW: Duration = Duration::from_secs(5 * 60);

/// One authenticated Tunnel connection.
#[derive(Debug)]
pub struct TunnelConnection {
    /// Process-unique connection number, for logs.
    pub id: u64,
    /// Index of the Tunnel in the config.
    pub tunnel: usize,
    /// The Client identity it authenticated with.
    pub identity: ClientIdentity,
    /// The Client instance's address.
    pub peer: SocketAddr,
    /// The QUIC connection.
    pub conn: quinn::Connection,
    /// When it was authenticated (for status).
    pub established: std::time::SystemTime,
    streams: InFlight,
}

impl TunnelConnection {
    /// Count a Visitor stream as in flight on this connection until the
    /// returned guard is dropped.
    pub(crate) fn begin_stream(&self) -> InFlightGuard {
        self.streams.enter()
    }

    /// Visitor streams in flight on this connection.
    pub(crate) fn streams_in_flight(&self) -> usize {
        self.streams.count()
    }

    /// Wait until no stream is in flight, or `limit` passed.
    pub async fn drained(&self, limit: Duration) -> bool {
        self.streams.drained(limit).await
    }
}

/// Where a Visitor's hostname leads. `C` is the connection handed out
/// (generic so routing decisions can be tested without a QUIC connection).
#[derive(Debug)]
pub enum Route<C = Arc<TunnelConnection>> {
    /// No Tunnel owns this hostname.
    Unknown,
    /// The Tunnel exists but no Client instance is connected.
    NoConnection {
        /// Index of the Tunnel in the config.
        tunnel: usize,
    },
    /// The Tunnel's active Tunnel connection.
    Active(C),
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
        /// The connection it replaced, if any.
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
    /// The two peers, lower address first.
    pub peers: (SocketAddr, SocketAddr),
    /// First time this pair is seen flapping (log it once).
    pub first: bool,
}

/// The routing built from one version of `[[server.tunnels]]`: Public
/// hostname → slot, Client identity → slot. Replaced whole on reload.
#[derive(Debug, Default)]
struct Routing {
    routes: HostnameTable<usize>,
    identities: HashMap<ClientIdentity, usize>,
    /// Each configured Tunnel and the slot holding its connection.
    tunnels: Vec<(usize, TunnelConfig)>,
}

impl Routing {
    fn new(tunnels: Vec<(usize, TunnelConfig)>) -> Self {
        let mut routes = HostnameTable::default();
        let mut identities = HashMap::new();
        for (slot, t) in &tunnels {
            for h in &t.public_hostnames {
                routes.insert(h, *slot);
            }
            for id in &t.client_identities {
                identities.insert(*id, *slot);
            }
        }
        Self {
            routes,
            identities,
            tunnels,
        }
    }
}

/// What [`Registry::reload`] changed.
#[derive(Debug, Default)]
pub struct ReloadDiff {
    /// Names (first hostname) of Tunnels that are new.
    pub tunnels_added: Vec<String>,
    /// Names of Tunnels no longer configured.
    pub tunnels_removed: Vec<String>,
    /// Public hostnames added.
    pub hostnames_added: usize,
    pub(crate) hostnames_removed: usize,
    /// Client identity pins added.
    pub pins_added: usize,
    pub(crate) pins_removed: usize,
    /// Active connections whose identity is no longer pinned by their
    /// Tunnel (or whose Tunnel is gone): the caller closes them.
    pub(crate) disconnect: Vec<Arc<TunnelConnection>>,
}

impl ReloadDiff {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.tunnels_added.is_empty()
            && self.tunnels_removed.is_empty()
            && self.hostnames_added + self.hostnames_removed + self.pins_added + self.pins_removed
                == 0
    }
}

/// Tunnels are numbered by slot: the config index at startup, and slots
/// are only ever added (a Tunnel that keeps one of its pins across a
/// reload keeps its slot, its connection and its streams).
#[derive(Debug)]
pub struct Registry {
    routing: std::sync::RwLock<Arc<Routing>>,
    slots: std::sync::RwLock<Vec<Arc<Slot>>>,
    next_id: AtomicU64,
    metrics: Arc<ServerMetrics>,
    /// Bumped after each reload.
    reloads: tokio::sync::watch::Sender<u64>,
}

impl Registry {
    /// A registry of `tunnels`, numbered by their config index.
    pub fn new(tunnels: &[TunnelConfig]) -> Self {
        let routing = Routing::new(tunnels.iter().cloned().enumerate().collect());
        Self {
            routing: std::sync::RwLock::new(Arc::new(routing)),
            slots: std::sync::RwLock::new(
                tunnels.iter().map(|_| Arc::new(Slot::default())).collect(),
            ),
            next_id: AtomicU64::new(1),
            metrics: Arc::new(ServerMetrics::new(tunnels)),
            reloads: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Changes after every reload.
    pub(crate) fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Whether `key` still routes to the Tunnel in `slot`.
    pub(crate) fn routes_to(&self, key: &str, slot: usize) -> bool {
        self.routing().routes.lookup(key) == Some(&slot)
    }

    fn routing(&self) -> Arc<Routing> {
        read(&self.routing).clone()
    }

    fn slot(&self, slot: usize) -> Arc<Slot> {
        // Slots are only ever added, and every slot number handed out
        // exists; an unknown one gets an empty slot rather than a panic.
        read(&self.slots).get(slot).cloned().unwrap_or_default()
    }

    /// The Server's metrics (labels from these Tunnels).
    pub fn metrics(&self) -> &Arc<ServerMetrics> {
        &self.metrics
    }

    /// Every pinned identity (for the TLS verifier).
    pub fn pins(&self) -> HashSet<ClientIdentity> {
        self.routing().identities.keys().copied().collect()
    }

    pub(crate) fn tunnel_for(&self, identity: &ClientIdentity) -> Option<usize> {
        self.routing().identities.get(identity).copied()
    }

    /// The configured Tunnels with their slots, as of the last (re)load.
    pub fn tunnels(&self) -> Vec<(usize, TunnelConfig)> {
        self.routing().tunnels.clone()
    }

    /// Apply a new `[[server.tunnels]]`: new Tunnels, hostnames and pins
    /// route from now on; a Tunnel sharing a pin with an old one keeps
    /// that one's slot (and connection, if its identity is still pinned).
    /// Established streams are not touched.
    pub fn reload(&self, tunnels: &[TunnelConfig]) -> ReloadDiff {
        let old = self.routing();
        let mut diff = ReloadDiff::default();
        let mut used = HashSet::new();
        let mut next: Vec<(usize, TunnelConfig)> = Vec::with_capacity(tunnels.len());
        for t in tunnels {
            let previous = t
                .client_identities
                .iter()
                .find_map(|id| old.identities.get(id).copied())
                .filter(|slot| !used.contains(slot));
            let slot = match previous {
                Some(slot) => slot,
                None => {
                    let mut slots = write(&self.slots);
                    slots.push(Arc::new(Slot::default()));
                    diff.tunnels_added.push(crate::metrics::tunnel_name(t));
                    slots.len() - 1
                }
            };
            used.insert(slot);
            self.metrics.ensure_tunnel(slot, t);
            next.push((slot, t.clone()));
        }
        for (slot, t) in &old.tunnels {
            if !used.contains(slot) {
                diff.tunnels_removed.push(crate::metrics::tunnel_name(t));
            }
        }
        let names = |r: &Routing| -> HashSet<String> {
            r.tunnels
                .iter()
                .flat_map(|(_, t)| t.public_hostnames.iter().map(|h| h.to_string()))
                .collect()
        };
        let routing = Routing::new(next);
        let (before, after) = (names(&old), names(&routing));
        diff.hostnames_added = after.difference(&before).count();
        diff.hostnames_removed = before.difference(&after).count();
        let pins =
            |r: &Routing| -> HashSet<ClientIdentity> { r.identities.keys().copied().collect() };
        let (before, after) = (pins(&old), pins(&routing));
        diff.pins_added = after.difference(&before).count();
        diff.pins_removed = before.difference(&after).count();
        // Connections whose identity no longer belongs to their slot.
        for (slot, s) in read(&self.slots).iter().enumerate() {
            let mut state = lock(&s.active);
            if let Some(active) = state.active.clone()
                && routing.identities.get(&active.identity) != Some(&slot)
            {
                state.active = None;
                state.waiting = None;
                if let Some(m) = self.metrics.tunnel(slot) {
                    m.connected.set(0);
                }
                diff.disconnect.push(active);
            }
        }
        *write(&self.routing) = Arc::new(routing);
        self.reloads.send_modify(|n| *n += 1);
        diff
    }

    /// Route a normalised SNI (see `crate::hostname::wire_lookup_key`):
    /// an exact Public hostname first, else a wildcard covering it.
    pub fn route(&self, key: &str) -> Route {
        let Some(tunnel) = self.routing().routes.lookup(key).copied() else {
            return Route::Unknown;
        };
        match lock(&self.slot(tunnel).active).active.clone() {
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
            streams: InFlight::default(),
        })
    }

    /// Make `tc` the active connection of its Tunnel, unless the Tunnel's
    /// connection was replaced less than `MIN_REPLACEMENT_INTERVAL` ago
    /// ([`Install::Wait`]) or a newer connection waits for that
    /// ([`Install::Superseded`]).
    pub fn install(&self, tc: &Arc<TunnelConnection>) -> Install {
        self.install_with(tc, false)
    }

    /// [`install`](Self::install); with `incumbent_silent`, the active
    /// connection has received nothing for [`INCUMBENT_SILENCE`] (its
    /// Client crashed or lost its path), so `tc` replaces it without waiting
    /// for the interval: a dead connection cannot flap.
    pub(crate) fn install_with(
        &self,
        tc: &Arc<TunnelConnection>,
        incumbent_silent: bool,
    ) -> Install {
        let now = Instant::now();
        let slot = self.slot(tc.tunnel);
        let mut slot = lock(&slot.active);
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
            if now < next && !incumbent_silent {
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

    /// Datagrams received so far on the Tunnel's active connection: a
    /// count that stops moving means a silent incumbent.
    pub(crate) fn active_rx(&self, tunnel: usize) -> Option<u64> {
        let slot = self.slot(tunnel);
        let slot = lock(&slot.active);
        slot.active
            .as_ref()
            .map(|a| a.conn.stats().udp_rx.datagrams)
    }

    /// Forget `tc` if it is still the active connection of its Tunnel (or
    /// the one waiting to become it). Returns whether it was active.
    pub fn remove(&self, tc: &TunnelConnection) -> bool {
        let slot = self.slot(tc.tunnel);
        let mut slot = lock(&slot.active);
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
    pub(crate) fn active_of(&self, tunnel: usize) -> Option<Arc<TunnelConnection>> {
        read(&self.slots)
            .get(tunnel)
            .and_then(|s| lock(&s.active).active.clone())
    }

    /// Every active connection (for shutdown).
    pub fn active(&self) -> Vec<Arc<TunnelConnection>> {
        read(&self.slots)
            .iter()
            .filter_map(|s| lock(&s.active).active.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostname::PublicHostname;

    fn tunnel(index: usize, hosts: &[&str], pins: &[u8]) -> TunnelConfig {
        TunnelConfig {
            index,
            public_hostnames: hosts
                .iter()
                .map(|h| PublicHostname::parse(h).unwrap())
                .collect(),
            client_identities: pins
                .iter()
                .map(|p| ClientIdentity::parse(&format!("{p:02x}").repeat(32)).unwrap())
                .collect(),
        }
    }

    fn slot_of(r: &Registry, host: &str) -> Option<usize> {
        match r.route(host) {
            Route::Unknown => None,
            Route::NoConnection { tunnel } => Some(tunnel),
            Route::Active(c) => Some(c.tunnel),
        }
    }

    #[test]
    fn a_reload_keeps_the_slot_of_a_tunnel_that_keeps_a_pin_and_adds_new_ones() {
        let r = Registry::new(&[
            tunnel(0, &["a.example"], &[1]),
            tunnel(1, &["b.example"], &[2]),
        ]);
        let mut reloads = r.reloads();
        // The Tunnels swap places in the file, A gains a hostname and a
        // pin, B is dropped, C is new.
        let diff = r.reload(&[
            tunnel(0, &["c.example"], &[3]),
            tunnel(1, &["a.example", "*.a2.example"], &[1, 4]),
        ]);
        assert!(reloads.has_changed().unwrap());
        reloads.mark_unchanged();
        assert_eq!(slot_of(&r, "a.example"), Some(0));
        assert_eq!(slot_of(&r, "x.a2.example"), Some(0));
        assert_eq!(slot_of(&r, "c.example"), Some(2));
        assert_eq!(slot_of(&r, "b.example"), None);
        assert_eq!(diff.tunnels_added, vec!["c.example".to_string()]);
        assert_eq!(diff.tunnels_removed, vec!["b.example".to_string()]);
        assert_eq!((diff.hostnames_added, diff.hostnames_removed), (2, 1));
        assert_eq!((diff.pins_added, diff.pins_removed), (2, 1));
        assert!(r.routes_to("a.example", 0) && !r.routes_to("b.example", 1));
        assert_eq!(r.pins().len(), 3);
        assert_eq!(r.metrics().tunnel(2).unwrap().name, "c.example");
        // The same file again changes nothing.
        let again = r.reload(&[
            tunnel(0, &["c.example"], &[3]),
            tunnel(1, &["a.example", "*.a2.example"], &[1, 4]),
        ]);
        assert!(again.is_empty(), "{again:?}");
        assert_eq!(slot_of(&r, "c.example"), Some(2));
    }
}
