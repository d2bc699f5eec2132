//! What a config file must pass before it is parsed, so that a hostile or mistaken file is
//! refused in time linear in its size instead of tying up a thread or filling memory:
//!
//! - a size bound on each file ([`MAX_FILE_BYTES`]), checked before it is read
//!   ([`crate::input::read_bounded`]);
//! - a bound on how far YAML anchors and aliases expand it ([`check_aliases`]). serde_yaml's own
//!   limit (at most 100 alias jumps per event of the document) stops the exponential "billion
//!   laughs", but not the quadratic one: one anchor of n items and n aliases to it make n² nodes,
//!   all of which serde_yaml builds, in time and memory quadratic in the file's size.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};

/// Largest config file read, in bytes (each file of a reference directory alike). Real configs
/// are a few kilobytes; this leaves room for generated reference files with tens of thousands
/// of descriptors.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Nodes that aliases may add beyond one per byte of the document: far more than any config
/// that reuses a block of limits through anchors needs.
pub const ALIAS_ALLOWANCE: usize = 100_000;

/// The most nodes a document of `len` bytes may have once its aliases are expanded. Without
/// aliases a document has at most about one node per byte (`{a,b,c}`), so this refuses no
/// document that has none, and parsing one that passes costs no more than parsing an
/// alias-free document of the size bound.
pub fn node_budget(len: usize) -> usize {
    len.saturating_add(ALIAS_ALLOWANCE)
}

/// Refuses a YAML document whose aliases expand it past [`node_budget`] nodes, with the message
/// to show. The walk counts nodes as serde_yaml replays them and stops at the budget, so it
/// costs at most the budget. A document that is not valid YAML passes: the parse that follows
/// reports it with its line.
pub fn check_aliases(text: &str) -> Result<(), String> {
    let budget = node_budget(text.len());
    let seen = Cell::new(0usize);
    let result = Count {
        seen: &seen,
        budget,
    }
    .deserialize(serde_yaml::Deserializer::from_str(text));
    // serde_yaml's own repetition limit may stop the walk first; it is the same refusal.
    let repeated =
        matches!(&result, Err(e) if e.to_string().starts_with("repetition limit exceeded"));
    if seen.get() > budget || repeated {
        return Err(format!(
            "document contains excessive aliasing: its aliases expand it past {budget} nodes (one per byte of the file plus {ALIAS_ALLOWANCE}); refused before parsing"
        ));
    }
    Ok(())
}

/// Counts every node it visits, aliases replayed, and fails once past `budget`.
#[derive(Clone, Copy)]
struct Count<'c> {
    seen: &'c Cell<usize>,
    budget: usize,
}

impl Count<'_> {
    fn one<E: de::Error>(self) -> Result<(), E> {
        let n = self.seen.get().saturating_add(1);
        self.seen.set(n);
        if n > self.budget {
            return Err(E::custom("alias budget exceeded"));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Count<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Count<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.one()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.one()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.one()
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.one()
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.one()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.one()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.one()
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<(), E> {
        self.one()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.one()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.one()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.one()?;
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.one()?;
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.one()?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.one()?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }
    // A tagged node (`!tag value`): the tag, then the value it tags.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        self.one()?;
        let ((), variant) = data.variant_seed(self)?;
        de::VariantAccess::newtype_variant_seed(variant, self)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The exponential bomb: nine levels of nine aliases each, 10⁹ strings.
    fn billion_laughs() -> String {
        let mut s = String::from("a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
        let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
        for w in names.windows(2) {
            let refs = vec![format!("*{}", w[0]); 9].join(", ");
            s.push_str(&format!("{}: &{} [{refs}]\n", w[1], w[1]));
        }
        s
    }

    /// The quadratic bomb: one anchor of `n` items, `n` aliases to it.
    fn quadratic(n: usize) -> String {
        let mut s = String::from("a: &a\n");
        s.push_str(&"  - x\n".repeat(n));
        s.push_str("b:\n");
        s.push_str(&"  - *a\n".repeat(n));
        s
    }

    #[test]
    fn both_kinds_of_alias_bomb_are_refused() {
        for text in [billion_laughs(), quadratic(10_000)] {
            let err = check_aliases(&text).unwrap_err();
            assert!(err.contains("excessive aliasing"), "{err}");
        }
    }

    #[test]
    fn documents_without_aliases_or_with_modest_ones_pass() {
        check_aliases("domains:\n  - name: a\n").unwrap();
        // Dense flow collections: about one node per byte, and no aliases.
        let dense = format!("[{}]", vec!["{a,b}"; 50_000].join(","));
        check_aliases(&dense).unwrap();
        // A block of limits reused through an anchor, a thousand times.
        let mut reuse = String::from("x: &l [1/second, 10/minute, 100/hour]\ny:\n");
        reuse.push_str(&"  - *l\n".repeat(1000));
        check_aliases(&reuse).unwrap();
        check_aliases(&quadratic(100)).unwrap();
    }

    #[test]
    fn invalid_yaml_is_left_to_the_parser() {
        check_aliases("a: [1, 2\n").unwrap();
        check_aliases("a: *undefined\n").unwrap();
        check_aliases("- !tag {a: *x}\n").unwrap();
    }
}
