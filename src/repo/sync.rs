//! `timevault replicas sync`: make every replica whole again from the others.
//!
//! A replica that was down misses writes (acknowledged by the quorum without it); a replica
//! can also lose or damage objects at rest. Sync copies each missing object from a replica whose
//! copy authenticates, and (unless `quick`) authenticates every copy and overwrites a damaged
//! one with a verified copy: the one exception to write-once.

use serde::Serialize;

use super::verify::{is_replicated, replicated_union};
use super::Repository;
use crate::error::{Error, ErrorKind, Result};

#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// Compare listings only; do not authenticate copies already present.
    pub quick: bool,
    /// Only repair this replica.
    pub replica: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplicaSync {
    pub name: String,
    pub copied: Vec<String>,
    pub repaired: Vec<String>,
    /// Objects that could not be repaired, with the reason.
    pub failed: Vec<(String, String)>,
    pub unreachable: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncSummary {
    pub replicas: Vec<ReplicaSync>,
}

impl SyncSummary {
    pub fn is_complete(&self) -> bool {
        self.replicas
            .iter()
            .all(|r| r.failed.is_empty() && r.unreachable.is_none())
    }

    pub fn objects_written(&self) -> usize {
        self.replicas
            .iter()
            .map(|r| r.copied.len() + r.repaired.len())
            .sum()
    }
}

impl Repository {
    /// `timevault replicas sync`.
    pub async fn sync_replicas(&self, options: &SyncOptions) -> Result<SyncSummary> {
        if let Some(name) = &options.replica {
            self.replicas.get(name)?;
        }
        let listings = self.list_all_replicas().await;
        let mut union = replicated_union(&listings);
        // What a prune removed while a replica was down is not copied back (see `tombstone`).
        let removed = self.tombstoned_keys().await?;
        union.retain(|k| !removed.contains(k));
        let mut summary = SyncSummary::default();
        for (i, replica) in self.replicas.replicas().iter().enumerate() {
            if options
                .replica
                .as_deref()
                .is_some_and(|n| n != replica.name())
            {
                continue;
            }
            let mut r = ReplicaSync {
                name: replica.name().to_string(),
                ..Default::default()
            };
            let listing = match &listings[i] {
                Ok(l) => l,
                Err(e) => {
                    r.unreachable = Some(e.clone());
                    summary.replicas.push(r);
                    continue;
                }
            };
            for key in union.iter().filter(|k| !listing.contains_key(k.as_str())) {
                match self.copy_to(i, key, false).await {
                    Ok(()) => r.copied.push(key.clone()),
                    Err(e) => r.failed.push((key.clone(), e.to_string())),
                }
            }
            if !options.quick {
                let present: Vec<String> = listing
                    .keys()
                    .filter(|k| is_replicated(k))
                    .cloned()
                    .collect();
                let (_, damaged) = self.find_damaged(i, present).await;
                for (key, _) in damaged {
                    match self.copy_to(i, &key, true).await {
                        Ok(()) => r.repaired.push(key),
                        Err(e) => r.failed.push((key, e.to_string())),
                    }
                }
            }
            summary.replicas.push(r);
        }
        Ok(summary)
    }

    /// Copy `key` to replica `target` from the first other replica whose copy authenticates.
    async fn copy_to(&self, target: usize, key: &str, overwrite: bool) -> Result<()> {
        let replicas = self.replicas.replicas();
        let mut reasons = Vec::new();
        for (i, source) in replicas.iter().enumerate() {
            if i == target {
                continue;
            }
            let bytes = match source.get(key).await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => continue,
                Err(e) => {
                    reasons.push(format!("replica {}: {e}", source.name()));
                    continue;
                }
            };
            if let Err(why) = self.authenticate(key, &bytes) {
                source.record_bad_object(key, &why);
                reasons.push(format!("replica {}: {why}", source.name()));
                continue;
            }
            let dest = &replicas[target];
            let written = if overwrite {
                dest.put_overwrite(key, bytes).await
            } else {
                dest.put_create(key, bytes).await.map(|_| ())
            };
            return written.map_err(|e| {
                Error::new(
                    ErrorKind::Unavailable,
                    format!("replica {}: write {key}: {e}", dest.name()),
                )
            });
        }
        Err(Error::corrupt(format!(
            "{key}: no replica holds an authentic copy ({})",
            if reasons.is_empty() {
                "absent everywhere else".to_string()
            } else {
                reasons.join("; ")
            }
        )))
    }
}
