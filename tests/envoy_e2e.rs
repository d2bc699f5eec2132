//! End to end through the real Envoy: `envoy/envoy.yaml` in front of the stand-in upstreams
//! (`envoy/upstreams/*.py`), asking the real `sluice` binary, every request over loopback HTTP.
//!
//! Each test starts its own stack on ports the OS picks: sluice and the stand-ins are started
//! with port 0 and report the port they got (sluice's `serving RateLimitService addr=` log line,
//! the stand-ins' `listening on` line); Envoy runs a copy of `envoy/envoy.yaml` whose listener
//! and admin ports are 0, and reports them through `--admin-address-path` and its admin
//! `/listeners`. Readiness is polled with deadlines, never slept for. Every child is killed
//! when its test ends, and a failing test prints the tail of every log.
//!
//! The copy differs from `envoy/envoy.yaml` only where [`envoy_config`] says: addresses, the
//! rate limit call's timeout (2 s instead of 50 ms, so that a stall on a loaded CI machine
//! cannot turn a decision into "sluice failed, let it through"), and `xff_num_trusted_hops`
//! where a test sets it.
//!
//! Without Envoy (see `scripts/setup-test-env`) the tests skip loudly; with `CI=true` they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod envoy;

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{ADMIN_TOKEN, authed, repo_path, tool};
use envoy::{
    Proc, Req, Resp, exchange, first_listener, open, parse_after, replace_each_once, send,
    start_envoy, tail, tee_lines, wait_for_line,
};

// ---------------------------------------------------------------------------------------------
// The stack

/// What a test changes about the stack.
#[derive(Default)]
struct Options {
    /// sluice config text; `None` runs `config/sluice.yaml`.
    sluice_config: Option<&'static str>,
    /// `xff_num_trusted_hops` (0 in `envoy/envoy.yaml`).
    trusted_hops: u32,
    /// Envoy on `envoy/envoy-tls.yaml`, calling sluice over mTLS.
    mtls: Option<Mtls>,
}

/// Certificates for Envoy calling sluice over mTLS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mtls {
    /// Both signed by the deployment's CA.
    Trusted,
    /// Envoy's client certificate signed by a CA sluice does not trust.
    UntrustedClient,
}

/// The stand-in upstreams.
#[derive(Clone, Copy)]
enum Upstream {
    Training,
    Talk2me,
}

/// Envoy, the two stand-ins and sluice, each on its own loopback port. Fields drop in order:
/// processes first, the directory holding their logs last.
struct Stack {
    envoy: Proc,
    training: Proc,
    talk2me: Proc,
    /// `None` once a test has stopped it.
    sluice: Option<Proc>,
    /// Envoy's HTTP listener.
    listener: SocketAddr,
    /// Envoy's admin interface.
    admin: SocketAddr,
    /// sluice's admin API (token [`ADMIN_TOKEN`]).
    sluice_admin: SocketAddr,
    training_addr: SocketAddr,
    talk2me_addr: SocketAddr,
    logs: Vec<PathBuf>,
    _pki: Option<common::tls::Pki>,
    dir: tempfile::TempDir,
}

impl Stack {
    /// Starts a stack, or returns `None` (after saying so) when Envoy or Python is missing.
    fn start(options: Options) -> Option<Stack> {
        tool("envoy")?;
        let python = tool("python3")?;
        let dir = tempfile::tempdir().unwrap();

        // sluice, on a port of its choosing.
        let config = match options.sluice_config {
            Some(text) => {
                let path = dir.path().join("sluice.yaml");
                std::fs::write(&path, text).unwrap();
                path
            }
            None => repo_path("config/sluice.yaml"),
        };
        // For mTLS: one CA for sluice's certificate (DNS `sluice`, as envoy-tls.yaml expects)
        // and Envoy's, unless the test wants Envoy's from elsewhere.
        let pki = match options.mtls {
            Some(mode) => {
                let pki = common::tls::Pki::new()?;
                let ca = pki.ca("ca");
                let sluice = pki.server(&ca, "sluice");
                let envoy = match mode {
                    Mtls::Trusted => pki.client(&ca, "envoy"),
                    Mtls::UntrustedClient => pki.client(&pki.ca("elsewhere"), "envoy"),
                };
                Some((pki, ca, sluice, envoy))
            }
            None => None,
        };
        let log = dir.path().join("sluice.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .args(["--grpc-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // sluice's other listeners on ports of their own too, and its state file in the test's
        // directory. Environment variables rather than flags: a flag a given version lacks
        // would stop it, an unknown variable does not.
        cmd.env("SLUICE_ADMIN_ADDR", "127.0.0.1:0")
            .env("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("SLUICE_HTTP_ADDR", "127.0.0.1:0")
            .env("SLUICE_STATE_FILE", dir.path().join("sluice-state.json"));
        if let Some((_, ca, sluice, _)) = &pki {
            cmd.env("SLUICE_GRPC_TLS_CERT", &sluice.cert)
                .env("SLUICE_GRPC_TLS_KEY", &sluice.key)
                .env("SLUICE_GRPC_TLS_CLIENT_CA", &ca.cert);
        }
        // The default config reads these; the tests want its defaults.
        for var in [
            "RATE_LIMIT_ENABLED",
            "RATE_LIMIT_TRAINING_EXECUTE",
            "RATE_LIMIT_TRAINING_GENERAL",
            "RATE_LIMIT_FILESYSTEM",
        ] {
            cmd.env_remove(var);
        }
        let mut child = cmd.spawn().unwrap();
        let lines = tee_lines(child.stderr.take().unwrap(), &log);
        let mut sluice = Proc {
            name: "sluice",
            child,
            log: log.clone(),
        };
        let line = wait_for_line(&mut sluice, &lines, "serving RateLimitService");
        let sluice_addr = parse_after(&line, "addr=");
        let line = wait_for_line(&mut sluice, &lines, "serving Admin");
        let sluice_admin = parse_after(&line, "addr=");
        let mut logs = vec![log];

        // The stand-ins, on ports of their choosing.
        let mut standin = |name: &'static str, script: &str| {
            let log = dir.path().join(format!("{name}.log"));
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
                &dir.path().join(format!("{name}.stdout")),
            );
            let mut proc = Proc {
                name,
                child,
                log: log.clone(),
            };
            let line = wait_for_line(&mut proc, &lines, "listening on");
            logs.push(log);
            let addr = parse_after(&line, "http://");
            (proc, addr)
        };
        let (training, training_addr) = standin("training", "envoy/upstreams/training_server.py");
        let (talk2me, talk2me_addr) = standin("talk2me", "envoy/upstreams/talk2me_server.py");

        // Envoy, on a copy of envoy/envoy.yaml (or envoy-tls.yaml, with the test's files).
        let file = if pki.is_some() {
            "envoy/envoy-tls.yaml"
        } else {
            "envoy/envoy.yaml"
        };
        let mut yaml = envoy_config(
            &std::fs::read_to_string(repo_path(file)).unwrap(),
            training_addr.port(),
            talk2me_addr.port(),
            sluice_addr.port(),
            options.trusted_hops,
        );
        if let Some((_, ca, _, envoy)) = &pki {
            let path = |p: &Path| p.to_str().unwrap().to_string();
            yaml = replace_each_once(
                &yaml,
                &[
                    ("/etc/sluice/tls/ca.crt", path(&ca.cert)),
                    ("/etc/sluice/tls/envoy.crt", path(&envoy.cert)),
                    ("/etc/sluice/tls/envoy.key", path(&envoy.key)),
                ],
            );
        }
        let (envoy, admin) = start_envoy(dir.path(), "envoy", &yaml, &["--concurrency", "2"]);
        logs.push(envoy.log.clone());
        let listener = first_listener(admin);

        Some(Stack {
            envoy,
            training,
            talk2me,
            sluice: Some(sluice),
            listener,
            admin,
            sluice_admin,
            training_addr,
            talk2me_addr,
            logs,
            _pki: pki.map(|(pki, ..)| pki),
            dir,
        })
    }

    /// Sends `req` through Envoy.
    fn send(&self, req: &Req) -> Resp {
        send(self.listener, req)
    }

    /// An Envoy counter from admin `/stats`; 0 when Envoy has not created it yet.
    fn envoy_counter(&self, name: &str) -> u64 {
        let stats = send(self.admin, &Req::get("/stats")).text();
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    /// A stand-in's `/__stats`: `requests`, `in_flight`, `max_in_flight`.
    fn upstream_stat(&self, upstream: Upstream, key: &str) -> u64 {
        let addr = match upstream {
            Upstream::Training => self.training_addr,
            Upstream::Talk2me => self.talk2me_addr,
        };
        send(addr, &Req::get("/__stats")).json()[key]
            .as_u64()
            .unwrap()
    }

    /// Stops sluice with SIGTERM and waits for it to exit.
    fn stop_sluice(&mut self) {
        let mut sluice = self.sluice.take().expect("sluice is running");
        sluice.signal("TERM");
        let status = sluice.wait_exit(Duration::from_secs(30));
        assert!(status.success(), "sluice exited with {status:?}");
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
        if std::thread::panicking() {
            for proc in [&mut self.envoy, &mut self.training, &mut self.talk2me] {
                if !proc.is_running() {
                    eprintln!("{} had exited", proc.name);
                }
            }
        }
    }
}

/// `envoy/envoy.yaml` with the test's addresses: the listener and admin on ports the OS picks.
fn envoy_config(yaml: &str, training: u16, talk2me: u16, sluice: u16, trusted_hops: u32) -> String {
    replace_each_once(
        yaml,
        &[
            ("port_value: 9901 }", "port_value: 0 }".to_string()),
            ("port_value: 10000 }", "port_value: 0 }".to_string()),
            ("port_value: 8000 }", format!("port_value: {training} }}")),
            ("port_value: 5005 }", format!("port_value: {talk2me} }}")),
            ("port_value: 8081 }", format!("port_value: {sluice} }}")),
            ("timeout: 0.05s", "timeout: 2s".to_string()),
            (
                "xff_num_trusted_hops: 0",
                format!("xff_num_trusted_hops: {trusted_hops}"),
            ),
        ],
    )
}

/// `envoy/envoy.yaml` as the Kubernetes pod runs it (`envoy/kubernetes/sidecar.yaml`): the
/// listener on every address of the pod, the services by their Kubernetes Service names.
fn kubernetes_envoy_config(yaml: &str) -> String {
    let cluster = |name: &str, kind: &str| format!("    - name: {name}\n      type: {kind}\n");
    replace_each_once(
        yaml,
        &[
            (
                "{ address: 127.0.0.1, port_value: 10000 }",
                "{ address: 0.0.0.0, port_value: 10000 }".to_string(),
            ),
            (
                &cluster("training", "STATIC"),
                cluster("training", "STRICT_DNS"),
            ),
            (
                "{ address: 127.0.0.1, port_value: 8000 }",
                "{ address: training, port_value: 8000 }".to_string(),
            ),
            (
                &cluster("talk2me", "STATIC"),
                cluster("talk2me", "STRICT_DNS"),
            ),
            (
                "{ address: 127.0.0.1, port_value: 5005 }",
                "{ address: talk2me, port_value: 5005 }".to_string(),
            ),
        ],
    )
}

/// `manifest` with the literal block under `  {key}: |` replaced by `content`.
fn embed(manifest: &str, key: &str, content: &str) -> String {
    let header = format!("  {key}: |\n");
    let start = manifest
        .find(&header)
        .unwrap_or_else(|| panic!("no {header:?}"))
        + header.len();
    let mut end = start;
    for line in manifest[start..].split_inclusive('\n') {
        if !(line.trim().is_empty() || line.starts_with("    ")) {
            break;
        }
        end += line.len();
    }
    let mut block = String::new();
    for line in content.lines() {
        if !line.is_empty() {
            block.push_str("    ");
            block.push_str(line);
        }
        block.push('\n');
    }
    format!("{}{block}{}", &manifest[..start], &manifest[end..])
}

// ---------------------------------------------------------------------------------------------
// Assertions

/// The seeds' 429 from sluice, passed through by Envoy: JSON body naming `limit`, exactly one
/// `retry-after` equal to the body's `retry_after`, and Envoy's X-RateLimit headers.
fn assert_over_limit(r: &Resp, limit: &str) {
    assert_eq!(r.status, 429, "{r:?}");
    let retry_after = r.all("retry-after");
    assert_eq!(retry_after.len(), 1, "one retry-after: {r:?}");
    let secs: u64 = retry_after[0].parse().unwrap();
    assert!((1..=3600).contains(&secs), "retry-after {secs}");
    assert_eq!(r.all("content-type"), ["application/json"], "{r:?}");
    assert_eq!(
        r.text(),
        format!(r#"{{"error": "Rate limit exceeded ({limit})", "retry_after": {secs}}}"#)
    );
    assert_eq!(r.header("x-envoy-ratelimited"), Some("true"), "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"), "{r:?}");
    assert!(r.header("x-ratelimit-limit").is_some(), "{r:?}");
    assert!(r.num("x-ratelimit-reset") >= 1, "{r:?}");
}

fn assert_passed(r: &Resp, service: &str) {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["service"], service, "{r:?}");
}

/// 1100 bytes: over sluice's 1 KiB limit on a descriptor value.
fn overlong() -> String {
    "x".repeat(1100)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn eleventh_execute_in_a_minute_is_429_with_sluices_body_and_ratelimit_headers() {
    let Some(stack) = Stack::start(Options::default()) else {
        return;
    };
    let execute = Req::post("/api/training/execute").body(b"{}".to_vec());
    for i in 1..=10u64 {
        let r = stack.send(&execute);
        assert_passed(&r, "training");
        assert_eq!(r.num("x-ratelimit-remaining"), 10 - i, "request {i}: {r:?}");
        assert_eq!(
            r.header("x-ratelimit-limit"),
            Some(r#"10, 10;w=60;name="per minute""#)
        );
        assert!((1..=60).contains(&r.num("x-ratelimit-reset")), "{r:?}");
        assert!(r.header("retry-after").is_none(), "{r:?}");
    }
    let r = stack.send(&execute);
    assert_over_limit(&r, "per minute");
    assert_eq!(
        r.header("x-ratelimit-limit"),
        Some(r#"10, 10;w=60;name="per minute""#)
    );

    // Another client, from another address, has its own counter.
    let r = stack.send(&execute.clone().from("127.0.0.2"));
    assert_passed(&r, "training");
    assert_eq!(r.num("x-ratelimit-remaining"), 9, "{r:?}");

    // The 429 never reached the training server.
    assert_eq!(stack.upstream_stat(Upstream::Training, "requests"), 11);
}

#[test]
fn templated_paths_share_one_counter_per_client() {
    let Some(stack) = Stack::start(Options::default()) else {
        return;
    };
    for job in 1..=30u64 {
        let r = stack.send(&Req::post(&format!("/api/training/cancel/{job}")));
        assert_passed(&r, "training");
        assert_eq!(
            r.num("x-ratelimit-remaining"),
            30 - job,
            "cancel/{job}: {r:?}"
        );
    }
    assert_over_limit(
        &stack.send(&Req::post("/api/training/cancel/31")),
        "per minute",
    );
    // A different template has a counter of its own.
    assert_passed(&stack.send(&Req::post("/api/training/pause/1")), "training");
}

#[test]
fn talk2me_allows_a_burst_of_three_transcriptions_then_429_naming_the_burst() {
    let Some(stack) = Stack::start(Options::default()) else {
        return;
    };
    let transcribe = Req::post("/transcribe")
        .user_agent("burst-test/1.0")
        .body(vec![7; 1000]);
    for i in 1..=3u64 {
        let r = stack.send(&transcribe);
        assert_passed(&r, "talk2me");
        assert_eq!(r.num("x-ratelimit-remaining"), 3 - i, "request {i}: {r:?}");
    }
    let r = stack.send(&transcribe);
    assert_over_limit(&r, "burst");
    // One token every 6 seconds.
    assert!(r.num("retry-after") <= 6, "{r:?}");
}

#[test]
fn talk2me_clients_are_address_plus_user_agent_and_a_missing_user_agent_is_still_limited() {
    let Some(stack) = Stack::start(Options::default()) else {
        return;
    };
    // No User-Agent at all: limited as the client (address, "-"), not waved through.
    let anonymous = Req::post("/transcribe");
    for _ in 0..3 {
        assert_passed(&stack.send(&anonymous), "talk2me");
    }
    assert_over_limit(&stack.send(&anonymous), "burst");
    // An empty User-Agent is the same client as a missing one.
    assert_over_limit(&stack.send(&anonymous.clone().user_agent("")), "burst");
    // Same address, another User-Agent: another client.
    assert_passed(
        &stack.send(&anonymous.clone().user_agent("curl/8.0")),
        "talk2me",
    );
    // Same (missing) User-Agent, another address: another client.
    assert_passed(&stack.send(&anonymous.from("127.0.0.2")), "talk2me");
}

#[test]
fn over_long_paths_queries_and_user_agents_do_not_dodge_limits() {
    let Some(stack) = Stack::start(Options::default()) else {
        return;
    };
    // sluice refuses a descriptor value over 1 KiB, and Envoy lets a request through when
    // sluice fails: the query string must not reach sluice, nor a huge User-Agent.
    let long_query = Req::post(&format!("/transcribe?pad={}", overlong())).user_agent("q");
    for _ in 0..3 {
        assert_passed(&stack.send(&long_query), "talk2me");
    }
    assert_over_limit(&stack.send(&long_query), "burst");

    let long_agent = Req::post("/transcribe").user_agent(&overlong());
    for _ in 0..3 {
        assert_passed(&stack.send(&long_agent), "talk2me");
    }
    assert_over_limit(&stack.send(&long_agent), "burst");

    // A path over 1 KiB is still decided (by the domain-wide limits), not failed.
    let r = stack.send(&Req::post(&format!("/api/{}", overlong())).user_agent("p"));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("x-ratelimit-limit").is_some(), "{r:?}");
    assert_eq!(
        stack.envoy_counter("cluster.talk2me.ratelimit.error"),
        0,
        "no call failed"
    );
}

#[test]
fn talk2me_domain_wide_limit_counts_every_client() {
    const CONFIG: &str = "
domains:
  - name: talk2me
    client: [remote_address, user_agent]
    global: [5/minute]
    endpoints:
      - path: /translate
        limits: [20/minute]
";
    let Some(stack) = Stack::start(Options {
        sluice_config: Some(CONFIG),
        ..Options::default()
    }) else {
        return;
    };
    // Five different clients, one request each: each is far from its own limit.
    for i in 1..=5 {
        let r = stack.send(&Req::post("/translate").user_agent(&format!("client-{i}")));
        assert_passed(&r, "talk2me");
    }
    let r = stack.send(&Req::post("/translate").user_agent("client-6"));
    assert_over_limit(&r, "per minute");
    assert!(
        r.header("x-ratelimit-limit").unwrap().starts_with("5, "),
        "the domain-wide limit decides: {r:?}"
    );
}

#[test]
fn bodies_over_the_endpoint_maximum_get_413_json_and_never_reach_talk2me() {
    let Some(stack) = Stack::start(Options::default()) else {
        return;
    };
    let speak = Req::post("/speak").user_agent("size-test");
    let cases = [
        ("/speak", 50 * 1024 + 1, false),
        ("/speak", 60_000, true),
        ("/translate", 100 * 1024 + 1, false),
        ("/translate/stream", 100 * 1024 + 1, true),
        ("/transcribe", 10 * 1024 * 1024 + 1, false),
    ];
    for (path, size, chunked) in cases {
        let mut req = Req::post(path)
            .user_agent("size-test")
            .body(vec![b'a'; size]);
        if chunked {
            req = req.chunked();
        }
        let r = stack.send(&req);
        assert_eq!(r.status, 413, "{path} with {size} bytes: {r:?}");
        assert_eq!(r.all("content-type"), ["application/json"], "{r:?}");
        assert_eq!(r.text(), r#"{"error": "Request too large"}"#);
    }
    assert_eq!(stack.upstream_stat(Upstream::Talk2me, "requests"), 0);

    // At the limit, it passes; and the refused bodies cost no quota: the whole burst of 3
    // is still there.
    for _ in 0..3 {
        let r = stack.send(&speak.clone().body(vec![b'a'; 50 * 1024]));
        assert_passed(&r, "talk2me");
        assert_eq!(r.json()["body_bytes"], 50 * 1024);
    }
    let r = stack.send(
        &Req::post("/translate")
            .user_agent("size-test")
            .body(vec![b'a'; 100 * 1024])
            .chunked(),
    );
    assert_passed(&r, "talk2me");
    assert_eq!(r.json()["body_bytes"], 100 * 1024);
}

#[test]
fn more_than_50_requests_in_flight_to_talk2me_get_503_overloaded() {
    let Some(stack) = Stack::start(Options::default()) else {
        return;
    };
    const CLIENTS: usize = 60;
    let stack = Arc::new(stack);
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (stack, barrier) = (stack.clone(), barrier.clone());
            std::thread::spawn(move || {
                let req = Req::get("/api/slow?delay_ms=2500").user_agent(&format!("c{i}"));
                let conn = open(stack.listener, &req);
                // All connected: send the requests together. (Unwrap only past the barrier,
                // or one failed connection would leave the others waiting for ever.)
                barrier.wait();
                exchange(conn.unwrap(), &req).unwrap()
            })
        })
        .collect();
    let responses: Vec<Resp> = threads.into_iter().map(|t| t.join().unwrap()).collect();

    let passed = responses.iter().filter(|r| r.status == 200).count();
    let overloaded: Vec<&Resp> = responses.iter().filter(|r| r.status == 503).collect();
    assert_eq!(
        passed + overloaded.len(),
        CLIENTS,
        "only 200s and 503s: {responses:?}"
    );
    assert!(!overloaded.is_empty(), "some requests over the cap get 503");
    for r in &overloaded {
        assert_eq!(r.header("x-envoy-overloaded"), Some("true"), "{r:?}");
        assert_eq!(r.text(), r#"{"error": "Too many concurrent requests"}"#);
    }
    let peak = stack.upstream_stat(Upstream::Talk2me, "max_in_flight");
    assert!(
        (1..=50).contains(&peak),
        "at most 50 in flight at Talk2Me, saw {peak} ({passed} passed)"
    );
}

#[test]
fn x_forwarded_for_is_ignored_by_default() {
    let Some(stack) = Stack::start(Options::default()) else {
        return;
    };
    // Every request claims another client address; all are counted as the TCP peer's.
    for i in 1..=10u64 {
        let r = stack.send(
            &Req::post("/api/training/execute")
                .header("x-forwarded-for", &format!("198.51.100.{i}")),
        );
        assert_passed(&r, "training");
        assert_eq!(r.num("x-ratelimit-remaining"), 10 - i, "{r:?}");
    }
    let r =
        stack.send(&Req::post("/api/training/execute").header("x-forwarded-for", "198.51.100.99"));
    assert_over_limit(&r, "per minute");
}

#[test]
fn x_forwarded_for_names_the_client_with_one_trusted_hop() {
    let Some(stack) = Stack::start(Options {
        trusted_hops: 1,
        ..Options::default()
    }) else {
        return;
    };
    let from = |xff: &str| Req::post("/api/training/execute").header("x-forwarded-for", xff);
    for _ in 0..10 {
        assert_passed(&stack.send(&from("198.51.100.7")), "training");
    }
    assert_over_limit(&stack.send(&from("198.51.100.7")), "per minute");
    // The address the trusted proxy appended (the last one) is the client; whatever the
    // client itself put before it is not.
    assert_over_limit(
        &stack.send(&from("203.0.113.1, 198.51.100.7")),
        "per minute",
    );
    let r = stack.send(&from("198.51.100.7, 198.51.100.8"));
    assert_passed(&r, "training");
    assert_eq!(r.num("x-ratelimit-remaining"), 9, "{r:?}");
}

/// `envoy/envoy-tls.yaml`: Envoy presents its client certificate, sluice (with a client CA)
/// verifies it, and every decision travels over that mTLS connection.
#[test]
fn envoy_tls_calls_sluice_over_mtls_and_limits_hold() {
    let Some(stack) = Stack::start(Options {
        mtls: Some(Mtls::Trusted),
        ..Options::default()
    }) else {
        return;
    };
    let execute = Req::post("/api/training/execute");
    for i in 1..=10u64 {
        let r = stack.send(&execute);
        assert_passed(&r, "training");
        assert_eq!(r.num("x-ratelimit-remaining"), 10 - i, "request {i}: {r:?}");
    }
    assert_over_limit(&stack.send(&execute), "per minute");
    assert!(stack.envoy_counter("cluster.sluice.ssl.handshake") >= 1);
    assert_eq!(
        stack.envoy_counter("cluster.training.ratelimit.failure_mode_allowed"),
        0
    );
}

/// An Envoy whose client certificate sluice's CA did not sign gets no decision at all: sluice
/// refuses the handshake, and Envoy fails open as it does when sluice is down.
#[test]
fn envoy_with_an_untrusted_client_certificate_gets_no_decision() {
    let Some(stack) = Stack::start(Options {
        mtls: Some(Mtls::UntrustedClient),
        ..Options::default()
    }) else {
        return;
    };
    let execute = Req::post("/api/training/execute");
    for _ in 0..12 {
        let r = stack.send(&execute);
        assert_passed(&r, "training");
        assert!(r.header("x-ratelimit-limit").is_none(), "a decision: {r:?}");
    }
    assert_eq!(
        stack.envoy_counter("cluster.training.ratelimit.failure_mode_allowed"),
        12
    );
}

/// envoy-tls.yaml is envoy.yaml with its own header and the `sluice` cluster's transport
/// socket, nothing else: the two cannot drift apart.
#[test]
fn envoy_tls_yaml_is_envoy_yaml_plus_the_transport_socket() {
    let plain = std::fs::read_to_string(repo_path("envoy/envoy.yaml")).unwrap();
    let tls = std::fs::read_to_string(repo_path("envoy/envoy-tls.yaml")).unwrap();
    let body = |y: &str| y[y.find("\nadmin:\n").unwrap() + 1..].to_string();
    let socket_start = "      # sluice over mTLS";
    let socket_end = "      load_assignment:\n        cluster_name: sluice\n";
    let tls_body = body(&tls);
    let (before, rest) = tls_body.split_once(socket_start).unwrap();
    let after = &rest[rest.find(socket_end).unwrap()..];
    assert_eq!(format!("{before}{after}"), body(&plain));
    assert!(rest.contains("UpstreamTlsContext") && rest.contains("tls_certificates"));
}

#[test]
fn requests_pass_when_sluice_is_down_and_envoy_counts_failure_mode_allowed() {
    let Some(mut stack) = Stack::start(Options::default()) else {
        return;
    };
    const ALLOWED: &str = "cluster.training.ratelimit.failure_mode_allowed";
    let execute = Req::post("/api/training/execute");
    for _ in 0..10 {
        assert_passed(&stack.send(&execute), "training");
    }
    assert_over_limit(&stack.send(&execute), "per minute");
    let before = stack.envoy_counter(ALLOWED);

    stack.stop_sluice();

    // The same client, over its limit, now passes: Envoy fails open.
    for _ in 0..3 {
        let r = stack.send(&execute);
        assert_passed(&r, "training");
        assert!(
            r.header("x-ratelimit-limit").is_none(),
            "no decision: {r:?}"
        );
    }
    let after = stack.envoy_counter(ALLOWED);
    assert_eq!(after, before + 3, "{ALLOWED}: {before} -> {after}");
}

#[test]
fn routes_reach_their_service_in_their_domain() {
    let Some(stack) = Stack::start(Options::default()) else {
        return;
    };
    let r = stack.send(&Req::post("/api/filesystem/list"));
    assert_passed(&r, "training");
    assert_eq!(
        r.header("x-ratelimit-limit"),
        Some(r#"60, 60;w=60;name="per minute""#)
    );
    let r = stack.send(&Req::post("/api/training/job-7/force-start"));
    assert_passed(&r, "training");
    assert_eq!(r.num("x-ratelimit-remaining"), 29);
    // Paths are normalised before routing and before sluice sees them.
    let r = stack.send(&Req::post("//api/training/./job-7//force-start"));
    assert_passed(&r, "training");
    assert_eq!(r.num("x-ratelimit-remaining"), 28);

    for path in ["/translate", "/translate/stream", "/speak", "/transcribe"] {
        let r = stack.send(&Req::post(path).user_agent("routes"));
        assert_passed(&r, "talk2me");
        assert_eq!(r.json()["path"], path);
        assert!(r.header("x-ratelimit-limit").is_some(), "{r:?}");
    }
    // Talk2Me's other API endpoints: only the domain-wide limits apply.
    let r = stack.send(&Req::post("/api/push/subscribe").user_agent("routes"));
    assert_passed(&r, "talk2me");
    assert!(
        r.header("x-ratelimit-limit").unwrap().starts_with("1000, "),
        "{r:?}"
    );

    let r = stack.send(&Req::get("/elsewhere"));
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.json()["error"], "Not found");
    assert_eq!(r.header("content-type"), Some("application/json"));
}

#[test]
fn kubernetes_sidecar_embeds_the_repository_configs() {
    let path = repo_path("envoy/kubernetes/sidecar.yaml");
    let mut manifest = std::fs::read_to_string(&path).unwrap();
    let sluice = std::fs::read_to_string(repo_path("config/sluice.yaml")).unwrap();
    let envoy =
        kubernetes_envoy_config(&std::fs::read_to_string(repo_path("envoy/envoy.yaml")).unwrap());
    if std::env::var("SLUICE_UPDATE_SIDECAR").as_deref() == Ok("1") {
        manifest = embed(
            &embed(&manifest, "sluice.yaml", &sluice),
            "envoy.yaml",
            &envoy,
        );
        std::fs::write(&path, &manifest).unwrap();
    }

    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&manifest)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("well-formed YAML"))
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "Service",
            "NetworkPolicy"
        ]
    );
    let data = |name: &str, key: &str| {
        docs.iter()
            .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name)
            .and_then(|d| d["data"][key].as_str())
            .unwrap_or_else(|| panic!("ConfigMap {name} with {key}"))
            .to_string()
    };
    const REGENERATE: &str =
        "regenerate with SLUICE_UPDATE_SIDECAR=1 cargo test --test envoy_e2e kubernetes";
    assert!(
        data("sluice-config", "sluice.yaml") == sluice,
        "sidecar.yaml's sluice.yaml differs from config/sluice.yaml: {REGENERATE}"
    );
    assert!(
        data("envoy-config", "envoy.yaml") == envoy,
        "sidecar.yaml's envoy.yaml differs from envoy/envoy.yaml: {REGENERATE}"
    );

    // Envoy accepts the pod's configuration.
    let Some(envoy_bin) = tool("envoy") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("envoy.yaml");
    std::fs::write(&file, &envoy).unwrap();
    let out = Command::new(envoy_bin)
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "envoy --mode validate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Calls sluice's admin API (a gRPC client on a runtime of its own: these tests are blocking).
fn sluice_admin<T>(
    stack: &Stack,
    call: impl AsyncFnOnce(
        sluice::proto::sluice::admin::v1::admin_client::AdminClient<tonic::transport::Channel>,
    ) -> T,
) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = sluice::proto::sluice::admin::v1::admin_client::AdminClient::connect(format!(
            "http://{}",
            stack.sluice_admin
        ))
        .await
        .unwrap();
        call(client).await
    })
}

#[test]
fn an_admin_block_turns_the_client_away_through_envoy_and_unblock_lets_it_back() {
    use sluice::proto::sluice::admin::v1 as pb;
    let Some(stack) = Stack::start(Options::default()) else {
        return;
    };
    let read = Req::post("/api/filesystem/read").body(b"{}".to_vec());
    assert_passed(&stack.send(&read), "training");

    sluice_admin(&stack, async |mut admin| {
        admin
            .block_ip(authed(pb::BlockIpRequest {
                ip: "127.0.0.1".into(),
                duration_seconds: 600,
                reason: "e2e".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
    });
    for req in [read.clone(), Req::post("/transcribe").body(b"{}".to_vec())] {
        let r = stack.send(&req);
        assert_eq!(r.status, 429, "{r:?}");
        assert_eq!(
            r.json(),
            serde_json::json!({"error": "IP temporarily blocked due to excessive requests"})
        );
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((590..=600).contains(&retry), "{r:?}");
        assert_eq!(r.all("retry-after").len(), 1);
    }
    // Another address is not blocked.
    assert_passed(&stack.send(&read.clone().from("127.0.0.2")), "training");

    let removed = sluice_admin(&stack, async |mut admin| {
        admin
            .unblock_ip(authed(pb::UnblockIpRequest {
                ip: "127.0.0.1".into(),
            }))
            .await
            .unwrap()
            .into_inner()
            .removed
    });
    assert!(removed);
    assert_passed(&stack.send(&read), "training");
}

/// The Talk2Me seed: "IPs are temporarily blocked for 1 hour if they exceed 100 requests per
/// minute", as `config/sluice.yaml` encodes it (`auto_block` on the `talk2me` domain), through
/// Envoy: the test's address (the TCP peer, 127.0.0.1) floods `/transcribe`; every request
/// counts, admitted or refused; the one over 100 is decided normally, and from the next on the
/// address gets the seed's "IP temporarily blocked" 429 for an hour, whatever its User-Agent.
#[test]
fn more_than_100_talk2me_requests_a_minute_block_the_address_for_an_hour() {
    use sluice::proto::sluice::admin::v1 as pb;
    let Some(stack) = Stack::start(Options::default()) else {
        return;
    };
    const BLOCKED: &str = "IP temporarily blocked due to excessive requests";
    let flood = Req::post("/transcribe")
        .user_agent("flood/1.0")
        .body(b"{}".to_vec());
    let started = Instant::now();
    let (mut first_blocked, mut passed) = (None, 0);
    // Sliding windows never over-count: nothing is blocked before request 102. They may
    // under-count by the share of the previous minute already past when the flood straddles
    // a minute boundary, a few requests at most over a flood of a few seconds.
    for i in 1..=130u32 {
        let r = stack.send(&flood);
        if r.status == 200 {
            passed += 1;
            continue;
        }
        assert_eq!(r.status, 429, "request {i}: {r:?}");
        if r.json()["error"] == BLOCKED {
            first_blocked = Some(i);
            break;
        }
        assert!(
            r.json()["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("Rate limit exceeded")),
            "request {i}: {r:?}"
        );
    }
    // The burst of 3 (a token more per 6 s on a slow machine), never over 10 a minute.
    assert!((3..=10).contains(&passed), "{passed} passed");
    let first_blocked = first_blocked.expect("blocked within 130 requests");
    assert!(
        first_blocked >= 102,
        "the 101st request crosses the threshold and is decided normally; blocked at {first_blocked}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the flood took {:?}: the under-count bound above assumes seconds",
        started.elapsed()
    );

    // Blocked for an hour, under any User-Agent; another address is not.
    for req in [flood.clone(), flood.clone().user_agent("other/2.0")] {
        let r = stack.send(&req);
        assert_eq!(r.status, 429, "{r:?}");
        assert_eq!(r.json(), serde_json::json!({ "error": BLOCKED }));
        assert_eq!(r.all("retry-after").len(), 1, "{r:?}");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((3570..=3600).contains(&retry), "an hour: {r:?}");
    }
    assert_passed(
        &stack.send(
            &Req::post("/translate")
                .user_agent("flood/1.0")
                .from("127.0.0.2"),
        ),
        "talk2me",
    );
    // One block list: the address is turned away from the training server too.
    let r = stack.send(&Req::post("/api/training/validate"));
    assert_eq!(r.json(), serde_json::json!({ "error": BLOCKED }), "{r:?}");
    // Only the admitted requests reached Talk2Me, plus the other address's one.
    assert_eq!(
        stack.upstream_stat(Upstream::Talk2me, "requests"),
        passed + 1
    );

    // The admin API lists it as an automatic block of the talk2me domain.
    let blocks = sluice_admin(&stack, async |mut admin| {
        admin
            .list_blocks(authed(pb::ListBlocksRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .blocks
    });
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    let b = &blocks[0];
    assert_eq!(b.ip, "127.0.0.1/32");
    assert!(!b.permanent);
    assert_eq!(b.created_by, "auto-block talk2me");
    assert_eq!(
        b.reason,
        "more than 100/minute requests across all endpoints"
    );
    let lasts = b.expires_at.as_ref().unwrap().seconds - b.created_at.as_ref().unwrap().seconds;
    assert_eq!(lasts, 3600);
}

// ---------------------------------------------------------------------------------------------
// envoyproxy/ratelimit's own example, unchanged but for loopback addresses

/// The upstream example (`examples/envoy/proxy.yaml` and `mock.yaml`, with
/// `examples/ratelimit/config`) through the real Envoy, with the HTTP codes the upstream
/// integration scripts (`simple-get.sh`, `trigger-ratelimit.sh`, `replaces.sh`,
/// `trigger-shadow-mode-key.sh`) expect. The copies differ from upstream only in addresses
/// (docker-compose host names and fixed ports become loopback and free ports) and in the rate
/// limit call's timeout (2 s instead of 20 ms, so a loaded CI machine cannot fail open).
#[test]
fn the_upstream_example_answers_through_envoy_as_its_scripts_expect() {
    if tool("envoy").is_none() {
        return;
    }
    let examples = repo_path("tests/data/envoyproxy-ratelimit/examples");
    let dir = tempfile::tempdir().unwrap();

    // sluice on the example's config directory, with the example's settings.
    let log = dir.path().join("sluice.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.arg("serve")
        .arg("--config")
        .arg(examples.join("ratelimit/config"))
        .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["--http-addr", "127.0.0.1:0"])
        .arg("--state-file")
        .arg(dir.path().join("state.json"))
        .env("RUST_LOG", "info")
        .env("RESPONSE_DYNAMIC_METADATA", "true")
        .env_remove("REDIS_URL")
        .env_remove("BACKEND_TYPE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let lines = tee_lines(child.stderr.take().unwrap(), &log);
    let mut sluice = Proc {
        name: "sluice",
        child,
        log,
    };
    let line = wait_for_line(&mut sluice, &lines, "serving RateLimitService");
    let sluice_addr = parse_after(&line, "addr=");

    let (m1, m2) = (common::redis::free_port(), common::redis::free_port());
    let mock = std::fs::read_to_string(examples.join("envoy/mock.yaml"))
        .unwrap()
        .replace("0.0.0.0", "127.0.0.1")
        .replace("port_value: 9999", &format!("port_value: {m1}"))
        .replace("port_value: 10001", &format!("port_value: {m2}"))
        .replace("port_value: 8001", "port_value: 0");
    let (_mock, _) = start_envoy(dir.path(), "mock", &mock, &["--concurrency", "1"]);

    let proxy = std::fs::read_to_string(examples.join("envoy/proxy.yaml"))
        .unwrap()
        .replace("0.0.0.0", "127.0.0.1")
        .replace("address: ratelimit", "address: 127.0.0.1")
        .replace(
            "port_value: 8081",
            &format!("port_value: {}", sluice_addr.port()),
        )
        .replace("address: envoy-mock", "address: 127.0.0.1")
        .replace("port_value: 9999", &format!("port_value: {m1}"))
        .replace("port_value: 10001", &format!("port_value: {m2}"))
        .replace("port_value: 8888", "port_value: 0")
        .replace("port_value: 8001", "port_value: 0")
        .replace(
            "failure_mode_deny: false",
            "failure_mode_deny: false\n                      timeout: 2s",
        );
    let (_proxy, admin) = start_envoy(
        dir.path(),
        "proxy",
        &proxy,
        &["--concurrency", "1", "--service-cluster", "proxy"],
    );
    let listener = first_listener(admin);

    let get = |path: &str, headers: &[(&str, &str)]| {
        let mut r = Req::get(path);
        for (k, v) in headers {
            r = r.header(k, v);
        }
        send(listener, &r).status
    };
    // simple-get.sh
    assert_eq!(get("/twoheader", &[("foo", "test"), ("baz", "shady")]), 200);
    // trigger-ratelimit.sh: `baz=not-so-shady` allows 3 a minute.
    let pelle = [("foo", "pelle"), ("baz", "not-so-shady")];
    for i in 0..3 {
        assert_eq!(get("/twoheader", &pelle), 200, "request {i}");
    }
    assert_eq!(get("/twoheader", &pelle), 429);
    assert_eq!(get("/twoheader", &pelle), 429);
    // replaces.sh, in its order: 200 is assert_ok, 429 assert_limited.
    let banned = [("foo", "bkthomps"), ("bar", "banned")];
    assert_eq!(get("/twoheader", &banned), 429);
    let headers = |foo: &'static str, bar: &'static str, dest: &'static str| {
        [
            ("foo", foo),
            ("bar", bar),
            ("source_cluster", "proxy"),
            ("destination_cluster", dest),
        ]
    };
    let four = |dest| headers("bkthomps", "banned", dest);
    assert_eq!(get("/fourheader", &four("mock")), 429);
    assert_eq!(get("/fourheader", &four("override")), 200);
    assert_eq!(get("/fourheader", &four("override")), 200);
    assert_eq!(get("/fourheader", &four("override")), 429);
    let mine = |dest| headers("my_foo", "bkthomps", dest);
    assert_eq!(get("/fourheader", &mine("bkthomps")), 200);
    assert_eq!(get("/fourheader", &mine("bkthomps")), 200);
    assert_eq!(get("/fourheader", &mine("bkthomps")), 429);
    assert_eq!(get("/fourheader", &mine("not_bkthomps")), 200);
    assert_eq!(get("/fourheader", &mine("not_bkthomps")), 429);
    assert_eq!(get("/fourheader", &mine("bkthomps")), 429);
    let five = [
        ("foo", "my_foo"),
        ("bar", "bkthomps"),
        ("source_cluster", "proxy"),
        ("destination_cluster", "fake"),
        ("category", "account"),
    ];
    for i in 0..3 {
        assert_eq!(get("/fiveheader", &five), 200, "fiveheader {i}");
    }
    // trigger-shadow-mode-key.sh: over the shadow rule's 3 a minute, still let through.
    for i in 0..6 {
        assert_eq!(
            get("/twoheader", &[("foo", "pelle"), ("baz", "shady")]),
            200,
            "shadow {i}"
        );
    }
}
