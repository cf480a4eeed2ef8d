//! From raw (as written) to resolved (as used): every rule checked, every path made absolute.
//!
//! Each check fails with "file:line:col: key: what is wrong" and a hint saying what to write
//! instead. Validation stops at the first error.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use toml::Spanned;

use super::postgres_options::GROUP_OPTION;
use super::raw::{
    RawConfig, RawDaemon, RawReplica, RawRepository, RawRetention, RawSchedule, RawSource,
    RawTenancy,
};
use super::values::{self, Problem};
use super::{
    locate, Config, CronSpec, DaemonConfig, KeySource, PostgresOptions, ReplicaConfig,
    RepositoryConfig, RetentionConfig, ScheduleConfig, SourceConfig, SourceKind, SourceSpec,
    WriteQuorum,
};
use crate::error::{Error, Result};

const DEFAULT_COMPRESSION_LEVEL: i32 = 3;
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);

pub(super) fn validate(raw: RawConfig, text: &str, origin: &Path) -> Result<Config> {
    let v = Validator {
        text,
        origin,
        dir: values::config_dir(origin),
    };
    let replicas = v.replicas(&raw.replicas, raw.repository.span())?;
    let repository = v.repository(&raw.repository, replicas.len())?;
    let sources = v.sources(&raw.sources)?;
    let schedule = v.schedule(&raw.schedule)?;
    let daemon = v.daemon(&raw.daemon)?;
    let retention = v.retention(&raw.retention)?;
    let tenancy = match &raw.tenancy {
        Some(t) => Some(v.tenancy(t, &sources)?),
        None => None,
    };
    Ok(Config {
        path: origin.to_path_buf(),
        repository,
        replicas,
        sources,
        schedule,
        daemon,
        retention,
        tenancy,
    })
}

struct Validator<'a> {
    text: &'a str,
    origin: &'a Path,
    /// Absolute directory of the config file; relative paths are resolved against it.
    dir: PathBuf,
}

impl Validator<'_> {
    fn err(
        &self,
        span: Range<usize>,
        key: &str,
        msg: impl Display,
        hint: impl Into<String>,
    ) -> Error {
        locate::located(self.origin, self.text, span, key, &msg.to_string()).with_hint(hint)
    }

    fn replicas(
        &self,
        raw: &[Spanned<RawReplica>],
        repo_span: Range<usize>,
    ) -> Result<Vec<ReplicaConfig>> {
        if raw.is_empty() {
            return Err(self.err(
                repo_span,
                "replicas",
                "no replicas configured; at least one is required",
                "add a [[replicas]] table with name, region and url (a plain path such as \
                 var/replica works for a first try)",
            ));
        }
        let mut seen = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, entry) in raw.iter().enumerate() {
            let r = entry.get_ref();
            let key = format!("replicas[{i}]");
            let name = self.name(&r.name, &key, "replica", &mut seen)?;
            let region = r.region.get_ref().trim();
            if region.is_empty() {
                return Err(self.err(
                    r.region.span(),
                    &format!("{key}.region"),
                    "region is empty",
                    "label the replica with where it lives, e.g. region = \"westeurope\"",
                ));
            }
            out.push(ReplicaConfig {
                name,
                region: region.to_string(),
                url: self.check(&r.url, &format!("{key}.url"), |u| {
                    values::store_url(u, &self.dir)
                })?,
                options: r.options.clone(),
            });
        }
        Ok(out)
    }

    fn repository(
        &self,
        raw: &Spanned<RawRepository>,
        replicas: usize,
    ) -> Result<RepositoryConfig> {
        let r = raw.get_ref();
        let compression_level = match &r.compression_level {
            None => DEFAULT_COMPRESSION_LEVEL,
            Some(level) => match i32::try_from(*level.get_ref()) {
                Ok(l) if (1..=19).contains(&l) => l,
                _ => {
                    return Err(self.err(
                        level.span(),
                        "repository.compression_level",
                        format!("compression level {} is outside 1..=19", level.get_ref()),
                        "use a zstd level from 1 (fast) to 19 (small); 3 is the default",
                    ))
                }
            },
        };
        let lease_ttl = match &r.lease_ttl {
            None => DEFAULT_LEASE_TTL,
            Some(ttl) => self.duration(ttl, "repository.lease_ttl")?,
        };
        let kek_check_interval = match &r.kek_check_interval {
            None => crate::keys::STATE_TTL,
            Some(every) => self.duration(every, "repository.kek_check_interval")?,
        };
        Ok(RepositoryConfig {
            kek: self.keks(r)?,
            key: self.key_source(raw)?,
            write_quorum: self.write_quorum(r, replicas)?,
            compression_level,
            lease_ttl,
            kek_check_interval,
        })
    }

    /// `kek = ["aws-kms:<ARN>", "azure-keyvault:<key URL>", ...]`: each parsed, none twice.
    fn keks(&self, r: &RawRepository) -> Result<Vec<crate::keys::KekUri>> {
        let Some(list) = &r.kek else {
            return Ok(Vec::new());
        };
        let mut keks = Vec::new();
        for (i, text) in list.get_ref().iter().enumerate() {
            let key = format!("repository.kek[{i}]");
            let kek = crate::keys::KekUri::parse(text.get_ref()).map_err(|e| {
                self.err(
                    text.span(),
                    &key,
                    e,
                    "a KEK is aws-kms:arn:aws:kms:<region>:<account>:key/<key id> or azure-keyvault:https://<vault>.vault.azure.net/keys/<name>",
                )
            })?;
            if keks.contains(&kek) {
                return Err(self.err(
                    text.span(),
                    &key,
                    format!("{kek} is listed twice"),
                    "list each key-encryption key once",
                ));
            }
            keks.push(kek);
        }
        Ok(keks)
    }

    fn key_source(&self, raw: &Spanned<RawRepository>) -> Result<Option<KeySource>> {
        let r = raw.get_ref();
        let given: Vec<(&str, &Spanned<String>)> = [
            ("key_file", &r.key_file),
            ("key_env", &r.key_env),
            ("passphrase_env", &r.passphrase_env),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
        .collect();
        let hint = "set exactly one of key_file = \"path\", key_env = \"VAR\" (hex or base64 key) \
                    or passphrase_env = \"VAR\", or kek = [\"aws-kms:<key ARN>\"]";
        let (field, value) = match given.as_slice() {
            [] if r.kek.as_ref().is_some_and(|k| !k.get_ref().is_empty()) => return Ok(None),
            [] => {
                return Err(self.err(raw.span(), "repository", "no key source is set", hint));
            }
            [one] => *one,
            [(first, _), (second, value), ..] => {
                return Err(self.err(
                    value.span(),
                    &format!("repository.{second}"),
                    format!("both {first} and {second} are set; exactly one key source is allowed"),
                    hint,
                ));
            }
        };
        let key = format!("repository.{field}");
        let text = value.get_ref().trim();
        if field == "key_file" {
            if text.is_empty() {
                return Err(self.err(value.span(), &key, "key_file is empty", hint));
            }
            return Ok(Some(KeySource::File(self.resolve(text))));
        }
        let valid = text
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(self.err(
                value.span(),
                &key,
                format!("`{text}` is not an environment variable name"),
                "give the variable's NAME (letters, digits, _), such as TIMEVAULT_KEY, not its value",
            ));
        }
        Ok(Some(match field {
            "key_env" => KeySource::Env(text.to_string()),
            _ => KeySource::PassphraseEnv(text.to_string()),
        }))
    }

    fn write_quorum(&self, r: &RawRepository, replicas: usize) -> Result<WriteQuorum> {
        let Some(value) = &r.write_quorum else {
            return Ok(WriteQuorum::All);
        };
        let key = "repository.write_quorum";
        let hint = format!("use \"all\" or a number from 1 to {replicas} (the number of replicas)");
        match value.get_ref() {
            toml::Value::String(s) if s.trim().eq_ignore_ascii_case("all") => Ok(WriteQuorum::All),
            toml::Value::Integer(n) if *n < 1 => Err(self.err(
                value.span(),
                key,
                format!("write_quorum {n} is less than 1"),
                hint,
            )),
            toml::Value::Integer(n) if *n as u64 > replicas as u64 => Err(self.err(
                value.span(),
                key,
                format!("write_quorum {n} is larger than the number of replicas ({replicas})"),
                format!("lower write_quorum to at most {replicas}, use \"all\", or add replicas"),
            )),
            toml::Value::Integer(n) => Ok(WriteQuorum::Count(*n as usize)),
            other => Err(self.err(
                value.span(),
                key,
                format!("expected \"all\" or a number of replicas, found {other}"),
                hint,
            )),
        }
    }

    fn sources(&self, raw: &[Spanned<RawSource>]) -> Result<Vec<SourceConfig>> {
        let mut seen = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, entry) in raw.iter().enumerate() {
            let s = entry.get_ref();
            let key = format!("sources[{i}]");
            let name = self.name(&s.name, &key, "source", &mut seen)?;
            let kind = match s.kind.get_ref().trim() {
                "sqlite" => SourceKind::Sqlite,
                "postgres" => SourceKind::Postgres,
                "blobs" => SourceKind::Blobs,
                other => {
                    return Err(self.err(
                        s.kind.span(),
                        &format!("{key}.kind"),
                        format!("unknown source kind `{other}`"),
                        "use one of sqlite, postgres or blobs",
                    ))
                }
            };
            let url_key = format!("{key}.url");
            let url = match kind {
                SourceKind::Sqlite => {
                    self.check(&s.url, &url_key, |u| values::sqlite_path(u, &self.dir))?
                }
                SourceKind::Postgres => self.check(&s.url, &url_key, values::postgres_url)?,
                SourceKind::Blobs => {
                    self.check(&s.url, &url_key, |u| values::store_url(u, &self.dir))?
                }
            };
            let spec = match kind {
                SourceKind::Sqlite => {
                    self.no_options(&s.options, &key)?;
                    SourceSpec::Sqlite
                }
                SourceKind::Postgres => {
                    SourceSpec::Postgres(self.postgres_options(&s.options, &key)?)
                }
                SourceKind::Blobs => SourceSpec::Blobs {
                    store: s
                        .options
                        .iter()
                        .map(|(k, v)| (k.clone(), v.get_ref().clone()))
                        .collect(),
                },
            };
            out.push(SourceConfig { name, url, spec });
        }
        Ok(out)
    }

    /// A sqlite source takes no options: one written is a mistake to name, not to ignore.
    fn no_options(&self, options: &BTreeMap<String, Spanned<String>>, key: &str) -> Result<()> {
        match options.iter().next() {
            None => Ok(()),
            Some((option, value)) => Err(self.err(
                value.span(),
                &format!("{key}.options.{option}"),
                format!("a sqlite source takes no options, found `{option}`"),
                "remove the options table from this source",
            )),
        }
    }

    /// A postgres source's options: `slot` and `publication` are names PostgreSQL accepts,
    /// `snapshot_workers` and `snapshot_split_pages` whole numbers, `snapshot_group_by_tenant`
    /// true or false, `slot_wal_warn` a size; any other option is an error.
    fn postgres_options(
        &self,
        options: &BTreeMap<String, Spanned<String>>,
        key: &str,
    ) -> Result<PostgresOptions> {
        use super::postgres_options::{
            CAPTURE_METHOD_OPTION, GROUP_OPTION, KNOWN_OPTIONS, PUBLICATION_OPTION, SLOT_OPTION,
            SLOT_WAL_WARN_OPTION, SNAPSHOT_WORKERS_OPTION, SPLIT_PAGES_OPTION,
        };
        let at = |option: &str| format!("{key}.options.{option}");
        if let Some((option, value)) = options
            .iter()
            .find(|(option, _)| !KNOWN_OPTIONS.contains(&option.as_str()))
        {
            return Err(self.err(
                value.span(),
                &at(option),
                format!("unknown option `{option}` for a postgres source"),
                format!("use one of {}", KNOWN_OPTIONS.join(", ")),
            ));
        }
        let get = |option: &str, check: &dyn Fn(&str) -> std::result::Result<u64, Problem>| {
            options
                .get(option)
                .map(|value| self.check(value, &at(option), check))
                .transpose()
        };
        let name = |option: &str| {
            options
                .get(option)
                .map(|value| self.check(value, &at(option), values::pg_name))
                .transpose()
        };
        Ok(PostgresOptions {
            slot: name(SLOT_OPTION)?,
            publication: name(PUBLICATION_OPTION)?,
            slot_wal_warn: get(SLOT_WAL_WARN_OPTION, &values::size)?,
            snapshot_workers: get(SNAPSHOT_WORKERS_OPTION, &|t| values::whole_number(t, 64))?
                .map(|n| n as usize),
            snapshot_split_pages: get(SPLIT_PAGES_OPTION, &|t| values::whole_number(t, u64::MAX))?,
            snapshot_group_by_tenant: options
                .get(GROUP_OPTION)
                .map(|value| self.check(value, &at(GROUP_OPTION), values::boolean))
                .transpose()?,
            capture_method: options
                .get(CAPTURE_METHOD_OPTION)
                .map(|value| self.check(value, &at(CAPTURE_METHOD_OPTION), values::capture_choice))
                .transpose()?,
        })
    }

    fn schedule(&self, raw: &RawSchedule) -> Result<ScheduleConfig> {
        let cron = |value: &Option<Spanned<String>>, field: &str| -> Result<Option<CronSpec>> {
            let Some(value) = value else { return Ok(None) };
            self.check(value, &format!("schedule.{field}"), values::cron)
                .map(Some)
        };
        let capture_interval = match &raw.capture_interval {
            None => ScheduleConfig::default().capture_interval,
            Some(v) => self.duration(v, "schedule.capture_interval")?,
        };
        Ok(ScheduleConfig {
            snapshot: cron(&raw.snapshot, "snapshot")?,
            capture_interval,
            blob_scan: cron(&raw.blob_scan, "blob_scan")?,
            prune: cron(&raw.prune, "prune")?,
            verify: cron(&raw.verify, "verify")?,
            drill: cron(&raw.drill, "drill")?,
        })
    }

    fn retention(&self, raw: &RawRetention) -> Result<RetentionConfig> {
        let span = |v: &Option<Spanned<String>>, field: &str| -> Result<Option<Duration>> {
            v.as_ref()
                .map(|v| self.check(v, &format!("retention.{field}"), values::retention_span))
                .transpose()
        };
        let defaults = RetentionConfig::default();
        Ok(RetentionConfig {
            pitr: span(&raw.pitr, "pitr")?.unwrap_or(defaults.pitr),
            daily: span(&raw.daily, "daily")?,
            weekly: span(&raw.weekly, "weekly")?,
            monthly: span(&raw.monthly, "monthly")?,
            yearly: span(&raw.yearly, "yearly")?,
            audit: span(&raw.audit, "audit")?.unwrap_or(defaults.audit),
            chunk_grace: span(&raw.chunk_grace, "chunk_grace")?.unwrap_or(defaults.chunk_grace),
        })
    }

    fn daemon(&self, raw: &RawDaemon) -> Result<DaemonConfig> {
        let defaults = DaemonConfig::default();
        let limit = |value: &Option<Spanned<String>>, key: &str, default: Duration| match value {
            None => Ok(default),
            Some(v) => self.duration(v, key),
        };
        let max_capture_lag = limit(
            &raw.max_capture_lag,
            "daemon.max_capture_lag",
            defaults.max_capture_lag,
        )?;
        let max_snapshot_age = limit(
            &raw.max_snapshot_age,
            "daemon.max_snapshot_age",
            defaults.max_snapshot_age,
        )?;
        let Some(listen) = &raw.listen else {
            return Ok(DaemonConfig {
                max_capture_lag,
                max_snapshot_age,
                ..defaults
            });
        };
        let text = listen.get_ref().trim();
        let listen = SocketAddr::from_str(text).map_err(|_| {
            self.err(
                listen.span(),
                "daemon.listen",
                format!("`{text}` is not an IP address and port"),
                "write ip:port, e.g. 127.0.0.1:9477 or [::1]:9477 (host names are not resolved)",
            )
        })?;
        Ok(DaemonConfig {
            listen,
            max_capture_lag,
            max_snapshot_age,
        })
    }

    /// `[tenancy]`: syntax here; against the database schema at `init` and before an export.
    fn tenancy(
        &self,
        raw: &Spanned<RawTenancy>,
        sources: &[SourceConfig],
    ) -> Result<super::tenancy::TenancyConfig> {
        use super::tenancy::{is_identifier, parse_blob_rule, parse_table_rule};
        let t = raw.get_ref();
        let column = t.column.as_ref().ok_or_else(|| {
            self.err(
                raw.span(),
                "tenancy.column",
                "[tenancy] has no column",
                "name the column that holds the tenant id, e.g. column = \"tenant_id\"",
            )
        })?;
        if !is_identifier(column.get_ref()) {
            return Err(self.err(
                column.span(),
                "tenancy.column",
                format!("`{}` is not a column name", column.get_ref()),
                "use the column's plain name, e.g. tenant_id",
            ));
        }
        let mut tables = std::collections::BTreeMap::new();
        for (table, rule) in &t.tables {
            let key = format!("tenancy.tables.{table}");
            let hint =
                "write \"global\", or a path \"fk_col -> table.col\" (hops separated by commas)";
            if !is_identifier(table) {
                return Err(self.err(
                    rule.span(),
                    &key,
                    format!("`{table}` is not a table name"),
                    hint,
                ));
            }
            let parsed = parse_table_rule(rule.get_ref())
                .map_err(|m| self.err(rule.span(), &key, m, hint))?;
            tables.insert(table.clone(), parsed);
        }
        let mut blobs = std::collections::BTreeMap::new();
        for (source, rule) in &t.blobs {
            let key = format!("tenancy.blobs.{source}");
            if !sources
                .iter()
                .any(|s| &s.name == source && s.kind() == SourceKind::Blobs)
            {
                return Err(self.err(
                    rule.span(),
                    &key,
                    format!("there is no blobs source named `{source}`"),
                    "use the name of a [[sources]] entry with kind = \"blobs\"",
                ));
            }
            let parsed = parse_blob_rule(rule.get_ref()).map_err(|m| {
                self.err(
                    rule.span(),
                    &key,
                    m,
                    "write \"prefix:tenants/{tenant}/\" or \"table:attachments.blob_key\"",
                )
            })?;
            blobs.insert(source.clone(), parsed);
        }
        let keys = self.tenant_keks(t)?;
        // `[tenancy.keys]` implies per-tenant keys; `tenant_keys = false` beside it is a
        // contradiction.
        let asked = match (&t.tenant_keys, t.keys.values().next()) {
            (Some(on), Some(first)) if !*on.get_ref() => {
                return Err(self.err(
                    first.span(),
                    "tenancy.keys",
                    "a tenant's key-encryption key needs per-tenant keys, and tenant_keys = false",
                    "remove tenant_keys = false (tenancy.keys turns per-tenant keys on)",
                ));
            }
            (Some(on), _) if *on.get_ref() => Some(on.span()),
            (_, Some(first)) => Some(first.span()),
            _ => None,
        };
        let tenant_keys = match asked {
            Some(span) => {
                if let Some(sqlite) = sources.iter().find(|s| s.kind() == SourceKind::Sqlite) {
                    return Err(self.err(
                        span.clone(),
                        "tenancy.tenant_keys",
                        format!(
                            "source \"{}\" is SQLite: its snapshots and WAL segments store database pages, and one page holds rows of several tenants, so no key covers one tenant alone",
                            sqlite.name
                        ),
                        "keep per-tenant keys for postgres sources (a repository of their own), or set tenant_keys = false",
                    ));
                }
                if let Some(ungrouped) = sources
                    .iter()
                    .find(|s| s.postgres_options().is_some_and(|o| !o.group_by_tenant()))
                {
                    return Err(self.err(
                        span,
                        "tenancy.tenant_keys",
                        format!(
                            "source \"{}\" sets {GROUP_OPTION} = false: its snapshot chunks mix tenants, so no key covers one tenant alone",
                            ungrouped.name
                        ),
                        "remove that option (grouping by tenant is the default), or set tenant_keys = false",
                    ));
                }
                true
            }
            None => false,
        };
        Ok(super::tenancy::TenancyConfig {
            column: column.get_ref().clone(),
            tables,
            blobs,
            tenant_keys,
            keys,
        })
    }

    /// `[tenancy.keys] "<tenant>" = "<KEK URI>"`: a tenant's own key-encryption key (a
    /// customer-managed key), each parsed.
    fn tenant_keks(
        &self,
        t: &RawTenancy,
    ) -> Result<std::collections::BTreeMap<String, crate::keys::KekUri>> {
        let mut out = std::collections::BTreeMap::new();
        for (tenant, uri) in &t.keys {
            let key = format!("tenancy.keys.{tenant}");
            if tenant.is_empty() || tenant.contains('/') || tenant.chars().any(char::is_control) {
                return Err(self.err(
                    uri.span(),
                    &key,
                    format!("{tenant:?} is not a tenant id"),
                    "write the tenant column's text, e.g. \"1001\" = \"aws-kms:...\"",
                ));
            }
            let kek = crate::keys::KekUri::parse(uri.get_ref()).map_err(|e| {
                self.err(
                    uri.span(),
                    &key,
                    e,
                    "a KEK is aws-kms:arn:aws:kms:<region>:<account>:key/<key id> or azure-keyvault:https://<vault>.vault.azure.net/keys/<name>",
                )
            })?;
            out.insert(tenant.clone(), kek);
        }
        Ok(out)
    }

    /// A unique replica or source name.
    fn name(
        &self,
        value: &Spanned<String>,
        key: &str,
        what: &str,
        seen: &mut HashMap<String, usize>,
    ) -> Result<String> {
        let name = value.get_ref();
        let key = format!("{key}.name");
        let valid = name.len() <= 64
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !valid {
            return Err(self.err(
                value.span(),
                &key,
                format!("`{name}` is not a valid {what} name"),
                "use at most 64 characters from a-z, 0-9, _ and -, starting with a letter or digit",
            ));
        }
        let (first_line, _) = locate::line_col(self.text, value.span().start);
        if let Some(line) = seen.insert(name.clone(), first_line) {
            return Err(self.err(
                value.span(),
                &key,
                format!("duplicate {what} name `{name}` (first defined on line {line})"),
                format!("give every {what} a different name"),
            ));
        }
        Ok(name.clone())
    }

    /// Run a pure check from `values.rs` on a spanned value, locating its problem.
    fn check<T>(
        &self,
        value: &Spanned<String>,
        key: &str,
        check: impl FnOnce(&str) -> std::result::Result<T, Problem>,
    ) -> Result<T> {
        check(value.get_ref()).map_err(|p| self.err(value.span(), key, p.message, p.hint))
    }

    fn duration(&self, value: &Spanned<String>, key: &str) -> Result<Duration> {
        self.check(value, key, values::duration)
    }

    fn resolve(&self, path: &str) -> PathBuf {
        values::resolve(&self.dir, path)
    }
}
