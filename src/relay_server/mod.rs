//! The Relay Server (seed 000's term): a `[server.relay]` role of
//! `runewarp server` that forwards WireGuard datagrams between nodes of the
//! same organisation, addressed by their public keys, when no direct path
//! exists (symmetric NAT, carrier-grade NAT), and answers STUN Binding
//! requests so nodes learn their public address. It sees only WireGuard
//! ciphertext: private keys never leave the devices.
//!
//! The frames and the admission token are in [`crate::relay_protocol`]. A
//! node registers with a token the control server signed (public key,
//! organisation, expiry); the relay binds the address the registration
//! came from to that key. A send frame names the destination key; the
//! relay forwards it to the destination's bound address as a receive
//! frame naming the *sender's registered key* (never anything the frame
//! says). Unregistered senders, expired tokens, destinations in another
//! organisation and unknown destinations are dropped and counted.
//!
//! Registrations and STUN are rate-limited per source address, the binding
//! table is bounded, and bindings without traffic expire.
//!
//! For networks that block UDP, the same frames (length-prefixed) arrive
//! over TCP: the tunnel Server's public listener hands over connections
//! that open with a relay frame instead of TLS ([`is_relay_connection`]);
//! such a node is bound to its connection ([`Addr::Tcp`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use crate::config::RelayServerConfig;
use crate::relay_protocol::{self as wire, Frame, Refusal, unix_now};
use crate::shutdown::Shutdown;
use crate::stun;

/// A binding without a frame from its node for this long goes (nodes
/// re-register every 25 s).
pub const IDLE: Duration = Duration::from_secs(90);
/// Most bindings held at once.
const MAX_BINDINGS: usize = 100_000;
/// Registrations and STUN requests per source address per [`WINDOW`].
const RATE: u32 = 20;
const WINDOW: Duration = Duration::from_secs(10);
/// Most source addresses the rate table tracks (pruned every [`SWEEP`]).
const MAX_RATE_ENTRIES: usize = 100_000;
/// How often idle bindings are swept and the counters logged.
const SWEEP: Duration = Duration::from_secs(10);

/// What the relay did, since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub forwarded: u64,
    pub forwarded_bytes: u64,
    pub registered: u64,
    pub refused: u64,
    pub stun_answered: u64,
    pub rate_limited: u64,
    pub dropped_unregistered: u64,
    pub dropped_expired: u64,
    pub dropped_other_org: u64,
    pub dropped_unknown_destination: u64,
    pub dropped_malformed: u64,
}

/// Where a node is bound: a UDP source address, or a TCP connection
/// (the fallback, by its peer address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Addr {
    Udp(SocketAddr),
    Tcp(SocketAddr),
}

impl Addr {
    fn socket(self) -> SocketAddr {
        match self {
            Addr::Udp(a) | Addr::Tcp(a) => a,
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Udp(a) => write!(f, "udp/{a}"),
            Addr::Tcp(a) => write!(f, "tcp/{a}"),
        }
    }
}

struct Binding {
    addr: Addr,
    organisation: i64,
    expires_unix: u64,
    seen: Instant,
}

/// The relay's state: bindings and rate counts. Pure: [`Relay::handle`]
/// turns one datagram into at most one datagram to send.
pub struct Relay {
    control_key: [u8; 32],
    bindings: HashMap<[u8; 32], Binding>,
    by_addr: HashMap<Addr, [u8; 32]>,
    rates: HashMap<IpAddr, (Instant, u32)>,
    pub counters: Counters,
}

/// What to send in answer to a datagram: where, and the bytes (in the
/// relay's buffer or owned).
pub enum Reply<'a> {
    None,
    To(Addr, Vec<u8>),
    Forward(Addr, &'a [u8]),
}

impl Relay {
    pub fn new(control_key: [u8; 32]) -> Self {
        Self {
            control_key,
            bindings: HashMap::new(),
            by_addr: HashMap::new(),
            rates: HashMap::new(),
            counters: Counters::default(),
        }
    }

    /// Count one rate-limited request from `ip`; false when over the rate.
    fn admit(&mut self, ip: IpAddr, now: Instant) -> bool {
        // Full (a flood from many addresses): new addresses wait for the
        // sweep; pruning here would cost a pass over the table per packet.
        if self.rates.len() >= MAX_RATE_ENTRIES && !self.rates.contains_key(&ip) {
            self.counters.rate_limited += 1;
            return false;
        }
        let entry = self.rates.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
        let ok = entry.1 <= RATE;
        if !ok {
            self.counters.rate_limited += 1;
        }
        ok
    }

    /// One datagram from `from`. `out` is the buffer forwarded frames are
    /// built in.
    pub fn handle<'a>(
        &mut self,
        d: &[u8],
        from: Addr,
        now: Instant,
        now_unix: u64,
        out: &'a mut Vec<u8>,
    ) -> Reply<'a> {
        if !wire::is_frame(d) {
            let Some(id) = stun::parse_request(d) else {
                self.counters.dropped_malformed += 1;
                return Reply::None;
            };
            if !self.admit(from.socket().ip(), now) {
                return Reply::None;
            }
            self.counters.stun_answered += 1;
            return Reply::To(from, stun::binding_response(id, from.socket()));
        }
        match wire::parse(d) {
            Some(Frame::Register { token }) => self.register(token, from, now, now_unix),
            Some(Frame::Send { to, payload }) => {
                self.forward(to, payload, from, now, now_unix, out)
            }
            Some(_) => {
                self.counters.dropped_malformed += 1;
                Reply::None
            }
            None => {
                self.counters.dropped_malformed += 1;
                if d.get(3).is_some_and(|v| *v != wire::VERSION)
                    && self.admit(from.socket().ip(), now)
                {
                    return Reply::To(from, wire::error(Refusal::Version));
                }
                Reply::None
            }
        }
    }

    fn register(
        &mut self,
        token: &[u8],
        from: Addr,
        now: Instant,
        now_unix: u64,
    ) -> Reply<'static> {
        if !self.admit(from.socket().ip(), now) {
            // No answer: a flood gets nothing back to amplify.
            return Reply::None;
        }
        let claims = match wire::verify(&self.control_key, token, now_unix) {
            Ok(c) => c,
            Err(why) => {
                self.counters.refused += 1;
                tracing::debug!(event = "relay_register_refused", from = %from, reason = why.as_str());
                return Reply::To(from, wire::error(why));
            }
        };
        let key = claims.public_key;
        if !self.bindings.contains_key(&key) && self.bindings.len() >= MAX_BINDINGS {
            self.sweep(now);
            if self.bindings.len() >= MAX_BINDINGS {
                self.counters.refused += 1;
                return Reply::To(from, wire::error(Refusal::Full));
            }
        }
        // One key per address: an address another key held moves over.
        if let Some(old) = self.by_addr.insert(from, key)
            && old != key
        {
            self.bindings.remove(&old);
        }
        let moved = match self.bindings.insert(
            key,
            Binding {
                addr: from,
                organisation: claims.organisation,
                expires_unix: claims.expires_unix,
                seen: now,
            },
        ) {
            Some(b) if b.addr != from => {
                self.by_addr.remove(&b.addr);
                true
            }
            Some(_) => false,
            None => true,
        };
        self.counters.registered += 1;
        if moved {
            tracing::info!(event = "relay_bound", from = %from, organisation = claims.organisation, bindings = self.bindings.len());
        }
        Reply::To(from, wire::registered(IDLE.as_secs() as u16))
    }

    fn forward<'a>(
        &mut self,
        to: [u8; 32],
        payload: &[u8],
        from: Addr,
        now: Instant,
        now_unix: u64,
        out: &'a mut Vec<u8>,
    ) -> Reply<'a> {
        let Some(source) = self.by_addr.get(&from).copied() else {
            self.counters.dropped_unregistered += 1;
            return Reply::None;
        };
        let Some(src) = self.bindings.get_mut(&source) else {
            self.counters.dropped_unregistered += 1;
            return Reply::None;
        };
        if src.expires_unix <= now_unix {
            self.counters.dropped_expired += 1;
            return Reply::None;
        }
        src.seen = now;
        let organisation = src.organisation;
        let Some(dst) = self.bindings.get(&to) else {
            self.counters.dropped_unknown_destination += 1;
            return Reply::None;
        };
        if dst.expires_unix <= now_unix || now.duration_since(dst.seen) >= IDLE {
            self.counters.dropped_expired += 1;
            return Reply::None;
        }
        if dst.organisation != organisation {
            self.counters.dropped_other_org += 1;
            return Reply::None;
        }
        self.counters.forwarded += 1;
        self.counters.forwarded_bytes += payload.len() as u64;
        wire::receive_into(out, &source, payload);
        Reply::Forward(dst.addr, out)
    }

    /// A TCP connection closed: its binding goes with it.
    pub fn closed(&mut self, addr: Addr) {
        if let Some(key) = self.by_addr.remove(&addr) {
            self.bindings.remove(&key);
        }
    }

    /// Drop bindings idle for [`IDLE`], and old rate counts.
    pub fn sweep(&mut self, now: Instant) {
        let before = self.bindings.len();
        let by_addr = &mut self.by_addr;
        self.bindings.retain(|_, b| {
            let keep = now.duration_since(b.seen) < IDLE;
            if !keep {
                by_addr.remove(&b.addr);
            }
            keep
        });
        self.rates
            .retain(|_, (at, _)| now.duration_since(*at) < WINDOW);
        let gone = before - self.bindings.len();
        if gone > 0 {
            tracing::info!(
                event = "relay_bindings_expired",
                expired = gone,
                bindings = self.bindings.len()
            );
        }
    }

    /// How many nodes are bound.
    pub fn bindings(&self) -> usize {
        self.bindings.len()
    }
}

/// TCP fallback connections served at once.
const MAX_TCP: usize = 10_000;
/// A TCP connection without a frame for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(120);
/// Frames queued towards one TCP connection; beyond it they are dropped,
/// as a congested UDP path would.
const TCP_QUEUE: usize = 256;

/// What the TCP connections tell the relay's task.
enum TcpEvent {
    Opened(SocketAddr, tokio::sync::mpsc::Sender<Vec<u8>>),
    Frame(SocketAddr, Vec<u8>),
    Closed(SocketAddr),
}

/// Hands TCP connections whose first bytes are a relay frame (the public
/// listener sniffs `RWR` where TLS would start with 0x16) to the relay.
pub type TcpHandoff = tokio::sync::mpsc::Sender<(tokio::net::TcpStream, SocketAddr)>;

/// The relay's bound UDP socket, ready to run.
pub struct RelayServer {
    socket: UdpSocket,
    relay: Relay,
    handoff: (
        TcpHandoff,
        tokio::sync::mpsc::Receiver<(tokio::net::TcpStream, SocketAddr)>,
    ),
}

impl RelayServer {
    /// Bind `config.listen`.
    pub async fn bind(config: &RelayServerConfig) -> std::io::Result<Self> {
        let socket = UdpSocket::bind(config.listen).await?;
        Ok(Self {
            socket,
            relay: Relay::new(config.control_key),
            handoff: tokio::sync::mpsc::channel(64),
        })
    }

    /// Where the public listener hands relay connections (TCP fallback).
    pub fn tcp_handoff(&self) -> TcpHandoff {
        self.handoff.0.clone()
    }

    /// Serve until `shutdown`.
    pub async fn run(self, mut shutdown: Shutdown) {
        let RelayServer {
            socket,
            mut relay,
            handoff: (_, mut handoff),
        } = self;
        let mut buf = vec![0u8; 65_536];
        let mut out = Vec::with_capacity(65_536 + 64);
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut logged = Counters::default();
        let (events_tx, mut events) = tokio::sync::mpsc::channel::<TcpEvent>(1024);
        let mut conns: HashMap<SocketAddr, tokio::sync::mpsc::Sender<Vec<u8>>> = HashMap::new();
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_TCP));
        let mut tasks = tokio::task::JoinSet::new();
        tracing::info!(event = "relay_started", listen = %socket.local_addr().map(|a| a.to_string()).unwrap_or_default());
        loop {
            let (d, from): (&[u8], Addr) = tokio::select! {
                _ = shutdown.wait() => break,
                r = socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => (&buf[..n], Addr::Udp(from)),
                    Err(e) => {
                        tracing::debug!(event = "relay_recv_failed", error = %e);
                        continue;
                    }
                },
                Some(e) = events.recv() => match e {
                    TcpEvent::Opened(peer, tx) => {
                        conns.insert(peer, tx);
                        continue;
                    }
                    TcpEvent::Closed(peer) => {
                        conns.remove(&peer);
                        relay.closed(Addr::Tcp(peer));
                        continue;
                    }
                    TcpEvent::Frame(peer, frame) => {
                        let n = frame.len().min(buf.len());
                        buf[..n].copy_from_slice(&frame[..n]);
                        (&buf[..n], Addr::Tcp(peer))
                    }
                },
                Some((tcp, peer)) = handoff.recv() => {
                    match slots.clone().try_acquire_owned() {
                        Ok(permit) => {
                            tasks.spawn(tcp_connection(tcp, peer, events_tx.clone(), permit));
                        }
                        Err(_) => tracing::debug!(event = "relay_tcp_refused", peer = %peer, reason = "full"),
                    }
                    continue;
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                _ = sweep.tick() => {
                    relay.sweep(Instant::now());
                    let c = relay.counters;
                    if c != logged {
                        logged = c;
                        tracing::info!(
                            event = "relay_counters",
                            bindings = relay.bindings(),
                            tcp_connections = conns.len(),
                            forwarded = c.forwarded,
                            forwarded_bytes = c.forwarded_bytes,
                            registered = c.registered,
                            refused = c.refused,
                            stun_answered = c.stun_answered,
                            rate_limited = c.rate_limited,
                            dropped_unregistered = c.dropped_unregistered,
                            dropped_expired = c.dropped_expired,
                            dropped_other_org = c.dropped_other_org,
                            dropped_unknown_destination = c.dropped_unknown_destination,
                            dropped_malformed = c.dropped_malformed,
                        );
                    }
                    continue;
                }
            };
            let (to, bytes) = match relay.handle(d, from, Instant::now(), unix_now(), &mut out) {
                Reply::None => continue,
                Reply::To(to, bytes) => (to, std::borrow::Cow::Owned(bytes)),
                Reply::Forward(to, bytes) => (to, std::borrow::Cow::Borrowed(bytes)),
            };
            match to {
                Addr::Udp(a) => {
                    if let Err(e) = socket.send_to(&bytes, a).await {
                        tracing::debug!(event = "relay_send_failed", error = %e);
                    }
                }
                Addr::Tcp(a) => {
                    if let Some(tx) = conns.get(&a) {
                        let _ = tx.try_send(bytes.into_owned());
                    }
                }
            }
        }
        tasks.abort_all();
        tracing::info!(event = "relay_stopped");
    }
}

/// Whether a connection on the public listener opens with a relay frame
/// (`RWR`) rather than TLS (0x16): peeks, consuming nothing, until
/// `deadline`.
pub async fn is_relay_connection(
    tcp: &tokio::net::TcpStream,
    deadline: tokio::time::Instant,
) -> bool {
    // The first bytes are the length prefix, then the frame's magic.
    let mut first = [0u8; 5];
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
            Ok(Ok(n)) => n,
            _ => return false,
        };
        if n == 0 || first[0] == 0x16 {
            return false;
        }
        let seen = n.saturating_sub(2).min(3);
        if n > 2 && first[2..2 + seen] != wire::MAGIC[..seen] {
            return false;
        }
        if n >= 5 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One TCP fallback connection: frames each way, each preceded by its
/// length (u16, big-endian).
async fn tcp_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    events: tokio::sync::mpsc::Sender<TcpEvent>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.set_nodelay(true);
    let (mut rd, mut wr) = tcp.into_split();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(TCP_QUEUE);
    if events.send(TcpEvent::Opened(peer, tx)).await.is_err() {
        return;
    }
    tracing::debug!(event = "relay_tcp_opened", peer = %peer);
    let writer = async move {
        while let Some(frame) = rx.recv().await {
            let len = (frame.len() as u16).to_be_bytes();
            if wr.write_all(&len).await.is_err() || wr.write_all(&frame).await.is_err() {
                break;
            }
        }
    };
    let reader = async {
        let mut frame = vec![0u8; 65_535];
        loop {
            let mut len = [0u8; 2];
            let read = async {
                rd.read_exact(&mut len).await?;
                let n = usize::from(u16::from_be_bytes(len));
                rd.read_exact(&mut frame[..n]).await?;
                Ok::<usize, std::io::Error>(n)
            };
            let n = match tokio::time::timeout(TCP_IDLE, read).await {
                Ok(Ok(n)) => n,
                _ => break,
            };
            if events
                .send(TcpEvent::Frame(peer, frame[..n].to_vec()))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
    }
    let _ = events.send(TcpEvent::Closed(peer)).await;
    tracing::debug!(event = "relay_tcp_closed", peer = %peer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay_protocol::{Claims, sign, test_key};

    struct Env {
        relay: Relay,
        key: ring::signature::Ed25519KeyPair,
        now: Instant,
        out: Vec<u8>,
    }

    impl Env {
        fn new() -> Self {
            let key = test_key();
            Self {
                relay: Relay::new(wire::public_key(&key)),
                key,
                now: Instant::now(),
                out: Vec::new(),
            }
        }
        fn token(&self, org: i64, pk: u8, expires: u64) -> Vec<u8> {
            sign(
                &self.key,
                &Claims {
                    expires_unix: expires,
                    organisation: org,
                    public_key: [pk; 32],
                },
            )
        }
        /// The frame sent back to `from`, if any, and where it went.
        fn send(&mut self, d: &[u8], from: &str, unix: u64) -> Option<(SocketAddr, Vec<u8>)> {
            let from = Addr::Udp(from.parse().unwrap());
            match self.relay.handle(d, from, self.now, unix, &mut self.out) {
                Reply::None => None,
                Reply::To(a, b) => Some((a.socket(), b)),
                Reply::Forward(a, b) => Some((a.socket(), b.to_vec())),
            }
        }
    }

    fn data(to: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        wire::send_into(&mut out, &[to; 32], payload);
        out
    }

    #[test]
    fn frames_go_to_the_registered_key_with_the_senders_key() {
        let mut e = Env::new();
        let (a, b, c) = ("198.51.100.1:1000", "203.0.113.2:2000", "192.0.2.3:3000");
        let t = e.token(1, 0xa, 100);
        let (to, ack) = e.send(&wire::register(&t), a, 10).unwrap();
        assert_eq!(to, a.parse().unwrap());
        assert_eq!(wire::parse(&ack), Some(Frame::Registered { idle_s: 90 }));
        let t = e.token(1, 0xb, 100);
        e.send(&wire::register(&t), b, 10).unwrap();
        // a → b: forwarded with a's key, whatever else.
        let (to, fwd) = e.send(&data(0xb, b"\x04\0\0\0sealed"), a, 10).unwrap();
        assert_eq!(to, b.parse().unwrap());
        assert_eq!(
            wire::parse(&fwd),
            Some(Frame::Receive {
                from: [0xa; 32],
                payload: b"\x04\0\0\0sealed"
            })
        );
        // An unregistered sender, an unknown destination.
        assert!(e.send(&data(0xb, b"x"), c, 10).is_none());
        assert!(e.send(&data(0xc, b"x"), a, 10).is_none());
        // Another organisation's device registers; neither side reaches it.
        let t = e.token(2, 0xc, 100);
        e.send(&wire::register(&t), c, 10).unwrap();
        assert!(e.send(&data(0xa, b"x"), c, 10).is_none());
        assert!(e.send(&data(0xc, b"x"), a, 10).is_none());
        // Expired: the sender's token, then the destination's.
        assert!(e.send(&data(0xb, b"x"), a, 100).is_none());
        let k = e.relay.counters;
        assert_eq!(
            (
                k.forwarded,
                k.dropped_unregistered,
                k.dropped_unknown_destination,
                k.dropped_other_org,
                k.dropped_expired
            ),
            (1, 1, 1, 2, 1)
        );
    }

    #[test]
    fn bad_tokens_are_refused_and_registrations_rate_limited() {
        let mut e = Env::new();
        let a = "198.51.100.1:1000";
        let t = e.token(1, 0xa, 100);
        let (_, r) = e.send(&wire::register(&t), a, 100).unwrap();
        assert_eq!(wire::parse(&r), Some(Frame::Error(Refusal::Expired)));
        let mut forged = t.clone();
        forged[12] ^= 1;
        let (_, r) = e.send(&wire::register(&forged), a, 10).unwrap();
        assert_eq!(wire::parse(&r), Some(Frame::Error(Refusal::BadToken)));
        let other = Env::new().token(1, 0xa, 100);
        let (_, r) = e.send(&wire::register(&other), a, 10).unwrap();
        assert_eq!(wire::parse(&r), Some(Frame::Error(Refusal::BadToken)));
        for _ in 0..RATE {
            e.send(&wire::register(&t), a, 10);
        }
        assert!(
            e.send(&wire::register(&t), a, 10).is_none(),
            "over the rate"
        );
        assert!(e.relay.counters.rate_limited > 0);
        // The good token bound before the limit hit.
        assert_eq!(e.relay.bindings(), 1);
    }

    #[test]
    fn stun_is_answered_and_idle_bindings_expire() {
        let mut e = Env::new();
        let a = "198.51.100.1:1000";
        let (to, r) = e.send(&stun::binding_request([4; 12]), a, 10).unwrap();
        assert_eq!(to, a.parse().unwrap());
        assert_eq!(stun::parse_response(&r, [4; 12]), Some(to));
        let t = e.token(1, 0xa, 1000);
        e.send(&wire::register(&t), a, 10).unwrap();
        assert_eq!(e.relay.bindings(), 1);
        e.relay.sweep(e.now + IDLE);
        assert_eq!(e.relay.bindings(), 0);
        // A node on the TCP fallback is bound to its connection, which
        // takes the binding with it when it closes.
        let tcp = Addr::Tcp("198.51.100.1:1000".parse().unwrap());
        let (now, mut out) = (e.now, Vec::new());
        assert!(matches!(
            e.relay.handle(&wire::register(&t), tcp, now, 10, &mut out),
            Reply::To(to, _) if to == tcp
        ));
        assert_eq!(e.relay.bindings(), 1);
        e.relay.closed(tcp);
        assert_eq!(e.relay.bindings(), 0);
        // Noise is dropped without an answer.
        assert!(e.send(b"hello", a, 10).is_none());
        assert!(e.send(b"RWR\x01\x05", a, 10).is_none());
    }

    #[tokio::test]
    async fn the_public_listener_tells_relay_connections_from_tls() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        for (first, relay) in [
            (&b"\x00\x76RWR\x01\x01"[..], true),
            (&b"\x16\x03\x01\x02\x00"[..], false),
            (&b"\x00\x76XYZ"[..], false),
        ] {
            let mut c = tokio::net::TcpStream::connect(at).await.unwrap();
            c.write_all(first).await.unwrap();
            let (s, _) = listener.accept().await.unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            assert_eq!(is_relay_connection(&s, deadline).await, relay, "{first:?}");
        }
        // Silence until the deadline: not a relay connection.
        let _c = tokio::net::TcpStream::connect(at).await.unwrap();
        let (s, _) = listener.accept().await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
        assert!(!is_relay_connection(&s, deadline).await);
    }
}
