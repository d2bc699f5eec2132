//! Attacks on the decision listener's connections, one test per class, against the real binary
//! (so that its resident memory is the server's alone): rapid resets, a CONTINUATION flood,
//! connections that never start HTTP/2 or sit idle, more connections than the cap, messages
//! over the size limit, a client that never reads its answers, and an error message that would
//! amplify a header. Each proves the server keeps answering normal calls meanwhile and that
//! its memory stays flat; where the defence is to cut the attacker off, that it does.
//!
//! The attacks speak HTTP/2 through `common::h2raw` (frames as bytes) or the `h2` crate; the
//! normal calls use the generated tonic client, as Envoy's calls would.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::h2raw::{self, flag, kind};
use common::process::{addrs_from_log, serve_on_free_ports, spawn_logged};
use common::{OK, descriptor, http_get, metric, request};
use prost::Message;
use sluice::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use sluice::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tokio::io::AsyncWriteExt;

/// HTTP/2 error code ENHANCE_YOUR_CALM (RFC 9113, 7).
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// RST_STREAM's CANCEL.
const CANCEL: u32 = 0x8;

/// `sluice serve` on free loopback ports with the benchmarks' config (domain `load`, one limit
/// no test reaches), killed when dropped.
struct Server {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    _state: tempfile::TempDir,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let state = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        serve_on_free_ports(
            &mut cmd,
            "benches/load.yaml",
            state.path().join("state.json"),
        )
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        let (child, log) = spawn_logged(&mut cmd);
        let ([grpc, http], _) =
            addrs_from_log(&log, ["serving RateLimitService", "serving /metrics"]);
        Server {
            child,
            grpc: grpc.parse().unwrap(),
            http: http.parse().unwrap(),
            _state: state,
        }
    }

    /// Resident memory, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS");
        kib * 1024
    }

    async fn metric(&self, series: &str) -> f64 {
        let (_, body) = http_get(self.http, "/metrics").await;
        metric(&body, series).unwrap_or_else(|| panic!("no {series} in\n{body}"))
    }

    /// A connection of the generated client, with one call made on it.
    async fn client(&self) -> RateLimitServiceClient<tonic::transport::Channel> {
        let mut client = RateLimitServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap();
        let r = client.should_rate_limit(bench("10.9.0.1")).await.unwrap();
        assert_eq!(r.get_ref().overall_code, OK);
        client
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The benchmarks' request for client `ip`.
fn bench(ip: &str) -> RateLimitRequest {
    request(
        "load",
        vec![descriptor(&[("path", "/bench"), ("remote_address", ip)])],
    )
}

/// Makes `n` calls on `client`, each of which must be answered OK.
async fn calls_answered(client: &mut RateLimitServiceClient<tonic::transport::Channel>, n: usize) {
    for i in 0..n {
        let ip = format!("10.9.1.{}", i % 250);
        let r = tokio::time::timeout(Duration::from_secs(5), client.should_rate_limit(bench(&ip)))
            .await
            .unwrap_or_else(|_| panic!("call {i} not answered within 5 s"))
            .unwrap_or_else(|s| panic!("call {i}: {s:?}"));
        assert_eq!(r.get_ref().overall_code, OK, "call {i}");
    }
}

/// Samples the server's resident memory while `attack` runs, and answers normal calls on a
/// connection opened before it, every few milliseconds: the peak growth over the memory before
/// the attack. Panics if a normal call fails or waits more than 5 s.
async fn under_attack<F: Future<Output = ()>>(srv: &Server, attack: F) -> u64 {
    let mut client = srv.client().await;
    calls_answered(&mut client, 200).await;
    let before = srv.rss();
    let mut attack = std::pin::pin!(attack);
    let mut peak = before;
    let mut calls = 0;
    loop {
        tokio::select! {
            () = &mut attack => break,
            () = calls_answered(&mut client, 1) => {
                calls += 1;
                peak = peak.max(srv.rss());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    peak = peak.max(srv.rss());
    calls_answered(&mut client, 20).await;
    let grown = peak.saturating_sub(before);
    eprintln!("normal calls answered during the attack: {calls}; memory grew by {grown} bytes");
    grown
}

const MIB: u64 = 1024 * 1024;

/// Opens a connection and writes `first`, then up to 1,000 batches of frames from `batch`
/// (given the batch's number) until a write fails; then asserts that the server closes the
/// connection with GOAWAY ENHANCE_YOUR_CALM. `what` names a batch's frames for the messages.
async fn flood_is_cut_off(
    addr: SocketAddr,
    first: &[u8],
    batch: impl Fn(u32) -> Vec<u8>,
    what: &str,
) {
    let mut tcp = h2raw::open(addr).await;
    tcp.write_all(first).await.unwrap();
    let mut sent = 0;
    for n in 0..1000 {
        if tcp.write_all(&batch(n)).await.is_err() {
            break;
        }
        sent += 1;
    }
    let (goaway, closed) = h2raw::read_until_closed(&mut tcp, Duration::from_secs(10)).await;
    assert!(
        closed,
        "the server never closed a connection sending {sent} batches of {what}"
    );
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "after {sent} batches of {what}"
    );
}

/// HEADERS then RST_STREAM, thousands of times on one connection (CVE-2023-44487): h2 counts
/// streams reset before they were taken and ends the connection with ENHANCE_YOUR_CALM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_loop_is_cut_off_and_calls_go_on() {
    let srv = Server::start(&[]);
    let block = h2raw::grpc_headers(h2raw::RLS_PATH);
    let resets = |batch: u32| {
        let mut out = Vec::new();
        for i in 0..100 {
            let stream = 2 * (batch * 100 + i) + 1;
            h2raw::frame(&mut out, kind::HEADERS, flag::END_HEADERS, stream, &block);
            h2raw::frame(&mut out, kind::RST_STREAM, 0, stream, &CANCEL.to_be_bytes());
        }
        out
    };
    let what = "100 HEADERS + RST_STREAM";
    let grown = under_attack(&srv, flood_is_cut_off(srv.grpc, &[], resets, what)).await;
    assert!(grown < 16 * MIB, "the server grew by {grown} bytes");
}

/// A HEADERS frame without END_HEADERS, then empty CONTINUATION frames without end: h2 counts
/// them against what the header list size allows and ends the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_off_and_calls_go_on() {
    let srv = Server::start(&[]);
    let mut headers = Vec::new();
    h2raw::frame(
        &mut headers,
        kind::HEADERS,
        0,
        1,
        &h2raw::grpc_headers(h2raw::RLS_PATH),
    );
    let continuations = |_| {
        let mut out = Vec::new();
        for _ in 0..100 {
            h2raw::frame(&mut out, kind::CONTINUATION, 0, 1, &[]);
        }
        out
    };
    let what = "100 empty CONTINUATIONs";
    let grown = under_attack(
        &srv,
        flood_is_cut_off(srv.grpc, &headers, continuations, what),
    )
    .await;
    assert!(grown < 16 * MIB, "the server grew by {grown} bytes");
}

/// A connection with no call for the idle timeout is closed (and counted); one making a call
/// now and then is not. A connection that has sent 10 bytes of the preface is closed 10 s after
/// it opened, by the handshake timeout, whatever the idle timeout; 500 of them at once hold
/// little memory meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_open_connections_are_closed_after_their_timeouts() {
    let srv = Server::start(&["--idle-timeout", "2s"]);
    let opened = Instant::now();
    let mut idle = h2raw::open(srv.grpc).await;
    let mut half = Vec::new();
    for _ in 0..500 {
        let mut tcp = tokio::net::TcpStream::connect(srv.grpc).await.unwrap();
        tcp.write_all(&h2raw::PREFACE[..10]).await.unwrap();
        half.push(tcp);
    }
    let grown = under_attack(&srv, async {
        // under_attack's connection makes a call every few milliseconds meanwhile.
        let (_, closed) = h2raw::read_until_closed(&mut idle, Duration::from_secs(10)).await;
        let took = opened.elapsed();
        assert!(closed, "the idle connection is still open after 10 s");
        // Closed between one timeout and 1.25 timeouts after it went idle (plus scheduling).
        assert!(took >= Duration::from_secs(2), "closed after {took:?}");
        assert!(took < Duration::from_secs(4), "closed after {took:?}");
        for (i, tcp) in half.iter_mut().enumerate() {
            let left = Duration::from_secs(15).saturating_sub(opened.elapsed());
            let (_, closed) = h2raw::read_until_closed(tcp, left).await;
            assert!(closed, "half-open connection {i} still open after 15 s");
        }
        let took = opened.elapsed();
        assert!(took >= Duration::from_secs(10), "closed after {took:?}");
    })
    .await;
    assert!(grown < 32 * MIB, "the server grew by {grown} bytes");
    let closed = |reason: &str| {
        format!(r#"sluice_connections_closed_total{{listener="decisions",reason="{reason}"}}"#)
    };
    assert_eq!(srv.metric(&closed("idle")).await, 1.0);
    assert_eq!(srv.metric(&closed("handshake_timeout")).await, 500.0);
}

/// With `--max-connections 20`, connections beyond the cap are closed as they arrive and
/// counted; those already open, the normal client's among them, go on; once some close, new
/// ones are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused_and_counted() {
    let srv = Server::start(&["--max-connections", "20"]);
    let mut normal = srv.client().await;
    let grown = under_attack(&srv, async {
        let mut extra = Vec::new();
        for _ in 0..60 {
            extra.push(h2raw::open(srv.grpc).await);
        }
        let mut refused = 0;
        let mut kept = Vec::new();
        for mut tcp in extra {
            // A served connection gets the server's SETTINGS; a refused one is closed at once.
            match h2raw::read_frame(&mut tcp, Duration::from_secs(2)).await {
                Some(f) => {
                    assert_eq!(f.kind, kind::SETTINGS);
                    kept.push(tcp);
                }
                None => refused += 1,
            }
        }
        // The normal client's connection and the one under_attack opened take two places.
        assert_eq!(kept.len(), 18, "connections served");
        assert_eq!(refused, 42, "connections refused");
    })
    .await;
    assert!(grown < 16 * MIB, "the server grew by {grown} bytes");
    calls_answered(&mut normal, 5).await;
    let refused = r#"sluice_connections_refused_total{listener="decisions"}"#;
    assert_eq!(srv.metric(refused).await, 42.0);
    // The 18 were closed at the end of the attack: room again.
    let deadline = Instant::now() + Duration::from_secs(5);
    let open = r#"sluice_connections_open{listener="decisions"}"#;
    while srv.metric(open).await > 3.0 {
        assert!(Instant::now() < deadline, "connections still counted open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut fresh = srv.client().await;
    calls_answered(&mut fresh, 5).await;
}

/// 20 connections each declare a 4 MiB message and send what their window allows, then stop:
/// each call is refused (OUT_OF_RANGE) as soon as its prefix is in, and the server holds at
/// most a window of each body, never the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_size_limit_are_refused_from_their_prefix() {
    let srv = Server::start(&[]);
    let grown = under_attack(&srv, async {
        let mut held = Vec::new();
        for _ in 0..20 {
            let tcp = tokio::net::TcpStream::connect(srv.grpc).await.unwrap();
            let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
            tokio::spawn(conn);
            let req = http::Request::post(format!("http://{}{}", srv.grpc, h2raw::RLS_PATH))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let (response, mut body) = send.send_request(req, false).unwrap();
            let mut data = vec![0u8];
            data.extend_from_slice(&(4u32 * 1024 * 1024).to_be_bytes());
            data.extend(std::iter::repeat_n(0u8, 60 * 1024));
            body.reserve_capacity(data.len());
            body.send_data(data.into(), false).unwrap();
            let response = tokio::time::timeout(Duration::from_secs(5), response)
                .await
                .expect("answered before the body ends")
                .unwrap();
            let status = response.headers().get("grpc-status").unwrap();
            assert_eq!(status, "11", "{response:?}");
            held.push((send, body));
        }
    })
    .await;
    assert!(grown < 16 * MIB, "the server grew by {grown} bytes");
}

/// A client that sends calls and never reads the answers: the server's answers back up in the
/// socket (whose receive buffer here is small, so that it fills in a second, not a minute), and
/// the server must stop reading calls it cannot answer rather than hold every answer. The
/// client keeps within the server's 256 streams by pacing itself (100 calls every 5 ms); a
/// client that does not is cut off sooner, for refused streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_cannot_grow_the_server() {
    let srv = Server::start(&[]);
    let block = h2raw::grpc_headers(h2raw::RLS_PATH);
    let body = h2raw::grpc_message(&bench("10.9.2.1").encode_to_vec());
    let grown = under_attack(&srv, async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut tcp = socket.connect(srv.grpc).await.unwrap();
        tcp.write_all(&h2raw::hello()).await.unwrap();
        let mut sent = 0u32;
        let stopped = loop {
            let mut out = Vec::new();
            for i in 0..100 {
                h2raw::call(&mut out, 2 * (sent + i) + 1, &block, &body);
            }
            match tokio::time::timeout(Duration::from_secs(2), tcp.write_all(&out)).await {
                Ok(Ok(())) => sent += 100,
                Ok(Err(e)) => panic!("the connection failed after {sent} calls: {e}"),
                Err(_) => break true,
            }
            if sent >= 200_000 {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert!(
            stopped,
            "the server read all {sent} calls of a client that reads nothing"
        );
        eprintln!("the server stopped reading after {sent} calls");
    })
    .await;
    assert!(grown < 16 * MIB, "the server grew by {grown} bytes");
}

/// A `grpc-encoding` of 3,900 bytes, sent once into the HPACK table and then referred to by a
/// one-byte index on 5,000 calls of a connection that never reads: tonic's answer would echo
/// the value in every `grpc-message`; sluice's is cut to 256 bytes, so the server's memory
/// stays flat. The cut message itself is checked with the `h2` crate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echoed_header_cannot_amplify_error_messages() {
    let srv = Server::start(&[]);
    let encoding = "x".repeat(3900);

    // One call: UNIMPLEMENTED, with a message of at most 256 bytes.
    let tcp = tokio::net::TcpStream::connect(srv.grpc).await.unwrap();
    let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}{}", srv.grpc, h2raw::RLS_PATH))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-encoding", &encoding)
        .body(())
        .unwrap();
    let (response, mut body) = send.send_request(req, false).unwrap();
    body.send_data(
        h2raw::grpc_message(&bench("10.9.3.1").encode_to_vec()).into(),
        true,
    )
    .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.headers()["grpc-status"], "12", "{response:?}");
    let message = response.headers()["grpc-message"].as_bytes();
    assert!(message.len() <= 256, "{} bytes", message.len());
    assert!(
        message.ends_with(b"..."),
        "{:?}",
        String::from_utf8_lossy(message)
    );

    // The flood: the first call puts the value in the table, the rest refer to it.
    let message = h2raw::grpc_message(&bench("10.9.3.2").encode_to_vec());
    let grown = under_attack(&srv, async {
        let mut tcp = h2raw::open(srv.grpc).await;
        let mut first = h2raw::grpc_headers(h2raw::RLS_PATH);
        h2raw::literal_indexed(&mut first, "grpc-encoding", encoding.as_bytes());
        let mut again = h2raw::grpc_headers(h2raw::RLS_PATH);
        h2raw::indexed(&mut again, 62);
        let mut out = Vec::new();
        h2raw::call(&mut out, 1, &first, &message);
        for i in 1..5000u32 {
            h2raw::call(&mut out, 2 * i + 1, &again, &message);
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.write_all(&out)).await;
        // Memory is sampled for one more second while the server answers what it has read
        // and nothing is read here; then once more after the attack.
        tokio::time::sleep(Duration::from_secs(1)).await;
    })
    .await;
    assert!(grown < 16 * MIB, "the server grew by {grown} bytes");
}
