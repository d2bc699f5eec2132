//! The memory store's counter table: 128-bit keys to small `Copy` values, open addressing with
//! linear probing and Robin Hood displacement, entries stored inline.
//!
//! Why not hashbrown, which the store used before: a hashbrown lookup loads a group of control
//! bytes, then the bucket a matching byte points at, elsewhere in memory. Once the store outgrows
//! the caches (a million clients) those are two dependent cache misses per decision, and they
//! were ~40% of its time. Here the first probe reads the entry itself: the key's home slot holds
//! the key and its value side by side, and Robin Hood keeps the few probes a lookup needs on the
//! same or the next cache line. Keys are already keyed hashes, so their low bits are the index.
//!
//! Layout: a slot is the key as two words and the value, 40 bytes for the store's cells (a
//! hashbrown bucket of a `u128` key was 48 bytes plus a control byte). The table doubles at
//! three quarters full, so a successful lookup probes 1.3–2.5 slots on average (load 3/8 to
//! 3/4), 40–100 contiguous bytes.
//!
//! Sizes need not be powers of two: a key's home slot is its low word scaled to the table's
//! length (a multiply, not a mask). So a table told how many entries it will hold at most stops
//! doubling at exactly the slots those need. The store's shards hold at most their share of
//! `max_keys`; with power-of-two sizes a full shard could take up to twice the memory it needs.
//!
//! The key 0 marks an empty slot, so a real key 0 (one in 2^128) lives beside the slots.

/// A key's entry. The key is split into two words so a slot needs 8-byte alignment, not 16.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct Slot<V> {
    lo: u64,
    hi: u64,
    value: V,
}

impl<V> Slot<V> {
    fn is_empty(&self) -> bool {
        self.lo | self.hi == 0
    }

    fn key(&self) -> u128 {
        (u128::from(self.hi) << 64) | u128::from(self.lo)
    }
}

/// A map from `u128` keys (uniformly distributed: keyed hashes) to `V`. See the module docs.
///
/// `repr(C)`, with `front` first: the memory store puts each table behind its shard's lock, whose
/// byte comes just before it, so that the two share a cache line (see `store::memory`'s
/// `ShardLock`, and its test of the layout).
#[derive(Debug, Clone)]
#[repr(C)]
pub struct CounterTable<V> {
    /// One entry kept apart from `slots` (empty: key 0), found before them: the key
    /// [`Self::get_mut_front`] last moved here. A key that every request touches (one
    /// client's, or a domain-wide limit's) then lives beside its shard's lock: a decision
    /// takes one cache line from the other core, not two (the lock's, then the slot's, which
    /// came shared for the read and was taken again for the write). See BENCHMARKS.md,
    /// eleventh pass.
    front: Slot<V>,
    /// Empty, or a power of two long until it reaches `max_slots`, then that (or doublings of
    /// it).
    slots: Box<[Slot<V>]>,
    /// Occupied slots, plus one if `zero` holds a value and one if `front` does.
    len: usize,
    /// The value of key 0, which cannot be stored in a slot.
    zero: Option<V>,
    /// Where doubling stops: room for the most entries the owner will keep, three quarters
    /// full. Past it (more entries than announced) the table doubles again.
    max_slots: usize,
}

impl<V: Copy + Default> Default for CounterTable<V> {
    fn default() -> Self {
        Self::new()
    }
}

/// Slots in a table's first allocation.
const MIN_SLOTS: usize = 8;

impl<V: Copy + Default> CounterTable<V> {
    /// An empty table; it allocates on the first insert.
    pub fn new() -> Self {
        Self::with_max_len(usize::MAX)
    }

    /// An empty table that will hold at most `max_len` entries (its owner evicts beyond that):
    /// it grows no larger than they need.
    pub fn with_max_len(max_len: usize) -> Self {
        Self {
            slots: Box::default(),
            len: 0,
            zero: None,
            max_slots: max_len.saturating_mul(4).div_ceil(3).max(MIN_SLOTS),
            front: Slot::default(),
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The slot a key with low word `lo` is looked for first: `lo` scaled to the length
    /// (uniform, as `lo` is; the store's shards choose by the high word).
    #[inline]
    fn home(&self, lo: u64) -> usize {
        ((u128::from(lo) * self.slots.len() as u128) >> 64) as usize
    }

    /// The slot after `i`, wrapping around.
    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 >= self.slots.len() { 0 } else { i + 1 }
    }

    /// How far the entry in slot `i` sits from its home slot.
    #[inline]
    fn distance(&self, slot: &Slot<V>, i: usize) -> usize {
        let home = self.home(slot.lo);
        if i >= home {
            i - home
        } else {
            i + self.slots.len() - home
        }
    }

    /// The slot holding `key` (not 0).
    #[inline]
    fn find(&self, key: u128) -> Option<usize> {
        let (lo, hi) = (key as u64, (key >> 64) as u64);
        let mut i = self.home(lo);
        // Bounded, though an empty slot or a richer entry always ends the probe first: the
        // table is never more than three quarters full.
        for d in 0..self.slots.len() {
            let slot = self.slots.get(i)?;
            if slot.lo == lo && slot.hi == hi {
                return Some(i);
            }
            // Robin Hood: no entry sits behind one nearer its home than itself, so once the
            // probe meets an entry nearer its home than `key` would be here, `key` is absent.
            if slot.is_empty() || self.distance(slot, i) < d {
                return None;
            }
            i = self.next(i);
        }
        None
    }

    /// Where the front entry lies, and its size: for tests of the memory store's layout.
    #[cfg(test)]
    pub(crate) fn front_span(&self) -> (usize, usize) {
        (&self.front as *const Slot<V> as usize, size_of::<Slot<V>>())
    }

    /// The front entry's key, if it holds one: for tests.
    #[cfg(test)]
    pub(crate) fn front_key(&self) -> Option<u128> {
        self.front_entry().map(|(k, _)| k)
    }

    /// The front entry, if it holds one.
    fn front_entry(&self) -> Option<(u128, &V)> {
        (!self.front.is_empty()).then(|| (self.front.key(), &self.front.value))
    }

    /// Whether `front` holds `key` (not 0).
    #[inline]
    fn in_front(&self, key: u128) -> bool {
        self.front.lo == key as u64 && self.front.hi == (key >> 64) as u64
    }

    /// The value of `key`.
    #[inline]
    pub fn get(&self, key: u128) -> Option<&V> {
        if key == 0 {
            return self.zero.as_ref();
        }
        if self.in_front(key) {
            return Some(&self.front.value);
        }
        let i = self.find(key)?;
        self.slots.get(i).map(|s| &s.value)
    }

    /// The value of `key`, to change in place; a key found in the slots moves to the front if
    /// the front is empty ([`Self::get_mut_front`] with nothing stale).
    #[inline]
    pub fn get_mut(&mut self, key: u128) -> Option<&mut V> {
        self.get_mut_front(key, |_| false)
    }

    /// The value of `key`, to change in place. A key found in the slots moves to the front
    /// when the front is empty, or holds a value `stale` says may go: that entry is then
    /// dropped, so `stale` must only say so of values the owner would drop anyway (the
    /// store's expired counters). A key keeps the front until it goes stale or is removed, so
    /// the front settles on a key in steady use, and moves no more: a shard whose keys are
    /// all new (a flood of clients) never finds one in the slots, and pays nothing.
    #[inline]
    pub fn get_mut_front(&mut self, key: u128, stale: impl FnOnce(&V) -> bool) -> Option<&mut V> {
        if key == 0 {
            return self.zero.as_mut();
        }
        if self.in_front(key) {
            return Some(&mut self.front.value);
        }
        let i = self.find(key)?;
        if self.front.is_empty() || stale(&self.front.value) {
            let entry = *self.slots.get(i)?;
            if !self.front.is_empty() {
                self.len -= 1;
            }
            self.remove_at(i);
            self.front = entry;
            self.len += 1;
            return Some(&mut self.front.value);
        }
        self.slots.get_mut(i).map(|s| &mut s.value)
    }

    /// Sets `key`'s value; returns the value it replaced.
    pub fn insert(&mut self, key: u128, value: V) -> Option<V> {
        if let Some(v) = self.get_mut(key) {
            return Some(std::mem::replace(v, value));
        }
        self.insert_new(key, value);
        None
    }

    /// Adds `key`, which the caller has just looked up and not found: [`Self::insert`] without
    /// a second lookup.
    pub fn insert_new(&mut self, key: u128, value: V) {
        debug_assert!(
            self.get(key).is_none(),
            "insert_new of a key already present"
        );
        if key == 0 {
            self.zero = Some(value);
            self.len += 1;
            return;
        }
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        self.place(Slot {
            lo: key as u64,
            hi: (key >> 64) as u64,
            value,
        });
        self.len += 1;
    }

    /// Puts an entry whose key is not in the table into it, displacing entries nearer their
    /// home than it is (Robin Hood). The table has a free slot.
    fn place(&mut self, mut entry: Slot<V>) {
        let mut i = self.home(entry.lo);
        let mut d = 0;
        for _ in 0..self.slots.len() {
            let here = self.distance_at(i);
            let Some(slot) = self.slots.get_mut(i) else {
                return;
            };
            if slot.is_empty() {
                *slot = entry;
                return;
            }
            if here < d {
                std::mem::swap(slot, &mut entry);
                d = here;
            }
            i = self.next(i);
            d += 1;
        }
    }

    fn distance_at(&self, i: usize) -> usize {
        self.slots.get(i).map_or(0, |s| self.distance(s, i))
    }

    /// Doubles the slots, up to `max_slots` (or makes the first ones), and places every entry
    /// again.
    fn grow(&mut self) {
        let doubled = (self.slots.len() * 2).max(MIN_SLOTS);
        let size = if self.slots.len() < self.max_slots {
            // Never less than the next entry needs to keep the table three quarters full.
            doubled
                .min(self.max_slots)
                .max((self.len + 1).saturating_mul(4).div_ceil(3))
        } else {
            doubled
        };
        let old = std::mem::replace(
            &mut self.slots,
            vec![Slot::default(); size].into_boxed_slice(),
        );
        for slot in old.iter().filter(|s| !s.is_empty()) {
            self.place(*slot);
        }
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: u128) -> Option<V> {
        if key == 0 {
            let old = self.zero.take();
            self.len -= usize::from(old.is_some());
            return old;
        }
        if self.in_front(key) {
            self.len -= 1;
            return Some(std::mem::take(&mut self.front).value);
        }
        let i = self.find(key)?;
        let value = self.slots.get(i).map(|s| s.value);
        self.remove_at(i);
        value
    }

    /// Empties slot `i` (occupied) and shifts the entries after it back by one until one is at
    /// home or a slot is empty, which keeps every probe unbroken without tombstones.
    fn remove_at(&mut self, mut i: usize) {
        for _ in 0..self.slots.len() {
            let next = self.next(i);
            let moved = match self.slots.get(next) {
                Some(s) if !s.is_empty() && self.distance(s, next) > 0 => *s,
                _ => break,
            };
            if let Some(slot) = self.slots.get_mut(i) {
                *slot = moved;
            }
            i = next;
        }
        if let Some(slot) = self.slots.get_mut(i) {
            *slot = Slot::default();
        }
        self.len -= 1;
    }

    /// Keeps only the entries for which `keep` is true, a slice at a time: looks at the slots
    /// from `start` on, at most `max` of them (and first at the front's and key 0's entries,
    /// when `start` is 0); returns where the next slice starts, or `None` when this one reached
    /// the last slot.
    ///
    /// So that a sweep can release its lock between slices: a pass from 0 to `None` over a
    /// table nobody changes in between keeps exactly what `keep` accepts. An entry may be
    /// looked at twice (a removal near the end shifts the first slots' entries, already seen,
    /// back across it). A table changed between slices (inserts push entries forward,
    /// removals pull them back, growth moves them all) may have entries looked at twice or not
    /// at all in that pass: a sweep's next pass sees those.
    pub fn retain_slice(
        &mut self,
        start: usize,
        max: usize,
        mut keep: impl FnMut(u128, &V) -> bool,
    ) -> Option<usize> {
        if start == 0 {
            if let Some(v) = &self.zero
                && !keep(0, v)
            {
                self.zero = None;
                self.len -= 1;
            }
            if !self.front.is_empty() && !keep(self.front.key(), &self.front.value) {
                self.front = Slot::default();
                self.len -= 1;
            }
        }
        let (mut i, mut budget) = (start, max.max(1));
        while budget > 0 {
            let drop = match self.slots.get(i) {
                Some(s) if !s.is_empty() => !keep(s.key(), &s.value),
                Some(_) => false,
                None => return None,
            };
            budget -= 1;
            if drop {
                // Slot `i` now holds the entry that followed it, or nothing: look again.
                self.remove_at(i);
            } else {
                i += 1;
            }
        }
        (i < self.slots.len()).then_some(i)
    }

    /// Every entry: the front's, key 0's, then the slots in order.
    pub fn iter(&self) -> impl Iterator<Item = (u128, &V)> {
        self.front_entry().into_iter().chain(self.entries_from(0))
    }

    /// Every entry: key 0's, then the slots in order from `key`'s home slot on, wrapping
    /// around, then the front's last. Its first few are a sample of the table that starts
    /// somewhere no client can predict, as keys are keyed hashes; the front's key, in steady
    /// use, is among them only in a table of fewer entries than the sample.
    pub fn iter_from(&self, key: u128) -> impl Iterator<Item = (u128, &V)> {
        self.entries_from(self.home(key as u64))
            .chain(self.front_entry())
    }

    fn entries_from(&self, at: usize) -> impl Iterator<Item = (u128, &V)> {
        let (before, after) = self.slots.split_at(at.min(self.slots.len()));
        let slots = after
            .iter()
            .chain(before)
            .filter(|s| !s.is_empty())
            .map(|s| (s.key(), &s.value));
        self.zero.iter().map(|v| (0, v)).chain(slots)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// Entries along every probe sit at non-decreasing distances (less one per step), every
    /// entry is found from its home, and `len` counts them.
    fn check_invariants(t: &CounterTable<u64>) -> Result<(), TestCaseError> {
        let n = t.slots.len();
        let occupied = t.slots.iter().filter(|s| !s.is_empty()).count();
        prop_assert_eq!(
            t.len,
            occupied + usize::from(t.zero.is_some()) + usize::from(!t.front.is_empty())
        );
        if !t.front.is_empty() {
            prop_assert_eq!(
                t.find(t.front.key()),
                None,
                "the front's key is in the slots too"
            );
        }
        prop_assert!(
            t.len == 0 || occupied * 4 <= n * 3,
            "over three quarters full"
        );
        for i in 0..n {
            let s = &t.slots[i];
            if s.is_empty() {
                continue;
            }
            let prev = (i + n - 1) % n;
            let d = t.distance(s, i);
            if d > 0 {
                let p = &t.slots[prev];
                prop_assert!(!p.is_empty(), "slot {i} is displaced past an empty slot");
                prop_assert!(
                    t.distance(p, prev) + 1 >= d,
                    "Robin Hood order broken at {i}"
                );
            }
            prop_assert_eq!(t.find(s.key()), Some(i));
        }
        Ok(())
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u128, u64),
        Remove(u128),
        /// Drops the values divisible by the first, a slice of the second many slots at a time.
        Retain(u64, usize),
        /// `get_mut_front(key, |_| stale)`, then the value set.
        Front(u128, bool, u64),
    }

    /// Keys that crowd few home slots, so probes are long, wrap around the end and cross each
    /// other: low words from a handful of values at the start, middle and end of their range
    /// (a home is the low word scaled to the table), high words varying.
    fn key() -> impl Strategy<Value = u128> {
        let lo = prop_oneof![
            0u64..4,
            (u64::MAX / 2)..(u64::MAX / 2 + 4),
            (u64::MAX - 3)..=u64::MAX
        ];
        prop_oneof![
            1 => Just(0u128),
            10 => (lo, 0u64..4).prop_map(|(lo, hi)| (u128::from(hi) << 64) | u128::from(lo)),
            2 => any::<u128>(),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (key(), any::<u64>()).prop_map(|(k, v)| Op::Insert(k, v)),
            3 => key().prop_map(Op::Remove),
            1 => (2u64..5, 1usize..20).prop_map(|(m, slice)| Op::Retain(m, slice)),
            4 => (key(), any::<bool>(), any::<u64>()).prop_map(|(k, s, v)| Op::Front(k, s, v)),
        ]
    }

    proptest! {
        /// The table behaves as a `HashMap` over any sequence of inserts, removals and
        /// retains, and keeps its Robin Hood order throughout.
        #[test]
        fn behaves_as_a_hash_map(
            ops in proptest::collection::vec(op(), 1..200),
            max_len in prop_oneof![Just(usize::MAX), 1usize..40],
        ) {
            // Sizes that are not powers of two come from a bound on the entries (which the
            // operations here may exceed: the table then doubles on).
            let mut table = CounterTable::with_max_len(max_len);
            let mut model: HashMap<u128, u64> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(table.insert(k, v), model.insert(k, v)),
                    Op::Remove(k) => prop_assert_eq!(table.remove(k), model.remove(&k)),
                    Op::Retain(m, slice) => {
                        let mut looked_at = Vec::new();
                        let mut next = Some(0);
                        while let Some(start) = next {
                            next = table.retain_slice(start, slice, |k, v| {
                                looked_at.push(k);
                                v % m != 0
                            });
                        }
                        // Each entry is judged, however removals shift the rest; twice at
                        // most (one the end's removals pulled back across the end).
                        looked_at.sort_unstable();
                        let mut keys: Vec<u128> = model.keys().copied().collect();
                        keys.sort_unstable();
                        let mut once = looked_at.clone();
                        once.dedup();
                        prop_assert_eq!(&once, &keys);
                        prop_assert!(looked_at.len() <= 2 * keys.len());
                        model.retain(|_, v| *v % m != 0);
                    }
                    Op::Front(k, stale, v) => {
                        let front = table.front_key();
                        let got = table.get_mut_front(k, |_| stale).map(|slot| {
                            let old = *slot;
                            *slot = v;
                            old
                        });
                        // A stale front gives way (and goes) to a key found in the slots.
                        if let Some(f) = front
                            && stale
                            && k != 0
                            && k != f
                            && model.contains_key(&k)
                        {
                            model.remove(&f);
                        }
                        let want = model.get_mut(&k).map(|slot| std::mem::replace(slot, v));
                        prop_assert_eq!(got, want);
                        if want.is_some() && k != 0 && (front.is_none() || stale || front == Some(k)) {
                            prop_assert!(table.in_front(k), "a key found took the front it could");
                        }
                    }
                }
                check_invariants(&table)?;
                prop_assert_eq!(table.len(), model.len());
                for (k, v) in &model {
                    prop_assert_eq!(table.get(*k), Some(v));
                }
                let mut seen: Vec<(u128, u64)> = table.iter().map(|(k, v)| (k, *v)).collect();
                seen.sort_unstable();
                let mut expected: Vec<(u128, u64)> = model.iter().map(|(k, v)| (*k, *v)).collect();
                expected.sort_unstable();
                prop_assert_eq!(&seen, &expected);
                let mut from: Vec<(u128, u64)> =
                    table.iter_from(k_of(&expected)).map(|(k, v)| (k, *v)).collect();
                from.sort_unstable();
                prop_assert_eq!(&from, &expected);
            }
            // Keys never inserted are absent.
            for k in [1u128 << 100, 7, u128::MAX] {
                if !model.contains_key(&k) {
                    prop_assert_eq!(table.get(k), None);
                }
            }
        }
    }

    fn k_of(entries: &[(u128, u64)]) -> u128 {
        entries.first().map_or(0, |e| e.0)
    }

    #[test]
    fn stops_doubling_at_the_slots_its_most_entries_need() {
        let mut t = CounterTable::with_max_len(3_907);
        for k in 1..=3_907u128 {
            t.insert(
                k << 64 | u128::from((k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                0u64,
            );
        }
        // 3,907 entries at three quarters full need 5,210 slots: not the 8,192 of a power of two.
        assert_eq!(t.slots.len(), 5_210);
        assert_eq!(t.len(), 3_907);
    }

    #[test]
    fn grows_at_three_quarters_and_keeps_every_entry() {
        let mut t = CounterTable::new();
        for k in 1..=6u128 {
            t.insert(k, k as u64);
        }
        assert_eq!(t.slots.len(), 8);
        t.insert(7, 7);
        assert_eq!(
            t.slots.len(),
            16,
            "a seventh entry would fill more than three quarters of 8 slots"
        );
        for k in 1..=7u128 {
            assert_eq!(t.get(k), Some(&(k as u64)));
        }
    }

    #[test]
    fn slot_of_a_store_cell_is_forty_bytes() {
        assert_eq!(
            size_of::<Slot<crate::store::memory::Cell>>(),
            40,
            "the memory figures in BENCHMARKS.md assume it"
        );
    }
}
