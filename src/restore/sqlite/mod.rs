//! Rebuild a SQLite database: the snapshot's file image, its base frames, then every segment
//! captured at or before the instant, applied page by page; then `PRAGMA integrity_check`.
//!
//! The new file is built beside the target (mode 0600 while it is built, then the mode asked
//! for: the source file's, or 0600) and renamed over it only once it is checked. A target an
//! application may be using is refused, forced or not: a `-wal` or `-shm` file beside it (its
//! WAL may hold committed changes the file lacks, and would be applied to the restored file),
//! another process holding it open, or a lock on it. Stop the application first.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Connection, Row};

pub mod pages;
pub mod vfs;

use crate::catalog::{SnapshotManifest, SourceCatalog};
use crate::changelog::{Links, SegmentManifest};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::{ChunkRef, ReadPurpose, Repository};
use crate::restore::{RestoreOptions, RestoreSummary};
use crate::stored::sqlite::{apply_frames, SqliteSnapshotDetails, FRAME_FORMAT};

/// The mode of a restored file when none is asked for: readable by its owner only.
pub const RESTORED_MODE: u32 = 0o600;

/// Restore a SQLite source to `options.at` into the file `options.target`, mode 0600.
pub async fn restore_sqlite(repo: &Repository, options: &RestoreOptions) -> Result<RestoreSummary> {
    restore_sqlite_with_mode(repo, options, RESTORED_MODE).await
}

/// The mode a restore of the SQLite file at `source` should get: the source file's permission
/// bits (its owner always may read and write) when it can be read, else 0600.
pub fn mode_like(source: &Path) -> u32 {
    std::fs::metadata(source)
        .map(|m| (m.permissions().mode() & 0o777) | 0o600)
        .unwrap_or(RESTORED_MODE)
}

/// [`restore_sqlite`], the restored file getting permission bits `mode`.
pub async fn restore_sqlite_with_mode(
    repo: &Repository,
    options: &RestoreOptions,
    mode: u32,
) -> Result<RestoreSummary> {
    repo.reading(
        &[&options.source],
        ReadPurpose::Restore,
        restore_sqlite_with_mode_held(repo, options, mode),
    )
    .await?
}

/// [`restore_sqlite_with_mode`] under the read claim it takes.
async fn restore_sqlite_with_mode_held(
    repo: &Repository,
    options: &RestoreOptions,
    mode: u32,
) -> Result<RestoreSummary> {
    let started = Instant::now();
    let target = PathBuf::from(&options.target);
    // 1. Refuse an existing target unless forced, and a target in use, forced or not.
    if target.exists() && !options.force {
        return Err(Error::new(
            ErrorKind::TargetExists,
            format!("restore target {} already exists", target.display()),
        )
        .with_hint("choose a new path, or pass --force to replace it"));
    }
    check_not_in_use(&target)?;
    // 2. Plan: the chain and the segments up to the instant.
    let catalog = SourceCatalog::load_for(repo, &options.source, options.at).await?;
    let requested = catalog.resolve(options.at)?;
    let point = catalog.plan(requested)?;
    // 3. Build beside the target; remove the partial file on any failure.
    let partial = partial_path(&target);
    remove_db_files(&partial);
    let built = build(repo, &point.chain.snapshot.key, point.segments, &partial).await;
    let (transactions, bytes) = match built {
        Ok(v) => v,
        Err(e) => {
            remove_db_files(&partial);
            return Err(e.context(format!(
                "restore of {} to {}",
                options.source,
                target.display()
            )));
        }
    };
    // 4. Check integrity, give the file its mode, then move it over the target (checked
    // again: an application may have opened it meanwhile).
    let finished = async {
        integrity_check(&partial).await?;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(partial.display(), e))?;
        check_not_in_use(&target)
    };
    if let Err(e) = finished.await {
        remove_db_files(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &target).map_err(|e| Error::io(target.display(), e))?;
    sync_dir(&target);
    Ok(RestoreSummary {
        source: options.source.clone(),
        target: target.display().to_string(),
        requested,
        restored_to: point.effective,
        chain: point.chain.id().to_string(),
        segments_applied: point.segments.len(),
        transactions,
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Refuse a target an application may be using (see the module docs).
pub(crate) fn check_not_in_use(target: &Path) -> Result<()> {
    // Beside files left by a connection that closed without removing them (a read-only
    // reader cannot) are harmless when empty and unused; a WAL holding frames is changes not
    // yet in the file, which SQLite would replay onto the restored one.
    for suffix in ["-wal", "-shm"] {
        let side = with_suffix(target, suffix);
        let Ok(side_meta) = std::fs::metadata(&side) else {
            continue;
        };
        if let Some(pid) = process_holding(&side_meta) {
            return Err(in_use(
                target,
                format!("process {pid} has {} open", side.display()),
            ));
        }
        if suffix == "-wal" && side_meta.len() > 0 {
            return Err(in_use(
                target,
                format!(
                    "{} beside it holds changes not yet in the file",
                    side.display()
                ),
            ));
        }
    }
    let Ok(meta) = std::fs::metadata(target) else {
        return Ok(());
    };
    if let Some(pid) = process_holding(&meta) {
        return Err(in_use(target, format!("process {pid} has it open")));
    }
    if let Some(pid) = lock_holder(target) {
        return Err(in_use(target, format!("process {pid} holds a lock on it")));
    }
    Ok(())
}

fn in_use(target: &Path, why: String) -> Error {
    Error::input(format!(
        "restore target {} may be in use by an application: {why}",
        target.display()
    ))
    .with_hint(
        "stop the application using it (closing the database cleanly removes its -wal and -shm \
         files once their changes are in the file), then rerun; or restore to a new path. \
         --force never replaces a database in use",
    )
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Another process with a descriptor open on the file `meta` describes (Linux: its
/// `/proc/<pid>/fd`, for the processes this user may inspect).
fn process_holding(meta: &std::fs::Metadata) -> Option<u32> {
    let own = std::process::id();
    let processes = std::fs::read_dir("/proc").ok()?;
    processes
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != own)
        .find(|pid| {
            let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                return false;
            };
            fds.flatten().any(|fd| {
                std::fs::metadata(fd.path())
                    .is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
            })
        })
}

/// The process holding a POSIX (or open file description) lock on `path`, by `F_GETLK` on a
/// descriptor of our own (this process holds no lock on the file, so closing it drops none).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn lock_holder(path: &Path) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let file = File::open(path).ok()?;
    // SAFETY: flock is plain data; fcntl(F_GETLK) only writes into it.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: a valid descriptor and a valid flock for the call's duration.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut lock) };
    (rc == 0 && lock.l_type != libc::F_UNLCK as libc::c_short).then_some(lock.l_pid)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn lock_holder(_path: &Path) -> Option<i32> {
    None
}

fn partial_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".timevault-partial");
    target.with_file_name(name)
}

fn remove_db_files(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// What rebuilding a SQLite source at an instant reads, in order: the snapshot's image, then
/// its base frames and the frames of every segment captured at or before the instant. Shared by
/// the full restore and the lazy page image (`sqlite_pages`), so both apply the same frames.
pub(crate) struct ImageInputs {
    pub snapshot: SnapshotManifest,
    pub details: SqliteSnapshotDetails,
    /// Frame payloads to apply over the image, oldest first.
    pub frames: Vec<FramePayload>,
    pub transactions: u64,
    /// The image's and the payloads' bytes.
    pub bytes: u64,
}

/// One frame payload and the object it belongs to (named in errors).
pub(crate) struct FramePayload {
    pub object: String,
    pub chunks: Vec<ChunkRef>,
}

/// Read the snapshot manifest and the manifests of `segments` (checking their format).
pub(crate) async fn image_inputs(
    repo: &Repository,
    snapshot_key: &str,
    segments: &[crate::catalog::SegmentEntry],
) -> Result<ImageInputs> {
    let snapshot = SnapshotManifest::read(repo, snapshot_key).await?;
    let details: SqliteSnapshotDetails = snapshot.details()?;
    let mut frames = vec![FramePayload {
        object: snapshot_key.to_string(),
        chunks: details.base_frames.chunks.clone(),
    }];
    let (mut transactions, mut bytes) = (0, snapshot.bytes);
    let resume = serde_json::to_value(details.resume).expect("position serializes");
    let mut links = Links::new(snapshot_key, resume);
    for entry in segments {
        let segment = SegmentManifest::read(repo, &entry.key).await?;
        links.check(&entry.key, &segment)?;
        if segment.format != FRAME_FORMAT {
            return Err(Error::corrupt(format!(
                "segment {}: format {} is not {FRAME_FORMAT}",
                entry.key, segment.format
            )));
        }
        transactions += segment.transactions;
        bytes += segment.bytes;
        frames.push(FramePayload {
            object: entry.key.clone(),
            chunks: segment.chunks,
        });
    }
    Ok(ImageInputs {
        snapshot,
        details,
        frames,
        transactions,
        bytes,
    })
}

/// Write the snapshot image and apply base frames and segments; returns (transactions, bytes).
async fn build(
    repo: &Repository,
    snapshot_key: &str,
    segments: &[crate::catalog::SegmentEntry],
    path: &Path,
) -> Result<(u64, u64)> {
    let inputs = image_inputs(repo, snapshot_key, segments).await?;
    let snapshot = &inputs.snapshot;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display(), e))?;
    }
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .read(true)
        .mode(RESTORED_MODE)
        .open(path)
        .map_err(|e| Error::io(path.display(), e))?;
    let mut hasher = Sha256::new();
    repo.read_chunks(&snapshot.chunks, |data| {
        hasher.update(data);
        file.write_all(data)
            .map_err(|e| Error::io(path.display(), e))
    })
    .await?;
    if hex::encode(hasher.finalize()) != snapshot.sha256 {
        return Err(Error::corrupt(format!(
            "snapshot {snapshot_key}: the rebuilt image does not match its SHA-256"
        )));
    }
    let page_size = inputs.details.page_size;
    for payload in &inputs.frames {
        repo.read_chunks(&payload.chunks, |data| apply_frames(&file, page_size, data))
            .await?;
    }
    file.sync_all().map_err(|e| Error::io(path.display(), e))?;
    Ok((inputs.transactions, inputs.bytes))
}

/// `PRAGMA integrity_check` must answer `ok`.
pub async fn integrity_check(path: &Path) -> Result<()> {
    let options = SqliteConnectOptions::from_str("sqlite://")
        .map_err(|e| Error::other(e.to_string()))?
        .filename(path)
        .create_if_missing(false);
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| {
            Error::corrupt(format!(
                "restored database {} does not open: {e}",
                path.display()
            ))
        })?;
    let rows = sqlx::query("PRAGMA integrity_check")
        .fetch_all(&mut conn)
        .await
        .map_err(|e| {
            Error::corrupt(format!("integrity check of {}", path.display())).with_source(e)
        })?;
    let answers: Vec<String> = rows.iter().map(|r| r.get::<String, _>(0)).collect();
    // Fold the WAL the check may have created back into the file.
    let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    if answers != ["ok"] {
        return Err(Error::corrupt(format!(
            "restored database {} fails PRAGMA integrity_check: {}",
            path.display(),
            answers.join("; ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    /// A lock another process holds (sqlite3 inside `BEGIN IMMEDIATE` on a rollback-journal
    /// database) is seen through `F_GETLK`, and is gone once it ends; a file nobody holds
    /// shows none.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_lock_another_process_holds_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let created = Command::new("sqlite3")
            .arg(&db)
            .arg("CREATE TABLE t(x);")
            .status()
            .unwrap();
        assert!(created.success());
        assert_eq!(lock_holder(&db), None);
        let mut child = Command::new("sqlite3")
            .arg(&db)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "BEGIN IMMEDIATE; INSERT INTO t VALUES (1);").unwrap();
        stdin.flush().unwrap();
        let pid = child.id() as i32;
        let mut seen = None;
        for _ in 0..500 {
            seen = lock_holder(&db);
            if seen.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(seen, Some(pid));
        drop(stdin);
        child.wait().unwrap();
        assert_eq!(lock_holder(&db), None);
    }
}
