//! How a SQLite capture proves that no frame was missed, and what it calls continuity lost.
//!
//! While timevault holds its read transaction (and the database file's descriptor that carries
//! the process's POSIX locks), SQLite cannot checkpoint past timevault's read mark, restart the
//! WAL before every frame was shipped, or delete the WAL. So each of these is impossible unless
//! something outside SQLite's locking touched the files, and each means the change log may have
//! a hole (docs/ARCHITECTURE.md, "SQLite capture"):
//! * the database file's name now points at another file (replaced by `mv`, deleted);
//! * the WAL is missing, or replaced by another file, or shorter than what was read, or its
//!   frames before the read position are not the ones read;
//! * the WAL restarted without timevault's checkpoint;
//! * page 1 of the database file changed while every frame had already been checkpointed (only
//!   a write that bypassed the WAL can do that).

use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::wal::{FileIdentity, WalHeader, WalPosition, WalReader};
use super::Resume;

/// What a capture remembers between passes to notice a change made behind SQLite's back.
#[derive(Debug, Clone, Default)]
pub(super) struct Watch {
    /// The WAL file read in this chain (its identity), once seen.
    pub wal: Option<FileIdentity>,
    /// SHA-256 of page 1 when every frame was in the database file as the read began: the
    /// database file cannot change until timevault's next checkpoint.
    pub page1: Option<(u32, [u8; 32])>,
}

/// SHA-256 of page 1 of the database, read through the descriptor timevault keeps open.
pub(super) fn page1_digest(file: &std::fs::File, page_size: u32) -> std::io::Result<[u8; 32]> {
    let mut page = vec![0u8; page_size as usize];
    let mut filled = 0;
    while filled < page.len() {
        let n = file.read_at(&mut page[filled..], filled as u64)?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(Sha256::digest(&page[..filled]).into())
}

/// The database file's name must still lead to the file timevault holds open.
pub(super) fn check_database(path: &Path, held: FileIdentity) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(meta) if FileIdentity::of(&meta) == held => Ok(()),
        Ok(_) => Err(format!(
            "the database file {} was replaced by another file (mv or a restore by another tool) while timevault held it open",
            path.display()
        )),
        Err(e) => Err(format!(
            "the database file {} is gone while timevault held it open: {e}",
            path.display()
        )),
    }
}

/// The database file's page 1 must not have changed while every frame was checkpointed.
pub(super) fn check_page1(file: &std::fs::File, watch: &Watch) -> Result<(), String> {
    let Some((page_size, digest)) = watch.page1 else {
        return Ok(());
    };
    match page1_digest(file, page_size) {
        Ok(now) if now == digest => Ok(()),
        Ok(_) => Err("the database file's first page changed without its frames passing through the WAL (written by a tool that bypassed SQLite's WAL, or copied over)".into()),
        Err(e) => Err(format!("reading the database file's first page: {e}")),
    }
}

/// No WAL header to read: legitimate only while nothing of the current generation was read
/// (or timevault's own checkpoint made the coming restart expected). A missing file is never
/// legitimate while timevault holds the database open: SQLite deletes the WAL only when the
/// last connection closes.
pub(super) fn check_no_header(
    wal_path: &Path,
    resume: &Resume,
    exists: bool,
) -> Result<(), String> {
    // Missing is never legitimate, position or not: timevault's own read transaction created
    // the WAL, and only the last connection's close removes it.
    if !exists {
        return Err(format!(
            "the WAL {} disappeared while timevault held the database open (deleted by hand?): the frames it held were never read",
            wal_path.display()
        ));
    }
    let Some(pos) = resume.wal else {
        return Ok(());
    };
    if pos.frames == 0 || resume.expect_restart {
        return Ok(());
    }
    Err(format!(
        "the WAL {} was truncated to nothing behind timevault's read position (frame {})",
        wal_path.display(),
        pos.frames
    ))
}

/// The WAL being read must be the same file as before, and still hold what was read of it.
pub(super) fn check_wal(
    reader: &mut WalReader,
    resume: &Resume,
    watch: &mut Watch,
) -> Result<(), String> {
    let identity = reader
        .identity()
        .map_err(|e| format!("the WAL cannot be read: {e}"))?;
    if watch.wal.is_some_and(|seen| seen != identity) {
        return Err(format!(
            "the WAL {} was replaced by another file while timevault held the database open",
            reader.path().display()
        ));
    }
    watch.wal = Some(identity);
    let Some(pos) = resume.wal else {
        return Ok(());
    };
    let header = *reader.header();
    if (header.salt1, header.salt2) != (pos.salt1, pos.salt2) {
        return Ok(()); // a restart: next_start decides whether it was expected
    }
    match reader.position_intact(&pos) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "the WAL {} no longer holds the frames timevault read (truncated or overwritten before frame {})",
            reader.path().display(),
            pos.frames
        )),
        Err(e) => Err(format!("the WAL cannot be read: {e}")),
    }
}

/// Where the next capture starts reading, given where the last one ended and the WAL now;
/// an error says why continuity cannot be proven.
pub(super) fn next_start(
    resume: &Resume,
    header: &WalHeader,
    generation_start: WalPosition,
) -> Result<WalPosition, String> {
    match resume.wal {
        None => Ok(generation_start),
        Some(pos) if (pos.salt1, pos.salt2) == (header.salt1, header.salt2) => Ok(pos),
        // SQLite restarts a WAL in place with salt1 + 1, read from the shared header, so every
        // process agrees; a WAL deleted and created again gets random salts. (The checkpoint
        // sequence is no such counter: a process that did not recover the WAL itself counts
        // from 0, so short-lived writers write 1 at every restart.) Only one restart can
        // follow timevault's checkpoint: a second needs the first's frames checkpointed,
        // which timevault's read transaction blocks.
        Some(pos) if resume.expect_restart && header.salt1 == pos.salt1.wrapping_add(1) => {
            Ok(generation_start)
        }
        Some(pos) if resume.expect_restart => Err(format!(
            "the WAL is not the one restart expected after timevault's checkpoint (salt {:08x} then {:08x}): it restarted more than once, or was deleted and created again",
            pos.salt1, header.salt1
        )),
        Some(_) => Err("the WAL restarted without timevault's checkpoint".to_string()),
    }
}

/// Whether capture can resume at `resume` in the WAL as it is now (after a restart of
/// timevault). While timevault was not running nothing pinned the WAL: an application's last
/// close may have checkpointed and removed it, or a writer restarted it.
///
/// `now` is the database file as it is. When it is exactly as timevault last left it fully
/// checkpointed (`resume.db_file`), nothing was checkpointed into it since, so every frame
/// written since is still in the WAL (a restart or a removal needs a full checkpoint first):
/// whatever the WAL holds is read. Otherwise the position itself must prove it: the frames
/// read are still in the file with the same checksum, or the WAL is the one restart after
/// timevault's checkpoint.
pub(super) fn on_resume(
    resume: &Resume,
    reader: Option<WalReader>,
    now: Option<super::DbFileMark>,
) -> Result<Resume, String> {
    let untouched = resume.db_file.is_some() && resume.db_file == now;
    // Untouched, and the WAL read is gone: the next WAL (whatever salts it gets) is read from
    // its start.
    let from_next_wal = Resume {
        wal: None,
        checkpoint_seq: 0,
        expect_restart: false,
        db_file: resume.db_file,
    };
    let Some(mut reader) = reader else {
        if untouched {
            return Ok(from_next_wal);
        }
        return Err("the WAL is gone and the database file is not as timevault left it: changes were checkpointed while timevault was not running (or it stopped without a clean shutdown)".into());
    };
    let Some(pos) = resume.wal else {
        if untouched {
            return Ok(from_next_wal);
        }
        return Err("the database file changed while timevault was not running and no WAL position proves what changed it".into());
    };
    let header = *reader.header();
    if (header.salt1, header.salt2) != (pos.salt1, pos.salt2) {
        if untouched {
            return Ok(from_next_wal); // nothing checkpointed since: this WAL holds every change
        }
        next_start(resume, &header, reader.start())?;
        return Ok(*resume); // the one expected restart, read from its start
    }
    match reader.verify_position(&pos) {
        Ok(true) => Ok(*resume),
        Ok(false) => Err("the WAL changed while timevault was not running".into()),
        Err(e) => Err(format!("the WAL cannot be read: {e}")),
    }
}
