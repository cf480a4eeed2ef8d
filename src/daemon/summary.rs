//! The daemon's periodic capture summary: captures are not logged one by one, so every
//! [`EVERY`] each source logs one line with what its captures shipped and how far behind the
//! commits they were (issue 21, "a daemon that says what it does").

use std::time::{Duration, Instant};

/// How often a source's summary line is logged.
pub const EVERY: Duration = Duration::from_secs(15 * 60);

/// Captures of one source since its last summary line.
#[derive(Debug, Clone)]
pub struct CaptureTally {
    since: Instant,
    passes: u64,
    segments: u64,
    transactions: u64,
    bytes: u64,
    /// Commit-to-durable lag of each pass that shipped something, in seconds (PostgreSQL:
    /// from the last commit's timestamp; SQLite, which records no commit time: from the end
    /// of the previous pass, an upper bound).
    lags: Vec<f64>,
    last_pass: Option<Instant>,
}

impl Default for CaptureTally {
    fn default() -> Self {
        CaptureTally {
            since: Instant::now(),
            passes: 0,
            segments: 0,
            transactions: 0,
            bytes: 0,
            lags: Vec::new(),
            last_pass: None,
        }
    }
}

/// What one capture pass shipped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pass {
    pub segments: u64,
    pub transactions: u64,
    pub bytes: u64,
    /// Commit-to-durable lag, when the source knows the commit time.
    pub lag: Option<Duration>,
}

impl CaptureTally {
    /// Count one pass; a pass that shipped without a known commit time is charged the time
    /// since the previous pass ended.
    pub fn add(&mut self, pass: Pass) {
        let now = Instant::now();
        self.passes += 1;
        if pass.segments > 0 {
            self.segments += pass.segments;
            self.transactions += pass.transactions;
            self.bytes += pass.bytes;
            let lag = pass
                .lag
                .or_else(|| self.last_pass.map(|t| now.duration_since(t)));
            if let Some(lag) = lag {
                self.lags.push(lag.as_secs_f64());
            }
        }
        self.last_pass = Some(now);
    }

    /// The 99th percentile of the lags counted, in seconds.
    pub fn lag_p99(&self) -> Option<f64> {
        let mut lags = self.lags.clone();
        if lags.is_empty() {
            return None;
        }
        lags.sort_by(f64::total_cmp);
        let rank = ((lags.len() as f64) * 0.99).ceil() as usize;
        Some(lags[rank.clamp(1, lags.len()) - 1])
    }

    /// Log the summary line of `source` if [`EVERY`] has passed, and start again.
    pub fn log_if_due(&mut self, source: &str) {
        if self.since.elapsed() < EVERY {
            return;
        }
        let minutes = self.since.elapsed().as_secs() / 60;
        tracing::info!(
            source,
            passes = self.passes,
            segments = self.segments,
            transactions = self.transactions,
            bytes = self.bytes,
            lag_p99_s = self
                .lag_p99()
                .map(|l| format!("{l:.2}"))
                .unwrap_or_else(|| "-".into()),
            "captures in the last {minutes} min"
        );
        *self = CaptureTally {
            last_pass: self.last_pass,
            ..CaptureTally::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_is_the_rank_of_the_slowest_percent() {
        let mut tally = CaptureTally::default();
        assert_eq!(tally.lag_p99(), None);
        for ms in 1..=200u64 {
            tally.add(Pass {
                segments: 1,
                transactions: 1,
                bytes: 10,
                lag: Some(Duration::from_millis(ms * 10)),
            });
        }
        // 200 samples: the 198th smallest (1.98 s) is the 99th percentile.
        assert_eq!(tally.lag_p99(), Some(1.98));
        assert_eq!(
            (tally.segments, tally.transactions, tally.bytes),
            (200, 200, 2000)
        );
    }

    #[test]
    fn idle_passes_count_as_passes_only() {
        let mut tally = CaptureTally::default();
        tally.add(Pass::default());
        tally.add(Pass::default());
        assert_eq!((tally.passes, tally.segments), (2, 0));
        assert_eq!(tally.lag_p99(), None);
    }
}
