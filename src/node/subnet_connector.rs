//! The Subnet Connector (`node up --advertise-routes CIDR[,CIDR...]`): a
//! node that forwards mesh traffic into subnets where no agent runs.
//!
//! - The routes are validated here (canonical CIDRs, no default route)
//!   and reported to the control server (`POST /v1/routes`), again every
//!   minute so a restored database learns them back. Peers get them in
//!   their maps once the policy's `routes` section or an admin approves
//!   them, and only the peers the ACLs let reach them.
//! - The data plane's filter admits packets for the approved routes from
//!   the peers the map's rules name (rules with `destinations`); they go
//!   to the TUN device and the kernel forwards them.
//! - This module turns forwarding on (`net.ipv4.ip_forward`, and IPv6's
//!   for IPv6 routes) and adds an nftables table that masquerades what
//!   arrives on the TUN device for the routes, so subnet hosts answer the
//!   connector, which hands the answers back to the peer. The table is
//!   deleted and the forwarding settings restored when the connector
//!   stops.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Node, NodeError, post_json};
use crate::mesh_protocol::{RoutesRequest, check_route};
use crate::shutdown::Shutdown;

/// How often the routes are reported again.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// `--advertise-routes`: comma-separated CIDRs, each checked.
pub fn parse_routes(text: &str) -> Result<Vec<String>, NodeError> {
    let mut routes = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        check_route(part).map_err(|e| NodeError::Usage(format!("--advertise-routes: {e}")))?;
        if !routes.iter().any(|r| r == part) {
            routes.push(part.to_string());
        }
    }
    if routes.is_empty() {
        return Err(NodeError::Usage(
            "--advertise-routes: no route given; expected CIDRs such as 10.0.5.0/24".into(),
        ));
    }
    if routes.len() > crate::mesh_protocol::MAX_ROUTES {
        return Err(NodeError::Usage(format!(
            "--advertise-routes: at most {} routes",
            crate::mesh_protocol::MAX_ROUTES
        )));
    }
    Ok(routes)
}

/// The forwarding and masquerading this connector set up; undone on drop.
pub struct Connector {
    routes: Vec<String>,
    table: String,
    /// (sysctl path, value before) for each setting changed.
    restore: Vec<(&'static str, String)>,
}

const IPV4_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const IPV6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// The nftables script that (re)creates `table` masquerading what
/// arrives on `interface` for `routes`.
fn nft_script(table: &str, interface: &str, routes: &[String]) -> String {
    let mut rules = String::new();
    for (family, v6) in [("ip", false), ("ip6", true)] {
        let set: Vec<&str> = routes
            .iter()
            .filter(|r| r.contains(':') == v6)
            .map(String::as_str)
            .collect();
        if !set.is_empty() {
            rules += &format!(
                "    iifname \"{interface}\" {family} daddr {{ {} }} masquerade\n",
                set.join(", ")
            );
        }
    }
    format!(
        "table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n{rules}  }}\n}}\n"
    )
}

fn run_nft(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                "the `nft` command (nftables) is not installed; the Subnet Connector needs it to masquerade into the subnet".to_string()
            }
            _ => format!("running nft: {e}"),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("running nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether this process holds CAP_NET_ADMIN (bit 12 of `CapEff` in
/// /proc/self/status): root has it, and so does a systemd unit granted
/// it as an ambient capability.
fn has_net_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(effective_caps)
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

/// The `CapEff` mask of a /proc/PID/status text.
fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

impl Connector {
    /// Turn forwarding on and masquerade traffic from the TUN device
    /// `interface` into `routes`. Fails, naming what is missing, when not
    /// root or without nftables.
    pub fn setup(interface: &str, routes: Vec<String>) -> Result<Connector, NodeError> {
        if !has_net_admin() {
            return Err(NodeError::Dataplane(
                "--advertise-routes needs root or CAP_NET_ADMIN: the Subnet Connector turns on IP forwarding (net.ipv4.ip_forward) and adds nftables masquerade rules".into(),
            ));
        }
        let name: String = interface
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let mut c = Connector {
            table: format!("runewarp_{name}"),
            routes,
            restore: Vec::new(),
        };
        run_nft(&nft_script(&c.table, interface, &c.routes))
            .map_err(|e| NodeError::Dataplane(format!("subnet connector: {e}")))?;
        let v6 = c.routes.iter().any(|r| r.contains(':'));
        let v4 = c.routes.iter().any(|r| !r.contains(':'));
        for (path, wanted) in [(IPV4_FORWARD, v4), (IPV6_FORWARD, v6)] {
            if !wanted {
                continue;
            }
            let before = std::fs::read_to_string(path)
                .map_err(|e| NodeError::Dataplane(format!("subnet connector: {path}: {e}")))?;
            if before.trim() != "1" {
                std::fs::write(path, "1").map_err(|e| {
                    NodeError::Dataplane(format!(
                        "subnet connector: turning on forwarding ({path}): {e}"
                    ))
                })?;
                c.restore.push((path, before.trim().to_string()));
            }
        }
        tracing::info!(event = "subnet_connector_started", interface, routes = %c.routes.join(","), table = %c.table);
        Ok(c)
    }

    /// Report the routes to the control server until `shutdown`, and log
    /// each change of what it approved.
    pub fn spawn(&self, node: &Node, mut shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
        let (url, tls, token) = (
            node.url.clone(),
            node.tls.clone(),
            node.enrolment.token.clone(),
        );
        let request = RoutesRequest {
            routes: self.routes.clone(),
        };
        let mut maps = node.maps.subscribe();
        tokio::spawn(async move {
            let mut wait = Duration::from_secs(1);
            let mut next = tokio::time::Instant::now();
            let mut approved: Option<Vec<String>> = None;
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    changed = maps.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let now = maps.borrow_and_update().as_ref().map(|m| m.node.routes.clone());
                        if let Some(now) = now && approved.as_ref() != Some(&now) {
                            tracing::info!(event = "subnet_routes_approved", count = now.len(), routes = %now.join(","));
                            approved = Some(now);
                        }
                    }
                    _ = tokio::time::sleep_until(next) => {
                        match post_json(&url, tls.clone(), "/v1/routes", Some(&token), &request, "route report").await {
                            Ok(_) => {
                                tracing::info!(event = "routes_reported", count = request.routes.len());
                                wait = REPORT_EVERY;
                            }
                            Err(e) => {
                                tracing::warn!(event = "routes_report_failed", error = %e, retry_in_ms = wait.as_millis() as u64);
                                wait = (wait * 2).min(REPORT_EVERY);
                            }
                        }
                        next = tokio::time::Instant::now() + wait;
                    }
                }
            }
        })
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        if let Err(e) = run_nft(&format!("delete table inet {}\n", self.table)) {
            tracing::warn!(event = "subnet_connector_cleanup_failed", table = %self.table, error = %e);
        }
        for (path, before) in &self.restore {
            if let Err(e) = std::fs::write(path, before) {
                tracing::warn!(event = "subnet_connector_cleanup_failed", path, error = %e);
            }
        }
        tracing::info!(event = "subnet_connector_stopped", table = %self.table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_capability_mask_is_read_from_proc_status() {
        let root = "Name:\trunewarp\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(root), Some(0x1ff_ffff_ffff));
        let unit = "CapEff:\t0000000000001000\nCapBnd:\t0000000000001000\n";
        assert!(effective_caps(unit).is_some_and(|c| c & (1 << 12) != 0));
        assert_eq!(effective_caps("CapEff:\tnothex\n"), None);
        assert_eq!(effective_caps("Name:\tx\n"), None);
    }

    #[test]
    fn routes_are_validated_at_the_flag() {
        assert_eq!(
            parse_routes("10.0.5.0/24, 10.0.6.0/24,10.0.5.0/24").unwrap(),
            ["10.0.5.0/24", "10.0.6.0/24"]
        );
        let e = parse_routes("0.0.0.0/0").unwrap_err().to_string();
        assert!(
            e.contains("--advertise-routes") && e.contains("default routes"),
            "{e}"
        );
        let e = parse_routes("10.0.5.1/24").unwrap_err().to_string();
        assert!(e.contains("host bits"), "{e}");
        assert!(parse_routes(" , ").is_err());
    }

    #[test]
    fn the_nft_script_replaces_the_table_and_masquerades_per_family() {
        let s = nft_script(
            "runewarp_rw0",
            "rw0",
            &[
                "10.0.5.0/24".into(),
                "fd00:5::/64".into(),
                "10.0.6.0/24".into(),
            ],
        );
        assert!(s.starts_with("table inet runewarp_rw0\ndelete table inet runewarp_rw0\n"));
        assert!(s.contains("iifname \"rw0\" ip daddr { 10.0.5.0/24, 10.0.6.0/24 } masquerade"));
        assert!(s.contains("iifname \"rw0\" ip6 daddr { fd00:5::/64 } masquerade"));
    }
}
