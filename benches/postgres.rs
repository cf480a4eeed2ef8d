//! The PostgreSQL source, measured on a `pgbench -i` database: snapshot time and size next to
//! `pg_dump -Fc` and `pg_dump -Fc -Z0 | zstd -3`, restore time next to `pg_restore -j 2`, all in
//! the same run. Prints ratios; asserts nothing about time.
//!
//! `cargo bench --bench postgres` (TIMEVAULT_BENCH_PGBENCH_SCALE, default 50). pgbench data is
//! far more compressible than real data (RECIPES.md): read the ratios with that in mind.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use timevault::config::Config;
use timevault::repo::Repository;
use timevault::restore::postgres::restore_postgres_detailed;
use timevault::restore::RestoreOptions;
use timevault::source::postgres::PostgresSource;
use timevault::time::At;
use timevault_fixtures::harness::postgres::postgres;

fn timed(cmd: &mut Command) -> Duration {
    let started = Instant::now();
    let out = cmd
        .output()
        .expect("run a PostgreSQL client tool (postgresql-15, zstd)");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}

fn size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn dir_size(path: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
        let p = e.path();
        total += if p.is_dir() { dir_size(&p) } else { size(&p) };
    }
    total
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let scale: u32 = std::env::var("TIMEVAULT_BENCH_PGBENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir().unwrap();
    let url = postgres().create_database().await.unwrap();
    eprintln!("pgbench -i -s {scale}...");
    timed(Command::new("pgbench").args(["-i", "-q", "-s", &scale.to_string(), &url]));
    timed(Command::new("psql").args([
        &url,
        "-c",
        "ALTER TABLE pgbench_history REPLICA IDENTITY FULL",
        "-c",
        "VACUUM ANALYZE",
    ]));
    let db_bytes: i64 = {
        let out = Command::new("psql")
            .args([&url, "-tAc", "SELECT pg_database_size(current_database())"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };

    // Baselines.
    let fc = dir.path().join("dump.fc");
    let t_fc = timed(
        Command::new("pg_dump")
            .args(["-Fc", "-f"])
            .arg(&fc)
            .arg(&url),
    );
    let zst = dir.path().join("dump.fc.zst");
    let t_zst = timed(Command::new("sh").arg("-c").arg(format!(
        "pg_dump -Fc -Z0 '{url}' | zstd -q -3 -o '{}'",
        zst.display()
    )));

    // timevault snapshot into a local repository.
    let text = "[repository]\nkey_file = \"k\"\n[[replicas]]\nname = \"a\"\nregion = \"r\"\nurl = \"replica\"\n";
    let config = Config::parse(text, &dir.path().join("timevault.toml")).unwrap();
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let mut source = PostgresSource::open("bench", &url, &repo).await.unwrap();
    let started = Instant::now();
    let snap = source.snapshot(&repo).await.unwrap();
    let t_tv = started.elapsed();
    source.capture(&repo).await.unwrap();
    let tv_bytes = dir_size(&dir.path().join("replica"));

    // Restores.
    let admin = postgres().admin_url();
    let target_pg = postgres().url("bench_pg_restore");
    timed(Command::new("psql").args([&admin, "-c", "CREATE DATABASE bench_pg_restore"]));
    let t_pr = timed(
        Command::new("pg_restore")
            .args(["-j", "2", "-d", &target_pg])
            .arg(&fc)
            .stdout(Stdio::null()),
    );
    let started = Instant::now();
    restore_postgres_detailed(
        &repo,
        &RestoreOptions {
            source: "bench".into(),
            at: At::Latest,
            target: postgres().url("bench_tv_restore"),
            force: true,
        },
    )
    .await
    .unwrap();
    let t_tvr = started.elapsed();
    source.drop_slot().await.unwrap();

    let ratio = |a: Duration, b: Duration| b.as_secs_f64() / a.as_secs_f64();
    println!(
        "pgbench scale {scale}: database {:.0} MB, {} rows",
        mb(db_bytes as u64),
        snap.rows
    );
    println!(
        "snapshot: timevault {:.2} s, {:.1} MB | pg_dump -Fc {:.2} s, {:.1} MB | pg_dump -Fc -Z0 | zstd -3 {:.2} s, {:.1} MB",
        t_tv.as_secs_f64(),
        mb(tv_bytes),
        t_fc.as_secs_f64(),
        mb(size(&fc)),
        t_zst.as_secs_f64(),
        mb(size(&zst))
    );
    println!(
        "snapshot speed vs pg_dump -Fc: {:.2}x; vs pg_dump | zstd: {:.2}x; size vs pg_dump -Fc: {:.2}",
        ratio(t_tv, t_fc),
        ratio(t_tv, t_zst),
        tv_bytes as f64 / size(&fc) as f64
    );
    println!(
        "restore: timevault {:.2} s | pg_restore -j 2 {:.2} s | timevault speed vs pg_restore: {:.2}x",
        t_tvr.as_secs_f64(),
        t_pr.as_secs_f64(),
        ratio(t_tvr, t_pr)
    );
}
