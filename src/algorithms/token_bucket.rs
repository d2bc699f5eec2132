//! Token bucket as GCRA: the state is one "theoretical arrival time" (TAT). The bucket is full
//! when `TAT <= now`; each hit pushes TAT by one refill interval; a request is admitted when the
//! pushed TAT is at most `capacity` intervals ahead of now. Exact: any span of `d` nanoseconds
//! admits at most `capacity + d / interval` hits.

use super::{CellState, Hits, Outcome, div_u128, sat};

pub(super) fn evaluate(
    capacity: u64,
    interval: u64,
    state: Option<CellState>,
    now: u64,
    hits: Hits,
) -> Outcome {
    let t = u128::from(interval);
    let tau = u128::from(capacity) * t;
    let now_w = u128::from(now);
    let tat = u128::from(state.map_or(now, |s| s.a)).max(now_w);
    let (allowed, new_tat, reset_after) = match hits {
        Hits::Take(h) => {
            let pushed = tat + u128::from(h) * t;
            if pushed - now_w <= tau {
                (true, pushed, pushed - now_w)
            } else if u128::from(h) <= u128::from(capacity) {
                // Admitted once enough tokens have come back: when `pushed - now' == tau`.
                (false, tat, pushed - tau - now_w)
            } else {
                // More hits than the bucket can ever hold: never admitted; report when full.
                (false, tat, tat - now_w)
            }
        }
        Hits::Return(h) => {
            let back = tat.saturating_sub(u128::from(h) * t).max(now_w);
            (true, back, back - now_w)
        }
    };
    let in_use = new_tat - now_w;
    Outcome {
        allowed,
        state: CellState {
            a: sat(new_tat),
            b: 0,
        },
        expires_at: sat(new_tat),
        remaining: sat(div_u128(tau.saturating_sub(in_use), t)),
        reset_after: sat(if allowed { in_use } else { reset_after }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn take(state: Option<CellState>, now: u64, h: u64) -> Outcome {
        // The Talk2Me transcribe burst: 3 tokens, one back every 6 seconds.
        evaluate(3, 6 * S, state, now, Hits::Take(h))
    }

    #[test]
    fn burst_of_three_then_one_every_six_seconds() {
        let t0 = 1_000 * S;
        let a = take(None, t0, 1);
        assert!(a.allowed);
        assert_eq!(a.remaining, 2);
        assert_eq!(a.reset_after, 6 * S);
        let b = take(Some(a.state), t0, 1);
        let c = take(Some(b.state), t0, 1);
        assert!(b.allowed && c.allowed);
        assert_eq!(c.remaining, 0);
        assert_eq!(c.reset_after, 18 * S);
        let d = take(Some(c.state), t0, 1);
        assert!(!d.allowed);
        assert_eq!(d.reset_after, 6 * S, "one token back after 6 s");
        let e = take(Some(c.state), t0 + 6 * S - 1, 1);
        assert!(!e.allowed);
        assert_eq!(e.reset_after, 1);
        let f = take(Some(c.state), t0 + 6 * S, 1);
        assert!(f.allowed);
        assert_eq!(f.remaining, 0);
    }

    #[test]
    fn more_hits_than_capacity_are_never_admitted() {
        let o = take(None, 0, 4);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 3);
    }

    #[test]
    fn returned_tokens_never_overfill_the_bucket() {
        let o = evaluate(3, 6 * S, None, 0, Hits::Return(5));
        assert_eq!(o.remaining, 3);
        assert_eq!(o.state.a, 0);
    }
}
