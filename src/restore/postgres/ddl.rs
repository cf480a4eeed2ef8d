//! Schema changes during PostgreSQL replay: the DDL an `S` record asks for.
//!
//! An `S` record gives a table's definition from that point of the change stream on (see
//! `source::postgres::ddl`). Replay compares it with the definition the restored database has
//! now (the schema image's, and the records replayed since) and creates the table, or drops,
//! retypes and adds columns, inside the transaction being replayed, so the rows that follow
//! fit. Column names, order and types are exact; NOT NULL came from the catalog at capture
//! time and is applied after replay, only as far as the rows allow. Everything else about the
//! schema comes from schema images applied with pg_restore (`restore/postgres_schema.rs`);
//! these records only cover table shapes between two images.

use std::collections::BTreeSet;

use crate::pg_connection::quote_ident;
use crate::stored::postgres::ddl::SchemaChange;
use crate::stored::postgres::schema::{Column, Schema, Sequence, Table};

/// The statements for one `S` record.
#[derive(Debug, Default)]
pub(crate) struct DdlPlan {
    /// Run in order; a failure fails the restore.
    pub statements: Vec<String>,
    /// Run each under a savepoint; a failure is logged (the keys of a created table).
    pub best_effort: Vec<String>,
}

fn same_name(a: (&str, &str), b: (&str, &str)) -> bool {
    a == b
}

/// What to run so the restored database has `change`'s table definition.
pub(crate) fn plan_schema_change(current: &Schema, change: &SchemaChange) -> DdlPlan {
    let mut plan = DdlPlan::default();
    plan.statements
        .extend(missing_objects(current, change).types_and_sequences());
    let t = &change.table;
    let with_sequences = Schema {
        sequences: change.sequences.clone(),
        ..Default::default()
    };
    match current.table(&t.schema, &t.name) {
        None => {
            let columns: Vec<String> = t
                .columns
                .iter()
                .map(|c| with_sequences.column_sql(t, c, false))
                .collect();
            plan.statements.push(format!(
                "CREATE TABLE {} (\n  {}\n)",
                t.qualified(),
                columns.join(",\n  ")
            ));
            let keys = Schema {
                tables: vec![t.clone()],
                ..Default::default()
            }
            .keys();
            plan.best_effort.extend(keys);
        }
        Some(existing) => alter_columns(&mut plan, existing, t, &with_sequences),
    }
    for s in change.sequences.iter().filter(|s| !s.identity) {
        if let Some(o) = &s.owned_by {
            plan.statements.push(format!(
                "ALTER SEQUENCE {}.{} OWNED BY {}.{}.{}",
                quote_ident(&s.schema),
                quote_ident(&s.name),
                quote_ident(&o.schema),
                quote_ident(&o.table),
                quote_ident(&o.column)
            ));
        }
    }
    plan
}

/// Schemas, types and (free-standing) sequences the change needs that are not there yet.
fn missing_objects(current: &Schema, change: &SchemaChange) -> Schema {
    let has_sequence = |s: &Sequence| {
        current
            .sequences
            .iter()
            .any(|c| same_name((&c.schema, &c.name), (&s.schema, &s.name)))
    };
    Schema {
        schemas: change
            .schemas
            .iter()
            .filter(|s| !current.schemas.contains(s))
            .cloned()
            .collect(),
        enums: change
            .enums
            .iter()
            .filter(|e| {
                !current
                    .enums
                    .iter()
                    .any(|c| same_name((&c.schema, &c.name), (&e.schema, &e.name)))
            })
            .cloned()
            .collect(),
        domains: change
            .domains
            .iter()
            .filter(|d| {
                !current
                    .domains
                    .iter()
                    .any(|c| same_name((&c.schema, &c.name), (&d.schema, &d.name)))
            })
            .cloned()
            .collect(),
        // OWNED BY comes after the columns exist.
        sequences: change
            .sequences
            .iter()
            .filter(|s| !s.identity && !has_sequence(s))
            .map(|s| Sequence {
                owned_by: None,
                ..s.clone()
            })
            .collect(),
        tables: Vec::new(),
    }
}

/// Drop the columns the new definition lacks, retype the ones whose type changed, add the new
/// ones (NOT NULL later), and follow default changes.
fn alter_columns(plan: &mut DdlPlan, existing: &Table, new: &Table, sequences: &Schema) {
    let table = existing.qualified();
    let stored = |t: &Table| -> Vec<Column> { t.stored_columns().cloned().collect() };
    let (old_columns, new_columns) = (stored(existing), stored(new));
    for c in &old_columns {
        if !new_columns.iter().any(|n| n.name == c.name) {
            plan.statements.push(format!(
                "ALTER TABLE {table} DROP COLUMN {} CASCADE",
                quote_ident(&c.name)
            ));
        }
    }
    for c in &new_columns {
        let name = quote_ident(&c.name);
        match old_columns.iter().find(|o| o.name == c.name) {
            None => plan.statements.push(format!(
                "ALTER TABLE {table} ADD COLUMN {}",
                sequences.column_sql(new, c, false)
            )),
            Some(o) => {
                if o.type_sql != c.type_sql {
                    plan.statements.push(format!(
                        "ALTER TABLE {table} ALTER COLUMN {name} TYPE {0} USING {name}::text::{0}",
                        c.type_sql
                    ));
                }
                if o.default != c.default && o.identity.is_none() {
                    plan.statements.push(match &c.default {
                        Some(d) => {
                            format!("ALTER TABLE {table} ALTER COLUMN {name} SET DEFAULT {d}")
                        }
                        None => format!("ALTER TABLE {table} ALTER COLUMN {name} DROP DEFAULT"),
                    });
                }
            }
        }
    }
    for c in new.columns.iter().filter(|c| c.generated.is_some()) {
        if existing.column(&c.name).is_none() {
            plan.best_effort.push(format!(
                "ALTER TABLE {table} ADD COLUMN {}",
                sequences.column_sql(new, c, false)
            ));
        }
    }
}

/// Make `change` the definition replay works with from now on.
pub(crate) fn record_schema_change(current: &mut Schema, change: SchemaChange) {
    let missing = missing_objects(current, &change);
    current.schemas.extend(missing.schemas);
    current.enums.extend(missing.enums);
    current.domains.extend(missing.domains);
    for s in change.sequences {
        if !current
            .sequences
            .iter()
            .any(|c| c.schema == s.schema && c.name == s.name)
        {
            current.sequences.push(s);
        }
    }
    let t = change.table;
    match current
        .tables
        .iter_mut()
        .find(|c| c.schema == t.schema && c.name == t.name)
    {
        Some(slot) => *slot = t,
        None => current.tables.push(t),
    }
}

/// After replay, for the tables an `S` record changed: NOT NULL of their columns (came from
/// the catalog at capture time, so applied best effort). Their indexes and constraints are
/// the schema image's post-data, or come with the next image.
pub(crate) fn finish_changed(schema: &Schema, changed: &BTreeSet<(String, String)>) -> Vec<String> {
    let mut out = Vec::new();
    for t in schema
        .tables
        .iter()
        .filter(|t| changed.contains(&(t.schema.clone(), t.name.clone())))
    {
        for c in t.stored_columns().filter(|c| c.not_null) {
            out.push(format!(
                "ALTER TABLE {} ALTER COLUMN {} SET NOT NULL",
                t.qualified(),
                quote_ident(&c.name)
            ));
        }
    }
    out
}

/// Statements turning every GENERATED ALWAYS identity column of `tables` into BY DEFAULT
/// (`always: false`) or back. During replay an UPDATE may not assign an ALWAYS column, but a
/// replayed update carries its value; so a restore runs with them BY DEFAULT and sets them
/// back to ALWAYS at the end, leaving each column as the source defined it.
pub(crate) fn identity_always<'a>(
    tables: impl IntoIterator<Item = &'a Table>,
    always: bool,
) -> Vec<String> {
    let mode = if always { "ALWAYS" } else { "BY DEFAULT" };
    let mut out = Vec::new();
    for t in tables {
        for c in t
            .columns
            .iter()
            .filter(|c| c.identity.as_deref() == Some("a"))
        {
            out.push(format!(
                "ALTER TABLE {} ALTER COLUMN {} SET GENERATED {mode}",
                t.qualified(),
                quote_ident(&c.name)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stored::postgres::schema::Constraint;

    fn column(name: &str, type_sql: &str) -> Column {
        Column {
            name: name.into(),
            type_sql: type_sql.into(),
            not_null: false,
            default: None,
            identity: None,
            generated: None,
            ..Default::default()
        }
    }

    fn table(name: &str, columns: Vec<Column>) -> Table {
        Table {
            schema: "public".into(),
            name: name.into(),
            columns,
            primary_key: Some(Constraint {
                name: format!("{name}_pkey"),
                kind: "p".into(),
                definition: "PRIMARY KEY (id)".into(),
                columns: vec!["id".into()],
                references: None,
                index: Some(format!("{name}_pkey")),
                referenced: Vec::new(),
            }),
            constraints: vec![],
            indexes: vec![],
            replica_identity: "d".into(),
            replica_index: None,
            options: Vec::new(),
            toast_options: Vec::new(),
        }
    }

    fn change(t: Table) -> SchemaChange {
        SchemaChange {
            table: t,
            sequences: vec![],
            enums: vec![],
            domains: vec![],
            schemas: vec![],
        }
    }

    #[test]
    fn columns_are_dropped_retyped_and_added() {
        let current = Schema {
            tables: vec![table(
                "t",
                vec![
                    column("id", "integer"),
                    column("name", "text"),
                    column("n", "integer"),
                ],
            )],
            ..Default::default()
        };
        let mut score = column("score", "integer");
        score.default = Some("7".into());
        score.not_null = true;
        let new = table(
            "t",
            vec![column("id", "integer"), column("n", "bigint"), score],
        );
        let plan = plan_schema_change(&current, &change(new.clone()));
        assert_eq!(
            plan.statements,
            [
                "ALTER TABLE \"public\".\"t\" DROP COLUMN \"name\" CASCADE",
                "ALTER TABLE \"public\".\"t\" ALTER COLUMN \"n\" TYPE bigint USING \"n\"::text::bigint",
                "ALTER TABLE \"public\".\"t\" ADD COLUMN \"score\" integer DEFAULT 7",
            ]
        );
        assert!(plan.best_effort.is_empty());
        // Applied: the same change again plans nothing.
        let mut after = current.clone();
        record_schema_change(&mut after, change(new.clone()));
        let again = plan_schema_change(&after, &change(new));
        assert!(again.statements.is_empty(), "{:?}", again.statements);
        let changed = BTreeSet::from([("public".to_string(), "t".to_string())]);
        assert_eq!(
            finish_changed(&after, &changed),
            ["ALTER TABLE \"public\".\"t\" ALTER COLUMN \"score\" SET NOT NULL"]
        );
    }

    #[test]
    fn a_new_table_is_created_with_its_key_best_effort() {
        let mut id = column("id", "bigint");
        id.not_null = true;
        id.default = Some("nextval('notes_id_seq'::regclass)".into());
        let mut c = change(table("notes", vec![id, column("body", "text")]));
        c.sequences.push(Sequence {
            schema: "public".into(),
            name: "notes_id_seq".into(),
            data_type: "bigint".into(),
            start: 1,
            increment: 1,
            min: 1,
            max: i64::MAX,
            cache: 1,
            cycle: false,
            owned_by: Some(crate::stored::postgres::schema::OwnedBy {
                schema: "public".into(),
                table: "notes".into(),
                column: "id".into(),
            }),
            identity: false,
        });
        let plan = plan_schema_change(&Schema::default(), &c);
        assert!(plan.statements[0].starts_with("CREATE SEQUENCE \"public\".\"notes_id_seq\""));
        assert_eq!(
            plan.statements[1],
            "CREATE TABLE \"public\".\"notes\" (\n  \"id\" bigint DEFAULT nextval('notes_id_seq'::regclass),\n  \"body\" text\n)"
        );
        assert!(plan.statements[2].contains("OWNED BY \"public\".\"notes\".\"id\""));
        assert_eq!(plan.best_effort.len(), 1);
        assert!(plan.best_effort[0].contains("PRIMARY KEY"));
    }
}
