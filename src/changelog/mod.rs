//! Change-log segments: what changed in a source after its snapshot, in capture order.
//!
//! A segment is a small manifest object (kind `segment`) naming the chunks that hold its
//! payload; the payload format belongs to the source (`format` says which). A segment is
//! written only after all its chunks are durable at the write quorum, and always ends on a
//! transaction boundary, so a restore applies whole transactions or none.

mod links;

pub use links::Links;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::archive::Kind;
use crate::error::{Error, Result};
use crate::repo::{layout, ChunkList, ChunkRef, Repository, WriteReceipt};
use crate::time;

/// The manifest of one segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentManifest {
    pub source: String,
    pub chain: String,
    pub seq: u64,
    /// When the changes were read from the source: a restore to T applies the segments
    /// captured at or before T.
    pub captured_at: DateTime<Utc>,
    /// Payload format, e.g. `sqlite-wal-frames/1`.
    pub format: String,
    pub records: u64,
    pub transactions: u64,
    pub bytes: u64,
    pub chunks: Vec<ChunkRef>,
    /// Source-specific position before the first change of this segment.
    pub start: serde_json::Value,
    /// Source-specific position after the last change: where capture resumes.
    pub end: serde_json::Value,
    /// `start` is exactly the previous segment's `end` (or the snapshot's resume position),
    /// so a reader can prove the chain has no hole ([`Links`]). Absent (false) in SQLite
    /// segments written before it; PostgreSQL segments always linked.
    #[serde(default)]
    pub linked: bool,
    /// Source-specific facts about the segment (PostgreSQL: a schema image taken during its
    /// capture, FORMAT.md §8.2); absent in most segments and in every older one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
    /// The epoch of the source lease it was written under (also in its key, FORMAT.md §6): the
    /// catalog sets aside a segment whose epoch an earlier segment of the chain exceeds, or
    /// that another segment of the same sequence number and a higher epoch replaces (a writer
    /// that stalled past its lease's expiry). Absent when written without a lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_epoch: Option<u64>,
}

impl SegmentManifest {
    pub fn key(&self) -> String {
        layout::segment(
            &self.source,
            &self.chain,
            self.seq,
            &time::compact(self.captured_at),
            self.lease_epoch,
        )
    }

    /// Where capture resumes after this segment, as the type the source wrote (`Resume`,
    /// `Position`); another shape is a corrupt manifest.
    pub fn end_position<P: serde::de::DeserializeOwned>(&self) -> Result<P> {
        P::deserialize(&self.end).map_err(|e| {
            Error::corrupt(format!(
                "segment {}: unreadable end position: {e}",
                self.key()
            ))
        })
    }

    /// The source-specific details, as the type the source wrote; `None` when absent.
    pub fn details<D: serde::de::DeserializeOwned>(&self) -> Result<Option<D>> {
        self.details
            .as_ref()
            .map(|value| {
                D::deserialize(value).map_err(|e| {
                    Error::corrupt(format!("segment {}: unreadable details: {e}", self.key()))
                })
            })
            .transpose()
    }

    /// Whether `start` names the previous segment's `end` (see `linked`).
    pub fn is_linked(&self) -> bool {
        self.linked || self.format.starts_with("postgres-changes/")
    }

    pub fn set_payload(&mut self, list: &ChunkList) {
        self.bytes = list.bytes;
        self.chunks = list.chunks.clone();
    }

    /// Write the manifest (its chunks must already be durable).
    pub async fn write(&self, repo: &Repository) -> Result<WriteReceipt> {
        let json = serde_json::to_vec(self).expect("manifest serializes");
        repo.write_object(Kind::Segment, &self.key(), json).await
    }

    pub async fn read(repo: &Repository, key: &str) -> Result<SegmentManifest> {
        let bytes = repo.read_object(Kind::Segment, key).await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::corrupt(format!("segment {key}: unreadable manifest")).with_source(e)
        })
    }
}
