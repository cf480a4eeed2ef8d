//! Wrapped copies of the repository data key (docs/FORMAT.md §3.1): `keys/repository/<kek id>`,
//! one per key-encryption key.
//!
//! Like `config`, a copy is plaintext JSON: it must be read before any key is known. It carries
//! a MAC under the data key it wraps (the config-MAC subkey), checked once unwrapped, so an
//! edited copy (another KEK label, other KDF parameters) is found out, and the key check in
//! `config` proves the unwrapped key is this repository's.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use chrono::{DateTime, Utc};
use hkdf::Hkdf;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::archive::keys::macs_equal;
use crate::archive::{KdfParams, KeySet, MasterKey};
use crate::error::{Error, ErrorKind, Result};

pub const FORMAT: &str = "wrapped-key/1";
/// Where the repository data key's wrapped copies live.
pub const PREFIX: &str = "keys/repository/";

/// How the data key was wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    /// AWS KMS `Encrypt` with a symmetric key and the repository's encryption context.
    #[serde(rename = "aws-kms-symmetric")]
    AwsKmsSymmetric,
    /// AES-256-GCM under a subkey of the local key file or env key.
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// AES-256-GCM under an Argon2id stretch of a passphrase (parameters in `kdf`).
    #[serde(rename = "argon2id+aes-256-gcm")]
    Argon2idAes256Gcm,
    /// Azure Key Vault `wrapKey` with an RSA key (RSA-OAEP with SHA-256 and MGF1-SHA-256).
    #[serde(rename = "RSA-OAEP-256")]
    RsaOaep256,
    /// Azure Key Vault `wrapKey` with a symmetric (`oct` / `oct-HSM`) key: AES key wrap, RFC 3394.
    #[serde(rename = "A256KW")]
    A256Kw,
}

/// The authenticated fields of a wrapped copy, in canonical order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedKey {
    pub format: String,
    pub repository_id: String,
    /// The KEK as `keys show` names it: `aws-kms:<arn>`, `local:<16 hex>` or `passphrase`.
    pub kek: String,
    pub algorithm: Algorithm,
    pub kdf: Option<KdfParams>,
    /// Base64 of the wrapped key (for AES-256-GCM: the 12-byte nonce, then the ciphertext).
    pub wrapped: String,
    pub created_at: DateTime<Utc>,
    /// The key version that wrapped it, where the service has versions: Azure Key Vault's key
    /// identifier (`https://<vault>/keys/<name>/<version>`), which unwrapping must name. Absent
    /// from other copies, and then not serialized at all, so copies written before this field
    /// existed keep their canonical bytes (and their MAC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    key: WrappedKey,
    mac: String,
}

/// A copy as read from a replica, not yet authenticated.
#[derive(Debug, Clone)]
pub struct FoundCopy {
    /// The object's name (`keys/repository/...`).
    pub object: String,
    pub key: WrappedKey,
    mac: String,
}

impl WrappedKey {
    pub fn new(
        repository_id: &str,
        kek: &str,
        algorithm: Algorithm,
        kdf: Option<KdfParams>,
        wrapped: &[u8],
    ) -> WrappedKey {
        WrappedKey {
            format: FORMAT.into(),
            repository_id: repository_id.into(),
            kek: kek.into(),
            algorithm,
            kdf,
            wrapped: base64::engine::general_purpose::STANDARD.encode(wrapped),
            created_at: Utc::now(),
            kid: None,
        }
    }

    /// The same record naming the key version that wrapped it.
    pub fn with_kid(mut self, kid: impl Into<String>) -> WrappedKey {
        self.kid = Some(kid.into());
        self
    }

    fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("wrapped key serializes")
    }

    /// The stored object, MACed under the data key it wraps.
    pub fn to_bytes(&self, data_keys: &KeySet) -> Vec<u8> {
        let stored = Stored {
            mac: data_keys.config_mac(&self.canonical()),
            key: self.clone(),
        };
        let mut out = serde_json::to_vec_pretty(&stored).expect("wrapped key serializes");
        out.push(b'\n');
        out
    }

    pub fn wrapped_bytes(&self) -> Result<Vec<u8>> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.wrapped)
            .map_err(|e| {
                Error::corrupt(format!("wrapped key for {}: not base64", self.kek)).with_source(e)
            })
    }
}

impl FoundCopy {
    /// Parse a copy read from `object`. Not yet authenticated: that needs the key it wraps.
    pub fn parse(object: &str, bytes: &[u8]) -> Result<FoundCopy> {
        let stored: Stored = serde_json::from_slice(bytes).map_err(|e| {
            Error::corrupt(format!("{object}: unreadable wrapped key")).with_source(e)
        })?;
        if stored.key.format != FORMAT {
            return Err(Error::corrupt(format!(
                "{object}: wrapped key format {:?} is not supported by this timevault (reads {FORMAT})",
                stored.key.format
            ))
            .with_hint("upgrade timevault"));
        }
        Ok(FoundCopy {
            object: object.to_string(),
            key: stored.key,
            mac: stored.mac,
        })
    }

    /// The same object with the same content (read from another replica).
    pub fn same(&self, other: &FoundCopy) -> bool {
        self.object == other.object && self.key == other.key && self.mac == other.mac
    }

    /// Authenticate the copy with the data key it unwrapped to.
    pub fn authenticate(&self, data_keys: &KeySet) -> Result<()> {
        if macs_equal(&self.mac, &data_keys.config_mac(&self.key.canonical())) {
            Ok(())
        } else {
            Err(Error::corrupt(format!(
                "{}: wrapped key failed authentication",
                self.object
            ))
            .with_hint("`timevault replicas sync` can restore it from a healthy replica"))
        }
    }
}

/// A local key-encryption key: a key file or env key, or a passphrase stretched with Argon2id.
/// It wraps with AES-256-GCM under `HKDF(key, "timevault/v1/kek-wrap")`; the associated data
/// binds the repository and the KEK label.
pub struct LocalWrap {
    wrap_key: Zeroizing<[u8; 32]>,
}

impl LocalWrap {
    pub fn new(key: &MasterKey) -> LocalWrap {
        let hk = Hkdf::<Sha256>::new(None, key.expose());
        let mut wrap_key = Zeroizing::new([0u8; 32]);
        hk.expand(b"timevault/v1/kek-wrap", wrap_key.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        LocalWrap { wrap_key }
    }

    fn aad(repository_id: &str, label: &str) -> Vec<u8> {
        let mut aad = b"timevault/v1/wrapped-key".to_vec();
        aad.extend_from_slice(repository_id.as_bytes());
        aad.push(0);
        aad.extend_from_slice(label.as_bytes());
        aad
    }

    pub fn wrap(&self, repository_id: &str, label: &str, data_key: &MasterKey) -> Vec<u8> {
        let cipher = Aes256Gcm::new_from_slice(self.wrap_key.as_ref()).expect("32-byte key");
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = Self::aad(repository_id, label);
        let sealed = cipher
            .encrypt(
                &Nonce::try_from(&nonce[..]).expect("12-byte nonce"),
                Payload {
                    msg: data_key.expose(),
                    aad: &aad,
                },
            )
            .expect("AES-GCM encrypts 32 bytes");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    /// The data key, or a key error: a wrong local key fails authentication here.
    pub fn unwrap(&self, repository_id: &str, label: &str, wrapped: &[u8]) -> Result<MasterKey> {
        let cipher = Aes256Gcm::new_from_slice(self.wrap_key.as_ref()).expect("32-byte key");
        let refused = || {
            Error::new(
                ErrorKind::Key,
                format!("{label}: this key does not unwrap the repository key"),
            )
        };
        if wrapped.len() < 12 {
            return Err(refused());
        }
        let (nonce, sealed) = wrapped.split_at(12);
        let aad = Self::aad(repository_id, label);
        let plain = Zeroizing::new(
            cipher
                .decrypt(
                    &Nonce::try_from(nonce).expect("12-byte nonce"),
                    Payload {
                        msg: sealed,
                        aad: &aad,
                    },
                )
                .map_err(|_| refused())?,
        );
        data_key_from(&plain, label)
    }
}

/// A data key from unwrapped bytes, which must be 32.
pub fn data_key_from(bytes: &[u8], kek: &str) -> Result<MasterKey> {
    let array: [u8; 32] = bytes.try_into().map_err(|_| {
        Error::corrupt(format!(
            "{kek}: the unwrapped repository key is {} bytes, not 32",
            bytes.len()
        ))
    })?;
    Ok(MasterKey::from_bytes(array))
}

/// The label of a local key: `local:` and 16 hex digits of an HMAC of the key, which names the
/// key without revealing it.
pub fn local_label(key: &MasterKey) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<Sha256>::new_from_slice(key.expose()).expect("HMAC takes any key");
    mac.update(b"timevault/v1/kek-id");
    format!("local:{}", &hex::encode(mac.finalize().into_bytes())[..16])
}

/// The object holding the copy wrapped by `label`: `keys/repository/<16 hex of SHA-256(label)>`.
/// A passphrase's copies are told apart by their salt (`suffix`).
pub fn object_name(label: &str, suffix: Option<&str>) -> String {
    use sha2::Digest;
    let digest = hex::encode(Sha256::digest(label.as_bytes()));
    match suffix {
        Some(s) => format!("{PREFIX}{}-{s}", &digest[..16]),
        None => format!("{PREFIX}{}", &digest[..16]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_wrap_round_trips_and_binds_repository_and_label() {
        let kek = MasterKey::from_bytes([7; 32]);
        let data = MasterKey::from_bytes([9; 32]);
        let wrap = LocalWrap::new(&kek);
        let label = local_label(&kek);
        let wrapped = wrap.wrap("repo-a", &label, &data);
        let back = wrap.unwrap("repo-a", &label, &wrapped).unwrap();
        assert_eq!(back.expose(), data.expose());
        assert_eq!(
            wrap.unwrap("repo-b", &label, &wrapped).unwrap_err().kind(),
            ErrorKind::Key
        );
        let other = LocalWrap::new(&MasterKey::from_bytes([8; 32]));
        assert_eq!(
            other.unwrap("repo-a", &label, &wrapped).unwrap_err().kind(),
            ErrorKind::Key
        );
    }

    /// A copy as written before `kid` existed (a format-2 repository made with a key file).
    const OLD_COPY: &str = r#"{"format":"wrapped-key/1","repository_id":"4f1c","kek":"local:0011223344556677","algorithm":"aes-256-gcm","kdf":null,"wrapped":"AQID","created_at":"2026-01-02T03:04:05Z"}"#;

    #[test]
    fn a_copy_without_kid_keeps_its_canonical_bytes_and_mac() {
        let old: WrappedKey = serde_json::from_str(OLD_COPY).unwrap();
        assert_eq!(old.kid, None);
        // The MAC is over these bytes: unchanged, so copies already written still authenticate.
        assert_eq!(String::from_utf8(old.canonical()).unwrap(), OLD_COPY);
        let data = MasterKey::from_bytes([9; 32]).derive();
        let stored = format!(
            r#"{{"key":{OLD_COPY},"mac":"{}"}}"#,
            data.config_mac(OLD_COPY.as_bytes())
        );
        FoundCopy::parse("keys/repository/x", stored.as_bytes())
            .unwrap()
            .authenticate(&data)
            .unwrap();
    }

    #[test]
    fn an_azure_copy_records_and_authenticates_its_kid() {
        let data = MasterKey::from_bytes([9; 32]).derive();
        let kid = "https://v.vault.azure.net/keys/k/0123456789abcdef";
        let copy = WrappedKey::new(
            "repo",
            "azure-keyvault:https://v.vault.azure.net/keys/k",
            Algorithm::RsaOaep256,
            None,
            &[1, 2, 3],
        )
        .with_kid(kid);
        let json = String::from_utf8(copy.canonical()).unwrap();
        assert!(
            json.contains(r#""algorithm":"RSA-OAEP-256""#)
                && json.ends_with(&format!(r#","kid":"{kid}"}}"#)),
            "{json}"
        );
        let bytes = copy.to_bytes(&data);
        let found = FoundCopy::parse("keys/repository/x", &bytes).unwrap();
        assert_eq!(found.key.kid.as_deref(), Some(kid));
        found.authenticate(&data).unwrap();
        // Another version named in the record is found out by the MAC.
        let edited = String::from_utf8(bytes)
            .unwrap()
            .replace("0123456789abcdef", "fedcba9876543210");
        let found = FoundCopy::parse("keys/repository/x", edited.as_bytes()).unwrap();
        assert_eq!(
            found.authenticate(&data).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let a256kw: Algorithm = serde_json::from_str(r#""A256KW""#).unwrap();
        assert_eq!(a256kw, Algorithm::A256Kw);
    }

    #[test]
    fn an_edited_copy_fails_authentication() {
        let data = MasterKey::from_bytes([9; 32]).derive();
        let copy = WrappedKey::new("repo", "local:00", Algorithm::Aes256Gcm, None, &[1, 2, 3]);
        let bytes = copy.to_bytes(&data);
        let found = FoundCopy::parse("keys/repository/x", &bytes).unwrap();
        found.authenticate(&data).unwrap();
        let edited = String::from_utf8(bytes)
            .unwrap()
            .replace("local:00", "local:01");
        let found = FoundCopy::parse("keys/repository/x", edited.as_bytes()).unwrap();
        assert_eq!(
            found.authenticate(&data).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }
}
