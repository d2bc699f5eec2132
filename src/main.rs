//! The `sluice` binary: parse the command line, set up logging, load the config, bind the
//! listeners and run until SIGINT/SIGTERM. All logic lives in the library.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;

use sluice::blocklist::AccessList;
use sluice::clock::SystemClock;
use sluice::limiter::Limiter;
use sluice::reload::{self, Reloader};
use sluice::server::{self, Listeners, Options};
use sluice::stats::Stats;
use sluice::store::{AnyStore, Backend, MemoryStoreOptions, redis_sync};
use sluice::{config, shutdown};

/// mimalloc: the gRPC transport allocates on every call; measured in BENCHMARKS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Rate-limit decision server for Envoy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve Envoy's RateLimitService.
    Serve {
        /// Config file.
        #[arg(long, default_value = "config/sluice.yaml", env = "SLUICE_CONFIG")]
        config: PathBuf,
        /// Address for decisions (RateLimitService, health, reflection).
        #[arg(long, default_value = "0.0.0.0:8081", env = "SLUICE_GRPC_ADDR")]
        grpc_addr: SocketAddr,
        /// Address for the admin API (configuration, statistics, blocks).
        #[arg(long, default_value = "127.0.0.1:8082", env = "SLUICE_ADMIN_ADDR")]
        admin_addr: SocketAddr,
        /// Address for /metrics, /healthz and /readyz (plain HTTP).
        #[arg(long, default_value = "127.0.0.1:8080", env = "SLUICE_HTTP_ADDR")]
        http_addr: SocketAddr,
        /// How often the config file is checked for changes (SIGHUP reloads at once).
        #[arg(long, default_value = "1s", value_parser = parse_secs, env = "SLUICE_RELOAD_INTERVAL")]
        reload_interval: std::time::Duration,
        /// File holding the admin token (instead of SLUICE_ADMIN_TOKEN).
        #[arg(long, env = "SLUICE_ADMIN_TOKEN_FILE")]
        admin_token_file: Option<PathBuf>,
        /// Where blocks and runtime allowlist entries are kept across restarts.
        #[arg(long, default_value = "sluice-state.json", env = "SLUICE_STATE_FILE")]
        state_file: PathBuf,
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "SLUICE_LOG_FORMAT")]
        log_format: LogFormat,
        /// Counter store, overriding the config's `store:`: `memory`, `redis://host:6379`
        /// (`rediss://` for TLS), or several URLs separated by commas (Redis Cluster seeds).
        #[arg(long, env = "SLUICE_STORE")]
        store: Option<String>,
    },
    /// Validate a config file and print the effective limits.
    Check {
        /// Config file.
        #[arg(long, default_value = "config/sluice.yaml")]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config } => {
            let cfg = config::load(&config)?;
            print!("{}", config::limits_table(&cfg.rules));
            println!(
                "{}: OK, rate limiting {}",
                config.display(),
                if cfg.rules.enabled {
                    "ENABLED"
                } else {
                    "DISABLED"
                }
            );
            Ok(())
        }
        Command::Serve {
            config,
            grpc_addr,
            admin_addr,
            http_addr,
            reload_interval,
            admin_token_file,
            state_file,
            log_format,
            store,
        } => {
            init_logging(log_format);
            let admin_token = admin_token(admin_token_file.as_deref())?;
            let addrs = Addrs {
                grpc: grpc_addr,
                admin: admin_addr,
                http: http_addr,
                reload_interval,
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(config, addrs, state_file, admin_token, store))
        }
    }
}

struct Addrs {
    grpc: SocketAddr,
    admin: SocketAddr,
    http: SocketAddr,
    reload_interval: std::time::Duration,
}

/// `1s`, `500ms` or a bare number of seconds.
fn parse_secs(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a duration like 1s or 500ms");
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .parse()
            .map(std::time::Duration::from_millis)
            .map_err(|_| bad());
    }
    let secs = s.strip_suffix('s').unwrap_or(s);
    let d = secs.parse::<f64>().map_err(|_| bad())?;
    std::time::Duration::try_from_secs_f64(d).map_err(|_| bad())
}

/// The admin token: the file's first line, else `SLUICE_ADMIN_TOKEN`; empty means none.
fn admin_token(file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let token = match file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading --admin-token-file {}", f.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
        None => std::env::var("SLUICE_ADMIN_TOKEN").unwrap_or_default(),
    };
    Ok((!token.is_empty()).then_some(token))
}

async fn serve(
    config_path: PathBuf,
    addrs: Addrs,
    state_file: PathBuf,
    admin_token: Option<String>,
    store_override: Option<String>,
) -> anyhow::Result<()> {
    let cfg = config::load(&config_path)?;
    log_loaded(&config_path, &cfg);
    let backend = match &store_override {
        Some(spec) => cfg
            .backend
            .overridden_by(spec)
            .map_err(|e| anyhow::anyhow!("--store: {e}"))?,
        None => cfg.backend.clone(),
    };
    // Replicas sharing a store must hash counter keys alike: the secret is shared, not random.
    let key_secret = std::env::var("SLUICE_KEY_SECRET")
        .ok()
        .filter(|s| !s.is_empty());
    if matches!(backend, Backend::Redis(_)) && key_secret.is_none() {
        anyhow::bail!(
            "the Redis store needs SLUICE_KEY_SECRET (the same secret on every replica) so replicas count in the same keys"
        );
    }
    let cfg_store = cfg.store;
    let file_backend = cfg.backend.clone();
    let access = AccessList::open(Some(state_file), cfg.rules.allowlist.clone())?;
    let store = AnyStore::open(
        &backend,
        MemoryStoreOptions {
            max_keys: cfg.store.max_keys,
        },
    )?;
    tracing::info!(store = %backend.describe(), on_error = ?cfg.store.on_error, "counter store");
    let mut limiter = Limiter::with_parts(
        cfg.rules,
        store,
        Arc::new(SystemClock),
        Arc::new(access),
        Arc::new(Stats::new(cfg.max_clients)),
    )
    .with_failure_policy(cfg.store.on_error);
    if let Some(secret) = &key_secret {
        limiter = limiter.with_key_secret(secret.as_bytes());
    }
    let limiter = Arc::new(limiter);
    // Blocks and the runtime allowlist follow the counters into Redis.
    let _access_sync = limiter.store().redis().map(|r| {
        AbortOnDrop(tokio::spawn(redis_sync::run(
            r.handle().clone(),
            limiter.access().clone(),
            Arc::new(SystemClock),
            redis_sync::DEFAULT_POLL,
        )))
    });
    let shutdown = shutdown::install().context("installing signal handlers")?;
    let grpc = TcpListener::bind(addrs.grpc)
        .await
        .with_context(|| format!("binding --grpc-addr {}", addrs.grpc))?;
    let admin = TcpListener::bind(addrs.admin)
        .await
        .with_context(|| format!("binding --admin-addr {}", addrs.admin))?;
    let http = TcpListener::bind(addrs.http)
        .await
        .with_context(|| format!("binding --http-addr {}", addrs.http))?;
    tracing::info!(addr = %http.local_addr()?, "serving /metrics, /healthz, /readyz");
    let reloader = Arc::new(
        Reloader::new(config_path.clone(), limiter.clone(), cfg_store)
            .with_file_backend(file_backend),
    );
    let sighup = reload::on_sighup(reloader.clone()).context("installing the SIGHUP handler")?;
    let _reload_tasks = (
        AbortOnDrop(tokio::spawn(sighup)),
        AbortOnDrop(tokio::spawn(reload::watch(reloader, addrs.reload_interval))),
    );
    tracing::info!(addr = %grpc.local_addr()?, "serving RateLimitService");
    let options = Options {
        sweep_interval: cfg.store.sweep_interval,
        admin_token,
        ..Options::default()
    };
    let listeners = Listeners {
        grpc,
        admin: Some(admin),
        http: Some(http),
    };
    server::run(listeners, limiter, options, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Aborts a background task when dropped (at the end of `serve`).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn log_loaded(path: &std::path::Path, cfg: &config::Config) {
    let state = if cfg.rules.enabled {
        "ENABLED"
    } else {
        "DISABLED"
    };
    tracing::info!(config = %path.display(), hash = format!("{:016x}", cfg.hash), "rate limiting {state}");
    for d in &cfg.rules.domains {
        let endpoints: Vec<&str> = d.rules.iter().map(|r| r.name.as_str()).collect();
        tracing::info!(domain = %d.name, rules = ?endpoints, "loaded domain");
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
