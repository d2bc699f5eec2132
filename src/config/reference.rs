//! envoyproxy/ratelimit's descriptor files, loaded as the reference loads them: the same keys,
//! the same checks, and the same error texts (`<file>: duplicate domain 'x' in config file`), so
//! an operator's existing files, and what they know about their errors, carry over unchanged.
//!
//! A file is one domain: `domain`, then `descriptors` nested to any depth, each with `key`, an
//! optional `value` (which may hold `*` wildcards), an optional `rate_limit` (`unit`,
//! `requests_per_unit`, `unlimited`, `name`, `replaces`), and the flags `shadow_mode`,
//! `quota_mode`, `detailed_metric`, `value_to_metric`, `share_threshold` and `metadata`.
//! Loading is all-or-nothing: the first error refuses the whole set.

use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use serde_yaml::Value;

use crate::limiter::model::Unit;
use crate::limiter::tree::{Node, RuleLimit, Tree};

/// The keys the reference accepts anywhere in a file (it checks every mapping against one list).
const VALID_KEYS: [&str; 16] = [
    "domain",
    "key",
    "value",
    "descriptors",
    "rate_limit",
    "unit",
    "requests_per_unit",
    "unlimited",
    "shadow_mode",
    "quota_mode",
    "name",
    "replaces",
    "detailed_metric",
    "value_to_metric",
    "share_threshold",
    "metadata",
];

/// A file refused, as the reference words it: `<file>: <reason>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct ReferenceError {
    /// The file, as it was named to the loader.
    pub file: String,
    /// The reference's reason.
    pub reason: String,
}

/// Whether `text` is a reference file rather than a sluice config: sluice's has a top-level
/// `domains:` list; the reference's has `domain:`. Decided on the text, so that a file that is
/// not even valid YAML is still reported in the format it was meant to be.
pub fn is_reference(text: &str) -> bool {
    !text.lines().any(|l| l.starts_with("domains:"))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawRoot {
    #[serde(deserialize_with = "scalar_string")]
    domain: String,
    descriptors: Option<Vec<RawDescriptor>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawDescriptor {
    #[serde(deserialize_with = "scalar_string")]
    key: String,
    #[serde(deserialize_with = "scalar_string")]
    value: String,
    rate_limit: Option<RawRateLimit>,
    descriptors: Option<Vec<RawDescriptor>>,
    shadow_mode: bool,
    quota_mode: bool,
    detailed_metric: bool,
    value_to_metric: bool,
    share_threshold: bool,
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawRateLimit {
    requests_per_unit: u32,
    #[serde(deserialize_with = "scalar_string")]
    unit: String,
    unlimited: bool,
    #[serde(deserialize_with = "scalar_string")]
    name: String,
    replaces: Option<Vec<RawReplaces>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawReplaces {
    #[serde(deserialize_with = "scalar_string")]
    name: String,
}

/// A string field as Go's yaml.v2 fills one: any scalar's text (`value: 429` is `"429"`), and
/// nothing for null.
fn scalar_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "cannot unmarshal {} into string",
            kind(&other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Sequence(_) => "sequence",
        Value::Mapping(_) => "mapping",
        Value::Tagged(_) => "tagged value",
    }
}

/// A YAML scalar as Go prints it in the reference's messages.
fn show(v: &Value) -> String {
    match v {
        Value::Null => "<nil>".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Sequence(_) | Value::Mapping(_) | Value::Tagged(_) => serde_yaml::to_string(v)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// The reference's `validateYamlKeys`: every mapping key a string from [`VALID_KEYS`], lists
/// only of mappings, leaves only strings, integers, booleans or null (`metadata` is free-form).
fn validate_keys(map: &serde_yaml::Mapping) -> Result<(), String> {
    for (k, v) in map {
        let Value::String(k) = k else {
            return Err(format!(
                "config error, key is not of type string: {}",
                show(k)
            ));
        };
        if !VALID_KEYS.contains(&k.as_str()) {
            return Err(format!("config error, unknown key '{k}'"));
        }
        if k == "metadata" {
            continue;
        }
        match v {
            Value::Sequence(items) => {
                for e in items {
                    let Value::Mapping(m) = e else {
                        return Err(format!(
                            "config error, yaml file contains list of type other than map: {}",
                            show(e)
                        ));
                    };
                    validate_keys(m)?;
                }
            }
            Value::Mapping(m) => validate_keys(m)?,
            Value::String(_) | Value::Bool(_) | Value::Null => {}
            Value::Number(n) if n.is_i64() || n.is_u64() => {}
            Value::Number(_) | Value::Tagged(_) => return Err("error checking config".to_string()),
        }
    }
    Ok(())
}

/// Parses one file's text into its root, checking keys first as the reference does.
fn parse_file(text: &str) -> Result<RawRoot, String> {
    super::guard::check_aliases(text)
        .map_err(|m| format!("error loading config file: yaml: {m}"))?;
    let value: Value = serde_yaml::from_str(text)
        .map_err(|e| format!("error loading config file: {}", yaml_message(&e)))?;
    match &value {
        Value::Mapping(m) => validate_keys(m)?,
        Value::Null => return Ok(RawRoot::default()),
        other => {
            return Err(format!(
                "error loading config file: cannot unmarshal {} into the config's mapping",
                kind(other)
            ));
        }
    }
    serde_yaml::from_value(value)
        .map_err(|e| format!("error loading config file: {}", yaml_message(&e)))
}

/// serde_yaml's message in the reference's shape: `yaml: line N: ...`.
fn yaml_message(e: &serde_yaml::Error) -> String {
    let mut m = e.to_string();
    if let Some(i) = m.rfind(" at line ") {
        m.truncate(i);
    }
    match e.location() {
        Some(l) => format!("yaml: line {}: {m}", l.line()),
        None => format!("yaml: {m}"),
    }
}

/// One file to load: its name in errors, and its text.
#[derive(Debug, Clone)]
pub struct File {
    /// Shown in errors.
    pub name: String,
    /// The YAML.
    pub text: String,
}

/// Loads `files` (in order) into one tree per domain. With `merge` (`MERGE_DOMAIN_CONFIG`), a
/// domain in several files is one tree; without, a second file for a domain is an error.
pub fn load(files: &[File], merge: bool) -> Result<Vec<Tree>, ReferenceError> {
    let mut trees: Vec<Tree> = Vec::new();
    for f in files {
        let err = |reason: String| ReferenceError {
            file: f.name.clone(),
            reason,
        };
        let root = parse_file(&f.text).map_err(err)?;
        if root.domain.is_empty() {
            return Err(err("config file cannot have empty domain".to_string()));
        }
        let at = match trees.iter().position(|t| t.domain == root.domain) {
            Some(_) if !merge => {
                return Err(err(format!(
                    "duplicate domain '{}' in config file",
                    root.domain
                )));
            }
            Some(i) => i,
            None => {
                trees.push(Tree::new(root.domain.clone()));
                trees.len() - 1
            }
        };
        let tree = &mut trees[at];
        let prefix = format!("{}.", root.domain);
        add_descriptors(
            tree.root_mut(),
            &prefix,
            root.descriptors.unwrap_or_default(),
        )
        .map_err(err)?;
    }
    Ok(trees)
}

/// The reference's unit names (case-insensitive), `UNKNOWN` excluded.
fn unit(name: &str) -> Option<Unit> {
    Some(match name.to_ascii_uppercase().as_str() {
        "SECOND" => Unit::Second,
        "MINUTE" => Unit::Minute,
        "HOUR" => Unit::Hour,
        "DAY" => Unit::Day,
        "WEEK" => Unit::Week,
        "MONTH" => Unit::Month,
        "YEAR" => Unit::Year,
        _ => return None,
    })
}

fn add_descriptors(node: &mut Node, parent: &str, list: Vec<RawDescriptor>) -> Result<(), String> {
    for d in list {
        if d.key.is_empty() {
            return Err("descriptor has empty key".to_string());
        }
        let mut composite = d.key.clone();
        if !d.value.is_empty() {
            composite.push('_');
            composite.push_str(&d.value);
        }
        let full = format!("{parent}{composite}");
        if node.has(&composite) {
            return Err(format!("duplicate descriptor composite key '{full}'"));
        }
        let limit = match d.rate_limit {
            None => None,
            Some(r) => {
                let unit = unit(&r.unit);
                if r.unlimited && unit.is_some() {
                    return Err("should not specify rate limit unit when unlimited".to_string());
                }
                if !r.unlimited && unit.is_none() {
                    return Err(format!("invalid rate limit unit '{}'", r.unit));
                }
                let replaces: Vec<Box<str>> = r
                    .replaces
                    .unwrap_or_default()
                    .into_iter()
                    .map(|x| Box::from(x.name))
                    .collect();
                if replaces.iter().any(|x| x.is_empty()) {
                    return Err("should not have an empty replaces entry".to_string());
                }
                if replaces.iter().any(|x| **x == *r.name) {
                    return Err("replaces should not contain name of same descriptor".to_string());
                }
                Some(Arc::new(RuleLimit {
                    key: full.as_str().into(),
                    name: r.name.into(),
                    requests_per_unit: r.requests_per_unit,
                    unit,
                    unlimited: r.unlimited,
                    shadow: d.shadow_mode,
                    quota: d.quota_mode,
                    detailed_metric: d.detailed_metric,
                    replaces,
                    metadata: d.metadata.filter(|m| !m.is_empty()),
                    stats: OnceLock::new(),
                }))
            }
        };
        if d.share_threshold && !composite.contains('*') {
            return Err(format!(
                "share_threshold can only be used with wildcard values (containing '*'), but found key '{composite}'"
            ));
        }
        let child = node
            .add(composite, limit, d.value_to_metric, d.share_threshold)
            .map_err(|_| format!("duplicate descriptor composite key '{full}'"))?;
        add_descriptors(
            child,
            &format!("{full}."),
            d.descriptors.unwrap_or_default(),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(yaml: &str) -> Tree {
        let file = File {
            name: "inline.yaml".into(),
            text: yaml.into(),
        };
        load(&[file], false).unwrap().remove(0)
    }

    /// The statistics key of the rule `entries` find (the reference's `rl.Stats.Key`).
    fn stats_key(t: &Tree, entries: &[(&str, &str)]) -> String {
        let f = t.find(entries).expect("a rule");
        f.stats_key.unwrap_or_else(|| f.limit.key.to_string())
    }

    #[test]
    fn value_to_metric_keys_take_the_request_values_where_asked() {
        // The reference's TestValueToMetric_UsesRuntimeValuesInStats.
        let t = tree(
            "domain: domain\ndescriptors:\n  - key: route\n    value_to_metric: true\n    descriptors:\n      - key: http_method\n        value_to_metric: true\n        descriptors:\n          - key: subject_id\n            rate_limit: {unit: minute, requests_per_unit: 60}\n",
        );
        let e = [
            ("route", "draw"),
            ("http_method", "GET"),
            ("subject_id", "123"),
        ];
        assert_eq!(
            stats_key(&t, &e),
            "domain.route_draw.http_method_GET.subject_id"
        );
        // TestValueToMetric_DefaultKeyIncludesValueAtThatLevel.
        let t = tree(
            "domain: d\ndescriptors:\n  - key: k1\n    value_to_metric: true\n    descriptors:\n      - key: k2\n        rate_limit: {unit: second, requests_per_unit: 1}\n",
        );
        assert_eq!(stats_key(&t, &[("k1", "A"), ("k2", "foo")]), "d.k1_A.k2");
        // Without the flag the rule's own key.
        let t = tree(
            "domain: d\ndescriptors:\n  - key: k1\n    descriptors:\n      - key: k2\n        rate_limit: {unit: second, requests_per_unit: 1}\n",
        );
        assert_eq!(stats_key(&t, &[("k1", "A"), ("k2", "foo")]), "d.k1.k2");
    }

    #[test]
    fn share_threshold_keys_keep_the_pattern() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/envoyproxy-ratelimit/test/config/share_threshold.yaml"
        ))
        .unwrap();
        let t = tree(&text);
        // share_threshold wins over value_to_metric.
        assert_eq!(
            stats_key(&t, &[("route", "api/v1"), ("method", "GET")]),
            "test-domain.route_api/*.method"
        );
        // detailed_metric below a shared wildcard: the pattern, then the request's values.
        assert_eq!(
            stats_key(&t, &[("service", "svc/a"), ("endpoint", "e1")]),
            "test-domain.service_svc/*.endpoint_e1"
        );
        let f = t.find(&[("files", "files/a/b")]).unwrap();
        assert_eq!(f.shared.as_slice(), &[(0, "files/*")]);
    }
}
