//! The state machine on synthetic traces: a deterministic event simulation
//! of one bottleneck (rate, FIFO buffer with tail drop, one-way delay,
//! seeded random loss and CE marks), no sockets, no clock.

use super::*;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

const MTU: u64 = 1200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Ack {
        ce: bool,
    },
    Loss,
    /// The sender's timer (see [`Sim::wake`]).
    Wake,
    /// An ACK or a detected loss of the competing flow ([`Sim::cross`]).
    CrossAck,
    CrossLoss,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Event {
    at: Duration,
    seq: u64,
    kind: Kind,
    sent: Duration,
}

struct Sim {
    bbr: Bbr,
    start: Instant,
    now: Duration,
    /// Bottleneck rate in bytes per second.
    rate: f64,
    one_way: Duration,
    buffer: u64,
    /// Random loss probability per packet.
    loss: f64,
    /// CE-mark probability per delivered packet.
    ce: f64,
    link_free: Duration,
    events: BinaryHeap<Reverse<Event>>,
    seq: u64,
    rng: u64,
    in_flight: u64,
    acked: u64,
    /// (when, state) at every state change.
    states: Vec<(Duration, State)>,
    /// (when sent, queueing delay at the bottleneck).
    queue: Vec<(Duration, Duration)>,
    /// A late-woken sender under quinn's pacer: it runs only every `wake`
    /// and then sends at most `window × 2 ms / RTT` (at least 10 packets).
    wake: Option<Duration>,
    next_wake: Duration,
    wake_pending: bool,
    /// quinn's pacer: at most `1.25 × window / RTT`, in bursts of at most
    /// `window × 2 ms / RTT` (10 packets at least).
    paced: bool,
    pacer_tokens: f64,
    pacer_last: Duration,
    /// Stream flow control: the receiver grants `window` bytes beyond what
    /// it has received, in steps of an eighth of it (a MAX_STREAM_DATA
    /// frame arrives with an ACK); the sender may not send past the grant.
    flow_window: Option<u64>,
    received: u64,
    sent_bytes: u64,
    /// The last send stopped at the flow-control grant, not the window.
    flow_blocked: bool,
    lost_bytes: u64,
    /// ACKs reach the sender only at multiples of this (a receiver or
    /// host that handles them in batches): ACK compression, which makes
    /// per-ACK delivery-rate samples read above the link's rate.
    ack_batch: Option<Duration>,
    /// A competing loss-based flow through the same buffer.
    cross: Option<Cross>,
}

/// A loss-based flow like the bench's Cubic TCP download: slow start
/// until loss (the kernel's delay-based exit, HyStart, did not hold it
/// back there), then Cubic's window growth (C = 0.4, beta = 0.7) from the
/// last reduction, at most one reduction per round trip; ACK-clocked,
/// unpaced, its window capped as a receive window caps it.
#[derive(Debug, Clone)]
struct Cross {
    cwnd: f64,
    ssthresh: f64,
    max_window: f64,
    in_flight: u64,
    acked: u64,
    /// Cubic's curve: its plateau in packets, the seconds from the epoch
    /// to it, and when the epoch began.
    origin: f64,
    k: f64,
    epoch: Duration,
    /// Losses of packets sent before this belong to the last reduction.
    recovery_start: Duration,
}

impl Cross {
    fn new(max_window: u64) -> Self {
        Self {
            cwnd: 10.0 * MTU as f64,
            ssthresh: f64::INFINITY,
            max_window: max_window as f64,
            in_flight: 0,
            acked: 0,
            origin: 0.0,
            k: 0.0,
            epoch: Duration::ZERO,
            recovery_start: Duration::ZERO,
        }
    }

    fn on_ack(&mut self, now: Duration) {
        self.in_flight -= MTU;
        self.acked += MTU;
        let mtu = MTU as f64;
        if self.cwnd < self.ssthresh {
            self.cwnd += mtu;
        } else {
            let t = (now - self.epoch).as_secs_f64() - self.k;
            let target = (self.origin + 0.4 * t * t * t) * mtu;
            let reno = mtu * mtu / self.cwnd;
            self.cwnd += reno.max((target - self.cwnd) * mtu / self.cwnd);
        }
        self.cwnd = self.cwnd.min(self.max_window);
    }

    fn on_loss(&mut self, now: Duration, sent: Duration) {
        self.in_flight -= MTU;
        if sent >= self.recovery_start {
            self.origin = self.cwnd / MTU as f64;
            self.k = (self.origin * 0.3 / 0.4).cbrt();
            self.cwnd = (self.cwnd * 0.7).max(2.0 * MTU as f64);
            self.ssthresh = self.cwnd;
            self.epoch = now;
            self.recovery_start = now;
        }
    }
}

impl Sim {
    fn new(mbit: f64, rtt_ms: u64, buffer_bdp: f64) -> Self {
        let start = Instant::now();
        let rate = mbit * 1e6 / 8.0;
        let one_way = Duration::from_millis(rtt_ms) / 2;
        let bdp = rate * Duration::from_millis(rtt_ms).as_secs_f64();
        let bbr = Bbr::new(Arc::new(BbrConfig::default()), start, MTU as u16);
        let state = bbr.state();
        Self {
            bbr,
            start,
            now: Duration::ZERO,
            rate,
            one_way,
            buffer: (bdp * buffer_bdp) as u64,
            loss: 0.0,
            ce: 0.0,
            link_free: Duration::ZERO,
            events: BinaryHeap::new(),
            seq: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            in_flight: 0,
            acked: 0,
            states: vec![(Duration::ZERO, state)],
            queue: Vec::new(),
            wake: None,
            next_wake: Duration::ZERO,
            wake_pending: false,
            paced: false,
            pacer_tokens: 0.0,
            pacer_last: Duration::ZERO,
            flow_window: None,
            received: 0,
            sent_bytes: 0,
            flow_blocked: false,
            lost_bytes: 0,
            ack_batch: None,
            cross: None,
        }
    }

    /// The competing flow sends what its window allows.
    fn send_cross(&mut self) {
        let serialise = Duration::from_secs_f64(MTU as f64 / self.rate);
        let now = self.now;
        while let Some(cross) = &mut self.cross
            && (cross.in_flight + MTU) as f64 <= cross.cwnd
        {
            cross.in_flight += MTU;
            let queued = self.link_free.saturating_sub(now);
            let queued_bytes = (queued.as_secs_f64() * self.rate) as u64;
            if queued_bytes + MTU > self.buffer {
                let detect = queued + 3 * serialise + 2 * self.one_way;
                self.push(now + detect, Kind::CrossLoss, now);
                continue;
            }
            let depart = now.max(self.link_free) + serialise;
            self.link_free = depart;
            self.push(depart + 2 * self.one_way, Kind::CrossAck, now);
        }
    }

    /// The competing flow's delivered bytes.
    fn cross_acked(&self) -> u64 {
        self.cross.as_ref().map_or(0, |c| c.acked)
    }

    fn bdp(&self) -> f64 {
        self.rate * (2 * self.one_way).as_secs_f64()
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng = self
            .rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.rng >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn at(&self, d: Duration) -> Instant {
        self.start + d
    }

    fn push(&mut self, at: Duration, kind: Kind, sent: Duration) {
        self.seq += 1;
        self.events.push(Reverse(Event {
            at,
            seq: self.seq,
            kind,
            sent,
        }));
    }

    fn send(&mut self) {
        let serialise = Duration::from_secs_f64(MTU as f64 / self.rate);
        let mut budget = u64::MAX;
        if let Some(tick) = self.wake {
            if self.now < self.next_wake {
                if !self.wake_pending {
                    self.wake_pending = true;
                    self.push(self.next_wake, Kind::Wake, self.next_wake);
                }
                return;
            }
            let rtt = (2 * self.one_way).as_secs_f64();
            budget = ((self.bbr.window() as f64 * 0.002 / rtt) as u64).max(10 * MTU);
            self.next_wake = self.now + tick;
        }
        let rtt = (2 * self.one_way).as_secs_f64();
        if self.paced {
            let window = self.bbr.window() as f64;
            let burst = (window * 0.002 / rtt).max(10.0 * MTU as f64);
            let elapsed = (self.now - self.pacer_last).as_secs_f64();
            self.pacer_tokens = (self.pacer_tokens + elapsed * 1.25 * window / rtt).min(burst);
            self.pacer_last = self.now;
        }
        self.flow_blocked = false;
        while self.in_flight + MTU <= self.bbr.window() && budget >= MTU {
            if let Some(w) = self.flow_window {
                let granted = self.received / (w / 8) * (w / 8) + w;
                if self.sent_bytes + MTU > granted {
                    self.flow_blocked = true;
                    break;
                }
            }
            if self.paced && self.pacer_tokens < MTU as f64 {
                if !self.wake_pending {
                    let rate = 1.25 * self.bbr.window() as f64 / rtt;
                    let wait = (MTU as f64 - self.pacer_tokens) / rate;
                    let at =
                        self.now + Duration::from_secs_f64(wait).max(Duration::from_micros(50));
                    self.wake_pending = true;
                    self.push(at, Kind::Wake, at);
                }
                break;
            }
            if self.paced {
                self.pacer_tokens -= MTU as f64;
            }
            self.sent_bytes += MTU;
            budget -= MTU;
            let now = self.now;
            self.bbr.on_sent(self.at(now), MTU, self.seq);
            self.in_flight += MTU;
            let queued = self.link_free.saturating_sub(now);
            let queued_bytes = (queued.as_secs_f64() * self.rate) as u64;
            // Loss is detected about three packets after the lost one.
            let detect = 3 * serialise + 2 * self.one_way;
            if queued_bytes + MTU > self.buffer {
                self.push(now + queued + detect, Kind::Loss, now);
                continue;
            }
            self.queue.push((now, queued));
            let depart = now.max(self.link_free) + serialise;
            self.link_free = depart;
            let (loss, ce) = (self.loss, self.ce);
            if self.chance(loss) {
                self.push(depart + detect, Kind::Loss, now);
            } else {
                let ce = self.chance(ce);
                let mut at = depart + 2 * self.one_way;
                if let Some(batch) = self.ack_batch {
                    let step = batch.as_nanos();
                    at = Duration::from_nanos((at.as_nanos().div_ceil(step) * step) as u64);
                }
                self.push(at, Kind::Ack { ce }, now);
            }
        }
    }

    fn run_until(&mut self, end: Duration) {
        self.send();
        self.send_cross();
        while let Some(Reverse(event)) = self.events.peek().copied() {
            if event.at > end {
                break;
            }
            self.events.pop();
            self.now = event.at;
            let (now, sent) = (self.at(event.at), self.at(event.sent));
            match event.kind {
                Kind::Ack { ce } => {
                    self.in_flight -= MTU;
                    self.acked += MTU;
                    // The receiver has it (and the grant moves) an RTT
                    // half before this ACK; close enough for the model.
                    self.received += MTU;
                    self.bbr.acked(now, sent, MTU);
                    let app_limited = self.flow_blocked;
                    self.bbr.on_end_acks(now, self.in_flight, app_limited, None);
                    if ce {
                        self.bbr.on_congestion_event(now, sent, false, 0);
                    }
                }
                Kind::Loss => {
                    self.in_flight -= MTU;
                    self.lost_bytes += MTU;
                    // Retransmitted data is new data to flow control's
                    // receiver only once; count it as received later.
                    self.received += MTU;
                    self.bbr.on_congestion_event(now, sent, false, MTU);
                }
                Kind::Wake => self.wake_pending = false,
                Kind::CrossAck => {
                    if let Some(cross) = &mut self.cross {
                        cross.on_ack(event.at);
                    }
                }
                Kind::CrossLoss => {
                    if let Some(cross) = &mut self.cross {
                        cross.on_loss(event.at, event.sent);
                    }
                }
            }
            if self.states.last().map(|s| s.1) != Some(self.bbr.state()) {
                self.states.push((self.now, self.bbr.state()));
            }
            self.send();
            self.send_cross();
        }
        self.now = end;
    }

    /// Delivery rate over `[from, to]` as a share of the bottleneck rate.
    fn utilisation(&mut self, from: f64, to: f64) -> f64 {
        self.run_until(Duration::from_secs_f64(from));
        let before = self.acked;
        self.run_until(Duration::from_secs_f64(to));
        (self.acked - before) as f64 / (to - from) / self.rate
    }

    /// Mean bottleneck queueing delay of packets sent in `[from, to]`.
    fn mean_queue(&self, from: f64, to: f64) -> Duration {
        let (from, to) = (Duration::from_secs_f64(from), Duration::from_secs_f64(to));
        let q: Vec<_> = self
            .queue
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|(_, q)| *q)
            .collect();
        q.iter().sum::<Duration>() / q.len().max(1) as u32
    }

    fn first(&self, pred: impl Fn(State) -> bool) -> Option<Duration> {
        self.states.iter().find(|(_, s)| pred(*s)).map(|(t, _)| *t)
    }

    /// When the sender first entered `state`; the test fails if it never did.
    fn entered(&self, state: State) -> Duration {
        self.first(|s| s == state)
            .unwrap_or_else(|| panic!("{state:?} never entered"))
    }

    /// Run in small steps until `pred` holds; panics after `limit`.
    fn run_until_state(&mut self, limit: f64, pred: impl Fn(State) -> bool) {
        while !pred(self.bbr.state()) {
            assert!(
                self.now < Duration::from_secs_f64(limit),
                "state not reached by {limit} s; states: {:?}",
                self.states
            );
            let next = self.now + Duration::from_millis(1);
            self.run_until(next);
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[test]
fn startup_exits_once_bandwidth_plateaus_and_drain_empties_the_queue() {
    let mut sim = Sim::new(10.0, 40, 4.0);
    sim.run_until(Duration::from_secs(3));
    let drain = sim.entered(State::Drain);
    // 12 kB to a 50 kB BDP doubles in ~2 rounds, then 3 flat rounds.
    assert!(secs(drain) < 1.0, "Startup lasted {drain:?}");
    let rate = sim.rate;
    assert!(
        (sim.bbr.max_bw - rate).abs() < 0.1 * rate,
        "bw estimate {} vs link {rate}",
        sim.bbr.max_bw
    );
    let probe = sim
        .first(|s| matches!(s, State::ProbeBw(_)))
        .expect("Drain never ended");
    assert!(probe > drain && secs(probe - drain) < 0.5);
    // After Drain the standing queue is gone.
    assert!(sim.mean_queue(2.0, 3.0) < Duration::from_millis(10));
}

#[test]
fn startup_keeps_growing_while_bandwidth_grows() {
    // A 1 Gbit/s pipe: the bandwidth keeps doubling for many rounds, so
    // three flat rounds come only when the pipe is full.
    let mut sim = Sim::new(1000.0, 40, 2.0);
    sim.run_until(Duration::from_millis(300));
    assert_eq!(sim.bbr.state(), State::Startup);
    sim.run_until(Duration::from_secs(2));
    sim.entered(State::Drain);
    assert!(sim.bbr.max_bw > 0.8 * sim.rate);
}

#[test]
fn fills_the_link_with_a_small_queue() {
    let mut sim = Sim::new(10.0, 40, 4.0);
    let used = sim.utilisation(2.0, 10.0);
    assert!(used > 0.9, "utilisation {used}");
    let queue = sim.mean_queue(2.0, 10.0);
    assert!(queue < Duration::from_millis(10), "mean queue {queue:?}");
    // It cycled through all ProbeBW phases.
    for phase in [Phase::Down, Phase::Cruise, Phase::Refill, Phase::Up] {
        assert!(
            sim.first(|s| s == State::ProbeBw(phase)).is_some(),
            "{phase:?}"
        );
    }
}

#[test]
fn compressed_acks_on_a_slow_link_do_not_build_a_queue() {
    // The namespace bench's `rate10m`: 10 Mbit/s, a sub-millisecond base
    // RTT, a deep buffer, ACKs handled every 4 ms. Compressed ACKs make
    // rate samples read above the link's rate; that must not pass for a
    // sender held back by its host (the pacer gain) and triple the window.
    let mut sim = Sim::new(10.0, 1, 1000.0);
    sim.paced = true;
    sim.ack_batch = Some(Duration::from_millis(4));
    let used = sim.utilisation(2.0, 12.0);
    let queue = sim.mean_queue(2.0, 12.0);
    assert!(used > 0.9, "utilisation {used}");
    // 39 ms with the gain tripled; 20 ms with the aggregation allowance
    // kept on top of a standing queue; 16.5 ms without (17.7 ms since Up
    // lasts a round trip at the path's current RTT). Deterministic.
    assert!(
        queue < Duration::from_millis(18),
        "mean queue {queue:?}, pacer gain {}",
        sim.bbr.pacer_gain
    );
}

#[test]
fn random_loss_below_threshold_does_not_collapse_the_rate() {
    // 1 % random loss on a 50 ms path: Cubic would halve per loss.
    let mut sim = Sim::new(20.0, 50, 2.0);
    sim.loss = 0.01;
    let used = sim.utilisation(3.0, 12.0);
    assert!(used > 0.8, "utilisation {used} under 1 % loss");
}

#[test]
fn loss_above_threshold_in_probe_up_bounds_inflight() {
    let mut sim = Sim::new(10.0, 40, 8.0);
    // Loss starts with the probe (Refill, then Up); a lost packet is
    // detected about an RTT after it was sent.
    sim.run_until_state(10.0, |s| s == State::ProbeBw(Phase::Refill));
    assert_eq!(sim.bbr.inflight_hi, u64::MAX, "no bound before the loss");
    sim.loss = 0.10;
    sim.run_until_state(12.0, |s| s == State::ProbeBw(Phase::Up));
    sim.run_until_state(12.0, |s| s != State::ProbeBw(Phase::Up));
    assert_eq!(sim.bbr.state(), State::ProbeBw(Phase::Down));
    sim.run_until(sim.now + Duration::from_millis(100));
    let hi = sim.bbr.inflight_hi;
    assert!(hi != u64::MAX, "inflight_hi not set");
    assert!(
        (hi as f64) < 2.0 * sim.bdp(),
        "inflight_hi {hi} vs BDP {}",
        sim.bdp()
    );
    sim.loss = 0.0;
    sim.run_until(sim.now + Duration::from_millis(200));
    assert!(
        sim.bbr.window() <= hi,
        "window {} above inflight_hi {hi}",
        sim.bbr.window()
    );
}

#[test]
fn ce_marks_in_probe_up_bound_inflight() {
    let mut sim = Sim::new(10.0, 40, 8.0);
    sim.run_until_state(10.0, |s| s == State::ProbeBw(Phase::Refill));
    sim.ce = 0.9;
    sim.run_until_state(12.0, |s| s == State::ProbeBw(Phase::Up));
    sim.run_until_state(12.0, |s| s != State::ProbeBw(Phase::Up));
    sim.run_until(sim.now + Duration::from_millis(100));
    assert!(sim.bbr.inflight_hi != u64::MAX, "CE marks ignored");
    // Sustained marking outside probes shrinks inflight_lo too.
    sim.run_until(sim.now + Duration::from_secs(1));
    assert!(sim.bbr.inflight_lo != u64::MAX);
    assert!(sim.bbr.ecn_alpha > 0.1);
}

#[test]
fn probe_rtt_entered_after_min_rtt_expiry_and_left_after_200ms() {
    let mut sim = Sim::new(10.0, 40, 4.0);
    sim.run_until(Duration::from_secs(12));
    let entered = sim.entered(State::ProbeRtt);
    assert!(
        secs(entered) > 4.5 && secs(entered) < 6.5,
        "ProbeRTT at {entered:?}"
    );
    let left = sim
        .states
        .iter()
        .find(|(t, s)| *t > entered && *s != State::ProbeRtt)
        .map(|(t, _)| *t)
        .expect("ProbeRTT never left");
    let held = left - entered;
    assert!(
        held >= Duration::from_millis(200) && held < Duration::from_millis(500),
        "ProbeRTT held {held:?}"
    );
    // During ProbeRTT the window is about half a BDP.
    let mut sim = Sim::new(10.0, 40, 4.0);
    sim.run_until_state(8.0, |s| s == State::ProbeRtt);
    sim.run_until(sim.now + Duration::from_millis(100));
    assert!((sim.bbr.window() as f64) < 0.8 * sim.bdp());
}

#[test]
fn an_rtt_increase_is_followed_within_a_second() {
    let mut sim = Sim::new(20.0, 20, 4.0);
    sim.run_until(Duration::from_secs(3));
    sim.one_way = Duration::from_millis(40); // 20 ms -> 80 ms
    let used = sim.utilisation(4.0, 6.0);
    assert!(used > 0.8, "utilisation {used} after the RTT grew");
}

#[test]
fn a_late_woken_sender_widens_the_window_for_the_pacer() {
    // Woken every 5 ms, a sender paced by quinn gets out 2 ms worth of its
    // window per wake-up: with a window of one BDP, 40 % of the link.
    let mut sim = Sim::new(50.0, 40, 4.0);
    sim.wake = Some(Duration::from_millis(5));
    let used = sim.utilisation(4.0, 10.0);
    assert!(
        used > 0.8,
        "utilisation {used}, pacer gain {}",
        sim.bbr.pacer_gain
    );
    // Woken in time again, the window comes back down: no standing queue.
    sim.wake = None;
    sim.run_until(Duration::from_secs(14));
    assert!(
        sim.bbr.pacer_gain < 1.5,
        "pacer gain {}",
        sim.bbr.pacer_gain
    );
    assert!(sim.mean_queue(13.0, 14.0) < Duration::from_millis(10));
}

#[test]
fn persistent_congestion_restarts_from_the_minimum_window() {
    let mut sim = Sim::new(10.0, 40, 4.0);
    sim.run_until(Duration::from_secs(2));
    assert!(sim.bbr.window() > 10 * MTU);
    let now = sim.at(sim.now);
    sim.bbr.on_congestion_event(now, now, true, 10 * MTU);
    assert_eq!(sim.bbr.window(), 4 * MTU);
}

#[test]
fn an_app_limited_sender_stays_in_startup() {
    // One packet per 100 ms on a 40 ms path: every round's delivery rate
    // is the same, but only because the application sends no more; that
    // is no sign of a full pipe.
    let start = Instant::now();
    let mut bbr = Bbr::new(Arc::new(BbrConfig::default()), start, MTU as u16);
    let mut t = start;
    for _ in 0..30 {
        bbr.on_end_acks(t, 0, true, None);
        bbr.on_sent(t, MTU, 0);
        let sent = t;
        t += Duration::from_millis(40);
        bbr.acked(t, sent, MTU);
        bbr.on_end_acks(t, 0, true, None);
        t += Duration::from_millis(60);
    }
    assert!(bbr.round_count >= 20);
    assert_eq!(bbr.state(), State::Startup);
    assert!(!bbr.filled_pipe);
}

#[test]
fn a_flow_control_limited_sender_leaves_startup_on_loss_and_stops_bursting() {
    // The namespace bench's rtt50 path: the bottleneck (there, the
    // userspace relay) has a shallow buffer, the stream's flow-control
    // window (here 1.6 BDP), not the congestion window, caps what is in
    // flight, and the sender is woken late (a loaded host). quinn paces at
    // 1.25 × window / RTT, so a window far above what flow control lets
    // out sends each grant as a burst the buffer drops. Before this test,
    // Startup never ended there (every sample app-limited, no round
    // filled its window), the pacer gain rose to 2.4 and a third of the
    // packets were lost.
    let mut sim = Sim::new(150.0, 50, 0.25);
    sim.paced = true;
    sim.wake = Some(Duration::from_millis(3));
    sim.flow_window = Some(1536 * 1024);
    sim.run_until(Duration::from_secs(2));
    assert_ne!(sim.bbr.state(), State::Startup, "states: {:?}", sim.states);
    let (sent, lost) = (sim.sent_bytes, sim.lost_bytes);
    let used = sim.utilisation(2.0, 8.0);
    let loss = (sim.lost_bytes - lost) as f64 / (sim.sent_bytes - sent) as f64;
    assert!(
        loss < 0.05,
        "loss rate {loss} (window {}, pacer gain {}, inflight_hi {}, inflight_lo {}, states {:?})",
        sim.bbr.window(),
        sim.bbr.pacer_gain,
        sim.bbr.inflight_hi,
        sim.bbr.inflight_lo,
        sim.states
    );
    assert!(
        used > 0.8,
        "utilisation {used} (window {})",
        sim.bbr.window()
    );
}

#[test]
fn a_late_woken_sender_fills_the_pipe_after_startup_loss() {
    // The namespace bench's rtt50 path once the relay got its buffers: a
    // buffer of a quarter BDP, so Startup's overshoot sets `inflight_hi`,
    // and a sender woken every 5 ms that keeps well under its window in
    // flight. Capping Cruise's window at `inflight_hi` (widening only the
    // headroom by the pacer gain) was tried: each overshoot then lost and
    // kept `inflight_hi` at its Startup value, and utilisation fell from
    // 0.86 to 0.76; the probes must be free to raise it.
    let mut sim = Sim::new(150.0, 50, 0.25);
    sim.paced = true;
    sim.wake = Some(Duration::from_millis(5));
    sim.run_until(Duration::from_secs(2));
    assert_ne!(sim.bbr.inflight_hi, u64::MAX, "Startup lost nothing");
    let (sent, lost) = (sim.sent_bytes, sim.lost_bytes);
    let used = sim.utilisation(2.0, 8.0);
    let loss = (sim.lost_bytes - lost) as f64 / (sim.sent_bytes - sent) as f64;
    assert!(
        used > 0.8,
        "utilisation {used} (window {}, pacer gain {}, inflight_hi {})",
        sim.bbr.window(),
        sim.bbr.pacer_gain,
        sim.bbr.inflight_hi
    );
    assert!(loss < 0.05, "loss rate {loss}");
}

#[test]
fn a_late_woken_sender_holds_its_rate_under_wifi_loss() {
    // The bench's `wifi` profile: 2 % random loss. With the draft's 2 %
    // loss threshold, a sender woken every 3 ms kept 0.41 of the link
    // (0.88 when woken on time): about half the bandwidth probes found a
    // sample above the threshold and set `inflight_hi` from what was in
    // flight, which the late pacer holds under the window, so
    // `inflight_hi` and then `max_bw` stepped down (637 -> 445 -> 250 KB
    // for a 562 KB BDP). The 3 % threshold leaves 2 % random loss alone.
    late_woken_under_random_loss(0.02);
}

/// A 150 Mbit/s, 30 ms path with `loss` random loss and a sender woken
/// every 3 ms: it must keep more than 0.8 of the link.
fn late_woken_under_random_loss(loss: f64) {
    let mut sim = Sim::new(150.0, 30, 1.0);
    sim.loss = loss;
    sim.paced = true;
    sim.wake = Some(Duration::from_millis(3));
    sim.run_until(Duration::from_secs(2));
    let used = sim.utilisation(2.0, 8.0);
    assert!(
        used > 0.8,
        "utilisation {used} under {loss} loss (inflight_hi {}, inflight_lo {})",
        sim.bbr.inflight_hi,
        sim.bbr.inflight_lo
    );
}

#[test]
fn random_loss_just_above_the_threshold_is_told_from_congestion() {
    // 2.5 % random loss, late-woken as above. The loss rate is below the
    // threshold on average, but a round's count is noisy: judged against
    // the bare 3 %, one round in several read as congestion, each lowered
    // the bounds to what it delivered, and the sender kept 0.51 of the
    // link. A count must clear the threshold by two standard deviations.
    late_woken_under_random_loss(0.025);
}

/// The bench's fairness run: `rate10m-deep` (10 Mbit/s, 40 ms, ~4.8 s of
/// buffer), our stream window, and a Cubic download with a 4 MB receive
/// window starting with us; run for 30 s.
fn sharing_a_deep_buffer() -> Sim {
    let mut sim = Sim::new(10.0, 40, 120.0);
    sim.paced = true;
    sim.flow_window = Some(u64::from(crate::tunnel::transport::STREAM_WINDOW));
    sim.cross = Some(Cross::new(4_000_000));
    sim.run_until(Duration::from_secs(20));
    sim
}

#[test]
fn shares_a_deep_buffer_with_a_cubic_download() {
    // BBR keeps its inflight near `bandwidth x RTT` while Cubic's window
    // grows until the buffer overflows: 0.06-0.12 of the link at 20-30 s
    // before the loss-based window for a shared queue; about 0.35 since.
    let mut sim = sharing_a_deep_buffer();
    let (a0, b0) = (sim.acked, sim.cross_acked());
    sim.run_until(Duration::from_secs(30));
    let (a, b) = (sim.acked - a0, sim.cross_acked() - b0);
    let share = a as f64 / (a + b) as f64;
    assert!((0.25..0.67).contains(&share), "share {share:.2}");
    assert!(sim.bbr.shared.is_some(), "no shared window");
}

#[test]
fn a_shared_queue_is_given_back_when_the_other_flow_leaves() {
    let mut sim = sharing_a_deep_buffer();
    sim.run_until(Duration::from_secs(30));
    if let Some(cross) = &mut sim.cross {
        cross.max_window = 0.0;
        cross.cwnd = 0.0;
    }
    // Without the early ProbeRTT on a falling RTT, our loss-based window
    // held a 1.5 s queue until the next interval (over 30 s later).
    sim.run_until(Duration::from_secs(50));
    assert!(sim.bbr.shared.is_none(), "still in the shared mode");
    let queue = sim.mean_queue(45.0, 50.0);
    assert!(queue < Duration::from_millis(20), "mean queue {queue:?}");
}
