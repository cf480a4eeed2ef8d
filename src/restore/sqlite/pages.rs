//! A SQLite source's database at an instant, read page by page from the repository without
//! rebuilding the file.
//!
//! A full restore writes the whole snapshot image, applies every frame and checks integrity:
//! its cost is the database's size. A tenant export reads a few hundred pages through the
//! tenant indexes, so [`PageImage`] serves exactly those: a page comes from the *overlay* (the
//! newest version of that page among the frames committed in the snapshot's base frames and
//! the segments captured at or before the instant; the same frames, in the same order, that
//! [`super::sqlite`] applies) or else from the snapshot image (the chunk covering its offset,
//! found from the chunk lengths, fetched with the repository's authenticated read and replica
//! failover, kept in a small LRU). The overlay's pages live in a scratch file; memory holds only
//! page → offset. Pages past a shrinking commit read as zeros, as in the rebuilt file.
//!
//! Reads are synchronous (SQLite's VFS calls them on sqlx's worker thread): a chunk is fetched
//! by a task spawned on the runtime while the calling thread waits on a channel, so the
//! runtime's own threads never block. The SQLite side is [`super::vfs`].

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::RestoreSummary;
use super::{image_inputs, ImageInputs};
use crate::catalog::SourceCatalog;
use crate::error::{Error, Result};
use crate::repo::{ChunkRef, Repository};
use crate::stored::sqlite::for_each_frame;
use crate::time::At;

/// Decoded snapshot chunks kept in memory (bytes); at least two chunks are always kept.
const CACHE_BYTES: usize = 16 << 20;

/// Where the bytes of one page come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSource {
    /// A frame's version, at this offset of the scratch file.
    Overlay(u64),
    /// The snapshot image.
    Snapshot,
    /// Past a commit that shrank the database: zeros, as in a rebuilt file.
    Zero,
}

/// The newest committed version of every page the frames touched, over a snapshot image of
/// `snapshot_pages` pages. Feed payloads in order with [`Overlay::apply`]; frames after the
/// last commit frame (an unfinished transaction) never become visible.
pub struct Overlay {
    scratch: File,
    page_size: u32,
    /// Committed pages → scratch offset.
    pages: BTreeMap<u32, u64>,
    /// The transaction being read: its pages become visible at its commit frame.
    pending: BTreeMap<u32, u64>,
    /// Scratch slots no longer referenced, reused before the file grows.
    free: Vec<u64>,
    end: u64,
    /// Pages of the snapshot image still visible (a shrinking commit cuts it).
    snapshot_limit: u32,
    /// Database size in pages after the last commit (`None`: no commit yet).
    size: Option<u32>,
    commits: u64,
}

impl Overlay {
    pub fn new(scratch: File, page_size: u32, snapshot_pages: u32) -> Overlay {
        Overlay {
            scratch,
            page_size,
            pages: BTreeMap::new(),
            pending: BTreeMap::new(),
            free: Vec::new(),
            end: 0,
            snapshot_limit: snapshot_pages,
            size: None,
            commits: 0,
        }
    }

    /// Apply one frame payload (records in log order).
    pub fn apply(&mut self, payload: &[u8]) -> Result<()> {
        for_each_frame(payload, self.page_size, |frame| {
            let slot = self.free.pop().unwrap_or_else(|| {
                self.end += u64::from(self.page_size);
                self.end - u64::from(self.page_size)
            });
            self.scratch
                .write_all_at(frame.page, slot)
                .map_err(|e| Error::other("writing the page overlay").with_source(e))?;
            if let Some(old) = self.pending.insert(frame.page_no, slot) {
                self.free.push(old);
            }
            if frame.commit_size != 0 {
                self.commit(frame.commit_size);
            }
            Ok(())
        })
    }

    /// The pending transaction becomes visible; the database is `size` pages from now on.
    fn commit(&mut self, size: u32) {
        for (page, slot) in std::mem::take(&mut self.pending) {
            if let Some(old) = self.pages.insert(page, slot) {
                self.free.push(old);
            }
        }
        let cut = self.pages.split_off(&(size + 1));
        self.free.extend(cut.into_values());
        self.snapshot_limit = self.snapshot_limit.min(size);
        self.size = Some(size);
        self.commits += 1;
    }

    /// Where page `page_no` (1-based) comes from.
    pub fn source(&self, page_no: u32) -> PageSource {
        match self.pages.get(&page_no) {
            Some(slot) => PageSource::Overlay(*slot),
            None if page_no <= self.snapshot_limit => PageSource::Snapshot,
            None => PageSource::Zero,
        }
    }

    /// Database size in pages after the last commit applied, if any.
    pub fn size(&self) -> Option<u32> {
        self.size
    }

    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Read `buf.len()` bytes of an overlay page's version at `offset` within the scratch file.
    fn read(&self, slot: u64, buf: &mut [u8]) -> Result<()> {
        self.scratch
            .read_exact_at(buf, slot)
            .map_err(|e| Error::other("reading the page overlay").with_source(e))
    }
}

/// The snapshot image as chunks: chunk `i` covers `[starts[i], starts[i] + chunks[i].len)`.
struct Pieces {
    chunks: Vec<ChunkRef>,
    starts: Vec<u64>,
}

impl Pieces {
    fn new(chunks: Vec<ChunkRef>) -> Pieces {
        let mut starts = Vec::with_capacity(chunks.len());
        let mut at = 0;
        for c in &chunks {
            starts.push(at);
            at += c.len;
        }
        Pieces { chunks, starts }
    }

    /// The chunk holding byte `offset` of the image.
    fn find(&self, offset: u64) -> Option<usize> {
        let i = self
            .starts
            .partition_point(|s| *s <= offset)
            .checked_sub(1)?;
        (offset < self.starts[i] + self.chunks[i].len).then_some(i)
    }
}

/// Recently used snapshot chunks, newest last, within [`CACHE_BYTES`].
#[derive(Default)]
struct ChunkCache {
    entries: VecDeque<(usize, Arc<Vec<u8>>)>,
    bytes: usize,
}

impl ChunkCache {
    fn get(&mut self, index: usize) -> Option<Arc<Vec<u8>>> {
        let at = self.entries.iter().position(|(i, _)| *i == index)?;
        let entry = self.entries.remove(at).expect("found above");
        let data = entry.1.clone();
        self.entries.push_back(entry);
        Some(data)
    }

    fn put(&mut self, index: usize, data: Arc<Vec<u8>>) {
        self.bytes += data.len();
        self.entries.push_back((index, data));
        while self.bytes > CACHE_BYTES && self.entries.len() > 2 {
            let (_, old) = self.entries.pop_front().expect("more than two");
            self.bytes -= old.len();
        }
    }
}

/// What a [`PageImage`] fetched from the repository so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageStats {
    /// Snapshot chunks fetched (a chunk read again after leaving the cache counts again).
    pub chunks: u64,
    pub chunk_bytes: u64,
    /// Frame payload bytes read to build the overlay.
    pub frame_bytes: u64,
    /// The database's size at the instant.
    pub database_bytes: u64,
}

/// A SQLite source's database at an instant, read page by page; see the module docs.
pub struct PageImage {
    source: String,
    repo: Repository,
    runtime: tokio::runtime::Handle,
    page_size: u32,
    size: u64,
    pieces: Pieces,
    overlay: Overlay,
    cache: Mutex<ChunkCache>,
    chunks_fetched: AtomicU64,
    chunk_bytes: AtomicU64,
    frame_bytes: u64,
    /// The first read error, kept for the caller: SQLite only sees an I/O error code.
    error: Mutex<Option<Error>>,
}

impl PageImage {
    /// Plan `source` at `at`, and build the overlay of its frames in a scratch file in
    /// `scratch_dir` (removed when the image is dropped). Must run inside a tokio runtime.
    pub async fn open(
        repo: &Repository,
        source: &str,
        at: At,
        scratch_dir: &Path,
    ) -> Result<(PageImage, RestoreSummary)> {
        let started = Instant::now();
        let catalog = SourceCatalog::load_for(repo, source, at).await?;
        let requested = catalog.resolve(at)?;
        let point = catalog.plan(requested)?;
        let inputs = image_inputs(repo, &point.chain.snapshot.key, point.segments).await?;
        let (transactions, bytes) = (inputs.transactions, inputs.bytes);
        let image = Self::build(repo, source, inputs, scratch_dir)
            .await
            .map_err(|e| e.context(format!("reading {source} as of {requested}")))?;
        let summary = RestoreSummary {
            source: source.to_string(),
            target: format!("{source} (read in place)"),
            requested,
            restored_to: point.effective,
            chain: point.chain.id().to_string(),
            segments_applied: point.segments.len(),
            transactions,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok((image, summary))
    }

    async fn build(
        repo: &Repository,
        source: &str,
        inputs: ImageInputs,
        scratch_dir: &Path,
    ) -> Result<PageImage> {
        let page_size = inputs.details.page_size;
        let scratch =
            tempfile::tempfile_in(scratch_dir).map_err(|e| Error::io(scratch_dir.display(), e))?;
        let snapshot_pages = u32::try_from(inputs.snapshot.bytes / u64::from(page_size))
            .map_err(|_| Error::corrupt(format!("snapshot {}: too many pages", source)))?;
        let mut overlay = Overlay::new(scratch, page_size, snapshot_pages);
        let mut frame_bytes = 0;
        for payload in &inputs.frames {
            repo.read_chunks(&payload.chunks, |data| {
                frame_bytes += data.len() as u64;
                overlay.apply(data)
            })
            .await
            .map_err(|e| e.context(format!("frames of {}", payload.object)))?;
        }
        let pages = overlay.size().unwrap_or(snapshot_pages);
        Ok(PageImage {
            source: source.to_string(),
            repo: repo.clone(),
            runtime: tokio::runtime::Handle::current(),
            page_size,
            size: u64::from(pages) * u64::from(page_size),
            pieces: Pieces::new(inputs.snapshot.chunks),
            overlay,
            cache: Mutex::new(ChunkCache::default()),
            chunks_fetched: AtomicU64::new(0),
            chunk_bytes: AtomicU64::new(0),
            frame_bytes,
            error: Mutex::new(None),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The database's size in bytes at the instant.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn stats(&self) -> PageStats {
        PageStats {
            chunks: self.chunks_fetched.load(Ordering::Relaxed),
            chunk_bytes: self.chunk_bytes.load(Ordering::Relaxed),
            frame_bytes: self.frame_bytes,
            database_bytes: self.size,
        }
    }

    /// Fill `buf` with the image's bytes at `offset`; returns how many lay inside the database
    /// (the rest is zero-filled). Blocks: call it from a thread outside the runtime.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let inside = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        let page = u64::from(self.page_size);
        let mut done = 0;
        while done < inside {
            let at = offset + done as u64;
            let page_no = u32::try_from(at / page + 1).expect("size fits u32 pages");
            let within = at % page;
            let n = ((page - within) as usize).min(inside - done);
            let out = &mut buf[done..done + n];
            match self.overlay.source(page_no) {
                PageSource::Overlay(slot) => self.overlay.read(slot + within, out)?,
                PageSource::Snapshot => self.read_snapshot(at, out)?,
                PageSource::Zero => out.fill(0),
            }
            done += n;
        }
        Ok(inside)
    }

    /// [`PageImage::read`], keeping the first error for [`PageImage::take_error`].
    pub fn read_or_record(&self, offset: u64, buf: &mut [u8]) -> Option<usize> {
        match self.read(offset, buf) {
            Ok(n) => Some(n),
            Err(e) => {
                let mut kept = self.error.lock().unwrap_or_else(|p| p.into_inner());
                kept.get_or_insert(e);
                None
            }
        }
    }

    /// The first read error recorded, if any (SQLite reported it only as an I/O error).
    pub fn take_error(&self) -> Option<Error> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Replace an error from the SQLite side by the read error behind it, when there is one.
    pub fn explain(&self, e: Error) -> Error {
        match self.take_error() {
            Some(read) => read.context(format!("reading {} in place", self.source)),
            None => e,
        }
    }

    fn read_snapshot(&self, mut at: u64, mut out: &mut [u8]) -> Result<()> {
        while !out.is_empty() {
            let Some(i) = self.pieces.find(at) else {
                out.fill(0);
                return Ok(());
            };
            let data = self.chunk(i)?;
            let from = (at - self.pieces.starts[i]) as usize;
            let n = out.len().min(data.len() - from);
            out[..n].copy_from_slice(&data[from..from + n]);
            out = &mut out[n..];
            at += n as u64;
        }
        Ok(())
    }

    /// Snapshot chunk `i`, from the cache or the repository.
    fn chunk(&self, i: usize) -> Result<Arc<Vec<u8>>> {
        if let Some(data) = self.lock_cache().get(i) {
            return Ok(data);
        }
        let data = self.fetch(&self.pieces.chunks[i])?;
        self.chunks_fetched.fetch_add(1, Ordering::Relaxed);
        self.chunk_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let data = Arc::new(data);
        self.lock_cache().put(i, data.clone());
        Ok(data)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, ChunkCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read a chunk on the runtime and wait for it here. The caller's thread must be allowed
    /// to block: sqlx's SQLite worker, or a `spawn_blocking` thread, never a runtime worker.
    fn fetch(&self, chunk: &ChunkRef) -> Result<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (repo, chunk) = (self.repo.clone(), chunk.clone());
        self.runtime.spawn(async move {
            let _ = tx.send(repo.read_listed_chunk(&chunk).await);
        });
        rx.recv()
            .map_err(|_| Error::other("the runtime stopped while a chunk was being read"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u32 = 512;

    fn record(page_no: u32, commit_size: u32, fill: u8) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&page_no.to_be_bytes());
        r.extend_from_slice(&commit_size.to_be_bytes());
        r.extend(std::iter::repeat_n(fill, PAGE as usize));
        r
    }

    fn payload(records: &[(u32, u32, u8)]) -> Vec<u8> {
        records
            .iter()
            .flat_map(|(p, c, f)| record(*p, *c, *f))
            .collect()
    }

    fn overlay(snapshot_pages: u32) -> Overlay {
        Overlay::new(tempfile::tempfile().unwrap(), PAGE, snapshot_pages)
    }

    /// The byte every visible overlay page holds (pages are filled with one value).
    fn fill(o: &Overlay, page: u32) -> Option<u8> {
        match o.source(page) {
            PageSource::Overlay(slot) => {
                let mut b = vec![0u8; PAGE as usize];
                o.read(slot, &mut b).unwrap();
                assert!(b.iter().all(|x| *x == b[0]));
                Some(b[0])
            }
            _ => None,
        }
    }

    #[test]
    fn newest_committed_version_wins_across_payloads() {
        let mut o = overlay(10);
        o.apply(&payload(&[(2, 0, 1), (3, 10, 1)])).unwrap();
        o.apply(&payload(&[(2, 0, 2), (2, 10, 3)])).unwrap();
        assert_eq!(fill(&o, 2), Some(3));
        assert_eq!(fill(&o, 3), Some(1));
        assert_eq!(o.source(4), PageSource::Snapshot);
        assert_eq!(o.size(), Some(10));
        assert_eq!(o.commits(), 2);
    }

    #[test]
    fn uncommitted_tail_is_ignored() {
        let mut o = overlay(10);
        o.apply(&payload(&[(2, 10, 1), (2, 0, 9), (5, 0, 9)]))
            .unwrap();
        assert_eq!(fill(&o, 2), Some(1));
        assert_eq!(o.source(5), PageSource::Snapshot);
        assert_eq!(o.size(), Some(10));
        let mut none = overlay(4);
        none.apply(&payload(&[(1, 0, 7)])).unwrap();
        assert_eq!(none.size(), None);
        assert_eq!(none.source(1), PageSource::Snapshot);
    }

    #[test]
    fn a_shrinking_commit_cuts_the_overlay_and_the_snapshot() {
        let mut o = overlay(10);
        o.apply(&payload(&[(8, 0, 1), (9, 10, 1)])).unwrap();
        o.apply(&payload(&[(1, 6, 2)])).unwrap();
        assert_eq!(o.size(), Some(6));
        // Growing again: pages 7..=12 were cut; only the one written again is not zero.
        o.apply(&payload(&[(12, 12, 4)])).unwrap();
        assert_eq!(o.source(6), PageSource::Snapshot);
        for p in 7..=11 {
            assert_eq!(o.source(p), PageSource::Zero, "page {p}");
        }
        assert_eq!(fill(&o, 12), Some(4));
        assert_eq!(fill(&o, 1), Some(2));
    }

    #[test]
    fn scratch_slots_are_reused() {
        let mut o = overlay(10);
        for round in 0..50u8 {
            o.apply(&payload(&[(1, 0, round), (2, 10, round)])).unwrap();
        }
        assert_eq!(fill(&o, 1), Some(49));
        assert!(o.end <= 4 * u64::from(PAGE), "scratch grew to {}", o.end);
    }

    #[test]
    fn pieces_find_the_chunk_of_an_offset() {
        let refs = |lens: &[u64]| {
            lens.iter()
                .map(|l| ChunkRef {
                    id: format!("c{l}"),
                    len: *l,
                })
                .collect::<Vec<_>>()
        };
        let p = Pieces::new(refs(&[4096, 1024, 2048]));
        assert_eq!(p.find(0), Some(0));
        assert_eq!(p.find(4095), Some(0));
        assert_eq!(p.find(4096), Some(1));
        assert_eq!(p.find(5120), Some(2));
        assert_eq!(p.find(7167), Some(2));
        assert_eq!(p.find(7168), None);
        assert_eq!(Pieces::new(Vec::new()).find(0), None);
    }

    #[test]
    fn cache_stays_within_budget_and_keeps_recent_chunks() {
        let mut c = ChunkCache::default();
        for i in 0..10 {
            c.put(i, Arc::new(vec![0u8; 4 << 20]));
        }
        assert!(c.bytes <= CACHE_BYTES);
        assert!(c.get(9).is_some());
        assert!(c.get(0).is_none());
    }
}
