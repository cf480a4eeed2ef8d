//! Pure: from a source's catalog and the policy, the restore points kept (with why) and the
//! objects removed (with why), in the order they must be deleted.
//!
//! Databases (SQLite, PostgreSQL): a chain is the unit (`retention::plan`). A removed chain
//! loses its segments newest first and then its snapshot, so a prune interrupted half way
//! leaves a shorter chain that still restores correctly, never a snapshot with a hole in its
//! change log. A chain kept only as a calendar point loses its segments (newest first): its
//! restore point is the snapshot's instant.
//!
//! Blob sources: a scan is the unit. Scan `i` serves the instants from its own `scanned_at`
//! up to the next scan's (a restore to T reads the newest scan at or before T and the two
//! after it), so it is planned as a chain ending where the next scan starts. Every scan the
//! PITR window touches is kept, and with it every later scan, so the window restores as
//! before; a calendar point keeps just its scan, restorable at its `scanned_at`. A restore
//! between two scans whose neighbours were pruned is refused (see `points`).

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::catalog::blobs::BlobCatalog;
use crate::catalog::SourceCatalog;
use crate::config::RetentionConfig;
use crate::retention::{self, ChainSpan, Reason, RetentionPolicy};

/// A restore point that stays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeptPoint {
    /// The chain (databases) or scan (blobs), in compact time.
    pub id: String,
    pub start: DateTime<Utc>,
    /// The newest instant it restores after pruning.
    pub end: DateTime<Utc>,
    pub reasons: Vec<Reason>,
}

/// What kind of object a removal deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectKind {
    Snapshot,
    Segment,
    Scan,
    Audit,
    Drill,
}

/// One object to delete and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Removal {
    pub key: String,
    pub what: ObjectKind,
    pub reason: String,
}

/// The plan for one source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SourcePlan {
    pub kept: Vec<KeptPoint>,
    /// In deletion order.
    pub removed: Vec<Removal>,
}

/// The retention policy a config describes.
pub fn policy(config: &RetentionConfig) -> RetentionPolicy {
    let d = |d: std::time::Duration| chrono::Duration::from_std(d).expect("retention span fits");
    RetentionPolicy {
        pitr: d(config.pitr),
        daily: config.daily.map(d),
        weekly: config.weekly.map(d),
        monthly: config.monthly.map(d),
        yearly: config.yearly.map(d),
    }
}

fn span_text(start: DateTime<Utc>, end: DateTime<Utc>) -> String {
    format!("{} .. {}", start.to_rfc3339(), end.to_rfc3339())
}

fn outside(policy: &RetentionPolicy, now: DateTime<Utc>) -> String {
    format!(
        "before the PITR window (from {}) and not a kept daily/weekly/monthly/yearly point",
        (now - policy.pitr).to_rfc3339()
    )
}

/// Pure: the plan for a database source.
pub fn plan_chains(
    catalog: &SourceCatalog,
    policy: &RetentionPolicy,
    now: DateTime<Utc>,
) -> SourcePlan {
    let spans: Vec<ChainSpan> = catalog
        .chains
        .iter()
        .map(|c| ChainSpan {
            id: c.id().to_string(),
            start: c.start(),
            end: c.end(),
        })
        .collect();
    let decided = retention::plan(&spans, policy, now);
    let mut out = SourcePlan::default();
    for chain in &catalog.chains {
        let span = span_text(chain.start(), chain.end());
        // A superseded holder's segments go with the segments they shadow.
        let segments_newest_first = chain.segments.iter().chain(&chain.superseded).rev();
        match decided.keep.iter().find(|d| d.chain == chain.id()) {
            Some(d) => {
                let end = if d.keep_segments {
                    chain.end()
                } else {
                    chain.start()
                };
                if !d.keep_segments {
                    let reason = format!(
                        "chain {span} is kept only as a calendar point: restorable at {} only",
                        chain.start().to_rfc3339()
                    );
                    out.removed.extend(segments_newest_first.map(|s| Removal {
                        key: s.key.clone(),
                        what: ObjectKind::Segment,
                        reason: reason.clone(),
                    }));
                }
                out.kept.push(KeptPoint {
                    id: chain.id().to_string(),
                    start: chain.start(),
                    end,
                    reasons: d.reasons.clone(),
                });
            }
            None => {
                let reason = format!("chain {span} is {}", outside(policy, now));
                out.removed.extend(segments_newest_first.map(|s| Removal {
                    key: s.key.clone(),
                    what: ObjectKind::Segment,
                    reason: reason.clone(),
                }));
                out.removed.push(Removal {
                    key: chain.snapshot.key.clone(),
                    what: ObjectKind::Snapshot,
                    reason,
                });
            }
        }
    }
    out
}

/// Pure: the plan for a blob source.
pub fn plan_scans(
    catalog: &BlobCatalog,
    policy: &RetentionPolicy,
    now: DateTime<Utc>,
) -> SourcePlan {
    let spans: Vec<ChainSpan> = catalog
        .scans
        .iter()
        .enumerate()
        .map(|(i, s)| ChainSpan {
            id: s.key.clone(),
            start: s.scanned_at,
            end: catalog
                .scans
                .get(i + 1)
                .map_or(s.scanned_at, |next| next.scanned_at),
        })
        .collect();
    let decided = retention::plan(&spans, policy, now);
    let mut out = SourcePlan::default();
    for (scan, span) in catalog.scans.iter().zip(&spans) {
        match decided.keep.iter().find(|d| d.chain == scan.key) {
            Some(d) => out.kept.push(KeptPoint {
                id: crate::time::compact(scan.scanned_at),
                start: scan.scanned_at,
                end: if d.keep_segments {
                    span.end
                } else {
                    span.start
                },
                reasons: d.reasons.clone(),
            }),
            None => out.removed.push(Removal {
                key: scan.key.clone(),
                what: ObjectKind::Scan,
                reason: format!(
                    "scan serving {} is {}",
                    span_text(span.start, span.end),
                    outside(policy, now)
                ),
            }),
        }
    }
    out
}

/// Pure: audit records older than `keep` (by the time in their key) go; younger ones and keys
/// that do not parse stay.
pub fn plan_audit(keys: &[String], keep: chrono::Duration, now: DateTime<Utc>) -> Vec<Removal> {
    let cutoff = now - keep;
    keys.iter()
        .filter_map(|key| {
            let name = key.strip_prefix(crate::repo::layout::AUDIT)?;
            let (stamp, _) = name.rsplit_once('-')?;
            let at = crate::time::parse_compact(stamp)?;
            (at < cutoff).then(|| Removal {
                key: key.clone(),
                what: ObjectKind::Audit,
                reason: format!(
                    "audit record of {} is older than the audit retention (kept from {})",
                    at.to_rfc3339(),
                    cutoff.to_rfc3339()
                ),
            })
        })
        .collect()
}

/// Pure: drill records (`drills/<source>/<compact time>`) older than `keep` go, except the newest
/// of each source (`status` and `/healthz` report it); keys whose time does not parse stay.
/// Drill records are the evidence that restores are tested, so they share the audit horizon.
pub fn plan_drills(keys: &[String], keep: chrono::Duration, now: DateTime<Utc>) -> Vec<Removal> {
    let cutoff = now - keep;
    let mut dated: Vec<(&str, DateTime<Utc>, &String)> = keys
        .iter()
        .filter_map(|key| {
            let (source, stamp) = key
                .strip_prefix(crate::repo::layout::DRILLS)?
                .rsplit_once('/')?;
            Some((source, crate::time::parse_compact(stamp)?, key))
        })
        .collect();
    dated.sort();
    let newest: std::collections::BTreeMap<&str, DateTime<Utc>> =
        dated.iter().map(|(source, at, _)| (*source, *at)).collect();
    dated
        .into_iter()
        .filter(|(source, at, _)| *at < cutoff && newest.get(source) != Some(at))
        .map(|(source, at, key)| Removal {
            key: key.clone(),
            what: ObjectKind::Drill,
            reason: format!(
                "drill record of {source} at {} is older than the audit retention (kept from {}) and not the newest",
                at.to_rfc3339(),
                cutoff.to_rfc3339()
            ),
        })
        .collect()
}

#[cfg(test)]
mod tests;
