//! Content data keys (docs/FORMAT.md §3.4): every process that writes content makes one
//! random data key, seals it to the repository's content identity ([`super::role`]) and
//! stores the record before the first object sealed under it. Content objects carry its key
//! id in their header. The writer keeps the key in memory only: a `backup` credential can make
//! data keys but never read one back.

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::role::{ContentKeys, Role};
use crate::archive::{KeySet, MasterKey};
use crate::error::{Error, Result};

pub const FORMAT: &str = "data-key/1";

/// `keys/data/<key id>`, a `key` object sealed under the repository's metadata key (so the
/// backup role can authenticate it and see that it exists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataKeyRecord {
    pub format: String,
    /// The key id its objects' headers carry (16 hex digits).
    pub key_id: String,
    pub created_at: DateTime<Utc>,
    /// Base64 of the key sealed to the content identity (an age file, one X25519 stanza).
    pub sealed: String,
}

impl DataKeyRecord {
    /// A new random key, its record, and the keys that seal content under it while identifying
    /// chunks as `identity` does.
    pub fn generate(content: &ContentKeys, identity: &KeySet) -> Result<(KeySet, DataKeyRecord)> {
        let key = MasterKey::generate();
        let keys = key.derive().identified_as(identity);
        let sealed = content.seal(&key)?;
        let record = DataKeyRecord {
            format: FORMAT.into(),
            key_id: keys.key_id_hex(),
            created_at: Utc::now(),
            sealed: base64::engine::general_purpose::STANDARD.encode(sealed),
        };
        Ok((keys, record))
    }

    /// The record read from `object`, its format checked.
    pub fn parse(object: &str, bytes: &[u8]) -> Result<DataKeyRecord> {
        let record: DataKeyRecord = serde_json::from_slice(bytes)
            .map_err(|e| Error::corrupt(format!("{object}: unreadable data key")).with_source(e))?;
        if record.format != FORMAT {
            return Err(Error::corrupt(format!(
                "{object}: data key format {:?} is not supported by this timevault (reads {FORMAT})",
                record.format
            ))
            .with_hint("upgrade timevault"));
        }
        Ok(record)
    }

    /// The keys the record's key gives (identifying as `identity`), once the content identity
    /// opened it: `role` is named when it cannot.
    pub fn open(
        &self,
        object: &str,
        content: &ContentKeys,
        identity: &KeySet,
        role: Role,
    ) -> Result<KeySet> {
        let key = content.open_base64(&self.sealed, object, "sealed data key", role)?;
        super::claimed(object, key.derive().identified_as(identity), &self.key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_opens_for_restore_only_and_identifies_as_the_repository() {
        let admin = MasterKey::from_bytes([5; 32]);
        let repo_keys = admin.derive();
        let content = ContentKeys::of_data_key(&admin);
        let (keys, record) = DataKeyRecord::generate(&content.seal_only(), &repo_keys).unwrap();
        assert_ne!(keys.key_id(), repo_keys.key_id());
        assert_eq!(keys.chunk_id(b"rows"), repo_keys.chunk_id(b"rows"));
        let parsed = DataKeyRecord::parse("k", &serde_json::to_vec(&record).unwrap()).unwrap();
        let err = parsed
            .open("k", &content.seal_only(), &repo_keys, Role::Backup)
            .unwrap_err();
        assert!(err.to_string().contains("needs the restore role"), "{err}");
        let opened = parsed.open("k", &content, &repo_keys, Role::Admin).unwrap();
        assert_eq!(opened.key_id(), keys.key_id());
        let mut wrong = parsed.clone();
        wrong.key_id = "0000000000000000".into();
        assert!(wrong.open("k", &content, &repo_keys, Role::Admin).is_err());
    }
}
