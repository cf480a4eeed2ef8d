//! SQL that selects exactly one tenant's rows, with one bound parameter (the tenant id).
//!
//! A path becomes nested semi-joins (`col IN (SELECT key FROM parent WHERE ...)`) rather than
//! joins: a row is selected at most once even if a parent key were not unique, and only the
//! mapped table's columns come back. Every identifier is quoted; the tenant id is always bound,
//! never spliced into the text.

use super::schema::{quote_ident, TableSchema};
use super::{Hop, Membership};

/// `SELECT <every column> FROM table WHERE <tenant condition> ORDER BY <primary key>`; `None`
/// for a global table. `param` is the placeholder (`?` for SQLite, `$1` for PostgreSQL).
pub fn rows_sql(
    table: &TableSchema,
    membership: &Membership,
    column: &str,
    param: &str,
) -> Option<String> {
    let condition = condition(membership, column, param)?;
    let columns: Vec<String> = table
        .columns
        .iter()
        .map(|c| format!("t0.{}", quote_ident(&c.name)))
        .collect();
    let mut sql = format!(
        "SELECT {} FROM {} AS t0 WHERE {condition}",
        columns.join(", "),
        quote_ident(&table.name)
    );
    if !table.primary_key.is_empty() {
        let keys: Vec<String> = table
            .primary_key
            .iter()
            .map(|k| format!("t0.{}", quote_ident(k)))
            .collect();
        sql.push_str(&format!(" ORDER BY {}", keys.join(", ")));
    }
    Some(sql)
}

/// `SELECT key_column FROM table WHERE <tenant condition>`: the blob keys a table lists for
/// the tenant. `None` for a global table.
pub fn blob_keys_sql(
    table: &str,
    key_column: &str,
    membership: &Membership,
    column: &str,
    param: &str,
) -> Option<String> {
    let condition = condition(membership, column, param)?;
    Some(format!(
        "SELECT t0.{} FROM {} AS t0 WHERE {condition}",
        quote_ident(key_column),
        quote_ident(table)
    ))
}

/// The WHERE condition on alias `t0` (the mapped table).
fn condition(membership: &Membership, column: &str, param: &str) -> Option<String> {
    match membership {
        Membership::Global => None,
        Membership::Direct => Some(format!("t0.{} = {param}", quote_ident(column))),
        Membership::Path(hops) => Some(path_condition(hops, 0, column, param)),
    }
}

fn path_condition(hops: &[Hop], depth: usize, column: &str, param: &str) -> String {
    let alias = format!("t{depth}");
    let Some((hop, rest)) = hops.split_first() else {
        return format!("{alias}.{} = {param}", quote_ident(column));
    };
    let inner = format!("t{}", depth + 1);
    format!(
        "{alias}.{} IN (SELECT {inner}.{} FROM {} AS {inner} WHERE {})",
        quote_ident(&hop.column),
        quote_ident(&hop.key),
        quote_ident(&hop.table),
        path_condition(rest, depth + 1, column, param)
    )
}
