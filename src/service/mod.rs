//! gRPC services: translation between protos and the limiter's types, request validation, and
//! the one place where errors become gRPC statuses:
//! - malformed request -> `INVALID_ARGUMENT`, the message naming the field;
//! - counter store failure -> `UNAVAILABLE` (Envoy then applies its `failure_mode_deny`).
//!
//! An over-limit answer is a decision, not an error: it is an OK gRPC reply with `OVER_LIMIT`.

pub mod rls;
