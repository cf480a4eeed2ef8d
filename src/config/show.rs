//! `config show`: the resolved configuration as TOML, and the secret masking it relies on.
//!
//! Masking is by name, as restic's `StripPassword` does: an option whose key looks like a
//! credential, a URL's userinfo password and credential-like query parameters (SAS tokens) are
//! replaced by `********`. Names of environment variables are shown; their values never are.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Config, CronSpec, KeySource, ReplicaConfig, SourceConfig, WriteQuorum};

use crate::redact::{is_secret_option, mask_url, MASK};

/// Options with secret values masked and URLs in the others redacted.
pub(super) fn masked_options(options: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    options
        .iter()
        .map(|(key, value)| {
            let value = if is_secret_option(key) {
                MASK.to_string()
            } else {
                mask_url(value)
            };
            (key.clone(), value)
        })
        .collect()
}

#[derive(Serialize)]
struct Shown {
    repository: ShownRepository,
    replicas: Vec<ShownLocation>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sources: Vec<ShownLocation>,
    schedule: ShownSchedule,
    daemon: ShownDaemon,
    retention: ShownRetention,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenancy: Option<ShownTenancy>,
}

#[derive(Serialize)]
struct ShownRetention {
    pitr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    daily: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    weekly: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    monthly: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    yearly: Option<String>,
    audit: String,
    chunk_grace: String,
}

#[derive(Serialize)]
struct ShownTenancy {
    column: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    tenant_keys: bool,
    tables: BTreeMap<String, String>,
    blobs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    keys: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct ShownRepository {
    #[serde(skip_serializing_if = "Option::is_none")]
    key_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    passphrase_env: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    kek: Vec<String>,
    write_quorum: toml::Value,
    compression_level: i32,
    lease_ttl: String,
}

/// A replica or a source: the same shape apart from region/kind.
#[derive(Serialize)]
struct ShownLocation {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    url: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    options: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct ShownSchedule {
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<String>,
    capture_interval: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    blob_scan: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prune: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    verify: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drill: Option<String>,
}

#[derive(Serialize)]
struct ShownDaemon {
    listen: String,
    max_capture_lag: String,
    max_snapshot_age: String,
}

pub(super) fn show(config: &Config) -> String {
    let repo = &config.repository;
    let (mut key_file, mut key_env, mut passphrase_env) = (None, None, None);
    match &repo.key {
        Some(KeySource::File(path)) => key_file = Some(path.display().to_string()),
        Some(KeySource::Env(name)) => key_env = Some(name.clone()),
        Some(KeySource::PassphraseEnv(name)) => passphrase_env = Some(name.clone()),
        None => {}
    }
    let cron = |spec: &Option<CronSpec>| spec.as_ref().map(|s| s.expr.clone());
    let schedule = &config.schedule;
    let shown = Shown {
        repository: ShownRepository {
            key_file,
            key_env,
            passphrase_env,
            kek: repo.kek.iter().map(|k| k.to_string()).collect(),
            write_quorum: match repo.write_quorum {
                WriteQuorum::All => toml::Value::String("all".into()),
                WriteQuorum::Count(n) => toml::Value::Integer(n as i64),
            },
            compression_level: repo.compression_level,
            lease_ttl: humantime::format_duration(repo.lease_ttl).to_string(),
        },
        replicas: config.replicas.iter().map(shown_replica).collect(),
        sources: config.sources.iter().map(shown_source).collect(),
        schedule: ShownSchedule {
            snapshot: cron(&schedule.snapshot),
            capture_interval: humantime::format_duration(schedule.capture_interval).to_string(),
            blob_scan: cron(&schedule.blob_scan),
            prune: cron(&schedule.prune),
            verify: cron(&schedule.verify),
            drill: cron(&schedule.drill),
        },
        daemon: ShownDaemon {
            listen: config.daemon.listen.to_string(),
            max_capture_lag: humantime::format_duration(config.daemon.max_capture_lag).to_string(),
            max_snapshot_age: humantime::format_duration(config.daemon.max_snapshot_age)
                .to_string(),
        },
        retention: shown_retention(&config.retention),
        tenancy: config.tenancy.as_ref().map(|t| ShownTenancy {
            column: t.column.clone(),
            tenant_keys: t.tenant_keys,
            tables: t
                .tables
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
            blobs: t
                .blobs
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
            keys: t
                .keys
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
        }),
    };
    let body = toml::to_string(&shown)
        .unwrap_or_else(|e| format!("# cannot render the configuration as TOML: {e}\n"));
    format!(
        "# resolved from {}\n# relative paths are absolute, defaults filled in, secrets masked\n\n{body}",
        config.path.display().to_string().replace('\n', " ")
    )
}

fn shown_retention(r: &super::RetentionConfig) -> ShownRetention {
    // In the file's own units, so the shown config reads back.
    let span = |d: std::time::Duration| {
        let hours = d.as_secs() / 3600;
        match hours {
            h if h % 8766 == 0 => format!("{}y", h / 8766),
            h if h % 24 == 0 => format!("{}d", h / 24),
            h => format!("{h}h"),
        }
    };
    ShownRetention {
        pitr: span(r.pitr),
        daily: r.daily.map(span),
        weekly: r.weekly.map(span),
        monthly: r.monthly.map(span),
        yearly: r.yearly.map(span),
        audit: span(r.audit),
        chunk_grace: span(r.chunk_grace),
    }
}

fn shown_replica(replica: &ReplicaConfig) -> ShownLocation {
    ShownLocation {
        name: replica.name.clone(),
        region: Some(replica.region.clone()),
        kind: None,
        url: mask_url(&replica.url),
        options: masked_options(&replica.options),
    }
}

fn shown_source(source: &SourceConfig) -> ShownLocation {
    ShownLocation {
        name: source.name.clone(),
        region: None,
        kind: Some(source.kind().to_string()),
        url: mask_url(&source.url),
        options: masked_options(&source.spec.options_as_written()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn show_masks_secrets() {
        let text = r#"[repository]
    key_env = "TV_MASTER_KEY"

    [[replicas]]
    name = "s3"
    region = "eu"
    url = "s3://bucket/p"
    options = { access_key_id = "AKIAEXAMPLE1", secret_access_key = "s3cr3t-value-1", endpoint = "http://minio:9000", session_token = "tok-value-2" }

    [[replicas]]
    name = "az"
    region = "ne"
    url = "https://acct.blob.core.windows.net/c?sv=2022&sig=sig-value-3"
    options = { account_key = "acct-key-value-4", sas_token = "sas-value-5", account_name = "acct", client_secret = "cs-value-6", azure_storage_password = "pw-value-7", credentials = "cred-value-8", signature = "sig-value-9" }

    [[sources]]
    name = "db"
    kind = "postgres"
    url = "postgres://backup:hunter2-value@db:5432/app"
    "#;
        let config = Config::parse(text, Path::new("/etc/timevault/config.toml")).unwrap();
        let shown = config.show();
        let debug = format!("{config:?}");
        for secret in [
            "AKIAEXAMPLE1",
            "s3cr3t-value-1",
            "tok-value-2",
            "sig-value-3",
            "acct-key-value-4",
            "sas-value-5",
            "cs-value-6",
            "pw-value-7",
            "cred-value-8",
            "sig-value-9",
            "hunter2-value",
        ] {
            assert!(!shown.contains(secret), "{secret} in show():\n{shown}");
            assert!(!debug.contains(secret), "{secret} in Debug: {debug}");
        }
        assert!(shown.contains("TV_MASTER_KEY"), "{shown}");
        assert!(shown.contains("http://minio:9000"));
        assert!(shown.contains("account_name = \"acct\""));
        assert!(shown.contains("postgres://backup:********@db:5432/app"));
        assert!(shown.contains("# resolved from /etc/timevault/config.toml"));
        // key_file paths are not secrets.
        let minimal = "[repository]\nkey_file = \"k.key\"\n\
                       [[replicas]]\nname = \"a\"\nregion = \"r\"\nurl = \"memory://\"\n";
        let config = Config::parse(minimal, Path::new("/etc/timevault/config.toml")).unwrap();
        assert!(config
            .show()
            .contains("key_file = \"/etc/timevault/k.key\""));
    }
}
