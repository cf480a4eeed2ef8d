//! The replica conformance suite: one battery of repository behaviours, run unchanged on local
//! files, on a real S3 API server (moto) and on a real Azure Blob API server (Azurite).
//! Missing servers fail the test with the command that installs them (see the harness).

use crate::common::config::{ConfigBuilder, Quorum};

use std::time::Duration;

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload};
use timevault::archive::Kind;
use timevault::config::Config;
use timevault::repo::store::open_store;
use timevault::repo::{layout, Repository, RetryPolicy, SyncOptions, VerifyOptions};
use timevault::ErrorKind;
use timevault_fixtures::harness;
use timevault_fixtures::StoreUrl;

/// A repository whose replicas `r0`, `r1`, .. (regions `region-0`, ..) are `replicas`.
fn config(dir: &std::path::Path, replicas: &[StoreUrl]) -> Config {
    let repository = ConfigBuilder::new()
        .key_file("k")
        .write_quorum(Quorum::All)
        .lease_ttl("3s");
    replicas
        .iter()
        .enumerate()
        .fold(repository, |config, (i, r)| {
            config.replica_with(&format!("r{i}"), &format!("region-{i}"), &r.url, &r.options)
        })
        .parse(dir)
}

async fn corrupt(replica: &StoreUrl, key: &str) {
    let store = open_store(&replica.url, &replica.options).unwrap();
    let path = object_store::path::Path::from(key);
    let mut bytes = store
        .get(&path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x10;
    store.put(&path, PutPayload::from(bytes)).await.unwrap();
}

async fn remove(replica: &StoreUrl, key: &str) {
    let store = open_store(&replica.url, &replica.options).unwrap();
    store
        .delete(&object_store::path::Path::from(key))
        .await
        .unwrap();
}

/// The battery itself.
async fn conformance(replicas: [StoreUrl; 2]) {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &replicas);
    // init creates, then is a no-op.
    assert!(Repository::init(&config).await.unwrap().created);
    assert!(!Repository::init(&config).await.unwrap().created);
    let retry = RetryPolicy {
        attempts: 2,
        first_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
    };
    let repo = Repository::open_with(&config, None, retry).await.unwrap();

    // Chunks deduplicate; objects round-trip.
    let mut ids = Vec::new();
    for i in 0..4u8 {
        let w = repo
            .put_chunk(Bytes::from(vec![i; 100_000 + i as usize]))
            .await
            .unwrap();
        assert!(w.uploaded > 0);
        ids.push(w.id);
    }
    assert_eq!(
        repo.put_chunk(Bytes::from(vec![0u8; 100_000]))
            .await
            .unwrap()
            .uploaded,
        0
    );
    repo.write_object(Kind::Snapshot, "snapshots/app/x", b"manifest".to_vec())
        .await
        .unwrap();
    assert_eq!(
        repo.read_object(Kind::Snapshot, "snapshots/app/x")
            .await
            .unwrap(),
        b"manifest"
    );
    // Create-only: writing an existing key again changes nothing.
    repo.write_object(Kind::Snapshot, "snapshots/app/x", b"other".to_vec())
        .await
        .unwrap();
    assert_eq!(
        repo.read_object(Kind::Snapshot, "snapshots/app/x")
            .await
            .unwrap(),
        b"manifest"
    );

    // Damage: one object gone from r0, another corrupted on r1.
    let gone = layout::chunk(&ids[1]);
    let bad = layout::chunk(&ids[2]);
    remove(&replicas[0], &gone).await;
    corrupt(&replicas[1], &bad).await;
    for id in &ids {
        repo.read_chunk(id).await.unwrap();
    }
    let report = repo
        .verify(&VerifyOptions {
            read_data: true,
            replica: None,
        })
        .await
        .unwrap();
    assert_eq!(report.replicas[0].missing, vec![gone.clone()]);
    assert!(report.replicas[0].damaged.is_empty());
    assert_eq!(
        report.replicas[1]
            .damaged
            .iter()
            .map(|d| d.0.clone())
            .collect::<Vec<_>>(),
        vec![bad.clone()]
    );
    assert!(report.replicas[1].missing.is_empty());
    let summary = repo.sync_replicas(&SyncOptions::default()).await.unwrap();
    assert_eq!(summary.replicas[0].copied, vec![gone]);
    assert_eq!(summary.replicas[1].repaired, vec![bad]);
    assert!(repo
        .verify(&VerifyOptions {
            read_data: true,
            replica: None
        })
        .await
        .unwrap()
        .is_clean());

    // Recovery at one site: each replica alone serves every object.
    for name in ["r0", "r1"] {
        let one = Repository::open_with(&config, Some(name), retry)
            .await
            .unwrap();
        for id in &ids {
            one.read_chunk(id).await.unwrap();
        }
    }

    // Leases: exactly one of two racing writers.
    let other = Repository::open_with(&config, None, retry).await.unwrap();
    let (a, b) = tokio::join!(
        repo.acquire_lease("repository"),
        other.acquire_lease("repository")
    );
    assert!(a.is_ok() ^ b.is_ok(), "{a:?} / {b:?}");
    let err = a.as_ref().err().or(b.as_ref().err()).unwrap();
    assert_eq!(err.kind(), ErrorKind::Locked);

    // A wrong key is a wrong key.
    std::fs::write(dir.path().join("k"), "22".repeat(32)).unwrap();
    assert_eq!(
        Repository::open(&config).await.unwrap_err().kind(),
        ErrorKind::Key
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_local_files() {
    let dir = tempfile::tempdir().unwrap();
    let replica = |name: &str| {
        StoreUrl::new(
            url::Url::from_directory_path(dir.path().join(name))
                .unwrap()
                .to_string(),
        )
    };
    std::fs::create_dir_all(dir.path().join("a")).unwrap();
    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    conformance([replica("a"), replica("b")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_s3() {
    let s3 = harness::s3();
    conformance([
        s3.create_bucket("repo").unwrap(),
        s3.create_bucket("repo").unwrap(),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_azure() {
    let az = harness::azure();
    conformance([
        az.create_container("repo").unwrap(),
        az.create_container("repo").unwrap(),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_across_s3_and_azure() {
    conformance([
        harness::s3().create_bucket("geo").unwrap(),
        harness::azure().create_container("geo").unwrap(),
    ])
    .await;
}
