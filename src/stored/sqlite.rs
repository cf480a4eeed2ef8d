//! What a SQLite source stores: snapshot details, the position capture resumes from (stored
//! at the end of every segment), and the frame-record codec of segment payloads and base
//! frames. Capture writes these types; restore, export and drill read them without importing
//! `source`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::repo::ChunkList;

/// Payload format of SQLite segments: records of `page_no u32 BE, commit_size u32 BE, page`.
pub const FRAME_FORMAT: &str = "sqlite-wal-frames/1";
/// Source-specific part of a snapshot manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SqliteSnapshotDetails {
    pub page_size: u32,
    /// Frames that were in the WAL but not yet in the database file when it was copied.
    pub base_frames: ChunkList,
    /// Where capture continues.
    pub resume: Resume,
}

/// Where capture resumes, stored at the end of every segment and in every snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The position in the WAL generation last read; `None`: from the start of the next WAL.
    pub wal: Option<WalPosition>,
    /// That generation's checkpoint sequence number (SQLite increments it at each restart).
    pub checkpoint_seq: u32,
    /// timevault checkpointed the whole WAL under the write lock: exactly one restart (salt1
    /// + 1) may follow without losing anything.
    pub expect_restart: bool,
    /// The database file as a clean shutdown left it, every frame checkpointed into it: a
    /// restart may trust a missing WAL only while the file is still so (module doc).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_file: Option<DbFileMark>,
}

/// A database file's size and modification time: any checkpoint into it changes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbFileMark {
    pub size: u64,
    pub mtime_ns: i64,
}

impl DbFileMark {
    /// The file at `path` now; `None` when it cannot be read.
    pub fn of(path: &Path) -> Option<DbFileMark> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(DbFileMark {
            size: meta.len(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        })
    }
}

/// Where reading resumes: the frame count already consumed and the running checksum after it.
/// The salts tie the position to one WAL generation; the checksum ties it to the exact frames,
/// so a position is only ever continued in the log it was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalPosition {
    pub salt1: u32,
    pub salt2: u32,
    pub frames: u64,
    pub checksum: (u32, u32),
}

impl WalPosition {
    pub(crate) fn salts(&self) -> (u32, u32) {
        (self.salt1, self.salt2)
    }
}

/// One record of a frame payload: a page image and, on a commit frame, the database size in
/// pages after that commit (0 otherwise).
#[derive(Debug, Clone, Copy)]
pub struct FrameRecord<'a> {
    pub page_no: u32,
    pub commit_size: u32,
    pub page: &'a [u8],
}

/// Hand every record of a frame payload (a snapshot's base frames or a segment) to `each`, in
/// order; a payload that is not whole records, or names page 0, is refused.
pub fn for_each_frame<'a>(
    payload: &'a [u8],
    page_size: u32,
    mut each: impl FnMut(FrameRecord<'a>) -> Result<()>,
) -> Result<()> {
    let record_len = 8 + page_size as usize;
    if !payload.len().is_multiple_of(record_len) {
        return Err(Error::corrupt(format!(
            "frame payload of {} bytes is not a whole number of {record_len}-byte records",
            payload.len()
        )));
    }
    for record in payload.chunks_exact(record_len) {
        let page_no = u32::from_be_bytes(record[0..4].try_into().expect("4 bytes"));
        let commit_size = u32::from_be_bytes(record[4..8].try_into().expect("4 bytes"));
        if page_no == 0 {
            return Err(Error::corrupt("frame record for page 0"));
        }
        each(FrameRecord {
            page_no,
            commit_size,
            page: &record[8..],
        })?;
    }
    Ok(())
}

/// Apply frame records (from a snapshot's base frames or a segment) to a database image.
pub fn apply_frames(file: &std::fs::File, page_size: u32, payload: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    for_each_frame(payload, page_size, |frame| {
        let offset = u64::from(frame.page_no - 1) * u64::from(page_size);
        file.write_all_at(frame.page, offset)
            .map_err(|e| Error::other(format!("writing page {}", frame.page_no)).with_source(e))?;
        if frame.commit_size != 0 {
            file.set_len(u64::from(frame.commit_size) * u64::from(page_size))
                .map_err(|e| Error::other("resizing the database").with_source(e))?;
        }
        Ok(())
    })
}
