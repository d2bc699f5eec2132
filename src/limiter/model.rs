//! The compiled rule model every config front end produces and the decision path reads.
//!
//! A [`RuleSet`] holds [`Domain`]s; a domain holds [`Rule`]s. A rule says which descriptors it
//! applies to, which descriptor entries identify the client (whose values key its counters; none
//! means one counter shared by every client), and its [`Limit`]s. Rules are found two ways:
//! - *routed* rules by the value of the domain's endpoint entry (`path`), matched against path
//!   templates with [`PathRouter`] (at most one routed rule per descriptor: the most specific);
//! - *conditional* rules by [`Condition`]s on entries (every one that holds applies).
//!
//! sluice's YAML compiles endpoints into routed rules and `global` limits into a conditional
//! rule. envoyproxy/ratelimit's nested descriptors are not compiled into this model: the
//! reference finds at most one rule per descriptor by walking its entries in order, where here
//! every rule that holds applies; they live in [`super::tree`] and [`RuleSet::reference`].
//! Nothing here knows about YAML.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::path::PathRouter;
use crate::algorithms::Policy;
use crate::entries::{bytes_eq, lookup};
use crate::stats::{Counts, LimitCounts};

/// Every domain's rules, as loaded; swapped whole on reload.
#[derive(Debug, Default)]
pub struct RuleSet {
    /// `false` answers OK to everything while still counting (seed: `RATE_LIMIT_ENABLED`).
    pub enabled: bool,
    /// Shadow mode for the whole server: every limit is evaluated and counted, none enforced.
    pub shadow: bool,
    /// Domains in config order.
    pub domains: Vec<Domain>,
    /// The descriptor entry holding the client address, for blocks and the allowlist.
    pub address_entry: String,
    /// Addresses and networks that skip every limit (from the config file).
    pub allowlist: Vec<IpNet>,
    /// Hash of the config text this was compiled from (0 if built by hand).
    pub source_hash: u64,
    /// envoyproxy/ratelimit's rules, when the config was the reference's files: then they
    /// decide every request (and `domains` is empty).
    pub reference: Option<super::reference::ReferenceRules>,
    index: HashMap<Box<str>, usize>,
}

impl RuleSet {
    /// A rule set over `domains`; names must be unique (front ends check and report where).
    pub fn new(enabled: bool, domains: Vec<Domain>) -> Self {
        let index = domains
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.as_str().into(), i))
            .collect();
        Self {
            enabled,
            shadow: false,
            domains,
            address_entry: "remote_address".to_string(),
            allowlist: Vec::new(),
            source_hash: 0,
            reference: None,
            index,
        }
    }

    /// The domain called `name`, if configured. A handful of domains is the norm: comparing
    /// names beats hashing the request's domain.
    pub fn domain(&self, name: &str) -> Option<&Domain> {
        if self.domains.len() <= 8 {
            return self
                .domains
                .iter()
                .find(|d| bytes_eq(d.name.as_bytes(), name.as_bytes()));
        }
        self.index.get(name).and_then(|&i| self.domains.get(i))
    }
}

/// One domain's rules.
#[derive(Debug)]
pub struct Domain {
    /// The domain name Envoy sends.
    pub name: String,
    /// The same, shared with per-client statistics.
    pub name_arc: Arc<str>,
    /// A hash of the name, to tell clients of different domains apart in statistics.
    pub tag: u64,
    /// The descriptor entry whose value routed rules are matched against (default `path`).
    pub endpoint_entry: String,
    /// Entries identifying a client in this domain (for statistics and resets).
    pub client: Vec<String>,
    /// All rules; routed ones first, in config order.
    pub rules: Vec<Rule>,
    /// Automatic blocking of abusive clients.
    pub auto_block: Option<AutoBlock>,
    /// Per-request decision counts; attached by the limiter when the rules are installed.
    pub stats: Arc<Counts>,
    routes: PathRouter<usize>,
    conditional: Vec<usize>,
}

/// Block a client address for `duration` when it sends too much or is limited too often.
/// Both thresholds are ordinary limits counted per address in the store.
#[derive(Debug, Clone)]
pub struct AutoBlock {
    /// How long an automatic block lasts.
    pub duration: Duration,
    /// Requests per address across all of the domain's endpoints.
    pub max_requests: Option<Limit>,
    /// Limited decisions per address.
    pub max_limited: Option<Limit>,
}

impl Domain {
    /// A domain; `routes` maps templates to indices of `rules`, and every rule with
    /// conditions is tried on every descriptor.
    pub fn new(
        name: String,
        endpoint_entry: String,
        rules: Vec<Rule>,
        routes: PathRouter<usize>,
    ) -> Self {
        let mut rules = rules;
        for r in &mut rules {
            let mut id = Vec::with_capacity(name.len() + r.name.len() + 1);
            id.extend_from_slice(name.as_bytes());
            id.push(0);
            id.extend_from_slice(r.name.as_bytes());
            r.shared_group = xxhash_rust::xxh3::xxh3_64(&id);
        }
        let conditional = rules
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.conditions.is_empty())
            .map(|(i, _)| i)
            .collect();
        Self {
            tag: xxhash_rust::xxh3::xxh3_64(name.as_bytes()),
            name_arc: Arc::from(name.as_str()),
            name,
            endpoint_entry,
            client: Vec::new(),
            rules,
            auto_block: None,
            stats: Arc::default(),
            routes,
            conditional,
        }
    }

    /// The routed rule for a descriptor's endpoint entry value, if any.
    pub fn route(&self, entries: &[(&str, &str)]) -> Option<&Rule> {
        let value = lookup(entries, &self.endpoint_entry)?;
        self.routes.lookup(value).and_then(|&i| self.rules.get(i))
    }

    /// Whether entry `entry` alone identifies this domain's clients (as the address entry does
    /// by default).
    #[inline]
    pub fn identified_by(&self, entry: &str) -> bool {
        matches!(self.client.as_slice(), [name] if bytes_eq(name.as_bytes(), entry.as_bytes()))
    }

    /// Conditional rules whose conditions all hold for `entries`.
    pub fn conditional<'s, 'e>(
        &'s self,
        entries: &'e [(&'e str, &'e str)],
    ) -> impl Iterator<Item = &'s Rule> + 'e
    where
        's: 'e,
    {
        self.conditional
            .iter()
            .filter_map(|&i| self.rules.get(i))
            .filter(move |r| r.conditions.iter().all(|c| c.holds(entries)))
    }
}

/// A test on a descriptor's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// The entry is present, whatever its value.
    Present(String),
    /// The entry is present with exactly this value.
    Equals(String, String),
}

impl Condition {
    fn holds(&self, entries: &[(&str, &str)]) -> bool {
        match self {
            Condition::Present(k) => lookup(entries, k).is_some(),
            Condition::Equals(k, v) => lookup(entries, k) == Some(v.as_str()),
        }
    }
}

/// Limits that apply to the descriptors a rule matches.
#[derive(Debug)]
pub struct Rule {
    /// What operators call it: the endpoint template, or `global`.
    pub name: String,
    /// For conditional rules: what must hold. Empty for routed rules.
    pub conditions: Vec<Condition>,
    /// Entries whose values identify the client; empty means one counter for all clients.
    /// A descriptor lacking one of them is not matched by the rule.
    pub client: Vec<String>,
    /// Every limit must pass.
    pub limits: Vec<Limit>,
    /// Decision counts for descriptors this rule matched; attached by the limiter.
    pub stats: Arc<Counts>,
    /// For rules shared by all clients: the group half of their counter keys, fixed per rule
    /// (set by [`Domain::new`]) so the request path does not hash it.
    pub shared_group: u64,
}

/// One limit, compiled.
#[derive(Debug, Clone)]
pub struct Limit {
    /// Identity of the counter family: a stable hash of domain, rule, limit name, algorithm
    /// and window. Excludes the count and burst, so changing a number keeps live counters.
    pub id: u64,
    /// Name shown to clients (`per minute`, `burst`, or as configured).
    pub name: Arc<str>,
    /// The rate as written (`10/minute`), for humans.
    pub rate: String,
    /// How it counts.
    pub policy: Policy,
    /// How it is reported to Envoy.
    pub reported: Reported,
    /// Evaluated and reported, never enforced.
    pub shadow: bool,
    /// How often it rejected (or would have); attached by the limiter.
    pub counts: Arc<LimitCounts>,
}

/// What Envoy is told a limit is (`current_limit`): `requests_per_unit` per `unit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reported {
    /// Requests per unit.
    pub requests_per_unit: u32,
    /// The unit.
    pub unit: Unit,
}

/// Units Envoy's `RateLimitResponse.RateLimit.Unit` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unit {
    /// 1 s.
    Second,
    /// 60 s.
    Minute,
    /// 3600 s.
    Hour,
    /// 86400 s.
    Day,
    /// 7 days.
    Week,
    /// 30 days (Envoy's arithmetic).
    Month,
    /// 365 days (Envoy's arithmetic).
    Year,
}

impl Unit {
    /// Every unit, shortest first.
    pub const ALL: [Unit; 7] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ];

    /// Length in seconds.
    pub const fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 7 * 86_400,
            Unit::Month => 30 * 86_400,
            Unit::Year => 365 * 86_400,
        }
    }

    /// Lower-case name (`minute`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }
}

const NANOS: u64 = 1_000_000_000;

impl Reported {
    /// A window of `limit` hits per `window_secs` seconds is reported as `limit` per the
    /// shortest unit at least as long as the window. For whole units that is exact; for other
    /// windows (`5/30 seconds` -> 5 per minute) it under-states the rate, so a client pacing
    /// itself by `X-RateLimit-Limit` is never limited, while `remaining` and `reset` stay exact
    /// for the real window.
    pub fn for_window(limit: u64, window_nanos: u64) -> Self {
        let unit = Unit::ALL
            .into_iter()
            .find(|u| u.seconds().saturating_mul(NANOS) >= window_nanos)
            .unwrap_or(Unit::Year);
        Self {
            requests_per_unit: u32::try_from(limit).unwrap_or(u32::MAX),
            unit,
        }
    }

    /// A token bucket is reported as its refill rate in the shortest unit where that is a whole
    /// number of tokens (1 token per 6 s -> 10 per minute); `remaining` is the tokens in the
    /// bucket. If no unit divides evenly, the day rate rounded down.
    pub fn for_bucket(interval_nanos: u64) -> Self {
        let interval = u128::from(interval_nanos.max(1));
        let per = |u: Unit| u128::from(u.seconds()) * u128::from(NANOS);
        let unit = [Unit::Second, Unit::Minute, Unit::Hour, Unit::Day]
            .into_iter()
            .find(|&u| per(u) >= interval && per(u) % interval == 0)
            .unwrap_or(Unit::Day);
        Self {
            requests_per_unit: u32::try_from(per(unit) / interval).unwrap_or(u32::MAX),
            unit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_unit_windows_are_reported_exactly() {
        let r = Reported::for_window(10, 60 * NANOS);
        assert_eq!((r.requests_per_unit, r.unit), (10, Unit::Minute));
        let r = Reported::for_window(100, 3600 * NANOS);
        assert_eq!((r.requests_per_unit, r.unit), (100, Unit::Hour));
    }

    #[test]
    fn odd_windows_are_reported_in_the_next_longer_unit() {
        let r = Reported::for_window(5, 30 * NANOS);
        assert_eq!((r.requests_per_unit, r.unit), (5, Unit::Minute));
        let r = Reported::for_window(5, 2 * 86_400 * NANOS);
        assert_eq!(r.unit, Unit::Week);
    }

    #[test]
    fn buckets_are_reported_as_their_refill_rate() {
        let r = Reported::for_bucket(6 * NANOS);
        assert_eq!((r.requests_per_unit, r.unit), (10, Unit::Minute));
        let r = Reported::for_bucket(NANOS / 4);
        assert_eq!((r.requests_per_unit, r.unit), (4, Unit::Second));
        let r = Reported::for_bucket(7 * NANOS);
        assert_eq!((r.requests_per_unit, r.unit), (12_342, Unit::Day));
    }
}
