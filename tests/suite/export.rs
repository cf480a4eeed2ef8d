//! Tenant export end to end on SQLite + blobs: every tenant of the fixture at several instants
//! of the workload, checked row by row and file by file against copies of the source taken at
//! those instants; isolation over all pairs; SHA256SUMS with `sha256sum -c`; age encryption
//! with the `age` CLI; the audit log; and the errors.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use common::config::ConfigBuilder;
use common::{ok, timevault, Env};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{Connection, Row};
use timevault::catalog::SourceCatalog;
use timevault::config::Config;
use timevault::export::{self, ExportOptions, TableFormat};
use timevault::repo::Repository;
use timevault::source::blobs::BlobSource;
use timevault::source::sqlite::SqliteSource;
use timevault::time::At;
use timevault::ErrorKind;
use timevault_fixtures::schema::{quote_ident, ColumnType, Table, Tenancy, TABLES};
use timevault_fixtures::{generate_blobs, StoreUrl, Workload};

/// The blob source `files` (`files/`) and the fixture's tenancy, its files under
/// `tenants/<tenant>/`.
fn with_files_and_tenancy(config: ConfigBuilder) -> ConfigBuilder {
    config
        .blobs("files", "files")
        .fixture_tenancy()
        .tenancy_blobs("files", "prefix:tenants/{tenant}/")
}

/// Rows per table (canonical JSON text, sorted) and files (key → sha256) of some data.
#[derive(Debug, Default, Clone, PartialEq)]
struct Data {
    tables: BTreeMap<String, Vec<String>>,
    files: BTreeMap<String, String>,
}

/// The source as it was at an instant: a copy of the database and the blob files' hashes.
struct Point {
    at: DateTime<Utc>,
    db: PathBuf,
    files: BTreeMap<String, String>,
}

struct Setup {
    env: Env,
    config: Config,
    config_path: PathBuf,
    repo: Repository,
    sqlite: SqliteSource,
    blobs: BlobSource,
    files_dir: PathBuf,
}

async fn setup(seed: u64) -> Setup {
    let env = Env::new(seed).await;
    let files_dir = env.path().join("files");
    let url = StoreUrl::local_dir(&files_dir).unwrap();
    generate_blobs(
        &url.open().unwrap(),
        &timevault_fixtures::GenerateOptions { seed, scale: 1 },
    )
    .await
    .unwrap();
    let config_path = with_files_and_tenancy(env.config_builder()).write(env.path());
    let config = Config::load(&config_path).unwrap();
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let sqlite = SqliteSource::open("app", &env.db, &repo).await.unwrap();
    let blobs = BlobSource::open("files", &url.url, &url.options, &repo)
        .await
        .unwrap();
    Setup {
        env,
        config,
        config_path,
        repo,
        sqlite,
        blobs,
        files_dir,
    }
}

impl Setup {
    /// Scan the blobs, capture the database, and keep a copy of both as of the capture.
    async fn point(&mut self, name: &str, snapshot: bool) -> Point {
        self.blobs.scan(&self.repo).await.unwrap();
        if snapshot {
            self.sqlite.snapshot(&self.repo).await.unwrap();
        } else {
            self.sqlite.capture(&self.repo).await.unwrap();
        }
        let at = SourceCatalog::load(&self.repo, "app")
            .await
            .unwrap()
            .newest()
            .unwrap();
        let db = self.env.path().join(format!("copy-{name}.db"));
        let mut conn = sqlite(&self.env.db, false).await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "VACUUM INTO '{}'",
            db.display()
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
        Point {
            at,
            db,
            files: file_hashes(&self.files_dir),
        }
    }
}

async fn sqlite(path: &Path, read_only: bool) -> sqlx::SqliteConnection {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .read_only(read_only);
    sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap()
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// key (relative to `dir`) → sha256 of every file under `dir`.
fn file_hashes(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let key = p.strip_prefix(dir).unwrap().to_string_lossy().to_string();
                out.insert(key, sha256_file(&p));
            }
        }
    }
    out
}

/// The expression that renders a column as text in the copy (or NULL), per engine.
fn column_text(column: &str, ty: ColumnType, pg: bool) -> String {
    let c = format!("t.{}", quote_ident(column));
    match (ty, pg) {
        // hex(NULL) is '' in SQLite.
        (ColumnType::Bytea, false) => format!("CASE WHEN {c} IS NULL THEN NULL ELSE hex({c}) END"),
        (ColumnType::Bytea, true) => format!("encode({c}, 'hex')"),
        (ColumnType::TextArray | ColumnType::BigIntArray, true) => format!("to_jsonb({c})::text"),
        (ColumnType::Timestamptz, true) => {
            format!("to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
        }
        _ => format!("CAST({c} AS TEXT)"),
    }
}

/// The value the export must write for a column of the fixture type (independent of the
/// exporter's rendering code).
fn expected_value(text: Option<String>, ty: ColumnType) -> Value {
    let Some(text) = text else {
        return Value::Null;
    };
    match ty {
        ColumnType::Int | ColumnType::BigInt => Value::from(text.parse::<i64>().unwrap()),
        ColumnType::Bool => Value::Bool(text == "1" || text == "true"),
        ColumnType::Jsonb | ColumnType::TextArray | ColumnType::BigIntArray => {
            serde_json::from_str(&text).unwrap()
        }
        ColumnType::Bytea => Value::String(
            base64::engine::general_purpose::STANDARD
                .encode(hex::decode(text.to_lowercase()).unwrap()),
        ),
        _ => Value::String(text),
    }
}

/// The SQL giving each row's tenant, as the fixture's schema defines it.
fn tenant_expr(table: &Table) -> Option<String> {
    match table.tenancy {
        Tenancy::Global => None,
        Tenancy::Column(c) => Some(format!("t.{}", quote_ident(c))),
        Tenancy::Parent { column, table, key } => Some(format!(
            "(SELECT p.\"tenant_id\" FROM {} p WHERE p.{} = t.{})",
            quote_ident(table),
            quote_ident(key),
            quote_ident(column)
        )),
    }
}

/// Rows by tenant and the global tables' rows, as canonical JSON text.
#[derive(Default)]
struct Oracle {
    tenants: BTreeMap<String, Data>,
    global: BTreeMap<String, Vec<String>>,
}

impl Oracle {
    /// The query rendering every column of `table` and, last, the row's tenant.
    fn sql(table: &Table, pg: bool) -> String {
        let mut select: Vec<String> = table
            .columns
            .iter()
            .map(|c| column_text(c.name, c.ty, pg))
            .collect();
        select.push(format!(
            "CAST({} AS TEXT)",
            tenant_expr(table).unwrap_or("NULL".into())
        ));
        format!(
            "SELECT {} FROM {} t",
            select.join(", "),
            quote_ident(table.name)
        )
    }

    fn add(&mut self, table: &Table, texts: Vec<Option<String>>) {
        let mut object = serde_json::Map::new();
        for (c, text) in table.columns.iter().zip(texts.iter()) {
            object.insert(c.name.into(), expected_value(text.clone(), c.ty));
        }
        let text = Value::Object(object).to_string();
        match (table.tenancy, texts[table.columns.len()].clone()) {
            (Tenancy::Global, _) => self
                .global
                .entry(table.name.to_string())
                .or_default()
                .push(text),
            (_, Some(t)) => self
                .tenants
                .entry(t)
                .or_default()
                .tables
                .entry(table.name.to_string())
                .or_default()
                .push(text),
            (_, None) => panic!("row of {} belongs to no tenant: {text}", table.name),
        }
    }

    fn finish(mut self) -> (BTreeMap<String, Data>, BTreeMap<String, Vec<String>>) {
        for data in self.tenants.values_mut() {
            data.tables.values_mut().for_each(|v| v.sort());
        }
        self.global.values_mut().for_each(|v| v.sort());
        (self.tenants, self.global)
    }
}

/// Per tenant, the rows of every tenant table of a SQLite copy; and the global tables' rows.
async fn expected_rows(db: &Path) -> (BTreeMap<String, Data>, BTreeMap<String, Vec<String>>) {
    let mut conn = sqlite(db, true).await;
    let mut oracle = Oracle::default();
    for table in TABLES {
        let rows = sqlx::query(sqlx::AssertSqlSafe(Oracle::sql(table, false)))
            .fetch_all(&mut conn)
            .await
            .unwrap();
        for row in rows {
            let texts = (0..=table.columns.len()).map(|i| row.get(i)).collect();
            oracle.add(table, texts);
        }
    }
    conn.close().await.unwrap();
    oracle.finish()
}

/// The same, read from a live PostgreSQL database.
async fn expected_rows_pg(url: &str) -> (BTreeMap<String, Data>, BTreeMap<String, Vec<String>>) {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let mut oracle = Oracle::default();
    for table in TABLES {
        let rows = sqlx::query(sqlx::AssertSqlSafe(Oracle::sql(table, true)))
            .fetch_all(&mut conn)
            .await
            .unwrap();
        for row in rows {
            let texts = (0..=table.columns.len()).map(|i| row.get(i)).collect();
            oracle.add(table, texts);
        }
    }
    conn.close().await.unwrap();
    oracle.finish()
}

/// Unpack an archive (`tar --zstd`), run `sha256sum -c`, and read what it holds.
fn unpack_and_read(archive: &Path, into: &Path) -> Data {
    std::fs::create_dir_all(into).unwrap();
    let tar = Command::new("tar")
        .arg("--zstd")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .output()
        .unwrap();
    assert!(
        tar.status.success(),
        "{}",
        String::from_utf8_lossy(&tar.stderr)
    );
    let check = Command::new("sha256sum")
        .args(["-c", "--strict", "SHA256SUMS"])
        .current_dir(into)
        .output()
        .expect("sha256sum (coreutils) is installed");
    assert!(
        check.status.success(),
        "sha256sum -c: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    read_unpacked(into)
}

fn read_unpacked(dir: &Path) -> Data {
    let mut data = Data::default();
    for e in std::fs::read_dir(dir.join("tables")).unwrap() {
        let p = e.unwrap().path();
        let table = p.file_stem().unwrap().to_string_lossy().to_string();
        let mut rows: Vec<String> = std::fs::read_to_string(&p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap().to_string())
            .collect();
        rows.sort();
        if !rows.is_empty() {
            data.tables.insert(table, rows);
        }
    }
    if dir.join("files").exists() {
        data.files = file_hashes(&dir.join("files"));
    }
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    for t in manifest["tables"].as_array().unwrap() {
        let rows = data
            .tables
            .get(t["table"].as_str().unwrap())
            .map_or(0, Vec::len);
        assert_eq!(t["rows"].as_u64().unwrap() as usize, rows, "{t}");
    }
    for f in manifest["files"].as_array().unwrap() {
        let key = f["key"].as_str().unwrap();
        assert_eq!(
            data.files.get(key).map(String::as_str),
            f["sha256"].as_str(),
            "{key}"
        );
    }
    data
}

/// The data of every tenant at an instant, taken from the source itself.
struct Expected {
    at: DateTime<Utc>,
    tenants: BTreeMap<String, Data>,
    global: BTreeMap<String, Vec<String>>,
    files: BTreeMap<String, String>,
}

/// Export every tenant (1001..=1012) at every instant and compare with the source; returns
/// whether some tenant had no data (its export must be an error).
async fn check_every_tenant(
    config: &Config,
    repo: &Repository,
    points: &[Expected],
    out: &Path,
) -> bool {
    std::fs::create_dir_all(out).unwrap();
    let mut deleted_tenant_seen = false;
    for (i, p) in points.iter().enumerate() {
        let mut exported: BTreeMap<String, Data> = BTreeMap::new();
        for tenant in 1001..=1012 {
            let tenant = tenant.to_string();
            let file = out.join(format!("p{i}-{tenant}.tar.zst"));
            let result = export::export(
                config,
                repo,
                &ExportOptions {
                    tenant: tenant.clone(),
                    at: At::Instant(p.at),
                    out: file.clone(),
                    format: TableFormat::Jsonl,
                    requested_by: Some("test".into()),
                    reason: Some("every tenant".into()),
                    encryption: None,
                    force: false,
                },
            )
            .await;
            let Some(mut want) = p.tenants.get(&tenant).cloned() else {
                let err = result.expect_err("a tenant without rows is an error");
                assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
                assert!(!file.exists());
                deleted_tenant_seen = true;
                continue;
            };
            result.unwrap();
            let got = unpack_and_read(&file, &out.join(format!("p{i}-{tenant}")));
            let prefix = format!("tenants/{tenant}/");
            want.files = p
                .files
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            assert_eq!(
                got.tables.keys().collect::<Vec<_>>(),
                want.tables.keys().collect::<Vec<_>>(),
                "point {i} tenant {tenant}: tables"
            );
            for (table, rows) in &want.tables {
                same_rows(
                    &got.tables[table],
                    rows,
                    &format!("point {i} tenant {tenant} table {table} at {}", p.at),
                );
            }
            assert_eq!(got.files, want.files, "point {i} tenant {tenant}: files");
            assert!(!got.tables.contains_key("plans"), "global table exported");
            exported.insert(tenant, got);
        }
        // Isolation over all pairs: no row or file of one tenant's export is in another's.
        for (a, da) in &exported {
            for (b, db) in exported.iter().filter(|(b, _)| *b > a) {
                for (table, rows) in &da.tables {
                    let other: BTreeSet<&String> =
                        db.tables.get(table).into_iter().flatten().collect();
                    assert!(
                        rows.iter().all(|r| !other.contains(r)),
                        "tenants {a} and {b} share rows of {table}"
                    );
                }
                assert!(
                    da.files.keys().all(|k| !db.files.contains_key(k)),
                    "tenants {a} and {b} share files"
                );
            }
        }
        // The union of all exports plus the global tables is the whole database and store.
        let mut union: BTreeMap<String, Vec<String>> = p.global.clone();
        let mut all = p.global.clone();
        let mut files = BTreeMap::new();
        for d in exported.values() {
            for (t, rows) in &d.tables {
                union
                    .entry(t.clone())
                    .or_default()
                    .extend(rows.iter().cloned());
            }
            files.extend(d.files.clone());
        }
        for d in p.tenants.values() {
            for (t, rows) in &d.tables {
                all.entry(t.clone())
                    .or_default()
                    .extend(rows.iter().cloned());
            }
        }
        union.values_mut().for_each(|v| v.sort());
        all.values_mut().for_each(|v| v.sort());
        assert!(
            union == all,
            "point {i}: the union of the exports is not the whole database"
        );
        assert_eq!(
            files, p.files,
            "point {i}: union of exported files != the store"
        );
    }
    deleted_tenant_seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tenant_at_every_instant_is_exact_complete_and_isolated() {
    let mut s = setup(42).await;
    let mut points = vec![s.point("baseline", true).await];
    let blob_location = StoreUrl::local_dir(&s.files_dir).unwrap().open().unwrap();
    let mut app = s.env.app().await;
    let mut workload = Workload::new(42, 1).with_bulk_rows(2_000);
    // 0 insert, 1 metadata, 2 bodies, 3 deletions, 4 blob churn, 5 bulk insert, 6 tenant deleted.
    for step in 0..7 {
        workload.step(&mut app, Some(&blob_location)).await.unwrap();
        let point = s.point(&format!("step{step}"), false).await;
        if [3, 4, 6].contains(&step) {
            points.push(point);
        }
    }
    // The blob window must reach the last capture.
    s.blobs.scan(&s.repo).await.unwrap();
    let mut expected = Vec::new();
    for p in &points {
        let (tenants, global) = expected_rows(&p.db).await;
        expected.push(Expected {
            at: p.at,
            tenants,
            global,
            files: p.files.clone(),
        });
    }
    let deleted =
        check_every_tenant(&s.config, &s.repo, &expected, &s.env.path().join("exports")).await;
    assert!(deleted, "the workload deleted a tenant");
    s.sqlite.close(&s.repo).await.unwrap();
}

/// Equal sorted row lists; on failure, show the first rows that differ.
fn same_rows(got: &[String], want: &[String], what: &str) {
    if got == want {
        return;
    }
    let g: BTreeSet<&String> = got.iter().collect();
    let w: BTreeSet<&String> = want.iter().collect();
    let extra: Vec<_> = g.difference(&w).take(2).collect();
    let missing: Vec<_> = w.difference(&g).take(2).collect();
    panic!(
        "{what}: {} rows exported, {} expected\nexported but not in the source: {extra:#?}\nin the source but not exported: {missing:#?}",
        got.len(),
        want.len()
    );
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".timevault-export-"))
        .collect()
}

fn fails(out: &std::process::Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_export_encrypts_with_age_is_audited_and_refuses_bad_requests() {
    let mut s = setup(7).await;
    let p = s.point("only", true).await;
    s.blobs.scan(&s.repo).await.unwrap();
    s.sqlite.close(&s.repo).await.unwrap();
    let at = p.at.to_rfc3339();
    let out = s.env.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let cfg = &s.config_path;

    // Encrypted for an age recipient: the age CLI decrypts it, SHA256SUMS verifies.
    let key = s.env.path().join("customer.key");
    let keygen = Command::new("age-keygen")
        .arg("-o")
        .arg(&key)
        .output()
        .expect("age-keygen (Debian package age) is installed");
    assert!(keygen.status.success());
    let recipient = std::fs::read_to_string(&key)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("# public key: ").map(str::to_string))
        .unwrap();
    let sealed = out.join("t1003.tar.zst.age");
    let args = [
        "export",
        "--tenant",
        "1003",
        "--at",
        &at,
        "--out",
        sealed.to_str().unwrap(),
        "--recipient",
        &recipient,
        "--requested-by",
        "alice",
        "--reason",
        "GDPR request",
    ];
    ok(&timevault(cfg, &args));
    let plain = out.join("t1003.tar.zst");
    let age = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(&key)
        .arg("-o")
        .arg(&plain)
        .arg(&sealed)
        .output()
        .expect("age (Debian package age) is installed");
    assert!(
        age.status.success(),
        "{}",
        String::from_utf8_lossy(&age.stderr)
    );
    let (expected, _) = expected_rows(&p.db).await;
    let got = unpack_and_read(&plain, &out.join("t1003"));
    assert_eq!(got.tables, expected["1003"].tables);
    assert!(!got.files.is_empty());

    // An existing output is refused and left as it was.
    let before = sha256_file(&sealed);
    fails(&timevault(cfg, &args), 8, "already exists");
    assert_eq!(sha256_file(&sealed), before);

    // CSV with a header row; a passphrase from the environment (decrypted with the age crate:
    // the age CLI reads passphrases only from a terminal).
    let csv = out.join("t1003-csv.tar.zst.age");
    let exported = Command::new(env!("CARGO_BIN_EXE_timevault"))
        .arg("--config")
        .arg(cfg)
        .args([
            "export",
            "--tenant",
            "1003",
            "--at",
            &at,
            "--format",
            "csv",
            "--passphrase-env",
            "CUSTOMER_PASS",
            "--out",
        ])
        .arg(&csv)
        .env("CUSTOMER_PASS", "correct horse battery staple")
        .output()
        .unwrap();
    ok(&exported);
    let decryptor = age::Decryptor::new(std::fs::File::open(&csv).unwrap()).unwrap();
    let identity = age::scrypt::Identity::new("correct horse battery staple".to_string().into());
    let reader = decryptor
        .decrypt(std::iter::once(&identity as &dyn age::Identity))
        .unwrap();
    let mut archive = tar::Archive::new(zstd::stream::read::Decoder::new(reader).unwrap());
    let mut names = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().to_string();
        if name == "tables/contracts.csv" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
            assert!(
                text.starts_with("id,tenant_id,public_id,title,"),
                "{}",
                &text[..80]
            );
        }
        names.push(name);
    }
    assert_eq!(names.first().map(String::as_str), Some("README.txt"));
    assert_eq!(names.last().map(String::as_str), Some("SHA256SUMS"));
    assert!(names.contains(&"manifest.json".to_string()));

    // Unknown tenant, a time outside the window, an unreadable time: errors, no file left.
    let none = out.join("none.tar.zst");
    let n = none.to_str().unwrap();
    fails(
        &timevault(
            cfg,
            &["export", "--tenant", "424242", "--at", &at, "--out", n],
        ),
        7,
        "tenant 424242 has no rows",
    );
    fails(
        &timevault(
            cfg,
            &[
                "export",
                "--tenant",
                "1003",
                "--at",
                "2001-01-01T00:00:00Z",
                "--out",
                n,
            ],
        ),
        7,
        "restorable",
    );
    fails(
        &timevault(
            cfg,
            &[
                "export",
                "--tenant",
                "1003",
                "--at",
                "yesterday",
                "--out",
                n,
            ],
        ),
        2,
        "cannot read the time",
    );
    assert!(!none.exists());
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));

    // A table the map does not cover is named, at init and at export.
    let unmapped = s
        .env
        .config_builder()
        .blobs("files", "files")
        .tenancy_column("tenant_id")
        .tenancy_table("plans", "global")
        .tenancy_blobs("files", "prefix:tenants/{tenant}/")
        .write_as(&s.env.path().join("unmapped.toml"));
    fails(&timevault(&unmapped, &["init"]), 2, "contract_versions");
    fails(
        &timevault(
            &unmapped,
            &["export", "--tenant", "1003", "--at", &at, "--out", n],
        ),
        2,
        "unmapped table(s) in source app: contract_versions",
    );
    // A path that is not a path is refused when the config loads, with file and line (the
    // mistake is made in the text, as a person would make it).
    let bad = s.env.path().join("bad.toml");
    let text = with_files_and_tenancy(s.env.config_builder())
        .text()
        .replace("contract_id -> contracts.id", "contract_id => contracts.id");
    let line = text.lines().position(|l| l.contains("=>")).unwrap() + 1;
    std::fs::write(&bad, text).unwrap();
    fails(
        &timevault(&bad, &["audit"]),
        2,
        &format!("bad.toml:{line}:"),
    );
    assert!(leftovers(&out).is_empty());

    // The audit log: both exports and a restore, with who, why, what and the checksum.
    let restored = s.env.path().join("restored.db");
    ok(&timevault(
        cfg,
        &[
            "restore",
            "--source",
            "app",
            "--at",
            &at,
            "--to",
            restored.to_str().unwrap(),
            "--requested-by",
            "bob",
            "--reason",
            "drill",
        ],
    ));
    let log: Vec<Value> = serde_json::from_str(&ok(&timevault(cfg, &["audit", "--json"]))).unwrap();
    let exports: Vec<&Value> = log.iter().filter(|r| r["command"] == "export").collect();
    assert_eq!(exports.len(), 2, "{log:#?}");
    assert_eq!(exports[0]["requested_by"], "alice");
    assert_eq!(exports[0]["reason"], "GDPR request");
    assert_eq!(exports[0]["tenant"], "1003");
    let instant = DateTime::parse_from_rfc3339(exports[0]["instant"].as_str().unwrap()).unwrap();
    assert_eq!(instant, p.at);
    assert_eq!(exports[0]["output_sha256"].as_str().unwrap(), before);
    assert_eq!(exports[0]["sources"], serde_json::json!(["app", "files"]));
    let restores: Vec<&Value> = log.iter().filter(|r| r["command"] == "restore").collect();
    assert_eq!(restores.len(), 1);
    assert_eq!(restores[0]["requested_by"], "bob");
    assert_eq!(restores[0]["reason"], "drill");
    assert!(ok(&timevault(cfg, &["audit"])).contains("tenant 1003"));
    // Replicated like everything else: every replica holds every record.
    for replica in ["eu-west", "eu-north"] {
        let dir = s.env.path().join("replicas").join(replica).join("audit");
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 3, "{replica}");
    }

    // `table:` blob rule: the files are exactly the keys the tenant's attachments list.
    let by_table = with_files_and_tenancy(s.env.config_builder())
        .tenancy_blobs("files", "table:attachments.blob_key")
        .write_as(&s.env.path().join("by-table.toml"));
    let config = Config::load(&by_table).unwrap();
    let archive = out.join("by-table.tar.zst");
    export::export(
        &config,
        &s.repo,
        &ExportOptions {
            tenant: "1003".into(),
            at: At::Instant(p.at),
            out: archive.clone(),
            format: TableFormat::Jsonl,
            requested_by: None,
            reason: None,
            encryption: None,
            force: false,
        },
    )
    .await
    .unwrap();
    let got = unpack_and_read(&archive, &out.join("by-table"));
    let mut conn = sqlite(&p.db, true).await;
    let keys: Vec<String> =
        sqlx::query_scalar("SELECT blob_key FROM attachments WHERE tenant_id = 1003 ORDER BY 1")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert!(!keys.is_empty());
    assert_eq!(got.files.keys().cloned().collect::<Vec<_>>(), keys);
}

/// A random schema for the property test: table `t0` has the tenant column; every later table
/// either has it too or points at an earlier table (`p -> tJ.id`), so paths of any depth occur.
#[derive(Debug, Clone)]
struct RandomTable {
    /// `None`: the table has `tenant_id`; `Some(j)`: it points at table `j < i`.
    parent: Option<usize>,
    /// Map the full path explicitly (all hops) instead of one hop to a mapped table.
    explicit: bool,
    /// Per row: the tenant (1..=3) or the parent id (1..=7; may point at no row).
    rows: Vec<i64>,
}

fn random_tables() -> impl proptest::strategy::Strategy<Value = Vec<RandomTable>> {
    use proptest::prelude::*;
    proptest::collection::vec(
        (
            any::<u8>(),
            any::<usize>(),
            any::<bool>(),
            proptest::collection::vec(1i64..=7, 0..7),
        ),
        1..7,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (kind, parent, explicit, rows))| {
                let parent = (i > 0 && kind % 3 != 0).then(|| parent % i);
                let rows = match parent {
                    None => rows.into_iter().map(|r| r % 3 + 1).collect(),
                    Some(_) => rows,
                };
                RandomTable {
                    parent,
                    explicit,
                    rows,
                }
            })
            .collect()
    })
}

/// The tenant of row `id` (1-based) of table `i`, following parents; `None` if a link dangles.
fn row_tenant(tables: &[RandomTable], i: usize, id: usize) -> Option<i64> {
    let value = *tables[i].rows.get(id - 1)?;
    match tables[i].parent {
        None => Some(value),
        Some(j) => row_tenant(tables, j, value as usize),
    }
}

/// `p -> tJ.id`, or every hop down to a table with the column.
fn path_rule(tables: &[RandomTable], i: usize) -> String {
    let mut hops = Vec::new();
    let mut current = i;
    while let Some(j) = tables[current].parent {
        hops.push(format!("p -> t{j}.id"));
        if !tables[i].explicit {
            break;
        }
        current = j;
    }
    hops.join(", ")
}

async fn isolation_holds(tables: Vec<RandomTable>) {
    use timevault::tenancy::{self, parse_table_rule, TenancyConfig};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("random.db");
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db)
        .create_if_missing(true);
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    let mut statements = vec![
        "CREATE TABLE g (id INTEGER PRIMARY KEY, name TEXT)".to_string(),
        "INSERT INTO g VALUES (1, 'shared')".into(),
    ];
    for (i, t) in tables.iter().enumerate() {
        let link = if t.parent.is_some() { "p" } else { "tenant_id" };
        statements.push(format!(
            "CREATE TABLE t{i} (id INTEGER PRIMARY KEY, {link} INTEGER, payload TEXT)"
        ));
        for (r, value) in t.rows.iter().enumerate() {
            statements.push(format!(
                "INSERT INTO t{i} VALUES ({}, {value}, 't{i}-{}')",
                r + 1,
                r + 1
            ));
        }
    }
    for sql in statements {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let mut map = BTreeMap::from([("g".to_string(), parse_table_rule("global").unwrap())]);
    for (i, t) in tables.iter().enumerate() {
        if t.parent.is_some() {
            map.insert(
                format!("t{i}"),
                parse_table_rule(&path_rule(&tables, i)).unwrap(),
            );
        }
    }
    let config = TenancyConfig {
        column: "tenant_id".into(),
        tables: map,
        blobs: BTreeMap::new(),
        tenant_keys: false,
        keys: Default::default(),
    };
    let schema = tenancy::schema::read_sqlite(&mut conn).await.unwrap();
    let resolved = tenancy::resolve(&config, &schema, "random").unwrap();

    let mut union = BTreeSet::new();
    for tenant in 1..=4i64 {
        let out = dir.path().join(format!("tenant{tenant}"));
        std::fs::create_dir_all(&out).unwrap();
        let files = export::rows::write_tables(
            export::rows::DbConn::Sqlite(&mut conn),
            &schema,
            &resolved,
            &tenant.to_string(),
            TableFormat::Jsonl,
            "random",
            "",
            &out,
        )
        .await
        .unwrap();
        let mut got = BTreeSet::new();
        for f in &files {
            assert_ne!(f.table, "g", "a global table was exported");
            for line in std::fs::read_to_string(&f.spool).unwrap().lines() {
                let row: Value = serde_json::from_str(line).unwrap();
                let i: usize = f.table[1..].parse().unwrap();
                let id = row["id"].as_u64().unwrap() as usize;
                // Isolation: the row's tenant, found by following its links, is this tenant.
                assert_eq!(
                    row_tenant(&tables, i, id),
                    Some(tenant),
                    "{} row {id} in tenant {tenant}'s export",
                    f.table
                );
                assert!(got.insert((i, id)), "row exported twice");
            }
        }
        union.extend(got);
    }
    // Completeness: every row that belongs to a tenant is in that tenant's export.
    let all: BTreeSet<(usize, usize)> = tables
        .iter()
        .enumerate()
        .flat_map(|(i, t)| (1..=t.rows.len()).map(move |id| (i, id)))
        .filter(|&(i, id)| row_tenant(&tables, i, id).is_some())
        .collect();
    assert_eq!(union, all);
    conn.close().await.unwrap();
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    #[test]
    fn random_tenancy_paths_never_leak_rows(tables in random_tables()) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(isolation_holds(tables));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_every_tenant_at_every_instant_is_exact_complete_and_isolated() {
    use timevault::source::postgres::PostgresSource;
    let url = crate::pg!().create_database().await.unwrap();
    let options = timevault_fixtures::GenerateOptions { seed: 42, scale: 1 };
    timevault_fixtures::generate_postgres(&url, &options)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files_dir = dir.path().join("files");
    let files = StoreUrl::local_dir(&files_dir).unwrap();
    let location = files.open().unwrap();
    generate_blobs(&location, &options).await.unwrap();
    let config = with_files_and_tenancy(
        ConfigBuilder::new()
            .key_file("timevault.key")
            .lease_ttl("5s")
            .replica("eu-west", "westeurope", "replicas/eu-west")
            .postgres("db", &url),
    )
    .load(dir.path());
    Repository::init(&config).await.unwrap();
    let repo = Repository::open(&config).await.unwrap();
    let mut db = PostgresSource::open("db", &url, &repo).await.unwrap();
    db.snapshot(&repo).await.unwrap();
    let mut blobs = BlobSource::open("files", &files.url, &files.options, &repo)
        .await
        .unwrap();
    let mut app = timevault_fixtures::Database::Postgres(url.clone())
        .connect()
        .await
        .unwrap();
    let mut workload = Workload::new(42, 1).with_bulk_rows(2_000);
    let mut expected = Vec::new();
    for step in 0..8 {
        if step > 0 {
            workload.step(&mut app, Some(&location)).await.unwrap();
        }
        blobs.scan(&repo).await.unwrap();
        db.capture(&repo).await.unwrap();
        // Baseline, deletions, blob churn, a tenant removed.
        if [0, 4, 5, 7].contains(&step) {
            let at = SourceCatalog::load(&repo, "db")
                .await
                .unwrap()
                .newest()
                .unwrap();
            let (tenants, global) = expected_rows_pg(&url).await;
            expected.push(Expected {
                at,
                tenants,
                global,
                files: file_hashes(&files_dir),
            });
        }
    }
    blobs.scan(&repo).await.unwrap();
    let deleted = check_every_tenant(&config, &repo, &expected, &dir.path().join("exports")).await;
    assert!(deleted, "the workload deleted a tenant");
    db.close(&repo).await.unwrap();
    // No scratch database is left behind.
    let mut admin = sqlx::PgConnection::connect(&crate::pg!().admin_url())
        .await
        .unwrap();
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_database WHERE datname LIKE 'timevault_export_%'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(left, 0);
}
