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
//! | Mesh control plane (planned) | `control` | one subcommand |
//! | Mesh data plane (planned) | `node` | one subcommand |
//!
//! (Today [`control`] holds the local control socket behind `status`; it
//! will be renamed when the mesh control plane takes the name.)
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
pub mod control;
pub mod demo;
pub(crate) mod fdlimit;
pub(crate) mod fsutil;
// `gate` adopts `missing_docs` with its current rework.
#[allow(missing_docs)]
pub mod gate;
pub mod hostname;
pub mod identity;
pub mod logging;
pub mod man;
pub mod metrics;
pub mod notify;
pub mod readiness;
pub(crate) mod relay;
pub mod run;
pub mod server;
pub mod shutdown;
pub mod sync;
pub mod tls;
pub mod tunnel;
