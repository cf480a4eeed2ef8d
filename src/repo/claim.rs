//! Read claims: a restore, export or drill in progress keeps prune off the sources it reads.
//!
//! Prune deletes whole chains and scans; a restore that planned one of them a moment earlier
//! would fail half way (or, worse, an operator's restore during the nightly prune would). So a
//! reader writes a claim for each source it reads before it loads the catalog, keeps it alive
//! with a heartbeat while it reads, and deletes it at the end. The protocol
//! (docs/ARCHITECTURE.md, "Pruning"), with the tombstone that prune writes before deleting:
//!
//! - **Prune**: read the claims, leave claimed sources out of the plan, write the tombstone,
//!   read the claims *again*, and delete nothing of a source claimed by then. Tombstoned keys
//!   of a claimed source wait for a later prune.
//! - **Reader**: write the claim, then load the catalog, which leaves out every tombstoned key.
//!
//! Either the prune's second reading sees the claim (and deletes nothing of that source), or
//! the claim was written after it, hence after the tombstone, and the reader's catalog does
//! not offer what the prune is deleting. A claim whose heartbeat is older than [`CLAIM_TTL`]
//! belongs to a reader that died and is ignored.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{layout, Repository};
use crate::archive::Kind;
use crate::error::Result;
use crate::time;

/// A claim not renewed for this long is a dead reader's and is ignored.
pub const CLAIM_TTL: chrono::Duration = chrono::Duration::minutes(10);

/// How often a reader renews its claims.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(120);

/// What reads a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadPurpose {
    Restore,
    Export,
    Drill,
}

impl std::fmt::Display for ReadPurpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReadPurpose::Restore => "restore",
            ReadPurpose::Export => "export",
            ReadPurpose::Drill => "drill",
        })
    }
}

/// One heartbeat of a claim (`catalog/claims/<source>/<claim id>/<heartbeat>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRecord {
    pub source: String,
    pub purpose: ReadPurpose,
    pub host: String,
    pub pid: u32,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
}

/// A live claim as prune sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveClaim {
    pub source: String,
    pub purpose: ReadPurpose,
    pub host: String,
    pub pid: u32,
    pub heartbeat_at: DateTime<Utc>,
}

/// The claims in the repository.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    /// Live claims by source.
    pub live: BTreeMap<String, Vec<LiveClaim>>,
    /// Keys of dead claims and superseded heartbeats.
    pub dead: Vec<String>,
}

impl Claims {
    /// Why `source` may not lose anything now, if a reader holds it.
    pub fn held(&self, source: &str) -> Option<String> {
        let claims = self.live.get(source)?;
        let readers: Vec<String> = claims.iter().map(LiveClaim::to_string).collect();
        Some(format!("being read by {}", readers.join(", ")))
    }
}

impl std::fmt::Display for LiveClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on {} (pid {})", self.purpose, self.host, self.pid)
    }
}

/// The claims one reader holds, with the key of each one's newest heartbeat.
struct Held {
    records: Vec<(ClaimRecord, String, String)>,
}

impl Repository {
    /// Run `work` (a restore, export or drill of `sources`) under read claims on them, renewed
    /// while it runs and deleted when it ends, whatever its outcome.
    pub async fn reading<F: std::future::Future>(
        &self,
        sources: &[&str],
        purpose: ReadPurpose,
        work: F,
    ) -> Result<F::Output> {
        let mut held = self.write_claims(sources, purpose).await?;
        tokio::pin!(work);
        let out = loop {
            tokio::select! {
                out = &mut work => break out,
                _ = tokio::time::sleep(HEARTBEAT) => self.renew_claims(&mut held).await,
            }
        };
        for (_, _, key) in &held.records {
            for (replica, error) in self.delete_on_replicas(key).await {
                tracing::warn!(%replica, %error, %key, "could not remove a read claim; it expires by itself");
            }
        }
        Ok(out)
    }

    async fn write_claims(&self, sources: &[&str], purpose: ReadPurpose) -> Result<Held> {
        let now = crate::clock::now();
        let id = format!("{:016x}", rand::random::<u64>());
        let mut held = Held {
            records: Vec::new(),
        };
        for source in sources {
            let record = ClaimRecord {
                source: source.to_string(),
                purpose,
                host: super::lease::host_name(),
                pid: std::process::id(),
                started_at: now,
                heartbeat_at: now,
            };
            let key = self.write_claim(&record, &id).await?;
            held.records.push((record, id.clone(), key));
        }
        Ok(held)
    }

    async fn write_claim(&self, record: &ClaimRecord, id: &str) -> Result<String> {
        let key = layout::claim(&record.source, id, &time::compact(record.heartbeat_at));
        let json = serde_json::to_vec(record).expect("claim serializes");
        self.write_object(Kind::Catalog, &key, json).await?;
        Ok(key)
    }

    /// Write each claim's next heartbeat, then drop the previous one. A failure is logged:
    /// the claim then expires, and a prune may go ahead (the read fails, never silently).
    async fn renew_claims(&self, held: &mut Held) {
        for (record, id, key) in &mut held.records {
            record.heartbeat_at = crate::clock::now();
            match self.write_claim(record, id).await {
                Ok(next) => {
                    let previous = std::mem::replace(key, next);
                    self.delete_on_replicas(&previous).await;
                }
                Err(e) => {
                    tracing::warn!(source = %record.source, error = %e, "could not renew a read claim")
                }
            }
        }
    }

    /// The live claims of every source, by source name.
    pub async fn live_claims(&self) -> Result<BTreeMap<String, Vec<LiveClaim>>> {
        Ok(self.claims().await?.live)
    }

    /// Every claim: the live ones by source, and the keys of dead ones and of superseded
    /// heartbeats (a reader that died, a deletion that failed), which prune removes.
    pub async fn claims(&self) -> Result<Claims> {
        let now = crate::clock::now();
        let mut newest: BTreeMap<String, (ClaimRecord, String)> = BTreeMap::new();
        let mut dead = Vec::new();
        for key in self.list(layout::CLAIMS).await? {
            let Some(claim) = layout::claim_of(&key) else {
                continue;
            };
            let bytes = match self.read_object(Kind::Catalog, &key).await {
                Ok(bytes) => bytes,
                // Renewed (and its old heartbeat deleted) between the listing and the read.
                Err(e) if e.kind() == crate::error::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let Ok(record) = serde_json::from_slice::<ClaimRecord>(&bytes) else {
                tracing::warn!(%key, "an unreadable read claim is ignored");
                continue;
            };
            match newest.get_mut(claim) {
                Some(slot) if slot.0.heartbeat_at >= record.heartbeat_at => dead.push(key),
                Some(slot) => dead.push(std::mem::replace(slot, (record, key)).1),
                None => {
                    newest.insert(claim.to_string(), (record, key));
                }
            }
        }
        let mut live: BTreeMap<String, Vec<LiveClaim>> = BTreeMap::new();
        for (record, key) in newest.into_values() {
            if now - record.heartbeat_at >= CLAIM_TTL {
                dead.push(key);
            } else {
                live.entry(record.source.clone())
                    .or_default()
                    .push(LiveClaim {
                        source: record.source,
                        purpose: record.purpose,
                        host: record.host,
                        pid: record.pid,
                        heartbeat_at: record.heartbeat_at,
                    });
            }
        }
        Ok(Claims { live, dead })
    }
}
