//! Cost of answering one RLQS usage report (issue 23), in process: `cargo bench --bench rlqs`.
//!
//! A stream of the default config's Talk2Me domain reports N buckets, one per client of
//! `/transcribe` (three endpoint limits and two global ones, so five pools per bucket, two of
//! them shared by every bucket), with the memory ledger, under a manual clock that moves 5 s per
//! report as Envoy's do. What is timed is `Quotas::report`: reading the report, the rules for
//! each bucket, the ledger's claims and grants, and the response (every call is ready at once: no executor is timed). Reported as time per report
//! and, with `Throughput::Elements`, per bucket. Automatic blocking is off (its threshold would
//! block the clients after a few reports).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use sluice::clock::{ManualClock, Timestamp};
use sluice::limiter::Limiter;
use sluice::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage;
use sluice::proto::envoy::service::rate_limit_quota::v3::{BucketId, RateLimitQuotaUsageReports};
use sluice::quota::{AnyLedger, Quotas, Settings, ledger::MemoryLedger};
use sluice::store::{MemoryStore, MemoryStoreOptions};

mod common;

use common::ready;

fn report(buckets: usize) -> RateLimitQuotaUsageReports {
    RateLimitQuotaUsageReports {
        domain: "talk2me".into(),
        bucket_quota_usages: (0..buckets)
            .map(|i| BucketQuotaUsage {
                bucket_id: Some(BucketId {
                    bucket: [
                        ("path", "/transcribe".to_string()),
                        (
                            "remote_address",
                            format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255),
                        ),
                        ("user_agent", "bench/1".to_string()),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                }),
                time_elapsed: Some(prost_types::Duration {
                    seconds: 5,
                    nanos: 0,
                }),
                num_requests_allowed: 3 + (i as u64 % 7),
                num_requests_denied: i as u64 % 3,
                last_report: None,
            })
            .collect(),
    }
}

fn bench(c: &mut Criterion) {
    let yaml = common::default_yaml_without_auto_block();
    let mut group = c.benchmark_group("rlqs");
    for buckets in [1usize, 100, 1_000, 10_000] {
        let cfg = sluice::config::parse(&yaml, "sluice.yaml", |_| None).unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_secs(common::NOW_SECS)));
        let limiter = Arc::new(Limiter::new(
            cfg.rules,
            MemoryStore::new(MemoryStoreOptions::default()),
            clock.clone(),
        ));
        let quotas = Quotas::new(
            limiter,
            AnyLedger::Memory(MemoryLedger::default()),
            Settings::default(),
        );
        let mut stream = quotas.open("bench".into()).unwrap();
        let message = report(buckets);
        // The first report creates the buckets; the benchmark measures the steady state.
        ready!(quotas.report(&mut stream, &message)).unwrap();
        group.throughput(Throughput::Elements(buckets as u64));
        group.bench_function(format!("report/{buckets}_buckets"), |b| {
            b.iter(|| {
                clock.advance(Duration::from_secs(5));
                ready!(quotas.report(&mut stream, &message)).unwrap()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
