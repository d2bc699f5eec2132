//! The decision path allocates nothing once a client is known (non-negotiable 6 of the guide:
//! no per-request allocation that can be avoided). Counted with an instrumented global
//! allocator, which is why these tests are a binary of their own: nextest runs each test in a
//! process of its own, so nothing else allocates while a test counts.
//!
//! A client's first decision does allocate (its counters and its statistics entry); that is
//! outside what is counted here. On the decision listener's own HTTP/2 the whole call, from the
//! request's frames to the answer's, allocates nothing
//! (`a_connection_answering_pipelined_calls_allocates_nothing`); with `--http2 h2` the h2 crate
//! allocates a response buffer and header maps per call. The configs, limiter and requests are
//! the in-process benches' (`benches/common`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;
use std::hint::black_box;

use prost::Message;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

use sluice::clock::Timestamp;
use sluice::limiter::{Limiter, Request};
use sluice::service::wire::{decode_request, encode_response};
use sluice::store::MemoryStore;

#[path = "../benches/common/mod.rs"]
mod common;

use common::{
    DEFAULT_YAML, DENY_YAML, LOAD_YAML, NOW_SECS, limiter, proto_request, ready, request,
};

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

/// Talk2Me's `/transcribe`: three endpoint limits and two global ones, five counters per
/// decision, every one rewritten as time moves a minute per call.
#[test]
fn five_counters_rewritten_allocate_nothing() {
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

/// What the endpoint does per call between the request's bytes and the response's: decode,
/// decide, encode into a buffer with room (the server allocates that buffer per call, and the
/// header maps h2 takes; they are not counted here).
#[test]
fn bytes_to_decision_to_bytes_allocates_nothing() {
    let l = limiter(LOAD_YAML, None);
    let bytes = proto_request("load", &HOT).encode_to_vec();
    let now = Timestamp::from_secs(NOW_SECS);
    let mut out = Vec::with_capacity(1024);
    let n = allocations_in_calls(|_| {
        let request = decode_request(black_box(&bytes)).unwrap();
        let rules = l.rules_in_force();
        let d = ready!(l.decide_at(&rules, &request, now));
        out.clear();
        encode_response(&d, &mut out);
        black_box(&out);
    });
    assert!(!out.is_empty());
    assert_eq!(n, 0, "allocations in {CALLS} calls");
}

/// The whole decision listener per call, on its own HTTP/2: a batch of pipelined
/// `ShouldRateLimit` calls from a known client, read from the connection, decoded, decided,
/// answered and written, allocates nothing. The client's bytes are encoded before counting, and
/// the pipe between client and connection is an in-memory duplex whose buffer is fixed.
#[test]
fn a_connection_answering_pipelined_calls_allocates_nothing() {
    use sluice::service::endpoint::RlsEndpoint;
    use sluice::service::http2::{conn, frame, hpack};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const BATCH: u32 = 200;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let endpoint = Arc::new(RlsEndpoint::new(Arc::new(limiter(LOAD_YAML, None))));
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (
            ":path",
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
        ),
        (":authority", "sluice"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        hpack::encode_literal(name.as_bytes(), value.as_bytes(), &mut block);
    }
    let message = proto_request("load", &HOT).encode_to_vec();
    let mut body = vec![0];
    body.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&message);
    // Calls on streams first..first + 2 * BATCH, HEADERS then DATA each.
    let calls = |first: u32| {
        let mut out = Vec::new();
        for id in (first..).step_by(2).take(BATCH as usize) {
            frame::put_head(&mut out, block.len(), frame::kind::HEADERS, 0x4, id);
            out.extend_from_slice(&block);
            frame::put_head(&mut out, body.len(), frame::kind::DATA, 0x1, id);
            out.extend_from_slice(&body);
        }
        out
    };
    let mut batches = Vec::new();
    let mut hello = frame::PREFACE.to_vec();
    frame::put_head(&mut hello, 0, frame::kind::SETTINGS, 0, 0);
    batches.push(hello);
    for round in 0..4 {
        batches.push(calls(1 + round * 2 * BATCH));
    }

    let allocations = rt.block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(conn::serve(
            server,
            endpoint,
            tonic::service::Routes::default(),
            std::future::pending(),
        ));
        let (mut rx, mut tx) = tokio::io::split(client);
        let mut buf = vec![0u8; 64 * 1024];
        let mut held = 0;
        let mut counted = Vec::new();
        for (i, batch) in batches.iter().enumerate() {
            // The first two batches warm the buffers up; the last two are counted.
            let region = (i >= 3).then(|| Region::new(GLOBAL));
            tx.write_all(batch).await.unwrap();
            // Read until every call of the batch has its trailers (END_STREAM on HEADERS).
            let mut ended = 0;
            while i > 0 && ended < BATCH {
                let n = rx.read(&mut buf[held..]).await.unwrap();
                assert!(n > 0, "connection closed");
                held += n;
                let mut at = 0;
                while let Some(head) = buf[at..held].first_chunk().map(frame::Head::parse) {
                    if held - at < frame::HEAD_LEN + head.len {
                        break;
                    }
                    if head.kind == frame::kind::HEADERS && head.flags & 0x1 != 0 {
                        ended += 1;
                    }
                    assert_ne!(head.kind, frame::kind::GOAWAY, "connection error");
                    at += frame::HEAD_LEN + head.len;
                }
                buf.copy_within(at..held, 0);
                held -= at;
            }
            if let Some(region) = region {
                counted.push(region.change().allocations);
            }
        }
        counted
    });
    assert_eq!(
        allocations,
        [0, 0],
        "allocations per batch of {BATCH} calls through the connection"
    );
}
