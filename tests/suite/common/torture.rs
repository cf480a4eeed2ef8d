//! What the SQLite and PostgreSQL torture runs share: the writer's commit log, instants drawn
//! inside the restorable windows, and the check a restored instant must pass.

use std::path::Path;

use chrono::{DateTime, TimeZone, Utc};
use rand::Rng;
use timevault::catalog::Window;

/// One committed row: its number, when its commit began and when it had returned.
#[derive(Debug, Clone, Copy)]
pub struct Commit {
    pub k: i64,
    pub before: DateTime<Utc>,
    pub after: DateTime<Utc>,
}

fn at(seconds: f64) -> DateTime<Utc> {
    Utc.timestamp_micros((seconds * 1e6) as i64).unwrap()
}

/// The writer's log: one `k before after` line (Unix seconds) per committed row.
pub fn read_commits(log: &Path) -> Vec<Commit> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(Commit {
                k: f.first()?.parse().ok()?,
                before: at(f.get(1)?.parse().ok()?),
                after: at(f.get(2)?.parse().ok()?),
            })
        })
        .collect()
}

/// `count` instants drawn uniformly from the windows after `first` (at least 10 s of them).
pub fn instants_in(
    windows: &[Window],
    first: DateTime<Utc>,
    count: usize,
    rng: &mut impl Rng,
) -> Vec<DateTime<Utc>> {
    let spans: Vec<(DateTime<Utc>, DateTime<Utc>)> = windows
        .iter()
        .filter(|w| w.newest > first)
        .map(|w| (w.oldest.max(first), w.newest))
        .collect();
    let total: i64 = spans
        .iter()
        .map(|(a, b)| (*b - *a).num_microseconds().unwrap())
        .sum();
    assert!(total > 10_000_000, "windows too short: {windows:?}");
    (0..count)
        .map(|_| {
            let mut offset = rng.gen_range(0..total);
            spans
                .iter()
                .find_map(|(a, b)| {
                    let len = (*b - *a).num_microseconds().unwrap();
                    if offset <= len {
                        Some(*a + chrono::Duration::microseconds(offset))
                    } else {
                        offset -= len;
                        None
                    }
                })
                .unwrap()
        })
        .collect()
}

/// A restore to `instant` holds exactly rows 1..k: every row whose commit returned 2.5 s
/// before it, none whose commit began after it. Returns k.
pub fn check_rows(instant: DateTime<Utc>, got: &[i64], commits: &[Commit]) -> i64 {
    let k = got.len() as i64;
    assert!(
        got.iter().copied().eq(1..=k),
        "at {instant}: rows are not 1..{k}"
    );
    let slack = chrono::Duration::milliseconds(2500);
    for c in commits {
        if c.after + slack <= instant {
            assert!(
                c.k <= k,
                "at {instant}: row {} (committed by {}) missing; restored 1..{k}",
                c.k,
                c.after
            );
        }
        if c.before > instant {
            assert!(
                c.k > k,
                "at {instant}: row {} (commit began {}) present",
                c.k,
                c.before
            );
        }
    }
    k
}
