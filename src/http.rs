//! The operators' HTTP listener (`--http-addr`, default `127.0.0.1:8080`): Prometheus
//! `/metrics`, liveness `/healthz` and readiness `/readyz`, and envoyproxy/ratelimit's
//! `POST /json` (ShouldRateLimit as JSON) and `GET /healthcheck`. Plain HTTP/1.1 so any
//! scraper, kubelet probe or curl can use it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};

use crate::connections::ListenerStats;
use crate::limiter::Limiter;
use crate::limiter::model::RuleSet;
use crate::service::json;
use crate::service::rls::RlsService;
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
    quotas: Arc<crate::quota::registry::Registry>,
}

/// The router of the HTTP listener.
pub fn router<S: Store>(
    limiter: Arc<Limiter<S>>,
    ready: Arc<Readiness>,
    listeners: Arc<ListenerStats>,
    quotas: Arc<crate::quota::registry::Registry>,
) -> Router {
    let state = Arc::new(AppState {
        limiter,
        ready,
        listeners,
        quotas,
    });
    Router::new()
        .route("/metrics", get(metrics::<S>))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<S>))
        .route("/json", post(json_call::<S>))
        .route("/healthcheck", get(healthcheck::<S>))
        .with_state(state)
}

async fn metrics<S: Store>(State(app): State<Arc<AppState<S>>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&app.limiter, &app.listeners, &app.quotas),
    )
}

async fn readyz<S: Store>(State(app): State<Arc<AppState<S>>>) -> impl IntoResponse {
    if app.ready.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Whether envoyproxy/ratelimit would call itself healthy with `rules`: always, unless
/// `HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED` is set and no domain is loaded.
pub fn reference_healthy(rules: &RuleSet) -> bool {
    rules
        .reference
        .as_ref()
        .is_none_or(|r| !r.settings.healthy_with_one_config || !r.trees.is_empty())
}

/// The reference's `/healthcheck`: `OK`, or 500 while draining or (with
/// `HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED`) while no domain is loaded.
async fn healthcheck<S: Store>(State(app): State<Arc<AppState<S>>>) -> impl IntoResponse {
    if app.ready.get() && reference_healthy(&app.limiter.rules()) {
        (StatusCode::OK, "OK")
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, "")
    }
}

/// The reference's `/json`: a `RateLimitRequest` in protobuf's JSON mapping, answered with the
/// response in the same mapping: 200 for OK, 429 for OVER_LIMIT, 400 `Bad Request` for a body
/// that does not parse or a request that cannot be decided.
async fn json_call<S: Store>(
    State(app): State<Arc<AppState<S>>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let bad = || (StatusCode::BAD_REQUEST, "Bad Request\n").into_response();
    let Ok(request) = json::request(&body) else {
        return bad();
    };
    let Ok(response) = RlsService::new(app.limiter.clone()).answer(&request).await else {
        return bad();
    };
    let status = match json::overall(&response) {
        json::Overall::Ok => StatusCode::OK,
        json::Overall::OverLimit => StatusCode::TOO_MANY_REQUESTS,
        json::Overall::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
    };
    match json::response(&response) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
