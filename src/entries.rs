//! Descriptor entries as the decision path reads them: the value of an entry by its key, and
//! the comparison of short names (entry keys, domains, paths, client lists) that every layer
//! makes. A leaf: the rule model, path templates and statistics all use it, and it uses none
//! of them.

/// The first value of entry `key` in a descriptor.
pub fn lookup<'e>(entries: &[(&str, &'e str)], key: &str) -> Option<&'e str> {
    entries
        .iter()
        .find(|(k, _)| bytes_eq(k.as_bytes(), key.as_bytes()))
        .map(|(_, v)| *v)
}

/// `a == b`, inline for the short strings the decision path compares (entry keys, domain
/// names, paths, client lists): up to 16 bytes are two overlapping word compares. `==` on
/// slices calls `memcmp`, whose call and dispatch cost more than the compare; a hot decision
/// made six such calls.
#[inline]
pub fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if let (Some(af), Some(al), Some(bf), Some(bl)) = (
        a.first_chunk::<8>(),
        a.last_chunk::<8>(),
        b.first_chunk::<8>(),
        b.last_chunk::<8>(),
    ) {
        return if a.len() <= 16 {
            u64::from_ne_bytes(*af) == u64::from_ne_bytes(*bf)
                && u64::from_ne_bytes(*al) == u64::from_ne_bytes(*bl)
        } else {
            a == b
        };
    }
    if let (Some(af), Some(al), Some(bf), Some(bl)) = (
        a.first_chunk::<4>(),
        a.last_chunk::<4>(),
        b.first_chunk::<4>(),
        b.last_chunk::<4>(),
    ) {
        return u32::from_ne_bytes(*af) == u32::from_ne_bytes(*bf)
            && u32::from_ne_bytes(*al) == u32::from_ne_bytes(*bl);
    }
    a.iter().zip(b).all(|(x, y)| x == y)
}

/// [`bytes_eq`] over two lists of names.
#[inline]
pub fn names_eq(a: &[String], b: &[String]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| bytes_eq(x.as_bytes(), y.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every length class (under 4, 4 to 7, 8 to 16, longer), equal and differing in one
        /// byte anywhere (the overlapping word compares must cover every byte).
        #[test]
        fn bytes_eq_is_slice_equality(
            a in proptest::collection::vec(any::<u8>(), 0..40),
            flip in any::<proptest::sample::Index>(),
            other in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            prop_assert!(bytes_eq(&a, &a.clone()));
            prop_assert_eq!(bytes_eq(&a, &other), a == other);
            if !a.is_empty() {
                let mut b = a.clone();
                let i = flip.index(b.len());
                b[i] ^= 0x20;
                prop_assert!(!bytes_eq(&a, &b));
            }
        }
    }

    #[test]
    fn lookup_finds_the_first_value_of_a_key() {
        let entries = [
            ("path", "/a"),
            ("remote_address", "10.0.0.1"),
            ("path", "/b"),
        ];
        assert_eq!(lookup(&entries, "path"), Some("/a"));
        assert_eq!(lookup(&entries, "remote_address"), Some("10.0.0.1"));
        assert_eq!(lookup(&entries, "user_agent"), None);
    }
}
