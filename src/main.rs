//! The `sluice` binary: the command line, logging and the exit code. What `serve` builds and in
//! which order is library code in [`sluice::app`], so this file stays small enough to read at a
//! glance, and `anyhow` stays here, at the edge.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use sluice::app::{self, ServeOptions};
use sluice::connections::Limits;
use sluice::tls::TlsFiles;

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
    Serve(Box<ServeArgs>),
    /// Validate a config file and print the effective limits.
    Check {
        /// Config file, or directory of envoyproxy/ratelimit files (default: the RUNTIME_*
        /// directory when RUNTIME_ROOT is set, else config/sluice.yaml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Config file, or directory of envoyproxy/ratelimit files (default: the RUNTIME_*
    /// directory when RUNTIME_ROOT is set, else config/sluice.yaml).
    #[arg(long, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
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
    reload_interval: Duration,
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
    /// Connections the decision listener keeps open at once; more are closed as they arrive.
    #[arg(long, default_value_t = Limits::decisions().max_connections, env = "SLUICE_MAX_CONNECTIONS")]
    max_connections: usize,
    /// A decision connection with no call for this long is closed.
    #[arg(long, default_value = "300s", value_parser = parse_secs, env = "SLUICE_IDLE_TIMEOUT")]
    idle_timeout: Duration,
    /// Threads serving decisions, each with its share of the connections (default: one per
    /// core).
    #[arg(long, env = "SLUICE_DECISION_THREADS")]
    decision_threads: Option<usize>,
    /// Largest request message on the decision listener, in bytes.
    #[arg(long, default_value_t = Limits::decisions().max_request_bytes, env = "SLUICE_MAX_REQUEST_BYTES")]
    max_request_bytes: usize,
    /// Certificate chain (PEM) of the decision listener: it then speaks TLS only. Overrides
    /// the config's `tls.grpc`; re-read when the file changes.
    #[arg(long, env = "SLUICE_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    grpc_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --grpc-tls-cert.
    #[arg(long, env = "SLUICE_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    grpc_tls_key: Option<PathBuf>,
    /// CA (PEM) whose client certificates the decision listener requires (mTLS).
    #[arg(long, env = "SLUICE_GRPC_TLS_CLIENT_CA", requires = "grpc_tls_cert")]
    grpc_tls_client_ca: Option<PathBuf>,
    /// Certificate chain (PEM) of the admin listener: it then speaks TLS only. Overrides the
    /// config's `tls.admin`; re-read when the file changes.
    #[arg(long, env = "SLUICE_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    admin_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --admin-tls-cert.
    #[arg(long, env = "SLUICE_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    admin_tls_key: Option<PathBuf>,
    /// CA (PEM) whose client certificates the admin listener requires (mTLS); a verified
    /// certificate is then a credential, as the token is.
    #[arg(long, env = "SLUICE_ADMIN_TLS_CLIENT_CA", requires = "admin_tls_cert")]
    admin_tls_client_ca: Option<PathBuf>,
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
    let args = match cli.command {
        Command::Serve(args) => *args,
        Command::Check { config } => {
            print!("{}", app::check(&app::config_path(config))?);
            return Ok(());
        }
    };
    init_logging(args.log_format);
    let token_env = std::env::var("SLUICE_ADMIN_TOKEN").ok();
    let options = ServeOptions {
        admin_token: app::admin_token(args.admin_token_file.as_deref(), token_env)?,
        // Replicas sharing a store must hash counter keys alike: the secret is shared, not random.
        key_secret: std::env::var("SLUICE_KEY_SECRET")
            .ok()
            .filter(|s| !s.is_empty()),
        grpc_tls: tls_files(
            args.grpc_tls_cert,
            args.grpc_tls_key,
            args.grpc_tls_client_ca,
        ),
        admin_tls: tls_files(
            args.admin_tls_cert,
            args.admin_tls_key,
            args.admin_tls_client_ca,
        ),
        config: app::config_path(args.config),
        grpc_addr: args.grpc_addr,
        admin_addr: args.admin_addr,
        http_addr: args.http_addr,
        reload_interval: args.reload_interval,
        state_file: args.state_file,
        store: args.store,
        decision_threads: args.decision_threads,
        decisions: Limits {
            max_connections: args.max_connections,
            idle_timeout: args.idle_timeout,
            max_request_bytes: args.max_request_bytes,
            ..Limits::decisions()
        },
    };
    // Built by hand so that `check` starts no runtime; it sizes itself from TOKIO_WORKER_THREADS.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(app::serve(options))?)
}

/// One listener's TLS flags, if its certificate is given (clap requires the key with it).
fn tls_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
) -> Option<TlsFiles> {
    Some(TlsFiles {
        cert: cert?,
        key: key?,
        client_ca,
    })
}

/// `1s`, `500ms` or a bare number of seconds.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 1s or 500ms");
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().map(Duration::from_millis).map_err(|_| bad());
    }
    let secs = s.strip_suffix('s').unwrap_or(s);
    Duration::try_from_secs_f64(secs.parse().map_err(|_| bad())?).map_err(|_| bad())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log line that cannot be written (the reader of stderr is gone) is dropped: with its
    // default, the subscriber reports the failure with `eprintln!`, which panics on the same
    // closed stderr, and the server would die with its log collector.
    let builder = tracing_subscriber::fmt()
        .log_internal_errors(false)
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
