//! One replica: an object store location with a name, a region label, retries and health.
//!
//! object_store retries idempotent HTTP requests but not a PUT that timed out, and the local
//! file store does not retry at all; every call here goes through [`RetryPolicy`]. A create-only
//! PUT that is retried and then finds the object present checks the stored bytes: if they are
//! ours, the first attempt landed and the write succeeded.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::Serialize;

use super::store::Store;

/// How often and how patiently a failing call is retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.min(16);
        (self.first_backoff * factor).min(self.max_backoff)
    }
}

/// Errors that retrying cannot fix.
fn is_permanent(err: &object_store::Error) -> bool {
    use object_store::Error as E;
    matches!(
        err,
        E::NotFound { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. }
            | E::NotModified { .. }
            | E::NotImplemented { .. }
            | E::NotSupported { .. }
            | E::InvalidPath { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::UnknownConfigurationKey { .. }
    )
}

/// What a replica has done lately; shown by `status` and exported as metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplicaHealth {
    pub requests: u64,
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub errors: u64,
    pub bad_objects: u64,
    pub last_ok: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
}

/// Result of a create-only write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// We wrote it (possibly on a retry whose first attempt had landed).
    Created,
    /// Another write had already stored an object under this key.
    Existed,
}

/// One object store location holding a full copy of the repository.
pub struct Replica {
    name: String,
    region: String,
    store: Store,
    retry: RetryPolicy,
    health: Mutex<ReplicaHealth>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Replica({} in {})", self.name, self.region)
    }
}

impl Replica {
    pub fn new(name: impl Into<String>, region: impl Into<String>, store: Store) -> Self {
        Replica {
            name: name.into(),
            region: region.into(),
            store,
            retry: RetryPolicy::default(),
            health: Mutex::new(ReplicaHealth::default()),
        }
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn health(&self) -> ReplicaHealth {
        self.health.lock().expect("health lock").clone()
    }

    fn record<T>(&self, result: &Result<T, object_store::Error>, read: u64, written: u64) {
        let mut h = self.health.lock().expect("health lock");
        h.requests += 1;
        match result {
            Ok(_) => {
                h.bytes_read += read;
                h.bytes_written += written;
                h.last_ok = Some(Utc::now());
            }
            Err(object_store::Error::NotFound { .. })
            | Err(object_store::Error::AlreadyExists { .. }) => {
                h.last_ok = Some(Utc::now());
            }
            Err(e) => {
                h.errors += 1;
                h.last_error = Some(e.to_string());
                h.last_error_at = Some(Utc::now());
            }
        }
    }

    /// Note an object that failed authentication on this replica.
    pub fn record_bad_object(&self, key: &str, why: &str) {
        let mut h = self.health.lock().expect("health lock");
        h.bad_objects += 1;
        h.last_error = Some(format!("{key}: {why}"));
        h.last_error_at = Some(Utc::now());
        tracing::warn!(replica = %self.name, key, why, "object failed authentication");
    }

    async fn retrying<T, F, Fut>(&self, op: &str, key: &str, mut call: F) -> object_store::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        let mut attempt = 0;
        loop {
            let result = call().await;
            match result {
                Err(e) if !is_permanent(&e) && attempt + 1 < self.retry.attempts => {
                    let wait = self.retry.backoff(attempt);
                    tracing::debug!(replica = %self.name, op, key, attempt, error = %e, ?wait, "retrying");
                    self.record::<()>(&Err(e), 0, 0);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Create-only write with retries; see the module docs for how retries are confirmed.
    pub async fn put_create(&self, key: &str, bytes: Bytes) -> object_store::Result<PutOutcome> {
        self.put_mode(key, bytes, PutMode::Create).await
    }

    /// Overwrite: used only to repair a copy that failed authentication.
    pub async fn put_overwrite(&self, key: &str, bytes: Bytes) -> object_store::Result<()> {
        self.put_mode(key, bytes, PutMode::Overwrite)
            .await
            .map(|_| ())
    }

    async fn put_mode(
        &self,
        key: &str,
        bytes: Bytes,
        mode: PutMode,
    ) -> object_store::Result<PutOutcome> {
        let path = Path::from(key);
        let len = bytes.len() as u64;
        let mut attempts = 0u32;
        let result = self
            .retrying("put", key, || {
                attempts += 1;
                let options = PutOptions::from(mode.clone());
                self.store
                    .put_opts(&path, PutPayload::from(bytes.clone()), options)
            })
            .await;
        self.record(&result, 0, len);
        match result {
            Ok(_) => Ok(PutOutcome::Created),
            Err(object_store::Error::AlreadyExists { .. }) if attempts > 1 => {
                // A retried create: did our earlier attempt land?
                match self.get(key).await? {
                    Some(stored) if stored == bytes => Ok(PutOutcome::Created),
                    _ => Ok(PutOutcome::Existed),
                }
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(PutOutcome::Existed),
            Err(e) => Err(e),
        }
    }

    /// Whole object, or `None` when absent.
    pub async fn get(&self, key: &str) -> object_store::Result<Option<Bytes>> {
        let path = Path::from(key);
        let result = self
            .retrying("get", key, || async {
                self.store.get(&path).await?.bytes().await
            })
            .await;
        let read = result.as_ref().map(|b| b.len() as u64).unwrap_or(0);
        self.record(&result, read, 0);
        match result {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn delete(&self, key: &str) -> object_store::Result<()> {
        let path = Path::from(key);
        let result = self
            .retrying("delete", key, || self.store.delete(&path))
            .await;
        self.record(&result, 0, 0);
        match result {
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    /// Every object under `prefix` (all objects when empty), sorted by key.
    pub async fn list(&self, prefix: &str) -> object_store::Result<Vec<ObjectMeta>> {
        let path = (!prefix.is_empty()).then(|| Path::from(prefix.trim_end_matches('/')));
        let result = self
            .retrying("list", prefix, || {
                self.store.list(path.as_ref()).try_collect::<Vec<_>>()
            })
            .await;
        self.record(&result, 0, 0);
        let mut metas = result?;
        metas.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(metas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use std::sync::Arc;

    #[tokio::test]
    async fn create_only_put_reports_existing_objects() {
        let r = Replica::new("a", "x", Arc::new(InMemory::new()));
        let b = Bytes::from_static(b"abc");
        assert_eq!(
            r.put_create("k/1", b.clone()).await.unwrap(),
            PutOutcome::Created
        );
        assert_eq!(
            r.put_create("k/1", b.clone()).await.unwrap(),
            PutOutcome::Existed
        );
        assert_eq!(r.get("k/1").await.unwrap(), Some(b));
        assert_eq!(r.get("k/2").await.unwrap(), None);
        assert_eq!(r.list("k/").await.unwrap().len(), 1);
        assert_eq!(r.health().errors, 0);
    }
}
