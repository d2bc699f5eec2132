//! The decision listener's own HTTP/2, specialised for unary gRPC.

pub mod hpack;
