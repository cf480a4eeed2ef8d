//! Tenant export, measured: the smallest and the largest tenant of a large fixture (SQLite +
//! blobs), next to a full restore of both sources to the same instant. Prints medians and
//! ratios; asserts nothing about time. The issue's goal: the small tenant's export under 5% of
//! the full restore.
//!
//! `cargo bench --bench export` (TIMEVAULT_BENCH_SCALE, default 20, sizes the fixture;
//! TIMEVAULT_BENCH_RUNS, default 5, the runs per measurement).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use timevault::config::Config;
use timevault::export::{self, ExportOptions, TableFormat};
use timevault::repo::Repository;
use timevault::restore::{restore_blobs, restore_sqlite, RestoreOptions};
use timevault::source::blobs::BlobSource;
use timevault::source::sqlite::SqliteSource;
use timevault::time::At;
use timevault_fixtures::{generate_blobs, generate_sqlite, GenerateOptions, StoreUrl};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

const CONFIG: &str = r#"
[repository]
key_file = "timevault.key"

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
url = "files"

[tenancy]
column = "tenant_id"

[tenancy.tables]
plans = "global"
contract_versions = "contract_id -> contracts.id"

[tenancy.blobs]
files = "prefix:tenants/{tenant}/"
"#;

/// Rows per tenant over every tenant table (from the source database).
async fn tenant_rows(db: &Path) -> BTreeMap<i64, i64> {
    use sqlx::{Connection, Row};
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let sql = "SELECT tenant_id, SUM(n) FROM (
        SELECT tenant_id, COUNT(*) n FROM users GROUP BY 1 UNION ALL
        SELECT tenant_id, COUNT(*) FROM contracts GROUP BY 1 UNION ALL
        SELECT c.tenant_id, COUNT(*) FROM contract_versions v JOIN contracts c ON c.id = v.contract_id GROUP BY 1 UNION ALL
        SELECT tenant_id, COUNT(*) FROM comments GROUP BY 1 UNION ALL
        SELECT tenant_id, COUNT(*) FROM attachments GROUP BY 1 UNION ALL
        SELECT tenant_id, COUNT(*) FROM audit_events GROUP BY 1 UNION ALL
        SELECT tenant_id, COUNT(*) FROM tenant_settings GROUP BY 1 UNION ALL
        SELECT tenant_id, 1 FROM tenants) GROUP BY 1";
    let rows = sqlx::query(sql).fetch_all(&mut conn).await.unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let scale = env_u64("TIMEVAULT_BENCH_SCALE", 20) as u32;
    let runs = env_u64("TIMEVAULT_BENCH_RUNS", 5).max(1);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let options = GenerateOptions { seed: 42, scale };
    eprintln!("generating scale {scale}...");
    generate_sqlite(&db, &options).await.unwrap();
    let files = StoreUrl::local_dir(&dir.path().join("files")).unwrap();
    generate_blobs(&files.open().unwrap(), &options)
        .await
        .unwrap();
    std::fs::write(dir.path().join("timevault.toml"), CONFIG).unwrap();
    let config = Config::load(&dir.path().join("timevault.toml")).unwrap();
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();

    eprintln!("backing up...");
    let mut blobs = BlobSource::open("files", &files.url, &files.options, &repo)
        .await
        .unwrap();
    blobs.scan(&repo).await.unwrap();
    let mut sqlite = SqliteSource::open("app", &db, &repo).await.unwrap();
    let snapshot = sqlite.snapshot(&repo).await.unwrap();
    sqlite.close(&repo).await.unwrap();
    blobs.scan(&repo).await.unwrap();
    let at = At::Instant(snapshot.taken_at);

    let sizes = tenant_rows(&db).await;
    let (small, _) = sizes.iter().min_by_key(|(_, n)| **n).unwrap();
    let (large, _) = sizes.iter().max_by_key(|(_, n)| **n).unwrap();
    let db_mb = std::fs::metadata(&db).unwrap().len() as f64 / 1e6;

    let mut full = Vec::new();
    let mut sqlite_part = Vec::new();
    for run in 0..runs {
        let started = Instant::now();
        let target = dir.path().join(format!("restore-{run}"));
        restore_sqlite(
            &repo,
            &RestoreOptions {
                source: "app".into(),
                at,
                target: target.join("app.db").display().to_string(),
                force: false,
                jobs: None,
            },
        )
        .await
        .unwrap();
        sqlite_part.push(started.elapsed().as_secs_f64());
        let blob_target = StoreUrl::local_dir(&target.join("files")).unwrap();
        restore_blobs(
            &repo,
            &RestoreOptions {
                source: "files".into(),
                at,
                target: blob_target.url.clone(),
                force: false,
                jobs: None,
            },
            &blob_target.options,
        )
        .await
        .unwrap();
        full.push(started.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&target).unwrap();
    }
    let full = median(full);
    let sqlite_part = median(sqlite_part);

    println!(
        "tenant export vs full restore (scale {scale}: {} tenants, database {db_mb:.1} MB; medians of {runs})",
        sizes.len()
    );
    println!("  full restore (sqlite + blobs)       {full:>8.3} s");
    println!(
        "    of which the sqlite restore       {sqlite_part:>8.3} s  (an export reads the database in place)"
    );
    for (label, tenant) in [("smallest", small), ("largest", large)] {
        let mut times = Vec::new();
        let mut last = None;
        for run in 0..runs {
            let out = dir.path().join(format!("export-{tenant}-{run}.tar.zst"));
            let started = Instant::now();
            let summary = export::export(
                &config,
                &repo,
                &ExportOptions {
                    tenant: tenant.to_string(),
                    at,
                    out: out.clone(),
                    format: TableFormat::Jsonl,
                    requested_by: Some("bench".into()),
                    reason: None,
                    encryption: None,
                    force: false,
                },
            )
            .await
            .unwrap();
            times.push(started.elapsed().as_secs_f64());
            std::fs::remove_file(&out).unwrap();
            last = Some(summary);
        }
        let t = median(times);
        let s = last.unwrap();
        println!(
            "  {label:<8} tenant {tenant:<6} {:>7} rows {:>4} files {:>8.3} s  = {:>5.1}% of the full restore ({:>5.1}% of the sqlite restore)",
            s.rows,
            s.files,
            t,
            100.0 * t / full,
            100.0 * t / sqlite_part
        );
        println!(
            "           database backup read in place: {:.2} MB of a {db_mb:.1} MB database ({:.1}%)",
            s.database_bytes_read as f64 / 1e6,
            100.0 * s.database_bytes_read as f64 / 1e6 / db_mb
        );
    }
}
