//! The rate-string grammar Python `limits`/slowapi users know: `10/minute`, `10 per minute`,
//! `100/hour`, `5/30 seconds`, `1 per 6 seconds`; several rates in one string separated by `;`
//! or `,` (`10/minute; 100/hour`), as slowapi accepts.

use std::fmt;
use std::str::FromStr;

/// Units a rate may be written in.
pub const UNITS: &str = "second, minute, hour, day";

/// `count` hits per `per` `unit`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Hits per window; at least 1, at most `u32::MAX` (Envoy reports limits as `u32`).
    pub count: u64,
    /// Window length in units; at least 1.
    pub per: u64,
    /// Window unit length in seconds.
    pub unit_seconds: u64,
}

impl Rate {
    /// Window length in nanoseconds (saturating).
    pub fn window_nanos(&self) -> u64 {
        self.per
            .saturating_mul(self.unit_seconds)
            .saturating_mul(1_000_000_000)
    }

    /// The conventional name: `per minute`, `per 30 seconds`.
    pub fn name(&self) -> String {
        let unit = unit_name(self.unit_seconds);
        if self.per == 1 {
            format!("per {unit}")
        } else {
            format!("per {} {unit}s", self.per)
        }
    }
}

fn unit_name(seconds: u64) -> &'static str {
    match seconds {
        1 => "second",
        60 => "minute",
        3600 => "hour",
        _ => "day",
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = unit_name(self.unit_seconds);
        if self.per == 1 {
            write!(f, "{}/{unit}", self.count)
        } else {
            write!(f, "{}/{} {unit}s", self.count, self.per)
        }
    }
}

/// A rate string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// Not of the form `<count>/<unit>`.
    #[error("expected a rate like \"10/minute\", \"10 per minute\" or \"5/30 seconds\", got {0:?}")]
    Shape(String),
    /// Unknown unit word.
    #[error("unknown unit {0:?} ({UNITS})")]
    Unit(String),
    /// Count out of range.
    #[error("count {0:?} must be a whole number from 1 to 4294967295")]
    Count(String),
    /// Window multiplier out of range.
    #[error("window length {0:?} must be a whole number of at least 1")]
    Per(String),
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let shape = || RateError::Shape(s.to_string());
        let (count, rest) = if let Some((c, r)) = text.split_once('/') {
            (c.trim(), r.trim())
        } else {
            let mut words = text.splitn(2, char::is_whitespace);
            let c = words.next().unwrap_or("");
            let r = words.next().unwrap_or("").trim_start();
            let r = r
                .strip_prefix("per")
                .filter(|r| r.starts_with(char::is_whitespace))
                .ok_or_else(shape)?;
            (c, r.trim())
        };
        if count.is_empty() || rest.is_empty() {
            return Err(shape());
        }
        let count: u64 = count
            .parse()
            .ok()
            .filter(|c| (1..=u64::from(u32::MAX)).contains(c))
            .ok_or_else(|| RateError::Count(count.to_string()))?;
        let (per, unit) = match rest.split_once(char::is_whitespace) {
            Some((n, u)) if n.starts_with(|c: char| c.is_ascii_digit()) => {
                let per = n
                    .parse::<u64>()
                    .ok()
                    .filter(|p| *p >= 1)
                    .ok_or_else(|| RateError::Per(n.to_string()))?;
                (per, u.trim())
            }
            Some(_) => return Err(RateError::Unit(rest.to_string())),
            None => (1, rest),
        };
        let unit_seconds = match unit.to_ascii_lowercase().as_str() {
            "second" | "seconds" => 1,
            "minute" | "minutes" => 60,
            "hour" | "hours" => 3_600,
            "day" | "days" => 86_400,
            _ => return Err(RateError::Unit(unit.to_string())),
        };
        Ok(Rate {
            count,
            per,
            unit_seconds,
        })
    }
}

/// Parses `10/minute; 100/hour` into its rates.
pub fn parse_list(s: &str) -> Result<Vec<Rate>, RateError> {
    let parts: Vec<&str> = s
        .split([';', ','])
        .filter(|p| !p.trim().is_empty())
        .collect();
    if parts.is_empty() {
        return Err(RateError::Shape(s.to_string()));
    }
    parts.into_iter().map(str::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(count: u64, per: u64, unit_seconds: u64) -> Rate {
        Rate {
            count,
            per,
            unit_seconds,
        }
    }

    #[test]
    fn slash_and_per_forms_parse_alike() {
        assert_eq!("10/minute".parse(), Ok(rate(10, 1, 60)));
        assert_eq!("10 per minute".parse(), Ok(rate(10, 1, 60)));
        assert_eq!(" 100 / hour ".parse(), Ok(rate(100, 1, 3600)));
        assert_eq!("5/30 seconds".parse(), Ok(rate(5, 30, 1)));
        assert_eq!("1 per 6 seconds".parse(), Ok(rate(1, 6, 1)));
        assert_eq!("2/Days".parse(), Ok(rate(2, 1, 86_400)));
    }

    #[test]
    fn unknown_unit_lists_the_known_ones() {
        let err = "10/minuet".parse::<Rate>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown unit \"minuet\" (second, minute, hour, day)"
        );
    }

    #[test]
    fn bad_counts_and_shapes_are_rejected() {
        assert!(matches!(
            "0/minute".parse::<Rate>(),
            Err(RateError::Count(_))
        ));
        assert!(matches!(
            "x/minute".parse::<Rate>(),
            Err(RateError::Count(_))
        ));
        assert!(matches!(
            "5000000000/minute".parse::<Rate>(),
            Err(RateError::Count(_))
        ));
        assert!(matches!("10".parse::<Rate>(), Err(RateError::Shape(_))));
        assert!(matches!(
            "10 minute".parse::<Rate>(),
            Err(RateError::Shape(_))
        ));
        assert!(matches!(
            "5/0 seconds".parse::<Rate>(),
            Err(RateError::Per(_))
        ));
        assert!(matches!(
            "5/thirty seconds".parse::<Rate>(),
            Err(RateError::Unit(_))
        ));
    }

    #[test]
    fn names_and_display_follow_the_window() {
        assert_eq!(rate(10, 1, 60).name(), "per minute");
        assert_eq!(rate(5, 30, 1).name(), "per 30 seconds");
        assert_eq!(rate(5, 30, 1).to_string(), "5/30 seconds");
        assert_eq!(rate(5, 30, 1).window_nanos(), 30_000_000_000);
    }

    #[test]
    fn lists_split_on_semicolons_and_commas() {
        assert_eq!(
            parse_list("10/minute; 100/hour,1000/day"),
            Ok(vec![
                rate(10, 1, 60),
                rate(100, 1, 3600),
                rate(1000, 1, 86_400)
            ])
        );
        assert!(parse_list(" ; ").is_err());
    }
}
