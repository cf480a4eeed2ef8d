//! The PostgreSQL source, measured on a `pgbench -i` database plus the fixture (JSON, text,
//! bytea) at a large scale: snapshot time and size next to `pg_dump -Fc` and
//! `pg_dump -Fc -Z0 | zstd -3`, restore time next to `pg_restore -j 2`, capture lag under
//! pgbench at a fixed rate with the daemon running (see `postgres/lag.rs` for the definition),
//! and replay speed; with the fixture, what tenant grouping costs (an ungrouped snapshot of the
//! same database) and buys (the smallest and largest tenant restored alone), and what
//! per-tenant keys cost (`postgres/keys.rs`), all in the same run. Prints figures and ratios; asserts nothing about time.
//!
//! `cargo bench --bench postgres`. Environment: TIMEVAULT_BENCH_PGBENCH_SCALE (default 50),
//! TIMEVAULT_BENCH_FIXTURE_SCALE (default 100; 0 leaves the fixture out; with 0 for the
//! pgbench scale, the database is the multi-tenant fixture alone),
//! TIMEVAULT_BENCH_LAG_SECS (default 60; 0 skips the lag and replay part),
//! TIMEVAULT_BENCH_LAG_RATE (default 500 tps), TIMEVAULT_BENCH_KEYS_PAIRS (default 3: snapshot
//! and capture with per-tenant keys off and on take turns this many times; 0 skips it), TIMEVAULT_BENCH_RESTORE_PAIRS (default 3:
//! pg_restore and timevault's restore alternate this many times; medians are printed);
//! RUST_LOG (e.g. `timevault=debug`: each run's and key build's time, on stderr). pgbench data
//! alone is far more compressible than real data (RECIPES.md): the fixture is there so the
//! sizes mean something.

#[path = "postgres/keys.rs"]
mod keys;
#[path = "postgres/lag.rs"]
mod lag;
#[path = "postgres/tenants.rs"]
mod tenants;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use timevault::config::Config;
use timevault::repo::Repository;
use timevault::restore::postgres::restore_postgres_detailed;
use timevault::restore::RestoreOptions;
use timevault::source::postgres::PostgresSource;
use timevault::time::At;
use timevault_fixtures::harness::postgres::postgres;
use timevault_fixtures::{generate_postgres, GenerateOptions};

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

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    timevault::allocator::tune();
    if let Ok(filter) = std::env::var("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let scale: u32 = std::env::var("TIMEVAULT_BENCH_PGBENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let fixture_scale = env_u64("TIMEVAULT_BENCH_FIXTURE_SCALE", 100) as u32;
    let lag_secs = env_u64("TIMEVAULT_BENCH_LAG_SECS", 60);
    let lag_rate = env_u64("TIMEVAULT_BENCH_LAG_RATE", 500) as u32;
    let dir = tempfile::tempdir().unwrap();
    let url = postgres().create_database().await.unwrap();
    // The fixture first: its generator wants an empty database; pgbench -i only touches its own
    // tables.
    let fixture_rows: u64 = if fixture_scale > 0 {
        eprintln!("fixture scale {fixture_scale}...");
        let options = GenerateOptions {
            seed: 42,
            scale: fixture_scale,
        };
        let summary = generate_postgres(&url, &options).await.unwrap();
        summary.rows.values().sum()
    } else {
        0
    };
    if scale > 0 {
        eprintln!("pgbench -i -s {scale}...");
        timed(Command::new("pgbench").args(["-i", "-q", "-s", &scale.to_string(), &url]));
        timed(Command::new("psql").args([
            &url,
            "-c",
            "ALTER TABLE pgbench_history REPLICA IDENTITY FULL",
        ]));
    }
    timed(Command::new("psql").args([&url, "-c", "VACUUM ANALYZE"]));
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
    let text: &str = "[repository]\nkey_file = \"k\"\n[[replicas]]\nname = \"a\"\nregion = \"r\"\nurl = \"replica\"\n";
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
    // Each restore starts without the previous one's dirty buffers and WAL to checkpoint.
    let checkpoint = || timed(Command::new("psql").args([&admin, "-c", "CHECKPOINT"]));
    // A restored database is dropped once timed: its autovacuum (a gigabyte of fresh tuples)
    // would otherwise run beside the next restore, whichever tool's it is.
    let drop_database = |name: &str| {
        timed(Command::new("psql").args([
            &admin,
            "-c",
            &format!("DROP DATABASE IF EXISTS {name}"),
        ]));
    };
    let pg_restore = || {
        let target = postgres().url("bench_pg_restore");
        drop_database("bench_pg_restore");
        checkpoint();
        // The database is created inside the timing: `pg_restore -d` needs one, and
        // timevault's restore creates its own.
        let took =
            timed(Command::new("psql").args([&admin, "-c", "CREATE DATABASE bench_pg_restore"]))
                + timed(
                    Command::new("pg_restore")
                        .args(["-j", "2", "-d", &target])
                        .arg(&fc)
                        .stdout(Stdio::null()),
                );
        drop_database("bench_pg_restore");
        took
    };
    let restore_latest = |target: &'static str, drop_after: bool| {
        let options = RestoreOptions {
            source: "bench".into(),
            at: At::Latest,
            target: postgres().url(target),
            force: true,
            jobs: None,
        };
        let repo = &repo;
        // Into a new database, as pg_restore's is (a forced restore's DROP DATABASE checkpoints).
        drop_database(target);
        checkpoint();
        async move {
            let started = Instant::now();
            let restored = restore_postgres_detailed(repo, &options).await.unwrap();
            let took = started.elapsed();
            if drop_after {
                drop_database(target);
            }
            (restored, took)
        }
    };
    // The two restores take turns, `pairs` times: one run of each says little on a shared
    // machine (pg_restore alone took 6.6-11.0 s in one afternoon).
    let pairs = env_u64("TIMEVAULT_BENCH_RESTORE_PAIRS", 3).max(1);
    let mut pr_times = Vec::new();
    let mut tv_runs = Vec::new();
    for i in 0..pairs {
        // Which runs first alternates too, so neither always follows the other's writes.
        for turn in [i % 2, 1 - i % 2] {
            if turn == 0 {
                pr_times.push(pg_restore());
            } else {
                tv_runs.push(restore_latest("bench_tv_restore", true).await);
            }
            // The slot holds the source's WAL, which a restore's writes (1.3 GB) pass
            // through: read past them, as the daemon would, so that pg_wal does not grow by
            // that much each time (the server's later restores wrote into ever more new WAL
            // files, and were slower for both tools).
            source.capture(&repo).await.unwrap();
            checkpoint();
        }
    }
    let pairs_text: Vec<String> = pr_times
        .iter()
        .zip(&tv_runs)
        .map(|(pr, (restored, tv))| {
            let (pr, tv) = (pr.as_secs_f64(), tv.as_secs_f64());
            format!("{:.2}x ({pr:.2} / {tv:.2} s: {})", pr / tv, steps(restored))
        })
        .collect();
    pr_times.sort();
    tv_runs.sort_by_key(|(_, t)| *t);
    let t_pr = pr_times[pr_times.len() / 2];
    let (before, t_tvr) = tv_runs.swap_remove(tv_runs.len() / 2);
    // Tenant grouping: an ungrouped snapshot for comparison, and tenants restored alone.
    let tenant_figures = if fixture_scale > 0 {
        let replica = dir.path().join("replica");
        Some(tenants::measure(dir.path(), &url, &repo, &replica).await)
    } else {
        None
    };
    // Per-tenant keys off and on, taking turns.
    let key_pairs = env_u64("TIMEVAULT_BENCH_KEYS_PAIRS", 3);
    let key_figures = if fixture_scale > 0 && key_pairs > 0 {
        eprintln!("tenant keys off and on, {key_pairs} pairs...");
        Some(keys::measure(dir.path(), &url, key_pairs).await)
    } else {
        None
    };

    // Capture lag with the daemon running under pgbench, then the restore that replays it all.
    let lagged = if lag_secs > 0 && scale > 0 {
        eprintln!("capture lag: pgbench -R {lag_rate} for {lag_secs} s under the daemon...");
        let slot = source.slot().to_string();
        // The restores above wrote gigabytes of WAL into other databases of the cluster, which
        // the slot's first peek would decode at the start of the measured run; two passes (a
        // checkpoint between them logs the running transactions the slot's restart point
        // moves to) read past it first, as a running daemon would have.
        source.capture(&repo).await.unwrap();
        checkpoint();
        source.capture(&repo).await.unwrap();
        source.close(&repo).await.unwrap();
        // Both capture methods in the same run, taking turns: the goal's rate first, then
        // higher rates until the lag p99 passes 2 s (TIMEVAULT_BENCH_RAMP_RATES).
        let mut figures = Vec::new();
        for method in METHODS {
            let run = lag::Run {
                rate: lag_rate,
                seconds: lag_secs,
                capture: lag::Capture {
                    interval: LAG_INTERVAL,
                    method,
                },
            };
            figures.push(lag::measure(dir.path(), text, "bench", &url, &slot, run).await);
        }
        let mut ramp = Vec::new();
        for rate in ramp_rates() {
            for method in METHODS {
                let run = lag::Run {
                    rate,
                    seconds: (lag_secs / 2).max(10),
                    capture: lag::Capture {
                        interval: LAG_INTERVAL,
                        method,
                    },
                };
                ramp.push(lag::measure(dir.path(), text, "bench", &url, &slot, run).await);
            }
        }
        source = PostgresSource::open("bench", &url, &repo).await.unwrap();
        let (after, t_replay) = restore_latest("bench_tv_replay", false).await;
        Some((figures, ramp, after, t_replay))
    } else {
        None
    };
    source.drop_slot().await.unwrap();

    let ratio = |a: Duration, b: Duration| b.as_secs_f64() / a.as_secs_f64();
    println!(
        "pgbench scale {scale} + fixture scale {fixture_scale} ({fixture_rows} fixture rows): database {:.0} MB, {} rows",
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
        "restore (medians of {pairs} alternating runs): timevault {:.2} s | createdb + pg_restore -j 2 {:.2} s | timevault speed vs pg_restore: {:.2}x; each pair (pg_restore / timevault): {}",
        t_tvr.as_secs_f64(),
        t_pr.as_secs_f64(),
        ratio(t_tvr, t_pr),
        pairs_text.join(", ")
    );
    println!("restore steps: {}", steps(&before));
    if let Some(f) = &tenant_figures {
        tenants::print(f, t_tv, tv_bytes, t_tvr);
    }
    if let Some(f) = &key_figures {
        keys::print(f);
    }
    if let Some((figures, ramp, after, t_replay)) = lagged {
        for f in &figures {
            print_lag(f);
        }
        print_methods(&figures, &ramp);
        print_replay(t_tvr, &after, t_replay);
    }
}

/// A restore's steps and their times, in order.
fn steps(restored: &timevault::restore::postgres::PostgresRestore) -> String {
    let steps: Vec<String> = restored
        .phases
        .iter()
        .map(|p| format!("{} {:.2} s", p.name, p.seconds))
        .collect();
    steps.join(", ")
}

/// The capture methods compared, in the order they run.
const METHODS: [&str; 2] = ["streaming", "polling"];

/// The capture interval of the lag runs (issue 23: sub-second, with a 1 s p99 goal at 500 tps).
const LAG_INTERVAL: &str = "500ms";

/// The rates of the ramp after the goal's rate (TIMEVAULT_BENCH_RAMP_RATES, comma-separated;
/// empty: no ramp).
fn ramp_rates() -> Vec<u32> {
    std::env::var("TIMEVAULT_BENCH_RAMP_RATES")
        .unwrap_or_else(|_| "1000,2000,4000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect()
}

/// Streaming next to polling: lag at the goal's rate, the highest rate each kept under a 2 s
/// p99, the WAL decoded per WAL written, and the CPU per 1,000 transactions.
fn print_methods(figures: &[lag::LagFigures], ramp: &[lag::LagFigures]) {
    fn of<'a>(method: &str, set: &'a [lag::LagFigures]) -> Vec<&'a lag::LagFigures> {
        set.iter().filter(|f| f.capture.method == method).collect()
    }
    for method in METHODS {
        let Some(at_goal) = of(method, figures).first().copied() else {
            continue;
        };
        let all: Vec<&lag::LagFigures> = of(method, figures)
            .into_iter()
            .chain(of(method, ramp))
            .collect();
        // The rate pgbench reached (this machine may not reach the rate asked for).
        let reached = |f: &lag::LagFigures| f.lags.len() as f64 / f.seconds as f64;
        let sustained = all
            .iter()
            .filter(|f| f.quantile(0.99) < 2.0 && f.unacknowledged == 0)
            .map(|f| reached(f))
            .fold(None, |best: Option<f64>, r| {
                Some(best.map_or(r, |b| b.max(r)))
            });
        let ramp_text: Vec<String> = of(method, ramp)
            .iter()
            .map(|f| {
                format!(
                    "-R {}: {:.0} tps reached, p99 {:.3} s, WAL read per WAL written {:.2}",
                    f.rate,
                    reached(f),
                    f.quantile(0.99),
                    f.server_read_bytes as f64 / f.wal_bytes.max(1) as f64
                )
            })
            .collect();
        println!(
            "capture {method} (capture_interval {LAG_INTERVAL}): at {} tps p99 {:.3} s ({} the 1 s goal); \
             WAL read by the server for timevault per WAL written {:.2} ({:.1} MB read for {:.1} MB written; \
             transaction data decoded {:.1} MB); \
             CPU {:.3} s per 1,000 transactions ({:.1} s for {}); highest rate reached with p99 under 2 s: {}; ramp: {}",
            at_goal.rate,
            at_goal.quantile(0.99),
            if at_goal.quantile(0.99) < 1.0 { "meets" } else { "MISSES" },
            at_goal.server_read_bytes as f64 / at_goal.wal_bytes.max(1) as f64,
            mb(at_goal.server_read_bytes.max(0) as u64),
            mb(at_goal.wal_bytes.max(0) as u64),
            mb(at_goal.decoded_bytes.max(0) as u64),
            at_goal.cpu_seconds / (at_goal.lags.len().max(1) as f64 / 1000.0),
            at_goal.cpu_seconds,
            at_goal.lags.len(),
            sustained.map_or("none measured".to_string(), |r| format!("{r:.0} tps (of the rates run)")),
            ramp_text.join("; ")
        );
    }
    if let (Some(s), Some(p)) = (
        of("streaming", figures).first(),
        of("polling", figures).first(),
    ) {
        println!(
            "streaming vs polling at {} tps: lag p99 {:.2}x, WAL read per WAL written {:.2}x, CPU per transaction {:.2}x (polling / streaming)",
            s.rate,
            p.quantile(0.99) / s.quantile(0.99),
            (p.server_read_bytes as f64 / p.wal_bytes.max(1) as f64)
                / (s.server_read_bytes as f64 / s.wal_bytes.max(1) as f64),
            (p.cpu_seconds / p.lags.len().max(1) as f64) / (s.cpu_seconds / s.lags.len().max(1) as f64)
        );
    }
}

fn print_lag(f: &lag::LagFigures) {
    for line in &f.pgbench {
        println!(
            "pgbench -R {} -T {} ({}): {line}",
            f.rate, f.seconds, f.capture.method
        );
    }
    let (p50, p99) = (f.quantile(0.50), f.quantile(0.99));
    println!(
        "capture lag, {} (acknowledged - committed, daemon capture_interval {}, probe every {} ms): \
         {} transactions ({} row changes): p50 {:.3} s, p99 {:.3} s, max {:.3} s; \
         p99 is {:.2}x the 2 s goal ({}); {} not acknowledged during the run; {} daemon job errors",
        f.capture.method,
        f.capture.interval,
        lag::PROBE.as_millis(),
        f.lags.len(),
        f.changes,
        p50,
        p99,
        f.lags.last().copied().unwrap_or(f64::NAN),
        p99 / 2.0,
        if p99 < 2.0 { "met" } else { "NOT met" },
        f.unacknowledged,
        f.errors
    );
    println!(
        "capture passes that shipped: {} in {} s; time between them p50 {:.2} s, p99 {:.2} s, max {:.2} s; \
         WAL written {:.1} MB ({:.2} MB/s); WAL each peek and advance decodes again (restart to confirmed): mean {:.1} MB, max {:.1} MB",
        f.gaps.len() + 1,
        f.seconds,
        lag::quantile(&f.gaps, 0.5),
        lag::quantile(&f.gaps, 0.99),
        f.gaps.last().copied().unwrap_or(f64::NAN),
        mb(f.wal_bytes.max(0) as u64),
        mb(f.wal_bytes.max(0) as u64) / f.seconds as f64,
        f.redecode_mean / 1e6,
        mb(f.redecode_max.max(0) as u64)
    );
}

fn print_replay(
    t_before: Duration,
    after: &timevault::restore::postgres::PostgresRestore,
    t_after: Duration,
) {
    let replay_seconds = |r: &timevault::restore::postgres::PostgresRestore| {
        r.phases
            .iter()
            .find(|p| p.name == "replay")
            .map_or(f64::NAN, |p| p.seconds)
    };
    let seconds = replay_seconds(after);
    println!(
        "replay: restore latest replayed {} transactions, {} row changes in {:.2} s (its replay step): \
         {:.0} row changes/s, {:.0} transactions/s; whole restore {:.2} s vs {:.2} s before the pgbench run \
         (same snapshot; steps: {})",
        after.summary.transactions,
        after.changes,
        seconds,
        after.changes as f64 / seconds,
        after.summary.transactions as f64 / seconds,
        t_after.as_secs_f64(),
        t_before.as_secs_f64(),
        steps(after)
    );
}
