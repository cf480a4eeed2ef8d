//! Sources: what is backed up. Each kind knows how to take a consistent snapshot and how to
//! capture its changes, and serves the daemon through the [`Source`] trait (`registry`: the
//! one place where a configured kind becomes a running source); everything else (repository,
//! catalog, restore plan) is shared.

pub mod blobs;
pub mod postgres;
pub mod registry;
pub mod sqlite;

pub use registry::{Done, Pass, Source};
