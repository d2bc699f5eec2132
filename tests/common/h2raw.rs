//! A frame-level HTTP/2 client for tests that must misbehave in ways no client library allows:
//! frames written as bytes on a socket (RFC 9113), header blocks written as HPACK literals
//! without Huffman coding (RFC 7541), and a reader of the frames that come back. Test tooling
//! only; the server's HTTP/2 is hyper's.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types.
pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
}

/// The ShouldRateLimit method's path.
pub const RLS_PATH: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// Appends one frame.
pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// The preface and an empty SETTINGS frame: what a client sends first.
pub fn hello() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    frame(&mut out, kind::SETTINGS, 0, 0, &[]);
    out
}

/// An HPACK integer with an `n`-bit prefix, the prefix's other bits set to `high`.
pub fn hpack_int(out: &mut Vec<u8>, n: u32, high: u8, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(high | value as u8);
        return;
    }
    out.push(high | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 7, 0, s.len());
    out.extend_from_slice(s);
}

/// A header field as a literal not added to the table, its name a new literal too.
pub fn literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_string(out, name.as_bytes());
    hpack_string(out, value);
}

/// A header field as a literal the server adds to its dynamic table (index 62 when it is the
/// first entry there).
pub fn literal_indexed(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x40);
    hpack_string(out, name.as_bytes());
    hpack_string(out, value);
}

/// A header field from the table, by its index.
pub fn indexed(out: &mut Vec<u8>, index: usize) {
    hpack_int(out, 7, 0x80, index);
}

/// The header block of a gRPC call to `path`: `:method POST` and `:scheme http` from the
/// static table, the rest as literals.
pub fn grpc_headers(path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    indexed(&mut out, 3); // :method POST
    indexed(&mut out, 6); // :scheme http
    literal(&mut out, ":path", path.as_bytes());
    literal(&mut out, ":authority", b"sluice");
    literal(&mut out, "content-type", b"application/grpc");
    literal(&mut out, "te", b"trailers");
    out
}

/// `message` with the 5-byte gRPC prefix (uncompressed).
pub fn grpc_message(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// A whole unary call on `stream`: HEADERS (`block`), then DATA with `body` ending the stream.
pub fn call(out: &mut Vec<u8>, stream: u32, block: &[u8], body: &[u8]) {
    frame(out, kind::HEADERS, flag::END_HEADERS, stream, block);
    frame(out, kind::DATA, flag::END_STREAM, stream, body);
}

/// A frame read back.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// Reads the next frame; `None` when the connection ended (or failed) first, or nothing came
/// within `wait`.
pub async fn read_frame(tcp: &mut TcpStream, wait: Duration) -> Option<Frame> {
    tokio::time::timeout(wait, async {
        let mut head = [0u8; 9];
        tcp.read_exact(&mut head).await.ok()?;
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        })
    })
    .await
    .ok()
    .flatten()
}

/// Reads frames until the connection ends: the GOAWAY error code if one came, and whether the
/// connection ended within `wait`.
pub async fn read_until_closed(tcp: &mut TcpStream, wait: Duration) -> (Option<u32>, bool) {
    let deadline = tokio::time::Instant::now() + wait;
    let mut goaway = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Err(_) => return (goaway, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (goaway, true),
            Ok(Ok(n)) => {
                pending.extend_from_slice(&buf[..n]);
                // Pick GOAWAY frames out of what arrived, frame by frame.
                let mut at = 0;
                while pending.len() >= at + 9 {
                    let h = &pending[at..at + 9];
                    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    if pending.len() < at + 9 + len {
                        break;
                    }
                    if h[3] == kind::GOAWAY && len >= 8 {
                        let p = &pending[at + 9..at + 9 + len];
                        goaway = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
                    }
                    at += 9 + len;
                }
                pending.drain(..at);
            }
        }
    }
}

/// Connects and sends the client's preface and SETTINGS.
pub async fn open(addr: std::net::SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(&hello()).await.unwrap();
    tcp
}
