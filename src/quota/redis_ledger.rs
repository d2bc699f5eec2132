//! The quota ledger in Redis, shared by every replica of one store, so that the division of a
//! limit is global whichever replica each Envoy streams to.
//!
//! One Redis hash per pool, `sluice:quota:{<high 64 bits>}:<low 64 bits>` in hex: the same hash
//! tag as the pool's counter ([`crate::store::redis::key_name`]), so a client's pools share a
//! cluster slot with each other and with its counters. A field per claimant holds its demand,
//! assigned rate and expiry; `ledger.lua` does each operation ([`MemoryLedger`]'s, transcribed:
//! the conformance tests run both) and sets the hash's TTL, so the pools of dead replicas vanish.
//!
//! A call of [`Ledger`] is one round trip: its operations are grouped by pool into script calls
//! of about [`OPS_PER_CALL`] (by slot as well on a cluster, where a script may only touch one
//! slot), sent together on the multiplexed connection; each runs under the store's deadline.
//!
//! Time is the caller's `now` (the limiter's clock), as in memory: expiries are compared, never
//! set by Redis's clock, so a manual clock drives the tests. Replicas whose clocks differ by δ
//! disagree by δ on when a dead replica's claimants stop counting, against [`CLAIM_TTL`] of
//! grace: NTP-synchronised clocks are more than close enough.
//!
//! [`MemoryLedger`]: super::ledger::MemoryLedger

use std::ops::Range;
use std::time::Duration;

use redis::{Script, ScriptInvocation};
use smallvec::SmallVec;

use super::ledger::{CLAIM_TTL, Claim, Claimant, Grant, Ledger, Totals};
use crate::clock::{Timestamp, duration_nanos};
use crate::store::redis::{RedisHandle, slot_of};
use crate::store::{CounterKey, StoreError};

/// Operations per script call, about (a pool is never split, so a call holds at least one
/// whole pool). Redis runs nothing else while a script runs: short scripts keep the counter
/// decisions of every replica, which share this Redis under a tight deadline, from waiting.
pub const OPS_PER_CALL: usize = 256;

/// How long Redis keeps a pool's hash after its last write: a backstop that removes pools
/// nobody claims any more. Twice [`CLAIM_TTL`], because what counts is decided by each entry's
/// own expiry on the replicas' clocks, which need not agree with Redis's to the second.
pub const POOL_TTL: Duration = Duration::from_secs(2 * CLAIM_TTL.as_secs());

/// The script, compiled into the binary so every replica runs the same one.
const LEDGER_LUA: &str = include_str!("ledger.lua");

/// The ledger every replica of one Redis store shares.
#[derive(Debug)]
pub struct RedisLedger {
    handle: RedisHandle,
    script: Script,
}

/// A pool's hash in Redis: the counter's hash tag, so the same slot as the counter.
pub fn pool_key(key: CounterKey) -> String {
    format!(
        "sluice:quota:{{{:016x}}}:{:016x}",
        (key.0 >> 64) as u64,
        key.0 as u64
    )
}

/// A claimant's field in its pools' hashes.
fn field(claimant: Claimant) -> String {
    format!("{:032x}", claimant.0)
}

/// A rate as the script stores it: Rust's shortest form that reads back as the same double
/// (the script never reformats it). A NaN or infinity, which no caller should send, is stored
/// as 0 so that it cannot spread into every claimant's totals.
fn rate_text(x: f64) -> String {
    if x.is_finite() {
        x.to_string()
    } else {
        "0".to_string()
    }
}

/// One operation of a call: the pool, the claimant, and its demand (claim), its assigned rate
/// (grant) or nothing (release).
type Op = (CounterKey, Claimant, f64);

impl RedisLedger {
    /// A ledger over `handle`'s connections.
    pub fn new(handle: RedisHandle) -> Self {
        Self {
            handle,
            script: Script::new(LEDGER_LUA),
        }
    }

    /// The invocation of one call of `mode` ("claim", "grant", "release": see `ledger.lua`).
    fn invocation<'o>(
        &self,
        mode: &str,
        ops: impl Iterator<Item = &'o Op>,
        now: Timestamp,
    ) -> ScriptInvocation<'_> {
        let now = now.as_nanos();
        let expires = now.saturating_add(duration_nanos(CLAIM_TTL));
        let mut inv = self.script.prepare_invoke();
        inv.arg(mode)
            .arg(now / 1_000_000_000)
            .arg(now % 1_000_000_000)
            .arg(expires / 1_000_000_000)
            .arg(expires % 1_000_000_000)
            .arg(POOL_TTL.as_millis() as u64);
        for &(key, claimant, rate) in ops {
            inv.key(pool_key(key))
                .arg(field(claimant))
                .arg(rate_text(rate));
        }
        inv
    }

    /// Runs `ops` in as few script calls as [`Self::calls`] allows, all at once; the replies
    /// in the order of the calls, with each call's positions in `ops`.
    async fn run<T: redis::FromRedisValue>(
        &self,
        mode: &str,
        ops: &[Op],
        now: Timestamp,
    ) -> Result<Vec<(SmallVec<[usize; 8]>, T)>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let (order, calls) = calls(self.handle.is_cluster(), ops.iter().map(|(k, _, _)| *k));
        let calls: Vec<SmallVec<[usize; 8]>> = calls
            .into_iter()
            .map(|r| order.get(r).unwrap_or_default().iter().copied().collect())
            .collect();
        let replies = futures_util::future::join_all(calls.iter().map(|members| {
            let inv = self.invocation(mode, members.iter().filter_map(|&i| ops.get(i)), now);
            async move { self.handle.invoke::<T>(&inv).await }
        }))
        .await;
        calls
            .into_iter()
            .zip(replies)
            .map(|(members, reply)| reply.map(|r| (members, r)))
            .collect()
    }
}

/// The operations on `keys` in the order to send them, and the ranges of that order that go in
/// one script call each: one pool's operations together and in their order, one slot per
/// call on a cluster.
fn calls(cluster: bool, keys: impl Iterator<Item = CounterKey>) -> (Vec<usize>, Vec<Range<usize>>) {
    let mut sorted: Vec<(u16, CounterKey, usize)> = keys
        .enumerate()
        .map(|(i, k)| (if cluster { slot_of(k) } else { 0 }, k, i))
        .collect();
    // The index last keeps each pool's operations in the caller's order.
    sorted.sort_unstable();
    let mut calls = Vec::new();
    let mut start = 0;
    let mut run = 0;
    while run < sorted.len() {
        let Some(&(slot, key, _)) = sorted.get(run) else {
            break;
        };
        let end = sorted
            .get(run..)
            .and_then(|rest| rest.iter().position(|(_, k, _)| *k != key))
            .map_or(sorted.len(), |n| run + n);
        let new_slot = sorted
            .get(start)
            .is_some_and(|(first, _, _)| *first != slot);
        if run > start && (new_slot || end - start > OPS_PER_CALL) {
            calls.push(start..run);
            start = run;
        }
        run = end;
    }
    if start < sorted.len() {
        calls.push(start..sorted.len());
    }
    (sorted.into_iter().map(|(_, _, i)| i).collect(), calls)
}

/// A claim's totals from the script's three strings.
fn totals_of(reply: &[String]) -> Option<Totals> {
    let [claimants, demand, assigned_others] = reply else {
        return None;
    };
    Some(Totals {
        claimants: claimants.parse().ok()?,
        demand: demand.parse().ok()?,
        assigned_others: assigned_others.parse().ok()?,
    })
}

fn bad_reply() -> StoreError {
    StoreError::Unavailable("quota ledger: the script's reply is not totals".into())
}

impl Ledger for RedisLedger {
    async fn claim(
        &self,
        claims: &[Claim],
        now: Timestamp,
        totals: &mut [Totals],
    ) -> Result<(), StoreError> {
        let ops: Vec<Op> = claims
            .iter()
            .map(|c| (c.key, c.claimant, c.demand))
            .collect();
        for (members, reply) in self.run::<Vec<String>>("claim", &ops, now).await? {
            if reply.len() != 3 * members.len() {
                return Err(bad_reply());
            }
            for (&i, t) in members.iter().zip(reply.chunks_exact(3)) {
                let t = totals_of(t).ok_or_else(bad_reply)?;
                if let Some(slot) = totals.get_mut(i) {
                    *slot = t;
                }
            }
        }
        Ok(())
    }

    async fn grant(&self, grants: &[Grant], now: Timestamp) -> Result<(), StoreError> {
        let ops: Vec<Op> = grants
            .iter()
            .map(|g| (g.key, g.claimant, g.assigned))
            .collect();
        self.run::<redis::Value>("grant", &ops, now)
            .await
            .map(|_| ())
    }

    async fn release(&self, released: &[(CounterKey, Claimant)]) -> Result<(), StoreError> {
        let ops: Vec<Op> = released.iter().map(|&(k, c)| (k, c, 0.0)).collect();
        // A release reads and writes no time.
        self.run::<redis::Value>("release", &ops, Timestamp::from_nanos(0))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(group: u64, n: u64) -> CounterKey {
        CounterKey((u128::from(group) << 64) | u128::from(n))
    }

    #[test]
    fn a_pool_shares_the_hash_tag_of_its_counter() {
        let k = key(0x0123_4567_89ab_cdef, 0xfeed);
        assert_eq!(
            pool_key(k),
            "sluice:quota:{0123456789abcdef}:000000000000feed"
        );
        assert_eq!(
            crate::store::redis::key_name(k),
            "sluice:{0123456789abcdef}:000000000000feed"
        );
    }

    #[test]
    fn rates_are_stored_in_a_form_that_reads_back_exactly() {
        for x in [
            0.1,
            1.0 / 3.0,
            1e-300,
            123_456_789.123_456_78,
            f64::MAX,
            0.0,
        ] {
            assert_eq!(rate_text(x).parse::<f64>().unwrap(), x);
        }
        assert_eq!(rate_text(f64::NAN), "0");
        assert_eq!(rate_text(f64::INFINITY), "0");
    }

    /// The pools of each call, in call order.
    fn pools_per_call(cluster: bool, keys: &[CounterKey]) -> Vec<Vec<CounterKey>> {
        let (order, calls) = calls(cluster, keys.iter().copied());
        calls
            .into_iter()
            .map(|r| order[r].iter().map(|&i| keys[i]).collect())
            .collect()
    }

    #[test]
    fn calls_keep_each_pool_whole_and_in_order_and_fill_up_to_the_bound() {
        // 600 operations on one pool, interleaved with 600 pools of one operation each.
        let big = key(1, 1);
        let keys: Vec<CounterKey> = (0..600).flat_map(|i| [big, key(2 + i, 0)]).collect();
        let (order, calls) = calls(false, keys.iter().copied());
        let calls: Vec<Vec<usize>> = calls.into_iter().map(|r| order[r].to_vec()).collect();
        assert_eq!(calls.iter().map(Vec::len).sum::<usize>(), 1200);
        let with_big: Vec<&Vec<usize>> = calls
            .iter()
            .filter(|c| c.iter().any(|&i| keys[i] == big))
            .collect();
        assert_eq!(with_big.len(), 1, "the big pool is not split");
        let big_ops: Vec<usize> = with_big[0]
            .iter()
            .copied()
            .filter(|&i| keys[i] == big)
            .collect();
        assert!(big_ops.windows(2).all(|w| w[0] < w[1]), "in order");
        assert_eq!(big_ops.len(), 600);
        for c in &calls {
            let others = c.iter().filter(|&&i| keys[i] != big).count();
            assert!(others <= OPS_PER_CALL, "{}", c.len());
        }
        // 600 one-operation pools fill three calls of OPS_PER_CALL, not 600.
        assert!(calls.len() <= 4, "{}", calls.len());
    }

    #[test]
    fn on_a_cluster_each_call_is_one_slot() {
        let keys: Vec<CounterKey> = (0..50).map(|i| key(i % 7, i)).collect();
        let calls = pools_per_call(true, &keys);
        assert_eq!(calls.len(), 7);
        for c in calls {
            assert!(c.iter().all(|k| slot_of(*k) == slot_of(c[0])));
        }
    }

    #[test]
    fn totals_are_read_from_the_scripts_strings() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            totals_of(&s(&["3", "0.30000000000000004", "1.5"])),
            Some(Totals {
                claimants: 3,
                demand: 0.1 + 0.2,
                assigned_others: 1.5
            })
        );
        assert_eq!(totals_of(&s(&["3", "x", "1"])), None);
        assert_eq!(totals_of(&s(&["3", "1"])), None);
    }
}
