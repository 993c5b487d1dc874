//! The Tunnel: QUIC transport between a Client instance and the Server, and
//! the framing of each stream.

pub mod congestion;
pub mod framing;
pub mod transport;
