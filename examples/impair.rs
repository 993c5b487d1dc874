//! A userspace stand-in for `tc netem`, used by the network-namespace
//! harness (vm-tests/netns/run) on kernels without `sch_netem`.
//!
//! It bridges two Ethernet interfaces (AF_PACKET sockets, Linux only) and
//! applies to each direction separately: a constant one-way delay, random
//! loss, and a rate limit (serialisation at `rate` bit/s behind a FIFO of at
//! most `limit` packets, tail drop — netem's `rate` and `limit`). Frames
//! keep their virtio-net header (PACKET_VNET_HDR) so checksum offload
//! survives the hop; the harness sets `gso_max_segs 1` on every interface so
//! each frame is one wire packet and loss and rate apply per packet.
//!
//! Two more of netem's knobs: `--jitter-ms J` adds a uniformly random
//! 0..2J ms around the delay (`delay D J`; frames are not reordered, as
//! with netem's `rate` or a pfifo child), and `--delay2-ms D2 --period-ms P`
//! switches the one-way delay between D and D2 every P ms (what the
//! harness does with `tc qdisc change` under netem), for a path whose RTT
//! changes mid-transfer.
//!
//! ```text
//! impair A B [--delay-ms 25] [--loss 0.01] [--rate-bit 10000000] [--limit 1000]
//!            [--jitter-ms 5] [--delay2-ms 40 --period-ms 2000]
//! ```
//! Runs until killed (the harness kills it).

use std::collections::VecDeque;
use std::ffi::CString;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
struct Profile {
    delay: Duration,
    loss: f64,
    rate_bit: u64,
    limit: usize,
    jitter: Duration,
    /// The other delay and how long each delay lasts (zero: no switching).
    delay2: Duration,
    period: Duration,
}

impl Profile {
    /// The one-way delay at `at` since `start` (switching every period).
    fn delay_at(&self, start: Instant, at: Instant) -> Duration {
        if self.period.is_zero() {
            return self.delay;
        }
        let n = at.saturating_duration_since(start).as_nanos() / self.period.as_nanos();
        if n.is_multiple_of(2) {
            self.delay
        } else {
            self.delay2
        }
    }
}

fn millis(text: String) -> Duration {
    Duration::from_secs_f64(text.parse::<f64>().unwrap() / 1000.0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut names = Vec::new();
    let mut p = Profile {
        delay: Duration::ZERO,
        loss: 0.0,
        rate_bit: 0,
        limit: 1000,
        jitter: Duration::ZERO,
        delay2: Duration::ZERO,
        period: Duration::ZERO,
    };
    let mut i = 0;
    while i < args.len() {
        let value = || args.get(i + 1).expect("option needs a value").clone();
        match args[i].as_str() {
            "--delay-ms" => {
                p.delay = Duration::from_secs_f64(value().parse::<f64>().unwrap() / 1000.0);
                i += 1
            }
            "--loss" => {
                p.loss = value().parse().unwrap();
                i += 1
            }
            "--rate-bit" => {
                p.rate_bit = value().parse().unwrap();
                i += 1
            }
            "--limit" => {
                p.limit = value().parse().unwrap();
                i += 1
            }
            "--jitter-ms" => {
                p.jitter = millis(value());
                i += 1
            }
            "--delay2-ms" => {
                p.delay2 = millis(value());
                i += 1
            }
            "--period-ms" => {
                p.period = millis(value());
                i += 1
            }
            other => names.push(other.to_string()),
        }
        i += 1;
    }
    assert_eq!(names.len(), 2, "usage: impair IFACE_A IFACE_B [options]");
    let a = PacketSocket::open(&names[0]);
    let b = PacketSocket::open(&names[1]);
    eprintln!(
        "impair: bridging {} <-> {}: delay {:?} each way, loss {}, rate {} bit/s, limit {} packets, \
         jitter {:?}, delay2 {:?} every {:?}",
        names[0], names[1], p.delay, p.loss, p.rate_bit, p.limit, p.jitter, p.delay2, p.period
    );
    let t1 = direction(a, b, p, 0x9e37_79b9_7f4a_7c15);
    let t2 = direction(b, a, p, 0xd1b5_4a32_d192_ed03);
    t1.join().unwrap();
    t2.join().unwrap();
}

#[derive(Clone, Copy)]
struct PacketSocket {
    fd: i32,
}

const ETH_P_ALL: u16 = 0x0003;
const PACKET_OUTGOING: u8 = 4;
const PACKET_VNET_HDR: i32 = 15;
const PACKET_IGNORE_OUTGOING: i32 = 23;

impl PacketSocket {
    fn open(name: &str) -> Self {
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (ETH_P_ALL.to_be()) as i32);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let one: i32 = 1;
            let set = |opt: i32| {
                libc::setsockopt(
                    fd,
                    libc::SOL_PACKET,
                    opt,
                    &one as *const i32 as *const libc::c_void,
                    4,
                )
            };
            assert_eq!(set(PACKET_VNET_HDR), 0, "PACKET_VNET_HDR");
            // The modelled queue is `limit`; the socket's own buffers must
            // not drop first when this thread is scheduled late (the
            // default 208 KiB is ~90 frames, a few ms at line rate). The
            // FORCE variants need CAP_NET_ADMIN, which the harness has.
            let big: i32 = 32 << 20;
            for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    &big as *const i32 as *const libc::c_void,
                    4,
                );
            }
            // Best effort; outgoing frames are filtered below as well.
            let _ = set(PACKET_IGNORE_OUTGOING);
            let cname = CString::new(name).unwrap();
            let index = libc::if_nametoindex(cname.as_ptr());
            assert!(index > 0, "no interface {name}");
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETH_P_ALL.to_be();
            sll.sll_ifindex = index as i32;
            let r = libc::bind(
                fd,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind {name}: {}", std::io::Error::last_os_error());
            let mut mr: libc::packet_mreq = std::mem::zeroed();
            mr.mr_ifindex = index as i32;
            mr.mr_type = libc::PACKET_MR_PROMISC as u16;
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_ADD_MEMBERSHIP,
                &mr as *const libc::packet_mreq as *const libc::c_void,
                std::mem::size_of::<libc::packet_mreq>() as u32,
            );
            Self { fd }
        }
    }

    /// One incoming frame (virtio-net header included).
    fn recv(&self, buf: &mut [u8]) -> usize {
        loop {
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = unsafe {
                libc::recvfrom(
                    self.fd,
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut sll as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                panic!("recv: {e}");
            }
            if sll.sll_pkttype == PACKET_OUTGOING {
                continue;
            }
            return n as usize;
        }
    }

    fn send(&self, frame: &[u8]) {
        // Errors (interface down, buffer full) drop the frame, as a wire would.
        unsafe {
            libc::send(
                self.fd,
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
    }
}

struct Queue {
    items: Mutex<VecDeque<(Instant, Vec<u8>)>>,
    ready: Condvar,
}

/// Frames from `from` to `to` through the profile: a reader thread decides
/// loss and departure time; a writer thread sends each frame when due.
fn direction(
    from: PacketSocket,
    to: PacketSocket,
    p: Profile,
    seed: u64,
) -> std::thread::JoinHandle<()> {
    let q = Arc::new(Queue {
        items: Mutex::new(VecDeque::new()),
        ready: Condvar::new(),
    });
    let wq = q.clone();
    std::thread::spawn(move || {
        loop {
            let (due, frame) = {
                let mut items = wq.items.lock().unwrap();
                loop {
                    if let Some(front) = items.pop_front() {
                        break front;
                    }
                    items = wq.ready.wait(items).unwrap();
                }
            };
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            to.send(&frame);
        }
    });
    std::thread::spawn(move || {
        let mut rng = seed;
        let mut buf = vec![0u8; 70_000];
        // When the link finishes serialising the last accepted frame.
        let mut link_free = Instant::now();
        let start = link_free;
        // Departures stay in order (no reordering by jitter).
        let mut last_due = start;
        loop {
            let n = from.recv(&mut buf);
            let now = Instant::now();
            if p.loss > 0.0 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                if ((rng >> 11) as f64) / ((1u64 << 53) as f64) < p.loss {
                    continue;
                }
            }
            let mut items = q.items.lock().unwrap();
            if items.len() >= p.limit {
                continue; // tail drop
            }
            // 10 bytes of virtio-net header are not on the wire; the
            // Ethernet preamble and gap are ignored, like netem.
            let wire = (n.saturating_sub(10)) as u64 * 8;
            let depart = match (wire * 1_000_000_000).checked_div(p.rate_bit) {
                Some(ns) => {
                    link_free = link_free.max(now) + Duration::from_nanos(ns);
                    link_free
                }
                None => now,
            };
            let mut delay = p.delay_at(start, now);
            if !p.jitter.is_zero() {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let u = ((rng >> 11) as f64) / ((1u64 << 53) as f64);
                let j = p.jitter.as_secs_f64() * (2.0 * u - 1.0);
                delay = Duration::from_secs_f64((delay.as_secs_f64() + j).max(0.0));
            }
            let due = (depart + delay).max(last_due);
            last_due = due;
            items.push_back((due, buf[..n].to_vec()));
            drop(items);
            q.ready.notify_one();
        }
    })
}
