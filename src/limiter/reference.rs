//! Decisions for envoyproxy/ratelimit's rules, made as the reference makes them, so that moving
//! to sluice changes no answer (its `service/ratelimit.go`, `limiter/base_limiter.go` and
//! `redis/fixed_cache_impl.go`):
//! - per descriptor, at most one rule ([`Tree::find`]), or the descriptor's `limit` override;
//!   `unlimited` rules answer OK with `limit_remaining` 4294967295; a rule named in another
//!   matched rule's `replaces` is dropped;
//! - fixed windows aligned to the epoch, counted with every hit of every descriptor, admitted or
//!   not, unless `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT` (then a refused request charges only
//!   the rules it was over); a descriptor is over when its count after the hits exceeds the
//!   limit; `duration_until_reset` is the time to the next window boundary in whole seconds;
//! - shadow rules and `SHADOW_MODE` answer OK; quota rules refuse only when all are over;
//! - the reference's per-key statistics ([`KeyStats`]) and optional headers and dynamic
//!   metadata.
//!
//! Blocks and the allowlist apply first, as for sluice's own rules.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use smallvec::SmallVec;

use super::model::{Reported, Unit};
use super::tree::{RuleLimit, Tree};
use super::{DecideError, Decision, Limiter, ReportedLimit, Request, Status};
use crate::algorithms::Hits;
use crate::clock::Timestamp;
use crate::stats::{KeyStats, Outcome};
use crate::store::{CounterKey, Store, Tally};

/// Headers added to every response when `LIMIT_RESPONSE_HEADERS_ENABLED` is true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitHeaders {
    /// `LIMIT_LIMIT_HEADER` (default `RateLimit-Limit`).
    pub limit: String,
    /// `LIMIT_REMAINING_HEADER` (default `RateLimit-Remaining`).
    pub remaining: String,
    /// `LIMIT_RESET_HEADER` (default `RateLimit-Reset`).
    pub reset: String,
}

/// How Redis keys of reference rules are named (`SLUICE_REDIS_KEYS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyNames {
    /// The reference's own keys (`<CACHE_KEY_PREFIX><domain>_<key>_<value>_..._<window start>`),
    /// the default: sluice and reference replicas share one Redis during a migration, and a
    /// reference deployment needs no new setting (no `SLUICE_KEY_SECRET`).
    #[default]
    Reference,
    /// sluice's keyed hashes: short, and no client value in a key name; replicas need the same
    /// `SLUICE_KEY_SECRET`.
    Sluice,
}

/// The reference's settings that decide answers and statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceSettings {
    /// `MERGE_DOMAIN_CONFIG`: files of one domain are merged instead of refused.
    pub merge_domain_config: bool,
    /// `SHADOW_MODE`: every OVER_LIMIT answered OK (and counted as `global_shadow_mode`).
    pub shadow_mode: bool,
    /// `QUOTA_MODE`: every rule in quota mode.
    pub quota_mode: bool,
    /// `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT`: a refused request charges only the rules it
    /// was over; by default every rule of the request is charged.
    pub stop_increment_when_over: bool,
    /// `NEAR_LIMIT_RATIO` (default 0.8).
    pub near_limit_ratio: f32,
    /// `LIMIT_RESPONSE_HEADERS_ENABLED` with its three header names.
    pub headers: Option<LimitHeaders>,
    /// `RESPONSE_DYNAMIC_METADATA`.
    pub dynamic_metadata: bool,
    /// `HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED`: unhealthy while no domain is loaded.
    pub healthy_with_one_config: bool,
    /// `LOCAL_CACHE_SIZE_IN_BYTES`: 0 turns the local over-limit cache off.
    pub local_cache_bytes: u64,
    /// `CACHE_KEY_PREFIX`, for reference key names.
    pub cache_key_prefix: String,
    /// `EXPIRATION_JITTER_MAX_SECONDS` (default 300), added to Redis keys' TTLs.
    pub expiration_jitter_max_seconds: u64,
    /// `SLUICE_REDIS_KEYS`: `reference` (default) or `sluice`.
    pub key_names: KeyNames,
}

impl Default for ReferenceSettings {
    fn default() -> Self {
        Self {
            merge_domain_config: false,
            shadow_mode: false,
            quota_mode: false,
            stop_increment_when_over: false,
            near_limit_ratio: 0.8,
            headers: None,
            dynamic_metadata: false,
            healthy_with_one_config: false,
            local_cache_bytes: 0,
            cache_key_prefix: String::new(),
            expiration_jitter_max_seconds: 300,
            key_names: KeyNames::Reference,
        }
    }
}

/// A rule set of reference files: one tree per domain, and the settings read with them (the
/// reference reads its settings again at every config load, and so does sluice).
#[derive(Debug, Default)]
pub struct ReferenceRules {
    /// One tree per domain, in load order.
    pub trees: Vec<Tree>,
    /// The settings.
    pub settings: ReferenceSettings,
    /// The files loaded, for `sluice check` and logs.
    pub files: Vec<String>,
}

impl ReferenceRules {
    /// The tree of `domain`.
    pub fn tree(&self, domain: &str) -> Option<&Tree> {
        self.trees.iter().find(|t| t.domain == domain)
    }
}

/// What a reference decision adds to the response besides statuses.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReferenceExtras {
    /// `LIMIT_RESPONSE_HEADERS_ENABLED`: the headers, in order.
    pub headers: Vec<(String, String)>,
    /// `RESPONSE_DYNAMIC_METADATA`: the `metadata` of the rules of the descriptors that passed,
    /// merged (`None` when the setting is off).
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Service-wide counters of reference rules, as the reference names them.
#[derive(Debug, Default)]
pub struct ServiceCounts {
    /// Requests answered OK only because of `SHADOW_MODE`.
    pub global_shadow_mode: AtomicU64,
    /// Requests for a domain with no rules.
    pub domain_not_found: AtomicU64,
}

/// The rule a descriptor is subject to, as the decision reads it (a configured rule, or the
/// descriptor's `limit` override, which has no name and is never shadowed).
struct Chosen<'r> {
    requests_per_unit: u32,
    unit: Unit,
    name: &'r str,
    shadow: bool,
    quota: bool,
    metadata: Option<&'r serde_json::Map<String, serde_json::Value>>,
    stats: StatsRef<'r>,
    /// Per entry index, the `share_threshold` pattern counted in place of the entry's value.
    shared: SmallVec<[(usize, &'r str); 1]>,
}

/// A rule's statistics: its own, borrowed from the rule set, or those of a key built for this
/// request (`detailed_metric`, `value_to_metric`, an override). Borrowing spares the request
/// path a reference-count write to a cache line every core shares.
enum StatsRef<'r> {
    Rule(&'r KeyStats),
    Key(Arc<KeyStats>),
}

impl std::ops::Deref for StatsRef<'_> {
    type Target = KeyStats;
    fn deref(&self) -> &KeyStats {
        match self {
            StatsRef::Rule(s) => s,
            StatsRef::Key(s) => s,
        }
    }
}

/// One descriptor of a request on its way through the decision.
struct Slot<'r> {
    /// Its rule; `None` when none applies (or it was replaced, or is unlimited).
    chosen: Option<Chosen<'r>>,
    /// It matched an `unlimited` rule.
    unlimited: bool,
    /// Hits it adds.
    hits: u64,
    /// Its counter.
    key: CounterKey,
    /// Known over its limit in this window (the local cache): not counted again.
    cached: bool,
    /// Over its limit once this request's hits are added (read first, with
    /// `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT`).
    would_be_over: bool,
    /// Its count after this request.
    after: u64,
}

/// Domain separation of reference counter keys from sluice's own.
const TAG_REFERENCE: u8 = 5;

/// Whole seconds to the next boundary of `unit`, as the reference computes it.
fn reset_secs(unit: Unit, now: Timestamp) -> u64 {
    let secs = now.as_nanos() / 1_000_000_000;
    unit.seconds() - secs % unit.seconds()
}

/// How one descriptor's hits are counted in the reference's statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Counted {
    over: bool,
    remaining: u64,
    near: bool,
    over_limit: u64,
    near_limit: u64,
    within_limit: u64,
    shadow_mode: u64,
}

/// The reference's `GetResponseDescriptorStatus` for a limit of `limit`: whether the descriptor
/// is over, what remains, and how its `hits` split between the statistics, given the count
/// `after` them (the count before may be less than `after - hits` when they were not added:
/// the reference computes it so and so does this). `cached`: refused from the local cache.
fn judge(limit: u64, ratio: f32, after: u64, hits: u64, cached: bool, shadow: bool) -> Counted {
    let before = after.wrapping_sub(hits);
    let mut c = Counted::default();
    if cached {
        c.over = true;
        c.over_limit = hits;
    } else {
        let near_at = (limit as f32 * ratio).floor() as u64;
        if after > limit {
            c.over = true;
            if before >= limit {
                c.over_limit = hits;
            } else {
                c.over_limit = after - limit;
                c.near_limit = limit - near_at.max(before).min(limit);
            }
        } else {
            c.remaining = limit - after;
            c.near = after > near_at;
            if c.near {
                c.near_limit = if before >= near_at {
                    hits
                } else {
                    after - near_at
                };
            }
            c.within_limit = hits;
        }
    }
    if c.over && shadow {
        c.shadow_mode = if cached || before >= limit {
            hits
        } else {
            after - limit
        };
    }
    c
}

impl<S: Store> Limiter<S> {
    /// Decides `request` under reference rules; see the module docs.
    pub(super) async fn decide_reference<'r>(
        &self,
        rules: &'r ReferenceRules,
        request: &Request<'_>,
        now: Timestamp,
        decision: &mut Decision<'r>,
    ) -> Result<(), DecideError> {
        let settings = &rules.settings;
        decision.reference = true;
        let Some(tree) = rules.tree(request.domain) else {
            self.reference_counts
                .domain_not_found
                .fetch_add(1, Ordering::Relaxed);
            self.stats.total.record(Outcome::Allowed, false);
            decision
                .statuses
                .extend(request.descriptors.iter().map(|_| Status::UNLIMITED));
            return Ok(());
        };

        let mut slots = self.choose(tree, request);
        let cache_on = settings.local_cache_bytes > 0;
        for s in &mut slots {
            if cache_on && s.chosen.is_some() {
                s.cached = self.local_cache.is_over(s.key, now);
            }
        }
        let any_cached = slots.iter().any(|s| s.cached);
        let names: SmallVec<[String; 2]> = match settings.key_names {
            KeyNames::Sluice => SmallVec::new(),
            KeyNames::Reference => slots
                .iter()
                .zip(&request.descriptors)
                .map(|(s, d)| match &s.chosen {
                    Some(c) => reference_key_name(
                        &settings.cache_key_prefix,
                        &tree.domain,
                        &d.entries,
                        c,
                        now,
                    ),
                    None => String::new(),
                })
                .collect(),
        };
        let tally = |i: usize, s: &Slot<'_>, hits: Option<u64>| Tally {
            key: s.key,
            name: names.get(i).map_or("", String::as_str),
            window_secs: s.chosen.as_ref().map_or(1, |c| c.unit.seconds()),
            hits,
            ttl_jitter_secs: settings.expiration_jitter_max_seconds,
        };

        // With STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT, a first read finds the rules this
        // request would take over their limit.
        if settings.stop_increment_when_over && !any_cached {
            let (reads, counts) = self
                .tally_counted(
                    &slots,
                    |i, s| (s.chosen.is_some()).then(|| tally(i, s, None)),
                    now,
                )
                .await?;
            for (i, count) in reads.into_iter().zip(counts) {
                let s = &mut slots[i];
                if let Some(c) = &s.chosen {
                    s.would_be_over = count.saturating_add(s.hits) > u64::from(c.requests_per_unit);
                }
            }
        }
        let any_would_be_over = slots.iter().any(|s| s.would_be_over);
        let stop = settings.stop_increment_when_over;
        let (counted, counts) = self
            .tally_counted(
                &slots,
                |i, s| {
                    (s.chosen.is_some() && !s.cached).then(|| {
                        let charged =
                            !stop || (!any_cached && (!any_would_be_over || s.would_be_over));
                        tally(i, s, Some(if charged { s.hits } else { 0 }))
                    })
                },
                now,
            )
            .await?;
        for (i, count) in counted.into_iter().zip(counts) {
            slots[i].after = count;
        }

        // Statuses, as the reference's service worker writes them.
        let mut failed = 0usize;
        let (mut quota_total, mut quota_failed) = (0usize, 0usize);
        let mut minimum: Option<(u64, usize)> = None;
        for (i, s) in slots.iter().enumerate() {
            let status = match &s.chosen {
                None => Status {
                    remaining: if s.unlimited { u64::from(u32::MAX) } else { 0 },
                    ..Status::UNLIMITED
                },
                Some(c) => {
                    let limit = u64::from(c.requests_per_unit);
                    let counted = judge(
                        limit,
                        settings.near_limit_ratio,
                        s.after,
                        s.hits,
                        s.cached,
                        c.shadow,
                    );
                    let k = &c.stats;
                    k.total_hits.fetch_add(s.hits, Ordering::Relaxed);
                    for (stat, n) in [
                        (&k.over_limit, counted.over_limit),
                        (&k.near_limit, counted.near_limit),
                        (&k.within_limit, counted.within_limit),
                        (&k.shadow_mode, counted.shadow_mode),
                    ] {
                        if n > 0 {
                            stat.fetch_add(n, Ordering::Relaxed);
                        }
                    }
                    if s.cached {
                        k.over_limit_with_local_cache
                            .fetch_add(s.hits, Ordering::Relaxed);
                    } else if counted.over && cache_on {
                        self.local_cache
                            .remember(s.key, now, c.unit, settings.local_cache_bytes);
                    }
                    Status {
                        over: counted.over && !c.shadow,
                        limit: Some(ReportedLimit {
                            name: c.name,
                            reported: Reported {
                                requests_per_unit: c.requests_per_unit,
                                unit: c.unit,
                            },
                        }),
                        remaining: counted.remaining,
                        reset_after: reset_secs(c.unit, now) * 1_000_000_000,
                        near: counted.near,
                    }
                }
            };
            // The headers report the descriptor closest to its limit, or the last one over.
            let least = minimum.map_or(u64::from(u32::MAX), |(m, _)| m);
            if status.limit.is_some() && status.remaining < least {
                minimum = Some((status.remaining, i));
            }
            if !s.unlimited {
                let quota = settings.quota_mode || s.chosen.as_ref().is_some_and(|c| c.quota);
                match (status.over, quota) {
                    (true, true) => quota_failed += 1,
                    (true, false) => {
                        failed += 1;
                        minimum = Some((0, i));
                    }
                    (false, _) => {}
                }
                quota_total += usize::from(quota);
            }
            decision.statuses.push(status);
        }
        let mut over = failed > 0 || (quota_total > 0 && quota_total == quota_failed);
        if over && settings.shadow_mode {
            over = false;
            self.reference_counts
                .global_shadow_mode
                .fetch_add(1, Ordering::Relaxed);
        }
        decision.over = over;
        decision.extras = self.extras(settings, &slots, decision, minimum.map(|(_, i)| i), now);

        let near = decision.statuses.iter().any(|s| s.near);
        let outcome = if over {
            Outcome::Limited
        } else {
            Outcome::Allowed
        };
        self.stats.total.record(outcome, near);
        Ok(())
    }

    /// Per descriptor, the rule it is subject to (the reference's `constructLimitsToCheck`):
    /// its override, else the tree's rule; unlimited rules and rules another matched rule
    /// `replaces` are left out.
    fn choose<'r>(&self, tree: &'r Tree, request: &Request<'_>) -> SmallVec<[Slot<'r>; 2]> {
        let mut replacing: SmallVec<[&'r str; 2]> = SmallVec::new();
        let mut slots: SmallVec<[Slot<'r>; 2]> = request
            .descriptors
            .iter()
            .map(|d| {
                // The reference predates `is_negative_hits`: it adds the hits either way.
                let (Hits::Take(hits) | Hits::Return(hits)) = d.hits;
                let mut slot = Slot {
                    chosen: None,
                    unlimited: false,
                    hits,
                    key: CounterKey(0),
                    cached: false,
                    would_be_over: false,
                    after: 0,
                };
                if let Some(o) = d.limit_override {
                    slot.chosen = Some(Chosen {
                        requests_per_unit: o.requests_per_unit,
                        unit: o.unit,
                        name: "",
                        shadow: false,
                        quota: false,
                        metadata: None,
                        stats: StatsRef::Key(
                            self.stats
                                .keys
                                .get(&descriptor_key(&tree.domain, &d.entries)),
                        ),
                        shared: SmallVec::new(),
                    });
                } else if let Some(found) = tree.find(&d.entries) {
                    let limit: &'r RuleLimit = found.limit;
                    replacing.extend(limit.replaces.iter().map(|r| &**r));
                    slot.unlimited = limit.unlimited;
                    if !limit.unlimited {
                        let stats = match (&found.stats_key, limit.stats.get()) {
                            (None, Some(s)) => StatsRef::Rule(s),
                            (Some(k), _) => StatsRef::Key(self.stats.keys.get(k)),
                            (None, None) => StatsRef::Key(self.stats.keys.get(&limit.key)),
                        };
                        slot.chosen = Some(Chosen {
                            requests_per_unit: limit.requests_per_unit,
                            unit: limit.unit.unwrap_or(Unit::Second),
                            name: &limit.name,
                            shadow: limit.shadow,
                            quota: limit.quota,
                            metadata: limit.metadata.as_ref(),
                            stats,
                            shared: found.shared,
                        });
                    }
                }
                slot
            })
            .collect();
        for (s, d) in slots.iter_mut().zip(&request.descriptors) {
            if s.chosen
                .as_ref()
                .is_some_and(|c| !c.name.is_empty() && replacing.contains(&c.name))
            {
                s.chosen = None;
            }
            if let Some(c) = &s.chosen {
                s.key = self.reference_key(&tree.domain, &d.entries, c);
            }
        }
        slots
    }

    /// Tallies the slots `pick` makes a tally of; returns their indices and counts.
    async fn tally_counted<'s, 'n>(
        &self,
        slots: &'s [Slot<'_>],
        pick: impl Fn(usize, &'s Slot<'_>) -> Option<Tally<'n>>,
        now: Timestamp,
    ) -> Result<(SmallVec<[usize; 2]>, SmallVec<[u64; 2]>), DecideError> {
        let mut which: SmallVec<[usize; 2]> = SmallVec::new();
        let mut tallies: SmallVec<[Tally<'n>; 2]> = SmallVec::new();
        for (i, s) in slots.iter().enumerate() {
            if let Some(t) = pick(i, s) {
                which.push(i);
                tallies.push(t);
            }
        }
        let mut counts: SmallVec<[u64; 2]> = SmallVec::from_elem(0, tallies.len());
        if !tallies.is_empty() {
            self.store.tally(&tallies, &mut counts, now).await?;
        }
        Ok((which, counts))
    }

    /// The headers and dynamic metadata the settings ask for; `None` (no allocation) when
    /// neither is on.
    fn extras(
        &self,
        settings: &ReferenceSettings,
        slots: &[Slot<'_>],
        decision: &Decision<'_>,
        minimum: Option<usize>,
        now: Timestamp,
    ) -> Option<Box<ReferenceExtras>> {
        let headers = settings.headers.as_ref().zip(minimum);
        if headers.is_none() && !settings.dynamic_metadata {
            return None;
        }
        let mut extras = ReferenceExtras::default();
        if let Some((h, i)) = headers
            && let (Some(s), Some(Some(c))) = (
                decision.statuses.get(i),
                slots.get(i).map(|s| s.chosen.as_ref()),
            )
        {
            extras.headers = vec![
                (h.limit.clone(), c.requests_per_unit.to_string()),
                (h.remaining.clone(), s.remaining.to_string()),
                (h.reset.clone(), reset_secs(c.unit, now).to_string()),
            ];
        }
        if settings.dynamic_metadata {
            // The metadata of the rules of the descriptors that passed.
            let mut merged = serde_json::Map::new();
            for (s, status) in slots.iter().zip(&decision.statuses) {
                if let Some(m) = s.chosen.as_ref().and_then(|c| c.metadata)
                    && !status.over
                    && !s.unlimited
                {
                    merge_metadata(&mut merged, m);
                }
            }
            extras.metadata = Some(merged);
        }
        Some(Box::new(extras))
    }

    /// The counter of a reference rule: domain, the descriptor's entries (with shared patterns
    /// in place of values) and the window length, as the reference's key has them.
    fn reference_key(&self, domain: &str, entries: &[(&str, &str)], c: &Chosen<'_>) -> CounterKey {
        let values = entries.iter().enumerate().map(|(i, &(_, v))| {
            c.shared
                .iter()
                .find(|(j, _)| *j == i)
                .map_or(v, |(_, p)| *p)
        });
        let parts = std::iter::once(domain.as_bytes()).chain(
            entries
                .iter()
                .zip(values)
                .flat_map(|(&(k, _), v)| [k.as_bytes(), v.as_bytes()]),
        );
        let group = self.hash_parts(TAG_REFERENCE, parts);
        Self::key(group, c.unit.seconds())
    }
}

/// The reference's `descriptorKey`: a descriptor's override statistics key.
fn descriptor_key(domain: &str, entries: &[(&str, &str)]) -> String {
    let mut s = String::from(domain);
    s.push('.');
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        s.push_str(k);
        if !v.is_empty() {
            s.push('_');
            s.push_str(v);
        }
    }
    s
}

/// The reference's cache key: `<prefix><domain>_<key>_<value>_..._<window start>`.
fn reference_key_name(
    prefix: &str,
    domain: &str,
    entries: &[(&str, &str)],
    c: &Chosen<'_>,
    now: Timestamp,
) -> String {
    let mut s = String::with_capacity(64);
    s.push_str(prefix);
    s.push_str(domain);
    s.push('_');
    for (i, (k, v)) in entries.iter().enumerate() {
        s.push_str(k);
        s.push('_');
        let v = c
            .shared
            .iter()
            .find(|(j, _)| *j == i)
            .map_or(*v, |(_, p)| *p);
        s.push_str(v);
        s.push('_');
    }
    let w = c.unit.seconds();
    let secs = now.as_nanos() / 1_000_000_000;
    s.push_str(&(secs / w * w).to_string());
    s
}

/// The reference's `mergeMetadata`: keys already present are kept, nested maps merged.
fn merge_metadata(
    dest: &mut serde_json::Map<String, serde_json::Value>,
    src: &serde_json::Map<String, serde_json::Value>,
) {
    for (k, v) in src {
        match (dest.get_mut(k), v) {
            (Some(serde_json::Value::Object(d)), serde_json::Value::Object(s)) => {
                merge_metadata(d, s);
            }
            (Some(_), _) => {}
            (None, v) => {
                dest.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Keys known to be over their limit until the end of their window (the reference's
/// freecache of `LOCAL_CACHE_SIZE_IN_BYTES`): their descriptors are refused without a store
/// round trip. Bounded by the configured bytes at ~64 bytes an entry.
#[derive(Debug, Default)]
pub struct LocalCache {
    map: dashmap::DashMap<u128, u64>,
    /// Refusals answered from the cache.
    pub hits: AtomicU64,
    /// Keys over their limit not remembered because the cache was full.
    pub full: AtomicU64,
}

impl LocalCache {
    fn is_over(&self, key: CounterKey, now: Timestamp) -> bool {
        let over = self
            .map
            .get(&key.0)
            .is_some_and(|until| *until > now.as_nanos());
        if over {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        over
    }

    /// Remembers that `key` is over its limit until its window ends; not while the cache is
    /// full: the key is then asked of the store, until the background sweep
    /// ([`LocalCache::sweep_at`]) has dropped the windows that ended. (Dropping them here
    /// would walk the whole cache on a decision.)
    fn remember(&self, key: CounterKey, now: Timestamp, unit: Unit, bytes: u64) {
        let max = usize::try_from(bytes / 64).unwrap_or(usize::MAX).max(1);
        if self.map.len() >= max {
            self.full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // The reference keeps the entry a whole unit from now; its key names the window, so it
        // stops matching at the window's end. Here the key has no window: end it there.
        let w = unit.seconds() * 1_000_000_000;
        let end = (now.as_nanos() / w + 1) * w;
        self.map.insert(key.0, end);
    }

    /// Drops the keys whose window has ended at `now`; returns how many. Each goes under its
    /// own short hold of its map shard's lock, so that a decision remembering a key never
    /// waits for a whole shard's walk (reads of the cache wait for none of it).
    pub fn sweep_at(&self, now: Timestamp) -> usize {
        let now = now.as_nanos();
        let ended: Vec<u128> = self
            .map
            .iter()
            .filter(|e| *e.value() <= now)
            .map(|e| *e.key())
            .collect();
        ended
            .into_iter()
            .filter(|k| self.map.remove_if(k, |_, until| *until <= now).is_some())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `judge` for a limit of 10 at the default ratio (near from 8 on), not shadowed.
    fn j(after: u64, hits: u64) -> Counted {
        judge(10, 0.8, after, hits, false, false)
    }

    #[test]
    fn hits_split_between_within_near_and_over_as_the_reference_splits_them() {
        let c = j(5, 1);
        assert_eq!((c.over, c.remaining, c.near), (false, 5, false));
        assert_eq!((c.within_limit, c.near_limit, c.over_limit), (1, 0, 0));
        // From a count already in the near band, every hit is near.
        let c = j(9, 1);
        assert_eq!(
            (c.remaining, c.near, c.near_limit, c.within_limit),
            (1, true, 1, 1)
        );
        // Crossing into it: only the hits past the threshold.
        assert_eq!(j(9, 3).near_limit, 1);
        // Crossing the limit: the hits past it are over, those between the band and it near.
        let c = j(12, 5);
        assert_eq!(
            (c.over, c.remaining, c.over_limit, c.near_limit),
            (true, 0, 2, 2)
        );
        // Already over: every hit is over.
        let c = j(12, 1);
        assert_eq!((c.over_limit, c.near_limit, c.within_limit), (1, 0, 0));
        // Exactly at the limit passes.
        assert!(!j(10, 1).over);
    }

    /// A full cache refuses new keys rather than walk itself on a decision; the sweep makes
    /// room once windows end.
    #[test]
    fn a_full_local_cache_takes_no_key_until_the_sweep_drops_ended_windows() {
        let cache = LocalCache::default();
        let now = Timestamp::from_secs(100);
        // 128 bytes: room for two keys.
        for k in 1..=3 {
            cache.remember(CounterKey(k), now, Unit::Second, 128);
        }
        assert!(cache.is_over(CounterKey(1), now));
        assert!(cache.is_over(CounterKey(2), now));
        assert!(!cache.is_over(CounterKey(3), now), "the cache was full");
        assert_eq!(cache.full.load(Ordering::Relaxed), 1);
        assert_eq!(cache.sweep_at(now), 0, "no window has ended");
        let later = Timestamp::from_secs(101);
        assert_eq!(cache.sweep_at(later), 2);
        cache.remember(CounterKey(3), later, Unit::Second, 128);
        assert!(cache.is_over(CounterKey(3), later));
    }

    #[test]
    fn shadow_and_cached_refusals_count_as_the_reference_counts_them() {
        let c = judge(10, 0.8, 12, 5, false, true);
        assert!(c.over);
        assert_eq!((c.over_limit, c.shadow_mode), (2, 2));
        let c = judge(10, 0.8, 0, 3, true, false);
        assert_eq!((c.over, c.over_limit, c.shadow_mode), (true, 3, 0));
        let c = judge(10, 0.8, 0, 3, true, true);
        assert_eq!(c.shadow_mode, 3);
    }
}
