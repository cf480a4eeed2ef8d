//! The embedded default, measured: snapshot throughput, capture lag under a steady write
//! load, and restore time, next to `sqlite3 .backup` + `zstd -3` of the same file in the same
//! run. Prints ratios; asserts nothing about time.
//!
//! `cargo bench --bench sqlite` (TIMEVAULT_BENCH_SCALE, default 20, sizes the database;
//! TIMEVAULT_BENCH_SECONDS, default 20, is the length of the write load).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::Utc;
use timevault::config::Config;
use timevault::repo::Repository;
use timevault::restore::{restore_sqlite, RestoreOptions};
use timevault::source::sqlite::SqliteSource;
use timevault::time::At;
use timevault_fixtures::{generate_sqlite, Database, GenerateOptions};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run(cmd: &mut Command) -> Duration {
    let started = Instant::now();
    let status = cmd
        .status()
        .expect("run baseline tool (apt-get install -y sqlite3 zstd)");
    assert!(status.success(), "{cmd:?} failed");
    started.elapsed()
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn dir_size(path: &Path) -> u64 {
    walk(path)
        .iter()
        .map(|p| p.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn walk(path: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let scale = env_u64("TIMEVAULT_BENCH_SCALE", 20) as u32;
    let load_seconds = env_u64("TIMEVAULT_BENCH_SECONDS", 20);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    eprintln!("generating scale {scale}...");
    generate_sqlite(&db, &GenerateOptions { seed: 42, scale })
        .await
        .unwrap();
    let db_bytes = std::fs::metadata(&db).unwrap().len();

    // Baseline: sqlite3 .backup, then zstd -3; restore = zstd -d.
    let backup = dir.path().join("baseline.db");
    let t_backup = run(Command::new("sqlite3")
        .arg(&db)
        .arg(format!(".backup '{}'", backup.display())));
    let t_zstd = run(Command::new("zstd").args(["-q", "-3", "-f"]).arg(&backup));
    let zst = dir.path().join("baseline.db.zst");
    let baseline_size = std::fs::metadata(&zst).unwrap().len();
    let out = dir.path().join("baseline-restored.db");
    let t_unzstd = run(Command::new("zstd")
        .args(["-q", "-d", "-f"])
        .arg(&zst)
        .arg("-o")
        .arg(&out));
    let baseline_snapshot = t_backup + t_zstd;

    // timevault: init a repository with two local replicas.
    let config_text = format!(
        "[repository]\nkey_file = \"k\"\n[[replicas]]\nname = \"a\"\nregion = \"r1\"\nurl = \"replicas/a\"\n\
         [[replicas]]\nname = \"b\"\nregion = \"r2\"\nurl = \"replicas/b\"\n\
         [[sources]]\nname = \"app\"\nkind = \"sqlite\"\nurl = \"{}\"\n",
        db.display()
    );
    let config = Config::parse(&config_text, &dir.path().join("timevault.toml")).unwrap();
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let mut source = SqliteSource::open("app", &db, &repo).await.unwrap();
    let started = Instant::now();
    source.snapshot(&repo).await.unwrap();
    let t_snapshot = started.elapsed();
    let repo_size = dir_size(&dir.path().join("replicas/a"));

    // Capture lag: a writer commits small transactions at a steady rate; every capture
    // interval (1 s) timevault ships; lag = durable on both replicas - commit.
    let conn_db = Database::Sqlite(db.clone());
    let commits = std::sync::Arc::new(std::sync::Mutex::new(Vec::<chrono::DateTime<Utc>>::new()));
    let writer_commits = commits.clone();
    let stop_at = Instant::now() + Duration::from_secs(load_seconds);
    let writer = tokio::spawn(async move {
        let mut conn = conn_db.connect().await.unwrap();
        let sql = match &mut conn {
            timevault_fixtures::Conn::Sqlite(c) => c,
            _ => unreachable!(),
        };
        let mut i = 0u64;
        while Instant::now() < stop_at {
            sqlx::query("INSERT INTO audit_events (tenant_id, action, entity, occurred_at, details) SELECT tenant_id, 'bench.tick', 'bench', occurred_at, ?1 FROM audit_events LIMIT 1")
                .bind(format!("{{\"i\":{i}}}"))
                .execute(&mut *sql)
                .await
                .expect("bench insert");
            writer_commits.lock().unwrap().push(Utc::now());
            i += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut lags = Vec::new();
    let mut shipped = 0usize;
    while Instant::now() < stop_at + Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cut = commits.lock().unwrap().len();
        source.capture(&repo).await.unwrap();
        let durable = Utc::now();
        let all = commits.lock().unwrap().clone();
        for c in &all[shipped..cut] {
            lags.push((durable - *c).num_microseconds().unwrap() as f64 / 1e6);
        }
        shipped = cut;
    }
    writer.await.unwrap();
    source.capture(&repo).await.unwrap();
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());

    // Restore the newest state.
    let target = dir.path().join("restored.db");
    let started = Instant::now();
    restore_sqlite(
        &repo,
        &RestoreOptions {
            source: "app".into(),
            at: At::Latest,
            target: target.display().to_string(),
            force: false,
            jobs: None,
        },
    )
    .await
    .unwrap();
    let t_restore = started.elapsed();
    source.close(&repo).await.unwrap();

    println!(
        "\nSQLite embedded default, scale {scale}: database {:.1} MB",
        mb(db_bytes)
    );
    println!(
        "{:<44} {:>10} {:>10} {:>10}",
        "", "seconds", "MB/s", "size MB"
    );
    println!(
        "{:<44} {:>10.2} {:>10.1} {:>10.1}",
        "sqlite3 .backup + zstd -3",
        baseline_snapshot.as_secs_f64(),
        mb(db_bytes) / baseline_snapshot.as_secs_f64(),
        mb(baseline_size)
    );
    println!(
        "{:<44} {:>10.2} {:>10.1} {:>10.1}",
        "timevault snapshot (zstd-3, AES-GCM, 2 repl.)",
        t_snapshot.as_secs_f64(),
        mb(db_bytes) / t_snapshot.as_secs_f64(),
        mb(repo_size)
    );
    println!(
        "snapshot speed ratio timevault / baseline: {:.2}x",
        baseline_snapshot.as_secs_f64() / t_snapshot.as_secs_f64()
    );
    println!(
        "restore: timevault {:.2}s (incl. integrity_check) vs zstd -d {:.2}s: ratio {:.2}",
        t_restore.as_secs_f64(),
        t_unzstd.as_secs_f64(),
        t_restore.as_secs_f64() / t_unzstd.as_secs_f64()
    );
    println!(
        "capture lag at 1 s interval, ~100 tx/s, {} commits: p50 {:.3}s p99 {:.3}s max {:.3}s (goal p99 < 1.5s: {})",
        lags.len(),
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags.last().copied().unwrap_or(f64::NAN),
        if percentile(&lags, 0.99) < 1.5 { "met" } else { "NOT met" }
    );
}
