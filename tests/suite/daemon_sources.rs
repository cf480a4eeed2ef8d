//! One daemon, several sources: each runs in a task of its own, so a PostgreSQL snapshot that
//! cannot finish (a `psql` session in another process holds an ACCESS EXCLUSIVE lock on a
//! table) does not stop the capture of a SQLite source beside it.

use crate::common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::daemon::Daemon;
use common::{ok, timevault, Env, KillOnDrop};
use sqlx::postgres::PgConnection;
use sqlx::Connection;

const LOCKER: &str = "timevault_test_locker";

/// Backends of this database waiting for a lock (the daemon's blocked snapshot).
async fn waiting_on_locks(c: &mut PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(c)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_snapshot_that_cannot_finish_does_not_stop_sqlite_capture() {
    let env = Env::new(41).await;
    let url = crate::pg!().create_database().await.unwrap();
    let mut c = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE contract (id bigint PRIMARY KEY, title text); \
         INSERT INTO contract SELECT g, 'contract ' || g FROM generate_series(1, 100) g",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let config = env
        .config_builder()
        .postgres("stalled", &url)
        .write(env.path());
    ok(&timevault(&config, &["init"]));

    // Another process holds the table until the test lets it go: the snapshot's copy of it waits.
    let mut locker = KillOnDrop(
        Command::new("psql")
        .arg(&url)
        .args(["-v", "ON_ERROR_STOP=1", "-c"])
        .arg("BEGIN; LOCK TABLE contract IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(300); COMMIT;")
        .env("PGAPPNAME", LOCKER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("psql is installed by .ci/install-deps (postgresql-client)"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lock_held(&mut c).await {
        assert!(Instant::now() < deadline, "psql did not take the lock");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let daemon = Daemon::start(&config);
    let deadline = Instant::now() + Duration::from_secs(60);
    while waiting_on_locks(&mut c).await == 0 {
        assert!(
            Instant::now() < deadline,
            "the PostgreSQL snapshot never waited on the lock; daemon log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // While that snapshot waits, a change to the SQLite source made by the `sqlite3` shell.
    let before = Utc::now();
    let shell = Command::new("sqlite3")
        .arg(&env.db)
        .arg("CREATE TABLE note (id INTEGER PRIMARY KEY, body TEXT); INSERT INTO note VALUES (1, 'during the snapshot');")
        .output()
        .expect("sqlite3 runs (apt-get install -y sqlite3, or .ci/install-deps)");
    assert!(shell.status.success(), "{shell:?}");
    let loaded = timevault::config::Config::load(&config).unwrap();
    let captured = common::wait_captured(
        &loaded,
        "app",
        before,
        Instant::now() + Duration::from_secs(20),
    )
    .await;
    assert!(
        captured.is_some(),
        "the SQLite change was not captured in 20 s while the PostgreSQL snapshot waited; daemon log:\n{}",
        daemon.log()
    );
    assert!(
        waiting_on_locks(&mut c).await > 0,
        "the PostgreSQL snapshot was no longer waiting: the test proved nothing"
    );

    // Let the snapshot go: it completes, and the daemon stops cleanly.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(LOCKER)
    .execute(&mut c)
    .await
    .unwrap();
    assert!(
        !locker.wait().unwrap().success(),
        "the locking session was terminated"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let repo = timevault::repo::Repository::open(&loaded).await.unwrap();
        let catalog = timevault::catalog::SourceCatalog::load(&repo, "stalled")
            .await
            .unwrap();
        if !catalog.chains.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the PostgreSQL snapshot did not finish after the lock was released"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    daemon.stop();
    c.close().await.unwrap();
}

async fn lock_held(c: &mut PgConnection) -> bool {
    sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_locks l JOIN pg_class r ON r.oid = l.relation \
         WHERE r.relname = 'contract' AND l.mode = 'AccessExclusiveLock' AND l.granted",
    )
    .fetch_one(c)
    .await
    .unwrap()
        > 0
}
