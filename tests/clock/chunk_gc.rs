//! Chunk collection next to writers: a chunk an in-flight backup uploaded or claimed survives
//! prune; an unreferenced, unclaimed one goes only after the grace period; the chunk index of a
//! handle that pruned forgets deleted chunks; a replica that is down while pruning gets the
//! deletions later and `replicas sync` never copies removed objects back.
//!
//! Own test binary: the fake clock is process-wide.

use std::path::Path;

use bytes::Bytes;
use chrono::{DateTime, Duration, Utc};
use timevault::catalog::{SnapshotManifest, SnapshotReason};
use timevault::clock;
use timevault::config::Config;
use timevault::prune::{prune, PruneOptions, PruneSummary};
use timevault::repo::{ChunkRef, Repository, RetryPolicy, SyncOptions};
use timevault::ErrorKind;

fn write_config(dir: &Path, name: &str, north: &str, quorum: &str) -> Config {
    let text = format!(
        r#"
[repository]
key_file = "timevault.key"
write_quorum = {quorum}

[[replicas]]
name = "eu-west"
region = "westeurope"
url = "replicas/eu-west"

[[replicas]]
name = "eu-north"
region = "northeurope"
{north}

[[sources]]
name = "app"
kind = "sqlite"
url = "app.db"

[retention]
pitr = "10d"
chunk_grace = "1d"
"#
    );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}

fn both_up(dir: &Path) -> Config {
    write_config(
        dir,
        "timevault.toml",
        "url = \"replicas/eu-north\"",
        "\"all\"",
    )
}

async fn prune_at(repo: &Repository, config: &Config, now: DateTime<Utc>) -> PruneSummary {
    clock::set_offset(now - Utc::now());
    let options = PruneOptions {
        dry_run: false,
        now,
    };
    prune(repo, &config.sources, &config.retention, &options)
        .await
        .unwrap()
}

/// A snapshot manifest of source `app` at `at` referencing `chunks` (what a backup writes
/// last, after its chunks).
async fn snapshot(repo: &Repository, at: DateTime<Utc>, chunks: &[&str]) -> String {
    let m = SnapshotManifest {
        source: "app".into(),
        kind: "sqlite".into(),
        chain: timevault::time::compact(at),
        taken_at: at,
        reason: SnapshotReason::Initial,
        continues: None,
        bytes: 0,
        sha256: String::new(),
        chunks: chunks
            .iter()
            .map(|id| ChunkRef {
                id: id.to_string(),
                len: 1,
            })
            .collect(),
        details: serde_json::json!({}),
        table_sums: Default::default(),
    };
    m.write(repo).await.unwrap();
    m.key()
}

async fn exists(repo: &Repository, id: &str) -> bool {
    match repo.read_chunk(id).await {
        Ok(_) => true,
        Err(e) if e.kind() == ErrorKind::NotFound => false,
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_in_flight_survive_and_unreferenced_ones_go_after_the_grace() {
    let _clock = crate::clock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = both_up(dir.path());
    let t0 = Utc::now() - Duration::days(30);
    clock::set_offset(t0 - Utc::now());
    Repository::init(&config).await.unwrap();
    let writer = Repository::open(&config).await.unwrap();
    let pruner = Repository::open(&config).await.unwrap();
    let base = writer
        .put_chunk(Bytes::from_static(b"base"))
        .await
        .unwrap()
        .id;
    snapshot(&writer, t0, &[&base]).await;

    // 1. A backup in flight has uploaded `a` and not yet written its manifest; `orphan` was
    //    left by a job that failed.
    let a = writer
        .put_chunk(Bytes::from_static(b"in flight"))
        .await
        .unwrap()
        .id;
    let orphan = writer
        .put_chunk(Bytes::from_static(b"orphan"))
        .await
        .unwrap()
        .id;
    let s = prune_at(&pruner, &config, t0 + Duration::minutes(1)).await;
    assert_eq!(s.chunks.marked, 2, "{:?}", s.chunks);
    assert!(s.chunks.deleted.is_empty());
    let s = prune_at(&pruner, &config, t0 + Duration::hours(12)).await;
    assert_eq!(
        (s.chunks.waiting, s.chunks.deleted.len()),
        (2, 0),
        "inside the grace"
    );
    snapshot(&writer, t0 + Duration::hours(13), &[&base, &a]).await;

    // 2. After the grace: the referenced chunk stays, the orphan goes. The pruning handle
    //    indexed the orphan just before; after the prune it must not believe it still exists.
    clock::set_offset(t0 + Duration::hours(25) - Utc::now());
    pruner
        .put_chunk(Bytes::from_static(b"warm the index"))
        .await
        .unwrap();
    let s = prune_at(&pruner, &config, t0 + Duration::hours(25)).await;
    assert_eq!(s.chunks.deleted, vec![orphan.clone()]);
    assert!(
        exists(&pruner, &a).await,
        "a chunk referenced in time survives"
    );
    assert!(!exists(&pruner, &orphan).await);
    let again = pruner
        .put_chunk(Bytes::from_static(b"orphan"))
        .await
        .unwrap();
    assert!(
        again.uploaded > 0,
        "the index forgot the deleted chunk and uploaded it again"
    );

    // 3. A writer that deduplicates against a marked chunk claims it first: the sweep keeps it
    //    even though no manifest references it yet.
    let t1 = t0 + Duration::days(3);
    let c = writer
        .put_chunk(Bytes::from_static(b"reused later"))
        .await
        .unwrap()
        .id;
    prune_at(&pruner, &config, t1).await;
    clock::set_offset(t1 + Duration::hours(1) - Utc::now());
    let late_writer = Repository::open(&config).await.unwrap();
    let reused = late_writer
        .put_chunk(Bytes::from_static(b"reused later"))
        .await
        .unwrap();
    assert_eq!(
        (reused.id.clone(), reused.uploaded),
        (c.clone(), 0),
        "deduplicated"
    );
    let s = prune_at(&pruner, &config, t1 + Duration::hours(25)).await;
    assert!(
        !s.chunks.deleted.contains(&c),
        "a claimed chunk is not swept"
    );
    assert!(exists(&pruner, &c).await);
    snapshot(&late_writer, t1 + Duration::hours(26), &[&base, &a, &c]).await;
    let s = prune_at(&pruner, &config, t1 + Duration::hours(50)).await;
    assert!(!s.chunks.deleted.contains(&c));
    assert!(exists(&pruner, &c).await, "referenced now");

    // 4. While a sweep runs, a writer cannot claim a marked chunk: its job fails and retries.
    let t2 = t1 + Duration::days(3);
    let d = writer
        .put_chunk(Bytes::from_static(b"during a sweep"))
        .await
        .unwrap()
        .id;
    prune_at(&pruner, &config, t2).await;
    clock::set_offset(t2 + Duration::hours(1) - Utc::now());
    let third = Repository::open(&config).await.unwrap();
    assert!(pruner.begin_sweep().await.unwrap());
    let err = third
        .put_chunk(Bytes::from_static(b"during a sweep"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    pruner.end_sweep().await;
    assert_eq!(
        third
            .put_chunk(Bytes::from_static(b"during a sweep"))
            .await
            .unwrap()
            .id,
        d
    );

    // 5. A writer that loaded the marks before a sweep deleted the chunk claims it afterwards
    //    and writes it again instead of trusting its index.
    let t3 = t2 + Duration::days(3);
    let e = writer
        .put_chunk(Bytes::from_static(b"swept under a writer"))
        .await
        .unwrap()
        .id;
    prune_at(&pruner, &config, t3).await;
    clock::set_offset(t3 + Duration::hours(20) - Utc::now());
    let stale = Repository::open(&config).await.unwrap();
    stale
        .put_chunk(Bytes::from_static(b"load the index"))
        .await
        .unwrap();
    let s = prune_at(&pruner, &config, t3 + Duration::hours(25)).await;
    assert!(s.chunks.deleted.contains(&e), "{:?}", s.chunks);
    let again = stale
        .put_chunk(Bytes::from_static(b"swept under a writer"))
        .await
        .unwrap();
    assert!(again.uploaded > 0, "written again, not deduplicated");
    assert!(exists(&pruner, &e).await);
    clock::set_offset(Duration::zero());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_down_during_prune_gets_the_deletions_later_and_sync_does_not_resurrect() {
    let _clock = crate::clock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = both_up(dir.path());
    let now = Utc::now();
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let mut keys = Vec::new();
    for day in (0..30).rev() {
        let id = repo
            .put_chunk(Bytes::from(format!("day {day}")))
            .await
            .unwrap()
            .id;
        keys.push(
            snapshot(
                &repo,
                now - Duration::days(day) + Duration::minutes(1),
                &[&id],
            )
            .await,
        );
    }
    // eu-north is down for this prune: the same replica name over a location whose every
    // operation fails (its root turned into a plain file once the repository was opened).
    let down = write_config(dir.path(), "down.toml", "url = \"replicas/down\"", "1");
    let degraded = Repository::open_with(
        &down,
        None,
        RetryPolicy {
            attempts: 1,
            first_backoff: std::time::Duration::from_millis(1),
            max_backoff: std::time::Duration::from_millis(1),
        },
    )
    .await
    .unwrap();
    let down_root = dir.path().join("replicas/down");
    std::fs::remove_dir_all(&down_root).unwrap();
    std::fs::write(&down_root, b"not a directory").unwrap();
    let options = PruneOptions {
        dry_run: false,
        now,
    };
    let s = prune(&degraded, &down.sources, &down.retention, &options)
        .await
        .unwrap();
    let removed: Vec<String> = s.sources[0].removed.iter().map(|r| r.key.clone()).collect();
    assert_eq!(
        removed.len(),
        19,
        "the 11 snapshots of the last 10 days stay"
    );
    assert!(!s.is_complete());
    assert!(s.replica_failures.iter().all(|f| f.replica == "eu-north"));
    let west = dir.path().join("replicas/eu-west");
    let north = dir.path().join("replicas/eu-north");
    assert!(removed.iter().all(|k| !west.join(k).exists()));
    assert!(
        removed.iter().all(|k| north.join(k).exists()),
        "eu-north was down"
    );

    // eu-north is back: sync must not copy the removed snapshots back to eu-west.
    let repo = Repository::open(&config).await.unwrap();
    let synced = repo.sync_replicas(&SyncOptions::default()).await.unwrap();
    let copied: Vec<&String> = synced.replicas.iter().flat_map(|r| &r.copied).collect();
    assert!(removed.iter().all(|k| !copied.contains(&k)), "{copied:?}");
    assert!(removed.iter().all(|k| !west.join(k).exists()));

    // The next prune deletes them on eu-north too and drops the tombstone.
    let s = prune(&repo, &config.sources, &config.retention, &options)
        .await
        .unwrap();
    assert!(s.is_complete(), "{:?}", s.replica_failures);
    assert!(s.redeleted >= removed.len());
    assert!(removed.iter().all(|k| !north.join(k).exists()));
    assert!(repo.tombstoned_keys().await.unwrap().is_empty());
}
