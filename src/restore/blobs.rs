//! Restore a blob source into an empty object_store location, and check that a restored
//! database and blob store agree (the consistency group rule, docs/FORMAT.md §7.4).
//!
//! Every object is rebuilt chunk by chunk and checked against the SHA-256 recorded when it was
//! scanned, before it becomes visible: objects larger than one chunk go up as multipart uploads
//! that are completed only after the hash matches (and aborted otherwise), smaller ones as one
//! put of the verified bytes. Memory stays bounded by a few upload parts whatever the size.
//!
//! Unlike a database file, a target store cannot be built aside and renamed into place: a
//! failed restore leaves the objects it had already written. The error says so; rerun with
//! `force` (which also removes objects the instant did not hold) or into a new location.

use std::collections::{BTreeSet, HashSet};
use std::path::Path as FsPath;
use std::str::FromStr;
use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use object_store::{
    Attribute, Attributes, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload,
    WriteMultipart,
};
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Connection, Row};

use super::{RestoreOptions, RestoreSummary};
use crate::catalog::blobs::{choose_version, BlobCatalog, BlobRestorePoint};
use crate::config::mask_url;
use crate::error::{Error, ErrorKind, Result};
use crate::repo::store::{open_store, Store};
use crate::repo::{ChunkRef, ReadPurpose, Repository};
use crate::source::blobs::CHUNK_MAX;
use crate::stored::blobs::{key_path, BlobEntry, EntryReader, ScanManifest};
use crate::time::At;

/// The query `check_references` runs when none is given.
pub const DEFAULT_REFERENCE_QUERY: &str = "SELECT blob_key FROM attachments";

/// Objects restored at once, at most (local targets fsync every object: many small objects
/// in flight keep the disk's queue full).
const RESTORE_CONCURRENCY: usize = 16;
/// Bytes the objects in flight may hold together (see [`object_memory`]).
const RESTORE_MEMORY: u64 = 128 << 20;
/// The most one object's write holds: the part being filled, the parts being uploaded and
/// the chunks read ahead.
const OBJECT_MEMORY: u64 =
    (PART_SIZE * (1 + PARTS_IN_FLIGHT)) as u64 + CHUNKS_AHEAD as u64 * CHUNK_MAX as u64;

/// What restoring `entry` holds in memory at most.
fn object_memory(entry: &BlobEntry) -> u64 {
    entry.size.clamp(1, OBJECT_MEMORY)
}

/// Multipart upload part size.
const PART_SIZE: usize = 8 << 20;
/// Parts in flight per object.
const PARTS_IN_FLIGHT: usize = 2;
/// Chunks of one object read and opened at once.
const CHUNKS_AHEAD: usize = 2;

/// Restore blob source `options.source` as of `options.at` into the object_store location
/// `options.target` (opened with `target_options`).
///
/// In the summary, `chain` is the base scan (its compact time), `segments_applied` the number
/// of later scans consulted, `transactions` the number of objects written, and `restored_to`
/// the last known event the restored state includes (see [`crate::catalog::blobs::BlobPlan`]).
pub async fn restore_blobs(
    repo: &Repository,
    options: &RestoreOptions,
    target_options: &std::collections::BTreeMap<String, String>,
) -> Result<RestoreSummary> {
    repo.reading(
        &[&options.source],
        ReadPurpose::Restore,
        restore_blobs_held(repo, options, target_options),
    )
    .await?
}

/// [`restore_blobs`] under the read claim it takes.
async fn restore_blobs_held(
    repo: &Repository,
    options: &RestoreOptions,
    target_options: &std::collections::BTreeMap<String, String>,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    let shown = mask_url(&options.target);
    // 1. Open the target and list what it holds.
    let target =
        open_store(&options.target, target_options).map_err(|e| e.context("restore target"))?;
    let existing = existing_keys(&target, &shown).await?;
    // 2. Plan: the base scan and the scans after it that can hold versions put by then.
    let catalog = BlobCatalog::load(repo, &options.source).await?;
    let requested = match options.at {
        At::Latest => catalog.newest().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("blob source {} has no scans yet", options.source),
            )
            .with_hint("run a blob scan first")
        })?,
        At::Instant(t) => t,
    };
    let point = catalog.plan(requested)?;
    crate::prune::points::check_blob_instant(repo, &options.source, &point, requested).await?;
    // A target that holds objects is replaced only when forced; the refusal lists what
    // --force would delete.
    if !existing.is_empty() && !options.force {
        return Err(not_empty(repo, &point, requested, existing, &shown).await?);
    }
    let mut leftovers = existing;
    // A forgotten tenant's files are left out: their chunks' keys were destroyed.
    let forgotten = repo.forgotten().await?.chunk_ids();
    let mut left_out = 0u64;
    // 3. Write every object of the instant, verified.
    let mut written = Written {
        objects: 0,
        bytes: 0,
        restored_to: point.base.scanned_at,
    };
    let attributes = supports_attributes(&options.target);
    let outcome = async {
        let mut merge = ListingMerge::open(repo, &point).await?;
        // Many objects at once: decryption runs on blocking threads, and the stores' latency
        // (for local files, the fsync that makes each object durable) overlaps. Memory stays
        // bounded by a byte budget: an object holds at most its size or OBJECT_MEMORY.
        let target_ref = &target;
        let mut inflight = FuturesUnordered::new();
        let mut budget = RESTORE_MEMORY;
        while let Some((entry, from_later)) = merge.next(requested).await? {
            if entry.chunks.iter().any(|c| forgotten.contains(&c.id)) {
                // Not taken: a forced restore removes an old copy from the target too.
                left_out += 1;
                continue;
            }
            take_key(&mut leftovers, &entry.key)?;
            if from_later {
                written.restored_to = written.restored_to.max(entry.last_modified);
            }
            let cost = object_memory(&entry);
            while inflight.len() >= RESTORE_CONCURRENCY || (budget < cost && !inflight.is_empty()) {
                let (size, freed) = inflight.next().await.expect("non-empty")?;
                written.objects += 1;
                written.bytes += size;
                budget += freed;
            }
            budget -= cost;
            inflight.push(async move {
                write_blob(repo, target_ref, &entry, attributes)
                    .await
                    .map(|_| (entry.size, cost))
            });
        }
        while let Some(done) = inflight.next().await {
            let (size, _) = done?;
            written.objects += 1;
            written.bytes += size;
        }
        // 4. Forced: only now that every object is written, remove what the instant did not
        // hold.
        for key in &leftovers {
            target
                .delete(&key_path(key)?)
                .await
                .map_err(|e| target_error(&shown, &format!("delete {key}"), e))?;
        }
        Ok::<_, Error>(())
    }
    .await;
    if left_out > 0 {
        tracing::info!(source = %options.source, files = left_out, "left out the files of forgotten tenants");
    }
    if let Err(e) = outcome {
        return Err(e
            .context(format!(
                "restore of blob source {} to {shown} stopped after writing {} objects ({} bytes), which stay there",
                options.source, written.objects, written.bytes
            ))
            .with_hint(
                "a blob restore cannot be undone atomically: rerun with --force to replace the partial target, or restore into a new location",
            ));
    }
    Ok(RestoreSummary {
        source: options.source.clone(),
        target: shown,
        requested,
        restored_to: written.restored_to,
        chain: crate::time::compact(point.base.scanned_at),
        segments_applied: point.later.len(),
        transactions: written.objects,
        bytes: written.bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

struct Written {
    objects: u64,
    bytes: u64,
    restored_to: DateTime<Utc>,
}

/// Every key the target holds.
async fn existing_keys(target: &Store, shown: &str) -> Result<BTreeSet<String>> {
    target
        .list(None)
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .map_err(|e| target_error(shown, "list", e))
}

/// Remove `key` (as written, or as object_store spells it) from `keys`; whether it was there.
fn take_key(keys: &mut BTreeSet<String>, key: &str) -> Result<bool> {
    Ok(keys.remove(key) | keys.remove(key_path(key)?.as_ref()))
}

/// Keys named in a refusal, at most.
const KEYS_SHOWN: usize = 10;

/// The refusal of a non-empty target: how many objects it holds, which of them a forced
/// restore would delete (the instant did not hold them: count and first keys) and how many it
/// would overwrite. Reads the instant's listings, writes nothing.
async fn not_empty(
    repo: &Repository,
    point: &BlobRestorePoint<'_>,
    at: DateTime<Utc>,
    mut existing: BTreeSet<String>,
    shown: &str,
) -> Result<Error> {
    let held = existing.len();
    let mut overwritten = 0;
    let mut merge = ListingMerge::open(repo, point).await?;
    while let Some((entry, _)) = merge.next(at).await? {
        overwritten += usize::from(take_key(&mut existing, &entry.key)?);
    }
    let mut first: Vec<&str> = existing
        .iter()
        .take(KEYS_SHOWN)
        .map(String::as_str)
        .collect();
    let more = existing.len() - first.len();
    let more = format!("and {more} more");
    if existing.len() > KEYS_SHOWN {
        first.push(&more);
    }
    let deleted = match first.is_empty() {
        true => String::new(),
        false => format!(": {}", first.join(", ")),
    };
    Ok(Error::new(
        ErrorKind::TargetExists,
        format!(
            "restore target {shown} is not empty: it holds {held} objects; --force would delete \
             {} the instant did not hold{deleted}; and overwrite {overwritten}",
            existing.len()
        ),
    )
    .with_hint(
        "choose an empty location, or pass --force to replace its contents (objects are \
         deleted only after every object of the instant is written)",
    ))
}

/// Local files keep no content type; every other store does.
fn supports_attributes(url: &str) -> bool {
    !url.starts_with("file:")
}

fn target_error(shown: &str, what: &str, e: object_store::Error) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("restore target {shown}: {what}: {e}"),
    )
}

/// The base listing and the later ones, merged by key; yields each key's version at the
/// instant and whether it came from a later scan.
struct ListingMerge<'a> {
    base_at: DateTime<Utc>,
    readers: Vec<EntryReader<'a>>,
}

impl<'a> ListingMerge<'a> {
    async fn open(repo: &'a Repository, point: &BlobRestorePoint<'_>) -> Result<Self> {
        let mut readers = Vec::new();
        for scan in std::iter::once(point.base).chain(point.later) {
            readers.push(ScanManifest::read(repo, &scan.key).await?.entries(repo));
        }
        Ok(ListingMerge {
            base_at: point.base.scanned_at,
            readers,
        })
    }

    async fn next(&mut self, at: DateTime<Utc>) -> Result<Option<(BlobEntry, bool)>> {
        loop {
            let mut smallest: Option<String> = None;
            for reader in &mut self.readers {
                if let Some(e) = reader.peek().await? {
                    if smallest.as_ref().is_none_or(|s| e.key < *s) {
                        smallest = Some(e.key.clone());
                    }
                }
            }
            let Some(key) = smallest else {
                return Ok(None);
            };
            let mut base = None;
            let mut later = Vec::new();
            for (i, reader) in self.readers.iter_mut().enumerate() {
                if reader.peek().await?.is_some_and(|e| e.key == key) {
                    let entry = reader.next_entry().await?.expect("peeked");
                    if i == 0 {
                        base = Some(entry);
                    } else {
                        later.push(entry);
                    }
                }
            }
            if let Some(chosen) = choose_version(self.base_at, base.as_ref(), &later, at) {
                let from_later = !base.as_ref().is_some_and(|b| std::ptr::eq(b, chosen));
                return Ok(Some((chosen.clone(), from_later)));
            }
        }
    }
}

/// Rebuild one object in the target, verified against its recorded size and SHA-256 before
/// it becomes visible.
async fn write_blob(
    repo: &Repository,
    target: &Store,
    entry: &BlobEntry,
    with_attributes: bool,
) -> Result<()> {
    let path = key_path(&entry.key)?;
    let mut attributes = Attributes::new();
    if let (true, Some(content_type)) = (with_attributes, &entry.content_type) {
        attributes.insert(Attribute::ContentType, content_type.clone().into());
    }
    let failed = |what: &str, e: object_store::Error| {
        Error::new(
            ErrorKind::Unavailable,
            format!("writing blob {}: {what}: {e}", entry.key),
        )
    };
    if entry.chunks.len() <= 1 {
        let data = match entry.chunks.first() {
            Some(chunk) => read_part(repo, &entry.key, chunk).await?,
            None => Vec::new(),
        };
        verify(entry, Sha256::digest(&data).as_slice(), data.len() as u64)?;
        let options = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        target
            .put_opts(&path, PutPayload::from(data), options)
            .await
            .map_err(|e| failed("put", e))?;
        return Ok(());
    }
    let options = PutMultipartOptions {
        attributes,
        ..PutMultipartOptions::default()
    };
    let upload = target
        .put_multipart_opts(&path, options)
        .await
        .map_err(|e| failed("start multipart upload", e))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let streamed = async {
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        // The next chunks are fetched and opened while this one is hashed and uploaded.
        // Owned captures: a stream of futures borrowing `repo`/`entry` is not provably `Send`
        // for every lifetime, and the drill runs this inside a spawned task.
        let key: std::sync::Arc<str> = entry.key.as_str().into();
        let mut parts = futures::stream::iter(entry.chunks.clone())
            .map(|chunk| {
                let (repo, key) = (repo.clone(), key.clone());
                async move { read_part(&repo, &key, &chunk).await }
            })
            .buffered(CHUNKS_AHEAD);
        while let Some(data) = parts.next().await {
            let data = data?;
            hasher.update(&data);
            size += data.len() as u64;
            writer
                .wait_for_capacity(PARTS_IN_FLIGHT)
                .await
                .map_err(|e| failed("upload part", e))?;
            writer.put(Bytes::from(data));
        }
        verify(entry, hasher.finalize().as_slice(), size)
    }
    .await;
    match streamed {
        Ok(()) => {
            writer
                .finish()
                .await
                .map_err(|e| failed("complete multipart upload", e))?;
            Ok(())
        }
        Err(e) => {
            // Never complete an unverified object.
            let _ = writer.abort().await;
            Err(e)
        }
    }
}

async fn read_part(repo: &Repository, key: &str, chunk: &ChunkRef) -> Result<Vec<u8>> {
    repo.read_listed_chunk(chunk)
        .await
        .map_err(|e| e.context(format!("blob {key}")))
}

fn verify(entry: &BlobEntry, sha256: &[u8], size: u64) -> Result<()> {
    if size != entry.size || hex::encode(sha256) != entry.sha256 {
        return Err(Error::corrupt(format!(
            "blob {}: restored content ({size} bytes) does not match the size ({}) and SHA-256 recorded when it was scanned",
            entry.key, entry.size
        ))
        .with_hint("`timevault verify --read-data` shows the state of every replica"));
    }
    Ok(())
}

/// The keys that `query` (first column; default [`DEFAULT_REFERENCE_QUERY`]) returns from the
/// SQLite database at `sqlite_path` but that the blob store at `target_url` lacks, sorted.
/// Empty after a correct consistency group restore.
pub async fn check_references(
    sqlite_path: &FsPath,
    query: &str,
    target_url: &str,
    options: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<String>> {
    let shown = mask_url(target_url);
    let store = open_store(target_url, options)?;
    let present: HashSet<String> = store
        .list(None)
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .map_err(|e| target_error(&shown, "list", e))?;
    let db_error = |e: sqlx::Error| {
        Error::other(format!(
            "checking references in {}: {e}",
            sqlite_path.display()
        ))
    };
    let connect = SqliteConnectOptions::from_str("sqlite://")
        .map_err(db_error)?
        .filename(sqlite_path)
        .read_only(true)
        .create_if_missing(false);
    let mut conn = SqliteConnection::connect_with(&connect)
        .await
        .map_err(db_error)?;
    let mut missing = BTreeSet::new();
    {
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(query.to_string())).fetch(&mut conn);
        while let Some(row) = rows.try_next().await.map_err(db_error)? {
            let Some(key) = row.try_get::<Option<String>, _>(0).map_err(db_error)? else {
                continue;
            };
            let spelled = object_store::path::Path::from(key.as_str()).to_string();
            if !present.contains(&key) && !present.contains(&spelled) {
                missing.insert(key);
            }
        }
    }
    let _ = conn.close().await;
    Ok(missing.into_iter().collect())
}
