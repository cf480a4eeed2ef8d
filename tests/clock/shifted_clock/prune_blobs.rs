//! Retention for a blob source: 75 days of daily scans under a fake clock, pruned daily
//! (`pitr = "10d"`, `monthly = "5y"`). Every scan the policy promises restores exactly its
//! listing (content chunks survived chunk collection); every other scan instant, and any instant
//! inside a gap pruning left after a calendar scan, is refused.
//!
//! Own test binary: the fake clock is process-wide.

use crate::config::ConfigBuilder;

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Duration, Utc};
use timevault::clock;
use timevault::prune::{prune, PruneOptions};
use timevault::repo::Repository;
use timevault::restore::{restore_blobs, RestoreOptions};
use timevault::source::blobs::{load_catalog, BlobSource};
use timevault::time::At;
use timevault::ErrorKind;
use timevault_fixtures::StoreUrl;

const DAYS: i64 = 75;

async fn restore(repo: &Repository, at: DateTime<Utc>, target: &StoreUrl) -> timevault::Result<()> {
    restore_blobs(
        repo,
        &RestoreOptions {
            source: "files".into(),
            at: At::Instant(at),
            target: target.url.clone(),
            force: true,
            jobs: None,
        },
        &target.options,
    )
    .await
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_scans_restore_exactly_and_pruned_instants_are_refused() {
    let _clock = crate::clock().await;
    let dir = tempfile::tempdir().unwrap();
    let store = StoreUrl::local_dir(&dir.path().join("store")).unwrap();
    let config = ConfigBuilder::two_sites()
        .blobs("files", &store.url)
        .retention("pitr", "10d")
        .retention("monthly", "5y")
        .retention("chunk_grace", "1d")
        .load(dir.path());
    let set_clock = |days_ago: i64, hours: i64| {
        clock::set_offset(Duration::hours(hours) - Duration::days(days_ago))
    };
    set_clock(DAYS + 1, 0);
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let loc = store.open().unwrap();
    loc.put("kept/forever.txt", b"unchanged all along".to_vec())
        .await
        .unwrap();
    let mut source = BlobSource::open("files", &store.url, &store.options, &repo)
        .await
        .unwrap();
    // (scanned_at, listing checksum) of every scan.
    let mut scans: Vec<(DateTime<Utc>, String)> = Vec::new();
    let mut now = clock::now();
    for day in 0..DAYS {
        set_clock(DAYS - day, 3);
        loc.put(
            &format!("daily/{day}.txt"),
            format!("day {day}").into_bytes(),
        )
        .await
        .unwrap();
        loc.put("rolling.txt", format!("rolled on day {day}").into_bytes())
            .await
            .unwrap();
        if day >= 3 {
            loc.delete(&format!("daily/{}.txt", day - 3)).await.unwrap();
        }
        let stats = source.scan(&repo).await.unwrap();
        scans.push((stats.scanned_at, loc.listing_checksum().await.unwrap()));
        set_clock(DAYS - day, 23);
        now = clock::now();
        let options = PruneOptions {
            dry_run: false,
            now,
        };
        let s = prune(&repo, &config.sources, &config.retention, &options)
            .await
            .unwrap();
        assert!(s.is_complete());
    }

    // The promise: every scan serving an instant of the PITR window, and the newest scan of
    // each month.
    let window = now - Duration::days(10);
    let mut newest_of_month: BTreeMap<(i32, u32), DateTime<Utc>> = BTreeMap::new();
    for (at, _) in &scans {
        newest_of_month.insert((at.year(), at.month()), *at);
    }
    let promised: Vec<bool> = scans
        .iter()
        .enumerate()
        .map(|(i, (at, _))| {
            let end = scans.get(i + 1).map_or(*at, |n| n.0);
            end >= window || newest_of_month[&(at.year(), at.month())] == *at
        })
        .collect();
    let catalog = load_catalog(&repo, "files").await.unwrap();
    assert_eq!(
        catalog.scans.len(),
        promised.iter().filter(|p| **p).count(),
        "exactly the promised scans remain"
    );
    let target = StoreUrl::local_dir(&dir.path().join("restored")).unwrap();
    for ((at, sum), promised) in scans.iter().zip(&promised) {
        let result = restore(&repo, *at, &target).await;
        if *promised {
            result.unwrap_or_else(|e| panic!("promised scan {at} does not restore: {e}"));
            assert_eq!(
                &target.open().unwrap().listing_checksum().await.unwrap(),
                sum,
                "{at}"
            );
        } else {
            let err = result.expect_err(&format!("pruned scan {at} restores"));
            assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        }
    }
    // Right after a calendar scan the scans that followed it are gone: refused, not guessed.
    let (first_month_end, _) = scans
        .iter()
        .zip(&promised)
        .find(|(_, p)| **p)
        .map(|(s, _)| s.clone())
        .unwrap();
    let err = restore(&repo, first_month_end + Duration::hours(1), &target)
        .await
        .unwrap_err();
    println!("{err}");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("removed by retention"), "{err}");
    // Inside the PITR window, between two scans, the earlier scan's state restores.
    let (mid_base, mid_sum) = &scans[scans.len() - 3];
    restore(&repo, *mid_base + Duration::hours(5), &target)
        .await
        .unwrap();
    assert_eq!(
        &target.open().unwrap().listing_checksum().await.unwrap(),
        mid_sum
    );
    clock::set_offset(Duration::zero());
}
