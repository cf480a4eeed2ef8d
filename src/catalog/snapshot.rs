//! Snapshot manifests: a consistent full image of one source, as a list of chunks, and the
//! position where its change log begins.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::rowsum::TableSum;
use crate::archive::Kind;
use crate::config::SourceKind;
use crate::error::{Error, Result};
use crate::repo::{layout, ChunkRef, Repository, WriteReceipt};

/// Why a snapshot (and so a new chain) was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotReason {
    /// The first snapshot of the source.
    Initial,
    /// A scheduled or requested snapshot; the previous chain ends exactly here.
    Rotation,
    /// The change log could not prove continuity; a gap may precede this snapshot.
    ContinuityLost(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    pub source: String,
    pub kind: SourceKind,
    /// The chain this snapshot starts; equal to the compact form of `taken_at`.
    pub chain: String,
    /// The consistent point: the image equals the source at this instant.
    pub taken_at: DateTime<Utc>,
    pub reason: SnapshotReason,
    /// The chain that ended where this one starts (rotation only).
    pub continues: Option<String>,
    /// Size and SHA-256 of the full image, checked after a restore rebuilds it.
    pub bytes: u64,
    pub sha256: String,
    pub chunks: Vec<ChunkRef>,
    /// Source-specific details (page size, change-log start position, base frames...): read
    /// them with [`SnapshotManifest::details`].
    pub details: serde_json::Value,
    /// Row-content checksum of every table at `taken_at` (`schema.table` for PostgreSQL),
    /// recorded while the snapshot was taken; restore drills compare against it. Absent in
    /// manifests written before it existed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub table_sums: BTreeMap<String, TableSum>,
}

impl SnapshotManifest {
    pub fn key(&self) -> String {
        layout::snapshot(&self.source, &self.chain)
    }

    pub async fn write(&self, repo: &Repository) -> Result<WriteReceipt> {
        let json = serde_json::to_vec(self).expect("manifest serializes");
        repo.write_object(Kind::Snapshot, &self.key(), json).await
    }

    /// The source-specific details as the type the source wrote (`SqliteSnapshotDetails`,
    /// `PostgresSnapshotDetails`); details of another shape are a corrupt manifest.
    pub fn details<D: serde::de::DeserializeOwned>(&self) -> Result<D> {
        D::deserialize(&self.details).map_err(|e| {
            Error::corrupt(format!(
                "snapshot {}: unreadable {} details: {e}",
                self.key(),
                self.kind
            ))
        })
    }

    pub async fn read(repo: &Repository, key: &str) -> Result<SnapshotManifest> {
        let bytes = repo.read_object(Kind::Snapshot, key).await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::corrupt(format!("snapshot {key}: unreadable manifest")).with_source(e)
        })
    }
}
