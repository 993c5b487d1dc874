//! Loopback ports that were free a moment ago, for the configs of tests and
//! the bench that start `runewarp` processes. Standard library only, so the
//! bench can include this file alone (`#[path]`).
//!
//! The ports come from below the kernel's ephemeral range (32768 and up by
//! default), walked from a start that differs per process: a port handed
//! out here is never the one another test's `bind(":0")` or outgoing
//! connection gets while the process it was meant for is still starting,
//! which made "free a moment ago" race under parallel tests.
#![allow(dead_code)]

use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

const FIRST: u32 = 12_000;
const SPAN: u32 = 20_000;

/// The next candidate port, walking the range from a per-process start.
fn candidate() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let seed = (std::process::id() as u64)
        .wrapping_mul(2_654_435_761)
        .wrapping_add(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as u64)
                .unwrap_or(0),
        );
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (seed % SPAN as u64) as u32,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (FIRST + n % SPAN) as u16
}

/// A port `free` says is free on 127.0.0.1.
fn find(free: impl Fn(u16) -> bool) -> u16 {
    for _ in 0..SPAN {
        let port = candidate();
        if free(port) {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + SPAN);
}

/// A TCP port on 127.0.0.1.
pub fn free_tcp() -> u16 {
    find(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// A UDP port on 127.0.0.1.
pub fn free_udp() -> u16 {
    find(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok())
}

/// A port free for both UDP and TCP on 127.0.0.1.
pub fn free_udp_tcp() -> u16 {
    find(|p| {
        UdpSocket::bind(("127.0.0.1", p)).is_ok() && TcpListener::bind(("127.0.0.1", p)).is_ok()
    })
}
