//! The real `sluice` binary: `check` on good and bad files, and `serve` starting, answering
//! health checks and decisions, and stopping cleanly on SIGTERM and SIGINT.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::process::{KillOnDrop, addrs_from_log, serve_on_free_ports, spawn_logged};
use common::*;
use sluice::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn sluice() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd.stdin(Stdio::null());
    cmd
}

#[test]
fn check_prints_the_effective_limits_of_the_default_config() {
    let out = sluice()
        .args(["check", "--config", "config/sluice.yaml"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("training  /api/training/execute"),
        "{stdout}"
    );
    assert!(stdout.contains("burst 3, refill 1/6 seconds"), "{stdout}");
    // The Talk2Me seed's automatic block: more than 100 requests a minute, an hour's block.
    let auto_block = stdout
        .lines()
        .find(|l| l.starts_with("talk2me") && l.contains("auto_block"))
        .unwrap_or_else(|| panic!("no talk2me auto_block row: {stdout}"));
    assert!(
        auto_block.contains("remote_address")
            && auto_block.contains("100/minute [max_requests]")
            && auto_block.contains("block 3600 s"),
        "{auto_block}"
    );
    assert!(stdout.contains("rate limiting ENABLED"), "{stdout}");
}

/// `serve --help` names the connection limits with their defaults; the HTTP/2 switch of the
/// hand-written stack is gone, and asking for it is an error.
#[test]
fn serve_takes_the_connection_limits_and_no_http2_switch() {
    let out = sluice().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{help}");
    for flag in [
        "--max-connections <MAX_CONNECTIONS>",
        "[default: 1024]",
        "--idle-timeout <IDLE_TIMEOUT>",
        "[default: 300s]",
        "--max-request-bytes <MAX_REQUEST_BYTES>",
        "[default: 65536]",
        "--decision-threads <DECISION_THREADS>",
    ] {
        assert!(help.contains(flag), "{flag} missing from\n{help}");
    }
    assert!(!help.contains("--http2"), "{help}");
    let out = sluice().args(["serve", "--http2", "h2"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("unexpected argument '--http2'"), "{err}");
}

/// The log's reader going away (a log collector that died) does not take the server with it:
/// the next log line, here the one a SIGHUP reload writes, is dropped, and decisions go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_outlives_its_closed_log_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = sluice();
    serve_on_free_ports(
        &mut cmd,
        "config/sluice.yaml",
        dir.path().join("state.json"),
    )
    .args(["--reload-interval", "3600s"])
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("a start-up line").unwrap();
        if let Some(at) = line.find("serving RateLimitService addr=") {
            break line[at + 30..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_string();
        }
    };
    drop(lines);
    for _ in 0..3 {
        signal(&child.0, "HUP");
    }
    let mut client = RateLimitServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    for i in 0..20 {
        // The reloads happen meanwhile; each writes a log line into the closed pipe.
        let r = client
            .should_rate_limit(training("/api/training/execute", "192.0.2.9"))
            .await
            .unwrap_or_else(|s| panic!("call {i}: {s:?}"));
        assert_eq!(r.get_ref().statuses.len(), 1);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(child.0.try_wait().unwrap().is_none(), "the server exited");
}

#[test]
fn check_honours_rate_limit_environment_variables() {
    let out = sluice()
        .args(["check"])
        .env("RATE_LIMIT_ENABLED", "false")
        .env("RATE_LIMIT_TRAINING_EXECUTE", "5/minute")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(stdout.contains("rate limiting DISABLED"), "{stdout}");
    assert!(stdout.contains("5/minute [per minute]"), "{stdout}");
}

#[test]
fn check_rejects_a_bad_file_with_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "domains:\n  - name: a\n    endpoints:\n      - path: /x\n        limits: [10/minute, 5/minuet]\n",
    )
    .unwrap();
    let out = sluice()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr.trim(),
        format!(
            "sluice: {}:5: domains[0].endpoints[0].limits[1]: unknown unit \"minuet\" (second, minute, hour, day)",
            path.display()
        )
    );
}

#[test]
fn check_reports_a_missing_file() {
    let out = sluice()
        .args(["check", "--config", "/nonexistent/sluice.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("/nonexistent/sluice.yaml: cannot read config"),
        "{stderr}"
    );
}

/// Starts `sluice serve` on a free port and returns the child and its address, read from the
/// start-up log (the port is chosen by the OS).
fn serve(
    state: &std::path::Path,
    extra_env: &[(&str, &str)],
) -> (Child, String, mpsc::Receiver<String>) {
    let mut cmd = sluice();
    serve_on_free_ports(&mut cmd, "config/sluice.yaml", state);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let (child, rx) = spawn_logged(&mut cmd);
    let ([addr], log) = addrs_from_log(&rx, ["serving RateLimitService"]);
    assert!(
        log.iter().any(|l| l.contains("rate limiting ENABLED")),
        "{log:#?}"
    );
    assert!(
        log.iter().any(|l| l.contains("domain=training")),
        "{log:#?}"
    );
    (child, addr, rx)
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([format!("-{sig}"), child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "sluice did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// Multi-threaded: the client's connection tasks must keep running while the test thread waits
// for the child to exit, or the server's graceful shutdown would wait on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_health_and_decisions_then_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr, rx) = serve(&dir.path().join("state.json"), &[]);
    let url = format!("http://{addr}");
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "envoy.service.ratelimit.v3.RateLimitService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let mut client = RateLimitServiceClient::connect(url).await.unwrap();
    let r = client
        .should_rate_limit(training("/api/training/execute", "192.0.2.1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 9);

    signal(&child, "TERM");
    let status = wait_exit(&mut child);
    assert!(status.success(), "{status:?}");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(rest.iter().any(|l| l.contains("SIGTERM")), "{rest:#?}");
}

#[test]
fn serve_logs_disabled_and_stops_on_sigint() {
    // `serve()` asserts ENABLED in its start-up log; check DISABLED by hand here.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = sluice();
    serve_on_free_ports(
        &mut cmd,
        "config/sluice.yaml",
        dir.path().join("state.json"),
    )
    .env("RATE_LIMIT_ENABLED", "false")
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut saw_disabled = false;
    for line in lines.by_ref() {
        let line = line.unwrap();
        saw_disabled |= line.contains("rate limiting DISABLED");
        if line.contains("serving RateLimitService") {
            break;
        }
    }
    assert!(saw_disabled);
    signal(&child, "INT");
    assert!(wait_exit(&mut child).success());
}

#[test]
fn serve_refuses_a_bad_config_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "domains: nope\n").unwrap();
    let out = serve_on_free_ports(&mut sluice(), &path, dir.path().join("state.json"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("bad.yaml:1: domains: invalid type"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.yaml");
    let yaml = |n: u32| {
        format!(
            "domains:\n  - name: training\n    endpoints:\n      - path: /api/training/execute\n        limits: [{n}/minute]\n"
        )
    };
    std::fs::write(&config, yaml(10)).unwrap();
    let (child, rx) = spawn_logged(
        serve_on_free_ports(&mut sluice(), &config, dir.path().join("state.json"))
            .args(["--reload-interval", "3600s"]),
    );
    let mut child = KillOnDrop(child);
    let ([grpc, http], _) = addrs_from_log(&rx, ["serving RateLimitService", "serving /metrics"]);
    let http: std::net::SocketAddr = http.parse().unwrap();
    let mut client = RateLimitServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let rpu = |r: sluice::proto::envoy::service::ratelimit::v3::RateLimitResponse| {
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit
    };
    let req = || training("/api/training/execute", "192.0.2.1");
    assert_eq!(
        rpu(client.should_rate_limit(req()).await.unwrap().into_inner()),
        10
    );

    std::fs::write(&config, yaml(25)).unwrap();
    signal(&child.0, "HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = http_get(http, "/metrics").await;
        if metric(&body, r#"sluice_config_reloads_total{result="ok"}"#) == Some(1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        rpu(client.should_rate_limit(req()).await.unwrap().into_inner()),
        25
    );

    // A broken file on SIGHUP: refused, logged with file, line and field; the old limits stay.
    std::fs::write(&config, yaml(25).replace("minute", "minuet")).unwrap();
    signal(&child.0, "HUP");
    let line = loop {
        let l = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a reload error line");
        if l.contains("config reload refused") {
            break l;
        }
    };
    assert!(
        line.contains("sluice.yaml:5: domains[0].endpoints[0].limits[0]: unknown unit"),
        "{line}"
    );
    assert_eq!(
        rpu(client.should_rate_limit(req()).await.unwrap().into_inner()),
        25
    );

    signal(&child.0, "TERM");
    assert!(wait_exit(&mut child.0).success());
}
