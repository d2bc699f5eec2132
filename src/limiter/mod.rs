//! The decision: which limits a request's descriptors touch, and whether it may pass.
//!
//! Per request the limiter reads the current [`RuleSet`] (one atomic load, no lock), reads the
//! clock once, builds one [`Charge`] per distinct counter, and hands the batch to the store,
//! which charges all of it or nothing. It then picks, per descriptor, the status Envoy needs.
//! No heap allocation on this path for requests of up to 4 descriptors and 8 counters.
//!
//! The client address entry is read as the network sees the client: an IPv4-mapped IPv6
//! address is rewritten to its IPv4 form once, before anything else reads the request
//! ([`crate::access::canonical_address`]).

pub mod model;
pub mod path;
pub mod quota;
pub mod reference;
mod sip;
pub mod tree;

use std::borrow::Cow;
use std::hash::Hasher;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use siphasher::sip::SipHasher13 as SipHasher13_64;
use smallvec::SmallVec;

use crate::access::{Access, AccessList, canonical_address};
use crate::algorithms::{Hits, Policy};
use crate::clock::{Clock, Timestamp};
use crate::entries::{bytes_eq, lookup, names_eq};
use crate::stats::{ClientRef, Outcome, Stats};
use crate::store::{Charge, ChargeKind, CounterKey, FailurePolicy, Store, StoreError, Verdict};
use model::{Domain, Limit, Reported, Rule, RuleSet, Unit};

/// Descriptors a request holds without allocating. Envoy's filter sends one descriptor per
/// matching `rate_limits` entry (the sample config: one per request); a request and its
/// decision are moved a few times per call, so a larger inline size costs copies on every call
/// to save an allocation on rare ones.
pub const INLINE_DESCRIPTORS: usize = 2;

/// A request, borrowed from whatever carried it (the Envoy proto in practice).
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    /// The rate limit domain.
    pub domain: &'a str,
    /// Descriptors in request order.
    pub descriptors: SmallVec<[Descriptor<'a>; INLINE_DESCRIPTORS]>,
}

/// One descriptor of a request.
#[derive(Debug, Clone)]
pub struct Descriptor<'a> {
    /// `(key, value)` entries in order.
    pub entries: SmallVec<[(&'a str, &'a str); 4]>,
    /// What this descriptor adds (request/descriptor `hits_addend`, `is_negative_hits`).
    pub hits: Hits,
    /// Envoy's per-descriptor limit override.
    pub limit_override: Option<LimitOverride>,
}

/// A descriptor's `limit` override: replaces the limits of the rule it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitOverride {
    /// Requests per unit; 0 denies every hit.
    pub requests_per_unit: u32,
    /// The unit (Envoy's `RateLimitUnit`, no week).
    pub unit: Unit,
}

/// The answer for one descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status<'r> {
    /// Whether this descriptor is over an enforced limit.
    pub over: bool,
    /// The limit reported: the one closest to running out, or for an over-limit descriptor the
    /// one that admits the request last. `None` when no rule matched.
    pub limit: Option<ReportedLimit<'r>>,
    /// Single hits left under that limit.
    pub remaining: u64,
    /// Nanoseconds until it resets (until the request would be admitted, when over).
    pub reset_after: u64,
    /// Admitted with 20% or less of the reported limit left.
    pub near: bool,
}

impl Status<'_> {
    const UNLIMITED: Status<'static> = Status {
        over: false,
        limit: None,
        remaining: 0,
        reset_after: 0,
        near: false,
    };
}

/// Why a client was turned away before any limit was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    /// The block never expires.
    pub permanent: bool,
    /// Nanoseconds until a temporary block ends.
    pub remaining: u64,
}

/// A limit as reported to Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedLimit<'r> {
    /// The limit's name, borrowed from the rule set the decision was made with (a reference
    /// count would be one more write to a cache line every core shares, on every decision).
    pub name: &'r str,
    /// Rate and unit.
    pub reported: Reported,
}

/// The answer for a request. It borrows from the [`RulesInForce`] it was decided with.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision<'r> {
    /// Whether any descriptor is over an enforced limit.
    pub over: bool,
    /// One per request descriptor, in order.
    pub statuses: SmallVec<[Status<'r>; INLINE_DESCRIPTORS]>,
    /// When over: nanoseconds until the same request would be admitted, and the name of the
    /// limit that decides it.
    pub retry: Option<(u64, &'r str)>,
    /// Set when the client address is blocked: every descriptor is over, nothing was counted.
    pub blocked: Option<Blocked>,
    /// Set when the store failed and the failure policy denies: every descriptor is over.
    pub unavailable: bool,
    /// Decided under envoyproxy/ratelimit's rules: the response is the reference's (no body,
    /// no `retry-after`).
    pub reference: bool,
    /// What a reference decision adds (headers, dynamic metadata), when its settings ask.
    pub extras: Option<Box<reference::ReferenceExtras>>,
}

impl Decision<'_> {
    /// As [`Decision::default`], keeping the statuses' storage.
    fn clear(&mut self) {
        let Decision {
            over,
            statuses,
            retry,
            blocked,
            unavailable,
            reference,
            extras,
        } = self;
        *over = false;
        statuses.clear();
        *retry = None;
        *blocked = None;
        *unavailable = false;
        *reference = false;
        *extras = None;
    }

    fn unlimited(descriptors: usize) -> Self {
        Decision {
            statuses: (0..descriptors).map(|_| Status::UNLIMITED).collect(),
            ..Decision::default()
        }
    }

    fn blocked(descriptors: usize, b: Blocked) -> Self {
        let status = Status {
            over: true,
            reset_after: b.remaining,
            ..Status::UNLIMITED
        };
        Decision {
            over: true,
            statuses: (0..descriptors).map(|_| status.clone()).collect(),
            blocked: Some(b),
            ..Decision::default()
        }
    }

    fn unavailable(descriptors: usize) -> Self {
        let status = Status {
            over: true,
            ..Status::UNLIMITED
        };
        Decision {
            over: true,
            statuses: (0..descriptors).map(|_| status.clone()).collect(),
            unavailable: true,
            ..Decision::default()
        }
    }
}

/// Why no decision could be made.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// The store failed.
    #[error("counter store: {0}")]
    Store(#[from] StoreError),
}

/// The rule set a decision is made with, as [`Limiter::rules_in_force`] loaded it (no lock, no
/// shared reference count in the common case).
pub struct RulesInForce(arc_swap::Guard<Arc<RuleSet>>);

impl std::ops::Deref for RulesInForce {
    type Target = RuleSet;

    fn deref(&self) -> &RuleSet {
        &self.0
    }
}

impl RulesInForce {
    /// These rules, for [`Limiter::decide_into`].
    pub fn rules(&self) -> Rules<'_> {
        Rules(&self.0)
    }
}

/// A rule set installed in a limiter (its statistics attached), as [`RulesInForce::rules`]
/// hands it out for [`Limiter::decide_into`].
#[derive(Clone, Copy)]
pub struct Rules<'r>(&'r RuleSet);

impl std::ops::Deref for Rules<'_> {
    type Target = RuleSet;

    fn deref(&self) -> &RuleSet {
        self.0
    }
}

impl std::fmt::Debug for Rules<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RulesInForce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RulesInForce").finish_non_exhaustive()
    }
}

/// Makes decisions against a swappable rule set and a store.
pub struct Limiter<S> {
    rules: ArcSwap<RuleSet>,
    store: S,
    clock: Arc<dyn Clock>,
    keys: (u64, u64),
    access: Arc<AccessList>,
    stats: Arc<Stats>,
    on_store_error: FailurePolicy,
    store_errors: StoreErrorLog,
    /// envoyproxy/ratelimit's service-wide counters, for reference rules.
    pub reference_counts: reference::ServiceCounts,
    /// envoyproxy/ratelimit's local over-limit cache, for reference rules.
    pub local_cache: reference::LocalCache,
}

/// Counts store errors and logs them at most once per [`StoreErrorLog::EVERY`], with the
/// number since the last line, so an outage does not flood the log at request rate.
#[derive(Debug, Default)]
struct StoreErrorLog {
    total: AtomicU64,
    unlogged: AtomicU64,
    last_logged_secs: AtomicU64,
}

impl StoreErrorLog {
    const EVERY: u64 = 10;

    fn record(&self, error: &DecideError, policy: FailurePolicy, now: Timestamp) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let pending = self.unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let secs = now.as_secs();
        let last = self.last_logged_secs.load(Ordering::Relaxed);
        if secs >= last.saturating_add(Self::EVERY)
            && self
                .last_logged_secs
                .compare_exchange(last, secs, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.unlogged.fetch_sub(pending, Ordering::Relaxed);
            tracing::error!(%error, errors = pending, ?policy, "counter store failing; applying the failure policy");
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for Limiter<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Where a charge's policy comes from: the rule set, or a descriptor's override.
/// `'r` is the rule set's lifetime (a decision borrows limit names for it), `'p` the request's
/// (overrides' policies are built per request).
#[derive(Clone, Copy)]
enum Source<'r, 'p> {
    Config(&'r Limit),
    Override(&'p Policy, Reported),
}

impl<'r: 'p, 'p> Source<'r, 'p> {
    fn policy(&self) -> &'p Policy {
        match *self {
            Source::Config(l) => &l.policy,
            Source::Override(p, _) => p,
        }
    }
}

/// One (descriptor, limit) pair and the distinct counter it charges.
struct Planned<'r, 'p> {
    descriptor: usize,
    rule: Option<&'r Rule>,
    source: Source<'r, 'p>,
    charge: usize,
    blocking: bool,
}

/// A request's address entries read as [`canonical_address`] reads them, so that everything
/// downstream (blocks, the allowlist, counters, automatic blocks, statistics) sees one spelling
/// of a client: per descriptor and entry, the new text of each that changes.
struct CanonicalRequest<'o, 'a> {
    original: &'o Request<'a>,
    values: Vec<Vec<Option<Cow<'a, str>>>>,
}

fn canonical_request<'o, 'a>(
    original: &'o Request<'a>,
    address_entry: &str,
) -> CanonicalRequest<'o, 'a> {
    let values = original
        .descriptors
        .iter()
        .map(|d| {
            d.entries
                .iter()
                .map(|&(k, v)| {
                    if bytes_eq(k.as_bytes(), address_entry.as_bytes()) {
                        canonical_address(v)
                    } else {
                        None
                    }
                })
                .collect()
        })
        .collect();
    CanonicalRequest { original, values }
}

impl CanonicalRequest<'_, '_> {
    /// The request with the new values in place of the old.
    fn request(&self) -> Request<'_> {
        Request {
            domain: self.original.domain,
            descriptors: self
                .original
                .descriptors
                .iter()
                .zip(&self.values)
                .map(|(d, values)| Descriptor {
                    entries: d
                        .entries
                        .iter()
                        .zip(values)
                        .map(|(&(k, v), new)| (k, new.as_deref().unwrap_or(v)))
                        .collect(),
                    hits: d.hits,
                    limit_override: d.limit_override,
                })
                .collect(),
        }
    }
}

/// The request's distinct counters, as the store charges them. A counter's policy is that of
/// the first plan that created it.
type Counters<'r> = SmallVec<[Charge<'r>; 8]>;

const OVERRIDE_NAME: &str = "override";

impl<S: Store> Limiter<S> {
    /// A limiter over `rules` and `store`, reading time from `clock`, with no blocks and its
    /// own statistics.
    pub fn new(rules: RuleSet, store: S, clock: Arc<dyn Clock>) -> Self {
        Self::with_parts(
            rules,
            store,
            clock,
            Arc::new(AccessList::empty()),
            Arc::new(Stats::default()),
        )
    }

    /// A limiter sharing `access` (blocks, allowlist) and `stats` with the admin service.
    pub fn with_parts(
        rules: RuleSet,
        store: S,
        clock: Arc<dyn Clock>,
        access: Arc<AccessList>,
        stats: Arc<Stats>,
    ) -> Self {
        let rules = attach_stats(rules, &stats);
        access.set_config_allowed(rules.allowlist.clone());
        Self {
            rules: ArcSwap::from_pointee(rules),
            store,
            clock,
            // Keyed hashing: clients cannot craft counter-key collisions without these.
            keys: (rand::random(), rand::random()),
            access,
            stats,
            on_store_error: FailurePolicy::Allow,
            store_errors: StoreErrorLog::default(),
            reference_counts: reference::ServiceCounts::default(),
            local_cache: reference::LocalCache::default(),
        }
    }

    /// What to answer when the store fails (default: allow).
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.on_store_error = policy;
        self
    }

    /// What is answered when the store fails.
    pub fn failure_policy(&self) -> FailurePolicy {
        self.on_store_error
    }

    /// Store failures since start.
    pub fn store_errors(&self) -> u64 {
        self.store_errors.total.load(Ordering::Relaxed)
    }

    /// Derives the counter-key hashing keys from `secret` instead of at random. Replicas that
    /// share a store (Redis) must use the same secret to compute the same keys; keep it secret
    /// so clients cannot craft colliding keys.
    pub fn with_key_secret(mut self, secret: &[u8]) -> Self {
        let h = xxhash_rust::xxh3::xxh3_128(secret);
        self.keys = ((h >> 64) as u64, h as u64);
        self
    }

    /// The rule set in force.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.rules.load_full()
    }

    /// Replaces the rule set; requests already deciding finish on the old one.
    pub fn swap_rules(&self, rules: RuleSet) {
        let rules = attach_stats(rules, &self.stats);
        self.access.set_config_allowed(rules.allowlist.clone());
        self.rules.store(Arc::new(rules));
    }

    /// Blocks and allowlist.
    pub fn access(&self) -> &Arc<AccessList> {
        &self.access
    }

    /// Decision statistics.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The rule set in force, for one or a few decisions: a [`Decision`] borrows the names of
    /// its limits from it. Holding it does not hold up a reload; decisions made with it use the
    /// rules it holds.
    pub fn rules_in_force(&self) -> RulesInForce {
        RulesInForce(self.rules.load())
    }

    /// Decides `request` at the clock's current time under `rules` (from
    /// [`Self::rules_in_force`]).
    pub async fn decide<'r>(&self, rules: &'r RulesInForce, request: &Request<'_>) -> Decision<'r> {
        self.decide_at(rules, request, self.clock.now()).await
    }

    /// Decides `request` at `now` under `rules`. A store failure is answered by the failure
    /// policy (and counted and logged, rate-limited); it is never an error to the caller.
    pub async fn decide_at<'r>(
        &self,
        rules: &'r RulesInForce,
        request: &Request<'_>,
        now: Timestamp,
    ) -> Decision<'r> {
        let mut decision = Decision::default();
        self.decide_into(rules.rules(), request, now, &mut decision)
            .await;
        decision
    }

    /// [`Self::decide_at`] into `decision` (which it overwrites), for the request path: a
    /// decision is ~150 bytes, and moving one out of a future copies it just after it was
    /// written, which costs more than its size suggests (the copy's wide loads wait for the
    /// narrow stores that wrote it).
    pub async fn decide_into<'r>(
        &self,
        rules: Rules<'r>,
        request: &Request<'_>,
        now: Timestamp,
        decision: &mut Decision<'r>,
    ) {
        decision.clear();
        let result = match self.store.deadline() {
            // One deadline for all of the decision's store calls (`Store::deadline`). Boxed:
            // the timer would widen this future for the memory store too, which has none.
            Some(limit) => Box::pin(tokio::time::timeout(
                limit,
                self.decide_or_fail(rules.0, request, now, decision),
            ))
            .await
            .unwrap_or(Err(DecideError::Store(StoreError::Timeout(limit)))),
            None => self.decide_or_fail(rules.0, request, now, decision).await,
        };
        if let Err(e) = result {
            self.store_errors.record(&e, self.on_store_error, now);
            let n = request.descriptors.len();
            *decision = match self.on_store_error {
                FailurePolicy::Allow => {
                    self.stats.total.record(Outcome::Allowed, false);
                    Decision::unlimited(n)
                }
                FailurePolicy::Deny => {
                    self.stats.total.record(Outcome::Limited, false);
                    Decision::unavailable(n)
                }
            };
        }
    }

    async fn decide_or_fail<'r>(
        &self,
        rules: &'r RuleSet,
        request: &Request<'_>,
        now: Timestamp,
        decision: &mut Decision<'r>,
    ) -> Result<(), DecideError> {
        let n = request.descriptors.len();
        let domain = rules.domain(request.domain);
        let address_at = request
            .descriptors
            .iter()
            .enumerate()
            .find_map(|(i, d)| Some((i, lookup(&d.entries, &rules.address_entry)?)));
        if address_at.is_some_and(|(_, a)| canonical_address(a).is_some()) {
            // Rare (an IPv4 client on a dual-stack listener that Envoy did not unmap). Boxed:
            // inline, the copy would widen every decision's future.
            return Box::pin(async move {
                let canonical = canonical_request(request, &rules.address_entry);
                self.decide_or_fail(rules, &canonical.request(), now, decision)
                    .await
            })
            .await;
        }
        let address = address_at.map(|(_, a)| a);
        let client =
            domain.and_then(|d| self.client_of(d, request, &rules.address_entry, address_at));

        match address.map(|a| self.access.check_at(a, now)) {
            Some(Access::Allowed) => {
                self.record(domain, client.as_ref(), Outcome::Allowed, false, now);
                *decision = Decision::unlimited(n);
                return Ok(());
            }
            Some(Access::Blocked {
                permanent,
                remaining,
            }) => {
                self.record(domain, client.as_ref(), Outcome::Blocked, false, now);
                *decision = Decision::blocked(
                    n,
                    Blocked {
                        permanent,
                        remaining,
                    },
                );
                return Ok(());
            }
            Some(Access::Normal) | None => {}
        }
        if let Some(reference) = &rules.reference {
            // Boxed: inline, its state would widen this future (and so every native
            // decision's) by a third.
            return Box::pin(self.decide_reference(reference, request, now, decision)).await;
        }
        let Some(domain) = domain else {
            self.stats.total.record(Outcome::Allowed, false);
            *decision = Decision::unlimited(n);
            return Ok(());
        };

        // Overrides' policies live here for the whole request, so charges can borrow them like
        // configured ones.
        let overrides: SmallVec<[Option<(Policy, Reported)>; INLINE_DESCRIPTORS]> = if request
            .descriptors
            .iter()
            .any(|d| d.limit_override.is_some())
        {
            request
                .descriptors
                .iter()
                .map(|d| d.limit_override.map(override_policy))
                .collect()
        } else {
            SmallVec::new()
        };
        let mut planned: SmallVec<[Planned<'_, '_>; 8]> = SmallVec::new();
        let mut counters = Counters::new();
        let enforce = |shadow: bool| {
            if rules.enabled && !rules.shadow && !shadow {
                ChargeKind::Enforce
            } else {
                ChargeKind::Shadow
            }
        };
        for (index, d) in request.descriptors.iter().enumerate() {
            // The client's identity is hashed once per descriptor and shared by its limits (for
            // the descriptor the statistics' client came from, that hash is already done).
            let dgroup = match &client {
                Some(c) if c.descriptor == index => Some(c.group),
                _ if domain.client.is_empty() => None,
                _ => self.client_group(&domain.client, &d.entries),
            };
            let routed = domain.route(&d.entries);
            // An override replaces the endpoint's limits; domain-wide rules still apply.
            if let (Some(o), Some((policy, reported))) = (
                d.limit_override,
                overrides.get(index).and_then(Option::as_ref),
            ) {
                let key = match routed.and_then(|r| self.client_key(r, &d.entries, o)) {
                    Some(k) => k,
                    None => self.entries_key(domain.name.as_str(), &d.entries, o),
                };
                let source = Source::Override(policy, *reported);
                plan(
                    &mut planned,
                    &mut counters,
                    index,
                    routed,
                    d.hits,
                    source,
                    key,
                    enforce(false),
                );
            }
            let endpoint = routed.filter(|_| d.limit_override.is_none());
            for rule in endpoint.into_iter().chain(domain.conditional(&d.entries)) {
                let group = self.rule_group(rule, &d.entries, &domain.client, dgroup);
                for limit in &rule.limits {
                    if let Some(key) = group.map(|g| Self::limit_key_in(g, limit)) {
                        plan(
                            &mut planned,
                            &mut counters,
                            index,
                            Some(rule),
                            d.hits,
                            Source::Config(limit),
                            key,
                            enforce(limit.shadow),
                        );
                    }
                }
            }
        }
        // Automatic blocking watches every request of an address, admitted or not.
        let watch = domain
            .auto_block
            .as_ref()
            .and_then(|ab| ab.max_requests.as_ref())
            .zip(address)
            .map(|(limit, addr)| {
                let key = self.address_key(limit.id, addr);
                (
                    merge(
                        &mut counters,
                        Charge {
                            key,
                            policy: &limit.policy,
                            hits: Hits::Take(1),
                            kind: ChargeKind::Observe,
                        },
                    ),
                    limit,
                )
            });

        // Filled where it lives (`from_elem` builds it aside, then copies it in).
        let mut verdicts: SmallVec<[Verdict; 8]> = SmallVec::new();
        verdicts.resize(counters.len(), Verdict::default());
        if !counters.is_empty() {
            self.store.apply(&counters, &mut verdicts, now).await?;
        }
        summarise(n, &planned, &verdicts, decision);
        count_limits(&planned, &verdicts, decision);

        if let (Some((i, limit)), Some(addr)) = (watch, address)
            && verdicts.get(i).is_some_and(|v| !v.allowed)
        {
            self.auto_block(domain, addr, limit, "requests across all endpoints", now);
        }
        if decision.over
            && let (Some(limit), Some(addr)) = (
                domain
                    .auto_block
                    .as_ref()
                    .and_then(|ab| ab.max_limited.as_ref()),
                address,
            )
        {
            let charge = Charge {
                key: self.address_key(limit.id, addr),
                policy: &limit.policy,
                hits: Hits::Take(1),
                kind: ChargeKind::Observe,
            };
            let mut v = [Verdict::default()];
            self.store.apply(&[charge], &mut v, now).await?;
            if !v[0].allowed {
                self.auto_block(domain, addr, limit, "limited requests", now);
            }
        }

        let outcome = if decision.over {
            Outcome::Limited
        } else {
            Outcome::Allowed
        };
        let near = decision.statuses.iter().any(|s| s.near);
        self.record(Some(domain), client.as_ref(), outcome, near, now);
        // Endpoint counts: once per rule per request, with its own descriptors' outcome.
        let mut seen: SmallVec<[*const Rule; 4]> = SmallVec::new();
        for p in &planned {
            let Some(rule) = p.rule else { continue };
            if seen.contains(&(rule as *const Rule)) {
                continue;
            }
            seen.push(rule);
            let (mut over, mut near) = (false, false);
            for q in planned
                .iter()
                .filter(|q| q.rule.is_some_and(|r| std::ptr::eq(r, rule)))
            {
                if let Some(s) = decision.statuses.get(q.descriptor) {
                    over |= s.over;
                    near |= s.near;
                }
            }
            let outcome = if over {
                Outcome::Limited
            } else {
                Outcome::Allowed
            };
            rule.stats.record(outcome, near && !over);
        }
        Ok(())
    }

    /// Counts a request's outcome overall, for its domain and for its client.
    fn record(
        &self,
        domain: Option<&Domain>,
        client: Option<&ClientId<'_>>,
        outcome: Outcome,
        near: bool,
        now: Timestamp,
    ) {
        self.stats.total.record(outcome, near);
        if let Some(d) = domain {
            d.stats.record(outcome, near);
            if let Some(c) = client {
                self.stats.record_client(
                    ClientRef {
                        hash: c.hash,
                        domain: &d.name_arc,
                        names: &d.client,
                        entries: c.entries,
                        address: c.address,
                    },
                    outcome,
                    near,
                    now.as_nanos(),
                );
            }
        }
    }

    /// The client of a request: the values of the domain's client entries in the first
    /// descriptor that has them all.
    ///
    /// `address_at` is the first descriptor with the address entry (named `address_entry`) and
    /// its value: when that entry alone identifies clients, as it does by default, it is the
    /// client's descriptor and value, not looked up again.
    ///
    /// Inlined: returned through memory, its 128-bit hash was written as two halves and read
    /// back whole at once, a load that waits for both stores (~5% of a hot decision).
    #[inline(always)]
    fn client_of<'r>(
        &self,
        domain: &Domain,
        request: &'r Request<'_>,
        address_entry: &str,
        address_at: Option<(usize, &'r str)>,
    ) -> Option<ClientId<'r>> {
        let address = address_at.map(|(_, a)| a);
        let id = |i: usize, d: &'r Descriptor<'_>, group: u64| ClientId {
            hash: (u128::from(group) << 64) | u128::from(domain.tag),
            descriptor: i,
            group,
            entries: &d.entries,
            address,
        };
        if domain.client.is_empty() {
            None
        } else if domain.identified_by(address_entry) {
            let (i, value) = address_at?;
            let d = request.descriptors.get(i)?;
            Some(id(i, d, self.hash_one(TAG_CLIENT, value.as_bytes())))
        } else {
            request
                .descriptors
                .iter()
                .enumerate()
                .find_map(|(i, d)| Some(id(i, d, self.client_group(&domain.client, &d.entries)?)))
        }
    }

    /// Creates an automatic block for `addr` (once: later triggers find it blocked).
    fn auto_block(&self, domain: &Domain, addr: &str, limit: &Limit, what: &str, now: Timestamp) {
        let (Some(ab), Ok(ip)) = (&domain.auto_block, addr.parse::<std::net::IpAddr>()) else {
            return;
        };
        let reason = format!("more than {} {what}", limit.rate);
        let by = format!("auto-block {}", domain.name);
        if let Some(block) =
            self.access
                .block_if_absent(ipnet::IpNet::from(ip), ab.duration, reason, by, now)
        {
            self.stats.automatic_blocks.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                address = %ip,
                domain = %domain.name,
                reason = %block.reason,
                duration_secs = ab.duration.as_secs(),
                "automatic block"
            );
        }
    }

    /// Every counter key of one client of `domain` (its endpoint limits and its address's
    /// automatic-block counters), for resetting it. `values` follow `domain.client`.
    pub fn client_keys(
        &self,
        domain: &Domain,
        values: &[&str],
        address: Option<&str>,
    ) -> Vec<CounterKey> {
        let entries: SmallVec<[(&str, &str); 4]> = domain
            .client
            .iter()
            .map(String::as_str)
            .zip(values.iter().copied())
            .collect();
        let mut keys = Vec::new();
        for rule in domain.rules.iter().filter(|r| !r.client.is_empty()) {
            for limit in &rule.limits {
                keys.extend(self.limit_key(rule, limit, &entries));
            }
        }
        if let (Some(ab), Some(addr)) = (&domain.auto_block, address) {
            for limit in ab.max_requests.iter().chain(ab.max_limited.iter()) {
                keys.push(self.address_key(limit.id, addr));
            }
        }
        keys
    }

    /// A 64-bit keyed hash.
    fn h64(&self) -> SipHasher13_64 {
        SipHasher13_64::new_with_keys(self.keys.0, self.keys.1)
    }

    /// Builds a counter key from its group (the client's identity, or the limit itself when all
    /// clients share it) and a member (the limit's identity). The group is the high half, so one
    /// client's counters share a memory shard (fewer locks per request) and, with Redis Cluster,
    /// a hash slot (one atomic script per request). The low half is a bijection of
    /// `group ^ member`, so within a group distinct members never collide; it needs no keyed
    /// hash because the group already is one (clients cannot choose it).
    fn key(group: u64, member: u64) -> CounterKey {
        CounterKey((u128::from(group) << 64) | u128::from(mix64(group ^ member)))
    }

    /// [`Self::hash_parts`] of one part (a client's address or id): the same hash, computed
    /// from the value where it lies.
    fn hash_one(&self, tag: u8, value: &[u8]) -> u64 {
        sip::hash_tagged(self.keys.0, self.keys.1, tag, value)
    }

    /// Keyed hash of a domain-separation `tag` and length-prefixed `parts`, for several parts
    /// (a client named by several entries, an override's key; one part goes through
    /// [`Self::hash_one`]). Short inputs are laid out on the stack and hashed in one call, about
    /// half the work of feeding SipHash piece by piece.
    fn hash_parts<'p>(&self, tag: u8, parts: impl Iterator<Item = &'p [u8]> + Clone) -> u64 {
        let mut buf = [0u8; 128];
        let mut len = 1;
        buf[0] = tag;
        let fits = parts.clone().all(|p| {
            let end = len + 4 + p.len();
            let Some(dst) = buf.get_mut(len..end) else {
                return false;
            };
            let (n, bytes) = dst.split_at_mut(4);
            n.copy_from_slice(&(p.len() as u32).to_le_bytes());
            bytes.copy_from_slice(p);
            len = end;
            true
        });
        if fits {
            return self.h64().hash(&buf[..len]);
        }
        self.hash_parts_streaming(tag, parts)
    }

    /// [`Self::hash_parts`] for inputs too long for its stack buffer: the same bytes, fed to
    /// SipHash piece by piece (so the same hash).
    fn hash_parts_streaming<'p>(&self, tag: u8, parts: impl Iterator<Item = &'p [u8]>) -> u64 {
        let mut h = self.h64();
        h.write_u8(tag);
        for p in parts {
            h.write(&(p.len() as u32).to_le_bytes());
            h.write(p);
        }
        h.finish()
    }

    /// Hash of the values of `names` in `entries`, `None` if one is missing.
    fn client_group(&self, names: &[String], entries: &[(&str, &str)]) -> Option<u64> {
        match names {
            // The common case: one client entry (address or id).
            [name] => {
                let v = lookup(entries, name)?;
                Some(self.hash_one(TAG_CLIENT, v.as_bytes()))
            }
            _ => {
                let values: SmallVec<[&[u8]; 4]> = names
                    .iter()
                    .map(|k| lookup(entries, k).map(str::as_bytes))
                    .collect::<Option<_>>()?;
                Some(self.hash_parts(TAG_CLIENT, values.iter().copied()))
            }
        }
    }

    /// The group half of `rule`'s counter keys for a descriptor: fixed for a rule shared by
    /// all clients, else the client's identity (`dgroup` when the rule identifies clients by the
    /// domain's entries, as endpoint rules do). `None` if the descriptor lacks a client entry.
    fn rule_group(
        &self,
        rule: &Rule,
        entries: &[(&str, &str)],
        domain_client: &[String],
        dgroup: Option<u64>,
    ) -> Option<u64> {
        if rule.client.is_empty() {
            Some(rule.shared_group)
        } else if names_eq(&rule.client, domain_client) {
            dgroup
        } else {
            self.client_group(&rule.client, entries)
        }
    }

    /// Counter key of `limit` within a group.
    fn limit_key_in(group: u64, limit: &Limit) -> CounterKey {
        Self::key(group, limit.id)
    }

    /// Counter key of `limit` of `rule` for the client named by `entries`; `None` if the
    /// descriptor lacks one of the rule's client entries.
    fn limit_key(
        &self,
        rule: &Rule,
        limit: &Limit,
        entries: &[(&str, &str)],
    ) -> Option<CounterKey> {
        let group = if rule.client.is_empty() {
            rule.shared_group
        } else {
            self.client_group(&rule.client, entries)?
        };
        Some(Self::limit_key_in(group, limit))
    }

    /// Counter key for an override on a routed rule: the rule's client, the override's rate.
    fn client_key(
        &self,
        rule: &Rule,
        entries: &[(&str, &str)],
        o: LimitOverride,
    ) -> Option<CounterKey> {
        let group = self.client_group(&rule.client, entries)?;
        let rate = override_rate(o);
        let member = self.hash_parts(
            TAG_OVERRIDE,
            [rule.name.as_bytes(), rate.as_slice()].into_iter(),
        );
        Some(Self::key(group, member))
    }

    /// Counter key for an override no rule claims: every entry, as envoyproxy/ratelimit keys.
    fn entries_key(&self, domain: &str, entries: &[(&str, &str)], o: LimitOverride) -> CounterKey {
        let parts = std::iter::once(domain.as_bytes()).chain(
            entries
                .iter()
                .flat_map(|(k, v)| [k.as_bytes(), v.as_bytes()]),
        );
        let group = self.hash_parts(TAG_OVERRIDE_ENTRIES, parts);
        let rate = override_rate(o);
        Self::key(group, u64::from_le_bytes(rate))
    }

    /// Counter key of an automatic-block limit for one address.
    fn address_key(&self, limit_id: u64, address: &str) -> CounterKey {
        let group = self.hash_one(TAG_ADDRESS, address.as_bytes());
        Self::key(group, limit_id)
    }
}

/// Domain separation of the keyed hashes: a client's values can never hash like an address or
/// an override's entries.
const TAG_CLIENT: u8 = 1;
const TAG_ADDRESS: u8 = 2;
const TAG_OVERRIDE: u8 = 3;
const TAG_OVERRIDE_ENTRIES: u8 = 4;

/// An override's rate as 8 bytes: requests per unit, and the unit's length in seconds (which
/// fits 32 bits for every unit up to a year).
fn override_rate(o: LimitOverride) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&o.requests_per_unit.to_le_bytes());
    b[4..].copy_from_slice(&(o.unit.seconds() as u32).to_le_bytes());
    b
}

/// murmur3's 64-bit finaliser: a bijection on `u64` that spreads every input bit over the
/// output (the memory store hashes its maps with the low half of a key).
fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// The identity of a request's client in its domain.
struct ClientId<'a> {
    hash: u128,
    /// The descriptor it was read from, and that descriptor's client group (reused for its
    /// counter keys rather than hashed again).
    descriptor: usize,
    group: u64,
    /// The descriptor's entries (every client entry is among them).
    entries: &'a [(&'a str, &'a str)],
    address: Option<&'a str>,
}

/// Gives every rule of `rules` its counters from `stats` (the same ones across reloads).
fn attach_stats(mut rules: RuleSet, stats: &Stats) -> RuleSet {
    for d in &mut rules.domains {
        d.stats = stats.counts_for(&d.name, "");
        for r in &mut d.rules {
            r.stats = stats.counts_for(&d.name, &r.name);
            for l in &mut r.limits {
                l.counts = stats.limit_counts_for(&d.name, &r.name, &l.name);
            }
        }
        if let Some(ab) = &mut d.auto_block {
            for l in ab.max_requests.iter_mut().chain(ab.max_limited.iter_mut()) {
                l.counts = stats.limit_counts_for(&d.name, "auto-block", &l.name);
            }
        }
    }
    if let Some(r) = &rules.reference {
        for t in &r.trees {
            for l in t.limits() {
                let _ = l.stats.set(stats.keys.get(&l.key));
            }
        }
    }
    rules
}

/// Records that descriptor `index` is subject to `source`, counted in `key`.
#[allow(clippy::too_many_arguments)]
fn plan<'r: 'p, 'p>(
    planned: &mut SmallVec<[Planned<'r, 'p>; 8]>,
    counters: &mut Counters<'p>,
    index: usize,
    rule: Option<&'r Rule>,
    hits: Hits,
    source: Source<'r, 'p>,
    key: CounterKey,
    kind: ChargeKind,
) {
    let charge = merge(
        counters,
        Charge {
            key,
            policy: source.policy(),
            hits,
            kind,
        },
    );
    planned.push(Planned {
        descriptor: index,
        rule,
        source,
        charge,
        blocking: kind == ChargeKind::Enforce,
    });
}

/// Adds `key` to the request's distinct counters, or merges into an existing one: a counter
/// reached by several descriptors is charged once per request (the largest hit count), so a
/// domain-wide limit counts requests, not descriptors.
fn merge<'r>(counters: &mut Counters<'r>, charge: Charge<'r>) -> usize {
    if let Some(i) = counters.iter().position(|c| c.key == charge.key) {
        let c = &mut counters[i];
        c.hits = match (c.hits, charge.hits) {
            (Hits::Take(a), Hits::Take(b)) => Hits::Take(a.max(b)),
            (Hits::Return(a), Hits::Return(b)) => Hits::Return(a.max(b)),
            (Hits::Take(a), Hits::Return(b)) | (Hits::Return(b), Hits::Take(a)) => {
                if a >= b {
                    Hits::Take(a - b)
                } else {
                    Hits::Return(b - a)
                }
            }
        };
        c.kind = c.kind.max(charge.kind);
        i
    } else {
        counters.push(charge);
        counters.len() - 1
    }
}

/// Per-limit counts: a rejection is counted against the limit each over descriptor reports;
/// a would-be rejection against every non-enforced limit that was over.
fn count_limits(planned: &[Planned<'_, '_>], verdicts: &[Verdict], decision: &Decision) {
    for p in planned {
        let Source::Config(limit) = p.source else {
            continue;
        };
        let Some(v) = verdicts.get(p.charge) else {
            continue;
        };
        if v.allowed {
            continue;
        }
        if !p.blocking {
            limit.counts.shadow_over.fetch_add(1, Ordering::Relaxed);
        } else if decision
            .statuses
            .get(p.descriptor)
            .and_then(|s| s.limit.as_ref())
            .is_some_and(|r| std::ptr::eq(r.name, &*limit.name))
        {
            limit.counts.over.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The policy and reported form of a descriptor override: a sliding window of one unit.
fn override_policy(o: LimitOverride) -> (Policy, Reported) {
    let window =
        NonZeroU64::new(o.unit.seconds().saturating_mul(1_000_000_000)).unwrap_or(NonZeroU64::MIN);
    (
        Policy::SlidingWindow {
            limit: u64::from(o.requests_per_unit),
            window,
        },
        Reported {
            requests_per_unit: o.requests_per_unit,
            unit: o.unit,
        },
    )
}

/// Fills `decision` (as [`Decision::default`] leaves it) with each descriptor's status and the
/// request's outcome.
fn summarise<'r>(
    descriptors: usize,
    planned: &[Planned<'r, '_>],
    verdicts: &[Verdict],
    decision: &mut Decision<'r>,
) {
    decision.statuses.reserve(descriptors);
    for index in 0..descriptors {
        let mut best: Option<(&Planned<'r, '_>, &Verdict)> = None;
        let mut over = false;
        for p in planned.iter().filter(|p| p.descriptor == index) {
            let Some(v) = verdicts.get(p.charge) else {
                continue;
            };
            let denied = !v.allowed && p.blocking;
            best = match best {
                None => Some((p, v)),
                // Over: report the enforced denial that admits the request last.
                Some(_) if denied && !over => Some((p, v)),
                Some((bp, bv)) if denied => {
                    if v.reset_after > bv.reset_after {
                        Some((p, v))
                    } else {
                        Some((bp, bv))
                    }
                }
                Some((_, bv)) if !over && v.remaining < bv.remaining => Some((p, v)),
                keep => keep,
            };
            over |= denied;
        }
        let status = match best {
            None => Status::UNLIMITED,
            Some((p, v)) => {
                let (name, reported) = match p.source {
                    Source::Config(l) => (&*l.name, l.reported),
                    Source::Override(_, r) => (OVERRIDE_NAME, r),
                };
                if over
                    && decision
                        .retry
                        .as_ref()
                        .is_none_or(|(t, _)| v.reset_after > *t)
                {
                    decision.retry = Some((v.reset_after, name));
                }
                let capacity = p.source.policy().capacity();
                Status {
                    over,
                    limit: Some(ReportedLimit { name, reported }),
                    remaining: v.remaining,
                    reset_after: v.reset_after,
                    // 80% or more of the limit used.
                    near: !over && capacity > 0 && v.remaining.saturating_mul(5) <= capacity,
                }
            }
        };
        decision.over |= status.over;
        decision.statuses.push(status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::{MemoryStore, MemoryStoreOptions};

    fn limiter() -> Limiter<MemoryStore> {
        Limiter::new(
            RuleSet::default(),
            MemoryStore::new(MemoryStoreOptions::default()),
            Arc::new(ManualClock::new(Timestamp::from_secs(0))),
        )
        .with_key_secret(b"test")
    }

    fn ready<F: std::future::Future>(f: F) -> F::Output {
        futures_util::FutureExt::now_or_never(f).expect("a MemoryStore decision never waits")
    }

    fn rules(limit: &str) -> RuleSet {
        let yaml = format!(
            "domains:\n  - name: d\n    client: [remote_address]\n    endpoints:\n      - path: /x\n        limits: [{limit}]\n"
        );
        crate::config::parse(&yaml, "test.yaml", |_| None)
            .expect("valid config")
            .rules
    }

    /// A decision borrows its limits' names from the rules it was made with: held across a
    /// reload, those rules stay alive and keep answering; the next `rules_in_force` sees the new.
    #[test]
    fn rules_in_force_outlive_a_reload_and_decide_as_they_were() {
        let l = limiter();
        l.swap_rules(rules("10/minute"));
        let request = Request {
            domain: "d",
            descriptors: smallvec::smallvec![Descriptor {
                entries: smallvec::smallvec![("path", "/x"), ("remote_address", "10.0.0.1")],
                hits: Hits::Take(1),
                limit_override: None,
            }],
        };
        let now = Timestamp::from_secs(30);
        let before = l.rules_in_force();
        l.swap_rules(rules("5/hour"));
        let old = ready(l.decide_at(&before, &request, now));
        let after = l.rules_in_force();
        let new = ready(l.decide_at(&after, &request, now));
        let reported = |d: &Decision<'_>| {
            let limit = d.statuses[0].limit.as_ref().expect("a limit applies");
            (limit.name.to_string(), limit.reported.requests_per_unit)
        };
        assert_eq!(reported(&old), ("per minute".to_string(), 10));
        assert_eq!(reported(&new), ("per hour".to_string(), 5));
    }

    /// An IPv4 client seen as `::ffff:192.0.2.7` on a dual-stack listener is the same client
    /// as `192.0.2.7`: one counter, one statistics entry, one automatic block.
    #[test]
    fn both_spellings_of_an_ipv4_client_are_one_client() {
        let yaml = "domains:\n  - name: d\n    auto_block:\n      max_requests: 4/minute\n    endpoints:\n      - path: /x\n        limits: [3/minute]\n";
        let cfg = crate::config::parse(yaml, "test.yaml", |_| None).expect("valid config");
        let l = limiter();
        l.swap_rules(cfg.rules);
        let decide = |address: &str| {
            let request = Request {
                domain: "d",
                descriptors: smallvec::smallvec![Descriptor {
                    entries: smallvec::smallvec![("path", "/x"), ("remote_address", address)],
                    hits: Hits::Take(1),
                    limit_override: None,
                }],
            };
            let rules = l.rules_in_force();
            let d = ready(l.decide_at(&rules, &request, Timestamp::from_secs(30)));
            (d.over, d.blocked.is_some())
        };
        assert_eq!(decide("192.0.2.7"), (false, false));
        assert_eq!(decide("::ffff:192.0.2.7"), (false, false));
        assert_eq!(decide("::ffff:c000:207"), (false, false));
        assert_eq!(
            decide("::FFFF:192.0.2.7"),
            (true, false),
            "the 4th of 3/minute"
        );
        assert_eq!(decide("192.0.2.7"), (true, false), "the 5th: over 4/minute");
        assert_eq!(decide("::ffff:192.0.2.7"), (true, true), "blocked");
        let blocks = l.access().blocks_at(Timestamp::from_secs(30));
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].net.to_string(), "192.0.2.7/32");
        let clients = l.stats().find_clients("192.0.2.7");
        assert_eq!(clients.len(), 1);
        assert_eq!(clients[0].address.as_deref(), Some("192.0.2.7"));
        let c = clients[0].counts;
        assert_eq!((c.allowed, c.limited, c.blocked), (3, 2, 1));
        // Other entries and addresses are left as they are.
        assert_eq!(decide("2001:db8::ffff:1"), (false, false));
        assert_eq!(l.stats().find_clients("2001:db8::ffff:1").len(), 1);
    }

    #[test]
    fn short_and_long_inputs_hash_the_same_bytes() {
        let l = limiter();
        for parts in [
            vec!["10.0.0.1"],
            vec!["user-1", ""],
            vec![""; 3],
            vec!["x"; 25], // 25 * 5 bytes: the last one that fits the stack buffer
        ] {
            let bytes = || parts.iter().map(|p| p.as_bytes());
            assert_eq!(
                l.hash_parts(TAG_CLIENT, bytes()),
                l.hash_parts_streaming(TAG_CLIENT, bytes()),
                "{parts:?}"
            );
        }
        // One part, hashed where it lies: the same as through the buffer or streamed.
        for len in [0, 1, 2, 3, 7, 8, 11, 12, 19, 64, 123, 124, 300] {
            let v = "7".repeat(len);
            let once = || std::iter::once(v.as_bytes());
            assert_eq!(
                l.hash_one(TAG_ADDRESS, v.as_bytes()),
                l.hash_parts(TAG_ADDRESS, once())
            );
            assert_eq!(
                l.hash_one(TAG_ADDRESS, v.as_bytes()),
                l.hash_parts_streaming(TAG_ADDRESS, once()),
                "{len}"
            );
        }
    }

    #[test]
    fn long_client_values_are_told_apart() {
        let l = limiter();
        let a = "a".repeat(300);
        let b = format!("{}b", "a".repeat(299));
        let group = |v: &str| l.client_group(&["id".to_string()], &[("id", v)]);
        assert_ne!(group(&a), group(&b));
        assert_eq!(group(&a), group(&a.clone()));
        // Length prefixes keep ("ab", "c") apart from ("a", "bc").
        let two = |x: &str, y: &str| {
            l.client_group(&["k".to_string(), "l".to_string()], &[("k", x), ("l", y)])
        };
        assert_ne!(two("ab", "c"), two("a", "bc"));
        assert_eq!(two("a", "missing"), two("a", "missing"));
        assert_eq!(
            l.client_group(&["k".to_string(), "l".to_string()], &[("k", "a")]),
            None
        );
    }

    #[test]
    fn keys_of_one_group_never_collide_and_tags_separate_uses() {
        let g = 0x0123_4567_89ab_cdef;
        let keys: std::collections::HashSet<CounterKey> = (0..10_000u64)
            .map(|m| Limiter::<MemoryStore>::key(g, m))
            .collect();
        assert_eq!(keys.len(), 10_000);
        assert!(keys.iter().all(|k| (k.0 >> 64) as u64 == g));
        let l = limiter();
        assert_ne!(
            l.hash_parts(TAG_CLIENT, std::iter::once(b"10.0.0.1".as_slice())),
            l.hash_parts(TAG_ADDRESS, std::iter::once(b"10.0.0.1".as_slice()))
        );
    }
}
