//! `sluice-load`, the benchmark load generator (issue 5), against a real server: it must count
//! what the server decided, check every reply, and refuse to measure a request no limit matches.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::*;

/// The load domain with a limit the hot client soon exceeds.
const FIVE_A_MINUTE: &str = "
domains:
  - name: load
    client: [remote_address]
    endpoints:
      - path: /bench
        limits: [5/minute]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shape_is_decided_by_the_server_and_counted() {
    let srv = TestServer::start(include_str!("../benches/load.yaml")).await;
    // The last run keeps 512 calls in flight on one connection, as scripts/bench does: hundreds
    // of replies buffered at once must not trip h2's flood guard (it did with h2's default
    // windows, ending the connection).
    for (shape, connections, concurrency) in [
        ("hot", "2", "4"),
        ("clients", "2", "4"),
        ("unique", "2", "4"),
        ("hot", "1", "512"),
    ] {
        let (code, line, stderr) = short_load(srv.addr, &[], shape, connections, concurrency).await;
        assert_eq!(code, 0, "{shape}: {stderr}");
        assert!(json_field(&line, "decisions") > 0.0, "{shape}: {line}");
        assert_eq!(json_field(&line, "failures"), 0.0, "{shape}: {line}");
        assert_eq!(json_field(&line, "over_limit"), 0.0, "{shape}: {line}");
    }
    // The server saw at least every call the generator counted (and the probes and warm-ups).
    let (_, body) = http_get(srv.http_addr, "/metrics").await;
    assert!(metric(&body, "sluice_decision_duration_seconds_count").unwrap() > 3.0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_no_limit_matches_is_refused_and_over_limit_replies_are_counted() {
    let srv = TestServer::start(FIVE_A_MINUTE).await;
    let addr = srv.addr.to_string();
    let (code, _, stderr) =
        sluice_load(&["--addr", &addr, "--path", "/elsewhere", "--duration", "0.2"]).await;
    assert_ne!(code, 0);
    assert!(stderr.contains("matches no limit"), "{stderr}");

    // One hot client over 5/minute: the generator sees OVER_LIMIT replies and counts them.
    let (code, line, stderr) = short_load(srv.addr, &[], "hot", "1", "2").await;
    assert_eq!(code, 0, "{stderr}");
    assert!(json_field(&line, "over_limit") > 0.0, "{line}");
    assert_eq!(json_field(&line, "failures"), 0.0, "{line}");
    srv.stop().await;
}

/// `--raw` (pre-encoded frames, no gRPC client): every shape is answered and counted as the
/// server counted it, and OVER_LIMIT answers are told from OK ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_calls_are_checked_and_counted_as_the_server_counts_them() {
    let srv = TestServer::start(include_str!("../benches/load.yaml")).await;
    let mut counted = 0.0;
    for shape in ["hot", "clients", "unique"] {
        let (code, line, stderr) = short_load(srv.addr, &["--raw"], shape, "2", "64").await;
        assert_eq!(code, 0, "{shape}: {stderr}");
        assert!(json_field(&line, "decisions") > 0.0, "{shape}: {line}");
        assert_eq!(json_field(&line, "failures"), 0.0, "{shape}: {line}");
        assert_eq!(json_field(&line, "over_limit"), 0.0, "{shape}: {line}");
        counted += json_field(&line, "decisions") + json_field(&line, "warmup_calls");
    }
    // The server decided every call the generator counted, plus the three probes (made
    // through the generated client) and the calls cut off at the end of each run.
    let (_, body) = http_get(srv.http_addr, "/metrics").await;
    let decided = metric(&body, "sluice_decision_duration_seconds_count").unwrap();
    assert!(
        decided >= counted + 3.0,
        "server {decided}, generator {counted}"
    );
    srv.stop().await;

    let srv = TestServer::start(FIVE_A_MINUTE).await;
    let (code, line, stderr) = short_load(srv.addr, &["--raw"], "hot", "1", "2").await;
    assert_eq!(code, 0, "{stderr}");
    assert!(json_field(&line, "over_limit") > 0.0, "{line}");
    // 5 a minute for the one client (the probe is a client of its own).
    assert!(json_field(&line, "ok") <= 5.0, "{line}");
    assert_eq!(json_field(&line, "failures"), 0.0, "{line}");
    srv.stop().await;
}
