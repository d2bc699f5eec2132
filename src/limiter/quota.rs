//! What an RLQS bucket is subject to: the limiter's rules read for a bucket id instead of a
//! request. A bucket id's entries are one descriptor of the stream's domain, so endpoint rules,
//! client keys, domain-wide limits, blocks and the allowlist apply exactly as they do to
//! `ShouldRateLimit`; nothing is charged here (Envoy counts, and [`crate::quota`] divides).

use smallvec::SmallVec;

use super::Limiter;
use super::model::{Limit, RuleSet};
use crate::access::{Access, canonical_address};
use crate::clock::Timestamp;
use crate::entries::lookup;
use crate::store::{CounterKey, Store};

/// What a bucket is subject to.
#[derive(Debug)]
pub enum QuotaTarget<'r> {
    /// No limit applies: the domain is unknown, no rule matches, every matching limit is shadow,
    /// or the server is disabled or in shadow mode.
    Unlimited,
    /// The client address is allowlisted.
    Allowlisted,
    /// The client address is blocked.
    Blocked {
        /// The block never ends.
        permanent: bool,
        /// Nanoseconds until a temporary block ends.
        remaining: u64,
    },
    /// Enforced limits, each with the counter it shares with every other bucket (and every
    /// `ShouldRateLimit` request) that charges it. Keys are distinct.
    Limits(SmallVec<[(CounterKey, &'r Limit); 4]>),
}

impl<S: Store> Limiter<S> {
    /// The limits, block or allowlist entry that apply to a bucket of `domain` whose id holds
    /// `entries`, under `rules` at `now`. Envoyproxy/ratelimit's rules (a reference config) are
    /// not mapped: their buckets are [`QuotaTarget::Unlimited`].
    pub fn quota_target<'r>(
        &self,
        rules: &'r RuleSet,
        domain: &str,
        entries: &[(&str, &str)],
        now: Timestamp,
    ) -> QuotaTarget<'r> {
        let address_at = entries
            .iter()
            .position(|(k, _)| *k == rules.address_entry.as_str());
        if let Some(i) = address_at
            && let Some(canonical) = entries.get(i).and_then(|(_, v)| canonical_address(v))
        {
            let mut rewritten: SmallVec<[(&str, &str); 4]> = entries.iter().copied().collect();
            if let Some(slot) = rewritten.get_mut(i) {
                slot.1 = canonical.as_ref();
            }
            return self.quota_target(rules, domain, &rewritten, now);
        }
        if let Some(address) = lookup(entries, &rules.address_entry) {
            match self.access.check_at(address, now) {
                Access::Allowed => return QuotaTarget::Allowlisted,
                Access::Blocked {
                    permanent,
                    remaining,
                } => {
                    return QuotaTarget::Blocked {
                        permanent,
                        remaining,
                    };
                }
                Access::Normal => {}
            }
        }
        let Some(domain) = rules.domain(domain) else {
            return QuotaTarget::Unlimited;
        };
        if !rules.enabled || rules.shadow || rules.reference.is_some() {
            return QuotaTarget::Unlimited;
        }
        let dgroup = if domain.client.is_empty() {
            None
        } else {
            self.client_group(&domain.client, entries)
        };
        let mut limits: SmallVec<[(CounterKey, &'r Limit); 4]> = SmallVec::new();
        for rule in domain
            .route(entries)
            .into_iter()
            .chain(domain.conditional(entries))
        {
            let Some(group) = self.rule_group(rule, entries, &domain.client, dgroup) else {
                continue;
            };
            for limit in rule.limits.iter().filter(|l| !l.shadow) {
                let key = Self::limit_key_in(group, limit);
                if !limits.iter().any(|(k, _)| *k == key) {
                    limits.push((key, limit));
                }
            }
        }
        if limits.is_empty() {
            QuotaTarget::Unlimited
        } else {
            QuotaTarget::Limits(limits)
        }
    }
}

impl<S: Store> Limiter<S> {
    /// Counts what Envoy reported for a bucket of `domain` towards the automatic blocking of
    /// its client address, as `ShouldRateLimit` counts each request: `requests` (allowed and
    /// denied) towards `max_requests`, `denied` towards `max_limited`. Blocks the address when
    /// either is exceeded; its buckets are then assigned DENY_ALL.
    pub async fn observe_quota_usage(
        &self,
        rules: &RuleSet,
        domain: &str,
        entries: &[(&str, &str)],
        requests: u64,
        denied: u64,
        now: Timestamp,
    ) -> Result<(), crate::store::StoreError> {
        let Some(d) = rules.domain(domain) else {
            return Ok(());
        };
        let (Some(ab), Some(address)) = (&d.auto_block, lookup(entries, &rules.address_entry))
        else {
            return Ok(());
        };
        let canonical = canonical_address(address);
        let address = canonical.as_deref().unwrap_or(address);
        let watched = [
            (
                ab.max_requests.as_ref(),
                requests,
                "requests across all endpoints",
            ),
            (ab.max_limited.as_ref(), denied, "limited requests"),
        ];
        for (limit, hits, what) in watched {
            let Some(limit) = limit.filter(|_| hits > 0) else {
                continue;
            };
            let charge = crate::store::Charge {
                key: self.address_key(limit.id, address),
                policy: &limit.policy,
                hits: crate::algorithms::Hits::Take(hits),
                kind: crate::store::ChargeKind::Observe,
            };
            let mut verdict = [crate::store::Verdict::default()];
            self.store.apply(&[charge], &mut verdict, now).await?;
            if !verdict[0].allowed {
                self.auto_block(d, address, limit, what, now);
            }
        }
        Ok(())
    }
}
