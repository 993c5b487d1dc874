//! Loopback ports that were free a moment ago, for the configs of tests and
//! the bench that start `runewarp` processes. Standard library only, so the
//! bench can include this file alone (`#[path]`).
#![allow(dead_code)]

use std::net::{TcpListener, UdpSocket};

/// A TCP port on 127.0.0.1.
pub fn free_tcp() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A UDP port on 127.0.0.1.
pub fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A port free for both UDP and TCP on 127.0.0.1.
pub fn free_udp_tcp() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
