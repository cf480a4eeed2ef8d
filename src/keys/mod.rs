//! The key hierarchy (docs/FORMAT.md §1, §3.1).
//!
//! Key-encryption keys (KEKs) wrap the repository's data key: the local key file, env key or
//! passphrase, and keys in AWS KMS or Azure Key Vault. A repository of format 2 has a random
//! data key that exists only wrapped, one copy per KEK under `keys/repository/`, so any one KEK
//! opens it and a KEK can be added or retired without rewriting data. A repository of format 1 uses the local key
//! directly; `keys rotate --kek` adds wrapped copies of it.
//!
//! This module holds no repository I/O: `repo` reads and writes the copies and hands them here.

mod aws;
mod azure;
pub mod data;
pub mod kek;
mod local;
pub mod role;
pub mod telemetry;
pub mod tenant;
pub mod wrapped;

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use zeroize::Zeroizing;

use crate::archive::{KdfParams, KeySet, MasterKey};
use crate::error::{Error, ErrorKind, Result};

pub use kek::{KekState, KekUri};
pub use local::{Derived, LocalSecret};
pub use wrapped::{Algorithm, FoundCopy, WrappedKey};

/// How long a key service's answer about a KEK's state is reused in one process by default: a
/// drill that reopens the repository asks again only after this (`[repository]
/// kek_check_interval` sets it, [`set_state_ttl`]).
pub const STATE_TTL: Duration = Duration::from_secs(300);

/// The state cache's lifetime in this process, in milliseconds.
static STATE_TTL_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(300_000);

/// Trust a KEK's state this long (the config's `kek_check_interval`).
pub fn set_state_ttl(ttl: Duration) {
    STATE_TTL_MS.store(
        u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        std::sync::atomic::Ordering::Relaxed,
    );
}

fn state_ttl() -> Duration {
    Duration::from_millis(STATE_TTL_MS.load(std::sync::atomic::Ordering::Relaxed))
}

/// One key-encryption key this process can use.
pub enum Kek {
    /// A key file or env key.
    Local {
        label: String,
        wrap: wrapped::LocalWrap,
    },
    /// A passphrase; each copy it wraps holds its own Argon2id parameters.
    Passphrase(Zeroizing<String>),
    /// A key in AWS KMS.
    Aws { uri: KekUri, client: aws::AwsKek },
    /// A key in Azure Key Vault (or Managed HSM).
    Azure {
        uri: KekUri,
        client: azure::AzureKek,
    },
}

/// The label `keys show` prints and copies record for the passphrase KEK.
pub const PASSPHRASE_LABEL: &str = "passphrase";

impl Kek {
    /// The KEK for local key material.
    pub fn local(secret: &LocalSecret) -> Option<Kek> {
        match secret {
            LocalSecret::Key(key) => Some(Kek::Local {
                label: wrapped::local_label(key),
                wrap: wrapped::LocalWrap::new(key),
            }),
            LocalSecret::Passphrase(p) => Some(Kek::Passphrase(p.clone())),
            // A role credential holds no key that could wrap the data key.
            LocalSecret::Credential(_) => None,
        }
    }

    /// A client for a key service's KEK (no request is sent yet).
    pub async fn remote(uri: &KekUri) -> Kek {
        match uri {
            KekUri::AwsKms { arn, region } => Kek::Aws {
                client: aws::AwsKek::connect(arn, region, &uri.to_string()).await,
                uri: uri.clone(),
            },
            KekUri::AzureKeyVault {
                vault,
                name,
                version,
            } => Kek::Azure {
                client: azure::AzureKek::connect(vault, name, version.as_deref(), &uri.to_string()),
                uri: uri.clone(),
            },
        }
    }

    /// How copies name this KEK: `local:<16 hex>`, `passphrase` or the URI.
    pub fn label(&self) -> String {
        match self {
            Kek::Local { label, .. } => label.clone(),
            Kek::Passphrase(_) => PASSPHRASE_LABEL.into(),
            Kek::Aws { uri, .. } | Kek::Azure { uri, .. } => uri.to_string(),
        }
    }

    /// Whether `copy` was wrapped by this KEK.
    pub fn wrapped(&self, copy: &WrappedKey) -> bool {
        copy.kek == self.label()
    }

    /// The KEK's state; a key service is asked at most once per [`STATE_TTL`] per process.
    pub async fn state(&self) -> KekState {
        if matches!(self, Kek::Local { .. } | Kek::Passphrase(_)) {
            return KekState::Local;
        }
        let label = self.label();
        if let Some(state) = cached_state(&label) {
            return state;
        }
        let state = match self {
            Kek::Aws { client, .. } => client.state().await,
            Kek::Azure { client, .. } => client.state().await,
            Kek::Local { .. } | Kek::Passphrase(_) => KekState::Local,
        };
        if !matches!(state, KekState::Unreachable(_)) {
            lock(&STATES).insert(label, (state.clone(), Instant::now()));
        }
        state
    }

    /// Schedule the key's deletion in its key service; what was done. An AWS KMS key is deleted
    /// after KMS's longest window (30 days), during which the deletion can still be cancelled.
    /// A Key Vault key (every version of it) is deleted at once: with soft delete, which every
    /// vault has had since 2020, it stays recoverable until the purge date the vault's
    /// retention sets (purge protection is the vault's policy, not timevault's).
    pub async fn schedule_deletion(&self) -> Result<String> {
        match self {
            Kek::Aws { client, .. } => {
                let when = client.schedule_deletion(30).await?;
                forget_state(&self.label());
                Ok(format!("{}: deletion scheduled for {when}", self.label()))
            }
            Kek::Azure { client, .. } => {
                let done = client.delete().await?;
                forget_state(&self.label());
                Ok(format!("{}: {done}", self.label()))
            }
            Kek::Local { .. } | Kek::Passphrase(_) => Err(Error::input(format!(
                "{}: a local key has no key service to delete it in",
                self.label()
            ))
            .with_hint(
                "delete the key file yourself; the tenant's keys are destroyed all the same",
            )),
        }
    }

    /// Refuse a KEK whose state is not `Enabled` (or local).
    pub async fn usable(&self) -> Result<()> {
        match self.state().await {
            KekState::Enabled | KekState::Local => Ok(()),
            state => Err(Error::new(
                ErrorKind::Key,
                format!("{}: key state is {state}", self.label()),
            )
            .with_hint("a key-encryption key must be Enabled; enable it in the key service, or open with another configured KEK")),
        }
    }

    /// Wrap `data_key` for `repository_id`: the copy's object name and record.
    pub async fn wrap(
        &self,
        repository_id: &str,
        data_key: &MasterKey,
    ) -> Result<(String, WrappedKey)> {
        self.usable().await?;
        let label = self.label();
        Ok(match self {
            Kek::Local { wrap, .. } => {
                let sealed = wrap.wrap(repository_id, &label, data_key);
                let copy =
                    WrappedKey::new(repository_id, &label, Algorithm::Aes256Gcm, None, &sealed);
                (wrapped::object_name(&label, None), copy)
            }
            Kek::Passphrase(passphrase) => {
                let kdf = KdfParams::generate();
                let stretched = MasterKey::from_passphrase(passphrase, &kdf)?;
                let sealed =
                    wrapped::LocalWrap::new(&stretched).wrap(repository_id, &label, data_key);
                let mut suffix = [0u8; 4];
                rand::rngs::OsRng.fill_bytes(&mut suffix);
                let copy = WrappedKey::new(
                    repository_id,
                    &label,
                    Algorithm::Argon2idAes256Gcm,
                    Some(kdf),
                    &sealed,
                );
                (
                    wrapped::object_name(&label, Some(&hex::encode(suffix))),
                    copy,
                )
            }
            Kek::Aws { client, .. } => {
                let sealed = client.wrap(repository_id, data_key.expose()).await?;
                let copy = WrappedKey::new(
                    repository_id,
                    &label,
                    Algorithm::AwsKmsSymmetric,
                    None,
                    &sealed,
                );
                (wrapped::object_name(&label, None), copy)
            }
            Kek::Azure { client, .. } => {
                // No encryption context in Key Vault: the copy's MAC binds it to the repository.
                let sealed = client.wrap(data_key.expose()).await?;
                let copy =
                    WrappedKey::new(repository_id, &label, sealed.algorithm, None, &sealed.bytes)
                        .with_kid(sealed.kid);
                (wrapped::object_name(&label, None), copy)
            }
        })
    }

    /// Unwrap a copy this KEK wrapped (its state checked first). An unwrapped key is kept for
    /// the process's life: a drill reopening the repository calls no key service again.
    pub async fn unwrap(&self, copy: &FoundCopy, repository_id: &str) -> Result<MasterKey> {
        self.unwrap_record(&copy.object, &copy.key, repository_id)
            .await
    }

    /// [`Kek::unwrap`] for a wrapped key kept inside another object (`object`: a tenant's key
    /// record), bound to `repository_id` (for a tenant key: the repository and the tenant).
    pub async fn unwrap_record(
        &self,
        object: &str,
        record: &WrappedKey,
        repository_id: &str,
    ) -> Result<MasterKey> {
        self.usable().await?;
        if record.repository_id != repository_id {
            return Err(Error::corrupt(format!(
                "{object}: a copy of {}'s key, not of {repository_id}",
                record.repository_id
            )));
        }
        let cache_key = (
            record.repository_id.clone(),
            record.kek.clone(),
            record.wrapped.clone(),
        );
        if let Some(key) = lock(&UNWRAPPED).get(&cache_key) {
            return Ok(key.clone());
        }
        let sealed = record.wrapped_bytes()?;
        let label = self.label();
        let key = match (self, record.algorithm) {
            (Kek::Local { wrap, .. }, Algorithm::Aes256Gcm) => {
                wrap.unwrap(&record.repository_id, &label, &sealed)?
            }
            (Kek::Passphrase(passphrase), Algorithm::Argon2idAes256Gcm) => {
                let kdf = record.kdf.as_ref().ok_or_else(|| {
                    Error::corrupt(format!(
                        "{}: a passphrase copy without kdf parameters",
                        object
                    ))
                })?;
                let stretched = MasterKey::from_passphrase(passphrase, kdf)?;
                wrapped::LocalWrap::new(&stretched).unwrap(
                    &record.repository_id,
                    &label,
                    &sealed,
                )?
            }
            (Kek::Aws { client, .. }, Algorithm::AwsKmsSymmetric) => {
                let plain = client.unwrap(&record.repository_id, &sealed).await?;
                wrapped::data_key_from(&plain, &label)?
            }
            (
                Kek::Azure { client, .. },
                algorithm @ (Algorithm::RsaOaep256 | Algorithm::A256Kw),
            ) => {
                let kid = record.kid.as_deref().ok_or_else(|| {
                    Error::corrupt(format!(
                        "{}: a Key Vault copy without the key version (kid) that wrapped it",
                        object
                    ))
                })?;
                let plain = client.unwrap(kid, algorithm, &sealed).await?;
                wrapped::data_key_from(&plain, &label)?
            }
            (_, algorithm) => {
                return Err(Error::corrupt(format!(
                    "{}: algorithm {algorithm:?} does not fit KEK {label}",
                    object
                )))
            }
        };
        lock(&UNWRAPPED).insert(cache_key, key.clone());
        Ok(key)
    }
}

type UnwrapKey = (String, String, String);
static UNWRAPPED: LazyLock<Mutex<HashMap<UnwrapKey, MasterKey>>> = LazyLock::new(Default::default);
static STATES: LazyLock<Mutex<HashMap<String, (KekState, Instant)>>> =
    LazyLock::new(Default::default);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn cached_state(label: &str) -> Option<KekState> {
    lock(&STATES)
        .get(label)
        .filter(|(_, at)| at.elapsed() < state_ttl())
        .map(|(state, _)| state.clone())
}

/// After a deletion: the next state asked is the service's.
fn forget_state(label: &str) {
    lock(&STATES).remove(label);
}

/// The KEKs a config names, in the order they are tried: the local key first (no service to
/// call), then `[repository] kek` in the order written.
pub struct Keks(Vec<Kek>);

impl Keks {
    pub async fn configured(local: Option<&LocalSecret>, remote: &[KekUri]) -> Keks {
        let mut keks: Vec<Kek> = local.and_then(Kek::local).into_iter().collect();
        for uri in remote {
            keks.push(Kek::remote(uri).await);
        }
        Keks(keks)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Kek> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<Kek> {
        self.0
    }

    /// The data key from the first copy a configured KEK unwraps and `prove` accepts (the
    /// repository header's key check and MAC), the copy authenticated with it. Otherwise a key
    /// error naming each KEK's reason (`aws-kms:… key state is Disabled`).
    pub async fn open(
        &self,
        repository_id: &str,
        copies: &[FoundCopy],
        prove: impl Fn(&KeySet) -> Result<()>,
    ) -> Result<(MasterKey, KeySet, String)> {
        let mut refusals = Vec::new();
        for kek in &self.0 {
            let mine: Vec<&FoundCopy> = copies.iter().filter(|c| kek.wrapped(&c.key)).collect();
            if mine.is_empty() {
                refusals.push(format!(
                    "{}: the repository holds no copy wrapped by it",
                    kek.label()
                ));
                continue;
            }
            for copy in mine {
                let opened = async {
                    let key = kek.unwrap(copy, repository_id).await?;
                    let keys = key.derive();
                    prove(&keys)?;
                    copy.authenticate(&keys)?;
                    Ok::<_, Error>((key, keys, kek.label()))
                };
                match opened.await {
                    Ok(found) => return Ok(found),
                    Err(e) => {
                        tracing::warn!(kek = %kek.label(), copy = %copy.object, error = %e, "a key-encryption key did not open the repository");
                        refusals.push(e.to_string());
                    }
                }
            }
        }
        Err(Error::new(
            ErrorKind::Key,
            format!("no configured key opens the repository: {}", refusals.join("; ")),
        )
        .with_hint("configure a key-encryption key the repository has a copy for (`timevault keys show` lists them), or enable the key in its service"))
    }
}

/// `keys`, once their key id is the one a record (`object`) claims: a record whose key gives
/// another id is corrupt.
pub(crate) fn claimed(object: &str, keys: KeySet, claimed: &str) -> Result<KeySet> {
    if keys.key_id_hex() != claimed {
        return Err(Error::corrupt(format!(
            "{object}: the key gives key id {}, the record says {claimed}",
            keys.key_id_hex()
        )));
    }
    Ok(keys)
}
