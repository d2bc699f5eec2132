//! Where claimants' demand and assigned rates meet: per pool (a counter key), every claimant's
//! latest demand and grant, so that each can compute its share from the totals of all
//! ([`super::share`]). In memory for one replica; in Redis ([`super::redis_ledger`]) when
//! replicas share counters, so that the division is global whichever replica each Envoy streams
//! to.
//!
//! An entry lives [`CLAIM_TTL`] past its last claim or grant, so a replica that dies without
//! releasing its claimants stops counting after three missed reports; a stream that ends
//! releases its claimants at once.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use parking_lot::Mutex;

use crate::clock::{Timestamp, duration_nanos};
use crate::store::{CounterKey, StoreError};

/// How long a claim or grant counts without being renewed (three of Envoy's 5 s reports).
pub const CLAIM_TTL: Duration = Duration::from_secs(15);

/// One bucket of one stream: a claimant in each pool its bucket draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Claimant(pub u128);

/// A claimant's demand in one pool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Claim {
    /// The pool.
    pub key: CounterKey,
    /// Who claims.
    pub claimant: Claimant,
    /// Requests per second.
    pub demand: f64,
}

/// A pool as one claimant sees it, after its claim.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Totals {
    /// Live claimants, the one asking included.
    pub claimants: u32,
    /// Their demand, requests per second.
    pub demand: f64,
    /// Rate granted to the others, tokens per second.
    pub assigned_others: f64,
}

/// A claimant's assigned rate in one pool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grant {
    /// The pool.
    pub key: CounterKey,
    /// Who was granted.
    pub claimant: Claimant,
    /// Tokens per second.
    pub assigned: f64,
}

/// Claimants' demand and grants per pool. Calls for one claimant come from one stream task, in
/// order; calls for different claimants of a pool may interleave (a grant computed from totals
/// that another claimant changed meanwhile is corrected at the next report).
pub trait Ledger: Send + Sync + 'static {
    /// Records each claim at `now` (a claimant's earlier grant in that pool stays) and writes,
    /// per claim, the pool's totals over live entries into `totals` (same length).
    fn claim(
        &self,
        claims: &[Claim],
        now: Timestamp,
        totals: &mut [Totals],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records each grant at `now`.
    fn grant(
        &self,
        grants: &[Grant],
        now: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Forgets claimants (their stream ended, or their bucket was abandoned).
    fn release(
        &self,
        released: &[(CounterKey, Claimant)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    demand: f64,
    assigned: f64,
    expires: u64,
}

/// One pool's claimants and their sums. Sums move with each change, so a claim costs the same
/// whatever the pool's size (a domain-wide limit's pool holds every bucket of every Envoy).
/// Lapsed entries are dropped, and the sums recomputed, when the earliest expiry may have
/// passed: about once per report interval in a busy pool, and never later than a claim that
/// would count a lapsed entry.
#[derive(Debug)]
struct PoolState {
    entries: HashMap<Claimant, Entry>,
    demand: f64,
    assigned: f64,
    /// No entry expires before this (a lower bound: renewals move expiries later unseen).
    earliest: u64,
}

impl Default for PoolState {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            demand: 0.0,
            assigned: 0.0,
            earliest: u64::MAX,
        }
    }
}

impl PoolState {
    fn sweep(&mut self, now: u64) {
        if now < self.earliest {
            return;
        }
        self.entries.retain(|_, e| e.expires > now);
        self.demand = self.entries.values().map(|e| e.demand).sum();
        self.assigned = self.entries.values().map(|e| e.assigned).sum();
        self.earliest = self
            .entries
            .values()
            .map(|e| e.expires)
            .min()
            .unwrap_or(u64::MAX);
    }
}

type Pools = HashMap<CounterKey, PoolState>;

/// The ledger of one replica. Sharded by pool, so streams reporting at once rarely wait on
/// each other.
#[derive(Debug)]
pub struct MemoryLedger {
    shards: Box<[Mutex<Pools>]>,
}

impl Default for MemoryLedger {
    fn default() -> Self {
        Self {
            shards: (0..16).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl MemoryLedger {
    fn shard(&self, key: CounterKey) -> &Mutex<Pools> {
        let i = (key.0 >> 64) as usize % self.shards.len();
        &self.shards[i]
    }

    /// Pools with at least one claimant.
    pub fn pools(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    fn claim_now(&self, claims: &[Claim], now: Timestamp, totals: &mut [Totals]) {
        let now = now.as_nanos();
        let expires = now.saturating_add(duration_nanos(CLAIM_TTL));
        for (c, t) in claims.iter().zip(totals.iter_mut()) {
            let mut shard = self.shard(c.key).lock();
            let pool = shard.entry(c.key).or_default();
            pool.sweep(now);
            pool.earliest = pool.earliest.min(expires);
            let e = pool.entries.entry(c.claimant).or_default();
            pool.demand += c.demand - e.demand;
            e.demand = c.demand;
            e.expires = expires;
            let own = e.assigned;
            *t = Totals {
                claimants: u32::try_from(pool.entries.len()).unwrap_or(u32::MAX),
                demand: pool.demand.max(0.0),
                assigned_others: (pool.assigned - own).max(0.0),
            };
        }
    }

    fn grant_now(&self, grants: &[Grant], now: Timestamp) {
        let now = now.as_nanos();
        let expires = now.saturating_add(duration_nanos(CLAIM_TTL));
        for g in grants {
            let mut shard = self.shard(g.key).lock();
            let pool = shard.entry(g.key).or_default();
            pool.sweep(now);
            pool.earliest = pool.earliest.min(expires);
            let e = pool.entries.entry(g.claimant).or_default();
            pool.assigned += g.assigned - e.assigned;
            e.assigned = g.assigned;
            e.expires = expires;
        }
    }

    fn release_now(&self, released: &[(CounterKey, Claimant)]) {
        for (key, who) in released {
            let mut shard = self.shard(*key).lock();
            if let Some(pool) = shard.get_mut(key) {
                if let Some(e) = pool.entries.remove(who) {
                    pool.demand -= e.demand;
                    pool.assigned -= e.assigned;
                }
                if pool.entries.is_empty() {
                    shard.remove(key);
                }
            }
        }
    }
}

impl Ledger for MemoryLedger {
    async fn claim(
        &self,
        claims: &[Claim],
        now: Timestamp,
        totals: &mut [Totals],
    ) -> Result<(), StoreError> {
        self.claim_now(claims, now, totals);
        Ok(())
    }

    async fn grant(&self, grants: &[Grant], now: Timestamp) -> Result<(), StoreError> {
        self.grant_now(grants, now);
        Ok(())
    }

    async fn release(&self, released: &[(CounterKey, Claimant)]) -> Result<(), StoreError> {
        self.release_now(released);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: CounterKey = CounterKey(7);

    fn claim(who: u128, demand: f64) -> Claim {
        Claim {
            key: K,
            claimant: Claimant(who),
            demand,
        }
    }

    #[tokio::test]
    async fn totals_count_every_live_claimant_and_the_others_grants() {
        let l = MemoryLedger::default();
        let t0 = Timestamp::from_secs(100);
        let mut t = [Totals::default()];
        l.claim(&[claim(1, 4.0)], t0, &mut t).await.unwrap();
        assert_eq!(t[0].claimants, 1);
        l.grant(
            &[Grant {
                key: K,
                claimant: Claimant(1),
                assigned: 10.0,
            }],
            t0,
        )
        .await
        .unwrap();
        l.claim(&[claim(2, 6.0)], t0, &mut t).await.unwrap();
        assert_eq!(
            t[0],
            Totals {
                claimants: 2,
                demand: 10.0,
                assigned_others: 10.0
            }
        );
        // Claimant 1's entry lapses; 2 renews its own.
        let later = t0.saturating_add(CLAIM_TTL);
        l.claim(&[claim(2, 6.0)], later, &mut t).await.unwrap();
        assert_eq!(
            t[0],
            Totals {
                claimants: 1,
                demand: 6.0,
                assigned_others: 0.0
            }
        );
        l.release(&[(K, Claimant(2))]).await.unwrap();
        assert_eq!(l.pools(), 0);
    }
}
