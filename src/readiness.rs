//! The optional readiness listener (`readiness-bind-address`) of the Server
//! and the Client: a TCP socket that accepts (and at once closes)
//! connections only while the process is "ready" by a role-specific
//! condition. While it is not, the socket is closed, so health checks see
//! "connection refused". Server: ready while it admits new work. Client:
//! ready while its Tunnel connection is up.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serve `first` while `open(state)` holds: close it when the condition
/// turns false (at once if it is false from the start) and bind the same
/// address again when it turns true. Returns when `state`'s sender is gone;
/// callers abort the task on shutdown.
pub async fn serve<T>(
    first: TcpListener,
    mut state: watch::Receiver<T>,
    open: impl Fn(&T) -> bool,
) {
    let Ok(addr) = first.local_addr() else { return };
    let mut listener = Some(first);
    if !open(&state.borrow_and_update()) {
        listener = None;
    }
    loop {
        match &listener {
            Some(l) => {
                tokio::select! {
                    accepted = l.accept() => drop(accepted),
                    changed = state.changed() => {
                        if changed.is_err() { return; }
                        if !open(&state.borrow_and_update()) {
                            listener = None;
                            tracing::info!(event = "readiness_closed", %addr);
                        }
                    }
                }
            }
            None => {
                if state.wait_for(|s| open(s)).await.is_err() {
                    return;
                }
                match TcpListener::bind(addr).await {
                    Ok(l) => {
                        tracing::info!(event = "readiness_open", %addr);
                        listener = Some(l);
                    }
                    Err(error) => {
                        tracing::warn!(event = "readiness_bind_failed", %addr, error = ?error.to_string());
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn accepts(addr: std::net::SocketAddr) -> bool {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    }

    /// Poll until `accepts(addr) == want`, at most 5 s.
    async fn until(addr: std::net::SocketAddr, want: bool) -> bool {
        for _ in 0..250 {
            if accepts(addr).await == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn closed_until_the_condition_holds_then_follows_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, rx, |ready: &bool| *ready));
        assert!(until(addr, false).await, "open before the condition held");
        tx.send(true).unwrap();
        assert!(until(addr, true).await, "not open once the condition held");
        tx.send(false).unwrap();
        assert!(
            until(addr, false).await,
            "still open after the condition ended"
        );
        task.abort();
    }
}
