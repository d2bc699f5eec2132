//! gRPC services: translation between protos and the limiter's types, request validation, and
//! the one place where errors become gRPC statuses:
//! - malformed request -> `INVALID_ARGUMENT`, the message naming the field: fields that break
//!   a rule ([`rls`]), and protobuf prost cannot decode ([`codec`], where tonic's own codec
//!   would say `INTERNAL`);
//! - admin call without the right token -> `UNAUTHENTICATED`;
//! - counter store failure -> never a gRPC error: the limiter answers by its failure policy
//!   (allow, or OVER_LIMIT with a 503-style body), within the store's deadline.
//!
//! gRPC framing is tonic's, with its statuses: a message over the size bound `OUT_OF_RANGE`, a
//! compressed message (sluice accepts none) `UNIMPLEMENTED`, a broken 5-byte prefix or a
//! missing message `INTERNAL` (as the gRPC specification asks). No error message is longer than
//! [`bounded::MAX_MESSAGE_BYTES`].
//!
//! An over-limit answer is a decision, not an error: it is an OK gRPC reply with `OVER_LIMIT`.

pub mod bounded;
pub mod codec;
pub mod json;
pub mod rlqs;
pub mod rls;
