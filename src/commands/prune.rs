//! `timevault prune`: printing only; the work is `timevault::prune`.

use std::process::ExitCode;

use timevault::config::Config;
use timevault::prune::{PruneOptions, PruneSummary, Removal};
use timevault::repo::Repository;
use timevault::ErrorKind;

use crate::out::outln;
use crate::print_json;

pub async fn prune(config: &Config, dry_run: bool, json: bool) -> timevault::Result<ExitCode> {
    let repo = Repository::open(config).await?;
    let options = PruneOptions {
        dry_run,
        now: timevault::clock::now(),
    };
    let summary =
        timevault::prune::prune(&repo, &config.sources, &config.retention, &options).await?;
    if json {
        print_json(&summary);
    } else {
        print_summary(&summary);
    }
    if summary.is_complete() {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(ErrorKind::Unavailable.exit_code() as u8))
    }
}

fn print_summary(s: &PruneSummary) {
    let verb = if s.dry_run { "would remove" } else { "removed" };
    if s.dry_run {
        outln!("dry run at {}: nothing is removed", s.now.to_rfc3339());
    }
    for source in &s.sources {
        outln!(
            "source {} ({}): {} restore points kept, {} objects {verb}",
            source.source,
            source.kind,
            source.kept.len(),
            source.removed.len()
        );
        if let Some(why) = &source.deferred {
            outln!("  nothing removed now: {why}");
        }
        for k in &source.kept {
            let reasons: Vec<String> = k
                .reasons
                .iter()
                .map(|r| serde_json::to_value(r).map_or_else(|_| String::new(), reason_text))
                .collect();
            outln!(
                "  keep {} .. {} ({})",
                k.start.to_rfc3339(),
                k.end.to_rfc3339(),
                reasons.join(", ")
            );
        }
        print_removals(verb, &source.removed);
    }
    outln!("audit records: {} {verb}", s.audit.len());
    print_removals(verb, &s.audit);
    outln!("drill records: {} {verb}", s.drills.len());
    print_removals(verb, &s.drills);
    let c = &s.chunks;
    outln!(
        "chunks: {} stored, {} referenced, {} {verb}, {} waiting out the grace period, {} newly unreferenced{}",
        c.chunks,
        c.referenced,
        c.deleted.len(),
        c.waiting,
        c.marked,
        if s.dry_run { " (would be marked)" } else { " (marked)" }
    );
    if let Some(why) = &c.sweep_skipped {
        outln!("  no chunk deleted: {why}");
    }
    if !c.forgotten.is_empty() {
        outln!(
            "chunks of forgotten tenants: {} {verb} (unreadable for ever: no grace period)",
            c.forgotten.len()
        );
    }
    if s.redeleted > 0 {
        outln!(
            "{} objects removed by earlier prunes deleted again",
            s.redeleted
        );
    }
    for f in &s.replica_failures {
        outln!(
            "replica {} did not confirm deleting {}: {} (the next prune retries; `replicas sync` will not copy it back)",
            f.replica, f.key, f.error
        );
    }
}

fn print_removals(verb: &str, removals: &[Removal]) {
    for r in removals {
        outln!("  {verb} {}: {}", r.key, r.reason);
    }
}

/// `{"tier": "monthly", "period": "2026-03"}` → `monthly 2026-03`.
fn reason_text(v: serde_json::Value) -> String {
    let tier = v.get("tier").and_then(|t| t.as_str()).unwrap_or("?");
    match v.get("period").and_then(|p| p.as_str()) {
        Some(p) => format!("{tier} {p}"),
        None => tier.to_string(),
    }
}
