//! Tenants' own key-encryption keys (`[tenancy.keys]`, a customer-managed key in AWS KMS or
//! Azure Key Vault; docs/FORMAT.md §3.2): a tenant's data key is wrapped by it instead of the
//! repository key, bound to the repository and the tenant.
//!
//! A process unwraps each tenant key once (the KEK's state checked first, as for repository
//! KEKs). While it runs, the KEK's state is asked again at most every `kek_check_interval`: a
//! KEK that is no longer Enabled is reported (`/healthz`, `/metrics`, the log) while the tenant's
//! new data keeps being sealed under the data key this process already holds. That loses
//! nothing (the change stream is one ordered slot; skipping the tenant's rows would lose them)
//! and gives nobody access the customer revoked: what is sealed can only be unwrapped again
//! through the customer's KEK. A process that starts while the KEK is disabled cannot unwrap
//! the key: its reads and captures of that tenant fail, naming the KEK's state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use super::{layout, Repository};
use crate::archive::{Kind, MasterKey};
use crate::error::{Error, ErrorKind, Result};
use crate::keys::tenant::{self, binding, TenantKeyRecord, WRAPPED_BY_REPOSITORY};
use crate::keys::{Kek, KekState, KekUri, WrappedKey};
use base64::Engine;

/// The tenant KEKs a config names, their clients, and what this process last saw of them.
#[derive(Default)]
pub(crate) struct TenantKeks {
    /// Tenant → its KEK.
    uris: BTreeMap<String, KekUri>,
    /// KEK label → client (one per process).
    clients: tokio::sync::Mutex<HashMap<String, Arc<Kek>>>,
    /// Tenant → `None` (its KEK was Enabled at the last check) or why it is not usable.
    seen: std::sync::Mutex<BTreeMap<String, Option<String>>>,
}

impl TenantKeks {
    pub(crate) fn new(uris: BTreeMap<String, KekUri>) -> TenantKeks {
        TenantKeks {
            uris,
            ..TenantKeks::default()
        }
    }

    fn note(&self, tenant: &str, problem: Option<String>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let before = seen.insert(tenant.to_string(), problem.clone());
        if before.as_ref() != Some(&problem) {
            match &problem {
                Some(why) => {
                    tracing::error!(tenant, problem = %why, "the tenant's key-encryption key is not usable: its new data stays sealed under the data key this process holds, which only that KEK can unwrap again")
                }
                None if before.flatten().is_some() => {
                    tracing::info!(tenant, "the tenant's key-encryption key is usable again")
                }
                None => {}
            }
        }
    }
}

impl Repository {
    /// The tenant's own KEK, if the config names one.
    pub(crate) fn tenant_kek_uri(&self, tenant: &str) -> Option<&KekUri> {
        self.tenant_keks.uris.get(tenant)
    }

    /// What this process last saw of each tenant KEK it used: `None` when Enabled, else why not.
    pub fn tenant_kek_states(&self) -> BTreeMap<String, Option<String>> {
        self.tenant_keks
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn tenant_kek_client(&self, uri: &KekUri) -> Arc<Kek> {
        let label = uri.to_string();
        let mut clients = self.tenant_keks.clients.lock().await;
        if let Some(kek) = clients.get(&label) {
            return kek.clone();
        }
        let kek = Arc::new(Kek::remote(uri).await);
        clients.insert(label, kek.clone());
        kek
    }

    /// Ask (at most every `kek_check_interval`) whether the tenant's KEK is still Enabled, and
    /// note the answer. A tenant without a KEK of its own: nothing to do.
    pub(crate) async fn check_tenant_kek(&self, tenant: &str) {
        let Some(uri) = self.tenant_kek_uri(tenant).cloned() else {
            return;
        };
        let kek = self.tenant_kek_client(&uri).await;
        let problem = match kek.state().await {
            KekState::Enabled | KekState::Local => None,
            state => Some(format!("{uri}: key state is {state}")),
        };
        self.tenant_keks.note(tenant, problem);
    }

    /// Check every configured tenant KEK (each asked at most every `kek_check_interval`): a
    /// daemon reports a disabled one even while its tenant writes nothing.
    pub async fn check_tenant_keks(&self) {
        let tenants: Vec<String> = self.tenant_keks.uris.keys().cloned().collect();
        for tenant in tenants {
            Box::pin(self.check_tenant_kek(&tenant)).await;
        }
    }

    /// Schedule the deletion of the tenant's own KEK (`tenant forget --delete-kek`); what was
    /// done. Refused when the config names no KEK for the tenant.
    pub(crate) async fn schedule_tenant_kek_deletion(&self, tenant: &str) -> Result<String> {
        let uri = self.deletable_tenant_kek(tenant)?.clone();
        let kek = self.tenant_kek_client(&uri).await;
        kek.schedule_deletion().await
    }

    /// The tenant's own KEK, which `--delete-kek` deletes; refused when the config names none
    /// (checked before a forget destroys anything).
    pub(crate) fn deletable_tenant_kek(&self, tenant: &str) -> Result<&KekUri> {
        self.tenant_kek_uri(tenant).ok_or_else(|| {
            Error::input(format!(
                "--delete-kek: [tenancy.keys] names no key-encryption key for tenant {tenant}"
            ))
            .with_hint("leave out --delete-kek: the tenant's data keys are wrapped by the repository key and are destroyed all the same")
        })
    }

    /// Wrap a new tenant key under the tenant's KEK, bound to this repository and the tenant.
    pub(crate) async fn wrap_tenant_key(
        &self,
        tenant: &str,
        handle: &str,
        key: &MasterKey,
    ) -> Result<Option<WrappedKey>> {
        let Some(uri) = self.tenant_kek_uri(tenant).cloned() else {
            return Ok(None);
        };
        let kek = self.tenant_kek_client(&uri).await;
        let wrapped = kek.wrap(&binding(self.id(), handle), key).await;
        self.note_outcome(tenant, &wrapped);
        let (_, wrapped) = wrapped.map_err(|e| e.context(format!("tenant {tenant}'s new key")))?;
        Ok(Some(wrapped))
    }

    /// The key of a record wrapped by a tenant KEK: the config must name that KEK for the
    /// tenant, and the KEK must be Enabled.
    pub(crate) async fn unwrap_tenant_key(
        &self,
        object: &str,
        record: &TenantKeyRecord,
        wrapped: &WrappedKey,
    ) -> Result<MasterKey> {
        let tenant = record.tenant.as_str();
        let uri = self
            .tenant_kek_uri(tenant)
            .filter(|u| u.to_string() == record.wrapped_by)
            .cloned()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Key,
                    format!(
                        "tenant {tenant}'s data key is wrapped by {}, which [tenancy.keys] does not name for it",
                        record.wrapped_by
                    ),
                )
                .with_hint(format!(
                    "add \"{tenant}\" = \"{}\" under [tenancy.keys]",
                    record.wrapped_by
                ))
            })?;
        let kek = self.tenant_kek_client(&uri).await;
        let handle = self.keys.tenant_handle(tenant);
        let key = kek
            .unwrap_record(object, wrapped, &binding(self.id(), &handle))
            .await;
        self.note_outcome(tenant, &key);
        key.map_err(|e| e.context(format!("tenant {tenant}'s data key")))
    }

    fn note_outcome<T>(&self, tenant: &str, outcome: &Result<T>) {
        let problem = match outcome {
            Ok(_) => None,
            Err(e) if e.kind() == ErrorKind::Key || e.kind() == ErrorKind::Unavailable => {
                Some(e.to_string())
            }
            Err(_) => return,
        };
        self.tenant_keks.note(tenant, problem);
    }
}

/// A tenant key that `keys rotate` wrapped anew, so that what wraps it is what
/// `[tenancy.keys]` names for its tenant now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RewrappedTenantKey {
    pub tenant: String,
    pub key_id: String,
    pub object: String,
    /// What wrapped it (a KEK's label, or `repository`).
    pub from: String,
    /// What wraps it now.
    pub to: String,
}

impl Repository {
    /// Wrap every tenant key whose wrapping is not what the config names for its tenant now:
    /// under the tenant's new KEK (a customer's key replaced, or a customer key added), or
    /// sealed to the content identity (its entry left `[tenancy.keys]`, or a record of format
    /// 1, which a backup credential could read). The old wrapping opens it (a KEK is asked
    /// through the record's own label, which the record's encryption under the repository key
    /// authenticates), so the old KEK must still be usable. No data is rewritten: the key
    /// stays the same, only its record is replaced, on every replica (each must be reachable).
    pub async fn rewrap_tenant_keys(&self) -> Result<Vec<RewrappedTenantKey>> {
        let forgotten: HashSet<[u8; 8]> = self.forgotten().await?.key_ids().collect();
        let mut out = Vec::new();
        for object in self.list(layout::TENANT_KEYS).await? {
            let Some((handle, id)) = layout::tenant_key_parts(&object) else {
                continue;
            };
            let destroyed = <[u8; 8]>::try_from(hex::decode(id).unwrap_or_default().as_slice())
                .is_ok_and(|id| forgotten.contains(&id));
            if destroyed {
                continue;
            }
            let bytes = Box::pin(self.read_object_under(&self.keys, Kind::Key, &object)).await?;
            let record = TenantKeyRecord::parse(&object, &bytes)?;
            let wanted = self
                .tenant_kek_uri(&record.tenant)
                .map_or_else(|| WRAPPED_BY_REPOSITORY.to_string(), |u| u.to_string());
            // Records of format 1 hold their key under the repository key, which a backup
            // credential holds too: they are sealed to the content identity (format 3).
            if record.wrapped_by == wanted && record.format != tenant::FORMAT {
                continue;
            }
            let key = self.key_of_record(&object, &record).await?;
            let keys = record.keys_of(&object, &key)?;
            let mut fresh = record.clone();
            fresh.id_key =
                Some(base64::engine::general_purpose::STANDARD.encode(keys.chunk_id_key()));
            let rewrapped =
                match Box::pin(self.wrap_tenant_key(&record.tenant, handle, &key)).await? {
                    Some(wrapped) => fresh.wrapped_by_kek(wrapped),
                    None => fresh.sealed_to(&key, &self.content)?,
                };
            let json = serde_json::to_vec(&rewrapped).expect("tenant key serializes");
            self.overwrite_everywhere(Kind::Key, &object, json).await?;
            tracing::info!(tenant = %record.tenant, key_id = %record.key_id, from = %record.wrapped_by, to = %rewrapped.wrapped_by, "wrapped the tenant's data key anew");
            out.push(RewrappedTenantKey {
                tenant: record.tenant.clone(),
                key_id: record.key_id.clone(),
                object,
                from: record.wrapped_by,
                to: rewrapped.wrapped_by,
            });
        }
        Ok(out)
    }

    /// The key a record holds: its own (format 1), sealed to the content identity (format 3),
    /// or unwrapped by the KEK it names.
    async fn key_of_record(&self, object: &str, record: &TenantKeyRecord) -> Result<MasterKey> {
        if let Some(key) = record.local_key(object)? {
            return Ok(key);
        }
        if let Some(key) = record.sealed_key(object, &self.content, self.role)? {
            return Ok(key);
        }
        let wrapped = record
            .wrapped
            .as_ref()
            .expect("parse checked: format 2 holds `wrapped`");
        let uri = KekUri::parse(&record.wrapped_by).map_err(|e| {
            Error::corrupt(format!("{object}: wrapped by {:?}: {e}", record.wrapped_by))
        })?;
        let kek = self.tenant_kek_client(&uri).await;
        let handle = self.keys.tenant_handle(&record.tenant);
        let key = kek
            .unwrap_record(object, wrapped, &binding(self.id(), &handle))
            .await;
        self.note_outcome(&record.tenant, &key);
        key.map_err(|e| {
            e.context(format!(
                "tenant {}'s data key, wrapped by {} (it must stay usable until `keys rotate` has wrapped the key anew)",
                record.tenant, record.wrapped_by
            ))
        })
    }
}
