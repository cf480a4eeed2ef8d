//! Capture over the streaming replication protocol, as an operator's server meets it: writers
//! are `psql` processes, the replication connection is killed with `pg_terminate_backend`
//! while a large transaction streams, the server's `wal_sender_timeout` passes on an idle
//! stream, a `pg_recvlogical` process holds the slot, and a server runs no walsender (capture
//! then polls over SQL). Every restore is compared row for row with the
//! source.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use timevault::config::CaptureChoice;
use timevault::repo::Repository;
use timevault::restore::postgres::restore_postgres_detailed;
use timevault::restore::RestoreOptions;
use timevault::source::postgres::{CaptureMethod, PostgresSource};
use timevault::time::At;
use timevault_fixtures::harness::{free_port, unique_name};

use crate::common::cluster::Cluster;
use crate::common::config::ConfigBuilder;
use crate::common::{pg_state, psql, KillOnDrop};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    async fn repo(&self) -> Repository {
        let config = ConfigBuilder::two_sites().parse(self.dir.path());
        Repository::init(&config).await.unwrap();
        Repository::open(&config).await.unwrap()
    }
}

/// A database with an ordinary application table and a trigger-maintained total.
async fn app_database() -> String {
    let url = crate::pg!().create_database().await.unwrap();
    psql(
        &url,
        "CREATE TABLE orders (id bigserial PRIMARY KEY, customer int NOT NULL, note text); \
         CREATE TABLE totals (customer int PRIMARY KEY, n bigint NOT NULL); \
         CREATE FUNCTION count_order() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           INSERT INTO totals VALUES (NEW.customer, 1) \
           ON CONFLICT (customer) DO UPDATE SET n = totals.n + 1; RETURN NEW; END $$; \
         CREATE TRIGGER orders_count AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION count_order(); \
         INSERT INTO orders (customer, note) SELECT g % 7, 'seed ' || g FROM generate_series(1, 100) g",
    );
    url
}

/// A cluster of this test's own with `settings` (server-wide ones), and the URL of its
/// database `app` with the `orders` table.
fn own_cluster(settings: &str) -> (Cluster, String) {
    let cluster = Cluster::create(free_port().unwrap());
    cluster.configure(settings);
    cluster.start();
    psql(&cluster.url("postgres"), "CREATE DATABASE app");
    let url = cluster.url("app");
    psql(
        &url,
        "CREATE TABLE orders (id bigserial PRIMARY KEY, customer int NOT NULL, note text)",
    );
    (cluster, url)
}

fn new_target() -> String {
    crate::pg!().url(&unique_name("restored").replace('-', "_"))
}

/// Restore `source` at `latest` into a new database and compare it with the source.
async fn assert_restores_exactly(repo: &Repository, source: &str, url: &str, target: &str) {
    restore_postgres_detailed(
        repo,
        &RestoreOptions {
            source: source.into(),
            at: At::Latest,
            target: target.to_string(),
            force: false,
            jobs: None,
        },
    )
    .await
    .unwrap();
    let (want, got): (BTreeMap<_, _>, BTreeMap<_, _>) =
        (pg_state(url).await, pg_state(target).await);
    assert_eq!(got, want, "the restore equals the source row for row");
}

/// The server process streaming `slot`, if one holds it.
fn walsender(url: &str, slot: &str) -> Option<String> {
    let pid = psql(
        url,
        &format!(
            "SELECT s.active_pid FROM pg_replication_slots s \
             JOIN pg_stat_activity a ON a.pid = s.active_pid \
             WHERE s.slot_name = '{slot}' AND a.backend_type = 'walsender'"
        ),
    );
    (!pid.is_empty()).then_some(pid)
}

fn confirmed_flush(url: &str, slot: &str) -> String {
    psql(
        url,
        &format!("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_streams_and_confirms_only_what_is_stored() {
    let env = Env::new();
    let repo = env.repo().await;
    let url = app_database().await;
    let mut source = PostgresSource::open("streams", &url, &repo).await.unwrap();
    source.snapshot(&repo).await.unwrap();
    let slot = source.slot().to_string();
    psql(
        &url,
        "INSERT INTO orders (customer, note) VALUES (1, 'first')",
    );
    let stats = source.capture(&repo).await.unwrap();
    assert_eq!(stats.transactions, 1, "{stats:?}");
    let report = source.capture_method().expect("a pass ran");
    assert_eq!(report.method, CaptureMethod::Streaming, "{report:?}");
    assert!(
        walsender(&url, &slot).is_some(),
        "a walsender holds the slot"
    );
    let stored = stats.lsn.unwrap().to_string();
    assert_eq!(
        confirmed_flush(&url, &slot),
        stored,
        "confirmed = stored end"
    );

    // A repository that cannot take the segment: the pass fails and confirms nothing.
    psql(
        &url,
        "INSERT INTO orders (customer, note) VALUES (2, 'second')",
    );
    let north = env.dir.path().join("replicas").join("eu-north");
    let aside = north.with_extension("aside");
    std::fs::rename(&north, &aside).unwrap();
    std::fs::write(&north, b"not a directory").unwrap();
    source.capture(&repo).await.unwrap_err();
    assert_eq!(confirmed_flush(&url, &slot), stored, "nothing confirmed");
    std::fs::remove_file(&north).unwrap();
    std::fs::rename(&aside, &north).unwrap();

    // The next pass reconnects and sends the unconfirmed transaction once.
    let stats = source.capture(&repo).await.unwrap();
    assert_eq!(
        stats.transactions, 1,
        "nothing lost, nothing twice: {stats:?}"
    );
    assert_restores_exactly(&repo, "streams", &url, &new_target()).await;
    source.close(&repo).await.unwrap();
    assert!(walsender(&url, &slot).is_none(), "closed with the source");
}

/// `pg_terminate_backend` on the walsender while a 60,000-row transaction streams: the pass
/// fails, the next one reconnects, and every row is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_connection_killed_mid_transaction_loses_and_duplicates_nothing() {
    let env = Env::new();
    let repo = env.repo().await;
    let url = app_database().await;
    let mut source = PostgresSource::open("killed", &url, &repo).await.unwrap();
    source.snapshot(&repo).await.unwrap();
    let slot = source.slot().to_string();
    source.capture(&repo).await.unwrap();
    let before = walsender(&url, &slot).expect("streaming");
    psql(
        &url,
        "INSERT INTO orders (customer, note) SELECT g % 13, repeat('x', 200) FROM generate_series(1, 60000) g",
    );
    let killer = {
        let (url, slot) = (url.clone(), slot.clone());
        std::thread::spawn(move || {
            // Once the pass has read part of the transaction (the walsender has sent WAL past
            // the slot's confirmed position), terminate it.
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                let sent = psql(
                    &url,
                    &format!(
                        "SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s \
                         ON s.active_pid = r.pid WHERE s.slot_name = '{slot}' \
                         AND r.sent_lsn > s.confirmed_flush_lsn + 1000000"
                    ),
                );
                if sent == "1" {
                    psql(
                        &url,
                        &format!(
                            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                             WHERE slot_name = '{slot}'"
                        ),
                    );
                    return true;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            false
        })
    };
    let first = source.capture(&repo).await;
    assert!(
        killer.join().unwrap(),
        "the walsender was terminated mid-transaction"
    );
    let err = first.expect_err("the pass reading the transaction fails with its connection");
    assert!(err.to_string().contains("replication"), "{err}");
    // Passes until one stores nothing new: the transaction comes once, whole.
    // (A pass may still find the terminated walsender holding the slot: it fails and the
    // next one goes on.)
    let mut transactions = Vec::new();
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(attempts < 20, "the capture recovered: {transactions:?}");
        match source.capture(&repo).await {
            Ok(stats) if stats.transactions == 0 => break,
            Ok(stats) => transactions.push(stats.transactions),
            Err(e) => {
                eprintln!("pass failed, retried: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert_eq!(
        transactions.iter().sum::<u64>(),
        1,
        "stored once: {transactions:?}"
    );
    let after = walsender(&url, &slot).expect("streaming again");
    assert_ne!(before, after, "a new replication connection");
    assert_restores_exactly(&repo, "killed", &url, &new_target()).await;
    source.close(&repo).await.unwrap();
}

/// With `wal_sender_timeout = 1s` and no pass for 4 s, the walsender is still the same: the
/// keeper's status updates keep the idle connection. (A cluster of its own: the setting is
/// server-wide.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_outlives_wal_sender_timeout() {
    let (cluster, url) = own_cluster("wal_sender_timeout = '1s'\n");
    let env = Env::new();
    let repo = env.repo().await;
    let mut source = PostgresSource::open("idle", &url, &repo).await.unwrap();
    source.snapshot(&repo).await.unwrap();
    let slot = source.slot().to_string();
    source.capture(&repo).await.unwrap();
    let pid = walsender(&url, &slot).expect("streaming");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let still = walsender(&url, &slot);
    assert_eq!(
        still.as_deref(),
        Some(pid.as_str()),
        "the same walsender after 4 timeouts"
    );
    psql(
        &url,
        "INSERT INTO orders (customer, note) VALUES (3, 'after the idle time')",
    );
    let stats = source.capture(&repo).await.unwrap();
    assert_eq!(stats.transactions, 1);
    assert_restores_exactly(&repo, "idle", &url, &cluster.url("restored")).await;
    source.close(&repo).await.unwrap();
}

/// `pg_recvlogical` (another consumer) holds the slot: the pass fails and says who holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_held_by_another_consumer_is_named() {
    let env = Env::new();
    let repo = env.repo().await;
    let url = app_database().await;
    let mut source = PostgresSource::open("held", &url, &repo).await.unwrap();
    source.snapshot(&repo).await.unwrap();
    let slot = source.slot().to_string();
    let out = env.dir.path().join("recvlogical.out");
    let holder = KillOnDrop(
        Command::new("pg_recvlogical")
            .args(["-d", &url, "--slot", &slot, "--start", "--no-loop"])
            .args(["-o", "proto_version=1", "-o"])
            .arg(format!("publication_names={slot}"))
            .arg("-f")
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pg_recvlogical is installed with PostgreSQL 15"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while walsender(&url, &slot).is_none() {
        assert!(Instant::now() < deadline, "pg_recvlogical took the slot");
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = source.capture(&repo).await.unwrap_err();
    let text = format!("{err} {}", err.hint().unwrap_or(""));
    assert!(text.contains("in use by another consumer"), "{text}");
    assert!(text.contains("pg_recvlogical"), "{text}");
    drop(holder);
}

/// A server that runs no walsender (`max_wal_senders = 0`, as some managed services and
/// poolers leave it): `auto` polls over SQL and says why; `streaming` refuses to capture and
/// says what to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_replication_connection_falls_back_to_polling() {
    let (cluster, url) = own_cluster("max_wal_senders = 0\n");
    let env = Env::new();
    let repo = env.repo().await;
    let mut source = PostgresSource::open("polls", &url, &repo).await.unwrap();
    source.set_capture_method(CaptureChoice::Streaming);
    source.snapshot(&repo).await.unwrap();
    psql(
        &url,
        "INSERT INTO orders (customer, note) VALUES (4, 'polled')",
    );
    let err = source.capture(&repo).await.unwrap_err();
    let text = format!("{err} {}", err.hint().unwrap_or(""));
    assert!(text.contains("refuses a replication connection"), "{text}");
    assert!(text.contains("max_wal_senders"), "{text}");
    assert!(text.contains("capture_method = \"polling\""), "{text}");

    source.set_capture_method(CaptureChoice::Auto);
    let stats = source.capture(&repo).await.unwrap();
    assert_eq!(stats.transactions, 1, "{stats:?}");
    let report = source.capture_method().unwrap();
    assert_eq!(report.method, CaptureMethod::Polling);
    assert!(
        report
            .polling_because
            .as_deref()
            .unwrap_or("")
            .contains("max_wal_senders"),
        "{report:?}"
    );
    psql(
        &url,
        "INSERT INTO orders (customer, note) VALUES (5, 'polled too')",
    );
    assert_eq!(source.capture(&repo).await.unwrap().transactions, 1);
    assert_restores_exactly(&repo, "polls", &url, &cluster.url("restored")).await;
    source.close(&repo).await.unwrap();
}

/// The CLI as an operator meets it: `status` names the capture method the running daemon
/// uses (`streaming` here; `polling` with `capture_method = "polling"`), and `--json` has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_the_capture_method_of_the_running_daemon() {
    use crate::common::daemon::Daemon;
    use crate::common::{ok, timevault};
    for method in ["streaming", "polling"] {
        let dir = tempfile::tempdir().unwrap();
        let url = app_database().await;
        let port = free_port().unwrap();
        let config = ConfigBuilder::two_sites()
            .source_with(method, "postgres", &url, [("capture_method", method)])
            .listen(port)
            .write(dir.path());
        ok(&timevault(&config, &["init"]));
        let daemon = Daemon::start(&config);
        // Published when it first becomes known, not with the next lease renewal (20 s).
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            psql(
                &url,
                "INSERT INTO orders (customer, note) VALUES (6, 'status')",
            );
            let status: serde_json::Value =
                serde_json::from_str(&ok(&timevault(&config, &["status", "--json"]))).unwrap();
            if status["sources"][0]["capture_method"].is_string() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "no capture method reported: {status}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert_eq!(status["sources"][0]["capture_method"], method, "{status}");
        let text = ok(&timevault(&config, &["status"]));
        assert!(text.contains(&format!("capture: {method}")), "{text}");
        let want = format!(
            "timevault_capture_streaming{{source=\"{method}\",kind=\"postgres\"}} {}",
            u8::from(method == "streaming")
        );
        daemon.metrics_until(
            port,
            (Duration::from_secs(30), Duration::from_millis(200)),
            &want,
            |m| m.contains(&want),
        );
        daemon.stop();
        crate::common::drop_slot(&url, &format!("timevault_{method}"));
    }
}
