//! One tenant's rows only (`restore --tenant ID`).
//!
//! Which rows belong to a tenant is read from the captured schema, until a tenancy map says
//! otherwise: a table with the tenant column (`tenant_id`) holds the rows whose column equals the
//! tenant; a table without it but with a single-column foreign key to such a table (directly or
//! through further parents; NOT NULL links first) holds the rows whose parent was restored; every other table is
//! global and restored whole (shared reference data that tenant rows point at, like `plans`).
//!
//! Snapshot rows are filtered line by line on their COPY text (a tenant column compared with the
//! tenant's text form; a parent column looked up in the parent's restored keys). Replayed
//! inserts carry the same condition in SQL; an update that moves a row to another tenant
//! becomes a delete; deletes and truncates apply as they are (a row that is not there is not
//! deleted twice).

use std::collections::HashSet;

use sqlx::postgres::PgConnection;

use crate::error::{Error, Result};
use crate::source::postgres::quote_ident;
use crate::source::postgres::schema::{Constraint, Schema, Table};

/// The tenant column used until a tenancy map names another.
pub const DEFAULT_TENANT_COLUMN: &str = "tenant_id";

/// Which tenant to restore.
#[derive(Debug, Clone)]
pub struct TenantOptions {
    /// The tenant's value, in PostgreSQL's text form (`42`, a UUID).
    pub tenant: String,
    pub column: String,
}

impl TenantOptions {
    pub fn new(tenant: &str) -> TenantOptions {
        TenantOptions {
            tenant: tenant.to_string(),
            column: DEFAULT_TENANT_COLUMN.to_string(),
        }
    }
}

/// How a table's rows belong to the tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Every row (no tenant column, no parent that has one).
    Global,
    /// Rows whose `column` equals the tenant.
    Column(String),
    /// Rows whose `column` is a key of an already restored row of `parent`.
    Parent {
        column: String,
        parent: String,
        key: String,
    },
}

/// The scope of `table` in `schema`.
pub(crate) fn scope(schema: &Schema, table: &Table, tenant: &TenantOptions) -> Scope {
    scope_at(schema, table, tenant, 0)
}

fn scope_at(schema: &Schema, table: &Table, tenant: &TenantOptions, depth: usize) -> Scope {
    if table.column(&tenant.column).is_some() {
        return Scope::Column(tenant.column.clone());
    }
    if depth > 8 {
        return Scope::Global;
    }
    // A NOT NULL link decides every row; a nullable one only if there is no other.
    let not_null = |c: &&Constraint| {
        c.columns
            .iter()
            .all(|n| table.column(n).is_some_and(|col| col.not_null))
    };
    let fks: Vec<&Constraint> = table.constraints.iter().filter(|c| c.kind == "f").collect();
    let (strong, weak): (Vec<&Constraint>, Vec<&Constraint>) = fks.into_iter().partition(not_null);
    for fk in strong.into_iter().chain(weak) {
        let (Some((ps, pn)), [column]) = (&fk.references, fk.columns.as_slice()) else {
            continue;
        };
        let Some(parent) = schema
            .table(ps, pn)
            .filter(|p| p.name != table.name || p.schema != table.schema)
        else {
            continue;
        };
        let Some([key]) = parent.primary_key.as_ref().map(|pk| pk.columns.as_slice()) else {
            continue;
        };
        if scope_at(schema, parent, tenant, depth + 1) != Scope::Global {
            return Scope::Parent {
                column: column.clone(),
                parent: parent.qualified(),
                key: key.clone(),
            };
        }
    }
    Scope::Global
}

/// Keeps one tenant's lines of a table's COPY text.
pub(crate) enum LineFilter {
    All,
    /// Field `index` must be one of `values` (COPY text form).
    Field {
        index: usize,
        values: HashSet<String>,
    },
}

impl LineFilter {
    /// The filter for a snapshot table whose COPY columns are `columns`. A parent's keys are
    /// read from the target, where the parent was restored already.
    pub(crate) async fn for_table(
        conn: &mut PgConnection,
        schema: &Schema,
        table: &Table,
        columns: &[String],
        tenant: &TenantOptions,
    ) -> Result<LineFilter> {
        let (column, values) = match scope(schema, table, tenant) {
            Scope::Global => return Ok(LineFilter::All),
            Scope::Column(column) => (column, HashSet::from([tenant.tenant.clone()])),
            Scope::Parent {
                column,
                parent,
                key,
            } => {
                let sql = format!("SELECT {}::text FROM {parent}", quote_ident(&key));
                let keys: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(|e| {
                        Error::other(format!("restore target: reading the keys of {parent}: {e}"))
                    })?;
                (column, keys.into_iter().collect())
            }
        };
        let index = columns.iter().position(|c| *c == column).ok_or_else(|| {
            Error::corrupt(format!(
                "table {}: column {column} is not in the snapshot's rows",
                table.qualified()
            ))
        })?;
        Ok(LineFilter::Field { index, values })
    }

    /// The lines of `data` (whole COPY text rows) that belong to the tenant; `None`: all.
    pub(crate) fn apply(&self, data: &[u8]) -> Option<Vec<u8>> {
        let LineFilter::Field { index, values } = self else {
            return None;
        };
        let mut out = Vec::new();
        for line in data.split_inclusive(|&b| b == b'\n') {
            let row = line.strip_suffix(b"\n").unwrap_or(line);
            let field = row.split(|&b| b == b'\t').nth(*index);
            if field.is_some_and(|f| std::str::from_utf8(f).is_ok_and(|f| values.contains(f))) {
                out.extend_from_slice(line);
            }
        }
        Some(out)
    }
}

/// The replay condition for a relation whose columns are `columns`: the index of the scoped
/// column and the SQL condition on its text value `$param` (after the value's cast).
#[derive(Debug, Clone)]
pub(crate) struct RowFilter {
    pub index: usize,
    pub scope: Scope,
}

impl RowFilter {
    pub(crate) fn new(scope: Scope, columns: &[String]) -> Option<RowFilter> {
        let column = match &scope {
            Scope::Global => return None,
            Scope::Column(c) | Scope::Parent { column: c, .. } => c,
        };
        let index = columns.iter().position(|c| c == column)?;
        Some(RowFilter { index, scope })
    }

    /// `WHERE` for `INSERT ... SELECT FROM unnest(...) AS u(c0, c1, ...)`; `tenant_param`
    /// is the placeholder bound to the tenant's text.
    pub(crate) fn insert_condition(&self, cast: &str, tenant_param: &str) -> String {
        let value = format!("u.c{}", self.index);
        match &self.scope {
            Scope::Parent { parent, key, .. } => format!(
                "{value}::{cast} IN (SELECT {} FROM {parent})",
                quote_ident(key)
            ),
            _ => format!("{value} = {tenant_param}"),
        }
    }

    /// Whether [`RowFilter::insert_condition`] uses the tenant parameter.
    pub(crate) fn binds_tenant(&self) -> bool {
        matches!(self.scope, Scope::Column(_))
    }

    /// Whether a row image with these values belongs to the tenant (tenant column only; a
    /// parent link is decided in SQL).
    pub(crate) fn leaves_tenant(&self, values: &[Option<String>], tenant: &str) -> bool {
        matches!(self.scope, Scope::Column(_))
            && values.get(self.index).and_then(|v| v.as_deref()) != Some(tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::postgres::schema::Column;

    fn table(name: &str, columns: &[&str], fk: Option<(&str, &str)>) -> Table {
        Table {
            schema: "public".into(),
            name: name.into(),
            columns: columns
                .iter()
                .map(|c| Column {
                    name: c.to_string(),
                    type_sql: "bigint".into(),
                    not_null: false,
                    default: None,
                    identity: None,
                    generated: None,
                })
                .collect(),
            primary_key: Some(Constraint {
                name: format!("{name}_pkey"),
                kind: "p".into(),
                definition: "PRIMARY KEY (id)".into(),
                columns: vec!["id".into()],
                references: None,
                index: None,
            }),
            constraints: fk
                .map(|(column, parent)| Constraint {
                    name: format!("{name}_fk"),
                    kind: "f".into(),
                    definition: String::new(),
                    columns: vec![column.into()],
                    references: Some(("public".into(), parent.into())),
                    index: None,
                })
                .into_iter()
                .collect(),
            indexes: vec![],
            replica_identity: "d".into(),
            replica_index: None,
        }
    }

    #[test]
    fn scopes_follow_the_tenant_column_then_foreign_keys() {
        let schema = Schema {
            tables: vec![
                table("plans", &["id", "name"], None),
                table(
                    "contracts",
                    &["id", "tenant_id", "plan_id"],
                    Some(("plan_id", "plans")),
                ),
                table(
                    "versions",
                    &["id", "contract_id"],
                    Some(("contract_id", "contracts")),
                ),
                table(
                    "notes",
                    &["id", "version_id"],
                    Some(("version_id", "versions")),
                ),
            ],
            ..Default::default()
        };
        let t = TenantOptions::new("7");
        let of = |name: &str| scope(&schema, schema.table("public", name).unwrap(), &t);
        assert_eq!(of("plans"), Scope::Global);
        assert_eq!(of("contracts"), Scope::Column("tenant_id".into()));
        assert_eq!(
            of("versions"),
            Scope::Parent {
                column: "contract_id".into(),
                parent: "\"public\".\"contracts\"".into(),
                key: "id".into()
            }
        );
        assert!(matches!(of("notes"), Scope::Parent { .. }));
    }

    #[test]
    fn lines_are_kept_by_one_field() {
        let filter = LineFilter::Field {
            index: 1,
            values: HashSet::from(["7".to_string()]),
        };
        let data = b"1\t7\ta\\tb\n2\t8\tc\n3\t7\t\\N\n".to_vec();
        assert_eq!(filter.apply(&data).unwrap(), b"1\t7\ta\\tb\n3\t7\t\\N\n");
        let f = RowFilter::new(
            Scope::Column("tenant_id".into()),
            &["id".into(), "tenant_id".into()],
        )
        .unwrap();
        assert!(f.leaves_tenant(&[Some("1".into()), Some("8".into())], "7"));
        assert!(!f.leaves_tenant(&[Some("1".into()), Some("7".into())], "7"));
        assert_eq!(f.insert_condition("bigint", "$9"), "u.c1 = $9");
    }
}
