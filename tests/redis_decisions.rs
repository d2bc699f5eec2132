//! The core decisions over gRPC with the Redis store (one server and a three-master cluster),
//! with the test's manual clock passed to Redis, and the failure policy when Redis goes away
//! and comes back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::{RedisCluster, RedisServer, options};
use common::*;
use sluice::algorithms::Hits;
use sluice::clock::{ManualClock, Timestamp};
use sluice::config;
use sluice::limiter::{Descriptor, Limiter, Request};
use sluice::store::{FailurePolicy, RedisNodes, RedisOptions, RedisStore};
use smallvec::smallvec;

fn default_config() -> config::Config {
    let text = std::fs::read_to_string(repo_path("config/sluice.yaml")).unwrap();
    config::parse(&text, "config/sluice.yaml", |_| None).unwrap()
}

async fn server_on(nodes: RedisNodes) -> TestServer<RedisStore> {
    let store = RedisStore::connect(&options(nodes)).unwrap();
    TestServer::start_store(
        default_config(),
        Setup {
            token: Some(ADMIN_TOKEN.into()),
            ..Setup::default()
        },
        store,
    )
    .await
}

async fn eleventh_execute_is_over_limit(srv: &TestServer<RedisStore>) {
    for i in 0..10u32 {
        let r = srv
            .call(training("/api/training/execute", "10.0.0.1"))
            .await;
        assert_eq!(r.overall_code, OK, "request {}", i + 1);
        assert_eq!(r.statuses[0].limit_remaining, 9 - i);
        assert_eq!(
            r.statuses[0].duration_until_reset.as_ref().unwrap().seconds,
            60 - i64::from(i)
        );
        srv.advance(1);
    }
    let r = srv
        .call(training("/api/training/execute", "10.0.0.1"))
        .await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(r.statuses[0].limit_remaining, 0);
    assert_eq!(header(&r, "retry-after"), Some("56"));
    assert_eq!(
        String::from_utf8(r.raw_body).unwrap(),
        r#"{"error": "Rate limit exceeded (per minute)", "retry_after": 56}"#
    );
    // Asked again (from the over-limit cache, or Redis): the same truthful answer.
    let again = srv
        .call(training("/api/training/execute", "10.0.0.1"))
        .await;
    assert_eq!(header(&again, "retry-after"), Some("56"));
    let other = srv
        .call(training("/api/training/execute", "10.0.0.2"))
        .await;
    assert_eq!(other.overall_code, OK);
    assert_eq!(other.statuses[0].limit_remaining, 9);
    srv.advance(56);
    let r = srv
        .call(training("/api/training/execute", "10.0.0.1"))
        .await;
    assert_eq!(r.overall_code, OK);
}

async fn talk2me_burst_of_three_then_one_per_six_seconds(srv: &TestServer<RedisStore>) {
    let ua = "curl/8.0";
    for (i, reset) in [(0u32, 6i64), (1, 12), (2, 18)] {
        let r = srv.call(talk2me("/transcribe", "10.2.0.1", ua)).await;
        assert_eq!(r.overall_code, OK, "burst request {}", i + 1);
        let s = &r.statuses[0];
        assert_eq!(s.current_limit.as_ref().unwrap().name, "burst");
        assert_eq!(s.limit_remaining, 2 - i);
        assert_eq!(s.duration_until_reset.as_ref().unwrap().seconds, reset);
    }
    let r = srv.call(talk2me("/transcribe", "10.2.0.1", ua)).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(header(&r, "retry-after"), Some("6"));
    let other = srv
        .call(talk2me("/transcribe", "10.2.0.1", "Firefox"))
        .await;
    assert_eq!(other.overall_code, OK);
    srv.advance(6);
    let r = srv.call(talk2me("/transcribe", "10.2.0.1", ua)).await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses[0].limit_remaining, 0);
}

#[tokio::test]
async fn eleventh_execute_in_a_minute_is_over_limit_with_redis() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let srv = server_on(RedisNodes::Single(redis.url())).await;
    eleventh_execute_is_over_limit(&srv).await;
}

#[tokio::test]
async fn talk2me_burst_with_redis() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let srv = server_on(RedisNodes::Single(redis.url())).await;
    talk2me_burst_of_three_then_one_per_six_seconds(&srv).await;
}

#[tokio::test]
async fn core_decisions_on_a_redis_cluster() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let srv = server_on(RedisNodes::Cluster(cluster.urls())).await;
    eleventh_execute_is_over_limit(&srv).await;
    talk2me_burst_of_three_then_one_per_six_seconds(&srv).await;
}

#[tokio::test]
async fn a_denied_request_charges_no_limit_across_cluster_slots() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    // A per-client limit and a domain-wide one: different client groups, different slots.
    let cfg = config::parse(
        "domains:\n  - name: g\n    global: [5/minute]\n    endpoints:\n      - path: /a\n        limits: [1/minute]\n",
        "t.yaml",
        |_| None,
    )
    .unwrap();
    let store = RedisStore::connect(&options(RedisNodes::Cluster(cluster.urls()))).unwrap();
    let srv = TestServer::start_store(cfg, Setup::default(), store).await;
    let req = |ip: &str| {
        request(
            "g",
            vec![descriptor(&[("path", "/a"), ("remote_address", ip)])],
        )
    };
    assert_eq!(srv.call(req("1.0.0.1")).await.overall_code, OK);
    for _ in 0..3 {
        // Refused by the client's limit: the global limit gets its hit back every time.
        assert_eq!(srv.call(req("1.0.0.1")).await.overall_code, OVER);
    }
    // Four more clients fill the global limit exactly: the refused hits were not kept.
    for ip in ["1.0.0.2", "1.0.0.3", "1.0.0.4", "1.0.0.5"] {
        assert_eq!(srv.call(req(ip)).await.overall_code, OK, "{ip}");
    }
    let r = srv.call(req("1.0.0.6")).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        5
    );
}

fn request_a() -> Request<'static> {
    Request {
        domain: "d",
        descriptors: smallvec![Descriptor {
            entries: smallvec![("path", "/a"), ("remote_address", "192.0.2.1")],
            hits: Hits::Take(1),
            limit_override: None,
        }],
    }
}

fn limiter_on(redis: &RedisServer, policy: FailurePolicy) -> Limiter<RedisStore> {
    let cfg = config::parse(
        "domains:\n  - name: d\n    endpoints:\n      - path: /a\n        limits: [100/minute]\n",
        "t.yaml",
        |_| None,
    )
    .unwrap();
    let store = RedisStore::connect(&RedisOptions {
        timeout: Duration::from_millis(100),
        ..options(RedisNodes::Single(redis.url()))
    })
    .unwrap();
    Limiter::new(
        cfg.rules,
        store,
        Arc::new(ManualClock::new(Timestamp::from_secs(T0))),
    )
    .with_failure_policy(policy)
}

/// Redis stops mid-test: answers come within the deadline by the policy, errors are counted;
/// Redis restarts on the same port: decisions come from Redis again without intervention.
async fn outage_and_recovery(policy: FailurePolicy) {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let limiter = limiter_on(&redis, policy);
    let rules = limiter.rules_in_force();
    let d = limiter.decide(&rules, &request_a()).await;
    assert!(!d.over && d.statuses[0].remaining == 99);
    redis.stop();
    for _ in 0..5 {
        let started = Instant::now();
        let rules = limiter.rules_in_force();
        let d = limiter.decide(&rules, &request_a()).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        match policy {
            FailurePolicy::Allow => assert!(!d.over && d.statuses[0].limit.is_none()),
            FailurePolicy::Deny => assert!(d.over && d.unavailable),
        }
    }
    assert_eq!(limiter.store_errors(), 5);
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let rules = limiter.rules_in_force();
        let d = limiter.decide(&rules, &request_a()).await;
        if d.statuses[0].limit.is_some() {
            assert!(!d.over);
            assert_eq!(
                d.statuses[0].remaining, 99,
                "a fresh Redis counts from zero"
            );
            break;
        }
        assert!(Instant::now() < deadline, "service did not resume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn redis_down_with_allow_policy_admits_within_the_deadline_and_recovers() {
    outage_and_recovery(FailurePolicy::Allow).await;
}

#[tokio::test]
async fn redis_down_with_deny_policy_refuses_within_the_deadline_and_recovers() {
    outage_and_recovery(FailurePolicy::Deny).await;
}
