//! `--raw`: calls written as pre-encoded HTTP/2 frames on a bare connection, with no gRPC
//! client, to measure what the server can take when the client is not what limits it.
//!
//! Why: on the two cores of the benchmark machine the generated tonic client costs about three
//! times what the server spends per call, so the server is never the bottleneck and cannot show
//! what a second worker thread buys. Here a call is two frames copied from a template (the
//! header block is encoded once per connection; the message once for the hot shape) and an
//! answer is three frames read where they lie, so the client costs a fraction of the server.
//!
//! What is checked per answer, less than the default mode: HTTP status 200, `grpc-status: 0`
//! in the trailers, one gRPC message whose `overall_code` (the first field) is OK or
//! OVER_LIMIT. HTTP/2 is kept as RFC 9113 asks of a client: SETTINGS acknowledged, PING
//! answered, the server's stream limit and connection window respected, our own windows
//! given back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Context as _, anyhow, bail};
use hdrhistogram::Histogram;
use prost::Message as _;
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

/// What a connection needs to run its calls.
pub struct Load<'a> {
    pub addr: SocketAddr,
    pub requests: &'a Requests,
    pub counts: &'a Counts,
    pub concurrency: usize,
    pub measure_from: Instant,
    pub end: Instant,
}

/// The gRPC framing of one `ShouldRateLimit` request message.
fn framed(message: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(message);
    body
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
    let hot =
        (load.requests.shape == Shape::Hot).then(|| framed(&load.requests.next().encode_to_vec()));

    let mut out = frame::PREFACE.to_vec();
    // Our windows as large as they go: answers are never held back by us.
    frame::put_head(&mut out, 12, kind::SETTINGS, 0, 0);
    out.extend_from_slice(&setting::ENABLE_PUSH.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&setting::INITIAL_WINDOW_SIZE.to_be_bytes());
    out.extend_from_slice(&(frame::MAX_WINDOW as u32).to_be_bytes());
    frame::put_window_update(&mut out, 0, frame::MAX_WINDOW as u32 - 65_535);

    let mut decoder = hpack::Decoder::new(4096);
    let mut calls: HashMap<u32, Call> = HashMap::with_capacity(load.concurrency * 2);
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
            let owned;
            let body = match &hot {
                Some(body) => body.as_slice(),
                None => {
                    owned = framed(&load.requests.next().encode_to_vec());
                    owned.as_slice()
                }
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
                        let (mut status, mut grpc_status) = (false, None);
                        decoder
                            .decode(whole, |name, value| match name {
                                b":status" => status = value == b"200",
                                b"grpc-status" => grpc_status = Some(value == b"0"),
                                _ => {}
                            })
                            .context("the server's header block does not decode")?;
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
    calls: &mut HashMap<u32, Call>,
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
                load.counts
                    .warmup_calls
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
