//! The node's relayed path: it registers with the map's relay
//! ([`crate::relay_server`], frames in [`crate::relay_protocol`]) from the
//! node's one UDP socket, so the relay sees the same NAT mapping WireGuard
//! and the probes use; re-registers every 25 s (which also keeps that
//! mapping) and whenever the token changes; wraps WireGuard datagrams for
//! peers without a confirmed direct path in send frames; and unwraps the
//! relay's receive frames, which name the sending peer by its public key.
//! When UDP registrations go unanswered and the relay has a TCP address,
//! the same frames go over TCP (length-prefixed) instead.
//!
//! Which path a packet takes is [`route`] (the path rule in docs/mesh.md).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::net::UdpSocket;

use crate::mesh_protocol::RelayInfo;
use crate::relay_protocol::{self as wire, Frame};
use crate::stun;

/// Re-registration interval (also the NAT keepalive towards the relay).
const KEEPALIVE: Duration = Duration::from_secs(25);
/// An unanswered registration is retried after this long.
const RETRY: Duration = Duration::from_secs(2);
/// Unanswered UDP registrations before the node falls back to TCP (when
/// the relay has a `tcp_address`).
const UDP_TRIES: u32 = 3;
/// Frames queued towards the relay's TCP connection.
const TCP_QUEUE: usize = 256;

/// The TCP fallback: a task that holds the connection, frames each way
/// with a u16 length prefix.
struct TcpLink {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpLink {
    fn start(address: String) -> Self {
        let (tx, mut outbound) = tokio::sync::mpsc::channel::<Vec<u8>>(TCP_QUEUE);
        let (inbound, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(TCP_QUEUE);
        let task = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let tcp = match tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect(&address),
            )
            .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::warn!(event = "relay_tcp_failed", address = %address, error = %e);
                    return;
                }
                Err(_) => {
                    tracing::warn!(event = "relay_tcp_failed", address = %address, error = "timed out");
                    return;
                }
            };
            let _ = tcp.set_nodelay(true);
            tracing::info!(event = "relay_tcp_connected", address = %address);
            let (mut rd, mut wr) = tcp.into_split();
            let writer = async move {
                while let Some(f) = outbound.recv().await {
                    let len = (f.len() as u16).to_be_bytes();
                    if wr.write_all(&len).await.is_err() || wr.write_all(&f).await.is_err() {
                        break;
                    }
                }
            };
            let reader = async move {
                let mut len = [0u8; 2];
                loop {
                    if rd.read_exact(&mut len).await.is_err() {
                        break;
                    }
                    let mut f = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if rd.read_exact(&mut f).await.is_err() || inbound.send(f).await.is_err() {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = writer => {}
                _ = reader => {}
            }
            tracing::info!(event = "relay_tcp_closed", address = %address);
        });
        Self { tx, rx, task }
    }
}

/// Where one WireGuard datagram for a peer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Plain UDP to this address.
    Udp(SocketAddr),
    /// A send frame to the relay at this address.
    Relay(SocketAddr),
    /// Nowhere (no endpoint, no relay).
    None,
}

/// The path rule (docs/mesh.md): a confirmed direct endpoint, else the relay (when
/// the map lists one and this node holds a token), else the first map
/// candidate.
pub fn route(
    direct: Option<SocketAddr>,
    relay: Option<SocketAddr>,
    candidate: Option<SocketAddr>,
) -> Route {
    match (direct, relay, candidate) {
        (Some(d), _, _) => Route::Udp(d),
        (None, Some(r), _) => Route::Relay(r),
        (None, None, Some(c)) => Route::Udp(c),
        (None, None, None) => Route::None,
    }
}

/// The relay this node uses, and its registration.
#[derive(Default)]
pub struct RelayClient {
    /// The map entry in use (name, address text, token).
    current: Option<RelayInfo>,
    addr: Option<SocketAddr>,
    token: Vec<u8>,
    /// When the last registration was sent, and whether the relay has
    /// acknowledged one for the current token.
    sent_at: Option<Instant>,
    acked: bool,
    /// The STUN request in flight to the relay.
    stun_id: Option<stun::TransactionId>,
    /// The address the relay sees this node at.
    pub reflexive: Option<SocketAddr>,
    frame: Vec<u8>,
    /// UDP registrations sent without an answer.
    unanswered: u32,
    /// The relay's name being resolved.
    resolving: Option<tokio::sync::oneshot::Receiver<Option<SocketAddr>>>,
    tcp: Option<TcpLink>,
}

impl RelayClient {
    /// The relay, once its address is known and this node holds a token
    /// for it.
    pub fn address(&self) -> Option<SocketAddr> {
        self.addr.filter(|_| !self.token.is_empty())
    }

    /// The relay to send peers' packets to: [`address`](Self::address)
    /// unless it left [`UDP_TRIES`] registrations unanswered without a TCP
    /// fallback to try (a dead relay must not swallow traffic a map
    /// candidate could carry).
    pub fn target(&self) -> Option<SocketAddr> {
        self.address()
            .filter(|_| self.acked || self.unanswered <= UDP_TRIES || self.tcp.is_some())
    }

    /// Follow the map's `relays` (the first one is used).
    pub fn apply(&mut self, relays: &[RelayInfo]) {
        let Some(r) = relays.first() else {
            if self.current.take().is_some() {
                tracing::info!(event = "relay_dropped", reason = "map");
            }
            *self = Self::default();
            return;
        };
        if self.current.as_ref() == Some(r) {
            return;
        }
        let moved = self.current.as_ref().is_none_or(|c| c.address != r.address);
        if moved {
            self.tcp = None;
            self.unanswered = 0;
            // A literal is used at once; a name is resolved in the
            // background (the packet loop never waits for DNS).
            self.addr = r.address.parse().ok();
            self.resolving = None;
            if self.addr.is_none() {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let (name, address) = (r.name.clone(), r.address.clone());
                tokio::spawn(async move {
                    let found = tokio::net::lookup_host(&address)
                        .await
                        .ok()
                        .and_then(|mut a| a.find(|a| a.is_ipv4()));
                    if found.is_none() {
                        tracing::warn!(event = "relay_unresolved", relay = %name, address = %address);
                    }
                    let _ = tx.send(found);
                });
                self.resolving = Some(rx);
            }
        }
        self.token = base64::engine::general_purpose::STANDARD
            .decode(&r.token)
            .unwrap_or_default();
        self.current = Some(r.clone());
        // Register at the next tick.
        self.sent_at = None;
        self.acked = false;
    }

    /// Register when due; on the node's socket.
    pub async fn tick(&mut self, udp: &UdpSocket) {
        if let Some(rx) = &mut self.resolving {
            match rx.try_recv() {
                Ok(found) => {
                    self.addr = found;
                    self.resolving = None;
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => self.resolving = None,
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
            }
        }
        let Some(addr) = self.address() else { return };
        let wait = if self.acked { KEEPALIVE } else { RETRY };
        if self.sent_at.is_some_and(|t| t.elapsed() < wait) {
            return;
        }
        self.sent_at = Some(Instant::now());
        if !self.acked && self.tcp.is_none() {
            self.unanswered += 1;
            if self.unanswered > UDP_TRIES
                && let Some(tcp) = self.current.as_ref().and_then(|c| c.tcp_address.clone())
            {
                tracing::info!(event = "relay_tcp_fallback", address = %tcp, unanswered = self.unanswered - 1);
                self.tcp = Some(TcpLink::start(tcp));
            }
        }
        let frame = wire::register(&self.token);
        self.transmit(udp, addr, &frame).await;
        if self.tcp.is_none() {
            // Ask for the reflexive address too, while the path is fresh.
            let id: stun::TransactionId = rand::random();
            self.stun_id = Some(id);
            let _ = udp.send_to(&stun::binding_request(id), addr).await;
        }
    }

    /// One frame to the relay: over the TCP fallback when it is up, else
    /// UDP.
    async fn transmit(&self, udp: &UdpSocket, relay: SocketAddr, frame: &[u8]) {
        if let Some(link) = &self.tcp {
            // Full: dropped, as a congested UDP path would.
            let _ = link.tx.try_send(frame.to_vec());
        } else if let Err(e) = udp.send_to(frame, relay).await {
            tracing::debug!(event = "relay_send_failed", relay = %relay, error = %e);
        }
    }

    /// The next frame from the relay's TCP connection (pending without
    /// one); a closed connection is dropped (the next tick registers
    /// over UDP again, then falls back anew).
    pub async fn tcp_frame(&mut self) -> Option<Vec<u8>> {
        let Some(link) = &mut self.tcp else {
            return std::future::pending().await;
        };
        let frame = link.rx.recv().await;
        if frame.is_none() {
            self.tcp = None;
            self.acked = false;
            self.unanswered = 0;
        }
        frame
    }

    /// Send `datagram` (WireGuard) to the peer `to` through the relay.
    pub async fn send(
        &mut self,
        udp: &UdpSocket,
        relay: SocketAddr,
        to: &[u8; 32],
        datagram: &[u8],
    ) {
        let mut frame = std::mem::take(&mut self.frame);
        wire::send_into(&mut frame, to, datagram);
        self.transmit(udp, relay, &frame).await;
        self.frame = frame;
    }

    /// A relay frame from `from`: the source key and the WireGuard
    /// datagram of a receive frame; registration answers are taken in.
    pub fn receive<'a>(&mut self, d: &'a [u8], from: SocketAddr) -> Option<([u8; 32], &'a [u8])> {
        if Some(from) != self.addr {
            return None;
        }
        match wire::parse(d)? {
            Frame::Receive { from, payload } => Some((from, payload)),
            Frame::Registered { idle_s } => {
                self.unanswered = 0;
                if !self.acked {
                    tracing::info!(event = "relay_registered", tcp = self.tcp.is_some(), relay = %self.current.as_ref().map(|c| c.name.as_str()).unwrap_or("-"), address = %from, idle_s);
                }
                self.acked = true;
                None
            }
            Frame::Error(why) => {
                tracing::warn!(event = "relay_refused", address = %from, reason = why.as_str());
                self.acked = false;
                None
            }
            _ => None,
        }
    }

    /// A STUN datagram: the relay's answer to this node's request, if it
    /// is one.
    pub fn stun(&mut self, d: &[u8], from: SocketAddr) {
        let Some(id) = self.stun_id.filter(|_| Some(from) == self.addr) else {
            return;
        };
        if let Some(a) = stun::parse_response(d, id) {
            self.stun_id = None;
            if self.reflexive != Some(a) {
                tracing::info!(event = "reflexive_address", address = %a, via = %from);
                self.reflexive = Some(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay "r" at `address` (UDP only) with a dummy token.
    fn relay_at(address: &str) -> RelayInfo {
        RelayInfo {
            name: "r".into(),
            address: address.into(),
            tcp_address: None,
            token: base64::engine::general_purpose::STANDARD.encode([1u8; 8]),
            expires_unix: 0,
        }
    }

    #[test]
    fn the_path_rule() {
        let (d, r, c): (SocketAddr, SocketAddr, SocketAddr) = (
            "192.0.2.1:1".parse().unwrap(),
            "192.0.2.2:2".parse().unwrap(),
            "192.0.2.3:3".parse().unwrap(),
        );
        assert_eq!(route(Some(d), Some(r), Some(c)), Route::Udp(d));
        assert_eq!(route(None, Some(r), Some(c)), Route::Relay(r));
        assert_eq!(route(None, None, Some(c)), Route::Udp(c));
        assert_eq!(route(None, None, None), Route::None);
    }

    #[test]
    fn frames_only_count_from_the_relay() {
        let mut c = RelayClient::default();
        let relay = relay_at("192.0.2.9:3478");
        c.apply(std::slice::from_ref(&relay));
        let at: SocketAddr = "192.0.2.9:3478".parse().unwrap();
        assert_eq!(c.target(), Some(at));
        let mut f = Vec::new();
        wire::receive_into(&mut f, &[3; 32], b"wg");
        assert_eq!(c.receive(&f, at), Some(([3; 32], &b"wg"[..])));
        assert_eq!(c.receive(&f, "192.0.2.8:3478".parse().unwrap()), None);
        assert!(!c.acked);
        c.receive(&wire::registered(90), at);
        assert!(c.acked);
        // A relay that stops answering is skipped once it missed three
        // registrations (without a TCP address to fall back to).
        c.acked = false;
        c.unanswered = UDP_TRIES + 1;
        assert_eq!(c.target(), None);
        assert_eq!(c.address(), Some(at));
        c.apply(&[]);
        assert_eq!(c.target(), None);
    }

    #[tokio::test]
    async fn a_relay_name_is_resolved_in_the_background() {
        let mut c = RelayClient::default();
        let relay = relay_at("localhost:9");
        c.apply(std::slice::from_ref(&relay));
        assert_eq!(c.target(), None, "not resolved yet");
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let start = Instant::now();
        while c.target().is_none() {
            assert!(start.elapsed() < Duration::from_secs(5));
            tokio::time::sleep(Duration::from_millis(10)).await;
            c.tick(&udp).await;
        }
        assert_eq!(c.target(), Some("127.0.0.1:9".parse().unwrap()));
    }
}
