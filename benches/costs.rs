//! What the embedded default costs in object store requests: the daemon runs in-process with
//! schedules/embedded.toml's settings (two replicas, write quorum all, 1 s capture, 60 s lease,
//! blob scan every 5 minutes) under a small steady write load (one small SQLite transaction
//! per second), and the replicas' request counters are read before and after a measured
//! window and extrapolated to a day. Counts, not times: the figures are the same on any
//! machine. Prints a table for docs/COSTS.md; asserts nothing.
//!
//! `cargo bench --bench costs` (or `cargo test --bench costs` for a debug build);
//! TIMEVAULT_BENCH_SECONDS (default 180) is the measured window, after a 15 s warm-up that
//! covers the first snapshot and blob scan; TIMEVAULT_BENCH_CAPTURE (default `1s`) replaces
//! the capture interval, to measure the knob.

use std::time::Duration;

use sqlx::Connection;
use timevault::config::Config;
use timevault::daemon::{self, DaemonOptions};
use timevault::repo::replica::RequestCounts;
use timevault::repo::Repository;
use timevault_fixtures::{generate_sqlite, GenerateOptions};

const CONFIG: &str = r#"
[repository]
key_file = "timevault.key"
write_quorum = "all"
compression_level = 3
lease_ttl = "60s"

[[replicas]]
name = "eu-west"
region = "westeurope"
url = "replicas/eu-west"

[[replicas]]
name = "eu-north"
region = "northeurope"
url = "replicas/eu-north"

[[sources]]
name = "app"
kind = "sqlite"
url = "app.db"

[[sources]]
name = "files"
kind = "blobs"
url = "blobs"

[schedule]
snapshot = "0 0 2 * * *"
capture_interval = "CAPTURE"
blob_scan = "0 */5 * * * *"
"#;

/// Per replica: requests by kind and bytes written so far.
fn counters(repo: &Repository) -> Vec<(String, RequestCounts, u64)> {
    repo.replicas()
        .replicas()
        .iter()
        .map(|r| {
            let h = r.health();
            (r.name().to_string(), h.by_kind, h.bytes_written)
        })
        .collect()
}

/// One small transaction per second: a row of about 200 bytes.
async fn write_load(db: std::path::PathBuf, stop: tokio_util::sync::CancellationToken) -> u64 {
    let url = format!("sqlite://{}", db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS cost_events (id INTEGER PRIMARY KEY, at TEXT, payload TEXT)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let mut n = 0;
    while !stop.is_cancelled() {
        sqlx::query("INSERT INTO cost_events (at, payload) VALUES (datetime('now'), ?)")
            .bind("x".repeat(200))
            .execute(&mut conn)
            .await
            .unwrap();
        n += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    n
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("TIMEVAULT_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(180);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    generate_sqlite(&db, &GenerateOptions { seed: 7, scale: 1 })
        .await
        .unwrap();
    std::fs::create_dir_all(dir.path().join("blobs")).unwrap();
    for i in 0..20 {
        std::fs::write(
            dir.path().join(format!("blobs/file-{i}.txt")),
            format!("blob {i}\n").repeat(500),
        )
        .unwrap();
    }
    let capture = std::env::var("TIMEVAULT_BENCH_CAPTURE").unwrap_or_else(|_| "1s".into());
    let path = dir.path().join("timevault.toml");
    std::fs::write(&path, CONFIG.replace("CAPTURE", &capture)).unwrap();
    let config = Config::load(&path).unwrap();
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();

    let stop = tokio_util::sync::CancellationToken::new();
    let load = tokio::spawn(write_load(db.clone(), stop.clone()));
    let measure = async {
        tokio::time::sleep(Duration::from_secs(15)).await;
        let before = counters(&repo);
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let after = counters(&repo);
        stop.cancel();
        (before, after)
    };
    let options = DaemonOptions::default();
    let (runs, (before, after)) = tokio::join!(
        daemon::run(&config, &repo, &options, stop.cancelled()),
        measure
    );
    let runs = runs.unwrap();
    let transactions = load.await.unwrap();
    let day = 86_400.0 / seconds as f64;
    println!(
        "embedded default, capture_interval {capture}, {transactions} transactions at 1/s, \
         measured window {seconds}s after a 15s warm-up; segments shipped: {}",
        runs.iter().map(|r| r.segments).sum::<u64>()
    );
    println!(
        "| replica | PUT/day | GET/day | LIST/day | DELETE/day | requests/day | MB written/day |"
    );
    println!("|---|---|---|---|---|---|---|");
    for ((name, b, bw), (_, a, aw)) in before.iter().zip(&after) {
        let per_day = |x: u64, y: u64| ((y - x) as f64 * day).round();
        println!(
            "| {name} | {} | {} | {} | {} | {} | {:.1} |",
            per_day(b.put, a.put),
            per_day(b.get, a.get),
            per_day(b.list, a.list),
            per_day(b.delete, a.delete),
            per_day(b.total(), a.total()),
            (aw - bw) as f64 * day / 1e6
        );
    }
}
