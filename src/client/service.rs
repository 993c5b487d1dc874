//! Service selection on the Client instance: the forwarded ClientHello's
//! SNI picks a Service by exact Public hostname, else by a `*.` wildcard
//! covering it, or the sole catch-all Service takes every hostname the
//! Server routed to this Tunnel.

use std::sync::Arc;

use crate::config::ServiceConfig;
use crate::hostname::{HostnameTable, wire_lookup_key};

#[derive(Debug, Default)]
/// The Services by Public hostname (exact names, then wildcards, then
/// the catch-all).
pub struct ServiceTable {
    exact: HostnameTable<Arc<ServiceConfig>>,
    catch_all: Option<Arc<ServiceConfig>>,
    all: Vec<Arc<ServiceConfig>>,
}

impl ServiceTable {
    /// The table for `services` as configured.
    pub fn new(services: &[ServiceConfig]) -> Self {
        let mut table = Self::default();
        for s in services {
            let s = Arc::new(s.clone());
            table.all.push(s.clone());
            if s.public_hostnames.is_empty() {
                table.catch_all = Some(s);
            } else {
                for h in &s.public_hostnames {
                    table.exact.insert(h, s.clone());
                }
            }
        }
        table
    }

    /// Every Service, in config order.
    pub fn services(&self) -> &[Arc<ServiceConfig>] {
        &self.all
    }

    /// The Service for a stream whose ClientHello named `sni`.
    pub fn select(&self, sni: Option<&str>) -> Option<&Arc<ServiceConfig>> {
        if let Some(catch_all) = &self.catch_all {
            return Some(catch_all);
        }
        self.exact.lookup(wire_lookup_key(sni?).as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendAddress, TlsMode};
    use crate::hostname::PublicHostname;

    fn service(index: usize, hosts: &[&str], port: u16) -> ServiceConfig {
        ServiceConfig {
            index,
            public_hostnames: hosts
                .iter()
                .map(|h| PublicHostname::parse(h).unwrap())
                .collect(),
            backend_address: BackendAddress {
                host: "127.0.0.1".into(),
                port,
            },
            tls_mode: TlsMode::Passthrough,
            proxy_protocol: false,
        }
    }

    #[test]
    fn exact_match_is_case_and_trailing_dot_insensitive() {
        let t = ServiceTable::new(&[
            service(0, &["a.example.com"], 1),
            service(1, &["b.example.com"], 2),
        ]);
        assert_eq!(
            t.select(Some("A.Example.com."))
                .unwrap()
                .backend_address
                .port,
            1
        );
        assert_eq!(
            t.select(Some("b.example.com"))
                .unwrap()
                .backend_address
                .port,
            2
        );
        assert!(t.select(Some("c.example.com")).is_none());
        assert!(t.select(Some("sub.a.example.com")).is_none());
        assert!(t.select(None).is_none());
    }

    #[test]
    fn sole_catch_all_takes_everything() {
        let t = ServiceTable::new(&[service(0, &[], 9)]);
        assert_eq!(
            t.select(Some("anything.example"))
                .unwrap()
                .backend_address
                .port,
            9
        );
        assert_eq!(t.select(None).unwrap().backend_address.port, 9);
    }

    #[test]
    fn wildcard_service_takes_one_label_and_exact_wins() {
        let t = ServiceTable::new(&[
            service(0, &["*.example.com"], 1),
            service(1, &["api.example.com"], 2),
        ]);
        let port = |sni| t.select(Some(sni)).map(|s| s.backend_address.port);
        assert_eq!(port("www.example.com"), Some(1));
        assert_eq!(port("API.example.com."), Some(2));
        assert_eq!(port("a.b.example.com"), None);
        assert_eq!(port("example.com"), None);
    }
}
