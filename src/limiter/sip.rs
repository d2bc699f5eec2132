//! SipHash-1-3 of one tagged, length-prefixed value, read straight from the value.
//!
//! Counter keys hash a client's value (its address or id) laid out as `[tag, len as u32 LE,
//! value]` (see `Limiter::hash_parts`). Copying that into a buffer for the `siphasher` crate
//! cost a `memcpy` call, and its 8-byte reads then waited on the narrow stores that had just
//! written the buffer; with the crate's general-purpose buffering that was ~8% of a hot
//! decision's time under perf. Here each 8-byte word of that layout is loaded from the value
//! itself.
//! The result is the same SipHash-1-3 (a test holds it equal to the crate's), so counter keys,
//! and with them counters kept in Redis, do not change.

/// SipHash-1-3 state.
struct Sip {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
}

impl Sip {
    fn new(k0: u64, k1: u64) -> Self {
        Self {
            v0: k0 ^ 0x736f_6d65_7073_6575,
            v1: k1 ^ 0x646f_7261_6e64_6f6d,
            v2: k0 ^ 0x6c79_6765_6e65_7261,
            v3: k1 ^ 0x7465_6462_7974_6573,
        }
    }

    #[inline(always)]
    fn round(&mut self) {
        self.v0 = self.v0.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(13) ^ self.v0;
        self.v0 = self.v0.rotate_left(32);
        self.v2 = self.v2.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(16) ^ self.v2;
        self.v0 = self.v0.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(21) ^ self.v0;
        self.v2 = self.v2.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(17) ^ self.v2;
        self.v2 = self.v2.rotate_left(32);
    }

    #[inline(always)]
    fn compress(&mut self, m: u64) {
        self.v3 ^= m;
        self.round();
        self.v0 ^= m;
    }

    /// Ends with the last word (the message's tail bytes and its length in the top byte).
    #[inline(always)]
    fn finish(mut self, last: u64) -> u64 {
        self.compress(last);
        self.v2 ^= 0xff;
        self.round();
        self.round();
        self.round();
        self.v0 ^ self.v1 ^ self.v2 ^ self.v3
    }
}

/// Up to 8 bytes as a little-endian integer, without reading past them or copying them.
#[inline(always)]
fn load_le(b: &[u8]) -> u64 {
    if let Some(w) = b.first_chunk::<8>() {
        return u64::from_le_bytes(*w);
    }
    let n = b.len();
    match (b.first_chunk::<4>(), b.last_chunk::<4>()) {
        // 4 to 7 bytes: two 4-byte reads that overlap; the overlap holds the same bytes.
        (Some(lo), Some(hi)) => {
            u64::from(u32::from_le_bytes(*lo)) | u64::from(u32::from_le_bytes(*hi)) << (8 * (n - 4))
        }
        // 0 to 3 bytes: the first, middle and last (the same byte more than once when short).
        _ => match (b.first(), b.get(n / 2), b.last()) {
            (Some(&first), Some(&mid), Some(&last)) => {
                u64::from(first)
                    | u64::from(mid) << (8 * (n / 2))
                    | u64::from(last) << (8 * (n - 1))
            }
            _ => 0,
        },
    }
}

/// SipHash-1-3 under `(k0, k1)` of `[tag, value.len() as u32 LE, value]`.
pub fn hash_tagged(k0: u64, k1: u64, tag: u8, value: &[u8]) -> u64 {
    let total = 5 + value.len();
    let header = u64::from(tag) | u64::from(value.len() as u32) << 8;
    let mut sip = Sip::new(k0, k1);
    if total < 8 {
        // The whole message fits in the last word.
        return sip.finish(header | load_le(value) << 40 | (total as u64) << 56);
    }
    // The first word: the header and the value's first 3 bytes.
    let (head, mut rest) = value.split_at(3);
    sip.compress(header | load_le(head) << 40);
    while let Some((word, tail)) = rest.split_first_chunk::<8>() {
        sip.compress(u64::from_le_bytes(*word));
        rest = tail;
    }
    sip.finish(load_le(rest) | (total as u64) << 56)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::hash::Hasher as _;

    fn by_crate(k0: u64, k1: u64, tag: u8, value: &[u8]) -> u64 {
        let mut h = siphasher::sip::SipHasher13::new_with_keys(k0, k1);
        h.write_u8(tag);
        h.write(&(value.len() as u32).to_le_bytes());
        h.write(value);
        h.finish()
    }

    proptest! {
        /// Every length around the word boundaries (the layout's 5-byte header shifts them).
        #[test]
        fn equals_the_siphasher_crate(
            k0 in any::<u64>(),
            k1 in any::<u64>(),
            tag in any::<u8>(),
            value in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            prop_assert_eq!(hash_tagged(k0, k1, tag, &value), by_crate(k0, k1, tag, &value));
        }
    }

    #[test]
    fn load_le_reads_exactly_the_bytes() {
        let bytes: Vec<u8> = (1..=8).collect();
        for n in 0..=8 {
            let mut expected = [0u8; 8];
            expected[..n].copy_from_slice(&bytes[..n]);
            assert_eq!(
                load_le(&bytes[..n]),
                u64::from_le_bytes(expected),
                "{n} bytes"
            );
        }
    }
}
