//! Reading SQLite write-ahead logs, for Litestream-style WAL shipping.
//!
//! In WAL mode SQLite appends every changed page to `<db>-wal` before it reaches the database
//! file, so shipping those frames gives point-in-time restore without copying the database after
//! each change. What matters is deciding which frames SQLite itself treats as part of the
//! database, with SQLite's own rules (<https://www.sqlite.org/fileformat2.html#walformat>): a
//! frame counts only when its salts equal the header's and its cumulative checksum matches, the
//! first frame that fails ends the log, and only frames up to the last commit frame are
//! committed. Anything after that is a transaction still being written, a leftover of an earlier
//! generation of the file, or damage, and is never delivered.
//!
//! The capturing process pins the WAL with a read transaction while it reads, so committed
//! frames do not move under it. A [`WalPosition`] records how far it got; after a restart it
//! checks continuity with [`WalReader::verify_position`] and resumes with
//! [`WalReader::read_committed`]. Memory stays at one frame plus a read buffer, whatever the size
//! of the WAL.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub use crate::stored::sqlite::WalPosition;

/// Length of the header at the start of every WAL file.
pub const WAL_HEADER_LEN: usize = 32;
/// Length of the header in front of each page in a frame.
pub const FRAME_HEADER_LEN: usize = 24;

/// Magic with little-endian checksum words (what little-endian machines write).
const MAGIC_LE: u32 = 0x377f_0682;
/// Magic with big-endian checksum words.
const MAGIC_BE: u32 = 0x377f_0683;
/// The only WAL format version SQLite has ever written.
const FORMAT_VERSION: u32 = 3_007_000;
const MIN_PAGE_SIZE: u32 = 512;
const MAX_PAGE_SIZE: u32 = 65_536;
/// Bytes read per system call while streaming frames: several frames, still small.
const READ_BUFFER_LEN: usize = 256 * 1024;

/// What is wrong with a WAL header. SQLite does not use the frames of a WAL whose header has
/// any of these defects, so they cannot be shipped as part of the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderDefect {
    #[error("only {len} bytes, a wal header needs 32")]
    TooShort { len: usize },
    #[error("bad magic {0:#010x}, expected 0x377f0682 or 0x377f0683")]
    Magic(u32),
    #[error("unsupported format version {0}, expected 3007000")]
    Version(u32),
    #[error("invalid page size {0}, expected a power of two from 512 to 65536")]
    PageSize(u32),
    #[error("header checksum mismatch: stored {stored:08x?}, computed {computed:08x?}")]
    Checksum {
        stored: (u32, u32),
        computed: (u32, u32),
    },
}

/// Why a WAL could not be read, or why a position cannot be continued in it.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The header is damaged: nothing in the file can be trusted.
    #[error("invalid wal header{}: {defect}", in_path(.path.as_deref()))]
    Header {
        path: Option<PathBuf>,
        defect: HeaderDefect,
    },
    #[error("cannot read wal {}{}: {error}", .path.display(), at_frame(*.frame))]
    Io {
        path: PathBuf,
        frame: Option<u64>,
        error: io::Error,
    },
    /// The file now belongs to another generation (a checkpoint restarted or truncated it), so
    /// frames after the position were checkpointed into the database and cannot be read here.
    #[error(
        "wal {} was restarted: the position has salts {}, the file has {}",
        .path.display(), salts_text(Some(*.expected)), salts_text(*.found)
    )]
    Restarted {
        path: PathBuf,
        expected: (u32, u32),
        found: Option<(u32, u32)>,
    },
    /// The position points past the end of the file although the salts match: the position was
    /// not produced from this file, or the file was cut short.
    #[error(
        "wal {} ends before frame {frames} of the position ({file_len} bytes)",
        .path.display()
    )]
    PositionBeyondEnd {
        path: PathBuf,
        frames: u64,
        file_len: u64,
    },
    /// A frame that was valid moments ago no longer is: the WAL was restarted while reading.
    #[error("wal {} changed while frame {frame} was being read", .path.display())]
    ChangedDuringRead { path: PathBuf, frame: u64 },
}

/// A failure of [`WalReader::read_committed`]: either the WAL, or the consumer of the frames.
/// In both cases the caller resumes from the position it passed in: frames delivered before the
/// failure must be discarded.
#[derive(Debug, thiserror::Error)]
pub enum ReadError<E> {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("frame consumer failed at wal frame {frame}: {error}")]
    Consumer { frame: u64, error: E },
}

fn in_path(path: Option<&Path>) -> String {
    path.map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

fn at_frame(frame: Option<u64>) -> String {
    frame.map(|f| format!(" at frame {f}")).unwrap_or_default()
}

fn salts_text(salts: Option<(u32, u32)>) -> String {
    match salts {
        Some((s1, s2)) => format!("{s1:08x}/{s2:08x}"),
        None => "no header (empty file)".to_string(),
    }
}

/// The 32-byte header of a WAL file. The salts identify one generation of the file: SQLite
/// changes them each time it restarts the log from the beginning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    /// Database page size in bytes; every frame carries one page.
    pub page_size: u32,
    /// Incremented by SQLite at each restart of the log.
    pub checkpoint_seq: u32,
    pub salt1: u32,
    pub salt2: u32,
    /// Checksum over the first 24 header bytes; it seeds the checksum of frame 0.
    pub checksum: (u32, u32),
    /// Whether checksums read the data as big-endian 32-bit words (magic 0x377f0683).
    pub big_endian_checksums: bool,
}

impl WalHeader {
    /// Parse and validate the first 32 bytes of `bytes` (later bytes are ignored): magic,
    /// format version, page size and header checksum. The error carries no path; readers add it.
    pub fn parse(bytes: &[u8]) -> Result<WalHeader, WalError> {
        Self::parse_defect(bytes).map_err(|defect| WalError::Header { path: None, defect })
    }

    fn parse_defect(bytes: &[u8]) -> Result<WalHeader, HeaderDefect> {
        let Some(head) = bytes.get(..WAL_HEADER_LEN) else {
            return Err(HeaderDefect::TooShort { len: bytes.len() });
        };
        let big_endian_checksums = match be32(head, 0) {
            MAGIC_LE => false,
            MAGIC_BE => true,
            other => return Err(HeaderDefect::Magic(other)),
        };
        let version = be32(head, 4);
        if version != FORMAT_VERSION {
            return Err(HeaderDefect::Version(version));
        }
        let page_size = match be32(head, 8) {
            // The database header's convention for 65536, accepted here too.
            1 => MAX_PAGE_SIZE,
            size => size,
        };
        if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(HeaderDefect::PageSize(be32(head, 8)));
        }
        let stored = (be32(head, 24), be32(head, 28));
        let computed = checksum((0, 0), &head[..24], big_endian_checksums);
        if stored != computed {
            return Err(HeaderDefect::Checksum { stored, computed });
        }
        Ok(WalHeader {
            page_size,
            checkpoint_seq: be32(head, 12),
            salt1: be32(head, 16),
            salt2: be32(head, 20),
            checksum: stored,
            big_endian_checksums,
        })
    }

    /// Bytes per frame: frame header plus one page.
    pub fn frame_len(&self) -> u64 {
        FRAME_HEADER_LEN as u64 + u64::from(self.page_size)
    }

    /// Byte offset of frame `index`, or None when it cannot be represented.
    pub fn frame_offset(&self, index: u64) -> Option<u64> {
        index
            .checked_mul(self.frame_len())?
            .checked_add(WAL_HEADER_LEN as u64)
    }

    fn salts(&self) -> (u32, u32) {
        (self.salt1, self.salt2)
    }
}

/// One frame of the WAL: a page image, and for the last frame of a transaction the database
/// size after the commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// 0-based frame number in this WAL generation.
    pub index: u64,
    /// 1-based page number in the database file.
    pub page_no: u32,
    /// Database size in pages after the commit for a commit frame, else 0.
    pub commit_size: u32,
    /// The cumulative checksum after this frame (as stored in its header, and verified).
    pub checksum: (u32, u32),
    /// The page, `page_size` bytes.
    pub data: Vec<u8>,
}

impl Frame {
    /// Whether this frame ends a transaction.
    pub fn is_commit(&self) -> bool {
        self.commit_size != 0
    }
}

/// Reads a WAL file incrementally, one frame at a time.
///
/// The header is read again at each [`verify_position`](Self::verify_position) and
/// [`read_committed`](Self::read_committed), so one reader can follow a live WAL and notices
/// when SQLite restarts it.
#[derive(Debug)]
pub struct WalReader<R = File> {
    inner: R,
    path: PathBuf,
    header: WalHeader,
}

impl WalReader<File> {
    /// Open the WAL at `path`; Ok(None) when the file does not exist or is shorter than a header
    /// (an empty WAL: SQLite creates and truncates it with no frames). A damaged header is an
    /// error rather than an empty WAL: SQLite would drop the frames, and an operator must hear
    /// about that.
    pub fn open(path: &Path) -> Result<Option<WalReader>, WalError> {
        match File::open(path) {
            Ok(file) => WalReader::from_reader(file, path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io_error(path, None, error)),
        }
    }

    /// The open file's identity (device, inode): the WAL SQLite writes is one file for as long
    /// as any connection holds the database open, so another identity means it was replaced.
    pub fn identity(&self) -> Result<FileIdentity, WalError> {
        let meta = self
            .inner
            .metadata()
            .map_err(|e| io_error(&self.path, None, e))?;
        Ok(FileIdentity::of(&meta))
    }
}

/// A file's (device, inode): equal for one file however often it is opened, different for a
/// file put in its place by `mv` or deleted and created again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> FileIdentity {
        use std::os::unix::fs::MetadataExt;
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

impl<R: Read + Seek> WalReader<R> {
    /// Read a WAL from any seekable source (tests, fuzzing); `path` only names it in errors.
    pub fn from_reader(mut inner: R, path: impl Into<PathBuf>) -> Result<Option<Self>, WalError> {
        let path = path.into();
        let header = read_header(&mut inner, &path)?;
        Ok(header.map(|header| WalReader {
            inner,
            path,
            header,
        }))
    }

    /// The header as last read from the file.
    pub fn header(&self) -> &WalHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The position right after the header (frames = 0, checksum = header checksum).
    pub fn start(&self) -> WalPosition {
        WalPosition {
            salt1: self.header.salt1,
            salt2: self.header.salt2,
            frames: 0,
            checksum: self.header.checksum,
        }
    }

    /// Whether `pos` belongs to this WAL generation and still matches the file: same salts, the
    /// file holds at least `pos.frames` valid frames, and the running checksum after them equals
    /// `pos.checksum`. Used after a restart of the capturing process to decide whether
    /// continuity holds; false means frames may have been missed and a new base is needed.
    /// Streams the whole chain from the header, one frame at a time. An error means the file
    /// could not be read or its header is damaged, which says nothing about continuity.
    pub fn verify_position(&mut self, pos: &WalPosition) -> Result<bool, WalError> {
        let Some(header) = self.reload_header()? else {
            return Ok(false);
        };
        if header.salts() != pos.salts() {
            return Ok(false);
        }
        let Some(end) = header.frame_offset(pos.frames) else {
            return Ok(false);
        };
        if self.file_len()? < end {
            return Ok(false);
        }
        let mut scan = Scanner::new(&mut self.inner, &self.path, header, 0, header.checksum)?;
        while scan.next_index < pos.frames {
            if !scan.advance()? {
                return Ok(false);
            }
        }
        Ok(scan.running == pos.checksum)
    }

    /// Whether the frames up to `pos` are still in the file as they were read: the header has
    /// `pos`'s salts and the frame before `pos` ends with `pos`'s running checksum. One frame
    /// header is read, so a capture can check it every time; [`Self::verify_position`]
    /// re-checks the whole chain.
    pub fn position_intact(&mut self, pos: &WalPosition) -> Result<bool, WalError> {
        let Some(header) = self.reload_header()? else {
            return Ok(false);
        };
        if header.salts() != pos.salts() {
            return Ok(false);
        }
        if pos.frames == 0 {
            return Ok(pos.checksum == header.checksum);
        }
        let Some(offset) = header.frame_offset(pos.frames - 1) else {
            return Ok(false);
        };
        let mut head = [0u8; FRAME_HEADER_LEN];
        let read = self
            .inner
            .seek(SeekFrom::Start(offset))
            .and_then(|_| read_full(&mut self.inner, &mut head))
            .map_err(|e| io_error(&self.path, Some(pos.frames - 1), e))?;
        if read < FRAME_HEADER_LEN {
            return Ok(false);
        }
        let salts = (be32(&head, 8), be32(&head, 12));
        let checksum = (be32(&head, 16), be32(&head, 20));
        Ok(salts == pos.salts() && checksum == pos.checksum)
    }

    /// Read committed frames after `pos`, calling `on_frame` for each in order, up to the end of
    /// the last complete (commit-terminated) transaction in the file. Returns the position after
    /// the last commit frame and the number of frames delivered. Frames of a transaction still
    /// being written are not delivered.
    ///
    /// `pos` is trusted, not re-verified from the start (that is [`Self::verify_position`]'s
    /// job): the chain is checked from `pos.checksum` on. A wrong checksum therefore looks like
    /// a log with nothing new. Two passes keep memory at one frame: the first finds the last
    /// commit frame, the second delivers up to it, checking every frame again.
    pub fn read_committed<E>(
        &mut self,
        pos: &WalPosition,
        mut on_frame: impl FnMut(&Frame) -> Result<(), E>,
    ) -> Result<(WalPosition, u64), ReadError<E>> {
        let header = self.check_continuable(pos)?;
        let end = self.find_last_commit(header, pos)?;
        if end.frames == pos.frames {
            return Ok((*pos, 0));
        }
        let mut scan = Scanner::new(
            &mut self.inner,
            &self.path,
            header,
            pos.frames,
            pos.checksum,
        )?;
        while scan.next_index < end.frames {
            if !scan.advance()? {
                return Err(scan.changed().into());
            }
            on_frame(&scan.frame).map_err(|error| ReadError::Consumer {
                frame: scan.frame.index,
                error,
            })?;
        }
        if scan.running != end.checksum {
            return Err(scan.changed().into());
        }
        Ok((end, end.frames - pos.frames))
    }

    /// Re-read the header (SQLite rewrites it when it restarts the log); None when the file is
    /// now shorter than a header.
    fn reload_header(&mut self) -> Result<Option<WalHeader>, WalError> {
        let header = read_header(&mut self.inner, &self.path)?;
        if let Some(header) = header {
            self.header = header;
        }
        Ok(header)
    }

    /// The current header, provided `pos` is of its generation and inside the file.
    fn check_continuable(&mut self, pos: &WalPosition) -> Result<WalHeader, WalError> {
        let header = match self.reload_header()? {
            Some(h) if h.salts() == pos.salts() => h,
            other => {
                return Err(WalError::Restarted {
                    path: self.path.clone(),
                    expected: pos.salts(),
                    found: other.map(|h| h.salts()),
                })
            }
        };
        let file_len = self.file_len()?;
        match header.frame_offset(pos.frames) {
            Some(offset) if offset <= file_len => Ok(header),
            _ => Err(WalError::PositionBeyondEnd {
                path: self.path.clone(),
                frames: pos.frames,
                file_len,
            }),
        }
    }

    /// The position after the last valid commit frame following `pos` (`pos` itself if none).
    fn find_last_commit(
        &mut self,
        header: WalHeader,
        pos: &WalPosition,
    ) -> Result<WalPosition, WalError> {
        let mut last = *pos;
        let mut scan = Scanner::new(
            &mut self.inner,
            &self.path,
            header,
            pos.frames,
            pos.checksum,
        )?;
        while scan.advance()? {
            if scan.frame.is_commit() {
                last.frames = scan.next_index;
                last.checksum = scan.running;
            }
        }
        Ok(last)
    }

    fn file_len(&mut self) -> Result<u64, WalError> {
        self.inner
            .seek(SeekFrom::End(0))
            .map_err(|e| io_error(&self.path, None, e))
    }
}

/// Walks frames forward from one index, validating each against the running checksum.
struct Scanner<'a, R> {
    input: BufReader<&'a mut R>,
    path: &'a Path,
    header: WalHeader,
    /// Index of the frame the next `advance` reads.
    next_index: u64,
    /// Checksum after the last valid frame (or the seed).
    running: (u32, u32),
    /// The last valid frame read; its buffer is reused.
    frame: Frame,
    ended: bool,
}

impl<'a, R: Read + Seek> Scanner<'a, R> {
    fn new(
        inner: &'a mut R,
        path: &'a Path,
        header: WalHeader,
        first_index: u64,
        seed: (u32, u32),
    ) -> Result<Self, WalError> {
        let at = |e| io_error(path, Some(first_index), e);
        let offset = header
            .frame_offset(first_index)
            .ok_or_else(|| at(io::Error::other("frame offset overflows")))?;
        inner.seek(SeekFrom::Start(offset)).map_err(at)?;
        Ok(Scanner {
            input: BufReader::with_capacity(READ_BUFFER_LEN, inner),
            path,
            header,
            next_index: first_index,
            running: seed,
            frame: Frame {
                index: first_index,
                page_no: 0,
                commit_size: 0,
                checksum: seed,
                data: vec![0; header.page_size as usize],
            },
            ended: false,
        })
    }

    /// Read the next frame into `self.frame`. False when the log ends there: end of file, a
    /// partly written frame, or a frame that fails the salt or checksum test. Once false,
    /// always false.
    fn advance(&mut self) -> Result<bool, WalError> {
        if self.ended {
            return Ok(false);
        }
        let mut head = [0u8; FRAME_HEADER_LEN];
        let complete = self.read_frame(&mut head)?;
        let valid = complete && self.check(&head);
        if !valid {
            self.ended = true;
            return Ok(false);
        }
        self.frame.index = self.next_index;
        self.frame.page_no = be32(&head, 0);
        self.frame.commit_size = be32(&head, 4);
        self.frame.checksum = self.running;
        self.next_index += 1;
        Ok(true)
    }

    /// SQLite's test for a valid frame: non-zero page number, the header's salts, and a checksum
    /// continuing the chain. Advances `running` when valid.
    fn check(&mut self, head: &[u8; FRAME_HEADER_LEN]) -> bool {
        if be32(head, 0) == 0 || (be32(head, 8), be32(head, 12)) != self.header.salts() {
            return false;
        }
        let big_endian = self.header.big_endian_checksums;
        let sum = checksum(self.running, &head[..8], big_endian);
        let sum = checksum(sum, &self.frame.data, big_endian);
        if sum != (be32(head, 16), be32(head, 20)) {
            return false;
        }
        self.running = sum;
        true
    }

    /// The error for a frame that was valid in an earlier pass and is not any more.
    fn changed(&self) -> WalError {
        WalError::ChangedDuringRead {
            path: self.path.to_path_buf(),
            frame: self.next_index,
        }
    }

    /// Read the next frame's header into `head` and its page into `self.frame.data`; false when
    /// the file ends first.
    fn read_frame(&mut self, head: &mut [u8; FRAME_HEADER_LEN]) -> Result<bool, WalError> {
        let result = read_full(&mut self.input, head).and_then(|n| {
            if n < FRAME_HEADER_LEN {
                return Ok(false);
            }
            let data = &mut self.frame.data;
            Ok(read_full(&mut self.input, data)? == data.len())
        });
        result.map_err(|e| io_error(self.path, Some(self.next_index), e))
    }
}

/// The header at the start of `input`; None when there are fewer than 32 bytes.
fn read_header(input: &mut (impl Read + Seek), path: &Path) -> Result<Option<WalHeader>, WalError> {
    let mut bytes = [0u8; WAL_HEADER_LEN];
    let len = input
        .seek(SeekFrom::Start(0))
        .and_then(|_| read_full(input, &mut bytes))
        .map_err(|e| io_error(path, None, e))?;
    if len < WAL_HEADER_LEN {
        return Ok(None);
    }
    WalHeader::parse_defect(&bytes)
        .map(Some)
        .map_err(|defect| WalError::Header {
            path: Some(path.to_path_buf()),
            defect,
        })
}

/// Read until `buf` is full or the input ends; the number of bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn io_error(path: &Path, frame: Option<u64>, error: io::Error) -> WalError {
    WalError::Io {
        path: path.to_path_buf(),
        frame,
        error,
    }
}

/// The big-endian u32 at `at`; 0 when out of range (callers pass fixed in-range offsets).
fn be32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    if let Some(src) = bytes.get(at..at.saturating_add(4)) {
        word.copy_from_slice(src);
    }
    u32::from_be_bytes(word)
}

/// SQLite's WAL checksum, continued from `seed`: for each pair of 32-bit words x0, x1 (in the
/// byte order the magic selects), s0 += x0 + s1; s1 += x1 + s0, wrapping. `bytes` is a multiple
/// of 8 long (24-byte header prefix, 8-byte frame header prefix, power-of-two pages).
fn checksum(seed: (u32, u32), bytes: &[u8], big_endian: bool) -> (u32, u32) {
    if big_endian {
        checksum_words(seed, bytes, u32::from_be_bytes)
    } else {
        checksum_words(seed, bytes, u32::from_le_bytes)
    }
}

#[inline(always)]
fn checksum_words(seed: (u32, u32), bytes: &[u8], word: impl Fn([u8; 4]) -> u32) -> (u32, u32) {
    let (mut s0, mut s1) = seed;
    for pair in bytes.chunks_exact(8) {
        if let [a0, a1, a2, a3, b0, b1, b2, b3] = *pair {
            s0 = s0.wrapping_add(word([a0, a1, a2, a3]).wrapping_add(s1));
            s1 = s1.wrapping_add(word([b0, b1, b2, b3]).wrapping_add(s0));
        }
    }
    (s0, s1)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::io::{Cursor, Write};

    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode};
    use sqlx::Connection;
    use tempfile::TempDir;

    use super::*;

    type Row = (i64, String, Vec<u8>);

    /// A WAL-mode database whose WAL only grows: the writer never checkpoints on its own and
    /// stays open, so `<db>-wal` is not checkpointed away on close while the test copies it.
    struct Fixture {
        dir: TempDir,
        db: PathBuf,
        conn: SqliteConnection,
    }

    impl Fixture {
        async fn new() -> Fixture {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = dir.path().join("app.db");
            let mut conn = connect(&db).await;
            sqlx::query("PRAGMA wal_autocheckpoint=0")
                .execute(&mut conn)
                .await
                .expect("disable autocheckpoint");
            sqlx::query("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, body BLOB)")
                .execute(&mut conn)
                .await
                .expect("create table");
            Fixture { dir, db, conn }
        }

        fn wal(&self) -> PathBuf {
            self.dir.path().join("app.db-wal")
        }

        /// Insert rows `ids`, one autocommit transaction each.
        async fn insert(&mut self, ids: std::ops::Range<i64>, body_len: usize) {
            for id in ids {
                insert_row(&mut self.conn, id, body_len).await;
            }
        }

        /// Insert rows `ids` in a single transaction.
        async fn insert_one_tx(&mut self, ids: std::ops::Range<i64>, body_len: usize) {
            let mut tx = self.conn.begin().await.expect("begin");
            for id in ids {
                insert_row(&mut tx, id, body_len).await;
            }
            tx.commit().await.expect("commit");
        }

        async fn exec(&mut self, sql: &'static str) {
            sqlx::query(sql).execute(&mut self.conn).await.expect(sql);
        }

        /// `PRAGMA wal_checkpoint(TRUNCATE)`: everything into the database file, WAL emptied.
        async fn checkpoint_truncate(&mut self) {
            let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&mut self.conn)
                .await
                .expect("checkpoint");
            assert_eq!(busy, 0, "checkpoint was blocked");
        }

        async fn rows(&mut self) -> Vec<Row> {
            rows(&mut self.conn).await
        }

        async fn page_count(&mut self) -> u32 {
            sqlx::query_scalar::<_, i64>("PRAGMA page_count")
                .fetch_one(&mut self.conn)
                .await
                .expect("page_count") as u32
        }

        /// Copy the live WAL (the writer is open, so it is complete) to `name`.
        fn copy_wal(&self, name: &str) -> PathBuf {
            let copy = self.dir.path().join(name);
            std::fs::copy(self.wal(), &copy).expect("copy wal");
            copy
        }
    }

    async fn connect(db: &Path) -> SqliteConnection {
        let options = SqliteConnectOptions::new()
            .filename(db)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        SqliteConnection::connect_with(&options)
            .await
            .expect("connect")
    }

    async fn insert_row(conn: &mut SqliteConnection, id: i64, body_len: usize) {
        let body: Vec<u8> = (0..body_len).map(|i| (i as i64 * 31 + id) as u8).collect();
        sqlx::query("INSERT INTO items (id, name, body) VALUES (?, ?, ?)")
            .bind(id)
            .bind(format!("item {id}"))
            .bind(body)
            .execute(conn)
            .await
            .expect("insert");
    }

    async fn rows(conn: &mut SqliteConnection) -> Vec<Row> {
        sqlx::query_as("SELECT id, name, body FROM items ORDER BY id")
            .fetch_all(conn)
            .await
            .expect("select")
    }

    fn open(path: &Path) -> WalReader {
        WalReader::open(path).expect("open").expect("wal exists")
    }

    /// Every committed frame after `pos`, cloned.
    fn read_all<R: Read + Seek>(
        reader: &mut WalReader<R>,
        pos: &WalPosition,
    ) -> (WalPosition, Vec<Frame>) {
        let mut frames = Vec::new();
        let (end, count) = reader
            .read_committed(pos, |f| {
                frames.push(f.clone());
                Ok::<(), Infallible>(())
            })
            .expect("read");
        assert_eq!(count, frames.len() as u64);
        (end, frames)
    }

    /// Frames physically present in a WAL file (whole frames after the header).
    fn frames_in_file(path: &Path, header: &WalHeader) -> u64 {
        let len = std::fs::metadata(path).expect("stat").len();
        (len - WAL_HEADER_LEN as u64) / header.frame_len()
    }

    fn xor_byte(path: &Path, offset: u64) {
        let mut bytes = std::fs::read(path).expect("read");
        bytes[offset as usize] ^= 0x40;
        std::fs::write(path, bytes).expect("write");
    }

    /// A synthetic WAL, for what SQLite on this machine cannot produce (big-endian checksums).
    fn synthetic_wal(magic: u32, page_size: u32, frames: &[(u32, u32)]) -> Vec<u8> {
        let big_endian = magic & 1 == 1;
        let (salt1, salt2) = (0x1234_5678, 0x9abc_def0);
        let mut out = Vec::new();
        for word in [magic, FORMAT_VERSION, page_size, 7, salt1, salt2] {
            out.extend_from_slice(&word.to_be_bytes());
        }
        let mut sum = checksum((0, 0), &out, big_endian);
        out.extend_from_slice(&sum.0.to_be_bytes());
        out.extend_from_slice(&sum.1.to_be_bytes());
        let size = if page_size == 1 { 65_536 } else { page_size };
        for (i, &(page_no, commit)) in frames.iter().enumerate() {
            let data: Vec<u8> = (0..size).map(|b| (b as usize * 7 + i) as u8).collect();
            let mut head = Vec::new();
            for word in [page_no, commit, salt1, salt2] {
                head.extend_from_slice(&word.to_be_bytes());
            }
            sum = checksum(sum, &head[..8], big_endian);
            sum = checksum(sum, &data, big_endian);
            head.extend_from_slice(&sum.0.to_be_bytes());
            head.extend_from_slice(&sum.1.to_be_bytes());
            out.extend_from_slice(&head);
            out.extend_from_slice(&data);
        }
        out
    }

    #[test]
    fn checksum_follows_the_documented_recurrence() {
        // Words 1, 2, 3, 4: s0 = 1, s1 = 2 + 1 = 3, s0 = 1 + 3 + 3 = 7, s1 = 3 + 4 + 7 = 14.
        let be: Vec<u8> = [1u32, 2, 3, 4]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect();
        let le: Vec<u8> = [1u32, 2, 3, 4]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(checksum((0, 0), &be, true), (7, 14));
        assert_eq!(checksum((0, 0), &le, false), (7, 14));
        assert_ne!(checksum((0, 0), &be, false), (7, 14));
        // Seeded and wrapping: 1 + 0xffffffff + 1 = 1.
        assert_eq!(checksum((1, 1), &[0xff; 8], true), (1, 1));
        // Continuing from a seed equals one pass over the concatenation.
        let half = checksum((0, 0), &be[..8], true);
        assert_eq!(checksum(half, &be[8..], true), (7, 14));
    }

    #[test]
    fn parse_rejects_damaged_headers() {
        let good = synthetic_wal(MAGIC_LE, 4096, &[]);
        assert!(WalHeader::parse(&good).is_ok());
        let defect = |bytes: &[u8]| match WalHeader::parse(bytes) {
            Err(WalError::Header { path: None, defect }) => defect,
            other => panic!("expected a header defect, got {other:?}"),
        };
        assert_eq!(defect(&good[..31]), HeaderDefect::TooShort { len: 31 });
        assert_eq!(defect(&[]), HeaderDefect::TooShort { len: 0 });

        let mut bad_magic = good.clone();
        bad_magic[3] = 0x84;
        assert_eq!(defect(&bad_magic), HeaderDefect::Magic(0x377f_0684));

        // Flipping the byte-order bit keeps a valid magic but the checksum no longer matches.
        let mut other_order = good.clone();
        other_order[3] = 0x83;
        assert!(matches!(
            defect(&other_order),
            HeaderDefect::Checksum { .. }
        ));

        let mut bad_sum = good.clone();
        bad_sum[20] ^= 1; // salt-2
        assert!(matches!(defect(&bad_sum), HeaderDefect::Checksum { .. }));

        let mut bad_version = good.clone();
        bad_version[4..8].copy_from_slice(&3_007_001u32.to_be_bytes());
        assert_eq!(defect(&bad_version), HeaderDefect::Version(3_007_001));

        for size in [0, 256, 1000, 4097, 131_072] {
            let bytes = synthetic_wal(MAGIC_LE, size, &[]);
            assert_eq!(
                defect(&bytes),
                HeaderDefect::PageSize(size),
                "page size {size}"
            );
        }
        for (field, size) in [(512, 512), (65_536, 65_536), (1, 65_536)] {
            let header = WalHeader::parse(&synthetic_wal(MAGIC_BE, field, &[])).expect("valid");
            assert_eq!(header.page_size, size);
            assert!(header.big_endian_checksums);
        }
    }

    #[test]
    fn big_endian_checksums_are_read() {
        let bytes = synthetic_wal(MAGIC_BE, 1024, &[(1, 0), (2, 3), (3, 0)]);
        let mut reader = WalReader::from_reader(Cursor::new(bytes), "synthetic")
            .expect("open")
            .expect("not empty");
        assert!(reader.header().big_endian_checksums);
        assert_eq!(reader.header().checkpoint_seq, 7);
        let start = reader.start();
        let (end, frames) = read_all(&mut reader, &start);
        // The third frame is valid but no commit follows it.
        assert_eq!(frames.len(), 2);
        assert_eq!((frames[0].page_no, frames[1].commit_size), (1, 3));
        assert_eq!(end.frames, 2);
        assert_eq!(end.checksum, frames[1].checksum);
        assert!(reader.verify_position(&end).expect("verify"));
    }

    #[tokio::test]
    async fn open_treats_missing_and_short_files_as_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db-wal");
        assert!(WalReader::open(&path).expect("missing").is_none());
        std::fs::write(&path, b"").expect("write");
        assert!(WalReader::open(&path).expect("empty").is_none());
        std::fs::write(&path, &synthetic_wal(MAGIC_LE, 512, &[])[..31]).expect("write");
        assert!(WalReader::open(&path).expect("short").is_none());
        std::fs::write(&path, [0xaa; 64]).expect("write");
        match WalReader::open(&path) {
            Err(WalError::Header {
                path: Some(p),
                defect: HeaderDefect::Magic(_),
            }) => assert_eq!(p, path),
            other => panic!("expected a bad magic, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn reads_every_committed_frame_of_a_sqlite_wal() {
        let mut fx = Fixture::new().await;
        fx.insert(0..20, 100).await;
        fx.insert_one_tx(20..40, 1500).await;
        let copy = fx.copy_wal("copy-wal");

        let mut reader = open(&copy);
        let header = *reader.header();
        let page_size: i64 = sqlx::query_scalar("PRAGMA page_size")
            .fetch_one(&mut fx.conn)
            .await
            .expect("page_size");
        assert_eq!(i64::from(header.page_size), page_size);
        assert!(
            !header.big_endian_checksums,
            "x86 SQLite writes little-endian"
        );

        let start = reader.start();
        let (end, frames) = read_all(&mut reader, &start);
        // Every transaction committed, so every frame in the file counts.
        assert_eq!(end.frames, frames_in_file(&copy, &header));
        let indexes: Vec<u64> = frames.iter().map(|f| f.index).collect();
        assert_eq!(indexes, (0..end.frames).collect::<Vec<_>>());
        // CREATE TABLE, 20 single-row inserts and one 20-row transaction.
        assert_eq!(frames.iter().filter(|f| f.is_commit()).count(), 22);
        assert!(frames.last().expect("frames").is_commit());
        let page_count = fx.page_count().await;
        assert!(frames.iter().all(|f| (1..=page_count).contains(&f.page_no)));
        assert!(
            frames.iter().any(|f| f.page_no == 1),
            "page 1 changes with the schema"
        );
        assert_eq!(frames.last().map(|f| f.commit_size), Some(page_count));
        assert!(frames.iter().all(|f| f.data.len() == page_size as usize));
        assert_eq!(end.checksum, frames.last().expect("frames").checksum);
        assert!(reader.verify_position(&end).expect("verify"));

        // SQLite agrees on the number of frames in its log.
        let (_, log, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&mut fx.conn)
            .await
            .expect("checkpoint");
        assert_eq!(log as u64, end.frames);
    }

    #[tokio::test]
    async fn incremental_read_of_the_live_wal_delivers_exactly_the_new_frames() {
        let mut fx = Fixture::new().await;
        fx.insert(0..5, 200).await;
        let mut reader = open(&fx.wal());
        let start = reader.start();
        let (first, first_frames) = read_all(&mut reader, &start);
        assert!(first.frames > 0);

        fx.insert(5..12, 200).await;
        fx.insert_one_tx(12..30, 900).await;
        let (second, new_frames) = read_all(&mut reader, &first);
        assert_eq!(new_frames.first().map(|f| f.index), Some(first.frames));
        assert_eq!(second.frames, first.frames + new_frames.len() as u64);
        assert_eq!(new_frames.iter().filter(|f| f.is_commit()).count(), 8);

        // The same frames as a read from the start, no more and no fewer.
        let (again, all_frames) = read_all(&mut reader, &start);
        assert_eq!(again, second);
        assert_eq!(all_frames[..first_frames.len()], first_frames[..]);
        assert_eq!(all_frames[first_frames.len()..], new_frames[..]);

        // Nothing new: the position stays.
        assert_eq!(read_all(&mut reader, &second), (second, Vec::new()));
        assert!(reader.verify_position(&first).expect("verify first"));
        assert!(reader.verify_position(&second).expect("verify second"));
    }

    #[tokio::test]
    async fn an_uncommitted_tail_is_not_delivered() {
        let mut fx = Fixture::new().await;
        fx.insert(0..3, 100).await;
        fx.insert_one_tx(3..12, 2000).await; // several frames, the last one commits
        let copy = fx.copy_wal("copy-wal");
        let mut reader = open(&copy);
        let header = *reader.header();
        let start = reader.start();
        let (full, frames) = read_all(&mut reader, &start);
        let last_tx = frames.iter().rev().skip(1).position(|f| f.is_commit());
        let prev_commit = frames.len() - 1 - last_tx.expect("an earlier commit");
        assert!(
            frames.len() - prev_commit >= 3,
            "the last transaction spans frames"
        );
        let before_last_tx = WalPosition {
            frames: prev_commit as u64,
            checksum: frames[prev_commit - 1].checksum,
            ..full
        };
        let frame_len = header.frame_len();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&copy)
            .expect("open copy");

        // Cut inside a frame, then cut just before the commit frame: whole but uncommitted.
        let half = header.frame_offset(prev_commit as u64 + 1).expect("offset") + frame_len / 2;
        let no_commit = header
            .frame_offset(frames.len() as u64 - 1)
            .expect("offset");
        for len in [no_commit, half] {
            file.set_len(len).expect("truncate");
            let (end, tail) = read_all(&mut reader, &start);
            assert_eq!(end, before_last_tx, "wal cut at {len}");
            assert_eq!(tail[..], frames[..prev_commit]);
            assert_eq!(read_all(&mut reader, &end), (end, Vec::new()));
        }

        // Whole again, then garbage appended: a frame header with the right salts and a torn page.
        std::fs::copy(fx.wal(), &copy).expect("recopy");
        let mut garbage = Vec::new();
        for word in [2, 9, header.salt1, header.salt2, 1, 2] {
            garbage.extend_from_slice(&word.to_be_bytes());
        }
        garbage.extend(std::iter::repeat_n(0x5a, frame_len as usize + 100));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&copy)
            .and_then(|mut f| f.write_all(&garbage))
            .expect("append");
        assert_eq!(read_all(&mut reader, &start), (full, frames));
    }

    #[tokio::test]
    async fn frames_spilled_by_an_open_transaction_are_not_delivered() {
        let mut fx = Fixture::new().await;
        fx.insert(0..3, 100).await;
        fx.exec("PRAGMA cache_size=10").await;
        let committed_copy = fx.copy_wal("committed-wal");
        let (committed, committed_frames) = {
            let mut reader = open(&committed_copy);
            let start = reader.start();
            read_all(&mut reader, &start)
        };

        // A transaction larger than the page cache: SQLite spills its pages into the WAL as
        // frames without a commit frame, long before COMMIT.
        let mut tx = fx.conn.begin().await.expect("begin");
        for id in 3..200 {
            insert_row(&mut tx, id, 1000).await;
        }
        let open_copy = fx.dir.path().join("open-tx-wal");
        // Not fx.wal(): the open transaction borrows fx's connection.
        std::fs::copy(fx.dir.path().join("app.db-wal"), &open_copy).expect("copy");
        let mut reader = open(&open_copy);
        let spilled = frames_in_file(&open_copy, reader.header());
        assert!(
            spilled > committed.frames + 10,
            "no spill: {spilled} frames"
        );
        let start = reader.start();
        assert_eq!(read_all(&mut reader, &start), (committed, committed_frames));

        tx.commit().await.expect("commit");
        let mut reader = open(&fx.wal());
        let (end, rest) = read_all(&mut reader, &committed);
        assert!(end.frames >= spilled);
        assert_eq!(rest.iter().filter(|f| f.is_commit()).count(), 1);
        assert_eq!(fx.rows().await.len(), 200);
    }

    #[tokio::test]
    async fn a_damaged_frame_ends_the_log() {
        let mut fx = Fixture::new().await;
        fx.insert(0..12, 300).await;
        let original = fx.copy_wal("original-wal");
        let mut reader = open(&original);
        let header = *reader.header();
        let start = reader.start();
        let (full, frames) = read_all(&mut reader, &start);
        let k = frames.len() as u64 / 2;
        // The last transaction that ends before frame k survives; nothing from k on.
        let survivors = frames[..k as usize]
            .iter()
            .rposition(|f| f.is_commit())
            .map_or(0, |i| i + 1);
        let frame_at = header.frame_offset(k).expect("offset");

        // A page byte, a salt byte, a stored checksum byte, and the page number.
        for (what, offset) in [
            ("page data", frame_at + FRAME_HEADER_LEN as u64 + 100),
            ("salt-1", frame_at + 9),
            ("checksum-2", frame_at + 23),
            ("page number", frame_at + 2),
        ] {
            let damaged = fx.copy_wal("damaged-wal");
            xor_byte(&damaged, offset);
            let mut reader = open(&damaged);
            let (end, delivered) = read_all(&mut reader, &start);
            assert_eq!(delivered[..], frames[..survivors], "{what}");
            assert_eq!(end.frames, survivors as u64, "{what}");
            assert!(!reader.verify_position(&full).expect("verify"), "{what}");
            assert!(reader.verify_position(&end).expect("verify"), "{what}");
        }

        // A position whose checksum is not the chain's is refused even with the right count.
        let forged = WalPosition {
            checksum: (full.checksum.0 ^ 1, full.checksum.1),
            ..full
        };
        assert!(!reader.verify_position(&forged).expect("verify"));
        assert!(reader.verify_position(&start).expect("verify start"));
    }

    #[tokio::test]
    async fn a_restarted_wal_invalidates_old_positions() {
        let mut fx = Fixture::new().await;
        fx.insert(0..5, 100).await;
        let mut reader = open(&fx.wal());
        let old_header = *reader.header();
        let start = reader.start();
        let (old, _) = read_all(&mut reader, &start);

        // TRUNCATE empties the file: no generation at all until the next write.
        fx.checkpoint_truncate().await;
        assert!(!reader.verify_position(&old).expect("verify"));
        match reader.read_committed(&old, |_| Ok::<(), Infallible>(())) {
            Err(ReadError::Wal(WalError::Restarted { found: None, .. })) => {}
            other => panic!("expected a restart, got {other:?}"),
        }
        assert!(WalReader::open(&fx.wal()).expect("open").is_none());

        fx.insert(5..8, 100).await;
        assert!(!reader.verify_position(&old).expect("verify"));
        let new_header = *reader.header();
        assert_ne!(
            (new_header.salt1, new_header.salt2),
            (old_header.salt1, old_header.salt2)
        );
        assert!(new_header.checkpoint_seq > old_header.checkpoint_seq);
        match reader.read_committed(&old, |_| Ok::<(), Infallible>(())) {
            Err(ReadError::Wal(WalError::Restarted {
                expected,
                found: Some(found),
                ..
            })) => {
                assert_eq!(expected, (old.salt1, old.salt2));
                assert_eq!(found, (new_header.salt1, new_header.salt2));
            }
            other => panic!("expected a restart, got {other:?}"),
        }
        let new_start = reader.start();
        let (new, frames) = read_all(&mut reader, &new_start);
        assert_eq!(frames.iter().filter(|f| f.is_commit()).count(), 3);
        assert!(reader.verify_position(&new).expect("verify new"));
    }

    #[tokio::test]
    async fn applying_delivered_frames_to_a_checkpointed_copy_reproduces_the_database() {
        let mut fx = Fixture::new().await;
        fx.insert(0..50, 300).await;
        fx.checkpoint_truncate().await;
        let restored = fx.dir.path().join("restored.db");
        std::fs::copy(&fx.db, &restored).expect("copy base");

        fx.insert(50..80, 300).await;
        fx.insert_one_tx(80..120, 5000).await; // overflow pages, file grows
        fx.exec("UPDATE items SET name = 'renamed ' || id WHERE id % 3 = 0")
            .await;
        fx.exec("DELETE FROM items WHERE id BETWEEN 85 AND 110")
            .await;
        fx.exec("CREATE INDEX items_name ON items (name)").await;
        let wal = fx.copy_wal("copy-wal");

        // Apply every committed frame in order; a commit sets the database size.
        let mut reader = open(&wal);
        let page_size = u64::from(reader.header().page_size);
        let mut db = std::fs::OpenOptions::new()
            .write(true)
            .open(&restored)
            .expect("open restored");
        let start = reader.start();
        let (_, count) = reader
            .read_committed(&start, |frame| -> io::Result<()> {
                db.seek(SeekFrom::Start(u64::from(frame.page_no - 1) * page_size))?;
                db.write_all(&frame.data)?;
                if frame.is_commit() {
                    db.set_len(u64::from(frame.commit_size) * page_size)?;
                }
                Ok(())
            })
            .expect("apply");
        assert!(count > 0);
        db.sync_all().expect("sync");
        drop(db);

        let expected = fx.rows().await;
        assert_eq!(expected.len(), 120 - 26);
        let mut conn = connect(&restored).await;
        assert_eq!(rows(&mut conn).await, expected);
        let check: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&mut conn)
            .await
            .expect("integrity_check");
        assert_eq!(check, "ok");
        conn.close().await.expect("close");
    }

    #[tokio::test]
    async fn a_failing_consumer_stops_the_read_and_names_the_frame() {
        let mut fx = Fixture::new().await;
        fx.insert(0..5, 100).await;
        let mut reader = open(&fx.wal());
        let start = reader.start();
        let mut seen = 0;
        let result = reader.read_committed(&start, |_| {
            seen += 1;
            if seen == 3 {
                Err("disk full")
            } else {
                Ok(())
            }
        });
        match result {
            Err(ReadError::Consumer { frame: 2, error }) => assert_eq!(error, "disk full"),
            other => panic!("expected a consumer failure, got {other:?}"),
        }
        // The reader is still usable from the same position.
        let (end, frames) = read_all(&mut reader, &start);
        assert_eq!(end.frames, frames.len() as u64);
        assert!(frames.len() > 3);
    }

    #[tokio::test]
    async fn positions_outside_the_file_are_refused_and_survive_serde() {
        let mut fx = Fixture::new().await;
        fx.insert(0..3, 100).await;
        let mut reader = open(&fx.wal());
        let start = reader.start();
        let (end, _) = read_all(&mut reader, &start);
        for frames in [end.frames + 1, u64::MAX / 2, u64::MAX] {
            let far = WalPosition { frames, ..end };
            assert!(!reader.verify_position(&far).expect("verify"));
            match reader.read_committed(&far, |_| Ok::<(), Infallible>(())) {
                Err(ReadError::Wal(WalError::PositionBeyondEnd { frames: f, .. })) => {
                    assert_eq!(f, frames)
                }
                other => panic!("expected beyond end, got {other:?}"),
            }
        }
        let json = serde_json::to_string(&end).expect("serialize");
        let back: WalPosition = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, end);
        assert!(reader.verify_position(&back).expect("verify"));
    }

    /// Random damage to a real WAL never panics, never delivers a frame the intact file does
    /// not have, and never moves past the intact file's end.
    #[tokio::test]
    async fn random_damage_never_panics_or_invents_frames() {
        let mut fx = Fixture::new().await;
        fx.insert(0..4, 100).await;
        fx.insert_one_tx(4..10, 1500).await;
        let original = std::fs::read(fx.wal()).expect("read wal");
        let mut reader = WalReader::from_reader(Cursor::new(original.clone()), "intact")
            .expect("open")
            .expect("not empty");
        let start = reader.start();
        let (full, frames) = read_all(&mut reader, &start);

        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |bound: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % bound as u64) as usize
        };
        for round in 0..300 {
            let mut bytes = original.clone();
            if round % 3 == 0 {
                bytes.truncate(next(original.len()));
            } else {
                for _ in 0..1 + next(3) {
                    let at = next(bytes.len());
                    bytes[at] ^= 1 << next(8);
                }
            }
            let Ok(Some(mut reader)) = WalReader::from_reader(Cursor::new(bytes), "damaged") else {
                continue;
            };
            let start = reader.start();
            let _ = reader.verify_position(&full);
            let _ = reader.verify_position(&WalPosition {
                frames: u64::MAX,
                ..start
            });
            let mut delivered = Vec::new();
            let result = reader.read_committed(&start, |f| {
                delivered.push(f.clone());
                Ok::<(), Infallible>(())
            });
            if let Ok((end, _)) = result {
                assert!(end.frames <= full.frames, "round {round}");
                assert_eq!(delivered[..], frames[..delivered.len()], "round {round}");
            }
        }
    }
}
