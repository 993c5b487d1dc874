//! Stream framing: each tunnel stream starts with a PROXY protocol v2
//! header. (Stub: implemented by the SNI/framing work.)

use std::net::SocketAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

pub fn encode(_h: &ProxyHeader) -> Vec<u8> {
    unimplemented!()
}
