//! Tenant-pure snapshot chunks: each chunk of a tenant's table holds one tenant's rows.
//!
//! A restore of one tenant (`restore --tenant`, and the scratch database of a PostgreSQL
//! export) should cost what the tenant's data costs, not what the database costs; and a
//! tenant's data kept apart is what per-tenant keys (crypto-shredding) will need. So the
//! snapshot copies every table that belongs to tenants with its rows ordered by tenant, the
//! tenant's text computed by the server as an extra last column; the client strips that
//! column, cuts a chunk wherever the tenant changes, and records each chunk's tenant in the
//! table image (docs/FORMAT.md §8.4). A restore of one tenant then reads that tenant's chunks
//! of each tenant table and every chunk of the global ones.
//!
//! How a table belongs ([`TenantKey`]) comes from the same rules the restore and the export
//! use ([`TenantRules`]): the config's `[tenancy]` map when there is one, otherwise what the
//! schema says (the `tenant_id` column, else a single-column foreign key to a table that
//! belongs, NOT NULL links first). Every path is stored resolved in the manifest, so a restore
//! can tell whether the snapshot was grouped by the rules it is asked to apply.

use super::schema::{Constraint, Schema, Table};
pub use crate::stored::postgres::copy_text::{copy_unescape_into, split_tenant};
pub use crate::stored::postgres::tenancy::{KeyHop, TableTenancy, TenantKey};
use crate::tenancy::{TableRule, TenancyConfig};

/// The tenant column used when no tenancy map names another.
pub const DEFAULT_TENANT_COLUMN: &str = "tenant_id";

pub use crate::config::postgres_options::GROUP_OPTION;

/// Paths longer than this are not followed (a loop in the schema's foreign keys).
const MAX_HOPS: usize = 8;

/// The rules that say how rows belong to tenants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantRules {
    /// Read from the schema: a table with `column` belongs by it; one without it, through a
    /// single-column foreign key to a table that belongs (NOT NULL links first); every other
    /// table is global.
    Inferred { column: String },
    /// The config's `[tenancy]` map. A table it does not name belongs by the column if it has
    /// it and is global otherwise (a table created after the map was written).
    Map(TenancyConfig),
}

impl Default for TenantRules {
    fn default() -> Self {
        TenantRules::Inferred {
            column: DEFAULT_TENANT_COLUMN.to_string(),
        }
    }
}

impl TenantRules {
    /// The rules for a config: its tenancy map, or inference from the schema.
    pub fn from_config(tenancy: Option<&TenancyConfig>) -> TenantRules {
        tenancy.map_or_else(TenantRules::default, |t| TenantRules::Map(t.clone()))
    }

    /// How `table`'s rows belong; `None`: global.
    pub fn key(&self, schema: &Schema, table: &Table) -> Option<TenantKey> {
        match self {
            TenantRules::Inferred { column } => infer(schema, table, column, 0),
            TenantRules::Map(map) => mapped(map, schema, table),
        }
    }
}

fn infer(schema: &Schema, table: &Table, column: &str, depth: usize) -> Option<TenantKey> {
    if table.column(column).is_some() {
        return Some(TenantKey {
            column: column.to_string(),
            hops: Vec::new(),
        });
    }
    if depth >= MAX_HOPS {
        return None;
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
        let (Some((ps, pn)), [link]) = (&fk.references, fk.columns.as_slice()) else {
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
        if let Some(up) = infer(schema, parent, column, depth + 1) {
            let mut hops = vec![KeyHop {
                column: link.clone(),
                schema: parent.schema.clone(),
                table: parent.name.clone(),
                key: key.clone(),
            }];
            hops.extend(up.hops);
            return Some(TenantKey {
                column: up.column,
                hops,
            });
        }
    }
    None
}

/// The tenancy map's name of a table: bare in `public`, `schema.table` elsewhere.
fn map_name(schema: &str, table: &str) -> String {
    if schema == "public" {
        table.to_string()
    } else {
        format!("{schema}.{table}")
    }
}

fn map_table<'a>(schema: &'a Schema, name: &str) -> Option<&'a Table> {
    match name.split_once('.') {
        Some((s, t)) => schema.table(s, t),
        None => schema.table("public", name),
    }
}

fn mapped(map: &TenancyConfig, schema: &Schema, table: &Table) -> Option<TenantKey> {
    let mut hops = Vec::new();
    let mut current = table;
    loop {
        match map.tables.get(&map_name(&current.schema, &current.name)) {
            Some(TableRule::Global) => return None,
            Some(TableRule::Path(path)) => {
                for hop in path {
                    let next = map_table(schema, &hop.table)?;
                    hops.push(KeyHop {
                        column: hop.column.clone(),
                        schema: next.schema.clone(),
                        table: next.name.clone(),
                        key: hop.key.clone(),
                    });
                    current = next;
                }
                if hops.len() > MAX_HOPS * 4 {
                    return None;
                }
            }
            None if current.column(&map.column).is_some() => {
                return Some(TenantKey {
                    column: map.column.clone(),
                    hops,
                })
            }
            None => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::postgres::schema::test_table as table;
    use crate::tenancy::parse_table_rule;

    fn fixture() -> Schema {
        Schema {
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
        }
    }

    fn hop(column: &str, table: &str) -> KeyHop {
        KeyHop {
            column: column.into(),
            schema: "public".into(),
            table: table.into(),
            key: "id".into(),
        }
    }

    #[test]
    fn inferred_keys_follow_the_column_then_foreign_keys() {
        let schema = fixture();
        let rules = TenantRules::default();
        let key = |name: &str| rules.key(&schema, schema.table("public", name).unwrap());
        assert_eq!(key("plans"), None);
        assert_eq!(key("contracts").unwrap().hops, vec![]);
        assert_eq!(
            key("notes").unwrap().hops,
            vec![
                hop("version_id", "versions"),
                hop("contract_id", "contracts")
            ]
        );
    }

    #[test]
    fn mapped_keys_follow_the_map_and_chain_paths() {
        let schema = fixture();
        let mut map = TenancyConfig {
            column: "tenant_id".into(),
            tables: Default::default(),
            blobs: Default::default(),
            tenant_keys: false,
            keys: Default::default(),
        };
        map.tables.insert("plans".into(), TableRule::Global);
        map.tables.insert(
            "versions".into(),
            parse_table_rule("contract_id -> contracts.id").unwrap(),
        );
        map.tables.insert(
            "notes".into(),
            parse_table_rule("version_id -> versions.id").unwrap(),
        );
        let rules = TenantRules::Map(map);
        let key = |name: &str| rules.key(&schema, schema.table("public", name).unwrap());
        assert_eq!(key("plans"), None);
        assert_eq!(
            key("notes").unwrap(),
            TenantKey {
                column: "tenant_id".into(),
                hops: vec![
                    hop("version_id", "versions"),
                    hop("contract_id", "contracts")
                ]
            }
        );
        assert_eq!(
            key("notes"),
            TenantRules::default().key(&schema, schema.table("public", "notes").unwrap())
        );
    }

    #[test]
    fn sql_nests_one_subquery_per_hop() {
        let key = TenantKey {
            column: "tenant_id".into(),
            hops: vec![
                hop("version_id", "versions"),
                hop("contract_id", "contracts"),
            ],
        };
        assert_eq!(
            key.tenant_sql("t0"),
            "(SELECT (SELECT tv2.\"tenant_id\"::text FROM \"public\".\"contracts\" AS tv2 \
             WHERE tv2.\"id\" = tv1.\"contract_id\" LIMIT 1) FROM \"public\".\"versions\" AS tv1 \
             WHERE tv1.\"id\" = t0.\"version_id\" LIMIT 1)"
        );
        assert_eq!(
            key.link_sql("u.c1::bigint", "$3").unwrap(),
            "u.c1::bigint IN (SELECT tv1.\"id\" FROM \"public\".\"versions\" AS tv1 WHERE \
             tv1.\"contract_id\" IN (SELECT tv2.\"id\" FROM \"public\".\"contracts\" AS tv2 \
             WHERE tv2.\"tenant_id\"::text = $3))"
        );
        let direct = TenantKey {
            column: "tenant_id".into(),
            hops: vec![],
        };
        assert_eq!(direct.tenant_sql("t0"), "t0.\"tenant_id\"::text");
        assert_eq!(direct.link_sql("x", "$1"), None);
    }

    #[test]
    fn the_tenant_field_is_split_off_and_unescaped() {
        let mut row = Vec::new();
        assert_eq!(
            split_tenant(b"1\ta\\tb\t42\n", &mut row).as_deref(),
            Some("42")
        );
        assert_eq!(row, b"1\ta\\tb\n");
        assert_eq!(split_tenant(b"1\t\\N\n", &mut row), None);
        assert_eq!(row, b"1\n");
        assert_eq!(
            split_tenant(b"1\ta\\\\b\n", &mut row).as_deref(),
            Some("a\\b")
        );
    }
}
