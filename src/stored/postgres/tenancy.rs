//! How a snapshot's table images record their tenants: the key each table's rows find their
//! tenant by (a column, or a path of foreign keys) and the tenant of each chunk. Restore and
//! export read only a tenant's chunks by it, and turn the key into SQL.

use serde::{Deserialize, Serialize};

use crate::pg_connection::quote_ident;

/// One step of a path: follow `column` of the current table to the row of `schema.table`
/// whose `key` equals it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyHop {
    pub column: String,
    pub schema: String,
    pub table: String,
    pub key: String,
}

impl KeyHop {
    fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
}

/// How a table's rows find their tenant: the table's own `column` (no hops), or `column` of
/// the table the hops end at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantKey {
    pub column: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hops: Vec<KeyHop>,
}

impl TenantKey {
    /// The column of the table itself that decides: the tenant column or the first link.
    pub fn first_column(&self) -> &str {
        self.hops.first().map_or(&self.column, |h| &h.column)
    }

    /// SQL for the tenant's text of the row aliased `alias` (NULL when it has none). A path
    /// becomes nested scalar subqueries with `LIMIT 1`, so a key that is not unique can never
    /// duplicate a row.
    pub fn tenant_sql(&self, alias: &str) -> String {
        tenant_at(&self.column, &self.hops, alias, 1)
    }

    /// SQL condition: the row aliased `alias` belongs to the tenant bound as `param`.
    pub fn belongs_sql(&self, alias: &str, param: &str) -> String {
        belongs_at(&self.column, &self.hops, alias, 1, param)
    }

    /// For a key with hops: the SQL condition that `value` (an expression of the first
    /// link's type) names a row of the first hop's table that belongs to the tenant in
    /// `param`. `None` for a key without hops.
    pub fn link_sql(&self, value: &str, param: &str) -> Option<String> {
        let (hop, rest) = self.hops.split_first()?;
        Some(format!(
            "{value} IN (SELECT tv1.{} FROM {} AS tv1 WHERE {})",
            quote_ident(&hop.key),
            hop.qualified(),
            belongs_at(&self.column, rest, "tv1", 2, param)
        ))
    }

    /// For a key with hops: the query for the tenant of the first hop's row whose key is the
    /// SQL literal `literal` (no row: no result). `None` for a key without hops.
    pub fn link_tenant_sql(&self, literal: &str) -> Option<String> {
        let (hop, rest) = self.hops.split_first()?;
        Some(format!(
            "SELECT {} FROM {} AS tv1 WHERE tv1.{} = {literal} LIMIT 1",
            tenant_at(&self.column, rest, "tv1", 2),
            hop.qualified(),
            quote_ident(&hop.key)
        ))
    }

    /// For a key with hops: `SELECT key::text FROM first_hop_table WHERE <belongs>`, the
    /// values the first link may hold. `None` for a key without hops.
    pub fn link_keys_sql(&self, param: &str) -> Option<String> {
        let (hop, rest) = self.hops.split_first()?;
        Some(format!(
            "SELECT tv1.{}::text FROM {} AS tv1 WHERE {}",
            quote_ident(&hop.key),
            hop.qualified(),
            belongs_at(&self.column, rest, "tv1", 2, param)
        ))
    }
}

fn tenant_at(column: &str, hops: &[KeyHop], alias: &str, depth: usize) -> String {
    match hops.split_first() {
        None => format!("{alias}.{}::text", quote_ident(column)),
        Some((hop, rest)) => {
            let inner = format!("tv{depth}");
            format!(
                "(SELECT {} FROM {} AS {inner} WHERE {inner}.{} = {alias}.{} LIMIT 1)",
                tenant_at(column, rest, &inner, depth + 1),
                hop.qualified(),
                quote_ident(&hop.key),
                quote_ident(&hop.column)
            )
        }
    }
}

fn belongs_at(column: &str, hops: &[KeyHop], alias: &str, depth: usize, param: &str) -> String {
    match hops.split_first() {
        None => format!("{alias}.{}::text = {param}", quote_ident(column)),
        Some((hop, rest)) => {
            let inner = format!("tv{depth}");
            format!(
                "{alias}.{} IN (SELECT {inner}.{} FROM {} AS {inner} WHERE {})",
                quote_ident(&hop.column),
                quote_ident(&hop.key),
                hop.qualified(),
                belongs_at(column, rest, &inner, depth + 1, param)
            )
        }
    }
}

/// A table image's grouping by tenant (snapshots taken since tenant grouping; absent before).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableTenancy {
    /// How the rows found their tenant; absent: the table is global and was not grouped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<TenantKey>,
    /// The tenant of each chunk, in the image's chunk order (`null`: rows of no tenant).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunk_tenants: Vec<Option<String>>,
}
