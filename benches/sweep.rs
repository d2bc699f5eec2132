//! Decision latency while the background sweep runs (issue 22): does a decision wait behind a
//! sweep of 1M counters and 100,000 idle clients?
//!
//! `cargo bench --bench sweep`. Not a criterion bench: it needs each decision's own latency
//! while another thread sweeps, not a mean. Each round builds a limiter from
//! `benches/load.yaml` (`max_keys: 1000000`, statistics for 100,000 clients), decides once for
//! 1M distinct clients at one instant, then moves an hour on, where every one of those counters
//! has expired and every client is idle. 10,000 of the clients come back (their counters and
//! statistics are live again) and are decided in turn on this thread: first with nothing else
//! running (the baseline), then while another thread runs the sweep as the server's upkeep
//! does (`Store::sweep_expired_at`, then `Stats::sweep_clients_idle_since`), until it ends.
//! This thread made the statistics' entries, so it owns the stripe the sweep of clients walks,
//! as a decision thread of the server does.
//!
//! Decisions arrive on a schedule, one every [`EVERY`] (100,000 a second, a decision thread's
//! share of a busy server), and a decision's latency runs from when it was due, not from when
//! the thread got round to it: a decision stuck behind a lock for 20 ms makes the 2,000 due in
//! that time late too, as a server's queued calls would be. Timing each call from its own start
//! would hide a stall behind the few calls made during it.
//!
//! Two threads on two cores: what a decision can wait for here is the sweep's hold on a lock
//! it needs (a store shard, its statistics stripe), not the CPU. Prints each round and the
//! medians over rounds; `SLUICE_SWEEP_KEYS` and `SLUICE_SWEEP_ROUNDS` change the 1M and 3.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sluice::clock::Timestamp;
use sluice::limiter::{Decision, Limiter};
use sluice::store::{MemoryStore, Store};

mod common;

/// The server's allocator (src/main.rs): freeing what a sweep drops costs what it costs there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use common::{LOAD_YAML, NOW_SECS, limiter, ready, request};

/// Clients decided during the sweep.
const LIVE: usize = 10_000;

/// Time between decisions due.
const EVERY: Duration = Duration::from_micros(10);

/// Decisions of the baseline (2 s).
const BASELINE: usize = 200_000;

/// Decides for `client` at `now`, as the service does per call.
fn decide_for(l: &Limiter<MemoryStore>, client: &str, now: Timestamp) {
    let r = request("load", &[("path", "/bench"), ("remote_address", client)]);
    let rules = l.rules_in_force();
    let mut decision = Decision::default();
    ready!(l.decide_into(rules.rules(), &r, now, &mut decision));
    assert!(!std::hint::black_box(&decision).over);
}

fn name(i: usize, buf: &mut String) -> &str {
    buf.clear();
    write!(buf, "client-{i}").unwrap();
    buf
}

/// Latency percentiles of one set of decisions, in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Percentiles {
    n: usize,
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

impl Percentiles {
    fn of(mut ns: Vec<u64>) -> Self {
        ns.sort_unstable();
        let at = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)];
        Self {
            n: ns.len(),
            p50: at(0.5),
            p99: at(0.99),
            p999: at(0.999),
            max: *ns.last().unwrap(),
        }
    }

    fn show(&self) -> String {
        format!(
            "{} decisions: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
            self.n,
            self.p50 as f64 / 1000.0,
            self.p99 as f64 / 1000.0,
            self.p999 as f64 / 1000.0,
            self.max as f64 / 1000.0
        )
    }
}

struct Round {
    idle: Percentiles,
    sweeping: Percentiles,
    sweep: Duration,
    counters: usize,
    clients: usize,
}

fn round(keys: usize) -> Round {
    let l = limiter(LOAD_YAML, None);
    let t0 = Timestamp::from_secs(NOW_SECS);
    let mut buf = String::with_capacity(32);
    for i in 0..keys {
        decide_for(&l, name(i, &mut buf), t0);
    }
    // An hour on: the 1-minute sliding windows have expired, and the clients (last seen an
    // hour ago) are idle past the sweep's cutoff of half an hour.
    let t1 = Timestamp::from_secs(NOW_SECS + 3600);
    let cutoff = t1.as_nanos() - 1_800_000_000_000;
    // The live clients come back: counters and statistics entries fresh again.
    for i in 0..LIVE {
        decide_for(&l, name(i, &mut buf), t1);
    }

    // Decides the next live client when it is due (at once if late); returns how long after
    // it was due it was decided.
    let mut next = 0;
    let mut decide = |buf: &mut String, due: Instant| {
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        next = (next + 1) % LIVE;
        decide_for(&l, name(next, buf), t1);
        due.elapsed().as_nanos() as u64
    };
    let start = Instant::now();
    let idle: Vec<u64> = (0..BASELINE as u32)
        .map(|k| decide(&mut buf, start + EVERY * k))
        .collect();

    let started = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let mut sweeping = Vec::with_capacity(1 << 20);
    let (sweep, counters, clients) = std::thread::scope(|s| {
        let sweeper = s.spawn(|| {
            started.store(true, Ordering::Release);
            let start = Instant::now();
            let counters = l.store().sweep_expired_at(t1);
            let clients = l.stats().sweep_clients_idle_since(cutoff);
            let took = start.elapsed();
            done.store(true, Ordering::Release);
            (took, counters, clients)
        });
        while !started.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        let start = Instant::now();
        let mut k = 0;
        while !done.load(Ordering::Acquire) {
            sweeping.push(decide(&mut buf, start + EVERY * k));
            k += 1;
        }
        sweeper.join().unwrap()
    });
    assert_eq!(
        l.store().tracked_keys(),
        LIVE,
        "the sweep left the live counters"
    );
    Round {
        idle: Percentiles::of(idle),
        sweeping: Percentiles::of(sweeping),
        sweep,
        counters,
        clients,
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let keys = env("SLUICE_SWEEP_KEYS", 1_000_000);
    let rounds = env("SLUICE_SWEEP_ROUNDS", 3);
    println!("sweep: {keys} expired counters; {LIVE} clients decided in turn, one every {EVERY:?}");
    let mut all = Vec::new();
    for i in 0..rounds {
        let r = round(keys);
        println!(
            "  round {i}: sweep of {} counters and {} clients took {:.1} ms",
            r.counters,
            r.clients,
            r.sweep.as_secs_f64() * 1000.0
        );
        println!("    no sweep:     {}", r.idle.show());
        println!("    during sweep: {}", r.sweeping.show());
        all.push(r);
    }
    let med = |f: &dyn Fn(&Round) -> u64| median(all.iter().map(f).collect());
    let us = |ns: u64| ns as f64 / 1000.0;
    println!(
        "  medians of {rounds} (us): sweep {:.0}; no sweep p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}; during sweep p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
        us(med(&|r| r.sweep.as_nanos() as u64)),
        us(med(&|r| r.idle.p50)),
        us(med(&|r| r.idle.p99)),
        us(med(&|r| r.idle.p999)),
        us(med(&|r| r.idle.max)),
        us(med(&|r| r.sweeping.p50)),
        us(med(&|r| r.sweeping.p99)),
        us(med(&|r| r.sweeping.p999)),
        us(med(&|r| r.sweeping.max)),
    );
}
