//! The Redis store against a real redis-server: the Lua script decides exactly as the Rust
//! algorithms do, keys expire, the script survives a flush, the over-limit cache, outages and
//! recovery, and cross-slot batches on a cluster.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice::algorithms::{Hits, Policy};
use sluice::clock::Timestamp;
use sluice::store::redis::{key_name, slot_of};
use sluice::store::{
    Charge, ChargeKind, CounterKey, MemoryStore, MemoryStoreOptions, RedisNodes, RedisOptions,
    RedisStore, Store, StoreError, Verdict,
};

use common::redis::{RedisFixture, RedisServer, options};

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const T0: u64 = 1_767_225_600 * S;

fn nz(v: u64) -> NonZeroU64 {
    NonZeroU64::new(v).unwrap()
}

async fn apply<St: Store>(
    store: &St,
    charges: &[Charge<'_>],
    at: u64,
) -> Result<(bool, Vec<Verdict>), StoreError> {
    let mut v = vec![Verdict::default(); charges.len()];
    let ok = store
        .apply(charges, &mut v, Timestamp::from_nanos(at))
        .await?;
    Ok((ok, v))
}

fn take(key: u128, policy: &Policy, hits: u64) -> Charge<'_> {
    Charge {
        key: CounterKey(key),
        policy,
        hits: Hits::Take(hits),
        kind: ChargeKind::Enforce,
    }
}

/// A random policy; `big` draws limits and windows near the script's exactness bounds.
fn random_policy(rng: &mut StdRng, big: bool) -> Policy {
    let limit = if big {
        rng.random_range(1..=u64::from(u32::MAX))
    } else {
        rng.random_range(0..12)
    };
    let window = if big {
        // Up to a year, in whole milliseconds.
        rng.random_range(1..=365 * 86_400_000u64) * MS
    } else if rng.random_bool(0.5) {
        rng.random_range(1..90) * S
    } else {
        rng.random_range(1..5_000) * MS
    };
    match rng.random_range(0..3) {
        0 => Policy::SlidingWindow {
            limit,
            window: nz(window),
        },
        1 => Policy::FixedWindow {
            limit,
            window: nz(window),
        },
        _ => {
            // Any nanosecond interval, bucket within the exact range (capacity * interval < 2^52).
            let capacity = if big {
                rng.random_range(1..1_000_000)
            } else {
                rng.random_range(1..6)
            };
            let max_interval = ((1u64 << 52) / capacity).min(10 * S);
            Policy::TokenBucket {
                capacity,
                interval: nz(rng.random_range(1..max_interval)),
            }
        }
    }
}

/// Drives the memory store (Rust `evaluate` plus the all-or-nothing rule) and the Redis script
/// with the same random batches at the same millisecond-aligned times and compares everything
/// they answer.
async fn equivalence(redis: &RedisStore, seed: u64, big: bool, steps: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let memory = MemoryStore::new(MemoryStoreOptions::default());
    let keys = 6u128;
    let base = u128::from(seed) << 64;
    let policies: Vec<Policy> = (0..keys).map(|_| random_policy(&mut rng, big)).collect();
    let mut now = T0 + rng.random_range(0..86_400_000u64) * MS;
    for step in 0..steps {
        // Mostly small steps, sometimes a long gap. Never backwards: state that expired stays
        // gone in Redis (its TTL or a delete), while the memory store can revive it until its
        // next sweep; with live state, a step back is tested below.
        now += match rng.random_range(0..100) {
            0..=4 => rng.random_range(0..(if big { 400 } else { 3 }) * 86_400_000u64) * MS,
            _ => rng.random_range(0..3_000u64) * MS,
        };
        let n = rng.random_range(1..=3usize);
        let mut chosen: Vec<u128> = Vec::new();
        while chosen.len() < n {
            let k = rng.random_range(0..keys);
            if !chosen.contains(&k) {
                chosen.push(k);
            }
        }
        let charges: Vec<Charge<'_>> = chosen
            .iter()
            .map(|&k| {
                let h = if big {
                    rng.random_range(0..1_000_000_000u64)
                } else {
                    rng.random_range(0..4)
                };
                Charge {
                    key: CounterKey(base | k),
                    policy: &policies[k as usize],
                    hits: if rng.random_bool(0.1) {
                        Hits::Return(h)
                    } else {
                        Hits::Take(h)
                    },
                    kind: match rng.random_range(0..10) {
                        0 => ChargeKind::Observe,
                        1 => ChargeKind::Shadow,
                        _ => ChargeKind::Enforce,
                    },
                }
            })
            .collect();
        let want = apply(&memory, &charges, now).await.unwrap();
        let got = apply(redis, &charges, now).await.unwrap();
        assert_eq!(
            got, want,
            "seed {seed} step {step} at {now}: {charges:?} (left: redis, right: memory)"
        );
    }
}

/// A store on `server` without the over-limit cache (which answers some batches without the
/// script, by design less completely than the script), so every batch runs the script.
fn script_only(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&RedisOptions {
        over_limit_cache: false,
        ..options(RedisNodes::Single(server.url()))
    })
    .unwrap()
}

#[tokio::test]
async fn the_redis_script_decides_exactly_like_the_rust_algorithms() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    for seed in 1..=6 {
        equivalence(&script_only(&server), seed, false, 400).await;
    }
}

#[tokio::test]
async fn the_redis_script_stays_exact_with_large_limits_and_year_long_windows() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    for seed in 101..=104 {
        equivalence(&script_only(&server), seed, true, 300).await;
    }
}

#[tokio::test]
async fn counters_carry_a_ttl_at_their_expiry() {
    let Some(fx) = RedisFixture::single() else {
        return;
    };
    let p = Policy::SlidingWindow {
        limit: 5,
        window: nz(60 * S),
    };
    let key = (9u128 << 64) | 1;
    apply(&fx.store, &[take(key, &p, 1)], T0 + 10 * S)
        .await
        .unwrap();
    let server = fx.server.as_ref().unwrap();
    let ttl: i64 = server
        .cli(&["PTTL", &key_name(CounterKey(key))])
        .trim()
        .parse()
        .unwrap();
    // Sliding window state matters until the end of the next window: 110 s from T0 + 10 s.
    assert!(ttl > 100_000 && ttl <= 110_000, "PTTL {ttl}");
}

#[tokio::test]
async fn the_script_is_reloaded_after_a_script_flush() {
    let Some(fx) = RedisFixture::single() else {
        return;
    };
    let p = Policy::FixedWindow {
        limit: 2,
        window: nz(60 * S),
    };
    assert!(apply(&fx.store, &[take(1, &p, 1)], T0).await.unwrap().0);
    fx.server.as_ref().unwrap().cli(&["SCRIPT", "FLUSH"]);
    let (ok, v) = apply(&fx.store, &[take(1, &p, 1)], T0).await.unwrap();
    assert!(ok);
    assert_eq!(v[0].remaining, 0);
}

#[tokio::test]
async fn redis_time_is_the_default_clock() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = RedisStore::connect(&RedisOptions {
        timeout: Duration::from_secs(2),
        ..RedisOptions::new(RedisNodes::Single(server.url()))
    })
    .unwrap();
    let p = Policy::FixedWindow {
        limit: 1,
        window: nz(3600 * S),
    };
    // The caller's time is ignored: both calls land in Redis's current hour (or, across an hour
    // boundary, the second one in the next: then it is admitted; retry once).
    let mut refused = false;
    for _ in 0..2 {
        let key = rand::random::<u128>();
        assert!(apply(&store, &[take(key, &p, 1)], 0).await.unwrap().0);
        let (ok, v) = apply(&store, &[take(key, &p, 1)], u64::MAX / 2)
            .await
            .unwrap();
        if !ok {
            assert!(v[0].reset_after <= 3600 * S);
            refused = true;
            break;
        }
    }
    assert!(refused);
}

#[tokio::test]
async fn a_key_over_its_limit_is_answered_locally_until_it_resets() {
    let Some(mut fx) = RedisFixture::single() else {
        return;
    };
    let full = Policy::FixedWindow {
        limit: 1,
        window: nz(60 * S),
    };
    let other = Policy::FixedWindow {
        limit: 100,
        window: nz(60 * S),
    };
    assert!(apply(&fx.store, &[take(1, &full, 1)], T0).await.unwrap().0);
    let (ok, v) = apply(&fx.store, &[take(1, &full, 1), take(2, &other, 1)], T0 + S)
        .await
        .unwrap();
    assert!(!ok);
    assert_eq!(v[0].reset_after, 59 * S);
    assert_eq!(
        v[1].remaining, 100,
        "not charged, reported without this request"
    );

    // With Redis gone, the cached denial is still answered, truthfully.
    fx.server.as_mut().unwrap().stop();
    let (ok, v) = apply(
        &fx.store,
        &[take(1, &full, 1), take(2, &other, 1)],
        T0 + 10 * S,
    )
    .await
    .unwrap();
    assert!(!ok);
    assert_eq!(
        v[0],
        Verdict {
            allowed: false,
            remaining: 0,
            reset_after: 50 * S
        }
    );
    assert_eq!(
        v[1],
        Verdict {
            allowed: true,
            remaining: 0,
            reset_after: 50 * S
        },
        "not looked up: nothing promised beyond this request's wait"
    );
    assert_eq!(fx.store.cache_hits(), 1);
    // Once the window resets, Redis is asked again (and is down).
    assert!(
        apply(&fx.store, &[take(1, &full, 1)], T0 + 60 * S)
            .await
            .is_err()
    );
    // A check (no hits) or more than one hit is never answered from the cache.
    assert!(
        apply(&fx.store, &[take(1, &full, 0)], T0 + 10 * S)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn an_outage_fails_within_the_deadline_and_service_resumes_by_itself() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let store = RedisStore::connect(&RedisOptions {
        timeout: Duration::from_millis(200),
        ..options(RedisNodes::Single(server.url()))
    })
    .unwrap();
    let p = Policy::FixedWindow {
        limit: 100,
        window: nz(60 * S),
    };
    assert!(apply(&store, &[take(1, &p, 1)], T0).await.unwrap().0);
    server.stop();
    for _ in 0..5 {
        let started = Instant::now();
        let err = apply(&store, &[take(1, &p, 1)], T0).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Timeout(_) | StoreError::Unavailable(_)),
            "{err:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(1_000),
            "{:?}",
            started.elapsed()
        );
    }
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok((ok, v)) = apply(&store, &[take(1, &p, 1)], T0).await {
            assert!(ok);
            // The restarted server is empty: counting starts again (and the script is reloaded).
            assert_eq!(v[0].remaining, 99);
            break;
        }
        assert!(Instant::now() < deadline, "no recovery after the restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_cross_slot_batch_refused_in_one_slot_gives_back_the_hits_of_the_others() {
    let Some(fx) = RedisFixture::cluster() else {
        return;
    };
    let small = Policy::FixedWindow {
        limit: 1,
        window: nz(60 * S),
    };
    let big = Policy::SlidingWindow {
        limit: 10,
        window: nz(60 * S),
    };
    let bucket = Policy::TokenBucket {
        capacity: 5,
        interval: nz(6 * S),
    };
    // Three client groups in three different slots (of different nodes, most likely).
    let (a, b, c) = ((1u128 << 64) | 1, (2u128 << 64) | 1, (3u128 << 64) | 1);
    assert!(slot_of(CounterKey(a)) != slot_of(CounterKey(b)));
    assert!(slot_of(CounterKey(b)) != slot_of(CounterKey(c)));
    let batch = |h| [take(a, &small, h), take(b, &big, 1), take(c, &bucket, 1)];
    let (ok, v) = apply(&fx.store, &batch(1), T0).await.unwrap();
    assert!(ok, "{v:?}");
    assert_eq!((v[1].remaining, v[2].remaining), (9, 4));
    // Slot of `a` refuses: the other slots committed, then got their hits back.
    let (ok, v) = apply(&fx.store, &batch(1), T0 + S).await.unwrap();
    assert!(!ok);
    assert!(!v[0].allowed && v[1].allowed && v[2].allowed);
    assert_eq!(
        (v[1].remaining, v[2].remaining),
        (9, 4),
        "reported without this request"
    );
    let (_, v) = apply(&fx.store, &[take(b, &big, 0), take(c, &bucket, 0)], T0 + S)
        .await
        .unwrap();
    assert_eq!((v[0].remaining, v[1].remaining), (9, 4), "hits given back");
}

#[tokio::test]
async fn a_clock_step_back_is_counted_like_the_memory_store() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let redis = script_only(&server);
    let memory = MemoryStore::new(MemoryStoreOptions::default());
    let policies = [
        Policy::SlidingWindow {
            limit: 3,
            window: nz(60 * S),
        },
        Policy::FixedWindow {
            limit: 3,
            window: nz(60 * S),
        },
        Policy::TokenBucket {
            capacity: 3,
            interval: nz(20 * S),
        },
    ];
    for (at, hits) in [
        (T0 + 130 * S, 2),
        (T0 + 70 * S, 1),
        (T0 + 10 * S, 1),
        (T0 + 131 * S, 1),
    ] {
        let charges: Vec<Charge<'_>> = policies
            .iter()
            .enumerate()
            .map(|(i, p)| take(i as u128, p, hits))
            .collect();
        let want = apply(&memory, &charges, at).await.unwrap();
        let got = apply(&redis, &charges, at).await.unwrap();
        assert_eq!(got, want, "at {at}");
    }
}

#[tokio::test]
async fn rediss_with_a_password_from_the_url_and_a_private_ca() {
    let Some((server, ca)) = RedisServer::start_tls("s3cret") else {
        return;
    };
    let url = format!("rediss://:s3cret@127.0.0.1:{}", server.port);
    let store_ca = ca.clone();
    let store = RedisStore::connect(&RedisOptions {
        tls_ca_file: Some(ca),
        ..options(RedisNodes::Single(url))
    })
    .unwrap();
    let p = Policy::FixedWindow {
        limit: 1,
        window: nz(60 * S),
    };
    assert!(apply(&store, &[take(1, &p, 1)], T0).await.unwrap().0);
    assert!(!apply(&store, &[take(1, &p, 1)], T0).await.unwrap().0);

    // A wrong password is an error, not a decision.
    let ca = store_ca;
    let wrong = RedisStore::connect(&RedisOptions {
        tls_ca_file: Some(ca),
        ..options(RedisNodes::Single(format!(
            "rediss://:nope@127.0.0.1:{}",
            server.port
        )))
    })
    .unwrap();
    assert!(apply(&wrong, &[take(2, &p, 1)], T0).await.is_err());
}

#[tokio::test]
async fn a_pure_check_of_an_unknown_key_writes_nothing_to_redis() {
    let Some(fx) = RedisFixture::single() else {
        return;
    };
    let p = Policy::SlidingWindow {
        limit: 5,
        window: nz(60 * S),
    };
    let key = (5u128 << 64) | 5;
    let (ok, v) = apply(&fx.store, &[take(key, &p, 0)], T0).await.unwrap();
    assert!(ok && v[0].remaining == 5);
    let server = fx.server.as_ref().unwrap();
    assert_eq!(
        server.cli(&["EXISTS", &key_name(CounterKey(key))]).trim(),
        "0"
    );
    apply(&fx.store, &[take(key, &p, 1)], T0).await.unwrap();
    assert_eq!(
        server.cli(&["EXISTS", &key_name(CounterKey(key))]).trim(),
        "1"
    );
}
