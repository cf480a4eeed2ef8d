//! One source's own task: its schedule, its lease, its jobs.
//!
//! Each source runs in a task of its own, so a two-hour PostgreSQL snapshot or the first scan of
//! a large bucket never stops another source's capture. Within a task jobs never overlap: the
//! source's capture waits while its own snapshot runs, and its previous chain keeps its window
//! until the new chain is complete. The task renews its lease while a job runs (every ttl/3)
//! and between jobs; a lease lost to another holder ends the task with an error, which stops
//! the daemon.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::running::{note_continuity, renew, run_job};
use super::{next_snapshot, usage, SourceRun};
use crate::config::ScheduleConfig;
use crate::error::Result;
use crate::metrics::Telemetry;
use crate::repo::{Lease, Repository};
use crate::source::registry::Source;
use crate::source::sqlite::LivePoint;

/// A request for a SQLite source's live checksums (for a drill), answered between jobs by the
/// task that captures the source: the only one that can pin the exact instant.
pub type LiveRequest = oneshot::Sender<Result<LivePoint>>;

/// Everything a source's task owns.
pub struct SourceTask {
    pub repo: Repository,
    pub source: Box<dyn Source>,
    pub lease: Lease,
    pub schedule: ScheduleConfig,
    /// How often the lease is renewed (`lease_ttl / 3`).
    pub renew_every: Duration,
    pub telemetry: Arc<Telemetry>,
    /// `--once`: one pass, then close once every source's pass is done (so each database's
    /// final capture comes after every blob scan, and a group restore at `latest` finds an
    /// instant all of them reach, as a daemon that keeps running would).
    pub once: Option<Arc<tokio::sync::Barrier>>,
    /// When the daemon started (per-day request rates in the run record).
    pub started: Instant,
    /// Live-checksum requests (SQLite sources only).
    pub live: Option<mpsc::Receiver<LiveRequest>>,
}

/// When this source's scheduled jobs are next due.
struct Due {
    snapshot: Option<chrono::DateTime<Utc>>,
    scan: Option<chrono::DateTime<Utc>>,
    first: bool,
}

impl SourceTask {
    /// Run until `token` is cancelled (or one pass with `once`), then ship what is pending and
    /// release the lease. An error means the lease was lost: the caller stops the daemon.
    pub async fn run(mut self, token: CancellationToken) -> Result<SourceRun> {
        let mut run = SourceRun {
            source: self.source.name().to_string(),
            ..Default::default()
        };
        let result = self.schedule_loop(&mut run, &token).await;
        if let Some(passes_done) = &self.once {
            // A task that ended abnormally never arrives: the daemon cancels the token then.
            tokio::select! {
                _ = passes_done.wait() => {}
                _ = token.cancelled() => {}
            }
        }
        self.close(&mut run).await;
        result.map(|()| run)
    }

    async fn schedule_loop(
        &mut self,
        run: &mut SourceRun,
        token: &CancellationToken,
    ) -> Result<()> {
        let interval = self.schedule.capture_interval;
        let renew_every = self.renew_every;
        let mut next_renew = tokio::time::Instant::now() + renew_every;
        let mut published_capture = run.capture.clone();
        let now = Utc::now();
        let mut due = Due {
            snapshot: next_snapshot(self.schedule.snapshot.as_ref(), now),
            scan: next_snapshot(self.schedule.blob_scan.as_ref(), now),
            first: true,
        };
        loop {
            // Passes start every `capture_interval` (not an interval after the previous pass
            // ended): a change waits at most one interval plus one pass before it is shipped.
            let pass_started = tokio::time::Instant::now();
            self.pass(run, &mut due).await?;
            if self.once.is_some() || token.is_cancelled() {
                return Ok(());
            }
            // A new capture method (the first pass, a fallback to polling) is published at
            // once, not with the next renewal: `status` shows it within a pass.
            if run.capture != published_capture {
                published_capture = run.capture.clone();
                next_renew = tokio::time::Instant::now();
            }
            if tokio::time::Instant::now() >= next_renew {
                next_renew = tokio::time::Instant::now() + renew_every;
                if !renew(&self.repo, &mut self.lease).await? {
                    // Retry soon; jobs pause once the lease runs out.
                    next_renew = tokio::time::Instant::now() + interval;
                }
            }
            self.wait(pass_started + interval, token).await;
        }
    }

    /// One pass: the job due now, if the lease is live.
    async fn pass(&mut self, run: &mut SourceRun, due: &mut Due) -> Result<()> {
        let now = Utc::now();
        let snapshot_due = due.snapshot.is_some_and(|t| t <= now);
        let scan_due = due.first || self.once.is_some() || due.scan.is_some_and(|t| t <= now);
        due.first = false;
        if snapshot_due {
            due.snapshot = next_snapshot(self.schedule.snapshot.as_ref(), Utc::now());
        }
        if scan_due {
            due.scan = next_snapshot(self.schedule.blob_scan.as_ref(), Utc::now());
        }
        if self.lease.expires_at() <= Utc::now() {
            // Not renewed in time (the replicas were unreachable): no writes without it.
            return Ok(());
        }
        self.job(run, snapshot_due, scan_due).await
    }

    /// The job due (if any), with the lease renewed while it runs, then its outcome reported.
    async fn job(&mut self, run: &mut SourceRun, snapshot_due: bool, scan_due: bool) -> Result<()> {
        let started = Instant::now();
        let started_at = Utc::now();
        let (errors, progress) = (run.errors, run.snapshots + run.segments);
        let work = run_job(
            &self.repo,
            self.source.as_mut(),
            run,
            snapshot_due,
            scan_due,
        );
        let (job, renewed) = self.repo.renewing(&mut [&mut self.lease], work).await;
        renewed?;
        let Some(job) = job else {
            return Ok(());
        };
        note_continuity(self.source.as_mut(), run, &self.telemetry);
        if let Some(image) = run.schema_image.take() {
            // Its own job: a failing image does not fail the capture, and must not be silent.
            self.telemetry.jobs().finished(
                &run.source,
                "schema-image",
                started_at,
                started,
                image.err(),
            );
        }
        let failed = run.errors > errors;
        let error = failed.then(|| run.last_error.clone()).flatten();
        let outcome = self
            .telemetry
            .jobs()
            .finished(&run.source, job, started_at, started, error);
        self.telemetry
            .note_progress(&run.source, run.newest, run.last_snapshot);
        self.repo.check_tenant_keks().await;
        self.telemetry
            .set_tenant_keks(self.repo.tenant_kek_states());
        if run.tenant_unresolved > 0 {
            self.telemetry
                .note_tenant_unresolved(&run.source, run.tenant_unresolved);
        }
        if let Some(capture) = &run.capture {
            let streaming = capture.method == crate::source::postgres::CaptureMethod::Streaming;
            self.telemetry.note_capture_method(&run.source, streaming);
        }
        if failed || run.snapshots + run.segments > progress {
            run.last_job = Some(outcome);
            run.replicas = usage::usage(&self.repo, self.started);
        }
        // Published with the next renewal (no write of its own).
        self.lease
            .set_note(serde_json::to_value(&*run).expect("run serializes"));
        Ok(())
    }

    /// Sleep until `until`, answering live-checksum requests meanwhile.
    async fn wait(&mut self, until: tokio::time::Instant, token: &CancellationToken) {
        loop {
            let request = async {
                match self.live.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let reply = tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep_until(until) => return,
                Some(reply) = request => reply,
            };
            if let Some(point) = self.source.live_point(&self.repo).await {
                let _ = reply.send(point);
            }
        }
    }

    /// Ship what is pending, release the WAL and the lease.
    async fn close(self, run: &mut SourceRun) {
        let closed = self.source.close(&self.repo).await;
        if let Err(e) = closed {
            run.errors += 1;
            run.last_error = Some(e.to_string());
            tracing::error!(source = %run.source, error = %e, "final capture failed");
        }
        if let Err(e) = self.repo.release_lease(self.lease).await {
            tracing::warn!(source = %run.source, error = %e, "could not release the lease");
        }
    }
}
