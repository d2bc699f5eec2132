//! HPACK (RFC 7541) for the decision listener's own HTTP/2: a decoder for request header blocks
//! and an encoder for responses. STUB: being written.

/// Why a header block could not be decoded: a connection error of type COMPRESSION_ERROR.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HpackError {
    /// Placeholder.
    #[error("invalid header block: {0}")]
    Invalid(&'static str),
}

/// Decodes request header blocks, keeping the dynamic table between them.
#[derive(Debug)]
pub struct Decoder {}

impl Decoder {
    /// A decoder whose dynamic table may grow to `max_table_size` bytes (our
    /// SETTINGS_HEADER_TABLE_SIZE; 4,096 by default).
    pub fn new(max_table_size: usize) -> Self {
        let _ = max_table_size;
        Self {}
    }

    /// Decodes one whole header block, calling `field(name, value)` for each field in order.
    pub fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let _ = (block, &mut field);
        Err(HpackError::Invalid("stub"))
    }
}

/// Appends `name: value` to `out` as a literal field without indexing, with a new name
/// (names must be lowercase), strings not Huffman-coded.
pub fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    let _ = (name, value, out);
}
