//! Fair division of one limit's rate among the Envoy buckets that draw on it, as pure functions.
//!
//! A *claimant* is one bucket of one Envoy stream; a *pool* is one counter (one limit for one
//! client, or a domain-wide limit) and every claimant that reports a bucket charging it, across
//! every sluice replica that shares the ledger. Each claimant's share is recomputed when its
//! stream reports (every 5 s):
//! - its **target** is a floor ([`FLOOR`] of an equal share) plus the rest of the rate in
//!   proportion to its recent demand (requests allowed plus denied, per second), so the targets
//!   of a pool add up to exactly its rate;
//! - its **grant** is the target, but never more than what the other claimants are not already
//!   assigned, and never less than the floor: a newcomer starts at least at the floor and grows
//!   as the others report and shrink, within about one report each;
//! - a grant within [`HYSTERESIS`] of the previous one keeps the previous one, so that the noise
//!   in demand does not rebuild Envoy's token bucket at every report.
//!
//! Together: a report never takes a pool's grants above its rate, except by the reporter's
//! floor when the others already hold everything (a newcomer, until they report and shrink);
//! once demand holds still for a few rounds of reports, the grants add up to at most the rate.

/// The part of an equal share every active claimant gets whatever its demand.
pub const FLOOR: f64 = 0.1;

/// A new grant within this fraction of the previous one keeps the previous one.
pub const HYSTERESIS: f64 = 0.1;

/// Weight of the newest report in a claimant's demand (an exponentially weighted mean).
pub const DEMAND_WEIGHT: f64 = 0.5;

/// One pool as the claimant computing its share sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pool {
    /// The limit's rate, tokens per second.
    pub rate: f64,
    /// Active claimants, this one included (at least 1).
    pub claimants: u32,
    /// Demand of every active claimant, this one included, requests per second.
    pub demand: f64,
    /// Rate assigned to the other claimants, tokens per second.
    pub assigned_others: f64,
}

impl Pool {
    /// The floor each claimant of this pool is guaranteed.
    pub fn floor(&self) -> f64 {
        FLOOR * self.rate / f64::from(self.claimants.max(1))
    }

    /// The share `demand` would get if every claimant computed theirs from this pool.
    pub fn target(&self, demand: f64) -> f64 {
        let n = f64::from(self.claimants.max(1));
        let floor = self.floor();
        let rest = (self.rate - floor * n).max(0.0);
        let demand = finite(demand);
        let total = finite(self.demand).max(demand);
        let proportional = if total > 0.0 {
            rest * demand / total
        } else {
            rest / n
        };
        (floor + proportional).min(self.rate)
    }

    /// The share to assign a claimant of `demand` that was last assigned `previous`.
    pub fn grant(&self, demand: f64, previous: Option<f64>) -> f64 {
        let floor = self.floor();
        let free = (self.rate - finite(self.assigned_others)).max(0.0);
        let cap = free.max(floor);
        let target = self.target(demand);
        if let Some(p) = previous.map(finite)
            && p >= floor
            && p <= cap
            && (p - target).abs() <= HYSTERESIS * target
        {
            return p;
        }
        target.min(cap).max(floor)
    }
}

/// Divides `rate` among claimants of the given demands, all seeing the same pool: the targets
/// of [`Pool::target`]. Their sum is `rate`.
pub fn divide(rate: f64, demands: &[f64]) -> Vec<f64> {
    let pool = Pool {
        rate,
        claimants: u32::try_from(demands.len()).unwrap_or(u32::MAX),
        demand: demands.iter().copied().map(finite).sum(),
        assigned_others: 0.0,
    };
    demands.iter().map(|&d| pool.target(d)).collect()
}

/// A claimant's recent demand, requests per second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Demand(Option<f64>);

impl Demand {
    /// Takes a report of `requests` over `elapsed_secs` (at least one second is assumed: Envoy
    /// reports whole seconds, and 0 for a bucket's first report).
    pub fn observe(&mut self, requests: u64, elapsed_secs: f64) {
        let rate = requests as f64 / finite(elapsed_secs).max(1.0);
        self.0 = Some(match self.0 {
            Some(old) => DEMAND_WEIGHT * rate + (1.0 - DEMAND_WEIGHT) * old,
            None => rate,
        });
    }

    /// Requests per second; 0 before any report.
    pub fn per_second(&self) -> f64 {
        self.0.unwrap_or(0.0)
    }
}

/// `x`, or 0 for a NaN or infinity (no input here should hold one; none may spread).
fn finite(x: f64) -> f64 {
    if x.is_finite() { x.max(0.0) } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EPS: f64 = 1e-9;

    #[test]
    fn one_claimant_gets_the_whole_rate() {
        assert_eq!(divide(10.0, &[3.0]), vec![10.0]);
        assert_eq!(divide(10.0, &[0.0]), vec![10.0]);
    }

    #[test]
    fn shares_follow_demand_above_the_floor() {
        let s = divide(100.0, &[30.0, 10.0]);
        // Floors 5 each; the other 90 split 3:1.
        assert!((s[0] - 72.5).abs() < EPS, "{s:?}");
        assert!((s[1] - 27.5).abs() < EPS, "{s:?}");
    }

    #[test]
    fn a_newcomer_gets_its_floor_while_the_others_hold_everything() {
        let pool = Pool {
            rate: 100.0,
            claimants: 2,
            demand: 101.0,
            assigned_others: 100.0,
        };
        assert!((pool.grant(1.0, None) - 5.0).abs() < EPS);
        // Once the other has shrunk to its target, the newcomer grows to its own.
        let pool = Pool {
            assigned_others: pool.target(100.0),
            ..pool
        };
        assert!((pool.grant(1.0, Some(5.0)) - pool.target(1.0)).abs() < EPS);
    }

    #[test]
    fn a_small_change_keeps_the_previous_grant() {
        let pool = Pool {
            rate: 100.0,
            claimants: 2,
            demand: 20.0,
            assigned_others: 45.0,
        };
        assert_eq!(pool.grant(10.0, Some(52.0)), 52.0);
        assert!((pool.grant(10.0, Some(40.0)) - 50.0).abs() < EPS);
    }

    #[test]
    fn demand_is_a_weighted_mean_of_reports() {
        let mut d = Demand::default();
        d.observe(1, 0.0);
        assert_eq!(d.per_second(), 1.0);
        d.observe(50, 5.0);
        assert_eq!(d.per_second(), 5.5);
    }

    fn demands() -> impl Strategy<Value = Vec<f64>> {
        prop::collection::vec(prop_oneof![Just(0.0), 0.0..1e6f64], 1..20)
    }

    proptest! {
        #[test]
        fn shares_never_exceed_the_rate(rate in 0.0..1e7f64, d in demands()) {
            let s = divide(rate, &d);
            prop_assert!(s.iter().sum::<f64>() <= rate * (1.0 + EPS) + EPS);
        }

        #[test]
        fn every_claimant_gets_at_least_its_floor(rate in 0.0..1e7f64, d in demands()) {
            let floor = FLOOR * rate / d.len() as f64;
            for s in divide(rate, &d) {
                prop_assert!(s >= floor * (1.0 - EPS));
            }
        }

        #[test]
        fn shares_follow_demand(rate in 0.0..1e7f64, d in demands()) {
            let s = divide(rate, &d);
            for i in 0..d.len() {
                for j in 0..d.len() {
                    if d[i] >= d[j] {
                        prop_assert!(s[i] >= s[j] * (1.0 - EPS) - EPS, "{d:?} -> {s:?}");
                    }
                }
            }
        }

        /// Claimants report one at a time, in any order, joining as they come, with demand
        /// that changes every round: a report never takes the total above the rate, except by
        /// the reporter's floor on top of what the others hold; and once demand holds for
        /// three rounds, the total is within the rate.
        #[test]
        fn reports_in_any_order_stay_within_the_bounds(
            rate in 1.0..1e6f64,
            rounds in prop::collection::vec(
                (demands(), prop::collection::vec(any::<prop::sample::Index>(), 1..40)),
                1..6,
            ),
        ) {
            let n = rounds.iter().map(|(d, _)| d.len()).max().unwrap_or(1);
            let mut granted: Vec<Option<f64>> = vec![None; n];
            let mut demand = vec![0.0; n];
            let report = |i: usize, granted: &mut Vec<Option<f64>>, demand: &[f64]| {
                let active: Vec<usize> = (0..n).filter(|&j| j == i || granted[j].is_some()).collect();
                let pool = Pool {
                    rate,
                    claimants: active.len() as u32,
                    demand: active.iter().map(|&j| demand[j]).sum(),
                    assigned_others: active.iter().filter(|&&j| j != i).filter_map(|&j| granted[j]).sum(),
                };
                granted[i] = Some(pool.grant(demand[i], granted[i]));
                (pool.assigned_others, pool.floor())
            };
            let last = rounds.last().cloned();
            for (d, order) in rounds {
                for (i, x) in d.iter().enumerate() {
                    demand[i] = *x;
                }
                for pick in order {
                    let (others, floor) = report(pick.index(n), &mut granted, &demand);
                    let sum: f64 = granted.iter().flatten().sum();
                    prop_assert!(
                        sum <= rate.max(others + floor) * (1.0 + EPS),
                        "{sum} > max({rate}, {others} + {floor})"
                    );
                }
            }
            // Steady demand: every active claimant reports three times, in index order.
            if let Some((d, _)) = last {
                let _ = d;
                for _ in 0..3 {
                    for i in 0..n {
                        if granted[i].is_some() {
                            report(i, &mut granted, &demand);
                        }
                    }
                }
                let sum: f64 = granted.iter().flatten().sum();
                prop_assert!(sum <= rate * (1.0 + EPS), "steady {sum} > {rate}");
            }
        }
    }
}
