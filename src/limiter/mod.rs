//! The decision: which limits a request's descriptors touch, and whether it may pass.
//!
//! Per request the limiter reads the current [`RuleSet`] (one atomic load, no lock), reads the
//! clock once, builds one [`Charge`] per distinct counter, and hands the batch to the store,
//! which charges all of it or nothing. It then picks, per descriptor, the status Envoy needs.
//! No heap allocation on this path for requests of up to 4 descriptors and 8 counters.

pub mod algorithms;
pub mod model;
pub mod path;

use std::hash::Hasher;
use std::num::NonZeroU64;
use std::sync::Arc;

use arc_swap::ArcSwap;
use siphasher::sip128::{Hasher128, SipHasher13};
use smallvec::SmallVec;

use crate::clock::{Clock, Timestamp};
use crate::store::{Charge, CounterKey, Store, StoreError, Verdict};
use algorithms::{Hits, Policy};
use model::{Limit, Reported, Rule, RuleSet, Unit, lookup};

/// A request, borrowed from whatever carried it (the Envoy proto in practice).
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    /// The rate limit domain.
    pub domain: &'a str,
    /// Descriptors in request order.
    pub descriptors: SmallVec<[Descriptor<'a>; 4]>,
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
pub struct Status {
    /// Whether this descriptor is over an enforced limit.
    pub over: bool,
    /// The limit reported: the one closest to running out, or for an over-limit descriptor the
    /// one that admits the request last. `None` when no rule matched.
    pub limit: Option<ReportedLimit>,
    /// Single hits left under that limit.
    pub remaining: u64,
    /// Nanoseconds until it resets (until the request would be admitted, when over).
    pub reset_after: u64,
}

/// A limit as reported to Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedLimit {
    /// The limit's name.
    pub name: Arc<str>,
    /// Rate and unit.
    pub reported: Reported,
}

/// The answer for a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// Whether any descriptor is over an enforced limit.
    pub over: bool,
    /// One per request descriptor, in order.
    pub statuses: SmallVec<[Status; 4]>,
    /// When over: nanoseconds until the same request would be admitted, and the name of the
    /// limit that decides it.
    pub retry: Option<(u64, Arc<str>)>,
}

/// Why no decision could be made.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// The store failed.
    #[error("counter store: {0}")]
    Store(#[from] StoreError),
}

/// Makes decisions against a swappable rule set and a store.
pub struct Limiter<S> {
    rules: ArcSwap<RuleSet>,
    store: S,
    clock: Arc<dyn Clock>,
    keys: (u64, u64),
}

impl<S: std::fmt::Debug> std::fmt::Debug for Limiter<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Where a charge's policy comes from: the rule set, or a descriptor's override.
#[derive(Clone, Copy)]
enum Source<'r> {
    Config(&'r Limit),
    Override(Policy, Reported),
}

impl Source<'_> {
    fn policy(&self) -> &Policy {
        match self {
            Source::Config(l) => &l.policy,
            Source::Override(p, _) => p,
        }
    }
}

/// One (descriptor, limit) pair and the distinct counter it charges.
struct Planned<'r> {
    descriptor: usize,
    source: Source<'r>,
    charge: usize,
    blocking: bool,
}

const OVERRIDE_NAME: &str = "override";

impl<S: Store> Limiter<S> {
    /// A limiter over `rules` and `store`, reading time from `clock`.
    pub fn new(rules: RuleSet, store: S, clock: Arc<dyn Clock>) -> Self {
        Self {
            rules: ArcSwap::from_pointee(rules),
            store,
            clock,
            // Keyed hashing: clients cannot craft counter-key collisions without these.
            keys: (rand::random(), rand::random()),
        }
    }

    /// The rule set in force.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.rules.load_full()
    }

    /// Replaces the rule set; requests already deciding finish on the old one.
    pub fn swap_rules(&self, rules: RuleSet) {
        self.rules.store(Arc::new(rules));
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Decides `request` at the clock's current time.
    pub async fn decide(&self, request: &Request<'_>) -> Result<Decision, DecideError> {
        self.decide_at(request, self.clock.now()).await
    }

    /// Decides `request` at `now`.
    pub async fn decide_at(
        &self,
        request: &Request<'_>,
        now: Timestamp,
    ) -> Result<Decision, DecideError> {
        let rules = self.rules.load();
        let unmatched = || Status {
            over: false,
            limit: None,
            remaining: 0,
            reset_after: 0,
        };
        let Some(domain) = rules.domain(request.domain) else {
            return Ok(Decision {
                over: false,
                statuses: request.descriptors.iter().map(|_| unmatched()).collect(),
                retry: None,
            });
        };

        let mut planned: SmallVec<[Planned<'_>; 8]> = SmallVec::new();
        let mut counters: SmallVec<[(CounterKey, Hits, bool); 8]> = SmallVec::new();
        for (index, d) in request.descriptors.iter().enumerate() {
            let routed = domain.route(&d.entries);
            match (d.limit_override, routed) {
                (Some(o), rule) => {
                    let (policy, reported) = override_policy(o);
                    let key = match rule.and_then(|r| self.client_key(r, &d.entries, o)) {
                        Some(k) => k,
                        None => self.entries_key(domain.name.as_str(), &d.entries, o),
                    };
                    plan(
                        &mut planned,
                        &mut counters,
                        index,
                        d.hits,
                        Source::Override(policy, reported),
                        key,
                        rules.enabled,
                    );
                }
                (None, Some(rule)) => {
                    for limit in &rule.limits {
                        if let Some(key) = self.limit_key(rule, limit, &d.entries) {
                            plan(
                                &mut planned,
                                &mut counters,
                                index,
                                d.hits,
                                Source::Config(limit),
                                key,
                                rules.enabled && !limit.shadow,
                            );
                        }
                    }
                }
                (None, None) => {}
            }
            for rule in domain.conditional(&d.entries) {
                for limit in &rule.limits {
                    if let Some(key) = self.limit_key(rule, limit, &d.entries) {
                        plan(
                            &mut planned,
                            &mut counters,
                            index,
                            d.hits,
                            Source::Config(limit),
                            key,
                            rules.enabled && !limit.shadow,
                        );
                    }
                }
            }
        }

        let mut verdicts: SmallVec<[Verdict; 8]> =
            SmallVec::from_elem(Verdict::default(), counters.len());
        if !counters.is_empty() {
            // The policy of each counter: that of the first plan that created it.
            let charges: SmallVec<[Charge<'_>; 8]> = counters
                .iter()
                .enumerate()
                .map(|(i, &(key, hits, blocking))| {
                    let policy = planned
                        .iter()
                        .find(|p| p.charge == i)
                        .map_or(&FALLBACK, |p| p.source.policy());
                    Charge {
                        key,
                        policy,
                        hits,
                        blocking,
                    }
                })
                .collect();
            self.store.apply(&charges, &mut verdicts, now).await?;
        }
        Ok(summarise(request.descriptors.len(), &planned, &verdicts))
    }

    /// Counter key of `limit` of `rule` for the client named by `entries`; `None` if the
    /// descriptor lacks one of the rule's client entries.
    fn limit_key(
        &self,
        rule: &Rule,
        limit: &Limit,
        entries: &[(&str, &str)],
    ) -> Option<CounterKey> {
        let mut h = SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        h.write_u64(limit.id);
        for k in &rule.client {
            let v = lookup(entries, k)?;
            h.write_usize(v.len());
            h.write(v.as_bytes());
        }
        Some(CounterKey(h.finish128().as_u128()))
    }

    /// Counter key for an override on a routed rule: the rule's client, the override's rate.
    fn client_key(
        &self,
        rule: &Rule,
        entries: &[(&str, &str)],
        o: LimitOverride,
    ) -> Option<CounterKey> {
        let mut h = SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        h.write(b"override");
        h.write_usize(rule.name.len());
        h.write(rule.name.as_bytes());
        h.write_u32(o.requests_per_unit);
        h.write_u64(o.unit.seconds());
        for k in &rule.client {
            let v = lookup(entries, k)?;
            h.write_usize(v.len());
            h.write(v.as_bytes());
        }
        Some(CounterKey(h.finish128().as_u128()))
    }

    /// Counter key for an override no rule claims: every entry, as envoyproxy/ratelimit keys.
    fn entries_key(&self, domain: &str, entries: &[(&str, &str)], o: LimitOverride) -> CounterKey {
        let mut h = SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        h.write(b"override-entries");
        h.write_usize(domain.len());
        h.write(domain.as_bytes());
        h.write_u32(o.requests_per_unit);
        h.write_u64(o.unit.seconds());
        for (k, v) in entries {
            h.write_usize(k.len());
            h.write(k.as_bytes());
            h.write_usize(v.len());
            h.write(v.as_bytes());
        }
        CounterKey(h.finish128().as_u128())
    }
}

/// Never used: every counter is created by a plan. Keeps the policy lookup total.
static FALLBACK: Policy = Policy::FixedWindow {
    limit: 0,
    window: NonZeroU64::MIN,
};

/// Records that descriptor `index` is subject to `source`, counted in `key`.
#[allow(clippy::too_many_arguments)]
fn plan<'r>(
    planned: &mut SmallVec<[Planned<'r>; 8]>,
    counters: &mut SmallVec<[(CounterKey, Hits, bool); 8]>,
    index: usize,
    hits: Hits,
    source: Source<'r>,
    key: CounterKey,
    blocking: bool,
) {
    let charge = merge(counters, key, hits, blocking);
    planned.push(Planned {
        descriptor: index,
        source,
        charge,
        blocking,
    });
}

/// Adds `key` to the request's distinct counters, or merges into an existing one: a counter
/// reached by several descriptors is charged once per request (the largest hit count), so a
/// domain-wide limit counts requests, not descriptors.
fn merge(
    counters: &mut SmallVec<[(CounterKey, Hits, bool); 8]>,
    key: CounterKey,
    hits: Hits,
    blocking: bool,
) -> usize {
    if let Some(i) = counters.iter().position(|(k, _, _)| *k == key) {
        let (_, h, b) = &mut counters[i];
        *h = match (*h, hits) {
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
        *b |= blocking;
        i
    } else {
        counters.push((key, hits, blocking));
        counters.len() - 1
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

fn summarise(descriptors: usize, planned: &[Planned<'_>], verdicts: &[Verdict]) -> Decision {
    let mut decision = Decision {
        over: false,
        statuses: SmallVec::with_capacity(descriptors),
        retry: None,
    };
    for index in 0..descriptors {
        let mut best: Option<(&Planned<'_>, &Verdict)> = None;
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
            None => Status {
                over: false,
                limit: None,
                remaining: 0,
                reset_after: 0,
            },
            Some((p, v)) => {
                let (name, reported) = match p.source {
                    Source::Config(l) => (l.name.clone(), l.reported),
                    Source::Override(_, r) => (Arc::from(OVERRIDE_NAME), r),
                };
                if over
                    && decision
                        .retry
                        .as_ref()
                        .is_none_or(|(t, _)| v.reset_after > *t)
                {
                    decision.retry = Some((v.reset_after, name.clone()));
                }
                Status {
                    over,
                    limit: Some(ReportedLimit { name, reported }),
                    remaining: v.remaining,
                    reset_after: v.reset_after,
                }
            }
        };
        decision.over |= status.over;
        decision.statuses.push(status);
    }
    decision
}
