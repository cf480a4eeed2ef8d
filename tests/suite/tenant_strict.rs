//! Tenant restores and exports are strict (issue 19): `restore --tenant` refuses a table the
//! tenancy map neither maps nor declares global (at the snapshot and when the change log creates
//! one), and its audit record names the tenant; a map's hop must end on a primary key or a
//! unique column; export entry and spool names are safe whatever the table names; CSV cells
//! cannot start a spreadsheet formula.

use crate::common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use common::config::ConfigBuilder;
use sha2::{Digest, Sha256};
use sqlx::Connection;
use timevault::config::Config;
use timevault::export::{self, ExportOptions, TableFormat};
use timevault::repo::Repository;
use timevault::restore::postgres::restore_postgres_with;
use timevault::restore::postgres_tenant::TenantOptions;
use timevault::restore::RestoreOptions;
use timevault::source::postgres::PostgresSource;
use timevault::source::sqlite::SqliteSource;
use timevault::tenancy::{self, parse_table_rule, TenancyConfig};
use timevault::time::At;
use timevault::ErrorKind;
use timevault_fixtures::harness::unique_name;

// ---------------------------------------------------------------------------------------------
// restore --tenant

const SCHEMA: &str = "
CREATE TABLE plans (id int PRIMARY KEY, name text);
CREATE TABLE contracts (id int PRIMARY KEY, tenant_id int NOT NULL, plan_id int REFERENCES plans(id));
CREATE TABLE notes (id int PRIMARY KEY, contract_id int NOT NULL REFERENCES contracts(id), body text);
CREATE TABLE webhooks (id int PRIMARY KEY, url text);
INSERT INTO plans VALUES (1, 'basic'), (2, 'pro');
INSERT INTO contracts VALUES (10, 1, 1), (11, 1, 2), (20, 2, 1);
INSERT INTO notes VALUES (100, 10, 'one'), (101, 11, 'one more'), (200, 20, 'two');
INSERT INTO webhooks VALUES (1, 'https://one.example/hook'), (2, 'https://two.example/hook');
";

/// `[tenancy]` for [`SCHEMA`]: `extra` are more `table = "rule"` pairs.
fn map(extra: &[(&str, &str)]) -> TenancyConfig {
    let mut tables = BTreeMap::from([
        ("plans".to_string(), parse_table_rule("global").unwrap()),
        (
            "notes".to_string(),
            parse_table_rule("contract_id -> contracts.id").unwrap(),
        ),
    ]);
    for (table, rule) in extra {
        tables.insert(table.to_string(), parse_table_rule(rule).unwrap());
    }
    TenancyConfig {
        column: "tenant_id".into(),
        tables,
        blobs: BTreeMap::new(),
        tenant_keys: false,
        keys: Default::default(),
    }
}

async fn execute(url: &str, sql: &str) {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
}

async fn database_exists(name: &str) -> bool {
    let mut conn = sqlx::PgConnection::connect(&crate::pg!().admin_url())
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    n > 0
}

/// Sorted `id` values of `table` in the database at `url`.
async fn ids(url: &str, table: &str) -> Vec<i32> {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let sql = format!("SELECT id FROM {table} ORDER BY id");
    let ids = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    ids
}

async fn restore_tenant(
    repo: &Repository,
    source: &str,
    tenancy: &TenancyConfig,
) -> (String, timevault::Result<()>) {
    let name = unique_name("strict").replace('-', "_");
    let options = RestoreOptions {
        source: source.into(),
        at: At::Latest,
        target: crate::pg!().url(&name),
        force: false,
        jobs: None,
    };
    let tenant = TenantOptions::with_map("1", Some(tenancy));
    let result = restore_postgres_with(repo, &options, Some(&tenant)).await;
    (name, result.map(|_| ()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_tenant_refuses_tables_the_map_does_not_cover() {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::local_repo(dir.path()).await;
    let url = crate::pg!().create_database().await.unwrap();
    execute(&url, SCHEMA).await;
    let mut source = PostgresSource::open("strict_lib", &url, &repo)
        .await
        .unwrap();
    source.snapshot(&repo).await.unwrap();

    // 1. `webhooks` is neither mapped nor global: refused, naming it, before any database exists.
    let (name, result) = restore_tenant(&repo, "strict_lib", &map(&[])).await;
    let err = result.expect_err("an unmapped table must not be restored whole");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("webhooks"), "{err}");
    assert!(err.hint().is_some_and(|h| h.contains("global")), "{err:?}");
    assert!(!database_exists(&name).await, "nothing was created");

    // 2. Declared global: the tenant's rows, and the global tables whole.
    let covered = map(&[("webhooks", "global")]);
    let (name, result) = restore_tenant(&repo, "strict_lib", &covered).await;
    result.unwrap();
    let target = crate::pg!().url(&name);
    assert_eq!(ids(&target, "contracts").await, vec![10, 11]);
    assert_eq!(ids(&target, "notes").await, vec![100, 101]);
    assert_eq!(ids(&target, "webhooks").await, vec![1, 2]);
    assert_eq!(ids(&target, "plans").await, vec![1, 2]);

    // 3. A table the change log creates later is held to the same rule.
    execute(
        &url,
        "CREATE TABLE late_events (id int PRIMARY KEY, payload text); \
         INSERT INTO late_events VALUES (1, 'shared?'), (2, 'shared?');",
    )
    .await;
    source.capture(&repo).await.unwrap();
    let (name, result) = restore_tenant(&repo, "strict_lib", &covered).await;
    let err = result.expect_err("a table created after the snapshot is not restored whole");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("late_events"), "{err}");
    assert!(
        !database_exists(&name).await,
        "the failed target was dropped"
    );
    let (name, result) = restore_tenant(
        &repo,
        "strict_lib",
        &map(&[("webhooks", "global"), ("late_events", "global")]),
    )
    .await;
    result.unwrap();
    assert_eq!(
        ids(&crate::pg!().url(&name), "late_events").await,
        vec![1, 2]
    );
    source.drop_slot().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_restore_tenant_is_strict_and_audited_with_the_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::pg!().create_database().await.unwrap();
    execute(&url, SCHEMA).await;
    let map = ConfigBuilder::one_replica("replica")
        .postgres("strict_cli", &url)
        .tenancy_column("tenant_id")
        .tenancy_table("plans", "global")
        .tenancy_table("notes", "contract_id -> contracts.id");
    let config_path = map
        .clone()
        .tenancy_table("webhooks", "global")
        .write(dir.path());
    common::ok(&common::timevault(&config_path, &["init"]));
    common::ok(&common::timevault(
        &config_path,
        &["backup", "--source", "strict_cli"],
    ));
    let restore = |target: &str| {
        common::timevault(
            &config_path,
            &[
                "restore",
                "--source",
                "strict_cli",
                "--at",
                "latest",
                "--to",
                target,
                "--tenant",
                "1",
                "--requested-by",
                "carol",
                "--reason",
                "ticket 19",
            ],
        )
    };
    let target = crate::pg!().url(&unique_name("strict").replace('-', "_"));
    common::ok(&restore(&target));
    assert_eq!(ids(&target, "contracts").await, vec![10, 11]);
    let config = Config::load(&config_path).unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let records = timevault::audit::list(&repo).await.unwrap();
    let restores: Vec<_> = records
        .iter()
        .map(|(_, r)| r)
        .filter(|r| r.command == "restore")
        .collect();
    assert_eq!(restores.len(), 1, "{records:?}");
    assert_eq!(
        restores[0].tenant.as_deref(),
        Some("1"),
        "{:?}",
        restores[0]
    );
    assert_eq!(restores[0].requested_by, "carol");

    // The map lost `webhooks` (a table added to the database after the map was written).
    map.write(dir.path());
    let name = unique_name("strict").replace('-', "_");
    let out = restore(&crate::pg!().url(&name));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("webhooks"), "{stderr}");
    assert!(!database_exists(&name).await);
}

// ---------------------------------------------------------------------------------------------
// hops end on a key

/// Resolve `versions = rule` against `schema`.
fn resolve_hop(schema: &tenancy::Schema, rule: &str) -> timevault::Result<()> {
    let mut tables = BTreeMap::new();
    tables.insert("versions".to_string(), parse_table_rule(rule).unwrap());
    let config = TenancyConfig {
        column: "tenant_id".into(),
        tables,
        blobs: BTreeMap::new(),
        tenant_keys: false,
        keys: Default::default(),
    };
    tenancy::resolve(&config, schema, "db").map(|_| ())
}

fn assert_hops(schema: &tenancy::Schema) {
    for ok in [
        "ref -> contracts.id",
        "code -> contracts.code",
        "ext -> contracts.ext",
    ] {
        resolve_hop(schema, ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for bad in [
        "number -> contracts.number",
        "slug -> contracts.slug",
        "label -> contracts.label",
        "pair_a -> pairs.a",
    ] {
        let err = resolve_hop(schema, bad).expect_err(bad);
        assert_eq!(err.kind(), ErrorKind::Config, "{bad}: {err}");
        let text = err.to_string();
        assert!(text.contains("versions") && text.contains(bad), "{text}");
        assert!(text.contains("unique"), "{text}");
        assert!(
            err.hint().is_some_and(|h| h.contains("UNIQUE")),
            "{bad}: {err:?}"
        );
    }
}

#[tokio::test]
async fn sqlite_hops_must_end_on_a_primary_key_or_unique_column() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hops.db");
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db)
        .create_if_missing(true);
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    let ddl = "
        CREATE TABLE contracts (id INTEGER PRIMARY KEY, tenant_id INTEGER, number TEXT,
            code TEXT UNIQUE, ext TEXT, slug TEXT, label TEXT);
        CREATE UNIQUE INDEX contracts_ext ON contracts (ext);
        CREATE UNIQUE INDEX contracts_slug ON contracts (slug) WHERE slug <> '';
        CREATE UNIQUE INDEX contracts_label ON contracts (lower(label));
        CREATE TABLE pairs (a INTEGER, b INTEGER, tenant_id INTEGER, PRIMARY KEY (a, b));
        CREATE TABLE versions (id INTEGER PRIMARY KEY, ref INTEGER, number TEXT, code TEXT,
            ext TEXT, slug TEXT, label TEXT, pair_a INTEGER);
    ";
    sqlx::raw_sql(ddl).execute(&mut conn).await.unwrap();
    let schema = tenancy::schema::read_sqlite(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    assert_hops(&schema);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_hops_must_end_on_a_primary_key_or_unique_column() {
    let url = crate::pg!().create_database().await.unwrap();
    let ddl = "
        CREATE TABLE contracts (id int PRIMARY KEY, tenant_id int, number text,
            code text UNIQUE, ext text, slug text, label text);
        CREATE UNIQUE INDEX contracts_ext ON contracts (ext);
        CREATE UNIQUE INDEX contracts_slug ON contracts (slug) WHERE slug <> '';
        CREATE UNIQUE INDEX contracts_label ON contracts (lower(label));
        CREATE TABLE pairs (a int, b int, tenant_id int, PRIMARY KEY (a, b));
        CREATE TABLE versions (id int PRIMARY KEY, ref int, number text, code text,
            ext text, slug text, label text, pair_a int);
    ";
    execute(&url, ddl).await;
    let schema = tenancy::schema::read_postgres(&url).await.unwrap();
    assert_hops(&schema);
}

// ---------------------------------------------------------------------------------------------
// export names and CSV cells

/// Every entry of a `.tar.zst`: (path, content).
fn read_archive(path: &Path) -> Vec<(String, Vec<u8>)> {
    let file = std::fs::File::open(path).unwrap();
    let mut archive = tar::Archive::new(zstd::stream::read::Decoder::new(file).unwrap());
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.push((name, data));
    }
    out
}

/// A path a careless unpacker cannot be tricked by: relative, no empty, `.` or `..`
/// component, no backslash, no control character.
fn is_safe(path: &str) -> bool {
    !path.starts_with('/')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
        && !path.contains('\\')
        && !path.chars().any(char::is_control)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_names_are_safe_and_csv_cells_cannot_be_formulas() {
    let env = common::Env::new(19).await;
    let long = format!("t_{}", "x".repeat(120));
    let weird = [
        ("../escape", "..%2Fescape".to_string()),
        ("a/b", "a%2Fb".to_string()),
        ("line\nbreak", "line%0Abreak".to_string()),
        ("\u{1b}[31mred", "%1B[31mred".to_string()),
        ("100%", "100%25".to_string()),
        ("..", "%2E%2E".to_string()),
        (long.as_str(), long.clone()),
    ];
    let mut app = sqlx::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new().filename(&env.db),
    )
    .await
    .unwrap();
    let tenant: i64 = sqlx::query_scalar("SELECT tenant_id FROM tenants ORDER BY tenant_id")
        .fetch_one(&mut app)
        .await
        .unwrap();
    let mut ddl = String::new();
    for (name, _) in &weird {
        let q = format!("\"{}\"", name.replace('"', "\"\""));
        ddl.push_str(&format!(
            "CREATE TABLE {q} (id INTEGER PRIMARY KEY, tenant_id INTEGER, v TEXT);\
             INSERT INTO {q} VALUES (1, {tenant}, 'x');"
        ));
    }
    ddl.push_str(&format!(
        "CREATE TABLE cells (id INTEGER PRIMARY KEY, tenant_id INTEGER, \"=col\" TEXT, n INTEGER, r REAL);\
         INSERT INTO cells VALUES (1, {tenant}, '=1+1', -5, -1.5), (2, {tenant}, '+SUM(A1)', 5, 2.5),\
           (3, {tenant}, '-2+3', 0, 0.5), (4, {tenant}, '@cmd', 0, 0.5), (5, {tenant}, char(9) || 'tab', 0, 0.5),\
           (6, {tenant}, char(13) || 'cr', 0, 0.5), (7, {tenant}, '-12.50', 0, 0.5), (8, {tenant}, 'plain', 0, 0.5),\
           (9, {tenant}, '=HYPERLINK(\"http://x\",\"a,b\")', 0, 0.5);"
    ));
    sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
        .execute(&mut app)
        .await
        .unwrap();
    app.close().await.unwrap();
    let config_path = env.config_builder().fixture_tenancy().write(env.path());
    let config = Config::load(&config_path).unwrap();
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let mut sqlite = SqliteSource::open("app", &env.db, &repo).await.unwrap();
    sqlite.snapshot(&repo).await.unwrap();

    for format in [TableFormat::Csv, TableFormat::Jsonl] {
        let ext = format.extension();
        let out_dir = env.path().join(format!("out-{ext}"));
        std::fs::create_dir_all(&out_dir).unwrap();
        let out = out_dir.join("tenant.tar.zst");
        let options = ExportOptions {
            tenant: tenant.to_string(),
            at: At::Latest,
            out: out.clone(),
            format,
            requested_by: Some("test".into()),
            reason: None,
            encryption: None,
            force: false,
        };
        export::export(&config, &repo, &options)
            .await
            .unwrap_or_else(|e| panic!("{ext}: {e}"));
        let beside: Vec<_> = std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(beside, ["tenant.tar.zst"], "no spool file escaped");
        let entries = read_archive(&out);
        for (path, _) in &entries {
            assert!(is_safe(path), "unsafe entry name {path:?}");
        }
        let content: BTreeMap<&str, &[u8]> = entries
            .iter()
            .map(|(p, d)| (p.as_str(), d.as_slice()))
            .collect();
        // Every table under its encoded name, the manifest naming both.
        let manifest: serde_json::Value = serde_json::from_slice(content["manifest.json"]).unwrap();
        for (name, encoded) in &weird {
            let file = format!("tables/{encoded}.{ext}");
            assert!(content.contains_key(file.as_str()), "{file} in {entries:?}");
            let listed = manifest["tables"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["table"] == *name)
                .unwrap_or_else(|| panic!("{name:?} in the manifest"));
            assert_eq!(listed["file"], file.as_str());
        }
        assert!(format!("tables/{long}.{ext}").len() > 100);
        // SHA256SUMS covers every entry and matches.
        let sums = std::str::from_utf8(content["SHA256SUMS"]).unwrap();
        let mut listed = 0;
        for line in sums.lines() {
            let (hash, path) = line.split_once("  ").unwrap();
            assert_eq!(hash, hex::encode(Sha256::digest(content[path])), "{path}");
            listed += 1;
        }
        assert_eq!(listed, entries.len() - 1);
        let cells = std::str::from_utf8(content[format!("tables/cells.{ext}").as_str()]).unwrap();
        if format == TableFormat::Csv {
            let lines: Vec<&str> = cells.split("\r\n").collect();
            assert_eq!(lines[0], "id,tenant_id,'=col,n,r");
            let t = tenant;
            assert_eq!(lines[1], format!("1,{t},'=1+1,-5,-1.5"));
            assert_eq!(lines[2], format!("2,{t},'+SUM(A1),5,2.5"));
            assert_eq!(lines[3], format!("3,{t},'-2+3,0,0.5"));
            assert_eq!(lines[4], format!("4,{t},'@cmd,0,0.5"));
            assert_eq!(lines[5], format!("5,{t},'\ttab,0,0.5"));
            assert_eq!(lines[6], format!("6,{t},\"'\rcr\",0,0.5"));
            assert_eq!(
                lines[7],
                format!("7,{t},-12.50,0,0.5"),
                "a plain number is data"
            );
            assert_eq!(lines[8], format!("8,{t},plain,0,0.5"));
            assert_eq!(
                lines[9],
                format!("9,{t},\"'=HYPERLINK(\"\"http://x\"\",\"\"a,b\"\")\",0,0.5")
            );
        } else {
            let first: serde_json::Value =
                serde_json::from_str(cells.lines().next().unwrap()).unwrap();
            assert_eq!(first["=col"], "=1+1", "JSON values are never altered");
        }
    }
}
