//! The captured-table model as snapshot manifests store it: the tables whose rows a
//! snapshot copies and the change log carries, with what reading and replaying rows needs.
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
//!
//! The source reads it from the live catalog (`source::postgres::schema`); a restore turns it
//! into DDL (`restore::postgres::schema_sql`).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::pg_connection::quote_ident;

/// Namespaces that hold the application's objects (not the system's).
pub const USER_NAMESPACE: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') \
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

/// Storage parameters as a `WITH (...)` list: `prefix` before each name (`toast.`), each value
/// a string literal (PostgreSQL parses every reloption from its text).
pub(crate) fn storage_parameters(options: &[String], prefix: &str) -> Vec<String> {
    options
        .iter()
        .map(|o| match o.split_once('=') {
            Some((name, value)) => format!("{prefix}{name} = {}", literal(value)),
            None => format!("{prefix}{o}"),
        })
        .collect()
}

pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
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
