//! The daemon: runs each source's schedule until told to stop.
//!
//! Each source runs in a task of its own (`task`): capture every `capture_interval`, snapshots
//! or scans on the cron schedule, lease renewal, in turn, so jobs never overlap for a source and
//! one source's long snapshot never stalls another's capture. The repository's jobs (prune,
//! replica catch-up, drills, catalog refresh) run beside them. Scheduling is the pure
//! [`next_snapshot`]. On shutdown (SIGTERM,
//! Ctrl-C) the running step finishes, pending changes are shipped, and leases are released.
//! After a crash, a restart resumes from the catalog: the WAL position stored in the last
//! segment proves (by checksum) that nothing was missed, or a new chain starts.

mod catch_up;
pub mod http;
pub mod jobs;
pub mod observe;
mod running;
mod summary;
mod task;
pub mod usage;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use futures::StreamExt;

use self::catch_up::CatchUp;
use self::task::{LiveRequest, SourceTask};
use crate::config::{Config, CronSpec};
use crate::error::{Error, Result};
use crate::keys::role::Role;
use crate::metrics::{Limits, Telemetry};
use crate::repo::{Lease, Repository};

/// Options for one daemon run.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// Snapshot where no chain exists, ship pending changes, and exit.
    pub once: bool,
}

/// What a source did during the run. Published in the source's lease record (the note) and
/// read back by `status` as this type; a field an older daemon did not write reads as its
/// default.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
#[serde(default)]
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
    /// PostgreSQL: the schema image the last job tried to take (`Err`: why it failed),
    /// reported as a `schema-image` job; taken by the source's task after each job.
    #[serde(skip)]
    pub schema_image: Option<std::result::Result<(), String>>,
    /// PostgreSQL with `tenant_keys`: row changes this run kept under the repository key because
    /// their tenant was not found.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tenant_unresolved: u64,
    /// PostgreSQL: how capture reads the slot (streaming, or polling and why).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture: Option<crate::source::postgres::CaptureReport>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
            crate::source::registry::open(s, config.tenancy.as_ref(), repo).await?,
            lease,
        ));
    }
    announce(config, repo, options.once);
    let token = CancellationToken::new();
    // Health and metrics: seeded from the catalogs, served unless this is a single pass.
    let telemetry = new_telemetry(config, repo);
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

/// `timevault daemon --only drill`: a restore host's daemon that runs the restore drills on
/// `schedule.drill` (and serves `/healthz` and `/metrics` with their outcome) beside a
/// backup-only daemon elsewhere. It takes no lease and writes nothing but drill records.
/// SQLite sources are drilled without the live comparison (only their capturing daemon can pin
/// one).
pub async fn run_drills(
    config: &Config,
    repo: &Repository,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    repo.require(Role::Restore, "daemon --only drill")?;
    let Some(schedule) = config.schedule.drill.as_ref() else {
        return Err(
            Error::config("daemon --only drill: schedule.drill is not set")
                .with_hint("set [schedule] drill = \"<cron>\" (e.g. \"0 0 4 * * *\")"),
        );
    };
    tracing::info!(
        schedule = %schedule,
        healthz = %format!("http://{}/healthz", config.daemon.listen),
        "timevault daemon {} started for restore drills only (pid {})",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    );
    let telemetry = new_telemetry(config, repo);
    observe::load_drills(config, repo, &telemetry).await;
    let token = CancellationToken::new();
    let endpoint = tokio::spawn(http::serve(
        config.daemon.listen,
        telemetry.clone(),
        token.child_token(),
    ));
    let mut drill = observe::DrillJob::new(Some(schedule));
    tokio::pin!(shutdown);
    loop {
        if drill.due() {
            drill.start(config, &telemetry, observe::LivePoints::new());
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    tracing::info!("shutting down");
    drill.finish().await;
    token.cancel();
    let _ = endpoint.await;
    Ok(())
}

/// The state `/healthz` and `/metrics` serve, over the repository's replicas, with the
/// config's limits.
fn new_telemetry(config: &Config, repo: &Repository) -> Arc<Telemetry> {
    Arc::new(Telemetry::new(
        repo.replicas().replicas().to_vec(),
        Limits {
            max_capture_lag: config.daemon.max_capture_lag,
            max_snapshot_age: config.daemon.max_snapshot_age,
        },
    ))
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
        let (job, cron, capture) = if s.kind().captures_by_scan() {
            ("scan", schedule.blob_scan.as_ref(), "by scans".to_string())
        } else {
            let every = humantime::format_duration(schedule.capture_interval).to_string();
            ("snapshot", schedule.snapshot.as_ref(), every)
        };
        tracing::info!(
            source = %s.name,
            kind = %s.kind(),
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

/// Every source in a task of its own; the repository's jobs (prune, replica catch-up, drills,
/// catalog refresh, usage log) here. A task that lost its lease stops the daemon: every other
/// task finishes its step, ships what is pending and releases its lease first.
async fn run_sources(
    config: &Config,
    repo: &Repository,
    options: &DaemonOptions,
    opened: Vec<(Box<dyn crate::source::registry::Source>, Lease)>,
    token: CancellationToken,
    telemetry: &Arc<Telemetry>,
) -> Result<Vec<SourceRun>> {
    let usage_log = usage::UsageLog::new();
    let mut live = Vec::new();
    let mut tasks = futures::stream::FuturesUnordered::new();
    let passes_done = Arc::new(tokio::sync::Barrier::new(opened.len()));
    for (index, (source, lease)) in opened.into_iter().enumerate() {
        let requests = source.kind().has_live_point().then(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            live.push((source.name().to_string(), tx));
            rx
        });
        let task = SourceTask {
            repo: repo.clone(),
            source,
            lease,
            schedule: config.schedule.clone(),
            renew_every: (config.repository.lease_ttl / 3).max(Duration::from_millis(200)),
            telemetry: telemetry.clone(),
            once: options.once.then(|| passes_done.clone()),
            started: usage_log.started(),
            live: requests,
        };
        let handle = tokio::spawn(task.run(token.clone()));
        tasks.push(async move { (index, handle.await) });
    }
    let mut jobs = RepositoryJobs::new(config, repo, usage_log, live, telemetry);
    let mut runs: Vec<Option<SourceRun>> = vec![None; tasks.len()];
    let mut failure: Option<Error> = None;
    let tick = config
        .schedule
        .capture_interval
        .max(Duration::from_millis(200));
    while !tasks.is_empty() {
        tokio::select! {
            Some((index, joined)) = tasks.next() => {
                match joined.map_err(|e| Error::other("a source task ended abnormally").with_source(e)).and_then(|r| r) {
                    Ok(run) => runs[index] = Some(run),
                    Err(e) => {
                        tracing::error!(error = %e, "stopping the daemon");
                        token.cancel();
                        failure.get_or_insert(e);
                    }
                }
            }
            _ = tokio::time::sleep(tick), if !options.once && !token.is_cancelled() => {
                jobs.run_due(config, repo, telemetry).await;
            }
        }
    }
    jobs.drill.finish().await;
    if let Some(e) = failure {
        return Err(e);
    }
    if !options.once {
        jobs.catch_up.before_exit(repo).await;
    }
    Ok(runs.into_iter().flatten().collect())
}

/// The drill schedule this daemon keeps: none on a backup-only host, which cannot open content
/// (said in the log and under `/healthz`; `status` says it too). Drills run from a restore host.
fn drill_schedule<'a>(
    config: &'a Config,
    repo: &Repository,
    telemetry: &Telemetry,
) -> Option<&'a CronSpec> {
    let schedule = config.schedule.drill.as_ref()?;
    if !drills_skipped(config, repo.role()) {
        return Some(schedule);
    }
    tracing::warn!(role = %repo.role(), "schedule.drill is set, but this host's credential cannot open content: drills are skipped here; run them from a restore host (`timevault drill`, or `timevault daemon --only drill`)");
    telemetry.note(DRILL_NEEDS_RESTORE);
    None
}

/// Whether a daemon whose credential holds `role` skips the configured drills (it cannot open
/// content); `status` says so too.
pub fn drills_skipped(config: &Config, role: Role) -> bool {
    config.schedule.drill.is_some() && role < Role::Restore
}

/// How a backup-only daemon says that it skips drills.
pub const DRILL_NEEDS_RESTORE: &str =
    "drill: needs the restore role (drills run from a restore host: `timevault drill` or `timevault daemon --only drill`)";

/// The jobs of the whole repository, run between the sources' tasks.
struct RepositoryJobs {
    catch_up: CatchUp,
    usage_log: usage::UsageLog,
    next_prune: Option<DateTime<Utc>>,
    drill: observe::DrillJob,
    next_refresh: tokio::time::Instant,
    /// Per SQLite source, the way to ask its task for live checksums.
    live: Vec<(String, tokio::sync::mpsc::Sender<LiveRequest>)>,
}

impl RepositoryJobs {
    fn new(
        config: &Config,
        repo: &Repository,
        usage_log: usage::UsageLog,
        live: Vec<(String, tokio::sync::mpsc::Sender<LiveRequest>)>,
        telemetry: &Telemetry,
    ) -> Self {
        RepositoryJobs {
            catch_up: CatchUp::new(repo),
            usage_log,
            next_prune: next_snapshot(config.schedule.prune.as_ref(), Utc::now()),
            drill: observe::DrillJob::new(drill_schedule(config, repo, telemetry)),
            next_refresh: tokio::time::Instant::now() + observe::REFRESH,
            live,
        }
    }

    async fn run_due(&mut self, config: &Config, repo: &Repository, telemetry: &Arc<Telemetry>) {
        if self.next_prune.is_some_and(|t| t <= Utc::now()) {
            prune(config, repo, telemetry).await;
            self.next_prune = next_snapshot(config.schedule.prune.as_ref(), Utc::now());
        }
        self.catch_up.run_if_due(repo).await;
        if self.drill.due() {
            let live = self.live_points().await;
            self.drill.start(config, telemetry, live);
        }
        if tokio::time::Instant::now() >= self.next_refresh {
            observe::refresh(config, repo, telemetry).await;
            self.next_refresh = tokio::time::Instant::now() + observe::REFRESH;
        }
        self.usage_log.log_if_due(repo);
    }

    /// The live checksums of every SQLite source, read by the task that captures it between
    /// its jobs; a source that cannot answer in time is drilled without them.
    async fn live_points(&self) -> observe::LivePoints {
        let mut points = observe::LivePoints::new();
        for (name, requests) in &self.live {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if requests.send(tx).await.is_err() {
                continue;
            }
            match tokio::time::timeout(LIVE_POINT_WAIT, rx).await {
                Ok(Ok(Ok(point))) => {
                    points.insert(name.clone(), point);
                }
                Ok(Ok(Err(e))) => {
                    tracing::warn!(source = %name, error = %e, "restore drill: the live database could not be read; drilled without the live comparison")
                }
                Ok(Err(_)) | Err(_) => {
                    tracing::warn!(source = %name, "restore drill: the source's task was busy; drilled without the live comparison")
                }
            }
        }
        points
    }
}

/// How long a drill waits for a source's task to read its live checksums (it answers between
/// jobs; a long snapshot may hold it).
const LIVE_POINT_WAIT: Duration = Duration::from_secs(60);

/// A scheduled prune, reported as a job of the repository.
async fn prune(config: &Config, repo: &Repository, telemetry: &Telemetry) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The note a daemon publishes reads back as the same type (`status` prints from it), and
    /// a note an older daemon wrote without the newer fields still reads.
    #[test]
    fn the_published_run_reads_back_as_a_source_run() {
        let at = DateTime::parse_from_rfc3339("2026-12-07T11:01:16.068667097Z")
            .unwrap()
            .with_timezone(&Utc);
        let run = SourceRun {
            source: "app".into(),
            segments: 3,
            last_job: Some(jobs::JobOutcome {
                source: "app".into(),
                job: "capture".into(),
                started_at: at,
                finished_at: at,
                seconds: 0.25,
                ok: false,
                error: Some("disk full".into()),
            }),
            confirmed_until: Some(at),
            ..SourceRun::default()
        };
        let note = serde_json::to_value(&run).unwrap();
        let read: SourceRun = serde_json::from_value(note.clone()).unwrap();
        assert_eq!(read.last_job, run.last_job);
        assert_eq!((read.segments, read.confirmed_until), (3, Some(at)));
        assert_eq!(serde_json::to_value(&read).unwrap(), note);
        let older: SourceRun =
            serde_json::from_value(serde_json::json!({"source": "app", "snapshots": 1})).unwrap();
        assert_eq!((older.snapshots, older.last_job), (1, None));
    }
}
