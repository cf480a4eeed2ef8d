//! One tenant's blobs as of an instant.
//!
//! The scans a restore to the instant would read (the base scan and the two after it) are
//! streamed listing chunk by listing chunk; only the tenant's entries are kept (by key prefix,
//! or by the key set the tenant's rows list), and the pure [`plan_blobs`] picks each key's
//! version at the instant, exactly as a full restore would. Memory grows with the tenant's
//! file count, not the store's. Each object is then rebuilt from its chunks into a spool file,
//! checked against the size and SHA-256 recorded at scan time, and handed to the archive.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::catalog::blobs::{plan_blobs, BlobCatalog, ScanListing};
use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::stored::blobs::{BlobEntry, ScanManifest};

/// Which keys of a blob source belong to the tenant.
pub enum KeyFilter {
    Prefix(String),
    Keys(HashSet<String>),
}

impl KeyFilter {
    fn keeps(&self, key: &str) -> bool {
        match self {
            KeyFilter::Prefix(p) => key.starts_with(p.as_str()),
            KeyFilter::Keys(keys) => keys.contains(key),
        }
    }
}

/// What the blob side of an export used.
#[derive(Debug, Clone, Serialize)]
pub struct BlobSourceUsed {
    pub name: String,
    pub kind: &'static str,
    /// The base scan's time and the later scans consulted.
    pub base_scan: DateTime<Utc>,
    pub later_scans: Vec<DateTime<Utc>>,
    /// The last known event the files include.
    pub restored_to: DateTime<Utc>,
}

/// The tenant's entries of blob source `source` at `at`, sorted by key.
pub async fn plan_tenant_blobs(
    repo: &Repository,
    source: &str,
    at: DateTime<Utc>,
    filter: &KeyFilter,
) -> Result<(Vec<BlobEntry>, BlobSourceUsed)> {
    let catalog = BlobCatalog::load(repo, source).await?;
    let point = catalog.plan(at)?;
    let mut listings = Vec::new();
    for scan in std::iter::once(point.base).chain(point.later) {
        let manifest = ScanManifest::read(repo, &scan.key).await?;
        let mut reader = manifest.entries(repo);
        let mut entries = Vec::new();
        while let Some(entry) = reader.next_entry().await? {
            if filter.keeps(&entry.key) {
                entries.push(entry);
            }
        }
        listings.push(ScanListing {
            scanned_at: scan.scanned_at,
            entries,
        });
    }
    let plan = plan_blobs(&listings, at).expect("the base scan is at or before the instant");
    let used = BlobSourceUsed {
        name: source.to_string(),
        kind: "blobs",
        base_scan: point.base.scanned_at,
        later_scans: point.later.iter().map(|s| s.scanned_at).collect(),
        restored_to: plan.restored_to,
    };
    Ok((plan.entries, used))
}

/// Rebuild `entry` into the file `path`, verified against its recorded size and SHA-256.
pub async fn spool_blob(repo: &Repository, entry: &BlobEntry, path: &Path) -> Result<()> {
    let io = |e: std::io::Error| Error::io(path.display(), e);
    let mut file =
        std::io::BufWriter::with_capacity(1 << 20, super::create_private(path).map_err(io)?);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    for chunk in &entry.chunks {
        let data = repo
            .read_chunk(&chunk.id)
            .await
            .map_err(|e| e.context(format!("blob {}", entry.key)))?;
        if data.len() as u64 != chunk.len {
            return Err(Error::corrupt(format!(
                "blob {}: chunk {} has {} bytes, the manifest says {}",
                entry.key,
                chunk.id,
                data.len(),
                chunk.len
            )));
        }
        hasher.update(&data);
        size += data.len() as u64;
        file.write_all(&data).map_err(io)?;
    }
    file.flush().map_err(io)?;
    if size != entry.size || hex::encode(hasher.finalize()) != entry.sha256 {
        return Err(Error::corrupt(format!(
            "blob {}: rebuilt content ({size} bytes) does not match the size ({}) and SHA-256 recorded when it was scanned",
            entry.key, entry.size
        ))
        .with_hint("`timevault verify --read-data` shows the state of every replica"));
    }
    Ok(())
}
