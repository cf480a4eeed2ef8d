//! Schema images: the whole schema as `pg_dump --schema-only` restores it, stored in chunks.
//!
//! A snapshot takes one at its exported snapshot (so it is exactly the schema its rows were
//! copied under); capture takes another whenever the catalog's **fingerprint** changed since
//! the last one (one cheap query per pass), and records it in that pass's first segment, so a
//! restore to T applies the newest image taken at or before T (docs/ARCHITECTURE.md, "Schema
//! images"). The dump is `pg_dump --format=custom --compress=0` (zstd compresses it in the
//! chunks), streamed from the tool's stdout into the repository's normal chunk writer:
//! encrypted, deduplicated, referenced by the manifest that names the image.

use std::process::Stdio;

use sqlx::postgres::PgConnection;
use sqlx::Row;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::schema::{self, Schema, USER_NAMESPACE};
use super::tools::{Libpq, PgTools};
use super::{from_micros, pg_error};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::{ChunkList, ChunkedWriter, Repository, DEFAULT_CHUNK};
pub use crate::stored::postgres::image::{RelationName, SchemaImage, IMAGE_FORMAT};
use crate::time;

/// Bytes read from the tool's stdout at a time (one chunk record each).
const READ_BUFFER: usize = 256 << 10;

/// Bytes of the tool's stderr kept for an error message.
const STDERR_KEPT: usize = 8 << 10;

/// pg_dump waits this long for a table lock, then fails (the pass is retried).
const LOCK_WAIT: &str = "--lock-wait-timeout=60000";

/// What a snapshot's transaction records beside its image, read before the dump starts.
pub struct ImageFacts {
    pub fingerprint: String,
    pub populated: Vec<RelationName>,
}

/// Read the fingerprint and the populated materialized views (inside the image's transaction).
pub async fn facts(conn: &mut PgConnection) -> Result<ImageFacts> {
    Ok(ImageFacts {
        fingerprint: fingerprint(conn).await?,
        populated: populated_views(conn).await?,
    })
}

/// A hash over the catalog rows of every object pg_dump would dump from the application's
/// namespaces: `xmin` of each row (a changed definition is a new row version), and for
/// relations the columns that define them (a TRUNCATE, VACUUM FULL or REFRESH rewrites
/// `pg_class` rows without changing the schema). Temporary objects are left out.
pub async fn fingerprint(conn: &mut PgConnection) -> Result<String> {
    let sql = format!(
        "WITH nsp AS (SELECT n.oid FROM pg_namespace n WHERE {USER_NAMESPACE}), \
         rels AS (SELECT c.oid FROM pg_class c WHERE c.relnamespace IN (SELECT oid FROM nsp)) \
         SELECT md5(coalesce(string_agg(item, ',' ORDER BY item), '')) FROM ( \
           SELECT 'n' || oid || ':' || xmin FROM pg_namespace WHERE oid IN (SELECT oid FROM nsp) \
           UNION ALL SELECT 'c' || c.oid || ':' || md5(row(c.relname, c.relnamespace, c.reltype, \
               c.relowner, c.relam, c.relpersistence, c.relkind, c.relnatts, c.relchecks, \
               c.relhasrules, c.relhastriggers, c.relrowsecurity, c.relforcerowsecurity, \
               c.relispopulated, c.relreplident, c.relispartition, c.reloptions, c.relacl, \
               pg_get_expr(c.relpartbound, c.oid))::text) \
             FROM pg_class c WHERE c.oid IN (SELECT oid FROM rels) \
           UNION ALL SELECT 'a' || attrelid || '.' || attnum || ':' || xmin FROM pg_attribute \
             WHERE attnum > 0 AND attrelid IN (SELECT oid FROM rels) \
           UNION ALL SELECT 'd' || oid || ':' || xmin FROM pg_attrdef WHERE adrelid IN (SELECT oid FROM rels) \
           UNION ALL SELECT 'k' || oid || ':' || xmin FROM pg_constraint WHERE connamespace IN (SELECT oid FROM nsp) \
           UNION ALL SELECT 'i' || indexrelid || ':' || xmin FROM pg_index WHERE indrelid IN (SELECT oid FROM rels) \
           UNION ALL SELECT 't' || oid || ':' || xmin FROM pg_trigger WHERE tgrelid IN (SELECT oid FROM rels) \
           UNION ALL SELECT 'r' || oid || ':' || xmin FROM pg_rewrite WHERE ev_class IN (SELECT oid FROM rels) \
           UNION ALL SELECT 'p' || oid || ':' || xmin FROM pg_policy WHERE polrelid IN (SELECT oid FROM rels) \
           UNION ALL SELECT 'h' || inhrelid || '.' || inhparent || ':' || xmin FROM pg_inherits \
             WHERE inhrelid IN (SELECT oid FROM rels) \
           UNION ALL SELECT 'q' || seqrelid || ':' || xmin FROM pg_sequence WHERE seqrelid IN (SELECT oid FROM rels) \
           UNION ALL SELECT 'y' || oid || ':' || xmin FROM pg_type WHERE typnamespace IN (SELECT oid FROM nsp) \
           UNION ALL SELECT 'e' || oid || ':' || xmin FROM pg_enum WHERE enumtypid >= 16384 \
           UNION ALL SELECT 'f' || oid || ':' || xmin FROM pg_proc WHERE pronamespace IN (SELECT oid FROM nsp) \
           UNION ALL SELECT 'l' || oid || ':' || xmin FROM pg_collation WHERE collnamespace IN (SELECT oid FROM nsp) \
           UNION ALL SELECT 'w' || oid || ':' || xmin FROM pg_operator WHERE oprnamespace IN (SELECT oid FROM nsp) \
           UNION ALL SELECT 's' || oid || ':' || xmin FROM pg_statistic_ext WHERE stxnamespace IN (SELECT oid FROM nsp) \
           UNION ALL SELECT 'o' || objoid || '.' || classoid || '.' || objsubid || ':' || xmin \
             FROM pg_description WHERE objoid >= 16384 \
           UNION ALL SELECT 'x' || oid || ':' || xmin FROM pg_extension \
           UNION ALL SELECT 'v' || oid || ':' || xmin FROM pg_event_trigger \
           UNION ALL SELECT 'g' || oid || ':' || xmin FROM pg_default_acl \
           UNION ALL SELECT 'u' || oid || ':' || xmin FROM pg_publication \
           UNION ALL SELECT 'm' || oid || ':' || xmin FROM pg_cast WHERE oid >= 16384 \
           UNION ALL SELECT 'z' || oid || ':' || xmin FROM pg_foreign_server \
         ) AS catalog(item)"
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| pg_error("fingerprinting the catalog", e))
}

/// Materialized views holding data.
async fn populated_views(conn: &mut PgConnection) -> Result<Vec<RelationName>> {
    let sql = format!(
        "SELECT n.nspname::text, c.relname::text FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'm' AND c.relispopulated AND {USER_NAMESPACE} ORDER BY 1, 2"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| pg_error("listing materialized views", e))?;
    Ok(rows
        .iter()
        .map(|r| RelationName {
            schema: r.get(0),
            name: r.get(1),
        })
        .collect())
}

/// Run `pg_dump --schema-only` at the exported snapshot `snapshot` and store its archive in
/// chunks. The exporting transaction must stay open until this returns.
pub async fn dump(
    repo: &Repository,
    tools: &PgTools,
    libpq: &Libpq,
    snapshot: &str,
) -> Result<ChunkList> {
    let mut command = Command::new(&tools.pg_dump);
    command
        .args(["--schema-only", "--format=custom", "--compress=0"])
        .args(["--no-subscriptions", LOCK_WAIT])
        .arg(format!("--snapshot={snapshot}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    libpq.apply(&mut command);
    let mut child = command
        .spawn()
        .map_err(|e| Error::io(tools.pg_dump.display(), e))?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let errors = tokio::spawn(read_bounded(stderr));
    let mut writer = ChunkedWriter::new(repo, DEFAULT_CHUNK);
    let mut buffer = vec![0u8; READ_BUFFER];
    loop {
        let n = stdout
            .read(&mut buffer)
            .await
            .map_err(|e| Error::io("pg_dump output", e))?;
        if n == 0 {
            break;
        }
        writer.write_record(&buffer[..n]).await?;
    }
    let status = child
        .wait()
        .await
        .map_err(|e| Error::io(tools.pg_dump.display(), e))?;
    let stderr = errors.await.unwrap_or_default();
    if !status.success() {
        return Err(dump_failed(libpq, &stderr, status));
    }
    writer.finish().await
}

fn dump_failed(libpq: &Libpq, stderr: &str, status: std::process::ExitStatus) -> Error {
    let denied = stderr.contains("permission denied");
    let error = Error::new(
        ErrorKind::Other,
        format!(
            "pg_dump --schema-only of {} failed ({status}): {}",
            libpq.shown(),
            stderr.trim()
        ),
    );
    if denied {
        error.with_hint(
            "the role cannot read every object pg_dump restores: grant it SELECT on every table \
             and USAGE on every schema (or pg_read_all_data), or run timevault as the owner",
        )
    } else {
        error.with_hint("the schema image is needed for a restorable snapshot; fix the error shown and try again")
    }
}

/// Everything a child wrote on `stream`, up to [`STDERR_KEPT`] bytes (the rest is drained).
pub(crate) async fn read_bounded(mut stream: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut kept = Vec::new();
    let mut buffer = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        let room = STDERR_KEPT.saturating_sub(kept.len());
        kept.extend_from_slice(&buffer[..n.min(room)]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// Take an image of the schema as it is now, in a transaction of its own on `conn` (with the
/// table model, for the change log).
pub async fn take(
    conn: &mut PgConnection,
    repo: &Repository,
    tools: &PgTools,
    libpq: &Libpq,
) -> Result<SchemaImage> {
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *conn)
        .await
        .map_err(|e| pg_error("begin schema image", e))?;
    let taken = take_in_transaction(conn, repo, tools, libpq).await;
    let end = if taken.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let ended = sqlx::query(end).execute(&mut *conn).await;
    let image = taken?;
    ended.map_err(|e| pg_error("end schema image", e))?;
    Ok(image)
}

async fn take_in_transaction(
    conn: &mut PgConnection,
    repo: &Repository,
    tools: &PgTools,
    libpq: &Libpq,
) -> Result<SchemaImage> {
    let row = sqlx::query(
        "SELECT pg_export_snapshot(), (extract(epoch from clock_timestamp()) * 1000000)::int8, \
                pg_current_snapshot()::text",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| pg_error("exporting a snapshot for the schema image", e))?;
    let exported: String = row.get(0);
    let taken_us: i64 = row.get(1);
    let facts = facts(conn).await?;
    let model = schema::capture(conn).await?;
    let list = dump(repo, tools, libpq, &exported).await?;
    tracing::info!(bytes = list.bytes, taken_at = %time::compact(from_micros(taken_us)), "schema image taken");
    let mut image = image_of(tools, taken_us, facts, list, Some(model));
    image.visibility = Some(row.get(2));
    Ok(image)
}

/// The image record for a finished dump.
pub fn image_of(
    tools: &PgTools,
    taken_us: i64,
    facts: ImageFacts,
    list: ChunkList,
    model: Option<Schema>,
) -> SchemaImage {
    SchemaImage {
        format: IMAGE_FORMAT.to_string(),
        pg_dump_version: tools.version.clone(),
        taken_us,
        fingerprint: facts.fingerprint,
        visibility: None,
        bytes: list.bytes,
        chunks: list.chunks,
        populated: facts.populated,
        schema: model,
    }
}
