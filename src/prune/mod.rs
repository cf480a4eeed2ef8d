//! `timevault prune` and the daemon's `schedule.prune`: apply the retention plan to every
//! source, on every replica, then collect the chunks nothing references any more.
//!
//! The plan is pure (`plan`, over `retention::plan`); this module deletes what it says, in an
//! order that never leaves a broken chain (segments newest first, then the snapshot), after
//! writing a tombstone so that a replica that was down cannot bring removed objects back
//! (`repo::tombstone`). Chunks go in two phases with a grace period (`gc`, `repo::gc`), so a
//! backup running concurrently never loses a chunk it is about to reference. Audit records
//! older than `retention.audit` go; younger ones never.

mod gc;
mod plan;
pub mod points;
pub(crate) mod refs;

pub use gc::ChunkGcSummary;
pub use plan::{
    plan_audit, plan_chains, plan_drills, plan_scans, policy, KeptPoint, ObjectKind, Removal,
    SourcePlan,
};
pub use refs::collect_chunk_refs;

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::catalog::Catalog;
use crate::config::{RetentionConfig, SourceConfig};
use crate::error::Result;
use crate::repo::{layout, Claims, Repository, Tombstone};

/// How to prune.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Compute and report; delete and write nothing.
    pub dry_run: bool,
    /// The instant retention is judged at (normally `clock::now()`).
    pub now: DateTime<Utc>,
}

/// One source's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct SourcePrune {
    pub source: String,
    pub kind: String,
    pub kept: Vec<KeptPoint>,
    pub removed: Vec<Removal>,
    /// Why nothing of this source was removed now although the plan had removals: a
    /// restore, export or drill holds a read claim on it (`repo::claim`). A later prune
    /// removes them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deferred: Option<String>,
}

/// A deletion a replica did not confirm (it was down or refused).
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaFailure {
    pub replica: String,
    pub key: String,
    pub error: String,
}

/// What a prune did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Serialize)]
pub struct PruneSummary {
    pub now: DateTime<Utc>,
    pub dry_run: bool,
    pub sources: Vec<SourcePrune>,
    pub audit: Vec<Removal>,
    /// Drill records past the audit horizon (the newest per source always stays).
    pub drills: Vec<Removal>,
    pub chunks: ChunkGcSummary,
    /// Keys removed by an earlier prune and deleted again now (a replica that was down).
    pub redeleted: usize,
    pub replica_failures: Vec<ReplicaFailure>,
}

impl PruneSummary {
    /// Objects removed (or that would be), chunks aside.
    pub fn removed(&self) -> usize {
        self.sources.iter().map(|s| s.removed.len()).sum::<usize>()
            + self.audit.len()
            + self.drills.len()
    }

    /// Every deletion confirmed by every replica.
    pub fn is_complete(&self) -> bool {
        self.replica_failures.is_empty()
    }
}

/// The lease a deleting prune holds: one prune at a time per repository (the daemon's
/// scheduled one and an operator's `timevault prune` would otherwise sweep at once).
pub const PRUNE_LEASE: &str = "prune";

/// Prune the configured `sources` of `repo` by `retention`. A real run holds the
/// [`PRUNE_LEASE`] (renewed while it runs); a dry run deletes nothing and takes none.
pub async fn prune(
    repo: &Repository,
    sources: &[SourceConfig],
    retention: &RetentionConfig,
    options: &PruneOptions,
) -> Result<PruneSummary> {
    if options.dry_run {
        return prune_held(repo, sources, retention, options).await;
    }
    let mut lease = repo.acquire_lease(PRUNE_LEASE).await?;
    let (summary, renewed) = repo
        .renewing(
            &mut [&mut lease],
            prune_held(repo, sources, retention, options),
        )
        .await;
    let released = repo.release_lease(lease).await;
    renewed?;
    let summary = summary?;
    released?;
    Ok(summary)
}

async fn prune_held(
    repo: &Repository,
    sources: &[SourceConfig],
    retention: &RetentionConfig,
    options: &PruneOptions,
) -> Result<PruneSummary> {
    let now = options.now;
    let policy = policy(retention);
    let mut failures = Vec::new();
    // 1. Finish what an earlier prune could not delete on every replica.
    let claims = repo.claims().await?;
    let redeleted = if options.dry_run {
        0
    } else {
        finish_tombstones(repo, &claims, &mut failures).await?
    };
    // 2. Plan every source and the audit records; a source a reader holds loses nothing.
    let mut planned = Vec::new();
    for source in sources {
        let plan = match Catalog::load(repo, source).await? {
            Catalog::Scans(scans) => plan_scans(&scans, &policy, now),
            Catalog::Chains(chains) => plan_chains(&chains, &policy, now),
        };
        let mut prune = SourcePrune {
            source: source.name.clone(),
            kind: source.kind().to_string(),
            kept: plan.kept,
            removed: plan.removed,
            deferred: None,
        };
        defer_if_held(&mut prune, &claims);
        planned.push(prune);
    }
    let audit_keep = chrono::Duration::from_std(retention.audit).expect("audit span fits");
    let audit = plan_audit(&repo.list(layout::AUDIT).await?, audit_keep, now);
    let drills = plan_drills(&repo.list(layout::DRILLS).await?, audit_keep, now);
    let removals: Vec<Removal> = planned
        .iter()
        .flat_map(|s| s.removed.iter())
        .chain(audit.iter())
        .chain(drills.iter())
        .cloned()
        .collect();
    // 3. Tombstone first; then read the claims again (a reader that claimed since step 1
    //    loaded its catalog before the tombstone) and delete in plan order what no reader
    //    holds. The tombstone stays while it lists a key left in place.
    let mut held_back = Vec::new();
    if !options.dry_run && !removals.is_empty() {
        let tombstone = Tombstone {
            pruned_at: now,
            keys: removals.iter().map(|r| r.key.clone()).collect(),
        };
        let key = repo.write_tombstone(&tombstone).await?;
        let claims = repo.claims().await?;
        let before = failures.len();
        for r in &removals {
            match layout::source_of(&r.key).and_then(|s| claims.held(s).map(|why| (s, why))) {
                Some((source, why)) => held_back.push((source.to_string(), why)),
                None => record(&mut failures, &r.key, repo.delete_on_replicas(&r.key).await),
            }
        }
        if failures.len() == before && held_back.is_empty() {
            record(&mut failures, &key, repo.delete_on_replicas(&key).await);
        }
    }
    if !options.dry_run {
        for dead in &claims.dead {
            repo.delete_on_replicas(dead).await;
        }
    }
    for (source, why) in held_back {
        if let Some(p) = planned.iter_mut().find(|p| p.source == source) {
            tracing::warn!(source = %source, reason = %why, "prune leaves the source's expired points until a later prune");
            p.deferred = Some(format!("{why}; its tombstoned points go in a later prune"));
        }
    }
    // 4. Chunks: sweep old marks, mark what is unreferenced now.
    let excluded: HashSet<String> = if options.dry_run {
        removals.iter().map(|r| r.key.clone()).collect()
    } else {
        HashSet::new()
    };
    let grace = chrono::Duration::from_std(retention.chunk_grace).expect("grace fits");
    let chunks = gc::collect(repo, now, grace, options.dry_run, &excluded, &mut failures).await?;
    repo.invalidate_chunk_index().await;
    Ok(PruneSummary {
        now,
        dry_run: options.dry_run,
        sources: planned,
        audit,
        drills,
        chunks,
        redeleted,
        replica_failures: failures,
    })
}

fn record(failures: &mut Vec<ReplicaFailure>, key: &str, failed: Vec<(String, String)>) {
    failures.extend(failed.into_iter().map(|(replica, error)| ReplicaFailure {
        replica,
        key: key.to_string(),
        error,
    }));
}

/// A source a reader holds keeps everything this prune planned to remove.
fn defer_if_held(prune: &mut SourcePrune, claims: &Claims) {
    if prune.removed.is_empty() {
        return;
    }
    if let Some(why) = claims.held(&prune.source) {
        tracing::warn!(source = %prune.source, reason = %why, "prune leaves the source's expired points until a later prune");
        prune.removed.clear();
        prune.deferred = Some(why);
    }
}

/// Delete again, on every replica, what earlier prunes removed (except the keys of sources a
/// reader holds, which wait); drop each tombstone whose keys every replica confirmed gone.
/// Returns the number of keys handled.
async fn finish_tombstones(
    repo: &Repository,
    claims: &Claims,
    failures: &mut Vec<ReplicaFailure>,
) -> Result<usize> {
    let mut handled = 0;
    for (key, tombstone) in repo.tombstones().await? {
        let before = failures.len();
        let mut waiting = false;
        for removed in &tombstone.keys {
            if layout::source_of(removed).is_some_and(|s| claims.held(s).is_some()) {
                waiting = true;
                continue;
            }
            record(failures, removed, repo.delete_on_replicas(removed).await);
            handled += 1;
        }
        if failures.len() == before && !waiting {
            record(failures, &key, repo.delete_on_replicas(&key).await);
        }
    }
    Ok(handled)
}

/// The daemon's `schedule.prune` job: prune every configured source now and log the outcome.
/// Runs between the daemon's other jobs, so it never overlaps this daemon's own writes.
pub async fn scheduled(config: &crate::config::Config, repo: &Repository) -> Result<PruneSummary> {
    let options = PruneOptions {
        dry_run: false,
        now: crate::clock::now(),
    };
    let summary = prune(repo, &config.sources, &config.retention, &options).await?;
    tracing::info!(
        removed = summary.removed(),
        chunks_deleted = summary.chunks.deleted.len(),
        chunks_marked = summary.chunks.marked,
        replica_failures = summary.replica_failures.len(),
        "prune finished"
    );
    for f in &summary.replica_failures {
        tracing::warn!(replica = %f.replica, key = %f.key, error = %f.error, "prune could not delete on a replica; the next prune retries");
    }
    Ok(summary)
}
