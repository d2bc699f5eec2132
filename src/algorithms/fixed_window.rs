//! Fixed windows aligned to the epoch: `count + hits <= limit` within `[k*w, (k+1)*w)`.
//! Exact (no window ever admits more than its limit), but a client can spend a whole window's
//! quota at the end of one window and again at the start of the next.

use super::{CellState, Hits, Outcome, clamp32, window_of};

pub(super) fn evaluate(
    limit: u64,
    w: u64,
    state: Option<CellState>,
    now: u64,
    hits: Hits,
) -> Outcome {
    let (mut idx, mut elapsed) = window_of(now, w, state.map(|s| s.a));
    let count = match state {
        Some(s) if s.a == idx => s.b,
        // The clock stepped back into an older window: keep counting in the newer one.
        Some(s) if s.a > idx => {
            idx = s.a;
            elapsed = 0;
            s.b
        }
        _ => 0,
    };
    let (allowed, after) = match hits {
        Hits::Take(h) => {
            let total = count.saturating_add(h);
            if total <= limit {
                (true, total)
            } else {
                (false, count)
            }
        }
        Hits::Return(h) => (true, count.saturating_sub(h)),
    };
    Outcome {
        allowed,
        state: CellState {
            a: idx,
            b: clamp32(after),
        },
        expires_at: idx.saturating_add(1).saturating_mul(w),
        remaining: limit.saturating_sub(after),
        // Admitted or not, the count starts again at the next window boundary.
        reset_after: w - elapsed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn take(limit: u64, state: Option<CellState>, now: u64, h: u64) -> Outcome {
        evaluate(limit, 60 * S, state, now, Hits::Take(h))
    }

    #[test]
    fn admits_exactly_limit_per_aligned_window() {
        let mut st = None;
        for i in 0..10 {
            let o = take(10, st, 120 * S + i * S, 1);
            assert!(o.allowed);
            assert_eq!(o.remaining, 9 - i);
            st = Some(o.state);
        }
        let o = take(10, st, 150 * S, 1);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 0);
        assert_eq!(o.reset_after, 30 * S);
        // Next aligned window starts fresh.
        let o = take(10, st, 180 * S, 1);
        assert!(o.allowed);
        assert_eq!(o.remaining, 9);
    }

    #[test]
    fn check_only_passes_at_exactly_the_limit() {
        let o = take(3, None, 0, 3);
        assert!(o.allowed);
        let check = take(3, Some(o.state), S, 0);
        assert!(check.allowed);
        assert_eq!(check.remaining, 0);
    }

    #[test]
    fn returned_hits_free_room_again() {
        let o = take(2, None, 0, 2);
        let back = evaluate(2, 60 * S, Some(o.state), S, Hits::Return(1));
        assert!(back.allowed);
        assert_eq!(back.remaining, 1);
        assert!(take(2, Some(back.state), 2 * S, 1).allowed);
    }

    #[test]
    fn clock_stepping_back_keeps_the_newer_window() {
        let o = take(1, None, 120 * S, 1);
        let o2 = take(1, Some(o.state), 10 * S, 1);
        assert!(!o2.allowed);
        assert_eq!(o2.state.a, 2);
    }
}
