//! The snapshot: publication and slot first, then one REPEATABLE READ READ ONLY transaction
//! that records its `pg_current_snapshot()` and the schema and exports its snapshot; worker
//! connections join it and copy every table's rows in parts ([`super::parallel`]), while
//! `pg_dump --schema-only` takes the schema image at the same exported snapshot
//! ([`super::image`]).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

use super::continuity::{self, RecordedDetails, ServerIdentity};
use super::grouping::{TableTenancy, TenantKey};
use super::image;
use super::parallel::{self, Part, PartDone};
use super::preflight::inspect;
use super::schema::{self, Table};
use super::tools::{self, Libpq, PgTools};
use super::{
    pg_error, quote_ident, ChainState, Lsn, Position, PostgresSnapshotDetails, PostgresSource,
    TableImage,
};
use crate::catalog::rowsum::{RowSetHasher, TableSum};
use crate::catalog::{SnapshotManifest, SnapshotReason};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::Repository;
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
    /// COPY statements run: one per table, more for tables split into page ranges.
    pub parts: usize,
    /// `pg_current_snapshot()` recorded for the handoff.
    pub snapshot: String,
}

/// What the snapshot transaction produced (the manifest is not written yet).
struct Taken {
    manifest: SnapshotManifest,
    details: PostgresSnapshotDetails,
    identity: ServerIdentity,
    rows: u64,
    uploaded: u64,
    parts: usize,
}

impl PostgresSource {
    /// Take a snapshot: a new chain starts (the current one, if any, ends here). After a loss
    /// of continuity the reason is `continuity-lost` and the slot is created anew.
    pub async fn snapshot(&mut self, repo: &Repository) -> Result<SnapshotStats> {
        let result = self.snapshot_checked(repo).await;
        self.note_outcome(&result);
        result
    }

    async fn snapshot_checked(&mut self, repo: &Repository) -> Result<SnapshotStats> {
        self.reconnect_if_needed().await?;
        // 1. The current chain ends: ship what it has (rotation), unless continuity is lost.
        let (reason, continues) = self.end_chain(repo).await?;
        // The slot must be idle for the snapshot; and the new chain's first capture opens a
        // new replication connection, on which pgoutput describes every relation again (once
        // per connection), so each chain's change log is read on its own.
        self.stop_stream().await;
        // 2. Preflight (the client tools too); publication and slot (once, and again after a
        // loss).
        self.client_tools().await?;
        let start = self.prepare_slot(&reason).await?;
        // 3. The snapshot transaction: visibility, schema, rows.
        let result = self
            .copy_snapshot(repo, start, reason.clone(), continues)
            .await;
        if result.is_err() {
            let _ = sqlx::query("ROLLBACK").execute(&mut self.conn).await;
        }
        let Taken {
            manifest,
            details,
            identity,
            rows,
            uploaded,
            parts,
        } = result?;
        // 4. The manifest makes the chain exist.
        manifest.write(repo).await?;
        self.previous = self.state.take();
        // Right after a rotation every relation is recorded once, for the ending chain too.
        self.tracker.reset(&details.schema, self.previous.is_some());
        self.router.reset(&details.schema);
        self.state = Some(ChainState {
            chain: manifest.chain.clone(),
            seq: 0,
            position: details.start.clone(),
            identity,
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
            parts,
            snapshot: details.snapshot,
        })
    }

    /// `pg_dump` and `pg_restore` of the server's major version or newer (found once): a
    /// snapshot without its schema image could not be restored.
    pub(super) async fn client_tools(&mut self) -> Result<PgTools> {
        if let Some(found) = &self.tools {
            return Ok(found.clone());
        }
        let major = tools::connected_major(&self.conn)?;
        let found = PgTools::find(major).await?;
        self.tools = Some(found.clone());
        Ok(found)
    }

    /// Preflight, then the publication and the slot, created when missing; after a loss of
    /// continuity an existing slot is dropped first. Returns where the new chain starts.
    async fn prepare_slot(&mut self, reason: &SnapshotReason) -> Result<Lsn> {
        let report = inspect(&mut self.conn, Some(&self.slot)).await?;
        report.check()?;
        let mut slot_exists = report.slot_exists;
        if matches!(reason, SnapshotReason::ContinuityLost(_)) && slot_exists {
            // Invalidated, consumed by someone else, or unable to decode past the time the
            // publication was missing: only a new slot is consistent with the new snapshot.
            self.check_slot_idle().await?;
            self.drop_slot_if_exists().await?;
            slot_exists = false;
        }
        self.ensure_publication_and_slot(slot_exists).await?;
        self.check_slot_idle().await?;
        self.slot_position()
            .await?
            .ok_or_else(|| Error::other(format!("replication slot {} vanished", self.slot)))
    }

    /// Why the new chain starts, and the chain it continues: a rotation first ships what the
    /// current chain has (a loss found while doing so makes it `continuity-lost`).
    async fn end_chain(&mut self, repo: &Repository) -> Result<(SnapshotReason, Option<String>)> {
        if let Some(state) = &self.state {
            let chain = state.chain.clone();
            match self.capture(repo).await {
                Ok(_) => return Ok((SnapshotReason::Rotation, Some(chain))),
                Err(e) if self.state.is_some() => return Err(e),
                Err(_) => {}
            }
        }
        Ok(match &self.continuity_lost {
            Some(why) => (SnapshotReason::ContinuityLost(why.clone()), None),
            None => (SnapshotReason::Initial, None),
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
    ) -> Result<Taken> {
        sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut self.conn)
            .await
            .map_err(|e| pg_error("begin snapshot", e))?;
        // clock_timestamp() runs after the snapshot was taken, so every transaction the
        // snapshot sees committed at or before taken_at. The exported snapshot lets the
        // workers see exactly this state.
        let row = sqlx::query(
            "SELECT pg_current_snapshot()::text, pg_current_wal_lsn()::text, \
                    (extract(epoch from clock_timestamp()) * 1000000)::int8, \
                    current_setting('server_version'), pg_export_snapshot(), \
                    current_setting('server_version_num')::int4",
        )
        .fetch_one(&mut self.conn)
        .await
        .map_err(|e| pg_error("recording the snapshot", e))?;
        let visibility: String = row.get(0);
        let taken_at = time::micros(super::from_micros(row.get(2)));
        let exported: String = row.get(4);
        let identity = continuity::identity(&mut self.conn).await?;
        let schema = schema::capture(&mut self.conn).await?;
        let sequences = schema::sequence_values(&mut self.conn).await?;
        let facts = image::facts(&mut self.conn).await?;
        let fingerprint = facts.fingerprint.clone();
        // TID range scans exist since PostgreSQL 14; before, a range would scan the table.
        let split = row.get::<i32, _>(5) >= 140_000;
        let keys: Vec<Option<TenantKey>> = schema
            .tables
            .iter()
            .map(|t| self.rules.as_ref().and_then(|r| r.key(&schema, t)))
            .collect();
        let parts = self.plan_parts(&schema.tables, &keys, split).await?;
        let part_count = parts.len();
        // The rows and the schema image, both at the exported snapshot.
        let tools = self.client_tools().await?;
        let libpq = Libpq::from_url(&self.url)?;
        let (done, dumped) = tokio::try_join!(
            parallel::copy_parts(repo, &self.url, &exported, parts, self.parallel.workers),
            image::dump(repo, &tools, &libpq, &exported)
        )?;
        let schema_image =
            image::image_of(&tools, taken_at.timestamp_micros(), facts, dumped, None);
        sqlx::query("COMMIT")
            .execute(&mut self.conn)
            .await
            .map_err(|e| pg_error("end snapshot", e))?;
        let grouped = self.rules.is_some();
        let (images, table_sums, rows, uploaded) = assemble(&schema.tables, keys, grouped, done);
        let details = PostgresSnapshotDetails {
            server_version: row.get(3),
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            snapshot: visibility,
            wal_lsn: row.get(1),
            start: Position {
                lsn: start,
                commit_us: None,
                sequences,
                schema_fingerprint: Some(fingerprint),
            },
            schema,
            schema_image: Some(schema_image),
            tables: images,
            image_digest: Some(parallel::IMAGE_DIGEST_CHUNK_IDS.to_string()),
        };
        let chunks: Vec<_> = details
            .tables
            .iter()
            .flat_map(|t| t.chunks.iter().cloned())
            .collect();
        let manifest = SnapshotManifest {
            source: self.name.clone(),
            kind: crate::config::SourceKind::Postgres,
            chain: time::compact(taken_at),
            taken_at,
            reason,
            continues,
            bytes: details.tables.iter().map(|t| t.bytes).sum(),
            sha256: parallel::chunk_ids_digest(&chunks),
            chunks,
            details: serde_json::to_value(RecordedDetails {
                details: &details,
                identity,
            })
            .expect("details serialize"),
            table_sums,
        };
        Ok(Taken {
            manifest,
            details,
            identity,
            rows,
            uploaded,
            parts: part_count,
        })
    }

    /// The parts to copy: every table whole, or in page ranges when it is larger than
    /// `snapshot_split_pages` (and `split` allows TID range scans). Largest tables first, so
    /// the last parts to finish are small.
    async fn plan_parts(
        &mut self,
        tables: &[Table],
        keys: &[Option<TenantKey>],
        split: bool,
    ) -> Result<Vec<Part>> {
        // Every table's size in one round trip, in the order of `tables`.
        let names: Vec<String> = tables.iter().map(Table::qualified).collect();
        let pages: Vec<i64> = sqlx::query_scalar(
            "SELECT pg_relation_size(t.name::regclass) / current_setting('block_size')::int8 \
             FROM unnest($1::text[]) WITH ORDINALITY AS t(name, n) ORDER BY t.n",
        )
        .bind(&names)
        .fetch_all(&mut self.conn)
        .await
        .map_err(|e| pg_error("sizing the tables", e))?;
        let mut sized: Vec<(u64, usize)> = pages
            .into_iter()
            .enumerate()
            .map(|(i, pages)| (pages.max(0) as u64, i))
            .collect();
        sized.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut parts = Vec::new();
        for (pages, i) in sized {
            let table = &tables[i];
            let columns: Vec<String> = table.stored_columns().map(|c| c.name.clone()).collect();
            let ranges = if split {
                parallel::page_ranges(pages, self.parallel.split_pages)
            } else {
                vec![(0, None)]
            };
            for (index, range) in ranges.into_iter().enumerate() {
                parts.push(Part {
                    table: i,
                    index,
                    sql: parallel::copy_sql(&table.qualified(), &columns, range, keys[i].as_ref()),
                    grouped: keys[i].is_some(),
                    label: match range {
                        (0, None) => table.qualified(),
                        (from, to) => format!(
                            "{} pages {from}..{}",
                            table.qualified(),
                            to.map_or(String::new(), |t| t.to_string())
                        ),
                    },
                });
            }
        }
        Ok(parts)
    }
}

/// Order the parts into table images (parts in page order, each chunk's tenant recorded),
/// with each table's checksum.
fn assemble(
    tables: &[Table],
    keys: Vec<Option<TenantKey>>,
    grouped: bool,
    mut done: Vec<PartDone>,
) -> (Vec<TableImage>, BTreeMap<String, TableSum>, u64, u64) {
    done.sort_by_key(|p| (p.table, p.index));
    let mut images: Vec<TableImage> = tables
        .iter()
        .zip(keys)
        .map(|(t, key)| TableImage {
            schema: t.schema.clone(),
            name: t.name.clone(),
            columns: t.stored_columns().map(|c| c.name.clone()).collect(),
            rows: 0,
            bytes: 0,
            chunks: Vec::new(),
            tenancy: grouped.then_some(TableTenancy {
                key,
                chunk_tenants: Vec::new(),
            }),
        })
        .collect();
    let mut sums: Vec<RowSetHasher> = tables.iter().map(|_| RowSetHasher::default()).collect();
    let mut uploaded = 0;
    for part in done {
        let image = &mut images[part.table];
        image.rows += part.rows;
        image.bytes += part.list.bytes;
        image.chunks.extend(part.list.chunks);
        if let Some(grouping) = image.tenancy.as_mut().filter(|g| g.key.is_some()) {
            grouping.chunk_tenants.extend(part.tenants);
        }
        uploaded += part.list.uploaded;
        sums[part.table].merge(part.sum);
    }
    let rows = images.iter().map(|i| i.rows).sum();
    let table_sums = images
        .iter()
        .zip(sums)
        .map(|(image, sum)| (format!("{}.{}", image.schema, image.name), sum.finish()))
        .collect();
    (images, table_sums, rows, uploaded)
}
