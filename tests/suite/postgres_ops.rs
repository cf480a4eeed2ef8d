//! Operating the PostgreSQL source through the binary on a real PostgreSQL 15 cluster:
//! slot health in `status`, and kill -9 of the daemon while it captures under a steady write
//! load (pgbench at a fixed rate plus a writer that counts its commits).

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::config::ConfigBuilder;
use common::daemon::{Daemon, DaemonCommand};
use common::{ok, timevault};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};
use timevault_fixtures::harness::unique_name;

fn write_config(dir: &Path, url: &str, options: &[(&str, &str)]) -> PathBuf {
    write_named_config(dir, "db", url, options)
}

/// Replication slots are cluster-wide and named after the source (`timevault_<source>`): tests
/// running at once on the shared cluster need different source names, or one test's slot
/// changes (the health test drops `timevault_db`) land in the other's chain.
fn write_named_config(dir: &Path, source: &str, url: &str, options: &[(&str, &str)]) -> PathBuf {
    ConfigBuilder::one_replica("replica-a")
        .replica("b", "r", "replica-b")
        .lease_ttl("3s")
        .source_with(source, "postgres", url, options.iter().copied())
        .schedule("capture_interval", "200ms")
        .write(dir)
}

async fn state(url: &str) -> BTreeMap<String, String> {
    common::pg_state(url).await
}

fn status_json(config: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&timevault(config, &["status", "--json"]))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_slot_health_and_warns() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::pg!().create_database().await.unwrap();
    let mut c = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("CREATE TABLE t (id bigint PRIMARY KEY, body text)")
        .execute(&mut c)
        .await
        .unwrap();
    let config = write_config(dir.path(), &url, &[("slot_wal_warn", "64KiB")]);
    ok(&timevault(&config, &["init"]));
    // No slot yet.
    let text = ok(&timevault(&config, &["status"]));
    assert!(
        text.contains("WARNING: replication slot timevault_db does not exist"),
        "{text}"
    );
    ok(&timevault(&config, &["daemon", "--once"]));
    // WAL written and not captured: the slot retains it.
    sqlx::raw_sql(
        "INSERT INTO t SELECT g, repeat(md5(g::text), 10) FROM generate_series(1, 5000) g",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let status = status_json(&config);
    let slot = &status["sources"][0]["slot"];
    assert_eq!(slot["slot"], "timevault_db");
    assert_eq!(slot["exists"], true);
    assert_eq!(slot["warn_threshold_bytes"], 65536);
    assert!(
        slot["retained_wal_bytes"].as_i64().unwrap() > 65536,
        "{slot}"
    );
    assert!(
        slot["confirmed_flush_lag_bytes"].as_i64().unwrap() > 65536,
        "{slot}"
    );
    assert!(slot["warnings"][0]
        .as_str()
        .unwrap()
        .contains("of WAL (threshold 64.0 KiB)"));
    let text = ok(&timevault(&config, &["status"]));
    assert!(text.contains("slot timevault_db: idle, retains"), "{text}");
    assert!(
        text.contains("WARNING: replication slot timevault_db retains"),
        "{text}"
    );
    // Captured: the confirmed position catches up; with the default threshold, no warning.
    ok(&timevault(&config, &["daemon", "--once"]));
    let config = write_config(dir.path(), &url, &[]);
    let slot = status_json(&config)["sources"][0]["slot"].clone();
    assert!(
        slot["confirmed_flush_lag_bytes"].as_i64().unwrap() < 65536,
        "{slot}"
    );
    assert_eq!(slot["warnings"].as_array().unwrap().len(), 0, "{slot}");
    // A threshold that is not a size is a configuration error naming the option.
    let config = write_config(dir.path(), &url, &[("slot_wal_warn", "lots")]);
    let out = timevault(&config, &["status"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("slot_wal_warn"), "{stderr}");
    // Dropped slot: warned about.
    crate::common::drop_slot(&url, "timevault_db");
    let config = write_config(dir.path(), &url, &[]);
    let slot = status_json(&config)["sources"][0]["slot"].clone();
    assert_eq!(slot["exists"], false);
    assert!(slot["warnings"][0]
        .as_str()
        .unwrap()
        .contains("does not exist"));
    c.close().await.unwrap();
}

/// The daemon, logging warnings and errors only.
fn quiet_daemon(config: &Path) -> DaemonCommand {
    Daemon::command(config).log_level("warn")
}

/// pgbench's tables at scale 1, with a replica identity for the keyless history table.
fn pgbench(url: &str, args: &[&str]) -> Child {
    Command::new("pgbench")
        .args(args)
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgbench is installed by .ci/install-deps (postgresql-contrib / postgresql-client)")
}

/// One counted writer: each transaction inserts one keyless event row (a duplicate replay would
/// show as a second row) and bumps a counter. Returns how many transactions committed.
async fn writer(url: String, id: i32, stop: Arc<AtomicBool>) -> i64 {
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let mut committed = 0i64;
    while !stop.load(Ordering::Relaxed) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "BEGIN; INSERT INTO events (writer, seq) VALUES ({id}, {committed}); \
             UPDATE counters SET n = n + 1 WHERE writer = {id}; COMMIT"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        committed += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    conn.close().await.unwrap();
    committed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_during_capture_under_load_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::pg!().create_database().await.unwrap();
    let init = Command::new("pgbench")
        .args(["-i", "-q", "-s", "1", &url])
        .output()
        .expect("pgbench is installed by .ci/install-deps");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let mut c = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "ALTER TABLE pgbench_history REPLICA IDENTITY FULL; \
         CREATE TABLE events (writer int NOT NULL, seq bigint NOT NULL); \
         ALTER TABLE events REPLICA IDENTITY FULL; \
         CREATE TABLE counters (writer int PRIMARY KEY, n bigint NOT NULL); \
         INSERT INTO counters VALUES (1, 0), (2, 0)",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let config = write_named_config(dir.path(), "killed", &url, &[]);
    ok(&timevault(&config, &["init"]));

    // Steady load: pgbench at 100 tps plus two counted writers.
    let bench = pgbench(&url, &["-n", "-c", "2", "-R", "100", "-T", "40"]);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (1..=2)
        .map(|id| tokio::spawn(writer(url.clone(), id, stop.clone())))
        .collect();
    let command = quiet_daemon(&config).append();
    let mut daemon = command.start();
    let mut x: u64 = 0x2545F4914F6CDD1D;
    let mut kills = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        tokio::time::sleep(Duration::from_millis(300 + x % 1500)).await;
        daemon.kill();
        kills += 1;
        daemon = command.start();
    }
    stop.store(true, Ordering::Relaxed);
    let mut committed = Vec::new();
    for w in writers {
        committed.push(w.await.unwrap());
    }
    let bench_out = bench.wait_with_output().unwrap();
    assert!(
        bench_out.status.success(),
        "{}",
        String::from_utf8_lossy(&bench_out.stderr)
    );
    daemon.kill();
    // A final pass ships what is left.
    ok(&timevault(&config, &["daemon", "--once"]));
    let repo =
        timevault::repo::Repository::open(&timevault::config::Config::load(&config).unwrap())
            .await
            .unwrap();
    let catalog = timevault::catalog::SourceCatalog::load(&repo, "killed")
        .await
        .unwrap();
    let mut reasons = Vec::new();
    for chain in &catalog.chains {
        let manifest = timevault::catalog::SnapshotManifest::read(&repo, &chain.snapshot.key)
            .await
            .unwrap();
        reasons.push(format!(
            "{:?} ({} segments)",
            manifest.reason,
            chain.segments.len()
        ));
    }
    assert_eq!(catalog.chains.len(), 1, "one unbroken chain: {reasons:?}");
    let segments = catalog.chains[0].segments.len();
    assert!(
        segments >= 10,
        "the daemons captured between kills: {segments} segments"
    );
    let target = crate::pg!().url(&unique_name("killed").replace('-', "_"));
    let out = ok(&timevault(
        &config,
        &[
            "restore", "--source", "killed", "--at", "latest", "--to", &target, "--jobs", "3",
        ],
    ));
    assert!(out.contains("restored killed"), "{out}");
    assert_eq!(
        state(&target).await,
        state(&url).await,
        "restore equals the source"
    );
    let mut r = PgConnection::connect(&target).await.unwrap();
    for (i, n) in committed.iter().enumerate() {
        let writer = i as i32 + 1;
        let row = sqlx::query(
            "SELECT count(*), count(DISTINCT seq), coalesce(max(seq), -1), \
                    (SELECT n FROM counters WHERE writer = $1) \
             FROM events WHERE writer = $1",
        )
        .bind(writer)
        .fetch_one(&mut r)
        .await
        .unwrap();
        let (rows, distinct, max, counter): (i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        assert_eq!(
            (rows, distinct, max + 1, counter),
            (*n, *n, *n, *n),
            "writer {writer}: every committed transaction exactly once"
        );
    }
    r.close().await.unwrap();
    eprintln!("{kills} kills, {segments} segments; writers committed {committed:?}");
    assert!(kills >= 10, "{kills} kills");
    c.close().await.unwrap();
}

/// The slot's confirmed position as text, or `None` when there is no such slot.
async fn confirmed(c: &mut PgConnection, slot: &str) -> Option<String> {
    sqlx::query_scalar(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(c)
    .await
    .unwrap()
}

/// Two installations (two repositories) back up the same database under the same source name,
/// each with its own `options.slot`: each captures every change into its own repository, and
/// one's capture leaves the other's slot where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_installations_with_their_own_slots_capture_independently() {
    let url = crate::pg!().create_database().await.unwrap();
    let mut c = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE t (id bigint PRIMARY KEY, v text); \
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let config_a = write_named_config(dir_a.path(), "app", &url, &[("slot", "tv_install_a")]);
    let config_b = write_named_config(
        dir_b.path(),
        "app",
        &url,
        &[("slot", "tv_install_b"), ("publication", "tv_pub_b")],
    );
    for config in [&config_a, &config_b] {
        ok(&timevault(config, &["init"]));
        ok(&timevault(config, &["daemon", "--once"]));
    }
    let slots: Vec<String> = sqlx::query_scalar(
        "SELECT slot_name::text FROM pg_replication_slots WHERE database = current_database() \
         ORDER BY 1",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    assert_eq!(slots, ["tv_install_a", "tv_install_b"]);
    let publications: Vec<String> =
        sqlx::query_scalar("SELECT pubname::text FROM pg_publication ORDER BY 1")
            .fetch_all(&mut c)
            .await
            .unwrap();
    assert_eq!(publications, ["tv_install_a", "tv_pub_b"]);

    // Changes; only A captures them: B's slot must not move.
    sqlx::raw_sql(
        "INSERT INTO t SELECT g, 'w' || g FROM generate_series(101, 200) g; \
         UPDATE t SET v = v || '!' WHERE id % 7 = 0",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let b_before = confirmed(&mut c, "tv_install_b").await.unwrap();
    ok(&timevault(&config_a, &["daemon", "--once"]));
    assert_eq!(confirmed(&mut c, "tv_install_b").await.unwrap(), b_before);
    let lsn = |text: &str| timevault::source::postgres::Lsn::parse(text).unwrap();
    let a_after = confirmed(&mut c, "tv_install_a").await.unwrap();
    assert!(lsn(&a_after) > lsn(&b_before), "{a_after} vs {b_before}");
    let status_b = status_json(&config_b);
    let slot_b = &status_b["sources"][0]["slot"];
    assert_eq!(slot_b["slot"], "tv_install_b");
    assert!(
        slot_b["confirmed_flush_lag_bytes"].as_i64().unwrap() > 0,
        "B's slot still holds the changes A captured: {slot_b}"
    );
    let after_a = state(&url).await;

    // More changes; now only B captures (everything since its snapshot).
    sqlx::raw_sql("DELETE FROM t WHERE id > 150")
        .execute(&mut c)
        .await
        .unwrap();
    ok(&timevault(&config_b, &["daemon", "--once"]));
    let restore = |config: &Path, name: &str| {
        let target = crate::pg!().url(&unique_name(name).replace('-', "_"));
        ok(&timevault(
            config,
            &[
                "restore", "--source", "app", "--at", "latest", "--to", &target,
            ],
        ));
        target
    };
    let target_b = restore(&config_b, "slot_b");
    assert_eq!(
        state(&target_b).await,
        state(&url).await,
        "B has every change"
    );
    let target_a = restore(&config_a, "slot_a");
    assert_eq!(
        state(&target_a).await,
        after_a,
        "A has what it captured, untouched by B's capture"
    );
    // A catches up on its own slot.
    ok(&timevault(&config_a, &["daemon", "--once"]));
    let target_a = restore(&config_a, "slot_a2");
    assert_eq!(
        state(&target_a).await,
        state(&url).await,
        "A has every change"
    );
    for slot in ["tv_install_a", "tv_install_b"] {
        crate::common::drop_slot(&url, slot);
    }
    c.close().await.unwrap();
}

/// The segments of `source`'s newest chain (0 before the first snapshot).
async fn newest_chain_segments(config: &Path, source: &str) -> Option<usize> {
    let loaded = timevault::config::Config::load(config).unwrap();
    let repo = timevault::repo::Repository::open(&loaded).await.ok()?;
    let catalog = timevault::catalog::SourceCatalog::load(&repo, source)
        .await
        .ok()?;
    catalog.chains.last().map(|c| c.segments.len())
}

/// The window of an idle PostgreSQL database reaches the daemon's last capture pass (its
/// heartbeat's commit), not only the last stored segment, while idle passes store nothing: a
/// change made with `psql`, a few idle seconds, and `restore --at -1s` gives it. Once the daemon
/// has stopped, nothing vouches for the idle time and the same request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_database_is_restorable_to_a_second_ago_without_a_segment_per_pass() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::pg!().create_database().await.unwrap();
    let mut c = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("CREATE TABLE note (id bigint PRIMARY KEY, body text)")
        .execute(&mut c)
        .await
        .unwrap();
    let config = write_named_config(dir.path(), "idle", &url, &[]);
    ok(&timevault(&config, &["init"]));
    let daemon = quiet_daemon(&config).start();
    let deadline = Instant::now() + Duration::from_secs(60);
    while newest_chain_segments(&config, "idle").await.is_none() {
        assert!(Instant::now() < deadline, "no snapshot in 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = chrono::Utc::now();
    let psql = Command::new("psql")
        .arg(&url)
        .args(["-v", "ON_ERROR_STOP=1", "-c"])
        .arg("INSERT INTO note VALUES (1, 'written by psql')")
        .output()
        .expect("psql is installed by .ci/install-deps (postgresql-client)");
    assert!(psql.status.success(), "{psql:?}");
    let loaded = timevault::config::Config::load(&config).unwrap();
    let captured = common::wait_captured(
        &loaded,
        "idle",
        before,
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    assert!(captured.is_some(), "the change was not captured in 30 s");

    // Idle for 5 s at a 200 ms capture interval: about 25 passes, at most one heartbeat segment.
    let stored = newest_chain_segments(&config, "idle").await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_segments = newest_chain_segments(&config, "idle").await.unwrap() - stored;
    assert!(
        idle_segments <= 1,
        "{idle_segments} segments stored in 5 idle seconds"
    );
    let restore = |name: &str| {
        let target = crate::pg!().url(&unique_name(name).replace('-', "_"));
        let out = timevault(
            &config,
            &[
                "restore", "--source", "idle", "--at", "-1s", "--to", &target,
            ],
        );
        (out, target)
    };
    let (out, target) = restore("idle_now");
    ok(&out);
    let mut restored = PgConnection::connect(&target).await.unwrap();
    let body: String = sqlx::query_scalar("SELECT body FROM note WHERE id = 1")
        .fetch_one(&mut restored)
        .await
        .unwrap();
    assert_eq!(body, "written by psql");
    restored.close().await.unwrap();

    daemon.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (out, _) = restore("idle_after_stop");
    assert!(
        !out.status.success(),
        "restored past the stopped daemon's last capture"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("restorable"), "{err}");
    c.close().await.unwrap();
}
