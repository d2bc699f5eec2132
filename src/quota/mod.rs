//! The Rate Limit Quota Service (RLQS): sluice's limits enforced inside Envoy, with no call per
//! request.
//!
//! Envoy's `rate_limit_quota` filter groups requests into buckets, reports each bucket's usage
//! over one long-lived stream per Envoy and domain (every 5 s in Envoy 1.40), and enforces,
//! locally, the assignment sluice sends back for each bucket. Per report, for each bucket:
//! 1. its id is read as a descriptor of the stream's domain ([`Limiter::quota_target`]): the
//!    allowlist gets ALLOW_ALL, a block DENY_ALL for the block's remaining time, a bucket no
//!    enforced limit matches ALLOW_ALL;
//! 2. each limit it is subject to is a pool ([`ledger`]) shared with every other bucket, of any
//!    Envoy, that draws on the same counter; the bucket's demand is recorded there, and its share
//!    of each pool's rate computed from the totals ([`share`]);
//! 3. the smallest share becomes an Envoy token bucket ([`assignment`]), sent with a time to live
//!    of [`Settings::ttl`] and refreshed on every report.
//!
//! Buckets idle for [`Settings::abandon_after`] are abandoned (Envoy forgets them and stops
//! reporting them); a stream holds at most [`Settings::max_buckets`], and sluice at most
//! [`Settings::max_streams`] streams. Each stream's state lives in its own task
//! ([`QuotaStream`]); what is shared is the ledger and the statistics ([`registry`]).

pub mod assignment;
pub mod ledger;
pub mod redis_ledger;
pub mod registry;
pub mod share;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use smallvec::SmallVec;

use crate::clock::{Timestamp, duration_nanos};
use crate::limiter::Limiter;
use crate::limiter::quota::QuotaTarget;
use crate::proto::envoy::service::rate_limit_quota::v3::{
    BucketId, RateLimitQuotaResponse, RateLimitQuotaUsageReports,
    rate_limit_quota_response::BucketAction,
    rate_limit_quota_response::bucket_action::{
        AbandonAction, BucketAction as Action, QuotaAssignmentAction,
    },
};
use crate::proto::envoy::r#type::v3::{
    RateLimitStrategy, TokenBucket, rate_limit_strategy::BlanketRule, rate_limit_strategy::Strategy,
};
use crate::service::rls::{MAX_ENTRIES, MAX_FIELD_BYTES};
use crate::store::{CounterKey, FailurePolicy, Store};
use assignment::{Assignment, Refill};
use ledger::{Claim, Claimant, Grant, Ledger, Totals};
use registry::{BucketView, Registry, StreamView};
use share::{Demand, Pool};

/// How sluice answers quota streams.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Each assignment's time to live. Envoy 1.40 reads whole seconds and reports every 5 s;
    /// three reports' worth rides out a late one and bounds how long an Envoy that lost sluice
    /// keeps enforcing.
    pub ttl: Duration,
    /// A bucket with no request for this long is abandoned.
    pub abandon_after: Duration,
    /// Buckets one stream may hold; further buckets are answered by the failure policy
    /// (ALLOW_ALL by default), untracked, and counted.
    pub max_buckets: usize,
    /// Streams open at once; further streams are refused with RESOURCE_EXHAUSTED.
    pub max_streams: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(15),
            abandon_after: Duration::from_secs(300),
            max_buckets: 10_000,
            max_streams: 1_024,
        }
    }
}

/// The ledger in use: this replica's, or the one replicas share through Redis.
#[derive(Debug)]
pub enum AnyLedger {
    /// One replica.
    Memory(ledger::MemoryLedger),
    /// Shared through Redis.
    Redis(redis_ledger::RedisLedger),
}

impl AnyLedger {
    /// The ledger that goes with `store`: shared when the counters are.
    pub fn for_store<S: Store>(store: &S) -> Self {
        match store.redis() {
            Some(r) => AnyLedger::Redis(redis_ledger::RedisLedger::new(r.handle().clone())),
            None => AnyLedger::Memory(ledger::MemoryLedger::default()),
        }
    }
}

impl Ledger for AnyLedger {
    async fn claim(
        &self,
        claims: &[Claim],
        now: Timestamp,
        totals: &mut [Totals],
    ) -> Result<(), crate::store::StoreError> {
        match self {
            AnyLedger::Memory(l) => l.claim(claims, now, totals).await,
            AnyLedger::Redis(l) => l.claim(claims, now, totals).await,
        }
    }

    async fn grant(
        &self,
        grants: &[Grant],
        now: Timestamp,
    ) -> Result<(), crate::store::StoreError> {
        match self {
            AnyLedger::Memory(l) => l.grant(grants, now).await,
            AnyLedger::Redis(l) => l.grant(grants, now).await,
        }
    }

    async fn release(
        &self,
        released: &[(CounterKey, Claimant)],
    ) -> Result<(), crate::store::StoreError> {
        match self {
            AnyLedger::Memory(l) => l.release(released).await,
            AnyLedger::Redis(l) => l.release(released).await,
        }
    }
}

/// A report that cannot be read: the stream ends with INVALID_ARGUMENT naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct BadReport {
    /// The field, as a path into the message (`bucket_quota_usages[2].bucket_id`).
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

fn bad(field: impl Into<String>, problem: impl Into<String>) -> BadReport {
    BadReport {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Answers quota streams for one limiter.
pub struct Quotas<S> {
    limiter: Arc<Limiter<S>>,
    ledger: AnyLedger,
    registry: Arc<Registry>,
    settings: Settings,
    /// Random per process, so that the claimants of two replicas never collide in a shared
    /// ledger.
    instance: u64,
}

impl<S> std::fmt::Debug for Quotas<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas")
            .field("ledger", &self.ledger)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// One bucket as its stream tracks it.
#[derive(Debug)]
struct Tracked {
    id: BucketId,
    /// The id's entries, sorted by key.
    entries: Vec<(String, String)>,
    claimant: Claimant,
    demand: Demand,
    last_report: Timestamp,
    last_active: Timestamp,
    allowed: u64,
    denied: u64,
    /// What Envoy was last told.
    sent: Option<Assignment>,
    /// The last grant in each pool, for [`Pool::grant`]'s hysteresis; also the pools the
    /// claimant holds in the ledger.
    grants: SmallVec<[(CounterKey, f64); 4]>,
}

/// One Envoy's stream: its domain and buckets. Owned by the stream's task.
#[derive(Debug)]
pub struct QuotaStream {
    id: u64,
    peer: String,
    domain: Option<String>,
    opened: Timestamp,
    buckets: HashMap<u64, Tracked>,
    reports: u64,
    /// The access list's version and the rule set the buckets were last assigned under.
    seen: Option<(u64, Arc<crate::limiter::model::RuleSet>)>,
}

impl QuotaStream {
    /// The stream's number, as statistics show it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The domain, once the first report named it.
    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    /// Buckets tracked.
    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    /// Reports received.
    pub fn reports(&self) -> u64 {
        self.reports
    }
}

/// What a bucket of a report resolved to, before the ledger is asked.
enum Resolved {
    /// Sent as is, with this time to live.
    Fixed(Assignment, Duration),
    /// Claims `claims[range]` in pools of these refills.
    Shared {
        first_claim: usize,
        refills: SmallVec<[Refill; 4]>,
    },
}

impl<S: Store> Quotas<S> {
    /// Quota streams for `limiter`, dividing through `ledger`.
    pub fn new(limiter: Arc<Limiter<S>>, ledger: AnyLedger, settings: Settings) -> Self {
        Self {
            registry: Arc::new(Registry::default()),
            limiter,
            ledger,
            settings,
            instance: rand::random(),
        }
    }

    /// Statistics of every stream.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// A new stream from `peer`, or `None` when [`Settings::max_streams`] are open.
    pub fn open(&self, peer: String) -> Option<QuotaStream> {
        let id = self.registry.open(self.settings.max_streams)?;
        Some(QuotaStream {
            id,
            peer,
            domain: None,
            opened: self.limiter.clock().now(),
            buckets: HashMap::new(),
            reports: 0,
            seen: None,
        })
    }

    /// Ends `stream`: its claims are released at once, so the other claimants of its pools
    /// take back its share at their next report.
    pub async fn close(&self, stream: QuotaStream) {
        let released: Vec<(CounterKey, Claimant)> = stream
            .buckets
            .values()
            .flat_map(|t| t.grants.iter().map(move |(k, _)| (*k, t.claimant)))
            .collect();
        if !released.is_empty()
            && let Err(e) = self.ledger.release(&released).await
        {
            self.registry.ledger_error(&e, self.limiter.clock().now());
        }
        self.registry.close(stream.id);
    }

    /// Answers one report of `stream`: an assignment for every bucket it names, and abandons for
    /// buckets idle too long.
    pub async fn report(
        &self,
        stream: &mut QuotaStream,
        reports: &RateLimitQuotaUsageReports,
    ) -> Result<RateLimitQuotaResponse, BadReport> {
        let now = self.limiter.clock().now();
        let domain = self.domain_of(stream, reports)?;
        stream.seen = Some((self.limiter.access().version(), self.limiter.rules()));
        stream.reports += 1;
        self.registry.reports.fetch_add(1, Ordering::Relaxed);

        // Read every usage first: a report that cannot be answered ends the stream before
        // anything changed.
        let mut reported: Vec<u64> = Vec::with_capacity(reports.bucket_quota_usages.len());
        let mut untracked: Vec<BucketId> = Vec::new();
        let mut observed: Vec<(u64, u64, u64)> = Vec::new();
        let mut seen: std::collections::HashSet<u64> = std::collections::HashSet::new();
        for (i, usage) in reports.bucket_quota_usages.iter().enumerate() {
            if usage
                .bucket_id
                .as_ref()
                .is_none_or(|id| id.bucket.is_empty())
            {
                return Err(bad(
                    format!("bucket_quota_usages[{i}].bucket_id"),
                    "a bucket id with at least one entry is required",
                ));
            }
        }
        for (i, usage) in reports.bucket_quota_usages.iter().enumerate() {
            let Some(id) = usage.bucket_id.as_ref() else {
                continue;
            };
            self.registry
                .reported(usage.num_requests_allowed, usage.num_requests_denied);
            // One client's odd header must not cost its Envoy the stream (Envoy would reopen
            // it and send the same bucket again): such a bucket alone is answered by the
            // failure policy, untracked.
            if let Some(problem) = unusable(id) {
                self.registry.invalid(
                    &format!("bucket_quota_usages[{i}].bucket_id.bucket: {problem}"),
                    now,
                );
                untracked.push(id.clone());
                continue;
            }
            let entries: Vec<(String, String)> = id
                .bucket
                .iter()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                .collect();
            let hash = bucket_hash(id);
            let requests = usage
                .num_requests_allowed
                .saturating_add(usage.num_requests_denied);
            let known = stream.buckets.contains_key(&hash);
            if !known && stream.buckets.len() >= self.settings.max_buckets {
                self.registry.refused(&stream.peer, now);
                untracked.push(id.clone());
                continue;
            }
            let claimant = self.claimant(stream.id, hash);
            let t = stream.buckets.entry(hash).or_insert_with(|| Tracked {
                id: id.clone(),
                entries,
                claimant,
                demand: Demand::default(),
                last_report: now,
                last_active: now,
                allowed: 0,
                denied: 0,
                sent: None,
                grants: SmallVec::new(),
            });
            let elapsed = now.saturating_since(t.last_report).as_secs_f64();
            t.demand.observe(requests, elapsed);
            t.last_report = now;
            if requests > 0 {
                t.last_active = now;
            }
            t.allowed = t.allowed.saturating_add(usage.num_requests_allowed);
            t.denied = t.denied.saturating_add(usage.num_requests_denied);
            if seen.insert(hash) {
                reported.push(hash);
            }
            if requests > 0 {
                observed.push((hash, requests, usage.num_requests_denied));
            }
        }

        // Automatic blocking counts reported requests as it counts ShouldRateLimit's, so an
        // address it blocks now is denied in this very answer.
        let rules = self.limiter.rules_in_force();
        for (hash, requests, denied) in observed {
            let Some(t) = stream.buckets.get(&hash) else {
                continue;
            };
            let entries = descriptor(&t.entries);
            if let Err(e) = self
                .limiter
                .observe_quota_usage(&rules, &domain, &entries, requests, denied, now)
                .await
            {
                self.registry.ledger_error(&e, now);
            }
        }

        let mut actions: Vec<BucketAction> = Vec::with_capacity(reported.len());
        let mut released: Vec<(CounterKey, Claimant)> = Vec::new();
        // Idle buckets are abandoned instead of assigned.
        let abandon_before = Timestamp::from_nanos(
            now.as_nanos()
                .saturating_sub(duration_nanos(self.settings.abandon_after)),
        );
        reported.retain(|hash| {
            let idle = stream
                .buckets
                .get(hash)
                .is_some_and(|t| t.last_active < abandon_before);
            if idle && let Some(t) = stream.buckets.remove(hash) {
                released.extend(t.grants.iter().map(|(k, _)| (*k, t.claimant)));
                self.registry.abandoned.fetch_add(1, Ordering::Relaxed);
                actions.push(BucketAction {
                    bucket_id: Some(t.id),
                    bucket_action: Some(Action::AbandonAction(AbandonAction {})),
                });
            }
            !idle
        });

        let mut resolved: Vec<Resolved> = Vec::with_capacity(reported.len());
        let mut claims: Vec<Claim> = Vec::new();
        for hash in &reported {
            let Some(t) = stream.buckets.get_mut(hash) else {
                continue;
            };
            let entries = descriptor(&t.entries);
            let r = match self.limiter.quota_target(&rules, &domain, &entries, now) {
                QuotaTarget::Unlimited | QuotaTarget::Allowlisted => {
                    Resolved::Fixed(Assignment::AllowAll, self.settings.ttl)
                }
                QuotaTarget::Blocked {
                    permanent,
                    remaining,
                } => Resolved::Fixed(Assignment::DenyAll, self.block_ttl(permanent, remaining)),
                QuotaTarget::Limits(limits) => {
                    let first_claim = claims.len();
                    let mut refills = SmallVec::new();
                    for (key, limit) in limits {
                        claims.push(Claim {
                            key,
                            claimant: t.claimant,
                            demand: t.demand.per_second(),
                        });
                        refills.push(Refill::of(&limit.policy));
                    }
                    Resolved::Shared {
                        first_claim,
                        refills,
                    }
                }
            };
            // Pools the bucket no longer draws on (a reload, a block) are let go.
            let keep: SmallVec<[CounterKey; 4]> = match &r {
                Resolved::Shared { first_claim, .. } => claims
                    .get(*first_claim..)
                    .unwrap_or_default()
                    .iter()
                    .map(|c| c.key)
                    .collect(),
                Resolved::Fixed(..) => SmallVec::new(),
            };
            t.grants.retain(|(k, _)| {
                let kept = keep.contains(k);
                if !kept {
                    released.push((*k, t.claimant));
                }
                kept
            });
            resolved.push(r);
        }
        if !released.is_empty()
            && let Err(e) = self.ledger.release(&released).await
        {
            self.registry.ledger_error(&e, now);
        }

        let mut totals = vec![Totals::default(); claims.len()];
        let shared = if claims.is_empty() {
            Ok(())
        } else {
            self.ledger.claim(&claims, now, &mut totals).await
        };
        if let Err(e) = &shared {
            self.registry.ledger_error(e, now);
        }
        let mut grants: Vec<Grant> = Vec::with_capacity(claims.len());
        for (hash, r) in reported.iter().zip(resolved) {
            let Some(t) = stream.buckets.get_mut(hash) else {
                continue;
            };
            let (assignment, ttl) = match r {
                Resolved::Fixed(a, ttl) => (a, ttl),
                Resolved::Shared {
                    first_claim,
                    refills,
                } => {
                    let a = match &shared {
                        Ok(()) => {
                            let mut rate = f64::INFINITY;
                            let mut burst = f64::INFINITY;
                            let mut granted: SmallVec<[(CounterKey, f64); 4]> = SmallVec::new();
                            for (j, refill) in refills.iter().enumerate() {
                                let (Some(c), Some(total)) =
                                    (claims.get(first_claim + j), totals.get(first_claim + j))
                                else {
                                    continue;
                                };
                                let pool = Pool {
                                    rate: refill.rate,
                                    claimants: total.claimants.max(1),
                                    demand: total.demand,
                                    assigned_others: total.assigned_others,
                                };
                                let previous =
                                    t.grants.iter().find(|(k, _)| *k == c.key).map(|(_, g)| *g);
                                let g = pool.grant(c.demand, previous);
                                rate = rate.min(g);
                                burst = burst.min(refill.burst_for(g));
                                granted.push((c.key, g));
                            }
                            let a = Assignment::token_bucket(rate, burst).after(t.sent);
                            // The rate Envoy enforces is what this claimant takes from each
                            // of its pools.
                            let used = a.rate().min(rate);
                            grants.extend(granted.iter().map(|(key, _)| Grant {
                                key: *key,
                                claimant: t.claimant,
                                assigned: used,
                            }));
                            t.grants = granted;
                            a
                        }
                        // The ledger failed: keep what Envoy has, or apply the failure
                        // policy to a bucket that has nothing yet.
                        Err(_) => match (t.sent, self.limiter.failure_policy()) {
                            (Some(a), _) => a,
                            (None, FailurePolicy::Allow) => Assignment::AllowAll,
                            (None, FailurePolicy::Deny) => Assignment::DenyAll,
                        },
                    };
                    (a, self.settings.ttl)
                }
            };
            t.sent = Some(assignment);
            actions.push(BucketAction {
                bucket_id: Some(t.id.clone()),
                bucket_action: Some(Action::QuotaAssignmentAction(assign(assignment, ttl))),
            });
        }
        let fallback = match self.limiter.failure_policy() {
            FailurePolicy::Allow => Assignment::AllowAll,
            FailurePolicy::Deny => Assignment::DenyAll,
        };
        for id in untracked {
            actions.push(BucketAction {
                bucket_id: Some(id),
                bucket_action: Some(Action::QuotaAssignmentAction(assign(
                    fallback,
                    self.settings.ttl,
                ))),
            });
        }
        if !grants.is_empty()
            && let Err(e) = self.ledger.grant(&grants, now).await
        {
            self.registry.ledger_error(&e, now);
        }
        self.registry.update(view(stream, now));
        Ok(RateLimitQuotaResponse {
            bucket_action: actions,
        })
    }

    /// A bucket of a stream as a claimant: distinct across streams and replicas.
    fn claimant(&self, stream: u64, bucket: u64) -> Claimant {
        let mut bytes = [0u8; 24];
        for (chunk, v) in bytes
            .chunks_exact_mut(8)
            .zip([self.instance, stream, bucket])
        {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        Claimant(xxhash_rust::xxh3::xxh3_128(&bytes))
    }

    /// Re-reads the blocks, allowlist and rules for every bucket of `stream` if any changed
    /// since its buckets were last assigned, and answers the buckets that became blocked or
    /// unlimited (ALLOW_ALL, DENY_ALL) at once, without waiting for the stream's next report.
    /// Buckets that became limited again get their share at that report. `None` when nothing
    /// changed for this stream.
    pub fn refresh(&self, stream: &mut QuotaStream) -> Option<RateLimitQuotaResponse> {
        let (access, rules) = (self.limiter.access().version(), self.limiter.rules());
        match &stream.seen {
            Some((a, r)) if *a == access && Arc::ptr_eq(r, &rules) => return None,
            None => return None,
            Some(_) => {}
        }
        stream.seen = Some((access, rules.clone()));
        let domain = stream.domain.clone()?;
        let now = self.limiter.clock().now();
        let mut actions = Vec::new();
        for t in stream.buckets.values_mut() {
            let entries = descriptor(&t.entries);
            let (assignment, ttl) = match self.limiter.quota_target(&rules, &domain, &entries, now)
            {
                QuotaTarget::Unlimited | QuotaTarget::Allowlisted => {
                    (Assignment::AllowAll, self.settings.ttl)
                }
                QuotaTarget::Blocked {
                    permanent,
                    remaining,
                } => (Assignment::DenyAll, self.block_ttl(permanent, remaining)),
                QuotaTarget::Limits(_) => continue,
            };
            if t.sent == Some(assignment) {
                continue;
            }
            // Its pools are let go at the next report (which finds it drawing on none).
            t.sent = Some(assignment);
            actions.push(BucketAction {
                bucket_id: Some(t.id.clone()),
                bucket_action: Some(Action::QuotaAssignmentAction(assign(assignment, ttl))),
            });
        }
        if actions.is_empty() {
            return None;
        }
        self.registry.update(view(stream, now));
        Some(RateLimitQuotaResponse {
            bucket_action: actions,
        })
    }

    /// The time to live of a DENY_ALL for a block: its remaining time, at most the TTL.
    fn block_ttl(&self, permanent: bool, remaining: u64) -> Duration {
        if permanent {
            self.settings.ttl
        } else {
            Duration::from_nanos(remaining).min(self.settings.ttl)
        }
    }

    /// The stream's domain: named by its first report, the same in every later one.
    fn domain_of(
        &self,
        stream: &mut QuotaStream,
        reports: &RateLimitQuotaUsageReports,
    ) -> Result<String, BadReport> {
        match (&stream.domain, reports.domain.as_str()) {
            (None, "") => Err(bad(
                "domain",
                "the first report of a stream must name its domain",
            )),
            (None, d) => {
                if d.len() > MAX_DOMAIN_BYTES {
                    return Err(bad(
                        "domain",
                        format!("longer than {MAX_DOMAIN_BYTES} bytes"),
                    ));
                }
                stream.domain = Some(d.to_string());
                tracing::info!(
                    stream = stream.id,
                    peer = %stream.peer,
                    domain = d,
                    "quota stream opened"
                );
                Ok(d.to_string())
            }
            (Some(d), "") => Ok(d.clone()),
            (Some(d), e) if d == e => Ok(d.clone()),
            (Some(d), e) => Err(bad(
                "domain",
                format!("{e:?} differs from the stream's domain {d:?}; open a new stream"),
            )),
        }
    }
}

/// Domains are configured names; a longer one cannot match.
const MAX_DOMAIN_BYTES: usize = 256;

/// Envoy's quota assignment for `a`, living `ttl` (whole seconds, at least one: Envoy 1.40
/// drops the fraction, and an assignment of 0 s expires at once).
fn assign(a: Assignment, ttl: Duration) -> QuotaAssignmentAction {
    let secs = (ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1);
    let strategy = match a {
        Assignment::AllowAll => Strategy::BlanketRule(BlanketRule::AllowAll as i32),
        Assignment::DenyAll => Strategy::BlanketRule(BlanketRule::DenyAll as i32),
        Assignment::TokenBucket {
            max_tokens,
            tokens_per_fill,
            fill_interval_secs,
        } => Strategy::TokenBucket(TokenBucket {
            max_tokens,
            tokens_per_fill: Some(tokens_per_fill),
            fill_interval: Some(prost_types::Duration {
                seconds: i64::from(fill_interval_secs),
                nanos: 0,
            }),
        }),
    };
    QuotaAssignmentAction {
        assignment_time_to_live: Some(prost_types::Duration {
            seconds: i64::try_from(secs).unwrap_or(i64::MAX),
            nanos: 0,
        }),
        rate_limit_strategy: Some(RateLimitStrategy {
            strategy: Some(strategy),
        }),
    }
}

/// A bucket id's entries as a descriptor's, for the limiter.
fn descriptor(entries: &[(String, String)]) -> SmallVec<[(&str, &str); 4]> {
    entries
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// Why a bucket id cannot be read as a descriptor (the bounds `ShouldRateLimit` puts on one),
/// if it cannot.
fn unusable(id: &BucketId) -> Option<String> {
    if id.bucket.len() > MAX_ENTRIES {
        return Some(format!("more than {MAX_ENTRIES} entries"));
    }
    if id.bucket.keys().any(String::is_empty) {
        return Some("keys must not be empty".into());
    }
    id.bucket
        .iter()
        .any(|(k, v)| k.len() > MAX_FIELD_BYTES || v.len() > MAX_FIELD_BYTES)
        .then(|| format!("keys and values are at most {MAX_FIELD_BYTES} bytes"))
}

/// A hash of a bucket id's entries (in key order), length-prefixed so that no two ids share
/// one. Values are hashed as bytes: two ids that differ only in bytes that are not UTF-8 are
/// two buckets to Envoy, and stay two here (their limits, read from the text, are shared).
fn bucket_hash(id: &BucketId) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (k, v) in &id.bucket {
        h.update(&(k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        h.update(&(v.len() as u64).to_le_bytes());
        h.update(v);
    }
    h.digest()
}

/// The statistics' view of a stream: its most demanding buckets, at most
/// [`registry::BUCKETS_SHOWN`].
fn view(stream: &QuotaStream, now: Timestamp) -> StreamView {
    let mut top: Vec<&Tracked> = stream.buckets.values().collect();
    let by_demand =
        |a: &&Tracked, b: &&Tracked| b.demand.per_second().total_cmp(&a.demand.per_second());
    if top.len() > registry::BUCKETS_SHOWN {
        top.select_nth_unstable_by(registry::BUCKETS_SHOWN, by_demand);
        top.truncate(registry::BUCKETS_SHOWN);
    }
    top.sort_by(by_demand);
    let buckets = top
        .into_iter()
        .map(|t| BucketView {
            entries: t.entries.clone(),
            allowed: t.allowed,
            denied: t.denied,
            demand: t.demand.per_second(),
            assignment: t.sent.unwrap_or(Assignment::AllowAll),
        })
        .collect();
    StreamView {
        id: stream.id,
        peer: stream.peer.clone(),
        domain: stream.domain.clone().unwrap_or_default(),
        opened: stream.opened,
        updated: now,
        bucket_count: stream.buckets.len(),
        reports: stream.reports,
        buckets,
    }
}

#[cfg(test)]
mod tests;
