//! `timevault tenant forget`: shows the plan, asks (unless `--yes`), applies it, and prints
//! what became unreadable; the work is in `timevault::forget`.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use timevault::config::Config;
use timevault::forget::ForgetPlan;
use timevault::repo::Repository;
use timevault::{Error, ErrorKind};

use crate::out::outln;
use crate::print_json;

pub struct ForgetRequest {
    pub tenant: String,
    pub requested_by: String,
    pub reason: String,
    pub yes: bool,
    pub delete_kek: bool,
    pub json: bool,
}

pub async fn forget(config: &Config, request: ForgetRequest) -> timevault::Result<ExitCode> {
    for (flag, value) in [
        ("--requested-by", &request.requested_by),
        ("--reason", &request.reason),
    ] {
        if value.trim().is_empty() {
            return Err(Error::input(format!("{flag} is empty"))
                .with_hint("say who asked for the erasure and why: both are kept for ever"));
        }
    }
    let repo = Repository::open(config).await?;
    repo.require(timevault::keys::role::Role::Admin, "tenant forget")?;
    let plan = ForgetPlan::make(&repo, &request.tenant, config.tenancy.as_ref()).await?;
    if !plan.has_work() {
        let before = plan
            .already
            .as_ref()
            .expect("a plan without keys is a forgotten tenant");
        if request.json {
            print_json(before);
        } else {
            outln!("{}; no key of it is left: nothing to do", before.said());
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !request.json {
        print_plan(&plan);
    }
    if !request.yes {
        confirm(&request.tenant)?;
    }
    let forgot = plan
        .apply(
            &repo,
            Some(request.requested_by),
            request.reason,
            request.delete_kek,
        )
        .await?;
    let record = &forgot.record;
    if request.json {
        print_json(&forgot);
    } else {
        outln!(
            "forgot tenant {}: destroyed {} key object(s) on every replica; recorded at keys/forgotten/",
            record.tenant,
            forgot.deleted.len()
        );
        if let Some(done) = &forgot.kek_deletion {
            outln!("tenant key-encryption key {done}");
        }
        outln!("restores leave its rows and files out from now on; the next prune deletes its {} chunk(s)", record.chunks.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_plan(plan: &ForgetPlan) {
    outln!(
        "tenant {}: {} data key(s) will be destroyed on every replica:",
        plan.tenant,
        plan.keys.len()
    );
    for k in &plan.keys {
        outln!(
            "  key {}  created {}  {}",
            k.key_id,
            k.created_at.format("%Y-%m-%d %H:%M:%SZ"),
            k.object
        );
    }
    let u = &plan.unreadable;
    outln!(
        "unreadable for ever: {} chunk(s), {} bytes: {} file(s), and rows in {} snapshot(s) of {} chain(s) (sources: {}), and the tenant's row changes in those chains' change logs",
        u.chunks,
        u.bytes,
        u.files,
        u.snapshots,
        u.chains,
        if plan.sources.is_empty() {
            "none".to_string()
        } else {
            plan.sources.join(", ")
        }
    );
    if let Some(before) = &plan.already {
        outln!(
            "note: {}; these keys were made since (or left by an interrupted forget)",
            before.said()
        );
    }
}

/// Ask on the terminal; refuse when there is none (a script must say --yes).
fn confirm(tenant: &str) -> timevault::Result<()> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Error::input(format!(
            "forgetting tenant {tenant} needs a confirmation and stdin is not a terminal"
        ))
        .with_hint("pass --yes to forget without asking"));
    }
    eprint!("type the tenant id ({tenant}) to forget it for ever: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .map_err(|e| Error::io("stdin", e))?;
    if line.trim_end_matches(['\r', '\n']) != tenant {
        return Err(Error::new(
            ErrorKind::Input,
            format!("not confirmed: nothing was forgotten (tenant {tenant})"),
        ));
    }
    Ok(())
}
