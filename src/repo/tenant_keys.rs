//! Tenants' data keys in the repository (docs/FORMAT.md §3.2): found or created on first use,
//! cached per process, and looked up by the key id an object's header carries.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{layout, Repository};
use crate::archive::{KeySet, Kind};
use crate::error::{Error, Result};
use crate::keys::role::Role;
use crate::keys::tenant::{TenantKeyRecord, FORMAT_SEALED};

/// The tenant keys this repository handle (and its clones) has read or created.
#[derive(Default)]
pub(crate) struct TenantKeyring {
    /// Every tenant key known, by the key id in object headers.
    by_id: super::data_keys::KeysById,
    /// The key each tenant's new objects are sealed under. The lock also makes one task
    /// create a tenant's key while the others wait for it.
    by_tenant: tokio::sync::Mutex<HashMap<String, KeySet>>,
    /// Key ids whose record [`Repository::learn_tenant_keys`] could not unwrap (a tenant KEK
    /// not Enabled), with why.
    locked: std::sync::RwLock<HashMap<[u8; 8], String>>,
    /// Key ids of format-3 tenant keys a backup credential cannot open, as
    /// [`Repository::learn_tenant_keys`] last listed them.
    sealed: std::sync::RwLock<std::collections::HashSet<[u8; 8]>>,
    /// Key ids of forgotten tenants, as [`Repository::learn_tenant_keys`] last read them.
    forgotten: std::sync::RwLock<std::collections::HashSet<[u8; 8]>>,
    /// When this process last looked for tenants forgotten since it cached their keys.
    forgotten_checked: std::sync::Mutex<Option<std::time::Instant>>,
}

/// A long-running process (the daemon) looks for newly forgotten tenants this often, so it
/// stops sealing under a destroyed key within a minute of `tenant forget`.
const FORGOTTEN_CHECK: std::time::Duration = std::time::Duration::from_secs(60);

impl TenantKeyring {
    /// Drop a forgotten tenant's keys from this process.
    pub(super) async fn forget(&self, tenant: &str) {
        if let Some(keys) = self.by_tenant.lock().await.remove(tenant) {
            self.by_id.remove(&keys.key_id());
        }
    }

    /// Every minute: drop the cached keys of tenants forgotten since (one listing).
    async fn drop_forgotten_if_due(&self, repo: &Repository) -> Result<()> {
        let due = {
            let mut checked = self
                .forgotten_checked
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let due = checked.is_none_or(|at| at.elapsed() >= FORGOTTEN_CHECK);
            if due {
                *checked = Some(std::time::Instant::now());
            }
            due
        };
        if !due {
            return Ok(());
        }
        let cached: Vec<String> = self.by_tenant.lock().await.keys().cloned().collect();
        if cached.is_empty() {
            return Ok(());
        }
        let handles: std::collections::HashSet<String> = repo
            .list(layout::FORGOTTEN)
            .await?
            .iter()
            .filter_map(|m| m.strip_prefix(layout::FORGOTTEN)?.split('/').next())
            .map(str::to_string)
            .collect();
        for tenant in cached {
            if handles.contains(&repo.keys.tenant_handle(&tenant)) {
                tracing::warn!(
                    tenant,
                    "the tenant was forgotten: its destroyed key is no longer used"
                );
                self.forget(&tenant).await;
            }
        }
        Ok(())
    }

    fn known(&self, id: &[u8; 8]) -> Option<KeySet> {
        self.by_id.get(id)
    }

    fn learn(&self, keys: &KeySet) {
        self.by_id.insert(keys);
    }
}

/// One tenant key as `tenant keys` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct TenantKeyInfo {
    pub tenant: String,
    pub key_id: String,
    pub created_at: DateTime<Utc>,
    pub wrapped_by: String,
    pub object: String,
}

impl TenantKeyInfo {
    fn of(record: TenantKeyRecord, object: String) -> TenantKeyInfo {
        TenantKeyInfo {
            tenant: record.tenant,
            key_id: record.key_id,
            created_at: record.created_at,
            wrapped_by: record.wrapped_by,
            object,
        }
    }
}

impl Repository {
    /// The keys `tenant`'s new objects are sealed and identified under. A credential that can
    /// open tenant keys (restore, admin) reuses the tenant's oldest key of format 3; otherwise
    /// (a backup credential, which can never open one; or a tenant without one) a new key is
    /// made and stored on the write quorum before it is used, identifying chunks with the
    /// tenant's id key, so they deduplicate with its chunks under its other keys.
    pub async fn tenant_keys(&self, tenant: &str) -> Result<KeySet> {
        self.tenant_keyring.drop_forgotten_if_due(self).await?;
        let mut by_tenant = self.tenant_keyring.by_tenant.lock().await;
        if let Some(keys) = by_tenant.get(tenant) {
            // A tenant KEK disabled meanwhile is reported; the key already held stays in use.
            Box::pin(self.check_tenant_kek(tenant)).await;
            return Ok(keys.clone());
        }
        let handle = self.keys.tenant_handle(tenant);
        // A forgotten tenant whose rows are still in the source gets a new key; a key an
        // interrupted forget left behind is never used again.
        let forgotten = self.forgotten_tenant(tenant).await?;
        if let Some(f) = &forgotten {
            tracing::warn!(tenant, forgotten_at = %f.forgotten_at, "{}, but the source still holds its data: it is backed up under a new key", f.said());
        }
        let records = self
            .tenant_records(tenant, &handle, forgotten.as_ref())
            .await?;
        let keys = match self.reusable_tenant_key(&records).await? {
            Some(keys) => keys,
            None => {
                let id_key = self.tenant_id_key(&records).await?;
                self.create_tenant_key(tenant, &handle, &id_key).await?
            }
        };
        by_tenant.insert(tenant.to_string(), keys.clone());
        Ok(keys)
    }

    /// `tenant`'s stored key records (read, not opened), oldest first; a forgotten tenant's
    /// destroyed keys left out.
    async fn tenant_records(
        &self,
        tenant: &str,
        handle: &str,
        forgotten: Option<&super::ForgottenTenant>,
    ) -> Result<Vec<(String, TenantKeyRecord)>> {
        let mut out = Vec::new();
        for object in self.list(&layout::tenant_key(handle, "")).await? {
            if forgotten.is_some_and(|f| {
                layout::tenant_key_parts(&object)
                    .is_some_and(|(_, id)| f.key_ids.iter().any(|k| k == id))
            }) {
                continue;
            }
            // Tenant key records are sealed under the repository key: no key id lookup.
            let bytes = Box::pin(self.read_object_under(&self.keys, Kind::Key, &object)).await?;
            let record = TenantKeyRecord::parse(&object, &bytes)?;
            if record.tenant != tenant {
                return Err(Error::corrupt(format!(
                    "{object}: holds the key of another tenant"
                )));
            }
            out.push((object, record));
        }
        out.sort_by_key(|(_, r)| r.created_at);
        Ok(out)
    }

    /// The oldest format-3 key, for a credential that can open it. A backup credential never
    /// reuses a key: it cannot open one, and a key it could read back would let it read what
    /// it sealed.
    async fn reusable_tenant_key(
        &self,
        records: &[(String, TenantKeyRecord)],
    ) -> Result<Option<KeySet>> {
        if self.role < Role::Restore {
            return Ok(None);
        }
        let Some((object, record)) = records.iter().find(|(_, r)| r.format == FORMAT_SEALED) else {
            return Ok(None);
        };
        let keys = self.open_tenant_record(object, record).await?;
        self.tenant_keyring.learn(&keys);
        Ok(Some(keys))
    }

    /// The chunk-id key of a tenant's new key: the one its format-3 records carry; else the one
    /// its oldest key this process can open derives (a key of format 1 or 2); else a new one.
    async fn tenant_id_key(&self, records: &[(String, TenantKeyRecord)]) -> Result<[u8; 32]> {
        for (object, record) in records {
            // A damaged id key is corruption: a guessed one would split the tenant's chunks.
            if let Some(id_key) = record.id_key(object)? {
                return Ok(id_key);
            }
        }
        for (object, record) in records {
            match self.open_tenant_record(object, record).await {
                Ok(keys) => return Ok(keys.chunk_id_key()),
                Err(e) => {
                    tracing::warn!(object = %object, error = %e, "a tenant's older key cannot be opened here: its new key identifies chunks anew (they do not deduplicate with that key's)")
                }
            }
        }
        let mut fresh = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut fresh);
        Ok(fresh)
    }

    async fn create_tenant_key(
        &self,
        tenant: &str,
        handle: &str,
        id_key: &[u8; 32],
    ) -> Result<KeySet> {
        let (key, keys, mut record) =
            TenantKeyRecord::generate_sealed(tenant, id_key, &self.content)?;
        if let Some(wrapped) = Box::pin(self.wrap_tenant_key(tenant, handle, &key)).await? {
            record = record.wrapped_by_kek(wrapped);
        }
        let object = layout::tenant_key(handle, &record.key_id);
        let json = serde_json::to_vec(&record).expect("tenant key serializes");
        self.store_object(Kind::Key, &object, json).await?;
        tracing::info!(tenant, key_id = %record.key_id, wrapped_by = %record.wrapped_by, "created the tenant's data key");
        self.tenant_keyring.learn(&keys);
        Ok(keys)
    }

    async fn read_tenant_key(&self, object: &str) -> Result<(TenantKeyRecord, KeySet)> {
        // Tenant key records are sealed under the repository key: no key id lookup.
        let bytes = Box::pin(self.read_object_under(&self.keys, Kind::Key, object)).await?;
        let record = TenantKeyRecord::parse(object, &bytes)?;
        let keys = self.open_tenant_record(object, &record).await?;
        Ok((record, keys))
    }

    /// The keys a record holds: its own key (format 1), sealed to the content identity (format
    /// 3: the restore role), or wrapped by the tenant's KEK.
    pub(super) async fn open_tenant_record(
        &self,
        object: &str,
        record: &TenantKeyRecord,
    ) -> Result<KeySet> {
        let key = if let Some(key) = record.local_key(object)? {
            key
        } else if let Some(key) = record.sealed_key(object, &self.content, self.role)? {
            key
        } else if let Some(wrapped) = &record.wrapped {
            // Boxed: the key services' futures are deep, and this sits under every read.
            Box::pin(self.unwrap_tenant_key(object, record, wrapped)).await?
        } else {
            unreachable!("parse checked that a record holds a key")
        };
        record.keys_of(object, &key)
    }

    /// The keys for the key id in an object's header: the repository's, a tenant's (read on a
    /// miss), else the repository's, so that opening reports the unknown id as corruption.
    pub(crate) async fn keys_for_id(&self, id: [u8; 8]) -> Result<KeySet> {
        if id == self.keys.key_id() {
            return Ok(self.keys.clone());
        }
        if let Some(keys) = self.tenant_keyring.known(&id) {
            return Ok(keys);
        }
        if let Some(keys) = self.data_keys_for_id(id).await? {
            return Ok(keys);
        }
        let wanted = hex::encode(id);
        for object in self.list(layout::TENANT_KEYS).await? {
            if layout::tenant_key_parts(&object).is_some_and(|(_, id)| id == wanted) {
                let (_, keys) = self.read_tenant_key(&object).await?;
                self.tenant_keyring.learn(&keys);
                return Ok(keys);
            }
        }
        Ok(self.keys.clone())
    }

    /// The keys for an id without any I/O (verify, after [`Repository::load_tenant_keys`]).
    pub(crate) fn known_keys_for_id(&self, id: [u8; 8]) -> KeySet {
        if id == self.keys.key_id() {
            return self.keys.clone();
        }
        self.tenant_keyring
            .known(&id)
            .or_else(|| self.known_data_keys(&id))
            .unwrap_or_else(|| self.keys.clone())
    }

    /// Learn every tenant key not known yet (one listing; a read per new key), and which key
    /// ids belong to forgotten tenants: what `verify` and `replicas sync` need before
    /// authenticating objects without I/O.
    pub async fn learn_tenant_keys(&self) -> Result<()> {
        let forgotten = self.forgotten().await?;
        *self
            .tenant_keyring
            .forgotten
            .write()
            .unwrap_or_else(|p| p.into_inner()) = forgotten.key_ids().collect();
        for object in self.list(layout::TENANT_KEYS).await? {
            let Some(id) = layout::tenant_key_parts(&object)
                .and_then(|(_, id)| hex::decode(id).ok())
                .and_then(|id| <[u8; 8]>::try_from(id.as_slice()).ok())
            else {
                continue;
            };
            if self.tenant_keyring.known(&id).is_some() {
                continue;
            }
            // Tenant key records are sealed under the repository key: no key id lookup.
            let bytes = Box::pin(self.read_object_under(&self.keys, Kind::Key, &object)).await?;
            let record = TenantKeyRecord::parse(&object, &bytes)?;
            if self.role < Role::Restore && record.format != crate::keys::tenant::FORMAT {
                // A backup credential opens no content key (it never asks a tenant's KEK to
                // decrypt here): such a tenant's objects are checked as far as their headers
                // (verify: sealed). A format-1 record is readable with the repository key.
                self.tenant_keyring
                    .sealed
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id);
                continue;
            }
            match self.open_tenant_record(&object, &record).await {
                Ok(keys) => self.tenant_keyring.learn(&keys),
                // A tenant KEK disabled in the customer's key service: the tenant's objects
                // cannot be authenticated now; everything else can.
                Err(e) if e.kind() == crate::ErrorKind::Key => {
                    tracing::warn!(object = %object, error = %e, "a tenant's data key cannot be unwrapped now");
                    self.tenant_keyring
                        .locked
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id, e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The ids of `tenant`'s keys, from one listing (no key is read).
    pub(crate) async fn tenant_key_ids(&self, tenant: &str) -> Result<Vec<[u8; 8]>> {
        let handle = self.keys.tenant_handle(tenant);
        Ok(self
            .list(&layout::tenant_key(&handle, ""))
            .await?
            .iter()
            .filter_map(|o| layout::tenant_key_parts(o))
            .filter_map(|(_, id)| <[u8; 8]>::try_from(hex::decode(id).ok()?.as_slice()).ok())
            .collect())
    }

    /// `tenant`'s keys (one listing, a read per key), oldest first.
    pub async fn keys_of_tenant(&self, tenant: &str) -> Result<Vec<TenantKeyInfo>> {
        let handle = self.keys.tenant_handle(tenant);
        let mut out = Vec::new();
        for object in self.list(&layout::tenant_key(&handle, "")).await? {
            let (record, keys) = self.read_tenant_key(&object).await?;
            if record.tenant != tenant {
                return Err(Error::corrupt(format!(
                    "{object}: holds the key of another tenant"
                )));
            }
            self.tenant_keyring.learn(&keys);
            out.push(TenantKeyInfo::of(record, object));
        }
        out.sort_by_key(|k| k.created_at);
        Ok(out)
    }

    /// Read every tenant key in the repository; the records, sorted by tenant and date.
    pub async fn load_tenant_keys(&self) -> Result<Vec<TenantKeyInfo>> {
        let mut out = Vec::new();
        for object in self.list(layout::TENANT_KEYS).await? {
            if layout::tenant_key_parts(&object).is_none() {
                continue;
            }
            let (record, keys) = self.read_tenant_key(&object).await?;
            self.tenant_keyring.learn(&keys);
            out.push(TenantKeyInfo::of(record, object));
        }
        out.sort_by(|a, b| (&a.tenant, a.created_at).cmp(&(&b.tenant, b.created_at)));
        Ok(out)
    }
}

impl Repository {
    /// Why `bytes` cannot be authenticated now: sealed under a tenant key whose KEK is not
    /// usable (known after [`Repository::learn_tenant_keys`]).
    pub(crate) fn sealed_under_locked_key(&self, key: &str, bytes: &[u8]) -> Option<String> {
        let kind = layout::kind_of(key)?;
        let id = header_key_id(bytes, kind)?;
        self.tenant_keyring
            .locked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|why| format!("sealed under a tenant key that cannot be unwrapped now: {why}"))
    }

    /// Whether `bytes` (the object `key`) are sealed under a forgotten tenant's destroyed key
    /// (known after [`Repository::learn_tenant_keys`]).
    pub(crate) fn sealed_under_forgotten_key(&self, key: &str, bytes: &[u8]) -> bool {
        let Some(kind) = layout::kind_of(key) else {
            return false;
        };
        header_key_id(bytes, kind).is_some_and(|id| {
            self.tenant_keyring
                .forgotten
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&id)
        })
    }
}

/// The key id a framed object's header names, when the header parses as a `kind` object (a
/// header that does not is left to `archive::open` to report).
pub(crate) fn header_key_id(bytes: &[u8], kind: Kind) -> Option<[u8; 8]> {
    crate::archive::Header::parse(bytes, kind)
        .ok()
        .map(|h| h.key_id)
}

impl Repository {
    /// Whether `id` is a tenant key's that this credential cannot open (known after
    /// [`Repository::learn_tenant_keys`]).
    pub(crate) fn is_sealed_tenant_key(&self, id: &[u8; 8]) -> bool {
        self.tenant_keyring
            .sealed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// Whether `id` is a tenant key's, opened, sealed or locked (known after
    /// [`Repository::learn_tenant_keys`]).
    pub(crate) fn is_tenant_key(&self, id: &[u8; 8]) -> bool {
        self.tenant_keyring.known(id).is_some()
            || self.is_sealed_tenant_key(id)
            || self
                .tenant_keyring
                .locked
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(id)
    }
}
