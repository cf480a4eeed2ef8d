//! The SQLite torture run (issue 18): a writer in another process (Python's sqlite3 module,
//! a new connection per transaction, as a CGI or cron application writes) commits about 25
//! transactions a second while the daemon is killed with SIGKILL at random moments and
//! restarted; snapshots (every 20 s) and timevault's own checkpoints (12 KB rows pass 1,000 WAL
//! frames within seconds; asserted from the daemon's log) happen under the writes.
//!
//! Afterwards a dozen random instants of the restorable windows are restored, and each must
//! hold exactly the rows 1..k: every row whose commit had returned 2.5 s before the instant is
//! present, and no row whose commit began after the instant is. A kill may cost a gap in the
//! windows (the writer's last close checkpoints and deletes the WAL while no daemon holds it
//! open, and the restarted daemon says so and starts a new chain); it must never cost a row
//! inside a window.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::torture::{check_rows, instants_in, read_commits};
use common::{ok, timevault, Env, KillOnDrop};
use rand::{Rng, SeedableRng};
use timevault::catalog::SourceCatalog;
use timevault::repo::Repository;

const WRITER: &str = r#"
import sqlite3, sys, time
db, log, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.time() + seconds
k = 0
with open(log, "w", buffering=1) as out:
    while time.time() < end:
        k += 1
        before = time.time()
        conn = sqlite3.connect(db, timeout=60)
        conn.execute("INSERT INTO torture (k, payload) VALUES (?, randomblob(12000))", (k,))
        conn.commit()
        conn.close()
        after = time.time()
        out.write(f"{k} {before:.6f} {after:.6f}\n")
        time.sleep(max(0.0, 0.04 - (after - before)))
"#;

/// The rows of the `torture` table in a restored file.
fn rows(db: &Path) -> Vec<i64> {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg("SELECT k FROM torture ORDER BY k")
        .output()
        .expect("the sqlite3 shell is needed: apt-get install -y sqlite3");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_an_external_writer_loses_no_row_inside_a_window() {
    let env = Env::new(187).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = env
        .config_builder()
        .schedule("snapshot", "*/20 * * * * *")
        .listen(port)
        .write(env.path());
    ok(&timevault(&config, &["init"]));
    let made = Command::new("sqlite3")
        .arg(&env.db)
        .arg("CREATE TABLE torture (k INTEGER PRIMARY KEY, payload BLOB)")
        .status()
        .expect("the sqlite3 shell is needed: apt-get install -y sqlite3");
    assert!(made.success());
    // Every run appends to daemon.log: the checks below read what all of them logged.
    let command = Daemon::command(&config).append();
    let mut daemon = command.start();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let script = env.path().join("writer.py");
    std::fs::write(&script, WRITER).unwrap();
    let commits_log = env.path().join("commits.log");
    let writer_seconds = 45.0;
    let mut writer = KillOnDrop(
        Command::new("python3")
            .arg(&script)
            .arg(&env.db)
            .arg(&commits_log)
            .arg(writer_seconds.to_string())
            .spawn()
            .expect("python3 is needed: apt-get install -y python3"),
    );

    // The first stretch runs undisturbed, long enough for the WAL to pass 1,000 frames and
    // timevault to checkpoint it under the writes; then kill -9 at random moments, restart
    // after a random pause.
    tokio::time::sleep(Duration::from_secs(14)).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(187);
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs_f64(writer_seconds - 14.0 - 6.0) {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(2500..5000))).await;
        daemon.kill();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..400))).await;
        daemon = command.start();
    }
    assert!(kills >= 5, "only {kills} kills");
    let status = writer.wait().unwrap();
    assert!(status.success(), "writer failed");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let log = daemon.stop();

    let commits = read_commits(&commits_log);
    assert!(commits.len() > 500, "{} commits", commits.len());
    let config = timevault::config::Config::load(&config).unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let catalog = SourceCatalog::load(&repo, "app").await.unwrap();
    let windows = catalog.windows();
    let losses: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("continuity lost"))
        .collect();
    // Every gap between windows was reported as a loss when it happened.
    assert!(
        windows.len() <= losses.len() + 1,
        "{} windows after {kills} kills, {} reported losses: {windows:?}\n{}",
        windows.len(),
        losses.len(),
        losses.join("\n")
    );
    // timevault's own checkpoints (the WAL passes 1,000 frames between snapshots) ran under
    // the writes too.
    let checkpoints = log.matches("WAL checkpointed by timevault").count();
    assert!(
        checkpoints >= 1,
        "no checkpoint of timevault's during the run:\n{log}"
    );
    eprintln!(
        "{checkpoints} checkpoints, {kills} kills, {} windows, {} losses:\n{}",
        windows.len(),
        losses.len(),
        losses.join("\n")
    );
    // Instants inside the windows while the writer ran.
    let first = commits[0].after + chrono::Duration::seconds(3);
    let instants = instants_in(&windows, first, 12, &mut rng);
    for (i, instant) in instants.into_iter().enumerate() {
        let target = env.path().join(format!("at-{i}.db"));
        let out = timevault(
            &env.path().join("timevault.toml"),
            &[
                "restore",
                "--source",
                "app",
                "--at",
                &instant.to_rfc3339(),
                "--to",
                target.to_str().unwrap(),
            ],
        );
        ok(&out);
        check_rows(instant, &rows(&target), &commits);
    }
}
