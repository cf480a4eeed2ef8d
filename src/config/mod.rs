//! Configuration: the TOML file an operator writes, checked once and turned into plain types.
//!
//! Loading happens in two steps, like ripgrep's low-level → high-level arguments and
//! Litestream's `Validate()`: serde reads the file into raw structs (`raw.rs`, every table with
//! `deny_unknown_fields`), then `validate.rs` checks every rule and resolves relative paths
//! against the config file's directory. Every error names the file, the line and column, and the
//! key, and carries a hint. The result ([`Config`]) is the file layer only; the binary applies
//! environment variables and flags on top (precedence file < env < flags).
//!
//! All cron expressions have seconds first (6 or 7 fields) and are evaluated in UTC.

mod locate;
pub mod postgres_options;
pub use postgres_options::{CaptureChoice, PostgresOptions};
mod raw;
mod show;
pub mod tenancy;
mod validate;
mod values;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};

pub use crate::redact::{is_secret_option, mask_url};

/// The embedded default configuration (`schedules/embedded.toml`). Its relative paths are meant
/// to be resolved against the `schedules/` directory, so pass a path inside it as `origin`.
pub const EMBEDDED_TOML: &str = include_str!("../../schedules/embedded.toml");

/// A validated configuration: every path absolute, every URL checked, every schedule parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this configuration came from, as given; relative paths were resolved against its
    /// directory.
    pub path: PathBuf,
    pub repository: RepositoryConfig,
    /// At least one; writes go to all of them and wait for the write quorum.
    pub replicas: Vec<ReplicaConfig>,
    /// What is backed up; may be empty (a repository can be inspected without sources).
    pub sources: Vec<SourceConfig>,
    pub schedule: ScheduleConfig,
    pub daemon: DaemonConfig,
    pub retention: RetentionConfig,
    /// `[tenancy]`: which rows and blobs belong to which tenant (needed by `export`).
    pub tenancy: Option<tenancy::TenancyConfig>,
}

/// The `[repository]` table: how the master key is found and how writes are acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub struct RepositoryConfig {
    /// The local key: the data key of a format-1 repository, a KEK of a format-2 one. `None`
    /// only when `kek` names at least one key service KEK.
    pub key: Option<KeySource>,
    /// Key-encryption keys in key services, tried in this order after the local key.
    pub kek: Vec<crate::keys::KekUri>,
    pub write_quorum: WriteQuorum,
    /// zstd level, 1..=19.
    pub compression_level: i32,
    /// How long a writer's lease lives without renewal.
    pub lease_ttl: Duration,
    /// How long a key service's answer about a KEK's state is trusted (`kek_check_interval`,
    /// default 5 minutes): a tenant KEK disabled under a running daemon shows within it.
    pub kek_check_interval: Duration,
}

/// Where the repository's master key comes from. Exactly one is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A key file (absolute path); it must not be readable by group or others.
    File(PathBuf),
    /// The NAME of an environment variable holding the key in hex or base64.
    Env(String),
    /// The NAME of an environment variable holding a passphrase; the key is derived with Argon2id.
    PassphraseEnv(String),
}

/// How many replicas must acknowledge a write before it counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteQuorum {
    All,
    /// Validated to be in 1..=number of replicas.
    Count(usize),
}

impl WriteQuorum {
    /// The number of acknowledgements needed when writing to `replicas` replicas.
    ///
    /// `Count(n)` is returned as is even when `replicas < n`: a write to too few replicas must
    /// fail rather than silently weaken the configured durability.
    pub fn required(&self, replicas: usize) -> usize {
        match self {
            WriteQuorum::All => replicas,
            WriteQuorum::Count(n) => *n,
        }
    }
}

impl fmt::Display for WriteQuorum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteQuorum::All => f.write_str("all"),
            WriteQuorum::Count(n) => write!(f, "{n}"),
        }
    }
}

/// One `[[replicas]]` entry: an object_store location labelled with a region.
///
/// `Debug` masks the URL's password and secret options, so the struct can be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// Unique among replicas; `[a-z0-9][a-z0-9_-]*`.
    pub name: String,
    /// A label shown in status output, such as `westeurope`.
    pub region: String,
    /// An object_store URL; a relative path in the file has become an absolute `file://` URL.
    pub url: String,
    /// Passed to object_store as is (endpoint, allow_http, credentials...).
    pub options: BTreeMap<String, String>,
}

/// The kind of a source, which decides how it is read and restored. Stored in snapshot
/// manifests as `sqlite`, `postgres` or `blobs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Sqlite,
    Postgres,
    Blobs,
}

impl SourceKind {
    /// Every kind, in the order they are documented.
    pub const ALL: [SourceKind; 3] = [SourceKind::Sqlite, SourceKind::Postgres, SourceKind::Blobs];

    /// The name used in the config file: `sqlite`, `postgres` or `blobs`.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Sqlite => "sqlite",
            SourceKind::Postgres => "postgres",
            SourceKind::Blobs => "blobs",
        }
    }

    /// Whether full listings (scans) are its only restore points: a blob store has no change
    /// log to capture between them, so it has no capture lag either.
    pub fn captures_by_scan(self) -> bool {
        self == SourceKind::Blobs
    }

    /// Whether it is a database (rows a tenant map can select; a consistency group's
    /// database side).
    pub fn is_database(self) -> bool {
        matches!(self, SourceKind::Sqlite | SourceKind::Postgres)
    }

    /// Whether a drill can compare a restore with the live source at a pinned instant (a
    /// SQLite database, pinned by the task that captures it).
    pub fn has_live_point(self) -> bool {
        self == SourceKind::Sqlite
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `[[sources]]` entry.
///
/// `url` depends on the kind: `sqlite` → an absolute file path; `postgres` → a
/// `postgres://` / `postgresql://` URL; `blobs` → an object_store URL (relative paths have
/// become absolute `file://` URLs). `Debug` masks passwords and secret options.
#[derive(Clone, PartialEq, Eq)]
pub struct SourceConfig {
    /// Unique among sources; `[a-z0-9][a-z0-9_-]*`.
    pub name: String,
    pub url: String,
    /// The kind and its options, checked at load.
    pub spec: SourceSpec,
}

/// What kind of source it is, with the options of that kind, each checked once at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A SQLite database file; it takes no options.
    Sqlite,
    Postgres(PostgresOptions),
    /// An object store; its options go to object_store as they are (endpoint, credentials...).
    Blobs {
        store: BTreeMap<String, String>,
    },
}

impl SourceSpec {
    pub fn kind(&self) -> SourceKind {
        match self {
            SourceSpec::Sqlite => SourceKind::Sqlite,
            SourceSpec::Postgres(_) => SourceKind::Postgres,
            SourceSpec::Blobs { .. } => SourceKind::Blobs,
        }
    }

    /// The options as an operator writes them (for `config show`).
    pub fn options_as_written(&self) -> BTreeMap<String, String> {
        match self {
            SourceSpec::Sqlite => BTreeMap::new(),
            SourceSpec::Postgres(options) => options.as_written(),
            SourceSpec::Blobs { store } => store.clone(),
        }
    }
}

impl SourceConfig {
    pub fn sqlite(name: &str, path: &str) -> SourceConfig {
        SourceConfig {
            name: name.into(),
            url: path.into(),
            spec: SourceSpec::Sqlite,
        }
    }

    pub fn postgres(name: &str, url: &str, options: PostgresOptions) -> SourceConfig {
        SourceConfig {
            name: name.into(),
            url: url.into(),
            spec: SourceSpec::Postgres(options),
        }
    }

    pub fn blobs(name: &str, url: &str, store: BTreeMap<String, String>) -> SourceConfig {
        SourceConfig {
            name: name.into(),
            url: url.into(),
            spec: SourceSpec::Blobs { store },
        }
    }

    pub fn kind(&self) -> SourceKind {
        self.spec.kind()
    }

    /// A PostgreSQL source's options; `None` for other kinds.
    pub fn postgres_options(&self) -> Option<&PostgresOptions> {
        match &self.spec {
            SourceSpec::Postgres(options) => Some(options),
            _ => None,
        }
    }

    /// A blobs source's object_store options; empty for other kinds.
    pub fn store_options(&self) -> &BTreeMap<String, String> {
        static NONE: BTreeMap<String, String> = BTreeMap::new();
        match &self.spec {
            SourceSpec::Blobs { store } => store,
            _ => &NONE,
        }
    }
}

/// The `[schedule]` table. Unset cron entries mean the job does not run on a schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleConfig {
    pub snapshot: Option<CronSpec>,
    /// How often change capture polls its sources; default 1s, never zero.
    pub capture_interval: Duration,
    pub blob_scan: Option<CronSpec>,
    pub prune: Option<CronSpec>,
    pub verify: Option<CronSpec>,
    pub drill: Option<CronSpec>,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            snapshot: None,
            capture_interval: Duration::from_secs(1),
            blob_scan: None,
            prune: None,
            verify: None,
            drill: None,
        }
    }
}

/// A parsed cron expression (seconds first, UTC) together with the text it came from.
#[derive(Debug, Clone)]
pub struct CronSpec {
    /// The expression as written in the file.
    pub expr: String,
    pub schedule: cron::Schedule,
}

impl CronSpec {
    /// Parse a seconds-first cron expression, with the same checks as the config file.
    pub fn parse(expr: &str) -> Result<CronSpec> {
        values::cron(expr)
            .map_err(|p| Error::config(format!("cron expression: {}", p.message)).with_hint(p.hint))
    }

    /// The first firing strictly after `t`, or `None` if the expression never fires again.
    /// Pure: the scheduler is a function of (schedule, now).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule.after(&t).next()
    }
}

impl PartialEq for CronSpec {
    fn eq(&self, other: &Self) -> bool {
        self.expr == other.expr
    }
}

impl fmt::Display for CronSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expr)
    }
}

/// The `[daemon]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Address of the health and metrics endpoint; default `127.0.0.1:9477`.
    pub listen: SocketAddr,
    /// `/healthz` fails when the newest restorable instant is older than this; default 5m.
    pub max_capture_lag: Duration,
    /// `/healthz` fails when the newest snapshot (or blob scan) is older than this; default 26h.
    pub max_snapshot_age: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9477)),
            max_capture_lag: Duration::from_secs(5 * 60),
            max_snapshot_age: Duration::from_secs(26 * 3600),
        }
    }
}

/// The `[retention]` table: how long restore points, audit records and unreferenced chunks
/// are kept (see `retention` and `prune`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionConfig {
    /// Every instant of the last `pitr` is restorable; default 35 days.
    pub pitr: Duration,
    /// Optional calendar tiers: one restore point per day / ISO week / month / year this long.
    pub daily: Option<Duration>,
    pub weekly: Option<Duration>,
    pub monthly: Option<Duration>,
    pub yearly: Option<Duration>,
    /// Audit records are kept at least this long; default 400 days.
    pub audit: Duration,
    /// A chunk is deleted only after it was found unreferenced at least this long ago;
    /// default 1 day. Writers refresh their chunk index at half this period.
    pub chunk_grace: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            pitr: Duration::from_secs(35 * 86_400),
            daily: None,
            weekly: None,
            monthly: None,
            yearly: None,
            audit: Duration::from_secs(400 * 86_400),
            chunk_grace: Duration::from_secs(86_400),
        }
    }
}

impl Config {
    /// Read and validate the config file at `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            let shown = path.display();
            match err.kind() {
                std::io::ErrorKind::NotFound => {
                    Error::config(format!("{shown}: config file not found")).with_hint(
                        "pass the right path with --config, or start from schedules/embedded.toml",
                    )
                }
                std::io::ErrorKind::InvalidData => {
                    Error::config(format!("{shown}: config file is not valid UTF-8"))
                        .with_hint("save the file as UTF-8 text")
                }
                _ => Error::config(format!("{shown}: cannot read config file: {err}"))
                    .with_hint("check that the file exists and is readable by this user"),
            }
        })?;
        Config::parse(&text, path)
    }

    /// Parse and validate config text. `origin` is the file the text came from: it names the
    /// file in messages, and relative paths are resolved against its directory.
    pub fn parse(text: &str, origin: &Path) -> Result<Config> {
        let raw: raw::RawConfig =
            toml::from_str(text).map_err(|err| locate::parse_error(text, origin, &err))?;
        validate::validate(raw, text, origin)
    }

    /// The source called `name`; an unknown name is an input error listing the known ones.
    pub fn source(&self, name: &str) -> Result<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.sources.iter().map(|s| s.name.as_str()).collect();
            unknown_name("source", name, &known, &self.path)
        })
    }

    /// The replica called `name`; an unknown name is an input error listing the known ones.
    pub fn replica(&self, name: &str) -> Result<&ReplicaConfig> {
        self.replicas
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self.replicas.iter().map(|r| r.name.as_str()).collect();
                unknown_name("replica", name, &known, &self.path)
            })
    }

    /// The resolved configuration as TOML, with secrets masked (`timevault config show`).
    pub fn show(&self) -> String {
        show::show(self)
    }
}

fn unknown_name(what: &str, name: &str, known: &[&str], path: &Path) -> Error {
    let message = if known.is_empty() {
        format!(
            "unknown {what} `{name}`: {} defines no {what}s",
            path.display()
        )
    } else {
        format!(
            "unknown {what} `{name}`; known {what}s: {}",
            known.join(", ")
        )
    };
    Error::input(message).with_hint(format!(
        "use one of the names in {}, or add a [[{what}s]] entry there",
        path.display()
    ))
}

impl fmt::Debug for ReplicaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicaConfig")
            .field("name", &self.name)
            .field("region", &self.region)
            .field("url", &mask_url(&self.url))
            .field("options", &show::masked_options(&self.options))
            .finish()
    }
}

impl fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceConfig")
            .field("name", &self.name)
            .field("kind", &self.kind())
            .field("url", &mask_url(&self.url))
            .field(
                "options",
                &show::masked_options(&self.spec.options_as_written()),
            )
            .finish()
    }
}
