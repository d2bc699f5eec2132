//! Decision counts for operators: per request, per domain, per endpoint and per client.
//!
//! Counters are relaxed atomics handed to each compiled [`Rule`](crate::limiter::model::Rule)
//! and [`Domain`](crate::limiter::model::Domain) when a rule set is installed, so the request path
//! increments without looking anything up. The ones every decision bumps (overall, domain,
//! endpoint, latency) are striped per thread, so that cores do not contend on them. The
//! registry keeps one counter set per (domain, endpoint) name across reloads, so counts survive
//! a config change.
//!
//! Per-client counts live in maps keyed by a hash of the client's identity, one set of maps per
//! stripe, so each worker thread counts its decisions in maps no other thread writes; reads
//! merge the stripes. A client seen for the first time by a thread costs a few allocations for its label.
//! The maps together hold at most `max_clients` entries (default 100,000); idle clients are
//! swept, and when the maps are full new clients are counted only in aggregate (and their
//! decisions in [`Stats::untracked_clients`]).

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, MutexGuard};

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

/// envoyproxy/ratelimit's statistics of one key (`domain.key_value...`): what its Prometheus
/// mapping exports as `ratelimit_service_rate_limit_*`. Hits, not requests: a descriptor with
/// `hits_addend` 5 adds 5.
#[derive(Debug, Default)]
pub struct KeyStats {
    /// Every hit checked against the key's limit.
    pub total_hits: AtomicU64,
    /// Hits over the limit.
    pub over_limit: AtomicU64,
    /// Hits admitted above `NEAR_LIMIT_RATIO` of the limit (and those over it that crossed
    /// that band in the same request).
    pub near_limit: AtomicU64,
    /// Hits admitted.
    pub within_limit: AtomicU64,
    /// Hits over the limit of a shadow rule (admitted).
    pub shadow_mode: AtomicU64,
    /// Hits refused from the local over-limit cache without asking the store.
    pub over_limit_with_local_cache: AtomicU64,
}

/// Keys the reference's statistics may have at once. Rule keys are a handful, but
/// `detailed_metric` and `value_to_metric` make one per distinct request value: a client could
/// otherwise grow `/metrics` without bound.
pub const DEFAULT_MAX_STAT_KEYS: usize = 10_000;

/// [`KeyStats`] by key, the same counters across reloads (as the reference's stats store keeps
/// them). Bounded: once full, new keys are counted together under [`KeyRegistry::OVERFLOW`].
#[derive(Debug)]
pub struct KeyRegistry {
    map: dashmap::DashMap<Box<str>, Arc<KeyStats>>,
    overflow: Arc<KeyStats>,
    max: usize,
    /// Keys that found the registry full.
    pub overflowed: AtomicU64,
}

impl KeyRegistry {
    /// The key under which keys past the bound are counted.
    pub const OVERFLOW: &'static str = "overflow";

    /// An empty registry holding at most `max` keys.
    pub fn new(max: usize) -> Self {
        Self {
            map: dashmap::DashMap::new(),
            overflow: Arc::default(),
            max,
            overflowed: AtomicU64::new(0),
        }
    }

    /// The counters of `key`, created if there is room.
    pub fn get(&self, key: &str) -> Arc<KeyStats> {
        if let Some(s) = self.map.get(key) {
            return s.clone();
        }
        if self.map.len() >= self.max {
            self.overflowed.fetch_add(1, Ordering::Relaxed);
            return self.overflow.clone();
        }
        self.map.entry(key.into()).or_default().clone()
    }

    /// Every key and its counters, sorted by key (for `/metrics`).
    pub fn snapshot(&self) -> Vec<(String, Arc<KeyStats>)> {
        let mut v: Vec<_> = self
            .map
            .iter()
            .map(|e| (e.key().to_string(), e.value().clone()))
            .collect();
        if self.overflowed.load(Ordering::Relaxed) > 0 {
            v.push((Self::OVERFLOW.to_string(), self.overflow.clone()));
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
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
/// by its decision threads, one owned stripe each.
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

/// One client's counts in one stripe's map.
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
    /// envoyproxy/ratelimit's per-key statistics, for reference rules.
    pub keys: KeyRegistry,
    limits: Mutex<HashMap<(String, String, String), Arc<LimitCounts>>>,
    /// One set of maps per owned stripe, then [`SHARED_CLIENT_MAPS`] sets that threads without
    /// a stripe share, chosen by the client's hash.
    clients: [Stripe<Mutex<ClientMaps>>; OWNED_STRIPES + SHARED_CLIENT_MAPS],
    /// Entries in all of `clients`: a client counted by two threads is two.
    client_count: AtomicUsize,
    max_clients: usize,
    /// Decisions whose client found the maps full (`max_clients`) and was counted only in
    /// aggregate.
    pub untracked_clients: AtomicU64,
}

/// One of a stripe's [`ClientMaps`]: written by the thread that owns the stripe (see
/// [`stripe`]) and read, rarely, by admin calls, metrics scrapes and the sweeper.
///
/// Why per stripe: every decision writes its client's entry. In one map shared by the worker
/// threads (a sharded DashMap before), the shard's lock and the entry were cache lines both
/// cores wrote, so a decision on one core usually had to fetch both from the other; with two
/// workers this was 9% of the server's time against 6% with one. A stripe's lock is only ever
/// taken by its owner while it decides, so it stays in that core's cache.
///
/// The price: a client seen by several threads has an entry, and an allocated label, in each
/// of their maps, and reads add them up.
type ClientMap = HashMap<u128, ClientEntry, BuildHasherDefault<PreHashed>>;

/// A stripe's clients, split by hash into [`CLIENT_PARTS`] maps under the stripe's one lock, so
/// that no map grows large: a map that doubles moves all its entries (~120 bytes each) while
/// its owner waits, 5–7 ms for one map passing 57,344 clients.
#[derive(Debug, Default)]
struct ClientMaps([ClientMap; CLIENT_PARTS]);

const CLIENT_PARTS: usize = 16;

/// Entries of a client map the sweep judges per hold of its stripe's lock.
const SWEEP_SLICE: usize = 256;

impl ClientMaps {
    /// The map that holds, or would hold, `hash`: chosen by bits 48–51 of its keyed high half.
    ///
    /// Not its top bits: a client's hash is its keyed group in the high half and its domain's
    /// tag (the same for every client of a domain) in the low half, so a map hashes by the
    /// group's bits, whose top 7 are the control byte a lookup matches first and whose low
    /// bits choose the bucket. Choosing the map by the top bits left 8 control bytes among
    /// a map's clients instead of 128: lookups of unknown clients matched, and loaded a
    /// bucket, 16 times as often (~40 ns more per decision among 1M keys).
    fn part(&mut self, hash: u128) -> &mut ClientMap {
        &mut self.0[((hash >> 112) as usize) % CLIENT_PARTS]
    }

    fn len(&self) -> usize {
        self.0.iter().map(HashMap::len).sum()
    }
}

/// Client maps shared, by client hash, by the threads beyond the [`OWNED_STRIPES`] owners (a
/// runtime with more workers than that): one map for all of them would be one lock, held for
/// a lookup or an insert, that every such thread took on every decision.
const SHARED_CLIENT_MAPS: usize = 64;

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
            keys: KeyRegistry::new(DEFAULT_MAX_STAT_KEYS),
            limits: Mutex::new(HashMap::new()),
            clients: std::array::from_fn(|_| Stripe::default()),
            client_count: AtomicUsize::new(0),
            max_clients,
            untracked_clients: AtomicU64::new(0),
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

    /// Counts one decision for a client, in this thread's stripe.
    pub fn record_client(&self, client: ClientRef<'_>, outcome: Outcome, near: bool, now: u64) {
        let (i, owned) = stripe();
        let i = if owned {
            i
        } else {
            // Bits 32–37 of the keyed high half (see `ClientMaps::part` for why not others).
            OWNED_STRIPES + ((client.hash >> 96) as usize) % SHARED_CLIENT_MAPS
        };
        let Some(Stripe(map)) = self.clients.get(i) else {
            return;
        };
        let mut maps = map.lock();
        let map = maps.part(client.hash);
        if let Some(e) = map.get_mut(&client.hash) {
            bump(&mut e.counts, outcome, near);
            e.last_seen = now;
            return;
        }
        // The place is taken before the check, so that threads inserting into different maps
        // at once cannot all see room for one more and pass the bound together.
        if self.client_count.fetch_add(1, Ordering::Relaxed) >= self.max_clients {
            self.client_count.fetch_sub(1, Ordering::Relaxed);
            self.untracked_clients.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut counts = CountsSnapshot::default();
        bump(&mut counts, outcome, near);
        let values: Vec<Box<str>> = client
            .names
            .iter()
            .map(|k| Box::from(crate::entries::lookup(client.entries, k).unwrap_or_default()))
            .collect();
        let mut label = String::from(&**client.domain);
        for v in &values {
            label.push('|');
            label.push_str(v);
        }
        map.insert(
            client.hash,
            ClientEntry {
                domain: client.domain.clone(),
                label: label.into(),
                address: client.address.map(Into::into),
                values: values.into_boxed_slice(),
                counts,
                last_seen: now,
            },
        );
    }

    /// Distinct clients tracked individually.
    pub fn tracked_clients(&self) -> usize {
        let (mut stripes, mut len) = (0, 0);
        for Stripe(map) in &self.clients {
            let n = map.lock().len();
            if n > 0 {
                stripes += 1;
                len = n;
            }
        }
        // The common case, one thread deciding, needs no set.
        if stripes <= 1 {
            return len;
        }
        let mut seen: std::collections::HashSet<u128, BuildHasherDefault<PreHashed>> =
            Default::default();
        self.each_map(|m| seen.extend(m.keys()));
        seen.len()
    }

    /// Calls `f` with every map of every stripe, holding a stripe's lock for one of its maps at
    /// a time and handing it to the stripe's owner, if waiting, between them: a scrape or an
    /// admin call reading 100,000 clients holds up a decision for no more than one map.
    fn each_map(&self, mut f: impl FnMut(&ClientMap)) {
        for Stripe(map) in &self.clients {
            for part in 0..CLIENT_PARTS {
                let maps = map.lock();
                if let Some(m) = maps.0.get(part) {
                    f(m);
                }
                MutexGuard::unlock_fair(maps);
            }
        }
    }

    /// Forgets clients idle since before `cutoff` (nanoseconds); returns how many entries went
    /// (a client known to several threads may go from some maps and not yet from others).
    ///
    /// A stripe's owner takes its lock on every decision, so the sweep judges at most 256
    /// entries of one of the stripe's maps per hold of the lock, hands it to
    /// the owner if it is waiting (a fair unlock) and gives up its core for a moment (as
    /// [`crate::store::MemoryStore::sweep_at`] does), and frees the entries it took out (their
    /// labels) only after letting go. Each hold walks the map to where the last one stopped,
    /// in the map's order, which the entries taken out do not change: a new client the owner
    /// added meanwhile may shift that order by one, and its neighbour is judged twice or left
    /// for the next sweep.
    pub fn sweep_clients_idle_since(&self, cutoff: u64) -> usize {
        let mut dropped = 0;
        let mut gone: Vec<ClientEntry> = Vec::new();
        for Stripe(map) in &self.clients {
            for part in 0..CLIENT_PARTS {
                // Entries of this map judged and kept so far: the next hold skips them.
                let mut kept = 0;
                loop {
                    let mut maps = map.lock();
                    let Some(m) = maps.0.get_mut(part) else {
                        break;
                    };
                    let (skip, mut seen, mut judged) = (kept, 0, 0);
                    gone.extend(
                        m.extract_if(|_, e| {
                            seen += 1;
                            if seen <= skip || judged == SWEEP_SLICE {
                                return false;
                            }
                            judged += 1;
                            let idle = e.last_seen < cutoff;
                            kept += usize::from(!idle);
                            idle
                        })
                        .map(|(_, e)| e),
                    );
                    MutexGuard::unlock_fair(maps);
                    std::thread::yield_now();
                    self.client_count.fetch_sub(gone.len(), Ordering::Relaxed);
                    dropped += gone.len();
                    gone.clear();
                    if judged < SWEEP_SLICE {
                        break;
                    }
                }
            }
        }
        dropped
    }

    /// Every stripe's entries that `keep` selects, merged per client: counts added up, the
    /// latest `last_seen`. `keep` must judge a client by its identity (the same in every
    /// stripe), not by its counts.
    fn merged(&self, keep: impl Fn(u128, &ClientEntry) -> bool) -> Vec<ClientReport> {
        let mut by_hash: HashMap<u128, ClientReport, BuildHasherDefault<PreHashed>> =
            HashMap::default();
        self.each_map(|m| {
            for (hash, e) in m.iter().filter(|(h, e)| keep(**h, e)) {
                by_hash
                    .entry(*hash)
                    .and_modify(|r| {
                        r.counts.add(&e.counts);
                        r.last_seen = r.last_seen.max(e.last_seen);
                    })
                    .or_insert_with(|| report(e));
            }
        });
        let mut out: Vec<ClientReport> = by_hash.into_values().collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Clients whose id is `query`, or whose address is `query`.
    pub fn find_clients(&self, query: &str) -> Vec<ClientReport> {
        self.merged(|_, e| &*e.label == query || e.address.as_deref() == Some(query))
    }

    /// The `n` clients with the most limited decisions (ties by id).
    ///
    /// The counts are added up across stripes first, copying only hashes and numbers under
    /// each stripe's lock; reports are built for the `n` chosen.
    pub fn top_limited(&self, n: usize) -> Vec<ClientReport> {
        let mut limited: HashMap<u128, u64, BuildHasherDefault<PreHashed>> = HashMap::default();
        self.each_map(|m| {
            for (hash, e) in m {
                *limited.entry(*hash).or_default() += e.counts.limited;
            }
        });
        limited.retain(|_, l| *l > 0);
        // Ties are broken by id, which needs the labels: report every client whose count
        // reaches the n-th largest (so all tied with it), then sort and cut.
        let mut counts: Vec<u64> = limited.values().copied().collect();
        let floor = match n.checked_sub(1) {
            None => return Vec::new(),
            Some(i) if i < counts.len() => *counts.select_nth_unstable_by(i, |a, b| b.cmp(a)).1,
            Some(_) => 1,
        };
        let mut all = self.merged(|hash, _| limited.get(&hash).is_some_and(|&l| l >= floor));
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

    /// Held by the tests that keep more threads alive than there are stripes, and by those
    /// that need their threads to own stripes: under `cargo test` the tests of this crate share
    /// one process, and so its stripes (nextest runs each test in a process of its own).
    static STRIPE_HOGS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn hog_stripes() -> std::sync::MutexGuard<'static, ()> {
        STRIPE_HOGS.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `n` decisions of `outcome` for client `ip` (domain `d`, client entry
    /// `remote_address`) at time `now`.
    fn client(stats: &Stats, ip: &str, outcome: Outcome, n: usize, now: u64) {
        let domain: Arc<str> = Arc::from("d");
        let names = ["remote_address".to_string()];
        let entries = [("remote_address", ip)];
        // Laid out as the limiter's: a keyed hash of the client in the high half, the domain's
        // tag (the same for all its clients) in the low half.
        let fnv = ip.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let mut z = fnv.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let hash = (u128::from(z ^ (z >> 31)) << 64) | 0x5eed;
        for _ in 0..n {
            stats.record_client(
                ClientRef {
                    hash,
                    domain: &domain,
                    names: &names,
                    entries: &entries,
                    address: Some(ip),
                },
                outcome,
                false,
                now,
            );
        }
    }

    /// Each thread counts in its own stripe's map; every read adds the maps up per client.
    #[test]
    fn clients_counted_on_several_threads_read_as_one() {
        let _hogs = hog_stripes();
        let stats = Stats::new(100);
        // Two threads see the same two clients; both live until both have counted, so each
        // has a stripe of its own (a thread gives its stripe back when it exits).
        let both = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                client(&stats, "192.0.2.1", Outcome::Allowed, 3, 10);
                client(&stats, "192.0.2.2", Outcome::Limited, 2, 10);
                both.wait();
            });
            s.spawn(|| {
                client(&stats, "192.0.2.1", Outcome::Limited, 4, 20);
                client(&stats, "192.0.2.2", Outcome::Allowed, 1, 5);
                both.wait();
            });
        });
        client(&stats, "192.0.2.3", Outcome::Blocked, 1, 30);
        // Three clients, five entries.
        assert_eq!(stats.tracked_clients(), 3);
        assert_eq!(stats.client_count.load(Ordering::Relaxed), 5);

        let one = stats.find_clients("d|192.0.2.1");
        assert_eq!(one.len(), 1, "{one:?}");
        assert_eq!(
            (
                one[0].counts.allowed,
                one[0].counts.limited,
                one[0].last_seen
            ),
            (3, 4, 20)
        );
        assert_eq!(one[0].values, ["192.0.2.1"]);
        let by_address = stats.find_clients("192.0.2.2");
        assert_eq!(
            (by_address[0].counts.allowed, by_address[0].counts.limited),
            (1, 2)
        );

        // Limited counts are added up before the top is chosen: 4 beats 2, and the entry with
        // none limited still brings its allowed calls.
        let top = stats.top_limited(1);
        assert_eq!(top.len(), 1);
        assert_eq!(
            (top[0].id.as_str(), top[0].counts.allowed),
            ("d|192.0.2.1", 3)
        );
        let top = stats.top_limited(10);
        let ids: Vec<_> = top.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["d|192.0.2.1", "d|192.0.2.2"]);
        assert!(stats.top_limited(0).is_empty());

        // Idle before 10: 192.0.2.2's entry last seen at 5 goes; its other stays.
        assert_eq!(stats.sweep_clients_idle_since(10), 1);
        assert_eq!(stats.client_count.load(Ordering::Relaxed), 4);
        let two = stats.find_clients("192.0.2.2");
        assert_eq!((two[0].counts.allowed, two[0].counts.limited), (0, 2));
        assert_eq!(stats.sweep_clients_idle_since(u64::MAX), 4);
        assert_eq!(stats.tracked_clients(), 0);
    }

    /// More threads at once than there are stripes to own: those without one count in the
    /// shared maps, and reads still add every thread's counts up per client.
    #[test]
    fn clients_counted_by_more_threads_than_stripes_read_as_one() {
        let _hogs = hog_stripes();
        let stats = Stats::new(1000);
        let threads = 2 * OWNED_STRIPES + 3;
        let all = std::sync::Barrier::new(threads);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (stats, all) = (&stats, &all);
                s.spawn(move || {
                    client(stats, "192.0.2.1", Outcome::Allowed, 10, 1);
                    client(
                        stats,
                        &format!("198.51.100.{t}"),
                        Outcome::Limited,
                        t + 1,
                        1,
                    );
                    all.wait();
                });
            }
        });
        // At least 19 threads had no stripe; their 20 clients or more spread over the shared
        // maps (chosen by the clients' keyed bits, not the domain's tag).
        let shared = stats.clients[OWNED_STRIPES..]
            .iter()
            .filter(|Stripe(m)| m.lock().len() > 0)
            .count();
        assert!(shared >= 4, "{shared} shared maps used");
        let one = stats.find_clients("192.0.2.1");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].counts.allowed, 10 * threads as u64);
        assert_eq!(stats.tracked_clients(), threads + 1);
        let top = stats.top_limited(2);
        assert_eq!(top[0].counts.limited, threads as u64);
        assert_eq!(top[1].counts.limited, threads as u64 - 1);
    }

    /// One thread's clients, all of one domain, spread over its stripe's maps.
    #[test]
    fn a_stripes_clients_spread_over_its_maps() {
        // No test keeping every stripe busy runs meanwhile: this thread owns one.
        let _hogs = hog_stripes();
        let stats = Stats::new(10_000);
        for i in 0..1000 {
            client(
                &stats,
                &format!("10.0.{}.{}", i / 256, i % 256),
                Outcome::Allowed,
                1,
                1,
            );
        }
        let (i, owned) = stripe();
        assert!(owned);
        let maps = stats.clients[i].0.lock();
        let used = maps.0.iter().filter(|m| !m.is_empty()).count();
        assert_eq!(maps.len(), 1000);
        assert_eq!(used, CLIENT_PARTS);
    }

    /// A map many slices long is swept a slice at a time: every idle client goes, every
    /// other stays.
    #[test]
    fn a_sweep_in_slices_drops_every_idle_client_of_a_large_map() {
        let _hogs = hog_stripes();
        let stats = Stats::new(100_000);
        // About 1,250 clients a map: five slices each.
        for i in 0..20_000 {
            let ip = format!("10.0.{}.{}", i / 256, i % 256);
            client(
                &stats,
                &ip,
                Outcome::Allowed,
                1,
                if i % 3 == 0 { 5 } else { 20 },
            );
        }
        let (i, _) = stripe();
        let biggest = stats.clients[i].0.lock().0.iter().map(HashMap::len).max();
        assert!(biggest > Some(4 * SWEEP_SLICE), "{biggest:?}");
        assert_eq!(stats.sweep_clients_idle_since(10), 6_667);
        assert_eq!(stats.tracked_clients(), 13_333);
        assert_eq!(stats.client_count.load(Ordering::Relaxed), 13_333);
        assert!(stats.find_clients("10.0.0.0").is_empty(), "idle since 5");
        assert_eq!(stats.find_clients("10.0.0.1").len(), 1);
    }

    /// Ties at the top are broken by id, including ties with the n-th count.
    #[test]
    fn top_limited_breaks_ties_by_id() {
        let stats = Stats::new(100);
        for (ip, n) in [
            ("192.0.2.9", 5),
            ("192.0.2.5", 2),
            ("192.0.2.1", 2),
            ("192.0.2.3", 1),
        ] {
            client(&stats, ip, Outcome::Limited, n, 1);
        }
        client(&stats, "192.0.2.7", Outcome::Allowed, 9, 1);
        let ids = |n| -> Vec<String> { stats.top_limited(n).into_iter().map(|r| r.id).collect() };
        assert_eq!(ids(2), ["d|192.0.2.9", "d|192.0.2.1"]);
        assert_eq!(ids(3), ["d|192.0.2.9", "d|192.0.2.1", "d|192.0.2.5"]);
        assert_eq!(ids(9).len(), 4, "a client never limited is not in the top");
    }

    /// The bound is on entries across threads: once reached, new clients are counted only in
    /// aggregate, and known ones still count.
    #[test]
    fn the_client_bound_holds_across_threads() {
        let stats = Stats::new(3);
        std::thread::scope(|s| {
            for t in 0..4 {
                let stats = &stats;
                s.spawn(move || client(stats, &format!("192.0.2.{t}"), Outcome::Allowed, 1, 1));
            }
        });
        assert_eq!(stats.tracked_clients(), 3);
        assert_eq!(stats.untracked_clients.load(Ordering::Relaxed), 1);
        let known = stats.top_limited(10);
        assert!(known.is_empty(), "no client was limited: {known:?}");
        let before: u64 = (0..4)
            .flat_map(|t| stats.find_clients(&format!("192.0.2.{t}")))
            .map(|r| r.counts.allowed)
            .sum();
        assert_eq!(before, 3);
    }

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
        let _hogs = hog_stripes();
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
        let _hogs = hog_stripes();
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
