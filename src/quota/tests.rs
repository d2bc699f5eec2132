//! Streams against a real limiter and ledger under a manual clock: what each report is answered.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::clock::{Clock, ManualClock};
use crate::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage;
use crate::store::{MemoryStore, MemoryStoreOptions};

const CONFIG: &str = "\
domains:
  - name: t
    client: [remote_address]
    endpoint_entry: path
    global: [600/minute]
    endpoints:
      - path: /a
        limits: [60/minute]
      - path: /b
        limits: [300/minute]
        burst: 20
        refill: 1 per second
";

struct Fixture {
    clock: Arc<ManualClock>,
    limiter: Arc<Limiter<MemoryStore>>,
    quotas: Quotas<MemoryStore>,
}

fn fixture() -> Fixture {
    fixture_with(CONFIG)
}

fn fixture_with(yaml: &str) -> Fixture {
    let config = crate::config::parse(yaml, "t.yaml", |_| None).expect("config");
    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_000_000)));
    let limiter = Arc::new(Limiter::new(
        config.rules,
        MemoryStore::new(MemoryStoreOptions::default()),
        clock.clone(),
    ));
    let quotas = Quotas::new(
        limiter.clone(),
        AnyLedger::Memory(ledger::MemoryLedger::default()),
        Settings::default(),
    );
    Fixture {
        clock,
        limiter,
        quotas,
    }
}

fn id(entries: &[(&str, &str)]) -> BucketId {
    BucketId {
        bucket: entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn usage(entries: &[(&str, &str)], allowed: u64, denied: u64) -> BucketQuotaUsage {
    BucketQuotaUsage {
        bucket_id: Some(id(entries)),
        time_elapsed: Some(prost_types::Duration {
            seconds: 5,
            nanos: 0,
        }),
        num_requests_allowed: allowed,
        num_requests_denied: denied,
        last_report: None,
    }
}

fn report(domain: &str, usages: Vec<BucketQuotaUsage>) -> RateLimitQuotaUsageReports {
    RateLimitQuotaUsageReports {
        domain: domain.to_string(),
        bucket_quota_usages: usages,
    }
}

const A: &[(&str, &str)] = &[("path", "/a"), ("remote_address", "192.0.2.1")];

/// The one action of a response, as (assignment, ttl seconds).
fn only(r: &RateLimitQuotaResponse) -> (Assignment, i64) {
    assert_eq!(r.bucket_action.len(), 1, "{r:?}");
    action(&r.bucket_action[0])
}

fn action(a: &BucketAction) -> (Assignment, i64) {
    let Some(Action::QuotaAssignmentAction(q)) = &a.bucket_action else {
        panic!("not an assignment: {a:?}");
    };
    let ttl = q.assignment_time_to_live.as_ref().expect("ttl").seconds;
    let strategy = q
        .rate_limit_strategy
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .expect("strategy");
    let a = match strategy {
        Strategy::BlanketRule(r) if *r == BlanketRule::AllowAll as i32 => Assignment::AllowAll,
        Strategy::BlanketRule(_) => Assignment::DenyAll,
        Strategy::TokenBucket(tb) => Assignment::TokenBucket {
            max_tokens: tb.max_tokens,
            tokens_per_fill: tb.tokens_per_fill.expect("tokens_per_fill"),
            fill_interval_secs: u32::try_from(tb.fill_interval.expect("fill_interval").seconds)
                .unwrap(),
        },
        Strategy::RequestsPerTimeUnit(_) => panic!("Envoy 1.40 does not enforce these"),
    };
    (a, ttl)
}

fn rate(a: Assignment) -> f64 {
    a.rate()
}

#[tokio::test]
async fn one_envoy_is_assigned_the_whole_limit() {
    let f = fixture();
    let mut s = f.quotas.open("peer".into()).unwrap();
    let r = f
        .quotas
        .report(&mut s, &report("t", vec![usage(A, 1, 0)]))
        .await
        .unwrap();
    // 60/minute for the client (and 600/minute for everyone): 1 a second, 60 deep.
    assert_eq!(
        only(&r),
        (
            Assignment::TokenBucket {
                max_tokens: 60,
                tokens_per_fill: 3600,
                fill_interval_secs: 3600
            },
            15
        )
    );
    // Refreshed, unchanged, on every report: Envoy keeps its bucket and extends the TTL.
    for demand in [0, 300, 5] {
        f.clock.advance(Duration::from_secs(5));
        let again = f
            .quotas
            .report(&mut s, &report("t", vec![usage(A, demand, 0)]))
            .await
            .unwrap();
        assert_eq!(only(&again), only(&r));
    }
}

#[tokio::test]
async fn a_burst_limit_keeps_its_size_and_refill() {
    let f = fixture();
    let mut s = f.quotas.open("peer".into()).unwrap();
    let b = &[("path", "/b"), ("remote_address", "192.0.2.1")];
    let r = f
        .quotas
        .report(&mut s, &report("t", vec![usage(b, 1, 0)]))
        .await
        .unwrap();
    assert_eq!(
        only(&r).0,
        Assignment::TokenBucket {
            max_tokens: 20,
            tokens_per_fill: 3600,
            fill_interval_secs: 3600
        }
    );
}

#[tokio::test]
async fn two_envoys_share_a_limit_by_demand_and_never_exceed_it() {
    let f = fixture();
    let mut one = f.quotas.open("one".into()).unwrap();
    let mut two = f.quotas.open("two".into()).unwrap();
    let mut last = (0.0, 0.0);
    for round in 0..6 {
        let a = f
            .quotas
            .report(&mut one, &report("t", vec![usage(A, 60, 90)]))
            .await
            .unwrap();
        let b = f
            .quotas
            .report(&mut two, &report("t", vec![usage(A, 20, 30)]))
            .await
            .unwrap();
        let (ra, rb) = (rate(only(&a).0), rate(only(&b).0));
        if round > 0 {
            // Past the newcomer's first report, together at most the limit.
            assert!(ra + rb <= 1.0 + 1e-9, "round {round}: {ra} + {rb}");
        }
        last = (ra, rb);
        f.clock.advance(Duration::from_secs(5));
    }
    let (ra, rb) = last;
    // Demand 3:1 above the floors (5% each): about 0.725 and 0.275.
    assert!((ra - 0.725).abs() < 0.08, "{ra}");
    assert!((rb - 0.275).abs() < 0.08, "{rb}");
    assert!(ra + rb > 0.9, "the limit is used: {ra} + {rb}");

    // One Envoy leaves: the other takes the whole limit at its next report.
    f.quotas.close(one).await;
    let b = f
        .quotas
        .report(&mut two, &report("t", vec![usage(A, 20, 30)]))
        .await
        .unwrap();
    assert_eq!(rate(only(&b).0), 1.0);
}

#[tokio::test]
async fn a_newcomer_starts_at_least_at_its_floor() {
    let f = fixture();
    let mut one = f.quotas.open("one".into()).unwrap();
    let mut two = f.quotas.open("two".into()).unwrap();
    f.quotas
        .report(&mut one, &report("t", vec![usage(A, 1000, 0)]))
        .await
        .unwrap();
    let b = f
        .quotas
        .report(&mut two, &report("t", vec![usage(A, 0, 0)]))
        .await
        .unwrap();
    let rb = rate(only(&b).0);
    assert!(rb >= share::FLOOR / 2.0 * 0.99, "{rb}");
}

#[tokio::test]
async fn blocked_allowlisted_and_unmatched_buckets_get_blanket_rules() {
    let f = fixture();
    let now = f.clock.now();
    let access = f.limiter.access();
    access.block(
        "192.0.2.66/32".parse().unwrap(),
        Some(Duration::from_secs(7)),
        "test".into(),
        "test".into(),
        now,
    );
    access.block(
        "192.0.2.67/32".parse().unwrap(),
        None,
        "test".into(),
        "test".into(),
        now,
    );
    access.allow("192.0.2.99/32".parse().unwrap(), "test".into(), now);
    let mut s = f.quotas.open("peer".into()).unwrap();
    type Case<'a> = (&'a [(&'a str, &'a str)], (Assignment, i64));
    let cases: &[Case<'_>] = &[
        (
            &[("path", "/a"), ("remote_address", "192.0.2.66")],
            (Assignment::DenyAll, 7),
        ),
        (
            &[("path", "/a"), ("remote_address", "192.0.2.67")],
            (Assignment::DenyAll, 15),
        ),
        // IPv4-mapped, as a dual-stack listener may send it.
        (
            &[("path", "/a"), ("remote_address", "::ffff:192.0.2.66")],
            (Assignment::DenyAll, 7),
        ),
        (
            &[("path", "/a"), ("remote_address", "192.0.2.99")],
            (Assignment::AllowAll, 15),
        ),
    ];
    for (entries, expected) in cases {
        let r = f
            .quotas
            .report(&mut s, &report("t", vec![usage(entries, 1, 0)]))
            .await
            .unwrap();
        assert_eq!(only(&r), *expected, "{entries:?}");
    }
    // No endpoint matches and no client entry for the domain-wide limit... which has no
    // client: a bucket with only a path the config does not know still draws on `global`.
    let r = f
        .quotas
        .report(
            &mut s,
            &report("t", vec![usage(&[("path", "/nowhere")], 1, 0)]),
        )
        .await
        .unwrap();
    assert_eq!(rate(only(&r).0), 10.0);
    // Unknown domain: nothing applies.
    let mut other = f.quotas.open("peer".into()).unwrap();
    let r = f
        .quotas
        .report(&mut other, &report("nope", vec![usage(A, 1, 0)]))
        .await
        .unwrap();
    assert_eq!(only(&r), (Assignment::AllowAll, 15));
}

#[tokio::test]
async fn idle_buckets_are_abandoned_and_their_share_released() {
    let f = fixture();
    let mut s = f.quotas.open("peer".into()).unwrap();
    f.quotas
        .report(&mut s, &report("t", vec![usage(A, 3, 0)]))
        .await
        .unwrap();
    f.clock.advance(Duration::from_secs(299));
    let r = f
        .quotas
        .report(&mut s, &report("t", vec![usage(A, 0, 0)]))
        .await
        .unwrap();
    assert!(matches!(
        r.bucket_action[0].bucket_action,
        Some(Action::QuotaAssignmentAction(_))
    ));
    f.clock.advance(Duration::from_secs(2));
    let r = f
        .quotas
        .report(&mut s, &report("t", vec![usage(A, 0, 0)]))
        .await
        .unwrap();
    assert_eq!(r.bucket_action.len(), 1);
    assert!(matches!(
        r.bucket_action[0].bucket_action,
        Some(Action::AbandonAction(_))
    ));
    assert_eq!(s.buckets(), 0);
    let AnyLedger::Memory(ledger) = &f.quotas.ledger else {
        unreachable!()
    };
    assert_eq!(ledger.pools(), 0);
}

#[tokio::test]
async fn unreadable_reports_name_the_field() {
    let f = fixture();
    let mut s = f.quotas.open("peer".into()).unwrap();
    let e = f
        .quotas
        .report(&mut s, &report("", vec![usage(A, 1, 0)]))
        .await
        .unwrap_err();
    assert_eq!(e.field, "domain");
    f.quotas
        .report(&mut s, &report("t", vec![usage(A, 1, 0)]))
        .await
        .unwrap();
    let e = f
        .quotas
        .report(&mut s, &report("other", vec![usage(A, 1, 0)]))
        .await
        .unwrap_err();
    assert_eq!(e.field, "domain");
    let mut no_id = usage(A, 1, 0);
    no_id.bucket_id = None;
    let e = f
        .quotas
        .report(&mut s, &report("t", vec![usage(A, 1, 0), no_id]))
        .await
        .unwrap_err();
    assert_eq!(e.field, "bucket_quota_usages[1].bucket_id");
    let e = f
        .quotas
        .report(&mut s, &report("t", vec![usage(&[("", "x")], 1, 0)]))
        .await
        .unwrap_err();
    assert_eq!(e.field, "bucket_quota_usages[0].bucket_id.bucket");
    // Envoy's own first report has a time_elapsed of 0 s: accepted.
    let mut first = usage(A, 1, 0);
    first.time_elapsed = Some(prost_types::Duration::default());
    assert!(
        f.quotas
            .report(&mut s, &report("t", vec![first]))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_stream_holds_at_most_max_buckets() {
    let f = fixture();
    let quotas = Quotas::new(
        f.limiter.clone(),
        AnyLedger::Memory(ledger::MemoryLedger::default()),
        Settings {
            max_buckets: 2,
            ..Settings::default()
        },
    );
    let mut s = quotas.open("peer".into()).unwrap();
    let usages: Vec<_> = (1..=3)
        .map(|i| {
            let addr = format!("192.0.2.{i}");
            usage(&[("path", "/a"), ("remote_address", addr.as_str())], 1, 0)
        })
        .collect();
    let r = quotas.report(&mut s, &report("t", usages)).await.unwrap();
    assert_eq!(r.bucket_action.len(), 3);
    assert!(matches!(
        action(&r.bucket_action[2]).0,
        Assignment::AllowAll
    ));
    assert_eq!(s.buckets(), 2);
    assert_eq!(
        quotas
            .registry()
            .refused_buckets
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn streams_beyond_the_most_are_refused() {
    let f = fixture();
    let quotas = Quotas::new(
        f.limiter.clone(),
        AnyLedger::Memory(ledger::MemoryLedger::default()),
        Settings {
            max_streams: 1,
            ..Settings::default()
        },
    );
    let s = quotas.open("one".into()).unwrap();
    assert!(quotas.open("two".into()).is_none());
    quotas.close(s).await;
    assert!(quotas.open("three".into()).is_some());
}

/// Reported requests count towards automatic blocking as ShouldRateLimit's do: the report that
/// takes an address past `max_requests` is answered DENY_ALL for its buckets.
#[tokio::test]
async fn reported_requests_trigger_automatic_blocks() {
    let f = fixture_with(
        "\
domains:
  - name: t
    client: [remote_address]
    endpoint_entry: path
    auto_block:
      duration_seconds: 600
      max_requests: 100/minute
    endpoints:
      - path: /a
        limits: [1000/minute]
",
    );
    let mut s = f.quotas.open("peer".into()).unwrap();
    let r = f
        .quotas
        .report(&mut s, &report("t", vec![usage(A, 60, 0)]))
        .await
        .unwrap();
    assert!(matches!(only(&r).0, Assignment::TokenBucket { .. }));
    f.clock.advance(Duration::from_secs(5));
    let r = f
        .quotas
        .report(&mut s, &report("t", vec![usage(A, 30, 30)]))
        .await
        .unwrap();
    assert_eq!(only(&r), (Assignment::DenyAll, 15));
    assert_eq!(f.limiter.access().active_blocks_at(f.clock.now()), 1);
}

mod arbitrary {
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::Strategy as Gen;

    fn entry() -> impl Gen<Value = (String, String)> {
        (
            prop_oneof![
                Just("path".to_string()),
                Just("remote_address".to_string()),
                "[a-z_]{0,6}"
            ],
            prop_oneof![
                Just("/a".to_string()),
                Just("/b".to_string()),
                Just("192.0.2.1".to_string()),
                Just("::ffff:192.0.2.1".to_string()),
                ".{0,12}"
            ],
        )
    }

    fn usage() -> impl Gen<Value = BucketQuotaUsage> {
        (
            prop::option::weighted(
                0.95,
                prop::collection::btree_map(
                    entry().prop_map(|e| e.0),
                    entry().prop_map(|e| e.1),
                    0..4,
                ),
            ),
            any::<u64>(),
            any::<u64>(),
            prop::option::of((any::<i64>(), any::<i32>())),
        )
            .prop_map(|(bucket, allowed, denied, elapsed)| BucketQuotaUsage {
                bucket_id: bucket.map(|b| BucketId {
                    bucket: b.into_iter().collect(),
                }),
                time_elapsed: elapsed
                    .map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
                num_requests_allowed: allowed,
                num_requests_denied: denied,
                last_report: None,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Any sequence of reports is answered or refused with a field named, never a panic;
        /// an answer has one action per distinct bucket, and no token bucket admits more than
        /// the limits it stands for (1 a second for `/a`'s client, 10 for everyone).
        #[test]
        fn any_report_is_answered_or_refused_by_field(
            reports in prop::collection::vec(
                (prop_oneof![Just("t".to_string()), Just(String::new()), ".{0,4}"],
                 prop::collection::vec(usage(), 0..6),
                 0u64..400),
                1..8,
            ),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let f = fixture();
                let mut s = f.quotas.open("peer".into()).unwrap();
                for (domain, usages, advance) in reports {
                    f.clock.advance(Duration::from_secs(advance));
                    let distinct: std::collections::HashSet<_> = usages
                        .iter()
                        .filter_map(|u| u.bucket_id.as_ref())
                        .map(|id| {
                            let mut e: Vec<_> = id.bucket.iter().collect();
                            e.sort();
                            format!("{e:?}")
                        })
                        .collect();
                    match f.quotas.report(&mut s, &report(&domain, usages)).await {
                        Ok(r) => {
                            prop_assert!(r.bucket_action.len() <= distinct.len());
                            for a in &r.bucket_action {
                                if let Some(Action::QuotaAssignmentAction(_)) = &a.bucket_action {
                                    let (assignment, ttl) = action(a);
                                    prop_assert!(ttl >= 1);
                                    prop_assert!(assignment.rate() <= 10.0 || assignment == Assignment::AllowAll);
                                }
                            }
                        }
                        Err(e) => {
                            prop_assert!(e.field == "domain" || e.field.starts_with("bucket_quota_usages["), "{e}");
                            break;
                        }
                    }
                }
                Ok(())
            })?;
        }
    }
}

/// A block made between reports is pushed to the stream's buckets of that address at once; an
/// unchanged access list and config push nothing.
#[tokio::test]
async fn a_new_block_is_pushed_without_waiting_for_a_report() {
    let f = fixture();
    let mut s = f.quotas.open("peer".into()).unwrap();
    assert!(f.quotas.refresh(&mut s).is_none(), "nothing reported yet");
    let other = &[("path", "/a"), ("remote_address", "192.0.2.2")];
    f.quotas
        .report(
            &mut s,
            &report("t", vec![usage(A, 1, 0), usage(other, 1, 0)]),
        )
        .await
        .unwrap();
    assert!(f.quotas.refresh(&mut s).is_none());
    f.limiter.access().block(
        "192.0.2.1/32".parse().unwrap(),
        None,
        "test".into(),
        "test".into(),
        f.clock.now(),
    );
    let pushed = f.quotas.refresh(&mut s).expect("a push");
    assert_eq!(only(&pushed), (Assignment::DenyAll, 15));
    assert_eq!(
        pushed.bucket_action[0].bucket_id.as_ref().unwrap().bucket["remote_address"],
        "192.0.2.1"
    );
    assert!(f.quotas.refresh(&mut s).is_none(), "pushed once");
    // Unblocked: the next report gives the bucket its share again.
    f.limiter.access().unblock("192.0.2.1/32".parse().unwrap());
    assert!(f.quotas.refresh(&mut s).is_none());
    let r = f
        .quotas
        .report(&mut s, &report("t", vec![usage(A, 1, 0)]))
        .await
        .unwrap();
    assert!(matches!(only(&r).0, Assignment::TokenBucket { .. }));
}
