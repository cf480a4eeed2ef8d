//! Which object versions make up a blob source at an instant (docs/FORMAT.md §7.3).
//!
//! Scans are snapshots of a store taken from outside: a scan knows exactly what it listed, and
//! an object's own last-modified tells when a version was put, but a deletion is only known
//! when a scan no longer sees the object. So the state at `T` is built from the newest scan at
//! or before `T` (the **base**: its listing was the state at its scan time) plus the versions
//! that later scans saw put in between:
//!
//! * a key the base lists keeps the base's version, unless a later scan shows a version put
//!   after the base's scan time and at or before `T` (an overwrite, known to the store's
//!   last-modified precision);
//! * a key the base does not list takes the newest version a later scan shows put at or
//!   before `T` (an object created between the scans; or one put while the base was listing,
//!   which the base missed);
//! * nothing is ever removed between scans: a deletion counts from the scan that saw it gone,
//!   so an object deleted between two scans is still restored until the later scan's time.
//!
//! Only the two scans after the base can hold a version put at or before `T`: a version first
//! listed by scan `j` was put after scan `j - 1` began (scan `j - 1` would have listed it
//! otherwise), so from scan `base + 3` on every new version was put after scan `base + 1`
//! ended, which is after `T`. A restore therefore reads at most three listings.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::catalog::Window;
use crate::error::{Error, ErrorKind, Result};
use crate::repo::{layout, Repository};
use crate::stored::blobs::BlobEntry;
use crate::time;

/// How many scans after the base can contribute versions (see the module docs).
pub const LATER_SCANS: usize = 2;

/// One scan in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScanRef {
    pub scanned_at: DateTime<Utc>,
    pub key: String,
}

/// One scan's full listing, for [`plan_blobs`].
#[derive(Debug, Clone)]
pub struct ScanListing {
    pub scanned_at: DateTime<Utc>,
    pub entries: Vec<BlobEntry>,
}

/// The versions that make up a blob source at an instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobPlan {
    /// The base scan's time.
    pub base: DateTime<Utc>,
    /// The last known event the plan includes: the base scan, or the newest later version put
    /// at or before the instant. The plan is the same for every instant from here to the
    /// instant asked for.
    pub restored_to: DateTime<Utc>,
    /// One entry per key, sorted by key.
    pub entries: Vec<BlobEntry>,
}

/// Pure: the state at `at` from scan listings (in any order). `None` when `at` precedes
/// every scan. Restores compute the same thing by streaming the listings ([`choose_version`]
/// is the shared per-key rule).
pub fn plan_blobs(scans: &[ScanListing], at: DateTime<Utc>) -> Option<BlobPlan> {
    let mut order: Vec<&ScanListing> = scans.iter().collect();
    order.sort_by_key(|s| s.scanned_at);
    let base_index = order.iter().rposition(|s| s.scanned_at <= at)?;
    let base = order[base_index];
    let later = &order[base_index + 1..(base_index + 1 + LATER_SCANS).min(order.len())];
    let mut keys: BTreeMap<&str, (Option<&BlobEntry>, Vec<&BlobEntry>)> = BTreeMap::new();
    for entry in &base.entries {
        keys.entry(&entry.key).or_default().0 = Some(entry);
    }
    for scan in later {
        for entry in &scan.entries {
            keys.entry(&entry.key).or_default().1.push(entry);
        }
    }
    let mut restored_to = base.scanned_at;
    let mut entries = Vec::new();
    for (base_entry, later_entries) in keys.values() {
        let chosen = choose_version(base.scanned_at, *base_entry, later_entries, at);
        if let Some(entry) = chosen {
            if !base_entry.is_some_and(|b| std::ptr::eq(b, entry)) {
                restored_to = restored_to.max(entry.last_modified);
            }
            entries.push(entry.clone());
        }
    }
    Some(BlobPlan {
        base: base.scanned_at,
        restored_to,
        entries,
    })
}

/// The per-key rule: the version of one key alive at `at`, given the base scan's version (if
/// it listed the key) and the versions later scans listed, in scan order.
pub fn choose_version<'a, E>(
    base_scanned_at: DateTime<Utc>,
    base: Option<&'a BlobEntry>,
    later: &'a [E],
    at: DateTime<Utc>,
) -> Option<&'a BlobEntry>
where
    E: AsRef<BlobEntry> + 'a,
{
    let newer = later
        .iter()
        .map(AsRef::as_ref)
        .filter(|e| e.last_modified <= at)
        .filter(|e| base.is_none() || e.last_modified > base_scanned_at)
        // Ties go to the later scan.
        .fold(None::<&BlobEntry>, |best, e| match best {
            Some(b) if b.last_modified > e.last_modified => Some(b),
            _ => Some(e),
        });
    newer.or(base)
}

impl AsRef<BlobEntry> for BlobEntry {
    fn as_ref(&self) -> &BlobEntry {
        self
    }
}

/// Every scan of one blob source; derived from one listing of `manifests/<source>/`.
#[derive(Debug, Clone, Serialize)]
pub struct BlobCatalog {
    pub source: String,
    /// Oldest first.
    pub scans: Vec<ScanRef>,
}

/// Where a restore to an instant comes from: the base scan and the scans after it that can
/// hold versions put at or before the instant.
#[derive(Debug, Clone)]
pub struct BlobRestorePoint<'a> {
    pub base: &'a ScanRef,
    pub later: &'a [ScanRef],
}

/// The catalog of a blob source.
pub async fn load_catalog(repo: &Repository, source: &str) -> Result<BlobCatalog> {
    BlobCatalog::load(repo, source).await
}

impl BlobCatalog {
    /// The source's scans, without tombstoned ones (as `SourceCatalog::load`).
    pub async fn load(repo: &Repository, source: &str) -> Result<BlobCatalog> {
        let gone = repo.tombstoned_keys().await?;
        let mut keys = repo.list(&layout::manifest_prefix(source)).await?;
        keys.retain(|k| !gone.contains(k));
        Ok(Self::from_keys(source, &keys))
    }

    /// Pure: the catalog these keys describe. Keys that do not parse are ignored.
    pub fn from_keys(source: &str, keys: &[String]) -> BlobCatalog {
        let prefix = layout::manifest_prefix(source);
        let mut scans: Vec<ScanRef> = keys
            .iter()
            .filter_map(|key| {
                let name = key.strip_prefix(&prefix)?;
                Some(ScanRef {
                    scanned_at: time::parse_compact(name)?,
                    key: key.clone(),
                })
            })
            .collect();
        scans.sort_by_key(|s| s.scanned_at);
        BlobCatalog {
            source: source.to_string(),
            scans,
        }
    }

    /// The restorable window: from the first scan to the last (empty before the first scan).
    /// Scans never leave a gap: what happened between two scans is resolved by the rule above.
    pub fn windows(&self) -> Vec<Window> {
        match (self.scans.first(), self.scans.last()) {
            (Some(first), Some(last)) => vec![Window {
                oldest: first.scanned_at,
                newest: last.scanned_at,
            }],
            _ => Vec::new(),
        }
    }

    pub fn newest(&self) -> Option<DateTime<Utc>> {
        self.scans.last().map(|s| s.scanned_at)
    }

    pub fn latest(&self) -> Option<&ScanRef> {
        self.scans.last()
    }

    /// The scans a restore to `at` reads, or why `at` is not restorable.
    pub fn plan(&self, at: DateTime<Utc>) -> Result<BlobRestorePoint<'_>> {
        let newest = self.newest().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("blob source {} has no scans yet", self.source),
            )
            .with_hint("run a blob scan (`timevault backup` or the daemon's blob_scan) first")
        })?;
        let base = self
            .scans
            .iter()
            .rposition(|s| s.scanned_at <= at)
            .filter(|_| at <= newest)
            .ok_or_else(|| {
                let w = &self.windows()[0];
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "{} is outside the restorable window of blob source {}; restorable: {} .. {}",
                        at.to_rfc3339(),
                        self.source,
                        w.oldest.to_rfc3339(),
                        w.newest.to_rfc3339()
                    ),
                )
                .with_hint("choose a time inside the window, or `latest`")
            })?;
        let end = (base + 1 + LATER_SCANS).min(self.scans.len());
        Ok(BlobRestorePoint {
            base: &self.scans[base],
            later: &self.scans[base + 1..end],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&format!("2026-11-21T{s}Z"))
            .unwrap()
            .with_timezone(&Utc)
    }

    fn e(key: &str, put: &str, content: &str) -> BlobEntry {
        BlobEntry {
            key: key.into(),
            size: content.len() as u64,
            etag: Some(format!("{key}@{put}")),
            last_modified: t(put),
            content_type: None,
            sha256: content.into(),
            chunks: Vec::new(),
        }
    }

    fn scan(at: &str, entries: Vec<BlobEntry>) -> ScanListing {
        ScanListing {
            scanned_at: t(at),
            entries,
        }
    }

    /// `key=content` pairs of the state at `at`.
    fn state(scans: &[ScanListing], at: &str) -> Vec<String> {
        plan_blobs(scans, t(at))
            .expect("inside the window")
            .entries
            .iter()
            .map(|e| format!("{}={}", e.key, e.sha256))
            .collect()
    }

    /// 10:00 a, b; a overwritten 10:02; b deleted 10:03; c put 10:04; scans at 10:01, 10:05.
    fn history() -> Vec<ScanListing> {
        vec![
            scan(
                "10:01:00",
                vec![e("a", "09:00:00", "a1"), e("b", "09:30:00", "b1")],
            ),
            scan(
                "10:05:00",
                vec![e("a", "10:02:00", "a2"), e("c", "10:04:00", "c1")],
            ),
        ]
    }

    #[test]
    fn a_scan_instant_gives_exactly_that_scan() {
        let scans = history();
        assert_eq!(state(&scans, "10:01:00"), ["a=a1", "b=b1"]);
        assert_eq!(state(&scans, "10:05:00"), ["a=a2", "c=c1"]);
        assert!(plan_blobs(&scans, t("10:00:59")).is_none());
    }

    #[test]
    fn overwrite_counts_from_its_last_modified() {
        let scans = history();
        assert_eq!(state(&scans, "10:01:59"), ["a=a1", "b=b1"]);
        let plan = plan_blobs(&scans, t("10:02:00")).unwrap();
        assert_eq!(plan.entries[0].sha256, "a2");
        assert_eq!(plan.restored_to, t("10:02:00"));
        assert_eq!(plan.base, t("10:01:00"));
    }

    #[test]
    fn deletion_counts_from_the_scan_that_saw_it_gone() {
        let scans = history();
        // b was deleted at 10:03, but only the 10:05 scan knows: it stays until then.
        assert_eq!(state(&scans, "10:04:59"), ["a=a2", "b=b1", "c=c1"]);
        assert_eq!(state(&scans, "10:05:00"), ["a=a2", "c=c1"]);
    }

    #[test]
    fn object_put_between_scans_is_restorable_from_its_put_time() {
        let scans = history();
        assert_eq!(state(&scans, "10:03:59"), ["a=a2", "b=b1"]);
        let plan = plan_blobs(&scans, t("10:04:30")).unwrap();
        assert_eq!(plan.restored_to, t("10:04:00"));
        assert!(plan.entries.iter().any(|e| e.sha256 == "c1"));
    }

    #[test]
    fn recreated_key_is_absent_between_its_deletion_scan_and_its_new_put() {
        let scans = vec![
            scan("10:00:00", vec![e("k", "09:00:00", "v1")]),
            scan("10:05:00", vec![]),
            scan("10:10:00", vec![]),
            scan("10:15:00", vec![e("k", "10:12:00", "v2")]),
        ];
        assert_eq!(state(&scans, "10:04:00"), ["k=v1"]);
        assert!(state(&scans, "10:05:00").is_empty());
        assert!(state(&scans, "10:11:59").is_empty());
        assert_eq!(state(&scans, "10:12:00"), ["k=v2"]);
        assert_eq!(state(&scans, "10:15:00"), ["k=v2"]);
    }

    #[test]
    fn versions_that_lived_between_two_scans_are_never_seen() {
        // k: v1 at 09:00, v2 at 10:01 (never scanned), v3 at 10:03; scans 10:00 and 10:05.
        let scans = vec![
            scan("10:00:00", vec![e("k", "09:00:00", "v1")]),
            scan("10:05:00", vec![e("k", "10:03:00", "v3")]),
        ];
        assert_eq!(state(&scans, "10:02:00"), ["k=v1"]);
        assert_eq!(state(&scans, "10:03:00"), ["k=v3"]);
    }

    #[test]
    fn an_object_the_base_missed_while_listing_is_kept() {
        // p was put at 10:04:59 while the 10:05 scan was listing, after it had passed p's key;
        // the 10:10 scan lists it. It must exist from 10:04:59 on, also after 10:05.
        let scans = vec![
            scan("10:00:00", vec![]),
            scan("10:05:00", vec![]),
            scan("10:10:00", vec![e("p", "10:04:59", "p1")]),
        ];
        assert!(state(&scans, "10:04:58").is_empty());
        assert_eq!(state(&scans, "10:04:59"), ["p=p1"]);
        assert_eq!(state(&scans, "10:07:00"), ["p=p1"]);
    }

    #[test]
    fn a_listed_key_is_not_replaced_by_an_older_put_seen_later() {
        // Second-precision last-modified: k overwritten at 10:05:00.4 right after the scan at
        // 10:05:00.2, but the store says 10:05:00. The scan's own listing wins at its time.
        let scans = vec![
            scan("10:05:00.2", vec![e("k", "09:00:00", "v1")]),
            scan("10:10:00", vec![e("k", "10:05:00", "v2")]),
        ];
        assert_eq!(state(&scans, "10:05:00.2"), ["k=v1"]);
        assert_eq!(state(&scans, "10:09:00"), ["k=v1"]);
        assert_eq!(state(&scans, "10:10:00"), ["k=v2"]);
    }

    #[test]
    fn scans_beyond_the_next_two_do_not_change_the_plan() {
        let mut scans = history();
        scans.push(scan("10:10:00", vec![e("z", "10:07:00", "z1")]));
        scans.push(scan("10:15:00", vec![e("z", "10:07:00", "z1")]));
        let all = plan_blobs(&scans, t("10:03:00")).unwrap();
        let near = plan_blobs(&scans[..3], t("10:03:00")).unwrap();
        assert_eq!(all, near);
        assert_eq!(state(&scans, "10:07:00"), ["a=a2", "c=c1", "z=z1"]);
    }

    #[test]
    fn catalog_window_runs_from_first_to_last_scan() {
        let keys: Vec<String> = ["10:00:00", "10:05:00", "10:10:00", "10:15:00"]
            .iter()
            .map(|s| layout::manifest("files", &time::compact(t(s))))
            .chain(["manifests/files/garbage".to_string()])
            .collect();
        let cat = BlobCatalog::from_keys("files", &keys);
        assert_eq!(cat.scans.len(), 4);
        assert_eq!(
            cat.windows(),
            vec![Window {
                oldest: t("10:00:00"),
                newest: t("10:15:00")
            }]
        );
        let p = cat.plan(t("10:06:00")).unwrap();
        assert_eq!(p.base.scanned_at, t("10:05:00"));
        assert_eq!(p.later.len(), 2);
        assert_eq!(cat.plan(t("10:15:00")).unwrap().later.len(), 0);
        let err = cat.plan(t("10:15:01")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.to_string().contains("restorable"), "{err}");
        assert!(cat.plan(t("09:59:59")).is_err());
        assert!(BlobCatalog::from_keys("files", &[])
            .plan(t("10:00:00"))
            .is_err());
    }
}
