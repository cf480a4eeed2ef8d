//! Turning byte offsets into "file:line:column: key" so every config error says where it is.
//!
//! toml reports a byte span but not the key path; the path is recovered from the text: the
//! nearest table header above the span (with the index of an array-of-tables entry, as in
//! `replicas[1]`) plus the keys on the span's own line (including inline tables).

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use crate::error::Error;

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = floor_char_boundary(text, offset);
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// "origin:line:col: key: message" for a config error at `span`.
pub(super) fn located(
    origin: &Path,
    text: &str,
    span: Range<usize>,
    key: &str,
    msg: &str,
) -> Error {
    let (line, col) = line_col(text, span.start);
    let key = if key.is_empty() {
        String::new()
    } else {
        format!("{key}: ")
    };
    Error::config(format!("{}:{line}:{col}: {key}{msg}", origin.display()))
}

/// Convert a toml/serde error into a config error with location, key and hint.
pub(super) fn parse_error(text: &str, origin: &Path, err: &toml::de::Error) -> Error {
    let message = err.message().trim_end().replace('\n', "; ");
    let message = message.as_str();
    let (key, hint) = classify(message);
    let error = match err.span() {
        // A field missing from the top level: the span covers the whole document.
        _ if message == "missing field `repository`" => Error::config(format!(
            "{}: the [repository] table is missing",
            origin.display()
        )),
        Some(span) => {
            let key = if key {
                key_path_at(text, span.clone())
            } else {
                String::new()
            };
            located(origin, text, span, &key, message)
        }
        None => Error::config(format!("{}: {message}", origin.display())),
    };
    error.with_hint(hint)
}

/// Whether the message is about a key (so the key path helps) and what to try.
fn classify(message: &str) -> (bool, String) {
    let hint = if message.starts_with("unknown field") {
        "check the spelling against the keys listed; schedules/example-cloud.toml uses most of them"
            .to_string()
    } else if let Some(field) = message.strip_prefix("missing field ") {
        let field = field.trim_matches('`');
        match field {
            "repository" => {
                "add a [repository] table with one of key_file, key_env or passphrase_env".into()
            }
            _ => format!("add `{field} = ...` to this table"),
        }
    } else if message.starts_with("duplicate key") {
        "each key may appear only once in a table; remove one of them".to_string()
    } else if message.contains("expected a sequence") {
        "replicas and sources are arrays of tables: write [[replicas]] / [[sources]]".to_string()
    } else if message.contains("expected a string") {
        "quote the value: names, URLs, paths, durations, cron expressions and option values \
         are strings"
            .to_string()
    } else if message.starts_with("invalid type") || message.starts_with("invalid value") {
        "check the value's type against schedules/embedded.toml".to_string()
    } else {
        return (false, "check the TOML syntax at this position".to_string());
    };
    (true, hint)
}

/// The dotted key path at `span`, e.g. `replicas[1].options.endpoint`.
pub(super) fn key_path_at(text: &str, span: Range<usize>) -> String {
    let start = floor_char_boundary(text, span.start);
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let mut path = table_path_before(text, line_start);
    if text[line_start..line_end].trim_start().starts_with('[') {
        // The span is a table header: the error is about the table itself.
        return table_path_before(text, line_end);
    }
    let mut keys = inline_keys(&text[line_start..start]);
    if keys.last().is_none_or(|k| k.is_none()) {
        // The span starts at a key (unknown or duplicate field): name it.
        let token: String = text[start..line_end]
            .chars()
            .take_while(|c| c.is_alphanumeric() || matches!(c, '_' | '-'))
            .collect();
        if let Some(last) = keys.last_mut() {
            *last = Some(token);
        }
    }
    for key in keys.into_iter().flatten() {
        if key.is_empty() {
            continue;
        }
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(&key);
    }
    path
}

/// The table header in effect at byte `end`, with array indexes: `replicas[1].options`.
fn table_path_before(text: &str, end: usize) -> String {
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut current: Vec<String> = Vec::new();
    for line in text[..end].lines() {
        let line = line.trim();
        let (name, array) = if let Some(rest) = line.strip_prefix("[[") {
            (rest.split("]]").next().unwrap_or(""), true)
        } else if let Some(rest) = line.strip_prefix('[') {
            (rest.split(']').next().unwrap_or(""), false)
        } else {
            continue;
        };
        let segments: Vec<String> = name.split('.').map(|s| s.trim().to_string()).collect();
        let full = segments.join(".");
        if array {
            *counts.entry(full).or_insert(0) += 1;
        }
        current = segments;
    }
    let mut path = String::new();
    for i in 0..current.len() {
        if i > 0 {
            path.push('.');
        }
        path.push_str(&current[i]);
        if let Some(n) = counts.get(&current[..=i].join(".")) {
            path.push_str(&format!("[{}]", n.saturating_sub(1)));
        }
    }
    path
}

/// The keys enclosing the end of `prefix` (one line of TOML), one entry per inline-table depth;
/// `None` at the last depth when the position is where a key would start.
fn inline_keys(prefix: &str) -> Vec<Option<String>> {
    // Each frame: (is_inline_table, key seen at this depth).
    let mut frames: Vec<(bool, Option<String>)> = vec![(true, None)];
    let mut pending = String::new();
    let mut chars = prefix.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                let mut s = String::new();
                while let Some(d) = chars.next() {
                    if d == c {
                        break;
                    }
                    if d == '\\' && c == '"' {
                        chars.next();
                        continue;
                    }
                    s.push(d);
                }
                pending.push_str(&s);
            }
            '=' => {
                let key = std::mem::take(&mut pending).trim().to_string();
                if let Some(frame) = frames.last_mut().filter(|f| f.0) {
                    frame.1 = Some(key);
                }
            }
            '{' => {
                frames.push((true, None));
                pending.clear();
            }
            '[' => frames.push((false, None)),
            '}' | ']' => {
                if frames.len() > 1 {
                    frames.pop();
                }
                pending.clear();
            }
            ',' => {
                if let Some(frame) = frames.last_mut().filter(|f| f.0) {
                    frame.1 = None;
                }
                pending.clear();
            }
            '#' => break,
            c if c.is_whitespace() => {}
            c => pending.push(c),
        }
    }
    frames
        .into_iter()
        .filter(|(table, _)| *table)
        .map(|(_, key)| key)
        .collect()
}

fn floor_char_boundary(text: &str, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}
