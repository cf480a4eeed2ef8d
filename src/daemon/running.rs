//! A source the daemon runs, and one job of it: a snapshot, a capture or a scan.

use chrono::{DateTime, Utc};

use super::{observe, summary, SourceRun};
use crate::config::{SourceConfig, SourceKind};
use crate::error::{Error, ErrorKind, Result};
use crate::metrics::Telemetry;
use crate::repo::{Lease, Repository};
use crate::source::blobs::BlobSource;
use crate::source::postgres::preflight::preflight;
use crate::source::postgres::PostgresSource;
use crate::source::sqlite::SqliteSource;

/// The job due for one source (a snapshot, capture or scan); `None` when none is due. Its
/// outcome goes into `run` (counters, the last error) and the log.
pub(super) async fn run_job(
    repo: &Repository,
    source: &mut Running,
    run: &mut SourceRun,
    snapshot_due: bool,
    scan_due: bool,
) -> Option<&'static str> {
    let (job, result) = match source {
        Running::Blobs(b) if !scan_due && b.last_scan().is_some() => return None,
        Running::Blobs(b) => ("scan", b.scan(repo).await.map(Done::scanned)),
        source if snapshot_due || !source.has_chain() => ("snapshot", source.snapshot(repo).await),
        source => ("capture", source.capture(repo).await),
    };
    match result {
        Ok(done) => done.record(run),
        Err(e) => {
            run.errors += 1;
            run.last_error = Some(e.to_string());
            tracing::error!(source = %run.source, job, error = %e, hint = e.hint().unwrap_or(""), "job failed");
        }
    }
    Some(job)
}

/// What one job did, whatever the source's kind.
enum Done {
    /// A snapshot (or a blob scan) that starts a restore point at `taken_at`.
    Snapshot {
        taken_at: DateTime<Utc>,
        /// What the log line says about it.
        said: String,
    },
    /// A capture pass.
    Pass {
        pass: summary::Pass,
        /// The newest restorable instant it produced.
        newest: Option<DateTime<Utc>>,
        /// Every commit before this instant is captured (published in the lease note).
        confirmed: Option<DateTime<Utc>>,
        /// PostgreSQL: the schema image it tried to take.
        schema_image: Option<std::result::Result<(), String>>,
    },
}

impl Done {
    fn scanned(stats: crate::source::blobs::ScanStats) -> Done {
        Done::Snapshot {
            taken_at: stats.scanned_at,
            said: format!(
                "blob scan done: {} objects, {} new, {} changed, {} deleted, {} bytes uploaded",
                stats.objects, stats.new, stats.changed, stats.deleted, stats.bytes_uploaded
            ),
        }
    }

    fn record(self, run: &mut SourceRun) {
        match self {
            Done::Snapshot { taken_at, said } => {
                run.snapshots += 1;
                run.last_snapshot = Some(taken_at);
                tracing::info!(source = %run.source, "{said}");
            }
            Done::Pass {
                pass,
                newest,
                confirmed,
                schema_image,
            } => {
                if confirmed.is_some() {
                    run.confirmed_until = confirmed;
                }
                run.schema_image = schema_image;
                run.segments += pass.segments;
                run.transactions += pass.transactions;
                run.newest = run.newest.max(newest);
                run.tally.add(pass);
                run.tally.log_if_due(&run.source);
            }
        }
    }
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
        Ok(match config.kind() {
            SourceKind::Sqlite => Running::Sqlite(
                SqliteSource::open(&config.name, std::path::Path::new(&config.url), repo).await?,
            ),
            SourceKind::Blobs => Running::Blobs(
                BlobSource::open(&config.name, &config.url, config.store_options(), repo).await?,
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

impl Running {
    /// A snapshot of a database source, which starts a new chain.
    async fn snapshot(&mut self, repo: &Repository) -> Result<Done> {
        Ok(match self {
            Running::Sqlite(s) => {
                let s = s.snapshot(repo).await?;
                Done::Snapshot {
                    taken_at: s.taken_at,
                    said: format!(
                        "snapshot taken: chain {}, {} bytes, {} uploaded",
                        s.chain, s.bytes, s.uploaded
                    ),
                }
            }
            Running::Postgres(p) => {
                let s = p.snapshot(repo).await?;
                Done::Snapshot {
                    taken_at: s.taken_at,
                    said: format!(
                        "snapshot taken: chain {}, {} rows, {} bytes",
                        s.chain, s.rows, s.bytes
                    ),
                }
            }
            Running::Blobs(b) => Done::scanned(b.scan(repo).await?),
        })
    }

    /// One capture pass of a database source (a blob source is captured by its scans).
    async fn capture(&mut self, repo: &Repository) -> Result<Done> {
        match self {
            Running::Sqlite(s) => {
                // Every transaction committed before the pass began is in the change log once
                // it read the WAL to its end (on this host's clock).
                let began = crate::clock::now();
                let c = s.capture(repo).await?;
                if c.checkpointed {
                    tracing::info!(source = %s.name(), "WAL checkpointed by timevault (everything shipped first)");
                }
                Ok(Done::Pass {
                    pass: summary::Pass {
                        segments: u64::from(c.segment.is_some()),
                        transactions: c.transactions,
                        bytes: c.uploaded,
                        lag: None,
                    },
                    newest: c.segment.as_deref().and_then(observe::segment_time),
                    confirmed: Some(began),
                    schema_image: None,
                })
            }
            Running::Postgres(p) => {
                // The heartbeat's commit time, once everything before it is stored, confirms
                // the window up to it (an idle pass stores nothing).
                let c = p.capture(repo).await?;
                let shipped = !c.segments.is_empty();
                Ok(Done::Pass {
                    pass: summary::Pass {
                        segments: c.segments.len() as u64,
                        transactions: c.transactions,
                        bytes: c.uploaded,
                        lag: c
                            .newest
                            .filter(|_| shipped)
                            .and_then(|t| (crate::clock::now() - t).to_std().ok()),
                    },
                    newest: c.newest,
                    confirmed: c.confirmed,
                    schema_image: c.schema_image,
                })
            }
            Running::Blobs(b) => Ok(Done::scanned(b.scan(repo).await?)),
        }
    }
}
