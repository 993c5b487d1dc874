//! The control plane's storage: organisations, setup keys, devices and
//! policies, in SQLite (`control.db` in the state dir, mode 0600, the
//! default) or PostgreSQL (one database for several replicas); see
//! [`super::db`] for the engines. Every change bumps one serial in the same
//! transaction; the running control server watches that serial (and, on
//! PostgreSQL, `LISTEN`s for it), so a change made by an admin command in
//! another process, or by another replica, reaches connected devices too.
//!
//! Secrets (setup keys, device tokens) are stored only as SHA-256 hashes.
//!
//! Adding an operation that works on both engines:
//!
//! 1. New tables or columns: a new entry at the end of
//!    [`super::db::MIGRATIONS`], with the DDL in each dialect (`BIGINT`
//!    and `BOOLEAN` in PostgreSQL where SQLite says `INTEGER`).
//! 2. A read: `self.db.query(sql, &[Arg::…])` (or `query_opt`) and the
//!    [`Row`] accessors `int`/`text`/`opt_text`/`bool`.
//! 3. A change: `self.db.write(|tx| { …; tx.bump_serial()?; Ok(…) })`:
//!    one transaction, the serial bumped (and replicas notified) at
//!    commit. If a read decides the write (a free address, a unique
//!    name, a key's use count), append `tx.lock_clause()` to that
//!    `SELECT` so a second replica's writer waits for this one.
//! 4. SQL once, in SQLite's syntax with `?N` placeholders, `TRUE`/`FALSE`,
//!    `RETURNING id`, `ON CONFLICT`, and `"user"` quoted; test it against
//!    both engines (tests/control_postgres.rs runs the store tests on
//!    PostgreSQL).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use super::config::Database;
use super::db::{Arg, Db, Row};
use crate::fsutil;

/// The file in the state dir.
pub const DB_FILE: &str = "control.db";
/// Each organisation gets a /22 of 100.64.0.0/10 (4,096 organisations of
/// 1,022 devices).
const ORG_BLOCK_BITS: u32 = 10;
/// The CGNAT range the organisation blocks are carved from.
const CGNAT_BASE: u32 = u32::from_be_bytes([100, 64, 0, 0]);
/// How many /22 blocks 100.64.0.0/10 holds.
const ORG_BLOCKS: i64 = 1 << (22 - ORG_BLOCK_BITS);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("control database {path}: {error}")]
    Open {
        path: String,
        error: rusqlite::Error,
    },
    #[error("cannot create the state dir {path}: {error}")]
    StateDir { path: String, error: std::io::Error },
    #[error("control database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("control database: {0}")]
    Postgres(#[from] postgres::Error),
    #[error("cannot connect to the control database ({target}): {error}")]
    Connect {
        /// Host, port, database and user: never the password.
        target: String,
        error: postgres::Error,
    },
    #[error("control database: unexpected value: {0}")]
    Decode(String),
    #[error("no organisation {0:?}; create a setup key for it first")]
    NoOrganisation(String),
    #[error("organisation {0:?} has no free address (1,022 devices at most)")]
    BlockFull(String),
    #[error("no more organisations fit in 100.64.0.0/10")]
    OrganisationsFull,
}

/// Why a registration was refused (the API answers 401 or 409).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegisterError {
    #[error("the setup key is unknown, used, expired or revoked")]
    BadSetupKey,
    #[error("this WireGuard public key is already registered")]
    KeyTaken,
}

/// A registered device, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: i64,
    pub org_id: i64,
    pub organisation: String,
    pub user: Option<String>,
    pub hostname: String,
    pub public_key: String,
    pub tags: Vec<String>,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub revoked: bool,
}

/// A setup key as created (the secret is shown once).
#[derive(Debug)]
pub struct NewSetupKey {
    pub id: i64,
    pub key: String,
    pub organisation: String,
}

/// A setup key as `setup-key list` shows it (the key itself is never
/// stored).
#[derive(Debug, Clone)]
pub struct SetupKeyInfo {
    pub id: i64,
    pub organisation: String,
    pub user: Option<String>,
    pub tags: Vec<String>,
    pub reusable: bool,
    /// Unix seconds.
    pub expires_at: i64,
    pub revoked: bool,
    pub uses: i64,
}

/// What a setup key enrols devices as.
#[derive(Debug, Clone, Default)]
pub struct SetupKeySpec {
    /// The organisation (an email domain, or a personal one).
    pub organisation: String,
    /// The user the devices belong to (none: tagged devices).
    pub user: Option<String>,
    pub tags: Vec<String>,
    pub reusable: bool,
    /// Seconds from now until the key stops working.
    pub ttl_s: i64,
}

/// One route of one device: advertised now or not, and an admin's
/// decision (`approved`, `revoked`, or empty: the policy decides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRow {
    pub route: String,
    pub advertised: bool,
    pub decision: String,
}

pub struct Store {
    db: Db,
    /// This deployment's IPv6 ULA /48: made once, never changes.
    ula: [u8; 6],
}

/// SHA-256 of a secret, as stored.
fn hash(secret: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())
        .as_ref()
        .to_vec()
}

/// A fresh 256-bit secret with a readable prefix.
pub fn new_secret(prefix: &str) -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

const DEVICE_COLUMNS: &str = r#"SELECT d.id, d.org_id, o.name, d."user", d.hostname, d.public_key, d.tags, d.ordinal, d.revoked
     FROM devices d JOIN orgs o ON o.id = d.org_id"#;

impl Store {
    /// Open (creating) the SQLite database in `state_dir` (0700), file
    /// 0600.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        fsutil::ensure_dir(state_dir, 0o700).map_err(|error| StoreError::StateDir {
            path: state_dir.display().to_string(),
            error,
        })?;
        let path = state_dir.join(DB_FILE);
        let db = Db::open_sqlite(&path).map_err(|error| StoreError::Open {
            path: path.display().to_string(),
            error,
        })?;
        Self::with(db)
    }

    /// Open the configured database: SQLite in `state_dir`, or PostgreSQL.
    pub fn connect(database: &Database, state_dir: &Path) -> Result<Self, StoreError> {
        match database {
            Database::Sqlite => Self::open(state_dir),
            Database::Postgres(url) => Self::with(Db::connect_postgres(url)?),
        }
    }

    fn with(mut db: Db) -> Result<Self, StoreError> {
        db.migrate()?;
        let ula = Self::ula_prefix(&mut db)?;
        Ok(Self { db, ula })
    }

    /// The serial: bumped by every change.
    pub fn serial(&self) -> Result<u64, StoreError> {
        let v = self
            .db
            .query_opt("SELECT value FROM meta WHERE key = 'serial'", &[])?;
        Ok(match v {
            Some(r) => r.text(0)?.parse().unwrap_or(0),
            None => 0,
        })
    }

    /// This deployment's IPv6 ULA /48 (random global ID, RFC 4193), made
    /// once; replicas starting together agree on the first one stored.
    fn ula_prefix(db: &mut Db) -> Result<[u8; 6], StoreError> {
        let parse = |s: &str| -> Option<[u8; 6]> {
            let b: Vec<u8> = (0..6)
                .map(|i| u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok())
                .collect::<Option<_>>()?;
            b.try_into().ok()
        };
        let mut p: [u8; 6] = rand::random();
        p[0] = 0xfd;
        let text: String = p.iter().map(|b| format!("{b:02x}")).collect();
        let stored = db.write(|tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('ula', ?1) ON CONFLICT (key) DO NOTHING",
                &[Arg::Text(&text)],
            )?;
            match tx.query_opt("SELECT value FROM meta WHERE key = 'ula'", &[])? {
                Some(r) => r.text(0),
                None => Ok(text.clone()),
            }
        })?;
        parse(&stored).ok_or_else(|| StoreError::Decode(format!("meta ula = {stored:?}")))
    }

    fn org_id(tx: &mut super::db::Tx<'_>, name: &str, create: bool) -> Result<i64, StoreError> {
        let select = "SELECT id FROM orgs WHERE name = ?1";
        if let Some(r) = tx.query_opt(select, &[Arg::Text(name)])? {
            return r.int(0);
        }
        if !create {
            return Err(StoreError::NoOrganisation(name.to_string()));
        }
        // Another replica may create it at the same moment: keep theirs.
        let id = match tx.query_opt(
            "INSERT INTO orgs (name) VALUES (?1) ON CONFLICT (name) DO NOTHING RETURNING id",
            &[Arg::Text(name)],
        )? {
            Some(r) => r.int(0)?,
            None => match tx.query_opt(select, &[Arg::Text(name)])? {
                Some(r) => r.int(0)?,
                None => return Err(StoreError::NoOrganisation(name.to_string())),
            },
        };
        if id > ORG_BLOCKS {
            return Err(StoreError::OrganisationsFull);
        }
        Ok(id)
    }

    /// Create a setup key; the secret is returned once and stored hashed.
    pub fn create_setup_key(&mut self, spec: &SetupKeySpec) -> Result<NewSetupKey, StoreError> {
        let key = new_secret("rwk_");
        let id = self.db.write(|tx| {
            let org = Self::org_id(tx, &spec.organisation, true)?;
            let tags = spec.tags.join(",");
            let row = tx.query_opt(
                r#"INSERT INTO setup_keys (org_id, hash, "user", tags, reusable, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id"#,
                &[
                    Arg::Int(org),
                    Arg::Blob(&hash(&key)),
                    Arg::OptText(spec.user.as_deref()),
                    Arg::Text(&tags),
                    Arg::Bool(spec.reusable),
                    Arg::Int(now() + spec.ttl_s),
                ],
            )?;
            let id = match row {
                Some(r) => r.int(0)?,
                None => return Err(StoreError::Decode("INSERT returned no id".into())),
            };
            tx.bump_serial()?;
            Ok(id)
        })?;
        Ok(NewSetupKey {
            id,
            key,
            organisation: spec.organisation.clone(),
        })
    }

    /// Every setup key, oldest first.
    pub fn setup_keys(&self) -> Result<Vec<SetupKeyInfo>, StoreError> {
        self.db
            .query(
                r#"SELECT k.id, o.name, k."user", k.tags, k.reusable, k.expires_at, k.revoked, k.uses
                 FROM setup_keys k JOIN orgs o ON o.id = k.org_id ORDER BY k.id"#,
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(SetupKeyInfo {
                    id: r.int(0)?,
                    organisation: r.text(1)?,
                    user: r.opt_text(2)?,
                    tags: split_tags(&r.text(3)?),
                    reusable: r.bool(4)?,
                    expires_at: r.int(5)?,
                    revoked: r.bool(6)?,
                    uses: r.int(7)?,
                })
            })
            .collect()
    }

    /// Revoke setup key `id`; false when there is no such unrevoked key.
    pub fn revoke_setup_key(&mut self, id: i64) -> Result<bool, StoreError> {
        self.db.write(|tx| {
            let n = tx.execute(
                "UPDATE setup_keys SET revoked = TRUE WHERE id = ?1 AND revoked = FALSE",
                &[Arg::Int(id)],
            )?;
            Ok(n > 0)
        })
    }

    /// Enrol a device with a setup key. Returns the device and its bearer
    /// token (shown once, stored hashed).
    ///
    /// With several replicas, the setup key's row and then the
    /// organisation's row are locked until commit, so two registrations
    /// never pick the same address or hostname, nor both use a single-use
    /// key.
    pub fn register(
        &mut self,
        setup_key: &str,
        public_key: &str,
        hostname: &str,
    ) -> Result<Result<(Device, String), RegisterError>, StoreError> {
        let prefix = self.ula;
        self.db.write(|tx| {
            let lock = tx.lock_clause();
            let found = tx.query_opt(
                &format!(
                    r#"SELECT id, org_id, "user", tags, reusable, uses FROM setup_keys
                 WHERE hash = ?1 AND revoked = FALSE AND expires_at > ?2{lock}"#
                ),
                &[Arg::Blob(&hash(setup_key)), Arg::Int(now())],
            )?;
            let Some(found) = found else {
                return Ok(Err(RegisterError::BadSetupKey));
            };
            let (key_id, org_id, user, tags, reusable, uses) = (
                found.int(0)?,
                found.int(1)?,
                found.opt_text(2)?,
                found.text(3)?,
                found.bool(4)?,
                found.int(5)?,
            );
            if !reusable && uses > 0 {
                return Ok(Err(RegisterError::BadSetupKey));
            }
            let org_name = match tx.query_opt(
                &format!("SELECT name FROM orgs WHERE id = ?1{lock}"),
                &[Arg::Int(org_id)],
            )? {
                Some(r) => r.text(0)?,
                None => return Err(StoreError::Decode(format!("setup key {key_id}: no org"))),
            };
            let taken = tx.query_opt(
                "SELECT 1 FROM devices WHERE public_key = ?1",
                &[Arg::Text(public_key)],
            )?;
            if taken.is_some() {
                return Ok(Err(RegisterError::KeyTaken));
            }
            let (ordinal, name) = Self::allocate(tx, org_id, &org_name, hostname)?;
            let token = new_secret("rwt_");
            let id = Self::insert_device(
                tx,
                NewDevice {
                    org_id,
                    user: user.as_deref(),
                    hostname: &name,
                    public_key,
                    token: &token,
                    tags: &tags,
                    ordinal,
                },
            )?;
            tx.execute(
                "UPDATE setup_keys SET uses = uses + 1 WHERE id = ?1",
                &[Arg::Int(key_id)],
            )?;
            tx.bump_serial()?;
            let device = Device {
                id,
                org_id,
                organisation: org_name,
                user,
                hostname: name,
                public_key: public_key.to_string(),
                tags: split_tags(&tags),
                ipv4: ipv4(org_id, ordinal),
                ipv6: ipv6(prefix, org_id, ordinal),
                revoked: false,
            };
            Ok(Ok((device, token)))
        })
    }

    /// A new device's place in organisation `org_id`: the lowest free
    /// ordinal (addresses of revoked devices stay reserved, so an old
    /// address never names a new device) and a hostname unique in the
    /// organisation (`name`, `name-2`, `name-3`…). The caller holds the
    /// organisation's row lock.
    fn allocate(
        tx: &mut super::db::Tx<'_>,
        org_id: i64,
        org_name: &str,
        hostname: &str,
    ) -> Result<(i64, String), StoreError> {
        let used: Vec<i64> = tx
            .query(
                "SELECT ordinal FROM devices WHERE org_id = ?1 ORDER BY ordinal",
                &[Arg::Int(org_id)],
            )?
            .iter()
            .map(|r| r.int(0))
            .collect::<Result<_, _>>()?;
        let ordinal = lowest_free(&used);
        if ordinal > (1 << ORG_BLOCK_BITS) - 2 {
            return Err(StoreError::BlockFull(org_name.to_string()));
        }
        let mut name = hostname.to_string();
        let mut n = 1;
        while tx
            .query_opt(
                "SELECT 1 FROM devices WHERE org_id = ?1 AND hostname = ?2",
                &[Arg::Int(org_id), Arg::Text(&name)],
            )?
            .is_some()
        {
            n += 1;
            name = format!("{hostname}-{n}");
        }
        Ok((ordinal, name))
    }

    /// Insert a device row; its id.
    fn insert_device(tx: &mut super::db::Tx<'_>, d: NewDevice<'_>) -> Result<i64, StoreError> {
        let row = tx.query_opt(
            r#"INSERT INTO devices (org_id, "user", hostname, public_key, token_hash, tags, ordinal, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id"#,
            &[
                Arg::Int(d.org_id),
                Arg::OptText(d.user),
                Arg::Text(d.hostname),
                Arg::Text(d.public_key),
                Arg::Blob(&hash(d.token)),
                Arg::Text(d.tags),
                Arg::Int(d.ordinal),
                Arg::Int(now()),
            ],
        )?;
        match row {
            Some(r) => r.int(0),
            None => Err(StoreError::Decode("INSERT returned no id".into())),
        }
    }

    fn device_rows(&self, filter: &str, args: &[Arg<'_>]) -> Result<Vec<Device>, StoreError> {
        let sql = format!("{DEVICE_COLUMNS} {filter} ORDER BY d.id");
        self.db
            .query(&sql, args)?
            .iter()
            .map(|r| self.device_of(r))
            .collect()
    }

    fn device_of(&self, r: &Row) -> Result<Device, StoreError> {
        let org_id = r.int(1)?;
        let ordinal = r.int(7)?;
        Ok(Device {
            id: r.int(0)?,
            org_id,
            organisation: r.text(2)?,
            user: r.opt_text(3)?,
            hostname: r.text(4)?,
            public_key: r.text(5)?,
            tags: split_tags(&r.text(6)?),
            ipv4: ipv4(org_id, ordinal),
            ipv6: ipv6(self.ula, org_id, ordinal),
            revoked: r.bool(8)?,
        })
    }

    /// The device a bearer token belongs to (revoked ones included).
    pub fn device_by_token(&self, token: &str) -> Result<Option<Device>, StoreError> {
        let h = hash(token);
        Ok(self
            .device_rows("WHERE d.token_hash = ?1", &[Arg::Blob(&h)])?
            .into_iter()
            .next())
    }

    /// One device by id.
    #[cfg(test)]
    pub fn device(&self, id: i64) -> Result<Option<Device>, StoreError> {
        Ok(self
            .device_rows("WHERE d.id = ?1", &[Arg::Int(id)])?
            .into_iter()
            .next())
    }

    /// Every device of one organisation, or of all.
    pub fn devices(&self, org_id: Option<i64>) -> Result<Vec<Device>, StoreError> {
        match org_id {
            Some(o) => self.device_rows("WHERE d.org_id = ?1", &[Arg::Int(o)]),
            None => self.device_rows("", &[]),
        }
    }

    /// Revoke a device; false if there is none with that id.
    pub fn revoke_device(&mut self, id: i64) -> Result<bool, StoreError> {
        self.db.write(|tx| {
            let n = tx.execute(
                "UPDATE devices SET revoked = TRUE WHERE id = ?1 AND revoked = FALSE",
                &[Arg::Int(id)],
            )?;
            if n > 0 {
                tx.bump_serial()?;
            }
            Ok(n > 0)
        })
    }

    /// Replace an organisation's policy (validated by the caller).
    pub fn set_policy(&mut self, organisation: &str, text: &str) -> Result<(), StoreError> {
        self.db.write(|tx| {
            let org = Self::org_id(tx, organisation, false)?;
            tx.execute(
                "INSERT INTO policies (org_id, text) VALUES (?1, ?2)
                 ON CONFLICT (org_id) DO UPDATE SET text = excluded.text",
                &[Arg::Int(org), Arg::Text(text)],
            )?;
            tx.bump_serial()
        })
    }

    /// An organisation's policy text, if one was set.
    pub fn policy(&self, org_id: i64) -> Result<Option<String>, StoreError> {
        match self.db.query_opt(
            "SELECT text FROM policies WHERE org_id = ?1",
            &[Arg::Int(org_id)],
        )? {
            Some(r) => Ok(Some(r.text(0)?)),
            None => Ok(None),
        }
    }

    /// Replace a device's reported endpoints (`IP:PORT`, best first; the
    /// caller validates them). The serial moves only when they changed, so
    /// a device re-reporting the same list wakes nobody.
    pub fn set_endpoints(
        &mut self,
        device_id: i64,
        endpoints: &[String],
    ) -> Result<bool, StoreError> {
        let text = endpoints.join(",");
        self.db.write(|tx| {
            let old = tx.query_opt(
                &format!(
                    "SELECT endpoints FROM device_endpoints WHERE device_id = ?1{}",
                    tx.lock_clause()
                ),
                &[Arg::Int(device_id)],
            )?;
            if let Some(r) = old
                && r.text(0)? == text
            {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO device_endpoints (device_id, endpoints) VALUES (?1, ?2)
                 ON CONFLICT (device_id) DO UPDATE SET endpoints = excluded.endpoints",
                &[Arg::Int(device_id), Arg::Text(&text)],
            )?;
            tx.bump_serial()?;
            Ok(true)
        })
    }

    /// The reported endpoints of an organisation's devices, by device id.
    pub fn endpoints(
        &self,
        org_id: i64,
    ) -> Result<std::collections::HashMap<i64, Vec<String>>, StoreError> {
        let rows = self.db.query(
            "SELECT e.device_id, e.endpoints FROM device_endpoints e
             JOIN devices d ON d.id = e.device_id WHERE d.org_id = ?1",
            &[Arg::Int(org_id)],
        )?;
        let mut out = std::collections::HashMap::new();
        for r in rows {
            out.insert(r.int(0)?, split_tags(&r.text(1)?));
        }
        Ok(out)
    }

    /// Replace the routes a device advertises (validated by the caller).
    /// Admins' decisions stay with each route; the serial moves only when
    /// the advertised set changed.
    pub fn set_routes(&mut self, device_id: i64, routes: &[String]) -> Result<bool, StoreError> {
        let mut wanted: Vec<&str> = routes.iter().map(String::as_str).collect();
        wanted.sort_unstable();
        wanted.dedup();
        self.db.write(|tx| {
            let rows = tx.query(
                &format!(
                    "SELECT route FROM device_routes WHERE device_id = ?1 AND advertised = 1{}",
                    tx.lock_clause()
                ),
                &[Arg::Int(device_id)],
            )?;
            let mut have = rows
                .iter()
                .map(|r| r.text(0))
                .collect::<Result<Vec<_>, _>>()?;
            have.sort_unstable();
            if have == wanted {
                return Ok(false);
            }
            tx.execute(
                "UPDATE device_routes SET advertised = 0 WHERE device_id = ?1",
                &[Arg::Int(device_id)],
            )?;
            for r in &wanted {
                tx.execute(
                    "INSERT INTO device_routes (device_id, route, advertised, decision)
                     VALUES (?1, ?2, 1, '')
                     ON CONFLICT (device_id, route) DO UPDATE SET advertised = 1",
                    &[Arg::Int(device_id), Arg::Text(r)],
                )?;
            }
            tx.bump_serial()?;
            Ok(true)
        })
    }

    /// Record an admin's decision on a device's route: `approved`,
    /// `revoked`, or `` (the policy decides). False if it was already so.
    pub fn decide_route(
        &mut self,
        device_id: i64,
        route: &str,
        decision: &str,
    ) -> Result<bool, StoreError> {
        self.db.write(|tx| {
            let old = tx.query_opt(
                &format!(
                    "SELECT decision FROM device_routes WHERE device_id = ?1 AND route = ?2{}",
                    tx.lock_clause()
                ),
                &[Arg::Int(device_id), Arg::Text(route)],
            )?;
            if let Some(r) = old
                && r.text(0)? == decision
            {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO device_routes (device_id, route, advertised, decision)
                 VALUES (?1, ?2, 0, ?3)
                 ON CONFLICT (device_id, route) DO UPDATE SET decision = excluded.decision",
                &[Arg::Int(device_id), Arg::Text(route), Arg::Text(decision)],
            )?;
            tx.bump_serial()?;
            Ok(true)
        })
    }

    /// Routes by device id: of one organisation, or of all.
    pub fn routes(
        &self,
        org_id: Option<i64>,
    ) -> Result<std::collections::HashMap<i64, Vec<RouteRow>>, StoreError> {
        let sql = "SELECT r.device_id, r.route, r.advertised, r.decision FROM device_routes r
             JOIN devices d ON d.id = r.device_id";
        let rows = match org_id {
            Some(o) => self.db.query(
                &format!("{sql} WHERE d.org_id = ?1 ORDER BY r.device_id, r.route"),
                &[Arg::Int(o)],
            )?,
            None => self
                .db
                .query(&format!("{sql} ORDER BY r.device_id, r.route"), &[])?,
        };
        let mut out: std::collections::HashMap<i64, Vec<RouteRow>> = Default::default();
        for r in rows {
            out.entry(r.int(0)?).or_default().push(RouteRow {
                route: r.text(1)?,
                advertised: r.int(2)? != 0,
                decision: r.text(3)?,
            });
        }
        Ok(out)
    }

    /// The id of an organisation by name.
    pub fn organisation(&self, name: &str) -> Result<Option<i64>, StoreError> {
        match self
            .db
            .query_opt("SELECT id FROM orgs WHERE name = ?1", &[Arg::Text(name)])?
        {
            Some(r) => Ok(Some(r.int(0)?)),
            None => Ok(None),
        }
    }
}

/// A device row to insert ([`Store::insert_device`]).
struct NewDevice<'a> {
    org_id: i64,
    user: Option<&'a str>,
    hostname: &'a str,
    public_key: &'a str,
    token: &'a str,
    tags: &'a str,
    ordinal: i64,
}

/// A verified sign-in, as the control server hands it to the store.
#[derive(Debug, Clone)]
pub struct Login {
    pub issuer: String,
    pub subject: String,
    /// Lower-cased, verified by the IdP.
    pub email: String,
    /// What keys the organisation (with the issuer): `hd`, `tid`, the
    /// email domain, or for a consumer domain `sub:SUBJECT`.
    pub org_key: String,
    /// The name a new organisation gets (the domain, or the email).
    pub org_name: String,
    pub groups: Vec<String>,
    pub admin: bool,
    /// Unix seconds when the device's key stops working.
    pub expires_at: i64,
}

/// A user as listed by `runewarp control users`.
#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub organisation: String,
    pub issuer: String,
    pub email: String,
    pub groups: Vec<String>,
    pub admin: bool,
}

impl Store {
    /// The organisation for (issuer, key), made on first sign-in. Its name
    /// is `login.org_name`; an organisation of that name made by setup
    /// keys (no SSO mapping yet) is adopted, one another key holds gets a
    /// `-2`, `-3`… suffix.
    fn login_org(tx: &mut super::db::Tx<'_>, login: &Login) -> Result<i64, StoreError> {
        let lock = tx.lock_clause();
        if let Some(r) = tx.query_opt(
            &format!("SELECT org_id FROM oidc_orgs WHERE issuer = ?1 AND org_key = ?2{lock}"),
            &[Arg::Text(&login.issuer), Arg::Text(&login.org_key)],
        )? {
            return r.int(0);
        }
        let mut name = login.org_name.clone();
        let mut n = 1;
        let id = loop {
            match tx.query_opt("SELECT id FROM orgs WHERE name = ?1", &[Arg::Text(&name)])? {
                None => break Self::org_id(tx, &name, true)?,
                Some(r) => {
                    let id = r.int(0)?;
                    let mapped = tx
                        .query_opt("SELECT 1 FROM oidc_orgs WHERE org_id = ?1", &[Arg::Int(id)])?
                        .is_some();
                    if !mapped {
                        break id;
                    }
                }
            }
            n += 1;
            name = format!("{}-{n}", login.org_name);
        };
        // Another replica may map the same pair at this moment: keep theirs.
        tx.execute(
            "INSERT INTO oidc_orgs (issuer, org_key, org_id) VALUES (?1, ?2, ?3)
             ON CONFLICT (issuer, org_key) DO NOTHING",
            &[
                Arg::Text(&login.issuer),
                Arg::Text(&login.org_key),
                Arg::Int(id),
            ],
        )?;
        match tx.query_opt(
            "SELECT org_id FROM oidc_orgs WHERE issuer = ?1 AND org_key = ?2",
            &[Arg::Text(&login.issuer), Arg::Text(&login.org_key)],
        )? {
            Some(r) => r.int(0),
            None => Err(StoreError::Decode("oidc_orgs: the mapping vanished".into())),
        }
    }

    /// Record a sign-in and enrol (or renew) the device with `public_key`:
    /// a new device gets an address and a token; the same user's device
    /// signing in again gets a fresh token and expiry. Another user's key
    /// is refused.
    pub fn login_device(
        &mut self,
        login: &Login,
        public_key: &str,
        hostname: &str,
    ) -> Result<Result<(Device, String), RegisterError>, StoreError> {
        let token = new_secret("rwt_");
        let device_id = self.db.write(|tx| {
            let org_id = Self::login_org(tx, login)?;
            let groups = login.groups.join("\n");
            let user = tx.query_opt(
                "INSERT INTO users (issuer, subject, email, org_id, idp_groups, is_admin, last_login)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (issuer, subject) DO UPDATE SET email = excluded.email,
                   idp_groups = excluded.idp_groups, is_admin = excluded.is_admin,
                   last_login = excluded.last_login
                 RETURNING id",
                &[
                    Arg::Text(&login.issuer),
                    Arg::Text(&login.subject),
                    Arg::Text(&login.email),
                    Arg::Int(org_id),
                    Arg::Text(&groups),
                    Arg::Bool(login.admin),
                    Arg::Int(now()),
                ],
            )?;
            let user_id = match user {
                Some(r) => r.int(0)?,
                None => return Err(StoreError::Decode("users: upsert returned no id".into())),
            };
            let existing = tx.query_opt(
                "SELECT d.id, l.user_id, d.revoked FROM devices d
                 LEFT JOIN device_logins l ON l.device_id = d.id WHERE d.public_key = ?1",
                &[Arg::Text(public_key)],
            )?;
            let id = match existing {
                Some(r) => {
                    let (id, revoked) = (r.int(0)?, r.bool(2)?);
                    let owner = r.opt_int(1)?;
                    if revoked || owner != Some(user_id) {
                        return Ok(Err(RegisterError::KeyTaken));
                    }
                    tx.execute(
                        "UPDATE devices SET token_hash = ?1 WHERE id = ?2",
                        &[Arg::Blob(&hash(&token)), Arg::Int(id)],
                    )?;
                    tx.execute(
                        "UPDATE device_logins SET expires_at = ?1, expired = FALSE WHERE device_id = ?2",
                        &[Arg::Int(login.expires_at), Arg::Int(id)],
                    )?;
                    id
                }
                None => {
                    let (ordinal, name) =
                        Self::allocate(tx, org_id, &login.org_name, hostname)?;
                    let id = Self::insert_device(
                        tx,
                        NewDevice {
                            org_id,
                            user: Some(&login.email),
                            hostname: &name,
                            public_key,
                            token: &token,
                            tags: "",
                            ordinal,
                        },
                    )?;
                    tx.execute(
                        "INSERT INTO device_logins (device_id, user_id, expires_at) VALUES (?1, ?2, ?3)",
                        &[Arg::Int(id), Arg::Int(user_id), Arg::Int(login.expires_at)],
                    )?;
                    id
                }
            };
            tx.bump_serial()?;
            Ok(Ok(id))
        })?;
        let device_id = match device_id {
            Ok(id) => id,
            Err(refused) => return Ok(Err(refused)),
        };
        let device = self
            .device_rows("WHERE d.id = ?1", &[Arg::Int(device_id)])?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Decode(format!("device {device_id} vanished")))?;
        Ok(Ok((device, token)))
    }

    /// Mark the device keys whose login expired by `at` (Unix seconds);
    /// bumps the serial when any did, so their peers drop them. Returns
    /// how many.
    pub fn expire_logins(&mut self, at: i64) -> Result<usize, StoreError> {
        self.db.write(|tx| {
            let n = tx.execute(
                "UPDATE device_logins SET expired = TRUE WHERE expired = FALSE AND expires_at <= ?1",
                &[Arg::Int(at)],
            )?;
            if n > 0 {
                tx.bump_serial()?;
            }
            Ok(n as usize)
        })
    }

    /// Whether device `id`'s key is tied to a login that has expired.
    pub fn login_expired(&self, id: i64) -> Result<bool, StoreError> {
        let row = self.db.query_opt(
            "SELECT expires_at, expired FROM device_logins WHERE device_id = ?1",
            &[Arg::Int(id)],
        )?;
        match row {
            Some(r) => Ok(r.bool(1)? || r.int(0)? <= now()),
            None => Ok(false),
        }
    }

    /// The devices of organisation `org_id` whose login has expired.
    pub fn expired_devices(&self, org_id: i64) -> Result<Vec<i64>, StoreError> {
        self.db
            .query(
                "SELECT l.device_id FROM device_logins l JOIN devices d ON d.id = l.device_id
                 WHERE d.org_id = ?1 AND (l.expired = TRUE OR l.expires_at <= ?2)
                 ORDER BY l.device_id",
                &[Arg::Int(org_id), Arg::Int(now())],
            )?
            .iter()
            .map(|r| r.int(0))
            .collect()
    }

    /// Each signed-in user of organisation `org_id` (by email) and their
    /// IdP groups, for the policy's `group:NAME`.
    pub fn user_groups(
        &self,
        org_id: i64,
    ) -> Result<std::collections::HashMap<String, Vec<String>>, StoreError> {
        let mut out = std::collections::HashMap::new();
        for r in self.db.query(
            "SELECT email, idp_groups FROM users WHERE org_id = ?1",
            &[Arg::Int(org_id)],
        )? {
            out.entry(r.text(0)?)
                .or_insert_with(Vec::new)
                .extend(split_groups(&r.text(1)?));
        }
        Ok(out)
    }

    /// Every signed-in user.
    pub fn users(&self) -> Result<Vec<User>, StoreError> {
        self.db
            .query(
                "SELECT u.id, o.name, u.issuer, u.email, u.idp_groups, u.is_admin
                 FROM users u JOIN orgs o ON o.id = u.org_id ORDER BY u.id",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(User {
                    id: r.int(0)?,
                    organisation: r.text(1)?,
                    issuer: r.text(2)?,
                    email: r.text(3)?,
                    groups: split_groups(&r.text(4)?),
                    admin: r.bool(5)?,
                })
            })
            .collect()
    }
}

/// IdP groups as stored: one per line.
fn split_groups(text: &str) -> Vec<String> {
    text.split('\n')
        .filter(|g| !g.is_empty())
        .map(str::to_string)
        .collect()
}

/// The smallest ordinal from 1 up that `used` (sorted) does not hold.
fn lowest_free(used: &[i64]) -> i64 {
    let mut next = 1;
    for &o in used {
        if o == next {
            next += 1;
        } else if o > next {
            break;
        }
    }
    next
}

fn split_tags(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// The device's IPv4 address: its organisation's /22, then its ordinal.
pub fn ipv4(org_id: i64, ordinal: i64) -> Ipv4Addr {
    let block = ((org_id - 1).max(0) as u32) << ORG_BLOCK_BITS;
    Ipv4Addr::from(CGNAT_BASE + block + ordinal as u32)
}

/// The device's IPv6 address: the deployment's ULA /48, the organisation
/// as the subnet id, the ordinal as the interface id.
pub fn ipv6(prefix: [u8; 6], org_id: i64, ordinal: i64) -> Ipv6Addr {
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&prefix);
    b[6..8].copy_from_slice(&(org_id as u16).to_be_bytes());
    b[8..].copy_from_slice(&(ordinal as u64).to_be_bytes());
    Ipv6Addr::from(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::db::MIGRATIONS;

    fn spec(org: &str, user: Option<&str>, reusable: bool) -> SetupKeySpec {
        SetupKeySpec {
            organisation: org.to_string(),
            user: user.map(str::to_string),
            tags: vec![],
            reusable,
            ttl_s: 3600,
        }
    }

    /// The same checks on each engine.
    fn enrolment(mut s: Store) {
        let k = s
            .create_setup_key(&spec("acme.com", Some("a@acme.com"), false))
            .unwrap();
        let (d, _) = s.register(&k.key, "pk1", "laptop").unwrap().unwrap();
        assert_eq!(d.ipv4, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(
            s.register(&k.key, "pk2", "laptop").unwrap(),
            Err(RegisterError::BadSetupKey)
        );
        let g = s.create_setup_key(&spec("globex.com", None, true)).unwrap();
        let (e, _) = s.register(&g.key, "pk3", "laptop").unwrap().unwrap();
        let (f, token) = s.register(&g.key, "pk4", "laptop").unwrap().unwrap();
        assert_eq!(e.ipv4, Ipv4Addr::new(100, 64, 4, 1));
        assert_eq!(
            (f.ipv4, f.hostname.as_str()),
            (Ipv4Addr::new(100, 64, 4, 2), "laptop-2")
        );
        assert_eq!(s.device_by_token(&token).unwrap(), Some(f.clone()));
        assert_eq!(
            s.register(&g.key, "pk4", "x").unwrap(),
            Err(RegisterError::KeyTaken)
        );
        assert_eq!(
            s.register("rwk_nope", "pk5", "x").unwrap(),
            Err(RegisterError::BadSetupKey)
        );
        let serial = s.serial().unwrap();
        assert!(s.revoke_device(e.id).unwrap());
        assert!(s.serial().unwrap() > serial);
        assert!(!s.revoke_device(e.id).unwrap());
        assert!(s.device(e.id).unwrap().unwrap().revoked);
        // The revoked device's address is not handed out again.
        let (h, _) = s.register(&g.key, "pk6", "h").unwrap().unwrap();
        assert_eq!(h.ipv4, Ipv4Addr::new(100, 64, 4, 3));
        assert_eq!(d.ipv6.segments()[0] & 0xff00, 0xfd00);
        assert_eq!(h.ipv6.segments()[3], 2);
        assert_eq!(s.devices(Some(e.org_id)).unwrap().len(), 3);
        assert!(matches!(
            s.set_policy("nobody.example", "{}"),
            Err(StoreError::NoOrganisation(_))
        ));
        s.set_policy("globex.com", "{\"acls\": []}").unwrap();
        s.set_policy("globex.com", "{}").unwrap();
        let org = s.organisation("globex.com").unwrap().unwrap();
        assert_eq!(s.policy(org).unwrap().as_deref(), Some("{}"));
        let mut sp = spec("acme.com", None, true);
        sp.ttl_s = -1;
        let k = s.create_setup_key(&sp).unwrap();
        assert_eq!(
            s.register(&k.key, "pk7", "x").unwrap(),
            Err(RegisterError::BadSetupKey)
        );
    }

    /// Endpoints are stored per device; the serial moves only on change.
    fn endpoints(mut s: Store) {
        let k = s.create_setup_key(&spec("acme.com", None, true)).unwrap();
        let (a, _) = s.register(&k.key, "pk1", "a").unwrap().unwrap();
        let (b, _) = s.register(&k.key, "pk2", "b").unwrap().unwrap();
        let list = vec!["10.0.0.1:41641".to_string(), "192.0.2.1:41641".to_string()];
        let serial = s.serial().unwrap();
        assert!(s.set_endpoints(a.id, &list).unwrap());
        assert!(s.serial().unwrap() > serial);
        let serial = s.serial().unwrap();
        assert!(!s.set_endpoints(a.id, &list).unwrap());
        assert_eq!(s.serial().unwrap(), serial);
        let e = s.endpoints(a.org_id).unwrap();
        assert_eq!(e.get(&a.id), Some(&list));
        assert_eq!(e.get(&b.id), None);
        assert!(s.set_endpoints(a.id, &[]).unwrap());
        assert_eq!(s.endpoints(a.org_id).unwrap().get(&a.id), Some(&vec![]));
    }

    /// Two replicas (two connections) enrol at once with one reusable
    /// key and one hostname: every device gets its own address and name.
    /// Advertised routes replace each other; decisions stay.
    fn routes(mut s: Store) {
        let k = s.create_setup_key(&spec("acme.com", None, false)).unwrap();
        let (a, _) = s.register(&k.key, "pk-routes", "c").unwrap().unwrap();
        let list = vec!["10.0.5.0/24".to_string(), "10.0.6.0/24".to_string()];
        assert!(s.set_routes(a.id, &list).unwrap());
        let serial = s.serial().unwrap();
        assert!(!s.set_routes(a.id, &list).unwrap());
        assert_eq!(s.serial().unwrap(), serial);
        assert!(s.decide_route(a.id, "10.0.5.0/24", "approved").unwrap());
        assert!(!s.decide_route(a.id, "10.0.5.0/24", "approved").unwrap());
        assert!(s.set_routes(a.id, &list[1..]).unwrap());
        let r = &s.routes(Some(a.org_id)).unwrap()[&a.id];
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].route.as_str(), r[0].advertised, r[0].decision.as_str()),
            ("10.0.5.0/24", false, "approved")
        );
        assert_eq!((r[1].advertised, r[1].decision.as_str()), (true, ""));
    }

    fn concurrent(open: impl Fn() -> Store) {
        let key = open()
            .create_setup_key(&spec("acme.com", None, true))
            .unwrap()
            .key;
        let threads: Vec<_> = (0..2)
            .map(|r| {
                let (mut s, key) = (open(), key.clone());
                std::thread::spawn(move || {
                    (0..8)
                        .map(|i| {
                            let (d, _) = s
                                .register(&key, &format!("pk-{r}-{i}"), "laptop")
                                .unwrap()
                                .unwrap();
                            (d.ipv4, d.hostname)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<_> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let addrs: std::collections::HashSet<_> = all.iter().map(|d| d.0).collect();
        let names: std::collections::HashSet<_> = all.iter().map(|d| d.1.clone()).collect();
        assert_eq!((addrs.len(), names.len()), (16, 16), "{all:?}");
        assert_eq!(open().devices(None).unwrap().len(), 16);
    }

    #[test]
    fn sqlite_enrols_allocates_and_revokes() {
        let dir = tempfile::tempdir().unwrap();
        enrolment(Store::open(dir.path()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        sso_logins(Store::open(dir.path()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        endpoints(Store::open(dir.path()).unwrap());
        let routes_dir = tempfile::tempdir().unwrap();
        routes(Store::open(routes_dir.path()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        concurrent(|| Store::open(dir.path()).unwrap());
        // Opening again finds the schema current.
        let mut db = Db::open_sqlite(&dir.path().join(DB_FILE)).unwrap();
        assert_eq!(db.migrate().unwrap(), MIGRATIONS.len() as i64);
        // A preview database (no schema_version) is adopted as version 1
        // with its rows.
        let dir = tempfile::tempdir().unwrap();
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch(
            "CREATE TABLE orgs (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
             INSERT INTO orgs (name) VALUES ('acme.com');",
        )
        .unwrap();
        drop(conn);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.organisation("acme.com").unwrap(), Some(1));
        assert_eq!(s.serial().unwrap(), 0);
    }

    #[test]
    fn postgres_passes_the_same_tests_with_two_writers() {
        if !test_postgres::opted_in("postgres store test") {
            return;
        }
        let pg = test_postgres::Postgres::start();
        let connect = |url: &str| {
            let url = crate::control::config::PostgresUrl::parse(url).unwrap();
            Store::connect(&Database::Postgres(url), Path::new("/nonexistent")).unwrap()
        };
        enrolment(connect(&pg.create_db("enrolment")));
        sso_logins(connect(&pg.create_db("logins")));
        endpoints(connect(&pg.create_db("endpoints")));
        routes(connect(&pg.create_db("routes")));
        let url = pg.create_db("concurrent");
        concurrent(|| connect(&url));
        let url = crate::control::config::PostgresUrl::parse(&url).unwrap();
        let mut db = Db::connect_postgres(&url).unwrap();
        assert_eq!(db.migrate().unwrap(), MIGRATIONS.len() as i64);
    }

    fn login(email: &str, sub: &str, key: &str, expires_at: i64) -> Login {
        Login {
            issuer: "https://idp.example".into(),
            subject: sub.into(),
            email: email.into(),
            org_key: key.into(),
            org_name: key.trim_start_matches("sub:").into(),
            groups: vec!["eng".into()],
            admin: false,
            expires_at,
        }
    }

    /// Logins share an organisation by (issuer, key), renew the same
    /// device, refuse another user's key, and expire.
    fn sso_logins(mut s: Store) {
        let later = now() + 3600;
        let (a, t1) = s
            .login_device(
                &login("alice@acme.com", "1", "acme.com", later),
                "pka",
                "lap",
            )
            .unwrap()
            .unwrap();
        let (b, _) = s
            .login_device(&login("bob@acme.com", "2", "acme.com", later), "pkb", "lap")
            .unwrap()
            .unwrap();
        assert_eq!((a.org_id, b.hostname.as_str()), (b.org_id, "lap-2"));
        assert_eq!(s.user_groups(a.org_id).unwrap()["bob@acme.com"], ["eng"]);
        // Bob cannot take Alice's key; Alice renewing keeps the device.
        assert_eq!(
            s.login_device(&login("bob@acme.com", "2", "acme.com", later), "pka", "x")
                .unwrap(),
            Err(RegisterError::KeyTaken)
        );
        let (a2, t2) = s
            .login_device(&login("alice@acme.com", "1", "acme.com", later), "pka", "x")
            .unwrap()
            .unwrap();
        assert_eq!(a2.id, a.id);
        assert!(s.device_by_token(&t1).unwrap().is_none());
        assert_eq!(s.device_by_token(&t2).unwrap().unwrap().id, a.id);
        // Another issuer's acme.com is another organisation.
        let mut other = login("eve@acme.com", "3", "acme.com", later);
        other.issuer = "https://other.example".into();
        let (e, _) = s.login_device(&other, "pke", "e").unwrap().unwrap();
        assert_ne!(e.org_id, a.org_id);
        assert_eq!(e.organisation, "acme.com-2");
        assert!(!s.login_expired(b.id).unwrap());
        let (c, _) = s
            .login_device(&login("c@gmail.com", "4", "sub:4", now() - 1), "pkc", "c")
            .unwrap()
            .unwrap();
        assert!(s.login_expired(c.id).unwrap());
        let serial = s.serial().unwrap();
        assert_eq!(s.expire_logins(now()).unwrap(), 1);
        assert!(s.serial().unwrap() > serial);
        assert_eq!(s.expired_devices(c.org_id).unwrap(), [c.id]);
        assert_eq!(s.users().unwrap().len(), 4);
    }
}

#[cfg(test)]
#[path = "../../tests/common/postgres.rs"]
pub(super) mod test_postgres;
