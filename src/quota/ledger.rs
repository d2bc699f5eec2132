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

type Pools = HashMap<CounterKey, HashMap<Claimant, Entry>>;

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
            pool.retain(|_, e| e.expires > now);
            let e = pool.entry(c.claimant).or_default();
            e.demand = c.demand;
            e.expires = expires;
            *t = Totals::default();
            for (who, e) in pool.iter() {
                t.claimants += 1;
                t.demand += e.demand;
                if *who != c.claimant {
                    t.assigned_others += e.assigned;
                }
            }
        }
    }

    fn grant_now(&self, grants: &[Grant], now: Timestamp) {
        let expires = now.as_nanos().saturating_add(duration_nanos(CLAIM_TTL));
        for g in grants {
            let mut shard = self.shard(g.key).lock();
            let e = shard
                .entry(g.key)
                .or_default()
                .entry(g.claimant)
                .or_default();
            e.assigned = g.assigned;
            e.expires = expires;
        }
    }

    fn release_now(&self, released: &[(CounterKey, Claimant)]) {
        for (key, who) in released {
            let mut shard = self.shard(*key).lock();
            if let Some(pool) = shard.get_mut(key) {
                pool.remove(who);
                if pool.is_empty() {
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
