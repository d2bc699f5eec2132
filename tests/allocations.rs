//! The decision path allocates nothing once a client is known (non-negotiable 6 of the guide:
//! no per-request allocation that can be avoided). Counted with an instrumented global
//! allocator, which is why these tests are a binary of their own: nextest runs each test in a
//! process of its own, so nothing else allocates while a test counts.
//!
//! A client's first decision does allocate (its counters and its statistics entry); that is
//! outside what is counted here, and so is the transport around the decision (tonic, hyper and
//! prost allocate per call: headers, buffers, the request's strings). The configs, limiter and
//! requests are the in-process benches' (`benches/common`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;
use std::hint::black_box;

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

use sluice::clock::Timestamp;
use sluice::limiter::{Limiter, Request};
use sluice::store::MemoryStore;

#[path = "../benches/common/mod.rs"]
mod common;

use common::{DEFAULT_YAML, DENY_YAML, LOAD_YAML, NOW_SECS, limiter, ready, request};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Calls counted per case: enough that one allocation per call could not hide.
const CALLS: usize = 1_000;

/// Allocations made by `CALLS` calls of `call(i)`, `i` counting on from 1, after a call
/// `call(0)` that may allocate (a client's first decision does). The fewest of three runs: the
/// counter is process-wide, and the test harness's main thread may still be allocating for the
/// test it has just started while the first run counts (seen: 4 allocations, 900 bytes, in
/// about one test run in five); code that allocates per call allocates in every run.
fn allocations_in_calls(mut call: impl FnMut(usize)) -> usize {
    call(0);
    let mut i = 0;
    (0..3)
        .map(|_| {
            let region = Region::new(GLOBAL);
            for _ in 0..CALLS {
                i += 1;
                call(i);
            }
            region.change().allocations
        })
        .min()
        .unwrap_or(usize::MAX)
}

/// Allocations in deciding `r` as the server does (rules in force, then the decision), call
/// `i` at `at(i)`; each decision's `over` must be `over`.
fn allocations_deciding(
    l: &Limiter<MemoryStore>,
    r: &Request<'_>,
    at: impl Fn(usize) -> Timestamp,
    over: bool,
) -> usize {
    allocations_in_calls(|i| {
        let rules = l.rules_in_force();
        let d = ready!(l.decide_at(&rules, black_box(r), at(i)));
        assert_eq!(d.over, over, "call {i}");
        black_box(&d);
    })
}

const HOT: [(&str, &str); 2] = [("path", "/bench"), ("remote_address", "10.0.0.1")];

#[test]
fn a_known_client_admitted_allocates_nothing() {
    let l = limiter(LOAD_YAML, None);
    let r = request("load", &HOT);
    let n = allocations_deciding(&l, &r, |_| Timestamp::from_secs(NOW_SECS), false);
    assert_eq!(n, 0, "allocations in {CALLS} decisions");
}

#[test]
fn a_known_client_over_its_limit_allocates_nothing() {
    let l = limiter(DENY_YAML, None);
    let r = request("load", &HOT);
    let now = Timestamp::from_secs(NOW_SECS);
    for _ in 0..10 {
        ready!(l.decide_at(&l.rules_in_force(), &r, now));
    }
    let n = allocations_deciding(&l, &r, |_| now, true);
    assert_eq!(n, 0, "allocations in {CALLS} decisions");
}

/// An IPv6 client whose address has a `ffff` group but is not IPv4-mapped: read as it is, with
/// no copy of the request (only a mapped address is rewritten).
#[test]
fn an_ipv6_client_allocates_nothing() {
    let l = limiter(LOAD_YAML, None);
    let r = request(
        "load",
        &[("path", "/bench"), ("remote_address", "2001:db8::ffff:1")],
    );
    let n = allocations_deciding(&l, &r, |_| Timestamp::from_secs(NOW_SECS), false);
    assert_eq!(n, 0, "allocations in {CALLS} decisions");
}

/// Talk2Me's `/transcribe`: three endpoint limits, two global ones and the automatic block's
/// count of the address, six counters per decision, every one rewritten as time moves a minute
/// per call.
#[test]
fn six_counters_rewritten_allocate_nothing() {
    let l = limiter(DEFAULT_YAML, None);
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
    let n = allocations_deciding(&l, &r, at, false);
    assert_eq!(n, 0, "allocations in {CALLS} decisions");
}
