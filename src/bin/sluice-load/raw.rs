//! `--raw`: calls written as pre-encoded HTTP/2 frames on a bare connection, with no gRPC
//! client, to measure what the server can take when the client is not what limits it.
//!
//! Why: on the two cores of the benchmark machine the generated tonic client costs about three
//! times what the server spends per call, so the server is never the bottleneck and cannot show
//! what a second worker thread buys. Here a call is two frames copied from a template (the
//! header block is encoded once per connection; the message once per client for the hot and
//! clients shapes) and an answer is three frames read where they lie, its header blocks looked
//! up among those already decoded, so the client costs a fraction of the server: ~0.2 µs per
//! call, against ~0.45 µs when it encoded every message and decoded every block.
//!
//! What is checked per answer, less than the default mode: HTTP status 200, `grpc-status: 0`
//! in the trailers, one gRPC message whose `overall_code` (the first field) is OK or
//! OVER_LIMIT. HTTP/2 is kept as RFC 9113 asks of a client: SETTINGS acknowledged, PING
//! answered, the server's stream limit and connection window respected, our own windows
//! given back.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context as _, anyhow, bail};
use hdrhistogram::Histogram;
use sluice::service::http2::frame::{self, Head, flag, kind, setting};
use sluice::service::http2::hpack;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::{Counts, Requests, Shape};

/// One call in flight.
struct Call {
    sent: Instant,
    /// Response headers seen, with status 200.
    headers: bool,
    /// The message's overall code: `Some(over_limit)`.
    outcome: Option<bool>,
}

/// The calls in flight by stream id; ids are sequential, so hashing them is not worth SipHash.
type Calls = HashMap<u32, Call, BuildHasherDefault<frame::StreamIdHasher>>;

/// What a connection needs to run its calls.
pub struct Load<'a> {
    pub addr: SocketAddr,
    pub requests: &'a Requests,
    /// From [`bodies`].
    pub bodies: &'a [Vec<u8>],
    pub counts: &'a Counts,
    pub concurrency: usize,
    pub measure_from: Instant,
    pub end: Instant,
}

/// The gRPC framing of one `ShouldRateLimit` request message, written into `body`.
fn frame_into(request: &impl prost::Message, body: &mut Vec<u8>) {
    body.clear();
    body.extend_from_slice(&[0; 5]);
    // A Vec grows as needed: encoding into it cannot fail.
    let _ = request.encode(body);
    let len = (body.len() - 5) as u32;
    body[1..5].copy_from_slice(&len.to_be_bytes());
}

/// Every distinct request body of a shape that repeats them (one for hot, one per client for
/// clients), framed once and shared by a thread's connections; empty for unique, whose every
/// call is new.
pub fn bodies(requests: &Requests) -> Vec<Vec<u8>> {
    let one = |client: &str| {
        let mut body = Vec::new();
        frame_into(
            &crate::request(&requests.domain, &requests.path, client.to_string()),
            &mut body,
        );
        body
    };
    match requests.shape {
        Shape::Hot => vec![one(crate::HOT_CLIENT)],
        Shape::Clients => requests.clients.iter().map(|c| one(c)).collect(),
        Shape::Unique => Vec::new(),
    }
}

/// Header blocks already decoded, with what they said: the server's encoder uses only the
/// static table and literals it does not index, so every answer carries one of two blocks
/// (headers, trailers). A block is remembered only when the dynamic table was empty before
/// and after it and it does not resize the table: then decoding it depends on its bytes alone,
/// and the same bytes mean the same fields. Decoding was ~10% of the client's time.
#[derive(Default)]
struct Seen(Vec<(Vec<u8>, bool, Option<bool>)>);

/// Blocks remembered: a server answers with two; more means a server that varies them.
const SEEN_BLOCKS: usize = 4;

impl Seen {
    /// `(status 200, grpc-status 0 if present)` of `block`.
    fn decode(
        &mut self,
        decoder: &mut hpack::Decoder,
        block: &[u8],
    ) -> anyhow::Result<(bool, Option<bool>)> {
        if let Some((_, status, grpc)) = self.0.iter().find(|(b, _, _)| b == block) {
            return Ok((*status, *grpc));
        }
        let clean = decoder.table_size() == 0 && block.first().is_none_or(|b| b & 0xe0 != 0x20);
        let (mut status, mut grpc_status) = (false, None);
        decoder
            .decode(block, |name, value| match name {
                b":status" => status = value == b"200",
                b"grpc-status" => grpc_status = Some(value == b"0"),
                _ => {}
            })
            .context("the server's header block does not decode")?;
        if clean && decoder.table_size() == 0 && self.0.len() < SEEN_BLOCKS {
            self.0.push((block.to_vec(), status, grpc_status));
        }
        Ok((status, grpc_status))
    }
}

/// Runs one connection's calls until `end`, recording latencies after `measure_from` into
/// `hist`.
pub async fn run_connection(load: &Load<'_>, hist: &mut Histogram<u64>) -> anyhow::Result<()> {
    let mut tcp = TcpStream::connect(load.addr)
        .await
        .with_context(|| format!("connecting to {}", load.addr))?;
    tcp.set_nodelay(true)?;

    let mut block = Vec::new();
    // `:method: POST` and `:scheme: http` from the static table (indexes 3 and 6).
    block.extend_from_slice(&[0x83, 0x86]);
    let authority = load.addr.to_string();
    for (name, value) in [
        (
            ":path",
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
        ),
        (":authority", authority.as_str()),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        hpack::encode_literal(name.as_bytes(), value.as_bytes(), &mut block);
    }

    let mut out = frame::PREFACE.to_vec();
    // Our windows as large as they go: answers are never held back by us.
    frame::put_settings(
        &mut out,
        &[
            (setting::ENABLE_PUSH, 0),
            (setting::INITIAL_WINDOW_SIZE, frame::MAX_WINDOW as u32),
        ],
    );
    frame::put_window_update(&mut out, 0, frame::MAX_WINDOW as u32 - 65_535);

    let mut decoder = hpack::Decoder::new(4096);
    let mut seen = Seen::default();
    let mut calls: Calls =
        HashMap::with_capacity_and_hasher(load.concurrency * 2, Default::default());
    let mut fresh = Vec::new();
    let mut next_id = 1u32;
    // Until the server's SETTINGS arrive, its limits are the protocol's defaults.
    let mut max_streams = usize::MAX;
    let mut send_window: i64 = 65_535;
    let mut received: u64 = 0;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut start, mut held) = (0usize, 0usize);
    let mut block_buf: Vec<u8> = Vec::new();
    let mut continuing: Option<(u32, bool)> = None;

    loop {
        // Keep `concurrency` calls in flight, within the server's limits, until `end`.
        let now = Instant::now();
        while now < load.end && calls.len() < load.concurrency.min(max_streams) {
            let body = if load.bodies.is_empty() {
                frame_into(&load.requests.next(), &mut fresh);
                fresh.as_slice()
            } else {
                // The clients in turn across every connection, as the default mode takes them.
                let n = load.requests.next.fetch_add(1, Ordering::Relaxed);
                &load.bodies[(n % load.bodies.len() as u64) as usize]
            };
            if (body.len() as i64) > send_window {
                break;
            }
            let id = next_id;
            next_id += 2;
            frame::put_head(&mut out, block.len(), kind::HEADERS, flag::END_HEADERS, id);
            out.extend_from_slice(&block);
            frame::put_head(&mut out, body.len(), kind::DATA, flag::END_STREAM, id);
            out.extend_from_slice(body);
            send_window -= body.len() as i64;
            calls.insert(
                id,
                Call {
                    sent: now,
                    headers: false,
                    outcome: None,
                },
            );
        }
        if !out.is_empty() {
            tcp.write_all(&out).await.context("writing to the server")?;
            out.clear();
        }
        if calls.is_empty() && now >= load.end {
            return Ok(());
        }

        if start > 0 && (held == buf.len() || start == held) {
            buf.copy_within(start..held, 0);
            (start, held) = (0, held - start);
        }
        let n = tcp
            .read(&mut buf[held..])
            .await
            .context("reading from the server")?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        held += n;
        let done = Instant::now();
        while let Some(head) = buf[start..held].first_chunk().map(Head::parse) {
            let Some(payload) =
                buf.get(start + frame::HEAD_LEN..start + frame::HEAD_LEN + head.len)
            else {
                if frame::HEAD_LEN + head.len > buf.len() {
                    bail!("a frame of {} bytes from the server", head.len);
                }
                break;
            };
            match head.kind {
                kind::SETTINGS if !head.has(flag::ACK) => {
                    for entry in payload.chunks_exact(6) {
                        let id = u16::from_be_bytes([entry[0], entry[1]]);
                        let value = frame::be_u32(&entry[2..]).unwrap_or(0);
                        if id == setting::MAX_CONCURRENT_STREAMS {
                            max_streams = value as usize;
                        }
                    }
                    frame::put_head(&mut out, 0, kind::SETTINGS, flag::ACK, 0);
                }
                kind::PING if !head.has(flag::ACK) => {
                    frame::put_head(&mut out, 8, kind::PING, flag::ACK, 0);
                    out.extend_from_slice(payload);
                }
                kind::WINDOW_UPDATE if head.stream == 0 => {
                    send_window +=
                        i64::from(frame::be_u32(payload).unwrap_or(0) & frame::STREAM_MASK);
                }
                kind::GOAWAY => {
                    bail!("the server sent GOAWAY ({})", goaway_reason(payload));
                }
                kind::RST_STREAM if calls.remove(&head.stream).is_some() => {
                    let reason = frame::Reason(frame::be_u32(payload).unwrap_or(0));
                    load.counts
                        .fail(format!("stream reset by the server ({reason})"));
                }
                kind::DATA => {
                    received += head.len as u64;
                    let data = frame::data_content(&head, payload).map_err(|(_, d)| anyhow!(d))?;
                    if let Some(call) = calls.get_mut(&head.stream) {
                        // The message's first field, overall_code (1): OK (1) or OVER_LIMIT (2).
                        call.outcome = match data {
                            [0, _, _, _, _, 0x08, 1, ..] => Some(false),
                            [0, _, _, _, _, 0x08, 2, ..] => Some(true),
                            _ => None,
                        };
                    }
                }
                kind::HEADERS | kind::CONTINUATION => {
                    let (id, end, fragment) = if head.kind == kind::HEADERS {
                        let fragment =
                            frame::header_fragment(&head, payload).map_err(|(_, d)| anyhow!(d))?;
                        block_buf.clear();
                        (head.stream, head.has(flag::END_STREAM), fragment)
                    } else {
                        let (id, end) = continuing.context("CONTINUATION without HEADERS")?;
                        (id, end, payload)
                    };
                    if !head.has(flag::END_HEADERS) {
                        block_buf.extend_from_slice(fragment);
                        continuing = Some((id, end));
                    } else {
                        continuing = None;
                        let whole = if block_buf.is_empty() {
                            fragment
                        } else {
                            block_buf.extend_from_slice(fragment);
                            &block_buf[..]
                        };
                        let (status, grpc_status) = seen.decode(&mut decoder, whole)?;
                        answered(load, hist, &mut calls, id, end, status, grpc_status, done);
                    }
                }
                _ => {}
            }
            start += frame::HEAD_LEN + head.len;
        }
        // Our connection window back, in large steps.
        if received >= 1 << 30 {
            frame::put_window_update(&mut out, 0, received as u32);
            received = 0;
        }
    }
}

/// A header block on stream `id`: the response's headers (`status`), or its trailers, which
/// end the call.
#[allow(clippy::too_many_arguments)]
fn answered(
    load: &Load<'_>,
    hist: &mut Histogram<u64>,
    calls: &mut Calls,
    id: u32,
    end: bool,
    status: bool,
    grpc_status: Option<bool>,
    done: Instant,
) {
    let Some(call) = calls.get_mut(&id) else {
        return;
    };
    if !call.headers {
        call.headers = true;
        if !status {
            calls.remove(&id);
            load.counts.fail("HTTP status other than 200".to_string());
            return;
        }
        if !end {
            return;
        }
    }
    let Some(call) = calls.remove(&id) else {
        return;
    };
    match (grpc_status, call.outcome) {
        (Some(true), Some(over)) => {
            if call.sent < load.measure_from || done > load.end {
                load.counts.warmup_calls.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let us = u64::try_from((done - call.sent).as_micros())
                .unwrap_or(u64::MAX)
                .clamp(1, 60_000_000);
            let _ = hist.record(us);
            let counter = if over {
                &load.counts.over_limit
            } else {
                &load.counts.ok
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        (Some(true), None) => load
            .counts
            .fail("no message, or an overall_code neither OK nor OVER_LIMIT".to_string()),
        _ => load.counts.fail("grpc-status other than 0".to_string()),
    }
}

/// The error code of a GOAWAY payload (last stream, then the code).
fn goaway_reason(payload: &[u8]) -> String {
    frame::be_u32(payload.get(4..).unwrap_or_default()).map_or_else(
        || "no error code".to_string(),
        |c| frame::Reason(c).to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn literal(name: &str, value: &str) -> Vec<u8> {
        let mut b = Vec::new();
        hpack::encode_literal(name.as_bytes(), value.as_bytes(), &mut b);
        b
    }

    /// A block read again from memory says what decoding it said; blocks whose meaning
    /// depends on the dynamic table are decoded every time.
    #[test]
    fn remembered_blocks_are_only_those_that_mean_the_same_every_time() {
        let mut decoder = hpack::Decoder::new(4096);
        let mut seen = Seen::default();
        // `:status: 200` (static index 8) and a literal: remembered.
        let ok = [&[0x88u8][..], &literal("content-type", "application/grpc")].concat();
        assert_eq!(seen.decode(&mut decoder, &ok).unwrap(), (true, None));
        assert_eq!(seen.0.len(), 1);
        assert_eq!(seen.decode(&mut decoder, &ok).unwrap(), (true, None));
        let trailers = literal("grpc-status", "0");
        assert_eq!(
            seen.decode(&mut decoder, &trailers).unwrap(),
            (false, Some(true))
        );
        assert_eq!(
            seen.decode(&mut decoder, &trailers).unwrap(),
            (false, Some(true))
        );
        assert_eq!(seen.0.len(), 2);

        // A table size update first: not remembered.
        let resize = [&[0x3f, 0xe1, 0x1f][..], &literal("grpc-status", "14")].concat();
        assert_eq!(
            seen.decode(&mut decoder, &resize).unwrap(),
            (false, Some(false))
        );
        assert_eq!(seen.0.len(), 2);

        // `grpc-status: 13` with incremental indexing (0x40, new name), then a block that
        // refers to it (index 62, 0xbe): neither may be remembered, since the same bytes
        // would mean another status once the table changes.
        let mut indexed = vec![0x40, 11];
        indexed.extend_from_slice(b"grpc-status");
        indexed.extend_from_slice(&[2, b'1', b'3']);
        assert_eq!(
            seen.decode(&mut decoder, &indexed).unwrap(),
            (false, Some(false))
        );
        assert_eq!(
            seen.decode(&mut decoder, &[0xbe]).unwrap(),
            (false, Some(false))
        );
        assert_eq!(seen.0.len(), 2);
        // And with the table no longer empty, even a clean block is decoded, not remembered.
        let other = literal("grpc-message", "x");
        seen.decode(&mut decoder, &other).unwrap();
        assert_eq!(seen.0.len(), 2);
        // What was remembered before still reads the same.
        assert_eq!(
            seen.decode(&mut decoder, &trailers).unwrap(),
            (false, Some(true))
        );
    }
}
