//! `restore --dry-run`: the plan a restore would follow, and nothing else. It reads the catalog
//! and the manifests the restore would read (to count chunks and bytes), lists which replicas
//! hold them, and checks the target; it writes nothing, not even a read claim or an audit record.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::catalog::Catalog;
use crate::config::SourceConfig;
use crate::error::{Error, Result};
use crate::repo::{layout, Repository};
use crate::time::At;

/// What a restore of one source would do.
#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    pub source: String,
    pub kind: String,
    pub requested: DateTime<Utc>,
    /// The instant whose state the restore would give: the last capture (or scan) at or
    /// before the requested instant.
    pub reaches: DateTime<Utc>,
    /// The snapshot (or base scan) it starts from.
    pub base: String,
    /// Change-log segments (or later scans) applied after the base.
    pub later: usize,
    /// Manifests read (base and later ones).
    pub manifests: Vec<String>,
    /// Distinct chunks those manifests name, and their stored size.
    pub chunks: usize,
    pub bytes: u64,
    /// Per replica: how many of the objects to read it lacks (a restore fails over per object).
    pub replicas: Vec<ReplicaHolding>,
    /// What the target check says now (the restore checks again before it writes).
    pub target: String,
    /// False when the restore would refuse the target as things are.
    pub target_ok: bool,
}

/// How much of a plan one replica holds.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaHolding {
    pub replica: String,
    pub missing: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Plan the restore of `source` to `at` into `target`, touching nothing.
pub async fn dry_run(
    repo: &Repository,
    source: &SourceConfig,
    at: At,
    target: &str,
    force: bool,
) -> Result<DryRun> {
    let (requested, reaches, manifests) = plan_manifests(repo, source, at).await?;
    let target_now = super::registry::of(source.kind()).target_now(target, force);
    let chunks = chunk_sizes(repo, &manifests).await?;
    let mut objects: BTreeSet<String> = manifests.iter().cloned().collect();
    objects.extend(chunks.keys().map(|id| layout::chunk(id)));
    Ok(DryRun {
        source: source.name.clone(),
        kind: source.kind().to_string(),
        requested,
        reaches,
        base: manifests[0].clone(),
        later: manifests.len() - 1,
        chunks: chunks.len(),
        bytes: chunks.values().sum(),
        replicas: holdings(repo, &objects).await,
        target_ok: !target_now.starts_with("REFUSED"),
        target: target_now,
        manifests,
    })
}

/// The plaintext bytes of the chunks a restore of `source` to `at` reads (for a progress
/// bar; reads the manifests, nothing else).
pub async fn bytes_to_read(repo: &Repository, source: &SourceConfig, at: At) -> Result<u64> {
    let (_, _, manifests) = plan_manifests(repo, source, at).await?;
    Ok(chunk_sizes(repo, &manifests).await?.values().sum())
}

/// The requested instant, the instant reached and the manifests read, base first.
async fn plan_manifests(
    repo: &Repository,
    source: &SourceConfig,
    at: At,
) -> Result<(DateTime<Utc>, DateTime<Utc>, Vec<String>)> {
    let plan = Catalog::load_for(repo, source, at)
        .await?
        .plan_manifests(at)?;
    Ok((plan.requested, plan.reaches, plan.manifests))
}

/// Every chunk the manifests name, with its stored length (scan listings included).
async fn chunk_sizes(repo: &Repository, manifests: &[String]) -> Result<BTreeMap<String, u64>> {
    let mut sizes = BTreeMap::new();
    for key in manifests {
        let Some(kind) = layout::kind_of(key) else {
            continue;
        };
        let bytes = repo.read_object(kind, key).await?;
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(format!("{key}: unreadable manifest")).with_source(e))?;
        collect_sized(&value, &mut sizes);
        if let Some(listing) = value.get("listing") {
            let mut ids = BTreeMap::new();
            collect_sized(listing, &mut ids);
            for id in ids.keys() {
                let lines = repo.read_chunk(id).await?;
                for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
                        collect_sized(&v, &mut sizes);
                    }
                }
            }
        }
    }
    Ok(sizes)
}

/// Every `{"id": <64 hex>, "len": n}` inside `value` (the shape `prune` counts as a reference).
fn collect_sized(value: &serde_json::Value, out: &mut BTreeMap<String, u64>) {
    match value {
        serde_json::Value::Object(map) => {
            if let (Some(serde_json::Value::String(id)), Some(len)) =
                (map.get("id"), map.get("len").and_then(|l| l.as_u64()))
            {
                if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    out.insert(id.clone(), len);
                }
            }
            map.values().for_each(|v| collect_sized(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_sized(v, out)),
        _ => {}
    }
}

/// Which of `objects` each replica lacks: one listing per directory of keys.
async fn holdings(repo: &Repository, objects: &BTreeSet<String>) -> Vec<ReplicaHolding> {
    let mut dirs: BTreeSet<&str> = BTreeSet::new();
    for key in objects {
        dirs.insert(key.rsplit_once('/').map_or("", |(dir, _)| dir));
    }
    let mut out = Vec::new();
    for replica in repo.replicas().replicas() {
        let mut present = BTreeSet::new();
        let mut error = None;
        for dir in &dirs {
            match replica.list(&format!("{dir}/")).await {
                Ok(metas) => present.extend(metas.into_iter().map(|m| m.location.to_string())),
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        out.push(ReplicaHolding {
            replica: replica.name().to_string(),
            missing: objects.iter().filter(|k| !present.contains(*k)).count(),
            error,
        });
    }
    out
}
