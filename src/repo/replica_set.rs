//! The replica set: one logical repository mirrored on N object stores.
//!
//! Writes go to every replica concurrently and are acknowledged once `write_quorum` replicas
//! hold the object; a replica that missed a write is caught up later by `replicas sync`. Reads
//! are not here: they need the key to authenticate, so [`super::Repository`] walks the replicas
//! in order and fails over per object.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};

use super::replica::{PutOutcome, Replica};
use crate::error::{Error, ErrorKind, Result};
use crate::redact::mask_url;

/// What a quorum write achieved.
#[derive(Debug, Clone, Default)]
pub struct WriteReceipt {
    /// Replicas that hold the object now.
    pub stored: Vec<String>,
    /// Replicas that failed, with the cause; they lag until `replicas sync` (or the daemon)
    /// catches them up.
    pub failed: Vec<(String, String)>,
    /// True when at least one replica received new bytes.
    pub uploaded: bool,
}

/// All replicas of a repository and the write quorum.
#[derive(Debug, Clone)]
pub struct ReplicaSet {
    replicas: Vec<Arc<Replica>>,
    quorum: usize,
}

impl ReplicaSet {
    pub fn new(replicas: Vec<Replica>, quorum: usize) -> Self {
        let quorum = quorum.clamp(1, replicas.len().max(1));
        ReplicaSet {
            replicas: replicas.into_iter().map(Arc::new).collect(),
            quorum,
        }
    }

    pub fn replicas(&self) -> &[Arc<Replica>] {
        &self.replicas
    }

    pub fn quorum(&self) -> usize {
        self.quorum
    }

    pub fn get(&self, name: &str) -> Result<&Arc<Replica>> {
        self.replicas
            .iter()
            .find(|r| r.name() == name)
            .ok_or_else(|| {
                let known: Vec<_> = self.replicas.iter().map(|r| r.name()).collect();
                Error::input(format!("unknown replica {name:?}"))
                    .with_hint(format!("configured replicas: {}", known.join(", ")))
            })
    }

    /// The same replicas with another quorum (clamped to 1..=replicas).
    pub fn with_quorum(&self, quorum: usize) -> ReplicaSet {
        ReplicaSet {
            replicas: self.replicas.clone(),
            quorum: quorum.clamp(1, self.replicas.len().max(1)),
        }
    }

    /// Keep only the named replica (restore or verify at one site).
    pub fn only(&self, name: &str) -> Result<ReplicaSet> {
        let replica = self.get(name)?.clone();
        Ok(ReplicaSet {
            replicas: vec![replica],
            quorum: 1,
        })
    }

    /// Create-only write of `bytes` at `key` on every replica in `targets` (indices), counting
    /// `already` replicas known to hold it towards the quorum. Below quorum, the copies this
    /// call created are removed again, so a failed write leaves nothing behind.
    pub async fn put(
        &self,
        key: &str,
        bytes: Bytes,
        targets: &[usize],
        already: usize,
    ) -> Result<WriteReceipt> {
        let mut writes: FuturesUnordered<_> = targets
            .iter()
            .map(|&i| {
                let replica = self.replicas[i].clone();
                let bytes = bytes.clone();
                let key = key.to_string();
                // Spawned, so that a write still running when the quorum is reached finishes
                // in the background instead of holding up the acknowledgement.
                tokio::spawn(async move {
                    let outcome = replica.put_create(&key, bytes).await;
                    (replica, outcome)
                })
            })
            .collect();
        let mut receipt = WriteReceipt::default();
        let mut created = Vec::new();
        let mut failed = Vec::new();
        while let Some(joined) = writes.next().await {
            let (replica, outcome) =
                joined.map_err(|e| Error::other(format!("write of {key}")).with_source(e))?;
            match outcome {
                Ok(o) => {
                    if o == PutOutcome::Created {
                        receipt.uploaded = true;
                        created.push(replica.clone());
                    }
                    receipt.stored.push(replica.name().to_string());
                }
                Err(e) => {
                    receipt
                        .failed
                        .push((replica.name().to_string(), e.to_string()));
                    failed.push(replica);
                }
            }
            if receipt.stored.len() + already >= self.quorum {
                if receipt.uploaded {
                    OBJECTS_WRITTEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                // Acknowledged. A replica that failed the write lags until the daemon's
                // catch-up or `replicas sync`; so does one whose write, still running, fails.
                for (replica, (_, cause)) in failed.iter().zip(&receipt.failed) {
                    missed(replica, key, cause);
                }
                if !writes.is_empty() {
                    let key = key.to_string();
                    tokio::spawn(async move {
                        while let Some(joined) = writes.next().await {
                            if let Ok((replica, Err(e))) = joined {
                                missed(&replica, &key, &e.to_string());
                            }
                        }
                    });
                }
                return Ok(receipt);
            }
        }
        if receipt.stored.len() + already >= self.quorum {
            return Ok(receipt); // nothing to write: the replicas already hold it
        }
        // A chunk is content-addressed: another writer may already count on this copy (it
        // deduplicated against it), so a failed chunk write leaves it to garbage collection.
        let shared = key.starts_with(super::layout::CHUNKS);
        for replica in created.into_iter().filter(|_| !shared) {
            if let Err(e) = replica.delete(key).await {
                tracing::warn!(replica = %replica.name(), key, error = %e, "could not remove a copy of a failed write");
            }
        }
        Err(quorum_error(
            key,
            self.quorum,
            already + receipt.stored.len(),
            &receipt.failed,
        ))
    }

    /// Create-only write to every replica.
    pub async fn put_all(&self, key: &str, bytes: Bytes) -> Result<WriteReceipt> {
        let all: Vec<usize> = (0..self.replicas.len()).collect();
        self.put(key, bytes, &all, 0).await
    }
}

/// `replica` failed a write the quorum acknowledged: logged as a warning when it starts to
/// lag, then at debug level (an outage misses every write; the counter has them all).
fn missed(replica: &Replica, key: &str, cause: &str) {
    if replica.record_missed_write() {
        tracing::warn!(replica = %replica.name(), key, cause = %mask_url(cause), "replica missed a write; it lags until synced");
    } else {
        tracing::debug!(replica = %replica.name(), key, cause = %mask_url(cause), "replica missed a write");
    }
}

/// Objects this process's quorum writes acknowledged with new bytes on some replica (chunks
/// and manifests; a chunk every replica already held is not counted): a backup's progress.
static OBJECTS_WRITTEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// See [`OBJECTS_WRITTEN`].
pub fn objects_written() -> u64 {
    OBJECTS_WRITTEN.load(std::sync::atomic::Ordering::Relaxed)
}

fn quorum_error(key: &str, quorum: usize, stored: usize, failed: &[(String, String)]) -> Error {
    let causes: Vec<String> = failed
        .iter()
        .map(|(name, cause)| format!("replica {name}: {}", mask_url(cause)))
        .collect();
    Error::new(
        ErrorKind::Unavailable,
        format!(
            "write of {key} reached {stored} of the {quorum} replicas the write quorum requires; {}",
            causes.join("; ")
        ),
    )
    .with_hint("check that the failing replica is reachable and writable, or lower repository.write_quorum")
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::throttle::{ThrottleConfig, ThrottledStore};
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn a_slow_replica_does_not_hold_up_a_quorum_of_one() {
        let fast = Replica::new("fast", "near", Arc::new(InMemory::new()));
        let slow_store = ThrottledStore::new(
            InMemory::new(),
            ThrottleConfig {
                wait_put_per_call: Duration::from_millis(800),
                ..Default::default()
            },
        );
        let slow = Replica::new("slow", "far", Arc::new(slow_store));
        let set = ReplicaSet::new(vec![fast, slow], 1);
        let started = Instant::now();
        let receipt = set.put_all("k", Bytes::from_static(b"v")).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "acknowledged by the fast replica"
        );
        assert_eq!(receipt.stored, vec!["fast".to_string()]);
        // The slow write completes in the background.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(set.replicas()[1].get("k").await.unwrap().is_some());
    }

    fn quick() -> super::super::RetryPolicy {
        super::super::RetryPolicy {
            attempts: 2,
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
        }
    }

    /// Until `done` holds for `replica`'s health (a write still running is recorded when it ends).
    async fn wait_health(replica: &Replica, done: impl Fn(&super::super::ReplicaHealth) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(&replica.health()) {
            assert!(Instant::now() < deadline, "{:?}", replica.health());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A replica whose store is down, answering (with a failure) after `wait`.
    fn failing(name: &str, wait: Duration) -> Replica {
        use super::super::replica::tests::Outage;
        let outage = Outage::new(Arc::new(InMemory::new()));
        outage.set_down(true);
        let store = ThrottledStore::new(
            outage,
            ThrottleConfig {
                wait_put_per_call: wait,
                ..Default::default()
            },
        );
        Replica::new(name, "far", Arc::new(store)).with_retry(quick())
    }

    fn healthy(name: &str, wait: Duration) -> Replica {
        let store = ThrottledStore::new(
            InMemory::new(),
            ThrottleConfig {
                wait_put_per_call: wait,
                ..Default::default()
            },
        );
        Replica::new(name, "near", Arc::new(store)).with_retry(quick())
    }

    #[tokio::test]
    async fn a_replica_that_fails_an_acknowledged_write_lags_and_one_below_quorum_does_not() {
        // Failed before the acknowledgement (the healthy replica is slower).
        let set = ReplicaSet::new(
            vec![
                healthy("up", Duration::from_millis(200)),
                failing("down", Duration::ZERO),
            ],
            1,
        );
        let receipt = set.put_all("k/1", Bytes::from_static(b"v")).await.unwrap();
        assert_eq!(receipt.stored, ["up"]);
        let (up, down) = (&set.replicas()[0], &set.replicas()[1]);
        assert_eq!(down.health().missed_writes, 1);
        assert!(down.health().behind_since.is_some());
        assert_eq!(up.health().missed_writes, 0);
        assert!(up.health().behind_since.is_none());
        // Quorum 2: not acknowledged, so no acknowledged write was missed.
        let strict = set.with_quorum(2);
        assert!(strict
            .put_all("k/2", Bytes::from_static(b"v"))
            .await
            .is_err());
        assert_eq!(down.health().missed_writes, 1);

        // Failed after the acknowledgement: the write was still running when it was given.
        let set = ReplicaSet::new(
            vec![
                healthy("up", Duration::ZERO),
                failing("down", Duration::from_millis(200)),
            ],
            1,
        );
        set.put_all("k/1", Bytes::from_static(b"v")).await.unwrap();
        let down = &set.replicas()[1];
        wait_health(down, |h| h.missed_writes == 1 && h.behind_since.is_some()).await;
        assert_eq!(set.replicas()[0].health().missed_writes, 0);
    }
}
