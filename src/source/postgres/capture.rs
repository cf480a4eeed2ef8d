//! Change capture: peek the slot, store committed transactions as a segment, then advance.
//!
//! Order matters for durability: the slot is advanced only after the segment manifest was
//! written at the write quorum, so a failed or interrupted capture is simply repeated (the
//! slot still holds everything). A crash between the write and the advance is repaired when
//! the source is opened again (the slot is advanced to the stored end).

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::Serialize;

use crate::stored::postgres::SegmentDetails;
use sqlx::Row;

use super::changes::{Record, CHANGES_FORMAT};
use super::image::{self, SchemaImage};
use super::pgoutput::{self, Lsn};
use super::routing::Tenant;
use super::sealing::Sealers;
use super::stream::{CaptureMethod, SlotStream, StartError};
use super::tools::Libpq;
use super::{from_micros, pg_error, schema, ChainState, Position, PostgresSource, MESSAGE_PREFIX};
use crate::changelog::SegmentManifest;
use crate::config::CaptureChoice;
use crate::error::{Error, ErrorKind, Result};
use crate::repo::{ChunkList, ChunkedWriter, Repository, DEFAULT_CHUNK};

/// What one capture did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CaptureStats {
    /// Segment keys written (one per bounded peek).
    pub segments: Vec<String>,
    /// Transactions with data changes (heartbeats not counted).
    pub transactions: u64,
    /// Inserted, updated, deleted rows and truncates.
    pub changes: u64,
    pub bytes: u64,
    pub uploaded: u64,
    /// The newest restorable instant now: the last stored commit's timestamp.
    pub newest: Option<DateTime<Utc>>,
    /// The slot's confirmed position now.
    pub lsn: Option<Lsn>,
    /// Row changes of tenant tables whose tenant could not be found: kept under the repository
    /// key (with `tenant_keys`), so `tenant forget` would not erase them.
    pub tenant_unresolved: u64,
    /// The commit time of this pass's heartbeat, once every transaction before it is stored:
    /// the window reaches it while the daemon holds the lease (published in the lease note,
    /// `SourceCatalog::confirm`), although an idle pass stores no segment.
    pub confirmed: Option<DateTime<Utc>>,
    /// A schema image this pass tried to take (the catalog changed): `Ok` when it is stored
    /// with the pass's first segment, `Err` with why it failed (rows are captured all the same;
    /// the daemon reports it as a failing `schema-image` job, which fails `/healthz`).
    #[serde(skip)]
    pub schema_image: Option<std::result::Result<(), String>>,
}

/// `auto` tries a replication connection again this long after the server refused one.
const RETRY_STREAMING: std::time::Duration = std::time::Duration::from_secs(600);

/// An idle source stores a heartbeat segment this often (so `status` tells a quiet source from a
/// stalled one); passes in between that found nothing but heartbeats store nothing.
const HEARTBEAT_SEGMENT_US: i64 = 30_000_000;

/// Where a batch's pgoutput messages come from.
enum Feed<'a> {
    /// One bounded `pg_logical_slot_peek_binary_changes` (polling); ends by itself.
    Peek(futures::stream::BoxStream<'a, std::result::Result<sqlx::postgres::PgRow, sqlx::Error>>),
    /// The replication connection (streaming); the batch decides where it ends.
    Stream(super::stream::Reader<'a>),
}

impl Feed<'_> {
    async fn next(&mut self) -> Result<Option<bytes::Bytes>> {
        match self {
            Feed::Peek(rows) => Ok(rows
                .try_next()
                .await
                .map_err(|e| pg_error("reading the replication slot", e))?
                .map(|row| bytes::Bytes::from(row.get::<Vec<u8>, _>(0)))),
            Feed::Stream(reader) => reader.next().await.map(Some),
        }
    }

    fn is_stream(&self) -> bool {
        matches!(self, Feed::Stream(_))
    }
}

/// One bounded peek, decoded and stored.
struct Batch {
    list: ChunkList,
    records: u64,
    transactions: u64,
    changes: u64,
    /// Row changes whose tenant was not found (see [`CaptureStats::tenant_unresolved`]).
    unresolved: u64,
    end_lsn: Lsn,
    commit_us: i64,
    /// Nothing but heartbeats and empty transactions, and the last stored segment is recent:
    /// not stored (no chunk was written), the slot not advanced.
    idle: bool,
}

impl PostgresSource {
    /// Capture every transaction committed since the last capture (after emitting a heartbeat,
    /// so even an idle database's window reaches now).
    ///
    /// First, after a failed step, the connection is checked and replaced if it is gone; then
    /// the chain's slot, publication and server identity are checked. A loss of continuity
    /// ends the chain (the error names the source and the reason; the next snapshot starts a
    /// new chain).
    pub async fn capture(&mut self, repo: &Repository) -> Result<CaptureStats> {
        let result = self.capture_checked(repo).await;
        self.note_outcome(&result);
        result
    }

    async fn capture_checked(&mut self, repo: &Repository) -> Result<CaptureStats> {
        let Some(state) = self.state.clone() else {
            return Err(
                Error::other(format!("source {}: no chain to capture into", self.name))
                    .with_hint("take a snapshot first (`timevault backup`)"),
            );
        };
        self.reconnect_if_needed().await?;
        if let Some(loss) = self.check_chain(&state).await? {
            self.stop_stream().await;
            return Err(self.lose_continuity(&loss));
        }
        // A slot dropped between that check and START_REPLICATION would be created anew by
        // the start (pg_walstream 0.9): check again once our connection holds the slot.
        if self.ensure_stream(state.position.lsn).await? {
            if let Some(loss) = self.check_chain(&state).await? {
                self.stop_stream().await;
                return Err(self.lose_continuity(&loss));
            }
        }
        self.capture_changes(repo).await
    }

    async fn capture_changes(&mut self, repo: &Repository) -> Result<CaptureStats> {
        // A schema image first when the catalog changed: it goes into this pass's first
        // segment (and counts only once that is stored: a failed pass takes it again).
        let recorded = self
            .state
            .as_ref()
            .and_then(|s| s.position.schema_fingerprint.clone());
        let (mut image, attempt) = match self.image_if_changed(repo, recorded.as_deref()).await {
            Ok(image) => {
                let taken = image.as_ref().map(|_| Ok(()));
                (image, taken)
            }
            // Rows keep being captured (the slot must not retain WAL because pg_dump fails);
            // the image is tried again on the next pass.
            Err(e) if e.kind() != ErrorKind::Unavailable => {
                tracing::error!(source = %self.name, error = %e, hint = ?e.hint(), "schema image failed: restores use the previous image until one succeeds");
                let why = match e.hint() {
                    Some(hint) => format!("{e} ({hint})"),
                    None => e.to_string(),
                };
                (None, Some(Err(why)))
            }
            Err(e) => return Err(e),
        };
        let heartbeat: String =
            sqlx::query_scalar("SELECT pg_logical_emit_message(true, $1, 'heartbeat')::text")
                .bind(MESSAGE_PREFIX)
                .fetch_one(&mut self.conn)
                .await
                .map_err(|e| pg_error("emitting a heartbeat", e))?;
        // A position that does not parse is an error, never LSN 0 (which would end the pass
        // before the heartbeat and confirm an instant not yet captured).
        let heartbeat = Lsn::parse(&heartbeat).ok_or_else(|| {
            Error::other(format!(
                "source {}: the server returned {heartbeat:?} as the heartbeat's position",
                self.name
            ))
        })?;
        let mut stats = CaptureStats {
            schema_image: attempt,
            ..CaptureStats::default()
        };
        loop {
            // An idle batch is skipped only for a caller that publishes confirmations (the
            // daemon), and only when nothing else must be stored with it: no schema image, no
            // previous chain to close (a rotation's overlap).
            let may_skip = self.confirm_idle && image.is_none() && self.previous.is_none();
            let Some(batch) = self.peek_batch(repo, heartbeat, may_skip).await? else {
                break;
            };
            if batch.idle {
                stats.confirmed = Some(from_micros(batch.commit_us));
                break;
            }
            let key = self.store_batch(repo, &batch, image.take()).await?;
            stats.segments.push(key);
            stats.transactions += batch.transactions;
            stats.changes += batch.changes;
            stats.tenant_unresolved += batch.unresolved;
            stats.bytes += batch.list.bytes;
            stats.uploaded += batch.list.uploaded;
            if batch.end_lsn > heartbeat {
                stats.confirmed = Some(from_micros(batch.commit_us));
                break;
            }
        }
        if let Some(state) = &self.state {
            stats.newest = state.position.commit_us.map(from_micros);
            stats.lsn = Some(state.position.lsn);
        }
        Ok(stats)
    }

    /// Peek up to `batch_changes` changes (whole transactions) and store their records as
    /// chunks; `None` when the slot has no committed transaction to give. With `may_skip`, a
    /// batch that reaches past `heartbeat` with nothing but heartbeats in it, within
    /// [`HEARTBEAT_SEGMENT_US`] of the last stored segment, is returned `idle` and unstored.
    async fn peek_batch(
        &mut self,
        repo: &Repository,
        heartbeat: Lsn,
        may_skip: bool,
    ) -> Result<Option<Batch>> {
        self.tracker.begin_batch();
        // Tenants' rows sealed under their own keys, beside the decoding: the segment's chunks
        // then hold mostly compressed ciphertext.
        let mut sealers = (repo.tenant_keys_enabled() && self.rules.is_some())
            .then(|| Sealers::new(repo.compression_level()));
        let mut writer = match sealers {
            Some(_) => ChunkedWriter::new(repo, DEFAULT_CHUNK).compressed_content(),
            None => ChunkedWriter::new(repo, DEFAULT_CHUNK),
        };
        let mut batch = Batch {
            list: ChunkList::default(),
            records: 0,
            transactions: 0,
            changes: 0,
            unresolved: 0,
            end_lsn: Lsn(0),
            commit_us: 0,
            idle: false,
        };
        let mut schema_records = 0u64;
        let mut committed = false;
        let mut in_txn_changes = 0u64;
        let mut feed = match &self.stream {
            Some(stream) => Feed::Stream(stream.reader().await?),
            None => Feed::Peek(
                sqlx::query(
                    "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, \
                     'proto_version', '1', 'publication_names', $3, 'messages', 'true')",
                )
                .bind(&self.slot)
                .bind(self.batch_changes as i32)
                .bind(&self.publication)
                .fetch(&mut self.conn),
            ),
        };
        let limit = u64::try_from(self.batch_changes).unwrap_or(u64::MAX);
        while let Some(data) = feed.next().await? {
            let message = pgoutput::decode(&data)
                .map_err(|e| Error::other(format!("slot {}", self.slot)).with_source(e))?;
            if let pgoutput::Message::Relation {
                schema,
                name,
                columns,
                ..
            } = &message
            {
                if let Some(change) = self.tracker.observe(schema, name, columns).await? {
                    batch.records += 1;
                    schema_records += 1;
                    // In order behind the records still being sealed: a table's new shape must
                    // not overtake its rows of the old one.
                    let record = Record::Schema(Box::new(change));
                    write_in_order(&mut writer, &mut sealers, repo, &record, Tenant::None).await?;
                }
            }
            let Some(record) = Record::from_message(message) else {
                continue;
            };
            match &record {
                Record::Begin { .. } => in_txn_changes = 0,
                Record::Insert { .. }
                | Record::Update { .. }
                | Record::Delete { .. }
                | Record::Truncate { .. } => in_txn_changes += 1,
                Record::Commit {
                    end_lsn, commit_us, ..
                } => {
                    committed = true;
                    batch.end_lsn = *end_lsn;
                    batch.commit_us = *commit_us;
                    if in_txn_changes > 0 {
                        batch.transactions += 1;
                        batch.changes += in_txn_changes;
                    }
                }
                Record::Relation(_)
                | Record::Message { .. }
                | Record::Schema(_)
                | Record::Sealed(_)
                | Record::SealedPart(_) => {}
            }
            batch.records += 1;
            let tenant = match sealers {
                Some(_) => {
                    if let Record::Relation(relation) = &record {
                        self.router.relation(relation, self.tracker.catalog());
                    }
                    self.router.tenant(&record).await?
                }
                None => Tenant::None,
            };
            if tenant == Tenant::Unresolved {
                batch.unresolved += 1;
            }
            write_in_order(&mut writer, &mut sealers, repo, &record, tenant).await?;
            // A stream has no end: the batch ends at the commit that reaches its size or
            // passes the heartbeat (a peek ends there by itself).
            if feed.is_stream()
                && matches!(record, Record::Commit { .. })
                && (batch.changes >= limit || batch.end_lsn > heartbeat)
            {
                break;
            }
        }
        drop(feed);
        if let Some(sealers) = &mut sealers {
            for block in sealers.finish(repo).await? {
                writer.write_record(&block).await?;
            }
        }
        if !committed {
            return Ok(None);
        }
        let last_stored_us = self
            .state
            .as_ref()
            .and_then(|s| s.position.commit_us)
            .unwrap_or(i64::MIN);
        batch.idle = may_skip
            && batch.changes == 0
            && schema_records == 0
            && batch.end_lsn > heartbeat
            && batch.commit_us.saturating_sub(last_stored_us) < HEARTBEAT_SEGMENT_US;
        if batch.idle {
            // Nothing uploaded yet (a heartbeat's records are far below a chunk).
            return Ok(Some(batch));
        }
        batch.list = writer.finish().await?;
        Ok(Some(batch))
    }

    /// Write the batch's segment manifest (into the previous chain too, right after a
    /// rotation), then advance the slot past it. Once written, the segment is the chain's
    /// position even if the advance fails: the next check finishes the advance.
    async fn store_batch(
        &mut self,
        repo: &Repository,
        batch: &Batch,
        image: Option<SchemaImage>,
    ) -> Result<String> {
        let state = self.state.clone().expect("capture checked the chain");
        let sequences = schema::sequence_values(&mut self.conn).await?;
        let end = Position {
            lsn: batch.end_lsn,
            commit_us: Some(batch.commit_us),
            sequences,
            schema_fingerprint: image
                .as_ref()
                .map(|i| i.fingerprint.clone())
                .or_else(|| state.position.schema_fingerprint.clone()),
        };
        let details = image.map(|image| SegmentDetails {
            schema_image: Some(image),
        });
        // Keys must sort in capture order even if the server clock stepped back.
        let last_us = state.position.commit_us.unwrap_or(i64::MIN);
        let captured_at = from_micros(batch.commit_us.max(last_us));
        let epoch = repo.lease_epoch(&self.name);
        let mut manifest = segment(&self.name, &state, batch, &end, captured_at, epoch);
        manifest.details = details.map(|d| serde_json::to_value(d).expect("details serialize"));
        manifest.write(repo).await?;
        if let Some(previous) = &self.previous {
            let mut also = segment(&self.name, previous, batch, &end, captured_at, epoch);
            also.details = manifest.details.clone();
            also.write(repo).await?;
        }
        self.previous = None;
        self.tracker.commit_batch();
        self.state = Some(ChainState {
            seq: manifest.seq,
            position: end,
            ..state
        });
        // Durable at the quorum: now the slot may forget these changes.
        self.advance_slot(batch.end_lsn).await?;
        Ok(manifest.key())
    }
}

impl PostgresSource {
    /// A new schema image when the catalog's fingerprint differs from the chain's newest
    /// image's (`None`: unchanged). One catalog query when nothing changed.
    async fn image_if_changed(
        &mut self,
        repo: &Repository,
        recorded: Option<&str>,
    ) -> Result<Option<SchemaImage>> {
        let now = image::fingerprint(&mut self.conn).await?;
        if recorded == Some(now.as_str()) {
            return Ok(None);
        }
        let tools = self.client_tools().await?;
        let libpq = Libpq::from_url(&self.url)?;
        let taken = image::take(&mut self.conn, repo, &tools, &libpq).await?;
        Ok(Some(taken))
    }
}

impl PostgresSource {
    /// Streaming: the replication connection, started at the chain's stored end when there
    /// is none. `true` when this call started it. Polling (chosen, or `auto` refused a
    /// replication connection): nothing to start.
    pub(super) async fn ensure_stream(&mut self, from: Lsn) -> Result<bool> {
        if self.stream.is_some() {
            return Ok(false);
        }
        let polls = match self.capture_choice {
            CaptureChoice::Polling => true,
            // A refusal may pass (all walsenders were taken): streaming is tried again now
            // and then.
            CaptureChoice::Auto => self
                .polling_since
                .is_some_and(|since| since.elapsed() < RETRY_STREAMING),
            CaptureChoice::Streaming => false,
        };
        if polls {
            self.method = Some(CaptureMethod::Polling);
            return Ok(false);
        }
        self.await_slot_released().await;
        let keepalive = self.keepalive_interval().await?;
        match SlotStream::start(&self.url, &self.slot, &self.publication, from, keepalive).await {
            Ok(stream) => {
                tracing::info!(source = %self.name, slot = %self.slot, from = %from, "capture streams over a replication connection");
                self.stream = Some(stream);
                self.method = Some(CaptureMethod::Streaming);
                self.polling_because = None;
                self.polling_since = None;
                Ok(true)
            }
            Err(StartError::NotAllowed(why)) if self.capture_choice == CaptureChoice::Auto => {
                tracing::warn!(source = %self.name, reason = %why, "the server refuses a replication connection: capture polls over SQL and tries streaming again in 10 minutes");
                self.polling_because = Some(why);
                self.polling_since = Some(std::time::Instant::now());
                self.method = Some(CaptureMethod::Polling);
                Ok(false)
            }
            Err(StartError::NotAllowed(why)) => Err(Error::other(format!(
                "source {}: capture_method = \"streaming\", but the server refuses a replication connection: {why}",
                self.name
            ))
            .with_hint("the server needs a free walsender (max_wal_senders) and the role REPLICATION or superuser, and no pooler may stand in between; or set capture_method = \"polling\"")),
            Err(StartError::Failed(e)) => Err(e),
        }
    }

    /// Close the replication connection (before a snapshot, which needs the slot idle; at
    /// shutdown, with a last status update).
    pub(super) async fn stop_stream(&mut self) {
        if let Some(stream) = self.stream.take() {
            stream.stop().await;
            self.stream_closed = true;
        }
        self.await_slot_released().await;
    }

    /// Drop the replication connection without a word (after a failed step: the next pass
    /// starts again at the stored end).
    pub(super) fn abandon_stream(&mut self) {
        if self.stream.take().is_some() {
            self.stream_closed = true;
            tracing::debug!(source = %self.name, "replication connection dropped after a failed step");
        }
    }

    /// After our replication connection closed: wait until its server process let go of the
    /// slot (best effort; a failure shows at the next use of the slot).
    async fn await_slot_released(&mut self) {
        if std::mem::take(&mut self.stream_closed) {
            if let Err(e) = super::stream::wait_released(&mut self.conn, &self.slot).await {
                tracing::debug!(source = %self.name, error = %e, "could not see the slot released");
            }
        }
    }

    /// Wait until the server shows `lsn` as the slot's confirmed position (a status update is
    /// read by the walsender a moment after it is sent), so a capture that returned has
    /// advanced the slot as the SQL path does.
    pub(super) async fn await_confirmation(&mut self, lsn: Lsn) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if self.slot_position().await?.is_some_and(|at| at >= lsn) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                tracing::warn!(source = %self.name, lsn = %lsn, "the server has not shown the confirmed position after 10 s; the next pass confirms it again");
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// A status update this often between passes: a third of the server's
    /// `wal_sender_timeout` (10 s when it is off).
    async fn keepalive_interval(&mut self) -> Result<std::time::Duration> {
        let ms: i64 = sqlx::query_scalar(
            "SELECT setting::int8 FROM pg_settings WHERE name = 'wal_sender_timeout'",
        )
        .fetch_one(&mut self.conn)
        .await
        .map_err(|e| pg_error("reading wal_sender_timeout", e))?;
        Ok(match ms {
            ms if ms <= 0 => std::time::Duration::from_secs(10),
            ms => std::time::Duration::from_millis((ms as u64 / 3).max(100)),
        })
    }
}

/// Write `record` (of `tenant`) to the batch's chunks in order: through the sealers when the
/// batch seals tenants' rows (a sealed job's lines are one block, kept in one chunk), as its
/// line otherwise.
async fn write_in_order(
    writer: &mut ChunkedWriter<'_>,
    sealers: &mut Option<Sealers>,
    repo: &Repository,
    record: &Record,
    tenant: Tenant,
) -> Result<()> {
    match sealers {
        Some(sealers) => {
            for block in sealers.add(repo, record, tenant).await? {
                writer.write_record(&block).await?;
            }
        }
        None => writer.write_record(&record.to_line()).await?,
    }
    Ok(())
}

fn segment(
    source: &str,
    state: &ChainState,
    batch: &Batch,
    end: &Position,
    captured_at: DateTime<Utc>,
    lease_epoch: Option<u64>,
) -> SegmentManifest {
    let mut manifest = SegmentManifest {
        source: source.to_string(),
        chain: state.chain.clone(),
        seq: state.seq + 1,
        captured_at,
        format: CHANGES_FORMAT.into(),
        records: batch.records,
        transactions: batch.transactions,
        bytes: 0,
        chunks: Vec::new(),
        start: serde_json::to_value(&state.position).expect("position serializes"),
        end: serde_json::to_value(end).expect("position serializes"),
        linked: true,
        details: None,
        lease_epoch,
    };
    manifest.set_payload(&batch.list);
    manifest
}
