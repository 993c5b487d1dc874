//! The network map: what the control server tells one device about its
//! network — itself, the peers its ACLs let it talk to (or that may talk
//! to it), and the packet filter for traffic arriving at it. A device never
//! learns of a peer in another organisation or one the policy keeps apart.
//!
//! Subnet Connectors: a device's advertised routes that an admin or the
//! policy's `routes` section approved (and no admin revoked) go into its
//! own map's `routes`, into the `allowed_ips` it has in the maps of the
//! peers the ACLs let reach them, and into its filter as rules with
//! `destinations`.

use std::collections::HashMap;
use std::net::IpAddr;

use super::policy::{self, Policy};
use super::store::{Device, RouteRow, Store, StoreError};
use crate::mesh_protocol::{FilterRule, NetworkMap, Node, Peer};

impl policy::Member for Device {
    fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }
    fn tags(&self) -> &[String] {
        &self.tags
    }
    fn addresses(&self) -> Vec<IpAddr> {
        vec![IpAddr::V4(self.ipv4), IpAddr::V6(self.ipv6)]
    }
}

/// A device with its user's IdP groups, as the policy sees it.
struct WithGroups<'a> {
    device: &'a Device,
    groups: &'a [String],
}

impl policy::Member for WithGroups<'_> {
    fn user(&self) -> Option<&str> {
        self.device.user.as_deref()
    }
    fn tags(&self) -> &[String] {
        &self.device.tags
    }
    fn addresses(&self) -> Vec<IpAddr> {
        policy::Member::addresses(self.device)
    }
    fn idp_groups(&self) -> &[String] {
        self.groups
    }
}

fn addresses(d: &Device) -> Vec<String> {
    vec![format!("{}/32", d.ipv4), format!("{}/128", d.ipv6)]
}

/// One organisation as of one serial: what every map of its devices is
/// computed from, loaded once per change and shared by all its streams.
#[derive(Debug)]
pub struct OrgSnapshot {
    /// The change serial it was read at.
    pub serial: u64,
    devices: Vec<Device>,
    policy_text: Option<String>,
    policy: Option<Policy>,
    /// Signed-in users' IdP groups, by email.
    groups: HashMap<String, Vec<String>>,
    /// Reported endpoints by device id.
    endpoints: std::collections::HashMap<i64, Vec<String>>,
    /// Advertised routes and admins' decisions by device id.
    routes: HashMap<i64, Vec<RouteRow>>,
}

impl OrgSnapshot {
    /// Read organisation `org_id` from `store`.
    ///
    /// The serial is read first: the reads are separate statements, and a
    /// change committed (by another replica or the admin CLI) between them
    /// is then held under an older serial, so the next change poll loads
    /// again. Read last, it could label rows from before that change with
    /// its serial, and [`super::api`]'s cache would keep them as current
    /// until some later change: the organisation's devices would miss it.
    pub fn load(store: &Store, org_id: i64) -> Result<Self, StoreError> {
        let serial = store.serial()?;
        let policy_text = store.policy(org_id)?;
        // A device whose login expired is out of every map, as if revoked.
        let expired = store.expired_devices(org_id)?;
        let mut devices = store.devices(Some(org_id))?;
        for d in &mut devices {
            if expired.contains(&d.id) {
                d.revoked = true;
            }
        }
        Ok(Self {
            serial,
            devices,
            groups: store.user_groups(org_id)?,
            // Policies are validated before they are stored.
            policy: policy_text.as_deref().and_then(|t| Policy::parse(t).ok()),
            policy_text,
            endpoints: store.endpoints(org_id)?,
            routes: store.routes(Some(org_id))?,
        })
    }

    /// Same devices and policy: every map computed from either is the same.
    pub fn same_content(&self, other: &OrgSnapshot) -> bool {
        self.devices == other.devices
            && self.policy_text == other.policy_text
            && self.groups == other.groups
            && self.endpoints == other.endpoints
            && self.routes == other.routes
    }
}

/// The map for device `id`, or None if it is unknown or revoked.
#[cfg(test)]
pub fn compute(store: &Store, id: i64) -> Result<Option<NetworkMap>, StoreError> {
    let Some(me) = store.device(id)? else {
        return Ok(None);
    };
    Ok(compute_from(&OrgSnapshot::load(store, me.org_id)?, id))
}

/// The map for device `id` from its organisation's snapshot.
pub fn compute_from<'a>(snapshot: &'a OrgSnapshot, id: i64) -> Option<NetworkMap> {
    let serial = snapshot.serial;
    let me = snapshot.devices.iter().find(|d| d.id == id)?;
    if me.revoked {
        return None;
    }
    let policy = &snapshot.policy;
    let member = |d: &'a Device| -> WithGroups<'a> {
        let groups = d
            .user
            .as_ref()
            .and_then(|u| snapshot.groups.get(u))
            .map_or(&[][..], Vec::as_slice);
        WithGroups { device: d, groups }
    };
    let allowed = |src: &'a Device, dst: &'a Device| -> policy::Grants {
        let (src, dst) = (member(src), member(dst));
        match policy {
            Some(p) => p.grants(&src, &dst),
            None => policy::default_grants(&src, &dst),
        }
    };
    // The routes a device serves: advertised, not revoked by an admin,
    // approved by an admin or by the policy's `routes` section.
    let approved = |d: &'a Device| -> Vec<(String, policy::Route)> {
        let rows = snapshot.routes.get(&d.id).map_or(&[][..], Vec::as_slice);
        rows.iter()
            .filter(|r| r.advertised && r.decision != "revoked")
            .filter_map(|r| {
                let route = policy::parse_route(&r.route)?;
                let ok = r.decision == "approved"
                    || policy
                        .as_ref()
                        .is_some_and(|p| p.approves_route(&member(d), route));
                ok.then(|| (r.route.clone(), route))
            })
            .collect()
    };
    // What `src` may reach in `connector`'s subnet `route`; without a
    // policy, what it may reach on the connector itself.
    let reaches = |src: &'a Device, connector: &'a Device, route| -> policy::Grants {
        match policy {
            Some(p) => p.route_grants(&member(src), route),
            None => policy::default_grants(&member(src), &member(connector)),
        }
    };
    let my_routes = approved(me);
    let others = snapshot
        .devices
        .iter()
        .filter(|d| !d.revoked && d.id != me.id);
    let mut peers = Vec::new();
    let mut filter: Vec<FilterRule> = Vec::new();
    for d in others {
        let inbound = allowed(d, me);
        let outbound = allowed(me, d);
        let their_routes: Vec<String> = approved(d)
            .into_iter()
            .filter(|(_, r)| !reaches(me, d, *r).is_empty())
            .map(|(text, _)| text)
            .collect();
        let into_mine: Vec<(&String, policy::Grants)> = my_routes
            .iter()
            .map(|(text, r)| (text, reaches(d, me, *r)))
            .filter(|(_, g)| !g.is_empty())
            .collect();
        if inbound.is_empty()
            && outbound.is_empty()
            && their_routes.is_empty()
            && into_mine.is_empty()
        {
            continue;
        }
        let mut allowed_ips = addresses(d);
        allowed_ips.extend(their_routes);
        peers.push(Peer {
            id: d.id,
            hostname: d.hostname.clone(),
            public_key: d.public_key.clone(),
            allowed_ips,
            endpoints: snapshot.endpoints.get(&d.id).cloned().unwrap_or_default(),
            user: d.user.clone(),
            tags: d.tags.clone(),
        });
        for (proto, ports) in inbound {
            add_rule(&mut filter, d, proto, &ports, &[]);
        }
        for (route, grants) in into_mine {
            for (proto, ports) in grants {
                add_rule(&mut filter, d, proto, &ports, std::slice::from_ref(route));
            }
        }
    }
    Some(NetworkMap {
        serial,
        organisation: me.organisation.clone(),
        node: Node {
            id: me.id,
            hostname: me.hostname.clone(),
            public_key: me.public_key.clone(),
            addresses: addresses(me),
            user: me.user.clone(),
            tags: me.tags.clone(),
            routes: my_routes.into_iter().map(|(text, _)| text).collect(),
        },
        peers,
        filter,
        relays: Vec::new(),
    })
}

/// Admit `d`'s addresses to `destinations` (none: this device) on
/// `ports` of `proto`, in the rule for those if there is one.
fn add_rule(
    filter: &mut Vec<FilterRule>,
    d: &Device,
    proto: policy::Proto,
    ports: &policy::Ports,
    destinations: &[String],
) {
    let (ports, proto) = (ports.to_string(), proto.name().map(str::to_string));
    match filter
        .iter_mut()
        .find(|r| r.ports == ports && r.proto == proto && r.destinations == destinations)
    {
        Some(r) => r.sources.extend(addresses(d)),
        None => filter.push(FilterRule {
            sources: addresses(d),
            ports,
            proto,
            destinations: destinations.to_vec(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::store::SetupKeySpec;
    use super::*;

    /// A new SQLite store in a temporary dir (kept while the dir lives).
    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        (dir, s)
    }

    fn enrol(s: &mut Store, org: &str, user: Option<&str>, tags: &[&str], pk: &str) -> i64 {
        let k = s
            .create_setup_key(&SetupKeySpec {
                organisation: org.into(),
                user: user.map(Into::into),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                reusable: false,
                ttl_s: 60,
            })
            .unwrap();
        s.register(&k.key, pk, "h").unwrap().unwrap().0.id
    }

    /// Enrolments a second connection makes while snapshots are loaded.
    const RACING_ENROLMENTS: usize = 200;

    /// While another connection (another replica, the admin CLI) enrols
    /// devices, every snapshot holds each device enrolled by its serial:
    /// labelled newer than its rows, it would pass for current in the
    /// server's cache and the organisation's devices would miss the
    /// enrolment until some later change.
    fn snapshots_hold_what_their_serial_says(open: impl Fn() -> Store) {
        use std::sync::atomic::{AtomicBool, Ordering};
        let mut writer = open();
        let key = writer
            .create_setup_key(&SetupKeySpec {
                organisation: "acme.com".into(),
                user: None,
                tags: vec![],
                reusable: true,
                ttl_s: 60,
            })
            .unwrap()
            .key;
        // Each enrolment moves the serial by one from here.
        let base = writer.serial().unwrap();
        let (first, _) = writer.register(&key, "pk-0", "d").unwrap().unwrap();
        let reader = open();
        let done = AtomicBool::new(false);
        let loads = std::thread::scope(|scope| {
            scope.spawn(|| {
                for i in 1..RACING_ENROLMENTS {
                    writer
                        .register(&key, &format!("pk-{i}"), "d")
                        .unwrap()
                        .unwrap();
                }
                done.store(true, Ordering::Release);
            });
            let mut loads = 0;
            loop {
                let finished = done.load(Ordering::Acquire);
                let s = OrgSnapshot::load(&reader, first.org_id).unwrap();
                let enrolled = (s.serial - base) as usize;
                assert!(
                    s.devices.len() >= enrolled,
                    "the snapshot at serial {} holds {} of the {enrolled} devices enrolled by then",
                    s.serial,
                    s.devices.len()
                );
                loads += 1;
                if finished {
                    return loads;
                }
            }
        });
        let last = OrgSnapshot::load(&reader, first.org_id).unwrap();
        assert_eq!(last.devices.len(), RACING_ENROLMENTS, "after {loads} loads");
    }

    #[test]
    fn sqlite_snapshots_hold_what_their_serial_says() {
        let dir = tempfile::tempdir().unwrap();
        snapshots_hold_what_their_serial_says(|| Store::open(dir.path()).unwrap());
    }

    /// The same with two replicas' connections to one PostgreSQL database.
    #[test]
    fn postgres_snapshots_hold_what_their_serial_says() {
        use super::super::store::test_postgres;
        if !test_postgres::opted_in("postgres snapshot test") {
            return;
        }
        let pg = test_postgres::Postgres::start();
        let url = super::super::config::PostgresUrl::parse(&pg.create_db("snapshots")).unwrap();
        let database = super::super::config::Database::Postgres(url);
        snapshots_hold_what_their_serial_says(|| {
            Store::connect(&database, std::path::Path::new("/nonexistent")).unwrap()
        });
    }

    #[test]
    fn peers_follow_the_org_and_the_policy() {
        let (_dir, mut s) = store();
        let a1 = enrol(&mut s, "acme.com", Some("alice@acme.com"), &[], "a1");
        let a2 = enrol(&mut s, "acme.com", Some("alice@acme.com"), &[], "a2");
        let b = enrol(&mut s, "acme.com", Some("bob@acme.com"), &[], "b");
        let db = enrol(&mut s, "acme.com", None, &["db"], "db");
        let g = enrol(&mut s, "globex.com", Some("alice@acme.com"), &[], "g");
        let peers = |s: &Store, id| -> Vec<String> {
            compute(s, id)
                .unwrap()
                .unwrap()
                .peers
                .into_iter()
                .map(|p| p.public_key)
                .collect()
        };
        // Default: a user's own devices only.
        assert_eq!(peers(&s, a1), ["a2"]);
        assert!(peers(&s, b).is_empty());
        assert!(peers(&s, g).is_empty(), "never another organisation");
        s.set_policy(
            "acme.com",
            r#"{"acls": [{"action": "accept", "src": ["alice@acme.com"], "dst": ["tag:db:5432"]}]}"#,
        )
        .unwrap();
        assert_eq!(peers(&s, a1), ["db"]);
        let m = compute(&s, db).unwrap().unwrap();
        assert_eq!(m.peers.len(), 2);
        assert_eq!(m.filter.len(), 1);
        assert_eq!(m.filter[0].ports, "5432");
        assert_eq!(m.filter[0].sources.len(), 4);
        assert!(peers(&s, b).is_empty());
        s.set_endpoints(a1, &["10.0.0.1:41641".to_string()])
            .unwrap();
        let m = compute(&s, db).unwrap().unwrap();
        let p = m.peers.iter().find(|p| p.public_key == "a1").unwrap();
        assert_eq!(p.endpoints, ["10.0.0.1:41641"]);
        s.revoke_device(a2).unwrap();
        assert_eq!(compute(&s, db).unwrap().unwrap().peers.len(), 1);
        assert!(compute(&s, a2).unwrap().is_none());
    }

    #[test]
    fn approved_routes_reach_only_the_peers_the_acls_allow() {
        let (_dir, mut s) = store();
        let alice = enrol(&mut s, "acme.com", Some("alice@acme.com"), &[], "alice");
        let bob = enrol(&mut s, "acme.com", Some("bob@acme.com"), &[], "bob");
        let conn = enrol(&mut s, "acme.com", None, &["connector"], "conn");
        let route = "10.0.5.0/24".to_string();
        s.set_routes(conn, std::slice::from_ref(&route)).unwrap();
        s.set_policy(
            "acme.com",
            r#"{"acls": [{"action": "accept", "src": ["alice@acme.com"], "dst": ["10.0.5.0/24:22,80"], "proto": "tcp"}]}"#,
        )
        .unwrap();
        let allowed_ips = |s: &Store, id, of: &str| -> Option<Vec<String>> {
            let m = compute(s, id).unwrap().unwrap();
            m.peers
                .into_iter()
                .find(|p| p.public_key == of)
                .map(|p| p.allowed_ips)
        };
        // Advertised but not approved: nobody sees it.
        assert_eq!(allowed_ips(&s, alice, "conn"), None);
        assert!(compute(&s, conn).unwrap().unwrap().node.routes.is_empty());
        // The policy's routes section approves it.
        s.set_policy(
            "acme.com",
            r#"{"acls": [{"action": "accept", "src": ["alice@acme.com"], "dst": ["10.0.5.0/24:22,80"], "proto": "tcp"}],
                "routes": {"10.0.0.0/8": ["tag:connector"]}}"#,
        )
        .unwrap();
        let ips = allowed_ips(&s, alice, "conn").unwrap();
        assert!(ips.contains(&route), "{ips:?}");
        assert_eq!(allowed_ips(&s, bob, "conn"), None, "bob is not allowed");
        let m = compute(&s, conn).unwrap().unwrap();
        assert_eq!(m.node.routes, [route.as_str()]);
        assert!(m.peers.iter().any(|p| p.public_key == "alice"));
        assert!(!m.peers.iter().any(|p| p.public_key == "bob"));
        assert_eq!(m.filter.len(), 1);
        assert_eq!(m.filter[0].destinations, [route.as_str()]);
        assert_eq!(m.filter[0].ports, "22,80");
        assert_eq!(m.filter[0].proto.as_deref(), Some("tcp"));
        // An admin's revocation beats the policy; approval brings it back.
        s.decide_route(conn, &route, "revoked").unwrap();
        assert_eq!(allowed_ips(&s, alice, "conn"), None);
        assert!(compute(&s, conn).unwrap().unwrap().filter.is_empty());
        s.decide_route(conn, &route, "approved").unwrap();
        assert!(allowed_ips(&s, alice, "conn").unwrap().contains(&route));
        // No longer advertised: gone whatever the decision.
        s.set_routes(conn, &[]).unwrap();
        assert_eq!(allowed_ips(&s, alice, "conn"), None);
    }
}
