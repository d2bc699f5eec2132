//! The Redis store: counters shared by every sluice replica, in one Redis or a Redis Cluster.
//!
//! Each [`Store::apply`] is one `EVALSHA` of `redis/apply.lua`, which evaluates every charge of
//! the batch with the algorithms of [`crate::algorithms`] (transcribed to Lua) and the
//! same all-or-nothing rule as the memory store, then writes the new states with TTLs. Redis runs
//! a script without interleaving other commands, so a batch is atomic across replicas. The script
//! computes in whole milliseconds for windows and in nanoseconds relative to `now` for token
//! buckets, because Lua numbers are doubles; the header of `apply.lua` gives the exact bounds.
//!
//! Keys are `sluice:{<high 64 bits>}:<low 64 bits>` in hex. The high half of a
//! [`CounterKey`] is the client-identity group, so the braces (a Redis Cluster hash tag) put one
//! client's counters in one slot. On a cluster a batch is split by slot, one script per slot,
//! run concurrently: each is atomic in its slot; if one slot refuses the request, the slots that
//! committed are given their hits back by a second script (`Hits::Return`). Between the two, a
//! concurrent request can see those hits (and be refused for them); see the README.
//!
//! Time comes from one place: Redis's `TIME` inside the script (default: replicas with skewed
//! clocks agree) or the caller's `now` ([`TimeSource::Caller`], which tests use to step a manual
//! clock).
//!
//! Every call runs under a deadline; a timeout or a connection error is a [`StoreError`], which
//! the limiter answers with its failure policy. The connection manager reconnects by itself, so
//! service resumes when Redis is back. A small local cache of keys known to be over their limit
//! answers repeat offenders without a round trip until their reset time.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use parking_lot::Mutex;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{RedisError, Script, ScriptInvocation, TlsCertificates};
use smallvec::SmallVec;

use super::{Charge, ChargeKind, CounterKey, Store, StoreError, Tally, Verdict};
use crate::algorithms::{Hits, Policy};
use crate::clock::Timestamp;

/// Largest batch sent in one script call (the memory store's bound too).
pub const MAX_BATCH: usize = super::memory::MAX_BATCH;

/// Longest window the script counts exactly: 2^35 ms (about 397 days). Longer windows are
/// counted as this long (see `apply.lua` for why).
pub const MAX_WINDOW_MS: u64 = 1 << 35;

/// Keys of the over-limit cache at most; beyond it, new denials are not cached.
pub const OVER_LIMIT_CACHE_KEYS: usize = 100_000;

/// Which Redis to use. Its `Debug` hides passwords.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisNodes {
    /// One server (or a primary behind a failover proxy): `redis://[:password@]host:port[/db]`
    /// or `rediss://` for TLS.
    Single(String),
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
}

impl std::fmt::Debug for RedisNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisNodes::Single(u) => f.debug_tuple("Single").field(&redact(u)).finish(),
            RedisNodes::Cluster(us) => f
                .debug_tuple("Cluster")
                .field(&us.iter().map(|u| redact(u)).collect::<Vec<_>>())
                .finish(),
        }
    }
}

/// `redis://user:secret@host` -> `redis://***@host`, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Where the script's `now` comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeSource {
    /// Redis's `TIME`, read inside the script: one clock for every replica.
    #[default]
    Redis,
    /// The `now` the caller passes to [`Store::apply`] (the limiter's clock).
    Caller,
}

/// Settings of a [`RedisStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// The server or cluster.
    pub nodes: RedisNodes,
    /// Deadline of every call (default 50 ms).
    pub timeout: Duration,
    /// Where time comes from.
    pub time: TimeSource,
    /// A PEM file of CA certificates to trust for `rediss://` instead of the system roots.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Answer repeat requests of keys known to be over their limit locally (default on).
    pub over_limit_cache: bool,
}

impl RedisOptions {
    /// Default deadline of a Redis call.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);

    /// Options for `nodes` with every default.
    pub fn new(nodes: RedisNodes) -> Self {
        Self {
            nodes,
            timeout: Self::DEFAULT_TIMEOUT,
            time: TimeSource::Redis,
            tls_ca_file: None,
            over_limit_cache: true,
        }
    }
}

/// A connection to a single server or to a cluster. Both reconnect by themselves.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<ClusterConn>),
}

/// A cluster connection made on first use, so sluice starts (and applies its failure policy)
/// while the cluster is down, and retried at most once per [`ClusterConn::RETRY`].
struct ClusterConn {
    client: ClusterClient,
    conn: tokio::sync::OnceCell<ClusterConnection>,
    last_failure: Mutex<Option<Instant>>,
}

impl ClusterConn {
    const RETRY: Duration = Duration::from_millis(250);

    async fn get(&self) -> Result<ClusterConnection, StoreError> {
        if let Some(c) = self.conn.get() {
            return Ok(c.clone());
        }
        if self
            .last_failure
            .lock()
            .is_some_and(|t| t.elapsed() < Self::RETRY)
        {
            return Err(StoreError::Unavailable(
                "cluster unreachable (retrying)".into(),
            ));
        }
        match self
            .conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
        {
            Ok(c) => Ok(c.clone()),
            Err(e) => {
                *self.last_failure.lock() = Some(Instant::now());
                Err(unavailable(e))
            }
        }
    }
}

fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A cheap, cloneable handle for running commands and scripts under the store's deadline; the
/// access-list replication ([`super::redis_sync`]) uses it too.
#[derive(Clone)]
pub struct RedisHandle {
    conn: Conn,
    timeout: Duration,
}

impl std::fmt::Debug for RedisHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisHandle")
            .field("cluster", &matches!(self.conn, Conn::Cluster(_)))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisHandle {
    /// Connects (lazily: nothing is sent until the first call, so a Redis that is down at
    /// start-up only means failed calls until it is up).
    pub fn connect(options: &RedisOptions) -> Result<Self, StoreError> {
        let certs = match &options.tls_ca_file {
            Some(path) => Some(TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(path).map_err(|e| {
                    StoreError::Unavailable(format!("reading {}: {e}", path.display()))
                })?),
            }),
            None => None,
        };
        // Connecting may take longer than one call's deadline (TLS); calls give up on their
        // own deadline meanwhile.
        let connect_timeout = options.timeout.max(Duration::from_secs(1));
        let conn = match &options.nodes {
            RedisNodes::Single(url) => {
                let client = match certs {
                    Some(c) => redis::Client::build_with_tls(url.as_str(), c),
                    None => redis::Client::open(url.as_str()),
                }
                .map_err(unavailable)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(None)
                    .set_min_delay(Duration::from_millis(10))
                    .set_max_delay(Duration::from_millis(500))
                    .set_number_of_retries(2);
                Conn::Single(
                    client
                        .get_connection_manager_lazy(config)
                        .map_err(unavailable)?,
                )
            }
            RedisNodes::Cluster(nodes) => {
                let mut builder = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                    .connection_timeout(connect_timeout)
                    .response_timeout(connect_timeout)
                    .retries(2)
                    .min_retry_wait(10)
                    .max_retry_wait(200);
                if let Some(c) = certs {
                    builder = builder.certs(c);
                }
                Conn::Cluster(Arc::new(ClusterConn {
                    client: builder.build().map_err(unavailable)?,
                    conn: tokio::sync::OnceCell::new(),
                    last_failure: Mutex::new(None),
                }))
            }
        };
        Ok(Self {
            conn,
            timeout: options.timeout,
        })
    }

    /// Whether this is a cluster (batches are split by slot).
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// The deadline of one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `f` on the connection under the deadline.
    async fn with_conn<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        match tokio::time::timeout(self.timeout, f(self.conn.clone())).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// Runs a script invocation (EVALSHA, loading the script on NOSCRIPT, as after a Redis
    /// restart) under the deadline.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.with_conn(|conn| async move {
            match conn {
                Conn::Single(mut c) => invoke_on(invocation, &mut c).await,
                Conn::Cluster(cc) => {
                    let mut c = cc.get().await?;
                    invoke_on(invocation, &mut c).await
                }
            }
        })
        .await
    }

    /// Runs one command under the deadline.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        self.with_conn(|conn| async move {
            match conn {
                Conn::Single(mut c) => cmd.query_async(&mut c).await.map_err(unavailable),
                Conn::Cluster(cc) => {
                    let mut c = cc.get().await?;
                    cmd.query_async(&mut c).await.map_err(unavailable)
                }
            }
        })
        .await
    }
}

impl RedisHandle {
    /// Runs a pipeline (not a transaction) under the deadline.
    pub async fn pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        self.with_conn(|conn| async move {
            match conn {
                Conn::Single(mut c) => pipe.query_async(&mut c).await.map_err(unavailable),
                Conn::Cluster(cc) => {
                    let mut c = cc.get().await?;
                    pipe.query_async(&mut c).await.map_err(unavailable)
                }
            }
        })
        .await
    }
}

async fn invoke_on<T: redis::FromRedisValue>(
    invocation: &ScriptInvocation<'_>,
    conn: &mut impl ConnectionLike,
) -> Result<T, StoreError> {
    invocation.invoke_async(conn).await.map_err(unavailable)
}

/// Counters in Redis. See the module docs.
pub struct RedisStore {
    handle: RedisHandle,
    script: Script,
    time: TimeSource,
    over: OverLimitCache,
    tracked: Arc<AtomicUsize>,
    compensation_failures: LogEvery,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("handle", &self.handle)
            .field("time", &self.time)
            .finish_non_exhaustive()
    }
}

/// The script, compiled into the binary so every replica runs the same one.
const APPLY_LUA: &str = include_str!("redis/apply.lua");

/// A key's name in Redis: the client group in braces (the cluster hash tag), then the rest.
pub fn key_name(key: CounterKey) -> String {
    format!(
        "sluice:{{{:016x}}}:{:016x}",
        (key.0 >> 64) as u64,
        key.0 as u64
    )
}

/// The Redis Cluster slot of a key of ours: CRC16 of its hash tag, modulo 16384.
pub fn slot_of(key: CounterKey) -> u16 {
    crc16(format!("{:016x}", (key.0 >> 64) as u64).as_bytes()) % 16384
}

/// CRC16-CCITT (XMODEM), the checksum Redis Cluster maps keys to slots with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A charge as the script reads it: (algorithm, limit, span, hits kind, hits, charge kind).
fn script_args(charge: &Charge<'_>) -> [u64; 6] {
    let (algo, limit, span) = match *charge.policy {
        Policy::SlidingWindow { limit, window } => (0, limit, window_ms(window.get())),
        Policy::FixedWindow { limit, window } => (1, limit, window_ms(window.get())),
        Policy::TokenBucket { capacity, interval } => (2, capacity, interval.get()),
    };
    // Doubles hold integers exactly below 2^53; anything larger is "more than any limit".
    let cap = |v: u64| v.min(1 << 53);
    let (take, hits) = match charge.hits {
        Hits::Take(h) => (0, h),
        Hits::Return(h) => (1, h),
    };
    let kind = match charge.kind {
        ChargeKind::Observe => 0,
        ChargeKind::Shadow => 1,
        ChargeKind::Enforce => 2,
    };
    [algo, cap(limit), cap(span), take, cap(hits), kind]
}

/// A window in whole milliseconds: rounded up (config windows are whole seconds anyway), and at
/// most [`MAX_WINDOW_MS`].
fn window_ms(nanos: u64) -> u64 {
    nanos.div_ceil(1_000_000).clamp(1, MAX_WINDOW_MS)
}

/// Charges of one slot to give back: their indexes in the batch, and the `Return` charges.
type GiveBack<'a> = (SmallVec<[usize; 8]>, SmallVec<[Charge<'a>; 8]>);

/// What one script call answered.
struct Answer {
    committed: bool,
    verdicts: SmallVec<[Verdict; 8]>,
}

fn parse_answer(raw: &[i64], n: usize) -> Result<Answer, StoreError> {
    if raw.len() != 1 + 4 * n {
        return Err(StoreError::Unavailable(format!(
            "unexpected script answer of {} values for {n} charges",
            raw.len()
        )));
    }
    let num = |v: i64| u64::try_from(v).unwrap_or(0);
    let verdicts = raw[1..]
        .chunks_exact(4)
        .map(|c| Verdict {
            allowed: c[0] == 1,
            remaining: num(c[1]),
            reset_after: num(c[2])
                .saturating_mul(1_000_000)
                .saturating_add(num(c[3])),
        })
        .collect();
    Ok(Answer {
        committed: raw[0] == 1,
        verdicts,
    })
}

impl RedisStore {
    /// A store over `options` (connects lazily; see [`RedisHandle::connect`]).
    pub fn connect(options: &RedisOptions) -> Result<Self, StoreError> {
        Ok(Self {
            handle: RedisHandle::connect(options)?,
            script: Script::new(APPLY_LUA),
            time: options.time,
            over: OverLimitCache {
                enabled: options.over_limit_cache,
                ..OverLimitCache::default()
            },
            tracked: Arc::new(AtomicUsize::new(0)),
            compensation_failures: LogEvery::default(),
        })
    }

    /// The connection handle (for access-list replication).
    pub fn handle(&self) -> &RedisHandle {
        &self.handle
    }

    /// Runs the script over `charges` (all in one slot on a cluster).
    async fn run(&self, charges: &[&Charge<'_>], now: Timestamp) -> Result<Answer, StoreError> {
        let mut inv = self.script.prepare_invoke();
        match self.time {
            TimeSource::Redis => {
                inv.arg("").arg(0);
            }
            TimeSource::Caller => {
                let ns = now.as_nanos();
                inv.arg(ns / 1_000_000).arg(ns % 1_000_000);
            }
        }
        for c in charges {
            inv.key(key_name(c.key));
            for a in script_args(c) {
                inv.arg(a);
            }
        }
        let raw: Vec<i64> = self.handle.invoke(&inv).await?;
        parse_answer(&raw, charges.len())
    }

    /// Applies a batch that spans several cluster slots: one script per slot, then, if any slot
    /// refused, hits given back where they were charged.
    async fn apply_by_slot(
        &self,
        charges: &[Charge<'_>],
        verdicts: &mut [Verdict],
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let mut groups: SmallVec<[(u16, SmallVec<[usize; 8]>); 4]> = SmallVec::new();
        for (i, c) in charges.iter().enumerate() {
            let slot = slot_of(c.key);
            match groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, members)) => members.push(i),
                None => groups.push((slot, SmallVec::from_slice(&[i]))),
            }
        }
        let calls = groups.iter().map(|(_, members)| {
            let group: SmallVec<[&Charge<'_>; 8]> = members.iter().map(|&i| &charges[i]).collect();
            async move { self.run(&group, now).await }
        });
        let answers = futures_util::future::join_all(calls).await;
        let mut committed = true;
        let mut local: SmallVec<[bool; 4]> = SmallVec::new();
        for ((_, members), answer) in groups.iter().zip(answers) {
            let answer = answer?;
            committed &= answer.committed;
            local.push(answer.committed);
            for (&i, v) in members.iter().zip(answer.verdicts) {
                verdicts[i] = v;
            }
        }
        if committed {
            return Ok(true);
        }
        // Give back what the slots that committed charged, except observations (which count
        // whatever the decision). The answer is what each limit has left without this request.
        let mut backs: SmallVec<[GiveBack<'_>; 4]> = SmallVec::new();
        for ((_, members), ok) in groups.iter().zip(local) {
            if !ok {
                continue;
            }
            let (idx, back): (SmallVec<[usize; 8]>, SmallVec<[Charge<'_>; 8]>) = members
                .iter()
                .filter_map(|&i| {
                    let c = &charges[i];
                    match c.hits {
                        Hits::Take(h) if h > 0 && c.kind != ChargeKind::Observe => Some((
                            i,
                            Charge {
                                hits: Hits::Return(h),
                                kind: ChargeKind::Observe,
                                ..*c
                            },
                        )),
                        _ => None,
                    }
                })
                .unzip();
            if !idx.is_empty() {
                backs.push((idx, back));
            }
        }
        let calls = backs.iter().map(|(_, back)| {
            let group: SmallVec<[&Charge<'_>; 8]> = back.iter().collect();
            async move { self.run(&group, now).await }
        });
        let answers = futures_util::future::join_all(calls).await;
        for ((idx, _), answer) in backs.iter().zip(answers) {
            match answer {
                Ok(a) => {
                    for (&i, v) in idx.iter().zip(a.verdicts) {
                        verdicts[i].remaining = v.remaining;
                        verdicts[i].reset_after = v.reset_after;
                    }
                }
                Err(e) => {
                    // The request is refused either way; the hits stay charged until the
                    // window moves on. Logged, not failed.
                    if let Some(n) = self.compensation_failures.due() {
                        tracing::warn!(error = %e, failures = n, "could not give back the hits of a refused cross-slot request");
                    }
                }
            }
        }
        Ok(false)
    }
}

impl Store for RedisStore {
    async fn apply(
        &self,
        charges: &[Charge<'_>],
        verdicts: &mut [Verdict],
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        if charges.len() > MAX_BATCH {
            return Err(StoreError::BatchTooLarge(charges.len()));
        }
        if self.over.answer(charges, verdicts, now) {
            return Ok(false);
        }
        let cross_slot = self.handle.is_cluster()
            && charges.split_first().is_some_and(|(first, rest)| {
                rest.iter().any(|c| slot_of(c.key) != slot_of(first.key))
            });
        let committed = if cross_slot {
            self.apply_by_slot(charges, verdicts, now).await?
        } else {
            let all: SmallVec<[&Charge<'_>; 8]> = charges.iter().collect();
            let answer = self.run(&all, now).await?;
            for (v, a) in verdicts.iter_mut().zip(answer.verdicts) {
                *v = a;
            }
            answer.committed
        };
        self.over.remember(charges, verdicts, now);
        Ok(committed)
    }

    /// The reference's pipeline: `INCRBY` and `EXPIRE` per counter (`GET` for a read), in its
    /// key names when the tally carries one, else in sluice's with the window's start appended.
    /// Counted in the caller's windows (the names hold them), whatever [`TimeSource`] says.
    async fn tally(
        &self,
        tallies: &[Tally<'_>],
        counts: &mut [u64],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        if tallies.is_empty() {
            return Ok(());
        }
        let secs = now.as_nanos() / 1_000_000_000;
        let mut pipe = redis::pipe();
        for t in tallies {
            let name = if t.name.is_empty() {
                let w = t.window_secs.max(1);
                format!("{}:{}", key_name(t.key), secs / w * w)
            } else {
                t.name.to_string()
            };
            match t.hits {
                None => {
                    pipe.cmd("GET").arg(&name);
                }
                Some(h) => {
                    let jitter = match t.ttl_jitter_secs {
                        0 => 0,
                        j => rand::random::<u64>() % j,
                    };
                    pipe.cmd("INCRBY").arg(&name).arg(h);
                    pipe.cmd("EXPIRE")
                        .arg(&name)
                        .arg(t.window_secs.max(1) + jitter)
                        .ignore();
                }
            }
        }
        let values: Vec<Option<u64>> = self.handle.pipeline(&pipe).await?;
        for (c, v) in counts.iter_mut().zip(values) {
            *c = v.unwrap_or(0);
        }
        Ok(())
    }

    async fn forget(&self, keys: &[CounterKey]) -> Result<(), StoreError> {
        for k in keys {
            self.over.map.remove(&k.0);
        }
        if keys.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("DEL");
        for &k in keys {
            cmd.arg(key_name(k));
        }
        self.handle.query::<i64>(&cmd).await.map(|_| ())
    }

    /// The key count of the Redis database (or the sum over the cluster's primaries) at the last
    /// sweep: approximate, and it includes sluice's few access-list keys.
    fn tracked_keys(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }

    fn cache_hits(&self) -> u64 {
        self.over.hits.load(Ordering::Relaxed)
    }

    fn cache_full(&self) -> u64 {
        self.over.full.load(Ordering::Relaxed)
    }

    fn deadline(&self) -> Option<Duration> {
        Some(self.handle.timeout())
    }

    fn redis(&self) -> Option<&RedisStore> {
        Some(self)
    }

    /// Redis expires counters itself (TTLs); this drops expired entries of the local over-limit
    /// cache and refreshes [`Store::tracked_keys`] in the background. Returns 0.
    fn sweep_expired_at(&self, now: Timestamp) -> usize {
        self.over.sweep_at(now);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let handle = self.handle.clone();
            let tracked = self.tracked.clone();
            rt.spawn(async move {
                if let Ok(n) = handle.query::<u64>(&redis::cmd("DBSIZE")).await {
                    tracked.store(usize::try_from(n).unwrap_or(usize::MAX), Ordering::Relaxed);
                }
            });
        }
        0
    }
}

/// Keys known to be over their limit for one more hit, until when (the caller's clock), with
/// the policy they were judged by (a reload that changes the limit stops using the entry).
#[derive(Default)]
struct OverLimitCache {
    enabled: bool,
    map: DashMap<u128, Over>,
    hits: AtomicU64,
    /// Refusals not cached because the cache held [`OVER_LIMIT_CACHE_KEYS`].
    full: AtomicU64,
}

#[derive(Clone, Copy)]
struct Over {
    until: u64,
    policy: Policy,
}

impl OverLimitCache {
    /// Answers a batch that an enforced single hit on a cached key would refuse, without Redis;
    /// `false` when Redis must be asked. Batches with observed charges (automatic-block
    /// counters) always go to Redis, since those count whatever the decision.
    ///
    /// What it reports: the cached limits are refused with 0 remaining and their exact time
    /// left; the batch's other limits were not looked up, so they report 0 remaining and the
    /// same time to wait: true for this request, which is refused and may retry only then.
    fn answer(&self, charges: &[Charge<'_>], verdicts: &mut [Verdict], now: Timestamp) -> bool {
        if self.map.is_empty() || charges.iter().any(|c| c.kind == ChargeKind::Observe) {
            return false;
        }
        let now = now.as_nanos();
        let mut wait = 0;
        for (c, v) in charges.iter().zip(verdicts.iter_mut()) {
            *v = Verdict {
                allowed: true,
                remaining: 0,
                reset_after: 0,
            };
            if c.kind != ChargeKind::Enforce || c.hits != Hits::Take(1) {
                continue;
            }
            if let Some(o) = self.map.get(&c.key.0)
                && o.until > now
                && o.policy == *c.policy
            {
                v.allowed = false;
                v.reset_after = o.until - now;
                wait = wait.max(v.reset_after);
            }
        }
        if wait == 0 {
            return false;
        }
        for v in verdicts.iter_mut().filter(|v| v.allowed) {
            v.reset_after = wait;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Drops the entries that have run out at `now`. A `retain` would hold each map shard's
    /// write lock for its whole walk, and decisions read the cache under that lock; here the
    /// walk takes read locks, and each entry goes under its own short write lock.
    fn sweep_at(&self, now: Timestamp) {
        let now = now.as_nanos();
        let ended: Vec<u128> = self
            .map
            .iter()
            .filter(|e| e.value().until <= now)
            .map(|e| *e.key())
            .collect();
        for k in ended {
            self.map.remove_if(&k, |_, o| o.until <= now);
        }
    }

    /// Caches enforced single hits that Redis refused, until the same hit would be admitted.
    fn remember(&self, charges: &[Charge<'_>], verdicts: &[Verdict], now: Timestamp) {
        for (c, v) in charges.iter().zip(verdicts) {
            if !self.enabled
                || v.allowed
                || c.kind != ChargeKind::Enforce
                || c.hits != Hits::Take(1)
            {
                continue;
            }
            if v.reset_after == 0 {
                continue;
            }
            if self.map.len() >= OVER_LIMIT_CACHE_KEYS {
                self.full.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.map.insert(
                c.key.0,
                Over {
                    until: now.as_nanos().saturating_add(v.reset_after),
                    policy: *c.policy,
                },
            );
        }
    }
}

/// Counts events and says when to log them: at most once per [`LogEvery::EVERY`].
#[derive(Default)]
struct LogEvery {
    pending: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl LogEvery {
    const EVERY: Duration = Duration::from_secs(10);

    /// Records one event; `Some(n)` when it is time to log the `n` since the last line.
    fn due(&self) -> Option<u64> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.lock();
        if last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            return None;
        }
        *last = Some(Instant::now());
        Some(self.pending.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_put_the_client_group_in_the_hash_tag() {
        let k = CounterKey((0x0123_4567_89ab_cdef_u128 << 64) | 0xfeed);
        assert_eq!(key_name(k), "sluice:{0123456789abcdef}:000000000000feed");
    }

    #[test]
    fn slots_follow_the_redis_cluster_spec() {
        // Redis Cluster spec: CRC16("123456789") = 0x31C3; slot("foo") = 12182 (CLUSTER KEYSLOT).
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b"foo") % 16384, 12182);
        let a = CounterKey((7u128 << 64) | 1);
        let b = CounterKey((7u128 << 64) | 2);
        assert_eq!(slot_of(a), slot_of(b));
    }

    #[test]
    fn windows_are_whole_milliseconds_within_the_exact_range() {
        assert_eq!(window_ms(60_000_000_000), 60_000);
        assert_eq!(window_ms(1), 1);
        assert_eq!(window_ms(u64::MAX), MAX_WINDOW_MS);
    }
}
