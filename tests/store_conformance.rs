//! Behaviour every [`Store`] must have, written once and run against each backend: memory, one
//! real redis-server, and a three-master Redis Cluster (skipped loudly without redis-server,
//! failed when `CI=true`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::num::NonZeroU64;
use std::sync::Arc;

use sluice::algorithms::{Hits, Policy};
use sluice::clock::Timestamp;
use sluice::store::{
    Charge, ChargeKind, CounterKey, MemoryStore, MemoryStoreOptions, Store, Verdict,
};

const S: u64 = 1_000_000_000;
const T0: u64 = 1_767_225_600 * S;

fn per_minute(limit: u64) -> Policy {
    Policy::FixedWindow {
        limit,
        window: NonZeroU64::new(60 * S).unwrap(),
    }
}

fn charge(key: u128, policy: &Policy, hits: u64) -> Charge<'_> {
    Charge {
        key: CounterKey(key),
        policy,
        hits: Hits::Take(hits),
        kind: ChargeKind::Enforce,
    }
}

async fn apply<S: Store>(store: &S, charges: &[Charge<'_>], at: u64) -> (bool, Vec<Verdict>) {
    let mut v = vec![Verdict::default(); charges.len()];
    let committed = store
        .apply(charges, &mut v, Timestamp::from_nanos(at))
        .await
        .unwrap();
    (committed, v)
}

async fn all_or_nothing<S: Store>(store: S) {
    let small = per_minute(1);
    let big = per_minute(10);
    let (ok, v) = apply(&store, &[charge(1, &small, 1), charge(2, &big, 1)], T0).await;
    assert!(ok && v.iter().all(|v| v.allowed));
    assert_eq!(v[1].remaining, 9);
    // Key 1 is now full: the batch is refused and key 2 is not charged.
    let (ok, v) = apply(&store, &[charge(1, &small, 1), charge(2, &big, 1)], T0).await;
    assert!(!ok);
    assert!(!v[0].allowed && v[1].allowed);
    assert_eq!(v[1].remaining, 9, "reported without the refused hit");
    let (_, v) = apply(&store, &[charge(2, &big, 0)], T0).await;
    assert_eq!(v[0].remaining, 9, "key 2 was not charged");
}

async fn shadow_denials_do_not_block<S: Store>(store: S) {
    let small = per_minute(1);
    let big = per_minute(10);
    apply(&store, &[charge(1, &small, 1)], T0).await;
    let shadow = Charge {
        kind: ChargeKind::Shadow,
        ..charge(1, &small, 1)
    };
    let (ok, v) = apply(&store, &[shadow, charge(2, &big, 1)], T0).await;
    assert!(ok);
    assert!(!v[0].allowed);
    assert_eq!(v[1].remaining, 9);
}

async fn observed_charges_count_even_when_the_request_is_refused<S: Store>(store: S) {
    let small = per_minute(1);
    let watch = per_minute(100);
    apply(&store, &[charge(1, &small, 1)], T0).await;
    let observe = Charge {
        kind: ChargeKind::Observe,
        ..charge(3, &watch, 1)
    };
    let (ok, _) = apply(&store, &[charge(1, &small, 1), observe], T0).await;
    assert!(!ok);
    let (_, v) = apply(&store, &[charge(3, &watch, 0)], T0).await;
    assert_eq!(v[0].remaining, 99, "the observed hit was kept");
}

async fn forget_resets_a_counter<S: Store>(store: S) {
    let p = per_minute(1);
    apply(&store, &[charge(7, &p, 1)], T0).await;
    assert!(!apply(&store, &[charge(7, &p, 1)], T0).await.0);
    store.forget(&[CounterKey(7)]).await.unwrap();
    assert!(apply(&store, &[charge(7, &p, 1)], T0).await.0);
}

async fn check_only_leaves_no_trace<S: Store>(store: S) {
    let p = per_minute(5);
    let before = store.tracked_keys();
    apply(&store, &[charge(99, &p, 0)], T0).await;
    assert_eq!(store.tracked_keys(), before);
}

async fn concurrent_callers_never_exceed_the_limit<S: Store>(store: S) {
    let store = Arc::new(store);
    let p = per_minute(100);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0u32;
            for _ in 0..50 {
                let (ok, _) = apply(&*store, &[charge(5, &p, 1)], T0).await;
                admitted += u32::from(ok);
            }
            admitted
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 100);
}

macro_rules! conformance {
    ($name:ident, $make:expr) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn a_refused_batch_charges_nothing() {
                let Some(store) = $make else { return };
                all_or_nothing(store).await;
            }
            #[tokio::test]
            async fn shadow_denials_do_not_block_the_batch() {
                let Some(store) = $make else { return };
                shadow_denials_do_not_block(store).await;
            }
            #[tokio::test]
            async fn observed_charges_count_when_refused() {
                let Some(store) = $make else { return };
                observed_charges_count_even_when_the_request_is_refused(store).await;
            }
            #[tokio::test]
            async fn forgetting_a_key_resets_it() {
                let Some(store) = $make else { return };
                forget_resets_a_counter(store).await;
            }
            #[tokio::test]
            async fn a_pure_check_tracks_no_key() {
                let Some(store) = $make else { return };
                check_only_leaves_no_trace(store).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_callers_admit_exactly_the_limit() {
                let Some(store) = $make else { return };
                concurrent_callers_never_exceed_the_limit(store).await;
            }
        }
    };
}

conformance!(
    memory,
    Some(MemoryStore::new(MemoryStoreOptions::default()))
);
conformance!(redis, common::redis::RedisFixture::single());
conformance!(redis_cluster, common::redis::RedisFixture::cluster());

#[tokio::test]
async fn memory_store_stays_within_max_keys() {
    let store = MemoryStore::new(MemoryStoreOptions { max_keys: 2_560 });
    let p = per_minute(5);
    for k in 0..20_000u128 {
        // Spread keys over all shards like real hashes do.
        let key = k.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
        apply(&store, &[charge(key, &p, 1)], T0).await;
    }
    assert!(store.tracked_keys() <= 2_560, "{}", store.tracked_keys());
    assert!(store.evictions() > 0);
}

#[tokio::test]
async fn memory_store_sweeps_expired_keys() {
    let store = MemoryStore::new(MemoryStoreOptions::default());
    let p = per_minute(5);
    for k in 0..100u128 {
        apply(&store, &[charge(k << 100, &p, 1)], T0).await;
    }
    assert_eq!(store.tracked_keys(), 100);
    assert_eq!(store.sweep_at(Timestamp::from_nanos(T0 + 30 * S)), 0);
    assert_eq!(store.sweep_at(Timestamp::from_nanos(T0 + 60 * S)), 100);
    assert_eq!(store.tracked_keys(), 0);
}
