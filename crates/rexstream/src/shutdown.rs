//! Process-wide shutdown signal, injected into every component (mini-redis style: tests trigger it
//! themselves, `run` triggers it from SIGINT/SIGTERM).
//!
//! In: one `trigger()` from anywhere. Out: `is_triggered()` for polling loops on OS threads,
//! [`Shutdown::sleep`] for interruptible back-off sleeps, and [`Shutdown::wait`] for tokio tasks.
//! The order of the stop (ingest → scheduler → worker finishes its batch → sinks flush and publish
//! `offline`) follows from channels closing, not from this type: see `run.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Cloneable shutdown handle.
#[derive(Clone, Debug)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    flag: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
    tx: tokio::sync::watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (tx, _rx) = tokio::sync::watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                flag: AtomicBool::new(false),
                lock: Mutex::new(()),
                cv: Condvar::new(),
                tx,
            }),
        }
    }

    /// Ask everything to stop. Idempotent.
    pub fn trigger(&self) {
        let _g = self.inner.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.flag.store(true, Ordering::SeqCst);
        self.inner.cv.notify_all();
        self.inner.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        self.inner.flag.load(Ordering::SeqCst)
    }

    /// Sleep up to `d`; returns true (early) if shutdown was triggered.
    pub fn sleep(&self, d: Duration) -> bool {
        let g = self.inner.lock.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self
            .inner
            .cv
            .wait_timeout_while(g, d, |_| !self.inner.flag.load(Ordering::SeqCst))
            .unwrap_or_else(|e| e.into_inner());
        self.is_triggered()
    }

    /// Resolves once shutdown is triggered (for `tokio::select!`).
    pub async fn wait(&self) {
        let mut rx = self.inner.tx.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn sleep_is_cut_short_by_trigger() {
        let s = Shutdown::new();
        let s2 = s.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            s2.trigger();
        });
        let start = Instant::now();
        assert!(s.sleep(Duration::from_secs(10)));
        assert!(start.elapsed() < Duration::from_secs(5));
        t.join().unwrap();
        assert!(!Shutdown::new().sleep(Duration::from_millis(10)));
    }

    #[tokio::test]
    async fn async_wait_resolves_after_trigger() {
        let s = Shutdown::new();
        let s2 = s.clone();
        tokio::spawn(async move { s2.trigger() });
        tokio::time::timeout(Duration::from_secs(5), s.wait())
            .await
            .unwrap();
    }
}
