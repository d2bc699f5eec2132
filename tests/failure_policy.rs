//! When the counter store fails, sluice answers by its failure policy instead of erroring.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use sluice::algorithms::Hits;
use sluice::clock::{ManualClock, Timestamp};
use sluice::config;
use sluice::limiter::{Descriptor, Limiter, Request};
use sluice::service::rls::{UNAVAILABLE_BODY, to_response};
use sluice::store::{Charge, CounterKey, FailurePolicy, Store, StoreError, Tally, Verdict};
use smallvec::smallvec;

/// A store whose backend is down.
struct DownStore;

impl Store for DownStore {
    async fn apply(
        &self,
        _: &[Charge<'_>],
        _: &mut [Verdict],
        _: Timestamp,
    ) -> Result<bool, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn tally(&self, _: &[Tally<'_>], _: &mut [u64], _: Timestamp) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn forget(&self, _: &[CounterKey]) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    fn tracked_keys(&self) -> usize {
        0
    }
    fn sweep_expired_at(&self, _: Timestamp) -> usize {
        0
    }
}

fn limiter(policy: FailurePolicy) -> Limiter<DownStore> {
    let cfg = config::parse(
        "domains:\n  - name: d\n    endpoints:\n      - path: /a\n        limits: [1/minute]\n",
        "t.yaml",
        |_| None,
    )
    .unwrap();
    Limiter::new(
        cfg.rules,
        DownStore,
        Arc::new(ManualClock::new(Timestamp::from_secs(1000))),
    )
    .with_failure_policy(policy)
}

fn req() -> Request<'static> {
    Request {
        domain: "d",
        descriptors: smallvec![Descriptor {
            entries: smallvec![("path", "/a"), ("remote_address", "192.0.2.1")],
            hits: Hits::Take(1),
            limit_override: None,
        }],
    }
}

#[tokio::test]
async fn store_down_with_allow_policy_lets_requests_through_and_counts_errors() {
    let l = limiter(FailurePolicy::Allow);
    for _ in 0..3 {
        let rules = l.rules_in_force();
        let d = l.decide(&rules, &req()).await;
        assert!(!d.over);
        assert!(d.statuses[0].limit.is_none());
    }
    assert_eq!(l.store_errors(), 3);
}

#[tokio::test]
async fn store_down_with_deny_policy_rejects_with_a_clear_body() {
    let l = limiter(FailurePolicy::Deny);
    let rules = l.rules_in_force();
    let d = l.decide(&rules, &req()).await;
    assert!(d.over && d.unavailable);
    let r = to_response(&d);
    assert_eq!(r.overall_code, 2);
    assert_eq!(String::from_utf8(r.raw_body).unwrap(), UNAVAILABLE_BODY);
    assert_eq!(l.store_errors(), 1);
}
