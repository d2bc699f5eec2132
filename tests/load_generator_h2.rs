//! `sluice-load`'s own HTTP/2 client (src/bin/sluice-load/client.rs): against both of the
//! server's HTTP/2 implementations, and against a scripted server that uses what a real one
//! rarely does (a small stream limit, tiny windows, CONTINUATION, padding, PING, RST_STREAM,
//! GOAWAY, a protocol violation).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use prost::Message;
use sluice::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use sluice::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use sluice::service::http2::frame::{self, Head, Reason, flag, kind, setting};
use sluice::service::http2::hpack;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Runs sluice-load for 0.3 s against `addr`: exit code, the JSON line, stderr.
async fn run(addr: SocketAddr, shape: &str, connections: &str, concurrency: &str) -> (i32, String) {
    let (code, line, stderr) = short_load(addr, &[], shape, connections, concurrency).await;
    assert!(
        line.starts_with('{'),
        "{shape} {connections}x{concurrency}: no JSON line; last line {line:?}, stderr {stderr:?}"
    );
    (code, line)
}

// ---------------------------------------------------------------------------------------------
// Against the server, on each of its HTTP/2 implementations.

/// A server on benches/load.yaml, its decision listener on the HTTP/2 `http2`.
async fn start(http2: sluice::server::Http2) -> TestServer {
    let cfg =
        sluice::config::parse(include_str!("../benches/load.yaml"), "load.yaml", |_| None).unwrap();
    TestServer::start_setup(
        cfg,
        Setup {
            http2,
            ..Setup::default()
        },
    )
    .await
}

async fn every_shape_without_a_failure(http2: sluice::server::Http2) {
    let srv = start(http2).await;
    // The last keeps more calls in flight on one connection than the native server's
    // MAX_CONCURRENT_STREAMS (1024): the rest wait for streams, they do not fail.
    for (shape, connections, concurrency) in [
        ("hot", "2", "256"),
        ("unique", "2", "256"),
        ("clients", "2", "8"),
        ("hot", "1", "2000"),
    ] {
        let (code, line) = run(srv.addr, shape, connections, concurrency).await;
        let what = format!("{http2:?} {shape} {connections}x{concurrency}: {line}");
        assert_eq!(code, 0, "{what}");
        assert!(json_field(&line, "decisions") > 0.0, "{what}");
        assert_eq!(json_field(&line, "failures"), 0.0, "{what}");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shape_runs_against_the_native_http2() {
    every_shape_without_a_failure(sluice::server::Http2::Native).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shape_runs_against_the_h2_crate() {
    every_shape_without_a_failure(sluice::server::Http2::H2).await;
}

// ---------------------------------------------------------------------------------------------
// Against a scripted server.

/// What the scripted server does beyond answering.
#[derive(Clone, Copy, Default)]
struct Script {
    /// SETTINGS_MAX_CONCURRENT_STREAMS and SETTINGS_INITIAL_WINDOW_SIZE it sends.
    max_streams: u32,
    window: u32,
    /// Resets every n-th call of a connection instead of answering it.
    reset_every: Option<u32>,
    /// After the n-th answer of a connection, GOAWAY with that stream as the last.
    goaway_after: Option<u32>,
    /// After the n-th answer of a connection, a SETTINGS frame on a stream.
    violate_after: Option<u32>,
}

/// What the scripted server saw of the client.
#[derive(Default, Debug)]
struct Seen {
    /// Most streams open at once on any connection.
    max_open: usize,
    answered: u32,
    pings_sent: u32,
    pings_acked: u32,
    settings_acked: bool,
    /// Error codes of the client's GOAWAY frames.
    goaways: Vec<u32>,
    /// Whatever the client did wrong.
    wrong: Vec<String>,
    /// Connections the client has closed, and a permit for each as it closes.
    closed: usize,
    closing: Arc<tokio::sync::Notify>,
}

/// Waits (5 s at most) until the client has closed `n` connections: whatever it sent before
/// closing them, a GOAWAY say, has been read by then.
async fn until_closed(seen: &Mutex<Seen>, n: usize) {
    let closing = seen.lock().unwrap().closing.clone();
    tokio::time::timeout(Duration::from_secs(5), async {
        while seen.lock().unwrap().closed < n {
            closing.notified().await;
        }
    })
    .await
    .expect("the client closes its connections");
}

async fn scripted(script: Script) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                serve_scripted(tcp, script, s.clone()).await;
                let mut seen = s.lock().unwrap();
                seen.closed += 1;
                seen.closing.notify_one();
            });
        }
    });
    (addr, seen)
}

/// A stream of the scripted server.
struct Stream {
    /// What the client may still send on it.
    window: i64,
    ended: bool,
}

/// The reply the scripted server gives every call: a limit matched, OK.
fn reply() -> Vec<u8> {
    let message = RateLimitResponse {
        overall_code: Code::Ok as i32,
        statuses: vec![DescriptorStatus {
            code: Code::Ok as i32,
            current_limit: Some(RateLimit {
                requests_per_unit: 1000,
                unit: 2,
                ..Default::default()
            }),
            limit_remaining: 999,
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let mut framed = vec![0];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    framed
}

async fn serve_scripted(mut tcp: TcpStream, script: Script, seen: Arc<Mutex<Seen>>) {
    let wrong = |what: String| seen.lock().unwrap().wrong.push(what);
    let mut preface = [0; 24];
    if tcp.read_exact(&mut preface).await.is_err() || &preface != frame::PREFACE {
        wrong("no client preface".into());
        return;
    }
    let mut out = Vec::new();
    frame::put_settings(
        &mut out,
        &[
            (setting::MAX_CONCURRENT_STREAMS, script.max_streams),
            (setting::INITIAL_WINDOW_SIZE, script.window),
        ],
    );
    if tcp.write_all(&out).await.is_err() {
        return;
    }
    out.clear();

    let reply = reply();
    let mut decoder = hpack::Decoder::new(4096);
    let mut streams: HashMap<u32, Stream> = HashMap::new();
    let mut ready: Vec<u32> = Vec::new();
    let mut answered = 0u32;
    let mut goaway_last: Option<u32> = None;
    let mut conn_window: i64 = 65_535;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Answer when the client has as many calls ready as it may have streams, or has
        // sent nothing more for a moment.
        let read = if ready.len() as u32 >= script.max_streams {
            None
        } else {
            let mut chunk = vec![0; 64 * 1024];
            match tokio::time::timeout(Duration::from_millis(3), tcp.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => Some(chunk[..n].to_vec()),
                Err(_) => None,
            }
        };
        if let Some(bytes) = read {
            buf.extend_from_slice(&bytes);
            while buf.len() >= 9 {
                let head = Head::parse(buf[..9].try_into().unwrap());
                if buf.len() < 9 + head.len {
                    break;
                }
                let payload: Vec<u8> = buf[9..9 + head.len].to_vec();
                buf.drain(..9 + head.len);
                match head.kind {
                    kind::SETTINGS if head.has(flag::ACK) => {
                        seen.lock().unwrap().settings_acked = true
                    }
                    kind::SETTINGS => {
                        frame::put_head(&mut out, 0, kind::SETTINGS, flag::ACK, 0);
                    }
                    kind::PING if head.has(flag::ACK) => {
                        if payload != b"scripted" {
                            wrong(format!("PING ACK with {payload:?}"));
                        }
                        seen.lock().unwrap().pings_acked += 1;
                    }
                    kind::HEADERS => {
                        if !head.has(flag::END_HEADERS) {
                            wrong("a request header block in CONTINUATION".into());
                        }
                        if goaway_last.is_some_and(|last| head.stream > last) {
                            wrong(format!("stream {} opened after GOAWAY", head.stream));
                        }
                        let mut path = Vec::new();
                        if decoder
                            .decode(&payload, |n, v| {
                                if n == b":path" {
                                    path = v.to_vec();
                                }
                            })
                            .is_err()
                        {
                            wrong("request headers do not decode".into());
                        }
                        if path != b"/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit" {
                            wrong(format!("path {:?}", String::from_utf8_lossy(&path)));
                        }
                        streams.insert(
                            head.stream,
                            Stream {
                                window: i64::from(script.window),
                                ended: head.has(flag::END_STREAM),
                            },
                        );
                        let open = streams.len();
                        let mut s = seen.lock().unwrap();
                        s.max_open = s.max_open.max(open);
                        if open > script.max_streams as usize {
                            s.wrong
                                .push(format!("{open} streams open, limit {}", script.max_streams));
                        }
                    }
                    kind::DATA => {
                        conn_window -= head.len as i64;
                        if conn_window < 0 {
                            wrong("DATA beyond the connection window".into());
                        }
                        let Some(stream) = streams.get_mut(&head.stream) else {
                            wrong(format!("DATA on stream {} not open", head.stream));
                            continue;
                        };
                        stream.window -= head.len as i64;
                        if stream.window < 0 {
                            wrong(format!("DATA beyond stream {}'s window", head.stream));
                        }
                        let n = head.len as u32;
                        if n > 0 {
                            frame::put_window_update(&mut out, 0, n);
                            conn_window += i64::from(n);
                        }
                        if head.has(flag::END_STREAM) {
                            stream.ended = true;
                            ready.push(head.stream);
                        } else if n > 0 {
                            // Give the stream's window back in two steps.
                            for step in [n / 2, n - n / 2] {
                                if step > 0 {
                                    frame::put_window_update(&mut out, head.stream, step);
                                }
                            }
                            stream.window += i64::from(n);
                        }
                    }
                    kind::RST_STREAM => {
                        streams.remove(&head.stream);
                        ready.retain(|&id| id != head.stream);
                    }
                    kind::GOAWAY => {
                        let code = frame::be_u32(payload.get(4..).unwrap_or_default());
                        seen.lock().unwrap().goaways.push(code.unwrap_or(u32::MAX));
                    }
                    _ => {}
                }
            }
        }
        // The answers, each in its own odd shape.
        for id in ready.drain(..) {
            let Some(stream) = streams.remove(&id) else {
                continue;
            };
            if !stream.ended {
                continue;
            }
            answered += 1;
            seen.lock().unwrap().answered += 1;
            if script
                .reset_every
                .is_some_and(|n| answered.is_multiple_of(n))
            {
                frame::put_reset(&mut out, id, Reason::INTERNAL_ERROR);
                continue;
            }
            // Headers: padded HEADERS (with PRIORITY) holding `:status`, then a CONTINUATION.
            let mut first = Vec::new();
            hpack::encode_literal(b":status", b"200", &mut first);
            let mut second = Vec::new();
            hpack::encode_literal(b"content-type", b"application/grpc", &mut second);
            frame::put_head(
                &mut out,
                1 + 5 + first.len() + 3,
                kind::HEADERS,
                flag::PADDED | flag::PRIORITY,
                id,
            );
            out.push(3);
            out.extend_from_slice(&[0, 0, 0, 0, 16]);
            out.extend_from_slice(&first);
            out.extend_from_slice(&[0; 3]);
            if answered.is_multiple_of(4) {
                // A PING between the frames of a response is fine outside a header block.
                frame::put_head(
                    &mut out,
                    second.len(),
                    kind::CONTINUATION,
                    flag::END_HEADERS,
                    id,
                );
                out.extend_from_slice(&second);
                frame::put_head(&mut out, 8, kind::PING, 0, 0);
                out.extend_from_slice(b"scripted");
                seen.lock().unwrap().pings_sent += 1;
            } else {
                frame::put_head(
                    &mut out,
                    second.len(),
                    kind::CONTINUATION,
                    flag::END_HEADERS,
                    id,
                );
                out.extend_from_slice(&second);
            }
            // The message in two DATA frames, the first padded; an unknown frame between.
            let (a, b) = reply.split_at(4);
            frame::put_head(&mut out, 1 + a.len() + 7, kind::DATA, flag::PADDED, id);
            out.push(7);
            out.extend_from_slice(a);
            out.extend_from_slice(&[0; 7]);
            frame::put_head(&mut out, 3, 0xfa, 0, id);
            out.extend_from_slice(b"???");
            frame::put_head(&mut out, b.len(), kind::DATA, 0, id);
            out.extend_from_slice(b);
            // Trailers.
            let mut trailers = Vec::new();
            hpack::encode_literal(b"grpc-status", b"0", &mut trailers);
            frame::put_head(
                &mut out,
                trailers.len(),
                kind::HEADERS,
                flag::END_HEADERS | flag::END_STREAM,
                id,
            );
            out.extend_from_slice(&trailers);
            if script.goaway_after == Some(answered) {
                frame::put_goaway(&mut out, id, Reason::NO_ERROR, b"scripted");
                goaway_last = Some(id);
            }
            if script.violate_after == Some(answered) {
                frame::put_head(&mut out, 0, kind::SETTINGS, 0, 1);
            }
        }
        if !out.is_empty() {
            if tcp.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_wait_for_streams_and_windows_and_read_every_frame_shape() {
    // Two streams at most, and a 7-byte stream window: each request message goes out in
    // 7-byte DATA frames, each waiting for a WINDOW_UPDATE.
    let (addr, seen) = scripted(Script {
        max_streams: 2,
        window: 7,
        ..Script::default()
    })
    .await;
    let (code, line) = run(addr, "hot", "1", "8").await;
    let seen = seen.lock().unwrap();
    assert_eq!(code, 0, "{line} {seen:?}");
    assert_eq!(json_field(&line, "failures"), 0.0, "{line}");
    assert!(json_field(&line, "decisions") > 0.0, "{line}");
    assert!(seen.wrong.is_empty(), "{seen:?}");
    assert_eq!(seen.max_open, 2, "{seen:?}");
    assert!(seen.settings_acked, "{seen:?}");
    assert!(seen.pings_sent > 0, "{seen:?}");
    assert_eq!(seen.pings_acked, seen.pings_sent, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_stream_fails_its_call_only() {
    let (addr, seen) = scripted(Script {
        max_streams: 100,
        window: 65_535,
        reset_every: Some(3),
        ..Script::default()
    })
    .await;
    let (code, line) = run(addr, "hot", "1", "4").await;
    let seen = seen.lock().unwrap();
    assert_eq!(code, 2, "{line}");
    let failures = json_field(&line, "failures");
    let decisions = json_field(&line, "decisions");
    assert!(failures > 0.0 && decisions > failures, "{line}");
    assert!(
        line.contains("reset by the server with INTERNAL_ERROR"),
        "{line}"
    );
    assert!(seen.wrong.is_empty(), "{seen:?}");
    assert!(seen.goaways.is_empty(), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_goaway_no_stream_is_opened_and_calls_fail() {
    let (addr, seen) = scripted(Script {
        max_streams: 100,
        window: 65_535,
        goaway_after: Some(20),
        ..Script::default()
    })
    .await;
    let (code, line) = run(addr, "hot", "1", "4").await;
    let seen = seen.lock().unwrap();
    assert_eq!(code, 2, "{line}");
    assert!(json_field(&line, "decisions") >= 1.0, "{line}");
    assert!(line.contains("GOAWAY (NO_ERROR: scripted)"), "{line}");
    assert!(seen.wrong.is_empty(), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_violation_is_answered_with_goaway_and_fails_the_calls() {
    let (addr, seen) = scripted(Script {
        max_streams: 100,
        window: 65_535,
        violate_after: Some(10),
        ..Script::default()
    })
    .await;
    let (code, line) = run(addr, "hot", "1", "4").await;
    // The probe's connection and the load's: the client's GOAWAY is read before the latter ends.
    until_closed(&seen, 2).await;
    let seen = seen.lock().unwrap();
    assert_eq!(code, 2, "{line}");
    assert!(
        line.contains("HTTP/2 protocol error by the server: PROTOCOL_ERROR: SETTINGS on a stream"),
        "{line}"
    );
    assert_eq!(seen.goaways, [Reason::PROTOCOL_ERROR.0], "{seen:?}");
    assert!(seen.wrong.is_empty(), "{seen:?}");
}
