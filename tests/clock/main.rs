//! The tests that shift timevault's clock (`timevault::clock::set_offset`) to live through days
//! and years of retention in seconds. The offset is process-wide, so they have a test binary of
//! their own, apart from `tests/suite`, and take [`clock`] for their whole run: two of them
//! shifting the clock at once would each see the other's time.

mod shifted_clock;

/// The suite's config builder, shared as a file (this binary has no `common` of its own).
#[allow(dead_code)]
#[path = "../suite/common/config.rs"]
mod config;

/// Held by a test for as long as it shifts the clock; the offset is zero again when it ends.
pub async fn clock() -> ClockGuard {
    static CLOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    ClockGuard(CLOCK.lock().await)
}

pub struct ClockGuard(#[allow(dead_code)] tokio::sync::MutexGuard<'static, ()>);

impl Drop for ClockGuard {
    fn drop(&mut self) {
        timevault::clock::set_offset(chrono::Duration::zero());
    }
}
