//! Cost of one decision, in process (issue 5). `cargo bench --bench decide`; scripts/bench runs it
//! and copies the medians into BENCHMARKS.md.
//!
//! Every limiter is built from config text with `sluice::config::parse`, over a `MemoryStore`,
//! and decides at a fixed `Timestamp` (except where a case says otherwise). `MemoryStore`'s
//! `apply` never waits, so each decision's future is polled exactly once with a no-op waker: no
//! executor is measured.
//!
//! Groups:
//! - `decide/*`: the rules in force (`Limiter::rules_in_force`) and `Limiter::decide_into`,
//!   as the server does per call: (a) hot key allowed and denied, also
//!   from two threads at once; one thread cycling through 1,000 clients, two threads on 1,000
//!   clients each, with one store or a store each; (b) 1M distinct keys; (c) Talk2Me
//!   `/transcribe` (three limits + two global ones).
//! - `path/*`: (d) `PathRouter::lookup` on the default config's training templates.
//! - `service/*`: (e) what `ShouldRateLimit` does per call without the network: `to_request` +
//!   `decide` + `to_response`, and the same plus protobuf decode of the request and encode of
//!   the response (what sluice's codec does inside tonic).
//! - `reference/*`: (f) the same hot client under an envoyproxy/ratelimit file (a per-address
//!   rule, as `decide/hot_*` have), allowed and denied, to compare with `decide/hot_*`.
//! - `access/*`: (g) the hot client of `decide/hot_allowed` with no blocks, one CIDR block,
//!   20,000 CIDR blocks of eight prefix lengths or 20,000 single-address blocks, none of them
//!   covering it (what every other client's decision pays for the blocks), and a client inside
//!   one of the 20,000 CIDR blocks (turned away).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::cell::{Cell, OnceCell};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;

use sluice::clock::Timestamp;
use sluice::config;
use sluice::limiter::path::{PathRouter, PathTemplate};
use sluice::limiter::{Decision, Limiter, Request};
use sluice::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use sluice::service::rls::{to_request, to_response};
use sluice::stats::Stats;
use sluice::store::MemoryStore;

mod common;

/// The server's allocator (src/main.rs): where the store's tables land, and on what pages,
/// is the allocator's choice, and the million-key case depends on it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use common::{
    DEFAULT_YAML, DENY_YAML, LOAD_YAML, NOW_SECS, default_yaml_without_auto_block, limiter,
    limiter_sharing_stats, proto_request, ready, request,
};

/// Decides as the server does per call (the rules in force loaded, then the decision); returns
/// whether the request is over a limit. Never inlined, so that callgrind can count one call of
/// it alone (`--toggle-collect='decide::decide'`).
#[inline(never)]
fn decide(l: &Limiter<MemoryStore>, r: &Request<'_>, now: Timestamp) -> bool {
    let rules = l.rules_in_force();
    let mut decision = Decision::default();
    ready!(l.decide_into(rules.rules(), r, now, &mut decision));
    black_box(&decision).over
}

fn ip(i: u32) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff)
}

/// Decides for the next of `clients` (`next` holds whose turn it is).
fn in_turn(
    l: &Limiter<MemoryStore>,
    clients: &[String],
    next: &Cell<usize>,
    now: Timestamp,
) -> bool {
    let i = next.get();
    next.set(if i + 1 == clients.len() { 0 } else { i + 1 });
    let r = request(
        "load",
        &[("path", "/bench"), ("remote_address", &clients[i])],
    );
    black_box(decide(l, black_box(&r), now))
}

/// Wall time of `iters` decisions split over two threads, thread `t` deciding for its own
/// `clients[t]` in turn with `limiters[t]`.
fn two_threads(
    limiters: [&Limiter<MemoryStore>; 2],
    clients: &[Vec<String>; 2],
    iters: u64,
    now: Timestamp,
) -> Duration {
    let per_thread = iters.div_ceil(2);
    let start = Instant::now();
    std::thread::scope(|s| {
        for (l, clients) in limiters.into_iter().zip(clients) {
            s.spawn(move || {
                let next = Cell::new(0);
                for _ in 0..per_thread {
                    in_turn(l, clients, &next, now);
                }
            });
        }
    });
    start.elapsed()
}

fn bench_decide(c: &mut Criterion) {
    let now = Timestamp::from_secs(NOW_SECS);
    let mut g = c.benchmark_group("decide");
    g.throughput(Throughput::Elements(1));

    // (a) One client, every iteration; 4e9/minute never denies.
    let l = &limiter(LOAD_YAML, None);
    g.bench_function("hot_allowed", |b| {
        b.iter(|| {
            let r = request(
                "load",
                &[("path", "/bench"), ("remote_address", "10.0.0.1")],
            );
            let over = decide(l, black_box(&r), now);
            debug_assert!(!over);
            over
        });
    });

    // (a') The same client over its 10/minute: every decision is OVER_LIMIT (nothing stored).
    let l = &limiter(DENY_YAML, None);
    let r = request(
        "load",
        &[("path", "/bench"), ("remote_address", "10.0.0.1")],
    );
    for _ in 0..10 {
        decide(l, &r, now);
    }
    assert!(decide(l, &r, now), "the hot key is over its limit");
    g.bench_function("hot_denied", |b| {
        b.iter(|| {
            let r = request(
                "load",
                &[("path", "/bench"), ("remote_address", "10.0.0.1")],
            );
            black_box(decide(l, black_box(&r), now))
        });
    });

    // (a'') The hot key from two threads at once (one per core): the shard mutex and its cache
    // line bounce between cores. Reported per decision, i.e. wall time / total decisions.
    let lim = limiter(LOAD_YAML, None);
    g.bench_function("hot_allowed_2_threads", |b| {
        b.iter_custom(|iters| {
            let per_thread = iters.div_ceil(2);
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..per_thread {
                            let r = request(
                                "load",
                                &[("path", "/bench"), ("remote_address", "10.0.0.1")],
                            );
                            black_box(decide(&lim, black_box(&r), now));
                        }
                    });
                }
            });
            start.elapsed()
        });
    });

    // (a''') One thread cycling through 1,000 clients: the baseline of the next case.
    let l = &limiter(LOAD_YAML, None);
    let clients: Vec<String> = (0..1000).map(ip).collect();
    let next = Cell::new(0usize);
    g.bench_function("clients_allowed", |b| {
        b.iter(|| in_turn(l, &clients, &next, now));
    });

    // (a'''') Two threads at once, each cycling through its own 1,000 clients: no counter is
    // shared between them, so what they contend on is what every decision writes in common
    // (the store's shard locks, statistics). Reported per decision, as (a''). Then the same
    // with a store for each thread (statistics still shared): the bound lock-free store cells
    // could reach; the gap between the two is what the threads lose on the shard locks' cache
    // lines, which both cores write.
    let own: [Vec<String>; 2] = [(0..1000).map(ip).collect(), (1000..2000).map(ip).collect()];
    let lim = limiter(LOAD_YAML, None);
    g.bench_function("clients_allowed_2_threads", |b| {
        b.iter_custom(|iters| two_threads([&lim, &lim], &own, iters, now));
    });
    let stats = Arc::new(Stats::default());
    let ls = [
        limiter_sharing_stats(LOAD_YAML, stats.clone()),
        limiter_sharing_stats(LOAD_YAML, stats),
    ];
    g.bench_function("clients_allowed_2_threads_own_stores", |b| {
        b.iter_custom(|iters| two_threads([&ls[0], &ls[1]], &own, iters, now));
    });

    // (b) 1M distinct clients, pre-populated, visited in turn: every decision misses the caches.
    // Populated on first use, so a filtered run (`cargo bench -- path/`) does not pay for it.
    const KEYS: u32 = 1_000_000;
    let populated: OnceCell<(Limiter<MemoryStore>, Vec<String>)> = OnceCell::new();
    let next = Cell::new(0usize);
    g.bench_function("1m_keys_allowed", |b| {
        let (l, clients) = populated.get_or_init(|| {
            let l = limiter(LOAD_YAML, Some(2 * KEYS as usize));
            let clients: Vec<String> = (0..KEYS).map(ip).collect();
            for client in &clients {
                decide(
                    &l,
                    &request("load", &[("path", "/bench"), ("remote_address", client)]),
                    now,
                );
            }
            assert_eq!(sluice::store::Store::tracked_keys(l.store()), KEYS as usize);
            (l, clients)
        });
        b.iter(|| in_turn(l, clients, &next, now));
    });
    drop(populated);

    // (c) Talk2Me /transcribe from the default config: 10/minute, 100/hour, burst 3 refilled 1
    // per 6 s, plus the domain's global 1000/minute and 10000/hour: five counters per decision
    // (without the automatic block, which would block this one address after 100 calls).
    let talk2me = default_yaml_without_auto_block();
    let l = &limiter(&talk2me, None);
    let entries = [
        ("path", "/transcribe"),
        ("remote_address", "203.0.113.7"),
        (
            "user_agent",
            "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
        ),
    ];
    // At a fixed time the burst of 3 is spent after 3 calls: the steady state is OVER_LIMIT.
    let r = request("talk2me", &entries);
    for _ in 0..3 {
        assert!(!decide(l, &r, now));
    }
    assert!(decide(l, &r, now));
    g.bench_function("transcribe_5_counters_denied", |b| {
        b.iter(|| {
            let r = request("talk2me", &entries);
            black_box(decide(l, black_box(&r), now))
        });
    });
    // Time moving 60 s per call: every limit admits, every counter is written.
    let l = &limiter(&talk2me, None);
    let t = Cell::new(NOW_SECS);
    g.bench_function("transcribe_5_counters_allowed", |b| {
        b.iter(|| {
            let secs = t.get() + 60;
            t.set(secs);
            let r = request("talk2me", &entries);
            let over = decide(l, black_box(&r), Timestamp::from_secs(secs));
            debug_assert!(!over);
            over
        });
    });
    assert!(
        !decide(l, &r, Timestamp::from_secs(t.get() + 60)),
        "one call a minute is always admitted"
    );
    g.finish();
}

fn bench_path(c: &mut Criterion) {
    let cfg = config::parse(DEFAULT_YAML, "config/sluice.yaml", |_| None).unwrap();
    let training = cfg.rules.domain("training").unwrap();
    let mut router = PathRouter::new();
    for (i, rule) in training.rules.iter().enumerate() {
        if rule.conditions.is_empty() {
            router
                .insert(PathTemplate::parse(&rule.name).unwrap(), i)
                .unwrap();
        }
    }
    assert_eq!(router.len(), 9, "the training domain's nine endpoints");
    let cases = [
        ("literal", "/api/training/execute", true),
        ("templated", "/api/training/cancel/8f14e45fceea167a", true),
        ("miss", "/api/unknown/resource", false),
        ("normalised", "/api//training/./validate?dry_run=1", true),
    ];
    let mut g = c.benchmark_group("path");
    g.throughput(Throughput::Elements(1));
    for (name, path, hit) in cases {
        assert_eq!(router.lookup(path).is_some(), hit, "{path}");
        g.bench_function(name, |b| {
            b.iter(|| black_box(router.lookup(black_box(path))))
        });
    }
    g.finish();
}

fn bench_service(c: &mut Criterion) {
    let mut g = c.benchmark_group("service");
    g.throughput(Throughput::Elements(1));

    // (e) What RlsService::should_rate_limit does with a decoded request (clock: ManualClock).
    let l = limiter(LOAD_YAML, None);
    let req = proto_request(
        "load",
        &[("path", "/bench"), ("remote_address", "10.0.0.1")],
    );
    g.bench_function("hot_allowed", |b| {
        b.iter(|| {
            let view = to_request(black_box(&req)).unwrap();
            let rules = l.rules_in_force();
            let d = ready!(l.decide(&rules, &view));
            black_box(to_response(&d))
        });
    });

    // The same from the request's bytes to the response's bytes (tonic's prost codec work).
    let bytes = req.encode_to_vec();
    let mut out = Vec::with_capacity(256);
    g.bench_function("hot_allowed_with_protobuf", |b| {
        b.iter(|| {
            let req = RateLimitRequest::decode(black_box(bytes.as_slice())).unwrap();
            let view = to_request(&req).unwrap();
            let rules = l.rules_in_force();
            let d = ready!(l.decide(&rules, &view));
            out.clear();
            to_response(&d).encode(&mut out).unwrap();
            black_box(out.len())
        });
    });
    // Over the limit: the response carries retry-after, content-type and the JSON body.
    let l = limiter(DENY_YAML, None);
    for _ in 0..10 {
        ready!(l.decide(&l.rules_in_force(), &to_request(&req).unwrap()));
    }
    g.bench_function("hot_denied", |b| {
        b.iter(|| {
            let view = to_request(black_box(&req)).unwrap();
            let rules = l.rules_in_force();
            let d = ready!(l.decide(&rules, &view));
            debug_assert!(d.over);
            black_box(to_response(&d))
        });
    });
    g.bench_function("hot_denied_with_protobuf", |b| {
        b.iter(|| {
            let req = RateLimitRequest::decode(black_box(bytes.as_slice())).unwrap();
            let view = to_request(&req).unwrap();
            let rules = l.rules_in_force();
            let d = ready!(l.decide(&rules, &view));
            out.clear();
            to_response(&d).encode(&mut out).unwrap();
            black_box(out.len())
        });
    });
    g.finish();
}

fn config() -> Criterion {
    // 2 cores, shared: short but repeated samples; scripts/bench takes the medians.
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
        .without_plots()
}

/// A limiter on an envoyproxy/ratelimit file of one per-address rule of `rate`.
fn reference_limiter(rate: &str) -> Limiter<MemoryStore> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bench.yaml");
    std::fs::write(
        &file,
        format!(
            "domain: load\ndescriptors:\n  - key: path\n    value: /bench\n    descriptors:\n      - key: remote_address\n        rate_limit: {rate}\n"
        ),
    )
    .unwrap();
    let cfg = config::load_with(&file, |_| None).unwrap();
    Limiter::new(
        cfg.rules,
        MemoryStore::new(sluice::store::MemoryStoreOptions {
            max_keys: cfg.store.max_keys,
        }),
        Arc::new(sluice::clock::ManualClock::new(Timestamp::from_secs(
            NOW_SECS,
        ))),
    )
}

fn bench_reference(c: &mut Criterion) {
    let now = Timestamp::from_secs(NOW_SECS);
    let mut g = c.benchmark_group("reference");
    g.throughput(Throughput::Elements(1));
    let hot = || {
        request(
            "load",
            &[("path", "/bench"), ("remote_address", "10.0.0.1")],
        )
    };
    let l = &reference_limiter("{unit: minute, requests_per_unit: 4000000000}");
    assert!(!decide(l, &hot(), now));
    g.bench_function("hot_allowed", |b| {
        b.iter(|| decide(l, black_box(&hot()), now));
    });
    let l = &reference_limiter("{unit: minute, requests_per_unit: 10}");
    for _ in 0..10 {
        decide(l, &hot(), now);
    }
    assert!(decide(l, &hot(), now), "the hot key is over its limit");
    g.bench_function("hot_denied", |b| {
        b.iter(|| decide(l, black_box(&hot()), now));
    });
    g.finish();
}

/// 20,000 distinct CIDR blocks, each in its own /20 from 11.0.0.0 on (so none overlaps, and
/// none covers 10.0.0.0/8), prefix lengths /21 to /28 in turn.
fn cidr_blocks() -> Vec<ipnet::IpNet> {
    (0..20_000u32)
        .map(|i| {
            let addr = std::net::Ipv4Addr::from(0x0B00_0000 + (i << 12));
            ipnet::IpNet::V4(ipnet::Ipv4Net::new(addr, 21 + (i % 8) as u8).unwrap())
        })
        .collect()
}

/// A limiter on `benches/load.yaml` with permanent blocks of `nets`, set at once.
fn blocking_limiter(nets: &[ipnet::IpNet]) -> Limiter<MemoryStore> {
    let l = limiter(LOAD_YAML, None);
    let blocks = nets
        .iter()
        .map(|&net| sluice::access::Block {
            net,
            permanent: true,
            created_at: 0,
            expires_at: None,
            reason: "bench".into(),
            created_by: "bench".into(),
        })
        .collect();
    l.access().replace_state(blocks, Vec::new());
    l
}

fn bench_access(c: &mut Criterion) {
    let now = Timestamp::from_secs(NOW_SECS);
    let mut g = c.benchmark_group("access");
    g.throughput(Throughput::Elements(1));
    let hot = || {
        request(
            "load",
            &[("path", "/bench"), ("remote_address", "10.0.0.1")],
        )
    };
    let cidrs = cidr_blocks();
    let ips: Vec<ipnet::IpNet> = (0..20_000u32)
        .map(|i| std::net::IpAddr::from(std::net::Ipv4Addr::from(0x0B00_0000 + i * 7)).into())
        .collect();
    let cases: [(&str, &[ipnet::IpNet]); 4] = [
        ("no_blocks", &[]),
        ("one_cidr_block", &cidrs[..1]),
        ("20k_cidr_blocks", &cidrs),
        ("20k_ip_blocks", &ips),
    ];
    for (name, nets) in cases {
        let l = &blocking_limiter(nets);
        assert!(!decide(l, &hot(), now), "{name}: 10.0.0.1 is not blocked");
        g.bench_function(name, |b| {
            b.iter(|| decide(l, black_box(&hot()), now));
        });
    }
    // Inside the 7,777th block (12.230.16.0/22): turned away before any counter.
    let l = &blocking_limiter(&cidrs);
    let inside = || {
        request(
            "load",
            &[("path", "/bench"), ("remote_address", "12.230.17.9")],
        )
    };
    assert!(decide(l, &inside(), now), "12.230.17.9 is blocked");
    g.bench_function("20k_cidr_blocks_blocked", |b| {
        b.iter(|| decide(l, black_box(&inside()), now));
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_decide, bench_path, bench_service, bench_reference, bench_access
}
criterion_main!(benches);
