//! One tenant's rows only (`restore --tenant ID`, and the scratch database of an export).
//!
//! Which rows belong to a tenant is said by [`TenantRules`]: the config's tenancy map, or
//! what the schema says. A snapshot grouped by the same rules (every table image records the
//! key it was grouped by, [`crate::source::postgres::grouping`]) is read by chunk: the
//! tenant's chunks of each tenant table and every chunk of the global ones, nothing else.
//! An older snapshot, or one grouped by other rules, is read whole and filtered line by line
//! on its COPY text (a tenant column compared with the tenant's text form; a link column
//! looked up among the keys its parent table holds for the tenant in the target).
//!
//! Replayed inserts carry the same condition in SQL; an update that moves a row to another
//! tenant becomes a delete; deletes and truncates apply as they are (a row that is not there
//! is not deleted twice).
//!
//! With the config's map the rules are strict, as an export's are
//! ([`crate::tenancy::resolve_tables`]): [`TenantOptions::check_schema`] refuses a snapshot
//! with a table that is neither mapped nor declared global (or a path that does not end on a
//! key) before anything is created, and [`TenantOptions::row_filter`] does the same for a table
//! the change log creates later. A table is never restored whole because nobody mapped it.

use std::collections::HashSet;

use sqlx::postgres::PgConnection;

use crate::error::{Error, Result};
use crate::source::postgres::grouping::TenantRules;
use crate::stored::postgres::schema::{Schema, Table};
use crate::stored::postgres::tenancy::TenantKey;
use crate::stored::postgres::{PostgresSnapshotDetails, TableImage};
use crate::tenancy::{ColumnSchema, TenancyConfig, ValueKind};

/// Which tenant to restore, and by which rules.
#[derive(Debug, Clone)]
pub struct TenantOptions {
    /// The tenant's value, in PostgreSQL's text form (`42`, a UUID).
    pub tenant: String,
    pub rules: TenantRules,
}

impl TenantOptions {
    /// A tenant by the rules the schema implies (`tenant_id` and foreign keys).
    pub fn new(tenant: &str) -> TenantOptions {
        TenantOptions {
            tenant: tenant.to_string(),
            rules: TenantRules::default(),
        }
    }

    /// A tenant by the config's tenancy map when there is one.
    pub fn with_map(tenant: &str, map: Option<&TenancyConfig>) -> TenantOptions {
        TenantOptions {
            tenant: tenant.to_string(),
            rules: TenantRules::from_config(map),
        }
    }

    /// `restore --tenant` as the CLI runs it: by the config's tenancy map, which it requires
    /// (without one nothing is declared global, so nothing but tenant tables could be restored).
    pub fn strict(tenant: &str, map: Option<&TenancyConfig>) -> Result<TenantOptions> {
        let map = map.ok_or_else(|| {
            Error::config("restore --tenant needs a [tenancy] section in the config").with_hint(
                "map every table in [tenancy] / [tenancy.tables]: the tenancy column, a path \
                 \"fk_col -> table.col\", or \"global\" (README \"Tenant export\")",
            )
        })?;
        Ok(TenantOptions::with_map(tenant, Some(map)))
    }

    /// With the config's map: every table of `schema` must be covered by it, by the rules an
    /// export applies ([`crate::tenancy::resolve_tables`]); an unmapped table is an error naming
    /// it. Run before anything is restored. Rules inferred from the schema accept any schema.
    pub fn check_schema(&self, schema: &Schema, source: &str) -> Result<()> {
        let TenantRules::Map(map) = &self.rules else {
            return Ok(());
        };
        crate::tenancy::resolve_tables(map, &tenancy_schema(schema), source)
            .map(|_| ())
            .map_err(|e| e.context("restore --tenant"))
    }

    /// The replay filter for changes to `table` (whose relation has `columns`); with the map,
    /// an error when `schema` (as replayed so far: the change log may have created `table`)
    /// is not covered by it.
    pub fn row_filter(
        &self,
        schema: &Schema,
        table: &Table,
        columns: &[String],
    ) -> Result<Option<RowFilter>> {
        self.check_schema(schema, "the change log")
            .map_err(|e| e.context(format!("replaying changes to {}", table.qualified())))?;
        Ok(RowFilter::new(self.key(schema, table), columns))
    }

    /// How `table`'s rows belong to the tenant; `None`: global, restored whole.
    pub(crate) fn key(&self, schema: &Schema, table: &Table) -> Option<TenantKey> {
        self.rules.key(schema, table)
    }

    /// Whether the snapshot's chunks were grouped by exactly these rules, so the tenant's
    /// chunks can be read alone.
    pub(crate) fn grouped_alike(&self, details: &PostgresSnapshotDetails) -> bool {
        details.tables.iter().all(|image| {
            let (Some(grouping), Some(table)) = (
                &image.tenancy,
                details.schema.table(&image.schema, &image.name),
            ) else {
                return false;
            };
            let complete =
                grouping.key.is_none() || grouping.chunk_tenants.len() == image.chunks.len();
            complete && grouping.key == self.key(&details.schema, table)
        })
    }

    /// The snapshot's images cut down to the tenant's chunks (every chunk of a global table).
    /// Only for snapshots [`TenantOptions::grouped_alike`].
    pub(crate) fn select_chunks(&self, details: &PostgresSnapshotDetails) -> Vec<TableImage> {
        details
            .tables
            .iter()
            .map(|image| {
                let mut image = image.clone();
                if let Some(grouping) = image.tenancy.as_ref().filter(|g| g.key.is_some()) {
                    image.chunks = image
                        .chunks
                        .iter()
                        .zip(&grouping.chunk_tenants)
                        .filter(|(_, t)| t.as_deref() == Some(self.tenant.as_str()))
                        .map(|(c, _)| c.clone())
                        .collect();
                    image.bytes = image.chunks.iter().map(|c| c.len).sum();
                }
                image
            })
            .collect()
    }
}

/// The tables of a snapshot's schema as the tenancy map names and checks them: bare in
/// `public`, `schema.table` elsewhere; primary keys, unique constraints and plain unique
/// indexes (a partial index or one on an expression does not make a column a key).
fn tenancy_schema(schema: &Schema) -> crate::tenancy::Schema {
    let mut out = crate::tenancy::Schema::default();
    for table in &schema.tables {
        out.push(crate::tenancy::TableSchema {
            name: if table.schema == "public" {
                table.name.clone()
            } else {
                format!("{}.{}", table.schema, table.name)
            },
            columns: table
                .columns
                .iter()
                .map(|c| ColumnSchema {
                    name: c.name.clone(),
                    declared: c.type_sql.clone(),
                    kind: ValueKind::Text,
                })
                .collect(),
            primary_key: table
                .primary_key
                .as_ref()
                .map(|pk| pk.columns.clone())
                .unwrap_or_default(),
            unique: unique_sets(table),
        });
    }
    out
}

fn unique_sets(table: &Table) -> Vec<Vec<String>> {
    let constraints = table
        .constraints
        .iter()
        .filter(|c| c.kind == "u" && !c.definition.contains(" WHERE "))
        .map(|c| c.columns.clone());
    let indexes = table
        .indexes
        .iter()
        .filter_map(|i| unique_index_columns(&i.definition));
    constraints.chain(indexes).collect()
}

/// The columns of `CREATE UNIQUE INDEX name ON table USING method (a, "B")` as
/// `pg_get_indexdef` prints it; `None` for any other index, a partial one, or one whose list
/// holds anything but plain column names (expressions, options). When unsure: `None`.
fn unique_index_columns(definition: &str) -> Option<Vec<String>> {
    if !definition.starts_with("CREATE UNIQUE INDEX ") || definition.contains(" WHERE ") {
        return None;
    }
    let (_, method) = definition.split_once(" USING ")?;
    let (_, list) = method.split_once('(')?;
    let (list, _) = list.split_once(')')?;
    list.split(", ").map(unquote_column).collect()
}

fn unquote_column(text: &str) -> Option<String> {
    if let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        let bare = inner.replace("\"\"", "");
        return (!bare.contains('"') && !inner.is_empty()).then(|| inner.replace("\"\"", "\""));
    }
    let plain = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$';
    (!text.is_empty() && text.chars().all(plain)).then(|| text.to_string())
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
    /// The filter for a snapshot table whose COPY columns are `columns`. A link's allowed
    /// values are read from the target, where the tables it leads to were restored already.
    pub(crate) async fn for_table(
        conn: &mut PgConnection,
        schema: &Schema,
        table: &Table,
        columns: &[String],
        tenant: &TenantOptions,
    ) -> Result<LineFilter> {
        let Some(key) = tenant.key(schema, table) else {
            return Ok(LineFilter::All);
        };
        let values = match key.link_keys_sql("$1") {
            None => HashSet::from([tenant.tenant.clone()]),
            Some(sql) => {
                let keys: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(&tenant.tenant)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(|e| {
                        Error::other(format!(
                            "restore target: reading the keys {} may point at: {e}",
                            table.qualified()
                        ))
                    })?;
                keys.into_iter().collect()
            }
        };
        let column = key.first_column();
        let index = columns.iter().position(|c| c == column).ok_or_else(|| {
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

/// Load order for a filtered restore: a table whose rows are found through links loads after
/// the tables the links lead to (fewer hops first; global and direct tables first of all).
pub(crate) fn load_rank(tenant: &TenantOptions, schema: &Schema, image: &TableImage) -> usize {
    schema
        .table(&image.schema, &image.name)
        .and_then(|t| tenant.key(schema, t))
        .map_or(0, |k| k.hops.len())
}

/// The replay condition for a relation whose columns are `columns`: the index of the column
/// that decides and the key it decides by.
#[derive(Debug, Clone)]
pub struct RowFilter {
    pub index: usize,
    pub key: TenantKey,
}

impl RowFilter {
    pub(crate) fn new(key: Option<TenantKey>, columns: &[String]) -> Option<RowFilter> {
        let key = key?;
        let index = columns.iter().position(|c| c == key.first_column())?;
        Some(RowFilter { index, key })
    }

    /// `WHERE` for `INSERT ... SELECT FROM unnest(...) AS u(c0, c1, ...)`; `cast` is the
    /// deciding column's type and `tenant_param` the placeholder bound to the tenant's text.
    pub(crate) fn insert_condition(&self, cast: &str, tenant_param: &str) -> String {
        let value = format!("u.c{}", self.index);
        self.key
            .link_sql(&format!("{value}::{cast}"), tenant_param)
            .unwrap_or_else(|| format!("{value} = {tenant_param}"))
    }

    /// Whether a row image with these values belongs to another tenant (the tenant column
    /// only; a link is decided in SQL).
    pub(crate) fn leaves_tenant(&self, values: &[Option<String>], tenant: &str) -> bool {
        self.key.hops.is_empty()
            && values.get(self.index).and_then(|v| v.as_deref()) != Some(tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stored::postgres::tenancy::{KeyHop, TableTenancy};

    #[test]
    fn lines_are_kept_by_one_field() {
        let filter = LineFilter::Field {
            index: 1,
            values: HashSet::from(["7".to_string()]),
        };
        let data = b"1\t7\ta\\tb\n2\t8\tc\n3\t7\t\\N\n".to_vec();
        assert_eq!(filter.apply(&data).unwrap(), b"1\t7\ta\\tb\n3\t7\t\\N\n");
        let direct = TenantKey {
            column: "tenant_id".into(),
            hops: vec![],
        };
        let f = RowFilter::new(Some(direct), &["id".into(), "tenant_id".into()]).unwrap();
        assert!(f.leaves_tenant(&[Some("1".into()), Some("8".into())], "7"));
        assert!(!f.leaves_tenant(&[Some("1".into()), Some("7".into())], "7"));
        assert_eq!(f.insert_condition("bigint", "$9"), "u.c1 = $9");
        let linked = TenantKey {
            column: "tenant_id".into(),
            hops: vec![KeyHop {
                column: "contract_id".into(),
                schema: "public".into(),
                table: "contracts".into(),
                key: "id".into(),
            }],
        };
        let f = RowFilter::new(Some(linked), &["id".into(), "contract_id".into()]).unwrap();
        assert!(!f.leaves_tenant(&[Some("1".into()), Some("8".into())], "7"));
        assert_eq!(
            f.insert_condition("bigint", "$3"),
            "u.c1::bigint IN (SELECT tv1.\"id\" FROM \"public\".\"contracts\" AS tv1 \
             WHERE tv1.\"tenant_id\"::text = $3)"
        );
        assert!(RowFilter::new(None, &["id".into()]).is_none());
    }

    fn strict_schema() -> Schema {
        use crate::stored::postgres::schema::test_table as table;
        Schema {
            tables: vec![
                table("plans", &["id", "name"], None),
                table("contracts", &["id", "tenant_id"], None),
                table(
                    "notes",
                    &["id", "contract_id"],
                    Some(("contract_id", "contracts")),
                ),
                table("webhooks", &["id", "url"], None),
            ],
            ..Default::default()
        }
    }

    fn map(tables: &[(&str, &str)]) -> TenancyConfig {
        TenancyConfig {
            column: "tenant_id".into(),
            tables: tables
                .iter()
                .map(|(t, r)| (t.to_string(), crate::tenancy::parse_table_rule(r).unwrap()))
                .collect(),
            blobs: Default::default(),
            tenant_keys: false,
            keys: Default::default(),
        }
    }

    #[test]
    fn a_map_that_misses_a_table_is_refused_naming_it() {
        let schema = strict_schema();
        let partial = map(&[
            ("plans", "global"),
            ("notes", "contract_id -> contracts.id"),
        ]);
        let strict = TenantOptions::strict("1", Some(&partial)).unwrap();
        let err = strict.check_schema(&schema, "db").unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Config);
        assert!(err.to_string().contains("webhooks"), "{err}");
        assert!(err.to_string().contains("restore --tenant"), "{err}");
        // Without a map the schema's own rules apply: webhooks is global, as before.
        TenantOptions::new("1").check_schema(&schema, "db").unwrap();
        // Declared global: accepted.
        let mut full = partial.clone();
        full.tables
            .insert("webhooks".into(), crate::tenancy::TableRule::Global);
        let strict = TenantOptions::strict("1", Some(&full)).unwrap();
        strict.check_schema(&schema, "db").unwrap();
        // A table the change log creates later is held to the same rule.
        let mut replayed = schema.clone();
        let late = crate::stored::postgres::schema::test_table("late", &["id", "x"], None);
        replayed.tables.push(late.clone());
        let columns = vec!["id".to_string(), "x".to_string()];
        let err = strict.row_filter(&replayed, &late, &columns).unwrap_err();
        assert!(err.to_string().contains("late"), "{err}");
        let notes = &schema.tables[2];
        let filter = strict
            .row_filter(&schema, notes, &["id".into(), "contract_id".into()])
            .unwrap()
            .expect("notes belong through their contract");
        assert_eq!(filter.index, 1);
    }

    #[test]
    fn restore_tenant_needs_a_map() {
        let err = TenantOptions::strict("1", None).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Config);
        assert!(err.to_string().contains("[tenancy]"), "{err}");
    }

    #[test]
    fn hops_end_on_keys_of_the_snapshot_schema() {
        let mut schema = strict_schema();
        schema.tables[1]
            .columns
            .push(crate::stored::postgres::schema::Column {
                name: "number".into(),
                type_sql: "text".into(),
                ..Default::default()
            });
        let by_number = map(&[
            ("plans", "global"),
            ("webhooks", "global"),
            ("notes", "contract_id -> contracts.number"),
        ]);
        let strict = TenantOptions::strict("1", Some(&by_number)).unwrap();
        let err = strict.check_schema(&schema, "db").unwrap_err();
        assert!(err.to_string().contains("unique"), "{err}");
        schema.tables[1]
            .indexes
            .push(crate::stored::postgres::schema::Index {
                name: "contracts_number".into(),
                definition:
                    "CREATE UNIQUE INDEX contracts_number ON public.contracts USING btree (number)"
                        .into(),
            });
        strict.check_schema(&schema, "db").unwrap();
    }

    #[test]
    fn unique_index_definitions_are_read_conservatively() {
        let cols = |d: &str| unique_index_columns(d);
        let on = |list: &str| format!("CREATE UNIQUE INDEX i ON public.t USING btree ({list})");
        assert_eq!(cols(&on("a")), Some(vec!["a".to_string()]));
        assert_eq!(
            cols(&on("a, \"B\"\"x\"")),
            Some(vec!["a".to_string(), "B\"x".to_string()])
        );
        assert_eq!(
            cols(&format!("{} INCLUDE (b)", on("a"))),
            Some(vec!["a".to_string()])
        );
        for not_a_key in [
            on("lower(a)"),
            format!("{} WHERE (a > 0)", on("a")),
            on("a DESC"),
            on("\"a, b\""),
            "CREATE INDEX i ON public.t USING btree (a)".to_string(),
        ] {
            assert_eq!(cols(&not_a_key), None, "{not_a_key}");
        }
    }

    fn details(grouping: Option<TableTenancy>) -> PostgresSnapshotDetails {
        let table =
            crate::stored::postgres::schema::test_table("contracts", &["id", "tenant_id"], None);
        let chunk = |id: &str| crate::repo::ChunkRef {
            id: id.into(),
            len: 10,
        };
        PostgresSnapshotDetails {
            server_version: "15".into(),
            slot: "s".into(),
            publication: "p".into(),
            snapshot: "1:1:".into(),
            wal_lsn: "0/0".into(),
            start: Default::default(),
            schema: Schema {
                tables: vec![table],
                ..Default::default()
            },
            schema_image: None,
            tables: vec![TableImage {
                schema: "public".into(),
                name: "contracts".into(),
                columns: vec!["id".into(), "tenant_id".into()],
                rows: 3,
                bytes: 30,
                chunks: vec![chunk("a"), chunk("b"), chunk("c")],
                tenancy: grouping,
            }],
            image_digest: None,
        }
    }

    #[test]
    fn chunks_are_selected_only_from_snapshots_grouped_by_the_same_rules() {
        let key = TenantKey {
            column: "tenant_id".into(),
            hops: vec![],
        };
        let tenants = vec![
            Some("1".to_string()),
            Some("2".to_string()),
            Some("1".into()),
        ];
        let grouped = details(Some(TableTenancy {
            key: Some(key.clone()),
            chunk_tenants: tenants.clone(),
        }));
        let one = TenantOptions::new("1");
        assert!(one.grouped_alike(&grouped));
        let selected = one.select_chunks(&grouped);
        let ids: Vec<&str> = selected[0].chunks.iter().map(|c| c.id.as_str()).collect();
        assert_eq!((ids, selected[0].bytes), (vec!["a", "c"], 20));
        // Older snapshots, other rules, an incomplete index: every chunk, filtered.
        assert!(!one.grouped_alike(&details(None)));
        let other_column = TenantOptions {
            tenant: "1".into(),
            rules: TenantRules::Inferred {
                column: "org_id".into(),
            },
        };
        assert!(!other_column.grouped_alike(&grouped));
        let short = details(Some(TableTenancy {
            key: Some(key),
            chunk_tenants: tenants[..2].to_vec(),
        }));
        assert!(!one.grouped_alike(&short));
    }
}
