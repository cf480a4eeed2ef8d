//! The restore registry: the one place where a source's kind chooses how it comes back (its
//! restore, where its source and its targets live, what a dry run says about a target). The
//! daemon's side of the same choice is [`crate::source::registry`]; a new kind adds one arm
//! to each, and the compiler finds every place it must fill.

use std::collections::BTreeMap;
use std::path::Path;

use super::location::{database_location, resolve_path, store_location, Location};
use super::postgres::restore_postgres_with;
use super::postgres_tenant::TenantOptions;
use super::sqlite::{mode_like, restore_sqlite_with_mode};
use super::{restore_blobs, RestoreOptions, RestoreSummary};
use crate::config::{SourceConfig, SourceKind};
use crate::error::{Error, Result};
use crate::repo::Repository;

/// What a restore of one source needs beyond its options.
#[derive(Debug, Clone, Copy)]
pub struct ApplyContext<'a> {
    /// The configured source (a SQLite restore takes its file's permission bits).
    pub source: &'a SourceConfig,
    /// PostgreSQL: one tenant's rows only.
    pub tenant: Option<&'a TenantOptions>,
    /// Blobs: options for opening the target store.
    pub target_options: &'a BTreeMap<String, String>,
}

/// How one kind of source is restored.
#[async_trait::async_trait]
pub trait KindRestore: Sync {
    /// Restore one source as `options` says (under the read claim the restore takes).
    async fn apply(
        &self,
        repo: &Repository,
        options: &RestoreOptions,
        context: ApplyContext<'_>,
    ) -> Result<RestoreSummary>;

    /// Where the configured source lives, and the files beside it that belong to it
    /// (`(what, path)`: a SQLite database's `-wal` and `-shm`).
    fn source_location(&self, source: &SourceConfig) -> Result<Location>;

    /// The files beside the source that a restore must not touch either.
    fn sidecars(&self, _source: &SourceConfig) -> Vec<(String, String)> {
        Vec::new()
    }

    /// The target as given on the command line, made what the restore opens (a plain path
    /// to a blob store becomes an absolute `file://` URL).
    fn normalize_target(&self, target: String) -> Result<String> {
        Ok(target)
    }

    /// Where a restore into `target` writes.
    fn target_location(&self, target: &str, options: &BTreeMap<String, String>)
        -> Result<Location>;

    /// The target as the restore would find it now (`REFUSED: …` when it would refuse).
    fn target_now(&self, target: &str, force: bool) -> String;
}

/// How a source of `kind` is restored.
pub fn of(kind: SourceKind) -> &'static dyn KindRestore {
    match kind {
        SourceKind::Sqlite => &SqliteRestore,
        SourceKind::Postgres => &PostgresRestore,
        SourceKind::Blobs => &BlobsRestore,
    }
}

struct SqliteRestore;
struct PostgresRestore;
struct BlobsRestore;

#[async_trait::async_trait]
impl KindRestore for SqliteRestore {
    async fn apply(
        &self,
        repo: &Repository,
        options: &RestoreOptions,
        context: ApplyContext<'_>,
    ) -> Result<RestoreSummary> {
        let mode = mode_like(Path::new(&context.source.url));
        restore_sqlite_with_mode(repo, options, mode).await
    }

    fn source_location(&self, source: &SourceConfig) -> Result<Location> {
        Ok(Location::File(resolve_path(Path::new(&source.url))?))
    }

    fn sidecars(&self, source: &SourceConfig) -> Vec<(String, String)> {
        ["-wal", "-shm"]
            .into_iter()
            .map(|suffix| {
                (
                    format!("its {suffix} file"),
                    format!("{}{suffix}", source.url),
                )
            })
            .collect()
    }

    fn target_location(&self, target: &str, _: &BTreeMap<String, String>) -> Result<Location> {
        Ok(Location::File(resolve_path(Path::new(target))?))
    }

    fn target_now(&self, target: &str, force: bool) -> String {
        let path = Path::new(target);
        match (path.exists(), force, super::sqlite::check_not_in_use(path)) {
            (_, _, Err(e)) => format!("REFUSED: {e}"),
            (true, false, _) => "REFUSED: the file exists (pass --force to replace it)".to_string(),
            (true, true, _) => {
                "the file exists and would be replaced after the new one is built and checked"
                    .to_string()
            }
            (false, _, _) => "a new file, built beside it and renamed into place".to_string(),
        }
    }
}

#[async_trait::async_trait]
impl KindRestore for PostgresRestore {
    async fn apply(
        &self,
        repo: &Repository,
        options: &RestoreOptions,
        context: ApplyContext<'_>,
    ) -> Result<RestoreSummary> {
        restore_postgres_with(repo, options, context.tenant)
            .await
            .map(|r| r.summary)
    }

    fn source_location(&self, source: &SourceConfig) -> Result<Location> {
        database_location(&source.url)
    }

    fn target_location(&self, target: &str, _: &BTreeMap<String, String>) -> Result<Location> {
        database_location(target)
    }

    fn target_now(&self, _target: &str, _force: bool) -> String {
        "the database is built as <name>_timevault_<random>; with --force the old one is dropped and the new one renamed only after the build succeeds".to_string()
    }
}

#[async_trait::async_trait]
impl KindRestore for BlobsRestore {
    async fn apply(
        &self,
        repo: &Repository,
        options: &RestoreOptions,
        context: ApplyContext<'_>,
    ) -> Result<RestoreSummary> {
        restore_blobs(repo, options, context.target_options).await
    }

    fn source_location(&self, source: &SourceConfig) -> Result<Location> {
        store_location(&source.url, source.store_options())
    }

    fn target_location(
        &self,
        target: &str,
        options: &BTreeMap<String, String>,
    ) -> Result<Location> {
        store_location(target, options)
    }

    fn normalize_target(&self, target: String) -> Result<String> {
        if target.contains("://") {
            return Ok(target);
        }
        let absolute = std::path::absolute(&target).map_err(|e| Error::io(&target, e))?;
        url::Url::from_file_path(&absolute)
            .map(|u| u.to_string())
            .map_err(|_| Error::input(format!("--to {target}: not a usable path")))
    }

    fn target_now(&self, _target: &str, _force: bool) -> String {
        "checked when the restore starts: a non-empty target needs --force, and nothing is deleted before every object is written".to_string()
    }
}
