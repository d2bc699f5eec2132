//! `ShouldRateLimit` in protobuf's JSON mapping, for envoyproxy/ratelimit's `POST /json`: read
//! and written by prost-reflect from the descriptor set that server reflection serves, so the
//! mapping is protobuf's own (lowerCamelCase or proto field names in, enums by name or number,
//! 64-bit integers as strings, default values left out of the answer).

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use crate::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};

/// A body that is not a `RateLimitRequest`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JsonError(String);

/// The descriptor of message `name`, from the descriptor set compiled into the binary.
fn descriptor(name: &str) -> Result<MessageDescriptor, JsonError> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    let pool = POOL
        .get_or_init(|| DescriptorPool::decode(FILE_DESCRIPTOR_SET).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| JsonError(e.clone()))?;
    pool.get_message_by_name(name)
        .ok_or_else(|| JsonError(format!("{name} is not in the descriptor set")))
}

/// Parses a `RateLimitRequest` from JSON.
pub fn request(body: &[u8]) -> Result<RateLimitRequest, JsonError> {
    let desc = descriptor("envoy.service.ratelimit.v3.RateLimitRequest")?;
    let mut de = serde_json::Deserializer::from_slice(body);
    let message =
        DynamicMessage::deserialize(desc, &mut de).map_err(|e| JsonError(e.to_string()))?;
    de.end().map_err(|e| JsonError(e.to_string()))?;
    message.transcode_to().map_err(|e| JsonError(e.to_string()))
}

/// Writes `r` as protobuf's JSON mapping writes it.
pub fn response(r: &RateLimitResponse) -> Result<String, JsonError> {
    let mut message =
        DynamicMessage::new(descriptor("envoy.service.ratelimit.v3.RateLimitResponse")?);
    message
        .transcode_from(r)
        .map_err(|e| JsonError(e.to_string()))?;
    serde_json::to_string(&message).map_err(|e| JsonError(e.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;

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
        assert!(request(br#"{"domain":"d"} trailing"#).is_err());
    }

    #[test]
    fn responses_leave_defaults_out_and_write_bytes_as_base64() {
        let r = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            raw_body: b"Man".to_vec(),
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_str(&response(&r).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"overallCode": "OVER_LIMIT", "rawBody": "TWFu"})
        );
    }
}
