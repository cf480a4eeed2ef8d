//! Loading a snapshot's rows on several connections at once.
//!
//! One COPY FROM STDIN is bounded by one server backend (parsing, heap inserts) and one client
//! thread (reading, unsealing, checking chunks). The tables are bare while rows load (keys and
//! indexes come after), so concurrent COPYs into one table do not contend on index pages: the
//! chunks of every table are cut into runs of [`RUN_CHUNKS`] and `workers` connections take runs
//! from one queue, largest tables first. Chunks hold whole rows and a heap has no order, so
//! any split loads the same rows.

use std::collections::VecDeque;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection;

use crate::error::{Error, Result};
use crate::repo::{ChunkRef, Repository};
use crate::source::postgres::parallel::{chunk_ids_digest, IMAGE_DIGEST_CHUNK_IDS};
use crate::source::postgres::{quote_ident, PostgresSnapshotDetails};
use crate::work::{self, WorkQueue};

/// Chunks per unit of work (about 64 MiB of rows).
pub const RUN_CHUNKS: usize = 16;

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

struct Run {
    copy_sql: String,
    label: String,
    chunks: Vec<ChunkRef>,
}

/// COPY every table's chunks in on `workers` connections; returns the rows loaded.
pub async fn load_parallel(
    repo: &Repository,
    options: &PgConnectOptions,
    details: &PostgresSnapshotDetails,
    workers: usize,
) -> Result<u64> {
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
        for chunks in image.chunks.chunks(RUN_CHUNKS) {
            runs.push_back(Run {
                copy_sql: copy_sql.clone(),
                label: format!("{}.{}", image.schema, image.name),
                chunks: chunks.to_vec(),
            });
        }
    }
    let repo = repo.clone();
    let options = options.clone();
    let rows = work::run(runs, workers, "loading rows", move |queue| {
        let (repo, options) = (repo.clone(), options.clone());
        async move { worker(&repo, &options, &queue).await }
    })
    .await?;
    Ok(rows.into_iter().sum())
}

async fn worker(
    repo: &Repository,
    options: &PgConnectOptions,
    queue: &WorkQueue<Run>,
) -> Result<u64> {
    let mut conn = super::postgres::connect_options(options, "restore target").await?;
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut conn)
        .await
        .map_err(|e| db_error("session", e))?;
    let mut rows = 0;
    while let Some(run) = queue.pop() {
        rows += load_run(repo, &mut conn, run).await?;
    }
    let _ = conn.close().await;
    Ok(rows)
}

fn db_error(what: &str, e: sqlx::Error) -> Error {
    Error::other(format!("restore target: {what}: {e}"))
}

/// COPY one run in; the next chunk is read and unsealed while the current one is sent.
async fn load_run(repo: &Repository, conn: &mut PgConnection, run: Run) -> Result<u64> {
    let what = format!("COPY into {}", run.label);
    let mut sink = conn
        .copy_in_raw(&run.copy_sql)
        .await
        .map_err(|e| db_error(&what, e))?;
    let spawn_read = |chunk: &ChunkRef| {
        let (repo, chunk) = (repo.clone(), chunk.clone());
        tokio::spawn(async move { repo.read_listed_chunk(&chunk).await })
    };
    let mut next = run.chunks.first().map(spawn_read);
    for i in 0..run.chunks.len() {
        let Some(reading) = next.take() else { break };
        let data = match reading.await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                let _ = sink.abort("chunk unreadable").await;
                return Err(e);
            }
            Err(e) => {
                let _ = sink.abort("chunk unreadable").await;
                return Err(Error::other(format!("reading a chunk: {e}")));
            }
        };
        next = run.chunks.get(i + 1).map(spawn_read);
        if let Err(e) = sink.send(data).await {
            if let Some(reading) = next.take() {
                reading.abort();
            }
            return Err(db_error(&what, e));
        }
    }
    sink.finish().await.map_err(|e| db_error(&what, e))
}
