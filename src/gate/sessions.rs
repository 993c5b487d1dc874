//! Server-side sessions in SQLite (`<state-dir>/sessions.sqlite3`, 0600).
//! The cookie holds a 256-bit secret; the database only its SHA-256. A
//! session ends at its absolute expiry, after `session-idle` without use,
//! at logout, or at start when its address is no longer allowed.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use super::tokens;

/// Writes of `last_seen` are skipped when the stored one is this recent.
const TOUCH_GRANULARITY: u64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("session store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A live session as the proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// SHA-256 of the cookie secret (the row key; binds the logout CSRF).
    pub id: String,
    pub email: String,
}

pub struct SessionStore {
    path: PathBuf,
    conn: Mutex<Connection>,
    ttl: Duration,
    idle: Duration,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl SessionStore {
    /// Open (creating) the database in `state_dir` (created 0700), with the
    /// file forced to 0600.
    pub fn open(state_dir: &Path, ttl: Duration, idle: Duration) -> Result<Self, StoreError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(io(state_dir))?;
        let path = state_dir.join("sessions.sqlite3");
        // Create the file 0600 before SQLite opens it.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode_0600()
            .open(&path)
            .map_err(io(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io(&path))?;
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(sql)?;
        conn.execute_batch(
            "PRAGMA journal_mode = DELETE;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS sessions (
                 id TEXT PRIMARY KEY,
                 email TEXT NOT NULL,
                 created INTEGER NOT NULL,
                 last_seen INTEGER NOT NULL,
                 expires INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS meta (
                 key TEXT PRIMARY KEY,
                 value BLOB NOT NULL
             );",
        )
        .map_err(sql)?;
        Ok(SessionStore {
            path,
            conn: Mutex::new(conn),
            ttl,
            idle,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        crate::sync::lock(&self.conn)
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// The 32-byte key for CSRF tokens, made once and kept across restarts
    /// (so a page served before a restart still submits).
    pub fn csrf_key(&self) -> Result<Vec<u8>, StoreError> {
        let conn = self.conn();
        let existing: Option<Vec<u8>> = conn
            .query_row("SELECT value FROM meta WHERE key = 'csrf-key'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.sql())?;
        if let Some(k) = existing.filter(|k| k.len() == 32) {
            return Ok(k);
        }
        let mut key = vec![0u8; 32];
        rand::Rng::fill(&mut rand::rng(), key.as_mut_slice());
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('csrf-key', ?1)",
            params![key],
        )
        .map_err(self.sql())?;
        Ok(key)
    }

    /// Create a session for `email`; returns the cookie secret.
    pub fn create(&self, email: &str) -> Result<String, StoreError> {
        let secret = tokens::new_secret();
        let now = unix_now();
        self.conn()
            .execute(
                "INSERT INTO sessions (id, email, created, last_seen, expires) VALUES (?1, ?2, ?3, ?3, ?4)",
                params![
                    tokens::digest(&secret),
                    email,
                    now as i64,
                    (now + self.ttl.as_secs()) as i64
                ],
            )
            .map_err(self.sql())?;
        Ok(secret)
    }

    /// The live session for a cookie secret, refreshing its idle timer.
    pub fn lookup(&self, secret: &str) -> Result<Option<Session>, StoreError> {
        if !tokens::looks_like_secret(secret) {
            return Ok(None);
        }
        let id = tokens::digest(secret);
        let now = unix_now() as i64;
        let conn = self.conn();
        let row: Option<(String, i64, i64)> = conn
            .query_row(
                "SELECT email, last_seen, expires FROM sessions WHERE id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(self.sql())?;
        let Some((email, last_seen, expires)) = row else {
            return Ok(None);
        };
        if now >= expires || now - last_seen >= self.idle.as_secs() as i64 {
            conn.execute("DELETE FROM sessions WHERE id = ?1", params![id])
                .map_err(self.sql())?;
            return Ok(None);
        }
        if now - last_seen >= TOUCH_GRANULARITY as i64 {
            conn.execute(
                "UPDATE sessions SET last_seen = ?2 WHERE id = ?1",
                params![id, now],
            )
            .map_err(self.sql())?;
        }
        Ok(Some(Session { id, email }))
    }

    /// End one session (logout).
    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM sessions WHERE id = ?1", params![id])
            .map_err(self.sql())?;
        Ok(())
    }

    /// Drop expired sessions and those whose address `allowed` rejects.
    /// Returns how many were revoked because the address is no longer
    /// allowed.
    pub fn sweep(&self, allowed: impl Fn(&str) -> bool) -> Result<usize, StoreError> {
        let now = unix_now() as i64;
        let conn = self.conn();
        conn.execute(
            "DELETE FROM sessions WHERE expires <= ?1 OR last_seen <= ?2",
            params![now, now - self.idle.as_secs() as i64],
        )
        .map_err(self.sql())?;
        let rows: Vec<(String, String)> = {
            let mut stmt = conn
                .prepare("SELECT id, email FROM sessions")
                .map_err(self.sql())?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(self.sql())?
                .collect::<Result<_, _>>()
                .map_err(self.sql())?
        };
        let mut revoked = 0;
        for (id, email) in rows {
            if !allowed(&email) {
                conn.execute("DELETE FROM sessions WHERE id = ?1", params![id])
                    .map_err(self.sql())?;
                revoked += 1;
            }
        }
        Ok(revoked)
    }
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> SessionStore {
        SessionStore::open(dir, Duration::from_secs(3600), Duration::from_secs(600)).unwrap()
    }

    #[test]
    fn sessions_persist_across_reopen_and_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = store(dir.path()).create("a@example.com").unwrap();
        let reopened = store(dir.path());
        let s = reopened.lookup(&secret).unwrap().unwrap();
        assert_eq!(s.email, "a@example.com");
        assert_eq!(s.id, tokens::digest(&secret));
        let mode = std::fs::metadata(dir.path().join("sessions.sqlite3"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(reopened.lookup("x").unwrap().is_none());
        assert!(reopened.lookup(&tokens::new_secret()).unwrap().is_none());
        assert_eq!(
            reopened.csrf_key().unwrap(),
            store(dir.path()).csrf_key().unwrap()
        );
    }

    #[test]
    fn logout_and_sweep_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let a = s.create("a@example.com").unwrap();
        let b = s.create("b@example.com").unwrap();
        assert_eq!(s.sweep(|e| e == "a@example.com").unwrap(), 1);
        assert!(s.lookup(&b).unwrap().is_none());
        let sa = s.lookup(&a).unwrap().unwrap();
        s.delete(&sa.id).unwrap();
        assert!(s.lookup(&a).unwrap().is_none());
    }

    #[test]
    fn expired_sessions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s =
            SessionStore::open(dir.path(), Duration::from_secs(0), Duration::from_secs(0)).unwrap();
        let a = s.create("a@example.com").unwrap();
        assert!(s.lookup(&a).unwrap().is_none());
    }
}
