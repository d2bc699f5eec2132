//! `ShouldRateLimit` in protobuf's JSON mapping, for envoyproxy/ratelimit's `POST /json`: the
//! request read as `protojson` reads it (lowerCamelCase or the proto's own field names, enums by
//! name or number, 64-bit integers as numbers or strings), the response written as `protojson`
//! writes it (lowerCamelCase, enums by name, default values left out).

use serde_json::{Map, Value, json};

use crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use crate::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, rate_limit::Unit as ResponseUnit,
};
use crate::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use crate::proto::envoy::r#type::v3::RateLimitUnit;

/// A body that is not a `RateLimitRequest`, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JsonError(String);

fn field<'a>(o: &'a Map<String, Value>, camel: &str, snake: &str) -> Option<&'a Value> {
    o.get(camel)
        .or_else(|| o.get(snake))
        .filter(|v| !v.is_null())
}

fn string(v: Option<&Value>, name: &str) -> Result<String, JsonError> {
    match v {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(JsonError(format!("{name}: expected a string"))),
    }
}

fn unsigned(v: Option<&Value>, name: &str) -> Result<u64, JsonError> {
    match v {
        None => Ok(0),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| JsonError(format!("{name}: expected an unsigned integer"))),
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| JsonError(format!("{name}: expected an unsigned integer"))),
        Some(_) => Err(JsonError(format!("{name}: expected an unsigned integer"))),
    }
}

fn object<'a>(v: &'a Value, name: &str) -> Result<&'a Map<String, Value>, JsonError> {
    v.as_object()
        .ok_or_else(|| JsonError(format!("{name}: expected an object")))
}

fn list<'a>(v: Option<&'a Value>, name: &str) -> Result<&'a [Value], JsonError> {
    match v {
        None => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(JsonError(format!("{name}: expected a list"))),
    }
}

/// Parses a `RateLimitRequest` from JSON.
pub fn request(body: &[u8]) -> Result<RateLimitRequest, JsonError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| JsonError(e.to_string()))?;
    let o = object(&v, "request")?;
    let mut descriptors = Vec::new();
    for (i, d) in list(field(o, "descriptors", "descriptors"), "descriptors")?
        .iter()
        .enumerate()
    {
        let name = format!("descriptors[{i}]");
        let d = object(d, &name)?;
        let mut entries = Vec::new();
        for (j, e) in list(field(d, "entries", "entries"), &name)?
            .iter()
            .enumerate()
        {
            let en = format!("{name}.entries[{j}]");
            let e = object(e, &en)?;
            entries.push(Entry {
                key: string(field(e, "key", "key"), &en)?,
                value: string(field(e, "value", "value"), &en)?,
            });
        }
        let limit = match field(d, "limit", "limit") {
            None => None,
            Some(l) => {
                let ln = format!("{name}.limit");
                let l = object(l, &ln)?;
                let unit = match field(l, "unit", "unit") {
                    None => 0,
                    Some(Value::String(s)) => RateLimitUnit::from_str_name(s)
                        .map(|u| u as i32)
                        .ok_or_else(|| JsonError(format!("{ln}.unit: unknown unit {s:?}")))?,
                    Some(Value::Number(n)) => n
                        .as_i64()
                        .and_then(|n| i32::try_from(n).ok())
                        .ok_or_else(|| JsonError(format!("{ln}.unit: expected an enum")))?,
                    Some(_) => return Err(JsonError(format!("{ln}.unit: expected an enum"))),
                };
                let rpu = unsigned(field(l, "requestsPerUnit", "requests_per_unit"), &ln)?;
                Some(RateLimitOverride {
                    requests_per_unit: u32::try_from(rpu)
                        .map_err(|_| JsonError(format!("{ln}.requestsPerUnit: too large")))?,
                    unit,
                })
            }
        };
        let hits_addend = match field(d, "hitsAddend", "hits_addend") {
            None => None,
            Some(Value::Object(w)) => Some(unsigned(w.get("value"), &name)?),
            h => Some(unsigned(h, &name)?),
        };
        descriptors.push(RateLimitDescriptor {
            entries,
            limit,
            hits_addend,
            is_negative_hits: matches!(
                field(d, "isNegativeHits", "is_negative_hits"),
                Some(Value::Bool(true))
            ),
        });
    }
    let hits = unsigned(field(o, "hitsAddend", "hits_addend"), "hitsAddend")?;
    Ok(RateLimitRequest {
        domain: string(field(o, "domain", "domain"), "domain")?,
        descriptors,
        hits_addend: u32::try_from(hits)
            .map_err(|_| JsonError("hitsAddend: too large".to_string()))?,
    })
}

/// The response's overall code, for the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overall {
    /// 200.
    Ok,
    /// 429.
    OverLimit,
    /// 500.
    Unknown,
}

/// The overall code of `r`.
pub fn overall(r: &RateLimitResponse) -> Overall {
    match Code::try_from(r.overall_code) {
        Ok(Code::Ok) => Overall::Ok,
        Ok(Code::OverLimit) => Overall::OverLimit,
        _ => Overall::Unknown,
    }
}

fn code_name(c: i32) -> Value {
    Code::try_from(c).map_or(json!(c), |c| json!(c.as_str_name()))
}

/// Writes `r` as protojson writes it.
pub fn response(r: &RateLimitResponse) -> Value {
    let mut o = Map::new();
    if r.overall_code != 0 {
        o.insert("overallCode".into(), code_name(r.overall_code));
    }
    if !r.statuses.is_empty() {
        let statuses = r
            .statuses
            .iter()
            .map(|s| {
                let mut so = Map::new();
                if s.code != 0 {
                    so.insert("code".into(), code_name(s.code));
                }
                if let Some(l) = &s.current_limit {
                    let mut lo = Map::new();
                    if !l.name.is_empty() {
                        lo.insert("name".into(), json!(l.name));
                    }
                    if l.requests_per_unit != 0 {
                        lo.insert("requestsPerUnit".into(), json!(l.requests_per_unit));
                    }
                    if l.unit != 0 {
                        let unit = ResponseUnit::try_from(l.unit)
                            .map_or(json!(l.unit), |u| json!(u.as_str_name()));
                        lo.insert("unit".into(), unit);
                    }
                    so.insert("currentLimit".into(), Value::Object(lo));
                }
                if s.limit_remaining != 0 {
                    so.insert("limitRemaining".into(), json!(s.limit_remaining));
                }
                if let Some(d) = &s.duration_until_reset {
                    so.insert(
                        "durationUntilReset".into(),
                        json!(format!("{}s", d.seconds)),
                    );
                }
                Value::Object(so)
            })
            .collect();
        o.insert("statuses".into(), Value::Array(statuses));
    }
    if !r.response_headers_to_add.is_empty() {
        let headers = r
            .response_headers_to_add
            .iter()
            .map(|h| json!({"key": h.key, "value": h.value}))
            .collect();
        o.insert("responseHeadersToAdd".into(), Value::Array(headers));
    }
    if !r.raw_body.is_empty() {
        use std::fmt::Write as _;
        // bytes are base64 in protojson.
        let mut b64 = String::new();
        for chunk in r.raw_body.chunks(3) {
            const A: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    let _ = b64.write_char(char::from(A[(n >> (18 - 6 * i) & 63) as usize]));
                } else {
                    b64.push('=');
                }
            }
        }
        o.insert("rawBody".into(), json!(b64));
    }
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_both_field_spellings_and_enum_forms() {
        let r = request(
            br#"{"domain":"d","hits_addend":2,"descriptors":[{"entries":[{"key":"k","value":"v"}],
                "limit":{"requestsPerUnit":5,"unit":"HOUR"},"hitsAddend":"3"}]}"#,
        )
        .unwrap();
        assert_eq!(r.domain, "d");
        assert_eq!(r.hits_addend, 2);
        let d = &r.descriptors[0];
        assert_eq!(
            (d.entries[0].key.as_str(), d.entries[0].value.as_str()),
            ("k", "v")
        );
        assert_eq!(
            d.limit,
            Some(RateLimitOverride {
                requests_per_unit: 5,
                unit: 3
            })
        );
        assert_eq!(d.hits_addend, Some(3));
        assert!(request(b"{not json").is_err());
        assert!(request(br#"{"descriptors":{}}"#).is_err());
    }

    #[test]
    fn bytes_are_base64() {
        let r = RateLimitResponse {
            raw_body: b"Man".to_vec(),
            ..Default::default()
        };
        assert_eq!(response(&r)["rawBody"], "TWFu");
        let r = RateLimitResponse {
            raw_body: b"Ma".to_vec(),
            ..Default::default()
        };
        assert_eq!(response(&r)["rawBody"], "TWE=");
    }
}
