//! The daemon: runs each source's schedule until told to stop.
//!
//! Per source, one task does everything in turn (capture every `capture_interval`, snapshots on
//! the cron schedule, lease renewal), so jobs never overlap for a source. Scheduling is the pure
//! [`next_snapshot`]; the loop only sleeps until the earliest due time. On shutdown (SIGTERM,
//! Ctrl-C) the running step finishes, pending changes are shipped, and leases are released.
//! After a crash, a restart resumes from the catalog: the WAL position stored in the last
//! segment proves (by checksum) that nothing was missed, or a new chain starts.

pub mod http;
pub mod jobs;
pub mod observe;
mod summary;
pub mod usage;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, CronSpec, SourceConfig, SourceKind};
use crate::error::{Error, ErrorKind, Result};
use crate::metrics::{Limits, Telemetry};
use crate::repo::{Lease, Repository, SyncOptions};
use crate::source::blobs::BlobSource;
use crate::source::postgres::preflight::preflight;
use crate::source::postgres::PostgresSource;
use crate::source::sqlite::SqliteSource;

/// Options for one daemon run.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// Snapshot where no chain exists, ship pending changes, and exit.
    pub once: bool,
}

/// What a source did during the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceRun {
    pub source: String,
    pub snapshots: u64,
    pub segments: u64,
    pub transactions: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    /// The last job that did something (or failed); published in the lease for `status`.
    pub last_job: Option<jobs::JobOutcome>,
    /// Holes this run found in the source's change log (`status` shows the last one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continuity: Option<crate::metrics::Continuity>,
    /// The newest restorable instant and snapshot the jobs of this run produced (for metrics).
    #[serde(skip)]
    pub newest: Option<DateTime<Utc>>,
    #[serde(skip)]
    pub last_snapshot: Option<DateTime<Utc>>,
    /// Requests and bytes per replica since the daemon started (daemon-wide, the same in
    /// every source's record).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<usage::ReplicaUsage>,
    /// Captures since the last summary line.
    #[serde(skip)]
    pub tally: summary::CaptureTally,
    /// SQLite: when the last capture pass that succeeded began. Every transaction committed
    /// before it is in the change log (the pass read the WAL to its end after this instant, on
    /// this host's clock), so the window reaches it (published in the lease note; trusted
    /// while the lease is held, `SourceCatalog::confirm`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmed_until: Option<DateTime<Utc>>,
}

/// When the next scheduled snapshot is due after `now` (pure).
pub fn next_snapshot(schedule: Option<&CronSpec>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    schedule.and_then(|s| s.next_after(now))
}

/// The lease scope guarding one source.
pub fn lease_scope(source: &str) -> String {
    crate::repo::source_lease_scope(source)
}

/// Run until `shutdown` resolves (or, with `once`, until one pass is done).
pub async fn run(
    config: &Config,
    repo: &Repository,
    options: &DaemonOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<Vec<SourceRun>> {
    // Leases first: a second daemon must fail before it touches anything.
    let mut leases = Vec::new();
    for s in &config.sources {
        leases.push(repo.acquire_lease(&lease_scope(&s.name)).await?);
    }
    let mut opened = Vec::new();
    for (s, lease) in config.sources.iter().zip(leases) {
        opened.push((
            Running::open(s, config.tenancy.as_ref(), repo).await?,
            lease,
        ));
    }
    announce(config, repo, options.once);
    let token = CancellationToken::new();
    // Health and metrics: seeded from the catalogs, served unless this is a single pass.
    let telemetry = Arc::new(Telemetry::new(
        repo.replicas().replicas().to_vec(),
        Limits {
            max_capture_lag: config.daemon.max_capture_lag,
            max_snapshot_age: config.daemon.max_snapshot_age,
        },
    ));
    observe::refresh(config, repo, &telemetry).await;
    observe::load_drills(config, repo, &telemetry).await;
    let endpoint = (!options.once).then(|| {
        tokio::spawn(http::serve(
            config.daemon.listen,
            telemetry.clone(),
            token.child_token(),
        ))
    });
    let work = run_sources(config, repo, options, opened, token.clone(), &telemetry);
    tokio::pin!(work);
    let runs = tokio::select! {
        runs = &mut work => runs,
        _ = shutdown => {
            tracing::info!("shutting down: finishing the running step and shipping pending changes");
            token.cancel();
            work.await
        }
    };
    token.cancel();
    if let Some(endpoint) = endpoint {
        let _ = endpoint.await;
    }
    runs
}

/// The daemon's first lines: the replicas, then one per source (what it is, when it is
/// snapshotted or scanned, how often its changes are captured), then the endpoint.
fn announce(config: &Config, repo: &Repository, once: bool) {
    let replicas: Vec<String> = repo
        .replicas()
        .replicas()
        .iter()
        .map(|r| format!("{} ({})", r.name(), r.region()))
        .collect();
    tracing::info!(
        replicas = %replicas.join(", "),
        write_quorum = repo.replicas().quorum(),
        "timevault daemon {} started (pid {})",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    );
    let never = || "none".to_string();
    let schedule = &config.schedule;
    for s in &config.sources {
        let (job, cron) = match s.kind {
            SourceKind::Blobs => ("scan", schedule.blob_scan.as_ref()),
            _ => ("snapshot", schedule.snapshot.as_ref()),
        };
        let capture = match s.kind {
            SourceKind::Blobs => "by scans".to_string(),
            _ => humantime::format_duration(schedule.capture_interval).to_string(),
        };
        tracing::info!(
            source = %s.name,
            kind = %s.kind,
            url = %crate::config::mask_url(&s.url),
            schedule = %format!("{job} {}", cron.map_or_else(never, |c| c.to_string())),
            capture = %capture,
            "source ready"
        );
    }
    let jobs = [
        ("prune", schedule.prune.as_ref()),
        ("verify", schedule.verify.as_ref()),
        ("drill", schedule.drill.as_ref()),
    ];
    let jobs: Vec<String> = jobs
        .iter()
        .map(|(name, cron)| format!("{name}: {}", cron.map_or_else(never, |c| c.to_string())))
        .collect();
    if once {
        tracing::info!(jobs = %jobs.join("; "), "single pass (--once): no endpoint");
    } else {
        tracing::info!(
            metrics = %format!("http://{}/metrics", config.daemon.listen),
            healthz = %format!("http://{}/healthz", config.daemon.listen),
            jobs = %jobs.join("; "),
            "serving health and metrics; Ctrl-C or SIGTERM stops after the running step"
        );
    }
}

/// The scheduling loop over all opened sources.
async fn run_sources(
    config: &Config,
    repo: &Repository,
    options: &DaemonOptions,
    opened: Vec<(Running, Lease)>,
    token: CancellationToken,
    telemetry: &Arc<Telemetry>,
) -> Result<Vec<SourceRun>> {
    // Sources and leases apart: a job borrows its source while every lease is renewed.
    let (mut sources, mut leases): (Vec<Running>, Vec<Lease>) = opened.into_iter().unzip();
    let mut runs: Vec<SourceRun> = sources
        .iter()
        .map(|s| SourceRun {
            source: s.name().to_string(),
            ..Default::default()
        })
        .collect();
    let interval = config.schedule.capture_interval;
    let renew_every = (config.repository.lease_ttl / 3).max(Duration::from_millis(200));
    let mut next_renew = tokio::time::Instant::now() + renew_every;
    let mut catch_up = CatchUp::new(repo);
    let mut usage_log = usage::UsageLog::new();
    let mut next_snap = next_snapshot(config.schedule.snapshot.as_ref(), Utc::now());
    let mut next_scan = next_snapshot(config.schedule.blob_scan.as_ref(), Utc::now());
    let mut next_prune = next_snapshot(config.schedule.prune.as_ref(), Utc::now());
    let mut drill = observe::DrillJob::new(config.schedule.drill.as_ref());
    let mut next_refresh = tokio::time::Instant::now() + observe::REFRESH;
    let mut first = true;
    loop {
        // Passes start every `capture_interval` (not an interval after the previous pass ended):
        // a change waits at most one interval plus one pass before it is shipped.
        let pass_started = tokio::time::Instant::now();
        let now = Utc::now();
        let snapshot_due = next_snap.is_some_and(|t| t <= now);
        let scan_due = first || options.once || next_scan.is_some_and(|t| t <= now);
        for i in 0..sources.len() {
            if leases[i].expires_at() <= Utc::now() {
                // Not renewed in time (the replicas were unreachable): no writes without it.
                continue;
            }
            let (source, run) = (&mut sources[i], &mut runs[i]);
            let started = std::time::Instant::now();
            let started_at = Utc::now();
            let (errors, progress) = (run.errors, run.snapshots + run.segments);
            // Every lease is renewed while the job runs, however long it takes.
            let mut held: Vec<&mut Lease> = leases.iter_mut().collect();
            let work = run_job(repo, source, run, snapshot_due, scan_due);
            let (job, renewed) = repo.renewing(&mut held, work).await;
            renewed?;
            let Some(job) = job else {
                continue;
            };
            note_continuity(source, run, telemetry);
            let failed = run.errors > errors;
            let error = failed.then(|| run.last_error.clone()).flatten();
            let outcome = telemetry
                .jobs()
                .finished(&run.source, job, started_at, started, error);
            telemetry.note_progress(&run.source, run.newest, run.last_snapshot);
            if failed || run.snapshots + run.segments > progress {
                run.last_job = Some(outcome);
                run.replicas = usage::usage(repo, usage_log.started());
            }
            // Published with the next renewal (no write of its own).
            leases[i].set_note(serde_json::to_value(&*run).expect("run serializes"));
        }
        first = false;
        if next_prune.is_some_and(|t| t <= now) {
            let (started_at, clock) = (Utc::now(), std::time::Instant::now());
            let error = match crate::prune::scheduled(config, repo).await {
                Ok(_) => None,
                Err(e) => {
                    tracing::error!(error = %e, "prune failed; retried at the next schedule");
                    Some(e.to_string())
                }
            };
            telemetry
                .jobs()
                .finished("repository", "prune", started_at, clock, error);
            next_prune = next_snapshot(config.schedule.prune.as_ref(), Utc::now());
        }
        if snapshot_due {
            next_snap = next_snapshot(config.schedule.snapshot.as_ref(), Utc::now());
        }
        if scan_due {
            next_scan = next_snapshot(config.schedule.blob_scan.as_ref(), Utc::now());
        }
        if options.once || token.is_cancelled() {
            break;
        }
        if tokio::time::Instant::now() >= next_renew {
            next_renew = tokio::time::Instant::now() + renew_every;
            for lease in leases.iter_mut() {
                if !renew(repo, lease).await? {
                    // Retry soon; jobs pause once the lease runs out.
                    next_renew = tokio::time::Instant::now() + interval;
                }
            }
        }
        catch_up.run_if_due(repo).await;
        if drill.due() {
            let live = live_points(&mut sources, repo).await;
            drill.start(config, telemetry, live);
        }
        if tokio::time::Instant::now() >= next_refresh {
            observe::refresh(config, repo, telemetry).await;
            next_refresh = tokio::time::Instant::now() + observe::REFRESH;
        }
        usage_log.log_if_due(repo);
        tokio::select! {
            _ = token.cancelled() => {}
            _ = tokio::time::sleep_until(pass_started + interval) => {}
        }
    }
    // Drain: let a running drill clean up, ship what is pending, release the WAL and leases.
    drill.finish().await;
    for ((source, lease), run) in sources.into_iter().zip(leases).zip(runs.iter_mut()) {
        let closed = match source {
            Running::Sqlite(s) => s.close(repo).await,
            Running::Postgres(p) => p.close(repo).await,
            Running::Blobs(_) => Ok(()),
        };
        if let Err(e) = closed {
            run.errors += 1;
            run.last_error = Some(e.to_string());
            tracing::error!(source = %run.source, error = %e, "final capture failed");
        }
        if let Err(e) = repo.release_lease(lease).await {
            tracing::warn!(source = %run.source, error = %e, "could not release the lease");
        }
    }
    if !options.once {
        catch_up.before_exit(repo).await;
    }
    Ok(runs)
}

/// The job due for one source (a snapshot, capture or scan); `None` when none is due.
async fn run_job(
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
fn note_continuity(source: &mut Running, run: &mut SourceRun, telemetry: &Telemetry) {
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

/// The live checksums of every SQLite source, read by the task that captures it (the only
/// one that can pin the exact instant); a source that cannot is drilled without them.
async fn live_points(sources: &mut [Running], repo: &Repository) -> observe::LivePoints {
    let mut points = observe::LivePoints::new();
    for source in sources.iter_mut() {
        let Running::Sqlite(s) = source else {
            continue;
        };
        match s.live_point(repo).await {
            Ok(point) => {
                points.insert(s.name().to_string(), point);
            }
            Err(e) => {
                tracing::warn!(source = %s.name(), error = %e, "restore drill: the live database could not be read; drilled without the live comparison")
            }
        }
    }
    points
}

/// Renew one lease. Another holder ends the run; unreachable replicas (too few for the quorum)
/// do not: the lease stays ours until it expires, and renewal is retried (false).
async fn renew(repo: &Repository, lease: &mut Lease) -> Result<bool> {
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

/// Catches up a replica that missed writes (it was down while the quorum acknowledged without
/// it): once its errors stop growing, a quick sync copies what it lacks from the others.
/// It starts pending: a previous run killed between two replicas' writes (kill -9, power loss)
/// may have left an object on only some of them, and nothing else would ever copy it.
struct CatchUp {
    /// Errors per replica at the last look.
    errors: Vec<u64>,
    pending: bool,
    next: tokio::time::Instant,
}

impl CatchUp {
    const EVERY: Duration = Duration::from_secs(10);

    fn new(repo: &Repository) -> Self {
        CatchUp {
            errors: repo
                .replicas()
                .replicas()
                .iter()
                .map(|r| r.health().errors)
                .collect(),
            pending: true,
            next: tokio::time::Instant::now() + Self::EVERY,
        }
    }

    async fn run_if_due(&mut self, repo: &Repository) {
        if tokio::time::Instant::now() < self.next {
            return;
        }
        self.next = tokio::time::Instant::now() + Self::EVERY;
        let now: Vec<u64> = repo
            .replicas()
            .replicas()
            .iter()
            .map(|r| r.health().errors)
            .collect();
        let failing = now != self.errors;
        self.errors = now;
        if failing {
            // Still failing: try again after the next quiet interval.
            self.pending = true;
            return;
        }
        if !self.pending {
            return;
        }
        self.sync(repo).await;
    }

    /// On a clean shutdown: a catch-up still pending runs now (a short-lived daemon otherwise
    /// never gets to it).
    async fn before_exit(&mut self, repo: &Repository) {
        if self.pending {
            self.sync(repo).await;
        }
    }

    async fn sync(&mut self, repo: &Repository) {
        let options = SyncOptions {
            quick: true,
            replica: None,
        };
        match repo.sync_replicas(&options).await {
            Ok(summary) if summary.is_complete() => {
                self.pending = false;
                tracing::info!(
                    objects = summary.objects_written(),
                    "lagging replicas caught up"
                );
            }
            Ok(summary) => tracing::warn!(
                objects = summary.objects_written(),
                "replica catch-up incomplete; will retry"
            ),
            Err(e) => tracing::warn!(error = %e, "replica catch-up failed; will retry"),
        }
        self.errors = repo
            .replicas()
            .replicas()
            .iter()
            .map(|r| r.health().errors)
            .collect();
    }
}

/// A source the daemon is running.
pub enum Running {
    Sqlite(SqliteSource),
    Postgres(PostgresSource),
    Blobs(BlobSource),
}

impl Running {
    async fn open(
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
                Running::Postgres(PostgresSource::open_configured(config, tenancy, repo).await?)
            }
        })
    }

    /// A continuity loss the source detected since the last call.
    fn take_loss(&mut self) -> Option<String> {
        match self {
            Running::Sqlite(s) => s.take_loss(),
            Running::Postgres(p) => p.take_loss(),
            Running::Blobs(_) => None,
        }
    }

    /// Whether the source continues a chain (false: the next step takes a snapshot).
    fn has_chain(&self) -> bool {
        match self {
            Running::Sqlite(s) => s.has_chain(),
            Running::Postgres(p) => p.has_chain(),
            Running::Blobs(_) => true,
        }
    }

    fn name(&self) -> &str {
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
        // No confirmation for PostgreSQL yet: commit timestamps are the server's clock and are
        // taken just before the commit record is written, so a pass start on this host's clock
        // bounds nothing exactly; the window reaches the last heartbeat instead.
        source.capture(repo).await.map(|c| {
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
