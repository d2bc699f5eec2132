//! Server reflection (v1 and v1alpha) and health, through the real grpcurl and a tonic client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;
use prost::Message as _;
use tokio_stream::StreamExt as _;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

/// Runs `grpcurl -plaintext FLAGS ADDR ARGS`; `None` (skipped, loudly) when grpcurl is missing
/// outside CI.
fn grpcurl(addr: &std::net::SocketAddr, flags: &[&str], args: &[&str]) -> Option<String> {
    let bin = tool("grpcurl")?;
    let out = Command::new(bin)
        .arg("-plaintext")
        .args(flags)
        .arg(addr.to_string())
        .args(args)
        .output()
        .expect("run grpcurl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_and_describes_the_services() {
    let srv = TestServer::start_default().await;
    let Some(list) = grpcurl(&srv.addr, &[], &["list"]) else {
        return;
    };
    for service in [
        "envoy.service.ratelimit.v3.RateLimitService",
        "envoy.service.rate_limit_quota.v3.RateLimitQuotaService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            list.lines().any(|l| l == service),
            "{service} missing from:\n{list}"
        );
    }
    let described = grpcurl(
        &srv.addr,
        &[],
        &["describe", "envoy.service.ratelimit.v3.RateLimitService"],
    )
    .unwrap();
    assert!(
        described.contains(
            "rpc ShouldRateLimit ( .envoy.service.ratelimit.v3.RateLimitRequest ) returns ( .envoy.service.ratelimit.v3.RateLimitResponse );"
        ),
        "{described}"
    );
    let message = grpcurl(
        &srv.addr,
        &[],
        &[
            "describe",
            "envoy.extensions.common.ratelimit.v3.RateLimitDescriptor",
        ],
    )
    .unwrap();
    assert!(message.contains("bool is_negative_hits = 4;"), "{message}");
    let quota = grpcurl(
        &srv.addr,
        &[],
        &[
            "describe",
            "envoy.service.rate_limit_quota.v3.RateLimitQuotaService",
        ],
    )
    .unwrap();
    assert!(
        quota.contains("rpc StreamRateLimitQuotas ( stream .envoy.service.rate_limit_quota.v3.RateLimitQuotaUsageReports ) returns ( stream .envoy.service.rate_limit_quota.v3.RateLimitQuotaResponse );"),
        "{quota}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_calls_should_rate_limit_through_reflection() {
    let srv = TestServer::start_default().await;
    let body = r#"{"domain": "training", "descriptors": [{"entries": [{"key": "path", "value": "/api/training/execute"}, {"key": "remote_address", "value": "203.0.113.7"}]}]}"#;
    let Some(out) = grpcurl(
        &srv.addr,
        &["-d", body],
        &["envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"],
    ) else {
        return;
    };
    let json: serde_json::Value = serde_json::from_str(&out).expect("grpcurl prints JSON");
    assert_eq!(json["overallCode"], "OK", "{out}");
    let status = &json["statuses"][0];
    assert_eq!(status["code"], "OK");
    assert_eq!(status["currentLimit"]["requestsPerUnit"], 10);
    assert_eq!(status["currentLimit"]["unit"], "MINUTE");
    assert_eq!(status["limitRemaining"], 9);
    assert_eq!(status["durationUntilReset"], "60s");

    // Malformed input through grpcurl: INVALID_ARGUMENT naming the field.
    let bin = tool("grpcurl").unwrap();
    let out = Command::new(bin)
        .args(["-plaintext", "-d", r#"{"domain": "", "descriptors": []}"#])
        .arg(srv.addr.to_string())
        .arg("envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Code: InvalidArgument"), "{stderr}");
    assert!(stderr.contains("domain: must not be empty"), "{stderr}");
}

/// One reflection request over `channel`: the first answer, and the rest of the stream.
async fn reflect(
    channel: tonic::transport::Channel,
    request: MessageRequest,
) -> (
    tonic_reflection::pb::v1::ServerReflectionResponse,
    tonic::Streaming<tonic_reflection::pb::v1::ServerReflectionResponse>,
) {
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    (first, stream)
}

/// The services reflection lists on the listener at `addr`.
async fn listed_services(addr: std::net::SocketAddr) -> Vec<String> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (resp, _) = reflect(channel, MessageRequest::ListServices(String::new())).await;
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected {resp:?}");
    };
    list.service.into_iter().map(|s| s.name).collect()
}

#[tokio::test]
async fn reflection_v1_lists_the_services() {
    let srv = TestServer::start_default().await;
    let names = listed_services(srv.addr).await;
    for service in [
        "envoy.service.ratelimit.v3.RateLimitService",
        "envoy.service.rate_limit_quota.v3.RateLimitQuotaService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == service),
            "{service} missing: {names:?}"
        );
    }
    // Each listener lists what it serves: the admin service is on the admin listener only.
    assert!(
        !names.iter().any(|n| n == "sluice.admin.v1.Admin"),
        "{names:?}"
    );
    let names = listed_services(srv.admin_addr).await;
    assert!(
        names.iter().any(|n| n == "sluice.admin.v1.Admin"),
        "{names:?}"
    );
    assert!(
        !names
            .iter()
            .any(|n| n == "envoy.service.ratelimit.v3.RateLimitService"),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_admin_commands_work_through_grpcurl() {
    let srv = TestServer::start_default().await;
    let Some(bin) = tool("grpcurl") else { return };
    let admin = srv.admin_addr.to_string();
    let run = |header: Option<&str>, body: Option<&str>, method: &str| {
        let mut cmd = Command::new(&bin);
        cmd.arg("-plaintext");
        if let Some(h) = header {
            cmd.args(["-H", h]);
        }
        if let Some(b) = body {
            cmd.args(["-d", b]);
        }
        cmd.arg(&admin).arg(method).output().unwrap()
    };
    let token = format!("x-admin-token: {ADMIN_TOKEN}");
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let list = run(None, None, "list");
    assert!(String::from_utf8_lossy(&list.stdout).contains("sluice.admin.v1.Admin"));
    let block = ok(run(
        Some(&token),
        Some(r#"{"ip": "192.0.2.7", "duration_seconds": 3600, "reason": "scraping"}"#),
        "sluice.admin.v1.Admin/BlockIp",
    ));
    assert_eq!(block["block"]["ip"], "192.0.2.7/32");
    assert_eq!(block["block"]["reason"], "scraping");
    let blocks = ok(run(Some(&token), None, "sluice.admin.v1.Admin/ListBlocks"));
    assert_eq!(blocks["blocks"].as_array().unwrap().len(), 1);
    let stats = ok(run(
        Some(&token),
        Some(r#"{"top": 5}"#),
        "sluice.admin.v1.Admin/GetStats",
    ));
    assert_eq!(stats["activeBlocks"], "1");
    let cfg = ok(run(
        Some(&token),
        Some(r#"{"domain": "training"}"#),
        "sluice.admin.v1.Admin/GetConfig",
    ));
    assert_eq!(cfg["domains"][0]["name"], "training");
    let unauth = run(None, None, "sluice.admin.v1.Admin/ListBlocks");
    assert!(!unauth.status.success());
    assert!(String::from_utf8_lossy(&unauth.stderr).contains("Code: Unauthenticated"));
}

/// Health and reflection reach tonic's router through the decision listener's own HTTP/2 code
/// (src/service/connection.rs), which must pace response bodies by the client's flow-control
/// window. With a 128-byte stream window, the descriptor answer (kilobytes) arrives only if the
/// body is sent in window-sized pieces as the client grants more, and the call still ends OK.
#[tokio::test]
async fn reflection_answers_larger_than_the_clients_window_arrive_whole() {
    let srv = TestServer::start_default().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", srv.addr))
        .unwrap()
        .initial_stream_window_size(Some(128))
        .connect()
        .await
        .unwrap();
    let (resp, mut stream) = reflect(
        channel.clone(),
        MessageRequest::FileContainingSymbol("envoy.service.ratelimit.v3.RateLimitService".into()),
    )
    .await;
    let Some(MessageResponse::FileDescriptorResponse(files)) = resp.message_response else {
        panic!("unexpected {resp:?}");
    };
    let bytes: usize = files.file_descriptor_proto.iter().map(Vec::len).sum();
    assert!(bytes > 16 * 128, "only {bytes} bytes of descriptors");
    let names: Vec<String> = files
        .file_descriptor_proto
        .iter()
        .map(|b| {
            prost_types::FileDescriptorProto::decode(b.as_slice())
                .unwrap()
                .name()
                .to_string()
        })
        .collect();
    assert!(
        names.iter().any(|n| n.ends_with("rls.proto")),
        "rls.proto missing: {names:?}"
    );
    // The request stream has ended, so the call ends, with status OK.
    assert!(stream.next().await.is_none());

    // Health over the same connection.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "envoy.service.ratelimit.v3.RateLimitService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}
