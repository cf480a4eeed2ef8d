//! Restore: bring a source back as it was at an instant, into a new target.
//!
//! Two steps, as in rustic's `prepare_restore` → `restore`: [`SourceCatalog::plan`] (pure)
//! picks the chain and the segments captured at or before the instant; `apply` rebuilds the
//! target beside its final path, checks it, and only then renames it into place, so a failed
//! restore leaves no target behind. Before anything is opened, [`target::plan_targets`]
//! refuses a target that overlaps a configured source or replica (`--force` or not); a forced
//! restore destroys the old target only once its replacement is complete.

pub mod blobs;
pub mod dry_run;
pub mod group;
pub mod location;
pub mod postgres;
pub mod registry;
pub mod sqlite;
pub mod target;

use chrono::{DateTime, Utc};
use serde::Serialize;

pub use blobs::{check_references, restore_blobs, DEFAULT_REFERENCE_QUERY};
pub use group::{restore_group, GroupRequest, GroupRestore};
pub use postgres::restore_postgres;
pub use postgres::tenant as postgres_tenant;
pub use sqlite::restore_sqlite;
pub use sqlite::{pages as sqlite_pages, vfs as sqlite_vfs};

/// Options of one source's restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub source: String,
    pub at: crate::time::At,
    pub target: String,
    /// Replace an existing target.
    pub force: bool,
    /// PostgreSQL: connections that load rows and build indexes at once (`--jobs`); `None`
    /// takes the core count, 2 to 8.
    pub jobs: Option<usize>,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreSummary {
    pub source: String,
    pub target: String,
    /// The instant asked for (`latest` resolved).
    pub requested: DateTime<Utc>,
    /// The instant whose state was restored: the last capture applied.
    pub restored_to: DateTime<Utc>,
    pub chain: String,
    pub segments_applied: usize,
    pub transactions: u64,
    pub bytes: u64,
    pub seconds: f64,
}
