//! Operations: Prometheus metrics after known traffic, health and readiness, hot reload (rename,
//! in-place write, symlink swap, SIGHUP), a broken or oversize reload keeping the old limits,
//! reloads parsed off the runtime workers, shadow mode.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sluice::config;
use sluice::proto::sluice::admin::v1 as pb;
use sluice::reload::{self, Reloader};

const EXECUTE_OK: &str =
    r#"sluice_decisions_total{domain="training",endpoint="/api/training/execute",code="ok"}"#;
const EXECUTE_OVER: &str = r#"sluice_decisions_total{domain="training",endpoint="/api/training/execute",code="over_limit"}"#;

#[tokio::test]
async fn metrics_count_known_traffic() {
    let srv = TestServer::start_default().await;
    for _ in 0..12 {
        srv.call(training("/api/training/execute", "192.0.2.1"))
            .await;
    }
    srv.call(talk2me("/transcribe", "192.0.2.2", "ua")).await;
    srv.admin()
        .await
        .block_ip(authed(pb::BlockIpRequest {
            ip: "192.0.2.3".into(),
            duration_seconds: 60,
            ..Default::default()
        }))
        .await
        .unwrap();
    srv.call(training("/api/training/execute", "192.0.2.3"))
        .await;

    let (status, body) = http_get(srv.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    let m = |s: &str| metric(&body, s).unwrap_or_else(|| panic!("no {s} in\n{body}"));
    assert_eq!(m(EXECUTE_OK), 10.0);
    assert_eq!(m(EXECUTE_OVER), 2.0);
    assert_eq!(
        m(
            r#"sluice_over_limit_total{domain="training",endpoint="/api/training/execute",limit="per minute"}"#
        ),
        2.0
    );
    assert_eq!(
        m(r#"sluice_near_limit_total{domain="training",endpoint="/api/training/execute"}"#),
        3.0
    );
    assert_eq!(
        m(r#"sluice_requests_total{domain="training",code="ok"}"#),
        10.0
    );
    assert_eq!(
        m(r#"sluice_requests_total{domain="training",code="over_limit"}"#),
        2.0
    );
    assert_eq!(
        m(r#"sluice_requests_total{domain="training",code="blocked"}"#),
        1.0
    );
    assert_eq!(
        m(r#"sluice_decisions_total{domain="talk2me",endpoint="global",code="ok"}"#),
        1.0
    );
    assert_eq!(m("sluice_blocked_total"), 1.0);
    assert_eq!(m("sluice_active_blocks"), 1.0);
    assert_eq!(m("sluice_tracked_clients"), 3.0);
    assert!(m("sluice_tracked_keys") >= 4.0);
    assert_eq!(m("sluice_store_evictions_total"), 0.0);
    assert_eq!(m("sluice_store_over_limit_cache_hits_total"), 0.0);
    assert_eq!(m("sluice_decision_duration_seconds_count"), 14.0);
    assert_eq!(
        m(r#"sluice_decision_duration_seconds_bucket{le="+Inf"}"#),
        14.0
    );
    assert_eq!(m(r#"sluice_config_reloads_total{result="failed"}"#), 0.0);
    assert_eq!(m("sluice_config_generation"), 1.0);
    assert!(body.contains("sluice_config_info{hash=\""), "{body}");
    assert!(
        !body.contains("192.0.2"),
        "no client address may become a label"
    );
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let srv = TestServer::start_default().await;
    assert_eq!(
        http_get(srv.http_addr, "/healthz").await,
        (200, "ok\n".into())
    );
    assert_eq!(
        http_get(srv.http_addr, "/readyz").await,
        (200, "ready\n".into())
    );
    assert_eq!(http_get(srv.http_addr, "/nope").await.0, 404);
}

fn cfg_text(execute: &str) -> String {
    format!(
        "domains:\n  - name: training\n    endpoints:\n      - path: /api/training/execute\n        limits: [{execute}]\n"
    )
}

/// A server on the config at `path`, with a reloader for it.
async fn server_on(path: &Path) -> (TestServer, Arc<Reloader<sluice::store::MemoryStore>>) {
    let cfg = config::load(path).unwrap();
    let store = cfg.store;
    let srv = TestServer::start_with(cfg).await;
    let reloader = Arc::new(Reloader::new(
        path.to_path_buf(),
        srv.limiter.clone(),
        store,
    ));
    (srv, reloader)
}

async fn limit_of(srv: &TestServer, ip: &str) -> (u32, u32) {
    let r = srv.call(training("/api/training/execute", ip)).await;
    let s = &r.statuses[0];
    (
        s.current_limit.as_ref().unwrap().requests_per_unit,
        s.limit_remaining,
    )
}

#[tokio::test]
async fn reload_by_rename_keeps_counters_of_unchanged_limits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, cfg_text("10/minute")).unwrap();
    let (srv, reloader) = server_on(&path).await;
    for _ in 0..3 {
        srv.call(training("/api/training/execute", "192.0.2.1"))
            .await;
    }
    // An editor's atomic save: write elsewhere, rename over.
    let tmp = dir.path().join(".sluice.yaml.swp");
    std::fs::write(&tmp, cfg_text("20/minute")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    reloader.poll();
    // Same limit identity (name, window, algorithm): the 3 hits are still counted.
    assert_eq!(limit_of(&srv, "192.0.2.1").await, (20, 16));
    let stats = srv.limiter.stats();
    assert_eq!(
        stats.reloads_ok.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        stats
            .config_generation
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // Nothing changed since: polling again does nothing.
    reloader.poll();
    assert_eq!(
        stats.reloads_ok.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn reload_by_in_place_write_is_picked_up_by_the_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, cfg_text("10/minute")).unwrap();
    let (srv, reloader) = server_on(&path).await;
    let watcher = tokio::spawn(reload::watch(reloader, Duration::from_millis(20)));
    std::fs::write(&path, cfg_text("5/minute")).unwrap();
    // The watcher is asynchronous: poll for its effect with a deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if limit_of(&srv, "192.0.2.9").await.0 == 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the in-place write was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watcher.abort();
}

#[cfg(unix)]
#[tokio::test]
async fn reload_by_configmap_symlink_swap() {
    use std::os::unix::fs::symlink;
    // Kubernetes mounts: sluice.yaml -> ..data/sluice.yaml, ..data -> ..2026_v1 (swapped atomically).
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..v1")).unwrap();
    std::fs::create_dir(d.join("..v2")).unwrap();
    std::fs::write(d.join("..v1/sluice.yaml"), cfg_text("10/minute")).unwrap();
    std::fs::write(d.join("..v2/sluice.yaml"), cfg_text("7/minute")).unwrap();
    symlink("..v1", d.join("..data")).unwrap();
    symlink("..data/sluice.yaml", d.join("sluice.yaml")).unwrap();
    let (srv, reloader) = server_on(&d.join("sluice.yaml")).await;
    assert_eq!(limit_of(&srv, "192.0.2.1").await.0, 10);
    symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    reloader.poll();
    assert_eq!(limit_of(&srv, "192.0.2.1").await.0, 7);
}

#[tokio::test]
async fn a_broken_reload_keeps_the_old_limits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, cfg_text("10/minute")).unwrap();
    let (srv, reloader) = server_on(&path).await;
    std::fs::write(&path, cfg_text("10/minuet")).unwrap();
    let err = reloader.reload("test").unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}:5: domains[0].endpoints[0].limits[0]: unknown unit \"minuet\" (second, minute, hour, day)",
            path.display()
        )
    );
    assert_eq!(limit_of(&srv, "192.0.2.1").await.0, 10);
    // The watcher tries a broken file once, not every second.
    reloader.poll();
    let (_, body) = http_get(srv.http_addr, "/metrics").await;
    assert_eq!(
        metric(&body, r#"sluice_config_reloads_total{result="failed"}"#),
        Some(1.0)
    );
    assert_eq!(metric(&body, "sluice_config_generation"), Some(1.0));
    // Fixed: it loads.
    std::fs::write(&path, cfg_text("12/minute")).unwrap();
    reloader.poll();
    assert_eq!(limit_of(&srv, "192.0.2.1").await.0, 12);
}

#[tokio::test]
async fn an_oversize_reload_keeps_the_old_limits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, cfg_text("10/minute")).unwrap();
    let (srv, reloader) = server_on(&path).await;
    // Over the bound (sparse: nothing is written, and nothing will be read).
    let max = config::guard::MAX_FILE_BYTES;
    std::fs::write(&path, cfg_text("5/minute")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(max + 1)
        .unwrap();
    let watcher = tokio::spawn(reload::watch(reloader.clone(), Duration::from_millis(20)));
    let failed = || {
        srv.limiter
            .stats()
            .reloads_failed
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while failed() == 0 {
        assert!(
            Instant::now() < deadline,
            "the oversize file was not refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watcher.abort();
    assert_eq!(limit_of(&srv, "192.0.2.1").await.0, 10);
    assert_eq!(failed(), 1, "refused once, not at every poll");
    let err = reloader.reload("test").unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "{}: refused before parsing: {} bytes, over the bound of {max} bytes on a config file",
            path.display(),
            max + 1
        )
    );
    assert_eq!(limit_of(&srv, "192.0.2.1").await.0, 10);
}

/// The watcher reads and parses on a blocking thread, never on a runtime worker. The config
/// becomes a named pipe, whose reads block until a writer comes, on a runtime with one worker:
/// the writer only writes once a timer has fired on that worker while the watcher is reading.
/// Were the read on the worker, the timer could never fire and nothing would be written.
#[cfg(unix)]
#[test]
fn a_reload_is_read_and_parsed_off_the_runtime_workers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.yaml");
    std::fs::write(&path, cfg_text("10/minute")).unwrap();
    let (may_write, write_gate) = std::sync::mpsc::channel::<()>();
    let (done, finished) = std::sync::mpsc::channel::<(u32, u32)>();
    let p = path.clone();
    // Serves every read of the pipe with the new config, once allowed to.
    std::thread::spawn(move || {
        if write_gate.recv().is_err() {
            return;
        }
        loop {
            let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&p) else {
                return;
            };
            let _ = std::io::Write::write_all(&mut f, cfg_text("5/minute").as_bytes());
        }
    });
    let p = path.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (srv, reloader) = server_on(&p).await;
            std::fs::remove_file(&p).unwrap();
            let made = std::process::Command::new("mkfifo")
                .arg(&p)
                .status()
                .unwrap();
            assert!(made.success(), "mkfifo");
            let _watcher = tokio::spawn(reload::watch(reloader, Duration::from_millis(20)));
            // The watcher polls at once and blocks reading the pipe; this timer still fires.
            tokio::time::sleep(Duration::from_millis(50)).await;
            may_write.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let limit = limit_of(&srv, "192.0.2.1").await;
                if limit.0 == 5 || Instant::now() > deadline {
                    let _ = done.send(limit);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        // The watcher may be blocked reading the pipe again: do not wait for it.
        rt.shutdown_background();
    });
    let limit = finished
        .recv_timeout(Duration::from_secs(60))
        .expect("the runtime's only worker was blocked by the reload");
    assert_eq!(limit.0, 5, "the new config was loaded");
}

#[tokio::test]
async fn shadow_mode_lets_traffic_through_while_counting_it() {
    let srv = TestServer::start(
        "shadow: true\ndomains:\n  - name: training\n    endpoints:\n      - path: /api/training/execute\n        limits: [2/minute]\n",
    )
    .await;
    for _ in 0..4 {
        let r = srv
            .call(training("/api/training/execute", "192.0.2.1"))
            .await;
        assert_eq!(r.overall_code, 1, "shadow mode answers OK");
        assert!(r.raw_body.is_empty());
    }
    let (_, body) = http_get(srv.http_addr, "/metrics").await;
    let shadow = r#"sluice_shadow_over_limit_total{domain="training",endpoint="/api/training/execute",limit="per minute"}"#;
    assert_eq!(metric(&body, shadow), Some(2.0));
    assert_eq!(metric(&body, EXECUTE_OVER), Some(0.0));
}

#[tokio::test]
async fn a_shadow_limit_is_watched_while_the_others_are_enforced() {
    let srv = TestServer::start(
        "domains:\n  - name: training\n    endpoints:\n      - path: /api/training/execute\n        limits: [{rate: 1/minute, shadow: true, name: candidate}, 3/minute]\n",
    )
    .await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(
            srv.call(training("/api/training/execute", "192.0.2.1"))
                .await
                .overall_code,
        );
    }
    assert_eq!(codes, [1, 1, 1, 2], "only the enforced 3/minute limits");
    let (_, body) = http_get(srv.http_addr, "/metrics").await;
    let shadow = r#"sluice_shadow_over_limit_total{domain="training",endpoint="/api/training/execute",limit="candidate"}"#;
    assert_eq!(metric(&body, shadow), Some(3.0));
    let over = r#"sluice_over_limit_total{domain="training",endpoint="/api/training/execute",limit="per minute"}"#;
    assert_eq!(metric(&body, over), Some(1.0));
}

#[tokio::test]
async fn evictions_from_a_full_store_are_counted() {
    // 256 keys in 256 shards: one counter per shard, so 300 clients must evict at least 44.
    let srv = TestServer::start(
        "
store:
  max_keys: 256
domains:
  - name: load
    client: [remote_address]
    endpoints:
      - path: /bench
        limits: [100/minute]
",
    )
    .await;
    for i in 0..300 {
        let r = request(
            "load",
            vec![descriptor(&[
                ("path", "/bench"),
                ("remote_address", &format!("10.1.{}.{}", i / 256, i % 256)),
            ])],
        );
        assert_eq!(srv.call(r).await.overall_code, OK);
    }
    let (_, body) = http_get(srv.http_addr, "/metrics").await;
    let evictions = metric(&body, "sluice_store_evictions_total").unwrap();
    assert!((44.0..300.0).contains(&evictions), "{evictions}");
    assert!(metric(&body, "sluice_tracked_keys").unwrap() <= 256.0);
    srv.stop().await;
}
