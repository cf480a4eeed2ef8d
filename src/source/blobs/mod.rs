//! Blob sources: any object_store location (contract PDFs, attachments) backed up by scans.
//!
//! A scan lists the store, compares each object's size, etag and last-modified with the
//! previous scan's listing, and reads only objects that are new or changed: streamed, cut into
//! content-defined chunks (FastCDC, so an appended or edited file shares most chunks with its
//! previous version) and stored as content-addressed chunks (so a file shared by many tenants
//! is stored once). An unchanged object costs one listing entry. Each scan then writes its full
//! listing as a scan manifest; deletions are implied by absence. Which versions make up the
//! store at an instant is decided by `catalog::blobs`; the scan manifests are `stored::blobs`;
//! docs/FORMAT.md §7 has the formats.
//!
//! The caller holds the repository lease (the daemon does): one scanner per source.

mod ingest;
/// The blob catalog and planner (moved to `catalog::blobs`).
pub use crate::catalog::blobs as plan;
/// The scan manifests (moved to `stored::blobs`; this path stays for library callers).
pub use crate::stored::blobs as manifest;

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use object_store::{Attribute, ObjectMeta, ObjectStoreExt};
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};

pub use crate::catalog::blobs::{
    choose_version, load_catalog, plan_blobs, BlobCatalog, BlobPlan, BlobRestorePoint, ScanListing,
    ScanRef,
};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::store::{open_store, Store};
use crate::repo::Repository;
use crate::stored::blobs::ListingWrite;
pub use crate::stored::blobs::{
    key_path, BlobEntry, EntryReader, EntryWriter, ScanManifest, LISTING_FORMAT,
};
use crate::tenancy::BlobRule;
use crate::time;
pub use ingest::Cutter;
use ingest::IngestError;

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
    /// With `[tenancy] tenant_keys`: the source's `prefix:` rule; an object under a tenant's
    /// prefix is stored under the tenant's key.
    tenant_rule: Option<BlobRule>,
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
            tenant_rule: None,
        })
    }

    /// Open a configured blob source: with `[tenancy] tenant_keys` and a `prefix:` rule for it,
    /// each tenant's objects are stored under the tenant's key.
    pub async fn open_configured(
        config: &crate::config::SourceConfig,
        tenancy: Option<&crate::tenancy::TenancyConfig>,
        repo: &Repository,
    ) -> Result<BlobSource> {
        let mut source =
            BlobSource::open(&config.name, &config.url, config.store_options(), repo).await?;
        source.tenant_rule = tenancy
            .filter(|t| t.tenant_keys)
            .and_then(|t| t.blobs.get(&config.name))
            .filter(|rule| matches!(rule, BlobRule::Prefix(_)))
            .cloned();
        Ok(source)
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
        // 2. Merge with the previous listing: carry unchanged entries, read the rest (several
        //    objects at once), and write the new listing in key order as entries complete.
        let previous = match &self.previous {
            Some(scan) => Some(ScanManifest::read(repo, &scan.key).await?),
            None => None,
        };
        // An entry whose chunks a `tenant forget` destroyed is read again if the object is
        // still there (the tenant's data is backed up again, under a new key).
        let forgotten = repo.forgotten().await?.chunk_ids();
        let (entries, listed) = mpsc::channel(LISTING_QUEUE);
        let (mut stats, listing) = tokio::try_join!(
            self.merge(repo, &metas, previous.as_ref(), &forgotten, entries),
            write_listing(repo, listed)
        )?;
        // 3. Every chunk the listing names and the listing itself are durable; the root makes
        //    the scan visible.
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

    /// Walk the listing against the previous scan's, send each entry of the new listing to
    /// `out` in key order, and read new or changed objects [`OBJECTS_IN_FLIGHT`] at a time.
    /// An entry is sent only once all its chunks are stored.
    async fn merge(
        &self,
        repo: &Repository,
        metas: &[ObjectMeta],
        previous: Option<&ScanManifest>,
        forgotten: &std::collections::HashSet<String>,
        out: mpsc::Sender<BlobEntry>,
    ) -> Result<ScanStats> {
        let budget = Arc::new(Semaphore::new(ingest::SCAN_MEMORY));
        let mut prev = previous.map(|m| m.entries(repo));
        let mut stats = ScanStats::default();
        let mut queue = InOrder::default();
        let mut reading = FuturesUnordered::new();
        for meta in metas {
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
            match before {
                Some(p)
                    if unchanged(&p, meta)
                        && !p.chunks.iter().any(|c| forgotten.contains(&c.id)) =>
                {
                    stats.unchanged += 1;
                    queue.push(Slot::Ready(p));
                }
                before => {
                    let seq = queue.push(Slot::Reading);
                    let had_before = before.is_some();
                    let budget = budget.clone();
                    reading.push(async move {
                        (seq, had_before, self.ingest(repo, meta, budget).await)
                    });
                }
            }
            queue.send_ready(&out).await?;
            while reading.len() >= OBJECTS_IN_FLIGHT
                || (queue.len() >= LISTING_QUEUE && !reading.is_empty())
            {
                let (seq, had_before, read) = reading.next().await.expect("non-empty");
                queue.complete(seq, had_before, read?, &mut stats);
                queue.send_ready(&out).await?;
            }
        }
        while let Some((seq, had_before, read)) = reading.next().await {
            queue.complete(seq, had_before, read?, &mut stats);
            queue.send_ready(&out).await?;
        }
        if let Some(reader) = prev.as_mut() {
            while reader.next_entry().await?.is_some() {
                stats.deleted += 1;
            }
        }
        Ok(stats)
    }

    /// Read one object into content-defined chunks; `None` if it vanished before the read.
    async fn ingest(
        &self,
        repo: &Repository,
        meta: &ObjectMeta,
        budget: Arc<Semaphore>,
    ) -> Result<Option<Ingested>> {
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
        let read_error = |e: std::io::Error| {
            Error::new(
                ErrorKind::Unavailable,
                format!("source {}: reading {key}: {e}", self.name),
            )
        };
        let keys = match self.tenant_rule.as_ref().and_then(|r| r.tenant_of(key)) {
            Some(tenant) if repo.tenant_keys_enabled() => repo.tenant_keys(tenant).await?,
            // A file is content: sealed under this process's data key.
            _ => repo.content_keys().await?,
        };
        let reader = content_reader(got).map_err(read_error)?;
        let stored = ingest::store_object(repo, &keys, reader, budget)
            .await
            .map_err(|e| match e {
                IngestError::Read(e) => read_error(e),
                IngestError::Repository(e) => e,
            })?;
        if stored.size != expected {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "source {}: {key} changed while being read ({} bytes read, {expected} expected)",
                    self.name, stored.size
                ),
            )
            .with_hint("run the scan again"));
        }
        Ok(Some(Ingested {
            entry: BlobEntry {
                key: key.to_string(),
                size: stored.size,
                etag: read_meta.e_tag,
                last_modified: read_meta.last_modified,
                content_type,
                sha256: hex::encode(stored.sha256),
                chunks: stored.chunks,
            },
            bytes_uploaded: stored.bytes_uploaded,
            chunks_new: stored.chunks_new,
            chunks_deduplicated: stored.chunks_deduplicated,
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

/// The object's bytes as one blocking reader, for the cutting thread. A local file is read
/// directly (object_store's own stream reads 8 KiB per round trip to a blocking thread, which
/// dominated scan time); a remote store's streaming body is awaited piece by piece.
fn content_reader(got: object_store::GetResult) -> std::io::Result<Box<dyn Read + Send>> {
    match got.payload {
        object_store::GetResultPayload::File(mut file, _) => {
            use std::io::Seek;
            file.seek(std::io::SeekFrom::Start(got.range.start))?;
            Ok(Box::new(file.take(got.range.end - got.range.start)))
        }
        object_store::GetResultPayload::Stream(stream) => {
            Ok(Box::new(ingest::StreamReader::new(stream)))
        }
    }
}

/// Objects read at once by a scan.
const OBJECTS_IN_FLIGHT: usize = 4;

/// Listing entries that may wait behind an object still being read, and entries queued for
/// the listing writer.
const LISTING_QUEUE: usize = 4096;

/// A new or changed object, stored, and what storing it cost.
struct Ingested {
    entry: BlobEntry,
    bytes_uploaded: u64,
    chunks_new: u64,
    chunks_deduplicated: u64,
}

/// One key of the new listing, in key order.
enum Slot {
    Ready(BlobEntry),
    Reading,
    /// Vanished between the listing and the read: absent from this scan.
    Gone,
}

/// The new listing's entries in key order while some are still being read.
#[derive(Default)]
struct InOrder {
    slots: VecDeque<Slot>,
    /// Sequence number of `slots[0]`.
    first: usize,
}

impl InOrder {
    fn len(&self) -> usize {
        self.slots.len()
    }

    /// Append a slot; its sequence number.
    fn push(&mut self, slot: Slot) -> usize {
        self.slots.push_back(slot);
        self.first + self.slots.len() - 1
    }

    /// Record the outcome of reading the object in slot `seq`.
    fn complete(
        &mut self,
        seq: usize,
        had_before: bool,
        read: Option<Ingested>,
        stats: &mut ScanStats,
    ) {
        let slot = &mut self.slots[seq - self.first];
        match read {
            Some(ingested) => {
                if had_before {
                    stats.changed += 1;
                } else {
                    stats.new += 1;
                }
                stats.bytes_read += ingested.entry.size;
                stats.bytes_uploaded += ingested.bytes_uploaded;
                stats.chunks_new += ingested.chunks_new;
                stats.chunks_deduplicated += ingested.chunks_deduplicated;
                *slot = Slot::Ready(ingested.entry);
            }
            None => {
                stats.deleted += u64::from(had_before);
                *slot = Slot::Gone;
            }
        }
    }

    /// Send the finished entries at the front, in order.
    async fn send_ready(&mut self, out: &mpsc::Sender<BlobEntry>) -> Result<()> {
        while matches!(self.slots.front(), Some(Slot::Ready(_) | Slot::Gone)) {
            let slot = self.slots.pop_front().expect("checked");
            self.first += 1;
            if let Slot::Ready(entry) = slot {
                out.send(entry)
                    .await
                    .map_err(|_| Error::other("the listing writer stopped"))?;
            }
        }
        Ok(())
    }
}

/// Write the entries `merge` sends, in the order sent, as the scan's listing.
async fn write_listing(
    repo: &Repository,
    mut entries: mpsc::Receiver<BlobEntry>,
) -> Result<ListingWrite> {
    let mut writer = EntryWriter::new(repo);
    while let Some(entry) = entries.recv().await {
        writer.push(&entry).await?;
    }
    writer.finish().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cutter finds exactly the cut points FastCDC finds over the whole object in memory,
    /// whatever sizes the reader returns.
    #[test]
    fn cutter_cuts_like_fastcdc_in_memory() {
        use fastcdc::v2020::FastCDC;
        let mut state = 7u64;
        let data: Vec<u8> = (0..(11 << 20) + 12_345)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        // A reader that returns at most 100,000 bytes per call.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let n = out.len().min(self.0.len()).min(100_000);
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        for len in [0, 1, 300_000, data.len()] {
            let expected: Vec<&[u8]> = FastCDC::new(&data[..len], CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
                .map(|c| &data[c.offset..c.offset + c.length])
                .collect();
            let got: Vec<Vec<u8>> = Cutter::new(Trickle(&data[..len]))
                .collect::<std::io::Result<_>>()
                .unwrap();
            assert_eq!(got.len(), expected.len(), "{len} bytes");
            assert!(
                got.iter().zip(&expected).all(|(g, e)| g == e),
                "{len} bytes"
            );
        }
    }

    fn entry(key: &str, size: u64) -> BlobEntry {
        BlobEntry {
            key: key.into(),
            size,
            etag: None,
            last_modified: DateTime::UNIX_EPOCH,
            content_type: None,
            sha256: String::new(),
            chunks: Vec::new(),
        }
    }

    fn read(key: &str, size: u64) -> Option<Ingested> {
        Some(Ingested {
            entry: entry(key, size),
            bytes_uploaded: size / 2,
            chunks_new: 1,
            chunks_deduplicated: 0,
        })
    }

    /// Reads that finish out of order still reach the listing in key order, and a read whose
    /// object vanished leaves no entry (but counts as a deletion if a previous scan had it).
    #[tokio::test]
    async fn entries_leave_in_key_order_whatever_order_reads_finish() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut queue = InOrder::default();
        let mut stats = ScanStats::default();
        let a = queue.push(Slot::Reading);
        queue.push(Slot::Ready(entry("b", 1)));
        let c = queue.push(Slot::Reading);
        let d = queue.push(Slot::Reading);
        queue.send_ready(&tx).await.unwrap();
        assert!(
            rx.try_recv().is_err(),
            "nothing passes the unfinished first read"
        );
        queue.complete(d, false, read("d", 4), &mut stats);
        queue.complete(c, true, None, &mut stats);
        queue.send_ready(&tx).await.unwrap();
        assert!(rx.try_recv().is_err());
        queue.complete(a, true, read("a", 10), &mut stats);
        queue.send_ready(&tx).await.unwrap();
        queue.push(Slot::Ready(entry("e", 1)));
        queue.send_ready(&tx).await.unwrap();
        drop(tx);
        let mut keys = Vec::new();
        while let Some(e) = rx.recv().await {
            keys.push(e.key);
        }
        assert_eq!(keys, ["a", "b", "d", "e"]);
        assert_eq!(queue.len(), 0);
        assert_eq!((stats.new, stats.changed, stats.deleted), (1, 1, 1));
        assert_eq!((stats.bytes_read, stats.bytes_uploaded), (14, 7));
        assert_eq!(stats.chunks_new, 2);
    }
}
