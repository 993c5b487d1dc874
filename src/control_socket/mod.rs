//! The control socket: a local Unix socket (mode 0600, owned by the user
//! the instance runs as) through which `runewarp server status` and
//! `runewarp client status` read the running instance's state as JSON.
//!
//! Protocol: the caller writes one line, `status`, and reads one JSON
//! document; the instance then closes the connection.

pub mod format;

use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::sync::AbortOnDrop;

/// Callers served at once.
const CONNECTIONS: usize = 4;
/// A caller must send its request and take the answer within this time.
const DEADLINE: Duration = Duration::from_secs(5);
/// Longest request line.
const MAX_REQUEST: usize = 64;
/// Mode of the socket file.
pub(crate) const SOCKET_MODE: u32 = 0o600;

/// Builds the JSON document `status` answers.
pub(crate) type Snapshot = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// A bound control socket; the file is removed when it is dropped.
#[derive(Debug)]
pub(crate) struct ControlSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
}

impl ControlSocket {
    /// Bind `path` (mode 0600). A live socket there (another instance
    /// answers) is left alone and `None` returned; a stale one is
    /// replaced; anything else there is an error. Failures are logged and
    /// give `None`: status is a convenience, not a reason to stay down.
    pub fn bind(path: &Path, role: &str) -> Option<Self> {
        match bind(path) {
            Ok(Some(listener)) => Some(Self {
                listener: Some(listener),
                path: path.to_path_buf(),
            }),
            Ok(None) => {
                tracing::warn!(
                    event = "control_socket_in_use",
                    path = %path.display(),
                    hint = format!("another {role} answers there; give this one its own control-socket to use `{role} status` with it"),
                );
                None
            }
            Err(error) => {
                tracing::warn!(event = "control_socket_failed", path = %path.display(), error = ?error.to_string());
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answer callers with `snapshot()` until the returned guard is dropped
    /// (which also removes the socket file).
    pub fn serve(mut self, snapshot: Snapshot) -> Option<Serving> {
        let std = self.listener.take()?;
        let listener = match std
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(std))
        {
            Ok(l) => l,
            Err(error) => {
                tracing::warn!(event = "control_socket_failed", path = %self.path.display(), error = ?error.to_string());
                return None;
            }
        };
        let task = tokio::spawn(accept(listener, snapshot));
        Some(Serving {
            _task: AbortOnDrop::new(task),
            _socket: self,
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A control socket being served.
#[derive(Debug)]
pub(crate) struct Serving {
    /// Declared first: the task stops before the socket file goes.
    _task: AbortOnDrop,
    _socket: ControlSocket,
}

fn bind(path: &Path) -> io::Result<Option<UnixListener>> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // New directories are private; existing ones are left as they are.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Ok(None);
            }
            // Left behind by an instance that did not stop cleanly.
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way; remove it or choose another control-socket",
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Bind under a temporary name, restrict it, then move it into place:
    // the socket is never reachable with a wider mode.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(SOCKET_MODE))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(Some(listener))
}

async fn accept(listener: tokio::net::UnixListener, snapshot: Snapshot) {
    let listener = &listener;
    crate::sync::serve_few(
        CONNECTIONS,
        DEADLINE,
        move || async move { listener.accept().await.ok().map(|(stream, _)| stream) },
        |stream| {
            let snapshot = snapshot.clone();
            async move {
                let _ = answer(stream, snapshot).await;
            }
        },
    )
    .await
}

async fn answer(stream: tokio::net::UnixStream, snapshot: Snapshot) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader =
        tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST as u64));
    reader.read_line(&mut line).await?;
    let reply = match line.trim() {
        "status" => snapshot(),
        other => serde_json::json!({
            "error": format!("unknown request {:?}; the only request is \"status\"", other.chars().take(32).collect::<String>())
        }),
    };
    let mut bytes = serde_json::to_vec(&reply).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    write.shutdown().await
}

/// Why `status` could not read an instance.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QueryError {
    #[error(
        "no running {role} answers at {path}: {error} (is it running, with this control-socket? pass --socket or -c to point at it)"
    )]
    Connect {
        role: String,
        path: PathBuf,
        error: io::Error,
    },
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("{path}: the answer is not a status document: {error}")]
    Parse {
        path: PathBuf,
        error: serde_json::Error,
    },
}

/// Ask the instance at `path` for its status.
pub(crate) fn query(path: &Path, role: &str) -> Result<serde_json::Value, QueryError> {
    let mut stream = UnixStream::connect(path).map_err(|error| QueryError::Connect {
        role: role.to_string(),
        path: path.to_path_buf(),
        error,
    })?;
    let io_err = |error| QueryError::Io {
        path: path.to_path_buf(),
        error,
    };
    stream.set_read_timeout(Some(DEADLINE)).map_err(io_err)?;
    stream.set_write_timeout(Some(DEADLINE)).map_err(io_err)?;
    stream.write_all(b"status\n").map_err(io_err)?;
    let mut text = String::new();
    stream
        .take(16 << 20)
        .read_to_string(&mut text)
        .map_err(io_err)?;
    serde_json::from_str(&text).map_err(|error| QueryError::Parse {
        path: path.to_path_buf(),
        error,
    })
}

/// A `status` answer: what every role says about its process (role,
/// version, pid, start and uptime at `now`, its certificates' notAfter in
/// Unix seconds), then the role's `fields`.
pub fn status_answer(
    role: &str,
    started: std::time::SystemTime,
    now: std::time::SystemTime,
    certificates: &[(String, i64)],
    fields: serde_json::Value,
) -> serde_json::Value {
    let uptime = now
        .duration_since(started)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut answer = serde_json::json!({
        "role": role,
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "started_at": unix(started),
        "uptime_s": uptime,
        "certificates": certificates
            .iter()
            .map(|(hostname, not_after)| serde_json::json!({"hostname": hostname, "not_after": not_after}))
            .collect::<Vec<_>>(),
    });
    if let (serde_json::Value::Object(answer), serde_json::Value::Object(fields)) =
        (&mut answer, fields)
    {
        answer.extend(fields);
    }
    answer
}

/// Seconds since the Unix epoch.
pub fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_is_private_answers_status_and_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/test.sock");
        let socket = ControlSocket::bind(&path, "server").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(dir.path().join("run"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        // A second instance leaves a live socket alone.
        assert!(ControlSocket::bind(&path, "server").is_none());
        let serving = socket
            .serve(Arc::new(|| serde_json::json!({"role": "server"})))
            .unwrap();
        let p = path.clone();
        let v = tokio::task::spawn_blocking(move || query(&p, "server"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v["role"], "server");
        drop(serving);
        assert!(!path.exists());
        // A stale socket file is replaced.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(ControlSocket::bind(&path, "server").is_some());
        // Anything else in the way is not deleted.
        std::fs::write(&path, b"keep me").unwrap();
        assert!(ControlSocket::bind(&path, "server").is_none());
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }
}
