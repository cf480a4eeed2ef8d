//! Loading a snapshot's rows on several connections at once, each table's keys built as soon
//! as its rows are in.
//!
//! One COPY FROM STDIN is bounded by one server backend (parsing, heap inserts) and one client
//! thread (reading, unsealing, checking chunks). The tables are bare while rows load (keys and
//! indexes come after), so concurrent COPYs into one table do not contend on index pages: the
//! chunks of every table are cut into runs of at most [`RUN_BYTES`] and `workers` connections
//! take runs from one queue, largest tables first. Chunks hold whole rows and a heap has no
//! order, so any split loads the same rows.
//!
//! A table's key build (a sort of all its rows) waits for nothing but that table's rows, so,
//! as `pg_restore -j` schedules its items, it is queued the moment the table's last run ends
//! and taken before any further run: the largest table's key sorts on one connection while
//! the others load the rest, instead of every connection waiting for the last run first.
//!
//! Tenant-grouped snapshots hold many small chunks (one tenant's rows of one table each):
//! a run reads up to [`READ_AHEAD_BYTES`] of chunks ahead of the one being sent, so a small
//! chunk's read latency overlaps the COPY instead of adding to it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures::stream::{self, StreamExt, TryStreamExt};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection;
use tokio::sync::Notify;

use super::binary::{self, RowCodec};
use crate::error::{Error, Result};
use crate::pg_connection::quote_ident;
use crate::repo::{ChunkRef, Repository};
use crate::stored::postgres::{chunk_ids_digest, IMAGE_DIGEST_CHUNK_IDS};
use crate::stored::postgres::{PostgresSnapshotDetails, TableImage};
use crate::work;

/// Bytes of rows per unit of work (one COPY statement).
pub const RUN_BYTES: u64 = 64 << 20;

/// Bytes of chunks a run reads ahead of the one it is sending.
pub const READ_AHEAD_BYTES: u64 = 16 << 20;

/// Chunks a run reads ahead at most, however small they are.
const READ_AHEAD_CHUNKS: usize = 32;

/// Whether the snapshot's `sha256` covers chunk ids (parallel snapshots) rather than rows.
pub fn digest_is_chunk_ids(details: &PostgresSnapshotDetails) -> bool {
    details.image_digest.as_deref() == Some(IMAGE_DIGEST_CHUNK_IDS)
}

/// Check a chunk-ids digest against the manifest's table images before anything is read.
pub fn check_chunk_ids(details: &PostgresSnapshotDetails, expected: &str, key: &str) -> Result<()> {
    let actual = chunk_ids_digest(details.tables.iter().flat_map(|t| t.chunks.iter()));
    if actual != expected {
        return Err(Error::corrupt(format!(
            "snapshot {key}: its table images do not match its SHA-256"
        )));
    }
    Ok(())
}

/// How many connections load rows: the core count, at least 2 and at most 8.
pub fn load_workers() -> usize {
    crate::source::postgres::parallel::default_workers()
}

/// A table, as `(schema, name)`.
pub type TableName = (String, String);

/// One COPY of consecutive chunks of one table.
struct Run {
    table: TableName,
    copy_sql: String,
    /// The table's rows re-encoded as COPY binary, when every column's type converts.
    codec: Option<Arc<RowCodec>>,
    chunks: Vec<ChunkRef>,
}

/// A table's key statements, run in order on one connection once its rows are in.
struct Build {
    table: TableName,
    bytes: u64,
    statements: Vec<String>,
}

enum Task {
    Load(Run),
    Build(Build),
}

/// What is left to do, shared by the workers.
struct State {
    /// Runs not yet taken, largest tables first.
    runs: VecDeque<Run>,
    /// Builds whose table is loaded, largest first.
    ready: Vec<Build>,
    /// Builds waiting for their table's runs: runs not yet finished, and the build.
    waiting: HashMap<TableName, (usize, Build)>,
    /// Runs being loaded now, per table.
    loading: HashMap<TableName, usize>,
    failed: bool,
}

struct Schedule {
    state: Mutex<State>,
    /// Signalled when a build becomes ready or the schedule fails.
    changed: Notify,
}

impl Schedule {
    fn new(runs: VecDeque<Run>, builds: Vec<Build>) -> Schedule {
        let mut left: HashMap<&TableName, usize> = HashMap::new();
        for run in &runs {
            *left.entry(&run.table).or_default() += 1;
        }
        let mut ready = Vec::new();
        let mut waiting = HashMap::new();
        for build in builds {
            match left.get(&build.table) {
                Some(&n) => {
                    waiting.insert(build.table.clone(), (n, build));
                }
                None => ready.push(build),
            }
        }
        ready.sort_by_key(|b| b.bytes);
        Schedule {
            state: Mutex::new(State {
                runs,
                ready,
                waiting,
                loading: HashMap::new(),
                failed: false,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next task: a ready build first, then a run; waits while only builds of tables
    /// still loading elsewhere are left. `None` when everything is taken or a worker failed.
    async fn next(&self) -> Option<Task> {
        loop {
            // Created before the state is read: a wake-up between the two is not lost.
            let changed = self.changed.notified();
            {
                let mut state = self.lock();
                if state.failed {
                    return None;
                }
                if let Some(build) = state.ready.pop() {
                    return Some(Task::Build(build));
                }
                if let Some(run) = state.take_run() {
                    return Some(Task::Load(run));
                }
                if state.waiting.is_empty() {
                    return None;
                }
            }
            changed.await;
        }
    }

    /// A run of `table` is in: its build becomes ready with its last run.
    fn loaded(&self, table: &TableName) {
        let mut state = self.lock();
        if let Some(n) = state.loading.get_mut(table) {
            *n = n.saturating_sub(1);
        }
        let Some((left, _)) = state.waiting.get_mut(table) else {
            return;
        };
        *left -= 1;
        if *left == 0 {
            if let Some((_, build)) = state.waiting.remove(table) {
                let at = state.ready.partition_point(|b| b.bytes <= build.bytes);
                state.ready.insert(at, build);
            }
            drop(state);
            self.changed.notify_waiters();
        }
    }

    fn fail(&self) {
        self.lock().failed = true;
        self.changed.notify_waiters();
    }
}

impl State {
    /// The first run of a table no other worker is loading, else the first run. Two COPYs
    /// into one table contend (PostgreSQL 15 extends a heap one page at a time under one
    /// lock): one 488 MB `pgbench_accounts` file loaded in 7.0 s alone, 6.3 s as two halves
    /// into one table at once and 4.8 s as two halves into two tables. So a worker loads
    /// another table while there is one, and joins a table already loading only at the end.
    fn take_run(&mut self) -> Option<Run> {
        let free = self
            .runs
            .iter()
            .position(|r| self.loading.get(&r.table).copied().unwrap_or(0) == 0)
            .unwrap_or(0);
        let run = self.runs.remove(free)?;
        *self.loading.entry(run.table.clone()).or_default() += 1;
        Some(run)
    }
}

/// Cut every table's chunks into runs, largest tables first.
fn plan_runs(details: &PostgresSnapshotDetails) -> VecDeque<Run> {
    let mut tables: Vec<_> = details.tables.iter().collect();
    tables.sort_by_key(|t| std::cmp::Reverse(t.bytes));
    let mut runs = VecDeque::new();
    for image in tables {
        let columns: Vec<String> = image.columns.iter().map(|c| quote_ident(c)).collect();
        let copy_sql = format!(
            "COPY {}.{} ({}) FROM STDIN",
            quote_ident(&image.schema),
            quote_ident(&image.name),
            columns.join(", ")
        );
        let table = (image.schema.clone(), image.name.clone());
        let codec = binary_codec(details, image).map(Arc::new);
        for chunks in cut_runs(&image.chunks, RUN_BYTES) {
            runs.push_back(Run {
                table: table.clone(),
                copy_sql: copy_sql.clone(),
                codec: codec.clone(),
                chunks,
            });
        }
    }
    runs
}

/// The binary conversion of a table image's columns, if the schema knows every one and
/// each one's type converts.
fn binary_codec(details: &PostgresSnapshotDetails, image: &TableImage) -> Option<RowCodec> {
    let table = details
        .schema
        .tables
        .iter()
        .find(|t| t.schema == image.schema && t.name == image.name)?;
    let types = image
        .columns
        .iter()
        .map(|name| {
            let column = table.columns.iter().find(|c| &c.name == name)?;
            Some(column.type_sql.as_str())
        })
        .collect::<Option<Vec<_>>>()?;
    RowCodec::for_types(types)
}

/// Consecutive chunks, at most `limit` bytes a group (a larger chunk is a group alone).
fn cut_runs(chunks: &[ChunkRef], limit: u64) -> Vec<Vec<ChunkRef>> {
    let mut out: Vec<Vec<ChunkRef>> = Vec::new();
    let mut bytes = 0;
    for chunk in chunks {
        match out.last_mut() {
            Some(run) if bytes + chunk.len <= limit => {
                bytes += chunk.len;
                run.push(chunk.clone());
            }
            _ => {
                bytes = chunk.len;
                out.push(vec![chunk.clone()]);
            }
        }
    }
    out
}

/// How many chunks of `chunks` to read ahead: [`READ_AHEAD_BYTES`] of the largest, at least
/// one (the next) and at most [`READ_AHEAD_CHUNKS`].
fn read_ahead(chunks: &[ChunkRef]) -> usize {
    let largest = chunks.iter().map(|c| c.len).max().unwrap_or(0).max(1);
    ((READ_AHEAD_BYTES / largest) as usize).clamp(1, READ_AHEAD_CHUNKS)
}

/// Rows loaded, and how many of them went as COPY binary.
#[derive(Debug, Clone, Copy, Default)]
pub struct Loaded {
    pub rows: u64,
    pub binary_rows: u64,
    /// Chunks of forgotten tenants left out.
    pub forgotten_chunks: u64,
}

/// COPY every table's chunks in on `workers` connections, and run each table's `keys` (a map
/// from table to its statements, with its size for ordering) once its rows are in; returns
/// the rows loaded. Tables with keys but no rows have them built too.
pub async fn load_parallel(
    repo: &Repository,
    options: &PgConnectOptions,
    details: &PostgresSnapshotDetails,
    workers: usize,
    keys: Vec<(TableName, u64, Vec<String>)>,
) -> Result<Loaded> {
    let builds = keys
        .into_iter()
        .filter(|(_, _, statements)| !statements.is_empty())
        .map(|(table, bytes, statements)| Build {
            table,
            bytes,
            statements,
        })
        .collect();
    let runs = plan_runs(details);
    let tasks = runs.len() + details.tables.len();
    let schedule = Arc::new(Schedule::new(runs, builds));
    let workers: Vec<_> = (0..workers.clamp(1, tasks.max(1)))
        .map(|_| {
            let (repo, options, schedule) = (repo.clone(), options.clone(), schedule.clone());
            async move { worker(&repo, &options, &schedule).await }
        })
        .collect();
    let stop = schedule.clone();
    let loaded = work::spawn_all(workers, move || stop.fail(), "loading rows").await?;
    Ok(loaded.into_iter().fold(Loaded::default(), |a, b| Loaded {
        rows: a.rows + b.rows,
        binary_rows: a.binary_rows + b.binary_rows,
        forgotten_chunks: a.forgotten_chunks + b.forgotten_chunks,
    }))
}

async fn worker(
    repo: &Repository,
    options: &PgConnectOptions,
    schedule: &Schedule,
) -> Result<Loaded> {
    let mut conn = super::connect_options(options, "restore target").await?;
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut conn)
        .await
        .map_err(|e| db_error("session", e))?;
    let mut loaded = Loaded::default();
    while let Some(task) = schedule.next().await {
        match task {
            Task::Load(run) => {
                let (table, started) = (run.table.clone(), std::time::Instant::now());
                let chunks = run.chunks.len();
                let (n, binary) = load_run(repo, &mut conn, run).await?;
                tracing::debug!(table = %table.1, chunks, rows = n, binary, seconds = started.elapsed().as_secs_f64(), "run loaded");
                loaded.rows += n;
                if binary {
                    loaded.binary_rows += n;
                }
                schedule.loaded(&table);
            }
            Task::Build(build) => {
                let started = std::time::Instant::now();
                for sql in &build.statements {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                        .execute(&mut conn)
                        .await
                        .map_err(|e| db_error(&format!("adding keys: {sql}"), e))?;
                }
                tracing::debug!(table = %build.table.1, seconds = started.elapsed().as_secs_f64(), "keys built");
            }
        }
    }
    let _ = conn.close().await;
    Ok(loaded)
}

fn db_error(what: &str, e: sqlx::Error) -> Error {
    Error::other(format!("restore target: {what}: {e}"))
}

/// COPY one run in, as binary when its table's types convert (as text when a value does not:
/// the aborted COPY left nothing behind); the chunks after the one being sent are read,
/// unsealed and converted meanwhile. Returns the rows and whether they went as binary.
async fn load_run(repo: &Repository, conn: &mut PgConnection, run: Run) -> Result<(u64, bool)> {
    if let Some(codec) = run.codec.clone() {
        match copy_run(repo, conn, &run, Some(codec)).await? {
            Copied::Rows(n) => return Ok((n, true)),
            Copied::AsText(reason) => tracing::warn!(
                table = %format!("{}.{}", run.table.0, run.table.1),
                %reason,
                "binary COPY refused; loading the run as text"
            ),
        }
    }
    match copy_run(repo, conn, &run, None).await? {
        Copied::Rows(n) => Ok((n, false)),
        Copied::AsText(reason) => Err(Error::other(format!(
            "restore target: COPY into {}.{}: {reason}",
            run.table.0, run.table.1
        ))),
    }
}

/// How one COPY attempt ended.
enum Copied {
    Rows(u64),
    /// The binary attempt was given up (nothing was loaded): why.
    AsText(String),
}

async fn copy_run(
    repo: &Repository,
    conn: &mut PgConnection,
    run: &Run,
    codec: Option<Arc<RowCodec>>,
) -> Result<Copied> {
    let what = format!("COPY into {}.{}", run.table.0, run.table.1);
    let sql = match codec {
        Some(_) => format!("{} WITH (FORMAT binary)", run.copy_sql),
        None => run.copy_sql.clone(),
    };
    let mut sink = conn
        .copy_in_raw(&sql)
        .await
        .map_err(|e| db_error(&what, e))?;
    if codec.is_some() {
        if let Err(e) = sink.send(binary::HEADER).await {
            return Err(db_error(&what, e));
        }
    }
    let ahead = read_ahead(&run.chunks);
    let mut chunks = stream::iter(run.chunks.clone())
        .map(|chunk| {
            let (repo, codec) = (repo.clone(), codec.clone());
            async move {
                tokio::spawn(async move {
                    let data = repo.read_listed_chunk(&chunk).await?;
                    let Some(codec) = codec else {
                        return Ok(Ok(data));
                    };
                    let converted = tokio::task::spawn_blocking(move || {
                        let mut out = Vec::new();
                        codec.convert(&data, &mut out).map(|()| out)
                    });
                    converted
                        .await
                        .map_err(|e| Error::other("converting a chunk").with_source(e))
                })
                .await
                .map_err(|e| Error::other("reading a chunk").with_source(e))?
            }
        })
        .buffered(ahead);
    loop {
        let data = match chunks.try_next().await {
            Ok(Some(Ok(data))) => data,
            Ok(Some(Err(unconverted))) => {
                drop(chunks);
                sink.abort("value not convertible")
                    .await
                    .map_err(|e| db_error(&what, e))?;
                return Ok(Copied::AsText(unconverted.to_string()));
            }
            Ok(None) => break,
            Err(e) => {
                let _ = sink.abort("chunk unreadable").await;
                return Err(e);
            }
        };
        if let Err(e) = sink.send(data).await {
            return binary_refused(codec.is_some(), &what, e);
        }
    }
    if codec.is_some() {
        if let Err(e) = sink.send(binary::TRAILER).await {
            return binary_refused(true, &what, e);
        }
    }
    match sink.finish().await {
        Ok(n) => Ok(Copied::Rows(n)),
        Err(e) => binary_refused(codec.is_some(), &what, e),
    }
}

/// A server's refusal of binary data (a data exception, SQLSTATE class 22, or a malformed
/// binary field, 08P01) means the text is loaded instead; any other error is the restore's.
fn binary_refused(binary: bool, what: &str, e: sqlx::Error) -> Result<Copied> {
    let code = e
        .as_database_error()
        .and_then(|d| d.code().map(|c| c.into_owned()));
    match code {
        Some(code) if binary && (code.starts_with("22") || code == "08P01") => {
            Ok(Copied::AsText(format!("the server refused it: {e}")))
        }
        _ => Err(db_error(what, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(len: u64) -> ChunkRef {
        ChunkRef {
            id: format!("c{len}"),
            len,
        }
    }

    fn table(name: &str) -> TableName {
        ("public".into(), name.into())
    }

    fn run(name: &str) -> Run {
        Run {
            table: table(name),
            copy_sql: String::new(),
            codec: None,
            chunks: vec![chunk(1)],
        }
    }

    fn build(name: &str, bytes: u64) -> Build {
        Build {
            table: table(name),
            bytes,
            statements: vec![format!("key {name}")],
        }
    }

    fn name(task: &Task) -> String {
        match task {
            Task::Load(r) => format!("load {}", r.table.1),
            Task::Build(b) => format!("build {}", b.table.1),
        }
    }

    #[test]
    fn runs_are_cut_by_bytes_and_a_large_chunk_is_alone() {
        let chunks = [
            chunk(10),
            chunk(20),
            chunk(30),
            chunk(100),
            chunk(5),
            chunk(5),
        ];
        let lens: Vec<Vec<u64>> = cut_runs(&chunks, 60)
            .iter()
            .map(|r| r.iter().map(|c| c.len).collect())
            .collect();
        assert_eq!(lens, vec![vec![10, 20, 30], vec![100], vec![5, 5]]);
        assert!(cut_runs(&[], 60).is_empty());
    }

    #[test]
    fn read_ahead_is_bounded_by_bytes_and_count() {
        assert_eq!(read_ahead(&[chunk(4 << 20)]), 4);
        assert_eq!(read_ahead(&[chunk(1 << 10), chunk(64 << 20)]), 1);
        assert_eq!(read_ahead(&[chunk(1 << 10)]), READ_AHEAD_CHUNKS);
        assert_eq!(read_ahead(&[]), READ_AHEAD_CHUNKS);
    }

    #[tokio::test]
    async fn a_build_comes_right_after_its_tables_last_run() {
        let runs = VecDeque::from([run("big"), run("big"), run("small")]);
        let builds = vec![build("big", 100), build("small", 1), build("empty", 0)];
        let s = Schedule::new(runs, builds);
        // The empty table's key is ready at once.
        assert_eq!(name(&s.next().await.unwrap()), "build empty");
        assert_eq!(name(&s.next().await.unwrap()), "load big");
        // "big" is loading: a table nobody loads comes first.
        assert_eq!(name(&s.next().await.unwrap()), "load small");
        // Only "big" is left: join it.
        assert_eq!(name(&s.next().await.unwrap()), "load big");
        s.loaded(&table("big"));
        // One run of "big" is still loading: its build is not ready.
        s.loaded(&table("small"));
        assert_eq!(name(&s.next().await.unwrap()), "build small");
        s.loaded(&table("big"));
        assert_eq!(name(&s.next().await.unwrap()), "build big");
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn a_worker_waits_for_a_build_still_loading_elsewhere() {
        let s = Arc::new(Schedule::new(
            VecDeque::from([run("t")]),
            vec![build("t", 1)],
        ));
        assert_eq!(name(&s.next().await.unwrap()), "load t");
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.next().await.map(|t| name(&t)) }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        s.loaded(&table("t"));
        assert_eq!(waiter.await.unwrap().as_deref(), Some("build t"));
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn a_failure_ends_every_wait() {
        let s = Arc::new(Schedule::new(
            VecDeque::from([run("t")]),
            vec![build("t", 1)],
        ));
        assert!(s.next().await.is_some());
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.next().await.is_none() }
        });
        tokio::task::yield_now().await;
        s.fail();
        assert!(waiter.await.unwrap());
    }
}
