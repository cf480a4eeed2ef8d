//! Content-addressed chunks with deduplication.
//!
//! A chunk's id is a keyed BLAKE3 hash of its plaintext (docs/FORMAT.md §4), so identical
//! content is stored once across snapshots, sources and tenants. Which replicas already hold
//! which chunk is learned by listing `chunks/` once per replica per process; writing a chunk
//! that every replica has uploads nothing and costs no request.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::{layout, ReplicaSet, Repository};
use crate::archive::{self, KeySet, Kind, SealOptions};
use crate::error::{Error, Result};

/// Largest chunk plaintext accepted.
pub const MAX_CHUNK: usize = 16 << 20;

/// Per replica, the chunk ids known to be stored there (`None` until listed).
pub(super) struct ChunkIndex {
    present: Mutex<Vec<Option<HashSet<String>>>>,
}

impl ChunkIndex {
    pub(super) fn new(replicas: usize) -> Self {
        ChunkIndex {
            present: Mutex::new(vec![None; replicas]),
        }
    }
}

fn check_chunk_len(len: usize) -> Result<()> {
    if len > MAX_CHUNK {
        return Err(Error::other(format!(
            "chunk of {len} bytes exceeds the {MAX_CHUNK}-byte limit"
        )));
    }
    Ok(())
}

/// Everything a chunk write needs (cheap clones of the repository's parts).
struct ChunkSink {
    keys: KeySet,
    replicas: ReplicaSet,
    index: Arc<ChunkIndex>,
    options: SealOptions,
}

impl ChunkSink {
    /// Load the per-replica chunk listing on first use; a replica that cannot be listed stays
    /// unknown and is simply written to.
    async fn ensure_index(&self) {
        let mut present = self.index.present.lock().await;
        for (i, replica) in self.replicas.replicas().iter().enumerate() {
            if present[i].is_some() {
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
                    tracing::warn!(replica = %replica.name(), error = %e, "cannot list chunks")
                }
            }
        }
    }

    /// Store `plaintext` under `id` (its chunk id) on every replica that lacks it.
    async fn put(self, id: String, plaintext: Bytes) -> Result<ChunkWrite> {
        let len = plaintext.len() as u64;
        self.ensure_index().await;
        let (targets, already) = {
            let present = self.index.present.lock().await;
            let targets: Vec<usize> = present
                .iter()
                .enumerate()
                .filter(|(_, ids)| !ids.as_ref().is_some_and(|ids| ids.contains(&id)))
                .map(|(i, _)| i)
                .collect();
            let already = present.len() - targets.len();
            (targets, already)
        };
        if targets.is_empty() {
            return Ok(ChunkWrite {
                id,
                len,
                uploaded: 0,
            });
        }
        let key = layout::chunk(&id);
        let (keys, options, name) = (self.keys.clone(), self.options, key.clone());
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
        .map_err(|e| Error::other(format!("sealing {key}: {e}")))?;
        let size = sealed.len() as u64;
        let receipt = self.replicas.put(&key, sealed, &targets, already).await?;
        let mut present = self.index.present.lock().await;
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

    /// Store a chunk on every replica that lacks it; acknowledged at the write quorum.
    pub async fn put_chunk(&self, plaintext: Bytes) -> Result<ChunkWrite> {
        check_chunk_len(plaintext.len())?;
        let id = self.chunk_id(&plaintext);
        self.chunk_sink().put(id, plaintext).await
    }

    /// [`Repository::put_chunk`] for a chunk whose id was computed where it was cut.
    pub async fn put_identified(&self, chunk: IdentifiedChunk) -> Result<ChunkWrite> {
        check_chunk_len(chunk.data.len())?;
        if chunk.key_id != self.keys.key_id() {
            return Err(Error::other(format!(
                "chunk {} was identified under another repository key",
                chunk.id
            )));
        }
        self.chunk_sink().put(chunk.id, chunk.data).await
    }

    /// [`Repository::put_chunk`] as a task of its own: it makes progress while the caller
    /// prepares the next chunk, and the caller awaits the handle when it needs the outcome.
    pub fn spawn_put_chunk(&self, plaintext: Bytes) -> JoinHandle<Result<ChunkWrite>> {
        let sink = self.chunk_sink();
        tokio::spawn(async move {
            check_chunk_len(plaintext.len())?;
            let id = sink.keys.chunk_id(&plaintext);
            sink.put(id, plaintext).await
        })
    }

    /// What storing a chunk needs, owned, so that a put can run as its own task.
    fn chunk_sink(&self) -> ChunkSink {
        ChunkSink {
            keys: self.keys.clone(),
            replicas: self.replicas.clone(),
            index: self.chunk_index.clone(),
            options: self.seal_options(),
        }
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
        Ok(plaintext)
    }
}
