//! The operators' HTTP listener (`--http-addr`, default `127.0.0.1:8080`): Prometheus
//! `/metrics`, liveness `/healthz` and readiness `/readyz`. Plain HTTP/1.1 so any scraper,
//! kubelet probe or curl can use it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::connections::ListenerStats;
use crate::limiter::Limiter;
use crate::store::Store;

/// Whether the server should receive traffic: true once serving, false from the shutdown
/// signal on, so a load balancer drains it before it stops.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    /// Sets readiness.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    /// Current readiness.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

struct AppState<S> {
    limiter: Arc<Limiter<S>>,
    ready: Arc<Readiness>,
    listeners: Arc<ListenerStats>,
}

/// The router of the HTTP listener.
pub fn router<S: Store>(
    limiter: Arc<Limiter<S>>,
    ready: Arc<Readiness>,
    listeners: Arc<ListenerStats>,
) -> Router {
    let state = Arc::new(AppState {
        limiter,
        ready,
        listeners,
    });
    Router::new()
        .route("/metrics", get(metrics::<S>))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<S>))
        .with_state(state)
}

async fn metrics<S: Store>(State(app): State<Arc<AppState<S>>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&app.limiter, &app.listeners),
    )
}

async fn readyz<S: Store>(State(app): State<Arc<AppState<S>>>) -> impl IntoResponse {
    if app.ready.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
