//! HPACK (RFC 7541) for the decision listener's own HTTP/2: a decoder for request header blocks
//! and an encoder for responses.
//!
//! Why our own: every request's header block goes through here, at hundreds of thousands of
//! requests a second, and the general-purpose decoders allocate per field (owned names and
//! values, a `Vec` per dynamic-table entry). This one hands the caller borrowed slices: static
//! table fields as `&'static` slices, dynamic ones straight out of the table, literals straight
//! out of the block, Huffman-coded strings out of one scratch buffer the decoder keeps. In
//! steady state (fields from the tables, literals without indexing) decoding does not allocate.
//!
//! The dynamic table keeps every entry's bytes in one arena `Vec<u8>`, appended in insertion
//! order, with a `VecDeque` of (offset, name length, value length), newest first. Eviction only
//! pops descriptors; the bytes of evicted entries stay until the arena would outgrow twice the
//! table's maximum size, when the live bytes (at most the maximum) are moved to the front. So
//! insertions do not allocate once the arena has reached its size (it is reserved up front for
//! the usual 4,096-byte table), copying is amortised O(1) per byte, and every entry stays
//! contiguous, which a ring buffer would not guarantee.
//!
//! Responses are small and fixed (`:status`, `content-type`, `grpc-status`...), so the encoder
//! is only `encode_literal`: no table state to keep in step with the client's decoder, no
//! Huffman coding to spend time on.

use std::collections::VecDeque;

use super::huffman;

/// Why a header block could not be decoded: a connection error of type COMPRESSION_ERROR.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HpackError {
    /// The block ends in the middle of a field representation.
    #[error("header block ends in the middle of a field representation")]
    Truncated,
    /// A string literal's length runs past the end of the block.
    #[error("string literal of {0} bytes runs past the end of the header block")]
    StringPastEnd(u32),
    /// An integer does not fit in 32 bits, or has more than five continuation bytes.
    #[error("HPACK integer does not fit in 32 bits")]
    IntegerOverflow,
    /// Index 0 is not an entry of either table.
    #[error("header table index 0 is not valid")]
    ZeroIndex,
    /// An index beyond the static and dynamic tables.
    #[error("header table index {0} is beyond the static and dynamic tables")]
    IndexOutOfRange(u32),
    /// A dynamic table size update above our SETTINGS_HEADER_TABLE_SIZE.
    #[error("dynamic table size update to {requested} exceeds the maximum of {max}")]
    TableSizeTooLarge {
        /// The size the update asked for.
        requested: u32,
        /// The size given to [`Decoder::new`].
        max: usize,
    },
    /// A dynamic table size update after the first field of the block (RFC 7541 4.2).
    #[error("dynamic table size update after a header field")]
    LateTableSizeUpdate,
    /// A Huffman-coded string contains the EOS symbol.
    #[error("Huffman-coded string contains the EOS symbol")]
    HuffmanEos,
    /// A Huffman-coded string's padding is longer than seven bits or not all ones.
    #[error("Huffman-coded string has padding longer than 7 bits or not all ones")]
    HuffmanPadding,
    /// The decoder's own table is inconsistent; a bug, never caused by the peer alone.
    #[error("HPACK dynamic table is inconsistent (bug)")]
    Internal,
}

/// The static table, RFC 7541 Appendix A; index `i` is `STATIC_TABLE[i - 1]`.
static STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// Index of the first dynamic table entry.
const FIRST_DYNAMIC: u32 = STATIC_TABLE.len() as u32 + 1;

/// Per-entry overhead in the table size (RFC 7541 4.1).
const ENTRY_OVERHEAD: usize = 32;

/// The arena is reserved up front only up to this; larger tables grow it on demand.
const MAX_RESERVED_ARENA: usize = 64 * 1024;

/// Most continuation bytes of an integer: five carry 35 bits, enough for any `u32`.
const MAX_INTEGER_CONTINUATIONS: u32 = 5;

/// A dynamic table entry: its name then its value, contiguous in the arena from `start`.
#[derive(Debug, Clone, Copy)]
struct Entry {
    start: usize,
    name_len: usize,
    value_len: usize,
}

impl Entry {
    /// The entry's size as RFC 7541 4.1 counts it.
    fn size(&self) -> usize {
        self.name_len
            .saturating_add(self.value_len)
            .saturating_add(ENTRY_OVERHEAD)
    }
}

/// Where a decoded name or value lives: in the block or the static table (borrowed for the
/// block's lifetime), or at `(offset, len)` in the decoder's scratch buffer or arena.
#[derive(Debug, Clone, Copy)]
enum Src<'b> {
    Slice(&'b [u8]),
    Scratch(usize, usize),
    Arena(usize, usize),
}

impl Src<'_> {
    fn len(&self) -> usize {
        match *self {
            Src::Slice(s) => s.len(),
            Src::Scratch(_, len) | Src::Arena(_, len) => len,
        }
    }
}

/// Resolves `src` to its bytes.
fn resolve<'a>(src: Src<'a>, scratch: &'a [u8], arena: &'a [u8]) -> Result<&'a [u8], HpackError> {
    let (buf, start, len) = match src {
        Src::Slice(s) => return Ok(s),
        Src::Scratch(start, len) => (scratch, start, len),
        Src::Arena(start, len) => (arena, start, len),
    };
    start
        .checked_add(len)
        .and_then(|end| buf.get(start..end))
        .ok_or(HpackError::Internal)
}

/// Reads a header block front to back.
struct Cursor<'b> {
    block: &'b [u8],
    pos: usize,
}

impl<'b> Cursor<'b> {
    fn byte(&mut self) -> Result<u8, HpackError> {
        let b = *self.block.get(self.pos).ok_or(HpackError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    /// Reads an integer with a `prefix_bits`-bit prefix (RFC 7541 5.1), 1 to 8 bits.
    fn integer(&mut self, prefix_bits: u32) -> Result<u32, HpackError> {
        let max_prefix = u8::MAX >> (8 - prefix_bits.clamp(1, 8));
        let first = self.byte()? & max_prefix;
        if first < max_prefix {
            return Ok(u32::from(first));
        }
        let mut value = u64::from(first);
        let mut shift = 0;
        for _ in 0..MAX_INTEGER_CONTINUATIONS {
            let b = self.byte()?;
            value += u64::from(b & 0x7f) << shift;
            let fits = u32::try_from(value).map_err(|_| HpackError::IntegerOverflow)?;
            if b & 0x80 == 0 {
                return Ok(fits);
            }
            shift += 7;
        }
        Err(HpackError::IntegerOverflow)
    }

    /// Reads a string literal (RFC 7541 5.2); Huffman-coded ones are decoded onto the end of
    /// `scratch`, or copied there from `memo` when the same code was decoded lately.
    fn string(
        &mut self,
        scratch: &mut Vec<u8>,
        memo: &mut HuffmanMemo,
    ) -> Result<Src<'b>, HpackError> {
        let huffman = self.block.get(self.pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
        let len = self.integer(7)?;
        let bytes = usize::try_from(len)
            .ok()
            .and_then(|len| self.pos.checked_add(len))
            .and_then(|end| self.block.get(self.pos..end))
            .ok_or(HpackError::StringPastEnd(len))?;
        self.pos += bytes.len();
        if !huffman {
            return Ok(Src::Slice(bytes));
        }
        let start = scratch.len();
        if let Some(decoded) = memo.get(bytes) {
            scratch.extend_from_slice(decoded);
        } else {
            huffman::decode(bytes, scratch)?;
            memo.put(bytes, scratch.get(start..).unwrap_or_default());
        }
        Ok(Src::Scratch(start, scratch.len() - start))
    }
}

/// The last few Huffman-coded strings decoded, and what they decoded to.
///
/// Why: clients do not index every field. nghttp2 (h2load, and Envoy's default codec) never
/// indexes `:path`, so every call's path arrives as the same Huffman-coded literal, and decoding
/// it, four bits a step, was a quarter of the server's CPU per call under h2load (perf). The
/// same code always decodes to the same string, so a hit is a compare and a copy.
#[derive(Debug)]
struct HuffmanMemo {
    /// (code, decoded) pairs; an empty code is an empty slot.
    slots: [(Vec<u8>, Vec<u8>); MEMO_SLOTS],
    /// The slot the next miss replaces.
    next: usize,
}

/// Strings remembered: a path, an authority, a user agent and one more.
const MEMO_SLOTS: usize = 4;
/// Longest code remembered: a request path and the like, not whole cookies. The slots are
/// allocated at this size up front, so remembering never allocates.
const MEMO_MAX_CODE: usize = 128;

impl HuffmanMemo {
    fn new() -> Self {
        Self {
            // A code of n bytes decodes to at most 8n / 5 bytes (codes are 5 bits or more).
            slots: std::array::from_fn(|_| {
                (
                    Vec::with_capacity(MEMO_MAX_CODE),
                    Vec::with_capacity(MEMO_MAX_CODE * 8 / 5 + 1),
                )
            }),
            next: 0,
        }
    }

    fn get(&self, code: &[u8]) -> Option<&[u8]> {
        self.slots
            .iter()
            .find(|(c, _)| !c.is_empty() && c.as_slice() == code)
            .map(|(_, decoded)| decoded.as_slice())
    }

    fn put(&mut self, code: &[u8], decoded: &[u8]) {
        if code.is_empty() || code.len() > MEMO_MAX_CODE {
            return;
        }
        if let Some((c, d)) = self.slots.get_mut(self.next) {
            c.clear();
            c.extend_from_slice(code);
            d.clear();
            d.extend_from_slice(decoded);
        }
        self.next = (self.next + 1) % MEMO_SLOTS;
    }
}

/// Decodes request header blocks, keeping the dynamic table between them.
#[derive(Debug)]
pub struct Decoder {
    /// SETTINGS_HEADER_TABLE_SIZE: the most a size update may ask for.
    max_allowed: usize,
    /// The table's current maximum size, from the last size update.
    max_size: usize,
    /// The table's current size (RFC 7541 4.1).
    size: usize,
    /// The entries, newest (index 62) first.
    entries: VecDeque<Entry>,
    /// The entries' bytes, in insertion order; bytes before the oldest entry are dead.
    arena: Vec<u8>,
    /// The arena is compacted rather than grown past this: twice `max_allowed`, so that the
    /// live bytes plus any entry that fits the table always fit after compaction.
    arena_limit: usize,
    /// Huffman-decoded names and values of the field being decoded.
    scratch: Vec<u8>,
    memo: HuffmanMemo,
}

impl Decoder {
    /// A decoder whose dynamic table may grow to `max_table_size` bytes (our
    /// SETTINGS_HEADER_TABLE_SIZE; 4,096 by default).
    pub fn new(max_table_size: usize) -> Self {
        let arena_limit = max_table_size.saturating_mul(2);
        Self {
            max_allowed: max_table_size,
            max_size: max_table_size,
            size: 0,
            entries: VecDeque::with_capacity(
                (max_table_size / ENTRY_OVERHEAD).min(MAX_RESERVED_ARENA / ENTRY_OVERHEAD),
            ),
            arena: Vec::with_capacity(arena_limit.min(MAX_RESERVED_ARENA)),
            arena_limit,
            scratch: Vec::with_capacity(256),
            memo: HuffmanMemo::new(),
        }
    }

    /// The dynamic table's size in bytes (RFC 7541 4.1): 0 when the peer has indexed nothing.
    pub fn table_size(&self) -> usize {
        self.size
    }

    /// Decodes one whole header block (HEADERS and CONTINUATION fragments already joined),
    /// calling `field(name, value)` for each field in order. The slices are only valid during
    /// the call.
    ///
    /// On error the block is not fully applied and the dynamic table may be out of step with
    /// the peer's: the connection must be closed with COMPRESSION_ERROR.
    pub fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let mut cur = Cursor { block, pos: 0 };
        let mut seen_field = false;
        while let Some(&first) = block.get(cur.pos) {
            if first & 0x80 != 0 {
                // Indexed field (6.1).
                let index = cur.integer(7)?;
                if let Some(&(name, value)) = static_entry(index) {
                    field(name, value);
                } else {
                    let entry = self.dynamic_entry(index)?;
                    let name = Src::Arena(entry.start, entry.name_len);
                    let value =
                        Src::Arena(entry.start.saturating_add(entry.name_len), entry.value_len);
                    field(
                        resolve(name, &[], &self.arena)?,
                        resolve(value, &[], &self.arena)?,
                    );
                }
            } else if first & 0x40 != 0 {
                // Literal with incremental indexing (6.2.1).
                self.literal(&mut cur, 6, true, &mut field)?;
            } else if first & 0x20 != 0 {
                // Dynamic table size update (6.3).
                if seen_field {
                    return Err(HpackError::LateTableSizeUpdate);
                }
                let requested = cur.integer(5)?;
                let size = usize::try_from(requested)
                    .ok()
                    .filter(|&size| size <= self.max_allowed)
                    .ok_or(HpackError::TableSizeTooLarge {
                        requested,
                        max: self.max_allowed,
                    })?;
                self.max_size = size;
                self.evict_to(size);
                continue;
            } else {
                // Literal without indexing (6.2.2) or never indexed (6.2.3): the same to a
                // server that does not forward the field.
                self.literal(&mut cur, 4, false, &mut field)?;
            }
            seen_field = true;
        }
        Ok(())
    }

    /// Decodes a literal field whose index has a `prefix_bits`-bit prefix, passes it to
    /// `field`, and adds it to the dynamic table if `index`.
    fn literal(
        &mut self,
        cur: &mut Cursor<'_>,
        prefix_bits: u32,
        index: bool,
        field: &mut impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        self.scratch.clear();
        let name_index = cur.integer(prefix_bits)?;
        let name = if name_index == 0 {
            cur.string(&mut self.scratch, &mut self.memo)?
        } else if let Some(&(name, _)) = static_entry(name_index) {
            Src::Slice(name)
        } else {
            let entry = self.dynamic_entry(name_index)?;
            Src::Arena(entry.start, entry.name_len)
        };
        let value = cur.string(&mut self.scratch, &mut self.memo)?;
        field(
            resolve(name, &self.scratch, &self.arena)?,
            resolve(value, &self.scratch, &self.arena)?,
        );
        if index {
            self.insert(name, value)?;
        }
        Ok(())
    }

    /// The dynamic table entry at HPACK index `index` (62 or more), or why there is none.
    fn dynamic_entry(&self, index: u32) -> Result<Entry, HpackError> {
        if index == 0 {
            return Err(HpackError::ZeroIndex);
        }
        index
            .checked_sub(FIRST_DYNAMIC)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.entries.get(i))
            .copied()
            .ok_or(HpackError::IndexOutOfRange(index))
    }

    /// Adds `name: value` to the dynamic table, evicting old entries as needed (RFC 7541 4.4).
    fn insert(&mut self, name: Src<'_>, value: Src<'_>) -> Result<(), HpackError> {
        let name_len = name.len();
        let value_len = value.len();
        let entry_size = name_len
            .saturating_add(value_len)
            .saturating_add(ENTRY_OVERHEAD);
        if entry_size > self.max_size {
            // Not an error: the table is just emptied.
            self.evict_to(0);
            return Ok(());
        }

        // Append the new bytes before evicting anything: the name may be an entry's that is
        // about to be evicted.
        let mut name = name;
        if self.arena.len().saturating_add(name_len + value_len) > self.arena_limit {
            let shift = self.compact();
            if let Src::Arena(start, len) = name {
                name = Src::Arena(start.checked_sub(shift).ok_or(HpackError::Internal)?, len);
            }
        }
        let start = self.arena.len();
        for src in [name, value] {
            match src {
                Src::Slice(s) => self.arena.extend_from_slice(s),
                Src::Scratch(..) => {
                    let s = resolve(src, &self.scratch, &[])?;
                    self.arena.extend_from_slice(s);
                }
                Src::Arena(from, len) => {
                    let end = from.checked_add(len).ok_or(HpackError::Internal)?;
                    if end > self.arena.len() {
                        return Err(HpackError::Internal);
                    }
                    self.arena.extend_from_within(from..end);
                }
            }
        }

        self.evict_to(self.max_size - entry_size);
        self.entries.push_front(Entry {
            start,
            name_len,
            value_len,
        });
        self.size += entry_size;
        Ok(())
    }

    /// Evicts the oldest entries until the table's size is at most `target`.
    fn evict_to(&mut self, target: usize) {
        while self.size > target {
            match self.entries.pop_back() {
                Some(entry) => self.size = self.size.saturating_sub(entry.size()),
                None => self.size = 0,
            }
        }
    }

    /// Moves the live bytes of the arena to its front; returns by how much they moved.
    fn compact(&mut self) -> usize {
        let head = self
            .entries
            .back()
            .map_or(self.arena.len(), |oldest| oldest.start);
        self.arena.drain(..head.min(self.arena.len()));
        for entry in &mut self.entries {
            entry.start = entry.start.saturating_sub(head);
        }
        head
    }
}

/// The static table entry at HPACK index `index`, if it is one (1 to 61).
fn static_entry(index: u32) -> Option<&'static (&'static [u8], &'static [u8])> {
    STATIC_TABLE.get(usize::try_from(index.checked_sub(1)?).ok()?)
}

/// Appends `name: value` to `out` as a literal field without indexing, with a new name (RFC 7541
/// 6.2.2; names must be lowercase), strings not Huffman-coded.
pub fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    for s in [name, value] {
        encode_integer(s.len(), 7, 0x00, out);
        out.extend_from_slice(s);
    }
}

/// Appends `value` as an integer with a `prefix_bits`-bit prefix (RFC 7541 5.1) whose first
/// byte has the bits above the prefix from `flags`.
fn encode_integer(value: usize, prefix_bits: u32, flags: u8, out: &mut Vec<u8>) {
    let max_prefix = u8::MAX >> (8 - prefix_bits.clamp(1, 8));
    match u8::try_from(value) {
        Ok(small) if small < max_prefix => out.push(flags | small),
        _ => {
            out.push(flags | max_prefix);
            let mut rest = value - usize::from(max_prefix);
            while rest >= 0x80 {
                out.push(0x80 | (rest & 0x7f) as u8);
                rest >>= 7;
            }
            out.push(rest as u8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    /// Bytes from the RFC's hex dumps ("8286 8441 ...").
    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    fn decode(decoder: &mut Decoder, block: &[u8]) -> Result<Fields, HpackError> {
        let mut fields = Vec::new();
        decoder.decode(block, |name, value| {
            fields.push((name.to_vec(), value.to_vec()))
        })?;
        Ok(fields)
    }

    fn fields(list: &[(&str, &str)]) -> Fields {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    /// The dynamic table, newest first.
    fn table(decoder: &Decoder) -> Fields {
        decoder
            .entries
            .iter()
            .map(|e| {
                let name = &decoder.arena[e.start..e.start + e.name_len];
                let value = &decoder.arena[e.start + e.name_len..][..e.value_len];
                (name.to_vec(), value.to_vec())
            })
            .collect()
    }

    /// Checks the table against `expected` and its size as RFC 7541 4.1 counts it.
    fn assert_table(decoder: &Decoder, expected: &[(&str, &str)], size: usize) {
        assert_eq!(table(decoder), fields(expected));
        assert_eq!(decoder.size, size);
        let counted: usize = decoder.entries.iter().map(Entry::size).sum();
        assert_eq!(counted, size);
    }

    fn integer(bytes: &[u8], prefix_bits: u32) -> Result<u32, HpackError> {
        let mut cur = Cursor {
            block: bytes,
            pos: 0,
        };
        let value = cur.integer(prefix_bits)?;
        assert_eq!(cur.pos, bytes.len(), "integer did not consume its bytes");
        Ok(value)
    }

    fn encoded_integer(value: usize, prefix_bits: u32, flags: u8) -> Vec<u8> {
        let mut out = Vec::new();
        encode_integer(value, prefix_bits, flags, &mut out);
        out
    }

    #[test]
    fn static_table() {
        assert_eq!(static_entry(0), None);
        assert_eq!(static_entry(1), Some(&(&b":authority"[..], &b""[..])));
        assert_eq!(static_entry(2), Some(&(&b":method"[..], &b"GET"[..])));
        assert_eq!(static_entry(8), Some(&(&b":status"[..], &b"200"[..])));
        assert_eq!(
            static_entry(16),
            Some(&(&b"accept-encoding"[..], &b"gzip, deflate"[..]))
        );
        assert_eq!(static_entry(31), Some(&(&b"content-type"[..], &b""[..])));
        assert_eq!(
            static_entry(61),
            Some(&(&b"www-authenticate"[..], &b""[..]))
        );
        assert_eq!(static_entry(62), None);
        assert_eq!(FIRST_DYNAMIC, 62);
    }

    #[test]
    fn integers_rfc_c1() {
        // C.1.1: 10 with a 5-bit prefix.
        assert_eq!(integer(&[0b0000_1010], 5), Ok(10));
        assert_eq!(encoded_integer(10, 5, 0), [0b0000_1010]);
        // C.1.2: 1337 with a 5-bit prefix.
        assert_eq!(
            integer(&[0b0001_1111, 0b1001_1010, 0b0000_1010], 5),
            Ok(1337)
        );
        assert_eq!(encoded_integer(1337, 5, 0), [31, 154, 10]);
        // C.1.3: 42 starting at an octet boundary.
        assert_eq!(integer(&[0b0010_1010], 8), Ok(42));
        // Bits above the prefix are not part of the value.
        assert_eq!(integer(&[0xea], 5), Ok(10));
        assert_eq!(integer(&[0x1f, 0x00], 5), Ok(31));
    }

    #[test]
    fn integer_limits() {
        for prefix in 4..=7 {
            for value in [
                0,
                1,
                14,
                15,
                30,
                31,
                126,
                127,
                128,
                1 << 14,
                u32::MAX as usize,
            ] {
                let bytes = encoded_integer(value, prefix, 0);
                assert_eq!(
                    integer(&bytes, prefix),
                    Ok(value as u32),
                    "{value} {prefix}"
                );
            }
            let too_big = encoded_integer(u32::MAX as usize + 1, prefix, 0);
            assert_eq!(integer(&too_big, prefix), Err(HpackError::IntegerOverflow));
        }
        // Five continuation bytes are fine (zero-padded), six are not.
        assert_eq!(integer(&[0x7f, 0x81, 0x80, 0x80, 0x80, 0x00], 7), Ok(128));
        assert_eq!(
            integer(&[0x7f, 0x81, 0x80, 0x80, 0x80, 0x80, 0x00], 7),
            Err(HpackError::IntegerOverflow)
        );
        assert_eq!(
            integer(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0x0f], 7),
            Err(HpackError::IntegerOverflow)
        );
        assert_eq!(integer(&[0x7f, 0xff], 7), Err(HpackError::Truncated));
        assert_eq!(integer(&[], 7), Err(HpackError::Truncated));
    }

    #[test]
    fn rfc_c2_1_literal_with_indexing() {
        let mut d = Decoder::new(4096);
        let block = hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572");
        assert_eq!(
            decode(&mut d, &block),
            Ok(fields(&[("custom-key", "custom-header")]))
        );
        assert_table(&d, &[("custom-key", "custom-header")], 55);
    }

    #[test]
    fn rfc_c2_2_literal_without_indexing() {
        let mut d = Decoder::new(4096);
        let block = hex("040c 2f73 616d 706c 652f 7061 7468");
        assert_eq!(
            decode(&mut d, &block),
            Ok(fields(&[(":path", "/sample/path")]))
        );
        assert_table(&d, &[], 0);
    }

    #[test]
    fn rfc_c2_3_literal_never_indexed() {
        let mut d = Decoder::new(4096);
        let block = hex("1008 7061 7373 776f 7264 0673 6563 7265 74");
        assert_eq!(
            decode(&mut d, &block),
            Ok(fields(&[("password", "secret")]))
        );
        assert_table(&d, &[], 0);
    }

    #[test]
    fn rfc_c2_4_indexed() {
        let mut d = Decoder::new(4096);
        assert_eq!(
            decode(&mut d, &hex("82")),
            Ok(fields(&[(":method", "GET")]))
        );
        assert_table(&d, &[], 0);
    }

    /// C.3 and C.4: the same three requests, without and with Huffman coding.
    fn requests(blocks: [&str; 3]) {
        let mut d = Decoder::new(4096);
        assert_eq!(
            decode(&mut d, &hex(blocks[0])),
            Ok(fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ]))
        );
        assert_table(&d, &[(":authority", "www.example.com")], 57);

        assert_eq!(
            decode(&mut d, &hex(blocks[1])),
            Ok(fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ]))
        );
        assert_table(
            &d,
            &[
                ("cache-control", "no-cache"),
                (":authority", "www.example.com"),
            ],
            110,
        );

        assert_eq!(
            decode(&mut d, &hex(blocks[2])),
            Ok(fields(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ]))
        );
        assert_table(
            &d,
            &[
                ("custom-key", "custom-value"),
                ("cache-control", "no-cache"),
                (":authority", "www.example.com"),
            ],
            164,
        );
    }

    #[test]
    fn rfc_c3_requests_without_huffman() {
        requests([
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "8286 84be 5808 6e6f 2d63 6163 6865",
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        ]);
    }

    #[test]
    fn rfc_c4_requests_with_huffman() {
        requests([
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ]);
    }

    /// C.5 and C.6: the same three responses, without and with Huffman coding, through a
    /// 256-byte table that has to evict.
    fn responses(blocks: [&str; 3]) {
        let mut d = Decoder::new(256);
        let date = "Mon, 21 Oct 2013 20:13:21 GMT";
        let location = "https://www.example.com";
        assert_eq!(
            decode(&mut d, &hex(blocks[0])),
            Ok(fields(&[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", date),
                ("location", location),
            ]))
        );
        assert_table(
            &d,
            &[
                ("location", location),
                ("date", date),
                ("cache-control", "private"),
                (":status", "302"),
            ],
            222,
        );

        assert_eq!(
            decode(&mut d, &hex(blocks[1])),
            Ok(fields(&[
                (":status", "307"),
                ("cache-control", "private"),
                ("date", date),
                ("location", location),
            ]))
        );
        assert_table(
            &d,
            &[
                (":status", "307"),
                ("location", location),
                ("date", date),
                ("cache-control", "private"),
            ],
            222,
        );

        let date = "Mon, 21 Oct 2013 20:13:22 GMT";
        let cookie = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";
        assert_eq!(
            decode(&mut d, &hex(blocks[2])),
            Ok(fields(&[
                (":status", "200"),
                ("cache-control", "private"),
                ("date", date),
                ("location", location),
                ("content-encoding", "gzip"),
                ("set-cookie", cookie),
            ]))
        );
        assert_table(
            &d,
            &[
                ("set-cookie", cookie),
                ("content-encoding", "gzip"),
                ("date", date),
            ],
            215,
        );
    }

    #[test]
    fn rfc_c5_responses_without_huffman() {
        responses([
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
             2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
             6c65 2e63 6f6d",
            "4803 3330 37c1 c0bf",
            "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d
             54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049
             5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e
             3d31",
        ]);
    }

    #[test]
    fn rfc_c6_responses_with_huffman() {
        responses([
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6
             2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            "4883 640e ffc1 c0bf",
            "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab
             77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
             9587 3160 65c0 03ed 4ee5 b106 3d50 07",
        ]);
    }

    #[test]
    fn static_fields_are_not_copied() {
        let mut d = Decoder::new(4096);
        let mut pointers = Vec::new();
        d.decode(&[0x82, 0x88], |name, value| {
            pointers.push((name.as_ptr(), value.as_ptr()));
        })
        .unwrap();
        assert_eq!(
            pointers,
            [
                (STATIC_TABLE[1].0.as_ptr(), STATIC_TABLE[1].1.as_ptr()),
                (STATIC_TABLE[7].0.as_ptr(), STATIC_TABLE[7].1.as_ptr()),
            ]
        );
    }

    #[test]
    fn index_zero_is_an_error() {
        let mut d = Decoder::new(4096);
        assert_eq!(decode(&mut d, &[0x80]), Err(HpackError::ZeroIndex));
    }

    #[test]
    fn index_out_of_range_is_an_error() {
        let mut d = Decoder::new(4096);
        assert_eq!(
            decode(&mut d, &[0xbe]),
            Err(HpackError::IndexOutOfRange(62))
        );
        // As a literal's name index, with incremental indexing and without.
        assert_eq!(
            decode(&mut d, &[0x7e, 0x01, b'x']),
            Err(HpackError::IndexOutOfRange(62))
        );
        assert_eq!(
            decode(&mut d, &[0x0f, 0x30, 0x01, b'x']),
            Err(HpackError::IndexOutOfRange(63))
        );
        let mut d = Decoder::new(4096);
        let mut block = vec![0x40, 0x01, b'a', 0x01, b'b'];
        block.extend(encoded_integer(62, 7, 0x80));
        block.extend(encoded_integer(63, 7, 0x80));
        assert_eq!(decode(&mut d, &block), Err(HpackError::IndexOutOfRange(63)));
        let mut block = encoded_integer(u32::MAX as usize, 7, 0x80);
        assert_eq!(
            decode(&mut d, &block),
            Err(HpackError::IndexOutOfRange(u32::MAX))
        );
        block = encoded_integer(u32::MAX as usize, 4, 0x00);
        block.extend([0x01, b'x']);
        assert_eq!(
            decode(&mut d, &block),
            Err(HpackError::IndexOutOfRange(u32::MAX))
        );
    }

    #[test]
    fn table_size_update() {
        let mut d = Decoder::new(4096);
        decode(
            &mut d,
            &hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"),
        )
        .unwrap();
        assert_table(&d, &[("custom-key", "custom-header")], 55);
        // Down to 0 (emptying the table), back to 4,096, then a field.
        let mut block = vec![0x20];
        block.extend(encoded_integer(4096, 5, 0x20));
        block.push(0x82);
        assert_eq!(decode(&mut d, &block), Ok(fields(&[(":method", "GET")])));
        assert_table(&d, &[], 0);
        assert_eq!(
            decode(&mut d, &[0xbe]),
            Err(HpackError::IndexOutOfRange(62))
        );

        // A smaller maximum applies to later insertions.
        let mut d = Decoder::new(4096);
        let mut block = encoded_integer(40, 5, 0x20);
        block.extend([0x40, 0x01, b'a', 0x01, b'b', 0x40, 0x01, b'c', 0x01, b'd']);
        block.extend([0x40, 0x01, b'e', 0x06]);
        block.extend(b"123456");
        assert_eq!(
            decode(&mut d, &block),
            Ok(fields(&[("a", "b"), ("c", "d"), ("e", "123456")]))
        );
        // "e: 123456" is 39 bytes and fits alone; "e: 12345678" would not.
        assert_table(&d, &[("e", "123456")], 39);
        let mut block = vec![0x40, 0x01, b'e', 0x08];
        block.extend(b"12345678");
        assert_eq!(decode(&mut d, &block), Ok(fields(&[("e", "12345678")])));
        assert_table(&d, &[], 0);
        // A block of size updates only is accepted.
        assert_eq!(decode(&mut d, &[0x20]), Ok(Vec::new()));
        assert_eq!(decode(&mut d, &[]), Ok(Vec::new()));
    }

    #[test]
    fn table_size_update_above_the_maximum_is_an_error() {
        let mut d = Decoder::new(4096);
        let block = encoded_integer(4097, 5, 0x20);
        assert_eq!(
            decode(&mut d, &block),
            Err(HpackError::TableSizeTooLarge {
                requested: 4097,
                max: 4096
            })
        );
        let mut d = Decoder::new(0);
        assert_eq!(
            decode(&mut d, &[0x20, 0x82]),
            Ok(fields(&[(":method", "GET")]))
        );
        assert_eq!(
            decode(&mut d, &[0x21]),
            Err(HpackError::TableSizeTooLarge {
                requested: 1,
                max: 0
            })
        );
    }

    #[test]
    fn table_size_update_after_a_field_is_an_error() {
        let mut d = Decoder::new(4096);
        assert_eq!(
            decode(&mut d, &[0x82, 0x20]),
            Err(HpackError::LateTableSizeUpdate)
        );
        let mut d = Decoder::new(4096);
        assert_eq!(
            decode(&mut d, &[0x20, 0x04, 0x01, b'/', 0x3f, 0xe1, 0x1f]),
            Err(HpackError::LateTableSizeUpdate)
        );
    }

    #[test]
    fn bad_huffman_padding_is_an_error() {
        let mut d = Decoder::new(4096);
        // :path (4) without indexing, value Huffman-coded: 'a' then padding 110.
        assert_eq!(
            decode(&mut d, &[0x04, 0x81, 0x1e]),
            Err(HpackError::HuffmanPadding)
        );
        // 'a' then eleven bits of ones.
        assert_eq!(
            decode(&mut d, &[0x04, 0x82, 0x1f, 0xff]),
            Err(HpackError::HuffmanPadding)
        );
        // In a new name.
        assert_eq!(
            decode(&mut d, &[0x00, 0x81, 0xff, 0x00]),
            Err(HpackError::HuffmanPadding)
        );
    }

    #[test]
    fn huffman_eos_is_an_error() {
        let mut d = Decoder::new(4096);
        assert_eq!(
            decode(&mut d, &[0x04, 0x84, 0xff, 0xff, 0xff, 0xff]),
            Err(HpackError::HuffmanEos)
        );
        assert_eq!(
            decode(&mut d, &[0x40, 0x84, 0xff, 0xff, 0xff, 0xff, 0x00]),
            Err(HpackError::HuffmanEos)
        );
    }

    #[test]
    fn integer_overflow_is_an_error() {
        let mut d = Decoder::new(4096);
        for block in [
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0x0f][..],
            &[0xff, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00],
            &[0x3f, 0xff, 0xff, 0xff, 0xff, 0x7f],
            &[0x0f, 0xff, 0xff, 0xff, 0xff, 0x7f],
            &[0x00, 0x7f, 0xff, 0xff, 0xff, 0xff, 0x7f],
        ] {
            assert_eq!(
                decode(&mut d, block),
                Err(HpackError::IntegerOverflow),
                "{block:x?}"
            );
        }
    }

    #[test]
    fn string_past_the_block_is_an_error() {
        let mut d = Decoder::new(4096);
        assert_eq!(
            decode(&mut d, &[0x00, 0x05, b'a', b'b']),
            Err(HpackError::StringPastEnd(5))
        );
        assert_eq!(
            decode(&mut d, &[0x04, 0x01]),
            Err(HpackError::StringPastEnd(1))
        );
        assert_eq!(
            decode(&mut d, &[0x44, 0x85, 0xff]),
            Err(HpackError::StringPastEnd(5))
        );
        let mut block = vec![0x04];
        block.extend(encoded_integer(u32::MAX as usize, 7, 0x80));
        assert_eq!(
            decode(&mut d, &block),
            Err(HpackError::StringPastEnd(u32::MAX))
        );
    }

    #[test]
    fn truncated_representations_are_errors() {
        let mut d = Decoder::new(4096);
        for block in [
            &[0x00][..],
            &[0x00, 0x01, b'a'],
            &[0x40, 0x01, b'a'],
            &[0x10, 0x00],
            &[0xff],
            &[0x3f],
            &[0x44],
        ] {
            assert_eq!(
                decode(&mut d, block),
                Err(HpackError::Truncated),
                "{block:x?}"
            );
        }
    }

    #[test]
    fn name_of_an_entry_the_insertion_evicts() {
        // RFC 7541 4.4: the new entry may name the entry it evicts.
        let mut d = Decoder::new(4096);
        let mut block = encoded_integer(70, 5, 0x20);
        block.extend([0x40, 0x04]);
        block.extend(b"name");
        block.extend([0x02]);
        block.extend(b"v1");
        // Name index 62, new value: "name: v2" does not fit next to "name: v1".
        block.extend([0x7e, 0x02]);
        block.extend(b"v2");
        assert_eq!(
            decode(&mut d, &block),
            Ok(fields(&[("name", "v1"), ("name", "v2")]))
        );
        assert_table(&d, &[("name", "v2")], 38);
        assert_eq!(decode(&mut d, &[0xbe]), Ok(fields(&[("name", "v2")])));
    }

    #[test]
    fn oversized_entry_empties_the_table() {
        let mut d = Decoder::new(64);
        assert_eq!(
            decode(&mut d, &[0x40, 0x01, b'a', 0x01, b'b']),
            Ok(fields(&[("a", "b")]))
        );
        assert_table(&d, &[("a", "b")], 34);
        // 1 + 32 + 32 = 65 bytes.
        let mut block = vec![0x40, 0x01, b'a', 0x20];
        block.extend([b'x'; 32]);
        assert_eq!(decode(&mut d, &block).map(|f| f.len()), Ok(1));
        assert_table(&d, &[], 0);
    }

    #[test]
    fn arena_does_not_grow_in_steady_state() {
        let mut d = Decoder::new(4096);
        let arena_capacity = d.arena.capacity();
        let entries_capacity = d.entries.capacity();
        let mut block = Vec::new();
        for i in 0..5000usize {
            block.clear();
            // Indexed, a new literal of varying size, a literal naming the newest entry.
            block.push(0x82);
            let name = format!("x-key-{}", i % 97);
            let value = "v".repeat(i % 300);
            block.push(0x40);
            encode_integer(name.len(), 7, 0, &mut block);
            block.extend(name.as_bytes());
            encode_integer(value.len(), 7, 0, &mut block);
            block.extend(value.as_bytes());
            block.extend([0x7e, 0x01, b'z']);
            let got = decode(&mut d, &block).unwrap();
            assert_eq!(got[1], (name.clone().into_bytes(), value.into_bytes()));
            assert_eq!(got[2], (name.into_bytes(), b"z".to_vec()));
            assert!(d.size <= 4096);
            assert!(d.arena.len() <= 8192);
        }
        assert_eq!(d.arena.capacity(), arena_capacity);
        assert_eq!(d.entries.capacity(), entries_capacity);
    }

    #[test]
    fn encode_literal_round_trips() {
        let cases: [(&[u8], &[u8]); 5] = [
            (b"content-type", b"application/grpc"),
            (b"grpc-status", b"0"),
            (b"", b""),
            (b"grpc-message", &[b'm'; 126]),
            (b"x-long", &[0xffu8; 5000]),
        ];
        let mut block = Vec::new();
        for (name, value) in cases {
            encode_literal(name, value, &mut block);
        }
        assert_eq!(&block[..2], [0x00, 12]);
        let expected: Fields = cases
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        let mut d = Decoder::new(4096);
        assert_eq!(decode(&mut d, &block), Ok(expected.clone()));
        assert_table(&d, &[], 0);
        let theirs = fluke_hpack::Decoder::new().decode(&block).unwrap();
        assert_eq!(theirs, expected);
    }

    /// A header field for the property tests: names from a small pool (so that tables hit)
    /// or random lowercase, values from a small pool or arbitrary bytes.
    fn header() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        let name = prop_oneof![
            prop::sample::select(vec![
                ":method",
                ":path",
                ":authority",
                "content-type",
                "te",
                "grpc-timeout",
                "user-agent",
                "x-a",
                "x-b",
                "accept-encoding",
            ])
            .prop_map(|s| s.as_bytes().to_vec()),
            "[a-z][a-z0-9-]{0,20}".prop_map(String::into_bytes),
        ];
        let value = prop_oneof![
            prop::sample::select(vec!["", "POST", "GET", "/", "application/grpc", "trailers"])
                .prop_map(|s| s.as_bytes().to_vec()),
            prop::collection::vec(any::<u8>(), 0..40),
            prop::collection::vec(any::<u8>(), 0..600),
        ];
        (name, value)
    }

    fn blocks() -> impl Strategy<Value = Vec<Fields>> {
        prop::collection::vec(prop::collection::vec(header(), 0..12), 1..10)
    }

    /// Huffman-coded literals repeated across blocks come back the same whether decoded or
    /// remembered: six values over four memo slots (so slots are replaced), one a prefix of
    /// another, one empty, one longer than the memo keeps.
    #[test]
    fn remembered_huffman_strings_decode_as_decoded_ones() {
        let long = "x".repeat(300);
        let values: [&str; 6] = [
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
            "/envoy.service.ratelimit.v3.RateLimitService/Should",
            "",
            "grpc-go/1.60",
            "sluice",
            &long,
        ];
        let mut decoder = Decoder::new(4096);
        for round in 0..40usize {
            let mut block = Vec::new();
            let mut expected = Vec::new();
            for k in 0..3 {
                let value = values[(round * 5 + k * 7) % values.len()];
                // Literal without indexing, name `:path` (static 4), value Huffman-coded.
                block.push(0x04);
                TestEncoder::string(value.as_bytes(), true, &mut block);
                expected.push((b":path".to_vec(), value.as_bytes().to_vec()));
            }
            assert_eq!(
                decode(&mut decoder, &block).unwrap(),
                expected,
                "round {round}"
            );
        }
    }

    /// A test encoder that uses every representation HPACK has, chosen by `choices`, with a
    /// model of the dynamic table.
    struct TestEncoder {
        table: VecDeque<(Vec<u8>, Vec<u8>)>,
        size: usize,
        max_size: usize,
    }

    impl TestEncoder {
        fn insert(&mut self, name: &[u8], value: &[u8]) {
            self.table.push_front((name.to_vec(), value.to_vec()));
            self.size += name.len() + value.len() + 32;
            self.evict();
        }

        fn evict(&mut self) {
            while self.size > self.max_size {
                let (n, v) = self.table.pop_back().unwrap();
                self.size -= n.len() + v.len() + 32;
            }
        }

        fn find(&self, name: &[u8], value: &[u8]) -> (Option<usize>, Option<usize>) {
            let all = STATIC_TABLE
                .iter()
                .map(|&(n, v)| (n, v))
                .chain(self.table.iter().map(|(n, v)| (&n[..], &v[..])));
            let mut name_at = None;
            for (i, (n, v)) in all.enumerate() {
                if n == name {
                    if v == value {
                        return (Some(i + 1), Some(i + 1));
                    }
                    name_at.get_or_insert(i + 1);
                }
            }
            (None, name_at)
        }

        fn string(s: &[u8], huffman: bool, out: &mut Vec<u8>) {
            if huffman {
                let mut coded = Vec::new();
                huffman::encode(s, &mut coded);
                encode_integer(coded.len(), 7, 0x80, out);
                out.extend(coded);
            } else {
                encode_integer(s.len(), 7, 0, out);
                out.extend(s);
            }
        }

        fn encode(&mut self, fields: &Fields, choices: &mut impl Iterator<Item = u8>) -> Vec<u8> {
            let mut out = Vec::new();
            let mut next = || choices.next().unwrap_or(0);
            if !fields.is_empty() && next() % 4 == 0 {
                let size = usize::from(next()) * 16 + 64;
                self.max_size = size.min(4096);
                self.evict();
                encode_integer(self.max_size, 5, 0x20, &mut out);
            }
            for (name, value) in fields {
                let choice = next();
                let (full, name_at) = self.find(name, value);
                if let (Some(i), true) = (full, choice % 5 != 0) {
                    encode_integer(i, 7, 0x80, &mut out);
                    continue;
                }
                let (flags, prefix) = match choice % 3 {
                    0 => (0x40, 6),
                    1 => (0x00, 4),
                    _ => (0x10, 4),
                };
                match name_at {
                    Some(i) if choice & 0x08 != 0 => encode_integer(i, prefix, flags, &mut out),
                    _ => {
                        out.push(flags);
                        Self::string(name, choice & 0x10 != 0, &mut out);
                    }
                }
                Self::string(value, choice & 0x20 != 0, &mut out);
                if flags == 0x40 {
                    self.insert(name, value);
                }
            }
            out
        }
    }

    proptest! {
        /// fluke-hpack's encoder (indexed fields, incremental indexing, indexed names) block
        /// after block, decoded by ours and by fluke-hpack's own decoder.
        #[test]
        fn decodes_what_fluke_hpack_encodes(blocks in blocks(), table_size in 0..=4096usize) {
            let mut theirs = fluke_hpack::Encoder::new();
            theirs.set_max_table_size(table_size);
            let mut ours = Decoder::new(4096);
            for (i, fields) in blocks.iter().enumerate() {
                let mut block = Vec::new();
                if i == 0 {
                    encode_integer(table_size, 5, 0x20, &mut block);
                }
                block.extend(theirs.encode(fields.iter().map(|(n, v)| (&n[..], &v[..]))));
                prop_assert_eq!(&decode(&mut ours, &block)?, fields, "block {}", i);
                prop_assert!(ours.size <= table_size);
            }
        }

        /// Every representation, Huffman-coded or not, size updates, evictions: ours and
        /// fluke-hpack's decoder agree with the input block after block.
        #[test]
        fn agrees_with_fluke_hpack_decoder(
            blocks in blocks(),
            choices in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut encoder = TestEncoder { table: VecDeque::new(), size: 0, max_size: 4096 };
            let mut choices = choices.into_iter().cycle();
            let mut ours = Decoder::new(4096);
            let mut theirs = fluke_hpack::Decoder::new();
            for (i, fields) in blocks.iter().enumerate() {
                let block = encoder.encode(fields, &mut choices);
                prop_assert_eq!(&decode(&mut ours, &block)?, fields, "block {}", i);
                prop_assert_eq!(&theirs.decode(&block).unwrap(), fields, "block {}", i);
                prop_assert_eq!(table(&ours), Vec::from(encoder.table.clone()));
                prop_assert_eq!(ours.size, encoder.size);
            }
        }

        /// Arbitrary bytes, block after block on the same decoder (even after errors).
        #[test]
        fn arbitrary_bytes_do_not_panic(
            blocks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..100), 1..8),
            table_size in prop::sample::select(vec![0usize, 64, 256, 4096]),
        ) {
            let mut d = Decoder::new(table_size);
            for block in blocks {
                let _ = d.decode(&block, |_, _| {});
                prop_assert!(d.size <= table_size);
            }
        }

        /// Valid blocks, truncated and with bytes flipped, on the same decoder.
        #[test]
        fn mutated_blocks_do_not_panic(
            blocks in blocks(),
            choices in prop::collection::vec(any::<u8>(), 1..100),
            mutations in prop::collection::vec(
                (any::<prop::sample::Index>(), any::<u8>(), any::<prop::sample::Index>()),
                1..10,
            ),
        ) {
            let mut encoder = TestEncoder { table: VecDeque::new(), size: 0, max_size: 4096 };
            let mut choices = choices.into_iter().cycle();
            let mut d = Decoder::new(4096);
            for (fields, (at, xor, cut)) in blocks.iter().zip(mutations.into_iter().cycle()) {
                let mut block = encoder.encode(fields, &mut choices);
                if !block.is_empty() {
                    let at = at.index(block.len());
                    block[at] ^= xor;
                    block.truncate(cut.index(block.len() + 1).max(at));
                }
                let _ = d.decode(&block, |_, _| {});
                prop_assert!(d.size <= 4096);
            }
        }
    }
}
