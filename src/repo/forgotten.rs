//! Forgotten tenants (docs/FORMAT.md §3.3): `keys/forgotten/<handle>/<time>` records that a
//! tenant's data keys were destroyed, when, by whom and why, and which key ids they were. Readers load
//! it to tell a forgotten tenant's data (skipped, counted) from damage (an error).
//!
//! The record is written on the write quorum before any key is deleted, so an interrupted
//! `tenant forget` leaves the tenant forgotten for every reader, and running it again finishes
//! the deletion.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{layout, Repository};
use crate::archive::Kind;
use crate::error::{Error, ErrorKind, Result};
use crate::rowsum::TableSum;

pub const FORGOTTEN_FORMAT: &str = "forgotten-tenant/1";

/// What a forget made unreadable, as counted from the manifests when it ran.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unreadable {
    /// Snapshots holding chunks of the tenant.
    pub snapshots: u64,
    /// Chains (a snapshot and its change log) of those snapshots.
    pub chains: u64,
    /// Distinct chunks sealed under the tenant's keys.
    pub chunks: u64,
    /// Their plaintext bytes.
    pub bytes: u64,
    /// Blob files under the tenant's keys.
    #[serde(default)]
    pub files: u64,
}

/// `keys/forgotten/<handle>/<time>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgottenTenant {
    pub format: String,
    pub tenant: String,
    /// The destroyed keys' ids (16 hex digits each).
    pub key_ids: Vec<String>,
    pub forgotten_at: DateTime<Utc>,
    pub requested_by: String,
    pub reason: String,
    pub unreadable: Unreadable,
    /// The tenant's row checksums in each snapshot (by snapshot key, then table), computed from
    /// its chunks before the keys were destroyed: a drill subtracts them from the snapshot's.
    #[serde(default)]
    pub table_sums: BTreeMap<String, BTreeMap<String, TableSum>>,
    /// The snapshot chunks sealed under the destroyed keys: `prune` no longer protects them.
    #[serde(default)]
    pub chunks: Vec<String>,
}

impl ForgottenTenant {
    /// "forgotten on 2026-12-07 by WHO (reason)", for refusals.
    pub fn said(&self) -> String {
        format!(
            "tenant {} was forgotten on {} by {} ({})",
            self.tenant,
            self.forgotten_at.format("%Y-%m-%d %H:%M:%S UTC"),
            self.requested_by,
            self.reason
        )
    }

    /// The refusal of a restore or export of this tenant: exit 7.
    pub fn refusal(&self) -> Error {
        Error::new(ErrorKind::Forgotten, self.said())
            .with_hint("its data keys were destroyed on request: no backup can bring its data back")
    }
}

/// Every forgotten tenant, as one command reads them once.
#[derive(Debug, Clone, Default)]
pub struct Forgotten {
    tenants: HashMap<String, ForgottenTenant>,
    key_ids: HashSet<[u8; 8]>,
}

impl Forgotten {
    pub fn tenant(&self, tenant: &str) -> Option<&ForgottenTenant> {
        self.tenants.get(tenant)
    }

    /// Whether `key_id` is a destroyed tenant key.
    pub fn has_key(&self, key_id: &[u8; 8]) -> bool {
        self.key_ids.contains(key_id)
    }

    /// Every chunk sealed under a destroyed key, as the forgets recorded them.
    pub fn chunk_ids(&self) -> HashSet<String> {
        self.tenants
            .values()
            .flat_map(|t| t.chunks.iter().cloned())
            .collect()
    }

    /// Every destroyed key id.
    pub fn key_ids(&self) -> impl Iterator<Item = [u8; 8]> + '_ {
        self.key_ids.iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    pub fn tenants(&self) -> impl Iterator<Item = &ForgottenTenant> {
        self.tenants.values()
    }

    /// Add one record; a tenant forgotten twice is reported by its first forget.
    fn add(&mut self, record: ForgottenTenant, object: &str) -> Result<()> {
        for id in &record.key_ids {
            let id = hex::decode(id)
                .ok()
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .ok_or_else(|| {
                    Error::corrupt(format!("{object}: key id {id:?} is not 16 hex digits"))
                })?;
            self.key_ids.insert(id);
        }
        match self.tenants.get_mut(&record.tenant) {
            Some(first) if first.forgotten_at <= record.forgotten_at => {
                first.key_ids.extend(record.key_ids);
                first.table_sums.extend(record.table_sums);
                first.chunks.extend(record.chunks);
            }
            _ => {
                if let Some(later) = self.tenants.remove(&record.tenant) {
                    let mut first = record;
                    first.key_ids.extend(later.key_ids);
                    first.table_sums.extend(later.table_sums);
                    first.chunks.extend(later.chunks);
                    self.tenants.insert(first.tenant.clone(), first);
                } else {
                    self.tenants.insert(record.tenant.clone(), record);
                }
            }
        }
        Ok(())
    }
}

impl Repository {
    /// Every forgotten tenant (one listing, a read per tenant).
    pub async fn forgotten(&self) -> Result<Forgotten> {
        let mut out = Forgotten::default();
        for object in self.list(layout::FORGOTTEN).await? {
            out.add(self.read_forgotten(&object).await?, &object)?;
        }
        Ok(out)
    }

    /// The record of `tenant` (its records merged), if it was forgotten.
    pub async fn forgotten_tenant(&self, tenant: &str) -> Result<Option<ForgottenTenant>> {
        let mut out = Forgotten::default();
        for object in self
            .list(&layout::forgotten_prefix(&self.keys.tenant_handle(tenant)))
            .await?
        {
            out.add(self.read_forgotten(&object).await?, &object)?;
        }
        Ok(out.tenants.remove(tenant))
    }

    async fn read_forgotten(&self, object: &str) -> Result<ForgottenTenant> {
        let bytes = Box::pin(self.read_object_under(&self.keys, Kind::Key, object)).await?;
        let record: ForgottenTenant = serde_json::from_slice(&bytes).map_err(|e| {
            Error::corrupt(format!("{object}: unreadable forgotten-tenant record")).with_source(e)
        })?;
        if record.format != FORGOTTEN_FORMAT {
            return Err(Error::corrupt(format!(
                "{object}: format {:?} is not {FORGOTTEN_FORMAT}",
                record.format
            ))
            .with_hint("upgrade timevault"));
        }
        Ok(record)
    }

    /// Record `record`'s tenant as forgotten (on the write quorum, unless this record is
    /// already there: a rerun after an interruption), then destroy its keys on
    /// every replica: tombstoned first, so `replicas sync` never copies one back from a replica
    /// that was down, then deleted. Returns the key objects deleted.
    pub async fn forget_tenant(&self, record: &ForgottenTenant) -> Result<Vec<String>> {
        let handle = self.keys.tenant_handle(&record.tenant);
        let marker = layout::forgotten(&handle, &crate::time::compact(record.forgotten_at));
        let json = serde_json::to_vec(record).expect("forgotten record serializes");
        if !self.list(&marker).await?.contains(&marker) {
            self.store_object(Kind::Key, &marker, json).await?;
        }
        let objects = self.list(&layout::tenant_key(&handle, "")).await?;
        self.tenant_keyring.forget(&record.tenant).await;
        if objects.is_empty() {
            return Ok(objects);
        }
        self.tombstone_and_delete(
            &objects,
            &format!("forgetting tenant {} (recorded)", record.tenant),
        )
        .await?;
        Ok(objects)
    }
}
