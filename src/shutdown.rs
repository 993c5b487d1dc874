//! Shutdown, in two stages shared by every task of a Server or Client:
//! **graceful** (stop admitting new work, let established streams finish)
//! and **fast** (close everything now). The first SIGTERM or SIGINT asks for
//! a graceful stop; a second one, or SIGQUIT, for a fast one.
//! SIGHUP, which asks a running role to reload its config, is routed here
//! too (`on_each_sighup`).

use tokio::sync::watch;

/// How far shutdown has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stage {
    Running,
    Graceful,
    Fast,
}

/// Requests shutdown stages.
#[derive(Debug, Clone)]
pub struct Trigger(watch::Sender<Stage>);

/// Observes shutdown stages.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<Stage>);

/// A connected trigger and signal.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(Stage::Running);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Ask for a graceful stop (a no-op once stopping).
    pub fn fire(&self) {
        self.escalate(Stage::Graceful);
    }

    /// Ask for a fast stop.
    pub(crate) fn fire_fast(&self) {
        self.escalate(Stage::Fast);
    }

    fn escalate(&self, to: Stage) {
        self.0.send_if_modified(|s| {
            if *s < to {
                *s = to;
                true
            } else {
                false
            }
        });
    }
}

impl Shutdown {
    /// Resolves once any stop was requested (or the trigger is gone).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|s| *s >= Stage::Graceful).await;
    }

    /// Resolves once a fast stop was requested (or the trigger is gone).
    pub(crate) async fn wait_fast(&mut self) {
        let _ = self.0.wait_for(|s| *s >= Stage::Fast).await;
    }

    pub(crate) fn stage(&self) -> Stage {
        *self.0.borrow()
    }

    pub(crate) fn is_requested(&self) -> bool {
        self.stage() >= Stage::Graceful
    }
}

/// Map process signals to stages: SIGTERM/SIGINT → graceful, a second one
/// (or SIGQUIT) → fast.
pub(crate) fn on_signals(trigger: Trigger) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::quit()),
    ) else {
        tracing::warn!(event = "signal_handlers_unavailable");
        return;
    };
    tokio::spawn(async move {
        let mut seen = 0u32;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = quit.recv() => "SIGQUIT",
            };
            seen += 1;
            if name == "SIGQUIT" || seen > 1 {
                tracing::info!(event = "shutdown_requested", signal = name, mode = "fast");
                trigger.fire_fast();
            } else {
                tracing::info!(
                    event = "shutdown_requested",
                    signal = name,
                    mode = "graceful"
                );
                trigger.fire();
            }
        }
    });
}

/// Call `reload` on every SIGHUP, until the task is aborted. Without a
/// SIGHUP handler it warns once (`reload_unavailable`) and returns.
pub(crate) async fn on_each_sighup(mut reload: impl FnMut()) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!(
            event = "reload_unavailable",
            reason = "cannot install the SIGHUP handler"
        );
        return;
    };
    while hup.recv().await.is_some() {
        reload();
    }
}
