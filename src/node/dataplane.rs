//! The mesh data plane (issue 17, first slice): userspace WireGuard
//! (boringtun's `noise::Tunn`, one per peer) between a TUN device and one
//! UDP socket, driven by the network map the control side follows.
//!
//! - The TUN device carries this device's mesh addresses; each peer's
//!   `allowed_ips` are routed to it (rtnetlink, [`super::route`]).
//!   Peers are added, changed and removed as maps arrive; a change to one
//!   peer leaves every other peer's session alone.
//! - One UDP socket (`--listen-port`) carries WireGuard, path probes and
//!   (in a later slice) STUN, told apart by their first bytes (see
//!   [`classify`]).
//! - A peer's endpoint follows the path rule of [`super::path`]: a direct
//!   endpoint confirmed by a probe answer or authenticated traffic (see
//!   [`direct`]), else the first usable candidate in the map (the
//!   peer's `--endpoint`s and host addresses, which its node reports with
//!   `POST /v1/endpoints`).
//! - Decapsulated packets must come from the sending peer's own addresses
//!   and pass the map's filter ([`super::filter`]) before they reach the
//!   TUN device.
//! - Every few seconds the state dir's `dataplane.json` (0600) records,
//!   per peer, the endpoint, the last handshake and the bytes each way,
//!   for `node status`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;

use super::filter::{Filter, Net};
use super::path::PeerPath;
use super::relay_client::{self, RelayClient, Route};
use super::{ControlUrl, Node, NodeError, post_json, route};
use crate::fsutil;
use crate::mesh_protocol::{EndpointsRequest, MAX_ENDPOINTS, NetworkMap};
use crate::shutdown::Shutdown;

pub mod direct;

/// The data plane's status for `node status`, in the state dir.
pub const STATUS_FILE: &str = "dataplane.json";
/// The default UDP port.
pub const DEFAULT_PORT: u16 = 41641;
/// The TUN device's MTU: 1500 minus IPv4, UDP and WireGuard overhead,
/// with room for an IPv6 underlay.
const MTU: u16 = 1420;
/// Keepalive towards each peer, so NAT mappings along the path stay.
const PERSISTENT_KEEPALIVE_S: u16 = 25;
/// How often WireGuard's timers run.
const TICK: Duration = Duration::from_millis(250);
/// How often the status file is written.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// How often the host candidates are looked at (and reported if changed):
/// a network change is noticed within this.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// What the first bytes of a datagram on the node's socket say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram {
    /// WireGuard: message type 1 to 4, then three zero bytes.
    WireGuard,
    /// STUN (RFC 8489): the magic cookie 0x2112A442 at offset 4. Reserved
    /// for the reflexive-address slice; ignored for now.
    Stun,
    /// A runewarp path probe: `RWP` and a version byte
    /// ([`super::probe`]).
    Probe,
    /// A relay frame: `RWR` and a version byte ([`relay_client`]).
    Relay,
    Unknown,
}

/// The magic that opens a path probe.
pub const PROBE_MAGIC: &[u8; 3] = b"RWP";

/// Tell the node socket's traffic apart by its first bytes.
pub fn classify(d: &[u8]) -> Datagram {
    match d {
        [1..=4, 0, 0, 0, ..] => Datagram::WireGuard,
        [a, b, c, _, ..] if [*a, *b, *c] == *PROBE_MAGIC => Datagram::Probe,
        [a, b, c, _, ..] if [*a, *b, *c] == *crate::relay_protocol::MAGIC => Datagram::Relay,
        [a, _, _, _, 0x21, 0x12, 0xa4, 0x42, ..] if a & 0xc0 == 0 => Datagram::Stun,
        _ => Datagram::Unknown,
    }
}

/// `node up --tun NAME --listen-port PORT`.
#[derive(Debug, Clone)]
pub struct Options {
    pub interface: String,
    pub listen_port: u16,
    /// `--endpoint`: public addresses the operator knows this node is
    /// reachable at, offered ahead of the host's.
    pub endpoints: Vec<SocketAddr>,
}

/// `dataplane.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub interface: String,
    pub listen_port: u16,
    /// Seconds since the Unix epoch of this write.
    pub updated_unix: u64,
    /// Packets from peers the filter dropped since start.
    pub filter_drops: u64,
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub hostname: String,
    pub public_key: String,
    /// Where WireGuard sends to (`IP:PORT`), if anywhere.
    pub endpoint: Option<String>,
    /// `direct` (a confirmed direct path), `relay` or `none`.
    pub path: String,
    /// Round-trip time: the direct path's smoothed RTT from probes; on
    /// any other path (the relay) the last WireGuard handshake's round
    /// trip, when this node initiated it.
    #[serde(default)]
    pub rtt_ms: Option<u64>,
    /// Seconds since the current session's handshake (none: no session).
    pub last_handshake_s: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

struct Peer {
    id: i64,
    hostname: String,
    index: u32,
    tunn: Box<Tunn>,
    allowed: Vec<Net>,
    endpoint: Option<SocketAddr>,
    /// The direct-path state: candidates, probes, the confirmed endpoint.
    path: PeerPath,
    /// Authenticates probes between this device and the peer.
    probe_key: ring::hmac::Key,
}

impl Peer {
    /// Where this peer's datagrams go now (the path rule in docs/mesh.md): a
    /// confirmed direct path, else the relay, else the first map
    /// candidate.
    fn route(&self, relay: &RelayClient, now: Instant) -> Route {
        relay_client::route(self.path.direct(now), relay.target(), self.endpoint)
    }
}

/// Send one WireGuard datagram for the peer `key` along its route.
async fn transmit(udp: &UdpSocket, relay: &mut RelayClient, key: &[u8; 32], peer: &Peer, b: &[u8]) {
    match peer.route(relay, Instant::now()) {
        Route::Udp(ep) => {
            if let Err(e) = udp.send_to(b, ep).await {
                tracing::debug!(event = "udp_send_failed", peer = %peer.hostname, endpoint = %ep, error = %e);
            }
        }
        Route::Relay(at) => relay.send(udp, at, key, b).await,
        Route::None => tracing::debug!(event = "packet_no_endpoint", peer = %peer.hostname),
    }
}

struct Plane {
    secret: x25519_dalek::StaticSecret,
    public: x25519_dalek::PublicKey,
    interface: String,
    ifindex: u32,
    listen_port: u16,
    state_dir: PathBuf,
    tun: tun_rs::AsyncDevice,
    udp: UdpSocket,
    peers: HashMap<[u8; 32], Peer>,
    by_index: HashMap<u32, [u8; 32]>,
    next_index: u32,
    filter: Filter,
    filter_drops: u64,
    out: Vec<u8>,
    relay: RelayClient,
    direct: direct::Direct,
    /// Where a reflexive address the relay reports (STUN) goes.
    extra: Arc<direct::ExtraCandidates>,
}

/// The running data plane: its tasks stop when this is dropped or at
/// shutdown; the TUN device (and with it its routes) goes with them.
pub struct Dataplane {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn failed(what: &str) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |e| {
        let hint = match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => {
                " (the data plane needs CAP_NET_ADMIN: run as root or grant the capability)"
            }
            Some(libc::ENOENT) if what.contains("TUN") => " (is /dev/net/tun there?)",
            _ => "",
        };
        NodeError::Dataplane(format!("{what}: {e}{hint}"))
    }
}

/// Make the TUN device and the socket, then run the data plane in the
/// background until `shutdown`.
pub async fn start(
    node: &Node,
    options: &Options,
    shutdown: Shutdown,
) -> Result<Dataplane, NodeError> {
    let own: Vec<IpAddr> = node
        .enrolment
        .addresses
        .iter()
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect();
    let Some(v4) = own.iter().find_map(|a| match a {
        IpAddr::V4(a) => Some(*a),
        _ => None,
    }) else {
        return Err(NodeError::Dataplane(
            "the enrolment holds no IPv4 mesh address".into(),
        ));
    };
    let tun = tun_rs::DeviceBuilder::new()
        .name(&options.interface)
        .mtu(MTU)
        .ipv4(v4, 32u8, None)
        .enable(true)
        .build_async()
        .map_err(failed(&format!(
            "creating TUN device {}",
            options.interface
        )))?;
    for a in &own {
        if let IpAddr::V6(a) = a
            && let Err(e) = tun.add_address_v6(*a, 128u8)
        {
            tracing::warn!(event = "dataplane_address_failed", interface = %options.interface, address = %a, error = %e);
        }
    }
    let ifindex = route::ifindex(&options.interface)
        .map_err(failed(&format!("interface {}", options.interface)))?;
    let udp = bind(options.listen_port)
        .map_err(failed(&format!("binding UDP port {}", options.listen_port)))?;
    let listen_port = udp.local_addr().map(|a| a.port()).unwrap_or(0);
    tracing::info!(event = "dataplane_started", interface = %options.interface, address = %v4, listen_port, mtu = MTU);
    let extra = direct::ExtraCandidates::new(options.endpoints.clone());
    let (own_tx, own) = tokio::sync::watch::channel(Vec::new());
    let calls = node.take_path_signals();
    let plane = Plane {
        secret: node.secret.clone(),
        public: x25519_dalek::PublicKey::from(&node.secret),
        interface: options.interface.clone(),
        ifindex,
        listen_port,
        state_dir: node.state_dir.clone(),
        tun,
        udp,
        peers: HashMap::new(),
        by_index: HashMap::new(),
        next_index: rand::random::<u32>() & 0xff_ffff,
        filter: Filter::default(),
        filter_drops: 0,
        out: vec![0u8; 65_536 + 256],
        relay: RelayClient::default(),
        direct: direct::Direct {
            limit: Default::default(),
            signaller: node.signaller(),
            calls,
            own,
            status_dirty: false,
        },
        extra: extra.clone(),
    };
    // Until the stream delivers, start from the last map this device
    // received: traffic flows while the control server is away.
    if node.maps.borrow().is_none()
        && let Some(map) = std::fs::read(node.state_dir.join(super::NETMAP_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<NetworkMap>(&b).ok())
    {
        tracing::info!(event = "dataplane_cached_map", serial = map.serial);
        node.maps.send_replace(Some(map));
    }
    let maps = node.maps.subscribe();
    let main = tokio::spawn(plane.run(maps, shutdown.clone()));
    let reporter = tokio::spawn(report(
        node.url.clone(),
        node.tls.clone(),
        node.enrolment.token.clone(),
        listen_port,
        options.interface.clone(),
        (extra, own_tx),
        shutdown,
    ));
    Ok(Dataplane {
        tasks: vec![main, reporter],
    })
}

fn bind(port: u16) -> std::io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Larger buffers smooth bursts; the kernel caps them at rmem_max.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    UdpSocket::from_std(s.into())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Plane {
    async fn run(
        mut self,
        mut maps: tokio::sync::watch::Receiver<Option<NetworkMap>>,
        mut shutdown: Shutdown,
    ) {
        let mut from_tun = vec![0u8; 65_536];
        let mut from_udp = vec![0u8; 65_536];
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status_at = Instant::now();
        let current = maps.borrow_and_update().clone();
        if let Some(m) = current {
            self.apply(&m);
        }
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                r = self.tun.recv(&mut from_tun) => match r {
                    Ok(n) => self.outgoing(&from_tun[..n]).await,
                    Err(e) => {
                        tracing::warn!(event = "tun_read_failed", interface = %self.interface, error = %e);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                r = self.udp.recv_from(&mut from_udp) => match r {
                    Ok((n, from)) => self.incoming(&from_udp[..n], from).await,
                    Err(e) => tracing::debug!(event = "udp_read_failed", error = %e),
                },
                Some(frame) = self.relay.tcp_frame() => {
                    if let Some(at) = self.relay.address() {
                        self.incoming(&frame, at).await;
                    }
                }
                Some(call) = self.direct.calls.recv() => self.called(call).await,
                changed = maps.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let m = maps.borrow_and_update().clone();
                    if let Some(m) = m {
                        self.apply(&m);
                        // New peers and candidates are probed at once.
                        self.paths_tick().await;
                    }
                }
                _ = tick.tick() => {
                    self.timers().await;
                    self.paths_tick().await;
                    if status_at.elapsed() >= STATUS_EVERY {
                        status_at = Instant::now();
                        self.write_status();
                    }
                }
            }
        }
        tracing::info!(event = "dataplane_stopped", interface = %self.interface);
    }

    /// The peer whose allowed addresses hold `dst` (longest prefix).
    fn route(&self, dst: IpAddr) -> Option<[u8; 32]> {
        self.peers
            .iter()
            .flat_map(|(k, p)| p.allowed.iter().map(move |n| (k, n)))
            .filter(|(_, n)| n.contains(dst))
            .max_by_key(|(_, n)| n.len)
            .map(|(k, _)| *k)
    }

    /// A packet from the TUN device: encrypt it for the peer it is routed
    /// to.
    async fn outgoing(&mut self, packet: &[u8]) {
        let Some(dst) = Tunn::dst_address(packet) else {
            return;
        };
        let Some(key) = self.route(dst) else {
            tracing::debug!(event = "packet_unroutable", dst = %dst);
            return;
        };
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        let now = Instant::now();
        self.filter.outbound(packet, now);
        peer.path.wanted(now);
        match peer.tunn.encapsulate(packet, &mut self.out) {
            TunnResult::WriteToNetwork(b) => {
                transmit(&self.udp, &mut self.relay, &key, peer, b).await
            }
            TunnResult::Err(e) => {
                tracing::debug!(event = "encapsulate_failed", peer = %peer.hostname, error = ?e)
            }
            _ => {}
        }
    }

    /// A datagram on the node's socket.
    async fn incoming(&mut self, datagram: &[u8], from: SocketAddr) {
        match classify(datagram) {
            Datagram::WireGuard => {}
            Datagram::Relay => {
                if let Some((src, payload)) = self.relay.receive(datagram, from) {
                    self.decapsulate(src, payload, from, true).await;
                }
                return;
            }
            Datagram::Stun => {
                self.relay.stun(datagram, from);
                // The address the relay saw is a candidate peers can try.
                self.extra
                    .set_reflexive(self.relay.reflexive.into_iter().collect());
                return;
            }
            Datagram::Probe => return self.probe_in(datagram, from).await,
            kind => {
                tracing::debug!(event = "datagram_ignored", kind = ?kind, from = %from, bytes = datagram.len());
                return;
            }
        }
        let key = match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(p)) => {
                match parse_handshake_anon(&self.secret, &self.public, &p) {
                    Ok(h) => Some(h.peer_static_public),
                    Err(_) => None,
                }
            }
            Ok(Packet::HandshakeResponse(p)) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
            Ok(Packet::PacketCookieReply(p)) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
            Ok(Packet::PacketData(p)) => self.by_index.get(&(p.receiver_idx >> 8)).copied(),
            Err(_) => None,
        };
        let Some(key) = key else {
            tracing::debug!(event = "datagram_unknown_peer", from = %from);
            return;
        };
        self.decapsulate(key, datagram, from, false).await;
    }

    /// A WireGuard datagram from the peer `key`, straight from `from` or
    /// (`relayed`) through the relay at `from`: answers go back the same
    /// way; decrypted packets to the TUN device.
    async fn decapsulate(
        &mut self,
        key: [u8; 32],
        datagram: &[u8],
        from: SocketAddr,
        relayed: bool,
    ) {
        let Some(peer) = self.peers.get_mut(&key) else {
            tracing::debug!(event = "datagram_unknown_peer", from = %from, relayed);
            return;
        };
        let mut input = datagram;
        let mut authenticated = false;
        loop {
            let packet = match peer.tunn.decapsulate(Some(from.ip()), input, &mut self.out) {
                TunnResult::WriteToNetwork(b) => {
                    // A cookie reply (type 3) is all a packet under load
                    // earns: it proves nothing about the sender.
                    authenticated |= b.first() != Some(&3);
                    if relayed {
                        self.relay.send(&self.udp, from, &key, b).await;
                    } else if let Err(e) = self.udp.send_to(b, from).await {
                        tracing::debug!(event = "udp_send_failed", peer = %peer.hostname, endpoint = %from, error = %e);
                    }
                    // Flush packets queued while the handshake ran.
                    input = &[];
                    continue;
                }
                TunnResult::WriteToTunnelV4(p, src) => Some((p, IpAddr::V4(src))),
                TunnResult::WriteToTunnelV6(p, src) => Some((p, IpAddr::V6(src))),
                TunnResult::Done => {
                    authenticated |= !input.is_empty();
                    None
                }
                TunnResult::Err(e) => {
                    tracing::debug!(event = "decapsulate_failed", peer = %peer.hostname, from = %from, error = ?e);
                    None
                }
            };
            if let Some((p, src)) = packet {
                authenticated = true;
                deliver(
                    peer,
                    &mut self.filter,
                    &mut self.filter_drops,
                    &self.tun,
                    p,
                    src,
                )
                .await;
            }
            break;
        }
        if !relayed && authenticated && direct::heard(peer, from) {
            self.direct.status_dirty = true;
        }
    }

    /// WireGuard's timers: handshakes, rekeys, keepalives.
    async fn timers(&mut self) {
        self.relay.tick(&self.udp).await;
        for (key, peer) in self.peers.iter_mut() {
            match peer.tunn.update_timers(&mut self.out) {
                TunnResult::WriteToNetwork(b) => {
                    transmit(&self.udp, &mut self.relay, key, peer, b).await
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {}
                TunnResult::Err(e) => {
                    tracing::debug!(event = "timers_failed", peer = %peer.hostname, error = ?e)
                }
                _ => {}
            }
        }
    }

    /// Bring the peers, routes and filter in line with a new map, touching
    /// only what changed.
    fn apply(&mut self, map: &NetworkMap) {
        self.filter.set_rules(&map.filter);
        self.filter.set_local(&map.node.addresses);
        self.relay.apply(&map.relays);
        let mut wanted: HashMap<[u8; 32], &crate::mesh_protocol::Peer> = HashMap::new();
        for p in &map.peers {
            match crate::mesh_protocol::public_key_bytes(&p.public_key) {
                Some(k) => {
                    wanted.insert(k, p);
                }
                None => {
                    tracing::warn!(event = "peer_skipped", peer = %p.hostname, reason = "bad_public_key")
                }
            }
        }
        let gone: Vec<[u8; 32]> = self
            .peers
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .copied()
            .collect();
        for k in gone {
            if let Some(p) = self.peers.remove(&k) {
                self.by_index.remove(&p.index);
                for n in &p.allowed {
                    self.unroute(*n);
                }
                tracing::info!(event = "peer_removed", peer = %p.hostname, id = p.id);
            }
        }
        for (k, mp) in wanted {
            let allowed: Vec<Net> = mp
                .allowed_ips
                .iter()
                .filter_map(|a| Net::parse(a))
                .collect();
            if let Some(p) = self.peers.get_mut(&k) {
                let (old, ifindex) = (std::mem::take(&mut p.allowed), self.ifindex);
                for n in old.iter().filter(|n| !allowed.contains(n)) {
                    if let Err(e) = route::delete(ifindex, *n) {
                        tracing::warn!(event = "route_failed", op = "delete", net = %n, error = %e);
                    }
                }
                for n in allowed.iter().filter(|n| !old.contains(n)) {
                    if let Err(e) = route::add(ifindex, *n) {
                        tracing::warn!(event = "route_failed", op = "add", net = %n, error = %e);
                    }
                }
                p.allowed = allowed;
                p.hostname.clone_from(&mp.hostname);
                p.path.set_map(&mp.endpoints, Instant::now());
                direct::refresh_endpoint(p, Instant::now());
                continue;
            }
            self.next_index = (self.next_index + 1) & 0xff_ffff;
            while self.by_index.contains_key(&self.next_index) {
                self.next_index = (self.next_index + 1) & 0xff_ffff;
            }
            let index = self.next_index;
            let tunn = Tunn::new(
                self.secret.clone(),
                x25519_dalek::PublicKey::from(k),
                None,
                Some(PERSISTENT_KEEPALIVE_S),
                index,
                None,
            );
            for n in &allowed {
                if let Err(e) = route::add(self.ifindex, *n) {
                    tracing::warn!(event = "route_failed", op = "add", net = %n, error = %e);
                }
            }
            let path = PeerPath::new(&mp.endpoints, Instant::now());
            let endpoint = path.choose(Instant::now()).addr();
            tracing::info!(event = "peer_added", peer = %mp.hostname, id = mp.id);
            if let Some(ep) = endpoint {
                tracing::info!(event = "peer_endpoint", peer = %mp.hostname, endpoint = %ep, reason = "map");
            }
            self.by_index.insert(index, k);
            self.peers.insert(
                k,
                Peer {
                    id: mp.id,
                    hostname: mp.hostname.clone(),
                    index,
                    tunn: Box::new(tunn),
                    allowed,
                    endpoint,
                    path,
                    probe_key: super::probe::key(&self.secret, &k),
                },
            );
        }
        tracing::info!(
            event = "dataplane_map_applied",
            serial = map.serial,
            peers = self.peers.len(),
            filter_rules = map.filter.len()
        );
        self.write_status();
    }

    fn unroute(&self, n: Net) {
        if let Err(e) = route::delete(self.ifindex, n) {
            tracing::warn!(event = "route_failed", op = "delete", net = %n, error = %e);
        }
    }

    fn write_status(&self) {
        let b64 = base64::engine::general_purpose::STANDARD;
        let now = Instant::now();
        let mut peers: Vec<PeerStatus> = self
            .peers
            .iter()
            .map(|(k, p)| {
                let (handshake, tx, rx, _, handshake_rtt) = p.tunn.stats();
                // An unconfirmed map candidate is tried, but is no path yet.
                let (path, endpoint) = match p.route(&self.relay, now) {
                    Route::Udp(a) if p.path.direct(now).is_some() => ("direct", Some(a)),
                    Route::Udp(a) => ("none", Some(a)),
                    Route::Relay(a) => ("relay", Some(a)),
                    Route::None => ("none", None),
                };
                PeerStatus {
                    hostname: p.hostname.clone(),
                    public_key: b64.encode(k),
                    endpoint: endpoint.map(|e| e.to_string()),
                    path: path.into(),
                    rtt_ms: p
                        .path
                        .rtt(now)
                        .map(|d| d.as_millis() as u64)
                        .or(handshake_rtt.map(u64::from)),
                    last_handshake_s: handshake.map(|d| d.as_secs()),
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                }
            })
            .collect();
        peers.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        let status = Status {
            interface: self.interface.clone(),
            listen_port: self.listen_port,
            updated_unix: unix_now(),
            filter_drops: self.filter_drops,
            peers,
        };
        let path = self.state_dir.join(STATUS_FILE);
        let bytes = serde_json::to_vec_pretty(&status).unwrap_or_default();
        if let Err(e) = fsutil::write_atomic(&path, &bytes, 0o600) {
            tracing::warn!(event = "status_write_failed", path = %path.display(), error = %e);
        }
    }
}

/// `packet_dropped` lines: 10 at once, then one per 10 s (with the count
/// of those left out).
static DROPS_LOGGED: crate::logging::LogBudget = crate::logging::LogBudget::standard();

/// A decapsulated packet: from the peer's own addresses and admitted by
/// the filter, or dropped.
async fn deliver(
    peer: &Peer,
    filter: &mut Filter,
    drops: &mut u64,
    tun: &tun_rs::AsyncDevice,
    packet: &[u8],
    src: IpAddr,
) {
    let verdict = if peer.allowed.iter().any(|n| n.contains(src)) {
        filter
            .inbound(packet, Instant::now())
            .map_err(|why| why.as_str())
    } else {
        Err("source_not_allowed")
    };
    if let Err(reason) = verdict {
        *drops += 1;
        // A peer decides how much it sends: a budget keeps the log short.
        if let Some(suppressed) = DROPS_LOGGED.allow() {
            tracing::info!(event = "packet_dropped", peer = %peer.hostname, src = %src, reason, suppressed);
        }
        return;
    }
    if let Err(e) = tun.send(packet).await {
        tracing::debug!(event = "tun_write_failed", error = %e);
    }
}

/// This host's candidate addresses: every up, non-loopback IPv4 interface
/// address except the mesh interface's and link-local ones, with `port`.
pub fn host_candidates(port: u16, mesh_interface: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below; every node
    // is read only while the list lives.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || i32::from((*ifa.ifa_addr).sa_family) != libc::AF_INET {
                continue;
            }
            let flags = ifa.ifa_flags as i32;
            if flags & libc::IFF_UP == 0 || flags & libc::IFF_LOOPBACK != 0 {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name).to_string_lossy();
            if name == mesh_interface {
                continue;
            }
            let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            if ip.is_link_local() || ip.is_unspecified() || ip.is_loopback() {
                continue;
            }
            let c = SocketAddr::from((ip, port)).to_string();
            if !out.contains(&c) && out.len() < MAX_ENDPOINTS {
                out.push(c);
            }
        }
        libc::freeifaddrs(head);
    }
    out
}

/// Report this device's candidates (extra, then host) to the control
/// server, again whenever they change; the data plane learns them through
/// `own` (for call-me-maybes).
async fn report(
    url: ControlUrl,
    tls: Arc<rustls::ClientConfig>,
    token: String,
    port: u16,
    interface: String,
    (extra, own): (
        Arc<direct::ExtraCandidates>,
        tokio::sync::watch::Sender<Vec<String>>,
    ),
    mut shutdown: Shutdown,
) {
    let mut reported: Option<Vec<String>> = None;
    let mut wait = Duration::from_secs(1);
    loop {
        let endpoints = direct::all_candidates(&extra, port, &interface);
        own.send_if_modified(|o| {
            let changed = *o != endpoints;
            o.clone_from(&endpoints);
            changed
        });
        if reported.as_ref() != Some(&endpoints) {
            let request = EndpointsRequest {
                endpoints: endpoints.clone(),
            };
            match post_json(
                &url,
                tls.clone(),
                "/v1/endpoints",
                Some(&token),
                &request,
                "endpoint report",
            )
            .await
            {
                Ok(_) => {
                    tracing::info!(event = "endpoints_reported", count = endpoints.len(), first = %endpoints.first().map(String::as_str).unwrap_or("-"));
                    reported = Some(endpoints);
                    wait = REPORT_EVERY;
                }
                Err(e) => {
                    tracing::warn!(event = "endpoints_report_failed", error = %e, retry_in_ms = wait.as_millis() as u64);
                    wait = (wait * 2).min(REPORT_EVERY);
                }
            }
        }
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = extra.changed() => {}
        }
    }
}

/// `node status`: the per-peer lines for `hostname`, if the data plane
/// wrote a status lately.
pub fn load_status(state_dir: &std::path::Path) -> Option<Status> {
    let bytes = std::fs::read(state_dir.join(STATUS_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_are_told_apart_by_their_first_bytes() {
        assert_eq!(classify(&[1, 0, 0, 0, 9, 9]), Datagram::WireGuard);
        assert_eq!(classify(&[4, 0, 0, 0]), Datagram::WireGuard);
        assert_eq!(classify(&[5, 0, 0, 0]), Datagram::Unknown);
        assert_eq!(classify(&[1, 0, 0, 1]), Datagram::Unknown);
        assert_eq!(classify(b"RWP\x01nonce"), Datagram::Probe);
        assert_eq!(classify(b"RWR\x01\x05key"), Datagram::Relay);
        // A STUN binding request and a success response (0x0101: the
        // first byte is WireGuard's type 1, the second is not zero).
        let stun = [0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4];
        assert_eq!(classify(&stun), Datagram::Stun);
        let resp = [1, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42];
        assert_eq!(classify(&resp), Datagram::Stun);
        assert_eq!(classify(&[]), Datagram::Unknown);
        assert_eq!(classify(&[1]), Datagram::Unknown);
    }

    #[test]
    fn host_candidates_skip_loopback_and_carry_the_port() {
        for c in host_candidates(41641, "rw-none") {
            let a: SocketAddr = c.parse().unwrap();
            assert_eq!(a.port(), 41641);
            assert!(!a.ip().is_loopback());
        }
    }
}
