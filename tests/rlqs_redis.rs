//! The quota ledger in Redis (one server and a three-master cluster): the same answers as the
//! memory ledger for the same calls, two replicas dividing one limit between their Envoys, and
//! the last assignment kept while Redis is away. Time comes from the test's clock throughout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::T0;
use common::redis::{RedisCluster, RedisServer, options};
use sluice::clock::{Clock, ManualClock, Timestamp};
use sluice::config;
use sluice::limiter::Limiter;
use sluice::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action::BucketAction as Action;
use sluice::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage;
use sluice::proto::envoy::service::rate_limit_quota::v3::{
    BucketId, RateLimitQuotaResponse, RateLimitQuotaUsageReports,
};
use sluice::proto::envoy::r#type::v3::rate_limit_strategy::{BlanketRule, Strategy};
use sluice::quota::assignment::Assignment;
use sluice::quota::ledger::{CLAIM_TTL, Claim, Claimant, Grant, Ledger, MemoryLedger, Totals};
use sluice::quota::redis_ledger::RedisLedger;
use sluice::quota::{AnyLedger, Quotas, Settings};
use sluice::store::redis::RedisHandle;
use sluice::store::{CounterKey, RedisNodes, RedisOptions, RedisStore, StoreError};

// ---------------------------------------------------------------------------------------------
// Conformance: the same calls against the memory ledger and the Redis ledger.

/// A pool: `group` is the client group (the hash tag, so the cluster slot).
fn pool(group: u64, n: u64) -> CounterKey {
    CounterKey((u128::from(group) << 64) | u128::from(n))
}

/// Claimants with high bits set, so the whole 128-bit field is exercised.
fn who(n: u64) -> Claimant {
    Claimant((0xfeed_u128 << 112) | u128::from(n))
}

fn claim(key: CounterKey, claimant: Claimant, demand: f64) -> Claim {
    Claim {
        key,
        claimant,
        demand,
    }
}

fn grant(key: CounterKey, claimant: Claimant, assigned: f64) -> Grant {
    Grant {
        key,
        claimant,
        assigned,
    }
}

#[derive(Debug, Clone)]
enum Step {
    Claim(Vec<Claim>, Timestamp),
    Grant(Vec<Grant>, Timestamp),
    Release(Vec<(CounterKey, Claimant)>),
}

/// The edge cases, written out: entries at and just before their expiry, a claimant's grant
/// kept while live and lost once expired, a grant for a claimant that never claimed, a grant
/// to an expired entry (its demand stays), several claims on one pool in one call, releases
/// of what does not exist.
fn edge_cases() -> Vec<Step> {
    let t0 = Timestamp::from_secs(T0);
    let at = |d: Duration| t0.saturating_add(d);
    let ns = Duration::from_nanos;
    let (p, q, r) = (pool(1, 1), pool(1, 2), pool(9, 1));
    let (a, b, c, d, e) = (who(1), who(2), who(3), who(4), who(5));
    vec![
        Step::Claim(vec![claim(p, a, 4.0)], t0),
        Step::Grant(vec![grant(p, a, 10.0)], t0),
        Step::Claim(
            vec![
                claim(p, b, 6.0),
                claim(q, b, 0.1),
                claim(p, c, 0.2),
                claim(r, c, 1.0 / 3.0),
                claim(p, b, 7.5),
            ],
            t0,
        ),
        Step::Grant(vec![grant(p, b, 0.3), grant(q, b, 1e-7)], t0),
        // One nanosecond before expiry: a's grant still counts.
        Step::Claim(vec![claim(p, a, 5.0)], at(CLAIM_TTL - ns(1))),
        // At expiry b and c are gone (and b comes back without its grant); a, renewed, stays.
        Step::Claim(vec![claim(p, b, 6.0), claim(q, c, 2.0)], at(CLAIM_TTL)),
        // A grant for a claimant with no entry: demand 0, counted.
        Step::Grant(vec![grant(p, d, 3.0)], at(CLAIM_TTL)),
        Step::Claim(vec![claim(p, a, 5.0)], at(CLAIM_TTL)),
        // Releases of a claimant, of a pool nobody holds, and of a claimant not in the pool.
        Step::Release(vec![(p, a), (pool(77, 7), a), (q, e)]),
        Step::Claim(vec![claim(p, e, 1.0)], at(CLAIM_TTL + ns(1))),
        // Long after: b's entry expired; a grant to it keeps its demand.
        Step::Grant(vec![grant(p, b, 2.5)], at(CLAIM_TTL * 3)),
        Step::Claim(vec![claim(p, e, 1.0), claim(q, e, 0.0)], at(CLAIM_TTL * 3)),
        Step::Release(vec![(p, b), (p, e), (p, d), (q, c), (q, e), (r, c)]),
        Step::Claim(vec![claim(p, a, 9.0), claim(r, a, 9.0)], at(CLAIM_TTL * 3)),
    ]
}

/// xorshift64*: a fixed, reproducible sequence without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A long random sequence over eight pools in four client groups from `groups` on, with time
/// moving by up to six seconds (or to a nanosecond short of an expiry) between steps.
fn random_steps(seed: u64, steps: usize, groups: u64) -> Vec<Step> {
    let mut rng = Rng(seed);
    let pools: Vec<CounterKey> = (0..8).map(|i| pool(groups + i % 4, i)).collect();
    let mut now = Timestamp::from_secs(T0);
    let mut out = Vec::new();
    for _ in 0..steps {
        now = match rng.below(10) {
            0 => now.saturating_add(CLAIM_TTL - Duration::from_nanos(1)),
            1..=4 => now,
            _ => now.saturating_add(Duration::from_millis(rng.below(6_000))),
        };
        let n = 1 + rng.below(12) as usize;
        let kind = rng.below(6);
        let mut pick = || {
            let key = pools[rng.below(pools.len() as u64) as usize];
            let claimant = who(rng.below(10));
            let rate = rng.below(1_000) as f64 / 7.0;
            (key, claimant, rate)
        };
        let step = match kind {
            0..=2 => Step::Claim(
                (0..n)
                    .map(|_| {
                        let (k, w, r) = pick();
                        claim(k, w, r)
                    })
                    .collect(),
                now,
            ),
            3 | 4 => Step::Grant(
                (0..n)
                    .map(|_| {
                        let (k, w, r) = pick();
                        grant(k, w, r)
                    })
                    .collect(),
                now,
            ),
            _ => Step::Release(
                (0..n.min(3))
                    .map(|_| {
                        let (k, w, _) = pick();
                        (k, w)
                    })
                    .collect(),
            ),
        };
        out.push(step);
    }
    out
}

/// A report's worth of claims larger than one script call: a pool of 600 claimants and 500
/// pools of one, in 50 client groups; then their grants, and the claims again.
fn large_batches() -> Vec<Step> {
    let t0 = Timestamp::from_secs(T0 + 1_000);
    let global = pool(1_000, 0);
    let claims: Vec<Claim> = (0..600u64)
        .flat_map(|i| {
            let mine = claim(pool(200 + i % 50, i), who(1_000 + i), (i % 13) as f64 / 3.0);
            let shared = claim(global, who(1_000 + i), (i % 7) as f64 / 3.0);
            if i < 500 {
                vec![mine, shared]
            } else {
                vec![shared]
            }
        })
        .collect();
    let grants: Vec<Grant> = claims
        .iter()
        .map(|c| grant(c.key, c.claimant, c.demand / 10.0))
        .collect();
    vec![
        Step::Claim(claims.clone(), t0),
        Step::Grant(grants, t0),
        Step::Claim(claims, t0.saturating_add(Duration::from_secs(5))),
    ]
}

/// Runs `steps` on both ledgers and compares every claim's totals.
async fn conforms(redis: &RedisLedger, steps: &[Step], what: &str) {
    let memory = MemoryLedger::default();
    for (n, step) in steps.iter().enumerate() {
        match step {
            Step::Claim(claims, now) => {
                let mut want = vec![Totals::default(); claims.len()];
                let mut got = vec![Totals::default(); claims.len()];
                memory.claim(claims, *now, &mut want).await.unwrap();
                redis.claim(claims, *now, &mut got).await.unwrap();
                for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(1.0);
                    assert!(
                        w.claimants == g.claimants
                            && close(w.demand, g.demand)
                            && close(w.assigned_others, g.assigned_others),
                        "{what}, step {n}, claim {i} ({:?}): memory {w:?}, redis {g:?}",
                        claims[i]
                    );
                }
            }
            Step::Grant(grants, now) => {
                memory.grant(grants, *now).await.unwrap();
                redis.grant(grants, *now).await.unwrap();
            }
            Step::Release(released) => {
                memory.release(released).await.unwrap();
                redis.release(released).await.unwrap();
            }
        }
    }
}

async fn redis_gives_the_memory_ledgers_totals(nodes: RedisNodes) {
    let handle = RedisHandle::connect(&options(nodes)).unwrap();
    // Each sequence has pools of its own (client groups 1-77, 100-123, 200-249 and 1000), as
    // each gets a fresh memory ledger.
    conforms(
        &RedisLedger::new(handle.clone()),
        &edge_cases(),
        "edge cases",
    )
    .await;
    for (k, seed) in [1, 0x5eed, 0xdead_beef].into_iter().enumerate() {
        let steps = random_steps(seed, 400, 100 + 10 * k as u64);
        conforms(
            &RedisLedger::new(handle.clone()),
            &steps,
            &format!("seed {seed:#x}"),
        )
        .await;
    }
    conforms(&RedisLedger::new(handle), &large_batches(), "large batches").await;
}

#[tokio::test]
async fn one_redis_gives_the_memory_ledgers_totals() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    redis_gives_the_memory_ledgers_totals(RedisNodes::Single(server.url())).await;
}

#[tokio::test]
async fn a_redis_cluster_gives_the_memory_ledgers_totals() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    redis_gives_the_memory_ledgers_totals(RedisNodes::Cluster(cluster.urls())).await;
}

// ---------------------------------------------------------------------------------------------
// The engine: replicas sharing one Redis divide a limit between their Envoys.

/// The quota unit tests' config: `/a` allows each client 1 a second, the domain 10.
const CONFIG: &str = "\
domains:
  - name: t
    client: [remote_address]
    endpoint_entry: path
    global: [600/minute]
    endpoints:
      - path: /a
        limits: [60/minute]
";

const A: &[(&str, &str)] = &[("path", "/a"), ("remote_address", "192.0.2.1")];

/// One sluice replica's quota engine: its own limiter and Redis store, the shared key secret.
struct Replica {
    limiter: Arc<Limiter<RedisStore>>,
    quotas: Quotas<RedisStore>,
}

fn replica(nodes: &RedisNodes, clock: &Arc<ManualClock>, timeout: Duration) -> Replica {
    let cfg = config::parse(CONFIG, "t.yaml", |_| None).unwrap();
    let store = RedisStore::connect(&RedisOptions {
        timeout,
        ..options(nodes.clone())
    })
    .unwrap();
    let limiter = Arc::new(
        Limiter::new(cfg.rules, store, clock.clone()).with_key_secret(b"shared by the replicas"),
    );
    let ledger = AnyLedger::for_store(limiter.store());
    assert!(matches!(ledger, AnyLedger::Redis(_)));
    Replica {
        quotas: Quotas::new(limiter.clone(), ledger, Settings::default()),
        limiter,
    }
}

fn usage(entries: &[(&str, &str)], allowed: u64, denied: u64) -> BucketQuotaUsage {
    BucketQuotaUsage {
        bucket_id: Some(BucketId {
            bucket: entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }),
        time_elapsed: Some(prost_types::Duration {
            seconds: 5,
            nanos: 0,
        }),
        num_requests_allowed: allowed,
        num_requests_denied: denied,
        last_report: None,
    }
}

fn report(usages: Vec<BucketQuotaUsage>) -> RateLimitQuotaUsageReports {
    RateLimitQuotaUsageReports {
        domain: "t".into(),
        bucket_quota_usages: usages,
    }
}

/// The assignment of a response's only bucket.
fn only(r: &RateLimitQuotaResponse) -> Assignment {
    assert_eq!(r.bucket_action.len(), 1, "{r:?}");
    assignment(&r.bucket_action[0].bucket_action)
}

fn assignment(a: &Option<Action>) -> Assignment {
    let Some(Action::QuotaAssignmentAction(q)) = a else {
        panic!("not an assignment: {a:?}");
    };
    match q
        .rate_limit_strategy
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
    {
        Some(Strategy::BlanketRule(r)) if *r == BlanketRule::AllowAll as i32 => {
            Assignment::AllowAll
        }
        Some(Strategy::BlanketRule(_)) => Assignment::DenyAll,
        Some(Strategy::TokenBucket(tb)) => Assignment::TokenBucket {
            max_tokens: tb.max_tokens,
            tokens_per_fill: tb.tokens_per_fill.unwrap(),
            fill_interval_secs: u32::try_from(tb.fill_interval.unwrap().seconds).unwrap(),
        },
        other => panic!("unexpected strategy {other:?}"),
    }
}

async fn two_replicas_divide_one_limit(nodes: RedisNodes) {
    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(T0)));
    let (r1, r2) = (
        replica(&nodes, &clock, Duration::from_secs(2)),
        replica(&nodes, &clock, Duration::from_secs(2)),
    );
    // One Envoy on each replica, the same bucket, demand 3:1.
    let mut one = r1.quotas.open("envoy-1".into()).unwrap();
    let mut two = r2.quotas.open("envoy-2".into()).unwrap();
    let mut last = (0.0, 0.0);
    for round in 0..6 {
        let a = r1
            .quotas
            .report(&mut one, &report(vec![usage(A, 60, 90)]))
            .await
            .unwrap();
        let b = r2
            .quotas
            .report(&mut two, &report(vec![usage(A, 20, 30)]))
            .await
            .unwrap();
        let (ra, rb) = (only(&a).rate(), only(&b).rate());
        if round > 0 {
            // Past the newcomer's first report, together at most the limit (1 a second), which
            // two replicas with ledgers of their own would each assign in full.
            assert!(ra + rb <= 1.0 + 1e-9, "round {round}: {ra} + {rb}");
        }
        last = (ra, rb);
        clock.advance(Duration::from_secs(5));
    }
    let (ra, rb) = last;
    // Demand 3:1 above the floors: about 0.725 and 0.275, as on one replica.
    assert!((ra - 0.725).abs() < 0.08, "{ra}");
    assert!((rb - 0.275).abs() < 0.08, "{rb}");
    assert!(ra + rb > 0.9, "the limit is used: {ra} + {rb}");
    for r in [&r1, &r2] {
        assert_eq!(r.quotas.registry().ledger_errors.load(Relaxed), 0);
    }

    // The stream on the first replica ends: the other replica's Envoy takes the whole limit at
    // its next report.
    r1.quotas.close(one).await;
    let b = r2
        .quotas
        .report(&mut two, &report(vec![usage(A, 20, 30)]))
        .await
        .unwrap();
    assert_eq!(only(&b).rate(), 1.0);
}

#[tokio::test]
async fn two_replicas_on_one_redis_divide_one_limit_by_demand() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    two_replicas_divide_one_limit(RedisNodes::Single(server.url())).await;
}

#[tokio::test]
async fn two_replicas_on_a_redis_cluster_divide_one_limit_by_demand() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    two_replicas_divide_one_limit(RedisNodes::Cluster(cluster.urls())).await;
}

// ---------------------------------------------------------------------------------------------
// Redis away: the ledger fails within its deadline; Envoy keeps what it was told.

#[tokio::test]
async fn without_redis_buckets_keep_their_last_assignment() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let deadline = Duration::from_millis(300);
    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(T0)));
    let r = replica(&RedisNodes::Single(server.url()), &clock, deadline);
    let errors = || r.quotas.registry().ledger_errors.load(Relaxed);
    let mut s = r.quotas.open("envoy".into()).unwrap();
    let assigned = only(
        &r.quotas
            .report(&mut s, &report(vec![usage(A, 1, 0)]))
            .await
            .unwrap(),
    );
    assert!(matches!(assigned, Assignment::TokenBucket { .. }));
    assert_eq!(errors(), 0);

    // Redis hangs (writes paused): a claim gives up at the deadline.
    let ledger = RedisLedger::new(r.limiter.store().handle().clone());
    let pool = CounterKey(1);
    let mut totals = [Totals::default()];
    server.cli(&["CLIENT", "PAUSE", "10000", "WRITE"]);
    let started = Instant::now();
    let e = ledger
        .claim(&[claim(pool, who(1), 1.0)], clock.now(), &mut totals)
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, StoreError::Timeout(_)), "{e:?}");
    assert!(
        took >= deadline && took < deadline + Duration::from_secs(1),
        "{took:?}"
    );
    server.cli(&["CLIENT", "UNPAUSE"]);

    // Redis gone: the bucket keeps its assignment, a new bucket gets the failure policy
    // (allow), and each failure is counted.
    server.stop();
    clock.advance(Duration::from_secs(5));
    let started = Instant::now();
    let again = r
        .quotas
        .report(
            &mut s,
            &report(vec![
                usage(A, 3, 0),
                usage(&[("path", "/a"), ("remote_address", "192.0.2.2")], 1, 0),
            ]),
        )
        .await
        .unwrap();
    assert!(started.elapsed() < 3 * deadline + Duration::from_secs(1));
    assert_eq!(again.bucket_action.len(), 2);
    assert_eq!(assignment(&again.bucket_action[0].bucket_action), assigned);
    assert_eq!(
        assignment(&again.bucket_action[1].bucket_action),
        Assignment::AllowAll
    );
    let failed = errors();
    assert!(failed >= 1, "the ledger's failures are counted");

    // Redis back (empty): the next reports divide again, without errors.
    server.restart();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        clock.advance(Duration::from_secs(5));
        let before = errors();
        let r2 = r
            .quotas
            .report(&mut s, &report(vec![usage(A, 3, 0)]))
            .await
            .unwrap();
        if errors() == before {
            assert!(matches!(only(&r2), Assignment::TokenBucket { .. }));
            break;
        }
        assert!(Instant::now() < until, "the ledger did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// What a large report costs.

/// Script calls Redis has run (summed over a cluster's nodes).
fn evalsha_calls(nodes: &[&RedisServer]) -> u64 {
    nodes
        .iter()
        .map(|n| {
            let stats = n.cli(&["INFO", "commandstats"]);
            stats
                .lines()
                .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
                .and_then(|rest| rest.split(',').next())
                .map_or(0, |c| c.trim().parse::<u64>().unwrap())
        })
        .sum()
}

/// A stream reporting 1,000 buckets of distinct clients (2,000 claims: each client's `/a` pool
/// and the domain's). Prints the median time of a report (`--no-capture` shows it).
async fn a_report_of_a_thousand_buckets(nodes: RedisNodes, servers: &[&RedisServer]) -> u64 {
    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(T0)));
    let r = replica(&nodes, &clock, Duration::from_secs(2));
    let addrs: Vec<String> = (0..1_000)
        .map(|i| format!("10.0.{}.{}", i / 250, i % 250))
        .collect();
    let usages = || {
        report(
            addrs
                .iter()
                .map(|a| usage(&[("path", "/a"), ("remote_address", a)], 3, 0))
                .collect(),
        )
    };
    let mut s = r.quotas.open("envoy".into()).unwrap();
    // The first report loads the script.
    r.quotas.report(&mut s, &usages()).await.unwrap();
    let mut times = Vec::new();
    let calls_before = evalsha_calls(servers);
    const REPORTS: u64 = 7;
    for _ in 0..REPORTS {
        clock.advance(Duration::from_secs(5));
        let started = Instant::now();
        let answer = r.quotas.report(&mut s, &usages()).await.unwrap();
        times.push(started.elapsed());
        assert_eq!(answer.bucket_action.len(), 1_000);
        for a in &answer.bucket_action {
            assert!(matches!(
                assignment(&a.bucket_action),
                Assignment::TokenBucket { .. }
            ));
        }
    }
    assert_eq!(r.quotas.registry().ledger_errors.load(Relaxed), 0);
    let calls = (evalsha_calls(servers) - calls_before) / REPORTS;
    times.sort();
    eprintln!(
        "a report of 1,000 buckets ({}): median {:?} (min {:?}, max {:?}), {calls} script calls",
        if servers.len() > 1 {
            "cluster"
        } else {
            "one server"
        },
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
    );
    calls
}

#[tokio::test]
async fn a_report_of_a_thousand_buckets_takes_a_few_script_calls_on_one_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let calls = a_report_of_a_thousand_buckets(RedisNodes::Single(server.url()), &[&server]).await;
    // Claims then grants, each 2,000 operations in calls of about 256 (the domain's pool of
    // 1,000 whole in one): not one call per bucket.
    assert!((4..=14).contains(&calls), "{calls}");
}

#[tokio::test]
async fn a_report_of_a_thousand_buckets_takes_a_call_per_slot_on_a_redis_cluster() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let servers: Vec<&RedisServer> = cluster.nodes.iter().collect();
    let calls = a_report_of_a_thousand_buckets(RedisNodes::Cluster(cluster.urls()), &servers).await;
    // A script touches one slot: claims and grants each take one call per slot among the
    // 1,001 pools (at most 1,001), not one per operation (2,000).
    assert!(calls <= 2 * 1_001, "{calls}");
}
