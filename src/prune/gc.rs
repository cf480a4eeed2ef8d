//! Chunk garbage collection as a prune runs it: sweep the marks that are old enough, in
//! batches that each start by confirming the sweep marker and re-reading the claims, then mark
//! what is unreferenced now (the protocol and why it is safe: `repo::gc`).

use std::collections::HashSet;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use super::refs::referenced_chunks;
use super::ReplicaFailure;
use crate::error::Result;
use crate::repo::{layout, ChunkMark, Repository, Sweep};

/// What chunk collection did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChunkGcSummary {
    /// Chunks in the repository (union of the replicas).
    pub chunks: usize,
    /// Referenced by a kept snapshot, segment or scan.
    pub referenced: usize,
    /// Deleted now: unreferenced since a mark older than the grace period.
    pub deleted: Vec<String>,
    /// Marked but still inside the grace period (or claimed by a writer).
    pub waiting: usize,
    /// Newly marked: unreferenced now, deleted by a prune after the grace period.
    pub marked: usize,
    /// Why no sweep ran, when none did.
    pub sweep_skipped: Option<String>,
    /// Deleted now without a mark: chunks of forgotten tenants (`tenant forget`). Their ids are
    /// keyed by destroyed keys, so no writer can rely on them and no restore reads them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forgotten: Vec<String>,
}

/// Chunks deleted between two looks at the sweep marker and the claims.
pub const DELETE_BATCH: usize = 64;

/// Whether this prune sweeps, and how.
enum SweepMode {
    Skipped(String),
    DryRun,
    Live(Sweep),
}

/// Run both phases. `excluded`: manifests a dry run would have removed.
pub async fn collect(
    repo: &Repository,
    now: DateTime<Utc>,
    grace: Duration,
    dry_run: bool,
    excluded: &HashSet<String>,
    failures: &mut Vec<ReplicaFailure>,
) -> Result<ChunkGcSummary> {
    let mut summary = ChunkGcSummary::default();
    let marks = repo.chunk_marks().await?;
    let ripe: Vec<(&String, &ChunkMark)> = marks
        .iter()
        .filter(|(_, m)| now - m.marked_at >= grace)
        .collect();
    // Forgotten tenants' chunks (read once: the scan stops protecting them, then they go).
    let forgotten = repo.forgotten().await?.chunk_ids();
    // 1. Sweep: the marker first, then references, then delete in batches, each after the
    //    marker and the claims were read again.
    let mode = start_sweep(repo, ripe.is_empty(), dry_run).await?;
    let sweeping = !matches!(mode, SweepMode::Skipped(_));
    let scanned = scan(repo, excluded, &forgotten).await;
    let (referenced, present) = match (scanned, mode) {
        (Ok(scanned), mode) => {
            let deleted = match mode {
                SweepMode::Skipped(why) => {
                    summary.sweep_skipped = Some(why);
                    Vec::new()
                }
                SweepMode::DryRun => dry_run_sweep(repo, &ripe, &scanned.0, &scanned.1).await?,
                SweepMode::Live(sweep) => {
                    let outcome =
                        sweep_ripe(repo, &sweep, &ripe, &scanned.0, &scanned.1, failures).await;
                    repo.end_sweep(sweep).await;
                    outcome?
                }
            };
            summary.deleted = deleted;
            scanned
        }
        (Err(e), SweepMode::Live(sweep)) => {
            repo.end_sweep(sweep).await;
            return Err(e);
        }
        (Err(e), _) => return Err(e),
    };
    let present = delete_forgotten(repo, present, &forgotten, dry_run, &mut summary).await?;
    summary.chunks = present.len();
    summary.referenced = referenced.iter().filter(|id| present.contains(*id)).count();
    let mut still_marked: HashSet<String> = HashSet::new();
    for (key, mark) in &marks {
        if !sweeping || !ripe.iter().any(|(k, _)| k == &key) {
            still_marked.extend(mark.chunks.iter().cloned());
        }
    }
    let deleted: HashSet<&String> = summary.deleted.iter().collect();
    summary.waiting = still_marked
        .iter()
        .filter(|id| present.contains(*id) && !referenced.contains(*id) && !deleted.contains(id))
        .count();
    // 2. Mark what is unreferenced now and not yet marked.
    let mut new_mark: Vec<String> = present
        .iter()
        .filter(|id| !referenced.contains(*id) && !still_marked.contains(*id))
        .filter(|id| !deleted.contains(id))
        .cloned()
        .collect();
    new_mark.sort();
    summary.marked = new_mark.len();
    if !dry_run && !new_mark.is_empty() {
        repo.write_chunk_mark(&ChunkMark {
            marked_at: now,
            chunks: new_mark,
        })
        .await?;
    }
    Ok(summary)
}

/// Delete the forgotten tenants' chunks that are still present (a dry run only lists them);
/// returns the chunks present after.
async fn delete_forgotten(
    repo: &Repository,
    mut present: HashSet<String>,
    forgotten: &HashSet<String>,
    dry_run: bool,
    summary: &mut ChunkGcSummary,
) -> Result<HashSet<String>> {
    let mut doomed: Vec<String> = forgotten
        .iter()
        .filter(|id| present.contains(*id))
        .cloned()
        .collect();
    doomed.sort();
    for id in &doomed {
        if !dry_run {
            repo.delete_everywhere(&layout::chunk(id)).await?;
        }
        present.remove(id);
    }
    summary.forgotten = doomed;
    Ok(present)
}

async fn start_sweep(repo: &Repository, nothing_ripe: bool, dry_run: bool) -> Result<SweepMode> {
    if nothing_ripe {
        return Ok(SweepMode::Skipped(
            "no mark is older than the chunk grace period".into(),
        ));
    }
    if dry_run {
        return Ok(SweepMode::DryRun);
    }
    Ok(match repo.begin_sweep().await? {
        Some(sweep) => SweepMode::Live(sweep),
        None => SweepMode::Skipped("another prune is sweeping chunks".into()),
    })
}

/// The referenced chunk ids and the ids present on any replica.
async fn scan(
    repo: &Repository,
    excluded: &HashSet<String>,
    forgotten: &HashSet<String>,
) -> Result<(HashSet<String>, HashSet<String>)> {
    let mut referenced = referenced_chunks(repo, excluded).await?;
    // A forgotten tenant's chunks are unreadable for ever: no longer protected.
    referenced.retain(|id| !forgotten.contains(id));
    let present: HashSet<String> = repo.chunk_ids().await?.into_iter().collect();
    Ok((referenced, present))
}

/// The ripe marks' chunks that are present and unreferenced, sorted.
fn unreferenced(
    ripe: &[(&String, &ChunkMark)],
    referenced: &HashSet<String>,
    present: &HashSet<String>,
) -> Vec<String> {
    let mut ids: Vec<String> = ripe
        .iter()
        .flat_map(|(_, m)| m.chunks.iter())
        .filter(|id| present.contains(*id) && !referenced.contains(*id))
        .cloned()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    ids.sort();
    ids
}

/// What a sweep would delete now: the unreferenced ripe chunks no writer has claimed.
async fn dry_run_sweep(
    repo: &Repository,
    ripe: &[(&String, &ChunkMark)],
    referenced: &HashSet<String>,
    present: &HashSet<String>,
) -> Result<Vec<String>> {
    let (claimed, _) = repo.chunk_keeps().await?;
    let mut ids = unreferenced(ripe, referenced, present);
    ids.retain(|id| !claimed.contains(id));
    Ok(ids)
}

/// Delete the ripe marks' chunks that are unreferenced and unclaimed, [`DELETE_BATCH`] at a
/// time, each batch after confirming the marker is still this sweep's (renewing its heartbeat)
/// and reading the claims again; then drop those marks and the keep records last read (the
/// claims they stood for are references by now, or their job failed and the chunk is marked
/// again). A marker that was removed or replaced stops the sweep with an error, nothing more
/// deleted and no mark dropped.
async fn sweep_ripe(
    repo: &Repository,
    sweep: &Sweep,
    ripe: &[(&String, &ChunkMark)],
    referenced: &HashSet<String>,
    present: &HashSet<String>,
    failures: &mut Vec<ReplicaFailure>,
) -> Result<Vec<String>> {
    let candidates = unreferenced(ripe, referenced, present);
    let mut rest = candidates.as_slice();
    let mut deleted = Vec::new();
    let claims_read = loop {
        repo.confirm_sweep(sweep).await?;
        let (claimed, keys) = repo.chunk_keeps().await?;
        if rest.is_empty() {
            break keys;
        }
        let batch = &rest[..rest.len().min(DELETE_BATCH)];
        let done = delete_batch(repo, sweep, batch, &claimed, &mut deleted, failures).await;
        rest = &rest[done..];
    };
    let consumed = ripe.iter().map(|(k, _)| k.to_string()).chain(claims_read);
    for key in consumed {
        let failed = repo.delete_on_replicas(&key).await;
        record(failures, &key, failed);
    }
    Ok(deleted)
}

/// Delete the unclaimed chunks of `batch` on every replica; how many of `batch` were dealt
/// with: fewer when the sweep's heartbeat grew too old to go on without confirming it.
async fn delete_batch(
    repo: &Repository,
    sweep: &Sweep,
    batch: &[String],
    claimed: &HashSet<String>,
    deleted: &mut Vec<String>,
    failures: &mut Vec<ReplicaFailure>,
) -> usize {
    for (done, id) in batch.iter().enumerate() {
        if !sweep.may_delete() {
            return done;
        }
        if claimed.contains(id) {
            continue;
        }
        let key = layout::chunk(id);
        let failed = repo.delete_on_replicas(&key).await;
        if failed.is_empty() {
            deleted.push(id.clone());
        }
        record(failures, &key, failed);
    }
    batch.len()
}

fn record(failures: &mut Vec<ReplicaFailure>, key: &str, failed: Vec<(String, String)>) {
    failures.extend(failed.into_iter().map(|(replica, error)| ReplicaFailure {
        replica,
        key: key.to_string(),
        error,
    }));
}
