//! The operator's local key material: a master key (key file or env key) or a passphrase.
//!
//! In a repository of format 1 it is the data key itself (a passphrase through Argon2id with
//! the parameters in `config`); in format 2 it is one more key-encryption key.

use zeroize::Zeroizing;

use crate::archive::{KdfParams, KeySet, MasterKey};
use crate::error::{Error, ErrorKind, Result};

/// Keys already derived, per KDF parameter set.
pub type Derived = Vec<(Option<KdfParams>, MasterKey, KeySet)>;

/// A key, a passphrase still to be stretched with stored parameters, or a role credential
/// (`keys role`: no data key, the subkeys a role may hold).
pub enum LocalSecret {
    Key(MasterKey),
    Passphrase(Zeroizing<String>),
    Credential(Box<super::role::Credential>),
}

impl LocalSecret {
    /// The master key of a format-1 repository whose header holds `kdf`.
    pub fn key_for(&self, kdf: Option<&KdfParams>) -> Result<MasterKey> {
        match (self, kdf) {
            (LocalSecret::Passphrase(p), Some(kdf)) => MasterKey::from_passphrase(p, kdf),
            (LocalSecret::Passphrase(_), None) => Err(Error::new(
                ErrorKind::Key,
                "this repository was created with a key, not a passphrase",
            )
            .with_hint("set repository.key_file or repository.key_env instead of passphrase_env")),
            (LocalSecret::Key(_), Some(_)) => Err(Error::new(
                ErrorKind::Key,
                "this repository was created with a passphrase, not a key",
            )
            .with_hint("set repository.passphrase_env to the variable holding the passphrase")),
            (LocalSecret::Key(key), None) => Ok(key.clone()),
            (LocalSecret::Credential(c), _) => Err(Error::new(
                ErrorKind::Key,
                format!("a {} credential is not a key", c.role),
            )),
        }
    }

    /// [`LocalSecret::key_for`] and its subkeys, derived once per distinct parameter set
    /// (`derived`): replicas normally hold the same header, and Argon2 is slow on purpose.
    pub fn keys_for(
        &self,
        kdf: Option<&KdfParams>,
        derived: &mut Derived,
    ) -> Result<(MasterKey, KeySet)> {
        if let Some((_, key, keys)) = derived.iter().find(|(k, _, _)| k.as_ref() == kdf) {
            return Ok((key.clone(), keys.clone()));
        }
        let key = self.key_for(kdf)?;
        let keys = key.derive();
        derived.push((kdf.cloned(), key.clone(), keys.clone()));
        Ok((key, keys))
    }
}
