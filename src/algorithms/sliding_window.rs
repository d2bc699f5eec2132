//! The weighted two-window counter. The estimate of hits in the sliding window ending now is
//! `prev * (w - elapsed) / w + curr`, where `prev` and `curr` count the previous and current
//! epoch-aligned windows. It needs two counters per key instead of a log of timestamps.
//!
//! What it guarantees: no aligned window admits more than `limit`, and no span of one window
//! length admits more than `2 * limit` (when the previous window's hits bunched at its end; the
//! estimate assumes they were spread evenly). Use `fixed_window` or `token_bucket` for exact
//! bounds.
//!
//! Arithmetic is scaled by `w` to stay in integers: `used = prev * (w - elapsed) + curr * w`, and
//! a request of `h` hits is admitted when `used + h * w <= limit * w`.

use super::{CellState, Hits, Outcome, clamp32, sat, window_of};

pub(super) fn evaluate(
    limit: u64,
    w: u64,
    state: Option<CellState>,
    now: u64,
    hits: Hits,
) -> Outcome {
    let (mut idx, mut elapsed) = window_of(now, w, state.map(|s| s.a));
    let (prev, curr) = match state {
        None => (0, 0),
        Some(s) => {
            let (p, c) = (s.b >> 32, s.b & u64::from(u32::MAX));
            if s.a == idx {
                (p, c)
            } else if s.a.checked_add(1) == Some(idx) {
                (c, 0)
            } else if s.a > idx {
                // The clock stepped back: stay in the newer window, counting the previous one
                // in full (the conservative choice).
                idx = s.a;
                elapsed = 0;
                (p, c)
            } else {
                (0, 0)
            }
        }
    };
    let wide = u128::from(w);
    let cap = u128::from(limit) * wide;
    let used = |p: u64, c: u64| u128::from(p) * u128::from(w - elapsed) + u128::from(c) * wide;

    let (allowed, p2, c2, retry) = match hits {
        Hits::Take(h) => {
            if used(prev, curr) + u128::from(h) * wide <= cap {
                (true, prev, curr + h, 0)
            } else {
                (
                    false,
                    prev,
                    curr,
                    retry_after(limit, w, elapsed, prev, curr, h),
                )
            }
        }
        Hits::Return(h) => {
            let c2 = curr.saturating_sub(h);
            let rest = h - (curr - c2);
            (true, prev.saturating_sub(rest), c2, 0)
        }
    };
    Outcome {
        allowed,
        state: CellState {
            a: idx,
            b: (clamp32(p2) << 32) | clamp32(c2),
        },
        expires_at: idx.saturating_add(2).saturating_mul(w),
        remaining: remaining(limit, w, elapsed, p2, c2),
        reset_after: if allowed { w - elapsed } else { retry },
    }
}

/// Single hits left: `(limit * w - used) / w` (at least 0) with `used = prev * (w - elapsed) +
/// curr * w`, which is `limit - curr - ceil(prev * (w - elapsed) / w)`. Without a previous count
/// that needs no division; with one, a 64-bit one when the product fits (a 128-bit division is
/// a library call).
#[inline]
fn remaining(limit: u64, w: u64, elapsed: u64, prev: u64, curr: u64) -> u64 {
    let room = limit.saturating_sub(curr);
    if prev == 0 {
        return room;
    }
    let weight = w - elapsed;
    let faded = match prev.checked_mul(weight) {
        Some(b) => b.div_ceil(w),
        None => sat((u128::from(prev) * u128::from(weight)).div_ceil(u128::from(w))),
    };
    room.saturating_sub(faded)
}

/// Nanoseconds from now until `h` hits would be admitted, given they are not admitted now.
fn retry_after(limit: u64, w: u64, elapsed: u64, prev: u64, curr: u64, h: u64) -> u64 {
    let wide = u128::from(w);
    let to_window_end = w - elapsed;
    if h > limit {
        // Never admissible; the best we can say is when every counted hit has aged out.
        return to_window_end.saturating_add(w);
    }
    // Later in this window: need prev * (w - e) <= (limit - curr - h) * w.
    if let Some(room) = limit.checked_sub(curr).and_then(|r| r.checked_sub(h))
        && prev > 0
    {
        let max_weight = u128::from(room) * wide / u128::from(prev);
        // e >= w - max_weight; elapsed is already short of that (we were denied).
        let e_needed = wide.saturating_sub(max_weight);
        if e_needed < wide {
            return sat(e_needed).saturating_sub(elapsed).max(1);
        }
    }
    // In the next window `curr` becomes the previous count: need curr * (w - e) <= (limit - h) * w.
    let e_next = if curr == 0 {
        0
    } else {
        wide.saturating_sub(u128::from(limit - h) * wide / u128::from(curr))
    };
    to_window_end.saturating_add(sat(e_next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What `evaluate` answered before the divisions were taken off the common path: the window
    /// by plain division (the stored one when the clock stepped back), and the remaining count
    /// by plain division from the counts `o` stored.
    fn by_division(
        limit: u64,
        w: u64,
        state: Option<CellState>,
        now: u64,
        o: &Outcome,
    ) -> (u64, u64) {
        let window = state.map_or(now / w, |s| s.a.max(now / w));
        let elapsed = if window == now / w { now % w } else { 0 };
        let (p, c) = (o.state.b >> 32, o.state.b & u64::from(u32::MAX));
        let wide = u128::from(w);
        let used = u128::from(p) * u128::from(w - elapsed) + u128::from(c) * wide;
        (
            window,
            sat((u128::from(limit) * wide).saturating_sub(used) / wide),
        )
    }

    proptest! {
        #[test]
        fn window_and_remaining_equal_the_division(
            limit in prop_oneof![0u64..20, Just(u64::from(u32::MAX)), Just(4_000_000_000u64)],
            w_secs in prop_oneof![1u64..4, Just(60u64), Just(3_600), Just(86_400), Just(31_536_000)],
            idx in any::<u64>(),
            stored in prop_oneof![Just(None), (0u64..3, 0u64..(1 << 32), 0u64..(1 << 32)).prop_map(Some)],
            back in any::<bool>(),
            into in any::<u64>(),
            h in 0u64..5,
        ) {
            let w = w_secs * S;
            // Up to the last whole window before `u64::MAX` nanoseconds.
            let idx = idx % (u64::MAX / w - 1);
            let now = idx * w + into % w;
            // A counter written this window, the last one, two ago, or (clock stepped back) the next.
            let state = stored.map(|(ago, p, c)| CellState {
                a: if back { idx + 1 } else { idx.saturating_sub(ago) },
                b: (p << 32) | c,
            });
            let o = evaluate(limit, w, state, now, Hits::Take(h));
            let (window, remaining) = by_division(limit, w, state, now, &o);
            prop_assert_eq!(o.remaining, remaining);
            prop_assert_eq!(o.state.a, window);
        }
    }

    const S: u64 = 1_000_000_000;
    const W: u64 = 60 * S;

    fn take(limit: u64, state: Option<CellState>, now: u64, h: u64) -> Outcome {
        evaluate(limit, W, state, now, Hits::Take(h))
    }

    #[test]
    fn tenth_passes_eleventh_waits_for_the_previous_window_to_fade() {
        let t0 = 600 * S; // aligned to a window start
        let mut st = None;
        for i in 0..10 {
            let o = take(10, st, t0, 1);
            assert!(o.allowed, "request {i}");
            assert_eq!(o.remaining, 9 - i);
            assert_eq!(o.reset_after, W);
            st = Some(o.state);
        }
        let o = take(10, st, t0 + 10 * S, 1);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 0);
        // Next window starts at +60 s with prev = 10: 10 * (60 - e) / 60 + 1 <= 10 needs e >= 6 s.
        assert_eq!(o.reset_after, 50 * S + 6 * S);
        assert!(!take(10, st, t0 + 65 * S, 1).allowed);
        let ok = take(10, st, t0 + 66 * S, 1);
        assert!(ok.allowed);
        assert_eq!(ok.remaining, 0);
    }

    #[test]
    fn previous_window_weight_fades_linearly() {
        // 10 hits in window 0; at 30 s into window 1 the estimate is 5.
        let o = take(10, None, 0, 10);
        let half = take(10, Some(o.state), W + 30 * S, 0);
        assert_eq!(half.remaining, 5);
        let much_later = take(10, Some(o.state), 3 * W, 0);
        assert_eq!(much_later.remaining, 10);
    }

    #[test]
    fn retry_within_the_current_window_when_prev_fades_enough() {
        // prev = 10, curr = 0 at e = 0: denied; admitted once 10*(60-e)/60 + 1 <= 10, e = 6 s.
        let o = take(10, None, 0, 10);
        let denied = take(10, Some(o.state), W, 1);
        assert!(!denied.allowed);
        assert_eq!(denied.reset_after, 6 * S);
        assert!(take(10, Some(o.state), W + 6 * S, 1).allowed);
        assert!(!take(10, Some(o.state), W + 6 * S - 1, 1).allowed);
    }

    #[test]
    fn hits_over_the_limit_are_denied_without_charging() {
        let o = take(5, None, 0, 6);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 5);
        assert_eq!(o.state.b, 0);
    }

    #[test]
    fn zero_limit_denies_every_hit_but_passes_checks() {
        assert!(!take(0, None, 0, 1).allowed);
        assert!(take(0, None, 0, 0).allowed);
    }

    #[test]
    fn returned_hits_come_off_current_then_previous() {
        let a = take(10, None, 0, 4);
        let b = take(10, Some(a.state), W, 2); // prev 4, curr 2
        let r = evaluate(10, W, Some(b.state), W, Hits::Return(3));
        assert_eq!(r.state.b, 3 << 32, "prev 3, curr 0");
    }
}
