//! One replica: an object store location with a name, a region label, retries and health.
//!
//! object_store retries idempotent HTTP requests but not a PUT that timed out, and the local
//! file store does not retry at all; every call here goes through [`RetryPolicy`]. A create-only
//! PUT that is retried and then finds the object present checks the stored bytes: if they are
//! ours, the first attempt landed and the write succeeded.
//!
//! A replica whose last call failed after every retry is *down*: until a call succeeds again,
//! each call makes a single attempt. A replica whose server is gone then costs one quick
//! failure per call instead of a full retry schedule, so the daemon's loop (lease renewal,
//! chunk listings) is not held up by a site in an outage while the quorum carries on.
//!
//! Every request is counted by kind with the bytes it moved ([`RequestCounts`]), so the cost
//! of a schedule per replica can be measured (docs/COSTS.md).

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

/// Requests sent to a replica, by kind (failed attempts and retries included). A listing
/// counts one request per started page of [`LIST_PAGE`] keys, as S3 and GCS bill it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RequestCounts {
    pub put: u64,
    pub get: u64,
    pub list: u64,
    pub delete: u64,
}

/// Keys per listing page (S3 and GCS; Azure pages hold up to 5000, so this over-counts there).
pub const LIST_PAGE: u64 = 1000;

/// The kind of a request, for [`RequestCounts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Put,
    Get,
    List,
    Delete,
}

impl RequestCounts {
    pub fn total(&self) -> u64 {
        self.put + self.get + self.list + self.delete
    }

    fn add(&mut self, op: Op, n: u64) {
        match op {
            Op::Put => self.put += n,
            Op::Get => self.get += n,
            Op::List => self.list += n,
            Op::Delete => self.delete += n,
        }
    }
}

/// What a replica has done lately; shown by `status` and exported as metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplicaHealth {
    pub requests: u64,
    /// `requests` by kind.
    pub by_kind: RequestCounts,
    /// True while the last call failed after all retries (calls then make one attempt each).
    pub down: bool,
    pub bytes_written: u64,
    pub bytes_read: u64,
    pub errors: u64,
    pub bad_objects: u64,
    pub last_ok: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// Writes the quorum acknowledged without this replica (it failed them): it lacked each
    /// until a catch-up copied it.
    pub missed_writes: u64,
    /// When this replica missed the oldest acknowledged write it may still lack; `None` while
    /// it holds every one. Cleared only by a catch-up that found it complete (see
    /// [`Replica::begin_catch_up`]).
    pub behind_since: Option<DateTime<Utc>>,
    /// The first write missed since the newest catch-up began, and that catch-up's number.
    #[serde(skip)]
    missed_since_catch_up: Option<DateTime<Utc>>,
    #[serde(skip)]
    catch_ups: u64,
}

/// A catch-up of one replica that has begun (before its listings): what it may clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUpMark(u64);

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

    fn record<T>(&self, op: Op, result: &Result<T, object_store::Error>, read: u64, written: u64) {
        self.record_requests(op, 1, result, read, written);
    }

    fn record_requests<T>(
        &self,
        op: Op,
        requests: u64,
        result: &Result<T, object_store::Error>,
        read: u64,
        written: u64,
    ) {
        let mut h = self.health.lock().expect("health lock");
        h.requests += requests;
        h.by_kind.add(op, requests);
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

    /// The quorum acknowledged a write this replica failed: it lags from now until a catch-up
    /// that begins after this finds it complete. True when it did not lag before.
    pub fn record_missed_write(&self) -> bool {
        let now = Utc::now();
        let mut h = self.health.lock().expect("health lock");
        h.missed_writes += 1;
        h.missed_since_catch_up.get_or_insert(now);
        let started = h.behind_since.is_none();
        h.behind_since.get_or_insert(now);
        started
    }

    /// A catch-up (a sync) begins: call before it lists any replica. Every write acknowledged
    /// before this instant is in the listings of the replicas that acknowledged it, so a sync
    /// that leaves this replica complete may clear what it missed until now (and only that).
    pub fn begin_catch_up(&self) -> CatchUpMark {
        let mut h = self.health.lock().expect("health lock");
        h.catch_ups += 1;
        h.missed_since_catch_up = None;
        CatchUpMark(h.catch_ups)
    }

    /// The catch-up `mark` left this replica holding every object of the listings: it lags
    /// only by the writes it missed since the catch-up began. A mark that a newer catch-up
    /// replaced clears nothing (the newer one will).
    pub fn caught_up(&self, mark: CatchUpMark) {
        let mut h = self.health.lock().expect("health lock");
        if h.catch_ups == mark.0 {
            h.behind_since = h.missed_since_catch_up;
        }
    }

    /// Whether the last call failed after all its retries (see the module docs).
    pub fn is_down(&self) -> bool {
        self.health.lock().expect("health lock").down
    }

    fn set_down(&self, down: bool) {
        let mut h = self.health.lock().expect("health lock");
        if h.down != down {
            if down {
                tracing::warn!(replica = %self.name, "replica unreachable; calls fail fast until it answers again");
            } else {
                tracing::info!(replica = %self.name, "replica reachable again");
            }
        }
        h.down = down;
    }

    async fn retrying<T, F, Fut>(&self, op: Op, key: &str, mut call: F) -> object_store::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        let attempts = if self.is_down() {
            1
        } else {
            self.retry.attempts
        };
        let mut attempt = 0;
        loop {
            let result = call().await;
            match result {
                Err(e) if !is_permanent(&e) && attempt + 1 < attempts => {
                    let wait = self.retry.backoff(attempt);
                    tracing::debug!(replica = %self.name, ?op, key, attempt, error = %e, ?wait, "retrying");
                    self.record::<()>(op, &Err(e), 0, 0);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => {
                    match &other {
                        Err(e) if !is_permanent(e) => self.set_down(true),
                        _ => self.set_down(false),
                    }
                    return other;
                }
            }
        }
    }

    /// Create-only write with retries; see the module docs for how retries are confirmed.
    pub async fn put_create(&self, key: &str, bytes: Bytes) -> object_store::Result<PutOutcome> {
        self.put_mode(key, bytes, PutMode::Create).await
    }

    /// Overwrite: used only to repair a copy that failed authentication and to renew the chunk
    /// sweep marker's heartbeat.
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
            .retrying(Op::Put, key, || {
                attempts += 1;
                let options = PutOptions::from(mode.clone());
                self.store
                    .put_opts(&path, PutPayload::from(bytes.clone()), options)
            })
            .await;
        self.record(Op::Put, &result, 0, len);
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
            .retrying(Op::Get, key, || async {
                self.store.get(&path).await?.bytes().await
            })
            .await;
        let read = result.as_ref().map(|b| b.len() as u64).unwrap_or(0);
        REPLICA_BYTES_READ.fetch_add(read, std::sync::atomic::Ordering::Relaxed);
        self.record(Op::Get, &result, read, 0);
        match result {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn delete(&self, key: &str) -> object_store::Result<()> {
        let path = Path::from(key);
        let result = self
            .retrying(Op::Delete, key, || self.store.delete(&path))
            .await;
        self.record(Op::Delete, &result, 0, 0);
        match result {
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    /// Every object under `prefix` (all objects when empty), sorted by key.
    pub async fn list(&self, prefix: &str) -> object_store::Result<Vec<ObjectMeta>> {
        let path = (!prefix.is_empty()).then(|| Path::from(prefix.trim_end_matches('/')));
        let result = self
            .retrying(Op::List, prefix, || {
                self.store.list(path.as_ref()).try_collect::<Vec<_>>()
            })
            .await;
        let keys = result.as_ref().map(|m| m.len() as u64).unwrap_or(0);
        self.record_requests(Op::List, keys.div_ceil(LIST_PAGE).max(1), &result, 0, 0);
        let mut metas = result?;
        metas.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(metas)
    }
}

/// Bytes this process fetched from replicas (every replica, every handle): what `verify
/// --read-data` and `replicas sync` show as progress.
static REPLICA_BYTES_READ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// See [`REPLICA_BYTES_READ`].
pub fn replica_bytes_read() -> u64 {
    REPLICA_BYTES_READ.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
pub(crate) mod tests {
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
        let h = r.health();
        assert_eq!(h.errors, 0);
        assert_eq!(
            h.by_kind,
            RequestCounts {
                put: 2,
                get: 2,
                list: 1,
                delete: 0
            }
        );
        assert_eq!(h.requests, 5);
        assert_eq!(
            h.bytes_written, 3,
            "the refused second create moved nothing"
        );
    }

    /// A store that fails every call with a retryable error until switched back on.
    #[derive(Debug)]
    pub(crate) struct Outage {
        inner: Store,
        down: std::sync::atomic::AtomicBool,
    }

    impl std::fmt::Display for Outage {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Outage")
        }
    }

    impl Outage {
        /// `inner`, up.
        pub(crate) fn new(inner: Store) -> Outage {
            Outage {
                inner,
                down: false.into(),
            }
        }

        pub(crate) fn set_down(&self, down: bool) {
            self.down.store(down, std::sync::atomic::Ordering::SeqCst);
        }

        fn check(&self) -> object_store::Result<()> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(object_store::Error::Generic {
                    store: "outage",
                    source: "connection refused".into(),
                });
            }
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl object_store::ObjectStore for Outage {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            self.check()?;
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.check()?;
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.check()?;
            self.inner.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<ObjectMeta>> {
            match self.check() {
                Ok(()) => self.inner.list(prefix),
                Err(e) => Box::pin(futures::stream::once(async move { Err(e) })),
            }
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &Path,
            to: &Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    #[tokio::test]
    async fn a_replica_that_stays_down_fails_fast_until_it_answers() {
        let store = Arc::new(Outage::new(Arc::new(InMemory::new())));
        store.set_down(true);
        let retry = RetryPolicy {
            attempts: 3,
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
        };
        let r = Replica::new("a", "x", store.clone()).with_retry(retry);
        let b = Bytes::from_static(b"abc");
        assert!(r.put_create("k/1", b.clone()).await.is_err());
        assert!(r.is_down());
        assert_eq!(r.health().by_kind.put, 3, "the full retry schedule");
        assert!(r.put_create("k/1", b.clone()).await.is_err());
        assert_eq!(r.health().by_kind.put, 4, "one attempt while down");
        store.set_down(false);
        assert_eq!(r.put_create("k/1", b).await.unwrap(), PutOutcome::Created);
        assert!(!r.is_down());
        assert_eq!(r.health().errors, 4);
    }

    #[test]
    fn a_catch_up_clears_only_the_writes_missed_before_it_began() {
        let r = Replica::new("a", "x", Arc::new(InMemory::new()));
        assert!(r.health().behind_since.is_none());
        assert!(r.record_missed_write(), "starts to lag");
        let first = r.health().behind_since.expect("lagging");
        assert!(!r.record_missed_write(), "already lagging");
        assert_eq!(r.health().behind_since, Some(first), "from the first miss");
        // A catch-up begins; a write is missed while it lists and copies.
        let mark = r.begin_catch_up();
        std::thread::sleep(Duration::from_millis(5));
        r.record_missed_write();
        r.caught_up(mark);
        let h = r.health();
        assert!(
            h.behind_since.is_some_and(|t| t > first),
            "still behind, since the write missed during the catch-up: {h:?}"
        );
        // A catch-up that a newer one replaced clears nothing; the newer one does.
        let stale = r.begin_catch_up();
        let newer = r.begin_catch_up();
        r.caught_up(stale);
        assert!(r.health().behind_since.is_some());
        r.caught_up(newer);
        let h = r.health();
        assert_eq!(h.behind_since, None);
        assert_eq!(h.missed_writes, 3, "the counter keeps every miss");
    }
}
