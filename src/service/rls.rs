//! `envoy.service.ratelimit.v3.RateLimitService`: validates a `RateLimitRequest`, borrows it into
//! a [`limiter::Request`] (no copies of keys or values), asks the [`Limiter`], and writes the
//! `RateLimitResponse` exactly as Envoy reads it: one status per descriptor in order, exact
//! `current_limit`/`limit_remaining`/`duration_until_reset` (Envoy derives `X-RateLimit-*` from
//! them), and on OVER_LIMIT a `retry-after` header and the seeds' JSON body.

use smallvec::SmallVec;

use crate::limiter::algorithms::Hits;
use crate::limiter::model::Unit;
use crate::limiter::{self, Decision, Descriptor, LimitOverride};
use crate::proto::envoy::config::core::v3::HeaderValue;
use crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit, rate_limit::Unit as ProtoUnit,
};
use crate::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use crate::proto::envoy::r#type::v3::RateLimitUnit;

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

/// Validates `req` and borrows it as a limiter request.
pub fn to_request(req: &RateLimitRequest) -> Result<limiter::Request<'_>, BadRequest> {
    if req.domain.is_empty() {
        return Err(bad("domain", "must not be empty"));
    }
    check_len("domain", &req.domain)?;
    if req.descriptors.is_empty() {
        return Err(bad("descriptors", "at least one descriptor is required"));
    }
    if req.descriptors.len() > MAX_DESCRIPTORS {
        return Err(bad(
            "descriptors",
            format!(
                "{} descriptors, at most {MAX_DESCRIPTORS} allowed",
                req.descriptors.len()
            ),
        ));
    }
    // Envoy always sends the request's hits_addend; 0 means 1.
    let request_hits = u64::from(req.hits_addend.max(1));
    let mut descriptors = SmallVec::with_capacity(req.descriptors.len());
    for (i, d) in req.descriptors.iter().enumerate() {
        descriptors.push(to_descriptor(i, d, request_hits)?);
    }
    Ok(limiter::Request {
        domain: &req.domain,
        descriptors,
    })
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

fn to_descriptor(
    i: usize,
    d: &RateLimitDescriptor,
    request_hits: u64,
) -> Result<Descriptor<'_>, BadRequest> {
    if d.entries.is_empty() {
        return Err(bad(
            format!("descriptors[{i}].entries"),
            "at least one entry is required",
        ));
    }
    if d.entries.len() > MAX_ENTRIES {
        return Err(bad(
            format!("descriptors[{i}].entries"),
            format!("{} entries, at most {MAX_ENTRIES} allowed", d.entries.len()),
        ));
    }
    let mut entries = SmallVec::with_capacity(d.entries.len());
    for (j, e) in d.entries.iter().enumerate() {
        if e.key.is_empty() {
            return Err(bad(
                format!("descriptors[{i}].entries[{j}].key"),
                "must not be empty",
            ));
        }
        if e.key.len() > MAX_FIELD_BYTES {
            check_len(&format!("descriptors[{i}].entries[{j}].key"), &e.key)?;
        }
        if e.value.len() > MAX_FIELD_BYTES {
            check_len(&format!("descriptors[{i}].entries[{j}].value"), &e.value)?;
        }
        entries.push((e.key.as_str(), e.value.as_str()));
    }
    // A descriptor's own hits_addend overrides the request's; there 0 means "check only".
    let n = d.hits_addend.map_or(request_hits, |v| v);
    let hits = if d.is_negative_hits {
        Hits::Return(n)
    } else {
        Hits::Take(n)
    };
    let limit_override = match &d.limit {
        None => None,
        Some(o) => {
            let unit = match RateLimitUnit::try_from(o.unit) {
                Ok(RateLimitUnit::Second) => Unit::Second,
                Ok(RateLimitUnit::Minute) => Unit::Minute,
                Ok(RateLimitUnit::Hour) => Unit::Hour,
                Ok(RateLimitUnit::Day) => Unit::Day,
                Ok(RateLimitUnit::Month) => Unit::Month,
                Ok(RateLimitUnit::Year) => Unit::Year,
                Ok(RateLimitUnit::Unknown) | Err(_) => {
                    return Err(bad(
                        format!("descriptors[{i}].limit.unit"),
                        format!(
                            "unit {} is not one of SECOND, MINUTE, HOUR, DAY, MONTH, YEAR",
                            o.unit
                        ),
                    ));
                }
            };
            Some(LimitOverride {
                requests_per_unit: o.requests_per_unit,
                unit,
            })
        }
    };
    Ok(Descriptor {
        entries,
        hits,
        limit_override,
    })
}

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

/// Writes the limiter's decision as Envoy's response.
pub fn to_response(decision: &Decision) -> RateLimitResponse {
    let statuses = decision
        .statuses
        .iter()
        .map(|s| DescriptorStatus {
            code: if s.over { Code::OverLimit } else { Code::Ok } as i32,
            current_limit: s.limit.as_ref().map(|l| RateLimit {
                name: l.name.to_string(),
                requests_per_unit: l.reported.requests_per_unit,
                unit: proto_unit(l.reported.unit) as i32,
            }),
            limit_remaining: u32::try_from(s.remaining).unwrap_or(u32::MAX),
            duration_until_reset: (s.limit.is_some() || s.reset_after > 0).then(|| {
                prost_types::Duration {
                    seconds: i64::try_from(ceil_secs(s.reset_after)).unwrap_or(i64::MAX),
                    nanos: 0,
                }
            }),
            quota: None,
        })
        .collect();
    let mut response = RateLimitResponse {
        overall_code: if decision.over {
            Code::OverLimit
        } else {
            Code::Ok
        } as i32,
        statuses,
        ..Default::default()
    };
    if decision.unavailable {
        response.response_headers_to_add = vec![
            header("retry-after", "1".to_string()),
            header("content-type", "application/json".to_string()),
        ];
        response.raw_body = UNAVAILABLE_BODY.as_bytes().to_vec();
    } else if let Some(b) = decision.blocked {
        let mut headers = Vec::with_capacity(2);
        if !b.permanent {
            headers.push(header(
                "retry-after",
                ceil_secs(b.remaining).max(1).to_string(),
            ));
        }
        headers.push(header("content-type", "application/json".to_string()));
        response.response_headers_to_add = headers;
        response.raw_body = if b.permanent {
            PERMANENT_BLOCK_BODY
        } else {
            TEMPORARY_BLOCK_BODY
        }
        .as_bytes()
        .to_vec();
    } else if let (true, Some((nanos, name))) = (decision.over, &decision.retry) {
        let secs = ceil_secs(*nanos).max(1);
        response.response_headers_to_add = vec![
            header("retry-after", secs.to_string()),
            header("content-type", "application/json".to_string()),
        ];
        response.raw_body = over_limit_body(name, secs).into_bytes();
    }
    response
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: key.to_string(),
        value,
        raw_value: Vec::new(),
    }
}

/// The Talk2Me seed's body for a blocked address.
pub const TEMPORARY_BLOCK_BODY: &str =
    r#"{"error": "IP temporarily blocked due to excessive requests"}"#;
/// The body when the counter store is down and the failure policy denies.
pub const UNAVAILABLE_BODY: &str = r#"{"error": "Rate limiting temporarily unavailable"}"#;
/// The body for a permanently blocked address.
pub const PERMANENT_BLOCK_BODY: &str = r#"{"error": "IP permanently blocked"}"#;

/// The seeds' 429 body: `{"error": "Rate limit exceeded (per minute)", "retry_after": 60}`.
pub fn over_limit_body(limit_name: &str, retry_after_secs: u64) -> String {
    let mut out = String::from("{\"error\": \"Rate limit exceeded (");
    json_escape_into(limit_name, &mut out);
    out.push_str(")\", \"retry_after\": ");
    out.push_str(&retry_after_secs.to_string());
    out.push('}');
    out
}

/// Escapes `s` for a JSON string body (names come from config and may hold quotes).
pub fn json_escape_into(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
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
    fn durations_round_up_to_whole_seconds() {
        assert_eq!(ceil_secs(0), 0);
        assert_eq!(ceil_secs(1), 1);
        assert_eq!(ceil_secs(60_000_000_000), 60);
        assert_eq!(ceil_secs(60_000_000_001), 61);
    }
}
