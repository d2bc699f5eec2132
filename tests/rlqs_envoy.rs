//! End to end over RLQS through the real Envoy: `envoy/envoy-rlqs.yaml` in front of the stand-in
//! upstreams, its quota filter streaming Talk2Me's bucket usage to the real `sluice` binary and
//! enforcing what sluice assigns, every request over loopback HTTP.
//!
//! Each test starts its own stack on ports the OS picks, as `tests/envoy_e2e.rs` does: sluice
//! (one or two), the stand-ins, and Envoy (one or two) on a copy of `envoy/envoy-rlqs.yaml` with
//! only its addresses and the ShouldRateLimit timeout (2 s) changed.
//!
//! Envoy 1.40 reports every 5 s, so what sluice decides reaches Envoy within about one report.
//! The tests wait for it by polling, with deadlines of one report and some slack, on what they
//! can observe: sluice's `GetStats` (each stream's buckets, their assignments, the usage Envoy
//! reported) and Envoy's log line for each token bucket it builds
//! (`--component-log-level rate_limit_quota:info`). The one wait that is a duration rather than
//! an event is outliving an assignment's time to live: those tests keep probing until it has
//! passed.
//!
//! Without Envoy (see `scripts/setup-test-env`) the tests skip loudly; with `CI=true` they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod envoy;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{ADMIN_TOKEN, authed, repo_path, tool};
use envoy::{
    Proc, Req, Resp, first_listener, parse_after, replace_each_once, send, start_envoy, tail,
    tee_lines, wait_for_line, wait_for_lines,
};
use sluice::proto::sluice::admin::v1 as pb;

/// How long a change sluice makes (an assignment, a block) may take to reach Envoy: one report
/// (every 5 s in Envoy 1.40) and slack for a loaded machine.
const WITHIN_A_REPORT: Duration = Duration::from_secs(8);

/// Envoy's log line for each token bucket it builds from an assignment.
const BUILT: &str = "A new TokenBucket has been configured";

/// The counter-key secret every sluice of a stack shares (replicas must).
const SECRET: &str = "rlqs-e2e-secret";

// ---------------------------------------------------------------------------------------------
// The stack

/// What a test changes about the stack.
struct Options {
    /// sluice config text; `None` runs `config/sluice.yaml`.
    config: Option<&'static str>,
    /// sluice processes; Envoy `i` streams to sluice `i % sluices`.
    sluices: usize,
    envoys: usize,
    /// `--store` for every sluice.
    store: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            config: None,
            sluices: 1,
            envoys: 1,
            store: None,
        }
    }
}

/// One `sluice serve`.
struct Sluice {
    proc: Proc,
    grpc: SocketAddr,
    admin: SocketAddr,
}

/// One Envoy on `envoy-rlqs.yaml`.
struct Envoy {
    proc: Proc,
    listener: SocketAddr,
}

/// Envoys, sluices and the stand-ins, each on its own loopback port. Fields drop in order:
/// processes first, the directory holding their logs last.
struct Stack {
    envoys: Vec<Envoy>,
    /// `None` while a test has one stopped.
    sluices: Vec<Option<Sluice>>,
    upstreams: Vec<Proc>,
    talk2me: SocketAddr,
    config: PathBuf,
    store: Option<String>,
    logs: Vec<PathBuf>,
    dir: tempfile::TempDir,
}

impl Stack {
    /// Starts a stack, or returns `None` (after saying so) when Envoy or Python is missing.
    fn start(options: Options) -> Option<Stack> {
        tool("envoy")?;
        let python = tool("python3")?;
        let dir = tempfile::tempdir().unwrap();
        let config = match options.config {
            Some(text) => {
                let path = dir.path().join("sluice.yaml");
                std::fs::write(&path, text).unwrap();
                path
            }
            None => repo_path("config/sluice.yaml"),
        };
        let mut stack = Stack {
            envoys: Vec::new(),
            sluices: Vec::new(),
            upstreams: Vec::new(),
            talk2me: SocketAddr::from(([127, 0, 0, 1], 0)),
            config,
            store: options.store,
            logs: Vec::new(),
            dir,
        };
        for i in 0..options.sluices {
            let sluice = stack.spawn_sluice(i, "127.0.0.1:0");
            stack.sluices.push(Some(sluice));
        }

        let mut ports = Vec::new();
        for (name, script) in [
            ("training", "envoy/upstreams/training_server.py"),
            ("talk2me", "envoy/upstreams/talk2me_server.py"),
        ] {
            let log = stack.dir.path().join(format!("{name}.log"));
            let mut child = Command::new(&python)
                .arg(repo_path(script))
                .args(["--host", "127.0.0.1", "--port", "0"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let lines = tee_lines(
                child.stdout.take().unwrap(),
                &stack.dir.path().join(format!("{name}.stdout")),
            );
            let mut proc = Proc {
                name,
                child,
                log: log.clone(),
            };
            let line = wait_for_line(&mut proc, &lines, "listening on");
            ports.push(parse_after(&line, "http://").port());
            stack.logs.push(log);
            stack.upstreams.push(proc);
        }
        stack.talk2me = SocketAddr::from(([127, 0, 0, 1], ports[1]));

        let yaml = std::fs::read_to_string(repo_path("envoy/envoy-rlqs.yaml")).unwrap();
        for i in 0..options.envoys {
            let sluice = stack.sluice(i % options.sluices).grpc.port();
            let yaml = envoy_config(&yaml, ports[0], ports[1], sluice);
            let name = ["envoy-a", "envoy-b"][i];
            let (proc, admin) = start_envoy(
                stack.dir.path(),
                name,
                &yaml,
                &[
                    "--concurrency",
                    "2",
                    "--component-log-level",
                    "rate_limit_quota:info",
                ],
            );
            stack.logs.push(proc.log.clone());
            stack.envoys.push(Envoy {
                proc,
                listener: first_listener(admin),
            });
        }
        Some(stack)
    }

    /// Starts sluice number `i` with its decision listener on `grpc`.
    fn spawn_sluice(&mut self, i: usize, grpc: &str) -> Sluice {
        let name = ["sluice-a", "sluice-b"][i];
        let start = self
            .logs
            .iter()
            .filter(|l| l.to_string_lossy().contains(name))
            .count();
        let log = self.dir.path().join(format!("{name}-{start}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .args(["--grpc-addr", grpc, "--admin-addr", "127.0.0.1:0"])
            .args(["--http-addr", "127.0.0.1:0", "--state-file"])
            .arg(self.dir.path().join(format!("{name}-state.json")))
            .env("RUST_LOG", "info")
            .env("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("SLUICE_KEY_SECRET", SECRET)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(store) = &self.store {
            cmd.args(["--store", store]);
        }
        // The default config reads these; the tests want its defaults.
        for var in [
            "RATE_LIMIT_ENABLED",
            "RATE_LIMIT_TRAINING_EXECUTE",
            "RATE_LIMIT_TRAINING_GENERAL",
            "RATE_LIMIT_FILESYSTEM",
            "SLUICE_STORE",
            "SLUICE_CONFIG",
        ] {
            cmd.env_remove(var);
        }
        let mut child = cmd.spawn().unwrap();
        let lines = tee_lines(child.stderr.take().unwrap(), &log);
        let mut proc = Proc {
            name,
            child,
            log: log.clone(),
        };
        let [grpc, admin] = wait_for_lines(
            &mut proc,
            &lines,
            ["serving RateLimitService", "serving Admin"],
        );
        self.logs.push(log);
        Sluice {
            proc,
            grpc: parse_after(&grpc, "addr="),
            admin: parse_after(&admin, "addr="),
        }
    }

    fn sluice(&self, i: usize) -> &Sluice {
        self.sluices[i].as_ref().expect("sluice is running")
    }

    /// Sends `req` through Envoy number `envoy`.
    fn send(&self, envoy: usize, req: &Req) -> Resp {
        send(self.envoys[envoy].listener, req)
    }

    /// Sends `req` through Envoy number `envoy` `n` times; the status codes.
    fn statuses(&self, envoy: usize, req: &Req, n: usize) -> Vec<u16> {
        (0..n).map(|_| self.send(envoy, req).status).collect()
    }

    /// Token buckets Envoy number `envoy` has built from sluice's assignments.
    fn buckets_built(&self, envoy: usize) -> usize {
        std::fs::read_to_string(&self.envoys[envoy].proc.log)
            .unwrap_or_default()
            .matches(BUILT)
            .count()
    }

    /// Waits until Envoy number `envoy` has built `n` token buckets.
    fn wait_buckets_built(&self, envoy: usize, n: usize) {
        self.wait_for(&format!("{n} token buckets in envoy {envoy}"), || {
            (self.buckets_built(envoy) >= n).then_some(())
        });
    }

    /// Calls `f` every 50 ms until it returns `Some`, for [`WITHIN_A_REPORT`]. (A process that
    /// died shows in its log, printed when the test fails.)
    fn wait_for<T>(&self, what: &str, f: impl FnMut() -> Option<T>) -> T {
        self.wait_for_within(what, WITHIN_A_REPORT, f)
    }

    fn wait_for_within<T>(
        &self,
        what: &str,
        within: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "no {what} within {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sluice number `i`'s quota statistics.
    fn quota(&self, i: usize) -> pb::QuotaStats {
        admin(self.sluice(i).admin, async |mut admin| {
            admin
                .get_stats(authed(pb::GetStatsRequest::default()))
                .await
                .unwrap()
                .into_inner()
                .quota
                .unwrap_or_default()
        })
    }

    /// The bucket `id` as each stream of sluice number `i` that reported it shows it.
    fn bucket(
        &self,
        i: usize,
        id: &BTreeMap<String, String>,
    ) -> Vec<(pb::QuotaStream, pb::QuotaBucket)> {
        self.quota(i)
            .streams
            .into_iter()
            .filter_map(|s| {
                let b = s.top_buckets.iter().find(|b| &b.bucket_id == id)?.clone();
                Some((s, b))
            })
            .collect()
    }

    /// Talk2Me's stand-in: requests it received.
    fn talk2me_requests(&self) -> u64 {
        send(self.talk2me, &Req::get("/__stats")).json()["requests"]
            .as_u64()
            .unwrap()
    }

    /// Stops sluice number `i` with SIGTERM, as an operator would, and waits for it to exit.
    fn stop_sluice(&mut self, i: usize) -> SocketAddr {
        let mut sluice = self.sluices[i].take().expect("sluice is running");
        sluice.proc.signal("TERM");
        let status = sluice.proc.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "sluice exited with {status:?}");
        sluice.grpc
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("stack files in {}", self.dir.path().display());
            for log in &self.logs {
                eprintln!("---- {} ----\n{}", log.display(), tail(log));
            }
        }
    }
}

/// `envoy/envoy-rlqs.yaml` with the test's addresses: the listener and admin on ports the OS
/// picks, and 2 s for a ShouldRateLimit call, so that a stall on a loaded machine cannot turn a
/// training decision into "sluice failed, let it through".
fn envoy_config(yaml: &str, training: u16, talk2me: u16, sluice: u16) -> String {
    replace_each_once(
        yaml,
        &[
            ("port_value: 9901 }", "port_value: 0 }".to_string()),
            ("port_value: 10000 }", "port_value: 0 }".to_string()),
            ("port_value: 8000 }", format!("port_value: {training} }}")),
            ("port_value: 5005 }", format!("port_value: {talk2me} }}")),
            ("port_value: 8081 }", format!("port_value: {sluice} }}")),
            ("timeout: 0.05s", "timeout: 2s".to_string()),
        ],
    )
}

/// Calls a sluice's admin API (a gRPC client on a runtime of its own: these tests are blocking).
fn admin<T>(
    addr: SocketAddr,
    call: impl AsyncFnOnce(pb::admin_client::AdminClient<tonic::transport::Channel>) -> T,
) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = pb::admin_client::AdminClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        call(client).await
    })
}

/// A Talk2Me bucket id, as `envoy-rlqs.yaml` builds it.
fn bucket_id(path: &str, address: &str, user_agent: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("path".to_string(), path.to_string()),
        ("remote_address".to_string(), address.to_string()),
        ("user_agent".to_string(), user_agent.to_string()),
    ])
}

/// The quota filter's deny response as `envoy-rlqs.yaml` sets it.
fn assert_denied(r: &Resp) {
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.all("content-type"), ["application/json"], "{r:?}");
    assert_eq!(
        r.json(),
        serde_json::json!({"error": "Rate limit exceeded"}),
        "{r:?}"
    );
    assert_eq!(r.header("x-envoy-ratelimited"), Some("true"), "{r:?}");
}

fn assert_passed(r: &Resp) {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["service"], "talk2me", "{r:?}");
}

fn seconds(t: &prost_types::Timestamp) -> f64 {
    t.seconds as f64 + f64::from(t.nanos) / 1e9
}

fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// Tests

/// `/transcribe`'s burst of 3 (config/sluice.yaml) through one Envoy: the first request passes
/// while its bucket has no assignment, then the bucket sluice assigns admits exactly 3 and
/// refuses the rest; at the next report sluice has seen what the client saw.
#[test]
fn one_envoy_admits_exactly_the_bucket_size_then_429s() {
    let Some(stack) = Stack::start(Options::default()) else {
        return;
    };
    let transcribe = Req::post("/transcribe")
        .user_agent("rlqs-one")
        .body(b"{}".to_vec());
    assert_passed(&stack.send(0, &transcribe));
    stack.wait_buckets_built(0, 1);
    let id = bucket_id("/transcribe", "127.0.0.1", "rlqs-one");
    let [(_, b)] = <[_; 1]>::try_from(stack.bucket(0, &id)).unwrap();
    assert_eq!(b.assignment, "token_bucket", "{b:?}");
    // The burst of 3, refilled at the slowest of its limits (100 an hour).
    assert_eq!(b.max_tokens, 3, "{b:?}");
    assert!(
        (b.assigned_per_second * 3600.0 - 100.0).abs() < 1e-6,
        "{b:?}"
    );

    let burst: Vec<Resp> = (0..8).map(|_| stack.send(0, &transcribe)).collect();
    let codes: Vec<u16> = burst.iter().map(|r| r.status).collect();
    assert_eq!(codes, [200, 200, 200, 429, 429, 429, 429, 429]);
    for r in &burst[3..] {
        assert_denied(r);
    }
    // Refused requests never reach Talk2Me.
    assert_eq!(stack.talk2me_requests(), 4);

    // Another client, same address and path: a bucket of its own.
    let other = Req::post("/transcribe").user_agent("rlqs-other");
    assert_passed(&stack.send(0, &other));
    // The training server is still decided per request, by ShouldRateLimit.
    let r = stack.send(0, &Req::post("/api/training/execute"));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("x-ratelimit-limit").is_some(), "{r:?}");

    // sluice's view after the next report: the counts the client saw.
    let seen = stack.wait_for("the burst reported", || {
        let views = stack.bucket(0, &id);
        let (_, b) = views.first()?;
        (b.allowed + b.denied == 9).then(|| b.clone())
    });
    assert_eq!((seen.allowed, seen.denied), (4, 5), "{seen:?}");
}

/// Two Envoys, one client through both, one limit of 20 with no refill to speak of: sluice
/// divides the limit between the two streams, so together they admit about 20, never twice it.
#[test]
fn two_envoys_on_one_bucket_admit_the_limit_together_not_twice_it() {
    let Some(stack) = Stack::start(Options {
        config: Some(SHARED_LIMIT),
        envoys: 2,
        ..Options::default()
    }) else {
        return;
    };
    two_envoys_share_one_limit(&stack, [0, 0]);
}

/// 20 an hour for each Talk2Me client on `/translate`: a bucket of 20, refilled one token per
/// three minutes, so a test's few seconds see the bucket size alone.
const SHARED_LIMIT: &str = "
domains:
  - name: talk2me
    client: [remote_address, user_agent]
    endpoints:
      - path: /translate
        limits: [20/hour]
";
const LIMIT: u64 = 20;

/// The body of the two-Envoy tests: Envoy `e` streams to sluice `sluice_of[e]`.
fn two_envoys_share_one_limit(stack: &Stack, sluice_of: [usize; 2]) {
    let translate = Req::post("/translate")
        .user_agent("rlqs-shared")
        .body(b"{}".to_vec());
    let id = bucket_id("/translate", "127.0.0.1", "rlqs-shared");
    // Each Envoy's first request passes before its bucket has an assignment; from then on,
    // its bucket decides.
    for e in 0..2 {
        assert_passed(&stack.send(e, &translate));
        stack.wait_buckets_built(e, 1);
    }
    let mut admitted = [1u64; 2];
    let mut denied = [0u64; 2];

    // What sluice shows of the bucket: one stream per Envoy.
    let mut sluices = sluice_of.to_vec();
    sluices.dedup();
    let views = |stack: &Stack| -> Vec<(pb::QuotaStream, pb::QuotaBucket)> {
        sluices.iter().flat_map(|&s| stack.bucket(s, &id)).collect()
    };

    // The client through both Envoys, alternately, until each stream has reported twice more:
    // sluice has then divided the limit between the two again at every report.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last_check = Instant::now();
    loop {
        for e in 0..2 {
            let r = stack.send(e, &translate);
            if r.status == 200 {
                admitted[e] += 1;
            } else {
                assert_denied(&r);
                denied[e] += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
        if last_check.elapsed() > Duration::from_millis(500) {
            last_check = Instant::now();
            let reports: Vec<u64> = views(stack).iter().map(|(s, _)| s.reports).collect();
            if reports.len() == 2 && reports.iter().all(|&n| n >= 3) {
                break;
            }
            assert!(Instant::now() < deadline, "reports: {reports:?}");
        }
    }
    let total: u64 = admitted.iter().sum();
    // The limit, plus for each Envoy the request before its first assignment and its share's
    // burst rounded up to a whole token: about the limit, nowhere near twice it.
    assert!(
        (LIMIT..=LIMIT + 4).contains(&total),
        "admitted {admitted:?} (denied {denied:?}) of a limit of {LIMIT}"
    );

    // sluice's view after the next report: exactly what the client saw, and a share of the
    // limit for each stream, together within it.
    let views = stack.wait_for("every request reported", || {
        let views = views(stack);
        let allowed: u64 = views.iter().map(|(_, b)| b.allowed).sum();
        let refused: u64 = views.iter().map(|(_, b)| b.denied).sum();
        (views.len() == 2 && allowed == total && refused == denied.iter().sum::<u64>())
            .then_some(views)
    });
    let per_hour: Vec<f64> = views
        .iter()
        .map(|(_, b)| b.assigned_per_second * 3600.0)
        .collect();
    assert!(
        per_hour.iter().sum::<f64>() <= LIMIT as f64 * (1.0 + 1e-9),
        "assigned {per_hour:?} an hour"
    );
    for (s, b) in &views {
        assert_eq!(b.assignment, "token_bucket", "stream {}: {b:?}", s.id);
        assert!(b.max_tokens >= 1, "stream {}: {b:?}", s.id);
    }
}

/// sluice gives each assignment a time to live of 15 s and renews it on every report: a client
/// that emptied its bucket is still refused well after the first assignment's TTL.
#[test]
fn assignments_are_renewed_so_enforcement_outlives_their_ttl() {
    let Some(stack) = Stack::start(Options::default()) else {
        return;
    };
    let transcribe = Req::post("/transcribe").user_agent("rlqs-ttl");
    assert_passed(&stack.send(0, &transcribe));
    stack.wait_buckets_built(0, 1);
    let assigned = Instant::now();
    assert_eq!(stack.statuses(0, &transcribe, 4), [200, 200, 200, 429]);

    // Probing until the TTL has passed, and one report more: every probe refused. Had sluice
    // not renewed the assignment, the bucket would have fallen back to admitting everything.
    let ttl = sluice::quota::Settings::default().ttl;
    let mut probes = 0;
    while assigned.elapsed() < ttl + Duration::from_secs(6) {
        assert_denied(&stack.send(0, &transcribe));
        probes += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let id = bucket_id("/transcribe", "127.0.0.1", "rlqs-ttl");
    let [(stream, b)] = <[_; 1]>::try_from(stack.bucket(0, &id)).unwrap();
    assert!(stream.reports >= 4, "renewed on every report: {stream:?}");
    assert_eq!(b.assignment, "token_bucket", "{b:?}");
    assert!(probes >= 20, "{probes} probes");
}

/// A block made through the admin API is pushed to the open quota streams when it is made: the
/// blocked address is refused at once, on every bucket, while another address on the same path
/// passes.
#[test]
fn an_admin_block_is_pushed_to_envoy_and_denies_the_client_while_others_pass() {
    let Some(stack) = Stack::start(Options::default()) else {
        return;
    };
    // Talk2Me's other endpoints: only the domain-wide limits, a bucket of hundreds.
    let push = Req::post("/api/push/subscribe").user_agent("rlqs-block");
    let elsewhere = push.clone().from("127.0.0.2");
    assert_passed(&stack.send(0, &push));
    assert_passed(&stack.send(0, &elsewhere));
    stack.wait_buckets_built(0, 2);

    admin(stack.sluice(0).admin, async |mut admin| {
        admin
            .block_ip(authed(pb::BlockIpRequest {
                ip: "127.0.0.1".into(),
                duration_seconds: 600,
                reason: "rlqs e2e".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
    });
    let blocked_at = Instant::now();
    let r = stack.wait_for("the block enforced", || {
        let r = stack.send(0, &push);
        if r.status == 200 {
            std::thread::sleep(Duration::from_millis(150));
            return None;
        }
        Some(r)
    });
    assert_denied(&r);
    // Pushed to the stream when made, not left for the next report.
    let took = blocked_at.elapsed();
    assert!(took < Duration::from_secs(2), "enforced after {took:?}");
    assert_passed(&stack.send(0, &elsewhere));

    // A new bucket of the blocked address: its first request passes before sluice answers
    // (the quota filter never waits), then the block applies.
    let translate = Req::post("/translate").user_agent("rlqs-block");
    assert_passed(&stack.send(0, &translate));
    let r = stack.wait_for("the block on a new bucket", || {
        let r = stack.send(0, &translate);
        (r.status != 200).then_some(r)
    });
    assert_denied(&r);

    // sluice's view, after the report that carried the block.
    let id = bucket_id("/api/push/subscribe", "127.0.0.1", "rlqs-block");
    let [(_, b)] = <[_; 1]>::try_from(stack.bucket(0, &id)).unwrap();
    assert_eq!(b.assignment, "deny_all", "{b:?}");
    let id = bucket_id("/api/push/subscribe", "127.0.0.2", "rlqs-block");
    let [(_, b)] = <[_; 1]>::try_from(stack.bucket(0, &id)).unwrap();
    assert_eq!(b.assignment, "token_bucket", "{b:?}");
}

/// The seed's automatic blocking over RLQS: more than 100 Talk2Me requests a minute from one
/// address, admitted or refused, block it for an hour once Envoy has reported them, and the block
/// reaches every bucket of that address, not another address.
#[test]
fn more_than_100_reported_requests_a_minute_block_the_address_for_an_hour() {
    let Some(stack) = Stack::start(Options::default()) else {
        return;
    };
    // Buckets under the domain-wide limits only: hundreds of tokens, first come first served.
    let bystander = Req::post("/api/errors").user_agent("rlqs-bystander");
    let elsewhere = Req::post("/api/errors")
        .user_agent("rlqs-bystander")
        .from("127.0.0.2");
    let flood = Req::post("/api/push/subscribe").user_agent("rlqs-flood");
    assert_passed(&stack.send(0, &bystander));
    stack.wait_buckets_built(0, 1);
    assert_passed(&stack.send(0, &elsewhere));
    stack.wait_buckets_built(0, 2);
    for _ in 0..120 {
        let r = stack.send(0, &flood);
        assert!([200, 429].contains(&r.status), "{r:?}");
    }

    // The report that carries the flood makes the block.
    let block = stack.wait_for("an automatic block", || {
        let blocks = admin(stack.sluice(0).admin, async |mut admin| {
            admin
                .list_blocks(authed(pb::ListBlocksRequest::default()))
                .await
                .unwrap()
                .into_inner()
                .blocks
        });
        blocks.into_iter().next()
    });
    assert_eq!(block.ip, "127.0.0.1/32", "{block:?}");
    assert_eq!(block.created_by, "auto-block talk2me", "{block:?}");
    let lasts = block.expires_at.unwrap().seconds - block.created_at.unwrap().seconds;
    assert_eq!(lasts, 3600);
    // sluice pushes it to the stream at once: the address's other bucket is refused too.
    let r = stack.wait_for_within(
        "the block on another bucket",
        Duration::from_secs(2),
        || {
            let r = stack.send(0, &bystander);
            if r.status == 200 {
                std::thread::sleep(Duration::from_millis(100));
                return None;
            }
            Some(r)
        },
    );
    assert_denied(&r);
    assert_denied(&stack.send(0, &flood));
    assert_passed(&stack.send(0, &elsewhere));
}

/// A bucket id value over 1 KiB would be answered by sluice's failure policy (allowed), and
/// one that is not UTF-8 read with replacement; `envoy-rlqs.yaml` turns a User-Agent or path
/// over 1 KiB or not printable ASCII into a fixed marker (and a missing User-Agent into "-", as
/// envoy.yaml does): the stream stays up, and such requests are limited, sharing one bucket
/// per address.
#[test]
fn unusable_user_agents_and_paths_become_markers_and_the_stream_stays_up() {
    let Some(stack) = Stack::start(Options::default()) else {
        return;
    };
    const MARKER: &str = "(user agent over 1 KiB or not ASCII)";
    let not_utf8 = Req::post("/transcribe").header_bytes("user-agent", b"caf\xe9 \xff");
    let too_long = Req::post("/transcribe").user_agent(&"u".repeat(1100));
    let anonymous = Req::post("/transcribe");
    let long_path = Req::post(&format!("/api/{}", "p".repeat(1100))).user_agent("rlqs-path");
    for req in [&not_utf8, &anonymous, &long_path] {
        assert_passed(&stack.send(0, req));
    }
    stack.wait_buckets_built(0, 3);

    // The over-long User-Agent is the same client as the one that is not UTF-8: together they
    // get one burst of 3.
    assert_eq!(stack.statuses(0, &too_long, 3), [200, 200, 200]);
    assert_denied(&stack.send(0, &not_utf8));
    assert_eq!(stack.statuses(0, &anonymous, 4), [200, 200, 200, 429]);
    assert_passed(&stack.send(0, &long_path));

    // After a periodic report, which carries every bucket, the stream is still the first one.
    let reports = stack.quota(0).streams.first().unwrap().reports;
    let ids = [
        bucket_id("/transcribe", "127.0.0.1", MARKER),
        bucket_id("/transcribe", "127.0.0.1", "-"),
        bucket_id("/(path over 1 KiB or not ASCII)", "127.0.0.1", "rlqs-path"),
    ];
    let quota = stack.wait_for("a report of every bucket", || {
        let q = stack.quota(0);
        let s = q.streams.first()?;
        (s.reports > reports).then_some(q)
    });
    assert_eq!(quota.streams_open, 1, "{quota:?}");
    let [stream] = <[_; 1]>::try_from(quota.streams).unwrap();
    assert_eq!(stream.id, 1, "the stream Envoy opened first: {stream:?}");
    for id in &ids {
        assert!(
            stream.top_buckets.iter().any(|b| &b.bucket_id == id),
            "{id:?} in {stream:?}"
        );
    }
}

/// sluice stopped and started again on the same port: Envoy keeps enforcing what it was
/// assigned meanwhile, reconnects on its 5 s timer, reports its buckets again, and the new
/// sluice's assignments keep the emptied bucket refused past the old assignment's TTL and hold
/// a new client to its burst.
#[test]
fn envoy_reconnects_after_sluice_restarts_and_enforcement_resumes() {
    let Some(mut stack) = Stack::start(Options::default()) else {
        return;
    };
    let before = Req::post("/transcribe").user_agent("rlqs-before");
    assert_passed(&stack.send(0, &before));
    stack.wait_buckets_built(0, 1);
    assert_eq!(stack.statuses(0, &before, 4), [200, 200, 200, 429]);
    let id = bucket_id("/transcribe", "127.0.0.1", "rlqs-before");
    let [(stream, _)] = <[_; 1]>::try_from(stack.bucket(0, &id)).unwrap();
    let last_assigned = seconds(stream.last_report.as_ref().unwrap());

    let grpc = stack.stop_sluice(0);
    // Envoy keeps the assignment it has.
    assert_denied(&stack.send(0, &before));
    let sluice = stack.spawn_sluice(0, &grpc.to_string());
    stack.sluices[0] = Some(sluice);
    let restarted = Instant::now();

    // Envoy reconnects at its next report and reports the bucket again.
    let [(_, b)] = stack.wait_for_within(
        "the bucket reported to the new sluice",
        Duration::from_secs(12),
        || <[_; 1]>::try_from(stack.bucket(0, &id)).ok(),
    );
    let reconnect = restarted.elapsed();
    assert!(
        reconnect < Duration::from_secs(11),
        "reconnected after {reconnect:?}"
    );
    assert_eq!(b.assignment, "token_bucket", "{b:?}");

    // A new client is held to its burst by the new sluice.
    let after = Req::post("/transcribe").user_agent("rlqs-after");
    let built = stack.buckets_built(0);
    assert_passed(&stack.send(0, &after));
    stack.wait_buckets_built(0, built + 1);
    assert_eq!(stack.statuses(0, &after, 4), [200, 200, 200, 429]);

    // The emptied bucket stays refused after the old sluice's last assignment has expired: the
    // new sluice renews it (with the same bucket, which Envoy keeps, empty).
    let ttl = sluice::quota::Settings::default().ttl.as_secs_f64();
    while now_seconds() < last_assigned + ttl + 1.0 {
        assert_denied(&stack.send(0, &before));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_denied(&stack.send(0, &before));
}

/// Two sluice replicas on one Redis (`--store`, one key secret), an Envoy streaming to each, one
/// client through both: the replicas divide the limit through the ledger they share, so the two
/// Envoys admit about the limit together, as when both stream to one sluice.
#[test]
fn two_replicas_on_one_redis_share_one_limit_between_their_envoys() {
    let Some(redis) = common::redis::RedisServer::start() else {
        return;
    };
    let Some(stack) = Stack::start(Options {
        config: Some(SHARED_LIMIT),
        sluices: 2,
        envoys: 2,
        store: Some(redis.url()),
    }) else {
        return;
    };
    two_envoys_share_one_limit(&stack, [0, 1]);
}
