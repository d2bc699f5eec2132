//! `sluice-load`, the benchmark load generator (issue 5), against a real server: it must count
//! what the server decided, check every reply, and refuse to measure a request no limit matches.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../tests/common/mod.rs"]
mod common;

use common::*;

/// Runs sluice-load with `args`, off the test's runtime (the server under test shares it): exit
/// code, stdout, stderr.
async fn sluice_load(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-load"))
            .args(&args)
            .output()
            .expect("sluice-load runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// A short run against `addr`: `duration` seconds recorded, no warm-up. Exit code, its last
/// stdout line (the JSON one when it ran), stderr.
async fn short_load(
    addr: std::net::SocketAddr,
    shape: &str,
    connections: &str,
    concurrency: &str,
    duration: &str,
) -> (i32, String, String) {
    let addr = addr.to_string();
    let args = [
        "--addr",
        &addr,
        "--shape",
        shape,
        "--connections",
        connections,
        "--concurrency",
        concurrency,
        "--duration",
        duration,
        "--warmup",
        "0",
        "--json",
    ];
    let (code, stdout, stderr) = sluice_load(&args).await;
    let line = stdout.lines().last().unwrap_or_default().to_string();
    (code, line, stderr)
}

/// A number field of sluice-load's JSON line.
fn json_field(line: &str, key: &str) -> f64 {
    let start = line.find(&format!("\"{key}\":")).expect(key) + key.len() + 3;
    let rest = &line[start..];
    let end = rest.find([',', '}']).unwrap();
    rest[..end].parse().unwrap()
}

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
    let srv = TestServer::start(include_str!("../../benches/load.yaml")).await;
    // The last run keeps 512 calls in flight on one connection: more than the server's 256
    // streams a connection, so the client must queue the rest, not fail them. It runs longer:
    // in a debug build the first calls wait a few hundred milliseconds for a stream.
    for (shape, connections, concurrency, duration) in [
        ("hot", "2", "4", "0.3"),
        ("clients", "2", "4", "0.3"),
        ("unique", "2", "4", "0.3"),
        ("hot", "1", "512", "2"),
    ] {
        let (code, line, stderr) =
            short_load(srv.addr, shape, connections, concurrency, duration).await;
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
    let (code, line, stderr) = short_load(srv.addr, "hot", "1", "2", "0.3").await;
    assert_eq!(code, 0, "{stderr}");
    assert!(json_field(&line, "over_limit") > 0.0, "{line}");
    assert_eq!(json_field(&line, "failures"), 0.0, "{line}");
    srv.stop().await;
}
