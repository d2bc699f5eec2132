//! Wiring: the gRPC services on their listeners, health and reflection, background upkeep, and
//! graceful shutdown. The caller binds the listeners and owns the shutdown future, so `app` (the binary) and
//! the tests run exactly the same code (tests bind `127.0.0.1:0`).
//!
//! - decisions listener: `RateLimitService`, health, reflection (v1 and v1alpha). Served on
//!   sluice's own HTTP/2 for unary gRPC ([`http2`]; `--http2 h2` serves it on the `h2` crate
//!   instead, [`connection`]): `ShouldRateLimit` goes straight to [`RlsEndpoint`], anything
//!   else to tonic's router. tonic's own server would run every call through its layers
//!   (connection info, `grpc-timeout`, error recovery), axum's routing, boxed bodies and
//!   hyper's task per stream, and h2 itself was three quarters of what was left per call;
////! - admin listener: `sluice.admin.v1.Admin` behind the token check, health, reflection;
//! - background: sweeping expired counters, blocks and idle clients; saving automatic blocks.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::admin::AdminService;
use crate::admin::auth::TokenCheck;
use crate::http::Readiness;
use crate::limiter::Limiter;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::sluice::admin::v1::admin_server::AdminServer;
use crate::service::endpoint::{RlsEndpoint, SERVICE_NAME};
use crate::service::{connection, http2};
use crate::store::Store;

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
    /// The admin token (`x-admin-token`); `None` only with a loopback admin listener.
    pub admin_token: Option<String>,
    /// Clients idle this long are dropped from per-client statistics.
    pub client_idle: Duration,
    /// Which HTTP/2 implementation serves the decision listener.
    pub http2: Http2,
}

/// The decision listener's HTTP/2: our own, specialised for unary gRPC (the default), or the
/// `h2` crate, kept for one release as a fallback an operator can switch to (`--http2 h2`)
/// should a client meet a difference between the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Http2 {
    /// [`crate::service::http2`].
    #[default]
    Native,
    /// The `h2` crate ([`crate::service::connection`]).
    H2,
}

impl std::str::FromStr for Http2 {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(Http2::Native),
            "h2" => Ok(Http2::H2),
            other => Err(format!("{other:?} is neither `native` nor `h2`")),
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            sweep_interval: crate::config::DEFAULT_SWEEP_INTERVAL,
            shutdown_grace: Duration::from_secs(10),
            admin_token: None,
            client_idle: Duration::from_secs(3600),
            http2: Http2::default(),
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
    /// The admin listener would be reachable from other hosts without a token.
    #[error(
        "the admin listener {0} is not a loopback address: set SLUICE_ADMIN_TOKEN (or --admin-token-file), or use --admin-addr 127.0.0.1:8082"
    )]
    AdminWithoutToken(std::net::SocketAddr),
    /// A listener has no local address.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Health and reflection, which each listener serves.
fn common_routes(services: &[&str]) -> Result<(HealthReporter, Routes), ServerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
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
    let routes = Routes::new(health_service)
        .add_service(builder().build_v1()?)
        .add_service(builder().build_v1alpha()?);
    Ok((health, routes))
}

/// The admin listener's service.
const ADMIN_SERVICE: &str = "sluice.admin.v1.Admin";

/// Serves until `shutdown` completes, then stops accepting and finishes in-flight calls.
pub async fn run<S: Store>(
    listeners: Listeners,
    limiter: Arc<Limiter<S>>,
    options: Options,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let check = TokenCheck::new(options.admin_token.as_deref());
    if let Some(admin) = &listeners.admin {
        let addr = admin.local_addr()?;
        if !check.required() && !addr.ip().is_loopback() {
            return Err(ServerError::AdminWithoutToken(addr));
        }
        if !check.required() {
            tracing::warn!(%addr, "admin API has no token (SLUICE_ADMIN_TOKEN unset): loopback callers need none");
        }
        tracing::info!(%addr, "serving Admin");
    }

    // Every listener and background task watches one flag.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // Health is reported per listener: both routers answer "" and their services as SERVING
    // once the config is loaded, which it is by the time we get here.
    // TCP_NODELAY is set on the incoming stream: the builder's setting does not reach a listener
    // we bound ourselves, and without it small responses wait for delayed ACKs (40 ms tails).
    let (health, routes) = common_routes(&[SERVICE_NAME])?;
    health
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    let grpc = serve_decisions(
        listeners.grpc,
        RlsEndpoint::new(limiter.clone()),
        routes.prepare(),
        options.http2,
        stopped(stop_rx.clone()),
    );
    let admin = match listeners.admin {
        Some(listener) => {
            let check = check.clone();
            let service =
                AdminServer::with_interceptor(AdminService::new(limiter.clone()), move |req| {
                    check.check(req)
                });
            let (health, routes) = common_routes(&[ADMIN_SERVICE])?;
            health
                .set_service_status(ADMIN_SERVICE, ServingStatus::Serving)
                .await;
            let router = Server::builder().add_routes(routes).add_service(service);
            Some(router.serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                stopped(stop_rx.clone()),
            ))
        }
        None => None,
    };

    let ready = Arc::new(Readiness::default());
    let http = listeners.http.map(|listener| {
        let app = crate::http::router(limiter.clone(), ready.clone());
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
            Some(admin) => tokio::join!(grpc, admin).1,
            None => {
                grpc.await;
                Ok(())
            }
        }
    };
    let signal = async {
        shutdown.await;
        ready.set(false);
        let _ = stop_tx.send(true);
        tokio::time::sleep(options.shutdown_grace).await;
    };
    let result = tokio::select! {
        r = servers => r.map_err(ServerError::from),
        () = signal => {
            tracing::warn!(grace = ?options.shutdown_grace, "in-flight calls still open after the shutdown grace period; stopping anyway");
            Ok(())
        }
    };
    upkeep.abort();
    saver.abort();
    http.abort();
    // Whatever automatic blocks happened last are saved before we go.
    let access = limiter.access().clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || access.persist()).await {
        tracing::error!(error = %e, "could not save blocks and allowlist at shutdown");
    }
    result
}

/// Serves the decision listener over HTTP/2 (cleartext, prior knowledge, as gRPC clients
/// connect) until `shutdown`, then sends every connection a GOAWAY and waits for their calls
/// to finish (the caller bounds that wait by the shutdown grace).
async fn serve_decisions<S: Store>(
    listener: TcpListener,
    endpoint: RlsEndpoint<S>,
    routes: tonic::service::Routes,
    http2: Http2,
    shutdown: impl Future<Output = ()>,
) {
    let endpoint = Arc::new(endpoint);
    // Connections watch this flag; the sender learns they are all gone when every receiver is
    // dropped.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a decision connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small responses must not wait for delayed ACKs (40 ms tails).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "TCP_NODELAY not set");
        }
        let mut stop = stop_rx.clone();
        let stop = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let (endpoint, routes) = (endpoint.clone(), routes.clone());
        tokio::spawn(async move {
            let ended = match http2 {
                Http2::Native => http2::conn::serve(tcp, endpoint, routes, stop)
                    .await
                    .map_err(|e| e.to_string()),
                Http2::H2 => connection::serve(tcp, endpoint, routes, stop)
                    .await
                    .map_err(|e| e.to_string()),
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "decision connection ended with an error");
            }
        });
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    stop_tx.closed().await;
}

/// Drops expired counters, expired blocks and idle clients every `sweep_interval`, off the
/// request path.
async fn upkeep<S: Store>(limiter: Arc<Limiter<S>>, options: Options) {
    let mut tick = tokio::time::interval(options.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idle = crate::clock::duration_nanos(options.client_idle);
    let mut summary = Summary::default();
    loop {
        tick.tick().await;
        summary.maybe_log(&limiter, std::time::Instant::now());
        let now = limiter.clock().now();
        let counters = limiter.store().sweep_expired_at(now);
        let blocks = limiter.access().sweep_at(now);
        let clients = limiter
            .stats()
            .sweep_clients_idle_since(now.as_nanos().saturating_sub(idle));
        tracing::trace!(counters, blocks, clients, "swept");
    }
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
