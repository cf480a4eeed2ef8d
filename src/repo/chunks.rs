//! Content-addressed chunks with deduplication.
//!
//! A chunk's id is a keyed BLAKE3 hash of its plaintext (docs/FORMAT.md §4), so identical
//! content is stored once across snapshots, sources and tenants. Which replicas already hold
//! which chunk is learned by listing `chunks/` once per replica per process; writing a chunk
//! that every replica has uploads nothing and costs no request. The index is reloaded when it is
//! older than half the chunk grace period or a prune invalidated it, and it knows which chunks a
//! prune marked for deletion: those are claimed before use (see `gc`).
//!
//! A chunk deduplicated against the index (a copy this put did not create) may be marked by a
//! prune after the index was loaded, without the writer knowing. So the index remembers those
//! ids, and its next reload re-checks them against the new listing and marks: still present
//! (else they are *lost*: every manifest write fails until they are stored again, or for half
//! the grace period), and claimed when marked meanwhile. A manifest (snapshot, segment, scan
//! root) is written only after that re-check when the index is older than half the grace
//! period (`Repository::write_object` calls [`Repository::confirm_deduplicated`]): the check
//! sits in this layer because writers build manifests from chunk lists in many places, and
//! every one of them writes through `write_object`. The ids are per handle, not per job: the
//! re-check may claim chunks another job on the same handle relied on (harmless), and a lost
//! chunk fails whichever manifest comes next.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::{layout, Repository};
use crate::archive::{self, KeySet, Kind, SealOptions};
use crate::error::{Error, ErrorKind, Result};

/// Largest chunk plaintext accepted.
pub const MAX_CHUNK: usize = 16 << 20;

/// Per replica, the chunk ids known to be stored there (`None` until listed).
pub(super) struct ChunkIndex {
    present: Mutex<Vec<Option<HashSet<String>>>>,
    meta: Mutex<IndexMeta>,
    /// Reload the index when it is this old.
    max_age: chrono::Duration,
    /// Per replica, when a failed listing may be tried again: a replica in an outage is not
    /// listed again on every chunk write (that would hold up every capture).
    retry_at: Mutex<Vec<Option<tokio::time::Instant>>>,
    /// One gate per chunk id being stored: concurrent puts of the same content (identical
    /// files scanned at once) wait for the first instead of uploading it again.
    inflight: std::sync::Mutex<std::collections::HashMap<String, Arc<Mutex<()>>>>,
}

/// How long after a failed chunk listing the replica is listed again.
const LIST_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// When the index was loaded, and the chunks marked for deletion then.
#[derive(Default)]
struct IndexMeta {
    loaded_at: Option<DateTime<Utc>>,
    marked: HashSet<String>,
    /// Chunks deduplicated against this index (not claimed): re-checked at the next reload.
    deduplicated: HashSet<String>,
    /// Chunks deduplicated against an earlier index and found deleted at a reload, with when:
    /// a manifest may be naming them, so manifests fail until they are stored again.
    lost: HashMap<String, DateTime<Utc>>,
}

impl ChunkIndex {
    pub(super) fn new(replicas: usize, max_age: std::time::Duration) -> Self {
        ChunkIndex {
            present: Mutex::new(vec![None; replicas]),
            meta: Mutex::new(IndexMeta::default()),
            max_age: chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::hours(12)),
            retry_at: Mutex::new(vec![None; replicas]),
            inflight: Default::default(),
        }
    }

    fn gate(&self, id: &str) -> Arc<Mutex<()>> {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        inflight.entry(id.to_string()).or_default().clone()
    }

    /// Forget the gate once no other put holds or awaits it.
    fn release(&self, id: &str, gate: Arc<Mutex<()>>) {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        // The map's copy and ours: nobody else is waiting.
        if Arc::strong_count(&gate) == 2 {
            inflight.remove(id);
        }
    }

    pub(super) async fn invalidate(&self) {
        self.meta.lock().await.loaded_at = None;
    }

    /// Remember that `id` was deduplicated against the current index.
    async fn note_deduplicated(&self, id: &str) {
        self.meta.lock().await.deduplicated.insert(id.to_string());
    }

    /// `id` was stored again: it is no longer lost.
    async fn note_stored(&self, id: &str) {
        self.meta.lock().await.lost.remove(id);
    }
}

/// Whether objects of `kind` name chunks (a manifest): written only after
/// [`Repository::confirm_deduplicated`].
pub(super) fn names_chunks(kind: Kind) -> bool {
    matches!(kind, Kind::Snapshot | Kind::Segment | Kind::Manifest)
}

fn lost_error(lost: &[&String]) -> Error {
    let shown: Vec<&str> = lost.iter().take(5).map(|id| id.as_str()).collect();
    Error::new(
        ErrorKind::NotFound,
        format!(
            "{} chunk(s) this writer deduplicated against were deleted by a chunk sweep before a manifest named them: {}{}",
            lost.len(),
            shown.join(", "),
            if lost.len() > shown.len() { ", ..." } else { "" }
        ),
    )
    .with_hint("the job is retried and stores them again; a backup job must finish within retention.chunk_grace")
}

fn check_chunk_len(len: usize) -> Result<()> {
    if len > MAX_CHUNK {
        return Err(Error::other(format!(
            "chunk of {len} bytes exceeds the {MAX_CHUNK}-byte limit"
        )));
    }
    Ok(())
}

impl Repository {
    /// Load the per-replica chunk listing on first use (and when stale or invalidated); a
    /// replica that cannot be listed stays unknown and is simply written to. A reload re-checks
    /// the chunks deduplicated against the previous index.
    async fn ensure_index(&self) -> Result<()> {
        let mut meta = self.chunk_index.meta.lock().await;
        let now = crate::clock::now();
        let relied = if meta
            .loaded_at
            .is_none_or(|t| now - t >= self.chunk_index.max_age)
        {
            meta.marked = self.marked_chunk_ids().await?;
            meta.loaded_at = Some(now);
            self.chunk_index.present.lock().await.fill(None);
            std::mem::take(&mut meta.deduplicated)
        } else {
            HashSet::new()
        };
        drop(meta);
        self.list_missing_replicas().await;
        self.recheck_deduplicated(relied).await
    }

    /// List the replicas whose chunk listing is unknown (unless one failed recently).
    async fn list_missing_replicas(&self) {
        let mut present = self.chunk_index.present.lock().await;
        let mut retry_at = self.chunk_index.retry_at.lock().await;
        let now = tokio::time::Instant::now();
        for (i, replica) in self.replicas.replicas().iter().enumerate() {
            if present[i].is_some() || retry_at[i].is_some_and(|t| now < t) {
                continue;
            }
            match replica.list(layout::CHUNKS).await {
                Ok(metas) => {
                    let ids = metas
                        .iter()
                        .filter_map(|m| {
                            layout::chunk_id_of(m.location.as_ref()).map(str::to_string)
                        })
                        .collect();
                    present[i] = Some(ids);
                }
                Err(e) => {
                    retry_at[i] = Some(now + LIST_RETRY);
                    tracing::warn!(replica = %replica.name(), error = %e, "cannot list chunks")
                }
            }
        }
    }

    /// The chunks deduplicated against the previous index, checked against the new one: a
    /// deleted one is lost (manifests fail until it is stored again), a marked one is claimed.
    /// When no replica could be listed they wait for the next reload.
    async fn recheck_deduplicated(&self, relied: HashSet<String>) -> Result<()> {
        if relied.is_empty() {
            return Ok(());
        }
        let (kept, gone): (Vec<String>, Vec<String>) = {
            let present = self.chunk_index.present.lock().await;
            if present.iter().all(Option::is_none) {
                drop(present);
                let mut meta = self.chunk_index.meta.lock().await;
                meta.deduplicated.extend(relied);
                return Ok(());
            }
            relied
                .into_iter()
                .partition(|id| present.iter().flatten().any(|ids| ids.contains(id)))
        };
        if !gone.is_empty() {
            tracing::warn!(
                chunks = gone.len(),
                "chunks this writer deduplicated against were deleted by a chunk sweep"
            );
            let now = crate::clock::now();
            let mut meta = self.chunk_index.meta.lock().await;
            meta.lost.extend(gone.into_iter().map(|id| (id, now)));
        }
        for (i, id) in kept.iter().enumerate() {
            if let Err(e) = self.claim_if_marked(id).await {
                let mut meta = self.chunk_index.meta.lock().await;
                meta.deduplicated.extend(kept[i..].iter().cloned());
                return Err(e);
            }
        }
        Ok(())
    }

    /// Before a manifest is written: when the index is older than half the grace period,
    /// reload it (re-checking what was deduplicated against it); then fail while a chunk
    /// deduplicated against an earlier index is lost. Costs a lock when nothing is due.
    pub(super) async fn confirm_deduplicated(&self) -> Result<()> {
        let due = {
            let meta = self.chunk_index.meta.lock().await;
            let now = crate::clock::now();
            !meta.deduplicated.is_empty()
                && meta
                    .loaded_at
                    .is_none_or(|t| now - t >= self.chunk_index.max_age)
        };
        if due {
            self.ensure_index().await?;
        }
        let mut meta = self.chunk_index.meta.lock().await;
        let now = crate::clock::now();
        let max_age = self.chunk_index.max_age;
        meta.lost.retain(|_, found| now - *found < max_age);
        if meta.lost.is_empty() {
            return Ok(());
        }
        let mut lost: Vec<&String> = meta.lost.keys().collect();
        lost.sort();
        Err(lost_error(&lost))
    }

    /// A chunk a prune marked for deletion is claimed before this write may rely on it.
    /// True when it was claimed: a sweep may have deleted it after the index was loaded, so
    /// the caller writes it again instead of trusting the index (create-only: a copy that is
    /// still there stays).
    async fn claim_if_marked(&self, id: &str) -> Result<bool> {
        if !self.chunk_index.meta.lock().await.marked.contains(id) {
            return Ok(false);
        }
        self.keep_marked_chunk(id).await?;
        self.chunk_index.meta.lock().await.marked.remove(id);
        Ok(true)
    }

    /// Store `plaintext` under `id` (its chunk id) on every replica that lacks it.
    async fn put_with_id(&self, id: String, plaintext: Bytes) -> Result<ChunkWrite> {
        let keys = self.keys.clone();
        self.put_with_id_as(&keys, id, plaintext, self.level).await
    }

    /// [`Repository::put_with_id`] sealed under `keys` (a tenant's), compressed at `level`.
    async fn put_with_id_as(
        &self,
        keys: &KeySet,
        id: String,
        plaintext: Bytes,
        level: i32,
    ) -> Result<ChunkWrite> {
        let gate = self.chunk_index.gate(&id);
        let held = gate.lock().await;
        let result = self.put_gated(keys, id.clone(), plaintext, level).await;
        drop(held);
        self.chunk_index.release(&id, gate);
        if let Ok(write) = &result {
            CHUNK_BYTES_PUT.fetch_add(write.len, std::sync::atomic::Ordering::Relaxed);
            CHUNK_BYTES_UPLOADED.fetch_add(write.uploaded, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }

    async fn put_gated(
        &self,
        keys: &KeySet,
        id: String,
        plaintext: Bytes,
        level: i32,
    ) -> Result<ChunkWrite> {
        let len = plaintext.len() as u64;
        self.ensure_index().await?;
        let claimed = self.claim_if_marked(&id).await?;
        let (targets, already) = {
            let present = self.chunk_index.present.lock().await;
            let targets: Vec<usize> = present
                .iter()
                .enumerate()
                .filter(|(_, ids)| claimed || !ids.as_ref().is_some_and(|ids| ids.contains(&id)))
                .map(|(i, _)| i)
                .collect();
            let already = present.len() - targets.len();
            (targets, already)
        };
        if already > 0 && !claimed {
            self.chunk_index.note_deduplicated(&id).await;
        }
        if targets.is_empty() {
            return Ok(ChunkWrite {
                id,
                len,
                uploaded: 0,
            });
        }
        let key = layout::chunk(&id);
        let options = SealOptions {
            level,
            ..self.seal_options()
        };
        let (keys, name) = (keys.clone(), key.clone());
        let sealed = tokio::task::spawn_blocking(move || {
            Bytes::from(archive::seal(
                &keys,
                Kind::Chunk,
                &name,
                &plaintext,
                options,
            ))
        })
        .await
        .map_err(|e| Error::other(format!("sealing {key}")).with_source(e))?;
        let size = sealed.len() as u64;
        let receipt = self.replicas.put(&key, sealed, &targets, already).await?;
        if receipt.uploaded {
            self.chunk_index.note_stored(&id).await;
        } else if !claimed {
            self.chunk_index.note_deduplicated(&id).await;
        }
        let mut present = self.chunk_index.present.lock().await;
        for name in &receipt.stored {
            if let Some(i) = self
                .replicas
                .replicas()
                .iter()
                .position(|r| r.name() == name)
            {
                present[i]
                    .get_or_insert_with(HashSet::new)
                    .insert(id.clone());
            }
        }
        let uploaded = if receipt.uploaded { size } else { 0 };
        Ok(ChunkWrite { id, len, uploaded })
    }
}

/// The outcome of storing one chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkWrite {
    pub id: String,
    /// Plaintext length.
    pub len: u64,
    /// Sealed bytes uploaded per replica that lacked the chunk (0 when deduplicated).
    pub uploaded: u64,
}

/// A chunk's plaintext together with its id, computed where the chunk was cut (typically on
/// a blocking thread, while the bytes are still in cache) so that storing it costs no second
/// pass. Built only by [`IdentifiedChunk::new`], so the id always matches the content.
#[derive(Debug, Clone)]
pub struct IdentifiedChunk {
    id: String,
    key_id: [u8; 8],
    data: Bytes,
}

impl IdentifiedChunk {
    /// Hash `data` under the repository's chunk-id key (CPU work: call it off the async threads).
    pub fn new(keys: &KeySet, data: Bytes) -> Self {
        IdentifiedChunk {
            id: keys.chunk_id(&data),
            key_id: keys.key_id(),
            data,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl Repository {
    /// The id `plaintext` would be stored under.
    pub fn chunk_id(&self, plaintext: &[u8]) -> String {
        self.keys.chunk_id(plaintext)
    }

    /// Store a chunk of *metadata* (a blob scan's listing, which the backup role reads back)
    /// under the repository key on every replica that lacks it; acknowledged at the write
    /// quorum. Content goes through [`Repository::spawn_put_chunk`] or
    /// [`Repository::put_identified`], sealed under this process's data key.
    pub async fn put_chunk(&self, plaintext: Bytes) -> Result<ChunkWrite> {
        check_chunk_len(plaintext.len())?;
        let id = self.chunk_id(&plaintext);
        self.put_with_id(id, plaintext).await
    }

    /// Store a chunk of content (a file's) whose id was computed where it was cut, sealed
    /// under this process's data key.
    pub async fn put_identified(&self, chunk: IdentifiedChunk) -> Result<ChunkWrite> {
        check_chunk_len(chunk.data.len())?;
        if chunk.key_id != self.keys.key_id() {
            return Err(Error::other(format!(
                "chunk {} was identified under another repository key",
                chunk.id
            )));
        }
        let keys = self.content_keys().await?;
        self.put_with_id_as(&keys, chunk.id, chunk.data, self.level)
            .await
    }

    /// [`Repository::put_identified`] for a chunk identified under `keys` (a tenant's), sealed
    /// under them.
    pub async fn put_identified_as(
        &self,
        keys: &KeySet,
        chunk: IdentifiedChunk,
    ) -> Result<ChunkWrite> {
        check_chunk_len(chunk.data.len())?;
        if chunk.key_id != keys.key_id() {
            return Err(Error::other(format!(
                "chunk {} was identified under another key",
                chunk.id
            )));
        }
        self.put_with_id_as(keys, chunk.id, chunk.data, self.level)
            .await
    }

    /// Store a chunk of content as a task of its own, sealed under this process's data key and
    /// compressed at `level`: it makes progress while the caller prepares the next chunk, and
    /// the caller awaits the handle when it needs the outcome.
    pub fn spawn_put_chunk(&self, plaintext: Bytes, level: i32) -> JoinHandle<Result<ChunkWrite>> {
        let repo = self.clone();
        tokio::spawn(async move {
            check_chunk_len(plaintext.len())?;
            let id = repo.chunk_id(&plaintext);
            let keys = repo.content_keys().await?;
            repo.put_with_id_as(&keys, id, plaintext, level).await
        })
    }

    /// [`Repository::spawn_put_chunk`] identified and sealed under `keys` (a tenant's): equal
    /// content under two keys gets two ids.
    pub fn spawn_put_chunk_as(
        &self,
        keys: &KeySet,
        plaintext: Bytes,
        level: i32,
    ) -> JoinHandle<Result<ChunkWrite>> {
        let (repo, keys) = (self.clone(), keys.clone());
        tokio::spawn(async move {
            check_chunk_len(plaintext.len())?;
            let id = keys.chunk_id(&plaintext);
            repo.put_with_id_as(&keys, id, plaintext, level).await
        })
    }

    /// Read a chunk and check that its content matches its id.
    pub async fn read_chunk(&self, id: &str) -> Result<Vec<u8>> {
        let key = layout::chunk(id);
        let expected = id.to_string();
        let (plaintext, matches) = self
            .read_object_then(Kind::Chunk, &key, move |keys, plaintext| {
                let matches = keys.chunk_id(&plaintext) == expected;
                (plaintext, matches)
            })
            .await?;
        if !matches {
            return Err(Error::corrupt(format!(
                "chunk {id}: content does not match its id"
            )));
        }
        CHUNK_BYTES_READ.fetch_add(plaintext.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(plaintext)
    }
}

/// Plaintext bytes of chunks read and authenticated by this process (every repository
/// handle): what a progress bar counts against the bytes a plan says it will read.
static CHUNK_BYTES_READ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// See [`CHUNK_BYTES_READ`].
pub fn chunk_bytes_read() -> u64 {
    CHUNK_BYTES_READ.load(std::sync::atomic::Ordering::Relaxed)
}

/// Plaintext bytes of chunks this process stored, deduplicated ones included: what a backup
/// has read from its source so far (a snapshot's image, a blob's content, COPY rows).
static CHUNK_BYTES_PUT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// See [`CHUNK_BYTES_PUT`].
pub fn chunk_bytes_put() -> u64 {
    CHUNK_BYTES_PUT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sealed bytes of the chunks this process uploaded because some replica lacked them, once per
/// chunk (as [`ChunkWrite::uploaded`]): what a backup has added to the repository so far.
static CHUNK_BYTES_UPLOADED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// See [`CHUNK_BYTES_UPLOADED`].
pub fn chunk_bytes_uploaded() -> u64 {
    CHUNK_BYTES_UPLOADED.load(std::sync::atomic::Ordering::Relaxed)
}
