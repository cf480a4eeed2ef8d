//! The repository: where backups live. One logical store of encrypted objects, mirrored on
//! every replica, opened with one key.
//!
//! Everything above this module (sources, catalog, restore, export) reads and writes typed
//! objects through [`Repository`]; nothing else touches object_store or the archive format.
//! Objects are written once (create-only), acknowledged at the write quorum, and read with
//! per-object failover: a copy that is missing, unreachable or fails authentication on one
//! replica is read from the next.

mod chunks;
mod claim;
mod data_keys;
mod forgotten;
mod gc;
mod header;
mod key_copies;
pub mod layout;
mod lease;
mod open;
pub mod replica;
mod replica_set;
pub mod store;
mod stream;
mod sync;
mod tenant_keks;
mod tenant_keys;
mod tombstone;
mod verify;

use bytes::Bytes;

use crate::archive::{self, Codec, KeySet, Kind, MasterKey, SealOptions};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};

pub use chunks::{
    chunk_bytes_put, chunk_bytes_read, chunk_bytes_uploaded, ChunkWrite, IdentifiedChunk,
};
pub use claim::{ClaimRecord, Claims, LiveClaim, ReadPurpose, CLAIM_TTL};
pub use forgotten::{Forgotten, ForgottenTenant, Unreadable, FORGOTTEN_FORMAT};
pub use gc::{ChunkMark, Sweep, SweepToken, DELETE_WINDOW, STALE_SWEEP};
pub use header::RepoHeader;
pub use key_copies::{KeyCopy, KeysReport, RotateSummary};
pub use lease::{source_lease_scope, Lease, LeaseRecord};
pub use open::configured_keks;
pub use replica::{replica_bytes_read, Replica, ReplicaHealth, RetryPolicy};
pub use replica_set::{objects_written, ReplicaSet, WriteReceipt};
pub use stream::{ChunkList, ChunkRef, ChunkedWriter, DEFAULT_CHUNK};
pub use sync::{SyncOptions, SyncSummary};
pub use tenant_keks::RewrappedTenantKey;
pub use tenant_keys::TenantKeyInfo;
pub use tombstone::Tombstone;
pub use verify::{ReplicaReport, VerifyOptions, VerifyReport};

/// An open repository: the key, the replica set and the settings that shape every write.
/// Cloning is cheap and shares the replicas and the chunk index (a chunk put runs as its own task).
#[derive(Clone)]
pub struct Repository {
    /// The metadata keys: every object but content is sealed under them; chunk ids.
    keys: KeySet,
    /// The key `keys` derive from, kept to wrap it under a new KEK (`keys rotate`); `None` for
    /// a role credential.
    data_key: Option<std::sync::Arc<MasterKey>>,
    /// What the credential that opened the repository may do.
    role: crate::keys::role::Role,
    /// The content identity as this role holds it (a backup credential: the public half).
    content: std::sync::Arc<crate::keys::role::ContentKeys>,
    /// This process's content data key and the data keys opened so far (shared by clones).
    data_keyring: std::sync::Arc<data_keys::DataKeyring>,
    /// What opened the repository: `local key` (format 1) or the KEK that unwrapped the data key.
    opened_by: String,
    /// Tenants' data keys read or created so far (shared by clones).
    tenant_keyring: std::sync::Arc<tenant_keys::TenantKeyring>,
    /// `[tenancy] tenant_keys`: a tenant's snapshot chunks are sealed under its own key.
    tenant_keys_enabled: bool,
    /// `[tenancy.keys]`: tenants whose key is wrapped by a KEK of their own.
    tenant_keks: std::sync::Arc<tenant_keks::TenantKeks>,
    header: RepoHeader,
    replicas: ReplicaSet,
    level: i32,
    lease_ttl: std::time::Duration,
    chunk_index: std::sync::Arc<chunks::ChunkIndex>,
    /// The leases this handle (and its clones) holds, with when each expires: a manifest of a
    /// source is written only under its live lease (`lease::Fence`).
    fence: lease::Fence,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Repository({})", self.header.repository_id)
    }
}

/// What `init` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InitSummary {
    pub repository_id: String,
    /// False when the repository already existed with this key (init was a no-op, apart from
    /// writing the config object to replicas that lacked it).
    pub created: bool,
    pub key_generated: bool,
    /// Replicas that received the config object in this call.
    pub replicas_written: Vec<String>,
}

/// Build the replica set a config describes.
pub fn replica_set(config: &Config, retry: RetryPolicy) -> Result<ReplicaSet> {
    let replicas = config
        .replicas
        .iter()
        .map(|r| {
            let store = store::open_store(&r.url, &r.options)
                .map_err(|e| e.context(format!("replica {}", r.name)))?;
            Ok(Replica::new(&r.name, &r.region, store).with_retry(retry))
        })
        .collect::<Result<Vec<_>>>()?;
    let quorum = config.repository.write_quorum.required(replicas.len());
    Ok(ReplicaSet::new(replicas, quorum))
}

impl Repository {
    /// `timevault init`: create the repository on every replica, or confirm it exists with
    /// this key and fill in replicas that lack the config object.
    pub async fn init(config: &Config) -> Result<InitSummary> {
        let replicas = replica_set(config, RetryPolicy::default())?;
        let (found, missing) = open::read_headers(&replicas, true).await?;
        if let Some(first) = found.first() {
            if let Some(other) = found
                .iter()
                .find(|f| f.header.repository_id != first.header.repository_id)
            {
                return Err(Error::corrupt(format!(
                    "replicas {} and {} hold different repositories ({} and {})",
                    replicas.replicas()[first.replica].name(),
                    replicas.replicas()[other.replica].name(),
                    first.header.repository_id,
                    other.header.repository_id
                ))
                .with_hint("each replica of one config must hold the same repository: empty the wrong one or fix its url"));
            }
            crate::keys::set_state_ttl(config.repository.kek_check_interval);
            let proven = open::prove(&config.repository, &replicas, &found).await?;
            let receipt = replicas
                .put(
                    layout::CONFIG,
                    proven.found.bytes.clone(),
                    &missing,
                    found.len(),
                )
                .await?;
            // Replicas that lacked the config lack the wrapped keys too.
            for copy in open::read_copies(&replicas).await? {
                let bytes = Bytes::from(copy.key.to_bytes(&proven.keys));
                replicas
                    .put(&copy.object, bytes, &missing, found.len())
                    .await?;
            }
            return Ok(InitSummary {
                repository_id: proven.found.header.repository_id.clone(),
                created: false,
                key_generated: false,
                replicas_written: receipt.stored,
            });
        }
        let (header, keys, key_generated) = match &config.repository.key {
            Some(local) if config.repository.kek.is_empty() => {
                let (key, kdf, key_generated) = open::new_key(local)?;
                let keys = key.derive();
                (RepoHeader::new(&keys, kdf), keys, key_generated)
            }
            _ => {
                let (_, keys, header, copies, key_generated) =
                    open::new_envelope(&config.repository).await?;
                // Every copy is on every replica before the config that makes them needed.
                for (object, bytes) in copies {
                    replicas
                        .with_quorum(usize::MAX)
                        .put_all(&object, bytes)
                        .await?;
                }
                (header, keys, key_generated)
            }
        };
        let bytes = Bytes::from(header.to_bytes(&keys));
        // A new repository exists on every replica or on none.
        let receipt = replicas
            .with_quorum(usize::MAX)
            .put_all(layout::CONFIG, bytes)
            .await?;
        Ok(InitSummary {
            repository_id: header.repository_id,
            created: true,
            key_generated,
            replicas_written: receipt.stored,
        })
    }

    /// Open an existing repository: find its config on the first replica that has a readable
    /// copy, load the key, prove it.
    pub async fn open(config: &Config) -> Result<Repository> {
        Self::open_with(config, None, RetryPolicy::default()).await
    }

    /// Open, optionally restricted to one replica (recovery at another site).
    pub async fn open_with(
        config: &Config,
        only_replica: Option<&str>,
        retry: RetryPolicy,
    ) -> Result<Repository> {
        let mut replicas = match only_replica {
            // Only the named replica's store is built: the others' credentials may be gone
            // with their site.
            Some(name) => {
                let mut only = config.clone();
                only.replicas.retain(|r| r.name == name);
                if only.replicas.is_empty() {
                    let known: Vec<_> = config.replicas.iter().map(|r| r.name.as_str()).collect();
                    return Err(Error::input(format!("unknown replica {name:?}"))
                        .with_hint(format!("configured replicas: {}", known.join(", "))));
                }
                replica_set(&only, retry)?
            }
            None => replica_set(config, retry)?,
        };
        if let Some(name) = only_replica {
            replicas = replicas.only(name)?;
        }
        let (found, _) = open::read_headers(&replicas, false).await?;
        if found.is_empty() {
            let names: Vec<_> = replicas.replicas().iter().map(|r| r.name()).collect();
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no timevault repository on replicas {}", names.join(", ")),
            )
            .with_hint("run `timevault init` to create it"));
        }
        crate::keys::set_state_ttl(config.repository.kek_check_interval);
        let proven = open::prove(&config.repository, &replicas, &found).await?;
        let header = proven.found.header.clone();
        Ok(Repository {
            keys: proven.keys,
            data_key: proven.data_key.map(std::sync::Arc::new),
            role: proven.role,
            content: std::sync::Arc::new(proven.content),
            data_keyring: Default::default(),
            opened_by: proven.opened_by,
            tenant_keyring: Default::default(),
            tenant_keys_enabled: config.tenancy.as_ref().is_some_and(|t| t.tenant_keys),
            tenant_keks: std::sync::Arc::new(tenant_keks::TenantKeks::new(
                config
                    .tenancy
                    .as_ref()
                    .map(|t| t.keys.clone())
                    .unwrap_or_default(),
            )),
            header,
            level: config.repository.compression_level,
            lease_ttl: config.repository.lease_ttl,
            chunk_index: std::sync::Arc::new(chunks::ChunkIndex::new(
                replicas.replicas().len(),
                config.retention.chunk_grace / 2,
            )),
            replicas,
            fence: lease::Fence::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.header.repository_id
    }

    pub fn header(&self) -> &RepoHeader {
        &self.header
    }

    pub fn replicas(&self) -> &ReplicaSet {
        &self.replicas
    }

    /// How often a lease holder renews (and so publishes its lease note): `lease_ttl / 3`,
    /// plus a little for the write itself.
    pub fn lease_renewal_interval(&self) -> std::time::Duration {
        self.lease_ttl / 3 + std::time::Duration::from_secs(2)
    }

    /// The epoch of the source lease this handle holds for `source` (stamped into the keys of
    /// the change-log segments it writes); `None` when it holds none (a library caller, tests).
    pub fn lease_epoch(&self, source: &str) -> Option<u64> {
        self.fence.epoch(&lease::source_lease_scope(source))
    }

    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    /// Whether a tenant's snapshot chunks are sealed under its own key (`[tenancy] tenant_keys`).
    pub fn tenant_keys_enabled(&self) -> bool {
        self.tenant_keys_enabled
    }

    /// The data key itself: the admin role's (`what` names the command in the role error).
    pub(crate) fn data_key(&self, what: &str) -> Result<&MasterKey> {
        self.require(crate::keys::role::Role::Admin, what)?;
        Ok(self
            .data_key
            .as_deref()
            .expect("the admin role holds the data key"))
    }

    /// The zstd level of `[repository] compression_level`.
    pub fn compression_level(&self) -> i32 {
        self.level
    }

    fn seal_options(&self) -> SealOptions {
        SealOptions {
            codec: Codec::Zstd,
            level: self.level,
        }
    }

    /// Seal `plaintext` as a `kind` object named `key` (off the async threads: zstd and AES are
    /// CPU work) and write it create-only to every replica, acknowledged at the quorum.
    pub async fn write_object(
        &self,
        kind: Kind,
        key: &str,
        plaintext: Vec<u8>,
    ) -> Result<WriteReceipt> {
        if chunks::names_chunks(kind) {
            self.fence.check(key)?;
            self.confirm_deduplicated().await?;
        }
        self.store_object(kind, key, plaintext).await
    }

    /// [`Repository::write_object`] without the chunk re-check, for objects that name no chunks.
    async fn store_object(
        &self,
        kind: Kind,
        key: &str,
        plaintext: Vec<u8>,
    ) -> Result<WriteReceipt> {
        let sealed = self.seal(kind, key, plaintext).await?;
        self.replicas.put_all(key, sealed).await
    }

    /// Replace the object `key` on **every** replica (`keys rotate` rewrapping a tenant key's
    /// record: every other object is written once). Refused, naming the replica, when one
    /// cannot be written: a replica left with the old version would keep needing the old
    /// wrapping.
    pub(crate) async fn overwrite_everywhere(
        &self,
        kind: Kind,
        key: &str,
        plaintext: Vec<u8>,
    ) -> Result<()> {
        let sealed = self.seal(kind, key, plaintext).await?;
        for replica in self.replicas.replicas() {
            replica
                .put_overwrite(key, sealed.clone())
                .await
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Unavailable,
                        format!("replica {}: replacing {key}: {e}", replica.name()),
                    )
                    .with_hint("run the command again once every replica is reachable: replicas already written hold the new version, which opens as the old did")
                })?;
        }
        Ok(())
    }

    async fn seal(&self, kind: Kind, key: &str, plaintext: Vec<u8>) -> Result<Bytes> {
        let keys = self.keys.clone();
        let options = self.seal_options();
        let name = key.to_string();
        tokio::task::spawn_blocking(move || {
            Bytes::from(archive::seal(&keys, kind, &name, &plaintext, options))
        })
        .await
        .map_err(|e| Error::other(format!("sealing {key}")).with_source(e))
    }

    /// Read and authenticate one object, failing over across replicas per object.
    pub async fn read_object(&self, kind: Kind, key: &str) -> Result<Vec<u8>> {
        self.read_object_then(kind, key, |_, plaintext| plaintext)
            .await
    }

    /// [`Repository::read_object`], then `then` on the plaintext in the same blocking task
    /// (a check that needs the key, while the bytes are still in cache).
    pub(crate) async fn read_object_then<T, F>(&self, kind: Kind, key: &str, then: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&KeySet, Vec<u8>) -> T + Clone + Send + 'static,
    {
        self.read_object_with(None, kind, key, then).await
    }

    /// [`Repository::read_object`] under `keys`, whatever key id the header names (records
    /// sealed under the repository key, read while resolving another key id).
    pub(crate) async fn read_object_under(
        &self,
        keys: &KeySet,
        kind: Kind,
        key: &str,
    ) -> Result<Vec<u8>> {
        self.read_object_with(Some(keys), kind, key, |_, plaintext| plaintext)
            .await
    }

    /// Read with failover; each copy is opened under `keys`, or under the keys its header's
    /// key id names (the repository's or a tenant's).
    async fn read_object_with<T, F>(
        &self,
        keys: Option<&KeySet>,
        kind: Kind,
        key: &str,
        then: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&KeySet, Vec<u8>) -> T + Clone + Send + 'static,
    {
        let mut problems = Vec::new();
        let mut absent = 0;
        for replica in self.replicas.replicas() {
            match replica.get(key).await {
                Ok(Some(bytes)) => {
                    let keys = match (keys, tenant_keys::header_key_id(&bytes, kind)) {
                        (Some(keys), _) => keys.clone(),
                        (None, Some(id)) => self.keys_for_id(id).await?,
                        (None, None) => self.keys.clone(),
                    };
                    let name = key.to_string();
                    let then = then.clone();
                    let opened = tokio::task::spawn_blocking(move || {
                        archive::open(&keys, kind, &name, &bytes).map(|p| then(&keys, p))
                    })
                    .await
                    .map_err(|e| Error::other(format!("opening {key}")).with_source(e))?;
                    match opened {
                        Ok(plaintext) => return Ok(plaintext),
                        Err(e) => {
                            replica.record_bad_object(key, &e.to_string());
                            problems.push(format!("replica {}: {e}", replica.name()));
                        }
                    }
                }
                Ok(None) => {
                    absent += 1;
                    problems.push(format!("replica {}: missing", replica.name()));
                }
                Err(e) => problems.push(format!("replica {}: {e}", replica.name())),
            }
        }
        let kind_of_error = if absent == self.replicas.replicas().len() {
            ErrorKind::NotFound
        } else if problems
            .iter()
            .any(|p| p.contains("authentication") || p.contains("truncated"))
        {
            ErrorKind::Corrupt
        } else {
            ErrorKind::Unavailable
        };
        Err(Error::new(
            kind_of_error,
            format!(
                "cannot read {key} from any replica: {}",
                problems.join("; ")
            ),
        )
        .with_hint("`timevault verify --read-data` shows the state of every replica"))
    }

    /// Keys under `prefix` on any reachable replica, sorted and deduplicated. A replica that
    /// lost objects (a site rebuilt empty, a replica that lagged) must not hide them: what one
    /// replica has, a failover read can fetch. Fails only when no replica answers.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        let mut keys = std::collections::BTreeSet::new();
        let mut answered = false;
        for replica in self.replicas.replicas() {
            match replica.list(prefix).await {
                Ok(metas) => {
                    answered = true;
                    keys.extend(metas.into_iter().map(|m| m.location.to_string()));
                }
                Err(e) => {
                    tracing::warn!(replica = %replica.name(), prefix, error = %e, "listing failed; using the other replicas");
                    problems.push(format!("replica {}: {e}", replica.name()));
                }
            }
        }
        if !answered {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "cannot list {prefix} on any replica: {}",
                    problems.join("; ")
                ),
            ));
        }
        Ok(keys.into_iter().collect())
    }

    /// Remove an object from every replica (retention and lease housekeeping only).
    pub async fn delete_everywhere(&self, key: &str) -> Result<()> {
        for replica in self.replicas.replicas() {
            replica.delete(key).await.map_err(|e| {
                Error::new(
                    ErrorKind::Unavailable,
                    format!("replica {}: delete {key}: {e}", replica.name()),
                )
            })?;
        }
        Ok(())
    }
}
