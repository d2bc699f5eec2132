//! The decision listener's own HTTP/2 against arbitrary frame sequences: whatever a client
//! sends, the connection ends (or waits for more) without panicking, and what it writes is a
//! well-formed sequence of frames. The connection is driven directly
//! (`sluice::service::http2::conn::serve` over an in-memory pipe), so a panic fails the test
//! instead of vanishing with a spawned task as it would in a running server.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use prost::Message;
use sluice::service::endpoint::RlsEndpoint;
use sluice::service::http2::{conn, frame, hpack};
use sluice::store::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RLS: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
const HEALTH: &str = "/grpc.health.v1.Health/Check";

fn endpoint() -> Arc<RlsEndpoint<MemoryStore>> {
    Arc::new(RlsEndpoint::new(default_limiter()))
}

fn put_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    frame::put_head(out, payload.len(), kind, flags, stream);
    out.extend_from_slice(payload);
}

fn request_block(path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "sluice"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        hpack::encode_literal(name.as_bytes(), value.as_bytes(), &mut block);
    }
    block
}

fn rls_body() -> Vec<u8> {
    let message = training("/execute", "10.1.2.3").encode_to_vec();
    let mut body = vec![0];
    body.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&message);
    body
}

/// One frame of a fuzzed sequence: mostly the frames a gRPC client sends, with their fields
/// and flags scrambled, and some wholly arbitrary ones.
#[derive(Debug, Clone)]
enum Step {
    /// A whole call on the next stream: HEADERS, then its message in `split` DATA frames.
    Call {
        split: usize,
        path: bool,
    },
    Headers {
        stream: u32,
        flags: u8,
        path: bool,
        cut: usize,
    },
    Continuation {
        stream: u32,
        flags: u8,
        bytes: Vec<u8>,
    },
    Data {
        stream: u32,
        flags: u8,
        body: bool,
        bytes: Vec<u8>,
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    Settings {
        flags: u8,
        entries: Vec<(u16, u32)>,
    },
    Raw {
        kind: u8,
        flags: u8,
        stream: u32,
        bytes: Vec<u8>,
    },
}

/// Mostly the first odd streams, so that calls open, continue and close; sometimes any.
fn stream_id() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => (0u32..12).prop_map(|i| 2 * i + 1),
        1 => Just(0u32),
        1 => 1u32..14,
        1 => Just(0x7fff_ffff),
    ]
}

/// Mostly the flags a client sets, sometimes any.
fn flags(usual: &'static [u8]) -> impl Strategy<Value = u8> {
    prop_oneof![4 => proptest::sample::select(usual), 1 => any::<u8>()]
}

fn step() -> impl Strategy<Value = Step> {
    use frame::flag::{END_HEADERS, END_STREAM};
    let bytes = proptest::collection::vec(any::<u8>(), 0..48);
    prop_oneof![
        8 => (1usize..4, prop_oneof![4 => Just(true), 1 => Just(false)])
            .prop_map(|(split, path)| Step::Call { split, path }),
        5 => (
            stream_id(),
            flags(&[END_HEADERS, END_HEADERS | END_STREAM, 0]),
            any::<bool>(),
            prop_oneof![3 => Just(1000usize), 1 => 0usize..200],
        )
            .prop_map(|(stream, flags, path, cut)| Step::Headers {
                stream,
                flags,
                path,
                cut
            }),
        1 => (stream_id(), flags(&[END_HEADERS, 0]), bytes.clone()).prop_map(
            |(stream, flags, bytes)| Step::Continuation {
                stream,
                flags,
                bytes
            }
        ),
        5 => (stream_id(), flags(&[END_STREAM, 0]), prop_oneof![3 => Just(true), 1 => Just(false)], bytes.clone())
            .prop_map(|(stream, flags, body, bytes)| Step::Data {
                stream,
                flags,
                body,
                bytes
            }),
        2 => (stream_id(), prop_oneof![3 => 1u32..70_000, 1 => any::<u32>()])
            .prop_map(|(stream, increment)| Step::WindowUpdate { stream, increment }),
        1 => (
            flags(&[0]),
            proptest::collection::vec((1u16..8, prop_oneof![3 => 0u32..70_000, 1 => any::<u32>()]), 0..4)
        )
            .prop_map(|(flags, entries)| Step::Settings { flags, entries }),
        1 => (0u8..12, any::<u8>(), stream_id(), bytes).prop_map(|(kind, flags, stream, bytes)| {
            Step::Raw {
                kind,
                flags,
                stream,
                bytes,
            }
        }),
    ]
}

fn encode(steps: &[Step]) -> Vec<u8> {
    let mut out = frame::PREFACE.to_vec();
    put_frame(&mut out, frame::kind::SETTINGS, 0, 0, &[]);
    let mut next = 1;
    for step in steps {
        match step {
            Step::Call { split, path } => {
                let block = request_block(if *path { RLS } else { HEALTH });
                put_frame(
                    &mut out,
                    frame::kind::HEADERS,
                    frame::flag::END_HEADERS,
                    next,
                    &block,
                );
                let body = rls_body();
                let pieces: Vec<&[u8]> = body.chunks(body.len().div_ceil(*split)).collect();
                for (i, piece) in pieces.iter().enumerate() {
                    let flags = if i + 1 == pieces.len() {
                        frame::flag::END_STREAM
                    } else {
                        0
                    };
                    put_frame(&mut out, frame::kind::DATA, flags, next, piece);
                }
                next += 2;
            }
            Step::Headers {
                stream,
                flags,
                path,
                cut,
            } => {
                let mut block = request_block(if *path { RLS } else { HEALTH });
                // Padded and prioritised flags take bytes of the payload: give them some.
                if flags & frame::flag::PADDED != 0 {
                    block.insert(0, (cut % 4) as u8);
                    block.extend(std::iter::repeat_n(0, cut % 4));
                }
                if flags & frame::flag::PRIORITY != 0 {
                    block.splice(0..0, [0, 0, 0, 1, 16]);
                }
                block.truncate(block.len().min(*cut + 20));
                put_frame(&mut out, frame::kind::HEADERS, *flags, *stream, &block);
            }
            Step::Continuation {
                stream,
                flags,
                bytes,
            } => {
                put_frame(&mut out, frame::kind::CONTINUATION, *flags, *stream, bytes);
            }
            Step::Data {
                stream,
                flags,
                body,
                bytes,
            } => {
                let payload = if *body { rls_body() } else { bytes.clone() };
                put_frame(&mut out, frame::kind::DATA, *flags, *stream, &payload);
            }
            Step::WindowUpdate { stream, increment } => {
                put_frame(
                    &mut out,
                    frame::kind::WINDOW_UPDATE,
                    0,
                    *stream,
                    &increment.to_be_bytes(),
                );
            }
            Step::Settings { flags, entries } => {
                let mut payload = Vec::new();
                for (id, value) in entries {
                    payload.extend_from_slice(&id.to_be_bytes());
                    payload.extend_from_slice(&value.to_be_bytes());
                }
                put_frame(&mut out, frame::kind::SETTINGS, *flags, 0, &payload);
            }
            Step::Raw {
                kind,
                flags,
                stream,
                bytes,
            } => {
                put_frame(&mut out, *kind, *flags, *stream, bytes);
            }
        }
    }
    out
}

/// Checks `out` is whole frames of at most the default frame size, on stream 0 or client
/// (odd) streams.
fn assert_frames(out: &[u8]) {
    let mut rest = out;
    while !rest.is_empty() {
        let head = frame::Head::parse(rest.first_chunk().expect("a whole frame header"));
        assert!(head.len <= 16_384, "frame of {} bytes", head.len);
        assert!(head.stream == 0 || head.stream % 2 == 1, "{head:?}");
        rest = rest
            .get(frame::HEAD_LEN + head.len..)
            .unwrap_or_else(|| panic!("truncated frame {head:?}"));
    }
}

/// Runs one connection over `input` (then the client's end of the pipe is closed) and returns
/// what the server wrote.
fn run(input: Vec<u8>) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(conn::serve(
            server,
            endpoint(),
            tonic::service::Routes::default(),
            std::future::pending(),
        ));
        let (mut read, mut write) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            // The server may stop reading (a connection error): that ends the write early.
            let _ = write.write_all(&input).await;
            let _ = write.shutdown().await;
            write
        });
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut out))
            .await
            .expect("the server ends the connection once the client has")
            .unwrap();
        drop(writer.await.unwrap());
        // Ok or a protocol error: both fine. A panic is not.
        let _ = served.await.expect("the connection did not panic");
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_frame_sequence_ends_cleanly(steps in proptest::collection::vec(step(), 0..24)) {
        let out = run(encode(&steps));
        assert_frames(&out);
    }
}

/// The harness itself: a well-formed call through it is answered (so the property above is
/// not vacuous: its connections do get as far as deciding).
#[test]
fn a_well_formed_call_through_the_harness_is_answered() {
    let steps = [
        Step::Headers {
            stream: 1,
            flags: frame::flag::END_HEADERS,
            path: true,
            cut: 1000,
        },
        Step::Data {
            stream: 1,
            flags: frame::flag::END_STREAM,
            body: true,
            bytes: Vec::new(),
        },
    ];
    let out = run(encode(&steps));
    assert_frames(&out);
    // SETTINGS, WINDOW_UPDATE, SETTINGS ACK, then the answer's HEADERS, DATA and trailers.
    let mut kinds = Vec::new();
    let mut rest = out.as_slice();
    while let Some(head) = rest.first_chunk().map(frame::Head::parse) {
        kinds.push((head.kind, head.stream));
        rest = &rest[frame::HEAD_LEN + head.len..];
    }
    let on_1: Vec<u8> = kinds.iter().filter(|k| k.1 == 1).map(|k| k.0).collect();
    assert_eq!(
        on_1,
        [
            frame::kind::HEADERS,
            frame::kind::DATA,
            frame::kind::HEADERS
        ],
        "{kinds:?}"
    );
}
