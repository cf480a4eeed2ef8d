//! Schema changes inside the restorable window on a real PostgreSQL 15 cluster: ADD COLUMN,
//! CREATE TABLE (receiving inserts), DROP COLUMN and a column type change, captured in small
//! batches, partly several changes per capture (so the catalog is already ahead of the stream),
//! with a reopened source in between. Every point before, between and after the changes
//! restores to the state the source had then: table list, column names and types, and rows.
//! Column collations, TOAST compression and storage modes and tables' storage parameters
//! restore as the source had them. Values of every type the restore sends as COPY binary,
//! at their edges, restore exactly; a value in a text form the client does not recognise
//! loads its run as text.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;
use timevault::restore::postgres::restore_postgres_detailed;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};
use timevault::restore::RestoreOptions;
use timevault::source::postgres::PostgresSource;
use timevault::time::At;
use timevault_fixtures::harness::unique_name;

/// `table -> "columns with types | md5 of the rows"` for every table in `public`.
async fn state(conn: &mut PgConnection) -> BTreeMap<String, String> {
    let tables: Vec<(String, String)> = sqlx::query(
        "SELECT c.relname::text, string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), \
                ', ' ORDER BY a.attnum) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
         WHERE n.nspname = 'public' AND c.relkind = 'r' GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    let mut out = BTreeMap::new();
    for (table, columns) in tables {
        let sql = format!(
            "SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) FROM \"{table}\" t"
        );
        let rows: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        out.insert(table, format!("{columns} | {rows}"));
    }
    out
}

struct Point {
    label: &'static str,
    at: DateTime<Utc>,
    state: BTreeMap<String, String>,
}

/// Run the statements one by one (each its own transaction), then note the instant and state.
async fn step(conn: &mut PgConnection, label: &'static str, statements: &[&str]) -> Point {
    for sql in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("{label}: {sql}: {e}"));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let at: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let point = Point {
        label,
        at,
        state: state(conn).await,
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    point
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_drop_retype_and_create_table_restore_at_every_point() {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::local_repo(dir.path()).await;
    let url = crate::pg!().create_database().await.unwrap();
    let mut c = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE accounts (id int PRIMARY KEY, name text NOT NULL, balance numeric(10,2)); \
         INSERT INTO accounts SELECT g, 'acct ' || g, g * 1.25 FROM generate_series(1, 200) g; \
         CREATE TABLE audit (id bigserial PRIMARY KEY, note text); \
         INSERT INTO audit (note) VALUES ('start')",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let mut source = PostgresSource::open("ddl", &url, &repo).await.unwrap();
    source.set_batch_changes(40);
    let snap = source.snapshot(&repo).await.unwrap();
    let mut points = vec![Point {
        label: "snapshot",
        at: snap.taken_at,
        state: state(&mut c).await,
    }];
    points.push(
        step(
            &mut c,
            "add column",
            &[
                "ALTER TABLE accounts ADD COLUMN score int NOT NULL DEFAULT 7",
                "UPDATE accounts SET score = id WHERE id <= 20",
                "INSERT INTO accounts VALUES (201, 'new', 1.50, 3)",
            ],
        )
        .await,
    );
    points.push(
        step(
            &mut c,
            "create table",
            &[
                "CREATE TABLE notes (id bigserial PRIMARY KEY, account int REFERENCES accounts, \
                 body text, created date DEFAULT '2024-01-01')",
                "INSERT INTO notes (account, body) SELECT id, 'n' || id FROM accounts WHERE id <= 50",
            ],
        )
        .await,
    );
    source.capture(&repo).await.unwrap();
    // A restarted daemon: the chain resumes from the snapshot's schema.
    drop(source);
    let mut source = PostgresSource::open("ddl", &url, &repo).await.unwrap();
    source.set_batch_changes(40);
    assert!(source.has_chain());
    points.push(
        step(
            &mut c,
            "drop column",
            &[
                "ALTER TABLE accounts DROP COLUMN name",
                "UPDATE accounts SET balance = balance + 1 WHERE id % 3 = 0",
                "DELETE FROM notes WHERE id % 5 = 0",
            ],
        )
        .await,
    );
    points.push(
        step(
            &mut c,
            "retype column",
            &[
                "ALTER TABLE accounts ALTER COLUMN score TYPE bigint",
                "UPDATE accounts SET score = score * 1000000000 WHERE id <= 5",
                "INSERT INTO notes (account, body) VALUES (1, 'late')",
            ],
        )
        .await,
    );
    points.push(
        step(
            &mut c,
            "plain changes",
            &[
                "INSERT INTO audit (note) VALUES ('end')",
                "UPDATE notes SET body = 'edited' WHERE id = 1",
            ],
        )
        .await,
    );
    // Three steps in one capture: the catalog is ahead of the older Relation messages.
    let stats = source.capture(&repo).await.unwrap();
    assert!(stats.segments.len() > 1, "small batches: {stats:?}");

    for p in &points {
        let target = crate::pg!().url(&unique_name("ddl_restored").replace('-', "_"));
        let restored = restore_postgres_detailed(
            &repo,
            &RestoreOptions {
                source: "ddl".into(),
                at: At::Instant(p.at),
                target: target.clone(),
                force: false,
                jobs: None,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", p.label));
        let mut r = PgConnection::connect(&target).await.unwrap();
        assert_eq!(state(&mut r).await, p.state, "{}", p.label);
        eprintln!(
            "{}: {} transactions to {}",
            p.label, restored.summary.transactions, restored.lsn
        );
        if p.label == "plain changes" {
            // The created table got its sequence, key and foreign key.
            let next: i64 =
                sqlx::query_scalar("INSERT INTO notes (account) VALUES (2) RETURNING id")
                    .fetch_one(&mut r)
                    .await
                    .unwrap();
            let max: i64 = sqlx::query_scalar(
                "SELECT max(id) FROM notes WHERE account <> 2 OR body IS NOT NULL",
            )
            .fetch_one(&mut c)
            .await
            .unwrap();
            assert!(next > max, "{next} > {max}");
            let constraints: String = sqlx::query_scalar(
                "SELECT string_agg(contype::text, '' ORDER BY contype) FROM pg_constraint \
                 WHERE conrelid = 'notes'::regclass",
            )
            .fetch_one(&mut r)
            .await
            .unwrap();
            assert_eq!(constraints, "fp");
            let not_null: bool = sqlx::query_scalar(
                "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'accounts'::regclass \
                 AND attname = 'score'",
            )
            .fetch_one(&mut r)
            .await
            .unwrap();
            assert!(
                not_null,
                "NOT NULL of an added column is applied after replay"
            );
        }
        r.close().await.unwrap();
    }
    c.close().await.unwrap();
    source.drop_slot().await.unwrap();
}

/// Per column: type, collation (where not the type's), compression and storage; per table
/// and its TOAST table: storage parameters.
async fn physical(conn: &mut PgConnection) -> Vec<String> {
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) \
                || ' collate ' || CASE WHEN a.attcollation <> t.typcollation \
                                       THEN co.collname::text ELSE '-' END \
                || ' compression ' || a.attcompression::text || ' storage ' || a.attstorage::text \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
         JOIN pg_type t ON t.oid = a.atttypid \
         LEFT JOIN pg_collation co ON co.oid = a.attcollation \
         WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY c.relname, a.attnum",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname || ' ' \
                || coalesce((SELECT string_agg(o, ',' ORDER BY o) FROM unnest(c.reloptions) o), '') \
                || ' toast ' \
                || coalesce((SELECT string_agg(o, ',' ORDER BY o) FROM unnest(tc.reloptions) o), '') \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_class tc ON tc.oid = c.reltoastrelid \
         WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY c.relname",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    columns.into_iter().chain(tables).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collations_storage_and_table_parameters_restore_as_the_source_had_them() {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::local_repo(dir.path()).await;
    let url = crate::pg!().create_database().await.unwrap();
    let mut c = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE docs (id int PRIMARY KEY, title text COLLATE \"C\", \
                            body text COMPRESSION lz4, raw bytea, note varchar(40) COLLATE \"POSIX\") \
           WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.05, autovacuum_enabled = false, \
                 toast.autovacuum_enabled = false); \
         ALTER TABLE docs ALTER COLUMN raw SET STORAGE EXTERNAL; \
         ALTER TABLE docs ALTER COLUMN note SET STORAGE MAIN; \
         CREATE TABLE plain (id int PRIMARY KEY, name text); \
         INSERT INTO docs SELECT g, chr(65 + g % 26) || g, repeat(md5(g::text), 200), \
                                 decode(repeat(md5(g::text), 100), 'hex'), 'n' || g \
           FROM generate_series(1, 300) g; \
         INSERT INTO plain SELECT g, 'x' || g FROM generate_series(1, 10) g",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let before = physical(&mut c).await;
    assert!(
        before.iter().any(|l| l.contains("collate C "))
            && before.iter().any(|l| l.contains("fillfactor=70")),
        "the source has what the test checks: {before:#?}"
    );
    let mut source = PostgresSource::open("physical", &url, &repo).await.unwrap();
    source.snapshot(&repo).await.unwrap();
    sqlx::raw_sql("INSERT INTO docs VALUES (301, 'late', repeat('z', 5000), NULL, 'n')")
        .execute(&mut c)
        .await
        .unwrap();
    source.capture(&repo).await.unwrap();
    let (target, _) = restore_latest(&repo, "physical").await;
    let mut r = PgConnection::connect(&target).await.unwrap();
    assert_eq!(physical(&mut r).await, before);
    assert_eq!(state(&mut r).await, state(&mut c).await);
    // The collation orders as the source's does.
    let order = "SELECT string_agg(title, ',' ORDER BY title) FROM docs";
    let restored: String = sqlx::query_scalar(order).fetch_one(&mut r).await.unwrap();
    let source_order: String = sqlx::query_scalar(order).fetch_one(&mut c).await.unwrap();
    assert_eq!(restored, source_order);
    r.close().await.unwrap();
    c.close().await.unwrap();
    source.drop_slot().await.unwrap();
}

/// Restore `source`'s latest state into a new database; returns its url and the restore.
async fn restore_latest(
    repo: &timevault::repo::Repository,
    source: &str,
) -> (String, timevault::restore::postgres::PostgresRestore) {
    let target = crate::pg!().url(&unique_name(&format!("{source}_restored")).replace('-', "_"));
    let restored = restore_postgres_detailed(
        repo,
        &RestoreOptions {
            source: source.into(),
            at: At::Latest,
            target: target.clone(),
            force: false,
            jobs: None,
        },
    )
    .await
    .unwrap();
    (target, restored)
}

/// Every type the restore sends as COPY binary, at its edges: the restored rows read back as
/// the same text, and a table with a type it does not convert loads as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_at_their_edges_restore_exactly_through_binary_copy() {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::local_repo(dir.path()).await;
    let url = crate::pg!().create_database().await.unwrap();
    let mut c = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE kinds (id int PRIMARY KEY, b bool, i2 smallint, i8 bigint, f4 real, \
            f8 double precision, n numeric, n2 numeric(12,3), tx text, v varchar(20), ch char(5), \
            j json, jb jsonb, u uuid, by bytea, d date, ts timestamp, ts3 timestamp(3), \
            tz timestamptz, tz0 timestamptz(0)); \
         INSERT INTO kinds VALUES \
          (1, true, -32768, -9223372036854775808, 'NaN', 'Infinity', 'NaN', 0, '', '', '', \
           '{\"a\": [1, 2]}', '{\"b\": null}', '00000000-0000-0000-0000-000000000000', '', \
           '4713-01-01 BC', '4713-01-01 00:00:00 BC', '2000-01-01 00:00:00.001', \
           '4713-01-01 00:00:00+00 BC', '-infinity'), \
          (2, false, 32767, 9223372036854775807, '-Infinity', '-0', 'Infinity', -999999999.999, \
           E'tab\\there\\nnew\\\\back\\rcr \\u00fc\\u20ac\\U0001F600', 'x', 'ab', '[]', '[1, \"2\"]', \
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff10', '5874897-12-31', \
           '294276-12-31 23:59:59.999999', '1999-12-31 23:59:59.999', \
           '2026-12-03 10:11:12.123456+05:30', '2026-06-30 23:59:59.5-07'), \
          (3, NULL, 0, 0, 1.4e-45, 2.2250738585072014e-308, '-Infinity', 0.001, \
           repeat('long ', 3000), NULL, NULL, NULL, NULL, NULL, NULL, 'infinity', 'infinity', \
           '-infinity', 'infinity', NULL), \
          (4, true, -1, -1, 3.4028235e38, 1.7976931348623157e308, \
           '-12345678901234567890.000123456789', 123456789.5, NULL, 'vv', 'abcde', NULL, \
           '{\"n\": 1.50}', NULL, '\\x', '2000-02-29', '0001-01-01 00:00:00 BC', NULL, \
           '1900-01-01 00:00:00+00:19:32', '2000-01-01 00:00:00+00'), \
          (5, false, 1, 1, 0.1, 0.1, '0.00000000000000000001', 0, 'x', NULL, NULL, NULL, NULL, \
           NULL, NULL, '1999-12-31', '1970-01-01 00:00:00', NULL, NULL, NULL); \
         INSERT INTO kinds (id, i8, f8, n, tx, by, d, tz) \
           SELECT g, (g * 7919)::bigint << (g % 40), (g - 500) / 7.0, (g - 500)::numeric / 3, \
                  md5(g::text), decode(md5(g::text), 'hex'), date '2000-01-01' + (g * 37 - 9000), \
                  timestamptz '2000-01-01 00:00:00+00' + (g::float8 * 1468800 - 3e7) * interval '1.000001 s' \
           FROM generate_series(6, 2000) g; \
         CREATE TYPE mood AS ENUM ('sad', 'ok'); \
         CREATE TABLE others (id int PRIMARY KEY, span interval, tags text[], m mood); \
         INSERT INTO others SELECT g, g * interval '1 day 2 hours', ARRAY['a', g::text], 'ok' \
           FROM generate_series(1, 100) g",
    )
    .execute(&mut c)
    .await
    .unwrap();
    let mut source = PostgresSource::open("kinds", &url, &repo).await.unwrap();
    source.snapshot(&repo).await.unwrap();
    let (target, restored) = restore_latest(&repo, "kinds").await;
    let mut r = PgConnection::connect(&target).await.unwrap();
    assert_eq!(state(&mut r).await, state(&mut c).await);
    // Floats compared by their bits too: text equality could hide a last-digit difference
    // only where both sides print the same digits, which is exactly what exactness means,
    // but -0 and 0 print differently only for float8, so the signs are checked as well.
    let bits = "SELECT string_agg(id || ':' || coalesce(float8send(f8)::text, '') || \
                coalesce(float4send(f4)::text, '') || coalesce(numeric_send(n)::text, ''), ',' ORDER BY id) FROM kinds";
    let restored_bits: String = sqlx::query_scalar(bits).fetch_one(&mut r).await.unwrap();
    let source_bits: String = sqlx::query_scalar(bits).fetch_one(&mut c).await.unwrap();
    assert_eq!(restored_bits, source_bits);
    let tz: String = sqlx::query_scalar("SELECT tz::text FROM kinds WHERE id = 2")
        .fetch_one(&mut r)
        .await
        .unwrap();
    assert_eq!(tz, "2026-12-03 04:41:12.123456+00");
    assert_eq!(restored.snapshot_rows, 2100);
    assert_eq!(
        restored.binary_rows, 2000,
        "kinds goes as binary, others (interval, array, enum) as text"
    );
    r.close().await.unwrap();
    c.close().await.unwrap();
    source.drop_slot().await.unwrap();
}

/// A value the client does not recognise (`bytea` in the escape form, as a source database
/// set to `bytea_output = escape` writes it) sends that run as text instead: the aborted
/// binary COPY leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_in_another_text_form_loads_its_run_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::local_repo(dir.path()).await;
    let url = crate::pg!().create_database().await.unwrap();
    let mut c = PgConnection::connect(&url).await.unwrap();
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut c)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{database}\" SET bytea_output = 'escape'; \
         CREATE TABLE files (id int PRIMARY KEY, body bytea, note text); \
         INSERT INTO files SELECT g, decode(md5(g::text) || '00ff5c', 'hex'), 'n' || g \
           FROM generate_series(1, 500) g; \
         CREATE TABLE plain (id int PRIMARY KEY, name text); \
         INSERT INTO plain SELECT g, 'x' || g FROM generate_series(1, 50) g"
    )))
    .execute(&mut c)
    .await
    .unwrap();
    let mut source = PostgresSource::open("escaped", &url, &repo).await.unwrap();
    source.snapshot(&repo).await.unwrap();
    let (target, restored) = restore_latest(&repo, "escaped").await;
    let mut r = PgConnection::connect(&target).await.unwrap();
    assert_eq!(state(&mut r).await, state(&mut c).await);
    assert_eq!(restored.snapshot_rows, 550);
    assert_eq!(restored.binary_rows, 50, "plain as binary, files as text");
    r.close().await.unwrap();
    c.close().await.unwrap();
    source.drop_slot().await.unwrap();
}
