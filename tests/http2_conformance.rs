//! HTTP/2 conformance of the decision listener (RFC 9113, with RFC 7541 for HPACK), checked
//! with a raw client written here: the client preface and every frame are written byte by
//! byte over a `TcpStream`, and the server's frames are read back and checked one by one.
//! The aim is the protocol, not the gRPC contract (tests/grpc_framing.rs covers malformed gRPC
//! bodies): frames split and padded in every legal way are understood, flow control is
//! honoured, protocol errors end the connection with the GOAWAY code the RFC names, and stream
//! errors end only their stream.
//!
//! Every check is an `async fn check_xxx(addr)` against a listener at `addr`; the macro
//! [`conformance_tests!`] turns them all into `#[tokio::test]`s for one way of starting a
//! server (see its documentation). Nothing here sleeps: every read has a 5-second timeout, so a
//! server that ignores a frame fails the test instead of hanging it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use common::*;
use prost::Message;
use sluice::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generates one `#[tokio::test]` per conformance check, each starting its own server.
///
/// `start` is an expression giving a future that resolves to a running server: a value with a
/// field `addr: SocketAddr` (its decision listener) and a method `async fn stop(self)`, as
/// [`start`] gives (and [`TestServer`]). Checks the implementation is known to fail can be
/// listed after it, each with the reason: they are run and must still fail (an expected
/// failure, not a skip):
///
/// ```ignore
/// mod native {
///     conformance_tests!(crate::start(sluice::server::Http2::Native));
/// }
/// mod h2_crate {
///     conformance_tests!(
///         crate::start(sluice::server::Http2::H2),
///         known_to_fail { a_ping_of_bad_length: "h2 crate: ..." }
///     );
/// }
/// ```
///
/// Invoke it once per module: the tests are named after the checks (`check_` dropped). A new
/// check is an `async fn check_xxx(addr: SocketAddr)` plus a line in the list below.
macro_rules! conformance_tests {
    // `$d` is a `$` for the inner macro's own metavariables.
    (@expand ($d:tt) $start:expr; [$($failing:ident : $why:literal),*]) => {
        macro_rules! conformance_test {
            $(
                ($failing, $d check:ident) => {
                    /// A check this implementation is known to fail: run, and held to still
                    /// fail, so that a fix (an upgrade of the crate) shows here rather than
                    /// leaving a test that never runs.
                    #[tokio::test]
                    async fn $failing() {
                        let srv = $start.await;
                        let outcome = tokio::spawn(crate::$d check(srv.addr)).await;
                        let Err(failure) = outcome else {
                            panic!("known to fail ({}), but passed: list it with the others", $why);
                        };
                        // Failed on a wrong answer, as listed: not on silence (a hang would
                        // also fail the check, and hide a new fault behind the known one).
                        let payload = failure.into_panic();
                        let message = payload
                            .downcast_ref::<String>()
                            .map(String::as_str)
                            .or_else(|| payload.downcast_ref::<&str>().copied())
                            .unwrap_or_default();
                        assert!(
                            !message.contains("sent nothing"),
                            "known to fail ({}), but failed otherwise: {message}",
                            $why
                        );
                        srv.stop().await;
                    }
                };
            )*
            ($d name:ident, $d check:ident) => {
                #[tokio::test]
                async fn $d name() {
                    let srv = $start.await;
                    crate::$d check(srv.addr).await;
                    srv.stop().await;
                }
            };
        }
        conformance_test!(preface_and_settings_exchange, check_preface_and_settings_exchange);
        conformance_test!(a_unary_call_is_answered, check_a_unary_call_is_answered);
        conformance_test!(
            a_message_over_two_data_frames,
            check_a_message_over_two_data_frames
        );
        conformance_test!(
            a_message_then_an_empty_data_frame_ending_the_stream,
            check_a_message_then_an_empty_data_frame_ending_the_stream
        );
        conformance_test!(headers_with_continuation, check_headers_with_continuation);
        conformance_test!(
            many_calls_pipelined_with_indexed_huffman_headers,
            check_many_calls_pipelined_with_indexed_huffman_headers
        );
        conformance_test!(
            response_data_waits_for_the_stream_window,
            check_response_data_waits_for_the_stream_window
        );
        conformance_test!(
            padded_and_prioritised_frames,
            check_padded_and_prioritised_frames
        );
        conformance_test!(a_bad_client_preface, check_a_bad_client_preface);
        conformance_test!(headers_on_stream_zero, check_headers_on_stream_zero);
        conformance_test!(an_even_stream_id, check_an_even_stream_id);
        conformance_test!(stream_ids_going_backwards, check_stream_ids_going_backwards);
        conformance_test!(
            another_frame_inside_a_header_block,
            check_another_frame_inside_a_header_block
        );
        conformance_test!(a_settings_frame_of_bad_length, check_a_settings_frame_of_bad_length);
        conformance_test!(
            settings_values_out_of_range,
            check_settings_values_out_of_range
        );
        conformance_test!(
            an_initial_window_size_over_the_maximum,
            check_an_initial_window_size_over_the_maximum
        );
        conformance_test!(a_ping_of_bad_length, check_a_ping_of_bad_length);
        conformance_test!(
            a_zero_window_update_on_the_connection,
            check_a_zero_window_update_on_the_connection
        );
        conformance_test!(
            a_frame_over_the_max_frame_size,
            check_a_frame_over_the_max_frame_size
        );
        conformance_test!(a_garbage_hpack_block, check_a_garbage_hpack_block);
        conformance_test!(a_push_promise_from_the_client, check_a_push_promise_from_the_client);
        conformance_test!(data_on_stream_zero, check_data_on_stream_zero);
        conformance_test!(padding_longer_than_the_frame, check_padding_longer_than_the_frame);
        conformance_test!(rst_stream_on_an_idle_stream, check_rst_stream_on_an_idle_stream);
        conformance_test!(
            a_reset_stream_leaves_the_connection_usable,
            check_a_reset_stream_leaves_the_connection_usable
        );
        conformance_test!(data_on_a_closed_stream, check_data_on_a_closed_stream);
        conformance_test!(unknown_frame_types_are_ignored, check_unknown_frame_types_are_ignored);
        conformance_test!(
            a_zero_window_update_on_a_stream,
            check_a_zero_window_update_on_a_stream
        );
        conformance_test!(
            malformed_requests_get_a_stream_error,
            check_malformed_requests_get_a_stream_error
        );
        conformance_test!(
            malformed_field_names_get_a_stream_error,
            check_malformed_field_names_get_a_stream_error
        );
        conformance_test!(
            health_check_on_the_same_connection,
            check_health_check_on_the_same_connection
        );
        conformance_test!(goaway_from_the_client, check_goaway_from_the_client);
        conformance_test!(oversized_header_block, check_oversized_header_block);
    };
    ($start:expr $(, known_to_fail { $($failing:ident : $why:literal),* $(,)? })? $(,)?) => {
        conformance_tests!(@expand ($) $start; [$($($failing : $why),*)?]);
    };
}

/// The decision listener on the `h2` crate (src/service/connection.rs).
///
/// Where the h2 crate (0.4.20) answers otherwise than RFC 9113 says, the check is written to
/// the RFC and listed here as known to fail, with what h2 does: run, and held to still fail.
mod h2_crate {
    conformance_tests!(
        crate::start(sluice::server::Http2::H2),
        known_to_fail {
            a_settings_frame_of_bad_length: "h2 crate: GOAWAY PROTOCOL_ERROR, not FRAME_SIZE_ERROR (§6.5)",
            a_ping_of_bad_length: "h2 crate: GOAWAY PROTOCOL_ERROR, not FRAME_SIZE_ERROR (§6.7)",
            an_initial_window_size_over_the_maximum: "h2 crate: GOAWAY PROTOCOL_ERROR, not FLOW_CONTROL_ERROR (§6.5.2)",
            a_garbage_hpack_block: "h2 crate: GOAWAY PROTOCOL_ERROR, not COMPRESSION_ERROR (§4.3)",
            data_on_a_closed_stream: "h2 crate: GOAWAY PROTOCOL_ERROR, not STREAM_CLOSED (§5.1, §6.1)",
            a_zero_window_update_on_a_stream: "h2 crate: GOAWAY PROTOCOL_ERROR, not RST_STREAM PROTOCOL_ERROR (§6.9)",
            malformed_field_names_get_a_stream_error: "h2 crate: GOAWAY PROTOCOL_ERROR, not RST_STREAM PROTOCOL_ERROR (§8.1.1)",
        }
    );
}

/// sluice's own HTTP/2 (the default): every check passes.
mod native {
    conformance_tests!(crate::start(sluice::server::Http2::Native));
}

/// Not an RFC point but sluice's own bound: request bodies that arrive in pieces are kept
/// until whole, at most twice the largest message (4 MiB) per connection. Three calls that
/// each declare a 4 MiB message and send 3 MiB of it: the third is reset with
/// ENHANCE_YOUR_CALM once the connection holds 8 MiB, and the connection carries on.
#[tokio::test]
async fn bodies_arriving_in_pieces_are_bounded_per_connection() {
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    let srv = start(sluice::server::Http2::Native).await;
    let mut conn = Conn::open(srv.addr).await;
    let chunk = vec![0u8; DEFAULT_MAX_FRAME];
    for stream in [1, 3, 5] {
        let mut bytes = header_frames(stream, &request_block(RLS), false, DEFAULT_MAX_FRAME);
        // gRPC prefix: uncompressed, 4 MiB declared.
        let mut first = vec![0, 0x00, 0x40, 0x00, 0x00];
        first.extend_from_slice(&chunk[..DEFAULT_MAX_FRAME - 5]);
        bytes.extend(data(stream, 0, &first));
        for _ in 1..192 {
            bytes.extend(data(stream, 0, &chunk));
        }
        conn.send(&bytes).await;
    }
    loop {
        match conn.event().await {
            Event::Reset { stream: 5, code } => {
                assert_eq!(code, ENHANCE_YOUR_CALM);
                break;
            }
            e @ (Event::Reset { .. } | Event::GoAway { .. } | Event::Closed) => {
                panic!("expected stream 5 reset with ENHANCE_YOUR_CALM, got {e:?}")
            }
            _ => {}
        }
    }
    conn.call_ok(7).await;
    srv.stop().await;
}

/// A server as [`TestServer::start_default`] starts one, on the HTTP/2 `http2`.
async fn start(http2: sluice::server::Http2) -> TestServer {
    TestServer::start_default_on(http2).await
}

// ---------------------------------------------------------------------------------------------
// Protocol constants (RFC 9113 §6, §7, §11).

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const RLS: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
const HEALTH: &str = "/grpc.health.v1.Health/Check";
/// How long any one read waits for the server.
const WAIT: Duration = Duration::from_secs(5);
/// The smallest SETTINGS_MAX_FRAME_SIZE, the default.
const DEFAULT_MAX_FRAME: usize = 16_384;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

const NO_ERROR: u32 = 0x0;
const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const STREAM_CLOSED: u32 = 0x5;
const FRAME_SIZE_ERROR: u32 = 0x6;
const COMPRESSION_ERROR: u32 = 0x9;

// ---------------------------------------------------------------------------------------------
// Frames out.

/// One frame: 24-bit length, type, flags, 31-bit stream id, payload.
fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    assert!(len < 1 << 24, "frame payload too long for the length field");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(ty);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (id, value) in pairs {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &payload)
}

fn ping(opaque: [u8; 8]) -> Vec<u8> {
    frame(PING, 0, 0, &opaque)
}

fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

fn goaway(last_stream: u32, code: u32) -> Vec<u8> {
    let mut payload = last_stream.to_be_bytes().to_vec();
    payload.extend_from_slice(&code.to_be_bytes());
    frame(GOAWAY, 0, 0, &payload)
}

fn data(stream: u32, flags: u8, bytes: &[u8]) -> Vec<u8> {
    frame(DATA, flags, stream, bytes)
}

/// A header block as one HEADERS frame and as many CONTINUATION frames as it takes with at
/// most `max` bytes each; END_HEADERS on the last.
fn header_frames(stream: u32, block: &[u8], end_stream: bool, max: usize) -> Vec<u8> {
    let mut chunks: Vec<&[u8]> = block.chunks(max).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    let mut out = Vec::new();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let end_headers = if i == last { END_HEADERS } else { 0 };
        if i == 0 {
            let end = if end_stream { END_STREAM } else { 0 };
            out.extend(frame(HEADERS, end | end_headers, stream, chunk));
        } else {
            out.extend(frame(CONTINUATION, end_headers, stream, chunk));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// HPACK out: literals built by hand, and an indexing, Huffman-coding encoder.

/// An HPACK integer (RFC 7541 §5.1) with an `prefix`-bit prefix, the first octet's other bits
/// from `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix: u32, value: usize) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(first | u8::try_from(value).unwrap());
        return;
    }
    out.push(first | u8::try_from(max).unwrap());
    let mut rest = value - max;
    while rest >= 128 {
        out.push(u8::try_from(rest % 128).unwrap() | 0x80);
        rest /= 128;
    }
    out.push(u8::try_from(rest).unwrap());
}

/// Reads an HPACK integer with a `prefix`-bit prefix: its value and the octets it took.
fn read_hpack_int(buf: &[u8], prefix: u32) -> (usize, usize) {
    let max = (1usize << prefix) - 1;
    let mut value = usize::from(buf[0]) & max;
    if value < max {
        return (value, 1);
    }
    let mut shift = 0;
    for (i, b) in buf[1..].iter().enumerate() {
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return (value, i + 2);
        }
    }
    panic!("truncated HPACK integer");
}

/// Entries of HPACK's static table; dynamic table indexes follow.
const STATIC_TABLE_LEN: usize = 61;

/// A literal field without indexing, new name, no Huffman (RFC 7541 §6.2.2).
fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0x00);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// The fields of a gRPC call to `path`, then `extra`.
fn request_fields<'a>(path: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut fields = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    fields.extend_from_slice(extra);
    fields
}

/// A header block of literals for `fields`.
fn literal_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        literal(&mut out, name, value);
    }
    out
}

/// A literal header block for a gRPC call to `path`.
fn request_block(path: &str) -> Vec<u8> {
    literal_block(&request_fields(path, &[]))
}

/// HPACK's Huffman code lengths for octets 0 to 255 (RFC 7541 Appendix B).
#[rustfmt::skip]
const HUFFMAN_LENGTHS: [u8; 256] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
];

/// The HPACK Huffman codes: the code is canonical (codes of one length are consecutive in
/// octet order, shorter codes first), so the lengths define it. Checked against fluke-hpack's
/// decoder by `huffman_codes_round_trip_through_an_independent_decoder`.
static HUFFMAN_CODES: LazyLock<[(u32, u32); 256]> = LazyLock::new(|| {
    let mut order: Vec<usize> = (0..256).collect();
    order.sort_by_key(|&s| (HUFFMAN_LENGTHS[s], s));
    let mut codes = [(0u32, 0u32); 256];
    let mut code = 0u32;
    let mut len = u32::from(HUFFMAN_LENGTHS[order[0]]);
    for (i, &s) in order.iter().enumerate() {
        let l = u32::from(HUFFMAN_LENGTHS[s]);
        if i > 0 {
            code = (code + 1) << (l - len);
        }
        len = l;
        codes[s] = (code, l);
    }
    codes
});

/// `s` Huffman-coded, padded with the most significant bits of EOS (ones).
fn huffman(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u64, 0u32);
    for &b in s {
        let (code, len) = HUFFMAN_CODES[usize::from(b)];
        acc = (acc << len) | u64::from(code);
        bits += len;
        while bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).unwrap());
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        let pad = 8 - bits;
        out.push(u8::try_from(((acc << pad) | ((1 << pad) - 1)) & 0xff).unwrap());
    }
    out
}

/// A Huffman-coded string literal (RFC 7541 §5.2, H = 1).
fn huffman_string(out: &mut Vec<u8>, s: &str) {
    let coded = huffman(s.as_bytes());
    hpack_int(out, 0x80, 7, coded.len());
    out.extend(coded);
}

/// An encoder that indexes (fluke-hpack's: fields are added to the dynamic table and then
/// sent as indexes) and Huffman-codes every string it sends (which fluke-hpack never does): it
/// keeps fluke-hpack's choice of representation and index, and re-codes the strings.
struct IndexingEncoder {
    table: fluke_hpack::Encoder<'static>,
    /// Fields sent as an index, or with a name index, into the dynamic table.
    dynamic_refs: usize,
}

impl IndexingEncoder {
    fn new() -> Self {
        Self {
            table: fluke_hpack::Encoder::new(),
            dynamic_refs: 0,
        }
    }

    fn encode(&mut self, fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            let mut plain = Vec::new();
            self.table
                .encode_header_into((name.as_bytes(), value.as_bytes()), &mut plain)
                .unwrap();
            if plain[0] & 0x80 != 0 {
                // Indexed field: no strings.
                if read_hpack_int(&plain, 7).0 > STATIC_TABLE_LEN {
                    self.dynamic_refs += 1;
                }
                out.extend(plain);
                continue;
            }
            // With incremental indexing (01xxxxxx, 6-bit index) or without (0000xxxx, 4-bit).
            let prefix = if plain[0] & 0x40 != 0 { 6 } else { 4 };
            let (index, used) = read_hpack_int(&plain, prefix);
            if index > STATIC_TABLE_LEN {
                self.dynamic_refs += 1;
            }
            out.extend_from_slice(&plain[..used]);
            if index == 0 {
                huffman_string(&mut out, name);
            }
            huffman_string(&mut out, value);
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC bodies.

/// `message` with the gRPC prefix (flag 0, big-endian length).
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// A framed `RateLimitRequest`, its client address from `n` (every address is far below the
/// limits of config/sluice.yaml; the path has no limit of its own).
fn rls_body(n: u32) -> Vec<u8> {
    let ip = format!("10.9.{}.{}", n / 250, n % 250);
    grpc_frame(&training("/execute", &ip).encode_to_vec())
}

/// A whole `ShouldRateLimit` call on `stream`: literal HEADERS, one DATA with END_STREAM.
fn rls_call(stream: u32) -> Vec<u8> {
    let mut out = header_frames(stream, &request_block(RLS), false, DEFAULT_MAX_FRAME);
    out.extend(data(stream, END_STREAM, &rls_body(stream)));
    out
}

/// The one gRPC message of a response body.
fn grpc_message(body: &[u8]) -> &[u8] {
    assert!(body.len() >= 5, "no gRPC message in {body:?}");
    assert_eq!(body[0], 0, "uncompressed");
    let len = usize::try_from(u32::from_be_bytes(body[1..5].try_into().unwrap())).unwrap();
    assert_eq!(body.len(), 5 + len, "exactly one message: {body:?}");
    &body[5..]
}

// ---------------------------------------------------------------------------------------------
// Frames in.

#[derive(Debug, Clone)]
struct RawFrame {
    ty: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// Takes one whole frame off the front of `buf`, if there is one.
fn take_frame(buf: &mut Vec<u8>) -> Option<RawFrame> {
    if buf.len() < 9 {
        return None;
    }
    let len = usize::try_from(u32::from_be_bytes([0, buf[0], buf[1], buf[2]])).unwrap();
    if buf.len() < 9 + len {
        return None;
    }
    let f = RawFrame {
        ty: buf[3],
        flags: buf[4],
        stream: u32::from_be_bytes(buf[5..9].try_into().unwrap()) & 0x7fff_ffff,
        payload: buf[9..9 + len].to_vec(),
    };
    buf.drain(..9 + len);
    Some(f)
}

/// A frame's payload without its padding (when PADDED is set).
fn unpadded(f: &RawFrame) -> &[u8] {
    if f.flags & PADDED == 0 {
        return &f.payload;
    }
    let pad = usize::from(f.payload[0]);
    assert!(pad < f.payload.len(), "server sent bad padding: {f:?}");
    &f.payload[1..f.payload.len() - pad]
}

/// What the server sent, header blocks reassembled and decoded.
#[derive(Debug, Clone)]
// Some fields are only read through `Debug`, in failure messages.
#[allow(dead_code)]
enum Event {
    Headers {
        stream: u32,
        end_stream: bool,
        fields: Vec<(String, String)>,
    },
    Data {
        stream: u32,
        end_stream: bool,
        data: Vec<u8>,
    },
    Reset {
        stream: u32,
        code: u32,
    },
    GoAway {
        last_stream: u32,
        code: u32,
        debug: String,
    },
    Ping {
        ack: bool,
        opaque: Vec<u8>,
    },
    Settings {
        ack: bool,
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    Other {
        ty: u8,
        stream: u32,
    },
    /// The server closed the connection (or reset it).
    Closed,
}

impl Event {
    /// The stream of a HEADERS, DATA or RST_STREAM.
    fn stream(&self) -> Option<u32> {
        match self {
            Event::Headers { stream, .. }
            | Event::Data { stream, .. }
            | Event::Reset { stream, .. } => Some(*stream),
            _ => None,
        }
    }
}

/// One response as it arrived.
#[derive(Debug, Default)]
struct Answer {
    headers: Option<Vec<(String, String)>>,
    data: Vec<u8>,
    data_frames: usize,
    trailers: Option<Vec<(String, String)>>,
    reset: Option<u32>,
    done: bool,
}

fn field<'a>(fields: Option<&'a Vec<(String, String)>>, name: &str) -> Option<&'a str> {
    fields?
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

impl Answer {
    fn record(&mut self, stream: u32, event: Event) {
        assert!(
            !self.done,
            "stream {stream}: a frame after it ended: {event:?}"
        );
        match event {
            Event::Headers {
                end_stream, fields, ..
            } => {
                if self.headers.is_none() {
                    self.headers = Some(fields);
                } else {
                    assert!(
                        self.trailers.is_none(),
                        "stream {stream}: a third header block"
                    );
                    assert!(end_stream, "stream {stream}: trailers must end the stream");
                    self.trailers = Some(fields);
                }
                self.done = end_stream;
            }
            Event::Data {
                end_stream, data, ..
            } => {
                assert!(
                    self.headers.is_some(),
                    "stream {stream}: DATA before HEADERS"
                );
                self.data.extend(data);
                self.data_frames += 1;
                self.done = end_stream;
            }
            Event::Reset { code, .. } => {
                self.reset = Some(code);
                self.done = true;
            }
            other => panic!("not a stream's frame: {other:?}"),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        field(self.headers.as_ref(), name)
    }

    /// `name` from the trailers, or from the headers of a trailers-only response.
    fn trailer(&self, name: &str) -> Option<&str> {
        field(self.trailers.as_ref(), name).or_else(|| self.header(name))
    }
}

/// A successful `ShouldRateLimit` answer: 200, application/grpc, one message decoding as a
/// `RateLimitResponse` with overall code OK, then `grpc-status: 0` trailers ending the stream.
fn assert_rls_ok(stream: u32, a: &Answer) {
    assert_eq!(a.reset, None, "stream {stream} was reset: {a:?}");
    assert_eq!(a.header(":status"), Some("200"), "stream {stream}: {a:?}");
    assert_eq!(
        a.header("content-type"),
        Some("application/grpc"),
        "stream {stream}: {a:?}"
    );
    let response = RateLimitResponse::decode(grpc_message(&a.data)).unwrap();
    assert_eq!(response.overall_code, OK, "stream {stream}: {response:?}");
    assert!(a.trailers.is_some(), "stream {stream}: no trailers: {a:?}");
    assert_eq!(
        field(a.trailers.as_ref(), "grpc-status"),
        Some("0"),
        "stream {stream}: {a:?}"
    );
}

/// A raw HTTP/2 client connection.
struct Conn {
    tcp: TcpStream,
    /// Bytes read and not yet taken as frames.
    buf: Vec<u8>,
    /// The server's header blocks, decoded in order (it may use its dynamic table).
    hpack: fluke_hpack::Decoder<'static>,
    /// The server's first SETTINGS.
    server_settings: Vec<(u16, u32)>,
    /// Events [`Conn::answers`] read that were not for the streams it waited for.
    stray: Vec<Event>,
}

impl Conn {
    /// A TCP connection on which nothing was sent yet.
    async fn raw(addr: SocketAddr) -> Conn {
        let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        tcp.set_nodelay(true).unwrap();
        Conn {
            tcp,
            buf: Vec::new(),
            hpack: fluke_hpack::Decoder::new(),
            server_settings: Vec::new(),
            stray: Vec::new(),
        }
    }

    /// A connection with the handshake done (push disabled, our connection window grown to
    /// 1 GiB so that no test runs out of it).
    async fn open(addr: SocketAddr) -> Conn {
        Conn::open_with(addr, &[]).await
    }

    /// A connection whose SETTINGS carry `pairs` besides ENABLE_PUSH = 0.
    async fn open_with(addr: SocketAddr, pairs: &[(u16, u32)]) -> Conn {
        let mut conn = Conn::raw(addr).await;
        let mut ours = vec![(SETTINGS_ENABLE_PUSH, 0)];
        ours.extend_from_slice(pairs);
        let mut hello = PREFACE.to_vec();
        hello.extend(settings(&ours));
        hello.extend(window_update(0, 1 << 30));
        conn.send(&hello).await;
        conn.server_preface().await;
        conn
    }

    /// Reads the server's connection preface (a SETTINGS frame, the first frame it sends) and
    /// acknowledges it.
    async fn server_preface(&mut self) {
        let f = self.frame().await.expect("the server sent its SETTINGS");
        assert_eq!(
            (f.ty, f.flags & ACK, f.stream),
            (SETTINGS, 0, 0),
            "the server's first frame must be a SETTINGS without ACK: {f:?}"
        );
        assert!(f.payload.len().is_multiple_of(6), "{f:?}");
        self.server_settings = f
            .payload
            .chunks(6)
            .map(|c| {
                (
                    u16::from_be_bytes([c[0], c[1]]),
                    u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                )
            })
            .collect();
        self.send(&frame(SETTINGS, ACK, 0, &[])).await;
    }

    fn server_setting(&self, id: u16) -> Option<u32> {
        self.server_settings
            .iter()
            .rev()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| *v)
    }

    async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, self.tcp.write_all(bytes))
            .await
            .expect("the server reads what it is sent")
            .expect("write to the server");
    }

    /// The next frame; `None` once the server has closed the connection.
    async fn frame(&mut self) -> Option<RawFrame> {
        loop {
            if let Some(f) = take_frame(&mut self.buf) {
                return Some(f);
            }
            let read = tokio::time::timeout(WAIT, self.tcp.read_buf(&mut self.buf))
                .await
                .expect("the server sent nothing for 5 s");
            match read {
                Ok(0) | Err(_) => {
                    assert!(
                        self.buf.is_empty(),
                        "connection closed inside a frame: {:?}",
                        self.buf
                    );
                    return None;
                }
                Ok(_) => {}
            }
        }
    }

    /// The next event. A SETTINGS from the server is acknowledged.
    async fn event(&mut self) -> Event {
        let Some(f) = self.frame().await else {
            return Event::Closed;
        };
        let u32_at = |p: &[u8], at: usize| u32::from_be_bytes(p[at..at + 4].try_into().unwrap());
        match f.ty {
            HEADERS => {
                let mut payload = unpadded(&f);
                if f.flags & PRIORITY_FLAG != 0 {
                    payload = &payload[5..];
                }
                let mut block = payload.to_vec();
                let mut flags = f.flags;
                while flags & END_HEADERS == 0 {
                    let c = self
                        .frame()
                        .await
                        .expect("connection closed inside a header block");
                    assert!(
                        c.ty == CONTINUATION && c.stream == f.stream,
                        "expected a CONTINUATION on stream {}: {c:?}",
                        f.stream
                    );
                    block.extend(c.payload);
                    flags = c.flags;
                }
                let fields = self
                    .hpack
                    .decode(&block)
                    .unwrap_or_else(|e| panic!("the server's header block: {e:?}"))
                    .into_iter()
                    .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
                    .collect();
                Event::Headers {
                    stream: f.stream,
                    end_stream: f.flags & END_STREAM != 0,
                    fields,
                }
            }
            DATA => Event::Data {
                stream: f.stream,
                end_stream: f.flags & END_STREAM != 0,
                data: unpadded(&f).to_vec(),
            },
            RST_STREAM => {
                assert_eq!(f.payload.len(), 4, "{f:?}");
                Event::Reset {
                    stream: f.stream,
                    code: u32_at(&f.payload, 0),
                }
            }
            GOAWAY => {
                assert!(f.payload.len() >= 8, "{f:?}");
                Event::GoAway {
                    last_stream: u32_at(&f.payload, 0) & 0x7fff_ffff,
                    code: u32_at(&f.payload, 4),
                    debug: String::from_utf8_lossy(&f.payload[8..]).into_owned(),
                }
            }
            PING => Event::Ping {
                ack: f.flags & ACK != 0,
                opaque: f.payload,
            },
            SETTINGS => {
                let ack = f.flags & ACK != 0;
                if !ack {
                    self.send(&frame(SETTINGS, ACK, 0, &[])).await;
                }
                Event::Settings { ack }
            }
            WINDOW_UPDATE => {
                assert_eq!(f.payload.len(), 4, "{f:?}");
                let increment = u32_at(&f.payload, 0) & 0x7fff_ffff;
                assert_ne!(increment, 0, "the server sent a WINDOW_UPDATE of 0: {f:?}");
                Event::WindowUpdate {
                    stream: f.stream,
                    increment,
                }
            }
            ty => Event::Other {
                ty,
                stream: f.stream,
            },
        }
    }

    /// Reads until every one of `streams` has ended (END_STREAM or RST_STREAM), first taking
    /// `seen` (events read before); other events go to `stray`. Panics if the connection ends.
    async fn answers_after(&mut self, streams: &[u32], seen: Vec<Event>) -> BTreeMap<u32, Answer> {
        let mut out: BTreeMap<u32, Answer> =
            streams.iter().map(|s| (*s, Answer::default())).collect();
        let mut seen = seen.into_iter();
        while out.values().any(|a| !a.done) {
            let event = match seen.next() {
                Some(event) => event,
                None => self.event().await,
            };
            if matches!(event, Event::GoAway { .. } | Event::Closed) {
                panic!("the connection ended while waiting for streams {streams:?}: {event:?}");
            }
            match event.stream().and_then(|s| out.get_mut(&s).map(|a| (s, a))) {
                Some((stream, answer)) => answer.record(stream, event),
                None => self.stray.push(event),
            }
        }
        out
    }

    async fn answers(&mut self, streams: &[u32]) -> BTreeMap<u32, Answer> {
        self.answers_after(streams, Vec::new()).await
    }

    async fn answer(&mut self, stream: u32) -> Answer {
        self.answers(&[stream]).await.remove(&stream).unwrap()
    }

    /// Sends a PING and reads until its ACK: the events read before it.
    async fn ping_round_trip(&mut self, opaque: [u8; 8]) -> Vec<Event> {
        self.send(&ping(opaque)).await;
        self.until_ping_ack(opaque).await
    }

    async fn until_ping_ack(&mut self, opaque: [u8; 8]) -> Vec<Event> {
        let mut seen = Vec::new();
        loop {
            match self.event().await {
                Event::Ping {
                    ack: true,
                    opaque: o,
                } if o == opaque => return seen,
                e @ (Event::GoAway { .. } | Event::Closed) => {
                    panic!("the connection ended before the PING ACK: {e:?} after {seen:?}")
                }
                e => seen.push(e),
            }
        }
    }

    /// A whole `ShouldRateLimit` call on `stream`, answered OK.
    async fn call_ok(&mut self, stream: u32) {
        self.send(&rls_call(stream)).await;
        let a = self.answer(stream).await;
        assert_rls_ok(stream, &a);
    }

    /// Reads until a GOAWAY, whose code must be one of `codes`, then until the server closes
    /// the connection.
    async fn expect_goaway(&mut self, codes: &[u32], what: &str) {
        loop {
            match self.event().await {
                Event::GoAway {
                    last_stream,
                    code,
                    debug,
                } => {
                    assert!(
                        codes.contains(&code),
                        "{what}: GOAWAY {code:#x} ({debug:?}), expected one of {codes:x?}"
                    );
                    // The last stream it names is one the client opened (§6.8), or none.
                    assert!(
                        last_stream == 0 || last_stream % 2 == 1,
                        "{what}: GOAWAY names server stream {last_stream}"
                    );
                    break;
                }
                Event::Closed => panic!("{what}: connection closed without a GOAWAY"),
                _ => {}
            }
        }
        self.expect_closed().await;
    }

    /// Reads until the server closes the connection.
    async fn expect_closed(&mut self) {
        while !matches!(self.event().await, Event::Closed) {}
    }
}

/// Opens a connection, sends `bytes`, and expects the connection error `codes` for it.
async fn connection_error(addr: SocketAddr, bytes: &[u8], codes: &[u32], what: &str) {
    let mut conn = Conn::open(addr).await;
    conn.send(bytes).await;
    conn.expect_goaway(codes, what).await;
}

// ---------------------------------------------------------------------------------------------
// The test client's own parts.

/// The Huffman code built from the lengths is HPACK's: an independent decoder (fluke-hpack's)
/// reads back every octet, and RFC 7541 C.4.1's example comes out as printed there.
#[test]
fn huffman_codes_round_trip_through_an_independent_decoder() {
    let all: Vec<u8> = (0..=255).collect();
    let mut decoder = fluke_hpack::huffman::HuffmanDecoder::new();
    assert_eq!(decoder.decode(&huffman(&all)).unwrap(), all);
    for s in ["", "a", "trailers", RLS, "application/grpc"] {
        assert_eq!(
            decoder.decode(&huffman(s.as_bytes())).unwrap(),
            s.as_bytes()
        );
    }
    assert_eq!(
        huffman(b"www.example.com"),
        [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Connection preface and SETTINGS (RFC 9113 §3.4, §6.5, §6.7).

/// The server's first frame is a SETTINGS; it acknowledges ours; a PING comes back as a PING
/// ACK with the same 8 bytes.
async fn check_preface_and_settings_exchange(addr: SocketAddr) {
    let mut conn = Conn::raw(addr).await;
    let mut hello = PREFACE.to_vec();
    hello.extend(settings(&[
        (SETTINGS_ENABLE_PUSH, 0),
        (SETTINGS_MAX_CONCURRENT_STREAMS, 100),
    ]));
    conn.send(&hello).await;
    conn.server_preface().await;
    for (id, value) in conn.server_settings.clone() {
        match id {
            SETTINGS_ENABLE_PUSH => assert!(value <= 1, "ENABLE_PUSH {value}"),
            SETTINGS_INITIAL_WINDOW_SIZE => assert!(value <= 0x7fff_ffff),
            SETTINGS_MAX_FRAME_SIZE => assert!((16_384..=16_777_215).contains(&value)),
            _ => {}
        }
    }
    // Our SETTINGS are acknowledged (once), with an empty payload.
    loop {
        match conn.event().await {
            Event::Settings { ack: true } => break,
            e @ (Event::Headers { .. }
            | Event::Data { .. }
            | Event::Reset { .. }
            | Event::Ping { .. }
            | Event::GoAway { .. }
            | Event::Closed) => panic!("before the SETTINGS ACK: {e:?}"),
            _ => {}
        }
    }
    let opaque = *b"\x01\x02pong\xfe\xff";
    let before = conn.ping_round_trip(opaque).await;
    assert!(
        before
            .iter()
            .all(|e| matches!(e, Event::WindowUpdate { stream: 0, .. })),
        "unexpected frames: {before:?}"
    );
    // The connection still serves a call.
    conn.call_ok(1).await;
}

// ---------------------------------------------------------------------------------------------
// 2, 3. Unary calls, their frames split in legal ways (RFC 9113 §6.1, §6.2, §6.10, §8.1).

async fn check_a_unary_call_is_answered(addr: SocketAddr) {
    let mut conn = Conn::open(addr).await;
    conn.send(&rls_call(1)).await;
    let a = conn.answer(1).await;
    assert_rls_ok(1, &a);
    // And another stream on the same connection.
    conn.call_ok(3).await;
}

/// The message in two DATA frames, sent in two writes.
async fn check_a_message_over_two_data_frames(addr: SocketAddr) {
    let mut conn = Conn::open(addr).await;
    let body = rls_body(1);
    let (first, second) = body.split_at(7);
    let mut bytes = header_frames(1, &request_block(RLS), false, DEFAULT_MAX_FRAME);
    bytes.extend(data(1, 0, first));
    conn.send(&bytes).await;
    tokio::task::yield_now().await;
    conn.send(&data(1, END_STREAM, second)).await;
    let a = conn.answer(1).await;
    assert_rls_ok(1, &a);
}

/// The whole message in one DATA frame, then an empty DATA frame ending the stream.
async fn check_a_message_then_an_empty_data_frame_ending_the_stream(addr: SocketAddr) {
    let mut conn = Conn::open(addr).await;
    let mut bytes = header_frames(1, &request_block(RLS), false, DEFAULT_MAX_FRAME);
    bytes.extend(data(1, 0, &rls_body(1)));
    conn.send(&bytes).await;
    tokio::task::yield_now().await;
    conn.send(&data(1, END_STREAM, &[])).await;
    let a = conn.answer(1).await;
    assert_rls_ok(1, &a);
}

/// A header block in HEADERS and two CONTINUATION frames, cut inside its literals.
async fn check_headers_with_continuation(addr: SocketAddr) {
    let mut conn = Conn::open(addr).await;
    let block = request_block(RLS);
    let (a, rest) = block.split_at(5);
    let (b, c) = rest.split_at(rest.len() / 2);
    let mut bytes = frame(HEADERS, 0, 1, a);
    bytes.extend(frame(CONTINUATION, 0, 1, b));
    bytes.extend(frame(CONTINUATION, END_HEADERS, 1, c));
    bytes.extend(data(1, END_STREAM, &rls_body(1)));
    conn.send(&bytes).await;
    let answer = conn.answer(1).await;
    assert_rls_ok(1, &answer);
    // END_STREAM on the HEADERS frame of a split block (the body is then empty: the call is
    // answered, as an error, once the block is whole).
    let block = request_block(RLS);
    let (a, b) = block.split_at(block.len() / 2);
    let mut bytes = frame(HEADERS, END_STREAM, 3, a);
    bytes.extend(frame(CONTINUATION, END_HEADERS, 3, b));
    conn.send(&bytes).await;
    let answer = conn.answer(3).await;
    assert_eq!(answer.header(":status"), Some("200"), "{answer:?}");
    assert_eq!(answer.trailer("grpc-status"), Some("3"), "{answer:?}");
}

// ---------------------------------------------------------------------------------------------
// 4. Pipelining, HPACK dynamic table and Huffman from the client (RFC 7541).

/// 200 calls on one connection, sent in batches as large as the server's
/// MAX_CONCURRENT_STREAMS allows, their headers indexed and Huffman-coded: each stream gets
/// exactly one complete answer.
async fn check_many_calls_pipelined_with_indexed_huffman_headers(addr: SocketAddr) {
    const CALLS: u32 = 200;
    let mut conn = Conn::open(addr).await;
    let batch = conn
        .server_setting(SETTINGS_MAX_CONCURRENT_STREAMS)
        .unwrap_or(CALLS)
        .min(CALLS);
    assert!(batch > 0, "the server allows no stream");
    let mut encoder = IndexingEncoder::new();
    // What the server's decoder must make of our blocks.
    let mut mirror = fluke_hpack::Decoder::new();
    let mut next = 0;
    while next < CALLS {
        let mut bytes = Vec::new();
        let mut streams = Vec::new();
        for i in next..(next + batch).min(CALLS) {
            let stream = 2 * i + 1;
            let call = i.to_string();
            let fields = request_fields(
                RLS,
                &[
                    ("user-agent", "conformance/1.0"),
                    ("x-conformance", "hpack-dynamic-table"),
                    ("x-call", &call),
                ],
            );
            let block = encoder.encode(&fields);
            let decoded = mirror.decode(&block).unwrap();
            let expected: Vec<(Vec<u8>, Vec<u8>)> = fields
                .iter()
                .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect();
            assert_eq!(decoded, expected, "the test's own encoder");
            bytes.extend(header_frames(stream, &block, false, DEFAULT_MAX_FRAME));
            bytes.extend(data(stream, END_STREAM, &rls_body(i)));
            streams.push(stream);
        }
        conn.send(&bytes).await;
        let answers = conn.answers(&streams).await;
        for (stream, a) in &answers {
            assert_rls_ok(*stream, a);
            assert_eq!(a.data_frames, 1, "stream {stream}: {a:?}");
        }
        next += batch;
    }
    // The dynamic table was used: from the second call on, te, x-conformance and x-call's
    // name come from it.
    let refs = usize::try_from(3 * (CALLS - 1)).unwrap();
    assert_eq!(encoder.dynamic_refs, refs, "the test's own encoder");
    // Nothing else came for any stream.
    let more = conn.ping_round_trip(*b"pipeline").await;
    let stray: Vec<&Event> = conn
        .stray
        .iter()
        .chain(&more)
        .filter(|e| e.stream().is_some())
        .collect();
    assert!(stray.is_empty(), "frames for no open call: {stray:?}");
}

// ---------------------------------------------------------------------------------------------
// 5. Flow control (RFC 9113 §5.2, §6.9).

/// With SETTINGS_INITIAL_WINDOW_SIZE = 0 the response's DATA waits for our WINDOW_UPDATE on its
/// stream; then the message and the trailers arrive.
async fn check_response_data_waits_for_the_stream_window(addr: SocketAddr) {
    let mut conn = Conn::open_with(addr, &[(SETTINGS_INITIAL_WINDOW_SIZE, 0)]).await;
    let mut bytes = rls_call(1);
    bytes.extend(ping(*b"flowctl1"));
    conn.send(&bytes).await;
    // The PING comes after the call, so whatever the server sends for the call before the PING
    // ACK was sent while the stream's window was 0: no DATA (the HEADERS may come or not).
    let seen = conn.until_ping_ack(*b"flowctl1").await;
    let stream_events: Vec<Event> = seen.into_iter().filter(|e| e.stream().is_some()).collect();
    for e in &stream_events {
        match e {
            Event::Headers {
                stream: 1,
                end_stream: false,
                ..
            } => {}
            other => panic!("with a window of 0, only the response HEADERS may come: {other:?}"),
        }
    }
    // A second round trip, for a server that queues the answer a little later: still no DATA.
    let seen = conn.ping_round_trip(*b"flowctl2").await;
    let mut stream_events: Vec<Event> = stream_events
        .into_iter()
        .chain(seen.into_iter().filter(|e| e.stream().is_some()))
        .collect();
    assert!(
        !stream_events
            .iter()
            .any(|e| matches!(e, Event::Data { .. } | Event::Reset { .. })),
        "DATA or RST_STREAM with a window of 0: {stream_events:?}"
    );
    conn.send(&window_update(1, 65_535)).await;
    let a = conn
        .answers_after(&[1], std::mem::take(&mut stream_events))
        .await
        .remove(&1)
        .unwrap();
    assert_rls_ok(1, &a);
}

// ---------------------------------------------------------------------------------------------
// 6. Padding and priority (RFC 9113 §6.1, §6.2, §6.3).

async fn check_padded_and_prioritised_frames(addr: SocketAddr) {
    let mut conn = Conn::open(addr).await;
    // Stream 1: a PRIORITY frame first, then HEADERS with PADDED and PRIORITY, DATA padded.
    let mut bytes = frame(PRIORITY, 0, 1, &[0, 0, 0, 0, 16]);
    let mut headers = vec![7u8];
    headers.extend_from_slice(&0u32.to_be_bytes());
    headers.push(200);
    headers.extend(request_block(RLS));
    headers.extend_from_slice(&[0; 7]);
    bytes.extend(frame(
        HEADERS,
        END_HEADERS | PADDED | PRIORITY_FLAG,
        1,
        &headers,
    ));
    let mut body = vec![10u8];
    body.extend(rls_body(1));
    body.extend_from_slice(&[0; 10]);
    bytes.extend(data(1, END_STREAM | PADDED, &body));
    // Stream 3: padding of length 0, and an exclusive dependency on stream 1.
    let mut headers = vec![0u8];
    headers.extend_from_slice(&(0x8000_0000u32 | 1).to_be_bytes());
    headers.push(0);
    headers.extend(request_block(RLS));
    bytes.extend(frame(
        HEADERS,
        END_HEADERS | PADDED | PRIORITY_FLAG,
        3,
        &headers,
    ));
    let mut body = vec![0u8];
    body.extend(rls_body(3));
    bytes.extend(data(3, END_STREAM | PADDED, &body));
    // Stream 5: the message unpadded, then a DATA frame of padding only (the largest padding
    // allowed: all of the payload but the Pad Length octet) ending the stream.
    bytes.extend(header_frames(
        5,
        &request_block(RLS),
        false,
        DEFAULT_MAX_FRAME,
    ));
    bytes.extend(data(5, 0, &rls_body(5)));
    let mut only_padding = vec![20u8];
    only_padding.extend_from_slice(&[0; 20]);
    bytes.extend(data(5, END_STREAM | PADDED, &only_padding));
    conn.send(&bytes).await;
    let answers = conn.answers(&[1, 3, 5]).await;
    for (stream, a) in &answers {
        assert_rls_ok(*stream, a);
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Connection errors: GOAWAY with the RFC's code, then the connection is closed
// (RFC 9113 §5.4.1).

/// Not the client preface: the connection is closed (a GOAWAY, if any, says PROTOCOL_ERROR).
async fn check_a_bad_client_preface(addr: SocketAddr) {
    let mut conn = Conn::raw(addr).await;
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n".to_vec();
    bytes.extend(settings(&[]));
    conn.send(&bytes).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, conn.tcp.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the server kept a connection with a bad preface open"
    );
    while let Some(f) = take_frame(&mut buf) {
        if f.ty == GOAWAY {
            let code = u32::from_be_bytes(f.payload[4..8].try_into().unwrap());
            assert_eq!(code, PROTOCOL_ERROR, "{f:?}");
        }
    }
}

async fn check_headers_on_stream_zero(addr: SocketAddr) {
    let bytes = frame(HEADERS, END_HEADERS | END_STREAM, 0, &request_block(RLS));
    connection_error(addr, &bytes, &[PROTOCOL_ERROR], "HEADERS on stream 0").await;
}

async fn check_an_even_stream_id(addr: SocketAddr) {
    let bytes = rls_call(2);
    connection_error(addr, &bytes, &[PROTOCOL_ERROR], "HEADERS on stream 2").await;
}

/// A new stream whose id is below one already used (§5.1.1).
async fn check_stream_ids_going_backwards(addr: SocketAddr) {
    let mut conn = Conn::open(addr).await;
    conn.call_ok(3).await;
    conn.send(&rls_call(1)).await;
    conn.expect_goaway(&[PROTOCOL_ERROR, STREAM_CLOSED], "stream 1 after stream 3")
        .await;
}

/// While a header block is open only its CONTINUATIONs may come (§6.10); a CONTINUATION with no
/// open block is as wrong.
async fn check_another_frame_inside_a_header_block(addr: SocketAddr) {
    let block = request_block(RLS);
    let (a, b) = block.split_at(10);
    let mut ping_inside = frame(HEADERS, 0, 1, a);
    ping_inside.extend(ping(*b"inblock!"));
    ping_inside.extend(frame(CONTINUATION, END_HEADERS, 1, b));
    let mut other_stream = frame(HEADERS, 0, 1, a);
    other_stream.extend(frame(CONTINUATION, END_HEADERS, 3, b));
    let mut data_inside = frame(HEADERS, 0, 1, a);
    data_inside.extend(data(1, END_STREAM, &rls_body(1)));
    let lone = frame(CONTINUATION, END_HEADERS, 1, &block);
    for (bytes, what) in [
        (ping_inside, "PING inside a header block"),
        (other_stream, "CONTINUATION of another stream"),
        (data_inside, "DATA inside a header block"),
        (lone, "CONTINUATION without HEADERS"),
    ] {
        connection_error(addr, &bytes, &[PROTOCOL_ERROR], what).await;
    }
}

async fn check_a_settings_frame_of_bad_length(addr: SocketAddr) {
    let bytes = frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff, 0]);
    connection_error(addr, &bytes, &[FRAME_SIZE_ERROR], "SETTINGS of 7 bytes").await;
    let bytes = frame(SETTINGS, ACK, 0, &[0, 4, 0, 0, 0xff, 0xff]);
    connection_error(
        addr,
        &bytes,
        &[FRAME_SIZE_ERROR],
        "SETTINGS ACK with a payload",
    )
    .await;
}

/// Setting values out of range (§6.5.2): PROTOCOL_ERROR.
async fn check_settings_values_out_of_range(addr: SocketAddr) {
    for (pair, what) in [
        ((SETTINGS_ENABLE_PUSH, 2), "SETTINGS_ENABLE_PUSH 2"),
        (
            (SETTINGS_MAX_FRAME_SIZE, 16_383),
            "SETTINGS_MAX_FRAME_SIZE 16383",
        ),
        (
            (SETTINGS_MAX_FRAME_SIZE, 1 << 24),
            "SETTINGS_MAX_FRAME_SIZE 2^24",
        ),
    ] {
        connection_error(addr, &settings(&[pair]), &[PROTOCOL_ERROR], what).await;
    }
}

/// SETTINGS_INITIAL_WINDOW_SIZE above 2^31 - 1: FLOW_CONTROL_ERROR (§6.5.2).
async fn check_an_initial_window_size_over_the_maximum(addr: SocketAddr) {
    let bytes = settings(&[(SETTINGS_INITIAL_WINDOW_SIZE, 0x8000_0000)]);
    let what = "SETTINGS_INITIAL_WINDOW_SIZE 2^31";
    connection_error(addr, &bytes, &[FLOW_CONTROL_ERROR], what).await;
}

async fn check_a_ping_of_bad_length(addr: SocketAddr) {
    let bytes = frame(PING, 0, 0, &[1, 2, 3, 4, 5, 6, 7]);
    connection_error(addr, &bytes, &[FRAME_SIZE_ERROR], "PING of 7 bytes").await;
}

async fn check_a_zero_window_update_on_the_connection(addr: SocketAddr) {
    let bytes = window_update(0, 0);
    connection_error(
        addr,
        &bytes,
        &[PROTOCOL_ERROR],
        "WINDOW_UPDATE 0 on stream 0",
    )
    .await;
}

/// A HEADERS frame one byte over the server's SETTINGS_MAX_FRAME_SIZE: a frame carrying a
/// field block, so a connection error (§4.2).
async fn check_a_frame_over_the_max_frame_size(addr: SocketAddr) {
    let mut conn = Conn::open(addr).await;
    let max = conn
        .server_setting(SETTINGS_MAX_FRAME_SIZE)
        .map_or(DEFAULT_MAX_FRAME, |v| usize::try_from(v).unwrap());
    let target = max + 1;
    let base = request_block(RLS);
    let mut pad = target - base.len() - 20;
    let block = loop {
        let mut block = base.clone();
        literal(&mut block, "x-pad", &"a".repeat(pad));
        if block.len() >= target {
            break block;
        }
        pad += 1;
    };
    assert_eq!(block.len(), target);
    conn.send(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &block))
        .await;
    conn.expect_goaway(
        &[FRAME_SIZE_ERROR],
        "a HEADERS frame over the max frame size",
    )
    .await;
}

/// An indexed field of index 0 (RFC 7541 §6.1): a decoding error, COMPRESSION_ERROR (§4.3).
async fn check_a_garbage_hpack_block(addr: SocketAddr) {
    let bytes = frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0x80]);
    connection_error(addr, &bytes, &[COMPRESSION_ERROR], "HPACK index 0").await;
    // An index past the dynamic table.
    let bytes = frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0xff, 0x80, 0x01]);
    connection_error(addr, &bytes, &[COMPRESSION_ERROR], "HPACK index 254").await;
}

/// A client cannot push (§8.4).
async fn check_a_push_promise_from_the_client(addr: SocketAddr) {
    let mut bytes = header_frames(1, &request_block(RLS), false, DEFAULT_MAX_FRAME);
    let mut promise = 2u32.to_be_bytes().to_vec();
    promise.extend(request_block(RLS));
    bytes.extend(frame(PUSH_PROMISE, END_HEADERS, 1, &promise));
    connection_error(
        addr,
        &bytes,
        &[PROTOCOL_ERROR],
        "PUSH_PROMISE from a client",
    )
    .await;
}

async fn check_data_on_stream_zero(addr: SocketAddr) {
    let bytes = data(0, END_STREAM, b"hello");
    connection_error(addr, &bytes, &[PROTOCOL_ERROR], "DATA on stream 0").await;
}

/// Padding as long as the rest of the payload (§6.1).
async fn check_padding_longer_than_the_frame(addr: SocketAddr) {
    let mut bytes = header_frames(1, &request_block(RLS), false, DEFAULT_MAX_FRAME);
    let body = rls_body(1);
    // Pad Length counts from the frame payload's start: the payload's length or more is wrong.
    let mut padded = vec![u8::try_from(body.len() + 1).unwrap()];
    padded.extend(&body);
    bytes.extend(data(1, END_STREAM | PADDED, &padded));
    connection_error(addr, &bytes, &[PROTOCOL_ERROR], "DATA padding too long").await;
}

/// RST_STREAM for a stream never opened (§6.4).
async fn check_rst_stream_on_an_idle_stream(addr: SocketAddr) {
    let bytes = rst_stream(5, 0x8);
    connection_error(
        addr,
        &bytes,
        &[PROTOCOL_ERROR],
        "RST_STREAM on idle stream 5",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 8. Stream errors: the stream ends, the connection carries on (RFC 9113 §5.4.2).

/// The client resets a call mid-body: nothing comes back for it (no RST_STREAM answering a
/// RST_STREAM, §5.4.2), and the next call is answered.
async fn check_a_reset_stream_leaves_the_connection_usable(addr: SocketAddr) {
    let mut conn = Conn::open(addr).await;
    let mut bytes = header_frames(1, &request_block(RLS), false, DEFAULT_MAX_FRAME);
    bytes.extend(data(1, 0, &rls_body(1)[..4]));
    bytes.extend(rst_stream(1, 0x8));
    conn.send(&bytes).await;
    conn.call_ok(3).await;
    let more = conn.ping_round_trip(*b"afterrst").await;
    let for_1: Vec<&Event> = conn
        .stray
        .iter()
        .chain(&more)
        .filter(|e| e.stream() == Some(1))
        .collect();
    assert!(for_1.is_empty(), "frames for the reset stream: {for_1:?}");
}

/// DATA after the client ended the stream: STREAM_CLOSED, as a stream error (RST_STREAM) or a
/// connection error (GOAWAY) (§5.1, §6.1). After a stream error the connection serves calls.
async fn check_data_on_a_closed_stream(addr: SocketAddr) {
    let mut conn = Conn::open(addr).await;
    let mut bytes = rls_call(1);
    bytes.extend(data(1, END_STREAM, &rls_body(1)));
    conn.send(&bytes).await;
    loop {
        match conn.event().await {
            Event::Reset { stream: 1, code } => {
                assert_eq!(code, STREAM_CLOSED, "RST_STREAM of stream 1");
                break;
            }
            Event::GoAway { code, .. } => {
                assert_eq!(code, STREAM_CLOSED, "GOAWAY");
                conn.expect_closed().await;
                return;
            }
            Event::Closed => panic!("closed without GOAWAY"),
            _ => {}
        }
    }
    conn.call_ok(3).await;
}

/// Frames of an unknown type are ignored, on stream 0 and on a call's stream (§4.1, §5.5).
async fn check_unknown_frame_types_are_ignored(addr: SocketAddr) {
    let mut conn = Conn::open(addr).await;
    let mut bytes = frame(0x20, 0xff, 0, b"extension");
    bytes.extend(header_frames(
        1,
        &request_block(RLS),
        false,
        DEFAULT_MAX_FRAME,
    ));
    bytes.extend(frame(0xfa, 0x01, 1, &[1, 2, 3]));
    bytes.extend(data(1, END_STREAM, &rls_body(1)));
    bytes.extend(frame(0x20, 0, 0, &[]));
    conn.send(&bytes).await;
    let a = conn.answer(1).await;
    assert_rls_ok(1, &a);
    conn.call_ok(3).await;
}

/// WINDOW_UPDATE of 0 on an open stream: RST_STREAM PROTOCOL_ERROR for that stream (§6.9).
async fn check_a_zero_window_update_on_a_stream(addr: SocketAddr) {
    let mut conn = Conn::open(addr).await;
    let mut bytes = header_frames(1, &request_block(RLS), false, DEFAULT_MAX_FRAME);
    bytes.extend(window_update(1, 0));
    conn.send(&bytes).await;
    let a = conn.answer(1).await;
    assert_eq!(a.reset, Some(PROTOCOL_ERROR), "{a:?}");
    conn.call_ok(3).await;
}

/// Sends each request of `cases` (HEADERS, then DATA ending the stream) on a stream of its own,
/// on one connection: each must get a stream error PROTOCOL_ERROR or an HTTP 400 response
/// (§8.1.1), nothing more for that stream (its DATA, arriving after the reset, is discarded:
/// §5.1), and the connection must then answer a well-formed call.
async fn malformed_requests(addr: SocketAddr, cases: Vec<(Vec<(&str, &str)>, &str)>) {
    let body = rls_body(0);
    let mut conn = Conn::open(addr).await;
    let mut stream = 1;
    for (fields, what) in cases {
        let mut bytes = header_frames(stream, &literal_block(&fields), false, DEFAULT_MAX_FRAME);
        bytes.extend(data(stream, END_STREAM, &body));
        conn.send(&bytes).await;
        let event = loop {
            let e = conn.event().await;
            if e.stream().is_some() || matches!(e, Event::GoAway { .. } | Event::Closed) {
                break e;
            }
        };
        match event {
            Event::Reset { stream: s, code } if s == stream => {
                assert_eq!(code, PROTOCOL_ERROR, "{what}: RST_STREAM code");
            }
            Event::Headers {
                stream: s,
                end_stream,
                fields,
            } if s == stream => {
                assert_eq!(field(Some(&fields), ":status"), Some("400"), "{what}");
                if !end_stream {
                    conn.answers_after(&[stream], Vec::new()).await;
                }
            }
            Event::Reset { stream: s, .. } | Event::Headers { stream: s, .. } if s < stream => {
                panic!(
                    "{what}: a frame for stream {s}, which the server reset: frames that arrive \
                     on a stream after its RST_STREAM must be discarded (§5.1)"
                )
            }
            other => panic!("{what}: expected a stream error on stream {stream}, got {other:?}"),
        }
        stream += 2;
    }
    conn.call_ok(stream).await;
}

/// Malformed requests (§8.1.1, §8.2.2, §8.3.1): connection-specific fields, te other than
/// trailers, pseudo-header fields missing, repeated, misplaced or of a response.
async fn check_malformed_requests_get_a_stream_error(addr: SocketAddr) {
    let without = |name: &str| {
        let mut f = request_fields(RLS, &[]);
        f.retain(|(n, _)| *n != name);
        f
    };
    let mut pseudo_after = vec![("content-type", "application/grpc")];
    pseudo_after.extend(request_fields(RLS, &[]).into_iter().take(4));
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            request_fields(RLS, &[("connection", "keep-alive")]),
            "a connection-specific field",
        ),
        (
            request_fields(RLS, &[("te", "gzip")]),
            "te other than trailers",
        ),
        (
            request_fields(RLS, &[(":status", "200")]),
            "a response pseudo-header",
        ),
        (without(":path"), "no :path"),
        (without(":method"), "no :method"),
        (request_fields("", &[]), "an empty :path"),
        (pseudo_after, "a pseudo-header after a regular field"),
        (
            request_fields(RLS, &[(":method", "POST")]),
            "a repeated pseudo-header",
        ),
        (
            request_fields(RLS, &[("content-length", "3")]),
            "content-length other than the body's length",
        ),
    ];
    malformed_requests(addr, cases).await;
}

/// Malformed field names (§8.2.1, §8.3): an uppercase name, an undefined pseudo-header. Also
/// a stream error, not a connection error: the field block decodes (HPACK is fine), only the
/// request is malformed.
async fn check_malformed_field_names_get_a_stream_error(addr: SocketAddr) {
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            request_fields(RLS, &[("X-Upper", "a")]),
            "an uppercase field name",
        ),
        (
            request_fields(RLS, &[(":foo", "bar")]),
            "an undefined pseudo-header",
        ),
    ];
    malformed_requests(addr, cases).await;
}

// ---------------------------------------------------------------------------------------------
// 9. Health beside ShouldRateLimit.

/// `grpc.health.v1.Health/Check` (served by tonic's router) and `ShouldRateLimit` pipelined
/// on one connection.
async fn check_health_check_on_the_same_connection(addr: SocketAddr) {
    let mut conn = Conn::open(addr).await;
    let mut bytes = header_frames(1, &request_block(HEALTH), false, DEFAULT_MAX_FRAME);
    bytes.extend(data(1, END_STREAM, &grpc_frame(&[])));
    bytes.extend(rls_call(3));
    conn.send(&bytes).await;
    let answers = conn.answers(&[1, 3]).await;
    let health = &answers[&1];
    assert_eq!(health.reset, None, "{health:?}");
    assert_eq!(health.header(":status"), Some("200"), "{health:?}");
    assert_eq!(
        health.header("content-type"),
        Some("application/grpc"),
        "{health:?}"
    );
    let response =
        tonic_health::pb::HealthCheckResponse::decode(grpc_message(&health.data)).unwrap();
    assert_eq!(
        response.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert_eq!(health.trailer("grpc-status"), Some("0"), "{health:?}");
    assert_rls_ok(3, &answers[&3]);
}

// ---------------------------------------------------------------------------------------------
// 10. GOAWAY from the client (RFC 9113 §6.8).

/// A client's GOAWAY (last stream 0: it accepts no pushed stream) does not cancel the streams
/// it opened: a call whose body is sent after it is answered. Once the client has also closed
/// its side, the server closes the connection.
async fn check_goaway_from_the_client(addr: SocketAddr) {
    let mut conn = Conn::open(addr).await;
    let mut bytes = header_frames(1, &request_block(RLS), false, DEFAULT_MAX_FRAME);
    bytes.extend(goaway(0, NO_ERROR));
    conn.send(&bytes).await;
    conn.send(&data(1, END_STREAM, &rls_body(1))).await;
    let a = conn.answer(1).await;
    assert_rls_ok(1, &a);
    conn.tcp.shutdown().await.unwrap();
    conn.expect_closed().await;
}

// ---------------------------------------------------------------------------------------------
// 11. The bound on a request's header list (SETTINGS_MAX_HEADER_LIST_SIZE, §6.5.2, §10.5.1).

/// A request whose decoded headers pass 16 KiB (one 20 KiB field, over HEADERS and
/// CONTINUATION) is refused: a 431, a gRPC error, a RST_STREAM, or a clean GOAWAY; never
/// left unanswered.
/// If the connection survives, its next call is answered; a new connection is served anyway.
async fn check_oversized_header_block(addr: SocketAddr) {
    let mut conn = Conn::open(addr).await;
    let big = "a".repeat(20 * 1024);
    let block = literal_block(&request_fields(RLS, &[("x-padding", &big)]));
    let mut bytes = header_frames(1, &block, false, DEFAULT_MAX_FRAME);
    assert!(bytes.len() > DEFAULT_MAX_FRAME + 9, "split over two frames");
    bytes.extend(data(1, END_STREAM, &rls_body(1)));
    conn.send(&bytes).await;
    let survived = loop {
        match conn.event().await {
            Event::Headers {
                stream: 1, fields, ..
            } => {
                // HTTP 431, or a gRPC error (any grpc-status but 0: a trailers-only response).
                let status = field(Some(&fields), ":status");
                let grpc_status = field(Some(&fields), "grpc-status");
                assert!(
                    status == Some("431")
                        || (status == Some("200") && grpc_status.is_some_and(|s| s != "0")),
                    "a response to the oversized request: {fields:?}"
                );
                break true;
            }
            Event::Reset { stream: 1, .. } => break true,
            Event::GoAway { .. } => {
                conn.expect_closed().await;
                break false;
            }
            Event::Closed => panic!("closed without GOAWAY"),
            _ => {}
        }
    };
    if survived {
        conn.call_ok(3).await;
    }
    Conn::open(addr).await.call_ok(1).await;
}
