//! The lazy page image (a SQLite backup read in place through the `timevault-pages` VFS)
//! against a full restore: at random instants of a workload (snapshots, captures, an
//! application checkpoint, instants between captures), the image's bytes and every table's
//! row checksums equal those of the restored file. A snapshot chunk damaged on every replica
//! makes a tenant export fail naming the chunk, with no output left behind.

use crate::common;

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use common::Env;
use rand::{Rng, SeedableRng};
use timevault::catalog::{SnapshotManifest, SourceCatalog};
use timevault::export::{self, ExportOptions, TableFormat};
use timevault::repo::{layout, Repository};
use timevault::restore::sqlite_pages::PageImage;
use timevault::restore::{restore_sqlite, sqlite_vfs, RestoreOptions};
use timevault::source::sqlite::SqliteSource;
use timevault::time::At;
use timevault::ErrorKind;
use timevault_fixtures::{Conn, Workload};

async fn restored_file(repo: &Repository, at: DateTime<Utc>, target: &Path) {
    restore_sqlite(
        repo,
        &RestoreOptions {
            source: "app".into(),
            at: At::Instant(at),
            target: target.display().to_string(),
            force: false,
            jobs: None,
        },
    )
    .await
    .unwrap();
}

/// Every byte of the image, read the way the VFS reads (off the runtime's threads).
async fn image_bytes(image: Arc<PageImage>) -> Vec<u8> {
    tokio::task::spawn_blocking(move || {
        let mut all = vec![0u8; image.size() as usize];
        for (i, block) in all.chunks_mut(64 << 10).enumerate() {
            let n = image.read((i * (64 << 10)) as u64, block).unwrap();
            assert_eq!(n, block.len());
        }
        all
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_in_place_equals_a_full_restore_at_random_instants() {
    let env = Env::new(11).await;
    let config = env.config();
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let mut source = SqliteSource::open("app", &env.db, &repo).await.unwrap();
    source.snapshot(&repo).await.unwrap();
    let mut app = env.app().await;
    let mut workload = Workload::new(11, 1).with_bulk_rows(20_000);
    for step in 0..10 {
        workload.step(&mut app, None).await.unwrap();
        if step == 3 {
            // The application checkpoints; WAL frames keep coming after the restart.
            let Conn::Sqlite(c) = &mut app else {
                unreachable!()
            };
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(c)
                .await
                .unwrap();
        }
        if step == 6 {
            source.snapshot(&repo).await.unwrap();
        } else {
            source.capture(&repo).await.unwrap();
        }
    }
    source.close(&repo).await.unwrap();
    let catalog = SourceCatalog::load(&repo, "app").await.unwrap();
    let (first, last) = (catalog.chains[0].start(), catalog.newest().unwrap());
    let span = (last - first).num_microseconds().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut instants = vec![first, last];
    instants
        .extend((0..6).map(|_| first + chrono::Duration::microseconds(rng.gen_range(0..=span))));

    let mut most_segments = 0;
    for (i, at) in instants.into_iter().enumerate() {
        let target = env.path().join(format!("restored-{i}.db"));
        restored_file(&repo, at, &target).await;
        let (image, summary) = PageImage::open(&repo, "app", At::Instant(at), env.path())
            .await
            .unwrap();
        most_segments = most_segments.max(summary.segments_applied);
        let image = Arc::new(image);
        assert_eq!(
            image_bytes(image.clone()).await,
            std::fs::read(&target).unwrap(),
            "image bytes at {at} (instant {i}, {} segments)",
            summary.segments_applied
        );
        let (mut lazy, exposed) = sqlite_vfs::connect(image.clone()).await.unwrap();
        let lazy_sums = timevault::catalog::rowsum::sqlite_table_sums(&mut lazy)
            .await
            .unwrap();
        sqlx::Connection::close(lazy).await.unwrap();
        drop(exposed);
        let mut full = timevault::tenancy::schema::open_sqlite(&target)
            .await
            .unwrap();
        let full_sums = timevault::catalog::rowsum::sqlite_table_sums(&mut full)
            .await
            .unwrap();
        sqlx::Connection::close(full).await.unwrap();
        assert!(!full_sums.is_empty());
        assert_eq!(lazy_sums, full_sums, "row checksums at {at} (instant {i})");
        assert!(image.take_error().is_none());
    }
    assert!(most_segments > 0, "some instant needs change-log frames");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_damaged_on_every_replica_fails_the_export_naming_it() {
    let env = Env::new(12).await;
    let config = env.config_builder().fixture_tenancy().load(env.path());
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let mut source = SqliteSource::open("app", &env.db, &repo).await.unwrap();
    let snapshot = source.snapshot(&repo).await.unwrap();
    source.close(&repo).await.unwrap();
    let catalog = SourceCatalog::load(&repo, "app").await.unwrap();
    let manifest = SnapshotManifest::read(&repo, &catalog.chains[0].snapshot.key)
        .await
        .unwrap();
    assert!(manifest.chunks.len() > 1, "the image is cut into pieces");
    // The first piece holds page 1, which every reader needs.
    let chunk = manifest.chunks[0].id.clone();
    for replica in ["eu-west", "eu-north"] {
        let path = env
            .path()
            .join("replicas")
            .join(replica)
            .join(layout::chunk(&chunk));
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    let out_dir = env.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("t.tar.zst");
    let err = export::export(
        &config,
        &repo,
        &ExportOptions {
            tenant: "1001".into(),
            at: At::Instant(snapshot.taken_at),
            out: out.clone(),
            format: TableFormat::Jsonl,
            requested_by: None,
            reason: None,
            encryption: None,
            force: false,
        },
    )
    .await
    .unwrap_err();
    let message = err.to_string();
    println!("damaged chunk: {message}");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{message}");
    assert!(
        message.contains(&chunk),
        "the error names the chunk: {message}"
    );
    assert!(!out.exists());
    let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().collect();
    assert!(left.is_empty(), "nothing left behind: {left:?}");
}
