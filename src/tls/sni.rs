//! Incremental, allocation-bounded parsing of a Visitor's TLS ClientHello:
//! the SNI host_name and the ALPN protocol list. (Stub: implemented by the
//! SNI/framing work.)

use std::time::Duration;

/// At most this many bytes of ClientHello are buffered.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;
/// The whole ClientHello must arrive within this time.
pub const CLIENT_HELLO_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHelloInfo {
    /// The first host_name entry of server_name, as sent (not normalised).
    pub server_name: Option<String>,
    /// ALPN protocol names, in the Visitor's order.
    pub alpn: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed.
    Incomplete,
    Complete(ClientHelloInfo),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error("not TLS")]
    NotTls,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
}

pub fn parse_client_hello(_buf: &[u8]) -> Result<Parse, SniError> {
    unimplemented!()
}
