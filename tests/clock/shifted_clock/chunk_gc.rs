//! Chunk collection next to writers: a chunk an in-flight backup uploaded or claimed survives
//! prune; an unreferenced, unclaimed one goes only after the grace period; the chunk index of a
//! handle that pruned forgets deleted chunks; a replica that is down while pruning gets the
//! deletions later and `replicas sync` never copies removed objects back. Sweeps over a
//! throttled S3 replica (moto behind `harness::Proxy`) while the fake clock runs fast: the
//! heartbeat keeps a sweep that outlasts the stale limit live, a claim written mid-sweep keeps
//! its chunk, a sweep whose marker was replaced stops; a writer whose index is older than half
//! the grace re-checks what it deduplicated before writing a manifest.
//!
//! Own test binary: the fake clock is process-wide.

use crate::config::{ConfigBuilder, Quorum};

use std::path::Path;

use bytes::Bytes;
use chrono::{DateTime, Duration, Utc};
use timevault::catalog::{SnapshotManifest, SnapshotReason};
use timevault::clock;
use timevault::config::Config;
use timevault::prune::{prune, PruneOptions, PruneSummary};
use timevault::repo::layout;
use timevault::repo::{ChunkRef, Repository, RetryPolicy, SyncOptions};
use timevault::ErrorKind;
use timevault_fixtures::harness::{s3, Proxy};

/// Two sites with eu-north at `north_url`, the SQLite source `app`, PITR 10 days and a chunk
/// grace of one day, written to `dir/name`.
fn write_config(dir: &Path, name: &str, north_url: &str, quorum: Quorum) -> Config {
    let path = ConfigBuilder::two_sites()
        .write_quorum(quorum)
        .replica("eu-north", "northeurope", north_url)
        .sqlite("app", "app.db")
        .retention("pitr", "10d")
        .retention("chunk_grace", "1d")
        .write_as(&dir.join(name));
    Config::load(&path).unwrap()
}

fn both_up(dir: &Path) -> Config {
    write_config(dir, "timevault.toml", "replicas/eu-north", Quorum::All)
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
        kind: timevault::config::SourceKind::Sqlite,
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
    let sweep = pruner.begin_sweep().await.unwrap().expect("no other sweep");
    let err = third
        .put_chunk(Bytes::from_static(b"during a sweep"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    pruner.end_sweep(sweep).await;
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
    let down = write_config(dir.path(), "down.toml", "replicas/down", Quorum::Count(1));
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

/// A repository whose one replica is a moto S3 bucket reached through a proxy the test
/// throttles, holding a base snapshot, `orphans` unreferenced chunks and `late` unreferenced
/// chunks whose ids sort after every orphan (a sweep deletes in id order: these go last), all
/// marked one minute after `t0`.
struct SlowRepo {
    _dir: tempfile::TempDir,
    proxy: Proxy,
    config: Config,
    /// The bucket, past the proxy (for the test's own looks and edits).
    direct: timevault::repo::store::Store,
    t0: DateTime<Utc>,
    orphans: usize,
    late: Vec<(Bytes, String)>,
}

/// Bytes per second that make a sweep of a few hundred chunks take seconds.
const THROTTLE: u64 = 6_000;

impl SlowRepo {
    async fn new(orphans: usize, late: usize) -> SlowRepo {
        let dir = tempfile::tempdir().unwrap();
        let server = s3();
        let bucket = server.create_bucket("repo").unwrap();
        let proxy = Proxy::start(server.port()).unwrap();
        let mut options = bucket.options.clone();
        options.insert("endpoint".into(), proxy.endpoint());
        let config = ConfigBuilder::new()
            .key_file("timevault.key")
            .replica_with("slow", "us-east-1", &bucket.url, &options)
            .sqlite("app", "app.db")
            .retention("pitr", "10d")
            .retention("chunk_grace", "1d")
            .load(dir.path());
        let direct = timevault::repo::store::open_store(&bucket.url, &bucket.options).unwrap();
        let t0 = Utc::now() - Duration::days(30);
        clock::set_offset(t0 - Utc::now());
        Repository::init(&config).await.unwrap();
        let repo = Repository::open(&config).await.unwrap();
        let base = repo
            .put_chunk(Bytes::from_static(b"base"))
            .await
            .unwrap()
            .id;
        snapshot(&repo, t0, &[&base]).await;
        // Candidates by id: the highest `late` ones go last in the sweep.
        let mut candidates: Vec<(String, Bytes)> = (0..orphans + late)
            .map(|i| {
                let data = Bytes::from(format!("unreferenced {i}"));
                (repo.chunk_id(&data), data)
            })
            .collect();
        candidates.sort();
        let late: Vec<(Bytes, String)> = candidates
            .split_off(orphans)
            .into_iter()
            .map(|(id, data)| (data, id))
            .collect();
        let all = candidates
            .iter()
            .map(|(_, d)| d)
            .chain(late.iter().map(|(d, _)| d));
        futures::future::try_join_all(all.map(|d| repo.put_chunk(d.clone())))
            .await
            .unwrap();
        let s = prune_at(&repo, &config, t0 + Duration::minutes(1)).await;
        assert_eq!(s.chunks.marked, orphans + late.len(), "{:?}", s.chunks);
        SlowRepo {
            _dir: dir,
            proxy,
            config,
            direct,
            t0,
            orphans,
            late,
        }
    }

    /// When the marks are ripe.
    fn sweep_time(&self) -> DateTime<Utc> {
        self.t0 + Duration::hours(25)
    }

    /// Start a prune that sweeps, throttled, as a task of its own.
    async fn spawn_sweeping_prune(
        &self,
    ) -> tokio::task::JoinHandle<timevault::Result<PruneSummary>> {
        clock::set_offset(self.sweep_time() - Utc::now());
        self.proxy.throttle(Some(THROTTLE));
        let repo = Repository::open(&self.config).await.unwrap();
        let config = self.config.clone();
        let options = PruneOptions {
            dry_run: false,
            now: self.sweep_time(),
        };
        tokio::spawn(
            async move { prune(&repo, &config.sources, &config.retention, &options).await },
        )
    }

    /// Chunks in the bucket, looked at past the proxy.
    async fn chunk_count(&self) -> usize {
        self.keys(layout::CHUNKS).await.len()
    }

    async fn keys(&self, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let prefix = object_store::path::Path::from(prefix.trim_end_matches('/'));
        self.direct
            .list(Some(&prefix))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap()
    }

    /// Wait until the sweep has deleted its first chunk.
    async fn until_deleting(&self) {
        let all = self.orphans + self.late.len() + 1;
        let started = std::time::Instant::now();
        while self.chunk_count().await >= all {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the sweep never started deleting"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Move the fake clock forward by `step` every 100 ms until stopped: a sweep lives through
/// hours while the test runs seconds, and, unlike one jump, time passes as it does for a
/// process that is not frozen.
fn run_clock_fast(
    step: Duration,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Sender<bool>,
) {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stopped.changed() => return,
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {
                    clock::set_offset(clock::now() + step - Utc::now());
                }
            }
        }
    });
    (task, stop)
}

/// Every chunk every snapshot manifest names reads back (what a restore needs).
async fn every_snapshot_restores(repo: &Repository) {
    for key in repo.list("snapshots/").await.unwrap() {
        let m = SnapshotManifest::read(repo, &key).await.unwrap();
        for chunk in &m.chunks {
            repo.read_chunk(&chunk.id)
                .await
                .unwrap_or_else(|e| panic!("{key}: chunk {}: {e}", chunk.id));
        }
    }
}

/// A snapshot manifest like [`snapshot`], its write's outcome returned.
async fn try_snapshot(
    repo: &Repository,
    at: DateTime<Utc>,
    chunks: &[&str],
) -> timevault::Result<String> {
    let m = SnapshotManifest {
        source: "app".into(),
        kind: timevault::config::SourceKind::Sqlite,
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
    m.write(repo).await.map(|_| m.key())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_outlasting_the_stale_limit_keeps_what_a_backup_deduplicated_and_every_restore_works(
) {
    let _clock = crate::clock().await;
    let slow = SlowRepo::new(150, 10).await;
    let prune_task = slow.spawn_sweeping_prune().await;
    slow.until_deleting().await;
    let begun = clock::now();
    // 1. Time runs at 20 minutes a second: the sweep outlasts the stale limit.
    let (ticker, stop) = run_clock_fast(Duration::minutes(2));
    while clock::now() - begun < timevault::repo::STALE_SWEEP + Duration::minutes(10) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!prune_task.is_finished(), "the sweep is still running");
    // 2. A backup deduplicates against the marked chunks that the sweep deletes last. With a
    //    live marker its claims fail (the job is retried); a claim must never let it rely on
    //    a chunk the sweep then deletes.
    let backup = Repository::open(&slow.config).await.unwrap();
    let mut refused = 0;
    for (data, id) in &slow.late {
        match backup.put_chunk(data.clone()).await {
            Ok(w) => assert_eq!(&w.id, id),
            Err(e) if e.kind() == ErrorKind::Unavailable => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    let outcome = prune_task.await.unwrap();
    stop.send(true).unwrap();
    ticker.await.unwrap();
    slow.proxy.throttle(None);
    let swept = outcome.unwrap();
    assert!(
        clock::now() - begun > timevault::repo::STALE_SWEEP,
        "the sweep outlasted the stale limit"
    );
    assert!(
        swept.chunks.deleted.len() >= slow.orphans,
        "{:?}",
        swept.chunks
    );
    // 3. The retried backup stores what it relies on and writes its manifest: every
    //    snapshot restores.
    let mut ids = Vec::new();
    for (data, _) in &slow.late {
        ids.push(backup.put_chunk(data.clone()).await.unwrap().id);
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    snapshot(&backup, clock::now(), &ids).await;
    every_snapshot_restores(&backup).await;
    assert!(refused > 0, "the marker stayed live past the stale limit");
    clock::set_offset(Duration::zero());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_written_mid_sweep_keeps_its_chunk() {
    let _clock = crate::clock().await;
    let slow = SlowRepo::new(150, 1).await;
    let (data, id) = slow.late[0].clone();
    let prune_task = slow.spawn_sweeping_prune().await;
    slow.until_deleting().await;
    // A writer claims the chunk the sweep deletes last: the claim is written, the running
    // sweep makes the writer back off, and the sweep's next batch sees the claim.
    let writer = Repository::open(&slow.config).await.unwrap();
    let err = writer.put_chunk(data.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let swept = prune_task.await.unwrap().unwrap();
    slow.proxy.throttle(None);
    assert!(!swept.chunks.deleted.contains(&id), "{:?}", swept.chunks);
    assert_eq!(swept.chunks.deleted.len(), slow.orphans);
    assert!(
        exists(&writer, &id).await,
        "a chunk claimed mid-sweep is kept"
    );
    clock::set_offset(Duration::zero());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_whose_marker_was_replaced_stops() {
    let _clock = crate::clock().await;
    let slow = SlowRepo::new(300, 0).await;
    let prune_task = slow.spawn_sweeping_prune().await;
    slow.until_deleting().await;
    // Another prune took the marker over (as one does that judged this sweep stale).
    use object_store::ObjectStoreExt;
    let marker = object_store::path::Path::from(layout::GC_SWEEPING);
    slow.direct.delete(&marker).await.unwrap();
    let other = Repository::open(&slow.config).await.unwrap();
    let took_over = other
        .begin_sweep()
        .await
        .unwrap()
        .expect("the marker was free");
    let err = prune_task.await.unwrap().unwrap_err();
    slow.proxy.throttle(None);
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(err.to_string().contains("replaced"), "{err}");
    let left = slow.chunk_count().await;
    // Two batches of `prune::gc::DELETE_BATCH` (64).
    assert!(
        left > 300 - 2 * 64,
        "at most the batch under way and one more were deleted: {left} left"
    );
    assert!(
        !slow.keys("catalog/gc/marks/").await.is_empty(),
        "a stopped sweep drops no mark"
    );
    // The stopped sweep left the other prune's marker alone.
    assert!(other.confirm_sweep(&took_over).await.is_ok());
    other.end_sweep(took_over).await;
    assert!(slow.keys(layout::GC_SWEEPING).await.is_empty());
    clock::set_offset(Duration::zero());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_with_an_old_index_rechecks_what_it_deduplicated_before_a_manifest() {
    let _clock = crate::clock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = both_up(dir.path());
    let t0 = Utc::now() - Duration::days(30);
    clock::set_offset(t0 - Utc::now());
    Repository::init(&config).await.unwrap();
    let pruner = Repository::open(&config).await.unwrap();
    let base = pruner
        .put_chunk(Bytes::from_static(b"base"))
        .await
        .unwrap()
        .id;
    snapshot(&pruner, t0, &[&base]).await;
    let x = pruner.put_chunk(Bytes::from_static(b"x")).await.unwrap().id;
    let y = pruner.put_chunk(Bytes::from_static(b"y")).await.unwrap().id;
    // 1. Two writers load their indexes before x and y are marked.
    let writer = Repository::open(&config).await.unwrap();
    let writer2 = Repository::open(&config).await.unwrap();
    for w in [&writer, &writer2] {
        w.put_chunk(Bytes::from_static(b"base")).await.unwrap();
    }
    prune_at(&pruner, &config, t0 + Duration::minutes(1)).await;
    // 2. Eleven hours in (their indexes not yet half a grace old) they deduplicate against
    //    y and x, not knowing they are marked.
    clock::set_offset(t0 + Duration::hours(11) - Utc::now());
    for (w, data) in [(&writer, &b"y"[..]), (&writer2, b"x")] {
        let w = w.put_chunk(Bytes::from(data)).await.unwrap();
        assert_eq!(w.uploaded, 0, "deduplicated");
    }
    // 3. Its manifest naming y, at 13 h: the index is over half a grace old, so y is checked
    //    and claimed first.
    let at = t0 + Duration::hours(13);
    clock::set_offset(at - Utc::now());
    try_snapshot(&writer, at, &[&base, &y]).await.unwrap();
    let (claimed, _) = pruner.chunk_keeps().await.unwrap();
    assert!(claimed.contains(&y), "claimed before the manifest");
    // 4. x was swept meanwhile (the writer's job outlasted the grace): its manifest fails
    //    instead of naming a chunk that is gone.
    let s = prune_at(&pruner, &config, t0 + Duration::hours(26)).await;
    assert!(s.chunks.deleted.contains(&x), "{:?}", s.chunks);
    let late = t0 + Duration::hours(27);
    clock::set_offset(late - Utc::now());
    let err = try_snapshot(&writer2, late, &[&base, &x])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains(&x), "{err}");
    assert!(
        pruner.list("snapshots/").await.unwrap().len() == 2,
        "no manifest written"
    );
    // 5. The retried job stores x again and its manifest goes through.
    let again = writer2.put_chunk(Bytes::from_static(b"x")).await.unwrap();
    assert!(again.uploaded > 0);
    try_snapshot(&writer2, late, &[&base, &x]).await.unwrap();
    every_snapshot_restores(&pruner).await;
    clock::set_offset(Duration::zero());
}
