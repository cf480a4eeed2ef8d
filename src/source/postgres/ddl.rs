//! Schema changes inside the change log (`S` records).
//!
//! Logical decoding carries no DDL. What it does carry is a Relation message before the first
//! change to a table in every decoding session, and again after the table's definition
//! changed. Capture compares every Relation message with the shape it last recorded for that
//! table (at first, the snapshot's schema) and, when the columns differ or the table is new,
//! writes an `S` record with the table's definition right before the `R` record; restore then
//! creates or alters the table at exactly that point of the replay.
//!
//! Column names, order and types come from the Relation message, so they are exact at that
//! LSN even when later DDL already changed the catalog. Defaults, NOT NULL, constraints,
//! indexes, owned sequences and user types come from the catalog as it is when capture runs
//! (read on a second connection, because the first one is streaming the slot); restore treats
//! that part as best effort (docs/ARCHITECTURE.md, "Schema changes").

use std::collections::{BTreeSet, HashMap};

use sqlx::postgres::PgConnection;
use sqlx::Row;

use super::pgoutput::RelationColumn;
use super::schema::{self, Column, Constraint, Schema, Table};
use super::{connect, pg_error};
use crate::error::Result;
pub use crate::stored::postgres::ddl::SchemaChange;

/// Stored columns as (name, type), the shape compared between Relation messages.
type Shape = Vec<(String, String)>;

/// Remembers each table's last recorded shape and says when a Relation message changes it.
pub struct SchemaTracker {
    url: String,
    lookup: Option<PgConnection>,
    shapes: HashMap<(String, String), Shape>,
    /// Shapes recorded by the batch being read; kept only once the batch is stored.
    pending: HashMap<(String, String), Shape>,
    /// `format_type(oid, typmod)` of the types seen in Relation messages.
    types: HashMap<(u32, i32), String>,
    /// The catalog, read at most once per batch.
    catalog: Option<Schema>,
    /// Record every relation once (right after a rotation, so the chain that just ended gets
    /// the definitions too).
    announce_all: bool,
}

impl SchemaTracker {
    pub fn new(url: &str) -> SchemaTracker {
        SchemaTracker {
            url: url.to_string(),
            lookup: None,
            shapes: HashMap::new(),
            pending: HashMap::new(),
            types: HashMap::new(),
            catalog: None,
            announce_all: false,
        }
    }

    /// A chain starts (or resumes) from this snapshot schema. `announce_all`: the next batch
    /// records every relation it meets.
    pub fn reset(&mut self, schema: &Schema, announce_all: bool) {
        self.shapes = schema
            .tables
            .iter()
            .map(|t| {
                let shape = t
                    .stored_columns()
                    .map(|c| (c.name.clone(), c.type_sql.clone()))
                    .collect();
                ((t.schema.clone(), t.name.clone()), shape)
            })
            .collect();
        self.announce_all = announce_all;
    }

    /// A batch starts: whatever an unstored batch recorded is forgotten, and the catalog is
    /// read again when needed.
    pub fn begin_batch(&mut self) {
        self.pending.clear();
        self.catalog = None;
    }

    /// The batch is stored: its `S` records count.
    pub fn commit_batch(&mut self) {
        self.shapes.extend(self.pending.drain());
        self.announce_all = false;
    }

    /// The `S` record to write before this Relation message, if the table is new or changed.
    pub async fn observe(
        &mut self,
        namespace: &str,
        name: &str,
        columns: &[RelationColumn],
    ) -> Result<Option<SchemaChange>> {
        self.resolve_types(columns).await?;
        let shape: Shape = columns
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    self.types[&(c.type_oid, c.type_mod)].clone(),
                )
            })
            .collect();
        let key = (namespace.to_string(), name.to_string());
        let known = self.pending.get(&key).or_else(|| self.shapes.get(&key));
        let announced = self.pending.contains_key(&key);
        if known == Some(&shape) && (announced || !self.announce_all) {
            return Ok(None);
        }
        if self.catalog.is_none() {
            let conn = self.lookup().await?;
            self.catalog = Some(schema::capture(conn).await?);
        }
        let catalog = self.catalog.as_ref().expect("read above");
        let keys: Vec<bool> = columns.iter().map(|c| c.key).collect();
        let change = plan_change(namespace, name, &shape, &keys, catalog);
        self.pending.insert(key, shape);
        Ok(Some(change))
    }

    /// The catalog as this batch read it (when a table was new or changed).
    pub fn catalog(&self) -> Option<&Schema> {
        self.catalog.as_ref()
    }

    /// Forget the catalog lookup connection and the type names read through it (after a
    /// failed step the server may have restarted or been replaced); both come back on use.
    pub fn disconnect(&mut self) {
        self.lookup = None;
        self.types.clear();
        self.catalog = None;
    }

    async fn lookup(&mut self) -> Result<&mut PgConnection> {
        if self.lookup.is_none() {
            self.lookup = Some(connect(&self.url).await?);
        }
        Ok(self.lookup.as_mut().expect("connected above"))
    }

    async fn resolve_types(&mut self, columns: &[RelationColumn]) -> Result<()> {
        let missing: BTreeSet<(u32, i32)> = columns
            .iter()
            .map(|c| (c.type_oid, c.type_mod))
            .filter(|t| !self.types.contains_key(t))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let oids: Vec<i64> = missing.iter().map(|t| i64::from(t.0)).collect();
        let mods: Vec<i32> = missing.iter().map(|t| t.1).collect();
        let conn = self.lookup().await?;
        let rows = sqlx::query(
            "SELECT o, m, format_type(o::oid, m) FROM unnest($1::int8[], $2::int4[]) AS u(o, m)",
        )
        .bind(oids)
        .bind(mods)
        .fetch_all(conn)
        .await
        .map_err(|e| pg_error("naming column types", e))?;
        for r in rows {
            let oid: i64 = r.get(0);
            self.types
                .insert((oid as u32, r.get(1)), r.get::<String, _>(2));
        }
        Ok(())
    }
}

/// The table's definition with the message's columns and types: catalog details where the
/// catalog still has a column of that name, and only the constraints and indexes whose columns all
/// exist. A table the catalog no longer has gets its primary key from the message's key flags.
pub fn plan_change(
    namespace: &str,
    name: &str,
    shape: &[(String, String)],
    keys: &[bool],
    catalog: &Schema,
) -> SchemaChange {
    let current = catalog.table(namespace, name);
    let has = |c: &str| shape.iter().any(|(n, _)| n == c);
    let covered = |c: &Constraint| !c.columns.is_empty() && c.columns.iter().all(|n| has(n));
    let mut columns: Vec<Column> = shape
        .iter()
        .map(|(n, t)| {
            current
                .and_then(|tbl| tbl.column(n))
                .filter(|c| c.generated.is_none())
                .map(|c| Column {
                    type_sql: t.clone(),
                    ..c.clone()
                })
                .unwrap_or(Column {
                    name: n.clone(),
                    type_sql: t.clone(),
                    not_null: false,
                    default: None,
                    identity: None,
                    generated: None,
                    ..Default::default()
                })
        })
        .collect();
    let table = match current {
        Some(tbl) => {
            columns.extend(
                tbl.columns
                    .iter()
                    .filter(|c| c.generated.is_some())
                    .cloned(),
            );
            Table {
                schema: namespace.to_string(),
                name: name.to_string(),
                columns,
                primary_key: tbl.primary_key.clone().filter(|c| covered(c)),
                constraints: tbl
                    .constraints
                    .iter()
                    .filter(|c| c.kind == "c" && c.columns.is_empty() || covered(c))
                    .cloned()
                    .collect(),
                indexes: tbl.indexes.clone(),
                replica_identity: tbl.replica_identity.clone(),
                replica_index: tbl.replica_index.clone(),
                options: tbl.options.clone(),
                toast_options: tbl.toast_options.clone(),
            }
        }
        None => Table {
            schema: namespace.to_string(),
            name: name.to_string(),
            primary_key: key_from_flags(name, shape, keys),
            columns,
            constraints: Vec::new(),
            indexes: Vec::new(),
            replica_identity: "d".into(),
            replica_index: None,
            options: Vec::new(),
            toast_options: Vec::new(),
        },
    };
    let sequences = catalog
        .sequences
        .iter()
        .filter(|s| {
            s.owned_by
                .as_ref()
                .is_some_and(|o| o.schema == namespace && o.table == name && has(&o.column))
        })
        .cloned()
        .collect();
    let schemas = [namespace.to_string()]
        .into_iter()
        .chain(catalog.schemas.iter().cloned())
        .filter(|s| s != "public")
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    SchemaChange {
        table,
        sequences,
        enums: catalog.enums.clone(),
        domains: catalog.domains.clone(),
        schemas,
    }
}

fn key_from_flags(name: &str, shape: &[(String, String)], keys: &[bool]) -> Option<Constraint> {
    let columns: Vec<String> = shape
        .iter()
        .zip(keys)
        .filter(|(_, &k)| k)
        .map(|((n, _), _)| n.clone())
        .collect();
    if columns.is_empty() || columns.len() == shape.len() {
        return None;
    }
    let list: Vec<String> = columns.iter().map(|c| super::quote_ident(c)).collect();
    Some(Constraint {
        name: format!("{name}_pkey"),
        kind: "p".into(),
        definition: format!("PRIMARY KEY ({})", list.join(", ")),
        columns,
        references: None,
        index: Some(format!("{name}_pkey")),
        referenced: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, type_sql: &str, default: Option<&str>) -> Column {
        Column {
            name: name.into(),
            type_sql: type_sql.into(),
            not_null: true,
            default: default.map(str::to_string),
            identity: None,
            generated: None,
            ..Default::default()
        }
    }

    fn catalog() -> Schema {
        Schema {
            tables: vec![Table {
                schema: "public".into(),
                name: "t".into(),
                columns: vec![
                    column("id", "integer", None),
                    column("score", "bigint", Some("7")),
                ],
                primary_key: Some(Constraint {
                    name: "t_pkey".into(),
                    kind: "p".into(),
                    definition: "PRIMARY KEY (id)".into(),
                    columns: vec!["id".into()],
                    references: None,
                    index: Some("t_pkey".into()),
                    referenced: Vec::new(),
                }),
                constraints: vec![Constraint {
                    name: "t_score_check".into(),
                    kind: "c".into(),
                    definition: "CHECK (score > 0)".into(),
                    columns: vec!["score".into()],
                    references: None,
                    index: None,
                    referenced: Vec::new(),
                }],
                indexes: vec![],
                replica_identity: "d".into(),
                replica_index: None,
                options: Vec::new(),
                toast_options: Vec::new(),
            }],
            ..Default::default()
        }
    }

    fn shape(cols: &[(&str, &str)]) -> Vec<(String, String)> {
        cols.iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn columns_come_from_the_message_and_details_from_a_matching_catalog() {
        // The catalog is ahead: `name` was dropped and `score` retyped after this message.
        let s = shape(&[("id", "integer"), ("name", "text"), ("score", "integer")]);
        let change = plan_change("public", "t", &s, &[true, false, false], &catalog());
        let names: Vec<&str> = change
            .table
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["id", "name", "score"]);
        assert_eq!(change.table.columns[2].type_sql, "integer");
        assert_eq!(change.table.columns[2].default.as_deref(), Some("7"));
        assert_eq!(change.table.columns[1].default, None, "not in the catalog");
        assert!(change.table.primary_key.is_some());
        assert_eq!(change.table.constraints.len(), 1);
        // Without `score`, its check constraint is left out.
        let s = shape(&[("id", "integer")]);
        let change = plan_change("public", "t", &s, &[true], &catalog());
        assert!(change.table.constraints.is_empty());
    }

    #[test]
    fn a_table_the_catalog_lost_gets_its_key_from_the_message() {
        let s = shape(&[("a", "integer"), ("b", "text")]);
        let change = plan_change("app", "gone", &s, &[true, false], &Schema::default());
        let pk = change.table.primary_key.unwrap();
        assert_eq!(pk.definition, "PRIMARY KEY (\"a\")");
        assert_eq!(change.schemas, ["app"]);
        // REPLICA IDENTITY FULL marks every column: no key.
        let change = plan_change("app", "gone", &s, &[true, true], &Schema::default());
        assert!(change.table.primary_key.is_none());
    }
}
