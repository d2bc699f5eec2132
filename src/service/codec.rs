//! The protobuf codec of every generated service and client (tonic-build's `codec_path`):
//! prost's encoding, with one difference from `tonic_prost::ProstCodec`. A message prost cannot
//! decode is the caller's fault, so it is `INVALID_ARGUMENT` naming the field prost stopped at
//! (`malformed protobuf: Entry.value: RateLimitDescriptor.entries: ...: invalid string value`),
//! where tonic's codec answers `INTERNAL`. Framing (the 5-byte prefix, the size bound) stays
//! tonic's.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Buffers tonic allocates per call to read a request and write a response. Envoy's requests
/// and sluice's answers are a few hundred bytes; tonic's default of 8 KiB per buffer would be
/// twice 8 KiB allocated and zeroed-on-growth for every call. A larger message still works:
/// the buffer grows.
const BUFFER_BYTES: usize = 1024;

/// Encodes `T` and decodes `U` with prost.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder(PhantomData)
    }
}

/// Bytes encoded before a streaming response yields to the runtime: tonic's default.
const YIELD_THRESHOLD: usize = 32 * 1024;

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
}

/// Writes a `T` into tonic's buffer.
#[derive(Debug)]
pub struct ProstEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for ProstEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // EncodeBuf grows on demand, so prost never runs out of room; should that ever change,
        // the call fails with a status instead of a panic.
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding the response: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }
}

/// Reads a `U` from one whole gRPC message.
#[derive(Debug)]
pub struct ProstDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for ProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        decode(buf).map(Some)
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }
}

/// Decodes one whole message as every service reads its requests: a message prost cannot
/// decode is `INVALID_ARGUMENT` naming the field prost stopped at.
pub fn decode<U: Message + Default>(buf: impl prost::bytes::Buf) -> Result<U, Status> {
    U::decode(buf).map_err(malformed)
}

/// prost's error names the fields it was inside, innermost first, and says what was wrong;
/// nothing of the client's bytes is echoed, so the message stays short whatever was sent.
fn malformed(e: prost::DecodeError) -> Status {
    let text = e.to_string();
    let detail = text
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&text);
    Status::invalid_argument(format!("malformed protobuf: {detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::envoy::service::ratelimit::v3::RateLimitRequest;

    #[test]
    fn malformed_protobuf_is_invalid_argument_naming_the_field() {
        // Field 2 (descriptors), then inside it field 1 (entries), then inside that field 2
        // (value) holding bytes that are not UTF-8.
        let entry = [0x12, 0x02, 0xff, 0xfe];
        let mut descriptor = vec![0x0a, entry.len() as u8];
        descriptor.extend_from_slice(&entry);
        let mut request = vec![0x12, descriptor.len() as u8];
        request.extend_from_slice(&descriptor);
        let err = RateLimitRequest::decode(request.as_slice()).unwrap_err();
        let status = malformed(err);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let m = status.message();
        assert!(m.starts_with("malformed protobuf: "), "{m}");
        assert!(m.contains("Entry.value"), "{m}");
        assert!(m.contains("RateLimitRequest.descriptors"), "{m}");
    }
}
