//! The decision path allocates nothing once a client is known (non-negotiable 6 of the guide:
//! no per-request allocation that can be avoided). Counted with an instrumented global
//! allocator, which is why these tests are a binary of their own: nextest runs each test in a
//! process of its own, so nothing else allocates while a test counts.
//!
//! A client's first decision does allocate (its counters and its statistics entry), and so does
//! the server's response buffer; both are outside what is counted here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use smallvec::smallvec;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

use sluice::clock::{ManualClock, Timestamp};
use sluice::config;
use sluice::limiter::algorithms::Hits;
use sluice::limiter::{Descriptor, Limiter, Request};
use sluice::service::wire::{decode_request, encode_response};
use sluice::store::{MemoryStore, MemoryStoreOptions};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Decisions counted per case: enough that one allocation per call could not hide.
const CALLS: usize = 1_000;

/// Allocations made while `run` runs, the fewest of three runs. The counter is process-wide,
/// and the test harness's main thread may still be allocating for the test it has just
/// started while the first run counts (seen: 4 allocations, 900 bytes, in about one test run
/// in five); code that allocates per call allocates in every run.
fn fewest_allocations(mut run: impl FnMut()) -> usize {
    (0..3)
        .map(|_| {
            let region = Region::new(GLOBAL);
            run();
            region.change().allocations
        })
        .min()
        .unwrap_or(usize::MAX)
}

const NOW_SECS: u64 = 1_767_225_600 + 30;

const LOAD_YAML: &str = include_str!("../benches/load.yaml");
const DEFAULT_YAML: &str = include_str!("../config/sluice.yaml");
const DENY_YAML: &str = "
domains:
  - name: load
    client: [remote_address]
    endpoints:
      - path: /bench
        limits: [10/minute]
";

fn limiter(yaml: &str) -> Limiter<MemoryStore> {
    let cfg = config::parse(yaml, "test.yaml", |_| None).expect("valid config");
    Limiter::new(
        cfg.rules,
        MemoryStore::new(MemoryStoreOptions::default()),
        Arc::new(ManualClock::new(Timestamp::from_secs(NOW_SECS))),
    )
}

/// Resolves a future the memory store makes ready at once.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a MemoryStore decision waited"),
    }
}

fn request<'a>(domain: &'a str, entries: &[(&'a str, &'a str)]) -> Request<'a> {
    Request {
        domain,
        descriptors: smallvec![Descriptor {
            entries: entries.iter().copied().collect(),
            hits: Hits::Take(1),
            limit_override: None,
        }],
    }
}

/// Allocations made by `CALLS` decisions of `r` (after one that may allocate), the time of
/// call `i` given by `at(i)` (each run of [`fewest_allocations`] continues the clock); each
/// decision's `over` must be `over`.
fn allocations_per_run(
    l: &Limiter<MemoryStore>,
    r: &Request<'_>,
    at: impl Fn(usize) -> Timestamp,
    over: bool,
) -> usize {
    let warm = l.rules_in_force();
    ready(l.decide_at(&warm, r, at(0)));
    drop(warm);
    let mut i = 0;
    fewest_allocations(|| {
        for _ in 0..CALLS {
            i += 1;
            let rules = l.rules_in_force();
            let d = ready(l.decide_at(&rules, black_box(r), at(i)));
            assert_eq!(d.over, over, "call {i}");
            black_box(&d);
        }
    })
}

#[test]
fn a_known_client_admitted_allocates_nothing() {
    let l = limiter(LOAD_YAML);
    let r = request(
        "load",
        &[("path", "/bench"), ("remote_address", "10.0.0.1")],
    );
    let n = allocations_per_run(&l, &r, |_| Timestamp::from_secs(NOW_SECS), false);
    assert_eq!(n, 0, "allocations in {CALLS} decisions");
}

#[test]
fn a_known_client_over_its_limit_allocates_nothing() {
    let l = limiter(DENY_YAML);
    let r = request(
        "load",
        &[("path", "/bench"), ("remote_address", "10.0.0.1")],
    );
    let now = Timestamp::from_secs(NOW_SECS);
    for _ in 0..10 {
        ready(l.decide_at(&l.rules_in_force(), &r, now));
    }
    let n = allocations_per_run(&l, &r, |_| now, true);
    assert_eq!(n, 0, "allocations in {CALLS} decisions");
}

/// Talk2Me's `/transcribe`: three endpoint limits and two global ones, five counters per
/// decision, every one rewritten as time moves a minute per call.
#[test]
fn five_counters_rewritten_allocate_nothing() {
    let l = limiter(DEFAULT_YAML);
    let r = request(
        "talk2me",
        &[
            ("path", "/transcribe"),
            ("remote_address", "203.0.113.7"),
            (
                "user_agent",
                "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
            ),
        ],
    );
    let at = |i: usize| Timestamp::from_secs(NOW_SECS + 60 * i as u64);
    let n = allocations_per_run(&l, &r, at, false);
    assert_eq!(n, 0, "allocations in {CALLS} decisions");
}

/// What the endpoint does per call between the request's bytes and the response's: decode,
/// decide, encode into a buffer with room (the server's one allocation per call is that
/// buffer, which is not counted here).
#[test]
fn bytes_to_decision_to_bytes_allocates_nothing() {
    let l = limiter(LOAD_YAML);
    let bytes = {
        use prost::Message;
        use sluice::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
        use sluice::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
        use sluice::proto::envoy::service::ratelimit::v3::RateLimitRequest;
        RateLimitRequest {
            domain: "load".to_string(),
            descriptors: vec![RateLimitDescriptor {
                entries: ["path", "remote_address"]
                    .into_iter()
                    .zip(["/bench", "10.0.0.1"])
                    .map(|(k, v)| Entry {
                        key: k.to_string(),
                        value: v.to_string(),
                    })
                    .collect(),
                ..Default::default()
            }],
            hits_addend: 0,
        }
        .encode_to_vec()
    };
    let now = Timestamp::from_secs(NOW_SECS);
    let mut out = Vec::with_capacity(1024);
    let warm = l.rules_in_force();
    ready(l.decide_at(&warm, &decode_request(&bytes).unwrap(), now));
    drop(warm);
    let n = fewest_allocations(|| {
        for _ in 0..CALLS {
            let request = decode_request(black_box(&bytes)).unwrap();
            let rules = l.rules_in_force();
            let d = ready(l.decide_at(&rules, &request, now));
            out.clear();
            encode_response(&d, &mut out);
            black_box(&out);
        }
    });
    assert!(!out.is_empty());
    assert_eq!(n, 0, "allocations in {CALLS} calls");
}
