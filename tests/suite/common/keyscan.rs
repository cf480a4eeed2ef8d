//! Decrypting every object of a repository's file replicas with every key a credential holds
//! or can open from the repository: what a thief with that credential could read. Forget and
//! role tests look for their marks in what it opens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use timevault::archive::record::RecordOpener;
use timevault::archive::{self, KeySet, Kind};
use timevault::keys::data::DataKeyRecord;
use timevault::keys::role::{ContentKeys, Role};
use timevault::keys::tenant::TenantKeyRecord;
use timevault::repo::layout;
use timevault::stored::postgres::changes::{parse_lines, Record};

/// Every object file of every replica: (replica directory, object key).
pub fn objects(replicas: &[PathBuf]) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for root in replicas {
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let key = path
                        .strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned();
                    out.push((root.clone(), key));
                }
            }
        }
    }
    out
}

/// The keys a credential holds: its metadata keys, and every data key and tenant key whose
/// record they and its content identity open (`role` is what the content identity is asked
/// as: a backup credential's opens none).
pub fn keys_held(
    metadata: &KeySet,
    content: &ContentKeys,
    role: Role,
    replicas: &[PathBuf],
) -> BTreeMap<[u8; 8], KeySet> {
    let mut keys = BTreeMap::new();
    keys.insert(metadata.key_id(), metadata.clone());
    for (root, key) in objects(replicas) {
        let is_data = key.starts_with(layout::DATA_KEYS);
        if !is_data && layout::tenant_key_parts(&key).is_none() {
            continue;
        }
        let bytes = std::fs::read(root.join(&key)).unwrap();
        let plain = archive::open(metadata, Kind::Key, &key, &bytes).unwrap();
        let opened = if is_data {
            DataKeyRecord::parse(&key, &plain)
                .unwrap()
                .open(&key, content, metadata, role)
                .ok()
        } else {
            let record = TenantKeyRecord::parse(&key, &plain).unwrap();
            let local = record.local_key(&key).unwrap();
            let sealed = record.sealed_key(&key, content, role).ok().flatten();
            local.or(sealed).map(|k| record.keys_of(&key, &k).unwrap())
        };
        if let Some(k) = opened {
            keys.insert(k.key_id(), k);
        }
    }
    keys
}

/// What decrypting every object with a set of keys finds.
#[derive(Debug, Default)]
pub struct Scan {
    /// Objects opened, and of them those under a key other than the metadata key.
    pub opened: usize,
    pub under_other_keys: usize,
    /// Objects whose key is not held.
    pub unreadable: usize,
    /// Sealed change records opened, and those whose key is not held.
    pub records_opened: usize,
    pub records_unreadable: usize,
    /// Per mark, where it was found (objects; sealed records are named `<object> (sealed record)`).
    pub found: BTreeMap<String, Vec<String>>,
}

impl Scan {
    pub fn found(&self, mark: &str) -> &[String] {
        self.found.get(mark).map_or(&[], Vec::as_slice)
    }
}

/// Open every object of `replicas` with `keys` (and every sealed change record in what opens),
/// looking for `marks`.
pub fn scan(
    keys: &BTreeMap<[u8; 8], KeySet>,
    metadata_id: [u8; 8],
    replicas: &[PathBuf],
    marks: &[&str],
) -> Scan {
    let mut out = Scan::default();
    let mut opener = RecordOpener::default();
    let note = |out: &mut Scan, text: &str, whereabouts: String| {
        for mark in marks {
            if text.contains(mark) {
                out.found
                    .entry(mark.to_string())
                    .or_default()
                    .push(whereabouts.clone());
            }
        }
    };
    for (root, key) in objects(replicas) {
        let Some(kind) = layout::kind_of(&key) else {
            continue; // config and wrapped repository keys: plaintext JSON, no tenant data
        };
        let bytes = std::fs::read(root.join(&key)).unwrap();
        let id: [u8; 8] = bytes[12..20].try_into().unwrap();
        let Some(k) = keys.get(&id) else {
            out.unreadable += 1;
            continue;
        };
        let plain = archive::open(k, kind, &key, &bytes).unwrap();
        out.opened += 1;
        if id != metadata_id {
            out.under_other_keys += 1;
        }
        note(&mut out, &String::from_utf8_lossy(&plain), key.clone());
        // Change-log chunks: open every sealed record with the key it names, if it is held.
        let Ok(records) = parse_lines(&plain) else {
            continue;
        };
        for record in records {
            let Record::Sealed(sealed) = record else {
                continue;
            };
            let (seal, ciphertext) = sealed.parts().unwrap();
            match keys.get(&seal.key_id) {
                None => out.records_unreadable += 1,
                Some(k) => {
                    let mut plain = opener.open(k, &seal, &ciphertext).unwrap();
                    if sealed.z {
                        plain = zstd::stream::decode_all(plain.as_slice()).unwrap();
                    }
                    out.records_opened += 1;
                    note(
                        &mut out,
                        &String::from_utf8_lossy(&plain),
                        format!("{key} (sealed record)"),
                    );
                }
            }
        }
    }
    out
}

/// The admin's content identity, from the key file at `path`.
pub fn admin_content(path: &Path) -> ContentKeys {
    ContentKeys::of_data_key(&timevault::archive::keys::read_key_file(path).unwrap())
}
