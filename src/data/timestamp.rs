//! Timestamp parsing for ingest: every accepted form becomes epoch microseconds (UTC).
//!
//! Accepted forms:
//! - RFC 3339 with an offset or `Z`: `2024-03-10T02:30:00+01:00`, `2024-03-10 02:30:00.25Z`;
//! - local date-times without offset, `YYYY-MM-DD HH:MM[:SS[.fff]]` or with `T`, and plain
//!   dates `YYYY-MM-DD` (midnight), read in the import's time zone;
//! - epoch seconds, integer or fractional (`1700000000`, `1700000000.5`, `-12.25`).
//!
//! Local times that do not exist (skipped by a DST jump) are errors. Local times that occur
//! twice (the repeated hour when clocks fall back) take the EARLIER offset, i.e. the first
//! occurrence, which is the one a logger writing in local time reaches first.

use chrono::{LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone};
use chrono_tz::Tz;

const MICROS_PER_SECOND: i64 = 1_000_000;

/// Parses one timestamp cell; the error text explains what was wrong and which forms are
/// accepted (callers add the line and column).
pub fn parse_timestamp_micros(text: &str, timezone: Tz) -> Result<i64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("timestamp is empty".to_string());
    }
    let bytes = text.as_bytes();
    if bytes.len() >= 10 && bytes[4] == b'-' && bytes[7] == b'-' {
        return parse_date_time(text, timezone);
    }
    if bytes[0].is_ascii_digit() || bytes[0] == b'-' || bytes[0] == b'+' || bytes[0] == b'.' {
        return parse_epoch_seconds(text);
    }
    Err(unrecognised(text))
}

fn unrecognised(text: &str) -> String {
    format!(
        "cannot parse timestamp '{text}': expected RFC 3339 (2024-01-31T13:00:00Z or +01:00), \
         'YYYY-MM-DD HH:MM:SS[.fff]' or epoch seconds"
    )
}

fn parse_epoch_seconds(text: &str) -> Result<i64, String> {
    let (negative, unsigned) = match text.as_bytes()[0] {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !all_digits(whole) || !all_digits(fraction) {
        return Err(unrecognised(text));
    }
    let out_of_range = || format!("epoch seconds '{text}' are out of range");
    let seconds: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| out_of_range())?
    };
    // Exact decimal arithmetic: a seventh fractional digit of 5 or more rounds up.
    let kept = &fraction[..fraction.len().min(6)];
    let mut fraction_micros: i64 = if kept.is_empty() {
        0
    } else {
        kept.parse::<i64>().map_err(|_| unrecognised(text))? * 10_i64.pow(6 - kept.len() as u32)
    };
    if fraction
        .as_bytes()
        .get(6)
        .is_some_and(|digit| *digit >= b'5')
    {
        fraction_micros += 1;
    }
    let magnitude = seconds
        .checked_mul(MICROS_PER_SECOND)
        .and_then(|micros| micros.checked_add(fraction_micros))
        .ok_or_else(out_of_range)?;
    Ok(if negative { -magnitude } else { magnitude })
}

/// Parses `YYYY-MM-DD[( |T)HH:MM[:SS[.f+]]][Z|±HH:MM|±HHMM|±HH]`.
fn parse_date_time(text: &str, timezone: Tz) -> Result<i64, String> {
    let bad = || unrecognised(text);
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Result<u32, String> {
        let part = text.get(range).ok_or_else(bad)?;
        if part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let year = number(0..4)? as i32;
    let month = number(5..7)?;
    let day = number(8..10)?;
    let date = NaiveDate::from_ymd_opt(year, month, day)
        .ok_or_else(|| format!("'{text}' is not a valid calendar date"))?;
    if bytes.len() == 10 {
        return local_to_utc_micros(date.and_time(NaiveTime::MIN), timezone, text);
    }
    if !matches!(bytes[10], b'T' | b't' | b' ') || bytes.len() < 16 || bytes[13] != b':' {
        return Err(bad());
    }
    let hour = number(11..13)?;
    let minute = number(14..16)?;
    let mut position = 16;
    let mut second = 0;
    let mut nanos = 0;
    if bytes.get(position) == Some(&b':') {
        second = number(17..19)?;
        position = 19;
        if bytes.get(position) == Some(&b'.') {
            position += 1;
            let digits_start = position;
            while bytes.get(position).is_some_and(u8::is_ascii_digit) {
                position += 1;
            }
            let digits = &text[digits_start..position];
            if digits.is_empty() {
                return Err(bad());
            }
            // Keep nanosecond precision here; conversion to micros truncates below.
            let kept = &digits[..digits.len().min(9)];
            nanos = kept.parse::<u32>().map_err(|_| bad())? * 10_u32.pow(9 - kept.len() as u32);
        }
    }
    let time = NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)
        .ok_or_else(|| format!("'{text}' is not a valid time of day"))?;
    let naive = date.and_time(time);
    let offset_text = &text[position..];
    if offset_text.is_empty() {
        return local_to_utc_micros(naive, timezone, text);
    }
    let offset_seconds = parse_offset_seconds(offset_text).ok_or_else(bad)?;
    Ok(naive.and_utc().timestamp_micros() - i64::from(offset_seconds) * MICROS_PER_SECOND)
}

/// `Z`, `±HH:MM`, `±HHMM` or `±HH` (optionally after one space) as seconds east of UTC.
fn parse_offset_seconds(text: &str) -> Option<i32> {
    let text = text.strip_prefix(' ').unwrap_or(text);
    if text == "Z" || text == "z" {
        return Some(0);
    }
    let sign = match text.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digits: String = text[1..].chars().filter(|c| *c != ':').collect();
    let colon_ok = match text.len() {
        6 => text.as_bytes()[3] == b':',
        3 | 5 => !text.contains(':'),
        _ => false,
    };
    if !colon_ok || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let hours: i32 = digits.get(0..2)?.parse().ok()?;
    let minutes: i32 = if digits.len() == 4 {
        digits[2..4].parse().ok()?
    } else {
        0
    };
    if hours > 23 || minutes > 59 {
        return None;
    }
    Some(sign * (hours * 3600 + minutes * 60))
}

fn local_to_utc_micros(naive: NaiveDateTime, timezone: Tz, text: &str) -> Result<i64, String> {
    if timezone == Tz::UTC {
        return Ok(naive.and_utc().timestamp_micros());
    }
    match timezone.from_local_datetime(&naive) {
        LocalResult::Single(datetime) => Ok(datetime.timestamp_micros()),
        LocalResult::Ambiguous(earlier, _later) => Ok(earlier.timestamp_micros()),
        LocalResult::None => Err(format!(
            "local time '{text}' does not exist in time zone {} (skipped by a daylight-saving \
             change); write it with an explicit UTC offset",
            timezone.name()
        )),
    }
}

/// Parses an IANA time zone name such as `Europe/Berlin` or `UTC`.
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    name.trim().parse::<Tz>().map_err(|_| {
        format!("unknown time zone '{name}': expected an IANA name such as UTC or Europe/Berlin")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UTC: Tz = Tz::UTC;
    const BERLIN: Tz = chrono_tz::Europe::Berlin;

    fn utc_micros(text: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_micros()
    }

    #[test]
    fn rfc3339_with_offsets_and_fractions() {
        assert_eq!(
            parse_timestamp_micros("2024-01-31T13:00:00Z", BERLIN).unwrap(),
            utc_micros("2024-01-31T13:00:00Z")
        );
        assert_eq!(
            parse_timestamp_micros("2024-01-31T13:00:00.123456+01:00", UTC).unwrap(),
            utc_micros("2024-01-31T12:00:00.123456Z")
        );
        assert_eq!(
            parse_timestamp_micros("2024-01-31 13:00:00-0530", UTC).unwrap(),
            utc_micros("2024-01-31T18:30:00Z")
        );
        assert_eq!(
            parse_timestamp_micros("2024-01-31T13:00:00.5+02", UTC).unwrap(),
            utc_micros("2024-01-31T11:00:00.5Z")
        );
    }

    #[test]
    fn naive_forms_use_the_time_zone() {
        assert_eq!(
            parse_timestamp_micros("2024-01-31 13:00:00", UTC).unwrap(),
            utc_micros("2024-01-31T13:00:00Z")
        );
        assert_eq!(
            parse_timestamp_micros("2024-01-31T13:00:00.250", BERLIN).unwrap(),
            utc_micros("2024-01-31T12:00:00.25Z")
        );
        assert_eq!(
            parse_timestamp_micros("2024-07-01 13:00", BERLIN).unwrap(),
            utc_micros("2024-07-01T11:00:00Z")
        );
        assert_eq!(
            parse_timestamp_micros("2024-07-01", BERLIN).unwrap(),
            utc_micros("2024-06-30T22:00:00Z")
        );
    }

    #[test]
    fn dst_gap_is_an_error_and_overlap_takes_the_earlier_offset() {
        // Berlin springs forward 2024-03-31 02:00 -> 03:00; 02:30 never happens.
        let gap = parse_timestamp_micros("2024-03-31 02:30:00", BERLIN).unwrap_err();
        assert!(gap.contains("does not exist"), "{gap}");
        // Berlin falls back 2024-10-27 03:00 -> 02:00; 02:30 happens at +02:00 and +01:00.
        assert_eq!(
            parse_timestamp_micros("2024-10-27 02:30:00", BERLIN).unwrap(),
            utc_micros("2024-10-27T00:30:00Z")
        );
    }

    #[test]
    fn epoch_seconds_integer_fractional_and_negative() {
        assert_eq!(
            parse_timestamp_micros("1700000000", BERLIN).unwrap(),
            1_700_000_000_000_000
        );
        assert_eq!(
            parse_timestamp_micros("1700000000.5", UTC).unwrap(),
            1_700_000_000_500_000
        );
        assert_eq!(
            parse_timestamp_micros("1700000000.1234567", UTC).unwrap(),
            1_700_000_000_123_457
        );
        assert_eq!(parse_timestamp_micros("-1.25", UTC).unwrap(), -1_250_000);
        assert_eq!(parse_timestamp_micros(".5", UTC).unwrap(), 500_000);
    }

    #[test]
    fn rejects_garbage_with_a_helpful_message() {
        for bad in [
            "yesterday",
            "2024-13-01",
            "2024-02-30 00:00",
            "2024-01-01X00:00",
            "12:00",
            "1e9",
            "-",
            "2024-01-01 25:00",
            "2024-01-01T00:00:00+25:00",
            "2024-01-01T00:00:00.",
        ] {
            assert!(
                parse_timestamp_micros(bad, UTC).is_err(),
                "{bad} should be rejected"
            );
        }
        let empty = parse_timestamp_micros("  ", UTC).unwrap_err();
        assert!(empty.contains("empty"));
        let message = parse_timestamp_micros("yesterday", UTC).unwrap_err();
        assert!(
            message.contains("'yesterday'") && message.contains("RFC 3339"),
            "{message}"
        );
    }

    #[test]
    fn time_zone_names() {
        assert_eq!(parse_timezone("Europe/Berlin").unwrap(), BERLIN);
        assert_eq!(parse_timezone("UTC").unwrap(), UTC);
        assert!(
            parse_timezone("Mars/Olympus")
                .unwrap_err()
                .contains("Mars/Olympus")
        );
    }
}
