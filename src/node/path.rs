//! The direct-path state of one peer (docs/mesh.md, "Direct paths"):
//! which of its candidate addresses to probe and when, the probes in
//! flight, which candidates answered (with their smoothed RTT), and the
//! confirmed direct endpoint. Pure: it is told the time and what arrived,
//! and says what to send; the data plane ([`super::dataplane`]) does the
//! I/O.
//!
//! - Candidates come from the map (the peer's reported endpoints, its
//!   operator-given `--endpoint`s first) and from the peer itself: the
//!   candidates of a call-me-maybe, and the source of an authenticated
//!   ping (peer-reflexive).
//! - A probe round pings every candidate at once: every second for a few
//!   rounds after something changed, then backing off to every 30 s while
//!   no direct path exists.
//! - A candidate is confirmed by a pong (which measures the RTT) or by
//!   authenticated WireGuard traffic from it. The confirmed endpoint is
//!   pinged every [`KEEPALIVE`]; once nothing was heard from it for
//!   [`DEAD_AFTER`] it is dead: unconfirmed, and probing starts again.
//! - Of several live candidates the lowest RTT wins, private addresses
//!   slightly favoured, and the endpoint moves only when another is better
//!   by a margin (hysteresis), so it does not flap between two similar
//!   paths.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::probe::{Tx, new_tx};

/// Gap between probe rounds right after a change.
pub const ROUND_FAST: Duration = Duration::from_secs(1);
/// Rounds at [`ROUND_FAST`] after a change, before backing off.
const FAST_ROUNDS: u32 = 5;
/// Longest gap between probe rounds while there is no direct path.
pub const ROUND_SLOW: Duration = Duration::from_secs(30);
/// How often the confirmed endpoint is pinged.
pub const KEEPALIVE: Duration = Duration::from_secs(2);
/// A path heard nothing from for this long (three missed keepalives) is
/// dead.
pub const DEAD_AFTER: Duration = Duration::from_millis(6_500);
/// A probe not answered within this is forgotten.
const PROBE_EXPIRES: Duration = Duration::from_secs(5);
/// Fewest seconds between two call-me-maybes to one peer.
pub const CALL_EVERY: Duration = Duration::from_secs(5);
/// WireGuard traffic from a new address moves the endpoint there once the
/// current one has been quiet this long (roaming): longer than the
/// keepalive, so a live endpoint answering its keepalives stays even when
/// the peer's traffic arrives from another address (a port forward in,
/// another mapping out).
const ROAM_QUIET: Duration = Duration::from_secs(3);
/// Fewest time between two pings back (answers to a peer's ping while
/// there is no direct path).
const PING_BACK_GAP: Duration = Duration::from_millis(100);
/// Most candidates kept from each source, most probes in flight.
const MAX_CANDIDATES: usize = 16;
const MAX_PENDING: usize = 64;
/// A public address's handicap against a private one of equal RTT.
const PUBLIC_HANDICAP: Duration = Duration::from_millis(2);
/// Smallest margin by which another path must beat the current one.
const MIN_MARGIN: Duration = Duration::from_millis(1);

/// Where packets for a peer go: the path rule (docs/mesh.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Rule 1: a confirmed direct endpoint that is not dead.
    Direct(SocketAddr),
    /// Rule 3: the first candidate in the map (unconfirmed).
    Candidate(SocketAddr),
    /// Nowhere to send.
    Nowhere,
}

impl Via {
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Via::Direct(a) | Via::Candidate(a) => Some(a),
            Via::Nowhere => None,
        }
    }
}

/// A change of the confirmed endpoint, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub from: Option<SocketAddr>,
    pub to: Option<SocketAddr>,
    pub reason: &'static str,
}

/// What [`PeerPath::poll`] asks the data plane to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Pings to send: (address, transaction id).
    pub pings: Vec<(SocketAddr, Tx)>,
    /// Send the peer a call-me-maybe with this device's candidates.
    pub call: bool,
    /// The confirmed endpoint changed (it died, or a better one took over).
    pub moved: Option<Moved>,
}

#[derive(Debug, Clone)]
struct Pending {
    tx: Tx,
    to: SocketAddr,
    sent: Instant,
}

/// A candidate that answered.
#[derive(Debug, Clone, Copy)]
struct Live {
    addr: SocketAddr,
    /// Smoothed RTT, once a pong measured one.
    srtt: Option<Duration>,
    heard: Instant,
}

/// One peer's direct-path state.
#[derive(Debug, Default)]
pub struct PeerPath {
    map: Vec<SocketAddr>,
    signalled: Vec<SocketAddr>,
    pending: Vec<Pending>,
    live: Vec<Live>,
    direct: Option<SocketAddr>,
    next_round: Option<Instant>,
    gap: Duration,
    fast_left: u32,
    last_keepalive: Option<Instant>,
    call_wanted: bool,
    last_call: Option<Instant>,
    last_trigger: Option<Instant>,
    /// The next round answers a call-me-maybe.
    answering: bool,
    last_ping_back: Option<Instant>,
}

/// The usable addresses in `list` (IPv4 for now: the node's socket is
/// IPv4), in order, without repeats.
fn usable(list: &[String]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in list.iter().filter_map(|c| c.parse::<SocketAddr>().ok()) {
        if a.is_ipv4() && a.port() != 0 && !a.ip().is_unspecified() && !out.contains(&a) {
            out.push(a);
        }
        if out.len() == MAX_CANDIDATES {
            break;
        }
    }
    out
}

fn private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00 || v6.is_loopback(),
    }
}

/// Lower is better: the RTT, with a handicap for public addresses; a path
/// without a measured RTT ranks last.
fn score(l: &Live) -> Duration {
    match l.srtt {
        Some(rtt) if private(l.addr.ip()) => rtt,
        Some(rtt) => rtt + PUBLIC_HANDICAP,
        None => Duration::MAX,
    }
}

impl PeerPath {
    /// A peer with these map candidates; probing starts at once.
    pub fn new(map: &[String], now: Instant) -> PeerPath {
        let mut p = PeerPath {
            map: usable(map),
            ..PeerPath::default()
        };
        p.trigger(now, true);
        p
    }

    /// The map's candidates for the peer changed (or not: then nothing
    /// happens).
    pub fn set_map(&mut self, map: &[String], now: Instant) {
        let map = usable(map);
        if map != self.map {
            self.map = map;
            self.trigger(now, false);
        }
    }

    /// The peer sent a call-me-maybe: probe its candidates now, while it
    /// probes this side. That one round neither resets the backoff nor
    /// calls back, so two peers that cannot reach each other do not keep
    /// each other probing fast.
    pub fn called(&mut self, candidates: &[String], now: Instant) {
        for a in usable(candidates).into_iter().rev() {
            self.add_signalled(a);
        }
        self.next_round = Some(now);
        self.answering = true;
    }

    fn add_signalled(&mut self, a: SocketAddr) {
        self.signalled.retain(|s| *s != a);
        self.signalled.insert(0, a);
        self.signalled.truncate(MAX_CANDIDATES);
    }

    /// Start a burst of probe rounds; with `call`, also tell the peer (so
    /// it probes back at the same time).
    pub fn trigger(&mut self, now: Instant, call: bool) {
        self.next_round = Some(now);
        self.gap = ROUND_FAST;
        self.fast_left = FAST_ROUNDS;
        self.call_wanted |= call;
        self.last_trigger = Some(now);
    }

    /// Traffic for the peer and no direct path: probe, unless already
    /// probing.
    pub fn wanted(&mut self, now: Instant) {
        let recent = self
            .last_trigger
            .is_some_and(|t| now.saturating_duration_since(t) < ROUND_SLOW);
        if !recent && !self.is_direct(now) {
            self.trigger(now, true);
        }
    }

    /// Every candidate, map first, without repeats.
    fn candidates(&self) -> Vec<SocketAddr> {
        let mut all = self.map.clone();
        for a in &self.signalled {
            if !all.contains(a) {
                all.push(*a);
            }
        }
        all
    }

    /// The confirmed endpoint, if it is not dead.
    pub fn direct(&self, now: Instant) -> Option<SocketAddr> {
        let d = self.direct?;
        self.live
            .iter()
            .find(|l| l.addr == d)
            .filter(|l| now.saturating_duration_since(l.heard) < DEAD_AFTER)
            .map(|l| l.addr)
    }

    fn is_direct(&self, now: Instant) -> bool {
        self.direct(now).is_some()
    }

    /// The confirmed endpoint's smoothed RTT.
    pub fn rtt(&self, now: Instant) -> Option<Duration> {
        let d = self.direct(now)?;
        self.live.iter().find(|l| l.addr == d)?.srtt
    }

    /// Where packets for the peer go now, leaving the relay out: the
    /// data plane's `Peer::route` puts it between the two (the path rule
    /// in docs/mesh.md).
    pub fn choose(&self, now: Instant) -> Via {
        if let Some(d) = self.direct(now) {
            return Via::Direct(d);
        }
        // Rule 2, the relay, is the data plane's (`Peer::route`).
        match self.map.first() {
            Some(a) => Via::Candidate(*a),
            None => Via::Nowhere,
        }
    }

    /// Timers: what to send now, and whether the path died.
    pub fn poll(&mut self, now: Instant) -> Due {
        let mut due = Due::default();
        self.pending
            .retain(|p| now.saturating_duration_since(p.sent) < PROBE_EXPIRES);
        if let Some(d) = self.direct
            && self.direct(now).is_none()
        {
            self.live
                .retain(|l| now.saturating_duration_since(l.heard) < DEAD_AFTER);
            self.direct = None;
            let next = self.reselect(now, "dead").and_then(|m| m.to);
            due.moved = Some(Moved {
                from: Some(d),
                to: next,
                reason: "dead",
            });
            if self.direct.is_none() {
                self.trigger(now, true);
            }
        }
        if self.next_round.is_some_and(|t| t <= now) {
            let answering = std::mem::take(&mut self.answering);
            for to in self.candidates() {
                due.pings.push((to, self.probe(to, now)));
            }
            if self.is_direct(now) {
                self.next_round = None;
            } else {
                self.call_wanted |= !answering;
                if self.fast_left > 0 {
                    self.fast_left -= 1;
                } else {
                    self.gap = (self.gap * 2).min(ROUND_SLOW);
                }
                self.next_round = Some(now + self.gap);
            }
            self.last_keepalive = Some(now);
        } else if let Some(d) = self.direct(now)
            && self
                .last_keepalive
                .is_none_or(|t| now.saturating_duration_since(t) >= KEEPALIVE)
        {
            due.pings.push((d, self.probe(d, now)));
            self.last_keepalive = Some(now);
        }
        if self.call_wanted
            && self
                .last_call
                .is_none_or(|t| now.saturating_duration_since(t) >= CALL_EVERY)
        {
            self.call_wanted = false;
            self.last_call = Some(now);
            due.call = true;
        }
        due
    }

    fn probe(&mut self, to: SocketAddr, now: Instant) -> Tx {
        let tx = new_tx();
        if self.pending.len() >= MAX_PENDING {
            self.pending.remove(0);
        }
        self.pending.push(Pending {
            tx: tx.clone(),
            to,
            sent: now,
        });
        tx
    }

    /// An authenticated pong: confirms the address its ping went to. None
    /// if it answers no probe of ours (late, or a replay).
    pub fn pong(&mut self, tx: &[u8], now: Instant) -> Option<Option<Moved>> {
        let i = self.pending.iter().position(|p| p.tx == tx)?;
        let p = self.pending.swap_remove(i);
        let rtt = now.saturating_duration_since(p.sent);
        match self.live.iter_mut().find(|l| l.addr == p.to) {
            Some(l) => {
                l.srtt = Some(match l.srtt {
                    Some(s) => (s * 7 + rtt) / 8,
                    None => rtt,
                });
                l.heard = now;
            }
            None => self.live.push(Live {
                addr: p.to,
                srtt: Some(rtt),
                heard: now,
            }),
        }
        Some(self.reselect(now, "probe"))
    }

    /// An authenticated ping from `from`: remember it as a candidate
    /// (peer-reflexive). With no direct path yet, a ping back to it goes
    /// out now (the transaction id to send): the peer's ping got through
    /// both NATs, so both have a mapping for this pair and the answer
    /// will too, whatever happened to earlier probes. At most one per
    /// [`PING_BACK_GAP`].
    pub fn pinged(&mut self, from: SocketAddr, now: Instant) -> Option<Tx> {
        if from.is_ipv4() && !self.map.contains(&from) && !self.signalled.contains(&from) {
            self.add_signalled(from);
        }
        let recent = self
            .last_ping_back
            .is_some_and(|t| now.saturating_duration_since(t) < PING_BACK_GAP);
        if self.is_direct(now) || recent {
            return None;
        }
        self.last_ping_back = Some(now);
        Some(self.probe(from, now))
    }

    /// Authenticated WireGuard traffic from `from`: the path is alive, and
    /// a new address takes over once the current one has gone quiet
    /// (WireGuard roaming).
    pub fn heard(&mut self, from: SocketAddr, now: Instant) -> Option<Moved> {
        match self.live.iter_mut().find(|l| l.addr == from) {
            Some(l) => l.heard = now,
            None => {
                if self.live.len() >= MAX_CANDIDATES {
                    self.live.sort_by_key(|l| std::cmp::Reverse(l.heard));
                    self.live.truncate(MAX_CANDIDATES - 1);
                }
                self.live.push(Live {
                    addr: from,
                    srtt: None,
                    heard: now,
                })
            }
        }
        if self.direct == Some(from) {
            return None;
        }
        let quiet = match self.direct(now) {
            None => true,
            Some(d) => self
                .live
                .iter()
                .find(|l| l.addr == d)
                .is_none_or(|l| now.saturating_duration_since(l.heard) >= ROAM_QUIET),
        };
        if !quiet {
            return None;
        }
        let moved = Moved {
            from: self.direct,
            to: Some(from),
            reason: "roamed",
        };
        self.direct = Some(from);
        self.next_round = None;
        Some(moved)
    }

    /// Pick the best live candidate; move only for a clear gain. Another
    /// candidate competes only while it answers (heard within
    /// [`ROAM_QUIET`]): a path that went quiet must not win back on an old
    /// RTT.
    fn reselect(&mut self, now: Instant, reason: &'static str) -> Option<Moved> {
        let direct = self.direct(now);
        let eligible = |l: &&Live| {
            let age = now.saturating_duration_since(l.heard);
            age < if Some(l.addr) == direct {
                DEAD_AFTER
            } else {
                ROAM_QUIET
            }
        };
        let best = *self.live.iter().filter(eligible).min_by_key(|l| score(l))?;
        let current = direct.and_then(|d| self.live.iter().find(|l| l.addr == d).copied());
        if let Some(c) = current {
            let (now_score, best_score) = (score(&c), score(&best));
            if c.addr == best.addr || now_score == Duration::MAX && best_score == Duration::MAX {
                return None;
            }
            let margin = (now_score.min(Duration::from_secs(1)) / 5).max(MIN_MARGIN);
            if best_score.saturating_add(margin) >= now_score {
                return None;
            }
        }
        let moved = Moved {
            from: self.direct,
            to: Some(best.addr),
            reason: if current.is_some() { "better" } else { reason },
        };
        self.direct = Some(best.addr);
        if best.srtt.is_some() {
            self.next_round = None;
        }
        Some(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }
    fn a(x: &str) -> SocketAddr {
        x.parse().unwrap()
    }
    const PUB: &str = "198.51.100.7:41641";
    const PRIV: &str = "10.1.0.2:41641";

    /// Answer the ping sent to `to` in `due` after `rtt`.
    fn answer(p: &mut PeerPath, due: &Due, to: &str, at: Instant) -> Option<Moved> {
        let (_, tx) = due.pings.iter().find(|(d, _)| *d == a(to)).unwrap();
        p.pong(tx, at).unwrap()
    }

    /// A path to PUB alone, confirmed at `t` by a pong after `rtt_ms`.
    fn confirmed(t: Instant, rtt_ms: u64) -> PeerPath {
        let mut p = PeerPath::new(&s(&[PUB]), t);
        let due = p.poll(t);
        answer(&mut p, &due, PUB, t + Duration::from_millis(rtt_ms));
        p
    }

    #[test]
    fn without_a_confirmed_path_the_first_map_candidate_is_used() {
        let t = Instant::now();
        let p = PeerPath::new(&s(&["junk", "[2001:db8::1]:5", PUB, PRIV]), t);
        assert_eq!(p.choose(t), Via::Candidate(a(PUB)));
        assert_eq!(PeerPath::new(&[], t).choose(t), Via::Nowhere);
    }

    #[test]
    fn a_pong_confirms_the_path_and_measures_the_rtt() {
        let t = Instant::now();
        let mut p = PeerPath::new(&s(&[PUB, PRIV]), t);
        let due = p.poll(t);
        assert_eq!(due.pings.len(), 2, "every candidate at once");
        assert!(due.call, "the peer is told to probe back");
        let m = answer(&mut p, &due, PUB, t + Duration::from_millis(30));
        assert_eq!(m.map(|m| m.to), Some(Some(a(PUB))));
        assert_eq!(p.choose(t), Via::Direct(a(PUB)));
        assert_eq!(
            p.rtt(t + Duration::from_millis(30)),
            Some(Duration::from_millis(30))
        );
        // The same pong again (a replay) answers nothing.
        let (_, tx) = due.pings[0].clone();
        assert_eq!(p.pong(&tx, t), None);
        assert_eq!(p.pong(b"unknown-tx!!", t), None);
    }

    #[test]
    fn a_dead_path_is_unconfirmed_and_probed_again() {
        let t = Instant::now();
        let mut p = confirmed(t, 5);
        // Keepalives go to the confirmed endpoint only, unanswered.
        let mut at = t;
        let mut keepalives = 0;
        while at < t + DEAD_AFTER {
            at += Duration::from_millis(250);
            let due = p.poll(at);
            assert!(due.moved.is_none() || at >= t + DEAD_AFTER);
            keepalives += due.pings.len();
        }
        assert!(keepalives >= 3, "{keepalives}");
        let at = t + DEAD_AFTER + Duration::from_millis(10);
        let due = p.poll(at);
        assert_eq!(
            due.moved,
            Some(Moved {
                from: Some(a(PUB)),
                to: None,
                reason: "dead"
            })
        );
        assert_eq!(p.choose(at), Via::Candidate(a(PUB)));
        assert_eq!(due.pings.len(), 1, "probing starts again");
        assert!(due.call);
    }

    #[test]
    fn authenticated_traffic_confirms_and_keeps_a_path_alive() {
        let t = Instant::now();
        let mut p = PeerPath::new(&s(&[PUB]), t);
        let roamed = a("203.0.113.9:6000");
        let m = p.heard(roamed, t).unwrap();
        assert_eq!(m.to, Some(roamed));
        assert_eq!(p.choose(t), Via::Direct(roamed));
        let later = t + DEAD_AFTER * 2;
        assert_eq!(p.heard(roamed, later), None);
        p.poll(later);
        assert_eq!(p.choose(later), Via::Direct(roamed));
        // Another address while the current one is busy: stay.
        assert_eq!(p.heard(a(PUB), later), None);
        assert_eq!(p.choose(later), Via::Direct(roamed));
        // Once the current one is quiet, the new address wins.
        let quiet = later + ROAM_QUIET;
        assert_eq!(p.heard(a(PUB), quiet).map(|m| m.to), Some(Some(a(PUB))));
    }

    #[test]
    fn a_live_endpoint_stays_while_traffic_arrives_from_another_address() {
        // Pings to a port forward are answered; the peer's own packets
        // leave its NAT from another mapping.
        let t = Instant::now();
        let mut p = confirmed(t, 3);
        let other = a("198.51.100.7:50000");
        let mut at = t;
        let mut moves = 0;
        while at < t + Duration::from_secs(60) {
            at += Duration::from_millis(250);
            moves += usize::from(p.heard(other, at).is_some());
            let due = p.poll(at);
            if let Some((to, tx)) = due.pings.first() {
                assert_eq!(*to, a(PUB));
                moves += usize::from(
                    p.pong(tx, at + Duration::from_millis(3))
                        .flatten()
                        .is_some(),
                );
            }
        }
        assert_eq!(moves, 0);
        assert_eq!(p.choose(at), Via::Direct(a(PUB)));
    }

    #[test]
    fn a_quiet_path_does_not_win_back_on_its_old_rtt() {
        let t = Instant::now();
        let mut p = confirmed(t, 2);
        // PUB's NAT mapping is gone; the peer's traffic comes from a new
        // address.
        let new = a("198.51.100.9:41641");
        let at = t + ROAM_QUIET + Duration::from_millis(10);
        assert_eq!(p.heard(new, at).map(|m| m.to), Some(Some(new)));
        let due = p.poll(at);
        let (to, tx) = due.pings.first().cloned().unwrap();
        assert_eq!(to, new, "the keepalive goes to the new endpoint");
        assert_eq!(p.pong(&tx, at + Duration::from_millis(10)), Some(None));
        assert_eq!(p.choose(at), Via::Direct(new));
    }

    #[test]
    fn a_better_path_wins_only_by_a_margin() {
        let t = Instant::now();
        let other = "198.51.100.8:41641";
        let mut p = PeerPath::new(&s(&[PUB, other]), t);
        let due = p.poll(t);
        answer(&mut p, &due, PUB, t + Duration::from_millis(20));
        // Slightly faster: not worth a move.
        let m = answer(&mut p, &due, other, t + Duration::from_millis(19));
        assert_eq!(m, None);
        assert_eq!(p.choose(t), Via::Direct(a(PUB)));
        // Much faster (its smoothed RTT falls): move.
        let mut moved = None;
        for i in 1..40 {
            let at = t + Duration::from_secs(i);
            p.trigger(at, false);
            let due = p.poll(at);
            answer(&mut p, &due, PUB, at + Duration::from_millis(20));
            if let Some(m) = answer(&mut p, &due, other, at + Duration::from_millis(2)) {
                moved = Some((i, m));
                break;
            }
        }
        let (_, m) = moved.expect("moved to the faster path");
        assert_eq!((m.to, m.reason), (Some(a(other)), "better"));
    }

    #[test]
    fn a_private_candidate_is_preferred_at_equal_rtt() {
        let t = Instant::now();
        let mut p = PeerPath::new(&s(&[PUB, PRIV]), t);
        let due = p.poll(t);
        answer(&mut p, &due, PUB, t + Duration::from_micros(300));
        answer(&mut p, &due, PRIV, t + Duration::from_micros(300));
        assert_eq!(p.choose(t), Via::Direct(a(PRIV)));
    }

    #[test]
    fn rounds_back_off_and_calls_are_rate_limited() {
        let t = Instant::now();
        let mut p = PeerPath::new(&s(&[PUB]), t);
        let (mut rounds, mut calls) = (Vec::new(), 0);
        let mut at = t;
        while at < t + Duration::from_secs(120) {
            let due = p.poll(at);
            if !due.pings.is_empty() {
                rounds.push(at - t);
            }
            calls += usize::from(due.call);
            at += Duration::from_millis(250);
        }
        assert_eq!(rounds[1] - rounds[0], ROUND_FAST);
        let last = rounds[rounds.len() - 1] - rounds[rounds.len() - 2];
        assert_eq!(last, ROUND_SLOW);
        assert!(calls <= rounds.len() && calls >= 4, "{calls}");
        // A new map candidate starts a fast burst again.
        p.set_map(&s(&[PUB, PRIV]), at);
        assert_eq!(p.poll(at).pings.len(), 2);
        // An authenticated ping from an unknown address adds it and asks
        // for a ping back, once.
        let from = a("192.0.2.44:7777");
        assert!(p.pinged(from, at).is_some());
        assert!(p.pinged(from, at).is_none(), "one ping back per 100 ms");
        assert!(p.pinged(from, at + PING_BACK_GAP).is_some());
        p.trigger(at, false);
        assert!(p.poll(at).pings.iter().any(|(d, _)| *d == from));
    }

    #[test]
    fn peers_that_cannot_reach_each_other_settle_to_slow_probing() {
        let t = Instant::now();
        let mut a = PeerPath::new(&s(&[PUB]), t);
        let mut b = PeerPath::new(&s(&[PRIV]), t);
        let (mut calls, mut rounds) = (0, 0);
        let mut at = t;
        while at < t + Duration::from_secs(600) {
            let (da, db) = (a.poll(at), b.poll(at));
            if da.call {
                b.called(&s(&[PUB]), at);
            }
            if db.call {
                a.called(&s(&[PRIV]), at);
            }
            if at >= t + Duration::from_secs(300) {
                calls += usize::from(da.call) + usize::from(db.call);
                rounds += usize::from(!da.pings.is_empty()) + usize::from(!db.pings.is_empty());
            }
            at += Duration::from_millis(250);
        }
        // Five minutes: each side calls every 30 s and answers the other.
        assert!(calls <= 22, "{calls} calls");
        assert!(rounds <= 44, "{rounds} rounds");
        assert!(calls >= 10, "{calls}: still calling now and then");
    }

    #[test]
    fn call_me_maybe_candidates_are_probed() {
        let t = Instant::now();
        let mut p = PeerPath::new(&s(&[PUB]), t);
        p.poll(t);
        let at = t + Duration::from_millis(300);
        p.called(&s(&["192.0.2.5:41641", "bogus", "192.0.2.5:41641"]), at);
        let due = p.poll(at);
        let sent: Vec<_> = due.pings.iter().map(|(d, _)| *d).collect();
        assert_eq!(sent, vec![a(PUB), a("192.0.2.5:41641")]);
        // Not the first map candidate: the fallback stays the map's.
        assert_eq!(p.choose(at), Via::Candidate(a(PUB)));
    }
}
