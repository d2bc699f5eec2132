//! The decision listener (tonic, with sluice's codec and limits) against requests no
//! well-behaved gRPC client sends: raw HTTP/2 with hand-made gRPC framing, checking the
//! `grpc-status` and `grpc-message` each gets. Framing is tonic's: its statuses follow the gRPC
//! specification (a broken prefix or a missing message is `INTERNAL`); what sluice decides is
//! that malformed protobuf and bad fields are `INVALID_ARGUMENT` naming the field, and that a
//! message over 64 KiB is refused from its prefix. Well-formed calls are covered by
//! tests/rls.rs (tonic client), tests/reflection.rs (grpcurl) and tests/envoy_e2e.rs (Envoy);
//! attacks on the connection by tests/hygiene.rs.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use sluice::proto::envoy::service::ratelimit::v3::RateLimitResponse;

const PATH: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// What came back: HTTP status, content type, grpc-status/grpc-message (from the headers of a
/// trailers-only answer, or from the trailers), and the body.
#[derive(Debug)]
struct Answer {
    http: u16,
    content_type: Option<String>,
    grpc_status: Option<String>,
    grpc_message: Option<String>,
    body: Bytes,
}

/// A bare HTTP/2 connection to the server, for request bodies of type `B`.
async fn connect<B>(srv: &TestServer) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

async fn post(srv: &TestServer, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Answer {
    let mut send = connect(srv).await;
    let mut req = http::Request::post(format!("http://{}{path}", srv.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let get = |name: &str| {
        parts
            .headers
            .get(name)
            .or_else(|| trailers.get(name))
            .map(|v| v.to_str().unwrap().to_string())
    };
    Answer {
        http: parts.status.as_u16(),
        content_type: get("content-type"),
        grpc_status: get("grpc-status"),
        grpc_message: get("grpc-message"),
        body: collected.to_bytes(),
    }
}

/// `message` with the gRPC prefix (flag 0, big-endian length).
fn framed(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// A request body sent frame by frame through a channel (hyper sends a `Full` body in one
/// frame; this one sends one DATA frame per message on the channel).
type Chunked = http_body_util::StreamBody<
    tokio_stream::wrappers::ReceiverStream<Result<http_body::Frame<Bytes>, std::io::Error>>,
>;
type ChunkSender = tokio::sync::mpsc::Sender<Result<http_body::Frame<Bytes>, std::io::Error>>;

/// A `ShouldRateLimit` request whose body is whatever is sent on the returned channel.
fn chunked_call(srv: &TestServer) -> (ChunkSender, http::Request<Chunked>) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let req = http::Request::post(format!("http://{}{PATH}", srv.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap();
    (tx, req)
}

/// Sends `bytes` as one DATA frame on `tx`.
async fn send_chunk(tx: &ChunkSender, bytes: &[u8]) {
    tx.send(Ok(http_body::Frame::data(Bytes::copy_from_slice(bytes))))
        .await
        .unwrap();
}

/// A successful reply's `grpc-status` trailer and its `RateLimitResponse` overall code.
async fn status_and_code(resp: http::Response<hyper::body::Incoming>) -> (Option<String>, i32) {
    let collected = resp.into_body().collect().await.unwrap();
    let status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .map(|v| v.to_str().unwrap().to_string());
    let body = collected.to_bytes();
    let code = body
        .get(5..)
        .and_then(|m| RateLimitResponse::decode(m).ok())
        .map_or(-1, |r| r.overall_code);
    (status, code)
}

fn hot_request() -> Vec<u8> {
    training("/execute", "10.0.0.1").encode_to_vec()
}

#[tokio::test]
async fn a_well_formed_call_gets_one_message_and_status_zero_trailers() {
    let srv = TestServer::start_default().await;
    let a = post(&srv, PATH, &[], framed(&hot_request())).await;
    assert_eq!(a.http, 200);
    assert_eq!(a.content_type.as_deref(), Some("application/grpc"));
    assert_eq!(a.grpc_status.as_deref(), Some("0"));
    assert_eq!(a.body[0], 0, "uncompressed");
    let len = u32::from_be_bytes(a.body[1..5].try_into().unwrap()) as usize;
    assert_eq!(a.body.len(), 5 + len);
    let resp = RateLimitResponse::decode(&a.body[5..]).unwrap();
    assert_eq!(resp.overall_code, 1, "OK");
    assert_eq!(resp.statuses.len(), 1);
    srv.stop().await;
}

#[tokio::test]
async fn a_message_split_over_several_data_frames_is_joined() {
    let srv = TestServer::start_default().await;
    let bytes = framed(&hot_request());
    let mut send = connect(&srv).await;
    let (tx, req) = chunked_call(&srv);
    let pending = tokio::spawn(async move { send.send_request(req).await });
    for chunk in [&bytes[..2], &bytes[2..7], &bytes[7..]] {
        send_chunk(&tx, chunk).await;
    }
    drop(tx);
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(status_and_code(resp).await, (Some("0".into()), 1));
    srv.stop().await;
}

/// A request whose one entry's value is not UTF-8: `domain: "training"`, then a descriptor with
/// the entry `path` = 0xff 0xfe.
fn not_utf8_value() -> Vec<u8> {
    let mut entry = vec![0x0a, 4];
    entry.extend_from_slice(b"path");
    entry.extend_from_slice(&[0x12, 2, 0xff, 0xfe]);
    let mut descriptor = vec![0x0a, entry.len() as u8];
    descriptor.extend_from_slice(&entry);
    let mut request = vec![0x0a, 8];
    request.extend_from_slice(b"training");
    request.push(0x12);
    request.push(descriptor.len() as u8);
    request.extend_from_slice(&descriptor);
    request
}

#[tokio::test]
async fn broken_framing_gets_a_status_naming_the_problem() {
    let srv = TestServer::start_default().await;
    let msg = hot_request();
    let mut compressed = framed(&msg);
    compressed[0] = 1;
    let mut short = framed(&msg);
    short.truncate(short.len() - 1);
    let mut bad_flag = framed(&msg);
    bad_flag[0] = 7;
    let mut huge = vec![0u8];
    huge.extend_from_slice(&(5u32 * 1024 * 1024).to_be_bytes());
    huge.extend_from_slice(&[0u8; 16]);
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("empty body", vec![], "13", "Missing request message"),
        ("three bytes", vec![0, 0, 0], "13", "Unexpected EOF"),
        ("compressed flag", compressed, "13", "compressed-flag"),
        ("bad flag", bad_flag, "13", "invalid compression flag: 7"),
        ("truncated", short, "13", "Unexpected EOF"),
        ("5 MiB declared", huge, "11", "too large"),
        (
            "not protobuf",
            framed(&[0xff, 0xff, 0xff]),
            "3",
            "malformed protobuf",
        ),
        (
            "not UTF-8 in an entry's value",
            framed(&not_utf8_value()),
            "3",
            "malformed protobuf: Entry.value: RateLimitDescriptor.entries: RateLimitRequest.descriptors",
        ),
        (
            "no domain",
            framed(&request("", vec![descriptor(&[("path", "/x")])]).encode_to_vec()),
            "3",
            "domain",
        ),
    ];
    for (what, body, status, message) in cases {
        let a = post(&srv, PATH, &[], body).await;
        assert_eq!(a.grpc_status.as_deref(), Some(status), "{what}: {a:?}");
        let m = a.grpc_message.unwrap_or_default();
        let m = m.replace("%20", " ");
        assert!(
            m.contains(message),
            "{what}: {m:?} should mention {message:?}"
        );
    }
    // A unary call with a second message is answered from the first: tonic reads on to the
    // end of the body and drops the rest (bounded like any body, by the message size).
    let mut two = framed(&msg);
    two.extend(framed(&msg));
    let a = post(&srv, PATH, &[], two).await;
    assert_eq!(a.grpc_status.as_deref(), Some("0"), "two messages: {a:?}");
    // The server is still answering.
    assert_eq!(
        srv.call(training("/execute", "10.0.0.2"))
            .await
            .overall_code,
        1
    );
    srv.stop().await;
}

#[tokio::test]
async fn compressed_requests_and_unknown_methods_are_unimplemented() {
    let srv = TestServer::start_default().await;
    let a = post(
        &srv,
        PATH,
        &[("grpc-encoding", "gzip")],
        framed(&hot_request()),
    )
    .await;
    assert_eq!(a.grpc_status.as_deref(), Some("12"), "{a:?}");
    assert!(a.grpc_message.unwrap_or_default().contains("gzip"));
    let a = post(
        &srv,
        "/envoy.service.ratelimit.v3.RateLimitService/Nope",
        &[],
        framed(&hot_request()),
    )
    .await;
    assert_eq!(a.grpc_status.as_deref(), Some("12"), "{a:?}");
    // identity is no compression at all.
    let a = post(
        &srv,
        PATH,
        &[("grpc-encoding", "identity")],
        framed(&hot_request()),
    )
    .await;
    assert_eq!(a.grpc_status.as_deref(), Some("0"), "{a:?}");
    srv.stop().await;
}

/// Sends one hot call on `send`: its grpc-status and overall code.
async fn call_ok(
    send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    srv: &TestServer,
) -> (Option<String>, i32) {
    let req = http::Request::post(format!("http://{}{PATH}", srv.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(framed(&hot_request()))))
        .unwrap();
    status_and_code(send.send_request(req).await.unwrap()).await
}

/// The decision listener bounds a request's headers at 16 KiB (SETTINGS_MAX_HEADER_LIST_SIZE):
/// a larger header list is refused by h2 with HTTP 431 before any service sees it, and the
/// connection and the server carry on.
#[tokio::test]
async fn oversized_headers_are_refused_and_the_connection_carries_on() {
    let srv = TestServer::start_default().await;
    let mut send = connect::<Full<Bytes>>(&srv).await;
    let req = http::Request::post(format!("http://{}{PATH}", srv.addr))
        .header("content-type", "application/grpc")
        .header("x-padding", "a".repeat(20 * 1024))
        .body(Full::new(Bytes::from(framed(&hot_request()))))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 431, "{resp:?}");
    assert_eq!(call_ok(&mut send, &srv).await, (Some("0".into()), 1));
    srv.stop().await;
}

/// A client that gives up on a call whose body it has not finished sending (RST_STREAM): the
/// server forgets the call, and the same connection's next call is answered.
#[tokio::test]
async fn a_call_reset_mid_body_is_dropped_and_the_connection_carries_on() {
    let srv = TestServer::start_default().await;
    let bytes = framed(&hot_request());
    let mut send = connect::<Chunked>(&srv).await;
    let (tx, req) = chunked_call(&srv);
    let mut first = send.clone();
    let pending = tokio::spawn(async move { first.send_request(req).await });
    send_chunk(&tx, &bytes[..3]).await;
    // A body error makes hyper reset the stream.
    tx.send(Err(std::io::Error::other("client gave up")))
        .await
        .unwrap();
    assert!(pending.await.unwrap().is_err(), "the call cannot succeed");

    // The next call on the same connection, its body whole in one frame.
    let (tx, req) = chunked_call(&srv);
    send_chunk(&tx, &bytes).await;
    drop(tx);
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(status_and_code(resp).await, (Some("0".into()), 1));
    srv.stop().await;
}

/// Bytes that are not HTTP/2 end that connection only.
#[tokio::test]
async fn garbage_on_a_connection_closes_it_and_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = TestServer::start_default().await;
    let mut send = connect::<Full<Bytes>>(&srv).await;
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"[..],
    ] {
        let mut tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        tcp.write_all(garbage).await.unwrap();
        let mut buf = Vec::new();
        // The server closes the connection (after a GOAWAY, for the second).
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tcp.read_to_end(&mut buf),
        )
        .await;
        assert!(read.is_ok(), "the server kept a broken connection open");
    }
    assert_eq!(call_ok(&mut send, &srv).await, (Some("0".into()), 1));
    srv.stop().await;
}

/// Shutdown lets the calls already open finish: a call whose body is still arriving when the
/// server stops listening (and its connection gets a GOAWAY) is answered once the body is in,
/// and the server then stops.
#[tokio::test]
async fn a_call_open_at_shutdown_is_answered() {
    let srv = TestServer::start_default().await;
    let addr = srv.addr;
    let bytes = framed(&hot_request());
    let mut send = connect::<Chunked>(&srv).await;
    let mut second = send.clone();
    let (tx, req) = chunked_call(&srv);
    let pending = tokio::spawn(async move { send.send_request(req).await });
    send_chunk(&tx, &bytes[..3]).await;
    // A whole call on the same connection, opened after the first: once it is answered, the
    // server has read the first call's headers and its first bytes (frames arrive in order), so
    // the call below is open at shutdown, not still on its way.
    let (whole_tx, whole) = chunked_call(&srv);
    send_chunk(&whole_tx, &bytes).await;
    drop(whole_tx);
    let resp = second.send_request(whole).await.unwrap();
    assert_eq!(status_and_code(resp).await, (Some("0".into()), 1));

    let stopped = tokio::spawn(srv.stop());
    // Shutdown has begun once the listener is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "still listening");
        tokio::task::yield_now().await;
    }
    assert!(!stopped.is_finished(), "stopped with a call open");

    send_chunk(&tx, &bytes[3..]).await;
    drop(tx);
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(status_and_code(resp).await, (Some("0".into()), 1));
    stopped.await.unwrap();
}

/// A request body larger than HTTP/2's default stream window (65,535 bytes) arrives whole only
/// if the server's window takes a message of the largest size allowed (64 KiB): one of exactly
/// 64 KiB is read and answered (here INVALID_ARGUMENT, naming the oversized value), not left
/// waiting for window; one byte more is refused from its prefix (OUT_OF_RANGE).
#[tokio::test]
async fn a_body_larger_than_the_default_window_is_read_whole() {
    let srv = TestServer::start_default().await;
    let sized = |len: usize| {
        let mut value = 64 * 1024 - 100;
        loop {
            let m = training("/execute", &"1".repeat(value)).encode_to_vec();
            match m.len().cmp(&len) {
                std::cmp::Ordering::Equal => return (m, value),
                std::cmp::Ordering::Less => value += 1,
                std::cmp::Ordering::Greater => value -= 1,
            }
        }
    };
    let (message, value) = sized(64 * 1024);
    assert!(message.len() + 5 > 65_535);
    let a = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        post(&srv, PATH, &[], framed(&message)),
    )
    .await
    .expect("the call finished");
    assert_eq!(a.grpc_status.as_deref(), Some("3"), "{a:?}");
    // grpc-message is percent-encoded on the wire.
    let m = a.grpc_message.unwrap_or_default().replace("%20", " ");
    assert!(
        m.contains(&format!("value: {value} bytes, at most 1024")),
        "{m}"
    );
    let (message, _) = sized(64 * 1024 + 1);
    let a = post(&srv, PATH, &[], framed(&message)).await;
    assert_eq!(a.grpc_status.as_deref(), Some("11"), "{a:?}");
    srv.stop().await;
}

/// Many calls arriving together on one connection, more than its 256 streams: every call must
/// get its own answer, a cut-short one its error, a well-formed one a response with one status
/// per descriptor it sent, from a client of its own.
#[tokio::test]
async fn a_burst_of_calls_on_one_connection_gets_each_its_own_answer() {
    const CALLS: usize = 600;
    let srv = TestServer::start_default().await;
    let send = connect::<Full<Bytes>>(&srv).await;
    let calls = (0..CALLS).map(|i| {
        let mut send = send.clone();
        let addr = srv.addr;
        async move {
            // Every fifth call is cut short (a 5-byte prefix announcing more than follows);
            // the others carry 1 to 3 descriptors.
            let descriptors = 1 + i % 3;
            let ip = format!("10.7.{}.{}", i / 250, i % 250);
            let message = request(
                "training",
                (0..descriptors)
                    .map(|_| descriptor(&[("path", "/execute"), ("remote_address", &ip)]))
                    .collect(),
            )
            .encode_to_vec();
            let mut body = framed(&message);
            if i % 5 == 0 {
                body.truncate(body.len() - 1);
            }
            let req = http::Request::post(format!("http://{addr}{PATH}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            let (parts, body) = resp.into_parts();
            let collected = body.collect().await.unwrap();
            let status = parts
                .headers
                .get("grpc-status")
                .or_else(|| collected.trailers().and_then(|t| t.get("grpc-status")))
                .map(|v| v.to_str().unwrap().to_string());
            let bytes = collected.to_bytes();
            let statuses = bytes
                .get(5..)
                .and_then(|m| RateLimitResponse::decode(m).ok())
                .map(|r| (r.overall_code, r.statuses.len()));
            (i, descriptors, status, statuses)
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    assert_eq!(answers.len(), CALLS);
    for (i, descriptors, status, statuses) in answers {
        if i % 5 == 0 {
            assert_eq!(
                status.as_deref(),
                Some("13"),
                "call {i}: INTERNAL (tonic: unexpected EOF)"
            );
            assert_eq!(statuses, None, "call {i}: no message with an error");
        } else {
            assert_eq!(status.as_deref(), Some("0"), "call {i}");
            assert_eq!(
                statuses,
                Some((1, descriptors)),
                "call {i}: OK, one status per descriptor"
            );
        }
    }
    srv.stop().await;
}

/// A message whose prefix declares more than the 64 KiB bound is refused as soon as the prefix
/// is in (`OUT_OF_RANGE`), not after the client has sent megabytes: the call is answered while
/// its body is still open.
#[tokio::test]
async fn an_oversized_message_is_refused_from_its_prefix() {
    let srv = TestServer::start_default().await;
    let mut send = connect::<Chunked>(&srv).await;
    let (tx, req) = chunked_call(&srv);
    let pending = tokio::spawn(async move { send.send_request(req).await });
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&(5u32 * 1024 * 1024).to_be_bytes());
    prefix.extend_from_slice(&[0u8; 16]);
    send_chunk(&tx, &prefix).await;
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), pending)
        .await
        .expect("answered before the body ends")
        .unwrap()
        .unwrap();
    let status = resp
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(status.as_deref(), Some("11"), "{resp:?}");
    drop(tx);
    srv.stop().await;
}
