//! Large streams (database images, change-log payloads) stored as a list of chunks.
//!
//! Nothing large is ever one object: a stream is cut into content-addressed chunks of about
//! `target` bytes, so memory stays bounded by one chunk, unchanged regions deduplicate across
//! snapshots, and every object stays small enough to write with a single create-only PUT.
//! Records are never split across chunks, so a reader can decode each chunk on its own.

use std::collections::VecDeque;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{ChunkWrite, Repository};
use crate::archive::KeySet;
use crate::error::Result;

/// Default chunk size for database streams.
pub const DEFAULT_CHUNK: usize = 4 << 20;

/// One chunk of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: String,
    pub len: u64,
}

/// The chunks of a finished stream and what writing them cost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkList {
    pub chunks: Vec<ChunkRef>,
    pub bytes: u64,
    /// Sealed bytes uploaded (0 for a fully deduplicated stream); not serialized in manifests.
    #[serde(skip)]
    pub uploaded: u64,
}

/// Chunks a [`ChunkedWriter`] keeps being stored while the caller fills the next one: sealing
/// (zstd + AES on blocking threads) overlaps the caller's reading and the replicas' write
/// latency. With one in flight, the put pipeline ran at 60% of zstd's speed; with two, at
/// zstd's (docs/BENCHMARKS.md "Write pipeline").
pub const CHUNKS_IN_FLIGHT: usize = 2;

/// Small chunks (a snapshot's tenant-pure chunks of small tenants) are mostly a replica's write
/// latency (a file replica fsyncs each object and its directory), so more of them may be in
/// flight, as long as their bytes stay within [`CHUNKS_IN_FLIGHT`] full chunks.
pub const SMALL_CHUNKS_IN_FLIGHT: usize = 16;

/// Accumulates records and stores a chunk each time `target` bytes are reached (or a caller
/// ends one early), with up to [`CHUNKS_IN_FLIGHT`] full chunks, or up to
/// [`SMALL_CHUNKS_IN_FLIGHT`] small ones of as many bytes, being stored in the background.
pub struct ChunkedWriter<'a> {
    repo: &'a Repository,
    target: usize,
    buf: Vec<u8>,
    list: ChunkList,
    /// Puts still running, oldest first (their chunks come first in the list), with their
    /// plaintext sizes.
    pending: VecDeque<(usize, JoinHandle<Result<ChunkWrite>>)>,
    /// Plaintext bytes of the puts still running.
    pending_bytes: usize,
    /// The keys the next chunks are identified and sealed under; `None`: the repository's.
    keys: Option<KeySet>,
    /// zstd level of the chunks: the repository's, unless the content says otherwise.
    level: i32,
}

impl<'a> ChunkedWriter<'a> {
    pub fn new(repo: &'a Repository, target: usize) -> Self {
        ChunkedWriter {
            repo,
            target,
            buf: Vec::with_capacity(target),
            list: ChunkList::default(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            keys: None,
            level: repo.compression_level(),
        }
    }

    /// Compress the chunks at zstd level 1: for a stream whose bulk is compressed already (a
    /// capture batch's sealed runs: base64 of ciphertext, in which a higher level finds no
    /// more to remove and only spends time looking).
    pub fn compressed_content(mut self) -> Self {
        self.level = 1;
        self
    }

    /// Seal the chunks from the next one on under `keys` (a tenant's), or the repository's.
    /// Ends the current chunk first, so no chunk mixes keys.
    pub async fn set_keys(&mut self, keys: Option<KeySet>) -> Result<()> {
        self.flush().await?;
        self.keys = keys;
        Ok(())
    }

    /// Append one record; it is never split across chunks.
    pub async fn write_record(&mut self, record: &[u8]) -> Result<()> {
        if !self.buf.is_empty() && self.buf.len() + record.len() > self.target {
            self.flush().await?;
        }
        self.buf.extend_from_slice(record);
        if self.buf.len() >= self.target {
            self.flush().await?;
        }
        Ok(())
    }

    /// End the current chunk here, however small: the next record starts a new one (a
    /// snapshot keeps each tenant's rows in chunks of their own).
    pub async fn end_chunk(&mut self) -> Result<()> {
        self.flush().await
    }

    /// How many chunks have been started so far: the index the next chunk will have.
    pub fn chunks_started(&self) -> usize {
        self.list.chunks.len() + self.pending.len() + usize::from(!self.buf.is_empty())
    }

    /// Start storing the buffered chunk; wait for the oldest put while too many are running.
    async fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(self.target),
        ));
        self.pending_bytes += data.len();
        self.pending.push_back((
            data.len(),
            match &self.keys {
                Some(keys) => self.repo.spawn_put_chunk_as(keys, data, self.level),
                None => self.repo.spawn_put_chunk(data, self.level),
            },
        ));
        while self.pending.len() > SMALL_CHUNKS_IN_FLIGHT
            || (self.pending.len() > CHUNKS_IN_FLIGHT
                && self.pending_bytes > CHUNKS_IN_FLIGHT * self.target)
        {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    async fn settle_oldest(&mut self) -> Result<()> {
        let Some((len, put)) = self.pending.pop_front() else {
            return Ok(());
        };
        self.pending_bytes -= len;
        let written = put
            .await
            .map_err(|e| crate::Error::other(format!("storing a chunk: {e}")))??;
        self.list.bytes += written.len;
        self.list.uploaded += written.uploaded;
        self.list.chunks.push(ChunkRef {
            id: written.id,
            len: written.len,
        });
        Ok(())
    }

    /// Store the last partial chunk and return the list. Every chunk is durable at the write
    /// quorum when this returns, so a manifest naming them may be written next.
    pub async fn finish(mut self) -> Result<ChunkList> {
        self.flush().await?;
        while !self.pending.is_empty() {
            self.settle_oldest().await?;
        }
        Ok(self.list)
    }
}

impl Repository {
    /// Read the chunks of a stream in order, handing each to `each` (one chunk in memory).
    pub async fn read_chunks<F>(&self, chunks: &[ChunkRef], mut each: F) -> Result<()>
    where
        F: FnMut(&[u8]) -> Result<()>,
    {
        for chunk in chunks {
            each(&self.read_listed_chunk(chunk).await?)?;
        }
        Ok(())
    }

    /// Read a chunk a manifest lists: the read authenticates it against its id, and its length
    /// must be the one the manifest gives.
    pub async fn read_listed_chunk(&self, chunk: &ChunkRef) -> Result<Vec<u8>> {
        let data = self.read_chunk(&chunk.id).await?;
        if data.len() as u64 != chunk.len {
            return Err(crate::Error::corrupt(format!(
                "chunk {}: {} bytes, the manifest says {}",
                chunk.id,
                data.len(),
                chunk.len
            )));
        }
        Ok(data)
    }
}
