//! HTTP/2 frames (RFC 9113 section 4 and 6): the 9-byte header, and the constants the
//! connection needs. Frames are read in place from the connection's read buffer; nothing here
//! allocates.

use std::hash::Hasher;

/// What every client connection starts with (RFC 9113 3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes of a frame header.
pub const HEAD_LEN: usize = 9;

/// Frame types.
pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const PRIORITY: u8 = 0x2;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub mod flag {
    /// DATA, HEADERS.
    pub const END_STREAM: u8 = 0x1;
    /// SETTINGS, PING.
    pub const ACK: u8 = 0x1;
    /// HEADERS, CONTINUATION.
    pub const END_HEADERS: u8 = 0x4;
    /// DATA, HEADERS.
    pub const PADDED: u8 = 0x8;
    /// HEADERS.
    pub const PRIORITY: u8 = 0x20;
}

/// SETTINGS identifiers (RFC 9113 6.5.2).
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// Error codes (RFC 9113 7), for RST_STREAM and GOAWAY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reason(pub u32);

impl Reason {
    pub const NO_ERROR: Reason = Reason(0x0);
    pub const PROTOCOL_ERROR: Reason = Reason(0x1);
    pub const INTERNAL_ERROR: Reason = Reason(0x2);
    pub const FLOW_CONTROL_ERROR: Reason = Reason(0x3);
    pub const STREAM_CLOSED: Reason = Reason(0x5);
    pub const FRAME_SIZE_ERROR: Reason = Reason(0x6);
    pub const REFUSED_STREAM: Reason = Reason(0x7);
    pub const CANCEL: Reason = Reason(0x8);
    pub const COMPRESSION_ERROR: Reason = Reason(0x9);
    pub const ENHANCE_YOUR_CALM: Reason = Reason(0xb);
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            0x0 => "NO_ERROR",
            0x1 => "PROTOCOL_ERROR",
            0x2 => "INTERNAL_ERROR",
            0x3 => "FLOW_CONTROL_ERROR",
            0x4 => "SETTINGS_TIMEOUT",
            0x5 => "STREAM_CLOSED",
            0x6 => "FRAME_SIZE_ERROR",
            0x7 => "REFUSED_STREAM",
            0x8 => "CANCEL",
            0x9 => "COMPRESSION_ERROR",
            0xa => "CONNECT_ERROR",
            0xb => "ENHANCE_YOUR_CALM",
            0xc => "INADEQUATE_SECURITY",
            0xd => "HTTP_1_1_REQUIRED",
            other => return write!(f, "error code {other:#x}"),
        };
        f.write_str(name)
    }
}

/// A frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Payload length.
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    /// The stream, without the reserved bit.
    pub stream: u32,
}

impl Head {
    /// Reads a frame header from its 9 bytes.
    pub fn parse(b: &[u8; HEAD_LEN]) -> Head {
        let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = *b;
        Head {
            len: usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2),
            kind,
            flags,
            stream: u32::from_be_bytes([s0, s1, s2, s3]) & STREAM_MASK,
        }
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// A stream identifier's 31 bits.
pub const STREAM_MASK: u32 = 0x7fff_ffff;

/// Largest flow-control window (RFC 9113 6.9.1).
pub const MAX_WINDOW: i64 = 0x7fff_ffff;

/// Appends a frame header. `len` must fit in 24 bits (the callers' frames are bounded by the
/// peer's SETTINGS_MAX_FRAME_SIZE, at most 2^24 - 1).
pub fn put_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = (len as u32).to_be_bytes();
    let stream = (stream & STREAM_MASK).to_be_bytes();
    out.extend_from_slice(&[
        len[1], len[2], len[3], kind, flags, stream[0], stream[1], stream[2], stream[3],
    ]);
}

/// Writes the length of the frame whose header starts at `at`, once its payload is written.
pub fn patch_len(out: &mut [u8], at: usize, len: usize) {
    let len = (len as u32).to_be_bytes();
    if let Some(field) = out.get_mut(at..at + 3) {
        field.copy_from_slice(&len[1..4]);
    }
}

/// Appends a RST_STREAM frame.
pub fn put_reset(out: &mut Vec<u8>, stream: u32, reason: Reason) {
    put_head(out, 4, kind::RST_STREAM, 0, stream);
    out.extend_from_slice(&reason.0.to_be_bytes());
}

/// Appends a WINDOW_UPDATE frame.
pub fn put_window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    put_head(out, 4, kind::WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&(increment & STREAM_MASK).to_be_bytes());
}

/// Appends a SETTINGS frame (not an acknowledgement) carrying `settings` as (id, value).
pub fn put_settings(out: &mut Vec<u8>, settings: &[(u16, u32)]) {
    put_head(out, 6 * settings.len(), kind::SETTINGS, 0, 0);
    for (id, value) in settings {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
    }
}

/// Appends a GOAWAY frame.
pub fn put_goaway(out: &mut Vec<u8>, last_stream: u32, reason: Reason, debug: &[u8]) {
    put_head(out, 8 + debug.len(), kind::GOAWAY, 0, 0);
    out.extend_from_slice(&(last_stream & STREAM_MASK).to_be_bytes());
    out.extend_from_slice(&reason.0.to_be_bytes());
    out.extend_from_slice(debug);
}

/// What a SETTINGS frame says (RFC 9113 6.5.2), the settings either end acts on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// An acknowledgement of ours, carrying nothing.
    pub ack: bool,
    pub enable_push: Option<u32>,
    pub max_concurrent_streams: Option<u32>,
    pub initial_window_size: Option<u32>,
    pub max_frame_size: Option<u32>,
}

/// Reads a SETTINGS frame, with the checks RFC 9113 6.5 asks of every endpoint: on stream 0;
/// an ACK empty; a length that is a multiple of 6; ENABLE_PUSH 0 or 1, INITIAL_WINDOW_SIZE at
/// most 2^31-1, MAX_FRAME_SIZE from 16,384 to 2^24-1. A setting given twice takes the last
/// value. `Err`: the connection error and what was wrong.
pub fn settings(head: &Head, payload: &[u8]) -> Result<Settings, (Reason, &'static str)> {
    if head.stream != 0 {
        return Err((Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
    }
    if head.has(flag::ACK) {
        if !payload.is_empty() {
            return Err((Reason::FRAME_SIZE_ERROR, "SETTINGS ACK with a payload"));
        }
        return Ok(Settings {
            ack: true,
            ..Settings::default()
        });
    }
    if !payload.len().is_multiple_of(6) {
        return Err((
            Reason::FRAME_SIZE_ERROR,
            "SETTINGS length is not a multiple of 6",
        ));
    }
    let mut out = Settings::default();
    for entry in payload.chunks_exact(6) {
        let (id, value) = entry.split_at(2);
        let id = u16::from_be_bytes([id[0], id[1]]);
        let value = be_u32(value).unwrap_or(0);
        match id {
            setting::ENABLE_PUSH if value > 1 => {
                return Err((Reason::PROTOCOL_ERROR, "ENABLE_PUSH above 1"));
            }
            setting::ENABLE_PUSH => out.enable_push = Some(value),
            setting::MAX_CONCURRENT_STREAMS => out.max_concurrent_streams = Some(value),
            setting::INITIAL_WINDOW_SIZE if i64::from(value) > MAX_WINDOW => {
                return Err((
                    Reason::FLOW_CONTROL_ERROR,
                    "INITIAL_WINDOW_SIZE above 2^31-1",
                ));
            }
            setting::INITIAL_WINDOW_SIZE => out.initial_window_size = Some(value),
            setting::MAX_FRAME_SIZE if !(16_384..=16_777_215).contains(&value) => {
                return Err((Reason::PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range"));
            }
            setting::MAX_FRAME_SIZE => out.max_frame_size = Some(value),
            // HEADER_TABLE_SIZE: neither end's encoder uses the dynamic table. The rest is
            // advisory or unknown (ignored, RFC 9113 6.5.2).
            _ => {}
        }
    }
    Ok(out)
}

/// The new initial window of a SETTINGS_INITIAL_WINDOW_SIZE, once every open stream's window
/// still fits 2^31-1 after moving by the difference (RFC 9113 6.9.2). `windows`: each open
/// stream's window as kept by both ends here, a difference from the initial window.
pub fn moved_initial_window(
    value: u32,
    mut windows: impl Iterator<Item = i64>,
) -> Result<i64, (Reason, &'static str)> {
    let new = i64::from(value);
    if windows.any(|w| new + w > MAX_WINDOW) {
        return Err((Reason::FLOW_CONTROL_ERROR, "a stream's window above 2^31-1"));
    }
    Ok(new)
}

/// Checks a PING frame (RFC 9113 6.7): on stream 0, 8 bytes. `Err`: the connection error.
pub fn check_ping(head: &Head, payload: &[u8]) -> Result<(), (Reason, &'static str)> {
    if head.stream != 0 {
        return Err((Reason::PROTOCOL_ERROR, "PING on a stream"));
    }
    if payload.len() != 8 {
        return Err((Reason::FRAME_SIZE_ERROR, "PING length is not 8"));
    }
    Ok(())
}

/// A big-endian u32 at the start of `b`, if there are four bytes.
pub fn be_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

/// The pad length of a DATA or HEADERS frame: `None` when it is missing or not smaller than
/// the payload (a PROTOCOL_ERROR, RFC 9113 6.1).
fn unpad(head: &Head, payload: &[u8]) -> Option<usize> {
    if !head.has(flag::PADDED) {
        return Some(0);
    }
    let pad = usize::from(*payload.first()?);
    (pad < payload.len()).then_some(pad)
}

/// A DATA frame's data, without its pad length and padding. `Err`: the connection error.
pub fn data_content<'p>(
    head: &Head,
    payload: &'p [u8],
) -> Result<&'p [u8], (Reason, &'static str)> {
    let pad = unpad(head, payload)
        .ok_or((Reason::PROTOCOL_ERROR, "DATA padding longer than the frame"))?;
    let skip = usize::from(head.has(flag::PADDED));
    Ok(payload.get(skip..payload.len() - pad).unwrap_or_default())
}

/// A HEADERS frame's header block fragment, without its pad length, priority fields and
/// padding (RFC 9113 6.2). `Err`: the connection error.
pub fn header_fragment<'p>(
    head: &Head,
    payload: &'p [u8],
) -> Result<&'p [u8], (Reason, &'static str)> {
    let pad = unpad(head, payload).ok_or((
        Reason::PROTOCOL_ERROR,
        "HEADERS padding longer than the frame",
    ))?;
    let mut skip = usize::from(head.has(flag::PADDED));
    if head.has(flag::PRIORITY) {
        skip += 5;
    }
    payload
        .get(skip..payload.len() - pad)
        .ok_or((Reason::FRAME_SIZE_ERROR, "HEADERS too short for its fields"))
}

/// Stream ids are small, odd and increasing: a multiply spreads them well enough, and is
/// cheaper than SipHash for a key the client picks but cannot use to collide many streams
/// (they must increase, and a server keeps a bounded number).
#[derive(Default)]
pub struct StreamIdHasher(u64);

impl Hasher for StreamIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips() {
        let mut out = Vec::new();
        put_head(&mut out, 0x01_02_03, kind::HEADERS, 0x25, 0x8000_0007);
        let head = Head::parse(out.as_slice().try_into().unwrap());
        assert_eq!(
            head,
            Head {
                len: 0x01_02_03,
                kind: kind::HEADERS,
                flags: 0x25,
                stream: 7
            }
        );
        patch_len(&mut out, 0, 40);
        assert_eq!(Head::parse(out.as_slice().try_into().unwrap()).len, 40);
    }

    #[test]
    fn settings_are_read_and_checked() {
        let head = |flags, stream| Head {
            len: 0,
            kind: kind::SETTINGS,
            flags,
            stream,
        };
        let entries = |list: &[(u16, u32)]| {
            let mut out = Vec::new();
            for (id, value) in list {
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&value.to_be_bytes());
            }
            out
        };
        let ok = entries(&[
            (setting::INITIAL_WINDOW_SIZE, 10),
            (setting::MAX_FRAME_SIZE, 20_000),
            (setting::INITIAL_WINDOW_SIZE, 0x7fff_ffff),
            (setting::MAX_CONCURRENT_STREAMS, 7),
            (0x99, 1),
        ]);
        assert_eq!(
            settings(&head(0, 0), &ok),
            Ok(Settings {
                ack: false,
                enable_push: None,
                max_concurrent_streams: Some(7),
                initial_window_size: Some(0x7fff_ffff),
                max_frame_size: Some(20_000),
            })
        );
        assert_eq!(settings(&head(flag::ACK, 0), &[]).map(|s| s.ack), Ok(true));
        let code = |h: Head, p: &[u8]| settings(&h, p).err().map(|e| e.0);
        assert_eq!(code(head(0, 1), &ok), Some(Reason::PROTOCOL_ERROR));
        assert_eq!(
            code(head(flag::ACK, 0), &ok),
            Some(Reason::FRAME_SIZE_ERROR)
        );
        assert_eq!(code(head(0, 0), &ok[..7]), Some(Reason::FRAME_SIZE_ERROR));
        for (bad, reason) in [
            ((setting::ENABLE_PUSH, 2), Reason::PROTOCOL_ERROR),
            (
                (setting::INITIAL_WINDOW_SIZE, 0x8000_0000),
                Reason::FLOW_CONTROL_ERROR,
            ),
            ((setting::MAX_FRAME_SIZE, 16_383), Reason::PROTOCOL_ERROR),
            ((setting::MAX_FRAME_SIZE, 1 << 24), Reason::PROTOCOL_ERROR),
        ] {
            assert_eq!(code(head(0, 0), &entries(&[bad])), Some(reason), "{bad:?}");
        }
    }

    #[test]
    fn an_initial_window_moves_streams_only_within_the_maximum() {
        assert_eq!(moved_initial_window(100, [0, 50, -20].into_iter()), Ok(100));
        assert_eq!(
            moved_initial_window(0x7fff_fff0, [0, 15].into_iter()),
            Ok(0x7fff_fff0)
        );
        assert_eq!(
            moved_initial_window(0x7fff_fff0, [0, 16].into_iter()).map_err(|e| e.0),
            Err(Reason::FLOW_CONTROL_ERROR)
        );
    }

    #[test]
    fn padding_must_be_shorter_than_the_payload() {
        let padded = Head {
            len: 4,
            kind: kind::DATA,
            flags: flag::PADDED,
            stream: 1,
        };
        assert_eq!(unpad(&padded, &[2, b'a', 0, 0]), Some(2));
        assert_eq!(unpad(&padded, &[3, 0, 0, 0]), Some(3));
        assert_eq!(unpad(&padded, &[4, 0, 0, 0]), None);
        assert_eq!(unpad(&padded, &[]), None);
        let plain = Head { flags: 0, ..padded };
        assert_eq!(unpad(&plain, &[9]), Some(0));
        assert_eq!(data_content(&padded, &[2, b'a', 0, 0]), Ok(&b"a"[..]));
        assert_eq!(data_content(&plain, b"ab"), Ok(&b"ab"[..]));
        assert_eq!(
            data_content(&padded, &[4, 0, 0, 0]).map_err(|e| e.0),
            Err(Reason::PROTOCOL_ERROR)
        );
        let prioritised = Head {
            kind: kind::HEADERS,
            flags: flag::PADDED | flag::PRIORITY,
            ..padded
        };
        assert_eq!(
            header_fragment(&prioritised, &[1, 0, 0, 0, 1, 16, 0x88, 0]),
            Ok(&[0x88][..])
        );
        assert_eq!(
            header_fragment(&prioritised, &[1, 0, 0, 0]).map_err(|e| e.0),
            Err(Reason::FRAME_SIZE_ERROR)
        );
    }
}
