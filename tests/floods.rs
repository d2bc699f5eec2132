//! Floods of distinct clients, paths and descriptor values over gRPC, against small configured
//! bounds: what holds memory stays at its bound, decisions stay right, and `/metrics` counts
//! what each bound turned away (README, "Bounds under floods").

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use common::*;
use sluice::config;
use sluice::proto::envoy::service::ratelimit::v3::RateLimitRequest;

/// One client's call to `/flood` in domain `flood`.
fn flood(client: &str) -> RateLimitRequest {
    request(
        "flood",
        vec![descriptor(&[
            ("path", "/flood"),
            ("remote_address", client),
        ])],
    )
}

/// A distinct client per `i`.
fn client(i: usize) -> String {
    format!("10.{}.{}.{}", i >> 16, (i >> 8) & 0xff, i & 0xff)
}

/// Sends every request of `requests`, 16 at a time; returns their overall codes in order.
async fn send_all(srv: &TestServer, requests: Vec<RateLimitRequest>) -> Vec<i32> {
    let mut slots: Vec<Vec<(usize, RateLimitRequest)>> = (0..16).map(|_| Vec::new()).collect();
    for (i, r) in requests.into_iter().enumerate() {
        slots[i % 16].push((i, r));
    }
    let tasks: Vec<_> = slots
        .into_iter()
        .map(|batch| {
            let mut c = srv.client.clone();
            tokio::spawn(async move {
                let mut out = Vec::with_capacity(batch.len());
                for (i, r) in batch {
                    let code = c
                        .should_rate_limit(r)
                        .await
                        .unwrap()
                        .into_inner()
                        .overall_code;
                    out.push((i, code));
                }
                out
            })
        })
        .collect();
    let mut codes = Vec::new();
    for t in tasks {
        codes.extend(t.await.unwrap());
    }
    codes.sort_unstable();
    codes.into_iter().map(|(_, c)| c).collect()
}

async fn metrics(srv: &TestServer) -> String {
    let (status, body) = http_get(srv.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    body
}

fn value(body: &str, series: &str) -> f64 {
    metric(body, series).unwrap_or_else(|| panic!("no {series} in\n{body}"))
}

const FLOOD_YAML: &str = "
store:
  max_keys: 512
stats:
  max_clients: 100
domains:
  - name: flood
    client: [remote_address]
    endpoints:
      - path: /flood
        limits: [3/minute]
";

/// 3,000 new clients into a store of 512 counters (two per shard): it holds no more, and
/// every counter it dropped was a live one, counted. A new client is decided as any new
/// client (admitted); one that keeps calling is still limited at its fourth call with the
/// store full.
#[tokio::test]
async fn a_flood_of_clients_holds_the_store_at_max_keys_and_counts_evictions() {
    let srv = TestServer::start(FLOOD_YAML).await;
    let codes = send_all(&srv, (0..3_000).map(|i| flood(&client(i))).collect()).await;
    assert!(codes.iter().all(|&c| c == OK), "a new client is admitted");

    let body = metrics(&srv).await;
    let tracked = value(&body, "sluice_tracked_keys");
    let evicted = value(&body, "sluice_store_evictions_total");
    assert!(tracked <= 512.0, "{tracked} counters");
    // The clock stands still: every counter is live, so each new one past a full shard's two
    // evicted exactly one.
    assert_eq!(tracked + evicted, 3_000.0, "{tracked} + {evicted}");

    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(srv.call(flood("192.0.2.1")).await.overall_code);
    }
    assert_eq!(codes, [OK, OK, OK, OVER]);
    assert!(value(&metrics(&srv).await, "sluice_tracked_keys") <= 512.0);
    srv.stop().await;
}

/// 2,000 new clients against statistics for 100: 100 are tracked, the other decisions are
/// counted in aggregate and in `sluice_clients_untracked_total`; limits do not depend on the
/// statistics, so an untracked client is limited as any.
#[tokio::test]
async fn a_flood_of_clients_holds_statistics_at_max_clients_and_counts_the_rest() {
    let srv = TestServer::start(&FLOOD_YAML.replace("max_keys: 512", "max_keys: 100000")).await;
    let codes = send_all(&srv, (0..2_000).map(|i| flood(&client(i))).collect()).await;
    assert!(codes.iter().all(|&c| c == OK));

    let body = metrics(&srv).await;
    assert_eq!(value(&body, "sluice_tracked_clients"), 100.0);
    assert_eq!(value(&body, "sluice_clients_untracked_total"), 1_900.0);
    let ok = r#"sluice_requests_total{domain="flood",code="ok"}"#;
    assert_eq!(value(&body, ok), 2_000.0, "every decision is in the totals");

    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(srv.call(flood("192.0.2.1")).await.overall_code);
    }
    assert_eq!(codes, [OK, OK, OK, OVER]);
    let body = metrics(&srv).await;
    assert_eq!(value(&body, "sluice_tracked_clients"), 100.0);
    assert_eq!(value(&body, "sluice_clients_untracked_total"), 1_904.0);
    srv.stop().await;
}

/// The series of `/metrics` with their values left out.
fn series(body: &str) -> Vec<&str> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s))
        .collect()
}

/// Unknown domains, unknown paths, and known paths with new descriptor values and entries:
/// none of it becomes a label, so `/metrics` keeps exactly its series.
#[tokio::test]
async fn a_flood_of_domains_paths_and_values_adds_no_metrics_series() {
    let srv = TestServer::start_default().await;
    srv.call(training("/api/training/execute", "192.0.2.1"))
        .await;
    let before = metrics(&srv).await;

    let mut requests = Vec::new();
    for i in 0..1_000 {
        let n = i.to_string();
        requests.push(request(
            &format!("domain-{i}"),
            vec![descriptor(&[("path", "/")])],
        ));
        requests.push(training(&format!("/api/unknown/{i}"), &client(i)));
        requests.push(request(
            "training",
            vec![descriptor(&[
                ("path", "/api/training/execute"),
                ("remote_address", &client(i)),
                (&format!("entry-{i}"), &n),
            ])],
        ));
    }
    send_all(&srv, requests).await;

    let after = metrics(&srv).await;
    assert_eq!(series(&after), series(&before));
    srv.stop().await;
}

/// envoyproxy/ratelimit's `detailed_metric` makes a statistics key, and `/metrics` series, per
/// request value: past 10,000 keys, new values are counted together under key `overflow`, and
/// every hit is still counted once.
#[tokio::test]
async fn a_flood_of_reference_values_is_folded_into_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flood.yaml");
    std::fs::write(
        &file,
        "domain: flood
descriptors:
  - key: user
    detailed_metric: true
    rate_limit:
      unit: minute
      requests_per_unit: 1000
",
    )
    .unwrap();
    let cfg = config::load_with(&file, |_| None).unwrap();
    let srv = TestServer::start_with(cfg).await;
    const VALUES: usize = 10_050;
    let requests = (0..VALUES)
        .map(|i| request("flood", vec![descriptor(&[("user", &format!("u{i}"))])]))
        .collect();
    let codes = send_all(&srv, requests).await;
    assert!(codes.iter().all(|&c| c == OK));

    let body = metrics(&srv).await;
    let hits: HashMap<&str, f64> = body
        .lines()
        .filter(|l| l.starts_with("ratelimit_service_rate_limit_total_hits{"))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(s, v)| (s, v.parse().unwrap()))
        .collect();
    // The registry's 10,000 keys (the rule's own among them) and `overflow`.
    assert_eq!(hits.len(), 10_001, "total_hits series");
    assert_eq!(
        hits.values().sum::<f64>(),
        VALUES as f64,
        "every hit counted once"
    );
    let overflow = hits[r#"ratelimit_service_rate_limit_total_hits{domain="overflow"}"#];
    // 9,999 values found room beside the rule's key; the rest did not.
    assert_eq!(overflow, (VALUES - 9_999) as f64);
    assert_eq!(
        value(&body, "sluice_reference_stat_keys_overflowed_total"),
        overflow
    );
    srv.stop().await;
}
