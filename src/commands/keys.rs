//! `timevault keys show` and `keys rotate`: printing only; the work is in `timevault::repo`
//! (`key_copies`) and `timevault::keys`.

use std::path::Path;
use std::process::ExitCode;

use timevault::config::Config;
use timevault::keys::role::Role;
use timevault::keys::{Kek, KekUri};
use timevault::repo::{configured_keks, KeysReport, Repository, RotateSummary};
use timevault::Error;

use crate::out::outln;
use crate::print_json;

pub async fn show(config: &Config, json: bool) -> timevault::Result<ExitCode> {
    let repo = Repository::open(config).await?;
    let keks = configured_keks(&config.repository).await?;
    let report = repo.keys_report(&keks).await?;
    if json {
        print_json(&report);
    } else {
        print_report(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &KeysReport) {
    let mode = if r.format == 1 {
        "format 1: the local key is the data key; wrapped copies below also open it"
    } else {
        "format 2: the data key exists only wrapped by the key-encryption keys below"
    };
    outln!("repository {} ({mode})", r.repository_id);
    outln!("opened with: {}", r.opened_by);
    outln!("role: {}", r.role);
    outln!("content data keys are sealed to: {}", r.content_recipient);
    if r.copies.is_empty() {
        outln!("wrapped copies: none");
    }
    for c in &r.copies {
        outln!(
            "  {}  state {}  {}  created {}  {}",
            c.kek,
            c.state,
            if c.configured {
                "configured"
            } else {
                "not in this config"
            },
            c.created_at.format("%Y-%m-%d %H:%M:%SZ"),
            c.object
        );
    }
    for label in &r.without_copy {
        outln!("  {label}: configured, but no copy yet (run `timevault keys rotate`)");
    }
    if r.format == 1 {
        outln!("note: in format 1 the key file (or env key) stays a valid key for as long as the repository exists");
    }
}

/// `timevault keys role ROLE --out FILE`: write a role credential (mode 0600, never over an
/// existing file).
pub async fn role(
    config: &Config,
    role: &str,
    out: &Path,
    json: bool,
) -> timevault::Result<ExitCode> {
    let role = Role::parse_credential_role(role).map_err(|e| {
        Error::input(format!("keys role {role}: {e}"))
            .with_hint("`timevault keys role backup --out FILE` for a daemon's host, `restore` for operators' hosts")
    })?;
    let repo = Repository::open(config).await?;
    let credential = repo.credential(role)?;
    let text = credential.render(chrono::Utc::now());
    timevault::archive::keys::write_secret_file(out, text.as_bytes())?;
    if json {
        print_json(&serde_json::json!({
            "role": role,
            "repository_id": repo.id(),
            "out": out,
        }));
    } else {
        outln!(
            "wrote a {role} credential of repository {} to {} (mode 0600)",
            repo.id(),
            out.display()
        );
        outln!("point that host's [repository] key_file at it; it holds no key that opens {}", match role {
            Role::Backup => "content: the host can back up, not restore",
            _ => "key management: the host can back up and restore, not rotate keys or forget tenants",
        });
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn rotate(
    config: &Config,
    add: &[String],
    retire: &[String],
    json: bool,
) -> timevault::Result<ExitCode> {
    let repo = Repository::open(config).await?;
    repo.require(timevault::keys::role::Role::Admin, "keys rotate")?;
    let mut targets = Vec::new();
    for text in add {
        let uri = KekUri::parse(text).map_err(|e| {
            Error::input(format!("--kek {text}: {e}"))
                .with_hint("give a KEK as aws-kms:arn:aws:kms:<region>:<account>:key/<key id> or azure-keyvault:https://<vault>.vault.azure.net/keys/<name>")
        })?;
        targets.push(Kek::remote(&uri).await);
    }
    if add.is_empty() && retire.is_empty() {
        // Every configured KEK the repository has no copy for.
        let keks = configured_keks(&config.repository).await?;
        let report = repo.keys_report(&keks).await?;
        for kek in keks.into_vec() {
            if report.without_copy.contains(&kek.label()) {
                targets.push(kek);
            }
        }
    }
    let mut summary = RotateSummary::default();
    for kek in &targets {
        summary.added.push(repo.add_key_copy(kek).await?);
    }
    for label in retire {
        summary.retired.extend(repo.retire_key_copies(label).await?);
    }
    // Tenant keys follow [tenancy.keys]: a customer's KEK replaced, added or removed.
    summary.tenants = repo.rewrap_tenant_keys().await?;
    if json {
        print_json(&summary);
    } else if summary.added.is_empty() && summary.retired.is_empty() && summary.tenants.is_empty() {
        outln!(
            "nothing to do: every configured key-encryption key has a copy of the repository key, and every tenant key is wrapped as [tenancy.keys] says"
        );
    } else {
        for (kek, object) in &summary.added {
            outln!("wrapped the repository key under {kek} ({object})");
        }
        for (kek, object) in &summary.retired {
            outln!("retired the copy wrapped by {kek} ({object}) on every replica");
        }
        for t in &summary.tenants {
            outln!(
                "wrapped tenant {}'s key {} under {} instead of {} ({})",
                t.tenant,
                t.key_id,
                t.to,
                t.from,
                t.object
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `timevault tenant keys`.
pub async fn tenant_keys(config: &Config, json: bool) -> timevault::Result<ExitCode> {
    let repo = Repository::open(config).await?;
    repo.require(timevault::keys::role::Role::Restore, "tenant keys")?;
    let keys = repo.load_tenant_keys().await?;
    if json {
        print_json(&keys);
        return Ok(ExitCode::SUCCESS);
    }
    if keys.is_empty() {
        outln!("no tenant has a data key of its own (set [tenancy] tenant_keys = true for postgres sources)");
    }
    for k in &keys {
        outln!(
            "tenant {}  key {}  wrapped by {}  created {}",
            k.tenant,
            k.key_id,
            k.wrapped_by,
            k.created_at.format("%Y-%m-%d %H:%M:%SZ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
