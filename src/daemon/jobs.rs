//! The one place every daemon job reports its outcome.
//!
//! Snapshots, captures, blob scans, drills (and any job added later, such as prune) call
//! [`Jobs::report`] when they finish; the metrics endpoint exposes the last outcome and the
//! totals per (source, job). Jobs log their own failures (with their hints) where they happen.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;

/// How one run of one job ended.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct JobOutcome {
    /// The source the job worked on (`repository` for repository-wide jobs).
    pub source: String,
    /// `snapshot`, `capture`, `scan`, `drill`, `prune`...
    pub job: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub seconds: f64,
    pub ok: bool,
    pub error: Option<String>,
}

/// Totals per (source, job).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct JobTotals {
    pub ok: u64,
    pub failed: u64,
}

#[derive(Debug, Default)]
struct Board {
    last: BTreeMap<(String, String), JobOutcome>,
    totals: BTreeMap<(String, String), JobTotals>,
}

/// Shared by the daemon's tasks and the metrics endpoint; cloning shares the board.
#[derive(Debug, Clone, Default)]
pub struct Jobs {
    board: Arc<Mutex<Board>>,
}

impl Jobs {
    /// Record a finished job.
    pub fn report(&self, outcome: JobOutcome) {
        let key = (outcome.source.clone(), outcome.job.clone());
        let mut board = self.board.lock().expect("jobs lock");
        let totals = board.totals.entry(key.clone()).or_default();
        if outcome.ok {
            totals.ok += 1;
        } else {
            totals.failed += 1;
        }
        board.last.insert(key, outcome);
    }

    /// Record the outcome of a job that started at `started` (wall clock) and `clock`, and
    /// return it (the daemon also publishes it in its lease note for `status`).
    pub fn finished(
        &self,
        source: &str,
        job: &str,
        started_at: DateTime<Utc>,
        clock: std::time::Instant,
        error: Option<String>,
    ) -> JobOutcome {
        let outcome = JobOutcome {
            source: source.to_string(),
            job: job.to_string(),
            started_at,
            finished_at: Utc::now(),
            seconds: clock.elapsed().as_secs_f64(),
            ok: error.is_none(),
            error,
        };
        self.report(outcome.clone());
        outcome
    }

    /// The last outcome and the totals of every (source, job) seen, sorted.
    pub fn snapshot(&self) -> Vec<(JobOutcome, JobTotals)> {
        let board = self.board.lock().expect("jobs lock");
        board
            .last
            .iter()
            .map(|(key, last)| {
                (
                    last.clone(),
                    board.totals.get(key).copied().unwrap_or_default(),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_outcome_and_counts_both() {
        let jobs = Jobs::default();
        let at = Utc::now();
        let clock = std::time::Instant::now();
        jobs.finished("app", "capture", at, clock, None);
        jobs.finished("app", "capture", at, clock, Some("replica down".into()));
        jobs.finished("app", "snapshot", at, clock, None);
        let seen = jobs.snapshot();
        assert_eq!(seen.len(), 2);
        let (capture, totals) = &seen[0];
        assert_eq!(capture.job, "capture");
        assert!(!capture.ok);
        assert_eq!(capture.error.as_deref(), Some("replica down"));
        assert_eq!(*totals, JobTotals { ok: 1, failed: 1 });
    }
}
