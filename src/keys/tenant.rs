//! Per-tenant data keys (docs/FORMAT.md §3.2): each tenant whose rows are kept apart (a
//! PostgreSQL snapshot's tenant-pure chunks) gets a random data key of its own, created on first
//! use. Its chunks are sealed and identified under it, so equal content in two tenants neither
//! deduplicates nor shows that it is equal, and destroying the key makes them unreadable.
//!
//! A record is a `key` object under the repository data key, so the key inside it is wrapped
//! by the repository key (and through it by every KEK).

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::archive::{KeySet, MasterKey};
use crate::error::{Error, Result};

pub const FORMAT: &str = "tenant-key/1";

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
    /// under the repository data key.
    pub wrapped_by: String,
    /// Base64 of the 32 key bytes.
    pub key: String,
}

impl TenantKeyRecord {
    /// A new random key for `tenant` and its record.
    pub fn generate(tenant: &str) -> (MasterKey, KeySet, TenantKeyRecord) {
        let key = MasterKey::generate();
        let keys = key.derive();
        let record = TenantKeyRecord {
            format: FORMAT.into(),
            tenant: tenant.into(),
            key_id: keys.key_id_hex(),
            created_at: Utc::now(),
            wrapped_by: WRAPPED_BY_REPOSITORY.into(),
            key: base64::engine::general_purpose::STANDARD.encode(key.expose()),
        };
        (key, keys, record)
    }

    /// The record read from `object`, checked: its key must give the key id it claims.
    pub fn parse(object: &str, bytes: &[u8]) -> Result<(TenantKeyRecord, KeySet)> {
        let record: TenantKeyRecord = serde_json::from_slice(bytes).map_err(|e| {
            Error::corrupt(format!("{object}: unreadable tenant key")).with_source(e)
        })?;
        if record.format != FORMAT {
            return Err(Error::corrupt(format!(
                "{object}: tenant key format {:?} is not supported by this timevault (reads {FORMAT})",
                record.format
            ))
            .with_hint("upgrade timevault"));
        }
        let bytes = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(&record.key)
                .map_err(|e| {
                    Error::corrupt(format!("{object}: tenant key is not base64")).with_source(e)
                })?,
        );
        let key = super::wrapped::data_key_from(&bytes, object)?;
        let keys = key.derive();
        if keys.key_id_hex() != record.key_id {
            return Err(Error::corrupt(format!(
                "{object}: the key gives key id {}, the record says {}",
                keys.key_id_hex(),
                record.key_id
            )));
        }
        Ok((record, keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_a_wrong_key_id_is_corrupt() {
        let (_, keys, record) = TenantKeyRecord::generate("1001");
        let bytes = serde_json::to_vec(&record).unwrap();
        let (parsed, parsed_keys) = TenantKeyRecord::parse("k", &bytes).unwrap();
        assert_eq!(parsed, record);
        assert_eq!(parsed_keys.key_id(), keys.key_id());
        let mut wrong = record.clone();
        wrong.key_id = "0000000000000000".into();
        let err = TenantKeyRecord::parse("k", &serde_json::to_vec(&wrong).unwrap()).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
    }

    #[test]
    fn two_tenants_identify_equal_content_differently() {
        let (_, a, _) = TenantKeyRecord::generate("a");
        let (_, b, _) = TenantKeyRecord::generate("b");
        assert_ne!(a.chunk_id(b"same rows"), b.chunk_id(b"same rows"));
    }
}
