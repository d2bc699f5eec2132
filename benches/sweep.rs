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
//! Decisions are due on a schedule, one every [`EVERY`] (10,000 a second; the thread sleeps
//! until each is due, as a decision thread waits for its next call), and each is timed twice:
//! - its own time, from its start to its end: a wait for a lock the sweep holds shows here
//!   whole, and little else does (a decision takes under a microsecond, so the scheduler
//!   rarely takes the core from it mid-way, however busy the machine);
//! - from when it was due: a decision stuck behind a lock for 20 ms makes the 200 due in that
//!   time late too, as a server's queued calls would be. This one also counts the sleep's
//!   overshoot (the kernel's timer slack, ~50 µs) and every moment the thread waited for a
//!   core, to the sweep or to anything else on the machine.
//!
//! Prints each round and the medians over rounds; `SLUICE_SWEEP_KEYS`, `SLUICE_SWEEP_ROUNDS`
//! and `SLUICE_SWEEP_CLIENTS` (`stats.max_clients`) change the 1M, 3 and 100,000.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sluice::clock::Timestamp;
use sluice::limiter::{Decision, Limiter};
use sluice::stats::{DEFAULT_MAX_CLIENTS, Stats};
use sluice::store::{MemoryStore, Store};

mod common;

/// The server's allocator (src/main.rs): freeing what a sweep drops costs what it costs there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use common::{LOAD_YAML, NOW_SECS, limiter_sharing_stats, ready, request};

/// Clients decided during the sweep.
const LIVE: usize = 10_000;

/// Time between decisions due.
const EVERY: Duration = Duration::from_micros(100);

/// Decisions of the baseline (2 s).
const BASELINE: usize = 20_000;

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

/// Each decision's own time, and how long after it was due it was done.
#[derive(Default)]
struct Samples {
    own: Vec<u64>,
    late: Vec<u64>,
}

impl Samples {
    fn percentiles(self) -> [Percentiles; 2] {
        [Percentiles::of(self.own), Percentiles::of(self.late)]
    }
}

struct Round {
    /// [own time, latency from due] with no sweep running.
    idle: [Percentiles; 2],
    /// The same during the sweep.
    sweeping: [Percentiles; 2],
    /// The sweeps of counters and of clients.
    sweep: [Duration; 2],
    counters: usize,
    clients: usize,
}

fn round(keys: usize, clients: usize) -> Round {
    let l = limiter_sharing_stats(LOAD_YAML, Arc::new(Stats::new(clients)));
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
    let mut decide = |buf: &mut String, due: Instant, into: &mut Samples| {
        // Asleep until due, as a decision thread waits for its next call: woken, it takes
        // the core back from the sweep at once, where a thread that never sleeps would share
        // it in turns of a scheduler tick (4 ms).
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let now = Instant::now();
        next = (next + 1) % LIVE;
        decide_for(&l, name(next, buf), t1);
        let end = Instant::now();
        into.own.push((end - now).as_nanos() as u64);
        into.late.push((end - due).as_nanos() as u64);
    };
    let start = Instant::now();
    let mut idle = Samples::default();
    for k in 0..BASELINE as u32 {
        decide(&mut buf, start + EVERY * k, &mut idle);
    }

    let started = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let mut sweeping = Samples::default();
    let (sweep, counters, clients) = std::thread::scope(|s| {
        let sweeper = s.spawn(|| {
            started.store(true, Ordering::Release);
            let start = Instant::now();
            let counters = l.store().sweep_expired_at(t1);
            let half = start.elapsed();
            let clients = l.stats().sweep_clients_idle_since(cutoff);
            let took = [half, start.elapsed() - half];
            done.store(true, Ordering::Release);
            (took, counters, clients)
        });
        while !started.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        let start = Instant::now();
        let mut k = 0;
        while !done.load(Ordering::Acquire) {
            decide(&mut buf, start + EVERY * k, &mut sweeping);
            k += 1;
        }
        // The decisions due before the sweep ended, which a stall left undecided, are decided
        // too: their latency is the stall's.
        let end = start.elapsed();
        while EVERY * k < end {
            decide(&mut buf, start + EVERY * k, &mut sweeping);
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
        idle: idle.percentiles(),
        sweeping: sweeping.percentiles(),
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
    let clients = env("SLUICE_SWEEP_CLIENTS", DEFAULT_MAX_CLIENTS);
    println!("sweep: {keys} expired counters; {LIVE} clients decided in turn, one every {EVERY:?}");
    let mut all = Vec::new();
    for i in 0..rounds {
        let r = round(keys, clients);
        println!(
            "  round {i}: sweep of {} counters took {:.1} ms, of {} clients {:.1} ms",
            r.counters,
            r.sweep[0].as_secs_f64() * 1000.0,
            r.clients,
            r.sweep[1].as_secs_f64() * 1000.0
        );
        for (what, [own, late]) in [("no sweep", r.idle), ("during sweep", r.sweeping)] {
            println!("    {what}: own time {}", own.show());
            println!("    {what}: from due   {}", late.show());
        }
        all.push(r);
    }
    let med = |f: &dyn Fn(&Round) -> u64| median(all.iter().map(f).collect());
    println!(
        "  medians of {rounds} rounds: sweep of counters {:.1} ms, of clients {:.1} ms",
        med(&|r| r.sweep[0].as_nanos() as u64) as f64 / 1e6,
        med(&|r| r.sweep[1].as_nanos() as u64) as f64 / 1e6
    );
    type Pick = fn(&Round) -> &Percentiles;
    let rows: [(&str, Pick); 4] = [
        ("no sweep, own time", |r| &r.idle[0]),
        ("no sweep, from due", |r| &r.idle[1]),
        ("during sweep, own time", |r| &r.sweeping[0]),
        ("during sweep, from due", |r| &r.sweeping[1]),
    ];
    for (what, pick) in rows {
        println!(
            "    {what:24} p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
            med(&|r| pick(r).p50) as f64 / 1000.0,
            med(&|r| pick(r).p99) as f64 / 1000.0,
            med(&|r| pick(r).p999) as f64 / 1000.0,
            med(&|r| pick(r).max) as f64 / 1000.0,
        );
    }
}
