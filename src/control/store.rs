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
            // The lowest free ordinal: addresses of revoked devices stay
            // reserved, so an old address never names a new device.
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
                return Err(StoreError::BlockFull(org_name));
            }
            // A hostname unique in the organisation: name, name-2, name-3…
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
            let token = new_secret("rwt_");
            let row = tx.query_opt(
                r#"INSERT INTO devices (org_id, "user", hostname, public_key, token_hash, tags, ordinal, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id"#,
                &[
                    Arg::Int(org_id),
                    Arg::OptText(user.as_deref()),
                    Arg::Text(&name),
                    Arg::Text(public_key),
                    Arg::Blob(&hash(&token)),
                    Arg::Text(&tags),
                    Arg::Int(ordinal),
                    Arg::Int(now()),
                ],
            )?;
            let id = match row {
                Some(r) => r.int(0)?,
                None => return Err(StoreError::Decode("INSERT returned no id".into())),
            };
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

    /// Two replicas (two connections) enrol at once with one reusable
    /// key and one hostname: every device gets its own address and name.
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
        concurrent(|| Store::open(dir.path()).unwrap());
        // Opening again finds the schema current.
        let mut db = Db::open_sqlite(&dir.path().join(DB_FILE)).unwrap();
        assert_eq!(db.migrate().unwrap(), 1);
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
        if std::env::var_os("RUNEWARP_TEST_EXTERNAL").is_none_or(|v| v != "1") {
            eprintln!(
                "SKIPPED postgres store test: needs PostgreSQL; set RUNEWARP_TEST_EXTERNAL=1"
            );
            return;
        }
        let pg = test_postgres::Postgres::start();
        let connect = |url: &str| {
            let url = crate::control::config::PostgresUrl::parse(url).unwrap();
            Store::connect(&Database::Postgres(url), Path::new("/nonexistent")).unwrap()
        };
        enrolment(connect(&pg.create_db("enrolment")));
        let url = pg.create_db("concurrent");
        concurrent(|| connect(&url));
        let url = crate::control::config::PostgresUrl::parse(&url).unwrap();
        let mut db = Db::connect_postgres(&url).unwrap();
        assert_eq!(db.migrate().unwrap(), 1);
    }
}

#[cfg(test)]
#[path = "../../tests/common/postgres.rs"]
mod test_postgres;
