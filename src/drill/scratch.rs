//! One drill check: restore one point of one source into a scratch target, compare it with
//! what was recorded at backup time, and remove the target again.
//!
//! What each comparison proves is in docs/ARCHITECTURE.md ("Restore drills"). In short: every
//! restore authenticates every object it reads and checks the snapshot image's SHA-256; at a
//! snapshot (or scan) instant the drill also compares the rebuilt rows (or blobs) with the
//! checksums the snapshot recorded; between snapshots no checksum of that exact state exists,
//! so the check is the restore itself plus SQLite's integrity check or the blobs' SHA-256.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use sha2::{Digest, Sha256};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::Connection;

use super::{DrillCheck, PointKind};
use crate::catalog::rowsum::{sqlite_table_sums, RowSetHasher, TableSum};
use crate::catalog::SnapshotManifest;
use crate::config::{SourceConfig, SourceKind};
use crate::error::{Error, ErrorKind, Result};
use crate::pg_connection::{connect, quote_ident};
use crate::repo::store::{open_store, Store};
use crate::repo::{layout, Repository};
use crate::restore::postgres::restore_postgres_detailed;
use crate::restore::{restore_blobs, restore_sqlite, RestoreOptions, RestoreSummary};
use crate::source::postgres::scratch::Scratch;
use crate::stored::blobs::{key_path, ScanManifest};
use crate::stored::postgres::PostgresSnapshotDetails;
use crate::time::{self, At};

const AUTHENTICATED: &str = "every object read authenticated (AES-256-GCM)";

/// Restore `at` of `source` into a scratch target and check it. `exact`: `at` is a snapshot
/// (or scan) instant, so checksums recorded at backup time describe the expected state.
pub async fn restore_and_check(
    repo: &Repository,
    source: &SourceConfig,
    point: PointKind,
    at: DateTime<Utc>,
    exact: bool,
) -> DrillCheck {
    let mut check = new_check(point, at);
    let result = match source.kind() {
        SourceKind::Sqlite => sqlite(repo, source, at, exact, &mut check).await,
        SourceKind::Postgres => postgres(repo, source, at, exact, &mut check).await,
        SourceKind::Blobs => blobs(repo, source, at, exact, &mut check).await,
    };
    match result {
        Ok(()) => check.ok = true,
        Err(e) => check.error = Some(e.to_string()),
    }
    check
}

/// Restore the instant the live database was read at and compare every table with it.
pub async fn restore_and_compare_live(
    repo: &Repository,
    source: &SourceConfig,
    live: &crate::source::sqlite::LivePoint,
) -> DrillCheck {
    let mut check = new_check(PointKind::Live, live.at);
    match sqlite_live(repo, source, live, &mut check).await {
        Ok(()) => check.ok = true,
        Err(e) => check.error = Some(e.to_string()),
    }
    check
}

async fn sqlite_live(
    repo: &Repository,
    source: &SourceConfig,
    live: &crate::source::sqlite::LivePoint,
    check: &mut DrillCheck,
) -> Result<()> {
    let dir = scratch_dir()?;
    let target = dir.path().join(format!("{}.db", source.name));
    let started = Instant::now();
    let summary = restore_sqlite(
        repo,
        &options(source, live.at, target.display().to_string()),
    )
    .await?;
    note_restore(check, &summary, started);
    let actual = sqlite_sums(&target).await?;
    check.rows_checked = compare_sums(&live.sums, &actual).map_err(|e| {
        e.context(format!(
            "the restore of {} differs from the live database read at that instant",
            live.at.to_rfc3339()
        ))
    })?;
    check.verified.push(format!(
        "row checksums of {} tables equal the live database's, read at the restored instant",
        actual.len()
    ));
    Ok(())
}

fn new_check(point: PointKind, at: DateTime<Utc>) -> DrillCheck {
    DrillCheck {
        point,
        requested: at,
        restored_to: None,
        chain: None,
        rto_seconds: 0.0,
        bytes: 0,
        rows_checked: 0,
        objects_checked: 0,
        verified: Vec::new(),
        ok: false,
        error: None,
    }
}

fn options(source: &SourceConfig, at: DateTime<Utc>, target: String) -> RestoreOptions {
    RestoreOptions {
        source: source.name.clone(),
        at: At::Instant(at),
        target,
        force: false,
        jobs: None,
    }
}

fn note_restore(check: &mut DrillCheck, summary: &RestoreSummary, started: Instant) {
    check.rto_seconds = started.elapsed().as_secs_f64();
    check.restored_to = Some(summary.restored_to);
    check.chain = Some(summary.chain.clone());
    check.bytes = summary.bytes;
    check.verified.push(AUTHENTICATED.into());
}

fn scratch_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("timevault-drill-")
        .tempdir()
        .map_err(|e| Error::io("a temporary directory for the drill", e))
}

fn mismatch(message: String) -> Error {
    Error::new(ErrorKind::Verify, message)
        .with_hint("run `timevault verify --read-data`; restore from another point or replica")
}

/// Compare table checksums; returns the rows compared.
fn compare_sums(
    expected: &BTreeMap<String, TableSum>,
    actual: &BTreeMap<String, TableSum>,
) -> Result<u64> {
    for (table, want) in expected {
        match actual.get(table) {
            Some(got) if got == want => {}
            Some(got) => {
                return Err(mismatch(format!(
                    "table {table}: restored {} rows with checksum {}, the snapshot recorded {} rows with checksum {}",
                    got.rows, got.sum, want.rows, want.sum
                )))
            }
            None => {
                return Err(mismatch(format!(
                    "table {table} recorded in the snapshot is missing from the restore"
                )))
            }
        }
    }
    if let Some(extra) = actual.keys().find(|t| !expected.contains_key(*t)) {
        return Err(mismatch(format!(
            "table {extra} is in the restore but not in the snapshot's checksums"
        )));
    }
    Ok(expected.values().map(|s| s.rows).sum())
}

/// Whether the snapshot's checksums describe the restored state, and a note when not.
fn comparable(exact: bool, snapshot: &SnapshotManifest, later_changes: u64) -> Option<String> {
    if !exact {
        return Some(
            "no checksum exists for an instant between snapshots: restore checks only".into(),
        );
    }
    if snapshot.table_sums.is_empty() {
        return Some("snapshot predates recorded table checksums: restore checks only".into());
    }
    if later_changes > 0 {
        return Some(format!(
            "{later_changes} changes committed at the snapshot instant were replayed: checksums not comparable"
        ));
    }
    None
}

async fn sqlite(
    repo: &Repository,
    source: &SourceConfig,
    at: DateTime<Utc>,
    exact: bool,
    check: &mut DrillCheck,
) -> Result<()> {
    let dir = scratch_dir()?;
    let target = dir.path().join(format!("{}.db", source.name));
    let started = Instant::now();
    let summary = restore_sqlite(repo, &options(source, at, target.display().to_string())).await?;
    note_restore(check, &summary, started);
    check
        .verified
        .push("snapshot image SHA-256; PRAGMA integrity_check ok".into());
    let snapshot =
        SnapshotManifest::read(repo, &layout::snapshot(&source.name, &summary.chain)).await?;
    match comparable(exact, &snapshot, summary.segments_applied as u64) {
        Some(note) => check.verified.push(note),
        None => {
            let actual = sqlite_sums(&target).await?;
            check.rows_checked = compare_sums(&snapshot.table_sums, &actual)?;
            check.verified.push(format!(
                "row checksums of {} tables equal those recorded at backup time",
                actual.len()
            ));
        }
    }
    Ok(())
}

async fn sqlite_sums(path: &Path) -> Result<BTreeMap<String, TableSum>> {
    let options = SqliteConnectOptions::from_str("sqlite://")
        .map_err(|e| Error::other(e.to_string()))?
        .filename(path)
        .read_only(true);
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| {
            Error::corrupt(format!("restored database {}", path.display())).with_source(e)
        })?;
    let sums = sqlite_table_sums(&mut conn).await;
    let _ = conn.close().await;
    sums
}

async fn postgres(
    repo: &Repository,
    source: &SourceConfig,
    at: DateTime<Utc>,
    exact: bool,
    check: &mut DrillCheck,
) -> Result<()> {
    let scratch = Scratch::new(&source.url, "timevault_drill_")?;
    let target = scratch.url().to_string();
    let started = Instant::now();
    let checked = async {
        let restored =
            restore_postgres_detailed(repo, &options(source, at, target.clone())).await?;
        note_restore(check, &restored.summary, started);
        check
            .verified
            .push("snapshot rows SHA-256; schema, keys and constraints rebuilt".into());
        let snapshot = SnapshotManifest::read(
            repo,
            &layout::snapshot(&source.name, &restored.summary.chain),
        )
        .await?;
        match comparable(exact, &snapshot, restored.changes) {
            Some(note) => check.verified.push(note),
            None => {
                let details: PostgresSnapshotDetails = snapshot.details()?;
                let actual = postgres_sums(&target, &details).await?;
                let (expected, forgotten) =
                    without_forgotten(repo, &snapshot.key(), &snapshot.table_sums).await?;
                check.rows_checked = compare_sums(&expected, &actual)?;
                check.verified.push(format!(
                    "row checksums of {} tables equal those recorded at backup time",
                    actual.len()
                ));
                if forgotten > 0 {
                    check.verified.push(format!(
                        "less the rows of {forgotten} forgotten tenant(s), whose checksums `tenant forget` recorded"
                    ));
                }
            }
        }
        Ok::<_, Error>(())
    }
    .await;
    if let Err(e) = scratch.drop_database().await {
        tracing::warn!(source = %source.name, database = scratch.name(), error = %e, "could not drop the drill's scratch database");
    }
    checked
}

/// The snapshot's checksums less the rows of every forgotten tenant it held (their keys are
/// gone, so a restore leaves them out), and how many such tenants there were.
async fn without_forgotten(
    repo: &Repository,
    snapshot: &str,
    sums: &BTreeMap<String, TableSum>,
) -> Result<(BTreeMap<String, TableSum>, usize)> {
    let mut expected = sums.clone();
    let mut tenants = 0;
    for record in repo.forgotten().await?.tenants() {
        let Some(theirs) = record.table_sums.get(snapshot) else {
            continue;
        };
        tenants += 1;
        for (table, part) in theirs {
            let Some(less) = expected.get(table).and_then(|whole| whole.minus(part)) else {
                return Err(Error::corrupt(format!(
                    "snapshot {snapshot}: forgotten tenant {}'s checksum of {table} does not fit the snapshot's",
                    record.tenant
                )));
            };
            expected.insert(table.clone(), less);
        }
    }
    Ok((expected, tenants))
}

/// The same COPY text the snapshot hashed, read back from the restored database.
async fn postgres_sums(
    url: &str,
    details: &PostgresSnapshotDetails,
) -> Result<BTreeMap<String, TableSum>> {
    let mut conn = connect(url).await?;
    let mut sums = BTreeMap::new();
    for image in &details.tables {
        let columns: Vec<String> = image.columns.iter().map(|c| quote_ident(c)).collect();
        let sql = format!(
            "COPY (SELECT {} FROM ONLY {}.{}) TO STDOUT",
            columns.join(", "),
            quote_ident(&image.schema),
            quote_ident(&image.name)
        );
        let table = format!("{}.{}", image.schema, image.name);
        let read_error = |e: sqlx::Error| Error::other(format!("reading back {table}: {e}"));
        let mut hasher = RowSetHasher::default();
        let mut stream = conn.copy_out_raw(&sql).await.map_err(read_error)?;
        while let Some(data) = stream.try_next().await.map_err(read_error)? {
            hasher.add_lines(&data);
        }
        drop(stream);
        sums.insert(table, hasher.finish());
    }
    let _ = conn.close().await;
    Ok(sums)
}

async fn blobs(
    repo: &Repository,
    source: &SourceConfig,
    at: DateTime<Utc>,
    exact: bool,
    check: &mut DrillCheck,
) -> Result<()> {
    let dir = scratch_dir()?;
    let url = url::Url::from_directory_path(dir.path())
        .map_err(|_| Error::other("the scratch directory is not an absolute path"))?
        .to_string();
    let started = Instant::now();
    let summary = restore_blobs(repo, &options(source, at, url.clone()), &BTreeMap::new()).await?;
    note_restore(check, &summary, started);
    check
        .verified
        .push("every object's SHA-256 checked against its scan before it was written".into());
    let store = open_store(&url, &BTreeMap::new())?;
    let (objects, bytes) = count(&store).await?;
    if objects != summary.transactions || bytes != summary.bytes {
        return Err(mismatch(format!(
            "the scratch directory holds {objects} objects ({bytes} bytes), the restore wrote {} ({} bytes)",
            summary.transactions, summary.bytes
        )));
    }
    let base_only = summary.restored_to == at;
    if !exact || !base_only {
        check.verified.push(if exact {
            "versions from later scans were restored: compared with the restore's count only".into()
        } else {
            "between scans no listing describes the instant: compared with the restore's count only"
                .into()
        });
        return Ok(());
    }
    let manifest =
        ScanManifest::read(repo, &layout::manifest(&source.name, &time::compact(at))).await?;
    check.objects_checked = compare_listing(repo, &manifest, &store).await?;
    if check.objects_checked != objects {
        return Err(mismatch(format!(
            "the scan listed {} objects, the restore holds {objects}",
            check.objects_checked
        )));
    }
    check.verified.push(format!(
        "{objects} restored objects re-read: sizes and SHA-256 equal the scan's listing"
    ));
    Ok(())
}

async fn count(store: &Store) -> Result<(u64, u64)> {
    let metas: Vec<_> = store
        .list(None)
        .try_collect()
        .await
        .map_err(|e| Error::other("listing the scratch directory").with_source(e))?;
    Ok((metas.len() as u64, metas.iter().map(|m| m.size).sum()))
}

/// Re-read every object the scan listed from the scratch store (but a forgotten tenant's,
/// which the restore leaves out); returns the objects compared.
async fn compare_listing(repo: &Repository, manifest: &ScanManifest, store: &Store) -> Result<u64> {
    let forgotten = repo.forgotten().await?.chunk_ids();
    let mut entries = manifest.entries(repo);
    let mut compared = 0;
    while let Some(entry) = entries.next_entry().await? {
        if entry.chunks.iter().any(|c| forgotten.contains(&c.id)) {
            continue;
        }
        let read_error =
            |e: object_store::Error| mismatch(format!("restored object {}: {e}", entry.key));
        let mut stream = store
            .get(&key_path(&entry.key)?)
            .await
            .map_err(read_error)?
            .into_stream();
        let (mut hasher, mut size) = (Sha256::new(), 0u64);
        while let Some(data) = stream.try_next().await.map_err(read_error)? {
            hasher.update(&data);
            size += data.len() as u64;
        }
        if size != entry.size || hex::encode(hasher.finalize()) != entry.sha256 {
            return Err(mismatch(format!(
                "restored object {}: {size} bytes whose SHA-256 differs from the scan's ({} bytes)",
                entry.key, entry.size
            )));
        }
        compared += 1;
    }
    Ok(compared)
}
