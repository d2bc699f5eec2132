//! envoyproxy/ratelimit's own test files (tests/data/envoyproxy-ratelimit), loaded as the
//! reference loads them and answered as it answers: tables of request -> code, limit,
//! remaining and reset under a manual clock, over the memory store and a real redis-server;
//! each invalid file refused with the reference's reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::redis::RedisFixture;
use common::*;
use sluice::clock::Timestamp;
use sluice::config::{self, Config};
use sluice::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use sluice::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use sluice::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use sluice::store::Store;

fn data(rel: &str) -> PathBuf {
    repo_path("tests/data/envoyproxy-ratelimit").join(rel)
}

fn load(path: &Path, vars: &[(&str, &str)]) -> Result<Config, String> {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    config::load_with(path, |k| vars.get(k).cloned()).map_err(|e| e.to_string())
}

/// A directory holding copies of `files` (from the test data), for loads of several files.
fn dir_of(files: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (i, f) in files.iter().enumerate() {
        let name = format!(
            "{i}-{}",
            Path::new(f).file_name().unwrap().to_string_lossy()
        );
        std::fs::copy(data(f), dir.path().join(name)).unwrap();
    }
    dir
}

#[test]
fn every_invalid_file_is_refused_with_the_reference_reason() {
    let cases = [
        ("empty_domain.yaml", "config file cannot have empty domain"),
        ("empty_key.yaml", "descriptor has empty key"),
        (
            "duplicate_key.yaml",
            "duplicate descriptor composite key 'test-domain.key1_value1'",
        ),
        ("bad_limit_unit.yaml", "invalid rate limit unit 'foo'"),
        (
            "replaces_self.yaml",
            "replaces should not contain name of same descriptor",
        ),
        (
            "replaces_empty.yaml",
            "should not have an empty replaces entry",
        ),
        ("bad_yaml.yaml", "error loading config file: yaml: line "),
        (
            "misspelled_key.yaml",
            "config error, unknown key 'ratelimit'",
        ),
        (
            "misspelled_key2.yaml",
            "config error, unknown key 'requestsperunit'",
        ),
        (
            "non_string_key.yaml",
            "config error, key is not of type string: 0.25",
        ),
        (
            "non_map_list.yaml",
            "config error, yaml file contains list of type other than map: a",
        ),
        (
            "unlimited_with_unit.yaml",
            "should not specify rate limit unit when unlimited",
        ),
    ];
    for (file, reason) in cases {
        let path = data(&format!("test/config/{file}"));
        let err = load(&path, &[]).expect_err(file);
        let want = format!("{}: {reason}", path.display());
        assert!(err.starts_with(&want), "{file}: got {err:?}, want {want:?}");
    }
}

#[test]
fn a_second_file_for_a_domain_is_refused_unless_merging() {
    let dir = dir_of(&[
        "test/config/basic_config.yaml",
        "test/config/duplicate_domain.yaml",
    ]);
    let err = load(dir.path(), &[]).unwrap_err();
    assert!(
        err.ends_with("1-duplicate_domain.yaml: duplicate domain 'test-domain' in config file"),
        "{err}"
    );

    let dir = dir_of(&[
        "test/config/merge_domain_key1.yaml",
        "test/config/merge_domain_key2.yaml",
    ]);
    assert!(load(dir.path(), &[]).is_err());
    let cfg = load(dir.path(), &[("MERGE_DOMAIN_CONFIG", "true")]).unwrap();
    let r = cfg.rules.reference.unwrap();
    assert_eq!(r.trees.len(), 1);
    assert_eq!(r.trees[0].limits().len(), 2);

    // Merging does not merge a key twice.
    let dir = dir_of(&[
        "test/config/merge_domain_key1.yaml",
        "test/config/merge_domain_key1.yaml",
    ]);
    let err = load(dir.path(), &[("MERGE_DOMAIN_CONFIG", "true")]).unwrap_err();
    assert!(
        err.ends_with(
            "1-merge_domain_key1.yaml: duplicate descriptor composite key 'test-domain.key1_value1'"
        ),
        "{err}"
    );
}

#[test]
fn every_valid_file_loads() {
    for f in [
        "test/config/basic_config.yaml",
        "test/config/shadowmode_config.yaml",
        "test/config/wildcard.yaml",
        "test/config/share_threshold.yaml",
        "test/config/metadata.yaml",
        "test/config/merge_domain_key1.yaml",
        "test/config/merge_domain_key2.yaml",
        "examples/ratelimit/config/config.yaml",
        "examples/ratelimit/config/example.yaml",
        "test/integration/runtime/current/ratelimit/reload.yaml",
    ] {
        let cfg = load(&data(f), &[]).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(cfg.rules.reference.is_some(), "{f}");
    }
}

#[test]
fn the_runtime_directory_is_composed_from_the_reference_variables() {
    let vars = [
        (
            "RUNTIME_ROOT",
            data("test/integration/runtime/current")
                .to_string_lossy()
                .to_string(),
        ),
        ("RUNTIME_SUBDIRECTORY", "ratelimit".to_string()),
    ];
    let dir = config::runtime_dir(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
        .unwrap();
    let cfg = load(&dir, &[]).unwrap();
    let r = cfg.rules.reference.unwrap();
    let mut domains: Vec<&str> = r.trees.iter().map(|t| t.domain.as_str()).collect();
    domains.sort();
    // reload.yaml sits beside config/, so it is not loaded until copied in.
    assert_eq!(domains, ["another", "basic", "share-threshold-test"]);
}

#[test]
fn a_sluice_config_in_a_directory_of_reference_files_is_refused() {
    let dir = dir_of(&["test/config/basic_config.yaml"]);
    std::fs::copy(
        repo_path("config/sluice.yaml"),
        dir.path().join("sluice.yaml"),
    )
    .unwrap();
    let err = load(dir.path(), &[]).unwrap_err();
    assert!(err.contains("sluice.yaml is a sluice config"), "{err}");
}

/// One status: code, `(requests_per_unit, unit, name)` of `current_limit`, `limit_remaining`,
/// `duration_until_reset` seconds.
type Want = (Code, Option<(u32, i32, String)>, u32, Option<i64>);

const SECOND: i32 = 1;
const MINUTE: i32 = 2;
const HOUR: i32 = 3;
const DAY: i32 = 4;

/// An expected `current_limit`.
fn lim(requests_per_unit: u32, unit: i32, name: &str) -> Option<(u32, i32, String)> {
    Some((requests_per_unit, unit, name.to_string()))
}

fn statuses(r: &RateLimitResponse) -> Vec<Want> {
    r.statuses
        .iter()
        .map(|s| {
            (
                Code::try_from(s.code).unwrap(),
                s.current_limit
                    .as_ref()
                    .map(|l| (l.requests_per_unit, l.unit, l.name.clone())),
                s.limit_remaining,
                s.duration_until_reset.as_ref().map(|d| d.seconds),
            )
        })
        .collect()
}

fn d(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    descriptor(entries)
}

async fn basic_config_table<S: Store>(server: &TestServer<S>) {
    use Code::{Ok as OK, OverLimit as OVER};
    // 30 s past a whole day: 30 s into the minute, 30 s into the hour.
    server.clock.set(Timestamp::from_secs(T0 + 30));
    let ask = |ds: Vec<RateLimitDescriptor>| server.call(request("test-domain", ds));
    let table: Vec<(Vec<RateLimitDescriptor>, Want)> = vec![
        (
            vec![d(&[("key1", "value1"), ("subkey1", "x")])],
            (OK, lim(5, SECOND, ""), 4, Some(1)),
        ),
        (
            vec![d(&[("key1", "value1"), ("subkey1", "subvalue1")])],
            (OK, lim(10, SECOND, ""), 9, Some(1)),
        ),
        (vec![d(&[("key1", "value1")])], (OK, None, 0, None)),
        (
            vec![d(&[("key2", "value2")])],
            (OK, lim(30, MINUTE, ""), 29, Some(30)),
        ),
        (vec![d(&[("key2", "value3")])], (OK, None, 0, None)),
        (
            vec![d(&[("key2", "other")])],
            (OK, lim(20, MINUTE, ""), 19, Some(30)),
        ),
        (
            vec![d(&[("key3", "any")])],
            (OK, lim(1, HOUR, ""), 0, Some(3570)),
        ),
        (
            vec![d(&[("key3", "any")])],
            (OVER, lim(1, HOUR, ""), 0, Some(3570)),
        ),
        (
            vec![d(&[("key4", "x")])],
            (OK, lim(1, DAY, "key4_rate_limit"), 0, Some(86_370)),
        ),
        (
            vec![d(&[("key5", "value5")])],
            (OK, lim(15, DAY, ""), 14, Some(86_370)),
        ),
        (
            vec![d(&[("key5", "value5"), ("subkey5", "subvalue5")])],
            (OK, lim(25, DAY, ""), 24, Some(86_370)),
        ),
        (vec![d(&[("key6", "x")])], (OK, None, u32::MAX, None)),
        (vec![d(&[("nothing", "here")])], (OK, None, 0, None)),
        // Deeper than any rule: nothing applies.
        (
            vec![d(&[("key2", "value2"), ("deeper", "x")])],
            (OK, None, 0, None),
        ),
    ];
    for (i, (ds, want)) in table.into_iter().enumerate() {
        let r = ask(ds).await;
        assert_eq!(Code::try_from(r.overall_code).unwrap(), want.0, "row {i}");
        assert_eq!(statuses(&r), vec![want], "row {i}");
        assert!(r.raw_body.is_empty() && r.response_headers_to_add.is_empty());
    }

    // Refused requests are still counted: the hour's count keeps growing past the limit.
    for _ in 0..3 {
        let r = ask(vec![d(&[("key3", "any")])]).await;
        assert_eq!(statuses(&r)[0].0, OVER);
    }
    // The whole request is charged, the descriptor that passed included.
    let r = ask(vec![d(&[("key3", "any")]), d(&[("key2", "value2")])]).await;
    assert_eq!(Code::try_from(r.overall_code).unwrap(), OVER);
    assert_eq!(
        statuses(&r),
        vec![
            (OVER, lim(1, HOUR, ""), 0, Some(3570)),
            (OK, lim(30, MINUTE, ""), 28, Some(30)),
        ]
    );
    // hits_addend 0 on a descriptor checks without counting; at exactly the limit it passes.
    let mut check = d(&[("key5", "value5")]);
    check.hits_addend = Some(0);
    let r = ask(vec![check]).await;
    assert_eq!(statuses(&r)[0], (OK, lim(15, DAY, ""), 14, Some(86_370)));
    // The request's hits_addend charges every descriptor.
    let mut req = request("test-domain", vec![d(&[("key5", "value5")])]);
    req.hits_addend = 14;
    let r = server.call(req).await;
    assert_eq!(statuses(&r)[0], (OK, lim(15, DAY, ""), 0, Some(86_370)));
    // A descriptor's limit override replaces the rule, keyed by its entries.
    let mut o = d(&[("key1", "value1")]);
    o.limit = Some(
        sluice::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride {
            requests_per_unit: 2,
            unit: 3, // HOUR
        },
    );
    let r = ask(vec![o.clone()]).await;
    assert_eq!(statuses(&r)[0], (OK, lim(2, HOUR, ""), 1, Some(3570)));

    // The next window starts afresh, at its boundary.
    server.clock.set(Timestamp::from_secs(T0 + 3600));
    let r = ask(vec![d(&[("key3", "any")])]).await;
    assert_eq!(statuses(&r)[0], (OK, lim(1, HOUR, ""), 0, Some(3600)));
    // Unknown domain: OK, no limits.
    let r = server
        .call(request("nope", vec![d(&[("key3", "any")])]))
        .await;
    assert_eq!(statuses(&r), vec![(OK, None, 0, None)]);
}

/// Runs `$body` against a server on the test data file `$file` (with the reference settings
/// `$vars`), once over the memory store and once over a real redis-server.
/// With `config = EXPR`, on the config `EXPR` builds.
macro_rules! on_both_stores {
    ($body:ident, $file:expr, $vars:expr) => {
        on_both_stores!($body, config = load(&data($file), &$vars).unwrap());
    };
    ($body:ident, config = $config:expr) => {
        mod $body {
            use super::*;

            #[tokio::test]
            async fn memory() {
                let server = TestServer::start_with($config).await;
                super::$body(&server).await;
                server.stop().await;
            }

            #[tokio::test]
            async fn redis() {
                let Some(fixture) = RedisFixture::single() else {
                    return;
                };
                let server = TestServer::start_store($config, Setup::default(), fixture).await;
                super::$body(&server).await;
                server.stop().await;
            }
        }
    };
}

on_both_stores!(basic_config_table, "test/config/basic_config.yaml", []);
// The same with sluice's hashed key names in Redis instead of the reference's.
on_both_stores!(
    basic_config_table_hashed_keys,
    "test/config/basic_config.yaml",
    [("SLUICE_REDIS_KEYS", "sluice")]
);
async fn basic_config_table_hashed_keys<S: Store>(server: &TestServer<S>) {
    basic_config_table(server).await;
}

on_both_stores!(
    stop_increment_when_over_limit_charges_only_the_rules_over,
    "test/config/basic_config.yaml",
    [("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", "true")]
);
async fn stop_increment_when_over_limit_charges_only_the_rules_over<S: Store>(
    server: &TestServer<S>,
) {
    let both = || {
        request(
            "test-domain",
            vec![d(&[("key3", "a")]), d(&[("key2", "value2")])],
        )
    };
    let r = server.call(both()).await;
    assert_eq!(statuses(&r)[1].2, 29);
    let r = server.call(both()).await;
    assert_eq!(Code::try_from(r.overall_code).unwrap(), Code::OverLimit);
    // Not charged: what is left is reported without this request.
    assert_eq!(statuses(&r)[1].2, 29);
    let r = server
        .call(request("test-domain", vec![d(&[("key2", "value2")])]))
        .await;
    assert_eq!(statuses(&r)[0].2, 28);
}

on_both_stores!(
    shadow_rules_answer_ok_and_count_in_shadow_mode,
    "test/config/shadowmode_config.yaml",
    []
);
async fn shadow_rules_answer_ok_and_count_in_shadow_mode<S: Store>(server: &TestServer<S>) {
    for i in 0..12 {
        let r = server
            .call(request(
                "test-domain",
                vec![d(&[("key1", "value1"), ("subkey1", "subvalue1")])],
            ))
            .await;
        assert_eq!(Code::try_from(r.overall_code).unwrap(), Code::Ok, "{i}");
        assert_eq!(statuses(&r)[0].2, 10u32.saturating_sub(i + 1));
    }
    let text = http_get(server.http_addr, "/metrics").await.1;
    assert!(
        text.contains(
            "ratelimit_service_rate_limit_shadow_mode{domain=\"test-domain\",key1=\"key1_value1\",key2=\"subkey1_subvalue1\"} 2"
        ),
        "{text}"
    );
}

on_both_stores!(
    shadow_mode_answers_ok,
    "test/config/basic_config.yaml",
    [("SHADOW_MODE", "true")]
);
async fn shadow_mode_answers_ok<S: Store>(server: &TestServer<S>) {
    // The descriptor's own code still says it is over; only the overall code is OK.
    let mut codes = Vec::new();
    for _ in 0..3 {
        let r = server
            .call(request("test-domain", vec![d(&[("key3", "a")])]))
            .await;
        assert_eq!(Code::try_from(r.overall_code).unwrap(), Code::Ok);
        codes.push(statuses(&r)[0].0);
    }
    assert_eq!(codes, [Code::Ok, Code::OverLimit, Code::OverLimit]);
    let text = http_get(server.http_addr, "/metrics").await.1;
    assert!(
        text.contains("ratelimit_service_global_shadow_mode 2"),
        "{text}"
    );
}

on_both_stores!(
    wildcards_match_as_the_reference_matches,
    "test/config/wildcard.yaml",
    []
);
async fn wildcards_match_as_the_reference_matches<S: Store>(server: &TestServer<S>) {
    let one = |e: &[(&str, &str)]| request("test-domain", vec![d(e)]);
    for (e, want) in [
        (vec![("wild", "foo1")], Some(20)),
        (vec![("wild", "foo")], Some(20)),
        (vec![("wild", "fo")], None),
        (vec![("midWild", "barxyzb")], Some(20)),
        (vec![("midWild", "barxyzc")], None),
        (vec![("multiWild", "foo1bar2baz")], Some(10)),
        (vec![("multiWild", "foo1baz2bar")], None),
        (vec![("nestedWild", "val1"), ("wild", "goo2")], Some(20)),
        (vec![("noWild", "foo1")], None),
    ] {
        let r = server.call(one(&e)).await;
        let got = r.statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.requests_per_unit);
        assert_eq!(got, want, "{e:?}");
    }
}

on_both_stores!(
    replaces_unlimited_and_quota_follow_the_reference,
    "examples/ratelimit/config/example.yaml",
    []
);
async fn replaces_unlimited_and_quota_follow_the_reference<S: Store>(server: &TestServer<S>) {
    // `bar=bkthomps` (named bkthomps) is replaced by the matched `category=account` rule.
    let r = server
        .call(request(
            "rl",
            vec![
                d(&[("foo", "x"), ("bar", "bkthomps")]),
                d(&[("category", "account")]),
            ],
        ))
        .await;
    let s = statuses(&r);
    assert_eq!(s[0], (Code::Ok, None, 0, None));
    assert_eq!(s[1].1.as_ref().map(|l| l.0), Some(4));
    // `bay` is unlimited.
    let r = server
        .call(request("rl", vec![d(&[("foo", "x"), ("bay", "y")])]))
        .await;
    assert_eq!(statuses(&r)[0], (Code::Ok, None, u32::MAX, None));
    // `bar=banned` allows nothing.
    let r = server
        .call(request("rl", vec![d(&[("foo", "x"), ("bar", "banned")])]))
        .await;
    assert_eq!(Code::try_from(r.overall_code).unwrap(), Code::OverLimit);
    assert_eq!(statuses(&r)[0].1, lim(0, MINUTE, "banned_limit"));
    // Quota rules (service_1: 1/minute, service_2: 2/minute) refuse only when all are over.
    let quota = |services: &[&str]| {
        request(
            "rl",
            services.iter().map(|s| d(&[("service", s)])).collect(),
        )
    };
    let r = server.call(quota(&["service_1", "service_2"])).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    let r = server.call(quota(&["service_1", "service_2"])).await;
    assert_eq!(r.overall_code, Code::Ok as i32, "one quota still has room");
    assert_eq!(statuses(&r)[0].0, Code::OverLimit);
    let r = server.call(quota(&["service_1", "service_2"])).await;
    assert_eq!(
        r.overall_code,
        Code::OverLimit as i32,
        "every quota is over"
    );
}

on_both_stores!(
    limit_headers_and_dynamic_metadata_as_the_reference_sends_them,
    "test/config/metadata.yaml",
    [
        ("LIMIT_RESPONSE_HEADERS_ENABLED", "true"),
        ("LIMIT_RESET_HEADER", "X-Reset"),
        ("RESPONSE_DYNAMIC_METADATA", "true"),
    ]
);
async fn limit_headers_and_dynamic_metadata_as_the_reference_sends_them<S: Store>(
    server: &TestServer<S>,
) {
    use prost_types::value::Kind;
    server.clock.set(Timestamp::from_secs(T0 + 15));
    // key2 (20/minute, metadata service_with_quota) and key1.subkey1 (5/second, metadata
    // name: service_1): the headers report the one closest to its limit.
    let r = server
        .call(request(
            "test-domain",
            vec![
                d(&[("key2", "x")]),
                d(&[("key1", "value1"), ("subkey1", "y")]),
            ],
        ))
        .await;
    let headers: Vec<(&str, &str)> = r
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(
        headers,
        [
            ("RateLimit-Limit", "5"),
            ("RateLimit-Remaining", "4"),
            ("X-Reset", "1")
        ]
    );
    let md = r.dynamic_metadata.expect("dynamic metadata");
    let field = |v: &prost_types::Value| v.kind.clone();
    assert_eq!(
        md.fields.get("domain").and_then(field),
        Some(Kind::StringValue("test-domain".into()))
    );
    let Some(Kind::StructValue(meta)) = md.fields.get("metadata").and_then(field) else {
        panic!("no merged metadata: {md:?}")
    };
    let mut keys: Vec<&String> = meta.fields.keys().collect();
    keys.sort();
    assert_eq!(keys, ["name", "service_with_quota"]);
    let Some(Kind::ListValue(ds)) = md.fields.get("descriptors").and_then(field) else {
        panic!("no descriptors: {md:?}")
    };
    assert_eq!(ds.values.len(), 2);

    // A descriptor over its limit contributes no metadata; headers report it (remaining 0).
    for _ in 0..5 {
        server
            .call(request(
                "test-domain",
                vec![d(&[("key1", "value1"), ("subkey1", "y")])],
            ))
            .await;
    }
    let r = server
        .call(request(
            "test-domain",
            vec![
                d(&[("key1", "value1"), ("subkey1", "y")]),
                d(&[("key2", "x")]),
            ],
        ))
        .await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.response_headers_to_add[1].value, "0");
    let md = r.dynamic_metadata.expect("dynamic metadata");
    let Some(Kind::StructValue(meta)) = md.fields.get("metadata").and_then(field) else {
        panic!("no merged metadata: {md:?}")
    };
    let keys: Vec<&String> = meta.fields.keys().collect();
    assert_eq!(keys, ["service_with_quota"]);
}

#[tokio::test]
async fn per_key_statistics_use_the_reference_prometheus_names() {
    let cfg = load(&data("test/config/basic_config.yaml"), &[]).unwrap();
    let server = TestServer::start_with(cfg).await;
    for _ in 0..3 {
        server
            .call(request("test-domain", vec![d(&[("key3", "a")])]))
            .await;
    }
    for _ in 0..2 {
        server
            .call(request("test-domain", vec![d(&[("key7", "b")])]))
            .await;
    }
    let text = http_get(server.http_addr, "/metrics").await.1;
    for line in [
        "ratelimit_service_rate_limit_total_hits{domain=\"test-domain\",key1=\"key3\"} 3",
        "ratelimit_service_rate_limit_over_limit{domain=\"test-domain\",key1=\"key3\"} 2",
        "ratelimit_service_rate_limit_near_limit{domain=\"test-domain\",key1=\"key3\"} 1",
        "ratelimit_service_rate_limit_within_limit{domain=\"test-domain\",key1=\"key3\"} 1",
        // detailed_metric: keyed by the request's value.
        "ratelimit_service_rate_limit_total_hits{domain=\"test-domain\",key1=\"key7_b\"} 2",
        "ratelimit_service_config_load_success 1",
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    server.stop().await;
}

#[tokio::test]
async fn json_endpoint_and_healthcheck_answer_as_the_reference() {
    let cfg = load(&data("test/config/basic_config.yaml"), &[]).unwrap();
    let server = TestServer::start_with(cfg).await;
    let body =
        r#"{"domain":"test-domain","descriptors":[{"entries":[{"key":"key3","value":"a"}]}]}"#;
    let (code, text) = http_post(server.http_addr, "/json", body).await;
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["overallCode"], "OK");
    assert_eq!(v["statuses"][0]["currentLimit"]["requestsPerUnit"], 1);
    let (code, text) = http_post(server.http_addr, "/json", body).await;
    assert_eq!(code, 429, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["overallCode"], "OVER_LIMIT");
    let (code, text) = http_post(server.http_addr, "/json", "{not json").await;
    assert_eq!((code, text.trim()), (400, "Bad Request"));
    let (code, _) = http_get(server.http_addr, "/healthcheck").await;
    assert_eq!(code, 200);
    server.stop().await;
}

#[tokio::test]
async fn reference_keys_in_redis_are_the_reference_keys() {
    let Some(fixture) = RedisFixture::single() else {
        return;
    };
    let cfg = load(
        &data("test/config/basic_config.yaml"),
        &[
            ("SLUICE_REDIS_KEYS", "reference"),
            ("CACHE_KEY_PREFIX", "pre_"),
        ],
    )
    .unwrap();
    let redis = fixture.server.as_ref().unwrap().url();
    let server = TestServer::start_store(cfg, Setup::default(), fixture).await;
    server.clock.set(Timestamp::from_secs(T0 + 30));
    for _ in 0..3 {
        server
            .call(request(
                "test-domain",
                vec![d(&[("key2", "value2")]), d(&[("key3", "x")])],
            ))
            .await;
    }
    let client = ::redis::Client::open(redis.as_str()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let get = |k: String| {
        let mut c = c.clone();
        async move {
            ::redis::cmd("GET")
                .arg(k)
                .query_async::<Option<u64>>(&mut c)
                .await
                .unwrap()
        }
    };
    // Fixed windows: the minute and the hour that hold T0 + 30 both start at T0.
    assert_eq!(
        get(format!("pre_test-domain_key2_value2_{T0}")).await,
        Some(3)
    );
    assert_eq!(get(format!("pre_test-domain_key3_x_{T0}")).await, Some(3));
    let ttl: i64 = ::redis::cmd("TTL")
        .arg(format!("pre_test-domain_key2_value2_{T0}"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((1..=60 + 300).contains(&ttl), "{ttl}");
    // A reference replica adding to the same key is seen by sluice.
    let _: u64 = ::redis::cmd("INCRBY")
        .arg(format!("pre_test-domain_key2_value2_{T0}"))
        .arg(20)
        .query_async(&mut c)
        .await
        .unwrap();
    let r = server
        .call(request("test-domain", vec![d(&[("key2", "value2")])]))
        .await;
    assert_eq!(r.statuses[0].limit_remaining, 30 - 24);
    server.stop().await;
}

#[test]
fn a_reload_follows_files_added_to_and_removed_from_the_directory() {
    let dir = dir_of(&["test/integration/runtime/current/ratelimit/config/basic.yaml"]);
    let cfg = load(dir.path(), &[]).unwrap();
    let limiter = std::sync::Arc::new(sluice::limiter::Limiter::new(
        cfg.rules,
        sluice::store::MemoryStore::new(Default::default()),
        std::sync::Arc::new(sluice::clock::ManualClock::new(Timestamp::from_secs(T0))),
    ));
    let reloader =
        sluice::reload::Reloader::new(dir.path().to_path_buf(), limiter.clone(), cfg.store);
    let domains = || -> Vec<String> {
        let r = limiter.rules();
        let mut v: Vec<String> = r
            .reference
            .as_ref()
            .unwrap()
            .trees
            .iter()
            .map(|t| t.domain.clone())
            .collect();
        v.sort();
        v
    };
    assert_eq!(domains(), ["basic"]);
    std::fs::copy(
        data("test/integration/runtime/current/ratelimit/reload.yaml"),
        dir.path().join("reload.yaml"),
    )
    .unwrap();
    reloader.poll();
    assert_eq!(domains(), ["basic", "reload"]);
    // A bad file is refused and the running rules stay.
    std::fs::write(
        dir.path().join("bad.yaml"),
        "domain: x\ndescriptors:\n  - value: v\n",
    )
    .unwrap();
    reloader.poll();
    assert_eq!(domains(), ["basic", "reload"]);
    assert_eq!(
        limiter
            .stats()
            .reloads_failed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    std::fs::remove_file(dir.path().join("bad.yaml")).unwrap();
    std::fs::remove_file(dir.path().join("reload.yaml")).unwrap();
    reloader.poll();
    assert_eq!(domains(), ["basic"]);
}

on_both_stores!(
    share_threshold_counts_every_matching_value_in_one_counter,
    "test/config/share_threshold.yaml",
    []
);
async fn share_threshold_counts_every_matching_value_in_one_counter<S: Store>(
    server: &TestServer<S>,
) {
    let mut left = Vec::new();
    for v in ["files/a", "files/b", "files/c/d"] {
        let r = server
            .call(request("test-domain", vec![d(&[("files", v)])]))
            .await;
        left.push(r.statuses[0].limit_remaining);
    }
    assert_eq!(left, [99, 98, 97]);
}

on_both_stores!(
    the_local_cache_refuses_keys_already_over_without_counting,
    "test/config/basic_config.yaml",
    [("LOCAL_CACHE_SIZE_IN_BYTES", "4096")]
);
async fn the_local_cache_refuses_keys_already_over_without_counting<S: Store>(
    server: &TestServer<S>,
) {
    let codes: Vec<i32> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let r = server
                .call(request("test-domain", vec![d(&[("key3", "a")])]))
                .await;
            v.push(r.overall_code);
        }
        v
    };
    assert_eq!(
        codes,
        [
            Code::Ok as i32,
            Code::OverLimit as i32,
            Code::OverLimit as i32
        ]
    );
    let text = http_get(server.http_addr, "/metrics").await.1;
    for line in [
        "ratelimit_service_local_cache_hits 1",
        "ratelimit_service_rate_limit_over_limit_with_local_cache{domain=\"test-domain\",key1=\"key3\"} 1",
        "ratelimit_service_rate_limit_over_limit{domain=\"test-domain\",key1=\"key3\"} 2",
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    // The cache ends with the window.
    server.clock.set(Timestamp::from_secs(T0 + 3600));
    let r = server
        .call(request("test-domain", vec![d(&[("key3", "a")])]))
        .await;
    assert_eq!(r.overall_code, Code::Ok as i32);
}

#[tokio::test]
async fn health_follows_whether_a_domain_is_loaded() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let vars = [("HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED", "true")];
    let empty = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(load(empty.path(), &vars).unwrap()).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let mut status = async || {
        let request = HealthCheckRequest {
            service: "ratelimit".into(),
        };
        client.check(request).await.unwrap().into_inner().status
    };
    assert_eq!(status().await, ServingStatus::NotServing as i32);
    assert_eq!(http_get(server.http_addr, "/healthcheck").await.0, 500);

    let loaded = load(&data("test/config/basic_config.yaml"), &vars).unwrap();
    server.limiter.swap_rules(loaded.rules);
    assert_eq!(http_get(server.http_addr, "/healthcheck").await.0, 200);
    // gRPC health is checked every second: poll it, with a deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while status().await != ServingStatus::Serving as i32 {
        assert!(std::time::Instant::now() < deadline, "still NOT_SERVING");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    server.stop().await;
}

/// Asks `rows` in order, each a request of one descriptor in `domain`, and checks each status.
async fn table<S: Store>(
    server: &TestServer<S>,
    domain: &str,
    rows: Vec<(Vec<(&str, &str)>, Want)>,
) {
    for (i, (entries, want)) in rows.into_iter().enumerate() {
        let r = server.call(request(domain, vec![d(&entries)])).await;
        assert_eq!(statuses(&r), vec![want], "{domain} row {i}: {entries:?}");
    }
}

on_both_stores!(
    the_example_mongo_config_answers,
    "examples/ratelimit/config/config.yaml",
    []
);
async fn the_example_mongo_config_answers<S: Store>(server: &TestServer<S>) {
    use Code::Ok as OK;
    table(
        server,
        "mongo_cps",
        vec![
            (
                vec![("database", "users")],
                (OK, lim(500, SECOND, ""), 499, Some(1)),
            ),
            (
                vec![("database", "default")],
                (OK, lim(500, SECOND, ""), 499, Some(1)),
            ),
            (
                vec![("database", "users")],
                (OK, lim(500, SECOND, ""), 498, Some(1)),
            ),
            (vec![("database", "other")], (OK, None, 0, None)),
        ],
    )
    .await;
}

on_both_stores!(
    the_integration_runtime_directory_answers,
    "test/integration/runtime/current/ratelimit/config",
    []
);
async fn the_integration_runtime_directory_answers<S: Store>(server: &TestServer<S>) {
    use Code::{Ok as OK, OverLimit as OVER};
    server.clock.set(Timestamp::from_secs(T0 + 30));
    table(
        server,
        "basic",
        vec![
            (vec![("key1", "a")], (OK, lim(50, SECOND, ""), 49, Some(1))),
            (
                vec![("one_per_minute", "a")],
                (OK, lim(1, MINUTE, ""), 0, Some(30)),
            ),
            (
                vec![("one_per_minute", "a")],
                (OVER, lim(1, MINUTE, ""), 0, Some(30)),
            ),
            // Another value is another counter.
            (
                vec![("one_per_minute", "b")],
                (OK, lim(1, MINUTE, ""), 0, Some(30)),
            ),
        ],
    )
    .await;
    table(
        server,
        "another",
        vec![
            (vec![("key2", "a")], (OK, lim(20, MINUTE, ""), 19, Some(30))),
            (vec![("key3", "a")], (OK, lim(10, HOUR, ""), 9, Some(3570))),
            (
                vec![("key4", "a")],
                (OK, lim(20, DAY, ""), 19, Some(86_370)),
            ),
        ],
    )
    .await;
    table(
        server,
        "share-threshold-test",
        vec![
            (
                vec![("files", "files/a")],
                (OK, lim(10, HOUR, ""), 9, Some(3570)),
            ),
            (
                vec![("files", "files/b")],
                (OK, lim(10, HOUR, ""), 8, Some(3570)),
            ),
            // Without share_threshold, each value counts alone.
            (
                vec![("files_no_share", "files_no_share/a")],
                (OK, lim(10, HOUR, ""), 9, Some(3570)),
            ),
            (
                vec![("files_no_share", "files_no_share/b")],
                (OK, lim(10, HOUR, ""), 9, Some(3570)),
            ),
        ],
    )
    .await;
}

on_both_stores!(
    the_reload_file_blocks_with_a_zero_limit,
    "test/integration/runtime/current/ratelimit/reload.yaml",
    []
);
async fn the_reload_file_blocks_with_a_zero_limit<S: Store>(server: &TestServer<S>) {
    use Code::{Ok as OK, OverLimit as OVER};
    table(
        server,
        "reload",
        vec![
            (vec![("block", "x")], (OVER, lim(0, SECOND, ""), 0, Some(1))),
            (vec![("key1", "x")], (OK, lim(50, SECOND, ""), 49, Some(1))),
        ],
    )
    .await;
}

on_both_stores!(
    merged_domain_files_answer_as_one,
    config = {
        let dir = dir_of(&[
            "test/config/merge_domain_key1.yaml",
            "test/config/merge_domain_key2.yaml",
        ]);
        load(dir.path(), &[("MERGE_DOMAIN_CONFIG", "true")]).unwrap()
    }
);
async fn merged_domain_files_answer_as_one<S: Store>(server: &TestServer<S>) {
    use Code::Ok as OK;
    table(
        server,
        "test-domain",
        vec![
            (
                vec![("key1", "value1")],
                (OK, lim(10, MINUTE, ""), 9, Some(60)),
            ),
            (
                vec![("key2", "value2")],
                (OK, lim(20, MINUTE, ""), 19, Some(60)),
            ),
        ],
    )
    .await;
}

/// The binary, configured only by the reference's variables (no `SLUICE_*`): a file, Redis by
/// `REDIS_*` in the reference's key names, and a warning for a variable it does not honour.
#[tokio::test]
async fn the_binary_takes_the_reference_variables() {
    use common::process::{addrs_from_log, serve_on_free_ports, spawn_logged};
    let Some(redis) = common::redis::RedisServer::start() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    serve_on_free_ports(
        &mut cmd,
        data("test/config/basic_config.yaml"),
        state.path().join("state.json"),
    )
    .env("REDIS_SOCKET_TYPE", "tcp")
    .env("REDIS_URL", format!("127.0.0.1:{}", redis.port))
    .env("USE_STATSD", "true");
    let (mut child, lines) = spawn_logged(&mut cmd);
    let ([grpc], log) = addrs_from_log(&lines, ["serving RateLimitService"]);
    let log = log.join("\n");
    assert!(
        log.contains("USE_STATSD is not honoured"),
        "no warning:\n{log}"
    );
    assert!(log.contains("store=redis"), "not on Redis:\n{log}");

    let mut client =
        sluice::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient::connect(
            format!("http://{grpc}"),
        )
        .await
        .unwrap();
    for left in [29, 28] {
        let r = client
            .should_rate_limit(request("test-domain", vec![d(&[("key2", "value2")])]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.statuses[0].limit_remaining, left);
    }
    let keys = redis.cli(&["KEYS", "test-domain_key2_value2_*"]);
    let key = keys.trim();
    assert!(key.starts_with("test-domain_key2_value2_"), "{keys:?}");
    assert_eq!(redis.cli(&["GET", key]).trim(), "2");
    child.kill().unwrap();
    child.wait().unwrap();
}
