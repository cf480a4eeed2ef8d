//! This process's content data key, and the data keys it has opened (docs/FORMAT.md §3.4).
//!
//! Content (rows, pages, change records, file content, schema images) is sealed under a data
//! key made by the writing process and sealed to the content identity; metadata (manifests,
//! catalog, leases, blob listings) stays under the repository key, which every role holds.

use std::collections::HashMap;

use super::{layout, Repository};
use crate::archive::{KeySet, Kind};
use crate::error::{ErrorKind, Result};
use crate::keys::data::DataKeyRecord;
use crate::keys::role::Role;

/// The data key new content is sealed under (made on first use) and every data key opened.
#[derive(Default)]
pub(crate) struct DataKeyring {
    /// The lock also makes one task create the key while the others wait for it.
    current: tokio::sync::Mutex<Option<KeySet>>,
    by_id: KeysById,
    /// Data key ids this credential cannot open (the backup role), as
    /// [`Repository::learn_data_keys`] last listed them.
    unopened: std::sync::RwLock<std::collections::HashSet<[u8; 8]>>,
}

/// Keys by the key id object headers carry, shared by a handle's clones.
#[derive(Default)]
pub(crate) struct KeysById(std::sync::RwLock<HashMap<[u8; 8], KeySet>>);

impl KeysById {
    pub(crate) fn get(&self, id: &[u8; 8]) -> Option<KeySet> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    pub(crate) fn insert(&self, keys: &KeySet) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(keys.key_id(), keys.clone());
    }

    pub(crate) fn remove(&self, id: &[u8; 8]) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

impl DataKeyring {
    fn known(&self, id: &[u8; 8]) -> Option<KeySet> {
        self.by_id.get(id)
    }

    fn learn(&self, keys: &KeySet) {
        self.by_id.insert(keys);
    }
}

impl Repository {
    /// The role this handle's credential holds.
    pub fn role(&self) -> Role {
        self.role
    }

    /// `Ok` when this handle's credential holds `needed` (or more), else the role error
    /// naming `what` (exit 3), before anything is read or written.
    pub fn require(&self, needed: Role, what: &str) -> Result<()> {
        self.role.require(needed, what)
    }

    /// The age recipient content data keys are sealed to (`keys show`).
    pub fn content_recipient(&self) -> String {
        self.content.recipient()
    }

    /// The keys new content objects are sealed under: this process's data key (its record
    /// stored on the write quorum before it is first returned), identifying chunks as the
    /// repository key does.
    pub(crate) async fn content_keys(&self) -> Result<KeySet> {
        let mut current = self.data_keyring.current.lock().await;
        if let Some(keys) = current.as_ref() {
            return Ok(keys.clone());
        }
        let (keys, record) = DataKeyRecord::generate(&self.content, &self.keys)?;
        let object = layout::data_key(&record.key_id);
        let json = serde_json::to_vec(&record).expect("data key serializes");
        self.store_object(Kind::Key, &object, json).await?;
        tracing::debug!(key_id = %record.key_id, "made this process's content data key");
        self.data_keyring.learn(&keys);
        *current = Some(keys.clone());
        Ok(keys)
    }

    /// The data key whose id an object's header names, opened with the content identity
    /// (`None`: no data key has that id). A credential without the content identity (the
    /// backup role) gets the role error, never a decryption error.
    pub(crate) async fn data_keys_for_id(&self, id: [u8; 8]) -> Result<Option<KeySet>> {
        if let Some(keys) = self.data_keyring.known(&id) {
            return Ok(Some(keys));
        }
        let object = layout::data_key(&hex::encode(id));
        let bytes = match Box::pin(self.read_object_under(&self.keys, Kind::Key, &object)).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let record = DataKeyRecord::parse(&object, &bytes)?;
        let keys = record.open(&object, &self.content, &self.keys, self.role)?;
        self.data_keyring.learn(&keys);
        Ok(Some(keys))
    }

    /// The data key ids that are known without I/O (verify, after
    /// [`Repository::learn_data_keys`]).
    pub(crate) fn known_data_keys(&self, id: &[u8; 8]) -> Option<KeySet> {
        self.data_keyring.known(id)
    }

    /// Open every data key not known yet (one listing, a read per new key): what `verify` and
    /// `replicas sync` need before authenticating content without I/O. A credential without
    /// the content identity notes their ids instead (its verify reports their objects as
    /// sealed).
    pub async fn learn_data_keys(&self) -> Result<()> {
        for object in self.list(layout::DATA_KEYS).await? {
            let Some(id) = object
                .strip_prefix(layout::DATA_KEYS)
                .and_then(|id| hex::decode(id).ok())
                .and_then(|id| <[u8; 8]>::try_from(id.as_slice()).ok())
            else {
                continue;
            };
            if self.data_keyring.known(&id).is_some() {
                continue;
            }
            if !self.content.can_open() {
                self.data_keyring
                    .unopened
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id);
                continue;
            }
            self.data_keys_for_id(id).await?;
        }
        Ok(())
    }

    /// Whether `id` is a data key this credential cannot open (known after
    /// [`Repository::learn_data_keys`]).
    pub(crate) fn is_unopened_data_key(&self, id: &[u8; 8]) -> bool {
        self.data_keyring
            .unopened
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// Whether `id` is a data key's (known after [`Repository::learn_data_keys`]).
    pub(crate) fn is_data_key(&self, id: &[u8; 8]) -> bool {
        self.data_keyring.known(id).is_some() || self.is_unopened_data_key(id)
    }
}
