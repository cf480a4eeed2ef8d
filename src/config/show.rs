//! `config show`: the resolved configuration as TOML, and the secret masking it relies on.
//!
//! Masking is by name, as restic's `StripPassword` does: an option whose key looks like a
//! credential, a URL's userinfo password and credential-like query parameters (SAS tokens) are
//! replaced by `********`. Names of environment variables are shown; their values never are.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Config, CronSpec, KeySource, ReplicaConfig, SourceConfig, WriteQuorum};

/// What replaces a secret in anything printed.
pub(super) const MASK: &str = "********";

/// Words that mark an option or query parameter as a secret.
const SECRET_WORDS: &[&str] = &[
    "secret",
    "password",
    "passwd",
    "key",
    "token",
    "sas",
    "credential",
    "signature",
];

/// Whether an option (or URL query parameter) named `key` holds a secret: its name contains
/// secret, password, key, token, sas, credential or signature (`access_key`, `account_key`,
/// `sas_token`...), or is `sig` (an Azure SAS signature). Case-insensitive.
pub fn is_secret_option(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key == "sig" || SECRET_WORDS.iter().any(|word| key.contains(word))
}

/// `url` with its userinfo password and any secret query parameters replaced by `********`;
/// anything that is not a URL is returned unchanged. Use it on every URL that reaches a log line
/// or an error message.
///
/// `postgres://app:hunter2@db/app` → `postgres://app:********@db/app`;
/// `https://acct.blob.core.windows.net/c?sv=2022&sig=abc` → `...?sv=2022&sig=********`.
pub fn mask_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let authority_start = scheme_end + 3;
    let rest = &url[authority_start..];
    let mut authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    // An unencoded '/', '?' or '#' in a password ends the authority early: "user:pa/ss@host".
    // A ':' not followed by a port number means userinfo; mask up to the last '@' (over-masking
    // beats leaking).
    if !authority.contains('@') && !authority.starts_with('[') {
        let not_port = authority
            .split_once(':')
            .is_some_and(|(_, after)| !after.chars().all(|c| c.is_ascii_digit()));
        if let Some(at) = rest.rfind('@').filter(|_| not_port) {
            authority_len = rest[at..]
                .find(['/', '?', '#'])
                .map_or(rest.len(), |i| at + i);
        }
    }
    let authority = &rest[..authority_len];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..authority_start]);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str(MASK);
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let rest = &rest[authority_len..];
    let (before_fragment, fragment) = match rest.find('#') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match before_fragment.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            out.push_str(&mask_query(query));
        }
        None => out.push_str(before_fragment),
    }
    out.push_str(fragment);
    out
}

fn mask_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_secret_option(name) => format!("{name}={MASK}"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

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
    tables: BTreeMap<String, String>,
    blobs: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct ShownRepository {
    #[serde(skip_serializing_if = "Option::is_none")]
    key_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    passphrase_env: Option<String>,
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
        KeySource::File(path) => key_file = Some(path.display().to_string()),
        KeySource::Env(name) => key_env = Some(name.clone()),
        KeySource::PassphraseEnv(name) => passphrase_env = Some(name.clone()),
    }
    let cron = |spec: &Option<CronSpec>| spec.as_ref().map(|s| s.expr.clone());
    let schedule = &config.schedule;
    let shown = Shown {
        repository: ShownRepository {
            key_file,
            key_env,
            passphrase_env,
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
        kind: Some(source.kind.to_string()),
        url: mask_url(&source.url),
        options: masked_options(&source.options),
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

    #[test]
    fn mask_url_redacts_passwords_and_secret_parameters() {
        let cases = [
            (
                "postgres://user:pass@host:5432/db",
                "postgres://user:********@host:5432/db",
            ),
            ("postgres://user@host/db", "postgres://user@host/db"),
            (
                "postgresql://u:p%40ss@h/db?sslmode=require",
                "postgresql://u:********@h/db?sslmode=require",
            ),
            (
                "https://a.blob.core.windows.net/c?sv=1&sig=abc#f",
                "https://a.blob.core.windows.net/c?sv=1&sig=********#f",
            ),
            (
                "s3://bucket/prefix?token=t&x=1",
                "s3://bucket/prefix?token=********&x=1",
            ),
            ("s3://bucket/p@th", "s3://bucket/p@th"),
            ("file:///var/app.db", "file:///var/app.db"),
            ("/var/app.db", "/var/app.db"),
            ("not a url", "not a url"),
            ("postgres://u:pa/ss@h/db", "postgres://u:********@h/db"),
            (
                "postgres://u:pa?s#s@h/db?x=1",
                "postgres://u:********@h/db?x=1",
            ),
            ("postgres://u:p@ss@h/db", "postgres://u:********@h/db"),
            ("http://host:9000/a@b", "http://host:9000/a@b"),
            ("http://[::1]:9000/a@b", "http://[::1]:9000/a@b"),
            (
                "https://h/x?X-Amz-Signature=s&X-Amz-Security-Token=t",
                "https://h/x?X-Amz-Signature=********&X-Amz-Security-Token=********",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(mask_url(url), want, "{url}");
        }
        assert!(is_secret_option("AWS_SECRET_ACCESS_KEY"));
        assert!(!is_secret_option("endpoint"));
    }
}
