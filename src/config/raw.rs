//! The config file exactly as written: serde structs, every table `deny_unknown_fields`.
//!
//! Fields that are checked after parsing are `Spanned`, so a validation error can point at the
//! line and column of the offending value. Nothing here is interpreted; see `validate.rs`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub repository: Spanned<RawRepository>,
    #[serde(default)]
    pub replicas: Vec<Spanned<RawReplica>>,
    #[serde(default)]
    pub sources: Vec<Spanned<RawSource>>,
    #[serde(default)]
    pub schedule: RawSchedule,
    #[serde(default)]
    pub daemon: RawDaemon,
    #[serde(default)]
    pub retention: RawRetention,
    pub tenancy: Option<Spanned<RawTenancy>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRepository {
    pub key_file: Option<Spanned<String>>,
    pub key_env: Option<Spanned<String>>,
    pub passphrase_env: Option<Spanned<String>>,
    /// Key-encryption keys in key services (`aws-kms:<ARN>`, `azure-keyvault:<key URL>`).
    pub kek: Option<Spanned<Vec<Spanned<String>>>>,
    /// `"all"` or an integer; a `Value` so that a wrong type gets our message, not serde's.
    pub write_quorum: Option<Spanned<toml::Value>>,
    pub compression_level: Option<Spanned<i64>>,
    pub lease_ttl: Option<Spanned<String>>,
    /// How often a key service is asked whether a KEK is still Enabled.
    pub kek_check_interval: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReplica {
    pub name: Spanned<String>,
    pub region: Spanned<String>,
    pub url: Spanned<String>,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    pub name: Spanned<String>,
    pub kind: Spanned<String>,
    pub url: Spanned<String>,
    /// Spanned: some options (a postgres source's `slot`, `publication`) are checked here.
    #[serde(default)]
    pub options: BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSchedule {
    pub snapshot: Option<Spanned<String>>,
    pub capture_interval: Option<Spanned<String>>,
    pub blob_scan: Option<Spanned<String>>,
    pub prune: Option<Spanned<String>>,
    pub verify: Option<Spanned<String>>,
    pub drill: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDaemon {
    pub listen: Option<Spanned<String>>,
    pub max_capture_lag: Option<Spanned<String>>,
    pub max_snapshot_age: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetention {
    pub pitr: Option<Spanned<String>>,
    pub daily: Option<Spanned<String>>,
    pub weekly: Option<Spanned<String>>,
    pub monthly: Option<Spanned<String>>,
    pub yearly: Option<Spanned<String>>,
    pub audit: Option<Spanned<String>>,
    pub chunk_grace: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTenancy {
    pub column: Option<Spanned<String>>,
    pub tenant_keys: Option<Spanned<bool>>,
    #[serde(default)]
    pub tables: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub blobs: BTreeMap<String, Spanned<String>>,
    /// Tenant id → its own key-encryption key (a customer-managed key).
    #[serde(default)]
    pub keys: BTreeMap<String, Spanned<String>>,
}
