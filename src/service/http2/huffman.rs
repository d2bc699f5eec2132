//! HPACK's Huffman code (RFC 7541 Appendix B), decoded four bits at a time.
//!
//! Clients Huffman-code most header strings, so this sits on the request hot path. Walking the
//! code tree bit by bit costs a dependent branch per bit; instead, as nghttp2 and h2 do, every
//! (tree node, next nibble) pair is resolved ahead of time into a transition that says which
//! node follows, which symbol (at most one: the shortest code is five bits) is completed, and
//! whether stopping there is legal padding. The table is built by a `const fn` from the code
//! list below, so that list is the only data copied from the RFC; building it asserts that the
//! list is a complete prefix code, and the RFC's Appendix C examples check it end to end.

use super::hpack::HpackError;

/// `(code, bit length)` of every symbol, octets 0..=255 then EOS (256), RFC 7541 Appendix B.
pub(super) const CODES: [(u32, u8); 257] = [
    (0x1ff8, 13),     //   0
    (0x7fffd8, 23),   //   1
    (0xfffffe2, 28),  //   2
    (0xfffffe3, 28),  //   3
    (0xfffffe4, 28),  //   4
    (0xfffffe5, 28),  //   5
    (0xfffffe6, 28),  //   6
    (0xfffffe7, 28),  //   7
    (0xfffffe8, 28),  //   8
    (0xffffea, 24),   //   9
    (0x3ffffffc, 30), //  10
    (0xfffffe9, 28),  //  11
    (0xfffffea, 28),  //  12
    (0x3ffffffd, 30), //  13
    (0xfffffeb, 28),  //  14
    (0xfffffec, 28),  //  15
    (0xfffffed, 28),  //  16
    (0xfffffee, 28),  //  17
    (0xfffffef, 28),  //  18
    (0xffffff0, 28),  //  19
    (0xffffff1, 28),  //  20
    (0xffffff2, 28),  //  21
    (0x3ffffffe, 30), //  22
    (0xffffff3, 28),  //  23
    (0xffffff4, 28),  //  24
    (0xffffff5, 28),  //  25
    (0xffffff6, 28),  //  26
    (0xffffff7, 28),  //  27
    (0xffffff8, 28),  //  28
    (0xffffff9, 28),  //  29
    (0xffffffa, 28),  //  30
    (0xffffffb, 28),  //  31
    (0x14, 6),        //  32 ' '
    (0x3f8, 10),      //  33 '!'
    (0x3f9, 10),      //  34 '"'
    (0xffa, 12),      //  35 '#'
    (0x1ff9, 13),     //  36 '$'
    (0x15, 6),        //  37 '%'
    (0xf8, 8),        //  38 '&'
    (0x7fa, 11),      //  39 "'"
    (0x3fa, 10),      //  40 '('
    (0x3fb, 10),      //  41 ')'
    (0xf9, 8),        //  42 '*'
    (0x7fb, 11),      //  43 '+'
    (0xfa, 8),        //  44 ','
    (0x16, 6),        //  45 '-'
    (0x17, 6),        //  46 '.'
    (0x18, 6),        //  47 '/'
    (0x0, 5),         //  48 '0'
    (0x1, 5),         //  49 '1'
    (0x2, 5),         //  50 '2'
    (0x19, 6),        //  51 '3'
    (0x1a, 6),        //  52 '4'
    (0x1b, 6),        //  53 '5'
    (0x1c, 6),        //  54 '6'
    (0x1d, 6),        //  55 '7'
    (0x1e, 6),        //  56 '8'
    (0x1f, 6),        //  57 '9'
    (0x5c, 7),        //  58 ':'
    (0xfb, 8),        //  59 ';'
    (0x7ffc, 15),     //  60 '<'
    (0x20, 6),        //  61 '='
    (0xffb, 12),      //  62 '>'
    (0x3fc, 10),      //  63 '?'
    (0x1ffa, 13),     //  64 '@'
    (0x21, 6),        //  65 'A'
    (0x5d, 7),        //  66 'B'
    (0x5e, 7),        //  67 'C'
    (0x5f, 7),        //  68 'D'
    (0x60, 7),        //  69 'E'
    (0x61, 7),        //  70 'F'
    (0x62, 7),        //  71 'G'
    (0x63, 7),        //  72 'H'
    (0x64, 7),        //  73 'I'
    (0x65, 7),        //  74 'J'
    (0x66, 7),        //  75 'K'
    (0x67, 7),        //  76 'L'
    (0x68, 7),        //  77 'M'
    (0x69, 7),        //  78 'N'
    (0x6a, 7),        //  79 'O'
    (0x6b, 7),        //  80 'P'
    (0x6c, 7),        //  81 'Q'
    (0x6d, 7),        //  82 'R'
    (0x6e, 7),        //  83 'S'
    (0x6f, 7),        //  84 'T'
    (0x70, 7),        //  85 'U'
    (0x71, 7),        //  86 'V'
    (0x72, 7),        //  87 'W'
    (0xfc, 8),        //  88 'X'
    (0x73, 7),        //  89 'Y'
    (0xfd, 8),        //  90 'Z'
    (0x1ffb, 13),     //  91 '['
    (0x7fff0, 19),    //  92 '\\'
    (0x1ffc, 13),     //  93 ']'
    (0x3ffc, 14),     //  94 '^'
    (0x22, 6),        //  95 '_'
    (0x7ffd, 15),     //  96 '`'
    (0x3, 5),         //  97 'a'
    (0x23, 6),        //  98 'b'
    (0x4, 5),         //  99 'c'
    (0x24, 6),        // 100 'd'
    (0x5, 5),         // 101 'e'
    (0x25, 6),        // 102 'f'
    (0x26, 6),        // 103 'g'
    (0x27, 6),        // 104 'h'
    (0x6, 5),         // 105 'i'
    (0x74, 7),        // 106 'j'
    (0x75, 7),        // 107 'k'
    (0x28, 6),        // 108 'l'
    (0x29, 6),        // 109 'm'
    (0x2a, 6),        // 110 'n'
    (0x7, 5),         // 111 'o'
    (0x2b, 6),        // 112 'p'
    (0x76, 7),        // 113 'q'
    (0x2c, 6),        // 114 'r'
    (0x8, 5),         // 115 's'
    (0x9, 5),         // 116 't'
    (0x2d, 6),        // 117 'u'
    (0x77, 7),        // 118 'v'
    (0x78, 7),        // 119 'w'
    (0x79, 7),        // 120 'x'
    (0x7a, 7),        // 121 'y'
    (0x7b, 7),        // 122 'z'
    (0x7ffe, 15),     // 123 '{'
    (0x7fc, 11),      // 124 '|'
    (0x3ffd, 14),     // 125 '}'
    (0x1ffd, 13),     // 126 '~'
    (0xffffffc, 28),  // 127
    (0xfffe6, 20),    // 128
    (0x3fffd2, 22),   // 129
    (0xfffe7, 20),    // 130
    (0xfffe8, 20),    // 131
    (0x3fffd3, 22),   // 132
    (0x3fffd4, 22),   // 133
    (0x3fffd5, 22),   // 134
    (0x7fffd9, 23),   // 135
    (0x3fffd6, 22),   // 136
    (0x7fffda, 23),   // 137
    (0x7fffdb, 23),   // 138
    (0x7fffdc, 23),   // 139
    (0x7fffdd, 23),   // 140
    (0x7fffde, 23),   // 141
    (0xffffeb, 24),   // 142
    (0x7fffdf, 23),   // 143
    (0xffffec, 24),   // 144
    (0xffffed, 24),   // 145
    (0x3fffd7, 22),   // 146
    (0x7fffe0, 23),   // 147
    (0xffffee, 24),   // 148
    (0x7fffe1, 23),   // 149
    (0x7fffe2, 23),   // 150
    (0x7fffe3, 23),   // 151
    (0x7fffe4, 23),   // 152
    (0x1fffdc, 21),   // 153
    (0x3fffd8, 22),   // 154
    (0x7fffe5, 23),   // 155
    (0x3fffd9, 22),   // 156
    (0x7fffe6, 23),   // 157
    (0x7fffe7, 23),   // 158
    (0xffffef, 24),   // 159
    (0x3fffda, 22),   // 160
    (0x1fffdd, 21),   // 161
    (0xfffe9, 20),    // 162
    (0x3fffdb, 22),   // 163
    (0x3fffdc, 22),   // 164
    (0x7fffe8, 23),   // 165
    (0x7fffe9, 23),   // 166
    (0x1fffde, 21),   // 167
    (0x7fffea, 23),   // 168
    (0x3fffdd, 22),   // 169
    (0x3fffde, 22),   // 170
    (0xfffff0, 24),   // 171
    (0x1fffdf, 21),   // 172
    (0x3fffdf, 22),   // 173
    (0x7fffeb, 23),   // 174
    (0x7fffec, 23),   // 175
    (0x1fffe0, 21),   // 176
    (0x1fffe1, 21),   // 177
    (0x3fffe0, 22),   // 178
    (0x1fffe2, 21),   // 179
    (0x7fffed, 23),   // 180
    (0x3fffe1, 22),   // 181
    (0x7fffee, 23),   // 182
    (0x7fffef, 23),   // 183
    (0xfffea, 20),    // 184
    (0x3fffe2, 22),   // 185
    (0x3fffe3, 22),   // 186
    (0x3fffe4, 22),   // 187
    (0x7ffff0, 23),   // 188
    (0x3fffe5, 22),   // 189
    (0x3fffe6, 22),   // 190
    (0x7ffff1, 23),   // 191
    (0x3ffffe0, 26),  // 192
    (0x3ffffe1, 26),  // 193
    (0xfffeb, 20),    // 194
    (0x7fff1, 19),    // 195
    (0x3fffe7, 22),   // 196
    (0x7ffff2, 23),   // 197
    (0x3fffe8, 22),   // 198
    (0x1ffffec, 25),  // 199
    (0x3ffffe2, 26),  // 200
    (0x3ffffe3, 26),  // 201
    (0x3ffffe4, 26),  // 202
    (0x7ffffde, 27),  // 203
    (0x7ffffdf, 27),  // 204
    (0x3ffffe5, 26),  // 205
    (0xfffff1, 24),   // 206
    (0x1ffffed, 25),  // 207
    (0x7fff2, 19),    // 208
    (0x1fffe3, 21),   // 209
    (0x3ffffe6, 26),  // 210
    (0x7ffffe0, 27),  // 211
    (0x7ffffe1, 27),  // 212
    (0x3ffffe7, 26),  // 213
    (0x7ffffe2, 27),  // 214
    (0xfffff2, 24),   // 215
    (0x1fffe4, 21),   // 216
    (0x1fffe5, 21),   // 217
    (0x3ffffe8, 26),  // 218
    (0x3ffffe9, 26),  // 219
    (0xffffffd, 28),  // 220
    (0x7ffffe3, 27),  // 221
    (0x7ffffe4, 27),  // 222
    (0x7ffffe5, 27),  // 223
    (0xfffec, 20),    // 224
    (0xfffff3, 24),   // 225
    (0xfffed, 20),    // 226
    (0x1fffe6, 21),   // 227
    (0x3fffe9, 22),   // 228
    (0x1fffe7, 21),   // 229
    (0x1fffe8, 21),   // 230
    (0x7ffff3, 23),   // 231
    (0x3fffea, 22),   // 232
    (0x3fffeb, 22),   // 233
    (0x1ffffee, 25),  // 234
    (0x1ffffef, 25),  // 235
    (0xfffff4, 24),   // 236
    (0xfffff5, 24),   // 237
    (0x3ffffea, 26),  // 238
    (0x7ffff4, 23),   // 239
    (0x3ffffeb, 26),  // 240
    (0x7ffffe6, 27),  // 241
    (0x3ffffec, 26),  // 242
    (0x3ffffed, 26),  // 243
    (0x7ffffe7, 27),  // 244
    (0x7ffffe8, 27),  // 245
    (0x7ffffe9, 27),  // 246
    (0x7ffffea, 27),  // 247
    (0x7ffffeb, 27),  // 248
    (0xffffffe, 28),  // 249
    (0x7ffffec, 27),  // 250
    (0x7ffffed, 27),  // 251
    (0x7ffffee, 27),  // 252
    (0x7ffffef, 27),  // 253
    (0x7fffff0, 27),  // 254
    (0x3ffffee, 26),  // 255
    (0x3fffffff, 30), // EOS
];

/// The transition completes a symbol: `Transition::sym` is output.
const EMIT: u8 = 1;
/// The string may end after this transition: the bits since the last symbol are at most seven
/// and all ones (a prefix of EOS).
const ACCEPT: u8 = 2;
/// The transition reaches EOS, which must not appear in a string.
const FAIL: u8 = 4;

/// Marks a child in the build-time tree as a leaf holding a symbol rather than an inner node.
const LEAF: u16 = 0x8000;

/// Where four more bits take the decoder from one inner node of the code tree.
#[derive(Clone, Copy)]
struct Transition {
    /// The inner node reached (0 is the root).
    next: u8,
    /// The symbol completed on the way, if `flags` has `EMIT`.
    sym: u8,
    /// `EMIT`, `ACCEPT`, `FAIL`.
    flags: u8,
}

/// Transitions from each of the 256 inner nodes of the tree (257 leaves) for each nibble.
static TRANSITIONS: [[Transition; 16]; 256] = build();

const fn build() -> [[Transition; 16]; 256] {
    // The code tree: children[node][bit] is 0 while unset (the root is nobody's child), else
    // an inner node's number, or LEAF | symbol.
    let mut children = [[0u16; 2]; 256];
    let mut nodes = 1;
    let mut sym = 0;
    while sym < CODES.len() {
        let (code, len) = CODES[sym];
        let mut node = 0;
        let mut bit = len;
        while bit > 0 {
            bit -= 1;
            let b = ((code >> bit) & 1) as usize;
            let child = children[node][b];
            if bit == 0 {
                assert!(child == 0, "a code is a prefix of another");
                children[node][b] = LEAF | sym as u16;
            } else if child == 0 {
                assert!(nodes < 256, "too many inner nodes");
                children[node][b] = nodes as u16;
                node = nodes;
                nodes += 1;
            } else {
                assert!(child & LEAF == 0, "a code is a prefix of another");
                node = child as usize;
            }
        }
        sym += 1;
    }
    assert!(nodes == 256, "not a complete prefix code");

    // Padding is legal at the root and at the nodes of the all-ones path up to depth 7. The
    // all-ones path stays inside the tree for 29 levels (EOS is thirty ones).
    let mut accept = [false; 256];
    let mut node = 0;
    let mut depth = 0;
    while depth <= 7 {
        accept[node] = true;
        node = children[node][1] as usize;
        depth += 1;
    }

    let mut table = [[Transition {
        next: 0,
        sym: 0,
        flags: 0,
    }; 16]; 256];
    let mut state = 0;
    while state < 256 {
        let mut nibble = 0;
        while nibble < 16 {
            let mut node = state;
            let mut out = 0;
            let mut flags = 0;
            let mut bit = 4;
            while bit > 0 {
                bit -= 1;
                let child = children[node][(nibble >> bit) & 1];
                assert!(child != 0, "not a complete prefix code");
                if child & LEAF == 0 {
                    node = child as usize;
                } else if child & !LEAF == 256 {
                    flags = FAIL;
                    break;
                } else {
                    out = (child & !LEAF) as u8;
                    flags |= EMIT;
                    node = 0;
                }
            }
            if flags & FAIL == 0 && accept[node] {
                flags |= ACCEPT;
            }
            table[state][nibble] = Transition {
                next: node as u8,
                sym: out,
                flags,
            };
            nibble += 1;
        }
        state += 1;
    }
    table
}

/// Appends the decoding of the Huffman-coded `src` to `out`.
///
/// Errors on EOS inside the string and on padding that is longer than seven bits or not all
/// ones (RFC 7541 5.2). `out` is reserved once for the longest possible output, so a warm
/// buffer does not reallocate.
pub(super) fn decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    // The shortest code is five bits.
    out.reserve(src.len().saturating_mul(8) / 5 + 1);
    let mut state = 0u8;
    let mut accept = true;
    for &byte in src {
        for nibble in [byte >> 4, byte & 0x0f] {
            let t = TRANSITIONS[usize::from(state)][usize::from(nibble & 0x0f)];
            if t.flags & FAIL != 0 {
                return Err(HpackError::HuffmanEos);
            }
            if t.flags & EMIT != 0 {
                out.push(t.sym);
            }
            state = t.next;
            accept = t.flags & ACCEPT != 0;
        }
    }
    if accept {
        Ok(())
    } else {
        Err(HpackError::HuffmanPadding)
    }
}

/// Appends the Huffman coding of `src` to `out`, padded with ones: for tests, which need
/// Huffman-coded input the RFC examples do not cover.
#[cfg(test)]
pub(super) fn encode(src: &[u8], out: &mut Vec<u8>) {
    let mut acc = 0u64;
    let mut bits = 0u32;
    for &b in src {
        let (code, len) = CODES[usize::from(b)];
        acc = (acc << len) | u64::from(code);
        bits += u32::from(len);
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decoded(src: &[u8]) -> Result<Vec<u8>, HpackError> {
        let mut out = Vec::new();
        decode(src, &mut out).map(|()| out)
    }

    fn encoded(src: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(src, &mut out);
        out
    }

    #[test]
    fn every_symbol_round_trips() {
        for b in 0..=255u8 {
            assert_eq!(decoded(&encoded(&[b])), Ok(vec![b]), "symbol {b}");
            assert_eq!(
                decoded(&encoded(&[b, b, b])),
                Ok(vec![b, b, b]),
                "symbol {b}"
            );
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decoded(&encoded(&all)), Ok(all));
    }

    #[test]
    fn rfc_strings() {
        // RFC 7541 C.4.1 and C.4.3.
        assert_eq!(
            decoded(&[
                0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff
            ]),
            Ok(b"www.example.com".to_vec())
        );
        assert_eq!(
            decoded(&[0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xb8, 0xe8, 0xb4, 0xbf]),
            Ok(b"custom-value".to_vec())
        );
        assert_eq!(decoded(b""), Ok(Vec::new()));
    }

    #[test]
    fn padding_of_seven_ones_is_accepted() {
        // Five '0's (00000 each) are 25 bits: seven bits of padding.
        let coded = encoded(b"00000");
        assert_eq!(coded, [0, 0, 0, 0x7f]);
        assert_eq!(decoded(&coded), Ok(b"00000".to_vec()));
    }

    #[test]
    fn padding_longer_than_seven_bits_is_rejected() {
        // 'a' is 00011: three bits of padding, then eight more.
        assert_eq!(decoded(&[0x1f]), Ok(b"a".to_vec()));
        assert_eq!(decoded(&[0x1f, 0xff]), Err(HpackError::HuffmanPadding));
        // Only padding: a whole byte of ones.
        assert_eq!(decoded(&[0xff]), Err(HpackError::HuffmanPadding));
        assert_eq!(decoded(&[0xff, 0xff]), Err(HpackError::HuffmanPadding));
    }

    #[test]
    fn padding_not_all_ones_is_rejected() {
        // 'a' then 110 or 011 instead of 111.
        assert_eq!(decoded(&[0x1e]), Err(HpackError::HuffmanPadding));
        assert_eq!(decoded(&[0x1b]), Err(HpackError::HuffmanPadding));
    }

    #[test]
    fn eos_is_rejected() {
        // Thirty ones, then two bits of padding.
        assert_eq!(decoded(&[0xff; 4]), Err(HpackError::HuffmanEos));
        // 'a' (00011), then EOS (30 ones), then 5 bits of padding.
        assert_eq!(
            decoded(&[0x1f, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(HpackError::HuffmanEos)
        );
    }

    proptest! {
        #[test]
        fn round_trips(src in prop::collection::vec(any::<u8>(), 0..200)) {
            prop_assert_eq!(decoded(&encoded(&src)), Ok(src));
        }

        #[test]
        fn agrees_with_fluke_hpack(src in prop::collection::vec(any::<u8>(), 0..64)) {
            let theirs = fluke_hpack::huffman::HuffmanDecoder::new().decode(&src);
            match (decoded(&src), theirs) {
                (Ok(ours), Ok(theirs)) => prop_assert_eq!(ours, theirs),
                (Err(_), Err(_)) => {}
                (ours, theirs) => prop_assert!(false, "ours {:?}, fluke-hpack {:?}", ours, theirs),
            }
        }

        #[test]
        fn agrees_with_fluke_hpack_on_mutated_strings(
            src in prop::collection::vec(any::<u8>(), 0..32),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 0..8u8), 0..3),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut coded = encoded(&src);
            if !coded.is_empty() {
                for (at, bit) in flips {
                    let at = at.index(coded.len());
                    coded[at] ^= 1 << bit;
                }
                coded.truncate(cut.index(coded.len() + 1));
            }
            let theirs = fluke_hpack::huffman::HuffmanDecoder::new().decode(&coded);
            match (decoded(&coded), theirs) {
                (Ok(ours), Ok(theirs)) => prop_assert_eq!(ours, theirs),
                (Err(_), Err(_)) => {}
                (ours, theirs) => prop_assert!(false, "ours {:?}, fluke-hpack {:?}", ours, theirs),
            }
        }
    }
}
