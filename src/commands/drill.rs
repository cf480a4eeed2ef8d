//! `timevault drill`, and the drill lines of `status`.

use std::process::ExitCode;

use serde::Serialize;

use timevault::config::Config;
use timevault::drill::{drill_source, DrillRecord};
use timevault::repo::Repository;
use timevault::{ErrorKind, Result};

use crate::print_json;

/// Drill every source (or one); a failed drill exits with the verify code.
pub async fn drill(config: &Config, only: Option<&str>, json: bool) -> Result<ExitCode> {
    let sources = match only {
        Some(name) => vec![config.source(name)?],
        None => config.sources.iter().collect(),
    };
    let repo = Repository::open(config).await?;
    let mut records = Vec::new();
    for s in sources {
        let record = drill_source(&repo, s).await?;
        if !json {
            print_record(&record);
        }
        records.push(record);
    }
    if json {
        print_json(&records);
    }
    if records.iter().any(|r| !r.ok) {
        eprintln!("error: restore drill FAILED; see the lines above and `timevault status`");
        return Ok(ExitCode::from(ErrorKind::Verify.exit_code() as u8));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_record(r: &DrillRecord) {
    let state = if r.ok { "ok" } else { "FAILED" };
    println!(
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
        println!(
            "  {} point {}: restored in {:.2}s, {} bytes, {} rows and {} objects compared: {outcome}",
            c.point.as_str(),
            c.requested.to_rfc3339(),
            c.rto_seconds,
            c.bytes,
            c.rows_checked,
            c.objects_checked
        );
        for v in &c.verified {
            println!("    - {v}");
        }
    }
    if let (Some(e), true) = (&r.error, r.checks.is_empty()) {
        println!("  FAILED: {e}");
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
        None => println!("  drill: none yet (run `timevault drill`)"),
        Some(d) if d.ok => println!(
            "  drill: ok at {} (restores took {:.2}s; {} rows, {} objects compared)",
            d.at, d.restore_seconds, d.rows_checked, d.objects_checked
        ),
        Some(d) => println!(
            "  drill: FAILED at {}: {}",
            d.at,
            d.error.as_deref().unwrap_or("?")
        ),
    }
}
