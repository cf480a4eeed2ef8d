//! How far each replica trails the repository: which snapshots and change-log segments of the
//! union of all replicas this replica lacks, and since when.
//!
//! With a write quorum below the number of replicas, a replica in an outage misses writes the
//! others acknowledged; `status` shows how many and from which instant on, until the daemon's
//! catch-up (or `replicas sync`) closes the gap. Derived from listings only, like the catalog.
//! Chunks are not compared here (`verify` does that): a missing segment or snapshot is what
//! makes restores from this replica alone fall short.

use std::collections::HashSet;

use chrono::{DateTime, Utc};

use super::SourceCatalog;
use crate::repo::{layout, Replica};

/// One replica's lag behind the union.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaLag {
    /// Snapshots and segments the union holds and this replica lacks.
    pub missing: usize,
    /// Largest, over the sources, of the union's newest instant minus the capture time of the
    /// first object this replica lacks (0 when it lacks nothing).
    pub seconds: f64,
}

/// Keys of `source`'s snapshots and segments on this replica alone.
async fn keys_on(replica: &Replica, source: &str) -> object_store::Result<HashSet<String>> {
    let mut keys = HashSet::new();
    for prefix in [
        layout::snapshot_prefix(source),
        layout::changelog_prefix(source),
    ] {
        let metas = replica.list(&prefix).await?;
        keys.extend(metas.into_iter().map(|m| m.location.to_string()));
    }
    Ok(keys)
}

/// Pure: the lag of a replica holding `here`, against the union `catalog`.
pub fn lag_of(catalog: &SourceCatalog, here: &HashSet<String>) -> ReplicaLag {
    let entries = catalog.chains.iter().flat_map(|c| {
        std::iter::once((c.snapshot.taken_at, &c.snapshot.key))
            .chain(c.segments.iter().map(|s| (s.captured_at, &s.key)))
    });
    let missing: Vec<DateTime<Utc>> = entries
        .filter(|(_, key)| !here.contains(*key))
        .map(|(t, _)| t)
        .collect();
    let seconds = match (catalog.newest(), missing.iter().min()) {
        (Some(newest), Some(first)) => (newest - *first).num_milliseconds().max(0) as f64 / 1000.0,
        _ => 0.0,
    };
    ReplicaLag {
        missing: missing.len(),
        seconds,
    }
}

/// The lag of `replica` given the union catalogs of the sources (chain-based sources only).
pub async fn replica_lag(
    replica: &Replica,
    union: &[&SourceCatalog],
) -> object_store::Result<ReplicaLag> {
    let mut total = ReplicaLag {
        missing: 0,
        seconds: 0.0,
    };
    for catalog in union {
        let lag = lag_of(catalog, &keys_on(replica, &catalog.source).await?);
        total.missing += lag.missing;
        total.seconds = total.seconds.max(lag.seconds);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_runs_from_the_first_missing_segment_to_the_newest() {
        let snapshots = vec!["snapshots/app/20260101T000000.000000Z".to_string()];
        let segments: Vec<String> = (1..=4)
            .map(|i| {
                layout::segment(
                    "app",
                    "20260101T000000.000000Z",
                    i,
                    &format!("20260101T00000{i}.000000Z"),
                    None,
                )
            })
            .collect();
        let catalog = SourceCatalog::from_keys("app", &snapshots, &segments);
        assert_eq!(catalog.chains[0].segments.len(), 4, "keys parse");
        let all: HashSet<String> = snapshots.iter().chain(&segments).cloned().collect();
        assert_eq!(
            lag_of(&catalog, &all),
            ReplicaLag {
                missing: 0,
                seconds: 0.0
            }
        );
        let mut partial = all.clone();
        partial.remove(&segments[1]);
        partial.remove(&segments[2]);
        assert_eq!(
            lag_of(&catalog, &partial),
            ReplicaLag {
                missing: 2,
                seconds: 2.0
            }
        );
        assert_eq!(lag_of(&catalog, &HashSet::new()).missing, 5);
    }
}
