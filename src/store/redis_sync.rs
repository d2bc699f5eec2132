//! Blocks and runtime allowlist entries shared through Redis, so that a `BlockIp` sent to one
//! replica is enforced by all of them within a second.
//!
//! Each replica runs [`run`]: it pushes its local changes ([`AccessList::take_changes`]) as
//! per-net hash entries plus a version bump (`redis/access.lua`, atomic), and polls the version
//! every [`DEFAULT_POLL`]; when another replica changed something, it loads the shared entries
//! and replaces its local state ([`AccessList::replace_state`]), which also rewrites its state
//! file. The request path never waits on any of this: it reads the access list's snapshot.
//!
//! Start-up: the first replica to find no shared state seeds it from its state file; later
//! replicas take the shared state (Redis wins over an older local file). If Redis loses the data
//! (restarted without persistence), the next replica to poll seeds it again from its local
//! state. While Redis is unreachable, each replica keeps enforcing what it has and queues its
//! changes.
//!
//! Nothing is lost silently: a shared entry that cannot be decoded (or breaks a bound) is
//! skipped while the others are applied, a local change that cannot be encoded stays local, and
//! a round that fails is retried; each is counted ([`crate::access::SyncErrors`], on
//! `/metrics`) and logged at most once per [`LOG_EVERY`] per kind, so a flood of bad entries
//! makes one line, with their number.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use redis::Script;
use serde::de::DeserializeOwned;

use super::StoreError;
use super::redis::RedisHandle;
use crate::access::{AccessChange, AccessList, AllowEntry, Block};
use crate::clock::Clock;

/// How often a replica looks for changes made elsewhere: with the push on change, a block is
/// enforced everywhere within about this plus one round trip.
pub const DEFAULT_POLL: Duration = Duration::from_millis(250);

/// The shared state's keys: one hash tag, so one cluster slot.
const KEYS: [&str; 3] = [
    "sluice:{access}:version",
    "sluice:{access}:blocks",
    "sluice:{access}:allowed",
];

const ACCESS_LUA: &str = include_str!("redis/access.lua");

/// Failures of one kind are logged at most this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Replicates `access` through Redis until the task is dropped.
pub async fn run(
    handle: RedisHandle,
    access: Arc<AccessList>,
    clock: Arc<dyn Clock>,
    poll: Duration,
) {
    access.replicate();
    let mut sync = Sync {
        handle,
        access,
        clock,
        script: Script::new(ACCESS_LUA),
        version: None,
        round_log: Throttle::default(),
        decode_log: Throttle::default(),
        encode_log: Throttle::default(),
    };
    loop {
        if let Err(e) = sync.round().await {
            sync.access
                .sync_errors()
                .redis
                .fetch_add(1, Ordering::Relaxed);
            if let Some(rounds) = sync.round_log.due(1) {
                tracing::warn!(error = %e, rounds, "cannot replicate blocks and allowlist through Redis; enforcing the local copy");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            () = sync.access.changes_waiting() => {}
        }
    }
}

struct Sync {
    handle: RedisHandle,
    access: Arc<AccessList>,
    clock: Arc<dyn Clock>,
    script: Script,
    /// The shared version this replica has; `None` until seeded or loaded.
    version: Option<i64>,
    round_log: Throttle,
    decode_log: Throttle,
    encode_log: Throttle,
}

/// Logs a kind of failure at most once per [`LOG_EVERY`], with how many happened since the
/// last line; the counters on `/metrics` have every one.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    unlogged: u64,
}

impl Throttle {
    /// Records `n` failures; when a line is due, how many to report in it.
    fn due(&mut self, n: u64) -> Option<u64> {
        self.unlogged += n;
        if self.last.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// One write for the script: (op, net, JSON).
type Op = (&'static str, String, String);

/// The script's write for `change`; an error names the entry that cannot be encoded.
fn op_of(change: &AccessChange) -> Result<Op, (IpNet, serde_json::Error)> {
    Ok(match change {
        AccessChange::Block(b) => (
            "B",
            b.net.to_string(),
            serde_json::to_string(b).map_err(|e| (b.net, e))?,
        ),
        AccessChange::Unblock(net) => ("b", net.to_string(), String::new()),
        AccessChange::Allow(a) => (
            "A",
            a.net.to_string(),
            serde_json::to_string(a).map_err(|e| (a.net, e))?,
        ),
        AccessChange::Disallow(net) => ("a", net.to_string(), String::new()),
    })
}

/// Shared entries that could not be used: how many, and why the first could not.
#[derive(Debug, Default)]
struct Rejected {
    count: u64,
    first: Option<String>,
}

/// The entries of `jsons` that decode and pass `check`; the rest are added to `rejected`.
fn decode_all<T: DeserializeOwned>(
    jsons: &[String],
    check: impl Fn(&T) -> Result<(), String>,
    rejected: &mut Rejected,
) -> Vec<T> {
    jsons
        .iter()
        .filter_map(|json| {
            let entry = serde_json::from_str::<T>(json)
                .map_err(|e| e.to_string())
                .and_then(|entry| check(&entry).map(|()| entry));
            match entry {
                Ok(entry) => Some(entry),
                Err(why) => {
                    rejected.count += 1;
                    rejected.first.get_or_insert(why);
                    None
                }
            }
        })
        .collect()
}

impl Sync {
    /// The script's writes for `changes`; one that cannot be encoded is counted, logged and
    /// left out (the change stays in force here, unshared).
    fn ops<'c>(&mut self, changes: impl IntoIterator<Item = &'c AccessChange>) -> Vec<Op> {
        let mut ops = Vec::new();
        for change in changes {
            match op_of(change) {
                Ok(op) => ops.push(op),
                Err((net, e)) => {
                    self.access
                        .sync_errors()
                        .encode
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(entries) = self.encode_log.due(1) {
                        tracing::error!(%net, error = %e, entries, "cannot encode a block or allowlist entry for Redis; it is enforced here but not shared");
                    }
                }
            }
        }
        ops
    }

    /// Seeds if needed, pushes local changes, then loads what others changed.
    async fn round(&mut self) -> Result<(), StoreError> {
        if self.version.is_none() {
            self.seed().await?;
        }
        let changes = self.access.take_changes();
        if !changes.is_empty() {
            let ops = self.ops(&changes);
            match self.write("push", &ops).await {
                Ok((v, _)) => {
                    // Nobody else wrote in between: we already have this version.
                    if self.version.is_some_and(|mine| v == mine + 1) {
                        self.version = Some(v);
                    }
                }
                Err(e) => {
                    self.access.restore_changes(changes);
                    return Err(e);
                }
            }
        }
        self.poll().await
    }

    /// Shares this replica's state if nothing is shared yet; otherwise the poll loads it.
    async fn seed(&mut self) -> Result<(), StoreError> {
        // Changes so far are part of the exported state.
        let _ = self.access.take_changes();
        let (blocks, allowed) = self.access.export_state();
        let changes: Vec<AccessChange> = blocks
            .into_iter()
            .map(AccessChange::Block)
            .chain(allowed.into_iter().map(AccessChange::Allow))
            .collect();
        let ops = self.ops(&changes);
        let (v, applied) = self.write("seed", &ops).await?;
        if applied == 1 {
            tracing::info!(
                entries = ops.len(),
                "shared blocks and allowlist seeded from this replica"
            );
            self.version = Some(v);
        } else {
            // Load the shared state on the next poll.
            self.version = Some(-1);
        }
        Ok(())
    }

    async fn write(&self, mode: &str, ops: &[Op]) -> Result<(i64, i64), StoreError> {
        let mut inv = self.script.prepare_invoke();
        for k in KEYS {
            inv.key(k);
        }
        inv.arg(mode);
        for (op, net, json) in ops {
            inv.arg(*op).arg(net).arg(json);
        }
        self.handle.invoke(&inv).await
    }

    async fn poll(&mut self) -> Result<(), StoreError> {
        let Some(known) = self.version else {
            return Ok(());
        };
        let mut inv = self.script.prepare_invoke();
        for k in KEYS {
            inv.key(k);
        }
        inv.arg("poll").arg(known);
        let (v, changed, blocks, allowed): (i64, i64, Vec<String>, Vec<String>) =
            self.handle.invoke(&inv).await?;
        if v == 0 && known != 0 {
            // The shared state is gone (Redis restarted empty): share ours again.
            tracing::warn!("shared blocks and allowlist missing in Redis; seeding them again");
            self.version = None;
            return Ok(());
        }
        if changed == 0 {
            return Ok(());
        }
        let now = self.clock.now().as_nanos();
        let mut expired = Vec::new();
        let mut rejected = Rejected::default();
        let blocks: Vec<Block> = decode_all(&blocks, Block::check, &mut rejected)
            .into_iter()
            .filter(|b| {
                let live = b.expires_at.is_none_or(|e| e > now);
                if !live {
                    expired.push(AccessChange::Unblock(b.net));
                }
                live
            })
            .collect();
        let allowed: Vec<AllowEntry> = decode_all(&allowed, AllowEntry::check, &mut rejected);
        if rejected.count > 0 {
            self.access
                .sync_errors()
                .decode
                .fetch_add(rejected.count, Ordering::Relaxed);
            if let Some(entries) = self.decode_log.due(rejected.count) {
                tracing::warn!(
                    entries,
                    first = rejected.first.as_deref().unwrap_or_default(),
                    "shared blocks or allowlist entries in Redis cannot be used; skipped them and applied the others"
                );
            }
        }
        self.access.replace_state(blocks, allowed);
        self.version = Some(v);
        if !expired.is_empty() {
            // Keep the shared hash small; every replica ignores expired blocks anyway.
            let ops = self.ops(&expired);
            self.write("push", &ops).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_that_cannot_be_used_are_counted_and_the_others_kept() {
        let good = r#"{"net":"192.0.2.7/32","permanent":true,"created_at":1,"expires_at":null,"reason":"r","created_by":"a"}"#;
        let mapped = good.replace("192.0.2.7/32", "::ffff:192.0.2.8");
        let long = good.replace(
            r#""reason":"r""#,
            &format!(r#""reason":"{}""#, "r".repeat(1025)),
        );
        let jsons = [
            good.to_string(),
            "{not json".to_string(),
            mapped,
            long,
            r#"{"net":"nope"}"#.to_string(),
        ];
        let mut rejected = Rejected::default();
        let blocks: Vec<Block> = decode_all(&jsons, Block::check, &mut rejected);
        let nets: Vec<String> = blocks.iter().map(|b| b.net.to_string()).collect();
        assert_eq!(nets, ["192.0.2.7/32", "192.0.2.8/32"]);
        assert_eq!(rejected.count, 3);
        assert!(
            rejected.first.as_deref().unwrap().contains("line 1"),
            "{rejected:?}"
        );
    }

    #[test]
    fn a_throttled_log_reports_what_it_held_back() {
        let mut t = Throttle::default();
        assert_eq!(t.due(3), Some(3));
        assert_eq!(t.due(5), None);
        assert_eq!(t.due(1), None);
        assert_eq!(t.unlogged, 6, "reported on the next line due");
    }
}
