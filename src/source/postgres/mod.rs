//! PostgreSQL source: logical snapshots and pgoutput change capture, through SQL alone.
//!
//! Works on managed servers (no filesystem access, no replication connection):
//! * a publication `timevault_<source>` FOR ALL TABLES and a pgoutput slot of the same name
//!   (or the names the source's `slot` / `publication` options give, see [`names`]), created
//!   once, after [`preflight`] found nothing that would break the application;
//! * a **snapshot** is a REPEATABLE READ READ ONLY transaction that records
//!   `pg_current_snapshot()`, reads the schema from the catalog and streams every table with
//!   `COPY (SELECT ...) TO STDOUT` into chunks;
//! * **capture** peeks the slot (`pg_logical_slot_peek_binary_changes`, bounded), decodes
//!   pgoutput into committed transactions, stores them as a change-log segment, and only then
//!   advances the slot (`pg_replication_slot_advance`), so a failed write loses nothing;
//! * the handoff between the two is by transaction id, never by LSN: replay skips the
//!   transactions visible in the recorded snapshot (xid < xmin, or < xmax and not in xip).
//!
//! Instants are commit timestamps (docs/ARCHITECTURE.md, "PostgreSQL capture").

mod capture;
pub mod changes;
pub mod continuity;
pub mod ddl;
pub mod grouping;
pub mod health;
pub mod image;
pub mod names;
pub mod parallel;
pub mod pgoutput;
pub mod preflight;
pub mod routing;
pub mod schema;
pub mod scratch;
mod sealing;
pub mod snapshot;
pub mod stream;
pub mod tools;

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use crate::catalog::{SnapshotManifest, SourceCatalog};
use crate::changelog::SegmentManifest;
use crate::config::CaptureChoice;
use crate::error::{Error, Result, ResultExt};
pub use crate::pg_connection::{connect, connect_with, quote_ident};
use crate::repo::Repository;
pub use crate::stored::postgres::{
    Lsn, PgSnapshot, Position, PostgresSnapshotDetails, SegmentDetails, TableImage,
};
pub use capture::CaptureStats;
pub use changes::{CHANGES_FORMAT, CHANGES_FORMATS_READ};
pub use continuity::{Loss, ServerIdentity};
pub use image::SchemaImage;
pub use names::SlotNames;
pub use parallel::ParallelOptions;
pub use preflight::{preflight, PreflightReport, TableFix};
pub use schema::{Schema, SequenceValue};
pub use snapshot::SnapshotStats;
pub use stream::{CaptureMethod, CaptureReport};
pub use tools::PgTools;

/// The prefix of timevault's logical messages (heartbeats).
pub const MESSAGE_PREFIX: &str = "timevault";

/// Capture progress within the current chain.
#[derive(Debug, Clone)]
struct ChainState {
    chain: String,
    seq: u64,
    position: Position,
    /// The server and database the chain's snapshot was taken from.
    identity: ServerIdentity,
}

/// A PostgreSQL database being backed up.
pub struct PostgresSource {
    name: String,
    conn: PgConnection,
    /// For the snapshot's worker connections.
    url: String,
    /// How snapshots copy tables (source options `snapshot_workers`, `snapshot_split_pages`).
    parallel: ParallelOptions,
    /// How rows belong to tenants: snapshot chunks are grouped by it (`None`: not grouped).
    rules: Option<grouping::TenantRules>,
    slot: String,
    publication: String,
    state: Option<ChainState>,
    /// The chain a rotation just ended: the first capture after the new snapshot is recorded
    /// in it too, so the two chains overlap and the window has no gap.
    previous: Option<ChainState>,
    /// Why the last chain cannot be continued, until a snapshot starts a new one.
    continuity_lost: Option<String>,
    /// A loss not yet handed out by [`PostgresSource::take_loss`].
    new_loss: Option<String>,
    /// A step failed: check the connection (and reconnect) before the next one.
    suspect: bool,
    /// Changes per bounded peek.
    batch_changes: i64,
    /// Which tables' definitions the current chain has recorded (`S` records).
    tracker: Box<ddl::SchemaTracker>,
    /// Whose each row change is, for sealing it under the tenant's key (`tenant_keys`).
    router: Box<routing::TenantRouter>,
    /// `pg_dump` and `pg_restore`, once found.
    tools: Option<PgTools>,
    /// Store nothing for a pass that found nothing but heartbeats (the daemon sets it: its lease
    /// note confirms the window up to the pass instead, `CaptureStats::confirmed`). Off for a
    /// library caller, whose every capture stores its heartbeat, so the window reaches it.
    confirm_idle: bool,
    /// How capture reads the slot (source option `capture_method`).
    capture_choice: CaptureChoice,
    /// The replication connection while capture streams (opened by a pass, closed before a
    /// snapshot and on any error).
    stream: Option<stream::SlotStream>,
    /// How the last pass read the slot.
    method: Option<CaptureMethod>,
    /// Why `auto` polls: the server refused a replication connection.
    polling_because: Option<String>,
    /// When `auto` last found a replication connection refused.
    polling_since: Option<std::time::Instant>,
    /// Our replication connection closed and its server process may still hold the slot.
    stream_closed: bool,
}

/// The slot and publication name for a source: `timevault_<source>`, lowercase, with every
/// character a slot name cannot hold replaced by `_` (at most 63 bytes).
pub fn slot_name(source: &str) -> String {
    let mut name: String = format!("timevault_{source}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(63);
    name
}

/// A database error, with what was being done; the sqlx error is kept as the source.
pub(crate) fn pg_error(what: &str, e: sqlx::Error) -> Error {
    Error::other(format!("postgres: {what}")).with_source(e)
}

pub use crate::stored::postgres::from_micros;

impl PostgresSource {
    /// Connect and find where capture resumes (the newest chain, if its slot still proves
    /// that nothing was missed).
    pub async fn open(name: &str, url: &str, repo: &Repository) -> Result<PostgresSource> {
        Self::open_named(name, url, SlotNames::default_for(name), repo).await
    }

    /// [`PostgresSource::open`] with the slot and publication `names` (from the source's
    /// `slot` and `publication` options: [`SlotNames::from_options`]).
    pub async fn open_named(
        name: &str,
        url: &str,
        names: SlotNames,
        repo: &Repository,
    ) -> Result<PostgresSource> {
        let conn = connect(url).await?;
        let mut source = PostgresSource {
            name: name.to_string(),
            conn,
            url: url.to_string(),
            parallel: ParallelOptions::default(),
            rules: None,
            publication: names.publication,
            slot: names.slot,
            state: None,
            previous: None,
            continuity_lost: None,
            new_loss: None,
            suspect: false,
            batch_changes: 20_000,
            tracker: Box::new(ddl::SchemaTracker::new(url)),
            router: Box::new(routing::TenantRouter::new(url)),
            tools: None,
            confirm_idle: false,
            capture_choice: CaptureChoice::Auto,
            stream: None,
            method: None,
            polling_because: None,
            polling_since: None,
            stream_closed: false,
        };
        source.set_tenant_rules(Some(grouping::TenantRules::default()));
        source.resume(repo).await?;
        Ok(source)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The replication slot (and publication) name.
    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// True when capture can continue the current chain; otherwise a snapshot is needed.
    pub fn has_chain(&self) -> bool {
        self.state.is_some()
    }

    /// Why the last chain cannot be continued while no new chain exists yet.
    pub fn continuity_lost(&self) -> Option<&str> {
        self.continuity_lost.as_deref()
    }

    /// Open a configured source: slot and publication names and snapshot settings come from
    /// its options. `config` must be a postgres source.
    pub async fn open_configured(
        config: &crate::config::SourceConfig,
        tenancy: Option<&crate::tenancy::TenancyConfig>,
        repo: &Repository,
    ) -> Result<PostgresSource> {
        let options = config.postgres_options().ok_or_else(|| {
            Error::input(format!("source {} is not a postgres source", config.name))
        })?;
        let names = SlotNames::for_source(&config.name, options);
        let mut source = Self::open_named(&config.name, &config.url, names, repo).await?;
        source.set_parallel(ParallelOptions::from_options(options));
        source.set_capture_method(options.capture_method());
        let grouped = options.group_by_tenant();
        source.set_tenant_rules(grouped.then(|| grouping::TenantRules::from_config(tenancy)));
        Ok(source)
    }

    /// Set how snapshots group rows by tenant (the config's tenancy map, or inference);
    /// `None` copies tables ungrouped.
    pub fn set_tenant_rules(&mut self, rules: Option<grouping::TenantRules>) {
        self.router.set_rules(rules.as_ref());
        self.rules = rules;
    }

    /// Set how snapshots copy tables in parallel.
    pub fn set_parallel(&mut self, parallel: ParallelOptions) {
        self.parallel = parallel;
    }

    /// How capture reads the slot: streaming, polling, or streaming when allowed.
    pub fn set_capture_method(&mut self, choice: CaptureChoice) {
        self.capture_choice = choice;
    }

    /// How the last capture pass read the slot (`None` before the first), and why it polls
    /// when `auto` fell back.
    pub fn capture_method(&self) -> Option<CaptureReport> {
        self.method.map(|method| CaptureReport {
            method,
            polling_because: self.polling_because.clone(),
        })
    }

    /// Bound each peek of the slot to about this many changes (whole transactions).
    pub fn set_batch_changes(&mut self, n: i64) {
        self.batch_changes = n.max(1);
    }

    /// The slot's confirmed position, or `None` when the slot does not exist.
    pub async fn slot_position(&mut self) -> Result<Option<Lsn>> {
        let row = sqlx::query(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.slot)
        .fetch_optional(&mut self.conn)
        .await
        .map_err(|e| pg_error("reading the slot", e))?;
        Ok(row
            .and_then(|r| r.get::<Option<String>, _>(0))
            .and_then(|t| Lsn::parse(&t)))
    }

    async fn resume(&mut self, repo: &Repository) -> Result<()> {
        let catalog = SourceCatalog::load(repo, &self.name).await?;
        let Some(chain) = catalog.latest_chain() else {
            return Ok(());
        };
        let snapshot = SnapshotManifest::read(repo, &chain.snapshot.key).await?;
        let details: PostgresSnapshotDetails = snapshot.details()?;
        let identity = ServerIdentity::recorded(&snapshot.details).context(snapshot.key())?;
        let (seq, position) = match chain.segments.last() {
            Some(last) => {
                let seg = SegmentManifest::read(repo, &last.key).await?;
                let end: Position = seg.end_position()?;
                (seg.seq, end)
            }
            None => (0, details.start),
        };
        let state = ChainState {
            chain: chain.id().to_string(),
            seq,
            position,
            identity,
        };
        // Killed between a rotation's snapshot and its first capture: that capture must still
        // end the previous chain too, or a sliver between the chains stays unrestorable.
        let previous = match (&snapshot.continues, chain.segments.is_empty()) {
            (Some(ended), true) => self.ended_chain(repo, &catalog, ended, identity).await?,
            _ => None,
        };
        match self.check_chain(&state).await? {
            None => {
                self.tracker.reset(&details.schema, previous.is_some());
                self.router.reset(&details.schema);
                self.previous = previous;
                self.state = Some(state);
            }
            Some(loss) => {
                // Reported by the next snapshot's reason and by `take_loss`.
                let _ = self.lose_continuity(&loss);
            }
        }
        Ok(())
    }

    /// The state of the chain `id` as its last segment left it (for a rotation whose first
    /// capture has not ended it yet); `None` when it is gone (pruned).
    async fn ended_chain(
        &self,
        repo: &Repository,
        catalog: &SourceCatalog,
        id: &str,
        identity: ServerIdentity,
    ) -> Result<Option<ChainState>> {
        let Some(ended) = catalog.chains.iter().find(|c| c.id() == id) else {
            return Ok(None);
        };
        let (seq, position) = match ended.segments.last() {
            Some(last) => {
                let seg = SegmentManifest::read(repo, &last.key).await?;
                let end: Position = seg.end_position()?;
                (seg.seq, end)
            }
            None => {
                let snapshot = SnapshotManifest::read(repo, &ended.snapshot.key).await?;
                let details: PostgresSnapshotDetails = snapshot.details()?;
                (0, details.start)
            }
        };
        Ok(Some(ChainState {
            chain: id.to_string(),
            seq,
            position,
            identity,
        }))
    }

    async fn advance_slot(&mut self, to: Lsn) -> Result<()> {
        if let Some(stream) = &self.stream {
            // The slot is held by our replication connection: a status update confirms.
            if stream.confirm(to).await? {
                self.await_confirmation(to).await?;
            }
            return Ok(());
        }
        sqlx::query("SELECT end_lsn::text FROM pg_replication_slot_advance($1, $2::text::pg_lsn)")
            .bind(&self.slot)
            .bind(to.to_string())
            .fetch_one(&mut self.conn)
            .await
            .map_err(|e| pg_error("advancing the slot", e))?;
        Ok(())
    }

    /// Capture what is pending and close the connection (clean shutdown).
    pub async fn close(mut self, repo: &Repository) -> Result<()> {
        if self.state.is_some() {
            // The last pass stores its heartbeat: the window reaches the shutdown.
            self.confirm_idle = false;
            self.capture(repo).await?;
        }
        self.stop_stream().await;
        let _ = self.conn.close().await;
        Ok(())
    }

    /// Idle passes store nothing from now on; the caller publishes each pass's
    /// `CaptureStats::confirmed` where readers find it (the daemon: its lease note).
    pub fn confirm_idle_passes(&mut self) {
        self.confirm_idle = true;
    }

    /// Drop the slot and the publication (the source is removed from timevault). The
    /// slot otherwise retains WAL on the server forever.
    pub async fn drop_slot(mut self) -> Result<()> {
        self.stop_stream().await;
        sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.slot)
        .execute(&mut self.conn)
        .await
        .map_err(|e| pg_error("dropping the slot", e))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP PUBLICATION IF EXISTS {}",
            quote_ident(&self.publication)
        )))
        .execute(&mut self.conn)
        .await
        .map_err(|e| pg_error("dropping the publication", e))?;
        let _ = self.conn.close().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_visibility_follows_the_handoff_rule() {
        let s = PgSnapshot::parse("100:105:100,103").unwrap();
        assert!(s.sees(99));
        assert!(!s.sees(100), "in progress");
        assert!(s.sees(101));
        assert!(!s.sees(103));
        assert!(s.sees(104));
        assert!(!s.sees(105), "started after");
        assert_eq!(PgSnapshot::parse("7:7:").unwrap().xip, Vec::<u64>::new());
        assert!(PgSnapshot::parse("x").is_none());
        // Epoch 1: 32-bit ids map next to xmax.
        let s = PgSnapshot::parse("4294967390:4294967400:").unwrap();
        assert_eq!(s.widen(100), 4_294_967_396);
        assert!(s.sees(90));
        assert!(!s.sees(110));
    }

    #[test]
    fn slot_names_are_sanitized() {
        assert_eq!(slot_name("app"), "timevault_app");
        assert_eq!(slot_name("App-1"), "timevault_app_1");
        assert!(slot_name(&"x".repeat(100)).len() <= 63);
    }
}
