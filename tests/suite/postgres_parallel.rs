//! The parallel snapshot on a real PostgreSQL 15 cluster: worker connections that join the
//! exported snapshot, a table split into several page ranges, writers running throughout.
//!
//! * Quiet database: the snapshot's table checksums (parts hashed on different connections and
//!   summed) equal the source's, and a restore at the snapshot instant equals the source.
//! * Writers during the snapshot: every transaction moves an amount between a row near the start
//!   of the split table and one near its end and logs the move, so a worker that saw another
//!   state than the others would break `balance = incoming - outgoing` in the restored database.
//!   Restores at the snapshot instant and at later captured instants keep the invariant and the
//!   later ones equal the source's checksums taken at that point. The restore at the snapshot
//!   instant holds no move logged after that instant (workers that did not join the exported
//!   snapshot copy later moves: checked by running the test without `SET TRANSACTION
//!   SNAPSHOT`, when it fails).

use crate::common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use sqlx::postgres::PgConnection;
use sqlx::Connection;
use timevault::catalog::rowsum::RowSetHasher;
use timevault::catalog::{SnapshotManifest, SourceCatalog, TableSum};
use timevault::repo::Repository;
use timevault::restore::postgres::restore_postgres_detailed;
use timevault::restore::RestoreOptions;
use timevault::source::postgres::{ParallelOptions, PostgresSnapshotDetails, PostgresSource};
use timevault::time::At;
use timevault_fixtures::harness::unique_name;
use timevault_fixtures::{generate_postgres, table_checksums, Database, GenerateOptions};

const ACCOUNTS: i64 = 20_000;

/// Restore into a new database on `jobs` connections (`None`: the default).
async fn restore(repo: &Repository, source: &str, at: At, jobs: Option<usize>) -> String {
    let target = crate::pg!().url(&unique_name("parallel").replace('-', "_"));
    restore_postgres_detailed(
        repo,
        &RestoreOptions {
            source: source.into(),
            at,
            target: target.clone(),
            force: false,
            jobs,
        },
    )
    .await
    .unwrap();
    target
}

async fn checksums(url: &str) -> BTreeMap<String, String> {
    let mut conn = Database::Postgres(url.to_string()).connect().await.unwrap();
    let sums = table_checksums(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    sums
}

/// The snapshot format's row checksums (FORMAT.md §8.3), read from a live database.
async fn row_sums(url: &str, details: &PostgresSnapshotDetails) -> BTreeMap<String, TableSum> {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let mut sums = BTreeMap::new();
    for image in &details.tables {
        let columns: Vec<String> = image.columns.iter().map(|c| format!("\"{c}\"")).collect();
        let sql = format!(
            "COPY (SELECT {} FROM ONLY \"{}\".\"{}\") TO STDOUT",
            columns.join(", "),
            image.schema,
            image.name
        );
        let mut hasher = RowSetHasher::default();
        let mut stream = conn.copy_out_raw(&sql).await.unwrap();
        while let Some(data) = stream.try_next().await.unwrap() {
            hasher.add_lines(&data);
        }
        drop(stream);
        sums.insert(format!("{}.{}", image.schema, image.name), hasher.finish());
    }
    conn.close().await.unwrap();
    sums
}

async fn create_ledger(url: &str) {
    let mut c = PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE ledger (id bigint PRIMARY KEY, balance bigint NOT NULL, filler text NOT NULL); \
         CREATE TABLE moves (seq bigserial PRIMARY KEY, src bigint NOT NULL, dst bigint NOT NULL, \
                             amount bigint NOT NULL, \
                             logged_at timestamptz NOT NULL DEFAULT clock_timestamp()); \
         INSERT INTO ledger SELECT g, 0, repeat(md5(g::text), 6) FROM generate_series(1, {ACCOUNTS}) g"
    )))
    .execute(&mut c)
    .await
    .unwrap();
    sqlx::raw_sql("VACUUM ANALYZE ledger")
        .execute(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
}

/// Rows whose balance differs from what the logged moves say (0 when consistent).
async fn inconsistent_rows(url: &str) -> i64 {
    let mut c = PgConnection::connect(url).await.unwrap();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger l LEFT JOIN ( \
            SELECT id, sum(delta)::int8 AS net FROM ( \
              SELECT dst AS id, amount AS delta FROM moves \
              UNION ALL SELECT src, -amount FROM moves) d GROUP BY id) m USING (id) \
         WHERE l.balance <> coalesce(m.net, 0)",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    c.close().await.unwrap();
    n
}

/// Moves logged after `at` (their transactions committed later still).
async fn moves_after(url: &str, at: chrono::DateTime<chrono::Utc>) -> i64 {
    let mut c = PgConnection::connect(url).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM moves WHERE logged_at > $1")
        .bind(at)
        .fetch_one(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    n
}

/// Moves between a row in the first 2,000 and one in the last 2,000 until stopped.
fn spawn_writer(
    url: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut c = PgConnection::connect(&url).await.unwrap();
        let mut i: i64 = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let src = 1 + (i * 7919) % 2000;
            let dst = ACCOUNTS - (i * 104_729) % 2000;
            let amount = 1 + i % 97;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "BEGIN; \
                 UPDATE ledger SET balance = balance - {amount} WHERE id = {src}; \
                 UPDATE ledger SET balance = balance + {amount} WHERE id = {dst}; \
                 INSERT INTO moves (src, dst, amount) VALUES ({src}, {dst}, {amount}); \
                 COMMIT"
            )))
            .execute(&mut c)
            .await
            .unwrap();
            done.fetch_add(1, Ordering::Relaxed);
        }
        c.close().await.unwrap();
    })
}

async fn manifest_details(
    repo: &Repository,
    source: &str,
) -> (SnapshotManifest, PostgresSnapshotDetails) {
    let catalog = SourceCatalog::load(repo, source).await.unwrap();
    let chain = catalog.latest_chain().unwrap();
    let manifest = SnapshotManifest::read(repo, &chain.snapshot.key)
        .await
        .unwrap();
    let details = serde_json::from_value(manifest.details.clone()).unwrap();
    (manifest, details)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_parts_equal_the_source_under_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::local_repo(dir.path()).await;
    let url = crate::pg!().create_database().await.unwrap();
    generate_postgres(&url, &GenerateOptions { seed: 5, scale: 1 })
        .await
        .unwrap();
    create_ledger(&url).await;
    let mut source = PostgresSource::open("par", &url, &repo).await.unwrap();
    source.set_parallel(ParallelOptions {
        workers: 3,
        split_pages: 64,
    });

    // 1. Quiet: the recorded checksums and a restore at the snapshot equal the source.
    let quiet = checksums(&url).await;
    let snap = source.snapshot(&repo).await.unwrap();
    let (manifest, details) = manifest_details(&repo, "par").await;
    assert!(
        snap.parts >= details.tables.len() + 4,
        "the ledger is split into several page ranges: {} parts for {} tables",
        snap.parts,
        details.tables.len()
    );
    assert_eq!(manifest.table_sums, row_sums(&url, &details).await);
    assert_eq!(manifest.table_sums["public.ledger"].rows, ACCOUNTS as u64);
    let target = restore(&repo, "par", At::Instant(snap.taken_at), None).await;
    assert_eq!(checksums(&target).await, quiet);

    // 2. Writers throughout the next snapshot (a rotation) and after it.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(url.clone(), stop.clone(), done.clone());
    while done.load(Ordering::Relaxed) < 50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = done.load(Ordering::Relaxed);
    let snap = source.snapshot(&repo).await.unwrap();
    let during = done.load(Ordering::Relaxed) - before;
    while done.load(Ordering::Relaxed) < before + during + 50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    source.capture(&repo).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    source.capture(&repo).await.unwrap();
    let after = checksums(&url).await;
    eprintln!(
        "{} parts, {during} transactions committed while the snapshot ran",
        snap.parts
    );

    // One connection, and three: the same rows either way.
    let at_snapshot = restore(&repo, "par", At::Instant(snap.taken_at), Some(1)).await;
    assert_eq!(inconsistent_rows(&at_snapshot).await, 0, "at the snapshot");
    // Nothing committed after the snapshot instant: a worker on a later state than the
    // snapshot's would have copied moves logged after it.
    assert!(moves_after(&url, snap.taken_at).await > 0);
    assert_eq!(
        moves_after(&at_snapshot, snap.taken_at).await,
        0,
        "the restore at the snapshot instant holds moves logged after it"
    );
    let catalog = SourceCatalog::load(&repo, "par").await.unwrap();
    let chain = catalog.latest_chain().unwrap();
    assert_eq!(chain.snapshot.taken_at, snap.taken_at);
    for (i, segment) in chain.segments.iter().enumerate() {
        let target = restore(&repo, "par", At::Instant(segment.captured_at), None).await;
        assert_eq!(inconsistent_rows(&target).await, 0, "segment {i}");
    }
    let latest = restore(&repo, "par", At::Latest, Some(3)).await;
    assert_eq!(checksums(&latest).await, after);
    assert_eq!(inconsistent_rows(&url).await, 0);
    source.drop_slot().await.unwrap();
}
