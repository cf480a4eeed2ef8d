//! One source's long job does not stall another's capture (issue 19): the capture lag of a SQLite
//! source while a PostgreSQL snapshot of the `pgbench -i -s 50` database runs in the same
//! daemon, next to the same source's lag in a daemon of its own (the baseline), in one run.
//! Prints figures; asserts nothing about time.
//!
//! **Lag of one SQLite commit** = the instant the segment holding it was first listed in the
//! repository (a probe lists the change log every [`PROBE`]) minus the writer's commit instant.
//! The writer is another process (python3's `sqlite3`): after each commit it records its wall
//! time and the WAL position the commit reached (the WAL header's salt1 and the WAL index's
//! `mxFrame`, both read through descriptors it keeps open, so it never drops its own SQLite
//! locks). A segment holds the commit when its `end` position has the same salt1 and at least
//! that frame count, or a later salt1 (a restart after timevault's checkpoint). Both clocks are
//! this host's.
//!
//! `cargo bench --bench isolation`. Environment: TIMEVAULT_BENCH_PGBENCH_SCALE (default 50),
//! TIMEVAULT_BENCH_WRITE_MS (default 50: one commit every 50 ms), TIMEVAULT_BENCH_BASELINE_SECS
//! (default 20).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use timevault::catalog::SourceCatalog;
use timevault::changelog::SegmentManifest;
use timevault::config::Config;
use timevault::daemon::{self, DaemonOptions};
use timevault::repo::{layout, Repository};
use timevault_fixtures::harness::postgres::postgres;
use timevault_fixtures::{generate_sqlite, GenerateOptions};

/// How often the probe lists the SQLite source's change log.
const PROBE: Duration = Duration::from_millis(25);

/// The writer: one small commit every `interval` seconds until `seconds` have passed; after
/// each, a line `<unix time> <salt1> <mxFrame>`.
const WRITER: &str = r#"
import os, sqlite3, struct, sys, time
db, out, seconds, interval = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
c = sqlite3.connect(db, isolation_level=None)
c.execute("CREATE TABLE IF NOT EXISTS tick (id INTEGER PRIMARY KEY, at REAL, pad TEXT)")
wal = os.open(db + "-wal", os.O_RDONLY)
shm = os.open(db + "-shm", os.O_RDONLY)
end = time.time() + seconds
with open(out, "w") as f:
    while time.time() < end:
        c.execute("INSERT INTO tick (at, pad) VALUES (?, ?)", (time.time(), "x" * 200))
        at = time.time()
        salt1 = struct.unpack(">I", os.pread(wal, 4, 16))[0]
        frames = struct.unpack("<I", os.pread(shm, 4, 16))[0]
        f.write(f"{at} {salt1} {frames}\n")
        time.sleep(interval)
c.close()
"#;

struct Commit {
    at: DateTime<Utc>,
    salt1: u32,
    frames: u64,
}

/// A segment as the probe first saw it, with the WAL position it ends at.
struct Seen {
    at: DateTime<Utc>,
    salt1: u32,
    frames: u64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

fn config(dir: &Path, postgres_url: Option<&str>) -> Config {
    let postgres = postgres_url.map_or(String::new(), |url| {
        format!("[[sources]]\nname = \"pg\"\nkind = \"postgres\"\nurl = \"{url}\"\n")
    });
    let text = format!(
        "[repository]\nkey_file = \"k\"\n[[replicas]]\nname = \"a\"\nregion = \"r\"\nurl = \"replica\"\n\
         [[sources]]\nname = \"app\"\nkind = \"sqlite\"\nurl = \"app.db\"\n{postgres}\
         [schedule]\ncapture_interval = \"1s\"\n[daemon]\nlisten = \"127.0.0.1:{}\"\n",
        free_port()
    );
    Config::parse(&text, &dir.join("timevault.toml")).expect("config")
}

/// List the SQLite source's change log every [`PROBE`] until `stop`; each new segment with the
/// instant it was first listed.
async fn probe(config: Config, stop: Arc<AtomicBool>) -> Vec<Seen> {
    let repo = Repository::open(&config).await.expect("repository");
    let mut known = std::collections::BTreeSet::new();
    let mut seen = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(PROBE).await;
        let Ok(keys) = repo.list(&layout::changelog_prefix("app")).await else {
            continue;
        };
        let now = Utc::now();
        for key in keys {
            if !known.insert(key.clone()) {
                continue;
            }
            let manifest = SegmentManifest::read(&repo, &key).await.expect("segment");
            let wal = &manifest.end["wal"];
            if let (Some(salt1), Some(frames)) = (wal["salt1"].as_u64(), wal["frames"].as_u64()) {
                seen.push(Seen {
                    at: now,
                    salt1: salt1 as u32,
                    frames,
                });
            }
        }
    }
    seen
}

fn read_commits(path: &Path) -> Vec<Commit> {
    std::fs::read_to_string(path)
        .expect("writer log")
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let at: f64 = parts.next()?.parse().ok()?;
            Some(Commit {
                at: Utc
                    .timestamp_micros((at * 1e6) as i64)
                    .single()
                    .expect("time"),
                salt1: parts.next()?.parse().ok()?,
                frames: parts.next()?.parse().ok()?,
            })
        })
        .collect()
}

/// Every commit's lag (sorted, seconds) and how many commits no segment was seen holding.
fn lags(commits: &[Commit], seen: &[Seen]) -> (Vec<f64>, usize) {
    let mut lags = Vec::new();
    let mut missing = 0;
    for c in commits {
        let holder = seen
            .iter()
            .filter(|s| s.salt1 > c.salt1 || (s.salt1 == c.salt1 && s.frames >= c.frames))
            .map(|s| s.at)
            .min();
        match holder {
            Some(at) => lags.push((at - c.at).num_microseconds().unwrap_or(0) as f64 / 1e6),
            None => missing += 1,
        }
    }
    lags.sort_by(f64::total_cmp);
    (lags, missing)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One daemon run (with or without the PostgreSQL source) while the writer writes for
/// `seconds`; the writer's commits and the probe's segments, and when the PostgreSQL snapshot
/// ended (`None` without it).
async fn run(
    dir: &Path,
    postgres_url: Option<&str>,
    seconds: f64,
    write_every: f64,
) -> (
    Vec<Commit>,
    Vec<Seen>,
    Option<(DateTime<Utc>, DateTime<Utc>)>,
) {
    let config = config(dir, postgres_url);
    let repo = Repository::open(&config).await.expect("repository");
    let stop = Arc::new(AtomicBool::new(false));
    let probing = tokio::spawn(probe(config.clone(), stop.clone()));
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon_config = config.clone();
    let daemon = tokio::spawn(async move {
        daemon::run(&daemon_config, &repo, &DaemonOptions::default(), async {
            let _ = stopped.await;
        })
        .await
    });
    let log = dir.join("writer.log");
    let writer = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(WRITER)
        .arg(dir.join("app.db"))
        .arg(&log)
        .arg(seconds.to_string())
        .arg(write_every.to_string())
        .status();
    let snapshot = async {
        postgres_url?;
        let repo = Repository::open(&config).await.expect("repository");
        loop {
            assert!(
                !daemon.is_finished(),
                "the daemon stopped before the PostgreSQL snapshot finished"
            );
            let catalog = SourceCatalog::load(&repo, "pg").await.expect("catalog");
            if let Some(chain) = catalog.chains.first() {
                let listed = Utc::now();
                return Some((chain.start(), listed));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (status, snapshot) = tokio::join!(writer, snapshot);
    assert!(status.expect("python3 runs").success(), "writer failed");
    // The last commits are shipped by the running loop, not by the shutdown's capture.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = shutdown.send(());
    let runs = daemon.await.expect("daemon task").expect("daemon run");
    stop.store(true, Ordering::Relaxed);
    let seen = probing.await.expect("probe task");
    let errors: u64 = runs.iter().map(|r| r.errors).sum();
    assert_eq!(
        errors,
        0,
        "daemon jobs failed: {:?}",
        runs.iter().map(|r| &r.last_error).collect::<Vec<_>>()
    );
    (read_commits(&log), seen, snapshot)
}

fn print(label: &str, lags: &[f64], missing: usize) {
    println!(
        "{label}: {} commits, lag p50 {:.2} s, p99 {:.2} s, max {:.2} s{}",
        lags.len(),
        quantile(lags, 0.5),
        quantile(lags, 0.99),
        lags.last().copied().unwrap_or(f64::NAN),
        if missing > 0 {
            format!(", {missing} never seen in a segment")
        } else {
            String::new()
        }
    );
}

async fn sqlite_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    generate_sqlite(
        &dir.path().join("app.db"),
        &GenerateOptions { seed: 7, scale: 1 },
    )
    .await
    .unwrap();
    let config = config(dir.path(), None);
    Repository::init(&config).await.expect("init");
    dir
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    timevault::allocator::tune();
    let scale = env_u64("TIMEVAULT_BENCH_PGBENCH_SCALE", 50);
    let write_every = env_u64("TIMEVAULT_BENCH_WRITE_MS", 50) as f64 / 1000.0;
    let baseline_secs = env_u64("TIMEVAULT_BENCH_BASELINE_SECS", 20) as f64;

    eprintln!("baseline: the SQLite source alone for {baseline_secs} s...");
    let alone = sqlite_dir().await;
    let (commits, seen, _) = run(alone.path(), None, baseline_secs, write_every).await;
    let (base, base_missing) = lags(&commits, &seen);

    let url = postgres().create_database().await.unwrap();
    eprintln!("pgbench -i -s {scale}...");
    let init = Command::new("pgbench")
        .args(["-i", "-q", "-s", &scale.to_string(), &url])
        .status()
        .expect("pgbench is installed (postgresql-contrib)");
    assert!(init.success());
    // The daemon's preflight refuses a table without a replica identity (pgbench_history).
    let identity = Command::new("psql")
        .args([
            &url,
            "-c",
            "ALTER TABLE pgbench_history REPLICA IDENTITY FULL",
        ])
        .status()
        .expect("psql");
    assert!(identity.success());
    let db_bytes: String = {
        let out = Command::new("psql")
            .args([
                &url,
                "-tAc",
                "SELECT pg_size_pretty(pg_database_size(current_database()))",
            ])
            .output()
            .expect("psql");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    eprintln!("the SQLite source beside the PostgreSQL source's first snapshot...");
    let beside = sqlite_dir().await;
    // Long enough to outlast the snapshot; commits after it ended are left out below.
    let (commits, seen, snapshot) = run(beside.path(), Some(&url), 60.0, write_every).await;
    let (taken_at, listed) = snapshot.expect("the PostgreSQL snapshot finished");
    let during: Vec<Commit> = commits.into_iter().filter(|c| c.at <= listed).collect();
    let (with_pg, with_missing) = lags(&during, &seen);
    println!(
        "isolation: SQLite capture lag (segment listed - writer's commit, capture_interval 1s, one commit every {:.0} ms, probe every {} ms)",
        write_every * 1000.0,
        PROBE.as_millis()
    );
    print("  alone", &base, base_missing);
    print(
        &format!(
            "  while the PostgreSQL snapshot of pgbench -s {scale} ({db_bytes}) ran (snapshot instant {}, listed {})",
            taken_at.format("%H:%M:%S%.3f"),
            listed.format("%H:%M:%S%.3f")
        ),
        &with_pg,
        with_missing,
    );
    println!(
        "  goal: p99 under 1.5 s during the snapshot: {}",
        if quantile(&with_pg, 0.99) < 1.5 {
            "met"
        } else {
            "NOT met"
        }
    );
}
