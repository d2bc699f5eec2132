//! A call whose client gives up takes its store work with it: the server awaits the decision in
//! the call's own task, so a client's RST_STREAM or a passed `grpc-timeout` (Envoy sends its
//! 50 ms) drops the store's future instead of leaving it to run on. Checked over the real server
//! with a store whose every call waits for ever and counts the calls still waiting.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use sluice::clock::Timestamp;
use sluice::config;
use sluice::store::{Charge, CounterKey, Store, StoreError, Tally, Verdict};

/// A store whose calls never complete; `waiting` counts those not yet dropped.
struct Stuck {
    waiting: Arc<AtomicUsize>,
}

/// Counts one call waiting until dropped.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Store for Stuck {
    fn apply(
        &self,
        _: &[Charge<'_>],
        _: &mut [Verdict],
        _: Timestamp,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let waiting = Waiting(self.waiting.clone());
        async move {
            let _waiting = waiting;
            std::future::pending::<Result<bool, StoreError>>().await
        }
    }
    async fn tally(&self, _: &[Tally<'_>], _: &mut [u64], _: Timestamp) -> Result<(), StoreError> {
        Ok(())
    }
    async fn forget(&self, _: &[CounterKey]) -> Result<(), StoreError> {
        Ok(())
    }
    fn tracked_keys(&self) -> usize {
        0
    }
    fn sweep_expired_at(&self, _: Timestamp) -> usize {
        0
    }
}

async fn server() -> (TestServer<Stuck>, Arc<AtomicUsize>) {
    let text = std::fs::read_to_string(repo_path("config/sluice.yaml")).unwrap();
    let cfg = config::parse(&text, "config/sluice.yaml", |_| None).unwrap();
    let waiting = Arc::new(AtomicUsize::new(0));
    let store = Stuck {
        waiting: waiting.clone(),
    };
    (
        TestServer::start_store(cfg, Setup::default(), store).await,
        waiting,
    )
}

/// Waits until `waiting` holds `n`, for at most 5 s.
async fn until_waiting(waiting: &AtomicUsize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while waiting.load(Ordering::SeqCst) != n {
        assert!(
            Instant::now() < deadline,
            "store calls waiting: {}, expected {n}",
            waiting.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_call_drops_its_store_work() {
    let (srv, waiting) = server().await;
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let mut client = srv.client.clone();
            tokio::spawn(async move {
                client
                    .should_rate_limit(training("/api/training/execute", &format!("10.1.0.{i}")))
                    .await
            })
        })
        .collect();
    until_waiting(&waiting, 20).await;
    // The client gives up: each call's stream is reset.
    for call in calls {
        call.abort();
    }
    until_waiting(&waiting, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_grpc_timeout_drops_its_store_work() {
    let (srv, waiting) = server().await;
    let mut req = tonic::Request::new(training("/api/training/execute", "10.1.1.1"));
    req.set_timeout(Duration::from_millis(200));
    let status = srv
        .client
        .clone()
        .should_rate_limit(req)
        .await
        .expect_err("the store never answers");
    assert!(
        matches!(
            status.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        "{status:?}"
    );
    until_waiting(&waiting, 0).await;
}
