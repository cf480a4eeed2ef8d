//! Parallel snapshot copy through an exported snapshot.
//!
//! One COPY stream is bounded by one server backend and by one client thread (per-row
//! framing, row checksums, chunk cutting), so the snapshot transaction exports its snapshot
//! (`pg_export_snapshot()`) and `snapshot_workers` extra connections join it with
//! `SET TRANSACTION SNAPSHOT`: every worker sees exactly the state the snapshot records. The
//! work is a queue of **parts**: a small table is one part; a table larger than
//! `snapshot_split_pages` pages is cut into page ranges read with TID range scans
//! (`ctid >= '(a,0)' AND ctid < '(b,0)'`, PostgreSQL 14 and later), so one big table keeps
//! every worker busy. Each part streams into its own chunks (memory: one chunk buffer and
//! [`crate::repo::CHUNKS_IN_FLIGHT`] puts per worker); a table's image is its parts' chunks in
//! part order, and its checksum the sum of its parts' checksums (docs/FORMAT.md §8.3).

use futures::TryStreamExt;
use sqlx::postgres::PgConnection;
use sqlx::Connection;

use super::grouping::{split_tenant, TenantKey};
use super::{connect, pg_error, quote_ident};
use crate::catalog::rowsum::RowSetHasher;
pub use crate::config::postgres_options::{SNAPSHOT_WORKERS_OPTION, SPLIT_PAGES_OPTION};
use crate::config::PostgresOptions;
use crate::error::Result;
use crate::repo::{ChunkList, ChunkedWriter, Repository, DEFAULT_CHUNK};
pub use crate::stored::postgres::{chunk_ids_digest, IMAGE_DIGEST_CHUNK_IDS};
use crate::work::{self, WorkQueue};

/// Default page-range size: 8,192 pages of 8 KiB = 64 MiB.
pub const DEFAULT_SPLIT_PAGES: u64 = 8192;

/// How a snapshot copies its tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelOptions {
    pub workers: usize,
    pub split_pages: u64,
}

impl Default for ParallelOptions {
    fn default() -> Self {
        ParallelOptions {
            workers: default_workers(),
            split_pages: DEFAULT_SPLIT_PAGES,
        }
    }
}

/// The core count, at least 2 and at most 8.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
}

impl ParallelOptions {
    /// `snapshot_workers` and `snapshot_split_pages` from a source's options (checked at
    /// config load), else the defaults.
    pub fn from_options(options: &PostgresOptions) -> Self {
        let defaults = ParallelOptions::default();
        ParallelOptions {
            workers: options.snapshot_workers.unwrap_or(defaults.workers),
            split_pages: options.snapshot_split_pages.unwrap_or(defaults.split_pages),
        }
    }
}

/// One COPY of a table or of a page range of it.
#[derive(Debug, Clone)]
pub struct Part {
    /// Index of the table in the snapshot's table list.
    pub table: usize,
    /// Position of the part within its table.
    pub index: usize,
    pub sql: String,
    /// For error messages: `"public"."t"` pages a..b.
    pub label: String,
    /// The COPY ends every row with the tenant's text and orders rows by it
    /// ([`super::grouping`]): chunks are cut where the tenant changes.
    pub grouped: bool,
}

/// What copying one part produced.
#[derive(Debug)]
pub struct PartDone {
    pub table: usize,
    pub index: usize,
    pub rows: u64,
    pub sum: RowSetHasher,
    pub list: ChunkList,
    /// For a grouped part: the tenant of each chunk in `list`.
    pub tenants: Vec<Option<String>>,
}

/// The page ranges `[from, to)` a table of `pages` pages is copied in; the last range is
/// open-ended (`None`), so rows in pages added since the size was read are never missed.
pub fn page_ranges(pages: u64, split_pages: u64) -> Vec<(u64, Option<u64>)> {
    let split = split_pages.max(1);
    if pages <= split {
        return vec![(0, None)];
    }
    let n = pages.div_ceil(split);
    (0..n)
        .map(|i| {
            let from = i * split;
            let to = (i + 1 < n).then_some((i + 1) * split);
            (from, to)
        })
        .collect()
}

/// The `WHERE` clause for a page range (empty for the whole table).
pub fn range_condition(range: (u64, Option<u64>)) -> String {
    match range {
        (0, None) => String::new(),
        (from, None) => format!(" WHERE ctid >= '({from},0)'::tid"),
        (from, Some(to)) => {
            format!(" WHERE ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid")
        }
    }
}

/// Run `parts` on `workers` connections that join the exported snapshot `snapshot_id`.
/// Returns the parts in any order; the caller orders them. The exporting transaction must
/// stay open until this returns.
pub async fn copy_parts(
    repo: &Repository,
    url: &str,
    snapshot_id: &str,
    parts: Vec<Part>,
    workers: usize,
) -> Result<Vec<PartDone>> {
    let (repo, url, id) = (repo.clone(), url.to_string(), snapshot_id.to_string());
    let done = work::run(parts, workers, "snapshot", move |queue| {
        let (repo, url, id) = (repo.clone(), url.clone(), id.clone());
        async move { worker(&repo, &url, &id, &queue).await }
    })
    .await?;
    Ok(done.into_iter().flatten().collect())
}

async fn worker(
    repo: &Repository,
    url: &str,
    snapshot_id: &str,
    queue: &WorkQueue<Part>,
) -> Result<Vec<PartDone>> {
    let mut conn = connect(url).await?;
    let join = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'; \
         SET LOCAL work_mem = '64MB'",
        snapshot_id.replace('\'', "''")
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(join))
        .execute(&mut conn)
        .await
        .map_err(|e| pg_error("joining the exported snapshot", e))?;
    let mut done = Vec::new();
    while let Some(part) = queue.pop() {
        done.push(copy_part(repo, &mut conn, part).await?);
    }
    sqlx::query("COMMIT")
        .execute(&mut conn)
        .await
        .map_err(|e| pg_error("ending a snapshot worker", e))?;
    let _ = conn.close().await;
    Ok(done)
}

/// Stream one part through COPY into chunks of whole rows; a grouped part's rows arrive
/// ordered by tenant, and each tenant's rows get chunks of their own.
async fn copy_part(repo: &Repository, conn: &mut PgConnection, part: Part) -> Result<PartDone> {
    let mut writer = ChunkedWriter::new(repo, DEFAULT_CHUNK);
    let mut sum = RowSetHasher::default();
    let mut rows = 0u64;
    // (tenant, index of its first chunk), in order.
    let mut groups: Vec<(Option<String>, usize)> = Vec::new();
    let mut row = Vec::new();
    let what = || format!("COPY {}", part.label);
    let mut stream = conn
        .copy_out_raw(&part.sql)
        .await
        .map_err(|e| pg_error(&what(), e))?;
    while let Some(data) = stream.try_next().await.map_err(|e| pg_error(&what(), e))? {
        let data: &[u8] = if part.grouped {
            let tenant = split_tenant(&data, &mut row);
            if groups.last().is_none_or(|(t, _)| *t != tenant) {
                writer.end_chunk().await?;
                if repo.tenant_keys_enabled() {
                    // Each tenant's chunks under its own key; rows of no tenant under the
                    // repository's.
                    let keys = match &tenant {
                        Some(t) => Some(repo.tenant_keys(t).await?),
                        None => None,
                    };
                    writer.set_keys(keys).await?;
                }
                groups.push((tenant, writer.chunks_started()));
            }
            &row
        } else {
            &data
        };
        sum.add_lines(data);
        rows += data.iter().filter(|&&b| b == b'\n').count() as u64;
        writer.write_record(data).await?;
    }
    drop(stream);
    let list = writer.finish().await?;
    let tenants = chunk_tenants(&groups, list.chunks.len());
    Ok(PartDone {
        table: part.table,
        index: part.index,
        rows,
        sum,
        list,
        tenants,
    })
}

/// Each chunk's tenant from the groups' first chunks (a group spans up to the next one's).
fn chunk_tenants(groups: &[(Option<String>, usize)], chunks: usize) -> Vec<Option<String>> {
    let mut tenants = Vec::with_capacity(chunks);
    for (i, (tenant, first)) in groups.iter().enumerate() {
        let end = groups.get(i + 1).map_or(chunks, |(_, next)| *next);
        tenants.extend(std::iter::repeat_n(
            tenant.clone(),
            end.saturating_sub(*first),
        ));
    }
    tenants
}

/// `COPY (SELECT <columns> FROM ONLY <table> [WHERE ctid range]) TO STDOUT`; with a tenant
/// key, every row ends with its tenant's text and rows come ordered by it.
pub fn copy_sql(
    qualified: &str,
    columns: &[String],
    range: (u64, Option<u64>),
    key: Option<&TenantKey>,
) -> String {
    let mut list: Vec<String> = columns
        .iter()
        .map(|c| format!("t0.{}", quote_ident(c)))
        .collect();
    let order = match key {
        Some(key) => {
            list.push(format!("({}) COLLATE \"C\"", key.tenant_sql("t0")));
            // ctid second: a tenant's rows come in the same order in every snapshot, so an
            // unchanged tenant's chunks are the same chunks (stored once).
            format!(" ORDER BY {}, t0.ctid", list.len())
        }
        None => String::new(),
    };
    format!(
        "COPY (SELECT {} FROM ONLY {qualified} AS t0{}{order}) TO STDOUT",
        list.join(", "),
        range_condition(range)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_split_into_page_ranges_with_an_open_end() {
        assert_eq!(page_ranges(0, 10), vec![(0, None)]);
        assert_eq!(page_ranges(10, 10), vec![(0, None)]);
        assert_eq!(
            page_ranges(25, 10),
            vec![(0, Some(10)), (10, Some(20)), (20, None)]
        );
        assert_eq!(range_condition((0, None)), "");
        assert_eq!(
            range_condition((10, Some(20))),
            " WHERE ctid >= '(10,0)'::tid AND ctid < '(20,0)'::tid"
        );
        assert_eq!(range_condition((20, None)), " WHERE ctid >= '(20,0)'::tid");
    }

    #[test]
    fn grouped_copies_order_by_the_tenant_and_chunks_know_theirs() {
        let key = TenantKey {
            column: "tenant_id".into(),
            hops: vec![],
        };
        assert_eq!(
            copy_sql("\"public\".\"t\"", &["id".into()], (0, Some(8)), Some(&key)),
            "COPY (SELECT t0.\"id\", (t0.\"tenant_id\"::text) COLLATE \"C\" FROM ONLY \
             \"public\".\"t\" AS t0 WHERE ctid >= '(0,0)'::tid AND ctid < '(8,0)'::tid ORDER BY 2, t0.ctid) TO STDOUT"
        );
        let groups = vec![
            (Some("1".to_string()), 0),
            (Some("2".to_string()), 2),
            (None, 3),
        ];
        assert_eq!(
            chunk_tenants(&groups, 4),
            vec![Some("1".into()), Some("1".into()), Some("2".into()), None]
        );
        assert_eq!(chunk_tenants(&[], 0), Vec::<Option<String>>::new());
    }

    #[test]
    fn options_override_the_defaults() {
        assert_eq!(
            ParallelOptions::from_options(&PostgresOptions::default()),
            ParallelOptions::default()
        );
        let p = ParallelOptions::from_options(&PostgresOptions {
            snapshot_workers: Some(3),
            snapshot_split_pages: Some(16),
            ..PostgresOptions::default()
        });
        assert_eq!((p.workers, p.split_pages), (3, 16));
    }
}
