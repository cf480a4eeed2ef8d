//! The repository core on real files: two local replicas, failover, verify, sync, quorum and
//! leases.

use crate::common::config::{ConfigBuilder, Quorum};

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use timevault::archive::Kind;
use timevault::config::Config;
use timevault::repo::{Repository, RetryPolicy, SyncOptions, VerifyOptions};
use timevault::ErrorKind;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn replica_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("replicas").join(name)
    }

    fn config(&self, quorum: Quorum) -> Config {
        ConfigBuilder::two_sites()
            .write_quorum(quorum)
            .lease_ttl("2s")
            .parse(self.dir.path())
    }

    async fn open(&self, config: &Config) -> Repository {
        Repository::open_with(config, None, fast_retry())
            .await
            .unwrap()
    }
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 2,
        first_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
    }
}

fn object_path(replica: &Path, key: &str) -> PathBuf {
    replica.join(key)
}

#[tokio::test]
async fn init_creates_key_and_is_idempotent() {
    let fx = Fixture::new();
    let config = fx.config(Quorum::All);
    let first = Repository::init(&config).await.unwrap();
    assert!(first.created && first.key_generated);
    assert_eq!(first.replicas_written.len(), 2);
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(fx.dir.path().join("timevault.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);
    let again = Repository::init(&config).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.repository_id, first.repository_id);
    assert!(again.replicas_written.is_empty());

    // A replica that lost its config gets it back from init.
    std::fs::remove_file(fx.replica_dir("eu-north").join("config")).unwrap();
    let refill = Repository::init(&config).await.unwrap();
    assert_eq!(refill.replicas_written, vec!["eu-north".to_string()]);
}

#[tokio::test]
async fn wrong_key_is_reported_as_wrong_key() {
    let fx = Fixture::new();
    let config = fx.config(Quorum::All);
    Repository::init(&config).await.unwrap();
    std::fs::write(fx.dir.path().join("timevault.key"), "11".repeat(32)).unwrap();
    let err = Repository::open(&config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Key, "{err}");
    assert!(err.to_string().contains("wrong key"), "{err}");
    let err = Repository::init(&config).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::Key,
        "init with another key refuses: {err}"
    );
}

#[tokio::test]
async fn missing_repository_says_to_init() {
    let fx = Fixture::new();
    let err = Repository::open(&fx.config(Quorum::All)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.hint().unwrap().contains("timevault init"));
}

#[tokio::test]
async fn chunks_dedupe_and_read_back_after_loss_on_one_replica() {
    let fx = Fixture::new();
    let config = fx.config(Quorum::All);
    Repository::init(&config).await.unwrap();
    let repo = fx.open(&config).await;
    let data = Bytes::from(vec![7u8; 300_000]);
    let first = repo.put_chunk(data.clone()).await.unwrap();
    assert!(first.uploaded > 0);
    let again = repo.put_chunk(data.clone()).await.unwrap();
    assert_eq!(again.uploaded, 0, "an existing chunk uploads nothing");
    // A fresh process learns what exists by listing.
    let fresh = fx.open(&config).await;
    assert_eq!(fresh.put_chunk(data.clone()).await.unwrap().uploaded, 0);

    let key = timevault::repo::layout::chunk(&first.id);
    std::fs::remove_file(object_path(&fx.replica_dir("eu-west"), &key)).unwrap();
    assert_eq!(repo.read_chunk(&first.id).await.unwrap(), data.to_vec());

    // Corrupt the other copy too: now the read fails as corruption, naming the replicas.
    let north = object_path(&fx.replica_dir("eu-north"), &key);
    let mut bytes = std::fs::read(&north).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&north, bytes).unwrap();
    let err = repo.read_chunk(&first.id).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("eu-north") && err.to_string().contains("eu-west"));
}

#[tokio::test]
async fn verify_reports_exactly_the_damage_and_sync_repairs_it() {
    let fx = Fixture::new();
    let config = fx.config(Quorum::All);
    Repository::init(&config).await.unwrap();
    let repo = fx.open(&config).await;
    let mut ids = Vec::new();
    for i in 0..6u8 {
        ids.push(
            repo.put_chunk(Bytes::from(vec![i; 70_000 + i as usize]))
                .await
                .unwrap()
                .id,
        );
    }
    repo.write_object(Kind::Snapshot, "snapshots/app/s1", b"manifest".to_vec())
        .await
        .unwrap();
    let clean = repo
        .verify(&VerifyOptions {
            read_data: true,
            replica: None,
        })
        .await
        .unwrap();
    assert!(clean.is_clean(), "{clean:?}");
    assert_eq!(clean.replicas[0].checked, 8, "6 chunks, 1 snapshot, config");

    let deleted = timevault::repo::layout::chunk(&ids[1]);
    let corrupted = timevault::repo::layout::chunk(&ids[4]);
    std::fs::remove_file(object_path(&fx.replica_dir("eu-west"), &deleted)).unwrap();
    let path = object_path(&fx.replica_dir("eu-north"), &corrupted);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();

    // Without --read-data only the missing object shows.
    let quick = repo.verify(&VerifyOptions::default()).await.unwrap();
    assert_eq!(quick.replicas[0].missing, vec![deleted.clone()]);
    assert!(quick.replicas[1].is_clean());

    let report = repo
        .verify(&VerifyOptions {
            read_data: true,
            replica: None,
        })
        .await
        .unwrap();
    assert!(!report.is_clean());
    let west = &report.replicas[0];
    let north = &report.replicas[1];
    assert_eq!(west.missing, vec![deleted.clone()]);
    assert!(west.damaged.is_empty());
    assert!(north.missing.is_empty());
    assert_eq!(north.damaged.len(), 1);
    assert_eq!(north.damaged[0].0, corrupted);

    // Reads still succeed through failover.
    for id in &ids {
        repo.read_chunk(id).await.unwrap();
    }

    let summary = repo.sync_replicas(&SyncOptions::default()).await.unwrap();
    assert!(summary.is_complete(), "{summary:?}");
    assert_eq!(summary.replicas[0].copied, vec![deleted]);
    assert_eq!(summary.replicas[1].repaired, vec![corrupted]);
    let after = repo
        .verify(&VerifyOptions {
            read_data: true,
            replica: None,
        })
        .await
        .unwrap();
    assert!(after.is_clean(), "{after:?}");
    let again = repo.sync_replicas(&SyncOptions::default()).await.unwrap();
    assert_eq!(again.objects_written(), 0);
}

/// Make a replica unwritable: replace its directory with a file (root ignores permissions).
fn break_replica(dir: &Path) -> PathBuf {
    let aside = dir.with_extension("aside");
    std::fs::rename(dir, &aside).unwrap();
    std::fs::write(dir, b"not a directory").unwrap();
    aside
}

fn heal_replica(dir: &Path, aside: &Path) {
    std::fs::remove_file(dir).unwrap();
    std::fs::rename(aside, dir).unwrap();
}

#[tokio::test]
async fn quorum_all_fails_cleanly_when_a_replica_is_unwritable() {
    let fx = Fixture::new();
    let config = fx.config(Quorum::All);
    Repository::init(&config).await.unwrap();
    let repo = fx.open(&config).await;
    let north = fx.replica_dir("eu-north");
    let aside = break_replica(&north);
    let err = repo
        .write_object(Kind::Snapshot, "snapshots/app/s2", b"x".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.to_string().contains("replica eu-north"), "{err}");
    assert!(err.to_string().contains("1 of the 2"), "{err}");
    // No copy of the manifest is left behind on the healthy replica.
    assert!(!fx.replica_dir("eu-west").join("snapshots/app/s2").exists());
    // A chunk is different: content-addressed, another writer may already count on the copy
    // (it deduplicated against it), so a failed chunk write leaves it for garbage collection.
    let err = repo
        .put_chunk(Bytes::from_static(b"a chunk written while north is down"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    let chunks = fx.replica_dir("eu-west").join("chunks");
    let kept = walk(&chunks);
    assert_eq!(
        kept.len(),
        1,
        "the healthy replica keeps its copy: {kept:?}"
    );
    heal_replica(&north, &aside);
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// An object under `chunks/` that is not a chunk is reported by `verify`'s catalog check and
/// never breaks a listing (it panicked the chunk index before: `chunks/x` has no 2-digit dir).
#[tokio::test]
async fn a_stray_object_under_chunks_is_reported_not_a_panic() {
    let fx = Fixture::new();
    let config = fx.config(Quorum::All);
    Repository::init(&config).await.unwrap();
    let repo = fx.open(&config).await;
    let stray = fx.replica_dir("eu-west").join("chunks");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("x"), b"left by hand").unwrap();
    let ids = repo.chunk_ids().await.unwrap();
    assert!(ids.is_empty(), "{ids:?}");
    repo.put_chunk(Bytes::from_static(b"a real chunk"))
        .await
        .unwrap();
    let check = timevault::integrity::check_catalog(&repo).await.unwrap();
    assert_eq!(check.stray, vec!["chunks/x".to_string()]);
    assert!(!check.is_clean());
}

#[tokio::test]
async fn quorum_one_succeeds_and_sync_catches_up() {
    let fx = Fixture::new();
    let config = fx.config(Quorum::Count(1));
    Repository::init(&config).await.unwrap();
    let repo = fx.open(&config).await;
    let north = fx.replica_dir("eu-north");
    let aside = break_replica(&north);
    let receipt = repo
        .write_object(Kind::Snapshot, "snapshots/app/s3", b"y".to_vec())
        .await
        .unwrap();
    // Acknowledged by eu-west alone; eu-north's write fails on its own (in the background).
    assert_eq!(receipt.stored, vec!["eu-west".to_string()]);
    let chunk = repo
        .put_chunk(Bytes::from_static(b"chunk while north is down"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // let the failing writes give up
    assert!(
        repo.replicas().replicas()[1].health().errors > 0,
        "the failure is recorded"
    );
    heal_replica(&north, &aside);

    let report = repo.verify(&VerifyOptions::default()).await.unwrap();
    assert_eq!(report.replicas[1].missing.len(), 2, "{report:?}");
    let summary = repo.sync_replicas(&SyncOptions::default()).await.unwrap();
    assert_eq!(summary.replicas[1].copied.len(), 2);
    assert!(repo
        .verify(&VerifyOptions {
            read_data: true,
            replica: None
        })
        .await
        .unwrap()
        .is_clean());
    let only_north = Repository::open_with(&config, Some("eu-north"), fast_retry())
        .await
        .unwrap();
    assert_eq!(
        only_north.read_chunk(&chunk.id).await.unwrap(),
        b"chunk while north is down"
    );
}

#[tokio::test]
async fn exactly_one_of_two_concurrent_writers_holds_the_lease() {
    let fx = Fixture::new();
    let config = fx.config(Quorum::All);
    Repository::init(&config).await.unwrap();
    let a = fx.open(&config).await;
    let b = fx.open(&config).await;
    let (ra, rb) = tokio::join!(a.acquire_lease("repository"), b.acquire_lease("repository"));
    assert!(ra.is_ok() ^ rb.is_ok(), "exactly one wins: {ra:?} / {rb:?}");
    let err = ra.as_ref().err().or(rb.as_ref().err()).unwrap();
    assert_eq!(err.kind(), ErrorKind::Locked);
    assert!(
        err.to_string().contains("held by") && err.to_string().contains("expires at"),
        "{err}"
    );

    // The winner renews and releases; then the other acquires at once.
    let (winner, loser) = if ra.is_ok() { (&a, &b) } else { (&b, &a) };
    let mut lease = ra.or(rb).unwrap();
    winner.renew_lease(&mut lease).await.unwrap();
    assert!(loser.acquire_lease("repository").await.is_err());
    winner.release_lease(lease).await.unwrap();
    loser.acquire_lease("repository").await.unwrap();
}

/// A job longer than `lease_ttl` keeps its lease (issue 19): before, the daemon and `backup`
/// renewed only between jobs, so a long snapshot let a second writer take the lease and write
/// the same chain.
#[tokio::test]
async fn a_job_longer_than_the_ttl_keeps_its_lease() {
    let fx = Fixture::new();
    let config = fx.config(Quorum::All);
    Repository::init(&config).await.unwrap();
    let writer = fx.open(&config).await;
    let other = fx.open(&config).await;
    let mut lease = writer.acquire_lease("source-app").await.unwrap();
    let acquired = lease.expires_at();
    // The "job": three times the 2 s ttl; meanwhile the other writer keeps trying.
    let job = async {
        let mut refused = 0;
        for _ in 0..12 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let err = other.acquire_lease("source-app").await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
            refused += 1;
        }
        refused
    };
    let (refused, renewed) = writer.renewing(&mut [&mut lease], job).await;
    renewed.unwrap();
    assert_eq!(refused, 12);
    assert!(lease.expires_at() > acquired, "renewed while the job ran");
    writer.release_lease(lease).await.unwrap();
    other.acquire_lease("source-app").await.unwrap();
}

#[tokio::test]
async fn a_dead_holders_lease_expires() {
    let fx = Fixture::new();
    let config = fx.config(Quorum::All);
    Repository::init(&config).await.unwrap();
    let dead = fx.open(&config).await;
    let lease = dead.acquire_lease("app").await.unwrap();
    std::mem::forget(lease); // the holder dies without releasing
    let next = fx.open(&config).await;
    assert_eq!(
        next.acquire_lease("app").await.unwrap_err().kind(),
        ErrorKind::Locked
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    next.acquire_lease("app").await.unwrap();
}

#[tokio::test]
async fn renamed_object_fails_to_open() {
    let fx = Fixture::new();
    let config = fx.config(Quorum::All);
    Repository::init(&config).await.unwrap();
    let repo = fx.open(&config).await;
    repo.write_object(Kind::Snapshot, "snapshots/app/a", b"a".to_vec())
        .await
        .unwrap();
    repo.write_object(Kind::Snapshot, "snapshots/app/b", b"b".to_vec())
        .await
        .unwrap();
    for replica in ["eu-west", "eu-north"] {
        let dir = fx.replica_dir(replica).join("snapshots/app");
        std::fs::rename(dir.join("a"), dir.join("tmp")).unwrap();
        std::fs::rename(dir.join("b"), dir.join("a")).unwrap();
        std::fs::rename(dir.join("tmp"), dir.join("b")).unwrap();
    }
    let err = repo
        .read_object(Kind::Snapshot, "snapshots/app/a")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
}

#[tokio::test]
async fn passphrase_repository_opens_only_with_its_passphrase() {
    let fx = Fixture::new();
    std::env::set_var("TV_TEST_PASSPHRASE_OK", "correct horse battery staple");
    let text = |var: &str| {
        ConfigBuilder::new()
            .passphrase_env(var)
            .replica("only", "here", "replicas/only")
            .text()
    };
    let origin = fx.dir.path().join("t.toml");
    let config = Config::parse(&text("TV_TEST_PASSPHRASE_OK"), &origin).unwrap();
    let created = Repository::init(&config).await.unwrap();
    assert!(created.created && !created.key_generated);
    Repository::open(&config).await.unwrap();
    std::env::set_var("TV_TEST_PASSPHRASE_BAD", "wrong horse");
    let wrong = Config::parse(&text("TV_TEST_PASSPHRASE_BAD"), &origin).unwrap();
    assert_eq!(
        Repository::open(&wrong).await.unwrap_err().kind(),
        ErrorKind::Key
    );
    let unset = Config::parse(&text("TV_TEST_PASSPHRASE_UNSET"), &origin).unwrap();
    let err = Repository::open(&unset).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Key);
    assert!(err.to_string().contains("TV_TEST_PASSPHRASE_UNSET"));
}

/// Two prunes never sweep at once (issue 19): a real prune holds the repository's prune
/// lease, so a second one (the daemon's schedule beside an operator's `timevault prune`) is
/// refused as locked; a dry run deletes nothing and needs no lease.
#[tokio::test]
async fn a_second_prune_is_refused_while_one_runs() {
    use timevault::prune::{prune, PruneOptions, PRUNE_LEASE};
    let fx = Fixture::new();
    let config = fx.config(Quorum::All);
    Repository::init(&config).await.unwrap();
    let first = fx.open(&config).await;
    let second = fx.open(&config).await;
    let held = first.acquire_lease(PRUNE_LEASE).await.unwrap();
    let mut options = PruneOptions {
        dry_run: false,
        now: chrono::Utc::now(),
    };
    let err = prune(&second, &[], &config.retention, &options)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    options.dry_run = true;
    prune(&second, &[], &config.retention, &options)
        .await
        .unwrap();
    first.release_lease(held).await.unwrap();
    options.dry_run = false;
    prune(&second, &[], &config.retention, &options)
        .await
        .unwrap();
}

/// Issue 19, writers are fenced: a writer that stalled past its lease's expiry (a long pause,
/// a suspended VM) while another writer took the lease must not write a manifest of that
/// source when it wakes, before its next renewal even notices. Another source's manifests are
/// not affected, and once it holds the lease again it writes.
#[tokio::test]
async fn a_writer_whose_lease_expired_writes_no_manifest_of_that_source() {
    let fx = Fixture::new();
    let config = fx.config(Quorum::All);
    Repository::init(&config).await.unwrap();
    let writer = fx.open(&config).await;
    let other = fx.open(&config).await;
    let snapshot = |chain: &str| timevault::repo::layout::snapshot("app", chain);
    let body = || br#"{"kind":"sqlite"}"#.to_vec();
    let mut lease = writer.acquire_lease("source-app").await.unwrap();
    writer
        .write_object(Kind::Snapshot, &snapshot("20261207T000000.000000Z"), body())
        .await
        .unwrap();
    // The writer stalls past the 2 s ttl; the other one takes over and writes.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let taken = other.acquire_lease("source-app").await.unwrap();
    other
        .write_object(Kind::Snapshot, &snapshot("20261207T000001.000000Z"), body())
        .await
        .unwrap();
    // The stalled writer wakes: its manifest is refused.
    let err = writer
        .write_object(Kind::Snapshot, &snapshot("20261207T000002.000000Z"), body())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(err.to_string().contains("source-app"), "{err}");
    // Its renewal finds the lease taken; still refused.
    assert_eq!(
        writer.renew_lease(&mut lease).await.unwrap_err().kind(),
        ErrorKind::Locked
    );
    assert!(writer
        .write_object(Kind::Snapshot, &snapshot("20261207T000003.000000Z"), body())
        .await
        .is_err());
    // A source it never leased is not fenced.
    writer
        .write_object(
            Kind::Snapshot,
            &timevault::repo::layout::snapshot("files", "20261207T000004.000000Z"),
            body(),
        )
        .await
        .unwrap();
    // Once the other writer is done and this one holds the lease again, it writes.
    other.release_lease(taken).await.unwrap();
    let _again = writer.acquire_lease("source-app").await.unwrap();
    writer
        .write_object(Kind::Snapshot, &snapshot("20261207T000005.000000Z"), body())
        .await
        .unwrap();
}

/// Each new holder's lease epoch exceeds every earlier holder's, on every path a holder ends
/// (released, or dead and expired); renewals keep the epoch. The epoch is stamped into the
/// keys of the change-log segments written under the lease.
#[tokio::test]
async fn lease_epochs_grow_from_one_holder_to_the_next() {
    let fx = Fixture::new();
    let config = fx.config(Quorum::All);
    Repository::init(&config).await.unwrap();
    let a = fx.open(&config).await;
    let mut first = a.acquire_lease("source-app").await.unwrap();
    let e1 = first.epoch();
    assert_eq!(a.lease_epoch("app"), Some(e1));
    for _ in 0..3 {
        a.renew_lease(&mut first).await.unwrap();
    }
    assert_eq!(first.epoch(), e1, "renewals keep the epoch");
    a.release_lease(first).await.unwrap();
    let b = fx.open(&config).await;
    let second = b.acquire_lease("source-app").await.unwrap();
    assert!(
        second.epoch() > e1 + 3,
        "{} after {e1} and 3 renewals",
        second.epoch()
    );
    std::mem::forget(second); // dies holding it
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let c = fx.open(&config).await;
    let third = c.acquire_lease("source-app").await.unwrap();
    assert!(third.epoch() > b.lease_epoch("app").unwrap());
    assert_eq!(
        a.lease_epoch("app"),
        None,
        "a released lease stamps nothing"
    );
}
