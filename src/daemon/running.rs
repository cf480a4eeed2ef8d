//! A source the daemon runs, and one job of it: a snapshot, a capture or a scan.

use chrono::Utc;

use super::{summary, SourceRun};
use crate::error::{Error, ErrorKind, Result};
use crate::metrics::Telemetry;
use crate::repo::{Lease, Repository};
use crate::source::registry::{Done, Source};

/// The job due for one source (a snapshot, capture or scan); `None` when none is due. Its
/// outcome goes into `run` (counters, the last error) and the log.
pub(super) async fn run_job(
    repo: &Repository,
    source: &mut dyn Source,
    run: &mut SourceRun,
    snapshot_due: bool,
    scan_due: bool,
) -> Option<&'static str> {
    let (job, result) = if source.captures_by_scan() {
        if !scan_due && source.has_image() {
            return None;
        }
        ("scan", source.image(repo).await)
    } else if snapshot_due || !source.has_image() {
        ("snapshot", source.image(repo).await)
    } else {
        ("capture", source.capture(repo).await)
    };
    match result {
        Ok(done) => record(done, run),
        Err(e) => {
            run.errors += 1;
            run.last_error = Some(e.to_string());
            tracing::error!(source = %run.source, job, error = %e, hint = e.hint().unwrap_or(""), "job failed");
        }
    }
    Some(job)
}

/// Count what a job did in `run` and log it (capture passes go into the periodic summary).
fn record(done: Done, run: &mut SourceRun) {
    match done {
        Done::Image { taken_at, said } => {
            run.snapshots += 1;
            run.last_snapshot = Some(taken_at);
            tracing::info!(source = %run.source, "{said}");
        }
        Done::Pass(pass) => {
            if pass.confirmed.is_some() {
                run.confirmed_until = pass.confirmed;
            }
            run.schema_image = pass.schema_image;
            if pass.capture.is_some() {
                run.capture = pass.capture;
            }
            run.tenant_unresolved += pass.tenant_unresolved;
            run.segments += pass.segments;
            run.transactions += pass.transactions;
            run.newest = run.newest.max(pass.newest);
            run.tally.add(summary::Pass {
                segments: pass.segments,
                transactions: pass.transactions,
                bytes: pass.bytes,
                lag: pass.lag,
            });
            run.tally.log_if_due(&run.source);
        }
    }
}

/// A hole the step found is counted and fails `/healthz` until a new chain has started and
/// `max_capture_lag` has passed; the run's record (published in the lease) shows it.
pub(super) fn note_continuity(source: &mut dyn Source, run: &mut SourceRun, telemetry: &Telemetry) {
    if let Some(reason) = source.take_loss() {
        telemetry.continuity_lost(&run.source, &reason, Utc::now());
    }
    let pending = telemetry
        .continuity(&run.source)
        .is_some_and(|c| c.recovered_at.is_none());
    if pending && source.has_image() {
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
