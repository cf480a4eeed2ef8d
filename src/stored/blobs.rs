//! Blob scan manifests (docs/FORMAT.md §7): one small root object per scan, and the scan's full
//! listing as JSON lines in content-addressed chunks.
//!
//! The listing is cut into chunks at record boundaries chosen by the records' own content, not
//! at fixed sizes: a scan that changes a few objects rewrites only the chunks around them, and
//! every other chunk of the listing deduplicates against the previous scan's. With fixed-size
//! cuts (`ChunkedWriter`), one inserted line would shift every later boundary and each scan
//! would store the whole listing again. Writing and reading hold one chunk at a time, so a
//! store of any size costs bounded memory.

use std::collections::VecDeque;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::archive::Kind;
use crate::error::{Error, Result};
use crate::repo::{layout, ChunkRef, Repository, WriteReceipt};
use crate::time;

/// Format of a scan manifest's listing: JSON lines of [`BlobEntry`], sorted by key.
pub const LISTING_FORMAT: &str = "blob-listing/1";

/// A listing chunk is cut after a record once it holds at least this many bytes and the
/// record's hash says so.
const LISTING_MIN: usize = 16 << 10;
/// A listing chunk is cut after the record that reaches this size, whatever its hash.
const LISTING_MAX: usize = 1 << 20;
/// One record in 64 (by hash) ends a chunk: about 32 KiB chunks for typical entries.
const LISTING_BOUNDARY_MASK: u8 = 0x3f;

/// One version of one object, as a scan saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobEntry {
    /// Key relative to the source location, as object_store spells it.
    pub key: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// The store's last-modified time: the version's put time.
    pub last_modified: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// SHA-256 of the content, computed while it was read; checked by every restore.
    pub sha256: String,
    pub chunks: Vec<ChunkRef>,
}

/// The root object of one scan: `manifests/<source>/<scanned at>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanManifest {
    pub source: String,
    /// [`LISTING_FORMAT`].
    pub format: String,
    /// When the scan began listing the store.
    pub started_at: DateTime<Utc>,
    /// When the scan had listed and read everything: the instant whose state this listing is.
    pub scanned_at: DateTime<Utc>,
    /// The scan this one compared against (`None` for the first).
    pub previous: Option<String>,
    /// Objects in the listing and the sum of their sizes.
    pub objects: u64,
    pub bytes: u64,
    /// The listing's chunks, in order, and their total length.
    pub listing: Vec<ChunkRef>,
    pub listing_bytes: u64,
}

impl ScanManifest {
    pub fn key(&self) -> String {
        layout::manifest(&self.source, &time::compact(self.scanned_at))
    }

    /// Write the root (its listing chunks must already be durable).
    pub async fn write(&self, repo: &Repository) -> Result<WriteReceipt> {
        let json = serde_json::to_vec(self).expect("manifest serializes");
        repo.write_object(Kind::Manifest, &self.key(), json).await
    }

    pub async fn read(repo: &Repository, key: &str) -> Result<ScanManifest> {
        let bytes = repo.read_object(Kind::Manifest, key).await?;
        let manifest: ScanManifest = serde_json::from_slice(&bytes).map_err(|e| {
            Error::corrupt(format!("blob manifest {key}: unreadable")).with_source(e)
        })?;
        if manifest.format != LISTING_FORMAT {
            return Err(Error::corrupt(format!(
                "blob manifest {key}: format {} is not {LISTING_FORMAT}",
                manifest.format
            ))
            .with_hint("this manifest was written by a newer timevault; upgrade to read it"));
        }
        Ok(manifest)
    }

    /// Read the listing, one chunk at a time.
    pub fn entries<'a>(&self, repo: &'a Repository) -> EntryReader<'a> {
        EntryReader {
            repo,
            name: self.key(),
            chunks: self.listing.clone().into(),
            buffered: VecDeque::new(),
            last_key: None,
        }
    }
}

/// What writing a listing cost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListingWrite {
    pub chunks: Vec<ChunkRef>,
    pub bytes: u64,
    pub objects: u64,
    pub object_bytes: u64,
    pub chunks_new: u64,
    pub uploaded: u64,
}

/// Writes a listing as JSON lines, cutting chunks at content-defined record boundaries.
pub struct EntryWriter<'a> {
    repo: &'a Repository,
    buf: Vec<u8>,
    out: ListingWrite,
    last_key: Option<String>,
}

impl<'a> EntryWriter<'a> {
    pub fn new(repo: &'a Repository) -> Self {
        EntryWriter {
            repo,
            buf: Vec::new(),
            out: ListingWrite::default(),
            last_key: None,
        }
    }

    /// Append one entry; keys must come in strictly increasing order.
    pub async fn push(&mut self, entry: &BlobEntry) -> Result<()> {
        if self.last_key.as_deref() >= Some(entry.key.as_str()) {
            return Err(Error::other(format!(
                "blob listing out of order at {:?}",
                entry.key
            )));
        }
        self.last_key = Some(entry.key.clone());
        let start = self.buf.len();
        serde_json::to_writer(&mut self.buf, entry).expect("entry serializes");
        self.buf.push(b'\n');
        self.out.objects += 1;
        self.out.object_bytes += entry.size;
        let boundary = blake3::hash(&self.buf[start..]).as_bytes()[0] & LISTING_BOUNDARY_MASK == 0;
        if (boundary && self.buf.len() >= LISTING_MIN) || self.buf.len() >= LISTING_MAX {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = Bytes::from(std::mem::take(&mut self.buf));
        let written = self.repo.put_chunk(data).await?;
        self.out.bytes += written.len;
        if written.uploaded > 0 {
            self.out.chunks_new += 1;
            self.out.uploaded += written.uploaded;
        }
        self.out.chunks.push(ChunkRef {
            id: written.id,
            len: written.len,
        });
        Ok(())
    }

    /// Store the last chunk; every chunk is durable at the write quorum when this returns.
    pub async fn finish(mut self) -> Result<ListingWrite> {
        self.flush().await?;
        Ok(self.out)
    }
}

/// Reads a listing entry by entry, holding one chunk's entries at a time, and checks that keys
/// strictly increase (merges over listings depend on it).
pub struct EntryReader<'a> {
    repo: &'a Repository,
    name: String,
    chunks: VecDeque<ChunkRef>,
    buffered: VecDeque<BlobEntry>,
    last_key: Option<String>,
}

impl EntryReader<'_> {
    /// The next entry without consuming it.
    pub async fn peek(&mut self) -> Result<Option<&BlobEntry>> {
        while self.buffered.is_empty() {
            let Some(chunk) = self.chunks.pop_front() else {
                return Ok(None);
            };
            self.load(&chunk).await?;
        }
        Ok(self.buffered.front())
    }

    pub async fn next_entry(&mut self) -> Result<Option<BlobEntry>> {
        self.peek().await?;
        Ok(self.buffered.pop_front())
    }

    async fn load(&mut self, chunk: &ChunkRef) -> Result<()> {
        let data = self.repo.read_chunk(&chunk.id).await?;
        if data.len() as u64 != chunk.len || data.last().is_some_and(|b| *b != b'\n') {
            return Err(Error::corrupt(format!(
                "blob manifest {}: listing chunk {} is not whole",
                self.name, chunk.id
            )));
        }
        for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let entry: BlobEntry = serde_json::from_slice(line).map_err(|e| {
                Error::corrupt(format!(
                    "blob manifest {}: unreadable entry in chunk {}: {e}",
                    self.name, chunk.id
                ))
            })?;
            if self.last_key.as_deref() >= Some(entry.key.as_str()) {
                return Err(Error::corrupt(format!(
                    "blob manifest {}: listing out of order at {:?}",
                    self.name, entry.key
                )));
            }
            self.last_key = Some(entry.key.clone());
            self.buffered.push_back(entry);
        }
        Ok(())
    }
}

/// A store key as object_store spells it, for restores and reference checks.
pub fn key_path(key: &str) -> Result<object_store::path::Path> {
    object_store::path::Path::parse(key)
        .map_err(|e| Error::corrupt(format!("blob key {key:?} is not valid")).with_source(e))
}
