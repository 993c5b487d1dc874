//! The receiving node's packet filter: decapsulated packets from peers
//! pass to the TUN device only when the network map's `filter` admits
//! them (source address and destination port) or when they answer a flow
//! this node started (a small connection table fed by outbound packets).
//!
//! Semantics, kept deliberately small:
//! - TCP and UDP: a rule admits a packet whose source is in the rule's
//!   sources, whose destination port is in its ports and whose protocol is
//!   the rule's (`tcp`, `udp`; a rule without one admits both).
//! - ICMP/ICMPv6 echo requests: admitted when a rule without a protocol,
//!   or an `icmp` rule, names the source (a peer allowed on some port may
//!   ping, unless its rules are `tcp`/`udp` only).
//! - Replies: outbound TCP SYNs, UDP datagrams and echo requests open a
//!   flow; inbound packets of the reversed flow pass. ICMP errors pass
//!   when the packet they quote belongs to a known flow.
//! - Destinations: a rule admits packets for this device's own addresses
//!   ([`Filter::set_local`]); a rule with `destinations` (a Subnet
//!   Connector's approved routes) admits packets for those instead, which
//!   the kernel then forwards into the subnet.
//! - Anything else (other protocols, non-first fragments, malformed
//!   headers) is dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::mesh_protocol::FilterRule;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// Flows remembered at most; beyond it new outbound flows are not
/// recorded (their replies are then judged by the rules alone).
const MAX_FLOWS: usize = 16_384;

/// An address prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    pub addr: IpAddr,
    pub len: u8,
}

impl Net {
    /// `ADDR[/LEN]`; a bare address is a host prefix.
    pub fn parse(text: &str) -> Option<Net> {
        let (a, len) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l.parse::<u8>().ok()?)),
            None => (text, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(max);
        (len <= max).then_some(Net { addr, len })
    }

    pub fn contains(&self, a: IpAddr) -> bool {
        match (self.addr, a) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PortSet {
    Any,
    Ranges(Vec<(u16, u16)>),
}

impl PortSet {
    /// `*`, `22`, `80,443`, `8000-8099`; None if malformed.
    fn parse(text: &str) -> Option<PortSet> {
        if text.trim() == "*" {
            return Some(PortSet::Any);
        }
        let mut ranges = Vec::new();
        for part in text.split(',') {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            ranges.push((a.trim().parse().ok()?, b.trim().parse().ok()?));
        }
        Some(PortSet::Ranges(ranges))
    }

    fn contains(&self, port: u16) -> bool {
        match self {
            PortSet::Any => true,
            PortSet::Ranges(r) => r.iter().any(|(a, b)| (*a..=*b).contains(&port)),
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    sources: Vec<Net>,
    ports: PortSet,
    /// The one protocol the rule admits (None: TCP, UDP and echo).
    proto: Option<u8>,
    /// Where the packets may go (empty: this device's own addresses).
    destinations: Vec<Net>,
}

impl Rule {
    /// Whether the rule is for packets of IP protocol `proto`.
    fn admits(&self, proto: u8) -> bool {
        match self.proto {
            None => true,
            Some(ICMP) => matches!(proto, ICMP | ICMPV6),
            Some(p) => p == proto,
        }
    }

    /// Whether the rule is for packets to `dst`, given this device's own
    /// addresses (`local`; none known: any destination).
    fn reaches(&self, dst: IpAddr, local: &[Net]) -> bool {
        let nets = if self.destinations.is_empty() {
            local
        } else {
            &self.destinations
        };
        (self.destinations.is_empty() && local.is_empty()) || nets.iter().any(|n| n.contains(dst))
    }
}

/// What the filter reads from a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp {
        sport: u16,
        dport: u16,
        syn: bool,
        ack: bool,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    EchoRequest {
        id: u16,
    },
    EchoReply {
        id: u16,
    },
    /// An ICMP error quoting (the start of) a packet this side sent.
    IcmpError {
        quoted: Option<(IpAddr, IpAddr, u8, u16, u16)>,
    },
    /// Other ICMP, other protocols, non-first fragments.
    Other,
}

/// Parse an IPv4 or IPv6 packet's addresses and transport header. None if
/// the header is malformed or truncated.
pub fn parse(p: &[u8]) -> Option<Header> {
    parse_inner(p, true)
}

fn parse_inner(p: &[u8], allow_error: bool) -> Option<Header> {
    let version = p.first()? >> 4;
    let (src, dst, proto, l4, first_fragment) = match version {
        4 => {
            let ihl = usize::from(p.first()? & 0x0f) * 4;
            if ihl < 20 || p.len() < ihl {
                return None;
            }
            let frag = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
            let src: [u8; 4] = p[12..16].try_into().ok()?;
            let dst: [u8; 4] = p[16..20].try_into().ok()?;
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                p[9],
                &p[ihl..],
                frag == 0,
            )
        }
        6 => {
            if p.len() < 40 {
                return None;
            }
            let src: [u8; 16] = p[8..24].try_into().ok()?;
            let dst: [u8; 16] = p[24..40].try_into().ok()?;
            let mut next = p[6];
            let mut at = 40;
            let mut first = true;
            // Hop-by-hop, routing, destination options, fragment.
            for _ in 0..8 {
                match next {
                    0 | 43 | 60 => {
                        let h = p.get(at..at + 2)?;
                        next = h[0];
                        at += (usize::from(h[1]) + 1) * 8;
                    }
                    44 => {
                        let h = p.get(at..at + 8)?;
                        next = h[0];
                        first = u16::from_be_bytes([h[2], h[3]]) >> 3 == 0;
                        at += 8;
                    }
                    _ => break,
                }
            }
            (
                IpAddr::from(src),
                IpAddr::from(dst),
                next,
                p.get(at..)?,
                first,
            )
        }
        _ => return None,
    };
    let kind = if !first_fragment {
        Kind::Other
    } else {
        match proto {
            TCP => {
                let h = l4.get(..14)?;
                Kind::Tcp {
                    sport: u16::from_be_bytes([h[0], h[1]]),
                    dport: u16::from_be_bytes([h[2], h[3]]),
                    syn: h[13] & 0x02 != 0,
                    ack: h[13] & 0x10 != 0,
                }
            }
            UDP => {
                let h = l4.get(..8)?;
                Kind::Udp {
                    sport: u16::from_be_bytes([h[0], h[1]]),
                    dport: u16::from_be_bytes([h[2], h[3]]),
                }
            }
            ICMP | ICMPV6 => {
                let h = l4.get(..8)?;
                let id = u16::from_be_bytes([h[4], h[5]]);
                match (proto, h[0]) {
                    (ICMP, 8) | (ICMPV6, 128) => Kind::EchoRequest { id },
                    (ICMP, 0) | (ICMPV6, 129) => Kind::EchoReply { id },
                    (ICMP, 3 | 11 | 12) | (ICMPV6, 1..=4) if allow_error => {
                        let quoted = parse_inner(&l4[8..], false).and_then(|q| {
                            let (s, d) = match q.kind {
                                Kind::Tcp { sport, dport, .. } | Kind::Udp { sport, dport } => {
                                    (sport, dport)
                                }
                                Kind::EchoRequest { id } => (id, id),
                                _ => return None,
                            };
                            Some((q.src, q.dst, q.proto, s, d))
                        });
                        Kind::IcmpError { quoted }
                    }
                    _ => Kind::Other,
                }
            }
            _ => Kind::Other,
        }
    };
    Some(Header {
        src,
        dst,
        proto,
        kind,
    })
}

/// A flow as this node started it: (protocol, local, local port or echo
/// id, remote, remote port or echo id).
type Flow = (u8, IpAddr, u16, IpAddr, u16);

/// Why a packet was dropped (a stable log value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    Malformed,
    NoRule,
}

impl Drop {
    pub fn as_str(self) -> &'static str {
        match self {
            Drop::Malformed => "malformed",
            Drop::NoRule => "no_rule",
        }
    }
}

/// The rules from the map and the flows this node started.
#[derive(Debug, Default)]
pub struct Filter {
    rules: Vec<Rule>,
    /// This device's own addresses (from the map).
    local: Vec<Net>,
    flows: HashMap<Flow, Instant>,
}

fn idle_limit(proto: u8) -> Duration {
    match proto {
        TCP => Duration::from_secs(600),
        UDP => Duration::from_secs(120),
        _ => Duration::from_secs(30),
    }
}

impl Filter {
    /// Replace the rules (a new map); flows stay. Malformed entries are
    /// skipped (the control server validates them).
    pub fn set_rules(&mut self, rules: &[FilterRule]) {
        self.rules = rules
            .iter()
            .filter_map(|r| {
                let proto = match r.proto.as_deref() {
                    None => None,
                    Some("tcp") => Some(TCP),
                    Some("udp") => Some(UDP),
                    Some("icmp") => Some(ICMP),
                    Some(_) => return None,
                };
                Some(Rule {
                    sources: r.sources.iter().filter_map(|s| Net::parse(s)).collect(),
                    ports: PortSet::parse(&r.ports)?,
                    proto,
                    destinations: r
                        .destinations
                        .iter()
                        .filter_map(|s| Net::parse(s))
                        .collect(),
                })
            })
            .collect();
    }

    /// This device's own addresses: rules without `destinations` admit
    /// packets for these only.
    pub fn set_local(&mut self, addresses: &[String]) {
        self.local = addresses.iter().filter_map(|a| Net::parse(a)).collect();
    }

    /// Record a packet going out to a peer: TCP SYNs, UDP and echo
    /// requests open (or refresh) a flow.
    pub fn outbound(&mut self, packet: &[u8], now: Instant) {
        let Some(h) = parse(packet) else { return };
        let flow = match h.kind {
            Kind::Tcp {
                sport,
                dport,
                syn,
                ack,
                ..
            } => {
                let key = (h.proto, h.src, sport, h.dst, dport);
                let opens = syn && !ack;
                if !opens && !self.flows.contains_key(&key) {
                    return;
                }
                key
            }
            Kind::Udp { sport, dport } => (h.proto, h.src, sport, h.dst, dport),
            Kind::EchoRequest { id } => (h.proto, h.src, id, h.dst, id),
            _ => return,
        };
        if self.flows.len() >= MAX_FLOWS && !self.flows.contains_key(&flow) {
            self.flows
                .retain(|f, at| now.duration_since(*at) < idle_limit(f.0));
            if self.flows.len() >= MAX_FLOWS {
                return;
            }
        }
        self.flows.insert(flow, now);
    }

    /// Whether a packet that arrived from a peer may reach the TUN.
    pub fn inbound(&mut self, packet: &[u8], now: Instant) -> Result<(), Drop> {
        let h = parse(packet).ok_or(Drop::Malformed)?;
        let reply = match h.kind {
            Kind::Tcp { sport, dport, .. } | Kind::Udp { sport, dport } => {
                Some((h.proto, h.dst, dport, h.src, sport))
            }
            Kind::EchoReply { id } => {
                let proto = if h.proto == ICMP { ICMP } else { ICMPV6 };
                Some((proto, h.dst, id, h.src, id))
            }
            // The quoted packet is one this node sent: its source is ours.
            Kind::IcmpError { quoted } => quoted.map(|(s, d, p, sp, dp)| (p, s, sp, d, dp)),
            _ => None,
        };
        if let Some(flow) = reply
            && let Some(at) = self.flows.get_mut(&flow)
        {
            if now.duration_since(*at) < idle_limit(flow.0) {
                *at = now;
                return Ok(());
            }
            self.flows.remove(&flow);
        }
        let mut by_source = self
            .rules
            .iter()
            .filter(|r| r.sources.iter().any(|n| n.contains(h.src)))
            .filter(|r| r.reaches(h.dst, &self.local));
        let admitted = match h.kind {
            Kind::Tcp { dport, .. } | Kind::Udp { dport, .. } => {
                by_source.any(|r| r.admits(h.proto) && r.ports.contains(dport))
            }
            Kind::EchoRequest { .. } => by_source.any(|r| r.admits(h.proto)),
            _ => false,
        };
        if admitted { Ok(()) } else { Err(Drop::NoRule) }
    }

    /// Flows currently remembered.
    #[cfg(test)]
    pub fn flows(&self) -> usize {
        self.flows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        let total = (20 + l4.len()) as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p.extend_from_slice(l4);
        p
    }

    fn v6(src: &str, dst: &str, next: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        p[6] = next;
        p[7] = 64;
        let s: std::net::Ipv6Addr = src.parse().unwrap();
        let d: std::net::Ipv6Addr = dst.parse().unwrap();
        p[8..24].copy_from_slice(&s.octets());
        p[24..40].copy_from_slice(&d.octets());
        p.extend_from_slice(l4);
        p
    }

    fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[12] = 5 << 4;
        h[13] = flags;
        h
    }

    fn udp(sport: u16, dport: u16) -> Vec<u8> {
        let mut h = vec![0u8; 8];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h
    }

    fn echo(ty: u8, id: u16) -> Vec<u8> {
        let mut h = vec![0u8; 8];
        h[0] = ty;
        h[4..6].copy_from_slice(&id.to_be_bytes());
        h.extend_from_slice(b"payload");
        h
    }

    const ME: [u8; 4] = [100, 64, 0, 1];
    const PEER: [u8; 4] = [100, 64, 0, 2];
    const OTHER: [u8; 4] = [100, 64, 0, 3];
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;

    fn filter(sources: &[&str], ports: &str) -> Filter {
        let mut f = Filter::default();
        f.set_rules(&[rule(sources, ports, None)]);
        f
    }

    fn rule(sources: &[&str], ports: &str, proto: Option<&str>) -> FilterRule {
        FilterRule {
            sources: sources.iter().map(|s| s.to_string()).collect(),
            ports: ports.into(),
            proto: proto.map(str::to_string),
            destinations: vec![],
        }
    }

    /// One IPv4 packet `(src, dst, proto, l4)` and whether the filter
    /// admits it (`false`: dropped for want of a rule).
    type Case = ([u8; 4], [u8; 4], u8, Vec<u8>, bool);

    /// Asserts, in order, what `f` does with each packet of `cases`.
    fn expect(f: &mut Filter, now: Instant, cases: &[Case]) {
        for (i, (src, dst, proto, l4, admit)) in cases.iter().enumerate() {
            let want = if *admit { Ok(()) } else { Err(Drop::NoRule) };
            let got = f.inbound(&v4(*src, *dst, *proto, l4), now);
            assert_eq!(got, want, "case {i}: {src:?} -> {dst:?} proto {proto}");
        }
    }

    #[test]
    fn subnet_rules_admit_their_destinations_and_local_rules_only_this_device() {
        let now = Instant::now();
        let mut f = Filter::default();
        let mut subnet = rule(&["100.64.0.2/32"], "80", Some("tcp"));
        subnet.destinations = vec!["10.0.5.0/24".into()];
        f.set_rules(&[rule(&["100.64.0.3/32"], "*", None), subnet]);
        f.set_local(&["100.64.0.1/32".into(), "fd00::1/128".into()]);
        let host = [10, 0, 5, 10];
        expect(
            &mut f,
            now,
            &[
                // PEER may reach the subnet on tcp/80, not this device, not ping.
                (PEER, host, TCP, tcp(4000, 80, SYN), true),
                (PEER, host, TCP, tcp(4000, 22, SYN), false),
                (PEER, ME, TCP, tcp(4000, 80, SYN), false),
                (PEER, [10, 0, 6, 1], TCP, tcp(4000, 80, SYN), false),
                // OTHER may reach this device on anything, but never the subnet
                // or any other address the kernel would forward to.
                (OTHER, ME, ICMP, echo(8, 1), true),
                (OTHER, host, ICMP, echo(8, 1), false),
                (OTHER, [192, 0, 2, 1], UDP, udp(1, 53), false),
            ],
        );
        // The peer's side: a reply from the subnet host to its own flow.
        let mut p = Filter::default();
        p.set_local(&["100.64.0.2/32".into()]);
        p.outbound(&v4(PEER, host, ICMP, &echo(8, 9)), now);
        assert_eq!(p.inbound(&v4(host, PEER, ICMP, &echo(0, 9)), now), Ok(()));
    }

    #[test]
    fn a_rule_with_a_protocol_admits_only_that_protocol() {
        let now = Instant::now();
        let mut f = Filter::default();
        f.set_rules(&[
            rule(&["100.64.0.2/32"], "53", Some("udp")),
            rule(&["100.64.0.3/32"], "*", Some("icmp")),
        ]);
        expect(
            &mut f,
            now,
            &[
                (PEER, ME, UDP, udp(4000, 53), true),
                (PEER, ME, TCP, tcp(4000, 53, SYN), false),
                // udp-only: no ping; icmp-only: ping but no TCP.
                (PEER, ME, ICMP, echo(8, 7), false),
                (OTHER, ME, ICMP, echo(8, 7), true),
                (OTHER, ME, TCP, tcp(4000, 22, SYN), false),
            ],
        );
        // An unknown protocol name drops the rule, never widens it.
        f.set_rules(&[rule(&["100.64.0.2/32"], "*", Some("sctp"))]);
        expect(&mut f, now, &[(PEER, ME, TCP, tcp(4000, 22, SYN), false)]);
    }

    #[test]
    fn rules_admit_by_source_and_port() {
        let now = Instant::now();
        let mut f = filter(&["100.64.0.2/32"], "22,8000-8099");
        expect(
            &mut f,
            now,
            &[
                (PEER, ME, TCP, tcp(4000, 22, SYN), true),
                (PEER, ME, UDP, udp(4000, 8050), true),
                (PEER, ME, TCP, tcp(4000, 23, SYN), false),
                (OTHER, ME, TCP, tcp(4000, 22, SYN), false),
                // A peer allowed on some port may ping; others may not.
                (PEER, ME, ICMP, echo(8, 7), true),
                (OTHER, ME, ICMP, echo(8, 7), false),
                // Unknown protocols never pass.
                (PEER, ME, 47, vec![0; 8], false),
            ],
        );
        // Junk never passes.
        assert_eq!(f.inbound(&[0x45, 0, 0], now), Err(Drop::Malformed));
        assert_eq!(f.inbound(&[], now), Err(Drop::Malformed));
        assert_eq!(
            f.inbound(&v4(PEER, ME, TCP, &[0; 5]), now),
            Err(Drop::Malformed)
        );
        // An empty rule set admits nothing.
        f.set_rules(&[]);
        expect(&mut f, now, &[(PEER, ME, TCP, tcp(4000, 22, SYN), false)]);
    }

    #[test]
    fn replies_to_flows_this_node_started_pass_and_nothing_else() {
        let now = Instant::now();
        let mut f = filter(&[], "*");
        // Ping out, reply in; an echo request from the peer does not pass.
        f.outbound(&v4(ME, PEER, ICMP, &echo(8, 99)), now);
        assert_eq!(f.inbound(&v4(PEER, ME, ICMP, &echo(0, 99)), now), Ok(()));
        assert_eq!(
            f.inbound(&v4(PEER, ME, ICMP, &echo(0, 98)), now),
            Err(Drop::NoRule)
        );
        assert_eq!(
            f.inbound(&v4(PEER, ME, ICMP, &echo(8, 99)), now),
            Err(Drop::NoRule)
        );
        // TCP: our SYN opens the flow; the peer's answers pass, a SYN to
        // another port does not.
        f.outbound(&v4(ME, PEER, TCP, &tcp(5555, 443, SYN)), now);
        assert_eq!(
            f.inbound(&v4(PEER, ME, TCP, &tcp(443, 5555, SYN | ACK)), now),
            Ok(())
        );
        assert_eq!(
            f.inbound(&v4(PEER, ME, TCP, &tcp(443, 5556, SYN)), now),
            Err(Drop::NoRule)
        );
        // A mid-stream packet of ours opens nothing.
        f.outbound(&v4(ME, PEER, TCP, &tcp(6000, 80, ACK)), now);
        assert_eq!(
            f.inbound(&v4(PEER, ME, TCP, &tcp(80, 6000, ACK)), now),
            Err(Drop::NoRule)
        );
        // UDP both ways; a third host using the same ports does not match.
        f.outbound(&v4(ME, PEER, UDP, &udp(5353, 53)), now);
        assert_eq!(f.inbound(&v4(PEER, ME, UDP, &udp(53, 5353)), now), Ok(()));
        assert_eq!(
            f.inbound(&v4(OTHER, ME, UDP, &udp(53, 5353)), now),
            Err(Drop::NoRule)
        );
        // Idle flows expire.
        let later = now + Duration::from_secs(121);
        assert_eq!(
            f.inbound(&v4(PEER, ME, UDP, &udp(53, 5353)), later),
            Err(Drop::NoRule)
        );
        // An ICMP error quoting our UDP datagram passes.
        f.outbound(&v4(ME, PEER, UDP, &udp(7000, 9)), now);
        let mut err = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
        err.extend_from_slice(&v4(ME, PEER, UDP, &udp(7000, 9)));
        assert_eq!(f.inbound(&v4(PEER, ME, ICMP, &err), now), Ok(()));
        let mut err = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
        err.extend_from_slice(&v4(ME, PEER, UDP, &udp(7001, 9)));
        assert_eq!(f.inbound(&v4(PEER, ME, ICMP, &err), now), Err(Drop::NoRule));
    }

    #[test]
    fn ipv6_packets_and_extension_headers() {
        let now = Instant::now();
        let (me, peer) = ("fd00::1", "fd00::2");
        let mut f = filter(&["fd00::2/128"], "22");
        assert_eq!(
            f.inbound(&v6(peer, me, TCP, &tcp(4000, 22, SYN)), now),
            Ok(())
        );
        assert_eq!(
            f.inbound(&v6(peer, me, TCP, &tcp(4000, 80, SYN)), now),
            Err(Drop::NoRule)
        );
        assert_eq!(f.inbound(&v6(peer, me, ICMPV6, &echo(128, 1)), now), Ok(()));
        assert_eq!(
            f.inbound(&v6("fd00::3", me, ICMPV6, &echo(128, 1)), now),
            Err(Drop::NoRule)
        );
        // A destination-options header before TCP.
        let mut l4 = vec![TCP, 0, 0, 0, 0, 0, 0, 0];
        l4.extend_from_slice(&tcp(4000, 22, SYN));
        assert_eq!(f.inbound(&v6(peer, me, 60, &l4), now), Ok(()));
        // A truncated extension header.
        assert_eq!(
            f.inbound(&v6(peer, me, 60, &[TCP]), now),
            Err(Drop::Malformed)
        );
        // Our ping out, the reply in.
        let mut f = filter(&[], "*");
        f.outbound(&v6(me, peer, ICMPV6, &echo(128, 5)), now);
        assert_eq!(f.inbound(&v6(peer, me, ICMPV6, &echo(129, 5)), now), Ok(()));
        assert_eq!(f.flows(), 1);
    }

    #[test]
    fn prefixes_parse_and_match() {
        let n = Net::parse("100.64.0.0/22").unwrap();
        assert!(n.contains("100.64.3.255".parse().unwrap()));
        assert!(!n.contains("100.64.4.0".parse().unwrap()));
        assert!(!n.contains("fd00::1".parse().unwrap()));
        assert_eq!(Net::parse("10.0.0.1").unwrap().len, 32);
        assert!(Net::parse("10.0.0.1/33").is_none());
        assert!(Net::parse("fd00::/129").is_none());
        assert!(Net::parse("x").is_none());
        assert!(
            Net::parse("::/0")
                .unwrap()
                .contains("fd00::1".parse().unwrap())
        );
    }
}
