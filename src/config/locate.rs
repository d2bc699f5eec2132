//! Finds the line of a field path in a YAML text, so errors found after parsing (a duplicate
//! endpoint, a burst without a refill rate) point at the line to fix just like parse errors do.
//!
//! serde_yaml keeps no positions in parsed values, but it attaches the position of the node
//! being read to any error raised while reading it. So we walk the document along the path with
//! a deserializer that raises an error on arrival, and read the position off that error.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// A map key.
    Field(String),
    /// A sequence index.
    Index(usize),
}

/// Renders a path the way serde_yaml does: `domains[1].endpoints[0].limits[1]`.
pub fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Field(f) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(f);
            }
            Seg::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    out
}

const ARRIVED: &str = "sluice-locate-arrived";

/// The 1-based line where the node at `path` starts, if the path exists in `text`.
pub fn line_of(text: &str, path: &[Seg]) -> Option<usize> {
    let de = serde_yaml::Deserializer::from_str(text);
    match (Seek { path }).deserialize(de) {
        Err(e) if e.to_string().contains(ARRIVED) => e.location().map(|l| l.line()),
        _ => None,
    }
}

struct Seek<'p> {
    path: &'p [Seg],
}

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.path.split_first() {
            None => d.deserialize_any(Arrive),
            Some((Seg::Field(name), rest)) => d.deserialize_any(InMap { name, rest }),
            Some((Seg::Index(i), rest)) => d.deserialize_any(InSeq { index: *i, rest }),
        }
    }
}

struct Arrive;

impl<'de> Visitor<'de> for Arrive {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any node")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(ARRIVED))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(ARRIVED))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(ARRIVED))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(ARRIVED))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(ARRIVED))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(ARRIVED))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(ARRIVED))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(ARRIVED))
    }
}

struct InMap<'p> {
    name: &'p str,
    rest: &'p [Seg],
}

impl<'de> Visitor<'de> for InMap<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == self.name {
                return map.next_value_seed(Seek { path: self.rest });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

struct InSeq<'p> {
    index: usize,
    rest: &'p [Seg],
}

impl<'de> Visitor<'de> for InSeq<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        loop {
            if i == self.index {
                return seq.next_element_seed(Seek { path: self.rest }).map(|_| ());
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "domains:\n  - name: a\n    endpoints:\n      - path: /x\n      - path: /y\n        burst: 3\n";

    fn f(s: &str) -> Seg {
        Seg::Field(s.into())
    }

    #[test]
    fn finds_the_line_of_nested_fields() {
        let path = [
            f("domains"),
            Seg::Index(0),
            f("endpoints"),
            Seg::Index(1),
            f("burst"),
        ];
        assert_eq!(line_of(DOC, &path), Some(6));
        let path = [
            f("domains"),
            Seg::Index(0),
            f("endpoints"),
            Seg::Index(1),
            f("path"),
        ];
        assert_eq!(line_of(DOC, &path), Some(5));
        assert_eq!(render(&path), "domains[0].endpoints[1].path");
    }

    #[test]
    fn missing_paths_have_no_line() {
        assert_eq!(line_of(DOC, &[f("nope")]), None);
        assert_eq!(line_of(DOC, &[f("domains"), Seg::Index(7)]), None);
    }
}
