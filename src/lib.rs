//! Runewarp: a self-hosted ingress tunnel.
//!
//! A public [`server`] accepts Visitor TLS on TCP, reads the SNI from the
//! ClientHello ([`tls::sni`]), picks a Tunnel by exact Public hostname and
//! forwards the still-encrypted bytes over one mutually authenticated QUIC
//! Tunnel connection ([`tunnel`]) to a [`client`] instance, which hands them
//! to a Local backend ([`relay`]).

pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod control;
pub mod demo;
pub mod fdlimit;
pub mod fsutil;
pub mod gate;
pub mod hostname;
pub mod identity;
pub mod logging;
pub mod man;
pub mod metrics;
pub mod notify;
pub mod readiness;
pub mod relay;
pub mod run;
pub mod server;
pub mod shutdown;
pub mod sync;
pub mod tls;
pub mod tunnel;
