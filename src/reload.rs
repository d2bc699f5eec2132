//! Hot reload of the config file, or of a directory of envoyproxy/ratelimit files (then the
//! names and bytes of all of them: a file added, changed or removed is a change). The path is
//! polled (every second by default): its bytes are hashed and compared with the last attempt, which catches every way a file changes: an
//! in-place write, an editor's or `mv`'s atomic replace, and a Kubernetes ConfigMap's `..data`
//! symlink swap (the path is resolved afresh on every read). SIGHUP reloads at once.
//!
//! A reload reads, parses and validates on a blocking thread (`spawn_blocking`), never on a
//! runtime worker, since that takes time in proportion to the file (up to its size bound); it
//! then swaps the rule set in one atomic store. A config that fails validation, or a file over
//! the size bound, is refused: the old one keeps serving, the error is logged with file, line
//! and field, and `sluice_config_reloads_total{result="failed"}` goes up.
//! Counters of limits whose identity did not change (same domain, endpoint, name, algorithm and
//! window) survive, because their keys do not change.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use parking_lot::Mutex;

use crate::config::{self, ConfigError, StoreSettings};
use crate::limiter::Limiter;
use crate::store::{Backend, Store};

/// Reloads one config file into one limiter.
#[derive(Debug)]
pub struct Reloader<S> {
    path: PathBuf,
    limiter: Arc<Limiter<S>>,
    store: StoreSettings,
    backend: Option<Backend>,
    last_attempt: Mutex<u64>,
    /// Held through a reload, so a SIGHUP and a poll never parse and swap at the same time.
    reloading: Mutex<()>,
}

impl<S: Store> Reloader<S> {
    /// A reloader for `path`, whose current contents were loaded with `store` settings.
    pub fn new(path: PathBuf, limiter: Arc<Limiter<S>>, store: StoreSettings) -> Self {
        let last = config::fingerprint(&path).unwrap_or(0);
        Self {
            path,
            limiter,
            store,
            backend: None,
            last_attempt: Mutex::new(last),
            reloading: Mutex::new(()),
        }
    }

    /// The store backend the file named at start, so a reload that changes it can say that a
    /// restart is needed.
    pub fn with_file_backend(mut self, backend: Backend) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Reloads now; `Ok(true)` if the rules changed. Blocking (reads and parses the file): on
    /// the async runtime, go through [`watch`] or [`on_sighup`], which run it off the workers.
    pub fn reload(&self, why: &str) -> Result<bool, ConfigError> {
        let _one_at_a_time = self.reloading.lock();
        let stats = self.limiter.stats();
        if let Some(f) = config::fingerprint(&self.path) {
            *self.last_attempt.lock() = f;
        }
        let loaded = config::load(&self.path);
        let cfg = match loaded {
            Ok(cfg) => cfg,
            Err(e) => {
                stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, trigger = why, "config reload refused; the previous config keeps serving");
                return Err(e);
            }
        };
        stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
        if cfg.rules.source_hash == self.limiter.rules().source_hash {
            tracing::info!(trigger = why, "config reloaded: unchanged");
            return Ok(false);
        }
        if cfg.store != self.store || self.backend.as_ref().is_some_and(|b| *b != cfg.backend) {
            tracing::warn!(
                "store settings changed in the config; they take effect at the next restart"
            );
        }
        let hash = cfg.rules.source_hash;
        let state = if cfg.rules.enabled {
            "ENABLED"
        } else {
            "DISABLED"
        };
        self.limiter.swap_rules(cfg.rules);
        let generation = stats.config_generation.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(
            trigger = why,
            generation,
            hash = format!("{hash:016x}"),
            "config reloaded: rate limiting {state}"
        );
        Ok(true)
    }

    /// Reloads if the file's bytes differ from the last attempt. A file that is briefly missing
    /// (mid-replace) is skipped until the next poll. Blocking, like [`Reloader::reload`].
    pub fn poll(&self) {
        let Some(f) = config::fingerprint(&self.path) else {
            return;
        };
        if f != *self.last_attempt.lock() {
            let _ = self.reload("file changed");
        }
    }
}

/// Runs `work` on `reloader` on a blocking thread and waits for it. The outcome is already
/// logged and counted; a panic in it would be a bug, logged here so the watcher goes on.
async fn off_worker<S: Store>(reloader: &Arc<Reloader<S>>, work: fn(&Reloader<S>)) {
    let r = reloader.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || work(&r)).await {
        tracing::error!(error = %e, "config reload task failed");
    }
}

/// Polls `reloader`'s file every `every`, forever, each poll on a blocking thread.
pub async fn watch<S: Store>(reloader: Arc<Reloader<S>>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        off_worker(&reloader, |r| r.poll()).await;
    }
}

/// Reloads on every SIGHUP, forever, each reload on a blocking thread. The handler is installed
/// before this returns its future.
pub fn on_sighup<S: Store>(
    reloader: Arc<Reloader<S>>,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        Ok(async move {
            while hup.recv().await.is_some() {
                off_worker(&reloader, |r| {
                    let _ = r.reload("SIGHUP");
                })
                .await;
            }
        })
    }
    #[cfg(not(unix))]
    {
        let _ = reloader;
        Ok(std::future::pending::<()>())
    }
}
