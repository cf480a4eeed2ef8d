//! Rebuild a PostgreSQL database at an instant: the snapshot's schema and rows, then the
//! change log's transactions committed at or before the instant, in commit order.
//!
//! Steps: create (or, forced, recreate) the target database; create types, sequences and bare
//! tables; COPY the snapshot rows in; add the keys replay needs; replay (skipping the
//! transactions the snapshot already saw, by xid, never by LSN); set sequences; build the other
//! indexes and constraints. A database this restore created is dropped again on failure.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

use super::postgres_build;
use super::postgres_ddl::{finish_changed, plan_schema_change, record_schema_change, unchanged};
use super::postgres_load::{check_chunk_ids, digest_is_chunk_ids, load_parallel, load_workers};
use super::postgres_tenant::{load_rank, LineFilter, RowFilter, TenantOptions};
use super::{RestoreOptions, RestoreSummary};
use crate::catalog::{SegmentEntry, SnapshotManifest, SourceCatalog};
use crate::changelog::SegmentManifest;
use crate::config::mask_url;
use crate::error::{Error, ErrorKind, Result};
use crate::repo::Repository;
use crate::source::postgres::changes::{parse_lines, Record, RelationRecord, Tuple};
use crate::source::postgres::ddl::SchemaChange;
use crate::source::postgres::schema::{Schema, Table, USER_NAMESPACE};
use crate::source::postgres::{
    from_micros, quote_ident, Lsn, PgSnapshot, Position, PostgresSnapshotDetails, TableImage,
    CHANGES_FORMATS_READ,
};

/// Rows per batched INSERT or DELETE during replay.
const BATCH_ROWS: usize = 1000;

/// A PostgreSQL restore's summary plus the exact point in the source's history.
#[derive(Debug, Clone, Serialize)]
pub struct PostgresRestore {
    #[serde(flatten)]
    pub summary: RestoreSummary,
    /// End LSN of the last applied commit (or the snapshot's WAL position).
    pub lsn: String,
    /// Transaction id of the last applied transaction, if any was applied.
    pub xid: Option<u32>,
    /// Rows loaded from the snapshot.
    pub snapshot_rows: u64,
    /// Row changes replayed.
    pub changes: u64,
}

/// Restore a PostgreSQL source to `options.at` into the database `options.target` (a URL).
pub async fn restore_postgres(
    repo: &Repository,
    options: &RestoreOptions,
) -> Result<RestoreSummary> {
    restore_postgres_detailed(repo, options)
        .await
        .map(|r| r.summary)
}

/// [`restore_postgres`], also reporting the LSN and xid restored to.
pub async fn restore_postgres_detailed(
    repo: &Repository,
    options: &RestoreOptions,
) -> Result<PostgresRestore> {
    restore_postgres_with(repo, options, None).await
}

/// [`restore_postgres_detailed`], optionally of one tenant's rows only (`--tenant`).
pub async fn restore_postgres_with(
    repo: &Repository,
    options: &RestoreOptions,
    tenant: Option<&TenantOptions>,
) -> Result<PostgresRestore> {
    let started = Instant::now();
    // 1. Plan: the chain, and the segments that may hold commits up to the instant.
    let catalog = SourceCatalog::load(repo, &options.source).await?;
    let requested = catalog.resolve(options.at)?;
    let point = catalog.plan(requested)?;
    // Segments are stamped with their last commit: the first one stamped after the instant
    // may still hold commits before it, so it is read too and filtered by commit time.
    let n = (point.segments.len() + 1).min(point.chain.segments.len());
    let segments = &point.chain.segments[..n];
    let snapshot = SnapshotManifest::read(repo, &point.chain.snapshot.key).await?;
    if snapshot.kind != "postgres" {
        return Err(Error::input(format!(
            "source {} is a {} source, not postgres",
            options.source, snapshot.kind
        )));
    }
    let details: PostgresSnapshotDetails = serde_json::from_value(snapshot.details.clone())
        .map_err(|e| Error::corrupt(format!("snapshot {}: {e}", snapshot.key())))?;
    // 2. The target database: new, or empty, or (forced) recreated.
    let created = prepare_target(&options.target, options.force).await?;
    // 3. Build; a database created here is dropped again if anything fails.
    let built = build(
        repo,
        &snapshot,
        &details,
        segments,
        requested,
        &options.target,
        tenant,
    )
    .await;
    let outcome = match built {
        Ok(o) => o,
        Err(e) => {
            if created {
                let _ = drop_database(&options.target).await;
            }
            return Err(e.context(format!(
                "restore of {} to {}",
                options.source,
                mask_url(&options.target)
            )));
        }
    };
    let restored_to = outcome
        .last_commit_us
        .map(from_micros)
        .map_or(snapshot.taken_at, |t| t.max(snapshot.taken_at));
    tracing::info!(source = %options.source, %restored_to, lsn = %outcome.lsn, "postgres restore done");
    Ok(PostgresRestore {
        summary: RestoreSummary {
            source: options.source.clone(),
            target: mask_url(&options.target),
            requested,
            restored_to,
            chain: point.chain.id().to_string(),
            segments_applied: outcome.segments,
            transactions: outcome.transactions,
            bytes: snapshot.bytes + outcome.bytes,
            seconds: started.elapsed().as_secs_f64(),
        },
        lsn: outcome.lsn,
        xid: outcome.xid,
        snapshot_rows: outcome.snapshot_rows,
        changes: outcome.changes,
    })
}

pub(super) fn db_error(what: &str, e: sqlx::Error) -> Error {
    Error::other(format!("restore target: {what}: {e}"))
}

fn target_options(url: &str) -> Result<(PgConnectOptions, String)> {
    let options: PgConnectOptions = url.parse().map_err(|e| {
        Error::input(format!("restore target {}: {e}", mask_url(url)))
            .with_hint("give a postgres://user@host:port/database URL")
    })?;
    let name = options
        .get_database()
        .map(str::to_string)
        .filter(|d| !d.is_empty())
        .ok_or_else(|| {
            Error::input(format!(
                "restore target {} names no database",
                mask_url(url)
            ))
        })?;
    Ok((options, name))
}

pub(super) async fn connect_options(
    options: &PgConnectOptions,
    what: &str,
) -> Result<PgConnection> {
    options
        .clone()
        .application_name("timevault-restore")
        .disable_statement_logging()
        .connect()
        .await
        .map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!("cannot connect to the {what}: {e}"),
            )
        })
}

/// Create the database if missing; refuse one with tables unless forced (then recreate it).
/// Returns whether this restore created the database.
async fn prepare_target(url: &str, force: bool) -> Result<bool> {
    let (options, name) = target_options(url)?;
    let admin_options = options.clone().database("postgres");
    let mut admin = connect_options(&admin_options, "maintenance database postgres").await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .map_err(|e| db_error("looking for the database", e))?;
    let quoted = quote_ident(&name);
    if exists {
        let mut conn = connect_options(&options, "restore target").await?;
        let sql = format!(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND {USER_NAMESPACE}"
        );
        let tables: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut conn)
            .await
            .map_err(|e| db_error("counting tables", e))?;
        let _ = conn.close().await;
        if tables == 0 {
            return Ok(false);
        }
        if !force {
            return Err(Error::new(
                ErrorKind::TargetExists,
                format!("restore target database {name} already has {tables} tables"),
            )
            .with_hint("restore into a new database, or pass --force to drop and recreate it"));
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {quoted} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await
        .map_err(|e| db_error("dropping the database", e))?;
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
        .execute(&mut admin)
        .await
        .map_err(|e| db_error("creating the database", e))?;
    let _ = admin.close().await;
    Ok(true)
}

async fn drop_database(url: &str) -> Result<()> {
    let (options, name) = target_options(url)?;
    let mut admin = connect_options(
        &options.database("postgres"),
        "maintenance database postgres",
    )
    .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(&name)
    )))
    .execute(&mut admin)
    .await
    .map_err(|e| db_error("dropping the partial database", e))?;
    Ok(())
}

/// What [`build`] did.
struct Outcome {
    segments: usize,
    transactions: u64,
    changes: u64,
    bytes: u64,
    snapshot_rows: u64,
    last_commit_us: Option<i64>,
    lsn: String,
    xid: Option<u32>,
}

async fn execute_all(conn: &mut PgConnection, statements: &[String], what: &str) -> Result<()> {
    for sql in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error(&format!("{what}: {sql}"), e))?;
    }
    Ok(())
}

async fn build(
    repo: &Repository,
    snapshot: &SnapshotManifest,
    details: &PostgresSnapshotDetails,
    segments: &[SegmentEntry],
    at: DateTime<Utc>,
    url: &str,
    tenant: Option<&TenantOptions>,
) -> Result<Outcome> {
    let (options, _) = target_options(url)?;
    let mut conn = connect_options(&options, "restore target").await?;
    execute_all(
        &mut conn,
        &["SET synchronous_commit = off".to_string()],
        "session",
    )
    .await?;
    // 1. Types, sequences, bare tables.
    execute_all(&mut conn, &details.schema.pre_data(), "creating the schema").await?;
    // 2. Snapshot rows: on several connections for a full restore of a parallel snapshot.
    let snapshot_rows = if digest_is_chunk_ids(details) && tenant.is_none() {
        check_chunk_ids(details, &snapshot.sha256, &snapshot.key())?;
        load_parallel(repo, &options, details, load_workers()).await?
    } else if let Some(t) = tenant.filter(|t| t.grouped_alike(details)) {
        // Grouped by these rules: the tenant's chunks only.
        check_chunk_ids(details, &snapshot.sha256, &snapshot.key())?;
        let selected = PostgresSnapshotDetails {
            tables: t.select_chunks(details),
            ..details.clone()
        };
        let count =
            |d: &PostgresSnapshotDetails| d.tables.iter().map(|i| i.chunks.len()).sum::<usize>();
        tracing::info!(tenant = %t.tenant, chunks = count(&selected), of = count(details), "tenant restore reads the tenant's chunks");
        load_parallel(repo, &options, &selected, load_workers()).await?
    } else {
        if let Some(t) = tenant {
            tracing::info!(tenant = %t.tenant, "snapshot not grouped by these tenant rules: every chunk is read and filtered");
        }
        load_rows(repo, &mut conn, snapshot, details, tenant).await?
    };
    // 3. Keys for replay, several tables at once.
    let keys = postgres_build::by_size(&details.schema, details.schema.keys_per_table(), details);
    postgres_build::execute_groups(&options, keys, load_workers(), "adding keys").await?;
    // 4. Replay.
    let visibility = PgSnapshot::parse(&details.snapshot).ok_or_else(|| {
        Error::corrupt(format!(
            "snapshot {}: unreadable pg_current_snapshot {:?}",
            snapshot.key(),
            details.snapshot
        ))
    })?;
    let mut replay = Replay {
        conn: &mut conn,
        schema: details.schema.clone(),
        changed: BTreeSet::new(),
        tenant: tenant.cloned(),
        visibility,
        until_us: at.timestamp_micros(),
        relations: HashMap::new(),
        statements: HashMap::new(),
        pending: None,
        txn: None,
        last_commit: Lsn(0),
        outcome: Outcome {
            segments: 0,
            transactions: 0,
            changes: 0,
            bytes: 0,
            snapshot_rows,
            last_commit_us: None,
            lsn: details.wal_lsn.clone(),
            xid: None,
        },
        done: false,
    };
    let mut sequences = details.start.sequences.clone();
    for entry in segments {
        let segment = SegmentManifest::read(repo, &entry.key).await?;
        if !CHANGES_FORMATS_READ.contains(&segment.format.as_str()) {
            return Err(Error::corrupt(format!(
                "segment {}: format {} is not one of {CHANGES_FORMATS_READ:?}",
                entry.key, segment.format
            ))
            .with_hint("a newer timevault wrote it: restore with that version"));
        }
        replay.outcome.segments += 1;
        replay.outcome.bytes += segment.bytes;
        for chunk in &segment.chunks {
            let data = repo.read_chunk(&chunk.id).await?;
            let records =
                parse_lines(&data).map_err(|e| Error::corrupt(format!("{}: {e}", entry.key)))?;
            for record in records {
                replay.apply(record).await?;
                if replay.done {
                    break;
                }
            }
            if replay.done {
                break;
            }
        }
        // Sequence values read after this segment's changes are at least their values at
        // any instant the segment covers.
        let end: Position = serde_json::from_value(segment.end)
            .map_err(|e| Error::corrupt(format!("segment {}: {e}", entry.key)))?;
        sequences = end.sequences;
        if replay.done {
            break;
        }
    }
    if replay.txn.is_some() {
        return Err(Error::corrupt(
            "the change log ends inside a transaction (a segment must end after a commit)",
        ));
    }
    let (outcome, schema, changed) = (replay.outcome, replay.schema, replay.changed);
    // 5. Sequences, then indexes and constraints (best effort for tables changed in replay).
    set_sequences(&mut conn, &sequences).await?;
    let unchanged = unchanged(&schema, &changed);
    let steps = unchanged.post_data_steps();
    let groups = postgres_build::by_size(&unchanged, steps.per_table, details);
    let what = "adding indexes and constraints";
    postgres_build::execute_groups(&options, groups, load_workers(), what).await?;
    execute_all(&mut conn, &steps.after, what).await?;
    for sql in finish_changed(&schema, &changed) {
        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut conn)
            .await
        {
            tracing::warn!(%sql, error = %e, "a changed table's constraint does not fit the restored rows; left out");
        }
    }
    let _ = conn.close().await;
    Ok(outcome)
}

/// COPY every table's chunks in on one connection (a tenant's parents load before their
/// children); checks the image's SHA-256. Returns the rows loaded.
async fn load_rows(
    repo: &Repository,
    conn: &mut PgConnection,
    snapshot: &SnapshotManifest,
    details: &PostgresSnapshotDetails,
    tenant: Option<&TenantOptions>,
) -> Result<u64> {
    let by_chunk_ids = digest_is_chunk_ids(details);
    if by_chunk_ids {
        check_chunk_ids(details, &snapshot.sha256, &snapshot.key())?;
    }
    let mut hasher = Sha256::new();
    let mut rows = 0;
    // The image's SHA-256 covers the rows in the manifest's order; a filtered restore loads
    // linked tables after the tables they lead to, and checks the chunk ids instead.
    let mut images: Vec<&TableImage> = details.tables.iter().collect();
    if let Some(t) = tenant {
        images.sort_by_key(|image| load_rank(t, &details.schema, image));
    }
    let in_order = images
        .iter()
        .zip(&details.tables)
        .all(|(a, b)| std::ptr::eq(*a, b));
    let check_rows = !by_chunk_ids && in_order;
    for image in images {
        let columns: Vec<String> = image.columns.iter().map(|c| quote_ident(c)).collect();
        let sql = format!(
            "COPY {}.{} ({}) FROM STDIN",
            quote_ident(&image.schema),
            quote_ident(&image.name),
            columns.join(", ")
        );
        let what = format!("COPY into {}.{}", image.schema, image.name);
        let filter = match (tenant, details.schema.table(&image.schema, &image.name)) {
            (Some(t), Some(table)) => {
                LineFilter::for_table(conn, &details.schema, table, &image.columns, t).await?
            }
            _ => LineFilter::All,
        };
        let mut sink = conn
            .copy_in_raw(&sql)
            .await
            .map_err(|e| db_error(&what, e))?;
        for chunk in &image.chunks {
            let data = match repo.read_chunk(&chunk.id).await {
                Ok(d) => d,
                Err(e) => {
                    let _ = sink.abort("chunk unreadable").await;
                    return Err(e);
                }
            };
            if data.len() as u64 != chunk.len {
                let _ = sink.abort("chunk length").await;
                return Err(Error::corrupt(format!(
                    "chunk {}: {} bytes, the manifest says {}",
                    chunk.id,
                    data.len(),
                    chunk.len
                )));
            }
            if check_rows {
                hasher.update(&data);
            }
            let sent = match filter.apply(&data) {
                Some(kept) => sink.send(kept).await,
                None => sink.send(data).await,
            };
            sent.map_err(|e| db_error(&what, e))?;
        }
        rows += sink.finish().await.map_err(|e| db_error(&what, e))?;
    }
    if check_rows && hex::encode(hasher.finalize()) != snapshot.sha256 {
        return Err(Error::corrupt(format!(
            "snapshot {}: the rows read back do not match its SHA-256",
            snapshot.key()
        )));
    }
    Ok(rows)
}

async fn set_sequences(
    conn: &mut PgConnection,
    values: &[crate::source::postgres::SequenceValue],
) -> Result<()> {
    for v in values {
        let Some(last) = v.last_value else { continue };
        let name = format!("{}.{}", quote_ident(&v.schema), quote_ident(&v.name));
        sqlx::query("SELECT setval(to_regclass($1), $2, true) WHERE to_regclass($1) IS NOT NULL")
            .bind(&name)
            .bind(last)
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error(&format!("setting sequence {name}"), e))?;
    }
    Ok(())
}

/// The transaction being replayed.
struct Txn {
    xid: u32,
    commit_us: i64,
    /// Already in the snapshot (or already applied): read past it.
    skip: bool,
    changes: u64,
}

/// Rows waiting to be applied together.
enum Pending {
    Insert(u32, Vec<Vec<Option<String>>>),
    Delete(u32, Vec<Vec<Option<String>>>),
}

/// How a relation's rows are written: resolved once per relation id.
#[derive(Clone)]
struct Statements {
    table: String,
    columns: Vec<String>,
    types: Vec<String>,
    /// Indexes (into `columns`) that identify a row; `None`: the whole old row does.
    key: Option<Vec<usize>>,
    /// Whether the key has a unique index (ON CONFLICT target).
    upsert: bool,
    /// GENERATED ALWAYS identity columns (UPDATE may not assign them).
    always: Vec<bool>,
    /// `--tenant`: which rows of this relation belong to the tenant.
    filter: Option<RowFilter>,
}

struct Replay<'a> {
    conn: &'a mut PgConnection,
    /// The definitions as replayed so far (`S` records change them).
    schema: Schema,
    /// Tables an `S` record created or changed.
    changed: BTreeSet<(String, String)>,
    /// `--tenant`: only this tenant's rows.
    tenant: Option<TenantOptions>,
    visibility: PgSnapshot,
    until_us: i64,
    relations: HashMap<u32, RelationRecord>,
    statements: HashMap<u32, Statements>,
    pending: Option<Pending>,
    txn: Option<Txn>,
    last_commit: Lsn,
    outcome: Outcome,
    /// The first transaction after the instant was reached.
    done: bool,
}

impl Replay<'_> {
    async fn apply(&mut self, record: Record) -> Result<()> {
        match record {
            Record::Relation(r) => {
                self.statements.remove(&r.id);
                self.relations.insert(r.id, r);
            }
            Record::Begin {
                xid,
                final_lsn,
                commit_us,
            } => {
                let seen = self.visibility.sees(xid);
                let replayed = Lsn::parse(&final_lsn).is_some_and(|l| l <= self.last_commit);
                if !seen && commit_us > self.until_us {
                    self.done = true;
                    return Ok(());
                }
                let skip = seen || replayed;
                if !skip {
                    self.sql("BEGIN").await?;
                }
                self.txn = Some(Txn {
                    xid,
                    commit_us,
                    skip,
                    changes: 0,
                });
            }
            Record::Commit {
                commit_lsn,
                end_lsn,
                commit_us,
            } => {
                let Some(txn) = self.txn.take() else {
                    return Err(Error::corrupt("a commit without its begin"));
                };
                if !txn.skip {
                    self.flush().await?;
                    self.sql("COMMIT").await?;
                    if txn.changes > 0 {
                        self.outcome.transactions += 1;
                        self.outcome.changes += txn.changes;
                    }
                    self.outcome.last_commit_us = Some(commit_us.max(txn.commit_us));
                    self.outcome.lsn = end_lsn;
                    self.outcome.xid = Some(txn.xid);
                }
                if let Some(l) = Lsn::parse(&commit_lsn) {
                    self.last_commit = self.last_commit.max(l);
                }
            }
            Record::Message { .. } => {}
            Record::Schema(change) => {
                if self.txn.as_ref().is_some_and(|t| !t.skip) {
                    self.schema_change(*change).await?;
                }
            }
            change => {
                let Some(txn) = self.txn.as_mut() else {
                    return Err(Error::corrupt("a change outside a transaction"));
                };
                if txn.skip {
                    return Ok(());
                }
                txn.changes += 1;
                self.change(change).await?;
            }
        }
        Ok(())
    }

    /// Create or alter a table as an `S` record says, inside the replayed transaction.
    async fn schema_change(&mut self, change: SchemaChange) -> Result<()> {
        self.flush().await?;
        let plan = plan_schema_change(&self.schema, &change);
        execute_all(self.conn, &plan.statements, "replaying a schema change").await?;
        for sql in &plan.best_effort {
            self.sql("SAVEPOINT timevault_ddl").await?;
            match sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                .execute(&mut *self.conn)
                .await
            {
                Ok(_) => self.sql("RELEASE SAVEPOINT timevault_ddl").await?,
                Err(e) => {
                    tracing::warn!(%sql, error = %e, "left out during replay");
                    self.sql("ROLLBACK TO SAVEPOINT timevault_ddl").await?;
                }
            }
        }
        let t = &change.table;
        self.changed.insert((t.schema.clone(), t.name.clone()));
        record_schema_change(&mut self.schema, change);
        self.statements.clear();
        Ok(())
    }

    async fn sql(&mut self, sql: &'static str) -> Result<()> {
        sqlx::query(sql)
            .execute(&mut *self.conn)
            .await
            .map_err(|e| db_error(sql, e))?;
        Ok(())
    }

    fn statements(&mut self, rel: u32) -> Result<Statements> {
        if let Some(s) = self.statements.get(&rel) {
            return Ok(s.clone());
        }
        let relation = self
            .relations
            .get(&rel)
            .ok_or_else(|| Error::corrupt(format!("a change to unknown relation {rel}")))?;
        let table = self
            .schema
            .table(&relation.schema, &relation.name)
            .ok_or_else(|| new_table_error(relation))?;
        let mut s = resolve(table, relation)?;
        if let Some(t) = &self.tenant {
            s.filter = RowFilter::new(t.key(&self.schema, table), &relation.columns);
        }
        self.statements.insert(rel, s.clone());
        Ok(s)
    }

    async fn change(&mut self, record: Record) -> Result<()> {
        match record {
            Record::Insert { rel, new } => {
                if !matches!(&self.pending, Some(Pending::Insert(r, rows)) if *r == rel && rows.len() < BATCH_ROWS)
                {
                    self.flush().await?;
                    self.pending = Some(Pending::Insert(rel, Vec::new()));
                }
                if let Some(Pending::Insert(_, rows)) = &mut self.pending {
                    rows.push(new.values);
                }
            }
            Record::Delete { rel, old, .. } => {
                let s = self.statements(rel)?;
                if s.key.is_none() {
                    self.flush().await?;
                    return self.delete_row(&s, &old.values).await;
                }
                if !matches!(&self.pending, Some(Pending::Delete(r, rows)) if *r == rel && rows.len() < BATCH_ROWS)
                {
                    self.flush().await?;
                    self.pending = Some(Pending::Delete(rel, Vec::new()));
                }
                if let Some(Pending::Delete(_, rows)) = &mut self.pending {
                    rows.push(old.values);
                }
            }
            Record::Update { rel, old, new } => {
                self.flush().await?;
                let s = self.statements(rel)?;
                self.update_row(&s, old.as_ref(), &new).await?;
            }
            Record::Truncate { rels, .. } => {
                self.flush().await?;
                let mut names = Vec::new();
                for rel in rels {
                    names.push(self.statements(rel)?.table);
                }
                if !names.is_empty() {
                    let sql = format!("TRUNCATE {}", names.join(", "));
                    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                        .execute(&mut *self.conn)
                        .await
                        .map_err(|e| db_error("replaying a truncate", e))?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        match self.pending.take() {
            None => Ok(()),
            Some(Pending::Insert(rel, rows)) => {
                let s = self.statements(rel)?;
                self.insert_rows(&s, rows).await
            }
            Some(Pending::Delete(rel, rows)) => {
                let s = self.statements(rel)?;
                self.delete_rows(&s, rows).await
            }
        }
    }

    /// `INSERT ... SELECT FROM unnest(text arrays)`, as an upsert when the key is unique.
    async fn insert_rows(&mut self, s: &Statements, rows: Vec<Vec<Option<String>>>) -> Result<()> {
        let n = s.columns.len();
        let names: Vec<String> = s.columns.iter().map(|c| quote_ident(c)).collect();
        let args: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
        let casts: Vec<String> = (0..n).map(|i| format!("u.c{i}::{}", s.types[i])).collect();
        let aliases: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
        let mut sql = format!(
            "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM unnest({}) AS u({})",
            s.table,
            names.join(", "),
            casts.join(", "),
            args.join(", "),
            aliases.join(", ")
        );
        if let Some(f) = &s.filter {
            let cast = &s.types[f.index];
            sql.push_str(&format!(
                " WHERE {}",
                f.insert_condition(cast, &format!("${}", n + 1))
            ));
        }
        if let (true, Some(key)) = (s.upsert, &s.key) {
            let target: Vec<&str> = key.iter().map(|&i| names[i].as_str()).collect();
            let set: Vec<String> = (0..n)
                .filter(|i| !key.contains(i))
                .map(|i| format!("{0} = EXCLUDED.{0}", names[i]))
                .collect();
            if set.is_empty() {
                sql.push_str(&format!(" ON CONFLICT ({}) DO NOTHING", target.join(", ")));
            } else {
                sql.push_str(&format!(
                    " ON CONFLICT ({}) DO UPDATE SET {}",
                    target.join(", "),
                    set.join(", ")
                ));
            }
        }
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for i in 0..n {
            let column: Vec<Option<String>> =
                rows.iter().map(|r| r.get(i).cloned().flatten()).collect();
            query = query.bind(column);
        }
        if s.filter.is_some() {
            let tenant = self.tenant.as_ref().map(|t| t.tenant.clone());
            query = query.bind(tenant);
        }
        query
            .execute(&mut *self.conn)
            .await
            .map_err(|e| db_error(&format!("replaying inserts into {}", s.table), e))?;
        Ok(())
    }

    /// Batched deletes by key.
    async fn delete_rows(&mut self, s: &Statements, rows: Vec<Vec<Option<String>>>) -> Result<()> {
        let key = s.key.as_ref().expect("batched deletes have a key");
        let names: Vec<String> = key.iter().map(|&i| quote_ident(&s.columns[i])).collect();
        let args: Vec<String> = (1..=key.len()).map(|i| format!("${i}::text[]")).collect();
        let casts: Vec<String> = key
            .iter()
            .enumerate()
            .map(|(j, &i)| format!("u.k{j}::{}", s.types[i]))
            .collect();
        let aliases: Vec<String> = (0..key.len()).map(|j| format!("k{j}")).collect();
        let sql = format!(
            "DELETE FROM {} WHERE ({}) IN (SELECT {} FROM unnest({}) AS u({}))",
            s.table,
            names.join(", "),
            casts.join(", "),
            args.join(", "),
            aliases.join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for &i in key {
            let column: Vec<Option<String>> =
                rows.iter().map(|r| r.get(i).cloned().flatten()).collect();
            query = query.bind(column);
        }
        query
            .execute(&mut *self.conn)
            .await
            .map_err(|e| db_error(&format!("replaying deletes from {}", s.table), e))?;
        Ok(())
    }

    /// `WHERE` matching one row: by key, or (no key) the first row equal to the old row.
    fn row_match(s: &Statements, first_param: usize) -> (String, Vec<usize>) {
        match &s.key {
            Some(key) => {
                let terms: Vec<String> = key
                    .iter()
                    .enumerate()
                    .map(|(j, &i)| {
                        format!(
                            "{} = ${}::{}",
                            quote_ident(&s.columns[i]),
                            first_param + j,
                            s.types[i]
                        )
                    })
                    .collect();
                (terms.join(" AND "), key.clone())
            }
            None => {
                let all: Vec<usize> = (0..s.columns.len()).collect();
                let terms: Vec<String> = all
                    .iter()
                    .map(|&i| {
                        format!(
                            "{} IS NOT DISTINCT FROM ${}::{}",
                            quote_ident(&s.columns[i]),
                            first_param + i,
                            s.types[i]
                        )
                    })
                    .collect();
                (
                    format!(
                        "ctid = (SELECT ctid FROM {} WHERE {} LIMIT 1)",
                        s.table,
                        terms.join(" AND ")
                    ),
                    all,
                )
            }
        }
    }

    async fn delete_row(&mut self, s: &Statements, old: &[Option<String>]) -> Result<()> {
        let (filter, params) = Self::row_match(s, 1);
        let sql = format!("DELETE FROM {} WHERE {filter}", s.table);
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for i in params {
            query = query.bind(old.get(i).cloned().flatten());
        }
        query
            .execute(&mut *self.conn)
            .await
            .map_err(|e| db_error(&format!("replaying a delete from {}", s.table), e))?;
        Ok(())
    }

    /// Update one row; unchanged TOAST values are left as they are. A row that is missing (the
    /// safety net for idempotent replay) is inserted when the update carries every value.
    async fn update_row(&mut self, s: &Statements, old: Option<&Tuple>, new: &Tuple) -> Result<()> {
        // Columns to assign: not unchanged TOAST values, and not the key or an ALWAYS identity
        // column when the update did not change it.
        let same = |i: usize| match old {
            None => s.key.as_ref().is_some_and(|k| k.contains(&i)),
            Some(o) => o.values.get(i) == new.values.get(i),
        };
        let changed: Vec<usize> = (0..s.columns.len())
            .filter(|&i| !new.unchanged.contains(&i))
            .filter(|&i| !(same(i) && (s.always[i] || old.is_none())))
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        // `--tenant`: a row that moved to another tenant is gone from this one.
        if let (Some(f), Some(t)) = (&s.filter, &self.tenant) {
            if !new.unchanged.contains(&f.index) && f.leaves_tenant(&new.values, &t.tenant) {
                let identity = old.unwrap_or(new).values.clone();
                return self.delete_row(s, &identity).await;
            }
        }
        let set: Vec<String> = changed
            .iter()
            .enumerate()
            .map(|(j, &i)| {
                format!(
                    "{} = ${}::{}",
                    quote_ident(&s.columns[i]),
                    j + 1,
                    s.types[i]
                )
            })
            .collect();
        let (filter, params) = Self::row_match(s, changed.len() + 1);
        let sql = format!("UPDATE {} SET {} WHERE {filter}", s.table, set.join(", "));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for &i in &changed {
            query = query.bind(new.values.get(i).cloned().flatten());
        }
        let identity = old.unwrap_or(new);
        for i in params {
            query = query.bind(identity.values.get(i).cloned().flatten());
        }
        let result = query
            .execute(&mut *self.conn)
            .await
            .map_err(|e| db_error(&format!("replaying an update of {}", s.table), e))?;
        if result.rows_affected() == 0 && new.unchanged.is_empty() && s.key.is_some() {
            self.insert_rows(s, vec![new.values.clone()]).await?;
        }
        Ok(())
    }
}

fn new_table_error(relation: &RelationRecord) -> Error {
    Error::new(
        ErrorKind::Other,
        format!(
            "table {}.{} changed after the snapshot was taken and the change log has no definition for it",
            relation.schema, relation.name
        ),
    )
    .with_hint("segments written before timevault recorded schema changes (postgres-changes/1) cannot replay it; restore to an instant after the next snapshot")
}

/// Map a relation of the change stream onto the snapshot's table.
fn resolve(table: &Table, relation: &RelationRecord) -> Result<Statements> {
    let mut types = Vec::with_capacity(relation.columns.len());
    let mut always = Vec::with_capacity(relation.columns.len());
    for name in &relation.columns {
        let column = table
            .column(name)
            .ok_or_else(|| new_table_error(relation))?;
        types.push(column.type_sql.clone());
        always.push(column.identity.as_deref() == Some("a"));
    }
    let index_of = |names: &[String]| -> Option<Vec<usize>> {
        names
            .iter()
            .map(|n| relation.columns.iter().position(|c| c == n))
            .collect()
    };
    let table_key = table.key_columns().and_then(|k| index_of(&k));
    let full = relation.key.len() == relation.columns.len();
    let key = match (&table_key, full) {
        (Some(k), true) => Some(k.clone()),
        (Some(k), false) if *k == relation.key => Some(k.clone()),
        _ if !relation.key.is_empty() && !full => Some(relation.key.clone()),
        _ => table_key.clone(),
    };
    Ok(Statements {
        table: table.qualified(),
        columns: relation.columns.clone(),
        types,
        upsert: table_key.is_some() && key == table_key,
        key,
        always,
        filter: None,
    })
}
