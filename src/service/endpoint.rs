//! The `ShouldRateLimit` endpoint, written against HTTP/2 requests directly instead of through
//! tonic's generated server and codec.
//!
//! Why: a decision costs well under a microsecond; tonic's unary machinery around it (a boxed
//! `async_trait` future of ~3 KB, a streaming decoder and encoder with 8 KiB buffers each, the
//! owned prost structs, its per-request layers and router) cost several times that per call.
//! This endpoint reads the one request message without copying when it arrives in one DATA
//! frame (Envoy's does), decides, and writes the response into one buffer, followed by
//! `grpc-status: 0` trailers. [`crate::service::connection`] hands it the decision listener's
//! `ShouldRateLimit` calls straight from h2; everything else there (health, reflection) goes to
//! tonic's router.
//!
//! It keeps the gRPC contract Envoy and other clients rely on: `application/grpc` responses,
//! errors as trailers-only responses with `grpc-status`/`grpc-message` (built by tonic's
//! [`Status::into_http`]), `grpc-encoding` other than identity refused as `UNIMPLEMENTED`, the
//! same 4 MiB request bound as tonic's default (`OUT_OF_RANGE` beyond), and a body that is not
//! exactly one well-formed message answered with `INVALID_ARGUMENT` saying what is wrong (tonic
//! answers framing errors with `INTERNAL`; they are the caller's fault, and our rule is that
//! malformed input is `INVALID_ARGUMENT`).

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Response};
use tonic::Status;

use crate::limiter::{Decision, Limiter, Rules, RulesCache};
use crate::service::wire;
use crate::store::{Store, poll_once};

/// The gRPC service name Envoy calls.
pub const SERVICE_NAME: &str = "envoy.service.ratelimit.v3.RateLimitService";
/// Its one method's path.
pub const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
/// Largest request message accepted: tonic's default, so behaviour did not change with this
/// endpoint.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Bytes of the gRPC message prefix: compressed flag and big-endian length.
const PREFIX: usize = 5;

/// The rate limit service's one method.
#[derive(Debug)]
pub struct RlsEndpoint<S> {
    limiter: Arc<Limiter<S>>,
}

impl<S> RlsEndpoint<S> {
    /// An endpoint answering from `limiter`.
    pub fn new(limiter: Arc<Limiter<S>>) -> Self {
        Self { limiter }
    }
}

impl<S: Store> RlsEndpoint<S> {
    /// Answers a call from its whole request body (one framed message), received since
    /// `start`, when the store decides at once (the memory store), with no future kept beyond
    /// this call; otherwise hands `body` back, for [`Self::answer`].
    ///
    /// `rules`: the rules in force, from the connection's [`RulesCache`] (see
    /// [`Self::rules_cache`]).
    pub fn answer_now(
        &self,
        body: Bytes,
        start: std::time::Instant,
        rules: Rules<'_>,
    ) -> Result<Response<Unary>, Bytes> {
        let mut out = Vec::with_capacity(PREFIX + 64);
        match self.answer_now_into(&body, start, rules, &mut out) {
            Some(Ok(())) => Ok(unary_ok(out)),
            Some(Err(status)) => Ok(status.into_http()),
            None => Err(body),
        }
    }

    /// Like [`Self::answer_now`], for the decision listener's own HTTP/2: decides from the
    /// body where it lies (in the connection's read buffer) and appends the framed response
    /// message to `out`. `None` when the store would wait (Redis): the caller then copies the
    /// body and calls [`Self::answer`].
    pub fn answer_now_into(
        &self,
        body: &[u8],
        start: std::time::Instant,
        rules: Rules<'_>,
        out: &mut Vec<u8>,
    ) -> Option<Result<(), Status>> {
        if !self.limiter.store().answers_at_once() {
            return None;
        }
        let answered = std::pin::pin!(answer_into(&self.limiter, rules, body, start, out));
        Some(poll_once(answered).unwrap_or_else(|| {
            tracing::error!("a store that answers at once did not; call refused");
            Err(Status::internal("the decision did not complete"))
        }))
    }

    /// Answers a call from its whole request body, received since `start`.
    pub async fn answer(&self, body: Bytes, start: std::time::Instant) -> Response<Unary> {
        let rules = self.limiter.rules_in_force();
        answer(&self.limiter, rules.rules(), body, start)
            .await
            .unwrap_or_else(Status::into_http)
    }

    /// The rules in force, as one connection's calls load them for [`Self::answer_now`].
    pub fn rules_cache(&self) -> RulesCache<'_> {
        self.limiter.rules_cache()
    }
}

/// Refuses a call its headers rule out, before its body: compressed calls (we accept identity
/// only).
pub fn check_headers(headers: &HeaderMap) -> Result<(), Status> {
    // Parsed at compile time: from a string the name would be parsed on every call.
    const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
    match headers.get(GRPC_ENCODING) {
        Some(encoding) if encoding.as_bytes() != b"identity" => {
            Err(Status::unimplemented(format!(
                "Content is compressed with `{}` which isn't supported",
                String::from_utf8_lossy(encoding.as_bytes())
            )))
        }
        _ => Ok(()),
    }
}

/// The status of a call whose request body could not be read.
pub fn unreadable(error: impl std::fmt::Display) -> Status {
    Status::internal(format!("reading the request body: {error}"))
}

/// Decides the call whose request body (one framed message) is `body`.
async fn answer<S: Store>(
    limiter: &Limiter<S>,
    rules: Rules<'_>,
    body: Bytes,
    start: std::time::Instant,
) -> Result<Response<Unary>, Status> {
    let mut out = Vec::with_capacity(PREFIX + 64);
    answer_into(limiter, rules, &body, start, &mut out).await?;
    Ok(unary_ok(out))
}

/// An OK unary response carrying the framed message `out`, then `grpc-status: 0` trailers.
fn unary_ok(out: Vec<u8>) -> Response<Unary> {
    let mut response = Response::new(Unary {
        data: Some(Bytes::from(out)),
        trailers: true,
    });
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// Decides the call whose request body (one framed message) is `body`, and appends the framed
/// response message to `out`; on an error `out` is left as it was.
async fn answer_into<S: Store>(
    limiter: &Limiter<S>,
    rules: Rules<'_>,
    body: &[u8],
    start: std::time::Instant,
    out: &mut Vec<u8>,
) -> Result<(), Status> {
    let message = unframe(body)?;
    let view = wire::decode_request(message)?;
    let mut decision = Decision::default();
    limiter
        .decide_into(rules, &view, limiter.clock().now(), &mut decision)
        .await;
    drop(view);

    let at = out.len();
    out.reserve(PREFIX + 64 * decision.statuses.len().max(1));
    out.put_bytes(0, PREFIX);
    wire::encode_response(&decision, out);
    let Ok(len) = u32::try_from(out.len() - at - PREFIX) else {
        out.truncate(at);
        return Err(Status::internal("response larger than 4 GiB"));
    };
    if let Some(prefix) = out.get_mut(at + 1..at + PREFIX) {
        prefix.copy_from_slice(&len.to_be_bytes());
    }
    limiter.stats().latency.observe(start.elapsed());
    Ok(())
}

/// A request body as it arrives: refused as soon as it is known to be too large, and kept as
/// is, without a copy, when it comes in one piece (one DATA frame, as from Envoy).
#[derive(Debug, Default)]
pub enum BodyBuf {
    /// Nothing yet.
    #[default]
    Empty,
    /// One piece, as received.
    One(Bytes),
    /// Several pieces, copied together.
    Joined(BytesMut),
}

impl BodyBuf {
    /// Adds the next piece of the body.
    pub fn push(&mut self, data: Bytes) -> Result<(), Status> {
        match self {
            BodyBuf::Empty => *self = BodyBuf::One(data),
            BodyBuf::One(head) => {
                let mut buf = BytesMut::with_capacity(head.len() + data.len());
                buf.extend_from_slice(head);
                buf.extend_from_slice(&data);
                *self = BodyBuf::Joined(buf);
            }
            BodyBuf::Joined(buf) => buf.extend_from_slice(&data),
        }
        // Refuse an oversized message as soon as its prefix says so, before buffering it.
        check_size(match self {
            BodyBuf::Empty => &[],
            BodyBuf::One(b) => b,
            BodyBuf::Joined(b) => b,
        })
    }

    /// The whole body.
    pub fn finish(self) -> Bytes {
        match self {
            BodyBuf::Empty => Bytes::new(),
            BodyBuf::One(one) => one,
            BodyBuf::Joined(buf) => buf.freeze(),
        }
    }
}

/// Refuses a body whose prefix declares, or whose bytes already hold, more than
/// [`MAX_REQUEST_BYTES`].
pub fn check_size(body: &[u8]) -> Result<(), Status> {
    if let Some(declared) = declared_len(body)
        && declared > MAX_REQUEST_BYTES
    {
        return Err(too_large(declared));
    }
    if body.len() > PREFIX + MAX_REQUEST_BYTES {
        return Err(too_large(body.len() - PREFIX));
    }
    Ok(())
}

/// The one uncompressed gRPC message of a whole request body, without its prefix.
fn unframe(buf: &[u8]) -> Result<&[u8], Status> {
    check_size(buf)?;
    if buf.is_empty() {
        return Err(bad_body("no gRPC message (empty body)"));
    }
    let Some(declared) = declared_len(buf) else {
        return Err(bad_body("ended inside the 5-byte gRPC message prefix"));
    };
    match buf.first() {
        Some(0) => {}
        Some(1) => {
            return Err(bad_body(
                "the message's compressed flag is set but no grpc-encoding was sent",
            ));
        }
        _ => {
            return Err(bad_body(
                "the message prefix's compressed flag is neither 0 nor 1",
            ));
        }
    }
    let total = PREFIX + declared;
    if buf.len() < total {
        return Err(bad_body(&format!(
            "ended after {} of the message's {declared} bytes",
            buf.len() - PREFIX
        )));
    }
    if buf.len() > total {
        return Err(bad_body("more than one message in a unary call"));
    }
    Ok(buf.get(PREFIX..).unwrap_or_default())
}

/// The message length a gRPC prefix declares, once its five bytes are there.
fn declared_len(buf: &[u8]) -> Option<usize> {
    let len: [u8; 4] = buf.get(1..PREFIX)?.try_into().ok()?;
    usize::try_from(u32::from_be_bytes(len)).ok()
}

fn bad_body(problem: &str) -> Status {
    Status::invalid_argument(format!("request body: {problem}"))
}

fn too_large(len: usize) -> Status {
    Status::out_of_range(format!(
        "Error, decoded message length too large: found {len} bytes, the limit is: {MAX_REQUEST_BYTES} bytes"
    ))
}

/// A unary response body: one DATA frame, then `grpc-status: 0` trailers (empty for an error,
/// whose status travels in the headers).
#[derive(Debug, Default)]
pub struct Unary {
    data: Option<Bytes>,
    trailers: bool,
}

impl Unary {
    /// The message, and the trailers that follow it (`None` for a trailers-only response,
    /// whose status is in the headers).
    pub fn into_parts(self) -> (Option<Bytes>, Option<HeaderMap>) {
        (self.data, self.trailers.then(ok_trailers))
    }
}

/// `grpc-status: 0`. The name is parsed once, at compile time (from a string it would be
/// parsed and validated on every call).
fn ok_trailers() -> HeaderMap {
    const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert(GRPC_STATUS, HeaderValue::from_static("0"));
    trailers
}
