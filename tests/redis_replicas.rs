//! Two real `sluice serve` processes sharing one Redis (and a three-master Redis Cluster):
//! together they admit exactly the limit, and a block made through one replica's admin service
//! is enforced by the other within a second.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::spawn_server;
use common::redis::{RedisCluster, RedisServer};
use common::*;
use sluice::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use sluice::proto::sluice::admin::v1 as pb;
use sluice::proto::sluice::admin::v1::admin_client::AdminClient;
use tonic::transport::Channel;

/// A token bucket of 20 refilled one per 72 minutes: no window boundary or refill can fall
/// inside the test, so "exactly 20" is exact.
const CONFIG: &str = "\
domains:
  - name: training
    endpoints:
      - path: /api/training/execute
        limits: [{rate: 20/day, algorithm: token_bucket}]
";

/// One `sluice serve` child, killed on drop.
struct Replica {
    child: Child,
    http: std::net::SocketAddr,
    rls: RateLimitServiceClient<Channel>,
    admin: AdminClient<Channel>,
    /// Its log lines after start-up.
    log: std::sync::mpsc::Receiver<String>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn replica(dir: &std::path::Path, name: &str, store: &str) -> Replica {
    replica_with(dir, name, CONFIG, &["--store", store]).await
}

async fn replica_with(dir: &std::path::Path, name: &str, yaml: &str, args: &[&str]) -> Replica {
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(&config, yaml).unwrap();
    let state = dir.join(format!("{name}-state.json"));
    let (child, rx, [grpc, admin, http]) = spawn_server(
        &mut Command::new(env!("CARGO_BIN_EXE_sluice")),
        &config,
        state,
        "shared-test-secret",
        args,
    );
    Replica {
        log: rx,
        http: http.parse().unwrap(),
        rls: RateLimitServiceClient::connect(format!("http://{grpc}"))
            .await
            .unwrap(),
        admin: AdminClient::connect(format!("http://{admin}"))
            .await
            .unwrap(),
        child,
    }
}

async fn code(r: &Replica, ip: &str) -> i32 {
    r.rls
        .clone()
        .should_rate_limit(training("/api/training/execute", ip))
        .await
        .unwrap()
        .into_inner()
        .overall_code
}

/// Both replicas hammer one client concurrently: exactly the limit gets through.
async fn two_replicas_admit_exactly_the_limit(store: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        replica(dir.path(), "a", store).await,
        replica(dir.path(), "b", store).await,
    );
    let burst = |r: &Replica| {
        let rls = r.rls.clone();
        async move {
            let mut ok = 0;
            for _ in 0..20 {
                let code = rls
                    .clone()
                    .should_rate_limit(training("/api/training/execute", "198.51.100.1"))
                    .await
                    .unwrap()
                    .into_inner()
                    .overall_code;
                ok += u32::from(code == OK);
            }
            ok
        }
    };
    let (x, y) = tokio::join!(burst(&a), burst(&b));
    assert_eq!(x + y, 20, "replica a admitted {x}, b {y}");
    assert_eq!(code(&a, "198.51.100.1").await, OVER);
    assert_eq!(code(&b, "198.51.100.1").await, OVER);

    // A block made through a's admin service is enforced by b within a second.
    let ip = "198.51.100.77";
    assert_eq!(code(&b, ip).await, OK);
    a.admin
        .clone()
        .block_ip(authed(pb::BlockIpRequest {
            ip: ip.into(),
            duration_seconds: 3600,
            permanent: false,
            reason: "replication test".into(),
        }))
        .await
        .unwrap();
    let blocked_at = Instant::now();
    while code(&b, ip).await != OVER {
        assert!(
            blocked_at.elapsed() < Duration::from_secs(1),
            "b does not enforce a's block after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listed = b
        .admin
        .clone()
        .list_blocks(authed(pb::ListBlocksRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.blocks.iter().any(|bl| bl.ip.starts_with(ip)),
        "{listed:?}"
    );
    // And lifting it through b frees it on a.
    b.admin
        .clone()
        .unblock_ip(authed(pb::UnblockIpRequest { ip: ip.into() }))
        .await
        .unwrap();
    let unblocked_at = Instant::now();
    while code(&a, ip).await != OK {
        assert!(
            unblocked_at.elapsed() < Duration::from_secs(1),
            "a still blocks after b's unblock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_redis_admit_exactly_the_limit_and_share_blocks() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    two_replicas_admit_exactly_the_limit(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_a_redis_cluster_admit_exactly_the_limit_and_share_blocks() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    two_replicas_admit_exactly_the_limit(&cluster.urls().join(",")).await;
}

#[test]
fn the_redis_store_refuses_to_start_without_a_shared_key_secret() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--store", "redis://127.0.0.1:1"])
        .env_remove("SLUICE_KEY_SECRET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SLUICE_KEY_SECRET"), "{stderr}");
}

/// The Redis store configured in the file (no `--store`), `on_error: deny`: with Redis killed the
/// replica refuses within its deadline and counts the errors; with Redis back on the same port it
/// decides from Redis again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_denies_while_redis_is_down_and_recovers_when_it_returns() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "store:\n  url: {}\n  timeout_ms: 100\n  on_error: deny\n{}",
        redis.url(),
        CONFIG
    );
    let r = replica_with(dir.path(), "d", &yaml, &[]).await;
    let ip = "203.0.113.50";
    assert_eq!(code(&r, ip).await, OK);
    redis.stop();
    for _ in 0..3 {
        let started = Instant::now();
        let reply = r
            .rls
            .clone()
            .should_rate_limit(training("/api/training/execute", ip))
            .await
            .unwrap()
            .into_inner();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(reply.overall_code, OVER);
        assert_eq!(
            String::from_utf8(reply.raw_body).unwrap(),
            r#"{"error": "Rate limiting temporarily unavailable"}"#
        );
    }
    let (_, body) = http_get(r.http, "/metrics").await;
    assert!(
        metric(&body, "sluice_store_errors_total").unwrap() >= 3.0,
        "{body}"
    );
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    while code(&r, ip).await != OK {
        assert!(
            Instant::now() < deadline,
            "no recovery after Redis restarted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Entries in Redis that cannot be decoded (or break a bound) are skipped and counted on
/// `/metrics`, never dropped silently; the good ones around them are applied; and a flood of
/// them makes one log line, not one per entry or per load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_shared_blocks_are_counted_and_the_good_ones_applied() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let r = replica(dir.path(), "r", &redis.url()).await;
    // A block of this replica's own, shared through Redis.
    r.admin
        .clone()
        .block_ip(authed(pb::BlockIpRequest {
            ip: "198.51.100.5".into(),
            duration_seconds: 3600,
            permanent: false,
            reason: "own".into(),
        }))
        .await
        .unwrap();
    let hash = "sluice:{access}:blocks";
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.cli(&["HLEN", hash]).trim() != "1" {
        assert!(
            Instant::now() < deadline,
            "the replica never shared its block"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Another writer adds one good block and 30 bad entries (broken JSON, missing fields, a
    // reason past its bound).
    let good = r#"{"net":"203.0.113.9/32","permanent":true,"created_at":1,"expires_at":null,"reason":"from elsewhere","created_by":"other"}"#;
    redis.cli(&["HSET", hash, "203.0.113.9/32", good]);
    redis.cli(&["HSET", hash, "bad-json", "{not json"]);
    let long = good
        .replace("203.0.113.9", "203.0.113.10")
        .replace("from elsewhere", &"x".repeat(2000));
    redis.cli(&["HSET", hash, "203.0.113.10/32", &long]);
    for i in 0..28 {
        redis.cli(&["HSET", hash, &format!("bad-{i}"), "{}"]);
    }
    let decode_errors = || async {
        let (_, body) = http_get(r.http, "/metrics").await;
        metric(&body, r#"sluice_state_sync_errors_total{kind="decode"}"#).unwrap()
    };
    assert_eq!(decode_errors().await, 0.0);
    redis.cli(&["INCR", "sluice:{access}:version"]);
    while decode_errors().await < 30.0 {
        assert!(Instant::now() < deadline, "bad entries not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        code(&r, "203.0.113.9").await,
        OVER,
        "the good entry applied"
    );
    assert_eq!(code(&r, "198.51.100.5").await, OVER, "its own block kept");
    assert_eq!(
        code(&r, "203.0.113.10").await,
        OK,
        "the entry past a bound skipped"
    );

    // Loaded again (the version moved): counted again, but not logged again so soon.
    redis.cli(&["INCR", "sluice:{access}:version"]);
    while decode_errors().await < 60.0 {
        assert!(
            Instant::now() < deadline,
            "bad entries not counted on the second load"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(decode_errors().await, 60.0);
    let lines: Vec<String> = r
        .log
        .try_iter()
        .filter(|l| l.contains("cannot be used"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("entries=30"), "{}", lines[0]);

    // Rounds that cannot reach Redis are counted too.
    redis.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http_get(r.http, "/metrics").await;
        if metric(&body, r#"sluice_state_sync_errors_total{kind="redis"}"#).unwrap() >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "failed rounds not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
