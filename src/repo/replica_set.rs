//! The replica set: one logical repository mirrored on N object stores.
//!
//! Writes go to every replica concurrently and are acknowledged once `write_quorum` replicas
//! hold the object; a replica that missed a write is caught up later by `replicas sync`. Reads
//! are not here: they need the key to authenticate, so [`super::Repository`] walks the replicas
//! in order and fails over per object.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::join_all;

use super::replica::{PutOutcome, Replica};
use crate::config::mask_url;
use crate::error::{Error, ErrorKind, Result};

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
        let writes = targets.iter().map(|&i| {
            let replica = self.replicas[i].clone();
            let bytes = bytes.clone();
            async move {
                let outcome = replica.put_create(key, bytes).await;
                (replica, outcome)
            }
        });
        let mut receipt = WriteReceipt::default();
        let mut created = Vec::new();
        for (replica, outcome) in join_all(writes).await {
            match outcome {
                Ok(o) => {
                    if o == PutOutcome::Created {
                        receipt.uploaded = true;
                        created.push(replica.clone());
                    }
                    receipt.stored.push(replica.name().to_string());
                }
                Err(e) => receipt
                    .failed
                    .push((replica.name().to_string(), e.to_string())),
            }
        }
        if receipt.stored.len() + already >= self.quorum {
            for (name, cause) in &receipt.failed {
                tracing::warn!(replica = %name, key, cause = %mask_url(cause), "replica missed a write; it lags until synced");
            }
            return Ok(receipt);
        }
        for replica in created {
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
