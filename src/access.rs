//! IP blocks and the allowlist: who skips every limit, and who is turned away before any.
//!
//! The request path reads only an "empty" flag when there is nothing to check; otherwise an
//! immutable snapshot through one atomic load (no lock), and parses the client address.
//! Writers (admin calls, automatic blocks, the sweeper) serialise on a mutex, edit the state,
//! and publish a new snapshot and the flag; they are rare, so rebuilding the snapshot is fine.
//!
//! Blocks and runtime allowlist entries survive restarts through a JSON state file written
//! atomically (write to a temporary file, fsync, rename, fsync the directory). A state file that
//! cannot be read stops start-up with a clear error and is never overwritten.
//!
//! Expiry is checked against the caller's clock at read time, so a temporary block ends exactly
//! when it should even between sweeps (and tests step a manual clock).
//!
//! With a shared store, replicas share blocks and runtime allowlist entries too: once
//! [`AccessList::replicate`] is on, every local change is also journaled as an
//! [`AccessChange`] for [`crate::store::redis_sync`] to push, and that task replaces the local
//! state with the shared one ([`AccessList::replace_state`]) when another replica changed it.
//! The request path still reads only the snapshot.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::clock::{Timestamp, duration_nanos};
use crate::input::ReadError;

/// A blocklist or allowlist operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// Not an address or CIDR.
    #[error(
        "{0:?} is not an IP address or CIDR (expected e.g. 192.0.2.7, 2001:db8::1 or 192.0.2.0/24)"
    )]
    BadNet(String),
    /// The state file exists but cannot be used.
    #[error("state file {path} is damaged ({reason}); fix or remove it (it is never overwritten)")]
    Damaged {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing the state file failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Parses `192.0.2.7`, `2001:db8::1` or `192.0.2.0/24` into a normalised network.
pub fn parse_net(s: &str) -> Result<IpNet, AccessError> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| AccessError::BadNet(s.to_string()))
}

/// A block as stored and reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// The blocked network.
    #[serde(with = "net_string")]
    pub net: IpNet,
    /// `true`: never expires.
    pub permanent: bool,
    /// Nanoseconds since the epoch.
    pub created_at: u64,
    /// Nanoseconds since the epoch; `None` when permanent.
    pub expires_at: Option<u64>,
    /// Why.
    pub reason: String,
    /// Who or what made it.
    pub created_by: String,
}

impl Block {
    fn active_at(&self, now: u64) -> bool {
        self.expires_at.is_none_or(|e| e > now)
    }
}

/// Where an allowlist entry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllowSource {
    /// The config file's `allowlist`.
    Config,
    /// An admin `Allow` call.
    Runtime,
}

/// An allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowEntry {
    /// The network.
    #[serde(with = "net_string")]
    pub net: IpNet,
    /// Config or runtime.
    pub source: AllowSource,
    /// Nanoseconds since the epoch (0 for config entries).
    pub created_at: u64,
    /// Why.
    pub reason: String,
}

/// What the access lists say about an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Neither allowlisted nor blocked: apply the limits.
    Normal,
    /// Allowlisted: skip every limit.
    Allowed,
    /// Blocked.
    Blocked {
        /// Never expires.
        permanent: bool,
        /// Nanoseconds until the block ends (0 when permanent).
        remaining: u64,
    },
}

/// What the request path reads.
#[derive(Debug, Default)]
struct Snapshot {
    allow_exact: HashSet<IpAddr>,
    allow_nets: Vec<IpNet>,
    block_exact: HashMap<IpAddr, (bool, Option<u64>)>,
    block_nets: Vec<(IpNet, bool, Option<u64>)>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    #[serde(default)]
    blocks: BTreeMap<String, Block>,
    #[serde(default)]
    allowed: BTreeMap<String, AllowEntry>,
    /// Local changes not yet replicated; kept under the same lock as the state so a replaced
    /// state can have them re-applied.
    #[serde(skip)]
    journal: Journal,
}

/// A local change to blocks or the runtime allowlist, to be replicated to other replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessChange {
    /// A block was made or replaced.
    Block(Block),
    /// The block of exactly this net was removed.
    Unblock(IpNet),
    /// A runtime allowlist entry was added or replaced.
    Allow(AllowEntry),
    /// The runtime allowlist entry of exactly this net was removed.
    Disallow(IpNet),
}

/// Changes waiting to be replicated. Bounded: if replication stalls (Redis down) past
/// [`Journal::MAX`] changes, the journal is dropped and the whole state is pushed instead
/// (removals made meanwhile are then not replicated).
#[derive(Debug, Default)]
struct Journal {
    enabled: bool,
    changes: Vec<AccessChange>,
    overflowed: bool,
}

impl Journal {
    const MAX: usize = 100_000;

    fn record(&mut self, change: AccessChange) {
        if !self.enabled {
            return;
        }
        if self.changes.len() >= Self::MAX {
            self.changes.clear();
            self.overflowed = true;
        }
        if !self.overflowed {
            self.changes.push(change);
        }
    }
}

impl State {
    fn apply(&mut self, change: &AccessChange) {
        match change {
            AccessChange::Block(b) => {
                self.blocks.insert(b.net.to_string(), b.clone());
            }
            AccessChange::Unblock(net) => {
                self.blocks.remove(&net.to_string());
            }
            AccessChange::Allow(a) => {
                self.allowed.insert(a.net.to_string(), a.clone());
            }
            AccessChange::Disallow(net) => {
                self.allowed.remove(&net.to_string());
            }
        }
    }
}

/// The state file's shape.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    blocks: Vec<Block>,
    allowed: Vec<AllowEntry>,
}

const STATE_VERSION: u32 = 1;

/// Largest state file read or written, in bytes: a state file is read whole at start, so a huge
/// one is refused unread, and sluice never writes one it would then refuse (the admin call fails
/// instead, and the old file stays). Hundreds of thousands of blocks fit.
pub const MAX_STATE_BYTES: u64 = 64 * 1024 * 1024;

/// Blocks and allowlist, shared by the limiter and the admin service.
#[derive(Debug)]
pub struct AccessList {
    snapshot: ArcSwap<Snapshot>,
    /// Whether the snapshot holds nothing, readable without loading it: most deployments
    /// block no one most of the time, and then a request costs one load here.
    empty: AtomicBool,
    state: Mutex<State>,
    config_allowed: Mutex<Vec<IpNet>>,
    file: Option<PathBuf>,
    write_lock: Mutex<()>,
    changed: Notify,
    to_replicate: Notify,
}

impl AccessList {
    /// An access list backed by `file` (if any), loading what it holds. A missing file is an
    /// empty list; an unreadable or malformed one is an error.
    pub fn open(file: Option<PathBuf>, config_allowed: Vec<IpNet>) -> Result<Self, AccessError> {
        let mut state = State::default();
        if let Some(path) = &file {
            match crate::input::read_bounded(path, MAX_STATE_BYTES) {
                Err(ReadError::TooLarge { size, max }) => {
                    return Err(AccessError::Damaged {
                        path: path.display().to_string(),
                        reason: format!(
                            "{size} bytes, over the bound of {max} bytes on a state file; refused unread"
                        ),
                    });
                }
                Ok(bytes) => {
                    let parsed: StateFile =
                        serde_json::from_slice(&bytes).map_err(|e| AccessError::Damaged {
                            path: path.display().to_string(),
                            reason: e.to_string(),
                        })?;
                    if parsed.version != STATE_VERSION {
                        return Err(AccessError::Damaged {
                            path: path.display().to_string(),
                            reason: format!("unsupported version {}", parsed.version),
                        });
                    }
                    for b in parsed.blocks {
                        state.blocks.insert(b.net.to_string(), b);
                    }
                    for a in parsed.allowed {
                        state.allowed.insert(a.net.to_string(), a);
                    }
                }
                Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(ReadError::Io(source)) => {
                    return Err(AccessError::Io {
                        path: path.display().to_string(),
                        source,
                    });
                }
            }
        }
        let list = Self {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            empty: AtomicBool::new(false),
            state: Mutex::new(state),
            config_allowed: Mutex::new(config_allowed),
            file,
            write_lock: Mutex::new(()),
            changed: Notify::new(),
            to_replicate: Notify::new(),
        };
        list.publish(&list.state.lock());
        Ok(list)
    }

    /// An in-memory list with nothing in it (no state file).
    pub fn empty() -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            empty: AtomicBool::new(true),
            state: Mutex::new(State::default()),
            config_allowed: Mutex::new(Vec::new()),
            file: None,
            write_lock: Mutex::new(()),
            changed: Notify::new(),
            to_replicate: Notify::new(),
        }
    }

    /// The state file, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Checks `address` (the client address entry) at `now`. Allowlist wins over blocks.
    pub fn check_at(&self, address: &str, now: Timestamp) -> Access {
        // A request racing a change may see either side of it, as with the snapshot itself.
        if self.empty.load(Ordering::Acquire) {
            return Access::Normal;
        }
        let snap = self.snapshot.load();
        let Ok(ip) = address.parse::<IpAddr>() else {
            return Access::Normal;
        };
        if snap.allow_exact.contains(&ip) || snap.allow_nets.iter().any(|n| n.contains(&ip)) {
            return Access::Allowed;
        }
        let now = now.as_nanos();
        let hit = snap
            .block_exact
            .get(&ip)
            .copied()
            .filter(|(_, e)| e.is_none_or(|e| e > now))
            .or_else(|| {
                snap.block_nets
                    .iter()
                    .find(|(n, _, e)| n.contains(&ip) && e.is_none_or(|e| e > now))
                    .map(|&(_, p, e)| (p, e))
            });
        match hit {
            Some((permanent, expires)) if expires.is_none_or(|e| e > now) => Access::Blocked {
                permanent,
                remaining: expires.map_or(0, |e| e - now),
            },
            _ => Access::Normal,
        }
    }

    /// Blocks `net` (replacing any block of the same net); `None` duration means permanent.
    pub fn block(
        &self,
        net: IpNet,
        duration: Option<Duration>,
        reason: String,
        created_by: String,
        now: Timestamp,
    ) -> Block {
        let block = new_block(net, duration, reason, created_by, now);
        self.change(AccessChange::Block(block.clone()));
        block
    }

    /// Blocks `net` unless an active block already covers it; returns the new block. Used by
    /// automatic blocking, so a burst of requests creates (and logs) one block.
    pub fn block_if_absent(
        &self,
        net: IpNet,
        duration: Duration,
        reason: String,
        created_by: String,
        now: Timestamp,
    ) -> Option<Block> {
        let mut state = self.state.lock();
        let covered = state
            .blocks
            .values()
            .any(|b| b.active_at(now.as_nanos()) && b.net.contains(&net));
        if covered {
            return None;
        }
        let block = new_block(net, Some(duration), reason, created_by, now);
        let change = AccessChange::Block(block.clone());
        state.apply(&change);
        state.journal.record(change);
        self.publish(&state);
        drop(state);
        self.changed.notify_one();
        self.to_replicate.notify_one();
        Some(block)
    }

    /// Removes the block of exactly `net`; `true` if there was one.
    pub fn unblock(&self, net: IpNet) -> bool {
        let removed = self.state.lock().blocks.contains_key(&net.to_string());
        if removed {
            self.change(AccessChange::Unblock(net));
        }
        removed
    }

    /// Blocks active at `now`, oldest first.
    pub fn blocks_at(&self, now: Timestamp) -> Vec<Block> {
        let mut out: Vec<Block> = self
            .state
            .lock()
            .blocks
            .values()
            .filter(|b| b.active_at(now.as_nanos()))
            .cloned()
            .collect();
        out.sort_by_key(|b| (b.created_at, b.net));
        out
    }

    /// Adds a runtime allowlist entry.
    pub fn allow(&self, net: IpNet, reason: String, now: Timestamp) -> AllowEntry {
        let entry = AllowEntry {
            net,
            source: AllowSource::Runtime,
            created_at: now.as_nanos(),
            reason,
        };
        self.change(AccessChange::Allow(entry.clone()));
        entry
    }

    /// Removes a runtime allowlist entry; `true` if there was one.
    pub fn disallow(&self, net: IpNet) -> bool {
        let removed = self.state.lock().allowed.contains_key(&net.to_string());
        if removed {
            self.change(AccessChange::Disallow(net));
        }
        removed
    }

    /// Applies a local change: state, journal (when replicating), snapshot.
    fn change(&self, change: AccessChange) {
        let mut state = self.state.lock();
        state.apply(&change);
        state.journal.record(change);
        self.publish(&state);
        drop(state);
        self.to_replicate.notify_one();
    }

    /// Starts journaling local changes for replication (see the module docs).
    pub fn replicate(&self) {
        self.state.lock().journal.enabled = true;
    }

    /// Takes the changes made since the last call, oldest first. After a journal overflow, the
    /// whole state instead (as blocks and allow entries).
    pub fn take_changes(&self) -> Vec<AccessChange> {
        let mut state = self.state.lock();
        if std::mem::take(&mut state.journal.overflowed) {
            state.journal.changes.clear();
            let mut all: Vec<AccessChange> = state
                .blocks
                .values()
                .cloned()
                .map(AccessChange::Block)
                .collect();
            all.extend(state.allowed.values().cloned().map(AccessChange::Allow));
            return all;
        }
        std::mem::take(&mut state.journal.changes)
    }

    /// Puts back changes that could not be replicated, ahead of newer ones.
    pub fn restore_changes(&self, mut changes: Vec<AccessChange>) {
        let mut state = self.state.lock();
        changes.append(&mut state.journal.changes);
        state.journal.changes = changes;
        if state.journal.changes.len() > Journal::MAX {
            state.journal.changes.clear();
            state.journal.overflowed = true;
        }
    }

    /// Completes when a local change is waiting to be replicated.
    pub async fn changes_waiting(&self) {
        self.to_replicate.notified().await;
    }

    /// Blocks and runtime allowlist entries (not the config's), for replication.
    pub fn export_state(&self) -> (Vec<Block>, Vec<AllowEntry>) {
        let state = self.state.lock();
        (
            state.blocks.values().cloned().collect(),
            state.allowed.values().cloned().collect(),
        )
    }

    /// Replaces blocks and runtime allowlist entries with the shared state, keeping local
    /// changes not yet replicated on top. Saves the state file (through the writer that
    /// [`AccessList::changed`] wakes) when anything changed.
    pub fn replace_state(&self, blocks: Vec<Block>, allowed: Vec<AllowEntry>) {
        let mut state = self.state.lock();
        let blocks: BTreeMap<String, Block> =
            blocks.into_iter().map(|b| (b.net.to_string(), b)).collect();
        let allowed: BTreeMap<String, AllowEntry> = allowed
            .into_iter()
            .map(|a| (a.net.to_string(), a))
            .collect();
        let before = (
            std::mem::replace(&mut state.blocks, blocks),
            std::mem::replace(&mut state.allowed, allowed),
        );
        let pending = state.journal.changes.clone();
        for c in &pending {
            state.apply(c);
        }
        if before.0 == state.blocks && before.1 == state.allowed {
            return;
        }
        self.publish(&state);
        drop(state);
        self.changed.notify_one();
    }

    /// Config and runtime allowlist entries.
    pub fn allowed(&self) -> Vec<AllowEntry> {
        let mut out: Vec<AllowEntry> = self
            .config_allowed
            .lock()
            .iter()
            .map(|n| AllowEntry {
                net: *n,
                source: AllowSource::Config,
                created_at: 0,
                reason: "config file".to_string(),
            })
            .collect();
        out.extend(self.state.lock().allowed.values().cloned());
        out
    }

    /// Replaces the config file's allowlist (on reload).
    pub fn set_config_allowed(&self, nets: Vec<IpNet>) {
        *self.config_allowed.lock() = nets;
        self.publish(&self.state.lock());
    }

    /// Drops blocks expired at `now`; returns how many.
    pub fn sweep_at(&self, now: Timestamp) -> usize {
        let mut state = self.state.lock();
        let before = state.blocks.len();
        state.blocks.retain(|_, b| b.active_at(now.as_nanos()));
        let dropped = before - state.blocks.len();
        if dropped > 0 {
            self.publish(&state);
        }
        dropped
    }

    /// Completes when an automatic block or another replica (through [`AccessList::replace_state`])
    /// changed the state: the background writer then saves the state file.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Writes the state file atomically (no-op without a file). Blocking I/O: call it from
    /// `spawn_blocking` on the async runtime.
    pub fn persist(&self) -> Result<(), AccessError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        // One writer at a time, each writing the state as it is when it starts.
        let _guard = self.write_lock.lock();
        let body = {
            let state = self.state.lock();
            StateFile {
                version: STATE_VERSION,
                blocks: state.blocks.values().cloned().collect(),
                allowed: state.allowed.values().cloned().collect(),
            }
        };
        let io = |source| AccessError::Io {
            path: path.display().to_string(),
            source,
        };
        let json = serde_json::to_vec_pretty(&body).map_err(|e| io(std::io::Error::other(e)))?;
        if json.len() as u64 > MAX_STATE_BYTES {
            return Err(io(std::io::Error::other(format!(
                "{} bytes, over the bound of {MAX_STATE_BYTES} bytes on a state file; not written",
                json.len()
            ))));
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&json).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        // Make the rename itself durable.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }

    /// Active blocks at `now`.
    pub fn active_blocks_at(&self, now: Timestamp) -> usize {
        let now = now.as_nanos();
        self.state
            .lock()
            .blocks
            .values()
            .filter(|b| b.active_at(now))
            .count()
    }

    fn publish(&self, state: &State) {
        let config_allowed = self.config_allowed.lock();
        let mut snap = Snapshot::default();
        for net in config_allowed
            .iter()
            .chain(state.allowed.values().map(|a| &a.net))
        {
            if net.prefix_len() == net.max_prefix_len() {
                snap.allow_exact.insert(net.addr());
            } else {
                snap.allow_nets.push(*net);
            }
        }
        for b in state.blocks.values() {
            if b.net.prefix_len() == b.net.max_prefix_len() {
                snap.block_exact
                    .insert(b.net.addr(), (b.permanent, b.expires_at));
            } else {
                snap.block_nets.push((b.net, b.permanent, b.expires_at));
            }
        }
        let empty = snap.allow_exact.is_empty()
            && snap.allow_nets.is_empty()
            && snap.block_exact.is_empty()
            && snap.block_nets.is_empty();
        self.snapshot.store(std::sync::Arc::new(snap));
        self.empty.store(empty, Ordering::Release);
    }
}

fn new_block(
    net: IpNet,
    duration: Option<Duration>,
    reason: String,
    created_by: String,
    now: Timestamp,
) -> Block {
    Block {
        net,
        permanent: duration.is_none(),
        created_at: now.as_nanos(),
        expires_at: duration.map(|d| now.as_nanos().saturating_add(duration_nanos(d))),
        reason,
        created_by,
    }
}

mod net_string {
    use ipnet::IpNet;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(n: &IpNet, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(n)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_net(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn t(secs: u64) -> Timestamp {
        Timestamp::from_secs(secs)
    }

    #[test]
    fn addresses_and_cidrs_parse_and_normalise() {
        assert_eq!(parse_net("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(
            parse_net("192.0.2.9/24").unwrap().to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(
            parse_net("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        assert!(parse_net("nope").is_err());
        assert!(parse_net("1.2.3.4/33").is_err());
    }

    #[test]
    fn temporary_block_ends_on_time() {
        let l = AccessList::empty();
        l.block(
            parse_net("192.0.2.7").unwrap(),
            Some(Duration::from_secs(60)),
            "test".into(),
            "admin".into(),
            t(1000),
        );
        assert_eq!(
            l.check_at("192.0.2.7", t(1000)),
            Access::Blocked {
                permanent: false,
                remaining: 60 * S
            }
        );
        assert_eq!(l.check_at("192.0.2.8", t(1000)), Access::Normal);
        assert!(matches!(
            l.check_at("192.0.2.7", t(1059)),
            Access::Blocked { .. }
        ));
        assert_eq!(l.check_at("192.0.2.7", t(1060)), Access::Normal);
    }

    #[test]
    fn cidr_blocks_and_allowlist_wins() {
        let l = AccessList::empty();
        l.block(
            parse_net("10.0.0.0/8").unwrap(),
            None,
            "r".into(),
            "admin".into(),
            t(1),
        );
        assert_eq!(
            l.check_at("10.1.2.3", t(5)),
            Access::Blocked {
                permanent: true,
                remaining: 0
            }
        );
        l.allow(parse_net("10.1.0.0/16").unwrap(), "ops".into(), t(2));
        assert_eq!(l.check_at("10.1.2.3", t(5)), Access::Allowed);
        assert!(matches!(
            l.check_at("10.2.0.1", t(5)),
            Access::Blocked { .. }
        ));
        assert!(l.disallow(parse_net("10.1.0.0/16").unwrap()));
        assert!(matches!(
            l.check_at("10.1.2.3", t(5)),
            Access::Blocked { .. }
        ));
        assert!(l.unblock(parse_net("10.0.0.0/8").unwrap()));
        assert_eq!(l.check_at("10.1.2.3", t(5)), Access::Normal);
    }

    #[test]
    fn automatic_block_is_created_once() {
        let l = AccessList::empty();
        let net = parse_net("192.0.2.1").unwrap();
        let d = Duration::from_secs(3600);
        assert!(
            l.block_if_absent(net, d, "r".into(), "auto".into(), t(1))
                .is_some()
        );
        assert!(
            l.block_if_absent(net, d, "r".into(), "auto".into(), t(2))
                .is_none()
        );
        assert!(
            l.block_if_absent(net, d, "r".into(), "auto".into(), t(3602))
                .is_some()
        );
    }

    #[test]
    fn state_survives_a_reopen_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let l = AccessList::open(Some(path.clone()), vec![]).unwrap();
        l.block(
            parse_net("192.0.2.7").unwrap(),
            None,
            "r".into(),
            "admin".into(),
            t(1),
        );
        l.allow(parse_net("198.51.100.0/24").unwrap(), "ops".into(), t(1));
        l.persist().unwrap();
        let again = AccessList::open(Some(path.clone()), vec![]).unwrap();
        assert!(matches!(
            again.check_at("192.0.2.7", t(9)),
            Access::Blocked { .. }
        ));
        assert_eq!(again.check_at("198.51.100.3", t(9)), Access::Allowed);

        std::fs::write(&path, b"{not json").unwrap();
        let err = AccessList::open(Some(path.clone()), vec![]).unwrap_err();
        assert!(err.to_string().contains("is damaged"), "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"{not json",
            "left untouched"
        );
    }

    #[test]
    fn a_replaced_state_keeps_local_changes_not_yet_replicated() {
        let l = AccessList::empty();
        l.block(net("192.0.2.1"), None, "before".into(), "a".into(), t(1));
        assert!(
            l.take_changes().is_empty(),
            "not journaled before replicate()"
        );
        l.replicate();
        l.block(net("192.0.2.2"), None, "local".into(), "a".into(), t(2));
        // Another replica's state: it blocks .3 and knows nothing of .1 or .2 yet.
        let remote = new_block(net("192.0.2.3"), None, "remote".into(), "b".into(), t(2));
        l.replace_state(vec![remote], vec![]);
        assert!(matches!(
            l.check_at("192.0.2.3", t(3)),
            Access::Blocked { .. }
        ));
        assert!(
            matches!(l.check_at("192.0.2.2", t(3)), Access::Blocked { .. }),
            "pending change kept"
        );
        assert_eq!(
            l.check_at("192.0.2.1", t(3)),
            Access::Normal,
            "the shared state wins"
        );
        let changes = l.take_changes();
        assert!(matches!(&changes[..], [AccessChange::Block(b)] if b.net == net("192.0.2.2")));
        assert!(l.unblock(net("192.0.2.3")));
        assert_eq!(
            l.take_changes(),
            vec![AccessChange::Unblock(net("192.0.2.3"))]
        );
        let (blocks, allowed) = l.export_state();
        assert_eq!((blocks.len(), allowed.len()), (1, 0));
    }

    fn net(s: &str) -> IpNet {
        parse_net(s).unwrap()
    }

    #[test]
    fn garbage_addresses_are_not_matched() {
        let l = AccessList::empty();
        l.block(
            parse_net("0.0.0.0/0").unwrap(),
            None,
            "r".into(),
            "a".into(),
            t(1),
        );
        assert_eq!(l.check_at("not-an-ip", t(2)), Access::Normal);
        assert!(matches!(
            l.check_at("8.8.8.8", t(2)),
            Access::Blocked { .. }
        ));
    }
}
