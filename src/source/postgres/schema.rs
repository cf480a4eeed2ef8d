//! The captured-table model read from the system catalog inside the snapshot transaction
//! (the model itself is `stored::postgres::schema`, which this module re-exports).
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

use sqlx::postgres::PgConnection;
use sqlx::Row;

use super::pg_error;
use crate::error::Result;
pub use crate::stored::postgres::schema::*;

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
    let mut tables = read_tables(conn).await?;
    read_columns(conn, &mut tables).await?;
    read_constraints(conn, &mut tables).await?;
    read_indexes(conn, &mut tables).await?;
    Ok(tables.into_values().collect())
}

/// The captured tables by oid, without their columns, constraints and indexes yet.
async fn read_tables(conn: &mut PgConnection) -> Result<BTreeMap<i64, Table>> {
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
    Ok(tables)
}

/// Each table's columns, in order.
async fn read_columns(conn: &mut PgConnection, tables: &mut BTreeMap<i64, Table>) -> Result<()> {
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
    Ok(())
}

/// Each table's primary key and other constraints.
async fn read_constraints(
    conn: &mut PgConnection,
    tables: &mut BTreeMap<i64, Table>,
) -> Result<()> {
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
    Ok(())
}

/// Each table's indexes that back no constraint.
async fn read_indexes(conn: &mut PgConnection, tables: &mut BTreeMap<i64, Table>) -> Result<()> {
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
    Ok(())
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
