//! Roles and their credentials (docs/FORMAT.md §1.1).
//!
//! Three roles, each able to do what the one before it can:
//!
//! * `backup` (the daemon's host): snapshots, capture, scans, prune, the catalog, leases. Its
//!   credential holds the metadata subkeys (the repository's [`KeySet`]: manifests, catalog,
//!   leases, chunk ids) and only the *public* half of the repository's content identity, an
//!   X25519 key pair. Content objects are sealed under data keys that the writer makes and
//!   seals to that public key (age's X25519 recipient), so the backup role can make them but
//!   never recover one: it cannot decrypt a row, page, change or file it wrote.
//! * `restore` (operators): also the content identity's secret half, so restore, drill and
//!   export open content.
//! * `admin`: the data key itself (a key file, an env key, a passphrase or a KEK), from which
//!   everything above derives; key management (`keys rotate`, `keys role`, `tenant forget`).
//!
//! A credential is a file like a key file (mode 0600, refused when others can read it) that a
//! host's `key_file` (or `key_env`) points at; `timevault keys role backup --out FILE` writes
//! one from the admin key.

use std::fmt;

use base64::Engine;
use bech32::{FromBase32, ToBase32, Variant};
use zeroize::Zeroizing;

use crate::archive::keys::KEY_SET_BYTES;
use crate::archive::{KeySet, MasterKey};
use crate::error::{Error, ErrorKind, Result};

/// What a credential may do; each role may do everything the ones before it may.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Backup,
    Restore,
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Backup => "backup",
            Role::Restore => "restore",
            Role::Admin => "admin",
        })
    }
}

impl Role {
    /// `backup` or `restore`: the roles a credential file can hold (`admin` is the key itself).
    pub fn parse_credential_role(text: &str) -> std::result::Result<Role, String> {
        match text {
            "backup" => Ok(Role::Backup),
            "restore" => Ok(Role::Restore),
            "admin" => Err("the admin role is the repository key itself (the key file, env key, passphrase or KEK), not a credential".into()),
            other => Err(format!("unknown role {other:?}: a credential is `backup` or `restore`")),
        }
    }

    fn code(self) -> u8 {
        match self {
            Role::Backup => 1,
            Role::Restore => 2,
            Role::Admin => 3,
        }
    }

    /// The error for `what`, which needs `needed`, asked of a credential that holds `self`.
    pub fn refuse(self, needed: Role, what: &str) -> Error {
        Error::new(
            ErrorKind::Key,
            format!("{what} needs the {needed} role; this host's credential holds the {self} role"),
        )
        .with_hint(match needed {
            Role::Admin => "run it where the repository key (or a KEK) is configured".to_string(),
            _ => format!(
                "run it on a host with a {needed} credential (`timevault keys role {needed} --out FILE`, made where the repository key is)"
            ),
        })
    }

    /// `Ok` when this role may do what `needed` may, else [`Role::refuse`].
    pub fn require(self, needed: Role, what: &str) -> Result<()> {
        if self >= needed {
            Ok(())
        } else {
            Err(self.refuse(needed, what))
        }
    }
}

const SECRET_HRP: &str = "age-secret-key-";
const PUBLIC_HRP: &str = "age";

/// The repository's content identity as one role holds it: the X25519 public key always, the
/// secret key for `restore` and `admin`.
#[derive(Clone)]
pub struct ContentKeys {
    recipient: age::x25519::Recipient,
    public: [u8; 32],
    identity: Option<age::x25519::Identity>,
    /// The secret's bytes (for a restore credential), kept to write credentials.
    secret: Option<Zeroizing<[u8; 32]>>,
}

impl fmt::Debug for ContentKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ContentKeys({}, {})",
            self.recipient,
            if self.identity.is_some() {
                "can open"
            } else {
                "seal only"
            }
        )
    }
}

impl ContentKeys {
    /// The identity of the data key `key` (the admin's).
    pub fn of_data_key(key: &MasterKey) -> ContentKeys {
        ContentKeys::of_secret(&key.content_secret())
    }

    fn of_secret(secret: &[u8; 32]) -> ContentKeys {
        let encoded = Zeroizing::new(
            bech32::encode(SECRET_HRP, secret.to_base32(), Variant::Bech32)
                .expect("the HRP is valid")
                .to_uppercase(),
        );
        let identity: age::x25519::Identity = encoded
            .parse()
            .expect("32 bytes in bech32 are an X25519 identity");
        let recipient = identity.to_public();
        let public = public_bytes(&recipient);
        ContentKeys {
            recipient,
            public,
            identity: Some(identity),
            secret: Some(Zeroizing::new(*secret)),
        }
    }

    fn of_public(public: [u8; 32]) -> ContentKeys {
        let encoded = bech32::encode(PUBLIC_HRP, public.to_base32(), Variant::Bech32)
            .expect("the HRP is valid");
        let recipient: age::x25519::Recipient = encoded
            .parse()
            .expect("32 bytes in bech32 are an X25519 recipient");
        ContentKeys {
            recipient,
            public,
            identity: None,
            secret: None,
        }
    }

    /// Only the public half: what a backup credential holds.
    pub fn seal_only(&self) -> ContentKeys {
        ContentKeys::of_public(self.public)
    }

    /// Whether content can be opened with these keys.
    pub fn can_open(&self) -> bool {
        self.identity.is_some()
    }

    /// The recipient as age writes it (`age1…`): `keys show` prints it.
    pub fn recipient(&self) -> String {
        self.recipient.to_string()
    }

    /// `key` sealed to the content identity (an age file of one X25519 stanza).
    pub fn seal(&self, key: &MasterKey) -> Result<Vec<u8>> {
        age::encrypt(&self.recipient, key.expose())
            .map_err(|e| Error::other("sealing a data key to the content identity").with_source(e))
    }

    /// [`ContentKeys::open`] of a record's base64 field (`what` names it in errors).
    pub fn open_base64(
        &self,
        text: &str,
        object: &str,
        what: &str,
        role: Role,
    ) -> Result<MasterKey> {
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| {
                Error::corrupt(format!("{object}: {what} is not base64")).with_source(e)
            })?;
        self.open(&sealed, object, role)
    }

    /// A data key sealed by [`ContentKeys::seal`], opened; `object` names it in errors. Needs
    /// the secret half: `role` is the role refused otherwise.
    pub fn open(&self, sealed: &[u8], object: &str, role: Role) -> Result<MasterKey> {
        let Some(identity) = &self.identity else {
            return Err(role.refuse(Role::Restore, &format!("opening content ({object})")));
        };
        let bytes = Zeroizing::new(age::decrypt(identity, sealed).map_err(|e| {
            Error::corrupt(format!(
                "{object}: the data key does not open with the repository's content identity"
            ))
            .with_source(e)
        })?);
        super::wrapped::data_key_from(&bytes, object)
    }
}

fn public_bytes(recipient: &age::x25519::Recipient) -> [u8; 32] {
    let (_, data, _) = bech32::decode(&recipient.to_string()).expect("age writes valid bech32");
    let bytes = Vec::<u8>::from_base32(&data).expect("age writes 32 bytes");
    bytes.try_into().expect("an X25519 public key is 32 bytes")
}

/// The line a credential file's key sits on starts with this.
pub const CREDENTIAL_PREFIX: &str = "TIMEVAULT-CREDENTIAL-1-";

/// A role credential: the metadata subkeys, the content identity as the role holds it, and
/// the repository it belongs to.
pub struct Credential {
    pub role: Role,
    pub repository_id: String,
    pub keys: KeySet,
    pub content: ContentKeys,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credential({} of {}, {:?})",
            self.role, self.repository_id, self.keys
        )
    }
}

impl Credential {
    /// A `role` credential of the repository `repository_id`, whose data key is `key`.
    pub fn derive(key: &MasterKey, repository_id: &str, role: Role) -> Result<Credential> {
        let content = ContentKeys::of_data_key(key);
        let content = match role {
            Role::Backup => content.seal_only(),
            Role::Restore => content,
            Role::Admin => {
                return Err(Error::input(
                    "the admin role is the repository key itself: no credential is made for it",
                ))
            }
        };
        Ok(Credential {
            role,
            repository_id: repository_id.to_string(),
            keys: key.derive(),
            content,
        })
    }

    /// The file's text: comment lines, then the credential on a line of its own.
    pub fn render(&self, created: chrono::DateTime<chrono::Utc>) -> Zeroizing<String> {
        let mut payload = Zeroizing::new(Vec::with_capacity(2 + 64 + KEY_SET_BYTES + 64));
        payload.push(self.role.code());
        let id = self.repository_id.as_bytes();
        payload.push(u8::try_from(id.len()).expect("repository ids are short"));
        payload.extend_from_slice(id);
        payload.extend_from_slice(&self.keys.to_bytes());
        payload.extend_from_slice(&self.content.public);
        if let Some(secret) = &self.content.secret {
            payload.extend_from_slice(secret.as_ref());
        }
        let encoded = Zeroizing::new(
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload.as_slice()),
        );
        Zeroizing::new(format!(
            "# timevault {} credential of repository {}, made {}\n# Keep it mode 0600; point [repository] key_file (or key_env) at it.\n{CREDENTIAL_PREFIX}{}\n",
            self.role,
            self.repository_id,
            created.format("%Y-%m-%dT%H:%M:%SZ"),
            encoded.as_str()
        ))
    }

    /// Whether `text` (a key file's or env key's content) holds a credential, not a key.
    pub fn is_credential(text: &str) -> bool {
        text.lines()
            .any(|l| l.trim().starts_with(CREDENTIAL_PREFIX))
    }

    /// Read a credential from a file's (or env key's) text.
    pub fn parse(text: &str) -> std::result::Result<Credential, String> {
        let line = text
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(CREDENTIAL_PREFIX))
            .ok_or_else(|| format!("no line starts with {CREDENTIAL_PREFIX}"))?;
        let payload = Zeroizing::new(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(line)
                .map_err(|_| "the credential is not base64url".to_string())?,
        );
        let damaged = || "the credential is damaged (wrong length)".to_string();
        let (&role, rest) = payload.split_first().ok_or_else(damaged)?;
        let role = match role {
            1 => Role::Backup,
            2 => Role::Restore,
            other => {
                return Err(format!(
                    "the credential names role {other}, unknown to this timevault"
                ))
            }
        };
        let (&id_len, rest) = rest.split_first().ok_or_else(damaged)?;
        let id_len = usize::from(id_len);
        if rest.len() < id_len + KEY_SET_BYTES + 32 {
            return Err(damaged());
        }
        let (id, rest) = rest.split_at(id_len);
        let repository_id = std::str::from_utf8(id).map_err(|_| damaged())?.to_string();
        let (key_set, rest) = rest.split_at(KEY_SET_BYTES);
        let keys = KeySet::from_bytes(key_set).ok_or_else(damaged)?;
        let (public, rest) = rest.split_at(32);
        let public: [u8; 32] = public.try_into().expect("32-byte slice");
        let content = match (role, rest.len()) {
            (Role::Backup, 0) => ContentKeys::of_public(public),
            (Role::Restore, 32) => {
                let secret: [u8; 32] = rest.try_into().expect("32-byte slice");
                let content = ContentKeys::of_secret(&secret);
                if content.public != public {
                    return Err("the credential's content keys do not belong together".into());
                }
                content
            }
            _ => return Err(damaged()),
        };
        Ok(Credential {
            role,
            repository_id,
            keys,
            content,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_a_missing_role_is_named() {
        assert!(Role::Admin.require(Role::Restore, "restore").is_ok());
        assert!(Role::Restore.require(Role::Restore, "restore").is_ok());
        let err = Role::Backup.require(Role::Restore, "restore").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Key);
        assert_eq!(
            err.to_string(),
            "restore needs the restore role; this host's credential holds the backup role"
        );
        assert!(Role::parse_credential_role("admin").is_err());
        assert_eq!(Role::parse_credential_role("backup"), Ok(Role::Backup));
    }

    #[test]
    fn credentials_round_trip_and_backup_cannot_open_what_it_seals() {
        let key = MasterKey::from_bytes([7; 32]);
        let data_key = MasterKey::from_bytes([9; 32]);
        let backup = Credential::derive(&key, "repo-1", Role::Backup).unwrap();
        let restore = Credential::derive(&key, "repo-1", Role::Restore).unwrap();
        let text = backup.render(chrono::Utc::now());
        assert!(Credential::is_credential(&text));
        let read = Credential::parse(&text).unwrap();
        assert_eq!(read.role, Role::Backup);
        assert_eq!(read.repository_id, "repo-1");
        assert_eq!(read.keys.key_id(), key.derive().key_id());
        assert_eq!(read.keys.chunk_id(b"x"), key.derive().chunk_id(b"x"));
        assert!(!read.content.can_open());
        let sealed = read.content.seal(&data_key).unwrap();
        let err = read
            .content
            .open(&sealed, "keys/data/x", Role::Backup)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Key);
        assert!(err.to_string().contains("needs the restore role"), "{err}");
        let restore = Credential::parse(&restore.render(chrono::Utc::now())).unwrap();
        assert_eq!(restore.role, Role::Restore);
        let opened = restore
            .content
            .open(&sealed, "keys/data/x", Role::Restore)
            .unwrap();
        assert_eq!(opened.expose(), data_key.expose());
        // The admin's content identity opens it too.
        let admin = ContentKeys::of_data_key(&key);
        assert_eq!(admin.recipient(), read.content.recipient());
        assert!(admin.open(&sealed, "k", Role::Admin).is_ok());
    }

    #[test]
    fn a_damaged_credential_is_refused() {
        let key = MasterKey::from_bytes([7; 32]);
        let text = Credential::derive(&key, "repo-1", Role::Restore)
            .unwrap()
            .render(chrono::Utc::now());
        let cut = text
            .trim_end()
            .trim_end_matches(|c: char| c != '-')
            .to_string()
            + "AAAA";
        assert!(Credential::parse(&cut).is_err());
        assert!(Credential::parse("00").is_err());
        let mut swapped = text.to_string();
        swapped = swapped.replace(CREDENTIAL_PREFIX, &format!("{CREDENTIAL_PREFIX}A"));
        assert!(Credential::parse(&swapped).is_err());
    }
}
