//! Rebuild a PostgreSQL database at an instant: the schema as of the instant, the snapshot's
//! rows, then the change log's transactions committed at or before the instant, in commit
//! order.
//!
//! Steps: choose the schema image (the newest taken at or before the instant: the
//! snapshot's, or one the change log recorded); create the target database (or, forced over
//! one with tables, a new database `<name>_timevault_<8 hex>` beside it); the image's
//! pre-data (pg_restore); COPY the snapshot rows in; add the keys replay needs; replay
//! (skipping the transactions the snapshot already saw, by xid, never by LSN); set
//! sequences; the image's post-data (pg_restore -j); refresh materialized views.
//! A database this restore created is dropped again on failure, so a failed forced restore
//! leaves the old target untouched; only after the build succeeded is the old target dropped
//! and the new database renamed to its name.

use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection;

mod batch;
mod binary;
mod build;
mod ddl;
mod load;
mod replay;
mod schema;
mod schema_sql;
pub(crate) mod sealed;
pub mod tenant;

use crate::catalog::{SegmentEntry, SnapshotManifest, SourceCatalog};
use crate::changelog::{Links, SegmentManifest};
use crate::config::mask_url;
use crate::error::{Error, ErrorKind, Result};
use crate::pg_connection::quote_ident;
use crate::repo::{Forgotten, ReadPurpose, Repository};
use crate::restore::{RestoreOptions, RestoreSummary};
use crate::source::postgres::tools::{self, Libpq};
use crate::source::postgres::PgTools;
use crate::stored::postgres::changes::{parse_lines, CHANGES_FORMATS_READ};
use crate::stored::postgres::schema::{Schema, USER_NAMESPACE};
use crate::stored::postgres::{
    from_micros, PgSnapshot, Position, PostgresSnapshotDetails, SchemaImage, SequenceValue,
    TableImage,
};
use ddl::{finish_changed, identity_always};
use load::{check_chunk_ids, digest_is_chunk_ids, load_parallel, load_workers, Loaded};
use replay::Replay;
use schema::{drop_temporary, shape_load, Applier, Chosen, Section};
use schema_sql::EarlyKey;
use sealed::SealedRecords;
use tenant::{load_rank, LineFilter, TenantOptions};

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
    /// Of those, the rows sent as COPY binary (the rest went as text: tables with a type the
    /// client does not convert, runs whose binary form was refused).
    pub binary_rows: u64,
    /// Row changes replayed.
    pub changes: u64,
    /// Forgotten tenants' snapshot chunks and sealed row changes left out (`tenant forget`).
    #[serde(skip_serializing_if = "is_zero")]
    pub forgotten_chunks: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub forgotten_changes: u64,
    /// How long each step took, in order (where a restore's time goes).
    pub phases: Vec<Phase>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One step of a restore and its wall-clock time.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub seconds: f64,
}

/// Times consecutive steps: each [`Phases::end`] closes the step running since the last one.
struct Phases {
    since: Instant,
    done: Vec<Phase>,
}

impl Phases {
    fn start() -> Self {
        Self {
            since: Instant::now(),
            done: Vec::new(),
        }
    }

    fn end(&mut self, name: &'static str) {
        let seconds = self.since.elapsed().as_secs_f64();
        tracing::info!(phase = name, seconds, "postgres restore step done");
        self.done.push(Phase { name, seconds });
        self.since = Instant::now();
    }
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
    repo.reading(
        &[&options.source],
        ReadPurpose::Restore,
        restore_postgres_with_held(repo, options, tenant),
    )
    .await?
}

/// [`restore_postgres_with`] under the read claim it takes.
async fn restore_postgres_with_held(
    repo: &Repository,
    options: &RestoreOptions,
    tenant: Option<&TenantOptions>,
) -> Result<PostgresRestore> {
    let started = Instant::now();
    // 1. Plan: the chain, and the segments that may hold commits up to the instant.
    let catalog = SourceCatalog::load_for(repo, &options.source, options.at).await?;
    let requested = catalog.resolve(options.at)?;
    let point = catalog.plan(requested)?;
    // Segments are stamped with their last commit: the first one stamped after the instant
    // may still hold commits before it, so it is read too and filtered by commit time.
    // Only the very next segment, though: past a hole (a segment lost everywhere, which
    // the plan allows only when the instant lies before it) the next one listed is not it.
    let planned = point.segments.len();
    let last_seq = point.segments.last().map_or(0, |s| s.seq);
    let follows = point
        .chain
        .segments
        .get(planned)
        .is_some_and(|next| next.seq <= last_seq + 1);
    let segments = &point.chain.segments[..planned + usize::from(follows)];
    let snapshot = SnapshotManifest::read(repo, &point.chain.snapshot.key).await?;
    if snapshot.kind != crate::config::SourceKind::Postgres {
        return Err(Error::input(format!(
            "source {} is a {} source, not postgres",
            options.source, snapshot.kind
        )));
    }
    let details: PostgresSnapshotDetails = snapshot.details()?;
    // A forgotten tenant's data cannot come back; every other tenant's restores exactly.
    let forgotten = repo.forgotten().await?;
    if let Some(f) = tenant.and_then(|t| forgotten.tenant(&t.tenant)) {
        return Err(f.refusal());
    }
    // A tenant's rows by the strict rules: every table mapped or declared global.
    if let Some(t) = tenant {
        t.check_schema(&details.schema, &options.source)?;
    }
    // The segments' manifests (their links checked): they name the schema images too.
    let segments = read_segments(repo, &snapshot, &details, segments).await?;
    let chosen = schema::choose_image(&details, &segments, requested.timestamp_micros())
        .map_err(|e| e.context(format!("snapshot {}", snapshot.key())))?;
    // 2. The database to build in: the target (new or empty), or one beside it (forced).
    let tools = client_tools(&options.target, &chosen.image).await?;
    let target = prepare_target(&options.target, options.force).await?;
    // 3. Build; a database created here is dropped again if anything fails.
    let into = BuildInto {
        options: target.build.clone(),
        jobs: options.jobs.unwrap_or_else(load_workers),
        schema: Applier {
            tools,
            libpq: Libpq::from_url(&options.target)?.database(&target.build_name),
            jobs: options.jobs.unwrap_or_else(load_workers),
        },
        chosen: &chosen,
        forgotten: &forgotten,
    };
    let built = build(
        repo, &snapshot, &details, &segments, requested, &into, tenant,
    )
    .await;
    let context = format!(
        "restore of {} to {}",
        options.source,
        mask_url(&options.target)
    );
    let outcome = match built {
        Ok(o) => o,
        Err(e) => {
            target.abandon().await;
            return Err(e.context(context));
        }
    };
    // 4. Forced over an existing database: only now drop it and rename the new one.
    target.finish().await.map_err(|e| e.context(context))?;
    let restored_to = outcome
        .last_commit_us
        .map(from_micros)
        .map_or(snapshot.taken_at, |t| t.max(snapshot.taken_at));
    tracing::info!(source = %options.source, %restored_to, lsn = %outcome.lsn, rows = outcome.snapshot_rows, binary_rows = outcome.binary_rows, "postgres restore done");
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
        binary_rows: outcome.binary_rows,
        changes: outcome.changes,
        forgotten_chunks: outcome.forgotten_chunks,
        forgotten_changes: outcome.forgotten_changes,
        phases: outcome.phases,
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
    crate::pg_connection::connect_with(options.clone(), "timevault-restore", &format!("the {what}"))
        .await
}

/// What a restore does with its target database, decided from what is there (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetStep {
    /// Missing: create it and build in it; dropped again on failure.
    Create,
    /// There and without tables: build in it as it is.
    InPlace,
    /// There with tables, forced: build in a new database beside it; on success drop the old
    /// one and rename the new one; on failure drop the new one.
    Beside,
}

/// `tables`: the existing target's table count, `None` when it does not exist.
fn target_step(name: &str, tables: Option<i64>, force: bool) -> Result<TargetStep> {
    match tables {
        None => Ok(TargetStep::Create),
        Some(0) => Ok(TargetStep::InPlace),
        Some(_) if force => Ok(TargetStep::Beside),
        Some(n) => Err(Error::new(
            ErrorKind::TargetExists,
            format!("restore target database {name} already has {n} tables"),
        )
        .with_hint(
            "restore into a new database, or pass --force to replace it (the old database is \
             dropped only once the new one is complete)",
        )),
    }
}

/// PostgreSQL truncates longer identifiers (NAMEDATALEN - 1 bytes).
const MAX_NAME: usize = 63;

/// `<name>_timevault_<suffix>`, `name` cut (on a character boundary) to fit 63 bytes.
fn beside_name(name: &str, suffix: &str) -> String {
    let tail = format!("_timevault_{suffix}");
    let mut keep = MAX_NAME.saturating_sub(tail.len()).min(name.len());
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{tail}", &name[..keep])
}

/// The database a restore builds in, and what becomes of the target at the end.
struct TargetDatabase {
    /// The maintenance database `postgres` on the target's server.
    admin: PgConnectOptions,
    name: String,
    step: TargetStep,
    /// `Beside`: the old target's oid, so a database recreated meanwhile is never dropped.
    old_oid: Option<i64>,
    /// Where the build runs: the target, or the database beside it.
    build: PgConnectOptions,
    build_name: String,
}

/// Decide how to restore into `url` and create the database the build runs in.
async fn prepare_target(url: &str, force: bool) -> Result<TargetDatabase> {
    let (options, name) = target_options(url)?;
    let admin = options.clone().database("postgres");
    let mut conn = connect_options(&admin, "maintenance database postgres").await?;
    let old_oid = database_oid(&mut conn, &name).await?;
    let tables = match old_oid {
        Some(_) => Some(count_tables(&options).await?),
        None => None,
    };
    let step = target_step(&name, tables, force)?;
    let build_name = match step {
        TargetStep::Beside => beside_name(&name, &format!("{:08x}", rand::random::<u32>())),
        _ => name.clone(),
    };
    if step != TargetStep::InPlace {
        execute_all(
            &mut conn,
            &[format!("CREATE DATABASE {}", quote_ident(&build_name))],
            "creating the database",
        )
        .await?;
    }
    let _ = conn.close().await;
    Ok(TargetDatabase {
        build: options.database(&build_name),
        admin,
        name,
        step,
        old_oid,
        build_name,
    })
}

async fn database_oid(admin: &mut PgConnection, name: &str) -> Result<Option<i64>> {
    sqlx::query_scalar("SELECT oid::int8 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(admin)
        .await
        .map_err(|e| db_error("looking for the database", e))
}

async fn count_tables(options: &PgConnectOptions) -> Result<i64> {
    let mut conn = connect_options(options, "restore target").await?;
    let sql = format!(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p') AND {USER_NAMESPACE}"
    );
    let tables = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(&mut conn)
        .await
        .map_err(|e| db_error("counting tables", e));
    let _ = conn.close().await;
    tables
}

impl TargetDatabase {
    /// After a failed build: drop the database this restore created (never the old target).
    async fn abandon(&self) {
        if self.step == TargetStep::InPlace {
            return;
        }
        if let Err(e) = self.drop_build().await {
            tracing::warn!(database = %self.build_name, error = %e, "could not drop the partial database; drop it by hand");
        }
    }

    async fn drop_build(&self) -> Result<()> {
        let mut admin = connect_options(&self.admin, "maintenance database postgres").await?;
        let dropped = crate::pg_connection::drop_database(&mut admin, &self.build_name).await;
        let _ = admin.close().await;
        dropped
    }

    /// After a successful build beside the target: drop the old target (still the database
    /// found at the start), then rename the new one to its name.
    async fn finish(&self) -> Result<()> {
        if self.step != TargetStep::Beside {
            return Ok(());
        }
        let mut admin = connect_options(&self.admin, "maintenance database postgres").await?;
        let replaced = self.replace(&mut admin).await;
        let _ = admin.close().await;
        replaced
    }

    async fn replace(&self, admin: &mut PgConnection) -> Result<()> {
        let (old, new) = (quote_ident(&self.name), quote_ident(&self.build_name));
        let dropped = async {
            if database_oid(admin, &self.name).await? != self.old_oid {
                return Err(Error::other(format!(
                    "database {} was dropped or recreated while restoring; left as it is",
                    self.name
                )));
            }
            crate::pg_connection::drop_database(admin, &self.name).await
        }
        .await;
        if let Err(e) = dropped {
            self.abandon().await;
            return Err(e);
        }
        let renamed = rename_database(admin, &self.build_name, &new, &old).await;
        renamed.map_err(|e| {
            e.with_hint(format!(
                "the old database is gone and the restored one is complete under the name {}: \
                 run ALTER DATABASE {new} RENAME TO {old}",
                self.build_name
            ))
        })
    }
}

/// `ALTER DATABASE from RENAME TO to` (both quoted), ending the sessions still closing on
/// `from_name` first (the build's connections); retried while one lingers.
async fn rename_database(
    admin: &mut PgConnection,
    from_name: &str,
    from: &str,
    to: &str,
) -> Result<()> {
    let mut attempt = 0;
    loop {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(from_name)
        .execute(&mut *admin)
        .await
        .map_err(|e| db_error("ending sessions on the restored database", e))?;
        let sql = format!("ALTER DATABASE {from} RENAME TO {to}");
        match execute_all(admin, &[sql], "renaming the restored database").await {
            Err(_) if attempt < 20 => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// What [`build`] did.
pub(super) struct Outcome {
    pub segments: usize,
    pub transactions: u64,
    pub changes: u64,
    pub bytes: u64,
    pub snapshot_rows: u64,
    pub binary_rows: u64,
    pub last_commit_us: Option<i64>,
    pub lsn: String,
    pub xid: Option<u32>,
    pub forgotten_chunks: u64,
    pub forgotten_changes: u64,
    pub phases: Vec<Phase>,
}

pub(super) async fn execute_all(
    conn: &mut PgConnection,
    statements: &[String],
    what: &str,
) -> Result<()> {
    for sql in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error(&format!("{what}: {sql}"), e))?;
    }
    Ok(())
}

/// The database a build writes into, the connections it may use at once, and the schema
/// image it applies.
struct BuildInto<'a> {
    options: PgConnectOptions,
    jobs: usize,
    schema: Applier,
    /// The schema image applied, its table model and visibility.
    chosen: &'a Chosen,
    /// Tenants whose data is left out: their keys were destroyed (`tenant forget`).
    forgotten: &'a Forgotten,
}

/// `pg_dump`/`pg_restore` able to restore `image` into the target's server.
async fn client_tools(target: &str, image: &SchemaImage) -> Result<PgTools> {
    let (options, _) = target_options(target)?;
    let admin = options.database("postgres");
    let conn = connect_options(&admin, "maintenance database postgres").await?;
    let server = tools::connected_major(&conn)?;
    let _ = conn.close().await;
    let dumped = image
        .pg_dump_version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        .ok_or_else(|| {
            Error::corrupt(format!(
                "the schema image names pg_dump version {:?}, which does not parse",
                image.pg_dump_version
            ))
        })?;
    PgTools::find(server.max(dumped)).await
}

/// Read the manifests of `entries`, checking that each starts where the one before ended and
/// that this version reads its format.
async fn read_segments(
    repo: &Repository,
    snapshot: &SnapshotManifest,
    details: &PostgresSnapshotDetails,
    entries: &[SegmentEntry],
) -> Result<Vec<(String, SegmentManifest)>> {
    let resume = serde_json::to_value(&details.start).expect("position serializes");
    let mut links = Links::new(&snapshot.key(), resume);
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let segment = SegmentManifest::read(repo, &entry.key).await?;
        links.check(&entry.key, &segment)?;
        if !CHANGES_FORMATS_READ.contains(&segment.format.as_str()) {
            return Err(Error::corrupt(format!(
                "segment {}: format {} is not one of {CHANGES_FORMATS_READ:?}",
                entry.key, segment.format
            ))
            .with_hint("a newer timevault wrote it: restore with that version"));
        }
        out.push((entry.key.clone(), segment));
    }
    Ok(out)
}

async fn build(
    repo: &Repository,
    snapshot: &SnapshotManifest,
    details: &PostgresSnapshotDetails,
    segments: &[(String, SegmentManifest)],
    at: DateTime<Utc>,
    into: &BuildInto<'_>,
    tenant: Option<&TenantOptions>,
) -> Result<Outcome> {
    let options = into.options.clone();
    let mut phases = Phases::start();
    // 1. The image's pre-data: schemas, extensions, types, functions, tables, views.
    let file = schema::fetch(repo, &into.chosen.image, &into.schema.tools).await?;
    into.schema
        .apply(&file, Section::PreData, (&[], &details.publication), true)
        .await?;
    let shape = shape_load(details, &into.chosen.model);
    let mut conn = connect_options(&options, "restore target").await?;
    prepare_load(&mut conn, &shape.before, &into.chosen.model).await?;
    phases.end("schema");
    // 2. Snapshot rows: on several connections for a full restore of a parallel snapshot.
    // Each table's keys (replay needs them) are built as soon as its rows are in.
    let early: Vec<EarlyKey> = into
        .chosen
        .model
        .early_keys()
        .into_iter()
        .flatten()
        .collect();
    let keys = build::per_table(
        &into.chosen.model,
        into.chosen.model.keys_per_table(),
        details,
    );
    let loaded = load(
        repo,
        &mut conn,
        snapshot,
        details,
        &shape.details,
        into,
        keys,
        tenant,
    )
    .await?;
    phases.end("rows and keys");
    // 3. Replay.
    let visibility = PgSnapshot::parse(&details.snapshot).ok_or_else(|| {
        Error::corrupt(format!(
            "snapshot {}: unreadable pg_current_snapshot {:?}",
            snapshot.key(),
            details.snapshot
        ))
    })?;
    let outcome = Outcome {
        segments: 0,
        transactions: 0,
        changes: 0,
        bytes: 0,
        snapshot_rows: loaded.rows,
        binary_rows: loaded.binary_rows,
        last_commit_us: None,
        lsn: details.wal_lsn.clone(),
        xid: None,
        forgotten_chunks: loaded.forgotten_chunks,
        forgotten_changes: 0,
        phases: Vec::new(),
    };
    let until_us = at.timestamp_micros();
    let mut replay = Replay::new(
        &mut conn,
        shape.model.clone(),
        tenant.cloned(),
        visibility,
        until_us,
        outcome,
    )
    .with_image(into.chosen.visibility.clone(), shape.temporary.clone());
    let only = match tenant {
        Some(t) => Some(repo.tenant_key_ids(&t.tenant).await?.into_iter().collect()),
        None => None,
    };
    let mut sealed = SealedRecords::new(into.forgotten, only);
    let sequences = replay_segments(
        repo,
        &mut replay,
        &mut sealed,
        segments,
        &details.start.sequences,
    )
    .await?;
    let replayed = replay.finish().await?;
    let mut outcome = replayed.outcome;
    outcome.forgotten_changes = sealed.skipped;
    if outcome.forgotten_chunks + sealed.skipped > 0 {
        tracing::info!(
            chunks = outcome.forgotten_chunks,
            changes = sealed.skipped,
            "left out the data of forgotten tenants"
        );
    }
    phases.end("replay");
    // 4. Sequences; the rows' shape back to the image's (and the changed tables' NOT NULL).
    set_sequences(&mut conn, &sequences).await?;
    execute_all(&mut conn, &drop_temporary(&replayed.temporary), "finishing").await?;
    let not_null: Vec<String> = shape
        .after
        .iter()
        .chain(&finish_changed(&replayed.schema, &replayed.changed))
        .cloned()
        .collect();
    restore_not_null(&mut conn, &not_null).await;
    // 5. The image's post-data: indexes, constraints, foreign keys, triggers, rules, policies
    // (on `jobs` connections). Exact unless the change log changed a table after the image.
    let strict = replayed.changed.is_empty();
    let report = into
        .schema
        .apply(
            &file,
            Section::PostData,
            (&early, &details.publication),
            strict,
        )
        .await?;
    if let Some(errors) = report {
        tracing::warn!(%errors, "tables changed after the schema image: some of its indexes and constraints do not fit them");
    }
    phases.end("indexes and constraints");
    // 6. Materialized views refreshed; identity columns and autovacuum as the source had them.
    let refresh: Vec<String> = file
        .refresh_order(&into.chosen.image.populated)
        .into_iter()
        .map(|v| format!("REFRESH MATERIALIZED VIEW {v}"))
        .collect();
    finish_load(&mut conn, &refresh, &replayed.schema).await?;
    let _ = conn.close().await;
    outcome.phases = phases.done;
    Ok(outcome)
}

/// The load session: commits need not wait for the WAL flush, the rows' shape fits the image's
/// tables (`before`), autovacuum is off and identity columns accept the stored values.
async fn prepare_load(conn: &mut PgConnection, before: &[String], model: &Schema) -> Result<()> {
    execute_all(
        conn,
        &["SET synchronous_commit = off".to_string()],
        "session",
    )
    .await?;
    execute_all(conn, before, "fitting the rows to the schema").await?;
    execute_all(conn, &autovacuum(model, false), "preparing the load").await?;
    let identity = identity_always(&model.tables, false);
    execute_all(conn, &identity, "preparing the load").await
}

/// Materialized views refreshed; identity columns and autovacuum as the source had them.
async fn finish_load(conn: &mut PgConnection, refresh: &[String], schema: &Schema) -> Result<()> {
    execute_all(conn, refresh, "refreshing materialized views").await?;
    execute_all(conn, &identity_always(&schema.tables, true), "finishing").await?;
    execute_all(conn, &autovacuum(schema, true), "finishing").await
}

/// Replay `segments` in order until the restore's instant; returns the sequence values to set
/// (those read after the last segment applied: at least their values at any instant it
/// covers), `start` when none was.
async fn replay_segments(
    repo: &Repository,
    replay: &mut Replay<'_>,
    sealed: &mut SealedRecords<'_>,
    segments: &[(String, SegmentManifest)],
    start: &[SequenceValue],
) -> Result<Vec<SequenceValue>> {
    let mut sequences = start.to_vec();
    for (key, segment) in segments {
        replay.outcome.segments += 1;
        replay.outcome.bytes += segment.bytes;
        for chunk in &segment.chunks {
            let data = repo.read_chunk(&chunk.id).await?;
            let records = parse_lines(&data).map_err(|e| Error::corrupt(format!("{key}: {e}")))?;
            'records: for record in records {
                for record in sealed.open(repo, record, key).await? {
                    replay.apply(record).await?;
                    if replay.done {
                        break 'records;
                    }
                }
            }
            if replay.done {
                break;
            }
            sealed.end_chunk(key)?;
        }
        let end: Position = segment.end_position()?;
        sequences = end.sequences;
        if replay.done {
            break;
        }
    }
    if replay.inside_transaction() {
        return Err(Error::corrupt(
            "the change log ends inside a transaction (a segment must end after a commit)",
        ));
    }
    Ok(sequences)
}

/// NOT NULL back on the restored tables; one the rows do not fit is left out with a warning.
async fn restore_not_null(conn: &mut PgConnection, statements: &[String]) {
    for sql in statements {
        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut *conn)
            .await
        {
            tracing::warn!(%sql, error = %e, "NOT NULL does not fit the restored rows; left out");
        }
    }
}

/// Load the snapshot's rows (`shaped`: the tables the image has) and build each table's key.
#[allow(clippy::too_many_arguments)]
async fn load(
    repo: &Repository,
    conn: &mut PgConnection,
    snapshot: &SnapshotManifest,
    details: &PostgresSnapshotDetails,
    shaped: &PostgresSnapshotDetails,
    into: &BuildInto<'_>,
    keys: Vec<(load::TableName, u64, Vec<String>)>,
    tenant: Option<&TenantOptions>,
) -> Result<Loaded> {
    let (options, jobs) = (&into.options, into.jobs);
    // Forgotten tenants' chunks are left out (their keys are gone); the digest was checked
    // over every chunk first.
    let gone = |t: &str| into.forgotten.tenant(t).is_some();
    let mut forgotten_chunks = 0u64;
    let kept = PostgresSnapshotDetails {
        tables: shaped
            .tables
            .iter()
            .map(|image| {
                let (image, left_out) = image.without_tenants(&gone);
                forgotten_chunks += left_out as u64;
                image
            })
            .collect(),
        ..shaped.clone()
    };
    if digest_is_chunk_ids(details) && tenant.is_none() {
        check_chunk_ids(details, &snapshot.sha256, &snapshot.key())?;
        let loaded = load_parallel(repo, options, &kept, jobs, keys).await?;
        return Ok(Loaded {
            forgotten_chunks,
            ..loaded
        });
    }
    if let Some(t) = tenant.filter(|t| t.grouped_alike(details)) {
        // Grouped by these rules: the tenant's chunks only.
        check_chunk_ids(details, &snapshot.sha256, &snapshot.key())?;
        let selected = PostgresSnapshotDetails {
            tables: t.select_chunks(&kept),
            ..shaped.clone()
        };
        let count =
            |d: &PostgresSnapshotDetails| d.tables.iter().map(|i| i.chunks.len()).sum::<usize>();
        tracing::info!(tenant = %t.tenant, chunks = count(&selected), of = count(details), "tenant restore reads the tenant's chunks");
        return load_parallel(repo, options, &selected, jobs, keys).await;
    }
    if let Some(t) = tenant {
        tracing::info!(tenant = %t.tenant, "snapshot not grouped by these tenant rules: every chunk is read and filtered");
    }
    let rows = load_rows(repo, conn, snapshot, shaped, tenant, &gone).await?;
    let keys = build::largest_first(keys);
    build::execute_groups(options, keys, jobs, "adding keys").await?;
    Ok(Loaded {
        rows,
        binary_rows: 0,
        forgotten_chunks,
    })
}

/// Autovacuum off (`on: false`) for the snapshot's tables while they load and replay, or back
/// to the server's defaults. A load commits run by run, and a table with a few runs committed
/// qualifies for an autovacuum (by inserts) that then scans it beside the load on the same
/// cores until the key build cancels it: with it on, the benchmark's rows and keys took 13.8 s
/// instead of 9.0-9.4 s. Turning it back on sets each of the two settings as the source table
/// had it, or resets it (its other storage parameters were given at CREATE TABLE).
fn autovacuum(schema: &Schema, on: bool) -> Vec<String> {
    let mut out = Vec::new();
    for t in &schema.tables {
        if !on {
            out.push(format!(
                "ALTER TABLE {} SET (autovacuum_enabled = false, toast.autovacuum_enabled = false)",
                t.qualified()
            ));
            continue;
        }
        // The source's own setting where it had one, else the server's default.
        let (own, toast) = t.autovacuum_parameters();
        for (name, own) in [
            ("autovacuum_enabled", own),
            ("toast.autovacuum_enabled", toast),
        ] {
            out.push(match own {
                Some(set) => format!("ALTER TABLE IF EXISTS {} SET ({set})", t.qualified()),
                None => format!("ALTER TABLE IF EXISTS {} RESET ({name})", t.qualified()),
            });
        }
    }
    out
}

/// COPY every table's chunks in on one connection (a tenant's parents load before their
/// children); checks the image's SHA-256. Returns the rows loaded.
async fn load_rows(
    repo: &Repository,
    conn: &mut PgConnection,
    snapshot: &SnapshotManifest,
    details: &PostgresSnapshotDetails,
    tenant: Option<&TenantOptions>,
    gone: &(dyn Fn(&str) -> bool + Sync),
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
        let (kept, _) = image.without_tenants(gone);
        for chunk in &kept.chunks {
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

async fn set_sequences(conn: &mut PgConnection, values: &[SequenceValue]) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forced_restore_over_tables_builds_beside_the_target() {
        assert_eq!(target_step("t", None, false).unwrap(), TargetStep::Create);
        assert_eq!(
            target_step("t", Some(0), false).unwrap(),
            TargetStep::InPlace
        );
        assert_eq!(target_step("t", Some(3), true).unwrap(), TargetStep::Beside);
        let err = target_step("t", Some(3), false).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TargetExists);
        assert!(err.message().contains("already has 3 tables"), "{err}");
    }

    #[test]
    fn names_beside_the_target_fit_postgres_identifiers() {
        assert_eq!(beside_name("app", "0badf00d"), "app_timevault_0badf00d");
        let long = "é".repeat(40);
        let name = beside_name(&long, "0badf00d");
        assert!(name.len() <= MAX_NAME, "{name}");
        assert!(name.ends_with("_timevault_0badf00d"), "{name}");
        assert!(name.starts_with("éé"), "{name}");
    }
}
