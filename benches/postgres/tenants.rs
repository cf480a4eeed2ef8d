//! What tenant grouping costs and buys, on the benchmark's data set.
//!
//! Costs: the main snapshot is grouped by tenant (the default); the same database is
//! snapshotted again ungrouped (`snapshot_group_by_tenant = false`, its own slot and
//! repository), and both are compared by time, stored bytes and stored objects. Buys: the
//! fixture's smallest and largest tenants (by contracts) are restored alone from the grouped
//! repository, next to the full restore's time.

use std::path::Path;
use std::time::{Duration, Instant};

use sqlx::Connection;
use timevault::config::{Config, PostgresOptions, SourceConfig};
use timevault::repo::Repository;
use timevault::restore::postgres::restore_postgres_with;
use timevault::restore::postgres_tenant::TenantOptions;
use timevault::restore::RestoreOptions;
use timevault::source::postgres::PostgresSource;
use timevault::time::At;
use timevault_fixtures::harness::postgres::postgres;

pub struct TenantFigures {
    pub ungrouped: Duration,
    pub ungrouped_bytes: u64,
    pub ungrouped_objects: u64,
    pub grouped_objects: u64,
    /// (tenant, contracts, restore time, rows restored) for the smallest and largest tenant.
    pub restores: Vec<(i64, i64, Duration, u64)>,
}

/// Files and bytes under `path`.
pub fn tree(path: &Path) -> (u64, u64) {
    let mut total = (0, 0);
    for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
        let p = e.path();
        let (n, b) = if p.is_dir() {
            tree(&p)
        } else {
            (1, std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0))
        };
        total = (total.0 + n, total.1 + b);
    }
    total
}

/// Run after the grouped snapshot into `repo` (replica directory `grouped_replica`).
pub async fn measure(
    dir: &Path,
    url: &str,
    repo: &Repository,
    grouped_replica: &Path,
) -> TenantFigures {
    let grouped_objects = tree(grouped_replica).0;
    let (ungrouped, ungrouped_objects, ungrouped_bytes) = ungrouped_snapshot(dir, url).await;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let sizes: Vec<(i64, i64)> =
        sqlx::query_as("SELECT tenant_id, count(*) FROM contracts GROUP BY 1 ORDER BY 2, 1")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let _ = conn.close().await;
    let mut restores = Vec::new();
    for (tenant, contracts) in [sizes[0], sizes[sizes.len() - 1]] {
        let options = RestoreOptions {
            source: "bench".into(),
            at: At::Latest,
            target: postgres().url(&format!("bench_tenant_{tenant}")),
            force: true,
            jobs: None,
        };
        let started = Instant::now();
        let restored = restore_postgres_with(
            repo,
            &options,
            Some(&TenantOptions::new(&tenant.to_string())),
        )
        .await
        .unwrap();
        restores.push((tenant, contracts, started.elapsed(), restored.snapshot_rows));
    }
    TenantFigures {
        ungrouped,
        ungrouped_bytes,
        ungrouped_objects,
        grouped_objects,
        restores,
    }
}

async fn ungrouped_snapshot(dir: &Path, url: &str) -> (Duration, u64, u64) {
    let dir = dir.join("ungrouped");
    std::fs::create_dir_all(&dir).unwrap();
    let text = "[repository]\nkey_file = \"k\"\n[[replicas]]\nname = \"a\"\nregion = \"r\"\nurl = \"replica\"\n";
    let config = Config::parse(text, &dir.join("timevault.toml")).unwrap();
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let source = SourceConfig::postgres(
        "bench",
        url,
        PostgresOptions {
            slot: Some("timevault_bench_ungrouped".into()),
            snapshot_group_by_tenant: Some(false),
            ..PostgresOptions::default()
        },
    );
    let mut source = PostgresSource::open_configured(&source, None, &repo)
        .await
        .unwrap();
    let started = Instant::now();
    source.snapshot(&repo).await.unwrap();
    let took = started.elapsed();
    source.drop_slot().await.unwrap();
    let (objects, bytes) = tree(&dir.join("replica"));
    (took, objects, bytes)
}

pub fn print(f: &TenantFigures, grouped: Duration, grouped_bytes: u64, full_restore: Duration) {
    println!(
        "tenant grouping: grouped snapshot {:.2} s, {:.1} MB, {} objects | ungrouped {:.2} s, {:.1} MB, {} objects | time {:.2}x, objects {:.2}x",
        grouped.as_secs_f64(),
        grouped_bytes as f64 / 1e6,
        f.grouped_objects,
        f.ungrouped.as_secs_f64(),
        f.ungrouped_bytes as f64 / 1e6,
        f.ungrouped_objects,
        grouped.as_secs_f64() / f.ungrouped.as_secs_f64(),
        f.grouped_objects as f64 / f.ungrouped_objects.max(1) as f64
    );
    for (tenant, contracts, took, rows) in &f.restores {
        println!(
            "restore --tenant {tenant} ({contracts} contracts): {:.2} s, {rows} snapshot rows = {:.1}% of the full restore's {:.2} s",
            took.as_secs_f64(),
            100.0 * took.as_secs_f64() / full_restore.as_secs_f64(),
            full_restore.as_secs_f64()
        );
    }
}
