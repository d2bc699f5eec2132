//! Where counters live. The [`Store`] trait is deliberately narrow: apply a batch of charges
//! atomically. The limiter builds the batch (one [`Charge`] per distinct counter a request
//! touches) and the store either commits all of it or none of it: when any blocking limit is
//! over, nothing is charged, because Envoy rejects the whole request and charging the other
//! limits would punish the client twice.
//!
//! The counting itself is [`crate::algorithms::evaluate`], shared by every backend
//! (the Redis backend runs a Lua transcription of it, tested for equivalence).
//!
//! Backends: [`MemoryStore`] (one process) and [`RedisStore`] (shared by replicas). The binary
//! picks one at start-up through [`AnyStore`], so the limiter stays generic and monomorphic.

pub mod memory;
pub mod redis;
pub mod redis_sync;
pub mod table;

use std::future::Future;

use crate::algorithms::{Hits, Policy};
use crate::clock::Timestamp;

pub use self::redis::{RedisNodes, RedisOptions, RedisStore, TimeSource};
pub use memory::{MemoryStore, MemoryStoreOptions};

/// Identifies one counter: a keyed 128-bit hash of the limit's identity and the client's
/// identifying descriptor values. 128 bits make an accidental collision negligible even with
/// billions of keys, and the per-process key stops clients from crafting one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey(pub u128);

/// Hashes map keys that are already keyed hashes (a [`CounterKey`], a client's statistics id):
/// folding the two halves is enough, and saves a SipHash per lookup on the request path.
#[derive(Default)]
pub struct PreHashed(u64);

impl std::hash::Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than a u128 is hashed; fold it in.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = (v >> 64) as u64 ^ v as u64;
    }
}

/// One counter a request touches.
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    /// The counter.
    pub key: CounterKey,
    /// How it counts.
    pub policy: &'a Policy,
    /// What the request adds or gives back.
    pub hits: Hits,
    /// What a denial here means, and when the charge is kept.
    pub kind: ChargeKind,
}

/// How a charge takes part in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChargeKind {
    /// Counted whatever the decision; never blocks. Automatic-block thresholds use this: they
    /// watch all traffic, admitted or not.
    Observe,
    /// Evaluated and reported, charged only if the request is admitted, never blocks: shadow
    /// limits and a disabled server.
    Shadow,
    /// A real limit: its denial rejects the request and nothing is charged.
    Enforce,
}

/// What a store says about one charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verdict {
    /// Whether this limit admitted the hits.
    pub allowed: bool,
    /// Single hits still admissible (after this request's hits if the batch committed).
    pub remaining: u64,
    /// Nanoseconds until reset; for a denied charge, until the same hits would be admitted.
    pub reset_after: u64,
}

/// One counter of envoyproxy/ratelimit's arithmetic, for reference rules: a fixed window
/// aligned to the epoch whose count grows by every hit, admitted or not (the reference's
/// `INCRBY` and `EXPIRE`). The limiter decides from the count; the store only counts.
#[derive(Debug, Clone, Copy)]
pub struct Tally<'a> {
    /// The counter (its window is part of its state, not of the key).
    pub key: CounterKey,
    /// The reference's own key name, window start included, when the Redis store is to name
    /// keys its way (`SLUICE_REDIS_KEYS=reference`); empty otherwise.
    pub name: &'a str,
    /// Window length in seconds.
    pub window_secs: u64,
    /// Hits to add; `None` reads the count without writing.
    pub hits: Option<u64>,
    /// Redis keeps the key for the window plus a random 0 to this many seconds (the
    /// reference's `EXPIRATION_JITTER_MAX_SECONDS`, which spreads expiries out).
    pub ttl_jitter_secs: u64,
}

/// A store failed; the limiter turns this into the configured failure behaviour.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The batch was larger than a store accepts in one atomic step.
    #[error("batch of {0} charges exceeds the store's limit")]
    BatchTooLarge(usize),
    /// The backend did not answer within its deadline.
    #[error("counter store timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The backend is unreachable or answered with an error.
    #[error("counter store unavailable: {0}")]
    Unavailable(String),
}

/// What to answer when the store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Let the request through (and count it): availability over strictness.
    #[default]
    Allow,
    /// Reject the request with OVER_LIMIT.
    Deny,
}

/// A counter backend. Implementations must make [`Store::apply`] atomic with respect to other
/// calls touching the same keys, and must not block the async runtime for long.
pub trait Store: Send + Sync + 'static {
    /// Evaluates every charge at `now`. If every `Enforce` charge is allowed, commits every
    /// allowed charge; otherwise commits only the allowed `Observe` charges. Writes one verdict
    /// per charge into `verdicts` (same length as `charges`) and returns whether the request was
    /// admitted. Keys in one batch must be distinct.
    fn apply(
        &self,
        charges: &[Charge<'_>],
        verdicts: &mut [Verdict],
        now: Timestamp,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Counts each tally in order at `now` and writes each count after it into `counts` (same
    /// length). Each tally is atomic on its own; a batch is not (the reference pipelines them).
    /// A key may appear twice: the second sees the first's hits.
    fn tally(
        &self,
        tallies: &[Tally<'_>],
        counts: &mut [u64],
        now: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Forgets the given counters (an operator resetting a client).
    fn forget(&self, keys: &[CounterKey]) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Counters currently tracked (for stats; may be approximate).
    fn tracked_keys(&self) -> usize;

    /// Drops counters whose state no longer matters at `now`; returns how many. Called from a
    /// background task, never on the request path. Stores that expire keys themselves return 0.
    fn sweep_expired_at(&self, now: Timestamp) -> usize;

    /// Live counters dropped to make room because the store was full (`max_keys`), since start:
    /// clients that started afresh. Stores that never evict report 0.
    fn evictions(&self) -> u64 {
        0
    }

    /// Charges answered without asking the backend because the key was known to be over its
    /// limit (the Redis store's over-limit cache), since start. Others report 0.
    fn cache_hits(&self) -> u64 {
        0
    }

    /// Refusals not cached because that cache was full, since start. Others report 0.
    fn cache_full(&self) -> u64 {
        0
    }

    /// How long one decision may wait for this store, all its calls together; `None` for a
    /// store that never waits (memory). The limiter answers a decision that runs out by its
    /// failure policy: a deadline per call would let a decision of two round trips take two.
    fn deadline(&self) -> Option<std::time::Duration> {
        None
    }

    /// The Redis store, when counters live in Redis: what else replicas share (blocks, the
    /// quota ledger) goes through the same connections.
    fn redis(&self) -> Option<&RedisStore> {
        None
    }
}

/// Which counter store to run, from the config's `store:` section or `--store`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Backend {
    /// In-process counters ([`MemoryStore`]).
    #[default]
    Memory,
    /// Counters in Redis, shared by replicas ([`RedisStore`]).
    Redis(RedisOptions),
}

impl Backend {
    /// A description for logs, with passwords in URLs replaced by `***`.
    pub fn describe(&self) -> String {
        match self {
            Backend::Memory => "memory".to_string(),
            Backend::Redis(o) => {
                let nodes = match &o.nodes {
                    RedisNodes::Single(u) => self::redis::redact(u),
                    RedisNodes::Cluster(us) => format!(
                        "cluster [{}]",
                        us.iter()
                            .map(|u| self::redis::redact(u))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                format!(
                    "redis {nodes} (timeout {:?}, clock {:?})",
                    o.timeout, o.time
                )
            }
        }
    }

    /// Applies a `--store` value: `memory`, a `redis://` or `rediss://` URL, or several URLs
    /// separated by commas (Redis Cluster seed nodes). Other Redis settings (timeout, time source,
    /// CA file) are kept from `self` when it already is Redis.
    pub fn overridden_by(&self, spec: &str) -> Result<Backend, String> {
        let spec = spec.trim();
        if spec == "memory" {
            return Ok(Backend::Memory);
        }
        let mut urls: Vec<String> = spec
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if urls.is_empty() {
            return Err("expected `memory` or a redis:// URL".to_string());
        }
        if let Some(bad) = urls
            .iter()
            .find(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
        {
            return Err(format!(
                "{bad:?}: expected `memory`, a redis:// or rediss:// URL, or several URLs separated by commas (a cluster)"
            ));
        }
        let nodes = if urls.len() == 1 {
            RedisNodes::Single(urls.swap_remove(0))
        } else {
            RedisNodes::Cluster(urls)
        };
        Ok(Backend::Redis(match self {
            Backend::Redis(o) => RedisOptions { nodes, ..o.clone() },
            Backend::Memory => RedisOptions::new(nodes),
        }))
    }
}

/// The store chosen at start-up: one concrete type for the limiter whichever backend runs.
#[derive(Debug)]
pub enum AnyStore {
    /// In-process counters.
    Memory(MemoryStore),
    /// Counters in Redis.
    Redis(RedisStore),
}

impl AnyStore {
    /// Opens the store `backend` names (Redis connects lazily, so this never waits on it).
    pub fn open(backend: &Backend, memory: MemoryStoreOptions) -> Result<Self, StoreError> {
        Ok(match backend {
            Backend::Memory => AnyStore::Memory(MemoryStore::new(memory)),
            Backend::Redis(options) => AnyStore::Redis(RedisStore::connect(options)?),
        })
    }

    /// The Redis store, when that is the backend.
    pub fn redis(&self) -> Option<&RedisStore> {
        match self {
            AnyStore::Redis(r) => Some(r),
            AnyStore::Memory(_) => None,
        }
    }
}

impl Store for AnyStore {
    async fn apply(
        &self,
        charges: &[Charge<'_>],
        verdicts: &mut [Verdict],
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        match self {
            AnyStore::Memory(s) => s.apply(charges, verdicts, now).await,
            AnyStore::Redis(s) => s.apply(charges, verdicts, now).await,
        }
    }

    async fn tally(
        &self,
        tallies: &[Tally<'_>],
        counts: &mut [u64],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(s) => s.tally(tallies, counts, now).await,
            AnyStore::Redis(s) => s.tally(tallies, counts, now).await,
        }
    }

    async fn forget(&self, keys: &[CounterKey]) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(s) => s.forget(keys).await,
            AnyStore::Redis(s) => s.forget(keys).await,
        }
    }

    fn tracked_keys(&self) -> usize {
        match self {
            AnyStore::Memory(s) => s.tracked_keys(),
            AnyStore::Redis(s) => s.tracked_keys(),
        }
    }

    fn sweep_expired_at(&self, now: Timestamp) -> usize {
        match self {
            AnyStore::Memory(s) => s.sweep_expired_at(now),
            AnyStore::Redis(s) => s.sweep_expired_at(now),
        }
    }

    fn evictions(&self) -> u64 {
        match self {
            AnyStore::Memory(s) => s.evictions(),
            AnyStore::Redis(s) => s.evictions(),
        }
    }

    fn cache_hits(&self) -> u64 {
        match self {
            AnyStore::Memory(s) => s.cache_hits(),
            AnyStore::Redis(s) => s.cache_hits(),
        }
    }

    fn cache_full(&self) -> u64 {
        match self {
            AnyStore::Memory(s) => s.cache_full(),
            AnyStore::Redis(s) => s.cache_full(),
        }
    }

    fn deadline(&self) -> Option<std::time::Duration> {
        match self {
            AnyStore::Memory(s) => s.deadline(),
            AnyStore::Redis(s) => s.deadline(),
        }
    }

    fn redis(&self) -> Option<&RedisStore> {
        AnyStore::redis(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_flag_picks_memory_one_server_or_a_cluster_and_keeps_redis_settings() {
        assert_eq!(Backend::Memory.overridden_by("memory"), Ok(Backend::Memory));
        let one = Backend::Memory
            .overridden_by("redis://127.0.0.1:6379")
            .unwrap();
        assert_eq!(
            one,
            Backend::Redis(RedisOptions::new(RedisNodes::Single(
                "redis://127.0.0.1:6379".into()
            )))
        );
        let tuned = Backend::Redis(RedisOptions {
            timeout: std::time::Duration::from_millis(7),
            ..RedisOptions::new(RedisNodes::Single("redis://a:1".into()))
        });
        let Ok(Backend::Redis(o)) = tuned.overridden_by("rediss://a:1, rediss://b:2") else {
            panic!("expected redis")
        };
        assert_eq!(o.timeout, std::time::Duration::from_millis(7));
        assert_eq!(
            o.nodes,
            RedisNodes::Cluster(vec!["rediss://a:1".into(), "rediss://b:2".into()])
        );
        assert!(Backend::Memory.overridden_by("mysql://x").is_err());
    }

    #[test]
    fn logged_urls_hide_passwords() {
        let b = Backend::Memory
            .overridden_by("redis://:hunter2@10.0.0.1:6379/1")
            .unwrap();
        let text = b.describe();
        assert!(text.contains("redis://***@10.0.0.1:6379/1"), "{text}");
        assert!(!text.contains("hunter2"));
        assert!(!format!("{b:?}").contains("hunter2"), "Debug hides it too");
    }
}
