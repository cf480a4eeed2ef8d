//! The wrapped copies of the data key as operators manage them: `keys show` and `keys rotate`
//! (docs/FORMAT.md §3.1). Adding a copy rewrites no data; retiring one tombstones it and deletes
//! it on every replica.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{open, Repository};
use crate::error::{Error, ErrorKind, Result};
use crate::keys::{Algorithm, FoundCopy, Kek, KekState, KekUri, Keks};

/// One wrapped copy, with what the key service says about its KEK now.
#[derive(Debug, Clone, Serialize)]
pub struct KeyCopy {
    pub object: String,
    pub kek: String,
    pub algorithm: Algorithm,
    pub created_at: DateTime<Utc>,
    /// Named by this config (`[repository] kek`, or the local key).
    pub configured: bool,
    pub state: KekState,
}

/// `keys show`.
#[derive(Debug, Clone, Serialize)]
pub struct KeysReport {
    pub repository_id: String,
    /// 1: the local key is the data key; 2: the data key exists only wrapped.
    pub format: u16,
    /// What opened the repository in this process: `local key`, a KEK label, or a role
    /// credential (`backup credential`).
    pub opened_by: String,
    /// The role of the key or credential in use: `admin`, `restore` or `backup`.
    pub role: crate::keys::role::Role,
    /// The age recipient content data keys are sealed to (docs/FORMAT.md §1.1).
    pub content_recipient: String,
    pub copies: Vec<KeyCopy>,
    /// Configured KEKs the repository holds no copy for (`keys rotate` adds them).
    pub without_copy: Vec<String>,
}

/// What `keys rotate` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RotateSummary {
    /// Copies written: (KEK, object).
    pub added: Vec<(String, String)>,
    /// Copies deleted: (KEK, object).
    pub retired: Vec<(String, String)>,
    /// Tenant keys wrapped anew to match `[tenancy.keys]`.
    pub tenants: Vec<super::tenant_keks::RewrappedTenantKey>,
}

impl Repository {
    /// A `role` credential of this repository (`keys role`): the admin's only.
    pub fn credential(
        &self,
        role: crate::keys::role::Role,
    ) -> Result<crate::keys::role::Credential> {
        let key = self.data_key("keys role")?;
        crate::keys::role::Credential::derive(key, self.id(), role)
    }

    /// Every wrapped copy with its KEK's state, and the configured KEKs that have none.
    pub async fn keys_report(&self, configured: &Keks) -> Result<KeysReport> {
        let copies = open::read_copies(&self.replicas).await?;
        let mut shown = Vec::new();
        for copy in copies.iter().filter(|c| c.key.repository_id == self.id()) {
            let kek = &copy.key.kek;
            let mine = configured.iter().find(|k| k.label() == *kek);
            let state = match mine {
                Some(k) => k.state().await,
                None => match KekUri::parse(kek) {
                    Ok(uri) => Kek::remote(&uri).await.state().await,
                    Err(_) => KekState::Local,
                },
            };
            shown.push(KeyCopy {
                object: copy.object.clone(),
                kek: kek.clone(),
                algorithm: copy.key.algorithm,
                created_at: copy.key.created_at,
                configured: mine.is_some(),
                state,
            });
        }
        let without_copy = configured
            .iter()
            .map(|k| k.label())
            .filter(|label| !shown.iter().any(|c| c.kek == *label))
            .filter(|label| self.header.is_enveloped() || KekUri::parse(label).is_ok())
            .collect();
        Ok(KeysReport {
            repository_id: self.id().to_string(),
            format: self.header.version,
            opened_by: self.opened_by.clone(),
            role: self.role,
            content_recipient: self.content_recipient(),
            copies: shown,
            without_copy,
        })
    }

    /// Wrap the data key under `kek` (which must be Enabled) and write the copy to every
    /// replica, acknowledged at the write quorum. The data is not touched.
    pub async fn add_key_copy(&self, kek: &Kek) -> Result<(String, String)> {
        let (object, copy) = kek.wrap(self.id(), self.data_key("keys rotate")?).await?;
        let bytes = Bytes::from(copy.to_bytes(&self.keys));
        self.replicas.put_all(&object, bytes).await?;
        Ok((kek.label(), object))
    }

    /// Refuse to retire `label` unless a copy that stays is wrapped by a KEK that can open the
    /// repository now (Enabled, or local key material): retiring the last usable copy (the
    /// others Disabled or pending deletion) would make every backup unreadable.
    async fn refuse_unless_another_opens(&self, label: &str, kept: &[FoundCopy]) -> Result<()> {
        let mut states = Vec::new();
        for copy in kept {
            let state = match KekUri::parse(&copy.key.kek) {
                Ok(uri) => Kek::remote(&uri).await.state().await,
                Err(_) => KekState::Local,
            };
            if matches!(state, KekState::Enabled | KekState::Local) {
                return Ok(());
            }
            states.push(format!("{} is {state}", copy.key.kek));
        }
        let why = if states.is_empty() {
            "it wraps the last copy of the repository key".to_string()
        } else {
            format!(
                "no other copy can open the repository now ({})",
                states.join("; ")
            )
        };
        Err(Error::new(
            ErrorKind::Input,
            format!("refusing to retire {label}: {why}; retiring it would make every backup unreadable"),
        )
        .with_hint("add a copy under a usable KEK first (`timevault keys rotate --kek <URI>`), or enable the other key in its service"))
    }

    /// Delete every copy wrapped by `label`: tombstoned first (a replica that is down must not
    /// get it back from `replicas sync`), then deleted everywhere. A format-2 repository keeps
    /// at least one copy: retiring the last is refused.
    pub async fn retire_key_copies(&self, label: &str) -> Result<Vec<(String, String)>> {
        let copies: Vec<FoundCopy> = open::read_copies(&self.replicas)
            .await?
            .into_iter()
            .filter(|c| c.key.repository_id == self.id())
            .collect();
        let (retired, kept): (Vec<_>, Vec<_>) =
            copies.into_iter().partition(|c| c.key.kek == label);
        if retired.is_empty() {
            let known: Vec<&str> = kept.iter().map(|c| c.key.kek.as_str()).collect();
            return Err(Error::input(format!(
                "no copy of the repository key is wrapped by {label}"
            ))
            .with_hint(format!("the copies are wrapped by: {}", known.join(", "))));
        }
        // A format-1 repository opened with its local key can always be opened with it again;
        // opened through a KEK, the operator may have no local key any more.
        if self.header.is_enveloped() || self.opened_by != open::LOCAL_KEY {
            self.refuse_unless_another_opens(label, &kept).await?;
        }
        let objects: Vec<String> = retired.iter().map(|c| c.object.clone()).collect();
        self.tombstone_and_delete(&objects, &format!("retiring {label}"))
            .await?;
        Ok(objects
            .into_iter()
            .map(|o| (label.to_string(), o))
            .collect())
    }
}
