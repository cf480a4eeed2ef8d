//! Golden cases for applying the retention plan to catalogs.

use super::*;
use crate::repo::layout;
use crate::time;

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn pol(pitr_days: i64, monthly_days: Option<i64>) -> RetentionPolicy {
    RetentionPolicy {
        pitr: chrono::Duration::days(pitr_days),
        daily: None,
        weekly: None,
        monthly: monthly_days.map(chrono::Duration::days),
        yearly: None,
    }
}

/// Daily chains from `first`, each with segments at +1h and at the next chain's start.
fn daily_catalog(first: &str, days: i64) -> SourceCatalog {
    let mut snaps = Vec::new();
    let mut segs = Vec::new();
    for i in 0..days {
        let s = t(first) + chrono::Duration::days(i);
        let chain = time::compact(s);
        snaps.push(layout::snapshot("app", &chain));
        segs.push(layout::segment(
            "app",
            &chain,
            1,
            &time::compact(s + chrono::Duration::hours(1)),
            None,
        ));
        segs.push(layout::segment(
            "app",
            &chain,
            2,
            &time::compact(s + chrono::Duration::days(1)),
            None,
        ));
    }
    SourceCatalog::from_keys("app", &snaps, &segs)
}

#[test]
fn removed_chains_lose_segments_newest_first_then_the_snapshot() {
    let cat = daily_catalog("2026-01-01T02:00:00Z", 60);
    let now = t("2026-03-01T12:00:00Z");
    let p = plan_chains(&cat, &pol(35, None), now);
    let first = &cat.chains[0];
    let kinds: Vec<(ObjectKind, &str)> = p
        .removed
        .iter()
        .take(3)
        .map(|r| (r.what, r.key.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (ObjectKind::Segment, first.segments[1].key.as_str()),
            (ObjectKind::Segment, first.segments[0].key.as_str()),
            (ObjectKind::Snapshot, first.snapshot.key.as_str()),
        ]
    );
    assert!(
        p.removed[0].reason.contains("before the PITR window"),
        "{}",
        p.removed[0].reason
    );
    // The PITR window starts 2026-01-25T12:00; the chain of 01-24 02:00 ends 01-25 02:00.
    assert_eq!(p.kept.first().unwrap().start, t("2026-01-25T02:00:00Z"));
    assert_eq!(p.kept.len() + p.removed.len() / 3, 60);
    assert!(p
        .kept
        .iter()
        .all(|k| k.end == k.start + chrono::Duration::days(1)));
}

#[test]
fn calendar_points_keep_their_snapshot_and_lose_their_segments() {
    let cat = daily_catalog("2026-01-01T02:00:00Z", 60);
    let now = t("2026-03-01T12:00:00Z");
    let p = plan_chains(&cat, &pol(10, Some(400)), now);
    let jan31 = p
        .kept
        .iter()
        .find(|k| k.start == t("2026-01-31T02:00:00Z"))
        .expect("the newest snapshot of January is kept");
    assert_eq!(
        jan31.end, jan31.start,
        "restorable at its snapshot instant only"
    );
    assert_eq!(jan31.reasons, vec![Reason::Monthly("2026-01".into())]);
    let jan31_removed: Vec<&Removal> = p
        .removed
        .iter()
        .filter(|r| {
            r.key
                .starts_with(&format!("changelog/app/{}/", time::compact(jan31.start)))
        })
        .collect();
    assert_eq!(jan31_removed.len(), 2);
    assert!(jan31_removed.iter().all(|r| r.what == ObjectKind::Segment));
    assert!(jan31_removed[0].reason.contains("calendar point"));
}

#[test]
fn blob_scans_in_the_window_are_all_kept_and_calendar_scans_alone() {
    let keys: Vec<String> = (0..90)
        .map(|i| {
            let at = t("2026-01-01T06:00:00Z") + chrono::Duration::hours(12 * i);
            layout::manifest("files", &time::compact(at))
        })
        .collect();
    let cat = BlobCatalog::from_keys("files", &keys);
    let now = t("2026-02-15T00:00:00Z");
    let p = plan_scans(&cat, &pol(3, Some(400)), now);
    // Window from 02-12T00:00: the scan of 02-11T18:00 is its base and is kept.
    let pitr: Vec<&KeptPoint> = p
        .kept
        .iter()
        .filter(|k| k.reasons.contains(&Reason::Pitr))
        .collect();
    assert_eq!(pitr.first().unwrap().start, t("2026-02-11T18:00:00Z"));
    assert_eq!(pitr.first().unwrap().end, t("2026-02-12T06:00:00Z"));
    let newest = cat.scans.last().unwrap().scanned_at;
    assert_eq!(pitr.last().unwrap().start, newest);
    let jan = p
        .kept
        .iter()
        .find(|k| k.reasons == vec![Reason::Monthly("2026-01".into())])
        .unwrap();
    assert_eq!(
        (jan.start, jan.end),
        (t("2026-01-31T18:00:00Z"), t("2026-01-31T18:00:00Z"))
    );
    assert!(p.removed.iter().all(|r| r.what == ObjectKind::Scan));
    assert_eq!(p.kept.len() + p.removed.len(), 90);
}

#[test]
fn audit_records_older_than_retention_go_and_younger_never() {
    let now = t("2026-11-22T00:00:00Z");
    let key = |at: &str| format!("audit/{}-0badc0de", time::compact(t(at)));
    let keys = vec![
        key("2025-10-17T23:59:59Z"),
        key("2025-10-18T00:00:01Z"),
        "audit/not-a-time".to_string(),
    ];
    let removed = plan_audit(&keys, chrono::Duration::days(400), now);
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].key, keys[0]);
    assert_eq!(removed[0].what, ObjectKind::Audit);
}

#[test]
fn chunk_refs_are_found_anywhere_in_a_manifest() {
    let id = "ab".repeat(32);
    let other = "cd".repeat(32);
    let manifest = serde_json::json!({
        "chunks": [{"id": id, "len": 10}],
        "details": {"base_frames": {"chunks": [{"id": other, "len": 3}], "bytes": 3}},
        "unrelated": {"id": "not-a-chunk", "len": 1}
    });
    let mut out = Vec::new();
    crate::prune::collect_chunk_refs(&manifest, &mut out);
    assert_eq!(out, vec![id, other]);
}

#[test]
fn drill_records_older_than_retention_go_but_the_newest_per_source_stays() {
    let now = t("2026-11-22T00:00:00Z");
    let key = |source: &str, at: &str| format!("drills/{source}/{}", time::compact(t(at)));
    let keys = vec![
        key("app", "2025-01-05T04:30:00Z"),
        key("app", "2025-01-12T04:30:00Z"),
        key("app", "2026-11-15T04:30:00Z"),
        key("files", "2025-01-12T04:30:00Z"),
        "drills/app/not-a-time".to_string(),
    ];
    let removed = plan_drills(&keys, chrono::Duration::days(400), now);
    let removed: Vec<&str> = removed.iter().map(|r| r.key.as_str()).collect();
    // `files` has one record only: old, but its newest, so it stays.
    assert_eq!(removed, vec![keys[0].as_str(), keys[1].as_str()]);
}
