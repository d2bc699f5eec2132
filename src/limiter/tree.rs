//! envoyproxy/ratelimit's rule model: per domain, a tree of descriptors whose levels are matched
//! against a request descriptor's entries in order. [`Tree::find`] is the reference's
//! `GetLimit`, kept to its letter because users moving from the reference depend on it:
//! - at each level the entry `key=value` is looked up as the composite key `key_value`; failing
//!   that, the level's wildcard patterns (`key_pre*`, `key_a*b*`) in file order; failing that,
//!   the key alone (a rule with no `value`);
//! - only a rule at the level of the descriptor's *last* entry applies; the walk stops at a level
//!   with no children, so a shorter or longer descriptor than the rule matches nothing;
//! - the statistics key is the rule's path (`domain.key_value.key`), rebuilt from the request's
//!   values for `detailed_metric` and `value_to_metric`, with `share_threshold` patterns in
//!   place of values.
//!
//! The config front end ([`crate::config::reference`]) builds trees; nothing here reads YAML.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use smallvec::SmallVec;

use super::model::Unit;
use crate::stats::KeyStats;

/// One domain's rules.
#[derive(Debug, Default)]
pub struct Tree {
    /// The domain name.
    pub domain: String,
    root: Node,
}

/// One level of the tree: the rules below one composite key.
#[derive(Debug, Default)]
pub struct Node {
    children: HashMap<Box<str>, Node>,
    /// Children whose composite key has a `*`, in file order, split on `*`.
    wildcards: Vec<(Box<str>, Vec<Box<str>>)>,
    limit: Option<Arc<RuleLimit>>,
    value_to_metric: bool,
    share_threshold: bool,
    /// The composite key with its `*`, when `share_threshold` is set.
    wildcard_pattern: Box<str>,
}

/// A rule's `rate_limit`, with the settings of its descriptor.
#[derive(Debug)]
pub struct RuleLimit {
    /// The rule's statistics key: `domain.key_value.key...`.
    pub key: Box<str>,
    /// `rate_limit.name`: reported to Envoy as `current_limit.name`, and what `replaces` names.
    pub name: Box<str>,
    /// `requests_per_unit`.
    pub requests_per_unit: u32,
    /// `unit`; `None` only for `unlimited` rules.
    pub unit: Option<Unit>,
    /// `unlimited: true`: always OK, never counted.
    pub unlimited: bool,
    /// `shadow_mode: true`: counted and reported, never enforced.
    pub shadow: bool,
    /// `quota_mode: true`: the request is refused only if every quota descriptor is over.
    pub quota: bool,
    /// `detailed_metric: true`: statistics keyed by the request's values.
    pub detailed_metric: bool,
    /// Names of rules this one replaces in the same request.
    pub replaces: Vec<Box<str>>,
    /// `metadata`, returned in the response's dynamic metadata when the descriptor passes.
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Statistics under [`RuleLimit::key`], attached when the rules are installed.
    pub stats: OnceLock<Arc<KeyStats>>,
}

impl RuleLimit {
    /// The limit a descriptor's `limit` override stands for: no name, not shadowed.
    pub fn overriding(key: String, requests_per_unit: u32, unit: Unit) -> Self {
        Self {
            key: key.into(),
            name: "".into(),
            requests_per_unit,
            unit: Some(unit),
            unlimited: false,
            shadow: false,
            quota: false,
            detailed_metric: false,
            replaces: Vec::new(),
            metadata: None,
            stats: OnceLock::new(),
        }
    }
}

/// What [`Tree::find`] found for one descriptor.
#[derive(Debug)]
pub struct Found<'t> {
    /// The rule.
    pub limit: &'t Arc<RuleLimit>,
    /// The statistics key when it differs from the rule's (`detailed_metric`,
    /// `value_to_metric`, `share_threshold`).
    pub stats_key: Option<String>,
    /// Per entry index, the `share_threshold` pattern that replaces the entry's value in the
    /// counter key (all requests matching the pattern share one counter). Empty when none.
    pub shared: SmallVec<[(usize, &'t str); 1]>,
}

/// How one level was matched.
#[derive(Debug, Clone, Copy)]
enum How<'t> {
    Exact,
    Wildcard(&'t str),
    KeyOnly,
    Missed,
}

impl Tree {
    /// An empty tree for `domain`.
    pub fn new(domain: String) -> Self {
        Self {
            domain,
            root: Node::default(),
        }
    }

    /// The top level.
    pub fn root_mut(&mut self) -> &mut Node {
        &mut self.root
    }

    /// Every rule, for attaching statistics.
    pub fn limits(&self) -> Vec<&Arc<RuleLimit>> {
        let mut out = Vec::new();
        let mut stack = vec![&self.root];
        while let Some(n) = stack.pop() {
            out.extend(n.limit.iter());
            stack.extend(n.children.values());
        }
        out
    }

    /// The rule for a descriptor's `entries`, as the reference's `GetLimit` finds it (without
    /// the `limit` override, which the caller handles first).
    pub fn find(&self, entries: &[(&str, &str)]) -> Option<Found<'_>> {
        let mut level = &self.root;
        let mut found: Option<&Arc<RuleLimit>> = None;
        let mut path: SmallVec<[(How<'_>, Option<&Node>); 4]> = SmallVec::new();
        let mut composite: SmallVec<[u8; 160]> = SmallVec::new();
        for (i, &(key, value)) in entries.iter().enumerate() {
            composite.clear();
            composite.extend_from_slice(key.as_bytes());
            composite.push(b'_');
            composite.extend_from_slice(value.as_bytes());
            // Joined at an ASCII byte, two strings stay UTF-8.
            let full = std::str::from_utf8(&composite).unwrap_or_default();
            let (next, how) = if let Some(n) = level.children.get(full) {
                (Some(n), How::Exact)
            } else if let Some((k, n)) = level
                .wildcards
                .iter()
                .find(|(_, parts)| wildcard_match(parts, full))
                .and_then(|(k, _)| Some((k, level.children.get(k)?)))
            {
                (Some(n), How::Wildcard(k))
            } else if let Some(n) = level.children.get(key) {
                (Some(n), How::KeyOnly)
            } else {
                (None, How::Missed)
            };
            path.push((how, next));
            if let Some(l) = next.and_then(|n| n.limit.as_ref())
                && i + 1 == entries.len()
            {
                found = Some(l);
            }
            match next {
                Some(n) if !n.children.is_empty() => level = n,
                _ => break,
            }
        }
        let limit = found?;
        let shared: SmallVec<[(usize, &str); 1]> = path
            .iter()
            .enumerate()
            .filter_map(|(i, &(how, node))| match (how, node) {
                (How::Wildcard(_), Some(n))
                    if n.share_threshold && !n.wildcard_pattern.is_empty() =>
                {
                    let key = entries.get(i)?.0;
                    let pattern = n.wildcard_pattern.strip_prefix(key)?.strip_prefix('_')?;
                    Some((i, pattern))
                }
                _ => None,
            })
            .collect();
        let stats_key = if limit.detailed_metric {
            Some(detailed_key(&self.domain, entries, &shared))
        } else if path
            .iter()
            .any(|(_, n)| n.is_some_and(|n| n.value_to_metric))
            || !shared.is_empty()
        {
            Some(value_to_metric_key(&self.domain, entries, &path, &shared))
                .filter(|k| **k != *limit.key)
        } else {
            None
        };
        Some(Found {
            limit,
            stats_key,
            shared,
        })
    }
}

/// The `detailed_metric` key: every entry's `key_value`, or its shared pattern.
fn detailed_key(domain: &str, entries: &[(&str, &str)], shared: &[(usize, &str)]) -> String {
    let mut s = String::from(domain);
    for (i, (k, v)) in entries.iter().enumerate() {
        s.push('.');
        s.push_str(k);
        match shared.iter().find(|(j, _)| *j == i) {
            Some((_, p)) => {
                s.push('_');
                s.push_str(p);
            }
            None if shared.is_empty() => {
                s.push('_');
                s.push_str(v);
            }
            None if !v.is_empty() => {
                s.push('_');
                s.push_str(v);
            }
            None => {}
        }
    }
    s
}

/// The `value_to_metric` key: a level's value is the request's where its node asks for it
/// (or it matched exactly), the wildcard pattern where one matched, none for a key-only match.
fn value_to_metric_key(
    domain: &str,
    entries: &[(&str, &str)],
    path: &[(How<'_>, Option<&Node>)],
    shared: &[(usize, &str)],
) -> String {
    let mut s = String::from(domain);
    for (i, &(how, node)) in path.iter().enumerate() {
        let Some(&(key, value)) = entries.get(i) else {
            break;
        };
        s.push('.');
        s.push_str(key);
        let Some(node) = node else { continue };
        let shared_pattern = shared.iter().find(|(j, _)| *j == i).map(|(_, p)| *p);
        let v = match how {
            How::Wildcard(k) => match shared_pattern {
                Some(p) => p,
                None if node.value_to_metric => value,
                None => k
                    .strip_prefix(key)
                    .and_then(|r| r.strip_prefix('_'))
                    .unwrap_or(k),
            },
            How::Exact => value,
            How::KeyOnly if node.value_to_metric => value,
            How::KeyOnly | How::Missed => "",
        };
        if !v.is_empty() {
            s.push('_');
            s.push_str(v);
        }
    }
    s
}

/// Whether `value` matches a pattern split on `*` (each `*` matches any run, empty included).
fn wildcard_match(parts: &[Box<str>], value: &str) -> bool {
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
        return false;
    };
    if parts.len() == 1 {
        return **first == *value;
    }
    let fixed: usize = parts.iter().map(|p| p.len()).sum();
    if value.len() < fixed || !value.starts_with(&**first) || !value.ends_with(&**last) {
        return false;
    }
    let mut rest = &value[first.len()..value.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(&**part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// Why a node could not be added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddError {
    /// The composite key is already a child of this level.
    Duplicate,
}

impl Node {
    /// Adds a child under composite key `key` (`key` or `key_value`); returns it to fill in.
    pub fn add(
        &mut self,
        key: String,
        limit: Option<Arc<RuleLimit>>,
        value_to_metric: bool,
        share_threshold: bool,
    ) -> Result<&mut Node, AddError> {
        if self.children.contains_key(key.as_str()) {
            return Err(AddError::Duplicate);
        }
        if key.contains('*') {
            self.wildcards
                .push((key.as_str().into(), key.split('*').map(Box::from).collect()));
        }
        let node = Node {
            limit,
            value_to_metric,
            share_threshold,
            wildcard_pattern: if share_threshold && key.contains('*') {
                key.as_str().into()
            } else {
                "".into()
            },
            ..Node::default()
        };
        Ok(self.children.entry(key.into()).or_insert(node))
    }

    /// Whether composite key `key` is a child of this level.
    pub fn has(&self, key: &str) -> bool {
        self.children.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(p: &str) -> Vec<Box<str>> {
        p.split('*').map(Box::from).collect()
    }

    #[test]
    fn wildcards_match_prefixes_middles_and_several_stars() {
        assert!(wildcard_match(&parts("path_/foo*"), "path_/foo/bar"));
        assert!(wildcard_match(&parts("path_/foo*"), "path_/foo"));
        assert!(!wildcard_match(&parts("path_/foo*"), "path_/fo"));
        assert!(wildcard_match(&parts("k_a*c"), "k_abc"));
        assert!(!wildcard_match(&parts("k_a*c"), "k_abd"));
        assert!(wildcard_match(&parts("k_a*b*c"), "k_a1b2c"));
        assert!(!wildcard_match(&parts("k_a*b*c"), "k_a1c2b"));
        // The fixed parts may not overlap: "k_ab*bc" needs at least 6 bytes.
        assert!(!wildcard_match(&parts("k_ab*bc"), "k_abc"));
        assert!(wildcard_match(&parts("k_*"), "k_"));
    }
}
