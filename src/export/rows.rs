//! One tenant's rows of a SQLite database, table by table, into JSONL or CSV files.
//!
//! Rows are streamed from the query into a buffered file, one at a time. Values keep their
//! meaning (docs/FORMAT.md §9): integers and reals as JSON numbers, exact decimals
//! (NUMERIC) as strings, booleans as `true`/`false`, JSON columns as JSON, bytes as base64,
//! text (timestamps are RFC 3339 text in the fixture) as strings, NULL as `null` (CSV: an
//! empty unquoted field; an empty string is `""`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use futures::TryStreamExt;
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{Row, TypeInfo, ValueRef};

use super::archive::Hashing;
use crate::error::{Error, Result};
use crate::tenancy::{
    rows_sql, ColumnSchema, Dialect, Membership, ResolvedTenancy, Schema, ValueKind,
};

/// The format of the table files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableFormat {
    Jsonl,
    Csv,
}

impl TableFormat {
    pub fn extension(self) -> &'static str {
        match self {
            TableFormat::Jsonl => "jsonl",
            TableFormat::Csv => "csv",
        }
    }
}

impl std::str::FromStr for TableFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "jsonl" => Ok(TableFormat::Jsonl),
            "csv" => Ok(TableFormat::Csv),
            other => Err(Error::input(format!("unknown export format `{other}`"))
                .with_hint("use --format jsonl or --format csv")),
        }
    }
}

/// One table written for the tenant.
#[derive(Debug, Clone, Serialize)]
pub struct TableFile {
    pub source: String,
    pub table: String,
    /// How rows belong to the tenant: `direct`, or the path.
    pub tenancy: String,
    pub columns: Vec<ColumnSchema>,
    pub rows: u64,
    pub format: TableFormat,
    /// Path inside the archive.
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    /// The spooled file on disk.
    #[serde(skip)]
    pub spool: PathBuf,
}

/// A connection to the (restored) database being exported.
pub enum DbConn<'a> {
    Sqlite(&'a mut SqliteConnection),
    Postgres(&'a mut PgConnection),
}

impl DbConn<'_> {
    fn dialect(&self) -> Dialect {
        match self {
            DbConn::Sqlite(_) => Dialect::Sqlite,
            DbConn::Postgres(_) => Dialect::Postgres,
        }
    }
}

/// Write every non-global table's rows of `tenant` into `dir`, one file per table.
/// `prefix` goes before the table name in the archive path (`""` for a single database).
#[allow(clippy::too_many_arguments)]
pub async fn write_tables(
    mut conn: DbConn<'_>,
    schema: &Schema,
    tenancy: &ResolvedTenancy,
    tenant: &str,
    format: TableFormat,
    source: &str,
    prefix: &str,
    dir: &Path,
) -> Result<Vec<TableFile>> {
    let mut out = Vec::new();
    for (table, membership) in &tenancy.tables {
        let t = &schema.tables[table];
        let Some(sql) = rows_sql(t, membership, &tenancy.column, conn.dialect()) else {
            continue;
        };
        // One path component from the identifiers, whatever they hold (`../x`, `a/b`, "\n").
        let name = format!(
            "{}.{}",
            super::names::component(&format!("{prefix}{table}")),
            format.extension()
        );
        let file = format!("tables/{name}");
        let spool = dir.join(&name);
        let mut writer = TableWriter::create(&spool, &t.columns, format)?;
        let written = match &mut conn {
            DbConn::Sqlite(c) => sqlite_rows(c, &sql, tenant, &t.columns, &mut writer).await,
            DbConn::Postgres(c) => postgres_rows(c, &sql, tenant, &t.columns, &mut writer).await,
        };
        written.map_err(|e| e.context(format!("exporting table {table} of {source}")))?;
        let (rows, sha256, bytes) = writer.finish()?;
        out.push(TableFile {
            source: source.to_string(),
            table: table.clone(),
            tenancy: match membership {
                Membership::Path(hops) => crate::tenancy::TableRule::Path(hops.clone()).to_string(),
                _ => "direct".into(),
            },
            columns: t.columns.clone(),
            rows,
            format,
            file,
            bytes,
            sha256,
            spool,
        });
    }
    Ok(out)
}

/// One table file being written.
struct TableWriter<'a> {
    w: Hashing<BufWriter<File>>,
    path: &'a Path,
    columns: &'a [ColumnSchema],
    format: TableFormat,
    rows: u64,
}

impl<'a> TableWriter<'a> {
    fn create(path: &'a Path, columns: &'a [ColumnSchema], format: TableFormat) -> Result<Self> {
        let file = super::create_private(path).map_err(|e| Error::io(path.display(), e))?;
        let mut w = Hashing::new(BufWriter::with_capacity(256 << 10, file));
        if format == TableFormat::Csv {
            let names: Vec<String> = columns.iter().map(|c| csv_cell(&c.name)).collect();
            write!(w, "{}\r\n", names.join(",")).map_err(|e| Error::io(path.display(), e))?;
        }
        Ok(TableWriter {
            w,
            path,
            columns,
            format,
            rows: 0,
        })
    }

    fn push(&mut self, values: &[Value]) -> Result<()> {
        match self.format {
            TableFormat::Jsonl => write_jsonl(&mut self.w, self.columns, values),
            TableFormat::Csv => write_csv(&mut self.w, values),
        }
        .map_err(|e| Error::io(self.path.display(), e))?;
        self.rows += 1;
        Ok(())
    }

    /// Flush to disk; (rows, sha256, bytes).
    fn finish(self) -> Result<(u64, String, u64)> {
        let io = |e: std::io::Error| Error::io(self.path.display(), e);
        let (buffered, sha256, bytes) = self.w.finish();
        let file = buffered.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok((self.rows, sha256, bytes))
    }
}

async fn sqlite_rows(
    conn: &mut SqliteConnection,
    sql: &str,
    tenant: &str,
    columns: &[ColumnSchema],
    writer: &mut TableWriter<'_>,
) -> Result<()> {
    let mut stream = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .bind(tenant)
        .fetch(&mut *conn);
    while let Some(row) = stream
        .try_next()
        .await
        .map_err(|e| Error::other("query failed").with_source(e))?
    {
        writer.push(&row_values(&row, columns)?)?;
    }
    Ok(())
}

/// PostgreSQL rows arrive as text already in export form ([`crate::tenancy::postgres_column`]);
/// only numbers, booleans and JSON are turned back into JSON values.
async fn postgres_rows(
    conn: &mut PgConnection,
    sql: &str,
    tenant: &str,
    columns: &[ColumnSchema],
    writer: &mut TableWriter<'_>,
) -> Result<()> {
    let mut stream = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .bind(tenant)
        .fetch(&mut *conn);
    while let Some(row) = stream
        .try_next()
        .await
        .map_err(|e| Error::other("query failed").with_source(e))?
    {
        let mut values = Vec::with_capacity(columns.len());
        for (i, column) in columns.iter().enumerate() {
            let text: Option<String> = row
                .try_get(i)
                .map_err(|e| Error::other(format!("column {}", column.name)).with_source(e))?;
            values.push(text.map_or(Value::Null, |t| postgres_value(t, column.kind)));
        }
        writer.push(&values)?;
    }
    Ok(())
}

fn postgres_value(text: String, kind: ValueKind) -> Value {
    match kind {
        ValueKind::Integer => text.parse::<i64>().map_or(Value::String(text), Value::from),
        ValueKind::Real => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::String(text), Value::Number),
        ValueKind::Boolean => Value::Bool(text == "true" || text == "t"),
        ValueKind::Json => serde_json::from_str(&text).unwrap_or(Value::String(text)),
        _ => Value::String(text),
    }
}

/// A row's values as JSON, by the value's storage class and the column's kind.
pub fn row_values(row: &SqliteRow, columns: &[ColumnSchema]) -> Result<Vec<Value>> {
    let mut out = Vec::with_capacity(columns.len());
    for (i, column) in columns.iter().enumerate() {
        let bad = |e: sqlx::Error| Error::other(format!("column {}: {e}", column.name));
        let raw = row.try_get_raw(i).map_err(bad)?;
        if raw.is_null() {
            out.push(Value::Null);
            continue;
        }
        let storage = raw.type_info().name().to_string();
        let value = match storage.as_str() {
            "INTEGER" => integer(
                row.try_get_unchecked::<i64, _>(i).map_err(bad)?,
                column.kind,
            ),
            "REAL" => real(
                row.try_get_unchecked::<f64, _>(i).map_err(bad)?,
                column.kind,
            ),
            "BLOB" => Value::String(
                base64::engine::general_purpose::STANDARD
                    .encode(row.try_get_unchecked::<Vec<u8>, _>(i).map_err(bad)?),
            ),
            _ => text(
                row.try_get_unchecked::<String, _>(i).map_err(bad)?,
                column.kind,
            ),
        };
        out.push(value);
    }
    Ok(out)
}

fn integer(v: i64, kind: ValueKind) -> Value {
    match kind {
        ValueKind::Boolean => Value::Bool(v != 0),
        ValueKind::Numeric | ValueKind::Text => Value::String(v.to_string()),
        _ => Value::from(v),
    }
}

fn real(v: f64, kind: ValueKind) -> Value {
    match kind {
        ValueKind::Numeric | ValueKind::Text => Value::String(v.to_string()),
        _ => serde_json::Number::from_f64(v).map_or(Value::String(v.to_string()), Value::Number),
    }
}

fn text(v: String, kind: ValueKind) -> Value {
    if kind == ValueKind::Json {
        if let Ok(json) = serde_json::from_str::<Value>(&v) {
            return json;
        }
    }
    Value::String(v)
}

/// `{"col":value,...}` in column order, one line.
fn write_jsonl(
    w: &mut impl Write,
    columns: &[ColumnSchema],
    values: &[Value],
) -> std::io::Result<()> {
    w.write_all(b"{")?;
    for (i, (c, v)) in columns.iter().zip(values).enumerate() {
        if i > 0 {
            w.write_all(b",")?;
        }
        serde_json::to_writer(&mut *w, &c.name)?;
        w.write_all(b":")?;
        serde_json::to_writer(&mut *w, v)?;
    }
    w.write_all(b"}\n")
}

fn write_csv(w: &mut impl Write, values: &[Value]) -> std::io::Result<()> {
    let fields: Vec<String> = values
        .iter()
        .map(|v| match v {
            Value::Null => String::new(),
            Value::String(s) => csv_cell(s),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            other => csv_cell(&other.to_string()),
        })
        .collect();
    w.write_all(fields.join(",").as_bytes())?;
    w.write_all(b"\r\n")
}

/// A text cell: neutralised ([`neutralise_formula`]), then quoted ([`csv_field`]).
pub fn csv_cell(s: &str) -> String {
    csv_field(&neutralise_formula(s))
}

/// OWASP's CSV injection rule: a cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage
/// return is one a spreadsheet may run as a formula (`=HYPERLINK(...)`, `-2+3`, `@SUM(...)`),
/// so it gets a leading `'`, which spreadsheets read as "text". A plain number (`-12.50`,
/// `+1e5`) is left alone: no spreadsheet evaluates it, and exact decimals stay data. JSON
/// values (JSONL) are never altered; docs/FORMAT.md §9.
pub fn neutralise_formula(s: &str) -> std::borrow::Cow<'_, str> {
    let risky = s.starts_with(['=', '+', '-', '@', '\t', '\r']);
    if risky && !is_plain_number(s) {
        format!("'{s}").into()
    } else {
        s.into()
    }
}

/// `[+-]digits[.digits][(e|E)[+-]digits]`: a decimal number and nothing else.
fn is_plain_number(s: &str) -> bool {
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e.strip_prefix(['+', '-']).unwrap_or(e))),
        None => (unsigned, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((whole, fraction)) => digits(whole) && digits(fraction),
        None => digits(mantissa),
    };
    mantissa_ok && exponent.is_none_or(digits)
}

/// RFC 4180: quoted when empty or holding a comma, quote, CR or LF; quotes doubled.
pub fn csv_field(s: &str) -> String {
    if s.is_empty() || s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_that_could_be_formulas_get_a_quote() {
        for (value, cell) in [
            ("=1+1", "'=1+1"),
            ("+SUM(A1)", "'+SUM(A1)"),
            ("-2+3", "'-2+3"),
            ("@cmd", "'@cmd"),
            ("\tx", "'\tx"),
            ("\rx", "\"'\rx\""),
            (
                "=HYPERLINK(\"u\",\"a,b\")",
                "\"'=HYPERLINK(\"\"u\"\",\"\"a,b\"\")\"",
            ),
            ("-", "'-"),
            ("-e5", "'-e5"),
            ("-1.", "'-1."),
            ("-1+1", "'-1+1"),
            ("-12.50", "-12.50"),
            ("+1e5", "+1e5"),
            ("-1.5E-7", "-1.5E-7"),
            ("plain", "plain"),
            ("a=b", "a=b"),
            ("", "\"\""),
        ] {
            assert_eq!(csv_cell(value), cell, "{value:?}");
        }
    }

    #[test]
    fn spooled_tables_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        let columns = Vec::new();
        let writer = TableWriter::create(&path, &columns, TableFormat::Csv).unwrap();
        drop(writer);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "spool file mode {mode:o}");
    }
}
