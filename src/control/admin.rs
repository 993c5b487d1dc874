//! The operator's commands (`runewarp control setup-key|devices|policy|users|routes`):
//! they open the same database as the running server (SQLite or
//! PostgreSQL), whose change serial then carries each change to the
//! connected devices of every replica. Who may run them is
//! whoever may read the state dir (0700).

use super::config::ControlConfig;
use super::netmap::{OrgSnapshot, compute_from};
use super::policy::Policy;
use super::store::{SetupKeySpec, Store, StoreError};
use crate::cli::{ControlCommand, DevicesCommand, PolicyCommand, RoutesCommand, SetupKeyCommand};

/// An admin command's failure: what to print.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Bad arguments or input (exit status 2).
    #[error("{0}")]
    Usage(String),
}

/// Carry out `cmd`; returns what to print on stdout.
pub fn run(config: &ControlConfig, cmd: &ControlCommand) -> Result<String, AdminError> {
    let mut store = Store::connect(&config.database, &config.state_dir)?;
    match cmd {
        ControlCommand::SetupKey(SetupKeyCommand::Create {
            user,
            org,
            tags,
            reusable,
            expires,
        }) => {
            let ttl = crate::config::parse_duration(expires)
                .map_err(|e| AdminError::Usage(format!("--expires {expires:?}: {e}")))?;
            for t in tags {
                if t.is_empty() || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                    return Err(AdminError::Usage(format!(
                        "--tag {t:?}: a tag is letters, digits and '-'"
                    )));
                }
            }
            let (organisation, user) = match (user, org) {
                (Some(u), _) => {
                    let Some(o) = config.organisation_of(u) else {
                        return Err(AdminError::Usage(format!(
                            "--user {u:?}: expected an email address such as alice@example.com"
                        )));
                    };
                    (o, Some(u.trim().to_ascii_lowercase()))
                }
                (None, Some(o)) => {
                    let o = o.trim().to_ascii_lowercase();
                    if o.is_empty() {
                        return Err(AdminError::Usage("--org must not be empty".into()));
                    }
                    (o, None)
                }
                (None, None) => {
                    return Err(AdminError::Usage("pass --user EMAIL or --org NAME".into()));
                }
            };
            let key = store.create_setup_key(&SetupKeySpec {
                organisation,
                user,
                tags: tags.clone(),
                reusable: *reusable,
                ttl_s: ttl.as_secs() as i64,
            })?;
            tracing::info!(event = "setup_key_created", id = key.id, organisation = %key.organisation, reusable = *reusable);
            Ok(format!(
                "# setup key {} for organisation {} (shown once; stored hashed)\n{}\n",
                key.id, key.organisation, key.key
            ))
        }
        ControlCommand::SetupKey(SetupKeyCommand::List) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let mut out = String::from("ID\tORGANISATION\tUSER\tTAGS\tKIND\tUSES\tSTATE\n");
            for k in store.setup_keys()? {
                let state = if k.revoked {
                    "revoked".to_string()
                } else if k.expires_at <= now {
                    "expired".to_string()
                } else if !k.reusable && k.uses > 0 {
                    "used".to_string()
                } else {
                    format!("valid for {}", remaining(k.expires_at - now))
                };
                out += &format!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                    k.id,
                    k.organisation,
                    k.user.as_deref().unwrap_or("-"),
                    list_or_dash(&k.tags),
                    if k.reusable { "reusable" } else { "single-use" },
                    k.uses,
                    state,
                );
            }
            Ok(out)
        }
        ControlCommand::SetupKey(SetupKeyCommand::Revoke { id }) => revoked(
            store.revoke_setup_key(*id)?,
            || tracing::info!(event = "setup_key_revoked", id = id),
            format!("revoked setup key {id}\n"),
            format!("no unrevoked setup key {id}; see `runewarp control setup-key list`"),
        ),
        ControlCommand::Devices { command } => match command {
            None | Some(DevicesCommand::List) => {
                let mut out =
                    String::from("ID\tORGANISATION\tHOSTNAME\tADDRESS\tUSER\tTAGS\tSTATE\n");
                for d in store.devices(None)? {
                    out += &format!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                        d.id,
                        d.organisation,
                        d.hostname,
                        d.ipv4,
                        d.user.as_deref().unwrap_or("-"),
                        list_or_dash(&d.tags),
                        if d.revoked { "revoked" } else { "active" },
                    );
                }
                Ok(out)
            }
            Some(DevicesCommand::Revoke { id }) => revoked(
                store.revoke_device(*id)?,
                || tracing::info!(event = "device_revoked", device = id),
                format!("revoked device {id}\n"),
                format!("no active device {id}; see `runewarp control devices list`"),
            ),
        },
        ControlCommand::Policy(PolicyCommand::Set { org, file }) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| AdminError::Usage(format!("{}: {e}", file.display())))?;
            Policy::parse(&text)
                .map_err(|e| AdminError::Usage(format!("{}: {e}", file.display())))?;
            store.set_policy(&org.to_ascii_lowercase(), &text)?;
            tracing::info!(event = "policy_set", organisation = %org);
            Ok(format!("policy of {org} replaced\n"))
        }
        ControlCommand::RelayKey => {
            let key = super::relay_tokens::load_or_create(&config.state_dir)
                .map_err(AdminError::Usage)?;
            Ok(format!("{}\n", super::relay_tokens::public_key_text(&key)))
        }
        ControlCommand::Users => {
            let mut out = String::from("ID\tORGANISATION\tEMAIL\tGROUPS\tADMIN\tISSUER\n");
            for u in store.users()? {
                out += &format!(
                    "{}\t{}\t{}\t{}\t{}\t{}\n",
                    u.id,
                    u.organisation,
                    u.email,
                    list_or_dash(&u.groups),
                    if u.admin { "yes" } else { "no" },
                    u.issuer
                );
            }
            Ok(out)
        }
        ControlCommand::Routes { command } => routes(&mut store, command.as_ref()),
        ControlCommand::Policy(PolicyCommand::Get { org }) => {
            let Some(id) = store.organisation(&org.to_ascii_lowercase())? else {
                return Err(AdminError::Usage(format!("no organisation {org:?}")));
            };
            Ok(store.policy(id)?.unwrap_or_else(|| {
                "# no policy: each user's own devices reach each other, nothing else\n".into()
            }))
        }
    }
}

/// `control routes list|approve|revoke`.
fn routes(store: &mut Store, cmd: Option<&RoutesCommand>) -> Result<String, AdminError> {
    let (device, route, decision) = match cmd {
        None | Some(RoutesCommand::List) => {
            let mut out = String::from(
                "DEVICE	HOSTNAME	ROUTE	ADVERTISED	DECISION	STATE
",
            );
            let all = store.routes(None)?;
            let mut snapshots = std::collections::HashMap::new();
            for d in store.devices(None)? {
                let Some(rows) = all.get(&d.id) else { continue };
                let snapshot = match snapshots.entry(d.org_id) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(OrgSnapshot::load(store, d.org_id)?)
                    }
                };
                let serving = compute_from(snapshot, d.id)
                    .map(|m| m.node.routes)
                    .unwrap_or_default();
                for r in rows {
                    let state = if serving.contains(&r.route) {
                        "serving"
                    } else if !r.advertised {
                        "not advertised"
                    } else if r.decision == "revoked" {
                        "revoked"
                    } else {
                        "pending approval"
                    };
                    out += &format!(
                        "{}\t{}\t{}\t{}\t{}\t{}\n",
                        d.id,
                        d.hostname,
                        r.route,
                        if r.advertised { "yes" } else { "no" },
                        if r.decision.is_empty() {
                            "policy"
                        } else {
                            &r.decision
                        },
                        state
                    );
                }
            }
            return Ok(out);
        }
        Some(RoutesCommand::Approve { device, route }) => (*device, route, "approved"),
        Some(RoutesCommand::Revoke { device, route }) => (*device, route, "revoked"),
    };
    crate::mesh_protocol::check_route(route).map_err(AdminError::Usage)?;
    if !store
        .devices(None)?
        .iter()
        .any(|d| d.id == device && !d.revoked)
    {
        return Err(AdminError::Usage(format!(
            "--device {device}: no active device with that id; see `runewarp control devices list`"
        )));
    }
    let changed = store.decide_route(device, route, decision)?;
    tracing::info!(event = "route_decided", device, route = %route, decision, changed);
    Ok(format!("route {route} of device {device}: {decision}\n"))
}

/// A revoke's answer: `done` (after `log`) when something was revoked,
/// else the usage error `missing`.
fn revoked(
    revoked: bool,
    log: impl FnOnce(),
    done: String,
    missing: String,
) -> Result<String, AdminError> {
    if revoked {
        log();
        Ok(done)
    } else {
        Err(AdminError::Usage(missing))
    }
}

/// Seconds left, as `2h`, `45m` or `30s`.
fn remaining(secs: i64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3_600 => format!("{}h", s / 3_600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A list column: comma-separated, or `-` when empty.
fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_string()
    } else {
        items.join(",")
    }
}
