//! IP blocks and the allowlist: who skips every limit, and who is turned away before any.
//!
//! The request path reads only an "empty" flag when there is nothing to check; otherwise an
//! immutable snapshot through one atomic load (no lock), parses the client address and looks it
//! up in per-prefix-length maps (`access/nets.rs`): a probe per prefix length present, not a
//! scan of the entries, so 20,000 blocks cost a decision what one does.
//! Writers (admin calls, automatic blocks, the sweeper) serialise on a mutex, edit the state,
//! and publish a new snapshot and the flag; they are rare, so rebuilding the snapshot is fine.
//!
//! Blocks and runtime allowlist entries survive restarts through a JSON state file written
//! atomically (write to a temporary file, fsync, rename, fsync the directory). A state file that
//! cannot be read stops start-up with a clear error and is never overwritten. Its size and the
//! text of its entries are bounded ([`MAX_STATE_FILE_BYTES`], [`MAX_REASON_BYTES`],
//! [`MAX_CREATED_BY_BYTES`]): a file past them is refused rather than loaded, and sluice never
//! writes one.
//!
//! Expiry is checked against the caller's clock at read time, so a temporary block ends exactly
//! when it should even between sweeps (and tests step a manual clock).
//!
//! With a shared store, replicas share blocks and runtime allowlist entries too: once
//! [`AccessList::replicate`] is on, every local change is also journaled as an
//! [`AccessChange`] for [`crate::store::redis_sync`] to push, and that task replaces the local
//! state with the shared one ([`AccessList::replace_state`]) when another replica changed it.
//! The request path still reads only the snapshot.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::clock::{Timestamp, duration_nanos};
use crate::input::ReadError;

mod nets;

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
    /// The state would not fit in a state file.
    #[error(
        "state file {path} not written: the state is {bytes} bytes, more than the \
         {MAX_STATE_FILE_BYTES} a state file may hold (the previous file is kept)"
    )]
    TooLarge {
        /// The file.
        path: String,
        /// The state's size as JSON.
        bytes: usize,
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

/// Longest block or allowlist `reason`, in bytes: a page of [`crate::admin::MAX_PAGE_SIZE`]
/// blocks with the longest texts stays within gRPC's default 4 MiB message.
pub const MAX_REASON_BYTES: usize = 1024;
/// Longest block `created_by`, in bytes (made by sluice: the admin peer or the automatic
/// block's domain, cut to this).
pub const MAX_CREATED_BY_BYTES: usize = 1024;
/// Largest state file loaded or written, in bytes: about 200,000 entries of short texts.
pub const MAX_STATE_FILE_BYTES: usize = 64 << 20;

/// Parses `192.0.2.7`, `2001:db8::1` or `192.0.2.0/24` into a normalised network, IPv4-mapped
/// IPv6 ones (`::ffff:192.0.2.7`, `::ffff:192.0.2.0/120`) as the IPv4 networks they are: the
/// form client addresses are checked in (see [`canonical_address`]).
pub fn parse_net(s: &str) -> Result<IpNet, AccessError> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(addr.to_canonical()));
    }
    s.parse::<IpNet>()
        .map(|n| canonical_net(n.trunc()))
        .map_err(|_| AccessError::BadNet(s.to_string()))
}

/// `net`, or the IPv4 network it stands for when it lies in the IPv4-mapped range
/// `::ffff:0:0/96`. A shorter IPv6 prefix stays IPv6: it covers more than IPv4 addresses.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net
        && let Some(prefix) = n.prefix_len().checked_sub(96)
        && let Some(v4) = n.network().to_ipv4_mapped()
        && let Ok(v4) = ipnet::Ipv4Net::new(v4, prefix)
    {
        return IpNet::V4(v4);
    }
    net
}

/// The text a client address entry is read as, when `value` is an IPv4-mapped IPv6 address
/// (`::ffff:192.0.2.7`, as a dual-stack listener reports an IPv4 client): the IPv4 address
/// (`192.0.2.7`), so that blocks, the allowlist, automatic blocks and statistics see one
/// client whichever socket it came in on. `None` when `value` is already canonical (IPv4, any
/// other IPv6, or not an address at all): that costs a scan for `:` and allocates nothing.
/// The usual spelling is answered with a slice of `value`; only the rare hexadecimal one
/// (`::ffff:c000:207`) is formatted anew.
#[inline]
pub fn canonical_address(value: &str) -> Option<Cow<'_, str>> {
    // Every spelling of a mapped address starts with its zero groups (`::` or `0`): one
    // compare turns away IPv4 (but 0.x.x.x) and most IPv6 addresses.
    if matches!(value.as_bytes().first(), Some(b':' | b'0')) {
        unmapped(value)
    } else {
        None
    }
}

/// [`canonical_address`] past its first byte.
#[inline(never)]
fn unmapped(value: &str) -> Option<Cow<'_, str>> {
    // And a `ffff` group, which most IPv6 addresses starting so lack.
    if !value
        .as_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"ffff"))
    {
        return None;
    }
    let v4 = value.parse::<Ipv6Addr>().ok()?.to_ipv4_mapped()?;
    match value.rsplit_once(':') {
        // The IPv4 parser refuses leading zeros, so a tail that parses is the canonical text.
        Some((_, tail)) if tail.parse::<Ipv4Addr>() == Ok(v4) => Some(Cow::Borrowed(tail)),
        _ => Some(Cow::Owned(v4.to_string())),
    }
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

    /// Whether its texts are within bounds (entries from a state file or another replica).
    pub fn check(&self) -> Result<(), String> {
        check_len("reason", &self.reason, MAX_REASON_BYTES)?;
        check_len("created_by", &self.created_by, MAX_CREATED_BY_BYTES)
    }
}

/// `field: N bytes, at most M allowed` when `value` is longer than `max` bytes.
pub fn check_len(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!(
            "{field}: {} bytes, at most {max} allowed",
            value.len()
        ));
    }
    Ok(())
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn clamp(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Where an allowlist entry comes from. Config entries list first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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

impl AllowEntry {
    /// Whether its text is within bounds (entries from a state file or another replica).
    pub fn check(&self) -> Result<(), String> {
        check_len("reason", &self.reason, MAX_REASON_BYTES)
    }

    /// Its place in [`AccessList::allowed_page`]'s order.
    pub fn key(&self) -> (IpNet, AllowSource) {
        (self.net, self.source)
    }
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
    allow: nets::NetMap<()>,
    /// Blocks by network: when each ends (nanoseconds since the epoch), `u64::MAX` for never.
    block: nets::NetMap<u64>,
}

impl Snapshot {
    /// The first block covering `net` (all of it) still in force at `now`: when it ends.
    fn block_covering(&self, net: IpNet, now: u64) -> Option<u64> {
        self.block.find(net.network(), net.prefix_len(), |&until| {
            (until > now).then_some(until)
        })
    }
}

#[derive(Debug, Default)]
struct State {
    blocks: BTreeMap<IpNet, Block>,
    allowed: BTreeMap<IpNet, AllowEntry>,
    /// Local changes not yet replicated; kept under the same lock as the state so a replaced
    /// state can have them re-applied.
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
                self.blocks.insert(b.net, b.clone());
            }
            AccessChange::Unblock(net) => {
                self.blocks.remove(net);
            }
            AccessChange::Allow(a) => {
                self.allowed.insert(a.net, a.clone());
            }
            AccessChange::Disallow(net) => {
                self.allowed.remove(net);
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

/// Failures keeping the state of blocks and the allowlist, by kind: none is dropped without
/// being counted here (and logged, rate-limited, where it happens). Rendered on `/metrics`.
#[derive(Debug, Default)]
pub struct SyncErrors {
    /// Shared entries (in Redis) that cannot be decoded or break a bound: skipped, the others
    /// applied. Counted each time the shared state is loaded.
    pub decode: AtomicU64,
    /// Local changes that cannot be encoded for the shared state: kept locally, not shared.
    pub encode: AtomicU64,
    /// Replication rounds through Redis that failed (unreachable, erroring): retried.
    pub redis: AtomicU64,
    /// State file writes that failed (the previous file is kept).
    pub file: AtomicU64,
}

impl SyncErrors {
    /// `(kind, count)` for every kind, in a fixed order.
    pub fn counts(&self) -> [(&'static str, u64); 4] {
        [
            ("decode", &self.decode),
            ("encode", &self.encode),
            ("redis", &self.redis),
            ("file", &self.file),
        ]
        .map(|(kind, n)| (kind, n.load(Ordering::Relaxed)))
    }
}

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
    sync_errors: SyncErrors,
    /// Automatic blocks not made because [`MAX_BLOCKS_FOR_AUTOMATIC`] blocks were in force.
    automatic_refused: AtomicU64,
    /// Bumped at every change of what the request path reads, so that quota streams can
    /// re-read their buckets' blocks at once instead of at their next report.
    version: AtomicU64,
}

/// Blocks in force beyond which no automatic block is made (operators' own blocks still are):
/// a flood from many addresses (an IPv6 prefix has plenty) cannot grow the lists, and the
/// state file that holds them, without end. The refusals are counted.
pub const MAX_BLOCKS_FOR_AUTOMATIC: usize = 100_000;

impl AccessList {
    /// An access list backed by `file` (if any), loading what it holds. A missing file is an
    /// empty list; an unreadable or malformed one is an error.
    pub fn open(file: Option<PathBuf>, config_allowed: Vec<IpNet>) -> Result<Self, AccessError> {
        let mut state = State::default();
        if let Some(path) = &file {
            let damaged = |reason: String| AccessError::Damaged {
                path: path.display().to_string(),
                reason,
            };
            match crate::input::read_bounded(path, MAX_STATE_FILE_BYTES as u64) {
                Ok(bytes) => {
                    let parsed: StateFile =
                        serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
                    if parsed.version != STATE_VERSION {
                        return Err(damaged(format!("unsupported version {}", parsed.version)));
                    }
                    for (i, b) in parsed.blocks.iter().enumerate() {
                        b.check().map_err(|e| damaged(format!("blocks[{i}].{e}")))?;
                    }
                    for (i, a) in parsed.allowed.iter().enumerate() {
                        a.check()
                            .map_err(|e| damaged(format!("allowed[{i}].{e}")))?;
                    }
                    for b in parsed.blocks {
                        state.blocks.insert(b.net, b);
                    }
                    for a in parsed.allowed {
                        state.allowed.insert(a.net, a);
                    }
                }
                Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(ReadError::TooLarge { size, .. }) => {
                    return Err(damaged(format!(
                        "{size} bytes, more than the {MAX_STATE_FILE_BYTES} a state file may hold; refused unread"
                    )));
                }
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
            sync_errors: SyncErrors::default(),
            automatic_refused: AtomicU64::new(0),
            version: AtomicU64::new(0),
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
            sync_errors: SyncErrors::default(),
            automatic_refused: AtomicU64::new(0),
            version: AtomicU64::new(0),
        }
    }

    /// Automatic blocks not made because the list was full ([`MAX_BLOCKS_FOR_AUTOMATIC`]).
    pub fn automatic_blocks_refused(&self) -> u64 {
        self.automatic_refused.load(Ordering::Relaxed)
    }

    /// Failures keeping this state, for `/metrics`.
    pub fn sync_errors(&self) -> &SyncErrors {
        &self.sync_errors
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
        // The limiter passes canonical text already; other callers may not.
        let ip = ip.to_canonical();
        if snap.allow.find(ip, u8::MAX, |()| Some(())).is_some() {
            return Access::Allowed;
        }
        let now = now.as_nanos();
        match snap.block_covering(IpNet::from(ip), now) {
            Some(u64::MAX) => Access::Blocked {
                permanent: true,
                remaining: 0,
            },
            Some(until) => Access::Blocked {
                permanent: false,
                remaining: until.saturating_sub(now),
            },
            None => Access::Normal,
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

    /// Blocks `net` unless an active block already covers it or [`MAX_BLOCKS_FOR_AUTOMATIC`]
    /// blocks are in force (counted); returns the new block. Used by automatic blocking, so a
    /// burst of requests creates (and logs) one block.
    pub fn block_if_absent(
        &self,
        net: IpNet,
        duration: Duration,
        reason: String,
        created_by: String,
        now: Timestamp,
    ) -> Option<Block> {
        self.block_if_absent_within(
            net,
            duration,
            reason,
            created_by,
            now,
            MAX_BLOCKS_FOR_AUTOMATIC,
        )
    }

    fn block_if_absent_within(
        &self,
        net: IpNet,
        duration: Duration,
        reason: String,
        created_by: String,
        now: Timestamp,
        max_blocks: usize,
    ) -> Option<Block> {
        let mut state = self.state.lock();
        // The snapshot is published under the state lock: it is the state's.
        if self
            .snapshot
            .load()
            .block_covering(net, now.as_nanos())
            .is_some()
        {
            return None;
        }
        if state.blocks.len() >= max_blocks {
            self.automatic_refused.fetch_add(1, Ordering::Relaxed);
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
        let removed = self.state.lock().blocks.contains_key(&net);
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

    /// Up to `size` blocks active at `now` whose network sorts after `after`, in network order
    /// (stable while blocks come and go, so pages neither repeat nor skip one that stays); and
    /// the network to continue after, when more follow.
    pub fn blocks_page_at(
        &self,
        now: Timestamp,
        after: Option<IpNet>,
        size: usize,
    ) -> (Vec<Block>, Option<IpNet>) {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let state = self.state.lock();
        let mut active = state
            .blocks
            .range((from, Bound::Unbounded))
            .map(|(_, b)| b)
            .filter(|b| b.active_at(now.as_nanos()));
        let page: Vec<Block> = active.by_ref().take(size).cloned().collect();
        let next = active.next().and(page.last()).map(|b| b.net);
        (page, next)
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
        let removed = self.state.lock().allowed.contains_key(&net);
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
        let blocks: BTreeMap<IpNet, Block> = blocks.into_iter().map(|b| (b.net, b)).collect();
        let allowed: BTreeMap<IpNet, AllowEntry> =
            allowed.into_iter().map(|a| (a.net, a)).collect();
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
            .map(|n| config_entry(*n))
            .collect();
        out.extend(self.state.lock().allowed.values().cloned());
        out
    }

    /// Up to `size` allowlist entries (config and runtime) whose [`AllowEntry::key`] sorts after
    /// `after`, in that order; and the key to continue after, when more follow.
    pub fn allowed_page(
        &self,
        after: Option<(IpNet, AllowSource)>,
        size: usize,
    ) -> (Vec<AllowEntry>, Option<(IpNet, AllowSource)>) {
        let later = |key: (IpNet, AllowSource)| after.is_none_or(|a| key > a);
        let mut page: Vec<AllowEntry> = self
            .config_allowed
            .lock()
            .iter()
            .filter(|n| later((**n, AllowSource::Config)))
            .map(|n| config_entry(*n))
            .collect();
        // A runtime entry of the cursor's network sorts after its config entry.
        let from = match after {
            None => Bound::Unbounded,
            Some((net, AllowSource::Config)) => Bound::Included(net),
            Some((net, AllowSource::Runtime)) => Bound::Excluded(net),
        };
        page.extend(
            self.state
                .lock()
                .allowed
                .range((from, Bound::Unbounded))
                .map(|(_, a)| a.clone())
                .take(size.saturating_add(1)),
        );
        page.sort_by_key(AllowEntry::key);
        page.dedup_by_key(|a| a.key());
        let next = (page.len() > size)
            .then(|| page.get(size.wrapping_sub(1)).map(AllowEntry::key))
            .flatten();
        page.truncate(size);
        (page, next)
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
    /// A failure is counted ([`SyncErrors::file`]); the caller reports it.
    pub fn persist(&self) -> Result<(), AccessError> {
        let written = self.persist_within(MAX_STATE_FILE_BYTES);
        if written.is_err() {
            self.sync_errors.file.fetch_add(1, Ordering::Relaxed);
        }
        written
    }

    /// [`Self::persist`], refusing a state of more than `max` bytes.
    fn persist_within(&self, max: usize) -> Result<(), AccessError> {
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
        if json.len() > max {
            return Err(AccessError::TooLarge {
                path: path.display().to_string(),
                bytes: json.len(),
            });
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        let written = f
            .write_all(&json)
            .and_then(|()| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            // A half-written temporary file would hold space a full disk lacks.
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
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
        for net in config_allowed.iter().chain(state.allowed.keys()) {
            snap.allow.insert(*net, ());
        }
        for b in state.blocks.values() {
            snap.block.insert(b.net, b.expires_at.unwrap_or(u64::MAX));
        }
        snap.allow.summarise();
        snap.block.summarise();
        let empty = snap.allow.is_empty() && snap.block.is_empty();
        self.snapshot.store(std::sync::Arc::new(snap));
        self.empty.store(empty, Ordering::Release);
        self.version.fetch_add(1, Ordering::Release);
    }

    /// Changes so far of the blocks and allowlist the request path reads (any number; it only
    /// grows). Blocks that expire do not change it.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
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
        // Admin input is refused past these; what sluice writes itself is cut to them.
        reason: clamp(reason, MAX_REASON_BYTES),
        created_by: clamp(created_by, MAX_CREATED_BY_BYTES),
    }
}

/// The allowlist entry of a config file network.
fn config_entry(net: IpNet) -> AllowEntry {
    AllowEntry {
        net,
        source: AllowSource::Config,
        created_at: 0,
        reason: "config file".to_string(),
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
    fn ipv4_mapped_networks_are_stored_as_ipv4() {
        for (input, stored) in [
            ("::ffff:192.0.2.7", "192.0.2.7/32"),
            ("::FFFF:192.0.2.7", "192.0.2.7/32"),
            ("::ffff:c000:207", "192.0.2.7/32"),
            ("0:0:0:0:0:ffff:192.0.2.7/128", "192.0.2.7/32"),
            ("::ffff:192.0.2.0/120", "192.0.2.0/24"),
            ("::ffff:192.0.2.9/120", "192.0.2.0/24"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
            // Wider than the mapped range, or outside it: IPv6 as written.
            ("::ffff:0:0/95", "::fffe:0:0/95"),
            ("::/0", "::/0"),
            ("::192.0.2.7", "::c000:207/128"),
            ("2001:db8::ffff:192.0.2.7", "2001:db8::ffff:c000:207/128"),
            ("192.0.2.7", "192.0.2.7/32"),
        ] {
            assert_eq!(parse_net(input).unwrap().to_string(), stored, "{input}");
        }
    }

    #[test]
    fn mapped_client_addresses_read_as_ipv4_and_others_as_they_are() {
        let canon = |v: &str| canonical_address(v).map(Cow::into_owned);
        assert_eq!(canon("::ffff:192.0.2.7").as_deref(), Some("192.0.2.7"));
        assert!(matches!(
            canonical_address("::ffff:192.0.2.7"),
            Some(Cow::Borrowed("192.0.2.7"))
        ));
        assert_eq!(canon("::FFFF:10.0.0.1").as_deref(), Some("10.0.0.1"));
        assert_eq!(canon("::ffff:c000:207").as_deref(), Some("192.0.2.7"));
        assert_eq!(
            canon("0000:0000:0000:0000:0000:ffff:0a00:0001").as_deref(),
            Some("10.0.0.1")
        );
        for as_is in [
            "192.0.2.7",
            "2001:db8::1",
            "2001:db8::ffff:1",
            "::192.0.2.7",
            "::ffff",
            "fe80::ffff:1.2.3.4%eth0",
            " ::ffff:192.0.2.7",
            "not-an-ip",
            "",
        ] {
            assert_eq!(canonical_address(as_is), None, "{as_is:?}");
        }
    }

    #[test]
    fn either_spelling_of_an_ipv4_client_matches_either_spelling_of_an_entry() {
        let l = AccessList::empty();
        l.block(net("192.0.2.7"), None, "r".into(), "a".into(), t(1));
        l.block(
            net("::ffff:198.51.100.0/120"),
            None,
            "r".into(),
            "a".into(),
            t(1),
        );
        l.allow(net("::ffff:203.0.113.9"), "ops".into(), t(1));
        l.allow(net("10.0.0.0/8"), "ops".into(), t(1));
        for client in [
            "192.0.2.7",
            "::ffff:192.0.2.7",
            "198.51.100.200",
            "::ffff:198.51.100.200",
            "::ffff:c633:64c8",
        ] {
            assert!(
                matches!(l.check_at(client, t(2)), Access::Blocked { .. }),
                "{client}"
            );
        }
        for client in ["203.0.113.9", "::ffff:203.0.113.9", "::ffff:10.1.2.3"] {
            assert_eq!(l.check_at(client, t(2)), Access::Allowed, "{client}");
        }
        assert_eq!(l.check_at("::ffff:192.0.2.8", t(2)), Access::Normal);
        assert_eq!(l.check_at("2001:db8::c000:207", t(2)), Access::Normal);
        // One entry per network, whichever spelling made it.
        assert!(l.unblock(net("::ffff:192.0.2.7")));
        assert_eq!(l.check_at("192.0.2.7", t(2)), Access::Normal);
        assert!(l.disallow(net("::ffff:10.0.0.0/104")));
        assert_eq!(l.check_at("10.1.2.3", t(2)), Access::Normal);
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
    fn an_expired_block_hides_no_other_and_the_most_specific_answers() {
        let l = AccessList::empty();
        let d = |s| Some(Duration::from_secs(s));
        l.block(net("10.0.0.0/8"), d(600), "r".into(), "a".into(), t(0));
        l.block(net("10.1.0.0/16"), d(60), "r".into(), "a".into(), t(0));
        l.block(net("10.1.2.3"), None, "r".into(), "a".into(), t(0));
        let blocked = |ip, at| match l.check_at(ip, t(at)) {
            Access::Blocked {
                permanent,
                remaining,
            } => Some((permanent, remaining / S)),
            _ => None,
        };
        assert_eq!(blocked("10.1.2.3", 10), Some((true, 0)));
        assert_eq!(blocked("10.1.2.4", 10), Some((false, 50)));
        assert_eq!(blocked("10.1.2.4", 60), Some((false, 540)), "the /16 ended");
        assert_eq!(blocked("10.2.0.1", 10), Some((false, 590)));
        assert_eq!(blocked("10.2.0.1", 600), None);
        assert_eq!(blocked("10.1.2.3", 600), Some((true, 0)));
        // An automatic block inside a network already blocked is not made.
        let auto = |ip, at| {
            l.block_if_absent(
                net(ip),
                Duration::from_secs(60),
                "r".into(),
                "auto".into(),
                t(at),
            )
        };
        assert!(auto("10.9.9.9", 10).is_none());
        assert!(auto("10.9.9.9", 600).is_some(), "the /8 ended");
        assert!(
            auto("10.1.2.3", 700).is_none(),
            "the permanent one covers it"
        );
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
    fn an_oversize_state_file_or_entry_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        // Sparse: no 64 MiB written, but that many bytes to read.
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(MAX_STATE_FILE_BYTES as u64 + 1).unwrap();
        let err = AccessList::open(Some(path.clone()), vec![]).unwrap_err();
        assert!(
            err.to_string()
                .contains("more than the 67108864 a state file may hold"),
            "{err}"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            MAX_STATE_FILE_BYTES as u64 + 1,
            "left untouched"
        );

        let entry = |field: &str, len: usize| {
            let block = serde_json::json!({
                "net": "192.0.2.7/32", "permanent": true, "created_at": 1, "expires_at": null,
                "reason": "r", "created_by": "admin",
            });
            let mut long = block.clone();
            long[field] = serde_json::Value::String("é".repeat(len / 2));
            serde_json::json!({"version": 1, "blocks": [block, long], "allowed": []})
        };
        for (field, len, ok) in [
            ("reason", 1024, true),
            ("reason", 1026, false),
            ("created_by", 1024, true),
            ("created_by", 3_500_000, false),
        ] {
            let text = entry(field, len).to_string();
            std::fs::write(&path, &text).unwrap();
            match AccessList::open(Some(path.clone()), vec![]) {
                Ok(_) => assert!(ok, "{field} of {len} bytes loaded"),
                Err(e) => {
                    assert!(!ok, "{field} of {len} bytes: {e}");
                    assert!(
                        e.to_string().contains(&format!(
                            "blocks[1].{field}: {len} bytes, at most 1024 allowed"
                        )),
                        "{e}"
                    );
                    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
                }
            }
        }
    }

    #[test]
    fn a_state_file_that_cannot_be_written_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let l = AccessList::open(Some(dir.path().join("gone/state.json")), vec![]).unwrap();
        l.block(net("192.0.2.1"), None, "r".into(), "a".into(), t(1));
        assert!(l.persist().is_err());
        assert!(l.persist().is_err());
        let counts = l.sync_errors().counts();
        assert_eq!(
            counts,
            [("decode", 0), ("encode", 0), ("redis", 0), ("file", 2)]
        );
    }

    #[test]
    fn a_state_too_large_to_load_again_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let l = AccessList::open(Some(path.clone()), vec![]).unwrap();
        l.block(net("192.0.2.1"), None, "r".into(), "a".into(), t(1));
        l.persist_within(1000).unwrap();
        let before = std::fs::read(&path).unwrap();
        l.block(net("192.0.2.2"), None, "x".repeat(1000), "a".into(), t(1));
        let err = l.persist_within(1000).unwrap_err();
        assert!(matches!(err, AccessError::TooLarge { .. }), "{err}");
        assert!(
            err.to_string().contains("the previous file is kept"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn what_sluice_writes_itself_is_cut_to_the_bounds() {
        let l = AccessList::empty();
        let by = format!("auto-block {}", "ü".repeat(600));
        let b = l
            .block_if_absent(
                net("192.0.2.1"),
                Duration::from_secs(1),
                "r".repeat(2000),
                by,
                t(1),
            )
            .unwrap();
        assert_eq!(b.reason.len(), MAX_REASON_BYTES);
        assert_eq!(
            b.created_by.len(),
            MAX_CREATED_BY_BYTES - 1,
            "on a character boundary"
        );
        assert!(b.check().is_ok());
    }

    #[test]
    fn pages_follow_network_order_and_continue_after_their_last_entry() {
        let l = AccessList::empty();
        l.set_config_allowed(vec![net("10.0.0.0/8"), net("2001:db8::/32")]);
        for ip in ["10.0.0.0/8", "9.9.9.9", "192.0.2.0/24"] {
            l.allow(net(ip), "ops".into(), t(1));
        }
        let (page, next) = l.allowed_page(None, 2);
        let keys = |p: &[AllowEntry]| {
            p.iter()
                .map(|a| (a.net.to_string(), a.source))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            keys(&page),
            [
                ("9.9.9.9/32".to_string(), AllowSource::Runtime),
                ("10.0.0.0/8".to_string(), AllowSource::Config)
            ]
        );
        let (page, next) = l.allowed_page(next, 2);
        assert_eq!(
            keys(&page),
            [
                ("10.0.0.0/8".to_string(), AllowSource::Runtime),
                ("192.0.2.0/24".to_string(), AllowSource::Runtime)
            ]
        );
        let (page, next) = l.allowed_page(next, 2);
        assert_eq!(
            keys(&page),
            [("2001:db8::/32".to_string(), AllowSource::Config)]
        );
        assert_eq!(next, None);

        let d = Some(Duration::from_secs(10));
        for ip in ["192.0.2.3", "192.0.2.1", "10.0.0.0/8", "192.0.2.2"] {
            l.block(net(ip), d, "r".into(), "a".into(), t(1));
        }
        l.block(
            net("10.1.0.0/16"),
            Some(Duration::from_secs(1)),
            "r".into(),
            "a".into(),
            t(1),
        );
        let nets = |p: &[Block]| p.iter().map(|b| b.net.to_string()).collect::<Vec<_>>();
        let (page, next) = l.blocks_page_at(t(5), None, 2);
        assert_eq!(
            nets(&page),
            ["10.0.0.0/8", "192.0.2.1/32"],
            "the expired /16 skipped"
        );
        assert_eq!(next, Some(net("192.0.2.1")));
        let (page, next) = l.blocks_page_at(t(5), next, 2);
        assert_eq!(nets(&page), ["192.0.2.2/32", "192.0.2.3/32"]);
        assert_eq!(next, None, "nothing follows: no empty last page");
        let (page, next) = l.blocks_page_at(t(5), Some(net("192.0.2.3")), 2);
        assert!(page.is_empty() && next.is_none());
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

    #[test]
    fn automatic_blocks_stop_at_the_bound_and_are_counted() {
        let l = AccessList::empty();
        let auto = |ip: &str| {
            l.block_if_absent_within(
                net(ip),
                Duration::from_secs(60),
                "r".into(),
                "a".into(),
                t(1),
                2,
            )
        };
        assert!(auto("192.0.2.1").is_some());
        assert!(auto("192.0.2.1").is_none(), "already blocked: not refused");
        assert!(auto("192.0.2.2").is_some());
        assert_eq!(l.automatic_blocks_refused(), 0);
        assert!(auto("192.0.2.3").is_none());
        assert_eq!(l.automatic_blocks_refused(), 1);
        assert_eq!(l.check_at("192.0.2.3", t(2)), Access::Normal);
        // An operator's block is still made.
        l.block(net("192.0.2.4"), None, "r".into(), "admin".into(), t(1));
        assert_eq!(l.blocks_at(t(2)).len(), 3);
    }
}
