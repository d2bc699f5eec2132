//! `envoy.service.ratelimit.v3.RateLimitService`: [`RlsService`] validates a `RateLimitRequest`,
//! borrows it into a [`limiter::Request`] (no copies of keys or values), asks the [`Limiter`],
//! and writes the `RateLimitResponse` exactly as Envoy reads it: one status per descriptor in
//! order, exact `current_limit`/`limit_remaining`/`duration_until_reset` (Envoy derives
//! `X-RateLimit-*` from them), and on OVER_LIMIT a `retry-after` header and the seeds' JSON body.

use std::fmt::Write as _;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::algorithms::Hits;
use crate::limiter::model::Unit;
use crate::limiter::{
    self, Blocked, Decision, Descriptor, LimitOverride, Limiter, Status as LimiterStatus,
};
use crate::proto::envoy::config::core::v3::HeaderValue;
use crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit, rate_limit::Unit as ProtoUnit,
};
use crate::proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use crate::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use crate::proto::envoy::r#type::v3::RateLimitUnit;
use crate::store::Store;

/// The rate limit service: one method, `ShouldRateLimit`.
#[derive(Debug)]
pub struct RlsService<S> {
    limiter: Arc<Limiter<S>>,
}

impl<S> RlsService<S> {
    /// A service answering from `limiter`.
    pub fn new(limiter: Arc<Limiter<S>>) -> Self {
        Self { limiter }
    }
}

impl<S: Store> RlsService<S> {
    /// Decides `request`; a request that cannot be decided is `INVALID_ARGUMENT` naming the
    /// field. The decision is awaited here, in the call's own task: a client that resets the
    /// call drops it, and with it any store work still waiting (Redis has its own deadline).
    pub async fn answer(
        &self,
        request: &RateLimitRequest,
    ) -> Result<RateLimitResponse, tonic::Status> {
        let start = std::time::Instant::now();
        let view =
            to_request(request).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let rules = self.limiter.rules_in_force();
        let decision = self.limiter.decide(&rules, &view).await;
        let mut response = to_response(&decision);
        if let Some(metadata) = decision.extras.as_ref().and_then(|e| e.metadata.as_ref()) {
            response.dynamic_metadata = Some(dynamic_metadata(request, metadata));
        }
        self.limiter.stats().latency.observe(start.elapsed());
        Ok(response)
    }
}

#[tonic::async_trait]
impl<S: Store> RateLimitService for RlsService<S> {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        self.answer(request.get_ref())
            .await
            .map(tonic::Response::new)
    }
}

/// Most descriptors accepted in one request.
pub const MAX_DESCRIPTORS: usize = 64;
/// Most entries accepted in one descriptor.
pub const MAX_ENTRIES: usize = 32;
/// Longest domain, entry key or entry value accepted, in bytes.
pub const MAX_FIELD_BYTES: usize = 1024;

/// A request that cannot be decided, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct BadRequest {
    /// Field path, such as `descriptors[2].entries[0].key`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

fn bad(field: impl Into<String>, problem: impl Into<String>) -> BadRequest {
    BadRequest {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Validates `req` and borrows it as a limiter request; the first problem found is the error.
pub fn to_request(req: &RateLimitRequest) -> Result<limiter::Request<'_>, BadRequest> {
    check_domain(&req.domain)?;
    check_descriptor_count(req.descriptors.len())?;
    let request_hits = request_hits(req.hits_addend);
    let mut descriptors = SmallVec::with_capacity(req.descriptors.len());
    for (i, d) in req.descriptors.iter().enumerate() {
        descriptors.push(to_descriptor(i, d, request_hits)?);
    }
    Ok(limiter::Request {
        domain: &req.domain,
        descriptors,
    })
}

fn to_descriptor(
    i: usize,
    d: &RateLimitDescriptor,
    request_hits: u64,
) -> Result<Descriptor<'_>, BadRequest> {
    check_entry_count(i, d.entries.len())?;
    let mut entries = SmallVec::with_capacity(d.entries.len());
    for (j, e) in d.entries.iter().enumerate() {
        check_entry(i, j, &e.key, &e.value)?;
        entries.push((e.key.as_str(), e.value.as_str()));
    }
    let limit_override = match &d.limit {
        None => None,
        Some(o) => Some(limit_override(i, o.requests_per_unit, o.unit)?),
    };
    Ok(Descriptor {
        entries,
        hits: descriptor_hits(d.hits_addend, d.is_negative_hits, request_hits),
        limit_override,
    })
}

/// The domain: present and not too long.
fn check_domain(domain: &str) -> Result<(), BadRequest> {
    if domain.is_empty() {
        return Err(bad("domain", "must not be empty"));
    }
    check_len("domain", domain)
}

/// How many descriptors: at least one, at most [`MAX_DESCRIPTORS`].
fn check_descriptor_count(n: usize) -> Result<(), BadRequest> {
    if n == 0 {
        return Err(bad("descriptors", "at least one descriptor is required"));
    }
    if n > MAX_DESCRIPTORS {
        return Err(bad(
            "descriptors",
            format!("{n} descriptors, at most {MAX_DESCRIPTORS} allowed"),
        ));
    }
    Ok(())
}

/// How many entries descriptor `i` has: at least one, at most [`MAX_ENTRIES`].
fn check_entry_count(i: usize, n: usize) -> Result<(), BadRequest> {
    if n == 0 {
        return Err(bad(
            format!("descriptors[{i}].entries"),
            "at least one entry is required",
        ));
    }
    if n > MAX_ENTRIES {
        return Err(bad(
            format!("descriptors[{i}].entries"),
            format!("{n} entries, at most {MAX_ENTRIES} allowed"),
        ));
    }
    Ok(())
}

/// Entry `j` of descriptor `i`: a key, and no field longer than [`MAX_FIELD_BYTES`].
fn check_entry(i: usize, j: usize, key: &str, value: &str) -> Result<(), BadRequest> {
    if key.is_empty() {
        return Err(bad(
            format!("descriptors[{i}].entries[{j}].key"),
            "must not be empty",
        ));
    }
    // Compared here first so the path is only formatted for a request that fails.
    if key.len() > MAX_FIELD_BYTES {
        check_len(&format!("descriptors[{i}].entries[{j}].key"), key)?;
    }
    if value.len() > MAX_FIELD_BYTES {
        check_len(&format!("descriptors[{i}].entries[{j}].value"), value)?;
    }
    Ok(())
}

fn check_len(field: &str, s: &str) -> Result<(), BadRequest> {
    if s.len() > MAX_FIELD_BYTES {
        return Err(bad(
            field,
            format!("{} bytes, at most {MAX_FIELD_BYTES} allowed", s.len()),
        ));
    }
    Ok(())
}

/// Hits of a descriptor without its own `hits_addend`: Envoy always sends the request's, and 0
/// there means 1.
fn request_hits(hits_addend: u32) -> u64 {
    u64::from(hits_addend.max(1))
}

/// What descriptor adds: its own `hits_addend` overrides the request's, and there 0 means
/// "check only".
fn descriptor_hits(own: Option<u64>, negative: bool, request_hits: u64) -> Hits {
    let n = own.unwrap_or(request_hits);
    if negative {
        Hits::Return(n)
    } else {
        Hits::Take(n)
    }
}

/// Descriptor `i`'s `limit` override; `unit` is the raw enum number, which may be anything.
fn limit_override(
    i: usize,
    requests_per_unit: u32,
    unit: i32,
) -> Result<LimitOverride, BadRequest> {
    let unit = match RateLimitUnit::try_from(unit) {
        Ok(RateLimitUnit::Second) => Unit::Second,
        Ok(RateLimitUnit::Minute) => Unit::Minute,
        Ok(RateLimitUnit::Hour) => Unit::Hour,
        Ok(RateLimitUnit::Day) => Unit::Day,
        Ok(RateLimitUnit::Month) => Unit::Month,
        Ok(RateLimitUnit::Year) => Unit::Year,
        Ok(RateLimitUnit::Unknown) | Err(_) => {
            return Err(bad(
                format!("descriptors[{i}].limit.unit"),
                format!("unit {unit} is not one of SECOND, MINUTE, HOUR, DAY, MONTH, YEAR"),
            ));
        }
    };
    Ok(LimitOverride {
        requests_per_unit,
        unit,
    })
}

/// The response's unit enum, which unlike the request's has WEEK.
fn proto_unit(u: Unit) -> ProtoUnit {
    match u {
        Unit::Second => ProtoUnit::Second,
        Unit::Minute => ProtoUnit::Minute,
        Unit::Hour => ProtoUnit::Hour,
        Unit::Day => ProtoUnit::Day,
        Unit::Week => ProtoUnit::Week,
        Unit::Month => ProtoUnit::Month,
        Unit::Year => ProtoUnit::Year,
    }
}

/// Whole seconds, rounded up: a client told to wait N seconds is admitted after N seconds.
pub fn ceil_secs(nanos: u64) -> u64 {
    nanos.div_ceil(1_000_000_000)
}

/// `overall_code` / `code`.
fn code(over: bool) -> Code {
    if over { Code::OverLimit } else { Code::Ok }
}

/// `limit_remaining`: saturates, Envoy's field is 32 bits.
fn limit_remaining(s: &LimiterStatus) -> u32 {
    u32::try_from(s.remaining).unwrap_or(u32::MAX)
}

/// `duration_until_reset` in whole seconds, sent when a limit is reported or a reset is due
/// (a blocked client's descriptors have no limit but do have a wait).
fn reset_secs(s: &LimiterStatus) -> Option<i64> {
    (s.limit.is_some() || s.reset_after > 0)
        .then(|| i64::try_from(ceil_secs(s.reset_after)).unwrap_or(i64::MAX))
}

/// Writes the limiter's decision as Envoy's response.
pub fn to_response(decision: &Decision) -> RateLimitResponse {
    let statuses = decision
        .statuses
        .iter()
        .map(|s| DescriptorStatus {
            code: code(s.over) as i32,
            current_limit: s.limit.as_ref().map(|l| RateLimit {
                name: l.name.to_string(),
                requests_per_unit: l.reported.requests_per_unit,
                unit: proto_unit(l.reported.unit) as i32,
            }),
            limit_remaining: limit_remaining(s),
            duration_until_reset: reset_secs(s)
                .map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
            quota: None,
        })
        .collect();
    let mut response = RateLimitResponse {
        overall_code: code(decision.over) as i32,
        statuses,
        ..Default::default()
    };
    if let Some(denial) = Denial::of(decision) {
        let mut headers = Vec::with_capacity(2);
        if let Some(secs) = denial.retry_after() {
            headers.push(header(RETRY_AFTER, secs.to_string()));
        }
        headers.push(header(CONTENT_TYPE, JSON.to_string()));
        response.response_headers_to_add = headers;
        response.raw_body = denial.body().into_bytes();
    }
    if let Some(extras) = &decision.extras {
        response
            .response_headers_to_add
            .extend(extras.headers.iter().map(|(k, v)| header(k, v.clone())));
    }
    response
}

/// envoyproxy/ratelimit's `RESPONSE_DYNAMIC_METADATA`: the request's domain, descriptors
/// (entries as `key=value`, their overrides and `hits_addend`), the request's `hits_addend`, and
/// the merged `metadata` of the rules of the descriptors that passed.
pub fn dynamic_metadata(
    request: &RateLimitRequest,
    metadata: &serde_json::Map<String, serde_json::Value>,
) -> prost_types::Struct {
    use prost_types::value::Kind;
    let string = |s: String| prost_types::Value {
        kind: Some(Kind::StringValue(s)),
    };
    let number = |n: f64| prost_types::Value {
        kind: Some(Kind::NumberValue(n)),
    };
    let mut fields = std::collections::BTreeMap::new();
    fields.insert("domain".to_string(), string(request.domain.clone()));
    let descriptors = request
        .descriptors
        .iter()
        .map(|d| {
            let mut f = std::collections::BTreeMap::new();
            let entries = d
                .entries
                .iter()
                .map(|e| string(format!("{}={}", e.key, e.value)))
                .collect();
            f.insert(
                "entries".to_string(),
                prost_types::Value {
                    kind: Some(Kind::ListValue(prost_types::ListValue { values: entries })),
                },
            );
            if let Some(l) = &d.limit {
                let unit = RateLimitUnit::try_from(l.unit)
                    .map_or_else(|_| l.unit.to_string(), |u| u.as_str_name().to_string());
                f.insert(
                    "limit".to_string(),
                    string(format!(
                        "requests_per_unit:{} unit:{unit}",
                        l.requests_per_unit
                    )),
                );
            }
            if let Some(h) = d.hits_addend {
                f.insert("hitsAddend".to_string(), number(h as f64));
            }
            prost_types::Value {
                kind: Some(Kind::StructValue(prost_types::Struct { fields: f })),
            }
        })
        .collect();
    fields.insert(
        "descriptors".to_string(),
        prost_types::Value {
            kind: Some(Kind::ListValue(prost_types::ListValue {
                values: descriptors,
            })),
        },
    );
    if request.hits_addend != 0 {
        fields.insert(
            "hitsAddend".to_string(),
            number(f64::from(request.hits_addend)),
        );
    }
    if !metadata.is_empty() {
        fields.insert(
            "metadata".to_string(),
            json_value(&serde_json::Value::Object(metadata.clone())),
        );
    }
    prost_types::Struct { fields }
}

/// A JSON value as a protobuf `Value`.
fn json_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o.iter().map(|(k, v)| (k.clone(), json_value(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: key.to_string(),
        value,
        raw_value: Vec::new(),
    }
}

/// Header telling the client when to retry, in whole seconds.
const RETRY_AFTER: &str = "retry-after";
/// Header naming the body's type.
const CONTENT_TYPE: &str = "content-type";
/// Every body is JSON.
const JSON: &str = "application/json";

/// The Talk2Me seed's body for a blocked address.
pub const TEMPORARY_BLOCK_BODY: &str =
    r#"{"error": "IP temporarily blocked due to excessive requests"}"#;
/// The body when the counter store is down and the failure policy denies.
pub const UNAVAILABLE_BODY: &str = r#"{"error": "Rate limiting temporarily unavailable"}"#;
/// The body for a permanently blocked address.
pub const PERMANENT_BLOCK_BODY: &str = r#"{"error": "IP permanently blocked"}"#;

/// Why an answer carries headers and a body for the client (Envoy sends them with its 429).
#[derive(Debug, Clone, Copy)]
enum Denial<'a> {
    /// The store failed and the failure policy denies.
    Unavailable,
    /// The client address is blocked.
    Blocked(Blocked),
    /// Over a limit: its name and the whole seconds to wait.
    OverLimit { name: &'a str, retry_after: u64 },
}

impl<'a> Denial<'a> {
    /// The denial `decision` explains, if any (an allowed answer has no body; neither has an
    /// over-limit one without a retry time, which the limiter never gives).
    fn of(decision: &'a Decision) -> Option<Self> {
        if decision.unavailable {
            Some(Denial::Unavailable)
        } else if let Some(b) = decision.blocked {
            Some(Denial::Blocked(b))
        } else if let (true, Some((nanos, name))) = (decision.over, &decision.retry) {
            Some(Denial::OverLimit {
                name,
                retry_after: ceil_secs(*nanos).max(1),
            })
        } else {
            None
        }
    }

    /// The `retry-after` seconds, at least 1; none for a permanent block.
    fn retry_after(self) -> Option<u64> {
        match self {
            Denial::Unavailable => Some(1),
            Denial::Blocked(b) if b.permanent => None,
            Denial::Blocked(b) => Some(ceil_secs(b.remaining).max(1)),
            Denial::OverLimit { retry_after, .. } => Some(retry_after),
        }
    }

    fn body(self) -> String {
        match self {
            Denial::Unavailable => UNAVAILABLE_BODY.to_string(),
            Denial::Blocked(b) if b.permanent => PERMANENT_BLOCK_BODY.to_string(),
            Denial::Blocked(_) => TEMPORARY_BLOCK_BODY.to_string(),
            Denial::OverLimit { name, retry_after } => over_limit_body(name, retry_after),
        }
    }
}

/// The seeds' 429 body: `{"error": "Rate limit exceeded (per minute)", "retry_after": 60}`.
pub fn over_limit_body(limit_name: &str, retry_after_secs: u64) -> String {
    let mut out = String::with_capacity(64 + limit_name.len());
    out.push_str("{\"error\": \"Rate limit exceeded (");
    json_escape_into(limit_name, &mut out);
    out.push_str(")\", \"retry_after\": ");
    out.push_str(&retry_after_secs.to_string());
    out.push('}');
    out
}

/// Escapes `s` for a JSON string body (names come from config and may hold quotes).
fn json_escape_into(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_matches_the_seed_and_escapes_names() {
        assert_eq!(
            over_limit_body("per minute", 60),
            r#"{"error": "Rate limit exceeded (per minute)", "retry_after": 60}"#
        );
        assert_eq!(
            over_limit_body("a\"b", 1),
            r#"{"error": "Rate limit exceeded (a\"b)", "retry_after": 1}"#
        );
    }

    #[test]
    fn body_escapes_control_characters_and_writes_any_number() {
        assert_eq!(
            over_limit_body("a\u{1}\n\\", 0),
            r#"{"error": "Rate limit exceeded (a\u0001\u000a\\)", "retry_after": 0}"#
        );
        assert_eq!(
            over_limit_body("é", u64::MAX),
            r#"{"error": "Rate limit exceeded (é)", "retry_after": 18446744073709551615}"#
        );
    }

    #[test]
    fn durations_round_up_to_whole_seconds() {
        assert_eq!(ceil_secs(0), 0);
        assert_eq!(ceil_secs(1), 1);
        assert_eq!(ceil_secs(60_000_000_000), 60);
        assert_eq!(ceil_secs(60_000_000_001), 61);
    }
}
