//! After pruning, a blob source's scans no longer follow each other everywhere: between two
//! kept calendar scans the ones in between are gone. An instant there is not restorable (the
//! rule for the state at T needs the scans that directly follow the base), so a restore must
//! refuse it rather than return a state that misses every change in the gap.
//!
//! A scan root names the scan it followed (`previous`): if the scan after the base does not
//! name the base, the scans between them were pruned, and only the base's own instant is
//! restorable from it.

use chrono::{DateTime, Utc};

use crate::catalog::blobs::BlobRestorePoint;
use crate::error::{Error, ErrorKind, Result};
use crate::repo::Repository;
use crate::stored::blobs::ScanManifest;

/// Refuse `at` when it falls in a gap that pruning left after `point.base`.
pub async fn check_blob_instant(
    repo: &Repository,
    source: &str,
    point: &BlobRestorePoint<'_>,
    at: DateTime<Utc>,
) -> Result<()> {
    let Some(next) = point.later.first() else {
        return Ok(());
    };
    if at <= point.base.scanned_at {
        return Ok(());
    }
    let root = ScanManifest::read(repo, &next.key).await?;
    if root.previous.as_deref() == Some(point.base.key.as_str()) {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::NotFound,
        format!(
            "{} is not restorable for blob source {source}: the scans between {} and {} were \
             removed by retention; restorable there: {} and {} exactly",
            at.to_rfc3339(),
            point.base.scanned_at.to_rfc3339(),
            next.scanned_at.to_rfc3339(),
            point.base.scanned_at.to_rfc3339(),
            next.scanned_at.to_rfc3339(),
        ),
    )
    .with_hint("choose one of those instants, or a time inside the PITR window (`timevault snapshots` lists the points)"))
}
