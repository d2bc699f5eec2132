//! The decision listener's own HTTP/2, specialised for unary gRPC.

pub mod conn;
pub mod frame;
pub mod hpack;
mod huffman;
