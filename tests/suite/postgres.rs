//! The PostgreSQL source end to end on a real PostgreSQL 15 cluster (wal_level=logical):
//! snapshot, pgoutput capture, restore to every reference point, refusals, preflight, and the
//! rule that the slot only moves after the segment is durable.

use crate::common::config::{ConfigBuilder, Quorum};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};
use timevault::catalog::SourceCatalog;
use timevault::config::CaptureChoice;
use timevault::repo::{Repository, RetryPolicy};
use timevault::restore::postgres::{restore_postgres_detailed, PostgresRestore};
use timevault::restore::RestoreOptions;
use timevault::source::postgres::{preflight, CaptureMethod, PostgresSource};
use timevault::time::At;
use timevault::ErrorKind;
use timevault_fixtures::harness::unique_name;
use timevault_fixtures::{generate_postgres, table_checksums, Database, GenerateOptions, Workload};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn replica_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("replicas").join(name)
    }

    async fn repo(&self) -> Repository {
        let config = ConfigBuilder::two_sites()
            .write_quorum(Quorum::All)
            .lease_ttl("5s")
            .parse(self.dir.path());
        Repository::init(&config).await.unwrap();
        let retry = RetryPolicy {
            attempts: 2,
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
        };
        Repository::open_with(&config, None, retry).await.unwrap()
    }
}

/// A URL for a database that does not exist yet (restore creates it).
fn new_target() -> String {
    crate::pg!().url(&unique_name("restored").replace('-', "_"))
}

async fn checksums(url: &str) -> BTreeMap<String, String> {
    let mut conn = Database::Postgres(url.to_string()).connect().await.unwrap();
    let sums = table_checksums(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    sums
}

async fn pg(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap()
}

async fn restore(
    repo: &Repository,
    source: &str,
    at: At,
    target: &str,
    force: bool,
) -> timevault::Result<PostgresRestore> {
    restore_postgres_detailed(
        repo,
        &RestoreOptions {
            source: source.into(),
            at,
            target: target.into(),
            force,
            jobs: None,
        },
    )
    .await
}

async fn confirmed_flush(conn: &mut PgConnection, slot: &str) -> String {
    sqlx::query_scalar(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_one(conn)
    .await
    .unwrap()
}

/// A restorable instant and the data the source held then.
struct Point {
    label: String,
    at: DateTime<Utc>,
    /// Wall clock just before the next change began (set once it is known).
    next_start: Option<DateTime<Utc>>,
    tables: BTreeMap<String, String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reference_point_restores_exactly() {
    reference_points_restore_exactly("pitr", CaptureChoice::Auto).await;
}

/// The same over SQL polling, the fallback for servers without a free walsender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reference_point_restores_exactly_when_polling() {
    reference_points_restore_exactly("pitr_polling", CaptureChoice::Polling).await;
}

/// Capture every step of a workload (bulk loads, updates, deletes, a TRUNCATE) with
/// `method`; every reference point, and instants between them, restore exactly.
async fn reference_points_restore_exactly(name: &str, method: CaptureChoice) {
    let started = Instant::now();
    let env = Env::new();
    let repo = env.repo().await;
    let url = crate::pg!().create_database().await.unwrap();
    generate_postgres(&url, &GenerateOptions { seed: 11, scale: 1 })
        .await
        .unwrap();
    let mut source = PostgresSource::open(name, &url, &repo).await.unwrap();
    source.set_capture_method(method);
    let snap = source.snapshot(&repo).await.unwrap();
    assert!(snap.rows > 0);
    let mut points = vec![Point {
        label: "snapshot".into(),
        at: snap.taken_at,
        next_start: None,
        tables: checksums(&url).await,
    }];
    let mut app = Database::Postgres(url.clone()).connect().await.unwrap();
    let mut workload = Workload::new(11, 1).with_bulk_rows(50_000);
    for step in 0..8 {
        let before = Utc::now();
        points.last_mut().unwrap().next_start = Some(before);
        let (label, tables) = if step < 7 {
            let point = workload.step(&mut app, None).await.unwrap();
            (format!("step {step} {:?}", point.kind), point.tables)
        } else {
            // A TRUNCATE (not produced by the workload) in a transaction with an insert.
            let mut c = pg(&url).await;
            sqlx::raw_sql(
                "BEGIN; TRUNCATE tenant_settings; \
                 INSERT INTO tenant_settings (tenant_id, key, value, updated_at) \
                 SELECT tenant_id, 'after_truncate', '{\"x\": 1}', now() FROM tenants LIMIT 3; \
                 COMMIT",
            )
            .execute(&mut c)
            .await
            .unwrap();
            c.close().await.unwrap();
            ("truncate".to_string(), checksums(&url).await)
        };
        let stats = source.capture(&repo).await.unwrap();
        assert!(!stats.segments.is_empty(), "{label}: a heartbeat at least");
        let catalog = SourceCatalog::load(&repo, name).await.unwrap();
        let at = catalog.newest().unwrap();
        assert_eq!(Some(at), stats.newest, "{label}");
        points.push(Point {
            label,
            at,
            next_start: None,
            tables,
        });
    }
    let catalog = SourceCatalog::load(&repo, name).await.unwrap();
    assert_eq!(catalog.chains.len(), 1, "one unbroken chain");
    eprintln!("workload and capture: {:?}", started.elapsed());

    // Every reference point restores exactly; an instant between two points gives the earlier.
    for (i, p) in points.iter().enumerate() {
        let t0 = Instant::now();
        let target = new_target();
        let restored = restore(&repo, name, At::Instant(p.at), &target, false)
            .await
            .unwrap();
        assert_eq!(
            checksums(&target).await,
            p.tables,
            "point {i} ({})",
            p.label
        );
        assert!(restored.summary.restored_to <= p.at, "point {i}");
        assert!(!restored.lsn.is_empty());
        eprintln!(
            "restore of point {i} ({}): {:?}, {} transactions, to {} at {}",
            p.label,
            t0.elapsed(),
            restored.summary.transactions,
            restored.summary.restored_to,
            restored.lsn
        );
        if let Some(next) = p.next_start.filter(|_| i % 3 == 1) {
            let mid = p.at + (next - p.at) / 2;
            let target = new_target();
            restore(&repo, name, At::Instant(mid), &target, false)
                .await
                .unwrap();
            assert_eq!(
                checksums(&target).await,
                p.tables,
                "between point {i} ({}) and the next",
                p.label
            );
        }
    }

    // Refusals: before the snapshot, and a target that has tables.
    let err = restore(
        &repo,
        name,
        At::Instant(snap.taken_at - chrono::Duration::seconds(5)),
        &new_target(),
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("restorable"), "{err}");
    let err = restore(&repo, name, At::Latest, &url, false)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TargetExists, "{err}");
    // Forced: the target is dropped and rebuilt.
    let target = new_target();
    restore(&repo, name, At::Instant(points[1].at), &target, false)
        .await
        .unwrap();
    let latest = restore(&repo, name, At::Latest, &target, true)
        .await
        .unwrap();
    assert_eq!(checksums(&target).await, points.last().unwrap().tables);
    assert_eq!(latest.summary.restored_to, points.last().unwrap().at);

    app.close().await.unwrap();
    let used = source.capture_method().expect("captured").method;
    let want = match method {
        CaptureChoice::Polling => CaptureMethod::Polling,
        _ => CaptureMethod::Streaming,
    };
    assert_eq!(used, want, "the capture method asked for");
    source.drop_slot().await.unwrap();
    eprintln!("total: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_names_tables_without_a_key_and_full_identity_replays() {
    let url = crate::pg!().create_database().await.unwrap();
    let mut c = pg(&url).await;
    sqlx::raw_sql(
        "CREATE TABLE keyed (id bigint PRIMARY KEY, v text); \
         CREATE TABLE \"No Key\" (a int, b text)",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let err = preflight(&url).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    let text = err.to_string();
    assert!(text.contains("\"public\".\"No Key\""), "{text}");
    assert!(
        text.contains("ALTER TABLE \"public\".\"No Key\" REPLICA IDENTITY FULL"),
        "{text}"
    );
    assert!(!text.contains("keyed"), "{text}");
    // The source refuses to create its publication too.
    let env = Env::new();
    let repo = env.repo().await;
    let mut source = PostgresSource::open("nokey", &url, &repo).await.unwrap();
    assert_eq!(
        source.snapshot(&repo).await.unwrap_err().kind(),
        ErrorKind::Config
    );
    let publications: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_publication")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(publications, 0, "nothing created before the fix");

    // With REPLICA IDENTITY FULL, changes to the keyless table replay by whole row.
    sqlx::raw_sql(
        "ALTER TABLE \"No Key\" REPLICA IDENTITY FULL; \
         INSERT INTO \"No Key\" VALUES (1, 'one'), (1, 'one'), (2, 'two')",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let report = preflight(&url).await.unwrap();
    assert_eq!(report.wal_level, "logical");
    source.snapshot(&repo).await.unwrap();
    sqlx::raw_sql(
        "UPDATE \"No Key\" SET b = 'uno' WHERE ctid = (SELECT min(ctid) FROM \"No Key\" WHERE a = 1); \
         DELETE FROM \"No Key\" WHERE a = 2; INSERT INTO \"No Key\" VALUES (3, NULL); \
         INSERT INTO keyed VALUES (1, 'x'); UPDATE keyed SET id = 2, v = 'y' WHERE id = 1",
    )
    .execute(&mut c)
    .await
    .unwrap();
    source.capture(&repo).await.unwrap();
    let target = new_target();
    restore(&repo, "nokey", At::Latest, &target, false)
        .await
        .unwrap();
    let expected = keyless_rows(&mut c).await;
    assert_eq!(expected, "1:one,1:uno,3:-|2:y");
    let mut restored = pg(&target).await;
    assert_eq!(keyless_rows(&mut restored).await, expected);
    let identity: String =
        sqlx::query_scalar("SELECT relreplident::text FROM pg_class WHERE relname = 'No Key'")
            .fetch_one(&mut restored)
            .await
            .unwrap();
    assert_eq!(identity, "f", "the restored table can be captured too");
    restored.close().await.unwrap();
    c.close().await.unwrap();
    source.drop_slot().await.unwrap();
}

async fn keyless_rows(conn: &mut PgConnection) -> String {
    sqlx::query(
        "SELECT coalesce(string_agg(a::text || ':' || coalesce(b, '-'), ',' ORDER BY a, b), '') \
         || '|' || (SELECT string_agg(id || ':' || v, ',') FROM keyed) FROM \"No Key\"",
    )
    .fetch_one(conn)
    .await
    .unwrap()
    .get::<String, _>(0)
}

fn break_replica(dir: &Path) -> PathBuf {
    let aside = dir.with_extension("aside");
    std::fs::rename(dir, &aside).unwrap();
    std::fs::write(dir, b"not a directory").unwrap();
    aside
}

fn heal_replica(dir: &Path, aside: &Path) {
    std::fs::remove_file(dir).unwrap();
    std::fs::rename(aside, dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_moves_only_after_the_segment_is_durable() {
    let env = Env::new();
    let repo = env.repo().await;
    let url = crate::pg!().create_database().await.unwrap();
    let mut c = pg(&url).await;
    sqlx::raw_sql(
        "CREATE TYPE mood AS ENUM ('calm', 'busy'); \
         CREATE DOMAIN short_text AS text CHECK (length(VALUE) < 100); \
         CREATE TABLE items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
                             mood mood NOT NULL DEFAULT 'calm', label short_text, \
                             doubled bigint GENERATED ALWAYS AS (id * 2) STORED, \
                             body text, data bytea, tags text[]); \
         CREATE SEQUENCE tickets START 100; \
         CREATE INDEX items_label ON items (label); \
         INSERT INTO items (label, body) SELECT 'row ' || g, repeat('x', 10) FROM generate_series(1, 50) g; \
         SELECT nextval('tickets')",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let mut source = PostgresSource::open("durable", &url, &repo).await.unwrap();
    // Over SQL polling: postgres_streaming has the streaming twin of this test.
    source.set_capture_method(CaptureChoice::Polling);
    source.snapshot(&repo).await.unwrap();
    let slot = source.slot().to_string();

    // A repository that cannot take the segment: capture fails, the slot stays.
    sqlx::raw_sql(
        "INSERT INTO items (mood, label, body, data, tags) \
         VALUES ('busy', 'big', repeat(md5('a'), 20000), '\\x00ff', '{a,\"b c\"}'); \
         SELECT nextval('tickets'), nextval('tickets')",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let before = confirmed_flush(&mut c, &slot).await;
    let north = env.replica_dir("eu-north");
    let aside = break_replica(&north);
    let err = source.capture(&repo).await.unwrap_err();
    assert!(err.to_string().contains("eu-north"), "{err}");
    assert_eq!(
        confirmed_flush(&mut c, &slot).await,
        before,
        "slot not moved"
    );
    heal_replica(&north, &aside);

    // An update that leaves the TOASTed body alone, after the failed capture.
    sqlx::raw_sql("UPDATE items SET label = 'big2' WHERE label = 'big'")
        .execute(&mut c)
        .await
        .unwrap();
    let stats = source.capture(&repo).await.unwrap();
    assert_eq!(stats.transactions, 2, "nothing lost: {stats:?}");
    assert_ne!(confirmed_flush(&mut c, &slot).await, before);

    // Reopening (a restarted daemon) resumes the chain.
    drop(source);
    let mut source = PostgresSource::open("durable", &url, &repo).await.unwrap();
    // Over SQL polling: postgres_streaming has the streaming twin of this test.
    source.set_capture_method(CaptureChoice::Polling);
    assert!(source.has_chain());
    sqlx::raw_sql("DELETE FROM items WHERE id <= 10")
        .execute(&mut c)
        .await
        .unwrap();
    source.capture(&repo).await.unwrap();

    let target = new_target();
    let restored = restore(&repo, "durable", At::Latest, &target, false)
        .await
        .unwrap();
    let dump = "SELECT string_agg(concat_ws('|', id, mood, label, doubled, md5(body), \
                encode(data, 'hex'), tags::text), ',' ORDER BY id) FROM items";
    let expected: String = sqlx::query_scalar(dump).fetch_one(&mut c).await.unwrap();
    let mut r = pg(&target).await;
    let got: String = sqlx::query_scalar(dump).fetch_one(&mut r).await.unwrap();
    assert_eq!(got, expected);
    // Sequences and identity continue past every restored value; indexes were built.
    let next: i64 = sqlx::query_scalar("SELECT nextval('tickets')")
        .fetch_one(&mut r)
        .await
        .unwrap();
    assert_eq!(next, 103);
    let id: i64 = sqlx::query_scalar("INSERT INTO items (label) VALUES ('new') RETURNING id")
        .fetch_one(&mut r)
        .await
        .unwrap();
    assert_eq!(id, 52);
    let indexes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_indexes WHERE tablename = 'items'")
            .fetch_one(&mut r)
            .await
            .unwrap();
    assert_eq!(indexes, 2);
    assert_eq!(
        restored.summary.chain,
        SourceCatalog::load(&repo, "durable").await.unwrap().chains[0].id()
    );
    r.close().await.unwrap();
    c.close().await.unwrap();
    source.drop_slot().await.unwrap();
}

/// The snapshot/change-log handoff under concurrent writers: transactions in flight while the
/// snapshot is taken are neither lost nor applied twice (decided by xid, never by LSN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_is_exact_under_concurrent_writers() {
    let env = Env::new();
    let repo = env.repo().await;
    let url = crate::pg!().create_database().await.unwrap();
    let mut c = pg(&url).await;
    sqlx::raw_sql(
        "CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL); \
         INSERT INTO counters SELECT g, 0 FROM generate_series(1, 20) g; \
         CREATE TABLE events (id bigserial PRIMARY KEY, counter int, at timestamptz DEFAULT now())",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3 {
        let (url, stop) = (url.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut conn = pg(&url).await;
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = (w * 7 + i as i32) % 20 + 1;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "BEGIN; UPDATE counters SET n = n + 1 WHERE id = {id}; \
                     INSERT INTO events (counter) VALUES ({id}); COMMIT"
                )))
                .execute(&mut conn)
                .await
                .unwrap();
                i += 1;
            }
            i
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut source = PostgresSource::open("handoff", &url, &repo).await.unwrap();
    source.snapshot(&repo).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    source.capture(&repo).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in writers {
        total += w.await.unwrap();
    }
    assert!(total > 20, "the writers ran ({total} transactions)");
    source.capture(&repo).await.unwrap();
    let target = new_target();
    restore(&repo, "handoff", At::Latest, &target, false)
        .await
        .unwrap();
    let dump = "SELECT (SELECT string_agg(id || '=' || n, ',' ORDER BY id) FROM counters) || '|' || \
                (SELECT count(*) || ':' || coalesce(sum(counter), 0) || ':' || coalesce(max(id), 0) FROM events)";
    let expected: String = sqlx::query_scalar(dump).fetch_one(&mut c).await.unwrap();
    let mut r = pg(&target).await;
    let got: String = sqlx::query_scalar(dump).fetch_one(&mut r).await.unwrap();
    assert_eq!(got, expected);
    r.close().await.unwrap();
    c.close().await.unwrap();
    source.drop_slot().await.unwrap();
}

/// The binary end to end on PostgreSQL: init runs the preflight, the daemon takes the
/// snapshot and captures, restore writes a new database equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_init_daemon_once_and_restore() {
    let source = crate::pg!().create_database().await.unwrap();
    generate_postgres(&source, &GenerateOptions { seed: 5, scale: 1 })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigBuilder::one_replica("replica")
        .postgres("db", &source)
        .fixture_tenancy()
        .write(dir.path());
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_timevault"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&["init"]);
    run(&["daemon", "--once"]);
    let mut app = Database::Postgres(source.clone()).connect().await.unwrap();
    let point = Workload::new(5, 1)
        .with_bulk_rows(2_000)
        .step(&mut app, None)
        .await
        .unwrap();
    run(&["daemon", "--once"]);
    let status: serde_json::Value = serde_json::from_str(&run(&["status", "--json"])).unwrap();
    assert_eq!(status["sources"][0]["kind"], "postgres");
    let target = new_target();
    let out = run(&[
        "restore", "--source", "db", "--at", "latest", "--to", &target,
    ]);
    assert!(out.contains("restored db"), "{out}");
    assert_eq!(checksums(&target).await, point.tables);
    // One tenant alone.
    let (&tenant, sums) = point.tenants.iter().next().unwrap();
    let target = new_target();
    let tenant_arg = tenant.to_string();
    run(&[
        "restore",
        "--source",
        "db",
        "--at",
        "latest",
        "--to",
        &target,
        "--tenant",
        &tenant_arg,
    ]);
    let mut r = Database::Postgres(target).connect().await.unwrap();
    assert_eq!(
        &timevault_fixtures::tenant_checksums(&mut r, tenant)
            .await
            .unwrap(),
        sums
    );
}
