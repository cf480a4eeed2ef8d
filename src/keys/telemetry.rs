//! Every call to a key service, counted for `/metrics`: requests, errors and latency per
//! provider, KEK and operation. Process-wide, like the replica counters.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One (provider, KEK, operation) series.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CallStats {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
}

/// (provider, KEK as the config writes it, operation) → counts.
pub type Series = BTreeMap<(String, String, String), CallStats>;

static CALLS: Mutex<Series> = Mutex::new(BTreeMap::new());

/// Time `call` and count it under (provider, kek, operation).
pub async fn timed<T, E>(
    provider: &str,
    kek: &str,
    operation: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = Instant::now();
    let result = call.await;
    record(provider, kek, operation, started.elapsed(), result.is_err());
    result
}

fn record(provider: &str, kek: &str, operation: &str, took: Duration, failed: bool) {
    let mut calls = CALLS.lock().unwrap_or_else(|p| p.into_inner());
    let stats = calls
        .entry((provider.into(), kek.into(), operation.into()))
        .or_default();
    stats.requests += 1;
    stats.errors += u64::from(failed);
    stats.seconds += took.as_secs_f64();
}

/// Every series so far.
pub fn snapshot() -> Series {
    CALLS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_and_failures_are_counted_per_operation() {
        let kek = "aws-kms:arn:aws:kms:eu-west-1:123456789012:key/telemetry-test";
        timed("aws-kms", kek, "Decrypt", async { Ok::<_, ()>(()) })
            .await
            .unwrap();
        let _ = timed("aws-kms", kek, "Decrypt", async { Err::<(), _>("denied") }).await;
        let series = snapshot();
        let stats = series[&("aws-kms".into(), kek.into(), "Decrypt".into())];
        assert_eq!((stats.requests, stats.errors), (2, 1));
        assert!(!series.contains_key(&("aws-kms".into(), kek.into(), "DescribeKey".into())));
    }
}
