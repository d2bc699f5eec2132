//! `ShouldRateLimit` without prost's structs: [`decode_request`] reads a `RateLimitRequest`'s
//! protobuf bytes straight into a [`limiter::Request`] whose strings borrow those bytes, and
//! [`encode_response`] writes the `RateLimitResponse` bytes straight from the [`Decision`].
//! Decoding allocates nothing for up to [`limiter::INLINE_DESCRIPTORS`] descriptors of up to 4
//! entries (the `SmallVec`s stay inline), encoding nothing but room in its output buffer; prost's path allocates per string,
//! per descriptor and per status.
//!
//! Both are held to prost's behaviour, not just to the happy path: `decode_request` accepts exactly
//! the bytes `RateLimitRequest::decode` accepts and then answers what [`rls::to_request`] answers
//! (the checks are `rls`'s own, shared); `encode_response` writes the bytes of
//! `rls::to_response(d).encode_to_vec()`. The property tests below compare the two paths.
//! Framing, compression and gRPC statuses stay with the server.

use bytes::BufMut;
use smallvec::SmallVec;

use super::rls::{self, BadRequest, Denial, MAX_DESCRIPTORS, MAX_ENTRIES};
use crate::limiter::algorithms::Hits;
use crate::limiter::{self, Decision, Descriptor, ReportedLimit, Status};

/// Why request bytes cannot be decided.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not a `RateLimitRequest` in protobuf's wire format: prost would not decode it either.
    #[error("malformed protobuf in {at}: {problem}")]
    Malformed {
        /// The message being read, such as `RateLimitRequest.descriptors[2].entries[0]`.
        at: String,
        /// What is wrong there.
        problem: &'static str,
    },
    /// Well-formed, but not a request that can be decided: what `to_request` reports.
    #[error(transparent)]
    Invalid(#[from] BadRequest),
}

/// Both are the client's fault, so both are `INVALID_ARGUMENT`. (tonic's prost codec answers
/// `INTERNAL` for bytes it cannot decode; a request Envoy garbled is not our internal error.)
impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// Reads a `RateLimitRequest` from its protobuf bytes, validated and borrowing `buf`.
///
/// Exactly `RateLimitRequest::decode(buf)` then [`rls::to_request`]: prost's wire rules (unknown
/// fields and groups skipped, last scalar wins, repeated `limit`/`hits_addend` messages merged,
/// out-of-range enum numbers kept, 100 levels of nesting at most) and `to_request`'s first error.
///
/// Limits are applied while reading: past [`MAX_DESCRIPTORS`] descriptors, past [`MAX_ENTRIES`]
/// entries, or after the first bad descriptor nothing more is kept or checked, only read to the
/// end. Reading on is not optional: prost rejects malformed bytes anywhere in the buffer before
/// `to_request` sees a field, the error for too many descriptors counts them all, and a later
/// `domain` replaces an earlier one and is checked first. So a huge request costs one pass over
/// its bytes, never a large allocation.
pub fn decode_request(buf: &[u8]) -> Result<limiter::Request<'_>, WireError> {
    // Built in place and moved once: a `Request` is large (its `SmallVec`s are inline).
    let mut p = Parsed::default();
    read_request(buf, &mut p).map_err(|(at, problem)| WireError::Malformed {
        at: at.to_string(),
        problem,
    })?;
    p.judge()?;
    Ok(p.request)
}

/// Appends the protobuf bytes of `rls::to_response(decision)` to `out`, byte for byte as prost
/// would write them (fields in tag order, defaults left out), without building the message.
///
/// Any [`BufMut`]: a reused `BytesMut` (then `split().freeze()` hands h2 a `Bytes` without a
/// copy), a `Vec<u8>`, or a tonic `EncodeBuf` from a custom codec.
pub fn encode_response(decision: &Decision, out: &mut impl BufMut) {
    put_varint_field(out, 1, enum_value(rls::code(decision.over) as i32));
    for s in &decision.statuses {
        put_len_key(out, 2, status_len(s));
        put_status(out, s);
    }
    let Some(denial) = Denial::of(decision) else {
        return;
    };
    if let Some(secs) = denial.retry_after() {
        let value_len = decimal_len(secs);
        put_len_key(
            out,
            3,
            str_field_len(rls::RETRY_AFTER.len()) + str_field_len(value_len),
        );
        put_str_field(out, 1, rls::RETRY_AFTER);
        // A decimal has at least one digit, so prost writes the field.
        put_len_key(out, 2, value_len);
        rls::write_decimal(secs, &mut |piece| out.put_slice(piece.as_bytes()));
    }
    put_len_key(
        out,
        3,
        str_field_len(rls::CONTENT_TYPE.len()) + str_field_len(rls::JSON.len()),
    );
    put_str_field(out, 1, rls::CONTENT_TYPE);
    put_str_field(out, 2, rls::JSON);
    let body_len = denial.body_len();
    if body_len > 0 {
        put_len_key(out, 5, body_len);
        denial.write_body(&mut |piece| out.put_slice(piece.as_bytes()));
    }
}

// ---- Reading ----

/// Protobuf wire types.
const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const I32: u8 = 5;

/// prost's recursion limit: every message level and every group level spends one, and a field
/// read with none left is an error. Top-level fields have all of it.
const RECURSION_LIMIT: u32 = 100;

/// What is wrong with the bytes (prost's wording where it has one).
type Problem = &'static str;
/// A problem and the message it is in.
type Fault = (Path, Problem);

const TRUNCATED: Problem = "buffer underflow";
const BAD_VARINT: Problem = "invalid varint";
const BAD_KEY: Problem = "invalid key value";
const BAD_WIRE_TYPE: Problem = "invalid wire type value";
const BAD_TAG: Problem = "invalid tag value: 0";
const WRONG_WIRE_TYPE: Problem = "invalid wire type for a known field";
const BAD_UTF8: Problem = "invalid string value: data is not UTF-8 encoded";
const BAD_END_GROUP: Problem = "unexpected end group tag";
const TOO_DEEP: Problem = "recursion limit reached";

/// Where a fault is; formatted only when there is one.
#[derive(Debug, Clone, Copy)]
enum Path {
    Request,
    Descriptor(usize),
    Entry(usize, usize),
    Limit(usize),
    HitsAddend(usize),
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RateLimitRequest")?;
        match *self {
            Path::Request => Ok(()),
            Path::Descriptor(i) => write!(f, ".descriptors[{i}]"),
            Path::Entry(i, j) => write!(f, ".descriptors[{i}].entries[{j}]"),
            Path::Limit(i) => write!(f, ".descriptors[{i}].limit"),
            Path::HitsAddend(i) => write!(f, ".descriptors[{i}].hits_addend"),
        }
    }
}

/// The unread rest of one message's bytes.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn has_more(&self) -> bool {
        !self.rest.is_empty()
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], Problem> {
        let n = usize::try_from(n).map_err(|_| TRUNCATED)?;
        let (head, tail) = self.rest.split_at_checked(n).ok_or(TRUNCATED)?;
        self.rest = tail;
        Ok(head)
    }

    /// A base-128 varint of at most 10 bytes; like prost, the 10th may only hold bit 63 and
    /// overlong encodings are accepted.
    fn varint(&mut self) -> Result<u64, Problem> {
        // Keys and lengths of a request are almost all one byte.
        if let Some((&b, rest)) = self.rest.split_first()
            && b < 0x80
        {
            self.rest = rest;
            return Ok(u64::from(b));
        }
        let mut value = 0;
        for (i, &b) in self.rest.iter().take(10).enumerate() {
            value |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                if i == 9 && b > 1 {
                    return Err(BAD_VARINT);
                }
                self.rest = &self.rest[i + 1..];
                return Ok(value);
            }
        }
        Err(BAD_VARINT)
    }

    /// A field key: `(tag, wire type)`, checked as prost checks it.
    fn key(&mut self) -> Result<(u32, u8), Problem> {
        let key = u32::try_from(self.varint()?).map_err(|_| BAD_KEY)?;
        let wire_type = (key & 7) as u8;
        if wire_type > I32 {
            return Err(BAD_WIRE_TYPE);
        }
        let tag = key >> 3;
        if tag == 0 {
            return Err(BAD_TAG);
        }
        Ok((tag, wire_type))
    }

    /// A known scalar field's value: prost takes only the varint wire type for a singular one.
    fn varint_field(&mut self, wire_type: u8) -> Result<u64, Problem> {
        if wire_type != VARINT {
            return Err(WRONG_WIRE_TYPE);
        }
        self.varint()
    }

    /// A known string, bytes or message field's bytes.
    fn len_field(&mut self, wire_type: u8) -> Result<&'a [u8], Problem> {
        if wire_type != LEN {
            return Err(WRONG_WIRE_TYPE);
        }
        let n = self.varint()?;
        self.take(n)
    }

    /// A known string field, borrowed. prost checks every occurrence, not just the last.
    fn str_field(&mut self, wire_type: u8) -> Result<&'a str, Problem> {
        std::str::from_utf8(self.len_field(wire_type)?).map_err(|_| BAD_UTF8)
    }

    /// Skips an unknown field as prost's `skip_field` does, groups included; `budget` is the
    /// recursion left at this level.
    fn skip(&mut self, wire_type: u8, tag: u32, budget: u32) -> Result<(), Problem> {
        if budget == 0 {
            return Err(TOO_DEEP);
        }
        match wire_type {
            VARINT => self.varint().map(drop),
            I64 => self.take(8).map(drop),
            LEN => {
                let n = self.varint()?;
                self.take(n).map(drop)
            }
            START_GROUP => loop {
                let (inner_tag, inner_type) = self.key()?;
                if inner_type == END_GROUP {
                    return if inner_tag == tag {
                        Ok(())
                    } else {
                        Err(BAD_END_GROUP)
                    };
                }
                self.skip(inner_type, inner_tag, budget - 1)?;
            },
            I32 => self.take(4).map(drop),
            // END_GROUP with nothing open; `key` rejected 6 and 7.
            _ => Err(BAD_END_GROUP),
        }
    }
}

/// A request read to its end, not yet judged.
#[derive(Default)]
struct Parsed<'a> {
    /// The domain, and the descriptors that passed their checks while all before them did too.
    request: limiter::Request<'a>,
    hits_addend: u32,
    /// Bit `i`: kept descriptor `i` has no `hits_addend` of its own and takes the request's,
    /// which may still come later in the bytes.
    inherits: u64,
    /// All descriptors, kept or not.
    count: usize,
    /// The first descriptor `to_request` would reject, and why.
    first_bad: Option<BadRequest>,
}

// `Parsed::inherits` has a bit per descriptor that can be kept.
const _: () = assert!(MAX_DESCRIPTORS <= 64);

impl<'a> Parsed<'a> {
    /// `to_request`'s verdict, its checks in its order; if it passes, `request` is the answer.
    fn judge(&mut self) -> Result<(), BadRequest> {
        rls::check_domain(self.request.domain)?;
        rls::check_descriptor_count(self.count)?;
        if let Some(bad) = self.first_bad.take() {
            return Err(bad);
        }
        let request_hits = rls::request_hits(self.hits_addend);
        for (i, d) in self.request.descriptors.iter_mut().enumerate() {
            if self.inherits & (1 << i) != 0 {
                let negative = matches!(d.hits, Hits::Return(_));
                d.hits = rls::descriptor_hits(None, negative, request_hits);
            }
        }
        Ok(())
    }
}

fn read_request<'a>(buf: &'a [u8], p: &mut Parsed<'a>) -> Result<(), Fault> {
    let here = |problem| (Path::Request, problem);
    let mut r = Reader { rest: buf };
    while r.has_more() {
        let (tag, wire_type) = r.key().map_err(here)?;
        match tag {
            1 => p.request.domain = r.str_field(wire_type).map_err(here)?,
            2 => {
                let body = r.len_field(wire_type).map_err(here)?;
                let i = p.count;
                p.count += 1;
                // `to_request` looks at descriptor `i` only if it is within the limit and all
                // before it passed.
                let judge = i < MAX_DESCRIPTORS && p.first_bad.is_none();
                let kept = judge.then_some(&mut p.request.descriptors);
                match read_descriptor(body, i, kept)? {
                    Judged::Kept { inherits: true } => p.inherits |= 1 << i,
                    Judged::Kept { inherits: false } | Judged::Unread => {}
                    Judged::Bad(bad) => {
                        p.request.descriptors.pop();
                        p.first_bad = Some(bad);
                    }
                }
            }
            // prost keeps the low 32 bits of a longer varint; so do we.
            3 => p.hits_addend = r.varint_field(wire_type).map_err(here)? as u32,
            _ => r.skip(wire_type, tag, RECURSION_LIMIT).map_err(here)?,
        }
    }
    Ok(())
}

/// One descriptor, after reading it.
enum Judged {
    /// Valid, and appended; `inherits` when its hits are the request's (set in `Parsed::judge`).
    Kept { inherits: bool },
    /// Invalid, for this reason; appended all the same, for the caller to drop.
    Bad(BadRequest),
    /// Read for well-formedness only: `to_request` would never look at it.
    Unread,
}

/// Reads descriptor `i`. With somewhere to keep it, also judges it as `to_descriptor` does,
/// building it in place there: a `Descriptor` is large, and moving it costs more than reading it.
fn read_descriptor<'a>(
    buf: &'a [u8],
    i: usize,
    kept: Option<&mut SmallVec<[Descriptor<'a>; limiter::INLINE_DESCRIPTORS]>>,
) -> Result<Judged, Fault> {
    let here = |problem| (Path::Descriptor(i), problem);
    // Nested one level below the request's fields.
    let budget = RECURSION_LIMIT - 1;
    let mut r = Reader { rest: buf };
    let mut slot = kept.and_then(|k| {
        k.push(Descriptor {
            entries: SmallVec::new(),
            hits: Hits::Take(0),
            limit_override: None,
        });
        k.last_mut()
    });
    let mut count = 0;
    let mut first_bad_entry = None;
    // Present-but-empty messages count: prost makes them `Some(default)`.
    let mut limit: Option<(u32, i32)> = None;
    let mut own_hits: Option<u64> = None;
    let mut negative = false;
    while r.has_more() {
        let (tag, wire_type) = r.key().map_err(here)?;
        match tag {
            1 => {
                let body = r.len_field(wire_type).map_err(here)?;
                let (key, value) = read_entry(body, i, count, budget - 1)?;
                // Past MAX_ENTRIES the count is the error, so later entries need no check.
                if let Some(d) = slot.as_mut().filter(|_| count < MAX_ENTRIES)
                    && first_bad_entry.is_none()
                {
                    match rls::check_entry(i, count, key, value) {
                        Ok(()) => d.entries.push((key, value)),
                        Err(bad) => first_bad_entry = Some(bad),
                    }
                }
                count += 1;
            }
            2 => {
                let body = r.len_field(wire_type).map_err(here)?;
                let l = limit.get_or_insert((0, 0));
                read_limit(body, l, i, budget - 1)?;
            }
            3 => {
                let body = r.len_field(wire_type).map_err(here)?;
                let h = own_hits.get_or_insert(0);
                read_u64_value(body, h, i, budget - 1)?;
            }
            4 => negative = r.varint_field(wire_type).map_err(here)? != 0,
            _ => r.skip(wire_type, tag, budget).map_err(here)?,
        }
    }
    let Some(d) = slot else {
        return Ok(Judged::Unread);
    };
    // `to_descriptor`'s order: entry count, entries in order, then the override.
    let judged = rls::check_entry_count(i, count)
        .and_then(|()| first_bad_entry.map_or(Ok(()), Err))
        .and_then(|()| {
            limit
                .map(|(requests_per_unit, unit)| rls::limit_override(i, requests_per_unit, unit))
                .transpose()
        });
    Ok(match judged {
        Ok(limit_override) => {
            d.limit_override = limit_override;
            // The request's hits may come later; 0 stands in for them until then.
            d.hits = rls::descriptor_hits(own_hits, negative, 0);
            Judged::Kept {
                inherits: own_hits.is_none(),
            }
        }
        Err(bad) => Judged::Bad(bad),
    })
}

fn read_entry(buf: &[u8], i: usize, j: usize, budget: u32) -> Result<(&str, &str), Fault> {
    let here = |problem| (Path::Entry(i, j), problem);
    let mut r = Reader { rest: buf };
    let (mut key, mut value) = ("", "");
    while r.has_more() {
        let (tag, wire_type) = r.key().map_err(here)?;
        match tag {
            1 => key = r.str_field(wire_type).map_err(here)?,
            2 => value = r.str_field(wire_type).map_err(here)?,
            _ => r.skip(wire_type, tag, budget).map_err(here)?,
        }
    }
    Ok((key, value))
}

/// Merges one `RateLimitOverride` occurrence into `(requests_per_unit, unit)`.
fn read_limit(buf: &[u8], limit: &mut (u32, i32), i: usize, budget: u32) -> Result<(), Fault> {
    let here = |problem| (Path::Limit(i), problem);
    let mut r = Reader { rest: buf };
    while r.has_more() {
        let (tag, wire_type) = r.key().map_err(here)?;
        match tag {
            // Truncated to 32 bits as prost does; an enum keeps any number, `to_request`
            // judges it.
            1 => limit.0 = r.varint_field(wire_type).map_err(here)? as u32,
            2 => limit.1 = r.varint_field(wire_type).map_err(here)? as i32,
            _ => r.skip(wire_type, tag, budget).map_err(here)?,
        }
    }
    Ok(())
}

/// Merges one `google.protobuf.UInt64Value` occurrence into `value`.
fn read_u64_value(buf: &[u8], value: &mut u64, i: usize, budget: u32) -> Result<(), Fault> {
    let here = |problem| (Path::HitsAddend(i), problem);
    let mut r = Reader { rest: buf };
    while r.has_more() {
        let (tag, wire_type) = r.key().map_err(here)?;
        match tag {
            1 => *value = r.varint_field(wire_type).map_err(here)?,
            _ => r.skip(wire_type, tag, budget).map_err(here)?,
        }
    }
    Ok(())
}

// ---- Writing (proto3: a scalar equal to its default is left out; a present message is not) ----

fn varint_len(v: u64) -> usize {
    // 7 bits per byte; 0 takes one byte.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(out: &mut impl BufMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

/// An enum or int32 field's varint: negative numbers take ten bytes, as in prost.
fn enum_value(v: i32) -> u64 {
    i64::from(v) as u64
}

/// Every tag written here is below 16: its key is one byte.
fn key_byte(tag: u8, wire_type: u8) -> u8 {
    (tag << 3) | wire_type
}

fn varint_field_len(v: u64) -> usize {
    if v == 0 { 0 } else { 1 + varint_len(v) }
}

fn put_varint_field(out: &mut impl BufMut, tag: u8, v: u64) {
    if v != 0 {
        out.put_u8(key_byte(tag, VARINT));
        put_varint(out, v);
    }
}

/// A present message, or a string of `len` bytes.
fn len_field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

fn put_len_key(out: &mut impl BufMut, tag: u8, len: usize) {
    out.put_u8(key_byte(tag, LEN));
    put_varint(out, len as u64);
}

fn str_field_len(len: usize) -> usize {
    if len == 0 { 0 } else { len_field_len(len) }
}

fn put_str_field(out: &mut impl BufMut, tag: u8, s: &str) {
    if !s.is_empty() {
        put_len_key(out, tag, s.len());
        out.put_slice(s.as_bytes());
    }
}

fn decimal_len(n: u64) -> usize {
    let mut len = 0;
    rls::write_decimal(n, &mut |piece| len += piece.len());
    len
}

/// `RateLimit`: requests_per_unit = 1, unit = 2, name = 3.
fn rate_limit_len(l: &ReportedLimit) -> usize {
    varint_field_len(u64::from(l.reported.requests_per_unit))
        + varint_field_len(enum_value(rls::proto_unit(l.reported.unit) as i32))
        + str_field_len(l.name.len())
}

/// `google.protobuf.Duration` of whole seconds: seconds = 1 (int64), nanos = 2 (always 0).
fn duration_len(seconds: i64) -> usize {
    varint_field_len(seconds as u64)
}

/// `DescriptorStatus`: code = 1, current_limit = 2, limit_remaining = 3,
/// duration_until_reset = 4 (quota = 5 never set).
fn status_len(s: &Status) -> usize {
    varint_field_len(enum_value(rls::code(s.over) as i32))
        + s.limit
            .as_ref()
            .map_or(0, |l| len_field_len(rate_limit_len(l)))
        + varint_field_len(u64::from(rls::limit_remaining(s)))
        + rls::reset_secs(s).map_or(0, |secs| len_field_len(duration_len(secs)))
}

fn put_status(out: &mut impl BufMut, s: &Status) {
    put_varint_field(out, 1, enum_value(rls::code(s.over) as i32));
    if let Some(l) = &s.limit {
        put_len_key(out, 2, rate_limit_len(l));
        put_varint_field(out, 1, u64::from(l.reported.requests_per_unit));
        put_varint_field(out, 2, enum_value(rls::proto_unit(l.reported.unit) as i32));
        put_str_field(out, 3, l.name);
    }
    put_varint_field(out, 3, u64::from(rls::limit_remaining(s)));
    if let Some(secs) = rls::reset_secs(s) {
        put_len_key(out, 4, duration_len(secs));
        put_varint_field(out, 1, secs as u64);
    }
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::limiter::model::{Reported, Unit};
    use crate::limiter::{Blocked, Request};
    use crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use crate::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
        Entry, RateLimitOverride,
    };
    use crate::proto::envoy::service::ratelimit::v3::RateLimitRequest;
    use crate::service::rls::{MAX_FIELD_BYTES, to_request, to_response};

    // ---- Equivalence ----

    /// Field by field (the limiter's types have no `PartialEq`); destructured so a new field
    /// cannot be forgotten here.
    fn assert_same(expected: &Request<'_>, got: &Request<'_>) -> Result<(), TestCaseError> {
        let Request {
            domain,
            descriptors,
        } = expected;
        prop_assert_eq!(*domain, got.domain);
        prop_assert_eq!(descriptors.len(), got.descriptors.len());
        for (e, g) in descriptors.iter().zip(got.descriptors.iter()) {
            let Descriptor {
                entries,
                hits,
                limit_override,
            } = e;
            prop_assert!(
                same_entries(entries, &g.entries),
                "{entries:?} != {:?}",
                g.entries
            );
            prop_assert_eq!(hits, &g.hits);
            prop_assert_eq!(limit_override, &g.limit_override);
        }
        Ok(())
    }

    /// One lifetime for both sides: the slices are covariant, the `SmallVec`s are not.
    fn same_entries<'a>(a: &[(&'a str, &'a str)], b: &[(&'a str, &'a str)]) -> bool {
        a == b
    }

    /// Every non-empty string of `req` lies inside `buf`: nothing was copied.
    fn assert_borrows(req: &Request<'_>, buf: &[u8]) -> Result<(), TestCaseError> {
        let inside = |s: &str| s.is_empty() || buf.as_ptr_range().contains(&s.as_ptr());
        prop_assert!(inside(req.domain));
        for d in &req.descriptors {
            for (k, v) in &d.entries {
                prop_assert!(inside(k) && inside(v));
            }
        }
        Ok(())
    }

    /// `decode_request(buf)` against prost's decode followed by `to_request`.
    fn check_equivalent(buf: &[u8]) -> Result<(), TestCaseError> {
        let ours = decode_request(buf);
        match RateLimitRequest::decode(buf) {
            Err(prost_error) => prop_assert!(
                matches!(ours, Err(WireError::Malformed { .. })),
                "prost rejects ({prost_error}), we answered {ours:?}"
            ),
            Ok(req) => match (to_request(&req), ours) {
                (Ok(expected), Ok(got)) => {
                    assert_same(&expected, &got)?;
                    assert_borrows(&got, buf)?;
                }
                (Err(expected), Err(WireError::Invalid(got))) => prop_assert_eq!(expected, got),
                (expected, got) => {
                    prop_assert!(false, "to_request: {expected:?}\nwire: {got:?}")
                }
            },
        }
        Ok(())
    }

    /// Strings around every check: empty, short, non-ASCII, and either side of MAX_FIELD_BYTES.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            20 => "[a-z_/.]{1,10}",
            1 => Just(String::new()),
            1 => any::<String>(),
            1 => (MAX_FIELD_BYTES - 2..=MAX_FIELD_BYTES + 2).prop_map(|n| "k".repeat(n)),
            // Two bytes a character: the limit is in bytes.
            1 => (MAX_FIELD_BYTES / 2 - 1..=MAX_FIELD_BYTES / 2 + 1).prop_map(|n| "é".repeat(n)),
        ]
    }

    /// Valid units mostly, then UNKNOWN and beyond, and any number at all.
    fn unit_number() -> impl Strategy<Value = i32> {
        prop_oneof![8 => 1..=6i32, 1 => -1..9i32, 1 => any::<i32>()]
    }

    fn entry() -> impl Strategy<Value = Entry> {
        (text(), text()).prop_map(|(key, value)| Entry { key, value })
    }

    fn descriptor() -> impl Strategy<Value = RateLimitDescriptor> {
        let entries = prop_oneof![
            12 => vec(entry(), 1..6),
            1 => Just(Vec::new()),
            1 => vec(entry(), MAX_ENTRIES - 1..=MAX_ENTRIES + 2),
        ];
        let limit = proptest::option::of(
            (
                prop_oneof![Just(0u32), 1..100u32, any::<u32>()],
                unit_number(),
            )
                .prop_map(|(requests_per_unit, unit)| RateLimitOverride {
                    requests_per_unit,
                    unit,
                }),
        );
        let hits = proptest::option::of(prop_oneof![Just(0u64), 1..5u64, any::<u64>()]);
        (entries, limit, hits, any::<bool>()).prop_map(
            |(entries, limit, hits_addend, is_negative_hits)| RateLimitDescriptor {
                entries,
                limit,
                hits_addend,
                is_negative_hits,
            },
        )
    }

    fn request() -> impl Strategy<Value = RateLimitRequest> {
        let descriptors = prop_oneof![
            12 => vec(descriptor(), 1..6),
            1 => Just(Vec::new()),
            1 => vec(descriptor(), MAX_DESCRIPTORS - 1..=MAX_DESCRIPTORS + 2),
        ];
        let hits = prop_oneof![Just(0u32), 1..5u32, any::<u32>()];
        (text(), descriptors, hits).prop_map(|(domain, descriptors, hits_addend)| {
            RateLimitRequest {
                domain,
                descriptors,
                hits_addend,
            }
        })
    }

    /// Hand-made wire fields, to reach what prost never writes: repeats, unknown fields, groups,
    /// wrong wire types, bad keys.
    #[derive(Debug, Clone)]
    enum Raw {
        Varint(u32, u64),
        I64(u32, u64),
        I32(u32, u32),
        Bytes(u32, Vec<u8>),
        Message(u32, Vec<Raw>),
        Group(u32, Vec<Raw>),
        /// A group closed with another field's end tag.
        MisclosedGroup(u32, u32),
        /// Any key, with nothing after it.
        Key(u64),
    }

    fn put_key(out: &mut Vec<u8>, tag: u32, wire_type: u8) {
        put_varint(out, (u64::from(tag) << 3) | u64::from(wire_type));
    }

    fn encode_raw(fields: &[Raw], out: &mut Vec<u8>) {
        for f in fields {
            match f {
                Raw::Varint(tag, v) => {
                    put_key(out, *tag, VARINT);
                    put_varint(out, *v);
                }
                Raw::I64(tag, v) => {
                    put_key(out, *tag, I64);
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Raw::I32(tag, v) => {
                    put_key(out, *tag, I32);
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Raw::Bytes(tag, b) => {
                    put_key(out, *tag, LEN);
                    put_varint(out, b.len() as u64);
                    out.extend_from_slice(b);
                }
                Raw::Message(tag, inner) => {
                    let mut body = Vec::new();
                    encode_raw(inner, &mut body);
                    put_key(out, *tag, LEN);
                    put_varint(out, body.len() as u64);
                    out.extend_from_slice(&body);
                }
                Raw::Group(tag, inner) => {
                    put_key(out, *tag, START_GROUP);
                    encode_raw(inner, out);
                    put_key(out, *tag, END_GROUP);
                }
                Raw::MisclosedGroup(tag, end) => {
                    put_key(out, *tag, START_GROUP);
                    put_key(out, *end, END_GROUP);
                }
                Raw::Key(k) => put_varint(out, *k),
            }
        }
    }

    fn raw_fields() -> impl Strategy<Value = Vec<Raw>> {
        // Mostly the tags this schema knows, at every level.
        let tag = prop_oneof![12 => 1..=4u32, 2 => 5..20u32, 1 => Just((1u32 << 29) - 1)];
        let varint = prop_oneof![
            0..8u64,
            Just(u64::from(u32::MAX)),
            Just(u64::from(u32::MAX) + 1),
            Just(u64::MAX),
            any::<u64>()
        ];
        let bytes = prop_oneof![
            4 => "[a-z]{0,6}".prop_map(String::into_bytes),
            1 => vec(any::<u8>(), 0..8),
        ];
        let leaf = prop_oneof![
            4 => (tag.clone(), varint).prop_map(|(t, v)| Raw::Varint(t, v)),
            1 => (tag.clone(), any::<u64>()).prop_map(|(t, v)| Raw::I64(t, v)),
            1 => (tag.clone(), any::<u32>()).prop_map(|(t, v)| Raw::I32(t, v)),
            4 => (tag.clone(), bytes).prop_map(|(t, b)| Raw::Bytes(t, b)),
            1 => (tag.clone(), tag.clone()).prop_map(|(t, e)| Raw::MisclosedGroup(t, e)),
            1 => any::<u64>().prop_map(Raw::Key),
            1 => (0..64u64).prop_map(Raw::Key),
        ];
        let field = leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                4 => (tag.clone(), vec(inner.clone(), 0..6)).prop_map(|(t, f)| Raw::Message(t, f)),
                1 => (tag.clone(), vec(inner, 0..4)).prop_map(|(t, f)| Raw::Group(t, f)),
            ]
        });
        vec(field, 0..8)
    }

    /// An unknown field (sometimes a group), for any level.
    fn unknown() -> impl Strategy<Value = Raw> {
        let tag = 5..20u32;
        prop_oneof![
            (tag.clone(), any::<u64>()).prop_map(|(t, v)| Raw::Varint(t, v)),
            (tag.clone(), any::<u64>()).prop_map(|(t, v)| Raw::I64(t, v)),
            (tag.clone(), any::<u32>()).prop_map(|(t, v)| Raw::I32(t, v)),
            (tag.clone(), vec(any::<u8>(), 0..4)).prop_map(|(t, b)| Raw::Bytes(t, b)),
            (tag, vec((1..4u32, any::<u64>()), 0..3)).prop_map(|(t, f)| Raw::Group(
                t,
                f.into_iter().map(|(t, v)| Raw::Varint(t, v)).collect()
            )),
        ]
    }

    fn text_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![8 => text().prop_map(String::into_bytes), 1 => vec(any::<u8>(), 0..4)]
    }

    /// Fields laid out as the schema has them, but in any order, repeated, missing, and mixed
    /// with unknown ones: prost's merging rules at every level.
    fn shaped_fields() -> impl Strategy<Value = Vec<Raw>> {
        // Mostly a key first, so that most requests get past the checks.
        let entry = (
            proptest::option::weighted(0.9, text_bytes().prop_map(|b| Raw::Bytes(1, b))),
            vec(
                prop_oneof![
                    1 => text_bytes().prop_map(|b| Raw::Bytes(1, b)),
                    4 => text_bytes().prop_map(|b| Raw::Bytes(2, b)),
                    1 => unknown(),
                ],
                0..3,
            ),
        )
            .prop_map(|(key, rest)| Raw::Message(1, key.into_iter().chain(rest).collect()));
        let number = prop_oneof![0..10u64, any::<u64>()];
        let limit = vec(
            prop_oneof![
                number.clone().prop_map(|v| Raw::Varint(1, v)),
                unit_number().prop_map(|u| Raw::Varint(2, i64::from(u) as u64)),
                unknown(),
            ],
            0..3,
        )
        .prop_map(|f| Raw::Message(2, f));
        let hits = vec(
            prop_oneof![number.clone().prop_map(|v| Raw::Varint(1, v)), unknown()],
            0..3,
        )
        .prop_map(|f| Raw::Message(3, f));
        let descriptor = vec(
            prop_oneof![
                8 => entry,
                2 => limit,
                2 => hits,
                1 => (0..3u64).prop_map(|v| Raw::Varint(4, v)),
                1 => unknown(),
            ],
            0..6,
        )
        .prop_map(|f| Raw::Message(2, f));
        let domain = || text_bytes().prop_map(|b| Raw::Bytes(1, b));
        (
            proptest::option::weighted(0.9, domain()),
            vec(
                prop_oneof![
                    1 => domain(),
                    6 => descriptor,
                    2 => number.prop_map(|v| Raw::Varint(3, v)),
                    1 => unknown(),
                ],
                0..8,
            ),
        )
            .prop_map(|(domain, rest)| domain.into_iter().chain(rest).collect())
    }

    /// A change to valid bytes: cut short, one byte changed, or bytes slipped in.
    #[derive(Debug, Clone)]
    enum Mutation {
        Truncate(prop::sample::Index),
        Set(prop::sample::Index, u8),
        Insert(prop::sample::Index, Vec<u8>),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            any::<prop::sample::Index>().prop_map(Mutation::Truncate),
            (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
            (any::<prop::sample::Index>(), vec(any::<u8>(), 1..4))
                .prop_map(|(i, b)| Mutation::Insert(i, b)),
        ]
    }

    fn mutate(mut bytes: Vec<u8>, m: &Mutation) -> Vec<u8> {
        if bytes.is_empty() {
            return bytes;
        }
        match m {
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
            Mutation::Set(i, b) => {
                let i = i.index(bytes.len());
                bytes[i] = *b;
            }
            Mutation::Insert(i, b) => {
                let i = i.index(bytes.len());
                bytes.splice(i..i, b.iter().copied());
            }
        }
        bytes
    }

    proptest! {
        #[test]
        fn any_request_prost_writes_decodes_as_to_request_reads_it(req in request()) {
            check_equivalent(&req.encode_to_vec())?;
        }

        #[test]
        fn any_bytes_are_rejected_or_read_as_prost_and_to_request_read_them(
            bytes in vec(any::<u8>(), 0..64)
        ) {
            check_equivalent(&bytes)?;
        }

        #[test]
        fn hand_made_fields_agree_with_prost(fields in raw_fields()) {
            let mut bytes = Vec::new();
            encode_raw(&fields, &mut bytes);
            check_equivalent(&bytes)?;
        }

        #[test]
        fn damaged_requests_agree_with_prost(req in request(), m in mutation()) {
            check_equivalent(&mutate(req.encode_to_vec(), &m))?;
        }

        #[test]
        fn schema_shaped_fields_agree_with_prost(fields in shaped_fields()) {
            check_equivalent(&bytes_of(&fields))?;
        }

        #[test]
        fn repeated_and_unknown_fields_added_to_a_request_agree_with_prost(
            req in request(),
            extra in prop_oneof![shaped_fields(), raw_fields()],
        ) {
            // prost decodes concatenated messages as one, merged.
            let mut bytes = req.encode_to_vec();
            encode_raw(&extra, &mut bytes);
            check_equivalent(&bytes)?;
        }
    }

    fn good_request() -> RateLimitRequest {
        RateLimitRequest {
            domain: "load".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![
                    Entry {
                        key: "path".into(),
                        value: "/bench".into(),
                    },
                    Entry {
                        key: "remote_address".into(),
                        value: "10.0.0.1".into(),
                    },
                ],
                ..Default::default()
            }],
            hits_addend: 0,
        }
    }

    fn checked(bytes: &[u8]) -> Result<Request<'_>, WireError> {
        if let Err(e) = check_equivalent(bytes) {
            panic!("{e}");
        }
        decode_request(bytes)
    }

    // ---- Examples: each also checked against prost ----

    #[test]
    fn small_request_stays_inline_and_borrows_its_strings() {
        let bytes = good_request().encode_to_vec();
        let req = checked(&bytes).unwrap();
        assert!(!req.descriptors.spilled());
        assert!(!req.descriptors[0].entries.spilled());
        assert_eq!(req.descriptors[0].hits, Hits::Take(1));
        assert!(bytes.as_ptr_range().contains(&req.domain.as_ptr()));
    }

    fn bytes_of(fields: &[Raw]) -> Vec<u8> {
        let mut bytes = Vec::new();
        encode_raw(fields, &mut bytes);
        bytes
    }

    fn entry_raw(key: &str, value: &str) -> Raw {
        Raw::Message(
            1,
            vec![Raw::Bytes(1, key.into()), Raw::Bytes(2, value.into())],
        )
    }

    #[test]
    fn a_limit_sent_twice_is_merged_field_by_field() {
        let bytes = bytes_of(&[
            Raw::Bytes(1, b"d".to_vec()),
            Raw::Message(
                2,
                vec![
                    entry_raw("k", "v"),
                    Raw::Message(2, vec![Raw::Varint(1, 7)]),
                    Raw::Message(2, vec![Raw::Varint(2, 2)]),
                ],
            ),
        ]);
        let req = checked(&bytes).unwrap();
        let o = req.descriptors[0].limit_override.unwrap();
        assert_eq!((o.requests_per_unit, o.unit), (7, Unit::Minute));
    }

    #[test]
    fn hits_addend_sent_twice_is_merged_and_an_empty_one_means_zero() {
        let merged = bytes_of(&[
            Raw::Bytes(1, b"d".to_vec()),
            Raw::Message(
                2,
                vec![
                    entry_raw("k", "v"),
                    Raw::Message(3, vec![Raw::Varint(1, 5)]),
                    // Empty: merging leaves 5.
                    Raw::Message(3, vec![]),
                ],
            ),
        ]);
        assert_eq!(checked(&merged).unwrap().descriptors[0].hits, Hits::Take(5));
        let empty = bytes_of(&[
            Raw::Bytes(1, b"d".to_vec()),
            Raw::Message(2, vec![entry_raw("k", "v"), Raw::Message(3, vec![])]),
            Raw::Varint(3, 9),
        ]);
        assert_eq!(checked(&empty).unwrap().descriptors[0].hits, Hits::Take(0));
    }

    #[test]
    fn the_request_hits_may_come_after_the_descriptors_and_the_last_domain_wins() {
        let bytes = bytes_of(&[
            Raw::Bytes(1, b"".to_vec()),
            Raw::Message(2, vec![entry_raw("k", "v"), Raw::Varint(4, 1)]),
            Raw::Varint(3, 3),
            Raw::Bytes(1, b"late".to_vec()),
        ]);
        let req = checked(&bytes).unwrap();
        assert_eq!(req.domain, "late");
        assert_eq!(req.descriptors[0].hits, Hits::Return(3));
    }

    #[test]
    fn unknown_fields_and_groups_are_skipped() {
        let bytes = bytes_of(&[
            Raw::Group(
                9,
                vec![Raw::Varint(1, 1), Raw::Group(10, vec![Raw::I64(2, 0)])],
            ),
            Raw::Bytes(1, b"d".to_vec()),
            Raw::Message(
                2,
                vec![
                    Raw::I32(15, 0),
                    Raw::Message(1, vec![Raw::Bytes(1, b"k".to_vec()), Raw::Group(3, vec![])]),
                ],
            ),
        ]);
        assert_eq!(
            checked(&bytes).unwrap().descriptors[0].entries[0],
            ("k", "")
        );
    }

    #[test]
    fn a_group_must_end_with_its_own_tag() {
        let bytes = bytes_of(&[Raw::Bytes(1, b"d".to_vec()), Raw::MisclosedGroup(9, 10)]);
        assert!(matches!(checked(&bytes), Err(WireError::Malformed { .. })));
    }

    #[test]
    fn known_fields_with_the_wrong_wire_type_are_malformed() {
        for bytes in [
            bytes_of(&[Raw::Varint(1, 1)]),
            bytes_of(&[Raw::Bytes(3, vec![1])]),
            bytes_of(&[Raw::Group(2, vec![])]),
            bytes_of(&[Raw::Message(2, vec![Raw::Bytes(4, vec![1])])]),
        ] {
            assert!(matches!(checked(&bytes), Err(WireError::Malformed { .. })));
        }
    }

    #[test]
    fn invalid_utf8_anywhere_is_malformed_even_when_overwritten() {
        let bytes = bytes_of(&[Raw::Bytes(1, vec![0xff]), Raw::Bytes(1, b"d".to_vec())]);
        let err = checked(&bytes).unwrap_err();
        assert!(err.to_string().starts_with("malformed protobuf"), "{err}");
    }

    #[test]
    fn malformed_bytes_after_an_invalid_request_are_still_malformed() {
        // Too many descriptors, then a truncated field: prost fails before to_request runs.
        let mut fields = vec![Raw::Bytes(1, b"d".to_vec())];
        fields.extend((0..=MAX_DESCRIPTORS).map(|_| Raw::Message(2, vec![entry_raw("k", "v")])));
        fields.push(Raw::Key(u64::from(1u32 << 3 | 2)));
        assert!(matches!(
            checked(&bytes_of(&fields)),
            Err(WireError::Malformed { .. })
        ));
        fields.pop();
        let err = checked(&bytes_of(&fields)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "descriptors: {} descriptors, at most {MAX_DESCRIPTORS} allowed",
                MAX_DESCRIPTORS + 1
            )
        );
    }

    #[test]
    fn a_later_empty_domain_is_reported_before_an_earlier_bad_descriptor() {
        let bytes = bytes_of(&[
            Raw::Bytes(1, b"d".to_vec()),
            Raw::Message(2, vec![entry_raw("", "v")]),
            Raw::Bytes(1, b"".to_vec()),
        ]);
        assert_eq!(
            checked(&bytes).unwrap_err().to_string(),
            "domain: must not be empty"
        );
    }

    /// `depth` groups nested in one another, as field `tag` of a message.
    fn nested_groups(tag: u32, depth: usize) -> Raw {
        let mut g = Raw::Group(tag, vec![Raw::Varint(1, 1)]);
        for _ in 1..depth {
            g = Raw::Group(tag, vec![g]);
        }
        g
    }

    #[test]
    fn group_nesting_stops_where_prosts_recursion_limit_does() {
        for depth in 95..=101 {
            // At the top, in a descriptor and in an entry: each level spends one.
            check_equivalent(&bytes_of(&[
                Raw::Bytes(1, b"d".to_vec()),
                nested_groups(9, depth),
                Raw::Message(2, vec![entry_raw("k", "v")]),
            ]))
            .unwrap();
            check_equivalent(&bytes_of(&[
                Raw::Bytes(1, b"d".to_vec()),
                Raw::Message(2, vec![entry_raw("k", "v"), nested_groups(9, depth)]),
            ]))
            .unwrap();
            check_equivalent(&bytes_of(&[
                Raw::Bytes(1, b"d".to_vec()),
                Raw::Message(
                    2,
                    vec![Raw::Message(
                        1,
                        vec![Raw::Bytes(1, b"k".to_vec()), nested_groups(9, depth)],
                    )],
                ),
            ]))
            .unwrap();
        }
        // And the limit is really reached within that range.
        assert!(RateLimitRequest::decode(bytes_of(&[nested_groups(9, 101)]).as_slice()).is_err());
        assert!(RateLimitRequest::decode(bytes_of(&[nested_groups(9, 99)]).as_slice()).is_ok());
    }

    #[test]
    fn a_ten_byte_varint_may_only_set_bit_63() {
        let mut ok = vec![3 << 3];
        ok.extend_from_slice(&[0xff; 9]);
        ok.push(0x01);
        checked(&ok).unwrap_err();
        let mut bad = ok.clone();
        bad[10] = 0x02;
        assert!(matches!(checked(&bad), Err(WireError::Malformed { .. })));
    }

    // ---- Encoding ----

    /// Names live as long as the test process: a decision borrows them, and a proptest
    /// strategy's values cannot borrow from one another.
    fn name() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            4 => "[a-z /0-9]{0,12}",
            1 => any::<String>(),
            1 => Just("a\"b\\c\u{1}\u{1f}é\n".to_string()),
        ]
        .prop_map(|s| &*s.leak())
    }

    fn nanos() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            1..3_000_000_000u64,
            Just(u64::MAX),
            any::<u64>(),
        ]
    }

    fn count() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            1..200u64,
            Just(u64::from(u32::MAX)),
            Just(u64::from(u32::MAX) + 1),
            any::<u64>(),
        ]
    }

    fn unit() -> impl Strategy<Value = Unit> {
        prop::sample::select(vec![
            Unit::Second,
            Unit::Minute,
            Unit::Hour,
            Unit::Day,
            Unit::Week,
            Unit::Month,
            Unit::Year,
        ])
    }

    fn status() -> impl Strategy<Value = Status<'static>> {
        let limit = proptest::option::of(
            (name(), prop_oneof![Just(0u32), any::<u32>()], unit()).prop_map(
                |(name, requests_per_unit, unit)| ReportedLimit {
                    name,
                    reported: Reported {
                        requests_per_unit,
                        unit,
                    },
                },
            ),
        );
        (any::<bool>(), limit, count(), nanos(), any::<bool>()).prop_map(
            |(over, limit, remaining, reset_after, near)| Status {
                over,
                limit,
                remaining,
                reset_after,
                near,
            },
        )
    }

    fn decision() -> impl Strategy<Value = Decision<'static>> {
        let blocked =
            proptest::option::of((any::<bool>(), nanos()).prop_map(|(permanent, remaining)| {
                Blocked {
                    permanent,
                    remaining,
                }
            }));
        (
            any::<bool>(),
            vec(status(), 0..6),
            proptest::option::of((nanos(), name())),
            blocked,
            prop_oneof![4 => Just(false), 1 => Just(true)],
        )
            .prop_map(|(over, statuses, retry, blocked, unavailable)| Decision {
                over,
                statuses: statuses.into_iter().collect(),
                retry,
                blocked,
                unavailable,
            })
    }

    proptest! {
        #[test]
        fn any_decision_encodes_to_prosts_bytes(d in decision()) {
            let mut ours = Vec::new();
            encode_response(&d, &mut ours);
            prop_assert_eq!(ours, to_response(&d).encode_to_vec());
        }
    }

    #[test]
    fn an_over_limit_answer_encodes_into_bytes_mut() {
        let name = "per \"minute\"";
        let d = Decision {
            over: true,
            statuses: [Status {
                over: true,
                limit: Some(ReportedLimit {
                    name,
                    reported: Reported {
                        requests_per_unit: 10,
                        unit: Unit::Minute,
                    },
                }),
                remaining: 0,
                reset_after: 59_500_000_000,
                near: false,
            }]
            .into_iter()
            .collect(),
            retry: Some((59_500_000_000, name)),
            blocked: None,
            unavailable: false,
        };
        let mut out = bytes::BytesMut::new();
        encode_response(&d, &mut out);
        assert_eq!(out.split().freeze(), to_response(&d).encode_to_vec());
    }

    #[test]
    fn wire_errors_are_invalid_argument() {
        let status = tonic::Status::from(decode_request(&[0xff]).unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
