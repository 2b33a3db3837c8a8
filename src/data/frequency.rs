//! Sampling frequencies of series: fixed steps such as "30s", "15m", "1h", "1d".
//!
//! A frequency is a whole number of microseconds, because observations are
//! stored as epoch microseconds. Calendar units of varying length (months,
//! years) are rejected rather than approximated.

use std::fmt;
use std::str::FromStr;

use chrono::TimeDelta;

const MICROS_PER_MILLI: i64 = 1_000;
const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_MINUTE: i64 = 60 * MICROS_PER_SECOND;
const MICROS_PER_HOUR: i64 = 60 * MICROS_PER_MINUTE;
const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;
const MICROS_PER_WEEK: i64 = 7 * MICROS_PER_DAY;

/// Canonical units used when formatting, largest first; `parse(format(f)) == f`.
const CANONICAL_UNITS: [(&str, i64); 6] = [
    ("w", MICROS_PER_WEEK),
    ("d", MICROS_PER_DAY),
    ("h", MICROS_PER_HOUR),
    ("m", MICROS_PER_MINUTE),
    ("s", MICROS_PER_SECOND),
    ("ms", MICROS_PER_MILLI),
];

/// A fixed, positive sampling step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frequency {
    step_micros: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid frequency '{input}': {reason}")]
pub struct FrequencyError {
    pub input: String,
    pub reason: String,
}

impl Frequency {
    /// A frequency of `step_micros` microseconds; `None` unless the step is positive.
    pub fn from_micros(step_micros: i64) -> Option<Self> {
        (step_micros > 0).then_some(Self { step_micros })
    }

    /// A frequency equal to `step`; `None` unless it is positive and a whole number of microseconds
    /// that fits in an i64.
    pub fn from_duration(step: TimeDelta) -> Option<Self> {
        let micros = step.num_microseconds()?;
        if TimeDelta::microseconds(micros) != step {
            return None;
        }
        Self::from_micros(micros)
    }

    pub fn micros(self) -> i64 {
        self.step_micros
    }

    pub fn to_duration(self) -> TimeDelta {
        TimeDelta::microseconds(self.step_micros)
    }

    /// Parses "15m", "15min", "1h", "H", "1d", "30s", "500ms", "2w" (and long unit names such
    /// as "minutes" or "hours"). A missing count means 1. Units are case-insensitive except
    /// that "M" alone is rejected as ambiguous (month or minute?).
    pub fn parse(input: &str) -> Result<Self, FrequencyError> {
        let error = |reason: &str| FrequencyError {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let text = input.trim();
        if text.is_empty() {
            return Err(error(
                "it is empty; expected a count and a unit such as 15m, 1h or 1d",
            ));
        }
        let digits_end = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (count_text, unit_text) = text.split_at(digits_end);
        let unit_text = unit_text.trim();
        let count: i64 = if count_text.is_empty() {
            1
        } else {
            count_text
                .parse()
                .map_err(|_| error("the count is too large"))?
        };
        if count == 0 {
            return Err(error("the count must be positive"));
        }
        if unit_text.is_empty() {
            return Err(error(
                "the unit is missing; use one of ms, s, m (min), h, d, w",
            ));
        }
        if unit_text == "M" {
            return Err(error(
                "'M' is ambiguous (month or minute?); use 'm' or 'min' for minutes; months are not a fixed duration",
            ));
        }
        let unit_micros = match unit_text.to_ascii_lowercase().as_str() {
            "us" | "µs" | "micro" | "micros" | "microsecond" | "microseconds" => 1,
            "ms" | "milli" | "millis" | "millisecond" | "milliseconds" => MICROS_PER_MILLI,
            "s" | "sec" | "secs" | "second" | "seconds" => MICROS_PER_SECOND,
            "m" | "t" | "min" | "mins" | "minute" | "minutes" => MICROS_PER_MINUTE,
            "h" | "hr" | "hrs" | "hour" | "hours" => MICROS_PER_HOUR,
            "d" | "day" | "days" => MICROS_PER_DAY,
            "w" | "week" | "weeks" => MICROS_PER_WEEK,
            "mo" | "mon" | "month" | "months" | "y" | "yr" | "year" | "years" => {
                return Err(error(
                    "months and years are not a fixed duration; use days or weeks",
                ));
            }
            _ => return Err(error("unknown unit; use one of ms, s, m (min), h, d, w")),
        };
        let step_micros = count
            .checked_mul(unit_micros)
            .ok_or_else(|| error("the step is too large"))?;
        Ok(Self { step_micros })
    }

    /// Start of the bucket holding `ts_micros`: buckets are aligned to the Unix epoch (UTC).
    pub fn bucket_start(self, ts_micros: i64) -> i64 {
        ts_micros.div_euclid(self.step_micros) * self.step_micros
    }
}

impl fmt::Display for Frequency {
    /// The shortest exact form with the largest unit that divides the step ("90m" stays "90m",
    /// "120m" becomes "2h"); sub-millisecond steps are written in microseconds ("us").
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, unit_micros) in CANONICAL_UNITS {
            if self.step_micros % unit_micros == 0 {
                return write!(f, "{}{unit}", self.step_micros / unit_micros);
            }
        }
        write!(f, "{}us", self.step_micros)
    }
}

impl FromStr for Frequency {
    type Err = FrequencyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for Frequency {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Frequency {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The most common positive step between consecutive distinct timestamps (ties: the smaller
/// step). `sorted_distinct_micros` must be sorted ascending without duplicates; `None` when
/// it holds fewer than two timestamps.
pub fn infer_frequency(sorted_distinct_micros: &[i64]) -> Option<Frequency> {
    let mut steps: Vec<i64> = sorted_distinct_micros
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .filter(|step| *step > 0)
        .collect();
    steps.sort_unstable();
    let mut best: Option<(i64, usize)> = None;
    for run in steps.chunk_by(|a, b| a == b) {
        // Runs arrive in ascending step order, so `>` keeps the smaller step on ties.
        if best.is_none_or(|(_, count)| run.len() > count) {
            best = Some((run[0], run.len()));
        }
    }
    best.and_then(|(step, _)| Frequency::from_micros(step))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(text: &str) -> i64 {
        Frequency::parse(text).unwrap().micros()
    }

    #[test]
    fn parses_short_long_and_pandas_style_units() {
        assert_eq!(micros("30s"), 30 * MICROS_PER_SECOND);
        assert_eq!(micros("15m"), 15 * MICROS_PER_MINUTE);
        assert_eq!(micros("15min"), 15 * MICROS_PER_MINUTE);
        assert_eq!(micros("15T"), 15 * MICROS_PER_MINUTE);
        assert_eq!(micros("1h"), MICROS_PER_HOUR);
        assert_eq!(micros("H"), MICROS_PER_HOUR);
        assert_eq!(micros(" 2 hours "), 2 * MICROS_PER_HOUR);
        assert_eq!(micros("1d"), MICROS_PER_DAY);
        assert_eq!(micros("D"), MICROS_PER_DAY);
        assert_eq!(micros("1w"), MICROS_PER_WEEK);
        assert_eq!(micros("250ms"), 250 * MICROS_PER_MILLI);
    }

    #[test]
    fn rejects_ambiguous_calendar_and_malformed_input() {
        for bad in [
            "",
            "0h",
            "M",
            "1M",
            "1mo",
            "1y",
            "5 parsecs",
            "h5",
            "-1h",
            "99999999999999999999s",
        ] {
            let err = Frequency::parse(bad).unwrap_err();
            assert_eq!(err.input, bad, "error should quote the input");
        }
        assert!(
            Frequency::parse("1M")
                .unwrap_err()
                .reason
                .contains("ambiguous")
        );
    }

    #[test]
    fn formats_with_the_largest_exact_unit_and_round_trips() {
        for (text, expected) in [
            ("120m", "2h"),
            ("90m", "90m"),
            ("24h", "1d"),
            ("14d", "2w"),
            ("1500ms", "1500ms"),
            ("60s", "1m"),
        ] {
            let frequency = Frequency::parse(text).unwrap();
            assert_eq!(frequency.to_string(), expected);
            assert_eq!(Frequency::parse(expected).unwrap(), frequency);
        }
        assert_eq!(Frequency::from_micros(7).unwrap().to_string(), "7us");
        assert_eq!(Frequency::parse("7us").unwrap().micros(), 7);
    }

    #[test]
    fn buckets_align_to_the_epoch_including_before_1970() {
        let hour = Frequency::parse("1h").unwrap();
        assert_eq!(hour.bucket_start(MICROS_PER_HOUR + 5), MICROS_PER_HOUR);
        assert_eq!(hour.bucket_start(-1), -MICROS_PER_HOUR);
        assert_eq!(hour.bucket_start(0), 0);
    }

    #[test]
    fn infers_the_most_common_step_and_prefers_the_smaller_on_ties() {
        let m = MICROS_PER_MINUTE;
        let ts = [0, 10 * m, 20 * m, 30 * m, 60 * m, 70 * m];
        assert_eq!(infer_frequency(&ts).unwrap().micros(), 10 * m);
        let tie = [0, 5 * m, 15 * m];
        assert_eq!(infer_frequency(&tie).unwrap().micros(), 5 * m);
        assert_eq!(infer_frequency(&[42]), None);
        assert_eq!(infer_frequency(&[]), None);
    }

    #[test]
    fn duration_conversions_agree() {
        let frequency = Frequency::parse("15m").unwrap();
        assert_eq!(frequency.to_duration(), TimeDelta::minutes(15));
        assert_eq!(
            Frequency::from_duration(TimeDelta::minutes(15)),
            Some(frequency)
        );
        assert_eq!(Frequency::from_duration(TimeDelta::zero()), None);
        assert_eq!(Frequency::from_duration(TimeDelta::nanoseconds(1500)), None);
    }

    #[test]
    fn serde_uses_the_text_form() {
        let frequency: Frequency = serde_json::from_str("\"1h\"").unwrap();
        assert_eq!(frequency.micros(), MICROS_PER_HOUR);
        assert_eq!(serde_json::to_string(&frequency).unwrap(), "\"1h\"");
        assert!(serde_json::from_str::<Frequency>("\"1M\"").is_err());
    }
}
