//! Checks before timevault touches a PostgreSQL server: everything capture needs, found
//! through SQL alone (managed servers give no filesystem access), reported with the fix.
//!
//! The important one is replica identity: once a table without a primary key is in a
//! publication that publishes updates and deletes, the application's own UPDATE and DELETE on
//! it fail. So timevault refuses to create its publication until every table has a key (or
//! REPLICA IDENTITY FULL), and names each table with the statement that fixes it.

use serde::Serialize;
use sqlx::postgres::PgConnection;
use sqlx::Row;

use super::schema::{TABLE_FILTER, USER_NAMESPACE};
use super::{connect, pg_error, quote_ident};
use crate::error::{Error, ErrorKind, Result};

/// What the server offers timevault.
#[derive(Debug, Clone, Serialize)]
pub struct PreflightReport {
    pub server_version: String,
    pub wal_level: String,
    /// Why the role may create a replication slot (`superuser`, `replication`,
    /// `rds_replication`), or `None`.
    pub replication_privilege: Option<String>,
    pub max_replication_slots: i64,
    pub free_replication_slots: i64,
    /// Whether the slot named in the check already exists (then no free slot is needed).
    pub slot_exists: bool,
    /// Tables without a primary key or usable replica identity, with the fix for each.
    pub tables_without_identity: Vec<TableFix>,
}

/// A table capture cannot handle yet and the statements that would fix it.
#[derive(Debug, Clone, Serialize)]
pub struct TableFix {
    pub table: String,
    pub fix: String,
}

impl PreflightReport {
    /// Every problem, as one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.wal_level != "logical" {
            out.push(format!(
                "wal_level is {}, logical decoding needs logical: ALTER SYSTEM SET wal_level = logical; \
                 then restart the server (on managed services set the parameter, e.g. \
                 rds.logical_replication = 1, cloudsql.logical_decoding = on)",
                self.wal_level
            ));
        }
        if self.replication_privilege.is_none() {
            out.push(
                "the role may not create replication slots: ALTER ROLE <role> REPLICATION; \
                 (on RDS: GRANT rds_replication TO <role>)"
                    .to_string(),
            );
        }
        if !self.slot_exists && self.free_replication_slots < 1 {
            out.push(format!(
                "all {} replication slots are in use: raise max_replication_slots or drop an unused slot",
                self.max_replication_slots
            ));
        }
        for t in &self.tables_without_identity {
            out.push(format!(
                "table {} has no primary key or replica identity; fix: {}",
                t.table, t.fix
            ));
        }
        out
    }

    /// `Ok` when nothing stands in the way, otherwise a config error listing every problem.
    pub fn check(&self) -> Result<()> {
        let problems = self.problems();
        if problems.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::Config,
            format!(
                "postgres source cannot be captured: {}",
                problems.join("; ")
            ),
        )
        .with_hint(
            "run the statements shown, then try again; an UPDATE or DELETE on a table without \
             a key would fail once the table is published",
        ))
    }
}

/// Connect to `url` and check it; `Err` (kind Config) names every problem and its fix.
pub async fn preflight(url: &str) -> Result<PreflightReport> {
    let mut conn = connect(url).await?;
    let report = inspect(&mut conn, None).await?;
    report.check()?;
    Ok(report)
}

/// Gather the report without judging it (`slot`: the slot timevault would use).
pub async fn inspect(conn: &mut PgConnection, slot: Option<&str>) -> Result<PreflightReport> {
    let row = sqlx::query(
        "SELECT current_setting('server_version'), current_setting('wal_level'), \
                current_setting('max_replication_slots')::int8, \
                (SELECT count(*) FROM pg_replication_slots), \
                r.rolsuper, r.rolreplication, \
                EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname = 'rds_replication' \
                        AND pg_has_role(current_user, g.oid, 'MEMBER')), \
                EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1) \
         FROM pg_roles r WHERE r.rolname = current_user",
    )
    .bind(slot.unwrap_or(""))
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| pg_error("preflight", e))?;
    let max: i64 = row.get(2);
    let used: i64 = row.get(3);
    let privilege = if row.get::<bool, _>(4) {
        Some("superuser")
    } else if row.get::<bool, _>(5) {
        Some("replication")
    } else if row.get::<bool, _>(6) {
        Some("rds_replication")
    } else {
        None
    };
    Ok(PreflightReport {
        server_version: row.get(0),
        wal_level: row.get(1),
        replication_privilege: privilege.map(str::to_string),
        max_replication_slots: max,
        free_replication_slots: max - used,
        slot_exists: row.get(7),
        tables_without_identity: tables_without_identity(conn).await?,
    })
}

/// Tables whose updates and deletes could not be published: no primary key under REPLICA
/// IDENTITY DEFAULT, REPLICA IDENTITY NOTHING, or an index identity whose index is gone.
pub async fn tables_without_identity(conn: &mut PgConnection) -> Result<Vec<TableFix>> {
    let sql = format!(
        "SELECT n.nspname::text, c.relname::text, \
                EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique \
                        AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE {TABLE_FILTER} AND {USER_NAMESPACE} AND ( \
               (c.relreplident = 'd' AND NOT EXISTS (SELECT 1 FROM pg_index i \
                   WHERE i.indrelid = c.oid AND i.indisprimary)) \
            OR c.relreplident = 'n' \
            OR (c.relreplident = 'i' AND NOT EXISTS (SELECT 1 FROM pg_index i \
                   WHERE i.indrelid = c.oid AND i.indisreplident))) \
         ORDER BY 1, 2"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| pg_error("looking for tables without a key", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            let table = format!(
                "{}.{}",
                quote_ident(&r.get::<String, _>(0)),
                quote_ident(&r.get::<String, _>(1))
            );
            let has_unique: bool = r.get(2);
            let mut fix = format!(
                "ALTER TABLE {table} ADD PRIMARY KEY (<key columns>); or ALTER TABLE {table} REPLICA IDENTITY FULL;"
            );
            if has_unique {
                fix.push_str(&format!(
                    " or ALTER TABLE {table} REPLICA IDENTITY USING INDEX <its unique index on NOT NULL columns>;"
                ));
            }
            TableFix { table, fix }
        })
        .collect())
}
