//! Crash-safe file writes for key and certificate material.
//!
//! Every write goes to a fresh temporary file in the target's directory
//! (created with `O_EXCL` and the final mode from the start), is fsynced,
//! and is then moved into place with a single `rename` (or `link`), after
//! which the directory itself is fsynced. A reader, or a crash, therefore
//! sees either the complete old file or the complete new one, never a torn
//! mix, and a private key is never readable by others, not even briefly.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Mode of private key files.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode of certificate and other public files.
pub(crate) const CERT_MODE: u32 = 0o644;
/// Mode of `state/` directories (they hold CA keys).
pub(crate) const STATE_DIR_MODE: u32 = 0o700;
/// Mode of a newly created material directory.
pub(crate) const MATERIAL_DIR_MODE: u32 = 0o755;

/// Atomically replace (or create) `path` with `bytes`, giving it `mode`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = write_temp(path, bytes, mode)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(path)
}

/// Atomically create `path` with `bytes` and `mode`; fails with
/// [`io::ErrorKind::AlreadyExists`] (and leaves the existing file untouched)
/// if `path` already exists.
///
/// The complete temporary file is hard-linked to `path`; `link(2)` never
/// replaces an existing name, so this is race-free. On file systems without
/// hard links it falls back to "check, then rename", where a file created
/// by someone else between the check and the rename would be replaced.
pub(crate) fn write_new_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    if fs::symlink_metadata(path).is_ok() {
        return Err(already_exists(path));
    }
    let tmp = write_temp(path, bytes, mode)?;
    let linked = fs::hard_link(&tmp, path);
    let result = match linked {
        Ok(()) => {
            let _ = fs::remove_file(&tmp);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let _ = fs::remove_file(&tmp);
            Err(already_exists(path))
        }
        Err(e) if links_unsupported(&e) => {
            // Fallback (racy, see above).
            if fs::symlink_metadata(path).is_ok() {
                let _ = fs::remove_file(&tmp);
                Err(already_exists(path))
            } else {
                fs::rename(&tmp, path).inspect_err(|_| {
                    let _ = fs::remove_file(&tmp);
                })
            }
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    };
    result?;
    sync_parent(path)
}

/// A private directory (`state/`, an ACME `state-dir`): the parents are
/// created as usual, the directory itself with `mode` from the start
/// (`mkdir(path, mode)`, never a wider mode first). An existing directory
/// with a looser mode is tightened to `mode`, with a warning. A symbolic
/// link at `path` is refused: whoever can write the link's directory could
/// otherwise redirect the keys anywhere.
pub(crate) fn create_dir_private(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    check_not_symlink(path)?;
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        fs::create_dir_all(parent)?;
    }
    match fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {
            // The umask may have narrowed `mode` (say to 0500); set it
            // exactly. This only ever adds owner bits within `mode`.
            return fs::set_permissions(path, fs::Permissions::from_mode(mode));
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    check_not_symlink(path)?;
    let meta = fs::metadata(path)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a directory", path.display()),
        ));
    }
    let was = meta.permissions().mode() & 0o7777;
    if was != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{} has mode {was:o}, looser than {mode:o}, and cannot be tightened ({e}); run chmod {mode:o} on it",
                    path.display()
                ),
            )
        })?;
        if was & !mode != 0 {
            tracing::warn!(
                event = "state_dir_tightened",
                path = %path.display(),
                was = format_args!("{was:o}"),
                now = format_args!("{mode:o}"),
            );
        }
    }
    Ok(())
}

/// An error if `path` is a symbolic link (a private directory must not be
/// one; see [`create_dir_private`]).
pub(crate) fn check_not_symlink(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a symbolic link; refusing to follow it for a directory that holds private keys: replace it with a real directory",
                path.display()
            ),
        )),
        _ => Ok(()),
    }
}

/// Warn when a secret file (a private key, a secret) is readable or
/// writable by group or others. `what` names it in the log line.
pub(crate) fn warn_if_exposed(path: &Path, what: &'static str) {
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            event = "secret_file_exposed",
            what,
            path = %path.display(),
            mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
            hint = "accessible by group or others; run chmod 600 on it",
        );
    }
}

/// Create `path` (and its parents) with `mode` if it does not exist yet; an
/// existing directory keeps its mode.
pub(crate) fn ensure_dir(path: &Path, mode: u32) -> io::Result<()> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a directory", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_dir_private(path, mode),
        Err(e) => Err(e),
    }
}

/// fsync a directory so that renames inside it are durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn sync_parent(path: &Path) -> io::Result<()> {
    sync_dir(parent_dir(path))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn already_exists(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{} already exists", path.display()),
    )
}

fn links_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EOPNOTSUPP))
        || e.kind() == io::ErrorKind::Unsupported
}

/// Write `bytes` to a new, uniquely named temporary file next to `path`
/// and fsync it. Returns the temporary file's path.
fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no file name", path.display()),
        )
    })?;
    let dir = parent_dir(path);
    let mut attempts = 0;
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp.{}.{n}.{nanos}", std::process::id()));
        let tmp = dir.join(tmp_name);
        let opened = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp);
        let mut file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 16 => {
                attempts += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        let written = (|| {
            // The umask may have narrowed `mode`; set it exactly. It can only
            // have been narrower, so a key was never more exposed than 0600.
            file.set_permissions(fs::Permissions::from_mode(mode))?;
            file.write_all(bytes)?;
            file.sync_all()
        })();
        return match written {
            Ok(()) => Ok(tmp),
            Err(e) => {
                drop(file);
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("server.key");
        write_atomic(&p, b"one", KEY_MODE).unwrap();
        write_atomic(&p, b"two", KEY_MODE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(entries(dir.path()), vec!["server.key".to_string()]);
        assert_eq!(mode_of(&p), 0o600);
    }

    #[test]
    fn modes_are_exact() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        let cert = dir.path().join("c");
        write_atomic(&key, b"k", KEY_MODE).unwrap();
        write_new_atomic(&cert, b"c", CERT_MODE).unwrap();
        assert_eq!(mode_of(&key), 0o600);
        assert_eq!(mode_of(&cert), 0o644);
        // Replacing a 0644 file with a key-mode write narrows it.
        write_atomic(&cert, b"c2", KEY_MODE).unwrap();
        assert_eq!(mode_of(&cert), 0o600);
    }

    #[test]
    fn write_new_refuses_existing_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("client.key");
        write_new_atomic(&p, b"first", KEY_MODE).unwrap();
        let err = write_new_atomic(&p, b"second", KEY_MODE).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&p).unwrap(), b"first");
        assert_eq!(entries(dir.path()), vec!["client.key".to_string()]);
    }

    #[test]
    fn write_into_missing_directory_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope").join("x");
        assert!(write_atomic(&p, b"x", CERT_MODE).is_err());
        assert!(entries(dir.path()).is_empty());
    }

    #[test]
    fn create_dir_private_sets_leaf_mode() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a").join("state");
        create_dir_private(&state, STATE_DIR_MODE).unwrap();
        assert_eq!(mode_of(&state), 0o700);
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        create_dir_private(&state, STATE_DIR_MODE).unwrap();
        assert_eq!(mode_of(&state), 0o700);
    }

    #[test]
    fn create_dir_private_refuses_a_symlink_and_leaves_its_target_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        fs::create_dir(&target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        let state = dir.path().join("state");
        std::os::unix::fs::symlink(&target, &state).unwrap();
        let err = create_dir_private(&state, STATE_DIR_MODE).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("is a symbolic link"), "{err}");
        assert_eq!(mode_of(&target), 0o755);
    }

    #[test]
    fn ensure_dir_keeps_existing_mode() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("m");
        ensure_dir(&d, MATERIAL_DIR_MODE).unwrap();
        assert_eq!(mode_of(&d), 0o755);
        fs::set_permissions(&d, fs::Permissions::from_mode(0o750)).unwrap();
        ensure_dir(&d, MATERIAL_DIR_MODE).unwrap();
        assert_eq!(mode_of(&d), 0o750);
    }
}
