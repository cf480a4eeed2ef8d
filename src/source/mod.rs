//! Sources: what is backed up. Each kind knows how to take a consistent snapshot and how to
//! capture its changes; everything else (repository, catalog, restore plan) is shared.

pub mod blobs;
pub mod postgres;
pub mod sqlite;
