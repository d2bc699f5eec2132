//! The in-memory store: counters in a fixed number of mutex-guarded table shards.
//!
//! Why not one `DashMap`: a request touches several counters and must charge all of them or
//! none, atomically. With our own shards we lock exactly the shards a batch needs, in ascending
//! order (so two batches can never deadlock), evaluate, then commit or not. A hot key costs one
//! uncontended-ish mutex; distinct keys spread over [`SHARDS`] locks, so there is no global lock.
//!
//! Keys are already keyed hashes ([`CounterKey`]), so each shard's [`CounterTable`] uses them
//! directly as its index: a lookup's first probe reads the entry itself, one cache miss when the
//! store has outgrown the caches. Each entry is a 16-byte key plus a 24-byte cell (state and
//! expiry), stored inline, and a shard's table grows no larger than its share of `max_keys`
//! needs. Expired entries are dropped by [`MemoryStore::sweep_at`], which the server calls from
//! a background thread, a slice of a shard per hold of its lock. When a shard is full (its share of the configured `max_keys`), an insert
//! first drops an expired entry among a few it looks at, else the live one expiring soonest, so
//! memory stays flat under a flood of new clients.
//!
//! A key every request touches (one busy client, a domain-wide limit) is the case where two
//! cores contend: each decision takes the shard's lock and the counter's slot from the other
//! core. So each shard keeps one counter in use beside its lock, in the same cache line
//! ([`CounterTable::get_mut_front`], `ShardLock`), and such a decision moves one line between
//! cores instead of two (three transfers: the lock, then the slot read, then written).

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;

use super::table::CounterTable;
use super::{Charge, ChargeKind, CounterKey, Store, StoreError, Tally, Verdict};
use crate::algorithms::{CellState, Hits, evaluate};
use crate::clock::Timestamp;

/// Number of shards. A power of two well above the core count keeps contention between
/// unrelated clients rare.
pub const SHARDS: usize = 256;

/// Slots a sweep looks at per hold of a shard's lock (~10 KB of the table): a decision on that
/// shard waits for no more than this slice, however large `max_keys` makes a shard.
const SWEEP_SLICE: usize = 256;

/// Entries looked at to choose one to evict from a full shard.
const EVICTION_SAMPLE: usize = 8;

/// Largest batch applied atomically (64 descriptors with a few limits each).
pub const MAX_BATCH: usize = 1024;

/// Tuning for [`MemoryStore`].
#[derive(Debug, Clone, Copy)]
pub struct MemoryStoreOptions {
    /// Upper bound on tracked counters; memory stays flat beyond it.
    pub max_keys: usize,
}

impl Default for MemoryStoreOptions {
    fn default() -> Self {
        Self {
            max_keys: 1_000_000,
        }
    }
}

/// One counter's state and when it may be forgotten.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Cell {
    state: CellState,
    expires_at: u64,
}

impl Cell {
    /// Whether the counter no longer matters at `now`: a decision treats it as absent, a sweep
    /// drops it, and a full shard or the front entry gives it up first.
    #[inline]
    fn expired(&self, now: u64) -> bool {
        self.expires_at <= now
    }
}

type Shard = CounterTable<Cell>;

/// A shard's lock and table, aligned so that the lock's byte and the table's front entry share
/// one cache line: a decision on the key in front (in steady use: a hot client, a domain-wide
/// limit) then needs no other line of the shard. Two cores deciding such a key in turn pass
/// one line back and forth per decision instead of three transfers. The layout is checked by
/// `the_lock_and_the_front_entry_share_a_cache_line`.
#[repr(C, align(64))]
struct ShardLock(Mutex<Shard>);

impl std::ops::Deref for ShardLock {
    type Target = Mutex<Shard>;

    fn deref(&self) -> &Mutex<Shard> {
        &self.0
    }
}

/// Sharded in-memory counters. See the module docs.
pub struct MemoryStore {
    shards: Box<[ShardLock]>,
    per_shard_cap: usize,
    evictions: AtomicU64,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("tracked_keys", &self.tracked_keys())
            .field("per_shard_cap", &self.per_shard_cap)
            .finish()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new(options: MemoryStoreOptions) -> Self {
        let per_shard_cap = options.max_keys.div_ceil(SHARDS).max(1);
        let shards = (0..SHARDS)
            .map(|_| ShardLock(Mutex::new(Shard::with_max_len(per_shard_cap))))
            .collect::<Vec<_>>()
            .into_boxed_slice();
        Self {
            shards,
            per_shard_cap,
            evictions: AtomicU64::new(0),
        }
    }

    /// The shard of a key: the high bits, independent of the low bits a table indexes with.
    fn shard_of(key: CounterKey) -> usize {
        (key.0 >> (128 - SHARDS.trailing_zeros())) as usize
    }

    /// Drops every counter whose state no longer matters at `now`; returns how many. Holds a
    /// shard's lock for one slice of its table (256 slots) at a time, and hands the lock to a
    /// waiting decision, if any, before taking it again (a fair unlock: without it the sweep,
    /// already running, would usually win the lock back at once), then gives up its core for
    /// a moment: a decision thread woken on the sweep's core (by that hand-over, or by a call)
    /// runs now rather than at the scheduler's next tick, milliseconds later. No decision
    /// waits behind more than one slice. Counters changed between slices are judged by the
    /// next sweep.
    pub fn sweep_at(&self, now: Timestamp) -> usize {
        let now = now.as_nanos();
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut next = Some(0);
            while let Some(start) = next {
                let mut map = shard.lock();
                let before = map.len();
                next = map.retain_slice(start, SWEEP_SLICE, |_, cell| !cell.expired(now));
                dropped += before - map.len();
                MutexGuard::unlock_fair(map);
                std::thread::yield_now();
            }
        }
        dropped
    }

    /// Inserts or replaces `key`, keeping the shard within its share of `max_keys`.
    fn put(&self, map: &mut Shard, key: u128, cell: Cell, now: u64) {
        match map.get_mut_front(key, |front| front.expired(now)) {
            Some(slot) => *slot = cell,
            None => self.put_new(map, key, cell, now),
        }
    }

    /// Adds `key`, just looked up and not found, keeping the shard within its share of
    /// `max_keys`.
    fn put_new(&self, map: &mut Shard, key: u128, cell: Cell, now: u64) {
        if map.len() >= self.per_shard_cap {
            // Full: make room in O(1). Look at a few entries (in slot order from the new key's
            // home, which clients cannot predict under a keyed hash) and drop the first expired
            // one, else the one expiring soonest (its client starts afresh). The sweeper purges
            // expired entries in bulk; scanning the whole shard here would cost every new client
            // tens of microseconds.
            let mut victim: Option<(u128, u64)> = None;
            for (k, c) in map.iter_from(key).take(EVICTION_SAMPLE) {
                if c.expired(now) {
                    victim = Some((k, 0));
                    break;
                }
                if victim.is_none_or(|(_, e)| c.expires_at < e) {
                    victim = Some((k, c.expires_at));
                }
            }
            if let Some((k, expires_at)) = victim {
                map.remove(k);
                if expires_at > now {
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        map.insert_new(key, cell);
    }

    /// Applies a batch: `Some(committed)`, or `None` when it is larger than [`MAX_BATCH`]. An
    /// `Option<bool>` rather than the trait's `Result` comes back in a register; the `Result`
    /// came back through memory, written a byte at a time and read back whole, a load that
    /// waits on those stores (~2% of a hot decision).
    fn apply_locked(
        &self,
        charges: &[Charge<'_>],
        verdicts: &mut [Verdict],
        now: Timestamp,
    ) -> Option<bool> {
        if charges.len() > MAX_BATCH {
            return None;
        }
        let now = now.as_nanos();
        // The commonest request: one counter.
        if let ([charge], [verdict]) = (charges, &mut *verdicts) {
            let mut map = self.shards[Self::shard_of(charge.key)].lock();
            return Some(self.apply_one(&mut map, charge, verdict, now));
        }
        // The common case: every counter of the request in one shard (a client's counters share
        // their group, hence their shard): one lock and no bookkeeping.
        let first = charges.first().map_or(0, |c| Self::shard_of(c.key));
        if charges.iter().all(|c| Self::shard_of(c.key) == first) {
            let mut guard = self.shards[first].lock();
            return Some(self.apply_in(&mut OneShard(&mut guard), charges, verdicts, now));
        }
        let mut ids: SmallVec<[usize; 8]> = charges.iter().map(|c| Self::shard_of(c.key)).collect();
        ids.sort_unstable();
        ids.dedup();
        // Ascending shard order: any two batches lock shared shards in the same order.
        let mut guards: SmallVec<[(usize, MutexGuard<'_, Shard>); 8]> =
            ids.iter().map(|&i| (i, self.shards[i].lock())).collect();
        Some(self.apply_in(&mut guards.as_mut_slice(), charges, verdicts, now))
    }

    /// [`Self::apply_in`] for a batch of one: the counter is looked up once and updated in
    /// place, or added without looking again (a batch looks each up twice, to evaluate all
    /// before committing any).
    fn apply_one(
        &self,
        map: &mut Shard,
        charge: &Charge<'_>,
        verdict: &mut Verdict,
        now: u64,
    ) -> bool {
        // An expired front entry is as good as absent (`judge` treats it so): it gives way.
        let slot = map.get_mut_front(charge.key.0, |front| front.expired(now));
        let judged = judge(charge, slot.as_deref(), now);
        *verdict = judged.verdict;
        if let Some(cell) = judged.write {
            match slot {
                Some(c) => *c = cell,
                None => self.put_new(map, charge.key.0, cell, now),
            }
        }
        !judged.blocks
    }

    /// Evaluates and commits a batch whose shards are all locked in `shards`.
    fn apply_in(
        &self,
        shards: &mut impl LockedShards,
        charges: &[Charge<'_>],
        verdicts: &mut [Verdict],
        now: u64,
    ) -> bool {
        let mut cells: SmallVec<[Option<Cell>; 8]> = SmallVec::with_capacity(charges.len());
        let mut commit = true;
        for (charge, verdict) in charges.iter().zip(verdicts.iter_mut()) {
            // Looked up as `apply_one` does, moving a key in use to the front alike, so that
            // both paths leave the same table.
            let stored = shards.shard(charge.key).and_then(|map| {
                map.get_mut_front(charge.key.0, |front| front.expired(now))
                    .copied()
            });
            let judged = judge(charge, stored.as_ref(), now);
            *verdict = judged.verdict;
            commit &= !judged.blocks;
            cells.push(judged.write);
        }

        for (charge, cell) in charges.iter().zip(cells.iter()) {
            if !commit && charge.kind != ChargeKind::Observe {
                continue;
            }
            if let (Some(cell), Some(map)) = (cell, shards.shard(charge.key)) {
                self.put(map, charge.key.0, *cell, now);
            }
        }
        if !commit {
            // Nothing is charged: report what each admitted limit has left without this request.
            for (charge, verdict) in charges.iter().zip(verdicts.iter_mut()) {
                if verdict.allowed
                    && let Some(map) = shards.shard(charge.key)
                {
                    let state = map
                        .get(charge.key.0)
                        .filter(|c| !c.expired(now))
                        .map(|c| c.state);
                    let out = evaluate(charge.policy, state, now, Hits::Take(0));
                    verdict.remaining = out.remaining;
                    verdict.reset_after = out.reset_after;
                }
            }
        }
        commit
    }
}

/// What one charge decides, before anything is written.
struct Judged {
    verdict: Verdict,
    /// The cell to store if the batch commits; `None` leaves the counter as it is (a denied
    /// charge, or a pure check of an unknown key, which leaves no trace).
    write: Option<Cell>,
    /// A denial of an enforced limit: nothing of the batch is charged.
    blocks: bool,
}

/// Evaluates `charge` against its stored cell (expired counts as absent).
#[inline]
fn judge(charge: &Charge<'_>, stored: Option<&Cell>, now: u64) -> Judged {
    let state = stored.filter(|c| !c.expired(now)).map(|c| c.state);
    let out = evaluate(charge.policy, state, now, charge.hits);
    let writes = out.allowed && (state.is_some() || charge.hits != Hits::Take(0));
    Judged {
        verdict: Verdict {
            allowed: out.allowed,
            remaining: out.remaining,
            reset_after: out.reset_after,
        },
        write: writes.then_some(Cell {
            state: out.state,
            expires_at: out.expires_at,
        }),
        blocks: !out.allowed && charge.kind == ChargeKind::Enforce,
    }
}

/// The shards a batch has locked.
trait LockedShards {
    /// The locked shard holding `key`; `None` if the batch did not lock it (a bug, answered by
    /// treating the counter as absent rather than by a panic on the request path).
    fn shard(&mut self, key: CounterKey) -> Option<&mut Shard>;
}

/// A batch within one shard.
struct OneShard<'g, 's>(&'g mut MutexGuard<'s, Shard>);

impl LockedShards for OneShard<'_, '_> {
    fn shard(&mut self, _key: CounterKey) -> Option<&mut Shard> {
        Some(&mut **self.0)
    }
}

/// A batch over several shards, with their ids.
impl LockedShards for &mut [(usize, MutexGuard<'_, Shard>)] {
    fn shard(&mut self, key: CounterKey) -> Option<&mut Shard> {
        let id = MemoryStore::shard_of(key);
        self.iter_mut()
            .find(|(i, _)| *i == id)
            .map(|(_, g)| &mut **g)
    }
}

impl Store for MemoryStore {
    async fn apply(
        &self,
        charges: &[Charge<'_>],
        verdicts: &mut [Verdict],
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        self.apply_locked(charges, verdicts, now)
            .ok_or(StoreError::BatchTooLarge(charges.len()))
    }

    async fn tally(
        &self,
        tallies: &[Tally<'_>],
        counts: &mut [u64],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let now = now.as_nanos();
        for (t, count) in tallies.iter().zip(counts.iter_mut()) {
            let w = t.window_secs.max(1).saturating_mul(1_000_000_000);
            let window = now / w;
            let mut map = self.shards[Self::shard_of(t.key)].lock();
            let slot = map.get_mut_front(t.key.0, |front| front.expired(now));
            let current = slot
                .as_deref()
                .filter(|c| !c.expired(now) && c.state.a == window)
                .map_or(0, |c| c.state.b);
            let Some(hits) = t.hits else {
                *count = current;
                continue;
            };
            let cell = Cell {
                state: CellState {
                    a: window,
                    b: current.saturating_add(hits),
                },
                expires_at: window.saturating_add(1).saturating_mul(w),
            };
            *count = cell.state.b;
            match slot {
                Some(c) => *c = cell,
                None => self.put_new(&mut map, t.key.0, cell, now),
            }
        }
        Ok(())
    }

    async fn forget(&self, keys: &[CounterKey]) -> Result<(), StoreError> {
        for &key in keys {
            self.shards[Self::shard_of(key)].lock().remove(key.0);
        }
        Ok(())
    }

    fn tracked_keys(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    fn sweep_expired_at(&self, now: Timestamp) -> usize {
        self.sweep_at(now)
    }

    fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU64;

    use proptest::prelude::*;

    use super::*;
    use crate::algorithms::Policy;

    const POLICIES: [Policy; 3] = [
        Policy::SlidingWindow {
            limit: 3,
            window: NonZeroU64::new(1_000).unwrap(),
        },
        Policy::FixedWindow {
            limit: 2,
            window: NonZeroU64::new(700).unwrap(),
        },
        Policy::TokenBucket {
            capacity: 2,
            interval: NonZeroU64::new(300).unwrap(),
        },
    ];

    fn hits() -> impl Strategy<Value = Hits> {
        prop_oneof![
            4 => (0u64..3).prop_map(Hits::Take),
            1 => (1u64..3).prop_map(Hits::Return),
        ]
    }

    fn kind() -> impl Strategy<Value = ChargeKind> {
        prop_oneof![
            Just(ChargeKind::Enforce),
            Just(ChargeKind::Shadow),
            Just(ChargeKind::Observe)
        ]
    }

    /// Charges one hit of a fixed window of `window` ns to `key` at `now`.
    fn charge_at(store: &MemoryStore, key: u128, window: u64, now: u64) {
        let policy = Policy::FixedWindow {
            limit: 5,
            window: NonZeroU64::new(window).unwrap(),
        };
        let charge = Charge {
            key: CounterKey(key),
            policy: &policy,
            hits: Hits::Take(1),
            kind: ChargeKind::Enforce,
        };
        let mut v = [Verdict::default()];
        assert_eq!(
            store.apply_locked(&[charge], &mut v, Timestamp::from_nanos(now)),
            Some(true)
        );
    }

    #[test]
    fn the_lock_and_the_front_entry_share_a_cache_line() {
        let shard = ShardLock(Mutex::new(Shard::with_max_len(100)));
        let base = &shard as *const ShardLock as usize;
        assert_eq!(base % 64, 0, "a shard starts a cache line");
        let guard = shard.lock();
        let data = &*guard as *const Shard as usize;
        let (front, len) = guard.front_span();
        // The mutex is its lock's bytes and the table: the lock lies wherever the table does not.
        let (lock_start, lock_end) = if data == base {
            (base + size_of::<Shard>(), base + size_of::<Mutex<Shard>>())
        } else {
            (base, data)
        };
        let line = |address: usize| address / 64;
        assert_eq!(
            line(front),
            line(front + len - 1),
            "the front entry spans two lines"
        );
        assert_eq!(
            line(lock_start),
            line(front),
            "the lock is not on the front's line"
        );
        assert_eq!(
            line(lock_end - 1),
            line(front),
            "the lock is not on the front's line"
        );
    }

    /// A counter found in use takes its shard's empty front; it keeps it while it lives, and
    /// gives it up once expired, to the next counter found (the expired one goes, uncounted);
    /// a sweep drops an expired front like any expired counter.
    #[test]
    fn a_counter_in_use_takes_the_front_and_gives_it_up_once_expired() {
        let store = MemoryStore::new(MemoryStoreOptions {
            max_keys: 8 * SHARDS,
        });
        let front = || store.shards[0].lock().front_key();
        let keys = || {
            let mut k: Vec<u128> = store.shards[0].lock().iter().map(|(k, _)| k).collect();
            k.sort_unstable();
            k
        };
        charge_at(&store, 1, 1_000, 0); // new: into the slots
        assert_eq!(front(), None);
        charge_at(&store, 1, 1_000, 10); // found: takes the empty front
        assert_eq!(front(), Some(1));
        charge_at(&store, 2, 1_000, 20);
        charge_at(&store, 2, 1_000, 30); // found, but the front lives: stays in the slots
        assert_eq!(front(), Some(1));
        assert_eq!(keys(), [1, 2]);
        // Both windows ended at 1,000. Key 2, found, takes the front; key 1 goes.
        charge_at(&store, 2, 1_000, 1_500);
        assert_eq!(front(), Some(2));
        assert_eq!(keys(), [2]);
        assert_eq!(store.evictions(), 0);
        assert_eq!(store.sweep_at(Timestamp::from_nanos(10_000)), 1);
        assert_eq!(front(), None);
        assert_eq!(store.tracked_keys(), 0);
    }

    /// A shard many slices long is swept a slice at a time: every expired counter goes, every
    /// live one stays.
    #[test]
    fn a_sweep_in_slices_drops_every_expired_counter_of_a_large_shard() {
        let store = MemoryStore::new(MemoryStoreOptions {
            max_keys: 8_192 * SHARDS,
        });
        // All in shard 0 (high word 0), spread over its slots by their low words.
        let key = |k: u64| u128::from(k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for k in 1..=4_000u64 {
            charge_at(&store, key(k), if k % 2 == 0 { 1_000 } else { 5_000 }, 0);
        }
        assert_eq!(store.tracked_keys(), 4_000);
        assert_eq!(store.sweep_at(Timestamp::from_nanos(2_000)), 2_000);
        let mut left: Vec<u128> = store.shards[0].lock().iter().map(|(k, _)| k).collect();
        left.sort_unstable();
        let mut odd: Vec<u128> = (1..=4_000u64).filter(|k| k % 2 == 1).map(key).collect();
        odd.sort_unstable();
        assert_eq!(left, odd);
    }

    /// A full shard makes room by dropping an expired counter when it sees one (not an
    /// eviction: it no longer mattered), else the live counter expiring soonest (counted).
    #[test]
    fn a_full_shard_drops_an_expired_counter_first_else_the_soonest_expiring() {
        // Two counters per shard; keys 1 to 4 all fall in shard 0.
        let store = MemoryStore::new(MemoryStoreOptions {
            max_keys: 2 * SHARDS,
        });
        let keys = || {
            let mut k: Vec<u128> = store.shards[0].lock().iter().map(|(k, _)| k).collect();
            k.sort_unstable();
            k
        };
        charge_at(&store, 1, 1_000, 0); // expires at 1,000
        charge_at(&store, 2, 2_000, 0); // expires at 2,000
        charge_at(&store, 3, 4_000, 10); // both live: key 1 goes
        assert_eq!(keys(), [2, 3]);
        assert_eq!(store.evictions(), 1);
        charge_at(&store, 4, 4_000, 2_500); // key 2 has expired: it goes, key 3 stays
        assert_eq!(keys(), [3, 4]);
        assert_eq!(store.evictions(), 1);
    }

    proptest! {
        /// A batch of one goes through `apply_one` (one lookup, updated in place); it must
        /// decide and store exactly what the general batch path does, over any sequence of
        /// charges, keys, times and a shard too small for all of them (evictions).
        #[test]
        fn a_single_charge_is_applied_as_a_batch_is(
            ops in proptest::collection::vec(
                (0u8..4, 0usize..3, hits(), kind(), 0u64..400),
                1..60,
            )
        ) {
            let options = MemoryStoreOptions { max_keys: 2 * SHARDS };
            let (fast, general) = (MemoryStore::new(options), MemoryStore::new(options));
            let mut now = 0u64;
            for (key, policy, hits, kind, step) in ops {
                now += step;
                // Every key in shard 0, so the shard's bound of two keys is reached.
                let charge = Charge {
                    key: CounterKey(u128::from(key)),
                    policy: &POLICIES[policy],
                    hits,
                    kind,
                };
                let mut v_fast = [Verdict::default()];
                let committed_fast = fast
                    .apply_locked(&[charge], &mut v_fast, Timestamp::from_nanos(now))
                    .unwrap();
                let mut v_general = [Verdict::default()];
                let committed_general = {
                    let mut guard = general.shards[0].lock();
                    general.apply_in(&mut OneShard(&mut guard), &[charge], &mut v_general, now)
                };
                prop_assert_eq!(v_fast, v_general);
                prop_assert_eq!(committed_fast, committed_general);
                let cells = |s: &MemoryStore| {
                    let mut c: Vec<_> = s.shards[0]
                        .lock()
                        .iter()
                        .map(|(k, c)| (k, c.state, c.expires_at))
                        .collect();
                    c.sort_by_key(|e| e.0);
                    c
                };
                prop_assert_eq!(cells(&fast), cells(&general));
            }
        }
    }
}
