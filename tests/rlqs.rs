//! `StreamRateLimitQuotas` over real gRPC connections: a stream's reports are answered with
//! assignments from the config in force, its state shows in GetStats and /metrics, a stream
//! outlives the idle timeout, and it ends with INVALID_ARGUMENT on a bad report and with
//! UNAVAILABLE when the server shuts down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{KillOnDrop, spawn_server};
use common::*;
use sluice::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_response::bucket_action::BucketAction as Action;
use sluice::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_client::RateLimitQuotaServiceClient;
use sluice::proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_usage_reports::BucketQuotaUsage;
use sluice::proto::envoy::service::rate_limit_quota::v3::{
    BucketId, RateLimitQuotaResponse, RateLimitQuotaUsageReports,
};
use sluice::proto::envoy::r#type::v3::rate_limit_strategy::{BlanketRule, Strategy};
use sluice::proto::sluice::admin::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// One Envoy's stream: reports go in through `tx`, assignments come out of `rx`.
struct Stream {
    tx: mpsc::Sender<RateLimitQuotaUsageReports>,
    rx: Streaming<RateLimitQuotaResponse>,
}

impl Stream {
    async fn open(addr: std::net::SocketAddr) -> Stream {
        let mut client = RateLimitQuotaServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let (tx, reports) = mpsc::channel(4);
        let rx = client
            .stream_rate_limit_quotas(ReceiverStream::new(reports))
            .await
            .expect("stream opens")
            .into_inner();
        Stream { tx, rx }
    }

    async fn send(&self, domain: &str, usages: Vec<BucketQuotaUsage>) {
        self.tx
            .send(RateLimitQuotaUsageReports {
                domain: domain.into(),
                bucket_quota_usages: usages,
            })
            .await
            .expect("stream open");
    }

    async fn next(&mut self) -> Result<RateLimitQuotaResponse, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(10), self.rx.message()).await {
            Ok(Ok(Some(r))) => Ok(r),
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => Err(status),
            Err(_) => panic!("no answer within 10 s"),
        }
    }

    async fn exchange(
        &mut self,
        domain: &str,
        usages: Vec<BucketQuotaUsage>,
    ) -> RateLimitQuotaResponse {
        self.send(domain, usages).await;
        self.next().await.expect("an answer")
    }
}

fn usage(entries: &[(&str, &str)], allowed: u64, denied: u64) -> BucketQuotaUsage {
    BucketQuotaUsage {
        bucket_id: Some(BucketId {
            bucket: entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        }),
        // Envoy 1.40's first report of a bucket says 0 s.
        time_elapsed: Some(prost_types::Duration::default()),
        num_requests_allowed: allowed,
        num_requests_denied: denied,
        last_report: None,
    }
}

const TRANSCRIBE: &[(&str, &str)] = &[
    ("path", "/transcribe"),
    ("remote_address", "192.0.2.10"),
    ("user_agent", "curl/8"),
];

/// (strategy, ttl seconds) of a response's only action.
fn only(r: &RateLimitQuotaResponse) -> (Strategy, i64) {
    assert_eq!(r.bucket_action.len(), 1, "{r:?}");
    let Some(Action::QuotaAssignmentAction(q)) = &r.bucket_action[0].bucket_action else {
        panic!("not an assignment: {r:?}");
    };
    let strategy = q
        .rate_limit_strategy
        .and_then(|s| s.strategy)
        .expect("a strategy");
    (strategy, q.assignment_time_to_live.expect("a ttl").seconds)
}

/// The default config's Talk2Me `/transcribe` (burst 3, refilled 1 per 6 s; 10/minute,
/// 100/hour; 1000/minute and 10000/hour for everyone) is a bucket of 3 tokens refilled at the
/// slowest of those rates, 100 an hour, for the client; an allowlisted client gets ALLOW_ALL and
/// a blocked one DENY_ALL. Both show in GetStats and /metrics.
#[tokio::test]
async fn reports_are_answered_from_the_config_in_force_and_shown() {
    let srv = TestServer::start_default().await;
    let mut s = Stream::open(srv.addr).await;
    let r = s.exchange("talk2me", vec![usage(TRANSCRIBE, 1, 0)]).await;
    let (strategy, ttl) = only(&r);
    let Strategy::TokenBucket(tb) = strategy else {
        panic!("{strategy:?}")
    };
    assert_eq!(tb.max_tokens, 3);
    assert_eq!(tb.tokens_per_fill, Some(100));
    assert_eq!(tb.fill_interval.map(|d| d.seconds), Some(3600));
    assert_eq!(ttl, 15);

    let mut admin = srv.admin().await;
    admin
        .block_ip(authed(pb::BlockIpRequest {
            ip: "192.0.2.66".into(),
            duration_seconds: 600,
            ..Default::default()
        }))
        .await
        .unwrap();
    admin
        .allow(authed(pb::AllowRequest {
            ip: "192.0.2.99".into(),
            reason: String::new(),
        }))
        .await
        .unwrap();
    let blocked = &[
        ("path", "/transcribe"),
        ("remote_address", "192.0.2.66"),
        ("user_agent", "x"),
    ];
    let allowed = &[
        ("path", "/transcribe"),
        ("remote_address", "192.0.2.99"),
        ("user_agent", "x"),
    ];
    let deny = Strategy::BlanketRule(BlanketRule::DenyAll as i32);
    let allow = Strategy::BlanketRule(BlanketRule::AllowAll as i32);
    assert_eq!(
        only(&s.exchange("talk2me", vec![usage(blocked, 0, 1)]).await),
        (deny, 15)
    );
    assert_eq!(
        only(&s.exchange("talk2me", vec![usage(allowed, 1, 0)]).await),
        (allow, 15)
    );

    let stats = admin
        .get_stats(authed(pb::GetStatsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let quota = stats.quota.expect("quota statistics");
    assert_eq!(quota.streams_open, 1);
    assert_eq!((quota.reported_allowed, quota.reported_denied), (2, 1));
    let stream = &quota.streams[0];
    assert_eq!(
        (stream.domain.as_str(), stream.buckets, stream.reports),
        ("talk2me", 3, 3)
    );
    let transcribe = stream
        .top_buckets
        .iter()
        .find(|b| b.bucket_id.get("remote_address").map(String::as_str) == Some("192.0.2.10"))
        .expect("the bucket is shown");
    assert_eq!(transcribe.assignment, "token_bucket");
    assert_eq!(transcribe.max_tokens, 3);
    assert!((transcribe.assigned_per_second - 100.0 / 3600.0).abs() < 1e-9);

    let (_, metrics) = http_get(srv.http_addr, "/metrics").await;
    assert_eq!(metric(&metrics, "sluice_rlqs_streams"), Some(1.0));
    assert_eq!(
        metric(&metrics, r#"sluice_rlqs_buckets{domain="talk2me"}"#),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &metrics,
            r#"sluice_rlqs_assignments{domain="talk2me",assignment="deny_all"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &metrics,
            r#"sluice_rlqs_reported_requests_total{outcome="denied"}"#
        ),
        Some(1.0)
    );

    // The stream ends: it is gone from both.
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, metrics) = http_get(srv.http_addr, "/metrics").await;
        if metric(&metrics, "sluice_rlqs_streams") == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stream is still counted open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.stop().await;
}

/// A report that cannot be read ends its stream with INVALID_ARGUMENT naming the field; the
/// server serves the next stream as before.
#[tokio::test]
async fn a_bad_report_ends_its_stream_with_the_field_named() {
    let srv = TestServer::start_default().await;
    let mut s = Stream::open(srv.addr).await;
    s.send("", vec![usage(TRANSCRIBE, 1, 0)]).await;
    let status = s.next().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("domain:"), "{status:?}");

    let mut s = Stream::open(srv.addr).await;
    let mut no_id = usage(TRANSCRIBE, 1, 0);
    no_id.bucket_id = Some(BucketId::default());
    s.send("talk2me", vec![usage(TRANSCRIBE, 1, 0), no_id])
        .await;
    let status = s.next().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("bucket_quota_usages[1].bucket_id:"),
        "{status:?}"
    );

    let mut s = Stream::open(srv.addr).await;
    let r = s.exchange("talk2me", vec![usage(TRANSCRIBE, 1, 0)]).await;
    assert!(matches!(only(&r).0, Strategy::TokenBucket(_)));
    srv.stop().await;
}

/// Shutting down ends open streams with UNAVAILABLE, which Envoy answers by reconnecting, and
/// the server stops without waiting for them.
#[tokio::test]
async fn shutdown_ends_streams_with_unavailable() {
    let srv = TestServer::start_default().await;
    let mut s = Stream::open(srv.addr).await;
    s.exchange("talk2me", vec![usage(TRANSCRIBE, 1, 0)]).await;
    let stopped = Instant::now();
    let stop = tokio::spawn(srv.stop());
    let status = s.next().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    tokio::time::timeout(Duration::from_secs(5), stop)
        .await
        .expect("the server stops with a stream open")
        .unwrap();
    // Well within the shutdown grace (10 s): nothing waited for the stream to end by itself.
    assert!(stopped.elapsed() < Duration::from_secs(5));
}

/// A stream is a call in progress: its connection outlives the idle timeout however long the
/// stream lasts, where a connection with no call is closed after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_keeps_its_connection_past_the_idle_timeout() {
    let state = tempfile::tempdir().unwrap();
    let (child, _log, [grpc, _, _]) = spawn_server(
        Command::new(env!("CARGO_BIN_EXE_sluice")).current_dir(env!("CARGO_MANIFEST_DIR")),
        "config/sluice.yaml",
        state.path().join("state.json"),
        "secret",
        &["--idle-timeout", "1s"],
    );
    let _child = KillOnDrop(child);
    let addr: std::net::SocketAddr = grpc.parse().unwrap();
    let mut s = Stream::open(addr).await;
    s.exchange("talk2me", vec![usage(TRANSCRIBE, 1, 0)]).await;
    // Three idle timeouts with no report, then another report on the same stream.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = s.exchange("talk2me", vec![usage(TRANSCRIBE, 2, 0)]).await;
    assert!(matches!(only(&r).0, Strategy::TokenBucket(_)));
}

/// A block made through the admin API reaches a stream's buckets of that address without
/// waiting for the stream's next report.
#[tokio::test]
async fn a_block_is_pushed_to_open_streams() {
    let srv = TestServer::start_default().await;
    let mut s = Stream::open(srv.addr).await;
    let r = s.exchange("talk2me", vec![usage(TRANSCRIBE, 1, 0)]).await;
    assert!(matches!(only(&r).0, Strategy::TokenBucket(_)));
    srv.admin()
        .await
        .block_ip(authed(pb::BlockIpRequest {
            ip: "192.0.2.10".into(),
            permanent: true,
            ..Default::default()
        }))
        .await
        .unwrap();
    // No report sent: the answer is the push.
    let pushed = s.next().await.expect("a push");
    assert_eq!(
        only(&pushed),
        (Strategy::BlanketRule(BlanketRule::DenyAll as i32), 15)
    );
    srv.stop().await;
}

/// Envoy reports every bucket in one message: a report of 5,000 buckets (about 400 KB, six
/// times the largest `ShouldRateLimit` request) is read and answered whole.
#[tokio::test]
async fn a_report_of_thousands_of_buckets_is_answered() {
    let srv = TestServer::start_default().await;
    let mut s = Stream::open(srv.addr).await;
    let clients: Vec<String> = (0..5_000)
        .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
        .collect();
    let usages = clients
        .iter()
        .map(|c| {
            usage(
                &[
                    ("path", "/transcribe"),
                    ("remote_address", c),
                    (
                        "user_agent",
                        "a user agent as long as a browser's, Mozilla/5.0 (X11)",
                    ),
                ],
                1,
                0,
            )
        })
        .collect();
    let r = s.exchange("talk2me", usages).await;
    assert_eq!(r.bucket_action.len(), 5_000);
    srv.stop().await;
}
