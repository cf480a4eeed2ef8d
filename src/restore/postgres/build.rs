//! Building each table's key on several connections at once.
//!
//! Replay matches rows by each table's key, so keys are built as soon as a table's rows are
//! in, before the schema image's post-data (the other indexes and constraints, applied by
//! `pg_restore -j`). Statements on different tables take locks that do not conflict, so each
//! table's statements form a group run in order on one connection while `workers`
//! connections take groups from one queue, largest tables first.

use std::collections::HashMap;

use sqlx::postgres::PgConnectOptions;
use sqlx::Connection;

use super::load::TableName;
use crate::error::Result;
use crate::stored::postgres::schema::Schema;
use crate::stored::postgres::PostgresSnapshotDetails;
use crate::work::{self, WorkQueue};

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
    let mut conn = super::connect_options(options, "restore target").await?;
    while let Some(group) = queue.pop() {
        for sql in group {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                .execute(&mut conn)
                .await
                .map_err(|e| super::db_error(&format!("{what}: {sql}"), e))?;
        }
    }
    let _ = conn.close().await;
    Ok(())
}
