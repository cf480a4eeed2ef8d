//! The source registry: the one place where a configured kind becomes a running source, and
//! how each kind serves as a [`Source`] (its full image, its capture pass, its close). The
//! daemon runs every source through the trait and never branches on the kind.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::blobs::{BlobSource, ScanStats};
use super::postgres::preflight::preflight as preflight_postgres;
use super::postgres::{CaptureReport, PostgresSource};
use super::sqlite::{LivePoint, SqliteSource};
use crate::config::{SourceConfig, SourceKind};
use crate::error::Result;
use crate::repo::Repository;
use crate::tenancy::TenancyConfig;

/// What one job of a source produced, whatever its kind.
#[derive(Debug, Clone)]
pub enum Done {
    /// A full image (a database snapshot or a blob scan): a restore point at `taken_at`.
    Image {
        taken_at: DateTime<Utc>,
        /// What the log line says about it.
        said: String,
    },
    /// A capture pass.
    Pass(Pass),
}

/// One capture pass.
#[derive(Debug, Clone, Default)]
pub struct Pass {
    pub segments: u64,
    pub transactions: u64,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Commit-to-durable lag, when the source knows the commit time.
    pub lag: Option<Duration>,
    /// The newest restorable instant it produced.
    pub newest: Option<DateTime<Utc>>,
    /// Every commit before this instant is captured (published in the lease note).
    pub confirmed: Option<DateTime<Utc>>,
    /// PostgreSQL: the schema image it tried to take (`Err`: why it failed).
    pub schema_image: Option<std::result::Result<(), String>>,
    /// PostgreSQL: how the pass read the slot.
    pub capture: Option<CaptureReport>,
    /// PostgreSQL with `tenant_keys`: row changes whose tenant was not found.
    pub tenant_unresolved: u64,
}

/// A source the daemon runs: a full image now and then, capture passes between them.
#[async_trait::async_trait]
pub trait Source: Send {
    fn name(&self) -> &str;

    fn kind(&self) -> SourceKind;

    /// Whether a full image exists to continue from (false: the next job takes one).
    fn has_image(&self) -> bool;

    /// Whether its scans are its capture (blobs): its job runs only when a scan is due.
    fn captures_by_scan(&self) -> bool {
        false
    }

    /// A continuity loss detected since the last call.
    fn take_loss(&mut self) -> Option<String> {
        None
    }

    /// A full image: a snapshot that starts a chain, or a scan.
    async fn image(&mut self, repo: &Repository) -> Result<Done>;

    /// One capture pass (a source captured by scans scans).
    async fn capture(&mut self, repo: &Repository) -> Result<Done>;

    /// The live database's checksums at one pinned instant, for a drill; `None` for a kind
    /// that has none (only the capturing task can pin the instant).
    async fn live_point(&mut self, _repo: &Repository) -> Option<Result<LivePoint>> {
        None
    }

    /// Ship what is pending and let go of the source.
    async fn close(self: Box<Self>, repo: &Repository) -> Result<()>;
}

/// Check that a configured source can be captured before anything is created: a PostgreSQL
/// server that would break the application or lose changes is refused; the other kinds have
/// nothing to check before they are opened.
pub async fn preflight(config: &SourceConfig) -> Result<()> {
    match config.kind() {
        SourceKind::Postgres => self::preflight_postgres(&config.url).await?.check(),
        SourceKind::Sqlite | SourceKind::Blobs => Ok(()),
    }
}

/// Open a configured source for the daemon. A PostgreSQL server that would break the
/// application or lose changes is refused (preflight); its idle passes are confirmed through
/// the lease note (`SourceRun::confirmed_until`).
pub async fn open(
    config: &SourceConfig,
    tenancy: Option<&TenancyConfig>,
    repo: &Repository,
) -> Result<Box<dyn Source>> {
    Ok(match config.kind() {
        SourceKind::Sqlite => Box::new(
            SqliteSource::open(&config.name, std::path::Path::new(&config.url), repo).await?,
        ),
        SourceKind::Blobs => Box::new(BlobSource::open_configured(config, tenancy, repo).await?),
        SourceKind::Postgres => {
            preflight_postgres(&config.url).await?.check()?;
            let mut source = PostgresSource::open_configured(config, tenancy, repo).await?;
            source.confirm_idle_passes();
            Box::new(source)
        }
    })
}

/// What a one-off backup (`timevault backup`) of a source took: a snapshot or a scan. Its
/// JSON form is the kind's statistics as they are.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum Backup {
    Sqlite(super::sqlite::SnapshotStats),
    Postgres(super::postgres::snapshot::SnapshotStats),
    Blobs(ScanStats),
}

impl Backup {
    /// The line `timevault backup` prints for source `name`.
    pub fn line(&self, name: &str) -> String {
        match self {
            Backup::Sqlite(s) => format!(
                "{name}: snapshot {} at {} ({} bytes, {} uploaded)",
                s.chain,
                s.taken_at.to_rfc3339(),
                s.bytes,
                s.uploaded
            ),
            Backup::Postgres(s) => format!(
                "{name}: snapshot {} at {} ({} tables, {} rows, {} bytes, {} uploaded)",
                s.chain,
                s.taken_at.to_rfc3339(),
                s.tables,
                s.rows,
                s.bytes,
                s.uploaded
            ),
            Backup::Blobs(s) => format!(
                "{name}: scan at {}: {} objects ({} new, {} changed, {} deleted), {} bytes read, {} uploaded",
                s.scanned_at.to_rfc3339(),
                s.objects,
                s.new,
                s.changed,
                s.deleted,
                s.bytes_read,
                s.bytes_uploaded
            ),
        }
    }
}

/// A one-off backup of a configured source: a snapshot (a database) or a scan (blobs), the
/// source closed again afterwards. The caller holds the source's lease.
pub async fn backup(
    config: &SourceConfig,
    tenancy: Option<&TenancyConfig>,
    repo: &Repository,
) -> Result<Backup> {
    Ok(match config.kind() {
        SourceKind::Sqlite => {
            let mut source =
                SqliteSource::open(&config.name, std::path::Path::new(&config.url), repo).await?;
            let stats = source.snapshot(repo).await?;
            source.close(repo).await?;
            Backup::Sqlite(stats)
        }
        SourceKind::Postgres => {
            preflight_postgres(&config.url).await?.check()?;
            let mut source = PostgresSource::open_configured(config, tenancy, repo).await?;
            let stats = source.snapshot(repo).await?;
            source.close(repo).await?;
            Backup::Postgres(stats)
        }
        SourceKind::Blobs => {
            let mut source = BlobSource::open_configured(config, tenancy, repo).await?;
            Backup::Blobs(source.scan(repo).await?)
        }
    })
}

/// The bytes a backup of `config` will read, where that is known cheaply: a SQLite database's
/// file size (`stat`: opening and closing the file would drop the source's POSIX locks). A
/// blob source's size is known only after its listing, and a PostgreSQL database's size on
/// disk (indexes, TOAST compression, dead rows) says little about the COPY text a snapshot
/// reads, so those show a counter instead of a bar.
pub fn backup_size(config: &SourceConfig) -> Option<u64> {
    match config.kind() {
        SourceKind::Sqlite => std::fs::metadata(&config.url).ok().map(|m| m.len()),
        SourceKind::Blobs | SourceKind::Postgres => None,
    }
}

#[async_trait::async_trait]
impl Source for SqliteSource {
    fn name(&self) -> &str {
        SqliteSource::name(self)
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Sqlite
    }

    fn has_image(&self) -> bool {
        self.has_chain()
    }

    fn take_loss(&mut self) -> Option<String> {
        SqliteSource::take_loss(self)
    }

    async fn image(&mut self, repo: &Repository) -> Result<Done> {
        let s = self.snapshot(repo).await?;
        Ok(Done::Image {
            taken_at: s.taken_at,
            said: format!(
                "snapshot taken: chain {}, {} bytes, {} uploaded",
                s.chain, s.bytes, s.uploaded
            ),
        })
    }

    async fn capture(&mut self, repo: &Repository) -> Result<Done> {
        // Every transaction committed before the pass began is in the change log once it read
        // the WAL to its end (on this host's clock).
        let began = crate::clock::now();
        let c = SqliteSource::capture(self, repo).await?;
        if c.checkpointed {
            tracing::info!(source = %self.name(), "WAL checkpointed by timevault (everything shipped first)");
        }
        Ok(Done::Pass(Pass {
            segments: u64::from(c.segment.is_some()),
            transactions: c.transactions,
            bytes: c.uploaded,
            lag: None,
            newest: c.segment.as_deref().and_then(segment_time),
            confirmed: Some(began),
            schema_image: None,
            capture: None,
            tenant_unresolved: 0,
        }))
    }

    async fn live_point(&mut self, repo: &Repository) -> Option<Result<LivePoint>> {
        Some(SqliteSource::live_point(self, repo).await)
    }

    async fn close(self: Box<Self>, repo: &Repository) -> Result<()> {
        SqliteSource::close(*self, repo).await
    }
}

#[async_trait::async_trait]
impl Source for PostgresSource {
    fn name(&self) -> &str {
        PostgresSource::name(self)
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Postgres
    }

    fn has_image(&self) -> bool {
        self.has_chain()
    }

    fn take_loss(&mut self) -> Option<String> {
        PostgresSource::take_loss(self)
    }

    async fn image(&mut self, repo: &Repository) -> Result<Done> {
        let s = self.snapshot(repo).await?;
        Ok(Done::Image {
            taken_at: s.taken_at,
            said: format!(
                "snapshot taken: chain {}, {} rows, {} bytes",
                s.chain, s.rows, s.bytes
            ),
        })
    }

    async fn capture(&mut self, repo: &Repository) -> Result<Done> {
        // The heartbeat's commit time, once everything before it is stored, confirms the
        // window up to it (an idle pass stores nothing).
        let c = PostgresSource::capture(self, repo).await?;
        let shipped = !c.segments.is_empty();
        Ok(Done::Pass(Pass {
            segments: c.segments.len() as u64,
            transactions: c.transactions,
            bytes: c.uploaded,
            lag: c
                .newest
                .filter(|_| shipped)
                .and_then(|t| (crate::clock::now() - t).to_std().ok()),
            newest: c.newest,
            confirmed: c.confirmed,
            schema_image: c.schema_image,
            capture: self.capture_method(),
            tenant_unresolved: c.tenant_unresolved,
        }))
    }

    async fn close(self: Box<Self>, repo: &Repository) -> Result<()> {
        PostgresSource::close(*self, repo).await
    }
}

#[async_trait::async_trait]
impl Source for BlobSource {
    fn name(&self) -> &str {
        BlobSource::name(self)
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Blobs
    }

    fn has_image(&self) -> bool {
        self.last_scan().is_some()
    }

    fn captures_by_scan(&self) -> bool {
        true
    }

    async fn image(&mut self, repo: &Repository) -> Result<Done> {
        Ok(scanned(self.scan(repo).await?))
    }

    async fn capture(&mut self, repo: &Repository) -> Result<Done> {
        Ok(scanned(self.scan(repo).await?))
    }

    async fn close(self: Box<Self>, _repo: &Repository) -> Result<()> {
        Ok(())
    }
}

fn scanned(stats: ScanStats) -> Done {
    Done::Image {
        taken_at: stats.scanned_at,
        said: format!(
            "blob scan done: {} objects, {} new, {} changed, {} deleted, {} bytes uploaded",
            stats.objects, stats.new, stats.changed, stats.deleted, stats.bytes_uploaded
        ),
    }
}

/// The capture time in a change-log segment key (`.../<seq>-<captured at>[-e<epoch>]`).
pub fn segment_time(key: &str) -> Option<DateTime<Utc>> {
    let (_, captured, _) = crate::repo::layout::segment_name(key.rsplit('/').next()?)?;
    crate::time::parse_compact(captured)
}
