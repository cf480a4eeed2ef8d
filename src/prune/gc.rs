//! Chunk garbage collection as a prune runs it: sweep the marks that are old enough, then mark
//! what is unreferenced now (the protocol and why it is safe: `repo::gc`).

use std::collections::HashSet;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use super::refs::referenced_chunks;
use super::ReplicaFailure;
use crate::error::Result;
use crate::repo::{layout, ChunkMark, Repository};

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
    // 1. Sweep: the marker first, then references and keep records, then delete.
    let sweeping = if ripe.is_empty() {
        summary.sweep_skipped = Some("no mark is older than the chunk grace period".into());
        false
    } else if dry_run || repo.begin_sweep().await? {
        true
    } else {
        summary.sweep_skipped = Some("another prune is sweeping chunks".into());
        false
    };
    let referenced = referenced_chunks(repo, excluded).await?;
    let present: HashSet<String> = repo.chunk_ids().await?.into_iter().collect();
    summary.chunks = present.len();
    summary.referenced = referenced.iter().filter(|id| present.contains(*id)).count();
    let mut still_marked: HashSet<String> = HashSet::new();
    if sweeping {
        let outcome = sweep(repo, &ripe, &referenced, &present, dry_run, failures).await;
        if !dry_run {
            repo.end_sweep().await;
        }
        summary.deleted = outcome?;
    }
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

/// Delete the ripe marks' chunks that are unreferenced and unclaimed; then drop those marks and
/// the keep records read (the claims they stood for are references by now, or their job
/// failed and the chunk is marked again).
async fn sweep(
    repo: &Repository,
    ripe: &[(&String, &ChunkMark)],
    referenced: &HashSet<String>,
    present: &HashSet<String>,
    dry_run: bool,
    failures: &mut Vec<ReplicaFailure>,
) -> Result<Vec<String>> {
    let (claimed, keep_keys) = repo.chunk_keeps().await?;
    let mut doomed: Vec<String> = ripe
        .iter()
        .flat_map(|(_, m)| m.chunks.iter())
        .filter(|id| present.contains(*id) && !referenced.contains(*id) && !claimed.contains(*id))
        .cloned()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    doomed.sort();
    if dry_run {
        return Ok(doomed);
    }
    let mut deleted = Vec::new();
    for id in doomed {
        let key = layout::chunk(&id);
        let failed = repo.delete_on_replicas(&key).await;
        if failed.is_empty() {
            deleted.push(id);
        } else {
            failures.extend(failed.into_iter().map(|(replica, error)| ReplicaFailure {
                replica,
                key: key.clone(),
                error,
            }));
        }
    }
    let consumed = ripe.iter().map(|(k, _)| k.to_string()).chain(keep_keys);
    for key in consumed {
        let failed = repo.delete_on_replicas(&key).await;
        failures.extend(failed.into_iter().map(|(replica, error)| ReplicaFailure {
            replica,
            key: key.clone(),
            error,
        }));
    }
    Ok(deleted)
}
