//! sluice's YAML config: read, expand `${VAR}`, parse into [`raw`] structs, validate, and
//! compile into the [`RuleSet`] the limiter runs. Every error names the file, the line and the
//! field path, and says what was expected:
//! `config/sluice.yaml:12: domains[1].endpoints[0].limits[1]: unknown unit "minuet" (second, minute, hour, day)`.
//!
//! Loading is all-or-nothing and has no side effects, so a reload can parse a new file while the
//! old rules keep serving and simply drop the result if it is invalid.

pub mod env;
pub mod guard;
pub mod locate;
pub mod rate;
pub mod raw;
pub mod reference;
pub mod reference_env;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::num::NonZeroU64;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use xxhash_rust::xxh3::xxh3_64;

use crate::access::parse_net;
use crate::algorithms::Policy;
use crate::input::ReadError;
use crate::limiter::model::{AutoBlock, Condition, Domain, Limit, Reported, Rule, RuleSet};
use crate::limiter::path::{PathRouter, PathTemplate};
use crate::limiter::reference::ReferenceRules;
use crate::store::{Backend, FailurePolicy, RedisNodes, RedisOptions, TimeSource};
use locate::Seg;
use rate::Rate;
use raw::{
    AlgorithmName, BackendName, ClockName, OnErrorName, RawAutoBlock, RawConfig, RawDomain,
    RawEndpoint, RawLimit, RawStore,
};

/// Default client identity: the address Envoy's `remote_address` action sends.
pub const DEFAULT_CLIENT_ENTRY: &str = "remote_address";
/// Default entry carrying the endpoint path.
pub const DEFAULT_ENDPOINT_ENTRY: &str = "path";
/// Default bound on tracked counters.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;
/// Default time between sweeps of expired counters.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// A loaded, valid configuration.
#[derive(Debug)]
pub struct Config {
    /// The rules.
    pub rules: RuleSet,
    /// Store settings.
    pub store: StoreSettings,
    /// Which counter store (`store.backend`, `store.url`, ...); `--store` overrides it.
    pub backend: Backend,
    /// Clients with individual statistics.
    pub max_clients: usize,
    /// Hash of the file's text after expansion: tells operators which config is live.
    pub hash: u64,
    /// TLS of the gRPC listeners (`tls:`), read at start: the files are re-read when they
    /// change, but other paths take a restart.
    pub tls: TlsSettings,
}

/// `tls:` settings, paths as written; [`load_with`] makes relative ones relative to the
/// config file's directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// The decision listener's.
    pub grpc: Option<crate::tls::TlsFiles>,
    /// The admin listener's.
    pub admin: Option<crate::tls::TlsFiles>,
}

impl TlsSettings {
    fn relative_to(self, dir: &Path) -> Self {
        let under = |f: crate::tls::TlsFiles| crate::tls::TlsFiles {
            cert: dir.join(f.cert),
            key: dir.join(f.key),
            client_ca: f.client_ca.map(|c| dir.join(c)),
        };
        Self {
            grpc: self.grpc.map(under),
            admin: self.admin.map(under),
        }
    }
}

/// `store:` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreSettings {
    /// Upper bound on tracked counters.
    pub max_keys: usize,
    /// Time between sweeps of expired counters.
    pub sweep_interval: Duration,
    /// What to answer when the store fails.
    pub on_error: FailurePolicy,
}

/// Why a config was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read config: {source}")]
    Read {
        /// The file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is over [`guard::MAX_FILE_BYTES`]; nothing of it was read.
    #[error(
        "{file}: refused before parsing: {size} bytes, over the bound of {max} bytes on a config file"
    )]
    TooLarge {
        /// The file.
        file: String,
        /// Its size.
        size: u64,
        /// The bound.
        max: u64,
    },
    /// An envoyproxy/ratelimit file is not valid, in the reference's words.
    #[error(transparent)]
    Reference(#[from] reference::ReferenceError),
    /// A reference setting in the environment cannot be read.
    #[error("environment: {0}")]
    Env(reference_env::EnvError),
    /// A directory holds a sluice config beside the reference's files.
    #[error(
        "{dir}: {native} is a sluice config (it has `domains:`); a directory may hold only envoyproxy/ratelimit files. Serve a sluice config with --config FILE"
    )]
    Mixed {
        /// The directory.
        dir: String,
        /// The first sluice file in it.
        native: String,
    },
    /// The file is not valid.
    #[error("{}", render_invalid(.file, *.line, .path, .message))]
    Invalid {
        /// The file.
        file: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// Field path such as `domains[1].endpoints[0].limits[1]`; empty for syntax errors.
        path: String,
        /// What was wrong and what was expected.
        message: String,
    },
}

fn render_invalid(file: &str, line: Option<usize>, path: &str, message: &str) -> String {
    let mut s = file.to_string();
    if let Some(l) = line {
        let _ = write!(s, ":{l}");
    }
    s.push_str(": ");
    if !path.is_empty() {
        s.push_str(path);
        s.push_str(": ");
    }
    s.push_str(message);
    s
}

/// Reads and compiles the config at `path`, with settings and variables from the process
/// environment. `path` is a sluice config file, an envoyproxy/ratelimit file, or a directory
/// of the reference's files (every `*.yaml` and `*.yml` below it, hidden ones skipped unless
/// `RUNTIME_IGNOREDOTFILES=false`); the format is recognised from each file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, |name| std::env::var(name).ok())
}

/// [`load`] with variables looked up by `env`.
pub fn load_with(path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let files = read_source(path, &env)?;
    from_files(path.is_dir().then_some(path), &files, env)
}

/// Compiles files already read: those of directory `dir`, or with `None` the one file named at
/// the command line. What [`load_with`] does once it has read them, and what the fuzz targets
/// run on their input.
pub fn from_files(
    dir: Option<&Path>,
    files: &[reference::File],
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    if dir.is_none()
        && let [one] = files
        && !reference::is_reference(&one.text)
    {
        let mut cfg = parse(&one.text, &one.name, env)?;
        if let Some(dir) = Path::new(&one.name).parent() {
            cfg.tls = cfg.tls.relative_to(dir);
        }
        return Ok(cfg);
    }
    let native: Vec<&str> = files
        .iter()
        .filter(|f| !reference::is_reference(&f.text))
        .map(|f| f.name.as_str())
        .collect();
    if let Some(first) = native.first() {
        return Err(ConfigError::Mixed {
            dir: dir.map_or_else(|| first.to_string(), |d| d.display().to_string()),
            native: first.to_string(),
        });
    }
    compile_reference(files, env)
}

/// The config directory the reference's `RUNTIME_*` variables name, when `RUNTIME_ROOT` is set.
pub fn runtime_dir(env: impl Fn(&str) -> Option<String>) -> Option<std::path::PathBuf> {
    reference_env::Env(env).runtime().map(|r| r.config_dir())
}

/// The files at `path`: the file itself, or a directory's `*.yaml`/`*.yml` files (recursively,
/// sorted by path, so loading and its errors do not depend on the directory's order).
fn read_source(
    path: &Path,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Vec<reference::File>, ConfigError> {
    let read = |p: &Path| {
        let file = || p.display().to_string();
        crate::input::read_text_bounded(p, guard::MAX_FILE_BYTES).map_err(|e| match e {
            ReadError::Io(source) => ConfigError::Read {
                file: file(),
                source,
            },
            ReadError::TooLarge { size, max } => ConfigError::TooLarge {
                file: file(),
                size,
                max,
            },
        })
    };
    if !path.is_dir() {
        return Ok(vec![reference::File {
            name: path.display().to_string(),
            text: read(path)?,
        }]);
    }
    let skip_hidden = reference_env::Env(env)
        .ignore_dot_files()
        .map_err(ConfigError::Env)?;
    let mut paths = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| ConfigError::Read {
            file: dir.display().to_string(),
            source,
        })?;
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if skip_hidden && name.starts_with('.') {
                continue;
            }
            if p.is_dir() {
                dirs.push(p);
            } else if name.ends_with(".yaml") || name.ends_with(".yml") {
                paths.push(p);
            }
        }
    }
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            Ok(reference::File {
                name: p.display().to_string(),
                text: read(&p)?,
            })
        })
        .collect()
}

/// A fingerprint of what [`load`] would read at `path` (names and bytes of every file), for
/// reloads to notice a change; `None` when nothing can be read (a file briefly missing). A file
/// over the size bound is fingerprinted by its name and size, unread: it is a change for the
/// reload to refuse (logged and counted), not a file to wait for.
pub fn fingerprint(path: &Path) -> Option<u64> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    match read_source(path, &|name| std::env::var(name).ok()) {
        Ok(files) => {
            for f in &files {
                h.update(f.name.as_bytes());
                h.update(&[0]);
                h.update(f.text.as_bytes());
                h.update(&[0]);
            }
        }
        Err(ConfigError::TooLarge { file, size, .. }) => {
            h.update(file.as_bytes());
            h.update(&[0]);
            h.update(&size.to_le_bytes());
        }
        Err(_) => return None,
    }
    Some(h.digest())
}

/// Compiles envoyproxy/ratelimit files with the reference's settings from `env`.
fn compile_reference(
    files: &[reference::File],
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let env = reference_env::Env(env);
    let settings = env.settings().map_err(ConfigError::Env)?;
    let backend = env.backend().map_err(ConfigError::Env)?;
    let grpc_tls = env.grpc_tls().map_err(ConfigError::Env)?;
    let trees = reference::load(files, settings.merge_domain_config)?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for f in files {
        h.update(f.name.as_bytes());
        h.update(&[0]);
        h.update(f.text.as_bytes());
    }
    h.update(format!("{settings:?}").as_bytes());
    let hash = h.digest();
    let mut rules = RuleSet::new(true, Vec::new());
    rules.source_hash = hash;
    rules.shadow = settings.shadow_mode;
    rules.reference = Some(ReferenceRules {
        trees,
        settings,
        files: files.iter().map(|f| f.name.clone()).collect(),
    });
    Ok(Config {
        rules,
        store: StoreSettings {
            max_keys: DEFAULT_MAX_KEYS,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            on_error: FailurePolicy::Allow,
        },
        backend: backend.unwrap_or_default(),
        max_clients: crate::stats::DEFAULT_MAX_CLIENTS,
        hash,
        tls: TlsSettings {
            grpc: grpc_tls,
            admin: None,
        },
    })
}

/// Compiles config `text` (named `file` in errors), looking variables up with `env`.
pub fn parse(
    text: &str,
    file: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let invalid = |line, path: String, message: String| ConfigError::Invalid {
        file: file.to_string(),
        line,
        path,
        message,
    };
    let expanded = env::expand(text, env)
        .map_err(|e| invalid(Some(e.line()), String::new(), e.to_string()))?;
    guard::check_aliases(&expanded).map_err(|m| invalid(None, String::new(), m))?;
    let raw: RawConfig = serde_yaml::from_str(&expanded).map_err(|e| {
        // libyaml ends an unterminated last line before the end of the stream, so an error there
        // would name the line after the last one.
        let last = expanded.matches('\n').count() + 1;
        let line = e.location().map(|l| l.line().min(last));
        let mut message = e.to_string();
        if let Some(i) = message.rfind(" at line ") {
            message.truncate(i);
        }
        // serde_yaml writes `path: message`; keep the two apart for our format.
        let (path, message) = match message.split_once(": ") {
            Some((p, m)) if looks_like_path(p) => (p.to_string(), m.to_string()),
            _ => (String::new(), message),
        };
        invalid(line, path, message)
    })?;
    let hash = xxh3_64(expanded.as_bytes());
    compile(raw, hash).map_err(|(path, message)| {
        invalid(
            locate::line_of(&expanded, &path),
            locate::render(&path),
            message,
        )
    })
}

fn looks_like_path(p: &str) -> bool {
    !p.is_empty()
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']' | '-'))
}

type Invalid = (Vec<Seg>, String);

fn at(path: &[Seg], more: &[Seg], message: impl Into<String>) -> Invalid {
    let mut p = path.to_vec();
    p.extend_from_slice(more);
    (p, message.into())
}

fn field(name: &str) -> Seg {
    Seg::Field(name.to_string())
}

fn compile(raw: RawConfig, hash: u64) -> Result<Config, Invalid> {
    let files = |f: raw::RawTlsFiles| crate::tls::TlsFiles {
        cert: f.cert.into(),
        key: f.key.into(),
        client_ca: f.client_ca.map(Into::into),
    };
    let tls = TlsSettings {
        grpc: raw.tls.grpc.map(files),
        admin: raw.tls.admin.map(files),
    };
    let max_keys = raw.store.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
    if max_keys == 0 {
        return Err(at(
            &[field("store"), field("max_keys")],
            &[],
            "must be at least 1",
        ));
    }
    let sweep = raw
        .store
        .sweep_interval_seconds
        .unwrap_or(DEFAULT_SWEEP_INTERVAL.as_secs());
    if sweep == 0 {
        return Err(at(
            &[field("store"), field("sweep_interval_seconds")],
            &[],
            "must be at least 1",
        ));
    }
    let backend = compile_backend(&raw.store)?;
    let on_error = match raw.store.on_error {
        Some(OnErrorName::Deny) => FailurePolicy::Deny,
        Some(OnErrorName::Allow) | None => FailurePolicy::Allow,
    };
    if raw.domains.is_empty() {
        return Err(at(
            &[field("domains")],
            &[],
            "at least one domain is required",
        ));
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut domains = Vec::with_capacity(raw.domains.len());
    for (i, d) in raw.domains.into_iter().enumerate() {
        let path = [field("domains"), Seg::Index(i)];
        if d.name.trim().is_empty() {
            return Err(at(&path, &[field("name")], "must not be empty"));
        }
        if let Some(first) = seen.insert(d.name.clone(), i) {
            return Err(at(
                &path,
                &[field("name")],
                format!(
                    "duplicate domain {:?} (first defined at domains[{first}])",
                    d.name
                ),
            ));
        }
        domains.push(compile_domain(d, &path)?);
    }
    let mut allowlist = Vec::with_capacity(raw.allowlist.len());
    for (i, a) in raw.allowlist.iter().enumerate() {
        let net = parse_net(a)
            .map_err(|e| at(&[field("allowlist"), Seg::Index(i)], &[], e.to_string()))?;
        allowlist.push(net);
    }
    let address_entry = raw
        .address_entry
        .unwrap_or_else(|| DEFAULT_CLIENT_ENTRY.to_string());
    if address_entry.is_empty() {
        return Err(at(&[field("address_entry")], &[], "must not be empty"));
    }
    let max_clients = raw
        .stats
        .max_clients
        .unwrap_or(crate::stats::DEFAULT_MAX_CLIENTS);
    let mut rules = RuleSet::new(raw.enabled, domains);
    rules.address_entry = address_entry;
    rules.allowlist = allowlist;
    rules.source_hash = hash;
    rules.shadow = raw.shadow;
    Ok(Config {
        rules,
        store: StoreSettings {
            max_keys,
            sweep_interval: Duration::from_secs(sweep),
            on_error,
        },
        backend,
        max_clients,
        hash,
        tls,
    })
}

/// The `store:` backend: memory unless `backend: redis` or a `url`/`cluster` says Redis.
fn compile_backend(store: &RawStore) -> Result<Backend, Invalid> {
    let path = [field("store")];
    let redis = match (store.backend, &store.url, &store.cluster) {
        (Some(BackendName::Memory), None, None) | (None, None, None) => false,
        (Some(BackendName::Memory), _, _) => {
            return Err(at(
                &path,
                &[field("backend")],
                "memory keeps counters in this process: remove url/cluster, or use `backend: redis`",
            ));
        }
        (Some(BackendName::Redis), None, None) => {
            return Err(at(
                &path,
                &[field("backend")],
                "redis needs `url: redis://host:6379` or `cluster: [redis://host:7000, ...]`",
            ));
        }
        (_, Some(_), Some(_)) => {
            return Err(at(
                &path,
                &[field("cluster")],
                "give either url (one server) or cluster (seed nodes), not both",
            ));
        }
        _ => true,
    };
    if !redis {
        for (name, set) in [
            ("timeout_ms", store.timeout_ms.is_some()),
            ("clock", store.clock.is_some()),
            ("tls_ca_file", store.tls_ca_file.is_some()),
            ("over_limit_cache", store.over_limit_cache.is_some()),
        ] {
            if set {
                return Err(at(
                    &path,
                    &[field(name)],
                    "only applies to `backend: redis`",
                ));
            }
        }
        return Ok(Backend::Memory);
    }
    let check_url = |u: &str, more: &[Seg]| {
        if u.starts_with("redis://") || u.starts_with("rediss://") {
            Ok(u.to_string())
        } else {
            Err(at(
                &path,
                more,
                format!("{u:?}: expected a redis:// or rediss:// URL"),
            ))
        }
    };
    let nodes = match (&store.url, &store.cluster) {
        (Some(u), _) => RedisNodes::Single(check_url(u, &[field("url")])?),
        (None, Some(nodes)) if nodes.is_empty() => {
            return Err(at(
                &path,
                &[field("cluster")],
                "list at least one seed node",
            ));
        }
        (None, Some(nodes)) => RedisNodes::Cluster(
            nodes
                .iter()
                .enumerate()
                .map(|(i, u)| check_url(u, &[field("cluster"), Seg::Index(i)]))
                .collect::<Result<_, _>>()?,
        ),
        (None, None) => return Ok(Backend::Memory),
    };
    let timeout = match store.timeout_ms {
        Some(0) => return Err(at(&path, &[field("timeout_ms")], "must be at least 1")),
        Some(ms) => Duration::from_millis(ms),
        None => RedisOptions::DEFAULT_TIMEOUT,
    };
    Ok(Backend::Redis(RedisOptions {
        nodes,
        timeout,
        time: match store.clock {
            Some(ClockName::Local) => TimeSource::Caller,
            Some(ClockName::Redis) | None => TimeSource::Redis,
        },
        tls_ca_file: store.tls_ca_file.as_ref().map(std::path::PathBuf::from),
        over_limit_cache: store.over_limit_cache.unwrap_or(true),
    }))
}

fn compile_domain(d: RawDomain, path: &[Seg]) -> Result<Domain, Invalid> {
    let client = d
        .client
        .unwrap_or_else(|| vec![DEFAULT_CLIENT_ENTRY.to_string()]);
    for (i, c) in client.iter().enumerate() {
        if c.is_empty() {
            return Err(at(
                path,
                &[field("client"), Seg::Index(i)],
                "entry key must not be empty",
            ));
        }
    }
    let endpoint_entry = d
        .endpoint_entry
        .unwrap_or_else(|| DEFAULT_ENDPOINT_ENTRY.to_string());
    if endpoint_entry.is_empty() {
        return Err(at(path, &[field("endpoint_entry")], "must not be empty"));
    }
    let algorithm = d.algorithm.unwrap_or(AlgorithmName::SlidingWindow);
    let mut rules = Vec::new();
    let mut routes = PathRouter::new();
    for (i, e) in d.endpoints.into_iter().enumerate() {
        let epath = [path, &[field("endpoints"), Seg::Index(i)]].concat();
        let template = PathTemplate::parse(&e.path)
            .map_err(|err| at(&epath, &[field("path")], err.to_string()))?;
        routes
            .insert(template, rules.len())
            .map_err(|err| at(&epath, &[field("path")], err.to_string()))?;
        rules.push(compile_endpoint(&d.name, e, &epath, &client, algorithm)?);
    }
    if !d.global.is_empty() {
        let gpath = [path, &[field("global")]].concat();
        let limits = compile_limits(&d.name, "global", &d.global, &gpath, algorithm, false)?;
        rules.push(Rule {
            name: "global".to_string(),
            // Every descriptor that names an endpoint is a request to count.
            conditions: vec![Condition::Present(endpoint_entry.clone())],
            client: Vec::new(),
            limits,
            stats: Arc::default(),
            shared_group: 0,
        });
    }
    let auto_block = match d.auto_block {
        None => None,
        Some(a) => Some(compile_auto_block(
            &d.name,
            a,
            &[path, &[field("auto_block")]].concat(),
        )?),
    };
    let mut domain = Domain::new(d.name, endpoint_entry, rules, routes);
    domain.client = client;
    domain.auto_block = auto_block;
    Ok(domain)
}

/// Default duration of an automatic block: the Talk2Me seed's one hour.
pub const DEFAULT_AUTO_BLOCK: Duration = Duration::from_secs(3600);

fn compile_auto_block(domain: &str, a: RawAutoBlock, path: &[Seg]) -> Result<AutoBlock, Invalid> {
    let duration = a.duration_seconds.unwrap_or(DEFAULT_AUTO_BLOCK.as_secs());
    if duration == 0 {
        return Err(at(path, &[field("duration_seconds")], "must be at least 1"));
    }
    if a.max_requests.is_none() && a.max_limited.is_none() {
        return Err(at(
            path,
            &[],
            "set max_requests (e.g. 100/minute) and/or max_limited (e.g. 10/10 minutes)",
        ));
    }
    let limit = |rate: Option<Rate>, what: &str| -> Result<Option<Limit>, Invalid> {
        rate.map(|r| {
            compile_limit(
                domain,
                "auto-block",
                r,
                AlgorithmName::SlidingWindow,
                Some(what),
                false,
                &[path, &[field(what)]].concat(),
            )
        })
        .transpose()
    };
    Ok(AutoBlock {
        duration: Duration::from_secs(duration),
        max_requests: limit(a.max_requests, "max_requests")?,
        max_limited: limit(a.max_limited, "max_limited")?,
    })
}

fn compile_endpoint(
    domain: &str,
    e: RawEndpoint,
    path: &[Seg],
    client: &[String],
    domain_algorithm: AlgorithmName,
) -> Result<Rule, Invalid> {
    let algorithm = e.algorithm.unwrap_or(domain_algorithm);
    let mut limits = compile_limits(
        domain,
        &e.path,
        &e.limits,
        &[path, &[field("limits")]].concat(),
        algorithm,
        e.shadow,
    )?;
    match (e.burst, e.refill) {
        (Some(0), _) => return Err(at(path, &[field("burst")], "must be at least 1")),
        (Some(burst), Some(refill)) => {
            let interval = NonZeroU64::new(refill.window_nanos() / refill.count)
                .ok_or_else(|| at(path, &[field("refill")], "refill interval is too short"))?;
            let name = "burst";
            limits.push(Limit {
                id: limit_id(domain, &e.path, name, "token_bucket", interval.get()),
                name: Arc::from(name),
                rate: format!("burst {burst}, refill {refill}"),
                policy: Policy::TokenBucket {
                    capacity: burst,
                    interval,
                },
                reported: Reported::for_bucket(interval.get()),
                shadow: e.shadow,
                counts: Arc::default(),
            });
        }
        (Some(_), None) => {
            return Err(at(
                path,
                &[field("burst")],
                "burst needs a refill rate too (e.g. `refill: 1/6 seconds`)",
            ));
        }
        (None, Some(_)) => {
            return Err(at(
                path,
                &[field("refill")],
                "refill needs a burst size too (e.g. `burst: 3`)",
            ));
        }
        (None, None) => {}
    }
    if limits.is_empty() {
        return Err(at(
            path,
            &[],
            "endpoint has no limits (add `limits:` or `burst:`)",
        ));
    }
    Ok(Rule {
        name: e.path,
        conditions: Vec::new(),
        client: client.to_vec(),
        limits,
        stats: Arc::default(),
        shared_group: 0,
    })
}

fn compile_limits(
    domain: &str,
    rule: &str,
    raw: &[RawLimit],
    path: &[Seg],
    default_algorithm: AlgorithmName,
    shadow: bool,
) -> Result<Vec<Limit>, Invalid> {
    let mut out = Vec::new();
    for (i, l) in raw.iter().enumerate() {
        let lpath = [path, &[Seg::Index(i)]].concat();
        match l {
            RawLimit::Rates(rates) => {
                for r in rates {
                    out.push(compile_limit(
                        domain,
                        rule,
                        *r,
                        default_algorithm,
                        None,
                        shadow,
                        &lpath,
                    )?);
                }
            }
            RawLimit::Full(f) => out.push(compile_limit(
                domain,
                rule,
                f.rate,
                f.algorithm.unwrap_or(default_algorithm),
                f.name.as_deref(),
                shadow || f.shadow,
                &lpath,
            )?),
        }
    }
    Ok(out)
}

fn compile_limit(
    domain: &str,
    rule: &str,
    rate: Rate,
    algorithm: AlgorithmName,
    name: Option<&str>,
    shadow: bool,
    path: &[Seg],
) -> Result<Limit, Invalid> {
    let window = NonZeroU64::new(rate.window_nanos())
        .ok_or_else(|| at(path, &[], "window must be longer than zero"))?;
    let name = match name {
        Some("") => return Err(at(path, &[field("name")], "must not be empty")),
        Some(n) => n.to_string(),
        None => rate.name(),
    };
    let (policy, reported, algo) = match algorithm {
        AlgorithmName::SlidingWindow => (
            Policy::SlidingWindow {
                limit: rate.count,
                window,
            },
            Reported::for_window(rate.count, window.get()),
            "sliding_window",
        ),
        AlgorithmName::FixedWindow => (
            Policy::FixedWindow {
                limit: rate.count,
                window,
            },
            Reported::for_window(rate.count, window.get()),
            "fixed_window",
        ),
        AlgorithmName::TokenBucket => {
            let interval = NonZeroU64::new(window.get() / rate.count)
                .ok_or_else(|| at(path, &[], "rate is too fast for a token bucket"))?;
            (
                Policy::TokenBucket {
                    capacity: rate.count,
                    interval,
                },
                Reported::for_window(rate.count, window.get()),
                "token_bucket",
            )
        }
    };
    Ok(Limit {
        id: limit_id(domain, rule, &name, algo, window.get()),
        name: Arc::from(name.as_str()),
        rate: rate.to_string(),
        policy,
        reported,
        shadow,
        counts: Arc::default(),
    })
}

/// A limit's identity: everything but its numbers, so a reload that only changes a count
/// keeps the live counters.
fn limit_id(domain: &str, rule: &str, name: &str, algorithm: &str, window: u64) -> u64 {
    let mut buf = Vec::with_capacity(domain.len() + rule.len() + name.len() + 40);
    for part in [domain, rule, name, algorithm] {
        buf.extend_from_slice(&(part.len() as u64).to_le_bytes());
        buf.extend_from_slice(part.as_bytes());
    }
    buf.extend_from_slice(&window.to_le_bytes());
    xxh3_64(&buf)
}

/// The effective limits as a table, one row per limit: what `sluice check` prints.
pub fn limits_table(rules: &RuleSet) -> String {
    let mut rows = vec![[
        "DOMAIN".to_string(),
        "ENDPOINT".to_string(),
        "CLIENT".to_string(),
        "LIMIT".to_string(),
        "ALGORITHM".to_string(),
        "REPORTED AS".to_string(),
    ]];
    for d in &rules.domains {
        for r in &d.rules {
            let client = if r.client.is_empty() {
                "(all clients)".to_string()
            } else {
                r.client.join("+")
            };
            for l in &r.limits {
                let mut algo = l.policy.algorithm().as_str().to_string();
                if l.shadow {
                    algo.push_str(" (shadow)");
                }
                rows.push([
                    d.name.clone(),
                    r.name.clone(),
                    client.clone(),
                    format!("{} [{}]", l.rate, l.name),
                    algo,
                    format!(
                        "{}/{}",
                        l.reported.requests_per_unit,
                        l.reported.unit.as_str()
                    ),
                ]);
            }
        }
        // Automatic blocks count per address, whatever the domain's client entries are.
        if let Some(ab) = &d.auto_block {
            for l in ab.max_requests.iter().chain(ab.max_limited.iter()) {
                rows.push([
                    d.name.clone(),
                    "auto_block".to_string(),
                    rules.address_entry.clone(),
                    format!("{} [{}]", l.rate, l.name),
                    l.policy.algorithm().as_str().to_string(),
                    format!("block {} s", ab.duration.as_secs()),
                ]);
            }
        }
    }
    for t in rules.reference.iter().flat_map(|r| &r.trees) {
        let mut limits = t.limits();
        limits.sort_by(|a, b| a.key.cmp(&b.key));
        for l in limits {
            let rule = l
                .key
                .strip_prefix(&format!("{}.", t.domain))
                .unwrap_or(&l.key);
            let (limit, reported) = match l.unit {
                Some(u) if !l.unlimited => (
                    format!("{}/{} [{}]", l.requests_per_unit, u.as_str(), l.name),
                    format!("{}/{}", l.requests_per_unit, u.as_str()),
                ),
                _ => ("unlimited".to_string(), "-".to_string()),
            };
            let mut algo = "fixed_window (reference)".to_string();
            if l.shadow {
                algo.push_str(" (shadow)");
            }
            rows.push([
                t.domain.clone(),
                rule.to_string(),
                "(descriptor values)".to_string(),
                limit,
                algo,
                reported,
            ]);
        }
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
