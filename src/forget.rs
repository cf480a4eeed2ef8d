//! Forgetting a tenant (crypto-shredding, docs/FORMAT.md §3.3): destroy the tenant's data keys
//! on every replica, so that every chunk and change-log record sealed under them is unreadable
//! in every backup, however old, while every other tenant's data stays exactly restorable.
//!
//! Plan, then apply. [`ForgetPlan::make`] reads the tenant's keys and counts, from the snapshot
//! manifests' chunk tenants, what becomes unreadable; it also computes the tenant's row
//! checksums in each snapshot (reading its chunks while the keys still exist), which drills
//! subtract from the snapshot's checksums afterwards. [`ForgetPlan::apply`] writes the
//! forgotten-tenant record on the write quorum, then tombstones and deletes the keys, then
//! writes an audit record.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::Utc;
use serde::Serialize;

use crate::audit::{self, AuditEvent};
use crate::catalog::rowsum::RowSetHasher;
use crate::catalog::SnapshotManifest;
use crate::config::SourceKind;
use crate::error::{Error, ErrorKind, Result};
use crate::repo::{
    layout, ForgottenTenant, Repository, TenantKeyInfo, Unreadable, FORGOTTEN_FORMAT,
};
use crate::rowsum::TableSum;
use crate::stored::blobs::ScanManifest;
use crate::stored::postgres::PostgresSnapshotDetails;
use crate::tenancy::{BlobRule, TenancyConfig};

/// What forgetting one tenant will do.
#[derive(Debug, Clone, Serialize)]
pub struct ForgetPlan {
    pub tenant: String,
    /// The keys to destroy.
    pub keys: Vec<TenantKeyInfo>,
    /// What becomes unreadable.
    pub unreadable: Unreadable,
    /// The sources whose backups hold the tenant's data.
    pub sources: Vec<String>,
    /// The tenant's row checksums per snapshot key and table.
    #[serde(skip)]
    pub table_sums: BTreeMap<String, BTreeMap<String, TableSum>>,
    /// The tenant's snapshot chunks.
    #[serde(skip)]
    pub chunks: Vec<String>,
    /// The tenant's earlier forget, if any: with no key left, there is nothing to do; with
    /// keys left (an interrupted forget, or new keys since), they are destroyed now.
    pub already: Option<ForgottenTenant>,
}

impl ForgetPlan {
    /// `tenancy`: the config's map, whose `prefix:` blob rules say which files are the
    /// tenant's (a blob source the config does not name is not looked at).
    pub async fn make(
        repo: &Repository,
        tenant: &str,
        tenancy: Option<&TenancyConfig>,
    ) -> Result<ForgetPlan> {
        let already = repo.forgotten_tenant(tenant).await?;
        let keys = repo.keys_of_tenant(tenant).await?;
        if keys.is_empty() && already.is_none() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("tenant {tenant:?} has no data key in this repository"),
            )
            .with_hint("`timevault tenant keys` lists the tenants with keys (ids are the tenant column's text, matched exactly); only tenants of postgres sources with [tenancy] tenant_keys = true have keys"));
        }
        let mut plan = ForgetPlan {
            tenant: tenant.to_string(),
            keys,
            unreadable: Unreadable::default(),
            sources: Vec::new(),
            table_sums: BTreeMap::new(),
            chunks: Vec::new(),
            already,
        };
        if !plan.keys.is_empty() {
            plan.count(repo).await?;
            if let Some(tenancy) = tenancy {
                plan.count_files(repo, tenancy).await?;
            }
        }
        Ok(plan)
    }

    /// Whether applying would change anything (a forgotten tenant with no key left: no).
    pub fn has_work(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Count the tenant's chunks in every snapshot and checksum their rows.
    async fn count(&mut self, repo: &Repository) -> Result<()> {
        let mut chunk_sums: HashMap<String, TableSum> = HashMap::new();
        let mut chains = BTreeSet::new();
        let mut sources = BTreeSet::new();
        for key in repo.list("snapshots/").await? {
            // A snapshot an earlier forget counted holds only keys that forget destroyed.
            if self
                .already
                .as_ref()
                .is_some_and(|a| a.table_sums.contains_key(&key))
            {
                continue;
            }
            let snapshot = SnapshotManifest::read(repo, &key).await?;
            if snapshot.kind != SourceKind::Postgres {
                continue;
            }
            let details: PostgresSnapshotDetails = snapshot.details()?;
            let mut sums: BTreeMap<String, TableSum> = BTreeMap::new();
            for image in &details.tables {
                let Some(tenancy) = image.tenancy.as_ref().filter(|t| t.key.is_some()) else {
                    continue;
                };
                let table = format!("{}.{}", image.schema, image.name);
                for (chunk, owner) in image.chunks.iter().zip(&tenancy.chunk_tenants) {
                    if owner.as_deref() != Some(self.tenant.as_str()) {
                        continue;
                    }
                    let sum = match chunk_sums.get(&chunk.id) {
                        Some(sum) => sum.clone(),
                        None => {
                            let mut hasher = RowSetHasher::default();
                            hasher.add_lines(&repo.read_chunk(&chunk.id).await?);
                            let sum = hasher.finish();
                            self.unreadable.chunks += 1;
                            self.unreadable.bytes += chunk.len;
                            chunk_sums.insert(chunk.id.clone(), sum.clone());
                            sum
                        }
                    };
                    let total = sums.entry(table.clone()).or_default();
                    *total = add(total, &sum)?;
                }
            }
            if !sums.is_empty() {
                self.unreadable.snapshots += 1;
                chains.insert(snapshot.key());
                sources.insert(snapshot.source.clone());
                self.table_sums.insert(snapshot.key(), sums);
            }
        }
        self.chunks = chunk_sums.into_keys().collect();
        self.chunks.sort();
        self.unreadable.chains = chains.len() as u64;
        self.sources = sources.into_iter().collect();
        Ok(())
    }

    /// Count the tenant's files in every scan of the blob sources with a `prefix:` rule: their
    /// chunks are sealed under the tenant's keys (`[tenancy] tenant_keys`).
    async fn count_files(&mut self, repo: &Repository, tenancy: &TenancyConfig) -> Result<()> {
        let mut files = BTreeSet::new();
        let mut chunks = BTreeSet::new();
        let mut sources = BTreeSet::new();
        for (source, rule) in &tenancy.blobs {
            let BlobRule::Prefix(_) = rule else {
                continue;
            };
            for key in repo.list(&layout::manifest_prefix(source)).await? {
                let scan = ScanManifest::read(repo, &key).await?;
                let mut entries = scan.entries(repo);
                while let Some(entry) = entries.next_entry().await? {
                    if rule.tenant_of(&entry.key) != Some(self.tenant.as_str()) {
                        continue;
                    }
                    sources.insert(source.clone());
                    if files.insert((source.clone(), entry.key.clone(), entry.sha256.clone())) {
                        for c in &entry.chunks {
                            if chunks.insert(c.id.clone()) {
                                self.unreadable.bytes += c.len;
                            }
                        }
                    }
                }
            }
        }
        self.unreadable.files = files.len() as u64;
        self.unreadable.chunks += chunks.len() as u64;
        self.chunks.extend(chunks);
        self.chunks.sort();
        self.chunks.dedup();
        for s in sources {
            if !self.sources.contains(&s) {
                self.sources.push(s);
            }
        }
        Ok(())
    }

    /// Destroy the keys; returns the record written and the key objects deleted.
    /// With `delete_kek`, the tenant's own KEK's deletion is then scheduled in its key service
    /// (AWS KMS or Azure Key Vault; checked before anything is destroyed).
    pub async fn apply(
        self,
        repo: &Repository,
        requested_by: Option<String>,
        reason: String,
        delete_kek: bool,
    ) -> Result<Forgot> {
        if delete_kek {
            repo.deletable_tenant_kek(&self.tenant)?;
        }
        let requested_by = audit::requester(requested_by);
        let record = ForgottenTenant {
            format: FORGOTTEN_FORMAT.into(),
            tenant: self.tenant.clone(),
            key_ids: self.keys.iter().map(|k| k.key_id.clone()).collect(),
            forgotten_at: crate::time::micros(Utc::now()),
            requested_by: requested_by.clone(),
            reason: reason.clone(),
            unreadable: self.unreadable,
            table_sums: self.table_sums,
            chunks: self.chunks,
        };
        let deleted = repo.forget_tenant(&record).await?;
        let kek_deletion = if delete_kek {
            let scheduled = repo.schedule_tenant_kek_deletion(&self.tenant).await;
            Some(scheduled.map_err(|e| {
                e.context(format!(
                    "tenant {} is forgotten (its data keys are destroyed), but scheduling its key-encryption key's deletion failed",
                    self.tenant
                ))
            })?)
        } else {
            None
        };
        audit::record(
            repo,
            AuditEvent {
                command: "tenant forget".into(),
                requested_by: Some(requested_by),
                reason: Some(reason),
                tenant: Some(self.tenant),
                sources: self.sources,
                outputs: kek_deletion.iter().cloned().collect(),
                ..AuditEvent::default()
            },
        )
        .await?;
        Ok(Forgot {
            record,
            deleted,
            kek_deletion,
        })
    }
}

/// What a forget did.
#[derive(Debug, Clone, Serialize)]
pub struct Forgot {
    #[serde(flatten)]
    pub record: ForgottenTenant,
    /// The key objects deleted on every replica.
    pub deleted: Vec<String>,
    /// `--delete-kek`: the tenant KEK's scheduled deletion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kek_deletion: Option<String>,
}

fn add(a: &TableSum, b: &TableSum) -> Result<TableSum> {
    if a.sum.is_empty() {
        return Ok(b.clone());
    }
    a.plus(b)
        .ok_or_else(|| Error::corrupt("a row checksum does not parse"))
}
