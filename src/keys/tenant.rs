//! Per-tenant data keys (docs/FORMAT.md §3.2): each tenant whose rows are kept apart (a
//! PostgreSQL snapshot's tenant-pure chunks) gets a random data key of its own, created on first
//! use. Its chunks are sealed and identified under it, so equal content in two tenants neither
//! deduplicates nor shows that it is equal, and destroying the key makes them unreadable.
//!
//! A record is a `key` object under the repository data key, so the key inside it is wrapped
//! by the repository key (and through it by every KEK); a tenant with a KEK of its own
//! (`[tenancy.keys]`, a customer-managed key) has its key wrapped by that KEK instead, so
//! disabling or deleting it in the customer's key service locks the tenant's data even for
//! someone who holds the repository key.

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::role::{ContentKeys, Role};
use super::wrapped::WrappedKey;
use crate::archive::{KeySet, MasterKey};
use crate::error::{Error, Result};

pub const FORMAT: &str = "tenant-key/1";

/// The format of a record whose key is wrapped by the tenant's own KEK (`[tenancy.keys]`).
pub const FORMAT_KEK: &str = "tenant-key/2";

/// The format written since write-only roles (docs/FORMAT.md §3.2): the key sealed to the
/// repository's content identity (or wrapped by the tenant's KEK), and the tenant's chunk-id
/// key beside it, so a backup credential identifies (deduplicates) the tenant's chunks without
/// being able to open a record.
pub const FORMAT_SEALED: &str = "tenant-key/3";

/// What wraps a tenant's key.
pub const WRAPPED_BY_REPOSITORY: &str = "repository";

/// `keys/tenants/<handle>/<key id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantKeyRecord {
    pub format: String,
    pub tenant: String,
    /// The key id its objects' headers carry (16 hex digits).
    pub key_id: String,
    pub created_at: DateTime<Utc>,
    /// `repository`: `key` is the tenant's key itself, protected by this object's encryption
    /// under the repository data key. Otherwise the tenant's KEK (as `keys show` names KEKs),
    /// and `wrapped` is the key wrapped by it.
    pub wrapped_by: String,
    /// Format 1: base64 of the 32 key bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Formats 2 and 3: the key wrapped by the tenant's KEK, bound to the repository and the
    /// tenant ([`binding`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped: Option<WrappedKey>,
    /// Format 3: base64 of the tenant's chunk-id key (the same in all its records, so its
    /// chunks deduplicate across keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_key: Option<String>,
    /// Format 3 with `wrapped_by = repository`: base64 of the key sealed to the repository's
    /// content identity (an age file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<String>,
}

/// What a tenant key wrapped by a tenant KEK is bound to: the repository and the tenant's
/// handle (AWS: the encryption context `timevault:repository`; local wraps: the AAD).
pub fn binding(repository_id: &str, handle: &str) -> String {
    format!("{repository_id}/tenants/{handle}")
}

impl TenantKeyRecord {
    /// A new random key for `tenant` and its record (format 1: wrapped by the repository key).
    /// Kept for tests of the old format; new records are [`TenantKeyRecord::generate_sealed`].
    #[cfg(test)]
    pub(crate) fn generate(tenant: &str) -> (MasterKey, KeySet, TenantKeyRecord) {
        let key = MasterKey::generate();
        let keys = key.derive();
        let record = TenantKeyRecord {
            format: FORMAT.into(),
            tenant: tenant.into(),
            key_id: keys.key_id_hex(),
            created_at: Utc::now(),
            wrapped_by: WRAPPED_BY_REPOSITORY.into(),
            key: Some(base64::engine::general_purpose::STANDARD.encode(key.expose())),
            wrapped: None,
            id_key: None,
            sealed: None,
        };
        (key, keys, record)
    }

    /// A new random key for `tenant`, identifying chunks with `id_key`, and its record (format
    /// 3) with the key sealed to the content identity `content`.
    pub fn generate_sealed(
        tenant: &str,
        id_key: &[u8; 32],
        content: &ContentKeys,
    ) -> Result<(MasterKey, KeySet, TenantKeyRecord)> {
        let key = MasterKey::generate();
        let keys = key.derive().with_chunk_id(*id_key);
        let record = TenantKeyRecord {
            format: FORMAT_SEALED.into(),
            tenant: tenant.into(),
            key_id: keys.key_id_hex(),
            created_at: Utc::now(),
            wrapped_by: WRAPPED_BY_REPOSITORY.into(),
            key: None,
            wrapped: None,
            id_key: Some(base64::engine::general_purpose::STANDARD.encode(id_key)),
            sealed: None,
        }
        .sealed_to(&key, content)?;
        Ok((key, keys, record))
    }

    /// This record (format 3) with `key` sealed to the content identity.
    pub fn sealed_to(mut self, key: &MasterKey, content: &ContentKeys) -> Result<TenantKeyRecord> {
        self.format = FORMAT_SEALED.into();
        self.wrapped_by = WRAPPED_BY_REPOSITORY.into();
        self.key = None;
        self.wrapped = None;
        self.sealed = Some(base64::engine::general_purpose::STANDARD.encode(content.seal(key)?));
        Ok(self)
    }

    /// This record with its key wrapped by a tenant KEK instead (format 2, or format 3 when
    /// the record names its chunk-id key).
    pub fn wrapped_by_kek(mut self, wrapped: WrappedKey) -> TenantKeyRecord {
        self.format = if self.id_key.is_some() {
            FORMAT_SEALED.into()
        } else {
            FORMAT_KEK.into()
        };
        self.wrapped_by = wrapped.kek.clone();
        self.key = None;
        self.sealed = None;
        self.wrapped = Some(wrapped);
        self
    }

    /// The chunk-id key of a format-3 record (`None` for formats 1 and 2, whose chunk-id key
    /// derives from the key itself).
    pub fn id_key(&self, object: &str) -> Result<Option<[u8; 32]>> {
        let Some(text) = &self.id_key else {
            return Ok(None);
        };
        let bytes = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| {
                    Error::corrupt(format!("{object}: tenant id key is not base64")).with_source(e)
                })?,
        );
        let array: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            Error::corrupt(format!(
                "{object}: tenant id key is {} bytes, not 32",
                bytes.len()
            ))
        })?;
        Ok(Some(array))
    }

    /// The key of a format-3 record sealed to the content identity (`None` for other records);
    /// a credential without the content identity gets the role error.
    pub fn sealed_key(
        &self,
        object: &str,
        content: &ContentKeys,
        role: Role,
    ) -> Result<Option<MasterKey>> {
        let Some(text) = &self.sealed else {
            return Ok(None);
        };
        content
            .open_base64(text, object, "sealed tenant key", role)
            .map(Some)
    }

    /// The record read from `object`, its format checked (the key is not looked at yet).
    pub fn parse(object: &str, bytes: &[u8]) -> Result<TenantKeyRecord> {
        let record: TenantKeyRecord = serde_json::from_slice(bytes).map_err(|e| {
            Error::corrupt(format!("{object}: unreadable tenant key")).with_source(e)
        })?;
        let (key, wrapped, id_key, sealed) = (
            record.key.is_some(),
            record.wrapped.is_some(),
            record.id_key.is_some(),
            record.sealed.is_some(),
        );
        let (fits, what) = match record.format.as_str() {
            FORMAT => (
                key && !wrapped && !id_key && !sealed,
                "`key` and no `wrapped`",
            ),
            FORMAT_KEK => (
                !key && wrapped && !id_key && !sealed,
                "`wrapped` and no `key`",
            ),
            FORMAT_SEALED => (
                !key && id_key && (wrapped != sealed),
                "`id_key`, and `sealed` or `wrapped`",
            ),
            other => {
                return Err(Error::corrupt(format!(
                    "{object}: tenant key format {other:?} is not supported by this timevault (reads {FORMAT}, {FORMAT_KEK} and {FORMAT_SEALED})"
                ))
                .with_hint("upgrade timevault"))
            }
        };
        if !fits {
            return Err(Error::corrupt(format!(
                "{object}: a {} record must hold {what}",
                record.format
            )));
        }
        Ok(record)
    }

    /// The key of a format-1 record (`None` for one wrapped by a tenant KEK).
    pub fn local_key(&self, object: &str) -> Result<Option<MasterKey>> {
        let Some(text) = &self.key else {
            return Ok(None);
        };
        let bytes = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| {
                    Error::corrupt(format!("{object}: tenant key is not base64")).with_source(e)
                })?,
        );
        super::wrapped::data_key_from(&bytes, object).map(Some)
    }

    /// The keys `key` gives (identifying chunks with the record's id key, in format 3),
    /// checked against the key id the record claims.
    pub fn keys_of(&self, object: &str, key: &MasterKey) -> Result<KeySet> {
        let keys = match self.id_key(object)? {
            Some(id_key) => key.derive().with_chunk_id(id_key),
            None => key.derive(),
        };
        super::claimed(object, keys, &self.key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_a_wrong_key_id_is_corrupt() {
        let (_, keys, record) = TenantKeyRecord::generate("1001");
        let bytes = serde_json::to_vec(&record).unwrap();
        let parsed = TenantKeyRecord::parse("k", &bytes).unwrap();
        assert_eq!(parsed, record);
        let key = parsed.local_key("k").unwrap().unwrap();
        assert_eq!(parsed.keys_of("k", &key).unwrap().key_id(), keys.key_id());
        let mut wrong = record.clone();
        wrong.key_id = "0000000000000000".into();
        let err = wrong.keys_of("k", &key).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
    }

    #[test]
    fn a_record_holds_its_key_or_a_wrapped_key_never_both() {
        let (_, _, record) = TenantKeyRecord::generate("1001");
        let wrapped = WrappedKey::new(
            "repo/tenants/h",
            "aws-kms:arn:aws:kms:eu-west-1:123456789012:key/k",
            super::super::wrapped::Algorithm::AwsKmsSymmetric,
            None,
            b"sealed",
        );
        let kek = record.clone().wrapped_by_kek(wrapped.clone());
        assert_eq!(kek.format, FORMAT_KEK);
        assert_eq!(kek.wrapped_by, wrapped.kek);
        let parsed = TenantKeyRecord::parse("k", &serde_json::to_vec(&kek).unwrap()).unwrap();
        assert!(parsed.local_key("k").unwrap().is_none());
        let mut both = kek.clone();
        both.key = record.key.clone();
        let err = TenantKeyRecord::parse("k", &serde_json::to_vec(&both).unwrap()).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert!(err.to_string().contains("`wrapped` and no `key`"), "{err}");
    }

    #[test]
    fn two_tenants_identify_equal_content_differently() {
        let (_, a, _) = TenantKeyRecord::generate("a");
        let (_, b, _) = TenantKeyRecord::generate("b");
        assert_ne!(a.chunk_id(b"same rows"), b.chunk_id(b"same rows"));
    }
}
