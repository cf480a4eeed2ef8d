//! Which chunks the repository still references: every snapshot, segment and scan manifest
//! of every source (not only the configured ones: other configs may share the repository).
//!
//! Manifests are read as JSON and every `{"id": <chunk id>, "len": n}` anywhere in them counts
//! (snapshot images, SQLite base frames, PostgreSQL tables, segment payloads, scan listings),
//! so a new manifest field that names chunks is protected without a change here. A scan's
//! listing chunks are read too (each distinct listing chunk once: unchanged stretches of a
//! listing are shared by many scans) for the content chunks its lines name.

use std::collections::HashSet;

use futures::{StreamExt, TryStreamExt};

use crate::archive::Kind;
use crate::error::{Error, Result};
use crate::repo::{layout, Repository};

/// Manifests read at once.
const CONCURRENCY: usize = 16;

/// The prefixes whose objects reference chunks.
const MANIFEST_PREFIXES: [&str; 3] = ["snapshots/", "changelog/", "manifests/"];

/// Every chunk id referenced by a manifest, ignoring the keys in `excluded` (objects a dry
/// run would have removed).
pub async fn referenced_chunks(
    repo: &Repository,
    excluded: &HashSet<String>,
) -> Result<HashSet<String>> {
    let mut keys = Vec::new();
    for prefix in MANIFEST_PREFIXES {
        keys.extend(
            repo.list(prefix)
                .await?
                .into_iter()
                .filter(|k| !excluded.contains(k)),
        );
    }
    let found: Vec<(Vec<String>, Vec<String>)> = futures::stream::iter(keys)
        .map(|key| async move { manifest_refs(repo, &key).await })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let mut referenced = HashSet::new();
    let mut listings = HashSet::new();
    for (chunks, listing) in found {
        referenced.extend(chunks);
        listings.extend(listing);
    }
    let listed: Vec<Vec<String>> = futures::stream::iter(listings)
        .map(|id| async move { listing_refs(repo, &id).await })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    referenced.extend(listed.into_iter().flatten());
    Ok(referenced)
}

/// The chunks one manifest names, and (for a scan root) its listing chunks.
pub(crate) async fn manifest_refs(
    repo: &Repository,
    key: &str,
) -> Result<(Vec<String>, Vec<String>)> {
    let Some(kind) = layout::kind_of(key) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let bytes = match repo.read_object(kind, key).await {
        Ok(b) => b,
        // Removed between the listing and the read (another prune): nothing to protect.
        Err(e) if e.kind() == crate::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(e.context(format!("reading references of {key}"))),
    };
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::corrupt(format!("{key}: unreadable manifest")).with_source(e))?;
    let mut chunks = Vec::new();
    collect_chunk_refs(&value, &mut chunks);
    let listing = if kind == Kind::Manifest {
        let mut ids = Vec::new();
        if let Some(l) = value.get("listing") {
            collect_chunk_refs(l, &mut ids);
        }
        ids
    } else {
        Vec::new()
    };
    Ok((chunks, listing))
}

/// The content chunks named by one listing chunk's lines.
pub(crate) async fn listing_refs(repo: &Repository, id: &str) -> Result<Vec<String>> {
    let bytes = repo.read_chunk(id).await?;
    let mut out = Vec::new();
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
            Error::corrupt(format!("listing chunk {id}: unreadable line")).with_source(e)
        })?;
        collect_chunk_refs(&value, &mut out);
    }
    Ok(out)
}

/// Every `{"id": <64 hex>, "len": <n>}` object inside `value`.
pub fn collect_chunk_refs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            if let (Some(serde_json::Value::String(id)), Some(len)) =
                (map.get("id"), map.get("len"))
            {
                if len.is_u64() && id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    out.push(id.clone());
                }
            }
            map.values().for_each(|v| collect_chunk_refs(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_chunk_refs(v, out)),
        _ => {}
    }
}
