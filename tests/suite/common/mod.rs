//! Shared setup for timevault's integration tests: a temp directory with a config, two file
//! replicas and a copy of a generated SQLite fixture; the config builder (`config`), the
//! daemon as a process (`daemon`) and what the torture runs share (`torture`).

#![allow(dead_code)]

pub mod cluster;
pub mod config;
pub mod daemon;
pub mod kek_app;
pub mod keyscan;
pub mod torture;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

use config::{ConfigBuilder, Quorum};
use timevault::config::Config;
use timevault_fixtures::{generate_sqlite, Conn, Database, GenerateOptions};

pub struct Env {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
}

impl Env {
    /// A generated scale-1 database and a config with two file replicas.
    pub async fn new(seed: u64) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        generate_sqlite(&db, &GenerateOptions { seed, scale: 1 })
            .await
            .unwrap();
        Env { dir, db }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The config of this database, for a test to add to and write: two sites (write quorum
    /// "all", leases of 5 s), the SQLite source `app` (`app.db`), a snapshot at 02:00 and a
    /// capture every 200 ms.
    pub fn config_builder(&self) -> ConfigBuilder {
        ConfigBuilder::two_sites()
            .write_quorum(Quorum::All)
            .lease_ttl("5s")
            .sqlite("app", "app.db")
            .schedule("snapshot", "0 0 2 * * *")
            .schedule("capture_interval", "200ms")
    }

    /// [`Env::config_builder`] as it is, written to `timevault.toml`.
    pub fn write_config(&self) -> PathBuf {
        self.config_builder().write(self.path())
    }

    pub fn config(&self) -> Config {
        Config::load(&self.write_config()).unwrap()
    }

    pub async fn app(&self) -> Conn {
        Database::Sqlite(self.db.clone()).connect().await.unwrap()
    }
}

/// Per-table checksums of any SQLite file (restored or live).
pub async fn checksums(path: &Path) -> std::collections::BTreeMap<String, String> {
    let mut conn = Database::Sqlite(path.to_path_buf())
        .connect()
        .await
        .unwrap();
    timevault_fixtures::table_checksums(&mut conn)
        .await
        .unwrap()
}

/// The `timevault` binary under test: `$TIMEVAULT_BIN` when set (a copy taken right after
/// the build, when several checkouts share one target directory), else cargo's.
pub fn binary() -> PathBuf {
    std::env::var_os("TIMEVAULT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_timevault")))
}

/// Run the `timevault` binary with `--config`.
pub fn timevault(config: &Path, args: &[&str]) -> Output {
    Command::new(binary())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run timevault")
}

/// [`timevault`] with the AWS environment of the test KMS (moto's, started by the harness).
pub fn timevault_kms(config: &Path, args: &[&str]) -> Output {
    Command::new(binary())
        .arg("--config")
        .arg(config)
        .args(args)
        .envs(timevault_fixtures::harness::s3().kms_env())
        .output()
        .expect("run timevault")
}

/// The earliest restorable instant of `source` after `after`; panics after a minute.
pub async fn captured_within_a_minute(
    config: &timevault::config::Config,
    source: &str,
    after: chrono::DateTime<chrono::Utc>,
) -> chrono::DateTime<chrono::Utc> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    wait_captured(config, source, after, deadline)
        .await
        .expect("the daemon captures within a minute")
}

/// Assert success (printing both streams otherwise) and return stdout.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A new repository in `dir` with one file replica (`replica/`) and a key file, opened with
/// quick retries: the setup of tests that drive a source directly, without the CLI.
pub async fn local_repo(dir: &Path) -> timevault::repo::Repository {
    use timevault::repo::{Repository, RetryPolicy};
    let config = ConfigBuilder::one_replica("replica").parse(dir);
    Repository::init(&config).await.unwrap();
    let retry = RetryPolicy {
        attempts: 2,
        first_backoff: std::time::Duration::from_millis(10),
        max_backoff: std::time::Duration::from_millis(20),
    };
    Repository::open_with(&config, None, retry).await.unwrap()
}

/// `GET path` over plain HTTP/1.1 from the daemon's endpoint: (status, body), or `None` while
/// nothing listens.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// The value of one sample (`name{labels}` exactly as rendered) in Prometheus text.
pub fn metric_sample(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// `table -> "columns | count md5"` for every table in `public` of a PostgreSQL database:
/// equal for two databases that hold the same rows in the same shapes.
pub async fn pg_state(url: &str) -> std::collections::BTreeMap<String, String> {
    use sqlx::{Connection, Row};
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    let tables: Vec<(String, String)> = sqlx::query(
        "SELECT c.relname::text, string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), \
                ', ' ORDER BY a.attnum) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
         WHERE n.nspname = 'public' AND c.relkind = 'r' GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    let mut out = std::collections::BTreeMap::new();
    for (table, columns) in tables {
        let sql = format!(
            "SELECT count(*)::text || ' ' || md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) \
             FROM \"{table}\" t"
        );
        let rows: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        out.insert(table, format!("{columns} | {rows}"));
    }
    conn.close().await.unwrap();
    out
}

/// The PostgreSQL cluster of the calling test module: `postgres_for(module_path!())`. Slot
/// names are cluster-wide and sources in different modules share names (`db`), so each module
/// keeps the cluster it had as a test binary of its own.
#[macro_export]
macro_rules! pg {
    () => {
        timevault_fixtures::harness::postgres_for(module_path!())
    };
}

/// The earliest restorable instant of `source` after `after`, once the daemon has captured past it.
pub async fn wait_captured(
    config: &timevault::config::Config,
    source: &str,
    after: chrono::DateTime<chrono::Utc>,
    deadline: std::time::Instant,
) -> Option<chrono::DateTime<chrono::Utc>> {
    while std::time::Instant::now() < deadline {
        if let Ok(repo) = timevault::repo::Repository::open(config).await {
            if let Ok(catalog) = timevault::catalog::SourceCatalog::load(&repo, source).await {
                let first = catalog
                    .chains
                    .iter()
                    .flat_map(|c| {
                        std::iter::once(c.start()).chain(c.segments.iter().map(|s| s.captured_at))
                    })
                    .filter(|t| *t > after)
                    .min();
                if first.is_some() {
                    return first;
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    None
}

/// A child process (a daemon, a `psql` session, a writer) killed with SIGKILL and reaped when
/// the test ends, also when it fails half way, so nothing outlives the test. Waiting for it
/// first is fine: a child already reaped is never signalled (its pid may be another's by then).
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Run one SQL string with psql (its own process); returns the unaligned output.
pub fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .output()
        .expect("psql is installed with PostgreSQL 15 (.ci/install-deps)");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Drop a replication slot as an operator must while a consumer streams from it: terminate
/// the server process holding it, then drop it (retried while the holder exits or a daemon
/// reconnects in between). Panics after 20 s.
pub fn drop_slot(url: &str, slot: &str) {
    let sql = format!(
        "DO $$ BEGIN \
           PERFORM pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = '{slot}' AND active_pid IS NOT NULL; \
           PERFORM pg_sleep(0.05); \
           PERFORM pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = '{slot}'; \
         END $$"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let out = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", &sql])
            .output()
            .expect("psql is installed with PostgreSQL 15 (.ci/install-deps)");
        if out.status.success() {
            return;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("is active for PID") && std::time::Instant::now() < deadline,
            "dropping slot {slot}: {stderr}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Copy the directory tree `from` to `to` (created).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        if path.is_dir() {
            copy_dir(&path, &to.join(entry.file_name()));
        } else {
            std::fs::copy(&path, to.join(entry.file_name())).unwrap();
        }
    }
}
