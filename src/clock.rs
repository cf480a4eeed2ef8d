//! The instant timevault stamps backups and judges retention with.
//!
//! Normally the system clock. Retention is about months and years, so its integration test
//! runs a year of daily backups in seconds by shifting this clock forward (`set_offset`);
//! nothing else may shift it. Only the places that decide *which instant something belongs
//! to* (snapshot and capture stamps, scan times, prune's "now", the chunk index's age) read it;
//! timeouts and latency measurements use `std::time::Instant`.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Duration, Utc};

static OFFSET_US: AtomicI64 = AtomicI64::new(0);

/// Now, as timevault sees it.
pub fn now() -> DateTime<Utc> {
    Utc::now() + Duration::microseconds(OFFSET_US.load(Ordering::Relaxed))
}

/// Shift the clock by `offset` from the system clock (tests only: a fake clock for
/// retention). Affects the whole process.
#[doc(hidden)]
pub fn set_offset(offset: Duration) {
    let us = offset
        .num_microseconds()
        .expect("offset fits in i64 microseconds");
    OFFSET_US.store(us, Ordering::Relaxed);
}
