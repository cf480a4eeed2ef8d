//! The repository config object (`config`, docs/FORMAT.md §3): identity, cipher, KDF
//! parameters and a key check.
//!
//! It is plaintext because it must be read before the key exists (a passphrase needs its salt),
//! and authenticated by an HMAC so it cannot be edited unnoticed. The key check lets a wrong key
//! be reported as a wrong key instead of as corruption of every object.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::archive::keys::macs_equal;
use crate::archive::{KdfParams, KeySet, SEGMENT_LOG2};
use crate::error::{Error, ErrorKind, Result};

pub const FORMAT_NAME: &str = "timevault-repository";
pub const CIPHER_NAME: &str = "aes-256-gcm-stream";
/// The format version of a repository whose data key is wrapped by KEKs.
pub const ENVELOPE_VERSION: u16 = 2;

/// The authenticated fields, in their canonical order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoHeader {
    pub format: String,
    pub version: u16,
    pub repository_id: String,
    pub created_at: DateTime<Utc>,
    pub cipher: String,
    pub segment_size_log2: u8,
    pub key_id: String,
    pub kdf: Option<KdfParams>,
    pub key_check: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    config: RepoHeader,
    mac: String,
}

impl RepoHeader {
    /// A new format-1 repository's header for `keys` (and the KDF parameters the key came
    /// from, if any): the local key is the data key.
    pub fn new(keys: &KeySet, kdf: Option<KdfParams>) -> Self {
        Self::with_version(keys, kdf, 1)
    }

    /// A new format-2 repository's header: its data key exists only wrapped by KEKs, in
    /// `keys/repository/` (docs/FORMAT.md §3.1).
    pub fn enveloped(keys: &KeySet) -> Self {
        Self::with_version(keys, None, ENVELOPE_VERSION)
    }

    /// Whether the data key is held only in wrapped copies (format 2).
    pub fn is_enveloped(&self) -> bool {
        self.version == ENVELOPE_VERSION
    }

    fn with_version(keys: &KeySet, kdf: Option<KdfParams>, version: u16) -> Self {
        let repository_id = uuid::Uuid::new_v4().to_string();
        RepoHeader {
            format: FORMAT_NAME.into(),
            version,
            key_check: keys.key_check(&repository_id),
            repository_id,
            created_at: Utc::now(),
            cipher: CIPHER_NAME.into(),
            segment_size_log2: SEGMENT_LOG2,
            key_id: keys.key_id_hex(),
            kdf,
        }
    }

    fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("header serializes")
    }

    /// The bytes stored as the `config` object.
    pub fn to_bytes(&self, keys: &KeySet) -> Vec<u8> {
        let envelope = Envelope {
            mac: keys.config_mac(&self.canonical()),
            config: self.clone(),
        };
        let mut out = serde_json::to_vec_pretty(&envelope).expect("envelope serializes");
        out.push(b'\n');
        out
    }

    /// Parse without a key: enough to learn the KDF parameters. Not yet authenticated.
    pub fn parse_unverified(bytes: &[u8], replica: &str) -> Result<(RepoHeader, String)> {
        let envelope: Envelope = serde_json::from_slice(bytes).map_err(|e| {
            Error::corrupt(format!(
                "replica {replica}: repository config is unreadable: {e}"
            ))
            .with_hint("`timevault replicas sync` can restore it from a healthy replica")
        })?;
        let h = &envelope.config;
        if h.format != FORMAT_NAME {
            return Err(Error::corrupt(format!(
                "replica {replica}: not a timevault repository (format {:?})",
                h.format
            )));
        }
        if !(1..=ENVELOPE_VERSION).contains(&h.version) {
            return Err(Error::corrupt(format!(
                "replica {replica}: repository format version {} is not supported by this timevault (reads 1 and 2)",
                h.version
            ))
            .with_hint("upgrade timevault"));
        }
        Ok((envelope.config, envelope.mac))
    }

    /// Prove the key, then authenticate the header.
    pub fn verify(&self, mac: &str, keys: &KeySet, replica: &str) -> Result<()> {
        if !macs_equal(&self.key_check, &keys.key_check(&self.repository_id)) {
            return Err(Error::new(
                ErrorKind::Key,
                format!(
                    "wrong key: the configured key (id {}) is not the key of repository {} (key id {})",
                    keys.key_id_hex(),
                    self.repository_id,
                    self.key_id
                ),
            )
            .with_hint(if self.is_enveloped() {
                "a copy of the repository key unwrapped to a key that is not this repository's: the copy belongs to another repository"
            } else {
                "point repository.key_file / key_env / passphrase_env at the key this repository was created with, or configure a kek the repository has a copy for"
            }));
        }
        if !macs_equal(mac, &keys.config_mac(&self.canonical())) {
            return Err(Error::corrupt(format!(
                "replica {replica}: repository config failed authentication"
            ))
            .with_hint("`timevault replicas sync` can restore it from a healthy replica"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::MasterKey;

    #[test]
    fn round_trip_and_wrong_key() {
        let keys = MasterKey::from_bytes([5; 32]).derive();
        let header = RepoHeader::new(&keys, None);
        let bytes = header.to_bytes(&keys);
        let (parsed, mac) = RepoHeader::parse_unverified(&bytes, "a").unwrap();
        assert_eq!(parsed, header);
        parsed.verify(&mac, &keys, "a").unwrap();
        let other = MasterKey::from_bytes([6; 32]).derive();
        let err = parsed.verify(&mac, &other, "a").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Key);
        assert!(err.to_string().contains("wrong key"));
    }

    #[test]
    fn edited_header_is_corrupt_not_wrong_key() {
        let keys = MasterKey::from_bytes([5; 32]).derive();
        let header = RepoHeader::new(&keys, None);
        let text = String::from_utf8(header.to_bytes(&keys)).unwrap();
        let edited = text.replace("\"segment_size_log2\": 16", "\"segment_size_log2\": 17");
        let (parsed, mac) = RepoHeader::parse_unverified(edited.as_bytes(), "a").unwrap();
        assert_eq!(
            parsed.verify(&mac, &keys, "a").unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }
}
