//! Wiring: the gRPC services on their listener, health and reflection, background upkeep, and
//! graceful shutdown. The caller binds the listener and owns the shutdown future, so `main` and
//! the tests run exactly the same code (tests bind `127.0.0.1:0`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::limiter::Limiter;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use crate::service::rls::RlsService;
use crate::store::Store;

/// Listeners the server runs on, already bound.
#[derive(Debug)]
pub struct Listeners {
    /// Decisions (`RateLimitService`), health and reflection.
    pub grpc: TcpListener,
}

/// Settings of the running server.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Time between sweeps of expired counters.
    pub sweep_interval: Duration,
    /// After the shutdown signal, how long in-flight calls may take before the server stops
    /// anyway (a client that never closes its connection must not keep a pod alive).
    pub shutdown_grace: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            sweep_interval: crate::config::DEFAULT_SWEEP_INTERVAL,
            shutdown_grace: Duration::from_secs(10),
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
}

/// Serves until `shutdown` completes, then stops accepting and finishes in-flight calls.
pub async fn run<S: Store>(
    listeners: Listeners,
    limiter: Arc<Limiter<S>>,
    options: Options,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // The config was loaded before we got here: the service is ready as soon as it listens.
    health
        .set_serving::<RateLimitServiceServer<RlsService<S>>>()
        .await;

    let sweeper = tokio::spawn(sweep(limiter.clone(), options.sweep_interval));
    let stopping = Arc::new(tokio::sync::Notify::new());
    let signal = {
        let stopping = stopping.clone();
        async move {
            shutdown.await;
            stopping.notify_one();
        }
    };
    let serve = Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(RateLimitServiceServer::new(RlsService::new(limiter)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listeners.grpc), signal);
    let grace = async {
        stopping.notified().await;
        tokio::time::sleep(options.shutdown_grace).await;
    };
    let result = tokio::select! {
        r = serve => r,
        () = grace => {
            tracing::warn!(grace = ?options.shutdown_grace, "in-flight calls still open after the shutdown grace period; stopping anyway");
            Ok(())
        }
    };
    sweeper.abort();
    result.map_err(ServerError::from)
}

/// Drops expired counters every `every`, off the request path.
async fn sweep<S: Store>(limiter: Arc<Limiter<S>>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let dropped = limiter.store().sweep_expired_at(limiter.clock().now());
        tracing::trace!(dropped, "swept expired counters");
    }
}
