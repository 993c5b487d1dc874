//! Routes for the mesh interface through rtnetlink (Linux): each peer's
//! allowed addresses are routed to the TUN device, added and removed as
//! the network map changes. A few dozen lines of netlink instead of a
//! dependency or a call to `ip route`.

use std::io;
use std::net::IpAddr;

use super::filter::Net;

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const NLMSG_ERROR: u16 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;

fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// The interface index of `name`.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::other("interface name"))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i)
}

/// Add (or replace) the route for `net` through interface `index`.
pub fn add(index: u32, net: Net) -> io::Result<()> {
    request(RTM_NEWROUTE, index, net).map(|_| ())
}

/// Remove the route for `net` through interface `index`; Ok if it was
/// already gone.
pub fn delete(index: u32, net: Net) -> io::Result<()> {
    match request(RTM_DELROUTE, index, net) {
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        r => r.map(|_| ()),
    }
}

fn request(kind: u16, index: u32, net: Net) -> io::Result<()> {
    let (family, addr): (u8, Vec<u8>) = match net.addr {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    let flags: u16 = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16
        | if kind == RTM_NEWROUTE {
            (libc::NLM_F_CREATE | libc::NLM_F_REPLACE) as u16
        } else {
            0
        };
    let mut msg = Vec::with_capacity(64);
    // nlmsghdr: length (patched below), type, flags, seq, pid.
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type,
    // flags.
    msg.extend_from_slice(&[
        family,
        net.len,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_STATIC,
        RT_SCOPE_LINK,
        RTN_UNICAST,
    ]);
    msg.extend_from_slice(&0u32.to_ne_bytes());
    attr(&mut msg, RTA_DST, &addr);
    attr(&mut msg, RTA_OIF, &index.to_ne_bytes());
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());

    // SAFETY: plain socket calls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        let sent = libc::sendto(
            raw,
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        );
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 1024];
        let n = libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        ack(&buf[..n as usize])
    }
}

/// The kernel's answer: an NLMSG_ERROR with error 0 is the ACK.
fn ack(b: &[u8]) -> io::Result<()> {
    let kind = b
        .get(4..6)
        .map(|k| u16::from_ne_bytes([k[0], k[1]]))
        .ok_or_else(|| io::Error::other("short netlink answer"))?;
    if kind != NLMSG_ERROR {
        return Err(io::Error::other("unexpected netlink answer"));
    }
    let code = b
        .get(16..20)
        .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .ok_or_else(|| io::Error::other("short netlink answer"))?;
    if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-code))
    }
}
