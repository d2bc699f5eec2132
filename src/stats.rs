//! Decision counts for operators: per request, per domain, per endpoint and per client.
//!
//! Counters are relaxed atomics handed to each compiled [`Rule`](crate::limiter::model::Rule)
//! and [`Domain`](crate::limiter::model::Domain) when a rule set is installed, so the request path
//! increments without looking anything up. The ones every decision bumps (overall, domain,
//! endpoint, latency) are striped per thread, so that cores do not contend on them. The
//! registry keeps one counter set per (domain, endpoint) name across reloads, so counts survive
//! a config change.
//!
//! Per-client counts live in a bounded map (default 100,000 clients) keyed by a hash of the
//! client's identity; a client seen for the first time costs one allocation for its label.
//! Idle clients are swept, and when the map is full new clients are counted only in aggregate.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::store::PreHashed;

/// Counts of one limit: how often it decided a rejection, and how often it would have as a
/// shadow limit (or in shadow mode / with rate limiting disabled).
#[derive(Debug, Default)]
pub struct LimitCounts {
    /// Descriptors rejected by this limit.
    pub over: AtomicU64,
    /// Descriptors this limit would have rejected, had it been enforced.
    pub shadow_over: AtomicU64,
}

/// Upper bounds (seconds) of the decision latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.1,
];

/// Threads that own a stripe at once: each adds to its own, on its own cache line, so cores
/// recording decisions at once do not pass one line back and forth on every call (every
/// decision bumps the same overall, domain, endpoint and latency counters). Reads sum the
/// stripes; they are rare (metrics scrapes, admin calls).
const OWNED_STRIPES: usize = 16;

/// Stripes per counter set: one per owner, and one that every later thread shares.
const STRIPES: usize = OWNED_STRIPES + 1;

/// One stripe, alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Stripe<T>(T);

/// This thread's stripe, and whether it owns it.
///
/// A thread claims a free stripe when it first records and gives it back when it exits, so an
/// owner is the only writer of its stripe and adds with a plain load and store ([`add`]): a
/// locked read-modify-write costs ~20 cycles, and a call made three to six of them (overall,
/// domain and endpoint counts, and the latency histogram). When all [`OWNED_STRIPES`] are
/// taken, a thread adds atomically to the shared stripe. The server's decisions are recorded
/// by its runtime's workers, one owned stripe each.
fn stripe() -> (usize, bool) {
    let i = MINE
        .try_with(|m| {
            let mut i = m.0.get();
            if i == UNCLAIMED {
                i = claim(&OWNERS);
                m.0.set(i);
            }
            i
        })
        // Recording from another thread-local's destructor, after ours is gone.
        .unwrap_or(SHARED);
    (i, i < OWNED_STRIPES)
}

/// The shared stripe's index.
const SHARED: usize = OWNED_STRIPES;
const UNCLAIMED: usize = usize::MAX;

/// Bit `i` set: stripe `i` has a live owner.
static OWNERS: AtomicU32 = AtomicU32::new(0);

/// A thread's stripe; given back when the thread exits.
struct Mine(std::cell::Cell<usize>);

thread_local! {
    static MINE: Mine = const { Mine(std::cell::Cell::new(UNCLAIMED)) };
}

impl Drop for Mine {
    fn drop(&mut self) {
        release(&OWNERS, self.0.get());
    }
}

/// Gives back stripe `i` (if owned). Release: the next owner's claim (Acquire) sees every
/// count this owner added.
fn release(owners: &AtomicU32, i: usize) {
    if i < OWNED_STRIPES {
        owners.fetch_and(!(1 << i), Ordering::Release);
    }
}

/// Claims the lowest free owned stripe in `owners`, or answers [`SHARED`].
fn claim(owners_now: &AtomicU32) -> usize {
    let all = (1u32 << OWNED_STRIPES) - 1;
    let mut owners = owners_now.load(Ordering::Relaxed);
    loop {
        let free = !owners & all;
        if free == 0 {
            return SHARED;
        }
        let i = free.trailing_zeros();
        match owners_now.compare_exchange_weak(
            owners,
            owners | (1 << i),
            Ordering::Acquire,
            Ordering::Relaxed,
        ) {
            Ok(_) => return i as usize,
            Err(now) => owners = now,
        }
    }
}

/// Adds `n` to a counter of the stripe from [`stripe`].
#[inline]
fn add(c: &AtomicU64, n: u64, owned: bool) {
    if owned {
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    } else {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// A lock-free latency histogram with fixed buckets (Prometheus semantics: cumulative on render).
#[derive(Debug, Default)]
pub struct Histogram {
    stripes: [Stripe<HistogramCells>; STRIPES],
}

#[derive(Debug, Default)]
struct HistogramCells {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: std::time::Duration) {
        let (i, owned) = stripe();
        let Some(Stripe(cells)) = self.stripes.get(i) else {
            return;
        };
        let secs = d.as_secs_f64();
        if let Some(b) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            add(&cells.buckets[b], 1, owned);
        }
        add(&cells.count, 1, owned);
        add(
            &cells.sum_nanos,
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            owned,
        );
    }

    /// Cumulative bucket counts, total count and sum in seconds.
    pub fn snapshot(&self) -> ([u64; LATENCY_BUCKETS.len()], u64, f64) {
        let mut per_bucket = [0u64; LATENCY_BUCKETS.len()];
        let (mut count, mut sum_nanos) = (0u64, 0u64);
        for Stripe(cells) in &self.stripes {
            for (total, b) in per_bucket.iter_mut().zip(&cells.buckets) {
                *total += b.load(Ordering::Relaxed);
            }
            count += cells.count.load(Ordering::Relaxed);
            sum_nanos = sum_nanos.wrapping_add(cells.sum_nanos.load(Ordering::Relaxed));
        }
        let mut cum = [0u64; LATENCY_BUCKETS.len()];
        let mut acc = 0;
        for (c, b) in cum.iter_mut().zip(per_bucket) {
            acc += b;
            *c = acc;
        }
        (cum, count, sum_nanos as f64 / 1e9)
    }
}

/// What happened to a request or descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted.
    Allowed,
    /// Over a limit.
    Limited,
    /// Turned away by an IP block.
    Blocked,
}

/// A set of decision counters, striped (a cache line per stripe; a thread adds to its own).
/// Relaxed ordering: each is an independent tally.
#[derive(Debug, Default)]
pub struct Counts {
    stripes: [Stripe<CountCells>; STRIPES],
}

#[derive(Debug, Default)]
struct CountCells {
    allowed: AtomicU64,
    limited: AtomicU64,
    blocked: AtomicU64,
    near_limit: AtomicU64,
}

/// A point-in-time copy of [`Counts`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountsSnapshot {
    /// Admitted.
    pub allowed: u64,
    /// Over a limit.
    pub limited: u64,
    /// Blocked by IP.
    pub blocked: u64,
    /// Admitted with 20% or less of a limit left.
    pub near_limit: u64,
}

impl CountsSnapshot {
    fn add(&mut self, other: &CountsSnapshot) {
        self.allowed += other.allowed;
        self.limited += other.limited;
        self.blocked += other.blocked;
        self.near_limit += other.near_limit;
    }
}

impl Counts {
    /// Counts one decision.
    pub fn record(&self, outcome: Outcome, near_limit: bool) {
        let (i, owned) = stripe();
        let Some(Stripe(cells)) = self.stripes.get(i) else {
            return;
        };
        let c = match outcome {
            Outcome::Allowed => &cells.allowed,
            Outcome::Limited => &cells.limited,
            Outcome::Blocked => &cells.blocked,
        };
        add(c, 1, owned);
        if near_limit {
            add(&cells.near_limit, 1, owned);
        }
    }

    /// Current values.
    pub fn snapshot(&self) -> CountsSnapshot {
        let mut s = CountsSnapshot::default();
        for Stripe(cells) in &self.stripes {
            s.add(&CountsSnapshot {
                allowed: cells.allowed.load(Ordering::Relaxed),
                limited: cells.limited.load(Ordering::Relaxed),
                blocked: cells.blocked.load(Ordering::Relaxed),
                near_limit: cells.near_limit.load(Ordering::Relaxed),
            });
        }
        s
    }
}

/// One client's counts.
#[derive(Debug)]
struct ClientEntry {
    domain: Arc<str>,
    label: Box<str>,
    address: Option<Box<str>>,
    values: Box<[Box<str>]>,
    counts: CountsSnapshot,
    last_seen: u64,
}

/// A client as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientReport {
    /// Domain.
    pub domain: String,
    /// `domain|value|value`: the client id operators pass back.
    pub id: String,
    /// The client's address entry, if it had one.
    pub address: Option<String>,
    /// The client's identifying values in the domain's `client` order.
    pub values: Vec<String>,
    /// Its counts.
    pub counts: CountsSnapshot,
    /// Last decision, nanoseconds since the epoch.
    pub last_seen: u64,
}

/// Identity of a client for [`Stats::record_client`]: borrowed from the request.
#[derive(Debug, Clone, Copy)]
pub struct ClientRef<'a> {
    /// Hash of domain and values (the map key).
    pub hash: u128,
    /// Domain.
    pub domain: &'a Arc<str>,
    /// The domain's client entry names.
    pub names: &'a [String],
    /// The descriptor they were read from (every name is present); the values are copied out
    /// only when the client is first seen.
    pub entries: &'a [(&'a str, &'a str)],
    /// The address entry's value.
    pub address: Option<&'a str>,
}

/// All of sluice's decision statistics.
#[derive(Debug)]
pub struct Stats {
    /// Per request.
    pub total: Counts,
    /// Automatic blocks created.
    pub automatic_blocks: AtomicU64,
    /// Time to decide, from request received to response built.
    pub latency: Histogram,
    /// Config reloads that took effect (or found nothing to change).
    pub reloads_ok: AtomicU64,
    /// Config reloads refused (the old config kept serving).
    pub reloads_failed: AtomicU64,
    /// Generation of the config in force: 1 at start, +1 per reload that changed it.
    pub config_generation: AtomicU64,
    registry: Mutex<HashMap<(String, String), Arc<Counts>>>,
    limits: Mutex<HashMap<(String, String, String), Arc<LimitCounts>>>,
    clients: DashMap<u128, ClientEntry, BuildHasherDefault<PreHashed>>,
    client_count: AtomicUsize,
    max_clients: usize,
}

/// Shards of the per-client map, as many as the store has: every decision writes its client's
/// entry under its shard's lock, and with DashMap's default (four per core: 8 here) two cores
/// deciding for different clients met on the same lock most of the time.
const CLIENT_SHARDS: usize = 256;

/// Default bound on clients with individual counts.
pub const DEFAULT_MAX_CLIENTS: usize = 100_000;

impl Default for Stats {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_CLIENTS)
    }
}

impl Stats {
    /// Empty statistics tracking at most `max_clients` clients individually.
    pub fn new(max_clients: usize) -> Self {
        Self {
            total: Counts::default(),
            automatic_blocks: AtomicU64::new(0),
            latency: Histogram::default(),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            config_generation: AtomicU64::new(1),
            registry: Mutex::new(HashMap::new()),
            limits: Mutex::new(HashMap::new()),
            clients: DashMap::with_hasher_and_shard_amount(
                BuildHasherDefault::default(),
                CLIENT_SHARDS,
            ),
            client_count: AtomicUsize::new(0),
            max_clients,
        }
    }

    /// The counters of `domain` (`endpoint` empty) or of one of its endpoints; the same `Arc`
    /// every time, so counts survive reloads.
    pub fn counts_for(&self, domain: &str, endpoint: &str) -> Arc<Counts> {
        self.registry
            .lock()
            .entry((domain.to_string(), endpoint.to_string()))
            .or_default()
            .clone()
    }

    /// The counters of one limit, the same `Arc` across reloads.
    pub fn limit_counts_for(&self, domain: &str, endpoint: &str, limit: &str) -> Arc<LimitCounts> {
        self.limits
            .lock()
            .entry((domain.to_string(), endpoint.to_string(), limit.to_string()))
            .or_default()
            .clone()
    }

    /// Every limit's counters: `(domain, endpoint, limit, over, shadow_over)`.
    pub fn all_limit_counts(&self) -> Vec<(String, String, String, u64, u64)> {
        let mut out: Vec<_> = self
            .limits
            .lock()
            .iter()
            .map(|((d, e, l), c)| {
                (
                    d.clone(),
                    e.clone(),
                    l.clone(),
                    c.over.load(Ordering::Relaxed),
                    c.shadow_over.load(Ordering::Relaxed),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Every registered counter set: `(domain, endpoint, counts)`; endpoint empty for a domain.
    pub fn all_counts(&self) -> Vec<(String, String, CountsSnapshot)> {
        let mut out: Vec<_> = self
            .registry
            .lock()
            .iter()
            .map(|((d, e), c)| (d.clone(), e.clone(), c.snapshot()))
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    /// Counts one decision for a client.
    pub fn record_client(&self, client: ClientRef<'_>, outcome: Outcome, near: bool, now: u64) {
        if let Some(mut e) = self.clients.get_mut(&client.hash) {
            bump(&mut e.counts, outcome, near);
            e.last_seen = now;
            return;
        }
        if self.client_count.load(Ordering::Relaxed) >= self.max_clients {
            return;
        }
        let mut counts = CountsSnapshot::default();
        bump(&mut counts, outcome, near);
        let values: Vec<Box<str>> = client
            .names
            .iter()
            .map(|k| {
                Box::from(crate::limiter::model::lookup(client.entries, k).unwrap_or_default())
            })
            .collect();
        let mut label = String::from(&**client.domain);
        for v in &values {
            label.push('|');
            label.push_str(v);
        }
        let entry = ClientEntry {
            domain: client.domain.clone(),
            label: label.into(),
            address: client.address.map(Into::into),
            values: values.into_boxed_slice(),
            counts,
            last_seen: now,
        };
        if self.clients.insert(client.hash, entry).is_none() {
            self.client_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Clients tracked individually.
    pub fn tracked_clients(&self) -> usize {
        self.client_count.load(Ordering::Relaxed)
    }

    /// Forgets clients idle since before `cutoff` (nanoseconds); returns how many.
    pub fn sweep_clients_idle_since(&self, cutoff: u64) -> usize {
        let before = self.clients.len();
        self.clients.retain(|_, e| e.last_seen >= cutoff);
        let dropped = before.saturating_sub(self.clients.len());
        self.client_count
            .store(self.clients.len(), Ordering::Relaxed);
        dropped
    }

    /// Clients whose id is `query`, or whose address is `query`.
    pub fn find_clients(&self, query: &str) -> Vec<ClientReport> {
        let mut out: Vec<ClientReport> = self
            .clients
            .iter()
            .filter(|e| &*e.label == query || e.address.as_deref() == Some(query))
            .map(|e| report(&e))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The `n` clients with the most limited decisions (ties by id).
    pub fn top_limited(&self, n: usize) -> Vec<ClientReport> {
        let mut all: Vec<ClientReport> = self
            .clients
            .iter()
            .filter(|e| e.counts.limited > 0)
            .map(|e| report(&e))
            .collect();
        all.sort_by(|a, b| {
            b.counts
                .limited
                .cmp(&a.counts.limited)
                .then_with(|| a.id.cmp(&b.id))
        });
        all.truncate(n);
        all
    }

    /// Sum of a set of client reports.
    pub fn sum(reports: &[ClientReport]) -> CountsSnapshot {
        let mut s = CountsSnapshot::default();
        for r in reports {
            s.add(&r.counts);
        }
        s
    }
}

fn bump(c: &mut CountsSnapshot, outcome: Outcome, near: bool) {
    match outcome {
        Outcome::Allowed => c.allowed += 1,
        Outcome::Limited => c.limited += 1,
        Outcome::Blocked => c.blocked += 1,
    }
    if near {
        c.near_limit += 1;
    }
}

fn report(e: &ClientEntry) -> ClientReport {
    ClientReport {
        domain: e.domain.to_string(),
        id: e.label.to_string(),
        address: e.address.as_deref().map(str::to_string),
        values: e.values.iter().map(|v| v.to_string()).collect(),
        counts: e.counts,
        last_seen: e.last_seen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_are_owned_one_thread_each_and_given_back() {
        let owners = AtomicU32::new(0);
        let claimed: Vec<usize> = (0..OWNED_STRIPES).map(|_| claim(&owners)).collect();
        assert_eq!(claimed, (0..OWNED_STRIPES).collect::<Vec<_>>());
        // All taken: later threads share.
        assert_eq!(claim(&owners), SHARED);
        release(&owners, 5);
        release(&owners, SHARED);
        assert_eq!(claim(&owners), 5);
        assert_eq!(claim(&owners), SHARED);
    }

    /// Threads come and go (a runtime's blocking pool, a test harness): whoever owns a stripe
    /// at the time, and whether a thread owns one or shares, counts stay exact.
    #[test]
    fn counts_stay_exact_as_stripe_owners_change() {
        let counts = Counts::default();
        for _wave in 0..3 {
            std::thread::scope(|s| {
                for _ in 0..OWNED_STRIPES {
                    s.spawn(|| {
                        for _ in 0..1000 {
                            counts.record(Outcome::Allowed, false);
                        }
                    });
                }
            });
        }
        assert_eq!(counts.snapshot().allowed, 3 * OWNED_STRIPES as u64 * 1000);
    }

    #[test]
    fn striped_counts_and_latencies_sum_over_every_thread() {
        let counts = Counts::default();
        let latency = Histogram::default();
        // More threads than stripes, so some threads share the shared stripe.
        let threads = 2 * STRIPES;
        std::thread::scope(|s| {
            for t in 0..threads {
                let (counts, latency) = (&counts, &latency);
                s.spawn(move || {
                    for _ in 0..1000 {
                        counts.record(Outcome::Allowed, t % 2 == 0);
                        latency.observe(std::time::Duration::from_micros(30));
                    }
                    counts.record(Outcome::Limited, false);
                    counts.record(Outcome::Blocked, false);
                    latency.observe(std::time::Duration::from_secs(1));
                });
            }
        });
        let n = threads as u64;
        assert_eq!(
            counts.snapshot(),
            CountsSnapshot {
                allowed: 1000 * n,
                limited: n,
                blocked: n,
                near_limit: 1000 * n / 2,
            }
        );
        let (cumulative, count, sum) = latency.snapshot();
        assert_eq!(count, 1001 * n);
        // 30 µs falls in the 50 µs bucket (index 2); 1 s is beyond the last bucket.
        assert_eq!(cumulative[1], 0);
        assert_eq!(cumulative[2], 1000 * n);
        assert_eq!(cumulative[LATENCY_BUCKETS.len() - 1], 1000 * n);
        assert!((sum - n as f64 * (1.0 + 0.03)).abs() < 1e-6, "{sum}");
    }
}
