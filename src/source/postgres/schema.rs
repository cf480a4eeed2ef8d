//! The captured-table model: the tables whose rows a snapshot copies and the change log
//! carries, read from the system catalog inside the snapshot transaction.
//!
//! The schema itself (every object pg_dump restores) travels as a schema image
//! ([`super::image`]) and is applied with pg_restore. This model is what reading and
//! replaying rows needs besides: per table its columns and types (COPY column lists, the text
//! casts of replayed values, binary loading), its key (replay matches rows by it, and a
//! restore builds it right after the table's rows are in), replica identity, storage
//! parameters (autovacuum is held off during a load); sequences; enum and domain types (for
//! tables the change log creates, `S` records). Tables are the permanent ordinary tables of
//! the application's namespaces, partitions included (rows live in partitions); unlogged
//! tables are not (their changes are never logged, so they cannot be captured).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnection;
use sqlx::Row;

use super::{pg_error, quote_ident};
use crate::error::Result;

/// Namespaces that hold the application's objects (not the system's).
pub(crate) const USER_NAMESPACE: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg\\_%'";

/// Everything about the database that a restore recreates.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Schema {
    /// Namespaces other than `public` that hold captured objects.
    pub schemas: Vec<String>,
    pub enums: Vec<EnumType>,
    pub domains: Vec<DomainType>,
    pub sequences: Vec<Sequence>,
    /// Parents before children (foreign keys), otherwise by name.
    pub tables: Vec<Table>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnumType {
    pub schema: String,
    pub name: String,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainType {
    pub schema: String,
    pub name: String,
    /// `format_type` of the base type.
    pub base: String,
    pub default: Option<String>,
    pub not_null: bool,
    /// `pg_get_constraintdef` of each CHECK.
    pub checks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sequence {
    pub schema: String,
    pub name: String,
    pub data_type: String,
    pub start: i64,
    pub increment: i64,
    pub min: i64,
    pub max: i64,
    pub cache: i64,
    pub cycle: bool,
    /// The column an identity sequence serves or a serial sequence is OWNED BY.
    pub owned_by: Option<OwnedBy>,
    /// Created by the identity column itself, not by CREATE SEQUENCE.
    pub identity: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedBy {
    pub schema: String,
    pub table: String,
    pub column: String,
}

/// A sequence's value at one moment (sequences are not replicated by logical decoding).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceValue {
    pub schema: String,
    pub name: String,
    /// `None`: never called (nextval returns the start value).
    pub last_value: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    pub schema: String,
    pub name: String,
    pub columns: Vec<Column>,
    pub primary_key: Option<Constraint>,
    /// Unique, check, exclusion and foreign-key constraints.
    pub constraints: Vec<Constraint>,
    /// Indexes that do not back a constraint, as `CREATE INDEX` statements.
    pub indexes: Vec<Index>,
    /// `d` default, `f` full, `i` index, `n` nothing.
    pub replica_identity: String,
    /// The index named by REPLICA IDENTITY USING INDEX.
    pub replica_index: Option<String>,
    /// Storage parameters (`pg_class.reloptions`, as `name=value`): fillfactor,
    /// autovacuum settings and the like.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    /// The TOAST table's storage parameters, as `name=value` (set as `toast.name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub toast_options: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// `format_type(atttypid, atttypmod)`.
    pub type_sql: String,
    pub not_null: bool,
    pub default: Option<String>,
    /// `a` (ALWAYS) or `d` (BY DEFAULT) for identity columns.
    pub identity: Option<String>,
    /// The expression of a stored generated column (never copied or replayed).
    pub generated: Option<String>,
    /// A collation other than its type's, as a quoted qualified name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collation: Option<String>,
    /// The TOAST compression method the column names (`pglz`, `lz4`); `None` follows the
    /// server's `default_toast_compression`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// A storage mode other than its type's (`PLAIN`, `EXTERNAL`, `EXTENDED`, `MAIN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Constraint {
    pub name: String,
    /// `p`, `u`, `c`, `f` or `x`.
    pub kind: String,
    /// `pg_get_constraintdef`.
    pub definition: String,
    pub columns: Vec<String>,
    /// The referenced table of a foreign key (`schema.name`).
    pub references: Option<(String, String)>,
    /// The index behind a primary key, unique or exclusion constraint.
    pub index: Option<String>,
    /// The referenced columns of a foreign key (empty in snapshots before 2026-12-03).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub referenced: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub name: String,
    pub definition: String,
}

impl Table {
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// Columns that hold stored data (generated columns are computed, never copied).
    pub fn stored_columns(&self) -> impl Iterator<Item = &Column> {
        self.columns.iter().filter(|c| c.generated.is_none())
    }

    /// The source's `autovacuum_enabled` and `toast.autovacuum_enabled`, each as a `SET`
    /// item, where it set them.
    pub fn autovacuum_parameters(&self) -> (Option<String>, Option<String>) {
        let find = |options: &[String], prefix: &str| {
            let own = options
                .iter()
                .find(|o| o.split('=').next() == Some("autovacuum_enabled"))?;
            storage_parameters(std::slice::from_ref(own), prefix).pop()
        };
        (find(&self.options, ""), find(&self.toast_options, "toast."))
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The columns that identify a row for replay: the primary key, else the replica
    /// identity index's columns, else `None` (match on the whole old row).
    pub fn key_columns(&self) -> Option<Vec<String>> {
        if let Some(pk) = &self.primary_key {
            return Some(pk.columns.clone());
        }
        let index = self.replica_index.as_ref()?;
        self.constraints
            .iter()
            .find(|c| c.index.as_deref() == Some(index))
            .map(|c| c.columns.clone())
    }
}

impl Schema {
    pub fn table(&self, schema: &str, name: &str) -> Option<&Table> {
        self.tables
            .iter()
            .find(|t| t.schema == schema && t.name == name)
    }
}

/// Read the schema (call inside the snapshot transaction so it matches the rows).
pub async fn capture(conn: &mut PgConnection) -> Result<Schema> {
    let enums = capture_enums(conn).await?;
    let domains = capture_domains(conn).await?;
    let sequences = capture_sequences(conn).await?;
    let mut tables = capture_tables(conn).await?;
    let mut schemas: BTreeSet<String> = BTreeSet::new();
    schemas.extend(enums.iter().map(|e| e.schema.clone()));
    schemas.extend(domains.iter().map(|e| e.schema.clone()));
    schemas.extend(sequences.iter().map(|e| e.schema.clone()));
    schemas.extend(tables.iter().map(|e| e.schema.clone()));
    schemas.remove("public");
    tables = dependency_order(tables);
    Ok(Schema {
        schemas: schemas.into_iter().collect(),
        enums,
        domains,
        sequences,
        tables,
    })
}

async fn capture_enums(conn: &mut PgConnection) -> Result<Vec<EnumType>> {
    let sql = format!(
        "SELECT n.nspname::text, t.typname::text, \
                array_agg(e.enumlabel::text ORDER BY e.enumsortorder) \
         FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
         JOIN pg_enum e ON e.enumtypid = t.oid \
         WHERE {USER_NAMESPACE} GROUP BY 1, 2 ORDER BY 1, 2"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| pg_error("reading enum types", e))?;
    Ok(rows
        .iter()
        .map(|r| EnumType {
            schema: r.get(0),
            name: r.get(1),
            labels: r.get(2),
        })
        .collect())
}

async fn capture_domains(conn: &mut PgConnection) -> Result<Vec<DomainType>> {
    let sql = format!(
        "SELECT n.nspname::text, t.typname::text, format_type(t.typbasetype, t.typtypmod), \
                t.typnotnull, t.typdefault, \
                COALESCE((SELECT array_agg(pg_get_constraintdef(c.oid) ORDER BY c.conname) \
                          FROM pg_constraint c WHERE c.contypid = t.oid), '{{}}') \
         FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
         WHERE t.typtype = 'd' AND {USER_NAMESPACE} ORDER BY 1, 2"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| pg_error("reading domain types", e))?;
    Ok(rows
        .iter()
        .map(|r| DomainType {
            schema: r.get(0),
            name: r.get(1),
            base: r.get(2),
            not_null: r.get(3),
            default: r.get(4),
            checks: r.get(5),
        })
        .collect())
}

async fn capture_sequences(conn: &mut PgConnection) -> Result<Vec<Sequence>> {
    let sql = format!(
        "SELECT n.nspname::text, c.relname::text, format_type(s.seqtypid, NULL), s.seqstart, \
                s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle, d.deptype::text, \
                tn.nspname::text, tc.relname::text, a.attname::text \
         FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid \
              AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0 \
              AND d.deptype IN ('a', 'i') \
         LEFT JOIN pg_class tc ON tc.oid = d.refobjid \
         LEFT JOIN pg_namespace tn ON tn.oid = tc.relnamespace \
         LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
         WHERE {USER_NAMESPACE} ORDER BY 1, 2"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| pg_error("reading sequences", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            let deptype: Option<String> = r.get(9);
            let owned_by = match (r.get(10), r.get(11), r.get(12)) {
                (Some(schema), Some(table), Some(column)) => Some(OwnedBy {
                    schema,
                    table,
                    column,
                }),
                _ => None,
            };
            Sequence {
                schema: r.get(0),
                name: r.get(1),
                data_type: r.get(2),
                start: r.get(3),
                increment: r.get(4),
                min: r.get(5),
                max: r.get(6),
                cache: r.get(7),
                cycle: r.get(8),
                owned_by,
                identity: deptype.as_deref() == Some("i"),
            }
        })
        .collect())
}

/// Every sequence's current value (outside MVCC: it is at least the value at any commit
/// decoded before this call).
pub async fn sequence_values(conn: &mut PgConnection) -> Result<Vec<SequenceValue>> {
    let rows = sqlx::query(
        "SELECT schemaname::text, sequencename::text, last_value FROM pg_sequences \
         WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| pg_error("reading sequence values", e))?;
    Ok(rows
        .iter()
        .map(|r| SequenceValue {
            schema: r.get(0),
            name: r.get(1),
            last_value: r.get(2),
        })
        .collect())
}

/// The tables a snapshot copies: ordinary (partitions included), permanent, not an extension's.
pub(crate) const TABLE_FILTER: &str = "c.relkind = 'r' AND c.relpersistence = 'p' \
     AND NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = 'pg_class'::regclass \
                     AND x.objid = c.oid AND x.deptype = 'e')";

async fn capture_tables(conn: &mut PgConnection) -> Result<Vec<Table>> {
    let sql = format!(
        "SELECT c.oid::int8, n.nspname::text, c.relname::text, c.relreplident::text, \
                (SELECT ic.relname::text FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
                 WHERE i.indrelid = c.oid AND i.indisreplident), \
                COALESCE(c.reloptions::text[], '{{}}'), COALESCE(tc.reloptions::text[], '{{}}') \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_class tc ON tc.oid = c.reltoastrelid \
         WHERE {TABLE_FILTER} AND {USER_NAMESPACE} ORDER BY 2, 3"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| pg_error("reading tables", e))?;
    let mut tables: BTreeMap<i64, Table> = BTreeMap::new();
    for r in &rows {
        tables.insert(
            r.get(0),
            Table {
                schema: r.get(1),
                name: r.get(2),
                columns: Vec::new(),
                primary_key: None,
                constraints: Vec::new(),
                indexes: Vec::new(),
                replica_identity: r.get(3),
                replica_index: r.get(4),
                options: r.get(5),
                toast_options: r.get(6),
            },
        );
    }
    // Per-column TOAST compression exists since PostgreSQL 14 (the server reports its
    // version when the connection starts).
    let compression = if conn.server_version_num().unwrap_or(0) >= 140_000 {
        "a.attcompression::text"
    } else {
        "''"
    };
    let columns = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT a.attrelid::int8, a.attname::text, format_type(a.atttypid, a.atttypmod), \
                a.attnotnull, a.attidentity::text, a.attgenerated::text, \
                pg_get_expr(d.adbin, d.adrelid), \
                (SELECT quote_ident(cn.nspname) || '.' || quote_ident(co.collname) \
                 FROM pg_collation co JOIN pg_namespace cn ON cn.oid = co.collnamespace \
                 WHERE co.oid = a.attcollation AND a.attcollation <> t.typcollation), \
                {compression}, \
                CASE WHEN a.attstorage <> t.typstorage THEN a.attstorage::text END \
         FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
         JOIN pg_class c ON c.oid = a.attrelid \
         JOIN pg_type t ON t.oid = a.atttypid \
         WHERE c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attrelid, a.attnum"
    )))
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| pg_error("reading columns", e))?;
    for r in &columns {
        let Some(table) = tables.get_mut(&r.get::<i64, _>(0)) else {
            continue;
        };
        let identity: String = r.get(4);
        let generated: String = r.get(5);
        let expression: Option<String> = r.get(6);
        let (default, generated) = if generated.is_empty() {
            (expression, None)
        } else {
            (None, expression)
        };
        table.columns.push(Column {
            name: r.get(1),
            type_sql: r.get(2),
            not_null: r.get(3),
            default,
            identity: (!identity.is_empty()).then_some(identity),
            generated,
            collation: r.get(7),
            compression: compression_name(r.get(8)),
            storage: r.get::<Option<String>, _>(9).and_then(|s| storage_name(&s)),
        });
    }
    let constraints = sqlx::query(
        "SELECT co.conrelid::int8, co.conname::text, co.contype::text, \
                pg_get_constraintdef(co.oid), \
                COALESCE((SELECT array_agg(a.attname::text ORDER BY k.ord) \
                          FROM unnest(co.conkey) WITH ORDINALITY k(num, ord) \
                          JOIN pg_attribute a ON a.attrelid = co.conrelid AND a.attnum = k.num), \
                         '{}'), \
                rn.nspname::text, rc.relname::text, ic.relname::text, \
                COALESCE((SELECT array_agg(a.attname::text ORDER BY k.ord) \
                          FROM unnest(co.confkey) WITH ORDINALITY k(num, ord) \
                          JOIN pg_attribute a ON a.attrelid = co.confrelid AND a.attnum = k.num), \
                         '{}') \
         FROM pg_constraint co \
         LEFT JOIN pg_class rc ON rc.oid = co.confrelid AND co.contype = 'f' \
         LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace \
         LEFT JOIN pg_class ic ON ic.oid = co.conindid AND co.contype IN ('p', 'u', 'x') \
         WHERE co.conrelid <> 0 AND co.contype IN ('p', 'u', 'c', 'f', 'x') \
         ORDER BY co.conrelid, co.contype, co.conname",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| pg_error("reading constraints", e))?;
    for r in &constraints {
        let Some(table) = tables.get_mut(&r.get::<i64, _>(0)) else {
            continue;
        };
        let references = match (r.get(5), r.get(6)) {
            (Some(s), Some(t)) => Some((s, t)),
            _ => None,
        };
        let constraint = Constraint {
            name: r.get(1),
            kind: r.get(2),
            definition: r.get(3),
            columns: r.get(4),
            references,
            index: r.get(7),
            referenced: r.get(8),
        };
        if constraint.kind == "p" {
            table.primary_key = Some(constraint);
        } else {
            table.constraints.push(constraint);
        }
    }
    let indexes = sqlx::query(
        "SELECT i.indrelid::int8, ic.relname::text, pg_get_indexdef(i.indexrelid) \
         FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
         WHERE NOT EXISTS (SELECT 1 FROM pg_constraint co WHERE co.conrelid = i.indrelid \
                           AND co.conindid = i.indexrelid AND co.contype IN ('p', 'u', 'x')) \
         ORDER BY i.indrelid, ic.relname",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| pg_error("reading indexes", e))?;
    for r in &indexes {
        if let Some(table) = tables.get_mut(&r.get::<i64, _>(0)) {
            table.indexes.push(Index {
                name: r.get(1),
                definition: r.get(2),
            });
        }
    }
    Ok(tables.into_values().collect())
}

/// `pg_attribute.attcompression` as the name `COMPRESSION` takes.
fn compression_name(code: String) -> Option<String> {
    match code.as_str() {
        "p" => Some("pglz".into()),
        "l" => Some("lz4".into()),
        _ => None,
    }
}

/// `pg_attribute.attstorage` as the name `SET STORAGE` takes.
fn storage_name(code: &str) -> Option<String> {
    let name = match code {
        "p" => "PLAIN",
        "e" => "EXTERNAL",
        "x" => "EXTENDED",
        "m" => "MAIN",
        _ => return None,
    };
    Some(name.into())
}

/// Storage parameters as a `WITH (...)` list: `prefix` before each name (`toast.`), each value
/// a string literal (PostgreSQL parses every reloption from its text).
fn storage_parameters(options: &[String], prefix: &str) -> Vec<String> {
    options
        .iter()
        .map(|o| match o.split_once('=') {
            Some((name, value)) => format!("{prefix}{name} = {}", literal(value)),
            None => format!("{prefix}{o}"),
        })
        .collect()
}

/// Parents before children; a cycle keeps the remaining tables in name order.
pub fn dependency_order(mut rest: Vec<Table>) -> Vec<Table> {
    let mut out: Vec<Table> = Vec::with_capacity(rest.len());
    while !rest.is_empty() {
        let placed: BTreeSet<(String, String)> = out
            .iter()
            .map(|t| (t.schema.clone(), t.name.clone()))
            .collect();
        let ready = rest.iter().position(|t| {
            t.constraints.iter().all(|c| match &c.references {
                Some(parent) => {
                    placed.contains(parent) || (parent.0 == t.schema && parent.1 == t.name)
                }
                None => true,
            })
        });
        out.push(rest.remove(ready.unwrap_or(0)));
    }
    out
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

fn sequence_options(s: &Sequence) -> String {
    format!(
        "START WITH {} INCREMENT BY {} MINVALUE {} MAXVALUE {} CACHE {}{}",
        s.start,
        s.increment,
        s.min,
        s.max,
        s.cache,
        if s.cycle { " CYCLE" } else { " NO CYCLE" }
    )
}

impl Schema {
    fn identity_sequence(&self, table: &Table, column: &str) -> Option<&Sequence> {
        self.sequences.iter().find(|s| {
            s.identity
                && s.owned_by.as_ref().is_some_and(|o| {
                    o.schema == table.schema && o.table == table.name && o.column == column
                })
        })
    }

    /// One column's definition in CREATE TABLE or ADD COLUMN (its identity sequence named as
    /// captured); `not_null` false leaves NOT NULL for later.
    pub fn column_sql(&self, t: &Table, c: &Column, not_null: bool) -> String {
        let mut sql = format!("{} {}", quote_ident(&c.name), c.type_sql);
        if let Some(method) = &c.compression {
            sql.push_str(&format!(" COMPRESSION {method}"));
        }
        if let Some(collation) = &c.collation {
            sql.push_str(&format!(" COLLATE {collation}"));
        }
        if let Some(expr) = &c.generated {
            sql.push_str(&format!(" GENERATED ALWAYS AS ({expr}) STORED"));
        }
        if let Some(default) = &c.default {
            sql.push_str(&format!(" DEFAULT {default}"));
        }
        if let Some(kind) = &c.identity {
            let always = if kind == "a" { "ALWAYS" } else { "BY DEFAULT" };
            sql.push_str(&format!(" GENERATED {always} AS IDENTITY"));
            if let Some(s) = self.identity_sequence(t, &c.name) {
                sql.push_str(&format!(
                    " (SEQUENCE NAME {} {})",
                    qualified(&s.schema, &s.name),
                    sequence_options(s)
                ));
            }
        }
        if not_null && c.not_null {
            sql.push_str(" NOT NULL");
        }
        sql
    }

    /// Statements creating the namespaces, enum and domain types and free-standing sequences
    /// of this model: what an `S` record's new table may need that is not in the schema
    /// image the restore applied (created after it).
    pub fn types_and_sequences(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.schemas {
            out.push(format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(s)));
        }
        for e in &self.enums {
            let labels: Vec<String> = e.labels.iter().map(|l| literal(l)).collect();
            out.push(format!(
                "CREATE TYPE {} AS ENUM ({})",
                qualified(&e.schema, &e.name),
                labels.join(", ")
            ));
        }
        for d in &self.domains {
            let mut sql = format!(
                "CREATE DOMAIN {} AS {}",
                qualified(&d.schema, &d.name),
                d.base
            );
            if let Some(default) = &d.default {
                sql.push_str(&format!(" DEFAULT {default}"));
            }
            if d.not_null {
                sql.push_str(" NOT NULL");
            }
            for check in &d.checks {
                sql.push_str(&format!(" {check}"));
            }
            out.push(sql);
        }
        for s in self.sequences.iter().filter(|s| !s.identity) {
            out.push(format!(
                "CREATE SEQUENCE {} AS {} {}",
                qualified(&s.schema, &s.name),
                s.data_type,
                sequence_options(s)
            ));
        }
        out
    }

    /// After the snapshot rows, before replay: the keys replay matches rows by (primary keys,
    /// or the unique constraint / index a table uses as its replica identity).
    pub fn keys(&self) -> Vec<String> {
        self.early_keys()
            .into_iter()
            .flatten()
            .map(|k| k.statement)
            .collect()
    }

    /// [`Schema::keys`] as one group per table of [`Schema::tables`] (at most one statement).
    pub fn keys_per_table(&self) -> Vec<Vec<String>> {
        self.early_keys()
            .into_iter()
            .map(|k| k.into_iter().map(|k| k.statement).collect())
            .collect()
    }

    /// Each table's key built before replay (at most one per table, in [`Schema::tables`]
    /// order), with the name of what it builds: a restore leaves those out of the schema
    /// image's post-data.
    pub fn early_keys(&self) -> Vec<Option<EarlyKey>> {
        self.tables.iter().map(early_key).collect()
    }
}

/// A key built right after a table's rows are in (replay matches rows by it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlyKey {
    pub schema: String,
    pub table: String,
    /// The constraint's name, or the index's when the key is a plain unique index.
    pub name: String,
    /// A constraint (`ALTER TABLE ... ADD CONSTRAINT`), else an index (`CREATE UNIQUE INDEX`).
    pub constraint: bool,
    pub statement: String,
}

fn early_key(t: &Table) -> Option<EarlyKey> {
    let key = |name: &str, constraint: bool, statement: String| EarlyKey {
        schema: t.schema.clone(),
        table: t.name.clone(),
        name: name.to_string(),
        constraint,
        statement,
    };
    if let Some(pk) = &t.primary_key {
        return Some(key(&pk.name, true, add_constraint(t, pk)));
    }
    let index = t.replica_index.as_ref()?;
    if let Some(c) = t
        .constraints
        .iter()
        .find(|c| c.index.as_deref() == Some(index))
    {
        return Some(key(&c.name, true, add_constraint(t, c)));
    }
    let i = t.indexes.iter().find(|i| &i.name == index)?;
    Some(key(&i.name, false, i.definition.clone()))
}

fn add_constraint(t: &Table, c: &Constraint) -> String {
    format!(
        "ALTER TABLE {} ADD CONSTRAINT {} {}",
        t.qualified(),
        quote_ident(&c.name),
        c.definition
    )
}

/// A table for unit tests: `bigint` columns, primary key `id`, optionally a foreign key
/// `(column, parent table)` to `public.parent(id)`.
#[cfg(test)]
pub(crate) fn test_table(name: &str, columns: &[&str], fk: Option<(&str, &str)>) -> Table {
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
                ..Default::default()
            })
            .collect(),
        primary_key: Some(Constraint {
            name: format!("{name}_pkey"),
            kind: "p".into(),
            definition: "PRIMARY KEY (id)".into(),
            columns: vec!["id".into()],
            references: None,
            index: None,
            referenced: Vec::new(),
        }),
        constraints: fk
            .map(|(column, parent)| Constraint {
                name: format!("{name}_fk"),
                kind: "f".into(),
                definition: format!("FOREIGN KEY ({column}) REFERENCES {parent}(id)"),
                columns: vec![column.into()],
                references: Some(("public".into(), parent.into())),
                index: None,
                referenced: Vec::new(),
            })
            .into_iter()
            .collect(),
        indexes: vec![],
        replica_identity: "d".into(),
        replica_index: None,
        options: Vec::new(),
        toast_options: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An identity `id` referencing `parent(id)`.
    fn table(name: &str, parent: Option<&str>) -> Table {
        let mut t = test_table(name, &["id"], parent.map(|p| ("id", p)));
        t.columns[0].not_null = true;
        t.columns[0].identity = Some("d".into());
        t
    }

    #[test]
    fn parents_come_first_and_each_table_has_its_early_key() {
        let ordered = dependency_order(vec![
            table("a_child", Some("b_parent")),
            table("b_parent", None),
        ]);
        assert_eq!(ordered[0].name, "b_parent");
        let schema = Schema {
            tables: ordered,
            ..Default::default()
        };
        let keys = schema.early_keys();
        assert_eq!(keys.len(), 2);
        let first = keys[0].clone().unwrap();
        assert_eq!(
            (first.name.as_str(), first.constraint),
            ("b_parent_pkey", true)
        );
        assert!(
            first.statement.contains("PRIMARY KEY"),
            "{}",
            first.statement
        );
        assert_eq!(schema.keys().len(), 2);
        let column = schema.column_sql(&schema.tables[0], &schema.tables[0].columns[0], true);
        assert_eq!(
            column,
            "\"id\" bigint GENERATED BY DEFAULT AS IDENTITY NOT NULL"
        );
    }

    #[test]
    fn autovacuum_settings_are_read_from_the_storage_parameters() {
        let mut t = test_table("docs", &["id", "title"], None);
        t.options = vec!["fillfactor=70".into(), "autovacuum_enabled=false".into()];
        t.toast_options = vec!["autovacuum_enabled=true".into()];
        assert_eq!(
            t.autovacuum_parameters(),
            (
                Some("autovacuum_enabled = 'false'".into()),
                Some("toast.autovacuum_enabled = 'true'".into())
            )
        );
    }

    #[test]
    fn manifests_without_the_physical_fields_still_read() {
        let column: Column =
            serde_json::from_str(r#"{"name":"a","type_sql":"int","not_null":false,"default":null,"identity":null,"generated":null}"#)
                .unwrap();
        assert_eq!(column.collation, None);
        let text = serde_json::to_string(&column).unwrap();
        assert!(!text.contains("collation"), "{text}");
    }
}
