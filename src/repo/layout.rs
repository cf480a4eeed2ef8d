//! Every key timevault writes is built here, in one place (docs/FORMAT.md §6).
//!
//! Like restic's `Handle`, a key and the kind of object it holds go together: a reader derives
//! the kind it expects from the key's prefix, so an object moved under another prefix fails to
//! open.

use crate::archive::Kind;

/// The repository config object, the only plaintext object.
pub const CONFIG: &str = "config";

const PREFIXES: [(&str, Kind); 11] = [
    ("chunks/", Kind::Chunk),
    ("snapshots/", Kind::Snapshot),
    ("changelog/", Kind::Segment),
    ("leases/", Kind::Lease),
    ("audit/", Kind::Audit),
    ("catalog/", Kind::Catalog),
    ("manifests/", Kind::Manifest),
    ("drills/", Kind::Drill),
    (TENANT_KEYS, Kind::Key),
    (FORGOTTEN, Kind::Key),
    (DATA_KEYS, Kind::Key),
];

/// The prefix under which content objects' data keys live, sealed to the repository's content
/// identity (docs/FORMAT.md §3.4).
pub const DATA_KEYS: &str = "keys/data/";

/// `keys/data/<key id, 16 hex digits>`: one data key.
pub fn data_key(key_id: &str) -> String {
    format!("{DATA_KEYS}{key_id}")
}

/// The prefix under which tenants' data keys live (docs/FORMAT.md §3.2).
pub const TENANT_KEYS: &str = "keys/tenants/";

/// `keys/tenants/<tenant handle>/<key id>`: one data key of one tenant. The handle is keyed
/// (`KeySet::tenant_handle`), so tenant ids never appear in object names.
pub fn tenant_key(handle: &str, key_id: &str) -> String {
    format!("{TENANT_KEYS}{handle}/{key_id}")
}

/// The (handle, key id) of a tenant key's object name.
pub fn tenant_key_parts(key: &str) -> Option<(&str, &str)> {
    let (handle, id) = key.strip_prefix(TENANT_KEYS)?.split_once('/')?;
    (handle.len() == 32 && id.len() == 16).then_some((handle, id))
}

/// The prefix of forgotten tenants' records (docs/FORMAT.md §3.3).
pub const FORGOTTEN: &str = "keys/forgotten/";

/// `keys/forgotten/<tenant handle>/`: the records that the tenant's keys were destroyed.
pub fn forgotten_prefix(handle: &str) -> String {
    format!("{FORGOTTEN}{handle}/")
}

/// `keys/forgotten/<tenant handle>/<compact time>`: one forget of the tenant (a tenant whose
/// rows stayed in the source gets new keys, and can be forgotten again).
pub fn forgotten(handle: &str, at: &str) -> String {
    format!("{FORGOTTEN}{handle}/{at}")
}

/// `chunks/<first two hex digits>/<id>`.
pub fn chunk(id: &str) -> String {
    format!("chunks/{}/{id}", &id[..2])
}

/// The prefix under which every chunk lives.
pub const CHUNKS: &str = "chunks/";

/// `leases/<scope>/<generation, 20 digits>`.
pub fn lease(scope: &str, generation: u64) -> String {
    format!("leases/{scope}/{generation:020}")
}

pub fn lease_prefix(scope: &str) -> String {
    format!("leases/{scope}/")
}

/// Parse the generation from a lease key.
pub fn lease_generation(key: &str) -> Option<u64> {
    key.rsplit('/').next()?.parse().ok()
}

/// `snapshots/<source>/<chain>`: the snapshot that starts a chain.
pub fn snapshot(source: &str, chain: &str) -> String {
    format!("snapshots/{source}/{chain}")
}

pub fn snapshot_prefix(source: &str) -> String {
    format!("snapshots/{source}/")
}

/// `changelog/<source>/<chain>/<seq, 10 digits>-<captured at>[-e<lease epoch>]`: one change-log
/// segment. The capture time and the epoch of the lease it was written under in the name let the
/// catalog be built from a listing alone.
pub fn segment(
    source: &str,
    chain: &str,
    seq: u64,
    captured_at: &str,
    lease_epoch: Option<u64>,
) -> String {
    match lease_epoch {
        Some(epoch) => format!("changelog/{source}/{chain}/{seq:010}-{captured_at}-e{epoch}"),
        None => format!("changelog/{source}/{chain}/{seq:010}-{captured_at}"),
    }
}

/// The parts of a segment's name (the last key component): sequence number, capture time
/// (compact), lease epoch.
pub fn segment_name(name: &str) -> Option<(u64, &str, Option<u64>)> {
    let (seq, rest) = name.split_once('-')?;
    let (captured, epoch) = match rest.split_once("-e") {
        Some((captured, epoch)) => (captured, Some(epoch.parse().ok()?)),
        None => (rest, None),
    };
    Some((seq.parse().ok()?, captured, epoch))
}

/// `changelog/<source>/<chain>/<seq, 10 digits>-`: every key segment `seq` of a chain can have.
pub fn segment_seq_prefix(source: &str, chain: &str, seq: u64) -> String {
    format!("changelog/{source}/{chain}/{seq:010}-")
}

pub fn changelog_prefix(source: &str) -> String {
    format!("changelog/{source}/")
}

/// `manifests/<source>/<scanned at>`: the root of one blob scan manifest. The scan time in the
/// name lets the blob catalog be built from a listing alone.
pub fn manifest(source: &str, scanned_at: &str) -> String {
    format!("manifests/{source}/{scanned_at}")
}

pub fn manifest_prefix(source: &str) -> String {
    format!("manifests/{source}/")
}

/// `catalog/gc/marks/<marked at>`: chunks a prune found unreferenced (chunk GC, phase 1).
pub fn gc_mark(marked_at: &str) -> String {
    format!("{GC_MARKS}{marked_at}")
}

pub const GC_MARKS: &str = "catalog/gc/marks/";

/// `catalog/gc/keep/<chunk id>/<random>`: a writer is about to reference a marked chunk.
pub fn gc_keep(id: &str, nonce: &str) -> String {
    format!("{GC_KEEPS}{id}/{nonce}")
}

pub const GC_KEEPS: &str = "catalog/gc/keep/";

/// Present while a prune deletes chunks (chunk GC, phase 2).
pub const GC_SWEEPING: &str = "catalog/gc/sweeping";

/// `catalog/tombstones/<pruned at>`: what a prune removed, until every replica lost it.
pub fn tombstone(pruned_at: &str) -> String {
    format!("{TOMBSTONES}{pruned_at}")
}

pub const TOMBSTONES: &str = "catalog/tombstones/";

/// `catalog/claims/<source>/<claim id>/<heartbeat>`: a reader's claim on a source
/// (`repo::claim`), one object per heartbeat.
pub fn claim(source: &str, id: &str, heartbeat: &str) -> String {
    format!("{CLAIMS}{source}/{id}/{heartbeat}")
}

pub const CLAIMS: &str = "catalog/claims/";

/// The source a snapshot, change-log segment or scan manifest key belongs to.
pub fn source_of(key: &str) -> Option<&str> {
    let rest = ["snapshots/", "changelog/", "manifests/"]
        .iter()
        .find_map(|prefix| key.strip_prefix(prefix))?;
    rest.split_once('/').map(|(source, _)| source)
}

/// `<source>/<claim id>` of a claim key: one claim, whichever its heartbeat.
pub fn claim_of(key: &str) -> Option<&str> {
    let (claim, _heartbeat) = key.strip_prefix(CLAIMS)?.rsplit_once('/')?;
    claim.contains('/').then_some(claim)
}

/// `drills/<source>/<started at>`: one restore drill's record.
pub fn drill(source: &str, started_at: &str) -> String {
    format!("{DRILLS}{source}/{started_at}")
}

/// The prefix of every drill record.
pub const DRILLS: &str = "drills/";

pub fn drill_prefix(source: &str) -> String {
    format!("drills/{source}/")
}

/// The prefix of the audit log.
pub const AUDIT: &str = "audit/";

/// `audit/<compact time>-<8 hex>`: one audit record.
pub fn audit(at: &str, random_hex: &str) -> String {
    format!("{AUDIT}{at}-{random_hex}")
}

/// The chunk id of a well-formed chunk key (`chunks/<aa>/<64 hex>`, `aa` its first two
/// digits); `None` for anything else under the prefix (a stray object, which `verify`
/// reports and nothing else touches).
pub fn chunk_id_of(key: &str) -> Option<&str> {
    let (dir, id) = key.strip_prefix(CHUNKS)?.split_once('/')?;
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    (id.len() == 64 && hex(id) && id.get(..2) == Some(dir)).then_some(id)
}

/// The kind of object a key holds; `None` for the config object and for foreign keys.
pub fn kind_of(key: &str) -> Option<Kind> {
    PREFIXES
        .iter()
        .find(|(prefix, _)| key.starts_with(prefix))
        .map(|(_, kind)| *kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_kinds_agree() {
        let id = "ab".repeat(32);
        let key = chunk(&id);
        assert_eq!(key, format!("chunks/ab/{id}"));
        assert_eq!(kind_of(&key), Some(Kind::Chunk));
        assert_eq!(chunk_id_of(&key), Some(id.as_str()));
        let lease_key = lease("repository", 7);
        assert_eq!(lease_key, "leases/repository/00000000000000000007");
        assert_eq!(lease_generation(&lease_key), Some(7));
        assert_eq!(kind_of(&lease_key), Some(Kind::Lease));
        assert_eq!(kind_of(CONFIG), None);
        let claim_key = claim("app", "00ff", "20261207T020000.000000Z");
        assert_eq!(claim_of(&claim_key), Some("app/00ff"));
        assert_eq!(kind_of(&claim_key), Some(Kind::Catalog));
        assert_eq!(claim_of("catalog/claims/app"), None);
    }

    #[test]
    fn stray_keys_under_chunks_are_not_chunk_ids() {
        let id = "ab".repeat(32);
        for stray in [
            "chunks/x".to_string(),
            "chunks/ab/".to_string(),
            "chunks/ab/short".to_string(),
            format!("chunks/cd/{id}"),
            format!("chunks/ab/{}", id.to_uppercase()),
            format!("chunks/ab/{id}/extra"),
            format!("chunks/ab/{id}.tmp"),
        ] {
            assert_eq!(chunk_id_of(&stray), None, "{stray}");
        }
    }
}
