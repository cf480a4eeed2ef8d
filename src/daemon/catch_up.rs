//! Catching up a replica that missed writes while the quorum acknowledged without it.

use std::time::Duration;

use crate::repo::{Repository, SyncOptions};

/// Catches up a replica that missed writes (it was down while the quorum acknowledged without
/// it): once its errors stop growing, a quick sync copies what it lacks from the others.
/// It starts pending: a previous run killed between two replicas' writes (kill -9, power loss)
/// may have left an object on only some of them, and nothing else would ever copy it.
pub struct CatchUp {
    /// Errors per replica at the last look.
    errors: Vec<u64>,
    pending: bool,
    next: tokio::time::Instant,
}

impl CatchUp {
    const EVERY: Duration = Duration::from_secs(10);

    pub fn new(repo: &Repository) -> Self {
        CatchUp {
            errors: repo
                .replicas()
                .replicas()
                .iter()
                .map(|r| r.health().errors)
                .collect(),
            pending: true,
            next: tokio::time::Instant::now() + Self::EVERY,
        }
    }

    pub async fn run_if_due(&mut self, repo: &Repository) {
        if tokio::time::Instant::now() < self.next {
            return;
        }
        self.next = tokio::time::Instant::now() + Self::EVERY;
        let now: Vec<u64> = repo
            .replicas()
            .replicas()
            .iter()
            .map(|r| r.health().errors)
            .collect();
        let failing = now != self.errors;
        self.errors = now;
        // A replica still behind (a write it missed during the last sync, which ended complete
        // without it) needs another catch-up, although nothing failed since.
        let behind = repo
            .replicas()
            .replicas()
            .iter()
            .any(|r| r.health().behind_since.is_some());
        self.pending |= failing || behind;
        if self.pending && !failing {
            // Retried after the next quiet interval while a replica still fails.
            self.sync(repo).await;
        }
    }

    /// On a clean shutdown: a catch-up still pending runs now (a short-lived daemon otherwise
    /// never gets to it).
    pub async fn before_exit(&mut self, repo: &Repository) {
        if self.pending {
            self.sync(repo).await;
        }
    }

    async fn sync(&mut self, repo: &Repository) {
        let options = SyncOptions {
            quick: true,
            replica: None,
        };
        match repo.sync_replicas(&options).await {
            Ok(summary) if summary.is_complete() => {
                self.pending = false;
                match summary.objects_written() {
                    // The check at start found every replica in step: nothing to tell.
                    0 => tracing::debug!("replicas hold the same objects"),
                    objects => tracing::info!(objects, "lagging replicas caught up"),
                }
            }
            Ok(summary) => tracing::warn!(
                objects = summary.objects_written(),
                "replica catch-up incomplete; will retry"
            ),
            Err(e) => tracing::warn!(error = %e, "replica catch-up failed; will retry"),
        }
        self.errors = repo
            .replicas()
            .replicas()
            .iter()
            .map(|r| r.health().errors)
            .collect();
    }
}
