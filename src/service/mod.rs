//! gRPC services: translation between protos and the limiter's types, request validation, and
//! the one place where errors become gRPC statuses:
//! - malformed request -> `INVALID_ARGUMENT`, the message naming the field (also for protobuf
//!   bytes `wire::decode_request` cannot read, where tonic's prost codec would say `INTERNAL`);
//! - admin call without the right token -> `UNAUTHENTICATED`;
//! - counter store failure -> never a gRPC error: the limiter answers by its failure policy
//!   (allow, or OVER_LIMIT with a 503-style body), within the store's deadline.
//!
//! An over-limit answer is a decision, not an error: it is an OK gRPC reply with `OVER_LIMIT`.

pub mod connection;
pub mod endpoint;
pub mod http2;
pub mod rls;
pub mod wire;
