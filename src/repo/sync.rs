//! `timevault replicas sync`: make every replica whole again from the others.
//!
//! A replica that was down misses writes (acknowledged by the quorum without it); a replica
//! can also lose or damage objects at rest. Sync copies each missing object from a replica whose
//! copy authenticates, and (unless `quick`) authenticates every copy and overwrites a damaged
//! one with a verified copy: the one exception to write-once.
//!
//! A sync that leaves a replica complete ends its lag ([`super::Replica::caught_up`]): the
//! `timevault_replica_behind_seconds` gauge is back at 0 for the writes it missed before the
//! sync began listing, provided too few listings failed to hide an acknowledged write.

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
    /// Objects not copied: sealed under a forgotten tenant's destroyed key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forgotten: Vec<String>,
    pub unreachable: Option<String>,
}

/// What [`Repository::copy_to`] did.
enum Copy {
    Copied,
    Forgotten,
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
        // Copies are authenticated before they are copied, tenants' objects with their keys.
        self.learn_tenant_keys().await?;
        self.learn_data_keys().await?;
        let in_scope = |name: &str| options.replica.as_deref().is_none_or(|n| n == name);
        // Before any listing: what each replica missed until now is what this sync may clear.
        let marks: Vec<_> = self
            .replicas
            .replicas()
            .iter()
            .map(|r| in_scope(r.name()).then(|| r.begin_catch_up()))
            .collect();
        let listings = self.list_all_replicas().await;
        // Every acknowledged write is on `write_quorum` replicas: unless that many listings
        // failed, one of them was listed, so the union holds every acknowledged write.
        let union_whole = listings.iter().filter(|l| l.is_err()).count() < self.replicas.quorum();
        let mut union = replicated_union(&listings);
        // What a prune removed while a replica was down is not copied back (see `tombstone`).
        let removed = self.tombstoned_keys().await?;
        union.retain(|k| !removed.contains(k));
        let mut summary = SyncSummary::default();
        for (i, replica) in self.replicas.replicas().iter().enumerate() {
            let Some(mark) = marks[i] else {
                continue;
            };
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
                    Ok(Copy::Copied) => r.copied.push(key.clone()),
                    Ok(Copy::Forgotten) => r.forgotten.push(key.clone()),
                    Err(e) => r.failed.push((key.clone(), e.to_string())),
                }
            }
            if !options.quick {
                let present: Vec<String> = listing
                    .keys()
                    .filter(|k| is_replicated(k))
                    .cloned()
                    .collect();
                let found = self.find_damaged(i, present, &Default::default()).await;
                for (key, _) in found.damaged {
                    match self.copy_to(i, &key, true).await {
                        Ok(Copy::Copied) => r.repaired.push(key),
                        Ok(Copy::Forgotten) => r.forgotten.push(key),
                        Err(e) => r.failed.push((key, e.to_string())),
                    }
                }
            }
            if union_whole && r.failed.is_empty() {
                replica.caught_up(mark);
            }
            summary.replicas.push(r);
        }
        Ok(summary)
    }

    /// Copy `key` to replica `target` from the first other replica whose copy authenticates.
    /// An object under a forgotten tenant's destroyed key is not copied.
    async fn copy_to(&self, target: usize, key: &str, overwrite: bool) -> Result<Copy> {
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
            if self.sealed_under_forgotten_key(key, &bytes) {
                return Ok(Copy::Forgotten);
            }
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
            return written.map(|_| Copy::Copied).map_err(|e| {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::config::Config;
    use crate::repo::replica::tests::Outage;
    use crate::repo::{store, Replica, ReplicaSet, RetryPolicy};

    /// A repository on two file replicas, `a` and `b`, with write quorum 1, each behind a
    /// switch that takes it down.
    async fn two_sites(dir: &std::path::Path) -> (Repository, [Arc<Outage>; 2]) {
        let text = "[repository]\nkey_file = \"k\"\nwrite_quorum = 1\n\
                    [[replicas]]\nname = \"a\"\nregion = \"r\"\nurl = \"a\"\n\
                    [[replicas]]\nname = \"b\"\nregion = \"r\"\nurl = \"b\"\n";
        let config = Config::parse(text, &dir.join("timevault.toml")).unwrap();
        Repository::init(&config).await.unwrap();
        let retry = RetryPolicy {
            attempts: 2,
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
        };
        let mut repo = Repository::open_with(&config, None, retry).await.unwrap();
        let switches = config.replicas.iter().map(|r| {
            let inner = store::open_store(&r.url, &r.options).unwrap();
            Arc::new(Outage::new(inner))
        });
        let switches: Vec<Arc<Outage>> = switches.collect();
        let replicas = config
            .replicas
            .iter()
            .zip(&switches)
            .map(|(r, s)| Replica::new(&r.name, &r.region, s.clone()).with_retry(retry))
            .collect();
        repo.replicas = ReplicaSet::new(replicas, 1);
        (repo, [switches[0].clone(), switches[1].clone()])
    }

    fn behind(repo: &Repository, i: usize) -> bool {
        repo.replicas.replicas()[i].health().behind_since.is_some()
    }

    #[tokio::test]
    async fn a_sync_ends_the_lag_only_of_a_replica_it_found_complete() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, [a, b]) = two_sites(dir.path()).await;
        // b is down while a chunk is acknowledged by a alone.
        b.set_down(true);
        repo.put_chunk(Bytes::from_static(b"a row or two"))
            .await
            .unwrap();
        // (Recorded when b's write ends, which may be just after the acknowledgement.)
        for _ in 0..500 {
            if behind(&repo, 1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(behind(&repo, 1));
        assert!(!behind(&repo, 0));
        // Still down: the sync cannot reach it, it still lags.
        let summary = repo.sync_replicas(&SyncOptions::default()).await.unwrap();
        assert!(!summary.is_complete());
        assert!(behind(&repo, 1));
        // b is back but a, the only holder of the write, cannot be listed: b lacks nothing
        // the sync can see, yet it may lack that write.
        b.set_down(false);
        a.set_down(true);
        repo.sync_replicas(&SyncOptions::default()).await.unwrap();
        assert!(
            behind(&repo, 1),
            "cleared without listing the write's holder"
        );
        // Both up: b gets the chunk and stops lagging; its missed write stays counted.
        a.set_down(false);
        let summary = repo.sync_replicas(&SyncOptions::default()).await.unwrap();
        assert!(summary.is_complete(), "{summary:?}");
        assert_eq!(summary.replicas[1].copied.len(), 1, "{summary:?}");
        assert!(!behind(&repo, 1));
        assert_eq!(repo.replicas.replicas()[1].health().missed_writes, 1);
    }
}
