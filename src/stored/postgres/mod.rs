//! What a PostgreSQL source stores: snapshot details (the captured-table model, the schema
//! image, the table images with their tenants, where the change log starts), change-log
//! positions and segment details, and the change records' codec. Capture writes these types;
//! restore, export, prune and drill read them without importing `source`.

pub mod changes;
pub mod copy_text;
pub mod ddl;
pub mod image;
mod lsn;
pub mod schema;
pub mod tenancy;

use serde::{Deserialize, Serialize};

pub use image::SchemaImage;
pub use lsn::Lsn;
pub use schema::{Schema, SequenceValue};

use chrono::{DateTime, Utc};

use crate::repo::ChunkRef;

/// `DateTime` from µs since the Unix epoch.
pub fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// Source-specific part of a snapshot manifest (`kind` = `postgres`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PostgresSnapshotDetails {
    pub server_version: String,
    pub slot: String,
    pub publication: String,
    /// `pg_current_snapshot()` of the snapshot transaction: `xmin:xmax:xip,...`.
    pub snapshot: String,
    /// `pg_current_wal_lsn()` in the snapshot transaction (informational).
    pub wal_lsn: String,
    /// Where this chain's change log starts: the slot's confirmed position at the snapshot.
    pub start: Position,
    /// The captured-table model (columns and keys, for decoding, replay and tenancy).
    pub schema: Schema,
    /// The whole schema as `pg_dump --schema-only` wrote it at the exported snapshot; absent
    /// in snapshots of format 1 (before schema images), which this version refuses to restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_image: Option<SchemaImage>,
    pub tables: Vec<TableImage>,
    /// `chunk-ids`: the manifest's `sha256` covers the chunk ids, not the rows
    /// ([`chunk_ids_digest`]); absent in snapshots copied on one connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
}

/// One table's rows in a snapshot: COPY text format, whole rows per chunk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableImage {
    pub schema: String,
    pub name: String,
    /// The columns copied, in COPY order.
    pub columns: Vec<String>,
    pub rows: u64,
    pub bytes: u64,
    pub chunks: Vec<ChunkRef>,
    /// Which tenant each chunk holds (snapshots since tenant grouping; absent before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenancy: Option<tenancy::TableTenancy>,
}

impl TableImage {
    /// The image without the chunks of the tenants `gone` says are gone (forgotten), and how
    /// many chunks that left out.
    pub fn without_tenants(&self, gone: &dyn Fn(&str) -> bool) -> (TableImage, usize) {
        let Some(tenancy) = self.tenancy.as_ref().filter(|t| t.key.is_some()) else {
            return (self.clone(), 0);
        };
        let keep: Vec<bool> = (0..self.chunks.len())
            .map(|i| {
                tenancy
                    .chunk_tenants
                    .get(i)
                    .and_then(|t| t.as_deref())
                    .is_none_or(|t| !gone(t))
            })
            .collect();
        let left_out = keep.iter().filter(|k| !**k).count();
        if left_out == 0 {
            return (self.clone(), 0);
        }
        let pick = |i: usize| keep.get(i).copied().unwrap_or(true);
        let mut image = self.clone();
        image.chunks = (0..self.chunks.len())
            .filter(|i| pick(*i))
            .map(|i| self.chunks[i].clone())
            .collect();
        image.bytes = image.chunks.iter().map(|c| c.len).sum();
        if let Some(t) = image.tenancy.as_mut() {
            t.chunk_tenants = (0..tenancy.chunk_tenants.len())
                .filter(|i| pick(*i))
                .map(|i| tenancy.chunk_tenants[i].clone())
                .collect();
        }
        (image, left_out)
    }
}

/// A position in the change stream, stored in snapshots and at both ends of every segment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The slot's confirmed position: the end LSN of the last stored commit.
    pub lsn: Lsn,
    /// Commit timestamp (µs since the Unix epoch) of the last stored transaction.
    pub commit_us: Option<i64>,
    /// Sequence values read after the changes (sequences are not decoded).
    #[serde(default)]
    pub sequences: Vec<SequenceValue>,
    /// The catalog fingerprint of the chain's newest schema image (absent before images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_fingerprint: Option<String>,
}

/// A parsed `pg_current_snapshot()`: which transactions a snapshot sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSnapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
}

impl PgSnapshot {
    pub fn parse(text: &str) -> Option<PgSnapshot> {
        let mut parts = text.splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        Some(PgSnapshot { xmin, xmax, xip })
    }

    /// The 64-bit transaction id nearest to `xmax` whose low 32 bits are `xid` (pgoutput sends
    /// 32-bit ids; the snapshot has epoch-extended ones).
    pub fn widen(&self, xid: u32) -> u64 {
        let base = self.xmax & !0xffff_ffff;
        let candidate = base | u64::from(xid);
        if candidate > self.xmax.saturating_add(1 << 31) && candidate >= 1 << 32 {
            candidate - (1 << 32)
        } else if candidate.saturating_add(1 << 31) < self.xmax {
            candidate + (1 << 32)
        } else {
            candidate
        }
    }

    /// Whether the transaction's effects are already in the snapshot's rows.
    pub fn sees(&self, xid: u32) -> bool {
        let xid = self.widen(xid);
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }
}

/// A PostgreSQL segment's `details` (FORMAT.md §8.2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SegmentDetails {
    /// A schema image taken during the pass that wrote this segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_image: Option<SchemaImage>,
}

/// `PostgresSnapshotDetails::image_digest` of snapshots whose `sha256` covers chunk ids.
pub const IMAGE_DIGEST_CHUNK_IDS: &str = "chunk-ids";

/// The manifest's `sha256` for parallel snapshots: SHA-256 over every chunk id (64 hex digits)
/// followed by `\n`, in the manifest's `chunks` order. Parts are hashed on different
/// connections at once, so no single stream of the rows exists to hash; a chunk's id is a
/// keyed hash of its content, checked on every read, so the ids in order cover the content.
pub fn chunk_ids_digest<'a>(chunks: impl IntoIterator<Item = &'a crate::repo::ChunkRef>) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for chunk in chunks {
        hasher.update(chunk.id.as_bytes());
        hasher.update(b"\n");
    }
    hex::encode(hasher.finalize())
}
