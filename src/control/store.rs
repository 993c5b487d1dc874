//! The control plane's storage: organisations, setup keys, devices and
//! policies in SQLite (`control.db` in the state dir, mode 0600). Every
//! change bumps one serial in the same transaction; the running control
//! server watches that serial, so a change made by an admin command in
//! another process reaches connected devices too.
//!
//! Secrets (setup keys, device tokens) are stored only as SHA-256 hashes.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

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
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS orgs (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS setup_keys (
    id INTEGER PRIMARY KEY, org_id INTEGER NOT NULL REFERENCES orgs(id),
    hash BLOB NOT NULL UNIQUE, user TEXT, tags TEXT NOT NULL,
    reusable INTEGER NOT NULL, expires_at INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0, uses INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS devices (
    id INTEGER PRIMARY KEY, org_id INTEGER NOT NULL REFERENCES orgs(id),
    user TEXT, hostname TEXT NOT NULL, public_key TEXT NOT NULL UNIQUE,
    token_hash BLOB NOT NULL UNIQUE, tags TEXT NOT NULL, ordinal INTEGER NOT NULL,
    created_at INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0,
    UNIQUE (org_id, hostname), UNIQUE (org_id, ordinal));
CREATE TABLE IF NOT EXISTS policies (
    org_id INTEGER PRIMARY KEY REFERENCES orgs(id), text TEXT NOT NULL);
";

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

impl Store {
    /// Open (creating) the database in `state_dir` (0700), file 0600.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        fsutil::ensure_dir(state_dir, 0o700).map_err(|error| StoreError::StateDir {
            path: state_dir.display().to_string(),
            error,
        })?;
        let path = state_dir.join(DB_FILE);
        let open_err = |error| StoreError::Open {
            path: path.display().to_string(),
            error,
        };
        let conn = Connection::open(&path).map_err(open_err)?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        conn.execute_batch(SCHEMA_LOGIN).map_err(open_err)?;
        let store = Self { conn };
        store.ula_prefix()?;
        Ok(store)
    }

    /// The serial: bumped by every change.
    pub fn serial(&self) -> Result<u64, StoreError> {
        let v: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'serial'", [], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    fn bump(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('serial', '1')
             ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
            [],
        )?;
        Ok(())
    }

    /// This deployment's IPv6 ULA /48 (random global ID, RFC 4193), made
    /// once.
    fn ula_prefix(&self) -> Result<[u8; 6], StoreError> {
        let v: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'ula'", [], |r| r.get(0))
            .optional()?;
        let parse = |s: &str| -> Option<[u8; 6]> {
            let b: Vec<u8> = (0..6)
                .map(|i| u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok())
                .collect::<Option<_>>()?;
            b.try_into().ok()
        };
        if let Some(p) = v.as_deref().and_then(parse) {
            return Ok(p);
        }
        let mut p: [u8; 6] = rand::random();
        p[0] = 0xfd;
        let text: String = p.iter().map(|b| format!("{b:02x}")).collect();
        self.conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('ula', ?1)",
            params![text],
        )?;
        let v: String =
            self.conn
                .query_row("SELECT value FROM meta WHERE key = 'ula'", [], |r| r.get(0))?;
        Ok(parse(&v).unwrap_or(p))
    }

    fn org_id(tx: &rusqlite::Transaction<'_>, name: &str, create: bool) -> Result<i64, StoreError> {
        if let Some(id) = tx
            .query_row("SELECT id FROM orgs WHERE name = ?1", params![name], |r| {
                r.get(0)
            })
            .optional()?
        {
            return Ok(id);
        }
        if !create {
            return Err(StoreError::NoOrganisation(name.to_string()));
        }
        tx.execute("INSERT INTO orgs (name) VALUES (?1)", params![name])?;
        let id = tx.last_insert_rowid();
        if id > ORG_BLOCKS {
            return Err(StoreError::OrganisationsFull);
        }
        Ok(id)
    }

    /// Create a setup key; the secret is returned once and stored hashed.
    pub fn create_setup_key(&mut self, spec: &SetupKeySpec) -> Result<NewSetupKey, StoreError> {
        let key = new_secret("rwk_");
        let tx = self.conn.transaction()?;
        let org = Self::org_id(&tx, &spec.organisation, true)?;
        tx.execute(
            "INSERT INTO setup_keys (org_id, hash, user, tags, reusable, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                org,
                hash(&key),
                spec.user,
                spec.tags.join(","),
                spec.reusable,
                now() + spec.ttl_s
            ],
        )?;
        let id = tx.last_insert_rowid();
        Self::bump(&tx)?;
        tx.commit()?;
        Ok(NewSetupKey {
            id,
            key,
            organisation: spec.organisation.clone(),
        })
    }

    /// Enrol a device with a setup key. Returns the device and its bearer
    /// token (shown once, stored hashed).
    pub fn register(
        &mut self,
        setup_key: &str,
        public_key: &str,
        hostname: &str,
    ) -> Result<Result<(Device, String), RegisterError>, StoreError> {
        let prefix = self.ula_prefix()?;
        let tx = self.conn.transaction()?;
        let found: Option<(i64, i64, Option<String>, String, bool, i64)> = tx
            .query_row(
                "SELECT id, org_id, user, tags, reusable, uses FROM setup_keys
                 WHERE hash = ?1 AND revoked = 0 AND expires_at > ?2",
                params![hash(setup_key), now()],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .optional()?;
        let Some((key_id, org_id, user, tags, reusable, uses)) = found else {
            return Ok(Err(RegisterError::BadSetupKey));
        };
        if !reusable && uses > 0 {
            return Ok(Err(RegisterError::BadSetupKey));
        }
        let taken: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM devices WHERE public_key = ?1)",
            params![public_key],
            |r| r.get(0),
        )?;
        if taken {
            return Ok(Err(RegisterError::KeyTaken));
        }
        let org_name: String = tx.query_row(
            "SELECT name FROM orgs WHERE id = ?1",
            params![org_id],
            |r| r.get(0),
        )?;
        // The lowest free ordinal: addresses of revoked devices stay
        // reserved, so an old address never names a new device.
        let used: Vec<i64> = tx
            .prepare("SELECT ordinal FROM devices WHERE org_id = ?1 ORDER BY ordinal")?
            .query_map(params![org_id], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let ordinal = lowest_free(&used);
        if ordinal > (1 << ORG_BLOCK_BITS) - 2 {
            return Err(StoreError::BlockFull(org_name));
        }
        // A hostname unique in the organisation: name, name-2, name-3…
        let mut name = hostname.to_string();
        let mut n = 1;
        while tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM devices WHERE org_id = ?1 AND hostname = ?2)",
            params![org_id, name],
            |r| r.get::<_, bool>(0),
        )? {
            n += 1;
            name = format!("{hostname}-{n}");
        }
        let token = new_secret("rwt_");
        tx.execute(
            "INSERT INTO devices (org_id, user, hostname, public_key, token_hash, tags, ordinal, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![org_id, user, name, public_key, hash(&token), tags, ordinal, now()],
        )?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "UPDATE setup_keys SET uses = uses + 1 WHERE id = ?1",
            params![key_id],
        )?;
        Self::bump(&tx)?;
        tx.commit()?;
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
    }

    fn device_rows(
        &self,
        filter: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<Device>, StoreError> {
        let prefix = self.ula_prefix()?;
        let sql = format!(
            "SELECT d.id, d.org_id, o.name, d.user, d.hostname, d.public_key, d.tags, d.ordinal, d.revoked
             FROM devices d JOIN orgs o ON o.id = d.org_id {filter} ORDER BY d.id"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(args, |r| {
            let org_id: i64 = r.get(1)?;
            let ordinal: i64 = r.get(7)?;
            Ok(Device {
                id: r.get(0)?,
                org_id,
                organisation: r.get(2)?,
                user: r.get(3)?,
                hostname: r.get(4)?,
                public_key: r.get(5)?,
                tags: split_tags(&r.get::<_, String>(6)?),
                ipv4: ipv4(org_id, ordinal),
                ipv6: ipv6(prefix, org_id, ordinal),
                revoked: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The device a bearer token belongs to (revoked ones included).
    pub fn device_by_token(&self, token: &str) -> Result<Option<Device>, StoreError> {
        let h = hash(token);
        Ok(self
            .device_rows("WHERE d.token_hash = ?1", &[&h])?
            .into_iter()
            .next())
    }

    /// One device by id.
    #[cfg(test)]
    pub fn device(&self, id: i64) -> Result<Option<Device>, StoreError> {
        Ok(self
            .device_rows("WHERE d.id = ?1", &[&id])?
            .into_iter()
            .next())
    }

    /// Every device of one organisation, or of all.
    pub fn devices(&self, org_id: Option<i64>) -> Result<Vec<Device>, StoreError> {
        match org_id {
            Some(o) => self.device_rows("WHERE d.org_id = ?1", &[&o]),
            None => self.device_rows("", &[]),
        }
    }

    /// Revoke a device; false if there is none with that id.
    pub fn revoke_device(&mut self, id: i64) -> Result<bool, StoreError> {
        let tx = self.conn.transaction()?;
        let n = tx.execute(
            "UPDATE devices SET revoked = 1 WHERE id = ?1 AND revoked = 0",
            params![id],
        )?;
        if n > 0 {
            Self::bump(&tx)?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    /// Replace an organisation's policy (validated by the caller).
    pub fn set_policy(&mut self, organisation: &str, text: &str) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let org = Self::org_id(&tx, organisation, false)?;
        tx.execute(
            "INSERT INTO policies (org_id, text) VALUES (?1, ?2)
             ON CONFLICT(org_id) DO UPDATE SET text = excluded.text",
            params![org, text],
        )?;
        Self::bump(&tx)?;
        tx.commit()?;
        Ok(())
    }

    /// An organisation's policy text, if one was set.
    pub fn policy(&self, org_id: i64) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT text FROM policies WHERE org_id = ?1",
                params![org_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The id of an organisation by name.
    pub fn organisation(&self, name: &str) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT id FROM orgs WHERE name = ?1", params![name], |r| {
                r.get(0)
            })
            .optional()?)
    }
}

/// SSO sign-in (added with `[control.oidc]`): users as the IdP knows
/// them, which organisation an (issuer, key) pair forms, and which login
/// each signed-in device's key hangs on (and when it expires). Plain
/// INTEGER/TEXT columns only, so the same statements suit PostgreSQL.
const SCHEMA_LOGIN: &str = "
CREATE TABLE IF NOT EXISTS oidc_orgs (
    issuer TEXT NOT NULL, org_key TEXT NOT NULL,
    org_id INTEGER NOT NULL REFERENCES orgs(id), PRIMARY KEY (issuer, org_key));
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY, issuer TEXT NOT NULL, subject TEXT NOT NULL,
    email TEXT NOT NULL, org_id INTEGER NOT NULL REFERENCES orgs(id),
    idp_groups TEXT NOT NULL, is_admin INTEGER NOT NULL, last_login INTEGER NOT NULL,
    UNIQUE (issuer, subject));
CREATE TABLE IF NOT EXISTS device_logins (
    device_id INTEGER PRIMARY KEY REFERENCES devices(id),
    user_id INTEGER NOT NULL REFERENCES users(id),
    expires_at INTEGER NOT NULL, expired INTEGER NOT NULL DEFAULT 0);
";

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
    fn login_org(tx: &rusqlite::Transaction<'_>, login: &Login) -> Result<i64, StoreError> {
        if let Some(id) = tx
            .query_row(
                "SELECT org_id FROM oidc_orgs WHERE issuer = ?1 AND org_key = ?2",
                params![login.issuer, login.org_key],
                |r| r.get(0),
            )
            .optional()?
        {
            return Ok(id);
        }
        let mut name = login.org_name.clone();
        let mut n = 1;
        let id = loop {
            let existing: Option<i64> = tx
                .query_row("SELECT id FROM orgs WHERE name = ?1", params![name], |r| {
                    r.get(0)
                })
                .optional()?;
            match existing {
                None => break Self::org_id(tx, &name, true)?,
                Some(id) => {
                    let mapped: bool = tx.query_row(
                        "SELECT EXISTS (SELECT 1 FROM oidc_orgs WHERE org_id = ?1)",
                        params![id],
                        |r| r.get(0),
                    )?;
                    if !mapped {
                        break id;
                    }
                }
            }
            n += 1;
            name = format!("{}-{n}", login.org_name);
        };
        tx.execute(
            "INSERT INTO oidc_orgs (issuer, org_key, org_id) VALUES (?1, ?2, ?3)",
            params![login.issuer, login.org_key, id],
        )?;
        Ok(id)
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
        let tx = self.conn.transaction()?;
        let org_id = Self::login_org(&tx, login)?;
        let groups = login.groups.join("\n");
        tx.execute(
            "INSERT INTO users (issuer, subject, email, org_id, idp_groups, is_admin, last_login)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (issuer, subject) DO UPDATE SET email = excluded.email,
               idp_groups = excluded.idp_groups, is_admin = excluded.is_admin,
               last_login = excluded.last_login",
            params![
                login.issuer,
                login.subject,
                login.email,
                org_id,
                groups,
                login.admin,
                now()
            ],
        )?;
        let user_id: i64 = tx.query_row(
            "SELECT id FROM users WHERE issuer = ?1 AND subject = ?2",
            params![login.issuer, login.subject],
            |r| r.get(0),
        )?;
        let existing: Option<(i64, Option<i64>, i64)> = tx
            .query_row(
                "SELECT d.id, l.user_id, d.revoked FROM devices d
                 LEFT JOIN device_logins l ON l.device_id = d.id WHERE d.public_key = ?1",
                params![public_key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let token = new_secret("rwt_");
        let device_id = match existing {
            Some((id, Some(owner), 0)) if owner == user_id => {
                tx.execute(
                    "UPDATE devices SET token_hash = ?1 WHERE id = ?2",
                    params![hash(&token), id],
                )?;
                tx.execute(
                    "UPDATE device_logins SET expires_at = ?1, expired = 0 WHERE device_id = ?2",
                    params![login.expires_at, id],
                )?;
                id
            }
            Some(_) => return Ok(Err(RegisterError::KeyTaken)),
            None => {
                let used: Vec<i64> = tx
                    .prepare("SELECT ordinal FROM devices WHERE org_id = ?1 ORDER BY ordinal")?
                    .query_map(params![org_id], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                let ordinal = lowest_free(&used);
                if ordinal > (1 << ORG_BLOCK_BITS) - 2 {
                    return Err(StoreError::BlockFull(login.org_name.clone()));
                }
                let mut name = hostname.to_string();
                let mut n = 1;
                while tx.query_row(
                    "SELECT COUNT(*) FROM devices WHERE org_id = ?1 AND hostname = ?2",
                    params![org_id, name],
                    |r| r.get::<_, i64>(0),
                )? > 0
                {
                    n += 1;
                    name = format!("{hostname}-{n}");
                }
                tx.execute(
                    "INSERT INTO devices (org_id, user, hostname, public_key, token_hash, tags, ordinal, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, '', ?6, ?7)",
                    params![org_id, login.email, name, public_key, hash(&token), ordinal, now()],
                )?;
                let id = tx.last_insert_rowid();
                tx.execute(
                    "INSERT INTO device_logins (device_id, user_id, expires_at) VALUES (?1, ?2, ?3)",
                    params![id, user_id, login.expires_at],
                )?;
                id
            }
        };
        Self::bump(&tx)?;
        tx.commit()?;
        let device = self
            .device_rows("WHERE d.id = ?1", &[&device_id])?
            .into_iter()
            .next()
            .ok_or(rusqlite::Error::QueryReturnedNoRows)?;
        Ok(Ok((device, token)))
    }

    /// Mark the device keys whose login expired by `at` (Unix seconds);
    /// bumps the serial when any did, so their peers drop them. Returns
    /// how many.
    pub fn expire_logins(&mut self, at: i64) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let n = tx.execute(
            "UPDATE device_logins SET expired = 1 WHERE expired = 0 AND expires_at <= ?1",
            params![at],
        )?;
        if n > 0 {
            Self::bump(&tx)?;
        }
        tx.commit()?;
        Ok(n)
    }

    /// Whether device `id`'s key is tied to a login that has expired.
    pub fn login_expired(&self, id: i64) -> Result<bool, StoreError> {
        let v: Option<(i64, i64)> = self
            .conn
            .query_row(
                "SELECT expires_at, expired FROM device_logins WHERE device_id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(v.is_some_and(|(at, expired)| expired != 0 || at <= now()))
    }

    /// The devices of organisation `org_id` whose login has expired.
    pub fn expired_devices(&self, org_id: i64) -> Result<Vec<i64>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT l.device_id FROM device_logins l JOIN devices d ON d.id = l.device_id
             WHERE d.org_id = ?1 AND (l.expired = 1 OR l.expires_at <= ?2)",
        )?;
        let rows = stmt.query_map(params![org_id, now()], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Each signed-in user of organisation `org_id` (by email) and their
    /// IdP groups, for the policy's `group:NAME`.
    pub fn user_groups(
        &self,
        org_id: i64,
    ) -> Result<std::collections::HashMap<String, Vec<String>>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT email, idp_groups FROM users WHERE org_id = ?1")?;
        let rows = stmt.query_map(params![org_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            let (email, groups) = row?;
            let list: Vec<String> = groups
                .split('\n')
                .filter(|g| !g.is_empty())
                .map(str::to_string)
                .collect();
            out.entry(email).or_insert_with(Vec::new).extend(list);
        }
        Ok(out)
    }

    /// Every signed-in user.
    pub fn users(&self) -> Result<Vec<User>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT u.id, o.name, u.issuer, u.email, u.idp_groups, u.is_admin
             FROM users u JOIN orgs o ON o.id = u.org_id ORDER BY u.id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(User {
                id: r.get(0)?,
                organisation: r.get(1)?,
                issuer: r.get(2)?,
                email: r.get(3)?,
                groups: r
                    .get::<_, String>(4)?
                    .split('\n')
                    .filter(|g| !g.is_empty())
                    .map(str::to_string)
                    .collect(),
                admin: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
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

    #[test]
    fn single_use_keys_enrol_once_and_addresses_stay_in_the_org_block() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
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
        let (f, _) = s.register(&g.key, "pk4", "laptop").unwrap().unwrap();
        assert_eq!(e.ipv4, Ipv4Addr::new(100, 64, 4, 1));
        assert_eq!(
            (f.ipv4, f.hostname.as_str()),
            (Ipv4Addr::new(100, 64, 4, 2), "laptop-2")
        );
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
        // The revoked device's address is not handed out again.
        let (h, _) = s.register(&g.key, "pk6", "h").unwrap().unwrap();
        assert_eq!(h.ipv4, Ipv4Addr::new(100, 64, 4, 3));
        assert_eq!(d.ipv6.segments()[0] & 0xff00, 0xfd00);
        assert_eq!(h.ipv6.segments()[3], 2);
    }

    #[test]
    fn expired_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        let mut sp = spec("acme.com", None, true);
        sp.ttl_s = -1;
        let k = s.create_setup_key(&sp).unwrap();
        assert_eq!(
            s.register(&k.key, "pk1", "x").unwrap(),
            Err(RegisterError::BadSetupKey)
        );
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

    #[test]
    fn logins_share_an_org_by_key_renew_the_same_device_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
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
