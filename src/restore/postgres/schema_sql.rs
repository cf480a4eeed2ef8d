//! The captured-table model as DDL, for a restore: tables in dependency order, column
//! definitions, types and sequences the change log's tables need, and each table's key built
//! right after its rows are in (replay matches rows by it).

use crate::pg_connection::quote_ident;
#[cfg(test)]
use crate::stored::postgres::schema::test_table;
use crate::stored::postgres::schema::{literal, Column, Constraint, Schema, Sequence, Table};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stored::postgres::schema::dependency_order;

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
}
