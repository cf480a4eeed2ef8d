//! Snapshot rows (COPY text) re-encoded as COPY binary on the client, so that the server
//! neither scans the rows for delimiters and escapes nor runs the types' text parsers.
//!
//! A snapshot stores rows as `COPY ... TO STDOUT` wrote them, in the source session's
//! fixed output state (sqlx starts every session with `DateStyle = ISO, MDY`,
//! `TimeZone = UTC`, `extra_float_digits = 2`, UTF-8). Loading text makes the target's
//! backend find every tab, newline and backslash byte by byte (`CopyReadLineText`,
//! `CopyReadAttributesText`) and parse every value (`pg_strtoint32`, `timestamptz_in`,
//! `byteain`, ...): on the benchmark's data set that was about a tenth of the server's CPU.
//! Measured on one table at a time, server side only (`COPY FROM` a file, three runs each):
//! `pgbench_accounts` 3.7-4.5 s as text, 2.6-3.5 s as binary; the fixture's
//! `contract_versions` (large text bodies) 3.9-4.9 s against 3.6-4.2 s. The client does the
//! splitting here with `memchr` and the conversions are a few integer operations each.
//!
//! Only types whose text form is fixed by that output state and whose binary form is simple
//! and stable across server versions are converted: booleans, integers, floats, numeric,
//! text-like types (`text`, `varchar`, `char(n)`, `json`), `jsonb`, `uuid`, `bytea` (hex
//! output), `date`, `timestamp` and `timestamptz`. A table with any other column type
//! (arrays, enums, domains, ranges, intervals, extension types) loads as text. A value the
//! parser does not recognise (a snapshot taken under another output state, say) is an
//! error of the conversion, and the caller loads that run as text instead: the binary
//! receive functions validate what they get as the text ones do, so a value is never taken
//! differently, it is refused.

use std::fmt;

use crate::stored::postgres::copy_text::copy_unescape_into;

/// The signature, flags and header extension length of a binary COPY stream.
pub const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The end of a binary COPY stream: a field count of -1.
pub const TRAILER: &[u8] = &[0xff, 0xff];

/// Days from 4713-11-24 BC (Julian day 0) to 2000-01-01, the binary formats' epoch.
const POSTGRES_EPOCH_JDATE: i64 = 2_451_545;

const USECS_PER_DAY: i64 = 86_400_000_000;

/// How one column's text is turned into its binary form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The text itself: `text`, `varchar`, `char(n)`, `json`.
    Text,
    /// Version byte 1, then the text.
    Jsonb,
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    Uuid,
    Bytea,
    Date,
    Timestamp,
    Timestamptz,
}

impl Kind {
    /// The conversion for a column of `format_type` output `type_sql`, if there is one.
    pub fn of(type_sql: &str) -> Option<Kind> {
        // An array of any of these is `text[]`, `numeric(10,2)[]`: not converted.
        if type_sql.ends_with(']') {
            return None;
        }
        let base = type_sql.split('(').next().unwrap_or(type_sql);
        let kind = match base {
            "text" | "json" => Kind::Text,
            "character varying" | "character" => Kind::Text,
            "jsonb" => Kind::Jsonb,
            "boolean" => Kind::Bool,
            "smallint" => Kind::Int2,
            "integer" => Kind::Int4,
            "bigint" => Kind::Int8,
            "real" => Kind::Float4,
            "double precision" => Kind::Float8,
            "numeric" => Kind::Numeric,
            "uuid" => Kind::Uuid,
            "bytea" => Kind::Bytea,
            "date" => Kind::Date,
            "timestamp without time zone" => Kind::Timestamp,
            "timestamp with time zone" => Kind::Timestamptz,
            // `timestamp(3) with time zone`: the modifier sits inside the name.
            "timestamp" => match type_sql.rsplit_once(") ") {
                Some((_, "without time zone")) => Kind::Timestamp,
                Some((_, "with time zone")) => Kind::Timestamptz,
                _ => return None,
            },
            _ => return None,
        };
        Some(kind)
    }
}

/// A value the conversion did not recognise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertError {
    /// The column, by position in the COPY's column list.
    pub column: usize,
    pub kind: Kind,
    /// The start of the value's text.
    pub value: String,
}

impl fmt::Display for ConvertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "column {} ({:?}): value {:?} is not in the expected text form",
            self.column + 1,
            self.kind,
            self.value
        )
    }
}

/// The conversion of one table's rows, column by column in COPY order.
#[derive(Debug, Clone)]
pub struct RowCodec {
    kinds: Vec<Kind>,
}

impl RowCodec {
    /// A codec for these column types (`format_type` output, COPY order), if every one of
    /// them converts.
    pub fn for_types<'a>(types: impl IntoIterator<Item = &'a str>) -> Option<RowCodec> {
        let kinds = types
            .into_iter()
            .map(Kind::of)
            .collect::<Option<Vec<_>>>()?;
        (!kinds.is_empty() && kinds.len() <= i16::MAX as usize).then_some(RowCodec { kinds })
    }

    /// Whole COPY text rows (each ending with a newline) as binary COPY tuples, appended to
    /// `out`.
    ///
    /// One SIMD pass finds every tab, newline and backslash; a backslash escapes the byte
    /// after it (as the server's parser has it), so only fields that hold one are decoded.
    pub fn convert(&self, text: &[u8], out: &mut Vec<u8>) -> Result<(), ConvertError> {
        out.reserve(text.len() + text.len() / 4);
        let mut scratch = Vec::new();
        let (mut column, mut start, mut escaped, mut skip_until) = (0, 0, false, 0);
        for at in memchr::memchr3_iter(b'\t', b'\n', b'\\', text) {
            if at < skip_until {
                continue;
            }
            let delimiter = text[at];
            if delimiter == b'\\' {
                (escaped, skip_until) = (true, at + 2);
                continue;
            }
            self.field(column, &text[start..at], escaped, out, &mut scratch)?;
            (column, start, escaped) = (column + 1, at + 1, false);
            if delimiter == b'\n' {
                self.row_end(column)?;
                column = 0;
            }
        }
        if start < text.len() {
            self.field(column, &text[start..], escaped, out, &mut scratch)?;
            self.row_end(column + 1)?;
        }
        Ok(())
    }

    /// Field `column` of a row (its tuple's field count first).
    fn field(
        &self,
        column: usize,
        raw: &[u8],
        escaped: bool,
        out: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
    ) -> Result<(), ConvertError> {
        if column == 0 {
            out.extend_from_slice(&(self.kinds.len() as i16).to_be_bytes());
        }
        let Some(&kind) = self.kinds.get(column) else {
            return Err(ConvertError {
                column,
                kind: Kind::Text,
                value: "(more fields than columns)".into(),
            });
        };
        if raw == b"\\N" {
            out.extend_from_slice(&(-1i32).to_be_bytes());
            return Ok(());
        }
        let value = if escaped {
            copy_unescape_into(raw, scratch);
            scratch.as_slice()
        } else {
            raw
        };
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        encode(kind, value, out).ok_or_else(|| ConvertError {
            column,
            kind,
            value: String::from_utf8_lossy(&raw[..raw.len().min(40)]).into_owned(),
        })?;
        let len = (out.len() - at - 4) as i32;
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }

    /// A row ended after `fields` fields: it must have had them all.
    fn row_end(&self, fields: usize) -> Result<(), ConvertError> {
        match self.kinds.get(fields) {
            None => Ok(()),
            Some(&kind) => Err(ConvertError {
                column: fields,
                kind,
                value: "(missing)".into(),
            }),
        }
    }
}

/// Append `value`'s binary form; `None` when it is not in the expected text form.
fn encode(kind: Kind, value: &[u8], out: &mut Vec<u8>) -> Option<()> {
    match kind {
        Kind::Text => out.extend_from_slice(value),
        Kind::Jsonb => {
            out.push(1);
            out.extend_from_slice(value);
        }
        Kind::Bool => out.push(match value {
            b"t" => 1,
            b"f" => 0,
            _ => return None,
        }),
        Kind::Int2 => out.extend_from_slice(&i16::try_from(int(value)?).ok()?.to_be_bytes()),
        Kind::Int4 => out.extend_from_slice(&i32::try_from(int(value)?).ok()?.to_be_bytes()),
        Kind::Int8 => out.extend_from_slice(&int(value)?.to_be_bytes()),
        Kind::Float4 => out.extend_from_slice(&float::<f32>(value)?.to_bits().to_be_bytes()),
        Kind::Float8 => out.extend_from_slice(&float::<f64>(value)?.to_bits().to_be_bytes()),
        Kind::Numeric => numeric(ascii(value)?, out)?,
        Kind::Uuid => uuid(value, out)?,
        Kind::Bytea => bytea(value, out)?,
        Kind::Date => out.extend_from_slice(&date(ascii(value)?)?.to_be_bytes()),
        Kind::Timestamp => out.extend_from_slice(&timestamp(ascii(value)?, false)?.to_be_bytes()),
        Kind::Timestamptz => out.extend_from_slice(&timestamp(ascii(value)?, true)?.to_be_bytes()),
    }
    Some(())
}

/// `-`, then decimal digits (what `int8out` writes), as an `i64`. Accumulated as a negative
/// number, so that `i64::MIN` fits.
fn int(value: &[u8]) -> Option<i64> {
    let (negative, digits) = match value.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, value),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_sub(i64::from(d - b'0'))?;
    }
    if negative {
        Some(v)
    } else {
        v.checked_neg()
    }
}

fn ascii(value: &[u8]) -> Option<&str> {
    value.is_ascii().then(|| std::str::from_utf8(value).ok())?
}

fn hex_digit(d: u8) -> Option<u8> {
    match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        b'A'..=b'F' => Some(d - b'A' + 10),
        _ => None,
    }
}

/// `float4out`'s and `float8out`'s forms: shortest exact digits (`extra_float_digits` > 0),
/// `NaN`, `Infinity`, `-Infinity`; each read as the type it is, correctly rounded.
fn float<F: std::str::FromStr>(value: &[u8]) -> Option<F> {
    let text = match ascii(value)? {
        "Infinity" => "inf",
        "-Infinity" => "-inf",
        "NaN" => "NaN",
        t if t
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.e".contains(&b)) =>
        {
            t
        }
        _ => return None,
    };
    text.parse().ok()
}

/// `numeric_send`'s form: digit count, weight (of the first base-10000 digit), sign, display
/// scale, then the base-10000 digits, each an `i16`.
fn numeric(text: &str, out: &mut Vec<u8>) -> Option<()> {
    let special = match text {
        "NaN" => Some(0xC000u16),
        "Infinity" => Some(0xD000),
        "-Infinity" => Some(0xF000),
        _ => None,
    };
    if let Some(sign) = special {
        for v in [0u16, 0, sign, 0] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        return Some(());
    }
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let digits_only = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits_only(int) || !digits_only(frac) || frac.len() > 0x3FFF {
        return None;
    }
    let int = int.trim_start_matches('0');
    // Base-10000 digits aligned on the decimal point: the integer part padded on the left,
    // the fraction on the right, to whole groups of four.
    let int_groups = int.len().div_ceil(4);
    let frac_groups = frac.len().div_ceil(4);
    let mut groups: Vec<i16> = Vec::with_capacity(int_groups + frac_groups);
    let group = |s: &str| -> i16 { s.bytes().fold(0i16, |v, b| v * 10 + i16::from(b - b'0')) };
    let lead = int.len() - (int_groups.saturating_sub(1)) * 4;
    if !int.is_empty() {
        groups.push(group(&int[..lead]));
        for i in 0..int_groups - 1 {
            groups.push(group(&int[lead + i * 4..lead + i * 4 + 4]));
        }
    }
    for i in 0..frac_groups {
        let piece = &frac[i * 4..frac.len().min(i * 4 + 4)];
        let pad = 10i16.pow(4 - piece.len() as u32);
        groups.push(group(piece) * pad);
    }
    let mut weight = int_groups as i32 - 1;
    let leading = groups.iter().take_while(|&&g| g == 0).count();
    groups.drain(..leading);
    weight -= leading as i32;
    while groups.last() == Some(&0) {
        groups.pop();
    }
    let (weight, sign) = if groups.is_empty() {
        (0, 0u16)
    } else {
        (
            i16::try_from(weight).ok()?,
            if negative { 0x4000 } else { 0 },
        )
    };
    out.extend_from_slice(&(groups.len() as i16).to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&(frac.len() as u16).to_be_bytes());
    for g in groups {
        out.extend_from_slice(&g.to_be_bytes());
    }
    Some(())
}

/// `8-4-4-4-12` hex digits as 16 bytes.
fn uuid(value: &[u8], out: &mut Vec<u8>) -> Option<()> {
    if value.len() != 36 || [8, 13, 18, 23].iter().any(|&i| value[i] != b'-') {
        return None;
    }
    let mut digits = value.iter().filter(|&&b| b != b'-');
    for _ in 0..16 {
        let hi = hex_digit(*digits.next()?)?;
        let lo = hex_digit(*digits.next()?)?;
        out.push(hi << 4 | lo);
    }
    Some(())
}

/// `byteaout`'s hex form, `\x` then two hex digits a byte.
fn bytea(value: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let hex = value.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    for pair in hex.chunks_exact(2) {
        out.push(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?);
    }
    Some(())
}

/// The Julian day of a proleptic Gregorian date (PostgreSQL's `date2j`).
fn date2j(year: i64, month: i64, day: i64) -> i64 {
    let (y, m) = if month > 2 {
        (year + 4800, month + 1)
    } else {
        (year + 4799, month + 13)
    };
    let century = y / 100;
    y * 365 - 32167 + y / 4 - century + century / 4 + 7834 * m / 256 + day
}

/// `YYYY-MM-DD` (four digits or more) with an optional ` BC`, as days from 2000-01-01;
/// `infinity` and `-infinity` as the extremes `date_send` uses.
fn date(text: &str) -> Option<i32> {
    if let Some(extreme) = infinite(text, i32::MAX, i32::MIN) {
        return Some(extreme);
    }
    let (text, bc) = strip_bc(text);
    let (days, rest) = ymd(text, bc)?;
    rest.is_empty().then_some(())?;
    i32::try_from(days).ok()
}

/// `infinity` and `-infinity` as the extremes the binary forms use for them.
fn infinite<T>(text: &str, max: T, min: T) -> Option<T> {
    match text {
        "infinity" => Some(max),
        "-infinity" => Some(min),
        _ => None,
    }
}

fn strip_bc(text: &str) -> (&str, bool) {
    match text.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (text, false),
    }
}

/// The date at the start of `text` as days from 2000-01-01, and what follows it.
fn ymd(text: &str, bc: bool) -> Option<(i64, &str)> {
    let dash = text.find('-')?;
    if dash < 4 {
        return None;
    }
    let year = digits(&text[..dash])?;
    let rest = &text[dash + 1..];
    let (month, day) = (digits(rest.get(..2)?)?, digits(rest.get(3..5)?)?);
    if rest.as_bytes().get(2) != Some(&b'-')
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
    {
        return None;
    }
    // 1 BC is year 0 of the proleptic calendar.
    let year = if bc { 1 - year } else { year };
    Some((date2j(year, month, day) - POSTGRES_EPOCH_JDATE, &rest[5..]))
}

fn digits(text: &str) -> Option<i64> {
    (!text.is_empty() && text.len() <= 9 && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse().ok())?
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]`, then for `timestamptz` the offset `+HH[:MM[:SS]]`, then an
/// optional ` BC`, as µs from 2000-01-01 00:00:00 (UTC for `timestamptz`); `infinity` and
/// `-infinity` as the extremes `timestamp_send` uses.
fn timestamp(text: &str, with_zone: bool) -> Option<i64> {
    if let Some(extreme) = infinite(text, i64::MAX, i64::MIN) {
        return Some(extreme);
    }
    let (text, bc) = strip_bc(text);
    let (days, rest) = ymd(text, bc)?;
    let rest = rest.strip_prefix(' ')?;
    let b = rest.as_bytes();
    if b.len() < 8 || b[2] != b':' || b[5] != b':' {
        return None;
    }
    let (h, m, s) = (
        digits(&rest[..2])?,
        digits(&rest[3..5])?,
        digits(&rest[6..8])?,
    );
    let mut rest = &rest[8..];
    let mut micros = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let len = frac.bytes().take_while(u8::is_ascii_digit).count();
        if len == 0 || len > 6 {
            return None;
        }
        micros = digits(&frac[..len])? * 10i64.pow(6 - len as u32);
        rest = &frac[len..];
    }
    let mut us = days * USECS_PER_DAY + ((h * 60 + m) * 60 + s) * 1_000_000 + micros;
    if with_zone {
        us -= offset(rest)? * 1_000_000;
    } else if !rest.is_empty() {
        return None;
    }
    Some(us)
}

/// `+HH`, `-HH:MM` or `+HH:MM:SS` as seconds east of UTC; nothing else may follow.
fn offset(text: &str) -> Option<i64> {
    let (sign, rest) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => return None,
    };
    let mut seconds = 0;
    let mut parts = 0;
    for part in rest.split(':') {
        if part.len() != 2 || parts == 3 {
            return None;
        }
        seconds = seconds * 60 + digits(part)?;
        parts += 1;
    }
    seconds *= 60i64.pow(3 - parts);
    Some(sign * seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(kind: Kind, text: &str) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        encode(kind, text.as_bytes(), &mut out).map(|_| out)
    }

    #[test]
    fn types_are_recognised_from_format_type() {
        assert_eq!(Kind::of("integer"), Some(Kind::Int4));
        assert_eq!(Kind::of("character varying(255)"), Some(Kind::Text));
        assert_eq!(Kind::of("character(84)"), Some(Kind::Text));
        assert_eq!(Kind::of("numeric(12,2)"), Some(Kind::Numeric));
        assert_eq!(
            Kind::of("timestamp(3) with time zone"),
            Some(Kind::Timestamptz)
        );
        assert_eq!(
            Kind::of("timestamp(0) without time zone"),
            Some(Kind::Timestamp)
        );
        assert_eq!(
            Kind::of("timestamp with time zone"),
            Some(Kind::Timestamptz)
        );
        for other in [
            "text[]",
            "numeric(10,2)[]",
            "interval",
            "mood",
            "public.email",
            "\"char\"",
            "inet",
        ] {
            assert_eq!(Kind::of(other), None, "{other}");
        }
        assert!(RowCodec::for_types(["integer", "text"]).is_some());
        assert!(RowCodec::for_types(["integer", "interval"]).is_none());
    }

    #[test]
    fn rows_become_tuples_with_nulls_and_escapes() {
        let codec = RowCodec::for_types(["integer", "text", "boolean"]).unwrap();
        let mut out = Vec::new();
        codec
            .convert(b"7\ta\\tb\\\\c\\nd\\101\\x42\tt\n-1\t\\N\tf\n", &mut out)
            .unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(&3i16.to_be_bytes());
        want.extend_from_slice(&4i32.to_be_bytes());
        want.extend_from_slice(&7i32.to_be_bytes());
        let text = b"a\tb\\c\ndAB";
        want.extend_from_slice(&(text.len() as i32).to_be_bytes());
        want.extend_from_slice(text);
        want.extend_from_slice(&1i32.to_be_bytes());
        want.push(1);
        want.extend_from_slice(&3i16.to_be_bytes());
        want.extend_from_slice(&4i32.to_be_bytes());
        want.extend_from_slice(&(-1i32).to_be_bytes());
        want.extend_from_slice(&(-1i32).to_be_bytes());
        want.extend_from_slice(&1i32.to_be_bytes());
        want.push(0);
        assert_eq!(out, want);
    }

    #[test]
    fn unrecognised_values_and_shapes_are_errors() {
        let codec = RowCodec::for_types(["integer", "date"]).unwrap();
        let mut out = Vec::new();
        let err = codec.convert(b"1\t03/12/2026\n", &mut out).unwrap_err();
        assert_eq!((err.column, err.value.as_str()), (1, "03/12/2026"));
        assert!(codec.convert(b"1\n", &mut out).is_err(), "a missing field");
        assert!(
            codec.convert(b"1\t2026-12-03\t3\n", &mut out).is_err(),
            "an extra field"
        );
        assert!(codec.convert(b"x\t2026-12-03\n", &mut out).is_err());
        assert!(
            codec
                .convert(b"99999999999\t2026-12-03\n", &mut out)
                .is_err(),
            "out of range"
        );
        assert_eq!(int(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(int(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(int(b"9223372036854775808"), None);
        assert_eq!(int(b"-"), None);
        assert_eq!(int(b"+1"), None);
    }

    #[test]
    fn dates_and_timestamps_count_from_2000() {
        assert_eq!(date("2000-01-01"), Some(0));
        assert_eq!(date("1999-12-31"), Some(-1));
        assert_eq!(date("2026-12-03"), Some(9833));
        assert_eq!(date("0001-01-01 BC"), Some(-730485));
        assert_eq!(date("12345-01-01"), Some(3778434));
        assert_eq!(date("infinity"), Some(i32::MAX));
        assert_eq!(date("2026-13-01"), None);
        assert_eq!(timestamp("2000-01-01 00:00:01.5", false), Some(1_500_000));
        assert_eq!(timestamp("2000-01-01 05:30:00+05:30", true), Some(0));
        assert_eq!(timestamp("1999-12-31 23:59:59-00:00:01", true), Some(0));
        assert_eq!(timestamp("2000-01-01 00:00:00+00", false), None);
        assert_eq!(timestamp("2000-01-01 00:00:00", true), None);
        assert_eq!(timestamp("-infinity", true), Some(i64::MIN));
    }

    #[test]
    fn numerics_are_base_10000_digits() {
        let words = |t: &str| -> Vec<i16> {
            one(Kind::Numeric, t)
                .unwrap()
                .chunks(2)
                .map(|c| i16::from_be_bytes([c[0], c[1]]))
                .collect()
        };
        // ndigits, weight, sign, dscale, digits...
        assert_eq!(words("12345.678"), vec![3, 1, 0, 3, 1, 2345, 6780]);
        assert_eq!(words("-0.0001"), vec![1, -1, 0x4000, 4, 1]);
        assert_eq!(words("0.00"), vec![0, 0, 0, 2]);
        assert_eq!(words("100000000"), vec![1, 2, 0, 0, 1]);
        assert_eq!(words("0.00001230"), vec![1, -2, 0, 8, 1230]);
        assert_eq!(words("NaN"), vec![0, 0, 0xC000u16 as i16, 0]);
        assert_eq!(one(Kind::Numeric, "1e5"), None);
        assert_eq!(one(Kind::Numeric, ".5"), None);
    }

    #[test]
    fn uuids_bytea_and_floats() {
        let u = one(Kind::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap();
        assert_eq!(u[..3], [0xa0, 0xee, 0xbc]);
        assert_eq!(u.len(), 16);
        assert_eq!(one(Kind::Uuid, "a0eebc999c0b4ef8bb6d6bb9bd380a11"), None);
        assert_eq!(one(Kind::Bytea, "\\x00fF"), Some(vec![0, 255]));
        assert_eq!(
            one(Kind::Bytea, "\\000"),
            None,
            "escape output is not converted"
        );
        assert_eq!(
            one(Kind::Float8, "0.1"),
            Some(0.1f64.to_bits().to_be_bytes().to_vec())
        );
        assert_eq!(
            one(Kind::Float4, "0.1"),
            Some(0.1f32.to_bits().to_be_bytes().to_vec())
        );
        assert_eq!(
            one(Kind::Float8, "-Infinity"),
            Some(f64::NEG_INFINITY.to_bits().to_be_bytes().to_vec())
        );
        assert_eq!(one(Kind::Float8, "inf"), None);
    }
}
