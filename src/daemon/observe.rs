//! What the daemon keeps up to date for `/metrics` and `/healthz`, and its drill job.
//!
//! Window edges come from one catalog listing per source at start and every
//! [`REFRESH`] after (pruning moves the oldest edge); in between, finished jobs move the newest
//! edge directly ([`Telemetry::note_progress`]), so no scrape ever lists a change log. The drill
//! job runs on `schedule.drill` in its own task with its own repository handle, so captures go
//! on while a drill restores.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;

use crate::catalog::Catalog;
use crate::config::SourceConfig;
use crate::config::{Config, CronSpec};
use crate::drill::{drill_source_with, DrillRecord};
use crate::error::Result;
use crate::metrics::{SourceGauges, Telemetry};
use crate::repo::Repository;

/// How often the catalogs are listed again.
pub const REFRESH: Duration = Duration::from_secs(600);

/// Read every source's catalog (and newest drill) into `telemetry`. A source whose catalog
/// cannot be listed keeps its previous gauges; the failure is logged.
pub async fn refresh(config: &Config, repo: &Repository, telemetry: &Telemetry) {
    for s in &config.sources {
        match gauges(repo, s).await {
            Ok(g) => telemetry.set_source(&s.name, g),
            Err(e) => {
                tracing::warn!(source = %s.name, error = %e, "could not list the catalog for metrics")
            }
        }
    }
}

/// The newest drill of every source, for metrics after a restart.
pub async fn load_drills(config: &Config, repo: &Repository, telemetry: &Telemetry) {
    for s in &config.sources {
        match DrillRecord::latest(repo, &s.name).await {
            Ok(Some(record)) => telemetry.set_drill(record),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(source = %s.name, error = %e, "could not read the last drill record")
            }
        }
    }
}

async fn gauges(repo: &Repository, source: &SourceConfig) -> Result<SourceGauges> {
    let catalog = Catalog::load(repo, source).await?;
    Ok(SourceGauges {
        kind: source.kind(),
        oldest: catalog.windows().first().map(|w| w.oldest),
        newest: catalog.newest(),
        last_snapshot: catalog.last_image(),
        streaming: None,
        tenant_unresolved: None,
    })
}

pub use crate::source::registry::segment_time;

/// `schedule.drill`: at most one drill of all sources at a time.
pub struct DrillJob {
    schedule: Option<CronSpec>,
    next: Option<DateTime<Utc>>,
    running: Option<JoinHandle<()>>,
}

impl DrillJob {
    pub fn new(schedule: Option<&CronSpec>) -> DrillJob {
        DrillJob {
            schedule: schedule.cloned(),
            next: super::next_snapshot(schedule, Utc::now()),
            running: None,
        }
    }

    /// Whether a drill is due and none runs.
    pub fn due(&self) -> bool {
        let running = self.running.as_ref().is_some_and(|h| !h.is_finished());
        !running && self.next.is_some_and(|t| t <= Utc::now())
    }

    /// Start a drill (call when [`DrillJob::due`]); `live` holds the SQLite sources' live
    /// checksums, read by their capture tasks just before.
    pub fn start(&mut self, config: &Config, telemetry: &Arc<Telemetry>, live: LivePoints) {
        self.next = super::next_snapshot(self.schedule.as_ref(), Utc::now());
        let (config, telemetry) = (config.clone(), telemetry.clone());
        self.running = Some(tokio::spawn(async move {
            drill_all(&config, &telemetry, &live).await;
        }));
    }

    /// Let a running drill finish (it removes its scratch targets) before the daemon exits.
    pub async fn finish(self) {
        if let Some(handle) = self.running {
            tracing::info!("waiting for the running restore drill to finish");
            let _ = handle.await;
        }
    }
}

/// Per SQLite source: its live checksums at an instant the change log restores exactly.
pub type LivePoints = std::collections::BTreeMap<String, crate::source::sqlite::LivePoint>;

/// Drill every source, reporting each as a `drill` job.
async fn drill_all(config: &Config, telemetry: &Telemetry, live: &LivePoints) {
    let repo = match Repository::open(config).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "restore drill: cannot open the repository");
            for s in &config.sources {
                telemetry.jobs().finished(
                    &s.name,
                    "drill",
                    Utc::now(),
                    std::time::Instant::now(),
                    Some(e.to_string()),
                );
            }
            return;
        }
    };
    for s in &config.sources {
        let (started_at, clock) = (Utc::now(), std::time::Instant::now());
        let error = match drill_source_with(&repo, s, live.get(&s.name)).await {
            Ok(record) => {
                let error = record.error.clone();
                telemetry.set_drill(record);
                error
            }
            Err(e) => {
                tracing::error!(source = %s.name, error = %e, "restore drill: the record could not be stored");
                Some(e.to_string())
            }
        };
        telemetry
            .jobs()
            .finished(&s.name, "drill", started_at, clock, error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_time_reads_the_capture_time_from_the_key() {
        let at = crate::time::micros(Utc::now());
        let key = crate::repo::layout::segment(
            "app",
            "20261121T000000.000000Z",
            7,
            &crate::time::compact(at),
            Some(3),
        );
        assert_eq!(segment_time(&key), Some(at));
        assert_eq!(segment_time("changelog/app/x/garbage"), None);
    }
}
