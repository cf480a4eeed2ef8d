//! Retention on a PostgreSQL source (real PostgreSQL 15): three chains of the multi-tenant
//! fixture with changes captured in each, pruned as if 35 days had passed since the third
//! began. The first two chains go (snapshots, segments, and after the grace period the chunks
//! only they used); the third, inside the PITR window, stays whole, and every point of it still
//! restores exactly, although some of its tenant-grouped chunks are shared with the chains
//! pruned before it. Points of the pruned chains are refused with the window named.

use crate::common;

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use timevault::catalog::{SnapshotManifest, SourceCatalog};
use timevault::config::{RetentionConfig, SourceConfig};
use timevault::prune::{prune, PruneOptions};
use timevault::repo::Repository;
use timevault::restore::postgres::restore_postgres;
use timevault::restore::RestoreOptions;
use timevault::source::postgres::PostgresSource;
use timevault::time::At;
use timevault::ErrorKind;
use timevault_fixtures::harness::unique_name;
use timevault_fixtures::{
    generate_postgres, table_checksums, Conn, Database, GenerateOptions, Workload,
};

struct Point {
    at: DateTime<Utc>,
    tables: std::collections::BTreeMap<String, String>,
    chain: usize,
}

async fn restore_at(repo: &Repository, at: DateTime<Utc>) -> timevault::Result<String> {
    let target = crate::pg!().url(&unique_name("pruned").replace('-', "_"));
    restore_postgres(
        repo,
        &RestoreOptions {
            source: "db".into(),
            at: At::Instant(at),
            target: target.clone(),
            force: false,
            jobs: None,
        },
    )
    .await
    .map(|_| target)
}

async fn newest(repo: &Repository) -> DateTime<Utc> {
    SourceCatalog::load(repo, "db")
        .await
        .unwrap()
        .newest()
        .unwrap()
}

/// A snapshot (a new chain), then two workload steps, each captured.
async fn chain(
    repo: &Repository,
    source: &mut PostgresSource,
    app: &mut Conn,
    workload: &mut Workload,
    index: usize,
    points: &mut Vec<Point>,
) -> DateTime<Utc> {
    let snap = source.snapshot(repo).await.unwrap();
    points.push(Point {
        at: snap.taken_at,
        tables: table_checksums(app).await.unwrap(),
        chain: index,
    });
    for _ in 0..2 {
        let step = workload.step(app, None).await.unwrap();
        source.capture(repo).await.unwrap();
        points.push(Point {
            at: newest(repo).await,
            tables: step.tables,
            chain: index,
        });
    }
    snap.taken_at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_old_chains_keeps_the_window_whole_and_exact() {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::local_repo(dir.path()).await;
    let url = crate::pg!().create_database().await.unwrap();
    generate_postgres(&url, &GenerateOptions { seed: 61, scale: 1 })
        .await
        .unwrap();
    let mut app = Database::Postgres(url.clone()).connect().await.unwrap();
    let config = SourceConfig::postgres("db", &url, Default::default());
    let mut source = PostgresSource::open_configured(&config, None, &repo)
        .await
        .unwrap();
    let mut workload = Workload::new(61, 1).with_bulk_rows(500);
    let mut points = Vec::new();
    let mut starts = Vec::new();
    for index in 0..3 {
        starts.push(
            chain(
                &repo,
                &mut source,
                &mut app,
                &mut workload,
                index,
                &mut points,
            )
            .await,
        );
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    }

    // The chains share chunks (unchanged tenants' rows): the sweep must leave those.
    let before = SourceCatalog::load(&repo, "db").await.unwrap();
    let mut chunk_sets = Vec::new();
    for c in &before.chains {
        let manifest = SnapshotManifest::read(&repo, &c.snapshot.key)
            .await
            .unwrap();
        let ids: BTreeSet<String> = manifest.chunks.iter().map(|c| c.id.clone()).collect();
        chunk_sets.push(ids);
    }
    let shared = chunk_sets[0].intersection(&chunk_sets[2]).count();
    assert!(shared > 0, "the first and third snapshots share chunks");

    // 35 days after a moment just after the third chain began and the second ended (its last
    // segment, written at the rotation, holds commits up to the new snapshot and can be
    // stamped a little after the third chain's start): only the third touches the window.
    let second_end = before.chains[1].end().max(starts[2]);
    let now = second_end + Duration::milliseconds(500) + Duration::days(35);
    let retention = RetentionConfig {
        monthly: Some(std::time::Duration::from_secs(5 * 366 * 86_400)),
        ..RetentionConfig::default()
    };
    let options = PruneOptions {
        dry_run: false,
        now,
    };
    let first = prune(&repo, std::slice::from_ref(&config), &retention, &options)
        .await
        .unwrap();
    assert!(first.is_complete(), "{:?}", first.replica_failures);
    let removed = &first.sources[0].removed;
    assert!(
        removed.iter().any(|r| r.key.contains("snapshots/")) && removed.len() >= 6,
        "two chains' snapshots and segments go: {removed:?}"
    );
    let catalog = SourceCatalog::load(&repo, "db").await.unwrap();
    assert_eq!(catalog.chains.len(), 1, "only the third chain is left");
    assert_eq!(catalog.chains[0].start(), starts[2]);
    assert!(
        first.chunks.marked > 0,
        "chunks only the old chains used are marked"
    );

    // After the grace period the sweep deletes them; the kept chain's chunks stay.
    let later = PruneOptions {
        dry_run: false,
        now: now + Duration::days(2),
    };
    let second = prune(&repo, std::slice::from_ref(&config), &retention, &later)
        .await
        .unwrap();
    assert!(
        !second.chunks.deleted.is_empty(),
        "the sweep deleted the old chains' own chunks: {:?}",
        second.chunks
    );
    for p in &points {
        let restored = restore_at(&repo, p.at).await;
        if p.chain < 2 {
            let err = restored.expect_err("a pruned point is refused");
            assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
            assert!(
                err.to_string().contains("window"),
                "the window is named: {err}"
            );
            continue;
        }
        let target = restored.unwrap();
        let mut r = Database::Postgres(target).connect().await.unwrap();
        assert_eq!(
            table_checksums(&mut r).await.unwrap(),
            p.tables,
            "point at {} of the kept chain",
            p.at
        );
    }
    source.drop_slot().await.unwrap();
}
