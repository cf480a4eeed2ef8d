//! Opening a repository: read `config` from the replicas, find the data key, prove it.
//!
//! The data key is the local key itself (format 1) or a random key held only in wrapped copies
//! under `keys/repository/` (format 2, and format 1 after `keys rotate --kek`); `crate::keys`
//! unwraps them, this module reads and writes them.

use bytes::Bytes;

use super::{layout, ReplicaSet};
use crate::archive::{self, KdfParams, KeySet, MasterKey};
use crate::config::{KeySource, RepositoryConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::keys::role::{ContentKeys, Credential, Role};
use crate::keys::{self, Derived, FoundCopy, Keks, LocalSecret};

/// Read an environment variable that holds key material.
fn env_secret(name: &str) -> Result<String> {
    std::env::var(name).map_err(|_| {
        Error::new(
            ErrorKind::Key,
            format!("environment variable {name} is not set"),
        )
        .with_hint(format!("export {name}=... before running timevault"))
    })
}

/// A passphrase from the environment variable `name`; an empty one is refused.
fn env_passphrase(name: &str) -> Result<zeroize::Zeroizing<String>> {
    let passphrase = zeroize::Zeroizing::new(env_secret(name)?);
    if passphrase.is_empty() {
        return Err(archive::keys::empty_passphrase(&format!(
            " in environment variable {name}"
        )));
    }
    Ok(passphrase)
}

/// The local key material the config names.
pub(super) fn read_secret(source: &KeySource) -> Result<LocalSecret> {
    match source {
        KeySource::PassphraseEnv(name) => Ok(LocalSecret::Passphrase(env_passphrase(name)?)),
        KeySource::File(path) => {
            let text = archive::keys::read_key_text(path)?;
            if Credential::is_credential(&text) {
                return credential(&text, &format!("key file {}", path.display()));
            }
            archive::keys::read_key_file(path).map(LocalSecret::Key)
        }
        KeySource::Env(name) => {
            let text = zeroize::Zeroizing::new(env_secret(name)?);
            if Credential::is_credential(&text) {
                return credential(&text, &format!("environment variable {name}"));
            }
            MasterKey::parse(&text).map(LocalSecret::Key).map_err(|e| {
                Error::new(ErrorKind::Key, format!("environment variable {name}: {e}"))
            })
        }
    }
}

/// A role credential read from `what` (a key file or an env key).
fn credential(text: &str, what: &str) -> Result<LocalSecret> {
    Credential::parse(text)
        .map(|c| LocalSecret::Credential(Box::new(c)))
        .map_err(|e| {
            Error::new(ErrorKind::Key, format!("{what}: {e}")).with_hint(
                "make a new one with `timevault keys role ROLE --out FILE` where the repository key is",
            )
        })
}

/// How `keys show` names the local key of a format-1 repository, which is its data key.
pub const LOCAL_KEY: &str = "local key";

/// The KEKs the config names, ready to use (`keys show`, `keys rotate`).
pub async fn configured_keks(config: &RepositoryConfig) -> Result<Keks> {
    let secret = config.key.as_ref().map(read_secret).transpose()?;
    Ok(Keks::configured(secret.as_ref(), &config.kek).await)
}

/// The repository config as found on one replica.
pub(super) struct FoundHeader {
    pub replica: usize,
    pub header: super::RepoHeader,
    pub mac: String,
    pub bytes: Bytes,
}

/// The key that opened a repository, and the header that accepted it.
pub(super) struct Proven<'a> {
    /// The data key (the admin role); `None` for a role credential.
    pub data_key: Option<MasterKey>,
    /// `local key`, the label of the KEK that unwrapped the data key, or `backup credential`.
    pub opened_by: String,
    pub keys: KeySet,
    pub role: Role,
    pub content: ContentKeys,
    pub found: &'a FoundHeader,
}

impl<'a> Proven<'a> {
    /// The admin's: everything derives from the data key.
    fn admin(data_key: MasterKey, opened_by: String, keys: KeySet, found: &'a FoundHeader) -> Self {
        Proven {
            content: ContentKeys::of_data_key(&data_key),
            data_key: Some(data_key),
            opened_by,
            keys,
            role: Role::Admin,
            found,
        }
    }
}

/// Find the data key and prove it against the headers found, in replica order. A header is
/// read before any key can authenticate it, so one replica's damaged or edited copy must not
/// hide the others: it is logged and the next one is tried. The local key opens a format-1
/// repository directly; otherwise (or when it is refused) the wrapped copies are tried with
/// every configured KEK. Only when all refuse is that reported, a wrong key first.
pub(super) async fn prove<'a>(
    config: &RepositoryConfig,
    replicas: &ReplicaSet,
    found: &'a [FoundHeader],
) -> Result<Proven<'a>> {
    let secret = config.key.as_ref().map(read_secret).transpose()?;
    if let Some(LocalSecret::Credential(credential)) = &secret {
        return prove_credential(credential, replicas, found);
    }
    let mut refusals = Vec::new();
    let direct = found.iter().any(|f| !f.header.is_enveloped());
    if let (Some(secret), true) = (&secret, direct) {
        match prove_direct(secret, replicas, found) {
            Ok(proven) => return Ok(proven),
            Err(e) => refusals.push(e),
        }
    }
    let enveloped = found.iter().any(|f| f.header.is_enveloped());
    if enveloped || !config.kek.is_empty() {
        let keks = Keks::configured(secret.as_ref(), &config.kek).await;
        let copies = read_copies(replicas).await?;
        let Some(repository_id) = found.first().map(|f| &f.header.repository_id) else {
            return Err(refused(refusals));
        };
        let opened = keks
            .open(repository_id, &copies, |keys| {
                first_accepting(found, replicas, keys).map(|_| ())
            })
            .await;
        match opened {
            Ok((data_key, keys, opened_by)) => {
                let found = first_accepting(found, replicas, &keys)?;
                return Ok(Proven::admin(data_key, opened_by, keys, found));
            }
            Err(e) => refusals.push(e),
        }
    }
    Err(refused(refusals))
}

/// A role credential proven against the headers found: it must be of this repository, and
/// its metadata subkeys must authenticate a header (whatever the repository's format: a
/// credential opens without any KEK).
fn prove_credential<'a>(
    credential: &Credential,
    replicas: &ReplicaSet,
    found: &'a [FoundHeader],
) -> Result<Proven<'a>> {
    if let Some(other) = found
        .iter()
        .find(|f| f.header.repository_id != credential.repository_id)
    {
        return Err(Error::new(
            ErrorKind::Key,
            format!(
                "this {} credential belongs to repository {}, the replicas hold repository {}",
                credential.role, credential.repository_id, other.header.repository_id
            ),
        )
        .with_hint("point key_file at this repository's credential"));
    }
    let found = first_accepting(found, replicas, &credential.keys)?;
    Ok(Proven {
        data_key: None,
        opened_by: format!("{} credential", credential.role),
        keys: credential.keys.clone(),
        role: credential.role,
        content: credential.content.clone(),
        found,
    })
}

/// The first header that accepts `keys`.
fn first_accepting<'a>(
    found: &'a [FoundHeader],
    replicas: &ReplicaSet,
    keys: &KeySet,
) -> Result<&'a FoundHeader> {
    let mut last = None;
    for f in found {
        let name = replicas.replicas()[f.replica].name();
        match f.header.verify(&f.mac, keys, name) {
            Ok(()) => return Ok(f),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| Error::new(ErrorKind::NotFound, "no repository config found")))
}

/// The local key as the data key of a format-1 repository.
fn prove_direct<'a>(
    secret: &LocalSecret,
    replicas: &ReplicaSet,
    found: &'a [FoundHeader],
) -> Result<Proven<'a>> {
    let mut derived: Derived = Vec::new();
    let mut refusals = Vec::new();
    for f in found.iter().filter(|f| !f.header.is_enveloped()) {
        let name = replicas.replicas()[f.replica].name();
        let (data_key, keys) = match secret.keys_for(f.header.kdf.as_ref(), &mut derived) {
            Ok(k) => k,
            Err(e) => {
                refusals.push(e.context(format!("replica {name}")));
                continue;
            }
        };
        match f.header.verify(&f.mac, &keys, name) {
            Ok(()) => {
                for e in &refusals {
                    tracing::warn!(error = %e, hint = e.hint().unwrap_or(""), "a replica's repository config refused the key; another replica's accepted it");
                }
                return Ok(Proven::admin(data_key, LOCAL_KEY.into(), keys, f));
            }
            Err(e) if e.kind() == ErrorKind::Key => {
                refusals.push(e.context(format!("replica {name}")))
            }
            Err(e) => refusals.push(e),
        }
    }
    Err(refused(refusals))
}

/// One error for every refusal: a key error when any says so (the others' reasons appended),
/// else the first reason.
fn refused(mut refusals: Vec<Error>) -> Error {
    if refusals.is_empty() {
        return Error::new(
            ErrorKind::Key,
            "no key is configured that could open this repository",
        )
        .with_hint("set repository.key_file, key_env, passphrase_env or kek");
    }
    let first = refusals
        .iter()
        .position(|e| e.kind() == ErrorKind::Key)
        .unwrap_or(0);
    let primary = refusals.remove(first);
    if refusals.is_empty() {
        return primary;
    }
    let others: Vec<String> = refusals.iter().map(|e| e.to_string()).collect();
    let error = Error::new(
        primary.kind(),
        format!("{} (also {})", primary, others.join("; ")),
    );
    match primary.hint() {
        Some(hint) => error.with_hint(hint),
        None => error,
    }
}

/// Every wrapped copy of the data key on any replica. A copy damaged on one replica is
/// skipped there (logged): the same object on another replica is still tried.
pub(super) async fn read_copies(replicas: &ReplicaSet) -> Result<Vec<FoundCopy>> {
    let mut copies: Vec<FoundCopy> = Vec::new();
    let mut answered = false;
    for replica in replicas.replicas() {
        let Ok(metas) = replica.list(keys::wrapped::PREFIX).await else {
            continue;
        };
        answered = true;
        for meta in metas {
            let object = meta.location.to_string();
            match replica.get(&object).await {
                Ok(Some(bytes)) => match FoundCopy::parse(&object, &bytes) {
                    Ok(copy) if !copies.iter().any(|c| c.same(&copy)) => copies.push(copy),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(replica = %replica.name(), %object, error = %e, "unreadable wrapped key")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(replica = %replica.name(), %object, error = %e, "cannot read a wrapped key")
                }
            }
        }
    }
    if !answered {
        return Err(Error::new(
            ErrorKind::Unavailable,
            "cannot list the repository's wrapped keys on any replica",
        )
        .with_hint("check the replicas' urls, credentials and network"));
    }
    Ok(copies)
}

/// A new format-2 repository's data key, wrapped by every configured KEK (each must be
/// usable): the key and the copies to write, before `config`.
pub(super) async fn new_envelope(
    config: &RepositoryConfig,
) -> Result<(
    MasterKey,
    KeySet,
    super::RepoHeader,
    Vec<(String, Bytes)>,
    bool,
)> {
    let (secret, generated) = match &config.key {
        Some(KeySource::File(path)) if !path.exists() => (
            Some(LocalSecret::Key(archive::keys::create_key_file(path)?)),
            true,
        ),
        Some(source) => (Some(read_secret(source)?), false),
        None => (None, false),
    };
    let keks = Keks::configured(secret.as_ref(), &config.kek).await;
    let data_key = MasterKey::generate();
    let keys = data_key.derive();
    let header = super::RepoHeader::enveloped(&keys);
    let mut copies = Vec::new();
    for kek in keks.iter() {
        let (object, copy) = kek
            .wrap(&header.repository_id, &data_key)
            .await
            .map_err(|e| e.context("init: wrapping the new repository's key"))?;
        copies.push((object, Bytes::from(copy.to_bytes(&keys))));
    }
    Ok((data_key, keys, header, copies, generated))
}

/// Generate or load the key for a new format-1 repository.
pub(super) fn new_key(source: &KeySource) -> Result<(MasterKey, Option<KdfParams>, bool)> {
    match source {
        KeySource::File(path) if !path.exists() => {
            Ok((archive::keys::create_key_file(path)?, None, true))
        }
        KeySource::PassphraseEnv(name) => {
            let kdf = KdfParams::generate();
            let key = MasterKey::from_passphrase(&env_passphrase(name)?, &kdf)?;
            Ok((key, Some(kdf), false))
        }
        other => read_secret(other)?
            .key_for(None)
            .map(|key| (key, None, false)),
    }
}

/// Read the config object from every replica. With `require_all`, an unreachable replica is
/// an error (init must reach every replica); otherwise it is skipped.
pub(super) async fn read_headers(
    replicas: &ReplicaSet,
    require_all: bool,
) -> Result<(Vec<FoundHeader>, Vec<usize>)> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    let mut unreachable = Vec::new();
    for (i, replica) in replicas.replicas().iter().enumerate() {
        match replica.get(layout::CONFIG).await {
            Ok(Some(bytes)) => match super::RepoHeader::parse_unverified(&bytes, replica.name()) {
                Ok((header, mac)) => found.push(FoundHeader {
                    replica: i,
                    header,
                    mac,
                    bytes,
                }),
                Err(e) if require_all => return Err(e),
                Err(e) => {
                    tracing::warn!(replica = %replica.name(), error = %e, "unreadable repository config")
                }
            },
            Ok(None) => missing.push(i),
            Err(e) => unreachable.push(format!("replica {}: {e}", replica.name())),
        }
    }
    if !unreachable.is_empty() && (require_all || found.is_empty()) {
        return Err(Error::new(ErrorKind::Unavailable, unreachable.join("; "))
            .with_hint("check the replica's url, credentials and network"));
    }
    Ok((found, missing))
}
