//! sluice: a rate-limit decision server for Envoy.
//!
//! Envoy's rate limit filter asks `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`
//! whether a request may pass; sluice answers from limits defined in YAML.
//!
//! # Layout
//! - [`clock`]: the only source of time; tests drive a [`clock::ManualClock`].
//! - [`config`]: the YAML front end: raw serde structs, `${VAR}` expansion, validation with
//!   file/line/field errors, compiled into the [`limiter::model`] rules.
//! - [`limiter`]: the decision: match descriptors to rules, read the clock once, ask the store.
//!   [`limiter::algorithms`] holds sliding window, fixed window and token bucket as pure functions.
//! - [`store`]: the [`store::Store`] trait, its in-memory and Redis backends, and the replication
//!   of blocks through Redis. [`store::table`] is the in-memory store's hash table.
//! - [`service`]: Envoy proto <-> domain types, request validation, gRPC status mapping.
//! - [`server`]: wiring of gRPC services (rate limit, health, reflection), background tasks and
//!   graceful shutdown. The caller binds the listeners and owns shutdown.
//! - [`proto`]: generated protobuf code.
//! - [`app`]: the binary's wiring, in the order `sluice serve` builds things (store, limiter,
//!   replication of blocks, listeners, reload, shutdown), so that `main.rs` stays a thin CLI.

pub mod admin;
pub mod app;
pub mod blocklist;
pub mod clock;
pub mod config;
pub mod http;
pub mod limiter;
pub mod metrics;
pub mod proto;
pub mod reload;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod stats;
pub mod store;
