//! ACLs: an organisation's policy document, validated with errors that
//! point at the line and column, and evaluated into who may reach whom.
//!
//! ```json
//! {
//!   "groups": { "group:eng": ["alice@acme.com", "bob@acme.com"] },
//!   "acls": [
//!     { "action": "accept", "src": ["group:eng"], "dst": ["tag:db:5432", "bob@acme.com:*"] }
//!   ]
//! }
//! ```
//!
//! A selector is `*`, a user's email, `group:NAME`, `tag:NAME`, or an
//! address or CIDR inside the organisation's network; a destination adds
//! `:PORTS` (`*`, `22`, `80,443`, `8000-8099`). A rule's optional `"proto"`
//! (`"tcp"`, `"udp"`, `"icmp"`; every protocol when absent) narrows it to
//! one protocol; `icmp` takes no ports (`SELECTOR:*`). Without a policy, a user's
//! own devices reach each other and nothing else: default deny across
//! users.
//!
//! A `group:NAME` also matches every user the identity provider puts in
//! group NAME (the `groups` claim at sign-in); a policy still declares the
//! group, possibly empty (`"group:eng": []`), so a misspelt name is an
//! error rather than a rule that never matches.
//!
//! Subnet Connectors: `"routes": {"10.0.5.0/24": ["tag:connector",
//! "alice@acme.com"]}` auto-approves a route a device advertises when the
//! route lies inside a listed CIDR and the device matches one of its
//! selectors. Who may reach an approved route is up to the ACLs: a
//! destination `CIDR:PORTS` that covers the whole route (or `*:PORTS`)
//! grants it; `tag:`, user and group destinations name devices, never the
//! subnets behind them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

/// The raw document.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    acls: Vec<RawRule>,
    /// Route auto-approvers: CIDR → selectors of devices that may serve
    /// routes inside it.
    #[serde(default)]
    routes: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    action: String,
    src: Vec<String>,
    dst: Vec<String>,
    #[serde(default)]
    proto: Option<String>,
}

/// The IP protocol a rule admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    /// Every protocol (no `"proto"`).
    Any,
    Tcp,
    Udp,
    /// ICMP and ICMPv6.
    Icmp,
}

impl Proto {
    /// As the policy and the map's filter spell it (`None`: any).
    pub fn name(self) -> Option<&'static str> {
        match self {
            Proto::Any => None,
            Proto::Tcp => Some("tcp"),
            Proto::Udp => Some("udp"),
            Proto::Icmp => Some("icmp"),
        }
    }
}

/// What one device may reach on another: ports per protocol.
pub type Grants = Vec<(Proto, Ports)>;

/// An invalid policy: where and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("policy line {line}, column {column}: {message}")]
pub struct PolicyError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Who a rule is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Any,
    User(String),
    Group(String),
    Tag(String),
    Net(IpAddr, u8),
}

/// Destination ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ports {
    Any,
    Ranges(Vec<(u16, u16)>),
}

impl std::fmt::Display for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ports::Any => f.write_str("*"),
            Ports::Ranges(r) => {
                let parts: Vec<String> = r
                    .iter()
                    .map(|(a, b)| {
                        if a == b {
                            a.to_string()
                        } else {
                            format!("{a}-{b}")
                        }
                    })
                    .collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub src: Vec<Selector>,
    pub dst: Vec<(Selector, Ports)>,
    pub proto: Proto,
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    groups: BTreeMap<String, Vec<String>>,
    rules: Vec<Rule>,
    /// Route auto-approvers: (network, prefix length) and who may serve
    /// routes inside it.
    approvers: Vec<((IpAddr, u8), Vec<Selector>)>,
}

/// A route as the policy sees it: network address and prefix length.
pub type Route = (IpAddr, u8);

/// `ADDR/LEN` as a [`Route`] (None if it is not a CIDR).
pub fn parse_route(text: &str) -> Option<Route> {
    let (a, l) = text.split_once('/')?;
    let addr: IpAddr = a.parse().ok()?;
    let len: u8 = l.parse().ok()?;
    (len <= if addr.is_ipv4() { 32 } else { 128 }).then_some((addr, len))
}

/// What a selector is matched against.
pub trait Member {
    fn user(&self) -> Option<&str>;
    fn tags(&self) -> &[String];
    fn addresses(&self) -> Vec<IpAddr>;
    /// The groups the identity provider puts the device's user in (the
    /// ID token's `groups` claim); `group:NAME` matches them too.
    fn idp_groups(&self) -> &[String] {
        &[]
    }
}

/// Line and column (1-based) of the first `"needle"` in `text`.
fn locate(text: &str, needle: &str) -> (usize, usize) {
    let quoted = format!("\"{needle}\"");
    let Some(at) = text.find(&quoted) else {
        return (1, 1);
    };
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

fn err_at(text: &str, needle: &str, message: String) -> PolicyError {
    let (line, column) = locate(text, needle);
    PolicyError {
        line,
        column,
        message,
    }
}

fn parse_selector(
    text: &str,
    s: &str,
    groups: &BTreeMap<String, Vec<String>>,
) -> Result<Selector, PolicyError> {
    if s == "*" {
        return Ok(Selector::Any);
    }
    if let Some(g) = s.strip_prefix("group:") {
        if !groups.contains_key(s) {
            return Err(err_at(
                text,
                s,
                format!("unknown group {s:?}; define it under \"groups\""),
            ));
        }
        return Ok(Selector::Group(g.to_string()));
    }
    if let Some(t) = s.strip_prefix("tag:") {
        if t.is_empty() || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(err_at(
                text,
                s,
                format!("{s:?}: a tag is letters, digits and '-'"),
            ));
        }
        return Ok(Selector::Tag(t.to_string()));
    }
    if s.contains('@') {
        return Ok(Selector::User(s.to_ascii_lowercase()));
    }
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, len.parse::<u8>().ok()),
        None => (s, None),
    };
    match ip.parse::<IpAddr>() {
        Ok(ip) => {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len = match (s.contains('/'), len) {
                (false, _) => max,
                (true, Some(l)) if l <= max => l,
                _ => return Err(err_at(text, s, format!("{s:?}: bad prefix length"))),
            };
            Ok(Selector::Net(ip, len))
        }
        Err(_) => Err(err_at(
            text,
            s,
            format!(
                "{s:?} is not a selector: use \"*\", an email, \"group:NAME\", \"tag:NAME\" or an address/CIDR"
            ),
        )),
    }
}

fn parse_ports(text: &str, whole: &str, p: &str) -> Result<Ports, PolicyError> {
    if p == "*" {
        return Ok(Ports::Any);
    }
    let bad = || {
        err_at(
            text,
            whole,
            format!("{whole:?}: ports are \"*\", \"22\", \"80,443\" or \"8000-8099\""),
        )
    };
    let mut ranges = Vec::new();
    for part in p.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let (a, b) = (
            a.parse::<u16>().map_err(|_| bad())?,
            b.parse::<u16>().map_err(|_| bad())?,
        );
        if a == 0 || a > b {
            return Err(bad());
        }
        ranges.push((a, b));
    }
    Ok(Ports::Ranges(ranges))
}

impl Policy {
    /// Parse and validate a policy document.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let raw: Raw = serde_json::from_str(text).map_err(|e| PolicyError {
            line: e.line(),
            column: e.column(),
            message: e
                .to_string()
                .split(" at line")
                .next()
                .unwrap_or("")
                .to_string(),
        })?;
        for (name, members) in &raw.groups {
            if !name.starts_with("group:") || name.len() == "group:".len() {
                return Err(err_at(
                    text,
                    name,
                    format!("group names start with \"group:\", found {name:?}"),
                ));
            }
            if let Some(m) = members.iter().find(|m| !m.contains('@')) {
                return Err(err_at(
                    text,
                    m,
                    format!("group members are users' emails, found {m:?}"),
                ));
            }
        }
        let mut rules = Vec::new();
        for r in &raw.acls {
            if r.action != "accept" {
                return Err(err_at(
                    text,
                    &r.action,
                    format!(
                        "action {:?}: only \"accept\" (everything else is denied)",
                        r.action
                    ),
                ));
            }
            let proto = match r.proto.as_deref() {
                None | Some("*") => Proto::Any,
                Some("tcp") => Proto::Tcp,
                Some("udp") => Proto::Udp,
                Some("icmp") => Proto::Icmp,
                Some(other) => {
                    return Err(err_at(
                        text,
                        other,
                        format!(
                            "proto {other:?}: \"tcp\", \"udp\" or \"icmp\" (absent: every protocol)"
                        ),
                    ));
                }
            };
            let src = r
                .src
                .iter()
                .map(|s| parse_selector(text, s, &raw.groups))
                .collect::<Result<_, _>>()?;
            let mut dst = Vec::new();
            for d in &r.dst {
                let Some((sel, ports)) = d.rsplit_once(':') else {
                    return Err(err_at(
                        text,
                        d,
                        format!(
                            "{d:?}: a destination is SELECTOR:PORTS, such as \"tag:db:5432\" or \"*:*\""
                        ),
                    ));
                };
                let ports = parse_ports(text, d, ports)?;
                if proto == Proto::Icmp && ports != Ports::Any {
                    return Err(err_at(
                        text,
                        d,
                        format!("{d:?}: icmp has no ports; write the destination as SELECTOR:*"),
                    ));
                }
                let sel = parse_selector(text, sel, &raw.groups).map_err(|mut e| {
                    (e.line, e.column) = locate(text, d);
                    e
                })?;
                dst.push((sel, ports));
            }
            rules.push(Rule { src, dst, proto });
        }
        let mut approvers = Vec::new();
        for (cidr, who) in &raw.routes {
            let Some(net) = parse_route(cidr) else {
                return Err(err_at(
                    text,
                    cidr,
                    format!("routes: {cidr:?} is not a CIDR such as \"10.0.5.0/24\""),
                ));
            };
            let who = who
                .iter()
                .map(|s| parse_selector(text, s, &raw.groups))
                .collect::<Result<_, _>>()?;
            approvers.push((net, who));
        }
        let groups = raw
            .groups
            .into_iter()
            .map(|(k, v)| {
                (
                    k.trim_start_matches("group:").to_string(),
                    v.into_iter().map(|m| m.to_ascii_lowercase()).collect(),
                )
            })
            .collect();
        Ok(Self {
            groups,
            rules,
            approvers,
        })
    }

    /// Whether the `routes` section approves `device` serving `route`.
    pub fn approves_route(&self, device: &dyn Member, route: Route) -> bool {
        self.approvers.iter().any(|((net, len), who)| {
            covers(*net, *len, route) && who.iter().any(|s| self.matches(s, device))
        })
    }

    /// What `src` may reach in the subnet `route` (empty: nothing): rules
    /// whose destination is `*` or a CIDR covering the whole route.
    pub fn route_grants(&self, src: &dyn Member, route: Route) -> Grants {
        self.grants_where(src, |sel| match sel {
            Selector::Any => true,
            Selector::Net(net, len) => covers(*net, *len, route),
            _ => false,
        })
    }

    fn matches(&self, sel: &Selector, m: &dyn Member) -> bool {
        match sel {
            Selector::Any => true,
            Selector::User(u) => m.user() == Some(u.as_str()),
            Selector::Group(g) => {
                m.idp_groups().iter().any(|x| x == g)
                    || m.user().is_some_and(|u| {
                        self.groups.get(g).is_some_and(|g| g.iter().any(|x| x == u))
                    })
            }
            Selector::Tag(t) => m.tags().iter().any(|x| x == t),
            Selector::Net(net, len) => m.addresses().iter().any(|a| in_net(*a, *net, *len)),
        }
    }

    /// What `src` may reach on `dst`, per protocol (empty: nothing).
    pub fn grants(&self, src: &dyn Member, dst: &dyn Member) -> Grants {
        self.grants_where(src, |sel| self.matches(sel, dst))
    }

    /// What `src` may reach on destinations whose selector passes `dst`.
    fn grants_where(&self, src: &dyn Member, dst: impl Fn(&Selector) -> bool) -> Grants {
        let mut grants: Grants = Vec::new();
        for r in &self.rules {
            if !r.src.iter().any(|s| self.matches(s, src)) {
                continue;
            }
            for (sel, ports) in &r.dst {
                if dst(sel) {
                    match grants.iter_mut().find(|(p, _)| *p == r.proto) {
                        Some((_, have)) => have.merge(ports),
                        None => grants.push((r.proto, ports.clone())),
                    }
                }
            }
        }
        for (_, ports) in &mut grants {
            if let Ports::Ranges(r) = ports {
                r.sort();
                r.dedup();
            }
        }
        grants.sort_by_key(|(p, _)| *p);
        grants
    }

    /// The ports `src` may reach on `dst` over any protocol (None: not at
    /// all).
    #[cfg(test)]
    pub fn allowed(&self, src: &dyn Member, dst: &dyn Member) -> Option<Ports> {
        let mut all: Option<Ports> = None;
        for (_, ports) in self.grants(src, dst) {
            match all.as_mut() {
                Some(have) => have.merge(&ports),
                None => all = Some(ports),
            }
        }
        all
    }
}

impl Ports {
    /// Add `other`'s ports (sorted, without repeats).
    fn merge(&mut self, other: &Ports) {
        match (&mut *self, other) {
            (Ports::Any, _) => {}
            (_, Ports::Any) => *self = Ports::Any,
            (Ports::Ranges(have), Ports::Ranges(more)) => {
                have.extend(more.iter().copied());
                have.sort();
                have.dedup();
            }
        }
    }
}

/// Without a policy: a user's own devices reach each other on every port
/// and protocol.
pub fn default_grants(src: &dyn Member, dst: &dyn Member) -> Grants {
    default_allowed(src, dst)
        .map(|p| vec![(Proto::Any, p)])
        .unwrap_or_default()
}

/// Without a policy: a user's own devices reach each other on every port.
pub fn default_allowed(src: &dyn Member, dst: &dyn Member) -> Option<Ports> {
    match (src.user(), dst.user()) {
        (Some(a), Some(b)) if a == b => Some(Ports::Any),
        _ => None,
    }
}

/// Whether the network `net/len` holds all of `route`.
fn covers(net: IpAddr, len: u8, (addr, rlen): Route) -> bool {
    len <= rlen && in_net(addr, net, len)
}

fn in_net(a: IpAddr, net: IpAddr, len: u8) -> bool {
    match (a, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - len as u32).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - len as u32).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts that `text` is refused with a message containing `needle`;
    /// the error, for checks on where it points.
    fn refused(text: &str, needle: &str) -> PolicyError {
        let e = Policy::parse(text).unwrap_err();
        assert!(e.message.contains(needle), "{e}");
        e
    }

    struct M(Option<&'static str>, Vec<String>, IpAddr);
    impl Member for M {
        fn user(&self) -> Option<&str> {
            self.0
        }
        fn tags(&self) -> &[String] {
            &self.1
        }
        fn addresses(&self) -> Vec<IpAddr> {
            vec![self.2]
        }
    }

    fn m(user: Option<&'static str>, tags: &[&str], ip: &str) -> M {
        M(
            user,
            tags.iter().map(|t| t.to_string()).collect(),
            ip.parse().unwrap(),
        )
    }

    #[test]
    fn rules_grant_ports_by_group_tag_user_and_address() {
        let p = Policy::parse(
            r#"{
  "groups": {"group:eng": ["Alice@acme.com"]},
  "acls": [
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:db:5432", "bob@acme.com:22,80-81"]},
    {"action": "accept", "src": ["100.64.0.0/22"], "dst": ["tag:web:*"]}
  ]
}"#,
        )
        .unwrap();
        let alice = m(Some("alice@acme.com"), &[], "100.64.0.1");
        let bob = m(Some("bob@acme.com"), &[], "100.64.0.2");
        let db = m(None, &["db"], "100.64.0.3");
        let web = m(None, &["web"], "100.64.0.4");
        assert_eq!(
            p.allowed(&alice, &db),
            Some(Ports::Ranges(vec![(5432, 5432)]))
        );
        assert_eq!(p.allowed(&alice, &bob).unwrap().to_string(), "22,80-81");
        assert_eq!(p.allowed(&bob, &alice), None);
        assert_eq!(p.allowed(&db, &web), Some(Ports::Any));
        assert_eq!(p.allowed(&db, &alice), None);
        assert_eq!(default_allowed(&alice, &bob), None);
        assert_eq!(default_allowed(&alice, &alice), Some(Ports::Any));
        assert_eq!(default_allowed(&db, &db), None);
    }

    #[test]
    fn a_rule_can_name_its_protocol() {
        let p = Policy::parse(
            r#"{
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["tag:dns:53"], "proto": "udp"},
    {"action": "accept", "src": ["*"], "dst": ["tag:dns:53,853"], "proto": "tcp"},
    {"action": "accept", "src": ["*"], "dst": ["tag:dns:*"], "proto": "icmp"}
  ]
}"#,
        )
        .unwrap();
        let alice = m(Some("alice@acme.com"), &[], "100.64.0.1");
        let dns = m(None, &["dns"], "100.64.0.5");
        let grants: Vec<(Option<&str>, String)> = p
            .grants(&alice, &dns)
            .into_iter()
            .map(|(proto, ports)| (proto.name(), ports.to_string()))
            .collect();
        assert_eq!(
            grants,
            [
                (Some("tcp"), "53,853".to_string()),
                (Some("udp"), "53".to_string()),
                (Some("icmp"), "*".to_string()),
            ]
        );
        assert_eq!(p.allowed(&alice, &dns), Some(Ports::Any));
        assert!(p.grants(&dns, &alice).is_empty());

        refused(
            r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"], "proto": "sctp"}]}"#,
            "\"tcp\", \"udp\" or \"icmp\"",
        );
        refused(
            r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"], "proto": "icmp"}]}"#,
            "icmp has no ports",
        );
    }

    struct G(&'static str, Vec<String>);
    impl Member for G {
        fn user(&self) -> Option<&str> {
            Some(self.0)
        }
        fn tags(&self) -> &[String] {
            &[]
        }
        fn addresses(&self) -> Vec<IpAddr> {
            vec![]
        }
        fn idp_groups(&self) -> &[String] {
            &self.1
        }
    }

    #[test]
    fn a_declared_group_also_matches_the_idp_groups_claim() {
        let p = Policy::parse(
            r#"{"groups": {"group:ops": []}, "acls": [{"action": "accept", "src": ["group:ops"], "dst": ["*:22"]}]}"#,
        )
        .unwrap();
        let ops = G("bob@acme.com", vec!["ops".into()]);
        let eng = G("alice@acme.com", vec!["eng".into()]);
        assert_eq!(p.allowed(&ops, &eng), Some(Ports::Ranges(vec![(22, 22)])));
        assert_eq!(p.allowed(&eng, &ops), None);
    }

    #[test]
    fn routes_are_approved_by_the_routes_section_and_reached_per_acl() {
        let p = Policy::parse(
            r#"{
  "acls": [
    {"action": "accept", "src": ["alice@acme.com"], "dst": ["10.0.5.0/24:*"]},
    {"action": "accept", "src": ["bob@acme.com"], "dst": ["10.0.5.0/25:22", "tag:connector:*"]}
  ],
  "routes": {"10.0.0.0/16": ["tag:connector", "carol@acme.com"]}
}"#,
        )
        .unwrap();
        let connector = m(None, &["connector"], "100.64.0.9");
        let carol = m(Some("carol@acme.com"), &[], "100.64.0.8");
        let other = m(None, &["web"], "100.64.0.7");
        let route = parse_route("10.0.5.0/24").unwrap();
        assert!(p.approves_route(&connector, route));
        assert!(p.approves_route(&carol, route));
        assert!(!p.approves_route(&other, route), "not an approver");
        assert!(
            !p.approves_route(&connector, parse_route("10.1.0.0/24").unwrap()),
            "outside the approved CIDR"
        );
        assert!(
            !p.approves_route(&connector, parse_route("10.0.0.0/8").unwrap()),
            "wider than the approved CIDR"
        );
        let alice = m(Some("alice@acme.com"), &[], "100.64.0.1");
        let bob = m(Some("bob@acme.com"), &[], "100.64.0.2");
        assert_eq!(
            p.route_grants(&alice, route),
            vec![(Proto::Any, Ports::Any)]
        );
        // A /25 rule does not cover the /24 route; tag:connector names the
        // connector, not the subnet behind it.
        assert!(p.route_grants(&bob, route).is_empty());
        assert_eq!(p.allowed(&bob, &connector), Some(Ports::Any));
        assert!(p.route_grants(&connector, route).is_empty());
        refused(r#"{"routes": {"10.0.5.0": ["tag:c"]}}"#, "not a CIDR");
        refused(
            r#"{"routes": {"10.0.5.0/24": ["nonsense"]}}"#,
            "not a selector",
        );
    }

    #[test]
    fn errors_point_at_line_and_column() {
        let e = refused(
            "{\n  \"acls\": [\n    {\"action\": \"accept\", \"src\": [\"group:ops\"], \"dst\": [\"*:*\"]}\n  ]\n}",
            "unknown group \"group:ops\"",
        );
        assert_eq!((e.line, e.column), (3, 34), "{e}");
        refused(
            "{\n  \"acls\": [\n    {\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"tag:db\"]}\n  ]\n}",
            "ports are",
        );
        let e = refused("{\n  \"acl\": []\n}", "unknown field `acl`");
        assert_eq!(e.line, 2, "{e}");
        refused(
            r#"{"acls": [{"action": "drop", "src": [], "dst": []}]}"#,
            "only \"accept\"",
        );
        refused(
            r#"{"acls": [{"action": "accept", "src": ["nonsense"], "dst": []}]}"#,
            "not a selector",
        );
    }
}
