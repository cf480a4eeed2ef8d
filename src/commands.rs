//! The binary's longer commands: daemon, backup, restore, snapshots, status. Each calls the
//! library and prints; none holds logic the library lacks.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use timevault::catalog::{Catalog, SnapshotManifest, SourceCatalog, Window};
use timevault::config::{Config, SourceConfig};
use timevault::daemon::{self, DaemonOptions};
use timevault::repo::{Repository, RetryPolicy};
use timevault::restore::group::{self, GroupRequest};
use timevault::restore::registry::of as restore_kind;
use timevault::restore::target::check_targets;
use timevault::source::postgres::health::SlotReport;
use timevault::source::postgres::CaptureMethod;
use timevault::source::registry;
use timevault::time::parse_at;
use timevault::time::At;
use timevault::{Error, ErrorKind, Result};

use crate::out::outln;
use crate::print_json;

pub mod drill;
pub mod export;
pub mod forget;
pub mod keys;
pub mod progress;
pub mod prune;
pub use export::ExportArgs;
pub(crate) use progress::{BackupProgress, Progress};

/// A restore's progress on a terminal: bytes of chunks read and authenticated against the
/// bytes its plan reads, with rate and ETA (hidden when stderr is no terminal or with --json;
/// the final summary line is printed either way).
async fn restore_progress(
    repo: &Repository,
    source: &SourceConfig,
    at: At,
    json: bool,
) -> Progress {
    if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return Progress::hidden();
    }
    let total = timevault::restore::dry_run::bytes_to_read(repo, source, at)
        .await
        .unwrap_or(0);
    Progress::bytes(format!("restoring {}", source.name), total)
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed when this is called, not when
/// the future is first polled, so a signal that arrives during start-up is not lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    let ctrl_c = tokio::signal::ctrl_c();
    async move {
        #[cfg(unix)]
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
    }
}

pub async fn daemon(config: &Config, once: bool, json: bool) -> Result<ExitCode> {
    let shutdown = shutdown_signal();
    let repo = Repository::open(config).await?;
    let runs = daemon::run(config, &repo, &DaemonOptions { once }, shutdown).await?;
    if json {
        print_json(&runs);
    } else if once {
        for r in &runs {
            outln!(
                "{}: {} snapshots, {} segments, {} transactions shipped, {} errors",
                r.source,
                r.snapshots,
                r.segments,
                r.transactions,
                r.errors
            );
        }
    }
    let failed = runs.iter().find_map(|r| r.last_error.clone());
    match failed {
        Some(e) if once => Err(Error::other(e)),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// `timevault daemon --only drill`.
pub async fn daemon_drills(config: &Config) -> Result<ExitCode> {
    let shutdown = shutdown_signal();
    let repo = Repository::open(config).await?;
    daemon::run_drills(config, &repo, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// The sources a command applies to: all, or the one named (which must exist).
fn selected<'a>(config: &'a Config, only: Option<&str>) -> Result<Vec<&'a SourceConfig>> {
    match only {
        Some(name) => Ok(vec![config.source(name)?]),
        None => Ok(config.sources.iter().collect()),
    }
}

pub async fn backup(config: &Config, only: Option<&str>, json: bool) -> Result<ExitCode> {
    let sources = selected(config, only)?;
    let repo = Repository::open(config).await?;
    let mut results = Vec::new();
    for s in sources {
        let mut lease = repo.acquire_lease(&daemon::lease_scope(&s.name)).await?;
        let bar = BackupProgress::start(&s.name, registry::backup_size(s), json);
        // Renewed while it runs: a backup longer than lease_ttl keeps the source's lease.
        let (outcome, renewed) = repo
            .renewing(
                &mut [&mut lease],
                registry::backup(s, config.tenancy.as_ref(), &repo),
            )
            .await;
        bar.finish();
        renewed?;
        repo.release_lease(lease).await?;
        let backup = outcome?;
        if !json {
            outln!("{}", backup.line(&s.name));
        }
        results.push(backup);
    }
    if json {
        print_json(&results);
    }
    Ok(ExitCode::SUCCESS)
}

pub struct RestoreRequest {
    pub source: Option<String>,
    pub at: String,
    pub to: Vec<String>,
    pub to_options: Vec<String>,
    pub reference_query: String,
    pub force: bool,
    /// Print the plan; restore nothing.
    pub dry_run: bool,
    pub replica: Option<String>,
    pub requested_by: Option<String>,
    pub reason: Option<String>,
    pub json: bool,
    /// PostgreSQL: only this tenant's rows.
    pub tenant: Option<String>,
    /// Connections a PostgreSQL restore loads and builds with (`--jobs`).
    pub jobs: Option<usize>,
}

/// `(source, target)` pairs from `--source S --to T` or `--to S=T ...`.
fn restore_targets(config: &Config, req: &RestoreRequest) -> Result<Vec<(String, String)>> {
    let pairs = match (&req.source, req.to.as_slice()) {
        (Some(source), [target]) => vec![(source.clone(), target.clone())],
        (Some(_), _) => {
            return Err(Error::input("--source takes exactly one --to TARGET").with_hint(
                "to restore several sources together, drop --source and pass --to SOURCE=TARGET for each",
            ))
        }
        (None, targets) => targets
            .iter()
            .map(|t| {
                t.split_once('=')
                    .filter(|(name, _)| !name.contains('/') && !name.contains(':'))
                    .map(|(n, t)| (n.to_string(), t.to_string()))
                    .ok_or_else(|| {
                        Error::input(format!("--to {t:?}: expected SOURCE=TARGET"))
                            .with_hint("or name the source with --source")
                    })
            })
            .collect::<Result<Vec<_>>>()?,
    };
    pairs
        .into_iter()
        .map(|(name, target)| {
            let kind = config.source(&name)?.kind();
            Ok((name, restore_kind(kind).normalize_target(target)?))
        })
        .collect()
}

fn parse_options(items: &[String]) -> Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| Error::input(format!("--to-option {kv:?}: expected key=value")))
        })
        .collect()
}

pub async fn restore(config: &Config, req: RestoreRequest) -> Result<ExitCode> {
    // 1. Plan: the targets, each checked against every source and replica, and the one
    // instant they are all restored to.
    let targets = restore_targets(config, &req)?;
    let request = GroupRequest {
        targets,
        at: parse_at(&req.at, Utc::now())?,
        force: req.force,
        jobs: req.jobs,
        tenant: req.tenant.clone(),
        target_options: parse_options(&req.to_options)?,
        reference_query: req.reference_query.clone(),
        requested_by: req.requested_by.clone(),
        reason: req.reason.clone(),
    };
    // The targets are checked before the repository is opened.
    check_targets(config, &request.targets, &request.target_options)?;
    let repo =
        Repository::open_with(config, req.replica.as_deref(), RetryPolicy::default()).await?;
    repo.require(timevault::keys::role::Role::Restore, "restore")?;
    let plan = group::plan(config, &repo, request).await?;
    if req.dry_run {
        return dry_run(config, &repo, plan.targets(), plan.at, req.force, req.json).await;
    }
    // 2. Restore each source to that instant.
    let mut summaries = Vec::new();
    for index in 0..plan.targets().len() {
        let bar = restore_progress(&repo, plan.source(index)?, plan.at, req.json).await;
        let summary = plan.apply(&repo, index).await;
        bar.finish_and_clear();
        summaries.push(summary?);
    }
    // 3. The reference check and the audit record.
    let done = plan.finish(&repo, summaries).await?;
    if req.json {
        print_json(&done);
    } else {
        for s in &done.restored {
            outln!(
                "restored {} to {}: state as of {} (requested {}), from {}, {} later part(s) applied, {:.2}s",
                s.source,
                s.target,
                s.restored_to.to_rfc3339(),
                s.requested.to_rfc3339(),
                s.chain,
                s.segments_applied,
                s.seconds
            );
        }
        match &done.missing_blobs {
            Some(m) if m.is_empty() => {
                outln!("reference check: every blob the database references is present")
            }
            Some(m) => {
                for key in m {
                    outln!("reference check: MISSING blob {key}");
                }
            }
            None => {}
        }
    }
    if !done.is_whole() {
        return Ok(ExitCode::from(ErrorKind::Verify.exit_code() as u8));
    }
    Ok(ExitCode::SUCCESS)
}

/// `restore --dry-run`: each source's plan, printed; nothing written.
async fn dry_run(
    config: &Config,
    repo: &Repository,
    pairs: &[(String, String)],
    at: At,
    force: bool,
    json: bool,
) -> Result<ExitCode> {
    let mut plans = Vec::new();
    for (name, target) in pairs {
        let source = config.source(name)?;
        plans.push(timevault::restore::dry_run::dry_run(repo, source, at, target, force).await?);
    }
    if json {
        print_json(&serde_json::json!({ "dry_run": plans }));
    }
    for p in plans.iter().filter(|_| !json) {
        outln!(
            "dry run: restore of {} ({}) — nothing is written",
            p.source,
            p.kind
        );
        outln!("  requested {}", p.requested.to_rfc3339());
        outln!(
            "  reaches   {} (the last capture at or before it)",
            p.reaches.to_rfc3339()
        );
        outln!("  from      {} and {} later part(s)", p.base, p.later);
        outln!(
            "  reads     {} manifest(s), {} chunk(s), {}",
            p.manifests.len(),
            p.chunks,
            timevault::source::postgres::health::human(p.bytes)
        );
        for r in &p.replicas {
            match (&r.error, r.missing) {
                (Some(e), _) => outln!("  replica {}: unreachable ({e})", r.replica),
                (None, 0) => outln!("  replica {}: holds every object", r.replica),
                (None, n) => outln!(
                    "  replica {}: lacks {n} object(s) (read from another replica)",
                    r.replica
                ),
            }
        }
        outln!("  target    {}", p.target);
    }
    if plans.iter().any(|p| !p.target_ok) {
        return Ok(ExitCode::from(ErrorKind::TargetExists.exit_code() as u8));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct SnapshotLine {
    source: String,
    chain: String,
    taken_at: String,
    segments: usize,
    restorable_until: String,
    reason: Option<String>,
    bytes: Option<u64>,
}

pub async fn snapshots(config: &Config, only: Option<&str>, json: bool) -> Result<ExitCode> {
    let sources = selected(config, only)?;
    let repo = Repository::open(config).await?;
    let mut lines = Vec::new();
    for s in sources {
        let catalog = match Catalog::load(&repo, s).await? {
            Catalog::Chains(chains) => chains,
            Catalog::Scans(scans) => {
                // A blob source's restore points are its scans.
                lines.extend(scans.scans.iter().map(|scan| SnapshotLine {
                    source: s.name.clone(),
                    chain: timevault::time::compact(scan.scanned_at),
                    taken_at: scan.scanned_at.to_rfc3339(),
                    segments: 0,
                    restorable_until: scan.scanned_at.to_rfc3339(),
                    reason: Some("scan".into()),
                    bytes: None,
                }));
                continue;
            }
        };
        for chain in &catalog.chains {
            let manifest = SnapshotManifest::read(&repo, &chain.snapshot.key)
                .await
                .ok();
            lines.push(SnapshotLine {
                source: s.name.clone(),
                chain: chain.id().to_string(),
                taken_at: chain.start().to_rfc3339(),
                segments: chain.segments.len(),
                restorable_until: chain.end().to_rfc3339(),
                reason: manifest.as_ref().map(|m| format!("{:?}", m.reason)),
                bytes: manifest.map(|m| m.bytes),
            });
        }
    }
    if json {
        print_json(&lines);
    } else {
        outln!(
            "{:<10} {:<26} {:<34} {:>9} {:>12}  reason",
            "source",
            "chain",
            "restorable until",
            "segments",
            "bytes"
        );
        for l in &lines {
            outln!(
                "{:<10} {:<26} {:<34} {:>9} {:>12}  {}",
                l.source,
                l.chain,
                l.restorable_until,
                l.segments,
                l.bytes.map_or("?".into(), |b| b.to_string()),
                l.reason.clone().unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct SourceStatus {
    source: String,
    kind: String,
    windows: Vec<Window>,
    oldest: Option<String>,
    newest: Option<String>,
    gaps: usize,
    /// Each gap between windows and why it is there (the reason its next chain recorded).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    gap_reasons: Vec<GapReason>,
    last_snapshot: Option<String>,
    /// Seconds since the newest restorable instant: how far behind a restore to `latest` is.
    capture_lag_seconds: Option<f64>,
    chains: usize,
    /// The process holding the source's lease (the daemon), if any is live.
    writer: Option<String>,
    /// The daemon's counters and last job result, as published in its lease.
    daemon: Option<daemon::SourceRun>,
    /// The newest restore drill.
    drill: Option<drill::DrillStatus>,
    /// PostgreSQL: the replication slot's health.
    #[serde(skip_serializing_if = "Option::is_none")]
    slot: Option<SlotReport>,
    /// PostgreSQL: how capture reads the slot, `streaming` or `polling`, as the running
    /// daemon reports it (`null` before its first pass or with no daemon).
    #[serde(skip_serializing_if = "Option::is_none")]
    capture_method: Option<Option<CaptureMethod>>,
}

#[derive(Serialize)]
struct GapReason {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    reason: String,
}

/// Why each gap between a source's chains is there: the snapshot after it says.
async fn gap_reasons(repo: &Repository, catalog: &SourceCatalog) -> Vec<GapReason> {
    let mut out = Vec::new();
    for pair in catalog.chains.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        if after.start() <= before.end() {
            continue;
        }
        let reason = match SnapshotManifest::read(repo, &after.snapshot.key).await {
            Ok(m) => match m.reason {
                timevault::catalog::SnapshotReason::ContinuityLost(why) => {
                    format!("continuity lost: {why}")
                }
                other => format!("{other:?}"),
            },
            Err(e) => format!("unknown ({e})"),
        };
        out.push(GapReason {
            from: before.end(),
            to: after.start(),
            reason,
        });
    }
    out
}

/// Who holds the source's lease and what it last reported.
async fn writer_of(repo: &Repository, source: &str) -> (Option<String>, Option<daemon::SourceRun>) {
    match repo.read_lease(&daemon::lease_scope(source)).await {
        Ok(Some(record)) => {
            let live = !record.released && record.expires_at > Utc::now();
            let writer = live.then(|| {
                format!(
                    "host {} pid {} (lease until {})",
                    record.host,
                    record.pid,
                    record.expires_at.to_rfc3339()
                )
            });
            // A note that is not a SourceRun (a daemon of another version) is shown as
            // none, with the reason in the log.
            let run = record.note.and_then(|note| {
                serde_json::from_value(note)
                    .map_err(|e| tracing::warn!(source, error = %e, "unreadable daemon note"))
                    .ok()
            });
            (writer, run)
        }
        _ => (None, None),
    }
}

#[derive(Serialize)]
struct ReplicaStatus {
    name: String,
    region: String,
    reachable: bool,
    error: Option<String>,
    /// Snapshots and segments the other replicas hold and this one lacks.
    missing_objects: Option<usize>,
    /// From the first of those to the newest restorable instant: how far it trails.
    lag_seconds: Option<f64>,
}

#[derive(Serialize)]
struct Status {
    repository: String,
    /// The role of this host's key or credential.
    role: timevault::keys::role::Role,
    /// Jobs this host's daemon skips by design, and why (`drill: needs the restore role`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    skipped: Vec<String>,
    sources: Vec<SourceStatus>,
    replicas: Vec<ReplicaStatus>,
}

pub async fn status(config: &Config, json: bool) -> Result<ExitCode> {
    let repo = Repository::open(config).await?;
    let now = Utc::now();
    let mut sources = Vec::new();
    let mut chained = Vec::new();
    for s in &config.sources {
        let (status, catalog) = source_status(&repo, s, now).await?;
        sources.push(status);
        if let Catalog::Chains(catalog) = catalog {
            chained.push(catalog);
        }
    }
    let mut skipped = Vec::new();
    if daemon::drills_skipped(config, repo.role()) {
        skipped.push(timevault::daemon::DRILL_NEEDS_RESTORE.to_string());
    }
    let status = Status {
        repository: repo.id().to_string(),
        role: repo.role(),
        skipped,
        sources,
        replicas: replica_statuses(&repo, &chained).await,
    };
    if json {
        print_json(&status);
    } else {
        print_status(&status);
    }
    let unhealthy = status.replicas.iter().any(|r| !r.reachable);
    if unhealthy {
        return Ok(ExitCode::from(ErrorKind::Unavailable.exit_code() as u8));
    }
    Ok(ExitCode::SUCCESS)
}

/// One source's status, and its catalog (the replica lag is measured over the chains).
async fn source_status(
    repo: &Repository,
    s: &SourceConfig,
    now: DateTime<Utc>,
) -> Result<(SourceStatus, Catalog)> {
    let (writer, daemon) = writer_of(repo, &s.name).await;
    let mut catalog = Catalog::load(repo, s).await?;
    catalog.confirm(repo, None, Duration::ZERO).await?;
    let windows = catalog.windows();
    let gap_reasons = match &catalog {
        Catalog::Chains(chains) => gap_reasons(repo, chains).await,
        Catalog::Scans(_) => Vec::new(),
    };
    let capture_method = s.postgres_options().map(|_| {
        daemon
            .as_ref()
            .and_then(|d| d.capture.as_ref())
            .map(|c| c.method)
    });
    let slot = match s.postgres_options() {
        Some(options) => Some(SlotReport::read(&s.name, &s.url, options).await),
        None => None,
    };
    let status = SourceStatus {
        source: s.name.clone(),
        kind: s.kind().to_string(),
        oldest: windows.first().map(|w| w.oldest.to_rfc3339()),
        newest: windows.last().map(|w| w.newest.to_rfc3339()),
        gaps: windows.len().saturating_sub(1),
        gap_reasons,
        last_snapshot: catalog.last_image().map(|t| t.to_rfc3339()),
        capture_lag_seconds: catalog
            .newest()
            .map(|t| (now - t).num_milliseconds() as f64 / 1000.0),
        chains: catalog.images().len(),
        windows,
        writer,
        daemon,
        capture_method,
        drill: drill::drill_status(repo, &s.name).await,
        slot,
    };
    Ok((status, catalog))
}

/// Each replica: reachable, and how far it trails the others over `chained` catalogs.
async fn replica_statuses(repo: &Repository, chained: &[SourceCatalog]) -> Vec<ReplicaStatus> {
    let union: Vec<&SourceCatalog> = chained.iter().collect();
    let mut replicas = Vec::new();
    for r in repo.replicas().replicas() {
        let probe = timevault::catalog::lag::replica_lag(r, &union).await;
        replicas.push(ReplicaStatus {
            name: r.name().to_string(),
            region: r.region().to_string(),
            reachable: probe.is_ok(),
            missing_objects: probe.as_ref().ok().map(|l| l.missing),
            lag_seconds: probe.as_ref().ok().map(|l| l.seconds),
            error: probe
                .err()
                .map(|e| timevault::config::mask_url(&e.to_string())),
        });
    }
    replicas
}

fn print_status(status: &Status) {
    outln!("repository {} (role {})", status.repository, status.role);
    for line in &status.skipped {
        outln!("{line}");
    }
    for s in &status.sources {
        print_source_status(s);
    }
    for r in &status.replicas {
        let state = if r.reachable {
            match (r.missing_objects, r.lag_seconds) {
                (Some(n), Some(lag)) if n > 0 => {
                    format!("reachable, lacks {n} object(s), {lag:.1}s behind until caught up")
                }
                _ => "ok".to_string(),
            }
        } else {
            format!("FAILING: {}", r.error.clone().unwrap_or_default())
        };
        outln!("replica {} ({}): {state}", r.name, r.region);
    }
}

fn print_source_status(s: &SourceStatus) {
    outln!("source {} ({})", s.source, s.kind);
    if s.windows.is_empty() {
        outln!("  no backups yet");
    }
    for w in &s.windows {
        outln!(
            "  restorable {} .. {}",
            w.oldest.to_rfc3339(),
            w.newest.to_rfc3339()
        );
    }
    if s.gaps > 0 {
        outln!(
            "  WARNING: {} gap(s) between windows: continuity was lost",
            s.gaps
        );
    }
    for g in &s.gap_reasons {
        outln!(
            "  gap {} .. {}: {}",
            g.from.to_rfc3339(),
            g.to.to_rfc3339(),
            g.reason
        );
    }
    if let Some(method) = &s.capture_method {
        match (method, s.daemon.as_ref().and_then(|d| d.capture.as_ref())) {
            (Some(method), Some(report)) => match &report.polling_because {
                Some(why) => outln!(
                    "  capture: {method} (the server refuses a replication connection: {why})"
                ),
                None => outln!("  capture: {method}"),
            },
            _ => outln!(
                "  capture: not reported (no daemon running, or its first pass has not ended)"
            ),
        }
    }
    if let Some(t) = &s.last_snapshot {
        outln!("  last snapshot {t}; {} chain(s)", s.chains);
    }
    if let (Some(lag), Some(newest)) = (s.capture_lag_seconds, &s.newest) {
        outln!("  restorable up to {newest} ({lag:.1} s ago)");
    }
    for line in s.slot.iter().flat_map(SlotReport::lines) {
        outln!("  {line}");
    }
    match &s.writer {
        Some(w) => outln!("  daemon: running, {w}"),
        None => outln!("  daemon: not running"),
    }
    if let Some(job) = s.daemon.as_ref().and_then(|d| d.last_job.as_ref()) {
        let outcome = match (job.ok, &job.error) {
            (true, _) => "ok".to_string(),
            (false, error) => format!("FAILED: {}", error.as_deref().unwrap_or("?")),
        };
        outln!(
            "  last job: {} at {} ({:.2}s): {outcome}",
            job.job,
            job.finished_at
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            job.seconds
        );
    }
    drill::print_drill_status(s.drill.as_ref());
}
