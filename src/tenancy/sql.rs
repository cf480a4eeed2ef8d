//! SQL that selects exactly one tenant's rows, with one bound parameter (the tenant id).
//!
//! A path becomes nested semi-joins (`col IN (SELECT key FROM parent WHERE ...)`) rather than
//! joins: a row is selected at most once even if a parent key were not unique, and only the
//! mapped table's columns come back. Every identifier is quoted; the tenant id is always bound,
//! never spliced into the text.

use super::schema::{quote_ident, ColumnSchema, TableSchema};
use super::{Hop, Membership};

/// Which database the SQL is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `?`; values are read as stored and mapped in Rust.
    Sqlite,
    /// `$1` compared as text (the tenant column may be any type); every column rendered to
    /// text by the server in its export form (see [`postgres_column`]).
    Postgres,
}

impl Dialect {
    fn tenant_test(self, column: &str) -> String {
        match self {
            Dialect::Sqlite => format!("{column} = ?"),
            Dialect::Postgres => format!("{column}::text = $1"),
        }
    }

    fn select(self, column: &ColumnSchema) -> String {
        let c = format!("t0.{}", quote_ident(&column.name));
        match self {
            Dialect::Sqlite => c,
            Dialect::Postgres => postgres_column(&c, &column.declared),
        }
    }
}

/// A PostgreSQL column as text in the export's form: arrays as JSON, timestamps with time zone
/// as RFC 3339 UTC with microseconds, bytea as base64, everything else as its text output.
pub fn postgres_column(c: &str, data_type: &str) -> String {
    match data_type {
        "ARRAY" => format!("to_jsonb({c})::text"),
        "timestamp with time zone" => {
            format!("to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
        }
        "timestamp without time zone" => format!("to_char({c}, 'YYYY-MM-DD\"T\"HH24:MI:SS.US')"),
        "bytea" => format!("translate(encode({c}, 'base64'), E'\\n', '')"),
        _ => format!("{c}::text"),
    }
}

/// `SELECT <every column> FROM table WHERE <tenant condition> ORDER BY <primary key>`; `None`
/// for a global table.
pub fn rows_sql(
    table: &TableSchema,
    membership: &Membership,
    column: &str,
    dialect: Dialect,
) -> Option<String> {
    let condition = condition(membership, column, dialect)?;
    let columns: Vec<String> = table.columns.iter().map(|c| dialect.select(c)).collect();
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
    dialect: Dialect,
) -> Option<String> {
    let condition = condition(membership, column, dialect)?;
    let key = format!("t0.{}", quote_ident(key_column));
    let key = match dialect {
        Dialect::Sqlite => key,
        Dialect::Postgres => format!("{key}::text"),
    };
    Some(format!(
        "SELECT {key} FROM {} AS t0 WHERE {condition}",
        quote_ident(table)
    ))
}

/// The WHERE condition on alias `t0` (the mapped table).
fn condition(membership: &Membership, column: &str, dialect: Dialect) -> Option<String> {
    match membership {
        Membership::Global => None,
        Membership::Direct => Some(dialect.tenant_test(&format!("t0.{}", quote_ident(column)))),
        Membership::Path(hops) => Some(path_condition(hops, 0, column, dialect)),
    }
}

fn path_condition(hops: &[Hop], depth: usize, column: &str, dialect: Dialect) -> String {
    let alias = format!("t{depth}");
    let Some((hop, rest)) = hops.split_first() else {
        return dialect.tenant_test(&format!("{alias}.{}", quote_ident(column)));
    };
    let inner = format!("t{}", depth + 1);
    format!(
        "{alias}.{} IN (SELECT {inner}.{} FROM {} AS {inner} WHERE {})",
        quote_ident(&hop.column),
        quote_ident(&hop.key),
        quote_ident(&hop.table),
        path_condition(rest, depth + 1, column, dialect)
    )
}
