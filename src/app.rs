//! The binary's wiring: from options the command line has already read to a server running until
//! SIGINT/SIGTERM. It lives in the library so that `main.rs` stays a thin CLI and this code is
//! linted and documented like the rest. It decides little itself: what matters here is the order
//! things are built in.
//!
//! For the binary this is the caller that binds the listeners and owns shutdown;
//! [`server::run`] stays free of both, so tests drive it with their own `127.0.0.1:0` listeners.
//! The order of [`serve`] is deliberate: the config is checked and the state file and store
//! opened before anything listens, and the signal handlers (SIGHUP included) are installed before
//! "serving RateLimitService" is logged, which callers take as the sign that sluice is ready.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::access::{AccessError, AccessList};
use crate::clock::SystemClock;
use crate::config::{self, Config, ConfigError};
use crate::limiter::Limiter;
use crate::limiter::reference::KeyNames;
use crate::reload::{self, Reloader};
use crate::server::{self, AbortOnDrop, Listeners, Options, ServerError};
use crate::shutdown;
use crate::stats::Stats;
use crate::store::{AnyStore, Backend, MemoryStoreOptions, StoreError, redis_sync};
use crate::tls::{TlsError, TlsFiles, TlsListener};

/// The file a generated admin token is written to, beside the state file.
pub const ADMIN_TOKEN_FILE: &str = "sluice-admin-token";

/// Logs from here keep the target they had when this code was in the binary (`sluice`), so log
/// filters and queries written against it still match.
const LOG_TARGET: &str = "sluice";

/// What `sluice serve` runs with: flags and environment, read by the binary so that this module
/// never looks at the command line. No `Debug`: it holds the admin token and the key secret.
#[derive(Clone)]
pub struct ServeOptions {
    /// The config file, also watched for reloads.
    pub config: PathBuf,
    /// Address for decisions (`RateLimitService`, health, reflection).
    pub grpc_addr: SocketAddr,
    /// Address for the admin API.
    pub admin_addr: SocketAddr,
    /// Address for `/metrics`, `/healthz` and `/readyz`.
    pub http_addr: SocketAddr,
    /// How often the config file is checked for changes.
    pub reload_interval: Duration,
    /// Where blocks and runtime allowlist entries are kept across restarts.
    pub state_file: PathBuf,
    /// `--store`, overriding the config's `store:` (see [`Backend::overridden_by`]).
    pub store: Option<String>,
    /// The admin token, from [`admin_token`]. Without one, and without a client CA on the
    /// admin listener's TLS, [`serve`] generates one (see [`ADMIN_TOKEN_FILE`]).
    pub admin_token: Option<String>,
    /// `--grpc-tls-*`: the decision listener's TLS, overriding the config's `tls.grpc`.
    pub grpc_tls: Option<TlsFiles>,
    /// `--admin-tls-*`: the admin listener's TLS, overriding the config's `tls.admin`.
    pub admin_tls: Option<TlsFiles>,
    /// `SLUICE_KEY_SECRET`, if set and not empty: the counter-key secret replicas share.
    pub key_secret: Option<String>,
    /// The decision listener's connection limits (`--max-connections`, `--idle-timeout`,
    /// `--max-request-bytes`).
    pub decisions: crate::connections::Limits,
    /// Threads serving decisions (`--decision-threads`; default: one per core).
    pub decision_threads: Option<usize>,
}

/// Why sluice could not start or stopped with an error. Errors of other modules pass through
/// unchanged (`transparent`), so the binary prints exactly their message and sources.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The config file could not be read or is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener's TLS files could not be used.
    #[error("TLS of the {listener} listener: {source}")]
    Tls {
        /// `decisions` or `admin`.
        listener: &'static str,
        /// What is wrong, naming the file.
        source: TlsError,
    },
    /// The generated admin token could not be written.
    #[error("writing the generated admin token to {}", .path.display())]
    AdminTokenWrite {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The `--admin-token-file` could not be read.
    #[error("reading --admin-token-file {}", .path.display())]
    AdminTokenFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// `--store` is not `memory` or Redis URLs.
    #[error("--store: {0}")]
    StoreFlag(String),
    /// Replicas that hashed counter keys with different random secrets would never share a
    /// counter, so a shared store without a configured secret is refused.
    #[error(
        "the Redis store needs SLUICE_KEY_SECRET (the same secret on every replica) so replicas count in the same keys"
    )]
    KeySecretMissing,
    /// The state file could not be used.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The counter store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// SIGINT/SIGTERM handlers could not be installed.
    #[error("installing signal handlers")]
    Signals(#[source] io::Error),
    /// The SIGHUP handler could not be installed.
    #[error("installing the SIGHUP handler")]
    Sighup(#[source] io::Error),
    /// A listener could not be bound; `flag` names the option that chose the address.
    #[error("binding --{flag} {addr}")]
    Bind {
        /// The flag without dashes, e.g. `grpc-addr`.
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
    /// A bound listener has no local address (the OS error alone: there is nothing to add).
    #[error(transparent)]
    LocalAddr(io::Error),
    /// The server failed.
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// The config to load: `--config` if given; else, as envoyproxy/ratelimit does, the directory
/// its `RUNTIME_ROOT`, `RUNTIME_SUBDIRECTORY` and `RUNTIME_APPDIRECTORY` name when
/// `RUNTIME_ROOT` is set; else `config/sluice.yaml`.
pub fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| config::runtime_dir(|n| std::env::var(n).ok()))
        .unwrap_or_else(|| PathBuf::from("config/sluice.yaml"))
}

/// `sluice check`: the effective limits of the config at `path` and a closing verdict line, for
/// the binary to print.
pub fn check(path: &Path) -> Result<String, AppError> {
    let cfg = config::load(path)?;
    Ok(format!(
        "{}{}: OK, rate limiting {}\n",
        config::limits_table(&cfg.rules),
        path.display(),
        enabled(&cfg)
    ))
}

/// The admin token: the first line of `file` if given, else `env` (`SLUICE_ADMIN_TOKEN`); empty
/// means none, so an unset and an empty variable behave alike.
pub fn admin_token(file: Option<&Path>, env: Option<String>) -> Result<Option<String>, AppError> {
    let token = match file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|source| AppError::AdminTokenFile {
                path: f.to_path_buf(),
                source,
            })?
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
        None => env.unwrap_or_default(),
    };
    Ok((!token.is_empty()).then_some(token))
}

/// `sluice serve`: loads the config, opens the state file and the counter store, binds the
/// listeners and serves until SIGINT/SIGTERM, finishing in-flight calls.
pub async fn serve(options: ServeOptions) -> Result<(), AppError> {
    let cfg = config::load(&options.config)?;
    log_loaded(&options.config, &cfg);
    let grpc_tls = tls(
        "decisions",
        options.grpc_tls.clone().or(cfg.tls.grpc.clone()),
    )?;
    let admin_tls = tls("admin", options.admin_tls.clone().or(cfg.tls.admin.clone()))?;
    let admin_token = match options.admin_token.clone() {
        Some(token) => Some(token),
        None if admin_tls.as_ref().is_some_and(|t| t.verifies_clients()) => None,
        None => Some(generate_admin_token(&options.state_file)?),
    };
    let backend = backend(&cfg, &options)?;
    let cfg_store = cfg.store;
    let file_backend = cfg.backend.clone();
    let access = AccessList::open(Some(options.state_file), cfg.rules.allowlist.clone())?;
    let store = AnyStore::open(
        &backend,
        MemoryStoreOptions {
            max_keys: cfg.store.max_keys,
        },
    )?;
    tracing::info!(target: LOG_TARGET, store = %backend.describe(), on_error = ?cfg.store.on_error, "counter store");
    let mut limiter = Limiter::with_parts(
        cfg.rules,
        store,
        Arc::new(SystemClock),
        Arc::new(access),
        Arc::new(Stats::new(cfg.max_clients)),
    )
    .with_failure_policy(cfg.store.on_error);
    if let Some(secret) = &options.key_secret {
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
    let shutdown = shutdown::install().map_err(AppError::Signals)?;
    let grpc = bind("grpc-addr", options.grpc_addr).await?;
    let admin = bind("admin-addr", options.admin_addr).await?;
    let http = bind("http-addr", options.http_addr).await?;
    let http_addr = http.local_addr().map_err(AppError::LocalAddr)?;
    tracing::info!(target: LOG_TARGET, addr = %http_addr, "serving /metrics, /healthz, /readyz");
    let reloader = Arc::new(
        Reloader::new(options.config, limiter.clone(), cfg_store).with_file_backend(file_backend),
    );
    let sighup = reload::on_sighup(reloader.clone()).map_err(AppError::Sighup)?;
    let _reload_tasks = (
        AbortOnDrop(tokio::spawn(sighup)),
        AbortOnDrop(tokio::spawn(reload::watch(
            reloader,
            options.reload_interval,
        ))),
    );
    let grpc_addr = grpc.local_addr().map_err(AppError::LocalAddr)?;
    tracing::info!(target: LOG_TARGET, addr = %grpc_addr, "serving RateLimitService");
    let defaults = Options::default();
    let server_options = Options {
        sweep_interval: cfg.store.sweep_interval,
        tls_poll: options.reload_interval,
        admin_token,
        grpc_tls,
        admin_tls,
        decisions: options.decisions,
        decision_threads: options
            .decision_threads
            .unwrap_or(defaults.decision_threads),
        ..defaults
    };
    let listeners = Listeners {
        grpc,
        admin: Some(admin),
        http: Some(http),
    };
    server::run(listeners, limiter, server_options, shutdown).await?;
    tracing::info!(target: LOG_TARGET, "stopped");
    Ok(())
}

/// The store to open: the config's, unless `--store` overrides it. A shared (Redis) store also
/// needs the shared key secret, checked here so that nothing is opened without it, unless
/// every counter is named the envoyproxy/ratelimit way (reference files with
/// `SLUICE_REDIS_KEYS=reference`, their default), which hashes nothing.
fn backend(cfg: &Config, options: &ServeOptions) -> Result<Backend, AppError> {
    let backend = match &options.store {
        Some(spec) => cfg
            .backend
            .overridden_by(spec)
            .map_err(AppError::StoreFlag)?,
        None => cfg.backend.clone(),
    };
    let reference_names = cfg
        .rules
        .reference
        .as_ref()
        .is_some_and(|r| r.settings.key_names == KeyNames::Reference);
    if matches!(backend, Backend::Redis(_)) && options.key_secret.is_none() && !reference_names {
        return Err(AppError::KeySecretMissing);
    }
    Ok(backend)
}

/// A listener's TLS from its files, if it has any; an error names the listener and the file.
fn tls(
    listener: &'static str,
    files: Option<TlsFiles>,
) -> Result<Option<Arc<TlsListener>>, AppError> {
    let Some(files) = files else {
        return Ok(None);
    };
    let loaded =
        TlsListener::load(listener, files).map_err(|source| AppError::Tls { listener, source })?;
    tracing::info!(target: LOG_TARGET, listener, cert = %loaded.files().cert.display(), mtls = loaded.verifies_clients(), "TLS");
    Ok(Some(Arc::new(loaded)))
}

/// The file a generated admin token goes to: [`ADMIN_TOKEN_FILE`] in the state file's
/// directory.
pub fn admin_token_path(state_file: &Path) -> PathBuf {
    state_file.with_file_name(ADMIN_TOKEN_FILE)
}

/// A new random admin token (256 bits, hex), written to [`admin_token_path`] readable by its
/// owner only, for an admin listener that has no credential configured. A fresh token every
/// start: one that leaked dies with the process that used it.
fn generate_admin_token(state_file: &Path) -> Result<String, AppError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = admin_token_path(state_file);
    let token: String = rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let write_err = |source| AppError::AdminTokenWrite {
        path: path.clone(),
        source,
    };
    // Written beside and renamed over, so a reader never sees half a token; created 0600, so
    // the token is never readable by others, not even for a moment.
    let tmp = path.with_file_name(format!(".{ADMIN_TOKEN_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write_err)?;
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_err)?;
    std::fs::rename(&tmp, &path).map_err(write_err)?;
    let shown = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
    tracing::info!(target: LOG_TARGET, file = %shown.display(), "no admin credential configured: generated an admin token; send it as x-admin-token");
    Ok(token)
}

async fn bind(flag: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { flag, addr, source })
}

/// One word for both `check` and the start-up log, which operators and tests grep for.
fn enabled(cfg: &Config) -> &'static str {
    if cfg.rules.enabled {
        "ENABLED"
    } else {
        "DISABLED"
    }
}

fn log_loaded(path: &Path, cfg: &Config) {
    let state = enabled(cfg);
    tracing::info!(target: LOG_TARGET, config = %path.display(), hash = format!("{:016x}", cfg.hash), "rate limiting {state}");
    for d in &cfg.rules.domains {
        let endpoints: Vec<&str> = d.rules.iter().map(|r| r.name.as_str()).collect();
        tracing::info!(target: LOG_TARGET, domain = %d.name, rules = ?endpoints, "loaded domain");
    }
    if let Some(r) = &cfg.rules.reference {
        tracing::info!(target: LOG_TARGET, files = ?r.files, "envoyproxy/ratelimit config");
        for t in &r.trees {
            tracing::info!(target: LOG_TARGET, domain = %t.domain, rules = t.limits().len(), "loaded domain");
        }
        for w in config::reference_env::Env(|n: &str| std::env::var(n).ok()).unhonoured() {
            tracing::warn!(target: LOG_TARGET, "{w}");
        }
    }
}
