//! A source the daemon runs, and one job of it: a snapshot, a capture or a scan.

use chrono::Utc;

use super::{observe, summary, SourceRun};
use crate::config::{SourceConfig, SourceKind};
use crate::error::{Error, ErrorKind, Result};
use crate::metrics::Telemetry;
use crate::repo::{Lease, Repository};
use crate::source::blobs::BlobSource;
use crate::source::postgres::preflight::preflight;
use crate::source::postgres::PostgresSource;
use crate::source::sqlite::SqliteSource;

/// The job due for one source (a snapshot, capture or scan); `None` when none is due.
pub(super) async fn run_job(
    repo: &Repository,
    source: &mut Running,
    run: &mut SourceRun,
    snapshot_due: bool,
    scan_due: bool,
) -> Option<&'static str> {
    Some(match source {
        Running::Sqlite(s) => {
            let snapshot = snapshot_due || !s.has_chain();
            step(repo, s, run, snapshot).await;
            if snapshot {
                "snapshot"
            } else {
                "capture"
            }
        }
        Running::Postgres(p) => {
            let snapshot = snapshot_due || !p.has_chain();
            step_postgres(repo, p, run, snapshot).await;
            if snapshot {
                "snapshot"
            } else {
                "capture"
            }
        }
        Running::Blobs(b) if scan_due || b.last_scan().is_none() => {
            scan(repo, b, run).await;
            "scan"
        }
        Running::Blobs(_) => return None,
    })
}

/// A hole the step found is counted and fails `/healthz` until a new chain has started and
/// `max_capture_lag` has passed; the run's record (published in the lease) shows it.
pub(super) fn note_continuity(source: &mut Running, run: &mut SourceRun, telemetry: &Telemetry) {
    if let Some(reason) = source.take_loss() {
        telemetry.continuity_lost(&run.source, &reason, Utc::now());
    }
    let pending = telemetry
        .continuity(&run.source)
        .is_some_and(|c| c.recovered_at.is_none());
    if pending && source.has_chain() {
        if let Some(at) = run.last_snapshot {
            telemetry.continuity_recovered(&run.source, at);
            tracing::info!(source = %run.source, chain_start = %at.to_rfc3339(), "continuity restored: a new chain started");
        }
    }
    run.continuity = telemetry.continuity(&run.source);
}

/// Renew one lease. Another holder ends the run; unreachable replicas (too few for the quorum)
/// do not: the lease stays ours until it expires, and renewal is retried (false).
pub(super) async fn renew(repo: &Repository, lease: &mut Lease) -> Result<bool> {
    match repo.renew_lease(lease).await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::Unavailable => {
            tracing::warn!(lease = %lease.scope(), error = %e, expires_at = %lease.expires_at(), "cannot renew the lease; jobs pause if it expires before the replicas return");
            Ok(false)
        }
        Err(e) => Err(Error::new(
            ErrorKind::Locked,
            format!("lost the lease {}: {e}", lease.scope()),
        )),
    }
}

/// A source the daemon is running.
pub enum Running {
    Sqlite(SqliteSource),
    Postgres(PostgresSource),
    Blobs(BlobSource),
}

impl Running {
    pub(super) async fn open(
        config: &SourceConfig,
        tenancy: Option<&crate::tenancy::TenancyConfig>,
        repo: &Repository,
    ) -> Result<Running> {
        Ok(match config.kind {
            SourceKind::Sqlite => Running::Sqlite(
                SqliteSource::open(&config.name, std::path::Path::new(&config.url), repo).await?,
            ),
            SourceKind::Blobs => Running::Blobs(
                BlobSource::open(&config.name, &config.url, &config.options, repo).await?,
            ),
            SourceKind::Postgres => {
                // Refuse to start on a server that would break the application or lose changes.
                preflight(&config.url).await?.check()?;
                let mut source = PostgresSource::open_configured(config, tenancy, repo).await?;
                // The lease note confirms idle passes (`SourceRun::confirmed_until`).
                source.confirm_idle_passes();
                Running::Postgres(source)
            }
        })
    }

    /// A continuity loss the source detected since the last call.
    pub(super) fn take_loss(&mut self) -> Option<String> {
        match self {
            Running::Sqlite(s) => s.take_loss(),
            Running::Postgres(p) => p.take_loss(),
            Running::Blobs(_) => None,
        }
    }

    /// Whether the source continues a chain (false: the next step takes a snapshot).
    pub(super) fn has_chain(&self) -> bool {
        match self {
            Running::Sqlite(s) => s.has_chain(),
            Running::Postgres(p) => p.has_chain(),
            Running::Blobs(_) => true,
        }
    }

    pub(super) fn name(&self) -> &str {
        match self {
            Running::Sqlite(s) => s.name(),
            Running::Postgres(p) => p.name(),
            Running::Blobs(b) => b.name(),
        }
    }
}

/// One PostgreSQL step: a snapshot when due or needed, else a capture.
async fn step_postgres(
    repo: &Repository,
    source: &mut PostgresSource,
    run: &mut SourceRun,
    snapshot: bool,
) {
    let result = if snapshot {
        source.snapshot(repo).await.map(|s| {
            run.snapshots += 1;
            run.last_snapshot = Some(s.taken_at);
            tracing::info!(source = %run.source, chain = %s.chain, rows = s.rows, bytes = s.bytes, "snapshot taken");
        })
    } else {
        // The heartbeat's commit time, once everything before it is stored, confirms the
        // window up to it (published in the lease note; an idle pass stores nothing).
        source.capture(repo).await.map(|c| {
            if c.confirmed.is_some() {
                run.confirmed_until = c.confirmed;
            }
            run.schema_image = c.schema_image.clone();
            run.segments += c.segments.len() as u64;
            run.transactions += c.transactions;
            run.newest = run.newest.max(c.newest);
            run.tally.add(summary::Pass {
                segments: c.segments.len() as u64,
                transactions: c.transactions,
                bytes: c.uploaded,
                lag: c
                    .newest
                    .filter(|_| !c.segments.is_empty())
                    .and_then(|t| (crate::clock::now() - t).to_std().ok()),
            });
            run.tally.log_if_due(&run.source);
        })
    };
    if let Err(e) = result {
        run.errors += 1;
        run.last_error = Some(e.to_string());
        tracing::error!(source = %run.source, error = %e, hint = e.hint().unwrap_or(""), "job failed");
    }
}

/// One blob scan.
async fn scan(repo: &Repository, source: &mut BlobSource, run: &mut SourceRun) {
    match source.scan(repo).await {
        Ok(stats) => {
            run.snapshots += 1;
            run.last_snapshot = Some(stats.scanned_at);
            tracing::info!(source = %run.source, objects = stats.objects, new = stats.new, changed = stats.changed, deleted = stats.deleted, uploaded = stats.bytes_uploaded, "blob scan done");
        }
        Err(e) => {
            run.errors += 1;
            run.last_error = Some(e.to_string());
            tracing::error!(source = %run.source, error = %e, hint = e.hint().unwrap_or(""), "blob scan failed");
        }
    }
}

/// One scheduling step for one source: a snapshot when due or needed, else a capture.
async fn step(repo: &Repository, source: &mut SqliteSource, run: &mut SourceRun, snapshot: bool) {
    let result = if snapshot {
        source.snapshot(repo).await.map(|s| {
            run.snapshots += 1;
            run.last_snapshot = Some(s.taken_at);
            tracing::info!(source = %run.source, chain = %s.chain, bytes = s.bytes, uploaded = s.uploaded, "snapshot taken");
        })
    } else {
        let pass_began = crate::clock::now();
        source.capture(repo).await.map(|c| {
            run.confirmed_until = Some(pass_began);
            if let Some(key) = &c.segment {
                run.newest = run.newest.max(observe::segment_time(key));
                run.segments += 1;
                run.transactions += c.transactions;
                tracing::debug!(source = %run.source, frames = c.frames, transactions = c.transactions, "changes shipped");
            }
            run.tally.add(summary::Pass {
                segments: u64::from(c.segment.is_some()),
                transactions: c.transactions,
                bytes: c.uploaded,
                lag: None,
            });
            run.tally.log_if_due(&run.source);
            if c.checkpointed {
                tracing::info!(source = %run.source, "WAL checkpointed by timevault (everything shipped first)");
            }
        })
    };
    if let Err(e) = result {
        run.errors += 1;
        run.last_error = Some(e.to_string());
        tracing::error!(source = %run.source, error = %e, hint = e.hint().unwrap_or(""), "job failed");
    }
}
