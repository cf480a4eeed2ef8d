//! One catalog for every kind of source: the chains (snapshot and change log) of a SQLite or
//! PostgreSQL source, or the scans of a blob source, behind the questions every reader asks
//! (restorable windows, the newest instant, the full images). Callers that only ask those
//! questions hold a [`Catalog`] and never branch on the source's kind.

use chrono::{DateTime, Utc};

use super::blobs::BlobCatalog;
use super::{SourceCatalog, Window};
use crate::config::{SourceConfig, SourceKind};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::Repository;
use crate::time::At;

/// What a restore to an instant reads, whatever the kind.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestPlan {
    /// The instant asked for (`latest` resolved).
    pub requested: DateTime<Utc>,
    /// The instant whose state the restore reaches (at or before `requested`).
    pub reaches: DateTime<Utc>,
    /// The manifests it reads: the full image first, then the later parts in order.
    pub manifests: Vec<String>,
}

/// A source's catalog, whatever its kind.
#[derive(Debug, Clone)]
pub enum Catalog {
    /// Snapshots and the change log after each (SQLite, PostgreSQL).
    Chains(SourceCatalog),
    /// Full listings taken by scans (blobs).
    Scans(BlobCatalog),
}

impl Catalog {
    /// The catalog as listed now. A chain's end is its newest capture; see [`Catalog::load_for`]
    /// for the instant the live daemon confirmed.
    pub async fn load(repo: &Repository, source: &SourceConfig) -> Result<Catalog> {
        Ok(match source.kind() {
            SourceKind::Blobs => Catalog::Scans(BlobCatalog::load(repo, &source.name).await?),
            SourceKind::Sqlite | SourceKind::Postgres => {
                Catalog::Chains(SourceCatalog::load(repo, &source.name).await?)
            }
        })
    }

    /// For a reader about to resolve `at`: chains are confirmed through the live daemon's
    /// lease ([`SourceCatalog::load_for`]); scans need no confirmation.
    pub async fn load_for(repo: &Repository, source: &SourceConfig, at: At) -> Result<Catalog> {
        Ok(match source.kind() {
            SourceKind::Blobs => Catalog::Scans(BlobCatalog::load(repo, &source.name).await?),
            SourceKind::Sqlite | SourceKind::Postgres => {
                Catalog::Chains(SourceCatalog::load_for(repo, &source.name, at).await?)
            }
        })
    }

    /// What the live daemon confirmed for a chain catalog ([`SourceCatalog::confirm`]);
    /// scans need no confirmation.
    pub async fn confirm(
        &mut self,
        repo: &Repository,
        wait_for: Option<DateTime<Utc>>,
        max_wait: std::time::Duration,
    ) -> Result<()> {
        match self {
            Catalog::Chains(c) => c.confirm(repo, wait_for, max_wait).await,
            Catalog::Scans(_) => Ok(()),
        }
    }

    /// Restorable windows, oldest first.
    pub fn windows(&self) -> Vec<Window> {
        match self {
            Catalog::Chains(c) => c.windows(),
            Catalog::Scans(c) => c.windows(),
        }
    }

    /// The newest restorable instant.
    pub fn newest(&self) -> Option<DateTime<Utc>> {
        match self {
            Catalog::Chains(c) => c.newest(),
            Catalog::Scans(c) => c.newest(),
        }
    }

    /// The instants of the full images, oldest first: snapshots (each starts a chain) or scans.
    pub fn images(&self) -> Vec<DateTime<Utc>> {
        match self {
            Catalog::Chains(c) => c.chains.iter().map(|chain| chain.start()).collect(),
            Catalog::Scans(c) => c.scans.iter().map(|scan| scan.scanned_at).collect(),
        }
    }

    /// The newest full image: the last snapshot or scan.
    pub fn last_image(&self) -> Option<DateTime<Utc>> {
        match self {
            Catalog::Chains(c) => c.latest_chain().map(|chain| chain.start()),
            Catalog::Scans(c) => c.newest(),
        }
    }
    /// The instant `at` names: a given instant, or the newest one restorable.
    pub fn resolve(&self, at: At) -> Result<DateTime<Utc>> {
        match (self, at) {
            (Catalog::Chains(c), at) => c.resolve(at),
            (Catalog::Scans(_), At::Instant(t)) => Ok(t),
            (Catalog::Scans(c), At::Latest) => c.newest().ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("source {} has no scans yet", c.source),
                )
                .with_hint("run `timevault backup` or `timevault daemon --once` first")
            }),
        }
    }

    /// What a restore to `at` reads, or why `at` is not restorable.
    pub fn plan_manifests(&self, at: At) -> Result<ManifestPlan> {
        let requested = self.resolve(at)?;
        Ok(match self {
            Catalog::Chains(c) => {
                let point = c.plan(requested)?;
                ManifestPlan {
                    requested,
                    reaches: point.effective,
                    manifests: std::iter::once(point.chain.snapshot.key.clone())
                        .chain(point.segments.iter().map(|s| s.key.clone()))
                        .collect(),
                }
            }
            Catalog::Scans(c) => {
                let point = c.plan(requested)?;
                let reaches = point.later.last().unwrap_or(point.base).scanned_at;
                ManifestPlan {
                    requested,
                    reaches: reaches.min(requested),
                    manifests: std::iter::once(point.base)
                        .chain(point.later)
                        .map(|s| s.key.clone())
                        .collect(),
                }
            }
        })
    }
}
