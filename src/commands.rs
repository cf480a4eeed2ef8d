//! The binary's longer commands: daemon, backup, restore, snapshots, status. Each calls the
//! library and prints; none holds logic the library lacks.

use std::process::ExitCode;
use std::time::Duration;

use chrono::Utc;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use timevault::catalog::{SnapshotManifest, SourceCatalog, Window};
use timevault::config::{Config, SourceKind};
use timevault::daemon::{self, DaemonOptions};
use timevault::repo::{Repository, RetryPolicy};
use timevault::restore::{restore_sqlite, RestoreOptions};
use timevault::source::sqlite::SqliteSource;
use timevault::time::parse_at;
use timevault::{Error, ErrorKind, Result};

use crate::print_json;

/// A spinner on interactive terminals, nothing otherwise.
fn spinner(message: String) -> ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("template"));
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed when this is called, not when
/// the future is first polled, so a signal that arrives during start-up is not lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    let ctrl_c = tokio::signal::ctrl_c();
    async move {
        #[cfg(unix)]
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
    }
}

pub async fn daemon(config: &Config, once: bool, json: bool) -> Result<ExitCode> {
    let shutdown = shutdown_signal();
    let repo = Repository::open(config).await?;
    let runs = daemon::run(config, &repo, &DaemonOptions { once }, shutdown).await?;
    if json {
        print_json(&runs);
    } else if once {
        for r in &runs {
            println!(
                "{}: {} snapshots, {} segments, {} transactions shipped, {} errors",
                r.source, r.snapshots, r.segments, r.transactions, r.errors
            );
        }
    }
    let failed = runs.iter().find_map(|r| r.last_error.clone());
    match failed {
        Some(e) if once => Err(Error::other(e)),
        _ => Ok(ExitCode::SUCCESS),
    }
}

pub async fn backup(config: &Config, only: Option<&str>, json: bool) -> Result<ExitCode> {
    if let Some(name) = only {
        config.source(name)?;
    }
    let repo = Repository::open(config).await?;
    let mut results = Vec::new();
    for s in config
        .sources
        .iter()
        .filter(|s| only.is_none_or(|n| n == s.name))
    {
        if s.kind != SourceKind::Sqlite {
            return Err(Error::input(format!(
                "source {}: {} backups are not supported by this version yet",
                s.name, s.kind
            )));
        }
        let lease = repo.acquire_lease(&daemon::lease_scope(&s.name)).await?;
        let bar = spinner(format!("snapshot of {}", s.name));
        let outcome = async {
            let mut source =
                SqliteSource::open(&s.name, std::path::Path::new(&s.url), &repo).await?;
            let stats = source.snapshot(&repo).await?;
            source.close(&repo).await?;
            Ok::<_, Error>(stats)
        }
        .await;
        bar.finish_and_clear();
        repo.release_lease(lease).await?;
        let stats = outcome?;
        if !json {
            println!(
                "{}: snapshot {} at {} ({} bytes, {} uploaded)",
                s.name,
                stats.chain,
                stats.taken_at.to_rfc3339(),
                stats.bytes,
                stats.uploaded
            );
        }
        results.push(stats);
    }
    if json {
        print_json(&results);
    }
    Ok(ExitCode::SUCCESS)
}

pub struct RestoreRequest {
    pub source: String,
    pub at: String,
    pub to: String,
    pub force: bool,
    pub replica: Option<String>,
    pub json: bool,
}

pub async fn restore(config: &Config, req: RestoreRequest) -> Result<ExitCode> {
    let source = config.source(&req.source)?;
    let at = parse_at(&req.at, Utc::now())?;
    let repo =
        Repository::open_with(config, req.replica.as_deref(), RetryPolicy::default()).await?;
    let options = RestoreOptions {
        source: req.source.clone(),
        at,
        target: req.to.clone(),
        force: req.force,
    };
    let bar = spinner(format!("restoring {}", req.source));
    let summary = match source.kind {
        SourceKind::Sqlite => restore_sqlite(&repo, &options).await,
        other => Err(Error::input(format!(
            "restore of {other} sources is not supported by this version yet"
        ))),
    };
    bar.finish_and_clear();
    let summary = summary?;
    if req.json {
        print_json(&summary);
    } else {
        println!(
            "restored {} to {}: state as of {} (requested {}), chain {}, {} segments, {} transactions, {:.2}s",
            summary.source,
            summary.target,
            summary.restored_to.to_rfc3339(),
            summary.requested.to_rfc3339(),
            summary.chain,
            summary.segments_applied,
            summary.transactions,
            summary.seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct SnapshotLine {
    source: String,
    chain: String,
    taken_at: String,
    segments: usize,
    restorable_until: String,
    reason: Option<String>,
    bytes: Option<u64>,
}

pub async fn snapshots(config: &Config, only: Option<&str>, json: bool) -> Result<ExitCode> {
    if let Some(name) = only {
        config.source(name)?;
    }
    let repo = Repository::open(config).await?;
    let mut lines = Vec::new();
    for s in config
        .sources
        .iter()
        .filter(|s| only.is_none_or(|n| n == s.name))
    {
        let catalog = SourceCatalog::load(&repo, &s.name).await?;
        for chain in &catalog.chains {
            let manifest = SnapshotManifest::read(&repo, &chain.snapshot.key)
                .await
                .ok();
            lines.push(SnapshotLine {
                source: s.name.clone(),
                chain: chain.id().to_string(),
                taken_at: chain.start().to_rfc3339(),
                segments: chain.segments.len(),
                restorable_until: chain.end().to_rfc3339(),
                reason: manifest.as_ref().map(|m| format!("{:?}", m.reason)),
                bytes: manifest.map(|m| m.bytes),
            });
        }
    }
    if json {
        print_json(&lines);
    } else {
        println!(
            "{:<10} {:<26} {:<34} {:>9} {:>12}  reason",
            "source", "chain", "restorable until", "segments", "bytes"
        );
        for l in &lines {
            println!(
                "{:<10} {:<26} {:<34} {:>9} {:>12}  {}",
                l.source,
                l.chain,
                l.restorable_until,
                l.segments,
                l.bytes.map_or("?".into(), |b| b.to_string()),
                l.reason.clone().unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct SourceStatus {
    source: String,
    kind: String,
    windows: Vec<Window>,
    oldest: Option<String>,
    newest: Option<String>,
    gaps: usize,
    last_snapshot: Option<String>,
    /// Seconds since the newest restorable instant: how far behind a restore to `latest` is.
    capture_lag_seconds: Option<f64>,
    chains: usize,
}

#[derive(Serialize)]
struct ReplicaStatus {
    name: String,
    region: String,
    reachable: bool,
    error: Option<String>,
}

#[derive(Serialize)]
struct Status {
    repository: String,
    sources: Vec<SourceStatus>,
    replicas: Vec<ReplicaStatus>,
}

pub async fn status(config: &Config, json: bool) -> Result<ExitCode> {
    let repo = Repository::open(config).await?;
    let now = Utc::now();
    let mut sources = Vec::new();
    for s in &config.sources {
        let catalog = SourceCatalog::load(&repo, &s.name).await?;
        let windows = catalog.windows();
        sources.push(SourceStatus {
            source: s.name.clone(),
            kind: s.kind.to_string(),
            oldest: windows.first().map(|w| w.oldest.to_rfc3339()),
            newest: windows.last().map(|w| w.newest.to_rfc3339()),
            gaps: windows.len().saturating_sub(1),
            last_snapshot: catalog.latest_chain().map(|c| c.start().to_rfc3339()),
            capture_lag_seconds: catalog
                .newest()
                .map(|t| (now - t).num_milliseconds() as f64 / 1000.0),
            chains: catalog.chains.len(),
            windows,
        });
    }
    let mut replicas = Vec::new();
    for r in repo.replicas().replicas() {
        let probe = r.list("snapshots/").await;
        replicas.push(ReplicaStatus {
            name: r.name().to_string(),
            region: r.region().to_string(),
            reachable: probe.is_ok(),
            error: probe
                .err()
                .map(|e| timevault::config::mask_url(&e.to_string())),
        });
    }
    let status = Status {
        repository: repo.id().to_string(),
        sources,
        replicas,
    };
    if json {
        print_json(&status);
    } else {
        println!("repository {}", status.repository);
        for s in &status.sources {
            println!("source {} ({})", s.source, s.kind);
            if s.windows.is_empty() {
                println!("  no backups yet");
            }
            for w in &s.windows {
                println!(
                    "  restorable {} .. {}",
                    w.oldest.to_rfc3339(),
                    w.newest.to_rfc3339()
                );
            }
            if s.gaps > 0 {
                println!(
                    "  WARNING: {} gap(s) between windows: continuity was lost",
                    s.gaps
                );
            }
            if let Some(t) = &s.last_snapshot {
                println!("  last snapshot {t}; {} chain(s)", s.chains);
            }
            if let Some(lag) = s.capture_lag_seconds {
                println!("  newest restorable instant is {lag:.1}s old");
            }
        }
        for r in &status.replicas {
            let state = if r.reachable {
                "ok".to_string()
            } else {
                format!("FAILING: {}", r.error.clone().unwrap_or_default())
            };
            println!("replica {} ({}): {state}", r.name, r.region);
        }
    }
    let unhealthy = status.replicas.iter().any(|r| !r.reachable);
    if unhealthy {
        return Ok(ExitCode::from(ErrorKind::Unavailable.exit_code() as u8));
    }
    Ok(ExitCode::SUCCESS)
}
