//! The catalog: per source, which snapshots and change-log segments exist, and so which
//! instants can be restored.
//!
//! It is derived, never stored: object keys carry the chain, sequence number and capture time
//! (see `repo::layout`), so one listing per prefix rebuilds it. A **chain** is one snapshot
//! followed by the segments captured after it. A chain started by rotation begins exactly where
//! the previous one ended, so their windows touch; a chain started because continuity was lost
//! (the change log could not prove nothing was missed) begins later, and the gap between them is
//! not restorable and shows in `status`.

mod any;
pub mod blobs;
pub mod lag;

pub use crate::rowsum;
pub use any::{Catalog, ManifestPlan};
mod snapshot;

pub use rowsum::TableSum;
pub use snapshot::{SnapshotManifest, SnapshotReason};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::repo::{layout, Repository};
use crate::time;

/// A snapshot that starts a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotEntry {
    pub source: String,
    pub chain: String,
    pub taken_at: DateTime<Utc>,
    pub key: String,
}

/// One change-log segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SegmentEntry {
    pub chain: String,
    pub seq: u64,
    pub captured_at: DateTime<Utc>,
    pub key: String,
    /// The epoch of the source lease it was written under (`None` in keys written without one,
    /// or before epochs existed).
    pub lease_epoch: Option<u64>,
}

/// A snapshot and the segments that apply on top of it, in order.
#[derive(Debug, Clone, Serialize)]
pub struct Chain {
    pub snapshot: SnapshotEntry,
    pub segments: Vec<SegmentEntry>,
    /// Segments a superseded lease holder wrote (a writer that stalled past its lease's expiry
    /// while another took over): never restored, reported by `verify`, deleted with the chain.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub superseded: Vec<SegmentEntry>,
}

impl Chain {
    pub fn id(&self) -> &str {
        &self.snapshot.chain
    }

    pub fn start(&self) -> DateTime<Utc> {
        self.snapshot.taken_at
    }

    /// The newest instant this chain can restore: its last capture.
    pub fn end(&self) -> DateTime<Utc> {
        self.segments.last().map_or(self.snapshot.taken_at, |s| {
            s.captured_at.max(self.snapshot.taken_at)
        })
    }

    /// The first hole in the sequence numbers (a segment missing on every replica), if any.
    /// Sequence numbers run 1, 2, 3... after the snapshot; a repeated number (a retried
    /// capture) is not a hole.
    pub fn first_gap(&self) -> Option<Gap> {
        let mut expected = 1u64;
        let mut exact = self.snapshot.taken_at;
        for s in &self.segments {
            if s.seq + 1 == expected {
                exact = exact.max(s.captured_at);
                continue;
            }
            if s.seq != expected {
                return Some(Gap {
                    missing: layout::segment_seq_prefix(
                        &self.snapshot.source,
                        &self.snapshot.chain,
                        expected,
                    ),
                    exact_until: exact,
                });
            }
            exact = exact.max(s.captured_at);
            expected += 1;
        }
        None
    }

    /// Move the segments of superseded lease holders to `superseded`. Lease epochs only grow
    /// from one holder to the next, and each holder continues the chain where the catalog it
    /// read ended, so along the sequence numbers epochs never fall. A segment whose epoch is
    /// below that of an earlier sequence number, or below another segment's of the same
    /// number, was written by a holder whose lease had already been taken over. Segments
    /// without an epoch are never set aside (written without a lease, or before epochs).
    fn set_aside_superseded(&mut self) {
        let segments = std::mem::take(&mut self.segments);
        let mut floor: Option<u64> = None;
        let mut i = 0;
        while i < segments.len() {
            let seq = segments[i].seq;
            let group_end = segments[i..]
                .iter()
                .position(|s| s.seq != seq)
                .map_or(segments.len(), |n| i + n);
            let group = &segments[i..group_end];
            let top = group.iter().filter_map(|s| s.lease_epoch).max();
            for s in group {
                let stale = s
                    .lease_epoch
                    .is_some_and(|e| top.is_some_and(|t| e < t) || floor.is_some_and(|f| e < f));
                if stale {
                    self.superseded.push(s.clone());
                } else {
                    floor = floor.max(s.lease_epoch);
                    self.segments.push(s.clone());
                }
            }
            i = group_end;
        }
    }

    /// Segments to apply for a restore to `at`.
    pub fn segments_until(&self, at: DateTime<Utc>) -> &[SegmentEntry] {
        let n = self.segments.partition_point(|s| s.captured_at <= at);
        &self.segments[..n]
    }
}

/// A hole in a chain's change log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    /// The missing segment's key prefix (`changelog/<source>/<chain>/<seq>-`).
    pub missing: String,
    /// The newest instant of the chain that can still be restored exactly.
    pub exact_until: DateTime<Utc>,
}

impl Gap {
    /// The error of a restore that would have to cross the hole.
    pub fn error(&self, source: &str) -> Error {
        Error::corrupt(format!(
            "change-log segment {}* of source {source} is missing on every replica: the chain has a hole; it restores exactly only up to {}",
            self.missing,
            self.exact_until.to_rfc3339()
        ))
        .with_hint(format!(
            "restore to {} or earlier (or to an instant of a later chain); `timevault verify` lists every hole",
            self.exact_until.to_rfc3339()
        ))
    }
}

/// A span of restorable instants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    pub oldest: DateTime<Utc>,
    pub newest: DateTime<Utc>,
}

/// Everything known about one source's backups.
#[derive(Debug, Clone, Serialize)]
pub struct SourceCatalog {
    pub source: String,
    pub chains: Vec<Chain>,
    /// The instant up to which the daemon capturing this source confirmed that nothing was
    /// committed after its newest capture ([`SourceCatalog::confirm`]): the newest chain's
    /// window reaches it without an object written per idle second.
    pub confirmed: Option<DateTime<Utc>>,
}

/// What the daemon publishes in its lease record about a source (the part a reader trusts).
#[derive(Debug, Clone, Default, serde::Deserialize)]
struct LeaseNote {
    #[serde(default)]
    confirmed_until: Option<DateTime<Utc>>,
}

/// Where a restore to an instant comes from.
#[derive(Debug, Clone)]
pub struct RestorePoint<'a> {
    pub chain: &'a Chain,
    pub segments: &'a [SegmentEntry],
    /// The instant whose state this restores: the last applied capture, or the snapshot.
    pub effective: DateTime<Utc>,
}

impl SourceCatalog {
    /// Build from one listing of the source's snapshots and change log, without what a prune
    /// removed or is removing (tombstoned keys: a replica that was down may still list them,
    /// and a reader must never plan what is being deleted, `repo::claim`).
    pub async fn load(repo: &Repository, source: &str) -> Result<SourceCatalog> {
        let gone = repo.tombstoned_keys().await?;
        let mut snapshots = repo.list(&layout::snapshot_prefix(source)).await?;
        let mut segments = repo.list(&layout::changelog_prefix(source)).await?;
        snapshots.retain(|k| !gone.contains(k));
        segments.retain(|k| !gone.contains(k));
        Ok(Self::from_keys(source, &snapshots, &segments))
    }

    /// Pure: the catalog that these keys describe. Keys that do not parse are ignored.
    pub fn from_keys(
        source: &str,
        snapshot_keys: &[String],
        segment_keys: &[String],
    ) -> SourceCatalog {
        let mut chains: Vec<Chain> = snapshot_keys
            .iter()
            .filter_map(|key| {
                let chain = key.strip_prefix(&layout::snapshot_prefix(source))?;
                Some(Chain {
                    snapshot: SnapshotEntry {
                        source: source.to_string(),
                        chain: chain.to_string(),
                        taken_at: time::parse_compact(chain)?,
                        key: key.clone(),
                    },
                    segments: Vec::new(),
                    superseded: Vec::new(),
                })
            })
            .collect();
        chains.sort_by_key(|c| c.snapshot.taken_at);
        for key in segment_keys {
            let Some(entry) = parse_segment_key(source, key) else {
                continue;
            };
            if let Some(chain) = chains.iter_mut().find(|c| c.snapshot.chain == entry.chain) {
                chain.segments.push(entry);
            }
        }
        for chain in &mut chains {
            chain.segments.sort_by_key(|s| (s.seq, s.captured_at));
            chain.set_aside_superseded();
        }
        SourceCatalog {
            source: source.to_string(),
            chains,
            confirmed: None,
        }
    }

    pub fn latest_chain(&self) -> Option<&Chain> {
        self.chains.last()
    }

    /// Restorable windows, oldest first; touching chains merge into one window.
    pub fn windows(&self) -> Vec<Window> {
        let mut windows: Vec<Window> = Vec::new();
        for chain in &self.chains {
            let end = self.end_of(chain);
            match windows.last_mut() {
                Some(w) if chain.start() <= w.newest => w.newest = w.newest.max(end),
                _ => windows.push(Window {
                    oldest: chain.start(),
                    newest: end,
                }),
            }
        }
        windows
    }

    /// The newest restorable instant.
    pub fn newest(&self) -> Option<DateTime<Utc>> {
        self.chains.iter().map(|c| self.end_of(c)).max()
    }

    /// The last instant `chain` restores: its newest capture, or for the newest chain without
    /// a hole, the instant the capturing daemon confirmed nothing changed after it.
    fn end_of(&self, chain: &Chain) -> DateTime<Utc> {
        let newest_chain = self.chains.last().is_some_and(|c| std::ptr::eq(c, chain));
        match self.confirmed {
            Some(t) if newest_chain && chain.first_gap().is_none() => chain.end().max(t),
            _ => chain.end(),
        }
    }

    /// [`SourceCatalog::load`], then [`SourceCatalog::confirm`] for a reader about to resolve
    /// `at`: a given instant waits (up to one lease renewal) for the live daemon to confirm it.
    pub async fn load_for(
        repo: &Repository,
        source: &str,
        at: crate::time::At,
    ) -> Result<SourceCatalog> {
        let mut catalog = SourceCatalog::load(repo, source).await?;
        let wanted = match at {
            crate::time::At::Instant(t) => Some(t),
            crate::time::At::Latest => None,
        };
        catalog
            .confirm(repo, wanted, repo.lease_renewal_interval())
            .await?;
        Ok(catalog)
    }

    /// Read what the daemon capturing this source confirmed (its lease record's note): trusted
    /// only while that daemon holds the lease (not released, not expired). `wait_for`: an
    /// instant the caller wants confirmed; while the daemon is live and has not yet confirmed
    /// it (the note is published with each lease renewal, every `lease_ttl / 3`), read again
    /// every second for up to `max_wait`.
    pub async fn confirm(
        &mut self,
        repo: &Repository,
        wait_for: Option<DateTime<Utc>>,
        max_wait: std::time::Duration,
    ) -> Result<()> {
        let deadline = std::time::Instant::now() + max_wait;
        let mut said = false;
        loop {
            let held = daemon_note(repo, &self.source).await?;
            self.confirmed = held.as_ref().and_then(|n| n.confirmed_until);
            let Some(wanted) = wait_for else {
                return Ok(());
            };
            let reached = self.newest().is_some_and(|n| n >= wanted);
            if reached
                || held.is_none()
                || wanted > crate::clock::now()
                || std::time::Instant::now() >= deadline
            {
                return Ok(());
            }
            if !said {
                tracing::warn!(source = %self.source, at = %wanted.to_rfc3339(), "waiting (up to {} s) for the daemon capturing the source to confirm the instant with its next lease renewal", max_wait.as_secs());
                said = true;
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }

    /// The instant `at` names: `latest` is the newest restorable instant.
    pub fn resolve(&self, at: crate::time::At) -> Result<DateTime<Utc>> {
        match at {
            crate::time::At::Instant(t) => Ok(t),
            crate::time::At::Latest => self.newest().ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("source {} has no backups yet", self.source),
                )
                .with_hint("run `timevault backup` or `timevault daemon --once` first")
            }),
        }
    }

    /// Choose the chain and segments for a restore to `at`, or explain why `at` is not
    /// restorable.
    pub fn plan(&self, at: DateTime<Utc>) -> Result<RestorePoint<'_>> {
        let chain = self
            .chains
            .iter()
            .rev()
            .find(|c| c.start() <= at)
            .filter(|c| at <= self.end_of(c))
            .ok_or_else(|| self.outside_window(at))?;
        if let Some(gap) = chain.first_gap().filter(|g| at > g.exact_until) {
            return Err(gap.error(&self.source));
        }
        let segments = chain.segments_until(at);
        let effective = segments
            .last()
            .map_or(chain.start(), |s| s.captured_at.max(chain.start()));
        Ok(RestorePoint {
            chain,
            segments,
            effective,
        })
    }

    fn outside_window(&self, at: DateTime<Utc>) -> Error {
        let windows = self.windows();
        if windows.is_empty() {
            return Error::new(
                ErrorKind::NotFound,
                format!("source {} has no backups yet", self.source),
            )
            .with_hint("run `timevault backup` or `timevault daemon --once` first");
        }
        let listed: Vec<String> = windows
            .iter()
            .map(|w| format!("{} .. {}", w.oldest.to_rfc3339(), w.newest.to_rfc3339()))
            .collect();
        Error::new(
            ErrorKind::NotFound,
            format!(
                "{} is outside the restorable window of source {}; restorable: {}",
                at.to_rfc3339(),
                self.source,
                listed.join(", ")
            ),
        )
        .with_hint("choose a time inside a listed window, or `latest`")
    }
}

fn parse_segment_key(source: &str, key: &str) -> Option<SegmentEntry> {
    let rest = key.strip_prefix(&layout::changelog_prefix(source))?;
    let (chain, name) = rest.split_once('/')?;
    let (seq, captured, lease_epoch) = layout::segment_name(name)?;
    Some(SegmentEntry {
        chain: chain.to_string(),
        seq,
        captured_at: time::parse_compact(captured)?,
        key: key.to_string(),
        lease_epoch,
    })
}

/// The note of the daemon holding `source`'s lease, if one holds it now (not released, not
/// expired); `None` when no daemon vouches for the source.
async fn daemon_note(repo: &Repository, source: &str) -> Result<Option<LeaseNote>> {
    let scope = crate::repo::source_lease_scope(source);
    let Some(record) = repo.read_lease(&scope).await? else {
        return Ok(None);
    };
    if record.released || record.expires_at <= crate::clock::now() {
        return Ok(None);
    }
    let mut note: LeaseNote = record
        .note
        .and_then(|n| serde_json::from_value(n).ok())
        .unwrap_or_default();
    note.confirmed_until = note.confirmed_until.filter(|t| *t <= record.expires_at);
    Ok(Some(note))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn snap(at: &str) -> String {
        layout::snapshot("app", &time::compact(t(at)))
    }

    fn seg(chain_at: &str, seq: u64, at: &str) -> String {
        layout::segment(
            "app",
            &time::compact(t(chain_at)),
            seq,
            &time::compact(t(at)),
            None,
        )
    }

    #[test]
    fn windows_merge_touching_chains_and_show_gaps() {
        let c1 = "2026-11-21T10:00:00Z";
        let c2 = "2026-11-21T11:00:00Z"; // rotation: c1's last segment is at c2's start
        let c3 = "2026-11-21T12:30:00Z"; // after a gap
        let cat = SourceCatalog::from_keys(
            "app",
            &[snap(c2), snap(c1), snap(c3)],
            &[
                seg(c1, 1, "2026-11-21T10:00:05Z"),
                seg(c1, 2, c2),
                seg(c2, 1, "2026-11-21T11:30:00Z"),
                seg(c3, 1, "2026-11-21T12:31:00Z"),
                "changelog/app/garbage".into(),
            ],
        );
        assert_eq!(cat.chains.len(), 3);
        assert_eq!(
            cat.windows(),
            vec![
                Window {
                    oldest: t(c1),
                    newest: t("2026-11-21T11:30:00Z")
                },
                Window {
                    oldest: t(c3),
                    newest: t("2026-11-21T12:31:00Z")
                },
            ]
        );
        let p = cat.plan(t("2026-11-21T10:30:00Z")).unwrap();
        assert_eq!(p.chain.id(), time::compact(t(c1)));
        assert_eq!(p.segments.len(), 1);
        assert_eq!(p.effective, t("2026-11-21T10:00:05Z"));
        let p = cat.plan(t(c2)).unwrap();
        assert_eq!(p.chain.id(), time::compact(t(c2)));
        assert!(p.segments.is_empty());
        let err = cat.plan(t("2026-11-21T12:00:00Z")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(
            err.to_string()
                .contains("2026-11-21T10:00:00+00:00 .. 2026-11-21T11:30:00+00:00"),
            "{err}"
        );
        assert!(cat.plan(t("2026-11-21T09:00:00Z")).is_err());
        assert_eq!(cat.newest(), Some(t("2026-11-21T12:31:00Z")));
    }

    #[test]
    fn a_missing_segment_refuses_restores_past_it() {
        let c1 = "2026-11-21T10:00:00Z";
        let cat = SourceCatalog::from_keys(
            "app",
            &[snap(c1)],
            &[
                seg(c1, 1, "2026-11-21T10:00:05Z"),
                seg(c1, 1, "2026-11-21T10:00:06Z"),
                seg(c1, 2, "2026-11-21T10:00:10Z"),
                seg(c1, 4, "2026-11-21T10:00:20Z"),
            ],
        );
        let gap = cat.chains[0].first_gap().expect("seq 3 is missing");
        assert_eq!(gap.exact_until, t("2026-11-21T10:00:10Z"));
        assert!(gap.missing.ends_with("/0000000003-"), "{}", gap.missing);
        assert_eq!(
            cat.plan(t("2026-11-21T10:00:10Z")).unwrap().segments.len(),
            3
        );
        let err = cat.plan(t("2026-11-21T10:00:11Z")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.to_string().contains("0000000003-"), "{err}");
        let whole =
            SourceCatalog::from_keys("app", &[snap(c1)], &[seg(c1, 1, "2026-11-21T10:00:05Z")]);
        assert_eq!(whole.chains[0].first_gap(), None);
    }

    #[test]
    fn duplicate_sequence_numbers_keep_capture_order() {
        let c1 = "2026-11-21T10:00:00Z";
        let cat = SourceCatalog::from_keys(
            "app",
            &[snap(c1)],
            &[
                seg(c1, 2, "2026-11-21T10:00:09Z"),
                seg(c1, 1, "2026-11-21T10:00:05Z"),
                seg(c1, 1, "2026-11-21T10:00:07Z"),
            ],
        );
        let seqs: Vec<_> = cat.chains[0]
            .segments
            .iter()
            .map(|s| (s.seq, s.captured_at))
            .collect();
        assert_eq!(seqs[0], (1, t("2026-11-21T10:00:05Z")));
        assert_eq!(seqs[1], (1, t("2026-11-21T10:00:07Z")));
        assert_eq!(seqs[2].0, 2);
    }

    #[test]
    fn segments_of_a_superseded_lease_holder_are_set_aside() {
        let chain = "20261207T000000.000000Z";
        let snapshots = vec![layout::snapshot("app", chain)];
        let key = |seq: u64, sec: u32, epoch: Option<u64>| {
            layout::segment(
                "app",
                chain,
                seq,
                &format!("20261207T0000{sec:02}.000000Z"),
                epoch,
            )
        };
        // Holder 5 writes 1 and 2; holder 7 takes over and writes 2 again (it had read the
        // catalog before the stalled holder's 2 landed) and 3; the stalled holder 5 also writes
        // 3; an unleased writer's 4 (no epoch) is never set aside.
        let segments = vec![
            key(1, 1, Some(5)),
            key(2, 2, Some(5)),
            key(2, 3, Some(7)),
            key(3, 4, Some(5)),
            key(3, 5, Some(7)),
            key(4, 6, None),
        ];
        let catalog = SourceCatalog::from_keys("app", &snapshots, &segments);
        let c = &catalog.chains[0];
        let kept: Vec<&str> = c.segments.iter().map(|s| s.key.as_str()).collect();
        let set_aside: Vec<&str> = c.superseded.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(
            kept,
            [&segments[0], &segments[2], &segments[4], &segments[5]]
        );
        assert_eq!(set_aside, [&segments[1], &segments[3]]);
        assert_eq!(c.first_gap(), None);

        // A takeover that continues the chain (epochs rise along it) sets nothing aside, and
        // neither do keys written before epochs existed.
        let segments = vec![
            key(1, 1, None),
            key(2, 2, Some(5)),
            key(3, 3, Some(5)),
            key(4, 4, Some(9)),
        ];
        let catalog = SourceCatalog::from_keys("app", &snapshots, &segments);
        assert_eq!(catalog.chains[0].segments.len(), 4);
        assert!(catalog.chains[0].superseded.is_empty());
    }
}
