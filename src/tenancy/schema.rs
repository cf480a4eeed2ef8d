//! A database's tables and columns, read from the database itself, for checking the tenancy
//! map and for rendering exported values faithfully.
//!
//! SQLite types are loose: a column's declared type gives its affinity, and the fixture (like
//! many applications) pins the real meaning with CHECK constraints. So a column whose CHECK
//! calls `json_valid(col)` is JSON and one checked `IN (0, 1)` is a boolean; everything else
//! follows SQLite's affinity rules. PostgreSQL names its types exactly.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use futures::TryStreamExt;
use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Connection, Row};

use crate::error::{Error, Result};

/// How a column's values are written in an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueKind {
    Integer,
    Real,
    /// Exact decimals: written as strings so no precision is lost.
    Numeric,
    Boolean,
    Text,
    /// Written as JSON, not as a string holding JSON.
    Json,
    /// Written base64 (standard alphabet, padded).
    Bytes,
    /// Written as RFC 3339 text.
    Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ColumnSchema {
    pub name: String,
    /// The type as the database declares it.
    #[serde(rename = "type")]
    pub declared: String,
    /// How values are written.
    #[serde(rename = "as")]
    pub kind: ValueKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    pub name: String,
    pub columns: Vec<ColumnSchema>,
    /// Primary key columns in key order (empty if none): exports are ordered by it.
    pub primary_key: Vec<String>,
    /// Column sets of the unique constraints and unique indexes that hold for every row (not
    /// partial, no expressions); the primary key is not repeated here.
    pub unique: Vec<Vec<String>>,
}

impl TableSchema {
    pub fn column(&self, name: &str) -> Option<&ColumnSchema> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Whether `column` alone identifies at most one row: it is the whole primary key or the
    /// whole of a unique constraint or index.
    pub fn is_unique_key(&self, column: &str) -> bool {
        let alone = |set: &[String]| set.len() == 1 && set[0] == column;
        alone(&self.primary_key) || self.unique.iter().any(|set| alone(set))
    }
}

/// Every user table of a database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schema {
    /// Table names in creation order.
    pub order: Vec<String>,
    pub tables: BTreeMap<String, TableSchema>,
}

impl Schema {
    /// Add a table after the others.
    pub fn push(&mut self, table: TableSchema) {
        self.order.push(table.name.clone());
        self.tables.insert(table.name.clone(), table);
    }
}

fn db_error(what: &str, e: sqlx::Error) -> Error {
    Error::other(format!("{what}: {e}"))
}

/// Open a SQLite file read-only.
pub async fn open_sqlite(path: &Path) -> Result<SqliteConnection> {
    let shown = path.display().to_string();
    let options = SqliteConnectOptions::from_str("sqlite://")
        .map_err(|e| db_error(&shown, e))?
        .filename(path)
        .read_only(true)
        .create_if_missing(false);
    SqliteConnection::connect_with(&options)
        .await
        .map_err(|e| db_error(&format!("opening {shown}"), e))
}

/// The user tables of a SQLite database (internal `sqlite_*` tables excluded).
pub async fn read_sqlite(conn: &mut SqliteConnection) -> Result<Schema> {
    let tables: Vec<(String, String)> = sqlx::query(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| db_error("reading the SQLite schema", e))?
    .iter()
    .map(|r| (r.get::<String, _>(0), r.get::<Option<String>, _>(1).unwrap_or_default()))
    .collect();
    let mut schema = Schema::default();
    for (name, sql) in tables {
        let info = format!("PRAGMA table_info({})", quote_ident(&name));
        let rows = sqlx::query(sqlx::AssertSqlSafe(info))
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| db_error(&format!("reading columns of {name}"), e))?;
        let mut keyed = Vec::new();
        let mut columns = Vec::new();
        for row in &rows {
            let column: String = row.get("name");
            let declared: String = row.get("type");
            let pk: i64 = row.get("pk");
            if pk > 0 {
                keyed.push((pk, column.clone()));
            }
            columns.push(ColumnSchema {
                kind: sqlite_kind(&declared, &column, &sql),
                name: column,
                declared,
            });
        }
        keyed.sort();
        let unique = sqlite_unique(conn, &name).await?;
        schema.push(TableSchema {
            name,
            columns,
            primary_key: keyed.into_iter().map(|(_, c)| c).collect(),
            unique,
        });
    }
    Ok(schema)
}

/// The column sets of a SQLite table's unique indexes (those of UNIQUE constraints included),
/// leaving out partial indexes and indexes on expressions.
async fn sqlite_unique(conn: &mut SqliteConnection, table: &str) -> Result<Vec<Vec<String>>> {
    let failed = |e| db_error(&format!("reading the indexes of {table}"), e);
    let list = format!("PRAGMA index_list({})", quote_ident(table));
    let indexes = sqlx::query(sqlx::AssertSqlSafe(list))
        .fetch_all(&mut *conn)
        .await
        .map_err(failed)?;
    let mut out = Vec::new();
    for index in &indexes {
        let (unique, partial): (i64, i64) = (index.get("unique"), index.get("partial"));
        if unique == 0 || partial != 0 {
            continue;
        }
        let name: String = index.get("name");
        let info = format!("PRAGMA index_info({})", quote_ident(&name));
        let columns: Vec<Option<String>> = sqlx::query(sqlx::AssertSqlSafe(info))
            .fetch_all(&mut *conn)
            .await
            .map_err(failed)?
            .iter()
            .map(|r| r.get("name"))
            .collect();
        // An expression's column name is NULL.
        if let Some(columns) = columns.into_iter().collect::<Option<Vec<_>>>() {
            out.push(columns);
        }
    }
    Ok(out)
}

/// SQLite's affinity rules (datatype3 §3.1), refined by the column's CHECK constraints.
pub fn sqlite_kind(declared: &str, column: &str, table_sql: &str) -> ValueKind {
    let compact: String = table_sql.chars().filter(|c| !c.is_whitespace()).collect();
    let quoted = quote_ident(column);
    let checked = |pattern: &str| {
        compact.contains(&pattern.replace("{c}", &quoted))
            || compact.contains(&pattern.replace("{c}", column))
    };
    let upper = declared.to_ascii_uppercase();
    if checked("json_valid({c})") {
        ValueKind::Json
    } else if upper.contains("INT") && checked("({c}IN(0,1))") {
        ValueKind::Boolean
    } else if upper.contains("INT") {
        ValueKind::Integer
    } else if upper.contains("CHAR") || upper.contains("CLOB") || upper.contains("TEXT") {
        ValueKind::Text
    } else if upper.contains("BLOB") || upper.is_empty() {
        ValueKind::Bytes
    } else if upper.contains("REAL") || upper.contains("FLOA") || upper.contains("DOUB") {
        ValueKind::Real
    } else {
        ValueKind::Numeric
    }
}

/// The base tables of a PostgreSQL database outside the system schemas; tables in `public`
/// are named bare, others `schema.table`.
pub async fn read_postgres(url: &str) -> Result<Schema> {
    let shown = crate::redact::mask_url(url);
    let mut conn = crate::pg_connection::connect(url).await?;
    let sql = "SELECT c.table_schema, c.table_name, c.column_name, c.data_type, \
               COALESCE(k.ordinal_position, 0)::int4 \
               FROM information_schema.columns c \
               JOIN information_schema.tables t ON t.table_schema = c.table_schema AND t.table_name = c.table_name \
               LEFT JOIN information_schema.table_constraints tc ON tc.table_schema = c.table_schema \
                 AND tc.table_name = c.table_name AND tc.constraint_type = 'PRIMARY KEY' \
               LEFT JOIN information_schema.key_column_usage k ON k.constraint_name = tc.constraint_name AND k.table_name = c.table_name \
                 AND k.table_schema = c.table_schema AND k.column_name = c.column_name \
               WHERE t.table_type = 'BASE TABLE' \
                 AND c.table_schema NOT IN ('pg_catalog', 'information_schema') \
               ORDER BY c.table_schema, c.table_name, c.ordinal_position";
    let mut rows = sqlx::query(sql).fetch(&mut conn);
    let mut tables: BTreeMap<String, TableSchema> = BTreeMap::new();
    let mut keys: BTreeMap<String, Vec<(i32, String)>> = BTreeMap::new();
    while let Some(row) = rows
        .try_next()
        .await
        .map_err(|e| db_error(&format!("reading the schema of {shown}"), e))?
    {
        let (schema, table): (String, String) = (row.get(0), row.get(1));
        let name = if schema == "public" {
            table
        } else {
            format!("{schema}.{table}")
        };
        let (column, declared): (String, String) = (row.get(2), row.get(3));
        let key: i32 = row.get(4);
        if key > 0 {
            keys.entry(name.clone())
                .or_default()
                .push((key, column.clone()));
        }
        tables
            .entry(name.clone())
            .or_insert_with(|| TableSchema {
                name,
                columns: Vec::new(),
                primary_key: Vec::new(),
                unique: Vec::new(),
            })
            .columns
            .push(ColumnSchema {
                kind: postgres_kind(&declared),
                name: column,
                declared,
            });
    }
    drop(rows);
    let unique = postgres_unique(&mut conn).await;
    let _ = conn.close().await;
    let mut unique = unique.map_err(|e| db_error(&format!("reading the indexes of {shown}"), e))?;
    let mut schema = Schema::default();
    for (name, mut table) in tables {
        let mut key = keys.remove(&name).unwrap_or_default();
        key.sort();
        table.primary_key = key.into_iter().map(|(_, c)| c).collect();
        table.unique = unique.remove(&name).unwrap_or_default();
        table.unique.retain(|set| *set != table.primary_key);
        schema.push(table);
    }
    Ok(schema)
}

/// Per table (named as [`read_postgres`] names them): the key columns of every unique index
/// that holds for every row (not partial, no expressions; INCLUDE columns left out).
async fn postgres_unique(
    conn: &mut sqlx::PgConnection,
) -> std::result::Result<BTreeMap<String, Vec<Vec<String>>>, sqlx::Error> {
    let sql = "SELECT n.nspname::text, c.relname::text, \
               array(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                     WHERE k.ord <= i.indnkeyatts ORDER BY k.ord) \
               FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
               WHERE i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL \
                 AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                 AND n.nspname NOT LIKE 'pg\\_%'";
    let mut out: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    for row in sqlx::query(sql).fetch_all(&mut *conn).await? {
        let (schema, table): (String, String) = (row.get(0), row.get(1));
        let name = if schema == "public" {
            table
        } else {
            format!("{schema}.{table}")
        };
        out.entry(name).or_default().push(row.get(2));
    }
    Ok(out)
}

fn postgres_kind(data_type: &str) -> ValueKind {
    match data_type {
        "smallint" | "integer" | "bigint" => ValueKind::Integer,
        "real" | "double precision" => ValueKind::Real,
        "numeric" | "money" => ValueKind::Numeric,
        "boolean" => ValueKind::Boolean,
        "json" | "jsonb" => ValueKind::Json,
        "bytea" => ValueKind::Bytes,
        "ARRAY" => ValueKind::Json,
        t if t.starts_with("timestamp") => ValueKind::Timestamp,
        _ => ValueKind::Text,
    }
}

pub use crate::pg_connection::quote_ident;
