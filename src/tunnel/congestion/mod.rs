//! Congestion control of the Tunnel's QUIC connection.
//!
//! quinn's default is Cubic, which halves its window on every loss and so
//! collapses on long, lossy paths. [`bbr`] is our model-based controller
//! (BBR as in the IETF CCWG draft, v3). `congestion-control` in `[server]`
//! and `[client]` picks one: each end chooses for what it sends (downloads
//! are sent by the Client, uploads by the Server).

pub mod bbr;

use std::sync::Arc;

use quinn::congestion::ControllerFactory;

/// `congestion-control = "bbr" | "cubic"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CongestionControl {
    /// Our BBR (`bbr::Bbr`): loss-tolerant, model-based. The default.
    #[default]
    Bbr,
    /// quinn's Cubic: loss-based, halves on loss.
    Cubic,
}

impl CongestionControl {
    /// Every accepted spelling, for error messages.
    pub(crate) const NAMES: &'static [&'static str] = &["bbr", "cubic"];

    /// The spelling in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            CongestionControl::Bbr => "bbr",
            CongestionControl::Cubic => "cubic",
        }
    }

    /// Parse a config value (exact, lowercase).
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "bbr" => Some(CongestionControl::Bbr),
            "cubic" => Some(CongestionControl::Cubic),
            _ => None,
        }
    }

    /// The quinn controller factory for this choice.
    pub(crate) fn factory(self) -> Arc<dyn ControllerFactory + Send + Sync> {
        match self {
            CongestionControl::Bbr => Arc::new(bbr::BbrConfig::default()),
            CongestionControl::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
        }
    }
}

impl std::fmt::Display for CongestionControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
