//! The snapshot: publication and slot first, then one REPEATABLE READ READ ONLY transaction
//! that records its `pg_current_snapshot()`, the schema and every table's rows.

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::preflight::inspect;
use super::schema::{self, Table};
use super::{
    pg_error, quote_ident, ChainState, Lsn, Position, PostgresSnapshotDetails, PostgresSource,
    TableImage,
};
use crate::catalog::rowsum::RowSetHasher;
use crate::catalog::{SnapshotManifest, SnapshotReason};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::{ChunkedWriter, Repository, DEFAULT_CHUNK};
use crate::time;

/// What one snapshot did.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotStats {
    pub chain: String,
    pub taken_at: DateTime<Utc>,
    pub tables: usize,
    pub rows: u64,
    pub bytes: u64,
    pub uploaded: u64,
    pub reason: SnapshotReason,
    /// `pg_current_snapshot()` recorded for the handoff.
    pub snapshot: String,
}

impl PostgresSource {
    /// Take a snapshot: a new chain starts (the current one, if any, ends here).
    pub async fn snapshot(&mut self, repo: &Repository) -> Result<SnapshotStats> {
        // 1. Preflight; publication and slot (once).
        let report = inspect(&mut self.conn, Some(&self.slot)).await?;
        report.check()?;
        self.ensure_publication_and_slot(report.slot_exists).await?;
        // 2. The current chain ends: ship what it has (rotation).
        let (reason, continues) = match (&self.state, &self.continuity_lost) {
            (Some(state), _) => {
                let chain = state.chain.clone();
                self.capture(repo).await?;
                (SnapshotReason::Rotation, Some(chain))
            }
            (None, Some(why)) => (SnapshotReason::ContinuityLost(why.clone()), None),
            (None, None) => (SnapshotReason::Initial, None),
        };
        self.check_slot_idle().await?;
        let start = self
            .slot_position()
            .await?
            .ok_or_else(|| Error::other(format!("replication slot {} vanished", self.slot)))?;
        // 3. The snapshot transaction: visibility, schema, rows.
        let result = self
            .copy_snapshot(repo, start, reason.clone(), continues)
            .await;
        if result.is_err() {
            let _ = sqlx::query("ROLLBACK").execute(&mut self.conn).await;
        }
        let (manifest, details, rows, uploaded) = result?;
        // 4. The manifest makes the chain exist.
        manifest.write(repo).await?;
        self.previous = self.state.take();
        // Right after a rotation every relation is recorded once, for the ending chain too.
        self.tracker.reset(&details.schema, self.previous.is_some());
        self.state = Some(ChainState {
            chain: manifest.chain.clone(),
            seq: 0,
            position: details.start.clone(),
        });
        self.continuity_lost = None;
        Ok(SnapshotStats {
            chain: manifest.chain.clone(),
            taken_at: manifest.taken_at,
            tables: details.tables.len(),
            rows,
            bytes: manifest.bytes,
            uploaded,
            reason,
            snapshot: details.snapshot,
        })
    }

    /// Refuse to start a chain while another session holds the slot: a daemon killed while
    /// creating it leaves a server process that finishes the creation later and moves the
    /// slot's confirmed position, which would break the chain about to start.
    async fn check_slot_idle(&mut self) -> Result<()> {
        let holder: Option<i32> = sqlx::query_scalar(
            "SELECT active_pid FROM pg_replication_slots \
             WHERE slot_name = $1 AND active_pid <> pg_backend_pid()",
        )
        .bind(&self.slot)
        .fetch_optional(&mut self.conn)
        .await
        .map_err(|e| pg_error("reading the slot", e))?
        .flatten();
        match holder {
            None => Ok(()),
            Some(pid) => Err(Error::new(
                ErrorKind::Locked,
                format!(
                    "replication slot {} is in use by server process {pid}",
                    self.slot
                ),
            )
            .with_hint(
                "another timevault (or an interrupted slot creation) holds it; the daemon retries",
            )),
        }
    }

    async fn ensure_publication_and_slot(&mut self, slot_exists: bool) -> Result<()> {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
                .bind(&self.publication)
                .fetch_one(&mut self.conn)
                .await
                .map_err(|e| pg_error("looking for the publication", e))?;
        if !exists {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE PUBLICATION {} FOR ALL TABLES",
                quote_ident(&self.publication)
            )))
            .execute(&mut self.conn)
            .await
            .map_err(|e| pg_error("creating the publication", e))?;
        }
        if !slot_exists {
            // Returns once the slot is consistent: every later commit will be decoded.
            sqlx::query("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')")
                .bind(&self.slot)
                .fetch_one(&mut self.conn)
                .await
                .map_err(|e| pg_error("creating the replication slot", e))?;
        }
        Ok(())
    }

    async fn copy_snapshot(
        &mut self,
        repo: &Repository,
        start: Lsn,
        reason: SnapshotReason,
        continues: Option<String>,
    ) -> Result<(SnapshotManifest, PostgresSnapshotDetails, u64, u64)> {
        sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut self.conn)
            .await
            .map_err(|e| pg_error("begin snapshot", e))?;
        // clock_timestamp() runs after the snapshot was taken, so every transaction the
        // snapshot sees committed at or before taken_at.
        let row = sqlx::query(
            "SELECT pg_current_snapshot()::text, pg_current_wal_lsn()::text, \
                    (extract(epoch from clock_timestamp()) * 1000000)::int8, \
                    current_setting('server_version')",
        )
        .fetch_one(&mut self.conn)
        .await
        .map_err(|e| pg_error("recording the snapshot", e))?;
        let visibility: String = row.get(0);
        let taken_at = time::micros(super::from_micros(row.get(2)));
        let schema = schema::capture(&mut self.conn).await?;
        let sequences = schema::sequence_values(&mut self.conn).await?;
        let mut hasher = Sha256::new();
        let mut images = Vec::new();
        let mut table_sums = std::collections::BTreeMap::new();
        let (mut rows, mut uploaded) = (0, 0);
        for table in &schema.tables {
            let mut sum = RowSetHasher::default();
            let (image, up) = self.copy_table(repo, table, &mut hasher, &mut sum).await?;
            table_sums.insert(format!("{}.{}", image.schema, image.name), sum.finish());
            rows += image.rows;
            uploaded += up;
            images.push(image);
        }
        sqlx::query("COMMIT")
            .execute(&mut self.conn)
            .await
            .map_err(|e| pg_error("end snapshot", e))?;
        let details = PostgresSnapshotDetails {
            server_version: row.get(3),
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            snapshot: visibility,
            wal_lsn: row.get(1),
            start: Position {
                lsn: start.to_string(),
                commit_us: None,
                sequences,
            },
            schema,
            tables: images,
        };
        let manifest = SnapshotManifest {
            source: self.name.clone(),
            kind: "postgres".into(),
            chain: time::compact(taken_at),
            taken_at,
            reason,
            continues,
            bytes: details.tables.iter().map(|t| t.bytes).sum(),
            sha256: hex::encode(hasher.finalize()),
            chunks: details
                .tables
                .iter()
                .flat_map(|t| t.chunks.iter().cloned())
                .collect(),
            details: serde_json::to_value(&details).expect("details serialize"),
            table_sums,
        };
        Ok((manifest, details, rows, uploaded))
    }

    /// Stream one table through COPY into chunks of whole rows; returns its image and the
    /// bytes uploaded.
    async fn copy_table(
        &mut self,
        repo: &Repository,
        table: &Table,
        hasher: &mut Sha256,
        sum: &mut RowSetHasher,
    ) -> Result<(TableImage, u64)> {
        let columns: Vec<String> = table.stored_columns().map(|c| c.name.clone()).collect();
        let list: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
        let sql = format!(
            "COPY (SELECT {} FROM ONLY {}) TO STDOUT",
            list.join(", "),
            table.qualified()
        );
        let mut writer = ChunkedWriter::new(repo, DEFAULT_CHUNK);
        let mut rows = 0u64;
        let mut stream = self
            .conn
            .copy_out_raw(&sql)
            .await
            .map_err(|e| pg_error(&format!("COPY {}", table.qualified()), e))?;
        while let Some(data) = stream
            .try_next()
            .await
            .map_err(|e| pg_error(&format!("COPY {}", table.qualified()), e))?
        {
            hasher.update(&data);
            sum.add_lines(&data);
            rows += data.iter().filter(|&&b| b == b'\n').count() as u64;
            writer.write_record(&data).await?;
        }
        drop(stream);
        let list = writer.finish().await?;
        Ok((
            TableImage {
                schema: table.schema.clone(),
                name: table.name.clone(),
                columns,
                rows,
                bytes: list.bytes,
                chunks: list.chunks,
            },
            list.uploaded,
        ))
    }
}
