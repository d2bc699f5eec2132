//! envoyproxy/ratelimit's settings, read from the same environment variables with the same
//! defaults, so that a deployment manifest written for the reference runs sluice unchanged.
//! Variables sluice honours are mapped onto its own settings; a reference variable that is set
//! but not honoured is named in a warning at start, never silently ignored.

use std::path::PathBuf;
use std::time::Duration;

use crate::limiter::reference::{KeyNames, LimitHeaders, ReferenceSettings};
use crate::store::{Backend, RedisNodes, RedisOptions, TimeSource};

/// The reference's runtime directory: `RUNTIME_ROOT`/`RUNTIME_SUBDIRECTORY`/`RUNTIME_APPDIRECTORY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeDirs {
    /// `RUNTIME_ROOT` (default `/srv/runtime_data/current`).
    pub root: PathBuf,
    /// `RUNTIME_SUBDIRECTORY`.
    pub subdirectory: String,
    /// `RUNTIME_APPDIRECTORY` (default `config`).
    pub appdirectory: String,
}

impl RuntimeDirs {
    /// The directory whose files are loaded. The reference watches root/subdirectory and loads
    /// the keys under the app directory (`RUNTIME_WATCH_ROOT=true`, its default), or watches
    /// root/subdirectory/appdirectory (`false`): the same files either way.
    pub fn config_dir(&self) -> PathBuf {
        self.root.join(&self.subdirectory).join(&self.appdirectory)
    }
}

/// Reference variables with no sluice equivalent, or one under another name: set, they are
/// named in a warning with what to use instead.
pub const NOT_HONOURED: &[(&str, &str)] = &[
    ("HOST", "use --http-addr"),
    ("PORT", "use --http-addr"),
    ("GRPC_HOST", "use --grpc-addr"),
    ("GRPC_PORT", "use --grpc-addr"),
    ("GRPC_UDS", "sluice listens on TCP only"),
    (
        "DEBUG_HOST",
        "sluice has no debug listener; see /metrics and the admin service",
    ),
    (
        "DEBUG_PORT",
        "sluice has no debug listener; see /metrics and the admin service",
    ),
    ("GRPC_MAX_CONNECTION_AGE", "see --idle-timeout"),
    ("GRPC_MAX_CONNECTION_AGE_GRACE", "see --idle-timeout"),
    (
        "GRPC_CLIENT_TLS_SAN",
        "any client certificate GRPC_CLIENT_TLS_CACERT signed is accepted",
    ),
    ("LOG_LEVEL", "use RUST_LOG"),
    ("LOG_FORMAT", "sluice logs text"),
    ("CONFIG_TYPE", "only FILE is supported"),
    (
        "FORCE_START_WITHOUT_INITIAL_CONFIG",
        "sluice needs a valid config to start",
    ),
    ("USE_STATSD", "statistics are on /metrics (Prometheus) only"),
    (
        "STATSD_HOST",
        "statistics are on /metrics (Prometheus) only",
    ),
    (
        "STATSD_PORT",
        "statistics are on /metrics (Prometheus) only",
    ),
    (
        "USE_DOG_STATSD",
        "statistics are on /metrics (Prometheus) only",
    ),
    (
        "USE_DOG_STATSD_MOGRIFIERS",
        "statistics are on /metrics (Prometheus) only",
    ),
    ("EXTRA_TAGS", "not supported"),
    ("STATS_FLUSH_INTERVAL", "/metrics is read live"),
    ("DISABLE_STATS", "not supported"),
    ("PROMETHEUS_ADDR", "/metrics is served on --http-addr"),
    ("PROMETHEUS_PATH", "/metrics is served on --http-addr"),
    ("PROMETHEUS_MAPPER_YAML", "the default mapping is built in"),
    (
        "PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS",
        "see sluice_decision_seconds",
    ),
    ("REDIS_POOL_SIZE", "sluice multiplexes one connection"),
    ("REDIS_PIPELINE_WINDOW", "sluice pipelines by itself"),
    ("REDIS_PIPELINE_LIMIT", "sluice pipelines by itself"),
    ("REDIS_CLUSTER_PIPELINE_PARALLELISM", "not supported"),
    ("REDIS_PERSECOND", "one Redis serves every unit"),
    ("REDIS_PERSECOND_URL", "one Redis serves every unit"),
    ("REDIS_SENTINEL_AUTH", "Sentinel is not supported"),
    (
        "REDIS_TLS_CLIENT_CERT",
        "client certificates for Redis are not supported",
    ),
    (
        "REDIS_TLS_CLIENT_KEY",
        "client certificates for Redis are not supported",
    ),
    (
        "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION",
        "not supported: names are always verified",
    ),
    ("REDIS_HEALTH_CHECK_ACTIVE_CONNECTION", "not supported"),
    (
        "REDIS_POOL_ON_EMPTY_BEHAVIOR",
        "sluice multiplexes one connection",
    ),
    ("MEMCACHE_HOST_PORT", "memcached is not supported"),
    ("MEMCACHE_SRV", "memcached is not supported"),
    ("TRACING_ENABLED", "tracing is not supported"),
];

/// A variable whose value cannot be read, named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}={value:?}: {problem}")]
pub struct EnvError {
    /// The variable.
    pub name: String,
    /// Its value.
    pub value: String,
    /// What was expected.
    pub problem: String,
}

/// Reads variables through `get` (the process environment in `sluice`, a table in tests).
pub struct Env<F>(pub F);

impl<F: Fn(&str) -> Option<String>> Env<F> {
    fn raw(&self, name: &str) -> Option<String> {
        (self.0)(name)
    }

    fn string(&self, name: &str, default: &str) -> String {
        self.raw(name).unwrap_or_else(|| default.to_string())
    }

    /// Go's `strconv.ParseBool`, which the reference's settings use.
    fn bool(&self, name: &str, default: bool) -> Result<bool, EnvError> {
        let Some(v) = self.raw(name) else {
            return Ok(default);
        };
        match v.as_str() {
            "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
            "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
            _ => Err(self.bad(name, &v, "expected true or false")),
        }
    }

    fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, EnvError> {
        match self.raw(name) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| self.bad(name, &v, "expected a number")),
        }
    }

    fn bad(&self, name: &str, value: &str, problem: &str) -> EnvError {
        EnvError {
            name: name.to_string(),
            value: value.to_string(),
            problem: problem.to_string(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> Result<ReferenceSettings, EnvError> {
        let ratio: f32 = self.number("NEAR_LIMIT_RATIO", 0.8)?;
        let headers = self
            .bool("LIMIT_RESPONSE_HEADERS_ENABLED", false)?
            .then(|| LimitHeaders {
                limit: self.string("LIMIT_LIMIT_HEADER", "RateLimit-Limit"),
                remaining: self.string("LIMIT_REMAINING_HEADER", "RateLimit-Remaining"),
                reset: self.string("LIMIT_RESET_HEADER", "RateLimit-Reset"),
            });
        let key_names = match self.raw("SLUICE_REDIS_KEYS").as_deref() {
            None | Some("reference") => KeyNames::Reference,
            Some("sluice") => KeyNames::Sluice,
            Some(v) => {
                return Err(self.bad("SLUICE_REDIS_KEYS", v, "expected sluice or reference"));
            }
        };
        Ok(ReferenceSettings {
            merge_domain_config: self.bool("MERGE_DOMAIN_CONFIG", false)?,
            shadow_mode: self.bool("SHADOW_MODE", false)?,
            quota_mode: self.bool("QUOTA_MODE", false)?,
            stop_increment_when_over: self
                .bool("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", false)?,
            near_limit_ratio: ratio,
            headers,
            dynamic_metadata: self.bool("RESPONSE_DYNAMIC_METADATA", false)?,
            healthy_with_one_config: self.bool("HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED", false)?,
            local_cache_bytes: self.number("LOCAL_CACHE_SIZE_IN_BYTES", 0)?,
            cache_key_prefix: self.string("CACHE_KEY_PREFIX", ""),
            expiration_jitter_max_seconds: self.number("EXPIRATION_JITTER_MAX_SECONDS", 300)?,
            key_names,
        })
    }

    /// The runtime directory, when `RUNTIME_ROOT` is set.
    pub fn runtime(&self) -> Option<RuntimeDirs> {
        let root = self.raw("RUNTIME_ROOT")?;
        Some(RuntimeDirs {
            root: PathBuf::from(root),
            subdirectory: self.string("RUNTIME_SUBDIRECTORY", ""),
            appdirectory: self.string("RUNTIME_APPDIRECTORY", "config"),
        })
    }

    /// Whether hidden files are skipped in the runtime directory. The reference's default
    /// (`RUNTIME_IGNOREDOTFILES=false`) loads them; sluice skips them unless told otherwise,
    /// because a Kubernetes ConfigMap mount holds every file twice, once under `..data`.
    pub fn ignore_dot_files(&self) -> Result<bool, EnvError> {
        self.bool("RUNTIME_IGNOREDOTFILES", true)
    }

    /// The decision listener's TLS, as the reference's `GRPC_SERVER_USE_TLS`,
    /// `GRPC_SERVER_TLS_CERT`, `GRPC_SERVER_TLS_KEY` and (for mTLS) `GRPC_CLIENT_TLS_CACERT` ask.
    pub fn grpc_tls(&self) -> Result<Option<crate::tls::TlsFiles>, EnvError> {
        if !self.bool("GRPC_SERVER_USE_TLS", false)? {
            return Ok(None);
        }
        let file = |name: &str| {
            self.raw(name)
                .filter(|v| !v.is_empty())
                .map(std::path::PathBuf::from)
        };
        let needed = |name: &str| {
            file(name).ok_or_else(|| self.bad(name, "", "needed with GRPC_SERVER_USE_TLS=true"))
        };
        Ok(Some(crate::tls::TlsFiles {
            cert: needed("GRPC_SERVER_TLS_CERT")?,
            key: needed("GRPC_SERVER_TLS_KEY")?,
            client_ca: file("GRPC_CLIENT_TLS_CACERT"),
        }))
    }

    /// The counter store the reference's variables ask for: Redis when `BACKEND_TYPE=redis` is
    /// set explicitly or `REDIS_URL` is; otherwise `None` (sluice's memory store, where the
    /// reference would try its default nutcracker socket).
    pub fn backend(&self) -> Result<Option<Backend>, EnvError> {
        let backend = self.raw("BACKEND_TYPE");
        match backend.as_deref() {
            None | Some("redis") | Some("memory") => {}
            Some(v) => {
                return Err(self.bad("BACKEND_TYPE", v, "sluice supports redis (or memory)"));
            }
        }
        if backend.as_deref() == Some("memory") {
            return Ok(Some(Backend::Memory));
        }
        let Some(url) = self.raw("REDIS_URL") else {
            if backend.is_some() {
                return Err(self.bad("BACKEND_TYPE", "redis", "REDIS_URL must be set"));
            }
            return Ok(None);
        };
        let tls = self.bool("REDIS_TLS", false)?;
        let auth = self.raw("REDIS_AUTH").filter(|a| !a.is_empty());
        let socket = self.string("REDIS_SOCKET_TYPE", "unix");
        // REDIS_AUTH is `password` or `user:password`.
        let (user, pass) = match auth
            .as_deref()
            .map(|a| a.split_once(':').unwrap_or(("", a)))
        {
            Some((u, p)) => (u.to_string(), Some(p.to_string())),
            None => (String::new(), None),
        };
        let to_url = |addr: &str| -> Result<String, EnvError> {
            if addr.contains("://") {
                return Ok(addr.to_string());
            }
            match (socket.as_str(), &pass) {
                ("unix", None) => Ok(format!("redis+unix://{addr}")),
                ("unix", Some(p)) if user.is_empty() => Ok(format!("redis+unix://{addr}?pass={p}")),
                ("unix", Some(p)) => Ok(format!("redis+unix://{addr}?user={user}&pass={p}")),
                ("tcp", _) => {
                    let scheme = if tls { "rediss" } else { "redis" };
                    let userinfo = pass
                        .as_ref()
                        .map(|p| format!("{user}:{p}@"))
                        .unwrap_or_default();
                    Ok(format!("{scheme}://{userinfo}{addr}"))
                }
                (other, _) => Err(self.bad("REDIS_SOCKET_TYPE", other, "expected unix or tcp")),
            }
        };
        let nodes = match self
            .string("REDIS_TYPE", "SINGLE")
            .to_ascii_uppercase()
            .as_str()
        {
            "SINGLE" => RedisNodes::Single(to_url(url.trim())?),
            "CLUSTER" => RedisNodes::Cluster(
                url.split(',')
                    .map(|u| to_url(u.trim()))
                    .collect::<Result<_, _>>()?,
            ),
            other => {
                return Err(self.bad("REDIS_TYPE", other, "sluice supports SINGLE and CLUSTER"));
            }
        };
        let mut options = RedisOptions::new(nodes);
        // The reference counts in its own clock's windows; so do reference rules here.
        options.time = TimeSource::Caller;
        if let Some(t) = self.raw("REDIS_TIMEOUT") {
            options.timeout = parse_go_duration(&t)
                .ok_or_else(|| self.bad("REDIS_TIMEOUT", &t, "expected a duration such as 10s"))?;
        }
        options.tls_ca_file = self
            .raw("REDIS_TLS_CACERT")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        Ok(Some(Backend::Redis(options)))
    }

    /// Reference variables that are set but not honoured, each with its advice.
    pub fn unhonoured(&self) -> Vec<String> {
        NOT_HONOURED
            .iter()
            .filter(|(name, _)| self.raw(name).is_some())
            .map(|(name, advice)| format!("{name} is not honoured: {advice}"))
            .collect()
    }
}

/// A Go duration of one unit (`10s`, `500ms`, `1m`, `2h`).
fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let secs = match unit {
        "ns" => n / 1e9,
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Env<impl Fn(&str) -> Option<String>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env(move |k: &str| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_the_reference_defaults() {
        let s = env(&[]).settings().unwrap();
        assert_eq!(s, ReferenceSettings::default());
        assert!((s.near_limit_ratio - 0.8).abs() < f32::EPSILON);
        assert_eq!(env(&[]).backend().unwrap(), None);
        assert_eq!(env(&[]).runtime(), None);
    }

    #[test]
    fn settings_are_read_from_the_reference_names() {
        let e = env(&[
            ("SHADOW_MODE", "true"),
            ("MERGE_DOMAIN_CONFIG", "1"),
            ("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT", "True"),
            ("NEAR_LIMIT_RATIO", "0.5"),
            ("LIMIT_RESPONSE_HEADERS_ENABLED", "true"),
            ("LIMIT_RESET_HEADER", "X-Reset"),
            ("RESPONSE_DYNAMIC_METADATA", "t"),
            ("SLUICE_REDIS_KEYS", "sluice"),
        ]);
        let s = e.settings().unwrap();
        assert!(s.shadow_mode && s.merge_domain_config && s.stop_increment_when_over);
        assert!(s.dynamic_metadata);
        assert_eq!(s.key_names, KeyNames::Sluice);
        assert!((s.near_limit_ratio - 0.5).abs() < f32::EPSILON);
        let h = s.headers.unwrap();
        assert_eq!(
            (h.limit.as_str(), h.remaining.as_str(), h.reset.as_str()),
            ("RateLimit-Limit", "RateLimit-Remaining", "X-Reset")
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = env(&[("SHADOW_MODE", "yes")]).settings().unwrap_err();
        assert_eq!(e.name, "SHADOW_MODE");
        let e = env(&[("NEAR_LIMIT_RATIO", "most")]).settings().unwrap_err();
        assert_eq!(e.name, "NEAR_LIMIT_RATIO");
    }

    fn redis(vars: &[(&str, &str)]) -> RedisOptions {
        match env(vars).backend().unwrap() {
            Some(Backend::Redis(o)) => o,
            other => panic!("not redis: {other:?}"),
        }
    }

    #[test]
    fn redis_variables_become_the_redis_store() {
        let o = redis(&[
            ("REDIS_SOCKET_TYPE", "tcp"),
            ("REDIS_URL", "127.0.0.1:6379"),
            ("REDIS_AUTH", "secret"),
            ("REDIS_TIMEOUT", "250ms"),
        ]);
        let single = |u: &str| RedisNodes::Single(u.into());
        assert_eq!(o.nodes, single("redis://:secret@127.0.0.1:6379"));
        assert_eq!(o.timeout, Duration::from_millis(250));
        let o = redis(&[
            ("REDIS_SOCKET_TYPE", "tcp"),
            ("REDIS_TLS", "true"),
            ("REDIS_TYPE", "cluster"),
            ("REDIS_URL", "a:1,b:2"),
        ]);
        assert_eq!(
            o.nodes,
            RedisNodes::Cluster(vec!["rediss://a:1".into(), "rediss://b:2".into()])
        );
        // The reference's default socket type is unix.
        let o = redis(&[("REDIS_URL", "/run/r.sock"), ("REDIS_AUTH", "u:p")]);
        assert_eq!(o.nodes, single("redis+unix:///run/r.sock?user=u&pass=p"));
        let o = redis(&[("REDIS_URL", "/run/r.sock")]);
        assert_eq!(o.nodes, single("redis+unix:///run/r.sock"));
        assert!(env(&[("BACKEND_TYPE", "memcache")]).backend().is_err());
        assert_eq!(
            env(&[("BACKEND_TYPE", "memory")]).backend().unwrap(),
            Some(Backend::Memory)
        );
    }

    #[test]
    fn unhonoured_variables_are_named() {
        let w = env(&[("USE_STATSD", "true"), ("SHADOW_MODE", "true")]).unhonoured();
        assert_eq!(w.len(), 1);
        assert!(w[0].starts_with("USE_STATSD is not honoured"), "{w:?}");
    }

    #[test]
    fn runtime_directory_is_composed_as_the_reference_does() {
        let r = env(&[
            ("RUNTIME_ROOT", "/data"),
            ("RUNTIME_SUBDIRECTORY", "ratelimit"),
        ])
        .runtime()
        .unwrap();
        assert_eq!(r.config_dir(), PathBuf::from("/data/ratelimit/config"));
    }

    #[test]
    fn the_reference_tls_variables_give_the_decision_listener_its_tls() {
        assert_eq!(
            env(&[("GRPC_SERVER_TLS_CERT", "c.pem")])
                .grpc_tls()
                .unwrap(),
            None
        );
        let tls = env(&[
            ("GRPC_SERVER_USE_TLS", "true"),
            ("GRPC_SERVER_TLS_CERT", "/tls/c.pem"),
            ("GRPC_SERVER_TLS_KEY", "/tls/k.pem"),
            ("GRPC_CLIENT_TLS_CACERT", "/tls/ca.pem"),
        ])
        .grpc_tls()
        .unwrap()
        .unwrap();
        assert_eq!(tls.cert, PathBuf::from("/tls/c.pem"));
        assert_eq!(tls.key, PathBuf::from("/tls/k.pem"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("/tls/ca.pem")));
        let err = env(&[
            ("GRPC_SERVER_USE_TLS", "true"),
            ("GRPC_SERVER_TLS_CERT", "c"),
        ])
        .grpc_tls()
        .unwrap_err();
        assert_eq!(err.name, "GRPC_SERVER_TLS_KEY");
    }
}
