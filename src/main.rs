//! The `timevault` command: parse arguments, load the config, call the library, print.
//!
//! Exit codes are stable (README "Exit codes"): they come from [`timevault::ErrorKind`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use timevault::config::Config;
use timevault::repo::{Repository, RetryPolicy, SyncOptions, VerifyOptions};
use timevault::{Error, ErrorKind};

mod commands;
mod out;

use out::{errln, out, outln};

#[derive(Parser)]
#[command(
    name = "timevault",
    version,
    about = "Encrypted, geo-replicated backups with point-in-time restore and tenant export"
)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, short, global = true, env = "TIMEVAULT_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter, e.g. `warn` or `timevault=debug` (also RUST_LOG). Default: `info` for
    /// `daemon` (it says what it does), `warn` for the other commands.
    #[arg(long, global = true)]
    log: Option<String>,
    /// Log line format: `text` for people, `json` (one object per line) for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the repository on every replica (and the key file if it does not exist).
    Init(JsonFlag),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check that every replica holds every object; with --read-data, authenticate every byte.
    Verify(VerifyArgs),
    /// Replica maintenance.
    #[command(subcommand)]
    Replicas(ReplicasCommand),
    /// The repository key and the key-encryption keys that wrap it.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Tenants' data keys.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Run the schedules: snapshots, continuous change capture.
    Daemon(DaemonArgs),
    /// Take a snapshot of every source (or one) now.
    Backup(BackupArgs),
    /// Restore a source to an instant into a new target.
    Restore(RestoreArgs),
    /// List snapshots.
    Snapshots(SnapshotsArgs),
    /// Per source: restorable windows, last snapshot, capture lag, last drill; per replica: health.
    Status(JsonFlag),
    /// Apply the [retention] policy: remove old restore points, audit records and unreferenced
    /// chunks on every replica.
    Prune(PruneArgs),
    /// Restore a recent instant and the monthly point of each source into scratch targets and
    /// check them against the checksums recorded at backup time.
    Drill(DrillArgs),
    /// One tenant's rows and files at an instant, as a checksummed .tar.zst for the customer.
    Export(commands::ExportArgs),
    /// List the audit log: every export and restore, who asked and why.
    Audit(JsonFlag),
}

#[derive(Args)]
struct PruneArgs {
    /// Show what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DrillArgs {
    /// Only this source.
    #[arg(long)]
    source: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DaemonArgs {
    /// Snapshot where none exists, ship all pending changes, and exit.
    #[arg(long)]
    once: bool,
    /// Run only this job: `drill` (on a restore host, beside a backup-only daemon: restore
    /// drills on schedule.drill, with /healthz and /metrics; no lease, no capture).
    #[arg(long, value_name = "JOB")]
    only: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BackupArgs {
    /// Only this source.
    #[arg(long)]
    source: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RestoreArgs {
    /// The source to restore (with a single `--to TARGET`).
    #[arg(long)]
    source: Option<String>,
    /// RFC 3339 instant, `latest`, or relative: -90s, -15m, -2h, -3d.
    #[arg(long, allow_hyphen_values = true)]
    at: String,
    /// Target: a file path for SQLite, an object store URL for blobs. Repeat as
    /// `--to SOURCE=TARGET` to restore several sources to the same instant.
    #[arg(long, required = true)]
    to: Vec<String>,
    /// object_store option for blob targets, `key=value` (repeatable).
    #[arg(long = "to-option")]
    to_option: Vec<String>,
    /// After a group restore, the query listing the blob keys the database references.
    #[arg(long, default_value = timevault::restore::DEFAULT_REFERENCE_QUERY)]
    reference_query: String,
    /// Replace an existing target.
    #[arg(long)]
    force: bool,
    /// Print the plan (base, later parts, the instant reached, chunks and bytes to read, which
    /// replicas hold them, the target check) and touch nothing.
    #[arg(long)]
    dry_run: bool,
    /// Read only from this replica (recovery at another site).
    #[arg(long)]
    replica: Option<String>,
    /// Who asked for the restore (audit log; default $USER).
    #[arg(long)]
    requested_by: Option<String>,
    /// Why (audit log).
    #[arg(long)]
    reason: Option<String>,
    #[arg(long)]
    json: bool,
    /// PostgreSQL: only this tenant's rows (tables with `tenant_id`, their child tables; global
    /// tables whole).
    #[arg(long)]
    tenant: Option<String>,
    /// PostgreSQL: connections that load rows and build indexes at once, like
    /// `pg_restore --jobs` (default: this machine's core count, 2 to 8).
    #[arg(long, short = 'j', value_parser = clap::value_parser!(u16).range(1..=64))]
    jobs: Option<u16>,
}

#[derive(Args)]
struct SnapshotsArgs {
    #[arg(long)]
    source: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct JsonFlag {
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the resolved config with secrets masked.
    Show,
}

#[derive(Args)]
struct VerifyArgs {
    /// Download and authenticate every object.
    #[arg(long)]
    read_data: bool,
    /// Only this replica.
    #[arg(long)]
    replica: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ReplicasCommand {
    /// Copy what a replica lacks (or holds damaged) from a healthy one.
    Sync(SyncArgs),
    /// List replicas with their region and reachability.
    List(JsonFlag),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Wrapped copies of the repository key, their KEKs and each KEK's state.
    Show(JsonFlag),
    /// Wrap the repository key under a new KEK, or retire one; no data is rewritten. Without
    /// flags: add a copy for every configured KEK that has none.
    Rotate(RotateArgs),
    /// Write a role credential for another host: `backup` (a daemon's host: backs up, cannot
    /// decrypt any content) or `restore` (operators: restores and exports, no key management).
    Role(RoleArgs),
}

#[derive(Args)]
struct RoleArgs {
    /// `backup` or `restore`.
    role: String,
    /// Where to write it (mode 0600; an existing file is never overwritten).
    #[arg(long, value_name = "FILE")]
    out: std::path::PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Tenants with data keys of their own ([tenancy] tenant_keys): key ids, how each is
    /// wrapped, when it was created.
    Keys(JsonFlag),
    /// Destroy a tenant's data keys on every replica (crypto-shredding): its rows and changes
    /// become unreadable in every backup, every other tenant's stay restorable. Shows what
    /// becomes unreadable and asks, unless --yes.
    Forget(ForgetArgs),
}

#[derive(Args)]
struct ForgetArgs {
    /// The tenant id (the tenant column's text, as `tenant keys` lists it).
    tenant: String,
    /// Who asked for the erasure (kept in the forgotten record and the audit log).
    #[arg(long, value_name = "WHO")]
    requested_by: String,
    /// Why (e.g. the erasure request's reference).
    #[arg(long, value_name = "TEXT")]
    reason: String,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    /// Also schedule the deletion of the tenant's own KEK ([tenancy.keys]): an AWS KMS key after
    /// KMS's 30-day window; an Azure Key Vault key is deleted (soft delete: recoverable until
    /// the vault purges it).
    #[arg(long)]
    delete_kek: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RotateArgs {
    /// A key-encryption key to add (aws-kms:<key ARN> or azure-keyvault:<key URL>); repeatable.
    #[arg(long = "kek", value_name = "KEK")]
    kek: Vec<String>,
    /// Delete the copies wrapped by this KEK (as `keys show` prints it) on every replica;
    /// repeatable. Refused unless another copy can open the repository now.
    #[arg(long, value_name = "KEK")]
    retire: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SyncArgs {
    /// Only this replica.
    #[arg(long)]
    replica: Option<String>,
    /// Compare listings only; do not authenticate copies already present.
    #[arg(long)]
    quick: bool,
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    timevault::allocator::tune();
    let cli = Cli::parse();
    let daemon = matches!(cli.command, Command::Daemon(_));
    init_tracing(&log_filter(cli.log.as_deref(), daemon), cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            errln!("error: {err}");
            if let Some(hint) = err.hint() {
                errln!("hint: {hint}");
            }
            ExitCode::from(err.exit_code() as u8)
        }
    };
    // A reader that went away is no failure; output lost otherwise is (`out`'s module docs).
    out::flush();
    if out::stdout_failed() && code == ExitCode::SUCCESS {
        return ExitCode::from(ErrorKind::Other.exit_code() as u8);
    }
    code
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The log filter: `--log`, else RUST_LOG, else `info` for the daemon (its start, jobs,
/// failures and recoveries; dependencies at `warn`) and `warn` for one-shot commands.
fn log_filter(flag: Option<&str>, daemon: bool) -> String {
    if let Some(flag) = flag {
        return flag.to_string();
    }
    if let Ok(env) = std::env::var("RUST_LOG") {
        return env;
    }
    if daemon {
        "warn,timevault=info"
    } else {
        "warn"
    }
    .to_string()
}

fn init_tracing(filter: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load_config(path: Option<PathBuf>) -> timevault::Result<Config> {
    let path = path.ok_or_else(|| {
        Error::config("no config file given").with_hint(
            "pass --config PATH or set TIMEVAULT_CONFIG (the embedded default is schedules/embedded.toml)",
        )
    })?;
    Config::load(&path)
}

pub(crate) fn print_json(value: &impl Serialize) {
    outln!(
        "{}",
        serde_json::to_string_pretty(value).expect("serializable output")
    );
}

async fn run(cli: Cli) -> timevault::Result<ExitCode> {
    let config = load_config(cli.config)?;
    match cli.command {
        Command::Config(ConfigCommand::Show) => {
            out!("{}", config.show());
            Ok(ExitCode::SUCCESS)
        }
        Command::Init(args) => {
            // PostgreSQL sources must be capturable before anything is created.
            for source in &config.sources {
                timevault::source::registry::preflight(source)
                    .await
                    .map_err(|e| e.context(format!("source {}", source.name)))?;
            }
            // Every table must be mapped by [tenancy] before backups are taken.
            timevault::tenancy::check_sources(&config).await?;
            let summary = Repository::init(&config).await?;
            if args.json {
                print_json(&summary);
            } else if summary.created {
                outln!(
                    "created repository {} on {}",
                    summary.repository_id,
                    summary.replicas_written.join(", ")
                );
                if summary.key_generated {
                    outln!("generated a new key: back it up now; without it the backups cannot be read");
                }
            } else {
                outln!(
                    "repository {} already exists with this key",
                    summary.repository_id
                );
                if !summary.replicas_written.is_empty() {
                    outln!(
                        "wrote the repository config to {}",
                        summary.replicas_written.join(", ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(args) => verify(&config, args).await,
        Command::Replicas(ReplicasCommand::Sync(args)) => sync(&config, args).await,
        Command::Replicas(ReplicasCommand::List(args)) => list_replicas(&config, args.json).await,
        Command::Tenant(TenantCommand::Keys(args)) => {
            commands::keys::tenant_keys(&config, args.json).await
        }
        Command::Tenant(TenantCommand::Forget(args)) => {
            commands::forget::forget(
                &config,
                commands::forget::ForgetRequest {
                    tenant: args.tenant,
                    requested_by: args.requested_by,
                    reason: args.reason,
                    yes: args.yes,
                    delete_kek: args.delete_kek,
                    json: args.json,
                },
            )
            .await
        }
        Command::Keys(KeysCommand::Show(args)) => commands::keys::show(&config, args.json).await,
        Command::Keys(KeysCommand::Role(args)) => {
            commands::keys::role(&config, &args.role, &args.out, args.json).await
        }
        Command::Keys(KeysCommand::Rotate(args)) => {
            commands::keys::rotate(&config, &args.kek, &args.retire, args.json).await
        }
        Command::Daemon(args) => match args.only.as_deref() {
            None => commands::daemon(&config, args.once, args.json).await,
            Some("drill") if !args.once => commands::daemon_drills(&config).await,
            Some("drill") => Err(timevault::Error::input(
                "daemon --only drill runs until stopped: --once does not apply",
            )),
            Some(other) => Err(timevault::Error::input(format!(
                "daemon --only {other}: the only job a daemon runs alone is `drill`"
            ))
            .with_hint("timevault daemon --only drill")),
        },
        Command::Backup(args) => commands::backup(&config, args.source.as_deref(), args.json).await,
        Command::Restore(args) => {
            commands::restore(
                &config,
                commands::RestoreRequest {
                    source: args.source,
                    at: args.at,
                    to: args.to,
                    to_options: args.to_option,
                    reference_query: args.reference_query,
                    force: args.force,
                    dry_run: args.dry_run,
                    replica: args.replica,
                    requested_by: args.requested_by,
                    reason: args.reason,
                    json: args.json,
                    tenant: args.tenant,
                    jobs: args.jobs.map(usize::from),
                },
            )
            .await
        }
        Command::Snapshots(args) => {
            commands::snapshots(&config, args.source.as_deref(), args.json).await
        }
        Command::Status(args) => commands::status(&config, args.json).await,
        Command::Prune(args) => commands::prune::prune(&config, args.dry_run, args.json).await,
        Command::Drill(args) => {
            commands::drill::drill(&config, args.source.as_deref(), args.json).await
        }
        Command::Export(args) => commands::export::export(&config, args).await,
        Command::Audit(args) => commands::export::audit(&config, args.json).await,
    }
}

async fn verify(config: &Config, args: VerifyArgs) -> timevault::Result<ExitCode> {
    let repo = Repository::open(config).await?;
    let bar = match args.json {
        true => commands::Progress::hidden(),
        false => {
            commands::Progress::counting("verifying".into(), timevault::repo::replica_bytes_read)
        }
    };
    let report = repo
        .verify(&VerifyOptions {
            read_data: args.read_data,
            replica: args.replica,
        })
        .await;
    bar.finish_and_clear();
    let report = report?;
    let catalog = timevault::integrity::check_catalog(&repo).await?;
    if args.json {
        #[derive(serde::Serialize)]
        struct Verified<'a> {
            #[serde(flatten)]
            replicas: &'a timevault::repo::VerifyReport,
            catalog: &'a timevault::integrity::CatalogCheck,
        }
        print_json(&Verified {
            replicas: &report,
            catalog: &catalog,
        });
    } else {
        for r in &report.replicas {
            let state = if r.is_clean() { "ok" } else { "PROBLEMS" };
            outln!(
                "replica {} ({}): {state}: {} objects, {} bytes{}",
                r.name,
                r.region,
                r.objects,
                r.bytes,
                if report.read_data {
                    format!(", {} authenticated", r.checked)
                } else {
                    String::new()
                }
            );
            if let Some(e) = &r.unreachable {
                outln!("  unreachable: {e}");
            }
            for key in &r.missing {
                outln!("  missing: {key}");
            }
            for (key, why) in &r.damaged {
                outln!("  damaged: {key}: {why}");
            }
            if !r.forgotten.is_empty() {
                outln!(
                    "  forgotten: {} object(s) sealed under forgotten tenants' destroyed keys (not damage; prune deletes the chunks)",
                    r.forgotten.len()
                );
            }
            if r.sealed > 0 {
                outln!(
                    "  sealed: {} content object(s) under data keys this {} credential cannot open: headers and data key records checked, content not (verify with a restore credential)",
                    r.sealed,
                    repo.role()
                );
            }
            if !r.keys.is_empty() {
                outln!(
                    "  chunks by key: {} under content data keys, {} under tenants' keys, {} blob listing(s) under the repository key (metadata), {} content chunk(s) under the repository key{}",
                    r.keys.data,
                    r.keys.tenant,
                    r.keys.listing,
                    r.keys.repository,
                    if r.keys.repository > 0 {
                        " (written before write-only roles: a backup credential can read that)"
                    } else {
                        ""
                    }
                );
            }
        }
        let state = if catalog.is_clean() { "ok" } else { "PROBLEMS" };
        outln!(
            "catalog: {state}: {} manifests, {} chunks referenced, {} chains",
            catalog.manifests,
            catalog.chunks_referenced,
            catalog.chains
        );
        if catalog.forgotten > 0 {
            outln!(
                "  forgotten: {} chunk(s) of forgotten tenants deleted by prune (left out of restores on purpose)",
                catalog.forgotten
            );
        }
        for d in &catalog.dangling {
            outln!(
                "  missing everywhere: chunk {} named by {}",
                d.chunk,
                d.manifest
            );
        }
        for h in &catalog.holes {
            outln!(
                "  hole in source {} chain {}: {}",
                h.source,
                h.chain,
                h.problem
            );
        }
        for key in &catalog.stray {
            outln!("  stray object under chunks/ (not a chunk; never read or collected): {key}");
        }
        for key in &catalog.superseded {
            outln!("  superseded: {key} was written under a lease another writer had taken over; restores ignore it, prune removes it with its chain");
        }
    }
    if report.is_clean() && catalog.is_clean() {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(ErrorKind::Verify.exit_code() as u8))
    }
}

async fn sync(config: &Config, args: SyncArgs) -> timevault::Result<ExitCode> {
    let repo = Repository::open_with(config, None, RetryPolicy::default()).await?;
    let bar = match args.json {
        true => commands::Progress::hidden(),
        false => commands::Progress::counting(
            "syncing replicas".into(),
            timevault::repo::replica_bytes_read,
        ),
    };
    let summary = repo
        .sync_replicas(&SyncOptions {
            quick: args.quick,
            replica: args.replica,
        })
        .await;
    bar.finish_and_clear();
    let summary = summary?;
    if args.json {
        print_json(&summary);
    } else {
        for r in &summary.replicas {
            outln!(
                "replica {}: {} copied, {} repaired, {} failed",
                r.name,
                r.copied.len(),
                r.repaired.len(),
                r.failed.len()
            );
            if let Some(e) = &r.unreachable {
                outln!("  unreachable: {e}");
            }
            for (key, why) in &r.failed {
                outln!("  failed: {key}: {why}");
            }
            if !r.forgotten.is_empty() {
                outln!(
                    "  not copied: {} object(s) under forgotten tenants' destroyed keys",
                    r.forgotten.len()
                );
            }
        }
    }
    if summary.is_complete() {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(ErrorKind::Unavailable.exit_code() as u8))
    }
}

#[derive(Serialize)]
struct ReplicaLine {
    name: String,
    region: String,
    reachable: bool,
    error: Option<String>,
}

async fn list_replicas(config: &Config, json: bool) -> timevault::Result<ExitCode> {
    let replicas = timevault::repo::replica_set(config, RetryPolicy::default())?;
    let mut lines = Vec::new();
    for r in replicas.replicas() {
        let probe = r.get(timevault::repo::layout::CONFIG).await;
        lines.push(ReplicaLine {
            name: r.name().to_string(),
            region: r.region().to_string(),
            reachable: probe.is_ok(),
            error: probe
                .err()
                .map(|e| timevault::config::mask_url(&e.to_string())),
        });
    }
    if json {
        print_json(&lines);
    } else {
        for l in &lines {
            let state = if l.reachable {
                "reachable".to_string()
            } else {
                format!("unreachable: {}", l.error.clone().unwrap_or_default())
            };
            outln!("{:<16} {:<16} {state}", l.name, l.region);
        }
    }
    Ok(ExitCode::SUCCESS)
}
