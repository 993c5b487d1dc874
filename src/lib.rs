//! Runewarp: a self-hosted ingress tunnel.
//!
//! A public [`server`] accepts Visitor TLS on TCP, reads the SNI from the
//! ClientHello ([`tls::sni`]), picks a Tunnel by exact Public hostname and
//! forwards the still-encrypted bytes over one mutually authenticated QUIC
//! Tunnel connection ([`tunnel`]) to a [`client`] instance, which hands them
//! to a Local backend (`relay`).
//!
//! # Layout
//!
//! One binary, `runewarp`, with one subcommand per role; each role is a
//! *system* with its own top-level module:
//!
//! | System | Modules | Role subcommand |
//! |---|---|---|
//! | Tunnel | [`server`], [`client`], and the wire they share, [`tunnel`] | `runewarp server`, `runewarp client` |
//! | Sign-in gate (Runegate) | [`gate`] | `runewarp gate` |
//! | Mesh control plane (first slice) | `control` | `runewarp control` |
//! | Mesh device agent (control side; data plane next) | `node` | `runewarp node` |
//! | Mesh Relay Server | `relay_server` | `runewarp server` with `[server.relay]` |
//!
//! The mesh's two systems talk only through the messages in
//! `mesh_protocol`; nodes and the relay through `relay_protocol` (and
//! `stun`). The local socket behind `server status`/`client
//! status` is [`control_socket`].
//!
//! Systems share only the common pieces:
//!
//! - identity and names: [`identity`] (Client identity pins), [`hostname`];
//! - configuration: [`config`] (file discovery, overlays, validation; one
//!   `[section]` per system);
//! - TLS material and trust: [`tls`], `fsutil` (atomic writes, file modes);
//! - lifecycle: [`shutdown`] (signal stages), [`sync`] (poison-tolerant
//!   locks, abort-on-drop, draining), [`notify`], [`readiness`], `fdlimit`;
//! - observability: [`logging`], [`metrics`];
//! - byte relaying: `relay`.
//!
//! The rule: a system uses the common pieces and its own modules, never
//! another system's internals; what two systems need becomes a common
//! piece first. Command-line parsing lives in [`cli`], the dispatch of
//! roles in [`run`], the one-shot subcommands in [`commands`]; the library
//! below them never imports `cli`. [`demo`] composes the Tunnel's Server
//! and Client in one process.

#![warn(missing_docs)]

pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub(crate) mod control;
pub mod control_socket;
pub mod demo;
pub(crate) mod fdlimit;
pub(crate) mod fsutil;
pub(crate) mod gate;
pub mod hostname;
pub mod identity;
pub mod logging;
pub mod man;
pub(crate) mod mesh_protocol;
pub mod metrics;
pub(crate) mod node;
pub mod notify;
pub mod readiness;
pub(crate) mod relay;
pub(crate) mod relay_protocol;
pub(crate) mod relay_server;
pub mod run;
pub mod server;
pub mod shutdown;
pub(crate) mod stun;
pub mod sync;
pub mod tls;
pub mod tunnel;
