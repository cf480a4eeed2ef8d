//! `verify`'s second half: does the catalog hold together? Every chunk a snapshot, segment or
//! scan manifest names must exist (restic's `check` without `--read-data`), and every chain's
//! change log must be whole: sequence numbers without holes, each segment starting where the one
//! before it ended ([`crate::changelog::Links`]).
//!
//! Replicas are compared with each other by `repo::verify`; this checks the union of their
//! listings against what the manifests reference, so an object lost on every replica shows.

use std::collections::{BTreeMap, BTreeSet};

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::archive::Kind;
use crate::catalog::{SnapshotManifest, SourceCatalog};
use crate::changelog::{Links, SegmentManifest};
use crate::error::Result;
use crate::prune::refs::{listing_refs, manifest_refs};
use crate::repo::{layout, Repository};

/// The chunks a manifest names and (for a scan root) its listing chunks.
type ManifestRefs = (Vec<String>, Vec<String>);

/// Manifests read at once.
const CONCURRENCY: usize = 16;

/// A chunk a manifest names that no replica holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dangling {
    pub manifest: String,
    pub chunk: String,
}

/// A chain whose change log has a hole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hole {
    pub source: String,
    pub chain: String,
    pub problem: String,
}

/// What the catalog check found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CatalogCheck {
    pub manifests: u64,
    pub chunks_referenced: u64,
    pub chains: u64,
    pub dangling: Vec<Dangling>,
    pub holes: Vec<Hole>,
    /// Objects under `chunks/` that are not chunks (wrong name, length, digits): never read,
    /// never collected; remove them by hand once understood.
    pub stray: Vec<String>,
    /// Change-log segments a superseded lease holder wrote (a writer that stalled past its
    /// lease's expiry while another took over): never restored, deleted with their chain.
    /// Reported, not a failure: the chain restores without them.
    #[serde(default)]
    pub superseded: Vec<String>,
    /// Chunks of forgotten tenants (`tenant forget`) that manifests still name and a prune
    /// deleted: left out of every restore on purpose. Reported, not a failure.
    #[serde(default)]
    pub forgotten: u64,
}

impl CatalogCheck {
    pub fn is_clean(&self) -> bool {
        self.dangling.is_empty() && self.holes.is_empty() && self.stray.is_empty()
    }
}

/// Check references and chains over the union of every replica's listing.
pub async fn check_catalog(repo: &Repository) -> Result<CatalogCheck> {
    let (present, stray): (BTreeSet<String>, BTreeSet<String>) = repo
        .list(layout::CHUNKS)
        .await?
        .into_iter()
        .partition(|k| layout::chunk_id_of(k).is_some());
    let mut check = CatalogCheck {
        stray: stray.into_iter().collect(),
        ..CatalogCheck::default()
    };
    check_references(repo, &present, &mut check).await?;
    for source in sources(repo).await? {
        let catalog = SourceCatalog::load(repo, &source).await?;
        for chain in &catalog.chains {
            check.chains += 1;
            for s in &chain.superseded {
                tracing::warn!(source = %source, segment = %s.key, "segment written under a superseded lease: ignored");
                check.superseded.push(s.key.clone());
            }
            if let Err(problem) = check_chain(repo, chain).await {
                check.holes.push(Hole {
                    source: source.clone(),
                    chain: chain.id().to_string(),
                    problem,
                });
            }
        }
    }
    Ok(check)
}

/// Every chunk named by a manifest (and by a scan's listing chunks) must be present.
async fn check_references(
    repo: &Repository,
    present: &BTreeSet<String>,
    check: &mut CatalogCheck,
) -> Result<()> {
    let mut keys = Vec::new();
    for prefix in ["snapshots/", "changelog/", "manifests/"] {
        keys.extend(repo.list(prefix).await?);
    }
    check.manifests = keys.len() as u64;
    let found: Vec<(String, ManifestRefs)> = futures::stream::iter(keys)
        .map(|key| async move { manifest_refs(repo, &key).await.map(|refs| (key, refs)) })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let mut named: BTreeMap<String, String> = BTreeMap::new();
    let mut listings: BTreeMap<String, String> = BTreeMap::new();
    for (manifest, (chunks, listing)) in found {
        for id in chunks {
            named.entry(id).or_insert_with(|| manifest.clone());
        }
        for id in listing {
            listings.entry(id).or_insert_with(|| manifest.clone());
        }
    }
    for (id, manifest) in &listings {
        if !present.contains(&layout::chunk(id)) {
            continue; // reported below as dangling; its lines cannot be read
        }
        for content in listing_refs(repo, id).await? {
            named.entry(content).or_insert_with(|| manifest.clone());
        }
    }
    check.chunks_referenced = named.len() as u64;
    let forgotten = repo.forgotten().await?.chunk_ids();
    for (chunk, manifest) in named {
        if present.contains(&layout::chunk(&chunk)) {
            continue;
        }
        if forgotten.contains(&chunk) {
            check.forgotten += 1;
        } else {
            check.dangling.push(Dangling { manifest, chunk });
        }
    }
    Ok(())
}

/// Source names that have snapshots.
async fn sources(repo: &Repository) -> Result<BTreeSet<String>> {
    Ok(repo
        .list("snapshots/")
        .await?
        .iter()
        .filter_map(|k| k.strip_prefix("snapshots/")?.split_once('/'))
        .map(|(source, _)| source.to_string())
        .collect())
}

/// A chain's sequence numbers and links; the error says what is wrong.
async fn check_chain(
    repo: &Repository,
    chain: &crate::catalog::Chain,
) -> std::result::Result<(), String> {
    if let Some(gap) = chain.first_gap() {
        return Err(gap.error(&chain.snapshot.source).to_string());
    }
    let snapshot = SnapshotManifest::read(repo, &chain.snapshot.key)
        .await
        .map_err(|e| e.to_string())?;
    let Some(resume) = resume_position(&snapshot) else {
        return Ok(()); // blob scans have no change log
    };
    let mut links = Links::new(&chain.snapshot.key, resume);
    for entry in &chain.segments {
        let bytes = repo
            .read_object(Kind::Segment, &entry.key)
            .await
            .map_err(|e| e.to_string())?;
        let segment: SegmentManifest = serde_json::from_slice(&bytes)
            .map_err(|e| format!("segment {}: unreadable manifest: {e}", entry.key))?;
        links
            .check(&entry.key, &segment)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Where the snapshot says its change log starts: `resume` (SQLite) or `start` (PostgreSQL).
fn resume_position(snapshot: &SnapshotManifest) -> Option<serde_json::Value> {
    let field = match snapshot.kind {
        crate::config::SourceKind::Sqlite => "resume",
        crate::config::SourceKind::Postgres => "start",
        crate::config::SourceKind::Blobs => return None,
    };
    snapshot.details.get(field).cloned()
}
