//! Reading one object for a scan: its bytes are cut into content-defined chunks, hashed
//! (SHA-256 of the object, keyed BLAKE3 id of each chunk) on a blocking thread, and stored
//! with a few chunks in flight.
//!
//! Cutting and hashing are CPU work that would otherwise run on the async threads, one object
//! at a time; on a blocking thread per object they overlap with sealing (also on blocking
//! threads) and with the store's latency, so a scan keeps every core busy. Memory stays
//! bounded whatever the object sizes: every chunk holds a share of one scan-wide byte budget
//! (a semaphore) from the moment it is cut until the repository acknowledged it.
//!
//! The cut points come from FastCDC with a gear table derived from the repository's key
//! ([`Gear::keyed`]), as restic (a secret polynomial) and Borg (a seeded table) do: with the
//! public table, anyone who sees the sizes of the stored chunks could check whether a bucket
//! holds a file they know. Chunk ids are keyed hashes of content, so chunks cut either way
//! read back the same; a scan only ever cuts with the keyed table.

use std::io::Read;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use fastcdc::v2020::{cut_gear, get_gear_with_seed, logarithm2, Normalization, MASKS};
use futures::stream::BoxStream;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::{CHUNK_AVG, CHUNK_MAX, CHUNK_MIN};
use crate::archive::KeySet;
use crate::repo::{ChunkRef, IdentifiedChunk, Repository};

/// Chunks of one object stored at once: sealing one overlaps writing the one before.
pub(super) const CHUNKS_IN_FLIGHT: usize = 2;

/// Bytes of cut chunks a whole scan may hold at once (each chunk is at most `CHUNK_MAX`).
pub(super) const SCAN_MEMORY: usize = 64 << 20;

/// What the cutting thread hands over, in object order.
enum Piece {
    Chunk(IdentifiedChunk, OwnedSemaphorePermit),
    /// The whole object was read: its length and SHA-256.
    End(u64, [u8; 32]),
}

/// An object as it was stored: its chunks, length and SHA-256, and what storing cost.
#[derive(Debug, Default)]
pub(super) struct Stored {
    pub chunks: Vec<ChunkRef>,
    pub size: u64,
    pub sha256: [u8; 32],
    pub bytes_uploaded: u64,
    pub chunks_new: u64,
    pub chunks_deduplicated: u64,
}

/// Why reading an object failed; the caller names the source and key.
#[derive(Debug)]
pub(super) enum IngestError {
    Read(std::io::Error),
    Repository(crate::Error),
}

/// Cut `reader` into chunks on a blocking thread and store them, [`CHUNKS_IN_FLIGHT`] at once,
/// each holding its length of `budget` until stored. Chunks are identified and sealed under
/// `keys` (the repository's, or the tenant's whose prefix holds the object); the cut points
/// always come from the repository's key.
pub(super) async fn store_object(
    repo: &Repository,
    keys: &KeySet,
    reader: Box<dyn Read + Send>,
    budget: Arc<Semaphore>,
) -> std::result::Result<Stored, IngestError> {
    let (tx, mut rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let gear = Gear::keyed(repo.keys());
    let identify = keys.clone();
    // Detached: it stops by itself once it sent the end, or as soon as `rx` is gone.
    tokio::task::spawn_blocking(move || cut(reader, gear, &identify, &budget, &tx));
    let pieces = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut puts = pieces
        .map(|piece| async move {
            match piece.map_err(IngestError::Read)? {
                Piece::Chunk(chunk, permit) => {
                    let written = repo
                        .put_identified_as(keys, chunk)
                        .await
                        .map_err(IngestError::Repository)?;
                    drop(permit);
                    Ok(Ok(written))
                }
                Piece::End(size, sha256) => Ok(Err((size, sha256))),
            }
        })
        .buffered(CHUNKS_IN_FLIGHT);
    let mut stored = Stored::default();
    while let Some(done) = puts.next().await {
        match done? {
            Ok(written) => {
                if written.uploaded > 0 {
                    stored.chunks_new += 1;
                    stored.bytes_uploaded += written.uploaded;
                } else {
                    stored.chunks_deduplicated += 1;
                }
                stored.chunks.push(ChunkRef {
                    id: written.id,
                    len: written.len,
                });
            }
            Err((size, sha256)) => {
                stored.size = size;
                stored.sha256 = sha256;
                return Ok(stored);
            }
        }
    }
    Err(IngestError::Read(std::io::Error::other(
        "the reading thread stopped before the end of the object",
    )))
}

/// The blocking side: read, cut, hash, identify; send each chunk, then the end (or the error).
fn cut(
    reader: Box<dyn Read + Send>,
    gear: Gear,
    keys: &KeySet,
    budget: &Arc<Semaphore>,
    tx: &mpsc::Sender<std::io::Result<Piece>>,
) {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    // The cutting buffer is kept per blocking thread: a fresh 8 MiB per object is faulted in
    // page by page again (the allocator hands large blocks back to the kernel).
    let buf = CUT_BUFFER.with(|b| std::mem::take(&mut *b.borrow_mut()));
    let mut cutter = Cutter::with_buffer(reader, buf, gear);
    loop {
        let data = match cutter.next_chunk() {
            Ok(Some(data)) => data,
            Ok(None) => break,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        hasher.update(&data);
        size += data.len() as u64;
        let len = u32::try_from(data.len()).expect("chunks are at most CHUNK_MAX");
        let Ok(permit) = futures::executor::block_on(budget.clone().acquire_many_owned(len)) else {
            return; // the semaphore is never closed; nothing to report to
        };
        let chunk = IdentifiedChunk::new(keys, Bytes::from(data));
        if tx.blocking_send(Ok(Piece::Chunk(chunk, permit))).is_err() {
            return; // the scan stopped
        }
    }
    CUT_BUFFER.with(|b| *b.borrow_mut() = cutter.into_buffer());
    let _ = tx.blocking_send(Ok(Piece::End(size, hasher.finalize().into())));
}

thread_local! {
    static CUT_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// FastCDC's gear table and its left-shifted twin (v2020), with the normalisation masks of
/// the blob source's bounds (level 1, as `FastCDC::new`).
pub struct Gear {
    table: Box<[u64; 256]>,
    shifted: Box<[u64; 256]>,
    mask_s: u64,
    mask_l: u64,
}

impl Gear {
    /// The table every scan cuts with: secret, derived from the repository's key
    /// ([`KeySet::cdc_gear`]; docs/FORMAT.md §7.1).
    pub fn keyed(keys: &KeySet) -> Gear {
        let table = Box::new(keys.cdc_gear());
        let shifted = Box::new(table.map(|g| g << 1));
        Gear::with_tables(table, shifted)
    }

    /// FastCDC's public table: the cut points of scans before keyed chunking, and what anyone
    /// can compute for a known file. For tests and benchmarks.
    pub fn public() -> Gear {
        let (table, shifted) = get_gear_with_seed(0);
        Gear::with_tables(table, shifted)
    }

    fn with_tables(table: Box<[u64; 256]>, shifted: Box<[u64; 256]>) -> Gear {
        let bits = logarithm2(CHUNK_AVG);
        let level = Normalization::Level1.bits();
        Gear {
            table,
            shifted,
            mask_s: MASKS[(bits + level) as usize],
            mask_l: MASKS[(bits - level) as usize],
        }
    }

    /// The length of the first chunk of `window` (all of it when it is short; 0 if empty).
    fn cut(&self, window: &[u8]) -> usize {
        let (_, length) = cut_gear(
            window,
            CHUNK_MIN as usize,
            CHUNK_AVG as usize,
            CHUNK_MAX as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
            &self.table,
            &self.shifted,
        );
        length
    }
}

/// Content-defined chunks of a blocking reader, with the blob source's FastCDC bounds.
///
/// The same cut points as `fastcdc`'s `StreamCDC` with the same gear table (each cut is
/// searched in a window holding [`CHUNK_MAX`] bytes or the rest of the object), but cheaper:
/// `StreamCDC` moves the rest of its 4 MiB buffer to the front and zero-fills it after every
/// chunk, which cost more than reading the file. Here the window slides through a buffer of
/// twice that size and is moved once per [`CHUNK_MAX`] bytes at most.
pub struct Cutter<R: Read> {
    reader: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    gear: Gear,
}

impl<R: Read> Cutter<R> {
    /// A cutter with FastCDC's public gear table ([`Gear::public`]): tests and benchmarks.
    /// Scans cut with the repository's table ([`Cutter::keyed`]).
    pub fn new(reader: R) -> Self {
        Self::with_buffer(reader, Vec::new(), Gear::public())
    }

    /// A cutter with the repository's secret gear table, as a scan cuts.
    pub fn keyed(reader: R, keys: &KeySet) -> Self {
        Self::with_buffer(reader, Vec::new(), Gear::keyed(keys))
    }

    /// Cut with `gear`, and `buf` as the window's storage (reused from an earlier cutter).
    pub fn with_buffer(reader: R, mut buf: Vec<u8>, gear: Gear) -> Self {
        buf.resize(2 * CHUNK_MAX as usize, 0);
        Cutter {
            reader,
            buf,
            start: 0,
            end: 0,
            eof: false,
            gear,
        }
    }

    /// The window's storage, for the next cutter.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// The next chunk, `None` at the end of the reader.
    pub fn next_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let max = CHUNK_MAX as usize;
        if self.end - self.start < max && !self.eof {
            if self.start + max > self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            while self.end - self.start < max && !self.eof {
                match self.reader.read(&mut self.buf[self.end..]) {
                    Ok(0) => self.eof = true,
                    Ok(n) => self.end += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let window = &self.buf[self.start..self.end];
        let length = self.gear.cut(window);
        if length == 0 {
            return Ok(None);
        }
        let data = window[..length].to_vec();
        self.start += length;
        Ok(Some(data))
    }
}

impl<R: Read> Iterator for Cutter<R> {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_chunk().transpose()
    }
}

/// A store's streaming body as a blocking reader, for use on a blocking thread: each next
/// piece of the body is awaited on the runtime that `handle` names.
pub(super) struct StreamReader {
    handle: tokio::runtime::Handle,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    current: Bytes,
}

impl StreamReader {
    /// Must be called on the runtime (it captures the current handle).
    pub(super) fn new(stream: BoxStream<'static, object_store::Result<Bytes>>) -> Self {
        StreamReader {
            handle: tokio::runtime::Handle::current(),
            stream,
            current: Bytes::new(),
        }
    }
}

impl Read for StreamReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.handle.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(bytes)) => self.current = bytes,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::MasterKey;
    use rand::{RngCore, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut data = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
        data
    }

    fn lengths(cutter: impl Iterator<Item = std::io::Result<Vec<u8>>>) -> Vec<usize> {
        cutter.map(|c| c.unwrap().len()).collect()
    }

    /// The keyed cutter, streaming, finds the cut points of FastCDC over the whole object in
    /// memory with the same table (as `cutter_cuts_like_fastcdc_in_memory` shows for the
    /// public table).
    #[test]
    fn keyed_cuts_are_fastcdc_cuts_with_the_keyed_table() {
        let keys = MasterKey::from_bytes([9; 32]).derive();
        let data = random(13 << 20, 1);
        let gear = Gear::keyed(&keys);
        let mut expected = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let (_, end) = cut_gear(
                &data[at..],
                CHUNK_MIN as usize,
                CHUNK_AVG as usize,
                CHUNK_MAX as usize,
                gear.mask_s,
                gear.mask_l,
                gear.mask_s << 1,
                gear.mask_l << 1,
                &gear.table,
                &gear.shifted,
            );
            expected.push(end);
            at += end;
        }
        assert_eq!(lengths(Cutter::keyed(&data[..], &keys)), expected);
        // The public table through the same code cuts like FastCDC::new.
        let public: Vec<usize> =
            fastcdc::v2020::FastCDC::new(&data, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
                .map(|c| c.length)
                .collect();
        assert_eq!(lengths(Cutter::new(&data[..])), public);
        assert_ne!(expected, public, "the key moves the cut points");
    }

    #[test]
    fn cut_points_depend_on_the_key_and_only_on_it() {
        let data = random(16 << 20, 2);
        let a = MasterKey::from_bytes([1; 32]).derive();
        let b = MasterKey::from_bytes([2; 32]).derive();
        let cut_a = lengths(Cutter::keyed(&data[..], &a));
        assert_eq!(cut_a, lengths(Cutter::keyed(&data[..], &a)));
        assert_ne!(cut_a, lengths(Cutter::keyed(&data[..], &b)));
        assert_eq!(cut_a.iter().sum::<usize>(), data.len());
        let inner = &cut_a[..cut_a.len() - 1];
        assert!(inner
            .iter()
            .all(|&l| (CHUNK_MIN as usize..=CHUNK_MAX as usize).contains(&l)));
        // Normalised chunking keeps its average with a keyed table.
        let mean = data.len() / cut_a.len();
        assert!(
            (CHUNK_AVG as usize / 2..=CHUNK_AVG as usize * 2).contains(&mean),
            "{mean}"
        );
    }

    #[test]
    fn an_empty_object_has_no_chunks() {
        let keys = MasterKey::from_bytes([1; 32]).derive();
        assert!(Cutter::keyed(&b""[..], &keys).next().is_none());
        assert_eq!(lengths(Cutter::keyed(&b"tiny"[..], &keys)), vec![4]);
    }
}
