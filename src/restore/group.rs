//! A restore of one source or a consistency group, as the library offers it to every caller
//! (the CLI's `restore` is one): plan, then apply each source, then finish.
//!
//! [`plan`] refuses every target that is, lies inside or contains a configured source, a
//! replica or another target (with or without `force`), checks the tenant rules and resolves
//! the one instant every source is restored to (`latest` of a group: the newest instant all of
//! them reach). [`GroupPlan::apply`] restores one source of the plan. [`GroupPlan::finish`] runs
//! the reference check (a SQLite database and a blob store restored together: every blob the
//! database references must exist) and writes the audit record. A library caller that uses
//! these gets the same protections and the same audit trail as an operator at the CLI.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::postgres_tenant::TenantOptions;
use super::registry::{self, ApplyContext};
use super::target::check_targets;
use super::{check_references, RestoreOptions, RestoreSummary};
use crate::audit::{self, AuditEvent};
use crate::catalog::Catalog;
use crate::config::{Config, SourceConfig, SourceKind};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::Repository;
use crate::time::At;

/// What to restore.
#[derive(Debug, Clone)]
pub struct GroupRequest {
    /// `(source, target)` pairs: a SQLite path, a PostgreSQL URL or a blob store URL each.
    pub targets: Vec<(String, String)>,
    pub at: At,
    /// Replace existing targets (each only once its replacement is complete).
    pub force: bool,
    /// PostgreSQL: connections that load rows and build indexes at once.
    pub jobs: Option<usize>,
    /// PostgreSQL: only this tenant's rows, by the config's `[tenancy]` map (strict).
    pub tenant: Option<String>,
    /// Options for opening blob targets (credentials, endpoint).
    pub target_options: BTreeMap<String, String>,
    /// The reference check's query (SQL over the restored SQLite database, one key per row).
    pub reference_query: String,
    /// For the audit record.
    pub requested_by: Option<String>,
    pub reason: Option<String>,
}

/// A checked request: the targets passed every check and the instant is resolved.
#[derive(Debug)]
pub struct GroupPlan<'c> {
    config: &'c Config,
    request: GroupRequest,
    /// The instant every source is restored to.
    pub at: At,
    tenant: Option<TenantOptions>,
}

/// What a group restore did.
#[derive(Debug, Clone, Serialize)]
pub struct GroupRestore {
    pub restored: Vec<RestoreSummary>,
    /// The reference check's missing blob keys (`None`: no database and blob store together).
    pub missing_blobs: Option<Vec<String>>,
}

impl GroupRestore {
    /// Whether the restored group is whole (no referenced blob missing).
    pub fn is_whole(&self) -> bool {
        self.missing_blobs.as_ref().is_none_or(|m| m.is_empty())
    }
}

/// Check the request against `config` (targets, tenant rules) and resolve its instant.
/// Nothing is written.
pub async fn plan<'c>(
    config: &'c Config,
    repo: &Repository,
    request: GroupRequest,
) -> Result<GroupPlan<'c>> {
    if request.targets.is_empty() {
        return Err(Error::input("nothing to restore: no target given")
            .with_hint("name a source and its target (--source S --to T)"));
    }
    // No target may be, lie inside or contain a source, a replica or another target.
    check_targets(config, &request.targets, &request.target_options)?;
    if let Some((name, _)) = request.targets.iter().find(|(name, _)| {
        request.tenant.is_some()
            && config
                .source(name)
                .is_ok_and(|s| s.kind() != SourceKind::Postgres)
    }) {
        return Err(Error::input(format!(
            "--tenant restores one tenant of a postgres source; {name} is not one"
        ))
        .with_hint("restore the whole source (leave out --tenant)"));
    }
    // A tenant is restored by the config's [tenancy] map, strictly, as an export is.
    let tenant = match &request.tenant {
        Some(t) => Some(TenantOptions::strict(t, config.tenancy.as_ref())?),
        None => None,
    };
    let at = match request.at {
        At::Latest if request.targets.len() > 1 => {
            At::Instant(group_latest(repo, config, &request.targets).await?)
        }
        at => at,
    };
    Ok(GroupPlan {
        config,
        request,
        at,
        tenant,
    })
}

impl GroupPlan<'_> {
    /// The `(source, target)` pairs, in the order they are restored.
    pub fn targets(&self) -> &[(String, String)] {
        &self.request.targets
    }

    /// The configured source of the `index`th target.
    pub fn source(&self, index: usize) -> Result<&SourceConfig> {
        self.config.source(&self.request.targets[index].0)
    }

    /// Restore the `index`th source of the plan.
    pub async fn apply(&self, repo: &Repository, index: usize) -> Result<RestoreSummary> {
        let (name, target) = &self.request.targets[index];
        let source = self.config.source(name)?;
        let options = RestoreOptions {
            source: name.clone(),
            at: self.at,
            target: target.clone(),
            force: self.request.force,
            jobs: self.request.jobs,
        };
        let context = ApplyContext {
            source,
            tenant: self.tenant.as_ref(),
            target_options: &self.request.target_options,
        };
        registry::of(source.kind())
            .apply(repo, &options, context)
            .await
    }

    /// After every source is restored: the reference check, then the audit record.
    pub async fn finish(
        &self,
        repo: &Repository,
        restored: Vec<RestoreSummary>,
    ) -> Result<GroupRestore> {
        let missing_blobs = self.check_references().await?;
        audit::record(
            repo,
            AuditEvent {
                command: "restore".into(),
                requested_by: self.request.requested_by.clone(),
                reason: self.request.reason.clone(),
                tenant: self.request.tenant.clone(),
                sources: restored.iter().map(|s| s.source.clone()).collect(),
                instant: restored.iter().map(|s| s.requested).max(),
                outputs: restored.iter().map(|s| s.target.clone()).collect(),
                output_sha256: None,
            },
        )
        .await?;
        Ok(GroupRestore {
            restored,
            missing_blobs,
        })
    }

    /// The reference check, when the group holds a SQLite database and a blob store.
    async fn check_references(&self) -> Result<Option<Vec<String>>> {
        let of_kind = |kind: SourceKind| {
            self.request.targets.iter().find(|(name, _)| {
                self.config
                    .source(name)
                    .map(|s| s.kind() == kind)
                    .unwrap_or(false)
            })
        };
        let (Some((_, db)), Some((_, blobs))) =
            (of_kind(SourceKind::Sqlite), of_kind(SourceKind::Blobs))
        else {
            return Ok(None);
        };
        let missing = check_references(
            Path::new(db),
            &self.request.reference_query,
            blobs,
            &self.request.target_options,
        )
        .await?;
        Ok(Some(missing))
    }
}

/// Plan, apply every source, finish: the whole group restore in one call.
pub async fn restore_group(
    config: &Config,
    repo: &Repository,
    request: GroupRequest,
) -> Result<GroupRestore> {
    let plan = plan(config, repo, request).await?;
    let mut restored = Vec::new();
    for index in 0..plan.targets().len() {
        restored.push(plan.apply(repo, index).await?);
    }
    plan.finish(repo, restored).await
}

/// The newest instant every source of the group can restore.
async fn group_latest(
    repo: &Repository,
    config: &Config,
    pairs: &[(String, String)],
) -> Result<DateTime<Utc>> {
    let mut newest: Option<DateTime<Utc>> = None;
    for (name, _) in pairs {
        let t = Catalog::load_for(repo, config.source(name)?, At::Latest)
            .await?
            .newest()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("source {name} has no backups yet"),
                )
                .with_hint("run `timevault backup` or `timevault daemon --once` first")
            })?;
        newest = Some(newest.map_or(t, |n| n.min(t)));
    }
    Ok(newest.expect("at least one target"))
}
