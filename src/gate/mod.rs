//! Runegate: email sign-in in front of private web apps.
//!
//! A Visitor without a session gets a sign-in page; an allowed address
//! receives a single-use link and a 6-digit code by mail; a valid link or
//! code yields a server-side session, after which requests are
//! reverse-proxied to the app. See docs/gate.md.
//!
//! This module holds one file per concept; [`config`] is the config seam's
//! output.

pub mod config;
pub mod mail;
pub mod pages;
pub mod proxy;
pub mod ratelimit;
pub mod server;
pub mod sessions;
pub mod tokens;

pub use server::{run, start};

/// A header map of `(lowercase name, value)` pairs, for tests.
#[cfg(test)]
pub(crate) fn test_headers(pairs: &[(&'static str, &'static str)]) -> hyper::HeaderMap {
    use hyper::header::{HeaderName, HeaderValue};
    pairs
        .iter()
        .map(|&(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
        .collect()
}
