//! The file format as serde structs, exactly as a person writes it. Unknown fields are errors.
//! Values that can be checked on their own (rates, algorithm names, booleans) are checked while
//! deserializing, so their errors carry serde_yaml's field path and line for free.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use super::rate::{self, Rate};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `false`: answer OK to everything, still counting.
    #[serde(default = "yes", deserialize_with = "flexible_bool")]
    pub enabled: bool,
    /// Shadow mode: evaluate and count every limit, enforce none.
    #[serde(default, deserialize_with = "flexible_bool")]
    pub shadow: bool,
    /// Store settings.
    #[serde(default)]
    pub store: RawStore,
    /// Statistics settings.
    #[serde(default)]
    pub stats: RawStats,
    /// Descriptor entry holding the client address (default `remote_address`).
    pub address_entry: Option<String>,
    /// Addresses and CIDRs that skip every limit.
    #[serde(default)]
    pub allowlist: Vec<String>,
    /// Domains, in order.
    pub domains: Vec<RawDomain>,
    /// TLS of the gRPC listeners.
    #[serde(default)]
    pub tls: RawTls,
}

/// `tls:` settings: each gRPC listener's certificate, key and, for mTLS, client CA.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// The decision listener (`--grpc-tls-*`).
    pub grpc: Option<RawTlsFiles>,
    /// The admin listener (`--admin-tls-*`).
    pub admin: Option<RawTlsFiles>,
}

/// One listener's TLS files, relative to the config file's directory unless absolute.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTlsFiles {
    /// Certificate chain, PEM.
    pub cert: String,
    /// Private key, PEM.
    pub key: String,
    /// CA that signs the clients' certificates (mTLS).
    pub client_ca: Option<String>,
}

/// `stats:` settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStats {
    /// Clients with individual counts.
    pub max_clients: Option<usize>,
}

/// `auto_block:` settings of a domain.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAutoBlock {
    /// How long an automatic block lasts (default one hour, as the Talk2Me seed).
    pub duration_seconds: Option<u64>,
    /// Block an address sending more than this across all endpoints.
    #[serde(default, deserialize_with = "optional_rate")]
    pub max_requests: Option<Rate>,
    /// Block an address limited more often than this.
    #[serde(default, deserialize_with = "optional_rate")]
    pub max_limited: Option<Rate>,
}

fn yes() -> bool {
    true
}

/// `store:` settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// Upper bound on tracked counters.
    pub max_keys: Option<usize>,
    /// Seconds between sweeps of expired counters.
    pub sweep_interval_seconds: Option<u64>,
    /// `memory` (default) or `redis` (implied by `url` or `cluster`).
    pub backend: Option<BackendName>,
    /// Redis URL: `redis://[:password@]host:port[/db]`, `rediss://` for TLS.
    pub url: Option<String>,
    /// Redis Cluster seed node URLs.
    pub cluster: Option<Vec<String>>,
    /// Deadline of each Redis call in milliseconds (default 50).
    pub timeout_ms: Option<u64>,
    /// What to answer when the store fails: `allow` (default) or `deny`.
    pub on_error: Option<OnErrorName>,
    /// Where Redis reads time: `redis` (its `TIME`, default) or `local` (this process's clock).
    pub clock: Option<ClockName>,
    /// PEM file of CA certificates trusted for `rediss://` (default: the system's).
    pub tls_ca_file: Option<String>,
    /// Answer keys known to be over their limit without asking Redis (default true).
    pub over_limit_cache: Option<bool>,
}

/// `store.backend` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendName {
    /// Counters in this process.
    Memory,
    /// Counters in Redis, shared by replicas.
    Redis,
}

/// `store.on_error` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnErrorName {
    /// Let requests through.
    Allow,
    /// Reject requests.
    Deny,
}

/// `store.clock` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockName {
    /// Redis's `TIME`.
    Redis,
    /// The sluice process's clock.
    Local,
}

/// One domain.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDomain {
    /// The domain Envoy sends.
    pub name: String,
    /// Entries identifying the client (default `[remote_address]`).
    pub client: Option<Vec<String>>,
    /// Entry carrying the endpoint path (default `path`).
    pub endpoint_entry: Option<String>,
    /// Default algorithm for this domain's limits.
    pub algorithm: Option<AlgorithmName>,
    /// Limits shared by every client of the domain.
    #[serde(default)]
    pub global: Vec<RawLimit>,
    /// Per-endpoint limits.
    #[serde(default)]
    pub endpoints: Vec<RawEndpoint>,
    /// Automatic blocking of abusive client addresses.
    pub auto_block: Option<RawAutoBlock>,
}

/// One endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpoint {
    /// Path template.
    pub path: String,
    /// Limits, all of which must pass.
    #[serde(default)]
    pub limits: Vec<RawLimit>,
    /// Token bucket capacity.
    pub burst: Option<u64>,
    /// Token bucket refill rate (`1/6 seconds`).
    #[serde(default, deserialize_with = "optional_rate")]
    pub refill: Option<Rate>,
    /// Default algorithm for this endpoint's limits.
    pub algorithm: Option<AlgorithmName>,
    /// Evaluate this endpoint's limits without enforcing them.
    #[serde(default, deserialize_with = "flexible_bool")]
    pub shadow: bool,
}

/// A limit: a rate string (`10/minute`, or several: `10/minute; 100/hour`) or a map.
#[derive(Debug)]
pub enum RawLimit {
    /// One or more rates with defaults for everything else.
    Rates(Vec<Rate>),
    /// A rate with options.
    Full(RawLimitFull),
}

/// A limit written as a map.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimitFull {
    /// The rate.
    #[serde(deserialize_with = "one_rate")]
    pub rate: Rate,
    /// Counting algorithm.
    pub algorithm: Option<AlgorithmName>,
    /// Name shown to clients (default `per minute` etc.).
    pub name: Option<String>,
    /// Evaluate without enforcing.
    #[serde(default, deserialize_with = "flexible_bool")]
    pub shadow: bool,
}

/// Algorithm names as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlgorithmName {
    /// Weighted two-window counter (default).
    SlidingWindow,
    /// Epoch-aligned windows.
    FixedWindow,
    /// Token bucket with capacity = count, refilled at count per window.
    TokenBucket,
}

impl<'de> Deserialize<'de> for RawLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawLimit;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rate such as \"10/minute\" or a map with `rate:`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawLimit, E> {
                rate::parse_list(v).map(RawLimit::Rates).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawLimit, A::Error> {
                RawLimitFull::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawLimit::Full)
            }
        }
        d.deserialize_any(V)
    }
}

fn one_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(de::Error::custom)
}

fn optional_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Rate>, D::Error> {
    one_rate(d).map(Some)
}

/// Accepts YAML booleans and the strings people put in `.env` files: true/false, 1/0, yes/no,
/// on/off (any case), so `enabled: ${RATE_LIMIT_ENABLED:-true}` works with `RATE_LIMIT_ENABLED=0`.
pub fn flexible_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("true or false")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
            match v {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(E::custom(format!("expected true or false, got {v}"))),
            }
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
            self.visit_u64(u64::try_from(v).unwrap_or(u64::MAX))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
            match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(E::custom(format!("expected true or false, got {v:?}"))),
            }
        }
    }
    d.deserialize_any(V)
}
