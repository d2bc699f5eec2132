//! Memory per tracked key, and that memory stays flat beyond `max_keys` (issue 5).
//!
//! `cargo bench --bench memory` (scripts/bench runs it). Not a criterion bench: it builds a
//! limiter from `benches/load.yaml` (`max_keys: 1000000`), reads the process's resident set size
//! (`VmRSS` in `/proc/self/status`) before and after deciding for 1M distinct clients at a fixed
//! time (so nothing expires and nothing is swept), then decides for 1M more distinct clients
//! (the store is full of live counters: each new one evicts one) and reads it again.
//!
//! Client names are formatted into one reused buffer, so the memory that grows is the store's
//! and the statistics' (at most 100,000 clients). RSS counts what the allocator took from the
//! OS, with mimalloc as in the binary: it includes the tables' spare capacity (a shard's table
//! doubles when three quarters full, up to what its share of `max_keys` needs), the tables it
//! outgrew that the allocator keeps for reuse, and rounding to pages, which is what an
//! operator sees. Also times a decision in both regimes.
//!
//! Prints a human summary and one `MEMORY_JSON {...}` line for scripts/bench.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use sluice::clock::{ManualClock, Timestamp};
use sluice::config;
use sluice::limiter::Limiter;
use sluice::store::{MemoryStore, MemoryStoreOptions, Store};

mod common;

/// The server's allocator (src/main.rs), so RSS is what an operator of the binary sees.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use common::{LOAD_YAML, NOW_SECS, ready, request};

/// Resident set size in bytes, from `/proc/self/status`.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status (Linux)");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS value in kB");
    kib * 1024
}

/// Decides for clients `from..to` (each new); returns nanoseconds per decision.
fn fill(l: &Limiter<MemoryStore>, from: u64, to: u64, now: Timestamp) -> f64 {
    let mut client = String::with_capacity(32);
    let start = Instant::now();
    for i in from..to {
        client.clear();
        write!(client, "client-{i}").unwrap();
        let r = request("load", &[("path", "/bench"), ("remote_address", &client)]);
        let rules = l.rules_in_force();
        let d = ready!(l.decide_at(&rules, &r, now));
        assert!(!d.over);
    }
    start.elapsed().as_nanos() as f64 / (to - from) as f64
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing useful either.
    let keys: u64 = std::env::var("SLUICE_MEM_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let cfg = config::parse(LOAD_YAML, "benches/load.yaml", |_| None).unwrap();
    let max_keys = cfg.store.max_keys;
    let now = Timestamp::from_secs(NOW_SECS);
    let rss_empty_process = rss_bytes();
    let l = Limiter::new(
        cfg.rules,
        MemoryStore::new(MemoryStoreOptions { max_keys }),
        Arc::new(ManualClock::new(now)),
    );
    let rss0 = rss_bytes();
    let ns_growing = fill(&l, 0, keys, now);
    let rss1 = rss_bytes();
    let tracked1 = l.store().tracked_keys();
    let evictions1 = l.store().evictions();
    let ns_full = fill(&l, keys, 2 * keys, now);
    let rss2 = rss_bytes();
    let tracked2 = l.store().tracked_keys();
    let evictions = l.store().evictions();

    let per_key = (rss1.saturating_sub(rss0)) as f64 / tracked1.max(1) as f64;
    let growth_beyond = rss2 as i64 - rss1 as i64;
    println!("memory: max_keys {max_keys}, {keys} distinct clients, then {keys} more");
    println!(
        "  process RSS before the store {:.1} MiB; empty store {:.1} MiB",
        rss_empty_process as f64 / 1048576.0,
        rss0 as f64 / 1048576.0
    );
    println!(
        "  after {keys} keys: {tracked1} tracked ({evictions1} evictions: shards fill unevenly), RSS +{:.1} MiB = {per_key:.1} B per key; {ns_growing:.0} ns per decision (store growing)",
        (rss1 - rss0) as f64 / 1048576.0
    );
    println!(
        "  after {keys} more: {tracked2} tracked, {evictions} evictions, RSS {:+.1} MiB; {ns_full:.0} ns per decision (store full, evicting)",
        growth_beyond as f64 / 1048576.0
    );
    println!(
        "MEMORY_JSON {{\"keys\":{keys},\"max_keys\":{max_keys},\"rss_empty_store\":{rss0},\"rss_after_keys\":{rss1},\"tracked_after_keys\":{tracked1},\"evictions_after_keys\":{evictions1},\"bytes_per_key\":{per_key:.1},\"ns_per_decision_growing\":{ns_growing:.0},\"rss_after_2x_keys\":{rss2},\"tracked_after_2x_keys\":{tracked2},\"evictions\":{evictions},\"rss_growth_beyond_max_keys\":{growth_beyond},\"ns_per_decision_full\":{ns_full:.0}}}"
    );
}
