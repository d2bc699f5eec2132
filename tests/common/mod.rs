//! Test support: start a real sluice server on a loopback port with a manual clock, and talk to
//! it over gRPC with the generated Envoy client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod h2raw;
pub mod process;
mod proto;
pub mod redis;
pub mod tls;

pub use proto::{descriptor, request};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sluice::access::AccessList;
use sluice::clock::{ManualClock, Timestamp};
use sluice::config;
use sluice::limiter::Limiter;
use sluice::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use sluice::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use sluice::proto::sluice::admin::v1::admin_client::AdminClient;
use sluice::server::{self, Listeners, Options};
use sluice::stats::Stats;
use sluice::store::{MemoryStore, MemoryStoreOptions, Store};
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// A window-aligned start time: 2026-01-01T00:00:00Z, a whole number of days since the epoch.
pub const T0: u64 = 1_767_225_600;

/// The admin token test servers use.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// How to start a test server beyond its config.
#[derive(Clone)]
pub struct Setup {
    /// State file for blocks and the allowlist (none: in memory only).
    pub state_file: Option<PathBuf>,
    /// Admin token ([`ADMIN_TOKEN`] by default; the admin listener needs a credential).
    pub token: Option<String>,
    /// Start the clock here instead of [`T0`].
    pub start: Option<Timestamp>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            state_file: None,
            token: Some(ADMIN_TOKEN.into()),
            start: None,
        }
    }
}

/// A running server and a client connected to it; over the memory store unless started with
/// [`TestServer::start_store`].
pub struct TestServer<S: Store = MemoryStore> {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub clock: Arc<ManualClock>,
    pub client: RateLimitServiceClient<Channel>,
    pub limiter: Arc<Limiter<S>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server on `127.0.0.1:0` with the config `yaml`, clock at [`T0`].
    pub async fn start(yaml: &str) -> TestServer {
        let cfg = config::parse(yaml, "test.yaml", |_| None).expect("test config is valid");
        Self::start_with(cfg).await
    }

    /// Starts a server on the repository's default config file.
    pub async fn start_default() -> TestServer {
        let text = std::fs::read_to_string(repo_path("config/sluice.yaml")).unwrap();
        let cfg = config::parse(&text, "config/sluice.yaml", |_| None).unwrap();
        Self::start_with(cfg).await
    }

    pub async fn start_with(cfg: config::Config) -> TestServer {
        Self::start_setup(cfg, Setup::default()).await
    }

    pub async fn start_setup(cfg: config::Config, setup: Setup) -> TestServer {
        let store = MemoryStore::new(MemoryStoreOptions {
            max_keys: cfg.store.max_keys,
        });
        TestServer::start_store(cfg, setup, store).await
    }
}

impl<S: Store> TestServer<S> {
    /// Starts a server over `store` (the Redis store, in the Redis tests).
    pub async fn start_store(cfg: config::Config, setup: Setup, store: S) -> TestServer<S> {
        let clock = Arc::new(ManualClock::new(
            setup.start.unwrap_or(Timestamp::from_secs(T0)),
        ));
        let access = AccessList::open(setup.state_file.clone(), cfg.rules.allowlist.clone())
            .expect("state file opens");
        let limiter = Arc::new(Limiter::with_parts(
            cfg.rules,
            store,
            clock.clone(),
            Arc::new(access),
            Arc::new(Stats::new(cfg.max_clients)),
        ));
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let options = Options {
            sweep_interval: Duration::from_secs(3600),
            admin_token: setup.token.clone(),
            ..Options::default()
        };
        let l = limiter.clone();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = http.local_addr().unwrap();
        let listeners = Listeners {
            grpc,
            admin: Some(admin),
            http: Some(http),
        };
        let task = tokio::spawn(async move {
            server::run(listeners, l, options, async {
                let _ = stopped.await;
            })
            .await
            .expect("server runs");
        });
        let client = RateLimitServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connect to test server");
        TestServer {
            addr,
            admin_addr,
            http_addr,
            clock,
            client,
            limiter,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }

    pub fn advance_millis(&self, ms: u64) {
        self.clock.advance(Duration::from_millis(ms));
    }

    /// Calls ShouldRateLimit; panics on a gRPC error.
    pub async fn call(&self, req: RateLimitRequest) -> RateLimitResponse {
        self.client
            .clone()
            .should_rate_limit(req)
            .await
            .expect("ShouldRateLimit succeeds")
            .into_inner()
    }

    /// Calls ShouldRateLimit and returns the gRPC status it fails with.
    pub async fn call_err(&self, req: RateLimitRequest) -> tonic::Status {
        match self.client.clone().should_rate_limit(req).await {
            Ok(r) => panic!("expected an error, got {:?}", r.into_inner()),
            Err(s) => s,
        }
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

impl<S: Store> Drop for TestServer<S> {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// An admin client for the test server.
impl<S: Store> TestServer<S> {
    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::connect(format!("http://{}", self.admin_addr))
            .await
            .expect("connect to admin")
    }
}

/// Wraps an admin request with the test token.
pub fn authed<T>(msg: T) -> tonic::Request<T> {
    with_token(msg, ADMIN_TOKEN)
}

/// Wraps an admin request with `token`.
pub fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("x-admin-token", token.parse().expect("ascii token"));
    req
}

/// `overall_code` / status `code` OK, as the proto's i32.
pub const OK: i32 =
    sluice::proto::envoy::service::ratelimit::v3::rate_limit_response::Code::Ok as i32;
/// `overall_code` / status `code` OVER_LIMIT, as the proto's i32.
pub const OVER: i32 =
    sluice::proto::envoy::service::ratelimit::v3::rate_limit_response::Code::OverLimit as i32;

/// The value of a response header sluice asks Envoy to add.
pub fn header<'a>(r: &'a RateLimitResponse, key: &str) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == key)
        .map(|h| h.value.as_str())
}

/// The descriptor the sample Envoy sends for the training server.
pub fn training(path: &str, ip: &str) -> RateLimitRequest {
    request(
        "training",
        vec![descriptor(&[("path", path), ("remote_address", ip)])],
    )
}

/// The descriptor the sample Envoy sends for Talk2Me.
pub fn talk2me(path: &str, ip: &str, ua: &str) -> RateLimitRequest {
    request(
        "talk2me",
        vec![descriptor(&[
            ("path", path),
            ("remote_address", ip),
            ("user_agent", ua),
        ])],
    )
}

/// A path in the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Finds an external tool the tests need: `$SLUICE_TOOLS_DIR`, then `<repo>/.tools/bin`, then
/// `PATH`. Missing: `None` locally (the caller skips loudly), a panic when `CI=true`, where a
/// missing tool must fail the run rather than turn into a skip.
pub fn tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("SLUICE_TOOLS_DIR") {
        dirs.push(d.into());
    }
    dirs.push(repo_path(".tools/bin"));
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    let found = dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file());
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{name} is required when CI=true; run scripts/setup-test-env");
        }
        eprintln!("SKIPPING: {name} not found; run scripts/setup-test-env to install it");
    }
    found
}

/// GETs `path` over HTTP/1.1; returns the status and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// POSTs a JSON `body` to `path`; returns the status and the body.
pub async fn http_post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let len = body.len();
    http_exchange(
        addr,
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{body}"
        ),
    )
    .await
}

/// Sends `request` on a new connection and reads the answer to its end.
async fn http_exchange(addr: SocketAddr, request: String) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// The value of the metric line `name{labels}` (exact match of everything before the value).
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A limiter over the memory store on the repository's default config, its clock at [`T0`]:
/// for tests that drive the service without a server.
pub fn default_limiter() -> Arc<Limiter<MemoryStore>> {
    let text = std::fs::read_to_string(repo_path("config/sluice.yaml")).unwrap();
    let cfg = config::parse(&text, "config/sluice.yaml", |_| None).unwrap();
    let store = MemoryStore::new(MemoryStoreOptions {
        max_keys: cfg.store.max_keys,
    });
    let access = AccessList::open(None, cfg.rules.allowlist.clone()).unwrap();
    Arc::new(Limiter::with_parts(
        cfg.rules,
        store,
        Arc::new(ManualClock::new(Timestamp::from_secs(T0))),
        Arc::new(access),
        Arc::new(Stats::new(cfg.max_clients)),
    ))
}
