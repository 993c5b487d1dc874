//! Small concurrency pieces every system shares: lock helpers that survive
//! a poisoned lock, a guard that aborts a task when dropped,
//! `InFlight`, the one way to count work in flight and wait for it to
//! drain, and `serve_few`, the accept loop of the small local listeners.
//!
//! A poisoned lock only means another thread panicked while holding it;
//! the data behind it (tables, counters) stays usable, so the helpers take
//! it rather than propagate the panic.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

/// Lock `m`, even if a panicking thread poisoned it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read-lock `l`, even if a panicking thread poisoned it.
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Write-lock `l`, even if a panicking thread poisoned it.
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// Aborts its task when dropped, so a helper task (a summary logger, a
/// listener) ends with the scope that owns it.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(JoinHandle<()>);

impl AbortOnDrop {
    /// Guard `task`.
    pub fn new(task: JoinHandle<()>) -> Self {
        Self(task)
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts units of work in flight (streams, connections) and lets a
/// draining owner wait until none is left, woken by the last one to end
/// rather than by polling. Clones share the count.
#[derive(Debug, Clone, Default)]
pub(crate) struct InFlight(Arc<InFlightState>);

#[derive(Debug, Default)]
struct InFlightState {
    count: AtomicUsize,
    idle: Notify,
}

/// One unit of work counted by an [`InFlight`] until dropped.
#[derive(Debug)]
pub(crate) struct InFlightGuard(Arc<InFlightState>);

impl InFlight {
    /// Count one unit as in flight until the returned guard is dropped.
    pub(crate) fn enter(&self) -> InFlightGuard {
        self.0.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.0.clone())
    }

    /// Units in flight now.
    pub fn count(&self) -> usize {
        self.0.count.load(Ordering::Acquire)
    }

    /// Wait until no unit is in flight (true), or `limit` passed (false).
    pub async fn drained(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.0.idle.notified();
                if self.count() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Accept connections with `accept` and serve each with `serve`, at most
/// `limit` at a time and each for at most `deadline`. At the cap the loop
/// stops accepting, so new connections wait in the kernel's queue instead
/// of costing memory here. `accept` gives `None` for a failed accept (after
/// logging it, if it should be): the loop tries again 100 ms later. Runs
/// until the task is aborted.
pub(crate) async fn serve_few<C, A, H>(
    limit: usize,
    deadline: Duration,
    mut accept: impl FnMut() -> A,
    serve: impl Fn(C) -> H,
) where
    A: Future<Output = Option<C>>,
    H: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limit));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(conn) = accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let served = serve(conn);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(deadline, served).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drained_waits_for_the_last_guard() {
        let in_flight = InFlight::default();
        assert!(in_flight.drained(Duration::ZERO).await);
        let a = in_flight.enter();
        let b = in_flight.enter();
        assert_eq!(in_flight.count(), 2);
        assert!(!in_flight.drained(Duration::from_millis(10)).await);
        let waiter = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.drained(Duration::from_secs(5)).await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        assert!(waiter.await.unwrap());
        assert_eq!(in_flight.count(), 0);
    }

    #[test]
    fn a_poisoned_lock_is_still_usable() {
        let m = Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
