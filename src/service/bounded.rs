//! Error messages of bounded size, whatever a client sent. tonic echoes some request input in
//! its statuses (`grpc-encoding`'s value in "Content is compressed with `...` which isn't
//! supported"); a header of a few kilobytes, sent once and then referred to by a one-byte
//! HPACK index, would otherwise be answered with its value, percent-encoded, on every call.
//! This layer, around every service of a listener, cuts the `grpc-message` of an error answered
//! in the headers (tonic answers unary errors so) to [`MAX_MESSAGE_BYTES`]. sluice's own
//! messages name fields and sizes, never values, and are shorter.

use http::HeaderValue;
use http::header::HeaderName;

/// Longest `grpc-message` sent, in bytes as on the wire (percent-encoded).
pub const MAX_MESSAGE_BYTES: usize = 256;

/// What a cut message ends with.
const CUT: &str = "...";

const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The layer: a `tower` response map cutting an over-long `grpc-message`.
pub type BoundedErrorsLayer = tower::util::MapResponseLayer<
    fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body>,
>;

/// See the module doc.
pub fn bounded_errors() -> BoundedErrorsLayer {
    tower::util::MapResponseLayer::new(bound_message)
}

/// Cuts an over-long `grpc-message` of `response`; anything else passes unchanged.
fn bound_message<B>(mut response: http::Response<B>) -> http::Response<B> {
    if let Some(value) = response.headers_mut().get_mut(GRPC_MESSAGE)
        && value.len() > MAX_MESSAGE_BYTES
    {
        *value = cut(value.as_bytes());
    }
    response
}

/// The first bytes of a percent-encoded message, never ending inside an escape, then `...`.
fn cut(message: &[u8]) -> HeaderValue {
    let mut end = MAX_MESSAGE_BYTES - CUT.len();
    // An escape is `%XY`: a `%` in the last two bytes kept would be cut in half.
    if let Some(back) = message
        .get(end.saturating_sub(2)..end)
        .and_then(|tail| tail.iter().position(|&b| b == b'%'))
    {
        end = end - 2 + back;
    }
    let mut out = Vec::with_capacity(end + CUT.len());
    out.extend_from_slice(message.get(..end).unwrap_or_default());
    out.extend_from_slice(CUT.as_bytes());
    // The bytes kept were a valid header value, and `...` is too.
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static(CUT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_never_inside_an_escape() {
        for pad in 0..4 {
            let message = format!("{}{}", "a".repeat(pad), "%60".repeat(2000));
            let v = cut(message.as_bytes());
            let s = v.to_str().unwrap();
            assert!(s.len() <= MAX_MESSAGE_BYTES, "{}", s.len());
            assert!(s.ends_with(CUT));
            let kept = s.strip_suffix(CUT).unwrap().trim_start_matches('a');
            assert!(
                kept.len().is_multiple_of(3) && kept.split('%').skip(1).all(|e| e == "60"),
                "{s}"
            );
        }
    }

    #[test]
    fn short_messages_and_answers_without_one_pass_unchanged() {
        let mut r = http::Response::new(());
        r.headers_mut().insert(
            GRPC_MESSAGE,
            HeaderValue::from_static("domain: must not be empty"),
        );
        let r = bound_message(r);
        assert_eq!(r.headers()[GRPC_MESSAGE], "domain: must not be empty");
        let r = bound_message(http::Response::new(()));
        assert!(r.headers().is_empty());
    }
}
