//! The storage side of chunk garbage collection: marks, keep records and the sweep marker.
//!
//! Chunks are shared by every snapshot, segment and scan of every source, and a writer
//! deduplicates against the chunks it believes exist without telling anyone. Deleting a chunk
//! that no manifest references is therefore only safe in two phases (docs/ARCHITECTURE.md,
//! "Pruning"):
//!
//! 1. **Mark.** A prune records the chunks it found unreferenced (`catalog/gc/marks/<time>`).
//! 2. **Sweep.** A later prune, once a mark is older than `retention.chunk_grace`, deletes the
//!    marked chunks that are still unreferenced and that no writer has claimed.
//!
//! A writer claims a marked chunk before relying on it: it writes a keep record and then checks
//! that no sweep is running (the sweep writes its marker before it reads references and keep
//! records). Either the sweep sees the keep record, or the writer sees the sweep and fails its
//! job (retried later) instead of referencing a chunk that may vanish. A claimed chunk is written
//! again (create-only: a copy still there stays), in case a sweep deleted it after the writer
//! loaded its index. A writer's chunk index,
//! which holds the marks it knows, is reloaded at least every `chunk_grace / 2`, so a writer
//! that deduplicates against a chunk marked before its index was loaded references it within
//! the grace period, before any sweep may delete it (as long as one job finishes within half
//! the grace period; the default grace is a day).

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{layout, Repository};
use crate::archive::Kind;
use crate::error::{Error, ErrorKind, Result};
use crate::time;

/// Chunks a prune found unreferenced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMark {
    pub marked_at: DateTime<Utc>,
    pub chunks: Vec<String>,
}

/// Who is sweeping, for a marker left behind by a crash.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SweepRecord {
    started_at: DateTime<Utc>,
    pid: u32,
}

/// A sweep marker older than this was left by a crashed prune and is ignored.
const STALE_SWEEP: chrono::Duration = chrono::Duration::hours(1);

impl Repository {
    /// Every mark, by key.
    pub async fn chunk_marks(&self) -> Result<BTreeMap<String, ChunkMark>> {
        let mut marks = BTreeMap::new();
        for key in self.list(layout::GC_MARKS).await? {
            let bytes = self.read_object(Kind::Catalog, &key).await?;
            let mark: ChunkMark = serde_json::from_slice(&bytes)
                .map_err(|e| Error::corrupt(format!("chunk mark {key}: unreadable: {e}")))?;
            marks.insert(key, mark);
        }
        Ok(marks)
    }

    pub async fn write_chunk_mark(&self, mark: &ChunkMark) -> Result<String> {
        let key = layout::gc_mark(&time::compact(mark.marked_at));
        let json = serde_json::to_vec(mark).expect("mark serializes");
        self.write_object(Kind::Catalog, &key, json).await?;
        Ok(key)
    }

    /// The ids of every marked chunk (what a writer must claim before relying on it).
    pub(super) async fn marked_chunk_ids(&self) -> Result<HashSet<String>> {
        Ok(self
            .chunk_marks()
            .await?
            .into_values()
            .flat_map(|m| m.chunks)
            .collect())
    }

    /// Claim a marked chunk for a reference about to be written; fails while a sweep runs.
    pub(super) async fn keep_marked_chunk(&self, id: &str) -> Result<()> {
        let key = layout::gc_keep(id, &format!("{:08x}", rand::random::<u32>()));
        let json = serde_json::to_vec(&serde_json::json!({"kept_at": crate::clock::now()}))
            .expect("keep record serializes");
        self.write_object(Kind::Catalog, &key, json).await?;
        if self.sweep_running().await? {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("chunk {id} is being garbage-collected by a running prune"),
            )
            .with_hint("the job is retried on the next schedule; run it again after the prune"));
        }
        Ok(())
    }

    /// Whether any reachable replica holds a live sweep marker.
    async fn sweep_running(&self) -> Result<bool> {
        let mut answered = false;
        for replica in self.replicas.replicas() {
            match replica.get(layout::GC_SWEEPING).await {
                Ok(Some(bytes)) if self.sweep_is_live(&bytes) => return Ok(true),
                Ok(Some(_)) => answered = true,
                Ok(None) => answered = true,
                Err(e) => {
                    tracing::warn!(replica = %replica.name(), error = %e, "cannot check for a running chunk sweep")
                }
            }
        }
        if answered {
            Ok(false)
        } else {
            Err(Error::new(
                ErrorKind::Unavailable,
                "no replica answered whether a chunk sweep is running",
            ))
        }
    }

    /// A sweep marker that authenticates and is younger than [`STALE_SWEEP`]. One that does
    /// not authenticate counts as live: never guess in the unsafe direction.
    fn sweep_is_live(&self, bytes: &[u8]) -> bool {
        let record = crate::archive::open(&self.keys, Kind::Catalog, layout::GC_SWEEPING, bytes)
            .ok()
            .and_then(|b| serde_json::from_slice::<SweepRecord>(&b).ok());
        record.is_none_or(|r| crate::clock::now() - r.started_at < STALE_SWEEP)
    }

    /// Start a sweep: write the marker. False when another live sweep holds it.
    pub async fn begin_sweep(&self) -> Result<bool> {
        let now = crate::clock::now();
        let record = SweepRecord {
            started_at: now,
            pid: std::process::id(),
        };
        let json = serde_json::to_vec(&record).expect("sweep record serializes");
        let receipt = self
            .write_object(Kind::Catalog, layout::GC_SWEEPING, json.clone())
            .await?;
        if receipt.uploaded {
            return Ok(true);
        }
        let existing: Option<SweepRecord> = self
            .read_object(Kind::Catalog, layout::GC_SWEEPING)
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        match existing {
            Some(r) if now - r.started_at < STALE_SWEEP => Ok(false),
            _ => {
                tracing::warn!("removing a chunk sweep marker left by a crashed prune");
                self.end_sweep().await;
                let receipt = self
                    .write_object(Kind::Catalog, layout::GC_SWEEPING, json)
                    .await?;
                Ok(receipt.uploaded)
            }
        }
    }

    /// Remove the sweep marker. A replica that is down keeps its copy until it turns stale.
    pub async fn end_sweep(&self) {
        for (replica, error) in self.delete_on_replicas(layout::GC_SWEEPING).await {
            tracing::warn!(%replica, %error, "could not remove the chunk sweep marker; it expires by itself");
        }
    }

    /// Keep records: the claimed chunk ids and the records' keys.
    pub async fn chunk_keeps(&self) -> Result<(HashSet<String>, Vec<String>)> {
        let keys = self.list(layout::GC_KEEPS).await?;
        let ids = keys
            .iter()
            .filter_map(|k| k.strip_prefix(layout::GC_KEEPS)?.split('/').next())
            .map(str::to_string)
            .collect();
        Ok((ids, keys))
    }

    /// Every chunk id on any reachable replica.
    pub async fn chunk_ids(&self) -> Result<Vec<String>> {
        Ok(self
            .list(layout::CHUNKS)
            .await?
            .iter()
            .filter_map(|k| layout::chunk_id_of(k).map(str::to_string))
            .collect())
    }

    /// Forget what the chunk index knows (after a prune deleted chunks): the next chunk write
    /// lists the replicas and reads the marks again.
    pub async fn invalidate_chunk_index(&self) {
        self.chunk_index.invalidate().await;
    }

    /// Delete `key` on every replica; the replicas that failed, with why. Absent is success.
    pub async fn delete_on_replicas(&self, key: &str) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        for replica in self.replicas.replicas() {
            if let Err(e) = replica.delete(key).await {
                failed.push((replica.name().to_string(), e.to_string()));
            }
        }
        failed
    }
}
