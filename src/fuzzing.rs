//! The fuzz targets' entry functions, one per parser of outside input: given bytes, each runs the
//! parser the way sluice runs it, asserts what must hold of the answer, and otherwise returns.
//! `fuzz/` drives them with libFuzzer (`cargo fuzz run <name>`); `tests/hostile_input.rs` runs
//! the same functions on stable as bounded property tests, over arbitrary bytes and over
//! generated, structure-aware inputs. A panic here is a finding: a parser panicked, hung, or
//! broke an invariant. Test support, not API: hidden from the documentation.

// The targets report findings by panicking, so panicking on a broken precondition of their own
// (a runtime that cannot start, a scratch file that cannot be written) is the same report.
#![allow(clippy::expect_used)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tonic::{Code, Request, Status};

use crate::access::{AccessList, parse_net};
use crate::admin::AdminService;
use crate::clock::{ManualClock, Timestamp};
use crate::config::reference::File;
use crate::config::{self, ConfigError, env, rate};
use crate::limiter::path::{MAX_PATH_SEGMENTS, PathRouter, PathTemplate};
use crate::limiter::{self, Limiter};
use crate::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::Code as RlsCode;
use crate::proto::sluice::admin::v1 as pb;
use crate::proto::sluice::admin::v1::admin_server::Admin;
use crate::service::rls::{self, MAX_DESCRIPTORS, MAX_ENTRIES, MAX_FIELD_BYTES, RlsService};
use crate::service::{codec, json};
use crate::store::{MemoryStore, MemoryStoreOptions};

/// The start of every target's clock: 2026-01-01T00:00:00Z.
const T0: u64 = 1_767_225_600;

/// The repository's default config, which the request and admin targets serve.
pub const DEFAULT_CONFIG: &str = include_str!("../config/sluice.yaml");

/// An envoyproxy/ratelimit file using each feature of the reference's rules, which the request
/// targets serve beside [`DEFAULT_CONFIG`].
pub const REFERENCE_CONFIG: &str = "\
domain: fuzz
descriptors:
  - key: key1
    value: value1
    rate_limit: {unit: second, requests_per_unit: 5}
    descriptors:
      - key: subkey
        rate_limit: {unit: minute, requests_per_unit: 10}
  - key: wild
    value: pre*
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 3}
  - key: open
    rate_limit: {unlimited: true}
  - key: shadow
    shadow_mode: true
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: route
    value_to_metric: true
    detailed_metric: true
    descriptors:
      - key: method
        rate_limit: {unit: day, requests_per_unit: 2, name: daily, replaces: [{name: other}]}
      - key: other
        quota_mode: true
        rate_limit: {unit: week, requests_per_unit: 7, name: other}
";

/// Counters a target's store keeps: small, so a long fuzzing run stays small.
const MAX_KEYS: usize = 4096;

thread_local! {
    /// One runtime per thread for the async services; current-thread, so that a target's work
    /// runs on the thread that called it.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    /// The services the request targets ask: sluice's rules and the reference's.
    static RLS: Vec<(Arc<ManualClock>, RlsService<MemoryStore>)> = vec![
        rls_service(DEFAULT_CONFIG, "config/sluice.yaml"),
        rls_service(REFERENCE_CONFIG, "fuzz.yaml"),
    ];
}

fn block_on<F: Future>(f: F) -> F::Output {
    RUNTIME.with(|rt| rt.block_on(f))
}

fn limiter_for(cfg: config::Config, clock: Arc<ManualClock>) -> Limiter<MemoryStore> {
    Limiter::new(
        cfg.rules,
        MemoryStore::new(MemoryStoreOptions { max_keys: MAX_KEYS }),
        clock,
    )
}

/// A limiter over the config `text` (named `name`), and its clock.
fn limiter_over(text: &str, name: &str) -> (Arc<ManualClock>, Limiter<MemoryStore>) {
    let file = File {
        name: name.to_string(),
        text: text.to_string(),
    };
    let cfg = config::from_files(None, &[file], |_| None).expect("the fuzz configs are valid");
    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(T0)));
    (clock.clone(), limiter_for(cfg, clock))
}

fn rls_service(text: &str, name: &str) -> (Arc<ManualClock>, RlsService<MemoryStore>) {
    let (clock, limiter) = limiter_over(text, name);
    (clock, RlsService::new(Arc::new(limiter)))
}

/// Variables the config targets see: `FUZZ_RATE`, `FUZZ_EMPTY` (set but empty) and
/// `FUZZ_DOLLAR` (a value that looks like a reference, which is never expanded again).
fn config_env(name: &str) -> Option<String> {
    match name {
        "FUZZ_RATE" => Some("10/minute".to_string()),
        "FUZZ_EMPTY" => Some(String::new()),
        "FUZZ_DOLLAR" => Some("$${FUZZ_RATE}".to_string()),
        _ => None,
    }
}

/// The 1-based line numbers `text` has.
fn lines_in(text: &str) -> usize {
    text.matches('\n').count() + 1
}

/// A config file in sluice's format (or, if it has no `domains:` line, the reference's), as
/// `--config FILE` loads it.
pub fn config_sluice(data: &[u8]) {
    let file = File {
        name: "fuzz.yaml".to_string(),
        text: String::from_utf8_lossy(data).into_owned(),
    };
    let files = std::slice::from_ref(&file);
    let result = config::from_files(None, files, config_env);
    check_config_outcome(&result, &[file.name.as_str()], None);
    if let Err(ConfigError::Invalid {
        line: Some(line), ..
    }) = &result
    {
        assert!(
            (1..=lines_in(&file.text)).contains(line),
            "line {line} of a file of {} lines",
            lines_in(&file.text)
        );
    }
    // Loading is a function of the text: the same text, the same answer.
    assert_same_outcome(&result, &config::from_files(None, files, config_env));
    if let Ok(cfg) = result {
        check_config(cfg);
    }
}

/// A directory of envoyproxy/ratelimit files, as `--config DIR` loads it. The input is split
/// on NUL bytes: each part is a file, except parts starting `env:`, whose `NAME=value` lines are
/// the environment (the reference's settings, such as `MERGE_DOMAIN_CONFIG`).
pub fn config_reference(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut files = Vec::new();
    for (i, part) in text.split('\0').enumerate() {
        match part.strip_prefix("env:") {
            Some(env) => vars.extend(
                env.lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.trim().to_string(), v.to_string())),
            ),
            None => files.push(File {
                name: format!("fuzz/{i}.yaml"),
                text: part.to_string(),
            }),
        }
    }
    let env = |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let dir = Path::new("fuzz");
    let result = config::from_files(Some(dir), &files, env);
    let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    check_config_outcome(&result, &names, Some("fuzz"));
    assert_same_outcome(&result, &config::from_files(Some(dir), &files, env));
    if let Ok(cfg) = result {
        check_config(cfg);
    }
}

/// An error names one of the files (or the directory, or the environment); a config that loaded
/// renders as `sluice check` prints it.
fn check_config_outcome(
    result: &Result<config::Config, ConfigError>,
    files: &[&str],
    dir: Option<&str>,
) {
    match result {
        Err(e) => {
            let m = e.to_string();
            let named = files.iter().any(|f| m.starts_with(&format!("{f}: ")))
                || files.iter().any(|f| m.starts_with(&format!("{f}:")))
                || dir.is_some_and(|d| m.starts_with(&format!("{d}: ")))
                || m.starts_with("environment: ");
            assert!(named, "an error that names no file: {m}");
        }
        Ok(cfg) => {
            let table = config::limits_table(&cfg.rules);
            assert!(table.starts_with("DOMAIN"), "{table}");
        }
    }
}

fn assert_same_outcome(
    a: &Result<config::Config, ConfigError>,
    b: &Result<config::Config, ConfigError>,
) {
    match (a, b) {
        (Ok(a), Ok(b)) => assert_eq!(a.hash, b.hash, "the same text hashed twice"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "the same text, two errors"),
        _ => panic!("the same text both loads and fails"),
    }
}

/// What every loaded config holds, then a decision on every endpoint it names.
fn check_config(cfg: config::Config) {
    let rules = &cfg.rules;
    for (i, d) in rules.domains.iter().enumerate() {
        assert!(!d.name.trim().is_empty(), "a domain without a name");
        assert!(
            rules.domains[..i].iter().all(|o| o.name != d.name),
            "domain {:?} twice",
            d.name
        );
        for r in &d.rules {
            assert!(!r.limits.is_empty(), "rule {:?} without limits", r.name);
        }
    }
    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(T0)));
    let limiter = limiter_for(cfg, clock);
    let rules = limiter.rules();
    for d in &rules.domains {
        for r in d.rules.iter().filter(|r| r.conditions.is_empty()) {
            let path = concrete_path(&r.name);
            if segment_count(&path) > MAX_PATH_SEGMENTS {
                continue;
            }
            let entries = [(d.endpoint_entry.as_str(), path.as_str())];
            assert!(
                d.route(&entries).is_some(),
                "endpoint {:?} of domain {:?} does not match its own path {path:?}",
                r.name,
                d.name
            );
            let mut entries: Vec<(&str, &str)> =
                d.client.iter().map(|c| (c.as_str(), "c")).collect();
            entries.push((rules.address_entry.as_str(), "192.0.2.1"));
            entries.push((d.endpoint_entry.as_str(), path.as_str()));
            let request = limiter::Request {
                domain: &d.name,
                descriptors: [limiter::Descriptor {
                    entries: entries.into_iter().collect(),
                    hits: crate::algorithms::Hits::Take(1),
                    limit_override: None,
                }]
                .into_iter()
                .collect(),
            };
            let in_force = limiter.rules_in_force();
            let decision = block_on(limiter.decide(&in_force, &request));
            assert_eq!(decision.statuses.len(), 1);
            assert_eq!(decision.over, decision.statuses.iter().any(|s| s.over));
        }
    }
}

/// A request path `template` matches: `p` for each `{param}`, `c/d` for a `{*catchall}`.
pub fn concrete_path(template: &str) -> String {
    template
        .split('/')
        .map(
            |seg| match seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) if name.starts_with('*') => "c/d",
                Some(_) => "p",
                None => seg,
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}

fn segment_count(path: &str) -> usize {
    path.split('/').filter(|s| !s.is_empty()).count()
}

/// `${VAR}` expansion: variables whose names start with `S` are set (to `<NAME>`), with `E`
/// set but empty, with `D` set to a value that looks like a reference; others are unset.
pub fn env_expansion(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let get = |name: &str| match name.as_bytes().first() {
        Some(b'S') => Some(format!("<{name}>")),
        Some(b'E') => Some(String::new()),
        Some(b'D') => Some("$${D}".to_string()),
        _ => None,
    };
    match env::expand(&text, get) {
        Ok(out) => {
            if !text.contains('$') {
                assert_eq!(out, text, "nothing to expand, yet changed");
            }
            assert_eq!(
                lines_in(&out),
                lines_in(&text),
                "expansion changed the lines"
            );
            for (a, b) in text.split('\n').zip(out.split('\n')) {
                if a.trim_start().starts_with('#') {
                    assert_eq!(a, b, "a comment line was expanded");
                }
            }
        }
        Err(e) => assert!(
            (1..=lines_in(&text)).contains(&e.line()),
            "error on line {} of {}",
            e.line(),
            lines_in(&text)
        ),
    }
    // Every `$` escaped: the text comes back, but for comment lines, left alone.
    let escaped = text.replace('$', "$$");
    let out = env::expand(&escaped, get).expect("an escaped text expands");
    for ((orig, esc), back) in text
        .split('\n')
        .zip(escaped.split('\n'))
        .zip(out.split('\n'))
    {
        let expected = if orig.trim_start().starts_with('#') {
            esc
        } else {
            orig
        };
        assert_eq!(back, expected);
    }
}

/// A rate string (`10/minute`, `5 per 30 seconds`, `10/minute; 100/hour`).
pub fn rate(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let check = |r: &rate::Rate| {
        assert!((1..=u64::from(u32::MAX)).contains(&r.count), "{r:?}");
        assert!(r.per >= 1, "{r:?}");
        assert!([1, 60, 3_600, 86_400].contains(&r.unit_seconds), "{r:?}");
        assert!(r.window_nanos() > 0, "{r:?}");
        assert_eq!(r.to_string().parse::<rate::Rate>().as_ref(), Ok(r));
        assert!(!r.name().is_empty());
    };
    if let Ok(r) = text.parse::<rate::Rate>() {
        check(&r);
    }
    if let Ok(list) = rate::parse_list(&text) {
        assert!(!list.is_empty());
        list.iter().for_each(check);
    }
}

/// Path templates and request paths: the lines before the first blank line are templates, the
/// lines after it request paths. Every template matches a path made from it, and spellings of a
/// path that Envoy's normalisation makes equal find the same endpoint.
pub fn path(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (templates, requests) = text.split_once("\n\n").unwrap_or((&text, ""));
    let mut router = PathRouter::new();
    let mut inserted = Vec::new();
    for (i, line) in templates.split('\n').enumerate().take(64) {
        let Ok(t) = PathTemplate::parse(line) else {
            continue;
        };
        assert_eq!(t.as_str(), line);
        assert_eq!(PathTemplate::parse(t.as_str()).as_ref(), Ok(&t));
        if router.insert(t, i).is_ok() {
            inserted.push((i, line));
        }
    }
    assert_eq!(router.len(), inserted.len());
    for &(i, template) in &inserted {
        let path = concrete_path(template);
        if segment_count(&path) <= MAX_PATH_SEGMENTS {
            let found = router.lookup(&path);
            assert!(found.is_some(), "{template:?} does not match {path:?}");
            if !template.contains('{') {
                assert_eq!(found, Some(&i), "literal {template:?} lost its own path");
            }
        }
        same_endpoint_for_equivalent_spellings(&router, &path);
    }
    for request in requests.split('\n').take(64) {
        same_endpoint_for_equivalent_spellings(&router, request);
    }
}

fn same_endpoint_for_equivalent_spellings(router: &PathRouter<usize>, raw: &str) {
    let base = router.lookup(raw);
    let cut = raw.find(['?', '#']).unwrap_or(raw.len());
    let (path, rest) = raw.split_at(cut);
    let variants = [
        // A query string is ignored.
        format!("{raw}?fuzz=1"),
        // Slashes merge.
        format!("{}{rest}", path.replace('/', "//")),
        // A segment and `..` cancel out.
        format!(
            "/fuzz/..{}{path}{rest}",
            if path.starts_with('/') { "" } else { "/" }
        ),
        // Escaped bytes compare decoded (here the first character of the first segment without
        // escapes of its own; encoding a byte after a `%` would make a new escape).
        percent_encode_one(path) + rest,
    ];
    for v in &variants {
        assert_eq!(
            router.lookup(v),
            base,
            "{raw:?} and {v:?} find different endpoints"
        );
    }
}

fn percent_encode_one(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 12);
    let mut done = false;
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        let mut chars = seg.chars();
        match chars.next() {
            Some(c) if !done && !seg.contains('%') => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{b:02X}"));
                }
                out.push_str(chars.as_str());
                done = true;
            }
            _ => out.push_str(seg),
        }
    }
    out
}

/// A `RateLimitRequest`'s protobuf bytes, decoded as the gRPC codec decodes them, validated and
/// answered by sluice's rules and by the reference's.
pub fn rls_request(data: &[u8]) {
    match codec::decode::<RateLimitRequest>(data) {
        Ok(req) => answer_request(&req, data.len()),
        Err(status) => {
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(
                status.message().starts_with("malformed protobuf: "),
                "{}",
                status.message()
            );
        }
    }
}

/// A `RateLimitRequest` in protobuf's JSON mapping, as `POST /json` reads it, answered alike.
pub fn rls_json(data: &[u8]) {
    if let Ok(req) = json::request(data) {
        answer_request(&req, data.len());
    }
}

fn answer_request(req: &RateLimitRequest, size: usize) {
    let valid = rls::to_request(req);
    match &valid {
        Ok(view) => {
            assert!(!view.domain.is_empty() && view.domain.len() <= MAX_FIELD_BYTES);
            assert!((1..=MAX_DESCRIPTORS).contains(&view.descriptors.len()));
            for d in &view.descriptors {
                assert!((1..=MAX_ENTRIES).contains(&d.entries.len()));
                for (k, v) in &d.entries {
                    assert!(!k.is_empty() && k.len() <= MAX_FIELD_BYTES);
                    assert!(v.len() <= MAX_FIELD_BYTES);
                }
            }
        }
        Err(bad) => assert!(
            bad.field == "domain" || bad.field.starts_with("descriptors"),
            "names no field: {bad}"
        ),
    }
    RLS.with(|services| {
        for (clock, service) in services {
            // Windows roll over as inputs go by.
            clock.advance(Duration::from_millis((size % 4096) as u64));
            match block_on(service.answer(req)) {
                Ok(resp) => {
                    assert!(valid.is_ok(), "answered an invalid request");
                    assert_eq!(resp.statuses.len(), req.descriptors.len());
                    let over = RlsCode::OverLimit as i32;
                    assert_eq!(
                        resp.overall_code == over,
                        resp.statuses.iter().any(|s| s.code == over),
                        "the overall code disagrees with the descriptors'"
                    );
                }
                Err(status) => {
                    assert!(valid.is_err(), "refused a valid request: {status:?}");
                    assert_eq!(status.code(), Code::InvalidArgument);
                }
            }
        }
    });
}

/// Most reports one [`rlqs_reports`] input sends.
pub const MAX_QUOTA_REPORTS: usize = 16;

/// A quota stream's reports: length-delimited protobuf `RateLimitQuotaUsageReports` (a varint
/// length, then the message), each decoded as the gRPC codec decodes it and answered in order on
/// one stream of the default config, the clock moving 5 s between them. An answer has at most
/// one action per distinct bucket, each a whole-second TTL and a bucket Envoy can enforce; a
/// refusal names a field and ends the stream, as the service does; the stream's claims are
/// gone when it closes.
pub fn rlqs_reports(data: &[u8]) {
    use crate::proto::envoy::r#type::v3::rate_limit_strategy::Strategy;
    use crate::proto::envoy::service::rate_limit_quota::v3::RateLimitQuotaUsageReports;
    use crate::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action::BucketAction as Action;
    use crate::quota::{AnyLedger, Quotas, Settings, ledger::MemoryLedger};

    let cfg = config::parse(DEFAULT_CONFIG, "config/sluice.yaml", |_| None)
        .expect("the default config is valid");
    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(T0)));
    let quotas = Quotas::new(
        Arc::new(limiter_for(cfg, clock.clone())),
        AnyLedger::Memory(MemoryLedger::default()),
        Settings {
            max_buckets: 64,
            ..Settings::default()
        },
    );
    let mut stream = quotas.open("fuzz".into()).expect("one stream is room");
    let mut rest = data;
    for _ in 0..MAX_QUOTA_REPORTS {
        let Ok(len) = prost::encoding::decode_varint(&mut rest) else {
            break;
        };
        let len = usize::try_from(len).unwrap_or(usize::MAX).min(rest.len());
        let (message, tail) = rest.split_at(len);
        rest = tail;
        let reports = match codec::decode::<RateLimitQuotaUsageReports>(message) {
            Ok(r) => r,
            Err(status) => {
                assert_eq!(status.code(), Code::InvalidArgument);
                continue;
            }
        };
        let distinct: std::collections::HashSet<Vec<(&String, &String)>> = reports
            .bucket_quota_usages
            .iter()
            .filter_map(|u| u.bucket_id.as_ref())
            .map(|id| {
                let mut e: Vec<_> = id.bucket.iter().collect();
                e.sort();
                e
            })
            .collect();
        match block_on(quotas.report(&mut stream, &reports)) {
            Ok(answer) => {
                assert!(answer.bucket_action.len() <= distinct.len().max(1));
                for a in &answer.bucket_action {
                    let Some(Action::QuotaAssignmentAction(q)) = &a.bucket_action else {
                        continue;
                    };
                    let ttl = q
                        .assignment_time_to_live
                        .expect("every assignment has a TTL");
                    assert!(ttl.seconds >= 1 && ttl.nanos == 0, "{ttl:?}");
                    match q.rate_limit_strategy.and_then(|s| s.strategy) {
                        Some(Strategy::BlanketRule(_)) => {}
                        Some(Strategy::TokenBucket(tb)) => {
                            let interval = tb.fill_interval.expect("an interval");
                            assert!(tb.max_tokens >= 1, "{tb:?}");
                            assert!(tb.tokens_per_fill.is_some_and(|t| t >= 1), "{tb:?}");
                            assert!(interval.seconds >= 1 && interval.nanos == 0, "{tb:?}");
                        }
                        other => panic!("Envoy 1.40 cannot enforce {other:?}"),
                    }
                }
            }
            Err(bad) => {
                assert!(
                    bad.field == "domain" || bad.field.starts_with("bucket_quota_usages["),
                    "names no field: {bad}"
                );
                break;
            }
        }
        clock.advance(Duration::from_secs(5));
    }
    block_on(quotas.close(stream));
    assert_eq!(quotas.registry().open_streams(), 0);
}

/// One admin call of an [`admin_requests`] input.
#[derive(Debug, Clone)]
pub enum AdminCall {
    /// `GetConfig`.
    GetConfig(pb::GetConfigRequest),
    /// `GetStats`.
    GetStats(pb::GetStatsRequest),
    /// `BlockIp`.
    BlockIp(pb::BlockIpRequest),
    /// `UnblockIp`.
    UnblockIp(pb::UnblockIpRequest),
    /// `ListBlocks`.
    ListBlocks(pb::ListBlocksRequest),
    /// `Allow`.
    Allow(pb::AllowRequest),
    /// `Disallow`.
    Disallow(pb::DisallowRequest),
    /// `ListAllowed`.
    ListAllowed(pb::ListAllowedRequest),
    /// `ResetClient`.
    ResetClient(pb::ResetClientRequest),
}

/// Most calls one [`admin_requests`] input makes.
pub const MAX_ADMIN_CALLS: usize = 16;

/// Writes `calls` as an [`admin_requests`] input: for each, the method's number (0-8, in the
/// order of [`AdminCall`]), the message's length (2 bytes, little-endian) and its protobuf bytes.
pub fn encode_admin_calls(calls: &[AdminCall]) -> Vec<u8> {
    use prost::Message as _;
    let mut out = Vec::new();
    for call in calls {
        let (op, body) = match call {
            AdminCall::GetConfig(m) => (0u8, m.encode_to_vec()),
            AdminCall::GetStats(m) => (1, m.encode_to_vec()),
            AdminCall::BlockIp(m) => (2, m.encode_to_vec()),
            AdminCall::UnblockIp(m) => (3, m.encode_to_vec()),
            AdminCall::ListBlocks(m) => (4, m.encode_to_vec()),
            AdminCall::Allow(m) => (5, m.encode_to_vec()),
            AdminCall::Disallow(m) => (6, m.encode_to_vec()),
            AdminCall::ListAllowed(m) => (7, m.encode_to_vec()),
            AdminCall::ResetClient(m) => (8, m.encode_to_vec()),
        };
        let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
        out.push(op);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(body.get(..usize::from(len)).unwrap_or(&body));
    }
    out
}

/// Splits an [`admin_requests`] input into (method, message bytes), at most
/// [`MAX_ADMIN_CALLS`].
fn admin_calls(mut data: &[u8]) -> Vec<(u8, &[u8])> {
    let mut calls = Vec::new();
    while let [op, lo, hi, rest @ ..] = data
        && calls.len() < MAX_ADMIN_CALLS
    {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
        let (body, tail) = rest.split_at(len);
        calls.push((op % 9, body));
        data = tail;
    }
    calls
}

/// Decodes an admin request as the codec does; `None` (after checking the refusal) when the
/// bytes are not one.
fn decoded<M: prost::Message + Default>(body: &[u8]) -> Option<M> {
    match codec::decode::<M>(body) {
        Ok(m) => Some(m),
        Err(status) => {
            assert_eq!(status.code(), Code::InvalidArgument);
            None
        }
    }
}

/// An admin call's refusal: bad input or an unknown name, with a message naming the field.
fn check_refusal(status: &Status) {
    assert!(
        matches!(
            status.code(),
            Code::InvalidArgument
                | Code::NotFound
                | Code::FailedPrecondition
                | Code::OutOfRange
                | Code::ResourceExhausted
        ),
        "an admin call failed as {status:?}"
    );
    let field = status.message().split(": ").next().unwrap_or("");
    assert!(
        !field.is_empty()
            && field.len() < status.message().len()
            && field
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.[]".contains(c)),
        "the message names no field: {:?}",
        status.message()
    );
}

thread_local! {
    /// The admin service the admin target calls, over the default config and the memory store;
    /// each input starts from an empty access list.
    static ADMIN: (Arc<Limiter<MemoryStore>>, AdminService<MemoryStore>) = {
        let (_, limiter) = limiter_over(DEFAULT_CONFIG, "config/sluice.yaml");
        let limiter = Arc::new(limiter);
        (limiter.clone(), AdminService::new(limiter))
    };
}

/// A sequence of admin requests (see [`encode_admin_calls`]), each answered as the admin
/// service answers it, with no blocks or allowlist entries before the first.
pub fn admin_requests(data: &[u8]) {
    let calls = admin_calls(data);
    if calls.is_empty() {
        return;
    }
    ADMIN.with(|(limiter, admin)| {
        limiter.access().replace_state(Vec::new(), Vec::new());
        block_on(async {
            for (op, body) in calls {
                admin_call(admin, limiter, op, body).await;
            }
        });
    });
}

async fn admin_call(
    admin: &AdminService<MemoryStore>,
    limiter: &Limiter<MemoryStore>,
    op: u8,
    body: &[u8],
) {
    let now = limiter.clock().now();
    let listed_blocks = || async move {
        admin
            .list_blocks(Request::new(pb::ListBlocksRequest::default()))
            .await
            .expect("ListBlocks answers")
            .into_inner()
            .blocks
    };
    let listed_allowed = || async move {
        admin
            .list_allowed(Request::new(pb::ListAllowedRequest::default()))
            .await
            .expect("ListAllowed answers")
            .into_inner()
            .entries
    };
    // The address a host-length net (`192.0.2.7`, `2001:db8::1/128`) stands for.
    let host = |ip: &str| {
        parse_net(ip)
            .ok()
            .filter(|n| n.prefix_len() == n.max_prefix_len())
            .map(|n| n.addr().to_string())
    };
    match op {
        0 => {
            let Some(req) = decoded::<pb::GetConfigRequest>(body) else {
                return;
            };
            match admin.get_config(Request::new(req.clone())).await {
                Ok(r) => {
                    let r = r.into_inner();
                    assert!(
                        req.domain.is_empty() || r.domains.iter().all(|d| d.name == req.domain)
                    );
                }
                Err(s) => check_refusal(&s),
            }
        }
        1 => {
            let Some(req) = decoded::<pb::GetStatsRequest>(body) else {
                return;
            };
            match admin.get_stats(Request::new(req.clone())).await {
                Ok(r) => {
                    let top = if req.top == 0 {
                        10
                    } else {
                        req.top.min(crate::admin::MAX_TOP)
                    };
                    assert!(r.into_inner().top_limited.len() <= top as usize);
                }
                Err(s) => check_refusal(&s),
            }
        }
        2 => {
            let Some(req) = decoded::<pb::BlockIpRequest>(body) else {
                return;
            };
            match admin.block_ip(Request::new(req.clone())).await {
                Ok(r) => {
                    let block = r.into_inner().block.expect("BlockIp answers the block");
                    assert!(parse_net(&block.ip).is_ok(), "{block:?}");
                    assert_eq!(block.permanent, block.expires_at.is_none(), "{block:?}");
                    assert!(
                        listed_blocks().await.iter().any(|b| b.ip == block.ip),
                        "block {:?} not listed",
                        block.ip
                    );
                    if let Some(addr) = host(&block.ip) {
                        let access = limiter.access().check_at(&addr, now);
                        assert!(
                            !matches!(access, crate::access::Access::Normal),
                            "blocked {addr} is let through"
                        );
                    }
                }
                Err(s) => check_refusal(&s),
            }
        }
        3 => {
            let Some(req) = decoded::<pb::UnblockIpRequest>(body) else {
                return;
            };
            match admin.unblock_ip(Request::new(req.clone())).await {
                Ok(_) => {
                    let again = admin
                        .unblock_ip(Request::new(req))
                        .await
                        .expect("a second UnblockIp answers");
                    assert!(!again.into_inner().removed, "unblocked twice");
                }
                Err(s) => check_refusal(&s),
            }
        }
        4 => {
            if let Some(req) = decoded::<pb::ListBlocksRequest>(body)
                && let Err(s) = admin.list_blocks(Request::new(req)).await
            {
                check_refusal(&s);
            }
        }
        5 => {
            let Some(req) = decoded::<pb::AllowRequest>(body) else {
                return;
            };
            match admin.allow(Request::new(req)).await {
                Ok(r) => {
                    let entry = r.into_inner().entry.expect("Allow answers the entry");
                    assert!(
                        listed_allowed().await.iter().any(|a| a.ip == entry.ip),
                        "allowlist entry {:?} not listed",
                        entry.ip
                    );
                    if let Some(addr) = host(&entry.ip) {
                        assert_eq!(
                            limiter.access().check_at(&addr, now),
                            crate::access::Access::Allowed,
                            "allowlisted {addr} is not allowed"
                        );
                    }
                }
                Err(s) => check_refusal(&s),
            }
        }
        6 => {
            let Some(req) = decoded::<pb::DisallowRequest>(body) else {
                return;
            };
            match admin.disallow(Request::new(req.clone())).await {
                Ok(_) => {
                    let again = admin
                        .disallow(Request::new(req))
                        .await
                        .expect("a second Disallow answers");
                    assert!(!again.into_inner().removed, "disallowed twice");
                }
                Err(s) => check_refusal(&s),
            }
        }
        7 => {
            if let Some(req) = decoded::<pb::ListAllowedRequest>(body)
                && let Err(s) = admin.list_allowed(Request::new(req)).await
            {
                check_refusal(&s);
            }
        }
        _ => {
            let Some(req) = decoded::<pb::ResetClientRequest>(body) else {
                return;
            };
            if let Err(s) = admin.reset_client(Request::new(req)).await {
                check_refusal(&s);
            }
        }
    }
}

/// A directory of its own for each thread's scratch files, under `/dev/shm` where there is one
/// (the state file's fsyncs then cost nothing).
fn scratch_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static DIR: PathBuf = {
            let base = Path::new("/dev/shm");
            let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
            base.join(format!(
                "sluice-fuzz-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ))
        };
    }
    DIR.with(Clone::clone)
}

/// A state file's bytes, opened as `serve` opens `--state-file`. One that opens is written back
/// and opens again to the same blocks and allowlist.
pub fn state_file(data: &[u8]) {
    let dir = scratch_dir();
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let path = dir.join("state.json");
    std::fs::write(&path, data).expect("a scratch state file");
    match AccessList::open(Some(path.clone()), Vec::new()) {
        Err(e) => {
            let m = e.to_string();
            assert!(
                m.starts_with(&format!("state file {}", path.display())),
                "an error that names no file: {m}"
            );
        }
        Ok(list) => {
            let now = Timestamp::from_secs(T0);
            let state = list.export_state();
            for b in &state.0 {
                let _ = list.check_at(&b.net.addr().to_string(), now);
            }
            list.persist().expect("a state that opened is saved");
            let again = AccessList::open(Some(path.clone()), Vec::new())
                .expect("a state file sluice wrote opens");
            assert_eq!(
                again.export_state(),
                state,
                "the state changed on a round trip"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
