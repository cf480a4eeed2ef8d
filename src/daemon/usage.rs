//! What the daemon costs each replica: requests by kind and bytes moved, since it started.
//!
//! Object stores bill per request, so a schedule that looks cheap in bytes can be expensive in
//! PUTs (Litestream users met 20 million requests a month at a 1 s sync interval). The daemon
//! publishes these counters in its lease record (`status --json` shows them under each
//! source's `daemon.replicas`) and logs them with a per-day extrapolation every
//! [`UsageLog::EVERY`], so the figure is visible before the bill. docs/COSTS.md has measured
//! numbers.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::repo::replica::RequestCounts;
use crate::repo::Repository;

/// One replica's counters as the daemon publishes them.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ReplicaUsage {
    pub name: String,
    pub requests: RequestCounts,
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub errors: u64,
    /// The replica's last call failed after all retries (it is in an outage).
    pub down: bool,
    /// While down: seconds since the replica last answered, so the writes it has been missing
    /// (the daemon catches it up once it answers again).
    pub unreachable_seconds: Option<f64>,
    pub last_error: Option<String>,
    /// Seconds the counters cover (since the daemon opened the repository).
    pub seconds: f64,
}

impl ReplicaUsage {
    /// `count` over `seconds`, scaled to a day.
    pub fn per_day(count: u64, seconds: f64) -> f64 {
        if seconds <= 0.0 {
            return 0.0;
        }
        count as f64 * 86_400.0 / seconds
    }
}

/// The counters of every replica now.
pub fn usage(repo: &Repository, since: Instant) -> Vec<ReplicaUsage> {
    let seconds = since.elapsed().as_secs_f64();
    repo.replicas()
        .replicas()
        .iter()
        .map(|r| {
            let h = r.health();
            ReplicaUsage {
                name: r.name().to_string(),
                requests: h.by_kind,
                bytes_written: h.bytes_written,
                bytes_read: h.bytes_read,
                errors: h.errors,
                down: h.down,
                unreachable_seconds: h.down.then(|| {
                    h.last_ok.map_or(seconds, |t| {
                        (chrono::Utc::now() - t).num_milliseconds() as f64 / 1000.0
                    })
                }),
                last_error: h.last_error.map(|e| crate::config::mask_url(&e)),
                seconds,
            }
        })
        .collect()
}

/// Logs every replica's usage and its per-day rate now and then.
pub struct UsageLog {
    started: Instant,
    next: Instant,
}

impl UsageLog {
    pub const EVERY: Duration = Duration::from_secs(15 * 60);

    pub fn new() -> Self {
        let started = Instant::now();
        UsageLog {
            started,
            next: started + Self::EVERY,
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn log_if_due(&mut self, repo: &Repository) {
        if Instant::now() < self.next {
            return;
        }
        self.next = Instant::now() + Self::EVERY;
        for u in usage(repo, self.started) {
            tracing::info!(
                replica = %u.name,
                put = u.requests.put,
                get = u.requests.get,
                list = u.requests.list,
                delete = u.requests.delete,
                bytes_written = u.bytes_written,
                requests_per_day = ReplicaUsage::per_day(u.requests.total(), u.seconds).round(),
                bytes_per_day = ReplicaUsage::per_day(u.bytes_written, u.seconds).round(),
                "replica usage"
            );
        }
    }
}

impl Default for UsageLog {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_day_scales_a_rate() {
        assert_eq!(ReplicaUsage::per_day(60, 60.0), 86_400.0);
        assert_eq!(ReplicaUsage::per_day(10, 0.0), 0.0);
    }
}
