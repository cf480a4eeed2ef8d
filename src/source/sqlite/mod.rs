//! The embedded default source: SQLite, backed up Litestream-style by shipping WAL frames.
//!
//! How nothing is missed (docs/ARCHITECTURE.md, "SQLite capture"):
//! * timevault keeps a read transaction open on its own connection. While it is held, no
//!   checkpoint can copy frames past it into the database file and the WAL cannot restart, so
//!   frames are only ever appended and can be read from the `-wal` file at leisure.
//! * Each capture reads the frames appended since the last position, up to the last commit
//!   frame, and stores them as one change-log segment stamped with the capture time.
//! * timevault checkpoints by itself, under the write lock (`BEGIN IMMEDIATE` on a second
//!   connection): ship everything, release the read transaction, checkpoint, re-open the read
//!   transaction, release the write lock. The next WAL restart is then expected.
//! * POSIX locks belong to the process, and closing *any* descriptor of a file drops all of
//!   them, including those SQLite's connections hold. So the database file is opened once, when
//!   the source opens, and read through that descriptor ([`SqliteSource::copy_file`]); nothing
//!   else in the process opens and closes it or its `-shm` while the source is open.
//! * Anything that cannot happen while those locks hold (a missing, replaced or truncated WAL,
//!   a restart timevault did not cause, a replaced database file, page 1 changed behind the
//!   WAL: [`continuity`]) means continuity is lost: it is logged, reported to the daemon
//!   ([`SqliteSource::take_loss`]), and the next step starts a new chain at once.

mod continuity;
pub mod wal;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode};
use sqlx::{Connection, Row};

use crate::catalog::{SnapshotManifest, SnapshotReason, SourceCatalog};
use crate::changelog::SegmentManifest;
use crate::error::{Error, ErrorKind, Result};
use crate::repo::{ChunkList, ChunkedWriter, Repository, DEFAULT_CHUNK};
pub use crate::stored::sqlite::{
    apply_frames, for_each_frame, DbFileMark, FrameRecord, Resume, SqliteSnapshotDetails,
    WalPosition, FRAME_FORMAT,
};
use crate::time;
use continuity::{next_start, Watch};
use wal::{FileIdentity, WalReader};

/// Checkpoint once the WAL holds this many frames.
const CHECKPOINT_FRAMES: u64 = 1000;
/// Size of the pieces a snapshot cuts the database file into (one chunk each, page-aligned).
/// Small, so that a reader of a few pages (a tenant export through the lazy page image,
/// `restore::sqlite_pages`) fetches little beyond them, and so that an unchanged range of pages
/// gives the same chunk id in the next snapshot. Older snapshots used 4 MiB pieces; readers take
/// the offsets from the chunk lengths, so both read alike. docs/FORMAT.md §4.1.
pub const IMAGE_PIECE: usize = 256 << 10;
/// Write an empty segment at least this often so an idle database's window keeps moving.
const HEARTBEAT: Duration = Duration::from_secs(30);

/// Capture progress within the current chain.
#[derive(Debug, Clone)]
struct ChainState {
    chain: String,
    seq: u64,
    resume: Resume,
    /// The end of the last segment written (or the snapshot's resume): the next one's start.
    written: Resume,
    last_segment_at: DateTime<Utc>,
}

/// What one capture did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CaptureStats {
    pub frames: u64,
    pub transactions: u64,
    pub bytes: u64,
    pub uploaded: u64,
    pub segment: Option<String>,
    /// The instant the written segment restores to.
    pub captured_at: Option<DateTime<Utc>>,
    pub checkpointed: bool,
}

/// The live database's checksums at an instant its change log restores exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct LivePoint {
    pub at: DateTime<Utc>,
    pub sums: std::collections::BTreeMap<String, crate::catalog::TableSum>,
}

/// What one snapshot did.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotStats {
    pub chain: String,
    pub taken_at: DateTime<Utc>,
    pub bytes: u64,
    pub uploaded: u64,
    pub reason: SnapshotReason,
}

/// A SQLite database being backed up.
pub struct SqliteSource {
    name: String,
    path: PathBuf,
    wal_path: PathBuf,
    /// The one descriptor of the database file timevault reads through, open for the source's
    /// life: closing any descriptor of it would drop SQLite's locks (module doc).
    db_file: Arc<std::fs::File>,
    db_identity: FileIdentity,
    /// Holds the read transaction that pins the WAL.
    reader: SqliteConnection,
    /// Takes the write lock during timevault's own checkpoints and snapshots.
    writer: SqliteConnection,
    /// Runs checkpoints (a connection inside a transaction cannot).
    checkpointer: SqliteConnection,
    state: Option<ChainState>,
    continuity_lost: Option<String>,
    /// A loss detected since the daemon last asked ([`SqliteSource::take_loss`]).
    new_loss: Option<String>,
    /// After a loss the connections may point at a replaced file or a deleted WAL: the next
    /// snapshot opens everything again first.
    needs_reopen: bool,
    watch: Watch,
}

async fn connect(path: &Path) -> Result<SqliteConnection> {
    let options = SqliteConnectOptions::from_str("sqlite://")
        .map_err(|e| Error::other(e.to_string()))?
        .filename(path)
        .create_if_missing(false)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    SqliteConnection::connect_with(&options).await.map_err(|e| {
        Error::new(
            ErrorKind::NotFound,
            format!("sqlite database {}: {e}", path.display()),
        )
        .with_hint("check the source url; the database must exist")
    })
}

/// Open the database file's one descriptor (read-only; never closed while the source is open).
fn open_db_file(path: &Path) -> Result<(Arc<std::fs::File>, FileIdentity)> {
    let file = std::fs::File::open(path).map_err(|e| {
        Error::new(
            ErrorKind::NotFound,
            format!("sqlite database {}: {e}", path.display()),
        )
        .with_hint("check the source url; the database must exist")
    })?;
    let meta = file.metadata().map_err(|e| Error::io(path.display(), e))?;
    Ok((Arc::new(file), FileIdentity::of(&meta)))
}

/// A connection to nothing, standing in for a closed one.
async fn in_memory() -> Result<SqliteConnection> {
    SqliteConnection::connect("sqlite::memory:")
        .await
        .map_err(|e| Error::other("opening an in-memory database").with_source(e))
}

fn db_error(path: &Path, what: &str, e: sqlx::Error) -> Error {
    Error::other(format!("sqlite {}: {what}: {e}", path.display()))
}

fn wal_error(e: impl std::fmt::Display) -> Error {
    Error::other(format!("reading the WAL: {e}"))
}

impl SqliteSource {
    /// Connect, put the database in WAL mode, pin the WAL, and find where capture resumes.
    pub async fn open(name: &str, path: &Path, repo: &Repository) -> Result<SqliteSource> {
        let wal_path = PathBuf::from(format!("{}-wal", path.display()));
        let (db_file, db_identity) = open_db_file(path)?;
        let mut source = SqliteSource {
            name: name.to_string(),
            path: path.to_path_buf(),
            wal_path,
            db_file,
            db_identity,
            reader: connect(path).await?,
            writer: connect(path).await?,
            checkpointer: connect(path).await?,
            state: None,
            continuity_lost: None,
            new_loss: None,
            needs_reopen: false,
            watch: Watch::default(),
        };
        source.begin_read().await?;
        source.resume(repo).await?;
        Ok(source)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when capture can continue the current chain; otherwise a snapshot is needed.
    pub fn has_chain(&self) -> bool {
        self.state.is_some()
    }

    /// Why the last chain cannot be continued, if it cannot.
    pub fn continuity_lost(&self) -> Option<&str> {
        self.continuity_lost.as_deref()
    }

    /// A continuity loss detected since the last call, once.
    pub fn take_loss(&mut self) -> Option<String> {
        self.new_loss.take()
    }

    async fn begin_read(&mut self) -> Result<()> {
        sqlx::query("BEGIN")
            .execute(&mut self.reader)
            .await
            .map_err(|e| db_error(&self.path, "begin read", e))?;
        sqlx::query("SELECT COUNT(*) FROM sqlite_master")
            .execute(&mut self.reader)
            .await
            .map_err(|e| db_error(&self.path, "pin the WAL", e))?;
        Ok(())
    }

    async fn end_read(&mut self) -> Result<()> {
        sqlx::query("ROLLBACK")
            .execute(&mut self.reader)
            .await
            .map_err(|e| db_error(&self.path, "end read", e))?;
        Ok(())
    }

    /// Pick up the newest chain where the last segment (or its snapshot) left it, if the WAL
    /// still proves that nothing was missed in between.
    async fn resume(&mut self, repo: &Repository) -> Result<()> {
        let catalog = SourceCatalog::load(repo, &self.name).await?;
        let Some(chain) = catalog.latest_chain() else {
            return Ok(());
        };
        let snapshot = SnapshotManifest::read(repo, &chain.snapshot.key).await?;
        let details: SqliteSnapshotDetails = snapshot.details()?;
        let (seq, resume, last_at) = match chain.segments.last() {
            Some(last) => {
                let seg = SegmentManifest::read(repo, &last.key).await?;
                let end: Resume = seg.end_position()?;
                (seg.seq, end, seg.captured_at)
            }
            None => (0, details.resume, snapshot.taken_at),
        };
        let reader = WalReader::open(&self.wal_path).map_err(wal_error)?;
        match continuity::on_resume(&resume, reader, DbFileMark::of(&self.path)) {
            Ok(from) => {
                self.state = Some(ChainState {
                    chain: chain.id().to_string(),
                    seq,
                    resume: from,
                    written: resume,
                    last_segment_at: last_at,
                });
            }
            Err(why) => {
                let _ = self.lose_continuity(why);
            }
        }
        Ok(())
    }

    /// Ship the frames committed since the last capture as one segment.
    pub async fn capture(&mut self, repo: &Repository) -> Result<CaptureStats> {
        let stats = self
            .capture_at(repo, time::micros(crate::clock::now()), false)
            .await?;
        if stats.checkpointed {
            return Ok(stats);
        }
        let frames = self
            .state
            .as_ref()
            .and_then(|s| s.resume.wal)
            .map_or(0, |p| p.frames);
        if frames >= CHECKPOINT_FRAMES {
            let mut more = self.checkpoint(repo).await?;
            more.frames += stats.frames;
            more.transactions += stats.transactions;
            more.bytes += stats.bytes;
            more.uploaded += stats.uploaded;
            more.segment = more.segment.or(stats.segment);
            return Ok(more);
        }
        Ok(stats)
    }

    /// Capture with an explicit timestamp; `force` writes a segment even when empty.
    async fn capture_at(
        &mut self,
        repo: &Repository,
        captured_at: DateTime<Utc>,
        force: bool,
    ) -> Result<CaptureStats> {
        let Some(state) = self.state.clone() else {
            return Err(
                Error::other(format!("source {}: no chain to capture into", self.name))
                    .with_hint("take a snapshot first (`timevault backup`)"),
            );
        };
        let reader = match self.checked_wal(&state.resume)? {
            Ok(Some(reader)) => reader,
            Ok(None) => return self.heartbeat(repo, &state, captured_at, force).await,
            Err(why) => return Err(self.lose_continuity(why)),
        };
        let header = *reader.header();
        let start = match next_start(&state.resume, &header, reader.start()) {
            Ok(start) => start,
            Err(why) => return Err(self.lose_continuity(why)),
        };
        let page_size = header.page_size as usize;
        let (end, frames, list, transactions) = ship_frames(repo, reader, start, page_size).await?;
        // An expected restart stays expected until the WAL moves on.
        let unchanged = frames == 0 && Some(start) == state.resume.wal;
        let end = Resume {
            wal: Some(end),
            checkpoint_seq: header.checkpoint_seq,
            expect_restart: unchanged && state.resume.expect_restart,
            // Appending frames leaves the file as it was (checkpoints are timevault's own).
            db_file: state.resume.db_file,
        };
        if frames == 0 && end == state.resume {
            return self.heartbeat(repo, &state, captured_at, force).await;
        }
        // Stamped once the frames were read: every transaction in the segment committed before
        // this instant, so a restore to T never holds a commit made after T. (A heartbeat keeps
        // the time before the read: nothing had committed since the last segment by then.)
        let captured_at = captured_at.max(time::micros(crate::clock::now()));
        let mut manifest = SegmentManifest {
            source: self.name.clone(),
            chain: state.chain.clone(),
            seq: state.seq + 1,
            captured_at,
            format: FRAME_FORMAT.into(),
            records: frames,
            transactions,
            bytes: 0,
            chunks: Vec::new(),
            start: serde_json::to_value(state.written).expect("position serializes"),
            end: serde_json::to_value(end).expect("position serializes"),
            linked: true,
            details: None,
            lease_epoch: repo.lease_epoch(&self.name),
        };
        manifest.set_payload(&list);
        manifest.write(repo).await?;
        let key = manifest.key();
        self.state = Some(ChainState {
            seq: manifest.seq,
            resume: end,
            written: end,
            last_segment_at: captured_at,
            ..state
        });
        Ok(CaptureStats {
            frames,
            transactions,
            bytes: list.bytes,
            uploaded: list.uploaded,
            segment: Some(key),
            captured_at: Some(captured_at),
            checkpointed: false,
        })
    }

    /// Nothing new: write an empty segment if forced or if the window has not moved lately.
    async fn heartbeat(
        &mut self,
        repo: &Repository,
        state: &ChainState,
        at: DateTime<Utc>,
        force: bool,
    ) -> Result<CaptureStats> {
        let due = (at - state.last_segment_at).to_std().unwrap_or_default() >= HEARTBEAT;
        if !force && !due {
            return Ok(CaptureStats::default());
        }
        let manifest = SegmentManifest {
            source: self.name.clone(),
            chain: state.chain.clone(),
            seq: state.seq + 1,
            captured_at: at,
            format: FRAME_FORMAT.into(),
            records: 0,
            transactions: 0,
            bytes: 0,
            chunks: Vec::new(),
            start: serde_json::to_value(state.written).expect("position serializes"),
            end: serde_json::to_value(state.resume).expect("position serializes"),
            linked: true,
            details: None,
            lease_epoch: repo.lease_epoch(&self.name),
        };
        manifest.write(repo).await?;
        let state = self.state.as_mut().expect("state exists");
        state.seq = manifest.seq;
        state.written = state.resume;
        state.last_segment_at = at;
        Ok(CaptureStats {
            segment: Some(manifest.key()),
            captured_at: Some(at),
            ..Default::default()
        })
    }

    /// Open the WAL and check that nothing happened behind SQLite's locks: `Ok(Err(why))` when
    /// continuity is lost, `Ok(Ok(None))` when there is no WAL header to read (and that is
    /// legitimate), `Err` when a file cannot be read at all.
    fn checked_wal(
        &mut self,
        resume: &Resume,
    ) -> Result<std::result::Result<Option<WalReader>, String>> {
        if let Err(why) = continuity::check_database(&self.path, self.db_identity)
            .and_then(|()| continuity::check_page1(&self.db_file, &self.watch))
        {
            return Ok(Err(why));
        }
        let exists = self.wal_path.symlink_metadata().is_ok();
        let Some(mut reader) = WalReader::open(&self.wal_path).map_err(wal_error)? else {
            return Ok(continuity::check_no_header(&self.wal_path, resume, exists).map(|()| None));
        };
        Ok(continuity::check_wal(&mut reader, resume, &mut self.watch).map(|()| Some(reader)))
    }

    /// The chain cannot continue: say so loudly, and make the next step start a new one from
    /// the files as they are now. Returns the error the failed capture reports.
    fn lose_continuity(&mut self, why: String) -> Error {
        tracing::error!(source = %self.name, reason = %why, "continuity lost; a new chain starts now");
        self.state = None;
        self.needs_reopen = true;
        self.watch = Watch::default();
        self.continuity_lost = Some(why.clone());
        self.new_loss = Some(why.clone());
        Error::other(format!("source {}: continuity lost: {why}", self.name)).with_hint(
            "a new snapshot starts a new chain at once; the gap shows in `timevault status`",
        )
    }

    /// Open the database file and the connections again (after a loss: the file may have been
    /// replaced, the WAL deleted). The old connections close first: a WAL deleted by hand is
    /// still described by `-shm`, and only a connection that finds no other one open rebuilds
    /// it (a new one beside the old would read frames that are gone). The old descriptor is
    /// closed only when it is of another file: closing one of this file would drop the new
    /// connections' locks.
    async fn reopen(&mut self) -> Result<()> {
        let current = std::fs::metadata(&self.path)
            .map(|m| FileIdentity::of(&m))
            .map_err(|e| Error::io(self.path.display(), e))?;
        for conn in [&mut self.reader, &mut self.writer, &mut self.checkpointer] {
            // An in-memory stand-in holds the field while the old connection closes.
            let old = std::mem::replace(conn, in_memory().await?);
            let _ = old.close().await;
        }
        if current != self.db_identity {
            (self.db_file, self.db_identity) = open_db_file(&self.path)?;
        }
        self.reader = connect(&self.path).await?;
        self.writer = connect(&self.path).await?;
        self.checkpointer = connect(&self.path).await?;
        self.begin_read().await?;
        self.needs_reopen = false;
        tracing::info!(source = %self.name, "database and WAL opened again for the new chain");
        Ok(())
    }

    /// Take the write lock so no application transaction can commit meanwhile.
    async fn lock_writers(&mut self) -> Result<()> {
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut self.writer)
            .await
            .map_err(|e| db_error(&self.path, "take the write lock", e))?;
        Ok(())
    }

    async fn unlock_writers(&mut self) -> Result<()> {
        sqlx::query("ROLLBACK")
            .execute(&mut self.writer)
            .await
            .map_err(|e| db_error(&self.path, "release the write lock", e))?;
        Ok(())
    }

    /// PASSIVE checkpoint; returns (frames in the WAL, frames checkpointed).
    async fn run_checkpoint(&mut self) -> Result<(i64, i64)> {
        let row = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&mut self.checkpointer)
            .await
            .map_err(|e| db_error(&self.path, "checkpoint", e))?;
        Ok((row.get::<i64, _>(1), row.get::<i64, _>(2)))
    }

    /// timevault's own checkpoint, under the write lock, so that the WAL restart that follows
    /// is known to lose nothing.
    async fn checkpoint(&mut self, repo: &Repository) -> Result<CaptureStats> {
        self.lock_writers().await?;
        let result = self.checkpoint_locked(repo).await;
        let unlocked = self.unlock_writers().await;
        let stats = result?;
        unlocked?;
        Ok(stats)
    }

    async fn checkpoint_locked(&mut self, repo: &Repository) -> Result<CaptureStats> {
        let mut stats = self
            .capture_at(repo, time::micros(crate::clock::now()), false)
            .await?;
        self.end_read().await?;
        let checkpoint = self.run_checkpoint().await;
        self.begin_read().await?;
        let (log, done) = checkpoint?;
        let complete = self.state.as_ref().is_some_and(|state| {
            let shipped = state.resume.wal.map_or(0, |p| p.frames as i64);
            log == shipped && done == log
        });
        self.guard_page1(complete).await?;
        let mark = complete.then(|| DbFileMark::of(&self.path)).flatten();
        if let Some(state) = self.state.as_mut() {
            state.resume.db_file = mark;
        }
        if complete {
            // Record that the coming WAL restart is ours, so a crash before the next capture
            // does not cost continuity.
            let state = self.state.as_mut().expect("checked above");
            state.resume.expect_restart = true;
            let state = state.clone();
            self.heartbeat(repo, &state, time::micros(crate::clock::now()), true)
                .await?;
        }
        stats.checkpointed = true;
        Ok(stats)
    }

    /// Take a snapshot: the current chain (if any) ends here and a new one starts.
    pub async fn snapshot(&mut self, repo: &Repository) -> Result<SnapshotStats> {
        // 1. A file replaced or a WAL lost behind SQLite's back: start from the files as they
        //    are now, not from what the old connections still hold.
        if let Some(resume) = self.state.as_ref().map(|s| s.resume) {
            if let Err(why) = self.checked_wal(&resume)? {
                let _ = self.lose_continuity(why);
            }
        }
        if self.needs_reopen {
            self.reopen().await?;
        }
        // 2. Under the write lock: end the old chain, checkpoint, note where capture resumes.
        self.lock_writers().await?;
        let result = self.snapshot_locked(repo).await;
        let unlocked = self.unlock_writers().await;
        let (taken_at, reason, continues, details, page_size) = match result {
            Ok(v) => v,
            Err(e) => return Err(e),
        };
        unlocked?;
        // The database file cannot change now: our read transaction blocks every checkpoint
        // from writing to it, and new commits only append to the WAL.
        let image = self.copy_file(repo, page_size).await?;
        // Still inside the read transaction begun under the write lock: the state at taken_at.
        let table_sums = crate::catalog::rowsum::sqlite_table_sums(&mut self.reader).await?;
        let chain = time::compact(taken_at);
        let manifest = SnapshotManifest {
            source: self.name.clone(),
            kind: crate::config::SourceKind::Sqlite,
            chain: chain.clone(),
            taken_at,
            reason: reason.clone(),
            continues,
            bytes: image.0.bytes,
            sha256: image.1,
            chunks: image.0.chunks.clone(),
            details: serde_json::to_value(&details).expect("details serialize"),
            table_sums,
        };
        manifest.write(repo).await?;
        self.state = Some(ChainState {
            chain: chain.clone(),
            seq: 0,
            resume: details.resume,
            written: details.resume,
            last_segment_at: taken_at,
        });
        self.continuity_lost = None;
        Ok(SnapshotStats {
            chain,
            taken_at,
            bytes: image.0.bytes,
            uploaded: image.0.uploaded + details.base_frames.uploaded,
            reason,
        })
    }

    /// The part of a snapshot done under the write lock: end the old chain, checkpoint, and
    /// capture any frames the checkpoint could not move into the database file.
    #[allow(clippy::type_complexity)]
    async fn snapshot_locked(
        &mut self,
        repo: &Repository,
    ) -> Result<(
        DateTime<Utc>,
        SnapshotReason,
        Option<String>,
        SqliteSnapshotDetails,
        u32,
    )> {
        let taken_at = time::micros(crate::clock::now());
        let (reason, continues) = match (&self.state, &self.continuity_lost) {
            (Some(state), _) => {
                let chain = state.chain.clone();
                match self.capture_at(repo, taken_at, true).await {
                    Ok(_) => (SnapshotReason::Rotation, Some(chain)),
                    Err(e) if self.state.is_none() => {
                        (SnapshotReason::ContinuityLost(e.to_string()), None)
                    }
                    Err(e) => return Err(e),
                }
            }
            (None, Some(why)) => (SnapshotReason::ContinuityLost(why.clone()), None),
            (None, None) => (SnapshotReason::Initial, None),
        };
        self.end_read().await?;
        let checkpoint = self.run_checkpoint().await;
        self.begin_read().await?;
        let (log, done) = checkpoint?;
        let page_size = self.page_size().await?;
        self.guard_page1(done == log).await?;
        let mut details = SqliteSnapshotDetails {
            page_size,
            base_frames: ChunkList::default(),
            resume: Resume::default(),
        };
        if let Some(mut reader) = WalReader::open(&self.wal_path).map_err(wal_error)? {
            self.watch.wal = reader.identity().ok();
            let start = reader.start();
            details.resume.checkpoint_seq = reader.header().checkpoint_seq;
            if done == log {
                // Everything is in the database file; the next WAL generation is new.
                let end = skip_frames(&mut reader, start).await?;
                details.resume.wal = Some(end);
                details.resume.expect_restart = true;
                details.resume.db_file = DbFileMark::of(&self.path);
            } else {
                // Another reader held the checkpoint back: keep the frames it could not move.
                let (end, _, list, _) =
                    ship_frames(repo, reader, start, page_size as usize).await?;
                details.base_frames = list;
                details.resume.wal = Some(end);
            }
        } else if done == log {
            details.resume.db_file = DbFileMark::of(&self.path);
        }
        Ok((taken_at, reason, continues, details, page_size))
    }

    async fn page_size(&mut self) -> Result<u32> {
        let row = sqlx::query("PRAGMA page_size")
            .fetch_one(&mut self.checkpointer)
            .await
            .map_err(|e| db_error(&self.path, "page size", e))?;
        Ok(row.get::<i64, _>(0) as u32)
    }

    /// Remember page 1 when every frame is in the database file (`complete`): until the next
    /// checkpoint of timevault's, nothing SQLite does can change the file (module doc).
    async fn guard_page1(&mut self, complete: bool) -> Result<()> {
        self.watch.page1 = None;
        if !complete {
            return Ok(());
        }
        let page_size = self.page_size().await?;
        let digest = continuity::page1_digest(&self.db_file, page_size)
            .map_err(|e| Error::io(self.path.display(), e))?;
        self.watch.page1 = Some((page_size, digest));
        Ok(())
    }

    /// Stream the database file into page-aligned chunks through the source's one descriptor
    /// (positioned reads on a blocking thread); returns the chunks and its SHA-256.
    async fn copy_file(&self, repo: &Repository, page_size: u32) -> Result<(ChunkList, String)> {
        let piece = IMAGE_PIECE - IMAGE_PIECE % page_size as usize;
        let mut writer = ChunkedWriter::new(repo, piece);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; piece];
        let mut offset = 0u64;
        loop {
            let file = self.db_file.clone();
            let (back, n) = tokio::task::spawn_blocking(move || {
                let n = read_full_at(&file, &mut buf, offset);
                (buf, n)
            })
            .await
            .map_err(|e| Error::other("database reader").with_source(e))?;
            buf = back;
            let n = n.map_err(|e| Error::io(self.path.display(), e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            writer.write_record(&buf[..n]).await?;
            offset += n as u64;
            if n < piece {
                break;
            }
        }
        Ok((writer.finish().await?, hex::encode(hasher.finalize())))
    }

    /// The live database's table checksums at an instant the change log restores exactly, for
    /// the restore drill's comparison with the live source. Under the write lock: everything
    /// committed is shipped (a segment stamped T), a read transaction opens on a connection of
    /// its own at that very state, the lock is released, and the checksums are read in that
    /// transaction while the application writes on. Application writers wait only for the
    /// capture, not for the checksums.
    pub async fn live_point(&mut self, repo: &Repository) -> Result<LivePoint> {
        self.lock_writers().await?;
        let pinned = self.pin_live_state(repo).await;
        let unlocked = self.unlock_writers().await;
        let (at, mut verifier) = pinned?;
        unlocked?;
        let sums = crate::catalog::rowsum::sqlite_table_sums(&mut verifier).await;
        // Closing a connection of SQLite's own is safe: SQLite keeps a descriptor open while
        // another of its connections holds a lock on the file.
        let _ = verifier.close().await;
        Ok(LivePoint { at, sums: sums? })
    }

    async fn pin_live_state(
        &mut self,
        repo: &Repository,
    ) -> Result<(DateTime<Utc>, SqliteConnection)> {
        let stats = self
            .capture_at(repo, time::micros(crate::clock::now()), true)
            .await?;
        let at = stats.captured_at.ok_or_else(|| {
            Error::other(format!("source {}: no segment to compare at", self.name))
        })?;
        let mut verifier = connect(&self.path).await?;
        sqlx::query("BEGIN")
            .execute(&mut verifier)
            .await
            .map_err(|e| db_error(&self.path, "begin the live read", e))?;
        sqlx::query("SELECT COUNT(*) FROM sqlite_master")
            .execute(&mut verifier)
            .await
            .map_err(|e| db_error(&self.path, "begin the live read", e))?;
        Ok((at, verifier))
    }

    /// Ship what is left and release the pinned WAL (clean shutdown).
    /// Under the write lock: everything is shipped and checkpointed, and the last segment
    /// records the database file as left (a [`DbFileMark`]), so the next start can tell a WAL
    /// removed by SQLite's last close from one whose frames were never read.
    pub async fn close(mut self, repo: &Repository) -> Result<()> {
        if self.state.is_some() {
            self.lock_writers().await?;
            let result = self.close_locked(repo).await;
            let unlocked = self.unlock_writers().await;
            result?;
            unlocked?;
        }
        let _ = self.end_read().await;
        Ok(())
    }

    async fn close_locked(&mut self, repo: &Repository) -> Result<()> {
        self.capture_at(repo, time::micros(crate::clock::now()), false)
            .await?;
        self.end_read().await?;
        let checkpoint = self.run_checkpoint().await;
        self.begin_read().await?;
        let (log, done) = checkpoint?;
        let path = self.path.clone();
        let Some(state) = self.state.as_mut() else {
            return Ok(());
        };
        let shipped = state.resume.wal.map_or(0, |p| p.frames as i64);
        let complete = log == shipped && done == log;
        state.resume.expect_restart |= complete && log > 0;
        state.resume.db_file = complete.then(|| DbFileMark::of(&path)).flatten();
        let state = state.clone();
        // Forced: the window then reaches the moment of shutdown even when idle.
        self.heartbeat(repo, &state, time::micros(crate::clock::now()), true)
            .await?;
        Ok(())
    }
}

/// Fill `buf` from `offset` (short only at the end of the file).
fn read_full_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read_at(&mut buf[filled..], offset + filled as u64)?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Read committed frames after `start` on a blocking thread and store them as chunks;
/// returns (end position, frames, chunks, transactions). One chunk of frames in memory.
async fn ship_frames(
    repo: &Repository,
    mut reader: WalReader,
    start: WalPosition,
    page_size: usize,
) -> Result<(WalPosition, u64, ChunkList, u64)> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    let read = tokio::task::spawn_blocking(move || {
        let mut transactions = 0u64;
        let result = reader.read_committed(&start, |frame| {
            let mut record = Vec::with_capacity(8 + frame.data.len());
            record.extend_from_slice(&frame.page_no.to_be_bytes());
            record.extend_from_slice(&frame.commit_size.to_be_bytes());
            record.extend_from_slice(&frame.data);
            if frame.commit_size != 0 {
                transactions += 1;
            }
            tx.blocking_send(record)
                .map_err(|_| "the uploader stopped".to_string())
        });
        result
            .map(|(end, n)| (end, n, transactions))
            .map_err(|e| e.to_string())
    });
    let record_len = 8 + page_size;
    let mut writer = ChunkedWriter::new(repo, DEFAULT_CHUNK - DEFAULT_CHUNK % record_len);
    let mut upload_error = None;
    while let Some(record) = rx.recv().await {
        if upload_error.is_none() {
            if let Err(e) = writer.write_record(&record).await {
                upload_error = Some(e);
            }
        }
    }
    let (end, frames, transactions) = read
        .await
        .map_err(|e| Error::other("WAL reader").with_source(e))?
        .map_err(wal_error)?;
    if let Some(e) = upload_error {
        return Err(e);
    }
    Ok((end, frames, writer.finish().await?, transactions))
}

/// The position after every committed frame, without storing them.
async fn skip_frames(reader: &mut WalReader, start: WalPosition) -> Result<WalPosition> {
    let (end, _) = reader
        .read_committed(&start, |_| Ok::<(), String>(()))
        .map_err(wal_error)?;
    Ok(end)
}
