//! The embedded default end to end, in process: SQLite snapshot, WAL capture, restore to
//! reference points, application checkpoints, and a daemon that was away.

use crate::common;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use common::{checksums, Env};
use timevault::catalog::SourceCatalog;
use timevault::repo::Repository;
use timevault::restore::{restore_sqlite, RestoreOptions};
use timevault::source::sqlite::SqliteSource;
use timevault::time::At;
use timevault::ErrorKind;
use timevault_fixtures::{StepKind, Workload};

async fn restore_at(
    repo: &Repository,
    env: &Env,
    at: At,
    name: &str,
) -> (std::path::PathBuf, timevault::restore::RestoreSummary) {
    let target = env.path().join("restored").join(name);
    let summary = restore_sqlite(
        repo,
        &RestoreOptions {
            source: "app".into(),
            at,
            target: target.display().to_string(),
            force: false,
            jobs: None,
        },
    )
    .await
    .unwrap();
    (target, summary)
}

/// A capture instant and the data the source held then.
struct Point {
    /// The newest restorable instant after the capture (a checkpoint's heartbeat may follow the
    /// data segment).
    at: DateTime<Utc>,
    /// When this state became restorable: the capture time of its first segment.
    begins: DateTime<Utc>,
    tables: BTreeMap<String, String>,
    kind: StepKind,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reference_point_restores_exactly() {
    let env = Env::new(7).await;
    let config = env.config();
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let mut source = SqliteSource::open("app", &env.db, &repo).await.unwrap();
    let first = source.snapshot(&repo).await.unwrap();
    let mut points = vec![Point {
        at: first.taken_at,
        begins: first.taken_at,
        tables: checksums(&env.db).await,
        kind: StepKind::Baseline,
    }];
    let mut app = env.app().await;
    let mut workload = Workload::new(7, 1).with_bulk_rows(50_000);
    for step in 0..12 {
        let point = workload.step(&mut app, None).await.unwrap();
        if step == 5 {
            // The application checkpoints on its own: timevault's read transaction keeps the
            // WAL from restarting, so nothing is lost.
            let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(match &mut app {
                    timevault_fixtures::Conn::Sqlite(c) => c,
                    _ => unreachable!(),
                })
                .await
                .unwrap();
        }
        let before = points.last().unwrap().at;
        let stats = source.capture(&repo).await.unwrap();
        assert!(
            stats.segment.is_some()
                || point.kind == StepKind::Baseline
                || point.kind == StepKind::BlobChurn
        );
        let catalog = SourceCatalog::load(&repo, "app").await.unwrap();
        let begins = catalog.chains[0]
            .segments
            .iter()
            .map(|s| s.captured_at)
            .find(|t| *t > before)
            .unwrap_or(before);
        points.push(Point {
            at: catalog.newest().unwrap(),
            begins,
            tables: point.tables.clone(),
            kind: point.kind,
        });
    }
    assert!(
        points.iter().any(|p| p.kind == StepKind::BulkInsert),
        "the workload includes the 50,000-row transaction"
    );
    assert_eq!(
        SourceCatalog::load(&repo, "app")
            .await
            .unwrap()
            .chains
            .len(),
        1,
        "one unbroken chain"
    );

    for (i, p) in points.iter().enumerate() {
        let (path, summary) = restore_at(&repo, &env, At::Instant(p.at), &format!("p{i}.db")).await;
        assert_eq!(
            checksums(&path).await,
            p.tables,
            "point {i} ({:?}) at {}",
            p.kind,
            p.at
        );
        assert!(summary.restored_to <= p.at);
        // An instant between two captures gives the earlier capture's state. The next state
        // begins with its first segment, which a checkpoint's heartbeat may follow by a while.
        if let Some(next) = points.get(i + 1).filter(|n| n.begins > p.at) {
            let mid = p.at + (next.begins - p.at) / 2;
            let (path, _) = restore_at(&repo, &env, At::Instant(mid), &format!("mid{i}.db")).await;
            assert_eq!(
                checksums(&path).await,
                p.tables,
                "between points {i} and {}",
                i + 1
            );
        }
    }
    let (latest, _) = restore_at(&repo, &env, At::Latest, "latest.db").await;
    assert_eq!(checksums(&latest).await, points.last().unwrap().tables);

    // A time before the first snapshot is refused with the window in the message.
    let err = restore_sqlite(
        &repo,
        &RestoreOptions {
            source: "app".into(),
            at: At::Instant(first.taken_at - chrono::Duration::hours(1)),
            target: env.path().join("never.db").display().to_string(),
            force: false,
            jobs: None,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("restorable"), "{err}");
    assert!(!env.path().join("never.db").exists());
    assert!(!env.path().join("never.db.timevault-partial").exists());
    source.close(&repo).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_target_is_refused_without_force() {
    let env = Env::new(8).await;
    let config = env.config();
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let mut source = SqliteSource::open("app", &env.db, &repo).await.unwrap();
    source.snapshot(&repo).await.unwrap();
    let target = env.path().join("exists.db");
    std::fs::write(&target, b"precious").unwrap();
    let options = RestoreOptions {
        source: "app".into(),
        at: At::Latest,
        target: target.display().to_string(),
        force: false,
        jobs: None,
    };
    let err = restore_sqlite(&repo, &options).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TargetExists);
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    let forced = RestoreOptions {
        force: true,
        ..options
    };
    restore_sqlite(&repo, &forced).await.unwrap();
    assert_eq!(checksums(&target).await, checksums(&env.db).await);
    source.close(&repo).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_was_away_starts_a_new_chain_and_the_gap_shows() {
    let env = Env::new(9).await;
    let config = env.config();
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let mut app = env.app().await;
    let mut workload = Workload::new(9, 1).with_bulk_rows(2_000);

    let mut source = SqliteSource::open("app", &env.db, &repo).await.unwrap();
    source.snapshot(&repo).await.unwrap();
    let before = workload.step(&mut app, None).await.unwrap();
    source.capture(&repo).await.unwrap();
    let before_at = SourceCatalog::load(&repo, "app")
        .await
        .unwrap()
        .newest()
        .unwrap();
    source.close(&repo).await.unwrap();

    // While timevault is away, the application writes and checkpoints the WAL away.
    workload.step(&mut app, None).await.unwrap();
    let conn = match &mut app {
        timevault_fixtures::Conn::Sqlite(c) => c,
        _ => unreachable!(),
    };
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut *conn)
        .await
        .unwrap();
    let during = workload.step(&mut app, None).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;

    let mut source = SqliteSource::open("app", &env.db, &repo).await.unwrap();
    assert!(!source.has_chain(), "continuity cannot be proven");
    assert!(source.continuity_lost().unwrap().contains("WAL"));
    let snap = source.snapshot(&repo).await.unwrap();
    assert!(matches!(
        snap.reason,
        timevault::catalog::SnapshotReason::ContinuityLost(_)
    ));
    let after = workload.step(&mut app, None).await.unwrap();
    source.capture(&repo).await.unwrap();

    let catalog = SourceCatalog::load(&repo, "app").await.unwrap();
    let windows = catalog.windows();
    assert_eq!(windows.len(), 2, "the gap shows: {windows:?}");
    let (p, _) = restore_at(&repo, &env, At::Instant(before_at), "before.db").await;
    assert_eq!(checksums(&p).await, before.tables);
    let (p, _) = restore_at(&repo, &env, At::Instant(snap.taken_at), "snap.db").await;
    assert_eq!(checksums(&p).await, during.tables);
    let (p, _) = restore_at(&repo, &env, At::Latest, "after.db").await;
    assert_eq!(checksums(&p).await, after.tables);
    let gap = windows[0].newest + (windows[1].oldest - windows[0].newest) / 2;
    let err = restore_sqlite(
        &repo,
        &RestoreOptions {
            source: "app".into(),
            at: At::Instant(gap),
            target: env.path().join("gap.db").display().to_string(),
            force: false,
            jobs: None,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    source.close(&repo).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_restart_continues_the_chain() {
    let env = Env::new(10).await;
    let config = env.config();
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let mut app = env.app().await;
    let mut workload = Workload::new(10, 1).with_bulk_rows(1_000);
    let mut source = SqliteSource::open("app", &env.db, &repo).await.unwrap();
    source.snapshot(&repo).await.unwrap();
    workload.step(&mut app, None).await.unwrap();
    source.close(&repo).await.unwrap();
    // Writes while stopped, without a checkpoint: the WAL still proves continuity.
    let point = workload.step(&mut app, None).await.unwrap();
    let mut source = SqliteSource::open("app", &env.db, &repo).await.unwrap();
    assert!(source.has_chain(), "{:?}", source.continuity_lost());
    source.capture(&repo).await.unwrap();
    let catalog = SourceCatalog::load(&repo, "app").await.unwrap();
    assert_eq!(catalog.chains.len(), 1);
    let (p, _) = restore_at(&repo, &env, At::Latest, "latest.db").await;
    assert_eq!(checksums(&p).await, point.tables);
    source.close(&repo).await.unwrap();
}
