//! `sluice-load`: drives `ShouldRateLimit` on a sluice server over loopback and reports decisions
//! per second and latency percentiles; `scripts/bench` runs it.
//!
//! It opens `--connections` HTTP/2 connections and keeps `--concurrency` calls in flight on
//! each, through the generated `RateLimitServiceClient`, for `--warmup` seconds unrecorded and
//! then `--duration` seconds recorded. Every reply is checked:
//! gRPC OK, one status per descriptor, `overall_code` OK or OVER_LIMIT and consistent with the
//! statuses; anything else is a failure (counted, the first one printed, exit status 2).
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
//! The generated client runs on hyper's client connection ([`Connection`]), not on a tonic
//! `Channel`, whose buffer task, queue and reconnection cost a task hop per call; and each of
//! `--threads` threads runs its share of the connections and their calls on a runtime of its
//! own, so that a reply wakes a task on the thread that reads it. The generator shares the
//! benchmark machine's cores with the server, so what it spends per call lowers every figure it
//! reports.
//!
//! `--write-request FILE` writes the hot request as one gRPC message (5-byte prefix: flag 0 and
//! big-endian length, then the protobuf) for `h2load -d FILE` and exits: h2load is the client
//! that costs the least per call, for runs where the server must be the bottleneck.

use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use prost::Message;
use tokio::time::Instant;

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
    /// Check only `overall_code` (OK or OVER_LIMIT), not one status per descriptor: for
    /// servers that answer with the overall code alone, as limitador does. The first call's
    /// check that the request reaches a limit is skipped too.
    #[arg(long)]
    overall_only: bool,
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

/// Builds requests for a shape; shared by every call loop.
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
                let n = self.next.fetch_add(1, Ordering::Relaxed) as usize;
                self.clients
                    .get(n % self.clients.len().max(1))
                    .cloned()
                    .unwrap_or_default()
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

/// Checks a reply to a one-descriptor request; `Ok(over_limit)` or what is wrong. With
/// `overall_only`, a reply without statuses is checked by its overall code alone.
fn check(reply: &RateLimitResponse, overall_only: bool) -> Result<bool, String> {
    if overall_only && reply.statuses.is_empty() {
        return match reply.overall_code {
            c if c == Code::Ok as i32 => Ok(false),
            c if c == Code::OverLimit as i32 => Ok(true),
            c => Err(format!("overall_code {c}")),
        };
    }
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

/// What one call loop saw.
struct Tally {
    ok: u64,
    over_limit: u64,
    failures: u64,
    warmup_calls: u64,
    first_failure: Option<String>,
    /// Recorded calls' latencies in microseconds.
    latency: Histogram<u64>,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            ok: 0,
            over_limit: 0,
            failures: 0,
            warmup_calls: 0,
            first_failure: None,
            // 1 µs .. 60 s, 3 significant digits.
            latency: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        })
    }

    fn fail(&mut self, what: String) {
        self.failures += 1;
        self.first_failure.get_or_insert(what);
    }

    fn add(&mut self, other: Tally) -> anyhow::Result<()> {
        self.ok += other.ok;
        self.over_limit += other.over_limit;
        self.failures += other.failures;
        self.warmup_calls += other.warmup_calls;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
        self.latency.add(other.latency)?;
        Ok(())
    }
}

fn resolve_loopback(addr: &str) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .with_context(|| format!("--addr {addr}: not host:port"))?
        .collect();
    let Some(&first) = addrs.first() else {
        bail!("--addr {addr}: resolves to nothing");
    };
    if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        bail!(
            "--addr {addr}: {a} is not a loopback address; sluice-load only targets this machine"
        );
    }
    Ok(first)
}

type Client = RateLimitServiceClient<Connection>;

/// One HTTP/2 connection, hyper's, as the generated client's transport.
#[derive(Clone)]
struct Connection(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower::Service<http::Request<tonic::body::Body>> for Connection {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

/// Opens one HTTP/2 connection on the current runtime. The server may still be starting:
/// connecting is retried for up to 10 s.
async fn connect(addr: SocketAddr) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let tcp = loop {
        match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
            .await
        {
            Ok(Ok(tcp)) => break tcp,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(Err(e)) => return Err(e).with_context(|| format!("connecting to {addr}")),
            Err(_) => bail!("connecting to {addr}: timed out"),
        }
    };
    tcp.set_nodelay(true)?;
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .with_context(|| format!("HTTP/2 with {addr}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("sluice-load: connection ended: {e}");
        }
    });
    let origin: http::Uri = format!("http://{addr}").parse()?;
    Ok(RateLimitServiceClient::with_origin(
        Connection(send),
        origin,
    ))
}

/// One of a connection's calls in flight: calls `ShouldRateLimit` again as soon as the last
/// reply is in, until `end`, and counts and times every reply after `measure_from`.
async fn call_loop(
    mut client: Client,
    requests: Arc<Requests>,
    overall_only: bool,
    measure_from: Instant,
    end: Instant,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::new()?;
    loop {
        let req = requests.next();
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let result = client.should_rate_limit(req).await;
        let done = Instant::now();
        let recorded = sent >= measure_from && done <= end;
        let over = match result {
            Ok(reply) => match check(reply.get_ref(), overall_only) {
                Ok(over) => over,
                Err(e) => {
                    tally.fail(format!("bad reply: {e}"));
                    continue;
                }
            },
            Err(status) => {
                tally.fail(format!("gRPC {:?}: {}", status.code(), status.message()));
                continue;
            }
        };
        if !recorded {
            tally.warmup_calls += 1;
            continue;
        }
        let us = u64::try_from((done - sent).as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, 60_000_000);
        tally.latency.record(us)?;
        if over {
            tally.over_limit += 1;
        } else {
            tally.ok += 1;
        }
    }
    Ok(tally)
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    // Recorded in microseconds; reported in milliseconds.
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let addr = resolve_loopback(&args.addr)?;
    let requests = Arc::new(Requests::new(&args));

    // One call first: the domain and path must reach a limit, or nothing is being measured.
    let probe = connect(addr)
        .await?
        .should_rate_limit(request(&args.domain, &args.path, "probe".to_string()))
        .await
        .context("first ShouldRateLimit call")?
        .into_inner();
    check(&probe, args.overall_only).map_err(|e| anyhow::anyhow!("first reply: {e}"))?;
    if !args.overall_only
        && probe
            .statuses
            .first()
            .and_then(|s| s.current_limit.as_ref())
            .is_none()
    {
        bail!(
            "domain {:?} path {:?} matches no limit on this server: use a config such as benches/load.yaml",
            args.domain,
            args.path
        );
    }

    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, args.connections);
    let mut workers = Vec::with_capacity(threads);
    for t in 0..threads {
        let mine = (t..args.connections).step_by(threads).count();
        let (requests, concurrency, overall_only) =
            (requests.clone(), args.concurrency, args.overall_only);
        workers.push(std::thread::spawn(move || -> anyhow::Result<Tally> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut loops = Vec::with_capacity(mine * concurrency);
                for _ in 0..mine {
                    let client = connect(addr).await?;
                    for _ in 0..concurrency {
                        loops.push(tokio::spawn(call_loop(
                            client.clone(),
                            requests.clone(),
                            overall_only,
                            measure_from,
                            end,
                        )));
                    }
                }
                let mut all = Tally::new()?;
                for l in loops {
                    all.add(l.await.context("a call loop panicked")??)?;
                }
                Ok(all)
            })
        }));
    }
    let mut all = Tally::new()?;
    for w in workers {
        let tally = w
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        all.add(tally)?;
    }

    let calls = all.ok + all.over_limit;
    let rate = calls as f64 / args.duration;
    let in_flight = args.connections * args.concurrency;
    let h = &all.latency;
    let [p50, p90, p99, p999] = [0.50, 0.90, 0.99, 0.999].map(|q| pct(h, q));
    let (max, mean) = (h.max() as f64 / 1000.0, h.mean() / 1000.0);
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
        "  {calls} decisions in {:.1} s: {rate:.0} decisions/s; ok {}, over_limit {}, failures {}",
        args.duration,
        all.ok,
        all.over_limit,
        all.failures
    );
    out!(
        "  latency ms: p50 {p50:.3}  p90 {p90:.3}  p99 {p99:.3}  p99.9 {p999:.3}  max {max:.3}  mean {mean:.3}"
    );
    if let Some(f) = &all.first_failure {
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
            all.ok,
            all.over_limit,
            all.failures,
            rate,
            p50,
            p90,
            p99,
            p999,
            max,
            mean,
            all.warmup_calls,
            cpu_seconds().map_or("null".to_string(), |c| format!("{c:.2}")),
            all.first_failure
                .as_deref()
                .map_or("null".to_string(), json_str),
        );
    }
    Ok(all.failures == 0)
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

/// The same allocator as the server: the generated client allocates on every call.
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
        // The probe only; the load runs on threads of its own (see `run`).
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
