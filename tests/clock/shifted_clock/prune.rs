//! Retention end to end: a year of daily snapshots and changes under a fake clock, pruned
//! every day like the daemon's `schedule.prune`; chunk collection next to writers in flight;
//! `prune --dry-run`; a replica that is down while pruning.

use crate::config::{ConfigBuilder, Quorum};

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Datelike, Duration, Utc};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use sqlx::{Connection, Executor, Row, SqliteConnection};
use timevault::catalog::SourceCatalog;
use timevault::clock;
use timevault::config::Config;
use timevault::prune::{prune, PruneOptions, PruneSummary};
use timevault::repo::Repository;
use timevault::restore::{restore_sqlite, RestoreOptions};
use timevault::source::sqlite::SqliteSource;
use timevault::time::At;
use timevault::ErrorKind;

const ROWS: i64 = 100;

/// A small WAL-mode database: `ROWS` rows of 1 KiB random payload.
async fn create_db(path: &Path) -> SqliteConnection {
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let mut conn = SqliteConnection::connect(&url).await.unwrap();
    conn.execute("PRAGMA journal_mode=WAL").await.unwrap();
    conn.execute(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, day INTEGER NOT NULL, payload BLOB NOT NULL)",
    )
    .await
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for id in 0..ROWS {
        let payload: Vec<u8> = (0..1024).map(|_| rng.gen()).collect();
        sqlx::query("INSERT INTO t VALUES (?, 0, ?)")
            .bind(id)
            .bind(payload)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    conn
}

/// One day's change: rewrite a few payloads (the snapshot changes) in one transaction.
async fn change(conn: &mut SqliteConnection, rng: &mut rand::rngs::StdRng, day: i64) {
    let mut tx = conn.begin().await.unwrap();
    for _ in 0..3 {
        let payload: Vec<u8> = (0..1024).map(|_| rng.gen()).collect();
        sqlx::query("UPDATE t SET day = ?, payload = ? WHERE id = ?")
            .bind(day)
            .bind(payload)
            .bind(rng.gen_range(0..ROWS))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

/// SHA-256 of the table's content, in key order.
async fn checksum(path: &Path) -> String {
    let url = format!("sqlite://{}?mode=ro", path.display());
    let mut conn = SqliteConnection::connect(&url).await.unwrap();
    let rows = sqlx::query("SELECT id, day, payload FROM t ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let mut h = Sha256::new();
    for r in rows {
        h.update(r.get::<i64, _>(0).to_be_bytes());
        h.update(r.get::<i64, _>(1).to_be_bytes());
        h.update(r.get::<Vec<u8>, _>(2));
    }
    hex::encode(h.finalize())
}

/// Two sites, the SQLite source `app`, PITR 35 days, monthly points for 5 years, audit
/// records for 400 days and a chunk grace of one day.
fn normal_config(dir: &Path) -> Config {
    ConfigBuilder::two_sites()
        .write_quorum(Quorum::All)
        .sqlite("app", "app.db")
        .retention("pitr", "35d")
        .retention("monthly", "5y")
        .retention("audit", "400d")
        .retention("chunk_grace", "1d")
        .load(dir)
}

/// Bytes stored under `dir` (both replicas).
fn stored_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            stored_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

/// Move the fake clock to `days` (and `hours`) before the system clock.
fn set_clock(days_ago: i64, hours: i64) {
    clock::set_offset(Duration::hours(hours) - Duration::days(days_ago));
}

/// An instant the source was captured at, and what it held then.
#[derive(Debug, Clone)]
struct Point {
    at: DateTime<Utc>,
    sum: String,
    snapshot: bool,
}

fn segment_time(key: &str) -> DateTime<Utc> {
    let name = key.rsplit('/').next().unwrap();
    let (_, captured, _) = timevault::repo::layout::segment_name(name).unwrap();
    timevault::time::parse_compact(captured).unwrap()
}

async fn restore_to(repo: &Repository, at: DateTime<Utc>, target: &Path) -> timevault::Result<()> {
    restore_sqlite(
        repo,
        &RestoreOptions {
            source: "app".into(),
            at: At::Instant(at),
            target: target.display().to_string(),
            force: true,
            jobs: None,
        },
    )
    .await
    .map(|_| ())
}

/// The points the policy promises at `now`: every capture of a chain that reaches into the
/// PITR window, and the newest snapshot of each UTC month before it (all within 5 years).
fn promised(
    points: &[Point],
    chains: &[(DateTime<Utc>, DateTime<Utc>)],
    now: DateTime<Utc>,
) -> Vec<bool> {
    let window = now - Duration::days(35);
    let mut newest_of_month: BTreeMap<(i32, u32), DateTime<Utc>> = BTreeMap::new();
    for p in points.iter().filter(|p| p.snapshot) {
        newest_of_month.insert((p.at.year(), p.at.month()), p.at);
    }
    points
        .iter()
        .map(|p| {
            let chain = chains
                .iter()
                .rev()
                .find(|(start, _)| *start <= p.at)
                .unwrap();
            chain.1 >= window
                || (p.snapshot && newest_of_month[&(p.at.year(), p.at.month())] == p.at)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_year_of_daily_backups_keeps_exactly_the_promised_points() {
    let _clock = crate::clock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let mut app = create_db(&db).await;
    let config = normal_config(dir.path());
    const DAYS: i64 = 365;
    set_clock(DAYS + 1, 0);
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let mut source = SqliteSource::open("app", &db, &repo).await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut points: Vec<Point> = Vec::new();
    let mut chains: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    let mut sizes = Vec::new();
    let mut last: Option<PruneSummary> = None;
    for day in 0..DAYS {
        // 02:00 snapshot, changes captured at 08:00 and 20:00, prune at 23:00.
        set_clock(DAYS - day, 2);
        let snap = source.snapshot(&repo).await.unwrap();
        if let Some(prev) = chains.last_mut() {
            prev.1 = snap.taken_at;
        }
        chains.push((snap.taken_at, snap.taken_at));
        points.push(Point {
            at: snap.taken_at,
            sum: checksum(&db).await,
            snapshot: true,
        });
        for hour in [8, 20] {
            change(&mut app, &mut rng, day).await;
            set_clock(DAYS - day, hour);
            let stats = source.capture(&repo).await.unwrap();
            let at = segment_time(stats.segment.as_deref().expect("a change was captured"));
            chains.last_mut().unwrap().1 = at;
            points.push(Point {
                at,
                sum: checksum(&db).await,
                snapshot: false,
            });
        }
        set_clock(DAYS - day, 23);
        let options = PruneOptions {
            dry_run: false,
            now: clock::now(),
        };
        let summary = prune(&repo, &config.sources, &config.retention, &options)
            .await
            .unwrap();
        assert!(summary.is_complete(), "{:?}", summary.replica_failures);
        last = Some(summary);
        if day % 30 == 0 || day == DAYS - 1 {
            sizes.push((day, stored_bytes(&dir.path().join("replicas"))));
        }
    }
    source.close(&repo).await.unwrap();
    println!("repository size (both replicas) by day, pruned daily:");
    for (day, bytes) in &sizes {
        println!("  day {day:3}: {:8.1} KiB", *bytes as f64 / 1024.0);
    }
    // Linear growth would add as much in the last 100 days as in the first 100.
    let at = |d: i64| sizes.iter().find(|(day, _)| *day >= d).unwrap().1 as i64;
    let (first_100, last_100) = (at(90) - at(0), at(DAYS - 1) - at(270));
    assert!(
        last_100 * 3 < first_100,
        "growth flattens: first 90 days +{first_100} bytes, last ~95 days +{last_100} bytes"
    );

    let now = last.unwrap().now;
    let keep = promised(&points, &chains, now);
    let catalog = SourceCatalog::load(&repo, "app").await.unwrap();
    let expected_chains = chains
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            keep[points
                .iter()
                .position(|p| p.at == chains[*i].0 && p.snapshot)
                .unwrap()]
        })
        .count();
    assert_eq!(
        catalog.chains.len(),
        expected_chains,
        "exactly the promised chains remain"
    );
    let calendar = catalog
        .chains
        .iter()
        .filter(|c| c.segments.is_empty())
        .count();
    // 365 days touch 12 or 13 calendar months; the newest snapshot of each month the 35-day
    // window reaches (up to three months when today is early in a month, as on 2 December)
    // keeps its segments, so 10 to 12 points are calendar-only (checked exactly above).
    assert!((10..=13).contains(&calendar), "monthly points: {calendar}");
    let target = dir.path().join("restored.db");
    let (mut restored, mut refused) = (0, 0);
    for (p, promised) in points.iter().zip(&keep) {
        let result = restore_to(&repo, p.at, &target).await;
        if *promised {
            result.unwrap_or_else(|e| panic!("promised point {} does not restore: {e}", p.at));
            assert_eq!(checksum(&target).await, p.sum, "point {}", p.at);
            restored += 1;
        } else {
            let err = result.expect_err(&format!("{} was pruned but restores", p.at));
            assert_eq!(err.kind(), ErrorKind::NotFound);
            assert!(err.to_string().contains("restorable:"), "{err}");
            refused += 1;
        }
    }
    println!("{restored} kept points restored exactly, {refused} pruned points refused");
    let err = restore_to(
        &repo,
        now - Duration::days(200) + Duration::hours(5),
        &target,
    )
    .await
    .unwrap_err();
    println!("a pruned instant: {err}");
    assert!(restored >= 35 * 3 + 11);
    clock::set_offset(Duration::zero());
}

/// The change-log keys of the source's oldest chain: those the catalog lists (tombstoned ones
/// left out) and those still stored.
async fn old_chain_segments(repo: &Repository, chain: &str) -> (Vec<String>, Vec<String>) {
    let catalog = SourceCatalog::load(repo, "app").await.unwrap();
    let listed = catalog
        .chains
        .iter()
        .filter(|c| c.snapshot.chain == chain)
        .flat_map(|c| c.segments.iter().map(|s| s.key.clone()))
        .collect();
    let prefix = format!(
        "{}{chain}/",
        timevault::repo::layout::changelog_prefix("app")
    );
    let stored = repo.list(&prefix).await.unwrap();
    (listed, stored)
}

/// Issue 19: a restore, export or drill in progress holds a read claim, and prune removes
/// nothing of the claimed source (its expired points go in a later prune). A claim whose
/// reader died (no heartbeat for `CLAIM_TTL`) holds nothing. A reader never plans what a
/// prune has tombstoned (the catalog leaves it out), so a claim taken after a prune's
/// tombstone cannot reach a chain being deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_claim_keeps_prune_off_the_source_until_it_ends() {
    use timevault::repo::{ReadPurpose, Tombstone};
    let _clock = crate::clock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let mut app = create_db(&db).await;
    let config = normal_config(dir.path());
    set_clock(100, 0);
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let mut source = SqliteSource::open("app", &db, &repo).await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    // An old chain with a captured change, ended 50 days ago (past the 35-day window: its
    // segments expire, the month's newest snapshot stays), and two younger chains.
    source.snapshot(&repo).await.unwrap();
    change(&mut app, &mut rng, 1).await;
    set_clock(100, 3);
    source.capture(&repo).await.unwrap();
    set_clock(50, 2);
    source.snapshot(&repo).await.unwrap();
    set_clock(1, 2);
    source.snapshot(&repo).await.unwrap();
    source.close(&repo).await.unwrap();
    set_clock(0, 0);
    let old_chain = SourceCatalog::load(&repo, "app").await.unwrap().chains[0]
        .snapshot
        .chain
        .clone();
    let (old_segments, _) = old_chain_segments(&repo, &old_chain).await;
    assert_eq!(old_segments.len(), 2, "{old_segments:?}");
    let options = || PruneOptions {
        dry_run: false,
        now: clock::now(),
    };

    // 1. Under a live claim (a restore of `app` in progress), nothing of `app` goes.
    let summary = repo
        .reading(&["app"], ReadPurpose::Restore, async {
            prune(&repo, &config.sources, &config.retention, &options()).await
        })
        .await
        .unwrap()
        .unwrap();
    let app_prune = &summary.sources[0];
    let why = app_prune
        .deferred
        .as_deref()
        .expect("the prune was deferred");
    assert!(why.contains("being read by restore on"), "{why}");
    assert_eq!(
        old_chain_segments(&repo, &old_chain).await,
        (old_segments.clone(), old_segments.clone())
    );

    // 2. A claim whose heartbeat is older than the TTL is a dead reader's: prune goes ahead.
    set_clock(0, -1);
    let summary = repo
        .reading(&["app"], ReadPurpose::Export, async {
            set_clock(0, 0);
            prune(&repo, &config.sources, &config.retention, &options()).await
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.sources[0].deferred, None);
    assert!(summary.is_complete(), "{:?}", summary.replica_failures);
    assert_eq!(
        old_chain_segments(&repo, &old_chain).await,
        (vec![], vec![])
    );
    // The dead claim itself is gone too (prune removes dead claims' objects).
    assert_eq!(
        repo.list(timevault::repo::layout::CLAIMS).await.unwrap(),
        Vec::<String>::new()
    );

    // 3. What a prune tombstoned (mid-way: written, not yet deleted) is not offered to a
    //    reader: the catalog leaves it out, so a restore planned now never reads it.
    let chains = SourceCatalog::load(&repo, "app").await.unwrap().chains;
    assert_eq!(chains.len(), 3);
    let old_snapshot = chains[0].snapshot.key.clone();
    repo.write_tombstone(&Tombstone {
        pruned_at: clock::now(),
        keys: vec![old_snapshot.clone()],
    })
    .await
    .unwrap();
    let chains = SourceCatalog::load(&repo, "app").await.unwrap().chains;
    assert_eq!(chains.len(), 2, "a tombstoned snapshot is still planned");
    assert_ne!(chains[0].snapshot.key, old_snapshot);
}
