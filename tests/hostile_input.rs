//! Hostile input, on stable: the fuzz targets' entry functions (`sluice::fuzzing`, which
//! `fuzz/` drives with libFuzzer) run as bounded property tests, each over arbitrary bytes and
//! over structure-aware inputs: generated sluice and reference configs (valid, then mutated),
//! `${VAR}` texts, rate strings, path templates and request paths, descriptors, admin calls and
//! state files. The entry functions assert the invariants; these tests also assert that what
//! was generated valid is accepted. Inputs a fuzzer found that broke an invariant are kept as
//! regression tests at the end.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// Requests spell out `..Default::default()` even when they name every field today, so that fields
// added to the admin protos keep this file compiling.
#![allow(clippy::needless_update)]

use std::path::Path;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use sluice::config::reference::File;
use sluice::config::{self, rate::Rate};
use sluice::fuzzing::{self, AdminCall};
use sluice::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use sluice::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use sluice::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage;
use sluice::proto::envoy::service::rate_limit_quota::v3::{BucketId, RateLimitQuotaUsageReports};
use sluice::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use sluice::proto::sluice::admin::v1 as pb;

/// Cases per property: enough to cover the generators' shapes, few enough that the whole file
/// runs in seconds in a debug build. `cargo fuzz` is for long runs.
const BYTES_CASES: u32 = 512;
const SHAPED_CASES: u32 = 256;

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        ..ProptestConfig::default()
    }
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..1024)
}

/// Text made of `pieces` and some arbitrary characters: closer to the grammar than bytes.
fn text_of(pieces: &'static [&'static str]) -> impl Strategy<Value = String> {
    vec(
        prop_oneof![4 => select(pieces).prop_map(String::from), 1 => ".{0,3}"],
        0..40,
    )
    .prop_map(|p| p.concat())
}

// ---- arbitrary bytes, every target ----

proptest! {
    #![proptest_config(cases(BYTES_CASES))]

    #[test]
    fn any_bytes_as_a_sluice_config(data in bytes()) {
        fuzzing::config_sluice(&data);
    }

    #[test]
    fn any_bytes_as_reference_files(data in bytes()) {
        fuzzing::config_reference(&data);
    }

    #[test]
    fn any_bytes_as_env_text(data in bytes()) {
        fuzzing::env_expansion(&data);
    }

    #[test]
    fn any_bytes_as_a_rate(data in vec(any::<u8>(), 0..64)) {
        fuzzing::rate(&data);
    }

    #[test]
    fn any_bytes_as_templates_and_paths(data in bytes()) {
        fuzzing::path(&data);
    }

    #[test]
    fn any_bytes_as_a_rate_limit_request(data in bytes()) {
        fuzzing::rls_request(&data);
    }

    #[test]
    fn any_bytes_as_a_json_request(data in bytes()) {
        fuzzing::rls_json(&data);
    }

    #[test]
    fn any_bytes_as_admin_calls(data in bytes()) {
        fuzzing::admin_requests(&data);
    }

    #[test]
    fn any_bytes_as_a_state_file(data in bytes()) {
        fuzzing::state_file(&data);
    }

    #[test]
    fn any_bytes_as_quota_reports(data in bytes()) {
        fuzzing::rlqs_reports(&data);
    }
}

// ---- quota reports ----

/// Reports as a stream carries them: each length-delimited.
fn encode_reports(reports: &[RateLimitQuotaUsageReports]) -> Vec<u8> {
    use prost::Message as _;
    let mut out = Vec::new();
    for r in reports {
        r.encode_length_delimited(&mut out).unwrap();
    }
    out
}

fn quota_usage() -> impl Strategy<Value = BucketQuotaUsage> {
    let key = prop_oneof![
        Just("path".to_string()),
        Just("remote_address".to_string()),
        Just("user_agent".to_string()),
        "[a-z]{0,4}",
    ];
    let value = prop_oneof![
        Just("/transcribe".to_string()),
        Just("/api/training/execute".to_string()),
        Just("192.0.2.1".to_string()),
        Just("::ffff:192.0.2.1".to_string()),
        ".{0,8}",
    ];
    (
        prop::option::weighted(0.9, prop::collection::btree_map(key, value, 0..4)),
        prop_oneof![0u64..1000, any::<u64>()],
        prop_oneof![0u64..1000, any::<u64>()],
        any::<i64>(),
    )
        .prop_map(|(bucket, allowed, denied, secs)| BucketQuotaUsage {
            bucket_id: bucket.map(|b| BucketId {
                bucket: b.into_iter().collect(),
            }),
            time_elapsed: Some(prost_types::Duration {
                seconds: secs,
                nanos: 0,
            }),
            num_requests_allowed: allowed,
            num_requests_denied: denied,
            last_report: None,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn generated_quota_reports(
        reports in vec(
            (prop_oneof![Just("talk2me".to_string()), Just("training".to_string()), ".{0,6}"],
             vec(quota_usage(), 0..8)),
            1..fuzzing::MAX_QUOTA_REPORTS,
        ),
    ) {
        let reports: Vec<_> = reports
            .into_iter()
            .map(|(domain, usages)| RateLimitQuotaUsageReports {
                domain,
                bucket_quota_usages: usages,
            })
            .collect();
        fuzzing::rlqs_reports(&encode_reports(&reports));
    }
}

// ---- rates ----

const UNITS: [(&str, u64); 4] = [
    ("second", 1),
    ("minute", 60),
    ("hour", 3600),
    ("day", 86_400),
];

/// A valid rate string and the rate it means.
fn rate_string() -> impl Strategy<Value = (String, Rate)> {
    rate_string_upto(u64::from(u32::MAX))
}

/// A valid rate string with a count of at most `max`: a token bucket needs at least a
/// nanosecond per token, so configs take counts up to a million.
fn rate_string_upto(max: u64) -> impl Strategy<Value = (String, Rate)> {
    (
        1u64..=max,
        prop_oneof![3 => Just(1u64), 1 => 2u64..1000],
        select(&UNITS[..]),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(count, per, (unit, secs), words, plural)| {
            let unit = if plural || per > 1 {
                format!("{unit}s")
            } else {
                unit.to_string()
            };
            let text = match (per, words) {
                (1, false) => format!("{count}/{unit}"),
                (1, true) => format!("{count} per {unit}"),
                (p, false) => format!("{count}/{p} {unit}"),
                (p, true) => format!("{count} per {p} {unit}"),
            };
            let rate = Rate {
                count,
                per,
                unit_seconds: secs,
            };
            (text, rate)
        })
}

proptest! {
    #![proptest_config(cases(SHAPED_CASES))]

    #[test]
    fn generated_rates_parse_to_what_they_say((text, rate) in rate_string()) {
        prop_assert_eq!(text.parse::<Rate>(), Ok(rate));
        fuzzing::rate(text.as_bytes());
    }

    #[test]
    fn generated_rate_lists_parse(rates in vec(rate_string(), 1..4), sep in select(&[";", ",", " ; "][..])) {
        let text = rates.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>().join(sep);
        let want: Vec<Rate> = rates.iter().map(|(_, r)| *r).collect();
        prop_assert_eq!(config::rate::parse_list(&text), Ok(want));
        fuzzing::rate(text.as_bytes());
    }

    #[test]
    fn rate_like_text(text in text_of(&["10", "0", "/", " per ", "per", " ", "minute", "seconds", "hour", "day", ";", ",", "4294967296", "x", "-1"])) {
        fuzzing::rate(text.as_bytes());
    }
}

// ---- environment expansion ----

proptest! {
    #![proptest_config(cases(SHAPED_CASES))]

    #[test]
    fn env_like_text(text in text_of(&[
        "${S_SET}", "${UNSET:-default}", "${E_EMPTY:-fallback}", "${D_DOLLAR}", "${UNSET}",
        "$$", "$", "${", "}", "${1BAD}", "${A B}", ":-", "\n", "# ", "  #", "text", "${S_X:-}",
    ])) {
        fuzzing::env_expansion(text.as_bytes());
    }
}

// ---- path templates and request paths ----

fn template() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            4 => select(&["api", "v1", "users", "a.b", "x%41", "%2Fz", "caf\u{e9}", "%zz", "a", "b"][..])
                .prop_map(String::from),
            2 => select(&["{id}", "{name}", "{_x9}"][..]).prop_map(String::from),
            1 => select(&["{*rest}", "{}", "{*}", "{1x}", "a{b}", "{", ".", "..", "%2e"][..]).prop_map(String::from),
        ],
        0..5,
    )
    .prop_map(|segs| format!("/{}", segs.join("/")))
}

fn request_path() -> impl Strategy<Value = String> {
    text_of(&[
        "/",
        "//",
        "/./",
        "/../",
        "api",
        "v1",
        "users",
        "a",
        "b",
        "%61",
        "%2e",
        "%2E%2E",
        "%2F",
        "xA",
        "?q=1",
        "#f",
        "%",
        "%4",
        "caf%C3%A9",
        "id7",
        ".",
    ])
}

proptest! {
    #![proptest_config(cases(SHAPED_CASES))]

    #[test]
    fn generated_templates_and_paths(templates in vec(template(), 0..8), paths in vec(request_path(), 0..8)) {
        let input = format!("{}\n\n{}", templates.join("\n"), paths.join("\n"));
        fuzzing::path(input.as_bytes());
    }
}

// ---- sluice configs ----

/// An endpoint of a generated config: unique by its first segment.
fn endpoint(i: usize) -> impl Strategy<Value = String> {
    (
        vec(
            prop_oneof![
                3 => select(&["api", "v1", "x%41", "caf\u{e9}", "a.b"][..]).prop_map(String::from),
                1 => Just("{id}".to_string()),
            ],
            0..3,
        ),
        any::<bool>(),
        vec(rate_string_upto(1_000_000), 1..3),
        prop::option::of(select(
            &["sliding_window", "fixed_window", "token_bucket"][..],
        )),
        prop::option::of((1u64..20, rate_string_upto(1_000_000))),
        any::<bool>(),
    )
        .prop_map(move |(segs, catch_all, rates, algorithm, bucket, shadow)| {
            let mut path = format!("/e{i}");
            for (j, s) in segs.iter().enumerate() {
                path.push('/');
                path.push_str(&s.replace("{id}", &format!("{{id{j}}}")));
            }
            if catch_all {
                path.push_str("/{*rest}");
            }
            let limits: Vec<String> = rates.iter().map(|(t, _)| format!("{t:?}")).collect();
            let mut e = format!(
                "      - path: {path:?}\n        limits: [{}]\n",
                limits.join(", ")
            );
            if let Some(a) = algorithm {
                e.push_str(&format!("        algorithm: {a}\n"));
            }
            if let Some((burst, (refill, _))) = bucket {
                e.push_str(&format!(
                    "        burst: {burst}\n        refill: {refill:?}\n"
                ));
            }
            if shadow {
                e.push_str("        shadow: true\n");
            }
            e
        })
}

fn domain(i: usize) -> impl Strategy<Value = String> {
    (
        select(&["[remote_address]", "[remote_address, user_agent]", "[]", "[api_key]"][..]),
        select(&["sliding_window", "fixed_window", "token_bucket"][..]),
        prop::option::of(vec(rate_string_upto(1_000_000), 1..3)),
        prop::option::of((rate_string_upto(1_000_000), 1u64..7200)),
        (1usize..5).prop_flat_map(|n| (0..n).map(endpoint).collect::<Vec<_>>()),
    )
        .prop_map(move |(client, algorithm, global, auto_block, endpoints)| {
            let mut d = format!(
                "  - name: d{i}\n    client: {client}\n    algorithm: {algorithm}\n"
            );
            if let Some(g) = global {
                let g: Vec<String> = g.iter().map(|(t, _)| format!("{t:?}")).collect();
                d.push_str(&format!("    global: [{}]\n", g.join(", ")));
            }
            if let Some(((rate, _), secs)) = auto_block {
                d.push_str(&format!(
                    "    auto_block:\n      max_requests: {rate:?}\n      duration_seconds: {secs}\n"
                ));
            }
            d.push_str("    endpoints:\n");
            for e in endpoints {
                d.push_str(&e);
            }
            d
        })
}

/// A valid sluice config.
fn sluice_config() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        any::<bool>(),
        1usize..100_000,
        prop::option::of(select(&["192.0.2.0/24", "2001:db8::1", "10.0.0.1"][..])),
        (1usize..4).prop_flat_map(|n| (0..n).map(domain).collect::<Vec<_>>()),
    )
        .prop_map(|(enabled, shadow, max_keys, allow, domains)| {
            let mut c =
                format!("enabled: {enabled}\nshadow: {shadow}\nstore:\n  max_keys: {max_keys}\n");
            if let Some(a) = allow {
                c.push_str(&format!("allowlist: [{a:?}]\n"));
            }
            c.push_str("domains:\n");
            for d in domains {
                c.push_str(&d);
            }
            c
        })
}

/// `text` with one edit: a piece of YAML syntax inserted, a range deleted, or a line repeated.
fn mutated(text: String) -> impl Strategy<Value = String> {
    let len = text.len();
    (
        0..=len,
        0..=len,
        select(
            &[
                ":", "- ", "[", "]", "{", "}", "&a ", "*a", "\n", "  ", "${X}", "#", "\"", "!tag ",
                "? ", "|", ">", "0", "-1", "~", "null", "\t", "%",
            ][..],
        ),
        0u8..3,
    )
        .prop_map(move |(a, b, piece, kind)| {
            let bytes = text.as_bytes();
            let (lo, hi) = (a.min(b), a.max(b));
            let mut out: Vec<u8> = Vec::with_capacity(len + 8);
            match kind {
                0 => {
                    out.extend_from_slice(&bytes[..lo]);
                    out.extend_from_slice(piece.as_bytes());
                    out.extend_from_slice(&bytes[lo..]);
                }
                1 => {
                    out.extend_from_slice(&bytes[..lo]);
                    out.extend_from_slice(&bytes[hi..]);
                }
                _ => {
                    let start = bytes[..lo]
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(0, |i| i + 1);
                    let end = bytes[lo..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(len, |i| lo + i + 1);
                    out.extend_from_slice(&bytes[..end]);
                    out.extend_from_slice(&bytes[start..end]);
                    out.extend_from_slice(&bytes[end..]);
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        })
}

proptest! {
    #![proptest_config(cases(SHAPED_CASES))]

    #[test]
    fn generated_sluice_configs_load(text in sluice_config()) {
        if let Err(e) = config::parse(&text, "gen.yaml", |_| None) {
            panic!("a generated config was refused: {e}\n{text}");
        }
        fuzzing::config_sluice(text.as_bytes());
    }

    #[test]
    fn mutated_sluice_configs(text in sluice_config().prop_flat_map(mutated)) {
        fuzzing::config_sluice(text.as_bytes());
    }
}

// ---- reference configs ----

#[derive(Debug, Clone)]
struct Descriptor {
    value: Option<String>,
    rate: Option<String>,
    flags: Vec<&'static str>,
    children: Vec<Descriptor>,
}

fn reference_rate() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (
            select(&["second", "minute", "hour", "day", "week", "month", "year", "MINUTE"][..]),
            0u32..1000,
            prop::option::of("[a-z]{1,6}"),
        )
            .prop_map(|(unit, n, name)| match name {
                Some(name) => format!("{{unit: {unit}, requests_per_unit: {n}, name: {name}, replaces: [{{name: x{name}}}]}}"),
                None => format!("{{unit: {unit}, requests_per_unit: {n}}}"),
            }),
        1 => Just("{unlimited: true}".to_string()),
    ]
}

fn descriptor() -> impl Strategy<Value = Descriptor> {
    let leaf = (
        prop::option::of(
            select(&["v", "value1", "pre*", "*", "a*b", "429"][..]).prop_map(String::from),
        ),
        prop::option::of(reference_rate()),
        vec(
            select(
                &[
                    "shadow_mode",
                    "quota_mode",
                    "detailed_metric",
                    "value_to_metric",
                ][..],
            ),
            0..2,
        ),
    )
        .prop_map(|(value, rate, flags)| Descriptor {
            value,
            rate,
            flags,
            children: Vec::new(),
        });
    leaf.prop_recursive(3, 12, 3, |inner| {
        (
            prop::option::of(select(&["v", "pre*", "x"][..]).prop_map(String::from)),
            prop::option::of(reference_rate()),
            vec(inner, 1..3),
        )
            .prop_map(|(value, rate, children)| Descriptor {
                value,
                rate,
                flags: Vec::new(),
                children,
            })
    })
}

fn render_descriptors(out: &mut String, list: &[Descriptor], indent: usize) {
    let pad = " ".repeat(indent);
    for (i, d) in list.iter().enumerate() {
        // Keys unique among siblings: no duplicate composite keys.
        out.push_str(&format!("{pad}- key: k{i}\n"));
        if let Some(v) = &d.value {
            out.push_str(&format!("{pad}  value: {v:?}\n"));
            if v.contains('*') {
                out.push_str(&format!("{pad}  share_threshold: true\n"));
            }
        }
        if let Some(r) = &d.rate {
            out.push_str(&format!("{pad}  rate_limit: {r}\n"));
        }
        for f in &d.flags {
            out.push_str(&format!("{pad}  {f}: true\n"));
        }
        if !d.children.is_empty() {
            out.push_str(&format!("{pad}  descriptors:\n"));
            render_descriptors(out, &d.children, indent + 4);
        }
    }
}

/// Valid reference files, one domain each, and the variables to load them with.
fn reference_files() -> impl Strategy<Value = (Vec<String>, Vec<(&'static str, &'static str)>)> {
    (
        vec(vec(descriptor(), 0..4), 1..4),
        vec(
            select(
                &[
                    ("MERGE_DOMAIN_CONFIG", "false"),
                    ("SHADOW_MODE", "true"),
                    ("LOCAL_CACHE_SIZE_IN_BYTES", "1024"),
                    ("NEAR_LIMIT_RATIO", "0.5"),
                ][..],
            ),
            0..3,
        ),
    )
        .prop_map(|(files, env)| {
            let texts = files
                .iter()
                .enumerate()
                .map(|(i, descriptors)| {
                    let mut t = format!("domain: dom{i}\n");
                    if !descriptors.is_empty() {
                        t.push_str("descriptors:\n");
                        render_descriptors(&mut t, descriptors, 2);
                    }
                    t
                })
                .collect();
            (texts, env)
        })
}

fn reference_input(files: &[String], env: &[(&str, &str)]) -> Vec<u8> {
    let mut parts: Vec<String> = files.to_vec();
    if !env.is_empty() {
        let vars: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.push(format!("env:{}", vars.join("\n")));
    }
    parts.join("\0").into_bytes()
}

proptest! {
    #![proptest_config(cases(SHAPED_CASES))]

    #[test]
    fn generated_reference_files_load((texts, env) in reference_files()) {
        let files: Vec<File> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| File { name: format!("gen/{i}.yaml"), text: t.clone() })
            .collect();
        let lookup = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        if let Err(e) = config::from_files(Some(Path::new("gen")), &files, lookup) {
            panic!("generated reference files were refused: {e}\n{texts:#?}");
        }
        fuzzing::config_reference(&reference_input(&texts, &env));
    }

    #[test]
    fn mutated_reference_files(text in reference_files().prop_flat_map(|(t, _)| mutated(t.join("\n")))) {
        fuzzing::config_reference(text.as_bytes());
    }
}

// ---- descriptors ----

fn entry() -> impl Strategy<Value = Entry> {
    let key = prop_oneof![
        6 => select(&[
            "remote_address", "path", "user_agent", "key1", "subkey", "wild", "open", "shadow",
            "route", "method", "other", "",
        ][..]).prop_map(String::from),
        1 => ".{0,8}",
        1 => Just("k".repeat(1025)),
    ];
    let value = prop_oneof![
        6 => select(&[
            "192.0.2.1", "::ffff:192.0.2.1", "2001:db8::1", "not-an-ip", "/api/training/execute",
            "/api/training/cancel/42", "/transcribe?x=1", "/api//training/./execute",
            "/%61pi/training/execute", "/translate/stream", "value1", "pre-fix", "GET", "",
        ][..]).prop_map(String::from),
        1 => ".{0,12}",
        1 => Just("v".repeat(1025)),
    ];
    (key, value).prop_map(|(key, value)| Entry { key, value })
}

fn rate_limit_descriptor() -> impl Strategy<Value = RateLimitDescriptor> {
    (
        vec(entry(), 0..5),
        prop::option::of(prop_oneof![0u64..5, Just(u64::MAX)]),
        any::<bool>(),
        prop::option::of((prop_oneof![0u32..20, Just(u32::MAX)], -1i32..9)),
    )
        .prop_map(
            |(entries, hits_addend, is_negative_hits, limit)| RateLimitDescriptor {
                entries,
                hits_addend,
                is_negative_hits,
                limit: limit.map(|(requests_per_unit, unit)| RateLimitOverride {
                    requests_per_unit,
                    unit,
                }),
                ..Default::default()
            },
        )
}

fn rate_limit_request() -> impl Strategy<Value = RateLimitRequest> {
    (
        prop_oneof![
            6 => select(&["training", "talk2me", "fuzz", ""][..]).prop_map(String::from),
            1 => ".{0,8}",
        ],
        vec(rate_limit_descriptor(), 0..6),
        prop_oneof![0u32..5, Just(u32::MAX)],
    )
        .prop_map(|(domain, descriptors, hits_addend)| RateLimitRequest {
            domain,
            descriptors,
            hits_addend,
        })
}

proptest! {
    #![proptest_config(cases(SHAPED_CASES))]

    #[test]
    fn generated_rate_limit_requests(reqs in vec(rate_limit_request(), 1..6)) {
        use prost::Message as _;
        for r in &reqs {
            fuzzing::rls_request(&r.encode_to_vec());
        }
    }

    #[test]
    fn generated_json_requests(r in rate_limit_request(), camel in any::<bool>()) {
        let hits = if camel { "hitsAddend" } else { "hits_addend" };
        let descriptors: Vec<serde_json::Value> = r.descriptors.iter().map(|d| {
            let mut v = serde_json::json!({
                "entries": d.entries.iter().map(|e| serde_json::json!({"key": e.key, "value": e.value})).collect::<Vec<_>>(),
            });
            if let Some(h) = d.hits_addend {
                v[hits] = serde_json::json!(h.to_string());
            }
            if let Some(l) = &d.limit {
                v["limit"] = serde_json::json!({"requests_per_unit": l.requests_per_unit, "unit": l.unit});
            }
            v
        }).collect();
        let mut body = serde_json::json!({"domain": r.domain, "descriptors": descriptors});
        body[hits] = serde_json::json!(r.hits_addend);
        fuzzing::rls_json(body.to_string().as_bytes());
    }
}

// ---- admin calls ----

fn ip() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => select(&[
            "192.0.2.7", "192.0.2.0/24", "2001:db8::1", "2001:db8::/32", "::ffff:192.0.2.7",
            "0.0.0.0/0", "::/0", "192.0.2.7/33", "not an ip", " 192.0.2.8 ", "", "192.0.2.7/24",
        ][..]).prop_map(String::from),
        1 => ".{0,16}",
    ]
}

fn admin_call() -> impl Strategy<Value = AdminCall> {
    let name = || {
        prop_oneof![
            select(&["training", "talk2me", ""][..]).prop_map(String::from),
            ".{0,6}"
        ]
    };
    let reason = || prop_oneof![3 => ".{0,20}", 1 => Just("r".repeat(5000))];
    prop_oneof![
        name().prop_map(|domain| AdminCall::GetConfig(pb::GetConfigRequest {
            domain,
            ..Default::default()
        })),
        (
            prop_oneof![0u32..20, Just(u32::MAX)],
            prop_oneof![ip(), ".{0,6}"]
        )
            .prop_map(|(top, client)| {
                AdminCall::GetStats(pb::GetStatsRequest {
                    top,
                    client,
                    ..Default::default()
                })
            }),
        (
            ip(),
            prop_oneof![Just(0u64), 1u64..3600, Just(u64::MAX)],
            any::<bool>(),
            reason()
        )
            .prop_map(
                |(ip, duration_seconds, permanent, reason)| AdminCall::BlockIp(
                    pb::BlockIpRequest {
                        ip,
                        duration_seconds,
                        permanent,
                        reason,
                        ..Default::default()
                    }
                )
            ),
        ip().prop_map(|ip| AdminCall::UnblockIp(pb::UnblockIpRequest {
            ip,
            ..Default::default()
        })),
        Just(AdminCall::ListBlocks(pb::ListBlocksRequest::default())),
        (ip(), reason()).prop_map(|(ip, reason)| AdminCall::Allow(pb::AllowRequest {
            ip,
            reason,
            ..Default::default()
        })),
        ip().prop_map(|ip| AdminCall::Disallow(pb::DisallowRequest {
            ip,
            ..Default::default()
        })),
        Just(AdminCall::ListAllowed(pb::ListAllowedRequest::default())),
        (name(), prop_oneof![ip(), ".{0,6}"]).prop_map(|(domain, client)| {
            AdminCall::ResetClient(pb::ResetClientRequest {
                domain,
                client,
                ..Default::default()
            })
        }),
    ]
}

proptest! {
    #![proptest_config(cases(SHAPED_CASES))]

    #[test]
    fn generated_admin_calls(calls in vec(admin_call(), 1..fuzzing::MAX_ADMIN_CALLS)) {
        fuzzing::admin_requests(&fuzzing::encode_admin_calls(&calls));
    }
}

// ---- state files ----

fn state_json() -> impl Strategy<Value = String> {
    let number = || prop_oneof![Just(0u64), 1u64..u64::from(u32::MAX), Just(u64::MAX)];
    let block = (
        ip(),
        any::<bool>(),
        number(),
        prop::option::of(number()),
        ".{0,10}",
    )
        .prop_map(|(net, permanent, created_at, expires_at, reason)| {
            serde_json::json!({"net": net, "permanent": permanent, "created_at": created_at,
                "expires_at": expires_at, "reason": reason, "created_by": "gen"})
        });
    let allowed = (ip(), select(&["config", "runtime", "other"][..]), number()).prop_map(
        |(net, source, created_at)| {
            serde_json::json!({"net": net, "source": source, "created_at": created_at, "reason": "gen"})
        },
    );
    (
        prop_oneof![4 => Just(1u32), 1 => 0u32..3],
        vec(block, 0..5),
        vec(allowed, 0..4),
        0u8..4,
    )
        .prop_map(|(version, blocks, allowed, edit)| {
            let mut v =
                serde_json::json!({"version": version, "blocks": blocks, "allowed": allowed});
            match edit {
                0 => v["unknown"] = serde_json::json!(1),
                1 => {
                    v.as_object_mut().unwrap().remove("allowed");
                }
                _ => {}
            }
            v.to_string()
        })
}

proptest! {
    #![proptest_config(cases(SHAPED_CASES))]

    #[test]
    fn generated_state_files(text in state_json()) {
        fuzzing::state_file(text.as_bytes());
    }
}

// ---- the seed corpus of `fuzz/` ----

/// `fuzz/corpus/<target>/` holds seeds made from the repository's own files and a few
/// requests: this fails when the committed seeds drift from them (the default config changed,
/// say), and rewrites them with `SLUICE_UPDATE_CORPUS=1 cargo test --test hostile_input seed`.
#[test]
fn fuzz_seed_corpus_matches_the_repository() {
    use prost::Message as _;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = root.join("fuzz/corpus");
    let update = std::env::var_os("SLUICE_UPDATE_CORPUS").is_some();
    let stale = std::cell::RefCell::new(Vec::new());
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus.join(target);
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        } else if std::fs::read(dir.join(name)).ok().as_deref() != Some(bytes) {
            stale.borrow_mut().push(format!("{target}/{name}"));
        }
    };
    let read = |rel: &str| std::fs::read(root.join(rel)).unwrap();
    write("config_sluice", "default", &read("config/sluice.yaml"));
    write(
        "config_sluice",
        "anchors",
        b"domains:\n  - name: a\n    client: []\n    auto_block: {max_requests: 100/minute}\n    endpoints:\n      - path: /x/{id}\n        limits: &std [10/minute, {rate: 5 per 30 seconds, algorithm: fixed_window, name: n}]\n        burst: 3\n        refill: 1 per 6 seconds\n      - path: /y/{*rest}\n        limits: *std\n",
    );
    write("env_expansion", "default", &read("config/sluice.yaml"));
    write(
        "env_expansion",
        "forms",
        b"a: ${S_A}\nb: ${UNSET:-1/minute}\n# ${NOPE}\nc: $$5 ${E_X:-d} ${D_Y}\n",
    );
    let data = "tests/data/envoyproxy-ratelimit/test/config";
    for f in [
        "basic_config",
        "wildcard",
        "share_threshold",
        "metadata",
        "shadowmode_config",
    ] {
        write("config_reference", f, &read(&format!("{data}/{f}.yaml")));
    }
    let mut merged = read(&format!("{data}/merge_domain_key1.yaml"));
    merged.push(0);
    merged.extend(read(&format!("{data}/merge_domain_key2.yaml")));
    merged.extend(b"\0env:MERGE_DOMAIN_CONFIG=true\nSHADOW_MODE=false\n");
    write("config_reference", "merged", &merged);
    for (i, r) in [
        "10/minute",
        "5 per 30 seconds",
        "10/minute; 100/hour,1000/day",
    ]
    .iter()
    .enumerate()
    {
        write("rate", &format!("rate{i}"), r.as_bytes());
    }
    write(
        "path",
        "training",
        b"/api/training/execute\n/api/training/cancel/{job_id}\n/api/training/{job_id}/force-start\n/api/{*rest}\n/\n/a%2Fb\n\n/api//training/./execute?x=1\n/api/training/cancel/42\n/api/x/../training/%65xecute\n/%2e%2e/api/v1\n",
    );
    let entry = |k: &str, v: &str| Entry {
        key: k.into(),
        value: v.into(),
    };
    let requests = [
        RateLimitRequest {
            domain: "training".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![
                    entry("remote_address", "192.0.2.1"),
                    entry("path", "/api/training/execute"),
                ],
                ..Default::default()
            }],
            hits_addend: 1,
        },
        RateLimitRequest {
            domain: "talk2me".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![
                    entry("remote_address", "192.0.2.2"),
                    entry("user_agent", "ua"),
                    entry("path", "/transcribe"),
                ],
                limit: Some(RateLimitOverride {
                    requests_per_unit: 2,
                    unit: 2,
                }),
                ..Default::default()
            }],
            hits_addend: 0,
        },
        RateLimitRequest {
            domain: "fuzz".into(),
            descriptors: vec![
                RateLimitDescriptor {
                    entries: vec![entry("key1", "value1"), entry("subkey", "s")],
                    ..Default::default()
                },
                RateLimitDescriptor {
                    entries: vec![entry("route", "r"), entry("method", "GET")],
                    hits_addend: Some(2),
                    ..Default::default()
                },
            ],
            hits_addend: 0,
        },
    ];
    for (i, r) in requests.iter().enumerate() {
        write("rls_request", &format!("request{i}"), &r.encode_to_vec());
    }
    write(
        "rls_json",
        "request0",
        br#"{"domain":"training","descriptors":[{"entries":[{"key":"remote_address","value":"192.0.2.1"},{"key":"path","value":"/api/training/execute"}]}],"hitsAddend":1}"#,
    );
    write(
        "rls_json",
        "request1",
        br#"{"domain":"fuzz","descriptors":[{"entries":[{"key":"key1","value":"value1"}],"limit":{"requestsPerUnit":5,"unit":"HOUR"},"hits_addend":"3"}]}"#,
    );
    let calls = [
        AdminCall::BlockIp(pb::BlockIpRequest {
            ip: "192.0.2.7".into(),
            duration_seconds: 60,
            reason: "seed".into(),
            ..Default::default()
        }),
        AdminCall::Allow(pb::AllowRequest {
            ip: "2001:db8::/32".into(),
            ..Default::default()
        }),
        AdminCall::ListBlocks(pb::ListBlocksRequest::default()),
        AdminCall::GetStats(pb::GetStatsRequest {
            top: 5,
            client: "192.0.2.7".into(),
            ..Default::default()
        }),
        AdminCall::ResetClient(pb::ResetClientRequest {
            domain: "training".into(),
            client: "192.0.2.7".into(),
            ..Default::default()
        }),
        AdminCall::UnblockIp(pb::UnblockIpRequest {
            ip: "192.0.2.7".into(),
            ..Default::default()
        }),
        AdminCall::Disallow(pb::DisallowRequest {
            ip: "2001:db8::/32".into(),
            ..Default::default()
        }),
        AdminCall::GetConfig(pb::GetConfigRequest {
            domain: "talk2me".into(),
            ..Default::default()
        }),
        AdminCall::ListAllowed(pb::ListAllowedRequest::default()),
    ];
    write(
        "admin_requests",
        "sequence",
        &fuzzing::encode_admin_calls(&calls),
    );
    write(
        "state_file",
        "state",
        br#"{"version":1,"blocks":[{"net":"192.0.2.7/32","permanent":false,"created_at":1767225600000000000,"expires_at":1767229200000000000,"reason":"seed","created_by":"admin"},{"net":"2001:db8::/32","permanent":true,"created_at":1767225600000000000,"expires_at":null,"reason":"net","created_by":"admin"}],"allowed":[{"net":"10.0.0.1/32","source":"runtime","created_at":1767225600000000000,"reason":"ops"}]}"#,
    );
    let talk2me = |allowed: u64, denied: u64, secs: i64| BucketQuotaUsage {
        bucket_id: Some(BucketId {
            bucket: [
                ("path", "/transcribe"),
                ("remote_address", "192.0.2.7"),
                ("user_agent", "curl/8"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        }),
        time_elapsed: Some(prost_types::Duration {
            seconds: secs,
            nanos: 0,
        }),
        num_requests_allowed: allowed,
        num_requests_denied: denied,
        last_report: None,
    };
    // As Envoy 1.40 reports: a new bucket at once (0 s), then every 5 s.
    let reports = [
        (talk2me(1, 0, 0), "talk2me"),
        (talk2me(2, 4, 5), "talk2me"),
        (talk2me(0, 0, 5), "talk2me"),
    ]
    .map(|(usage, domain)| RateLimitQuotaUsageReports {
        domain: domain.into(),
        bucket_quota_usages: vec![usage],
    });
    write("rlqs_reports", "envoy", &encode_reports(&reports));
    let stale = stale.into_inner();
    assert!(
        stale.is_empty(),
        "fuzz seeds out of date: {stale:?}; rewrite them with SLUICE_UPDATE_CORPUS=1 cargo test --test hostile_input seed"
    );
}

// ---- regressions: inputs the fuzzers found ----

/// config_sluice: an error at the end of a file without a final newline named the line after
/// the last one (libyaml ends the unterminated line before the end of the stream).
#[test]
fn regression_unterminated_last_line() {
    fuzzing::config_sluice(b"domains: [");
    fuzzing::config_sluice(b"domains:\n  - name: a\n    auto_block: {max_requests: ");
}
