//! The three counting algorithms, as pure functions of `(policy, state, now, hits)`.
//!
//! Nothing here reads a clock, locks or allocates: a store loads a key's [`CellState`], calls
//! [`evaluate`] and decides whether to write the new state back (it writes nothing when any limit
//! of the request is over, see [`crate::store`]). The same functions run in every store, so the
//! memory and Redis backends cannot disagree about a decision.
//!
//! Time is in nanoseconds since the epoch (`u64`), arithmetic in `u128` where products could
//! overflow, and everything saturates so that a clock stepping backwards cannot panic.

mod fixed_window;
mod sliding_window;
mod token_bucket;

use std::num::NonZeroU64;

/// How one limit counts. Built from config (or a descriptor's limit override); cannot be invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Weighted two-window counter (Cloudflare's "sliding window"): the previous aligned window's
    /// count, weighted by how much of it still overlaps the sliding window, plus the current one.
    SlidingWindow {
        /// Hits admitted per window.
        limit: u64,
        /// Window length in nanoseconds.
        window: NonZeroU64,
    },
    /// Windows aligned to the epoch, as envoyproxy/ratelimit counts.
    FixedWindow {
        /// Hits admitted per window.
        limit: u64,
        /// Window length in nanoseconds.
        window: NonZeroU64,
    },
    /// A token bucket of `capacity` tokens refilled one token every `interval` nanoseconds,
    /// implemented as GCRA (one timestamp of state instead of a count and a time).
    TokenBucket {
        /// Tokens the bucket holds when full: the burst.
        capacity: u64,
        /// Nanoseconds to refill one token.
        interval: NonZeroU64,
    },
}

impl Policy {
    /// Hits admitted per window, or the bucket's capacity.
    pub fn capacity(&self) -> u64 {
        match *self {
            Policy::SlidingWindow { limit, .. } | Policy::FixedWindow { limit, .. } => limit,
            Policy::TokenBucket { capacity, .. } => capacity,
        }
    }

    /// The algorithm's name as written in config.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Policy::SlidingWindow { .. } => Algorithm::SlidingWindow,
            Policy::FixedWindow { .. } => Algorithm::FixedWindow,
            Policy::TokenBucket { .. } => Algorithm::TokenBucket,
        }
    }
}

/// The algorithm of a limit, without its numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// See [`Policy::SlidingWindow`].
    #[default]
    SlidingWindow,
    /// See [`Policy::FixedWindow`].
    FixedWindow,
    /// See [`Policy::TokenBucket`].
    TokenBucket,
}

impl Algorithm {
    /// The name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::TokenBucket => "token_bucket",
        }
    }
}

/// A key's stored state: two words whose meaning belongs to the algorithm that wrote them.
/// Compact on purpose: memory per tracked client is a headline number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CellState {
    /// Sliding/fixed window: the window index. Token bucket: the theoretical arrival time.
    pub a: u64,
    /// Sliding window: previous count (high 32 bits) and current count (low 32 bits).
    /// Fixed window: the count. Token bucket: unused.
    pub b: u64,
}

/// Hits a request adds to (or gives back to) a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hits {
    /// Consume this many; `Take(0)` checks without consuming.
    Take(u64),
    /// Give this many back (Envoy's `is_negative_hits`); never denied.
    Return(u64),
}

/// The result of evaluating one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Whether this limit admits the hits.
    pub allowed: bool,
    /// The state to store if the whole request is admitted.
    pub state: CellState,
    /// When `state` stops mattering (nanoseconds since the epoch): the key may be dropped then.
    pub expires_at: u64,
    /// Single hits still admissible after this evaluation's hits (if `allowed`) or now (if not).
    pub remaining: u64,
    /// Nanoseconds until the limit resets: the end of the current window, or until a bucket is
    /// full. When not allowed: until the same request would be admitted.
    pub reset_after: u64,
}

/// Evaluates `hits` against one limit at `now`; `state` is `None` for a key never seen (or
/// expired). Pure: the caller decides whether to keep [`Outcome::state`].
pub fn evaluate(policy: &Policy, state: Option<CellState>, now: u64, hits: Hits) -> Outcome {
    match *policy {
        Policy::SlidingWindow { limit, window } => {
            sliding_window::evaluate(limit, window.get(), state, now, hits)
        }
        Policy::FixedWindow { limit, window } => {
            fixed_window::evaluate(limit, window.get(), state, now, hits)
        }
        Policy::TokenBucket { capacity, interval } => {
            token_bucket::evaluate(capacity, interval.get(), state, now, hits)
        }
    }
}

/// Saturating `u128 -> u64`.
fn sat(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// The window holding `now` and how far into it `now` is: `(now / w, now % w)`, given the
/// window a counter was `stored` in.
///
/// A counter is nearly always read in the window it was written in, or the next: then the
/// window's start is a multiplication away, and the hardware divide (tens of cycles, the
/// costliest instruction of a decision) is not needed.
#[inline]
pub(super) fn window_of(now: u64, w: u64, stored: Option<u64>) -> (u64, u64) {
    if let Some(a) = stored
        && let Some(start) = a.checked_mul(w)
        && let Some(into) = now.checked_sub(start)
    {
        if into < w {
            return (a, into);
        }
        // `into >= w`, so window `a + 1` starts at or before `now` and its index fits.
        if into - w < w {
            return (a.saturating_add(1), into - w);
        }
    }
    (now / w, now % w)
}

/// `a / b` with a 64-bit division when both fit (a 128-bit one is a library call).
#[inline]
fn div_u128(a: u128, b: u128) -> u128 {
    match (u64::try_from(a), u64::try_from(b)) {
        (Ok(a), Ok(b)) => u128::from(a.checked_div(b).unwrap_or(0)),
        _ => a.checked_div(b).unwrap_or(0),
    }
}

/// Counts are stored in 32 bits; limits never exceed `u32::MAX` (Envoy's `requests_per_unit`).
fn clamp32(v: u64) -> u64 {
    v.min(u64::from(u32::MAX))
}

#[cfg(test)]
mod proptests;
