//! Wiring: the gRPC services on their listeners, health and reflection, background upkeep, and
//! graceful shutdown. The caller binds the listeners and owns the shutdown future, so `app` (the
//! binary) and the tests run exactly the same code (tests bind `127.0.0.1:0`).
//!
//! Both gRPC listeners are tonic `Server`s over hyper's HTTP/2, configured here from
//! [`connections::Limits`] (streams, windows, header list, message size, keepalive) and fed by
//! [`connections`] (connection cap, handshake and idle timeouts, `TCP_NODELAY`):
//! - decisions: `RateLimitService` ([`RlsService`]), health, reflection (v1 and v1alpha), on
//!   [`Options::decision_threads`] threads, each a single-threaded runtime serving its share of
//!   the connections ([`connections::spread`]). On one multi-threaded runtime, hyper's task per
//!   call was stolen by the other worker half the time, and each call then locked h2's
//!   per-connection state from two cores: a quarter more CPU per call with a client of few
//!   connections, as Envoy is (one per worker thread). The price: one connection's calls never
//!   use more than one core.
//! - admin: `sluice.admin.v1.Admin` behind the token check, health, reflection, on the
//!   caller's runtime, as are the HTTP listener and the background tasks.
//!
//! Around every service of both: [`ActivityLayer`] (calls seen by the idle timeout) and
//! [`BoundedErrorsLayer`] (no error message longer than 256 bytes, whatever the client sent).
//! Background: sweeping expired counters, blocks and idle clients (off the async workers);
//! saving automatic blocks.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::admin::AdminService;
use crate::admin::auth::TokenCheck;
use crate::connections::{self, ActivityLayer, Limits, ListenerStats};
use crate::http::Readiness;
use crate::limiter::Limiter;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_server::{
    RateLimitQuotaServiceServer, SERVICE_NAME as RLQS_SERVICE,
};
use crate::proto::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitServiceServer, SERVICE_NAME,
};
use crate::proto::sluice::admin::v1::admin_server::{AdminServer, SERVICE_NAME as ADMIN_SERVICE};
use crate::quota::{AnyLedger, Quotas};
use crate::service::bounded::{BoundedErrorsLayer, bounded_errors};
use crate::service::rlqs::RlqsService;
use crate::service::rls::RlsService;
use crate::store::Store;
use crate::tls::TlsListener;

/// Listeners the server runs on, already bound.
#[derive(Debug)]
pub struct Listeners {
    /// Decisions (`RateLimitService`), health and reflection.
    pub grpc: TcpListener,
    /// The admin service, if it should run.
    pub admin: Option<TcpListener>,
    /// `/metrics`, `/healthz`, `/readyz`, if they should be served.
    pub http: Option<TcpListener>,
}

/// Settings of the running server.
#[derive(Debug, Clone)]
pub struct Options {
    /// Time between sweeps of expired counters.
    pub sweep_interval: Duration,
    /// After the shutdown signal, how long in-flight calls may take before the server stops
    /// anyway (a client that never closes its connection must not keep a pod alive).
    pub shutdown_grace: Duration,
    /// The admin token (`x-admin-token`). The admin listener needs it, or a client CA on its
    /// TLS ([`Options::admin_tls`]), or both.
    pub admin_token: Option<String>,
    /// TLS of the decision listener; plain TCP without.
    pub grpc_tls: Option<Arc<TlsListener>>,
    /// TLS of the admin listener; plain TCP without.
    pub admin_tls: Option<Arc<TlsListener>>,
    /// How often the TLS files are checked for a new certificate.
    pub tls_poll: Duration,
    /// Clients idle this long are dropped from per-client statistics.
    pub client_idle: Duration,
    /// The decision listener's connection limits.
    pub decisions: Limits,
    /// Threads serving decisions, each a single-threaded runtime with its share of the
    /// connections (see [`connections::spread`]).
    pub decision_threads: usize,
    /// The admin listener's connection limits.
    pub admin: Limits,
    /// Quota streams (RLQS) on the decision listener.
    pub quotas: crate::quota::Settings,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            sweep_interval: crate::config::DEFAULT_SWEEP_INTERVAL,
            shutdown_grace: Duration::from_secs(10),
            admin_token: None,
            grpc_tls: None,
            admin_tls: None,
            tls_poll: Duration::from_secs(1),
            client_idle: Duration::from_secs(3600),
            decisions: Limits::decisions(),
            admin: Limits::admin(),
            decision_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            quotas: crate::quota::Settings::default(),
        }
    }
}

/// The server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The gRPC transport failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection could not load the descriptor set.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The admin listener would have no credential to check: every call would be refused, or,
    /// as before sluice 0.2, every loopback caller let in.
    #[error(
        "the admin listener {0} has no credential to check: give it a token (SLUICE_ADMIN_TOKEN, --admin-token-file) or a client CA (--admin-tls-client-ca)"
    )]
    AdminWithoutCredential(std::net::SocketAddr),
    /// A listener has no local address, or a thread or runtime could not be started.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// A thread serving decisions ended without saying how (it panicked).
    #[error("a thread serving decisions stopped unexpectedly")]
    DecisionThread,
}

/// Aborts a background task when dropped, so that no task outlives what it serves (the
/// server's accept loop here, `serve`'s reload and replication tasks in [`crate::app`]).
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The gRPC health service name envoyproxy/ratelimit reports.
pub const REFERENCE_HEALTH_NAME: &str = "ratelimit";

/// Health and reflection, which each listener serves, with requests bounded by `limits`.
fn common_routes(
    services: &[&str],
    limits: &Limits,
) -> Result<(HealthReporter, Routes), ServerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let max = limits.max_request_bytes;
    // Reflection lists only what this listener serves (the descriptor set holds both
    // listeners' services); every type stays describable.
    let listed = services.iter().copied().chain([
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]);
    let builder = || {
        listed.clone().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |b, name| b.with_service_name(name),
        )
    };
    let routes = Routes::new(health_service.max_decoding_message_size(max))
        .add_service(builder().build_v1()?.max_decoding_message_size(max))
        .add_service(builder().build_v1alpha()?.max_decoding_message_size(max));
    Ok((health, routes))
}

/// The largest usage report accepted: Envoy reports all of its buckets in one message, each
/// id of up to [`crate::service::rls::MAX_ENTRIES`] entries.
pub const MAX_REPORT_BYTES: usize = 4 * 1024 * 1024;

/// The layers around every service of a listener, innermost last.
type ListenerLayers = tower::layer::util::Stack<
    BoundedErrorsLayer,
    tower::layer::util::Stack<ActivityLayer, tower::layer::util::Identity>,
>;

/// A tonic server with `limits` applied to every connection and call, and the layers every
/// service of a listener runs in (see the module doc).
fn server_with(limits: &Limits) -> Server<ListenerLayers> {
    Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_header_list_size(limits.max_header_list_bytes)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        // A stream's window holds one whole request of the largest size allowed; the
        // connection's, what the streams may send before the server has read any of it.
        .initial_stream_window_size(u32::try_from(limits.max_request_bytes + 5).unwrap_or(u32::MAX))
        .initial_connection_window_size(1024 * 1024)
        // Streams a client opens and resets before the server has taken them (the "rapid
        // reset" attack): hyper's default, stated.
        .http2_max_pending_accept_reset_streams(Some(20))
        .layer(ActivityLayer)
        .layer(bounded_errors())
}

/// Serves until `shutdown` completes, then stops accepting and finishes in-flight calls.
pub async fn run<S: Store>(
    listeners: Listeners,
    limiter: Arc<Limiter<S>>,
    options: Options,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let check = TokenCheck::new(
        options.admin_token.as_deref(),
        options
            .admin_tls
            .as_ref()
            .is_some_and(|t| t.verifies_clients()),
    );
    if let Some(admin) = &listeners.admin {
        let addr = admin.local_addr()?;
        if !check.has_credential() {
            return Err(ServerError::AdminWithoutCredential(addr));
        }
        tracing::info!(%addr, tls = options.admin_tls.is_some(), "serving Admin");
    }

    // Every listener and background task watches one flag.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let listener_stats = Arc::new(ListenerStats {
        grpc_tls: options.grpc_tls.clone(),
        admin_tls: options.admin_tls.clone(),
        ..ListenerStats::default()
    });
    let tls: Vec<_> = [&options.grpc_tls, &options.admin_tls]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let _tls_watch = AbortOnDrop(tokio::spawn(crate::tls::watch(tls, options.tls_poll)));

    // Health is reported per listener: both routers answer "" and their services as SERVING
    // once the config is loaded, which it is by the time we get here.
    let limits = &options.decisions;
    let (health, routes) = common_routes(&[SERVICE_NAME, RLQS_SERVICE], limits)?;
    for service in [SERVICE_NAME, RLQS_SERVICE] {
        health
            .set_service_status(service, ServingStatus::Serving)
            .await;
    }
    // envoyproxy/ratelimit's health service name, which its users' probes ask for, kept in
    // step with the rules in force.
    let healthy = set_reference_health(&health, &limiter, None).await;
    let reference_health = AbortOnDrop(tokio::spawn(follow_reference_health(
        health.clone(),
        limiter.clone(),
        healthy,
    )));
    let rls = RateLimitServiceServer::new(RlsService::new(limiter.clone()))
        .max_decoding_message_size(limits.max_request_bytes);
    let quotas = Arc::new(Quotas::new(
        limiter.clone(),
        AnyLedger::for_store(limiter.store()),
        options.quotas.clone(),
    ));
    // A report names every bucket of its Envoy, up to `max_buckets` of them.
    let rlqs = RateLimitQuotaServiceServer::new(RlqsService::new(quotas.clone(), stop_rx.clone()))
        .max_decoding_message_size(MAX_REPORT_BYTES);
    let (accept_loop, spreads) = connections::spread(
        listeners.grpc,
        limits.clone(),
        listener_stats.decisions.clone(),
        options.decision_threads,
        options.grpc_tls.clone(),
        stopped(stop_rx.clone()),
    );
    let mut threads = Vec::with_capacity(spreads.len());
    for (i, spread) in spreads.into_iter().enumerate() {
        let router = server_with(limits)
            .add_routes(routes.clone())
            .add_service(rls.clone())
            .add_service(rlqs.clone());
        let stop = stopped(stop_rx.clone());
        let (done, finished) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("sluice-decide-{i}"))
            .spawn(move || {
                let served = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(ServerError::Io)
                    .and_then(|rt| {
                        rt.block_on(
                            router.serve_with_incoming_shutdown(spread.into_incoming(), stop),
                        )
                        .map_err(ServerError::Transport)
                    });
                let _ = done.send(served);
            })?;
        threads.push(finished);
    }
    let grpc = async move {
        let accepting = AbortOnDrop(tokio::spawn(accept_loop));
        let mut result = Ok(());
        for finished in threads {
            match finished.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(ServerError::DecisionThread),
            }
        }
        drop(accepting);
        result
    };
    let admin = match listeners.admin {
        Some(listener) => {
            let limits = &options.admin;
            let check = check.clone();
            let service = InterceptedService::new(
                AdminServer::new(
                    AdminService::new(limiter.clone()).with_quotas(quotas.registry().clone()),
                )
                .max_decoding_message_size(limits.max_request_bytes),
                move |req| check.check(req),
            );
            let (health, routes) = common_routes(&[ADMIN_SERVICE], limits)?;
            health
                .set_service_status(ADMIN_SERVICE, ServingStatus::Serving)
                .await;
            let router = server_with(limits).add_routes(routes).add_service(service);
            let serving = router.serve_with_incoming_shutdown(
                connections::incoming(
                    listener,
                    limits.clone(),
                    listener_stats.admin.clone(),
                    options.admin_tls.clone(),
                ),
                stopped(stop_rx.clone()),
            );
            Some(async move { serving.await.map_err(ServerError::Transport) })
        }
        None => None,
    };

    let ready = Arc::new(Readiness::default());
    let http = listeners.http.map(|listener| {
        let app = crate::http::router(
            limiter.clone(),
            ready.clone(),
            listener_stats.clone(),
            quotas.registry().clone(),
        );
        let stop = stopped(stop_rx.clone());
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        }
    });
    let http = tokio::spawn(async move {
        if let Some(serve) = http
            && let Err(e) = serve.await
        {
            tracing::error!(error = %e, "HTTP listener failed");
        }
    });
    ready.set(true);

    let upkeep = tokio::spawn(upkeep(limiter.clone(), options.clone()));
    let saver = tokio::spawn(save_automatic_blocks(limiter.clone()));

    let servers = async {
        match admin {
            Some(admin) => {
                let (grpc, admin) = tokio::join!(grpc, admin);
                grpc.and(admin)
            }
            None => grpc.await,
        }
    };
    let signal = async {
        shutdown.await;
        ready.set(false);
        let _ = stop_tx.send(true);
        tokio::time::sleep(options.shutdown_grace).await;
    };
    let result = tokio::select! {
        r = servers => r,
        () = signal => {
            tracing::warn!(grace = ?options.shutdown_grace, "in-flight calls still open after the shutdown grace period; stopping anyway");
            Ok(())
        }
    };
    upkeep.abort();
    saver.abort();
    drop(reference_health);
    http.abort();
    // Whatever automatic blocks happened last are saved before we go.
    let access = limiter.access().clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || access.persist()).await {
        tracing::error!(error = %e, "could not save blocks and allowlist at shutdown");
    }
    result
}

/// Reports gRPC health for envoyproxy/ratelimit's service name `ratelimit` as the reference
/// does, when it differs from `last`; returns it. With `HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED`
/// a rule set with no domain is NOT_SERVING.
async fn set_reference_health<S: Store>(
    health: &HealthReporter,
    limiter: &Limiter<S>,
    last: Option<bool>,
) -> bool {
    let healthy = crate::http::reference_healthy(&limiter.rules());
    if last != Some(healthy) {
        let status = if healthy {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health
            .set_service_status(REFERENCE_HEALTH_NAME, status)
            .await;
    }
    healthy
}

/// Keeps the `ratelimit` health in step with reloads, checking every second.
async fn follow_reference_health<S: Store>(
    health: HealthReporter,
    limiter: Arc<Limiter<S>>,
    mut healthy: bool,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        healthy = set_reference_health(&health, &limiter, Some(healthy)).await;
    }
}

/// Drops expired counters, expired blocks, idle clients and ended cache entries every
/// `sweep_interval`, on a thread of the blocking pool: a sweep of a million counters is tens of
/// milliseconds of work, which on an async worker would hold up every task queued behind it
/// (the admin and HTTP listeners, health). Each sweep locks a small piece of a shard, map or
/// stripe at a time, so a decision meanwhile waits for no more than that piece.
async fn upkeep<S: Store>(limiter: Arc<Limiter<S>>, options: Options) {
    let mut tick = tokio::time::interval(options.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idle = crate::clock::duration_nanos(options.client_idle);
    let mut summary = Summary::default();
    loop {
        tick.tick().await;
        summary.maybe_log(&limiter, std::time::Instant::now());
        let limiter = limiter.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || sweep(&limiter, idle)).await {
            tracing::error!(error = %e, "sweep failed");
        }
    }
}

/// One sweep of everything that expires (see [`upkeep`]); clients idle for `idle` nanoseconds
/// go.
fn sweep<S: Store>(limiter: &Limiter<S>, idle: u64) {
    let now = limiter.clock().now();
    let counters = limiter.store().sweep_expired_at(now);
    let blocks = limiter.access().sweep_at(now);
    let clients = limiter
        .stats()
        .sweep_clients_idle_since(now.as_nanos().saturating_sub(idle));
    let cached = limiter.local_cache.sweep_at(now);
    tracing::trace!(counters, blocks, clients, cached, "swept");
}

/// Over-limit events are summarised, never logged one by one: at most one info line a minute
/// with what was rejected since the last one.
#[derive(Default)]
struct Summary {
    last: Option<std::time::Instant>,
    limited: u64,
    blocked: u64,
}

impl Summary {
    const EVERY: Duration = Duration::from_secs(60);

    fn maybe_log<S: Store>(&mut self, limiter: &Limiter<S>, now: std::time::Instant) {
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < Self::EVERY)
        {
            return;
        }
        let total = limiter.stats().total.snapshot();
        let (limited, blocked) = (total.limited - self.limited, total.blocked - self.blocked);
        if self.last.is_some() && (limited > 0 || blocked > 0) {
            let mut top: Vec<(String, u64)> = limiter
                .stats()
                .all_limit_counts()
                .into_iter()
                .filter(|(_, _, _, over, _)| *over > 0)
                .map(|(d, e, l, over, _)| (format!("{d} {e} {l}"), over))
                .collect();
            top.sort_by_key(|t| std::cmp::Reverse(t.1));
            top.truncate(3);
            tracing::info!(limited, blocked, top_limits_since_start = ?top, "requests rejected in the last minute");
        }
        self.last = Some(now);
        self.limited = total.limited;
        self.blocked = total.blocked;
    }
}

/// Writes the state file whenever an automatic block is made.
async fn save_automatic_blocks<S: Store>(limiter: Arc<Limiter<S>>) {
    loop {
        limiter.access().changed().await;
        let access = limiter.access().clone();
        match tokio::task::spawn_blocking(move || access.persist()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "could not save automatic blocks"),
            Err(e) => tracing::error!(error = %e, "state writer failed"),
        }
    }
}
