//! `sluice-load`: drives `ShouldRateLimit` on a sluice server over loopback and reports decisions
//! per second and latency percentiles (issue 5; scripts/bench runs it).
//!
//! It opens `--connections` HTTP/2 connections and keeps `--concurrency` calls in flight on
//! each, through the generated `RateLimitServiceClient`, for `--warmup` seconds unrecorded and then
//! `--duration` seconds recorded. Every reply is checked: gRPC OK, one status per descriptor,
//! `overall_code` OK or OVER_LIMIT and consistent with the statuses; anything else is a failure
//! (counted, the first one printed, exit status 2).
//!
//! Shapes (`--shape`), all in `--domain` (default `load`) with descriptor
//! `[path=<--path>, remote_address=<client>]`, as Envoy sends:
//! - `hot`: one client on every call;
//! - `clients`: `--clients` (10,000) clients in turn;
//! - `unique`: a client never seen before on every call (names carry a per-process prefix, so
//!   repeated runs against one server also send new clients).
//!
//! Use a config where the hot key is not simply denied, such as `benches/load.yaml`
//! (4e9/minute). Only loopback addresses are accepted.
//!
//! `--raw` sends the calls as pre-encoded HTTP/2 frames on bare connections instead (module
//! `raw`): about a tenth of the generated client's cost per call, so that the server, not the
//! client, is what a run measures (how much a second worker thread buys, say). It checks less
//! per answer: HTTP 200, `grpc-status: 0`, `overall_code` OK or OVER_LIMIT.
//!
//! `--write-request FILE` writes the hot request as one gRPC message (5-byte prefix: flag 0 and
//! big-endian length, then the protobuf) for `h2load -d FILE` and exits.
//!
//! The generated client runs over a minimal HTTP/2 client of our own (`client`, on the server's
//! frame and HPACK code) rather than a tonic `Channel` (which adds a buffer task, reconnection
//! and load balancing per call), hyper's client (a channel to the connection's task and a task
//! per request body) or the `h2` crate (about 45% of the generator's CPU per call): the
//! generator shares the two cores of the benchmark machine with the server, so its cost per
//! call caps the figures it reports. For the same reason each connection and its calls run on
//! one task (see `beside`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use prost::Message;
use tokio::net::TcpStream;

mod client;
mod raw;

use sluice::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use sluice::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use sluice::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use sluice::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use sluice::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};

/// `println!` that gives up quietly when stdout is gone (`sluice-load ... | head`) instead of
/// panicking on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Parser, Debug)]
#[command(
    name = "sluice-load",
    about = "Load generator for sluice's ShouldRateLimit (loopback only)"
)]
struct Args {
    /// Server address; must be a loopback address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    addr: String,
    /// HTTP/2 connections (1..=64).
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Calls in flight on each connection (1..=4096).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds recorded, after the warm-up (at most 600).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of unrecorded warm-up (at most 60).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Which clients the calls come from.
    #[arg(long, value_enum, default_value_t = Shape::Hot)]
    shape: Shape,
    /// Clients of the `clients` shape.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Rate limit domain.
    #[arg(long, default_value = "load")]
    domain: String,
    /// Value of the descriptor's `path` entry.
    #[arg(long, default_value = "/bench")]
    path: String,
    /// Threads of the generator, each with its share of the connections (default: one per
    /// core, at most one per connection).
    #[arg(long)]
    threads: Option<usize>,
    /// Also print one JSON object with every figure (last line).
    #[arg(long)]
    json: bool,
    /// Free text copied into the JSON (run labels for scripts/bench).
    #[arg(long, default_value = "")]
    label: String,
    /// Calls as pre-encoded HTTP/2 frames on bare connections, with no gRPC client: what the
    /// server can take when the client is not the bottleneck (see `raw`). Checks less per
    /// answer: HTTP 200, grpc-status 0, overall_code OK or OVER_LIMIT.
    #[arg(long)]
    raw: bool,
    /// Write the hot request as a gRPC-framed message to FILE (for h2load -d) and exit.
    #[arg(long, value_name = "FILE")]
    write_request: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Shape {
    /// One client on every call.
    Hot,
    /// `--clients` clients in turn.
    Clients,
    /// A new client on every call.
    Unique,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Hot => "hot",
            Shape::Clients => "clients",
            Shape::Unique => "unique",
        }
    }
}

const HOT_CLIENT: &str = "10.0.0.1";

/// Builds requests for a shape; shared by every task.
struct Requests {
    shape: Shape,
    domain: String,
    path: String,
    clients: Vec<String>,
    next: AtomicU64,
    prefix: String,
}

impl Requests {
    fn new(args: &Args) -> Self {
        let clients = match args.shape {
            Shape::Clients => (0..args.clients)
                .map(|i| format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff))
                .collect(),
            _ => Vec::new(),
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Self {
            shape: args.shape,
            domain: args.domain.clone(),
            path: args.path.clone(),
            clients,
            next: AtomicU64::new(0),
            prefix: format!("u{:x}-{}-", nanos & 0xffff_ffff_ffff, std::process::id()),
        }
    }

    fn client(&self) -> String {
        match self.shape {
            Shape::Hot => HOT_CLIENT.to_string(),
            Shape::Clients => {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                self.clients[(n % self.clients.len() as u64) as usize].clone()
            }
            Shape::Unique => {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                let mut s = String::with_capacity(self.prefix.len() + 20);
                s.push_str(&self.prefix);
                let _ = write!(s, "{n}");
                s
            }
        }
    }

    fn next(&self) -> RateLimitRequest {
        request(&self.domain, &self.path, self.client())
    }
}

fn request(domain: &str, path: &str, client: String) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![
                Entry {
                    key: "path".to_string(),
                    value: path.to_string(),
                },
                Entry {
                    key: "remote_address".to_string(),
                    value: client,
                },
            ],
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

/// Checks a reply to a one-descriptor request; `Ok(over_limit)` or what is wrong.
fn check(reply: &RateLimitResponse) -> Result<bool, String> {
    if reply.statuses.len() != 1 {
        return Err(format!(
            "{} statuses for 1 descriptor",
            reply.statuses.len()
        ));
    }
    let ok = Code::Ok as i32;
    let over = Code::OverLimit as i32;
    let any_over = reply.statuses.iter().any(|s| s.code == over);
    if let Some(s) = reply
        .statuses
        .iter()
        .find(|s| s.code != ok && s.code != over)
    {
        return Err(format!("descriptor status code {}", s.code));
    }
    match reply.overall_code {
        c if c == ok && !any_over => Ok(false),
        c if c == over && any_over => Ok(true),
        c => Err(format!(
            "overall_code {c} inconsistent with statuses {:?}",
            reply.statuses.iter().map(|s| s.code).collect::<Vec<_>>()
        )),
    }
}

/// Totals of one run, merged over tasks.
#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    over_limit: AtomicU64,
    failures: AtomicU64,
    warmup_calls: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

impl Counts {
    fn fail(&self, what: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_failure.lock().unwrap();
        if first.is_none() {
            *first = Some(what);
        }
    }
}

fn resolve_loopback(addr: &str) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .with_context(|| format!("--addr {addr}: not host:port"))?
        .collect();
    if addrs.is_empty() {
        bail!("--addr {addr}: resolves to nothing");
    }
    if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        bail!(
            "--addr {addr}: {a} is not a loopback address; sluice-load only targets this machine"
        );
    }
    Ok(addrs[0])
}

type Client = RateLimitServiceClient<client::Connection>;

async fn connect(addr: SocketAddr) -> anyhow::Result<(Client, client::Driver)> {
    // The server may still be starting: retry for up to 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let tcp = loop {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => break tcp,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(Err(e)) => return Err(e).with_context(|| format!("connecting to {addr}")),
            Err(_) => bail!("connecting to {addr}: timed out"),
        }
    };
    tcp.set_nodelay(true)?;
    let (connection, driver) = client::handshake(tcp);
    let origin: http::Uri = format!("http://{addr}").parse()?;
    Ok((
        RateLimitServiceClient::with_origin(connection, origin),
        driver,
    ))
}

/// Runs `calls` on the caller's task, beside the connection they use, polled after them. Every
/// request the calls queue in one wake-up then leaves in one write, and a reply wakes no other
/// task. With the connection in a task of its own (as hyper and tonic run it), each request
/// woke that task and went out in a `writev` of its own more often than not (strace: one per
/// 4.7 calls at 512 in flight), CPU taken from the server on these shared cores.
async fn beside<F: Future>(connection: &mut client::Driver, calls: F) -> F::Output {
    let mut calls = std::pin::pin!(calls);
    let mut open = true;
    std::future::poll_fn(|cx| {
        if open {
            // The calls' requests are written by the poll below: they need not wake the task.
            connection.will_poll();
        }
        if let Poll::Ready(out) = calls.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        // A connection that ends (the server went away, or an error) fails the calls still on
        // it, which count it; it is not polled again.
        if open && Pin::new(&mut *connection).poll(cx).is_ready() {
            open = false;
        }
        Poll::Pending
    })
    .await
}

/// One of a connection's calls in flight: calls `ShouldRateLimit` again as soon as the last
/// reply is in, until `end`, and counts and times every reply after `measure_from`.
async fn call_loop(
    mut client: Client,
    requests: &Requests,
    counts: &Counts,
    hist: &Mutex<Histogram<u64>>,
    measure_from: Instant,
    end: Instant,
) {
    loop {
        let req = requests.next();
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let result = client.should_rate_limit(req).await;
        let done = Instant::now();
        let recorded = sent >= measure_from && done <= end;
        match result {
            Ok(reply) => match check(reply.get_ref()) {
                Ok(over) => {
                    if !recorded {
                        counts.warmup_calls.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let us = u64::try_from((done - sent).as_micros())
                        .unwrap_or(u64::MAX)
                        .clamp(1, 60_000_000);
                    hist.lock().unwrap().record(us).unwrap();
                    if over {
                        counts.over_limit.fetch_add(1, Ordering::Relaxed);
                    } else {
                        counts.ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => counts.fail(format!("bad reply: {e}")),
            },
            Err(status) => counts.fail(format!("gRPC {:?}: {}", status.code(), status.message())),
        }
    }
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    // Recorded in microseconds; reported in milliseconds.
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let addr = resolve_loopback(&args.addr)?;
    let requests = Arc::new(Requests::new(&args));

    // One call first: the domain and path must reach a limit, or nothing is being measured.
    let (mut client, mut connection) = connect(addr).await?;
    let probe = beside(
        &mut connection,
        client.should_rate_limit(request(&args.domain, &args.path, "probe".to_string())),
    )
    .await
    .context("first ShouldRateLimit call")?
    .into_inner();
    check(&probe).map_err(|e| anyhow::anyhow!("first reply: {e}"))?;
    if probe.statuses[0].current_limit.is_none() {
        bail!(
            "domain {:?} path {:?} matches no limit on this server: use a config such as benches/load.yaml",
            args.domain,
            args.path
        );
    }
    drop(connection);

    let counts = Arc::new(Counts::default());
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);

    // Each thread runs a runtime of its own with its share of the connections, each connection
    // one task with its calls beside it (see `beside`). With one multi-threaded runtime, the
    // connections' tasks were woken where their I/O was polled and mostly ran on one thread:
    // one core's worth of calls whatever --threads said.
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, args.connections);
    let mut workers = Vec::with_capacity(threads);
    for t in 0..threads {
        let mine = (t..args.connections).step_by(threads).count();
        let (requests, counts, concurrency) = (requests.clone(), counts.clone(), args.concurrency);
        let raw = args.raw;
        workers.push(std::thread::spawn(
            move || -> anyhow::Result<Histogram<u64>> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                if raw {
                    return rt.block_on(async move {
                        let bodies = raw::bodies(&requests);
                        let load = raw::Load {
                            addr,
                            requests: &requests,
                            bodies: &bodies,
                            counts: &counts,
                            concurrency,
                            measure_from,
                            end,
                        };
                        // FuturesUnordered, not join_all: it polls only the connections woken
                        // (join_all polled every connection on each wake-up, ~6% of the
                        // client's time with 4).
                        let mut loads: FuturesUnordered<_> = (0..mine)
                            .map(|_| async {
                                let mut hist =
                                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                                if let Err(e) = raw::run_connection(&load, &mut hist).await {
                                    load.counts.fail(format!("{e:#}"));
                                }
                                hist
                            })
                            .collect();
                        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                        while let Some(h) = loads.next().await {
                            all.add(h).unwrap();
                        }
                        Ok(all)
                    });
                }
                rt.block_on(async move {
                    let mut channels = Vec::with_capacity(mine);
                    for _ in 0..mine {
                        channels.push(connect(addr).await?);
                    }
                    let loads = channels.into_iter().map(|(channel, mut connection)| {
                        let (requests, counts) = (&requests, &counts);
                        async move {
                            // 1 µs .. 60 s, 3 significant digits. Its calls all run on this
                            // thread, so the lock is never contended.
                            let hist =
                                Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap());
                            let calls: FuturesUnordered<_> = (0..concurrency)
                                .map(|_| {
                                    call_loop(
                                        channel.clone(),
                                        requests,
                                        counts,
                                        &hist,
                                        measure_from,
                                        end,
                                    )
                                })
                                .collect();
                            drop(channel);
                            beside(&mut connection, calls.collect::<()>()).await;
                            hist.into_inner().unwrap()
                        }
                    });
                    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
                    for h in futures_util::future::join_all(loads).await {
                        all.add(h).unwrap();
                    }
                    Ok(all)
                })
            },
        ));
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for w in workers {
        let h = w
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        all.add(h).unwrap();
    }
    let ok = counts.ok.load(Ordering::Relaxed);
    let over = counts.over_limit.load(Ordering::Relaxed);
    let failures = counts.failures.load(Ordering::Relaxed);
    let calls = ok + over;
    let rate = calls as f64 / args.duration;
    let in_flight = args.connections * args.concurrency;
    let first_failure = counts.first_failure.lock().unwrap().clone();

    out!(
        "sluice-load: shape={} connections={} concurrency={} ({} in flight) warmup={}s duration={}s addr={}",
        args.shape.name(),
        args.connections,
        args.concurrency,
        in_flight,
        args.warmup,
        args.duration,
        addr
    );
    out!(
        "  {calls} decisions in {:.1} s: {rate:.0} decisions/s; ok {ok}, over_limit {over}, failures {failures}",
        args.duration
    );
    out!(
        "  latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
        pct(&all, 0.50),
        pct(&all, 0.90),
        pct(&all, 0.99),
        pct(&all, 0.999),
        all.max() as f64 / 1000.0,
        all.mean() / 1000.0
    );
    if let Some(f) = &first_failure {
        out!("  first failure: {f}");
    }
    if args.json {
        out!(
            "{{\"label\":{},\"shape\":\"{}\",\"connections\":{},\"concurrency\":{},\"in_flight\":{},\"warmup_s\":{},\"duration_s\":{},\"decisions\":{},\"ok\":{},\"over_limit\":{},\"failures\":{},\"decisions_per_s\":{:.1},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3},\"mean_ms\":{:.3},\"warmup_calls\":{},\"cpu_s\":{},\"first_failure\":{}}}",
            json_str(&args.label),
            args.shape.name(),
            args.connections,
            args.concurrency,
            in_flight,
            args.warmup,
            args.duration,
            calls,
            ok,
            over,
            failures,
            rate,
            pct(&all, 0.50),
            pct(&all, 0.90),
            pct(&all, 0.99),
            pct(&all, 0.999),
            all.max() as f64 / 1000.0,
            all.mean() / 1000.0,
            counts.warmup_calls.load(Ordering::Relaxed),
            cpu_seconds().map_or("null".to_string(), |c| format!("{c:.2}")),
            first_failure
                .as_deref()
                .map_or("null".to_string(), json_str),
        );
    }
    Ok(failures == 0)
}

/// CPU time (user + system) this process has used, from `/proc/self/stat` (Linux; ticks of
/// 1/100 s, the kernel's USER_HZ everywhere in practice).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is parenthesised and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn write_request(args: &Args, file: &PathBuf) -> anyhow::Result<()> {
    let body = request(&args.domain, &args.path, HOT_CLIENT.to_string()).encode_to_vec();
    let mut framed = Vec::with_capacity(body.len() + 5);
    framed.push(0); // not compressed
    framed.extend_from_slice(&u32::try_from(body.len())?.to_be_bytes());
    framed.extend_from_slice(&body);
    std::fs::write(file, framed).with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

/// The same allocator as the server: the generated client allocates on every call, and with the
/// system allocator the generator spent an eighth of its CPU in malloc and free (perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    let result = (|| -> anyhow::Result<bool> {
        if let Some(file) = &args.write_request {
            write_request(&args, file)?;
            return Ok(true);
        }
        if !(1..=64).contains(&args.connections) {
            bail!("--connections must be 1..=64");
        }
        if !(1..=4096).contains(&args.concurrency) {
            bail!("--concurrency must be 1..=4096");
        }
        if !(args.duration > 0.0 && args.duration <= 600.0) {
            bail!("--duration must be in (0, 600] seconds");
        }
        if !(0.0..=60.0).contains(&args.warmup) {
            bail!("--warmup must be in [0, 60] seconds");
        }
        if args.shape == Shape::Clients && args.clients == 0 {
            bail!("--clients must be at least 1");
        }
        // Set-up and the first call only; the load runs on threads of its own (see `run`).
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(run(args))
    })();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("sluice-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}
