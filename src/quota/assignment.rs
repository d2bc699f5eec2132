//! From sluice's limits to what Envoy 1.40's quota filter enforces: a blanket rule or a token
//! bucket, as pure functions.
//!
//! Every limit becomes a token bucket refilled at the limit's rate and as large as its burst:
//! - `token_bucket` limits: their own refill and `burst`, exactly;
//! - `sliding_window` and `fixed_window` limits of N per window W: N/W tokens a second, N tokens
//!   deep. The long-run rate is the same, but a bucket has no memory of the window: a client
//!   that waited a whole window can spend N at once and then the refill, up to 2N within one
//!   window, where the sliding window admits about N (and the fixed window up to 2N across a
//!   boundary).
//!
//! A bucket subject to several limits gets the smallest rate and the smallest burst among them,
//! each the bucket's share of that limit (a share's burst is the limit's burst scaled by the
//! share of the rate, rounded up).
//!
//! Envoy 1.40 refills continuously at `tokens_per_fill / fill_interval`, reads the interval in
//! whole seconds (under one second is an infinite rate) and rebuilds a bucket only when
//! `max_tokens` or `tokens_per_fill` change (the nanoseconds of the interval too, but not its
//! seconds). So the interval is fixed at an hour, which puts the rate in whole tokens per hour
//! (at least one), and never changes alone.

use crate::algorithms::Policy;

/// The fill interval of every token bucket sent, seconds.
pub const FILL_INTERVAL_SECS: u32 = 3600;

/// A limit as a token bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refill {
    /// Tokens added per second.
    pub rate: f64,
    /// Tokens the bucket holds when full.
    pub burst: u64,
}

impl Refill {
    /// The token bucket standing for `policy` (see the module doc).
    pub fn of(policy: &Policy) -> Self {
        let per_second = |count: u64, nanos: u64| count as f64 * 1e9 / nanos.max(1) as f64;
        match *policy {
            Policy::SlidingWindow { limit, window } | Policy::FixedWindow { limit, window } => {
                Refill {
                    rate: per_second(limit, window.get()),
                    burst: limit,
                }
            }
            Policy::TokenBucket { capacity, interval } => Refill {
                rate: per_second(1, interval.get()),
                burst: capacity,
            },
        }
    }

    /// The burst that goes with `granted` tokens a second of this limit: the burst scaled by
    /// the share, rounded up, at least one token.
    pub fn burst_for(&self, granted: f64) -> f64 {
        if self.rate <= 0.0 || self.burst == 0 {
            return 0.0;
        }
        let burst = self.burst as f64;
        (burst * (granted / self.rate).clamp(0.0, 1.0))
            .ceil()
            .clamp(1.0, burst)
    }
}

/// What Envoy is told to enforce for a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Assignment {
    /// Admit everything.
    AllowAll,
    /// Refuse everything.
    DenyAll,
    /// Envoy's token bucket.
    TokenBucket {
        /// Size; the bucket starts full.
        max_tokens: u32,
        /// Tokens per [`Assignment::TokenBucket::fill_interval_secs`].
        tokens_per_fill: u32,
        /// Whole seconds.
        fill_interval_secs: u32,
    },
}

impl Assignment {
    /// A token bucket of `rate` tokens a second and `burst` tokens; refuses everything when the
    /// bucket could never hold a token.
    pub fn token_bucket(rate: f64, burst: f64) -> Self {
        if !(rate > 0.0 && burst >= 1.0) {
            return Assignment::DenyAll;
        }
        let hourly = rate * f64::from(FILL_INTERVAL_SECS);
        let (per_fill, interval) = if hourly <= f64::from(u32::MAX) {
            (hourly, FILL_INTERVAL_SECS)
        } else {
            (rate, 1)
        };
        Assignment::TokenBucket {
            max_tokens: to_u32(burst.floor()).max(1),
            tokens_per_fill: to_u32(per_fill.floor()).max(1),
            fill_interval_secs: interval,
        }
    }

    /// The tokens a second this admits (infinite for [`Assignment::AllowAll`]).
    pub fn rate(&self) -> f64 {
        match *self {
            Assignment::AllowAll => f64::INFINITY,
            Assignment::DenyAll => 0.0,
            Assignment::TokenBucket {
                tokens_per_fill,
                fill_interval_secs,
                ..
            } => f64::from(tokens_per_fill) / f64::from(fill_interval_secs.max(1)),
        }
    }

    /// This assignment as sent after `previous`: a token bucket that differs from the previous
    /// one only in its interval gets one token less, because Envoy 1.40 would not see the
    /// change (it compares size and tokens per fill).
    pub fn after(self, previous: Option<Assignment>) -> Self {
        match (self, previous) {
            (
                Assignment::TokenBucket {
                    max_tokens,
                    tokens_per_fill,
                    fill_interval_secs,
                },
                Some(Assignment::TokenBucket {
                    max_tokens: m,
                    tokens_per_fill: t,
                    fill_interval_secs: f,
                }),
            ) if max_tokens == m && tokens_per_fill == t && fill_interval_secs != f => {
                if max_tokens > 1 {
                    Assignment::TokenBucket {
                        max_tokens: max_tokens - 1,
                        tokens_per_fill,
                        fill_interval_secs,
                    }
                } else {
                    Assignment::TokenBucket {
                        max_tokens,
                        tokens_per_fill: tokens_per_fill.saturating_sub(1).max(1),
                        fill_interval_secs,
                    }
                }
            }
            (a, _) => a,
        }
    }

    /// Short name for statistics.
    pub fn kind(&self) -> &'static str {
        match self {
            Assignment::AllowAll => "allow_all",
            Assignment::DenyAll => "deny_all",
            Assignment::TokenBucket { .. } => "token_bucket",
        }
    }
}

fn to_u32(x: f64) -> u32 {
    if x >= f64::from(u32::MAX) {
        u32::MAX
    } else if x > 0.0 {
        x as u32
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU64;

    use super::*;
    use proptest::prelude::*;

    const S: u64 = 1_000_000_000;

    fn nz(n: u64) -> NonZeroU64 {
        NonZeroU64::new(n).unwrap()
    }

    #[test]
    fn windows_become_buckets_of_their_count_refilled_at_their_rate() {
        let r = Refill::of(&Policy::SlidingWindow {
            limit: 10,
            window: nz(60 * S),
        });
        assert_eq!(r.burst, 10);
        assert!((r.rate - 10.0 / 60.0).abs() < 1e-12);
        let r = Refill::of(&Policy::FixedWindow {
            limit: 100,
            window: nz(3600 * S),
        });
        assert_eq!(r.burst, 100);
        assert!((r.rate - 100.0 / 3600.0).abs() < 1e-12);
    }

    #[test]
    fn token_buckets_keep_their_refill_and_burst() {
        let r = Refill::of(&Policy::TokenBucket {
            capacity: 20,
            interval: nz(S / 5),
        });
        assert_eq!((r.rate, r.burst), (5.0, 20));
    }

    #[test]
    fn a_whole_limit_is_sent_in_tokens_per_hour() {
        assert_eq!(
            Assignment::token_bucket(10.0 / 60.0, 10.0),
            Assignment::TokenBucket {
                max_tokens: 10,
                tokens_per_fill: 600,
                fill_interval_secs: 3600
            }
        );
        // Too fast for a u32 per hour: per second.
        assert_eq!(
            Assignment::token_bucket(2e6, 100.0),
            Assignment::TokenBucket {
                max_tokens: 100,
                tokens_per_fill: 2_000_000,
                fill_interval_secs: 1
            }
        );
        assert_eq!(Assignment::token_bucket(0.0, 5.0), Assignment::DenyAll);
        assert_eq!(Assignment::token_bucket(5.0, 0.0), Assignment::DenyAll);
    }

    #[test]
    fn a_change_of_interval_alone_changes_the_size_too() {
        let old = Assignment::TokenBucket {
            max_tokens: 5,
            tokens_per_fill: 7,
            fill_interval_secs: 3600,
        };
        let new = Assignment::TokenBucket {
            max_tokens: 5,
            tokens_per_fill: 7,
            fill_interval_secs: 1,
        };
        assert_eq!(
            new.after(Some(old)),
            Assignment::TokenBucket {
                max_tokens: 4,
                tokens_per_fill: 7,
                fill_interval_secs: 1
            }
        );
        assert_eq!(old.after(Some(old)), old);
    }

    proptest! {
        /// What Envoy enforces never admits more than the share it stands for: the rate is
        /// rounded down (to at least one token an hour) and the size is at most the burst.
        #[test]
        fn a_bucket_never_exceeds_its_share(rate in 1e-3..1e7f64, burst in 1.0..1e6f64) {
            let a = Assignment::token_bucket(rate, burst);
            let Assignment::TokenBucket { max_tokens, .. } = a else { panic!("{a:?}") };
            prop_assert!(a.rate() <= rate.max(1.0 / 3600.0) * (1.0 + 1e-9));
            prop_assert!(f64::from(max_tokens) <= burst);
        }

        #[test]
        fn shares_of_a_burst_add_up_to_at_most_the_burst_and_one_each(
            burst in 1u64..100_000,
            rate in 1e-3..1e6f64,
            parts in prop::collection::vec(0.0..1.0f64, 1..20),
        ) {
            let r = Refill { rate, burst };
            let total: f64 = parts.iter().sum::<f64>().max(1.0);
            let sum: f64 = parts.iter().map(|p| r.burst_for(rate * p / total)).sum();
            prop_assert!(sum <= burst as f64 + parts.len() as f64);
        }
    }
}
