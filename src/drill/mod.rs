//! Restore drills: backups are only as good as the last restore that worked, so timevault
//! restores them regularly, into scratch targets, and checks what it gets back.
//!
//! Per source a drill restores two points (docs/ARCHITECTURE.md, "Restore drills"):
//! * a **recent** random instant in the newest restorable window (within its last 7 days);
//! * the **monthly** point: the newest snapshot (or blob scan) of the previous calendar month,
//!   or the oldest kept one when the previous month has none.
//!
//! Each is restored into a scratch target ([`scratch`]): a temporary SQLite file, a temporary
//! PostgreSQL database on the source's server (created and dropped), or a temporary directory
//! for blobs. The restore itself authenticates every object and checks the image hashes; the
//! drill then compares the rebuilt data with the checksums recorded when the backup was taken
//! (row-content checksums per table, SHA-256 per blob). The result, with the measured restore
//! time (RTO), is stored as `drills/<source>/<compact time>` like every other object. A failed
//! drill is a result too: it is recorded, and the caller makes it loud.

pub mod scratch;

use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::archive::Kind;
use crate::catalog::Catalog;
use crate::catalog::Window;
use crate::config::SourceConfig;
use crate::error::{Error, Result};
use crate::repo::{layout, ReadPurpose, Repository};
use crate::time;

/// How far back from the newest instant the recent point is drawn.
pub const RECENT_SPAN: Duration = Duration::days(7);

/// Which point of a source's history a check restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointKind {
    /// A random instant in the newest window.
    Recent,
    /// The newest snapshot of the previous calendar month (or the oldest kept one).
    Monthly,
    /// The instant the live database was read at, compared with the live database (SQLite,
    /// when the drill runs where the source's capture runs).
    Live,
}

impl PointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PointKind::Recent => "recent",
            PointKind::Monthly => "monthly",
            PointKind::Live => "live",
        }
    }
}

/// One restore of one point, and what was checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillCheck {
    pub point: PointKind,
    pub requested: DateTime<Utc>,
    /// The instant whose state was restored (the last change applied).
    pub restored_to: Option<DateTime<Utc>>,
    /// The chain (or base scan) restored from.
    pub chain: Option<String>,
    /// Wall time of the restore: the recovery time this point would take, as measured.
    pub rto_seconds: f64,
    /// Bytes restored; rows or objects compared against the checksums recorded at backup time.
    pub bytes: u64,
    pub rows_checked: u64,
    pub objects_checked: u64,
    /// What was verified, in words (docs/ARCHITECTURE.md says what each proves).
    pub verified: Vec<String>,
    pub ok: bool,
    pub error: Option<String>,
}

/// The outcome of one source's drill: `drills/<source>/<compact started_at>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillRecord {
    pub source: String,
    pub kind: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub ok: bool,
    /// Why it failed: the first failing check, or why no check could run.
    pub error: Option<String>,
    pub checks: Vec<DrillCheck>,
}

impl DrillRecord {
    pub fn key(&self) -> String {
        layout::drill(&self.source, &time::compact(self.started_at))
    }

    /// Store the record on every replica.
    pub async fn write(&self, repo: &Repository) -> Result<()> {
        let json = serde_json::to_vec(self).expect("drill record serializes");
        repo.write_object(Kind::Drill, &self.key(), json).await?;
        Ok(())
    }

    pub async fn read(repo: &Repository, key: &str) -> Result<DrillRecord> {
        let bytes = repo.read_object(Kind::Drill, key).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(format!("drill record {key}: unreadable")).with_source(e))
    }

    /// The newest recorded drill of `source`, if any.
    pub async fn latest(repo: &Repository, source: &str) -> Result<Option<DrillRecord>> {
        let keys = repo.list(&layout::drill_prefix(source)).await?;
        match keys
            .iter()
            .filter(|k| time::parse_compact(k.rsplit('/').next().unwrap_or("")).is_some())
            .max()
        {
            Some(key) => DrillRecord::read(repo, key).await.map(Some),
            None => Ok(None),
        }
    }

    /// Total restore wall time over the checks.
    pub fn rto_seconds(&self) -> f64 {
        self.checks.iter().map(|c| c.rto_seconds).sum()
    }
}

/// The points to restore (pure): the recent instant at `fraction` (0..1) of the way through the
/// last [`RECENT_SPAN`] of the newest window, and the monthly point among `restore_points`
/// (snapshot or scan instants, any order).
pub fn plan_points(
    windows: &[Window],
    restore_points: &[DateTime<Utc>],
    now: DateTime<Utc>,
    fraction: f64,
) -> Vec<(PointKind, DateTime<Utc>)> {
    let mut points = Vec::new();
    if let Some(w) = windows.last() {
        let from = w.oldest.max(w.newest - RECENT_SPAN);
        let span = (w.newest - from).num_microseconds().unwrap_or(0) as f64;
        let offset = Duration::microseconds((span * fraction.clamp(0.0, 1.0)) as i64);
        points.push((PointKind::Recent, time::micros(from + offset)));
    }
    let this_month = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .single()
        .expect("first of the month exists");
    let last_month = (this_month - Duration::days(1)).with_day(1).expect("day 1");
    let in_last_month = restore_points
        .iter()
        .filter(|t| **t >= last_month && **t < this_month)
        .max();
    if let Some(t) = in_last_month.or_else(|| restore_points.iter().min()) {
        points.push((PointKind::Monthly, *t));
    }
    points
}

/// Drill one source now: plan its points, restore and check each, store the record. Failures
/// of a check are in the record; an `Err` means the record itself could not be stored.
pub async fn drill_source(repo: &Repository, source: &SourceConfig) -> Result<DrillRecord> {
    drill_source_with(repo, source, None).await
}

/// [`drill_source`], plus a restore of `live.at` compared with the live database's checksums
/// read at that instant: a backup that only agrees with itself would not show changes that
/// were never captured.
pub async fn drill_source_with(
    repo: &Repository,
    source: &SourceConfig,
    live: Option<&crate::source::sqlite::LivePoint>,
) -> Result<DrillRecord> {
    repo.reading(
        &[&source.name],
        ReadPurpose::Drill,
        drill_source_with_held(repo, source, live),
    )
    .await?
}

/// [`drill_source_with`] under the read claim it takes.
async fn drill_source_with_held(
    repo: &Repository,
    source: &SourceConfig,
    live: Option<&crate::source::sqlite::LivePoint>,
) -> Result<DrillRecord> {
    let started_at = time::micros(Utc::now());
    let clock = std::time::Instant::now();
    let (windows, points) = match restore_points(repo, source).await {
        Ok(v) => v,
        Err(e) => {
            return finish(repo, source, started_at, Vec::new(), Some(e.to_string())).await;
        }
    };
    let planned = plan_points(&windows, &points, started_at, rand::random::<f64>());
    if planned.is_empty() {
        let why = format!("source {} has no backups to restore yet", source.name);
        return finish(repo, source, started_at, Vec::new(), Some(why)).await;
    }
    let mut checks = Vec::new();
    for (kind, at) in planned {
        let exact = points.contains(&at);
        let check = scratch::restore_and_check(repo, source, kind, at, exact).await;
        if !check.ok {
            tracing::error!(source = %source.name, point = kind.as_str(), at = %at.to_rfc3339(), error = check.error.as_deref().unwrap_or(""), "restore drill check FAILED");
        }
        checks.push(check);
    }
    if let Some(live) = live {
        let check = scratch::restore_and_compare_live(repo, source, live).await;
        if !check.ok {
            tracing::error!(source = %source.name, at = %live.at.to_rfc3339(), error = check.error.as_deref().unwrap_or(""), "restore drill: the backup differs from the live database");
        }
        checks.push(check);
    }
    tracing::info!(source = %source.name, seconds = clock.elapsed().as_secs_f64(), "restore drill done");
    finish(repo, source, started_at, checks, None).await
}

async fn finish(
    repo: &Repository,
    source: &SourceConfig,
    started_at: DateTime<Utc>,
    checks: Vec<DrillCheck>,
    error: Option<String>,
) -> Result<DrillRecord> {
    let error = error.or_else(|| {
        checks.iter().find(|c| !c.ok).map(|c| {
            format!(
                "{} point {}: {}",
                c.point.as_str(),
                c.requested.to_rfc3339(),
                c.error.clone().unwrap_or_default()
            )
        })
    });
    let record = DrillRecord {
        source: source.name.clone(),
        kind: source.kind().to_string(),
        started_at,
        finished_at: Utc::now(),
        ok: error.is_none(),
        error,
        checks,
    };
    if let Some(e) = &record.error {
        tracing::error!(source = %record.source, error = %e, "restore drill FAILED");
    }
    record
        .write(repo)
        .await
        .map_err(|e| e.context(format!("storing the drill record of {}", record.source)))?;
    Ok(record)
}

/// The source's restorable windows and its snapshot (or scan) instants.
async fn restore_points(
    repo: &Repository,
    source: &SourceConfig,
) -> Result<(Vec<Window>, Vec<DateTime<Utc>>)> {
    let catalog = Catalog::load(repo, source).await?;
    Ok((catalog.windows(), catalog.images()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn w(a: &str, b: &str) -> Window {
        Window {
            oldest: t(a),
            newest: t(b),
        }
    }

    #[test]
    fn monthly_point_is_the_newest_snapshot_of_the_previous_month() {
        let snaps = [
            t("2026-09-30T02:00:00Z"),
            t("2026-10-01T02:00:00Z"),
            t("2026-10-31T02:00:00Z"),
            t("2026-11-01T02:00:00Z"),
        ];
        let windows = [w("2026-09-30T02:00:00Z", "2026-11-22T00:00:00Z")];
        let points = plan_points(&windows, &snaps, t("2026-11-22T01:00:00Z"), 0.5);
        assert_eq!(points[1], (PointKind::Monthly, t("2026-10-31T02:00:00Z")));
        // January looks back into December of the previous year.
        let points = plan_points(
            &windows,
            &[t("2025-12-31T23:59:59Z")],
            t("2026-01-15T00:00:00Z"),
            0.0,
        );
        assert_eq!(points[1].1, t("2025-12-31T23:59:59Z"));
    }

    #[test]
    fn monthly_point_falls_back_to_the_oldest_snapshot() {
        let snaps = [t("2026-11-10T02:00:00Z"), t("2026-11-05T02:00:00Z")];
        let windows = [w("2026-11-05T02:00:00Z", "2026-11-22T00:00:00Z")];
        let points = plan_points(&windows, &snaps, t("2026-11-22T01:00:00Z"), 0.5);
        assert_eq!(points[1], (PointKind::Monthly, t("2026-11-05T02:00:00Z")));
    }

    #[test]
    fn recent_point_lies_in_the_last_week_of_the_newest_window() {
        let windows = [
            w("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
            w("2026-11-01T00:00:00Z", "2026-11-22T00:00:00Z"),
        ];
        let now = t("2026-11-22T00:00:01Z");
        let at = |f| plan_points(&windows, &[], now, f)[0].1;
        assert_eq!(at(0.0), t("2026-11-15T00:00:00Z"));
        assert_eq!(at(1.0), t("2026-11-22T00:00:00Z"));
        assert!(at(0.3) > t("2026-11-15T00:00:00Z") && at(0.3) < t("2026-11-22T00:00:00Z"));
        let short = [w("2026-11-21T00:00:00Z", "2026-11-21T01:00:00Z")];
        assert_eq!(
            plan_points(&short, &[], now, 0.0)[0].1,
            t("2026-11-21T00:00:00Z")
        );
        assert!(plan_points(&[], &[], now, 0.5).is_empty());
    }
}
