//! Replay holds row changes back and sends them many rows a statement, many source
//! transactions a target transaction (src/restore/postgres_batch.rs). This drives every case
//! that batching must keep exact, interleaved across tables and transactions, and restores
//! every captured point: hot rows updated many times in one batch, inserts then updates then
//! deletes then re-inserts of one key, key changes, unchanged TOAST values, a table without a
//! key holding duplicate rows, a GENERATED ALWAYS identity column that is not the key, and
//! transactions larger than a batch and than the held-back budget.

use crate::common;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::postgres::PgConnection;
use sqlx::Connection;
use timevault::catalog::SourceCatalog;
use timevault::restore::postgres::restore_postgres_detailed;
use timevault::restore::RestoreOptions;
use timevault::source::postgres::PostgresSource;
use timevault::time::At;
use timevault_fixtures::harness::unique_name;

const TABLES: [&str; 4] = ["kv", "counters", "nokey", "ga"];

const SCHEMA: &str = "\
    CREATE TABLE kv (id bigint PRIMARY KEY, v text, big text); \
    ALTER TABLE kv ALTER COLUMN big SET STORAGE EXTERNAL; \
    CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL); \
    CREATE TABLE nokey (a int, b text); \
    ALTER TABLE nokey REPLICA IDENTITY FULL; \
    CREATE TABLE ga (k text PRIMARY KEY, n bigint GENERATED ALWAYS AS IDENTITY, v int); \
    INSERT INTO kv SELECT i, 'v' || i, repeat(md5(i::text), 200) FROM generate_series(1, 200) i; \
    INSERT INTO counters SELECT i, 0 FROM generate_series(1, 5) i; \
    INSERT INTO nokey SELECT i % 7, 'b' || (i % 3) FROM generate_series(1, 50) i; \
    INSERT INTO ga (k, v) SELECT 'k' || i, i FROM generate_series(1, 20) i";

/// Every table's rows, as one digest per table (order-independent).
async fn digests(conn: &mut PgConnection) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for t in TABLES {
        let sql = format!(
            "SELECT count(*)::text || ':' || coalesce(md5(string_agg(x, '|' ORDER BY x)), '') \
             FROM (SELECT t::text AS x FROM {t} t) s"
        );
        let d: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        out.insert(t.to_string(), d);
    }
    out
}

/// One source transaction of random changes to every table.
fn transaction(rng: &mut StdRng, next_id: &mut i64) -> String {
    let mut sql = vec!["BEGIN".to_string()];
    for _ in 0..rng.gen_range(1..12) {
        let id = rng.gen_range(1..*next_id);
        let op = match rng.gen_range(0..11) {
            0 => {
                *next_id += 1;
                format!(
                    "INSERT INTO kv VALUES ({0}, 'new', repeat(md5('{0}'), 150))",
                    *next_id
                )
            }
            // Small column only: `big` arrives as an unchanged TOAST value.
            1 => format!("UPDATE kv SET v = v || '+' WHERE id = {id}"),
            2 => format!("UPDATE kv SET big = repeat(md5(random()::text), 120) WHERE id = {id}"),
            3 => format!("DELETE FROM kv WHERE id = {id}"),
            // Re-insert a key that may just have been deleted.
            4 => format!(
                "INSERT INTO kv VALUES ({id}, 'again', 'short') ON CONFLICT (id) DO UPDATE SET v = 'clash'"
            ),
            // A key change.
            5 => format!(
                "UPDATE kv SET id = id + 1000000 WHERE id = {id} AND NOT EXISTS \
                 (SELECT 1 FROM kv WHERE id = {id} + 1000000)"
            ),
            6 | 7 => format!(
                "UPDATE counters SET n = n + {} WHERE id = {}",
                rng.gen_range(1..100),
                rng.gen_range(1..6)
            ),
            8 => format!(
                "INSERT INTO nokey VALUES ({}, 'b{}')",
                rng.gen_range(0..7),
                rng.gen_range(0..3)
            ),
            9 => format!(
                "DELETE FROM nokey WHERE ctid = (SELECT ctid FROM nokey WHERE a = {} LIMIT 1)",
                rng.gen_range(0..7)
            ),
            _ => format!(
                "INSERT INTO ga (k, v) VALUES ('k{}', 1) ON CONFLICT (k) DO UPDATE SET v = ga.v + 1",
                rng.gen_range(1..40)
            ),
        };
        sql.push(op);
    }
    sql.push("COMMIT".into());
    sql.join("; ")
}

/// Transactions larger than one batch (1,000 rows) and than the held-back budget (20,000).
const LARGE: [&str; 3] = [
    "UPDATE kv SET v = v || '#'",
    "INSERT INTO nokey SELECT i % 5, 'bulk' FROM generate_series(1, 25000) i",
    "INSERT INTO kv SELECT 5000000 + i, 'bulk', 'b' FROM generate_series(1, 3000) i; \
     UPDATE kv SET v = 'u' WHERE id > 5000000",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_replay_restores_every_point_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::local_repo(dir.path()).await;
    let url = crate::pg!().create_database().await.unwrap();
    let mut app = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(SCHEMA).execute(&mut app).await.unwrap();
    let mut source = PostgresSource::open("replay", &url, &repo).await.unwrap();
    let snap = source.snapshot(&repo).await.unwrap();
    let mut points: Vec<(String, DateTime<Utc>, BTreeMap<String, String>)> =
        vec![("snapshot".into(), snap.taken_at, digests(&mut app).await)];
    let mut rng = StdRng::seed_from_u64(7);
    let mut next_id = 200;
    for round in 0..6 {
        for _ in 0..150 {
            let sql = transaction(&mut rng, &mut next_id);
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut app)
                .await
                .unwrap();
        }
        if let Some(large) = LARGE.get(round % 4) {
            sqlx::raw_sql(*large).execute(&mut app).await.unwrap();
        }
        source.capture(&repo).await.unwrap();
        let at = SourceCatalog::load(&repo, "replay")
            .await
            .unwrap()
            .newest()
            .unwrap();
        points.push((format!("round {round}"), at, digests(&mut app).await));
    }
    assert!(
        points.windows(2).all(|w| w[0].2 != w[1].2),
        "every round changed the tables"
    );
    for (label, at, expected) in &points {
        let target = crate::pg!().url(&unique_name("replayed").replace('-', "_"));
        let restored = restore_postgres_detailed(
            &repo,
            &RestoreOptions {
                source: "replay".into(),
                at: At::Instant(*at),
                target: target.clone(),
                force: false,
                jobs: None,
            },
        )
        .await
        .unwrap();
        let mut conn = PgConnection::connect(&target).await.unwrap();
        assert_eq!(&digests(&mut conn).await, expected, "{label}");
        let identity: String = sqlx::query_scalar(
            "SELECT attidentity::text FROM pg_attribute WHERE attrelid = 'ga'::regclass AND attname = 'n'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(identity, "a", "{label}: ga.n is GENERATED ALWAYS again");
        eprintln!(
            "{label}: {} transactions, {} row changes replayed",
            restored.summary.transactions, restored.changes
        );
        conn.close().await.unwrap();
    }
    app.close().await.unwrap();
    source.drop_slot().await.unwrap();
}
