//! Tenant export: one tenant's rows and files at an instant, as a checksummed `.tar.zst`
//! (optionally age-encrypted) for the customer, and an audit record in the repository.
//!
//! The data comes from the backups, never from production: each SQLite source is read in place
//! at the instant, page by page, through a read-only VFS over the repository
//! (`restore::sqlite_pages`, `restore::sqlite_vfs`: only the pages the tenant's queries touch
//! are fetched, so the cost follows the tenant's size, not the database's); each PostgreSQL
//! source's tenant is restored into a scratch database (`restore --tenant`: only the tenant's
//! chunks when the snapshot was grouped by this map); the tenant's rows are selected table by table
//! through the tenancy map, and the tenant's blobs are rebuilt from the scans a restore to that
//! instant would use. Steps, as in [`export`]:
//! check the request, resolve the instant, write the tables, write the files, add the manifest
//! and `SHA256SUMS`, audit, then rename the finished archive into place. The archive is written
//! to a temporary file in the output's directory: a failure at any step leaves no file behind.
//!
//! Archive layout and value mapping: docs/FORMAT.md §9.

pub mod archive;
pub mod files;
pub mod manifest;
pub mod names;
mod postgres_scratch;
pub mod rows;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::audit::{self, AuditEvent};
use crate::catalog::blobs::BlobCatalog;
use crate::catalog::SourceCatalog;
use crate::config::{Config, SourceConfig, SourceKind};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::{ReadPurpose, Repository};
use crate::restore::postgres::restore_postgres_with;
use crate::restore::postgres_tenant::TenantOptions;
use crate::restore::sqlite_pages::PageImage;
use crate::restore::{sqlite_vfs, RestoreOptions, RestoreSummary};
use crate::tenancy::{self, BlobRule, Dialect, Membership, ResolvedTenancy, Schema, TenancyConfig};
use crate::time::At;

pub use archive::Encryption;
pub use files::BlobSourceUsed;
pub use manifest::{FileRecord, Manifest};
pub use rows::{TableFile, TableFormat};

/// What to export.
pub struct ExportOptions {
    pub tenant: String,
    pub at: At,
    pub out: PathBuf,
    pub format: TableFormat,
    pub requested_by: Option<String>,
    pub reason: Option<String>,
    pub encryption: Option<Encryption>,
    /// Replace an existing output file.
    pub force: bool,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    pub tenant: String,
    pub as_of: DateTime<Utc>,
    pub out: String,
    pub encrypted: bool,
    /// Size and SHA-256 of the output file.
    pub bytes: u64,
    pub sha256: String,
    pub tables: usize,
    pub rows: u64,
    pub files: usize,
    pub file_bytes: u64,
    /// Backup bytes read for the databases (a SQLite source read in place: the snapshot chunks
    /// its pages came from and the change-log frames).
    pub database_bytes_read: u64,
    pub audit_key: String,
    pub seconds: f64,
}

/// A parsed `--recipient` (`age1...`).
pub fn recipient(text: &str) -> Result<Encryption> {
    text.trim()
        .parse::<age::x25519::Recipient>()
        .map(|r| Encryption::Recipient(Box::new(r)))
        .map_err(|e| {
            Error::input(format!(
                "--recipient {text:?} is not an age public key: {e}"
            ))
            .with_hint("pass the customer's age public key (age1...), as printed by age-keygen")
        })
}

/// A passphrase read from the environment variable `name`.
pub fn passphrase_from_env(name: &str) -> Result<Encryption> {
    match std::env::var(name) {
        Ok(p) if !p.is_empty() => Ok(Encryption::Passphrase(p.into())),
        _ => Err(
            Error::input(format!("environment variable {name} holds no passphrase")).with_hint(
                format!("export {name}=... before running, or use --recipient"),
            ),
        ),
    }
}

/// Export one tenant; see the module docs.
pub async fn export(
    config: &Config,
    repo: &Repository,
    options: &ExportOptions,
) -> Result<ExportSummary> {
    repo.reading(
        &config
            .sources
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ReadPurpose::Export,
        export_held(config, repo, options),
    )
    .await?
}

/// [`export`] under the read claim it takes.
async fn export_held(
    config: &Config,
    repo: &Repository,
    options: &ExportOptions,
) -> Result<ExportSummary> {
    let started = Instant::now();
    // 1. Check the request: tenancy configured, tenant id usable, output free.
    let tenancy = config.tenancy.as_ref().ok_or_else(|| {
        Error::config(format!("{} has no [tenancy] section", config.path.display())).with_hint(
            "describe which rows and files belong to a tenant in [tenancy] (see README \"Tenant export\")",
        )
    })?;
    tenancy::check_tenant_id(&options.tenant)?;
    // A forgotten tenant's data cannot be handed out: its keys were destroyed on request.
    if let Some(f) = repo.forgotten_tenant(&options.tenant).await? {
        return Err(f.refusal());
    }
    check_output(&options.out, options.force)?;
    let (databases, blobs) = sources(config, tenancy)?;
    // 2. The one instant every source is exported at.
    let at = resolve_instant(repo, &databases, &blobs, options.at).await?;
    let dir = options.out.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let work = scratch_dir(dir)?;
    // 3. Each database restored to the instant; the tenant's rows of every table.
    let mut tables = Vec::new();
    let mut databases_used = Vec::new();
    let mut blob_keys: Vec<(String, HashSet<String>)> = Vec::new();
    for source in &databases {
        let prefix = if databases.len() > 1 {
            format!("{}.", source.name)
        } else {
            String::new()
        };
        let (summary, written, keys) =
            export_database(repo, source, tenancy, options, at, &prefix, work.path()).await?;
        databases_used.push(summary);
        tables.extend(written);
        blob_keys.extend(keys);
    }
    let rows: u64 = tables.iter().map(|t| t.rows).sum();
    let database_bytes_read = databases_used.iter().map(|(_, s)| s.bytes).sum();
    if !databases.is_empty() && rows == 0 {
        return Err(unknown_tenant(&options.tenant, at));
    }
    // 4. The archive: README, tables, then every file of the tenant.
    let (temp, mut writer) = start_archive(&options.out, dir, options.encryption.as_ref())?;
    let mtime = Utc::now();
    writer.append_bytes(
        "README.txt",
        manifest::readme(&options.tenant, at).as_bytes(),
        mtime,
    )?;
    for t in &tables {
        writer.append_file(&t.file, &t.spool, mtime)?;
        let _ = std::fs::remove_file(&t.spool);
    }
    let mut file_records = Vec::new();
    let mut blobs_used = Vec::new();
    for (source, rule) in &blobs {
        let filter = key_filter(rule, &options.tenant, &source.name, &blob_keys)?;
        let (entries, used) = files::plan_tenant_blobs(repo, &source.name, at, &filter).await?;
        for entry in &entries {
            let spool = work.path().join("blob");
            files::spool_blob(repo, entry, &spool).await?;
            let path = format!("files/{}", names::key_path(&entry.key));
            writer.append_file(&path, &spool, entry.last_modified)?;
            let _ = std::fs::remove_file(&spool);
            file_records.push(FileRecord::new(&source.name, entry, path));
        }
        blobs_used.push(used);
    }
    if databases.is_empty() && file_records.is_empty() {
        return Err(unknown_tenant(&options.tenant, at));
    }
    // 5. The manifest, then SHA256SUMS over everything.
    let manifest = Manifest::new(
        options,
        at,
        databases_used,
        blobs_used,
        &tables,
        file_records,
    );
    writer.append_bytes("manifest.json", &manifest.to_json(), mtime)?;
    let written = writer.finish(mtime)?;
    // 6. Audit before the archive becomes visible: no export leaves without its record.
    let mut sources: Vec<String> = databases.iter().map(|s| s.name.clone()).collect();
    sources.extend(blobs.iter().map(|(s, _)| s.name.clone()));
    let (audit_key, _) = audit::record(
        repo,
        AuditEvent {
            command: "export".into(),
            requested_by: options.requested_by.clone(),
            reason: options.reason.clone(),
            tenant: Some(options.tenant.clone()),
            sources,
            instant: Some(at),
            outputs: vec![std::path::absolute(&options.out)
                .unwrap_or_else(|_| options.out.clone())
                .display()
                .to_string()],
            output_sha256: Some(written.sha256.clone()),
        },
    )
    .await?;
    persist(temp, &options.out, options.force)?;
    Ok(ExportSummary {
        tenant: options.tenant.clone(),
        as_of: at,
        out: options.out.display().to_string(),
        encrypted: options.encryption.is_some(),
        bytes: written.bytes,
        sha256: written.sha256,
        tables: tables.len(),
        rows,
        files: manifest.files.len(),
        file_bytes: manifest.files.iter().map(|f| f.size).sum(),
        database_bytes_read,
        audit_key,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn unknown_tenant(tenant: &str, at: DateTime<Utc>) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!(
            "tenant {tenant} has no rows and no files at {}",
            at.to_rfc3339()
        ),
    )
    .with_hint("check the tenant id (the value of the tenancy column) and the time")
}

fn check_output(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        return Err(Error::new(
            ErrorKind::TargetExists,
            format!("export output {} already exists", out.display()),
        )
        .with_hint("choose a new file name, or pass --force to replace it"));
    }
    if out.is_dir() {
        return Err(Error::input(format!("{} is a directory", out.display()))
            .with_hint("name the archive file, e.g. --out tenant-1001.tar.zst"));
    }
    Ok(())
}

type BlobSources<'a> = Vec<(&'a SourceConfig, &'a BlobRule)>;

/// The database sources and the mapped blob sources.
fn sources<'a>(
    config: &'a Config,
    tenancy: &'a TenancyConfig,
) -> Result<(Vec<&'a SourceConfig>, BlobSources<'a>)> {
    let databases: Vec<_> = config
        .sources
        .iter()
        .filter(|s| s.kind().is_database())
        .collect();
    let mut blobs = Vec::new();
    for (name, rule) in &tenancy.blobs {
        blobs.push((config.source(name)?, rule));
    }
    if databases.is_empty() && blobs.is_empty() {
        return Err(Error::config(
            "nothing to export: no database source and no [tenancy.blobs] entry",
        )
        .with_hint("add a [[sources]] entry, or map a blob source in [tenancy.blobs]"));
    }
    Ok((databases, blobs))
}

/// `latest` is the newest instant every source can restore; a given instant is checked against
/// every source's window (the error prints the window).
async fn resolve_instant(
    repo: &Repository,
    databases: &[&SourceConfig],
    blobs: &[(&SourceConfig, &BlobRule)],
    at: At,
) -> Result<DateTime<Utc>> {
    let mut newest: Option<DateTime<Utc>> = None;
    let mut checks = Vec::new();
    for s in databases {
        let catalog = SourceCatalog::load_for(repo, &s.name, at).await?;
        newest = min_opt(newest, catalog.resolve(At::Latest)?);
        checks.push(Check::Db(catalog));
    }
    for (s, _) in blobs {
        let catalog = BlobCatalog::load(repo, &s.name).await?;
        let latest = catalog.newest().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("blob source {} has no scans yet", s.name),
            )
            .with_hint("run `timevault backup` or `timevault daemon --once` first")
        })?;
        newest = min_opt(newest, latest);
        checks.push(Check::Blobs(catalog));
    }
    let at = match at {
        At::Instant(t) => t,
        At::Latest => newest.expect("at least one source"),
    };
    for check in &checks {
        match check {
            Check::Db(c) => c.plan(at).map(|_| ())?,
            Check::Blobs(c) => c.plan(at).map(|_| ())?,
        }
    }
    Ok(at)
}

enum Check {
    Db(SourceCatalog),
    Blobs(BlobCatalog),
}

fn min_opt(a: Option<DateTime<Utc>>, b: DateTime<Utc>) -> Option<DateTime<Utc>> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// What one database contributed: its kind and the restore used, its table files, and the
/// blob keys its tables list for `table:` blob rules (blob source name → keys).
type DatabaseExport = (
    (SourceKind, RestoreSummary),
    Vec<TableFile>,
    Vec<(String, HashSet<String>)>,
);

/// Where one database's tenant rows go.
struct Selection<'a> {
    tenancy: &'a TenancyConfig,
    options: &'a ExportOptions,
    source: &'a str,
    prefix: &'a str,
    work: &'a Path,
}

async fn export_database(
    repo: &Repository,
    source: &SourceConfig,
    tenancy: &TenancyConfig,
    options: &ExportOptions,
    at: DateTime<Utc>,
    prefix: &str,
    work: &Path,
) -> Result<DatabaseExport> {
    let selection = Selection {
        tenancy,
        options,
        source: &source.name,
        prefix,
        work,
    };
    let restore = |target: String| RestoreOptions {
        source: source.name.clone(),
        at: At::Instant(at),
        target,
        force: false,
        jobs: None,
    };
    if source.kind() == SourceKind::Postgres {
        // A scratch database on the source's server, dropped whatever happens.
        let scratch = postgres_scratch::url(&source.url)?;
        let outcome = async {
            // Only the tenant's rows (and the global tables): its chunks alone when the
            // snapshot was grouped by this tenancy map.
            let tenant = TenantOptions::with_map(&options.tenant, Some(tenancy));
            let summary = restore_postgres_with(repo, &restore(scratch.clone()), Some(&tenant))
                .await?
                .summary;
            let schema = tenancy::schema::read_postgres(&scratch).await?;
            let mut conn = postgres_scratch::connect(&scratch).await?;
            let selected = select(rows::DbConn::Postgres(&mut conn), &schema, &selection).await;
            let _ = sqlx::Connection::close(conn).await;
            let (tables, keys) = selected?;
            Ok(((source.kind(), summary), tables, keys))
        }
        .await;
        postgres_scratch::drop(&scratch).await;
        return outcome;
    }
    // SQLite: read the backup in place, page by page (only the pages the tenant's queries
    // touch are fetched); a read error behind SQLite's I/O error is reported as itself.
    let (image, summary) = PageImage::open(repo, &source.name, At::Instant(at), work).await?;
    let image = Arc::new(image);
    let (mut conn, exposed) = sqlite_vfs::connect(image.clone()).await?;
    let selected = async {
        let schema = tenancy::schema::read_sqlite(&mut conn).await?;
        select(rows::DbConn::Sqlite(&mut conn), &schema, &selection).await
    }
    .await;
    let _ = sqlx::Connection::close(conn).await;
    drop(exposed);
    let (tables, keys) = selected.map_err(|e| image.explain(e))?;
    let stats = image.stats();
    let summary = RestoreSummary {
        bytes: stats.chunk_bytes + stats.frame_bytes,
        ..summary
    };
    Ok(((source.kind(), summary), tables, keys))
}

/// Resolve the tenancy map against the restored schema, write the tenant's tables, and list
/// the blob keys of `table:` rules.
async fn select(
    mut conn: rows::DbConn<'_>,
    schema: &Schema,
    s: &Selection<'_>,
) -> Result<(Vec<TableFile>, Vec<(String, HashSet<String>)>)> {
    let resolved = tenancy::resolve(s.tenancy, schema, s.source)?;
    let tenant = &s.options.tenant;
    let reborrow = match &mut conn {
        rows::DbConn::Sqlite(c) => rows::DbConn::Sqlite(c),
        rows::DbConn::Postgres(c) => rows::DbConn::Postgres(c),
    };
    let tables = rows::write_tables(
        reborrow,
        schema,
        &resolved,
        tenant,
        s.options.format,
        s.source,
        s.prefix,
        s.work,
    )
    .await?;
    let keys = table_blob_keys(conn, s.tenancy, schema, &resolved, tenant).await?;
    Ok((tables, keys))
}

/// For every `table:` blob rule whose table this database has: the keys the tenant's rows list.
async fn table_blob_keys(
    mut conn: rows::DbConn<'_>,
    tenancy: &TenancyConfig,
    schema: &Schema,
    resolved: &ResolvedTenancy,
    tenant: &str,
) -> Result<Vec<(String, HashSet<String>)>> {
    let dialect = match conn {
        rows::DbConn::Sqlite(_) => Dialect::Sqlite,
        rows::DbConn::Postgres(_) => Dialect::Postgres,
    };
    let mut out = Vec::new();
    for (source, rule) in &tenancy.blobs {
        let BlobRule::Table { table, column } = rule else {
            continue;
        };
        if !schema.tables.contains_key(table) {
            continue;
        }
        let membership = resolved.membership(table).unwrap_or(&Membership::Global);
        let Some(sql) =
            tenancy::blob_keys_sql(table, column, membership, &resolved.column, dialect)
        else {
            continue;
        };
        let failed =
            |e: sqlx::Error| Error::other(format!("listing blob keys in {table}.{column}: {e}"));
        let query = sqlx::AssertSqlSafe(sql);
        let keys: Vec<Option<String>> = match &mut conn {
            rows::DbConn::Sqlite(c) => {
                sqlx::query_scalar(query)
                    .bind(tenant)
                    .fetch_all(&mut **c)
                    .await
            }
            rows::DbConn::Postgres(c) => {
                sqlx::query_scalar(query)
                    .bind(tenant)
                    .fetch_all(&mut **c)
                    .await
            }
        }
        .map_err(failed)?;
        out.push((source.clone(), keys.into_iter().flatten().collect()));
    }
    Ok(out)
}

fn key_filter(
    rule: &BlobRule,
    tenant: &str,
    source: &str,
    keys: &[(String, HashSet<String>)],
) -> Result<files::KeyFilter> {
    if let Some(prefix) = rule.prefix_for(tenant) {
        return Ok(files::KeyFilter::Prefix(prefix));
    }
    let mut all = HashSet::new();
    let mut found = false;
    for (_, k) in keys.iter().filter(|(s, _)| s == source) {
        found = true;
        all.extend(k.iter().cloned());
    }
    if !found {
        return Err(Error::config(format!(
            "[tenancy.blobs] {source} = \"{rule}\": no database source has that table"
        ))
        .with_hint("name a table of one of the database sources"));
    }
    Ok(files::KeyFilter::Keys(all))
}

/// The export's scratch directory in the output's directory (removed on drop): mode 0700, so
/// the tenant's rows and files spooled in it are never readable by other users whatever the
/// umask (tempfile creates directories with the process's default mode).
fn scratch_dir(dir: &Path) -> Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix(".timevault-export-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(dir)
        .map_err(|e| Error::io(dir.display(), e))
}

/// Create (or truncate) a spool file readable by its owner only (mode 0600 whatever the
/// umask): it holds one tenant's rows or files in the clear until the archive takes them.
pub(crate) fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// The temporary archive file in the output's directory (mode 0600, as tempfile creates
/// files; removed on drop unless persisted) and the writer on it.
fn start_archive(
    out: &Path,
    dir: &Path,
    encryption: Option<&Encryption>,
) -> Result<(tempfile::NamedTempFile, archive::ArchiveWriter)> {
    let temp = tempfile::Builder::new()
        .prefix(".timevault-export-")
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir.display(), e))?;
    let file = temp
        .as_file()
        .try_clone()
        .map_err(|e| Error::io(temp.path().display(), e))?;
    let writer = archive::ArchiveWriter::new(file, &out.display().to_string(), encryption)?;
    Ok((temp, writer))
}

/// Rename the finished archive into place (refusing an existing file unless forced).
fn persist(temp: tempfile::NamedTempFile, out: &Path, force: bool) -> Result<()> {
    let result = if force {
        temp.persist(out).map(|_| ())
    } else {
        temp.persist_noclobber(out).map(|_| ())
    };
    result.map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            Error::new(
                ErrorKind::TargetExists,
                format!("export output {} appeared while exporting", out.display()),
            )
            .with_hint("choose a new file name, or pass --force to replace it")
        } else {
            Error::io(out.display(), e.error)
        }
    })?;
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty());
    if let Ok(d) = std::fs::File::open(dir.unwrap_or(Path::new("."))) {
        let _ = d.sync_all();
    }
    Ok(())
}
