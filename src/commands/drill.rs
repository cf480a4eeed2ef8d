//! `timevault drill`, and the drill lines of `status`.

use std::path::Path;
use std::process::ExitCode;

use serde::Serialize;

use timevault::config::Config;
use timevault::config::SourceConfig;
use timevault::daemon;
use timevault::drill::{drill_source_with, DrillRecord};
use timevault::repo::Repository;
use timevault::source::sqlite::{LivePoint, SqliteSource};
use timevault::{ErrorKind, Result};

use crate::out::{errln, outln};
use crate::print_json;

/// Drill every source (or one); a failed drill exits with the verify code.
pub async fn drill(config: &Config, only: Option<&str>, json: bool) -> Result<ExitCode> {
    let sources = match only {
        Some(name) => vec![config.source(name)?],
        None => config.sources.iter().collect(),
    };
    let repo = Repository::open(config).await?;
    repo.require(timevault::keys::role::Role::Restore, "a drill")?;
    let mut records = Vec::new();
    for s in sources {
        let live = live_point(&repo, s).await;
        let bar = match json {
            true => super::Progress::hidden(),
            false => super::Progress::counting(
                format!("drilling {}", s.name),
                timevault::repo::chunk_bytes_read,
            ),
        };
        let record = drill_source_with(&repo, s, live.as_ref()).await;
        bar.finish_and_clear();
        let record = record?;
        if !json {
            print_record(&record);
        }
        records.push(record);
    }
    if json {
        print_json(&records);
    }
    if records.iter().any(|r| !r.ok) {
        errln!("error: restore drill FAILED; see the lines above and `timevault status`");
        return Ok(ExitCode::from(ErrorKind::Verify.exit_code() as u8));
    }
    Ok(ExitCode::SUCCESS)
}

/// A SQLite source's live checksums, read as the daemon would: only while no daemon holds the
/// source's lease (a running daemon compares the live database in its scheduled drills).
async fn live_point(repo: &Repository, source: &SourceConfig) -> Option<LivePoint> {
    if !source.kind().has_live_point() {
        return None;
    }
    let Ok(lease) = repo.acquire_lease(&daemon::lease_scope(&source.name)).await else {
        errln!(
            "note: the daemon runs source {}: the comparison with the live database is part of its scheduled drills (schedule.drill)",
            source.name
        );
        return None;
    };
    let point = async {
        let mut opened = SqliteSource::open(&source.name, Path::new(&source.url), repo).await?;
        let point = opened.live_point(repo).await;
        opened.close(repo).await?;
        point
    }
    .await;
    let _ = repo.release_lease(lease).await;
    match point {
        Ok(point) => Some(point),
        Err(e) => {
            errln!(
                "warning: source {}: the live database could not be read for the drill: {e}",
                source.name
            );
            None
        }
    }
}

fn print_record(r: &DrillRecord) {
    let state = if r.ok { "ok" } else { "FAILED" };
    outln!(
        "drill of {} ({}): {state}, recorded as {}",
        r.source,
        r.kind,
        r.key()
    );
    for c in &r.checks {
        let outcome = match &c.error {
            None => "ok".to_string(),
            Some(e) => format!("FAILED: {e}"),
        };
        outln!(
            "  {} point {}: restored in {:.2}s, {} bytes, {} rows and {} objects compared: {outcome}",
            c.point.as_str(),
            c.requested.to_rfc3339(),
            c.rto_seconds,
            c.bytes,
            c.rows_checked,
            c.objects_checked
        );
        for v in &c.verified {
            outln!("    - {v}");
        }
    }
    if let (Some(e), true) = (&r.error, r.checks.is_empty()) {
        outln!("  FAILED: {e}");
    }
}

/// The newest drill of a source, as `status` shows it.
#[derive(Serialize)]
pub struct DrillStatus {
    pub at: String,
    pub ok: bool,
    pub error: Option<String>,
    pub restore_seconds: f64,
    pub rows_checked: u64,
    pub objects_checked: u64,
    pub key: String,
}

pub async fn drill_status(repo: &Repository, source: &str) -> Option<DrillStatus> {
    let record = match DrillRecord::latest(repo, source).await {
        Ok(r) => r?,
        Err(e) => {
            return Some(DrillStatus {
                at: String::new(),
                ok: false,
                error: Some(format!("cannot read the drill record: {e}")),
                restore_seconds: 0.0,
                rows_checked: 0,
                objects_checked: 0,
                key: String::new(),
            })
        }
    };
    Some(DrillStatus {
        at: record.finished_at.to_rfc3339(),
        ok: record.ok,
        error: record.error.clone(),
        restore_seconds: record.rto_seconds(),
        rows_checked: record.checks.iter().map(|c| c.rows_checked).sum(),
        objects_checked: record.checks.iter().map(|c| c.objects_checked).sum(),
        key: record.key(),
    })
}

pub fn print_drill_status(drill: Option<&DrillStatus>) {
    match drill {
        None => outln!("  drill: none yet (run `timevault drill`)"),
        Some(d) if d.ok => outln!(
            "  drill: ok at {} (restores took {:.2}s; {} rows, {} objects compared)",
            d.at,
            d.restore_seconds,
            d.rows_checked,
            d.objects_checked
        ),
        Some(d) => outln!(
            "  drill: FAILED at {}: {}",
            d.at,
            d.error.as_deref().unwrap_or("?")
        ),
    }
}
