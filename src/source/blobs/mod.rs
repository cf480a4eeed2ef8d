//! Blob sources: any object_store location (contract PDFs, attachments) backed up by scans.
//!
//! A scan lists the store, compares each object's size, etag and last-modified with the
//! previous scan's listing, and reads only objects that are new or changed: streamed, cut into
//! content-defined chunks (FastCDC, so an appended or edited file shares most chunks with its
//! previous version) and stored as content-addressed chunks (so a file shared by many tenants
//! is stored once). An unchanged object costs one listing entry. Each scan then writes its full
//! listing as a scan manifest; deletions are implied by absence. Which versions make up the
//! store at an instant is decided by [`plan`]; docs/FORMAT.md §7 has the formats.
//!
//! The caller holds the repository lease (the daemon does): one scanner per source.

pub mod manifest;
pub mod plan;

use std::collections::BTreeMap;
use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use fastcdc::v2020::AsyncStreamCDC;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{Attribute, ObjectMeta, ObjectStoreExt};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind, Result};
use crate::repo::store::{open_store, Store};
use crate::repo::{ChunkRef, Repository};
use crate::time;
pub use manifest::{BlobEntry, EntryReader, EntryWriter, ScanManifest, LISTING_FORMAT};
pub use plan::{
    choose_version, load_catalog, plan_blobs, BlobCatalog, BlobPlan, BlobRestorePoint, ScanListing,
    ScanRef,
};

/// FastCDC bounds for blob content: chunks of 256 KiB to 4 MiB, about 1 MiB on average.
pub const CHUNK_MIN: u32 = 256 << 10;
pub const CHUNK_AVG: u32 = 1 << 20;
pub const CHUNK_MAX: u32 = 4 << 20;

/// What one scan did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScanStats {
    /// Objects in the store at this scan.
    pub objects: u64,
    pub new: u64,
    pub changed: u64,
    pub deleted: u64,
    pub unchanged: u64,
    /// Object bytes read from the store (new and changed objects only).
    pub bytes_read: u64,
    /// Sealed bytes uploaded for object content (per replica that lacked a chunk).
    pub bytes_uploaded: u64,
    /// Content chunks stored for the first time, and content chunks the repository had already.
    pub chunks_new: u64,
    pub chunks_deduplicated: u64,
    /// Listing chunks of the manifest stored for the first time (the rest deduplicated).
    pub listing_chunks_new: u64,
    pub manifest: String,
    pub scanned_at: DateTime<Utc>,
    pub seconds: f64,
}

/// A blob store being backed up.
pub struct BlobSource {
    name: String,
    store: Store,
    previous: Option<ScanRef>,
}

impl std::fmt::Debug for BlobSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobSource({})", self.name)
    }
}

impl BlobSource {
    /// Open the store at `url` (any object_store URL with builder `options`) and find the
    /// source's last scan in the repository.
    pub async fn open(
        name: &str,
        url: &str,
        options: &BTreeMap<String, String>,
        repo: &Repository,
    ) -> Result<BlobSource> {
        let store = open_store(url, options).map_err(|e| e.context(format!("source {name}")))?;
        let catalog = BlobCatalog::load(repo, name).await?;
        Ok(BlobSource {
            name: name.to_string(),
            store,
            previous: catalog.latest().cloned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last scan this source knows of.
    pub fn last_scan(&self) -> Option<&ScanRef> {
        self.previous.as_ref()
    }

    /// List the store, read what is new or changed, and write a scan manifest.
    pub async fn scan(&mut self, repo: &Repository) -> Result<ScanStats> {
        let started = Instant::now();
        let started_at = time::micros(crate::clock::now());
        // 1. List the store, in key order (the order of every listing in the repository).
        let mut metas: Vec<ObjectMeta> = self
            .store
            .list(None)
            .try_collect()
            .await
            .map_err(|e| self.store_error("list", e))?;
        metas.sort_by(|a, b| a.location.as_ref().cmp(b.location.as_ref()));
        // 2. Merge with the previous listing: carry unchanged entries, read the rest.
        let previous = match &self.previous {
            Some(scan) => Some(ScanManifest::read(repo, &scan.key).await?),
            None => None,
        };
        let mut prev = previous.as_ref().map(|m| m.entries(repo));
        let mut writer = EntryWriter::new(repo);
        let mut stats = ScanStats::default();
        for meta in &metas {
            let key = meta.location.as_ref();
            let mut before = None;
            if let Some(reader) = prev.as_mut() {
                while let Some(p) = reader.peek().await? {
                    if p.key.as_str() > key {
                        break;
                    }
                    let p = reader.next_entry().await?.expect("peeked");
                    if p.key == key {
                        before = Some(p);
                        break;
                    }
                    stats.deleted += 1;
                }
            }
            let entry = match before {
                Some(p) if unchanged(&p, meta) => {
                    stats.unchanged += 1;
                    p
                }
                before => {
                    let Some(entry) = self.ingest(repo, meta, &mut stats).await? else {
                        // Gone between the listing and the read: absent from this scan.
                        stats.deleted += u64::from(before.is_some());
                        continue;
                    };
                    if before.is_some() {
                        stats.changed += 1;
                    } else {
                        stats.new += 1;
                    }
                    entry
                }
            };
            writer.push(&entry).await?;
        }
        if let Some(reader) = prev.as_mut() {
            while reader.next_entry().await?.is_some() {
                stats.deleted += 1;
            }
        }
        // 3. The listing is durable; the root makes the scan visible.
        let listing = writer.finish().await?;
        let mut scanned_at = time::micros(crate::clock::now());
        if let Some(p) = &self.previous {
            scanned_at = scanned_at.max(p.scanned_at + chrono::Duration::microseconds(1));
        }
        let manifest = ScanManifest {
            source: self.name.clone(),
            format: LISTING_FORMAT.to_string(),
            started_at,
            scanned_at,
            previous: self.previous.as_ref().map(|p| p.key.clone()),
            objects: listing.objects,
            bytes: listing.object_bytes,
            listing: listing.chunks,
            listing_bytes: listing.bytes,
        };
        manifest.write(repo).await?;
        stats.objects = listing.objects;
        stats.listing_chunks_new = listing.chunks_new;
        stats.manifest = manifest.key();
        stats.scanned_at = scanned_at;
        stats.seconds = started.elapsed().as_secs_f64();
        self.previous = Some(ScanRef {
            scanned_at,
            key: manifest.key(),
        });
        tracing::info!(source = %self.name, objects = stats.objects, new = stats.new,
            changed = stats.changed, deleted = stats.deleted, bytes_read = stats.bytes_read,
            bytes_uploaded = stats.bytes_uploaded, "blob scan");
        Ok(stats)
    }

    /// Stream one object into content-defined chunks; `None` if it vanished before the read.
    async fn ingest(
        &self,
        repo: &Repository,
        meta: &ObjectMeta,
        stats: &mut ScanStats,
    ) -> Result<Option<BlobEntry>> {
        let key = meta.location.as_ref();
        let got = match self.store.get(&meta.location).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.store_error(&format!("read {key}"), e)),
        };
        let content_type = got
            .attributes
            .get(&Attribute::ContentType)
            .map(|v| v.as_ref().to_string());
        // The listing's metadata is what the next scan compares with; if the object was
        // replaced between listing and reading, record what was read instead.
        let replaced = got.meta.e_tag.is_some()
            && meta.e_tag.is_some()
            && normalize_etag(&got.meta.e_tag) != normalize_etag(&meta.e_tag);
        let read_meta = if replaced {
            got.meta.clone()
        } else {
            meta.clone()
        };
        let expected = got.meta.size;
        let reader = content_reader(got).map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!("source {}: reading {key}: {e}", self.name),
            )
        })?;
        let mut cdc = AsyncStreamCDC::new(reader, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX);
        let mut chunks = Box::pin(cdc.as_stream());
        let mut hasher = Sha256::new();
        let mut refs = Vec::new();
        let mut size = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| {
                Error::new(
                    ErrorKind::Unavailable,
                    format!("source {}: reading {key}: {e}", self.name),
                )
            })?;
            hasher.update(&chunk.data);
            size += chunk.length as u64;
            let written = repo.put_chunk(Bytes::from(chunk.data)).await?;
            if written.uploaded > 0 {
                stats.chunks_new += 1;
                stats.bytes_uploaded += written.uploaded;
            } else {
                stats.chunks_deduplicated += 1;
            }
            refs.push(ChunkRef {
                id: written.id,
                len: written.len,
            });
        }
        stats.bytes_read += size;
        if size != expected {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "source {}: {key} changed while being read ({size} bytes read, {expected} expected)",
                    self.name
                ),
            )
            .with_hint("run the scan again"));
        }
        Ok(Some(BlobEntry {
            key: key.to_string(),
            size,
            etag: read_meta.e_tag,
            last_modified: read_meta.last_modified,
            content_type,
            sha256: hex::encode(hasher.finalize()),
            chunks: refs,
        }))
    }

    fn store_error(&self, what: &str, e: object_store::Error) -> Error {
        Error::new(
            ErrorKind::Unavailable,
            format!("source {}: {what}: {e}", self.name),
        )
        .with_hint("check the source's url, options and credentials")
    }
}

/// Whether a listed object is the version a previous scan recorded.
fn unchanged(before: &BlobEntry, meta: &ObjectMeta) -> bool {
    before.size == meta.size
        && before.last_modified == meta.last_modified
        && (before.etag.is_none()
            || meta.e_tag.is_none()
            || normalize_etag(&before.etag) == normalize_etag(&meta.e_tag))
}

/// Stores differ on whether an etag is quoted (and weak) in listings and in reads.
fn normalize_etag(etag: &Option<String>) -> Option<&str> {
    etag.as_deref()
        .map(|e| e.trim_start_matches("W/").trim_matches('"'))
}

/// A store key as object_store spells it, for restores and reference checks.
/// The object's bytes as one async reader. A local file is read in large blocks (object_store's
/// own stream reads 8 KiB per round trip to a blocking thread, which dominated scan time);
/// remote stores keep their streaming body.
fn content_reader(
    got: object_store::GetResult,
) -> std::io::Result<std::pin::Pin<Box<dyn futures::AsyncRead + Send>>> {
    use tokio::io::AsyncReadExt as _;
    use tokio_util::compat::TokioAsyncReadCompatExt;
    match got.payload {
        object_store::GetResultPayload::File(mut file, _) => {
            use std::io::Seek;
            file.seek(std::io::SeekFrom::Start(got.range.start))?;
            let file = tokio::fs::File::from_std(file).take(got.range.end - got.range.start);
            Ok(Box::pin(
                tokio::io::BufReader::with_capacity(READ_BLOCK, file).compat(),
            ))
        }
        object_store::GetResultPayload::Stream(stream) => Ok(Box::pin(
            stream.map_err(std::io::Error::other).into_async_read(),
        )),
    }
}

/// Read size for local files.
const READ_BLOCK: usize = 4 << 20;

pub fn key_path(key: &str) -> Result<Path> {
    Path::parse(key).map_err(|e| Error::corrupt(format!("blob key {key:?} is not valid: {e}")))
}
