//! Nothing acknowledged is lost silently (issue 18), proven the way users meet it: the daemon
//! runs as its own process, and every writer is another process (the `sqlite3` shell, which
//! opens and closes the database for each command). A writer inside the test process would
//! share timevault's POSIX locks and prove nothing.
//!
//! * The README's scenario: a change made with `sqlite3` while the daemon runs is restored.
//! * Files changed behind SQLite's back (WAL deleted, truncated or replaced, database file
//!   replaced by `mv`) are each reported as continuity lost: counted in `/metrics`, failing
//!   `/healthz`, a new chain started at once, and later changes restored exactly.
//! * A segment deleted on every replica: a restore past it fails as corrupt naming the key, a
//!   restore before it works, and `verify` reports the hole (and a chunk lost everywhere).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::daemon::Daemon;
use common::{checksums, ok, timevault, Env};
use timevault::catalog::{SnapshotManifest, SnapshotReason, SourceCatalog};
use timevault::repo::Repository;

const INTERVAL_MS: u64 = 250;

fn free_port() -> u16 {
    timevault_fixtures::harness::free_port().unwrap()
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    common::http_get(port, path)
}

fn metric(text: &str, sample: &str) -> Option<f64> {
    common::metric_sample(text, sample)
}

/// Start the daemon (its own process) on `env`'s database, capturing every 250 ms, with
/// `/metrics` on a free port: (daemon, config path, port).
fn start(env: &Env) -> (Daemon, PathBuf, u16) {
    let port = free_port();
    let config = env
        .config_builder()
        .schedule("capture_interval", &format!("{INTERVAL_MS}ms"))
        .listen(port)
        .write(env.path());
    if !env.path().join("timevault.key").exists() {
        ok(&timevault(&config, &["init"]));
    }
    (Daemon::start(&config), config, port)
}

/// Scrape `/metrics` on `port` until `done` accepts it.
fn metrics_until(port: u16, daemon: &Daemon, what: &str, done: impl Fn(&str) -> bool) -> String {
    let patience = (Duration::from_secs(60), Duration::from_millis(50));
    daemon.metrics_until(port, patience, what, done)
}

/// Run one `sqlite3` shell command on `db`, as an application's cron job would.
fn sqlite3(db: &Path, sql: &str) -> Output {
    let out = Command::new("sqlite3")
        .args(["-cmd", ".timeout 20000"])
        .arg(db)
        .arg(sql)
        .output()
        .expect("the sqlite3 shell is needed: apt-get install -y sqlite3");
    assert!(
        out.status.success(),
        "sqlite3 {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Open a repository handle for reading the catalog from the test.
async fn catalog(config: &Path) -> SourceCatalog {
    let config = timevault::config::Config::load(config).unwrap();
    let repo = Repository::open(&config).await.unwrap();
    SourceCatalog::load(&repo, "app").await.unwrap()
}

async fn wait_for_snapshot(config: &Path, daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while catalog(config).await.chains.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no snapshot; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until the daemon has captured past `after` (so what was written before is shipped).
async fn wait_captured_after(config: &Path, after: DateTime<Utc>, daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while catalog(config).await.newest().is_none_or(|t| t <= after) {
        assert!(
            Instant::now() < deadline,
            "nothing captured after {after}; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn restore(config: &Path, at: &str, target: &Path) -> Output {
    timevault(
        config,
        &[
            "restore",
            "--source",
            "app",
            "--at",
            at,
            "--to",
            target.to_str().unwrap(),
        ],
    )
}

/// (device, inode) as /proc/locks prints it: `maj:min:inode`, majors and minors in hex.
fn lock_id(path: &Path) -> (u64, String) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    (meta.ino(), format!(":{}", meta.ino()))
}

/// The POSIX locks `pid` holds on `path` right now.
fn locks_held(pid: u32, path: &Path) -> usize {
    let (_, inode) = lock_id(path);
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 5 && f[4] == pid.to_string() && f[5].ends_with(&inode)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_writes_while_the_daemon_runs_are_restored() {
    let env = Env::new(181).await;
    let (daemon, config, _) = start(&env);
    wait_for_snapshot(&config, &daemon).await;
    // The lock rule: after its snapshot read the whole file, the daemon still holds SQLite's
    // lock on the database file (before the fix, closing its own copy descriptor dropped it).
    assert!(
        locks_held(daemon.id(), &env.db) > 0,
        "the daemon holds no lock on the database file after its snapshot: {}",
        std::fs::read_to_string("/proc/locks").unwrap()
    );
    // The README's scenario, then more shell commands, each its own process.
    sqlite3(&env.db, "DELETE FROM contracts WHERE id % 2 = 0");
    for i in 0..5 {
        sqlite3(
            &env.db,
            &format!("UPDATE contracts SET title = title || ' (rev {i})' WHERE id % 3 = 0"),
        );
    }
    let written = Utc::now();
    wait_captured_after(&config, written, &daemon).await;
    assert!(
        std::fs::metadata(format!("{}-wal", env.db.display())).is_ok(),
        "the shell's last close checkpointed and deleted the WAL under the daemon"
    );
    let log = daemon.stop();
    assert!(!log.contains("continuity lost"), "{log}");
    let target = env.path().join("restored.db");
    ok(&restore(&config, "latest", &target));
    assert_eq!(
        checksums(&target).await,
        checksums(&env.db).await,
        "restore --at latest differs from the database the shell changed"
    );
}

/// What each detection test does behind SQLite's back.
#[derive(Debug, Clone, Copy)]
enum Tamper {
    DeleteWal,
    TruncateWal,
    ReplaceWal,
    ReplaceDatabase,
}

fn tamper(env: &Env, how: Tamper) {
    let wal = PathBuf::from(format!("{}-wal", env.db.display()));
    match how {
        Tamper::DeleteWal => std::fs::remove_file(&wal).unwrap(),
        Tamper::TruncateWal => {
            // Cut the WAL in the middle of frames the daemon has already read.
            let len = std::fs::metadata(&wal).unwrap().len();
            let file = std::fs::OpenOptions::new().write(true).open(&wal).unwrap();
            file.set_len(32 + (len - 32) / 3).unwrap();
        }
        Tamper::ReplaceWal => {
            let copy = env.path().join("wal.copy");
            std::fs::copy(&wal, &copy).unwrap();
            std::fs::rename(&copy, &wal).unwrap();
        }
        Tamper::ReplaceDatabase => {
            // Another tool restores a different database file over the live one.
            let other = env.path().join("other.db");
            sqlite3(&env.db, &format!(".backup {}", other.display()));
            sqlite3(&other, "DELETE FROM contracts WHERE id % 5 = 0");
            std::fs::rename(&other, &env.db).unwrap();
            let _ = std::fs::remove_file(&wal);
            let _ = std::fs::remove_file(format!("{}-shm", env.db.display()));
        }
    }
}

async fn detects(how: Tamper, seed: u64) {
    let env = Env::new(seed).await;
    let (daemon, config, port) = start(&env);
    wait_for_snapshot(&config, &daemon).await;
    // Frames in the WAL that the daemon has read.
    for i in 0..3 {
        sqlite3(
            &env.db,
            &format!("UPDATE contracts SET title = title || ' x{i}' WHERE id % 4 = {i}"),
        );
    }
    wait_captured_after(&config, Utc::now(), &daemon).await;
    let chains_before = catalog(&config).await.chains.len();

    let tampered_at = Utc::now();
    tamper(&env, how);
    let text = metrics_until(port, &daemon, "a continuity loss", |t| {
        metric(t, "timevault_continuity_lost_total{source=\"app\"}").unwrap_or(0.0) >= 1.0
    });
    assert_eq!(
        metric(&text, "timevault_continuity_lost{source=\"app\"}"),
        Some(1.0)
    );
    let (status, body) = get(port, "/healthz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("continuity lost"), "{body}");

    // A new chain, started at once, says why.
    let deadline = Instant::now() + Duration::from_secs(60);
    let chain = loop {
        let cat = catalog(&config).await;
        if cat.chains.len() > chains_before {
            break cat.chains.last().unwrap().clone();
        }
        assert!(Instant::now() < deadline, "no new chain: {}", daemon.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let delay = (chain.start() - tampered_at).to_std().unwrap_or_default();
    // Two capture intervals, plus slack for a loaded CI machine.
    assert!(
        delay < Duration::from_millis(2 * INTERVAL_MS) + Duration::from_secs(3),
        "the new chain started {delay:?} after {how:?}"
    );
    {
        let config = timevault::config::Config::load(&config).unwrap();
        let repo = Repository::open(&config).await.unwrap();
        let snapshot = SnapshotManifest::read(&repo, &chain.snapshot.key)
            .await
            .unwrap();
        assert!(
            matches!(snapshot.reason, SnapshotReason::ContinuityLost(_)),
            "{:?}",
            snapshot.reason
        );
    }
    // Status shows it (published by the daemon in its lease).
    let status = ok(&timevault(&config, &["status", "--json"]));
    assert!(status.contains("continuity lost"), "{status}");

    // Changes after the loss are kept.
    sqlite3(&env.db, "DELETE FROM contracts WHERE id % 7 = 0");
    sqlite3(
        &env.db,
        "UPDATE contracts SET title = 'after the loss' WHERE id % 11 = 0",
    );
    wait_captured_after(&config, Utc::now(), &daemon).await;
    let log = daemon.stop();
    assert!(log.contains("continuity lost"), "{log}");
    let target = env.path().join("after.db");
    ok(&restore(&config, "latest", &target));
    assert_eq!(
        checksums(&target).await,
        checksums(&env.db).await,
        "{how:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_wal_is_continuity_lost() {
    detects(Tamper::DeleteWal, 182).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_wal_is_continuity_lost() {
    detects(Tamper::TruncateWal, 183).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_wal_is_continuity_lost() {
    detects(Tamper::ReplaceWal, 184).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_replaced_by_mv_is_continuity_lost() {
    detects(Tamper::ReplaceDatabase, 185).await;
}

/// Delete `key` on every replica (as a lost object would be).
fn delete_everywhere(env: &Env, key: &str) {
    for replica in ["eu-west", "eu-north"] {
        let path = env.path().join("replicas").join(replica).join(key);
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_lost_everywhere_is_corrupt_and_verify_reports_it() {
    let env = Env::new(186).await;
    let (daemon, config, _) = start(&env);
    wait_for_snapshot(&config, &daemon).await;
    for i in 0..4 {
        sqlite3(
            &env.db,
            &format!("UPDATE contracts SET title = 'v{i}' WHERE id % 4 = {i}"),
        );
        wait_captured_after(&config, Utc::now(), &daemon).await;
    }
    daemon.stop();
    let cat = catalog(&config).await;
    assert_eq!(cat.chains.len(), 1);
    let segments = &cat.chains[0].segments;
    assert!(segments.len() >= 4, "{segments:?}");
    let lost = segments[1].clone();
    let before = segments[0].captured_at;
    delete_everywhere(&env, &lost.key);

    let out = restore(&config, "latest", &env.path().join("latest.db"));
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // `changelog/<source>/<chain>/<seq>-`: the key up to its capture time and lease epoch.
    let prefix = timevault::repo::layout::segment_seq_prefix("app", &lost.chain, lost.seq);
    assert!(
        stderr.contains(&prefix),
        "names the missing segment: {stderr}"
    );
    assert!(
        stderr.contains(&before.to_rfc3339()),
        "names the last exact instant: {stderr}"
    );
    assert!(!env.path().join("latest.db").exists());
    let early = env.path().join("early.db");
    ok(&restore(&config, &before.to_rfc3339(), &early));

    let out = timevault(&config, &["verify"]);
    assert_eq!(out.status.code(), Some(9), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("hole in source app"), "{stdout}");
    assert!(stdout.contains(&prefix), "{stdout}");

    // A chunk a segment names, lost on every replica: verify (without --read-data) says so.
    let repo = Repository::open(&timevault::config::Config::load(&config).unwrap())
        .await
        .unwrap();
    let mut chunk = None;
    for entry in &segments[2..] {
        let kept = timevault::changelog::SegmentManifest::read(&repo, &entry.key)
            .await
            .unwrap();
        chunk = chunk.or(kept.chunks.first().map(|c| c.id.clone()));
    }
    let chunk = chunk.expect("a later segment with frames");
    delete_everywhere(&env, &timevault::repo::layout::chunk(&chunk));
    let out = timevault(&config, &["verify", "--json"]);
    assert_eq!(out.status.code(), Some(9));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dangling = report["catalog"]["dangling"].as_array().unwrap();
    assert!(
        dangling.iter().any(|d| d["chunk"] == chunk.as_str()),
        "{report}"
    );
}
