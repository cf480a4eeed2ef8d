//! Building keys, indexes and constraints on several connections at once.
//!
//! After the rows are in, a restore spends most of its time building primary keys and
//! indexes: a sort of every row per index, one backend each. Statements on different tables
//! take locks that do not conflict, so, the way `pg_restore -j` does it, each table's
//! statements form a group run in order on one connection while `workers` connections take
//! groups from one queue, largest tables first. What must follow every group (foreign keys
//! need the referenced keys) runs afterwards on one connection.

use std::collections::HashMap;

use sqlx::postgres::PgConnectOptions;
use sqlx::Connection;

use super::postgres_load::TableName;
use crate::error::Result;
use crate::source::postgres::schema::Schema;
use crate::source::postgres::PostgresSnapshotDetails;
use crate::work::{self, WorkQueue};

/// Groups of statements for `schema`'s tables, each with the table's snapshot size, largest
/// first (a big table's index build started last would leave the other connections idle).
pub fn by_size(
    schema: &Schema,
    groups: Vec<Vec<String>>,
    details: &PostgresSnapshotDetails,
) -> Vec<Vec<String>> {
    largest_first(per_table(schema, groups, details))
}

/// The groups of [`per_table`], largest table first.
pub fn largest_first(mut sized: Vec<(TableName, u64, Vec<String>)>) -> Vec<Vec<String>> {
    sized.sort_by_key(|(_, size, _)| std::cmp::Reverse(*size));
    sized.into_iter().map(|(_, _, group)| group).collect()
}

/// The non-empty groups of statements for `schema`'s tables (one group per table, in
/// [`Schema::tables`] order), each with its table and the table's snapshot size.
pub fn per_table(
    schema: &Schema,
    groups: Vec<Vec<String>>,
    details: &PostgresSnapshotDetails,
) -> Vec<(TableName, u64, Vec<String>)> {
    let sizes: HashMap<(&str, &str), u64> = details
        .tables
        .iter()
        .map(|t| ((t.schema.as_str(), t.name.as_str()), t.bytes))
        .collect();
    schema
        .tables
        .iter()
        .zip(groups)
        .filter(|(_, group)| !group.is_empty())
        .map(|(t, group)| {
            let size = sizes
                .get(&(t.schema.as_str(), t.name.as_str()))
                .copied()
                .unwrap_or(0);
            ((t.schema.clone(), t.name.clone()), size, group)
        })
        .collect()
}

/// Run `groups` on up to `workers` connections: a group's statements in order on one
/// connection, different groups at once. The first failure stops the others from taking
/// more groups and is returned with the statement that failed.
pub async fn execute_groups(
    options: &PgConnectOptions,
    groups: Vec<Vec<String>>,
    workers: usize,
    what: &str,
) -> Result<()> {
    if groups.is_empty() {
        return Ok(());
    }
    let (options, label) = (options.clone(), what.to_string());
    work::run(groups, workers, what, move |queue| {
        let (options, label) = (options.clone(), label.clone());
        async move { worker(&options, &queue, &label).await }
    })
    .await?;
    Ok(())
}

async fn worker(
    options: &PgConnectOptions,
    queue: &WorkQueue<Vec<String>>,
    what: &str,
) -> Result<()> {
    let mut conn = super::postgres::connect_options(options, "restore target").await?;
    while let Some(group) = queue.pop() {
        for sql in group {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                .execute(&mut conn)
                .await
                .map_err(|e| super::postgres::db_error(&format!("{what}: {sql}"), e))?;
        }
    }
    let _ = conn.close().await;
    Ok(())
}
