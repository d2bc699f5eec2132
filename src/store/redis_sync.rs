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

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Script;

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
        last_error_log: None,
    };
    loop {
        if let Err(e) = sync.round().await {
            sync.log(&e);
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
    last_error_log: Option<Instant>,
}

/// One write for the script: (op, net, JSON).
type Op = (&'static str, String, String);

fn op_of(change: &AccessChange) -> Op {
    match change {
        AccessChange::Block(b) => (
            "B",
            b.net.to_string(),
            serde_json::to_string(b).unwrap_or_default(),
        ),
        AccessChange::Unblock(net) => ("b", net.to_string(), String::new()),
        AccessChange::Allow(a) => (
            "A",
            a.net.to_string(),
            serde_json::to_string(a).unwrap_or_default(),
        ),
        AccessChange::Disallow(net) => ("a", net.to_string(), String::new()),
    }
}

impl Sync {
    /// Seeds if needed, pushes local changes, then loads what others changed.
    async fn round(&mut self) -> Result<(), StoreError> {
        if self.version.is_none() {
            self.seed().await?;
        }
        let changes = self.access.take_changes();
        if !changes.is_empty() {
            let ops: Vec<Op> = changes.iter().map(op_of).collect();
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
        let ops: Vec<Op> = blocks
            .into_iter()
            .map(AccessChange::Block)
            .chain(allowed.into_iter().map(AccessChange::Allow))
            .map(|c| op_of(&c))
            .collect();
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
        let blocks: Vec<Block> = blocks
            .iter()
            .filter_map(|s| serde_json::from_str::<Block>(s).ok())
            .filter(|b| {
                let live = b.expires_at.is_none_or(|e| e > now);
                if !live {
                    expired.push(AccessChange::Unblock(b.net));
                }
                live
            })
            .collect();
        let allowed: Vec<AllowEntry> = allowed
            .iter()
            .filter_map(|s| serde_json::from_str::<AllowEntry>(s).ok())
            .collect();
        self.access.replace_state(blocks, allowed);
        self.version = Some(v);
        if !expired.is_empty() {
            // Keep the shared hash small; every replica ignores expired blocks anyway.
            let ops: Vec<Op> = expired.iter().map(op_of).collect();
            self.write("push", &ops).await?;
        }
        Ok(())
    }

    /// Logs a replication error at most every 10 s.
    fn log(&mut self, e: &StoreError) {
        if self
            .last_error_log
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        self.last_error_log = Some(Instant::now());
        tracing::warn!(error = %e, "cannot replicate blocks and allowlist through Redis; enforcing the local copy");
    }
}
