//! Rebuild a SQLite database: the snapshot's file image, its base frames, then every segment
//! captured at or before the instant, applied page by page; then `PRAGMA integrity_check`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Connection, Row};

use super::{RestoreOptions, RestoreSummary};
use crate::catalog::{SnapshotManifest, SourceCatalog};
use crate::changelog::{Links, SegmentManifest};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::{ChunkRef, Repository};
use crate::source::sqlite::{apply_frames, SqliteSnapshotDetails, FRAME_FORMAT};

/// Restore a SQLite source to `options.at` into the file `options.target`.
pub async fn restore_sqlite(repo: &Repository, options: &RestoreOptions) -> Result<RestoreSummary> {
    let started = Instant::now();
    let target = PathBuf::from(&options.target);
    // 1. Refuse an existing target unless forced.
    if target.exists() && !options.force {
        return Err(Error::new(
            ErrorKind::TargetExists,
            format!("restore target {} already exists", target.display()),
        )
        .with_hint("choose a new path, or pass --force to replace it"));
    }
    // 2. Plan: the chain and the segments up to the instant.
    let catalog = SourceCatalog::load(repo, &options.source).await?;
    let requested = catalog.resolve(options.at)?;
    let point = catalog.plan(requested)?;
    // 3. Build beside the target; remove the partial file on any failure.
    let partial = partial_path(&target);
    let _ = std::fs::remove_file(&partial);
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
    // 4. Check integrity, then move into place.
    if let Err(e) = integrity_check(&partial).await {
        remove_db_files(&partial);
        return Err(e);
    }
    if options.force {
        remove_db_files(&target);
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
    let details: SqliteSnapshotDetails = serde_json::from_value(snapshot.details.clone())
        .map_err(|e| Error::corrupt(format!("snapshot {snapshot_key}: {e}")))?;
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
        .map_err(|e| Error::corrupt(format!("integrity check of {}: {e}", path.display())))?;
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
