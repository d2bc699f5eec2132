//! Endpoint path templates and request-path matching.
//!
//! This module owns the endpoint path templates written in the config
//! (`/api/training/execute`, `/api/training/cancel/{job_id}`, `/api/{*rest}`)
//! and the [`PathRouter`] that maps a raw HTTP `:path` to the endpoint it
//! belongs to.
//!
//! Normalisation matters because this is a rate limiter: if
//! `/api//training/./execute` or `/api/training/exec%75te` reaches the upstream
//! as `/api/training/execute` but did not match the `execute` endpoint here, a
//! client could dodge its limit just by spelling the path differently. So
//! [`PathRouter::lookup`] normalises the way Envoy's `normalize_path` +
//! `merge_slashes` would: the query string and fragment (from the first `?` or
//! `#`) are dropped, empty and `.` segments are ignored, `..` removes the
//! previous segment (never climbing above the root), escaped dots (`%2e`) count
//! as dots, and percent-encoded bytes compare decoded (`%2F` decodes to `/`
//! inside a segment but never splits it; invalid escapes compare literally).
//! Comparison is otherwise byte-exact and case-sensitive.
//!
//! # Template grammar
//!
//! A template starts with `/` and is split on `/`, ignoring empty segments
//! (`/a//b/` is `/a/b`; `/` alone matches only the root). Each segment is
//! literal text, `{name}` (exactly one path segment) or `{*name}` (a catch-all
//! for one or more remaining segments; last only), with `name` matching
//! `[A-Za-z_][A-Za-z0-9_]*`. Partial segments (`file.{ext}`), `?`, `#`,
//! repeated names and `.`/`..` segments are rejected. Literals may contain
//! percent escapes; they compare decoded, like request paths.
//!
//! # Precedence
//!
//! Decided segment by segment: a literal beats `{param}`, which beats
//! `{*catchall}`. If the more specific branch dead-ends later, lookup backtracks,
//! so `/a/b/d` matches `/a/{x}/d` even when `/a/b/c` exists.
//!
//! # Cost
//!
//! Lookup never allocates. A short path without `.` or `%` (the common case)
//! is walked lazily in one pass; any other path is first resolved into a stack
//! array of [`MAX_PATH_SEGMENTS`] segment slices, and a path whose normalised
//! form would need more never matches any endpoint.

use std::fmt;
use std::str::FromStr;

use xxhash_rust::xxh3::xxh3_64;

/// Request paths whose normalised form has more segments than this never match.
///
/// The limit keeps [`PathRouter::lookup`] allocation-free (segments are
/// collected into a fixed stack array). Real API paths are far shorter.
pub const MAX_PATH_SEGMENTS: usize = 64;

/// Why an endpoint path template was rejected by [`PathTemplate::parse`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template does not start with `/`.
    #[error("must start with '/'")]
    MissingLeadingSlash,
    /// The template contains `?` or `#`.
    #[error("contains a query string or fragment")]
    QueryOrFragment,
    /// A `{}` or `{*}` segment without a name.
    #[error("empty parameter name in segment {segment:?}")]
    EmptyParamName {
        /// The offending segment.
        segment: String,
    },
    /// A parameter name that is not `[A-Za-z_][A-Za-z0-9_]*`.
    #[error(
        "invalid parameter name in segment {segment:?}: names must match [A-Za-z_][A-Za-z0-9_]*"
    )]
    InvalidParamName {
        /// The offending segment.
        segment: String,
    },
    /// A `{*name}` catch-all that is followed by more segments.
    #[error("catch-all {segment} must be the last segment")]
    CatchAllNotLast {
        /// The catch-all segment, e.g. `{*rest}`.
        segment: String,
    },
    /// A segment such as `file.{ext}` that mixes literal text and a parameter.
    #[error("segment mixes text and a parameter: {segment:?}")]
    MixedSegment {
        /// The offending segment.
        segment: String,
    },
    /// A segment with a lone `{` or `}`.
    #[error("unbalanced brace in segment {segment:?}")]
    UnbalancedBrace {
        /// The offending segment.
        segment: String,
    },
    /// The same parameter name used twice in one template.
    #[error("duplicate parameter name {name:?}")]
    DuplicateParam {
        /// The repeated name.
        name: String,
    },
    /// A `.` or `..` segment (also escaped, e.g. `%2e`), which could never
    /// match because request paths are normalised first.
    #[error(
        "dot segment {segment:?} can never match: request paths are normalised before matching"
    )]
    DotSegment {
        /// The offending segment.
        segment: String,
    },
}

/// One parsed template segment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Literal text, stored percent-decoded so it compares like request segments.
    Literal(Box<[u8]>),
    /// `{name}`: exactly one non-empty path segment.
    Param(Box<str>),
    /// `{*name}`: one or more remaining path segments.
    CatchAll(Box<str>),
}

impl Segment {
    fn param_name(&self) -> Option<&str> {
        match self {
            Segment::Literal(_) => None,
            Segment::Param(name) | Segment::CatchAll(name) => Some(name),
        }
    }
}

/// A parsed endpoint path template such as `/api/training/cancel/{job_id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    source: Box<str>,
    segments: Box<[Segment]>,
}

impl PathTemplate {
    /// Parses a template; see the module docs for the grammar.
    pub fn parse(s: &str) -> Result<PathTemplate, TemplateError> {
        if !s.starts_with('/') {
            return Err(TemplateError::MissingLeadingSlash);
        }
        if s.contains(['?', '#']) {
            return Err(TemplateError::QueryOrFragment);
        }
        let mut segments: Vec<Segment> = Vec::new();
        let mut parts = s.split('/').filter(|part| !part.is_empty()).peekable();
        while let Some(part) = parts.next() {
            let segment = parse_segment(part)?;
            if let Some(name) = segment.param_name() {
                if matches!(segment, Segment::CatchAll(_)) && parts.peek().is_some() {
                    return Err(TemplateError::CatchAllNotLast {
                        segment: part.to_owned(),
                    });
                }
                if segments.iter().any(|seen| seen.param_name() == Some(name)) {
                    return Err(TemplateError::DuplicateParam {
                        name: name.to_owned(),
                    });
                }
            }
            segments.push(segment);
        }
        Ok(PathTemplate {
            source: s.into(),
            segments: segments.into_boxed_slice(),
        })
    }

    /// The template text exactly as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PathTemplate {
    type Err = TemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PathTemplate::parse(s)
    }
}

fn parse_segment(part: &str) -> Result<Segment, TemplateError> {
    if let Some(inner) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
        let (catch_all, name) = match inner.strip_prefix('*') {
            Some(name) => (true, name),
            None => (false, inner),
        };
        if name.is_empty() {
            return Err(TemplateError::EmptyParamName {
                segment: part.to_owned(),
            });
        }
        if !is_valid_param_name(name) {
            return Err(TemplateError::InvalidParamName {
                segment: part.to_owned(),
            });
        }
        return Ok(if catch_all {
            Segment::CatchAll(name.into())
        } else {
            Segment::Param(name.into())
        });
    }
    if part.contains('{') && part.contains('}') {
        return Err(TemplateError::MixedSegment {
            segment: part.to_owned(),
        });
    }
    if part.contains(['{', '}']) {
        return Err(TemplateError::UnbalancedBrace {
            segment: part.to_owned(),
        });
    }
    if dot_kind(part.as_bytes()) != DotKind::None {
        return Err(TemplateError::DotSegment {
            segment: part.to_owned(),
        });
    }
    Ok(Segment::Literal(Decoded::new(part.as_bytes()).collect()))
}

fn is_valid_param_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Why [`PathRouter::insert`] refused a template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    /// An equivalent template (same literals, parameters in the same places,
    /// whatever their names) is already present.
    #[error("duplicate endpoint {new:?}: same shape as {existing:?}")]
    Duplicate {
        /// The template already in the router, as written.
        existing: String,
        /// The template being inserted, as written.
        new: String,
    },
}

/// A value together with the template text it was inserted under.
#[derive(Debug, Clone)]
struct Entry<T> {
    template: Box<str>,
    value: T,
}

/// One trie node: the segments matched so far lead here.
#[derive(Debug, Clone)]
struct Node<T> {
    /// Literal children keyed by percent-decoded bytes (sorted, unique).
    literals: Vec<(Box<[u8]>, Node<T>)>,
    /// The `{param}` child, if any template has a parameter here.
    param: Option<Box<Node<T>>>,
    /// A `{*catchall}` ending here: matches one or more further segments.
    catch_all: Option<Entry<T>>,
    /// A template that ends exactly here.
    end: Option<Entry<T>>,
}

impl<T> Node<T> {
    const fn new() -> Self {
        Node {
            literals: Vec::new(),
            param: None,
            catch_all: None,
            end: None,
        }
    }

    fn literal_child_mut(&mut self, key: Box<[u8]>) -> &mut Node<T> {
        let index = match self.literals.binary_search_by(|(k, _)| (**k).cmp(&key)) {
            Ok(index) => index,
            Err(index) => {
                self.literals.insert(index, (key, Node::new()));
                index
            }
        };
        &mut self.literals[index].1
    }

    /// The literal child equal to the (raw, possibly escaped) path segment.
    ///
    /// A linear scan: sibling literals are few, and slice equality rejects
    /// keys of the wrong length before comparing bytes.
    fn literal_child(&self, segment: &[u8]) -> Option<&Node<T>> {
        let found = if segment.contains(&b'%') {
            self.literals
                .iter()
                .find(|(key, _)| key.iter().copied().eq(Decoded::new(segment)))
        } else {
            self.literals.iter().find(|(key, _)| **key == *segment)
        };
        found.map(|(_, node)| node)
    }

    /// Most-specific-first walk: literal, then parameter, then catch-all,
    /// backtracking when a branch dead-ends. Each node sits at a fixed depth,
    /// so a lookup visits every node at most once.
    ///
    /// `segments` yields the normalised segments; cloning it is the backtrack
    /// point.
    fn find<'p, I>(&self, mut segments: I) -> Option<&T>
    where
        I: Iterator<Item = &'p [u8]> + Clone,
    {
        let Some(first) = segments.next() else {
            return self.end.as_ref().map(|entry| &entry.value);
        };
        if let Some(value) = self
            .literal_child(first)
            .and_then(|child| child.find(segments.clone()))
        {
            return Some(value);
        }
        if let Some(value) = self.param.as_deref().and_then(|child| child.find(segments)) {
            return Some(value);
        }
        self.catch_all.as_ref().map(|entry| &entry.value)
    }
}

/// Maps endpoint path templates to values (in practice, endpoint indices).
#[derive(Debug, Clone)]
pub struct PathRouter<T> {
    root: Node<T>,
    len: usize,
    /// Every all-literal template in its canonical form (`/a/b`), by xxh3 hash, with its value:
    /// a request path spelled exactly so (most are) is answered by one hash and one compare
    /// instead of a walk of the trie. The trie answers everything else, and would give the same
    /// answer for these (a literal is the most specific match of its own spelling).
    exact: Vec<(u64, Box<[u8]>, T)>,
}

impl<T> Default for PathRouter<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> PathRouter<T> {
    /// An empty router.
    pub const fn new() -> Self {
        PathRouter {
            root: Node::new(),
            len: 0,
            exact: Vec::new(),
        }
    }

    /// The value of the all-literal template spelled exactly `path` (query already stripped).
    fn exact_match(&self, path: &[u8]) -> Option<&T> {
        if self.exact.is_empty() {
            return None;
        }
        let hash = xxh3_64(path);
        let start = self.exact.partition_point(|(h, _, _)| *h < hash);
        self.exact
            .get(start..)?
            .iter()
            .take_while(|(h, _, _)| *h == hash)
            .find(|(_, key, _)| crate::entries::bytes_eq(key, path))
            .map(|(_, _, value)| value)
    }

    /// Adds a template; fails if one of the same shape (same literals,
    /// parameters in the same places, regardless of names) is already present.
    pub fn insert(&mut self, template: PathTemplate, value: T) -> Result<(), RouterError>
    where
        T: Clone,
    {
        let PathTemplate { source, segments } = template;
        let canonical = segments
            .iter()
            .try_fold(Vec::new(), |mut path, segment| match segment {
                // Only literals a plain request segment can spell: a decoded `/` (from `%2F`),
                // `%`, `.`, `?` or `#` would make the canonical form mean something else.
                Segment::Literal(key)
                    if !key.is_empty() && !key.iter().any(|b| b"/%.?#".contains(b)) =>
                {
                    path.push(b'/');
                    path.extend_from_slice(key);
                    Some(path)
                }
                _ => None,
            })
            .map(|path| if path.is_empty() { b"/".to_vec() } else { path });
        let mut node = &mut self.root;
        let mut ends_in_catch_all = false;
        for segment in segments {
            match segment {
                Segment::Literal(key) => node = node.literal_child_mut(key),
                Segment::Param(_) => node = node.param.get_or_insert_with(Box::default),
                // The parser guarantees a catch-all is the last segment.
                Segment::CatchAll(_) => {
                    ends_in_catch_all = true;
                    break;
                }
            }
        }
        let slot = if ends_in_catch_all {
            &mut node.catch_all
        } else {
            &mut node.end
        };
        if let Some(existing) = slot {
            return Err(RouterError::Duplicate {
                existing: existing.template.to_string(),
                new: source.into_string(),
            });
        }
        if let Some(path) = canonical {
            let hash = xxh3_64(&path);
            let at = self.exact.partition_point(|(h, _, _)| *h <= hash);
            self.exact
                .insert(at, (hash, path.into_boxed_slice(), value.clone()));
        }
        *slot = Some(Entry {
            template: source,
            value,
        });
        self.len += 1;
        Ok(())
    }

    /// The value of the most specific template matching `raw_path`, if any.
    ///
    /// `raw_path` is an HTTP `:path` as received (query string, fragment,
    /// `//`, `/./`, `..` and percent escapes allowed); it is normalised as
    /// described in the module docs without allocating. A missing leading `/`
    /// is tolerated. Paths needing more than [`MAX_PATH_SEGMENTS`] normalised
    /// segments return `None`.
    pub fn lookup(&self, raw_path: &str) -> Option<&T> {
        // One pass: find where the query/fragment starts, and whether the
        // path could hold a dot segment (`.`, `..`, `%2e`).
        let bytes = raw_path.as_bytes();
        let mut end = bytes.len();
        let mut plain = true;
        for (index, &byte) in bytes.iter().enumerate() {
            match byte {
                b'?' | b'#' => {
                    end = index;
                    break;
                }
                b'.' | b'%' => plain = false,
                _ => {}
            }
        }
        let path = bytes.get(..end).unwrap_or_default();
        if plain && let Some(value) = self.exact_match(path) {
            return Some(value);
        }
        // Fast path, the common case: without dot segments the non-empty
        // pieces are the normalised segments, so they can be walked lazily.
        // A path this short cannot exceed the segment limit (each segment
        // takes a byte plus a separator), so both paths agree on it.
        if plain && path.len() <= 2 * MAX_PATH_SEGMENTS {
            return self.root.find(non_empty_segments(path));
        }
        let mut buf: [&[u8]; MAX_PATH_SEGMENTS] = [&[]; MAX_PATH_SEGMENTS];
        let segments = normalise(path, &mut buf)?;
        self.root.find(segments.iter().copied())
    }

    /// Number of templates in the router.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the router holds no templates.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// The non-empty `/`-separated pieces of `path`.
fn non_empty_segments(path: &[u8]) -> impl Iterator<Item = &[u8]> + Clone {
    path.split(|&b| b == b'/')
        .filter(|segment| !segment.is_empty())
}

/// Resolves the segments of `path` (query already stripped) into `buf`,
/// dropping `.` and applying `..`; `None` if they do not fit.
fn normalise<'p, 'b>(path: &'p [u8], buf: &'b mut [&'p [u8]]) -> Option<&'b [&'p [u8]]> {
    let mut len = 0;
    for segment in non_empty_segments(path) {
        match dot_kind(segment) {
            DotKind::Dot => {}
            DotKind::DotDot => len = usize::saturating_sub(len, 1),
            DotKind::None => {
                *buf.get_mut(len)? = segment;
                len += 1;
            }
        }
    }
    buf.get(..len)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DotKind {
    None,
    Dot,
    DotDot,
}

/// Classifies a segment as `.` or `..`, escaped dots (`%2e`, `%2E`) included.
fn dot_kind(segment: &[u8]) -> DotKind {
    // Longest dot segment is `%2e%2e`; anything else must start with '.' or '%'.
    if segment.len() > 6 || !matches!(segment.first(), Some(b'.' | b'%')) {
        return DotKind::None;
    }
    let mut decoded = Decoded::new(segment);
    match (decoded.next(), decoded.next(), decoded.next()) {
        (Some(b'.'), None, _) => DotKind::Dot,
        (Some(b'.'), Some(b'.'), None) => DotKind::DotDot,
        _ => DotKind::None,
    }
}

/// Iterates the bytes of a segment with valid `%XX` escapes decoded; invalid
/// escapes come through literally.
#[derive(Debug, Clone)]
struct Decoded<'a> {
    rest: &'a [u8],
}

impl<'a> Decoded<'a> {
    fn new(segment: &'a [u8]) -> Self {
        Decoded { rest: segment }
    }
}

impl Iterator for Decoded<'_> {
    type Item = u8;

    #[inline]
    fn next(&mut self) -> Option<u8> {
        let (&first, tail) = self.rest.split_first()?;
        if first == b'%'
            && let [hi, lo, after @ ..] = tail
            && let (Some(hi), Some(lo)) = (hex_value(*hi), hex_value(*lo))
        {
            self.rest = after;
            return Some(hi << 4 | lo);
        }
        self.rest = tail;
        Some(first)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let len = self.rest.len();
        (len.div_ceil(3), Some(len))
    }
}

const fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn router_of(templates: &[&str]) -> PathRouter<usize> {
        let mut router = PathRouter::new();
        for (index, template) in templates.iter().enumerate() {
            router
                .insert(PathTemplate::parse(template).unwrap(), index)
                .unwrap();
        }
        router
    }

    #[test]
    fn exact_spellings_take_the_short_cut_and_agree_with_the_trie() {
        let router = router_of(&["/a/b", "/a/{x}", "/a%2Fb", "/", "/v1.2/x", "/c/d"]);
        // Answered by the exact table.
        assert_eq!(router.lookup("/a/b"), Some(&0));
        assert_eq!(router.lookup("/a/b?q=1"), Some(&0));
        assert_eq!(router.lookup("/"), Some(&3));
        assert_eq!(router.lookup("/c/d"), Some(&5));
        // Not in it (other spellings, or literals a plain path cannot spell): the trie answers.
        assert_eq!(router.lookup("//a//b/"), Some(&0));
        assert_eq!(router.lookup("/a/c"), Some(&1));
        assert_eq!(router.lookup("/a%2Fb"), Some(&2));
        assert_eq!(router.lookup("/v1.2/x"), Some(&4));
        assert_eq!(router.lookup("/c/d/e"), None);
        let mut exact: Vec<&[u8]> = router.exact.iter().map(|(_, k, _)| &**k).collect();
        exact.sort();
        assert_eq!(
            exact,
            [&b"/"[..], b"/a/b", b"/c/d"],
            "/a/b, / and /c/d only"
        );
    }

    const TRAINING: &[&str] = &[
        "/api/training/execute",
        "/api/training/cancel/{job_id}",
        "/api/training/{job_id}/force-start",
        "/api/{*rest}",
        "/",
    ];

    // ---- template parsing ----

    #[test]
    fn template_keeps_its_text_and_displays_it() {
        let template = PathTemplate::parse("/api//training/{job_id}/").unwrap();
        assert_eq!(template.as_str(), "/api//training/{job_id}/");
        assert_eq!(template.to_string(), "/api//training/{job_id}/");
        assert_eq!("/a/{b}".parse::<PathTemplate>().unwrap().as_str(), "/a/{b}");
    }

    #[test]
    fn template_must_start_with_slash() {
        assert_eq!(
            PathTemplate::parse("api/x"),
            Err(TemplateError::MissingLeadingSlash)
        );
        assert_eq!(
            PathTemplate::parse(""),
            Err(TemplateError::MissingLeadingSlash)
        );
        assert_eq!(
            TemplateError::MissingLeadingSlash.to_string(),
            "must start with '/'"
        );
    }

    #[test]
    fn template_rejects_query_and_fragment() {
        assert_eq!(
            PathTemplate::parse("/a?b=c"),
            Err(TemplateError::QueryOrFragment)
        );
        assert_eq!(
            PathTemplate::parse("/a#top"),
            Err(TemplateError::QueryOrFragment)
        );
    }

    #[test]
    fn template_rejects_bad_parameters() {
        let err = PathTemplate::parse("/a/{}").unwrap_err();
        assert_eq!(err.to_string(), "empty parameter name in segment \"{}\"");
        assert!(matches!(
            PathTemplate::parse("/a/{*}"),
            Err(TemplateError::EmptyParamName { .. })
        ));
        for bad in ["/{1x}", "/{a-b}", "/{*a b}", "/{a}{b}", "/{é}"] {
            assert!(
                matches!(
                    PathTemplate::parse(bad),
                    Err(TemplateError::InvalidParamName { .. })
                ),
                "{bad}"
            );
        }
        assert!(PathTemplate::parse("/{_x9}/{*Rest_2}").is_ok());
    }

    #[test]
    fn catch_all_must_be_last() {
        let err = PathTemplate::parse("/a/{*rest}/b").unwrap_err();
        assert_eq!(
            err.to_string(),
            "catch-all {*rest} must be the last segment"
        );
        assert!(PathTemplate::parse("/a/{*rest}/").is_ok());
    }

    #[test]
    fn partial_segments_are_rejected() {
        let err = PathTemplate::parse("/files/file.{ext}").unwrap_err();
        assert_eq!(
            err.to_string(),
            "segment mixes text and a parameter: \"file.{ext}\""
        );
        assert!(matches!(
            PathTemplate::parse("/a{b}"),
            Err(TemplateError::MixedSegment { .. })
        ));
        assert!(matches!(
            PathTemplate::parse("/a/{b"),
            Err(TemplateError::UnbalancedBrace { .. })
        ));
        assert!(matches!(
            PathTemplate::parse("/a/}"),
            Err(TemplateError::UnbalancedBrace { .. })
        ));
    }

    #[test]
    fn duplicate_parameter_names_are_rejected() {
        let err = PathTemplate::parse("/a/{x}/b/{x}").unwrap_err();
        assert_eq!(err.to_string(), "duplicate parameter name \"x\"");
        assert!(matches!(
            PathTemplate::parse("/{x}/{*x}"),
            Err(TemplateError::DuplicateParam { .. })
        ));
    }

    #[test]
    fn dot_segments_in_templates_are_rejected() {
        for bad in ["/a/./b", "/a/..", "/a/%2e", "/a/.%2E/b"] {
            assert!(
                matches!(
                    PathTemplate::parse(bad),
                    Err(TemplateError::DotSegment { .. })
                ),
                "{bad}"
            );
        }
        assert!(PathTemplate::parse("/a/.well-known/...").is_ok());
    }

    // ---- router construction ----

    #[test]
    fn same_shape_with_other_param_names_is_a_duplicate() {
        let mut router = router_of(&["/api/training/cancel/{job_id}"]);
        let err = router
            .insert(PathTemplate::parse("/api/training/cancel/{id}").unwrap(), 9)
            .unwrap_err();
        assert_eq!(
            err,
            RouterError::Duplicate {
                existing: "/api/training/cancel/{job_id}".into(),
                new: "/api/training/cancel/{id}".into(),
            }
        );
        assert_eq!(
            err.to_string(),
            "duplicate endpoint \"/api/training/cancel/{id}\": \
             same shape as \"/api/training/cancel/{job_id}\""
        );
        assert_eq!(router.len(), 1);
    }

    #[test]
    fn equivalent_spellings_are_duplicates() {
        let mut router = router_of(&["/a/b", "/x/{*rest}"]);
        for template in ["/a//b/", "/%61/b", "/x/{*tail}"] {
            assert!(
                router
                    .insert(PathTemplate::parse(template).unwrap(), 7)
                    .is_err(),
                "{template}"
            );
        }
        // A parameter and a catch-all in the same place are different shapes.
        router
            .insert(PathTemplate::parse("/x/{one}").unwrap(), 2)
            .unwrap();
        assert_eq!(router.len(), 3);
    }

    #[test]
    fn empty_router_matches_nothing() {
        let router: PathRouter<usize> = PathRouter::default();
        assert!(router.is_empty());
        assert_eq!(router.len(), 0);
        assert_eq!(router.lookup("/"), None);
        assert_eq!(router.lookup("/a"), None);
    }

    // ---- lookup ----

    #[test]
    fn exact_literal_matches() {
        let router = router_of(TRAINING);
        assert_eq!(router.len(), TRAINING.len());
        assert_eq!(router.lookup("/api/training/execute"), Some(&0));
    }

    #[test]
    fn job_ids_share_the_cancel_template() {
        let router = router_of(TRAINING);
        assert_eq!(router.lookup("/api/training/cancel/job-1"), Some(&1));
        assert_eq!(router.lookup("/api/training/cancel/42"), Some(&1));
        assert_eq!(router.lookup("/api/training/job-7/force-start"), Some(&2));
    }

    #[test]
    fn query_string_is_ignored() {
        let router = router_of(TRAINING);
        assert_eq!(router.lookup("/api/training/execute?x=1/y"), Some(&0));
        assert_eq!(router.lookup("/api/training/execute#frag"), Some(&0));
        assert_eq!(router.lookup("/api/training/execute?"), Some(&0));
        assert_eq!(router.lookup("/?a=/api/training/execute"), Some(&4));
    }

    #[test]
    fn trailing_slash_and_double_slash_match() {
        let router = router_of(TRAINING);
        assert_eq!(router.lookup("/api/training/execute/"), Some(&0));
        assert_eq!(router.lookup("//api///training//execute//"), Some(&0));
        assert_eq!(router.lookup("/api/training/cancel//j1/"), Some(&1));
    }

    #[test]
    fn dot_segments_are_resolved() {
        let router = router_of(TRAINING);
        assert_eq!(router.lookup("/api/./training/./execute/."), Some(&0));
        assert_eq!(router.lookup("/api/other/../training/execute"), Some(&0));
        assert_eq!(router.lookup("/api/training/execute/x/y/../.."), Some(&0));
        assert_eq!(router.lookup("/api/%2e%2E/api/training/execute"), Some(&0));
        assert_eq!(router.lookup("/api/training/%2e/execute"), Some(&0));
        // Not dot segments: ordinary literals.
        assert_eq!(router.lookup("/api/training/.../execute"), Some(&3));
        assert_eq!(router.lookup("/api/training/..execute"), Some(&3));
    }

    #[test]
    fn dot_dot_cannot_escape_root() {
        let router = router_of(TRAINING);
        assert_eq!(router.lookup("/../../api/training/execute"), Some(&0));
        assert_eq!(
            router.lookup("/api/../../../api/training/execute"),
            Some(&0)
        );
        assert_eq!(router.lookup("/.."), Some(&4));
        assert_eq!(router.lookup("/api/.."), Some(&4));
    }

    #[test]
    fn percent_encoded_literal_matches() {
        let router = router_of(TRAINING);
        assert_eq!(router.lookup("/api/training/exec%75te"), Some(&0));
        assert_eq!(router.lookup("/%61%70%69/training/execute"), Some(&0));
        assert_eq!(router.lookup("/api/training/%63ancel/j1"), Some(&1));
        // Hex digits are case-insensitive, the decoded text is not.
        assert_eq!(router.lookup("/api/training/exec%7Ete"), Some(&3));
        assert_eq!(router.lookup("/api/training/EXECUTE"), Some(&3));
    }

    #[test]
    fn percent_encoded_template_literal_matches_plain_path() {
        let router = router_of(&["/a%20b/c"]);
        assert_eq!(router.lookup("/a%20b/c"), Some(&0));
        assert_eq!(router.lookup("/a b/c"), Some(&0));
        assert_eq!(router.lookup("/a+b/c"), None);
    }

    #[test]
    fn encoded_slash_does_not_split_segments() {
        let router = router_of(&["/a/b/c", "/a/{x}"]);
        assert_eq!(router.lookup("/a/b%2Fc"), Some(&1));
        assert_eq!(router.lookup("/a/b%2fc"), Some(&1));
        assert_eq!(router.lookup("/a/b/c"), Some(&0));
    }

    #[test]
    fn invalid_escapes_compare_literally() {
        let router = router_of(&["/a/%zz", "/b/%", "/c/%4"]);
        assert_eq!(router.lookup("/a/%zz"), Some(&0));
        assert_eq!(router.lookup("/a/%25zz"), Some(&0));
        assert_eq!(router.lookup("/b/%"), Some(&1));
        assert_eq!(router.lookup("/c/%4"), Some(&2));
        assert_eq!(router.lookup("/c/%34"), None);
    }

    #[test]
    fn matching_is_case_sensitive() {
        let router = router_of(&["/Api/x"]);
        assert_eq!(router.lookup("/Api/x"), Some(&0));
        assert_eq!(router.lookup("/api/x"), None);
        assert_eq!(router.lookup("/API/X"), None);
    }

    #[test]
    fn root_template_matches_only_root() {
        let router = router_of(&["/", "/a"]);
        assert_eq!(router.lookup("/"), Some(&0));
        assert_eq!(router.lookup("//"), Some(&0));
        assert_eq!(router.lookup("/?q"), Some(&0));
        assert_eq!(router.lookup("/a/.."), Some(&0));
        assert_eq!(router.lookup("/b"), None);
    }

    #[test]
    fn missing_leading_slash_is_tolerated() {
        let router = router_of(TRAINING);
        assert_eq!(router.lookup("api/training/execute"), Some(&0));
        assert_eq!(router.lookup(""), Some(&4));
    }

    #[test]
    fn literal_beats_parameter() {
        let router = router_of(&["/a/{x}", "/a/b", "/{*rest}"]);
        assert_eq!(router.lookup("/a/b"), Some(&1));
        assert_eq!(router.lookup("/a/c"), Some(&0));
        // Insertion order does not matter.
        let router = router_of(&["/a/b", "/a/{x}"]);
        assert_eq!(router.lookup("/a/b"), Some(&0));
        assert_eq!(router.lookup("/a/c"), Some(&1));
    }

    #[test]
    fn parameter_beats_catch_all() {
        let router = router_of(&["/a/{*rest}", "/a/{x}"]);
        assert_eq!(router.lookup("/a/b"), Some(&1));
        assert_eq!(router.lookup("/a/b/c"), Some(&0));
    }

    #[test]
    fn backtracks_to_parameter_branch() {
        let router = router_of(&["/a/b/c", "/a/{x}/d"]);
        assert_eq!(router.lookup("/a/b/c"), Some(&0));
        assert_eq!(router.lookup("/a/b/d"), Some(&1));
        assert_eq!(router.lookup("/a/b/e"), None);
    }

    #[test]
    fn backtracks_to_catch_all() {
        let router = router_of(&["/a/b/c", "/a/{x}/d", "/a/{*rest}"]);
        assert_eq!(router.lookup("/a/b/e"), Some(&2));
        assert_eq!(router.lookup("/a/b"), Some(&2));
        assert_eq!(router.lookup("/a/b/c/d"), Some(&2));
    }

    #[test]
    fn catch_all_needs_at_least_one_segment() {
        let router = router_of(&["/api/{*rest}"]);
        assert_eq!(router.lookup("/api"), None);
        assert_eq!(router.lookup("/api/"), None);
        assert_eq!(router.lookup("/api/x/.."), None);
        assert_eq!(router.lookup("/api/x"), Some(&0));
        assert_eq!(router.lookup("/api/x/y/z"), Some(&0));
    }

    #[test]
    fn too_many_segments_never_match() {
        let router = router_of(&["/{*rest}"]);
        let fits = "/s".repeat(MAX_PATH_SEGMENTS);
        assert_eq!(router.lookup(&fits), Some(&0));
        let too_long = "/s".repeat(MAX_PATH_SEGMENTS + 1);
        assert_eq!(router.lookup(&too_long), None);
        // Long segments take the buffered path; the limit is the same.
        assert_eq!(router.lookup(&"/ssss".repeat(MAX_PATH_SEGMENTS)), Some(&0));
        assert_eq!(router.lookup(&"/ssss".repeat(MAX_PATH_SEGMENTS + 1)), None);
        // Only the normalised depth counts.
        let resolved = format!("{}{}", "/s/..".repeat(1000), "/s");
        assert_eq!(router.lookup(&resolved), Some(&0));
        let empty = "/".repeat(10_000);
        assert_eq!(router.lookup(&empty), None);
    }

    #[test]
    fn non_ascii_paths_match_bytewise() {
        let router = router_of(&["/café/{x}"]);
        assert_eq!(router.lookup("/café/ü"), Some(&0));
        assert_eq!(router.lookup("/caf%C3%A9/ü"), Some(&0));
        assert_eq!(router.lookup("/cafe/ü"), None);
    }

    // ---- property tests ----

    use proptest::prelude::*;

    /// A template segment as generated by the property tests.
    #[derive(Debug, Clone, Copy)]
    enum Gen {
        /// Template spelling and decoded spelling.
        Lit(&'static str, &'static str),
        Param,
        CatchAll,
    }

    /// Literals used in generated templates, with their decoded spelling.
    const LITERALS: &[(&str, &str)] = &[
        ("a", "a"),
        ("b", "b"),
        ("api", "api"),
        ("x.y", "x.y"),
        ("exec%75te", "execute"),
    ];

    fn gen_template() -> impl Strategy<Value = Vec<Gen>> {
        let segment = prop_oneof![
            4 => prop::sample::select(LITERALS).prop_map(|(raw, decoded)| Gen::Lit(raw, decoded)),
            2 => Just(Gen::Param),
        ];
        (prop::collection::vec(segment, 0..5), any::<bool>()).prop_map(|(mut segs, catch_all)| {
            if catch_all {
                segs.push(Gen::CatchAll);
            }
            segs
        })
    }

    fn template_text(segs: &[Gen]) -> String {
        let mut out = String::new();
        for (i, seg) in segs.iter().enumerate() {
            out.push('/');
            match seg {
                Gen::Lit(raw, _) => out.push_str(raw),
                Gen::Param => out.push_str(&format!("{{p{i}}}")),
                Gen::CatchAll => out.push_str(&format!("{{*rest{i}}}")),
            }
        }
        if out.is_empty() {
            out.push('/');
        }
        out
    }

    /// Independent, allocating reference decoder.
    fn ref_decode(s: &str) -> Vec<u8> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%'
                && i + 2 < b.len()
                && b[i + 1].is_ascii_hexdigit()
                && b[i + 2].is_ascii_hexdigit()
            {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }

    /// Independent, allocating reference normaliser.
    fn ref_normalise(path: &str) -> Option<Vec<Vec<u8>>> {
        let end = path.find(['?', '#']).unwrap_or(path.len());
        let mut out: Vec<Vec<u8>> = Vec::new();
        for seg in path[..end].split('/').filter(|s| !s.is_empty()) {
            let decoded = ref_decode(seg);
            if decoded == b"." {
                continue;
            }
            if decoded == b".." {
                out.pop();
                continue;
            }
            out.push(decoded);
            if out.len() > MAX_PATH_SEGMENTS {
                return None;
            }
        }
        Some(out)
    }

    /// Rank sequence of `template` if it matches `segs` (lower is more specific).
    fn ref_rank(template: &[Gen], segs: &[Vec<u8>]) -> Option<Vec<u8>> {
        let mut rank = Vec::new();
        for (i, seg) in template.iter().enumerate() {
            match seg {
                Gen::Lit(raw, _) => {
                    if segs.get(i)? != &ref_decode(raw) {
                        return None;
                    }
                    rank.push(0);
                }
                Gen::Param => {
                    segs.get(i)?;
                    rank.push(1);
                }
                Gen::CatchAll => {
                    return (segs.len() > i).then(|| {
                        rank.push(2);
                        rank
                    });
                }
            }
        }
        (segs.len() == template.len()).then_some(rank)
    }

    /// Reference lookup: the matching template with the smallest rank sequence.
    fn ref_lookup(templates: &[(Vec<Gen>, usize)], path: &str) -> Option<usize> {
        let segs = ref_normalise(path)?;
        templates
            .iter()
            .filter_map(|(t, value)| ref_rank(t, &segs).map(|rank| (rank, *value)))
            .min()
            .map(|(_, value)| value)
    }

    fn build_router(templates: &[Vec<Gen>]) -> (PathRouter<usize>, Vec<(Vec<Gen>, usize)>) {
        let mut router = PathRouter::new();
        let mut inserted = Vec::new();
        for (value, segs) in templates.iter().enumerate() {
            let template = PathTemplate::parse(&template_text(segs)).unwrap();
            if router.insert(template, value).is_ok() {
                inserted.push((segs.clone(), value));
            }
        }
        (router, inserted)
    }

    /// Builds a concrete path for `template`, spelled with noise that
    /// normalisation must undo, driven by `noise` bytes.
    fn concrete_path(template: &[Gen], values: &[String], noise: &[u8]) -> String {
        let mut noise = noise.iter().copied().cycle();
        let mut next = move || noise.next().unwrap_or(0);
        let mut out = String::new();
        for (i, seg) in template.iter().enumerate() {
            let n = next();
            decorate(&mut out, n);
            out.push('/');
            let value = &values[i % values.len()];
            match seg {
                // Spell the decoded text, escaping some characters at random.
                Gen::Lit(_, decoded) => {
                    for ch in decoded.chars() {
                        if next() % 4 == 0 && ch.is_ascii_alphanumeric() {
                            if next() % 2 == 0 {
                                out.push_str(&format!("%{:02X}", ch as u32));
                            } else {
                                out.push_str(&format!("%{:02x}", ch as u32));
                            }
                        } else {
                            out.push(ch);
                        }
                    }
                }
                Gen::Param => out.push_str(value),
                Gen::CatchAll => {
                    let extra = (n >> 4) % 3;
                    out.push_str(value);
                    for _ in 0..extra {
                        out.push('/');
                        out.push_str(value);
                    }
                }
            }
        }
        let n = next();
        decorate(&mut out, n);
        if n & 8 != 0 {
            out.push('/');
        }
        if n & 16 != 0 {
            out.push_str("?q=/api/a#frag");
        }
        if out.is_empty() {
            out.push('/');
        }
        out
    }

    /// Adds empty, `.` and `x/..` segments that normalisation must drop.
    fn decorate(out: &mut String, n: u8) {
        if n & 1 != 0 {
            out.push('/');
        }
        if n & 2 != 0 {
            out.push_str("/.");
        }
        if n & 4 != 0 {
            out.push_str("/junk/%2E%2e");
        }
    }

    /// Parameter values: never literals of generated templates, never dots.
    fn gen_values() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec("v[A-Za-z0-9_~:@!$&'()*+,;=-]{0,6}", 1..4)
    }

    /// Request paths built from the bytes that matter to normalisation.
    fn gen_raw_path() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            prop::sample::select(
                &[
                    "a",
                    "b",
                    "api",
                    "x.y",
                    "execute",
                    "exec%75te",
                    "%61",
                    "%2e",
                    "%2E%2e",
                    ".",
                    "..",
                    "",
                    "v1",
                    "%2F",
                    "%",
                    "%zz",
                    "%4",
                    "é",
                    "?",
                    "#",
                    "{x}",
                ][..]
            )
            .prop_map(str::to_owned),
            "[a-z%./]{0,4}",
        ];
        (any::<bool>(), prop::collection::vec(piece, 0..10)).prop_map(|(lead, pieces)| {
            let joined = pieces.join("/");
            if lead { format!("/{joined}") } else { joined }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_strings_never_panic(path in any::<String>(), template in any::<String>()) {
            let router = router_of(TRAINING);
            let _ = router.lookup(&path);
            let _ = PathTemplate::parse(&template);
            let _ = PathTemplate::parse(&format!("/{template}"));
        }

        #[test]
        fn path_shaped_strings_never_panic(
            path in "[/.%2eEfF?#{}*abé]{0,40}",
            template in "[/.%2eEfF?#{}*abé]{0,40}",
        ) {
            let router = router_of(TRAINING);
            let _ = router.lookup(&path);
            if let Ok(template) = PathTemplate::parse(&template) {
                let mut router = PathRouter::new();
                router.insert(template.clone(), 0).unwrap();
                prop_assert_eq!(PathTemplate::parse(template.as_str()), Ok(template));
                let _ = router.lookup(&path);
            }
        }

        #[test]
        fn substituted_template_matches_its_own_value(
            template in gen_template(),
            values in gen_values(),
            noise in prop::collection::vec(any::<u8>(), 1..16),
        ) {
            let mut router = PathRouter::new();
            router.insert(PathTemplate::parse(&template_text(&template)).unwrap(), 7).unwrap();
            let path = concrete_path(&template, &values, &noise);
            prop_assert_eq!(router.lookup(&path), Some(&7), "path {}", path);
        }

        #[test]
        fn lookup_agrees_with_reference_on_substituted_paths(
            templates in prop::collection::vec(gen_template(), 1..12),
            values in gen_values(),
            noise in prop::collection::vec(any::<u8>(), 1..16),
        ) {
            let (router, inserted) = build_router(&templates);
            prop_assert_eq!(router.len(), inserted.len());
            for (template, value) in &inserted {
                let path = concrete_path(template, &values, &noise);
                let expected = ref_lookup(&inserted, &path);
                prop_assert_eq!(router.lookup(&path).copied(), expected, "path {}", path);
                // Without a catch-all, fresh parameter values cannot be
                // claimed by any other template.
                if !matches!(template.last(), Some(Gen::CatchAll)) {
                    prop_assert_eq!(expected, Some(*value), "path {}", path);
                }
            }
        }

        #[test]
        fn lookup_agrees_with_reference_on_raw_paths(
            templates in prop::collection::vec(gen_template(), 1..12),
            paths in prop::collection::vec(gen_raw_path(), 1..16),
        ) {
            let (router, inserted) = build_router(&templates);
            for path in &paths {
                prop_assert_eq!(
                    router.lookup(path).copied(),
                    ref_lookup(&inserted, path),
                    "path {}", path
                );
            }
        }
    }
}
