//! Continuity of a PostgreSQL source under a running daemon (`timevault daemon`, a capture
//! every 500 ms), on real PostgreSQL 15 clusters, with psql processes as the writers.
//!
//! When the replication slot is dropped or invalidated, the publication dropped, the database
//! created again or the server replaced, a new chain whose snapshot reason is continuity-lost
//! starts within about two capture intervals (plus slack for a loaded machine) of the moment
//! it could be noticed, the daemon logs why, and rows written afterwards restore exactly. A
//! lost connection or a restart of the same server only reconnects: the chain goes on.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::cluster::Cluster;
use common::config::ConfigBuilder;
use common::daemon::Daemon;
use common::psql;
use common::{ok, timevault};
use timevault::catalog::{SnapshotManifest, SnapshotReason, SourceCatalog};
use timevault::config::Config;
use timevault::repo::Repository;
use timevault_fixtures::harness::postgres::PostgresServer;
use timevault_fixtures::harness::{free_port, unique_name};

/// The daemon's capture interval in these tests.
const INTERVAL: Duration = Duration::from_millis(500);
/// Scheduling slack for a loaded 2-core machine (other tests, their daemons and servers).
const SLACK: Duration = Duration::from_secs(3);
/// How long a test waits for something that should take about a second.
const PATIENCE: Duration = Duration::from_secs(30);

const SCHEMA: &str = "\
    CREATE TABLE accounts (id bigint PRIMARY KEY, tenant_id int NOT NULL, name text NOT NULL, \
        balance numeric(12,2) NOT NULL, updated_at timestamptz NOT NULL DEFAULT now()); \
    CREATE TABLE events (id bigserial PRIMARY KEY, account_id bigint NOT NULL REFERENCES accounts, \
        kind text NOT NULL, payload jsonb); \
    INSERT INTO accounts SELECT g, g % 5, 'account ' || g, 100, now() FROM generate_series(1, 200) g; \
    INSERT INTO events (account_id, kind, payload) \
        SELECT g % 200 + 1, 'seed', jsonb_build_object('n', g) FROM generate_series(1, 1000) g";

/// Run a SQL file with psql.
fn psql_file(url: &str, file: &Path) {
    let out = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f"])
        .arg(file)
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One writer transaction: inserts, updates and a delete, different for each `step`.
fn write(url: &str, step: u32) {
    psql(
        url,
        &format!(
            "BEGIN; \
             INSERT INTO events (account_id, kind, payload) SELECT g % 200 + 1, 'step {step}', \
                 jsonb_build_object('n', g, 'step', {step}) FROM generate_series(1, 50) g; \
             UPDATE accounts SET balance = balance + 1.25, updated_at = now() WHERE id % 3 = {}; \
             DELETE FROM events WHERE kind = 'seed' AND id % 97 = {}; \
             COMMIT",
            step % 3,
            step % 97
        ),
    );
}

/// The URL of a new database name on the server of `url`.
fn sibling(url: &str, prefix: &str) -> String {
    let (server, _) = url.rsplit_once('/').unwrap();
    format!("{server}/{}", unique_name(prefix).replace('-', "_"))
}

/// The database name in `url`.
fn database(url: &str) -> &str {
    url.rsplit_once('/').unwrap().1
}

async fn state(url: &str) -> BTreeMap<String, String> {
    common::pg_state(url).await
}

/// A chain as the repository has it.
#[derive(Debug, Clone)]
struct ChainView {
    id: String,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    reason: SnapshotReason,
}

/// A source under a running daemon, with its repository in a temporary directory.
struct Scenario {
    source: String,
    config: PathBuf,
    port: u16,
    daemon: Daemon,
    step: u32,
    _dir: tempfile::TempDir,
}

impl Scenario {
    /// Schema and rows in `url`, `init`, the daemon; returns once the first chain has
    /// captured a psql write.
    async fn start(source: &str, url: &str) -> Scenario {
        psql(url, SCHEMA);
        let dir = tempfile::tempdir().unwrap();
        let port = free_port().unwrap();
        let config = ConfigBuilder::one_replica("replica-a")
            .replica("b", "r", "replica-b")
            .lease_ttl("30s")
            .postgres(source, url)
            .schedule("capture_interval", &format!("{}ms", INTERVAL.as_millis()))
            .listen(port)
            .write(dir.path());
        ok(&timevault(&config, &["init"]));
        let daemon = Daemon::command(&config)
            .log_level("warn")
            .env("NO_COLOR", "1")
            .start();
        let mut scenario = Scenario {
            source: source.to_string(),
            config,
            port,
            daemon,
            step: 0,
            _dir: dir,
        };
        let first = scenario
            .wait_for_chain(|c| c.reason == SnapshotReason::Initial)
            .await;
        scenario.write_and_wait(url, &first.id).await;
        scenario
    }

    async fn chains(&self) -> Vec<ChainView> {
        let repo = Repository::open(&Config::load(&self.config).unwrap())
            .await
            .unwrap();
        let catalog = SourceCatalog::load(&repo, &self.source).await.unwrap();
        let mut out = Vec::new();
        for chain in &catalog.chains {
            let manifest = SnapshotManifest::read(&repo, &chain.snapshot.key)
                .await
                .unwrap();
            out.push(ChainView {
                id: chain.id().to_string(),
                start: chain.start(),
                end: chain.end(),
                reason: manifest.reason,
            });
        }
        out
    }

    /// The first chain that satisfies `found`, waiting for it.
    async fn wait_for_chain(&self, found: impl Fn(&ChainView) -> bool) -> ChainView {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let chains = self.chains().await;
            if let Some(chain) = chains.iter().find(|c| found(c)) {
                return chain.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no such chain after {PATIENCE:?}: {chains:?}\ndaemon log:\n{}",
                self.daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Write with psql, then wait until chain `chain` (still the newest) holds the write.
    async fn write_and_wait(&mut self, url: &str, chain: &str) {
        self.step += 1;
        write(url, self.step);
        let written = Utc::now();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let chains = self.chains().await;
            let newest = chains.last().expect("a chain");
            if newest.end >= written {
                assert_eq!(
                    newest.id, chain,
                    "captured into the expected chain: {chains:?}"
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "write {} (at {written}) not captured after {PATIENCE:?}: {chains:?}\ndaemon log:\n{}",
                self.step,
                self.daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A continuity-lost chain appears soon after `noticeable` (the first moment the daemon
    /// could see the loss), for a reason that contains `reason`, and the daemon logged it.
    async fn expect_new_chain(&self, noticeable: DateTime<Utc>, reason: &str) -> ChainView {
        let chain = self
            .wait_for_chain(|c| matches!(c.reason, SnapshotReason::ContinuityLost(_)))
            .await;
        let SnapshotReason::ContinuityLost(why) = &chain.reason else {
            unreachable!()
        };
        assert!(why.contains(reason), "reason {why:?} names {reason:?}");
        let after = (chain.start - noticeable).to_std().unwrap_or_else(|_| {
            panic!(
                "the new chain starts at {} before the loss at {noticeable}",
                chain.start
            )
        });
        assert!(
            after <= 2 * INTERVAL + SLACK,
            "the new chain started {after:?} after the loss (two intervals are {:?}, slack {SLACK:?})",
            2 * INTERVAL
        );
        let log = self.daemon.log();
        assert!(
            log.contains("continuity lost; a new chain starts now") && log.contains(why.as_str()),
            "the daemon logs the loss and its reason {why:?}:\n{log}"
        );
        let chains = self.chains().await;
        assert_eq!(
            chains.len(),
            2,
            "the first chain and the new one: {chains:?}"
        );
        // Counted in /metrics, and /healthz fails (until max_capture_lag after the new chain).
        let (_, metrics) = common::http_get(self.port, "/metrics").expect("metrics answer");
        let sample = format!(
            "timevault_continuity_lost_total{{source=\"{}\"}}",
            self.source
        );
        assert_eq!(
            common::metric_sample(&metrics, &sample),
            Some(1.0),
            "{metrics}"
        );
        let (status, body) = common::http_get(self.port, "/healthz").expect("healthz answers");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("continuity lost"), "{body}");
        eprintln!("{}: new chain {after:?} after the loss: {why}", self.source);
        chain
    }

    /// Rows written with psql into the new chain restore exactly (`--at latest`).
    async fn expect_restorable(&mut self, url: &str, chain: &ChainView) {
        self.write_and_wait(url, &chain.id).await;
        let target = sibling(url, "restored");
        let out = ok(&timevault(
            &self.config,
            &[
                "restore",
                "--source",
                &self.source,
                "--at",
                "latest",
                "--to",
                &target,
            ],
        ));
        assert!(out.contains("restored"), "{out}");
        assert_eq!(
            state(&target).await,
            state(url).await,
            "restore equals the source"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_starts_a_new_chain_at_once() {
    let url = crate::pg!().create_database().await.unwrap();
    let mut s = Scenario::start("slot_dropped", &url).await;
    crate::common::drop_slot(&url, "timevault_slot_dropped");
    let dropped = Utc::now();
    // Writes go on meanwhile; the new snapshot has them.
    write(&url, 1000);
    let chain = s
        .expect_new_chain(dropped, "replication slot timevault_slot_dropped is gone")
        .await;
    s.expect_restorable(&url, &chain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_publication_starts_a_new_chain_at_once() {
    let url = crate::pg!().create_database().await.unwrap();
    let mut s = Scenario::start("pub_dropped", &url).await;
    psql(&url, "DROP PUBLICATION timevault_pub_dropped");
    let dropped = Utc::now();
    write(&url, 1000);
    let chain = s
        .expect_new_chain(dropped, "publication timevault_pub_dropped is gone")
        .await;
    // The old slot cannot decode past the time without a publication: it was made anew.
    let publications = psql(
        &url,
        "SELECT count(*) FROM pg_publication WHERE pubname = 'timevault_pub_dropped'",
    );
    assert_eq!(publications, "1");
    s.expect_restorable(&url, &chain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_starts_a_new_chain_at_once() {
    // A cluster of its own: max_slot_wal_keep_size is server-wide.
    let server = PostgresServer::start().unwrap();
    let url = server.create_database().await.unwrap();
    let mut s = Scenario::start("invalidated", &url).await;
    // The daemon pauses; WAL beyond max_slot_wal_keep_size is written and removed at a
    // checkpoint, and the server invalidates the slot.
    let admin = server.admin_url();
    psql(&admin, "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'");
    psql(&admin, "SELECT pg_reload_conf()");
    s.daemon.signal("-STOP");
    let deadline = Instant::now() + PATIENCE;
    loop {
        psql(
            &url,
            "INSERT INTO events (account_id, kind, payload) SELECT g % 200 + 1, 'filler', \
             jsonb_build_object('pad', repeat(md5(g::text), 30)) FROM generate_series(1, 2000) g",
        );
        psql(&url, "SELECT pg_switch_wal()");
        psql(&url, "CHECKPOINT");
        let status = psql(
            &url,
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'timevault_invalidated'",
        );
        if status == "lost" {
            break;
        }
        assert!(Instant::now() < deadline, "slot not invalidated: {status}");
    }
    psql(&admin, "ALTER SYSTEM RESET max_slot_wal_keep_size");
    psql(&admin, "SELECT pg_reload_conf()");
    s.daemon.signal("-CONT");
    let resumed = Utc::now();
    let chain = s
        .expect_new_chain(
            resumed,
            "replication slot timevault_invalidated was invalidated",
        )
        .await;
    let status = psql(
        &url,
        "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'timevault_invalidated'",
    );
    assert_ne!(
        status, "lost",
        "the invalidated slot was dropped and created again"
    );
    s.expect_restorable(&url, &chain).await;
    drop(s);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_created_again_starts_a_new_chain_at_once() {
    let url = crate::pg!().create_database().await.unwrap();
    let mut s = Scenario::start("recreated", &url).await;
    // The same database, restored by psql under another name; then it takes the place of
    // the original while the daemon is paused (so the reason cannot be the slot alone).
    let twin = sibling(&url, "twin");
    let dump = s.config.with_file_name("dump.sql");
    let out = Command::new("pg_dump")
        .args(["-d", &url, "-f"])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let admin = crate::pg!().admin_url();
    psql(&admin, &format!("CREATE DATABASE \"{}\"", database(&twin)));
    psql_file(&twin, &dump);
    s.daemon.signal("-STOP");
    crate::common::drop_slot(&admin, "timevault_recreated");
    psql(
        &admin,
        &format!("DROP DATABASE \"{}\" WITH (FORCE)", database(&url)),
    );
    psql(
        &admin,
        &format!(
            "ALTER DATABASE \"{}\" RENAME TO \"{}\"",
            database(&twin),
            database(&url)
        ),
    );
    s.daemon.signal("-CONT");
    let resumed = Utc::now();
    let chain = s
        .expect_new_chain(resumed, "the database was created again")
        .await;
    s.expect_restorable(&url, &chain).await;
}

/// The daemon's connections are terminated: it reconnects, the server and database are the
/// same, and the chain goes on (no new chain, nothing lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_reconnects_and_the_chain_goes_on() {
    let url = crate::pg!().create_database().await.unwrap();
    let mut s = Scenario::start("reconnects", &url).await;
    let first = s.chains().await.remove(0);
    let terminated = psql(
        &crate::pg!().admin_url(),
        &format!(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{}' AND application_name = 'timevault') t",
            database(&url)
        ),
    );
    assert_ne!(terminated, "0", "the daemon's connection was found");
    for _ in 0..3 {
        s.write_and_wait(&url, &first.id).await;
    }
    let chains = s.chains().await;
    assert_eq!(chains.len(), 1, "one unbroken chain: {chains:?}");
    let log = s.daemon.log();
    assert!(log.contains("reconnecting"), "{log}");
    assert!(!log.contains("continuity lost"), "{log}");
    s.expect_restorable(&url, &first).await;
}

/// The server restarts (the chain goes on), then a new cluster replaces it on the same port
/// with the same database, schema and rows (restored with psql): a new chain starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_server_starts_a_new_chain_at_once() {
    let port = free_port().unwrap();
    let old = Cluster::create(port);
    old.start();
    psql(&old.url("postgres"), "CREATE DATABASE app");
    let url = old.url("app");
    let mut s = Scenario::start("replaced", &url).await;
    let first = s.chains().await.remove(0);

    // 1. A restart of the same server: the daemon reconnects and the chain goes on.
    old.stop();
    old.start();
    s.write_and_wait(&url, &first.id).await;
    assert_eq!(s.chains().await.len(), 1, "a restart keeps the chain");
    assert!(s.daemon.log().contains("reconnecting"));

    // 2. A new cluster on the same port; the database appears whole (renamed once loaded).
    let dump = s.config.with_file_name("app.sql");
    let out = Command::new("pg_dump")
        .args(["-d", &url, "-f"])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    old.stop();
    let new = Cluster::create(port);
    new.start();
    psql(&new.url("postgres"), "CREATE DATABASE app_load");
    psql_file(&new.url("app_load"), &dump);
    psql(
        &new.url("postgres"),
        "ALTER DATABASE app_load RENAME TO app",
    );
    let replaced = Utc::now();
    assert_eq!(new.url("app"), url);
    let chain = s
        .expect_new_chain(replaced, "the server was replaced")
        .await;
    s.expect_restorable(&url, &chain).await;
    drop(s);
    drop(new);
    drop(old);
}

/// Killed between a rotation's snapshot and its first capture (found by the torture run, one
/// run in six): the restarted source must still end the previous chain with that capture, or a
/// sliver between the chains is not restorable and nothing says why. Driven in-process so the
/// moment is exact: dropping the source without a capture is the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_right_after_a_rotation_keeps_the_window_whole() {
    use timevault::config::SourceConfig;
    use timevault::source::postgres::PostgresSource;
    let url = crate::pg!().create_database().await.unwrap();
    psql(&url, SCHEMA);
    let dir = tempfile::tempdir().unwrap();
    let repo = common::local_repo(dir.path()).await;
    let config = SourceConfig::postgres("rot", &url, Default::default());
    let mut source = PostgresSource::open_configured(&config, None, &repo)
        .await
        .unwrap();
    source.snapshot(&repo).await.unwrap();
    write(&url, 1);
    source.capture(&repo).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    write(&url, 2);
    source.snapshot(&repo).await.unwrap(); // rotation; then "killed" before any capture
    drop(source);
    write(&url, 3);
    let mut source = PostgresSource::open_configured(&config, None, &repo)
        .await
        .unwrap();
    source.capture(&repo).await.unwrap();
    let catalog = SourceCatalog::load(&repo, "rot").await.unwrap();
    assert_eq!(catalog.chains.len(), 2);
    assert_eq!(
        catalog.windows().len(),
        1,
        "the chains touch: {:?}",
        catalog.windows()
    );
    assert!(catalog.chains[0].end() >= catalog.chains[1].start());
    assert_eq!(catalog.chains[0].first_gap(), None);
}
