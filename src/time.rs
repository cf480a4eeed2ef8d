//! Instants as operators type them: RFC 3339, `latest`, or relative (`-90s`, `-15m`, `-2h`, `-3d`).
//!
//! Times are compact in object keys (`20261121T140307.123456Z`) so that listing a prefix gives
//! a sorted catalog without reading any object.

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::error::{Error, Result};

/// What `--at` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// The newest restorable instant.
    Latest,
    Instant(DateTime<Utc>),
}

/// Parse `--at` relative to `now`.
pub fn parse_at(text: &str, now: DateTime<Utc>) -> Result<At> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("latest") || t.eq_ignore_ascii_case("now") {
        return Ok(At::Latest);
    }
    if let Some(rel) = t.strip_prefix('-') {
        return parse_relative(rel)
            .map(|d| At::Instant(now - d))
            .ok_or_else(|| bad_time(text));
    }
    DateTime::parse_from_rfc3339(t)
        .map(|d| At::Instant(d.with_timezone(&Utc)))
        .map_err(|_| bad_time(text))
}

fn parse_relative(text: &str) -> Option<chrono::Duration> {
    let unit = text.chars().last()?;
    let n: i64 = text[..text.len() - unit.len_utf8()].parse().ok()?;
    match unit {
        's' => Some(chrono::Duration::seconds(n)),
        'm' => Some(chrono::Duration::minutes(n)),
        'h' => Some(chrono::Duration::hours(n)),
        'd' => Some(chrono::Duration::days(n)),
        _ => None,
    }
}

fn bad_time(text: &str) -> Error {
    Error::input(format!("cannot read the time {text:?}")).with_hint(
        "use RFC 3339 (2026-11-21T14:03:07Z or with an offset), `latest`, or -90s / -15m / -2h / -3d",
    )
}

const COMPACT: &str = "%Y%m%dT%H%M%S%.6fZ";

/// `20261121T140307.123456Z`: sortable, key-safe.
pub fn compact(t: DateTime<Utc>) -> String {
    t.format(COMPACT).to_string()
}

pub fn parse_compact(text: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(text, COMPACT)
        .ok()
        .map(|n| n.and_utc())
}

/// Truncate to microseconds, the precision stored everywhere.
pub fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).expect("in range")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_of_at() {
        let now = DateTime::parse_from_rfc3339("2026-11-21T14:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(parse_at("latest", now).unwrap(), At::Latest);
        assert_eq!(
            parse_at("-90s", now).unwrap(),
            At::Instant(now - chrono::Duration::seconds(90))
        );
        assert_eq!(
            parse_at("-3d", now).unwrap(),
            At::Instant(now - chrono::Duration::days(3))
        );
        assert_eq!(
            parse_at("2026-11-21T15:03:07+01:00", now).unwrap(),
            At::Instant(
                DateTime::parse_from_rfc3339("2026-11-21T14:03:07Z")
                    .unwrap()
                    .with_timezone(&Utc)
            )
        );
        assert!(parse_at("yesterday", now).is_err());
        assert!(parse_at("-5x", now).is_err());
    }

    #[test]
    fn compact_round_trips_and_sorts() {
        let a = micros(Utc::now());
        let b = a + chrono::Duration::microseconds(1);
        assert_eq!(parse_compact(&compact(a)), Some(a));
        assert!(compact(a) < compact(b));
    }
}
