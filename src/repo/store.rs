//! Opening an object_store location from a URL and options, the same way for replicas and
//! for blob sources.
//!
//! Cloud credentials come from the standard environment variables (AWS_*, AZURE_*, GOOGLE_*)
//! through each builder's `from_env`, then the config's `options` override them; nothing here
//! ever formats a credential into a message.
//!
//! object_store's own retries are cut to a short schedule ([`client_retry`]): the replica
//! layer retries with its own policy and marks a replica down, and object_store's default
//! (10 retries over up to 3 minutes per request) would hide an outage from it and hold a
//! caller for minutes.

use std::collections::BTreeMap;
use std::sync::Arc;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, RetryConfig};
use url::Url;

use crate::error::{Error, Result};
use crate::redact::mask_url;

/// A store rooted at the URL's location.
pub type Store = Arc<dyn ObjectStore>;

/// Open the object store that `url` names, with builder `options`.
pub fn open_store(url: &str, options: &BTreeMap<String, String>) -> Result<Store> {
    let parsed = Url::parse(url).map_err(|e| {
        Error::config(format!("{}: not a URL: {e}", mask_url(url))).with_hint(
            "use file:///abs/path, s3://bucket/prefix, az://container/prefix or gs://bucket/prefix",
        )
    })?;
    let prefix = parsed.path().trim_start_matches('/').to_string();
    let store: Store = match parsed.scheme() {
        "file" => return open_local(&parsed),
        "memory" => Arc::new(InMemory::new()),
        "s3" | "s3a" => {
            let mut b = AmazonS3Builder::from_env()
                .with_url(url)
                .with_retry(client_retry());
            for (k, v) in options {
                b = b.with_config(option_key::<AmazonS3ConfigKey>(k, url)?, v);
            }
            Arc::new(PrefixStore::new(
                b.build().map_err(|e| build_error(url, e))?,
                prefix,
            ))
        }
        "az" | "azure" | "abfs" | "abfss" => {
            let mut b = MicrosoftAzureBuilder::from_env()
                .with_url(url)
                .with_retry(client_retry());
            for (k, v) in options {
                b = b.with_config(option_key::<AzureConfigKey>(k, url)?, v);
            }
            Arc::new(PrefixStore::new(
                b.build().map_err(|e| build_error(url, e))?,
                prefix,
            ))
        }
        "gs" => {
            let mut b = GoogleCloudStorageBuilder::from_env()
                .with_url(url)
                .with_retry(client_retry());
            for (k, v) in options {
                b = b.with_config(option_key::<GoogleConfigKey>(k, url)?, v);
            }
            Arc::new(PrefixStore::new(
                b.build().map_err(|e| build_error(url, e))?,
                prefix,
            ))
        }
        other => {
            return Err(
                Error::config(format!("{}: unsupported scheme {other}", mask_url(url)))
                    .with_hint("supported: file, s3, az, gs, memory"),
            )
        }
    };
    Ok(store)
}

/// object_store's per-request retries: a few quick ones for a dropped connection or a
/// throttled request, then the error goes up to the replica layer.
fn client_retry() -> RetryConfig {
    RetryConfig {
        max_retries: 3,
        retry_timeout: std::time::Duration::from_secs(30),
        ..RetryConfig::default()
    }
}

fn open_local(url: &Url) -> Result<Store> {
    let path = url
        .to_file_path()
        .map_err(|_| Error::config(format!("{url}: not an absolute file path")))?;
    std::fs::create_dir_all(&path).map_err(|e| Error::io(path.display(), e))?;
    // fsync files and their directories: a write is acknowledged only once it is durable.
    let store = LocalFileSystem::new_with_prefix(&path)
        .map_err(|e| Error::config(format!("{}", path.display())).with_source(e))?
        .with_fsync(true);
    Ok(Arc::new(store))
}

fn option_key<K: std::str::FromStr>(key: &str, url: &str) -> Result<K> {
    key.parse().map_err(|_| {
        Error::config(format!("{}: unknown option {key:?}", mask_url(url)))
            .with_hint("options are object_store builder keys such as endpoint, region, allow_http")
    })
}

fn build_error(url: &str, err: object_store::Error) -> Error {
    Error::config(format!("{}: {err}", mask_url(url)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// There is no GCS emulator in the harness: this proves the URL and options are parsed and
    /// the store is built (no request is sent); talking to GCS is object_store's own tested path.
    #[test]
    fn gcs_urls_parse_with_and_without_a_prefix() {
        let none = BTreeMap::new();
        for url in ["gs://tv-bucket/backups/site-b", "gs://tv-bucket"] {
            let store = open_store(url, &none).unwrap_or_else(|e| panic!("{url}: {e}"));
            let prefix = url.trim_start_matches("gs://tv-bucket").trim_matches('/');
            assert_eq!(store.to_string(), format!("PrefixObjectStore({prefix})"));
        }
        let options: BTreeMap<String, String> =
            [("service_account_key".to_string(), "{}".to_string())].into();
        let err = open_store("gs://tv-bucket/p", &options)
            .expect_err("an unusable service account key is refused");
        assert!(err.to_string().contains("gs://tv-bucket/p"), "{err}");
        let unknown: BTreeMap<String, String> =
            [("no_such_option".to_string(), "x".to_string())].into();
        let err = open_store("gs://tv-bucket/p", &unknown).unwrap_err();
        assert!(err.to_string().contains("unknown option"), "{err}");
    }
}
