//! `export` and `audit` (the audit record of a restore is written by `restore::group`).

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::Utc;
use clap::Args;

use timevault::audit;
use timevault::config::Config;
use timevault::export::{self, ExportOptions, TableFormat};
use timevault::repo::Repository;
use timevault::time::parse_at;
use timevault::Result;

use super::Progress;
use crate::out::outln;
use crate::print_json;

#[derive(Args)]
pub struct ExportArgs {
    /// The tenant: the value of the tenancy column.
    #[arg(long)]
    tenant: String,
    /// RFC 3339 instant, `latest`, or relative: -90s, -15m, -2h, -3d.
    #[arg(long, allow_hyphen_values = true)]
    at: String,
    /// The archive to write (.tar.zst; .tar.zst.age when encrypted).
    #[arg(long)]
    out: PathBuf,
    /// Table files: jsonl or csv.
    #[arg(long, default_value = "jsonl")]
    format: String,
    /// Who asked for the export (audit log; default $USER).
    #[arg(long)]
    requested_by: Option<String>,
    /// Why (audit log and manifest).
    #[arg(long)]
    reason: Option<String>,
    /// Encrypt for this age public key (age1...).
    #[arg(long, conflicts_with = "passphrase_env")]
    recipient: Option<String>,
    /// Encrypt with the passphrase in this environment variable (age scrypt).
    #[arg(long)]
    passphrase_env: Option<String>,
    /// Replace an existing output file.
    #[arg(long)]
    force: bool,
    #[arg(long)]
    json: bool,
}

pub async fn export(config: &Config, args: ExportArgs) -> Result<ExitCode> {
    let encryption = match (&args.recipient, &args.passphrase_env) {
        (Some(r), _) => Some(export::recipient(r)?),
        (None, Some(var)) => Some(export::passphrase_from_env(var)?),
        (None, None) => None,
    };
    let options = ExportOptions {
        tenant: args.tenant,
        at: parse_at(&args.at, Utc::now())?,
        out: args.out,
        format: args.format.parse::<TableFormat>()?,
        requested_by: args.requested_by,
        reason: args.reason,
        encryption,
        force: args.force,
    };
    let repo = Repository::open(config).await?;
    repo.require(timevault::keys::role::Role::Restore, "export")?;
    let bar = Progress::counting(
        format!("exporting tenant {}", options.tenant),
        timevault::repo::chunk_bytes_read,
    );
    let summary = export::export(config, &repo, &options).await;
    bar.finish_and_clear();
    let summary = summary?;
    if args.json {
        print_json(&summary);
    } else {
        outln!(
            "exported tenant {} as of {} to {}: {} tables, {} rows, {} files ({} bytes){}",
            summary.tenant,
            summary.as_of.to_rfc3339(),
            summary.out,
            summary.tables,
            summary.rows,
            summary.files,
            summary.file_bytes,
            if summary.encrypted {
                ", encrypted with age"
            } else {
                ""
            }
        );
        outln!(
            "archive: {} bytes, sha256 {}; audit record {}",
            summary.bytes,
            summary.sha256,
            summary.audit_key
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn audit(config: &Config, json: bool) -> Result<ExitCode> {
    let repo = Repository::open(config).await?;
    let records = audit::list(&repo).await?;
    if json {
        let list: Vec<_> = records.iter().map(|(_, r)| r).collect();
        print_json(&list);
        return Ok(ExitCode::SUCCESS);
    }
    if records.is_empty() {
        outln!("no audit records");
    }
    for (_, r) in &records {
        outln!(
            "{}  {:<8} by {}{}{}  sources {}  as of {}{}",
            r.at.to_rfc3339(),
            r.command,
            r.requested_by,
            r.tenant
                .as_ref()
                .map_or(String::new(), |t| format!("  tenant {t}")),
            r.reason
                .as_ref()
                .map_or(String::new(), |w| format!("  reason {w:?}")),
            r.sources.join(","),
            r.instant.map_or("-".into(), |t| t.to_rfc3339()),
            r.output_sha256
                .as_ref()
                .map_or(String::new(), |s| format!("  sha256 {s}"))
        );
        for o in &r.outputs {
            outln!("    -> {o}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
