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
CREATE TABLE IF NOT EXISTS device_endpoints (
    device_id INTEGER PRIMARY KEY REFERENCES devices(id), endpoints TEXT NOT NULL);
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

    /// Replace a device's reported endpoints (`IP:PORT`, best first; the
    /// caller validates them). The serial moves only when they changed, so
    /// a device re-reporting the same list wakes nobody.
    pub fn set_endpoints(
        &mut self,
        device_id: i64,
        endpoints: &[String],
    ) -> Result<bool, StoreError> {
        let text = endpoints.join(",");
        let tx = self.conn.transaction()?;
        let old: Option<String> = tx
            .query_row(
                "SELECT endpoints FROM device_endpoints WHERE device_id = ?1",
                params![device_id],
                |r| r.get(0),
            )
            .optional()?;
        if old.as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        tx.execute(
            "DELETE FROM device_endpoints WHERE device_id = ?1",
            params![device_id],
        )?;
        tx.execute(
            "INSERT INTO device_endpoints (device_id, endpoints) VALUES (?1, ?2)",
            params![device_id, text],
        )?;
        Self::bump(&tx)?;
        tx.commit()?;
        Ok(true)
    }

    /// The reported endpoints of an organisation's devices, by device id.
    pub fn endpoints(
        &self,
        org_id: i64,
    ) -> Result<std::collections::HashMap<i64, Vec<String>>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT e.device_id, e.endpoints FROM device_endpoints e
             JOIN devices d ON d.id = e.device_id WHERE d.org_id = ?1",
        )?;
        let rows = stmt.query_map(params![org_id], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            let (id, text) = row?;
            out.insert(id, split_tags(&text));
        }
        Ok(out)
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
    fn endpoints_are_stored_per_device_and_move_the_serial_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
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
}
