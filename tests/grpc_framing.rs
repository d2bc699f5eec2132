//! The hand-written `ShouldRateLimit` endpoint (src/service/endpoint.rs) against requests no
//! well-behaved gRPC client sends: raw HTTP/2 with hand-made gRPC framing, checking the
//! `grpc-status` and `grpc-message` each gets. Well-formed calls are covered by tests/rls.rs
//! (tonic client), tests/reflection.rs (grpcurl) and tests/envoy_e2e.rs (Envoy).
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
    // hyper sends a Full body in one frame; a channel body sends one frame per chunk.
    let mut send = connect(&srv).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(8);
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let req = http::Request::post(format!("http://{}{PATH}", srv.addr))
        .header("content-type", "application/grpc")
        .body(body)
        .unwrap();
    let pending = tokio::spawn(async move { send.send_request(req).await });
    for chunk in [&bytes[..2], &bytes[2..7], &bytes[7..]] {
        tx.send(Ok(http_body::Frame::data(Bytes::copy_from_slice(chunk))))
            .await
            .unwrap();
    }
    drop(tx);
    let resp = pending.await.unwrap().unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(
        collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_string())
            .as_deref(),
        Some("0")
    );
    let body = collected.to_bytes();
    assert_eq!(
        RateLimitResponse::decode(&body[5..]).unwrap().overall_code,
        1
    );
    srv.stop().await;
}

#[tokio::test]
async fn broken_framing_gets_a_status_naming_the_problem() {
    let srv = TestServer::start_default().await;
    let msg = hot_request();
    let mut compressed = framed(&msg);
    compressed[0] = 1;
    let mut two = framed(&msg);
    two.extend(framed(&msg));
    let mut short = framed(&msg);
    short.truncate(short.len() - 1);
    let mut bad_flag = framed(&msg);
    bad_flag[0] = 7;
    let mut huge = vec![0u8];
    huge.extend_from_slice(&(5u32 * 1024 * 1024).to_be_bytes());
    huge.extend_from_slice(&[0u8; 16]);
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("empty body", vec![], "3", "request body: no gRPC message"),
        ("three bytes", vec![0, 0, 0], "3", "prefix"),
        ("compressed flag", compressed, "3", "compressed flag"),
        ("bad flag", bad_flag, "3", "neither 0 nor 1"),
        ("two messages", two, "3", "more than one message"),
        ("truncated", short, "3", "ended after"),
        ("5 MiB declared", huge, "11", "too large"),
        (
            "not protobuf",
            framed(&[0xff, 0xff, 0xff]),
            "3",
            "malformed protobuf",
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
