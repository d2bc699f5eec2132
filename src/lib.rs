//! sluice: a rate-limit decision server for Envoy.
//!
//! Envoy's rate limit filter asks `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`
//! whether a request may pass; sluice answers from limits defined in YAML.
//!
//! # Layout
//! Modules in layers; each uses only those listed before it (no import cycles):
//! - [`clock`]: the only source of time; tests drive a [`clock::ManualClock`].
//! - [`algorithms`]: sliding window, fixed window and token bucket as pure functions, used by
//!   every store; [`entries`]: finding an entry's value and comparing names.
//! - [`input`]: files read whole (config, state file), under a size bound.
//! - [`access`]: the access list (blocks, allowlist, the state file).
//! - [`store`]: the [`store::Store`] trait, its in-memory and Redis backends, and the replication
//!   of the access list through Redis. [`store::table`] is the in-memory store's hash table.
//! - [`stats`]: decision counts and latency, read by the admin API and `/metrics`.
//! - [`limiter`]: the decision: match descriptors to rules ([`limiter::model`],
//!   [`limiter::path`]), read the clock once, ask the store.
//! - [`config`]: the YAML front end: raw serde structs, `${VAR}` expansion, validation with
//!   file/line/field errors, compiled into the [`limiter::model`] rules; [`reload`] swaps them.
//! - [`tls`]: the gRPC listeners' certificates, re-read when their files change;
//!   [`connections`]: what a gRPC listener accepts: the connection cap, TLS, handshake and idle
//!   timeouts, the spread of connections over decision threads.
//! - [`proto`]: generated protobuf code; [`service`]: Envoy proto <-> domain types, request
//!   validation, gRPC status mapping, the codec; [`admin`]: the admin service.
//! - [`metrics`] and [`http`]: Prometheus text and the plain-HTTP listener.
//! - [`server`]: wiring of the tonic servers (rate limit, admin, health, reflection),
//!   background tasks and graceful shutdown. The caller binds the listeners and owns shutdown.
//! - [`app`]: the binary's wiring, in the order `sluice serve` builds things (store, limiter,
//!   replication of blocks, listeners, reload, shutdown), so that `main.rs` stays a thin CLI.
//! - `fuzzing` (hidden): the fuzz targets' entry functions, shared by `fuzz/` and the property
//!   tests of `tests/hostile_input.rs`.

pub mod access;
pub mod admin;
pub mod algorithms;
pub mod app;
pub mod clock;
pub mod config;
pub mod connections;
pub mod entries;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod input;
pub mod limiter;
pub mod metrics;
pub mod proto;
pub mod quota;
pub mod reload;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod stats;
pub mod store;
pub mod tls;
