//! `StreamRateLimitQuotas`: one task per Envoy stream, answering each usage report with the
//! assignments [`Quotas::report`] computes.
//!
//! A stream holds its connection open for the idle timeout (it is one call that lasts), ends
//! with UNAVAILABLE when the server shuts down (Envoy reconnects, to another replica if there is
//! one, on its 5 s timer), and with INVALID_ARGUMENT naming the field when a report cannot be
//! read. Its claims are released when it ends, however it ends. Between reports it pushes
//! DENY_ALL or ALLOW_ALL to buckets that a new block, allowlist entry or config changes
//! ([`Quotas::refresh`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::connections::ConnInfo;
use crate::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_server::RateLimitQuotaService;
use crate::proto::envoy::service::rate_limit_quota::v3::{
    RateLimitQuotaResponse, RateLimitQuotaUsageReports,
};
use crate::quota::Quotas;
use crate::store::Store;

/// Responses queued for one stream before its task waits for Envoy to read them.
const QUEUED: usize = 4;

/// How often a stream looks for new blocks, allowlist entries and rules, to push what they
/// change (an atomic load when nothing did): a block reaches Envoy in about this long rather
/// than at the next report.
const REFRESH_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// The RLQS gRPC service.
pub struct RlqsService<S> {
    quotas: Arc<Quotas<S>>,
    stop: watch::Receiver<bool>,
}

impl<S> RlqsService<S> {
    /// Serves `quotas`; streams end when `stop` turns true.
    pub fn new(quotas: Arc<Quotas<S>>, stop: watch::Receiver<bool>) -> Self {
        Self { quotas, stop }
    }
}

type Responses = Pin<Box<dyn Stream<Item = Result<RateLimitQuotaResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Store> RateLimitQuotaService for RlqsService<S> {
    type StreamRateLimitQuotasStream = Responses;

    async fn stream_rate_limit_quotas(
        &self,
        request: Request<Streaming<RateLimitQuotaUsageReports>>,
    ) -> Result<Response<Responses>, Status> {
        let info = request.extensions().get::<ConnInfo>().cloned();
        let peer = info
            .as_ref()
            .map(|i| i.remote)
            .or_else(|| request.remote_addr())
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let Some(stream) = self.quotas.open(peer) else {
            return Err(Status::resource_exhausted(format!(
                "sluice holds its most quota streams ({})",
                self.quotas.settings().max_streams
            )));
        };
        // The stream is a call in progress for as long as it lasts: the idle timeout must not
        // close its connection between reports.
        let call = info.map(|i| i.activity.call());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(QUEUED);
        let quotas = self.quotas.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let _call = call;
            serve(quotas, stream, inbound, tx, stop).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Completes when the server stops (never, if nothing can stop it).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Why a stream ended, for its closing log line.
#[derive(Debug)]
enum End {
    ClientClosed,
    ClientGone,
    Invalid(String),
    Broken(Status),
    ShuttingDown,
}

async fn serve<S: Store>(
    quotas: Arc<Quotas<S>>,
    mut stream: crate::quota::QuotaStream,
    mut inbound: Streaming<RateLimitQuotaUsageReports>,
    tx: mpsc::Sender<Result<RateLimitQuotaResponse, Status>>,
    mut stop: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let mut refresh = tokio::time::interval(REFRESH_EVERY);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let end = loop {
        let message = tokio::select! {
            m = inbound.message() => m,
            _ = refresh.tick() => {
                if let Some(response) = quotas.refresh(&mut stream)
                    && tx.send(Ok(response)).await.is_err()
                {
                    break End::ClientGone;
                }
                continue;
            }
            () = stopped(&mut stop) => {
                let _ = tx.send(Err(Status::unavailable("sluice is shutting down; reconnect"))).await;
                break End::ShuttingDown;
            }
        };
        let reports = match message {
            Ok(Some(r)) => r,
            Ok(None) => break End::ClientClosed,
            Err(status) => break End::Broken(status),
        };
        match quotas.report(&mut stream, &reports).await {
            Ok(response) => {
                if response.bucket_action.is_empty() {
                    continue;
                }
                if tx.send(Ok(response)).await.is_err() {
                    break End::ClientGone;
                }
            }
            Err(bad) => {
                let message = bad.to_string();
                let _ = tx
                    .send(Err(Status::invalid_argument(message.clone())))
                    .await;
                break End::Invalid(message);
            }
        }
    };
    let (id, buckets, reports) = (stream.id(), stream.buckets(), stream.reports());
    let domain = stream.domain().unwrap_or("").to_string();
    quotas.close(stream).await;
    let secs = started.elapsed().as_secs();
    match end {
        End::Invalid(reason) => {
            tracing::warn!(stream = id, %domain, buckets, reports, secs, %reason, "quota stream ended: bad report")
        }
        End::Broken(status) => {
            tracing::info!(stream = id, %domain, buckets, reports, secs, code = ?status.code(), "quota stream closed: transport error")
        }
        End::ClientClosed | End::ClientGone => {
            tracing::info!(stream = id, %domain, buckets, reports, secs, "quota stream closed")
        }
        End::ShuttingDown => {
            tracing::info!(stream = id, %domain, buckets, reports, secs, "quota stream closed: shutting down")
        }
    }
}
