//! Content-addressed chunks with deduplication.
//!
//! A chunk's id is a keyed BLAKE3 hash of its plaintext (docs/FORMAT.md §4), so identical
//! content is stored once across snapshots, sources and tenants. Which replicas already hold
//! which chunk is learned by listing `chunks/` once per replica per process; writing a chunk
//! that every replica has uploads nothing and costs no request.

use std::collections::HashSet;

use bytes::Bytes;
use tokio::sync::Mutex;

use super::{layout, Repository};
use crate::archive::Kind;
use crate::error::{Error, Result};

/// Largest chunk plaintext accepted.
pub const MAX_CHUNK: usize = 16 << 20;

/// Per replica, the chunk ids known to be stored there (`None` until listed).
pub(super) struct ChunkIndex {
    present: Mutex<Vec<Option<HashSet<String>>>>,
    /// Per replica, when a failed listing may be tried again: a replica in an outage is not
    /// listed again on every chunk write (that would hold up every capture).
    retry_at: Mutex<Vec<Option<tokio::time::Instant>>>,
}

/// How long after a failed chunk listing the replica is listed again.
const LIST_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

impl ChunkIndex {
    pub(super) fn new(replicas: usize) -> Self {
        ChunkIndex {
            present: Mutex::new(vec![None; replicas]),
            retry_at: Mutex::new(vec![None; replicas]),
        }
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

impl Repository {
    /// The id `plaintext` would be stored under.
    pub fn chunk_id(&self, plaintext: &[u8]) -> String {
        self.keys.chunk_id(plaintext)
    }

    /// Load the per-replica chunk listing on first use; a replica that cannot be listed stays
    /// unknown and is simply written to.
    async fn ensure_index(&self) {
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

    /// Store a chunk on every replica that lacks it; acknowledged at the write quorum.
    pub async fn put_chunk(&self, plaintext: Bytes) -> Result<ChunkWrite> {
        if plaintext.len() > MAX_CHUNK {
            return Err(Error::other(format!(
                "chunk of {} bytes exceeds the {MAX_CHUNK}-byte limit",
                plaintext.len()
            )));
        }
        let id = self.chunk_id(&plaintext);
        let len = plaintext.len() as u64;
        self.ensure_index().await;
        let (targets, already) = {
            let present = self.chunk_index.present.lock().await;
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
        let sealed = self.seal(Kind::Chunk, &key, plaintext.to_vec()).await?;
        let size = sealed.len() as u64;
        let receipt = self.replicas.put(&key, sealed, &targets, already).await?;
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

    /// Read a chunk and check that its content matches its id.
    pub async fn read_chunk(&self, id: &str) -> Result<Vec<u8>> {
        let key = layout::chunk(id);
        let plaintext = self.read_object(Kind::Chunk, &key).await?;
        if self.chunk_id(&plaintext) != id {
            return Err(Error::corrupt(format!(
                "chunk {id}: content does not match its id"
            )));
        }
        Ok(plaintext)
    }
}
