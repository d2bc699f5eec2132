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
    /// sluice's keyed hashes: short, and no client value in a key name.
    #[default]
    Sluice,
    /// The reference's own keys (`<CACHE_KEY_PREFIX><domain>_<key>_<value>_..._<window start>`),
    /// so that sluice and reference replicas share one Redis during a migration.
    Reference,
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
    /// `SLUICE_REDIS_KEYS`: `sluice` (default) or `reference`.
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
            key_names: KeyNames::Sluice,
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

/// The rule a descriptor is subject to.
enum Lim<'r> {
    Rule(&'r RuleLimit),
    Override { requests_per_unit: u32, unit: Unit },
}

struct Chosen<'r> {
    lim: Lim<'r>,
    stats: Arc<KeyStats>,
    shared: SmallVec<[(usize, &'r str); 1]>,
}

impl Chosen<'_> {
    fn requests_per_unit(&self) -> u32 {
        match self.lim {
            Lim::Rule(r) => r.requests_per_unit,
            Lim::Override {
                requests_per_unit, ..
            } => requests_per_unit,
        }
    }
    fn unit(&self) -> Unit {
        match self.lim {
            Lim::Rule(r) => r.unit.unwrap_or(Unit::Second),
            Lim::Override { unit, .. } => unit,
        }
    }
    fn name(&self) -> &str {
        match self.lim {
            Lim::Rule(r) => &r.name,
            Lim::Override { .. } => "",
        }
    }
    fn shadow(&self) -> bool {
        matches!(self.lim, Lim::Rule(r) if r.shadow)
    }
    fn quota(&self) -> bool {
        matches!(self.lim, Lim::Rule(r) if r.quota)
    }
}

/// Domain separation of reference counter keys from sluice's own.
const TAG_REFERENCE: u8 = 5;

/// Whole seconds to the next boundary of `unit`, as the reference computes it.
fn reset_secs(unit: Unit, now: Timestamp) -> u64 {
    let secs = now.as_nanos() / 1_000_000_000;
    unit.seconds() - secs % unit.seconds()
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
        let n = request.descriptors.len();
        decision.reference = true;
        let Some(tree) = rules.tree(request.domain) else {
            self.reference_counts
                .domain_not_found
                .fetch_add(1, Ordering::Relaxed);
            self.stats.total.record(Outcome::Allowed, false);
            *decision = Decision::unlimited(n);
            decision.reference = true;
            decision.statuses.iter_mut().for_each(|s| s.remaining = 0);
            return Ok(());
        };

        // Which rule each descriptor is subject to.
        let mut chosen: SmallVec<[Option<Chosen<'r>>; 2]> = SmallVec::with_capacity(n);
        let mut unlimited: SmallVec<[bool; 2]> = SmallVec::from_elem(false, n);
        let mut replacing: SmallVec<[&'r str; 2]> = SmallVec::new();
        for (i, d) in request.descriptors.iter().enumerate() {
            if let Some(o) = d.limit_override {
                let key = descriptor_key(&tree.domain, &d.entries);
                chosen.push(Some(Chosen {
                    lim: Lim::Override {
                        requests_per_unit: o.requests_per_unit,
                        unit: o.unit,
                    },
                    stats: self.stats.keys.get(&key),
                    shared: SmallVec::new(),
                }));
                continue;
            }
            let Some(found) = tree.find(&d.entries) else {
                chosen.push(None);
                continue;
            };
            let limit: &'r RuleLimit = found.limit;
            replacing.extend(limit.replaces.iter().map(|r| &**r));
            if limit.unlimited {
                unlimited[i] = true;
                chosen.push(None);
                continue;
            }
            let stats = match &found.stats_key {
                Some(k) => self.stats.keys.get(k),
                None => limit
                    .stats
                    .get()
                    .cloned()
                    .unwrap_or_else(|| self.stats.keys.get(&limit.key)),
            };
            chosen.push(Some(Chosen {
                lim: Lim::Rule(limit),
                stats,
                shared: found.shared,
            }));
        }
        if !replacing.is_empty() {
            for c in chosen.iter_mut() {
                if c.as_ref()
                    .is_some_and(|c| !c.name().is_empty() && replacing.contains(&c.name()))
                {
                    *c = None;
                }
            }
        }

        let hits: SmallVec<[u64; 2]> = request
            .descriptors
            .iter()
            .map(|d| match d.hits {
                // The reference predates `is_negative_hits`: it adds the hits either way.
                Hits::Take(h) | Hits::Return(h) => h,
            })
            .collect();
        let keys: SmallVec<[CounterKey; 2]> = chosen
            .iter()
            .zip(&request.descriptors)
            .map(|(c, d)| match c {
                Some(c) => self.reference_key(&tree.domain, &d.entries, c),
                None => CounterKey(0),
            })
            .collect();
        let names: SmallVec<[String; 2]> = match settings.key_names {
            KeyNames::Sluice => SmallVec::new(),
            KeyNames::Reference => chosen
                .iter()
                .zip(&request.descriptors)
                .map(|(c, d)| match c {
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
        for (c, &h) in chosen.iter().zip(&hits) {
            if let Some(c) = c {
                c.stats.total_hits.fetch_add(h, Ordering::Relaxed);
            }
        }

        // The local over-limit cache: keys already over in this window are not counted again.
        let cache_on = settings.local_cache_bytes > 0;
        let mut cached_over: SmallVec<[bool; 2]> = SmallVec::from_elem(false, n);
        if cache_on {
            for (i, c) in chosen.iter().enumerate() {
                if c.is_some() && self.local_cache.is_over(keys[i], now) {
                    cached_over[i] = true;
                }
            }
        }
        let any_cached = cached_over.iter().any(|&b| b);

        // With STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT, a first read finds the rules this
        // request would take over their limit.
        let mut would_be_over: SmallVec<[bool; 2]> = SmallVec::from_elem(false, n);
        if settings.stop_increment_when_over && !any_cached {
            let reads: SmallVec<[Tally<'_>; 2]> = (0..n)
                .filter(|&i| chosen[i].is_some())
                .map(|i| self.tally_of(&chosen[i], keys[i], &names, i, None, settings))
                .collect();
            let mut counts: SmallVec<[u64; 2]> = SmallVec::from_elem(0, reads.len());
            self.store.tally(&reads, &mut counts, now).await?;
            let mut k = 0;
            for i in 0..n {
                if let Some(c) = &chosen[i] {
                    would_be_over[i] =
                        counts[k].saturating_add(hits[i]) > u64::from(c.requests_per_unit());
                    k += 1;
                }
            }
        }
        let any_would_be_over = would_be_over.iter().any(|&b| b);

        let to_count: SmallVec<[usize; 2]> = (0..n)
            .filter(|&i| chosen[i].is_some() && !cached_over[i])
            .collect();
        let tallies: SmallVec<[Tally<'_>; 2]> = to_count
            .iter()
            .map(|&i| {
                let add = if !settings.stop_increment_when_over
                    || (!any_cached && (!any_would_be_over || would_be_over[i]))
                {
                    hits[i]
                } else {
                    0
                };
                self.tally_of(&chosen[i], keys[i], &names, i, Some(add), settings)
            })
            .collect();
        let mut after_counts: SmallVec<[u64; 2]> = SmallVec::from_elem(0, tallies.len());
        if !tallies.is_empty() {
            self.store.tally(&tallies, &mut after_counts, now).await?;
        }
        let mut after: SmallVec<[u64; 2]> = SmallVec::from_elem(0, n);
        for (&i, &c) in to_count.iter().zip(&after_counts) {
            after[i] = c;
        }

        // Statuses, as the reference's GetResponseDescriptorStatus and service worker write them.
        let ratio = settings.near_limit_ratio;
        let mut failed = 0usize;
        let (mut quota_total, mut quota_failed) = (0usize, 0usize);
        let mut min_remaining = u64::from(u32::MAX);
        let mut minimum: Option<usize> = None;
        let mut passed: SmallVec<[usize; 2]> = SmallVec::new();
        for i in 0..n {
            let status = match &chosen[i] {
                None if unlimited[i] => Status {
                    remaining: u64::from(u32::MAX),
                    ..Status::UNLIMITED
                },
                None => Status {
                    remaining: 0,
                    ..Status::UNLIMITED
                },
                Some(c) => {
                    let h = hits[i];
                    let limit = u64::from(c.requests_per_unit());
                    let unit = c.unit();
                    let reported = Some(ReportedLimit {
                        name: match c.lim {
                            Lim::Rule(r) => &r.name,
                            Lim::Override { .. } => "",
                        },
                        reported: Reported {
                            requests_per_unit: c.requests_per_unit(),
                            unit,
                        },
                    });
                    let reset_after = reset_secs(unit, now) * 1_000_000_000;
                    let s = &c.stats;
                    let mut over = false;
                    let mut status = if cached_over[i] {
                        over = true;
                        s.over_limit.fetch_add(h, Ordering::Relaxed);
                        s.over_limit_with_local_cache
                            .fetch_add(h, Ordering::Relaxed);
                        Status {
                            over: true,
                            limit: reported,
                            remaining: 0,
                            reset_after,
                            near: false,
                        }
                    } else {
                        let a = after[i];
                        let before = a.wrapping_sub(h);
                        let near_at = (limit as f32 * ratio).floor() as u64;
                        if a > limit {
                            over = true;
                            if before >= limit {
                                s.over_limit.fetch_add(h, Ordering::Relaxed);
                            } else {
                                s.over_limit.fetch_add(a - limit, Ordering::Relaxed);
                                s.near_limit.fetch_add(
                                    limit.saturating_sub(near_at.max(before)),
                                    Ordering::Relaxed,
                                );
                            }
                            if cache_on {
                                self.local_cache.remember(
                                    keys[i],
                                    now,
                                    unit,
                                    settings.local_cache_bytes,
                                );
                            }
                            Status {
                                over: true,
                                limit: reported,
                                remaining: 0,
                                reset_after,
                                near: false,
                            }
                        } else {
                            let near = a > near_at;
                            if near {
                                let n = if before >= near_at { h } else { a - near_at };
                                s.near_limit.fetch_add(n, Ordering::Relaxed);
                            }
                            s.within_limit.fetch_add(h, Ordering::Relaxed);
                            Status {
                                over: false,
                                limit: reported,
                                remaining: limit - a,
                                reset_after,
                                near,
                            }
                        }
                    };
                    if over && c.shadow() {
                        status.over = false;
                        let before = after[i].wrapping_sub(h);
                        let n = if cached_over[i] || before >= limit {
                            h
                        } else {
                            after[i] - limit
                        };
                        s.shadow_mode.fetch_add(n, Ordering::Relaxed);
                    }
                    status
                }
            };
            if settings.headers.is_some()
                && status.limit.is_some()
                && status.remaining < min_remaining
            {
                min_remaining = status.remaining;
                minimum = Some(i);
            }
            if !unlimited[i] {
                let quota = settings.quota_mode || chosen[i].as_ref().is_some_and(|c| c.quota());
                if status.over {
                    if quota {
                        quota_failed += 1;
                    } else {
                        failed += 1;
                        minimum = Some(i);
                        min_remaining = 0;
                    }
                } else {
                    passed.push(i);
                }
                if quota {
                    quota_total += 1;
                }
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

        let wants_headers = settings.headers.is_some() && minimum.is_some();
        if wants_headers || settings.dynamic_metadata {
            let mut extras = ReferenceExtras::default();
            if let (Some(h), Some(i)) = (&settings.headers, minimum)
                && let (Some(s), Some(c)) = (decision.statuses.get(i), &chosen[i])
            {
                extras.headers = vec![
                    (h.limit.clone(), c.requests_per_unit().to_string()),
                    (h.remaining.clone(), s.remaining.to_string()),
                    (h.reset.clone(), reset_secs(c.unit(), now).to_string()),
                ];
            }
            if settings.dynamic_metadata {
                let mut merged = serde_json::Map::new();
                for &i in &passed {
                    if let Some(Chosen {
                        lim: Lim::Rule(r), ..
                    }) = &chosen[i]
                        && let Some(m) = &r.metadata
                    {
                        merge_metadata(&mut merged, m);
                    }
                }
                extras.metadata = Some(merged);
            }
            decision.extras = Some(Box::new(extras));
        }

        let near = decision.statuses.iter().any(|s| s.near);
        self.stats.total.record(
            if decision.over {
                Outcome::Limited
            } else {
                Outcome::Allowed
            },
            near,
        );
        Ok(())
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
        Self::key(group, c.unit().seconds())
    }

    fn tally_of<'t>(
        &self,
        c: &Option<Chosen<'_>>,
        key: CounterKey,
        names: &'t [String],
        i: usize,
        hits: Option<u64>,
        settings: &ReferenceSettings,
    ) -> Tally<'t> {
        let window = c.as_ref().map_or(1, |c| c.unit().seconds());
        let jitter = match settings.expiration_jitter_max_seconds {
            0 => 0,
            j => rand::random::<u64>() % j,
        };
        Tally {
            key,
            name: names.get(i).map_or("", String::as_str),
            window_secs: window,
            hits,
            ttl_secs: window + jitter,
        }
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
    let w = c.unit().seconds();
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

    fn remember(&self, key: CounterKey, now: Timestamp, unit: Unit, bytes: u64) {
        let max = usize::try_from(bytes / 64).unwrap_or(usize::MAX).max(1);
        if self.map.len() >= max {
            let now = now.as_nanos();
            self.map.retain(|_, until| *until > now);
            if self.map.len() >= max {
                return;
            }
        }
        // The reference keeps the entry a whole unit from now; its key names the window, so it
        // stops matching at the window's end. Here the key has no window: end it there.
        let w = unit.seconds() * 1_000_000_000;
        let end = (now.as_nanos() / w + 1) * w;
        self.map.insert(key.0, end);
    }
}
