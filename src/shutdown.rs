//! The shutdown signal: SIGINT (Ctrl-C) or SIGTERM (Kubernetes, systemd).
//!
//! Handlers are installed by [`install`], before the server says it is serving: a signal that
//! arrives between "listening" and the first poll of the future must still be a graceful stop,
//! not the default action (instant death, in-flight calls cut).

use std::future::Future;
use std::io;

/// Installs SIGINT and SIGTERM handlers now; the future completes on the first of them.
pub fn install() -> io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => tracing::info!("SIGINT: shutting down, finishing in-flight calls"),
                _ = term.recv() => tracing::info!("SIGTERM: shutting down, finishing in-flight calls"),
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("Ctrl-C: shutting down, finishing in-flight calls");
        })
    }
}
