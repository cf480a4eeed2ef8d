//! The tenancy map: which rows and which blobs belong to which tenant.
//!
//! A tenant export must contain every row and file of one tenant and nothing of any other, so
//! the rule for each table is written down once, in the config (`[tenancy]`), and checked twice:
//! its syntax when the config loads (with file and line), and against the real schema when the
//! repository is initialised, before every export and before every `restore --tenant` (every
//! table mapped, every path resolving to real columns and every hop ending on a primary key or
//! unique column, so a row can never belong to two tenants). Three ways for a table to belong:
//!
//! * **direct**: the table has the tenancy column (`tenant_id`); not listed in `[tenancy.tables]`;
//! * **path**: `"fk_col -> table.col"`, one hop or several separated by commas
//!   (`"version_id -> contract_versions.id, contract_id -> contracts.id"`): the row belongs to
//!   the tenant of the row it points to. A path may end at a table that is itself mapped by a
//!   path; [`resolve`] flattens the chain until it reaches a table with the column;
//! * **global**: `"global"`, shared by every tenant and never exported.
//!
//! Blob sources: `"prefix:tenants/{tenant}/"` (every key under the prefix) or
//! `"table:attachments.blob_key"` (the keys listed in the tenant's rows of that table).

pub mod schema;
mod sql;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;

use crate::error::{Error, Result};

pub use schema::{ColumnSchema, Schema, TableSchema, ValueKind};
pub use sql::{blob_keys_sql, postgres_column, rows_sql, Dialect};

pub use crate::config::tenancy::{
    is_identifier, parse_blob_rule, parse_table_rule, BlobRule, Hop, TableRule, TenancyConfig,
};

/// How one table's rows belong to a tenant, resolved against a schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    Global,
    /// The table has the tenancy column.
    Direct,
    /// Follow these hops; the last hop's table has the tenancy column.
    Path(Vec<Hop>),
}

/// The tenancy map checked against a schema: one membership per table of the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTenancy {
    pub column: String,
    /// Every table of the schema, in the schema's order.
    pub tables: Vec<(String, Membership)>,
}

impl ResolvedTenancy {
    pub fn membership(&self, table: &str) -> Option<&Membership> {
        self.tables.iter().find(|(t, _)| t == table).map(|(_, m)| m)
    }
}

/// Check `config` against `schema`: every table the map names exists, every table mapped
/// ([`resolve_tables`]), every blob rule's table and column real. `source` names the database
/// in messages.
pub fn resolve(config: &TenancyConfig, schema: &Schema, source: &str) -> Result<ResolvedTenancy> {
    check_stale(config, schema, source)?;
    let resolved = resolve_tables(config, schema, source)?;
    for rule in config.blobs.values() {
        check_blob_rule(&resolved, schema, rule, source)?;
    }
    Ok(resolved)
}

fn check_stale(config: &TenancyConfig, schema: &Schema, source: &str) -> Result<()> {
    let stale: Vec<&str> = config
        .tables
        .keys()
        .filter(|t| !schema.tables.contains_key(*t))
        .map(String::as_str)
        .collect();
    if !stale.is_empty() {
        return Err(Error::config(format!(
            "[tenancy.tables] names table(s) that source {source} does not have: {}",
            stale.join(", ")
        ))
        .with_hint("remove them from the config, or check the table names"));
    }
    Ok(())
}

/// The strict rules a tenant's rows are selected by (export and `restore --tenant`): every
/// table of `schema` has the tenancy column, or is declared global, or has a path whose every
/// hop names real columns and ends on the primary key or a unique column of its table, ending
/// at a table with the tenancy column. An unmapped table is an error naming every one of them,
/// never a table taken whole. Map entries for tables `schema` lacks are not checked here.
pub fn resolve_tables(
    config: &TenancyConfig,
    schema: &Schema,
    source: &str,
) -> Result<ResolvedTenancy> {
    let hint = "map every table in [tenancy.tables] of the config: \"global\", or a path \
                \"fk_col -> table.col\"; or give it the tenancy column";
    let unmapped: Vec<&str> = schema
        .order
        .iter()
        .filter(|t| !config.tables.contains_key(*t) && !has_column(schema, t, &config.column))
        .map(String::as_str)
        .collect();
    if !unmapped.is_empty() {
        return Err(Error::config(format!(
            "unmapped table(s) in source {source}: {} (no `{}` column, no [tenancy.tables] entry)",
            unmapped.join(", "),
            config.column
        ))
        .with_hint(hint));
    }
    let mut tables = Vec::with_capacity(schema.order.len());
    for table in &schema.order {
        let membership = membership(config, schema, table, source)?;
        tables.push((table.clone(), membership));
    }
    Ok(ResolvedTenancy {
        column: config.column.clone(),
        tables,
    })
}

fn has_column(schema: &Schema, table: &str, column: &str) -> bool {
    schema
        .tables
        .get(table)
        .is_some_and(|t| t.column(column).is_some())
}

fn membership(
    config: &TenancyConfig,
    schema: &Schema,
    table: &str,
    source: &str,
) -> Result<Membership> {
    let mut hops = Vec::new();
    let mut seen = BTreeSet::new();
    let mut current = table.to_string();
    loop {
        if !seen.insert(current.clone()) {
            return Err(Error::config(format!(
                "[tenancy.tables] {table}: the path loops back to table {current}"
            ))
            .with_hint("end every path at a table that has the tenancy column"));
        }
        match config.tables.get(&current) {
            Some(TableRule::Global) if current == table => return Ok(Membership::Global),
            Some(TableRule::Global) => {
                return Err(Error::config(format!(
                    "[tenancy.tables] {table}: the path ends at global table {current}, which belongs to no tenant"
                ))
                .with_hint("point the path at a tenant's table, or map the table as \"global\""))
            }
            Some(TableRule::Path(path)) => {
                check_path(schema, &current, path, table, source)?;
                hops.extend(path.iter().cloned());
                current = path.last().expect("a path has a hop").table.clone();
            }
            None if has_column(schema, &current, &config.column) => {
                return Ok(if hops.is_empty() {
                    Membership::Direct
                } else {
                    Membership::Path(hops)
                });
            }
            None => {
                return Err(Error::config(format!(
                    "[tenancy.tables] {table}: the path ends at table {current}, which has no `{}` column and no mapping",
                    config.column
                ))
                .with_hint("extend the path to a table with the tenancy column"))
            }
        }
    }
}

/// Every hop's columns exist, and every hop ends on a key of its table.
fn check_path(
    schema: &Schema,
    start: &str,
    path: &[Hop],
    mapped: &str,
    source: &str,
) -> Result<()> {
    let mut from = start;
    for hop in path {
        let missing = |what: String| {
            Error::config(format!(
                "[tenancy.tables] {mapped}: `{hop}`: {what} in source {source}"
            ))
            .with_hint("a hop is `column_of_this_table -> other_table.its_column`")
        };
        if !has_column(schema, from, &hop.column) {
            return Err(missing(format!(
                "table {from} has no column {}",
                hop.column
            )));
        }
        if !schema.tables.contains_key(&hop.table) {
            return Err(missing(format!("there is no table {}", hop.table)));
        }
        if !has_column(schema, &hop.table, &hop.key) {
            return Err(missing(format!(
                "table {} has no column {}",
                hop.table, hop.key
            )));
        }
        check_hop_key(&schema.tables[&hop.table], hop, mapped, source)?;
        from = &hop.table;
    }
    Ok(())
}

/// A hop that ends on a column that is not unique could lead one row to several rows, of
/// different tenants: that row would belong to each of them.
fn check_hop_key(target: &TableSchema, hop: &Hop, mapped: &str, source: &str) -> Result<()> {
    if target.is_unique_key(&hop.key) {
        return Ok(());
    }
    let table = &target.name;
    let key = match target.primary_key.as_slice() {
        [one] => format!("{table}.{one} (its primary key)"),
        _ => format!("a column of {table} that is unique on its own"),
    };
    Err(Error::config(format!(
        "[tenancy.tables] {mapped}: `{hop}` in source {source}: {table}.{} is neither the primary \
         key nor a unique column of {table}, so one {mapped} row could belong to several tenants",
        hop.key
    ))
    .with_hint(format!(
        "point the hop at {key}, or add a UNIQUE constraint on {table}({}) (not partial, \
         not on an expression)",
        hop.key
    )))
}

fn check_blob_rule(
    resolved: &ResolvedTenancy,
    schema: &Schema,
    rule: &BlobRule,
    source: &str,
) -> Result<()> {
    let BlobRule::Table { table, column } = rule else {
        return Ok(());
    };
    let problem = match resolved.membership(table) {
        None => Some(format!("source {source} has no table {table}")),
        Some(Membership::Global) => Some(format!("table {table} is global")),
        Some(_) if !has_column(schema, table, column) => {
            Some(format!("table {table} has no column {column}"))
        }
        Some(_) => None,
    };
    match problem {
        Some(p) => Err(Error::config(format!("[tenancy.blobs] `{rule}`: {p}"))
            .with_hint("name a tenant table and the column holding blob keys")),
        None => Ok(()),
    }
}

/// A tenant id usable in keys and queries: not empty, no `/`, no control characters.
pub fn check_tenant_id(tenant: &str) -> Result<()> {
    let bad = tenant.is_empty()
        || tenant.trim() != tenant
        || tenant.contains('/')
        || tenant == "."
        || tenant == ".."
        || tenant.chars().any(char::is_control);
    if bad {
        return Err(
            Error::input(format!("`{tenant}` is not a usable tenant id")).with_hint(
                "pass the tenant's id as stored in the tenancy column, e.g. --tenant 1001",
            ),
        );
    }
    Ok(())
}

/// Check the tenancy map against every database source's live schema (`init`): a SQLite file
/// that does not exist yet is skipped (it is checked again before every export).
pub async fn check_sources(config: &crate::config::Config) -> Result<()> {
    use crate::config::SourceKind;
    let Some(tenancy) = &config.tenancy else {
        return Ok(());
    };
    for source in &config.sources {
        let schema = match source.kind() {
            SourceKind::Sqlite if std::path::Path::new(&source.url).exists() => {
                let mut conn = schema::open_sqlite(std::path::Path::new(&source.url)).await?;
                let schema = schema::read_sqlite(&mut conn).await;
                let _ = sqlx::Connection::close(conn).await;
                schema?
            }
            SourceKind::Postgres => schema::read_postgres(&source.url).await?,
            _ => continue,
        };
        resolve(tenancy, &schema, &source.name)
            .map_err(|e| e.context(format!("{}", config.path.display())))?;
    }
    Ok(())
}
