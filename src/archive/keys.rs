//! Key material: the operator's master key and the subkeys derived from it.
//!
//! The master key never encrypts data itself. HKDF-SHA256 derives one subkey per purpose
//! (docs/FORMAT.md §1), so a chunk id key, an object key and the key check can never be
//! confused, and the key id stored in headers reveals nothing about the key.

use std::fs;
use std::io::Write;
#[cfg(unix)]
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{Error, ErrorKind, Result};

/// A 256-bit master key, wiped from memory on drop and never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(********)")
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterKey(bytes)
    }

    /// The key's bytes, for wrapping it under a key-encryption key (src/keys/).
    pub(crate) fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        MasterKey(bytes)
    }

    /// Parse 64 hex digits or base64 of 32 bytes; surrounding white space is ignored.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).map_err(|e| e.to_string())?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| "neither 64 hex digits nor base64".to_string())?
        };
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("key is {} bytes, a key must be 32 bytes", b.len()))?;
        Ok(MasterKey(array))
    }

    /// Derive from a passphrase with Argon2id and the repository's stored parameters, once
    /// they passed [`KdfParams::check`]. An empty passphrase is refused.
    pub fn from_passphrase(passphrase: &str, kdf: &KdfParams) -> Result<Self> {
        if passphrase.is_empty() {
            return Err(empty_passphrase(""));
        }
        let salt = kdf.check()?;
        let params = argon2::Params::new(kdf.m_cost_kib, kdf.t_cost, kdf.p_cost, Some(32))
            .map_err(|e| Error::corrupt(format!("repository config: kdf parameters: {e}")))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = [0u8; 32];
        argon
            .hash_password_into(passphrase.as_bytes(), &salt, &mut out)
            .map_err(|e| Error::new(ErrorKind::Key, format!("argon2id: {e}")))?;
        Ok(MasterKey(out))
    }

    /// Derive every subkey.
    pub fn derive(&self) -> KeySet {
        let sub = |label: &str| *self.subkey(label);
        let id = sub("timevault/v1/key-id");
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&id[..8]);
        KeySet {
            key_id,
            key_check: sub("timevault/v1/key-check"),
            config_mac: sub("timevault/v1/config-mac"),
            chunk_id: sub("timevault/v1/chunk-id"),
            object_root: sub("timevault/v1/object"),
            chunker: sub("timevault/v1/chunker"),
            tenant_handle: sub("timevault/v1/tenant-handle"),
        }
    }
}

impl MasterKey {
    /// The X25519 secret of the repository's content identity (docs/FORMAT.md §1.1): content
    /// objects' data keys are sealed to its public half, so a credential that holds only the
    /// public half (the `backup` role) can seal content but never open it.
    pub(crate) fn content_secret(&self) -> zeroize::Zeroizing<[u8; 32]> {
        self.subkey("timevault/v1/content-identity")
    }

    /// HKDF-SHA256 (no salt) of this key with `label` as `info` (docs/FORMAT.md §1).
    fn subkey(&self, label: &str) -> zeroize::Zeroizing<[u8; 32]> {
        let mut out = zeroize::Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(None, &self.0)
            .expand(label.as_bytes(), out.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        out
    }
}

/// Argon2id parameters stored in the repository config for passphrase-derived keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub algorithm: String,
    pub salt: String,
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

/// Argon2id memory (KiB) a repository config may ask for: the generated 64 MiB is well
/// inside; more than 1 GiB is refused as damage or tampering.
pub const KDF_MEMORY_KIB: std::ops::RangeInclusive<u32> = 8..=1 << 20;
/// Argon2id passes a repository config may ask for.
pub const KDF_PASSES: std::ops::RangeInclusive<u32> = 1..=10;
/// Argon2id lanes a repository config may ask for.
pub const KDF_LANES: std::ops::RangeInclusive<u32> = 1..=16;
/// Salt bytes a repository config may hold (Argon2 needs at least 8; timevault writes 16).
pub const KDF_SALT_BYTES: std::ops::RangeInclusive<usize> = 8..=64;

/// The error for an empty passphrase; `from` says where it came from (`""` or
/// `" in environment variable X"`).
pub fn empty_passphrase(from: &str) -> Error {
    Error::new(
        ErrorKind::Key,
        format!("empty passphrase{from}: it would protect nothing"),
    )
    .with_hint("set a long passphrase (a diceware phrase of 6 words or more), or use key_file")
}

impl KdfParams {
    /// The salt, once every parameter is within bounds. The parameters are read from a
    /// replica before any key can authenticate them, so a damaged or edited config must not
    /// make the derivation take terabytes of memory or years: out of bounds is corruption.
    pub fn check(&self) -> Result<Vec<u8>> {
        self.parameters()
            .and_then(|()| self.salt_bytes())
            .map_err(|what| {
                Error::corrupt(format!("repository config: kdf {what}"))
                    .with_hint("the config object was damaged or edited; `timevault replicas sync` can restore it from a healthy replica")
            })
    }

    /// Algorithm and cost parameters within bounds, else what is wrong.
    fn parameters(&self) -> std::result::Result<(), String> {
        if self.algorithm != "argon2id" {
            return Err(format!("algorithm {:?} is not argon2id", self.algorithm));
        }
        let bounds = [
            ("m_cost_kib", self.m_cost_kib, &KDF_MEMORY_KIB),
            ("t_cost", self.t_cost, &KDF_PASSES),
            ("p_cost", self.p_cost, &KDF_LANES),
        ];
        for (field, value, range) in bounds {
            if !range.contains(&value) {
                let (low, high) = (range.start(), range.end());
                return Err(format!("{field} = {value} is outside {low}..={high}"));
            }
        }
        if self.m_cost_kib < 8 * self.p_cost {
            return Err(format!(
                "m_cost_kib = {} is less than 8 KiB per lane (p_cost = {})",
                self.m_cost_kib, self.p_cost
            ));
        }
        Ok(())
    }

    fn salt_bytes(&self) -> std::result::Result<Vec<u8>, String> {
        let salt = base64::engine::general_purpose::STANDARD
            .decode(&self.salt)
            .map_err(|_| "salt is not base64".to_string())?;
        if !KDF_SALT_BYTES.contains(&salt.len()) {
            let (low, high) = (KDF_SALT_BYTES.start(), KDF_SALT_BYTES.end());
            return Err(format!(
                "salt is {} bytes, outside {low}..={high}",
                salt.len()
            ));
        }
        Ok(salt)
    }

    /// Fresh parameters for a new repository: OWASP's Argon2id recommendation (64 MiB, t=3).
    pub fn generate() -> Self {
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        KdfParams {
            algorithm: "argon2id".into(),
            salt: base64::engine::general_purpose::STANDARD.encode(salt),
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

/// The subkeys derived from one master key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct KeySet {
    key_id: [u8; 8],
    key_check: [u8; 32],
    config_mac: [u8; 32],
    chunk_id: [u8; 32],
    object_root: [u8; 32],
    chunker: [u8; 32],
    tenant_handle: [u8; 32],
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeySet(key id {})", hex::encode(self.key_id))
    }
}

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a [`KeySet`] as a role credential carries it: the key id and six subkeys.
pub(crate) const KEY_SET_BYTES: usize = 8 + 6 * 32;

impl KeySet {
    /// The subkeys as a credential carries them ([`KEY_SET_BYTES`]).
    pub(crate) fn to_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(KEY_SET_BYTES));
        out.extend_from_slice(&self.key_id);
        for part in [
            &self.key_check,
            &self.config_mac,
            &self.chunk_id,
            &self.object_root,
            &self.chunker,
            &self.tenant_handle,
        ] {
            out.extend_from_slice(part);
        }
        out
    }

    /// [`KeySet::to_bytes`] read back; `None` unless exactly [`KEY_SET_BYTES`].
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<KeySet> {
        if bytes.len() != KEY_SET_BYTES {
            return None;
        }
        let (key_id, rest) = bytes.split_at(8);
        let part = |i: usize| -> [u8; 32] {
            rest[i * 32..(i + 1) * 32]
                .try_into()
                .expect("32-byte slice")
        };
        Some(KeySet {
            key_id: key_id.try_into().expect("8-byte slice"),
            key_check: part(0),
            config_mac: part(1),
            chunk_id: part(2),
            object_root: part(3),
            chunker: part(4),
            tenant_handle: part(5),
        })
    }

    /// These keys (a data key's: they seal) identifying chunks as `identity` does (chunk ids,
    /// the chunker, tenant handles): a content object sealed under a data key keeps the id
    /// its content has under the repository's (or its tenant's) chunk-id key, so it
    /// deduplicates with every copy written before, under whatever key.
    pub(crate) fn identified_as(mut self, identity: &KeySet) -> KeySet {
        self.chunk_id = identity.chunk_id;
        self.chunker = identity.chunker;
        self.tenant_handle = identity.tenant_handle;
        self
    }

    /// These keys identifying chunks with `chunk_id` instead (a tenant's id key, the same in
    /// all its data keys).
    pub(crate) fn with_chunk_id(mut self, chunk_id: [u8; 32]) -> KeySet {
        self.chunk_id = chunk_id;
        self
    }

    /// The chunk-id key (to carry a tenant's into its next data key's record).
    pub(crate) fn chunk_id_key(&self) -> [u8; 32] {
        self.chunk_id
    }

    pub fn key_id(&self) -> [u8; 8] {
        self.key_id
    }

    pub fn key_id_hex(&self) -> String {
        hex::encode(self.key_id)
    }

    /// The value stored in the repository config that proves a key is the right one.
    pub fn key_check(&self, repository_id: &str) -> String {
        hmac_hex(&self.key_check, repository_id.as_bytes())
    }

    /// MAC over the repository config's canonical JSON.
    pub fn config_mac(&self, canonical: &[u8]) -> String {
        hmac_hex(&self.config_mac, canonical)
    }

    /// The name a tenant's keys are stored under: 32 hex digits of HMAC-SHA256(tenant-handle
    /// subkey, tenant id), so object names never reveal tenant ids.
    pub fn tenant_handle(&self, tenant: &str) -> String {
        hmac_hex(&self.tenant_handle, tenant.as_bytes())[..32].to_string()
    }

    /// Content address of a chunk: keyed BLAKE3 of its plaintext, 64 hex digits.
    pub fn chunk_id(&self, plaintext: &[u8]) -> String {
        blake3::keyed_hash(&self.chunk_id, plaintext)
            .to_hex()
            .to_string()
    }

    /// The gear table of content-defined chunking (docs/FORMAT.md §7.1): 256 words of the
    /// BLAKE3 keyed XOF (chunker key, label `timevault/v1/cdc-gear`), little-endian. Secret,
    /// so chunk boundaries (and so the sizes of stored chunks) depend on the repository's key
    /// and cannot be computed for a known file by someone without it; never stored.
    pub fn cdc_gear(&self) -> [u64; 256] {
        let mut hasher = blake3::Hasher::new_keyed(&self.chunker);
        hasher.update(b"timevault/v1/cdc-gear");
        let mut bytes = [0u8; 256 * 8];
        hasher.finalize_xof().fill(&mut bytes);
        let mut gear = [0u64; 256];
        for (word, chunk) in gear.iter_mut().zip(bytes.chunks_exact(8)) {
            *word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
        bytes.zeroize();
        gear
    }

    /// The per-object AES-256 key for one object (docs/FORMAT.md §2.3).
    pub(crate) fn object_key(&self, salt: &[u8; 32], kind: u8, name: &str) -> [u8; 32] {
        let hk = Hkdf::<Sha256>::new(Some(salt), &self.object_root);
        let name_len = u16::try_from(name.len()).expect("object names are short");
        let mut info = Vec::with_capacity(32 + name.len());
        info.extend_from_slice(b"timevault/v1/object-key");
        info.push(kind);
        info.extend_from_slice(&name_len.to_be_bytes());
        info.extend_from_slice(name.as_bytes());
        let mut out = [0u8; 32];
        hk.expand(&info, &mut out)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        out
    }
}

fn hmac_hex(key: &[u8; 32], data: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(data);
    hex::encode(mac.finalize().into_bytes())
}

/// Constant-time comparison of two hex MACs.
pub fn macs_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Read a key file, refusing one that group or others can read.
pub fn read_key_file(path: &Path) -> Result<MasterKey> {
    let text = read_key_text(path)?;
    MasterKey::parse(&text).map_err(|e| {
        Error::new(ErrorKind::Key, format!("key file {}: {e}", path.display()))
            .with_hint("a key file holds 64 hex digits or base64 of 32 bytes")
    })
}

/// A key file's text (a key, or a role credential), refusing a file that group or others can
/// read.
pub fn read_key_text(path: &Path) -> Result<zeroize::Zeroizing<String>> {
    let meta = fs::metadata(path).map_err(|e| {
        Error::new(ErrorKind::Key, format!("key file {}: {e}", path.display())).with_hint(
            "run `timevault init` to generate a key, or set repository.key_file to the existing key",
        )
    })?;
    #[cfg(unix)]
    {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::new(
                ErrorKind::Key,
                format!(
                    "key file {} has mode {mode:04o}: it is readable by group or others",
                    path.display()
                ),
            )
            .with_hint(format!("chmod 600 {}", path.display())));
        }
    }
    fs::read_to_string(path)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| Error::new(ErrorKind::Key, format!("key file {}: {e}", path.display())))
}

/// Write `text` (a role credential) to a new file `path` with mode 0600; refused when the file
/// exists.
pub fn write_secret_file(path: &Path, text: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent.display(), e))?;
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AlreadyExists {
            "a credential is never written over an existing file: choose another path, or remove the old one first"
        } else {
            "check the directory and its permissions"
        };
        Error::new(ErrorKind::Key, format!("{}: {e}", path.display())).with_hint(hint)
    })?;
    if let Err(e) = file.write_all(text).and_then(|_| file.sync_all()) {
        let _ = fs::remove_file(path);
        return Err(Error::io(path.display(), e));
    }
    Ok(())
}

/// Write a new random key to `path` with mode 0600; fails if the file exists.
pub fn create_key_file(path: &Path) -> Result<MasterKey> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent.display(), e))?;
    }
    let key = MasterKey::generate();
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options
        .open(path)
        .map_err(|e| Error::new(ErrorKind::Key, format!("key file {}: {e}", path.display())))?;
    let mut text = hex::encode(key.0);
    text.push('\n');
    file.write_all(text.as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|e| Error::io(path.display(), e))?;
    text.zeroize();
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_hex_and_base64() {
        let hex_key = "00".repeat(32);
        assert!(MasterKey::parse(&hex_key).is_ok());
        let b64 = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        assert!(MasterKey::parse(&format!("{b64}\n")).is_ok());
        assert!(MasterKey::parse("abcd").is_err());
    }

    #[test]
    fn subkeys_differ_and_are_deterministic() {
        let k = MasterKey::from_bytes([3; 32]).derive();
        let k2 = MasterKey::from_bytes([3; 32]).derive();
        assert_eq!(k.key_id(), k2.key_id());
        assert_ne!(k.key_check, k.chunk_id);
        assert_ne!(
            k.chunk_id(b"a"),
            MasterKey::from_bytes([4; 32]).derive().chunk_id(b"a")
        );
        assert_ne!(
            k.object_key(&[0; 32], 1, "chunks/a"),
            k.object_key(&[0; 32], 1, "chunks/b")
        );
    }

    #[test]
    fn key_file_permissions_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = create_key_file(&path).unwrap();
        assert_eq!(
            read_key_file(&path).unwrap().derive().key_id(),
            key.derive().key_id()
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_key_file(&path).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Key);
        assert!(err.to_string().contains("readable by group or others"));
        assert!(create_key_file(&path).is_err(), "never overwrites a key");
    }

    #[test]
    fn kdf_parameters_out_of_bounds_are_corrupt() {
        let good = KdfParams::generate();
        assert_eq!(good.check().unwrap().len(), 16);
        let mut cases: Vec<(&str, KdfParams)> = Vec::new();
        let mut edit = |field: &'static str, f: fn(&mut KdfParams)| {
            let mut k = good.clone();
            f(&mut k);
            cases.push((field, k));
        };
        edit("m_cost_kib", |k| k.m_cost_kib = u32::MAX);
        edit("m_cost_kib", |k| k.m_cost_kib = (1 << 20) + 1);
        edit("m_cost_kib", |k| k.m_cost_kib = 4);
        edit("t_cost", |k| k.t_cost = 0);
        edit("t_cost", |k| k.t_cost = 11);
        edit("p_cost", |k| k.p_cost = 17);
        edit("p_cost", |k| k.p_cost = 0);
        edit("m_cost_kib", |k| {
            k.m_cost_kib = 64;
            k.p_cost = 16
        });
        edit("salt", |k| k.salt = "AAA=".into());
        edit("salt", |k| k.salt = "not base64!".into());
        edit("salt", |k| {
            k.salt = base64::engine::general_purpose::STANDARD.encode([7u8; 65])
        });
        edit("algorithm", |k| k.algorithm = "argon2i".into());
        for (field, kdf) in cases {
            let err = MasterKey::from_passphrase("correct horse", &kdf).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{field}: {err}");
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn empty_passphrases_are_refused() {
        let mut kdf = KdfParams::generate();
        kdf.m_cost_kib = 256;
        kdf.t_cost = 1;
        let err = MasterKey::from_passphrase("", &kdf).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Key);
        assert!(err.to_string().contains("empty passphrase"), "{err}");
    }

    #[test]
    fn the_gear_table_is_secret_and_stable_per_key() {
        let a = MasterKey::from_bytes([3; 32]).derive();
        let b = MasterKey::from_bytes([4; 32]).derive();
        assert_eq!(a.cdc_gear(), a.cdc_gear());
        assert_ne!(a.cdc_gear(), b.cdc_gear());
        let (public, _) = fastcdc::v2020::get_gear_with_seed(0);
        assert_ne!(a.cdc_gear(), *public);
        let distinct: std::collections::BTreeSet<u64> = a.cdc_gear().into_iter().collect();
        assert_eq!(distinct.len(), 256);
        assert_ne!(a.chunker, a.chunk_id, "its own subkey");
    }

    #[test]
    fn passphrase_derivation_is_stable() {
        let mut kdf = KdfParams::generate();
        kdf.m_cost_kib = 256;
        kdf.t_cost = 1;
        let a = MasterKey::from_passphrase("correct horse", &kdf).unwrap();
        let b = MasterKey::from_passphrase("correct horse", &kdf).unwrap();
        let c = MasterKey::from_passphrase("wrong horse", &kdf).unwrap();
        assert_eq!(a.derive().key_id(), b.derive().key_id());
        assert_ne!(a.derive().key_id(), c.derive().key_id());
    }
}
