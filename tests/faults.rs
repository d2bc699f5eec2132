//! Faults, against the real `sluice` binary and real `redis-server`s: a SIGKILL right after an
//! admin call returned, Redis killed and restarted under load, a Redis that answers slowly, and
//! a state file that cannot be written (a full disk, a read-only directory).
//!
//! Every wait is a poll with a deadline; the only timings asserted are upper bounds with a
//! generous margin (a call never waits much past `timeout_ms`), never speeds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::process::spawn_server;
use common::redis::RedisServer;
use common::*;
use sluice::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use sluice::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use sluice::proto::sluice::admin::v1 as pb;
use sluice::proto::sluice::admin::v1::admin_client::AdminClient;
use sluice::service::rls::UNAVAILABLE_BODY;
use tonic::transport::Channel;

/// How long anything the tests wait for (a start, a recovery) may take on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(20);

/// `sluice serve` as a child process on free ports, with its config and state file in a
/// directory of the test's; killed (SIGKILL) on drop.
struct Sluice {
    child: Child,
    http: SocketAddr,
    rls: RateLimitServiceClient<Channel>,
    admin: AdminClient<Channel>,
    config: PathBuf,
    state: PathBuf,
}

impl Sluice {
    /// Starts sluice on `yaml` (written beside the state file) with blocks kept in `state`.
    async fn start(yaml: &str, state: &Path) -> Sluice {
        let config = state.with_file_name("sluice.yaml");
        std::fs::write(&config, yaml).unwrap();
        Self::start_on(config, state.to_path_buf()).await
    }

    async fn start_on(config: PathBuf, state: PathBuf) -> Sluice {
        let (child, _log, [grpc, admin, http]) = spawn_server(
            &mut Command::new(env!("CARGO_BIN_EXE_sluice")),
            &config,
            &state,
            "faults-test-secret",
            &[],
        );
        Sluice {
            child,
            http: http.parse().unwrap(),
            rls: RateLimitServiceClient::connect(format!("http://{grpc}"))
                .await
                .unwrap(),
            admin: AdminClient::connect(format!("http://{admin}"))
                .await
                .unwrap(),
            config,
            state,
        }
    }

    /// SIGKILL, as the OOM killer or a node failure would: no shutdown, no last save.
    fn kill(mut self) -> (PathBuf, PathBuf) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        (self.config.clone(), self.state.clone())
    }

    /// One decision for `ip` on `path` of domain `training`; panics if none comes within 10 s.
    async fn decide(&self, path: &str, ip: &str) -> (RateLimitResponse, Duration) {
        let started = Instant::now();
        let mut rls = self.rls.clone();
        let call = rls.should_rate_limit(training(path, ip));
        let r = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .unwrap_or_else(|_| panic!("no answer for {ip} on {path} within 10 s"))
            .unwrap()
            .into_inner();
        (r, started.elapsed())
    }

    async fn block(&self, ip: &str) -> Result<pb::Block, tonic::Status> {
        self.admin
            .clone()
            .block_ip(authed(pb::BlockIpRequest {
                ip: ip.into(),
                duration_seconds: 3600,
                permanent: false,
                reason: "faults test".into(),
            }))
            .await
            .map(|r| r.into_inner().block.unwrap())
    }

    async fn blocked_ips(&self) -> Vec<String> {
        self.admin
            .clone()
            .list_blocks(authed(pb::ListBlocksRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .blocks
            .into_iter()
            .map(|b| b.ip)
            .collect()
    }

    async fn metric(&self, series: &str) -> f64 {
        let (_, body) = http_get(self.http, "/metrics").await;
        metric(&body, series).unwrap_or_else(|| panic!("{series} in {body}"))
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const BLOCKED_BODY: &str = r#"{"error": "IP temporarily blocked due to excessive requests"}"#;

fn body(r: &RateLimitResponse) -> String {
    String::from_utf8(r.raw_body.clone()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// SIGKILL after BlockIp

const MEMORY_CONFIG: &str = "\
domains:
  - name: training
    endpoints:
      - path: /api/training/execute
        limits: [10/minute]
";

/// Blocks are written to the state file (fsync, rename, fsync of the directory) before
/// `BlockIp` answers, so a SIGKILL right after the answer loses none: 40 blocks are made by 8
/// concurrent callers, the process is killed the moment the 40th answer is in (more calls
/// still in flight), and the restarted binary lists and enforces every block that was answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answered_block_survives_a_sigkill_right_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sluice::start(MEMORY_CONFIG, &dir.path().join("sluice-state.json")).await;
    const ANSWERED: usize = 40;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let callers: Vec<_> = (0..8u8)
        .map(|caller| {
            let admin = s.admin.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                for i in 0..=250u8 {
                    let ip = format!("198.51.{caller}.{i}");
                    let r = admin
                        .clone()
                        .block_ip(authed(pb::BlockIpRequest {
                            ip: ip.clone(),
                            duration_seconds: 3600,
                            permanent: false,
                            reason: "sigkill test".into(),
                        }))
                        .await;
                    match r {
                        Ok(_) => {
                            if tx.send(ip).is_err() {
                                return;
                            }
                        }
                        // The process was killed under this call.
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    drop(tx);
    let mut answered = Vec::new();
    while answered.len() < ANSWERED {
        answered.push(rx.recv().await.expect("callers still running"));
    }
    let (config, state) = s.kill();
    for c in callers {
        c.await.unwrap();
    }

    let s = Sluice::start_on(config, state).await;
    let listed = s.blocked_ips().await;
    for ip in &answered {
        assert!(
            listed.contains(&format!("{ip}/32")),
            "{ip} was answered but is not listed after the restart"
        );
        let (r, _) = s.decide("/api/training/execute", ip).await;
        assert_eq!(r.overall_code, OVER, "{ip} is not enforced");
        assert_eq!(body(&r), BLOCKED_BODY);
    }
    // Another address still passes.
    let (r, _) = s.decide("/api/training/execute", "203.0.113.1").await;
    assert_eq!(r.overall_code, OK);
}

// ---------------------------------------------------------------------------------------------
// Redis down, Redis slow

/// What an answer says about where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Decided from the store: a limit is reported.
    Decided,
    /// OK without a limit: the failure policy `allow`.
    Allowed,
    /// OVER_LIMIT with the "temporarily unavailable" body: the failure policy `deny`.
    Denied,
}

fn answer(r: &RateLimitResponse) -> Answer {
    let limited = r.statuses.iter().all(|s| s.current_limit.is_some());
    let bare = r.statuses.iter().all(|s| s.current_limit.is_none());
    match (r.overall_code, limited, bare) {
        (_, true, _) if !r.statuses.is_empty() => Answer::Decided,
        (OK, _, true) if r.raw_body.is_empty() => Answer::Allowed,
        (OVER, _, true) if body(r) == UNAVAILABLE_BODY => Answer::Denied,
        _ => panic!("an answer neither decided nor by the failure policy: {r:?}"),
    }
}

fn policy_answer(on_error: &str) -> Answer {
    match on_error {
        "allow" => Answer::Allowed,
        "deny" => Answer::Denied,
        other => panic!("on_error {other}"),
    }
}

/// The Redis store at `url` with deadline `timeout_ms` and failure policy `on_error`. `/load`
/// never runs out (the load's answers are all OK when decided); `/probe` admits 3 an hour.
fn redis_config(url: &str, timeout_ms: u64, on_error: &str) -> String {
    format!(
        "\
store:
  url: {url}
  timeout_ms: {timeout_ms}
  on_error: {on_error}
domains:
  - name: training
    endpoints:
      - path: /load
        limits: [1000000/hour]
      - path: /probe
        limits: [3/hour]
"
    )
}

/// One call of the load.
#[derive(Debug, Clone, Copy)]
struct Call {
    started: Instant,
    took: Duration,
    answer: Answer,
}

/// Concurrent callers of `/load`, each from its own addresses, recording every call.
struct Load {
    calls: Arc<parking_lot::Mutex<Vec<Call>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `callers` tasks, each calling one at a time, paced at most one call per 5 ms.
    fn start(rls: &RateLimitServiceClient<Channel>, callers: u8) -> Load {
        let calls = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..callers)
            .map(|caller| {
                let (rls, calls, stop) = (rls.clone(), calls.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut pace = tokio::time::interval(Duration::from_millis(5));
                    let mut i = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        pace.tick().await;
                        i += 1;
                        let ip = format!("10.{caller}.{}.{}", (i / 250) % 250, i % 250);
                        let started = Instant::now();
                        let mut rls = rls.clone();
                        let call = rls.should_rate_limit(training("/load", &ip));
                        let r = tokio::time::timeout(Duration::from_secs(10), call)
                            .await
                            .expect("an answer within 10 s")
                            .expect("ShouldRateLimit answers, whatever Redis does")
                            .into_inner();
                        calls.lock().push(Call {
                            started,
                            took: started.elapsed(),
                            answer: answer(&r),
                        });
                    }
                })
            })
            .collect();
        Load { calls, stop, tasks }
    }

    /// Polls (every 20 ms, for [`DEADLINE`]) until `f` finds what it wants in the calls so far.
    async fn until<T>(&self, what: &str, f: impl Fn(&[Call]) -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(v) = f(&self.calls.lock()) {
                return v;
            }
            assert!(Instant::now() < deadline, "no {what} within {DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until at least `n` calls started at or after `from` have been answered.
    async fn answered_since(&self, from: Instant, n: usize) {
        self.until(&format!("{n} answers"), |calls| {
            (calls.iter().filter(|c| c.started >= from).count() >= n).then_some(())
        })
        .await;
    }

    async fn stop(self) -> Vec<Call> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.calls).unwrap().into_inner()
    }
}

/// Allowance over `timeout_ms` for scheduling on a loaded 2-core machine: a bound, not a speed.
const MARGIN: Duration = Duration::from_millis(1500);

/// Redis killed (SIGKILL) and restarted on the same port while 8 callers keep deciding:
/// while it is down every call is answered by `on_error` within `timeout_ms` (plus margin);
/// once it is back, the same sluice process decides from Redis again, by itself.
async fn redis_killed_and_restarted_under_load(on_error: &str) {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    const TIMEOUT_MS: u64 = 200;
    let yaml = redis_config(&redis.url(), TIMEOUT_MS, on_error);
    let s = Sluice::start(&yaml, &dir.path().join("sluice-state.json")).await;
    let load = Load::start(&s.rls, 8);
    load.answered_since(Instant::now(), 40).await;

    let killing = Instant::now();
    redis.stop();
    let down = Instant::now();
    load.answered_since(down, 60).await;
    let restarting = Instant::now();
    redis.restart();
    let recovered = load
        .until("decision from the restarted Redis", |calls| {
            calls
                .iter()
                .filter(|c| c.started >= restarting && c.answer == Answer::Decided)
                .map(|c| c.started)
                .min()
        })
        .await;
    load.answered_since(Instant::now(), 40).await;
    let calls = load.stop().await;

    let timeout = Duration::from_millis(TIMEOUT_MS);
    let mut by_policy = 0;
    for c in &calls {
        if c.started + c.took < killing {
            assert_eq!(c.answer, Answer::Decided, "before the kill: {c:?}");
        }
        // Answered entirely while Redis was down (a call in flight across the restart may
        // reach the new server).
        if c.started >= down && c.started + c.took < restarting {
            assert_eq!(c.answer, policy_answer(on_error), "Redis down: {c:?}");
            assert!(c.took < timeout + MARGIN, "Redis down: {c:?}");
            by_policy += 1;
        }
        // Once back, it stays back.
        if c.started > recovered {
            assert_eq!(c.answer, Answer::Decided, "after the recovery: {c:?}");
        }
    }
    assert!(by_policy >= 60, "{by_policy}");
    assert!(
        s.metric("sluice_store_errors_total").await >= by_policy as f64,
        "every policy answer is counted"
    );

    // Counting is in Redis again: a fresh client gets its 3 an hour, then the 4th is refused;
    // the restarted (empty) server holds counters again.
    for i in 1..=4 {
        let (r, _) = s.decide("/probe", "192.0.2.99").await;
        assert_eq!(answer(&r), Answer::Decided, "probe {i}: {r:?}");
        assert_eq!(r.overall_code == OK, i <= 3, "probe {i}: {r:?}");
    }
    let keys: u64 = redis.cli(&["DBSIZE"]).trim().parse().unwrap();
    assert!(keys > 0, "no counters in the restarted Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_with_on_error_deny_refuses_then_recovers_by_itself() {
    redis_killed_and_restarted_under_load("deny").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_with_on_error_allow_admits_then_recovers_by_itself() {
    redis_killed_and_restarted_under_load("allow").await;
}

/// A loopback TCP proxy in front of Redis that holds each chunk of Redis's replies for
/// `delay` (settable at any time) before passing it on, in order; requests pass at once.
struct SlowProxy {
    addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowProxy {
    async fn start(upstream: SocketAddr) -> SlowProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = delay_ms.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (mut client_r, mut client_w) = client.into_split();
                let (mut server_r, mut server_w) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_r, &mut server_w).await;
                });
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
                let delay = delay.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = server_r.read(&mut buf).await {
                        let due =
                            Instant::now() + Duration::from_millis(delay.load(Ordering::Relaxed));
                        if tx.send((due, buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                });
                tokio::spawn(async move {
                    while let Some((due, chunk)) = rx.recv().await {
                        tokio::time::sleep_until(due.into()).await;
                        if client_w.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        SlowProxy {
            addr,
            delay_ms,
            task,
        }
    }

    fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Redis behind [`SlowProxy`]: replies held 3 s, far past `timeout_ms` (300 ms). Every call,
/// 8 at a time, is answered by `on_error` within `timeout_ms` plus margin; with the replies
/// prompt again, decisions come from Redis again.
async fn a_slow_redis_never_holds_a_call_past_timeout_ms(on_error: &str) {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let proxy = SlowProxy::start(([127, 0, 0, 1], redis.port).into()).await;
    let dir = tempfile::tempdir().unwrap();
    const TIMEOUT_MS: u64 = 300;
    let yaml = redis_config(&format!("redis://{}", proxy.addr), TIMEOUT_MS, on_error);
    let s = Sluice::start(&yaml, &dir.path().join("sluice-state.json")).await;
    let deadline = Instant::now() + DEADLINE;
    while answer(&s.decide("/load", "192.0.2.1").await.0) != Answer::Decided {
        assert!(Instant::now() < deadline, "no decision through the proxy");
    }

    proxy.set_delay(Duration::from_secs(3));
    let bound = Duration::from_millis(TIMEOUT_MS) + MARGIN;
    for round in 0..3 {
        let calls = (0..8).map(|i| {
            let s = &s;
            async move { s.decide("/load", &format!("192.0.2.{}", 10 + i)).await }
        });
        for (r, took) in futures_util::future::join_all(calls).await {
            assert_eq!(answer(&r), policy_answer(on_error), "round {round}: {r:?}");
            assert!(took < bound, "round {round}: a call took {took:?}");
        }
    }

    proxy.set_delay(Duration::ZERO);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (r, took) = s.decide("/load", "192.0.2.2").await;
        assert!(took < bound, "{took:?}");
        if answer(&r) == Answer::Decided {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no decision once Redis is prompt"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_with_on_error_deny_refuses_within_timeout_ms() {
    a_slow_redis_never_holds_a_call_past_timeout_ms("deny").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_with_on_error_allow_admits_within_timeout_ms() {
    a_slow_redis_never_holds_a_call_past_timeout_ms("allow").await;
}

/// A decision can take two round trips: a refused request of a domain with
/// `auto_block.max_limited` is counted towards the block after the refusal. Both share the
/// one deadline: with every reply held 2.7 s and `timeout_ms` 3 s, each round trip alone is
/// in time, both together would take 5.4 s, and the call is answered by `on_error` at 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_round_trips_of_one_decision_share_one_timeout_ms() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let proxy = SlowProxy::start(([127, 0, 0, 1], redis.port).into()).await;
    let dir = tempfile::tempdir().unwrap();
    const TIMEOUT_MS: u64 = 3000;
    let yaml = format!(
        "\
store:
  url: redis://{}
  timeout_ms: {TIMEOUT_MS}
  on_error: deny
domains:
  - name: training
    auto_block:
      max_limited: 1000/minute
    endpoints:
      - path: /probe
        limits: [1/hour]
",
        proxy.addr
    );
    let s = Sluice::start(&yaml, &dir.path().join("sluice-state.json")).await;
    let (r, _) = s.decide("/probe", "192.0.2.1").await;
    assert_eq!((answer(&r), r.overall_code), (Answer::Decided, OK), "{r:?}");

    // The next one is over its limit: Redis refuses it (one round trip; the over-limit cache
    // cannot answer, Redis has not refused this key yet), then counts it as limited (two).
    proxy.set_delay(Duration::from_millis(2700));
    let (r, took) = s.decide("/probe", "192.0.2.1").await;
    assert!(
        took < Duration::from_millis(TIMEOUT_MS) + MARGIN,
        "the call took {took:?}"
    );
    assert_eq!(answer(&r), Answer::Denied, "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// A state file that cannot be written

/// The directory of the state file, and a way to make writing in it fail.
///
/// When the test may mount (root with `CAP_SYS_ADMIN`, as in most CI containers), the
/// directory is a 256 KiB tmpfs of its own: "full" fills it, "read-only" remounts it read-only,
/// both real. Otherwise the step every save starts with, creating the temporary file beside
/// the state file (`sluice-state.tmp`), is made to fail the same way: a symlink to `/dev/full`
/// for "full", and for "read-only" the directory's mode 0555, or, as root (whom modes do not
/// stop), a directory in the temporary file's place. Never a skip. `SLUICE_TEST_NO_MOUNT=1`
/// takes the fallbacks where mounting works.
struct StateDir {
    path: PathBuf,
    mounted: bool,
}

/// How saving will fail, and the OS error it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broken {
    Full,
    ReadOnly,
}

impl StateDir {
    fn new(parent: &Path) -> StateDir {
        let path = parent.join("state");
        std::fs::create_dir(&path).unwrap();
        let mounted = std::env::var_os("SLUICE_TEST_NO_MOUNT").is_none()
            && Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=256k", "sluice-faults"])
                .arg(&path)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        eprintln!(
            "state directory {}: {}",
            path.display(),
            if mounted {
                "a tmpfs of its own"
            } else {
                "cannot mount here; the temporary file's path is made unusable instead"
            }
        );
        StateDir { path, mounted }
    }

    fn state(&self) -> PathBuf {
        self.path.join("sluice-state.json")
    }

    /// Where [`sluice::access::AccessList::persist`] writes before renaming.
    fn temporary(&self) -> PathBuf {
        self.state().with_extension("tmp")
    }

    /// Makes saving fail; returns the OS error message sluice should report.
    fn make_unwritable(&self, how: Broken) -> &'static str {
        match (how, self.mounted) {
            (Broken::Full, true) => {
                use std::io::Write as _;
                let mut filler = std::fs::File::create(self.path.join("filler")).unwrap();
                let chunk = [0u8; 4096];
                let err = loop {
                    if let Err(e) = filler.write_all(&chunk) {
                        break e;
                    }
                };
                assert_eq!(err.raw_os_error(), Some(28), "ENOSPC: {err}");
                "No space left on device"
            }
            (Broken::Full, false) => {
                std::os::unix::fs::symlink("/dev/full", self.temporary()).unwrap();
                "No space left on device"
            }
            (Broken::ReadOnly, true) => {
                self.mount(&["-o", "remount,ro"]);
                "Read-only file system"
            }
            (Broken::ReadOnly, false) if effective_uid() != 0 => {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o555))
                    .unwrap();
                "Permission denied"
            }
            (Broken::ReadOnly, false) => {
                std::fs::create_dir(self.temporary()).unwrap();
                "Is a directory"
            }
        }
    }

    /// Undoes [`Self::make_unwritable`].
    fn repair(&self, how: Broken) {
        match (how, self.mounted) {
            (Broken::Full, true) => std::fs::remove_file(self.path.join("filler")).unwrap(),
            (Broken::Full, false) => {
                let _ = std::fs::remove_file(self.temporary());
            }
            (Broken::ReadOnly, true) => self.mount(&["-o", "remount,rw"]),
            (Broken::ReadOnly, false) if effective_uid() != 0 => {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o755))
                    .unwrap();
            }
            (Broken::ReadOnly, false) => std::fs::remove_dir(self.temporary()).unwrap(),
        }
    }

    fn mount(&self, args: &[&str]) {
        let status = Command::new("mount")
            .args(args)
            .arg(&self.path)
            .status()
            .unwrap();
        assert!(status.success(), "mount {args:?}");
    }

    /// The directory's entries, sorted.
    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// This process's effective user id, from `/proc/self/status`.
fn effective_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .expect("Uid: line in /proc/self/status")
}

/// A save that fails fails the admin call, naming the file and the OS error; the old state
/// file is left as it was (a restart on it has the blocks saved before, not the failed one),
/// nothing half-written is left beside it, and once writing works again the next call saves.
async fn an_unwritable_state_directory_fails_the_call_and_keeps_the_old_file(how: Broken) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.yaml");
    std::fs::write(&config, MEMORY_CONFIG).unwrap();
    let state_dir = StateDir::new(dir.path());
    let state = state_dir.state();
    let s = Sluice::start_on(config, state.clone()).await;
    s.block("192.0.2.1").await.unwrap();
    let before = std::fs::read(&state).unwrap();
    let entries = state_dir.entries();

    let os_error = state_dir.make_unwritable(how);
    let err = s.block("192.0.2.2").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
    let message = err.message();
    assert!(
        message.contains("not saved")
            && message.contains(&state.display().to_string())
            && message.contains(os_error),
        "{message}"
    );
    assert_eq!(
        std::fs::read(&state).unwrap(),
        before,
        "the old file, intact"
    );
    if how == Broken::Full {
        let mut now = state_dir.entries();
        now.retain(|e| e != "filler");
        assert_eq!(now, entries, "nothing left beside the state file");
    }

    // A crash now: the restart reads the old file, whatever the directory's state.
    let (config, state) = s.kill();
    let s = Sluice::start_on(config, state).await;
    assert_eq!(s.blocked_ips().await, ["192.0.2.1/32"]);
    let (r, _) = s.decide("/api/training/execute", "192.0.2.1").await;
    assert_eq!(body(&r), BLOCKED_BODY);

    state_dir.repair(how);
    s.block("192.0.2.3").await.unwrap();
    let (config, state) = s.kill();
    let s = Sluice::start_on(config, state).await;
    assert_eq!(s.blocked_ips().await, ["192.0.2.1/32", "192.0.2.3/32"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_admin_call_and_keeps_the_old_state_file() {
    an_unwritable_state_directory_fails_the_call_and_keeps_the_old_file(Broken::Full).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_state_directory_fails_the_admin_call_and_keeps_the_old_file() {
    an_unwritable_state_directory_fails_the_call_and_keeps_the_old_file(Broken::ReadOnly).await;
}
