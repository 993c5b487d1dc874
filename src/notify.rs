//! systemd readiness notification (`sd_notify`): a datagram to the socket
//! named by `$NOTIFY_SOCKET`, for units with `Type=notify`. A no-op when the
//! variable is unset.

use std::os::unix::net::UnixDatagram;

/// Send `state` (e.g. `READY=1`) to the service manager. Failures are
/// logged, never fatal: readiness is advisory.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // Abstract socket namespace.
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)
        } else {
            socket.send_to(state.as_bytes(), &path)
        }
    });
    match result {
        Ok(_) => tracing::debug!(event = "sd_notify", state),
        Err(error) => tracing::warn!(event = "sd_notify_failed", state, error = ?error.to_string()),
    }
}

/// Tells systemd the service is ready.
pub const READY: &str = "READY=1";
/// Tells systemd the service is stopping.
pub const STOPPING: &str = "STOPPING=1";
