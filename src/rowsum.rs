//! Row-content checksums: what a table held, recorded when a snapshot is taken, so a restore
//! drill can prove later that the rebuilt database holds the same rows (docs/FORMAT.md §5.4).
//!
//! The checksum of a table is order-independent: the row count and the sum, modulo 2^128, of
//! the first 16 bytes of each row's SHA-256. A heap reloaded in another order, or an index that
//! returns rows differently, checks the same; a changed, missing or extra row does not. A row is
//! its canonical text: PostgreSQL's COPY text line, SQLite's `quote()` of every column joined
//! by commas. Both are computed by streaming: no table is held in memory.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::sqlite::SqliteConnection;
use sqlx::Row;

use crate::error::{Error, Result};

/// One table's checksum: the row count and the sum of the rows' truncated SHA-256.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSum {
    pub rows: u64,
    /// 32 hex digits: the sum of the rows' truncated SHA-256, modulo 2^128.
    pub sum: String,
}

impl TableSum {
    /// The checksum of this table's rows and `part`'s; `None` when a sum does not parse.
    pub fn plus(&self, part: &TableSum) -> Option<TableSum> {
        let a = u128::from_str_radix(&self.sum, 16).ok()?;
        let b = u128::from_str_radix(&part.sum, 16).ok()?;
        Some(TableSum {
            rows: self.rows + part.rows,
            sum: format!("{:032x}", a.wrapping_add(b)),
        })
    }

    /// The checksum of this table's rows without `part`'s (the sum is additive, so a part's
    /// rows come out exactly); `None` when either sum does not parse or `part` is larger.
    pub fn minus(&self, part: &TableSum) -> Option<TableSum> {
        let whole = u128::from_str_radix(&self.sum, 16).ok()?;
        let less = u128::from_str_radix(&part.sum, 16).ok()?;
        Some(TableSum {
            rows: self.rows.checked_sub(part.rows)?,
            sum: format!("{:032x}", whole.wrapping_sub(less)),
        })
    }
}

/// Folds rows into a [`TableSum`].
#[derive(Debug, Default)]
pub struct RowSetHasher {
    rows: u64,
    sum: u128,
    /// The start of a line whose end has not arrived yet.
    partial: Vec<u8>,
}

impl RowSetHasher {
    pub fn add_row(&mut self, row: &[u8]) {
        let digest = Sha256::digest(row);
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        self.sum = self.sum.wrapping_add(u128::from_be_bytes(first));
        self.rows += 1;
    }

    /// Feed newline-terminated rows (COPY text); a row may be split across calls.
    pub fn add_lines(&mut self, data: &[u8]) {
        let mut rest = data;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            if self.partial.is_empty() {
                self.add_row(&rest[..end]);
            } else {
                let mut row = std::mem::take(&mut self.partial);
                row.extend_from_slice(&rest[..end]);
                self.add_row(&row);
            }
            rest = &rest[end + 1..];
        }
        self.partial.extend_from_slice(rest);
    }

    /// Fold in the rows another hasher saw (a part of the same table): the sum does not
    /// depend on order, so parts hashed separately add up to the whole table's checksum.
    pub fn merge(&mut self, other: RowSetHasher) {
        self.rows += other.rows;
        self.sum = self.sum.wrapping_add(other.sum);
        debug_assert!(other.partial.is_empty(), "a part ends with a whole row");
    }

    pub fn finish(self) -> TableSum {
        TableSum {
            rows: self.rows,
            sum: format!("{:032x}", self.sum),
        }
    }
}

fn quote_sqlite(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Checksums of every ordinary table of a SQLite database, read through `conn` (inside its
/// transaction, if one is open). Internal `sqlite_*` tables and virtual tables are left out
/// (the shadow tables of a virtual table are ordinary tables and are included).
pub async fn sqlite_table_sums(conn: &mut SqliteConnection) -> Result<BTreeMap<String, TableSum>> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' \
         AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
         AND upper(coalesce(sql, '')) NOT LIKE 'CREATE VIRTUAL%' ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| Error::other("sqlite: listing tables for checksums").with_source(e))?;
    let mut sums = BTreeMap::new();
    for name in names {
        let columns: Vec<String> = sqlx::query("SELECT name FROM pragma_table_info(?1)")
            .bind(&name)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| Error::other(format!("sqlite: columns of {name}")).with_source(e))?
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect();
        if columns.is_empty() {
            continue;
        }
        let row: Vec<String> = columns
            .iter()
            .map(|c| format!("quote({})", quote_sqlite(c)))
            .collect();
        let sql = format!(
            "SELECT {} FROM {}",
            row.join(" || ',' || "),
            quote_sqlite(&name)
        );
        let mut hasher = RowSetHasher::default();
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(&mut *conn);
        while let Some(r) = rows.try_next().await.map_err(|e| {
            Error::other(format!("sqlite: reading {name} for its checksum")).with_source(e)
        })? {
            hasher.add_row(r.get::<String, _>(0).as_bytes());
        }
        drop(rows);
        sums.insert(name, hasher.finish());
    }
    Ok(sums)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_does_not_matter_content_does() {
        let sum = |rows: &[&str]| {
            let mut h = RowSetHasher::default();
            for r in rows {
                h.add_row(r.as_bytes());
            }
            h.finish()
        };
        assert_eq!(sum(&["a", "b", "c"]), sum(&["c", "a", "b"]));
        assert_ne!(sum(&["a", "b", "c"]), sum(&["a", "b", "d"]));
        assert_ne!(sum(&["a", "b"]), sum(&["a", "b", "b"]));
        assert_eq!(sum(&["a", "b"]).rows, 2);
    }

    #[test]
    fn lines_split_anywhere_hash_like_whole_rows() {
        let mut whole = RowSetHasher::default();
        whole.add_row(b"1\tone");
        whole.add_row(b"2\ttwo");
        let mut split = RowSetHasher::default();
        split.add_lines(b"1\to");
        split.add_lines(b"ne\n2");
        split.add_lines(b"\ttwo\n");
        assert_eq!(whole.finish(), split.finish());
    }

    #[test]
    fn parts_merge_into_the_whole() {
        let mut whole = RowSetHasher::default();
        whole.add_lines(b"1\ta\n2\tb\n3\tc\n");
        let (mut first, mut second) = (RowSetHasher::default(), RowSetHasher::default());
        first.add_lines(b"3\tc\n");
        second.add_lines(b"1\ta\n2\tb\n");
        first.merge(second);
        assert_eq!(whole.finish(), first.finish());
    }

    #[test]
    fn a_part_subtracts_exactly() {
        let whole = TableSum {
            rows: 3,
            sum: format!("{:032x}", 5u128),
        };
        let part = TableSum {
            rows: 1,
            sum: format!("{:032x}", 7u128),
        };
        let rest = whole.minus(&part).unwrap();
        assert_eq!(rest.rows, 2);
        assert_eq!(
            u128::from_str_radix(&rest.sum, 16).unwrap(),
            5u128.wrapping_sub(7)
        );
        assert!(part.minus(&whole).is_none(), "more rows than the whole");
        assert_eq!(rest.plus(&part).unwrap(), whole);
    }
}
