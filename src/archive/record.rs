//! Sealed records: one short plaintext (a change-log row of a tenant) encrypted under a
//! tenant's key inside an object that is sealed under the repository key (docs/FORMAT.md §8.2).
//! Destroying the tenant's key makes its records unreadable while the rest of the object, and
//! every other tenant's records in it, stay readable.
//!
//! A [`RecordSealer`] draws a fresh 32-byte salt; its AES-256-GCM key is the object key of
//! FORMAT.md §2.3 for that salt, kind `segment` and the name `change-record`, so no two sealers
//! share a key. Each record's nonce is the sealer's counter (12 bytes, big-endian), so a key
//! never sees a nonce twice. The associated data is a fixed label.

use std::collections::HashMap;
use std::sync::Arc;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;

use super::{KeySet, Kind};

const NAME: &str = "change-record";
const AAD: &[u8] = b"timevault/v1/change-record";

/// What a sealed record carries besides its ciphertext: which key, which salt, which counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordSeal {
    pub key_id: [u8; 8],
    pub salt: [u8; 32],
    pub counter: u64,
}

/// Seals records under one key with one salt (one per tenant per change-log batch).
pub struct RecordSealer {
    key_id: [u8; 8],
    salt: [u8; 32],
    cipher: Arc<Aes256Gcm>,
    next: u64,
}

impl RecordSealer {
    pub fn new(keys: &KeySet) -> RecordSealer {
        let mut salt = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        RecordSealer {
            key_id: keys.key_id(),
            salt,
            cipher: Arc::new(cipher(keys, &salt)),
            next: 0,
        }
    }

    /// `plaintext` sealed: its seal and the ciphertext with its tag.
    pub fn seal(&mut self, plaintext: &[u8]) -> (RecordSeal, Vec<u8>) {
        self.reserve().seal(plaintext)
    }

    /// The next record's seal, to seal its plaintext later (on another thread, in any order):
    /// the counter is spent here, so no two reserved seals of a sealer share a nonce.
    pub fn reserve(&mut self) -> ReservedSeal {
        let counter = self.next;
        self.next += 1;
        ReservedSeal {
            cipher: Arc::clone(&self.cipher),
            seal: RecordSeal {
                key_id: self.key_id,
                salt: self.salt,
                counter,
            },
        }
    }
}

/// One record's seal, its counter taken from a [`RecordSealer`]; it seals one plaintext.
pub struct ReservedSeal {
    cipher: Arc<Aes256Gcm>,
    seal: RecordSeal,
}

impl ReservedSeal {
    /// `plaintext` sealed: its seal and the ciphertext with its tag.
    pub fn seal(self, plaintext: &[u8]) -> (RecordSeal, Vec<u8>) {
        let sealed = self
            .cipher
            .encrypt(
                &nonce(self.seal.counter),
                Payload {
                    msg: plaintext,
                    aad: AAD,
                },
            )
            .expect("AES-GCM encrypts a record");
        (self.seal, sealed)
    }
}

/// Opens sealed records, deriving each sealer's key once.
#[derive(Default)]
pub struct RecordOpener {
    ciphers: HashMap<([u8; 8], [u8; 32]), Aes256Gcm>,
}

impl RecordOpener {
    /// The plaintext, or `None` when the record does not authenticate under `keys` (the wrong
    /// key, or altered bytes). `keys` must be the key `seal.key_id` names.
    pub fn open(&mut self, keys: &KeySet, seal: &RecordSeal, sealed: &[u8]) -> Option<Vec<u8>> {
        let cipher = self
            .ciphers
            .entry((seal.key_id, seal.salt))
            .or_insert_with(|| cipher(keys, &seal.salt));
        cipher
            .decrypt(
                &nonce(seal.counter),
                Payload {
                    msg: sealed,
                    aad: AAD,
                },
            )
            .ok()
    }
}

fn cipher(keys: &KeySet, salt: &[u8; 32]) -> Aes256Gcm {
    let key = zeroize::Zeroizing::new(keys.object_key(salt, Kind::Segment.code(), NAME));
    Aes256Gcm::new_from_slice(key.as_ref()).expect("32-byte key")
}

fn nonce(counter: u64) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::from(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::MasterKey;

    #[test]
    fn a_record_opens_only_under_its_key_and_unaltered() {
        let keys = MasterKey::from_bytes([3; 32]).derive();
        let mut sealer = RecordSealer::new(&keys);
        let (seal, sealed) = sealer.seal(b"{\"r\":\"I\"}");
        let mut opener = RecordOpener::default();
        assert_eq!(
            opener.open(&keys, &seal, &sealed).unwrap(),
            b"{\"r\":\"I\"}"
        );
        let other = MasterKey::from_bytes([4; 32]).derive();
        assert!(RecordOpener::default()
            .open(&other, &seal, &sealed)
            .is_none());
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert!(opener.open(&keys, &seal, &flipped).is_none());
        let moved = RecordSeal {
            counter: seal.counter + 1,
            ..seal
        };
        assert!(
            opener.open(&keys, &moved, &sealed).is_none(),
            "the counter is bound"
        );
        let (seal2, sealed2) = sealer.seal(b"{\"r\":\"I\"}");
        assert_eq!(seal2.counter, 1);
        assert_ne!(sealed, sealed2, "a new nonce, a new ciphertext");
        let (seal3, _) = RecordSealer::new(&keys).seal(b"x");
        assert_ne!(seal.salt, seal3.salt, "each sealer draws its own salt");
    }

    #[test]
    fn seals_reserved_in_order_and_sealed_out_of_order_keep_their_counters() {
        let keys = MasterKey::from_bytes([5; 32]).derive();
        let mut sealer = RecordSealer::new(&keys);
        let first = sealer.reserve();
        let second = sealer.reserve();
        let (seal2, sealed2) = second.seal(b"second");
        let (seal1, sealed1) = first.seal(b"first");
        assert_eq!((seal1.counter, seal2.counter), (0, 1));
        assert_eq!(sealer.seal(b"third").0.counter, 2);
        let mut opener = RecordOpener::default();
        assert_eq!(opener.open(&keys, &seal1, &sealed1).unwrap(), b"first");
        assert_eq!(opener.open(&keys, &seal2, &sealed2).unwrap(), b"second");
    }
}
