//! Property tests: each algorithm's guarantee holds for arbitrary request sequences.

use super::*;
use proptest::prelude::*;

const S: u64 = 1_000_000_000;

/// A sequence of (nanoseconds since the previous request, hits) starting at `start`.
fn requests() -> impl Strategy<Value = (u64, Vec<(u64, u64)>)> {
    (
        0u64..1_000_000 * S,
        prop::collection::vec((0u64..20 * S, 0u64..4), 1..300),
    )
}

/// Runs the sequence and returns the admitted (time, hits).
fn run(policy: Policy, start: u64, seq: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut now = start;
    let mut state = None;
    let mut admitted = Vec::new();
    for &(dt, h) in seq {
        now += dt;
        let o = evaluate(&policy, state, now, Hits::Take(h));
        if o.allowed {
            state = Some(o.state);
            if h > 0 {
                admitted.push((now, h));
            }
        }
    }
    admitted
}

/// Most hits admitted in any half-open span `[t, t + span)`.
fn max_in_span(admitted: &[(u64, u64)], span: u64) -> u64 {
    let mut best = 0;
    for (i, &(t, _)) in admitted.iter().enumerate() {
        let sum: u64 = admitted[i..]
            .iter()
            .take_while(|(u, _)| *u < t + span)
            .map(|(_, h)| h)
            .sum();
        best = best.max(sum);
    }
    best
}

fn max_in_aligned_window(admitted: &[(u64, u64)], w: u64) -> u64 {
    let mut per: std::collections::HashMap<u64, u64> = Default::default();
    for &(t, h) in admitted {
        *per.entry(t / w).or_default() += h;
    }
    per.values().copied().max().unwrap_or(0)
}

proptest! {
    #[test]
    fn fixed_window_never_admits_more_than_its_limit_per_window(
        (start, seq) in requests(), limit in 0u64..12, secs in 1u64..90,
    ) {
        let w = secs * S;
        let p = Policy::FixedWindow { limit, window: NonZeroU64::new(w).unwrap() };
        prop_assert!(max_in_aligned_window(&run(p, start, &seq), w) <= limit);
    }

    #[test]
    fn sliding_window_bounds_aligned_windows_by_limit_and_any_span_by_twice_it(
        (start, seq) in requests(), limit in 0u64..12, secs in 1u64..90,
    ) {
        let w = secs * S;
        let p = Policy::SlidingWindow { limit, window: NonZeroU64::new(w).unwrap() };
        let admitted = run(p, start, &seq);
        prop_assert!(max_in_aligned_window(&admitted, w) <= limit);
        prop_assert!(max_in_span(&admitted, w) <= 2 * limit);
    }

    #[test]
    fn token_bucket_admits_at_most_capacity_plus_refill_in_any_span(
        (start, seq) in requests(), capacity in 1u64..6, secs in 1u64..10, span_secs in 1u64..120,
    ) {
        let interval = secs * S;
        let p = Policy::TokenBucket { capacity, interval: NonZeroU64::new(interval).unwrap() };
        let span = span_secs * S;
        // A span [t, t+span) sees the bucket's capacity plus the tokens refilled within it.
        let bound = capacity + (span - 1) / interval;
        prop_assert!(max_in_span(&run(p, start, &seq), span) <= bound);
    }

    #[test]
    fn a_denied_request_is_admitted_after_exactly_its_reset_time(
        (start, seq) in requests(), limit in 1u64..12, secs in 1u64..90, algo in 0u8..3, h in 1u64..4,
    ) {
        let w = NonZeroU64::new(secs * S).unwrap();
        let p = match algo {
            0 => Policy::SlidingWindow { limit, window: w },
            1 => Policy::FixedWindow { limit, window: w },
            _ => Policy::TokenBucket { capacity: limit, interval: w },
        };
        // Drive to some state, then check the promise made by a denial.
        let mut now = start;
        let mut state = None;
        for &(dt, hh) in &seq {
            now += dt;
            let o = evaluate(&p, state, now, Hits::Take(hh));
            if o.allowed { state = Some(o.state); }
        }
        let o = evaluate(&p, state, now, Hits::Take(h));
        if !o.allowed && h <= limit {
            prop_assert!(o.reset_after > 0);
            let later = evaluate(&p, state, now + o.reset_after, Hits::Take(h));
            prop_assert!(later.allowed, "not admitted after reset_after {}", o.reset_after);
            if o.reset_after > 1 {
                let early = evaluate(&p, state, now + o.reset_after - 1, Hits::Take(h));
                // Fixed windows open all at once; the others must not be admissible earlier.
                prop_assert!(!early.allowed);
            }
        }
    }

    #[test]
    fn checks_never_change_what_later_requests_see(
        (start, seq) in requests(), limit in 0u64..12, secs in 1u64..90,
    ) {
        let w = NonZeroU64::new(secs * S).unwrap();
        let p = Policy::SlidingWindow { limit, window: w };
        let mut now = start;
        let mut state = None;
        for &(dt, h) in &seq {
            now += dt;
            let o = evaluate(&p, state, now, Hits::Take(h));
            if o.allowed { state = Some(o.state); }
            let check = evaluate(&p, state, now, Hits::Take(0));
            let again = evaluate(&p, state, now, Hits::Take(0));
            prop_assert_eq!(check.remaining, again.remaining);
        }
    }
}

proptest! {
    /// The window from a stored one is the window by division, whatever was stored.
    #[test]
    fn window_of_is_the_division(
        now in any::<u64>(),
        w in prop_oneof![1u64..1000, Just(S), Just(60 * S), Just(86_400 * S), any::<u64>()],
        stored in prop_oneof![Just(None), any::<u64>().prop_map(Some), (0u64..3).prop_map(Some)],
        near in any::<bool>(),
    ) {
        prop_assume!(w > 0);
        // Mostly the window `now` is in or the one before it, as counters are read.
        let stored = match stored {
            Some(d) if d < 3 && near => Some((now / w).saturating_sub(d)),
            other => other,
        };
        prop_assert_eq!(window_of(now, w, stored), (now / w, now % w));
    }

    #[test]
    fn div_u128_is_the_division(a in any::<u128>(), b in any::<u128>(), small in any::<bool>()) {
        prop_assume!(b > 0);
        let (a, b) = if small { (a >> 64, (b >> 64).max(1)) } else { (a, b) };
        prop_assert_eq!(div_u128(a, b), a / b);
    }
}
