//! How far each replica trails the repository: the newest restorable instant of each source
//! on that replica alone, against the union of all replicas.
//!
//! With a write quorum below the number of replicas, a replica in an outage misses writes the
//! others acknowledged; `status` shows by how much, until the daemon's catch-up (or
//! `replicas sync`) closes the gap. Derived from listings only, like the catalog.

use chrono::{DateTime, Utc};

use super::SourceCatalog;
use crate::repo::{layout, Replica};

/// One replica's lag behind the union.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaLag {
    /// Largest, over the sources, of the union's newest instant minus the replica's (0 when
    /// it holds everything; from the union's oldest instant when it holds nothing of a source).
    pub seconds: f64,
}

/// The newest restorable instant of `source` on this replica alone.
async fn newest_on(replica: &Replica, source: &str) -> object_store::Result<Option<DateTime<Utc>>> {
    let keys = |metas: Vec<object_store::ObjectMeta>| -> Vec<String> {
        metas.into_iter().map(|m| m.location.to_string()).collect()
    };
    let snapshots = keys(replica.list(&layout::snapshot_prefix(source)).await?);
    let segments = keys(replica.list(&layout::changelog_prefix(source)).await?);
    Ok(SourceCatalog::from_keys(source, &snapshots, &segments).newest())
}

/// The lag of `replica` given the union catalogs of the sources (chain-based sources only).
pub async fn replica_lag(
    replica: &Replica,
    union: &[&SourceCatalog],
) -> object_store::Result<ReplicaLag> {
    let mut seconds: f64 = 0.0;
    for catalog in union {
        let oldest = catalog.windows().first().map(|w| w.oldest);
        let (Some(newest), Some(oldest)) = (catalog.newest(), oldest) else {
            continue;
        };
        let here = newest_on(replica, &catalog.source).await?.unwrap_or(oldest);
        seconds = seconds.max((newest - here).num_milliseconds().max(0) as f64 / 1000.0);
    }
    Ok(ReplicaLag { seconds })
}
