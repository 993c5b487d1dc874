//! Runewarp: a self-hosted ingress tunnel.
//!
//! A public [`server`] accepts Visitor TLS on TCP, reads the SNI from the
//! ClientHello ([`tls::sni`]), picks a Tunnel by exact Public hostname and
//! forwards the still-encrypted bytes over one mutually authenticated QUIC
//! Tunnel connection ([`tunnel`]) to a [`client`] instance, which hands them
//! to a Local backend ([`proxy`]).

pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod control_socket;
pub mod demo;
pub mod fdlimit;
pub mod fsutil;
pub mod gate;
pub mod hostname;
pub mod logging;
pub mod man;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod proxy;
pub mod readiness;
pub mod run;
pub mod server;
pub mod shutdown;
pub mod tls;
pub mod tunnel;
